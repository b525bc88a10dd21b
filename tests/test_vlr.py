"""vlr.py: the trainer end to end (kill and resume, the ablation switches; DDP and --shard on gloo:
test_shard.py), its flags, the prompt order, and docs/differences.md's table against the published recipe."""
import hashlib
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, fields
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import checkpoint
import grpo
import procs
import reward
import test_refusals
import vlr

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------
# The trainer, end to end (small: 4 prompts x 4 responses, 24 tokens)
# ---------------------------------------------------------------------------------------------

SMALL = ["--prompts-per-step", "4", "--group-size", "4", "--max-new-tokens", "24", "--eval-every", "0",
         "--micro-batch", "8", "--save-every", "2"]
TIMINGS = {"step_s", "tokens_per_s"}


def run(args, out, env=None, **kw):
    """vlr.py at SMALL's sizes; `env`: variables added to this process's."""
    return procs.run([sys.executable, "vlr.py", *SMALL, "--out", str(out), *args], 600, cwd=ROOT,
                     env=dict(os.environ, **env) if env else None, **kw)


def metrics(out):
    return [{k: v for k, v in json.loads(l).items() if k not in TIMINGS}
            for l in (out / "metrics.jsonl").read_text().splitlines()]


def test_kill_and_resume_reproduces_the_uninterrupted_run(tmp_path):
    steps = ["--steps", "6"]
    a = run(steps, tmp_path / "a")
    assert a.returncode == 0, a.stderr[-2000:]
    b = tmp_path / "b"
    proc = procs.start([sys.executable, "vlr.py", *SMALL, "--out", str(b), *steps], cwd=ROOT,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:  # kill it after step 4 started: the checkpoint holds step 4
        if (b / "metrics.jsonl").exists() and len((b / "metrics.jsonl").read_text().splitlines()) >= 5:
            break
        time.sleep(0.05)
    procs.stop(proc)
    assert len(metrics(b)) < 6, "killed too late to test anything"
    resumed = run(steps + ["--resume"], b)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert metrics(b) == metrics(tmp_path / "a")
    assert (b / "final" / "model.safetensors").exists()
    ma = metrics(tmp_path / "a")  # each step logs the rate its update used: 5e-4, warmed up over 10 steps
    assert [m["lr"] for m in ma] == pytest.approx([5e-4 * (s + 1) / 10 for s in range(6)])
    # SSR and rethinking ran: the buffer holds half a batch (16 rows), and some responses were given a trigger
    assert max(m["ssr_buffer"] for m in ma) == 8 and sum(m["rethink_triggered"] for m in ma) > 0
    # the samples shown (tracking.py) cut back and written again alike; TensorBoard's events hold each step once
    assert (b / "samples.jsonl").read_text() == (tmp_path / "a" / "samples.jsonl").read_text()
    check_events(b)


def test_a_resumed_run_stops_at_the_same_format_collapse(tmp_path):
    """3 new tokens hold no \\boxed{} answer: every step counts towards the collapse guard, which
    stops the run at step 3 (--collapse-patience 4). Preempted after step 1 (checkpoint 2) and
    resumed, it must stop there too, not count afresh from 2 and stop at step 5."""
    flags = ["--steps", "6", "--max-new-tokens", "3", "--collapse-patience", "4"]
    collapse = "step 3: format collapse: fewer than 20% of responses had a \\boxed{} answer for 4 steps"
    b = tmp_path / "b"
    with ThreadPoolExecutor(2) as pool:
        a, preempted = pool.map(lambda case: run(flags, *case), ((tmp_path / "a", {}),
                                                                 (b, {"VLR_FAULT": "SIGUSR1 step=1"})))
    assert a.returncode == 1 and collapse in a.stderr, a.stderr[-2000:]
    assert preempted.returncode == 0 and len(metrics(b)) == 2, preempted.stderr[-2000:]
    resumed = run(flags + ["--resume"], b)
    assert resumed.returncode == 1 and collapse in resumed.stderr, resumed.stderr[-2000:]
    assert metrics(b) == metrics(tmp_path / "a")


def check_events(out):
    """Every number of metrics.jsonl is in the run's TensorBoard events, read by TensorBoard's own
    reader, at its step and once (float32), eval_* under eval/, the rest under train/; the samples
    shown at each eval as text at its step."""
    acc = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    keys = {k for m in lines for k in m} - {"step"}
    assert set(acc.Tags()["scalars"]) == {("eval/" if k.startswith("eval_") else "train/") + k for k in keys}
    for k in keys:
        events = acc.Scalars(("eval/" if k.startswith("eval_") else "train/") + k)
        assert [e.step for e in events] == [m["step"] for m in lines if k in m], k
        assert [e.value for e in events] == pytest.approx([float(m[k]) for m in lines if k in m], rel=1e-6), k
    evals = acc.Tensors("samples/eval/text_summary")
    assert [e.step for e in evals] == [m["step"] for m in lines if "eval_acc" in m]


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in folder.rglob("*") if p.is_file()}


