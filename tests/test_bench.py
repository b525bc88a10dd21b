"""bench.py's counts that a GPU's figures are set against (gpu_check.py): the model FLOPs of an
update and the bandwidth bound of a decode step, each against the count from the config's shapes."""
import sys
from pathlib import Path

import pytest
import torch

import bench
import procs
import rollout
import smoke
import vlr

ROOT = Path(__file__).resolve().parent.parent


def test_help_says_what_it_measures_and_a_flag_is_refused_before_anything_runs():
    """bench.py takes no flags; --help (which the README teaches for every script) used to start
    the whole benchmark, the 3B-shaped model and its 6.5 GB checkpoint included."""
    shown = procs.run([sys.executable, "bench.py", "--help"], 120, cwd=ROOT)
    assert shown.returncode == 0 and shown.stdout.startswith("usage: bench.py [-h]") and bench.__doc__.split("\n")[0] \
        in shown.stdout, shown.stderr[-2000:]
    refused = procs.run([sys.executable, "bench.py", "--steps", "3"], 120, cwd=ROOT)
    assert refused.returncode == 2 and "unrecognized arguments: --steps 3" in refused.stderr


class Checked(Exception):
    """The stand-in setup's stop, once the run's flags passed the trainer's checks."""


def test_the_runs_it_times_pass_the_trainers_flag_checks(monkeypatch):
    """bench.py builds its runs' Config itself, past vlr's command line: at lr 0 (refused since
    vlr.check_ranges) the 3B-shaped part stopped on a UserError after the toy part's minutes.
    Each part's first run is handed to the trainer's own checks, as vlr.setup hands it."""
    models = []

    def setup(cfg):
        vlr.check_flags(cfg)
        models.append(cfg.model)
        raise Checked

    monkeypatch.setattr(vlr, "setup", setup)
    for part in (bench.toy_steps, bench.smoke_3b):
        with pytest.raises(Checked):
            part()
    assert models == ["tiny", "smoke-3b-2l"]


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
    rows = [rollout.Row(prompt_ids=torch.zeros(t, dtype=torch.long), mm_token_type_ids=torch.zeros(t),
                                  pixel_values=torch.zeros(64, 1176), image_grid_thw=torch.tensor([[1, 8, 8]]),
                                  response_ids=torch.zeros(5, dtype=torch.long), logp=torch.zeros(5),
                                  loss_mask=torch.ones(5)) for t in (7, 9)]
    vision = 2 * ((2 * block + patch) * 64 + merger * 16)  # one micro-batch of two rows: the picture once
    expected = sum(6 * (2 * layer + head) * t + 6 * t * t * h * 2 for t in (12, 14)) + vision
    assert bench.update_flops(model, rows, micro_batch=2) == pytest.approx(expected, rel=1e-12)


def test_the_decode_bound_is_weights_and_cache_over_bandwidth():
    model, cfg = shapes(), smoke.HUB_CONFIG
    h, kv = cfg["hidden_size"], cfg["num_key_value_heads"] * cfg["hidden_size"] // cfg["num_attention_heads"]
    lm = sum(p.numel() for n, p in model.model.language_model.named_parameters() if "embed_tokens" not in n)
    weights = 2 * (lm + cfg["vocab_size"] * h)  # bf16; the tied head read whole
    cache = 64 * (100 + 50) * 2 * 2 * kv * 2  # rows x mean length x layers x (k, v) x width x bf16
    assert bench.bound_s(model, 64, 100, 100, {"copy_bytes_per_s": 1e12}) == pytest.approx((weights + cache) / 1e12)
