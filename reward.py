"""Rewards: what a response is graded on, what counts as right, and what is penalised.

The reward is the only signal RL gets, so a grader that calls a right answer wrong (or the other
way round) teaches the model the wrong thing. And the text it grades is model output: hostile input.

The grading pipeline (`grade`, once per response; `accuracy` and `reward` read from it):
  1. `extract_answer`: the content of the last complete \\boxed{...}; a rethought response revises
     its answer, so the last box counts. No box, no answer (score 0): the prompt asks for a box, the
     paper's code requires one in training, and a fallback such as "the last number in the text"
     would reward guessing. A gold answer (or option) written in a box, as ViRL39K writes every
     answer (\\boxed{\\frac{3}{2}}), is unwrapped the same way; a box inside the answer is too.
  2. Multiple choice: a gold letter ("B") meets the predicted letter in its usual dresses (B, (B),
     B., B. 12, \\text{B}, b) or, when the options are given, the text of option B (a letter past the
     last option is a text: "G" among the options K, E, N, G, U; two options of one text are one
     answer). A gold of several letters ("C, D": MathVerse's questions with two right options)
     meets a prediction that names the same options (D, C; C and D; CD).
  3. Both strings are normalised: $, \\text{}, \\left/\\right, spacing, degrees, percent signs,
     units after a number, thousands separators and a leading "x =" go; \\dfrac and \\tfrac become
     \\frac. Equal strings (ignoring case and spaces) match: that settles the text answers (yes, red).
  4. Otherwise both must be the same math: `latex.equivalent` parses a LaTeX subset with its own
     parser (model text never reaches eval or sympify) and compares values: numbers written out in
     full exactly, others numerically within latex.REL_TOL; a gold written as a rounded decimal of
     two or more significant digits (1.73) also accepts the exact value (\\sqrt{3}).
  5. The reward: 1 for a right answer, 0 for a wrong one; optionally -invalid_penalty for a response
     that is not valid (cut by the cap, unboxed, or looping: more than MAX_WAITS `waits`), and the
     published code's shaping by the number of native reflections (`reflections`).

Every call is bounded: a response over MAX_RESPONSE_CHARS has no answer and extraction is one linear
scan; an answer over MAX_ANSWER_CHARS is wrong (no final answer is that long); latex.py bounds the
math it parses (see its docstring); and a timer (TIME_LIMIT_S, main thread only) stops whatever is
left. Any failure scores as a wrong answer.
"""
import contextlib
import json
import random
import re
import signal
import threading
import time
from dataclasses import dataclass

import latex
import phases

MAX_RESPONSE_CHARS = 100_000
MAX_ANSWER_CHARS = 300
TIME_LIMIT_S = 0.5
MAX_WAITS = 5  # a valid response says "wait" at most this often (the published rule)
BONUS_WAITS = 2  # with reflection_bonus, 1 or 2 native reflections earn it; 3 or more meet wait_penalty


def extract_answer(response: str) -> str | None:
    """The stripped content of the last complete \\boxed{...}, braces balanced; None if there is none.

    One linear scan keeps a stack of open braces, noting which ones open a box; "last" is by where
    the box closes. Escaped braces \\{ \\} are text, not grouping; a line break \\\\ is text too, so
    the brace after it groups (`\\boxed{5 \\\\}` holds `5 \\\\`)."""
    if not isinstance(response, str) or len(response) > MAX_RESPONSE_CHARS:
        return None
    stack, last = [], None
    for m in re.finditer(r"\\boxed\s*\{|\\\\|\\[{}]|[{}]", response):
        tok = m.group()
        if tok.startswith("\\boxed"):
            stack.append(m.end())
        elif tok == "{":
            stack.append(None)
        elif tok == "}" and stack:
            start = stack.pop()
            if start is not None:
                last = (start, m.start())  # indices, not a slice: slicing every box would be quadratic
    return None if last is None else response[last[0]:last[1]].strip()


