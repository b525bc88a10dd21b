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
3. Where a training step's time goes: `vlr.train` itself, its functions wrapped by a clock
   (`Clock`), for the toy default run (32 prompts x 8, micro-batch 64, 48-token cap) and the
   3B-shaped model (`smoke-3b-2l`: one prompt x 8, its 448-pixel image 256 visual tokens, a
   16-token cap). Each on the current path and on the reference path (`--no-share-vision`, rows
   never leave the decode loop, the KV cache grows by torch.cat): the same seed gives both the
   same samples, so they do the same work. The toy runs alternate (new, old, new, old, after a
   warm-up run) so that a busy machine slows both alike.
4. The 3B-shaped update with the vision tower frozen, new path against old, on the batch of (3).
The checkpoint is one save (model and optimizer state), timed on the new path only for the
3B-shaped model: it does not depend on the path, and it writes 6.5 GB.

Everything runs on the CPU with one thread for the tiny model (its ops are too small to gain
from two, and on a shared machine a second thread that waits for a busy core at every op makes
timings 10-100x erratic) and two for the 3B-shaped one (its matrices are large).
"""
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
import rethink
import rollout
import ssr
import vlr

PROMPTS, G, NEW_TOKENS, REPEATS = 8, 4, 64, 5
LENGTHS = (64, 128, 256)
# Long-tailed lengths of the 32 rows: 4 long, 28 short (12 to 36 tokens), in a fixed shuffled order.
SPREAD = [256, 192, 128, 96] + [12 + 7 * i % 25 for i in range(28)]
TOY_STEPS, TOY_RUNS = 3, 2  # steps per vlr.train run; runs per path, alternating


def seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
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

class Clock:
    """Seconds per phase, exclusive: time in a phase entered inside another (the vision tower in
    the forward) is taken out of the outer one. A decode inside Forced Rethinking counts as
    rethinking, and the vision tower counts as such in the update only (in sampling it is prefill)."""

    def __init__(self):
        self.s, self.stack, self.open = defaultdict(float), [], []

    @contextlib.contextmanager
    def phase(self, name):
        t0 = time.perf_counter()
        self.stack.append(name)
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            self.stack.pop()
            self.s[name] += dt
            if self.stack:
                self.s[self.stack[-1]] -= dt

    def wrap(self, name, fn):
        """fn, its time counted to `name` (a decode inside rethinking to rethinking)."""
        def timed(*args, **kwargs):
            inner = "rethink" if name == "decode" and "rethink" in self.stack else name
            with self.phase(inner) if inner not in self.stack[-1:] else contextlib.nullcontext():
                return fn(*args, **kwargs)
        return timed

    def start(self, name, only_inside=None):
        """Enter a phase from a hook (`stop` leaves it); with `only_inside`, only inside that phase."""
        ctx = self.phase(name) if only_inside is None or only_inside in self.stack else contextlib.nullcontext()
        ctx.__enter__()
        self.open.append(ctx)

    def stop(self, *_):
        self.open.pop().__exit__(None, None, None)

    def watch(self, run) -> list:
        """The vision tower's forward and the optimizer step of a run's model, by hooks (returned)."""
        visual = run.model.model.visual
        return [visual.register_forward_pre_hook(lambda *_: self.start("vision", only_inside="text_forward")),
                visual.register_forward_hook(self.stop),
                run.opt.register_step_pre_hook(lambda *_: self.start("optimizer")),
                run.opt.register_step_post_hook(self.stop)]


PHASES = ("prefill", "decode", "rethink", "grading", "ssr", "vision", "text_forward", "backward", "optimizer")


def clocked(clock: Clock, reference: bool, checkpoint: bool, keep: dict, hooks: list) -> list:
    """What timed_train wraps: (module, public name, replacement). Each phase is the exclusive time
    of the functions named for it: prefill is rollout.sample less the decode loop (so also the
    prompts' encoding and bookkeeping), rethink rethink.rethink less grading (its decode counts to
    it), text_forward rollout.logprobs less the vision tower, backward grpo.policy_update less the
    forward and the optimizer (so also collate, the loss and the clip). The reference path's rows
    never leave the decode loop (Run.decoding's leave_at)."""
    setup, update, grader = vlr.setup, grpo.policy_update, vlr.grader

    def watched_setup(cfg):
        run = setup(cfg)
        hooks.extend(clock.watch(run))
        if reference:
            run.decoding = dataclasses.replace(run.decoding, leave_at=math.inf)
        return run

    def kept_update(run, batch, advantages, step):
        # the run without its optimizer, whose state would outlive the run
        keep["update"] = (dataclasses.replace(run, opt=None, sched=None, buffer=None), batch, advantages, step)
        return update(run, batch, advantages, step)

    return [(vlr, "setup", watched_setup),
            (vlr, "run_eval", lambda run: {}),
            (vlr, "finish", lambda run: run.log.close()),
            (vlr, "save", clock.wrap("checkpoint", vlr.save) if checkpoint else lambda run, step: None),
            (grpo, "policy_update", clock.wrap("backward", kept_update)),
            (vlr, "grader", lambda cfg: clock.wrap("grading", grader(cfg))),
            (vlr, "pad_batch", clock.wrap("ssr", vlr.pad_batch)),
            (rollout, "sample", clock.wrap("prefill", rollout.sample)),
            (rollout, "decode", clock.wrap("decode", rollout.decode)),
            (rethink, "rethink", clock.wrap("rethink", rethink.rethink)),
            (rollout, "logprobs", clock.wrap("text_forward", rollout.logprobs)),
            (rollout, "split_rows", clock.wrap("ssr", rollout.split_rows)),
            (ssr, "select_batch", clock.wrap("ssr", ssr.select_batch)),
            # The cache before the preallocated one: bench runs in fp32, where it was a plain
            # DynamicCache, grown by torch.cat at every step.
            (kv_cache, "new_cache", (lambda device, length=0: DynamicCache()) if reference else kv_cache.new_cache)]


def timed_train(cfg: vlr.Config, reference: bool, keep: dict | None = None, checkpoint: bool = True) -> dict:
    """vlr.train(cfg) with its phases clocked; the reference path with `reference`. Returns the
    seconds per step of each phase, `step` (metrics.jsonl's step_s), `other` (the step less the
    phases: rewards, advantages, metrics) and `checkpoint` (one save; none without `checkpoint`).
    No eval (not part of a step), no final model written. `keep` gets the update's arguments."""
    clock, hooks = Clock(), []
    patches = clocked(clock, reference, checkpoint, keep if keep is not None else {}, hooks)
    with tempfile.TemporaryDirectory() as out, contextlib.ExitStack() as stack:
        for obj, name, value in patches:
            stack.enter_context(mock.patch.object(obj, name, value))
        vlr.train(dataclasses.replace(cfg, out=out, share_vision=not reference, eval_every=0, save_every=cfg.steps))
        step_s = [json.loads(line)["step_s"] for line in open(f"{out}/metrics.jsonl")]
    for h in hooks:
        h.remove()
    gc.collect()  # the run's optimizer state (4 GB for the 3B-shaped model) goes before the next run
    split = {k: clock.s[k] / len(step_s) for k in PHASES}
    split["other"] = sum(step_s) / len(step_s) - sum(split.values())
    return {**split, "step": sum(step_s) / len(step_s), "checkpoint": clock.s["checkpoint"] if checkpoint else None}


def mean_split(splits: list[dict]) -> dict:
    return {k: round(statistics.mean(s[k] for s in splits), 4) for k in splits[0]}


def toy_steps() -> tuple[dict, dict]:
    cfg = vlr.Config(steps=TOY_STEPS)
    timed_train(dataclasses.replace(cfg, steps=1), False)  # warm-up: the first run in a process pays for it
    runs = {True: [], False: []}
    for _ in range(TOY_RUNS):
        for reference in (False, True):
            runs[reference].append(timed_train(cfg, reference))
    return mean_split(runs[False]), mean_split(runs[True])


def update_seconds(model, kept: tuple, cfg: vlr.Config, share: bool) -> float:
    """One policy update of a kept (run, batch, advantages, step), less its optimizer step: the
    forward and backward that sharing the vision forward changes. SGD at lr 0 leaves the weights
    as they were."""
    run, batch, adv, step = kept
    clock = Clock()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    opt.register_step_pre_hook(lambda *_: clock.start("optimizer"))
    opt.register_step_post_hook(clock.stop)
    run = dataclasses.replace(run, cfg=dataclasses.replace(cfg, share_vision=share), model=model, ddp=model, opt=opt)
    return seconds(lambda: grpo.policy_update(run, batch, adv, step)) - clock.s["optimizer"]


def smoke_3b() -> dict:
    """The 3B-shaped step split, tower trained (the default), and the update per response, new over
    old, with the tower trained (from the split) and frozen (timed again on the step's batch). One
    model for every run, at lr 0: the weights never change, so both paths sample the same tokens
    and do the same work (the optimizer does all its work at lr 0 too). Its responses never stop
    (random weights): every row runs to the cap, so no row leaves and none is rethought."""
    cfg = vlr.Config(model="smoke-3b-2l", steps=1, prompts_per_step=1, group_size=8, micro_batch=8, max_new_tokens=16,
                     lr=0.0)
    model, processor = models.load_model(cfg.model)
    keep = {}
    with mock.patch.object(vlr, "load_policy", lambda c, path, device: (model.requires_grad_(True), processor)):
        new = timed_train(cfg, False, keep)
        old = timed_train(cfg, True, checkpoint=False)
    fwd_bwd = lambda s: s["vision"] + s["text_forward"] + s["backward"]
    for p in model.model.visual.parameters():
        p.requires_grad_(False).grad = None
    frozen = {share: update_seconds(model, keep["update"], cfg, share) for share in (False, True)}
    return {"split_3b": {"new": {k: round(v, 3) for k, v in new.items()},
                         "old": {k: v and round(v, 3) for k, v in old.items()}},
            "update_ratio_3b": round(frozen[True] / frozen[False], 3),
            "update_ratio_3b_trained": round(fwd_bwd(new) / fwd_bwd(old), 3),
            "update_3b_frozen_s": {"new": round(frozen[True], 2), "old": round(frozen[False], 2)},
            "rows_3b": len(keep["update"][1])}


def print_split(name: str, new: dict, old: dict):
    print(f"{name}: seconds per step, new path / reference path")
    for k in new:
        print(f"  {k:>13} {new[k]:8.3f} " + ("       -" if old[k] is None else f"{old[k]:8.3f}"))


def main():
    t0 = time.perf_counter()
    torch.set_num_threads(1)
    model, processor = models.load_model("tiny")
    model.eval()
    records = [data.ToyTask("test")[i] for i in range(PROMPTS)]
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


if __name__ == "__main__":
    main()
