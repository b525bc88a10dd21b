"""Records and the prompt template.

Everything the trainer (vlr.py) and the evaluator (eval.py) feed to the model is a `Record`:
one question about one or more images, with a gold answer and, for multiple choice, the options.
Records come from a data file (`load_records`: ViRL39K as released, `39Krelease.parquet` beside its
`images/` folder, or a ViRL39K-style `.jsonl`) or from the toy task (toy.py).
"""
import hashlib
import io
import json
import math
import os
import stat
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

LETTERS = "ABCDEFGHIJ"

# ViRL39K marks where each image goes in the question with this; the prompt puts the image there.
IMAGE = "<image>"

# The paper's prompt (published code, template "default"): no system prompt of its own (the chat
# template adds Qwen's default one); the user turn is the image(s), the question, then this line.
# The published code, too, puts an image at each `<image>` of the question; a question without one
# gets a single image block before the whole prompt, ahead of the system turn, however many images
# it has (data_processor.py `handle_placeholders`); ours puts them at the start of the user turn.
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

# The published training bounds every image to 256..1280 visual tokens (28 x 28 pixels each). The
# hub processor of Qwen2.5-VL allows 12.8M pixels (~16k tokens a picture): far over any budget.
PUBLISHED_MIN_PIXELS, PUBLISHED_MAX_PIXELS = 256 * 28 * 28, 1280 * 28 * 28


@dataclass
class Record:
    id: str
    images: list  # paths (str) or PIL images
    question: str
    answer: str
    choices: list | None = None  # option texts; then `answer` is a letter, "A" for choices[0]
    category: str = ""  # benchmark sub-category or toy tier, for per-category accuracy
    meta: dict = field(default_factory=dict)  # the data file's other columns (ViRL39K: source, pass rates)


class DataError(ValueError):
    """Bad input data; the message lists every bad line or row as `file:line: reason` (jsonl) or
    `file:row N: reason` (parquet)."""


# ---------------------------------------------------------------------------------------------
# The prompt
# ---------------------------------------------------------------------------------------------

def _options(rec: Record) -> str:
    if not rec.choices:
        return ""
    return "\nChoices:\n" + "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(rec.choices))


def question_text(rec: Record) -> str:
    """The question's text with lettered options for multiple choice; `<image>` placeholders stay
    in it, to show where `messages` puts the images."""
    return rec.question + _options(rec)


def messages(rec: Record, min_pixels: int | None = None, max_pixels: int | None = None) -> list:
    """Chat messages for one record: one user turn with the images, the question and INSTRUCTION.

    Each `<image>` in the question is replaced by its image, in order; a question without any has
    its images first. min/max_pixels travel with each image so that qwen_vl_utils resizes it to the
    same budget as the model's image processor (its own default allows 12.8M pixels per image)."""
    budget = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v}
    texts = rec.question.split(IMAGE)
    if len(texts) == 1:
        texts = [""] * len(rec.images) + texts
    elif len(texts) - 1 != len(rec.images):  # loaded files are checked; others (eval's) may not be
        raise DataError(f"record {rec.id}: {_mismatch(len(texts) - 1, len(rec.images))}")
    texts[-1] += f"{_options(rec)}\n\n{INSTRUCTION}"
    content = [{"type": "text", "text": texts[0]}] if texts[0] else []
    for img, text in zip(rec.images, texts[1:]):  # text i+1 follows image i
        content.append({"type": "image", "image": img, **budget})
        if text:
            content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


def _mismatch(placeholders: int, images: int) -> str:
    return f"{placeholders} '{IMAGE}' placeholder(s) in field 'question' for {images} image(s)"


