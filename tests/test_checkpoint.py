"""checkpoint.py's saves that cannot lose a checkpoint (write_atomically: a failing writer, a
failing rename, a kill between the renames; the leftovers cleaned), metrics.jsonl cut back with a
torn last line, and train_state.pt read without unpickling. End to end under torchrun (a full
disk, kills): test_faults.py."""
import errno
import json
import os
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import checkpoint
import rollout
import vlr
from distributed import UserError


def folder(path: Path, text: str) -> Path:
    path.mkdir(parents=True)
    (path / "weights").write_text(text)
    return path


def writes(text: str):
    return lambda tmp: (tmp / "weights").write_text(text)


def contents(path: Path) -> str:
    return (path / "weights").read_text()


def test_a_save_replaces_the_folder_whole_and_leaves_nothing_beside_it(tmp_path):
    out = folder(tmp_path / "ckpt", "old")
    checkpoint.write_atomically(out, writes("new"))
    assert contents(out) == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_a_saved_folder_has_the_modes_the_umask_gives_safetensors_files_included(tmp_path, mask):
    """safetensors 0.8 writes model.safetensors private (0o600) whatever the umask: a teammate on a
    shared disk could read config.json but not the weights. Each mode is set against what mkdir
    and open() make under the same umask."""
    from safetensors.torch import save_file

    def write(tmp):
        save_file({"w": torch.zeros(2)}, tmp / "model.safetensors")
        (tmp / "config.json").write_text("{}")
        os.close(os.open(tmp / "private", os.O_CREAT | os.O_WRONLY, 0o600))  # whatever safetensors does next

    old = os.umask(mask)
    try:
        checkpoint.write_atomically(tmp_path / "ckpt", write)
        (tmp_path / "plain").mkdir()
        (tmp_path / "plain" / "file").write_text("")
    finally:
        os.umask(old)
    def mode(path):
        return path.stat().st_mode & 0o777

    out = tmp_path / "ckpt"
    assert mode(out) == mode(tmp_path / "plain") == 0o777 & ~mask
    assert mode(out / "model.safetensors") == mode(out / "config.json") == mode(out / "private") \
        == mode(tmp_path / "plain" / "file")


def test_text_that_cannot_be_written_leaves_the_old_file_and_no_temporary(tmp_path):
    """eval.py writes its results at the end with replace_text: a row UTF-8 cannot write (a lone
    surrogate) left an empty temporary beside the old results."""
    path = tmp_path / "results.jsonl"
    path.write_text("old\n")
    with pytest.raises(UnicodeEncodeError):
        checkpoint.replace_text(path, "new \ud800\n")
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["results.jsonl"]


def test_a_writer_that_fails_leaves_the_previous_folder_whole_and_says_so_in_one_sentence(tmp_path, monkeypatch):
    """A full disk as each writer reports it: an OSError, torch.save's RuntimeError."""
    out = folder(tmp_path / "ckpt", "old")
    for error in (OSError(errno.ENOSPC, "No space left on device"),
                  RuntimeError("PytorchStreamWriter failed writing file data/3: file write failed")):
        def full(tmp: Path):
            (tmp / "weights").write_text("half of the new")
            raise error

        with pytest.raises(UserError) as failed:
            checkpoint.write_atomically(out, full)
        said = str(failed.value)
        assert said.startswith(f"could not write {out} (") and said.endswith("the previous ckpt is left as it was")
        assert "\n" not in said and contents(out) == "old"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary folder left
        assert ("MB free there" in said) == isinstance(error, RuntimeError)  # torch.save's error does not say why

    def no_room(**kw):  # a disk too full for the temporary folder itself
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.tempfile, "mkdtemp", no_room)
    with pytest.raises(UserError, match=r"^could not write .*ckpt \(\[Errno 28\] No space left on device\); the "):
        checkpoint.write_atomically(out, writes("new"))
    assert contents(out) == "old"


