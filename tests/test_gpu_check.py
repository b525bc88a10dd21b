"""gpu_check.py without a GPU: the check a lent GPU runs, end to end on smoke-3b-1l at toy sizes,
so that it cannot rot between lendings. Its part b is the README's 3B command (sizes cut, fp32:
a bf16 step takes 20+ minutes on a CPU without native bf16), so this is also the suite's run of
that command with a resume and eval.py (the FLOP and bandwidth counts it uses: tests/test_bench.py)."""
import json
import os
import sys
from pathlib import Path

import pytest

import gpu_check
import procs

ROOT = Path(__file__).resolve().parent.parent


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