def test_a_finished_run_is_never_overwritten_by_accident(tmp_path):
    """A second run into its folder is refused (single process and under torchrun), as is a resume
    with another configuration, each in one sentence, and the folder is left byte for byte;
    --overwrite starts afresh."""
    first = run(["--steps", "2"], tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    before = snapshot(tmp_path)
    assert {"metrics.jsonl", "config.json", "ckpt/train_state.pt", "final/model.safetensors"} <= set(before)
    again = [*SMALL, "--steps", "1", "--out", str(tmp_path)]
    other = [*SMALL, "--steps", "4", "--resume", "--lr", "0.5", "--out", str(tmp_path)]
    with ThreadPoolExecutor(2) as pool:  # each refusal is a Python start-up
        *said, resumed = pool.map(lambda case: test_refusals.refused("vlr.py", *case),
                                  [(again, False), (again, True), (other, False)])
    for line in said:
        assert "\n" not in line and str(tmp_path) in line
        assert all(flag in line for flag in ("--resume", "--out", "--overwrite")), line
    assert "\n" not in resumed and f"lr: saved {vlr.Config.lr!r}, now 0.5" in resumed
    assert "steps: saved 2, now 4" in resumed
    assert snapshot(tmp_path) == before
    again = run(["--steps", "1", "--overwrite"], tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    state = torch.load(tmp_path / "ckpt" / "train_state.pt", weights_only=True)
    assert len(metrics(tmp_path)) == 1 and state["step"] == 1
    check_events(tmp_path)  # the old run's events and samples went with it
    assert {json.loads(line)["step"] for line in (tmp_path / "samples.jsonl").read_text().splitlines()} == {0}
    for name in ("samples.jsonl", "tb"):  # what tracking.py writes also says that a folder holds a run
        (tmp_path / "x").mkdir(exist_ok=True)
        (tmp_path / "x" / name).touch()
        with pytest.raises(checkpoint.UserError, match=f"holds a run \\({name}\\)"):
            checkpoint.check_run_folder(tmp_path / "x", {}, resume=False, overwrite=False)
        (tmp_path / "x" / name).unlink()


def test_a_resume_names_a_flag_the_saved_run_did_not_have(tmp_path):
    """A run saved before a flag existed: its default may not be what that run did, so the resume
    is refused, and the sentence says the flag is newer rather than that it was saved as None."""
    config = asdict(vlr.Config(out=str(tmp_path)))
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "top_k"}))
    with pytest.raises(checkpoint.UserError, match=r"top_k: not saved \(a flag newer than the run\), now 0$"):
        checkpoint.check_run_folder(tmp_path, config, resume=True, overwrite=False)


def test_ablation_switches(tmp_path):
    plain = run(["--steps", "2", "--no-ssr", "--no-rethink"], tmp_path / "plain")
    assert plain.returncode == 0, plain.stderr[-2000:]
    for m in metrics(tmp_path / "plain"):
        assert m["ssr_buffer"] == 0 and m["ssr_replayed"] == 0 and m["rethink_triggered"] == 0
        assert m["logp_drift_max"] < 1e-4


