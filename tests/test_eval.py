"""eval.py: letter grading, MathVista's precision, the summary, the command line and sharded
evaluation (the adapters that read the benchmarks' files: test_benchmarks.py)."""
import dataclasses
import json
import re
import sys
from pathlib import Path

import pytest
import torch

import benchmarks
import data
import distributed
import eval as ev
import models
import procs
import reward
import toy
import vlr
from test_benchmarks import MATHVISTA, image, mmmu_rows, write_parquet

ROOT = Path(__file__).resolve().parent.parent


def test_cli_reports_a_bad_file_without_loading_a_model(tmp_path):
    run = procs.run([sys.executable, "eval.py", "--bench", "mmmu-pro", "--data", str(tmp_path / "missing.json")], 60,
                    cwd=ROOT)
    assert run.returncode != 0 and f"{tmp_path / 'missing.json'}: file not found" in run.stderr


# ---------------------------------------------------------------------------------------------
# Grading and the summary
# ---------------------------------------------------------------------------------------------

def test_mathvista_decimal_answers_are_graded_at_their_precision(tmp_path):
    rows = [dict(r, decoded_image=image("red")) for r in MATHVISTA]
    integer, _, tenths, hundredths = benchmarks.load_bench("mathvista", write_parquet(tmp_path / "t.parquet", rows,
                                                                             images=["decoded_image"]))

    def graded(rec, *answers):
        return [ev.row(rec, f"So the answer is \\boxed{{{a}}}.", 9)["correct"] for a in answers]

    # gold 1.2 at 1 decimal: 1.23 and 1.15001 round to 1.2, 1.26 to 1.3, 1.14 to 1.1; "1.23 cm" is rounded in
    # place; 6/5 is right by value
    assert graded(tenths, "1.2", "1.23", "1.15001", "1.23 cm", "6/5", "1.26", "1.14") == [1.0] * 5 + [0.0] * 2
    assert graded(dataclasses.replace(tenths, meta={}), "1.23") == [0.0]  # the rounding is what made it right
    assert graded(hundredths, "0.5678", "0.57", "0.574", "0.564", "0.5") == [1.0, 1.0, 1.0, 0.0, 0.0]
    # integer answers are compared by value: 5.0 is 5, but 5.4 is not truncated to 5 as MathVista's scorer would
    assert graded(integer, "5", "5.0", "5.4", "4.6") == [1.0, 1.0, 0.0, 0.0]


def test_multiple_choice_is_graded_as_a_letter_or_the_option_text():
    rec = data.Record(id="q", images=[], question="Which bar is the tallest?", answer="B",
                      choices=["red", "green", "blue"])
    graded = {resp: ev.row(rec, resp, 5) for resp in
              ("So \\boxed{B}.", "So \\boxed{green}.", "So \\boxed{A}.", "So \\boxed{red}.", "No answer.")}
    assert [r["correct"] for r in graded.values()] == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert graded["So \\boxed{B}."]["extracted"] == "B"
    free = data.Record(id="f", images=[], question="Length?", answer="5")
    assert ev.row(free, "It is \\boxed{5}.", 7)["correct"] == 1.0 and ev.row(free, "\\boxed{6}", 7)["correct"] == 0.0


def test_reflection_phrases():
    assert ev.reflects("x is 3. Wait, let me double-check: x is 4.")
    assert ev.reflects("Let me re-evaluate the angle.") and ev.reflects("I should RECHECK this")
    assert not ev.reflects("The waiter awaited the answer \\boxed{3}.")  # whole words only
    assert not ev.reflects("I look at the image. The answer is \\boxed{red}.")


def test_summary_against_hand_counted_values():
    def r(cat, correct, reflects, n):
        return {"category": cat, "correct": correct, "reflects": reflects, "len": n}

    rows = [r("b", 1.0, True, 10), r("a", 0.0, False, 20), r("b", 1.0, False, 30), r("a", 1.0, True, 5),
            r("b", 0.0, False, 15)]
    s = ev.summarize(rows, "bench")
    # overall: 3 of 5 right, 2 of 5 reflect, 80 tokens / 5; b: 2/3, 1/3, 55/3; a: 1/2, 1/2, 25/2
    assert s == {"bench": "bench", "n": 5, "accuracy": 0.6, "reflection_rate": 0.4, "mean_len": 16.0,
                 "categories": {"b": {"n": 3, "accuracy": 0.6667, "reflection_rate": 0.3333, "mean_len": 18.33},
                                "a": {"n": 2, "accuracy": 0.5, "reflection_rate": 0.5, "mean_len": 12.5}}}
    assert json.loads(json.dumps(s)) == s
    assert ev.table(s).splitlines()[1].split() == ["bench", "5", "60.0%", "40.0%", "16.0"]