def encode_prompts(processor, records: list[Record]):
    """Tokenise a batch of prompts, left-padded, with images: what `rollout.sample` starts from.

    Returns the processor's BatchFeature: input_ids, attention_mask, pixel_values (the patches of
    all images, image after image), image_grid_thw (one row per image) and mm_token_type_ids
    (1 on image tokens: the mrope positions in `get_rope_index` are built from it)."""
    from qwen_vl_utils import process_vision_info

    ip = processor.image_processor
    chats = [messages(r, ip.size["shortest_edge"], ip.size["longest_edge"]) for r in records]
    texts = [processor.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    # Both walk the content lists in order, so the i-th image block of the text gets the i-th image.
    images, _ = process_vision_info(chats, image_patch_size=ip.patch_size)
    return processor(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt")


def images_per_prompt(batch: dict) -> list[int]:
    """Number of images in each prompt: the runs of image tokens in `mm_token_type_ids`."""
    img = batch["mm_token_type_ids"] == 1
    starts = img[:, 1:] & ~img[:, :-1]
    return (starts.sum(1) + img[:, 0].long()).tolist()


def repeat_prompts(batch: dict, g: int) -> dict:
    """Each prompt G times in a row (the group). `pixel_values` holds the patches of every image
    one after another and `image_grid_thw` one row per image; a prompt may have several images.
    So patches are repeated image-block by image-block, in the order of the grid rows: getting
    this wrong silently pairs responses with another prompt's image."""
    out = {k: batch[k].repeat_interleave(g, dim=0) for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    grids = batch["image_grid_thw"]
    per_image = torch.split(batch["pixel_values"], grids.prod(-1).tolist())
    blocks, grid_rows, first = [], [], 0
    for n in images_per_prompt(batch):
        for _ in range(g):
            blocks.extend(per_image[first:first + n])
            grid_rows.append(grids[first:first + n])
        first += n
    out["pixel_values"] = torch.cat(blocks)
    out["image_grid_thw"] = torch.cat(grid_rows)
    return out


def prompts_for_step(n_data: int, step: int, per_step: int, rank: int, world: int, seed: int) -> list[int]:
    """This rank's prompt indices at `step`: epochs of seeded shuffles, cut into steps. A pure
    function of the step, so a resumed run sees exactly the prompts it would have seen."""
    per_rank = per_step // world
    first = step * per_step + rank * per_rank
    out = []
    for i in range(first, first + per_rank):
        epoch, k = divmod(i, n_data)
        perm = torch.randperm(n_data, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.append(int(perm[k]))
    return out


def identity(records) -> str:
    """What prompts_for_step draws from, in one line: its size and a hash of each record's id,
    question and answer in order; a task made by its flags names itself (toy.ToyTask.identity).
    Prompts are drawn by position, so two lists that differ give other prompts at the same step."""
    if hasattr(records, "identity"):
        return records.identity()
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps([r.id, r.question, r.answer]).encode())
    return f"{len(records)} records (sha256 {h.hexdigest()[:12]})"


# ---------------------------------------------------------------------------------------------
# Data files
# ---------------------------------------------------------------------------------------------

def load_records(path: str, skip_bad: bool = False) -> tuple[list[Record], int]:
    """The records of a `.parquet` (ViRL39K as released) or `.jsonl` file, and how many bad ones
    skip_bad dropped; see `load_parquet` and `load_jsonl`."""
    loaders = {".jsonl": load_jsonl, ".parquet": load_parquet}
    suffix = Path(path).suffix
    if not suffix and not Path(path).exists():  # a mistyped folder's name: not "unsupported file type ''"
        raise DataError(f"{path}: file not found")
    if suffix not in loaders:
        raise DataError(f"{path}: unsupported file type '{suffix}'; expected .parquet or .jsonl")
    return loaders[suffix](path, skip_bad)


def _lists_paths(kind) -> bool:
    """Whether a parquet column of this type holds lists of strings (ViRL39K's `image`: paths)."""
    import pyarrow as pa

    return (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and (
        pa.types.is_string(kind.value_type) or pa.types.is_large_string(kind.value_type))


def _is_paths(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(p, str) and p for p in value)


def _check_images(paths: list, base: Path):
    """The image paths resolved against `base`, each opened to check it, or the reason they are bad."""
    images = []
    for p in paths:
        if reason := bad_image(base, p):
            return f"field 'image': {reason}"
        images.append(str(base / p))
    return images


# A question's length, checked without a tokenizer: Qwen2.5's tokenizer puts a text in Unicode's NFC form,
# which can double its bytes (Tibetan's U+0F76), then each byte-level BPE token is at least one byte of it: a
# text whose NFC form is n bytes is at most n tokens, and English runs ~4 bytes a token. The published code
# cuts every prompt at 10,240 tokens (data_processor.py, Qwen2VLDataProcessor.__call__); ours refuses a
# question that could be longer than 4 times that: for the 3B, up to 1.5 GB of KV cache (36.9 KB a token)
# in each of its G samples, where docs/memory.md sizes a whole prompt, picture included, at ~1,400 tokens.
MAX_QUESTION_BYTES = 4 * 10_240


def unfit_question(question: str, images: int, choices=None) -> str | None:
    """Why a question and its options cannot go to the model as written, or None: its `<image>`
    marks cannot place its images, it writes a control token, or it is over MAX_QUESTION_BYTES.
    Every reader asks it (jsonl, parquet, benchmarks.load_bench), so that it is said before a model loads."""
    if not is_text(question):
        return "field 'question' holds a lone surrogate (a \\ud800-\\udfff escape), which is not text"
    size = sum(len(unicodedata.normalize("NFC", t).encode("utf-8", "surrogatepass"))
               for t in [question, *(choices or [])])
    if size > MAX_QUESTION_BYTES:
        return (f"field 'question' and its options are {size:,} bytes of text (in NFC form, as the tokenizer reads "
                f"them), over the {MAX_QUESTION_BYTES:,} taken (up to as many tokens)")
    return misplaced(question, images) or control_token(question, choices)


def is_text(value: str) -> bool:
    """Whether UTF-8 can write `value`: JSON's "\\ud800" escapes read as a lone surrogate, which the
    tokenizer refuses at the first rollout and a results file at the end of an evaluation."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def misplaced(question: str, images: int) -> str | None:
    """Why a question's `<image>` marks cannot place its images (one mark per image, or none), or None."""
    placeholders = question.count(IMAGE)
    return _mismatch(placeholders, images) if placeholders and placeholders != images else None


# Qwen2.5's control tokens written out: its tokenizer reads each as that one token, not as text, so a
# question holding one would end the user turn early (<|im_end|>) or add image tokens that no image
# fills (<|image_pad|>: the processor's error at the first rollout, naming no record).
CONTROL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<|fim_prefix|>",
                  "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")


def control_token(question: str, choices=None) -> str | None:
    """Why a question or its options cannot go to the model as text (`CONTROL_TOKENS`), or None."""
    for where, value in [("field 'question'", question), *((f"option {LETTERS[i]}", c) for i, c in enumerate(choices or []))]:
        if found := next((t for t in CONTROL_TOKENS if t in value), None):
            return f"{where} writes the control token {found}, which the tokenizer reads as that token, not as text"
    return None


def bad_image(base: Path, p: str) -> str | None:
    """Why the image file `p` (a path relative to the data file's folder `base`) cannot be used, or
    None. A path must stay inside that folder: a downloaded file names its images, not the rest of
    the disk ("/etc/..." and "../..." are refused; a link inside the folder is followed)."""
    norm = os.path.normpath(p)
    if os.path.isabs(norm) or norm == os.pardir or norm.startswith(os.pardir + os.sep):
        return f"{p} is not inside the data file's folder (image paths are relative to it)"
    try:
        if not stat.S_ISREG(os.stat(base / p).st_mode):  # a FIFO would block the reader forever
            return f"{p} is not a regular file"
        raw = (base / p).read_bytes()
        with Image.open(io.BytesIO(raw)) as im:
            im.verify()  # reads the whole file's structure without decoding pixels
            if reason := image_fault(im, raw):
                return f"image {p} {reason}"
    except FileNotFoundError:
        return f"file not found: {p}"
    except Exception as e:  # PIL raises many kinds for a corrupt file
        return f"unreadable image {p} ({type(e).__name__})"
    return None


MAX_ASPECT = 200  # Qwen2.5-VL's processor (smart_resize) refuses an image whose long side is over 200x its short


def image_fault(im: Image.Image, raw: bytes) -> str | None:
    """Why an image that PIL opened, from the bytes `raw`, still cannot go to the model, or None:
    its shape or size, or a JPEG cut short. Over PIL's decompression-bomb limit (Image.MAX_IMAGE_PIXELS,
    89.5M; None switches it off) Image.open warns, over twice it refuses: one between the two would
    be decoded whole every time it is drawn (docs/data.md), to be resized to 1280 * 28^2 pixels at
    most. PIL's verify() reads a PNG whole but checks nothing of a JPEG, whose pixels would fail only
    at the rollout that draws it. A JPEG's scan data cannot hold the end marker FF D9 (every FF byte
    in it is followed by 00 or a restart marker, ITU T.81 B.1.1.5), so one that ends after its last
    scan's start (FF DA) was written whole."""
    w, h = im.size
    if max(w, h) > MAX_ASPECT * min(w, h):
        return f"is {w}x{h}: the processor takes an aspect ratio of at most {MAX_ASPECT}:1"
    if (limit := Image.MAX_IMAGE_PIXELS) and w * h > limit:
        return f"is {w}x{h}, {w * h:,} pixels: over PIL's decompression-bomb limit of {limit:,}"
    if im.format == "JPEG" and raw.rfind(b"\xff\xd9") < raw.rfind(b"\xff\xda"):
        return "is a JPEG cut short (no end marker after its last scan)"
    return None


def _gather(path: Path, checked, skip_bad: bool, unit: str) -> tuple[list[Record], int]:
    """Records from (location, Record or the reason it is bad) pairs. All bad ones are reported at
    once as `file:location: reason` (a DataError), so a user fixes a file in one pass and no
    training starts on bad data. With skip_bad they are dropped instead; the number dropped is
    returned beside the records so the caller can log it."""
    records, errors = [], []
    for where, rec in checked:
        if isinstance(rec, str):
            errors.append(f"{path}:{where}: {rec}")
        else:
            records.append(rec)
    if errors and not skip_bad:
        raise DataError(f"{len(errors)} bad {unit}(s) in {path}:\n" + "\n".join(errors))
    if not records:
        raise DataError(f"{path}: no usable records")
    return records, len(errors)


# jsonl (ViRL39K-style): {"id", "image": path or [paths], "question", "answer", "choices"?, "category"?}

def parse_json(raw: bytes, place: str = "column"):
    """(the value of the JSON text `raw`, None), or (None, why it is not JSON text): an error's place
    said as its `column` (a jsonl line) or its `line` (a whole file). Python's own limits (an
    integer of over 4300 digits, nesting deeper than the stack) make invalid JSON too, not a traceback."""
    try:
        return json.loads(raw.decode("utf-8")), None
    except UnicodeDecodeError as e:
        return None, f"not UTF-8 text (byte {e.start + 1})"
    except json.JSONDecodeError as e:
        return None, f"invalid JSON ({e.msg} at {place} {e.colno if place == 'column' else e.lineno})"
    except (ValueError, RecursionError) as e:
        return None, f"invalid JSON ({str(e).split(';')[0]})"


def _check_line(line: bytes, base: Path):
    """Parse one jsonl line into a Record, or return the reason it is bad."""
    row, reason = parse_json(line)
    if reason:
        return reason
    if not isinstance(row, dict):
        return "expected a JSON object"
    for key in ("id", "image", "question", "answer"):
        if key not in row:
            return f"missing field '{key}'"
    for key, value in (("id", row["id"]), ("answer", row["answer"])):
        if text(value) is None:
            return f"field '{key}' must be a non-empty string or a number, not {json.dumps(value)[:40]}"
    if not isinstance(row["question"], str) or not row["question"].strip():
        return "field 'question' is empty or not a string"
    if not isinstance(row.get("category") or "", str):
        return "field 'category' must be a string"
    paths = row["image"] if isinstance(row["image"], list) else [row["image"]]
    if not _is_paths(paths):
        return "field 'image' must be a path or a non-empty list of paths"
    choices, answer = row.get("choices"), text(row["answer"])
    if choices is not None:
        if not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS) or None in map(text, choices):
            return f"field 'choices' must be a list of 2 to {len(LETTERS)} options, each a string or a number"
        if answer not in LETTERS[:len(choices)] or len(answer) != 1:  # Record.choices: the gold is a letter
            return f"field 'answer' must be the letter of an option, A to {LETTERS[len(choices) - 1]}, not {answer!r}"
    if reason := unfit_question(row["question"], len(paths), [text(c) for c in choices or []]):
        return reason
    images = _check_images(paths, base)
    if isinstance(images, str):
        return images
    return Record(id=text(row["id"]), images=images, question=row["question"], answer=answer,
                  choices=[text(c) for c in choices] if choices else None, category=row.get("category") or "")


def text(value) -> str | None:
    """A field given as a non-empty string or a finite number, as a string; None for anything else
    (null, a list, a bool, NaN), which would otherwise be trained on as its text ("None"), and a
    string that UTF-8 cannot write (`is_text`)."""
    if isinstance(value, str):
        return value.strip() if value.strip() and is_text(value) else None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return str(value)
    return None


def load_jsonl(path: str, skip_bad: bool = False) -> tuple[list[Record], int]:
    """Read and validate every line (image paths are relative to the file); bad lines are
    reported as `file:line: reason`, or dropped and counted with skip_bad."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with open(path, "rb") as f:  # rstrip: else a line cut short fails at "line 2 column 1"
        checked = ((n, _check_line(line.rstrip(b"\r\n"), path.parent)) for n, line in enumerate(f, 1) if line.strip())
        return _gather(path, checked, skip_bad, "line")


# parquet: ViRL39K's 39Krelease.parquet. The question marks each image's place with `<image>`;
# the answer is already wrapped (`\boxed{...}`) and kept so, since the grader unwraps golds.

PARQUET_COLUMNS = ("qid", "question", "answer", "image")  # required; `category` and other scalar columns optional


def _scalar(kind) -> bool:
    """Whether a parquet column of this type holds an integer, a float, a flag or a string in each row:
    such a column beyond PARQUET_COLUMNS and `category` (ViRL39K's source, pass rates) is kept in each
    Record's meta. Other kinds (lists, structs, bytes, decimals, times) are not read: a few hundred KB of
    lists can expand to gigabytes of Python objects."""
    import pyarrow as pa

    if pa.types.is_dictionary(kind):  # a categorical column (pandas writes one so): its values are what is read
        kind = kind.value_type
    return any(is_kind(kind) for is_kind in (pa.types.is_integer, pa.types.is_floating, pa.types.is_boolean,
                                             pa.types.is_string, pa.types.is_large_string, pa.types.is_string_view))


def _check_row(row: dict, base: Path):
    """One parquet row as a Record, or the reason it is bad."""
    if row["qid"] is None or not str(row["qid"]).strip():
        return "field 'qid' is empty"
    for key in ("question", "answer"):
        if not isinstance(row[key], str) or not row[key].strip():
            return f"field '{key}' is empty or not a string"
    if not _is_paths(row["image"]):
        return "field 'image' must be a non-empty list of paths"
    if reason := unfit_question(row["question"], len(row["image"])):
        return reason
    images = _check_images(row["image"], base)
    if isinstance(images, str):
        return images
    meta = {k: v for k, v in row.items() if k not in PARQUET_COLUMNS + ("category",)}
    category = row.get("category")
    return Record(id=str(row["qid"]), images=images, question=row["question"], answer=row["answer"].strip(),
                  category="" if category is None else str(category), meta=meta)


def load_parquet(path: str, skip_bad: bool = False) -> tuple[list[Record], int]:
    """Read and validate every row of a ViRL39K parquet (image paths are relative to the file);
    bad rows are reported as `file:row N: reason` (N from 1), or dropped and counted with skip_bad.
    A missing column, or an image or category column of the wrong kind, is said before any row is
    read; only the columns a Record keeps are read (`_scalar`)."""
    import pyarrow.parquet as pq  # here, not at the top: most runs never read a parquet

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        schema = pq.read_schema(path)
        missing = [c for c in PARQUET_COLUMNS if c not in schema.names]
        kind = None if missing else schema.field("image").type
        paths = kind is not None and _lists_paths(kind)
        category = schema.field("category").type if "category" in schema.names else None
        columns = [f.name for f in schema if f.name in PARQUET_COLUMNS or _scalar(f.type)]
        fit = paths and (category is None or _scalar(category))
        rows = pq.read_table(path, columns=columns).to_pylist() if fit else []
    except Exception as e:  # pyarrow's errors for a truncated or non-parquet file vary
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; "
                        f"a ViRL39K parquet has {', '.join(PARQUET_COLUMNS)}")
    if not paths:  # said once, not for each of 38,870 rows
        raise DataError(f"{path}: column 'image' holds {kind}; a ViRL39K parquet lists each row's image paths "
                        "(strings, relative to the file): pictures stored in the file are not read")
    if not fit:
        raise DataError(f"{path}: column 'category' holds {category}; a row's category is one string or number")
    return _gather(path, ((f"row {n}", _check_row(r, path.parent)) for n, r in enumerate(rows, 1)), skip_bad, "row")

