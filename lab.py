"""The teaching lab: the paper's ablation (Table 4) in miniature, on the toy task and the tiny model.

    python lab.py                          # 4 configurations x 3 seeds, about 30 minutes on 2 CPU cores
    python lab.py --seeds 0 1 --steps 200
    python lab.py --out runs/lab-mb1 -- --minibatches 1    # flags after -- go to every vlr.py run
    python lab.py --compare runs/ex/base runs/ex/alpha0 --out runs/ex/alpha0.png   # any runs: table, plot
    python lab.py --compare runs/ex/base runs/ex/alpha0 --samples   # and their last eval's answers side by side
    python lab.py --preset lora --out runs/lab-lora   # low-rank adapters against full fine-tuning
    python lab.py --preset second-look --arms grpo+ssr grpo+ssr+rethink --out runs/lab-look   # a second look

GRPO, GRPO + Selective Sample Replay, GRPO + SSR + Forced Rethinking, and the published recipe:
each is a `vlr.py` run with the lab's settings (LAB) and its own switches, in
runs/lab/<config>-s<seed>. Two runs go at a time, one CPU thread each (on 2 cores that is faster
than one run on two threads). A finished run of the same flags (its config.json) is not run
again, so an interrupted lab continues where it stopped; one of other flags (another preset,
--steps, flags after --) is run again. Then the seeds are pooled into a table (runs/lab/table.md)
and every run is plotted (runs/lab/lab.png); `--compare` does the same for any run folders
written by vlr.py.
"""
import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt

import checkpoint
import vlr
from data import DataError
from distributed import UserError

# Every run trains on ViRL39K's shape (docs/lab.md, "The regime"): one question in three is the colour
# tier, which the model learns, and two in three the 'unseen' tier, which no sample ever gets right,
# so most groups have vanishing advantages from the first step on (Section 3.1). Eight optimizer
# steps a rollout, as published (docs/differences.md): at one, the colours take ~150 steps.
LAB = ["--toy-tiers", "colour,unseen,unseen", "--minibatches", "8", "--eval-every", "10"]
CONFIGS = {  # name -> the vlr.py switches
    "grpo": ["--no-ssr", "--no-rethink"],
    "grpo+ssr": ["--no-rethink"],
    # Forced Rethinking as the paper means it, a policy that comes to rethink unprompted: the
    # trigger is trained (as published; the default masks it, and the policy never says "wait"),
    # and a right answer with one or two reflections earns the published bonus. Without the bonus
    # the toy policy drops its reflections once it is right (README, section 3).
    "grpo+ssr+rethink": ["--rethink-train-trigger", "--reflection-bonus", "0.1", "--wait-penalty", "0.2"],
    # The published keep rule wants continuations over 30 tokens: a toy answer is ~16, so it would
    # keep none. Scaled to the toy, every length is allowed.
    "published": ["--recipe", "published", "--rethink-min-new-tokens", "0"],
}


# "LoRA Without Regret" on the tiny model (docs/lab.md, "Low-rank adapters"): the default run's task,
# adapters of rank 1 and 8 against full fine-tuning of the same layers (the language model), each
# at the learning rate that did best in a sweep over 5e-4, 2e-3 and 8e-3 (seed 0, 100 steps).
LORA_LAB = ["--eval-every", "10"]
LORA_CONFIGS = {
    "full": ["--freeze-vision", "--lr", "5e-4"],
    "lora-r1": ["--lora-rank", "1", "--lr", "2e-3"],
    "lora-r8": ["--lora-rank", "8", "--lr", "2e-3"],
}
# The paper's second claim (docs/lab.md, "A second look"): the same arms on the second-look tiers
# (toy.SECOND_LOOK), where the code of the code takes one lookup more than a pass has, with the
# variant of the tiny model whose warm start primes the form "Wait, ... <first answer> > ...".
# Forced Rethinking keeps the first answer (no cut before it: --rethink-cut-prob 0), so that a
# continuation can start from it, and a rethought response gets the room it needs (64 tokens).
# Measured: on the tiny model no arm leaves chance (it cannot read the code table); the preset is
# there for a base that can, e.g. `-- --model <folder>`.
SECOND_LOOK_LAB = ["--model", "tiny-second-look", "--toy-tiers", "code,code2", "--minibatches", "8",
                   "--eval-every", "10", "--max-new-tokens", "64", "--rethink-cut-prob", "0"]
