"""faults.py end to end on the tiny model: a run under torchrun survives a killed worker (the
agent's restart), a full disk (not retried; the previous checkpoint whole), and a preemption
(SIGUSR1) of a run on two nodes; each equals one uninterrupted run. Faults come from $VLR_FAULT at a
given step and torchrun restart, never from timing. In-process: the --auto-resume decision, the
status file's failures, the agreement to stop, the fault's form. The atomic saves: test_checkpoint.py."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import checkpoint
import faults
import procs
import test_vlr
import vlr
from distributed import UserError

ROOT = Path(__file__).resolve().parent.parent
# docs/cluster.md: torchrun's restarts need a fresh store each (faults.check_restarts)
ENV = dict(os.environ, OMP_NUM_THREADS="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
FLAGS = [*test_vlr.SMALL, "--steps", "4"]  # checkpoints after steps 1 and 3 (--save-every 2)
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
ONE_NODE = ["--standalone", "--nproc_per_node", "2"]
# docs/cluster.md's launcher flags: SIGUSR1 forwarded to the workers, time to finish a step and save
RECIPE = ["--max-restarts", "1", "--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
          "--shutdown-timeout", "120"]


def command(out: Path, launcher: list[str], *flags: str) -> list[str]:
    """torchrun's error files go beside --out, not into a new /tmp/torchelastic_* folder per launch."""
    return [*TORCHRUN, *launcher, "--log-dir", str(out.parent / "torchelastic"), "vlr.py", *FLAGS, "--out", str(out),
            *flags]


def launch(cmd: list[str], fault: str = "") -> subprocess.CompletedProcess:
    return procs.run(cmd, 300, cwd=ROOT, env=dict(ENV, VLR_FAULT=fault))


def weights(out: Path) -> dict:
    return load_file(out / "final" / "model.safetensors")


def status(out: Path) -> dict:
    return json.loads((out / "status.json").read_text())


