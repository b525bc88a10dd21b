"""Benchmark evaluation, comparable with the paper's table.

    python eval.py --bench toy                                     # the tiny base on the toy test split
    python eval.py --model runs/toy-s0/final --bench toy --limit 40
    python eval.py --model Qwen/Qwen2.5-VL-7B-Instruct --bench mathvista   # testmini, from the hub on first use
    torchrun --nproc_per_node 8 eval.py --model ... --bench mathverse --data testmini.parquet

As the published evaluation (TIGER-AI-Lab/VL-Rethinker: scripts/eval_vlm_new.sh and the vLLM
sampling in openrlhf/trainer/ppo_utils/experience_maker.py): greedy decoding, the training prompt,
no rethinking trigger, at most 2048 new tokens, images at 256 to 1280 visual tokens
(models.load_model); the toy task keeps the 48 tokens its runs train with. A response is right when
its last \\boxed{} answer matches (reward.accuracy). Multiple-choice questions show their options
and are graded as letters: the letter or the option's text counts. MathVista's decimal answers
are graded at their `precision`, as its own scorer does (`grade`).

The splits of the paper's table and the files they are read from: benchmarks.py (and --bench
below). Each benchmark reports per sub-category: MathVista per task, MathVerse per problem version,
MathVision and MMMU-Pro per subject, the toy task per tier. Besides accuracy: the reflection rate,
the share of responses with self-reflection phrases.
"""
import argparse
import json
import re
from pathlib import Path

import torch
import torch.distributed as dist

import benchmarks
import checkpoint
import data
import distributed
import models
import reward
import rollout
import tracking
from data import DataError

# Self-reflection phrases: the paper reports how often responses contain them. Matched as whole words,
# case-insensitively, so "wait" does not count inside "awaited".
REFLECTION_PHRASES = ("wait", "double-check", "double check", "re-check", "recheck", "re-evaluate", "reevaluate",
                      "re-examine", "reexamine", "reconsider", "let me check", "let me verify", "let's verify",
                      "check again")
_REFLECTION = re.compile(r"\b(?:" + "|".join(re.escape(p) for p in REFLECTION_PHRASES) + r")\b", re.IGNORECASE)


def reflects(text: str) -> bool:
    return _REFLECTION.search(text) is not None


def revises(text: str) -> bool:
    """A reflection that changes the answer: the last boxed answer before the first reflection
    phrase is not the final one, as the grader reads them (2 and 2.0 are one answer). A policy can
    learn to say "wait" and repeat itself (a reward that pays for reflections invites it); this
    tells that apart from a second look."""
    if _REFLECTION.search(text) is None:
        return False
    before, final = first_answer(text), reward.extract_answer(text)
    return before is not None and final is not None and not reward.accuracy(f"\\boxed{{{final}}}", before)


def first_answer(text: str) -> str | None:
    """The answer a response gave before it first reflected: the last boxed answer before the first
    reflection phrase (the final answer when it has none); None when there is no box before it."""
    m = _REFLECTION.search(text)
    return reward.extract_answer(text if m is None else text[:m.start()])


# ---------------------------------------------------------------------------------------------
# Evaluation and the summary
# ---------------------------------------------------------------------------------------------

def row(rec: data.Record, response: str, n_tokens: int) -> dict:
    """The per-sample result. `answer` is a letter for multiple choice; with `choices` given,
    reward.accuracy also accepts the text of the right option."""
    return {"id": rec.id, "category": rec.category, "question": rec.question, "choices": rec.choices,
            "answer": rec.answer, "response": response, "extracted": reward.extract_answer(response),
            "correct": grade(rec, response), "reflects": reflects(response), "revises": revises(response),
            "first": first_answer(response), "short": rec.meta.get("short"), "len": n_tokens}


_NUMBER = re.compile(r"-?(?:\d+\.?\d*|\.\d+)")


