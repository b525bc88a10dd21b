"""The collectives of a GPU run, checked on CPU: NCCL has no CPU backend, so a CPU tensor in a
collective of an NCCL-only group raises "No backend type associated with device type cpu". Gloo
stands in for NCCL here: a group built from `distributed.BACKENDS["cuda"]` with gloo for nccl has exactly
the device-to-backend map of a GPU run."""
import tempfile
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import distributed
import eval as evaluation
import tiny
import vlr


def _worker(rank, world, backend, store, results):
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))  # a peer that failed: an error, not a hang of 30 min
    try:
        device = torch.device("cpu")
        sums = distributed.reduce({"n": 8 + rank, "loss": 0.5 * (rank + 1)}, device, world)
        drift = distributed.reduce({"d": [1e-6, 3e-5][rank]}, device, world, dist.ReduceOp.MAX)
        # what a checkpoint gathers: generator states and replay rows (CPU tensors)
        state = distributed.gather({"gen": torch.Generator().manual_seed(rank).get_state(),
                            "row": torch.full((3,), float(rank))}, world)
        results[rank] = (sums, drift, [s["row"].tolist() for s in state], [s["gen"].sum().item() for s in state])
    except Exception as e:  # reported to the test, which shows the message
        results[rank] = repr(e)
    finally:
        dist.destroy_process_group()


def _run(backend):
    with tempfile.TemporaryDirectory() as d, mp.Manager() as manager:  # the manager's process ends with it
        results = manager.dict()
        mp.spawn(_worker, args=(2, backend, f"{d}/store", results), nprocs=2)
        return dict(results)


def test_gpu_backend_map_has_a_cpu_entry_and_the_run_collectives_work_under_it():
    backend = distributed.BACKENDS["cuda"].replace("nccl", "gloo")
    assert "cpu:" in backend
    results = _run(backend)
    gens = [torch.Generator().manual_seed(r).get_state().sum().item() for r in range(2)]
    for rank in range(2):
        assert not isinstance(results[rank], str), results[rank]
        sums, drift, rows, gen = results[rank]
        assert sums == {"n": 17.0, "loss": 1.5}
        assert drift == {"d": pytest.approx(3e-5)}
        assert rows == [[0.0] * 3, [1.0] * 3]
        assert gen == gens


def test_an_nccl_shaped_group_without_a_cpu_entry_rejects_cpu_tensors():
    """The crash this guards against, reproduced: with no CPU entry, the metric reduction fails."""
    results = _run("cuda:gloo")
    assert all("No backend type associated with device type cpu" in results[r] for r in range(2))


class Built(Exception):
    """The stand-in builder's stop: when it ran is all the test asks."""


@pytest.mark.parametrize("command", ["vlr", "eval"])
def test_a_built_model_is_built_before_the_processes_meet(command, tmp_path, monkeypatch):
    """The first torchrun process to take the lock builds the tiny (or smoke) model, and under a
    process group transformers' save_pretrained writes no weights on a rank other than 0: a rank-1
    build left a folder without a model, stamped as built. Here one process, with the environment
    torchrun gives it, finds the model unbuilt: the builder must run before the group is made."""
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(tiny, "CACHE", tmp_path / "tiny")  # unbuilt
    order = []
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: order.append("group"))

    def build(out):
        order.append("build")
        raise Built

    monkeypatch.setattr(tiny, "build", build)
    with pytest.raises(Built):
        if command == "vlr":
            vlr.setup(vlr.parse_args(["--out", str(tmp_path / "run")]))
        else:
            evaluation.main(["--bench", "toy", "--limit", "1", "--out", str(tmp_path / "eval.jsonl")])
    assert order == ["build"]
