"""--shard (FSDP2, shard.py) against DDP on two gloo processes, on the tiny model: the same weights
and metrics after 3 steps, a kill and --resume that continues exactly, and a step under --bf16.
The 3B-shaped model under --shard, and eval.py on what it saves: tests/test_real.py."""
import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint import CheckpointException

import checkpoint
import procs
import shard
import test_refusals
import test_vlr
import toy
import vlr
from distributed import UserError

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "vlr.py"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")
# SMALL checkpoints at step 2, so a kill after it has a step left to redo. The published recipe
# (two optimizer steps a rollout, the SFT term, the reflection bonus; test_real.py trains the
# 3B-shaped model with the defaults), two micro-batches an optimizer step and process: DDP
# all-reduces their sum once, FSDP reduce-scatters each.
STEPS = ["--steps", "3", "--recipe", "published", "--minibatches", "2", "--micro-batch", "2"]


def command(out: Path, *flags: str) -> list[str]:
    return [*TORCHRUN, *test_vlr.SMALL, *STEPS, "--out", str(out), *flags]


def weights(out: Path) -> dict:
    return load_file(out / "final" / "model.safetensors")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """The same 3 steps under DDP (runs/ddp) and under --shard (runs/shard)."""
    root = tmp_path_factory.mktemp("runs")
    for name, flags in (("ddp", []), ("shard", ["--shard"])):
        res = procs.run(command(root / name, *flags), 600, cwd=ROOT, env=ENV)
        assert res.returncode == 0, res.stderr[-3000:]
    return root


def test_ddp_keeps_identical_weights_on_every_process(runs):
    state = torch.load(runs / "ddp" / "ckpt" / "train_state.pt", weights_only=True)
    assert len(state["checksums"]) == 2 and state["checksums"][0] == state["checksums"][1]
    assert len(state["generators"]) == 2 and not torch.equal(state["generators"][0], state["generators"][1])
    assert len(test_vlr.metrics(runs / "ddp")) == 3


