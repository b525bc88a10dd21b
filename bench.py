"""How fast is the hand-written sampling loop (`rollout.sample`)?

    python bench.py

On the tiny model (tiny.py), 8 toy prompts x G = 4 responses x 64 new tokens, it times:
  * The loop against Hugging Face `model.generate` with the same settings: the same 32 rows
    (generate gets each prompt repeated G times, as `rollout.repeat_prompts` lays them out; greedy
    generate refuses num_return_sequences > 1), greedy decoding on both, the vision tokens banned
    on both, and the stop tokens ignored on both, so that every row gets exactly 64 tokens. Only
    generated tokens are counted (32 x 64 = 2048 a run), never the prompt. Greedy makes the two
    comparable token for token: the script checks that both produced the same tokens, so both did
    the same work. A second line does the same with sampling at temperature 1.
  * How the loop's time per generated token changes with response length (64, 128, 256): with the
    KV cache each step runs one token per row through the model, so it stays roughly flat.
  * One teacher-forced forward (`rollout.logprobs`) over the 32 rows, prompt + 64 tokens, as the
    trainer runs it before the backward (here without gradients).
Each time is the median of several runs on one CPU thread, loop and generate interleaved so that
a busy machine slows both alike. The loop's edge comes from the prefill: it encodes each prompt and image once
and copies the KV cache G times, where generate runs all 32 rows through the vision tower and the
prompt. Per step both run one 32-row forward; the loop also computes the log-probs it records.
The last line printed is JSON.
"""
import json
import resource
import statistics
import time

import torch
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

import data
import rollout
import tiny

PROMPTS, G, NEW_TOKENS, REPEATS = 8, 4, 64, 5
LENGTHS = (64, 128, 256)


def seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median_seconds(fn, repeats=REPEATS) -> float:
    return statistics.median(seconds(fn) for _ in range(repeats))


def main():
    # One thread: the tiny model's ops are too small to gain from two, and on a shared machine a
    # second thread that has to wait for a busy core at every op makes timings 10-100x erratic.
    torch.set_num_threads(1)
    src = tiny.resolve("tiny")
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(src, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(src)
    tok = processor.tokenizer
    banned = rollout.special_ids(tok, rollout.VISION_TOKENS)
    records = [data.ToyTask("test")[i] for i in range(PROMPTS)]
    rows = rollout.repeat_prompts(data.encode_prompts(processor, records), G)
    prompt_len = rows["input_ids"].shape[1]

    def loop(temperature=0.0, n=NEW_TOKENS):
        return rollout.sample(model, processor, records, G, n, temperature, generator=torch.Generator().manual_seed(0),
                              stop_tokens=())

    @torch.no_grad()
    def generate(temperature=0.0):
        sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature else dict(do_sample=False)
        return model.generate(**rows, max_new_tokens=NEW_TOKENS, suppress_tokens=banned, eos_token_id=None,
                              pad_token_id=tok.pad_token_id, **sampling)

    ro, out = loop(), generate()  # also the warm-up
    assert torch.equal(ro.response_ids, out[:, prompt_len:]), "loop and generate decoded different tokens"
    n_tokens = PROMPTS * G * NEW_TOKENS
    speed = {}
    for temperature in (0.0, 1.0):
        runs = [(seconds(lambda: loop(temperature)), seconds(lambda: generate(temperature))) for _ in range(REPEATS)]
        speed[temperature] = tuple(n_tokens / statistics.median(t) for t in zip(*runs))  # (loop, generate)
        print(f"{'greedy' if temperature == 0 else 'sampling, T=1'}: loop {speed[temperature][0]:.0f} tokens/s, "
              f"generate {speed[temperature][1]:.0f} tokens/s ({n_tokens} tokens, median of {REPEATS})")

    for n in LENGTHS:
        t = median_seconds(lambda: loop(n=n), 3)
        print(f"loop, {n} new tokens x {PROMPTS * G} rows: {t:.3f} s, {t / (PROMPTS * G * n) * 1e3:.4f} ms per token")

    with torch.no_grad():
        drift = (rollout.logprobs(model, ro.prompts, ro.response_ids, ro.response_mask, 1.0, banned) - ro.logp).abs().max()
        t_fwd = median_seconds(lambda: rollout.logprobs(model, ro.prompts, ro.response_ids, ro.response_mask, 1.0, banned))
    print(f"logprobs: {PROMPTS * G} rows x {prompt_len + NEW_TOKENS} tokens in {t_fwd * 1e3:.1f} ms, "
          f"max |difference| from the sampler's log-probs {drift:.1e}")

    loop_tps, gen_tps = speed[0.0]
    print(json.dumps({"loop_tokens_per_s": round(loop_tps, 1), "generate_tokens_per_s": round(gen_tps, 1),
                      "speedup_vs_generate": round(loop_tps / gen_tps, 3), "logprob_forward_ms": round(t_fwd * 1e3, 2),
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))


if __name__ == "__main__":
    main()
