"""gpu_check.py without a GPU: the check a lent GPU runs, end to end on smoke-3b-1l at toy sizes,
so that it cannot rot between lendings. Its part b is the README's 3B command (sizes cut, fp32:
a bf16 step takes 20+ minutes on a CPU without native bf16), so this is also the suite's run of
that command with a resume and eval.py (the FLOP and bandwidth counts it uses: tests/test_bench.py)."""
import ast
import json
import os
import sys
from importlib.metadata import packages_distributions, requires
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import gpu_check
import procs

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
                     "--budget-s", "3600"], 900,
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