# ---------------------------------------------------------------------------------------------
# With the tiny model: in-process, and the command line with 1 and 2 gloo processes
# ---------------------------------------------------------------------------------------------

def test_evaluate_grades_every_record_in_order(tiny_model, tmp_path):
    model, processor = tiny_model
    standard, vision = mmmu_rows()
    recs = toy.ToyTask("test")
    recs = ([recs[i] for i in range(6)] + benchmarks.load_bench("mmmu-pro", write_parquet(tmp_path / "s.parquet", standard))
            + benchmarks.load_bench("mmmu-pro", write_parquet(tmp_path / "v.parquet", vision)))
    rows = ev.evaluate(model, processor, recs, max_new_tokens=24, batch_size=4)
    assert [r["id"] for r in rows] == [r.id for r in recs]
    for rec, r in zip(recs, rows):
        assert r["correct"] == reward.accuracy(r["response"], rec.answer, rec.choices)
        assert r["reflects"] == ev.reflects(r["response"]) and 0 < r["len"] <= 24
    again = ev.evaluate(model, processor, recs, max_new_tokens=24, batch_size=8)  # greedy: batching changes nothing
    assert [r["response"] for r in again] == [r["response"] for r in rows]
    drawn = []
    for seed in (7, 7, 8):  # sampled: from its generator alone, whatever the global RNG holds
        torch.manual_seed(len(drawn))
        drawn.append([r["response"] for r in ev.evaluate(model, processor, recs[:6], max_new_tokens=24, temperature=1.0,
                                                          generator=torch.Generator().manual_seed(seed))])
    assert drawn[0] == drawn[1] != drawn[2]


def test_cli_budgets_and_the_loader(tiny_model, tmp_path, monkeypatch, capsys):
    """The response budget defaults to the toy runs' 48 on toy and the published 2048 on a benchmark;
    the image budget goes to models.load_model, the one loader, with bf16 only on a GPU."""
    calls = []

    def load_model(*args):
        calls.append(("load", *args))
        return tiny_model

    def evaluate(model, processor, recs, max_new_tokens, batch_size, temperature, generator):
        calls.append(("evaluate", len(recs), max_new_tokens))
        seeds.append(generator.initial_seed())
        return [ev.row(r, "\\boxed{A}", 1) for r in recs]

    seeds = []

    monkeypatch.setattr(models, "load_model", load_model)
    monkeypatch.setattr(ev, "evaluate", evaluate)
    mv = write_parquet(tmp_path / "mv.parquet", [dict(MATHVISTA[1], decoded_image=image("red"))], ["decoded_image"])
    out = str(tmp_path / "out.jsonl")
    ev.main(["--bench", "toy", "--limit", "3", "--out", out, "--min-pixels", "3136", "--max-pixels", "12544"])
    ev.main(["--bench", "mathvista", "--data", str(mv), "--out", out])
    ev.main(["--bench", "mathvista", "--data", str(mv), "--out", out, "--max-new-tokens", "7", "--seed", "3"])
    gpu = torch.cuda.is_available()
    on = (torch.device("cuda", 0), torch.bfloat16) if gpu else (torch.device("cpu"), torch.float32)
    assert calls == [("load", "tiny", *on, 3136, 12544), ("evaluate", 3, 48), ("load", "tiny", *on, 0, 0),
                     ("evaluate", 1, 2048), ("load", "tiny", *on, 0, 0), ("evaluate", 1, 7)]
    assert ev.TOY_MAX_NEW_TOKENS == vlr.Config().max_new_tokens
    assert seeds == [0, 0, 3000]  # --seed's stream for rank 0, as vlr.setup's
    for bad in (["--min-pixels", "-1"], ["--min-pixels", "5000", "--max-pixels", "4000"], ["--max-new-tokens", "0"],
                ["--limit", "-1"], ["--limit", "0"], ["--batch-size", "0"], ["--temperature", "-1"]):
        with pytest.raises(SystemExit):
            ev.main(["--bench", "toy", *bad])
        assert "must be" in capsys.readouterr().err


