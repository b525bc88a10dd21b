"""The real path on the 3B-shaped smoke model (smoke.py, one layer), on CPU: the commands of the README's
"real runs" section with the same flags except sizes, on ViRL39K's released schema with images
of real sizes. (The models are built on first use and cached in .cache.)"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

import data
import models
import procs
import rollout

ROOT = Path(__file__).resolve().parent.parent
# The README's 3B command, but for the sizes (steps, prompts, G, response cap, micro-batch, chunk)
# and without --bf16: on a CPU without native bf16 (no AVX512_BF16/AMX) a bf16 step of this model
# takes over 20 minutes instead of one. tests/test_vlr.py runs the loop under --bf16 on the tiny model.
REAL_FLAGS = ["--grad-checkpointing", "--freeze-vision", "--lr", "1e-6", "--clip-eps-high", "0.35",
              "--top-p", "0.95", "--top-k", "40", "--rethink-train-trigger"]
SMALL = ["--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "16", "--micro-batch", "2",
         "--rollout-chunk", "1"]


def picture(size, colour, path):
    img = Image.new("RGB", size, (255, 255, 255))
    ImageDraw.Draw(img).ellipse((20, 20, size[0] - 20, size[1] - 20), fill=colour)
    img.save(path)
    return path.name


@pytest.fixture(scope="module")
def virl(tmp_path_factory):
    """39Krelease.parquet + images/ as released: 448x448 and 640x480 pictures, one record with two."""
    root = tmp_path_factory.mktemp("virl")
    (root / "images").mkdir()
    a = picture((448, 448), (220, 40, 40), root / "images" / "a.png")
    b = picture((640, 480), (40, 80, 220), root / "images" / "b.jpg")
    rows = [
        {"qid": "q1", "question": "<image>What colour is the circle?", "answer": "\\boxed{red}", "image": [f"images/{a}"]},
        {"qid": "q2", "question": "<image>The radius is 3. What is the area?", "answer": "\\boxed{9\\pi}",
         "image": [f"images/{b}"]},
        {"qid": "q3", "question": "Left: <image> Right: <image> Which is blue?", "answer": "\\boxed{B}",
         "image": [f"images/{a}", f"images/{b}"]},
        {"qid": "q4", "question": "<image>Find x if 2x = 3.", "answer": "\\boxed{\\frac{3}{2}}", "image": [f"images/{b}"]},
    ]
    for r in rows:
        r.update(category="test", source="synthetic", PassRate_32BTrained=0.5, PassRate_7BBase=0.25)
    pq.write_table(pa.Table.from_pylist(rows), root / "39Krelease.parquet")
    return root / "39Krelease.parquet"


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


def visual_weights(folder):
    weights = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        weights.update({k: v for k, v in load_file(f).items() if ".visual." in k or k.startswith("visual.")})
    return weights


def test_train_resume_and_eval_as_the_readme_runs_them(virl, tmp_path):
    """3 steps, killed once the step-2 checkpoint is written, resumed to the end; then eval.py."""
    out = tmp_path / "3b"
    cmd = ["vlr.py", "--model", "smoke-3b-1l", "--data", str(virl), "--out", str(out), *REAL_FLAGS, *SMALL,
           "--steps", "3", "--save-every", "2"]
    proc = procs.start([sys.executable, *cmd], cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="2"),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not (out / "ckpt" / "train_state.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    procs.stop(proc)
    first = metrics(out)
    assert [m["step"] for m in first] == [0, 1]
    assert all(m["logp_drift_max"] < 1e-3 and m["skipped"] == 0 for m in first)  # fp32: sampler = trainer
    assert any(m["truncated_frac"] < 1 for m in first)  # the warm-started responses stop

    run(cmd + ["--resume"])
    resumed = metrics(out)
    assert [m["step"] for m in resumed] == [0, 1, 2] and resumed[:2] == first
    # the frozen tower is saved exactly as loaded (no gradient ever reached it)
    start = visual_weights(models.resolve("smoke-3b-1l"))
    after = visual_weights(out / "final")
    assert start and start.keys() == after.keys()
    assert all(torch.equal(start[k].float(), after[k].float()) for k in start)
    saved = json.loads((out / "final" / "processor_config.json").read_text())["image_processor"]["size"]
    assert (saved["shortest_edge"], saved["longest_edge"]) == (256 * 28 * 28, 1280 * 28 * 28)  # the published budget

    bench = tmp_path / "mathvista.jsonl"
    bench.write_text("".join(json.dumps({"pid": str(i), "question": "What is the area?", "image": str(virl.parent / image),
                                         "answer": "28.27", "question_type": "free_form", "answer_type": "float",
                                         "precision": 2, "metadata": {"task": "geometry problem solving"}}) + "\n"
                             for i, image in enumerate(["images/b.jpg", "images/a.png"])))
    res = run(["eval.py", "--model", str(out / "final"), "--bench", "mathvista", "--data", str(bench),
               "--max-new-tokens", "16", "--out", str(tmp_path / "eval.jsonl")], nproc=2)  # as the README: torchrun
    assert json.loads(res.stdout.strip().splitlines()[-1])["n"] == 2


def test_torchrun_two_processes(virl, tmp_path):
    """One step of the published recipe (two optimizer steps here, SFT term, reflection bonus) on two
    processes under --shard (FSDP2, as the 7B runs; DDP on two processes: tests/test_shard.py),
    then the checkpoint, each process's AdamW shard in it, and eval.py on the final model folder."""
    out = tmp_path / "shard"
    run(["vlr.py", "--model", "smoke-3b-1l", "--data", str(virl), "--out", str(out), *REAL_FLAGS, *SMALL,
         "--recipe", "published", "--minibatches", "2", "--steps", "1", "--shard"], nproc=2)
    state = torch.load(out / "ckpt" / "train_state.pt", weights_only=False)
    assert len(state["generators"]) == 2 and len(list((out / "ckpt" / "optimizer").glob("*.distcp"))) == 2
    assert [m["step"] for m in metrics(out)] == [0]
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["minibatches"], cfg["sft_coef"], cfg["adv_std"], cfg["shard"]) == (2, 0.05, False, True)
    res = run(["eval.py", "--model", str(out / "final"), "--bench", "toy", "--limit", "2", "--max-new-tokens", "8",
               "--out", str(tmp_path / "eval.jsonl")])
    assert json.loads(res.stdout.strip().splitlines()[-1])["n"] == 2


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