def has_boxed(response: str) -> bool:
    """True when the response has a complete \\boxed{...} answer (the trainer logs the rate)."""
    return extract_answer(response) is not None


@dataclass(frozen=True)
class Grade:
    """One response, graded once: the trainer learns from `reward` and logs the rest."""
    correct: bool  # its last boxed answer matches the gold answer
    reward: float  # the training signal (see `grade`)
    boxed: bool  # it has a complete \boxed{} answer
    valid: bool  # it ended by itself, has a box and does not loop (at most MAX_WAITS `waits`)


@phases.phase
def grade(response: str, answer: str, choices: list[str] | None = None, finished: bool = True, *,
          invalid_penalty: float = 0.0, reflection_bonus: float = 0.0, wait_penalty: float = 0.0,
          forced_waits: int = 0) -> Grade:
    """Grade one response against the gold `answer`. Never raises.

    With `choices` (the option texts, gold "A" meaning choices[0]) a letter and an option's text are
    interchangeable on either side. The reward is -invalid_penalty for a response that is not valid
    (only when invalid_penalty is set), else 0.0 when wrong, else `_right_reward`: 1.0, shaped by the
    response's native reflections when reflection_bonus or wait_penalty is set. `finished`: the
    response ended with a stop token, not at the length cap. `forced_waits`: how many "wait"s a
    Forced Rethinking trigger put into the response; a forced response is not shaped."""
    # VL-Rethinker's reward is binary correctness with no format term: "a simple binary reward
    # signal is used to indicate the correctness of a response" (paper, Section 3.1). The released
    # code (TIGER-AI-Lab/VL-Rethinker, experience_maker.py) has its format bonuses commented out
    # ("not using fmt reward") but scores -0.1 instead of 0 for an invalid response: no end-of-text
    # token, no \boxed, or more than five "wait"s. invalid_penalty=0.1 reproduces that; 0.0 is the
    # paper's text. The penalty matters: without it a response that rambles to the length cap
    # scores the same 0 as a wrong answer, nothing pushes the policy to stop, and on the toy task
    # responses grow until the format is gone (see README, "the reward"). That code also shapes a
    # right answer's reward by its native "wait"s, which the paper does not describe:
    # reflection_bonus=0.1, wait_penalty=0.2 reproduce it (see _right_reward); 0.0 leaves it out.
    pred = extract_answer(response)
    correct = pred is not None and _is_right(pred, answer, choices)
    valid = finished and pred is not None and waits(response) <= MAX_WAITS
    if invalid_penalty and not valid:
        score = -invalid_penalty
    elif correct:
        score = _right_reward(response, invalid_penalty, reflection_bonus, wait_penalty, forced_waits)
    else:
        score = 0.0
    return Grade(correct=correct, reward=score, boxed=pred is not None, valid=valid)


def grader(invalid_penalty: float, reflection_bonus: float, wait_penalty: float):
    """grade(text, record, finished, forced) under the run's reward settings: the trainer's one
    call per response (forced: a Forced Rethinking continuation, whose trigger is one "wait")."""
    return lambda text, rec, finished, forced: grade(
        text, rec.answer, rec.choices, finished, invalid_penalty=invalid_penalty,
        reflection_bonus=reflection_bonus, wait_penalty=wait_penalty, forced_waits=int(forced))


def accuracy(response: str, answer: str, choices: list[str] | None = None) -> float:
    """1.0 if the response's last boxed answer matches the gold `answer`, else 0.0. Never raises."""
    return float(grade(response, answer, choices).correct)


def waits(text: str) -> int:
    """How many times `text` says "wait", in any case: more than MAX_WAITS is a rethinking loop
    (the published validity rule), and Forced Rethinking keeps no response with more than
    --rethink-max-waits (rethink.keep_rethought). Not `reflections`, the published bonus's count."""
    return text.lower().count("wait")


