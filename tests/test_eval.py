"""eval.py: benchmark adapters, letter grading, the summary, sharded evaluation, plots."""
import base64
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import data
import eval as ev
import reward

ROOT = Path(__file__).resolve().parent.parent


def png(colour, size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def image(colour, size=(64, 48)) -> dict:
    """An image as parquet files embed it (the Hugging Face `Image` feature)."""
    return {"bytes": png(colour, size), "path": None}


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------------------
# Adapters: a few records in each benchmark's published schema
# ---------------------------------------------------------------------------------------------

MATHVISTA = [
    {"pid": "1", "question": "What is the length of the side?", "image": "images/1.png", "choices": None,
     "unit": "cm", "precision": None, "answer": "5", "question_type": "free_form", "answer_type": "integer",
     "metadata": {"task": "geometry problem solving", "skills": ["geometry reasoning"],
                  "category": "math-targeted-vqa"}},
    {"pid": "2", "question": "Which bar is the tallest?", "image": "images/2.png", "choices": ["red", "green", "blue"],
     "unit": None, "precision": None, "answer": "green", "question_type": "multi_choice", "answer_type": "text",
     "metadata": {"task": "figure question answering", "skills": ["statistical reasoning"], "category": "general-vqa"}},
]


def check_mathvista(recs):
    assert [r.id for r in recs] == ["1", "2"]
    assert recs[0].question == "What is the length of the side? (Unit: cm)"
    assert (recs[0].answer, recs[0].choices) == ("5", None)
    assert (recs[1].answer, recs[1].choices) == ("B", ["red", "green", "blue"])  # the option text became a letter
    assert "Choices:\nA. red\nB. green\nC. blue" in data.question_text(recs[1])
    assert [r.category for r in recs] == ["geometry problem solving", "figure question answering"]


def test_mathvista_json_with_image_paths(tmp_path):
    (tmp_path / "images").mkdir()
    for i, colour in ((1, "red"), (2, "blue")):
        (tmp_path / "images" / f"{i}.png").write_bytes(png(colour))
    (tmp_path / "testmini.json").write_text(json.dumps({r["pid"]: r for r in MATHVISTA}))  # keyed by pid, as published
    recs = ev.load_bench("mathvista", tmp_path / "testmini.json")
    check_mathvista(recs)
    assert recs[1].images == [str(tmp_path / "images" / "2.png")]  # relative to the file


def test_mathvista_parquet_with_embedded_images(tmp_path):
    rows = [dict(r, decoded_image={"bytes": png(c), "path": r["image"]}) for r, c in zip(MATHVISTA, ("red", "blue"))]
    recs = ev.load_bench("mathvista", write_parquet(tmp_path / "testmini-00000-of-00001.parquet", rows))
    check_mathvista(recs)
    assert recs[1].images[0].getpixel((0, 0)) == (0, 0, 255)  # decoded from the bytes, not the (absent) path


def test_mathverse_versions_and_options_in_the_question(tmp_path):
    rows = [
        {"sample_index": "1", "problem_index": "1", "problem_version": "Text Dominant", "image": image("red"),
         "question": "As shown in the figure, find angle A.\nChoices:\nA:20°\nB:25°\nC:40°\nD:50°", "answer": "C",
         "question_type": "multi-choice", "metadata": {"subject": "plane geometry"}, "query_cot": "..."},
        {"sample_index": "5", "problem_index": "1", "problem_version": "Vision Only", "image": image("red"),
         "question": "", "answer": "C", "question_type": "multi-choice", "metadata": {"subject": "plane geometry"},
         "query_cot": "..."},
        {"sample_index": "6", "problem_index": "2", "problem_version": "Text Lite", "image": image("green"),
         "question": "What is the length of AB?", "answer": "6", "question_type": "free-form",
         "metadata": {"subject": "plane geometry"}, "query_cot": "..."},
        {"sample_index": "9", "problem_index": "3", "problem_version": "Vision Intensive", "image": image("blue"),
         "question": "Find x. Choices: A:1 B:2", "answer": "B", "question_type": "multi-choice",
         "metadata": {"subject": "plane geometry"}, "query_cot": "..."},
    ]
    recs = ev.load_bench("mathverse", write_parquet(tmp_path / "testmini.parquet", rows))
    assert [r.category for r in recs] == ["Text Dominant", "Vision Only", "Text Lite", "Vision Intensive"]
    assert recs[0].question == "As shown in the figure, find angle A."
    assert (recs[0].choices, recs[0].answer) == (["20°", "25°", "40°", "50°"], "C")
    assert recs[1].question == "Answer the question shown in the image."  # options only in the image:
    assert (recs[1].choices, recs[1].answer) == (None, "C")  # graded by letter alone
    assert (recs[2].choices, recs[2].answer) == (None, "6")
    assert (recs[3].question, recs[3].choices, recs[3].answer) == ("Find x. Choices: A:1 B:2", None, "B")  # left inline


def test_mathvision_jsonl_with_paths_and_base64(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "1.jpg").write_bytes(png("red"))
    rows = [
        {"id": "1", "question": "<image1> Which shape comes next?", "options": ["A", "B", "C", "D", "E"],
         "image": "images/1.jpg", "answer": "D", "solution": None, "level": 2, "subject": "logic"},
        {"id": "2", "question": "How many dots?", "options": [], "image": "images/2.jpg",
         "decoded_image": base64.b64encode(png("green")).decode(), "answer": "7", "level": 1, "subject": "counting"},
    ]
    recs = ev.load_bench("mathvision", write_jsonl(tmp_path / "test.jsonl", rows))
    assert (recs[0].answer, recs[0].choices, recs[0].category) == ("D", ["A", "B", "C", "D", "E"], "logic")
    assert recs[0].images == [str(tmp_path / "images" / "1.jpg")]
    assert (recs[1].answer, recs[1].choices, recs[1].category) == ("7", None, "counting")
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
    std = ev.load_bench("mmmu-pro", write_parquet(tmp_path / "standard.parquet", standard))[0]
    assert (std.answer, std.choices, std.category) == ("B", ["the left one", "the right one", "both", "neither"], "Art")
    assert [im.getpixel((0, 0)) for im in std.images] == [(255, 0, 0), (0, 0, 255)]  # image_1, image_2 in order
    vis = ev.load_bench("mmmu-pro", write_parquet(tmp_path / "vision.parquet", vision))[0]
    # the options are in the screenshot, so not in the prompt; the letter is graded
    assert (vis.answer, vis.choices, vis.category, len(vis.images)) == ("D", None, "Math", 1)


def test_bad_benchmark_files_name_the_file_and_what_was_expected(tmp_path):
    with pytest.raises(data.DataError, match="nowhere.parquet: file not found"):
        ev.load_bench("mathvista", tmp_path / "nowhere.parquet")
    (tmp_path / "x.csv").write_text("pid,question\n")
    with pytest.raises(data.DataError, match=r"x.csv: unsupported file type '.csv'; expected .jsonl, .json or"):
        ev.load_bench("mathvista", tmp_path / "x.csv")
    with pytest.raises(data.DataError, match="needs --data"):
        ev.load_bench("mathverse", None)
    bad = write_jsonl(tmp_path / "bad.jsonl", [MATHVISTA[0], '{"pid": "3", '])
    with pytest.raises(data.DataError, match=rf"{bad}:2: invalid JSON"):
        ev.load_bench("mathvista", bad)
    (tmp_path / "notparquet.parquet").write_text("hello")
    with pytest.raises(data.DataError, match="notparquet.parquet: not a readable parquet file"):
        ev.load_bench("mathvista", tmp_path / "notparquet.parquet")
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "1.png").write_bytes(png("red"))
    rows = [MATHVISTA[0], {k: v for k, v in MATHVISTA[0].items() if k != "answer"},  # every bad record, at once
            dict(MATHVISTA[1], answer="purple"), dict(MATHVISTA[0], image="images/9.png")]
    path = write_jsonl(tmp_path / "mv.jsonl", rows)
    with pytest.raises(data.DataError) as err:
        ev.load_bench("mathvista", path)
    lines = str(err.value).splitlines()
    assert lines[0].startswith(f"3 bad record(s) in {path} for mathvista; expected per record: pid, question")
    assert lines[1:] == [f"{path}:2: missing field 'answer'",
                         f"{path}:3: answer 'purple' is not one of the options ['red', 'green', 'blue']",
                         f"{path}:4: image file not found: images/9.png"]


