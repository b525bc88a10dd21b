"""A run you can watch: its numbers in TensorBoard (or W&B, trackio) as it trains, and the model's own words.

A 3B run lasts hours; metrics.jsonl is its record (resume and the lab read it), but a record read
after the fact does not catch a format collapse, a runaway "wait" or a grader that is wrong while
there is still time to stop. So, on rank 0:

- every number of metrics.jsonl goes, at its step, to the loggers of `--report-to`: TensorBoard (the
  default: event files in <run>/tb/, `tensorboard --logdir runs`), W&B and trackio (optional
  packages, asked for by name; the run's config goes in as hyperparameters, its folder's name as
  the run's name);
- the model's own words (`eval_samples`, `rethink_samples`) go to <run>/samples.jsonl and to the
  loggers as text: at every in-loop eval a few greedy responses with their grade, and at every step
  the first few rethought responses, kept or not, with the cut and the forced trigger marked.

On resume metrics.jsonl and samples.jsonl are cut back to the checkpoint's step (checkpoint.py);
the loggers then get their history again (`open_loggers`): TensorBoard's events are rebuilt from
the two files, so each step is in them once; a W&B or trackio run of an earlier launch is continued
(its id in <run>/tracking.json) and is sent only the steps it has not had, a new one the whole history.
"""
import importlib
import importlib.util
import json
import os
import shutil
import uuid
from pathlib import Path

import checkpoint
from distributed import UserError

KINDS = ("tensorboard", "wandb", "trackio")  # --report-to's names; "none" for no logger
PROJECT = "vlr"  # the W&B / trackio project (WANDB_PROJECT / TRACKIO_PROJECT override it)
CUT, MODEL = "⟨cut⟩", "⟨model⟩"  # in a rethought sample: where the first response was cut; where the model goes on
TEXTS = ("question", "response", "text")  # a sample's fields that are the model's or the task's words
TRACKIO_SENT = "trackio_sent"  # tracking.json's key for the last step trackio was sent


def kinds(flag: str) -> list[str]:
    """--report-to's loggers. Refused in one sentence, before any model loads: an unknown name, or an
    optional package that is not installed (with the command that installs it)."""
    names = [k.strip() for k in flag.split(",") if k.strip()]
    if not names or any(k not in (*KINDS, "none") for k in names) or ("none" in names and len(names) > 1):
        raise UserError(f"--report-to {flag!r}: give 'none' or loggers from {', '.join(KINDS)}, comma-separated")
    for k in names:
        if k != "none" and importlib.util.find_spec(k) is None:
            raise UserError(f"--report-to {k}: the {k} package is not installed (vlr does not need it otherwise): "
                            f"pip install {k}" + (", or --report-to none" if k == "tensorboard" else ""))  # the default
    return [k for k in names if k != "none"]


# ---------------------------------------------------------------------------------------------
# What is logged: a step's numbers and samples
# ---------------------------------------------------------------------------------------------

def scalars(m: dict) -> dict:
    """A metrics.jsonl line as logger tags: eval_* under eval/, the rest under train/ (the step is the x axis)."""
    return {("eval/" if k.startswith("eval_") else "train/") + k: float(v) for k, v in m.items() if k != "step"}


def eval_samples(rows: list[dict], n: int, step: int) -> list[dict]:
    """The first `n` greedy eval responses (eval.row's), as samples.jsonl lines: the same questions
    at every eval (the toy test split takes its tiers in turn), so a reader sees each one change."""
    return [{"step": step, "kind": "eval", "id": r["id"], "category": r["category"], "question": r["question"],
             "gold": r["answer"], "response": r["response"], "correct": bool(r["correct"]),
             "reflects": r["reflects"], "revises": r["revises"]} for r in rows[:n]]


def rethink_samples(rethought: list, why_not_kept: list, n: int, step: int) -> list[dict]:
    """The step's first `n` rethought responses (rethink.Rethought), the rejected ones too: the first
    response up to the cut, the forced trigger, the model's continuation, marked where each begins."""
    return [{"step": step, "kind": "rethink", "row": c.row,
             "text": f"{c.first}{CUT}{c.trigger}{MODEL}{c.continuation}", "first_correct": c.first_correct,
             "correct": bool(c.grade.correct), "kept": not why, "why_not_kept": why}
            for c, why in zip(rethought[:n], why_not_kept)]