def test_a_rename_that_fails_puts_the_previous_folder_back(tmp_path, monkeypatch):
    """The bug this replaces: the second rename failed, its `except` deleted the new folder and
    the code after it the old one. Now the old one goes back where it was."""
    out = folder(tmp_path / "ckpt", "old")
    replace = os.replace

    def failing(src, dst):
        if Path(src).name.startswith(".ckpt-tmp-"):
            raise OSError(errno.EIO, "Input/output error")
        replace(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(UserError, match=r"could not rename .* \(Input/output error\); the previous ckpt is left as it was"):
        checkpoint.write_atomically(out, writes("new"))
    assert contents(out) == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_after_a_kill_between_the_renames_the_old_folder_is_the_checkpoint_until_a_new_one_is_in_place(tmp_path,
                                                                                                      monkeypatch):
    """A kill between the renames leaves only .ckpt-old: the next save must not delete it before
    its own folder is in place (a failing rename leaves it), and deletes it once it is."""
    old = folder(tmp_path / ".ckpt-old", "step 2")
    (old / "train_state.pt").write_text("")
    assert checkpoint.checkpoint_dir(tmp_path) == old
    replace = os.replace

    def failing(src, dst):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(UserError, match="the previous ckpt is left as it was"):
        checkpoint.write_atomically(tmp_path / "ckpt", writes("step 4"))
    assert contents(old) == "step 2" and checkpoint.checkpoint_dir(tmp_path) == old
    monkeypatch.setattr(os, "replace", replace)
    checkpoint.write_atomically(tmp_path / "ckpt", writes("step 4"))
    assert contents(tmp_path / "ckpt") == "step 4" and not old.exists()


def test_clean_stale_removes_what_an_interrupted_save_left_and_keeps_the_newest_checkpoint(tmp_path):
    folder(tmp_path / ".ckpt-tmp-a1b2", "half")
    folder(tmp_path / ".final-tmp-c3d4", "half")
    folder(tmp_path / ".ckpt-old", "step 2")
    checkpoint.clean_stale(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ckpt-old"]  # no ckpt: .ckpt-old is the checkpoint
    folder(tmp_path / "ckpt", "step 4")
    checkpoint.clean_stale(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_torn_last_metrics_line_is_dropped_a_torn_line_elsewhere_is_refused(tmp_path):
    lines = ['{"step": 0, "loss": 0.5}', '{"step": 1, "loss": 0.25}', '{"step": 2, "loss": 0.125}']
    log = tmp_path / "metrics.jsonl"
    log.write_text("\n".join(lines) + '\n{"step": 3, "lo')
    checkpoint.open_log(tmp_path, {"seed": 0}, 2, False).close()
    assert log.read_text() == lines[0] + "\n" + lines[1] + "\n"
    log.write_text(lines[0] + '\n{"step": 1, "lo\n' + lines[2] + "\n")
    with pytest.raises(UserError, match=r"metrics.jsonl:2: not a JSON line"):
        checkpoint.open_log(tmp_path, {"seed": 0}, 2, False)


def test_samples_that_hold_any_character_are_cut_back_on_resume_byte_for_byte(tmp_path):
    """The model's words are written unescaped (tracking.Loggers.log): U+2028, U+0085 and U+000B are
    line ends to str.splitlines, and a kill can cut the last line inside a character."""
    lines = [json.dumps({"step": s, "response": f"{s}\u2028a\x85b\x0b\u2029é 😀"}, ensure_ascii=False)
             for s in range(3)]
    log = tmp_path / "samples.jsonl"
    kept = "".join(line + "\n" for line in lines[:2]).encode("utf-8")
    log.write_bytes(kept + (lines[2] + "\n").encode("utf-8") + "{\"step\": 3, \"response\": \"😀".encode("utf-8")[:-2])
    checkpoint.open_log(tmp_path, {"seed": 0}, 2, False).close()
    assert log.read_bytes() == kept
    assert [r["response"] for r in checkpoint.records(log)] == [json.loads(line)["response"] for line in lines[:2]]


def test_damaged_run_files_and_a_disk_that_refuses_them_are_sentences(tmp_path, monkeypatch):
    """A train state cut short, emptied or not torch's, a config.json that does not read, a --out
    below a file: one sentence each, before anything loads. A log or status write on a full disk
    leaves no temporary file beside the old one."""
    state = tmp_path / "ckpt" / "train_state.pt"
    state.parent.mkdir()
    torch.save({"step": 3, "weights": torch.zeros(1000)}, state)
    whole = state.read_bytes()
    for damaged in (b"", whole[:len(whole) // 2], b"step: 3\n", bytes(4096)):
        state.write_bytes(damaged)
        with pytest.raises(UserError, match=r"train_state.pt does not read \(\w+: .*\): the checkpoint is damaged"):
            checkpoint.load_state(state.parent)
    config = asdict(vlr.parse_args(["--out", str(tmp_path)]))
    (tmp_path / "config.json").write_text('{"seed": 0, "lr"')
    with pytest.raises(UserError, match=r"^--resume: .*config.json does not read \(.*\); it is the run's record"):
        checkpoint.check_run_folder(tmp_path, config, resume=True, overwrite=False)
    with pytest.raises(UserError, match=r"cannot be written here \(.*config.json is a file\)$"):
        checkpoint.check_run_folder(tmp_path / "config.json" / "run", config, resume=False, overwrite=False)

    def full(path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "fsync", full)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match=r"^could not write the run's logs in .* \(No space left on device\)$"):
        checkpoint.open_log(tmp_path, config, 0, False)
    assert (tmp_path / "config.json").read_text() == "{}" and not list(tmp_path.glob(".*.tmp"))


def test_a_train_state_that_needs_unpickling_is_refused_in_one_sentence(tmp_path):
    """A checkpoint written before the replay buffer stored plain values held rollout.Row objects:
    weights_only=True refuses to build them, and so does the trainer, in one sentence."""
    row = rollout.Row(*(torch.zeros(2) for _ in range(7)), step=3)
    torch.save({"step": 4, "buffers": [{"items": [row], "advantages": [0.5]}]}, tmp_path / "train_state.pt")
    with pytest.raises(UserError) as refused:
        checkpoint.load_state(tmp_path)
    said = str(refused.value)
    assert said.startswith(f"{tmp_path / 'train_state.pt'} holds objects that only unpickling would rebuild")
    assert "\n" not in said and said.endswith("start afresh with --overwrite")


def test_a_save_syncs_its_own_folder_not_the_rest_of_the_run_folder(tmp_path):
    """A logger's files beside the checkpoint (wandb/, written by another process) are not the
    save's to sync: a link there that points nowhere, as wandb's latest-run may, does not stop it."""
    (tmp_path / "wandb").mkdir()
    (tmp_path / "wandb" / "latest-run").symlink_to(tmp_path / "wandb" / "run-gone")
    checkpoint.write_atomically(tmp_path / "ckpt", lambda tmp: (tmp / "train_state.pt").write_text("state"))
    assert (tmp_path / "ckpt" / "train_state.pt").read_text() == "state"


def test_processes_that_disagree_on_the_weights_save_nothing(tmp_path, monkeypatch):
    """DDP keeps every process's weights equal; a checksum that differs (here rank 1's, by the
    gather) stops the run before anything is written. The checksum sees a weight moved by one ulp."""
    model = torch.nn.Linear(2, 2)
    before = checkpoint.param_checksum(model)
    with torch.no_grad():
        model.weight[0, 0] = torch.nextafter(model.weight[0, 0], torch.tensor(2.0))
    assert checkpoint.param_checksum(model) != before
    monkeypatch.setattr(vlr, "gather", lambda x, world: [x, x + 1.0] if isinstance(x, float) else [x] * world)
    run = SimpleNamespace(cfg=SimpleNamespace(shard=False), model=model, world=2, rank=0, out=tmp_path)
    with pytest.raises(SystemExit, match=r"^step 0: processes disagree on the weights \(checksums \[\S+, \S+\]\); "
                                         r"not saving$"):
        vlr.save(run, 1)
    assert list(tmp_path.iterdir()) == []
