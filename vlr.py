"""vlr: VL-Rethinker from scratch. GRPO + Selective Sample Replay + Forced Rethinking.

    python vlr.py                      # the toy lab: tiny Qwen2.5-VL, synthetic task, CPU, ~10 min
    torchrun --nproc_per_node 8 vlr.py --model Qwen/Qwen2.5-VL-3B-Instruct --data virl39k.jsonl \
        --bf16 --grad-checkpointing --freeze-vision      # the real thing (see README)

One step (paper, Algorithm 1): sample prompts -> G responses each (rollout.sample, with Forced
Rethinking) -> rewards (reward.reward) -> group advantages (Eq. 2) -> Selective Sample Replay
(ssr.select_batch) -> clipped policy-gradient loss (Eq. 1) -> optimizer step -> metrics.
"""
import argparse
import contextlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist


@dataclass
class Config:
    model: str = "tiny"  # "tiny", a local folder, or a hub id such as Qwen/Qwen2.5-VL-3B-Instruct
    data: str = "toy"  # "toy", ViRL39K as released (39Krelease.parquet) or a .jsonl (README)
    toy_tiers: str = "colour"  # toy tiers trained on; the in-loop eval covers all tiers (eval_acc: the trained ones)
    skip_bad: bool = False  # drop bad data lines (they are listed) instead of stopping
    out: str = ""  # run folder; default runs/<data>-s<seed>
    steps: int = 200
    prompts_per_step: int = 32  # over all processes
    group_size: int = 8  # G responses per prompt
    lr: float = 5e-4  # tiny model; the rate the lab was measured at (1e-3: README, "The default run, measured")
    warmup_steps: int = 10
    clip_eps: float = 0.2
    clip_eps_high: float = 0.2  # upper clip; the published code uses 0.35 ("clip-higher")
    kl_coef: float = 0.0  # the published runs use no KL term
    agg: str = "token"  # "token": mean over all tokens of the batch (DAPO); "seq": per-sequence mean
    grad_clip: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: all tokens; the published rollouts use top-p 0.95 and top-k 40
    rollout_chunk: int = 0  # prompts sampled at a time per process (0: all); bounds the KV cache's memory
    min_pixels: int = 0  # image budget; 0: the model's own, or 256*28^2 for a hub model (tiny.load_model)
    max_pixels: int = 0  # 0: the model's own, or 1280*28^2 for a hub model (the published bounds)
    # Response cap; a rethought response must fit in it too. Toy answers take ~16 tokens and a
    # rethought one ~30-50: at 32, 4 in 5 right rethought responses were dropped for length.
    max_new_tokens: int = 48
    invalid_penalty: float = 0.1  # reward of a response cut by the length cap, without a box, or looping (reward.py)
    rethink: bool = True  # Forced Rethinking (--no-rethink turns it off)
    rethink_frac: float = 0.5  # share of a low-accuracy group's wrong responses that get a trigger
    # The published code trains the trigger tokens too. But a rethought response is kept only when
    # right, so its trigger only ever gets a positive advantage: the policy learns to say "Wait"
    # whatever it saw. The tiny model then loops on it and its accuracy falls to chance or below
    # (README, "Forced Rethinking"). Off here; --rethink-train-trigger as published.
    rethink_train_trigger: bool = False
    ssr: bool = True  # Selective Sample Replay (--no-ssr: plain GRPO)
    ssr_alpha: float = 1.0  # replay probability ~ |advantage|^alpha
    micro_batch: int = 64  # responses per forward/backward (memory knob, no effect on the math)
    eval_every: int = 20  # in-loop eval on the toy test split (0: never)
    save_every: int = 50
    resume: bool = False
    seed: int = 0
    bf16: bool = False  # autocast to bfloat16 (fp32 master weights and optimizer)
    grad_checkpointing: bool = False
    freeze_vision: bool = False
    min_format_rate: float = 0.2  # stop when fewer responses than this have a \boxed{} answer ...
    collapse_patience: int = 20  # ... for this many steps in a row: a collapsed run teaches nothing


