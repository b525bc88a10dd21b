"""hub.py: data and benchmarks by their hub names, resolved offline (HF_HUB_OFFLINE=1) against a
folder laid out as the hub's cache (HF_HUB_CACHE: datasets--<org>--<name>/{refs, snapshots, blobs},
the snapshot's files links into blobs) holding the released file names, with small files in the
released schemas (released.py). Nothing here reaches the hub: a bad id online is answered by a
stand-in hub on this machine that knows no repository."""
import hashlib
import http.server
import os
import re
import sys
import threading
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import data
import benchmarks
import hub
import procs
import released
from distributed import UserError

ROOT = Path(__file__).resolve().parent.parent
VIRL = hub.DATASETS["TIGER-Lab/ViRL39K"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty hub cache, offline: in the environment for child processes, and in huggingface_hub's
    constants, which it read from the environment when this process first imported it."""
    from huggingface_hub import constants

    path = tmp_path / "hub"
    path.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(path))
    return path


def cached(cache: Path, repo: str, revision: str, files: dict) -> Path:
    """`files` (name in the repository -> local file) as a download leaves them in the cache: each a
    link from the revision's snapshot into blobs/, and refs/main naming the revision."""
    folder = cache / f"datasets--{repo.replace('/', '--')}"
    for name, src in files.items():
        content = Path(src).read_bytes()
        blob = folder / "blobs" / hashlib.sha256(content).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(content)
        link = folder / "snapshots" / revision / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(revision)
    return folder / "snapshots" / revision


@pytest.fixture
def virl(tmp_path):
    """ViRL39K as released, in both forms: its parquet beside images/ and beside images.zip."""
    parquet = released.make_virl(tmp_path / "virl", largest=(640, 480))
    return parquet, released.pack_images(parquet.parent)


def cache_virl(cache, virl) -> Path:
    parquet, archive = virl
    return cached(cache, VIRL.repo, VIRL.revision, {"39Krelease.parquet": parquet, "images.zip": archive})


def test_virl39k_by_its_hub_name_is_the_release_unpacked_once(cache, virl, capsys):
    snapshot = cache_virl(cache, virl)
    path = hub.data_file("TIGER-Lab/ViRL39K")
    assert path == str(snapshot / "39Krelease.parquet")
    records, _ = data.load_records(path)
    originals, _ = data.load_records(str(virl[0]))  # the same release read from its plain folder
    assert [(r.id, r.question, r.answer, r.meta) for r in records] == [(r.id, r.question, r.answer, r.meta)
                                                                       for r in originals]
    for rec, orig in zip(records, originals):
        assert [Path(p).parent for p in rec.images] == [snapshot / "images"] * len(rec.images)
        assert [Path(p).read_bytes() for p in rec.images] == [Path(p).read_bytes() for p in orig.images]
    assert capsys.readouterr().out.count("unpacking images.zip") == 1
    (snapshot / "images" / "a.png").unlink()
    assert hub.data_file("TIGER-Lab/ViRL39K") == path  # unpacked once: the marker says so, nothing is redone
    assert not (snapshot / "images" / "a.png").exists() and "unpacking" not in capsys.readouterr().out


# each member takes a second to unpack: without the lock both processes would find no marker, and both unpack
CHILD = """
import os, pathlib, time, zipfile
import data, hub
ready = pathlib.Path(os.environ["READY"])
(ready / str(os.getpid())).touch()  # before it asks for the lock
extract = zipfile.ZipFile.extract


def extract_once_both_asked(self, *a):  # the other is then waiting on the lock; without one, unpacking too
    deadline = time.monotonic() + 60
    while len(list(ready.iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    return extract(self, *a)


zipfile.ZipFile.extract = extract_once_both_asked
path = hub.data_file("TIGER-Lab/ViRL39K")
print(path, len(data.load_records(path)[0]))
"""


def test_processes_at_once_unpack_once_from_the_environments_cache(cache, virl, tmp_path):
    """Two processes at once (as torchrun's on one node), told of the cache and of offline mode by
    the environment alone: one unpacks, the other waits on the lock and uses the result. The one
    unpacking waits until both have asked, so that without the lock both would unpack."""
    snapshot = cache_virl(cache, virl)
    (tmp_path / "ready").mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", READY=str(tmp_path / "ready"))
    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda _: procs.run([sys.executable, "-c", CHILD], 120, cwd=ROOT, env=env), range(2)))
    assert [r.returncode for r in runs] == [0, 0], [r.stderr for r in runs]
    lines = [line for r in runs for line in r.stdout.splitlines()]
    assert sum(line.startswith("unpacking images.zip") for line in lines) == 1, lines
    loaded = [line for line in lines if not line.startswith("unpacking")]
    assert loaded == [f"{snapshot / '39Krelease.parquet'} 4"] * 2  # both read all four records


