"""The suite's own child-process rules (tests/procs.py): a timeout kills everything the child
started, torchrun's workers included, and says what timed out; an orphan is found."""
import os
import re
import sys

import pytest

import procs


def marked(tag: str) -> list[int]:
    """Live processes whose command line holds `tag`."""
    return [pid for pid, (state, _) in procs.table().items() if state != "Z" and tag in procs.cmdline(pid)]


def test_a_torchrun_that_times_out_leaves_no_worker_behind(tmp_path):
    tag = f"{987 + os.getpid() % 1000}.5"  # `sleep <tag>`: a command line no other process has
    worker = f'touch "{tmp_path}/rank$LOCAL_RANK" && exec sleep {tag}'
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--no-python",
           "sh", "-c", worker]
    with pytest.raises(procs.TimedOut) as failed:
        procs.run(cmd, timeout=15)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0", "rank1"]  # both workers were running
    assert marked(tag) == []
    message = str(failed.value)
    took = re.match(r"timed out after (\d+) s \(limit 15 s\): ", message)
    assert took and 15 <= int(took[1]) <= 30, message  # the kill may take seconds (a 5 s grace, the scans)
    assert "torch.distributed.run --standalone --nproc_per_node 2" in message and "--- last stderr ---" in message


def test_an_orphaned_grandchild_becomes_pytests_child_and_is_killed():
    tag = f"{876 + os.getpid() % 1000}.5"
    res = procs.run(["sh", "-c", f"sleep {tag} > /dev/null & echo started"], timeout=30)  # sh exits; sleep lives on
    assert res.returncode == 0 and res.stdout.strip() == "started"
    orphans = marked(tag)
    assert len(orphans) == 1 and procs.table()[orphans[0]][1] == os.getpid()  # adopted: pytest is the subreaper
    assert orphans[0] in procs.descendants(os.getpid())  # what the autouse fixture looks for after each test
    procs.kill_tree(orphans)
    assert marked(tag) == [] and orphans[0] not in procs.descendants(os.getpid())