def step_of(ckpt: Path) -> int:
    return torch.load(ckpt / "train_state.pt", weights_only=True)["step"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run: one torchrun agent, two processes, 4 steps."""
    out = tmp_path_factory.mktemp("reference") / "run"
    res = launch(command(out, ONE_NODE, "--auto-resume"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert status(out)["state"] == "finished"
    return out


def test_a_worker_killed_mid_step_is_restarted_by_torchrun_and_the_run_continues_exactly(reference, tmp_path):
    """Rank 1 is SIGKILLed in step 3's update (its first launch only); the agent stops rank 0 and
    starts both again; --auto-resume continues from the checkpoint of step 2: steps 2 and 3 run
    again, once, and the run equals the uninterrupted one, weights bit for bit."""
    out = tmp_path / "run"
    res = launch(command(out, [*ONE_NODE, "--max-restarts", "1"], "--auto-resume"), "SIGKILL step=3 rank=1")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "failed (exitcode: -9) local_rank: 1" in res.stderr  # the agent's log: the kill happened
    assert (status(out)["state"], status(out)["restarts"]) == ("finished", 1)  # finished by the restart
    assert [m["step"] for m in test_vlr.metrics(out)] == [0, 1, 2, 3]
    assert test_vlr.metrics(out) == test_vlr.metrics(reference)
    assert all(torch.equal(w, weights(reference)[k]) for k, w in weights(out).items())


def test_a_full_disk_keeps_the_previous_checkpoint_is_not_retried_and_the_run_goes_on_once_fixed(reference, tmp_path):
    """From step 3's update on no file may grow past 1 MB (rank 0, RLIMIT_FSIZE: the writer fails as
    on a full disk). The save after step 3 stops the run in one sentence naming the folder, with the
    checkpoint of step 2 whole; the status file records it, and the agent's restart refuses in one
    sentence instead of training again. Then, as a kill would, a temporary folder and half a metrics
    line are left behind: a --resume (a person's decision) cleans them and ends as the uninterrupted run."""
    out = tmp_path / "run"
    failed = launch(command(out, [*ONE_NODE, "--max-restarts", "1"], "--auto-resume"), "EFBIG step=3")
    assert failed.returncode != 0
    assert f"could not write {out / 'ckpt'} (" in failed.stderr and "the previous ckpt is left as it was" in failed.stderr
    assert step_of(out / "ckpt") == 2 and load_file(out / "ckpt" / "model.safetensors")
    assert not list(out.glob(".ckpt-*"))
    recorded = status(out)
    assert (recorded["state"], recorded["retry"], recorded["step"], recorded["checkpoint"]) == ("failed", False, 3, 2)
    assert "for a reason a relaunch would meet again (could not write" in failed.stderr  # the restart's refusal
    assert test_vlr.metrics(out) == test_vlr.metrics(reference)  # steps 0-3 once: the restart trained nothing

    (out / ".ckpt-tmp-x1y2").mkdir()
    (out / ".ckpt-tmp-x1y2" / "model.safetensors").write_bytes(b"\0" * 100)
    with open(out / "metrics.jsonl", "a") as log:
        log.write('{"step": 4, "reward_mean": 0.1')
    again = launch(command(out, ONE_NODE, "--resume"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert test_vlr.metrics(out) == test_vlr.metrics(reference)
    assert all(torch.equal(w, weights(reference)[k]) for k, w in weights(out).items())
    assert not list(out.glob(".ckpt-*")) and status(out)["state"] == "finished"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def two_nodes(outs: list[Path], fault: str = "", recipe: list[str] = RECIPE, timeout: float = 300,
              first: bool = False) -> list[subprocess.CompletedProcess]:
    """docs/cluster.md's multi-node command as two torchrun agents on this machine (one process
    each, the c10d rendezvous on localhost), each with its --out; both waited for (with `first`,
    the first to end, the other then killed as a tree), both killed as trees should they outlast
    `timeout`."""
    node = ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
            f"localhost:{free_port()}", "--rdzv-id", "two-nodes", *recipe]
    with tempfile.TemporaryDirectory() as logs:
        files = [(open(f"{logs}/{i}.out", "w+"), open(f"{logs}/{i}.err", "w+")) for i in range(2)]
        agents = [procs.start(command(out, node, "--auto-resume"), cwd=ROOT, env=dict(ENV, VLR_FAULT=fault),
                              stdout=o, stderr=e, text=True) for out, (o, e) in zip(outs, files)]
        deadline = time.monotonic() + timeout

        def going() -> bool:  # while any agent runs; with `first`, while both do
            polls = [agent.poll() is None for agent in agents]
            return all(polls) if first else any(polls)

        while going() and time.monotonic() < deadline:
            time.sleep(0.1)
        timed_out = going()
        for agent in agents:
            if agent.poll() is None:
                procs.stop(agent)
        done = [subprocess.CompletedProcess(a.args, a.returncode, procs.read(o), procs.read(e))
                for a, (o, e) in zip(agents, files)]
        for o, e in files:
            o.close()
            e.close()
    if timed_out:
        raise procs.TimedOut(f"two agents: still running after {timeout} s\n" + "\n".join(
            f"--- agent {i} stderr ---\n{procs.tail(res.stderr)}" for i, res in enumerate(done)))
    return done


def test_two_nodes_preempted_by_sigusr1_save_and_continue_as_one_node(reference, tmp_path):
    """In step 2 rank 1 alone gets SIGUSR1 (SLURM signals every process, at moments that may fall
    on either side of a step's end). Rank 0, on the other agent, learns it in the agreement after
    the step: both save a checkpoint of step 3, out of the --save-every rhythm, and exit 0.
    Relaunched, the two nodes finish the run: the same metrics as one node with two processes,
    the same weights within 1e-6."""
    out = tmp_path / "run"
    first = two_nodes([out, out], "SIGUSR1 step=2 rank=1")
    assert all(res.returncode == 0 for res in first), [res.stderr[-2000:] for res in first]
    # the planned signal belongs to torchrun's first launch of the workers (faults.planned_fault): once (the suite
    # at 71c472e, AVX-512 off) an agent restarted its worker, the signal was never sent and the run went on to its
    # end, its cause unsaid. A restart is now said with the agents' own words
    restarted = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.glob("torchelastic/*/attempt_[1-9]*"))
    assert not restarted, f"torchrun restarted workers ({restarted}):\n" + "\n".join(
        procs.tail(res.stderr) for res in first)
    assert status(out)["state"] == "preempted" and step_of(out / "ckpt") == 3
    assert [m["step"] for m in test_vlr.metrics(out)] == [0, 1, 2]
    second = two_nodes([out, out])
    assert all(res.returncode == 0 for res in second), [res.stderr[-2000:] for res in second]
    assert test_vlr.metrics(out) == test_vlr.metrics(reference)
    ours, one_node = weights(out), weights(reference)
    assert max((w - one_node[k]).abs().max().item() for k, w in ours.items()) <= 1e-6
    assert status(out)["state"] == "finished"


def test_two_nodes_that_do_not_share_out_stop_in_one_sentence(tmp_path):
    """Each agent's --out is a folder the other cannot see, as two nodes' own disks: refused once
    the processes meet, before any model loads, and nothing is left in either folder. Rank 0 says
    it and its agent ends; the other process waits for torchrun to stop it (exit_once), which its
    own agent, on another node, does not: killed here instead of waiting out exit_once's 30 s."""
    outs = [tmp_path / "node0", tmp_path / "node1"]
    done = two_nodes(outs, recipe=[], timeout=200, first=True)
    assert all(res.returncode != 0 for res in done)
    said = [line for res in done for line in res.stderr.splitlines() if line.startswith(f"--out {outs[0]} is not")
            or line.startswith(f"--out {outs[1]} is not")]  # torchrun's report quotes it too, indented
    assert len(said) == 1 and said[0].endswith("put --out on a disk every node shares"), said
    assert "cannot read the file that rank 0 on" in said[0]
    assert all(not out.exists() or not any(out.iterdir()) for out in outs)


# ---------------------------------------------------------------------------------------------
# In-process: the --auto-resume decision, the status file, the agreement, the fault's form
# ---------------------------------------------------------------------------------------------

def config(out: Path, *flags: str) -> dict:
    return asdict(vlr.parse_args([*FLAGS, "--out", str(out), "--auto-resume", *flags]))


def a_run(out: Path, checkpointed: bool = True, finished: bool = False):
    """A run folder as a run of `config(out)` leaves it (the files --auto-resume looks at)."""
    checkpoint.open_log(out, config(out), 0, False).close()
    if checkpointed:
        (out / "ckpt").mkdir()
        (out / "ckpt" / "train_state.pt").write_bytes(b"")
    if finished:
        (out / "final").mkdir()


def test_auto_resume_starts_continues_or_says_the_run_is_finished(tmp_path, capsys):
    fresh, going, early, done = (tmp_path / name for name in ("fresh", "going", "early", "done"))
    assert faults.auto_resume(fresh, config(fresh)) == (False, False)  # no run: a fresh start
    a_run(going)
    assert faults.auto_resume(going, config(going)) == (True, False)  # unfinished: --resume
    a_run(early, checkpointed=False)  # stopped before its first checkpoint: afresh, its files cleared
    assert faults.auto_resume(early, config(early)) == (False, True)
    a_run(done, finished=True)
    with pytest.raises(SystemExit) as finished:
        faults.auto_resume(done, config(done))
    assert finished.value.code == 0
    assert capsys.readouterr().out == f"{done} holds this run, finished (4 steps, the model in {done}/final): nothing to do\n"
    shutil.rmtree(done / "ckpt")  # deleted to free the disk: still finished, and final/ is kept
    with pytest.raises(SystemExit) as finished:
        faults.auto_resume(done, config(done))
    assert finished.value.code == 0 and (done / "final").is_dir()
    with pytest.raises(UserError, match=r"^--resume with a different configuration .*lr: saved 0.0005, now 0.1$"):
        faults.auto_resume(going, config(going, "--lr", "0.1"))
    with pytest.raises(UserError, match="without --resume and --overwrite"):
        faults.auto_resume(going, config(going, "--resume"))


def test_a_failure_a_relaunch_would_meet_again_is_recorded_and_refused_the_others_are_retried(tmp_path):
    """The collapse guard's stop (a SystemExit with its sentence) is recorded as final: said once
    (exit_once) and refused by the next --auto-resume; an error of another kind may pass (retry)."""
    out = tmp_path / "run"
    a_run(out)
    with pytest.raises(RuntimeError, match="connection reset"):
        with faults.Watch(out, 0, 1, 2) as watch:
            watch.step = 3
            raise RuntimeError("connection reset by peer\nmore detail")
    assert {k: status(out)[k] for k in ("state", "message", "retry", "step", "checkpoint")} == {
        "state": "failed", "message": "RuntimeError: connection reset by peer", "retry": True, "step": 3,
        "checkpoint": 2}
    assert faults.auto_resume(out, config(out)) == (True, False)
    collapse = "step 5: format collapse: fewer than 20% of responses had a \\boxed{} answer for 20 steps."
    with pytest.raises(SystemExit) as stopped:
        with faults.Watch(out, 0, 1, 2) as watch:
            watch.step = 5
            raise SystemExit(collapse)
    assert stopped.value.code == 1 and (status(out)["retry"], status(out)["message"]) == (False, collapse)
    with pytest.raises(UserError) as refused:
        faults.auto_resume(out, config(out))
    assert str(refused.value) == (
        f"{out} holds a run that stopped at step 5 for a reason a relaunch would meet again ({collapse[:-1]}): "
        "it is not retried; once the cause is fixed, continue it with --resume, or start afresh with --overwrite")
    checkpoint.check_run_folder(out, {**config(out), "auto_resume": False, "resume": True}, True, False)  # a person's --resume


def test_sigusr1_asks_for_a_stop_after_the_step(tmp_path, monkeypatch):
    monkeypatch.setattr(faults, "_asked", None)
    before = signal.getsignal(signal.SIGUSR1)
    try:
        faults.catch_signals()
        watch = faults.Watch(tmp_path, 0, 1, 0)
        assert not watch.stop_agreed()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert watch.stop_agreed() and faults._asked == "SIGUSR1"
    finally:
        signal.signal(signal.SIGUSR1, before)


def test_a_probe_the_disk_refuses_is_one_sentence_on_every_process_and_leaves_nothing(tmp_path, monkeypatch):
    """The disk fills between the check of --out and rank 0's probe: rank 0 and rank 1 (its gather
    stubbed with what rank 0 sends) both stop on the same sentence, rank 1 without waiting to read a
    probe that was never written, and the folder this launch made is gone."""
    sent = []
    monkeypatch.setattr(faults, "gather", lambda x, world: sent.append(x) or [sent[0]] * world)

    def full(self, text):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(Path, "write_text", full)
    monkeypatch.setattr(faults, "reads_back", lambda *_: pytest.fail("waited to read a probe never written"))
    out = tmp_path / "run"
    said = f"--out {out}: rank 0 could not write a file there (No space left on device)"
    for rank in (0, 1):
        with pytest.raises(UserError) as e:
            faults.check_shared(out, rank, 2)
        assert str(e.value) == said
    assert not out.exists()


def test_a_fault_is_planned_for_one_rank_and_one_launch(monkeypatch):
    monkeypatch.setenv(faults.FAULT, "SIGKILL step=3 rank=1")
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    assert faults.planned_fault(0) is None
    assert faults.planned_fault(1) == faults.Fault("SIGKILL", 3, rank=1)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # the agent's restart: no second kill
    assert faults.planned_fault(1) is None
    for bad in ("SIGNOPE step=1", "SIGKILL", "SIGKILL step=x", "EFBIG step=1 to=nowhere"):
        monkeypatch.setenv(faults.FAULT, bad)
        with pytest.raises(UserError, match="expected '<SIGKILL"):
            faults.planned_fault(0)


def test_a_relaunch_refused_before_its_first_step_is_recorded_so_a_preempted_run_is_not_requeued_forever(tmp_path):
    """docs/cluster.md's script requeues a run while its status says preempted: a relaunch refused
    in its set-up (here a flag changed) records the refusal as not to retry. A new run refused
    leaves no folder, and a finished run's status stays finished. Another command refused the
    folder (neither --resume nor --auto-resume: a typo, a plain launch) leaves the run's status."""
    before = signal.getsignal(signal.SIGUSR1)
    out, fresh, done = tmp_path / "run", tmp_path / "fresh", tmp_path / "done"
    a_run(out)
    faults.write_status(out, "preempted", "preempted (SIGUSR1): checkpoint written", step=3, checkpoint=4)
    a_run(done, finished=True)
    faults.write_status(done, "finished", "finished: 4 steps", step=4, checkpoint=4)
    try:
        for stray in ([], ["--lr", "0.1"]):
            with pytest.raises(UserError, match="holds a run"):
                vlr.train(vlr.parse_args([*FLAGS, "--out", str(out), *stray]))
            assert status(out)["state"] == "preempted"
        for folder in (out, done):
            with pytest.raises(UserError, match="different configuration"):
                vlr.train(vlr.parse_args([*FLAGS, "--out", str(folder), "--auto-resume", "--lr", "0.1"]))
        with pytest.raises(UserError, match="no-such-model"):
            vlr.train(vlr.parse_args([*FLAGS, "--out", str(fresh), "--model", str(tmp_path / "no-such-model")]))
    finally:
        signal.signal(signal.SIGUSR1, before)
    said = status(out)
    assert (said["state"], said["retry"], said["step"], said["checkpoint"]) == ("failed", False, 3, 4)
    assert said["message"].startswith("--resume with a different configuration than") and "lr: saved" in said["message"]
    with pytest.raises(UserError, match="for a reason a relaunch would meet again"):
        faults.auto_resume(out, config(out))
    assert status(done)["state"] == "finished" and not fresh.exists()


def test_a_status_the_disk_refuses_is_said_on_stderr_and_a_finished_run_left_running_is_recorded(tmp_path, monkeypatch,
                                                                                                  capsys):
    """status.json is a help, not the error: on a full disk its line goes to stderr and whatever was
    raised stays what is raised. A run killed between writing final/ and its status reads 'finished'
    once --auto-resume looks at it."""
    done = tmp_path / "done"
    a_run(done, finished=True)
    faults.write_status(done, "running", "running; the last checkpoint continues from step 4", step=3, checkpoint=4)
    with pytest.raises(SystemExit) as left:
        faults.auto_resume(done, config(done))
    assert left.value.code == 0 and status(done)["state"] == "finished" and status(done)["step"] == 4

    def full(path):
        raise OSError(28, "No space left")

    monkeypatch.setattr(faults.checkpoint, "fsync", full)
    faults.write_status(done, "failed", "could not write it", retry=False)
    assert status(done)["state"] == "finished" and not list(done.glob(".status.json.tmp"))
    assert capsys.readouterr().err == f"{done / 'status.json'} not written (No space left): failed: could not write it\n"
