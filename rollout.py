"""Rollouts: G sampled responses per prompt with a hand-written KV-cache loop, and their log-probs.

Two things live here, and both must agree with the trainer (to float rounding: ~1e-6 in fp32,
docs/memory.md gives the drift under bf16):
  * `sample` draws the group of responses (paper, Section 2: GRPO needs G responses per question)
    and records each token's log-probability. It knows nothing of rewards or of Forced Rethinking
    (rethink.py), which continues the caches that `sample` parks for it.
  * `logprobs` is the teacher-forced forward the trainer differentiates. Sampling and training use
    one definition of the distribution (`log_softmax`), so `logprobs` reproduces the recorded ones.
`split_rows` and `collate` take a rollout apart into one `Row` per response (what the replay buffer
stores) and put any rows back together into a batch for `logprobs`.

Qwen2.5-VL details that matter (transformers 5.x):
  * Positions are 3-D ("mrope": time, height, width). The prompt's come from
    `model.model.get_rope_index`, built from `mm_token_type_ids` (1 on image tokens); text after
    the prompt continues at max(prompt position) + 1. We always pass `position_ids` ourselves,
    so the model's hidden `rope_deltas` state is never used.
  * A sampled `<|image_pad|>` would make the training forward fail (more image tokens than the
    images have features), so vision special tokens get probability 0, in sampling and in training
    (docs/differences.md: the published code samples from the full softmax).
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import data
import kv_cache
import phases

VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")
LEAVE_AT = 0.25  # finished rows leave the decode batch once they are this share of it (inf: never)


def special_ids(tokenizer, names) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(t) for t in names]


def log_softmax(logits: torch.Tensor, temperature: float, banned: list[int]) -> torch.Tensor:
    """THE policy distribution, shared by sampling and training: log softmax(logits / T) with the
    vision special tokens removed. Temperature is part of it, so that the PPO ratio compares the
    distribution the tokens were actually drawn from, and the sampler's log-probs are the old
    log-probs of Eq. 1 with no second forward pass. (At temperature 1, the default, this is the
    plain softmax that the published code, which does not scale its training logits, uses too.)"""
    logits = logits.float() / temperature
    logits[..., banned] = float("-inf")
    return torch.log_softmax(logits, dim=-1)


# ---------------------------------------------------------------------------------------------
# Positions
# ---------------------------------------------------------------------------------------------

def positions(model, input_ids, mm_token_type_ids, image_grid_thw, attention_mask) -> torch.Tensor:
    """3-D mrope positions (3, batch, length) of left- or right-padded sequences; padding gets 0."""
    inner = getattr(model, "module", model).model  # under DDP the trainer passes the wrapper
    pos, _ = inner.get_rope_index(input_ids, mm_token_type_ids=mm_token_type_ids,
                                  image_grid_thw=image_grid_thw, attention_mask=attention_mask)
    return pos


# ---------------------------------------------------------------------------------------------
# The teacher-forced forward (what the trainer differentiates)
# ---------------------------------------------------------------------------------------------

@phases.phase
def logprobs(model, prompts: dict, response_ids, response_mask, temperature: float, banned: list[int],
             share_vision: bool = True):
    """Log-probability of each response token given prompt + earlier tokens, in one forward pass.

    The sequence is [left-padded prompt | right-padded response]; padding is masked out of
    attention (its position, 0, is read by no real token), so every real token sees exactly what
    it saw while sampled.
    `share_vision`: each distinct image of the batch goes through the vision tower once
    (`embed_shared`); False runs it once per row's image, as the model's own forward does (the
    reference path, kept for bench.py). Returns [N, T], zero where response_mask is 0."""
    n_resp = response_ids.shape[1]  # T
    input_ids = torch.cat([prompts["input_ids"], response_ids], 1)  # [N, L + T]
    attn = torch.cat([prompts["attention_mask"], response_mask.long()], 1)  # [N, L + T]
    mm = torch.cat([prompts["mm_token_type_ids"], torch.zeros_like(response_ids, dtype=prompts["mm_token_type_ids"].dtype)], 1)
    pos = positions(model, input_ids, mm, prompts["image_grid_thw"], attn)  # [3, N, L + T]
    if share_vision:
        embeds = embed_shared(model, input_ids, prompts["pixel_values"], prompts["image_grid_thw"])  # [N, L + T, H]
        out = model(inputs_embeds=embeds, attention_mask=attn, position_ids=pos, logits_to_keep=n_resp + 1,
                    use_cache=False)
    else:
        out = model(input_ids=input_ids, attention_mask=attn, position_ids=pos, pixel_values=prompts["pixel_values"],
                    image_grid_thw=prompts["image_grid_thw"], logits_to_keep=n_resp + 1, use_cache=False)
    # logits at position t predict token t+1: the last prompt position predicts response token 0
    lp = log_softmax(out.logits[:, :-1], temperature, banned)  # [N, T, V]
    return lp.gather(-1, response_ids.unsqueeze(-1)).squeeze(-1) * response_mask  # [N, T]


def distinct_images(pixel_values, grid) -> tuple[list[int], list[int]]:
    """Which images of a batch are the same picture. The rows of a group carry copies of their
    prompt's images, and a replayed row (Section 3.1) may carry a picture of any earlier step; only
    the content says which are equal: a block's sum finds the candidates, exact equality decides.
    Returns the first block of each distinct picture, and for every block which distinct one it is."""
    blocks = torch.split(pixel_values, grid.prod(-1).tolist())
    sums = torch.stack([b.sum() for b in blocks]).tolist() if blocks else []  # one sync, not one a block
    firsts, which, seen = [], [], {}
    for i, (block, key) in enumerate(zip(blocks, zip(map(tuple, grid.tolist()), sums))):
        same = next((j for j in seen.get(key, []) if torch.equal(blocks[firsts[j]], block)), None)
        if same is None:
            same = len(firsts)
            firsts.append(i)
            seen.setdefault(key, []).append(same)
        which.append(same)
    return firsts, which


def embed_shared(model, input_ids, pixel_values, grid) -> torch.Tensor:
    """The decoder's input embeddings, as the model's forward builds them (token embeddings, each
    image's features scattered over its image tokens in row order), with each distinct picture
    encoded once and its features handed to every row that shows it: the G rows of a group no
    longer pay G vision forwards. When the tower trains, the gradient of a picture's features is
    the sum over the rows that use it, as it is when each row encodes its own copy. A frozen tower
    (--freeze-vision) encodes here too, instead of reusing the rollout's features: those would
    travel in every row and the replay buffer (1280 x 2048 floats, 10 MB, a picture at the
    published budget), for the one encoding per picture and micro-batch that is left."""
    inner = getattr(model, "module", model).model  # under DDP the trainer passes the wrapper
    firsts, which = distinct_images(pixel_values, grid)
    blocks = torch.split(pixel_values, grid.prod(-1).tolist())
    feats = inner.get_image_features(torch.cat([blocks[i] for i in firsts]), grid[firsts],
                                     return_dict=True).pooler_output  # one [tokens, H] per distinct picture
    embeds = inner.get_input_embeddings()(input_ids)  # [N, S, H]
    image = torch.cat([feats[j] for j in which]).to(embeds.dtype)  # [image tokens of the batch, H]
    return embeds.masked_scatter((input_ids == inner.config.image_token_id)[..., None], image)


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Decoding:
    """How responses are drawn: the caller's settings (the published rollouts: top-k 40, top-p 0.95)."""
    max_new_tokens: int  # the response cap
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: all tokens
    stop_tokens: tuple = STOP_TOKENS  # (): decode exactly max_new_tokens (bench.py times it so)
    leave_at: float = LEAVE_AT  # inf: finished rows stay in the decode batch (the reference path)


@dataclass(frozen=True)
class Sampling:
    """How the next token is drawn, and what the sampler needs to know about the vocabulary."""
    temperature: float  # 0: greedy
    logp_temperature: float  # the recorded log-probs' temperature: the training distribution's
    top_p: float
    top_k: int
    banned: list  # vision special tokens: never sampled (a sampled <|image_pad|> breaks the next forward)
    pad: int
    stop: torch.Tensor  # [S] token ids that end a response
    generator: torch.Generator | None
    leave_at: float


def sampling(tokenizer, how: Decoding, generator, device) -> Sampling:
    """The sampler's view of `how`. Greedy responses record their log-probs at temperature 1."""
    stop = torch.tensor(special_ids(tokenizer, how.stop_tokens), dtype=torch.long, device=device)
    return Sampling(how.temperature, how.temperature if how.temperature > 0 else 1.0, how.top_p, how.top_k,
                    special_ids(tokenizer, VISION_TOKENS), tokenizer.pad_token_id, stop, generator, how.leave_at)


def pick(logits, temperature: float, top_p: float, banned: list[int], generator, top_k: int = 0, rows=None,
         n: int = 0) -> torch.Tensor:
    """Next token per row: greedy at temperature 0, else sampling from the top_k most likely tokens
    (0: all) and of those the nucleus of mass top_p (the published rollouts: top-k 40, top-p 0.95).
    The recorded log-prob stays that of the full distribution, the one training differentiates.
    `rows`, `n`: these logits are those rows of a decode batch of n (see `draw`)."""
    if temperature == 0:
        logits = logits.float().clone()
        logits[:, banned] = float("-inf")
        return logits.argmax(-1)
    probs = log_softmax(logits, temperature, banned).exp()  # [B, V]
    mass = 1.0
    if 0 < top_k < probs.shape[-1]:
        kth = probs.topk(top_k, dim=-1).values[:, -1:]  # [B, 1] the k-th largest probability
        probs = probs.masked_fill(probs < kth, 0.0)
        # [B, 1] what top-k kept: top-p is a share of it, as in vLLM (apply_top_k_top_p: a softmax of the
        # top-k-masked logits before the cumsum), which the published rollouts sample with
        mass = probs.sum(-1, keepdim=True)
    if top_p < 1.0:  # keep the smallest set of most likely tokens whose mass reaches top_p (of `mass`)
        sorted_p, order = probs.sort(-1, descending=True)  # [B, V]
        outside = sorted_p.cumsum(-1) - sorted_p >= top_p * mass  # [B, V] the tokens before already reach it
        probs = probs.scatter(-1, order, sorted_p.masked_fill(outside, 0.0))
    return draw(probs, generator, rows, n)  # [B]


def draw(probs, generator, rows=None, n: int = 0) -> torch.Tensor:
    """One token per row of `probs` [B, V], drawn as torch.multinomial(probs, 1) draws it (the
    argmax of p / q with one q ~ Exp(1) per entry), but with the noise of all n rows of the decode
    batch drawn, of which these are `rows`. So the generator is used alike, and each row gets the
    same noise, whichever rows have already left the batch (`decode`). On the CPU, exponential_
    is -log1p(-u) of float64 uniforms: the uniforms of all rows keep the generator's stream, and
    the log, most of the cost, is taken for the rows still in the batch only."""
    n, v = n or probs.shape[0], probs.shape[1]
    if probs.device.type == "cpu":
        u = torch.rand(n, v, dtype=torch.float64, generator=generator)  # [n, V]
        q = -torch.log1p(-(u if rows is None else u[rows])).float()  # [B, V]
    else:
        q = probs.new_empty(n, v).exponential_(generator=generator)  # [n, V]
        q = q if rows is None else q[rows]  # [B, V]
    return torch.where(probs > 0, probs / q, 0.0).argmax(-1)  # [B] 0/0 (q = 0 from u = 0) would win as NaN


@dataclass
class Decoded:
    """What the decode loop produced: N rows of T steps."""
    tokens: torch.Tensor  # [N, T] padding after a row stopped
    logp: torch.Tensor  # [N, T] recorded log-probs, 0 after a row stopped
    real: torch.Tensor  # [N, T] the real tokens, up to and including the stop token
    stopped: torch.Tensor  # [N] the row ended by itself (not at the cap)
    parked: kv_cache.Parked | None  # with `park`: the KV caches of all rows
    cache: object  # the cache `decode` was handed, extended by the loop: the rows still in the batch at its end


@phases.phase
def decode(model, cache, logits, attn, start, max_new: int, s: Sampling, park: bool = False) -> Decoded:
    """The KV-cache loop: one token per row per step until every row has stopped.

    `logits` are the next-token logits of each row, `attn` the attention mask of what is in the
    cache, `start` the position of each row's first new token. The caller hands `cache` over: the
    loop writes into it and returns it (`Decoded.cache`). Tokens are drawn at s.temperature and
    recorded at s.logp_temperature. A row that stopped is fed padding, masked out of attention,
    until s.leave_at of the batch has stopped: then those rows leave the batch and the cache, and
    the rest decodes on a smaller batch. With long-tailed lengths most rows stop early and would be
    fed padding until the longest ends. The noise of every row is drawn at every step (`draw`):
    no token depends on when other rows left. With `park`, the caches of all rows are kept
    (`kv_cache.Parked`), for Forced Rethinking, which continues them."""
    n, dev = logits.shape[0], logits.device  # logits [N, V], attn [N, L], start [N]
    rows = torch.arange(n, device=dev)  # [B] the row of each batch entry; B shrinks as rows leave
    done = torch.zeros(n, dtype=torch.bool, device=dev)  # [N]
    parked = kv_cache.Parked() if park else None
    toks, lps, real = [], [], []
    for t in range(max_new):
        tok = pick(logits, s.temperature, s.top_p, s.banned, s.generator, s.top_k, rows, n)  # [B]
        lp = log_softmax(logits, s.logp_temperature, s.banned).gather(1, tok[:, None]).squeeze(1)  # [B]
        live = ~done[rows]  # [B] not stopped before this token: the token is real
        tok = torch.where(live, tok, s.pad)
        toks.append(torch.full((n,), s.pad, device=dev).index_put((rows,), tok))  # [N]
        lps.append(torch.zeros(n, device=dev).index_put((rows,), torch.where(live, lp, 0.0)))  # [N]
        real.append(torch.zeros(n, dtype=torch.bool, device=dev).index_put((rows,), live))  # [N]
        done[rows] = done[rows] | torch.isin(tok, s.stop)
        if done.all() or t == max_new - 1:
            break
        stopped = done[rows]  # [B]
        if stopped.sum() >= s.leave_at * len(rows):  # they leave; their token is not fed, the cache ends before it
            if parked is not None:
                parked.add(cache, attn, rows, stopped)
            going = (~stopped).nonzero().squeeze(1)  # [B'] positions in the batch
            cache.batch_select_indices(going)
            rows, attn, tok, live = rows[going], attn[going], tok[going], live[going]
        attn = torch.cat([attn, live[:, None].long()], 1)  # [B, L + t + 1]
        pos = (start[rows] + t).view(1, -1, 1).expand(3, -1, 1)  # [3, B, 1] text: one position on all 3 mrope axes
        logits = model(input_ids=tok[:, None], attention_mask=attn, position_ids=pos,
                       past_key_values=cache, use_cache=True).logits[:, -1]  # [B, V]
    if parked is not None:
        parked.add(cache, attn, rows)
    return Decoded(torch.stack(toks, 1), torch.stack(lps, 1), torch.stack(real, 1), done, parked, cache)


@dataclass
class Caches:
    """What `sample` keeps with `park`, so that Forced Rethinking can continue any response."""
    parked: kv_cache.Parked  # the KV cache of every row
    start: torch.Tensor  # [N] the position of each row's first response token
    prompt_ids: torch.Tensor  # [P, L] the prompts, left-padded, on the model's device
    sampling: Sampling  # how the responses were drawn
    cap: int  # the response cap: a continued response must fit in it too


@dataclass
class Rollout:
    """One step's responses: N = prompts x G rows, row i answers prompt i // G. On the CPU."""
    group_size: int  # G
    prompts: dict  # the prompt batch, one row per response (pixel values repeated per image)
    response_ids: torch.Tensor  # [N, T] right-padded
    response_mask: torch.Tensor  # [N, T] 1 on real tokens, up to and including the stop token
    logp: torch.Tensor  # [N, T] log-prob of each token when sampled (training temperature)
    loss_mask: torch.Tensor  # [N, T] the tokens trained on
    texts: list  # decoded responses
    truncated: torch.Tensor  # [N] hit the cap without a stop token
    caches: Caches | None = None  # with `park`, for Forced Rethinking (on the model's device)


@phases.phase
@torch.no_grad()
def sample(model, processor, records, g: int, how: Decoding, generator=None, park: bool = False) -> Rollout:
    """G responses for each record, drawn as `how` says. With `park` the rollout keeps every row's
    KV cache (`Rollout.caches`) for Forced Rethinking: the caller drops it after."""
    tok = processor.tokenizer
    dev = next(model.parameters()).device
    s = sampling(tok, how, generator, dev)
    batch = {k: v.to(dev) for k, v in data.encode_prompts(processor, records).items()}  # P prompts, left-padded
    pos = positions(model, batch["input_ids"], batch["mm_token_type_ids"], batch["image_grid_thw"],
                    batch["attention_mask"])  # [3, P, L]
    # Prefill each prompt once (images encoded once), then copy its cache G times: the group.
    cache = kv_cache.new_cache(dev, batch["input_ids"].shape[1] + how.max_new_tokens)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=pos,
                pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                past_key_values=cache, use_cache=True, logits_to_keep=1)
    cache.batch_repeat_interleave(g)
    logits = out.logits[:, -1].repeat_interleave(g, 0)  # [N, V], N = P * G
    attn = batch["attention_mask"].repeat_interleave(g, 0)  # [N, L]
    start = (pos.amax(dim=(0, 2)) + 1).repeat_interleave(g)  # [N] text after the prompt: max position + 1
    d = decode(model, cache, logits, attn, start, how.max_new_tokens, s, park)
    ids = [d.tokens[i][d.real[i]] for i in range(len(d.tokens))]
    return Rollout(group_size=g, prompts=data.repeat_prompts({k: v.cpu() for k, v in batch.items()}, g),  # G copies off the GPU
                   response_ids=pad(ids, s.pad).cpu(), response_mask=pad([torch.ones_like(x) for x in ids], 0).cpu(),
                   logp=pad([d.logp[i][d.real[i]] for i in range(len(ids))], 0.0).cpu(),
                   loss_mask=pad([torch.ones(len(x), device=dev) for x in ids], 0.0).cpu(),
                   texts=tok.batch_decode(ids, skip_special_tokens=True), truncated=(~d.stopped).cpu(),
                   caches=Caches(d.parked, start, batch["input_ids"], s, how.max_new_tokens) if park else None)


