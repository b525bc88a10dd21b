"""Faults survived without a person: the one command for every launch, preemption, restarts.

On a cluster a run ends without anyone watching: SLURM preempts it (the signal set with
`#SBATCH --signal`, then SIGTERM, then SIGKILL) and torchrun's elastic agent restarts every worker
after one dies (`--max-restarts`, with the same command line). The trainer (vlr.py) hands this
module its run folder and its processes; this module hands back what to do:

  * `auto_resume`: --auto-resume, the command that is right on every launch: a fresh start when
    --out holds no run, --resume when it holds this run unfinished, exit 0 when it is finished.
  * `catch_signals` and `Watch.stop_agreed`: SIGUSR1 asks for a checkpoint. The process finishes
    its step; then all processes agree to stop (a collective with a short timeout: a dead peer
    makes it fail, and nothing is saved), save, and exit 0. SIGTERM keeps its default, an
    immediate exit: every file is written atomically (checkpoint.py), so nothing is half written.
  * `Watch`: the status file, <out>/status.json (running, preempted, finished, failed: reason), since
    torchrun's exit code hides the workers'. A failure that a relaunch would meet again (a user
    error, a full disk, the collapse guard, processes whose weights disagree) is recorded as not to
    retry: the agent's restarts and the next --auto-resume refuse it in one sentence.
  * `prepare`: --out seen alike by every process (a multi-node run needs a shared disk), and the
    leftovers of an interrupted save removed.
  * `planned_fault`: faults injected for the tests, by environment variable, at a given step and
    torchrun restart, never by timing.

How torchrun handles signals and restarts (torch/distributed/elastic), and the SLURM lines that fit:
docs/cluster.md.
"""
import json
import os
import resource
import secrets
import signal
import socket
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import torch
import torch.distributed as dist

import checkpoint
import phases
from distributed import UserError, exit_once, gather, rank_world

STATUS = "status.json"
# Every process has just left the step's last collective (its metrics' reduce) when they agree, so
# they meet within moments; a peer that does not come within this is dead or hung.
AGREE_TIMEOUT = timedelta(seconds=60)

_asked = None  # the name of the signal that asked for a checkpoint, once one has


def catch_signals():
    """SIGUSR1 asks for a checkpoint and a stop after the step (its default would end the process)."""
    signal.signal(signal.SIGUSR1, ask_to_stop)


def ask_to_stop(signum, frame):
    global _asked
    _asked = signal.Signals(signum).name


# ---------------------------------------------------------------------------------------------
# --auto-resume
# ---------------------------------------------------------------------------------------------

def auto_resume(out: Path, config: dict) -> tuple[bool, bool]:
    """(resume, overwrite) for this launch of --auto-resume, found before the processes meet (each
    finds the same, from the same files). A run without a checkpoint yet (stopped in its first
    --save-every steps) starts afresh: nothing of it could be continued. `config`: the run's, as a dict."""
    if config["resume"] or config["overwrite"]:
        raise UserError("--auto-resume chooses between a fresh start and --resume on each launch: give it without "
                        "--resume and --overwrite")
    if not (out / "config.json").exists():
        return False, False  # no run here (check_run_folder refuses a folder with a run's files and no config)
    status = read_status(out)
    if status.get("state") == "failed" and not status.get("retry", True):
        raise UserError(f"{out} holds a run that stopped at step {status.get('step')} for a reason a relaunch would "
                        f"meet again ({status.get('message', '').rstrip('.')}): it is not retried; once the cause is "
                        "fixed, continue it with --resume, or start afresh with --overwrite")
    try:
        checkpoint.check_run_folder(out, config, resume=True, overwrite=False)  # the same settings
    except checkpoint.NoCheckpoint:
        if not (out / "final").exists():  # a finished run's ckpt/ may have been deleted to free the disk
            return False, True
    if (out / "final").exists():  # written atomically, after the last step
        if rank_world()[0] == 0:
            if status.get("state") != "finished":  # killed between final/ and its status
                write_status(out, "finished", f"finished: {config['steps']} steps, the model in {out}/final",
                             step=config["steps"], checkpoint=status.get("checkpoint"))
            print(f"{out} holds this run, finished ({config['steps']} steps, the model in {out}/final): nothing to do")
        raise SystemExit(0)
    return True, False


