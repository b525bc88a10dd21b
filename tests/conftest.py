"""Shared fixtures. The repository root goes on sys.path so tests import the top-level modules."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


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
