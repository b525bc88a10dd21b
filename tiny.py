"""The tiny offline Qwen2.5-VL: the default model of every command, built here without a download.

It is the real architecture (`Qwen2_5_VLForConditionalGeneration`: a vision tower, a patch merger
and a Qwen2 decoder with 3-D rope), only small; a byte-level BPE tokenizer trained on the toy
task's text, with all of Qwen's special tokens; Qwen2.5-VL's chat template; and Qwen2.5-VL's image
processor with a small pixel budget. It is saved as a normal Hugging Face folder, so the rest of
the code loads "a model path" with `from_pretrained` and never special-cases it.

Format warm start, not distillation: RL can only improve a policy that sometimes produces a
gradable answer. So the tiny base is trained briefly on responses in the answer format whose
answers are drawn at random from the question's answer space, never the true answer: it learns
to write "... \\boxed{x}." and stop, and its accuracy stays at chance. All knowledge of the task
comes from RL. A quarter of the warm-start responses are rethinking-shaped (an answer, cut off
before it in half of them, a trigger, a second answer; both random) with the trigger tokens left
out of the loss: the base can continue
after a forced trigger, as an instruct model can, but never says "wait" by itself.

    python tiny.py                  # build (or rebuild) it into .cache/tiny-qwen2.5-vl and report
    python tiny.py --second-look    # the second-look lab's variant, into .cache/tiny-second-look
"""
import argparse
import hashlib
import json
import random
import sys
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
from tokenizers.models import BPE
from tqdm import tqdm
from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor, Qwen2Tokenizer,
                          Qwen2VLImageProcessor, Qwen2VLVideoProcessor)

import checkpoint
import data
import rethink
import rollout
import toy

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache" / "tiny-qwen2.5-vl"
SPECIAL_TOKENS = [  # Qwen2.5's, in Qwen's order
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
    "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]
# Qwen2.5-VL-Instruct's chat template (adds the default system prompt when there is none).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
VOCAB_SIZE = 512
MIN_PIXELS, MAX_PIXELS = 56 * 56, 112 * 112  # the toy images (112 px) give 16 image tokens
REASONS = ("I look at the image.", "Let me look at the picture.", "I check the shapes in the image.",
           "Let me think step by step.")
WARM_STEPS, WARM_BATCH, WARM_LR = 150, 32, 3e-3
RETHINK_SHAPED = 0.25  # share of warm-start responses shaped like a rethought one


def fingerprint() -> str:
    """Changes whenever what determines the tiny model changes (this file, the toy task, the
    triggers it learns to continue after): then the cached model is rebuilt."""
    h = hashlib.sha256()
    for name in ("tiny.py", "toy.py", "data.py"):  # the task, and its prompt template
        h.update((HERE / name).read_bytes())
    h.update(repr(rethink.TRIGGERS).encode())
    return h.hexdigest()[:16]


def progress(what: str, t0: float):
    """A line on stderr per phase of a model build (this one's and smoke.py's), with the seconds
    since it began: the first command of a fresh clone waits here, minutes on a busy machine."""
    print(f"{what} ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)


def resolve() -> str:
    """The cached tiny model folder, built on first use and rebuilt when its fingerprint changes,
    once however many processes ask (`checkpoint.built_once`)."""
    return str(checkpoint.built_once(CACHE, "vlr_tiny.json", fingerprint(), build))


def resolve_second_look() -> str:
    """The cached second-look variant (below), built on first use and rebuilt as `resolve` rebuilds."""
    return str(checkpoint.built_once(SECOND_LOOK_CACHE, "vlr_tiny.json", second_look_fingerprint(),
                                     lambda out: build(out, second_look=True)))


# ---------------------------------------------------------------------------------------------
# Tokenizer and processor
# ---------------------------------------------------------------------------------------------

def corpus() -> list[str]:
    """All text the tiny model will read or write: prompts, options, answers, responses, triggers."""
    task = toy.ToyTask("train", n=400)
    lines = [CHAT_TEMPLATE, data.INSTRUCTION, "You are a helpful assistant.", "system", "user", "assistant"]
    for i in range(len(task)):
        rec = task[i]
        lines += [data.question_text(rec), rec.answer]
    for q, space in toy.TIERS.values():
        lines += [f"{r} The answer is \\boxed{{{a}}}." for r in REASONS for a in space]
    lines += list(rethink.TRIGGERS) + list(data.LETTERS) + [str(d) for d in range(10)]
    return lines * 4


def build_processor():
    bpe = Tokenizer(BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus(), trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = Qwen2Tokenizer(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                               unk_token=None, bos_token=None)
    pixels = {"min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS}
    return Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**pixels), tokenizer=tokenizer,
                               video_processor=Qwen2VLVideoProcessor(**pixels), chat_template=CHAT_TEMPLATE)


def build_model(tokenizer):
    tid = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
            # head_dim 32 -> 16 rotary frequencies, split over (time, height, width) like 3B's [16, 24, 24]
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
            bos_token_id=tid("<|endoftext|>"), eos_token_id=tid("<|im_end|>"), pad_token_id=tid("<|endoftext|>")),
        vision_config=dict(
            depth=2, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=14, spatial_merge_size=2,
            temporal_patch_size=2, window_size=112, out_hidden_size=128, fullatt_block_indexes=[1]),
        image_token_id=tid("<|image_pad|>"), video_token_id=tid("<|video_pad|>"),
        vision_start_token_id=tid("<|vision_start|>"), vision_end_token_id=tid("<|vision_end|>"),
        tie_word_embeddings=False)
    config.text_config.use_cache = True
    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration(config)


