"""The synthetic toy task: questions about coloured shapes, drawn with pillow from a seed, so that
nothing needs a download. The default run, the tests and the lab train on it; `ToyTask` gives
`data.Record`s, as a data file does (data.py), so the trainer and the evaluator cannot tell them apart.
"""
import hashlib
import random

from PIL import Image, ImageDraw

from data import LETTERS, Record

# Questions about coloured shapes, answerable from pixels alone, in tiers of difficulty. With
# six colours a group of 8 responses at chance accuracy (1/6) gets all-zero rewards with
# probability (5/6)^8 = 0.23; counting and "largest" questions have five and six answers: the
# vanishing-advantage situation that Selective Sample Replay exists for (paper, Section 3.1).

# Six colours far apart in RGB: a colour the tiny model cannot tell from another is never learned,
# since a group with no right sample has no advantage to correct it (docs/lab.md, "Two choices in the toy task").
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
           "yellow": (235, 210, 40), "purple": (140, 60, 180), "black": (30, 30, 30)}
SHAPES = ("circle", "square", "triangle")
SIZE = 112  # pixels; with 14-pixel patches merged 2x2 this is 4x4 = 16 image tokens

TIERS = {  # tier -> (question, answer space); easiest first
    "colour": ("What colour is the shape?", list(COLOURS)),
    "shape": ("Which shape is in the image?", list(SHAPES)),
    "count": ("How many shapes are in the image?", ["1", "2", "3", "4", "5"]),
    "largest": ("What colour is the largest shape?", list(COLOURS)),
    # Multiple choice: the colour question with four lettered options, answered by a letter. It is
    # its own tier, the hardest: besides the colour the model must find it among the options and
    # answer with that option's letter (docs/lab.md, "Two choices in the toy task").
    "choice": ("What colour is the shape?", list(COLOURS)),
}
# Beyond the model: ViRL39K also holds questions that no sample of a group ever gets right (its
# pass-rate-0 questions), and each gives an all-wrong group, zero advantage, nothing to learn. This
# tier stands for them: the colour question about a shape in a colour outside the six, which the
# model has never named and whose answer no reward ever shows it (a group with no right sample
# has no advantage to teach it). Train on it beside a learnable tier and, however well that tier
# goes, at least its share of groups has vanishing advantages (docs/lab.md, "The lab"). It is kept out
# of TIERS: the warm start, the tokenizer's corpus and the test split stay as they were.
UNSEEN_COLOURS = {"orange": (245, 140, 20), "pink": (245, 150, 200), "brown": (125, 75, 35)}
BEYOND = {"unseen": ("What colour is the shape?", list(UNSEEN_COLOURS))}
# A second look (docs/lab.md, "A second look"): the colour tier's picture, and in the question a
# random code over the six colours, a 6-cycle listed in shuffled order ("blue > red, red > black,
# ..."). 'code' asks for the code of the shape's colour: picture -> colour -> code, what one pass of
# a 2-layer decoder can reach. 'code2' asks for the code of that code: one lookup more, which a
# continuation that sees its own first answer can make ("... \boxed{red}. Wait, ... red > blue").
# Each question's code is drawn from its spec's seed, so no other tier's stream changes; they have
# their own test stream (SECOND_LOOK_TEST_SEED) and are kept out of TIERS, like 'unseen'.
SECOND_LOOK = {"code": ("What is the code of the shape's colour?", list(COLOURS)),
               "code2": ("What is the code of the code of the shape's colour?", list(COLOURS))}
PALETTE = {**COLOURS, **UNSEEN_COLOURS}
ALL_TIERS = {**TIERS, **BEYOND, **SECOND_LOOK}  # every tier a ToyTask can hold

TEST_SEED, TRAIN_SEED = 1_000_003, 7  # two disjoint random streams
TOY_TEST_SIZE = 300  # the fixed test split: 60 questions of each tier
SECOND_LOOK_TEST_SEED = 2_000_003  # the second-look tiers' own test stream, 60 questions of each


def _draw(shapes) -> Image.Image:
    img = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    d = ImageDraw.Draw(img)
    for kind, colour, x, y, r in shapes:
        box = (x - r, y - r, x + r, y + r)
        if kind == "circle":
            d.ellipse(box, fill=PALETTE[colour])
        elif kind == "square":
            d.rectangle(box, fill=PALETTE[colour])
        else:
            d.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=PALETTE[colour])
    return img


