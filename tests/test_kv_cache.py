"""kv_cache.py: the preallocated KV cache holds what transformers' own holds, and changes no result."""
import gc
import weakref

import pytest
import torch
from transformers import DynamicCache

import data
import kv_cache
import rollout
from helpers import RECORDS

pytestmark = pytest.mark.usefixtures("one_thread")


def test_under_bf16_autocast_the_kv_cache_is_bf16_and_results_unchanged(tiny_model):
    """The cache stores what attention reads: autocast casts keys and values to bf16 anyway."""
    model, processor = tiny_model
    batch = data.encode_prompts(processor, RECORDS[:1])
    pos = rollout.positions(model, batch["input_ids"], batch["mm_token_type_ids"], batch["image_grid_thw"],
                            batch["attention_mask"])
    logits = {}
    for cast in (False, True):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
            cache = kv_cache.new_cache(torch.device("cpu")) if cast else DynamicCache()
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
        ours = kv_cache.new_cache(torch.device("cpu"), length)
    ref = DynamicCache()
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


def test_rows_leaving_or_copied_free_the_old_buffers_at_once():
    """After batch_repeat_interleave (the group) and batch_select_indices (rows leaving) nothing holds
    the buffers the rows were in: the cache is not held twice until the next update moves them."""
    cache = kv_cache.new_cache(torch.device("cpu"), 16)
    keys = torch.randn(2, 2, 5, 4)
    cache.update(keys, keys.clone(), 0)
    layer = cache.layers[0]
    for change, expect in ((lambda: cache.batch_repeat_interleave(3), lambda k: k.repeat_interleave(3, 0)),
                           (lambda: cache.batch_select_indices(torch.tensor([0, 4])), lambda k: k[[0, 4]])):
        old = weakref.ref(layer.key_buf), weakref.ref(layer.value_buf)
        change()
        gc.collect()
        assert old[0]() is None and old[1]() is None
        step = torch.randn(len(expect(keys)), 2, 1, 4)
        keys = torch.cat([expect(keys), step], 2)
        cache.update(step, step.clone(), 0)
        assert torch.equal(layer.keys, keys) and torch.equal(layer.values, keys)
