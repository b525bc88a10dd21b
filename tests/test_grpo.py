"""grpo.py: the loss and the advantages against hand computations; the update on the tiny model
(a non-finite step skipped, shared vision, the KL term, minibatches)."""
import copy
import dataclasses
import math
import tempfile
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import grpo
import models
import rollout
import toy
import vlr


def reference_loss(logp, old, adv, mask, eps_low, eps_high, agg):
    """Eq. 1 written out token by token, in plain Python floats."""
    terms, per_seq = 0.0, []
    n_tok = 0
    for i in range(logp.shape[0]):
        seq, n = 0.0, 0
        for t in range(logp.shape[1]):
            if mask[i, t]:
                rho = float(torch.exp(logp[i, t] - old[i, t]))
                a = float(adv[i])
                seq += -min(rho * a, min(max(rho, 1 - eps_low), 1 + eps_high) * a)
                n += 1
        terms += seq
        n_tok += n
        per_seq.append(seq / max(n, 1))
    return terms / n_tok if agg == "token" else sum(per_seq) / len(per_seq)


@pytest.mark.parametrize("agg", ["token", "seq"])
@pytest.mark.parametrize("eps_high", [None, 0.35])
def test_grpo_loss_value_and_gradient_match_an_independent_formula(agg, eps_high):
    g = torch.Generator().manual_seed(0)
    logp = (-torch.rand(5, 7, generator=g) * 3).double().requires_grad_()
    old = (logp.detach() + 0.4 * torch.randn(5, 7, generator=g, dtype=torch.float64))
    adv = torch.randn(5, generator=g, dtype=torch.float64)
    mask = (torch.rand(5, 7, generator=g) > 0.3).double()
    high = 0.2 if eps_high is None else eps_high  # None: the symmetric clip of Eq. 1
    loss, _ = grpo.grpo_loss(logp, old, adv, mask, vlr.Config(clip_eps=0.2, clip_eps_high=high, agg=agg))
    assert loss.item() == pytest.approx(reference_loss(logp.detach(), old, adv, mask, 0.2, high, agg), rel=1e-12)
    loss.backward()
    # finite differences of the reference, token by token
    num = torch.zeros_like(logp)
    for i in range(5):
        for t in range(7):
            d = torch.zeros_like(logp)
            d[i, t] = 1e-6
            up = reference_loss(logp.detach() + d, old, adv, mask, 0.2, high, agg)
            down = reference_loss(logp.detach() - d, old, adv, mask, 0.2, high, agg)
            num[i, t] = (up - down) / 2e-6
    assert torch.allclose(logp.grad, num, atol=1e-6)


def test_on_policy_loss_is_minus_the_mean_advantage_per_token():
    logp = torch.randn(3, 4)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.float)
    adv = torch.tensor([1.0, -2.0, 0.5])
    loss, st = grpo.grpo_loss(logp, logp.clone(), adv, mask, vlr.Config())
    assert loss.item() == pytest.approx(-(4 * 1.0 + 2 * -2.0 + 1 * 0.5) / 7)
    seq, _ = grpo.grpo_loss(logp, logp.clone(), adv, mask, vlr.Config(agg="seq"))
    assert seq.item() == pytest.approx(-(1.0 - 2.0 + 0.5) / 3)
    assert st["clip_frac"] == 0.0


def test_clipping_stops_the_gradient_outside_the_trust_region():
    old = torch.zeros(4, 1)
    # ratio 1.5 with A > 0 and ratio 0.5 with A < 0: clipped; ratio 1.1 / 0.9: inside
    logp = torch.log(torch.tensor([[1.5], [0.5], [1.1], [0.9]])).requires_grad_()
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    loss, st = grpo.grpo_loss(logp, old, adv, torch.ones(4, 1), vlr.Config(clip_eps=0.2, clip_eps_high=0.2))
    loss.backward()
    assert logp.grad[0].item() == 0 and logp.grad[1].item() == 0
    assert logp.grad[2].item() == pytest.approx(-1.1 / 4) and logp.grad[3].item() == pytest.approx(0.9 / 4)
    assert st["clip_frac"] == 0.5
    # the other side of the region is not clipped: a bad token's ratio below 1 - eps with A > 0 still learns
    lp = torch.log(torch.tensor([[0.5]])).requires_grad_()
    grpo.grpo_loss(lp, torch.zeros(1, 1), torch.tensor([1.0]), torch.ones(1, 1), vlr.Config())[0].backward()
    assert lp.grad.item() == pytest.approx(-0.5)