def pad(seqs, value, side: str = "right") -> torch.Tensor:
    """Sequences of different lengths as one [N, max length] tensor."""
    return torch.nn.utils.rnn.pad_sequence(list(seqs), batch_first=True, padding_value=value, padding_side=side)


def concat(parts: list[Rollout], pad_id: int) -> Rollout:
    """One Rollout from rollouts of different prompts (--rollout-chunk samples a chunk at a time),
    laid out as if sampled at once: prompts re-padded on the left to the longest, responses on the
    right, images in row order. Parked caches are not carried over."""
    def left(key, value):
        width = max(p.prompts[key].shape[1] for p in parts)
        return torch.cat([F.pad(p.prompts[key], (width - p.prompts[key].shape[1], 0), value=value) for p in parts])

    def right(key, value):
        width = max(getattr(p, key).shape[1] for p in parts)
        return torch.cat([F.pad(getattr(p, key), (0, width - getattr(p, key).shape[1]), value=value) for p in parts])

    prompts = {"input_ids": left("input_ids", pad_id), "attention_mask": left("attention_mask", 0),
               "mm_token_type_ids": left("mm_token_type_ids", 0),
               "pixel_values": torch.cat([p.prompts["pixel_values"] for p in parts]),
               "image_grid_thw": torch.cat([p.prompts["image_grid_thw"] for p in parts])}
    return Rollout(group_size=parts[0].group_size, prompts=prompts, response_ids=right("response_ids", pad_id),
                   response_mask=right("response_mask", 0), logp=right("logp", 0.0), loss_mask=right("loss_mask", 0.0),
                   texts=[t for p in parts for t in p.texts], truncated=torch.cat([p.truncated for p in parts]))


