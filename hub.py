"""Data and benchmarks by their hub names: `vlr.py --data TIGER-Lab/ViRL39K`, `eval.py --bench mathvista`.

A name becomes files on this machine. An existing path is itself: it always wins over a hub id. A
hub id (owner/name) is a dataset repository, downloaded through huggingface_hub into its cache
(HF_HUB_CACHE) on first use; its .zip archives are unpacked once beside the files, in the revision's
snapshot folder, so the paths the data names (ViRL39K's `images/...`) resolve against the data file's
folder as in the release (`hf cache rm` removes them with the revision). The releases below are pinned
to the commit their files were checked against (docs/data.md); any other dataset id is read at its
main branch in ViRL39K's layout: one .parquet or .jsonl at the top, .zip archives beside it.

Under torchrun the processes of a node take turns under a lock: the first downloads and unpacks,
the others find the files cached and each archive's done-marker written, and use them.
"""
import re
import shlex
import shutil
import stat
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import huggingface_hub
from huggingface_hub import constants
from huggingface_hub.errors import (HfHubHTTPError, HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                    RevisionNotFoundError)
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils import validate_repo_id

import checkpoint
from distributed import UserError

HUB_ID = re.compile(r"[\w-][\w.-]*/[\w-][\w.-]*")  # owner/name; a path of more parts, or from . or /, is a folder


@dataclass(frozen=True)
class Release:
    repo: str  # the dataset repository
    revision: str  # the commit its files were checked against
    files: tuple[str, ...]  # the data, in the order its records are read
    archives: tuple[str, ...] = ()  # unpacked beside the files: their members are the paths the data names


DATASETS = {  # --data
    "TIGER-Lab/ViRL39K": Release("TIGER-Lab/ViRL39K", "812ec617dea4bc8a4e751663b88e4ebb7de4d00e",
                                 ("39Krelease.parquet",), ("images.zip",)),
}
MMMU_PRO = "b037bbe72fe851ae9c9a792c7b34722542d4dc78"
BENCHMARKS = {  # eval.py --bench, on the split of the paper's table; the pictures are inside the parquet files
    "mathvista": Release("AI4Math/MathVista", "c12acf2432ad32e93b2c5adbbb6b6b4c52d9c59c",
                         ("data/testmini-00000-of-00001-725687bf7a18d64b.parquet",)),
    "mathverse": Release("AI4Math/MathVerse", "268dfc55b62296be3bdf6406d6dea07bd06a7d64", ("testmini.parquet",)),
    "mathvision": Release("MathLLMs/MathVision", "ac21b30fe42a3c46c77c81a08d9720329e6fb572",
                          ("data/test-00000-of-00001-3532b8d3f1b4047a.parquet",)),
    "mmmu-pro": Release("MMMU/MMMU_Pro", MMMU_PRO,
                        tuple(f"standard (10 options)/test-0000{i}-of-00002.parquet" for i in range(2))),
    "mmmu-pro-vision": Release("MMMU/MMMU_Pro", MMMU_PRO,
                               tuple(f"vision/test-0000{i}-of-00004.parquet" for i in range(4))),
}
DATA_SUFFIXES = (".parquet", ".jsonl")  # what data.load_records reads


def data_file(name: str) -> str:
    """--data as a file for data.load_records: an existing file as it is; a folder (a release as
    `hf download --local-dir` leaves it) as its one data file, its archives unpacked; a hub id as the
    data file of its dataset, downloaded and unpacked; anything else, a missing .parquet or .jsonl
    among it, as it is (the loader says it is not found)."""
    path = Path(name)
    if path.is_file():
        return name
    if path.is_dir():
        found = the_data_file(path, f"--data {name}")
        archives = sorted(path.glob("*.zip"))
        if not all(is_unpacked(a, path) for a in archives):  # all done: nothing written (a read-only mount)
            try:
                with checkpoint.build_lock(path / "vlr"):  # one unpacker at a time
                    for archive in archives:
                        unpack(archive, path)
            except OSError as e:  # the lock: unpack's own errors are sentences already
                raise UserError(f"--data {name}: {', '.join(a.name for a in archives)} not unpacked, and {path} "
                                f"cannot be written ({e.strerror or e}); unpack it there once (unzip), or copy "
                                "the folder where it can be written") from None
        return str(found)
    if not HUB_ID.fullmatch(name) or path.suffix in DATA_SUFFIXES or not hub_id(name):  # data/train.jsonl: a file
        return name  # not found, as the loader says
    release = DATASETS.get(name, Release(name, "main", ()))
    folder = fetch(release, "--data")
    return str(folder / release.files[0] if release.files else the_data_file(folder, f"--data {name}"))