# ---------------------------------------------------------------------------------------------
# The format warm start
# ---------------------------------------------------------------------------------------------

def random_response(rec: data.Record, rng: random.Random):
    """(segments, trained?) of a response with a random answer from the record's answer space."""
    space = data.LETTERS[:len(rec.choices)] if rec.choices else toy.ALL_TIERS[rec.category][1]

    def answer():
        return f" The answer is \\boxed{{{rng.choice(space)}}}."

    if rng.random() >= RETHINK_SHAPED:
        return [(rng.choice(REASONS) + answer(), True)]
    first = rng.choice(REASONS) + ("" if rng.random() < 0.5 else answer())  # cut before the answer, or not
    return [(first, True), (rng.choice(rethink.TRIGGERS), False), (" " + rng.choice(REASONS) + answer(), True)]


def warm_start(model, processor, steps=WARM_STEPS, batch_size=WARM_BATCH, lr=WARM_LR, seed=0,
               tiers=tuple(toy.TIERS), respond=random_response):
    """Supervised steps on random-answer responses (`respond`) to questions of `tiers`; returns
    the final loss."""
    tok = processor.tokenizer
    banned = rollout.special_ids(tok, rollout.VISION_TOKENS)
    task = toy.ToyTask("train", tiers, n=steps * batch_size)
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10) * (1 - s / steps))
    model.train()
    for step in tqdm(range(steps), desc="warm start", leave=False, dynamic_ncols=True):
        recs = [task[step * batch_size + i] for i in range(batch_size)]
        prompts = data.encode_prompts(processor, recs)
        ids, loss_mask = [], []
        for rec in recs:
            parts = respond(rec, rng) + [("<|im_end|>", True)]
            enc = [tok.encode(text, add_special_tokens=False) for text, _ in parts]
            ids.append(torch.tensor(sum(enc, [])))
            loss_mask.append(torch.tensor(sum(([float(t)] * len(e) for e, (_, t) in zip(enc, parts)), [])))
        resp = rollout.pad(ids, tok.pad_token_id)
        mask = rollout.pad([torch.ones_like(i) for i in ids], 0)
        lp = rollout.logprobs(model, prompts, resp, mask, 1.0, banned)
        weights = rollout.pad(loss_mask, 0.0)
        loss = -(lp * weights).sum() / weights.sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.eval()
    return loss.item()


