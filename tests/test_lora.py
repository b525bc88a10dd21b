"""lora.py and --lora-rank on the tiny model: only the adapters train, the KL reference is the base
for free, kill and --resume reproduce the run, another base is refused, the final folders load and
evaluate alike, and the refusals. (The 3B-shaped LoRA run under torchrun: tests/test_real.py.)"""
import json
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import Qwen2_5_VLForConditionalGeneration

import benchmarks
import checkpoint
import eval as evaluation
import grpo
import lora
import models
import procs
import rollout
import test_refusals
import test_vlr
import toy
import vlr
from distributed import UserError

LORA = ["--lora-rank", "4", "--lr", "5e-3"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    """A LoRA run with a KL term on a copy of the tiny model, set up in-process, two steps taken
    and saved; with the weights it started from."""
    base = tmp_path_factory.mktemp("base") / "tiny"
    shutil.copytree(models.resolve("tiny"), base)
    out = tmp_path_factory.mktemp("run")
    cfg = vlr.parse_args([*test_vlr.SMALL, *LORA, "--kl-coef", "0.1", "--steps", "2", "--model", str(base),
                          "--out", str(out)])
    run = vlr.setup(cfg)
    start = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    for step in range(2):
        vlr.train_step(run, step)
    vlr.save(run, 2)
    run.log.close()
    return run, start, base


def test_only_the_adapters_train_and_every_path_reaches_the_qwen_modules(trained):
    run, start, base = trained
    fresh = Qwen2_5_VLForConditionalGeneration.from_pretrained(base, dtype=torch.float32).state_dict()
    trainable = {n for n, p in run.model.named_parameters() if p.requires_grad}
    # 2 decoder layers x 7 projections (q, k, v, o, gate, up, down) x (A, B); none in the vision tower
    assert len(trainable) == 28 and all(".lora_" in n and "language_model" in n for n in trainable)
    for name, p in run.model.named_parameters():
        if name in trainable:
            assert p.dtype == torch.float32
            continue
        assert torch.equal(p, start[name]), name  # the base, bit for bit as it started ...
        assert torch.equal(p, fresh[name.replace(".base_layer", "")]), name  # ... and as it is on disk
    b = [n for n in trainable if "lora_B" in n]
    assert all(not start[n].any() and run.model.get_parameter(n).any() for n in b)  # B starts at zero
    assert any(not torch.equal(run.model.get_parameter(n), start[n]) for n in trainable if "lora_A" in n)
    # the module tree is the model's own: what rollout, shard.py and bench.py reach
    assert type(run.model.model).__name__ == "Qwen2_5_VLModel"
    assert type(run.model.model.language_model.layers[0].self_attn.q_proj).__module__.startswith("peft.")
    assert type(run.model.model.visual.blocks[0].mlp.gate_proj) is torch.nn.Linear


def test_the_reference_is_the_base_with_the_adapters_off(trained, one_thread):
    run, _, base = trained
    recs = [toy.ToyTask("train", ["colour"])[i] for i in range(2)]
    ro = rollout.sample(run.model, run.processor, recs, 2, rollout.Decoding(12), torch.Generator().manual_seed(0))
    mb = rollout.collate(rollout.split_rows(ro), run.processor.tokenizer.pad_token_id)
    learner = vlr.learner(run)
    ref = grpo.reference_logprobs(learner, mb)
    alone = Qwen2_5_VLForConditionalGeneration.from_pretrained(base, dtype=torch.float32).eval()
    with torch.no_grad():
        expect = grpo.micro_batch_logprobs(learner, alone, mb)
        policy = grpo.micro_batch_logprobs(learner, run.model, mb)
    mask = mb["response_mask"].bool()
    assert (ref - expect)[mask].abs().max() <= 1e-6
    assert (policy - ref)[mask].abs().max() > 1e-3  # the adapters moved the policy away from it
    assert (policy - ro.logp)[mask].abs().max() <= 2e-5  # and switched back on afterwards


def test_another_base_is_refused_and_a_lost_base_is_one_sentence(trained, tmp_path):
    run, _, base = trained
    other = tmp_path / "other"
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(base, dtype=torch.float32)
    with torch.no_grad():
        model.model.language_model.layers[0].mlp.up_proj.weight.mul_(1.5)  # another fine-tune, same shapes
    model.save_pretrained(other)
    shutil.copytree(run.out, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    (tmp_path / "run" / "config.json").write_text(json.dumps({**saved, "model": str(other)}))
    cfg = vlr.Config(**{**saved, "model": str(other), "out": str(tmp_path / "run"), "resume": True})
    shutil.copytree(models.resolve("tiny"), other, dirs_exist_ok=True, ignore=lambda *_: ["model.safetensors"])
    with pytest.raises(UserError, match="trained on base model .* but the base .* has fingerprint"):
        vlr.setup(cfg)
    adapters = tmp_path / "adapters"
    lora.save(adapters, run.model, run.processor, run.base)
    config = json.loads((adapters / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone")
    (adapters / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=f"base model {tmp_path / 'gone'} \\(adapter_config.json\\) cannot be found"):
        models.load_model(str(adapters))
    (adapters / "adapter_config.json").write_text("{")
    with pytest.raises(UserError, match="adapter_config.json: not a readable adapter config \\(JSONDecodeError\\)$"):
        models.load_model(str(adapters))
    (adapters / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": None}))
    with pytest.raises(UserError, match="adapter_config.json: names no base model"):
        models.load_model(str(adapters))
    # adapters trained on adapters: their final merge found another base than the one trained (a whole run lost)
    with pytest.raises(UserError, match=f"--model {adapters}: an adapter folder; .* merged model folder saved beside "
                                        f"it \\({tmp_path}\\)"):
        vlr.check_flags(vlr.parse_args(["--model", str(adapters), "--lora-rank", "4", "--out", str(tmp_path / "x")]))


def adapters(folder):
    return load_file(folder / "adapter_model.safetensors")


def test_kill_and_resume_reproduce_the_run_and_the_final_folders_agree(tmp_path):
    """An uninterrupted LoRA run and one killed after its step-2 checkpoint and resumed: the same
    metrics and the same fp32 adapters, bit for bit; a checkpoint of megabytes without the base; the
    adapter folder (peft's format) and the merged folder beside it give the same greedy texts."""
    steps = ["--steps", "4", *LORA]
    a = test_vlr.run(steps, tmp_path / "a")
    assert a.returncode == 0, a.stderr[-2000:]
    b = tmp_path / "b"
    proc = procs.start([sys.executable, "vlr.py", *test_vlr.SMALL, "--out", str(b), *steps], cwd=test_vlr.ROOT,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:  # killed once step 2 is logged: ckpt holds 2
        if (b / "metrics.jsonl").exists() and len((b / "metrics.jsonl").read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    procs.stop(proc)
    assert len(test_vlr.metrics(b)) < 4, "killed too late to test anything"
    resumed = test_vlr.run(steps + ["--resume"], b)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert test_vlr.metrics(b) == test_vlr.metrics(tmp_path / "a")
    final_a, final_b = adapters(tmp_path / "a" / "final" / "adapter"), adapters(b / "final" / "adapter")
    assert final_a.keys() == final_b.keys() and all(torch.equal(final_a[k], final_b[k]) for k in final_a)
    ckpt = tmp_path / "a" / "ckpt"
    assert not list(ckpt.glob("model*.safetensors")) and (ckpt / "adapter_model.safetensors").stat().st_size < 2**20
    final = tmp_path / "a" / "final"
    base = Qwen2_5_VLForConditionalGeneration.from_pretrained(models.resolve("tiny"), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(final / "adapter"))  # peft's own loader reads the folder
    assert sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n) > 0
    recs = benchmarks.load_bench("toy")[:4]
    texts = {}
    for folder in (final, final / "adapter"):
        model, processor = models.load_model(str(folder))
        texts[folder] = [r["response"] for r in evaluation.evaluate(model.eval(), processor, recs, max_new_tokens=24)]
    assert texts[final] == texts[final / "adapter"]


def test_refusals_and_a_run_saved_before_lora_resumes_as_full_fine_tuning(tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    cfg = asdict(vlr.parse_args([*test_refusals.CHEAP, "--out", str(full)]))
    old = {k: v for k, v in cfg.items() if not k.startswith("lora_")}  # a run saved before the flags existed
    (full / "config.json").write_text(json.dumps(old))
    (full / "ckpt").mkdir()
    (full / "ckpt" / "train_state.pt").touch()
    checkpoint.check_run_folder(full, {**cfg, "resume": True}, resume=True, overwrite=False)  # no refusal
    cases = [[*test_refusals.CHEAP, "--out", str(tmp_path / "neg"), "--lora-rank", "-1"],
             [*test_refusals.CHEAP, "--out", str(full), "--resume", "--lora-rank", "4"],
             [*test_refusals.CHEAP, "--out", str(tmp_path / "shard"), "--lora-rank", "4", "--shard"]]
    with ThreadPoolExecutor(2) as pool:
        negative, resumed, shard = pool.map(lambda args: test_refusals.refused("vlr.py", args, False), cases)
    assert negative == "--lora-rank -1: give a positive rank for adapters, or 0 for full fine-tuning", negative
    assert "\n" not in resumed and "lora_rank: saved 0, now 4" in resumed, resumed
    assert "\n" not in shard and shard.startswith("--lora-rank with --shard"), shard
    assert not (tmp_path / "neg").exists() and not (tmp_path / "shard").exists()
