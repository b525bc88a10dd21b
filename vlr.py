"""vlr: VL-Rethinker from scratch. GRPO + Selective Sample Replay + Forced Rethinking.

    python vlr.py          # the toy run: the tiny Qwen2.5-VL learns a synthetic task on a CPU
    torchrun --nproc_per_node 8 vlr.py --model Qwen/Qwen2.5-VL-3B-Instruct --data 39Krelease.parquet ...
                           # the real thing: the README's "real runs" give the whole command

One step (paper, Algorithm 1): sample prompts -> G responses each (rollout.sample) -> rewards
(reward.grade) -> Forced Rethinking (rethink.rethink) -> group advantages (grpo, Eq. 2) ->
Selective Sample Replay (ssr.ReplayBuffer.select_batch) -> the clipped policy-gradient update (grpo, Eq. 1)
-> metrics.
"""
import argparse
import json
import os
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import checkpoint
import data
import eval as evaluation
import faults
import grpo
import hub
import lora
import models
import phases
import rethink
import reward
import rollout
import shard
import ssr
import toy
import tracking
from distributed import UserError, exit_once, gather, once_per_run, rank_world, reduce, setup_distributed


def arg(default, help: str):
    """A Config field with its --help text (the dataclass documents the command line, as CleanRL's Args)."""
    return field(default=default, metadata={"help": help})


RULES = rethink.RethinkConfig  # the --rethink-x defaults are its own (an alias: Config has a field `rethink`)