def _scene(tier: str, rng: random.Random):
    """Random shapes (kind, colour, centre x, centre y, half-size) for one question of `tier`."""
    if tier in ("colour", "shape", "choice", "unseen", *SECOND_LOOK):  # one big shape anywhere
        r = rng.randint(22, 40)
        colours = list(UNSEEN_COLOURS if tier == "unseen" else COLOURS)
        return ((rng.choice(SHAPES), rng.choice(colours), rng.randint(r, SIZE - r), rng.randint(r, SIZE - r), r),)
    n = rng.randint(1, 5) if tier == "count" else rng.randint(2, 3)
    if tier == "largest":  # the largest is at least 5 pixels bigger than the others: no ties by eye
        big = rng.randint(14, 18)
        sizes = [big] + [rng.randint(6, big - 5) for _ in range(n - 1)]
    else:
        sizes = [rng.randint(7, 18) for _ in range(n)]
    cells = rng.sample(range(9), n)  # one shape per cell of a 3x3 grid (37 px): no overlaps
    return tuple((rng.choice(SHAPES), colour, 19 + 37 * (cell % 3), 19 + 37 * (cell // 3), r)
                 for colour, r, cell in zip(rng.sample(list(COLOURS), n), sizes, cells))


def _answer(tier: str, shapes) -> str:
    if tier in ("colour", "choice", "unseen", *SECOND_LOOK):  # the second-look tiers: what the code is applied to
        return shapes[0][1]
    if tier == "shape":
        return shapes[0][0]
    if tier == "count":
        return str(len(shapes))
    return max(shapes, key=lambda s: s[4])[1]


class ToyTask:
    """A fixed, deterministic split of toy questions; `task[i]` is a Record with a PIL image.

    The test split is the first TOY_TEST_SIZE draws of the test stream (all tiers in turn), then
    restricted to `tiers`. The train split is the first `n` draws of another stream; a train
    scene that also occurs in the test split is skipped, so the test split is never trained on."""

    def __init__(self, split: str, tiers=tuple(TIERS), n: int = 4000):
        if split not in ("train", "test"):
            raise ValueError(f"toy split must be 'train' or 'test', not '{split}'")
        for t in tiers:
            if t not in ALL_TIERS:
                raise ValueError(f"unknown toy tier '{t}'; choose from {list(ALL_TIERS)}")
        test = list(_stream(TEST_SEED, list(TIERS), TOY_TEST_SIZE))
        looks = [t for t in SECOND_LOOK if t in tiers]  # their test questions only when asked for: the default split stays
        test_looks = list(_stream(SECOND_LOOK_TEST_SEED, looks, 60 * len(looks))) if looks else []
        if split == "test":
            self.specs = [s for s in test if s[1] in tiers] + test_looks
        else:
            seen = {_key(s) for s in test + test_looks}
            self.specs = [s for s in _stream(TRAIN_SEED, list(tiers), n + len(test)) if _key(s) not in seen][:n]
        self.split = split

    def __len__(self):
        return len(self.specs)

    def identity(self) -> str:
        """What data.identity says of it: its flags make it, so its split and size are all it takes."""
        return f"the toy task's {self.split} split of {len(self)}"

    def __getitem__(self, i: int) -> Record:
        idx, tier, shapes, mc, dseed = self.specs[i]
        question, space = ALL_TIERS[tier]
        answer, choices, meta = _answer(tier, shapes), None, {}
        if tier in SECOND_LOOK:
            question, answer, meta = _coded(tier, question, answer, dseed)
        if mc:  # up to three distractors from the same answer space, in a seeded order
            rng = random.Random(dseed)
            choices = rng.sample([a for a in space if a != answer], min(3, len(space) - 1)) + [answer]
            rng.shuffle(choices)
            answer = LETTERS[choices.index(answer)]
        return Record(id=f"toy-{self.split}-{idx}", images=[_draw(shapes)], question=question,
                      answer=answer, choices=choices, category=tier, meta=meta)


def code_of(dseed: int) -> dict:
    """A second-look question's code: a random 6-cycle over the colours (colour -> its code), in the
    order the question lists it (shuffled). A cycle has no fixed point, and its square none either,
    so a colour, its code and the code of its code are three different colours."""
    rng = random.Random(dseed)
    ring = rng.sample(list(COLOURS), len(COLOURS))
    pairs = [(a, ring[(i + 1) % len(ring)]) for i, a in enumerate(ring)]
    rng.shuffle(pairs)
    return dict(pairs)


def _coded(tier: str, question: str, colour: str, dseed: int):
    """(question, answer, meta) of a second-look question about a shape of `colour`. meta["short"]
    is the answer one lookup short of the gold (code2: the code; code: the colour): what a first
    answer is when the second look is left to a continuation (eval.py's per-tier reflection
    metrics); meta["code"] the question's code."""
    code = code_of(dseed)
    listed = ", ".join(f"{a} > {b}" for a, b in code.items())
    answer, short = (code[colour], colour) if tier == "code" else (code[code[colour]], code[colour])
    return f"Code: {listed}. {question}", answer, {"short": short, "code": code}


def test_tiers(trained: list) -> list:
    """The tiers of the in-loop eval: TIERS, and every second-look tier when one is trained on (what
    a run on 'code' does with 'code2' is worth seeing)."""
    return list(TIERS) + (list(SECOND_LOOK) if set(SECOND_LOOK) & set(trained) else [])


def _stream(seed: int, tiers: list, n: int):
    """n question specs (index, tier, shapes, multiple choice?, seed of the option order)."""
    rng = random.Random(seed)
    for i in range(n):
        tier = tiers[i % len(tiers)]
        yield (i, tier, _scene(tier, rng), tier == "choice", rng.randrange(2**31))


def _key(spec) -> str:
    """What makes two questions the same: tier, scene and format (not the index)."""
    return hashlib.sha1(repr(spec[1:4]).encode()).hexdigest()
