"""Processes: one per GPU under torchrun, one without; named numbers and objects across them.

The trainer (vlr.py) and the evaluator (eval.py) both run under torchrun, so both start here.
"""
import json
import os
import sys
import time

import torch
import torch.distributed as dist

# NCCL has no CPU backend: a CPU tensor in a collective of an "nccl" group raises. GPU runs get
# NCCL for CUDA tensors (the DDP gradients) and gloo for CPU ones (object gathers, small metrics).
BACKENDS = {"cuda": "cpu:gloo,cuda:nccl", "cpu": "gloo"}


class UserError(Exception):
    """A mistake on the command line (a flag, a folder, a model name): one sentence, no traceback."""


def rank_world() -> tuple[int, int]:
    """(rank, processes) as torchrun set them, before any process group exists: (0, 1) without torchrun."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def exit_once(message: str, code: int = 1):
    """Stop on a user error that every process found alike (the checks see the same flags and
    files): rank 0 says it, the others leave quietly with a non-zero code. torchrun's failure
    report follows (its own to print); the error file it reads (TORCHELASTIC_ERROR_FILE) makes
    the sentence the report's root cause, where a link to its docs would be."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if rank_world()[0]:
        # torchrun stops every process once one has exited: the others wait for rank 0 to fail
        # first, else it could be stopped before it has said what is wrong
        time.sleep(30 if error_file else 0)
        sys.exit(2)
    print(message, file=sys.stderr, flush=True)
    if error_file:
        with open(error_file, "w") as f:  # the format of torchrun's own ErrorHandler
            json.dump({"message": {"message": message, "extraInfo": {"timestamp": int(time.time())}}}, f)
    sys.exit(code)


def once_per_run(parser):
    """`parser` with its errors said by rank 0 alone, torchrun or not, in argparse's words and exit code."""
    parser.error = lambda message: exit_once(f"{parser.prog}: error: {message} (--help lists every flag)", 2)
    return parser


def setup_distributed():
    """torchrun sets RANK/WORLD_SIZE: then a process per GPU (or CPU process). Plain `python`: one process."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    (rank, world), local = rank_world(), int(os.environ["LOCAL_RANK"])
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
