"""Shared fixtures. The repository root goes on sys.path so tests import the top-level modules.

No test leaves a process behind: pytest is made a child subreaper, so whatever a test's children
start and orphan (torchrun's workers when the launcher dies) becomes pytest's child, and a fixture
fails the test that left one running, after killing it.

Nor a file in /tmp: the children's TMPDIR is a folder of the session's own, removed when it ends
(torchrun alone made a /tmp/torchelastic_* folder per launch, 18 a suite, and CI shares the disk)."""
import ctypes
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

import procs

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>
# A child that trains the 3B-shaped model on the CPU touches about 10 GB of fresh memory (weights,
# the gradient of the 151,936-token embedding, AdamW state), and on these virtual machines taking
# it in 4 KB pages was most of its time, in the kernel. glibc's tunable has malloc ask for 2 MB
# transparent huge pages; other C libraries ignore it. What it saves: docs/speed.md.
HUGE_PAGES = "glibc.malloc.hugetlb=1"


def pytest_configure(config):
    os.environ.setdefault("GLIBC_TUNABLES", HUGE_PAGES)  # every child inherits it
    config.children_tmp = tempfile.mkdtemp(prefix="vlr-tests-")
    os.environ["TMPDIR"] = config.children_tmp
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


def pytest_unconfigure(config):
    shutil.rmtree(config.children_tmp, ignore_errors=True)


# multiprocessing's resource tracker: one per interpreter, started on first use, meant to outlive the test
KEPT = "from multiprocessing.resource_tracker import main"


@pytest.fixture(autouse=True)
def no_process_left_behind():
    yield
    left = [pid for pid in procs.descendants(os.getpid()) if KEPT not in procs.cmdline(pid)]
    if left:
        names = [f"{pid}: {procs.cmdline(pid)}" for pid in left]
        procs.kill_tree(left)
        pytest.fail("the test left processes running (now killed):\n" + "\n".join(names))


@pytest.fixture(scope="session")
def tiny_model():
    """(model, processor) of the tiny Qwen2.5-VL (built on first use, ~45 s), fp32, eval mode.

    Loaded once per test session: tests must not change its weights or leave hooks on it."""
    import torch
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    import models

    src = models.resolve("tiny")
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(src, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(src)


@pytest.fixture(scope="session")
def tok(tiny_model):
    return tiny_model[1].tokenizer


@pytest.fixture(scope="session")
def banned(tok):
    import rollout

    return rollout.special_ids(tok, rollout.VISION_TOKENS)


@pytest.fixture(scope="module")
def one_thread():
    """One CPU thread while a module runs: as fast on the tiny model, and a shared 2-core machine
    cannot stall it 10x the way it stalls two threads that wait on each other at every op."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