def tables(samples: list[dict]) -> dict:
    """A step's samples as the loggers' text tables, one per kind: {"samples/eval": [rows], ...}."""
    out = {}
    for s in samples:
        out.setdefault("samples/" + s["kind"], []).append({k: v for k, v in s.items() if k not in ("step", "kind")})
    return out


def markdown(rows: list[dict]) -> str:
    """Samples as TensorBoard text: a line of fields each, then the texts as indented code (kept as
    written: a model's text may hold anything markdown would act on)."""
    parts = []
    for r in rows:
        parts.append(" · ".join(f"**{k}** {v}" for k, v in r.items() if k not in TEXTS))
        parts += [f"*{k}*\n\n" + "\n".join("    " + line for line in r[k].splitlines() or [""]) for k in TEXTS if k in r]
    return "\n\n".join(parts)


# ---------------------------------------------------------------------------------------------
# The loggers
# ---------------------------------------------------------------------------------------------

class TensorBoard:
    """Event files in `folder` (torch's SummaryWriter), flushed each step: a run is watched live."""

    def __init__(self, folder: Path, config: dict):
        from torch.utils.tensorboard import SummaryWriter  # imported here: a run without it does not pay for it
        self.writer = SummaryWriter(str(folder))
        self.writer.add_text("config", "    " + json.dumps(config, indent=1).replace("\n", "\n    "), 0)

    def log(self, step: int, values: dict, texts: dict):
        for tag, v in values.items():
            self.writer.add_scalar(tag, v, step)
        for tag, rows in texts.items():
            self.writer.add_text(tag, markdown(rows), step)
        self.writer.flush()

    def close(self, failed: bool = False):
        self.writer.close()


class Hosted:
    """W&B or trackio: the same calls (trackio copies W&B's init/log/Table/finish). W&B continues a
    run by its id, trackio by its name in the project. `held`: the last step the run holds. W&B
    says it (`Run.step`: the step of the next log), also when a kill lost what it had not yet sent;
    trackio does not, so `sent` is the last step an earlier launch sent it, which `record` keeps in
    tracking.json after each log (its sender batches: a kill can lose its last seconds, steps that
    are then missing from its charts)."""

    def __init__(self, kind: str, run_id: str, name: str, config: dict, folder: Path, again: bool, sent: int,
                 record=None):
        self.lib, self.kind, self.record = importlib.import_module(kind), kind, record
        project = os.environ.get(f"{kind.upper()}_PROJECT", PROJECT)
        if kind == "wandb":  # a run of its own id, continued when `again`
            run = self.lib.init(project=project, id=run_id, name=name, config=config, dir=str(folder), resume="allow")
            self.held = run.step - 1
        else:  # the id is the name: a folder run again after --overwrite is a new run
            self.lib.init(project=project, name=run_id, config=config, resume="allow" if again else "never")
            self.held = sent if again else -1

    def log(self, step: int, values: dict, texts: dict):
        tabled = {tag: self.lib.Table(columns=list(rows[0]), data=[list(r.values()) for r in rows])
                  for tag, rows in texts.items()}
        self.lib.log({**values, **tabled}, step=step)
        if self.record:
            self.record(step)

    def close(self, failed: bool = False):
        if self.kind == "wandb" and failed:  # shown as failed, not finished (trackio's finish takes no code)
            self.lib.finish(exit_code=1)
        else:
            self.lib.finish()


