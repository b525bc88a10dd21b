"""Processes: one per GPU under torchrun, one without; named numbers and objects across them.

The trainer (vlr.py) and the evaluator (eval.py) both run under torchrun, so both start here.
"""
import os

import torch
import torch.distributed as dist

# NCCL has no CPU backend: a CPU tensor in a collective of an "nccl" group raises. GPU runs get
# NCCL for CUDA tensors (the DDP gradients) and gloo for CPU ones (object gathers, small metrics).
BACKENDS = {"cuda": "cpu:gloo,cuda:nccl", "cpu": "gloo"}


def setup_distributed():
    """torchrun sets RANK/WORLD_SIZE: then a process per GPU (or CPU process). Plain `python`: one process."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(BACKENDS[device.type])
    return rank, world, device


def reduce(values: dict, device, world, op=dist.ReduceOp.SUM) -> dict:
    """Named numbers summed (or `op`) over processes. The tensor lives on the process's device:
    the collective must find a backend for it (an NCCL-only group has none for the CPU)."""
    if world == 1:
        return {k: float(v) for k, v in values.items()}
    t = torch.tensor([float(v) for v in values.values()], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return dict(zip(values, t.tolist()))


def gather(obj, world):
    """Every rank's `obj`, in rank order (a list of one without torchrun)."""
    if world == 1:
        return [obj]
    objs = [None] * world
    dist.all_gather_object(objs, obj)
    return objs