def test_cli_reports_a_bad_file_without_loading_a_model(tmp_path):
    run = subprocess.run([sys.executable, "eval.py", "--bench", "mmmu-pro", "--data", str(tmp_path / "missing.json")],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and f"{tmp_path / 'missing.json'}: file not found" in run.stderr


# ---------------------------------------------------------------------------------------------
# Grading and the summary
# ---------------------------------------------------------------------------------------------

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
    def r(cat, correct, rethinks, n):
        return {"category": cat, "correct": correct, "rethinks": rethinks, "len": n}

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

@pytest.fixture(scope="module")
def tiny_model():
    import torch
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    import tiny

    src = tiny.resolve("tiny")
    return (Qwen2_5_VLForConditionalGeneration.from_pretrained(src, dtype=torch.float32).eval(),
            AutoProcessor.from_pretrained(src))


def test_evaluate_grades_every_record_in_order(tiny_model, tmp_path):
    model, processor = tiny_model
    standard, vision = mmmu_rows()
    recs = data.ToyTask("test")
    recs = ([recs[i] for i in range(6)] + ev.load_bench("mmmu-pro", write_parquet(tmp_path / "s.parquet", standard))
            + ev.load_bench("mmmu-pro", write_parquet(tmp_path / "v.parquet", vision)))
    rows = ev.evaluate(model, processor, recs, max_new_tokens=24, batch_size=4)
    assert [r["id"] for r in rows] == [r.id for r in recs]
    for rec, r in zip(recs, rows):
        assert r["correct"] == reward.accuracy(r["response"], rec.answer, rec.choices)
        assert r["rethinks"] == ev.reflects(r["response"]) and 0 < r["len"] <= 24
    again = ev.evaluate(model, processor, recs, max_new_tokens=24, batch_size=8)  # greedy: batching changes nothing
    assert [r["response"] for r in again] == [r["response"] for r in rows]


def run_cli(tmp_path, name, launcher):
    out = tmp_path / f"{name}.jsonl"
    run = subprocess.run([*launcher, "eval.py", "--bench", "toy", "--limit", "10", "--max-new-tokens", "24",
                          "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
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


# ---------------------------------------------------------------------------------------------
# Plot mode
# ---------------------------------------------------------------------------------------------

def test_compare_plots_runs_and_rejects_bad_metrics(tmp_path):
    pytest.importorskip("matplotlib")
    for name, slope in (("ssr", 0.004), ("no-ssr", 0.002)):
        (tmp_path / name).mkdir()
        write_jsonl(tmp_path / name / "metrics.jsonl",
                    [dict({"step": s, "reward_mean": 0.2 + slope * s, "zero_adv_frac": 0.5 - slope * s,
                           "resp_len_mean": 16 + 1000 * slope * s},
                          **({"eval_acc": 0.25 + slope * s} if s % 25 == 24 else {})) for s in range(100)])
    out = ev.plot([str(tmp_path / "ssr"), str(tmp_path / "no-ssr")], str(tmp_path / "compare.png"))
    img = Image.open(out).convert("RGB")
    assert img.size == (2200, 418)  # four panels, 20 x 3.8 inches at 110 dpi
    colours = {c for _, c in img.getcolors(maxcolors=1 << 20)}
    assert (31, 119, 180) in colours and (255, 127, 14) in colours  # one colour per run
    lengths = {c for _, c in img.crop((1650, 0, 2200, 418)).getcolors(maxcolors=1 << 20)}
    assert (31, 119, 180) in lengths and (255, 127, 14) in lengths  # lengths of 16..416 tokens are on their panel
    (tmp_path / "bad").mkdir()
    write_jsonl(tmp_path / "bad" / "metrics.jsonl",
                [{"step": 0, "reward_mean": 0.1, "zero_adv_frac": 0.5}, {"step": 1}])
    with pytest.raises(data.DataError, match=r"bad/metrics.jsonl:2: missing reward_mean, zero_adv_frac"):
        ev.plot([str(tmp_path / "bad")], str(tmp_path / "x.png"))


def test_compare_table_pools_seeds_and_matches_hand_counts(tmp_path):
    def run(name, evals, zero, fixed):
        (tmp_path / name).mkdir()
        rows = [{"step": s, "reward_mean": 0.0, "zero_adv_frac": z, "rethink_fixed": f} for s, (z, f) in enumerate(zip(zero, fixed))]
        for step, acc, reflect in evals:
            rows[step].update(eval_acc=acc, eval_reflect=reflect)
        write_jsonl(tmp_path / name / "metrics.jsonl", rows)
        return str(tmp_path / name)

    runs = [run("full-s0", [(1, 0.5, 0.0), (3, 0.9, 0.2)], [0.5, 0.5, 0.0, 0.0], [0.0, 0.2, 0.2, 0.0]),
            run("full-s1", [(1, 0.8, 0.1), (3, 0.7, 0.4)], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]),
            run("plain-s0", [(3, 0.3, 0.0)], [0.25, 0.25, 0.25, 0.25], [0.0] * 4)]
    lines = ev.compare_table(runs).splitlines()
    assert len(lines) == 4
    # full: final acc 0.9 and 0.7 -> 0.8 +- 0.1414; zero-adv 0.25 and 0.25; steps to 0.8: 4 (s0) and 2 (s1) -> 3;
    # reflection 0.2 and 0.4 -> 0.3 +- 0.1414; rethink_fixed 0.1 and 0.0 -> 0.05 +- 0.0707
    assert lines[2] == "| full | 2 | 0.800 ± 0.141 | 0.250 ± 0.000 | 3 (2/2) | 0.300 ± 0.141 | 0.050 ± 0.071 |"
    assert lines[3] == "| plain | 1 | 0.300 ± 0.000 | 0.250 ± 0.000 | never (0/1) | 0.000 ± 0.000 | 0.000 ± 0.000 |"
