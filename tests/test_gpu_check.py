"""gpu_check.py without a GPU: the check a lent GPU runs, end to end on smoke-3b-1l at toy sizes,
so that it cannot rot between lendings. Its part b is the README's 3B command (sizes cut, fp32:
a bf16 step takes 20+ minutes on a CPU without native bf16), so this is also the suite's run of
that command with a resume and eval.py (the FLOP and bandwidth counts it uses: tests/test_bench.py)."""
import ast
import importlib.util
import json
import os
import re
import sys
import time
from importlib.metadata import packages_distributions, requires
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import bench
import gpu_check
import grpo
import models
import procs
import released
import tracking
import vlr

ROOT = Path(__file__).resolve().parent.parent
# The device image's packages that the project or the carried wheels need, at the versions its pip
# list gives (the device tool's KINDS.md, read 2026-11-17; None: there, but no version read).
DEVICE_HAS = {"torch": "2.11.0", "torchvision": "0.26.0", "transformers": "5.17.0", "huggingface-hub": "1.33.0",
              "tokenizers": "0.23.2", "safetensors": "0.8.0", "tiktoken": "0.14.0", "numpy": "2.5.2", "pillow": None,
              "pyarrow": None, "sympy": None, "tqdm": None, "matplotlib": None, "requests": None, "packaging": None,
              "pyyaml": None, "typer": None, "regex": None, "accelerate": "1.15.0", "psutil": None}
LAZY = {"av"}  # qwen_vl_utils reads videos with it, imported inside a function; the project passes images only


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_check")
    res = procs.run([sys.executable, "gpu_check.py", "--out", str(root / "out"), "--work", str(root / "work"),
                     "--budget-s", "3600"], 1800,  # a guard against a hang: 7 min here without AVX-512
                    cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return json.loads((root / "out" / "gpu_check.json").read_text()), root / "work", res.stdout


def test_the_command_trains_resumes_exactly_and_evaluates(checked):
    report, work, _ = checked
    b = report["b_command"]
    assert b["steps"] == [0, 1] and b["resumed_steps"] == [0, 1]
    assert b["resumed_equals_uninterrupted"] and b["resumed_differences"] == {}  # fp32 on a CPU: bit for bit
    assert all(d < 1e-3 for d in b["logp_drift_max"])  # fp32: the sampler's log-probs are the trainer's
    assert any(t < 1 for t in b["truncated_frac"])  # the warm-started responses stop
    assert b["frozen_tower_unchanged"] and b["eval_records"] == 2
    saved = json.loads((work / "resumed" / "final" / "processor_config.json").read_text())["image_processor"]["size"]
    assert (saved["shortest_edge"], saved["longest_edge"]) == (256 * 28 * 28, 1280 * 28 * 28)  # the published budget


def test_memory_and_speed_parts_report_forced_lengths(checked):
    report, _, stdout = checked
    c, d, e = report["c_memory"], report["d_decode"], report["e_update"]
    sizes = gpu_check.CPU
    assert c["rows"] == sizes.prompts * sizes.group and c["response_tokens"] == c["rows"] * sizes.new_tokens
    assert c["first_rollout_gib"] == [None, None]  # no allocator to ask on a CPU
    for side in ("sampler", "generate"):
        assert d[side]["lengths"] == list(sizes.lengths)
        assert all(0 < f for f in d[side]["bound_fraction"]) and all(t > 0 for t in d[side]["tokens_per_s"])
    assert e["tokens"] == c["rows"] * (c["prompt_tokens"] + sizes.new_tokens) and 0 < e["mfu"]
    assert "gpu_check: " in stdout  # the table, printed last
    lora = report["c_lora_memory"]  # the one-GPU command's reading: adapters of rank 16 on smoke-3b-1l's 1 layer
    assert lora["adapter_params"] == 16 * (2048 + 2048 + 2 * (2048 + 256) + 2048 + 2048 + 3 * (2048 + 11008))
    assert lora["adapter_dtype"] == "torch.float32" and lora["rows"] == c["rows"] and lora["logp_drift_max"] < 1e-3


def third_party_imports() -> set[str]:
    """Top-level names the project's modules import anywhere, functions included, but for the
    standard library's and the project's own."""
    project, names = {p.stem for p in ROOT.glob("*.py")}, set()
    for path in ROOT.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add(node.module.split(".")[0])
    return names - project - set(sys.stdlib_module_names)


def test_the_device_has_or_is_carried_every_package_the_check_imports():
    """The device cannot install anything: a package neither in its image nor in .gpu/wheels
    (qwen-vl-utils, once) crashes the check at its first import, minutes into the lease."""
    carried = {canonicalize_name(w) for w in gpu_check.WHEELS}
    dists = packages_distributions()
    needed = {canonicalize_name(d) for name in third_party_imports() for d in dists[name]}
    assert needed - carried - set(DEVICE_HAS) == set()
    for wheel in gpu_check.WHEELS:  # --prepare carries them without their requirements
        for req in map(Requirement, requires(wheel) or []):
            name = canonicalize_name(req.name)
            if (req.marker and not req.marker.evaluate({"extra": ""})) or name in carried | LAZY:
                continue
            assert name in DEVICE_HAS, f"{wheel} needs {req}, which the device lacks"
            there = DEVICE_HAS[name]
            assert there is None or req.specifier.contains(there), f"{wheel} needs {req}; the device has {there}"


# ---------------------------------------------------------------------------------------------
# What does not fit: parts c-e's guards, on the tiny model (the check itself never hits them here)
# ---------------------------------------------------------------------------------------------

def as_on_the_device(name, *args):
    """importlib.util.find_spec where only the device's packages are installed: a logger it lacks is not found."""
    lacks = {k for k in tracking.KINDS if k not in DEVICE_HAS}
    return None if name in lacks else FIND_SPEC(name, *args)


FIND_SPEC = importlib.util.find_spec


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, one_thread):
    """An in-process run as part c's, on the tiny model at the CPU sizes, set up as the device would
    (a run that asked for tensorboard, vlr.py's default, was refused there): (run, records, ceilings, work)."""
    work = tmp_path_factory.mktemp("guards")
    released.make_virl(work / "virl", gpu_check.CPU.picture)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(importlib.util, "find_spec", as_on_the_device)
        run = gpu_check.in_process_run(Path(models.resolve("tiny")), work, gpu_check.CPU, False)
    records = released.widest_records(work, gpu_check.CPU.prompts, gpu_check.CPU.picture)
    return run, records, bench.ceilings(run.device), work


