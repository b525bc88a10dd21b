"""The benchmarks' files -> data.Record: each benchmark read in the schema it is published in.

The splits of the paper's table, read from the files they are published as (.parquet, .jsonl,
.json; images as paths relative to the file, parquet {"bytes", "path"} structs, or base64); without
--data, from the hub dataset in brackets, at the revision docs/data.md names (hub.BENCHMARKS):
  mathvista   MathVista testmini (1,000; AI4Math/MathVista)
  mathverse   MathVerse testmini (3,940 in 5 problem versions; AI4Math/MathVerse), reported per
              version
  mathvision  MathVision test, the full 3,040 (not its 304 testmini; MathLLMs/MathVision)
  mmmu-pro    MMMU-Pro test, "standard (10 options)" (1,730; MMMU/MMMU_Pro)
  mmmu-pro-vision  MMMU-Pro test, "vision" (1,730; MMMU/MMMU_Pro)
The published evaluation names its files MathVista_testmini, MathVerse_testmini,
MathVision_test3040 and MMMUPro_full; which MathVerse versions and which MMMU-Pro setting the
paper's numbers average is not in its published code. EMMA and MEGA-Bench, also in the paper's
table, have no adapter. A record's category, what eval.py reports per sub-category: MathVista's
task, MathVerse's problem version, MathVision's and MMMU-Pro's subject.

An adapter takes a row as published and the folder of its file; a bad row is a DataError that says
what was wrong, and load_bench reports every bad row at once, with what the adapter expects.
"""
import ast
import base64
import binascii
import io
import re
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image

import data
import hub
import toy
from data import DataError


def read_rows(path: Path) -> list:
    """(where, row) for every record of a .jsonl, .json (a list, or an object keyed by id, as
    MathVista's testmini.json) or .parquet file."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.suffix == ".jsonl":
        rows, errors = [], []
        for i, line in enumerate(path.read_bytes().splitlines(), 1):
            if line.strip():
                row, reason = data.parse_json(line)
                if reason:
                    errors.append(f"{path}:{i}: {reason}")
                else:
                    rows.append((f"{path}:{i}", row))
        if errors:  # all at once: a file is fixed in one pass
            raise DataError(f"{len(errors)} bad line(s) in {path}:\n" + "\n".join(errors))
        return rows
    if path.suffix == ".json":
        obj, reason = data.parse_json(path.read_bytes(), "line")
        if reason:
            raise DataError(f"{path}: {reason}")
        rows = list(obj.values()) if isinstance(obj, dict) else obj
    elif path.suffix == ".parquet":
        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow's errors for a truncated or non-parquet file vary
            raise DataError(f"{path}: not a readable parquet file ({e})") from None
    else:
        raise DataError(f"{path}: unsupported file type '{path.suffix}'; expected .jsonl, .json or .parquet")
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a list of records or an object of records")
    return [(f"{path}: record {i}", r) for i, r in enumerate(rows, 1)]


def _decoded(raw: bytes, unreadable: str):
    """The image in `raw`, or a DataError: `unreadable` where PIL cannot open it, else why the
    model cannot take it (data.image_fault). Image.open reads only the header: loading a benchmark
    stays cheap."""
    try:
        img = Image.open(io.BytesIO(raw))
    except Exception:  # PIL raises many kinds for bad bytes
        raise DataError(unreadable) from None
    if reason := data.image_fault(img, raw):
        raise DataError(f"the image {reason}")
    return img


def _image(value, base: Path):
    """An image given as a path (relative to the data file), bytes, a {"bytes", "path"} struct or
    base64 text -> a path or a PIL image."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return _decoded(value, "image bytes are not a readable image")
    if not isinstance(value, str) or not value:
        raise DataError("no image")
    if len(value) < 4096 and (base / value).is_file():  # base64 text is longer than any path
        if reason := data.bad_image(base, value):
            raise DataError(reason)
        return str(base / value)
    try:  # not a file: base64 text, maybe as a data: URL
        raw = base64.b64decode(value.split(",")[-1], validate=True)
    except binascii.Error:
        raw = b""
    return _decoded(raw, f"image file not found: {value[:100]}")


def _need(r: dict, *keys):
    """The fields `keys` of record `r`, each present; a question must be a string, an id or an
    answer a string or a number (a list or a bool would be graded as its text)."""
    for k in keys:
        if r.get(k) is None:
            raise DataError(f"missing field '{k}'")
        if k == "question" and not isinstance(r[k], str):
            raise DataError("field 'question' must be a string")
        if k in ("pid", "id", "sample_index", "answer") and data.text(r[k]) is None:
            raise DataError(f"field '{k}' must be a non-empty string or a number, not {str(r[k])[:40]!r}")
    return [r[k] for k in keys]


