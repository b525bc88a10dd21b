"""How fast is training, and where does a step's time go?

    python bench.py          # a few minutes on 2 CPU cores; the last line printed is JSON

1. The sampling loop (`rollout.sample`) against Hugging Face `model.generate`, tiny model, 8 toy
   prompts x G = 4 responses x 64 new tokens: the same 32 rows (generate gets each prompt
   repeated G times, as `data.repeat_prompts` lays them out), greedy on both, the vision tokens
   banned on both, the stop tokens ignored on both, so every row gets exactly 64 tokens. Only
   generated tokens count, never the prompt. Greedy makes the two comparable token for token: the
   script checks that both produced the same tokens. A second line does the same at temperature 1.
   Then the loop's time per token at 64, 128 and 256 new tokens, and one teacher-forced forward
   (`rollout.logprobs`) over the 32 rows.
2. The same rows with a long-tailed spread of lengths (SPREAD: a few rows long, most short), as a
   real rollout with a 2048-token cap has: each row is made to stop at its length on both sides
   (stop tokens banned before it, forced at it), so both decode the same tokens. generate feeds
   finished rows padding until the longest ends; the loop lets them leave (`rollout.Decoding.leave_at`).
3. Where a training step's time goes: `vlr.train_step` itself, timed by a clock (`Clock`) that
   hears the functions the code marks as phases (phases.py) start and end, for the toy default run
   (32 prompts x 8, micro-batch 64, 48-token cap) and the 3B-shaped model (`smoke-3b-2l`: one
   prompt x 8, its 448-pixel image 256 visual tokens, a 16-token cap). Each on the current path
   and on the reference path (`--no-share-vision`, rows never leave the decode loop, the KV cache
   grows by torch.cat): the same seed gives both the same samples, so they do the same work. The toy runs alternate (new, old, new, old, after a
   warm-up run) so that a busy machine slows both alike.
4. The 3B-shaped update with the vision tower frozen, new path against old, on G responses like (3)'s.
The checkpoint is one save (model and optimizer state), timed on the new path only for the
3B-shaped model: it does not depend on the path, and it writes 6.5 GB.
5. For gpu_check.py, what a GPU's figures are set against: the copy and matmul rates measured on
   it (`ceilings`), the model FLOPs of an update (`update_flops`) and the bandwidth bound of a
   decode step (`bound_s`).

Everything runs on the CPU with one thread for the tiny model (on a shared machine a second
thread that waits for a busy core at every op makes its timings 10-100x erratic) and two for the
3B-shaped one (its matrices are large).
"""
import argparse
import contextlib
import dataclasses
import gc
import json
import math
import resource
import statistics
import tempfile
import time
from collections import defaultdict
from unittest import mock

import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

import data
import grpo
import kv_cache
import models
import phases
import rollout
import toy
import vlr

PROMPTS, G, NEW_TOKENS, REPEATS = 8, 4, 64, 5
LENGTHS = (64, 128, 256)
# Long-tailed lengths of the 32 rows: 4 long, 28 short (12 to 36 tokens), in a fixed shuffled order.
SPREAD = [256, 192, 128, 96] + [12 + 7 * i % 25 for i in range(28)]
TOY_STEPS, TOY_RUNS = 3, 2  # steps per timed run; runs per path, alternating


