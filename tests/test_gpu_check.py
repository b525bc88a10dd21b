"""gpu_check.py without a GPU: the check a lent GPU runs, end to end on smoke-3b-1l at toy sizes,
so that it cannot rot between lendings. Its part b is the README's 3B command (sizes cut, fp32:
a bf16 step takes 20+ minutes on a CPU without native bf16), so this is also the suite's run of
that command with a resume and eval.py; its counts are checked against the model's shapes."""
import json
import os
import sys
from pathlib import Path

import pytest
import torch

import gpu_check
import procs
import smoke

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_check")
    res = procs.run([sys.executable, "gpu_check.py", "--out", str(root / "out"), "--work", str(root / "work")], 900,
                    cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return json.loads((root / "out" / "gpu_check.json").read_text()), root / "work", res.stdout


def test_the_command_trains_resumes_exactly_and_evaluates(checked):
    report, work, _ = checked
    b = report["b_command"]
    assert b["steps"] == [0, 1, 2] and b["resumed_steps"] == [0, 1, 2]
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


def shapes():
    """The smoke model on the meta device: every shape, no memory."""
    return smoke.build_model(smoke.smoke_config(2), "meta")


def test_update_flops_count_the_shapes():
    model, cfg = shapes(), smoke.HUB_CONFIG
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
    layer = h * (h + kv + kv + h) + 3 * h * i  # q, k, v, o; gate, up, down
    head = cfg["vocab_size"] * h
    vc = cfg["vision_config"]
    vh, vi = vc["hidden_size"], vc["intermediate_size"]
    block = vh * 3 * vh + vh * vh + 3 * vh * vi  # qkv, proj; gate, up, down
    merger = (4 * vh) ** 2 + 4 * vh * vc["out_hidden_size"]
    patch = vh * 3 * 2 * 14 * 14  # the conv over 2 frames of 14x14 RGB patches
    rows = [gpu_check.rollout.Row(prompt_ids=torch.zeros(t, dtype=torch.long), mm_token_type_ids=torch.zeros(t),
                                  pixel_values=torch.zeros(64, 1176), image_grid_thw=torch.tensor([[1, 8, 8]]),
                                  response_ids=torch.zeros(5, dtype=torch.long), logp=torch.zeros(5),
                                  loss_mask=torch.ones(5)) for t in (7, 9)]
    vision = 2 * ((2 * block + patch) * 64 + merger * 16)  # one micro-batch of two rows: the picture once
    expected = sum(6 * (2 * layer + head) * t + 6 * t * t * h * 2 for t in (12, 14)) + vision
    assert gpu_check.update_flops(model, rows, micro_batch=2) == pytest.approx(expected, rel=1e-12)


def test_the_decode_bound_is_weights_and_cache_over_bandwidth():
    model, cfg = shapes(), smoke.HUB_CONFIG
    h, kv = cfg["hidden_size"], cfg["num_key_value_heads"] * cfg["hidden_size"] // cfg["num_attention_heads"]
    lm = sum(p.numel() for n, p in model.model.language_model.named_parameters() if "embed_tokens" not in n)
    weights = 2 * (lm + cfg["vocab_size"] * h)  # bf16; the tied head read whole
    cache = 64 * (100 + 50) * 2 * 2 * kv * 2  # rows x mean length x layers x (k, v) x width x bf16
    assert gpu_check.bound_s(model, 64, 100, 100, {"copy_bytes_per_s": 1e12}) == pytest.approx((weights + cache) / 1e12)