def test_where_results_go_is_checked_before_the_model_loads(tiny_model, tmp_path, monkeypatch, capsys):
    """--out: a folder, or a place no folder can be made, is said before anything loads; by default
    each model's results have a file of their own; --data is refused with the toy task."""
    loaded = []
    monkeypatch.setattr(models, "load_model", lambda *args: loaded.append(args[0]) or tiny_model)
    monkeypatch.setattr(models, "check", lambda model: None)  # a run folder's final/ need not exist here
    monkeypatch.setattr(ev, "evaluate", lambda model, processor, recs, *rest: [ev.row(r, "\\boxed{A}", 1) for r in recs])
    (tmp_path / "a-file").write_text("")
    for out, said in ((tmp_path, f"--out {tmp_path}: is a folder"),
                      (tmp_path / "a-file" / "x.jsonl", f"cannot create the folder {tmp_path / 'a-file'}")):
        with pytest.raises(distributed.UserError, match=re.escape(said)):
            ev.main(["--bench", "toy", "--out", str(out)])
    with pytest.raises(SystemExit):
        ev.main(["--bench", "toy", "--data", str(tmp_path / "a-file")])
    assert "--data is a benchmark's file" in capsys.readouterr().err and loaded == []
    monkeypatch.chdir(tmp_path)
    ev.main(["--bench", "toy", "--limit", "2"])
    ev.main(["--bench", "toy", "--limit", "3", "--model", str(tmp_path / "runs" / "a" / "final")])
    mine = tmp_path / "runs" / "eval-toy-tiny.jsonl"
    theirs = tmp_path / "runs" / f"eval-toy-{str(tmp_path).strip('/').replace('/', '-')}-runs-a-final.jsonl"
    assert len(mine.read_text().splitlines()) == 2 and len(theirs.read_text().splitlines()) == 3
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted([mine.name, theirs.name])  # no temporary left


def run_cli(tmp_path, name, launcher):
    out = tmp_path / f"{name}.jsonl"
    run = procs.run([*launcher, "eval.py", "--bench", "toy", "--limit", "10", "--max-new-tokens", "24",
                     "--out", str(out)], 300, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    return run.stdout.strip().splitlines(), [json.loads(l) for l in out.read_text().splitlines()]


def test_two_gloo_processes_give_the_same_results_as_one(tmp_path):
    one, rows1 = run_cli(tmp_path, "one", [sys.executable])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    two, rows2 = run_cli(tmp_path, "two", torchrun)
    summary = json.loads(one[-1])
    assert summary == ev.summarize(rows1, "toy") and summary["n"] == 10
    assert list(summary["categories"]) == ["colour", "shape", "count", "largest", "choice"]  # the tiers, in order
    assert json.loads(two[-1]) == summary
    assert [(r["id"], r["response"], r["correct"]) for r in rows2] == [
        (r["id"], r["response"], r["correct"]) for r in rows1]
    assert one[2].split()[:2] == ["toy", "10"]  # the table: header, then the benchmark's row


def test_revises_only_a_reflection_that_changes_the_answer():
    assert ev.revises("The answer is \\boxed{red}.\nWait, does it seem right? The answer is \\boxed{blue}.")
    assert not ev.revises("The answer is \\boxed{red}.\nWait, right. The answer is \\boxed{red}.")  # repeats itself
    assert not ev.revises("Let me think.\nWait, the answer is \\boxed{blue}.")  # no first answer to change
    assert not ev.revises("The answer is \\boxed{red}, then \\boxed{blue}.")  # no reflection
    assert not ev.revises("So \\boxed{2}.\nWait, let's double check. \\boxed{2.0}")  # one answer, as graded
    assert ev.revises("So \\boxed{2}.\nWait, let's double check. \\boxed{2.5}")