def test_c_ends_at_the_stage_that_overruns_the_budget_and_e_says_why(tiny_run, tmp_path, monkeypatch):
    run, records, peak, _ = tiny_run
    report = gpu_check.Report(tmp_path, budget_s=0)
    memory, update = gpu_check.memory_and_update(report, run, records, peak)
    assert set(memory) == {"estimated_first_rollout_s", "skipped"}  # nothing ran but the probes
    assert re.fullmatch(r"the first rollout: -?\d+ s of the budget left, about \d+ s needed", memory["skipped"])
    assert update == {"skipped": f"c's update did not run ({memory['skipped']})"}

    monkeypatch.setattr(gpu_check, "UPDATE_MFU_FLOOR", 1e-12)  # an update estimated at ~1e9 s
    memory, update = gpu_check.memory_and_update(gpu_check.Report(tmp_path, budget_s=3600), run, records, peak)
    assert memory["rows"] == gpu_check.CPU.prompts * gpu_check.CPU.group and len(memory["rollout_s"]) == 1
    assert memory["estimated_update_s"] > 1e6 and memory["skipped"].startswith("the update: ")
    assert "update_gib" not in memory and update["skipped"].startswith("c's update did not run (the update: ")
    assert all(p.grad is None for p in run.model.parameters())


def test_a_stage_out_of_gpu_memory_keeps_what_c_measured_before_it(tiny_run, tmp_path, monkeypatch):
    run, records, peak, _ = tiny_run
    calls, rollout_chunk = [], vlr.rollout_chunk

    def fourth_runs_out(*args):  # three probes (one untimed), the first rollout, then the rollout after the update
        calls.append(1)
        if len(calls) == 5:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return rollout_chunk(*args)

    monkeypatch.setattr(vlr, "rollout_chunk", fourth_runs_out)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *device: 70.5 * 2**30)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *device: SimpleNamespace(total_memory=79.2 * 2**30))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    memory, update = gpu_check.memory_and_update(gpu_check.Report(tmp_path, budget_s=3600), run, records, peak)
    assert memory["skipped"] == ("the rollout with the optimizer state held: out of GPU memory "
                                 "(peak 70.5 GiB allocated of 79.2 GiB)")
    assert len(memory["rollout_s"]) == 1 and memory["update_gib"] == [None, None]
    assert update["tokens"] == memory["rows"] * (memory["prompt_tokens"] + gpu_check.CPU.new_tokens)
    assert all(p.grad is None for p in run.model.parameters())  # given back for the parts after c
    kept = json.loads((tmp_path / "gpu_check.json").read_text())["c_memory"]  # as a call cut off here would leave it
    assert kept == {k: v for k, v in memory.items() if k != "skipped"}

    def lora_memory():  # a part's set-up that runs out: the part is skipped, not failed
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 7.00 GiB")

    assert gpu_check.attempt(gpu_check.Report(tmp_path, budget_s=3600), lora_memory) == {
        "skipped": "lora_memory: out of GPU memory (peak 70.5 GiB allocated of 79.2 GiB)"}


