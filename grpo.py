"""GRPO (paper, Section 2): group advantages (Eq. 2), the clipped objective (Eq. 1), the update.

The trainer (vlr.py) hands over what the update uses (`Learner`: the policy, its optimizer, the
KL term's reference, the processes, the update's `Settings`) and a batch of rollout.Row.
"""
import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

import models
import phases
import rollout


@dataclass
class Settings:
    """The flags the update reads (vlr.Config's fields of the same names)."""
    clip_eps: float
    clip_eps_high: float
    kl_coef: float
    agg: str
    sft_coef: float
    minibatches: int
    micro_batch: int
    grad_clip: float
    temperature: float
    share_vision: bool
    bf16: bool


@dataclass
class Reference:
    """The KL term's reference policy: `model` while `switch()` holds. A frozen copy of the starting
    policy under a context that does nothing, or, under LoRA, the policy itself with its adapters
    switched off (lora.adapters_off): the base is the starting policy, and costs no second copy."""
    model: torch.nn.Module
    switch: Callable = contextlib.nullcontext


@dataclass
class Learner:
    """What the update works on."""
    model: torch.nn.Module  # the policy: its trainable parameters are what `opt` steps
    forward: torch.nn.Module  # what the training forward goes through: DDP's wrapper of `model`, or `model`
    opt: torch.optim.Optimizer
    reference: Reference | None  # None without the KL term
    cfg: Settings
    tokenizer: object  # its pad id and the vision special tokens, which are never sampled
    gen: torch.Generator  # the minibatches' shuffle
    device: torch.device
    world: int  # processes: the token mean is over all of them


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6, std: bool = True) -> torch.Tensor:
    """Eq. 2: A_i = (r_i - mean(r_group)) / (std(r_group) + eps), one value per response; with
    std=False only r_i - mean (the published code's "group" estimator, experience_maker.py,
    handle_advantages). A group whose rewards are all equal gets all zeros: the "vanishing
    advantages" of Section 3.1."""
    r = rewards.view(-1, group_size).float()  # [P, G]
    spread = r.std(1, keepdim=True)  # [P, 1]
    adv = (r - r.mean(1, keepdim=True)) / ((spread + eps) if std else 1.0)  # [P, G]
    # exactly zero for equal rewards: float round-off in r - mean, and in the std itself (eight -0.1s
    # in one group have a std of 8e-9 on the CPU: A = 0.007 each), would make a fake signal
    varied = r.amax(1, keepdim=True) > r.amin(1, keepdim=True)  # [P, 1]
    return torch.where(varied, adv, torch.zeros_like(adv)).view(-1)


def grpo_loss(logp, old_logp, advantages, mask, cfg, ref_logp=None, denom=None, sft=None):
    """The whole objective, per token: Eq. 1's clipped surrogate, a KL term and an SFT term.

    Eq. 1: -min(rho * A, clip(rho, 1 - clip_eps, 1 + clip_eps_high) * A), rho = exp(logp -
    old_logp), with the sequence's advantage A on every token. clip_eps_high > clip_eps is
    "clip-higher" (DAPO; the published VL-Rethinker code uses 0.2 / 0.35); equal, the symmetric
    clip of Eq. 1. cfg.agg="token" averages over all unmasked tokens of the batch (as DAPO),
    "seq" each sequence first (the original GRPO). `denom` replaces the batch's own count of
    tokens (or sequences) when the batch is one micro-batch of a larger one.
    cfg.kl_coef > 0: a k3 estimate of KL(pi || pi_ref) = exp(ref - logp) - (ref - logp) - 1 per token.
    cfg.sft_coef > 0 and `sft` = (rows [N] bool, tokens): minus the mean log-likelihood of those
    rows' tokens over `tokens` (the published aux loss: loss.py, PolicyLoss). Returns (loss, stats)."""
    ratio = torch.exp(logp - old_logp)  # [N, T] rho of Eq. 1
    adv = advantages[:, None]  # [N, 1] one advantage per response, on every token
    clipped_ratio = torch.clamp(ratio, 1 - cfg.clip_eps, 1 + cfg.clip_eps_high)  # [N, T]
    per_token = -torch.min(ratio * adv, clipped_ratio * adv)  # [N, T]
    if cfg.kl_coef:
        d = ref_logp - logp
        per_token = per_token + cfg.kl_coef * (torch.exp(d) - d - 1)
    per_token = per_token * mask
    if cfg.agg == "token":
        loss = per_token.sum() / (denom if denom is not None else mask.sum().clamp(min=1))
    elif cfg.agg == "seq":
        per_seq = per_token.sum(1) / mask.sum(1).clamp(min=1)  # [N]
        loss = per_seq.sum() / (denom if denom is not None else per_seq.numel())
    else:
        raise ValueError(f"agg must be 'token' or 'seq', not {cfg.agg!r}")
    if cfg.sft_coef and sft is not None and bool(sft[0].any()):
        loss = loss - cfg.sft_coef * (logp * mask * sft[0][:, None]).sum() / sft[1]
    with torch.no_grad():  # tokens whose gradient the clip switched off
        clipped = ((adv > 0) & (ratio > 1 + cfg.clip_eps_high)) | ((adv < 0) & (ratio < 1 - cfg.clip_eps))  # [N, T]
        n_clipped, n_tokens = torch.stack([(clipped * mask).sum(), mask.sum()]).tolist()  # one device sync
        stats = {"clip_frac": n_clipped / max(n_tokens, 1), "clipped": n_clipped, "tokens": n_tokens}
    return loss, stats