def build(out: Path, second_look: bool = False) -> dict:
    """Build tokenizer, processor and model, warm-start it, and save atomically into `out`; with
    `second_look`, the second-look variant (below)."""
    t0 = time.time()
    progress(f"building the tiny model into {out}, once: the tokenizer", t0)
    torch.manual_seed(0)
    processor = build_processor()
    model = build_model(processor.tokenizer)
    t_build = time.time() - t0
    progress(f"the format warm start, {WARM_STEPS} steps", t0)
    if second_look:
        loss = warm_start(model, processor, tiers=SECOND_LOOK_TIERS, respond=second_look_response)
    else:
        loss = warm_start(model, processor)
    info = {"fingerprint": second_look_fingerprint() if second_look else fingerprint(),
            "params": sum(p.numel() for p in model.parameters()),
            "vocab": len(processor.tokenizer), "build_s": round(t_build, 2),
            "warm_start_s": round(time.time() - t0 - t_build, 2), "warm_start_loss": round(loss, 4)}
    def write(tmp: Path):
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / "vlr_tiny.json").write_text(json.dumps(info, indent=1))

    checkpoint.write_atomically(out, write)
    progress("built the tiny model", t0)
    info["size_mb"] = round(sum(f.stat().st_size for f in out.iterdir()) / 2**20, 2)
    return info


# ---------------------------------------------------------------------------------------------
# The second-look variant (docs/lab.md, "A second look"): `--model tiny-second-look`
# ---------------------------------------------------------------------------------------------
# The second-look lab asks questions the default model never read (toy.SECOND_LOOK) and needs a
# base that, after a forced trigger, continues from its first answer: "... \\boxed{red}. Wait,
# let's double check. red > ..." So this variant is built as the default one (the same tokenizer,
# the same initial weights) but warm-started on every tier, the second-look tiers included, and
# their rethinking-shaped responses restate the first answer and follow it with " > " and a
# colour, then a box. The form is taught, not the answer: the first answer is a random colour
# and so is the final one (READS_CODE says which). The default model stays as it is.
SECOND_LOOK_CACHE = HERE / ".cache" / "tiny-second-look"
SECOND_LOOK_TIERS = (*toy.TIERS, *toy.SECOND_LOOK)
# What follows "<first answer> >": the first answer's code as the question lists it (True: the
# warm start teaches reading the code table, and the final answer, the code of a random colour,
# is itself a random colour), or another random colour (False: the form alone).
READS_CODE = False


def second_look_fingerprint() -> str:
    return hashlib.sha256(f"{fingerprint()} second look, reads code: {READS_CODE}".encode()).hexdigest()[:16]


def second_look_response(rec: data.Record, rng: random.Random):
    """(segments, trained?) of a warm-start response: as `random_response`, but a rethinking-shaped
    response to a second-look question restates its first answer after the trigger and continues
    from it: "<reason> The answer is \\boxed{X}." + trigger (not trained) + " X > Y. The answer is
    \\boxed{Y}." X is a random colour; Y the code of X (READS_CODE) or another random colour."""
    if rec.category not in toy.SECOND_LOOK:
        return random_response(rec, rng)
    space = toy.ALL_TIERS[rec.category][1]
    first = rng.choice(space)
    if rng.random() >= RETHINK_SHAPED:
        return [(f"{rng.choice(REASONS)} The answer is \\boxed{{{first}}}.", True)]
    final = rec.meta["code"][first] if READS_CODE else rng.choice(space)
    return [(f"{rng.choice(REASONS)} The answer is \\boxed{{{first}}}.", True), (rng.choice(rethink.TRIGGERS), False),
            (f" {first} > {final}. The answer is \\boxed{{{final}}}.", True)]


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--second-look", action="store_true", help="build the second-look variant instead")
    second = p.parse_args().second_look
    print(json.dumps(build(SECOND_LOOK_CACHE, second_look=True) if second else build(CACHE)))