def _is_right(pred: str, answer: str, choices: list[str] | None) -> bool:
    """Does the extracted answer match the gold? Within TIME_LIMIT_S; any failure is a no."""
    try:
        with time_limit(TIME_LIMIT_S):
            return _matches(pred, str(answer), [str(c) for c in choices or []])
    except Exception:  # a bound hit, the timer, or input no parser expects: not a right answer
        return False


class _Timeout(Exception):
    """The grading call ran past TIME_LIMIT_S."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise _Timeout after `seconds`, behind the static bounds (latex.py), which do not bound
    every input alone. Python runs signal handlers in the main thread only, so elsewhere this does
    nothing: grade on the main thread, as the trainer and eval.py do. It also stands aside when a
    real-time timer is already armed (someone else's), and on the way out it disarms its timer and
    puts the previous handler back."""
    if (threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer")
            or signal.getitimer(signal.ITIMER_REAL)[0] > 0):
        yield
        return

    def on_alarm(signum, frame):
        raise _Timeout

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        try:
            signal.setitimer(signal.ITIMER_REAL, 0)
        finally:
            signal.signal(signal.SIGALRM, previous if previous is not None else signal.SIG_DFL)


# A self-reflection as the published code counts it (below): "wait," "wait a" or "alternatively".
_REFLECTION = re.compile(r"wait,|wait a|alternatively", re.IGNORECASE)


def reflections(text: str) -> int:
    """How many self-reflections `text` has, as the published code counts them (see _right_reward)."""
    return len(_REFLECTION.findall(text))


def _right_reward(response: str, invalid_penalty: float, reflection_bonus: float, wait_penalty: float,
                  forced_waits: int) -> float:
    """A right answer's reward: 1.0, with the published shaping by native reflections.

    TIGER-AI-Lab/VL-Rethinker @ dd2c17d, openrlhf/trainer/ppo_utils/experience_maker.py: the
    reflections of a first-round response are counted in RemoteExperienceMaker._generate_vllm
    (num_wait_round0: lower-cased counts of "wait,", "wait a" and "alternatively"), and
    RemoteExperienceMaker.get_logprobs_and_logs shapes the reward of a right answer that Forced
    Rethinking did not replace: 1 or 2 reflections score 1.1; otherwise 1.0 - 0.2 per reflection,
    floored at the invalid score -0.1 (3 score 0.4, 5 score 0.0). Here reflection_bonus is the 0.1,
    wait_penalty the 0.2, BONUS_WAITS the 2, and the floor -invalid_penalty. One difference: there the
    bonus also lifts an invalid response (cut at the length cap) to 1.1; here an invalid response
    scores -invalid_penalty whatever its answer, as it does without the shaping."""
    n = 0 if forced_waits else reflections(response)  # forced: not shaped (published)
    if n == 0:
        return 1.0
    if n <= BONUS_WAITS:
        return 1.0 + reflection_bonus
    return max(1.0 - wait_penalty * n, -invalid_penalty if invalid_penalty else 0.0)


# ---------------------------------------------------------------------------------------------
# Matching: unwrap, multiple choice, normalised strings, then values (latex.equivalent)
# ---------------------------------------------------------------------------------------------

def _unbox(s: str) -> str:
    """The content of the last complete \\boxed{} in `s` (a box inside it unwrapped too), or `s`
    itself without one: so a gold written as ViRL39K writes it, \\boxed{\\frac{3}{2}}, meets the
    prediction in the same form as a plain gold, nested braces and all."""
    for _ in range(3):  # \boxed{\boxed{x}}; each pass is one linear scan
        inner = extract_answer(s)
        if inner is None:
            return s
        s = inner
    return s


