"""The teaching lab: the paper's ablation (Table 4) in miniature, on the toy task and the tiny model.

    python lab.py                          # 3 configurations x 3 seeds, about 35 minutes on 2 CPU cores
    python lab.py --seeds 0 1 --steps 300
    python lab.py --out runs/lab-cap32 -- --max-new-tokens 32    # flags after -- go to every vlr.py run

GRPO, GRPO + Selective Sample Replay, GRPO + SSR + Forced Rethinking: each is a `vlr.py` run with
the same settings but for the switches, in runs/lab/<config>-s<seed>. Two runs go at a time, one
CPU thread each (on 2 cores that is faster than one run on two threads). A finished run is not
run again, so an interrupted lab continues where it stopped. Then `eval.py --compare` pools the
seeds into a table (runs/lab/table.md) and plots every run (runs/lab/lab.png).
"""
import argparse
import os
import subprocess
import sys
from pathlib import Path

import eval as evaluation

CONFIGS = {  # name -> the vlr.py switches (everything else is the default toy run)
    "grpo": ["--no-ssr", "--no-rethink"],
    "grpo+ssr": ["--no-rethink"],
    "grpo+ssr+rethink": [],
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--out", default="runs/lab")
    p.add_argument("--parallel", type=int, default=2, help="runs at a time, one thread each")
    p.add_argument("vlr_args", nargs="*", help="after --: more vlr.py flags, the same for every run")
    args = p.parse_args(argv)
    out = Path(args.out)
    jobs = [(name, seed) for seed in args.seeds for name in CONFIGS]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    running = []
    for name, seed in jobs:
        run_dir = out / f"{name}-s{seed}"
        if (run_dir / "final" / "model.safetensors").exists():
            print(f"{run_dir}: done before, kept")
            continue
        cmd = [sys.executable, "vlr.py", *CONFIGS[name], "--seed", str(seed), "--steps", str(args.steps),
               "--out", str(run_dir), *args.vlr_args]
        print(" ".join(cmd[1:]), flush=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        log = open(run_dir / "log.txt", "w")
        running.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         cwd=Path(__file__).parent), run_dir))
        if len(running) == args.parallel:
            wait(running.pop(0))
    for job in running:
        wait(job)
    dirs = [str(out / f"{name}-s{seed}") for name in CONFIGS for seed in args.seeds]
    table = evaluation.compare_table(dirs)
    (out / "table.md").write_text(table + "\n")
    print(table)
    print(f"wrote {out / 'table.md'} and {evaluation.plot(dirs, str(out / 'lab.png'))}")


def wait(job):
    proc, run_dir = job
    if proc.wait() != 0:  # a collapsed run stops with an error: it stays in the table as it ended
        print(f"{run_dir}: exit {proc.returncode}, see {run_dir}/log.txt", flush=True)


if __name__ == "__main__":
    main()
