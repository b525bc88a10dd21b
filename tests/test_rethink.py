"""rethink.py: Forced Rethinking's rules (pure functions) and its mechanism on the tiny model.

A rethought response is checked token by token: the first response cut at k, the trigger, a
continuation that stopped; its log-probs against the trainer's forward and a plain reference
(helpers.check_logprobs), so that the continued KV cache is shown to mask exactly the cut tail."""
import gc
import itertools
import weakref

import pytest
import torch

import reward
import rethink
import rollout
import tracking
from helpers import RECORDS, TOL, always_right, check_logprobs, is_stop

pytestmark = pytest.mark.usefixtures("one_thread")


def rules(**kw):
    """Rethinking rules with a 64-token continuation budget, the rest as given or vlr.py's defaults."""
    return rethink.RethinkConfig(max_new_tokens=64, **kw)


# ---------------------------------------------------------------------------------------------
# The rules: who is triggered, where the cut falls, what is kept
# ---------------------------------------------------------------------------------------------

def test_who_rethinks_low_accuracy_groups_wrong_stopped_responses_by_coin():
    cfg = rules(max_group_acc=0.5, only_wrong=True, frac=0.5)
    # G = 4: group 0 at accuracy 0.25, group 1 at 0.75 (too sure: none), group 2 at 0.5
    correct = [True, False, False, False, True, True, True, False, True, True, False, False]
    stopped = [True, True, False, True, True, True, True, True, True, True, True, True]
    coins = [0.0, 0.1, 0.2, 0.9, 0.0, 0.0, 0.0, 0.0, 0.3, 0.3, 0.49, 0.5]
    # row 0 right, row 2 truncated, row 3 lost its coin; group 1 too sure; rows 10 in, 11 lost (0.5 is not < 0.5)
    assert rethink.who_rethinks(correct, stopped, 4, cfg, coins) == [1, 10]
    everyone = rules(max_group_acc=1.0, only_wrong=False, frac=1.0)
    assert rethink.who_rethinks(correct, stopped, 4, everyone, coins) == [i for i in range(12) if i != 2]
    assert rethink.who_rethinks(correct, stopped, 4, cfg, [1.0] * 12) == []
    why = rethink.why_not_triggered(correct, stopped, 4, cfg, coins)
    assert why == ["right: only wrong answers are rethought", "", "cut by the cap: no answer to check",
                   "not drawn: coin 0.90 >= 0.5"] + ["group accuracy 0.75 > 0.5"] * 4 + [
                   "right: only wrong answers are rethought"] * 2 + ["", "not drawn: coin 0.50 >= 0.5"]


def candidate(row, correct=True, stopped=True, text="A red circle. \\boxed{red}", n=10):
    return rethink.Rethought(row=row, ids=torch.zeros(n, dtype=torch.long), logp=torch.zeros(n),
                             loss_mask=torch.ones(n), text=text, stopped=stopped,
                             grade=reward.Grade(correct=correct, reward=float(correct), boxed=True, valid=True),
                             continuation=text, new_tokens=n)


def test_keep_rethought_right_sane_within_the_cap_at_most_max_replace_per_prompt():
    cfg = rules(max_waits=2, max_replace=2)
    cands = [candidate(0), candidate(1, correct=False), candidate(2, stopped=False),
             candidate(3, text="Wait wait WAIT"), candidate(4, n=21), candidate(5),  # prompt 0 (G = 8): rows 0-7
             candidate(6), candidate(7),  # prompt 0 already has two replaced: 6 and 7 are over the cap
             candidate(8, text="Wait, wait. \\boxed{red}"), candidate(9)]  # prompt 1: two waits is fine
    assert rethink.keep_rethought(cands, 8, cfg, max_len=20) == [True, False, False, False, False, True, False, False,
                                                                 True, True]
    assert rethink.why_not_kept(cands, 8, cfg, max_len=20) == [
        "", "wrong answer", "the continuation did not stop by itself", "3 waits > 2", "21 tokens > the cap of 20", "",
        "its prompt already has 2 replaced", "its prompt already has 2 replaced", "", ""]
    assert not any(rethink.keep_rethought([candidate(0)], 8, rules(max_replace=0), max_len=20))
    assert all(rethink.keep_rethought([candidate(r) for r in range(5)], 8, rules(max_replace=-1),
                                      max_len=20))


