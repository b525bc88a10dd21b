"""ssr.py: what the buffer keeps, how often it replays what, and how select_batch fills a batch."""
import copy
import math

import pytest
import torch

import rollout
import ssr


def rows(n, tag="s"):
    """Stand-ins for the trainer's rows: dicts of CPU tensors, numbers and strings."""
    return [{"ids": torch.arange(i, i + 3), "logp": torch.full((3,), -0.5 * i), "step": tag, "k": i} for i in range(n)]


def test_zero_advantages_are_never_stored():
    buf = ssr.ReplayBuffer(capacity=10, alpha=1.0)
    items = rows(6)
    stored = buf.add(items, torch.tensor([0.0, 0.7, 1e-9, -0.4, -0.0, 2.0]))
    assert stored == 3 and len(buf) == 3
    assert [item["k"] for item, _ in buf.entries] == [1, 3, 5]
    assert [a for _, a in buf.entries] == pytest.approx([0.7, -0.4, 2.0])
    assert buf.add(rows(4), [0.0] * 4) == 0 and len(buf) == 3


def test_fifo_keeps_exactly_the_newest_capacity():
    buf = ssr.ReplayBuffer(capacity=5, alpha=1.0)
    first, second = rows(3, "a"), rows(4, "b")
    buf.add(first, [1.0, 2.0, 3.0])
    buf.add(second, [0.0, 4.0, 5.0, 6.0])  # the zero is not stored, so it does not push anything out
    assert [(item["step"], item["k"]) for item, _ in buf.entries] == [("a", 1), ("a", 2), ("b", 1), ("b", 2), ("b", 3)]
    buf.add(rows(8, "c"), torch.arange(1.0, 9.0))  # more than capacity in one call
    assert [(item["step"], item["k"]) for item, _ in buf.entries] == [("c", k) for k in range(3, 8)]
    assert [a for _, a in buf.entries] == [4.0, 5.0, 6.0, 7.0, 8.0]


@pytest.mark.parametrize("alpha", [0.0, 1.0, 2.0])
def test_sampling_frequencies_follow_abs_advantage_to_the_alpha(alpha):
    adv = [0.2, -0.5, 1.0, -1.5, 2.5]
    buf = ssr.ReplayBuffer(capacity=5, alpha=alpha)
    buf.add(rows(5), adv)
    n = 20_000
    picks = buf.sample(n, torch.Generator().manual_seed(1))
    assert len(picks) == n
    weights = [abs(a) ** alpha for a in adv]
    for j, w in enumerate(weights):
        p = w / sum(weights)
        sigma = math.sqrt(n * p * (1 - p))
        assert abs(picks.count(j) - n * p) < 4 * sigma, (alpha, j, picks.count(j), n * p)


def test_weights_are_abs_advantage_to_the_alpha_oldest_first():
    buf = ssr.ReplayBuffer(capacity=3, alpha=1.5)
    buf.add(rows(4), [0.5, -2.0, 0.0, 1.0])
    assert buf.weights().tolist() == pytest.approx([0.5 ** 1.5, 2.0 ** 1.5, 1.0])
    buf.add(rows(1), [-0.25])  # the oldest (0.5) falls out
    assert buf.weights().tolist() == pytest.approx([2.0 ** 1.5, 1.0, 0.125])


def test_sample_edge_cases():
    buf = ssr.ReplayBuffer(capacity=3, alpha=1.0)
    with pytest.raises(ValueError):
        buf.sample(1)
    buf.add(rows(1), [0.3])
    assert buf.sample(0) == [] and buf.sample(4) == [0, 0, 0, 0]


def test_state_dict_round_trip_gives_the_same_draws(tmp_path):
    buf = ssr.ReplayBuffer(capacity=6, alpha=1.5)
    buf.add(rows(9), torch.linspace(-2.0, 2.0, 9))
    torch.save({"buffer": buf.state_dict()}, tmp_path / "ckpt.pt")
    restored = ssr.ReplayBuffer(capacity=6, alpha=1.5)
    restored.load_state_dict(torch.load(tmp_path / "ckpt.pt")["buffer"])  # weights_only=True by default
    assert len(restored) == len(buf)
    for (a, adv_a), (b, adv_b) in zip(buf.entries, restored.entries):
        assert adv_a == adv_b and a["step"] == b["step"] and a["k"] == b["k"]
        assert torch.equal(a["ids"], b["ids"]) and torch.equal(a["logp"], b["logp"])
    assert buf.sample(50, torch.Generator().manual_seed(7)) == restored.sample(50, torch.Generator().manual_seed(7))
    # and both go on alike: same FIFO evictions, same draws
    more = rows(3, "next")
    buf.add(more, [0.5, 0.0, -3.0])
    restored.add(more, [0.5, 0.0, -3.0])
    assert buf.sample(50, torch.Generator().manual_seed(8)) == restored.sample(50, torch.Generator().manual_seed(8))


