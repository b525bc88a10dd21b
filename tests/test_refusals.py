"""What a user gets wrong on the command line: one sentence, no traceback, said once under torchrun
(whose own failure report follows it, with the sentence as the root cause). Every check here is
refused before a model loads, so each command costs only Python's start-up."""
import json
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, fields
from pathlib import Path

import pytest

import models
import procs
import vlr
from distributed import UserError

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
    out = {torchrun: str(tmp_path / f"run-{torchrun}") for torchrun in (False, True)}
    cases = [(script, args, torchrun) for torchrun in (False, True) for script, args in (
        ("vlr.py", [*CHEAP, "--out", out[torchrun], "--model", missing]),
        ("vlr.py", [*CHEAP, "--out", out[torchrun], "--resume"]),
        ("vlr.py", [*CHEAP, "--out", out[torchrun], "--data", str(bad)]),
        ("vlr.py", ["--stepz", "3"]),
        ("eval.py", ["--bench", "toy", "--model", missing]))]
    with ThreadPoolExecutor(2) as pool:  # two at a time: each is a Python start-up, mostly one core's work
        said = list(pool.map(lambda case: refused(*case), cases))
    for torchrun, (model, resume, data, flag, evaluation) in ((False, said[:5]), (True, said[5:])):
        assert "\n" not in model and missing in model and all(name in model for name in KNOWN), model
        assert "\n" not in resume and out[torchrun] in resume and "--resume" in resume, resume
        head, line = data.splitlines()  # the report lists every bad line under its head
        assert head == f"1 bad line(s) in {bad}:" and line.startswith(f"{bad}:1: invalid JSON"), data
        assert flag == "vlr.py: error: unrecognized arguments: --stepz 3 (--help lists every flag)", flag
        assert "\n" not in evaluation and missing in evaluation and all(name in evaluation for name in KNOWN), evaluation
        assert not Path(out[torchrun]).exists()  # nothing was written


def test_a_resume_of_a_run_killed_before_its_first_checkpoint_is_one_sentence(tmp_path):
    args = [*CHEAP, "--out", str(tmp_path), "--resume"]
    (tmp_path / "config.json").write_text(json.dumps(asdict(vlr.parse_args(args))))  # what such a run leaves
    said = refused("vlr.py", args, False)
    assert said == f"--resume: no checkpoint in {tmp_path}/ckpt to resume from", said


def test_every_number_flag_has_a_range_and_values_out_of_it_are_said_together(tmp_path):
    """vlr.RANGES, read against a hand-made list of edges: each bad value is refused, the edge
    beside it taken. A new number flag must be given a range (or said here why it needs none)."""
    free = {"seed", "log_samples", "lora_rank"}  # any seed; the last two have sentences of their own
    numbers = {f.name for f in fields(vlr.Config) if f.type in (int, float)}
    ranged = {name for _, _, names in vlr.RANGES for name in names}
    assert numbers - free == ranged, (numbers - free) ^ ranged
    edges = [("--steps", "0", "1"), ("--group-size", "1", "2"), ("--temperature", "0", "0.01"), ("--top-p", "0", "1"),
             ("--top-p", "1.01", "0.01"), ("--top-k", "-1", "0"), ("--adam-beta2", "1", "0"), ("--clip-eps", "1", "0.99"),
             ("--rethink-frac", "1.01", "1"), ("--rethink-max-replace", "-2", "-1"), ("--invalid-penalty", "-0.1", "0"),
             ("--lr", "0", "1e-9"), ("--min-format-rate", "-0.01", "0"), ("--max-pixels", "-1", "0")]
    for flag, bad, edge in edges:
        args = [*CHEAP, "--out", str(tmp_path / "run"), flag]
        vlr.check_ranges(vlr.parse_args([*args, edge]))
        with pytest.raises(UserError, match=rf"^{flag} {bad}(\.0)?: must be "):
            vlr.check_ranges(vlr.parse_args([*args, bad]))
    with pytest.raises(UserError) as said:
        vlr.check_flags(vlr.parse_args([*CHEAP, "--out", str(tmp_path / "run"), "--save-every", "0", "--minibatches",
                                        "0", "--max-pixels", "100", "--min-pixels", "200"]))
    assert str(said.value) == ("--minibatches 0: must be at least 1; --save-every 0: must be at least 1; --max-pixels "
                               "100: must be at least --min-pixels 200 (0: the model's own)")
    assert not (tmp_path / "run").exists()


def test_an_image_budget_only_the_model_makes_impossible_is_said_before_its_weights_load(monkeypatch):
    """--max-pixels alone, under the model's own fewest pixels (the tiny model's 3136): no image
    size is left. Said in a sentence naming the flag, before a weight is loaded."""
    monkeypatch.setattr(models.Qwen2_5_VLForConditionalGeneration, "from_pretrained",
                        lambda *a, **kw: pytest.fail("the weights loaded"))
    with pytest.raises(UserError) as said:
        models.load_model("tiny", max_pixels=3000)
    assert str(said.value) == ("--max-pixels 3000: images would be resized to at least 3136 and at most 3000 pixels "
                               "(without these flags: 3136 to 12544); give a --min-pixels no larger than --max-pixels")
