"""rollout.py: the sampler's recorded log-probs, masks, the decode loop, and rows for replay.

Every recorded log-prob is checked against the trainer's forward and a plain reference
(helpers.check_logprobs)."""
import dataclasses

import pytest
import torch

import data
import rollout
import tiny
from helpers import RECORDS, TOL, check_logprobs, is_stop, picture

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sampled(tiny_model):
    """Two responses per record at temperature 1.3, top-p 0.95; 16 tokens stops some, truncates others."""
    model, processor = tiny_model
    ro = rollout.sample(model, processor, RECORDS, 2, rollout.Decoding(16, temperature=1.3, top_p=0.95),
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
    return rollout.sample(model, processor, RECORDS, 2, rollout.Decoding(20, temperature=0))


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
        alone = rollout.sample(model, processor, [rec], 1, rollout.Decoding(20, temperature=0))
        n = alone.response_ids.shape[1]
        assert int(greedy.response_mask[2 * p].sum()) == n
        assert torch.equal(alone.response_ids[0], greedy.response_ids[2 * p, :n])
        assert (alone.logp[0] - greedy.logp[2 * p, :n]).abs().max() <= TOL


def test_vision_tokens_are_never_sampled(tiny_model, banned):
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
        ro = rollout.sample(model, processor, RECORDS[:2], 2, rollout.Decoding(n, temperature=temperature, top_p=top_p),
                            generator=torch.Generator().manual_seed(1))
        real = ro.response_ids[ro.response_mask.bool()]
        assert real.numel() >= 2 * n and not torch.isin(real, torch.tensor(banned)).any()
        assert torch.isfinite(ro.logp).all()


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.5, 0.25, 0.125, 0.125])
    logits = probs.log().expand(20_000, 4)
    gen = torch.Generator().manual_seed(0)
    draws = rollout.pick(logits, 1.0, 0.75, [], gen)  # {0, 1} reaches 0.75 exactly: token 2 is out
    assert set(draws.tolist()) == {0, 1} and abs((draws == 0).float().mean() - 2 / 3) < 0.02
    draws = rollout.pick(logits, 1.0, 0.8, [], gen)
    assert set(draws.tolist()) == {0, 1, 2} and abs((draws == 2).float().mean() - 0.125 / 0.875) < 0.02
    draws = rollout.pick(logits, 0.5, 1.0, [3], gen)  # T = 0.5 squares the probabilities; 3 banned
    expect = torch.tensor([0.25, 0.0625, 0.015625]) / 0.328125
    assert set(draws.tolist()) <= {0, 1, 2} and abs((draws == 1).float().mean() - expect[1]) < 0.02


def test_top_k_keeps_the_k_most_likely_then_top_p_within_them():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    logits = probs.log().expand(20_000, 4)
    gen = torch.Generator().manual_seed(0)
    draws = rollout.pick(logits, 1.0, 1.0, [], gen, top_k=2)  # {0, 1} renormalised: 4/7 and 3/7
    assert set(draws.tolist()) == {0, 1} and abs((draws == 0).float().mean() - 4 / 7) < 0.02
    draws = rollout.pick(logits, 1.0, 0.5, [], gen, top_k=3)  # of {0, 1, 2}, 0 alone has 4/9 < 0.5: {0, 1}
    assert set(draws.tolist()) == {0, 1}
    draws = rollout.pick(logits, 1.0, 0.55, [], gen, top_k=2)  # of {0, 1}, 0 alone has 4/7 >= 0.55 (0.4 < 0.55)
    assert set(draws.tolist()) == {0}
    draws = rollout.pick(logits, 1.0, 1.0, [0], gen, top_k=2)  # banned first: the top 2 of {1, 2, 3}
    assert set(draws.tolist()) == {1, 2} and abs((draws == 1).float().mean() - 0.6) < 0.02


def test_draw_is_torch_multinomial_and_a_row_keeps_its_noise_in_a_smaller_batch():
    probs = torch.rand(6, 50, generator=torch.Generator().manual_seed(0))
    probs[:, :20] = 0.0  # cut by top-k / top-p: never drawn
    gens = [torch.Generator().manual_seed(7) for _ in range(3)]
    expect = torch.multinomial(probs, 1, generator=gens[0]).squeeze(1)
    assert torch.equal(rollout.draw(probs, gens[1]), expect)
    rows = torch.tensor([1, 4, 5])  # rows 0, 2 and 3 have left the batch: the others draw what they drew
    assert torch.equal(rollout.draw(probs[rows], gens[2], rows, 6), expect[rows])
    assert all(torch.equal(gens[0].get_state(), g.get_state()) for g in gens[1:])  # the generator used alike
    assert (expect >= 20).all()


def test_a_uniform_of_zero_never_draws_a_token_of_probability_zero(monkeypatch):
    """torch.rand may give 0.0: its exponential noise is then 0, and 0 / 0 = NaN, which argmax would pick."""
    probs = torch.tensor([[0.0, 0.5, 0.5], [0.2, 0.0, 0.8]])
    zeros = lambda n, v, **kw: torch.full((n, v), 0.5, dtype=kw["dtype"]).index_fill_(1, torch.tensor([0, 1]), 0.0)
    monkeypatch.setattr(torch, "rand", zeros)  # on the CPU, draw's noise is -log1p(-u) of these uniforms
    assert rollout.draw(probs, None).tolist() == [1, 0]  # noise 0 on tokens 0 and 1: of those, the one with mass


