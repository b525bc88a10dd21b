"""Child processes of the tests: each in its own process group, killed with everything it started
(torchrun's workers included) when it runs out of time, and a timeout that says what timed out.

`subprocess.run(..., timeout=)` kills only the process it started. torchrun starts each worker in
a session of its own, so neither that nor a kill of the launcher's process group reaches them: its
workers, each holding a model, lived on as orphans beside the rest of the suite. Here a child is
killed as a tree: every process below it is stopped first (so none can fork or be orphaned out of
sight while we look), then all are killed. conftest.py makes pytest a child subreaper, so an orphan
that escapes anyway becomes pytest's child, where its autouse fixture finds it."""
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

TAIL_LINES = 20


def table() -> dict[int, tuple[str, int]]:
    """PID -> (state, parent PID) of every process, read from /proc."""
    rows = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # the name may hold spaces and ')'
        except OSError:  # it ended while we looked
            continue
        rows[int(stat.parent.name)] = (fields[0], int(fields[1]))
    return rows


def descendants(*roots: int) -> list[int]:
    """The live processes below the roots, however deep (zombies hold nothing: left to their parent)."""
    rows = table()
    found, frontier = [], set(roots)
    while frontier:
        frontier = {pid for pid, (_, ppid) in rows.items() if ppid in frontier}
        found += frontier
    return [pid for pid in found if rows[pid][0] != "Z"]


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def signal_all(pids, sig) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def kill_tree(roots: list[int], grace: float = 5.0) -> None:
    """SIGKILL the roots and every process below them, stopping them first until the trees stand
    still, and reap those that are (or were orphaned to) our children."""
    signal_all(roots, signal.SIGSTOP)
    stopped = set(roots)
    while new := set(descendants(*roots)) - stopped:
        signal_all(new, signal.SIGSTOP)
        stopped |= new
    signal_all(stopped, signal.SIGKILL)
    pending, deadline = set(stopped), time.monotonic() + grace
    while pending and time.monotonic() < deadline:
        rows = table()
        for pid in list(pending):
            state, ppid = rows.get(pid, ("gone", 0))
            if state == "Z" and ppid == os.getpid():
                os.waitpid(pid, 0)
            if state == "gone" or state == "Z" and ppid not in stopped:  # else its dying parent hands it to us
                pending.discard(pid)
        time.sleep(0.02)


class TimedOut(AssertionError):
    """A child ran past its limit: the message names the command, the time and its last output."""


def tail(text: str) -> str:
    return "\n".join(text.splitlines()[-TAIL_LINES:])


def start(cmd: list[str], **kw) -> subprocess.Popen:
    """Popen in a process group of its own (signals to pytest's group do not reach it); end it with `stop`."""
    return subprocess.Popen(cmd, start_new_session=True, **kw)


def stop(proc: subprocess.Popen) -> None:
    """Kill the child and everything it started, and reap it (through Popen, which keeps its status)."""
    os.kill(proc.pid, signal.SIGSTOP)  # it starts nothing more while its tree is killed
    kill_tree(descendants(proc.pid))
    proc.kill()
    proc.wait()


def run(cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    """`subprocess.run(cmd, capture_output=True, text=True, timeout=...)`, but a timeout kills the
    whole tree and fails with the command, how long it ran and the last lines it printed.
    Output goes through files, not pipes: an orphan holding a pipe open would keep a reader waiting."""
    began = time.monotonic()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = start(cmd, stdout=out, stderr=err, text=True, **kw)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop(proc)
            raise TimedOut(f"timed out after {time.monotonic() - began:.0f} s (limit {timeout:g} s): "
                           f"{' '.join(map(str, cmd))}\n--- last stdout ---\n{tail(read(out))}\n"
                           f"--- last stderr ---\n{tail(read(err))}") from None
        return subprocess.CompletedProcess(cmd, proc.returncode, read(out), read(err))


def read(file) -> str:
    file.seek(0)
    return file.read()