def test_keep_rethought_as_published_long_enough_continuations_with_at_most_three_reflections():
    cfg = rules(max_waits=3, min_new_tokens=30, count_markers=True, max_replace=-1)

    def cont(row, text, new_tokens=31, correct=True):
        c = candidate(row, correct=correct, text="first. Wait" + text, n=10)
        c.continuation, c.new_tokens = text, new_tokens
        return c

    cands = [cont(0, "ok \\boxed{1}"), cont(1, "ok", new_tokens=30),  # 30 is not > 30
             cont(2, "wait, wait a sec, alternatively, wait, \\boxed{1}"),  # 4 reflections
             cont(3, "wait, wait a bit, alternatively \\boxed{1}"),  # 3: kept; the trigger's "Wait" is not counted
             cont(4, "fine", correct=False), cont(5, "fine"), cont(6, "fine")]  # no cap per prompt
    assert rethink.keep_rethought(cands, 8, cfg, max_len=20) == [True, False, False, True, False, True, True]
    assert rethink.why_not_kept(cands, 8, cfg, max_len=20)[1:3] == ["a 30-token continuation (> 30 needed)",
                                                                     "4 waits > 3"]


def test_cut_point(tok):
    def kept(text):
        body = tok.encode(text, add_special_tokens=False)
        k = rethink.cut_point(tok, body)
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
        return text[:rethink.cut_at(text, "published")]

    assert kept("I see red.\n\nSo the answer is \\boxed{red}.") == "I see red."  # answer, then the blank line
    assert kept("First \\boxed{1}. Wait, no: \\boxed{2}") == "First"  # Wait, then \boxed, then stripped
    assert kept("The answer: maybe. Or the answer is \\boxed{3}") == "The"  # the FIRST "answer"
    assert kept("Red.\n\nBlue.") == "Red."
    assert kept("nothing to cut") == "nothing to cut"
    assert kept("wait, lower case is not cut") == "wait, lower case is not cut"
    assert rethink.cut_at("a \\boxed{b}", "answer") == 2 and rethink.cut_at("ab", "answer") == 2
    with pytest.raises(ValueError):
        rethink.cut_at("x", "first")


def cut_text(tok, body):
    """Independent statement of the cut: the kept text ends before the last "\\boxed"."""
    text = tok.decode(body)
    at = text.rfind("\\boxed")
    k = next(k for k in range(len(body) + 1) if k == len(body) or len(tok.decode(body[:k + 1])) > at)
    return k


# ---------------------------------------------------------------------------------------------
# The mechanism: continuing the parked KV cache
# ---------------------------------------------------------------------------------------------

EVERYONE = dict(max_group_acc=1.0, only_wrong=False, frac=1.0, max_waits=100, max_replace=2)


def first_pass(tiny_model, max_new_tokens=64, leave_at=rollout.LEAVE_AT, seed=3, g=2):
    """A rollout with its caches parked, every response graded right (every group is eligible)."""
    model, processor = tiny_model
    how = rollout.Decoding(max_new_tokens, temperature=1.0, leave_at=leave_at)
    ro = rollout.sample(model, processor, RECORDS, g, how, torch.Generator().manual_seed(seed), park=True)
    return ro, [always_right() for _ in ro.texts]


def bodies(ro):
    """Each row's first response without its stop token."""
    return [ro.response_ids[i, :int(ro.response_mask[i].sum()) - 1].tolist() for i in range(len(ro.texts))]


def rethink_rollout(tiny_model, train_trigger, cut_prob=1.0, cut=None, max_new_tokens=64):
    """Every stopped response triggered (always_right makes every group eligible and every
    rethought response right) and kept; with `cut(body) -> k` given, the cuts are planned by the
    test instead of by `cut_point`. Returns (first rollout, Rethinking, [(body, k)] per triggered row)."""
    model, processor = tiny_model
    ro, grades = first_pass(tiny_model, max_new_tokens)
    cfg = rules(cut_prob=cut_prob, train_trigger=train_trigger, **EVERYONE)
    forced = None
    if cut is not None:
        tok, triggers = processor.tokenizer, itertools.cycle(rethink.TRIGGERS)
        forced = [rethink.Forced(i, cut(body), tok.encode(next(triggers), add_special_tokens=False))
                  for i, body in enumerate(bodies(ro)) if not ro.truncated[i]]
    done = rethink.rethink(model, processor.tokenizer, ro, grades, always_right, cfg, forced)
    return ro, done, [(bodies(ro)[f.row], f.keep) for f in done.forced]


def test_the_first_pass_caches_are_freed_before_the_continuation_decodes(tiny_model, monkeypatch):
    """rethink holds one KV cache at the peak: when the continuation's decode starts, nothing holds
    the parked caches of the first pass any more."""
    model, processor = tiny_model
    ro, grades = first_pass(tiny_model)
    parked = [weakref.ref(x) for _, _, kv in ro.caches.parked.parts for layer in kv for x in layer]
    alive, decode = [], rollout.decode

    def spy(*args, **kw):
        gc.collect()
        alive.append(sum(ref() is not None for ref in parked))
        return decode(*args, **kw)

    monkeypatch.setattr(rollout, "decode", spy)
    done = rethink.rethink(model, processor.tokenizer, ro, grades, always_right, rules(**EVERYONE))
    assert int(done.triggered.sum()) > 0 and alive == [0] and len(parked) >= 4


