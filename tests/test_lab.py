"""lab.py: the runs it launches and keeps, the table of runs (seeds pooled), the plot, and
`--compare` on any run folders."""
import json
from dataclasses import asdict
from pathlib import Path

import pytest
from PIL import Image

import data
import lab
import vlr
from distributed import UserError


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_compare_plots_runs_and_rejects_bad_metrics(tmp_path):
    pytest.importorskip("matplotlib")
    for name, slope in (("ssr", 0.004), ("no-ssr", 0.002)):
        (tmp_path / name).mkdir()
        write_jsonl(tmp_path / name / "metrics.jsonl",
                    [dict({"step": s, "reward_mean": 0.2 + slope * s, "zero_adv_frac": 0.5 - slope * s,
                           "resp_len_mean": 16 + 1000 * slope * s},
                          **({"eval_acc": 0.25 + slope * s} if s % 25 == 24 else {})) for s in range(100)])
    out = lab.plot([str(tmp_path / "ssr"), str(tmp_path / "no-ssr")], str(tmp_path / "compare.png"))
    img = Image.open(out).convert("RGB")
    assert img.size == (2750, 418)  # five panels, 25 x 3.8 inches at 110 dpi
    colours = {c for _, c in img.getcolors(maxcolors=1 << 20)}
    assert (31, 119, 180) in colours and (255, 127, 14) in colours  # one colour per run
    lengths = {c for _, c in img.crop((2200, 0, 2750, 418)).getcolors(maxcolors=1 << 20)}
    assert (31, 119, 180) in lengths and (255, 127, 14) in lengths  # lengths of 16..416 tokens are on their panel
    (tmp_path / "bad").mkdir()
    write_jsonl(tmp_path / "bad" / "metrics.jsonl",
                [{"step": 0, "reward_mean": 0.1, "zero_adv_frac": 0.5}, {"step": 1}])
    with pytest.raises(data.DataError, match=r"bad/metrics.jsonl:2: missing reward_mean, zero_adv_frac"):
        lab.plot([str(tmp_path / "bad")], str(tmp_path / "x.png"))