def seconds(fn) -> float:
    """fn's wall time; on a GPU, its work included (the device runs asynchronously)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def median_seconds(fn, repeats=REPEATS) -> float:
    return statistics.median(seconds(fn) for _ in range(repeats))


# ---------------------------------------------------------------------------------------------
# 1 and 2: the sampling loop against generate
# ---------------------------------------------------------------------------------------------

def loop_vs_generate(model, processor, records) -> dict:
    tok = processor.tokenizer
    banned = rollout.special_ids(tok, rollout.VISION_TOKENS)
    rows = data.repeat_prompts(data.encode_prompts(processor, records), G)
    prompt_len = rows["input_ids"].shape[1]

    def loop(temperature=0.0, n=NEW_TOKENS):
        return rollout.sample(model, processor, records, G, rollout.Decoding(n, temperature, stop_tokens=()),
                              torch.Generator().manual_seed(0))

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
    return {"loop_tokens_per_s": round(loop_tps, 1), "generate_tokens_per_s": round(gen_tps, 1),
            "speedup_vs_generate": round(loop_tps / gen_tps, 3), "logprob_forward_ms": round(t_fwd * 1e3, 2)}


class StopAt(LogitsProcessor):
    """Row r stops after exactly lengths[r] tokens: its stop tokens banned before, the first forced
    then. One call per decode step: as generate's logits processor, or on the loop's `rollout.pick`."""

    def __init__(self, lengths, stop: list[int]):
        self.lengths, self.stop, self.step = torch.tensor(lengths), torch.tensor(stop), 0

    def __call__(self, input_ids, scores):  # generate's: every row, always in the batch
        return self.force(scores, slice(None))

    def force(self, scores, rows):
        left = self.lengths[rows] - 1 - self.step  # [B] tokens before the stop
        scores = scores.clone()  # [B, V]
        scores[:, self.stop] = torch.where((left > 0)[:, None], float("-inf"), scores[:, self.stop])
        scores[left == 0] = float("-inf")
        scores[left == 0, self.stop[0]] = 0.0
        self.step += 1
        return scores


def spread(model, processor, records) -> dict:
    """Tokens/s with SPREAD's lengths: the loop (rows leave), the loop with rows kept to the end
    (leave_at = inf), and generate; all greedy, the same tokens checked."""
    tok = processor.tokenizer
    stop, banned = rollout.special_ids(tok, rollout.STOP_TOKENS), rollout.special_ids(tok, rollout.VISION_TOKENS)
    lengths = [SPREAD[i] for i in torch.randperm(len(SPREAD), generator=torch.Generator().manual_seed(0))]
    rows = data.repeat_prompts(data.encode_prompts(processor, records), G)
    pick = rollout.pick

    def loop(leave=rollout.LEAVE_AT):
        stop_at = StopAt(lengths, stop)
        def forced(logits, temperature, top_p, banned, generator, top_k=0, rows=None, n=0):
            return pick(stop_at.force(logits, rows), temperature, top_p, banned, generator, top_k, rows, n)

        with mock.patch.object(rollout, "pick", forced):
            how = rollout.Decoding(max(lengths), 0.0, leave_at=leave)
            return rollout.sample(model, processor, records, G, how).response_ids

    @torch.no_grad()
    def generate():
        out = model.generate(**rows, max_new_tokens=max(lengths), suppress_tokens=banned, eos_token_id=stop,
                             pad_token_id=tok.pad_token_id, do_sample=False,
                             logits_processor=LogitsProcessorList([StopAt(lengths, stop)]))
        return out[:, rows["input_ids"].shape[1]:]

    ours, theirs = loop(), generate()
    assert torch.equal(ours, theirs), "loop and generate decoded different tokens"
    assert (ours != tok.pad_token_id).sum(1).tolist() == lengths
    runs = [(seconds(loop), seconds(lambda: loop(math.inf)), seconds(generate)) for _ in range(3)]
    leave_s, keep_s, gen_s = (statistics.median(t) for t in zip(*runs))
    n = sum(lengths)
    print(f"long-tailed lengths ({len(lengths)} rows, {min(lengths)}-{max(lengths)} tokens, {n} in all): "
          f"loop {n / leave_s:.0f} tokens/s, loop with rows kept to the end {n / keep_s:.0f}, "
          f"generate {n / gen_s:.0f} (median of 3)")
    return {"spread_loop_tokens_per_s": round(n / leave_s, 1), "spread_generate_tokens_per_s": round(n / gen_s, 1),
            "speedup_vs_generate_spread": round(gen_s / leave_s, 3)}


# ---------------------------------------------------------------------------------------------
# 3 and 4: a training step, split
# ---------------------------------------------------------------------------------------------

# The marked functions of the code (phases.py) and the phase each one's exclusive time counts to:
# prefill is rollout.sample less the decode loop (so also the prompts' encoding and bookkeeping),
# rethink rethink.rethink less grading (its decode counts to it), ssr vlr.replay_batch (the step's
# rows, the draw, the padding), text_forward rollout.logprobs less the vision tower, backward
# grpo.policy_update less the forward and the optimizer (so also collate, the loss and the clip).
PHASE_OF = {"rollout.sample": "prefill", "rollout.decode": "decode", "rethink.rethink": "rethink",
            "reward.grade": "grading", "vlr.replay_batch": "ssr", "rollout.logprobs": "text_forward",
            "grpo.policy_update": "backward"}
PHASES = ("prefill", "decode", "rethink", "grading", "ssr", "vision", "text_forward", "backward", "optimizer")


class Clock:
    """Seconds per phase, exclusive: time in a phase entered inside another (the vision tower in
    the forward) is taken out of the outer one. A decode inside Forced Rethinking counts as
    rethinking, and the vision tower counts as such in the update only (in sampling it is prefill).
    On a GPU each edge of a phase waits for the device (gpu_check.py): its work is asynchronous."""

    def __init__(self):
        self.s, self.stack, self.open = defaultdict(float), [], []
        self.sync = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None

    @contextlib.contextmanager
    def phase(self, name):
        self.sync()
        t0 = time.perf_counter()
        self.stack.append(name)
        try:
            yield
        finally:
            self.sync()
            dt = time.perf_counter() - t0
            self.stack.pop()
            self.s[name] += dt
            if self.stack:
                self.s[self.stack[-1]] -= dt

    def start(self, name, only_inside=None):
        """Enter phase `name` (`stop` leaves it); with `only_inside`, only inside that phase. Inside
        `name` itself it is not entered again."""
        enter = (only_inside is None or only_inside in self.stack) and name not in self.stack[-1:]
        ctx = self.phase(name) if enter else contextlib.nullcontext()
        ctx.__enter__()
        self.open.append(ctx)

    def stop(self, *_):
        self.open.pop().__exit__(None, None, None)

    def hear(self, name, started):
        """The listener of phases.listen: a marked function of the code starts or ends."""
        if not started:
            return self.stop()
        phase = PHASE_OF[name]
        self.start("rethink" if phase == "decode" and "rethink" in self.stack else phase)

    def watch(self, run) -> list:
        """The vision tower's forward and the optimizer step of a run's model, by hooks (returned)."""
        visual = run.model.model.visual
        return [visual.register_forward_pre_hook(lambda *_: self.start("vision", only_inside="text_forward")),
                visual.register_forward_hook(self.stop),
                run.opt.register_step_pre_hook(lambda *_: self.start("optimizer")),
                run.opt.register_step_post_hook(self.stop)]


def reference_cache(reference: bool):
    """On the reference path, the KV cache before the preallocated one (bench runs in fp32, where
    it was a plain DynamicCache, grown by torch.cat at every step). That cache is no longer in the
    code, so it is swapped in for kv_cache.new_cache: the one thing bench changes in the code."""
    if not reference:
        return contextlib.nullcontext()
    return mock.patch.object(kv_cache, "new_cache", lambda device, length=0: DynamicCache())


def timed_steps(cfg: vlr.Config, reference: bool, checkpoint: bool = True) -> tuple[dict, vlr.Run]:
    """cfg.steps steps of vlr.train_step, the phases of the code clocked as they run (phases.listen);
    the reference path with `reference` (--no-share-vision, rows never leave the decode loop, the
    old KV cache). Returns the seconds per step of each phase, `step` (a step's wall time, as
    metrics.jsonl's step_s), `other` (the step less the phases: rewards, advantages, metrics) and
    `checkpoint` (one vlr.save; none without `checkpoint`); and the run, without its optimizer,
    whose state would outlive the run. Only steps: no eval, no final model."""
    clock = Clock()
    with tempfile.TemporaryDirectory() as out, reference_cache(reference):
        run = vlr.setup(dataclasses.replace(cfg, out=out, share_vision=not reference))
        if reference:
            run = dataclasses.replace(run, decoding=dataclasses.replace(run.decoding, leave_at=math.inf))
        hooks = clock.watch(run)
        with phases.listen(clock.hear):
            step_s = [seconds(lambda: vlr.train_step(run, step)) for step in range(cfg.steps)]
        save_s = seconds(lambda: vlr.save(run, cfg.steps)) if checkpoint else None
        run.log.close()
        for h in hooks:
            h.remove()
    run = dataclasses.replace(run, opt=None, sched=None)
    gc.collect()  # the run's optimizer state (4 GB for the 3B-shaped model) goes before the next run
    split = {k: clock.s[k] / len(step_s) for k in PHASES}
    split["other"] = sum(step_s) / len(step_s) - sum(split.values())
    return {**split, "step": sum(step_s) / len(step_s), "checkpoint": save_s}, run


def mean_split(splits: list[dict]) -> dict:
    return {k: round(statistics.mean(s[k] for s in splits), 4) for k in splits[0]}


def toy_config() -> vlr.Config:
    """The toy runs of `toy_steps`: the default run's flags, TOY_STEPS steps."""
    return vlr.Config(steps=TOY_STEPS)


def toy_steps() -> tuple[dict, dict]:
    cfg = toy_config()
    timed_steps(dataclasses.replace(cfg, steps=1), False)  # warm-up: the first run in a process pays for it
    runs = {True: [], False: []}
    for _ in range(TOY_RUNS):
        for reference in (False, True):
            runs[reference].append(timed_steps(cfg, reference)[0])
    return mean_split(runs[False]), mean_split(runs[True])


def update_seconds(run, batch: list, share: bool) -> float:
    """One policy update of `batch` (rollout.Row, at zero advantage) by the run's model, less its
    optimizer step: the forward and backward that sharing the vision forward changes. SGD at lr 0
    leaves the weights as they were."""
    clock = Clock()
    opt = torch.optim.SGD([p for p in run.model.parameters() if p.requires_grad], lr=0.0)
    opt.register_step_pre_hook(lambda *_: clock.start("optimizer"))
    opt.register_step_post_hook(clock.stop)
    run = dataclasses.replace(run, cfg=dataclasses.replace(run.cfg, share_vision=share), opt=opt)
    learner = vlr.learner(run)
    return seconds(lambda: grpo.policy_update(learner, batch, torch.zeros(len(batch)), 0)) - clock.s["optimizer"]


def smoke_config() -> vlr.Config:
    """The 3B-shaped run of `smoke_3b`: one step of one prompt x 8 with a 16-token cap."""
    return vlr.Config(model="smoke-3b-2l", steps=1, prompts_per_step=1, group_size=8, micro_batch=8, max_new_tokens=16)


def smoke_3b() -> dict:
    """The 3B-shaped step split, tower trained (the default), and the update per response, new over
    old, with the tower trained (from the split) and frozen (timed again, on G responses that the
    last run's model samples for a training prompt). Each run loads the same weights and samples
    before its one update: both paths sample the same tokens and do the same work."""
    cfg = smoke_config()
    new = timed_steps(cfg, False)[0]
    old, run = timed_steps(cfg, True, checkpoint=False)
    ro = rollout.sample(run.model, run.processor, [run.train_set[0]], cfg.group_size, run.decoding, run.gen)
    batch = rollout.split_rows(ro)
    for p in run.model.model.visual.parameters():
        p.requires_grad_(False).grad = None
    frozen = {share: update_seconds(run, batch, share) for share in (False, True)}
    fwd_bwd = lambda s: s["vision"] + s["text_forward"] + s["backward"]
    return {"split_3b": {"new": {k: round(v, 3) for k, v in new.items()},
                         "old": {k: v and round(v, 3) for k, v in old.items()}},
            "update_ratio_3b": round(frozen[True] / frozen[False], 3),
            "update_ratio_3b_trained": round(fwd_bwd(new) / fwd_bwd(old), 3),
            "update_3b_frozen_s": {"new": round(frozen[True], 2), "old": round(frozen[False], 2)},
            "rows_3b": len(batch)}


# ---------------------------------------------------------------------------------------------
# 5. On a GPU (gpu_check.py): the ceilings measured there, the FLOPs of an update, the decode bound
# ---------------------------------------------------------------------------------------------

def ceilings(device) -> dict:
    """The two rates a GPU's figures are measured against (the device README's METHOD), here:
    the device-to-device copy (bytes read plus written) and a large matmul in the compute dtype,
    on random data, the median of ten after three warm-ups."""
    n, dtype = (2**30, torch.bfloat16) if device.type == "cuda" else (2**24, torch.float32)
    x = torch.randn(n, device=device, dtype=dtype)
    y = torch.empty_like(x)
    m = 8192 if device.type == "cuda" else 2048
    a, b = (torch.randn(m, m, device=device, dtype=dtype) for _ in range(2))

    def median_s(fn) -> float:
        median_seconds(fn, 3)  # warm-up
        return median_seconds(fn, 10)

    copy_s, mm_s = median_s(lambda: y.copy_(x)), median_s(lambda: a @ b)
    return {"copy_bytes_per_s": 2 * x.numel() * x.element_size() / copy_s, "matmul_flops_per_s": 2 * m**3 / mm_s,
            "matmul_dtype": str(dtype).removeprefix("torch.")}


def update_flops(model, rows: list, micro_batch: int) -> float:
    """Model FLOPs of one update (gradient checkpointing's recomputation not counted, by
    convention): 6 per trained matmul weight per token (forward and backward; the tied head
    counted as a matmul), causal attention's scores and sums (6 * T^2 * hidden per layer and row),
    and the frozen vision tower's forward, 2 per weight per patch (the merger's per merged token:
    4 patches), once per micro-batch: its rows answer one prompt, whose picture the update
    encodes once (rollout.embed_shared)."""
    lm, visual = model.model.language_model, model.model.visual
    matmul = sum(p.numel() for n, p in lm.named_parameters() if "layers." in n and p.dim() == 2)
    head = model.lm_head.weight.numel()
    hidden, layers = lm.config.hidden_size, lm.config.num_hidden_layers
    tower = sum(p.numel() for n, p in visual.named_parameters() if p.dim() >= 2 and "merger" not in n)
    merger = sum(p.numel() for p in visual.merger.parameters() if p.dim() >= 2)
    merge = visual.spatial_merge_size ** 2
    flops = 0.0
    for i, r in enumerate(rows):
        t, patches = len(r.prompt_ids) + len(r.response_ids), r.pixel_values.shape[0]
        flops += 6 * (matmul + head) * t + 6 * t * t * hidden * layers
        flops += 2 * (tower * patches + merger * patches // merge) if i % micro_batch == 0 else 0
    return flops


def bound_s(model, rows: int, prompt_len: int, n: int, peak: dict) -> float:
    """The fewest seconds a decode step can take: the language model's bf16 weights (the tied head
    read whole, the embedding only as rows) and the KV cache at the mean length of the response,
    read once, at the copy rate measured here."""
    lm = model.model.language_model
    read = sum(p.numel() for name, p in lm.named_parameters() if "embed_tokens" not in name)
    weights = 2 * (read + model.lm_head.weight.numel())
    cfg = lm.config
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 2
    kv = rows * (prompt_len + n / 2) * kv_per_token
    return (weights + kv) / peak["copy_bytes_per_s"]


def print_split(name: str, new: dict, old: dict):
    print(f"{name}: seconds per step, new path / reference path")
    for k in new:
        print(f"  {k:>13} {new[k]:8.3f} " + ("       -" if old[k] is None else f"{old[k]:8.3f}"))


def main():
    t0 = time.perf_counter()
    torch.set_num_threads(1)
    model, processor = models.load_model("tiny")
    model.eval()
    records = [toy.ToyTask("test")[i] for i in range(PROMPTS)]
    out = loop_vs_generate(model, processor, records)
    out.update(spread(model, processor, records))
    split_new, split_old = toy_steps()
    print_split(f"toy default run ({TOY_RUNS} x {TOY_STEPS} steps a path, alternating)", split_new, split_old)
    out.update(toy_step_ratio=round(split_new["step"] / split_old["step"], 3),
               split_toy={"new": split_new, "old": split_old})
    torch.set_num_threads(2)
    out.update(smoke_3b())
    print_split(f"3B-shaped ({out['rows_3b']} rows, tower trained)", out["split_3b"]["new"], out["split_3b"]["old"])
    print(f"3B-shaped update per response, new / old: tower frozen {out['update_ratio_3b']} "
          f"(s: {out['update_3b_frozen_s']}), trained {out['update_ratio_3b_trained']}")
    out.update(bench_s=round(time.perf_counter() - t0, 1),
               peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
    print(json.dumps(out))


if __name__ == "__main__":  # no flags: --help says what it measures, and any flag is refused before a model loads
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    main()