def test_the_trainers_rows_are_stored_as_plain_values_and_come_back_as_rows(tmp_path):
    """rollout.Row is a dataclass: its fields go into the checkpoint as a dict, which torch.load
    reads with weights_only=True (no class is unpickled), and load_state_dict builds the Rows again."""
    made = [rollout.Row(prompt_ids=torch.arange(5 + i), mm_token_type_ids=torch.zeros(5 + i, dtype=torch.long),
                        pixel_values=torch.randn(4, 6), image_grid_thw=torch.tensor([[1, 2, 2]]),
                        response_ids=torch.arange(3), logp=torch.randn(3), loss_mask=torch.ones(3),
                        step=i, reflects=i == 1) for i in range(3)]
    buf = ssr.ReplayBuffer(capacity=4, alpha=1.0)
    buf.add(made, [0.5, -1.0, 2.0])
    torch.save({"buffer": buf.state_dict()}, tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)["buffer"]
    assert all(type(item) is dict for item in state["items"])
    restored = ssr.ReplayBuffer(capacity=4, alpha=1.0)
    restored.load_state_dict(state, rollout.Row)
    for (a, adv_a), (b, adv_b) in zip(buf.entries, restored.entries, strict=True):
        assert type(b) is rollout.Row and adv_a == adv_b and (a.step, a.reflects) == (b.step, b.reflects)
        assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("prompt_ids", "mm_token_type_ids",
                   "pixel_values", "image_grid_thw", "response_ids", "logp", "loss_mask"))


def test_select_batch_all_zero_step_and_empty_buffer_gives_an_empty_batch():
    buf = ssr.ReplayBuffer(capacity=4, alpha=1.0)
    items, adv, n_replayed = buf.select_batch(rows(8), torch.zeros(8), 8, torch.Generator().manual_seed(0))
    assert items == [] and adv.shape == (0,) and n_replayed == 0 and len(buf) == 0


def test_select_batch_all_nonzero_step_is_plain_grpo():
    buf = ssr.ReplayBuffer(capacity=4, alpha=1.0)
    buf.add(rows(4, "old"), [1.0, 1.0, 1.0, 1.0])
    current = rows(8)
    adv = torch.tensor([0.5, -0.5, 1.2, -1.2, 0.3, -0.3, 2.0, -2.0])
    items, batch_adv, n_replayed = buf.select_batch(current, adv, 8, torch.Generator().manual_seed(0))
    assert len(items) == 8 and all(a is b for a, b in zip(items, current))
    assert torch.equal(batch_adv, adv) and n_replayed == 0
    assert [item["step"] for item, _ in buf.entries] == ["s"] * 4  # the step's newest four pushed the old ones out


def test_select_batch_refills_half_zero_step_and_counts_replays():
    gen = torch.Generator().manual_seed(3)
    buf = ssr.ReplayBuffer(capacity=6, alpha=1.0)
    old = rows(8, "old")
    old_adv = torch.tensor([0.1, -0.1, 0.9, -0.9, 1.5, -1.5, 0.7, -0.7])
    buf.select_batch(old, old_adv, 8, gen)  # buffer: the last six of `old`
    adv_of = {id(item): a for item, a in zip(old, old_adv.tolist())}

    total_replayed = 0
    for _ in range(20):
        current = rows(8)  # four groups of two: groups 0 and 2 have zero advantage
        adv = torch.tensor([0.0, 0.0, 1.0, -1.0, 0.0, 0.0, 0.4, -0.4])
        adv_of.update({id(item): a for item, a in zip(current, adv.tolist())})
        before = copy.deepcopy(current), copy.deepcopy(old)
        items, batch_adv, n_replayed = buf.select_batch(current, adv, 8, gen)

        assert len(items) == 8 and batch_adv.shape == (8,)
        assert [id(x) for x in items[:4]] == [id(current[i]) for i in (2, 3, 6, 7)]  # the step's non-zero ones, once
        fresh = {id(x) for x in current}
        assert n_replayed == sum(id(x) not in fresh for x in items)
        assert all(id(x) in adv_of for x in items)  # every sample is a real one, with its own advantage
        assert batch_adv.tolist() == pytest.approx([adv_of[id(x)] for x in items])
        assert all(abs(a) > ssr.ZERO_ADV for a in batch_adv.tolist())
        for a, b in zip(before[0] + before[1], current + old):  # nothing was modified
            assert a.keys() == b.keys() and all(
                torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)
        total_replayed += n_replayed
        old = current
    assert total_replayed > 0  # the buffer's two older samples do get replayed


def test_select_batch_with_no_effective_sample_replays_the_whole_batch():
    buf = ssr.ReplayBuffer(capacity=4, alpha=1.0)
    old = rows(4, "old")
    buf.add(old, [1.0, -1.0, 2.0, -2.0])
    items, adv, n_replayed = buf.select_batch(rows(8), torch.zeros(8), 8, torch.Generator().manual_seed(0))
    assert len(items) == 8 and n_replayed == 8
    assert all(any(x is o for o in old) for x in items)
    assert all(abs(a) in (1.0, 2.0) for a in adv.tolist())


def test_select_batch_draws_reproducibly_from_the_generator():
    """A resumed run (buffer from its state_dict, generator from its saved state) picks the same batch."""
    buf = ssr.ReplayBuffer(capacity=8, alpha=1.0)
    buf.add(rows(8, "old"), torch.linspace(0.5, 4.0, 8))
    resumed = ssr.ReplayBuffer(capacity=8, alpha=1.0)
    resumed.load_state_dict(buf.state_dict())
    current, adv = rows(8), torch.tensor([0.0] * 6 + [1.0, -1.0])
    gen = torch.Generator().manual_seed(5)
    gen_resumed = torch.Generator()
    gen_resumed.set_state(gen.get_state())
    a, adv_a, n_a = buf.select_batch(current, adv, 8, gen)
    b, adv_b, n_b = resumed.select_batch(current, adv, 8, gen_resumed)
    assert [(x["step"], x["k"]) for x in a] == [(x["step"], x["k"]) for x in b]
    assert torch.equal(adv_a, adv_b) and n_a == n_b
