"""Benchmark evaluation, comparable with the paper's table, and plots of training runs.

    python eval.py --bench toy                                     # the tiny base on the toy test split
    python eval.py --model runs/toy-s0/final --bench toy --limit 40
    python eval.py --model Qwen/Qwen2.5-VL-7B-Instruct --bench mathvista --data testmini.parquet
    torchrun --nproc_per_node 8 eval.py --model ... --bench mathverse --data testmini.parquet
    python eval.py --compare runs/lab/* --out lab.png   # a table (seeds pooled) and a plot of the runs

As the paper evaluates: greedy decoding, the training prompt, no rethinking trigger;
a response is right when its last \\boxed{} answer matches (reward.accuracy). Multiple-choice
questions show their options and are graded as letters: the letter or the option's text counts.

Benchmarks are read from the files they are distributed as (.jsonl, .json, .parquet; images as
paths relative to the file, parquet {"bytes", "path"} structs, or base64): MathVista testmini,
MathVerse testmini, MathVision and MMMU-Pro (standard or vision). EMMA and MEGA-Bench, also in the
paper's table, have no adapter. Each benchmark reports per sub-category: MathVista per task,
MathVerse per problem version, MathVision and MMMU-Pro per subject, the toy task per tier.
Besides accuracy: the reflection rate, the share of responses with self-reflection phrases.
"""
import argparse
import ast
import base64
import binascii
import io
import itertools
import json
import os
import re
from pathlib import Path

from PIL import Image

import data
import reward
from data import DataError

# Self-reflection phrases: the paper reports how often responses contain them. Matched as whole words,
# case-insensitively, so "wait" does not count inside "awaited".
REFLECTION_PHRASES = ("wait", "double-check", "double check", "re-check", "recheck", "re-evaluate", "reevaluate",
                      "re-examine", "reexamine", "reconsider", "let me check", "let me verify", "let's verify",
                      "check again")
_REFLECTION = re.compile(r"\b(?:" + "|".join(re.escape(p) for p in REFLECTION_PHRASES) + r")\b", re.IGNORECASE)


def reflects(text: str) -> bool:
    return _REFLECTION.search(text) is not None


# ---------------------------------------------------------------------------------------------
# Evaluation and the summary
# ---------------------------------------------------------------------------------------------

def row(rec: data.Record, response: str, n_tokens: int) -> dict:
    """The per-sample result. `answer` is a letter for multiple choice; with `choices` given,
    reward.accuracy also accepts the text of the right option."""
    return {"id": rec.id, "category": rec.category, "question": rec.question, "choices": rec.choices,
            "answer": rec.answer, "response": response, "extracted": reward.extract_answer(response),
            "correct": float(reward.accuracy(response, rec.answer, rec.choices)), "rethinks": reflects(response),
            "len": n_tokens}


def evaluate(model, processor, records, max_new_tokens=64, batch_size=32, temperature=0.0) -> list[dict]:
    """One response per record (greedy at temperature 0), graded; rows in the order of `records`.
    Runs on whatever model it is given and never touches torch.distributed: sharding is the caller's."""
    import rollout

    rows = []
    for start in range(0, len(records), batch_size):
        batch = [records[i] for i in range(start, min(start + batch_size, len(records)))]
        out = rollout.sample(model, processor, batch, g=1, max_new_tokens=max_new_tokens, temperature=temperature)
        # response_mask counts the stop token of a response that stopped; its length is without it
        lens = (out.response_mask.sum(1).cpu() - (~out.truncated).long()).tolist()
        rows += [row(rec, text, n) for rec, text, n in zip(batch, out.texts, lens)]
    return rows


def _stats(rows) -> dict:
    n = len(rows)
    return {"n": n, "accuracy": round(sum(r["correct"] for r in rows) / n, 4),
            "reflection_rate": round(sum(r["rethinks"] for r in rows) / n, 4),
            "mean_len": round(sum(r["len"] for r in rows) / n, 2)}


def summarize(rows, bench: str) -> dict:
    """Overall and per-category n, accuracy, reflection rate and mean length; categories in the
    order they first occur."""
    cats = {}
    for r in rows:
        cats.setdefault(r["category"] or "(none)", []).append(r)
    return {"bench": bench, **_stats(rows), "categories": {c: _stats(rs) for c, rs in cats.items()}}


