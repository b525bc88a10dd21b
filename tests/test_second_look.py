"""The second-look lab (docs/lab.md, "A second look"): the code tiers, the variant's warm start,
the per-tier reflection metrics and `lab.py --preset second-look`. No model is built or trained."""
import json
import random
import re
import subprocess
from pathlib import Path

import pytest

import data
import eval as ev
import lab
import models
import rethink
import tiny
import toy


def _colour_of(img) -> str:
    """The name of the colour of most non-white pixels."""
    raw = img.tobytes()
    pixels = [tuple(raw[k:k + 3]) for k in range(0, len(raw), 3) if raw[k:k + 3] != b"\xff\xff\xff"]
    rgb = max(set(pixels), key=pixels.count)
    return next(name for name, c in toy.COLOURS.items() if c == rgb)


def test_code_tiers_answer_the_code_of_the_colour_and_leave_the_default_split_alone():
    default = toy.ToyTask("test")
    test = toy.ToyTask("test", toy.test_tiers(["code", "colour"]))
    assert toy.test_tiers(["colour", "unseen"]) == list(toy.TIERS)  # the default run's eval is unchanged
    assert test.specs[:len(default)] == default.specs and len(test) == len(default) + 120
    looks = [test[i] for i in range(len(default), len(test))]
    assert [r.category for r in looks] == ["code", "code2"] * 60
    for rec in looks:
        listed = re.fullmatch(r"Code: (.*)\. " + re.escape(toy.SECOND_LOOK[rec.category][0]), rec.question)[1]
        code = dict(pair.split(" > ") for pair in listed.split(", "))
        assert sorted(code) == sorted(code.values()) == sorted(toy.COLOURS)
        ring, c = [], "red"
        while c not in ring:  # one cycle through all six colours: no colour is its own code or code of code
            ring.append(c)
            c = code[c]
        assert len(ring) == 6
        colour = _colour_of(rec.images[0])
        want = code[colour] if rec.category == "code" else code[code[colour]]
        assert rec.answer == want and rec.meta["short"] == (colour if rec.category == "code" else code[colour])
    orders = {tuple(r.question.split(": ")[1].split(", ")[0].split(" > ")) for r in looks}
    assert len(orders) > 20  # the code and the order it is listed in change from question to question
    train = toy.ToyTask("train", ("code", "code2"), n=300)
    assert not {toy._key(s) for s in train.specs} & {toy._key(s) for s in test.specs}
    assert {train[i].category for i in range(4)} == {"code", "code2"}


def test_the_warm_start_primes_the_form_with_random_answers():
    """The variant's warm-start responses to the second-look tiers: rethinking-shaped ones restate
    their first answer after the trigger (not trained) and go on "X > Y", and neither the first nor
    the final answer carries the gold: each is right about 1 time in 6, as a random colour is."""
    task = toy.ToyTask("train", ("code", "code2"), n=3000)
    rng, shaped, first_right, final_right, reads = random.Random(1), 0, 0, 0, 0
    for i in range(len(task)):
        rec = task[i]
        parts = tiny.second_look_response(rec, rng)
        texts = [t for t, _ in parts]
        answers = re.findall(r"\\boxed\{(\w+)\}", "".join(texts))
        assert set(answers) <= set(toy.COLOURS)
        first_right += answers[0] == rec.answer
        final_right += answers[-1] == rec.answer
        if len(parts) > 1:
            shaped += 1
            assert [t for _, t in parts] == [True, False, True] and texts[1] in rethink.TRIGGERS
            assert texts[2].startswith(f" {answers[0]} > {answers[1]}.")
            reads += answers[1] == rec.meta["code"][answers[0]]
    n = len(task)
    assert abs(shaped / n - tiny.RETHINK_SHAPED) < 0.03
    # Y is the code of X always (READS_CODE), or by chance: 1 in 6 (750 shaped: a std of 0.014)
    assert reads == shaped if tiny.READS_CODE else abs(reads / shaped - 1 / 6) < 0.05, (reads, shaped)
    # 3000 responses: a binomial std of 0.0068 around 1/6; a warm start that leaked would be near 1
    assert abs(first_right / n - 1 / 6) < 0.03 and abs(final_right / n - 1 / 6) < 0.03, (first_right, final_right)