def _category(value, field: str) -> str:
    """A record's category, from its field `field`: text, or "" where it has none (a list or an
    object was a TypeError in eval.summarize, after every answer was generated)."""
    if value is None or value == "":
        return ""
    if (category := data.text(value)) is None:
        raise DataError(f"field '{field}' (the category) must be a string, not {str(value)[:40]!r}")
    return category


def _option_texts(choices) -> list[str]:
    """The options as text: a list of 2 to 10 strings or numbers."""
    if not isinstance(choices, (list, tuple)) or None in map(data.text, choices):
        raise DataError(f"the options must be a list of strings or numbers, not {str(choices)[:60]!r}")
    if not 2 <= len(choices) <= len(data.LETTERS):
        raise DataError(f"expected 2 to {len(data.LETTERS)} options, got {len(choices)}")
    return [data.text(c) for c in choices]


def _options(answer, choices: list, as_text=False):
    """(letter, option texts): the gold option is given as a letter or, by MathVista, as its text."""
    choices, answer = _option_texts(choices), str(answer).strip()
    if as_text and answer in choices:
        return data.LETTERS[choices.index(answer)], choices
    if not as_text and len(answer) == 1 and answer in data.LETTERS[:len(choices)]:
        return answer, choices
    raise DataError(f"answer '{answer}' is not " + (f"one of the options {choices}" if as_text else
                                                    f"an option letter A-{data.LETTERS[len(choices) - 1]}"))


def mathvista(r, base):
    """pid, question, decoded_image (bytes) or image (path), answer, question_type (multi_choice:
    `choices` holds the option texts and answer is one of them), answer_type (float: `precision`,
    the decimals the answer is graded at), unit, metadata.task (the category)."""
    pid, question, answer, qtype = _need(r, "pid", "question", "answer", "question_type")
    choices, meta = None, {}
    if qtype == "multi_choice":
        answer, choices = _options(answer, _need(r, "choices")[0], as_text=True)
    elif r.get("answer_type") == "float":
        meta["precision"] = _decimals(_need(r, "precision")[0])
    unit = f" (Unit: {r['unit']})" if r.get("unit") else ""  # as in MathVista's own query
    if not isinstance(metadata := r.get("metadata") or {}, dict):
        raise DataError(f"field 'metadata' must be an object, not {str(metadata)[:40]!r}")
    return data.Record(id=str(pid), images=[_image(r.get("decoded_image") or r.get("image"), base)],
                       question=question + unit, answer=str(answer), choices=choices,
                       category=_category(metadata.get("task"), "metadata.task"), meta=meta)


def _decimals(precision) -> int:
    """MathVista's precision: a whole number of decimals, stored as a float in its parquet files."""
    if isinstance(precision, (int, float)) and not isinstance(precision, bool) and float(precision).is_integer() \
            and 0 <= precision <= 15:  # a float holds no more: 1e18 decimals was an error at the first grade
        return int(precision)
    raise DataError(f"field 'precision' must be a whole number of decimals, 0 to 15, got {precision!r}")


_CHOICE_LINE = re.compile(r"^\s*\(?([A-J])\)?\s*[:.：)]\s*(.*?)\s*$")


def mathverse(r, base):
    """sample_index, problem_version (the category), question, image, answer, question_type
    (multi-choice: the answer is a letter, "(C)", an option's text or, where two options are right,
    two letters; the options are in the question text after "Choices:" or, in the vision versions,
    only in the image; there, or where an option is empty, the letter is graded alone)."""
    sid, version, question, answer, qtype = _need(r, "sample_index", "problem_version", "question", "answer",
                                                  "question_type")
    choices, answer = None, _mathverse_answer(str(answer))
    at = re.search(r"\bChoices?\s*:", question) if qtype == "multi-choice" else None
    lines = [_CHOICE_LINE.match(l) for l in question[at.end():].strip().splitlines()] if at else []
    if len(lines) >= 2 and all(m and m[2] for m in lines) and "".join(m[1] for m in lines) == data.LETTERS[:len(lines)]:
        question, texts = question[:at.start()].strip(), [m[2] for m in lines]
        several = answer.split(", ")
        if len(several) > 1 and set(several) <= set(data.LETTERS[:len(texts)]):
            choices = _option_texts(texts)
        else:  # a letter first: an option's text may be a letter too
            letter = len(answer) == 1 and answer in data.LETTERS[:len(texts)]
            answer, choices = _options(answer, texts, as_text=not letter and answer in texts)
    if not question.strip():  # vision only: the whole question is in the image
        question = "Answer the question shown in the image."
    return data.Record(id=str(sid), images=[_image(r.get("image"), base)], question=question,
                       answer=answer, choices=choices, category=_category(version, "problem_version"))