def parse_args(argv=None) -> Config:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool and f.default:  # on by default: --no-x turns it off
            p.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false")
        elif f.type is bool:
            p.add_argument(flag, action="store_true")
        else:
            p.add_argument(flag, type=f.type, default=f.default)
    return Config(**vars(p.parse_args(argv)))


# ---------------------------------------------------------------------------------------------
# GRPO (paper, Section 2)
# ---------------------------------------------------------------------------------------------

def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """Eq. 2: A_i = (r_i - mean(r_group)) / (std(r_group) + eps), one value per response.
    A group whose rewards are all equal gets all zeros: the "vanishing advantages" of Section 3.1."""
    r = rewards.view(-1, group_size).float()
    std = r.std(1, keepdim=True)
    adv = (r - r.mean(1, keepdim=True)) / (std + eps)
    # exactly zero for equal rewards: float round-off in r - mean would otherwise make a fake signal
    return torch.where(std > 0, adv, torch.zeros_like(adv)).view(-1)


def grpo_loss(logp, old_logp, advantages, mask, clip_eps=0.2, agg="token", ref_logp=None, kl_coef=0.0, denom=None,
              clip_eps_high=None):
    """Eq. 1, the clipped surrogate: -min(rho * A, clip(rho, 1 - eps, 1 + eps) * A) per token,
    rho = exp(logp - old_logp), with the sequence's advantage A on every token. `clip_eps_high`
    sets a different upper bound 1 + eps_high ("clip-higher", as DAPO and the published
    VL-Rethinker code, which uses 0.2 / 0.35); None keeps the symmetric clip of Eq. 1.

    agg="token" averages over all unmasked tokens of the batch (as DAPO), agg="seq" averages each
    sequence first (the original GRPO). `denom` replaces the batch's own count of tokens (or
    sequences) when the batch is one micro-batch of a larger one. With kl_coef > 0 a k3 estimate
    of KL(pi || pi_ref) = exp(ref - logp) - (ref - logp) - 1 is added per token.
    Returns (loss, stats)."""
    high = clip_eps if clip_eps_high is None else clip_eps_high
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    per_token = -torch.min(ratio * adv, torch.clamp(ratio, 1 - clip_eps, 1 + high) * adv)
    if kl_coef:
        d = ref_logp - logp
        per_token = per_token + kl_coef * (torch.exp(d) - d - 1)
    per_token = per_token * mask
    if agg == "token":
        loss = per_token.sum() / (denom if denom is not None else mask.sum().clamp(min=1))
    elif agg == "seq":
        per_seq = per_token.sum(1) / mask.sum(1).clamp(min=1)
        loss = per_seq.sum() / (denom if denom is not None else per_seq.numel())
    else:
        raise ValueError(f"agg must be 'token' or 'seq', not {agg!r}")
    with torch.no_grad():  # tokens whose gradient the clip switched off
        clipped = ((adv > 0) & (ratio > 1 + high)) | ((adv < 0) & (ratio < 1 - clip_eps))
        stats = {"clip_frac": ((clipped * mask).sum() / mask.sum().clamp(min=1)).item()}
    return loss, stats


# ---------------------------------------------------------------------------------------------
# Setup: processes, model, data
# ---------------------------------------------------------------------------------------------

# NCCL has no CPU backend: a CPU tensor in a collective of an "nccl" group raises. GPU runs get
# NCCL for CUDA tensors (the DDP gradients) and gloo for CPU ones (object gathers, small metrics).
BACKENDS = {"cuda": "cpu:gloo,cuda:nccl", "cpu": "gloo"}