_LETTER = re.compile(r"\(?([A-Za-z])(?:[).:]|$)(?=\s|$)")  # B, (B), B), B., B: and B. 12 -- not "Blue", "B 12", "S.A."
# After a letter, what names more than one option: "(A) or (B)", "(A) (B) (C) (D)", "A) not sure, maybe B"
_HEDGE = re.compile(r"(?i:\b(?:or|and|maybe|perhaps)\b)|(?<![\w\\])[A-Z](?![\w'])")


def _choice_index(s: str, gold: bool, options=()) -> int | None:
    """The option `s` names by letter (0 for A), else None. A gold letter must be upper case:
    a lower-case gold like "x" is an answer, not an option. A prediction whose letter is followed
    by more than its option's text and that names another letter or hedges names no one option."""
    m = _LETTER.match(s)
    if m is None or (gold and not m.group(1).isupper()):
        return None
    i, rest = ord(m.group(1).upper()) - ord("A"), s[m.end():]
    own = i < len(options) and _text_key(rest) == _text_key(options[i])
    return None if not gold and not own and _HEDGE.search(rest) else i


def _letter_set(s: str, gold: bool) -> frozenset | None:
    """The options a gold of several letters names (upper case, separated: "C, D"), or that a
    prediction names ("D, C", "C and D", "CD", "(c)(d)"); None for anything else."""
    if gold and not re.fullmatch(r"[A-J](?:\s*,\s*[A-J])+", s):
        return None
    letters = re.sub(r"\band\b|[\s,;&()]", "", s, flags=re.IGNORECASE).upper()
    return frozenset(letters) if re.fullmatch(r"[A-J]{2,}", letters) else None


def _matches(pred: str, gold: str, options: list[str]) -> bool:
    if len(pred) > MAX_ANSWER_CHARS:  # no final answer is that long; and it bounds all the work below
        return False
    pred, gold, options = clean(pred), clean(gold), [clean(o) for o in options]
    if not pred or not gold:
        return False
    if (several := _letter_set(gold, gold=True)) is not None:
        return _letter_set(pred, gold=False) == several
    g, p = _choice_index(gold, gold=True), _choice_index(pred, gold=False, options=options)
    if p is not None and 0 < len(options) <= p:  # no option has that letter: an option's text (MathVision: K, E, N, G, U)
        p = None
    if g is not None:
        keys = [_text_key(o) for o in options]  # an option's own text names it: "0.2 - 0.4" is not "0 - 0.2" (= -0.2)
        same = g < len(keys) and keys[g]  # an option written twice is one answer (MathVista: 9, 12, 18, 18)
        if p is not None:
            return p == g or bool(same) and p < len(keys) and keys[p] == same
        if _text_key(pred) in keys:
            return bool(same) and _text_key(pred) == same
        return g < len(options) and _equivalent(pred, options[g])
    if p is not None and p < len(options):  # the gold is an option's text and the prediction its letter
        return _equivalent(options[p], gold)
    return _equivalent(pred, gold)


_DROP = re.compile(r"\\[,;:! {}\[\]]|\\q?quad(?![a-zA-Z])|\\(?:left|right|displaystyle)(?![a-zA-Z])"
                   r"|(?:\^\s*\{?\s*\\circ\s*\}?|\\circ|\\degree|°)(?:\s*T(?![a-zA-Z]))?|\\?%|\\?\$")  # 212°T: a bearing
_UNIT_TEXT = re.compile(r"(?:(?<=[\d}.])|(?<=\\pi))\s*(?:\\(?:text|mathrm|mbox)\s*\{(?![^{}]*\b(?:or|and|not)\b)[^{}]*\}"
                        r"|\{[a-zA-Z]{3,}\}$)"
                        r"(?:\s*\^\s*\{?[23]\}?)?")  # 12\text{ cm}^2, 69{degrees}
