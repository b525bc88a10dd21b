"""Data in the released schemas, made on the spot: ViRL39K's parquet beside its images/ folder (or,
as its hub repository holds it, beside images.zip), and a MathVista testmini parquet with the
pictures' bytes inside. The GPU check trains and evaluates on them (gpu_check.py), and so do the
tests of the real path and of hub names (tests/test_hub.py)."""
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

import data


def picture(size, colour, path: Path) -> str:
    img = Image.new("RGB", size, (255, 255, 255))
    ImageDraw.Draw(img).ellipse((20, 20, size[0] - 20, size[1] - 20), fill=colour)
    img.save(path)
    return path.name


def make_virl(root: Path, largest=(1280, 960)) -> Path:
    """39Krelease.parquet + images/ as ViRL39K releases them: pictures from 448x448 to `largest`,
    one record with two."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    a = picture((448, 448), (220, 40, 40), root / "images" / "a.png")
    b = picture((640, 480), (40, 80, 220), root / "images" / "b.jpg")
    c = picture(largest, (40, 170, 60), root / "images" / "c.jpg")
    rows = [
        {"qid": "q1", "question": "<image>What colour is the circle?", "answer": "\\boxed{red}", "image": [f"images/{a}"]},
        {"qid": "q2", "question": "<image>The radius is 3. What is the area?", "answer": "\\boxed{9\\pi}",
         "image": [f"images/{b}"]},
        {"qid": "q3", "question": "Left: <image> Right: <image> Which is blue?", "answer": "\\boxed{B}",
         "image": [f"images/{a}", f"images/{b}"]},
        {"qid": "q4", "question": "<image>Find x if 2x = 3.", "answer": "\\boxed{\\frac{3}{2}}", "image": [f"images/{c}"]},
    ]
    for r in rows:
        r.update(category="test", source="synthetic", PassRate_32BTrained=0.5, PassRate_7BBase=0.25)
    pq.write_table(pa.Table.from_pylist(rows), root / "39Krelease.parquet")
    return root / "39Krelease.parquet"


def pack_images(root: Path) -> Path:
    """images.zip beside the parquet, as the hub repository TIGER-Lab/ViRL39K holds the pictures: its
    members are the parquet's paths, images/<name>."""
    with zipfile.ZipFile(root / "images.zip", "w") as z:
        for path in sorted((root / "images").iterdir()):
            z.write(path, f"images/{path.name}")
    return root / "images.zip"


def make_mathvista(root: Path, n: int) -> Path:
    """A MathVista testmini-shaped parquet: the picture's bytes in `decoded_image`, free-form floats."""
    root.mkdir(parents=True, exist_ok=True)
    raw = (root / "p.png")
    picture((640, 480), (40, 80, 220), raw)
    rows = [{"pid": str(i), "question": "What is the area of the circle?", "decoded_image": {"bytes": raw.read_bytes()},
             "answer": "28.27", "question_type": "free_form", "answer_type": "float", "precision": 2.0,
             "unit": None, "metadata": {"task": "geometry problem solving"}} for i in range(n)]
    pq.write_table(pa.Table.from_pylist(rows), root / "testmini.parquet")
    return root / "testmini.parquet"


def widest_records(work: Path, n: int, size=(1280, 960)) -> list:
    """n prompts of one picture each; at 1280x960 and the published budget about 1,280 visual
    tokens, the longest prompt the README's memory table counts."""
    path = str(work / picture(size, (40, 170, 60), work / "widest.jpg"))
    return [data.Record(id=str(i), images=[path], question=f"<image>What is the value of x in figure {i}?",
                        answer="1") for i in range(n)]
