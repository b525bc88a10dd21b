"""The real path on the 3B-shaped smoke model (smoke.py, one layer), on CPU: the README's 3B command
with the same flags except sizes under torchrun on two processes, on ViRL39K's released schema
with images of real sizes; the sampler against the training forward at the real shapes. (The run
with a kill, a resume and eval.py is the GPU check's, tests/test_gpu_check.py.)"""
import json
import os
import sys
from pathlib import Path

import pytest
import torch

import benchmarks
import data
import eval as evaluation
import gpu_check
import models
import procs
import released
import rollout

ROOT = Path(__file__).resolve().parent.parent
# The README's 3B command, but for the sizes (steps, prompts, G, response cap, micro-batch, chunk)
# and without --bf16: on a CPU without native bf16 (no AVX512_BF16/AMX) a bf16 step of this model
# takes over 20 minutes instead of one. tests/test_vlr.py runs the loop under --bf16 on the tiny model.
REAL_FLAGS = list(gpu_check.README_3B)
SMALL = ["--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "16", "--micro-batch", "2",
         "--rollout-chunk", "1"]


@pytest.fixture(scope="module")
def virl(tmp_path_factory):
    return released.make_virl(tmp_path_factory.mktemp("virl"), gpu_check.CPU.picture)


def run(args, nproc=1, timeout=600):
    """vlr.py (or torchrun vlr.py) with two threads a process, as the machine has."""
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)] if nproc > 1
           else [sys.executable]) + args
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, 2 // nproc)))
    res = procs.run(cmd, timeout, cwd=ROOT, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_torchrun_two_processes(virl, tmp_path):
    """One step of the README's command on two processes under --shard (FSDP2, as the 7B runs; DDP
    on two processes and the published recipe: tests/test_shard.py), then the checkpoint, each
    process's AdamW shard in it, and an evaluation of the final model folder."""
    out = tmp_path / "shard"
    run(["vlr.py", "--model", "smoke-3b-1l", "--data", str(virl), "--out", str(out), *REAL_FLAGS, *SMALL,
         "--steps", "1", "--shard"], nproc=2)
    state = torch.load(out / "ckpt" / "train_state.pt", weights_only=True)
    assert len(state["generators"]) == 2 and len(list((out / "ckpt" / "optimizer").glob("*.distcp"))) == 2
    assert [m["step"] for m in metrics(out)] == [0]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["shard"] and cfg["grad_checkpointing"] and cfg["freeze_vision"]
    model, processor = models.load_model(str(out / "final"))  # a plain model folder, which evaluates
    rows = evaluation.evaluate(model.eval(), processor, benchmarks.load_bench("toy")[:2], max_new_tokens=8)
    assert len(rows) == 2 and all(r["len"] > 0 for r in rows)


def test_torchrun_lora(virl, tmp_path):
    """The README's one-GPU command (adapters of rank 16) on two processes under DDP, one step: the
    processes agree on the weights (the save checks), and the checkpoint holds the adapters and
    the base's fingerprint, not the base."""
    out = tmp_path / "lora"
    run(["vlr.py", "--model", "smoke-3b-1l", "--data", str(virl), "--out", str(out), *REAL_FLAGS, *gpu_check.LORA,
         *SMALL, "--steps", "1"], nproc=2)
    ckpt = out / "ckpt"
    assert not list(ckpt.glob("model*.safetensors")) and (ckpt / "adapter_model.safetensors").stat().st_size < 2**22
    state = torch.load(ckpt / "train_state.pt", weights_only=True)
    assert len(set(state["checksums"])) == 1 and len(state["checksums"]) == 2
    assert state["base"]["model"] == models.location("smoke-3b-1l")
    assert (out / "final" / "model.safetensors").exists() and (out / "final" / "adapter" / "base.json").exists()


@pytest.fixture(scope="module")
def smoke():
    model, processor = models.load_model("smoke-3b-1l")
    return model.eval(), processor


def test_sampler_and_training_forward_agree_on_the_real_shapes(smoke, virl):
    """fp32: the recorded log-probs are the trainer's (<= 1e-4 over the real vocabulary);
    no vision special token is ever sampled."""
    model, processor = smoke
    records, _ = data.load_records(str(virl))
    banned = rollout.special_ids(processor.tokenizer, rollout.VISION_TOKENS)
    ro = rollout.sample(model, processor, records[2:3], 2, rollout.Decoding(12, top_p=0.95, top_k=40),
                        torch.Generator().manual_seed(0))
    with torch.no_grad():
        trained = rollout.logprobs(model, ro.prompts, ro.response_ids, ro.response_mask, 1.0, banned)
    assert (trained - ro.logp).abs().max() <= 1e-4
    assert not torch.isin(ro.response_ids[ro.response_mask.bool()], torch.tensor(banned)).any()
    assert ro.prompts["image_grid_thw"].shape[0] == 2 * 2  # q3 has two images; G = 2