@dataclass
class Config:
    # What is trained, on what
    model: str = arg("tiny", "'tiny' (the offline tiny Qwen2.5-VL; 'tiny-second-look': its variant for the second-look lab), "
                             "'smoke-3b-<n>l' (3B-shaped test model), a folder or a hub id")
    data: str = arg("toy", "'toy', ViRL39K as released (39Krelease.parquet, its folder, or its hub name "
                           "TIGER-Lab/ViRL39K, downloaded on first use) or a .jsonl of records (docs/data.md)")
    toy_tiers: str = arg("colour", "toy tiers trained on, in turn (comma-separated; a tier named twice comes twice as "
                                   "often; 'unseen': no sample is ever right); the in-loop eval covers the test tiers")
    skip_bad: bool = arg(False, "drop bad data rows (they are listed) instead of stopping")
    out: str = arg("", "run folder (default runs/<data>-s<seed>); one that holds a run is refused unless --resume "
                       "or --overwrite")
    recipe: str = arg("", "'published': every setting of the published code we reproduce (docs/differences.md); flags given win")
    min_pixels: int = arg(0, "image budget, fewest pixels; 0: the model's own, or 256*28^2 for a hub model")
    max_pixels: int = arg(0, "image budget, most pixels; 0: the model's own, or 1280*28^2 for a hub model")
    # GRPO (Section 2, Eq. 1 and 2)
    steps: int = arg(200, "training steps (one rollout each, and --minibatches optimizer steps on it)")
    prompts_per_step: int = arg(32, "prompts per step, over all processes")
    group_size: int = arg(8, "G: responses sampled per prompt")
    lr: float = arg(5e-4, "peak learning rate (tiny model; docs/lab.md, 'The default run, measured')")
    warmup_steps: int = arg(10, "linear warmup steps, then cosine decay")
    min_lr_ratio: float = arg(0.0, "the cosine decays to this share of the peak learning rate")
    adam_beta2: float = arg(0.999, "AdamW's second-moment decay")
    minibatches: int = arg(1, "optimizer steps per rollout, each on an equal part of the batch; after the first, "
                              "the policy has moved: the ratio is off 1 and the clip acts")
    adv_std: bool = arg(True, "divide advantages by the group's std (Eq. 2); --no-adv-std: r - mean only")
    clip_eps: float = arg(0.2, "lower clip of the ratio, 1 - eps (Eq. 1)")
    clip_eps_high: float = arg(0.2, "upper clip, 1 + eps_high; the published code uses 0.35 ('clip-higher')")
    kl_coef: float = arg(0.0, "weight of a k3 KL term to the starting policy (the published runs use none)")
    agg: str = arg("token", "'token': mean over all tokens of the batch (DAPO); 'seq': per-response mean first")
    grad_clip: float = arg(1.0, "gradient norm clip (0: none)")
    temperature: float = arg(1.0, "sampling temperature of the rollouts (and of the trained distribution)")
    top_p: float = arg(1.0, "nucleus sampling mass (the published rollouts: 0.95)")
    top_k: int = arg(0, "sample from the k most likely tokens; 0: all (the published rollouts: 40)")
    max_new_tokens: int = arg(48, "response cap; a rethought response must fit in it too")
    invalid_penalty: float = arg(0.1, "reward -x for a response cut by the cap, without a box, or looping (reward.py)")
    reflection_bonus: float = arg(0.0, "extra reward of a right answer with 1 or 2 native reflections (reward.py)")
    wait_penalty: float = arg(0.0, "a right answer with 3+ native reflections loses this much per reflection")
    sft_coef: float = arg(0.0, "weight of an SFT term on positive-advantage responses with a reflection")
    micro_batch: int = arg(64, "responses per forward/backward (memory only, no effect on the math)")
    share_vision: bool = arg(True, "encode each distinct image once per micro-batch, not once per response "
                                   "(--no-share-vision: the reference path that bench.py compares against)")
    rollout_chunk: int = arg(0, "prompts sampled at a time per process (0: all); bounds the KV cache's memory")
    # Selective Sample Replay (Section 3.1)
    ssr: bool = arg(True, "Selective Sample Replay (--no-ssr: plain GRPO)")
    ssr_alpha: float = arg(1.0, "replay probability proportional to |advantage|^alpha")
    # Forced Rethinking (Section 3.2)
    rethink: bool = arg(True, "Forced Rethinking (--no-rethink turns it off)")
    rethink_frac: float = arg(RULES.frac, "share of the eligible responses that get a trigger")
    rethink_max_group_acc: float = arg(RULES.max_group_acc, "only prompts whose group accuracy is at most this are rethought")
    rethink_only_wrong: bool = arg(RULES.only_wrong, "only wrong first answers get a trigger (the published append_wait mode)")
    rethink_cut_prob: float = arg(RULES.cut_prob, "chance to cut the first response (where: --rethink-cut) before the trigger")
    rethink_temperature: float = arg(RULES.temperature, "sampling temperature of the continuation (the published value)")
    rethink_max_waits: int = arg(RULES.max_waits, "a rethought response with more 'wait's than this is not kept")
    rethink_max_replace: int = arg(RULES.max_replace, "at most this many rethought responses replace first ones per prompt (-1: any)")
    rethink_cut: str = arg(RULES.cut, "where the first response is cut: 'answer' (before the final answer) or 'published'")
    rethink_min_new_tokens: int = arg(RULES.min_new_tokens, "a continuation must be longer than this to be kept")
    rethink_count_markers: bool = arg(RULES.count_markers, "count waits as published: the continuation's 'wait,', 'wait a', 'alternatively'")
    rethink_train_trigger: bool = arg(RULES.train_trigger, "train on the trigger tokens too (the published code does)")
    # Bookkeeping
    eval_every: int = arg(20, "in-loop greedy eval on the toy test split every this many steps (0: never)")
    save_every: int = arg(50, "checkpoint every this many steps")
    # named as transformers' Trainer names it: torchrun's parser refuses a --log anywhere on its command line
    # (an abbreviation of its own --log-dir and --logs-specs)
    report_to: str = arg("tensorboard", "where the numbers and samples go as the run trains, besides metrics.jsonl "
                                        "and samples.jsonl: tensorboard (<out>/tb), wandb, trackio (comma-separated), "
                                        "or none")
    log_samples: int = arg(4, "greedy responses shown at each in-loop eval, and rethought ones each step "
                              "(samples.jsonl and the loggers)")
    resume: bool = arg(False, "continue from <out>/ckpt, exactly: every flag must be as in <out>/config.json but "
                              "--save-every, --eval-every, --report-to, --log-samples and --no-share-vision; --steps "
                              "too (the learning rate decays over --steps: a finished run cannot be extended)")
    overwrite: bool = arg(False, "start afresh in an --out that holds a run: its metrics, checkpoint and final "
                                 "model are deleted")
    auto_resume: bool = arg(False, "the one command for every launch (a cluster's restarts and requeues): a fresh "
                                   "start when --out holds no run, --resume when it holds this run unfinished, exit 0 "
                                   "when it is finished (docs/cluster.md)")
    seed: int = arg(0, "seed of sampling, replay draws and the prompt order")
    bf16: bool = arg(False, "compute in bfloat16 under autocast (fp32 master weights and optimizer)")
    grad_checkpointing: bool = arg(False, "recompute activations in the backward (memory for time)")
    freeze_vision: bool = arg(False, "train the language model only")
    lora_rank: int = arg(0, "train low-rank adapters of this rank on the language model's projections, the base "
                            "frozen (lora.py; the 3B on one GPU); 0: full fine-tuning")
    lora_alpha: float = arg(32.0, "the adapters' scale alpha: their update is (alpha / rank) B A, so the learning rate "
                                  "need not move with the rank")
    shard: bool = arg(False, "shard weights, gradients and AdamW state over the processes (FSDP2, torchrun only) "
                             "instead of a whole copy on each (DDP): the 3B on 40-48 GB cards, the 7B on 80 GB")
    min_format_rate: float = arg(0.2, "stop when fewer responses than this have a \\boxed{} answer ...")
    collapse_patience: int = arg(20, "... for this many steps in a row: a collapsed run teaches nothing")