def setup_distributed():
    """torchrun sets RANK/WORLD_SIZE: then a process per GPU (or CPU process). Plain `python`: one process."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(BACKENDS[device.type])
    return rank, world, device


def load_policy(cfg: Config, path: str, device):
    """fp32 weights (the master copy; --bf16 computes in bf16 under autocast), the image budget."""
    import tiny

    model, processor = tiny.load_model(path, device, torch.float32, cfg.min_pixels, cfg.max_pixels)
    if cfg.freeze_vision:  # also keeps DDP from waiting for gradients that never come
        model.model.visual.requires_grad_(False)
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, processor


def load_data(cfg: Config, rank: int):
    """(train records, eval records or None). Bad lines stop the run before any training."""
    import data

    if cfg.data == "toy":
        tiers = cfg.toy_tiers.split(",")
        return data.ToyTask("train", tiers), data.ToyTask("test")
    records, skipped = data.load_records(cfg.data, skip_bad=cfg.skip_bad)
    if skipped and rank == 0:
        print(f"skipped {skipped} bad line(s) of {cfg.data}")
    return records, None


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


# ---------------------------------------------------------------------------------------------
# Checkpoints: written atomically, resumed exactly
# ---------------------------------------------------------------------------------------------

def param_checksum(model) -> float:
    """One number per process; DDP keeps weights identical, so every rank must agree exactly."""
    with torch.no_grad():
        return float(sum(p.double().sum() * (i + 1) for i, p in enumerate(model.parameters())))


def save_checkpoint(out: Path, model, processor, state: dict):
    """Model folder + training state into out/ckpt, via a temporary folder and renames: a run
    killed at any moment leaves the previous checkpoint or the new one, never half of one."""
    tmp, ckpt, old = out / ".ckpt-tmp", out / "ckpt", out / ".ckpt-old"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    torch.save(state, tmp / "train_state.pt")
    if ckpt.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(ckpt, old)
    os.replace(tmp, ckpt)
    shutil.rmtree(old, ignore_errors=True)


def checkpoint_dir(out: Path) -> Path:
    """The newest complete checkpoint (a kill between the two renames leaves only .ckpt-old)."""
    for name in ("ckpt", ".ckpt-old"):
        if (out / name / "train_state.pt").exists():
            return out / name
    raise SystemExit(f"--resume: no checkpoint in {out}/ckpt")


RESUMABLE = {"resume", "save_every", "eval_every", "out"}  # may differ on resume (--steps shapes the lr schedule)


def check_resume_config(out: Path, cfg: Config):
    saved = json.loads((out / "config.json").read_text())
    diff = {k: (saved.get(k), v) for k, v in asdict(cfg).items() if k not in RESUMABLE and saved.get(k) != v}
    if diff:
        raise SystemExit(f"--resume with a different configuration than {out}/config.json: "
                         + ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items()))


def reduce(values: dict, device, world, op=dist.ReduceOp.SUM) -> dict:
    """Named numbers summed (or `op`) over processes. The tensor lives on the process's device:
    the collective must find a backend for it (an NCCL-only group has none for the CPU)."""
    if world == 1:
        return {k: float(v) for k, v in values.items()}
    t = torch.tensor([float(v) for v in values.values()], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return dict(zip(values, t.tolist()))


def gather(obj, world):
    """Every rank's `obj`, in rank order (a list of one without torchrun)."""
    if world == 1:
        return [obj]
    objs = [None] * world
    dist.all_gather_object(objs, obj)
    return objs