_WRAPPER = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|boxed)\s*\{([^{}]*)\}")
# Words after a number are its unit ("3 square units", "4.4 m"), but a single letter is a variable, as MathVerse
# writes "0.5 y^2" and "36 t-4 t^3" (only m, g and L are units; m also glued on: 4.4m, 10√{3}m); a word of the math
# subset (pi, sin) is math; a word that changes what the number says ("5 or more", "5 is wrong") is no unit.
_NOT_UNIT = r"(?:sqrt|pi|sin|cos|tan|cot|sec|csc|arc\w+|ln|log|exp|or|and|not|nor|is|are|more|less|than|to|plus|minus" \
            r"|times|over|maybe|but|either|least|most)\b"
_UNIT_WORDS = re.compile(rf"(?:(?<=\d)\s+(?!{_NOT_UNIT})"
                         rf"(?:[a-zA-Z]{{2,}}|[mgL])\.?(?:\s+(?!{_NOT_UNIT})[a-zA-Z]+\.?){{0,2}}"
                         r"|(?:(?<=[\d})])|(?<=\\pi))\s*(?:cm|mm|km|kg|ft|inches|feet|(?:square |cubic )?units?"
                         r"|degrees?|dollars?|meters?|metres?|hours?|minutes?|seconds?|m))(?:\s*\^\s*\{?[23]\}?|²|³)?$")
# The signs the benchmarks write in unicode (MathVista's options: 2√{3}, 3πcm, 100°; MathVerse's "118掳T" is its
# mis-decoded degree sign), as the LaTeX the parser reads; a trailing space ends a command before a letter (πcm).
_UNICODE = str.maketrans({"−": "-", "–": "-", "×": "*", "·": "*", "⋅": "*", "÷": "/", "π": "\\pi ",
                          "√": "\\sqrt ", "∞": "\\infty ", "±": "\\pm ", "≤": "\\leq ", "≥": "\\geq ", "≠": "\\neq ",
                          "≈": "\\approx ", "∪": "\\cup ", "∠": "\\angle ", "²": "^2", "³": "^3", "掳": "°",
                          "\u2009": " ", "\u00a0": " ", "~": " "})
# What may stand left of "=" in a value's name: Area, S.A. of rectangular prism, y_2, f(x), (x, y)
_NAME = re.compile(r"[a-zA-Z\\. ]{0,30}(?:_\{?\w+\}?)?\s*(?:\(\s*[a-z]\s*(?:,\s*[a-z]\s*)*\))?\s*")
_DECIMAL = re.compile(r"-?\d*\.(\d+)")
_MIXED = re.compile(r"(?<![\w.}^_])(\d+)\s*\\frac\{(\d+)\}\{(\d+)\}")  # 1\frac{1}{2}: a mixed number, 1.5
_NUMBER = re.compile(r"-?(?:\d+\.?\d*|\.\d+)")


def clean(s: str) -> str:
    """Step 3 (the module's docstring), first half: an answer or option without its box (`_unbox`)
    and its LaTeX dress: $, spacing, \\left/\\right, degrees, %, \\text{...} and friends."""
    s = _unbox(s).translate(_UNICODE).strip()
    while s[:2] == "\\\\" or s[-2:] == "\\\\":  # a line break: 5 \\ (a loop: a regex for it is quadratic in spaces)
        s = s.removeprefix("\\\\").removesuffix("\\\\").strip()
    s = _DROP.sub("", s).replace("{,}", ",")  # 1{,}000: LaTeX's thousands comma
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = re.sub(r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}", s)  # \frac12
    s = _MIXED.sub(lambda m: f"({m[1]}+\\frac{{{m[2]}}}{{{m[3]}}})" if int(m[2]) < int(m[3]) else m[0], s)
    s = _UNIT_TEXT.sub("", s)
    for _ in range(3):  # innermost first: \text{\textbf{B}}
        s = _WRAPPER.sub(r"\1", s)
    return " ".join(s.split()).rstrip(".").strip()