class Loggers:
    """samples.jsonl and the run's loggers as one: `log` a step to each logger that has not had it."""

    def __init__(self, loggers: list, sent: list[int], samples):
        # sent[i]: the last step logger i holds; samples: samples.jsonl open to append to, or None
        self.loggers, self.sent, self.samples = loggers, sent, samples

    def log(self, step: int, values: dict, samples: list[dict], history: bool = False):
        """`values`: tag -> number (`scalars`); `samples`: the step's lines of samples.jsonl, written
        there too unless they are its `history`."""
        texts = tables(samples)
        for logger, sent in zip(self.loggers, self.sent):
            if step > sent:
                logger.log(step, values, texts)
        if not history and self.samples and samples:
            self.samples.write("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
            self.samples.flush()
            os.fsync(self.samples.fileno())  # on the disk before the step's metrics line (vlr.log_step)

    def close(self, failed: bool = False):
        if self.samples:
            self.samples.close()
        for logger in self.loggers:
            logger.close(failed)

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        self.close(failed=error is not None)


def open_loggers(names: list[str], out: Path, config: dict, logged: int) -> Loggers:
    """The trainer's loggers (`names`) for the run in `out`, each given the run's history (its
    metrics.jsonl and samples.jsonl, already cut back to the step this launch starts at) unless it
    holds it already, and samples.jsonl to append to. `logged`: the last step an earlier launch of
    this run logged (-1: none). TensorBoard starts afresh from the history; W&B and trackio continue
    the run they logged to before (its id in tracking.json), sent the steps it lacks (`Hosted`: a
    resumed run repeats the steps after its checkpoint identically). A logger that cannot start is
    one sentence naming it."""
    ids_path = out / "tracking.json"
    before = json.loads(ids_path.read_text()) if ids_path.exists() else {}
    ids = {**new_ids(names, out.name), **before}
    if "trackio" in ids:  # the last step trackio was sent: none in a new run; in a folder from before this record, `logged`
        ids.setdefault(TRACKIO_SENT, logged if "trackio" in before else -1)
    if ids != before:  # before any run starts: a kill after it cannot leave a run that no launch continues
        checkpoint.replace_text(ids_path, json.dumps(ids))

    def record(step: int):  # trackio's last step, for a later launch (a run may drop it for a launch and add it back)
        ids[TRACKIO_SENT] = step
        checkpoint.replace_text(ids_path, json.dumps(ids))
    loggers, sent = make_loggers(names, out, config, ids, set(before), ids.get(TRACKIO_SENT, -1), record)
    by_step = {}
    for s in checkpoint.records(out / "samples.jsonl"):
        by_step.setdefault(s["step"], []).append(s)
    run = Loggers(loggers, sent, open(out / "samples.jsonl", "a", encoding="utf-8"))
    for m in checkpoint.records(out / "metrics.jsonl"):
        run.log(m["step"], scalars(m), by_step.get(m["step"], []), history=True)
    return run


def new_ids(names: list[str], name: str) -> dict:
    """A new run id for each W&B/trackio logger of `names`: the run's name and a random part."""
    return {kind: f"{name}-{uuid.uuid4().hex[:8]}" for kind in names if kind != "tensorboard"}


def make_loggers(names: list[str], folder: Path, config: dict, ids: dict, known: set, sent_trackio: int,
                 record=None):
    """The loggers of `names` writing for `folder` (TensorBoard into folder/tb, afresh), and the last
    step each already holds (`Hosted`). `ids`: the W&B/trackio run of each kind; those of the kinds
    in `known` were run by an earlier launch, which sent trackio the steps up to `sent_trackio`.
    `record(step)`: called after each step trackio is sent."""
    loggers, sent = [], []
    for kind in names:
        try:
            if kind == "tensorboard":
                shutil.rmtree(folder / "tb", ignore_errors=True)
                loggers.append(TensorBoard(folder / "tb", config))
            else:
                loggers.append(Hosted(kind, ids[kind], folder.name, config, folder, kind in known, sent_trackio,
                                      record if kind == "trackio" else None))
        except Exception as e:  # a login, a server, a folder: the library's own error, said as ours
            for started in loggers:
                started.close(failed=True)
            raise UserError(f"--report-to {kind}: the logger did not start ({type(e).__name__}: "
                            f"{checkpoint.first_line(e)}); fix it, or leave {kind} out of --report-to") from e
        sent.append(loggers[-1].held if kind != "tensorboard" else -1)
    return loggers, sent


def log_once(names: list[str], folder: Path, config: dict, values: dict, samples: list[dict]):
    """eval.py --report-to: one result (`values` as tags, `samples`) as step 0 of a new logger run named after `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    loggers, sent = make_loggers(names, folder, config, new_ids(names, folder.name), set(), -1)
    run = Loggers(loggers, sent, None)
    run.log(0, values, samples)
    run.close()
