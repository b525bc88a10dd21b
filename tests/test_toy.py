"""toy.py: the toy task's splits, answers and tiers."""
import pytest

import data
import toy


def test_toy_splits_are_deterministic_and_disjoint():
    train, test = toy.ToyTask("train", n=3000), toy.ToyTask("test")
    assert len(test) == toy.TOY_TEST_SIZE and len(train) == 3000
    assert data.identity(test) == "the toy task's test split of 300"  # what a checkpoint holds (vlr.check_same_data)
    assert [s for s in toy.ToyTask("test").specs] == test.specs  # same questions every time
    assert train.specs[:50] == toy.ToyTask("train", n=50).specs
    question = lambda spec: repr(spec[1:4])  # tier, scene and format: what makes two questions the same
    assert not {question(s) for s in test.specs} & {question(s) for s in train.specs}
    # the same image pixels are drawn every time
    assert list(test[3].images[0].tobytes()) == list(toy.ToyTask("test")[3].images[0].tobytes())


def test_toy_answers_follow_from_the_picture():
    test = toy.ToyTask("test")
    for i in range(len(test)):
        rec = test[i]
        _, space = toy.TIERS[rec.category]
        assert bool(rec.choices) == (rec.category == "choice")  # multiple choice is a tier of its own
        if rec.choices:
            assert len(rec.choices) == 4 and rec.answer in data.LETTERS[:4]
            assert set(rec.choices) <= set(space) and len(set(rec.choices)) == len(rec.choices)
        else:
            assert rec.answer in space
    assert {t: sum(test[i].category == t for i in range(len(test))) for t in toy.TIERS} == {t: 60 for t in toy.TIERS}
    # colour and choice tiers: the answer is the colour of most non-white pixels
    for i in range(len(test)):
        rec = test[i]
        if rec.category in ("colour", "choice"):
            colour = rec.choices[data.LETTERS.index(rec.answer)] if rec.choices else rec.answer
            assert _top_colour(rec.images[0]) == toy.COLOURS[colour]


def _top_colour(img) -> tuple:
    """The RGB of most non-white pixels."""
    raw = img.tobytes()
    pixels = [tuple(raw[k:k + 3]) for k in range(0, len(raw), 3) if raw[k:k + 3] != b"\xff\xff\xff"]
    return max(set(pixels), key=pixels.count)


def test_unseen_tier_asks_for_a_colour_no_other_tier_answers():
    """The 'unseen' tier (pass rate 0 by construction): its answer is the shape's colour, read
    back from the pixels, and is never an answer of a tier the model learns to name; it stays out
    of the test split; trained beside 'colour', it is every second question."""
    train = toy.ToyTask("train", ("colour", "unseen"), n=200)
    named = {a for _, space in toy.TIERS.values() for a in space}
    assert [train[i].category for i in range(6)] == ["colour", "unseen"] * 3
    for i in range(len(train)):
        rec = train[i]
        top = _top_colour(rec.images[0])
        if rec.category == "unseen":
            assert rec.answer not in named and top == toy.UNSEEN_COLOURS[rec.answer]
            assert rec.question == toy.TIERS["colour"][0]  # the same question as the learnable tier
        else:
            assert top == toy.COLOURS[rec.answer]
    assert {train[i].answer for i in range(1, 200, 2)} == set(toy.UNSEEN_COLOURS)
    mix = toy.ToyTask("train", ("colour", "unseen", "unseen"), n=300)  # a tier named twice comes twice as often
    assert [mix[i].category for i in range(300)] == ["colour", "unseen", "unseen"] * 100
    assert "unseen" not in {r.category for r in toy.ToyTask("test")}
    with pytest.raises(ValueError, match="unknown toy tier 'mauve'.*'unseen'"):
        toy.ToyTask("train", ("mauve",))


def test_toy_chance_groups_often_have_equal_rewards():
    """At chance (1/6 on colours), a group of 8 is all-wrong with probability (5/6)^8 ~ 0.23."""
    p_all_wrong = (1 - 1 / len(toy.TIERS["colour"][1])) ** 8
    assert 0.2 < p_all_wrong < 0.3