def test_plot_counts_steps_from_one_as_the_table_does(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    (tmp_path / "a").mkdir()
    write_jsonl(tmp_path / "a" / "metrics.jsonl",
                [dict({"step": s, "reward_mean": 0.1 * s, "zero_adv_frac": 0.5},
                      **({"eval_acc": 0.9} if s == 4 else {})) for s in range(6)])
    figures = []
    monkeypatch.setattr(lab.plt, "close", figures.append)  # keep the figure to read its lines
    lab.plot([str(tmp_path / "a")], str(tmp_path / "a.png"))
    reward, *_ = figures[0].axes[0].lines
    assert list(reward.get_xdata()) == [1, 2, 3, 4, 5, 6]  # metrics.jsonl's step 0 is the first step
    (evals,) = figures[0].axes[2].lines
    assert list(evals.get_xdata()) == [5]
    assert "| 5 (1/1) |" in lab.compare_table([str(tmp_path / "a")], target=0.8)  # where the table puts it


def test_compare_table_pools_seeds_and_matches_hand_counts(tmp_path):
    def run(name, evals, zero, fixed, replayed):
        (tmp_path / name).mkdir()
        rows = [{"step": s, "reward_mean": 0.0, "zero_adv_frac": z, "rethink_fixed": f, "ssr_replayed": r}
                for s, (z, f, r) in enumerate(zip(zero, fixed, replayed))]
        for step, acc, reflect, revise in evals:
            rows[step].update(eval_acc=acc, eval_reflect=reflect, eval_revise=revise)
        write_jsonl(tmp_path / name / "metrics.jsonl", rows)
        return str(tmp_path / name)

    runs = [run("full-s0", [(1, 0.5, 0.0, 0.0), (3, 0.9, 0.2, 0.1)], [0.5, 0.5, 0.0, 0.0], [0.0, 0.2, 0.2, 0.0],
                [0, 3, 1, 0]),
            run("full-s1", [(1, 0.8, 0.1, 0.0), (3, 0.7, 0.4, 0.0)], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0],
                [0, 0, 0, 0]),
            run("plain-s0", [(3, 0.3, 0.0, 0.0)], [0.25, 0.25, 0.25, 0.25], [0.0] * 4, [0, 0, 0, 0])]
    lines = lab.compare_table(runs).splitlines()
    assert len(lines) == 4
    # full: final acc 0.9 and 0.7 -> 0.8 +- 0.1414; zero-adv 0.25 and 0.25; steps replaying 2/4 and 0/4 ->
    # 0.25 +- 0.3536; steps to 0.8: 4 (s0) and 2 (s1) -> 3; reflection 0.2 and 0.4 -> 0.3 +- 0.1414;
    # revision 0.1 and 0.0 -> 0.05 +- 0.0707; rethink_fixed 0.1 and 0.0 -> 0.05 +- 0.0707
    assert lines[2] == ("| full | 2 | 0.800 ± 0.141 | 0.250 ± 0.000 | 0.250 ± 0.354 | 3 (2/2) | 0.300 ± 0.141 "
                        "| 0.050 ± 0.071 | 0.050 ± 0.071 |")
    assert lines[3] == "| plain | 1 | 0.300 | 0.250 | 0.000 | never (0/1) | 0.000 | 0.000 | 0.000 |"  # one seed: no spread
    # a seed killed before its first eval: the eval columns say how many seeds they hold (0.9 at step 4: 0.8 reached)
    lines = lab.compare_table([run("cut-s0", [(3, 0.9, 0.2, 0.1)], [0.5] * 4, [0.0] * 4, [0] * 4),
                               run("cut-s1", [], [0.5] * 4, [0.0] * 4, [0] * 4)]).splitlines()
    assert lines[2] == ("| cut | 2 | 0.900 (1/2) | 0.500 ± 0.000 | 0.000 ± 0.000 | 4 (1/2) | 0.200 (1/2) | 0.100 (1/2) "
                        "| 0.000 ± 0.000 |")
    other = tmp_path / "other-lab"  # another lab's arm of the same name: a row of its own
    other.mkdir()
    (tmp_path / "plain-s0").rename(other / "plain-s0")
    rows = [line.split(" | ")[:2] for line in lab.compare_table([*runs[:2], str(other / "plain-s0")]).splitlines()[2:]]
    assert rows == [[f"| {tmp_path.name}/full", "2"], ["| other-lab/plain", "1"]]


def test_compare_command_prints_the_table_and_writes_the_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    for name, acc in (("a-s0", 0.5), ("a-s1", 0.7), ("b-s0", 0.9)):
        (tmp_path / name).mkdir()
        write_jsonl(tmp_path / name / "metrics.jsonl",
                    [{"step": 0, "reward_mean": 0.1, "zero_adv_frac": 0.5, "eval_acc": acc, "eval_reflect": 0.0}])
    out = tmp_path / "plots" / "ab.png"
    lab.main(["--compare", *(str(tmp_path / n) for n in ("a-s0", "a-s1", "b-s0")), "--out", str(out)])
    lines = capsys.readouterr().out.splitlines()
    # a: final acc 0.5 and 0.7 -> 0.6 +- 0.1414, reached 0.8 never; b: 0.9 at step 0 -> 1 step
    assert lines[2] == "| a | 2 | 0.600 ± 0.141 | 0.500 ± 0.000 | 0.000 ± 0.000 | never (0/2) | 0.000 ± 0.000 | - | 0.000 ± 0.000 |"
    assert lines[3] == "| b | 1 | 0.900 | 0.500 | 0.000 | 1 (1/1) | 0.000 | - | 0.000 |"
    assert lines[4] == f"wrote {out}" and Image.open(out).size == (2750, 418)
    with pytest.raises(data.DataError, match=r"nowhere/metrics.jsonl: file not found"):
        lab.main(["--compare", str(tmp_path / "nowhere")])


