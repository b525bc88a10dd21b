"""rollout.py: the sampler's recorded log-probs, Forced Rethinking, masks, and rows for replay.

Every recorded log-prob is checked against two computations: the trainer's `logprobs` on the
padded batch, and a plain reference that encodes each prompt alone (no padding, no repeated
images) and runs one full forward without a cache, the model computing its own positions."""
import itertools

import pytest
import torch
from PIL import Image, ImageDraw

import data
import reward
import rollout

TOL = 1e-5  # fp32


def picture(size, colour):
    img = Image.new("RGB", size, (255, 255, 255))
    ImageDraw.Draw(img).ellipse((8, 8, size[0] - 8, size[1] - 8), fill=colour)
    return img


# Different image sizes (16 and 6 image tokens), one or two images, plain and multiple-choice
# questions: prompts of different lengths, so the batch is left-padded by different amounts.
RECORDS = [
    data.Record("plain-112", [picture((112, 112), (220, 40, 40))], "What colour is the shape?", "red"),
    data.Record("mc-56x84", [picture((56, 84), (40, 80, 220))], "Which shape is in the image?", "A",
                choices=["circle", "square", "triangle"]),
    data.Record("two-images", [picture((112, 112), (40, 170, 60)), picture((56, 84), (235, 210, 40))],
                "How many shapes are in the images?", "2"),
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One CPU thread while this module runs: as fast on the tiny model, and a shared 2-core
    machine cannot stall it 10x the way it stalls two threads that wait on each other at every op."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def always_right(text, record, finished, forced):
    """A grader that calls every response right."""
    return reward.Grade(correct=True, reward=1.0, boxed=True, valid=True)


@pytest.fixture(scope="module")
def tok(tiny_model):
    return tiny_model[1].tokenizer


@pytest.fixture(scope="module")
def banned(tok):
    return rollout.special_ids(tok, rollout.VISION_TOKENS)


def reference_logprobs(model, processor, rec, response_ids, temperature):
    """Log-probs of one response the plain way (see the module docstring)."""
    enc = data.encode_prompts(processor, [rec])
    n = enc["input_ids"].shape[1]
    ids = torch.cat([enc["input_ids"][0], response_ids])[None]
    mm = torch.cat([enc["mm_token_type_ids"][0], torch.zeros_like(response_ids)])[None]
    with torch.no_grad():
        logits = model(input_ids=ids, mm_token_type_ids=mm, pixel_values=enc["pixel_values"],
                       image_grid_thw=enc["image_grid_thw"], use_cache=False).logits[0, n - 1:-1] / temperature
    logits[:, rollout.special_ids(processor.tokenizer, rollout.VISION_TOKENS)] = float("-inf")
    return logits.log_softmax(-1).gather(1, response_ids[:, None])[:, 0]


def check_logprobs(model, processor, ro, records, g, temperature, banned):
    """Recorded log-probs == trainer's forward == reference, on every real token of every row."""
    with torch.no_grad():
        trained = rollout.logprobs(model, ro.prompts, ro.response_ids, ro.response_mask, temperature, banned)
    assert (trained - ro.logp).abs().max() <= TOL
    for i in range(len(ro.texts)):
        n = int(ro.response_mask[i].sum())
        ref = reference_logprobs(model, processor, records[i // g], ro.response_ids[i, :n], temperature)
        assert (ref - ro.logp[i, :n]).abs().max() <= TOL, i


def is_stop(tok, t):
    return int(t) in rollout.special_ids(tok, rollout.STOP_TOKENS)


# ---------------------------------------------------------------------------------------------
# Prompt batches
# ---------------------------------------------------------------------------------------------

def test_repeat_prompts_pairs_every_copy_with_its_own_images(tiny_model):
    processor, g = tiny_model[1], 3
    recs = [RECORDS[2], RECORDS[1], RECORDS[0]]  # two images first: a wrong stride would shift the rest
    rep = rollout.repeat_prompts(data.encode_prompts(processor, recs), g)
    assert rep["input_ids"].shape[0] == len(recs) * g
    patches = torch.split(rep["pixel_values"], rep["image_grid_thw"].prod(-1).tolist())
    assert len(patches) == g * sum(len(r.images) for r in recs)
    image = 0
    for row in range(len(recs) * g):
        alone = data.encode_prompts(processor, [recs[row // g]])
        real = rep["attention_mask"][row].bool()
        assert torch.equal(rep["input_ids"][row][real], alone["input_ids"][0])
        assert torch.equal(rep["mm_token_type_ids"][row][real], alone["mm_token_type_ids"][0])
        n = len(recs[row // g].images)
        assert torch.equal(rep["image_grid_thw"][image:image + n], alone["image_grid_thw"])
        assert torch.equal(torch.cat(patches[image:image + n]), alone["pixel_values"])
        image += n


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sampled(tiny_model):
    """Two responses per record at temperature 1.3, top-p 0.95; 16 tokens stops some, truncates others."""
    model, processor = tiny_model
    ro = rollout.sample(model, processor, RECORDS, g=2, max_new_tokens=16, temperature=1.3, top_p=0.95,
                        generator=torch.Generator().manual_seed(0))
    return ro


def test_sampled_logprobs_match_training_forward(tiny_model, sampled, banned):
    model, processor = tiny_model
    check_logprobs(model, processor, sampled, RECORDS, 2, 1.3, banned)
    # the temperature is part of the distribution: at T = 1 the same tokens score differently
    with torch.no_grad():
        at_one = rollout.logprobs(model, sampled.prompts, sampled.response_ids, sampled.response_mask, 1.0, banned)
    assert (at_one - sampled.logp).abs().max() > 1e-2


def test_masks_cover_exactly_the_tokens_up_to_the_stop(tok, sampled):
    ro = sampled
    assert ro.truncated.any() and not ro.truncated.all(), "want both kinds of row"
    width = ro.response_ids.shape[1]
    for i in range(len(ro.texts)):
        n = int(ro.response_mask[i].sum())
        assert ro.response_mask[i].tolist() == [1] * n + [0] * (width - n)
        assert ro.loss_mask[i].tolist() == [1.0] * n + [0.0] * (width - n)
        assert not any(is_stop(tok, t) for t in ro.response_ids[i, :n - 1])
        assert is_stop(tok, ro.response_ids[i, n - 1]) != bool(ro.truncated[i])
        assert n == 16 or not ro.truncated[i]
        assert (ro.response_ids[i, n:] == tok.pad_token_id).all() and (ro.logp[i, n:] == 0).all()
        assert ro.texts[i] == tok.decode(ro.response_ids[i, :n], skip_special_tokens=True)


@pytest.fixture(scope="module")
def greedy(tiny_model):
    model, processor = tiny_model
    return rollout.sample(model, processor, RECORDS, g=2, max_new_tokens=20, temperature=0)


def test_greedy_equals_generate(tiny_model, greedy, tok, banned):
    model, processor = tiny_model
    batch = data.encode_prompts(processor, RECORDS)
    with torch.no_grad():
        out = model.generate(**batch, do_sample=False, max_new_tokens=20, suppress_tokens=banned,
                             eos_token_id=rollout.special_ids(tok, rollout.STOP_TOKENS), pad_token_id=tok.pad_token_id)
    gen = out[:, batch["input_ids"].shape[1]:]
    ours = greedy.response_ids
    width = max(gen.shape[1], ours.shape[1])
    gen = torch.nn.functional.pad(gen, (0, width - gen.shape[1]), value=tok.pad_token_id)
    ours = torch.nn.functional.pad(ours, (0, width - ours.shape[1]), value=tok.pad_token_id)
    assert torch.equal(ours[0::2], gen) and torch.equal(ours[1::2], gen)


def test_a_row_decoded_alone_equals_the_row_in_a_batch(tiny_model, greedy, banned):
    model, processor = tiny_model
    check_logprobs(model, processor, greedy, RECORDS, 2, 1.0, banned)
    for p, rec in enumerate(RECORDS):
        alone = rollout.sample(model, processor, [rec], g=1, max_new_tokens=20, temperature=0)
        n = alone.response_ids.shape[1]
        assert int(greedy.response_mask[2 * p].sum()) == n
        assert torch.equal(alone.response_ids[0], greedy.response_ids[2 * p, :n])
        assert (alone.logp[0] - greedy.logp[2 * p, :n]).abs().max() <= TOL


def test_vision_tokens_are_never_sampled(tiny_model, banned):
    import tiny

    processor = tiny_model[1]
    model = tiny.build_model(processor.tokenizer).eval()  # untrained, and pushed towards vision tokens:
    boost = lambda module, args, out: out.index_add(-1, torch.tensor(banned), torch.full_like(out[..., :len(banned)], 5.0))
    model.lm_head.register_forward_hook(boost)
    batch = data.encode_prompts(processor, RECORDS[:1])
    with torch.no_grad():
        first = model(**batch).logits[0, -1]
    assert first.softmax(-1)[banned].sum() > 0.3  # without the ban, a third of all draws or more
    assert int(first.argmax()) in banned  # and greedy would pick one
    for temperature, top_p, n in ((2.0, 1.0, 48), (1.0, 0.9, 16), (0, 1.0, 8)):
        ro = rollout.sample(model, processor, RECORDS[:2], g=2, max_new_tokens=n, temperature=temperature,
                            top_p=top_p, generator=torch.Generator().manual_seed(1))
        real = ro.response_ids[ro.response_mask.bool()]
        assert real.numel() >= 2 * n and not torch.isin(real, torch.tensor(banned)).any()
        assert torch.isfinite(ro.logp).all()


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.5, 0.25, 0.125, 0.125])
    logits = probs.log().expand(20_000, 4)
    gen = torch.Generator().manual_seed(0)
    draws = rollout._pick(logits, 1.0, 0.75, [], gen)  # {0, 1} reaches 0.75 exactly: token 2 is out
    assert set(draws.tolist()) == {0, 1} and abs((draws == 0).float().mean() - 2 / 3) < 0.02
    draws = rollout._pick(logits, 1.0, 0.8, [], gen)
    assert set(draws.tolist()) == {0, 1, 2} and abs((draws == 2).float().mean() - 0.125 / 0.875) < 0.02
    draws = rollout._pick(logits, 0.5, 1.0, [3], gen)  # T = 0.5 squares the probabilities; 3 banned
    expect = torch.tensor([0.25, 0.0625, 0.015625]) / 0.328125
    assert set(draws.tolist()) <= {0, 1, 2} and abs((draws == 1).float().mean() - expect[1]) < 0.02


def test_top_k_keeps_the_k_most_likely_then_top_p_within_them():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    logits = probs.log().expand(20_000, 4)
    gen = torch.Generator().manual_seed(0)
    draws = rollout._pick(logits, 1.0, 1.0, [], gen, top_k=2)  # {0, 1} renormalised: 4/7 and 3/7
    assert set(draws.tolist()) == {0, 1} and abs((draws == 0).float().mean() - 4 / 7) < 0.02
    draws = rollout._pick(logits, 1.0, 0.5, [], gen, top_k=3)  # of {0, 1, 2}, 0 alone has 4/9 < 0.5: {0, 1}
    assert set(draws.tolist()) == {0, 1}
    draws = rollout._pick(logits, 1.0, 1.0, [0], gen, top_k=2)  # banned first: the top 2 of {1, 2, 3}
    assert set(draws.tolist()) == {1, 2} and abs((draws == 1).float().mean() - 0.6) < 0.02


def test_draw_is_torch_multinomial_and_a_row_keeps_its_noise_in_a_smaller_batch():
    probs = torch.rand(6, 50, generator=torch.Generator().manual_seed(0))
    probs[:, :20] = 0.0  # cut by top-k / top-p: never drawn
    gens = [torch.Generator().manual_seed(7) for _ in range(3)]
    expect = torch.multinomial(probs, 1, generator=gens[0]).squeeze(1)
    assert torch.equal(rollout._draw(probs, gens[1]), expect)
    rows = torch.tensor([1, 4, 5])  # rows 0, 2 and 3 have left the batch: the others draw what they drew
    assert torch.equal(rollout._draw(probs[rows], gens[2], rows, 6), expect[rows])
    assert all(torch.equal(gens[0].get_state(), g.get_state()) for g in gens[1:])  # the generator used alike
    assert (expect >= 20).all()


def test_finished_rows_leave_the_batch_and_change_no_token(tiny_model, tok):
    """The same rollouts with rows leaving the decode batch (LEAVE_AT) and without: the same tokens,
    texts, masks and generator state after; log-probs equal up to the last bits of a matmul over
    fewer rows. Forced Rethinking continues caches of rows that left at different steps."""
    model, processor = tiny_model
    rethink = rollout.RethinkConfig(max_group_acc=1.0, only_wrong=False, frac=1.0, cut_prob=0.5, max_waits=100)
    batch_sizes = []
    hook = model.register_forward_pre_hook(lambda m, args, kw: batch_sizes.append(kw["input_ids"].shape[0]),
                                           with_kwargs=True)
    try:
        for seed, kw in ((0, dict(g=3, max_new_tokens=32, temperature=2.0, top_p=0.9)),  # lengths 3 to 28
                         (3, dict(g=4, max_new_tokens=64, temperature=1.0, grade=always_right, rethink=rethink))):
            out, rows_fed = {}, {}
            for leave in (float("inf"), rollout.LEAVE_AT):
                batch_sizes.clear()
                gen = torch.Generator().manual_seed(seed)
                with pytest.MonkeyPatch.context() as mp:
                    mp.setattr(rollout, "LEAVE_AT", leave)
                    out[leave] = rollout.sample(model, processor, RECORDS, generator=gen, **kw), gen.get_state()
                rows_fed[leave] = sum(batch_sizes)
            assert rows_fed[rollout.LEAVE_AT] < rows_fed[float("inf")]  # rows did leave
            (a, state_a), (b, state_b) = out.values()
            for key in ("response_ids", "response_mask", "loss_mask", "truncated", "triggered", "rethought"):
                assert torch.equal(getattr(a, key), getattr(b, key)), key
            assert a.texts == b.texts and a.first_texts == b.first_texts and torch.equal(state_a, state_b)
            assert (a.logp - b.logp).abs().max() <= TOL
        assert int(b.rethought.sum()) >= 4
    finally:
        hook.remove()


def test_each_distinct_picture_is_encoded_once_with_replayed_rows_and_logprobs_unchanged(tiny_model, tok, banned):
    """A micro-batch of this step's rows and rows replayed from an earlier step, one of which shows
    the same picture as a current prompt: the vision tower sees each picture once, and every row's
    log-probs are those of the model's own forward, which encodes every row's copy."""
    model, processor = tiny_model
    earlier = rollout.sample(model, processor, RECORDS, g=2, max_new_tokens=12, generator=torch.Generator().manual_seed(0))
    new = data.Record("new", [picture((84, 112), (120, 40, 160))], "What colour is the shape?", "purple")
    now = rollout.sample(model, processor, [RECORDS[1], new], g=2, max_new_tokens=12,
                         generator=torch.Generator().manual_seed(1))
    rows = rollout.split_rows(now)
    replayed = rollout.split_rows(earlier)
    mb = rollout.collate([rows[0], replayed[3], rows[2], replayed[0], replayed[5], rows[1], rows[3]], tok.pad_token_id)
    shown = [RECORDS[1], RECORDS[1], new, RECORDS[0], RECORDS[2], RECORDS[1], new]  # each row's prompt
    distinct = {(r.id, i): img for r in shown for i, img in enumerate(r.images)}  # 4 pictures, not 8
    patches = sum(int(data.encode_prompts(processor, [data.Record("x", [img], "q", "a")])["image_grid_thw"].prod())
                  for img in distinct.values())
    seen = []
    hook = model.model.visual.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            shared = rollout.logprobs(model, mb["prompts"], mb["response_ids"], mb["response_mask"], 1.0, banned)
            assert seen == [patches]
            per_row = rollout.logprobs(model, mb["prompts"], mb["response_ids"], mb["response_mask"], 1.0, banned,
                                       share_vision=False)
            assert seen[1] == mb["prompts"]["pixel_values"].shape[0] > patches
    finally:
        hook.remove()
    assert (shared - per_row).abs().max() <= TOL and (shared - mb["logp"]).abs().max() <= TOL


def test_distinct_images_compares_content_not_sums():
    a = torch.arange(12.0).view(4, 3)  # one picture: 4 patches of 3 values, grid 1 x 2 x 2
    flipped = a.flip(0)  # the same sum, another picture
    grid = torch.tensor([[1, 2, 2], [1, 2, 2], [1, 2, 2], [1, 1, 4], [1, 2, 2]])  # [1, 1, 4]: another shape
    firsts, which = rollout.distinct_images(torch.cat([a, flipped, a.clone(), a, flipped]), grid)
    assert firsts == [0, 1, 3] and which == [0, 1, 0, 2, 1]


def test_sampling_in_chunks_of_prompts_gives_the_batch_result(tiny_model, greedy, banned):
    """--rollout-chunk: greedy responses and their log-probs are those of one batch, laid out alike."""
    model, processor = tiny_model
    chunked = rollout.sample(model, processor, RECORDS, g=2, max_new_tokens=20, temperature=0, chunk=2)
    assert chunked.response_ids.shape == greedy.response_ids.shape
    assert torch.equal(chunked.response_ids, greedy.response_ids) and chunked.texts == greedy.texts
    assert torch.equal(chunked.response_mask, greedy.response_mask)
    assert (chunked.logp - greedy.logp).abs().max() <= TOL
    assert torch.equal(chunked.prompts["image_grid_thw"], greedy.prompts["image_grid_thw"])
    check_logprobs(model, processor, chunked, RECORDS, 2, 1.0, banned)


def test_under_bf16_autocast_the_kv_cache_is_bf16_and_results_unchanged(tiny_model):
    """The cache stores what attention reads: autocast casts keys and values to bf16 anyway."""
    model, processor = tiny_model
    batch = data.encode_prompts(processor, RECORDS[:1])
    pos = rollout.positions(model, batch["input_ids"], batch["mm_token_type_ids"], batch["image_grid_thw"],
                            batch["attention_mask"])
    logits = {}
    for cast in (False, True):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
            cache = rollout.new_cache(torch.device("cpu")) if cast else rollout.DynamicCache()
            logits[cast] = model(**batch, position_ids=pos, past_key_values=cache, use_cache=True).logits
            step = model(input_ids=torch.tensor([[42]]), attention_mask=torch.ones(1, batch["input_ids"].shape[1] + 1),
                         position_ids=pos.amax().view(1, 1, 1).expand(3, 1, 1) + 1, past_key_values=cache).logits
            logits[cast] = torch.cat([logits[cast], step], 1)
        dtypes = {layer.keys.dtype for layer in cache.layers} | {layer.values.dtype for layer in cache.layers}
        assert dtypes == ({torch.bfloat16} if cast else {torch.float32})
    assert torch.equal(logits[True], logits[False])


@pytest.mark.parametrize("length", [0, 12])  # no room hint (grows from the prefill), and a hint exceeded
@pytest.mark.parametrize("autocast", [False, True])
def test_buffered_kv_cache_holds_what_dynamic_cache_holds(length, autocast):
    """The preallocated cache against transformers' own, fed the same keys and values through a
    prefill, G copies, single-token steps across buffer growths, and rows leaving: the same keys,
    values and lengths after every call; steps within capacity write in place (no copy of the
    cache); a view taken earlier (Parked.add's) keeps its values; under autocast both hold bf16."""
    gen = torch.Generator().manual_seed(0)
    kv = lambda b, t: (torch.randn(b, 2, t, 4, generator=gen), torch.randn(b, 2, t, 4, generator=gen))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        ours = rollout.new_cache(torch.device("cpu"), length)
    ref = rollout.DynamicCache()
    dtype = torch.bfloat16 if autocast else torch.float32

    def update(k, v):
        got = ours.update(k, v, 0)
        want = ref.update(k.to(dtype), v.to(dtype), 0)
        assert all(torch.equal(a, b) and a.dtype == dtype for a, b in zip(got, want))

    def same():
        a, b = ours.layers[0], ref.layers[0]
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
        assert ours.get_seq_length() == ref.get_seq_length() and a.get_mask_sizes(1) == b.get_mask_sizes(1)

    update(*kv(2, 5))  # the prefill of 2 prompts
    for c in (ours, ref):
        c.batch_repeat_interleave(3)
    same()
    layer, moves, seen = ours.layers[0], 0, None
    for step in range(30):
        if step == 9:
            seen = layer.keys[:], layer.keys.clone()  # as Parked.add takes it
        if step in (4, 17):
            for c in (ours, ref):
                c.batch_select_indices(torch.tensor([0, 2, 3]) if step == 4 else torch.tensor([2, 0]))
        buf = layer.key_buf
        update(*kv(ours.layers[0].keys.shape[0], 1))
        moves += layer.key_buf is not buf
        same()
    assert moves == 4  # 3 new batches (G copies, two leavings) and 1 growth; every other step in place
    assert layer.key_buf.shape[2] > layer.keys.shape[2] >= 12  # it grew past the hint, with room to spare
    assert torch.equal(*seen)


# ---------------------------------------------------------------------------------------------
# Forced Rethinking
# ---------------------------------------------------------------------------------------------

def test_who_rethinks_low_accuracy_groups_wrong_stopped_responses_by_coin():
    cfg = rollout.RethinkConfig(max_group_acc=0.5, only_wrong=True, frac=0.5)
    # G = 4: group 0 at accuracy 0.25, group 1 at 0.75 (too sure: none), group 2 at 0.5
    correct = [True, False, False, False, True, True, True, False, True, True, False, False]
    stopped = [True, True, False, True, True, True, True, True, True, True, True, True]
    coins = [0.0, 0.1, 0.2, 0.9, 0.0, 0.0, 0.0, 0.0, 0.3, 0.3, 0.49, 0.5]
    # row 0 right, row 2 truncated, row 3 lost its coin; group 1 too sure; rows 10 in, 11 lost (0.5 is not < 0.5)
    assert rollout.who_rethinks(correct, stopped, 4, cfg, coins) == [1, 10]
    everyone = rollout.RethinkConfig(max_group_acc=1.0, only_wrong=False, frac=1.0)
    assert rollout.who_rethinks(correct, stopped, 4, everyone, coins) == [i for i in range(12) if i != 2]
    assert rollout.who_rethinks(correct, stopped, 4, cfg, [1.0] * 12) == []


def candidate(row, correct=True, stopped=True, text="A red circle. \\boxed{red}", n=10):
    return rollout.Rethought(row=row, ids=torch.zeros(n, dtype=torch.long), logp=torch.zeros(n),
                             loss_mask=torch.ones(n), text=text, stopped=stopped,
                             grade=reward.Grade(correct=correct, reward=float(correct), boxed=True, valid=True),
                             continuation=text, new_tokens=n)


def test_keep_rethought_right_sane_within_the_cap_at_most_max_replace_per_prompt():
    cfg = rollout.RethinkConfig(max_waits=2, max_replace=2)
    cands = [candidate(0), candidate(1, correct=False), candidate(2, stopped=False),
             candidate(3, text="Wait wait WAIT"), candidate(4, n=21), candidate(5),  # prompt 0 (G = 8): rows 0-7
             candidate(6), candidate(7),  # prompt 0 already has two replaced: 6 and 7 are over the cap
             candidate(8, text="Wait, wait. \\boxed{red}"), candidate(9)]  # prompt 1: two waits is fine
    assert rollout.keep_rethought(cands, 8, cfg, max_len=20) == [True, False, False, False, False, True, False, False,
                                                                 True, True]
    assert not any(rollout.keep_rethought([candidate(0)], 8, rollout.RethinkConfig(max_replace=0), max_len=20))
    assert all(rollout.keep_rethought([candidate(r) for r in range(5)], 8, rollout.RethinkConfig(max_replace=-1),
                                      max_len=20))


def test_keep_rethought_as_published_long_enough_continuations_with_at_most_three_reflections():
    cfg = rollout.RethinkConfig(max_waits=3, min_new_tokens=30, count_markers=True, max_replace=-1)

    def cont(row, text, new_tokens=31, correct=True):
        c = candidate(row, correct=correct, text="first. Wait" + text, n=10)
        c.continuation, c.new_tokens = text, new_tokens
        return c

    cands = [cont(0, "ok \\boxed{1}"), cont(1, "ok", new_tokens=30),  # 30 is not > 30
             cont(2, "wait, wait a sec, alternatively, wait, \\boxed{1}"),  # 4 reflections
             cont(3, "wait, wait a bit, alternatively \\boxed{1}"),  # 3: kept; the trigger's "Wait" is not counted
             cont(4, "fine", correct=False), cont(5, "fine"), cont(6, "fine")]  # no cap per prompt
    assert rollout.keep_rethought(cands, 8, cfg, max_len=20) == [True, False, False, True, False, True, True]


def cut_text(tok, body):
    """Independent statement of the cut: the kept text ends before the last "\\boxed"."""
    text = tok.decode(body)
    at = text.rfind("\\boxed")
    k = next(k for k in range(len(body) + 1) if k == len(body) or len(tok.decode(body[:k + 1])) > at)
    return k


def rethink_rollout(tiny_model, cut, train_trigger, max_new_tokens=64):
    """Every stopped response triggered (score 1.0 makes every group eligible and every rethought
    response right) and kept; records each first response and where `cut` cut it."""
    model, processor = tiny_model
    cuts = []

    def recording_cut(tokenizer, body, rule):
        cuts.append((list(body), cut(tokenizer, body, rule)))
        return cuts[-1][1]

    cfg = rollout.RethinkConfig(max_group_acc=1.0, only_wrong=False, frac=1.0, cut_prob=1.0, max_waits=100, max_replace=2,
                                train_trigger=train_trigger)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rollout, "cut_point", recording_cut)
        ro = rollout.sample(model, processor, RECORDS, g=2, max_new_tokens=max_new_tokens, temperature=1.0,
                            generator=torch.Generator().manual_seed(3), grade=always_right, rethink=cfg)
    return ro, cuts


def check_rethought(tok, ro, cuts, train_trigger):
    """Each rethought response is: the first response's body cut at k + a trigger + a continuation
    that stopped; loss mask 0 exactly on the trigger when it is not trained."""
    triggers = [tok.encode(t, add_special_tokens=False) for t in rollout.TRIGGERS]
    triggered = ro.triggered.nonzero().flatten().tolist()
    assert len(triggered) == len(cuts) == int((~ro.truncated).sum()) and ro.rethought.equal(ro.triggered)
    for i, (body, k) in zip(triggered, cuts):
        n = int(ro.response_mask[i].sum())
        ids = ro.response_ids[i, :n].tolist()
        assert ro.first_texts[i] == tok.decode(body, skip_special_tokens=True)
        assert ids[:k] == body[:k]
        trig = max((t for t in triggers if ids[k:k + len(t)] == t), key=len)  # "\n\nWait" begins them all
        m = len(trig)
        assert is_stop(tok, ids[-1]) and not any(is_stop(tok, t) for t in ids[:-1])
        expect_loss = [1.0] * k + [float(train_trigger)] * m + [1.0] * (n - k - m)
        assert ro.loss_mask[i, :n].tolist() == expect_loss and (ro.loss_mask[i, n:] == 0).all()
        trig_text = rollout.TRIGGERS[triggers.index(trig)]
        assert ro.texts[i] == (tok.decode(body[:k], skip_special_tokens=True) + trig_text
                               + tok.decode(ids[k + m:], skip_special_tokens=True))


@pytest.fixture(scope="module")
def rethought(tiny_model):
    """Cut by the real rule; trigger tokens not trained."""
    return rethink_rollout(tiny_model, rollout.cut_point, train_trigger=False)


def test_rethought_responses_cut_before_the_answer(tiny_model, tok, banned, rethought):
    ro, cuts = rethought
    assert len(cuts) >= 4
    check_rethought(tok, ro, cuts, train_trigger=False)
    for body, k in cuts:
        assert k == cut_text(tok, body) < len(body)  # the toy responses all end in \boxed{...}
        assert tok.decode(body[k:]).lstrip().startswith("\\boxed")
    check_logprobs(*tiny_model, ro, RECORDS, 2, 1.0, banned)


def test_rethought_logprobs_at_any_cut(tiny_model, tok, banned):
    """Cuts at 0 (the trigger right after the prompt), 1, the middle and the end (nothing cut):
    the reused KV cache must mask exactly the dropped tail."""
    ks = itertools.cycle([0, 1, None, -1])

    def cut(tokenizer, body, rule):
        k = next(ks)
        return len(body) // 2 if k is None else len(body) if k == -1 else k

    ro, cuts = rethink_rollout(tiny_model, cut, train_trigger=True)
    assert {k for _, k in cuts} >= {0, 1} and any(k == len(b) for b, k in cuts)
    check_rethought(tok, ro, cuts, train_trigger=True)
    check_logprobs(*tiny_model, ro, RECORDS, 2, 1.0, banned)


def test_rethought_responses_longer_than_the_cap_are_not_kept(tiny_model):
    """The cap holds for every final response. With the whole first response kept (no cut), most
    rethought responses cannot fit in 20 tokens: those keep their first response. (At a cap of 64
    every triggered response of this rollout is kept: see check_rethought.)"""
    ro, cuts = rethink_rollout(tiny_model, lambda tokenizer, body, rule: len(body), train_trigger=True, max_new_tokens=20)
    assert len(cuts) >= 4 and int(ro.triggered.sum()) == len(cuts)
    assert (ro.response_mask.sum(1) <= 20).all()
    assert int(ro.rethought.sum()) < len(cuts)  # the rule bit
    for i in (ro.triggered & ~ro.rethought).nonzero().flatten().tolist():
        assert ro.first_texts[i] is None and not any(t.strip() in ro.texts[i] for t in rollout.TRIGGERS)


def test_cut_point(tok):
    def kept(text):
        body = tok.encode(text, add_special_tokens=False)
        k = rollout.cut_point(tok, body)
        if "\\boxed" in text:
            assert k == cut_text(tok, body)
        return tok.decode(body[:k])

    assert kept("I look at the image. The answer is \\boxed{red}.").rstrip() == "I look at the image. The answer is"
    assert kept("\\boxed{1} or rather \\boxed{2}").rstrip() == "\\boxed{1} or rather"
    # characters split over several byte tokens: the cut still falls just before the answer
    assert kept("所以答案是 \\boxed{5}.").rstrip() == "所以答案是"
    assert kept("So the Answer: 5").rstrip() == "So the"
    assert kept("no final answer here").rstrip() == "no final"
    assert kept("nothing to cut") == "nothing to cut"


def test_the_published_cut_makes_four_cuts_in_turn():
    """The last "Wait", then the last "\\boxed", then the first "answer", then the last blank line."""
    def kept(text):
        return text[:rollout.cut_at(text, "published")]

    assert kept("I see red.\n\nSo the answer is \\boxed{red}.") == "I see red."  # answer, then the blank line
    assert kept("First \\boxed{1}. Wait, no: \\boxed{2}") == "First"  # Wait, then \boxed, then stripped
    assert kept("The answer: maybe. Or the answer is \\boxed{3}") == "The"  # the FIRST "answer"
    assert kept("Red.\n\nBlue.") == "Red."
    assert kept("nothing to cut") == "nothing to cut"
    assert kept("wait, lower case is not cut") == "wait, lower case is not cut"
    assert rollout.cut_at("a \\boxed{b}", "answer") == 2 and rollout.cut_at("ab", "answer") == 2
    with pytest.raises(ValueError):
        rollout.cut_at("x", "first")


# ---------------------------------------------------------------------------------------------
# Rows for Selective Sample Replay
# ---------------------------------------------------------------------------------------------

def test_split_rows_and_collate_round_trip(tiny_model, tok, banned, rethought):
    model, processor = tiny_model
    ro, _ = rethought
    rows = rollout.split_rows(ro)
    assert len(rows) == len(ro.texts)
    for i, r in enumerate(rows):  # each row holds its own prompt and images, without padding
        alone = data.encode_prompts(processor, [RECORDS[i // 2]])
        assert torch.equal(r["prompt_ids"], alone["input_ids"][0])
        assert torch.equal(r["mm_token_type_ids"], alone["mm_token_type_ids"][0])
        assert torch.equal(r["pixel_values"], alone["pixel_values"])
        assert torch.equal(r["image_grid_thw"], alone["image_grid_thw"])
        n = int(ro.response_mask[i].sum())
        assert len(r["response_ids"]) == len(r["logp"]) == len(r["loss_mask"]) == n
    assert rows[0]["logp"].untyped_storage().data_ptr() != ro.logp.untyped_storage().data_ptr()

    batch = rollout.collate(rows, tok.pad_token_id)
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"):
        assert torch.equal(batch["prompts"][key], ro.prompts[key]), key
    for key in ("response_ids", "response_mask", "logp", "loss_mask"):
        assert torch.equal(batch[key], getattr(ro, key)), key

    # any rows in any order, e.g. a replayed mix: padding and images re-laid out consistently
    order = [5, 0, 3]
    mb = rollout.collate([rows[i] for i in order], tok.pad_token_id)
    with torch.no_grad():
        lp = rollout.logprobs(model, mb["prompts"], mb["response_ids"], mb["response_mask"], 1.0, banned)
    assert (lp - mb["logp"]).abs().max() <= TOL
    for j, i in enumerate(order):
        n = len(rows[i]["logp"])
        assert torch.equal(mb["logp"][j, :n], ro.logp[i, :n]) and (mb["loss_mask"][j, n:] == 0).all()
