"""benchmarks.py: the adapters on files in each benchmark's published schema (MathVista,
MathVerse, MathVision, MMMU-Pro), MathVista's precision, and bad files said with file and record.
The fixtures here (write_parquet, image, MATHVISTA, mmmu_rows) are test_eval's too, jpeg test_data's."""
import base64
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import benchmarks
import data
import reward


def png(colour, size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def jpeg() -> bytes:
    """A photo-like JPEG (its scan data a few KB, so that cutting its end cuts the scan)."""
    buf = io.BytesIO()
    Image.effect_noise((96, 64), 40).convert("RGB").save(buf, "JPEG")
    return buf.getvalue()


def image(colour, size=(64, 48), path=None) -> dict:
    """An image as parquet files embed it (the Hugging Face `Image` feature)."""
    return {"bytes": png(colour, size), "path": path}


def write_parquet(path, rows, images=()):
    """`images` name the columns typed as the Hugging Face Image feature stores them, struct<bytes,
    path>: so also a column with no image at all (MMMU-Pro's image_7) has that type, not `null`."""
    table = pa.Table.from_pylist(rows)
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    for name in images:
        i = table.schema.get_field_index(name)
        table = table.set_column(i, name, pa.array(table.column(name).to_pylist(), type=struct))
    pq.write_table(table, path)
    return path


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------------------
# Adapters: a few records in each benchmark's published schema
# ---------------------------------------------------------------------------------------------

def mathvista_row(pid, question, answer, question_type, answer_type, choices=None, unit=None, precision=None,
                  task="figure question answering"):
    """A record of AI4Math/MathVista's testmini parquet: every published column, `precision` a float."""
    return {"pid": pid, "question": question, "image": f"images/{pid}.jpg", "decoded_image": None,
            "choices": choices, "unit": unit, "precision": precision, "answer": answer,
            "question_type": question_type, "answer_type": answer_type,
            "metadata": {"category": "math-targeted-vqa", "context": "geometry diagram", "grade": "high school",
                         "img_height": 48, "img_width": 64, "language": "english", "skills": ["algebraic reasoning"],
                         "source": "Geometry3K", "split": "testmini", "task": task},
            "query": f"Hint: Please answer the question and provide the final answer at the end.\nQuestion: {question}"}


MATHVISTA = [
    mathvista_row("1", "What is the length of the side?", "5", "free_form", "integer", unit="cm",
                  task="geometry problem solving"),
    mathvista_row("2", "Which bar is the tallest?", "green", "multi_choice", "text", choices=["red", "green", "blue"]),
    mathvista_row("3", "What is the slope of the line?", "1.2", "free_form", "float", precision=1.0),
    mathvista_row("4", "What is the ratio of the two areas?", "0.57", "free_form", "float", precision=2.0),
]


def check_mathvista(recs):
    assert [r.id for r in recs] == ["1", "2", "3", "4"]
    assert recs[0].question == "What is the length of the side? (Unit: cm)"
    assert (recs[0].answer, recs[0].choices) == ("5", None)
    assert (recs[1].answer, recs[1].choices) == ("B", ["red", "green", "blue"])  # the option text became a letter
    assert "Choices:\nA. red\nB. green\nC. blue" in data.question_text(recs[1])
    assert [r.category for r in recs] == ["geometry problem solving"] + ["figure question answering"] * 3
    assert [r.meta for r in recs] == [{}, {}, {"precision": 1}, {"precision": 2}]  # only decimal answers get one


def test_mathvista_json_with_image_paths(tmp_path):
    (tmp_path / "images").mkdir()
    for i, colour in enumerate(("red", "blue", "green", "white"), 1):
        (tmp_path / "images" / f"{i}.jpg").write_bytes(png(colour))
    rows = {r["pid"]: dict(r, precision=r["precision"] and int(r["precision"])) for r in MATHVISTA}  # JSON: ints
    (tmp_path / "testmini.json").write_text(json.dumps(rows))  # keyed by pid, as published
    recs = benchmarks.load_bench("mathvista", tmp_path / "testmini.json")
    check_mathvista(recs)
    assert recs[1].images == [str(tmp_path / "images" / "2.jpg")]  # relative to the file


def test_mathvista_parquet_as_published(tmp_path):
    colours = ("red", "blue", "green", "red")
    rows = [dict(r, decoded_image=image(c, path=r["image"])) for r, c in zip(MATHVISTA, colours)]
    recs = benchmarks.load_bench("mathvista", write_parquet(tmp_path / "testmini-00000-of-00001.parquet", rows,
                                                    images=["decoded_image"]))
    check_mathvista(recs)
    assert recs[1].images[0].getpixel((0, 0)) == (0, 0, 255)  # decoded from the bytes, not the (absent) path


def mathverse_row(sid, pid, version, question, answer, qtype, colour):
    """A record of AI4Math/MathVerse's testmini parquet: every published column."""
    return {"sample_index": sid, "problem_index": pid, "problem_version": version, "question": question,
            "image": image(colour, path=f"images_version_1-4/image_{pid}.png"), "answer": answer,
            "question_type": qtype,
            "metadata": {"split": "testmini", "source": "GeoQA", "subject": "plane geometry", "subfield": "angle"},
            "query_wo": f"Please directly answer the question.\nQuestion: {question}",
            "query_cot": f"Please first conduct reasoning, and then answer the question.\nQuestion: {question}",
            "question_for_eval": question}


def test_mathverse_versions_and_options_in_the_question(tmp_path):
    rows = [
        mathverse_row("1", "1", "Text Dominant", "As shown in the figure, find angle A.\nChoices:\nA:20°\nB:25°"
                      "\nC:40°\nD:50°", "C", "multi-choice", "red"),
        mathverse_row("5", "1", "Vision Only", "", "C", "multi-choice", "red"),
        mathverse_row("6", "2", "Text Lite", "What is the length of AB?", "6", "free-form", "green"),
        mathverse_row("9", "3", "Vision Intensive", "Find x. Choices: A:1 B:2", "B", "multi-choice", "blue"),
    ]
    recs = benchmarks.load_bench("mathverse", write_parquet(tmp_path / "testmini.parquet", rows, images=["image"]))
    assert [r.category for r in recs] == ["Text Dominant", "Vision Only", "Text Lite", "Vision Intensive"]
    assert recs[0].question == "As shown in the figure, find angle A."
    assert (recs[0].choices, recs[0].answer) == (["20°", "25°", "40°", "50°"], "C")
    assert recs[1].question == "Answer the question shown in the image."  # options only in the image:
    assert (recs[1].choices, recs[1].answer) == (None, "C")  # graded by letter alone
    assert (recs[2].choices, recs[2].answer) == (None, "6")
    assert (recs[3].question, recs[3].choices, recs[3].answer) == ("Find x. Choices: A:1 B:2", None, "B")  # left inline
    assert [r.images[0].getpixel((0, 0)) for r in recs] == [(255, 0, 0), (255, 0, 0), (0, 128, 0), (0, 0, 255)]


def test_mathverse_golds_that_are_not_a_bare_letter(tmp_path):
    """Eleven of MathVerse testmini's 436 multiple-choice problems (ZrrSkywalker/MathVerse,
    data/testmini_text_only.json) give the gold as an option's text, as "(C)", as two letters, or
    list an empty option. The rows below have the golds and layouts of its samples 339, 429, 517,
    440, 622 and 555; their questions and options are shortened."""
    rows = [
        mathverse_row("339", "339", "Text Dominant", "Find the bearing.\nChoice:\nA. 090^\\circ T\nB. 180^\\circ T\n"
                      "C. 049^\\circ T\nD. 041^\\circ T", "090^\\circ T", "multi-choice", "red"),
        mathverse_row("429", "429", "Text Dominant", "Is the function odd?\nChoice:\nA. True\nB. False", "False",
                      "multi-choice", "red"),
        mathverse_row("517", "517", "Text Lite", "How is y changing?\nChoices:\nA.constant rate\nB.decreasing rate\n"
                      "C.increasing rate", "(C)", "multi-choice", "red"),
        mathverse_row("440", "440", "Text Dominant", "Which equal $\\tan \\theta$?\nChoices:\nA:$\\tan (\\pi+\\theta)$\n"
                      "B:$\\tan (\\pi-\\theta)$\nC:$\\tan (2 \\pi+\\theta)$\nD:$-\\tan (-\\theta)$", "C\nD",
                      "multi-choice", "red"),
        mathverse_row("622", "622", "Text Dominant", "What does it describe?\nChoices:\nA:time\nB:\nC:a solution",
                      "C", "multi-choice", "red"),
        mathverse_row("555", "555", "Vision Only", "", "A\nC", "multi-choice", "red"),
    ]
    recs = benchmarks.load_bench("mathverse", write_parquet(tmp_path / "testmini.parquet", rows, images=["image"]))
    assert [(r.answer, len(r.choices or [])) for r in recs] == [("A", 4), ("B", 2), ("C", 3), ("C, D", 4), ("C", 0),
                                                                ("A, C", 0)]
    assert recs[4].question.endswith("Choices:\nA:time\nB:\nC:a solution")  # an empty option: left inline

    def right(rec, *answers):
        return [reward.accuracy(f"So \\boxed{{{a}}}.", rec.answer, rec.choices) for a in answers]

    assert right(recs[0], "A", "090^\\circ T", "90^\\circ T", "B", "180^\\circ T") == [1, 1, 1, 0, 0]
    assert right(recs[1], "B", "False", "A", "True") == [1, 1, 0, 0]
    assert right(recs[3], "C, D", "D, C", "C and D", "CD", "C", "D", "A, C, D") == [1, 1, 1, 1, 0, 0, 0]
    assert right(recs[5], "A, C", "C,A", "A", "A, B") == [1, 1, 0, 0]


def mathvision_rows():
    """Records of MathLLMs/MathVision's test parquet: `image` is a path inside its images.zip, the picture
    itself is in `decoded_image`; `options` is empty for a free-form question."""
    return [
        {"id": "1", "question": "<image1> Which shape comes next?", "options": ["A", "B", "C", "D", "E"],
         "image": "images/1.jpg", "decoded_image": image("red", path="1.jpg"), "answer": "D", "solution": None,
         "level": 2, "subject": "logic"},
        {"id": "2", "question": "How many dots are there?", "options": [], "image": "images/2.jpg",
         "decoded_image": image("green", path="2.jpg"), "answer": "7", "solution": "Count them.", "level": 1,
         "subject": "counting"},
    ]


def check_mathvision(recs):
    assert (recs[0].answer, recs[0].choices, recs[0].category) == ("D", ["A", "B", "C", "D", "E"], "logic")
    assert (recs[1].answer, recs[1].choices, recs[1].category) == ("7", None, "counting")


def test_mathvision_parquet_as_published(tmp_path):
    recs = benchmarks.load_bench("mathvision", write_parquet(tmp_path / "test-00000-of-00001.parquet", mathvision_rows(),
                                                     images=["decoded_image"]))
    check_mathvision(recs)
    assert [r.images[0].getpixel((0, 0)) for r in recs] == [(255, 0, 0), (0, 128, 0)]


def test_mathvision_jsonl_with_paths_and_base64(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "1.jpg").write_bytes(png("red"))
    one, two = mathvision_rows()
    rows = [{k: v for k, v in one.items() if k != "decoded_image"},  # the image as a file beside the data
            dict(two, decoded_image=base64.b64encode(png("green")).decode())]
    recs = benchmarks.load_bench("mathvision", write_jsonl(tmp_path / "test.jsonl", rows))
    check_mathvision(recs)
    assert recs[0].images == [str(tmp_path / "images" / "1.jpg")]
    assert recs[1].images[0].getpixel((0, 0)) == (0, 128, 0)


def mmmu_rows():
    standard = [{"id": "validation_Art_1", "question": "<image 1> <image 2> Which painting is older?",
                 "options": "['the left one', 'the right one', 'both', 'neither']", "explanation": "", "answer": "B",
                 "image_1": image("red"), "image_2": image("blue"),
                 **{f"image_{i}": None for i in range(3, 8)}, "img_type": "['Paintings']", "topic_difficulty": "Easy",
                 "subject": "Art"}]
    vision = [{"id": "validation_Math_3", "image": image("green", (96, 96)),
               "options": "['1', '2', '3', '4']", "answer": "D", "subject": "Math"}]
    return standard, vision


def test_mmmu_pro_standard_and_vision(tmp_path):
    standard, vision = mmmu_rows()
    images = [f"image_{i}" for i in range(1, 8)]  # image_3..image_7 are all null, typed as images
    std = benchmarks.load_bench("mmmu-pro", write_parquet(tmp_path / "standard.parquet", standard, images))[0]
    assert (std.answer, std.choices, std.category) == ("B", ["the left one", "the right one", "both", "neither"], "Art")
    assert [im.getpixel((0, 0)) for im in std.images] == [(255, 0, 0), (0, 0, 255)]  # image_1, image_2 in order
    vis = benchmarks.load_bench("mmmu-pro", write_parquet(tmp_path / "vision.parquet", vision, ["image"]))[0]
    # the options are in the screenshot, so not in the prompt; the letter is graded
    assert (vis.answer, vis.choices, vis.category, len(vis.images)) == ("D", None, "Math", 1)


def test_bad_benchmark_files_name_the_file_and_what_was_expected(tmp_path):
    with pytest.raises(data.DataError, match="nowhere.parquet: file not found"):
        benchmarks.load_bench("mathvista", tmp_path / "nowhere.parquet")
    (tmp_path / "x.csv").write_text("pid,question\n")
    with pytest.raises(data.DataError, match=r"x.csv: unsupported file type '.csv'; expected .jsonl, .json or"):
        benchmarks.load_bench("mathvista", tmp_path / "x.csv")
    bad = write_jsonl(tmp_path / "bad.jsonl", [MATHVISTA[0], '{"pid": "3", '])
    with pytest.raises(data.DataError, match=rf"{bad}:2: invalid JSON"):
        benchmarks.load_bench("mathvista", bad)
    (tmp_path / "notparquet.parquet").write_text("hello")
    with pytest.raises(data.DataError, match="notparquet.parquet: not a readable parquet file"):
        benchmarks.load_bench("mathvista", tmp_path / "notparquet.parquet")
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "1.jpg").write_bytes(png("red"))
    rows = [MATHVISTA[0], {k: v for k, v in MATHVISTA[0].items() if k != "answer"},  # every bad record, at once
            dict(MATHVISTA[1], answer="purple"), dict(MATHVISTA[0], image="images/9.png"),
            dict(MATHVISTA[2], precision=None), dict(MATHVISTA[3], precision=1.5), dict(MATHVISTA[3], precision=1e18),
            dict(MATHVISTA[0], metadata="x"), dict(MATHVISTA[0], metadata={"task": ["a", "b"]}),
            dict(MATHVISTA[0], pid="1\ud800")]
    path = write_jsonl(tmp_path / "mv.jsonl", rows)
    with pytest.raises(data.DataError) as err:
        benchmarks.load_bench("mathvista", path)
    lines = str(err.value).splitlines()
    assert lines[0].startswith(f"9 bad record(s) in {path} for mathvista; expected per record: pid, question")
    assert lines[1:] == [f"{path}:2: missing field 'answer'",
                         f"{path}:3: answer 'purple' is not one of the options ['red', 'green', 'blue']",
                         f"{path}:4: image file not found: images/9.png",
                         f"{path}:5: missing field 'precision'",
                         f"{path}:6: field 'precision' must be a whole number of decimals, 0 to 15, got 1.5",
                         f"{path}:7: field 'precision' must be a whole number of decimals, 0 to 15, got 1e+18",
                         f"{path}:8: field 'metadata' must be an object, not 'x'",
                         f"{path}:9: field 'metadata.task' (the category) must be a string, not \"['a', 'b']\"",
                         f"{path}:10: field 'pid' must be a non-empty string or a number, not '1\\ud800'"]


