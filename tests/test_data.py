"""data.py: jsonl validation, the prompt, and the toy task's splits."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import data

ROOT = Path(__file__).resolve().parent.parent


def write_jsonl(tmp_path, lines):
    Image.new("RGB", (40, 30), (255, 0, 0)).save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
    return path


GOOD = {"id": "g1", "image": "ok.png", "question": "What is shown?", "answer": "red"}
BAD_LINES = [  # line 2..6: five kinds of bad lines, each with the reason it must be reported for
    ('{"id": "b1", "image": "ok.png", "question": "q", ', "invalid JSON"),
    ({"id": "b2", "image": "ok.png", "answer": "1"}, "missing field 'question'"),
    ({"id": "b3", "image": "nowhere.png", "question": "q", "answer": "1"}, "file not found: nowhere.png"),
    ({"id": "b4", "image": "broken.png", "question": "q", "answer": "1"}, "unreadable image broken.png"),
    ({"id": "b5", "image": "ok.png", "question": "q", "answer": "  "}, "field 'answer' is empty"),
]


def test_every_bad_line_is_reported_with_file_and_line(tmp_path):
    path = write_jsonl(tmp_path, [GOOD] + [l for l, _ in BAD_LINES] + [dict(GOOD, id="g2", image=["ok.png", "ok.png"])])
    with pytest.raises(data.DataError) as err:
        data.load_jsonl(path)
    lines = str(err.value).splitlines()[1:]
    assert len(lines) == 5
    for lineno, (line, (_, reason)) in enumerate(zip(lines, BAD_LINES), start=2):
        assert line.startswith(f"{path}:{lineno}: ") and reason in line, line


def test_invalid_json_is_located_on_its_own_line(tmp_path):
    path = write_jsonl(tmp_path, [GOOD, '{"id": "cut", "image": "ok.png",'])
    with pytest.raises(data.DataError) as err:
        data.load_jsonl(path)
    assert f"{path}:2: invalid JSON (Expecting property name enclosed in double quotes at column 33)" in str(err.value)


def test_skip_bad_keeps_the_good_lines(tmp_path):
    path = write_jsonl(tmp_path, [GOOD] + [l for l, _ in BAD_LINES] + [dict(GOOD, id="g2", image=["ok.png", "ok.png"])])
    records, skipped = data.load_jsonl(path, skip_bad=True)
    assert skipped == 5
    assert [r.id for r in records] == ["g1", "g2"]
    assert records[1].images == [str(tmp_path / "ok.png")] * 2  # relative to the file


def test_trainer_stops_before_training_on_bad_data(tmp_path):
    path = write_jsonl(tmp_path, [GOOD] + [l for l, _ in BAD_LINES])
    run = subprocess.run([sys.executable, "vlr.py", "--data", str(path), "--out", str(tmp_path / "run")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    reported = [l for l in run.stderr.splitlines() if l.startswith(f"{path}:")]
    assert len(reported) == 5, run.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_question_text_lists_lettered_choices():
    rec = data.Record(id="x", images=[], question="Which?", answer="B", choices=["red", "blue"])
    assert data.question_text(rec) == "Which?\nChoices:\nA. red\nB. blue"
    msgs = data.messages(rec)
    assert msgs[0]["content"][-1]["text"].endswith(data.INSTRUCTION)


def test_toy_splits_are_deterministic_and_disjoint():
    train, test = data.ToyTask("train", n=3000), data.ToyTask("test")
    assert len(test) == data.TOY_TEST_SIZE and len(train) == 3000
    assert [s for s in data.ToyTask("test").specs] == test.specs  # same questions every time
    assert train.specs[:50] == data.ToyTask("train", n=50).specs
    test_keys = {data._key(s) for s in test.specs}
    assert not test_keys & {data._key(s) for s in train.specs}
    # the same image pixels are drawn every time
    assert list(test[3].images[0].tobytes()) == list(data.ToyTask("test")[3].images[0].tobytes())


def test_toy_answers_follow_from_the_picture():
    test = data.ToyTask("test")
    for i in range(len(test)):
        rec = test[i]
        _, space = data.TIERS[rec.category]
        assert bool(rec.choices) == (rec.category == "choice")  # multiple choice is a tier of its own
        if rec.choices:
            assert len(rec.choices) == 4 and rec.answer in data.LETTERS[:4]
            assert set(rec.choices) <= set(space) and len(set(rec.choices)) == len(rec.choices)
        else:
            assert rec.answer in space
    assert {t: sum(test[i].category == t for i in range(len(test))) for t in data.TIERS} == {t: 60 for t in data.TIERS}
    # colour and choice tiers: the answer is the colour of most non-white pixels
    for i in range(len(test)):
        rec = test[i]
        if rec.category in ("colour", "choice"):
            raw = rec.images[0].tobytes()
            pixels = [raw[k:k + 3] for k in range(0, len(raw), 3)]
            pixels = [tuple(p) for p in pixels if p != b"\xff\xff\xff"]
            top = max(set(pixels), key=pixels.count)
            colour = rec.choices[data.LETTERS.index(rec.answer)] if rec.choices else rec.answer
            assert top == data.COLOURS[colour]


def test_toy_chance_groups_often_have_equal_rewards():
    """At chance (1/6 on colours), a group of 8 is all-wrong with probability (5/6)^8 ~ 0.23."""
    p_all_wrong = (1 - 1 / len(data.TIERS["colour"][1])) ** 8
    assert 0.2 < p_all_wrong < 0.3