# What `--recipe published` sets: the settings of TIGER-AI-Lab/VL-Rethinker @ dd2c17d that this
# code reproduces (scripts/train_vlm_multi.sh, experience_maker.py, loss.py, ppo_actor.py). The
# table in docs/differences.md gives each one's source and why
# our defaults differ; a test holds the table to these values. Not in it: the learning rate
# (1e-6 for 7B/72B; the README's 3B command sets it) and the data, model and batch sizes.
RECIPES = {"published": {
    "minibatches": 8, "adv_std": False, "clip_eps": 0.2, "clip_eps_high": 0.35, "kl_coef": 0.0,
    "invalid_penalty": 0.1, "reflection_bonus": 0.1, "wait_penalty": 0.2, "sft_coef": 0.05,
    "top_p": 0.95, "top_k": 40, "temperature": 1.0, "adam_beta2": 0.95, "min_lr_ratio": 0.5,
    "rethink_frac": 1.0, "rethink_max_group_acc": 0.6, "rethink_only_wrong": True, "rethink_cut_prob": 0.5,
    "rethink_cut": "published", "rethink_temperature": 0.9, "rethink_max_waits": 3, "rethink_count_markers": True,
    "rethink_min_new_tokens": 30, "rethink_max_replace": -1, "rethink_train_trigger": True,
}}


# What each number may be: outside, it would divide by zero, sample from nothing, count nothing,
# or turn a penalty into a reward. Every value out of range is said at once, before anything loads.
RANGES = (
    ("at least 1", lambda v: v >= 1, ("steps", "prompts_per_step", "minibatches", "micro_batch", "max_new_tokens",
                                      "save_every", "collapse_patience")),
    ("at least 2 (Eq. 2 compares a response with the rest of its group)", lambda v: v >= 2, ("group_size",)),
    ("0 or more", lambda v: v >= 0, ("warmup_steps", "eval_every", "rollout_chunk", "top_k", "min_pixels", "max_pixels",
                                    "rethink_max_waits", "rethink_min_new_tokens", "clip_eps_high", "kl_coef",
                                    "sft_coef", "grad_clip", "ssr_alpha", "rethink_temperature", "invalid_penalty",
                                    "reflection_bonus", "wait_penalty")),
    ("above 0 (the trained distribution is the sampled one: greedy decoding has none)", lambda v: v > 0,
     ("temperature",)),
    ("above 0", lambda v: v > 0, ("lr", "lora_alpha")),
    ("between 0 and 1", lambda v: 0 <= v <= 1, ("min_lr_ratio", "rethink_frac", "rethink_cut_prob",
                                                "rethink_max_group_acc", "min_format_rate")),
    ("above 0 and at most 1", lambda v: 0 < v <= 1, ("top_p",)),
    ("0 or more and below 1", lambda v: 0 <= v < 1, ("adam_beta2", "clip_eps")),
    ("-1 (any number) or more", lambda v: v >= -1, ("rethink_max_replace",)),
)


def check_ranges(cfg: Config):
    bad = [f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be {rule}"
           for rule, ok, names in RANGES for name in names if not ok(getattr(cfg, name))]
    if 0 < cfg.max_pixels < cfg.min_pixels:
        bad.append(f"--max-pixels {cfg.max_pixels}: must be at least --min-pixels {cfg.min_pixels} (0: the model's own)")
    if bad:
        raise UserError("; ".join(bad))


def parse_args(argv=None) -> Config:
    """Flags into a Config; --recipe sets other defaults first, so that flags given still win."""
    p = once_per_run(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    for f in fields(Config):
        flag, text = "--" + f.name.replace("_", "-"), f.metadata["help"]
        if f.type is bool:  # --x and --no-x both: a recipe's setting can be turned back
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=text)
        else:
            p.add_argument(flag, type=f.type, default=f.default, help=f"{text} (default: {f.default!r})")
    recipe = p.parse_known_args(argv)[0].recipe
    if recipe and recipe not in RECIPES:
        p.error(f"--recipe must be one of {list(RECIPES)}, not {recipe!r}")
    p.set_defaults(**RECIPES.get(recipe, {}))
    return Config(**vars(p.parse_args(argv)))


# ---------------------------------------------------------------------------------------------
# Setup: processes, model, data
# ---------------------------------------------------------------------------------------------

def load_policy(cfg: Config, device, ckpt: Path | None = None):
    """The policy from --model, or from the checkpoint `ckpt`, with the image budget. Full
    fine-tuning: fp32 weights (the master copy; --bf16 computes in bf16 under autocast). LoRA
    (--lora-rank): the base from --model, frozen, loaded in the compute dtype (not cast afterwards,
    which would also round the rotary inv_freq buffer), and fp32 adapters: fresh, or `ckpt`'s."""
    if not cfg.lora_rank:
        model, processor = models.load_model(str(ckpt or cfg.model), device, torch.float32, cfg.min_pixels,
                                             cfg.max_pixels)
    else:
        dtype = torch.bfloat16 if cfg.bf16 else torch.float32
        model, processor = models.load_model(cfg.model, device, dtype, cfg.min_pixels, cfg.max_pixels)
        lora.add(model, cfg.lora_rank, cfg.lora_alpha, cfg.seed, models.location(cfg.model))
        if ckpt:
            lora.load(model, ckpt)
    if cfg.freeze_vision:  # also keeps DDP from waiting for gradients that never come
        model.model.visual.requires_grad_(False)
    if cfg.grad_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model, processor