def test_malformed_fields_images_and_options_are_said_per_record_before_a_model_loads(tmp_path):
    """What a file from elsewhere may hold: each record said with its line, none passed on to fail
    (or be graded wrongly) once the model has loaded."""
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")  # beside the data's folder, in the test's own
    tmp_path = tmp_path / "data"
    (tmp_path / "images").mkdir(parents=True)
    (tmp_path / "images" / "1.jpg").write_bytes(png("red"))
    (tmp_path / "notes.txt").write_text("not a picture")
    one = {k: v for k, v in mathvision_rows()[0].items() if k != "decoded_image"}  # images/1.jpg, options A-E
    rows = [one, dict(one, answer="AB"), dict(one, question=5), dict(one, answer=[1]), dict(one, options="ABCDE"),
            dict(one, image="../outside.png"), dict(one, image="notes.txt"),
            dict(one, question="<image> beside <image>", options=[]), dict(one, options=["1", "2<|im_end|>", "3", "4", "5"]),
            dict(one, subject=["algebra"]), dict(one, question="q\udfff"),
            dict(one, image=base64.b64encode(jpeg()[:-300]).decode()), dict(one, image="images/wide.png")]
    Image.new("RGB", (4020, 20)).save(tmp_path / "images" / "wide.png")
    with pytest.raises(OSError, match="truncated"):  # what the rollout drawing it met
        Image.open(io.BytesIO(jpeg()[:-300])).load()
    assert benchmarks._image(jpeg(), tmp_path).size == (96, 64)  # a whole one passes
    path = write_jsonl(tmp_path / "test.jsonl", rows)
    with pytest.raises(data.DataError) as err:
        benchmarks.load_bench("mathvision", path)
    assert str(err.value).splitlines()[1:] == [
        f"{path}:2: answer 'AB' is not an option letter A-E",
        f"{path}:3: field 'question' must be a string",
        f"{path}:4: field 'answer' must be a non-empty string or a number, not '[1]'",
        f"{path}:5: the options must be a list of strings or numbers, not 'ABCDE'",
        f"{path}:6: ../outside.png is not inside the data file's folder (image paths are relative to it)",
        f"{path}:7: unreadable image notes.txt (UnidentifiedImageError)",
        f"{path}:8: 2 '<image>' placeholder(s) in field 'question' for 1 image(s)",
        f"{path}:9: option B writes the control token <|im_end|>, which the tokenizer reads as that token, not as text",
        f"{path}:10: field 'subject' (the category) must be a string, not \"['algebra']\"",
        f"{path}:11: field 'question' holds a lone surrogate (a \\ud800-\\udfff escape), which is not text",
        f"{path}:12: the image is a JPEG cut short (no end marker after its last scan)",
        f"{path}:13: image images/wide.png is 4020x20: the processor takes an aspect ratio of at most 200:1"]
    standard = mmmu_rows()[0][0]
    deep = "(" * 40_000 + ")" * 40_000  # Python's parser gives up: said, not a RecursionError
    one_image = dict(standard, question="Which painting is older?", image_1=base64.b64encode(png("red")).decode(),
                     image_2=None)
    path = write_jsonl(tmp_path / "mmmu.jsonl", [dict(one_image, options=o) for o in ("'abcd'", "5", deep)])
    with pytest.raises(data.DataError) as err:
        benchmarks.load_bench("mmmu-pro", path)
    assert str(err.value).splitlines()[1:] == [f"{path}:1: the options must be a list of strings or numbers, not 'abcd'",
                                               f"{path}:2: the options must be a list of strings or numbers, not '5'",
                                               f"{path}:3: field 'options' is not a list"]
    path.write_text('{"id": \n{"id": "2"}\n{"id": \n')
    with pytest.raises(data.DataError, match=r"^2 bad line\(s\) in .*mmmu.jsonl:\n.*:1: invalid JSON .*\n.*:3: invalid"):
        benchmarks.load_bench("mmmu-pro", path)
    path.write_text(f'{{"id": {"9" * 5000}}}\n' + "[" * 100_000 + "\n")  # Python's own limits: said, not raised
    with pytest.raises(data.DataError) as err:
        benchmarks.load_bench("mmmu-pro", path)
    assert str(err.value).splitlines()[1:] == [
        f"{path}:1: invalid JSON (Exceeds the limit (4300 digits) for integer string conversion: value has 5000 digits)",
        f"{path}:2: invalid JSON (maximum recursion depth exceeded while decoding a JSON array from a unicode string)"]