def zip_with(path: Path, *members) -> Path:
    """A zip of (name, content) members; content None makes the name a symbolic link to ../outside."""
    with zipfile.ZipFile(path, "w") as z:
        for name, content in members:
            if content is None:
                info = zipfile.ZipInfo(name)
                info.external_attr = 0o120777 << 16  # S_IFLNK: a link, its target the member's data
                z.writestr(info, "../outside")
            else:
                z.writestr(name, content)
    return path


@pytest.mark.parametrize("name", ["../evil.txt", "absolute", "images/../../evil.txt", "link"])
def test_an_archive_member_that_would_land_outside_is_refused(tmp_path, name):
    name = f"{tmp_path}/abs-evil.txt" if name == "absolute" else name  # in the test's folder, should it land
    folder = tmp_path / "release"
    folder.mkdir()
    archive = zip_with(tmp_path / "images.zip", ("images/ok.txt", "fine"), (name, None if name == "link" else "evil"))
    with pytest.raises(UserError, match=re.escape(f"member {name!r} would land outside {folder}")):
        hub.unpack(archive, folder)
    assert list(folder.iterdir()) == [] and not (tmp_path / "evil.txt").exists()  # nothing unpacked, no marker
    assert not (tmp_path / "abs-evil.txt").exists()


def test_a_damaged_archive_is_a_sentence_and_leaves_no_marker(tmp_path):
    """A member whose compressed data is damaged (zlib.error) or compressed by a method zipfile
    cannot read (NotImplementedError): said, and the next run unpacks it again."""
    folder = tmp_path / "release"
    folder.mkdir()
    archive = tmp_path / "images.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("images/a.txt", "colour " * 1000)
    raw = bytearray(archive.read_bytes())
    start = 30 + len("images/a.txt")  # the member's data, after its local header
    raw[start:start + 8] = b"\xff" * 8
    archive.write_bytes(bytes(raw))
    with pytest.raises(UserError, match=r"images.zip: not a readable zip archive \(error: .*\); unpack it again"):
        hub.unpack(archive, folder)
    raw[8:10] = (99).to_bytes(2, "little")  # the local header's method: 99, AES, which zipfile lacks
    cd = raw.rfind(b"PK\x01\x02")
    raw[cd + 10:cd + 12] = (99).to_bytes(2, "little")  # and the central directory's
    archive.write_bytes(bytes(raw))
    with pytest.raises(UserError, match=r"images.zip: not a readable zip archive \(NotImplementedError: "):
        hub.unpack(archive, folder)
    assert not hub.unpacked(archive, folder).exists()


def test_an_archive_that_would_not_fit_the_disk_is_refused_before_any_member_is_written(tmp_path, monkeypatch):
    """The members' declared sizes bound what zipfile writes (a member that says 1,000 bytes and holds
    a million writes at most 1,000, and its CRC fails): their sum against the disk's free space is
    said before any is unpacked."""
    folder = tmp_path / "release"
    folder.mkdir()
    archive = tmp_path / "images.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("images/a.txt", b"\0" * 1_000_000)
        z.writestr("images/b.txt", b"\0" * 2_000_000)
    free = lambda n: lambda path: SimpleNamespace(free=n)
    monkeypatch.setattr(hub.shutil, "disk_usage", free(2_999_999))
    with pytest.raises(UserError, match=re.escape(f"{archive}: unpacked, its 2 members take 3,000,000 more bytes "
                                                  f"and {folder} has 2,999,999 bytes free; nothing unpacked")):
        hub.unpack(archive, folder)
    assert list(folder.iterdir()) == []
    with zipfile.ZipFile(archive) as z:  # an unpacking cut short after a.txt: a.txt is written over, b.txt is new
        z.extract("images/a.txt", folder)
    monkeypatch.setattr(hub.shutil, "disk_usage", free(1_999_999))
    with pytest.raises(UserError, match=re.escape("take 2,000,000 more bytes")):
        hub.unpack(archive, folder)
    monkeypatch.setattr(hub.shutil, "disk_usage", free(2_000_000))
    hub.unpack(archive, folder)
    assert (folder / "images" / "b.txt").stat().st_size == 2_000_000 and hub.unpacked(archive, folder).exists()

    raw = bytearray(archive.read_bytes())  # a.txt says 1,000 bytes, in its local header and the central directory
    raw[22:26] = (1000).to_bytes(4, "little")
    cd = raw.find(b"PK\x01\x02")
    raw[cd + 24:cd + 28] = (1000).to_bytes(4, "little")
    archive.write_bytes(bytes(raw))
    lying = tmp_path / "lying"
    lying.mkdir()
    monkeypatch.setattr(hub.shutil, "disk_usage", free(10**9))
    with pytest.raises(UserError, match="not a readable zip archive"):  # its CRC, over the 1,000 bytes
        hub.unpack(archive, lying)
    assert (lying / "images" / "a.txt").stat().st_size <= 1000  # none of it (the CRC fails on the read)