def test_the_sft_term_adds_minus_the_mean_log_likelihood_of_its_rows():
    logp, mask = torch.log(torch.tensor([[0.5, 0.25], [0.5, 0.5]])), torch.ones(2, 2)
    adv = torch.tensor([1.0, -1.0])
    plain, _ = grpo.grpo_loss(logp, logp.clone(), adv, mask, vlr.Config(sft_coef=0.1))
    sft, _ = grpo.grpo_loss(logp, logp.clone(), adv, mask, vlr.Config(sft_coef=0.1), sft=(torch.tensor([True, False]), 4.0))
    assert sft.item() == pytest.approx(plain.item() - 0.1 * (logp[0].sum().item()) / 4.0)


def test_group_advantages():
    r = torch.tensor([1.0, 0, 0, 0, 0.7, 0.7, 0.7, 0.7, 0, 0, 0, 0])
    adv = grpo.group_advantages(r, 4)
    assert torch.equal(adv[4:], torch.zeros(8))  # all-equal groups: exactly zero, even 0.7s
    g = r[:4]
    expect = (g - g.mean()) / (g.std() + 1e-6)
    assert torch.allclose(adv[:4], expect)
    assert adv[0].item() == pytest.approx(1.5, rel=1e-5)  # (1 - 0.25) / 0.5
    for reward, g in ((-0.1, 8), (0.6, 8), (1.1, 10)):  # one group (a process with one prompt): the std is not 0
        assert torch.equal(grpo.group_advantages(torch.full((g,), reward), g), torch.zeros(g))
    # the published recipe (--no-adv-std): r - mean, not scaled
    assert torch.allclose(grpo.group_advantages(r, 4, std=False), torch.tensor([0.75, -0.25, -0.25, -0.25] + [0.0] * 8))


def test_lr_factor_warms_up_then_decays_by_a_cosine_to_its_floor():
    """2 warmup steps of 6, floor 0.5: (s + 1) / 2, then 0.5 + 0.25 (1 + cos(pi (s - 2) / 4))."""
    expect = [0.5, 1.0, 1.0, 0.5 + 0.25 * (1 + math.cos(math.pi / 4)), 0.75, 0.5 + 0.25 * (1 + math.cos(3 * math.pi / 4))]
    assert [grpo.lr_factor(s, 2, 6, 0.5) for s in range(6)] == pytest.approx(expect)


def run_of(model, processor, cfg, opt, ref=None, gen=None) -> grpo.Learner:
    """What the update uses, for one process on the CPU, as the trainer builds it (vlr.learner)."""
    return vlr.learner(vlr.Run(cfg=cfg, rank=0, world=1, device=torch.device("cpu"), out=None, model=model,
                               ddp=model, processor=processor, ref=grpo.Reference(ref) if ref else None, base=None, opt=opt,
                               sched=None, gen=gen or torch.Generator(), buffer=None, rethink=None, decoding=None,
                               train_set=None, test_set=None, start=0, low_format_steps=0,
                               logged=-1, log=None))


def sample(model, processor, recs, g, seed):
    return rollout.sample(model, processor, recs, g, rollout.Decoding(12), torch.Generator().manual_seed(seed))


def test_policy_update_skips_a_non_finite_step_and_takes_a_finite_one(tiny_model):
    model, processor = copy.deepcopy(tiny_model[0]), tiny_model[1]
    recs = [toy.ToyTask("train", ["colour"])[i] for i in range(2)]
    rows = rollout.split_rows(sample(model, processor, recs, 2, 0))
    cfg = vlr.Config(micro_batch=3)  # two micro-batches: accumulation is exercised too
    run = run_of(model, processor, cfg, torch.optim.AdamW(model.parameters(), lr=1e-2))
    before = [p.detach().clone() for p in model.parameters()]

    bad = grpo.policy_update(run, rows, torch.tensor([1.0, float("nan"), -1.0, 0.5]), 0)
    assert bad["skipped"] == 1
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))  # weights untouched

    good = grpo.policy_update(run, rows, torch.tensor([1.0, -1.0, 0.5, -0.5]), 0)
    assert good["skipped"] == 0 and good["logp_drift_max"] < 1e-4
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_clip_frac_is_the_share_of_the_step_s_tokens_that_the_clip_switched_off(tiny_model):
    """Two micro-batches, of 3 rows and of 1. The lone row's old log-probs are one nat below the
    policy's (rho = e > 1.2, a positive advantage: each of its tokens clipped), the others are on
    policy. The share is its tokens over all (a mean of the micro-batches' shares would be 0.5)."""
    model, processor = copy.deepcopy(tiny_model[0]), tiny_model[1]
    recs = [toy.ToyTask("train", ["colour"])[i] for i in range(2)]
    rows = rollout.split_rows(sample(model, processor, recs, 2, 0))
    rows[3].logp = rows[3].logp - 1.0
    run = run_of(model, processor, vlr.Config(micro_batch=3), torch.optim.SGD(model.parameters(), lr=0.0))
    up = grpo.policy_update(run, rows, torch.tensor([0.5, -0.5, -0.5, 0.5]), 0)
    tokens = [int(r.loss_mask.sum()) for r in rows]
    assert up["clip_frac"] == pytest.approx(tokens[3] / sum(tokens)) and up["tokens"] == sum(tokens)


