"""What a user gets wrong on the command line: one sentence, no traceback, said once under torchrun
(whose own failure report follows it, with the sentence as the root cause). Every check here is
refused before a model loads, so each command costs only Python's start-up."""
import json
import os
import re
import sys
from dataclasses import asdict
from pathlib import Path

import procs
import vlr

ROOT = Path(__file__).resolve().parent.parent
CHEAP = ["--prompts-per-step", "4", "--group-size", "4", "--max-new-tokens", "24", "--eval-every", "0", "--steps", "1"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
TORCHRUN_LOG = re.compile(r"[DIWEC]\d{4} \d\d:\d\d")  # the launcher's own log lines: glog's level, date, time
KNOWN = ["tiny", "smoke-3b-1l", "smoke-3b-2l"]


def refused(script: str, args: list[str], torchrun: bool) -> str:
    """What the refused command said: it failed, and the lines its processes printed are its
    message alone, once (torchrun's report, from its first log line or traceback on, set aside)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = procs.run([*(TORCHRUN if torchrun else [sys.executable]), script, *args], 300, cwd=ROOT, env=env)
    assert res.returncode != 0, res.stderr[-2000:]
    lines = res.stderr.splitlines()
    if torchrun:
        report = next(i for i, line in enumerate(lines) if line.startswith("Traceback"))
        assert res.stderr.count("Traceback") == 1 and "ChildFailedError" in res.stderr, res.stderr
        lines = [line for line in lines[:report] if not TORCHRUN_LOG.match(line)]
        assert f"traceback : {lines[0]}" in res.stderr, res.stderr  # the report's root cause: the sentence
    assert "Traceback" not in "\n".join(lines), res.stderr
    return "\n".join(lines)


def test_a_missing_model_or_run_folder_a_bad_flag_and_bad_data_are_one_sentence_said_once(tmp_path):
    missing = str(tmp_path / "no-such-model")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    for torchrun in (False, True):
        out = str(tmp_path / f"run-{torchrun}")
        said = refused("vlr.py", [*CHEAP, "--out", out, "--model", missing], torchrun)
        assert "\n" not in said and missing in said and all(name in said for name in KNOWN), said
        said = refused("vlr.py", [*CHEAP, "--out", out, "--resume"], torchrun)
        assert "\n" not in said and out in said and "--resume" in said, said
        said = refused("vlr.py", [*CHEAP, "--out", out, "--data", str(bad)], torchrun)
        head, line = said.splitlines()  # the report lists every bad line under its head
        assert head == f"1 bad line(s) in {bad}:" and line.startswith(f"{bad}:1: invalid JSON"), said
        said = refused("vlr.py", ["--stepz", "3"], torchrun)
        assert said == "vlr.py: error: unrecognized arguments: --stepz 3 (--help lists every flag)", said
        said = refused("eval.py", ["--bench", "toy", "--model", missing], torchrun)
        assert "\n" not in said and missing in said and all(name in said for name in KNOWN), said
        assert not Path(out).exists()  # nothing was written


def test_a_resume_of_a_run_killed_before_its_first_checkpoint_is_one_sentence(tmp_path):
    args = [*CHEAP, "--out", str(tmp_path), "--resume"]
    (tmp_path / "config.json").write_text(json.dumps(asdict(vlr.parse_args(args))))  # what such a run leaves
    said = refused("vlr.py", args, False)
    assert said == f"--resume: no checkpoint in {tmp_path}/ckpt to resume from", said
