"""Sharding (--shard): FSDP2 over the processes, the training loop unchanged.

DDP keeps the whole fp32 weights, gradients and AdamW state on every GPU (52 GB for the 3B before
an activation); sharded, each process holds 1/N of each (docs/memory.md). The trainer (vlr.py)
calls `shard_model` once in its set-up, wraps each rollout in `gathered`, and saves through
`save_checkpoint` and `full_weights`: everything else (loss, SSR, rethinking) is what DDP runs.
"""
import contextlib
import os
import pickle
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException, DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

import checkpoint
from distributed import UserError, gather


def check_flags(kl_coef: float, lora_rank: int):
    """--shard's refusals, before the processes meet (vlr.check_flags)."""
    if lora_rank:
        raise UserError("--lora-rank with --shard: adapters keep the frozen base whole on each GPU (the 3B fits one "
                        "24 GB card, docs/memory.md); run LoRA under DDP, without --shard")
    if kl_coef:
        raise UserError("--kl-coef with --shard: the reference policy would be a whole copy on every process, "
                        "the memory --shard saves; not supported")
    if "RANK" not in os.environ:
        raise UserError("--shard shards over torchrun's processes: run it under torchrun "
                        "(torchrun --nproc_per_node 1 vlr.py ... for one)")


def shard_model(model, device, world: int, bf16: bool):
    """fully_shard on each vision block, the vision tower, each decoder layer, the embedding with
    the head, and the root, bottom up. The tower and the embedding get units of their own because
    the trainer calls them outside the root's forward (rollout.embed_shared): a unit's weights are
    gathered by its own forward. The embedding and the head share a unit: the 3B ties them, and a
    tied weight must live in one. Under --bf16 the gathered weights are bf16 (compute) and the
    gradients are reduced in fp32; the shards, and AdamW on them, stay fp32."""
    mesh = init_device_mesh(device.type, (world,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    inner = model.model
    units = [*inner.visual.blocks, inner.visual, *inner.language_model.layers,
             [inner.language_model.embed_tokens, model.lm_head], model]
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=mp)
    return model


@contextlib.contextmanager
def gathered(model):
    """The whole model all-gathered once, for a rollout or an eval, and freed after: the sampler
    runs one forward per token, and gathering each layer for each token would make sampling
    network-bound. Costs one full copy of the weights (in the compute dtype) while it lasts.
    Yields the model, whole; any other model (not sharded) as it is."""
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield model
    finally:
        for unit in units:
            unit.reshard()
            # the root keeps its weights after its forward (FSDP's default): its backward needs them first
            unit.set_reshard_after_forward(unit is not model, recurse=False)


FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_weights(model) -> dict:
    """The whole fp32 state dict on rank 0's CPU ({} on the other ranks), gathered a tensor at a
    time; every process must call it."""
    return get_model_state_dict(model, options=FULL)


def save_checkpoint(out: Path, model, processor, opt, state: dict, rank: int, world: int):
    """out/ckpt as DDP writes it (a model folder and train_state.pt; rank 0) plus optimizer/, each
    process's AdamW shard, written by all through torch.distributed.checkpoint, all atomically:
    rank 0 makes the temporary folder, the others write into it, rank 0 swaps it in."""
    weights = full_weights(model)
    optim = get_optimizer_state_dict(model, opt)

    def write(tmp: Path):
        save_shards(optim, gather(str(tmp), world)[0] + "/optimizer")
        model.save_pretrained(tmp, state_dict=weights)
        processor.save_pretrained(tmp)
        torch.save(state, tmp / "train_state.pt")

    if rank == 0:
        checkpoint.write_atomically(out / "ckpt", write)
    else:
        try:
            save_shards(optim, gather(None, world)[0] + "/optimizer")
        except OSError as e:  # as rank 0 says it (checkpoint.write_atomically)
            raise checkpoint.write_failed(out / "ckpt", e) from e


def save_shards(optim: dict, folder: str):
    """AdamW's shards into `folder`, each process its own. A failure on any process (a full disk)
    reaches every process as DCP's CheckpointException, a BaseException that neither the writer's
    error handling nor the status file (faults.Watch) would see: it is raised as an OSError."""
    try:
        dcp.save({"optimizer": optim}, checkpoint_id=folder)
    except CheckpointException as e:
        raise OSError(first_failure(e)) from e


def first_failure(e: CheckpointException) -> str:
    """DCP's failure as a line: the first process that failed, and why."""
    rank, (error, _) = next(iter(e.failures.items()))
    return f"process {rank}: {checkpoint.first_line(error)}"


def load_optimizer(model, opt, ckpt: Path):
    """`opt` with AdamW's shards as `save_checkpoint` wrote them (as Optimizer.load_state_dict,
    in place). Asking for the state dict first gives the loader its shapes (a fresh AdamW gets its
    state from a zero step at learning rate 0). Nothing in the files is unpickled that could run
    code: `check_metadata`, then `Planner` for the entries that are not tensors."""
    check_metadata(ckpt / "optimizer")
    optim = get_optimizer_state_dict(model, opt)
    try:
        dcp.load({"optimizer": optim}, checkpoint_id=str(ckpt / "optimizer"), planner=Planner())
    except CheckpointException as e:  # a BaseException (save_shards): said in one sentence
        raise UserError(f"could not read {ckpt / 'optimizer'} ({first_failure(e)})") from e
    set_optimizer_state_dict(model, opt, optim)
    return opt


# ---------------------------------------------------------------------------------------------
# Reading the shards without running code from them (as checkpoint.load_state reads the rest)
# ---------------------------------------------------------------------------------------------

# What DCP's metadata file, a pickle, names when it holds AdamW's shards (torch 2.11 and 2.14):
# DCP's own records, a path, a size, a layout, dtypes. A file that names anything else is not read.
DCP_GLOBALS = {("torch.distributed.checkpoint.metadata", name) for name in (
    "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata", "BytesStorageMetadata",
    "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("pathlib", "PosixPath"), ("torch", "Size"),
    ("torch.serialization", "_get_layout")}
UNSAFE = ("which only unpickling would rebuild and which could run code: not loaded; resume only --shard "
          "checkpoints you wrote")


class Unsafe(pickle.UnpicklingError):
    """A pickle that names what DCP does not write."""


class DCPGlobals(pickle.Unpickler):
    """An unpickler that builds only what DCP_GLOBALS names, and torch's dtypes."""
    def find_class(self, module: str, name: str):
        if (module, name) in DCP_GLOBALS or module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return super().find_class(module, name)
        raise Unsafe(f"names {module}.{name}, {UNSAFE}")


def check_metadata(folder: Path):
    """DCP's own reader unpickles the metadata file (torch 2.14 `filesystem.py`
    `FileSystemReader.read_metadata`): read first with DCPGlobals, it is refused if it names
    anything else or is not DCP's Metadata. Where that read fails, DCP falls back to a rank's own
    file (`__<rank>.metadata`, `state_dict_loader.py`), which a save by every process never writes:
    a folder that holds one is refused too, and without the file DCP would look for them."""
    path = folder / ".metadata"
    if ranks := sorted(p.name for p in folder.glob("__*.metadata")):
        raise UserError(f"{folder} holds {', '.join(ranks)}, which --shard's saves never write and DCP would "
                        f"unpickle: not loaded; resume only --shard checkpoints you wrote")
    try:
        with open(path, "rb") as f:
            read = DCPGlobals(f).load()
    except OSError as e:
        raise UserError(f"could not read {path} ({checkpoint.first_line(e)})") from None
    except Unsafe as e:
        raise UserError(f"{path} {e}") from None
    except Exception as e:  # a pickle of DCP's records, built with other arguments
        raise UserError(f"{path} is not metadata that DCP writes ({checkpoint.first_line(e)}): not loaded") from None
    if not isinstance(read, Metadata) or not isinstance(read.storage_meta, (StorageMeta, type(None))):
        raise UserError(f"{path} is not metadata that DCP writes (it holds {type(read).__name__}): not loaded")


class Planner(DefaultLoadPlanner):
    """DCP's load planner, but each entry that is not a tensor (AdamW's settings: numbers, a tuple,
    None, names) must load with weights_only=True before DCP loads it with weights_only=False
    (torch 2.14 `default_planner.py` `DefaultLoadPlanner.load_bytes`)."""
    def load_bytes(self, read_item, value):
        try:
            torch.load(value, weights_only=True)
        except pickle.UnpicklingError:
            raise pickle.UnpicklingError(f"its entry {read_item.dest_index.fqn} holds objects {UNSAFE}") from None
        value.seek(0)
        super().load_bytes(read_item, value)
