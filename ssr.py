"""ssr.py: Selective Sample Replay (paper, Section 3.1).

GRPO's advantage (Eq. 2) is zero for every response of a group whose rewards are all equal, so as
training saturates a growing share of each batch carries no gradient ("vanishing advantages").
SSR drops those samples and fills the batch back up from a small buffer of recent samples whose
advantage was not zero, drawing buffer sample j with probability |A_j|^alpha / sum_k |A_k|^alpha:
the samples that push the policy hardest are replayed most often.

The published implementation (TIGER-AI-Lab/VL-Rethinker, openrlhf/trainer/ppo_utils/replay_buffer.py,
NaiveReplayBuffer.active_sampling, at 4afedcd: at HEAD nothing calls it, docs/differences.md) does the
following each step; where we differ, we say why:
  * The buffer is a FIFO of non-zero-advantage samples, kept across steps, holding half a rollout
    batch. The step's samples go in *before* the draw, so they can be drawn again. Same here;
    `n_replayed` counts only the samples of earlier steps.
  * It draws min(N/2, #non-zero) of the step's own samples (weighted, with replacement) and the rest of
    the batch from the buffer. We keep each non-zero sample of the step exactly once and draw only the
    shortfall: fresh on-policy samples are the best gradient estimate there is, and resampling them
    adds variance and duplicates but no information. A step with no zero advantage is plain GRPO.
  * Its weights are |A| + 1e-4, that is alpha = 1. It also puts a few zero-advantage, all-correct
    samples in the step's pool, where the 1e-4 weight makes them near-unpickable (and a zero
    advantage gives no gradient anyway). We leave them out.
  * When the shortfall is larger than the buffer, it adds whole copies of the buffer while they fit
    and draws only the remainder. We draw the whole shortfall by weight: one rule for every draw.
  * A step with no non-zero sample raises: its pool is empty and np.random.choice gets
    probabilities that do not sum to 1. (At HEAD, dd2c17d, the filter branch refills with
    `while numtotal > 0: ... numtotal -= len(sel)`, which never ends when there is nothing to draw
    from.) We return an empty batch: there is nothing to learn from.
A replayed sample keeps the log-probs of the policy that generated it, so the ratio in Eq. 1 measures
the drift since then and the clipping bounds its update (as in the published code).
"""
import dataclasses
from collections import deque

import torch

# |A| at or below this counts as zero: it absorbs round-off, nothing more. With 0/1 rewards a group
# with all rewards equal gets exactly 0 from Eq. 2, and any other group gets |A| >= ~1/sqrt(G).
ZERO_ADV = 1e-6


def zero_advantage(advantages) -> torch.Tensor:
    """Which samples have zero advantage and so no gradient: the one definition the buffer, the
    batch refill and the trainer's zero_adv_frac (a group whose samples all have it) share."""
    return torch.as_tensor(advantages, dtype=torch.float32).abs() <= ZERO_ADV


class ReplayBuffer:
    """The newest `capacity` samples with non-zero advantage, drawn with p_j ~ |A_j|^alpha.

    Items are opaque (the trainer's rows: token ids, old log-probs, masks, ...) and are stored by
    reference, never copied or modified: the trainer must not change a row once handed over."""

    def __init__(self, capacity: int, alpha: float = 1.0):
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity, self.alpha = capacity, alpha
        self.entries = deque(maxlen=capacity)  # (item, advantage), oldest first; a full deque drops its oldest

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, items, advantages) -> int:
        """Store the items whose |advantage| > ZERO_ADV (a zero-advantage sample has no gradient to
        replay); the oldest fall out beyond `capacity`. Returns how many it was handed with a non-zero
        advantage (more than `capacity` when a step has more: only the last `capacity` stay)."""
        adv = torch.as_tensor(advantages, dtype=torch.float32).flatten()
        if len(adv) != len(items):
            raise ValueError(f"{len(items)} items but {len(adv)} advantages")
        new = [(item, a) for item, a, zero in zip(items, adv.tolist(), zero_advantage(adv).tolist()) if not zero]
        self.entries.extend(new)
        return len(new)

    def weights(self, device="cpu") -> torch.Tensor:
        """|A_j|^alpha of every sample, oldest first: sample j is drawn with probability
        weights[j] / weights.sum() (alpha = 0: uniform)."""
        return torch.tensor([abs(a) for _, a in self.entries], dtype=torch.float64, device=device) ** self.alpha

    def sample(self, k: int, generator: torch.Generator | None = None) -> list[int]:
        """k positions in the buffer (0 = oldest), drawn with replacement by `weights`. Draws come
        from `generator`, so a run that restores the generator's state and the buffer (state_dict)
        draws the same samples again."""
        if k == 0:
            return []
        if not self.entries:
            raise ValueError("cannot sample from an empty buffer")
        device = generator.device if generator is not None else "cpu"  # multinomial wants them together
        return torch.multinomial(self.weights(device), k, replacement=True, generator=generator).tolist()

    def select_batch(self, current_items, current_advantages, batch_size: int,
                     generator: torch.Generator | None = None):
        """Build one step's training batch with SSR (Section 3.1).

        1. Keep every sample of this step whose advantage is non-zero, once each, in order.
        2. Add those to the buffer (the oldest fall out).
        3. Fill the batch back up to `batch_size` with draws from the buffer, p_j ~ |A_j|^alpha. The
           buffer now also holds this step's samples, so a draw may repeat one of them; only draws of
           earlier steps' samples count as replayed.
        With nothing non-zero in the step and an empty buffer the batch is empty: there is no gradient.

        Returns (items, advantages as a float32 tensor, n_replayed). Items are returned as given, not copied."""
        adv = torch.as_tensor(current_advantages, dtype=torch.float32).flatten()
        if len(adv) != len(current_items):
            raise ValueError(f"{len(current_items)} items but {len(adv)} advantages")
        if len(current_items) > batch_size:
            raise ValueError(f"{len(current_items)} samples do not fit a batch of {batch_size}")
        keep = (~zero_advantage(adv)).nonzero().flatten().tolist()
        items, advs = [current_items[i] for i in keep], adv[keep].tolist()

        n_fresh = min(self.add(current_items, adv), self.capacity)  # this step's samples, at the buffer's end
        first_fresh = len(self) - n_fresh
        n_replayed = 0
        if len(items) < batch_size and len(self):
            picks = self.sample(batch_size - len(items), generator)
            items += [self.entries[j][0] for j in picks]
            advs += [self.entries[j][1] for j in picks]
            n_replayed = sum(j < first_fresh for j in picks)
        return items, torch.tensor(advs, dtype=torch.float32), n_replayed

    def state_dict(self) -> dict:
        """The entries as tensors and plain values, so that torch.load reads a checkpoint with
        weights_only=True, unpickling nothing: a dataclass item (the trainer's rollout.Row) becomes
        the dict of its fields (the same tensors, not copies); other items are stored as they are."""
        return {"items": [fields_of(item) for item, _ in self.entries], "advantages": [a for _, a in self.entries]}

    def load_state_dict(self, state: dict, item_type=None) -> None:
        """The entries of `state_dict`; `item_type` (rollout.Row for the trainer) builds each item
        again from the dict of its fields."""
        items = state["items"] if item_type is None else [item_type(**item) for item in state["items"]]
        self.entries = deque(zip(items, state["advantages"]), maxlen=self.capacity)


def fields_of(item):
    """A dataclass instance as the dict of its fields, without copying them; anything else as it is."""
    if dataclasses.is_dataclass(item):
        return {f.name: getattr(item, f.name) for f in dataclasses.fields(item)}
    return item