# ---------------------------------------------------------------------------------------------
# Rows: one response each, for Selective Sample Replay (ssr.py) and micro-batches
# ---------------------------------------------------------------------------------------------

@dataclass
class Row:
    """One response with its own prompt and images, without padding: what the replay buffer stores."""
    prompt_ids: torch.Tensor  # [L] the prompt's tokens
    mm_token_type_ids: torch.Tensor  # [L] 1 on image tokens
    pixel_values: torch.Tensor  # [patches, D] the prompt's images, one after another
    image_grid_thw: torch.Tensor  # [images, 3]
    response_ids: torch.Tensor  # [T]
    logp: torch.Tensor  # [T] log-probs when sampled: the old log-probs of Eq. 1
    loss_mask: torch.Tensor  # [T] the tokens trained on
    step: int = 0  # the step it was sampled at (a replayed row is from an earlier one)
    reflects: bool = False  # it reflects (a rethought or a native "wait"): the SFT term's rows


def split_rows(ro: Rollout, step: int = 0, reflects: list | None = None) -> list[Row]:
    """One Row per response, with its padding removed and its own image patches, so that rows of
    different steps can be mixed in one batch by `collate`. The tensors are copies, not views: a
    row kept in the replay buffer must not keep its whole step's rollout alive."""
    p = ro.prompts
    patches = torch.split(p["pixel_values"], p["image_grid_thw"].prod(-1).tolist())  # one block per image
    rows, first = [], 0
    for i, n in enumerate(data.images_per_prompt(p)):
        real, t = p["attention_mask"][i].bool(), int(ro.response_mask[i].sum())
        rows.append(Row(prompt_ids=p["input_ids"][i][real], mm_token_type_ids=p["mm_token_type_ids"][i][real],
                        pixel_values=torch.cat(patches[first:first + n]),
                        image_grid_thw=p["image_grid_thw"][first:first + n].clone(),
                        response_ids=ro.response_ids[i, :t].clone(), logp=ro.logp[i, :t].clone(),
                        loss_mask=ro.loss_mask[i, :t].clone(), step=step,
                        reflects=bool(reflects[i]) if reflects is not None else False))
        first += n
    return rows


def collate(rows: list[Row], pad_id: int) -> dict:
    """Rows back into one batch, laid out as `sample` lays out a Rollout: prompts left-padded,
    responses right-padded, images in row order."""
    prompt_ids = [r.prompt_ids for r in rows]
    resp = [r.response_ids for r in rows]
    prompts = {"input_ids": pad(prompt_ids, pad_id, "left"),
               "attention_mask": pad([torch.ones_like(x) for x in prompt_ids], 0, "left"),
               "mm_token_type_ids": pad([r.mm_token_type_ids for r in rows], 0, "left"),
               "pixel_values": torch.cat([r.pixel_values for r in rows]),
               "image_grid_thw": torch.cat([r.image_grid_thw for r in rows])}
    return {"prompts": prompts, "response_ids": pad(resp, pad_id),
            "response_mask": pad([torch.ones_like(x) for x in resp], 0),
            "logp": pad([r.logp for r in rows], 0.0), "loss_mask": pad([r.loss_mask for r in rows], 0.0)}