def check_restarts(auto_resume: bool):
    """Under `torchrun --max-restarts N` (the workers see N), refused before the processes meet:
    without --auto-resume, where every restart would be refused (its folder holds a run); and with
    the store torchrun's c10d rendezvous shares by default, which outlives a restart with the dead
    workers' addresses in it: a process group of the restarted workers may connect to one and hang
    (DynamicRendezvousHandler.use_agent_store, torch/distributed/elastic/rendezvous/dynamic_rendezvous.py;
    pytorch issue 135712). TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 gives each round a store of its own."""
    if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) == 0:
        return
    if not auto_resume:
        raise UserError("torchrun --max-restarts restarts the workers with the same command, which --out refuses once "
                        "it holds the run: add --auto-resume")
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        raise UserError("torchrun --max-restarts: set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for torchrun, else its "
                        "restarted workers share a store with the dead ones and may hang meeting them (pytorch issue "
                        "135712; docs/cluster.md)")


# ---------------------------------------------------------------------------------------------
# The run folder, shared by every process
# ---------------------------------------------------------------------------------------------

def prepare(out: Path, rank: int, world: int):
    """Once the processes have met, before the policy loads: --out must be one folder for all of
    them (on another node's own disk a resume would read another checkpoint, or none), and what an
    interrupted save left there goes (rank 0)."""
    if world > 1:
        check_shared(out, rank, world)
    if rank == 0:
        checkpoint.clean_stale(out)


def check_shared(out: Path, rank: int, world: int):
    """Rank 0 writes a file with a random name into --out; every process must read it back."""
    created = not out.exists()
    token, failed = None, None
    if rank == 0:
        token = secrets.token_hex(8)
        try:
            out.mkdir(parents=True, exist_ok=True)
            (out / f".shared-{token}").write_text(token)
        except OSError as e:  # a disk filled since --out was checked: said by every process, none left waiting
            failed = f"--out {out}: rank 0 could not write a file there ({e.strerror or e})"
    token, failed = gather((token, failed), world)[0]  # after rank 0 wrote it
    probe = out / f".shared-{token}"
    seen = [] if failed else gather((socket.gethostname(), reads_back(probe, token)), world)  # alike on every rank
    if rank == 0:
        probe.unlink(missing_ok=True)
        if created and out.is_dir():  # as it was: a run refused later (bad data) leaves nothing behind
            out.rmdir()
    if failed:
        raise UserError(failed)
    missing = [f"rank {r} on {host}" for r, (host, ok) in enumerate(seen) if not ok]
    if missing:
        raise UserError(f"--out {out} is not a folder every process sees: {', '.join(missing)} cannot read the "
                        f"file that rank 0 on {seen[0][0]} wrote there; put --out on a disk every node shares")