def normalize(s: str) -> str:
    """Step 3, second half: reduce a `clean` answer to its value: drop a leading "x =", units and
    thousands commas."""
    s = s.replace("\\approx", "=")
    if s.count("=") == 1:  # "x = 5", "\angle ABC = 30", "Area = 9\pi", "5 = s": the answer is the value, but
        lhs, rhs = s.split("=")  # "x^2+y^2=49" is an equation, not 49 (latex.py compares equations)
        if _NAME.fullmatch(lhs):
            s = rhs.strip()
        elif _NAME.fullmatch(rhs):
            s = lhs.strip()
    s = _UNIT_WORDS.sub("", s)
    if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):  # 1,000,000 but not (1,000) or "1, 2"
        s = s.replace(",", "")
    return s.rstrip(".").strip()


def _text_key(s: str) -> str:
    return "".join(re.sub(r"^(?:the|a|an)\s+", "", s.lower()).split())


def _equivalent(pred: str, gold: str) -> bool:
    written = pred, gold
    pred, gold = normalize(pred), normalize(gold)
    if _text_key(pred) == _text_key(gold):
        return True
    if ("=" in pred) != ("=" in gold) and all(w.count("=") == 1 for w in written):  # y=2x+1 lost its "y =", 2y=4x+2
        return latex.equivalent(*written)  # did not: both are equations, compared as relations
    # A gold written as a rounded decimal (MathVista's "1.73") accepts an exact answer that rounds to
    # it (\sqrt{3}); a decimal answer still has to agree within latex.REL_TOL, so 1.7 is not 1.73. A gold
    # of one significant digit (0.2) says too little: 1/6 rounds to it, and 0.2 is more likely exact.
    abs_tol = 0.0
    if (m := _DECIMAL.fullmatch(gold)) and not _NUMBER.fullmatch(pred) and len(gold.lstrip("-0.").replace(".", "")) > 1:
        abs_tol = 0.5 * 10.0 ** -len(m.group(1))
    return latex.equivalent(pred, gold, abs_tol)


if __name__ == "__main__":  # the grading rate on 10,000 typical responses, about half of them right
    rng = random.Random(0)
    colours = ["red", "green", "blue", "yellow", "purple", "orange"]

    def typical():  # (final answer, gold, choices) in one of the shapes the benchmarks and the toy task use
        n, d, k, c = rng.randint(1, 500), rng.randint(2, 12), rng.randint(1, 9), rng.sample(colours, 4)
        return rng.choice([
            (c[1], "B", c), ("B", "B", c), (c[0], c[0], None), (str(k), str(k), None),
            (f"{n}^\\circ", str(n), None), (f"\\frac{{{n}}}{{{d}}}", f"{n / d:.4f}", None),
            (f"{n}\\text{{ cm}}", str(n), None), (f"{k}\\sqrt{{{d}}}", f"\\sqrt{{{k * k * d}}}", None),
            (f"\\frac{{x+{k}}}{{{d}}}", f"\\frac{{x}}{{{d}}}+\\frac{{{k}}}{{{d}}}", None),
            (f"({k}, {n})", f"({k},{n})", None)])

    cases = []
    for _ in range(10_000):
        pred, gold, choices = typical()
        if rng.random() < 0.5:  # a wrong answer: the final answer of another typical response
            pred = typical()[0]
        first = rng.choice(colours + [str(rng.randint(0, 99))])
        response = ("Let me look at the image. The figure shows the shapes and the labelled lengths. " * 6
                    + f"So the answer is \\boxed{{{first}}}.\n\nWait, let's double check. "
                    + "Looking again at each part of the figure, step by step. " * 4 + f"\\boxed{{{pred}}}.")
        cases.append((response, gold, choices))
    start = time.perf_counter()
    graded = [accuracy(r, g, c) for r, g, c in cases]
    seconds = time.perf_counter() - start
    print(json.dumps({"graded": len(graded), "seconds": round(seconds, 3), "per_s": round(len(graded) / seconds, 1)}))