def test_fixed_is_a_triggered_response_whose_first_answer_was_wrong_and_whose_rethought_one_is_right(tiny_model):
    """rethink_fixed's count: every second first answer graded wrong, every continuation right."""
    model, processor = tiny_model
    ro, right = first_pass(tiny_model)
    first_wrong = torch.tensor([i % 2 == 0 for i in range(len(ro.texts))])
    grades = [reward.Grade(correct=False, reward=0.0, boxed=True, valid=True) if w else g
              for w, g in zip(first_wrong.tolist(), right)]
    done = rethink.rethink(model, processor.tokenizer, ro, grades, always_right, rules(**EVERYONE))
    assert (done.triggered & first_wrong).any() and (done.triggered & ~first_wrong).any()
    assert torch.equal(done.fixed, done.triggered & first_wrong)


def check_rethought(tok, done, cuts, train_trigger):
    """Each rethought response is: the first response's body cut at k + a trigger + a continuation
    that stopped; loss mask 0 exactly on the trigger when it is not trained."""
    ro = done.rollout
    triggers = [tok.encode(t, add_special_tokens=False) for t in rethink.TRIGGERS]
    triggered = done.triggered.nonzero().flatten().tolist()
    assert len(triggered) == len(cuts) == int((~ro.truncated).sum()) and done.kept.equal(done.triggered)
    for i, (body, k) in zip(triggered, cuts):
        n = int(ro.response_mask[i].sum())
        ids = ro.response_ids[i, :n].tolist()
        assert done.first_texts[i] == tok.decode(body, skip_special_tokens=True)
        assert ids[:k] == body[:k]
        trig = max((t for t in triggers if ids[k:k + len(t)] == t), key=len)  # "\n\nWait" begins them all
        m = len(trig)
        assert is_stop(tok, ids[-1]) and not any(is_stop(tok, t) for t in ids[:-1])
        expect_loss = [1.0] * k + [float(train_trigger)] * m + [1.0] * (n - k - m)
        assert ro.loss_mask[i, :n].tolist() == expect_loss and (ro.loss_mask[i, n:] == 0).all()
        trig_text = rethink.TRIGGERS[triggers.index(trig)]
        assert ro.texts[i] == (tok.decode(body[:k], skip_special_tokens=True) + trig_text
                               + tok.decode(ids[k + m:], skip_special_tokens=True))
    # the samples a run shows (tracking.py): the cut and the trigger marked where they are in the tokens
    shown = tracking.rethink_samples(done.rethought, done.why_not_kept, len(cuts), step=7)
    assert [s["row"] for s in shown] == triggered
    for s, i, (body, k) in zip(shown, triggered, cuts):
        ids = ro.response_ids[i, :int(ro.response_mask[i].sum())].tolist()
        trig = max((t for t in triggers if ids[k:k + len(t)] == t), key=len)
        first, rest = s["text"].split(tracking.CUT)
        trigger, continuation = rest.split(tracking.MODEL)
        assert first == tok.decode(body[:k], skip_special_tokens=True) and trigger == tok.decode(trig)
        assert continuation == tok.decode(ids[k + len(trig):], skip_special_tokens=True)
        assert s["kept"] and s["why_not_kept"] == "" and s["correct"] and s["step"] == 7


def test_rethought_responses_cut_before_the_answer(tiny_model, tok, banned):
    """Cut by the real rule; trigger tokens not trained."""
    first, done, cuts = rethink_rollout(tiny_model, train_trigger=False)
    assert len(cuts) >= 4
    check_rethought(tok, done, cuts, train_trigger=False)
    for body, k in cuts:
        assert k == cut_text(tok, body) < len(body)  # the toy responses all end in \boxed{...}
        assert tok.decode(body[k:]).lstrip().startswith("\\boxed")
    check_logprobs(*tiny_model, done.rollout, RECORDS, 2, 1.0, banned)
    assert first.texts != done.rollout.texts and first.caches is not None  # what it was handed is unchanged
    assert done.rollout.caches is None


def test_rethought_logprobs_at_any_cut(tiny_model, tok, banned):
    """Cuts at 0 (the trigger right after the prompt), 1, the middle and the end (nothing cut):
    the reused KV cache must mask exactly the dropped tail."""
    ks = itertools.cycle([0, 1, None, -1])

    def cut(body):
        k = next(ks)
        return len(body) // 2 if k is None else len(body) if k == -1 else k

    _, done, cuts = rethink_rollout(tiny_model, train_trigger=True, cut=cut)
    assert {k for _, k in cuts} >= {0, 1} and any(k == len(b) for b, k in cuts)
    check_rethought(tok, done, cuts, train_trigger=True)
    check_logprobs(*tiny_model, done.rollout, RECORDS, 2, 1.0, banned)