def hub_id(name: str) -> bool:
    """Whether the hub could have a repository of this name (virl--data/train: no)."""
    try:
        validate_repo_id(name)
        return True
    except HFValidationError:
        return False


def benchmark_files(bench: str) -> list[Path]:
    """The published split of a benchmark (BENCHMARKS), from the hub's cache or downloaded into it."""
    release = BENCHMARKS[bench]
    folder = fetch(release, f"--bench {bench}")
    return [folder / f for f in release.files]


def the_data_file(folder: Path, what: str) -> Path:
    """The one .parquet or .jsonl file at the top of `folder`, as ViRL39K's release has it. (A
    download that matched no file leaves no folder: huggingface_hub's `snapshot_download` returns
    the path it would have had.)"""
    found = sorted(p for p in folder.iterdir() if p.suffix in DATA_SUFFIXES and p.is_file()) if folder.is_dir() else []
    if len(found) != 1:
        held = ", ".join(p.name for p in found) or "none"
        raise UserError(f"{what}: expected one .parquet or .jsonl file at the top of {folder} (ViRL39K's layout), "
                        f"found {held}; give the data file's path instead")
    return found[0]


# ---------------------------------------------------------------------------------------------
# The download
# ---------------------------------------------------------------------------------------------

def fetch(release: Release, flag: str) -> Path:
    """The snapshot folder of `release` in the hub's cache, holding its files and, unpacked, its
    archives. A release with no files listed (a dataset vlr does not know) brings the .parquet,
    .jsonl and .zip files at the top of its repository. Refused in one sentence: a repository or
    revision the hub does not have, and, offline or unreachable, one that is not in the cache. The
    lock is in the hub's own lock folder (.locks/, which its cache scan skips); a pinned release
    whose files and unpacked archives are all there is used without it, so a read-only cache serves."""
    repo, wanted = release.repo, release.files + release.archives
    patterns = dict(allow_patterns=list(wanted)) if wanted else dict(
        allow_patterns=[f"*{s}" for s in DATA_SUFFIXES + (".zip",)], ignore_patterns=["*/*"])  # the top only
    cached = repo_folder_name(repo_id=repo, repo_type="dataset")
    folder = Path(constants.HF_HUB_CACHE) / cached / "snapshots" / release.revision
    if wanted and not absent(folder, wanted) and all(is_unpacked(folder / a, folder) for a in release.archives):
        return folder
    try:
        return _fetch_locked(release, flag, folder, patterns, Path(constants.HF_HUB_CACHE) / ".locks" / cached / "vlr")
    except OSError as e:  # the lock: what happens under it is said in sentences already
        raise UserError(f"{flag}: {repo} needs its files fetched or unpacked in {constants.HF_HUB_CACHE}, which "
                        f"cannot be written ({e.strerror or e}); fetch and unpack it once where it can") from None


def _fetch_locked(release: Release, flag: str, folder: Path, patterns: dict, lock: Path) -> Path:
    """`fetch`'s download and unpacking, under `lock`."""
    repo, wanted = release.repo, release.files + release.archives
    with checkpoint.build_lock(lock):
        try:  # a pinned commit's files never change: once all are cached (also by the process before), not asked
            if not wanted or absent(folder, wanted):
                folder = Path(huggingface_hub.snapshot_download(repo, repo_type="dataset", revision=release.revision,
                                                                **patterns))
        except LocalEntryNotFoundError:
            if len(absent(folder, wanted)) < len(wanted):  # offline, a download cut short: say what is missing
                raise UserError(_missing(release, folder, flag)) from None
            raise UserError(_not_cached(release, flag)) from None
        except RevisionNotFoundError:
            raise UserError(f"{flag}: the hub's dataset {repo} has no revision {release.revision}") from None
        except RepositoryNotFoundError:
            raise UserError(f"{flag}: the hub has no dataset {repo} (or it is private or gated, and this machine "
                            "is not logged in with access to it: `hf auth login`)") from None
        except HfHubHTTPError as e:
            raise UserError(f"{flag}: the hub refused {repo}: {checkpoint.first_line(e)}") from None
        except OSError as e:  # a full disk, a cache folder that cannot be written
            raise UserError(f"{flag}: could not download {repo} into {constants.HF_HUB_CACHE} "
                            f"({checkpoint.first_line(e)})") from None
        except Exception as e:  # the HTTP client's own errors are not OSErrors: a connection dropped mid-file
            raise UserError(f"{flag}: downloading {repo} failed ({type(e).__name__}: {checkpoint.first_line(e)}); "
                            "run it again where the hub is reachable") from None
        if absent(folder, wanted):  # a file the revision does not hold
            raise UserError(_missing(release, folder, flag))
        for archive in release.archives if wanted else [p.name for p in sorted(folder.glob("*.zip"))]:
            unpack(folder / archive, folder)
    return folder