def reads_back(probe: Path, token: str, wait_s: float = 5.0) -> bool:
    """Whether `probe` holds `token`; a network file system may show a new file a moment late."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if probe.read_text() == token:
                return True
        except OSError:
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


# ---------------------------------------------------------------------------------------------
# The status file
# ---------------------------------------------------------------------------------------------

def write_status(out: Path, state: str, message: str, **fields):
    """<out>/status.json, atomically: {"state": running | preempted | finished | failed, "message": a
    sentence for a person, "step", "checkpoint": the step the next launch continues from, ...}."""
    status = {"state": state, "message": message, **fields, "time": datetime.now().isoformat(timespec="seconds")}
    try:
        checkpoint.replace_text(out / STATUS, json.dumps(status, indent=1) + "\n")
    except OSError as e:  # a full disk: the status said on stderr; the error it would record is not lost
        print(f"{out / STATUS} not written ({e.strerror or e}): {state}: {message}", file=sys.stderr, flush=True)


def refused_start(out: Path, message: str):
    """A launch that a run's own folder refused before its first step (a flag that differs from the
    saved ones, a data file moved, a checkpoint that will not load): recorded as a failure not to
    retry in the status of a run left running or preempted. Else a script that requeues a
    preempted run (docs/cluster.md) would requeue it forever. A folder with no status (a new run
    refused) is not touched, nor is a run that finished or has failed already."""
    status = read_status(out)
    if rank_world()[0] == 0 and status.get("state") in ("running", "preempted"):
        write_status(out, "failed", message, **{k: status[k] for k in ("step", "checkpoint", "restarts") if k in status},
                     retry=False)


def read_status(out: Path) -> dict:
    try:
        return json.loads((out / STATUS).read_text())
    except (OSError, ValueError):
        return {}


class Watch:
    """The training loop's guard (`with Watch(...) as watch:` around it): the status file, the
    agreement to stop, the injected faults. Set `watch.step` as each step begins."""

    def __init__(self, out: Path, rank: int, world: int, start: int):
        self.out, self.rank, self.world, self.step = out, rank, world, start
        self.checkpoint = start or None  # the step the newest checkpoint continues from
        # a group of its own for the agreement: gloo on the CPU (no GPU sync), and a short timeout
        self.group = dist.new_group(backend="gloo", timeout=AGREE_TIMEOUT) if world > 1 else None
        self.fault = planned_fault(rank)
        self.listening = phases.listen(self.inject) if self.fault else None
        self.fired = False

    def __enter__(self):
        self.status("running", f"running from step {self.step}")
        if self.listening:
            self.listening.__enter__()
        return self

    def __exit__(self, kind, error, tb):
        if self.listening:
            self.listening.__exit__(None, None, None)
        if error is None or not isinstance(error, (Exception, SystemExit)) or (
                isinstance(error, SystemExit) and not isinstance(error.code, str)):
            return False  # done, Ctrl-C, or an exit already decided
        # UserError: a flag, a folder, a full disk; SystemExit with a sentence: the trainer's own stops
        # (the collapse guard, weights that disagree). Anything else may pass: torchrun may restart it.
        final = isinstance(error, (UserError, SystemExit))
        message = str(error) if final else f"{type(error).__name__}: {checkpoint.first_line(error)}"
        self.status("failed", message, retry=not final)
        if final:
            exit_once(message)  # said once; the other processes wait for rank 0 to record it
        return False

    def status(self, state: str, message: str, **fields):
        if self.rank == 0:  # restarts: torchrun's restarts of this launch's workers so far
            write_status(self.out, state, message, step=self.step, checkpoint=self.checkpoint,
                         restarts=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")), **fields)

    def stop_agreed(self) -> bool:
        """Whether any process has been asked for a checkpoint (SIGUSR1): all learn it at the same
        step. A dead or hung peer makes the collective fail after AGREE_TIMEOUT: no save then."""
        asked = torch.tensor([float(_asked is not None)])
        if self.group is not None:
            dist.all_reduce(asked, op=dist.ReduceOp.MAX, group=self.group)
        return bool(asked.item())

    def saved(self, next_step: int):
        self.checkpoint = next_step
        self.status("running", f"running; the last checkpoint continues from step {next_step}")

    def preempted(self, next_step: int):
        message = (f"preempted ({_asked or 'asked by another process'}): checkpoint written; the same command with "
                   f"--auto-resume continues from step {next_step}")
        self.status("preempted", message)
        if self.rank == 0:
            print(f"{self.out}: {message}")

    def finished(self, steps: int):
        self.step = steps
        self.status("finished", f"finished: {steps} steps, the model in {self.out}/final")

    def inject(self, name: str, started: bool):
        """phases' listener: the planned fault, as the update of its step begins (mid-step: the
        rollout done, the processes about to meet in the gradient's all-reduce)."""
        if started and name == "grpo.policy_update" and self.step == self.fault.step and not self.fired:
            self.fired = True
            if self.fault.what == "EFBIG":  # from now on no file may grow past 1 MB: a full disk
                resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
            else:
                os.kill(os.getppid() if self.fault.to == "agent" else os.getpid(), signal.Signals[self.fault.what])


# ---------------------------------------------------------------------------------------------
# Faults injected for the tests
# ---------------------------------------------------------------------------------------------

FAULT = "VLR_FAULT"
FAULT_FORM = "'<SIGKILL|SIGTERM|SIGUSR1|EFBIG> step=<n> [rank=<r>] [restart=<n>] [to=agent]'"


@dataclass
class Fault:
    what: str  # a signal's name, or EFBIG: files stop growing past 1 MB (Python ignores SIGXFSZ)
    step: int  # during this step's update
    rank: int = 0
    restart: int = 0  # torchrun's TORCHELASTIC_RESTART_COUNT (0: its first launch of the workers)
    to: str = "self"  # "agent": the signal goes to torchrun, the process that started this one


def planned_fault(rank: int):
    """The fault $VLR_FAULT plans for this process and launch, or None. E.g. VLR_FAULT="SIGKILL
    step=3 rank=1": rank 1 is killed in step 3 of torchrun's first launch, not after its restart."""
    spec = os.environ.get(FAULT, "")
    if not spec:
        return None
    what, *pairs = spec.split()
    try:
        fault = Fault(what, **{k: v if k == "to" else int(v) for k, v in (p.split("=") for p in pairs)})
    except (TypeError, ValueError):
        raise UserError(f"{FAULT}={spec!r}: expected {FAULT_FORM}") from None
    if what != "EFBIG" and what not in signal.Signals.__members__ or fault.to not in ("self", "agent"):
        raise UserError(f"{FAULT}={spec!r}: expected {FAULT_FORM}")
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    return fault if fault.rank == rank and fault.restart == restart else None