def load_data(cfg: Config, rank: int):
    """(train records, eval records or None). Bad lines stop the run before any training."""
    if cfg.data == "toy":
        tiers = cfg.toy_tiers.split(",")
        return toy.ToyTask("train", tiers), toy.ToyTask("test", toy.test_tiers(tiers))
    records, skipped = data.load_records(hub.data_file(cfg.data), skip_bad=cfg.skip_bad)
    if skipped and rank == 0:
        print(f"skipped {skipped} bad record(s) of {cfg.data}")
    return records, None


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

@dataclass
class Run:
    """Everything a training run holds between steps."""
    cfg: Config
    rank: int
    world: int
    device: torch.device
    out: Path
    model: torch.nn.Module  # the policy (under --shard, sharded); `ddp` wraps it under DDP (world > 1), else is it
    ddp: torch.nn.Module
    processor: object
    ref: grpo.Reference | None  # the KL term's reference policy (None without the term)
    base: dict | None  # under LoRA: the base model's name and fingerprint (lora.base_record), saved with the adapters
    opt: torch.optim.Optimizer
    sched: object
    gen: torch.Generator  # sampling and replay draws
    buffer: object  # ssr.ReplayBuffer
    rethink: rethink.RethinkConfig | None  # None without Forced Rethinking
    decoding: rollout.Decoding  # how rollouts are sampled
    train_set: object
    test_set: object
    start: int  # the first step to run
    low_format_steps: int  # the steps in a row before `start` with few answers (check_collapse), saved with the rest
    logged: int  # the last step an earlier launch of this run logged (-1: none; tracking.open_loggers)
    log: object  # metrics.jsonl, open on rank 0


def rethink_config(cfg: Config):
    """The Forced Rethinking rules (rethink.RethinkConfig) from the flags: field x is --rethink-x.
    None with --no-rethink. The continuation may use the whole response budget: a rethought
    response longer than --max-new-tokens in total is not kept anyway (rethink.keep_rethought)."""
    if not cfg.rethink:
        return None
    rules = {f.name: getattr(cfg, "rethink_" + f.name) for f in fields(rethink.RethinkConfig)
             if f.name != "max_new_tokens"}
    return rethink.RethinkConfig(max_new_tokens=cfg.max_new_tokens, **rules)