def test_bf16_computes_under_autocast_and_keeps_fp32_master_weights(tmp_path):
    """The README's real runs use --bf16; here on the tiny model, where bf16 is cheap on any CPU."""
    res = run(["--steps", "1", "--bf16"], tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    (m,) = metrics(tmp_path)
    assert 0 < m["logp_drift_max"] < 0.1 and m["skipped"] == 0  # bf16 rounding shows, and stays small
    weights = load_file(tmp_path / "final" / "model.safetensors")
    assert {w.dtype for w in weights.values()} == {torch.float32}


def test_help_names_every_flag_with_its_text_and_config_json_records_every_field(tmp_path, capsys):
    with pytest.raises(SystemExit):
        vlr.parse_args(["--help"])
    out = capsys.readouterr().out
    text, squeezed = " ".join(out.split()), "".join(out.split())  # argparse wraps lines, also at hyphens
    for f in fields(vlr.Config):
        flag = ("--no-" if f.default is True else "--") + f.name.replace("_", "-")
        assert flag in text, flag
        assert "".join(f.metadata["help"].split()) in squeezed, f.name
    cfg = vlr.parse_args(["--rethink-max-waits", "4", "--no-rethink-only-wrong", "--top-k", "40"])
    assert (cfg.rethink_max_waits, cfg.rethink_only_wrong, cfg.top_k) == (4, False, 40)
    rc = vlr.rethink_config(cfg)
    assert (rc.max_waits, rc.only_wrong, rc.max_group_acc, rc.cut_prob) == (4, False, 0.6, 0.5)
    checkpoint.open_log(tmp_path, asdict(cfg), 0, cfg.overwrite).close()
    assert json.loads((tmp_path / "config.json").read_text()) == {f.name: getattr(cfg, f.name) for f in fields(cfg)}


def test_every_flag_of_vlr_and_eval_reaches_the_script_under_torchrun():
    """torchrun's own parser reads every option on its command line, the script's too: a flag that
    abbreviates one of its options is refused there ("--log": --log-dir or --logs-specs?) or taken."""
    import eval as evaluation
    from torch.distributed import run as torchrun
    flags = [("--no-" if f.default is True else "--") + f.name.replace("_", "-") for f in fields(vlr.Config)]
    flags += [o for o in evaluation.parser()._option_string_actions if o.startswith("--") and o != "--help"]
    for flag in flags:
        args = torchrun.parse_args(["--nproc_per_node", "2", "vlr.py", flag, "1"])
        assert args.training_script_args == [flag, "1"], flag


def test_recipe_published_sets_its_values_and_flags_given_still_win():
    cfg = vlr.parse_args(["--recipe", "published", "--top-k", "20"])
    for name, value in vlr.RECIPES["published"].items():
        assert getattr(cfg, name) == (20 if name == "top_k" else value), name
    assert vlr.parse_args([]).minibatches == 1
    with pytest.raises(SystemExit):
        vlr.parse_args(["--recipe", "nonsense"])
    # every switch the recipe moves can be moved back, each way: --x and --no-x
    switches = [name for name, value in vlr.RECIPES["published"].items() if isinstance(value, bool)]
    assert {"adv_std", "rethink_train_trigger", "rethink_count_markers"} <= set(switches)
    for name in switches:
        value = vlr.RECIPES["published"][name]
        flag = "--" + ("" if value else "no-") + name.replace("_", "-")
        back = "--" + ("no-" if value else "") + name.replace("_", "-")
        assert getattr(vlr.parse_args(["--recipe", "published", back]), name) is (not value), back
        assert getattr(vlr.parse_args([flag]), name) is value, flag


def differences_table():
    """docs/differences.md's table: {flag: (published, ours)} from its `--flag` rows."""
    lines = (ROOT / "docs" / "differences.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| setting |")) + 2
    rows = {}
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[1].startswith("`--"):
            rows[cells[1].strip("`")] = (cells[2].strip("`"), cells[3].strip("`"))
    return rows


def test_the_differences_table_matches_the_flags_real_defaults():
    """Every setting of --recipe published has a row, and each row's two values are the recipe's
    and the default's: the table cannot go stale."""
    rows, defaults = differences_table(), {f.name: f.default for f in fields(vlr.Config)}
    for name, value in vlr.RECIPES["published"].items():
        flag = "--" + name.replace("_", "-")
        assert flag in rows, f"docs/differences.md has no row for {flag}"
        published, ours = rows[flag]
        assert published == str(value), (flag, published, value)
        assert ours == str(defaults[name]), (flag, ours, defaults[name])


def flags(*rows) -> torch.Tensor:
    return torch.tensor([i in rows for i in range(8)])


def test_step_metrics_against_hand_counts():
    """Two groups of 4: one right answer in the first, none in the second (its advantages all
    zero); the last response truncated and unboxed, 3 of its 5 tokens given; 6 triggered, 2 of
    them kept, 1 of those fixed."""
    g = [reward.Grade(correct=i == 0, reward=float(i == 0), boxed=i != 7, valid=True) for i in range(8)]
    mask = torch.ones(8, 5)
    mask[7, 3:] = 0
    done = SimpleNamespace(rollout=SimpleNamespace(texts=[""] * 8, response_mask=mask, truncated=flags(7)), grades=g,
                           triggered=flags(1, 2, 4, 5, 6, 7), kept=flags(1, 4), fixed=flags(1))
    rewards = torch.tensor([x.reward for x in g])
    run = SimpleNamespace(cfg=SimpleNamespace(group_size=4), buffer=[0] * 3, device="cpu", world=1,
                          sched=SimpleNamespace(get_last_lr=lambda: [2e-4]))
    up = {"loss": 0.5, "clipped": 3, "tokens": 12, "grad_norm": 1.5, "logp_drift_max": 1e-6, "skipped": 0}
    m = vlr.step_metrics(run, 7, done, rewards, grpo.group_advantages(rewards, 4), 2, up)
    assert m == pytest.approx({"step": 7, "reward_mean": 1 / 8, "acc_mean": 1 / 8, "zero_adv_frac": 1 / 2,
                               "format_rate": 7 / 8, "truncated_frac": 1 / 8, "ssr_buffer": 3, "ssr_replayed": 2,
                               "rethink_triggered": 6 / 8, "rethink_kept": 2 / 6, "rethink_fixed": 1 / 6,
                               "resp_len_mean": (7 * 5 + 3) / 8, "loss": 0.5, "grad_norm": 1.5, "clip_frac": 3 / 12,
                               "logp_drift_max": 1e-6, "lr": 2e-4, "skipped": 0})