PRESETS = {"ablation": (LAB, CONFIGS), "lora": (LORA_LAB, LORA_CONFIGS), "second-look": (SECOND_LOOK_LAB, CONFIGS)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--out", help="the lab's folder (default runs/lab); with --compare, the plot (default compare.png)")
    p.add_argument("--parallel", type=int, default=2, help="runs at a time, one thread each")
    p.add_argument("--preset", choices=PRESETS, default="ablation",
                   help="which lab: the paper's ablation, low-rank adapters against full fine-tuning, or the "
                        "ablation on questions where a second look pays")
    p.add_argument("--arms", nargs="+", metavar="ARM", help="only these arms of the preset (default: all)")
    p.add_argument("--compare", nargs="+", metavar="RUN_DIR",
                   help="no lab: the table and the plot of these runs (NAME-s<seed> folders pool as NAME)")
    p.add_argument("--samples", action="store_true",
                   help="with --compare: also each run's responses to the questions of its last eval, side by side")
    p.add_argument("vlr_args", nargs="*", help="after --: more vlr.py flags, the same for every run")
    args = p.parse_args(argv)
    if args.parallel < 1:
        p.error(f"--parallel {args.parallel}: give how many runs go at a time (at least 1)")
    if args.compare:
        print(compare_table(args.compare))
        if args.samples:
            print(side_by_side(args.compare))
        print(f"wrote {plot(args.compare, args.out or 'compare.png')}")
        return
    out = Path(args.out or "runs/lab").resolve()  # the runs are launched from this file's folder
    settings, configs = PRESETS[args.preset]
    unknown = sorted(set(args.arms or []) - set(configs))
    if unknown:
        p.error(f"--arms: no arm {', '.join(unknown)} in the preset {args.preset} (it has {', '.join(configs)})")
    configs = {name: configs[name] for name in args.arms or configs}
    seeds = list(dict.fromkeys(args.seeds))  # a seed twice would be two runs into one folder at once
    dirs = run_lab(out, settings, configs, seeds, args.steps, args.parallel, args.vlr_args)
    table = compare_table(dirs)
    if args.preset == "second-look":
        table += "\n\n" + second_look_table(dirs)
    (out / "table.md").write_text(table + "\n")
    print(table)
    panels = SECOND_LOOK_PLOTTED if args.preset == "second-look" else PLOTTED
    print(f"wrote {out / 'table.md'} and {plot(dirs, str(out / 'lab.png'), panels)}")


def run_lab(out: Path, settings: list, configs: dict, seeds: list, steps: int, parallel: int,
            vlr_args: list) -> list[str]:
    """Every configuration x seed as a vlr.py run (`settings`, then the configuration's switches,
    then `vlr_args`), `parallel` at a time; their folders."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    running = []
    for name, seed in [(name, seed) for seed in seeds for name in configs]:
        run_dir = out / f"{name}-s{seed}"
        flags = [*settings, *configs[name], "--seed", str(seed), "--steps", str(steps), "--out", str(run_dir),
                 "--overwrite", *vlr_args]
        if finished_with(run_dir, flags):
            print(f"{run_dir}: done before with these flags, kept")
            continue
        # unfinished (killed, or collapsed), or of other flags: run again afresh
        print(" ".join(["vlr.py", *flags]), flush=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        log = open(run_dir / "log.txt", "w")
        running.append((subprocess.Popen([sys.executable, "vlr.py", *flags], env=env, stdout=log,
                                         stderr=subprocess.STDOUT, cwd=Path(__file__).parent), run_dir))
        while len(running) == parallel:  # a slot is free once any run ends, not only the oldest
            ended = [job for job in running if job[0].poll() is not None]
            for job in ended:
                running.remove(job)
                wait(job)
            time.sleep(0 if ended else 1)
    for job in running:
        wait(job)
    return [str(out / f"{name}-s{seed}") for name in configs for seed in seeds]


# what may differ between two launches of one lab run: where it is, and how it was started
LAUNCH = {"out", "overwrite", "resume", "auto_resume"}


def finished_with(run_dir: Path, flags: list[str]) -> bool:
    """Whether `run_dir` holds a finished run of these vlr.py flags (its config.json, field by field)."""
    if not (run_dir / "final" / "model.safetensors").exists() or not (run_dir / "config.json").is_file():
        return False
    saved = json.loads((run_dir / "config.json").read_text())
    wanted = asdict(vlr.parse_args(flags))
    return {k: v for k, v in saved.items() if k not in LAUNCH} == {k: v for k, v in wanted.items() if k not in LAUNCH}


def wait(job):
    proc, run_dir = job
    if proc.wait() != 0:  # a collapsed run stops with an error: it stays in the table as it ended
        print(f"{run_dir}: exit {proc.returncode}, see {run_dir}/log.txt", flush=True)


# ---------------------------------------------------------------------------------------------
# The table and the plot of runs (also of runs outside the lab: --compare)
# ---------------------------------------------------------------------------------------------

# (metric, title, shares from 0 to 1?). Response length is there because a policy can drift into
# filler (responses that grow while the reward stays flat) with every other panel looking calm.
PLOTTED = (("reward_mean", "mean reward", False), ("zero_adv_frac", "zero-advantage share of groups", True),
           ("eval_acc", "eval accuracy (greedy)", True), ("eval_reflect", "eval reflection rate (no trigger)", True),
           ("resp_len_mean", "mean response length (tokens)", False))


# The second-look lab's panels: the tier where a second look pays, and what the reflections on it do.
SECOND_LOOK_PLOTTED = (("reward_mean", "mean reward", False), ("eval_acc_code2", "eval accuracy, code2 (greedy)", True),
                       ("eval_acc_code", "eval accuracy, code (greedy)", True),
                       ("eval_revise_code2", "code2: revision rate (no trigger)", True),
                       ("eval_fixed_code2", "code2: revised wrong -> right", True))


def read_metrics(run_dir: str) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"{path}: file not found (expected a run folder written by vlr.py)")
    rows = checkpoint.records(path)  # as vlr reads it: a last line still being written, or cut by a kill, is left out
    for i, m in enumerate(rows, 1):
        missing = [k for k in ("step", "reward_mean", "zero_adv_frac") if not isinstance(m, dict) or k not in m]
        if missing:
            raise DataError(f"{path}:{i}: missing {', '.join(missing)} (expected step, reward_mean, zero_adv_frac)")
    if not rows:
        raise DataError(f"{path}: no metrics")
    return rows


def _run_names(run_dirs: list[str]) -> dict[str, str]:
    """Each run's row: runs/lab/ssr-s2 -> ssr, the seeds of one configuration pooled. Runs from
    more than one folder keep their folder's name (runs/lab-g16/ssr-s0 -> lab-g16/ssr): two labs'
    arms of one name are two rows."""
    parents = {Path(d).resolve().parent for d in run_dirs}
    return {d: (f"{Path(d).resolve().parent.name}/" if len(parents) > 1 else "") + re.sub(r"-s\d+$", "", Path(d).name)
            for d in run_dirs}


def _mean_std(xs: list) -> str:
    if not xs:
        return "-"
    mean = sum(xs) / len(xs)
    if len(xs) == 1:  # one seed: no spread to show, not a spread of 0
        return f"{mean:.3f}"
    std = (sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5
    return f"{mean:.3f} ± {std:.3f}"


def compare_table(run_dirs: list[str], target: float = 0.8) -> str:
    """A markdown table of runs, seeds pooled: folders named NAME-s<seed> are one row, NAME.

    Per row: final eval accuracy (mean ± sample std over seeds), the share of zero-advantage groups
    over all steps, the share of steps on which SSR replayed a sample of an earlier step, the first
    eval step at which eval accuracy reached `target` (mean over the seeds that reached it, and how
    many did), the reflection rate and the revision rate (a reflection that changes the answer) of
    the last eval, and rethink_fixed (the share of triggered responses whose first answer was wrong
    and continuation right, kept or not), averaged over steps; a column that only evals give (final
    accuracy, reflection, revision) says how many of the seeds had one when not all did."""
    groups, names = {}, _run_names(run_dirs)
    for d in run_dirs:
        groups.setdefault(names[d], []).append(read_metrics(d))
    lines = [f"| run | seeds | final eval acc | zero-adv share | steps replaying | steps to {target:.1f} "
             "| reflection rate | revision rate | rethink_fixed |", "| --- " * 9 + "|"]
    for name, runs in groups.items():
        evals = [[m for m in rows if "eval_acc" in m] for rows in runs]
        final = [e[-1]["eval_acc"] for e in evals if e]
        reached = [next((m["step"] + 1 for m in e if m["eval_acc"] >= target), None) for e in evals]
        hit = [r for r in reached if r is not None]
        steps = f"{sum(hit) / len(hit):.0f} ({len(hit)}/{len(runs)})" if hit else f"never (0/{len(runs)})"
        zero = [sum(m["zero_adv_frac"] for m in rows) / len(rows) for rows in runs]
        replaying = [sum(m.get("ssr_replayed", 0) > 0 for m in rows) / len(rows) for rows in runs]
        reflect = [e[-1]["eval_reflect"] for e in evals if e and "eval_reflect" in e[-1]]
        revise = [e[-1]["eval_revise"] for e in evals if e and "eval_revise" in e[-1]]
        fixed = [sum(m.get("rethink_fixed", 0.0) for m in rows) / len(rows) for rows in runs]
        some = {k: _mean_std(v) + (f" ({len(v)}/{len(runs)})" if 0 < len(v) < len(runs) else "")
                for k, v in (("final", final), ("reflect", reflect), ("revise", revise))}
        lines.append(f"| {name} | {len(runs)} | {some['final']} | {_mean_std(zero)} | {_mean_std(replaying)} | "
                     f"{steps} | {some['reflect']} | {some['revise']} | {_mean_std(fixed)} |")
    return "\n".join(lines)


def side_by_side(run_dirs: list[str]) -> str:
    """The greedy responses of each run's last eval (its samples.jsonl), question by question: the
    question and its gold once, then a line a run, its response on one line."""
    by_question = {}
    for d in run_dirs:
        path = Path(d) / "samples.jsonl"
        shown = [s for s in checkpoint.records(path) if s.get("kind") == "eval"] if path.is_file() else []
        last = [s for s in shown if s["step"] == shown[-1]["step"]] if shown else []
        for s in last:
            entry = by_question.setdefault(s["id"], {"question": s["question"], "gold": s["gold"], "runs": []})
            mark = ("right" if s["correct"] else "wrong") + (", reflects" if s["reflects"] else "")
            entry["runs"].append(f"  {d} (step {s['step'] + 1}, {mark}): " + " ⏎ ".join(s["response"].splitlines()))
    if not by_question:
        return "no samples.jsonl with eval samples in these runs"
    return "\n\n".join(f"{qid}: {q['question']!r}, gold {q['gold']!r}\n" + "\n".join(q["runs"])
                       for qid, q in by_question.items())


def second_look_table(run_dirs: list[str]) -> str:
    """A markdown table of the second-look lab, seeds pooled as in `compare_table`: per arm, the
    last eval's greedy accuracy on each second-look tier and on the colour tier, and on code2 the
    shares of responses that reflect, revise, revise wrong -> right and right -> wrong, and whose
    first answer was the code (one lookup short); then the per-seed code2 accuracies."""
    groups, names = {}, _run_names(run_dirs)
    for d in run_dirs:
        groups.setdefault(names[d], []).append([m for m in read_metrics(d) if "eval_acc" in m])
    keys = ("eval_acc_code2", "eval_acc_code", "eval_acc_colour", "eval_reflect_code2", "eval_revise_code2",
            "eval_fixed_code2", "eval_broke_code2", "eval_short_first_code2")
    lines = ["| run | seeds | code2 acc | code acc | colour acc | code2 reflect | code2 revise | wrong -> right "
             "| right -> wrong | first answer the code | code2 acc per seed |", "| --- " * 11 + "|"]
    for name, evals in groups.items():
        last = [e[-1] for e in evals if e]
        cells = [_mean_std([m[k] for m in last if k in m]) for k in keys]
        seeds = ", ".join(f"{m['eval_acc_code2']:.2f}" for m in last if "eval_acc_code2" in m) or "-"
        lines.append(f"| {name} | {len(evals)} | " + " | ".join(cells) + f" | {seeds} |")
    return "\n".join(lines)


def plot(run_dirs: list[str], out: str, panels=PLOTTED) -> str:
    """One panel per metric of `panels`, one colour per run: the raw curve faint, its running average
    solid (rewards of a few prompts per step are noisy); the eval metrics are sparse, so as points."""
    runs = {d: read_metrics(d) for d in run_dirs}
    matplotlib.use("Agg")  # files only, no display
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8))
    row = _run_names(run_dirs)
    names = list(dict.fromkeys(row[d] for d in runs))  # seeds of one run share a colour
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"] * 10
    labelled = set()
    for d, rows in runs.items():
        colour, name = palette[names.index(row[d])], row[d]
        label = None if name in labelled else name
        labelled.add(name)
        for ax, (key, _, _) in zip(axes, panels):
            pts = [(m["step"] + 1, m[key]) for m in rows if m.get(key) is not None]  # counted from 1, as the table
            if not pts:
                continue
            steps, vals = zip(*pts)
            if key.startswith("eval_"):
                ax.plot(steps, vals, "o-", color=colour, label=label)
                continue
            ax.plot(steps, vals, color=colour, alpha=0.25, linewidth=0.8)
            ax.plot(steps, list(itertools.accumulate(vals, lambda avg, v: 0.9 * avg + 0.1 * v)), color=colour,
                    label=label)
    for ax, (_, title, share) in zip(axes, panels):
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


if __name__ == "__main__":
    try:
        main()
    except (DataError, UserError) as e:  # a run folder without a readable metrics.jsonl
        raise SystemExit(str(e))