def test_rethought_responses_longer_than_the_cap_are_not_kept(tiny_model):
    """The cap holds for every final response. With the whole first response kept (no cut), most
    rethought responses cannot fit in 20 tokens: those keep their first response. (At a cap of 64
    every triggered response of this rollout is kept: see check_rethought.)"""
    _, done, cuts = rethink_rollout(tiny_model, train_trigger=True, cut_prob=0.0, max_new_tokens=20)
    ro = done.rollout
    assert len(cuts) >= 4 and int(done.triggered.sum()) == len(cuts) and all(k == len(b) for b, k in cuts)
    assert (ro.response_mask.sum(1) <= 20).all()
    assert int(done.kept.sum()) < len(cuts)  # the rule bit
    for i in (done.triggered & ~done.kept).nonzero().flatten().tolist():
        assert done.first_texts[i] is None and not any(t.strip() in ro.texts[i] for t in rethink.TRIGGERS)
    # what it returns of each triggered row: the rethought response, kept or not, and why not
    assert [c.row for c in done.rethought] == [f.row for f in done.forced] and len(done.why_not_kept) == len(cuts)
    for c, why in zip(done.rethought, done.why_not_kept):
        expect = ("the continuation did not stop by itself" if not c.stopped
                  else f"{len(c.ids)} tokens > the cap of 20" if len(c.ids) > 20 else "")
        assert why == expect and (why == "") == bool(done.kept[c.row]) == (ro.texts[c.row] == c.text)
    # the samples a run shows: the rejected ones too, with why
    shown = tracking.rethink_samples(done.rethought, done.why_not_kept, 100, step=0)
    assert [(s["row"], s["kept"], s["why_not_kept"]) for s in shown] == [
        (c.row, not why, why) for c, why in zip(done.rethought, done.why_not_kept)]
    cut = "cut by the cap: no answer to check"
    assert done.why_not_triggered == ["" if t else cut for t in done.triggered.tolist()]


def test_rethinking_continues_rows_that_left_the_decode_batch_alike(tiny_model):
    """Rows that left the first pass's decode batch at different steps (rollout.LEAVE_AT) are
    continued from their parked caches exactly as rows that stayed to the end."""
    model, processor = tiny_model
    cfg = rules(cut_prob=0.5, **EVERYONE)
    out = {}
    for leave in (float("inf"), rollout.LEAVE_AT):
        ro, grades = first_pass(tiny_model, leave_at=leave, g=4)
        gen = ro.caches.sampling.generator
        out[leave] = rethink.rethink(model, processor.tokenizer, ro, grades, always_right, cfg), gen.get_state()
    (a, state_a), (b, state_b) = out.values()
    for key in ("response_ids", "response_mask", "loss_mask", "truncated"):
        assert torch.equal(getattr(a.rollout, key), getattr(b.rollout, key)), key
    assert torch.equal(a.triggered, b.triggered) and torch.equal(a.kept, b.kept) and int(b.kept.sum()) >= 4
    assert a.rollout.texts == b.rollout.texts and a.first_texts == b.first_texts and torch.equal(state_a, state_b)
    assert (a.rollout.logp - b.rollout.logp).abs().max() <= TOL


@pytest.mark.parametrize("temperature", [0.9, 0.5])
def test_continuations_are_drawn_at_the_rethinking_temperature_and_recorded_at_the_training_one(
        tiny_model, banned, monkeypatch, temperature):
    """Every token of a continuation is drawn at cfg.temperature (0.9 as published: EM
    `_generate_vllm`), while its log-probs are the first pass's training distribution's (1.0),
    which check_logprobs recomputes with the trainer's forward."""
    model, processor = tiny_model
    ro, grades = first_pass(tiny_model)
    drawn_at, pick = [], rollout.pick

    def spy(logits, temp, *args, **kw):
        drawn_at.append(temp)
        return pick(logits, temp, *args, **kw)

    monkeypatch.setattr(rollout, "pick", spy)
    cfg = rules(cut_prob=1.0, temperature=temperature, **EVERYONE)
    done = rethink.rethink(model, processor.tokenizer, ro, grades, always_right, cfg)
    assert int(done.kept.sum()) >= 4 and len(drawn_at) >= 8 and set(drawn_at) == {temperature}
    check_logprobs(*tiny_model, done.rollout, RECORDS, 2, 1.0, banned)
