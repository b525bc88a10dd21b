"""tracking.py: what W&B and trackio are sent (stand-in modules that record their calls), across a
crash and a resume; the sentences for a logger that is not there; eval.py --report-to; lab.py's samples
side by side. TensorBoard's events of a killed and resumed run: test_vlr.py."""
import importlib.machinery
import json
import re
import sys
import types
from dataclasses import asdict
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import eval as evaluation
import lab
import tracking
import vlr
from distributed import UserError
import test_vlr
from test_vlr import SMALL, TIMINGS

pytestmark = pytest.mark.usefixtures("one_thread")


def stand_in(kind: str, calls: list) -> types.ModuleType:
    """A module with W&B's (and trackio's) calls, recording them."""
    mod = types.ModuleType(kind)
    mod.__spec__ = importlib.machinery.ModuleSpec(kind, None)  # found by importlib.util.find_spec
    def init(**kw):
        calls.append(("init", kw))  # a W&B run knows the step of its next log
        return types.SimpleNamespace(step=1 + max((c[1] for c in calls if c[0] == "log"), default=-1))

    mod.init = init
    mod.log = lambda data, step=None: calls.append(("log", step, data))
    mod.Table = lambda columns, data: {"columns": columns, "data": data}
    mod.finish = lambda **kw: calls.append(("finish", *kw.values()))  # W&B's takes exit_code
    return mod


def test_wandb_and_trackio_get_the_config_and_every_step_once_across_a_crash_and_resume(tmp_path, monkeypatch):
    """W&B from the start: its run continued after the crash, sent only the steps it lacks; trackio
    added on resume (the logging flags may change): a new run, sent the history first."""
    calls = {"wandb": [], "trackio": []}
    for kind, recorded in calls.items():
        monkeypatch.setitem(sys.modules, kind, stand_in(kind, recorded))
    out = tmp_path / "run"
    args = [*SMALL, "--steps", "4", "--log-samples", "3", "--out", str(out)]
    real = vlr.train_step

    def crash_at_3(run, step):  # steps 0-2 logged, the checkpoint holds step 2: step 2 runs again
        if step == 3:
            raise RuntimeError("killed")
        return real(run, step)

    monkeypatch.setattr(vlr, "train_step", crash_at_3)
    with pytest.raises(RuntimeError, match="killed"):
        vlr.train(vlr.parse_args(args + ["--report-to", "wandb"]))
    monkeypatch.setattr(vlr, "train_step", real)
    cfg = vlr.parse_args(args + ["--report-to", "wandb,trackio", "--resume"])
    vlr.train(cfg)

    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1, 2, 3] and "eval_acc" in metrics[3]
    for kind, recorded in calls.items():
        inits = [c[1] for c in recorded if c[0] == "init"]
        assert all(i["project"] == "vlr" and i["config"]["lr"] == cfg.lr for i in inits)
        assert inits[-1]["config"] == asdict(cfg)
        if kind == "wandb":  # continued by its id; named after the run folder
            assert len(inits) == 2 and inits[0]["id"] == inits[1]["id"] and inits[1]["resume"] == "allow"
            assert inits[0]["name"] == inits[1]["name"] == "run" and inits[1]["dir"] == str(out)
        else:  # a new run, named after the folder (with an id: a trackio run is continued by its name)
            assert len(inits) == 1 and inits[0]["resume"] == "never" and inits[0]["name"].startswith("run-")
        logs = [c for c in recorded if c[0] == "log"]
        assert [step for _, step, _ in logs] == [0, 1, 2, 3], kind  # step 2 once: the resumed run repeats it
        for (_, step, data), m in zip(logs, metrics):
            numbers = {k: v for k, v in data.items() if not isinstance(v, dict)}
            expect = {("eval/" if k.startswith("eval_") else "train/") + k: v for k, v in m.items() if k != "step"}
            assert set(numbers) == set(expect)
            assert all(numbers[k] == pytest.approx(v) for k, v in expect.items() if k[6:] not in TIMINGS)
            shown = [s for s in samples if s["step"] == step]
            for name in ("eval", "rethink"):
                rows = [s for s in shown if s["kind"] == name]
                table = data.get(f"samples/{name}")
                assert (table is None) == (not rows), (step, name)
                if rows:
                    assert table["data"] == [[v for k, v in r.items() if k not in ("step", "kind")] for r in rows]
        finishes = [c for c in recorded if c[0] == "finish"]  # W&B is told that the first launch failed
        assert finishes == ([("finish", 1), ("finish",)] if kind == "wandb" else [("finish",)])
    assert any(s["kind"] == "rethink" for s in samples)  # the rethink tables above were compared, not skipped
    evals = [s for s in samples if s["kind"] == "eval"]
    assert len(evals) == 3 and {s["step"] for s in evals} == {3}
    assert set(evals[0]) == {"step", "kind", "id", "category", "question", "gold", "response", "correct",
                             "reflects", "revises"}
    assert len({s["category"] for s in evals}) == 3  # the test split takes its tiers in turn