def test_sharded_training_equals_ddp(runs):
    """fp32: the weights after 3 steps within 1e-6 of DDP's, every metric within float round-off
    (the sums run in another order: each micro-batch's gradient is reduced apart, the gradient
    norm adds the shards' squares). Gradients summed over the processes instead of averaged (FSDP2
    on gloo in some torch versions, pytorch issue 162338) fail both: the norm doubles, and the
    weights, after AdamW and the clip, move 4.9e-5 away (measured once, FSDP's divide factor set to 1)."""
    ddp, sharded = weights(runs / "ddp"), weights(runs / "shard")
    assert ddp.keys() == sharded.keys() and all(w.dtype == torch.float32 for w in sharded.values())
    assert max((ddp[k] - sharded[k]).abs().max().item() for k in ddp) <= 1e-6
    for a, b in zip(test_vlr.metrics(runs / "ddp"), test_vlr.metrics(runs / "shard"), strict=True):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-6)
    state = torch.load(runs / "shard" / "ckpt" / "train_state.pt", weights_only=True)
    assert state["optimizer"] is None and state["checksums"] == []  # AdamW's state is in ckpt/optimizer/
    shards = sorted(p.name for p in (runs / "shard" / "ckpt" / "optimizer").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # one file per process


def test_two_processes_show_the_first_questions_of_the_test_split_as_one_process_would(runs):
    """The last eval's samples: the split's first --log-samples questions (4, the default), in order,
    though each process evaluates every other one: rank 0 holds questions 0 and 2, rank 1 holds 1 and 3."""
    tiers = vlr.parse_args([*test_vlr.SMALL, *STEPS]).toy_tiers.split(",")
    split = toy.ToyTask("test", toy.test_tiers(tiers))
    first = [(split[i].id, split[i].answer) for i in range(4)]
    for name in ("ddp", "shard"):
        shown = [json.loads(line) for line in (runs / name / "samples.jsonl").read_text().splitlines()]
        assert [(s["id"], s["gold"]) for s in shown if s["kind"] == "eval"] == first


def test_kill_and_resume_under_shard_reproduce_the_uninterrupted_run(runs, tmp_path):
    """Killed once the step-2 checkpoint is written, resumed: the same metrics and the same final
    weights, bit for bit. The weights matter: the metrics of the one step redone are measured
    before its update, so an AdamW state lost in the checkpoint shows only in them."""
    out = tmp_path / "run"
    proc = procs.start(command(out, "--shard"), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not (out / "ckpt" / "train_state.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    procs.stop(proc)
    assert len(test_vlr.metrics(out)) < 3, "killed too late to test anything"
    res = procs.run(command(out, "--shard", "--resume"), 600, cwd=ROOT, env=ENV)
    assert res.returncode == 0, res.stderr[-3000:]
    assert test_vlr.metrics(out) == test_vlr.metrics(runs / "shard")
    resumed, whole = weights(out), weights(runs / "shard")
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)


def test_bf16_under_shard_gathers_bf16_and_keeps_fp32_weights(tmp_path):
    """--bf16 --shard, the GPU runs' setting: FSDP's mixed-precision policy (bf16 compute, fp32
    reduce) under autocast, fp32 shards and a final model folder in fp32."""
    res = procs.run([*TORCHRUN, *test_vlr.SMALL, "--steps", "1", "--out", str(tmp_path), "--shard", "--bf16"], 600,
                    cwd=ROOT, env=ENV)
    assert res.returncode == 0, res.stderr[-3000:]
    (m,) = test_vlr.metrics(tmp_path)
    assert 0 < m["logp_drift_max"] < 0.1 and m["skipped"] == 0  # bf16 rounding shows, and stays small
    assert {w.dtype for w in weights(tmp_path).values()} == {torch.float32}


def test_shard_refuses_to_run_without_torchrun_and_the_kl_term(tmp_path, monkeypatch):
    """Refused before the processes meet (vlr.check_flags), in one sentence (exit_once, test_refusals.py)."""
    monkeypatch.delenv("RANK", raising=False)
    args = [*test_refusals.CHEAP, "--out", str(tmp_path), "--shard"]
    with pytest.raises(UserError, match="under torchrun"):
        vlr.check_flags(vlr.parse_args(args))
    with pytest.raises(UserError, match="--kl-coef with --shard"):
        vlr.check_flags(vlr.parse_args([*args, "--kl-coef", "0.1"]))
    assert not any(tmp_path.iterdir())


def test_a_full_disk_under_shard_is_an_error_the_writer_and_the_status_file_see(tmp_path, monkeypatch):
    """DCP reports a failed write as CheckpointException, a BaseException: passed on as it is, the
    previous checkpoint's guard (checkpoint.WRITE_ERRORS) and faults.Watch would not see it, and the
    status would stay "running". Raised as an OSError, it is a failed write like any other."""
    def full(state, checkpoint_id):
        raise CheckpointException("save failed", {1: (OSError(28, "No space left on device"), None)})

    monkeypatch.setattr(shard.dcp, "save", full)
    with pytest.raises(OSError, match=r"^process 1: \[Errno 28\] No space left on device$"):
        shard.save_shards({}, str(tmp_path / "optimizer"))
    with pytest.raises(UserError, match=r"could not write .*ckpt \(process 1: \[Errno 28\] No space left"):
        checkpoint.write_atomically(tmp_path / "ckpt", lambda tmp: shard.save_shards({}, str(tmp / "optimizer")))
    assert not (tmp_path / "ckpt").exists()


def test_a_resume_on_another_number_of_processes_is_refused_before_a_model_loads(runs, tmp_path, monkeypatch):
    """Each process has its own prompts, sampler and replay buffer: the 2-process checkpoint of
    the DDP run, resumed by 1 process, would drop half of them (and by 3 fail to find a third)."""
    monkeypatch.delenv("RANK", raising=False)
    shutil.copytree(runs / "ddp", tmp_path / "ddp")
    monkeypatch.setattr(vlr, "load_policy", lambda *a: pytest.fail("the model loaded"))
    with pytest.raises(UserError, match=r"ckpt was written by 2 process\(es\), this launch has 1: .* launch it with 2$"):
        vlr.setup(vlr.parse_args([*test_vlr.SMALL, *STEPS, "--out", str(tmp_path / "ddp"), "--resume"]))


class Touches:
    """Unpickled, it creates a file (`Path.touch`): the harm a received checkpoint could do."""
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def adamw(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.9, 0.95))
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    return model, opt


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # one process, no group: DCP says so
def test_the_optimizer_shards_load_without_unpickling_what_dcp_does_not_write(tmp_path):
    """AdamW's state goes through DCP and comes back equal. A metadata file, or an entry that is
    not a tensor, naming anything else (here `Path.touch`) is refused in a sentence, and nothing of
    it runs: DCP alone would have unpickled both (weights_only=False for the entry)."""
    model, opt = adamw(0)
    saved = shard.get_optimizer_state_dict(model, opt)
    shard.save_shards(saved, str(tmp_path / "ok" / "optimizer"))
    other, other_opt = adamw(1)
    shard.load_optimizer(other, other_opt, tmp_path / "ok")
    for p, q in zip(model.parameters(), other.parameters()):
        assert all(torch.equal(opt.state[p][k], other_opt.state[q][k]) for k in ("step", "exp_avg", "exp_avg_sq"))
    assert other_opt.param_groups[0]["betas"] == (0.9, 0.95)

    marker = tmp_path / "ran"
    shutil.copytree(tmp_path / "ok", tmp_path / "metadata")
    (tmp_path / "metadata" / "optimizer" / ".metadata").write_bytes(pickle.dumps(Touches(marker)))
    evil = {**saved, "param_groups": [{**saved["param_groups"][0], "lr": Touches(marker)}]}
    shard.save_shards(evil, str(tmp_path / "entry" / "optimizer"))
    for folder, said in (("metadata", r"metadata/optimizer/\.metadata names pathlib\.Path\.touch, which only"),
                         ("entry", r"could not read .*entry/optimizer \(process 0: its entry "
                                   r"optimizer\.param_groups\.0\.lr holds objects which only")):
        with pytest.raises(UserError, match=said + " unpickling would rebuild .*: not loaded; resume only --shard"):
            shard.load_optimizer(*adamw(1), tmp_path / folder)
        assert not marker.exists(), folder
    (tmp_path / "metadata" / "optimizer" / ".metadata").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match=r"\.metadata is not metadata that DCP writes \(.*\): not loaded$"):
        shard.load_optimizer(*adamw(1), tmp_path / "metadata")
    # where reading .metadata fails, DCP falls back to a rank's own file, which it unpickles unchecked
    (tmp_path / "metadata" / "optimizer" / ".metadata").write_bytes(pickle.dumps(None))
    with pytest.raises(UserError, match=r"\.metadata is not metadata that DCP writes \(it holds NoneType\)"):
        shard.load_optimizer(*adamw(1), tmp_path / "metadata")
    (tmp_path / "metadata" / "optimizer" / "__0.metadata").write_bytes(pickle.dumps(Touches(marker)))
    with pytest.raises(UserError, match=r"optimizer holds __0\.metadata, which --shard's saves never write"):
        shard.load_optimizer(*adamw(1), tmp_path / "metadata")
    assert not marker.exists()
