"""Forced Rethinking (paper, Section 3.2): a trigger appended to some first responses, a sampled continuation.

The policy rarely reflects by itself, so during rollouts a self-reflection trigger ("Wait, ...")
is appended to some responses and the policy continues from it; a continuation that turns out
right (and sane) replaces its first response in the batch, so that GRPO reinforces reflecting.
This module reads in the order the step runs: the triggers; who is triggered (`who_rethinks`);
where the first response is cut before the trigger (`cut_at`, `cut_point`); the continuation,
sampled from the first pass's parked KV cache (`continue_forced`); what is kept
(`keep_rethought`); and the step that does all of it (`rethink`), which returns what it decided
and changes nothing it is handed. The trainer calls it between sampling and the update (vlr.py).
"""
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import phases
import reward
import rollout
from rollout import Rollout

# The triggers (Section 3.2): self-verification, self-questioning, self-correction.
TRIGGERS = (
    "\n\nWait",
    "\n\nWait, does it seem right?",
    "\n\nWait, let's double check.",
    "\n\nWait, there might be a mistake.",
)


@dataclass(frozen=True)
class RethinkConfig:
    """The rules, field x set by vlr.py's --rethink-x (these defaults are its defaults; the
    published ones are `--recipe published`: docs/differences.md)."""
    max_new_tokens: int  # length budget of the continuation (the whole response must fit the rollout's cap)
    max_group_acc: float = 0.6  # only prompts whose group accuracy is at most this
    only_wrong: bool = True  # only responses whose first answer is wrong (the published "append_wait" mode)
    frac: float = 0.5  # share of the eligible responses that get a trigger
    cut_prob: float = 0.5  # chance to cut the first response (where: `cut`) before the trigger
    temperature: float = 0.9  # sampling temperature of the continuation (the published value)
    max_waits: int = 3  # more "wait"s than this is degenerate: not kept
    max_replace: int = 2  # at most this many rethought responses replace first ones per prompt (-1: no cap)
    # A rethought response is kept only when right, so its trigger only ever gets a positive
    # advantage: trained, the policy learns to say "Wait" whatever it saw (README, section 3).
    train_trigger: bool = False  # the trigger tokens are trained on (the published code does)
    cut: str = "answer"  # where cut_point cuts: "answer" (ours) or "published"
    min_new_tokens: int = 0  # a continuation must be longer than this to be kept (published: 30)
    count_markers: bool = False  # count waits as published: the continuation's reward.reflections


# ---------------------------------------------------------------------------------------------
# Who is triggered, and where the first response is cut
# ---------------------------------------------------------------------------------------------

def who_rethinks(correct: list, stopped: list, g: int, cfg: RethinkConfig, coins: list) -> list[int]:
    """The responses that get a trigger: each that stopped by itself (a truncated one has no answer
    to check), of a prompt whose group accuracy is at most cfg.max_group_acc (there the model is
    unsure), a wrong one only when cfg.only_wrong, each with probability cfg.frac (`coins`: one
    uniform draw per response). Returns their row indices, in order."""
    return [i for i, why in enumerate(why_not_triggered(correct, stopped, g, cfg, coins)) if not why]


