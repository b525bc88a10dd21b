"""walkthrough.ipynb: executed whole, as a reader runs it, in the project's Python.

nbclient runs it in a kernel of this interpreter (jupyter_client starts the `python3` kernel with
sys.executable), in the repository, with TMPDIR in pytest's folder; any error fails. Then: the
prompt's picture and the figures of sections 4-7 are in the outputs, each section names a README
section that exists and calls the functions it names, no cell is long, every figure has a title and
labelled axes, the committed copy carries its outputs, and the repository was not written to."""
import importlib
import os
import re
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

import models

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "walkthrough.ipynb"
FIGURES = {1: 1, 4: 1, 5: 1, 6: 2, 7: 1}  # section: the images its outputs show at least
MAX_LINES = 15
SKIP = {".git", ".venv", ".cache", "__pycache__", ".pytest_cache"}  # not the repository's files


def sections(nb) -> dict[int, list]:
    """The cells of each numbered section ("## N. ..." opens one, the next "## " closes it)."""
    out, current = {}, None
    for cell in nb.cells:
        head = re.match(r"## (\d+)\. ", cell.source) if cell.cell_type == "markdown" else None
        if cell.cell_type == "markdown" and cell.source.startswith("## "):
            current = int(head.group(1)) if head else None
        if current is not None:
            out.setdefault(current, []).append(cell)
    return out


def code(cells) -> str:
    return "\n".join(c.source for c in cells if c.cell_type == "code")


def images(cells) -> int:
    return sum("image/png" in o.get("data", {}) for c in cells if c.cell_type == "code" for o in c.outputs)


def files(root: Path) -> dict:
    """Every file of the checkout (but SKIP) with its size and modification time."""
    out = {}
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIP]
        for name in names:
            st = (Path(folder) / name).stat()
            out[str(Path(folder, name).relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    models.resolve("tiny")  # built here if no test has yet: the notebook's time is its own
    nb = nbformat.read(NOTEBOOK, as_version=4)
    before = files(ROOT)
    tmp = tmp_path_factory.mktemp("notebook")
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute(
        env={**os.environ, "TMPDIR": str(tmp)})
    assert files(ROOT) == before, "executing the notebook wrote into the repository"
    return nb


def test_it_runs_in_this_python_and_shows_the_picture_and_the_figures(executed):
    first = next(c for c in executed.cells if c.cell_type == "code")
    assert f"Python: {sys.executable}\n" in "".join(o.get("text", "") for o in first.outputs)
    found = sections(executed)
    for n, at_least in FIGURES.items():
        assert images(found[n]) >= at_least, f"section {n} shows {images(found[n])} images, not {at_least}"


def test_each_section_names_its_readme_section_and_calls_the_functions_it_names():
    found = sections(nbformat.read(NOTEBOOK, as_version=4))
    assert sorted(found) == list(range(1, 8))
    anchors = {slug(h) for h in re.findall(r"^#+ (.+)$", (ROOT / "README.md").read_text(), re.M)}
    for n, cells in found.items():
        head = cells[0].source
        links = re.findall(r"\(README\.md#([\w-]+)\)", head)
        assert links and set(links) <= anchors, (n, set(links) - anchors)
        names = re.findall(r"`([\w.]+)`", re.search(r"^Calls: (.+)$", head, re.M).group(1))
        assert names, n
        for name in names:
            module, *attrs = name.split(".")
            obj = importlib.import_module(module)
            for attr in attrs:
                obj = getattr(obj, attr, None)
            assert callable(obj), f"section {n} names {name}, which is no function of the project"
            call = f"{name}(" if len(attrs) == 1 else f".{attrs[-1]}("  # a method is called on an instance
            assert call in code(cells), f"section {n} names {name} but does not call it"


def test_cells_are_short_and_every_figure_has_a_title_and_labelled_axes():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert len(cell.source.splitlines()) <= MAX_LINES, cell.source
            if "subplots(" in cell.source:
                assert all(word in cell.source for word in ("title", "xlabel", "ylabel")), cell.source


def test_the_committed_copy_shows_its_outputs():
    """It renders where the repository is hosted: the picture and the figures are in the file."""
    found = sections(nbformat.read(NOTEBOOK, as_version=4))
    for n, at_least in FIGURES.items():
        assert images(found[n]) >= at_least, f"section {n} of the committed notebook: run the refresh command"