def test_compare_reads_a_run_still_writing_its_last_line_and_refuses_a_line_torn_before_it(tmp_path):
    """A run being written, or killed mid-line, is compared on its whole lines, as vlr.py's resume
    reads them (checkpoint.records); a torn line before the last is damage, said with its line."""
    run = tmp_path / "run"
    run.mkdir()
    metrics = [{"step": s, "reward_mean": 0.25 * s, "zero_adv_frac": 0.5, "eval_acc": 0.5 + 0.25 * s} for s in (0, 1)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics) + '{"step": 2, "rew')
    sample = {"step": 1, "kind": "eval", "id": "q1", "category": "colour", "question": "What colour?", "gold": "red",
              "response": "\\boxed{red}", "correct": True, "reflects": False, "revises": False}
    (run / "samples.jsonl").write_text(json.dumps(sample) + '\n{"step": 2, "kind": "ev')
    assert lab.read_metrics(str(run)) == metrics
    assert lab.compare_table([str(run)]).splitlines()[2].startswith("| run | 1 | 0.750 |")
    assert lab.side_by_side([str(run)]).splitlines()[1] == f"  {run} (step 2, right): \\boxed{{red}}"
    (run / "metrics.jsonl").write_text(json.dumps(metrics[0]) + '\n{"step": 1, "rew\n' + json.dumps(metrics[1]) + "\n")
    with pytest.raises(UserError, match=r"run/metrics.jsonl:2: not a JSON line"):
        lab.main(["--compare", str(run)])


class Launched:
    """subprocess.Popen as lab.run_lab uses it, recording the vlr.py flags; a run takes `ticks` polls."""
    log, ends = [], {}

    def __init__(self, cmd, cwd, **kw):
        self.flags, self.polls = cmd[2:], 0
        self.out = cmd[cmd.index("--out") + 1]
        self.log.append((Path(cwd) / self.out).resolve())

    def poll(self):
        self.polls += 1
        return 0 if self.polls >= self.ends.get(Path(self.out).name, 1) else None

    def wait(self):
        return 0


def test_the_lab_keeps_a_finished_run_only_of_its_own_flags(tmp_path, monkeypatch):
    """A run finished with other flags (here the ablation's, in the second-look lab's folder) is
    run again; one with the same flags is kept. A relative --out is the folder lab.py reads from
    wherever it is launched, and a slot frees as soon as any run ends."""
    monkeypatch.setattr(lab.subprocess, "Popen", Launched)
    monkeypatch.setattr(lab.time, "sleep", lambda s: None)
    monkeypatch.chdir(tmp_path)
    out = Path("labs").resolve()
    ablation = [*lab.LAB, *lab.CONFIGS["grpo"], "--seed", "0", "--steps", "100", "--out", str(out / "grpo-s0"),
                "--overwrite"]
    (out / "grpo-s0" / "final").mkdir(parents=True)
    (out / "grpo-s0" / "final" / "model.safetensors").write_bytes(b"")
    (out / "grpo-s0" / "config.json").write_text(json.dumps(asdict(vlr.parse_args(ablation))))
    seconds = lab.SECOND_LOOK_LAB
    assert not lab.finished_with(out / "grpo-s0", [*seconds, *ablation[len(lab.LAB):]])
    assert lab.finished_with(out / "grpo-s0", ablation)
    lab.run_lab(out, lab.LAB, {"grpo": lab.CONFIGS["grpo"]}, [0], 100, 2, [])
    assert Launched.log == []  # kept
    lab.run_lab(out, seconds, {"grpo": lab.CONFIGS["grpo"]}, [0], 100, 2, [])
    assert Launched.log == [out / "grpo-s0"]  # run again: other flags
    Launched.log.clear()
    Launched.ends.update({"a-s0": 50, "b-s0": 1})  # a runs long, b ends at once: c starts beside a
    order = []
    monkeypatch.setattr(lab, "wait", lambda job: order.append(Path(job[1]).name))
    lab.run_lab(out, [], {"a": [], "b": [], "c": []}, [0], 1, 2, [])
    assert order == ["b-s0", "c-s0", "a-s0"] and Launched.log == [out / f"{n}-s0" for n in "abc"]

    class Stop(Exception):
        pass

    def launched(folder, *args):
        order.append(folder)
        raise Stop

    monkeypatch.setattr(lab, "run_lab", launched)
    with pytest.raises(Stop):
        lab.main(["--out", "rel"])
    assert order[-1] == tmp_path / "rel"  # vlr.py runs in lab.py's folder: it is given this folder's whole path