def test_finished_rows_leave_the_batch_and_change_no_token(tiny_model):
    """The same rollouts with rows leaving the decode batch (Decoding.leave_at) and without: the
    same tokens, texts, masks and generator state after; log-probs equal up to the last bits of a
    matmul over fewer rows. (test_rethink: rethinking continues caches of rows that left.)"""
    model, processor = tiny_model
    batch_sizes = []
    hook = model.register_forward_pre_hook(lambda m, args, kw: batch_sizes.append(kw["input_ids"].shape[0]),
                                           with_kwargs=True)
    try:
        out, rows_fed = {}, {}
        for leave in (float("inf"), rollout.LEAVE_AT):  # lengths 3 to 28
            batch_sizes.clear()
            gen = torch.Generator().manual_seed(0)
            how = rollout.Decoding(32, temperature=2.0, top_p=0.9, leave_at=leave)
            out[leave] = rollout.sample(model, processor, RECORDS, 3, how, gen), gen.get_state()
            rows_fed[leave] = sum(batch_sizes)
    finally:
        hook.remove()
    assert rows_fed[rollout.LEAVE_AT] < rows_fed[float("inf")]  # rows did leave
    (a, state_a), (b, state_b) = out.values()
    for key in ("response_ids", "response_mask", "loss_mask", "truncated"):
        assert torch.equal(getattr(a, key), getattr(b, key)), key
    assert a.texts == b.texts and torch.equal(state_a, state_b)
    assert (a.logp - b.logp).abs().max() <= TOL


def test_each_distinct_picture_is_encoded_once_with_replayed_rows_and_logprobs_unchanged(tiny_model, tok, banned):
    """A micro-batch of this step's rows and rows replayed from an earlier step, one of which shows
    the same picture as a current prompt: the vision tower sees each picture once, and every row's
    log-probs are those of the model's own forward, which encodes every row's copy."""
    model, processor = tiny_model
    earlier = rollout.sample(model, processor, RECORDS, 2, rollout.Decoding(12), torch.Generator().manual_seed(0))
    new = data.Record("new", [picture((84, 112), (120, 40, 160))], "What colour is the shape?", "purple")
    now = rollout.sample(model, processor, [RECORDS[1], new], 2, rollout.Decoding(12), torch.Generator().manual_seed(1))
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


def test_rollouts_of_chunks_of_prompts_concatenate_to_the_batch_result(tiny_model, greedy, banned, tok):
    """--rollout-chunk: greedy responses and their log-probs are those of one batch, laid out alike."""
    model, processor = tiny_model
    how = rollout.Decoding(20, temperature=0)
    chunked = rollout.concat([rollout.sample(model, processor, RECORDS[:2], 2, how),
                              rollout.sample(model, processor, RECORDS[2:], 2, how)], tok.pad_token_id)
    assert chunked.response_ids.shape == greedy.response_ids.shape
    assert torch.equal(chunked.response_ids, greedy.response_ids) and chunked.texts == greedy.texts
    assert torch.equal(chunked.response_mask, greedy.response_mask)
    assert (chunked.logp - greedy.logp).abs().max() <= TOL
    assert torch.equal(chunked.prompts["image_grid_thw"], greedy.prompts["image_grid_thw"])
    check_logprobs(model, processor, chunked, RECORDS, 2, 1.0, banned)


# ---------------------------------------------------------------------------------------------
# Rows for Selective Sample Replay
# ---------------------------------------------------------------------------------------------

def test_split_rows_and_collate_round_trip(tiny_model, tok, banned, sampled):
    """Any loss mask (a rethought response's has zeros on an untrained trigger) travels with its row."""
    model, processor = tiny_model
    ro = dataclasses.replace(sampled, loss_mask=sampled.loss_mask * (torch.arange(sampled.loss_mask.shape[1]) % 3 > 0))
    rows = rollout.split_rows(ro, step=7, reflects=[i % 2 for i in range(len(ro.texts))])
    assert len(rows) == len(ro.texts)
    for i, r in enumerate(rows):  # each row holds its own prompt and images, without padding
        alone = data.encode_prompts(processor, [RECORDS[i // 2]])
        assert torch.equal(r.prompt_ids, alone["input_ids"][0])
        assert torch.equal(r.mm_token_type_ids, alone["mm_token_type_ids"][0])
        assert torch.equal(r.pixel_values, alone["pixel_values"])
        assert torch.equal(r.image_grid_thw, alone["image_grid_thw"])
        assert r.step == 7 and r.reflects == bool(i % 2)
        n = int(ro.response_mask[i].sum())
        assert len(r.response_ids) == len(r.logp) == len(r.loss_mask) == n
    assert rows[0].logp.untyped_storage().data_ptr() != ro.logp.untyped_storage().data_ptr()

    batch = rollout.collate(rows, tok.pad_token_id)
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"):
        assert torch.equal(batch["prompts"][key], ro.prompts[key]), key
    for key in ("response_ids", "response_mask", "logp", "loss_mask"):
        assert torch.equal(batch[key], getattr(ro, key)), key

    # any rows in any order, e.g. a replayed mix: padding and images re-laid out consistently
    order = [5, 0, 3]
    mb = rollout.collate([rows[i] for i in order], tok.pad_token_id)
    with torch.no_grad():
        lp = rollout.logprobs(model, mb["prompts"], mb["response_ids"], mb["response_mask"], 1.3, banned)  # `sampled`'s T
    assert (lp - mb["logp"]).abs().max() <= TOL
    for j, i in enumerate(order):
        n = len(rows[i].logp)
        assert torch.equal(mb["logp"][j, :n], ro.logp[i, :n]) and (mb["loss_mask"][j, n:] == 0).all()