def grade(rec: data.Record, response: str) -> float:
    """reward.accuracy; a record with `precision` in its meta (a MathVista decimal answer) is also
    right when its number, rounded to that many decimals, matches. MathVista's own scorer rounds
    so (normalize_extracted_answer in lupantech/MathVista, evaluation/calculate_score.py): 1.23 is
    right for a gold 1.2 at precision 1. Only an answer with one number is rounded ("1.23 cm" ->
    "1.2 cm"); that scorer's integer rule, int(float(x)), is not followed: it would count 2.9 as 2."""
    right = reward.accuracy(response, rec.answer, rec.choices)
    extracted = reward.extract_answer(response)
    if right or "precision" not in rec.meta or extracted is None or len(_NUMBER.findall(extracted)) != 1:
        return float(right)
    number, digits = _NUMBER.search(extracted)[0], rec.meta["precision"]
    rounded = extracted.replace(number, f"{round(float(number), digits):.{digits}f}", 1)
    return float(reward.accuracy(f"\\boxed{{{rounded}}}", rec.answer, rec.choices))


def evaluate(model, processor, records, max_new_tokens=64, batch_size=32, temperature=0.0, generator=None) -> list[dict]:
    """One response per record (greedy at temperature 0; above it drawn from `generator`), graded;
    rows in the order of `records`. Runs on whatever model it is given and never touches
    torch.distributed: sharding is the caller's."""
    rows = []
    for start in range(0, len(records), batch_size):
        batch = [records[i] for i in range(start, min(start + batch_size, len(records)))]
        out = rollout.sample(model, processor, batch, 1, rollout.Decoding(max_new_tokens, temperature), generator)
        # response_mask counts the stop token of a response that stopped; its length is without it
        lens = (out.response_mask.sum(1).cpu() - (~out.truncated).long()).tolist()
        rows += [row(rec, text, n) for rec, text, n in zip(batch, out.texts, lens)]
    return rows


def _stats(rows) -> dict:
    n = len(rows)
    return {"n": n, "accuracy": round(sum(r["correct"] for r in rows) / n, 4),
            "reflection_rate": round(sum(r["reflects"] for r in rows) / n, 4),
            "mean_len": round(sum(r["len"] for r in rows) / n, 2)}


def summarize(rows, bench: str) -> dict:
    """Overall and per-category n, accuracy, reflection rate and mean length; categories in the
    order they first occur."""
    cats = {}
    for r in rows:
        cats.setdefault(r["category"] or "(none)", []).append(r)
    return {"bench": bench, **_stats(rows), "categories": {c: _stats(rs) for c, rs in cats.items()}}


def toy_metrics(rows: list[dict], trained_tiers: list[str], world: int) -> dict:
    """The trainer's in-loop eval (vlr.run_eval) from this process's rows and those of the others:
    eval_acc is the accuracy on the tiers trained on, eval_acc_<tier> on each tier, eval_reflect the
    share of responses with a self-reflection phrase (`reflects`, as the paper reports), eval_revise
    the share whose reflection changes the answer (`revises`); with a second-look tier among the
    test tiers, those of each tier too (`reflection_by_tier`)."""
    mine = [{k: r[k] for k in ("category", "correct", "reflects", "revises")} | second_look(r) for r in rows]
    rows = [r for part in distributed.gather(mine, world) for r in part]
    trained = [r["correct"] for r in rows if r["category"] in trained_tiers]
    res = {"eval_acc": sum(trained) / len(trained), "eval_reflect": sum(r["reflects"] for r in rows) / len(rows),
           "eval_revise": sum(r["revises"] for r in rows) / len(rows)}
    for cat in sorted({r["category"] for r in rows}):
        hits = [r["correct"] for r in rows if r["category"] == cat]
        res[f"eval_acc_{cat}"] = sum(hits) / len(hits)
    if any(r["short"] is not None for r in rows):  # the default run's metrics stay as they were
        res.update(reflection_by_tier(rows))
    return res


def second_look(row: dict) -> dict:
    """What a response's reflection did (docs/lab.md, "A second look"): `fixed` a revision from a
    wrong first answer to a right final one, `broke` one from right to wrong (`first_answer`), and
    `short_first` whether the first answer was the one a lookup short of the gold (the record's
    meta "short"; None for a record without one)."""
    first = row["first"]
    # graded only where it counts (a revision): the default run's evals grade each answer once
    first_right = row["revises"] and reward.accuracy(f"\\boxed{{{first}}}", row["answer"], row["choices"]) > 0
    short = row["short"]
    return {"fixed": row["revises"] and not first_right and bool(row["correct"]),
            "broke": row["revises"] and first_right and not row["correct"], "short": short,
            "short_first": short is not None and first is not None and first == short}