def crash_at(step_to_crash: int, real, monkeypatch):
    """vlr.train_step (`real`) that raises as step `step_to_crash` begins: a kill after the step before."""
    def crashing(run, step):
        if step == step_to_crash:
            raise RuntimeError("killed")
        return real(run, step)
    monkeypatch.setattr(vlr, "train_step", crashing)


def test_trackio_left_out_of_one_launch_and_added_back_gets_every_step(tmp_path, monkeypatch):
    """trackio's steps 0-2, then a launch without it (the checkpoint of step 2: steps 2-4 run again
    and are logged, then a crash at 5), then trackio again: it is sent 3 and 4 from the history, which
    it lacks, though the launch before logged them, and then 5."""
    calls = []
    monkeypatch.setitem(sys.modules, "trackio", stand_in("trackio", calls))
    out = tmp_path / "run"
    args = [*SMALL, "--steps", "6", "--log-samples", "0", "--out", str(out)]
    real = vlr.train_step
    for crash, flags in ((3, ["--report-to", "trackio"]), (5, ["--report-to", "tensorboard", "--resume"])):
        crash_at(crash, real, monkeypatch)
        with pytest.raises(RuntimeError, match="killed"):
            vlr.train(vlr.parse_args(args + flags))
    assert [m["step"] for m in test_vlr.metrics(out)] == [0, 1, 2, 3, 4]
    monkeypatch.setattr(vlr, "train_step", real)
    vlr.train(vlr.parse_args(args + ["--report-to", "tensorboard,trackio", "--resume"]))
    assert [c[1] for c in calls if c[0] == "log"] == [0, 1, 2, 3, 4, 5]
    assert [c[1]["resume"] for c in calls if c[0] == "init"] == ["never", "allow"]


def test_a_logger_that_does_not_start_is_a_sentence_recorded_as_the_run_s_failure(tmp_path, monkeypatch, capsys):
    """W&B's init refuses (no login): one sentence naming the logger, and status.json records it, so
    that a requeue script does not launch the run again and again."""
    wandb = stand_in("wandb", [])

    def no_login(**kw):
        raise RuntimeError("api_key not configured (no-tty). call wandb.login(key=[your_api_key])")
    wandb.init = no_login
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    out = tmp_path / "run"
    said = ("--report-to wandb: the logger did not start (RuntimeError: api_key not configured (no-tty). call "
            "wandb.login(key=[your_api_key])); fix it, or leave wandb out of --report-to")
    with pytest.raises(SystemExit):
        vlr.train(vlr.parse_args([*SMALL, "--steps", "2", "--report-to", "tensorboard,wandb", "--out", str(out)]))
    assert said + "\n" in capsys.readouterr().err  # a line of its own (after the bars' carriage returns)
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "failed" and status["message"] == said and status["retry"] is False