def test_an_archive_member_onto_a_file_of_the_hub_is_refused(cache, virl):
    """The snapshot's files are links into blobs/: a member named like one would write through the link."""
    parquet, _ = virl
    archive = zip_with(parquet.parent / "evil.zip", ("images/a.png", "x"), ("39Krelease.parquet", "overwritten"))
    snapshot = cache_virl(cache, (parquet, archive))
    with pytest.raises(UserError, match="member '39Krelease.parquet' would land outside"):
        hub.data_file("TIGER-Lab/ViRL39K")
    assert (snapshot / "39Krelease.parquet").read_bytes() == parquet.read_bytes()
    assert not (snapshot / "images").exists()


def test_benchmarks_without_data_read_their_published_split(cache, tmp_path):
    mathvista = hub.BENCHMARKS["mathvista"]
    cached(cache, mathvista.repo, mathvista.revision, {mathvista.files[0]: released.make_mathvista(tmp_path / "mv", 3)})
    records = benchmarks.load_bench("mathvista")
    assert [(r.id, r.answer, r.meta) for r in records] == [(str(i), "28.27", {"precision": 2}) for i in range(3)]
    # MMMU-Pro's standard setting comes in two files: both are read, in order
    mmmu = hub.BENCHMARKS["mmmu-pro"]
    shards = {}
    for i, name in enumerate(mmmu.files):
        rows = [{"id": f"test_Art_{i}", "question": "<image 1> Which painting is older?", "options": "['left', 'right']",
                 "answer": "AB"[i], "image_1": {"bytes": (tmp_path / "mv" / "p.png").read_bytes(), "path": None},
                 "subject": "Art"}]
        shards[name] = tmp_path / f"mmmu-{i}.parquet"
        pq.write_table(pa.Table.from_pylist(rows), shards[name])
    cached(cache, mmmu.repo, mmmu.revision, shards)
    assert [(r.id, r.answer, r.choices) for r in benchmarks.load_bench("mmmu-pro")] == [
        ("test_Art_0", "A", ["left", "right"]), ("test_Art_1", "B", ["left", "right"])]


def test_offline_and_not_cached_is_one_sentence_naming_the_download(cache, virl):
    with pytest.raises(UserError) as err:
        hub.data_file("TIGER-Lab/ViRL39K")
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"--data: dataset TIGER-Lab/ViRL39K is not in the hub's cache "
                                                      f"({cache}) and the hub is not asked (HF_HUB_OFFLINE is set); ")
    assert ("`hf download TIGER-Lab/ViRL39K 39Krelease.parquet images.zip --repo-type dataset "
            f"--revision {VIRL.revision}`") in message
    with pytest.raises(UserError, match=r"`hf download MMMU/MMMU_Pro 'standard \(10 options\)/test-00000-of-00002"
                                        r"\.parquet' 'standard \(10 options\)/test-00001-of-00002\.parquet' "
                                        r"--repo-type dataset --revision b037bbe"):
        benchmarks.load_bench("mmmu-pro")
    cached(cache, VIRL.repo, VIRL.revision, {"39Krelease.parquet": virl[0]})  # a download cut short
    with pytest.raises(UserError, match=rf"^--data: images.zip of TIGER-Lab/ViRL39K at {VIRL.revision} not in \S+; "
                                        r"`hf download TIGER-Lab/ViRL39K 39Krelease.parquet images.zip"):
        hub.data_file("TIGER-Lab/ViRL39K")
    # offline, the hub cannot say that a name does not exist: the sentence says so
    with pytest.raises(UserError, match=r"--data: dataset nobody/no-such-data is not in the hub's cache .* a name it "
                                        r"does not have cannot be told from one not yet downloaded; download it with "
                                        r"`hf download nobody/no-such-data --repo-type dataset`"):
        hub.data_file("nobody/no-such-data")


