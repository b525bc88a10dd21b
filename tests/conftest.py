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

    import tiny

    src = tiny.resolve("tiny")
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(src, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(src)