def table(summary: dict) -> str:
    lines = [f"{'bench / category':<36} {'n':>6} {'accuracy':>9} {'reflect':>8} {'mean_len':>9}"]
    entries = [(summary["bench"], summary)] + [("  " + c, s) for c, s in summary["categories"].items()]
    for name, s in entries:
        lines.append(f"{name[:36]:<36} {s['n']:>6} {s['accuracy']:>9.1%} {s['reflection_rate']:>8.1%} "
                     f"{s['mean_len']:>9.1f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Benchmark files -> data.Record
# ---------------------------------------------------------------------------------------------

def read_rows(path: Path) -> list:
    """(where, row) for every record of a .jsonl, .json (a list, or an object keyed by id, as
    MathVista's testmini.json) or .parquet file."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.suffix == ".jsonl":
        rows = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append((f"{path}:{i}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{i}: invalid JSON ({e.msg} at column {e.colno})") from None
        return rows
    if path.suffix == ".json":
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
        rows = list(obj.values()) if isinstance(obj, dict) else obj
    elif path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{path}: reading .parquet needs pyarrow (pip install -r requirements.txt)") from None
        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow's errors for a truncated or non-parquet file vary
            raise DataError(f"{path}: not a readable parquet file ({e})") from None
    else:
        raise DataError(f"{path}: unsupported file type '{path.suffix}'; expected .jsonl, .json or .parquet")
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a list of records or an object of records")
    return [(f"{path}: record {i}", r) for i, r in enumerate(rows, 1)]


def _open(raw: bytes):
    try:  # Image.open reads only the header: loading a benchmark stays cheap
        return Image.open(io.BytesIO(raw))
    except Exception:  # PIL raises many kinds for bad bytes
        return None


def _image(value, base: Path):
    """An image given as a path (relative to the data file), bytes, a {"bytes", "path"} struct or
    base64 text -> a path or a PIL image."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        if (img := _open(value)) is None:
            raise DataError("image bytes are not a readable image")
        return img
    if not isinstance(value, str) or not value:
        raise DataError("no image")
    if (base / value).is_file():
        return str(base / value)
    try:  # not a file: base64 text, maybe as a data: URL
        img = _open(base64.b64decode(value.split(",")[-1], validate=True))
    except binascii.Error:
        img = None
    if img is None:
        raise DataError(f"image file not found: {value[:100]}")
    return img


def _need(r: dict, *keys):
    for k in keys:
        if r.get(k) is None:
            raise DataError(f"missing field '{k}'")
    return [r[k] for k in keys]


def _options(answer, choices: list, as_text=False):
    """(letter, option texts): the gold option is given as a letter or, by MathVista, as its text."""
    choices, answer = [str(c) for c in choices], str(answer).strip()
    if not 2 <= len(choices) <= len(data.LETTERS):
        raise DataError(f"expected 2 to {len(data.LETTERS)} options, got {len(choices)}")
    if as_text and answer in choices:
        return data.LETTERS[choices.index(answer)], choices
    if not as_text and answer in data.LETTERS[:len(choices)]:
        return answer, choices
    raise DataError(f"answer '{answer}' is not " + (f"one of the options {choices}" if as_text else
                                                    f"an option letter A-{data.LETTERS[len(choices) - 1]}"))


def mathvista(r, base):
    """pid, question, decoded_image (bytes) or image (path), answer, question_type (multi_choice:
    `choices` holds the option texts and answer is one of them), unit, metadata.task (the category)."""
    pid, question, answer, qtype = _need(r, "pid", "question", "answer", "question_type")
    choices = None
    if qtype == "multi_choice":
        answer, choices = _options(answer, _need(r, "choices")[0], as_text=True)
    unit = f" (Unit: {r['unit']})" if r.get("unit") else ""  # as in MathVista's own query
    return data.Record(id=str(pid), images=[_image(r.get("decoded_image") or r.get("image"), base)],
                       question=question + unit, answer=str(answer), choices=choices,
                       category=(r.get("metadata") or {}).get("task", ""))


_CHOICE_LINE = re.compile(r"^\s*\(?([A-J])\)?\s*[:.：)]\s*(.*?)\s*$")


def mathverse(r, base):
    """sample_index, problem_version (the category), question, image, answer, question_type
    (multi-choice: the answer is a letter, the options are in the question text after "Choices:"
    or, in the vision versions, only in the image; then the letter is graded alone)."""
    sid, version, question, answer, qtype = _need(r, "sample_index", "problem_version", "question", "answer",
                                                  "question_type")
    choices = None
    at = re.search(r"\bChoices?\s*:", question) if qtype == "multi-choice" else None
    lines = [_CHOICE_LINE.match(l) for l in question[at.end():].strip().splitlines()] if at else []
    if len(lines) >= 2 and all(lines) and "".join(m[1] for m in lines) == data.LETTERS[:len(lines)]:
        question = question[:at.start()].strip()
        answer, choices = _options(answer, [m[2] for m in lines])
    if not question.strip():  # vision only: the whole question is in the image
        question = "Answer the question shown in the image."
    return data.Record(id=str(sid), images=[_image(r.get("image"), base)], question=question,
                       answer=str(answer).strip(), choices=choices, category=version)


def mathvision(r, base):
    """id, question, options (A-E; empty for free-form), answer (then a letter, else a value),
    decoded_image (bytes) or image (path), subject (the category)."""
    rid, question, answer = _need(r, "id", "question", "answer")
    answer, choices = _options(answer, r["options"]) if r.get("options") else (str(answer).strip(), None)
    return data.Record(id=str(rid), images=[_image(r.get("decoded_image") or r.get("image"), base)],
                       question=question, answer=answer, choices=choices, category=r.get("subject") or "")


def mmmu_pro(r, base):
    """id, options (a list or its Python repr), answer (a letter), subject (the category); the
    standard setting has question and image_1..image_7, the vision setting one screenshot `image`
    that holds question and options (so they are not repeated in the prompt)."""
    rid, options, answer = _need(r, "id", "options", "answer")
    try:
        options = ast.literal_eval(options) if isinstance(options, str) else list(options)
    except (ValueError, SyntaxError):
        raise DataError("field 'options' is not a list") from None
    answer, choices = _options(answer, options)
    if r.get("question") is None:  # vision setting
        images, choices = [_image(_need(r, "image")[0], base)], None
        question = "Answer the question shown in the image."
    else:
        images, question = [_image(r[f"image_{i}"], base) for i in range(1, 8) if r.get(f"image_{i}")], r["question"]
    if not images:
        raise DataError("missing field 'image_1'")
    return data.Record(id=str(rid), images=images, question=question, answer=answer, choices=choices,
                       category=r.get("subject") or "")


ADAPTERS = {"mathvista": mathvista, "mathverse": mathverse, "mathvision": mathvision, "mmmu-pro": mmmu_pro}


def load_bench(bench: str, path: str | None = None) -> list[data.Record]:
    """The benchmark's records; every bad record is reported at once, with what was expected."""
    if bench == "toy":
        task = data.ToyTask("test")
        return [task[i] for i in range(len(task))]
    if bench not in ADAPTERS:
        raise DataError(f"unknown benchmark '{bench}'; choose from toy, {', '.join(ADAPTERS)}")
    if not path:
        raise DataError(f"--bench {bench} needs --data FILE (.jsonl, .json or .parquet)")
    path = Path(path)
    records, errors = [], []
    for where, r in read_rows(path):
        try:
            if not isinstance(r, dict):
                raise DataError("expected an object")
            records.append(ADAPTERS[bench](r, path.parent))
        except DataError as e:
            errors.append(f"{where}: {e}")
    if errors:
        expected = " ".join(ADAPTERS[bench].__doc__.split())
        raise DataError(f"{len(errors)} bad record(s) in {path} for {bench}; expected per record: {expected}\n"
                        + "\n".join(errors[:20]) + (f"\n... and {len(errors) - 20} more" if len(errors) > 20 else ""))
    if not records:
        raise DataError(f"{path}: no records")
    return records


# ---------------------------------------------------------------------------------------------
# Plots of training runs
# ---------------------------------------------------------------------------------------------

# (metric, title, shares from 0 to 1?). Response length is there because a policy can drift into
# filler (responses that grow while the reward stays flat) with every other panel looking calm.
PLOTTED = (("reward_mean", "mean reward", True), ("zero_adv_frac", "zero-advantage share of groups", True),
           ("eval_acc", "eval accuracy (greedy)", True), ("resp_len_mean", "mean response length (tokens)", False))


def read_metrics(run_dir: str) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"{path}: file not found (expected a run folder written by vlr.py)")
    rows = read_rows(path)
    for where, m in rows:
        missing = [k for k in ("step", "reward_mean", "zero_adv_frac") if not isinstance(m, dict) or k not in m]
        if missing:
            raise DataError(f"{where}: missing {', '.join(missing)} (expected step, reward_mean, zero_adv_frac)")
    if not rows:
        raise DataError(f"{path}: no metrics")
    return [m for _, m in rows]


