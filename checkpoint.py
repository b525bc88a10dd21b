"""Folders written atomically (checkpoints, built models), and checkpoints that resume exactly.

Plain values in, plain values out: the trainer (vlr.py) hands over the model, the processor and
its state dict; the model builders (tiny.py, smoke.py) use `write_atomically` for their caches,
and smoke.py builds its cache once however many processes ask (`built_once`).
"""
import contextlib
import fcntl
import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError

from distributed import UserError


def built_once(out: Path, stamp: str, fingerprint: str, build) -> Path:
    """`out`, built by build(out) on first use and rebuilt when the fingerprint in its `stamp` file
    is not `fingerprint` (what determines the model changed). Several processes at once (torchrun
    ranks) build it once: the first takes the lock and builds, the others wait and find it built.
    Called before the processes' group exists (vlr.setup, eval.run): under one, transformers'
    save_pretrained writes no weights on a rank other than 0, and the first may be any rank."""
    def fresh() -> bool:
        try:
            return json.loads((out / stamp).read_text()).get("fingerprint") == fingerprint
        except (OSError, ValueError):
            return False

    if not fresh():
        with build_lock(out):
            if not fresh():
                build(out)
    return out


@contextlib.contextmanager
def build_lock(out: Path):
    """One builder of `out` at a time, across processes; the lock goes with the file's close."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def write_atomically(out: Path, write) -> None:
    """Fill a folder so that whoever looks finds the old one or the new one, never half of one:
    `write(tmp)` fills a temporary folder beside `out`, its files reach the disk (fsync), then two
    renames swap it in. The previous folder is deleted only once the new one is in place: a process
    killed between the renames leaves it as `.<name>-old` (`checkpoint_dir` looks there too), a
    rename that fails puts it back, and a writer that fails (a full disk) leaves it untouched and
    stops with one sentence. Two processes writing the same folder at once (torchrun ranks
    building a model) both end with a complete folder. Its folder and files get the modes that
    mkdir() and open() give under the process's umask (`umask`)."""
    try:  # a full disk can refuse the temporary folder itself
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-tmp-"))
    except OSError as e:
        raise write_failed(out, e) from e
    try:
        mask = umask()
        os.chmod(tmp, 0o777 & ~mask)  # a plain folder, not mkdtemp's private one
        try:
            write(tmp)
            for path in tmp.rglob("*"):  # plain files too: safetensors' are private (`umask`)
                if path.is_file():
                    os.chmod(path, 0o666 & ~mask)
            sync(tmp)
        except WRITE_ERRORS as e:
            raise write_failed(out, e) from e
        swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already once swapped in


def umask() -> int:
    """The process's umask, which makes the modes of the files and folders it creates (read by
    setting it, the one way there is, and put back at once). A folder written here gets the modes
    that plain open() and mkdir() give: safetensors 0.8 writes through a temporary file of mode
    0o600 whatever the umask (safetensors issue #782), so model.safetensors would be readable by
    its writer alone: not by a teammate's eval on a shared disk, nor by a container's other user."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


# A full disk or a quota as the writers report it: the OS's OSError, torch.save's RuntimeError
# ("PytorchStreamWriter failed writing file"), safetensors' own error (save_pretrained).
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)


def write_failed(out: Path, e: Exception) -> UserError:
    """The sentence of a folder not written (a full disk): the previous one is still there. torch.save's
    error on a full disk does not say so ("unexpected pos ..."): the space left is said beside it."""
    free = "" if isinstance(e, OSError) else f"; {shutil.disk_usage(out.parent).free / 2**20:.0f} MB free there"
    return UserError(f"could not write {out} ({first_line(e)}{free}); the previous {out.name} is left as it was")


def first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def sync(folder: Path):
    """Every file of `folder`, and the folder, on the disk before it is renamed into place: after a
    crash of the machine a renamed folder must not hold files the disk never received."""
    for path in sorted(folder.rglob("*"), reverse=True) + [folder]:  # files before their folders
        fsync(path)


def fsync(path: Path):
    """One file, or one folder's entries (the names that renames put there), on the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def swap_in(tmp: Path, out: Path):
    """The two renames of `write_atomically`. `.<name>-old` is stale only while `out` exists (a
    kill between the renames leaves it as the newest complete folder): it goes only then."""
    old = out.parent / f".{out.name}-old"
    moved = out.exists()
    if moved:
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError as e:
        if not out.exists():  # not another process's folder swapped in first (the same model, built twice)
            if moved:
                os.replace(old, out)  # the previous one back where it was
            raise UserError(f"could not rename {tmp} to {out} ({e.strerror}); the previous {out.name} is "
                            "left as it was") from e
    shutil.rmtree(old, ignore_errors=True)
    fsync(out.parent)  # the renames; not the rest of the run folder (wandb/ is another process's)