@pytest.mark.parametrize("freeze_vision", [False, True])
def test_shared_vision_gives_the_per_row_gradients_with_replayed_rows(tiny_model, freeze_vision):
    """One picture encoded once per micro-batch (--share-vision) against once per row (the model's
    own forward): the same loss and parameter gradients, the tower's included, on a batch of this
    step's rows and replayed ones in two micro-batches (a group split over both)."""
    model, processor = copy.deepcopy(tiny_model[0]), tiny_model[1]
    model.model.visual.requires_grad_(not freeze_vision)
    task = toy.ToyTask("train", ["colour"])
    earlier = sample(model, processor, [task[0], task[1]], 2, 0)
    now = sample(model, processor, [task[1], task[2]], 2, 1)
    rows = rollout.split_rows(now, step=1) + [rollout.split_rows(earlier, step=0)[i] for i in (0, 3)]
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 0.8, -0.3])
    grads, ups = {}, {}
    for share in (True, False):
        cfg = vlr.Config(micro_batch=4, grad_clip=0.0, share_vision=share)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)  # weights stay
        ups[share] = grpo.policy_update(run_of(model, processor, cfg, opt), rows, adv, 1)
        grads[share] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads[True].keys() == grads[False].keys()
    assert any(n.startswith("model.visual.") and g.abs().sum() > 0 for n, g in grads[False].items()) != freeze_vision
    for name, g in grads[False].items():
        assert (grads[True][name] - g).norm() <= 1e-5 * g.norm() + 1e-9, name
    assert ups[True]["loss"] == pytest.approx(ups[False]["loss"], rel=1e-6)
    assert ups[True]["logp_drift_max"] < 1e-4 and ups[False]["logp_drift_max"] < 1e-4


def test_kl_term_uses_the_reference_and_pulls_the_policy_towards_it(tiny_model):
    model, processor = copy.deepcopy(tiny_model[0]), tiny_model[1]
    ref = copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():  # a reference that differs from the policy
        for p in ref.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    recs = [toy.ToyTask("train", ["colour"])[i] for i in range(2)]
    rows = rollout.split_rows(sample(model, processor, recs, 2, 0))
    cfg = vlr.Config(micro_batch=3, kl_coef=1.0)
    banned = rollout.special_ids(processor.tokenizer, rollout.VISION_TOKENS)
    pad = processor.tokenizer.pad_token_id

    def k3_mean():  # the k3 estimate of KL(pi || ref), mean over the trained tokens, computed here
        b = rollout.collate(rows, pad)
        with torch.no_grad():
            lp = rollout.logprobs(model, b["prompts"], b["response_ids"], b["response_mask"], 1.0, banned)
            lr = rollout.logprobs(ref, b["prompts"], b["response_ids"], b["response_mask"], 1.0, banned)
        d = lr - lp
        return float(((torch.exp(d) - d - 1) * b["loss_mask"]).sum() / b["loss_mask"].sum())

    before = k3_mean()
    assert before > 1e-3
    run = run_of(model, processor, cfg, torch.optim.AdamW(model.parameters(), lr=1e-3), ref)
    zero_adv = torch.zeros(4)  # no policy-gradient signal: the loss is the KL term alone
    up = grpo.policy_update(run, rows, zero_adv, 0)
    assert up["loss"] == pytest.approx(before, rel=1e-4)
    for _ in range(5):
        grpo.policy_update(run, rows, zero_adv, 1)
    assert k3_mean() < 0.5 * before