class NoRepository(http.server.BaseHTTPRequestHandler):
    """A stand-in hub that has no repository at all, answering as the hub does (404, RepoNotFound)."""
    asked = []

    def do_GET(self):
        self.asked.append(self.path)
        self.send_response(404)
        self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


def test_a_bad_id_is_one_sentence_and_nothing_is_trained(cache, virl, monkeypatch, tmp_path):
    from huggingface_hub import constants

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NoRepository)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        with pytest.raises(UserError, match=r"^--data: the hub has no dataset nobody/no-such-data \(or it is private "
                                            r"or gated, .*`hf auth login`\)$"):
            hub.data_file("nobody/no-such-data")
        assert NoRepository.asked
        # a pinned release whose files are all cached is not asked about again (the hub would deny it here)
        NoRepository.asked.clear()
        snapshot = cache_virl(cache, virl)
        assert hub.data_file("TIGER-Lab/ViRL39K") == str(snapshot / "39Krelease.parquet") and not NoRepository.asked
    finally:
        server.shutdown()
        server.server_close()
    # the trainer, offline: the sentence alone, before any model loads or anything is trained
    out = tmp_path / "run"
    run = procs.run([sys.executable, "vlr.py", "--data", "nobody/no-such-data", "--out", str(out)], 120, cwd=ROOT)
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines() == [f"--data: dataset nobody/no-such-data is not in the hub's cache ({cache}) "
                                               "and the hub is not asked (HF_HUB_OFFLINE is set), so a name it does not "
                                               "have cannot be told from one not yet downloaded; download it with `hf "
                                               "download nobody/no-such-data --repo-type dataset` where the hub is "
                                               "reachable (into this cache, or copy the cache here), or give a local "
                                               "path"]
    assert not (out / "metrics.jsonl").exists()


def test_a_dataset_with_other_columns_is_one_sentence(cache, tmp_path):
    other = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist([{"problem": "What is x?", "images": ["a.png"], "solution": "2"}]), other)
    snapshot = cached(cache, "someone/other-data", "0" * 40, {"train.parquet": other, "data/more.parquet": other})
    path = hub.data_file("someone/other-data")
    assert path == str(snapshot / "train.parquet")  # the top-level file of a dataset vlr does not know
    with pytest.raises(data.DataError, match=r"^\S+train.parquet: missing column\(s\) qid, question, answer, image; "
                                             r"a ViRL39K parquet has qid, question, answer, image$"):
        data.load_records(path)


def test_an_existing_path_wins_over_a_hub_id(cache, virl, tmp_path, monkeypatch):
    """A folder named like the hub id (a release fetched with `hf download --local-dir`) is used as
    it is, its archive unpacked in it; the hub's cache is not looked at (it is empty: offline, asking
    it would fail)."""
    parquet, archive = virl
    local = tmp_path / "TIGER-Lab" / "ViRL39K"
    local.mkdir(parents=True)
    for src in (parquet, archive):
        (local / src.name).write_bytes(src.read_bytes())
    monkeypatch.chdir(tmp_path)
    path = hub.data_file("TIGER-Lab/ViRL39K")
    assert path == str(Path("TIGER-Lab/ViRL39K/39Krelease.parquet"))
    assert len(data.load_records(path)[0]) == 4 and (local / "images" / "c.jpg").exists()
    assert hub.data_file("TIGER-Lab/ViRL39K/39Krelease.parquet") == "TIGER-Lab/ViRL39K/39Krelease.parquet"
    assert hub.data_file("TIGER-Lab/train.jsonl") == "TIGER-Lab/train.jsonl"  # a missing file, not a hub id
    assert list(cache.iterdir()) == []