def why_not_triggered(correct: list, stopped: list, g: int, cfg: RethinkConfig, coins: list) -> list[str]:
    """`who_rethinks`' rules, response by response: "" for one that gets a trigger, else the first
    rule it fails, in words."""
    acc = [sum(correct[p * g:(p + 1) * g]) / g for p in range(len(correct) // g)]
    return ["cut by the cap: no answer to check" if not stopped[i]
            else f"group accuracy {acc[i // g]:.2f} > {cfg.max_group_acc}" if acc[i // g] > cfg.max_group_acc
            else "right: only wrong answers are rethought" if cfg.only_wrong and correct[i]
            else f"not drawn: coin {coins[i]:.2f} >= {cfg.frac}" if coins[i] >= cfg.frac
            else "" for i in range(len(correct))]


def cut_at(text: str, rule: str = "answer") -> int:
    """Where (a character index) a first response is cut before the trigger. "answer": just before
    its final answer, the last "\\boxed", else the last "answer"; the whole text if it has neither.
    "published" (experience_maker.py, RemoteExperienceMaker._generate_vllm): four cuts, each made
    when its pattern is found in what the one before kept: at the last "Wait", the last "\\boxed",
    the *first* "answer" (any case), the last blank line; then trailing space goes. The published
    code strips only after a blank-line cut; we always do, which moves the token cut only where
    a space is a token of its own (BPE joins a space to the word after it)."""
    if rule == "answer":
        at = text.rfind("\\boxed")
        at = text.lower().rfind("answer") if at < 0 else at
        return len(text) if at < 0 else at
    if rule != "published":
        raise ValueError(f"cut rule must be 'answer' or 'published', not {rule!r}")
    for find in (lambda t: t.rfind("Wait"), lambda t: t.rfind("\\boxed"), lambda t: t.lower().find("answer"),
                 lambda t: t.rfind("\n\n")):
        at = find(text)
        text = text if at < 0 else text[:at]
    return len(text.rstrip())


def cut_point(tokenizer, body: list[int], rule: str = "answer") -> int:
    """How many tokens of a response to keep before the trigger: the tokens before `cut_at`."""
    text = tokenizer.decode(body)
    at = cut_at(text, rule)
    if at >= len(text):
        return len(body)
    # The first token that reaches into the answer: the shortest prefix whose text is longer than
    # `at`. Prefixes are decoded whole, not token by token: a character split over several byte
    # tokens (CJK, "°", "√") decodes to one "\ufffd" per token alone, and counting those would
    # cut too early. Prefix length never shrinks as tokens are added, so bisect.
    lo, hi = 0, len(body)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(tokenizer.decode(body[:mid + 1])) > at:
            hi = mid
        else:
            lo = mid + 1
    return lo


@dataclass
class Forced:
    """One triggered response: its first `keep` tokens, then `trigger`, then a continuation."""
    row: int
    keep: int  # tokens of the first response kept before the trigger (its stop token never is)
    trigger: list  # the trigger's token ids


def plan(tokenizer, ro: Rollout, correct: list, cfg: RethinkConfig, coins: torch.Tensor) -> list[Forced]:
    """Who is triggered, where each is cut, which trigger follows: three uniform `coins` a row."""
    sel = who_rethinks(correct, (~ro.truncated).tolist(), ro.group_size, cfg, coins[:, 0].tolist())
    out = []
    for i in sel:
        body = ro.response_ids[i, :int(ro.response_mask[i].sum()) - 1].tolist()  # without the stop token
        k = cut_point(tokenizer, body, cfg.cut) if coins[i, 1] < cfg.cut_prob else len(body)
        trigger = tokenizer.encode(TRIGGERS[int(coins[i, 2] * len(TRIGGERS))], add_special_tokens=False)
        out.append(Forced(i, k, trigger))
    return out


# ---------------------------------------------------------------------------------------------
# The continuation: the first pass's KV cache, continued after the trigger
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def continue_forced(model, ro: Rollout, forced: list[Forced], cfg: RethinkConfig):
    """Continue the parked KV cache of each triggered row (`kv_cache.Parked.select`) after its kept
    tokens, with [last kept token, trigger...] fed as one chunk.

    The cut-off tail is masked out of attention, and the last kept token is fed again with the
    trigger, so that its logits (which predict the trigger's first token) are computed afresh.
    Positions continue from the last kept token: the final sequence has the positions of a
    contiguous one. Returns the trigger's log-probs [M, W - 1] (left-padded) and the
    continuation (`rollout.Decoded`, drawn at cfg.temperature, recorded at the training one)."""
    c, s = ro.caches, ro.caches.sampling
    dev, g = c.start.device, ro.group_size
    chunks = [torch.tensor([int(ro.response_ids[f.row, f.keep - 1]) if f.keep > 0 else int(c.prompt_ids[f.row // g, -1])]
                           + f.trigger, device=dev) for f in forced]  # the refed token, then the trigger
    rows, keep = torch.tensor([f.row for f in forced], device=dev), torch.tensor([f.keep for f in forced], device=dev)
    width = max(len(x) for x in chunks)
    cache, attn = c.parked.select(rows, width + cfg.max_new_tokens)  # room: the continuation
    c.parked.release()  # one cache at the peak, not two
    slot = torch.arange(attn.shape[1], device=dev)  # [S] the parked rows' width (kv_cache.Parked.select)
    attn = attn.masked_fill(slot[None] >= c.prompt_ids.shape[1] + keep[:, None] - 1, 0)  # [M, S] from the refed token's old slot
    chunk = torch.stack([F.pad(x, (width - len(x), 0), value=s.pad) for x in chunks])  # [M, W] left-padded
    chunk_mask = torch.stack([F.pad(torch.ones_like(x), (width - len(x), 0)) for x in chunks])  # [M, W]
    first_pos = c.start[rows] + keep - 1  # [M] the refed token's position
    lens = torch.tensor([len(x) for x in chunks], device=dev)  # [M]
    chunk_pos = (first_pos[:, None] + torch.arange(width, device=dev)[None] - (width - lens)[:, None]) * chunk_mask
    attn = torch.cat([attn, chunk_mask], 1)  # [M, S + W]
    out = model(input_ids=chunk, attention_mask=attn, position_ids=chunk_pos[None].expand(3, -1, -1),
                past_key_values=cache, use_cache=True)  # logits [M, W, V]
    trig_lp = rollout.log_softmax(out.logits[:, :-1], s.logp_temperature, s.banned).gather(-1, chunk[:, 1:, None]).squeeze(-1)
    return trig_lp, rollout.decode(model, cache, out.logits[:, -1], attn, first_pos + lens, cfg.max_new_tokens,
                                   dataclasses.replace(s, temperature=cfg.temperature))


# ---------------------------------------------------------------------------------------------
# What is kept
# ---------------------------------------------------------------------------------------------

@dataclass
class Rethought:
    """One rethought response: first response (cut at `keep` tokens) + trigger + continuation."""
    row: int
    ids: torch.Tensor  # [T] response tokens
    logp: torch.Tensor  # [T] recorded log-probs
    loss_mask: torch.Tensor  # [T]
    text: str
    stopped: bool  # the continuation ended by itself
    grade: object  # the `grade` callback's result
    continuation: str = ""  # the text after the trigger
    new_tokens: int = 0  # the continuation's length in tokens
    first: str = ""  # the text of the first response's kept tokens (before the cut)
    trigger: str = ""  # the trigger's text
    first_correct: bool = False  # the first response (whole) was right


def keep_rethought(cands: list[Rethought], g: int, cfg: RethinkConfig, max_len: int) -> list[bool]:
    """Which rethought responses replace their first response: right ones that stopped by
    themselves, say "wait" at most cfg.max_waits times (more is a loop; with cfg.count_markers the
    continuation's reflections, as published), have a continuation longer than cfg.min_new_tokens,
    and fit the response cap `max_len` (so the policy trains only on responses it could have
    produced itself), at most cfg.max_replace per prompt (-1: any number), first come first kept."""
    return [not why for why in why_not_kept(cands, g, cfg, max_len)]


def why_not_kept(cands: list[Rethought], g: int, cfg: RethinkConfig, max_len: int) -> list[str]:
    """`keep_rethought`'s rules, candidate by candidate: "" for one that is kept, else the first
    rule it fails, in words."""
    replaced, out = {}, []
    for c in cands:
        waits = reward.reflections(c.continuation) if cfg.count_markers else reward.waits(c.text)
        room = cfg.max_replace < 0 or replaced.get(c.row // g, 0) < cfg.max_replace
        why = ("wrong answer" if not c.grade.correct
               else "the continuation did not stop by itself" if not c.stopped
               else f"{waits} waits > {cfg.max_waits}" if waits > cfg.max_waits
               else f"a {c.new_tokens}-token continuation (> {cfg.min_new_tokens} needed)" if c.new_tokens <= cfg.min_new_tokens
               else f"{len(c.ids)} tokens > the cap of {max_len}" if len(c.ids) > max_len
               else f"its prompt already has {cfg.max_replace} replaced" if not room else "")
        replaced[c.row // g] = replaced.get(c.row // g, 0) + (not why)
        out.append(why)
    return out


# ---------------------------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------------------------

@dataclass
class Rethinking:
    """A rollout after Forced Rethinking, and what rethinking did to each of its N rows."""
    rollout: Rollout  # the kept rethought responses in place of their first ones; no parked caches
    grades: list  # [N] each final response's grade
    triggered: torch.Tensor  # [N] a trigger was tried
    kept: torch.Tensor  # [N] the rethought response replaced the first one
    fixed: torch.Tensor  # [N] triggered, the first answer wrong and the rethought one right (kept or not)
    first_texts: list  # [N] the replaced first response of a kept row, else None
    forced: list = dataclasses.field(default_factory=list)  # the Forced of every triggered row
    rethought: list = dataclasses.field(default_factory=list)  # the Rethought of each, in the order of `forced`
    why_not_kept: list = dataclasses.field(default_factory=list)  # of each: "" kept, else why not (`why_not_kept`)
    why_not_triggered: list = dataclasses.field(default_factory=list)  # [N] "" triggered, else why not


def unchanged(ro: Rollout, grades: list) -> Rethinking:
    """A rollout that nothing was rethought in (--no-rethink, or no row triggered)."""
    n, no = len(grades), torch.zeros(len(grades), dtype=torch.bool)
    return Rethinking(dataclasses.replace(ro, caches=None), list(grades), no, no.clone(), no.clone(), [None] * n)


@phases.phase
@torch.no_grad()
def rethink(model, tokenizer, ro: Rollout, grades: list, grade, cfg: RethinkConfig, forced=None) -> Rethinking:
    """Forced Rethinking on a rollout sampled with `park` (its first responses graded: `grades`):
    plan who is triggered and where (`plan`; `forced` given: that plan instead), continue them
    (`continue_forced`), grade each rethought response (`grade(text, row, finished)`), and keep
    the ones `keep_rethought` keeps. Returns what it decided, and why (`why_not_triggered`,
    `why_not_kept`)."""
    s = ro.caches.sampling
    coins = torch.rand(len(grades), 3, generator=s.generator, device=ro.caches.start.device).cpu()  # trigger?, cut?, which
    correct = [x.correct for x in grades]
    if forced is None:
        why = why_not_triggered(correct, (~ro.truncated).tolist(), ro.group_size, cfg, coins[:, 0].tolist())
        forced = plan(tokenizer, ro, correct, cfg, coins)
    else:
        planned = {f.row for f in forced}
        why = ["" if i in planned else "not in the plan handed over" for i in range(len(grades))]
    if not forced:
        return dataclasses.replace(unchanged(ro, grades), why_not_triggered=why)
    trig_lp, d = continue_forced(model, ro, forced, cfg)
    cands = []
    for j, f in enumerate(forced):
        real, m = d.real[j], len(f.trigger)
        ids = torch.cat([ro.response_ids[f.row, :f.keep], torch.tensor(f.trigger), d.tokens[j][real].cpu()])
        text = tokenizer.decode(ids, skip_special_tokens=True)
        cands.append(Rethought(
            row=f.row, ids=ids, logp=torch.cat([ro.logp[f.row, :f.keep], trig_lp[j, -m:].cpu(), d.logp[j][real].cpu()]),
            loss_mask=torch.cat([torch.ones(f.keep), torch.full((m,), float(cfg.train_trigger)), torch.ones(int(real.sum()))]),
            text=text, stopped=bool(d.stopped[j]), grade=grade(text, f.row, bool(d.stopped[j])),
            continuation=tokenizer.decode(d.tokens[j][real], skip_special_tokens=True), new_tokens=int(real.sum()),
            first=tokenizer.decode(ro.response_ids[f.row, :f.keep], skip_special_tokens=True),
            trigger=tokenizer.decode(f.trigger), first_correct=bool(correct[f.row])))
    not_kept = why_not_kept(cands, ro.group_size, cfg, ro.caches.cap)
    return dataclasses.replace(replaced(ro, grades, cands, [not w for w in not_kept], forced), rethought=cands,
                               why_not_kept=not_kept, why_not_triggered=why)


def replaced(ro: Rollout, grades: list, cands: list[Rethought], keep: list[bool], forced: list) -> Rethinking:
    """The rollout with the kept candidates in place of their first responses, re-padded."""
    out = unchanged(ro, grades)
    lengths = ro.response_mask.sum(1).tolist()
    rows = [(ro.response_ids[i, :n], ro.logp[i, :n], ro.loss_mask[i, :n]) for i, n in enumerate(lengths)]
    texts = list(ro.texts)
    for c, kept in zip(cands, keep):
        out.triggered[c.row] = True
        out.fixed[c.row] = c.grade.correct and not grades[c.row].correct
        if kept:
            out.kept[c.row], out.first_texts[c.row] = True, texts[c.row]
            texts[c.row], out.grades[c.row] = c.text, c.grade
            rows[c.row] = (c.ids, c.logp, c.loss_mask)
    pad = ro.caches.sampling.pad
    out.rollout = dataclasses.replace(
        out.rollout, texts=texts, response_ids=rollout.pad([r[0] for r in rows], pad),
        response_mask=rollout.pad([torch.ones_like(r[0]) for r in rows], 0), logp=rollout.pad([r[1] for r in rows], 0.0),
        loss_mask=rollout.pad([r[2] for r in rows], 0.0))
    out.forced = forced
    return out


def concat(parts: list[Rethinking], pad_id: int) -> Rethinking:
    """One Rethinking from those of chunks of prompts (--rollout-chunk), laid out as one: a chunk's
    rows come after those of the chunks before it."""
    offsets = [sum(len(q.grades) for q in parts[:i]) for i in range(len(parts))]
    return Rethinking(rollout.concat([p.rollout for p in parts], pad_id), [x for p in parts for x in p.grades],
                      *(torch.cat([getattr(p, k) for p in parts]) for k in ("triggered", "kept", "fixed")),
                      [t for p in parts for t in p.first_texts],
                      forced=[dataclasses.replace(f, row=f.row + o) for p, o in zip(parts, offsets) for f in p.forced],
                      rethought=[dataclasses.replace(c, row=c.row + o) for p, o in zip(parts, offsets) for c in p.rethought],
                      why_not_kept=[w for p in parts for w in p.why_not_kept],
                      why_not_triggered=[w for p in parts for w in p.why_not_triggered])