def _download(release: Release) -> str:
    """The command that brings `release` into the cache."""
    files = " ".join(shlex.quote(f) for f in release.files + release.archives)
    revision = f" --revision {release.revision}" if release.revision != "main" else ""
    return f"`hf download {release.repo}{' ' + files if files else ''} --repo-type dataset{revision}`"


def absent(folder: Path, names: tuple[str, ...]) -> list[str]:
    """Those of `names` that are not files in `folder`."""
    return [f for f in names if not (folder / f).is_file()]


def _missing(release: Release, folder: Path, flag: str) -> str:
    missing = absent(folder, release.files + release.archives)
    return (f"{flag}: {', '.join(missing)} of {release.repo} at {release.revision} not in {folder}; "
            f"{_download(release)} fetches it where the hub is reachable")


def _not_cached(release: Release, flag: str) -> str:
    why = "the hub is not asked (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else "the hub could not be reached"
    if constants.HF_HUB_OFFLINE and release.revision == "main":  # not a release of ours, which all exist
        why += ", so a name it does not have cannot be told from one not yet downloaded"
    return (f"{flag}: dataset {release.repo} is not in the hub's cache ({constants.HF_HUB_CACHE}) and {why}; "
            f"download it with {_download(release)} where the hub is reachable (into this cache, or copy the "
            "cache here), or give a local path")


# ---------------------------------------------------------------------------------------------
# Archives
# ---------------------------------------------------------------------------------------------

def unpacked(archive: Path, into: Path) -> Path:
    """The marker an archive's unpacking leaves when it is done."""
    return into / f".{archive.name}.unpacked"


def is_unpacked(archive: Path, into: Path) -> bool:
    """Done: its marker is there, or (unpacked by hand: `unzip`) every member is a file of its size."""
    if unpacked(archive, into).exists():
        return True
    try:
        with zipfile.ZipFile(archive) as z:
            return all(m.is_dir() or (into / m.filename).is_file() and (into / m.filename).stat().st_size == m.file_size
                       for m in z.infolist())
    except (zipfile.BadZipFile, OSError):  # unpack says what is wrong with it
        return False


def _size(path: Path) -> int:
    """The size of the file at `path`, 0 if there is none."""
    return path.stat().st_size if path.is_file() else 0


def unpack(archive: Path, into: Path):
    """Unpack a zip archive into `into` once: a done-marker beside it says so, and an unpacking cut
    short (no marker) is done again from the start. Every member is checked before any is written:
    none may land outside `into` (an absolute path, a `..`, a link, or a path through a link, such
    as the hub's own files, which are links into its blob store), and together they must fit the disk."""
    marker = unpacked(archive, into)
    if is_unpacked(archive, into):
        return
    root = into.resolve()
    try:
        with zipfile.ZipFile(archive) as z:
            members = z.infolist()
            for m in members:
                name = PurePosixPath(m.filename)
                if (name.is_absolute() or ".." in name.parts or stat.S_ISLNK(m.external_attr >> 16)
                        or not (into / name).resolve().is_relative_to(root)):
                    raise UserError(f"{archive}: member {m.filename!r} would land outside {into} (an absolute path, "
                                    "'..', a link, or a path through one); nothing unpacked")
            # zipfile writes no more of a member than its declared size (ZipExtFile._read1 cuts at it): an archive
            # whose sizes cannot fit is said before anything is written. A file left by an unpacking cut short is
            # written over, so its bytes count as free; the disk's blocks, or another writer, can still fill it
            # (the OSError below)
            need = sum(max(0, m.file_size - _size(into / m.filename)) for m in members)
            if need > (free := shutil.disk_usage(into).free):
                raise UserError(f"{archive}: unpacked, its {len(members)} members take {need:,} more bytes and "
                                f"{into} has {free:,} bytes free; nothing unpacked")
            print(f"unpacking {archive.name} ({len(members)} members) into {into}", flush=True)
            for m in members:
                z.extract(m, into)
    except (zipfile.BadZipFile, zlib.error, NotImplementedError) as e:  # damaged data, a method zipfile lacks
        raise UserError(f"{archive}: not a readable zip archive ({type(e).__name__}: {e}); unpack it again from a "
                        "whole copy") from None
    except OSError as e:  # a full disk: the next run unpacks again, there is no marker yet
        raise UserError(f"could not unpack {archive} into {into} ({e.strerror or e})") from None
    marker.write_text(f"{len(members)} members\n")