def test_an_archive_unpacked_by_hand_is_read_as_it_is_and_an_unwritable_place_is_a_sentence(cache, virl, tmp_path,
                                                                                          monkeypatch):
    """A folder as `hf download --local-dir` and `unzip` leave it (no marker of ours) is read without
    writing anything, as a read-only mount must be; an archive not unpacked where nothing can be
    written (the folder, or the hub's cache) is one sentence, not a traceback."""
    parquet, archive = virl
    folder = tmp_path / "by-hand"
    folder.mkdir()
    (folder / parquet.name).write_bytes(parquet.read_bytes())
    (folder / archive.name).write_bytes(archive.read_bytes())
    with zipfile.ZipFile(archive) as z:
        z.extractall(folder)
        first = next(m for m in z.infolist() if not m.is_dir())
    before = sorted(folder.rglob("*"))
    monkeypatch.setattr(hub.checkpoint, "build_lock", lambda path: pytest.fail(f"{path} written"))
    assert hub.data_file(str(folder)) == str(folder / parquet.name) and sorted(folder.rglob("*")) == before

    def read_only(path):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(hub.checkpoint, "build_lock", read_only)
    (folder / first.filename).write_bytes(b"cut short")  # a member of another size: not unpacked
    with pytest.raises(UserError, match=rf"^--data {re.escape(str(folder))}: images.zip not unpacked, and "
                                        rf"{re.escape(str(folder))} cannot be written \(Read-only file system\); "
                                        r"unpack it there once \(unzip\)"):
        hub.data_file(str(folder))
    cache_virl(cache, virl)  # the hub's cache: the files there, the archive not unpacked
    with pytest.raises(UserError, match=r"^--data: TIGER-Lab/ViRL39K needs its files fetched or unpacked in \S+, which "
                                        r"cannot be written \(Read-only file system\)"):
        hub.data_file("TIGER-Lab/ViRL39K")


def test_a_release_all_there_is_read_without_writing_and_the_hubs_failures_are_sentences(cache, virl, tmp_path,
                                                                                          monkeypatch):
    """A cache (or a folder) whose files and unpacked archives are all there is used without its
    lock, which would have to be written: a read-only cache serves. What the hub's library leaves
    as other exceptions is said in a sentence: a dataset with no data file at the top (the folder
    it returns does not exist), offline after a download cut short, an HTTP error mid-file, a name
    the hub could never have (a file not found)."""
    import httpx2
    from huggingface_hub.errors import LocalEntryNotFoundError

    snapshot = cache_virl(cache, virl)
    assert hub.data_file("TIGER-Lab/ViRL39K") == str(snapshot / "39Krelease.parquet")  # unpacked, under the lock
    lock = hub.checkpoint.build_lock
    monkeypatch.setattr(hub.checkpoint, "build_lock", lambda path: pytest.fail(f"{path} written"))
    assert hub.data_file("TIGER-Lab/ViRL39K") == str(snapshot / "39Krelease.parquet")
    assert hub.data_file(str(snapshot)) == str(snapshot / "39Krelease.parquet")  # the folder itself, as a path
    monkeypatch.setattr(hub.checkpoint, "build_lock", lock)

    def none_at_the_top(repo, **kw):  # huggingface_hub: no file matched, the snapshot's path returned anyway
        return str(cache / "datasets--someone--standard" / "snapshots" / ("b" * 40))

    monkeypatch.setattr(hub.huggingface_hub, "snapshot_download", none_at_the_top)
    with pytest.raises(UserError, match=r"^--data someone/standard: expected one .parquet or .jsonl file at the top "
                                        r"of \S+ \(ViRL39K's layout\), found none; give the data file's path instead$"):
        hub.data_file("someone/standard")

    def dropped(repo, **kw):
        raise httpx2.RemoteProtocolError("peer closed connection without sending complete message body")

    monkeypatch.setattr(hub.huggingface_hub, "snapshot_download", dropped)
    with pytest.raises(UserError, match=r"^--bench mathvista: downloading AI4Math/MathVista failed \(RemoteProtocolError"
                                        r": peer closed connection .*\); run it again where the hub is reachable$"):
        hub.benchmark_files("mathvista")

    def offline(repo, **kw):
        raise LocalEntryNotFoundError("images.zip is not in the cache")

    monkeypatch.setattr(hub.huggingface_hub, "snapshot_download", offline)
    cut = hub.Release("someone/cut-short", "c" * 40, ("train.parquet",), ("images.zip",))
    cached(cache, cut.repo, cut.revision, {"train.parquet": virl[0]})
    with pytest.raises(UserError, match=r"^--data: images.zip of someone/cut-short at c{40} not in \S+; `hf download"):
        hub.fetch(cut, "--data")
    assert hub.data_file("virl--data/train") == "virl--data/train"  # not a hub id: a path, which the loader misses
