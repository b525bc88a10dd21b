"""Where a model comes from: the one loader of every command (training, reference policy, eval, bench).

A model is named 'tiny' (the offline tiny Qwen2.5-VL, tiny.py; 'tiny-second-look' is its variant for the
second-look lab), 'smoke-3b-<n>l' (the 3B-shaped smoke model, smoke.py), a folder or a hub id; the built
ones are built into .cache on first use.
This module stands above both builders, which import neither it nor each other's loader.
"""
from pathlib import Path

import torch
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

import data
import lora
import smoke
import tiny
from distributed import UserError
from hub import HUB_ID  # model ids are shaped like dataset ids

KNOWN = ("tiny", "tiny-second-look", *smoke.NAMES)


def check(model: str):
    """Refuse, before anything is built or loaded, a name that is neither a known one nor an
    existing folder nor shaped like a hub id (the hub answers for those: `load_model`)."""
    if model in KNOWN or Path(model).is_dir() or (HUB_ID.fullmatch(model) and not model.startswith("smoke-3b-")):
        return
    raise UserError(f"--model {model}: no such model folder, and not a known name ({', '.join(KNOWN)}) "
                    "or a hub id (owner/name)")


def resolve(model: str) -> str:
    """'tiny' -> the cached tiny model folder (built on first use), 'tiny-second-look' its variant's;
    'smoke-3b-<n>l' -> the cached 3B-shaped smoke model; a folder or a hub id unchanged (`check`)."""
    check(model)
    if model.startswith("smoke-3b-"):
        return smoke.resolve(model)
    if model == "tiny-second-look":
        return tiny.resolve_second_look()
    return tiny.resolve() if model == "tiny" else model


def location(model: str) -> str:
    """Where `model` is, as a loader elsewhere finds it: a folder's absolute path, or the hub id."""
    src = resolve(model)
    return str(Path(src).resolve()) if Path(src).is_dir() else src


def load_model(model: str, device="cpu", dtype=torch.float32, min_pixels: int = 0, max_pixels: int = 0):
    """(model, processor) from a name (`resolve`), with its image budget. An adapter folder (vlr.py's
    final/adapter) loads as its base with the adapters merged, in fp32 and then cast to `dtype`:
    the weights of the merged model folder beside it, bit for bit.

    The image budget: explicit min/max_pixels win; else a processor that allows more than the
    published 1280 * 28^2 pixels (the hub's default) gets the published budget; a processor within
    it (the tiny model, a checkpoint saved by vlr.py) keeps its own. The budget is saved with the
    processor, so a checkpoint evaluates at the budget it was trained at."""
    src = resolve(model)
    try:
        # first: a budget it cannot take is said before any weight loads; a folder's own code never runs
        processor = AutoProcessor.from_pretrained(src, trust_remote_code=False)
        lo, hi = image_budget(processor.image_processor.size, min_pixels, max_pixels)
        if lora.is_adapter_folder(src):
            base = Qwen2_5_VLForConditionalGeneration.from_pretrained(adapters_base(model, src), dtype=torch.float32)
            policy = lora.merged(base, src)
            for p in policy.parameters():  # the weights only: rotary inv_freq stays fp32, as from_pretrained keeps it
                p.data = p.data.to(dtype)
        else:
            policy = Qwen2_5_VLForConditionalGeneration.from_pretrained(src, dtype=dtype)
        policy = policy.to(device)
    except OSError as e:  # a hub id the hub does not know or cannot be reached for, a folder without a model
        raise UserError(f"--model {model}: cannot load it: {str(e).splitlines()[0]}") from None
    processor.image_processor.size = {"shortest_edge": lo, "longest_edge": hi}
    return policy, processor


def image_budget(size: dict, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(fewest, most) pixels an image is resized to (`load_model`), or a sentence naming the flags."""
    lo, hi = size["shortest_edge"], size["longest_edge"]
    if hi > data.PUBLISHED_MAX_PIXELS:
        lo, hi = data.PUBLISHED_MIN_PIXELS, data.PUBLISHED_MAX_PIXELS
    fewest, most = min_pixels or lo, max_pixels or hi
    if not 0 < fewest <= most:
        given = " ".join(f"--{k}-pixels {v}" for k, v in (("min", min_pixels), ("max", max_pixels)) if v)
        raise UserError(f"{given}: images would be resized to at least {fewest} and at most {most} pixels "
                        f"(without these flags: {lo} to {hi}); give a --min-pixels no larger than --max-pixels")
    return fewest, most


def adapters_base(model: str, folder: str) -> str:
    """The base model folder or hub id of an adapter folder, found (`resolve`) or refused in one sentence."""
    base = lora.base_of(folder)
    try:
        return resolve(base)
    except UserError:
        raise UserError(f"--model {model}: these adapters' base model {base} (adapter_config.json) cannot be "
                        "found: no such folder, and not a known name or a hub id") from None


def autocast(bf16: bool, device):
    """bf16 compute with fp32 weights (--bf16); a no-op otherwise. Autocast's weight cache is off:
    it would hold a bf16 copy of every weight for as long as the context lasts (a whole rollout,
    +7.5 GB for the 3B); a weight is cast again where it is used instead."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=False)