def reflection_by_tier(rows: list[dict]) -> dict:
    """Per test tier, shares of its responses: eval_reflect_<tier> that reflect, eval_revise_<tier>
    whose reflection changes the answer, eval_fixed_<tier> / eval_broke_<tier> changed from wrong to
    right / right to wrong; on a tier with a one-lookup-short answer, eval_short_first_<tier> whose
    first answer (before the first reflection, or the only one) is that answer."""
    res = {}
    for cat in sorted({r["category"] for r in rows}):
        mine = [r for r in rows if r["category"] == cat]
        for key, name in (("reflects", "reflect"), ("revises", "revise"), ("fixed", "fixed"), ("broke", "broke")):
            res[f"eval_{name}_{cat}"] = sum(r[key] for r in mine) / len(mine)
        if mine[0]["short"] is not None:
            res[f"eval_short_first_{cat}"] = sum(r["short_first"] for r in mine) / len(mine)
    return res


def table(summary: dict) -> str:
    lines = [f"{'bench / category':<36} {'n':>6} {'accuracy':>9} {'reflect':>8} {'mean_len':>9}"]
    entries = [(summary["bench"], summary)] + [("  " + c, s) for c, s in summary["categories"].items()]
    for name, s in entries:
        lines.append(f"{name[:36]:<36} {s['n']:>6} {s['accuracy']:>9.1%} {s['reflection_rate']:>8.1%} "
                     f"{s['mean_len']:>9.1f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The command line (also under torchrun: each process evaluates a shard, rank 0 reports)
# ---------------------------------------------------------------------------------------------

# The published evaluation's response budget: its vLLM sampling takes max_tokens from
# --max_out_tokens, default 2048, which its eval script does not set (experience_maker.py).
PUBLISHED_MAX_NEW_TOKENS = 2048
TOY_MAX_NEW_TOKENS = 48  # vlr.py's default: the budget the toy runs train with


def parser() -> argparse.ArgumentParser:
    p = distributed.once_per_run(argparse.ArgumentParser(description=__doc__,
                                                         formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("--model", default="tiny",
                   help="'tiny' (the warm-started tiny base), 'smoke-3b-<n>l', a folder or a hub id")
    p.add_argument("--bench", required=True, choices=["toy", *benchmarks.ADAPTERS],
                   help="toy (its 300 test questions), or a benchmark on the split of the paper's table: mathvista "
                        "(testmini), mathverse (testmini), mathvision (test, all 3,040), mmmu-pro (standard, "
                        "10 options), mmmu-pro-vision (vision)")
    p.add_argument("--data", help="the benchmark's file as published (.parquet, .jsonl or .json), e.g. "
                                  "AI4Math/MathVista's testmini parquet; not for toy. Without it, the published "
                                  "split from the hub, downloaded into its cache on first use (docs/data.md)")
    p.add_argument("--limit", type=int, help="only the first N records")
    p.add_argument("--out", help="per-sample .jsonl (default runs/eval-BENCH-MODEL.jsonl)")
    p.add_argument("--max-new-tokens", type=int,
                   help=f"response budget (default {TOY_MAX_NEW_TOKENS} on toy, as its runs train; "
                        f"{PUBLISHED_MAX_NEW_TOKENS} on a benchmark, as the published evaluation)")
    p.add_argument("--min-pixels", type=int, default=0,
                   help="smallest image in pixels (0: the model's own; for a hub model the published 256*28*28)")
    p.add_argument("--max-pixels", type=int, default=0,
                   help="largest image in pixels (0: the model's own; for a hub model the published 1280*28*28)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy, as the paper evaluates")
    p.add_argument("--seed", type=int, default=0,
                   help="above --temperature 0, what the responses are drawn from (each process its own stream, as vlr.py's)")
    p.add_argument("--report-to", default="none",
                   help="also send the summary and the first --log-samples responses to tensorboard (into OUT without "
                        ".jsonl, /tb), wandb or trackio (comma-separated), as step 0 of a run named after --out's file")
    p.add_argument("--log-samples", type=int, default=4, help="responses sent to --report-to's loggers")
    return p


def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    if args.log_samples < 0:
        p.error("--log-samples must be 0 or more")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        p.error("--max-new-tokens must be at least 1")
    if args.limit is not None and args.limit < 1 or args.batch_size < 1:
        p.error("--limit and --batch-size must be at least 1")
    if args.temperature < 0:
        p.error("--temperature must be 0 (greedy) or more")
    if min(args.min_pixels, args.max_pixels) < 0 or 0 < args.max_pixels < args.min_pixels:
        p.error("--min-pixels and --max-pixels must be positive (0: default), min at most max")
    if args.data and args.bench == "toy":
        p.error("--data is a benchmark's file; --bench toy reads the toy task's own test split")
    if args.max_new_tokens is None:
        args.max_new_tokens = TOY_MAX_NEW_TOKENS if args.bench == "toy" else PUBLISHED_MAX_NEW_TOKENS
    loggers = tracking.kinds(args.report_to)  # one not installed: said before the model loads
    models.check(args.model)
    out = output_file(args.out, args.bench, args.model)
    records = benchmarks.load_bench(args.bench, args.data)[:args.limit]  # bad data: said before a model loads
    rows = run(args, records)
    if rows is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.replace_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    summary = summarize(rows, args.bench)
    print(f"{args.bench}: {args.model}, {len(rows)} records, per-sample results in {out}")
    print(table(summary))
    print(json.dumps(summary))
    if loggers:
        tracking.log_once(loggers, out.with_suffix(""), vars(args), logged_values(summary),
                          tracking.eval_samples(rows, args.log_samples, 0))


def output_file(out: str | None, bench: str, model: str) -> Path:
    """--out, by default runs/eval-BENCH-MODEL.jsonl (a second model's evaluation does not replace
    the first's), checked before the model loads: hours of evaluation are not lost to a path that
    cannot be written at the end. Written whole or not at all (checkpoint.replace_text)."""
    path = Path(out or f"runs/eval-{bench}-{re.sub(r'[^A-Za-z0-9_.]+', '-', model).strip('-.')}.jsonl")
    if path.is_dir():
        raise distributed.UserError(f"--out {path}: is a folder; give the file to write (.jsonl)")
    if why := checkpoint.cannot_write(path.parent):
        raise distributed.UserError(f"--out {path}: cannot create the folder {path.parent} ({why})")
    return path


def logged_values(summary: dict) -> dict:
    """`summarize`'s numbers as logger tags: <bench>/accuracy, <bench>/<category>/accuracy, ..."""
    b, keys = summary["bench"], ("accuracy", "reflection_rate", "mean_len")
    return {**{f"{b}/{k}": summary[k] for k in keys},
            **{f"{b}/{c}/{k}": s[k] for c, s in summary["categories"].items() for k in keys}}


def run(args, records) -> list[dict] | None:
    """Every process evaluates its shard; rank 0 gets all rows in file order, the others None."""
    models.resolve(args.model)  # a built model is built before the processes meet (vlr.setup says why)
    rank, world, device = distributed.setup_distributed()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, processor = models.load_model(args.model, device, dtype, args.min_pixels, args.max_pixels)
    gen = torch.Generator(device).manual_seed(args.seed * 1000 + rank)  # vlr.setup's streams
    rows = evaluate(model, processor, records[rank::world], args.max_new_tokens, args.batch_size, args.temperature, gen)
    if world > 1:
        parts = [None] * world if rank == 0 else None
        dist.gather_object(rows, parts, dst=0)
        if rank == 0:  # shard r holds records r, r + world, ...: interleave back into file order
            rows = [None] * len(records)
            for r, part in enumerate(parts):
                rows[r::world] = part
        dist.destroy_process_group()
    return rows if rank == 0 else None


if __name__ == "__main__":
    try:
        main()
    except (DataError, distributed.UserError) as e:  # bad input: which file, record or flag, said once
        distributed.exit_once(str(e))
