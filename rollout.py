"""Rollouts: G sampled responses per prompt with a hand-written KV-cache loop, and Forced Rethinking.

Two things live here, and both must agree with the trainer to the last bit:
  * `sample` draws the group of responses (paper, Section 2: GRPO needs G responses per question)
    and records each token's log-probability, and applies Forced Rethinking (Section 3.2).
  * `logprobs` is the teacher-forced forward the trainer differentiates. Sampling and training use
    one definition of the distribution (`_log_softmax`), so `logprobs` reproduces the recorded ones.
`split_rows` and `collate` take a rollout apart into one row per response (what the replay buffer
stores) and put any rows back together into a batch for `logprobs`.

Qwen2.5-VL details that matter (transformers 5.x):
  * Positions are 3-D ("mrope": time, height, width). The prompt's come from
    `model.model.get_rope_index`, built from `mm_token_type_ids` (1 on image tokens); text after
    the prompt continues at max(prompt position) + 1. We always pass `position_ids` ourselves,
    so the model's hidden `rope_deltas` state is never used.
  * A sampled `<|image_pad|>` would make the next forward fail (image features and image tokens
    no longer match), so vision special tokens get probability 0, in sampling and in training.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")

# Forced Rethinking triggers (Section 3.2): self-verification, self-questioning, self-correction.
TRIGGERS = (
    "\n\nWait",
    "\n\nWait, does it seem right?",
    "\n\nWait, let's double check.",
    "\n\nWait, there might be a mistake.",
)


def special_ids(tokenizer, names) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(t) for t in names]


def _log_softmax(logits: torch.Tensor, temperature: float, banned: list[int]) -> torch.Tensor:
    """THE policy distribution, shared by sampling and training: log softmax(logits / T) with the
    vision special tokens removed. Temperature is part of it, so that the PPO ratio compares the
    distribution the tokens were actually drawn from, and the sampler's log-probs are the old
    log-probs of Eq. 1 with no second forward pass. (At temperature 1, the default, this is the
    plain softmax that the published code, which does not scale its training logits, uses too.)"""
    logits = logits.float() / temperature
    logits[..., banned] = float("-inf")
    return torch.log_softmax(logits, dim=-1)


# ---------------------------------------------------------------------------------------------
# Batches of prompts
# ---------------------------------------------------------------------------------------------

def images_per_prompt(batch: dict) -> list[int]:
    """Number of images in each prompt: the runs of image tokens in `mm_token_type_ids`."""
    img = batch["mm_token_type_ids"] == 1
    starts = img[:, 1:] & ~img[:, :-1]
    return (starts.sum(1) + img[:, 0].long()).tolist()


def repeat_prompts(batch: dict, g: int) -> dict:
    """Each prompt G times in a row (the group). `pixel_values` holds the patches of every image
    one after another and `image_grid_thw` one row per image; a prompt may have several images.
    So patches are repeated image-block by image-block, in the order of the grid rows: getting
    this wrong silently pairs responses with another prompt's image."""
    out = {k: batch[k].repeat_interleave(g, dim=0) for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    grids = batch["image_grid_thw"]
    per_image = torch.split(batch["pixel_values"], grids.prod(-1).tolist())
    blocks, grid_rows, first = [], [], 0
    for n in images_per_prompt(batch):
        for _ in range(g):
            blocks.extend(per_image[first:first + n])
            grid_rows.append(grids[first:first + n])
        first += n
    out["pixel_values"] = torch.cat(blocks)
    out["image_grid_thw"] = torch.cat(grid_rows)
    return out


def positions(model, input_ids, mm_token_type_ids, image_grid_thw, attention_mask) -> torch.Tensor:
    """3-D mrope positions (3, batch, length) of left- or right-padded sequences; padding gets 0."""
    inner = getattr(model, "module", model).model  # under DDP the trainer passes the wrapper
    pos, _ = inner.get_rope_index(input_ids, mm_token_type_ids=mm_token_type_ids,
                                  image_grid_thw=image_grid_thw, attention_mask=attention_mask)
    return pos


# ---------------------------------------------------------------------------------------------
# The teacher-forced forward (what the trainer differentiates)
# ---------------------------------------------------------------------------------------------

def logprobs(model, prompts: dict, response_ids, response_mask, temperature: float, banned: list[int],
             share_vision: bool = True):
    """Log-probability of each response token given prompt + earlier tokens, in one forward pass.

    The sequence is [left-padded prompt | right-padded response]; padding is masked out of
    attention and gets no position, so every real token sees exactly what it saw while sampled.
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
    lp = _log_softmax(out.logits[:, :-1], temperature, banned)  # [N, T, V]
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

@dataclass
class Sampling:
    """How the next token is drawn, and what the sampler needs to know about the vocabulary."""
    temperature: float  # 0: greedy
    top_p: float
    top_k: int  # 0: all tokens
    banned: list  # vision special tokens: never sampled (a sampled <|image_pad|> breaks the next forward)
    pad: int
    stop: torch.Tensor  # [S] token ids that end a response
    generator: torch.Generator | None

    @property
    def logp_temperature(self) -> float:
        """The temperature of the recorded log-probs: the training distribution's (1 when greedy)."""
        return self.temperature if self.temperature > 0 else 1.0


def _pick(logits, temperature: float, top_p: float, banned: list[int], generator, top_k: int = 0, rows=None,
          n: int = 0) -> torch.Tensor:
    """Next token per row: greedy at temperature 0, else sampling from the top_k most likely tokens
    (0: all) and of those the nucleus of mass top_p (the published rollouts: top-k 40, top-p 0.95).
    The recorded log-prob stays that of the full distribution, the one training differentiates.
    `rows`, `n`: these logits are those rows of a decode batch of n (see `_draw`)."""
    if temperature == 0:
        logits = logits.float().clone()
        logits[:, banned] = float("-inf")
        return logits.argmax(-1)
    probs = _log_softmax(logits, temperature, banned).exp()  # [B, V]
    if 0 < top_k < probs.shape[-1]:
        kth = probs.topk(top_k, dim=-1).values[:, -1:]  # [B, 1] the k-th largest probability
        probs = probs.masked_fill(probs < kth, 0.0)
    if top_p < 1.0:  # keep the smallest set of most likely tokens whose mass reaches top_p
        sorted_p, order = probs.sort(-1, descending=True)  # [B, V]
        outside = sorted_p.cumsum(-1) - sorted_p >= top_p  # [B, V] the tokens before already reach top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(outside, 0.0))
    return _draw(probs, generator, rows, n)  # [B]


def _draw(probs, generator, rows=None, n: int = 0) -> torch.Tensor:
    """One token per row of `probs` [B, V], drawn as torch.multinomial(probs, 1) draws it (the
    argmax of p / q with one q ~ Exp(1) per entry), but with the noise of all n rows of the decode
    batch drawn, of which these are `rows`. So the generator is used alike, and each row gets the
    same noise, whichever rows have already left the batch (`_decode`). On the CPU, exponential_
    is -log1p(-u) of float64 uniforms: the uniforms of all rows keep the generator's stream, and
    the log, most of the cost, is taken for the rows still in the batch only."""
    n, v = n or probs.shape[0], probs.shape[1]
    if probs.device.type == "cpu":
        u = torch.rand(n, v, dtype=torch.float64, generator=generator)  # [n, V]
        q = -torch.log1p(-(u if rows is None else u[rows])).float()  # [B, V]
    else:
        q = probs.new_empty(n, v).exponential_(generator=generator)  # [n, V]
        q = q if rows is None else q[rows]  # [B, V]
    return (probs / q).argmax(-1)  # [B]


LEAVE_AT = 0.25  # finished rows leave the decode batch once they are this share of it (inf: never)


def _decode(model, cache, logits, attn, start, max_new: int, s: Sampling, temperature: float, park: bool = False):
    """The KV-cache loop: one token per row per step until every row has stopped.

    `logits` are the next-token logits of each row, `attn` the attention mask of what is in the
    cache, `start` the position of each row's first new token. Tokens are drawn at `temperature`
    and recorded at s.logp_temperature. A row that stopped is fed padding, masked out of attention,
    until LEAVE_AT of the batch has stopped: then those rows leave the batch and the cache, and the
    rest decodes on a smaller batch. With long-tailed lengths most rows stop early and would be
    fed padding until the longest ends. The noise of every row is drawn at every step (`_draw`):
    no token depends on when other rows left. Returns tokens, recorded log-probs, the real-token
    mask, whether each row stopped, and with `park` the caches of all rows (`Parked`, for Forced
    Rethinking, which continues them), else None."""
    n, dev = logits.shape[0], logits.device  # logits [N, V], attn [N, L], start [N]
    rows = torch.arange(n, device=dev)  # [B] the row of each batch entry; B shrinks as rows leave
    done = torch.zeros(n, dtype=torch.bool, device=dev)  # [N]
    parked = Parked() if park else None
    toks, lps, real = [], [], []
    for t in range(max_new):
        tok = _pick(logits, temperature, s.top_p, s.banned, s.generator, s.top_k, rows, n)  # [B]
        lp = _log_softmax(logits, s.logp_temperature, s.banned).gather(1, tok[:, None]).squeeze(1)  # [B]
        live = ~done[rows]  # [B] not stopped before this token: the token is real
        tok = torch.where(live, tok, s.pad)
        toks.append(torch.full((n,), s.pad, device=dev).index_put((rows,), tok))  # [N]
        lps.append(torch.zeros(n, device=dev).index_put((rows,), torch.where(live, lp, 0.0)))  # [N]
        real.append(torch.zeros(n, dtype=torch.bool, device=dev).index_put((rows,), live))  # [N]
        done[rows] = done[rows] | torch.isin(tok, s.stop)
        if done.all() or t == max_new - 1:
            break
        stopped = done[rows]  # [B]
        if stopped.sum() >= LEAVE_AT * len(rows):  # they leave; their token is not fed, the cache ends before it
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
    return torch.stack(toks, 1), torch.stack(lps, 1), torch.stack(real, 1), done, parked  # [N, T] x 3, [N]


class Parked:
    """The KV caches of the rows that left the decode loop, and of those still in it at its end,
    kept for Forced Rethinking, which continues some of them. A part per leaving: its rows' cache
    stops where they left, so parts differ in length."""

    def __init__(self):
        self.parts = []  # (rows [k], attn [k, S], per layer (keys, values) [k, heads, S, dim])

    def add(self, cache, attn, rows, which=slice(None)):
        """Keep the rows `which` (a mask over the batch, default all) of the cache and attention mask."""
        kv = [(layer.keys[which], layer.values[which]) for layer in cache.layers]
        self.parts.append((rows[which], attn[which], kv))

    def select(self, rows: torch.Tensor, room: int = 0):
        """A cache and attention mask [M, S] of `rows`, in this order, as if they had never left: a
        shorter part is padded on the right to the longest, masked out (as the loop's finished rows
        were fed padding, masked out), so attention reads exactly the same keys and values. The
        cache has room for `room` more tokens."""
        width = max(attn.shape[1] for _, attn, _ in self.parts)
        got, attns, kvs = [], [], []
        for part_rows, attn, kv in self.parts:
            pick = torch.isin(part_rows, rows).nonzero().squeeze(1)  # [k'] positions in the part
            got.append(part_rows[pick])
            attns.append(F.pad(attn[pick], (0, width - attn.shape[1])))
            kvs.append([tuple(F.pad(x[pick], (0, 0, 0, width - x.shape[2])) for x in layer) for layer in kv])
        where = {r: i for i, r in enumerate(torch.cat(got).tolist())}
        order = torch.tensor([where[r] for r in rows.tolist()], device=rows.device)  # [M]
        cache = new_cache(rows.device, width + room)
        for layer, per_part in enumerate(zip(*kvs)):
            cache.update(torch.cat([k for k, _ in per_part])[order], torch.cat([v for _, v in per_part])[order], layer)
        return cache, torch.cat(attns)[order]  # [M, width]


@dataclass
class RethinkConfig:
    """Forced Rethinking (Section 3.2). The defaults are the published `append_wait` mode's
    rules where we follow them (README, "Differences from the published implementation")."""
    max_group_acc: float = 0.6  # only prompts whose group accuracy is at most this
    only_wrong: bool = True  # only responses whose first answer is wrong (the published "append_wait" mode)
    frac: float = 1.0  # share of the eligible responses that get a trigger
    cut_prob: float = 0.5  # chance to cut the first response just before its final answer
    temperature: float = 0.9  # sampling temperature of the continuation
    max_new_tokens: int = 64  # length budget of the continuation (the whole response must fit the rollout's cap)
    max_waits: int = 3  # more "wait"s than this is degenerate: not kept
    max_replace: int = 2  # at most this many rethought responses replace originals per prompt (-1: no cap)
    train_trigger: bool = True  # the trigger tokens are trained on: the policy learns to say them
    cut: str = "answer"  # where cut_point cuts: "answer" (ours) or "published"
    min_new_tokens: int = 0  # a continuation must be longer than this to be kept (published: 30)
    count_markers: bool = False  # count waits as the published code: the continuation's reward.reflections


@dataclass
class Rollout:
    """One step's responses: N = prompts x G rows, row i answers prompt i // G."""
    prompts: dict  # the prompt batch, one row per response (pixel values repeated per image)
    response_ids: torch.Tensor  # [N, T] right-padded
    response_mask: torch.Tensor  # [N, T] 1 on real tokens, up to and including the stop token
    logp: torch.Tensor  # [N, T] log-prob of each token when sampled (training temperature)
    loss_mask: torch.Tensor  # [N, T] the tokens trained on
    texts: list  # decoded responses
    truncated: torch.Tensor  # [N] hit max_new_tokens without a stop token
    triggered: torch.Tensor  # [N] a rethinking trigger was tried on this response
    rethought: torch.Tensor  # [N] the rethought response replaced the first one
    first_texts: list  # the replaced first response of rethought rows, else None
    grades: list | None = None  # [N] each final response's grade (the `grade` callback's result)
    rethink_fixed: int = 0  # triggered rows whose first answer was wrong and rethought answer right


class _BufferedLayer(DynamicLayer):
    """A KV-cache layer that writes each step's keys and values into buffers with room to spare
    along the sequence axis, where DynamicLayer grows by torch.cat and so copies the whole cache at
    every decode step. The buffers start with room for `length` tokens (the caller's prompt and
    response cap: then they never grow, and hold what the concatenated cache holds at the cap) and
    double when full (without a hint, or past it), so a token is copied O(1) times on average.

    `keys` and `values` are always the filled part: views of the buffers after `update`, and what
    every inherited method reads. The methods that replace them by new tensors
    (batch_select_indices, batch_repeat_interleave, reorder_cache) are not overridden: `update`
    sees that they are no longer views of the buffers and moves them into new ones. A view taken
    by someone else (Parked.add) keeps its values: updates write only past the filled part.

    Keys and values are stored in `dtype` (None: as they come). Under --bf16 (autocast) the
    residual stream stays fp32 and the rotary embedding returns fp32 keys: stored as they come,
    the cache takes twice the memory. Attention under autocast casts them to bf16 anyway, so
    storing them in bf16 changes no result."""

    def __init__(self, dtype=None, length: int = 0):
        super().__init__()
        self.store_dtype, self.length = dtype, length
        self.key_buf = self.value_buf = None  # [B, heads, capacity, dim]

    def update(self, key_states, value_states, *args, **kwargs):
        if self.store_dtype is not None:
            key_states, value_states = key_states.to(self.store_dtype), value_states.to(self.store_dtype)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = self.get_seq_length()
        end = n + key_states.shape[-2]
        if not (_fills(self.keys, self.key_buf) and _fills(self.values, self.value_buf)) \
                or end > self.key_buf.shape[-2]:
            self._move(key_states, value_states, self.length if end <= self.length else 2 * end)
        self.key_buf[:, :, n:end] = key_states
        self.value_buf[:, :, n:end] = value_states
        self.keys, self.values = self.key_buf[:, :, :end], self.value_buf[:, :, :end]
        return self.keys, self.values

    def _move(self, key_states, value_states, capacity: int):
        """New buffers of `capacity` tokens, holding what is cached so far."""
        n = self.get_seq_length()
        b, heads = key_states.shape[:2]
        self.key_buf = key_states.new_empty(b, heads, capacity, key_states.shape[-1])
        self.value_buf = value_states.new_empty(b, heads, capacity, value_states.shape[-1])
        if n:
            self.key_buf[:, :, :n] = self.keys
            self.value_buf[:, :, :n] = self.values


def _fills(view, buf) -> bool:
    """Whether `view` is the front of `buf` along the sequence axis (buf[:, :, :n] for some n)."""
    return (buf is not None and view.dim() == 4 and view.data_ptr() == buf.data_ptr()
            and view.shape[:2] == buf.shape[:2] and view.stride() == buf.stride())


def new_cache(device, length: int = 0) -> DynamicCache:
    """An empty KV cache (`_BufferedLayer`s) with room for `length` tokens, that stores keys and
    values in the autocast dtype when autocast is on."""
    dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    cache = DynamicCache()
    cache.layer_class_to_replicate = lambda: _BufferedLayer(dtype, length)
    return cache


@torch.no_grad()
def sample(model, processor, records, g: int, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
           generator=None, grade=None, rethink: RethinkConfig | None = None, stop_tokens=STOP_TOKENS,
           top_k: int = 0, chunk: int = 0) -> Rollout:
    """G responses for each record. temperature 0 is greedy decoding.

    With `grade(text, record, finished, forced) -> an object with .correct` every final response
    is graded once (Rollout.grades), and with `rethink` too, Forced Rethinking is applied to the
    low-accuracy groups. `stop_tokens=()` decodes exactly max_new_tokens per response (bench.py
    times it so). `chunk` > 0 samples that many prompts (chunk x G rows) at a time: the KV cache
    of one chunk is what sampling holds in memory. The result is on the CPU."""
    tok = processor.tokenizer
    dev = next(model.parameters()).device
    s = Sampling(temperature, top_p, top_k, special_ids(tok, VISION_TOKENS), tok.pad_token_id,
                 torch.tensor(special_ids(tok, stop_tokens), dtype=torch.long, device=dev), generator)
    step = chunk if chunk > 0 else len(records)
    parts = [_sample_chunk(model, processor, records[c:c + step], g, max_new_tokens, s, grade, rethink)
             for c in range(0, len(records), step)]
    return parts[0] if len(parts) == 1 else _concat(parts, s.pad)


def _sample_chunk(model, processor, records, g, max_new_tokens, s: Sampling, grade, rethink) -> Rollout:
    from data import encode_prompts

    tok = processor.tokenizer
    dev = s.stop.device
    batch = {k: v.to(dev) for k, v in encode_prompts(processor, records).items()}  # P prompts, left-padded
    pos = positions(model, batch["input_ids"], batch["mm_token_type_ids"], batch["image_grid_thw"],
                    batch["attention_mask"])  # [3, P, L]
    # Prefill each prompt once (images encoded once), then copy its cache G times: the group.
    cache = new_cache(dev, batch["input_ids"].shape[1] + max_new_tokens)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=pos,
                pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                past_key_values=cache, use_cache=True, logits_to_keep=1)
    cache.batch_repeat_interleave(g)
    logits = out.logits[:, -1].repeat_interleave(g, 0)  # [N, V], N = P * G
    attn = batch["attention_mask"].repeat_interleave(g, 0)  # [N, L]
    start = (pos.amax(dim=(0, 2)) + 1).repeat_interleave(g)  # [N] text after the prompt: max position + 1
    rethinking = rethink is not None and grade is not None
    resp, lp, real, stopped, parked = _decode(model, cache, logits, attn, start, max_new_tokens, s, s.temperature,
                                              park=rethinking)
    n = resp.shape[0]
    rows = [(resp[i][real[i]], lp[i][real[i]], torch.ones(int(real[i].sum()), device=dev)) for i in range(n)]
    texts = tok.batch_decode([r[0] for r in rows], skip_special_tokens=True)
    grades = [grade(texts[i], records[i // g], bool(stopped[i]), False) for i in range(n)] if grade else None
    ro = Rollout(prompts=repeat_prompts(batch, g), response_ids=None, response_mask=None, logp=None, loss_mask=None,
                 texts=texts, truncated=(~stopped).cpu(), triggered=torch.zeros(n, dtype=torch.bool),
                 rethought=torch.zeros(n, dtype=torch.bool), first_texts=[None] * n, grades=grades)
    if rethinking:
        rows = _rethink(model, tok, parked, batch, start, rows, ro, stopped, records, g, grade, rethink,
                        max_new_tokens, s)
    del cache, parked  # the chunk's KV cache is freed before the next chunk is sampled
    ro.prompts = {k: v.cpu() for k, v in ro.prompts.items()}
    ro.response_ids = pad([r[0] for r in rows], s.pad).cpu()
    ro.response_mask = pad([torch.ones_like(r[0]) for r in rows], 0).cpu()
    ro.logp, ro.loss_mask = pad([r[1] for r in rows], 0.0).cpu(), pad([r[2] for r in rows], 0.0).cpu()
    return ro


def _concat(parts: list[Rollout], pad_id: int) -> Rollout:
    """One Rollout from the chunks' rollouts, laid out as if sampled at once: prompts re-padded on
    the left to the longest, responses on the right, images in row order."""
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
    return Rollout(prompts=prompts, response_ids=right("response_ids", pad_id), response_mask=right("response_mask", 0),
                   logp=right("logp", 0.0), loss_mask=right("loss_mask", 0.0),
                   texts=[t for p in parts for t in p.texts], truncated=torch.cat([p.truncated for p in parts]),
                   triggered=torch.cat([p.triggered for p in parts]), rethought=torch.cat([p.rethought for p in parts]),
                   first_texts=[t for p in parts for t in p.first_texts],
                   grades=None if parts[0].grades is None else [x for p in parts for x in p.grades],
                   rethink_fixed=sum(p.rethink_fixed for p in parts))


def pad(seqs, value, side: str = "right") -> torch.Tensor:
    """Sequences of different lengths as one [N, max length] tensor."""
    return torch.nn.utils.rnn.pad_sequence(list(seqs), batch_first=True, padding_value=value, padding_side=side)


# ---------------------------------------------------------------------------------------------
# Forced Rethinking (Section 3.2): the rules, then the KV-cache mechanism
# ---------------------------------------------------------------------------------------------

def who_rethinks(correct: list, stopped: list, g: int, cfg: RethinkConfig, coins: list) -> list[int]:
    """The responses that get a trigger: each that stopped by itself (a truncated one has no answer
    to check), of a prompt whose group accuracy is at most cfg.max_group_acc (there the model is
    unsure), a wrong one only when cfg.only_wrong, each with probability cfg.frac (`coins`: one
    uniform draw per response). Returns their row indices, in order."""
    acc = [sum(correct[p * g:(p + 1) * g]) / g for p in range(len(correct) // g)]
    return [i for i in range(len(correct)) if acc[i // g] <= cfg.max_group_acc and stopped[i]
            and not (cfg.only_wrong and correct[i]) and coins[i] < cfg.frac]


def cut_at(text: str, rule: str = "answer") -> int:
    """Where (a character index) a first response is cut before the trigger. "answer": just before
    its final answer, the last "\\boxed", else the last "answer"; the whole text if it has neither.
    "published" (experience_maker.py, RemoteExperienceMaker._generate_vllm): four cuts, each made
    when its pattern is found in what the one before kept: at the last "Wait", the last "\\boxed",
    the *first* "answer" (any case), the last blank line; then trailing space goes (the published
    code strips both ends; a token prefix can only lose its end)."""
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


def keep_rethought(cands: list[Rethought], g: int, cfg: RethinkConfig, max_len: int) -> list[bool]:
    """Which rethought responses replace their first response: right ones that stopped by
    themselves, say "wait" at most cfg.max_waits times (more is a loop; with cfg.count_markers the
    continuation's reflections, as published), have a continuation longer than cfg.min_new_tokens,
    and fit the response cap `max_len` (so the policy trains only on responses it could have
    produced itself), at most cfg.max_replace per prompt (-1: any number), first come first kept."""
    import reward

    replaced, keep = {}, []
    for c in cands:
        waits = reward.reflections(c.continuation) if cfg.count_markers else c.text.lower().count("wait")
        room = cfg.max_replace < 0 or replaced.get(c.row // g, 0) < cfg.max_replace
        ok = (c.grade.correct and c.stopped and waits <= cfg.max_waits and c.new_tokens > cfg.min_new_tokens
              and len(c.ids) <= max_len and room)
        replaced[c.row // g] = replaced.get(c.row // g, 0) + ok
        keep.append(ok)
    return keep


def _continue(model, cache, attn, start, plen: int, keep, chunks: list, s: Sampling, cfg: RethinkConfig):
    """The mechanism: continue the first pass's KV cache of the triggered rows (`Parked.select`)
    after the kept part of each response, with `chunks` = [last kept token, trigger...] per row.

    The cut-off tail is masked out of attention, and the last kept token is fed again with the
    trigger, so that its logits (which predict the trigger's first token) are computed afresh.
    Positions continue from the last kept token: the final sequence has the positions of a
    contiguous one. Returns the trigger's log-probs and the tokens, log-probs, real-token mask
    and stopped flags of `_decode`."""
    dev = start.device
    slot = torch.arange(attn.shape[1], device=dev)  # [L]
    attn = attn.masked_fill(slot[None] >= plen + keep[:, None] - 1, 0)  # [M, L] the refed token's old slot and after
    width = max(len(c) for c in chunks)
    chunk = torch.stack([F.pad(c, (width - len(c), 0), value=s.pad) for c in chunks])  # [M, W] left-padded
    chunk_mask = torch.stack([F.pad(torch.ones_like(c), (width - len(c), 0)) for c in chunks])  # [M, W]
    first_pos = start + keep - 1  # [M] the refed token's position
    lens = torch.tensor([len(c) for c in chunks], device=dev)  # [M]
    chunk_pos = (first_pos[:, None] + torch.arange(width, device=dev)[None] - (width - lens)[:, None]) * chunk_mask
    attn = torch.cat([attn, chunk_mask], 1)  # [M, L + W]
    out = model(input_ids=chunk, attention_mask=attn, position_ids=chunk_pos[None].expand(3, -1, -1),
                past_key_values=cache, use_cache=True)  # logits [M, W, V]
    trig_lp = _log_softmax(out.logits[:, :-1], s.logp_temperature, s.banned).gather(-1, chunk[:, 1:, None]).squeeze(-1)
    return (trig_lp,) + _decode(model, cache, out.logits[:, -1], attn, first_pos + lens, cfg.max_new_tokens, s,
                                cfg.temperature)[:4]  # [M, W - 1], then [M, T] x 3, [M]


def _rethink(model, tok, parked, batch, start, rows, ro: Rollout, stopped, records, g, grade, cfg, max_len, s):
    """Forced Rethinking (Section 3.2): first response (maybe cut before its answer) + trigger +
    a sampled continuation, kept in place of the first response by `keep_rethought`; `parked`
    holds the first pass's KV caches. Returns the rows (ids, logp, loss mask) with the kept ones
    replaced; marks `ro`'s rethinking fields."""
    dev = start.device
    coins = torch.rand(len(rows), 3, generator=s.generator, device=dev).cpu()  # trigger?, cut?, which trigger
    sel = who_rethinks([x.correct for x in ro.grades], stopped.tolist(), g, cfg, coins[:, 0].tolist())
    if not sel:
        return rows
    plen, keep, triggers, chunks = batch["input_ids"].shape[1], [], [], []
    for i in sel:
        body = rows[i][0][:-1].tolist()  # without the stop token
        k = cut_point(tok, body, cfg.cut) if coins[i, 1] < cfg.cut_prob else len(body)
        trigger = tok.encode(TRIGGERS[int(coins[i, 2] * len(TRIGGERS))], add_special_tokens=False)
        refeed = body[k - 1] if k > 0 else int(batch["input_ids"][i // g, -1])
        chunks.append(torch.tensor([refeed] + trigger, device=dev))
        keep.append(k), triggers.append(trigger)
    sel_t, keep_t = torch.tensor(sel, device=dev), torch.tensor(keep, device=dev)
    cache, attn = parked.select(sel_t, max(len(c) for c in chunks) + cfg.max_new_tokens)  # room: the continuation
    trig_lp, cont, cont_lp, cont_real, cont_stopped = _continue(model, cache, attn, start[sel_t], plen, keep_t,
                                                                chunks, s, cfg)
    cands = []
    for j, (i, k, m) in enumerate(zip(sel, keep, (len(t) for t in triggers))):
        c = cont_real[j]
        ids = torch.cat([rows[i][0][:k], chunks[j][1:], cont[j][c]])
        text = tok.decode(ids, skip_special_tokens=True)
        cands.append(Rethought(
            row=i, ids=ids, logp=torch.cat([rows[i][1][:k], trig_lp[j, -m:], cont_lp[j][c]]),
            loss_mask=torch.cat([torch.ones(k, device=dev), torch.full((m,), float(cfg.train_trigger), device=dev),
                                 torch.ones(int(c.sum()), device=dev)]),
            text=text, stopped=bool(cont_stopped[j]), grade=grade(text, records[i // g], bool(cont_stopped[j]), True),
            continuation=tok.decode(cont[j][c], skip_special_tokens=True), new_tokens=int(c.sum())))
    rows = list(rows)
    for c, kept in zip(cands, keep_rethought(cands, g, cfg, max_len)):
        ro.triggered[c.row] = True
        ro.rethink_fixed += int(c.grade.correct and not ro.grades[c.row].correct)
        if kept:
            ro.rethought[c.row], ro.first_texts[c.row] = True, ro.texts[c.row]
            ro.texts[c.row], ro.grades[c.row] = c.text, c.grade
            rows[c.row] = (c.ids, c.logp, c.loss_mask)
    return rows


# ---------------------------------------------------------------------------------------------
# Rows: one response each, for Selective Sample Replay (ssr.py) and micro-batches
# ---------------------------------------------------------------------------------------------

def split_rows(ro: Rollout) -> list[dict]:
    """One dict per response, with its padding removed and its own image patches, so that rows of
    different steps can be mixed in one batch by `collate`. The tensors are copies, not views: a
    row kept in the replay buffer must not keep its whole step's rollout alive."""
    p = ro.prompts
    patches = torch.split(p["pixel_values"], p["image_grid_thw"].prod(-1).tolist())  # one block per image
    rows, first = [], 0
    for i, n in enumerate(images_per_prompt(p)):
        real, t = p["attention_mask"][i].bool(), int(ro.response_mask[i].sum())
        rows.append({"prompt_ids": p["input_ids"][i][real], "mm_token_type_ids": p["mm_token_type_ids"][i][real],
                     "pixel_values": torch.cat(patches[first:first + n]),
                     "image_grid_thw": p["image_grid_thw"][first:first + n].clone(),
                     "response_ids": ro.response_ids[i, :t].clone(), "logp": ro.logp[i, :t].clone(),
                     "loss_mask": ro.loss_mask[i, :t].clone()})
        first += n
    return rows


def collate(rows: list[dict], pad_id: int) -> dict:
    """Rows back into one batch, laid out as `sample` lays out a Rollout: prompts left-padded,
    responses right-padded, images in row order."""
    prompt_ids = [r["prompt_ids"] for r in rows]
    resp = [r["response_ids"] for r in rows]
    prompts = {"input_ids": pad(prompt_ids, pad_id, "left"),
               "attention_mask": pad([torch.ones_like(x) for x in prompt_ids], 0, "left"),
               "mm_token_type_ids": pad([r["mm_token_type_ids"] for r in rows], 0, "left"),
               "pixel_values": torch.cat([r["pixel_values"] for r in rows]),
               "image_grid_thw": torch.cat([r["image_grid_thw"] for r in rows])}
    return {"prompts": prompts, "response_ids": pad(resp, pad_id),
            "response_mask": pad([torch.ones_like(x) for x in resp], 0),
            "logp": pad([r["logp"] for r in rows], 0.0), "loss_mask": pad([r["loss_mask"] for r in rows], 0.0)}