def test_a_logger_that_is_not_installed_is_said_before_anything_loads(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(UserError, match=r"^--report-to wandb: the wandb package is not installed .*: pip install wandb$"):
        vlr.check_flags(vlr.parse_args(["--report-to", "tensorboard,wandb", "--out", str(tmp_path / "x")]))
    assert not (tmp_path / "x").exists()
    with pytest.raises(UserError, match=r"^--log-samples -1: give how many responses to show \(0: none\)$"):
        vlr.check_flags(vlr.parse_args(["--log-samples", "-1", "--out", str(tmp_path / "x")]))
    for bad in ("tensorbord", "none,wandb", ""):
        with pytest.raises(UserError, match="give 'none' or loggers from tensorboard, wandb, trackio"):
            tracking.kinds(bad)
    assert tracking.kinds("none") == [] and tracking.kinds(" tensorboard ") == ["tensorboard"]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(UserError, match=r": pip install tensorboard, or --report-to none$"):  # the default: not asked for
        vlr.check_flags(vlr.parse_args(["--out", str(tmp_path / "x")]))


def test_eval_sends_its_summary_and_samples_to_tensorboard(tmp_path, tiny_model):
    out = tmp_path / "eval-toy.jsonl"
    evaluation.main(["--bench", "toy", "--limit", "5", "--max-new-tokens", "16", "--report-to", "tensorboard",
                     "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    acc = EventAccumulator(str(tmp_path / "eval-toy" / "tb"))
    acc.Reload()
    assert acc.Scalars("toy/accuracy")[0].value == pytest.approx(sum(r["correct"] for r in rows) / 5)
    for tier in {r["category"] for r in rows}:
        hits = [r["correct"] for r in rows if r["category"] == tier]
        assert acc.Scalars(f"toy/{tier}/accuracy")[0].value == pytest.approx(sum(hits) / len(hits))
    text = acc.Tensors("samples/eval/text_summary")[0].tensor_proto.string_val[0].decode()
    assert all(r["id"] in text for r in rows[:4]) and rows[4]["id"] not in text


def test_lab_compare_prints_the_last_eval_answers_side_by_side(tmp_path):
    for name, answer in (("a", "red"), ("b", "blue")):
        lines = [{"step": s, "kind": "eval", "id": "q1", "category": "colour", "question": "What colour?",
                  "gold": "red", "response": f"It is\n\\boxed{{{answer if s == 19 else 'green'}}}", "correct": answer == "red",
                  "reflects": False, "revises": False} for s in (9, 19)]
        (tmp_path / name).mkdir()
        (tmp_path / name / "samples.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    said = lab.side_by_side([str(tmp_path / "a"), str(tmp_path / "b")])
    assert said.splitlines() == ["q1: 'What colour?', gold 'red'",
                                 f"  {tmp_path / 'a'} (step 20, right): It is ⏎ \\boxed{{red}}",
                                 f"  {tmp_path / 'b'} (step 20, wrong): It is ⏎ \\boxed{{blue}}"]


def test_a_step_with_samples_syncs_samples_jsonl_before_its_metrics_line(tmp_path, monkeypatch):
    """vlr.log_step fsyncs metrics.jsonl after the loggers; samples.jsonl, another file, is synced
    by its own fsync, and only when the step wrote to it."""
    synced = []
    monkeypatch.setattr(tracking.os, "fsync", synced.append)
    with open(tmp_path / "samples.jsonl", "a", encoding="utf-8") as f:
        run = tracking.Loggers([], [], f)
        run.log(0, {}, [])
        run.log(1, {}, [{"step": 1, "kind": "rethink", "text": "Wait"}])
        assert synced == [f.fileno()]
    assert json.loads((tmp_path / "samples.jsonl").read_text()) == {"step": 1, "kind": "rethink", "text": "Wait"}


def test_docs_watching_says_what_every_logged_number_is():
    """docs/watching.md's tables name every key the default run logged (docs/default-run.jsonl,
    eval_acc_<tier> for the tiers), and no key it did not."""
    root = Path(__file__).resolve().parent.parent
    logged = set().union(*(json.loads(line) for line in (root / "docs" / "default-run.jsonl").open()))
    page = (root / "docs" / "watching.md").read_text()
    section = page[page.index("## What each number means"):page.index("## What is sent")]
    named = {k for row in section.splitlines() if row.startswith("| `")
             for k in re.findall(r"`([a-z_<>, ]+)`", row.split("|")[1])}
    tiers = {k for k in logged if k.startswith("eval_acc_")}
    assert named - {"eval_<reflect, revise, fixed, broke, short_first>_<tier>"} == logged - tiers | {"eval_acc_<tier>"}