def test_minibatches_the_first_is_on_policy_the_later_ones_are_clipped(tiny_model, monkeypatch):
    """--minibatches 2: two optimizer steps; the ratio is 1 on every token of the first part and
    off 1 on the second, which meets the policy the first step moved."""
    model, processor = copy.deepcopy(tiny_model[0]), tiny_model[1]
    recs = [toy.ToyTask("train", ["colour"])[i] for i in range(2)]
    rows = rollout.split_rows(sample(model, processor, recs, 4, 0))
    ratios, real_loss = [], grpo.grpo_loss

    def spy(logp, old_logp, advantages, mask, *args, **kwargs):
        ratios.append(((logp.detach() - old_logp).exp() - 1).abs()[mask.bool()].max().item())
        return real_loss(logp, old_logp, advantages, mask, *args, **kwargs)

    monkeypatch.setattr(grpo, "grpo_loss", spy)
    cfg = vlr.Config(micro_batch=8, minibatches=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    steps = []
    monkeypatch.setattr(opt, "step", lambda *a, **k: steps.append(1) or torch.optim.AdamW.step(opt))
    run = run_of(model, processor, cfg, opt, gen=torch.Generator().manual_seed(0))
    up = grpo.policy_update(run, rows, torch.tensor([1.0, -1.0] * 4), 0)
    assert len(steps) == 2 and len(ratios) == 2
    assert ratios[0] < 1e-5 and ratios[1] > 1e-3
    assert up["logp_drift_max"] < 1e-4 and up["skipped"] == 0


def _one_step(rank, world, store, rows, adv, results):
    """One optimizer step of plain SGD (lr 1, no clip) on this process's share of `rows`: the
    weights' change, which is minus the gradient DDP averaged over the processes."""
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=120))  # a peer that failed: an error, not a hang
    try:
        torch.set_num_threads(1)
        model, processor = models.load_model("tiny")
        cfg = grpo.Settings(**{f.name: getattr(vlr.Config(sft_coef=1.0, grad_clip=0.0), f.name)
                               for f in dataclasses.fields(grpo.Settings)})
        forward = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
        learner = grpo.Learner(model=model, forward=forward, opt=torch.optim.SGD(model.parameters(), lr=1.0),
                               reference=None, cfg=cfg, tokenizer=processor.tokenizer, gen=torch.Generator(),
                               device=torch.device("cpu"), world=world)
        before = [p.detach().clone() for p in model.parameters()]
        mine = (slice(0, 3) if rank == 0 else slice(3, 4)) if world > 1 else slice(0, 4)  # rank 0: the SFT rows too
        grpo.optimizer_step(learner, rows[mine], adv[mine], [True] * len(rows[mine]))
        results[rank] = [p.detach() - b for p, b in zip(model.parameters(), before)]
    except Exception as e:  # reported to the test, which shows it
        results[rank] = repr(e)
    finally:
        if world > 1:
            dist.destroy_process_group()


def test_two_processes_take_the_step_one_process_takes_on_their_rows_together(tiny_model):
    """The loss is a mean over the tokens of all processes, Eq. 1's and the SFT term's alike: two
    processes with 3 rows and 1 (the two SFT rows both on the first) move the weights as one
    process with all 4. Each process's own token mean would weigh the second's row 3 times as much,
    and the SFT term half as much."""
    model, processor = tiny_model
    recs = [toy.ToyTask("train", ["colour"])[i] for i in range(2)]
    rows = rollout.split_rows(sample(model, processor, recs, 2, 0))
    rows[0].reflects = rows[1].reflects = True
    adv = torch.tensor([1.0, 0.5, -1.0, 0.5])  # rows 0 and 1: positive advantage and a reflection, the SFT rows
    with tempfile.TemporaryDirectory() as d, mp.Manager() as manager:  # the manager's process ends with it
        results = manager.dict()
        mp.spawn(_one_step, args=(2, f"{d}/store", rows, adv, results), nprocs=2)
        _one_step(0, 1, None, rows, adv, alone := {})
        assert not any(isinstance(results[r], str) for r in (0, 1)), dict(results)
        for two, one in zip(results[0], alone[0], strict=True):
            assert torch.allclose(two, one, rtol=1e-4, atol=1e-7)