def _mathverse_answer(answer: str) -> str:
    """MathVerse's gold as the grader reads it: "(C)" is C, and two right options ("C\nD", in 2
    of its 788 problems) are "C, D" (reward._letter_set); any other answer as it is."""
    answer = answer.strip()
    if m := re.fullmatch(r"\(([A-J])\)", answer):
        return m[1]
    if re.fullmatch(r"[A-J](?:[\s,]+[A-J])+", answer):
        return ", ".join(answer.replace(",", " ").split())
    return answer


def mathvision(r, base):
    """id, question, options (A-E; empty for free-form), answer (then a letter, else a value),
    decoded_image (bytes) or image (path), subject (the category)."""
    rid, question, answer = _need(r, "id", "question", "answer")
    answer, choices = _options(answer, r["options"]) if r.get("options") else (str(answer).strip(), None)
    return data.Record(id=str(rid), images=[_image(r.get("decoded_image") or r.get("image"), base)],
                       question=question, answer=answer, choices=choices, category=_category(r.get("subject"), "subject"))


def mmmu_pro(r, base):
    """id, options (a list or its Python repr), answer (a letter), subject (the category); the
    standard setting has question and image_1..image_7, the vision setting one screenshot `image`
    that holds question and options (so they are not repeated in the prompt)."""
    rid, options, answer = _need(r, "id", "options", "answer")
    try:  # a Python literal, never code; bounded, since a deep one exhausts the parser's stack
        options = ast.literal_eval(options) if isinstance(options, str) and len(options) < 100_000 else options
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise DataError("field 'options' is not a list") from None
    answer, choices = _options(answer, options)
    if r.get("question") is None:  # vision setting
        images, choices = [_image(_need(r, "image")[0], base)], None
        question = "Answer the question shown in the image."
    else:
        images, question = [_image(r[f"image_{i}"], base) for i in range(1, 8) if r.get(f"image_{i}")], r["question"]
    if not images:
        raise DataError("missing field 'image_1'")
    return data.Record(id=str(rid), images=images, question=question, answer=answer, choices=choices,
                       category=_category(r.get("subject"), "subject"))


# mmmu-pro-vision: MMMU-Pro's vision setting, named apart so that its hub files and its report are its own
ADAPTERS = {"mathvista": mathvista, "mathverse": mathverse, "mathvision": mathvision, "mmmu-pro": mmmu_pro,
            "mmmu-pro-vision": mmmu_pro}


def load_bench(bench: str, path: str | None = None) -> list[data.Record]:
    """The benchmark's records from `path`, or without it from the published split on the hub
    (hub.BENCHMARKS: MMMU-Pro's comes in several files, read in order); every bad record is reported
    at once, with what was expected."""
    if bench == "toy":
        task = toy.ToyTask("test")
        return [task[i] for i in range(len(task))]
    if bench not in ADAPTERS:
        raise DataError(f"unknown benchmark '{bench}'; choose from toy, {', '.join(ADAPTERS)}")
    paths = [Path(path)] if path else hub.benchmark_files(bench)
    records, errors = [], []
    for path in paths:
        for where, r in read_rows(path):
            try:
                if not isinstance(r, dict):
                    raise DataError("expected an object")
                rec = ADAPTERS[bench](r, path.parent)
                if reason := data.unfit_question(rec.question, len(rec.images), rec.choices):
                    raise DataError(reason)
                records.append(rec)
            except DataError as e:
                errors.append(f"{where}: {e}")
    files = ", ".join(map(str, paths))
    if errors:
        expected = " ".join(ADAPTERS[bench].__doc__.split())
        raise DataError(f"{len(errors)} bad record(s) in {files} for {bench}; expected per record: {expected}\n"
                        + "\n".join(errors[:20]) + (f"\n... and {len(errors) - 20} more" if len(errors) > 20 else ""))
    if not records:
        raise DataError(f"{files}: no records")
    return records
