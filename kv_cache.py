"""The KV cache of the sampling loop: speed machinery, which a reader of the algorithm may skip.

Two things, both about not copying keys and values that are already in memory:
  * `new_cache`: a transformers `DynamicCache` whose layers (`BufferedLayer`) write each decode
    step into preallocated buffers instead of growing by torch.cat (which copies the whole cache
    at every step).
  * `Parked`: the caches of rows that left the decode loop (rollout.decode lets finished rows go),
    kept so that Forced Rethinking (rethink.py) continues a response from its cache instead of
    encoding the prompt and the response again.
"""
import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class BufferedLayer(DynamicLayer):
    """A KV-cache layer that writes each step's keys and values into buffers with room to spare
    along the sequence axis, where DynamicLayer grows by torch.cat and so copies the whole cache at
    every decode step. The buffers start with room for `length` tokens (the caller's prompt and
    response cap: then they never grow, and hold what the concatenated cache holds at the cap) and
    double when full (without a hint, or past it), so a token is copied O(1) times on average.

    `keys` and `values` are always the filled part: views of the buffers after `update`, and what
    every inherited method reads. The methods that replace them by new tensors (the decode loop's
    batch_select_indices as rows leave, the group's batch_repeat_interleave) drop the buffers at
    once, else the old ones would be held beside the new tensors until the next `update`, which
    moves the rows into new buffers (`update` sees that `keys` is no longer a view of them). A view
    taken by someone else (Parked.add) keeps its values: updates write only past the filled part.

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

    def batch_select_indices(self, indices: torch.Tensor):
        super().batch_select_indices(indices)
        self.key_buf = self.value_buf = None

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        self.key_buf = self.value_buf = None

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
    """An empty KV cache (`BufferedLayer`s) with room for `length` tokens, that stores keys and
    values in the autocast dtype when autocast is on."""
    dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    cache = DynamicCache()
    cache.layer_class_to_replicate = lambda: BufferedLayer(dtype, length)
    return cache


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

    def release(self):
        """Drop every part: Forced Rethinking, once it has `select`ed, frees the first pass's caches
        before the continuation decodes into its own (else both would be held at the peak)."""
        self.parts.clear()