def test_a_part_that_breaks_or_does_not_fit_costs_no_other_and_the_table_says_why(tiny_run, tmp_path):
    run, records, peak, work = tiny_run
    report = gpu_check.Report(tmp_path, budget_s=100)
    failed = gpu_check.attempt(report, lambda: {}["steps"])
    assert failed == {"failed": "KeyError: 'steps'"}
    assert "Traceback" in (tmp_path / "gpu_check.log").read_text()
    d = gpu_check.decode_speed(report, run, records, gpu_check.CPU, peak, None, None)  # c left no rollout to reuse
    assert d["sampler"]["lengths"] == list(gpu_check.CPU.lengths)
    skipped = "the first rollout: 3 s of the budget left, about 90 s needed"
    report.values.update(environment={"commit": "abc", "torch": "2.11.0"}, elapsed_s=9.0, b_command=failed,
                         c_memory={"estimated_first_rollout_s": 90.0, "skipped": skipped}, d_decode=d,
                         e_update={"skipped": f"c's update did not run ({skipped})"})
    # LoRA's need: c's estimated rollout (90 s), no update estimate, 60 s to load the base again
    report.t0 = time.time()  # 100 s left, however long decode_speed took
    lora = gpu_check.attempt(report, gpu_check.lora_memory, report, Path("never loaded"), work, gpu_check.CPU, False,
                             records, peak)
    assert re.fullmatch(r"the base loaded again, a rollout and an update: (99|100) s of the budget left, about 150 s "
                        r"needed", lora["skipped"])
    report.values["c_lora_memory"] = lora
    table = gpu_check.summary(report.values).splitlines()
    assert table[1] == "b  KeyError: 'steps'"
    assert table[2] == "c  peak GiB (allocated, reserved): " + skipped
    assert table[3].startswith("d  sampler: {'lengths': [16]")
    assert table[-2] == f"e  c's update did not run ({skipped})"
    assert table[-1] == "c  LoRA: " + lora["skipped"]


def test_a_stage_that_breaks_ends_c_and_leaves_the_model_to_sample_with_its_cache(tiny_run, tmp_path, monkeypatch):
    """A failure the CPU never meets (a cuBLAS error in the update, say) ends c as "failed", its
    traceback in the log; the parts after c run on a model given back in eval mode (the update
    trains it) without the gradients it held."""
    run, records, peak, _ = tiny_run

    def breaks(learner, rows, adv, step):
        learner.model.train()
        for p in learner.model.parameters():
            p.grad = torch.zeros_like(p) if p.requires_grad else None
        raise RuntimeError("CUDA error: CUBLAS_STATUS_EXECUTION_FAILED")

    monkeypatch.setattr(grpo, "policy_update", breaks)
    report = gpu_check.Report(tmp_path, budget_s=3600)
    memory, update = gpu_check.memory_and_update(report, run, records, peak)
    assert memory["failed"] == "RuntimeError: CUDA error: CUBLAS_STATUS_EXECUTION_FAILED" and len(memory["rollout_s"]) == 1
    assert update == {"skipped": f"c's update did not run ({memory['failed']})"}
    assert not run.model.training and all(p.grad is None for p in run.model.parameters())
    assert "CUBLAS_STATUS_EXECUTION_FAILED" in (tmp_path / "gpu_check.log").read_text()


def test_d_guards_each_sides_first_length_and_a_side_that_breaks_costs_no_other(tiny_run, tmp_path, monkeypatch):
    """A side's first length is estimated from c's rollout (here 1e6 s at the command's length):
    skipped. A side that breaks at a length (generate, past its prefill) says so; the sampler runs."""
    run, records, peak, _ = tiny_run
    report = gpu_check.Report(tmp_path, budget_s=3600)
    d = gpu_check.decode_speed(report, run, records, gpu_check.CPU, peak, None, 1e6)
    assert all(d[side] == {"skipped": list(gpu_check.CPU.lengths)} for side in ("sampler", "generate", "generate_static"))
    generate = run.model.generate

    def breaks(**kw):
        if kw["max_new_tokens"] > 1:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return generate(**kw)

    monkeypatch.setattr(run.model, "generate", breaks)
    d = gpu_check.decode_speed(report, run, records, gpu_check.CPU, peak, None, None)
    assert d["generate"] == d["generate_static"] == {"error": "RuntimeError: CUDA error: an illegal memory access was "
                                                              "encountered"}
    assert d["sampler"]["lengths"] == list(gpu_check.CPU.lengths)