def clean_stale(out: Path):
    """What an interrupted save left in the run folder `out`: temporary folders, and `.<name>-old`
    beside a complete `<name>` (without it, `.<name>-old` is the newest checkpoint and stays)."""
    for name in ("ckpt", "final"):
        for tmp in out.glob(f".{name}-tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)
        if (out / name).exists():
            shutil.rmtree(out / f".{name}-old", ignore_errors=True)


def replace_text(path: Path, text: str):
    """A small file rewritten atomically (a temporary file renamed over it): config.json, status.json,
    metrics.jsonl cut back on resume. A kill, or a crash of the machine, leaves the old text or the
    new, never a part."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        fsync(tmp)
        os.replace(tmp, path)
    except BaseException:  # a full disk, text UTF-8 cannot write: the old file stays, no temporary beside it
        tmp.unlink(missing_ok=True)
        raise
    fsync(path.parent)


def param_checksum(model) -> float:
    """One number per process; DDP keeps weights identical, so every rank must agree exactly."""
    with torch.no_grad():
        return float(sum(p.double().sum() * (i + 1) for i, p in enumerate(model.parameters())))


def save_checkpoint(out: Path, model, processor, state: dict):
    """Model folder + training state into out/ckpt, atomically: a run killed at any moment leaves
    the previous checkpoint or the new one, never half of one."""
    def write(tmp: Path):
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        torch.save(state, tmp / "train_state.pt")

    write_atomically(out / "ckpt", write)


class NoCheckpoint(UserError):
    """A run folder without a checkpoint: --resume has nothing to continue from (--auto-resume starts afresh)."""


def checkpoint_dir(out: Path) -> Path:
    """The newest complete checkpoint (a kill between the two renames leaves only .ckpt-old)."""
    for name in ("ckpt", ".ckpt-old"):
        if (out / name / "train_state.pt").exists():
            return out / name
    raise NoCheckpoint(f"--resume: no checkpoint in {out}/ckpt to resume from")


def load_state(ckpt: Path) -> dict:
    """The training state, onto the CPU first: saved from rank 0's GPU, every rank would load it
    onto GPU 0. The optimizer's load_state_dict moves its state to each parameter's device.
    Tensors and plain values only (weights_only=True): a file that needs unpickling is refused."""
    path = ckpt / "train_state.pt"
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"{path} holds objects that only unpickling would rebuild, which could run code "
                        "(a checkpoint written before vlr saved plain values, or not by vlr): not loaded; "
                        "start afresh with --overwrite") from e
    except (OSError, RuntimeError, EOFError, LookupError, ValueError) as e:  # cut short, emptied, not torch's
        raise UserError(f"{path} does not read ({type(e).__name__}: {first_line(e)}): the checkpoint is damaged; "
                        "not loaded") from None


# may differ on resume (--steps shapes the lr schedule; --no-share-vision changes how, not what, is computed)
RESUMABLE = {"resume", "overwrite", "auto_resume", "save_every", "eval_every", "out", "share_vision", "report_to",
             "log_samples"}
# a line per step (samples.jsonl: per response shown), cut back together on resume
LOGS = ("metrics.jsonl", "samples.jsonl")
# what a run leaves behind, besides config.json (tb/, tracking.json, wandb/: tracking.py's)
RUN_FILES = (*LOGS, "ckpt", ".ckpt-old", "final", "status.json", "tb", "tracking.json", "wandb")
# flags added after runs were saved, with the value that reproduces those runs (they trained every weight)
ADDED = {"lora_rank": 0, "lora_alpha": 32.0}


def check_run_folder(out: Path, config: dict, resume: bool, overwrite: bool):
    """Refuse, before any file is touched: a new run into a folder that holds a run (its hours of
    work would be overwritten) unless told to overwrite; a resume with nothing to resume from or
    with another configuration (`config`: the run's, as a dict) than the saved one."""
    if resume and overwrite:
        raise UserError("--resume continues the run in --out, --overwrite deletes it: give one of them")
    if why := cannot_write(out):
        raise UserError(f"--out {out}: cannot be written here ({why})")
    held = [name for name in RUN_FILES if (out / name).exists()]
    if held and not resume and not overwrite:
        raise UserError(f"{out} holds a run ({', '.join(held)}): continue it with --resume, or start a new one "
                        "with another --out, or with --overwrite to delete it")
    if not resume:
        return
    if not (out / "config.json").exists():
        raise UserError(f"--resume: {out} holds no run to resume (no config.json)")
    try:
        saved = {**ADDED, **json.loads((out / "config.json").read_text())}
    except (OSError, ValueError) as e:  # ValueError: JSON or UTF-8 that does not decode
        raise UserError(f"--resume: {out / 'config.json'} does not read ({first_line(e)}); it is the run's record of "
                        "its flags: restore it, or start afresh with --overwrite") from None
    diff = [k for k, v in config.items() if k not in RESUMABLE and (k not in saved or saved[k] != v)]
    if diff:  # a flag newer than the saved run: its default may not be what that run did, so no guess
        raise UserError(f"--resume with a different configuration than {out}/config.json: " + ", ".join(
            f"{k}: saved {saved[k]!r}, now {config[k]!r}" if k in saved else
            f"{k}: not saved (a flag newer than the run), now {config[k]!r}" for k in diff))
    checkpoint_dir(out)


def cannot_write(path: Path) -> str:
    """Why nothing could be written at `path` (a folder, made if need be): the nearest path that
    exists on the way to it is a file, or a folder this user cannot write; "" when it can be."""
    where = next(p for p in (path, *path.absolute().parents) if p.exists())
    if not where.is_dir():
        return f"{where} is a file"
    return "" if os.access(where, os.W_OK | os.X_OK) else f"{where} is a folder this user cannot write"


def open_log(out: Path, config: dict, start: int, overwrite: bool):
    """The run's config.json written and its metrics.jsonl opened to append to, it and samples.jsonl
    cut back to step `start` on resume (those steps run again, identically); with `overwrite` the old
    run goes first. A folder that cannot be written (a full disk) is a sentence."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        if overwrite:
            clear_run(out)
        replace_text(out / "config.json", json.dumps(config, indent=1))
        for path in (out / name for name in LOGS):
            lines = logged_lines(path) if start and path.exists() else []
            replace_text(path, "".join(line + "\n" for line in lines if json.loads(line)["step"] < start))
        return open(out / LOGS[0], "a")
    except OSError as e:
        raise UserError(f"could not write the run's logs in {out} ({e.strerror or e})") from None


def records(path: Path) -> list[dict]:
    """A run's .jsonl log as records ([] when there is none)."""
    return [json.loads(line) for line in logged_lines(path)] if path.exists() else []


def logged_lines(path: Path) -> list[str]:
    """A .jsonl log's lines (metrics.jsonl, samples.jsonl). A last line cut short (a kill while it was written) is dropped: its
    step is after the last checkpoint, and runs again; cut inside a character, it decodes with a
    replacement mark and is dropped too. Lines end at "\n" only: the model's text is written
    unescaped (ensure_ascii=False), and a U+2028 or U+0085 in it would end a line for splitlines."""
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    lines = lines[:-1] if lines[-1] == "" else lines
    for i, line in enumerate(lines):
        try:
            json.loads(line)
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise UserError(f"{path}:{i + 1}: not a JSON line (only the last one can be cut short, "
                                "by a kill)") from None
            return lines[:-1]
    return lines


def clear_run(out: Path):
    """--overwrite: the old run goes, so that no checkpoint of it is ever resumed under the new config."""
    for path in (out / name for name in RUN_FILES):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