def setup(cfg: Config) -> Run:
    """Data (bad data stops here, before any model is built or loads), processes, model, optimizer,
    replay buffer; on --resume all of it as the checkpoint left it, so the run continues exactly."""
    out = check_flags(cfg)
    train_set, test_set = load_data(cfg, rank_world()[0])
    if uses_model(cfg):  # a built model (tiny, smoke) is built now, before the processes meet: the first
        # to take the lock builds it, and under a process group transformers' save_pretrained writes no
        # weights on a rank other than 0 (transformers/distributed/mixin.py, should_save_on_this_rank)
        models.resolve(cfg.model)
    rank, world, device = setup_distributed()
    faults.prepare(out, rank, world)  # --out shared by every process; an interrupted save's leftovers gone
    state, ckpt = None, None
    if cfg.resume:
        ckpt = checkpoint.checkpoint_dir(out)
        state = checkpoint.load_state(ckpt)
        if len(state["generators"]) != world:  # each process's prompts, sampler and replay buffer are its own
            raise UserError(f"--resume: {ckpt} was written by {len(state['generators'])} process(es), this launch has "
                            f"{world}: a run continues exactly only on as many; launch it with "
                            f"{len(state['generators'])}")
    check_same_data(cfg, data.identity(train_set), world, state)
    # --shard: loaded on the CPU, so that each layer goes to the GPU as a shard (shard.shard_model)
    model, processor = load_policy(cfg, "cpu" if cfg.shard else device, ckpt if state else None)
    base = lora.base_record(model, models.location(cfg.model)) if cfg.lora_rank else None
    if state and base:  # adapters resumed on another base than they were trained on would be meaningless
        lora.check_base(base, state["base"], ckpt)
    if cfg.shard:  # before the optimizer: AdamW holds the shards
        model = shard.shard_model(model, device, world, cfg.bf16)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0,
                            betas=(0.9, cfg.adam_beta2))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: grpo.lr_factor(s, cfg.warmup_steps, cfg.steps,
                                                                       cfg.min_lr_ratio))
    ref = reference(cfg, model, device) if cfg.kl_coef else None
    # All toy and jsonl records have images, so every parameter gets a gradient each step.
    # gradient_as_bucket_view: gradients live in DDP's all-reduce buckets, not in a second copy.
    ddp = (torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True)
           if world > 1 and not cfg.shard else model)
    gen = torch.Generator(device).manual_seed(cfg.seed * 1000 + rank)
    # Section 3.1: the buffer keeps recent non-zero-advantage samples, about half a batch.
    buffer = ssr.ReplayBuffer(capacity=max(1, rows_per_process(cfg, world) // 2), alpha=cfg.ssr_alpha)
    if state:
        if cfg.shard:
            shard.load_optimizer(model, opt, ckpt)
        else:
            opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        gen.set_state(state["generators"][rank])
        buffer.load_state_dict(state["buffers"][rank], rollout.Row)
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
    start = state["step"] if state else 0
    # checkpoints written before the count was saved have none: they resume with the count at 0, as they did
    low_format_steps = state.get("low_format_steps", 0) if state else 0
    logged = checkpoint.records(out / "metrics.jsonl")[-1:] if state and rank == 0 else []
    return Run(cfg=cfg, rank=rank, world=world, device=device, out=out, model=model, ddp=ddp, processor=processor,
               ref=ref, base=base, opt=opt, sched=sched, gen=gen, buffer=buffer, rethink=rethink_config(cfg),
               decoding=rollout.Decoding(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.top_k),
               train_set=train_set, test_set=test_set, start=start, low_format_steps=low_format_steps,
               logged=logged[0]["step"] if logged else -1,
               log=checkpoint.open_log(out, asdict(cfg), start, cfg.overwrite) if rank == 0 else None)


def check_same_data(cfg: Config, mine: str, world: int, state: dict | None):
    """Every process, and the checkpoint resumed, hold the same training records (data.identity):
    prompts are drawn by position, so a list that changed (--skip-bad after a picture came back, a
    dataset read at its hub's main branch that moved) would repeat some prompts and skip others."""
    every = gather(mine, world)
    if len(set(every)) > 1:
        raise UserError(f"--data {cfg.data}: the processes loaded different records ("
                        + "; ".join(f"rank {r}: {x}" for r, x in enumerate(every)) + "); give each the same data")
    if state and state.get("data", mine) != mine:  # a checkpoint from before the check has none
        raise UserError(f"--resume: the run trained on {state['data']}, --data {cfg.data} now holds {mine}; "
                        "resume it on the data it trained on")


def reference(cfg: Config, model, device) -> grpo.Reference:
    """The KL term's reference (off by default, as in the published runs): the starting policy.
    Under LoRA that is the policy with its adapters switched off (B starts at zero); else a frozen
    copy loaded from --model again, so that a resumed run keeps the same reference."""
    if cfg.lora_rank:
        return grpo.Reference(model, lambda: lora.adapters_off(model))
    return grpo.Reference(load_policy(cfg, device)[0].requires_grad_(False).eval())


def check_flags(cfg: Config) -> Path:
    """The run folder, once the flags are found sound. Checked before the processes meet and
    before any file is touched: every process refuses alike, and a refused run costs nothing."""
    check_ranges(cfg)
    world = rank_world()[1]
    if cfg.prompts_per_step % world:
        raise UserError(f"--prompts-per-step {cfg.prompts_per_step} must be divisible by {world} processes")
    tracking.kinds(cfg.report_to)  # a logger asked for and not installed: said before anything loads
    if cfg.log_samples < 0:
        raise UserError(f"--log-samples {cfg.log_samples}: give how many responses to show (0: none)")
    if cfg.lora_rank < 0:
        raise UserError(f"--lora-rank {cfg.lora_rank}: give a positive rank for adapters, or 0 for full fine-tuning")
    if cfg.shard:
        shard.check_flags(cfg.kl_coef, cfg.lora_rank)
    if rows_per_process(cfg, world) % cfg.minibatches:
        raise UserError(f"--minibatches {cfg.minibatches} must divide the {rows_per_process(cfg, world)} rows "
                        "of a process's batch")
    out = run_folder(cfg)
    faults.check_restarts(cfg.auto_resume)  # torchrun --max-restarts: a restart must find the run, and its peers
    if cfg.auto_resume:  # this launch's choice, kept in config.json as if given
        cfg.resume, cfg.overwrite = faults.auto_resume(out, asdict(cfg))
    checkpoint.check_run_folder(out, asdict(cfg), cfg.resume, cfg.overwrite)
    if uses_model(cfg):
        models.check(cfg.model)
    if cfg.lora_rank and lora.is_adapter_folder(cfg.model):  # new adapters' base must be a model, not adapters
        raise UserError(f"--model {cfg.model}: an adapter folder; --lora-rank trains adapters on a full model: give "
                        f"the merged model folder saved beside it ({Path(cfg.model).resolve().parent})")
    return out


def uses_model(cfg: Config) -> bool:
    """Whether this launch loads --model: a resumed policy loads from its checkpoint, the KL
    reference and LoRA's base from --model."""
    return not cfg.resume or bool(cfg.kl_coef) or bool(cfg.lora_rank)


def run_folder(cfg: Config) -> Path:
    return Path(cfg.out or f"runs/{Path(cfg.data).stem}-s{cfg.seed}")


def rows_per_process(cfg: Config, world: int) -> int:
    return cfg.prompts_per_step // world * cfg.group_size


def train(cfg: Config):
    faults.catch_signals()  # SIGUSR1 from here on: a checkpoint after the step, then a stop
    try:
        run = setup(cfg)
    except (data.DataError, UserError) as e:  # recorded, or a preempted run's requeues would meet it forever
        if cfg.resume or cfg.auto_resume:  # this run's relaunch; not another command refused its folder
            faults.refused_start(run_folder(cfg), str(e))
        raise
    bar = tqdm(range(run.start, cfg.steps), initial=run.start, total=cfg.steps, disable=run.rank != 0,
               dynamic_ncols=True)
    last_eval = float("nan")
    with (faults.Watch(run.out, run.rank, run.world, run.start) as watch,  # status.json; a failure recorded
          tracking.open_loggers(tracking.kinds(cfg.report_to), run.out, asdict(cfg), run.logged)
          if run.rank == 0 else nullcontext() as loggers):  # a logger that cannot start: a failure recorded too
        for step in bar:
            watch.step = step
            t0 = time.time()
            m, samples = train_step(run, step)
            dt = time.time() - t0
            if run.test_set is not None and (cfg.eval_every and (step + 1) % cfg.eval_every == 0
                                             or step + 1 == cfg.steps):
                scores, shown = run_eval(run)
                m.update(scores)
                samples += tracking.eval_samples(shown, cfg.log_samples, step)
            m.update(step_s=time.time() - t0,
                     tokens_per_s=m["resp_len_mean"] * cfg.prompts_per_step * cfg.group_size / dt)
            last_eval = log_step(run, bar, m, samples, loggers, last_eval)
            run.low_format_steps = check_collapse(cfg, step, m, run.low_format_steps)
            stop = watch.stop_agreed() and step + 1 < cfg.steps
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps or stop:
                save(run, step + 1)
                watch.saved(step + 1)
            if stop:
                return watch.preempted(step + 1)
        finish(run)
        watch.finished(cfg.steps)


def train_step(run: Run, step: int) -> tuple[dict, list[dict]]:
    """One step of Algorithm 1; returns its metrics and its first --log-samples rethought responses
    (tracking.rethink_samples)."""
    cfg = run.cfg
    recs = [run.train_set[i] for i in data.prompts_for_step(len(run.train_set), step, cfg.prompts_per_step, run.rank,
                                                            run.world, cfg.seed)]
    # --- 1. Rollout: G responses per prompt, graded, then Forced Rethinking (Section 3.2) ---
    done = rollout_step(run, recs)
    # --- 2. Rewards -> group advantages (Eq. 2) ---
    rewards = torch.tensor([x.reward for x in done.grades])
    adv = grpo.group_advantages(rewards, cfg.group_size, std=cfg.adv_std)
    # --- 3. Selective Sample Replay (Section 3.1): drop zero-advantage samples, refill from the buffer ---
    batch, batch_adv, n_replayed = replay_batch(run, done, adv, step)
    # --- 4. The clipped policy-gradient update (Eq. 1) ---
    up = grpo.policy_update(learner(run), batch, batch_adv, step)
    if up["skipped"]:
        tqdm.write(f"step {step}: non-finite loss or gradient (grad norm {up['grad_norm']}), update skipped")
    m = step_metrics(run, step, done, rewards, adv, n_replayed, up)  # its lr: the one this step's update used
    run.sched.step()
    return m, tracking.rethink_samples(done.rethought, done.why_not_kept, cfg.log_samples, step)


def rollout_step(run: Run, recs: list) -> rethink.Rethinking:
    """Step 1 of Algorithm 1, --rollout-chunk prompts at a time (the KV caches of one chunk are
    what sampling holds in memory): G responses per prompt (rollout.sample), each graded once,
    then Forced Rethinking (rethink.rethink) on the caches the sampler parked."""
    size = run.cfg.rollout_chunk if run.cfg.rollout_chunk > 0 else len(recs)
    with shard.gathered(run.model):  # --shard: the weights gathered once for all the sampler's forwards
        parts = [rollout_chunk(run, recs[c:c + size]) for c in range(0, len(recs), size)]
    return parts[0] if len(parts) == 1 else rethink.concat(parts, run.processor.tokenizer.pad_token_id)


def rollout_chunk(run: Run, recs: list) -> rethink.Rethinking:
    """One chunk of `rollout_step`: sample -> grade -> rethink."""
    g, grade = run.cfg.group_size, reward.grader(run.cfg.invalid_penalty, run.cfg.reflection_bonus, run.cfg.wait_penalty)
    with models.autocast(run.cfg.bf16, run.device):
        ro = rollout.sample(run.model, run.processor, recs, g, run.decoding, run.gen, park=run.rethink is not None)
        grades = [grade(text, recs[i // g], not cut, False)
                  for i, (text, cut) in enumerate(zip(ro.texts, ro.truncated.tolist()))]
        if run.rethink is None:
            return rethink.unchanged(ro, grades)
        return rethink.rethink(run.model, run.processor.tokenizer, ro, grades,
                               lambda text, i, finished: grade(text, recs[i // g], finished, True), run.rethink)


def learner(run: Run) -> grpo.Learner:
    """What the update uses of the run."""
    settings = grpo.Settings(**{f.name: getattr(run.cfg, f.name) for f in fields(grpo.Settings)})
    return grpo.Learner(model=run.model, forward=run.ddp, opt=run.opt, reference=run.ref, cfg=settings,
                        tokenizer=run.processor.tokenizer, gen=run.gen, device=run.device, world=run.world)


@phases.phase
def replay_batch(run: Run, done: rethink.Rethinking, adv: torch.Tensor, step: int):
    """Step 3 of Algorithm 1: the step's rows (rollout.Row), of which SSR builds the batch
    (ssr.ReplayBuffer.select_batch; --no-ssr: all of them). Returns (batch, advantages, n_replayed)."""
    n_rows = rows_per_process(run.cfg, run.world)
    reflects = [kept or reward.reflections(text) > 0 for kept, text in zip(done.kept.tolist(), done.rollout.texts)]
    rows = rollout.split_rows(done.rollout, step, reflects)  # `reflects`: the rows of the SFT term
    if run.cfg.ssr:
        batch, batch_adv, n_replayed = run.buffer.select_batch(rows, adv, n_rows, generator=run.gen)
    else:
        batch, batch_adv, n_replayed = rows, adv, 0
    # With nothing to learn from anywhere, SSR returns fewer rows than a batch: pad with this step's
    # rows at zero advantage, so that every process runs the same backward passes (DDP).
    pad = n_rows - len(batch)
    return list(batch) + rows[:pad], torch.cat([batch_adv, torch.zeros(pad)]), n_replayed


def step_metrics(run: Run, step: int, done: rethink.Rethinking, rewards, adv, n_replayed: int, up: dict) -> dict:
    """The step's metrics, as named sums over all processes. zero_adv_frac: the share of groups
    whose rewards are all equal ("vanishing advantages", Section 3.1)."""
    g, ro = run.cfg.group_size, done.rollout
    resp_len = ro.response_mask.sum(1).float()
    s = reduce({"n": len(ro.texts), "reward": rewards.sum(), "correct": sum(x.correct for x in done.grades),
                "groups": len(ro.texts) // g, "zero_groups": ssr.zero_advantage(adv).view(-1, g).all(1).sum(),
                "boxed": sum(x.boxed for x in done.grades), "truncated": ro.truncated.sum(),
                "triggered": done.triggered.sum(), "kept": done.kept.sum(), "fixed": done.fixed.sum(),
                "resp_len": resp_len.sum(), "buffer": len(run.buffer), "replayed": n_replayed, "loss": up["loss"],
                "clipped": up["clipped"], "tokens": up["tokens"]},
               run.device, run.world)
    drift = reduce({"d": up["logp_drift_max"]}, run.device, run.world, dist.ReduceOp.MAX)["d"]
    n, trig = s["n"], s["triggered"]
    return {"step": step, "reward_mean": s["reward"] / n, "acc_mean": s["correct"] / n,
            "zero_adv_frac": s["zero_groups"] / s["groups"], "format_rate": s["boxed"] / n,
            "truncated_frac": s["truncated"] / n, "ssr_buffer": int(s["buffer"]), "ssr_replayed": int(s["replayed"]),
            "rethink_triggered": trig / n, "rethink_kept": s["kept"] / trig if trig else 0.0,
            "rethink_fixed": s["fixed"] / trig if trig else 0.0, "resp_len_mean": s["resp_len"] / n,
            "loss": s["loss"] / run.world, "grad_norm": up["grad_norm"], "clip_frac": s["clipped"] / max(s["tokens"], 1),
            "logp_drift_max": drift, "lr": run.sched.get_last_lr()[0], "skipped": up["skipped"]}


def run_eval(run: Run) -> tuple[dict, list[dict]]:
    """Greedy decoding on this rank's shard of the toy test split (all tiers, every world-th
    question): the eval metrics of all ranks' rows (eval.toy_metrics), and the split's first
    --log-samples rows (eval.row's), from whichever ranks hold them: the same questions are shown
    whatever the number of processes."""
    recs = [run.test_set[i] for i in range(run.rank, len(run.test_set), run.world)]
    with shard.gathered(run.model), models.autocast(run.cfg.bf16, run.device):
        rows = evaluation.evaluate(run.model, run.processor, recs, max_new_tokens=run.cfg.max_new_tokens)
    n = min(run.cfg.log_samples, len(run.test_set))
    held = gather(rows[:-(-n // run.world)], run.world)  # question i is rank i % world's (i // world)-th
    return evaluation.toy_metrics(rows, run.cfg.toy_tiers.split(","), run.world), [
        held[i % run.world][i // run.world] for i in range(n)]


def log_step(run: Run, bar, m: dict, samples: list[dict], loggers, last_eval: float) -> float:
    """rank 0: the step to the loggers and samples.jsonl, then its line of metrics.jsonl (a kill in
    between sends the step again on resume, with the same numbers); the bar shows the step's reward,
    the latest eval and the seconds a step."""
    if run.rank == 0:
        loggers.log(m["step"], tracking.scalars(m), samples)
        run.log.write(json.dumps(m) + "\n")
        run.log.flush()
        os.fsync(run.log.fileno())  # on the disk before the next checkpoint, which a resume cuts back to
        last_eval = m.get("eval_acc", last_eval)
        bar.set_postfix(reward=f"{m['reward_mean']:.2f}", eval=f"{last_eval:.2f}", fmt=f"{m['format_rate']:.2f}",
                        s_step=f"{m['step_s']:.1f}")
    return last_eval


def check_collapse(cfg: Config, step: int, m: dict, low_format_steps: int) -> int:
    """A policy that stopped producing answers gets zero reward everywhere: every group has zero
    advantage and nothing can bring it back. Say so and stop, instead of burning compute."""
    low_format_steps = low_format_steps + 1 if m["format_rate"] < cfg.min_format_rate else 0
    if low_format_steps >= cfg.collapse_patience:
        raise SystemExit(f"step {step}: format collapse: fewer than {cfg.min_format_rate:.0%} of responses had a "
                         f"\\boxed{{}} answer for {cfg.collapse_patience} steps (truncated: {m['truncated_frac']:.0%}). "
                         "Lower --lr, or raise --max-new-tokens; see metrics.jsonl.")
    return low_format_steps


def save(run: Run, next_step: int):
    """A checkpoint that resumes exactly: weights, optimizer, schedule, every rank's generator and
    replay buffer, the collapse guard's count, the host RNGs, and which records it trained on. Refused when the processes disagree
    on the weights (under --shard each weight lives on one process: no second copy to disagree with,
    no checksums)."""
    sums = [] if run.cfg.shard else gather(checkpoint.param_checksum(run.model), run.world)
    if len(set(sums)) > 1:
        raise SystemExit(f"step {next_step - 1}: processes disagree on the weights (checksums {sums}); not saving")
    state = {"step": next_step, "low_format_steps": run.low_format_steps, "data": data.identity(run.train_set),
             "checksums": sums, "base": run.base, "optimizer": None if run.cfg.shard else run.opt.state_dict(),
             "scheduler": run.sched.state_dict(), "generators": gather(run.gen.get_state(), run.world),
             "buffers": gather(run.buffer.state_dict(), run.world), "torch_rng": torch.get_rng_state(),
             "python_rng": random.getstate()}
    if run.cfg.shard:  # AdamW's shards go beside it, written by every process
        shard.save_checkpoint(run.out, run.model, run.processor, run.opt, state, run.rank, run.world)
    elif run.rank == 0:
        checkpoint.save_checkpoint(run.out, run.model, run.processor, state)


def finish(run: Run):
    weights = shard.full_weights(run.model) if run.cfg.shard else None  # every process takes part in the gather
    if run.rank == 0:  # final/ written atomically, as the checkpoints are
        checkpoint.write_atomically(run.out / "final", lambda tmp: save_adapted(run, tmp) if run.cfg.lora_rank
                                    else save_whole(run, tmp, weights))
        run.log.close()
        print(f"done: {run.out}/final, metrics in {run.out / 'metrics.jsonl'}")
    if run.world > 1:
        dist.destroy_process_group()


def save_whole(run: Run, folder: Path, weights: dict | None):
    """The final folder of full fine-tuning: the model (`weights`: --shard's gathered state dict;
    None: the model's own) and its processor."""
    run.model.save_pretrained(folder, state_dict=weights)
    run.processor.save_pretrained(folder)


def save_adapted(run: Run, folder: Path):
    """LoRA's final folder: the adapters in peft's format in `adapter/` (eval.py --model loads it too),
    and around them the model with the adapters merged, in fp32, loaded as any model folder. The
    merge is eval.py's own load of the adapter folder, so both give the same weights."""
    lora.save(folder / "adapter", run.model, run.processor, run.base)
    merged, processor = models.load_model(str(folder / "adapter"))
    merged.save_pretrained(folder)
    processor.save_pretrained(folder)


if __name__ == "__main__":
    try:
        train(parse_args())
    except (data.DataError, UserError) as e:  # bad input or flags: one sentence (which file, line, flag), said once
        exit_once(str(e))
