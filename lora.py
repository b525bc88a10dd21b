"""Low-rank adapters (LoRA, Hu et al. 2021): the 3B trained on one GPU (`--lora-rank r`).

Each adapted projection computes W x + (alpha / r) B A x: W is the frozen base weight (held in the
compute dtype), A [r, in] and B [out, r] are trained in fp32, and B starts at zero, so step 0 is
the base policy. Adapters go on the language model's attention and MLP projections only, not on
the vision tower's linears (its MLP has the same names: `TARGETS` is anchored on the decoder).

peft's LoraConfig makes them, injected by transformers' own `add_adapter` (integrations/peft.py,
PeftAdapterMixin.add_adapter): the targeted nn.Linear become peft's lora.Linear in place and the
module tree stays the model's own, so `model.model` is still the Qwen2.5-VL inner model that the
sampler's get_rope_index, shard.py and bench.py reach. The adapters are never merged while
training (a merge and unmerge would leave rounding in the base): the sampler, Forced Rethinking's
continuation and `rollout.logprobs` all run the adapted model as it is.

A run with adapters saves megabytes: the adapters in peft's format (`model.save_pretrained` of an
adapted model writes only them) and, beside them, the base model's name and fingerprint.
"""
import contextlib
import hashlib
import json
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, set_peft_model_state_dict
from peft.tuners.tuners_utils import cast_adapter_dtype
from safetensors.torch import load_file

from distributed import UserError

# the decoder's q/k/v/o and gate/up/down projections (names relative to Qwen2_5_VLForConditionalGeneration)
TARGETS = r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
NAME = "default"  # peft's name for a model's one adapter
BASE = "base.json"  # beside the adapters: the base model they were trained on, and its fingerprint


def add(model, rank: int, alpha: float, seed: int, base: str):
    """Fresh trainable adapters of `rank` on `model` (in place), the base frozen. A is drawn from a
    generator seeded by `seed` (every process draws the same), leaving the global RNG as it was;
    B is zero. `base`: the base model's name, recorded in the adapters' config."""
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS, lora_dropout=0.0, bias="none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.add_adapter(config)
    model.peft_config[NAME].base_model_name_or_path = base
    cast_adapter_dtype(model, NAME)  # fp32 adapters (and AdamW state) on a bf16 base
    return model


@contextlib.contextmanager
def adapters_off(model):
    """The base policy while the context lasts: the KL term's reference, for free (no second copy)."""
    model.disable_adapters()
    try:
        yield
    finally:
        model.enable_adapters()


def fingerprint(model) -> str:
    """What identifies the base model, cheaply: every base weight's name and shape, and a fixed
    sample of 1,024 of its values rounded to bf16 (the same whether the base was loaded in fp32 or
    bf16, on the CPU or a GPU). Another base (another size, another fine-tune) changes it."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                continue
            flat = p.detach().reshape(-1)
            k = min(1024, flat.numel())
            idx = (torch.arange(k) * (flat.numel() - 1) // max(1, k - 1)).to(flat.device)  # integer: device-independent
            h.update(f"{name.replace('.base_layer', '')}:{tuple(p.shape)};".encode())
            h.update(flat[idx].to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def base_record(model, base: str) -> dict:
    return {"model": base, "fingerprint": fingerprint(model)}


def check_base(now: dict, saved: dict, where: Path):
    """Refuse adapters trained on another base than the one loaded (`base_record`s)."""
    if now["fingerprint"] != saved["fingerprint"]:
        raise UserError(f"{where}: these adapters were trained on base model {saved['model']} (fingerprint "
                        f"{saved['fingerprint']}), but the base {now['model']} has fingerprint {now['fingerprint']}: "
                        "another model")


def load(model, folder: Path):
    """The adapters saved in `folder` (peft's format) into `model`'s own, which `add` made with
    the same config: fp32 values copied exactly, every key matched."""
    saved = {k.removeprefix("base_model.model."): v for k, v in load_file(folder / "adapter_model.safetensors").items()}
    result = set_peft_model_state_dict(model, saved, adapter_name=NAME)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise UserError(f"{folder}: its adapters do not fit the model (missing {missing[:3]}, "
                        f"unexpected {result.unexpected_keys[:3]})")


def save(folder: Path, model, processor, base: dict):
    """An adapter folder: the adapters as peft writes them (`PeftModel.from_pretrained` loads it),
    the processor, and the base's record."""
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    (folder / BASE).write_text(json.dumps(base, indent=1))


def is_adapter_folder(path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def base_of(folder) -> str:
    """The base model an adapter folder names (peft's base_model_name_or_path), or a sentence."""
    path = Path(folder) / "adapter_config.json"
    try:
        base = json.loads(path.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError) as e:  # unreadable, not JSON, not an object
        raise UserError(f"{path}: not a readable adapter config ({type(e).__name__})") from None
    if not isinstance(base, str) or not base:
        raise UserError(f"{path}: names no base model (base_model_name_or_path)")
    return base


def merged(base_model, folder: Path):
    """`base_model` (fp32) with the adapters of `folder` merged into its weights: a plain model,
    which `save_pretrained` writes as a full model folder. Checked against the base's record."""
    record = Path(folder) / BASE
    if record.is_file():
        check_base(base_record(base_model, base_of(folder)), json.loads(record.read_text()), Path(folder))
    return PeftModel.from_pretrained(base_model, str(folder)).merge_and_unload()