# ---------------------------------------------------------------------------------------------
# The policy update: Eq. 1 minimised, cfg.minibatches optimizer steps a rollout
# ---------------------------------------------------------------------------------------------

@phases.phase
def policy_update(learner: Learner, batch: list, advantages: torch.Tensor, step: int) -> dict:
    """cfg.minibatches optimizer steps of Eq. 1, each on an equal part of the batch (rollout.Row
    list), shuffled first as the published trainer draws its minibatches (it takes 8 per rollout).
    The first part is on-policy: for the rows sampled at `step` the training forward must
    reproduce the sampler's log-probs before the update (`logp_drift_max`, a live check that
    rollout and training agree). Each later part meets a policy that the steps before it moved:
    its ratio is off 1 and the clip acts."""
    cfg, current = learner.cfg, [r.step == step for r in batch]
    if cfg.minibatches > 1:
        order = torch.randperm(len(batch), generator=learner.gen, device=learner.gen.device).tolist()
        batch, advantages, current = [batch[i] for i in order], advantages[order], [current[i] for i in order]
    size = len(batch) // cfg.minibatches
    parts = [optimizer_step(learner, batch[i:i + size], advantages[i:i + size],
                            current[i:i + size] if i == 0 else [False] * size)
             for i in range(0, size * cfg.minibatches, size)]

    def mean(key):
        return sum(p[key] for p in parts) / len(parts)

    clipped, tokens = sum(p["clipped"] for p in parts), sum(p["tokens"] for p in parts)
    return {"loss": mean("loss"), "grad_norm": mean("grad_norm"), "clip_frac": clipped / max(tokens, 1),
            "clipped": clipped, "tokens": tokens, "logp_drift_max": parts[0]["logp_drift_max"],
            "skipped": sum(p["skipped"] for p in parts)}