def test_per_tier_reflection_metrics_against_hand_counts():
    code2 = data.Record(id="a", images=[], question="q", answer="blue", category="code2", meta={"short": "red"})
    code = data.Record(id="b", images=[], question="q", answer="red", category="code", meta={"short": "green"})
    colour = data.Record(id="c", images=[], question="q", answer="green", category="colour")
    wait = "\n\nWait, let's double check."
    rows = [ev.row(code2, f"\\boxed{{red}}.{wait} red > blue. \\boxed{{blue}}.", 9),  # wrong -> right, from the code
            ev.row(code2, f"\\boxed{{blue}}.{wait} blue > red. \\boxed{{red}}.", 9),  # right -> wrong
            ev.row(code2, f"\\boxed{{red}}.{wait} red. \\boxed{{red}}.", 9),  # reflects, keeps the code
            ev.row(code2, "\\boxed{red}.", 9),  # the code, no reflection
            ev.row(code, f"\\boxed{{green}}.{wait} green > red. \\boxed{{red}}.", 9),  # wrong -> right
            ev.row(code, "\\boxed{black}.", 9),
            ev.row(colour, f"\\boxed{{red}}.{wait} \\boxed{{green}}.", 9),  # wrong -> right
            ev.row(colour, "\\boxed{green}.", 9)]
    m = ev.toy_metrics(rows, ["code", "code2"], world=1)
    # code2: 1 of 4 right; reflect 3/4, revise 2/4, fixed 1/4, broke 1/4, first answer the code (red) 3/4
    assert m["eval_acc_code2"] == 0.25 and m["eval_acc_code"] == 0.5 and m["eval_acc"] == 2 / 6
    assert [m[f"eval_{k}_code2"] for k in ("reflect", "revise", "fixed", "broke", "short_first")] == [
        0.75, 0.5, 0.25, 0.25, 0.75]
    assert [m[f"eval_{k}_code"] for k in ("reflect", "revise", "fixed", "broke", "short_first")] == [
        0.5, 0.5, 0.5, 0.0, 0.5]
    assert [m[f"eval_{k}_colour"] for k in ("reflect", "revise", "fixed", "broke")] == [0.5, 0.5, 0.5, 0.0]
    assert "eval_short_first_colour" not in m and m["eval_revise"] == 4 / 8
    plain = ev.toy_metrics(rows[-2:], ["colour"], world=1)  # no second-look tier: the default run's keys only
    assert sorted(plain) == ["eval_acc", "eval_acc_colour", "eval_reflect", "eval_revise"]


def test_second_look_preset_runs_its_arms_and_writes_its_table(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    launched = []

    class FakeRun:
        """Stands in for a vlr.py run: writes the metrics of two evals and a final model."""

        def __init__(self, cmd, **kw):
            launched.append(cmd)
            out, seed = Path(cmd[cmd.index("--out") + 1]), int(cmd[cmd.index("--seed") + 1])
            acc = 0.2 + 0.1 * seed + (0.4 if "--rethink-train-trigger" in cmd else 0.0)
            rows = [{"step": s, "reward_mean": 0.1, "zero_adv_frac": 0.5} for s in range(2)]
            for m, a in zip(rows, (0.1, acc)):
                m.update(eval_acc=a, eval_acc_code2=a, eval_acc_code=0.5, eval_acc_colour=0.3, eval_reflect=0.0,
                         eval_revise=0.0, eval_reflect_code2=a, eval_revise_code2=a / 2, eval_fixed_code2=a / 4,
                         eval_broke_code2=0.0, eval_short_first_code2=0.5)
            (out / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in rows))
            (out / "final").mkdir()
            (out / "final" / "model.safetensors").write_text("")
            self.returncode = 0

        def wait(self):
            return 0

        poll = wait

    monkeypatch.setattr(subprocess, "Popen", FakeRun)
    lab.main(["--preset", "second-look", "--arms", "grpo+ssr", "grpo+ssr+rethink", "--seeds", "0", "1",
              "--steps", "2", "--out", str(tmp_path / "look")])
    settings = lab.PRESETS["second-look"][0]
    assert len(launched) == 4 and all(c[2:2 + len(settings)] == settings for c in launched)
    assert settings[:2] == ["--model", "tiny-second-look"] and "code,code2" in settings
    table = (tmp_path / "look" / "table.md").read_text().splitlines()
    # grpo+ssr: code2 0.2 and 0.3; rethink: 0.6 and 0.7 (means 0.25 and 0.65, std 0.0707)
    assert table[-2] == ("| grpo+ssr | 2 | 0.250 ± 0.071 | 0.500 ± 0.000 | 0.300 ± 0.000 | 0.250 ± 0.071 | "
                         "0.125 ± 0.035 | 0.062 ± 0.018 | 0.000 ± 0.000 | 0.500 ± 0.000 | 0.20, 0.30 |")
    assert table[-1].startswith("| grpo+ssr+rethink | 2 | 0.650 ± 0.071 |") and table[-1].endswith("| 0.60, 0.70 |")
    assert (tmp_path / "look" / "lab.png").is_file()
    with pytest.raises(SystemExit):
        lab.main(["--preset", "second-look", "--arms", "grpo+sr", "--out", str(tmp_path / "x")])
    assert "--arms: no arm grpo+sr in the preset second-look" in capsys.readouterr().err


def test_the_variant_is_a_known_model_of_its_own(monkeypatch):
    models.check("tiny-second-look")  # a known name, not a folder or a hub id
    monkeypatch.setattr(tiny, "resolve_second_look", lambda: "/built/second-look")
    assert models.resolve("tiny-second-look") == "/built/second-look"
    assert tiny.SECOND_LOOK_CACHE != tiny.CACHE and tiny.second_look_fingerprint() != tiny.fingerprint()