def _run_name(run_dir: str) -> str:
    """runs/lab/ssr-s2 -> ssr: the seeds of one configuration are pooled."""
    return re.sub(r"-s\d+$", "", Path(run_dir).name)


def _mean_std(xs: list) -> str:
    if not xs:
        return "-"
    mean = sum(xs) / len(xs)
    std = (sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0
    return f"{mean:.3f} ± {std:.3f}"


def compare_table(run_dirs: list[str], target: float = 0.8) -> str:
    """A markdown table of runs, seeds pooled: folders named NAME-s<seed> are one row, NAME.

    Per row: final eval accuracy (mean ± sample std over seeds), the share of zero-advantage groups
    over all steps, the first eval step at which eval accuracy reached `target` (mean over the seeds
    that reached it, and how many did), the reflection rate of the last eval, and rethink_fixed (the
    share of triggered responses that rethinking turned from wrong to right), averaged over steps."""
    groups = {}
    for d in run_dirs:
        groups.setdefault(_run_name(d), []).append(read_metrics(d))
    lines = ["| run | seeds | final eval acc | zero-adv share | steps to %.1f | reflection rate | rethink_fixed |" % target,
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, runs in groups.items():
        evals = [[m for m in rows if "eval_acc" in m] for rows in runs]
        final = [e[-1]["eval_acc"] for e in evals if e]
        reached = [next((m["step"] + 1 for m in e if m["eval_acc"] >= target), None) for e in evals]
        hit = [r for r in reached if r is not None]
        steps = f"{sum(hit) / len(hit):.0f} ({len(hit)}/{len(runs)})" if hit else f"never (0/{len(runs)})"
        zero = [sum(m["zero_adv_frac"] for m in rows) / len(rows) for rows in runs]
        reflect = [e[-1]["eval_reflect"] for e in evals if e and "eval_reflect" in e[-1]]
        fixed = [sum(m.get("rethink_fixed", 0.0) for m in rows) / len(rows) for rows in runs]
        lines.append(f"| {name} | {len(runs)} | {_mean_std(final)} | {_mean_std(zero)} | {steps} | "
                     f"{_mean_std(reflect)} | {_mean_std(fixed)} |")
    return "\n".join(lines)


def plot(run_dirs: list[str], out: str) -> str:
    """One panel per metric, one colour per run: the raw curve faint, its running average solid
    (rewards of a few prompts per step are noisy); eval accuracy is sparse, so as points."""
    runs = {d: read_metrics(d) for d in run_dirs}  # all files checked before matplotlib is loaded
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("the plot mode needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PLOTTED), figsize=(5 * len(PLOTTED), 3.8))
    names = list(dict.fromkeys(_run_name(d) for d in runs))  # seeds of one run share a colour
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"] * 10
    labelled = set()
    for d, rows in runs.items():
        colour, name = palette[names.index(_run_name(d))], _run_name(d)
        label = None if name in labelled else name
        labelled.add(name)
        for ax, (key, _, _) in zip(axes, PLOTTED):
            pts = [(m["step"], m[key]) for m in rows if m.get(key) is not None]
            if not pts:
                continue
            steps, vals = zip(*pts)
            if key == "eval_acc":
                ax.plot(steps, vals, "o-", color=colour, label=label)
                continue
            ax.plot(steps, vals, color=colour, alpha=0.25, linewidth=0.8)
            ax.plot(steps, list(itertools.accumulate(vals, lambda avg, v: 0.9 * avg + 0.1 * v)), color=colour,
                    label=label)
    for ax, (_, title, share) in zip(axes, PLOTTED):
        ax.set_title(title)
        ax.set_xlabel("step")
        if share:
            ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# ---------------------------------------------------------------------------------------------
# The command line (also under torchrun: each process evaluates a shard, rank 0 reports)
# ---------------------------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="'tiny' (the warm-started tiny base), a folder or a hub id")
    p.add_argument("--bench", choices=["toy", *ADAPTERS], help="benchmark to evaluate on")
    p.add_argument("--data", help="the benchmark's file (.jsonl, .json or .parquet); not for toy")
    p.add_argument("--limit", type=int, help="only the first N records")
    p.add_argument("--out", help="per-sample .jsonl (default runs/eval-BENCH.jsonl); with --compare, the .png")
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy, as the paper evaluates")
    p.add_argument("--compare", nargs="+", metavar="RUN_DIR", help="plot these runs' metrics.jsonl instead")
    args = p.parse_args(argv)
    if args.compare:
        print(compare_table(args.compare))
        print(f"wrote {plot(args.compare, args.out or 'compare.png')}")
        return
    if not args.bench:
        p.error("--bench is required (or --compare RUN_DIR...)")
    records = load_bench(args.bench, args.data)[:args.limit]  # bad data stops every process before loading a model

    import torch
    import torch.distributed as dist
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    import tiny

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    src = tiny.resolve(args.model)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(src, dtype=dtype).to(device).eval()
    processor = AutoProcessor.from_pretrained(src)
    rows = evaluate(model, processor, records[rank::world], args.max_new_tokens, args.batch_size, args.temperature)
    if world > 1:
        parts = [None] * world if rank == 0 else None
        dist.gather_object(rows, parts, dst=0)
        if rank == 0:  # shard r holds records r, r + world, ...: interleave back into file order
            rows = [None] * len(records)
            for r, part in enumerate(parts):
                rows[r::world] = part
        dist.destroy_process_group()
    if rank != 0:
        return
    out = Path(args.out or f"runs/eval-{args.bench}.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    summary = summarize(rows, args.bench)
    print(f"{args.bench}: {args.model}, {len(rows)} records, per-sample results in {out}")
    print(table(summary))
    print(json.dumps(summary))


if __name__ == "__main__":
    try:
        main()
    except DataError as e:  # bad input: which file, which record, what was expected
        raise SystemExit(str(e))