def policy_update(ddp, opt, batch, advantages, current, cfg: Config, banned, pad_id, device, world, ref=None) -> dict:
    """One optimizer step of Eq. 1 on the batch's rows, in micro-batches (gradients accumulate).

    The loss is the token-level mean over the whole batch of all processes: each process divides
    its sum by (all tokens / processes), since DDP averages gradients over processes. `current`
    marks the rows sampled this step: for them the training forward must reproduce the sampler's
    log-probs before the update (`logp_drift_max`, a live check that rollout and training agree).
    `ref` is the frozen reference policy of the KL term (used only when cfg.kl_coef > 0).
    A non-finite loss or gradient skips the update instead of corrupting the weights."""
    import rollout

    model = getattr(ddp, "module", ddp)
    params = [p for p in model.parameters() if p.requires_grad]
    n_tok = torch.tensor(float(sum(r["loss_mask"].sum() for r in batch)), device=device)
    if world > 1:
        dist.all_reduce(n_tok)
    denom = n_tok / world if cfg.agg == "token" else torch.tensor(float(len(batch)), device=device)
    model.train()
    opt.zero_grad(set_to_none=True)
    loss_sum, drift, clip = 0.0, 0.0, []
    for c0 in range(0, len(batch), cfg.micro_batch):
        part = slice(c0, c0 + cfg.micro_batch)
        mb = rollout.collate(batch[part], pad_id)
        mb = {k: ({kk: vv.to(device) for kk, vv in v.items()} if isinstance(v, dict) else v.to(device)) for k, v in mb.items()}
        last = c0 + cfg.micro_batch >= len(batch)
        sync = contextlib.nullcontext() if last or world == 1 else ddp.no_sync()  # all-reduce once, at the end
        with sync, autocast(cfg, device):
            logp = rollout.logprobs(ddp, mb["prompts"], mb["response_ids"], mb["response_mask"], cfg.temperature, banned)
            ref_logp = None
            if cfg.kl_coef:  # the reference is fixed, so replayed rows get theirs now, like current ones
                with torch.no_grad():
                    ref_logp = rollout.logprobs(ref, mb["prompts"], mb["response_ids"], mb["response_mask"],
                                                cfg.temperature, banned)
            loss, st = grpo_loss(logp, mb["logp"], advantages[part].to(device), mb["loss_mask"], cfg.clip_eps,
                                 cfg.agg, ref_logp=ref_logp, kl_coef=cfg.kl_coef, denom=denom,
                                 clip_eps_high=cfg.clip_eps_high)
            loss.backward()
        loss_sum += loss.item()
        clip.append(st["clip_frac"])
        now = torch.tensor(current[part], device=device)[:, None]
        drift = max(drift, ((logp.detach() - mb["logp"]).abs() * mb["response_mask"] * now).max().item())
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    skipped = not torch.isfinite(grad_norm).item()
    if skipped:
        opt.zero_grad(set_to_none=True)
    else:
        opt.step()
    model.eval()
    return {"loss": loss_sum, "grad_norm": grad_norm.item(), "clip_frac": sum(clip) / len(clip),
            "logp_drift_max": drift, "skipped": int(skipped)}


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup, then cosine decay to 0 at the last step (the published runs use a cosine
    schedule too). The late, small steps let the policy settle instead of drifting on noise."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def autocast(cfg: Config, device):
    """bf16 compute with fp32 weights (--bf16); a no-op otherwise. Autocast's weight cache is off:
    it would hold a bf16 copy of every weight for as long as the context lasts (a whole rollout,
    +6 GB for the 3B); a weight is cast again where it is used instead."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16, cache_enabled=False)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

def train(cfg: Config):
    import eval as evaluation
    import reward
    import rollout
    import ssr
    from tqdm import tqdm

    rank, world, device = setup_distributed()
    if cfg.prompts_per_step % world:
        raise SystemExit(f"--prompts-per-step {cfg.prompts_per_step} must be divisible by {world} processes")
    out = Path(cfg.out or f"runs/{Path(cfg.data).stem}-s{cfg.seed}")
    train_set, test_set = load_data(cfg, rank)
    state = None
    if cfg.resume:
        check_resume_config(out, cfg)
        ckpt = checkpoint_dir(out)
        # to the CPU first: saved from rank 0's GPU, every rank would load it onto GPU 0. The
        # optimizer's load_state_dict moves its state to each parameter's device.
        state = torch.load(ckpt / "train_state.pt", map_location="cpu", weights_only=False)
    model, processor = load_policy(cfg, str(ckpt) if state else cfg.model, device)
    tok = processor.tokenizer
    banned = rollout.special_ids(tok, rollout.VISION_TOKENS)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.warmup_steps, cfg.steps))
    # KL term (off by default, as in the published runs): the reference is the starting policy,
    # loaded from --model again, so a resumed run keeps the same reference.
    ref = load_policy(cfg, cfg.model, device)[0].requires_grad_(False).eval() if cfg.kl_coef else None
    # All toy and jsonl records have images, so every parameter gets a gradient each step.
    # gradient_as_bucket_view: gradients live in DDP's all-reduce buckets, not in a second copy.
    ddp = torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True) if world > 1 else model
    gen = torch.Generator(device).manual_seed(cfg.seed * 1000 + rank)  # sampling and replay draws
    n_rows = cfg.prompts_per_step // world * cfg.group_size  # responses per process per step
    # Section 3.1: the buffer keeps recent non-zero-advantage samples, about half a batch.
    buffer = ssr.ReplayBuffer(capacity=max(1, n_rows // 2), alpha=cfg.ssr_alpha)
    # The continuation may use the whole response budget; a rethought response longer than
    # --max-new-tokens in total is discarded anyway (rollout.py).
    rethink_cfg = rollout.RethinkConfig(frac=cfg.rethink_frac, train_trigger=cfg.rethink_train_trigger,
                                        max_new_tokens=cfg.max_new_tokens) if cfg.rethink else None
    start = 0
    if state:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        gen.set_state(state["generators"][rank])
        buffer.load_state_dict(state["buffers"][rank])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        start = state["step"]
    metrics_path = out / "metrics.jsonl"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
        if state:  # drop lines past the checkpoint: those steps run again, identically
            lines = metrics_path.read_text().splitlines() if metrics_path.exists() else []
            metrics_path.write_text("".join(l + "\n" for l in lines if json.loads(l)["step"] < start))
        elif metrics_path.exists():
            metrics_path.unlink()
    log = open(metrics_path, "a") if rank == 0 else None

    def correct(text, rec):  # what Forced Rethinking checks: is the (rethought) answer right?
        return reward.accuracy(text, rec.answer, rec.choices)

    trained_tiers = set(cfg.toy_tiers.split(","))

    def run_eval():
        """Greedy decoding on this rank's shard of the toy test split (all tiers), summed over ranks.
        eval_acc is the accuracy on the tiers trained on; eval_acc_<tier> on each tier; eval_reflect
        the share of responses with a self-reflection phrase (eval.reflects, as the paper reports)."""
        recs = [test_set[i] for i in range(rank, len(test_set), world)]
        with autocast(cfg, device):
            rows = evaluation.evaluate(model, processor, recs, max_new_tokens=cfg.max_new_tokens)
        per_rank = gather([(r["category"], r["correct"], r["rethinks"]) for r in rows], world)
        allrows = [x for part in per_rank for x in part]
        trained = [c for k, c, _ in allrows if k in trained_tiers]
        res = {"eval_acc": sum(trained) / len(trained), "eval_reflect": sum(f for _, _, f in allrows) / len(allrows)}
        for cat in sorted({k for k, _, _ in allrows}):
            hits = [c for k, c, _ in allrows if k == cat]
            res[f"eval_acc_{cat}"] = sum(hits) / len(hits)
        return res

    low_format_steps, last_eval = 0, float("nan")  # the bar shows the latest eval between evals
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=rank != 0, dynamic_ncols=True)
    for step in bar:
        t0 = time.time()
        recs = [train_set[i] for i in prompts_for_step(len(train_set), step, cfg.prompts_per_step, rank, world, cfg.seed)]
        with autocast(cfg, device):
            ro = rollout.sample(model, processor, recs, cfg.group_size, cfg.max_new_tokens, cfg.temperature,
                                cfg.top_p, gen, score=correct, rethink=rethink_cfg, top_k=cfg.top_k,
                                chunk=cfg.rollout_chunk)
        g = cfg.group_size
        acc = torch.tensor([correct(t, recs[i // g]) for i, t in enumerate(ro.texts)])
        rewards = torch.tensor([reward.reward(t, recs[i // g].answer, recs[i // g].choices, finished=not ro.truncated[i],
                                              invalid_penalty=cfg.invalid_penalty) for i, t in enumerate(ro.texts)])
        adv = group_advantages(rewards, g)
        rows = rollout.split_rows(ro)
        for r in rows:
            r["step"] = step
        if cfg.ssr:  # Section 3.1: drop zero-advantage samples, refill from the current ones and the buffer
            batch, batch_adv, n_replayed = ssr.select_batch(rows, adv, buffer, n_rows, generator=gen)
        else:
            batch, batch_adv, n_replayed = rows, adv, 0
        if len(batch) < n_rows:  # nothing to learn from anywhere: pad with zero-advantage rows, so that
            pad = n_rows - len(batch)  # every process runs the same backward passes (DDP)
            batch = list(batch) + rows[:pad]
            batch_adv = torch.cat([torch.as_tensor(batch_adv, dtype=torch.float32), torch.zeros(pad)])
        batch_adv = torch.as_tensor(batch_adv, dtype=torch.float32)

        current = [r["step"] == step for r in batch]
        up = policy_update(ddp, opt, batch, batch_adv, current, cfg, banned, tok.pad_token_id, device, world, ref)
        if up["skipped"]:
            tqdm.write(f"step {step}: non-finite loss or gradient (grad norm {up['grad_norm']}), update skipped")
        sched.step()

        # Metrics, summed over processes.
        n_groups = len(recs)
        zero_groups = int((rewards.view(-1, g).std(1) == 0).sum())
        resp_len = ro.response_mask.sum(1).float()
        sums = reduce({"n": len(ro.texts), "rsum": rewards.sum(), "csum": acc.sum(), "ng": n_groups, "zg": zero_groups,
                       "boxed": sum(reward.has_boxed(t) for t in ro.texts), "trunc": ro.truncated.sum(),
                       "trig": ro.triggered.sum(), "kept": ro.rethought.sum(), "fixed": ro.rethink_fixed,
                       "lsum": resp_len.sum(), "buf": len(buffer), "rep": n_replayed, "lossum": up["loss"]},
                      device, world)
        up["logp_drift_max"] = reduce({"d": up["logp_drift_max"]}, device, world, dist.ReduceOp.MAX)["d"]
        (n, rsum, csum, ng, zg, boxed, trunc, trig, kept, fixed, lsum, buf, rep, lossum) = sums.values()
        dt = time.time() - t0
        m = {"step": step, "reward_mean": rsum / n, "acc_mean": csum / n, "zero_adv_frac": zg / ng,
             "format_rate": boxed / n, "truncated_frac": trunc / n, "ssr_buffer": int(buf), "ssr_replayed": int(rep),
             "rethink_frac": trig / n, "rethink_kept": kept / trig if trig else 0.0,
             "rethink_fixed": fixed / trig if trig else 0.0, "resp_len_mean": lsum / n,
             "loss": lossum / world, "grad_norm": up["grad_norm"], "clip_frac": up["clip_frac"],
             "logp_drift_max": up["logp_drift_max"], "lr": sched.get_last_lr()[0], "skipped": up["skipped"]}
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            if test_set is not None:
                m.update(run_eval())
        m.update(step_s=time.time() - t0, tokens_per_s=lsum / dt)
        if rank == 0:
            log.write(json.dumps(m) + "\n")
            log.flush()
            last_eval = m.get("eval_acc", last_eval)
            bar.set_postfix(reward=f"{m['reward_mean']:.2f}", zero_adv=f"{m['zero_adv_frac']:.2f}",
                            fmt=f"{m['format_rate']:.2f}", eval=f"{last_eval:.2f}")

        # A policy that stopped producing answers gets zero reward everywhere: every group has zero
        # advantage and nothing can bring it back. Say so and stop, instead of burning compute.
        low_format_steps = low_format_steps + 1 if m["format_rate"] < cfg.min_format_rate else 0
        if low_format_steps >= cfg.collapse_patience:
            raise SystemExit(f"step {step}: format collapse: fewer than {cfg.min_format_rate:.0%} of responses had a "
                             f"\\boxed{{}} answer for {cfg.collapse_patience} steps (truncated: {m['truncated_frac']:.0%}). "
                             "Lower --lr, or raise --max-new-tokens; see metrics.jsonl.")

        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            sums = gather(param_checksum(model), world)
            if len(set(sums)) != 1:
                raise SystemExit(f"step {step}: processes disagree on the weights (checksums {sums}); not saving")
            train_state = {"step": step + 1, "checksums": sums, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                           "generators": gather(gen.get_state(), world), "buffers": gather(buffer.state_dict(), world),
                           "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}
            if rank == 0:
                save_checkpoint(out, model, processor, train_state)
    if rank == 0:
        model.save_pretrained(out / "final")
        processor.save_pretrained(out / "final")
        log.close()
        print(f"done: {out}/final, metrics in {metrics_path}")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    from data import DataError

    try:
        train(parse_args())
    except DataError as e:  # bad input: say which file, line and field, and train nothing
        raise SystemExit(str(e))