def optimizer_step(learner: Learner, batch: list, advantages: torch.Tensor, current: list) -> dict:
    """One optimizer step of Eq. 1 on `batch`'s rows, in micro-batches (gradients accumulate).

    The loss is the token-level mean over the whole batch of all processes (cfg.agg "token"): each
    process divides its sum by (all tokens / processes), since DDP and FSDP (--shard) average
    gradients over processes; with "seq", the mean of the rows' token means. With cfg.sft_coef, an
    SFT term on the rows with a positive advantage that reflect (Row.reflects), averaged over the
    step's SFT tokens of all processes alike (the published code: a token mean per micro-batch and
    process, so a process's few SFT tokens weigh as much as another's many).
    A non-finite loss or gradient skips the update instead of corrupting the weights."""
    cfg, device, world = learner.cfg, learner.device, learner.world
    sft_rows = [bool(a > 0) and r.reflects for r, a in zip(batch, advantages.tolist())]
    counts = torch.tensor([float(sum(r.loss_mask.sum() for r in batch)),  # [2] tokens trained on, SFT tokens
                           float(sum(r.loss_mask.sum() for r, s in zip(batch, sft_rows) if s))], device=device)
    if world > 1:
        dist.all_reduce(counts)
    denom = counts[0] / world if cfg.agg == "token" else torch.tensor(float(len(batch)), device=device)
    sft_tok = max(1.0, counts[1].item()) / world
    learner.model.train()
    learner.opt.zero_grad(set_to_none=True)
    loss_sum, drift, clipped, tokens = 0.0, 0.0, 0, 0
    for c0 in range(0, len(batch), cfg.micro_batch):
        part = slice(c0, c0 + cfg.micro_batch)
        mb = rollout.collate(batch[part], learner.tokenizer.pad_token_id)  # prompts [B, L], responses [B, T]
        mb = {k: ({kk: vv.to(device) for kk, vv in v.items()} if isinstance(v, dict) else v.to(device)) for k, v in mb.items()}
        last = c0 + cfg.micro_batch >= len(batch)
        # DDP all-reduces once, at the end; --shard reduce-scatters every micro-batch's gradient
        # (deferred, each process would hold the whole unsharded gradient: the memory sharding saves)
        defer = not last and isinstance(learner.forward, torch.nn.parallel.DistributedDataParallel)
        sync = learner.forward.no_sync() if defer else contextlib.nullcontext()
        with sync, models.autocast(cfg.bf16, device):
            logp = micro_batch_logprobs(learner, learner.forward, mb)  # [B, T]
            # the reference is fixed, so replayed rows get theirs now, like current ones
            ref_logp = reference_logprobs(learner, mb) if cfg.kl_coef else None  # [B, T]
            sft = (torch.tensor(sft_rows[part], device=device), sft_tok)
            loss, st = grpo_loss(logp, mb["logp"], advantages[part].to(device), mb["loss_mask"], cfg, ref_logp, denom, sft)
            loss.backward()
        loss_sum += loss.item()
        clipped, tokens = clipped + st["clipped"], tokens + st["tokens"]
        now = torch.tensor(current[part], device=device)[:, None]  # [B, 1] sampled this step
        drift = max(drift, ((logp.detach() - mb["logp"]).abs() * mb["response_mask"] * now).max().item())
    grad_norm, skipped = clip_and_step(learner)
    return {"loss": loss_sum, "grad_norm": grad_norm, "clip_frac": clipped / max(tokens, 1), "clipped": clipped,
            "tokens": tokens, "logp_drift_max": drift, "skipped": int(skipped)}


def micro_batch_logprobs(learner: Learner, model, mb: dict) -> torch.Tensor:
    """rollout.logprobs of a collated micro-batch under `model` (the policy, or the reference's)."""
    banned = rollout.special_ids(learner.tokenizer, rollout.VISION_TOKENS)
    return rollout.logprobs(model, mb["prompts"], mb["response_ids"], mb["response_mask"], learner.cfg.temperature,
                            banned, learner.cfg.share_vision)


def reference_logprobs(learner: Learner, mb: dict) -> torch.Tensor:
    """log pi_ref of a collated micro-batch, however the reference is made (`Reference`). [B, T]"""
    with torch.no_grad(), learner.reference.switch():
        return micro_batch_logprobs(learner, learner.reference.model, mb)


def clip_and_step(learner: Learner) -> tuple[float, bool]:
    """Clip the gradient norm (--grad-clip; 0: none) and take the optimizer step, unless the norm
    is not finite: then the gradient is dropped. Returns (norm, skipped)."""
    clip = learner.cfg.grad_clip
    params = [p for p in learner.model.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
    skipped = not torch.isfinite(grad_norm).item()
    if skipped:
        learner.opt.zero_grad(set_to_none=True)
    else:
        learner.opt.step()
    learner.model.eval()
    return grad_norm.item(), skipped


def lr_factor(step: int, warmup: int, total: int, floor: float = 0.0) -> float:
    """Linear warmup, then cosine decay towards `floor` (a share of the peak), reached at step
    `total`, one past the last (the published runs decay to half). The late, small steps let the
    policy settle instead of drifting on noise."""
    if step < warmup:
        return (step + 1) / warmup
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
