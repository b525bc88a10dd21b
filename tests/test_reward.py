"""reward.py: answer extraction, grading across the benchmarks' answer conventions (golds plain or boxed),
the published reward shaping, and hostile input."""
import dataclasses
import signal
import threading
import time

import pytest

import latex
import reward


def score(*args, **kwargs) -> float:
    """The trainer's reward for one response."""
    return reward.grade(*args, **kwargs).reward


def boxed(answer: str) -> str:
    return f"Looking at the figure step by step, we get the result. So the answer is \\boxed{{{answer}}}."


RETHOUGHT = "The colour is \\boxed{{{}}}.\n\nWait, let's double check. Looking again at the image, \\boxed{{{}}}."

# (response, gold answer, expected accuracy)
NUMBERS = [
    (boxed("1,000"), "1000", 1.0),
    (boxed("1000.0"), "1000", 1.0),
    (boxed(".4"), "0.4", 1.0),
    (boxed("0.40"), ".4", 1.0),
    (boxed(r"\frac{1}{2}"), "0.5", 1.0),
    (boxed(r"\dfrac{1}{2}"), r"\frac{1}{2}", 1.0),
    (boxed(r"\tfrac{3}{4}"), "0.75", 1.0),
    (boxed(r"\frac12"), "0.5", 1.0),
    (boxed(r"50\%"), "50", 1.0),
    (boxed("50%"), "50", 1.0),
    (boxed(r"90^\circ"), "90", 1.0),
    (boxed(r"90^{\circ}"), "90", 1.0),
    (boxed("90°"), r"90^\circ", 1.0),
    (boxed(r"12\text{ cm}"), "12", 1.0),
    (boxed(r"12 \text{cm}^2"), "12", 1.0),
    (boxed("12 cm"), "12", 1.0),
    (boxed("3 square units"), "3", 1.0),
    (boxed("x = 5"), "5", 1.0),
    (boxed("y=-2"), "-2", 1.0),
    (boxed(r"\$12"), "12", 1.0),
    (boxed("1,234,567"), "1234567", 1.0),
    (boxed("−3"), "-3", 1.0),  # a unicode minus
    (boxed(r"\angle ABC = 30^\circ"), "30", 1.0),
    (boxed(r"\sqrt{3}"), "1.73", 1.0),  # a gold rounded to two decimals accepts the exact value
    (boxed(r"\frac{1}{3}"), "0.33", 1.0),
    (boxed(r"\pi"), "3.14", 1.0),
    (boxed(r"$\frac{\sqrt{3}}{2}$"), "0.866", 1.0),
    (boxed("0.333333"), r"\frac{1}{3}", 1.0),  # within REL_TOL
    (boxed("1.7"), "1.73", 0.0),  # a decimal answer must agree within REL_TOL, not to the gold's rounding
    (boxed("0.33"), r"\frac{1}{3}", 0.0),
    (boxed("34427"), "34426", 0.0),  # numbers written out in full compare exactly: REL_TOL would take these
    (boxed("1608.6"), "1608.5", 0.0),
    (boxed("99999"), "100000", 0.0),
    (boxed("1.0000"), "1", 1.0),
    (boxed("0.6667"), r"\frac{2}{3}", 1.0),  # 1/3 and 2/3 are not written out: within REL_TOL
    (boxed(r"\frac{1}{6}"), "0.2", 0.0),  # a gold of one significant digit gets no rounding allowance
    (boxed(r"\sqrt{5}"), "2.2", 1.0),  # two do: 2.236 rounds to 2.2
    (boxed("1{,}000"), "1000", 1.0),  # LaTeX's thousands comma, and its non-breaking space
    (boxed(r"4~\text{cm}"), "4", 1.0),
    (boxed("3"), "2", 0.0),
    (boxed("12"), "1.2", 0.0),
    (boxed("1,000"), "1", 0.0),
    (boxed("2x"), "2", 0.0),  # a variable is not a unit
    (boxed("5!"), "120", 1.0),
    (boxed("2^{10}"), "1024", 1.0),
    (boxed(r"1.2 \times 10^{3}"), "1200", 1.0),
    (boxed("0.0"), "0", 1.0),
]
EXPRESSIONS = [
    (boxed(r"2\sqrt{3}"), r"\sqrt{12}", 1.0),
    (boxed(r"\frac{x}{7}+\frac{2}{7}"), r"\frac{x+2}{7}", 1.0),
    (boxed("x^2+2x+1"), "(x+1)^{2}", 1.0),
    (boxed("(x+1)^2"), "x^2+1", 0.0),
    (boxed(r"\frac{\sqrt{2}}{2}"), r"\frac{1}{\sqrt{2}}", 1.0),
    (boxed(r"2\pi r"), r"2 r \pi", 1.0),
    (boxed(r"\sin(x)^2 + \cos(x)^2"), "1", 1.0),
    (boxed(r"\log_{2} 8"), "3", 1.0),
    (boxed(r"\ln(e^{2})"), "2", 1.0),
    (boxed(r"\sqrt[3]{27}"), "3", 1.0),
    (boxed("x_1 + x_2"), "x_{2}+x_{1}", 1.0),
    (boxed(r"3\sqrt{2}"), r"\sqrt{18}", 1.0),
    (boxed(r"2\sqrt{3}"), r"3\sqrt{2}", 0.0),
    (boxed(r"\frac{a+b}{2}"), r"\frac{a}{2}+\frac{b}{2}", 1.0),
    (boxed(r"\frac{a}{b}"), r"\frac{b}{a}", 0.0),
    (boxed("y = 2x + 1"), "2x+1", 1.0),
    (boxed(r"4\pi"), "12.57", 1.0),
    (boxed(r"\theta + \alpha"), r"\alpha+\theta", 1.0),
    (boxed("e^{x}"), r"\exp(x)", 1.0),
    (boxed(r"x \cdot y"), "yx", 0.0),  # "yx" is text, not math: only single letters are variables
]
LISTS = [
    (boxed("(1, 2)"), "(1,2)", 1.0),
    (boxed("(2, 1)"), "(1,2)", 0.0),  # tuples are ordered
    (boxed(r"(\frac{1}{2}, 3)"), "(0.5, 3)", 1.0),
    (boxed("[1, 3)"), "[1,3)", 1.0),
    (boxed("(1, 3)"), "[1,3)", 0.0),  # an open interval is not a half-open one
    (boxed(r"(-\infty, 2]"), r"(-\infty,2]", 1.0),
    (boxed(r"1 \pm \sqrt{2}"), r"1+\sqrt{2}, 1-\sqrt{2}", 1.0),
    (boxed(r"x = \pm 3"), "3, -3", 1.0),
    (boxed("-3, 3"), r"\pm 3", 1.0),
    (boxed("3"), r"\pm 3", 0.0),
    (boxed("2, 3"), "3, 2", 1.0),  # a bare list of solutions is unordered
    (boxed(r"\{1, 2\}"), "1, 2", 1.0),
]
CHOICE_LETTERS = [
    (boxed("B"), "B", 1.0),
    (boxed("(B)"), "B", 1.0),
    (boxed("B."), "B", 1.0),
    (boxed("B. 12"), "B", 1.0),
    (boxed(r"\text{B}"), "B", 1.0),
    (boxed("b"), "B", 1.0),
    (boxed("B:"), "B", 1.0),
    (boxed("B"), "(B)", 1.0),
    (boxed("(C)"), "B", 0.0),
    (boxed("Blue"), "B", 0.0),
    (boxed("A"), "B", 0.0),
]
TEXT = [
    (boxed("Yes"), "yes", 1.0),
    (boxed("no"), "Yes", 0.0),
    (boxed(r"\text{red}"), "red", 1.0),
    (boxed("Red."), "red", 1.0),
    (boxed("a circle"), "circle", 1.0),
    (boxed("circle"), "square", 0.0),
    (boxed("light blue"), "Light Blue", 1.0),
    (boxed("red"), "der", 0.0),  # words are never products of letters
    (boxed(r"\textbf{Triangle}"), "triangle", 1.0),
]
EXTRACTION = [
    (RETHOUGHT.format("red", "blue"), "blue", 1.0),  # the rethought (last) answer counts
    (RETHOUGHT.format("red", "blue"), "red", 0.0),
    (RETHOUGHT.format("3", r"\frac{6}{2}"), "3", 1.0),
    ("The answer is 5.", "5", 0.0),  # no box, no answer
    ("So \\boxed{5}. Wait, let's double check: \\boxed{6", "5", 1.0),  # the last *complete* box
    ("\\boxed{\\boxed{5}}", "5", 1.0),
    ("\\boxed {5}", "5", 1.0),
    ("\\boxed{}", "5", 0.0),
    ("\\boxed{5}" + " " * 10_000, "5", 1.0),
]
# The benchmarks' own ways of writing a gold (issue 22): MathVerse's spaces, MathVista's unicode, big exact powers
WRITTEN = [
    (boxed("0.5y^2"), "0.5 y^2", 1.0),  # a space between a number and a letter multiplies
    (boxed("36t-4t^3"), "36 t-4 t^3", 1.0),
    (boxed("36t-4t^2"), "36 t-4 t^3", 0.0),
    (boxed("0.5"), "0.5 y^2", 0.0),  # a letter after a number is a variable, not a unit...
    (boxed("4.4"), "4.4 m", 1.0),  # ...except m, g and L
    (boxed(r"2\pi"), "2 pi", 1.0),
    (boxed(r"\sqrt{2}"), "√2", 1.0),
    (boxed(r"2\sqrt{3}"), "2√{3}", 1.0),
    (boxed(r"3\pi"), "3πcm", 1.0),
    (boxed(r"30\sqrt{3}+30"), "(30√{3}+30)m", 1.0),
    (boxed(r"(-\infty, 2]"), "(-∞, 2]", 1.0),
    (boxed(r"y \leq 5"), "y≤5", 1.0),
    (boxed("9"), "3²", 1.0),
    (boxed("212"), "212°T", 1.0),  # a true bearing
    (boxed("118"), "118掳T", 1.0),  # MathVerse's mis-decoded degree sign
    (boxed("69"), "69{degrees}", 1.0),
    (boxed("4^{1012}"), "2^{2024}", 1.0),  # exact: Python's integers hold 2^2024
    (boxed("2^{2025}"), "2^{2024}", 0.0),
    (boxed("0.333333"), r"\frac{3^{1008}-1}{3^{1009}}", 1.0),  # a MathVision gold
    (boxed("49"), "x^{2}+y^{2}=49", 0.0),  # an equation is not its right side...
    (boxed("y^2+x^2=49"), "x^{2}+y^{2}=49", 1.0),  # ...but the same equation, reordered or scaled, is it
    (boxed(r"x^2+9y^2=81"), r"\frac{x^2}{81}+\frac{y^2}{9}=1", 1.0),
    (boxed(r"x^2+9y^2=80"), r"\frac{x^2}{81}+\frac{y^2}{9}=1", 0.0),
    (boxed("1131"), r"Area $=1131 \mathrm{~cm}^{2}$", 1.0),
    (boxed("5"), "5=s", 1.0),
]
# A review's cases (2026-12-07): hedged letters, mixed numbers, words that are no unit, "or" in \text,
# equations that lost their "y =", odd roots of negative numbers
REVIEWED = [
    (boxed("(A) or (B)"), "A", 0.0),
    (boxed("(A) (B) (C) (D)"), "A", 0.0),
    (boxed("A) not sure, maybe B"), "A", 0.0),
    (boxed("(A) and (B)"), "A", 0.0),
    (boxed(r"1\frac{1}{2}"), "1.5", 1.0),
    (boxed(r"1\frac{1}{2}"), "0.5", 0.0),
    (boxed(r"2\frac{1}{3}"), r"\frac{2}{3}", 0.0),
    (boxed(r"-1\frac{1}{2}"), "-1.5", 1.0),
    (boxed("5 is wrong"), "5", 0.0),
    (boxed("5 or six"), "5", 0.0),
    (boxed("12 or more"), "12", 0.0),
    (boxed(r"5\text{ or more}"), "5", 0.0),
    (boxed(r"2 \text{ or } -2"), "0", 0.0),
    (boxed(r"x = 3 \text{ or } -1"), "2", 0.0),
    (boxed("2y=4x+2"), "y=2x+1", 1.0),
    (boxed("y-2x=1"), "y=2x+1", 1.0),
    (boxed("x^2-y=0"), "y=x^2", 1.0),
    (boxed("2y=4x+3"), "y=2x+1", 0.0),
    (boxed(r"\sqrt[3]{-8}"), "-2", 1.0),
    (boxed("-2"), r"\sqrt[3]{-8}", 1.0),
    (boxed(r"\sqrt[3]{-8}"), "2", 0.0),
]
CASES = NUMBERS + EXPRESSIONS + LISTS + CHOICE_LETTERS + TEXT + EXTRACTION + WRITTEN + REVIEWED

COLOURS = ["red", "green", "blue", "yellow"]
# (response, gold answer, choices, expected accuracy): options make a letter and a text interchangeable
CHOICE_TEXTS = [
    (boxed("green"), "B", COLOURS, 1.0),
    (boxed("Green"), "B", COLOURS, 1.0),
    (boxed("red"), "B", COLOURS, 0.0),
    (boxed("A. green"), "B", COLOURS, 0.0),  # a wrong letter is wrong whatever text follows it
    (boxed("(B) or (C)"), "B", COLOURS, 0.0),  # two options named: neither
    (boxed("(A) or (B)"), "red", COLOURS, 0.0),
    (boxed("B. green"), "B", COLOURS, 1.0),  # the letter and its own text
    (boxed("B"), "green", COLOURS, 1.0),  # gold given as the option's text
    (boxed("C"), "green", COLOURS, 0.0),
    (boxed("1"), "B", ["3", "1", "5", "2"], 1.0),
    (boxed("0.5"), "A", [r"\frac{1}{2}", r"\frac{1}{3}"], 1.0),
    (RETHOUGHT.format("green", "blue"), "C", COLOURS, 1.0),
    (RETHOUGHT.format("blue", "green"), "C", COLOURS, 0.0),
    # options that are letters (MathVision 941): a letter past the last option is an option's text
    (boxed("G"), "D", ["K", "E", "N", "G", "U"], 1.0),
    (boxed("K"), "D", ["K", "E", "N", "G", "U"], 0.0),
    (boxed("D"), "D", ["K", "E", "N", "G", "U"], 1.0),
    (boxed("F"), "B", COLOURS, 0.0),
    # an option written twice (MathVista 781): either letter, and its text, is the answer
    (boxed("D"), "C", ["9", "12", "18", "18"], 1.0),
    (boxed("18"), "D", ["9", "12", "18", "18"], 1.0),
    (boxed("B"), "C", ["9", "12", "18", "18"], 0.0),
    (boxed("12"), "D", ["9", "12", "18", "18"], 0.0),
    # two right options (MathVerse 440): the same letters, in any order and dress, and no others
    (boxed("D, C"), "C, D", COLOURS + ["black"], 1.0),
    (boxed("C and D"), "C, D", COLOURS + ["black"], 1.0),
    (boxed("(c)(d)"), "C, D", COLOURS + ["black"], 1.0),
    (boxed("C"), "C, D", COLOURS + ["black"], 0.0),
    (boxed("C, D, A"), "C, D", COLOURS + ["black"], 0.0),
]

# Golds as ViRL39K writes them, wrapped in \boxed{} (braces nested inside): (response, gold, expected)
BOXED_GOLDS = [
    (boxed(r"\frac{3}{2}"), r"\boxed{\frac{3}{2}}", 1.0),
    (boxed("1.5"), r"\boxed{\frac{3}{2}}", 1.0),
    (boxed(r"\frac{2}{3}"), r"\boxed{\frac{3}{2}}", 0.0),
    (boxed(r"\frac{3}{2}"), r"\boxed{\dfrac{3}{2}}", 1.0),
    (boxed(r"\dfrac{3}{2}"), r"\boxed{1.5}", 1.0),
    (boxed("0.5"), r"\boxed{\tfrac{1}{2}}", 1.0),
    (boxed(r"2\sqrt{3}"), r"\boxed{2\sqrt{3}}", 1.0),
    (boxed(r"\sqrt{12}"), r"\boxed{2\sqrt{3}}", 1.0),
    (boxed(r"3\sqrt{2}"), r"\boxed{2\sqrt{3}}", 0.0),
    (boxed(r"\sqrt{2}"), r"\boxed{\sqrt{2}}", 1.0),
    (boxed(r"\sqrt{3}"), r"\boxed{\sqrt{2}}", 0.0),
    (boxed(r"\frac{\sqrt{3}}{2}"), r"\boxed{\frac{\sqrt{3}}{2}}", 1.0),
    (boxed("x^{2}+1"), r"\boxed{x^{2}+1}", 1.0),
    (boxed("1+x^2"), r"\boxed{x^{2}+1}", 1.0),
    (boxed("x^2-1"), r"\boxed{x^{2}+1}", 0.0),
    (boxed("30"), r"\boxed{30^{\circ}}", 1.0),
    (boxed(r"30^\circ"), r"\boxed{30^{\circ}}", 1.0),
    (boxed("30°"), r"\boxed{30^\circ}", 1.0),
    (boxed("60"), r"\boxed{30^{\circ}}", 0.0),
    (boxed("12"), r"\boxed{12\text{ cm}}", 1.0),
    (boxed(r"12 \text{cm}"), r"\boxed{12\text{ cm}}", 1.0),
    (boxed("13"), r"\boxed{12\text{ cm}}", 0.0),
    (boxed("24"), r"\boxed{24\text{cm}^2}", 1.0),
    (boxed(r"24 \text{ cm}^{2}"), r"\boxed{24 \text{cm}^2}", 1.0),
    (boxed("B"), r"\boxed{B}", 1.0),
    (boxed("(B)"), r"\boxed{\text{B}}", 1.0),
    (boxed("C"), r"\boxed{B}", 0.0),
    (boxed("-3"), r"\boxed{-3}", 1.0),
    (boxed("3"), r"\boxed{-3}", 0.0),
    (boxed("-0.5"), r"\boxed{-\frac{1}{2}}", 1.0),
    (boxed("0.25"), r"\boxed{0.25}", 1.0),
    (boxed(r"\frac{1}{4}"), r"\boxed{0.25}", 1.0),
    (boxed("0.2"), r"\boxed{0.25}", 0.0),
    (boxed(r"\sqrt{3}"), r"\boxed{1.73}", 1.0),  # the rounded-gold rule still applies inside a box
    (boxed("25"), r"\boxed{25\%}", 1.0),
    (boxed(r"25\%"), r"\boxed{25\%}", 1.0),
    (boxed("20"), r"\boxed{25\%}", 0.0),
    (boxed(r"2\pi"), r"\boxed{2\pi}", 1.0),
    (boxed("6.2832"), r"\boxed{2\pi}", 1.0),
    (boxed("3.14"), r"\boxed{\pi}", 0.0),  # a decimal answer must agree within REL_TOL
    (boxed(r"\frac{4}{3}\pi"), r"\boxed{\frac{4\pi}{3}}", 1.0),
    (boxed("(1, 2)"), r"\boxed{(1,2)}", 1.0),
    (boxed("(2, 1)"), r"\boxed{(1,2)}", 0.0),
    (boxed("[1,3)"), r"\boxed{[1, 3)}", 1.0),
    (boxed("(1,3)"), r"\boxed{[1, 3)}", 0.0),
    (boxed(r"(-\infty, 2]"), r"\boxed{(-\infty, 2]}", 1.0),
    (boxed("1, 2"), r"\boxed{\{1, 2\}}", 1.0),
    (boxed("5"), r"\boxed{3} and then \boxed{5}", 1.0),  # a gold with two boxes: the last counts
    (boxed("3"), r"\boxed{3} and then \boxed{5}", 0.0),
    (boxed(r"\frac{3}{2}"), r"\boxed{ \frac{3}{2} }", 1.0),  # spaces inside the box
    (boxed(r"\frac{3}{2}"), r"\boxed {\frac{3}{2}}", 1.0),
    (boxed("5"), r"$\boxed{x = 5}$", 1.0),
    (boxed("yes"), r"\boxed{\text{Yes}}", 1.0),
    (boxed("no"), r"\boxed{\text{Yes}}", 0.0),
    (boxed("1000"), r"\boxed{1,000}", 1.0),
    (boxed("8"), r"\boxed{8\,\mathrm{cm}^{2}}", 1.0),
    (boxed(r"\frac{1}{2}"), r"\boxed{\boxed{\frac{1}{2}}}", 1.0),  # a box in a box
    (boxed(r"\boxed{\frac{1}{2}}"), "0.5", 1.0),  # the same on the response's side
]
# (response, gold, choices, expected): a boxed gold letter or option text still meets the other form
BOXED_GOLD_CHOICES = [
    (boxed("green"), r"\boxed{B}", COLOURS, 1.0),
    (boxed("red"), r"\boxed{B}", COLOURS, 0.0),
    (boxed("B"), r"\boxed{\text{B}}", COLOURS, 1.0),
    (boxed("B"), r"\boxed{green}", COLOURS, 1.0),
    (boxed("C"), r"\boxed{green}", COLOURS, 0.0),
    (boxed("1.5"), r"\boxed{B}", [r"\boxed{\frac{2}{3}}", r"\boxed{\frac{3}{2}}"], 1.0),  # boxed options too
    (boxed("A"), r"\boxed{\frac{3}{2}}", [r"\frac{3}{2}", r"\frac{2}{3}"], 1.0),
    (boxed("B"), r"\boxed{\frac{3}{2}}", [r"\frac{3}{2}", r"\frac{2}{3}"], 0.0),
]


def test_there_are_enough_cases():
    assert len(CASES) + len(CHOICE_TEXTS) >= 80
    assert len(BOXED_GOLDS) + len(BOXED_GOLD_CHOICES) >= 30


@pytest.mark.parametrize("response,answer,expected", CASES)
def test_every_plain_gold_grades_the_same_when_boxed(response, answer, expected):
    assert reward.accuracy(response, f"\\boxed{{{answer}}}") == expected


def test_latex_equivalent_compares_math_only():
    assert latex.equivalent(r"2\sqrt{3}", r"\sqrt{12}")
    assert latex.equivalent(r"\frac{x+2}{7}", r"\frac{x}{7}+\frac{2}{7}")
    assert not latex.equivalent("1.7", "1.73")
    assert latex.equivalent("1.7", "1.73", abs_tol=0.05)
    assert not latex.equivalent("red", "red")  # not math: reward.py settles text answers
    assert not latex.equivalent("9" * 1000, "1")


@pytest.mark.parametrize("response,answer,expected", CASES + BOXED_GOLDS)  # boxed golds: unwrapped like a response
def test_accuracy(response, answer, expected):
    assert reward.accuracy(response, answer) == expected


@pytest.mark.parametrize("response,answer,choices,expected", CHOICE_TEXTS + BOXED_GOLD_CHOICES)
def test_accuracy_with_choices(response, answer, choices, expected):
    assert reward.accuracy(response, answer, choices) == expected


def test_extract_answer():
    assert reward.extract_answer(r"first \boxed{1}, then \boxed{\frac{1}{2}} done") == r"\frac{1}{2}"
    assert reward.extract_answer(r"\boxed{\{1, 2\}}") == r"\{1, 2\}"  # escaped braces are text
    # a line break \\ is text: the brace after it closes the box, or groups
    assert reward.extract_answer(r"\boxed{5 \\} so") == r"5 \\" and reward.extract_answer(r"\boxed{a\\{b}}") == r"a\\{b}"
    assert all(score(boxed(answer), "5") == 1.0 for answer in (r"5 \\", r"\\ 5", r" \\5\\ \\ "))
    assert reward.extract_answer(r"\boxed{ red }") == "red"
    assert reward.extract_answer("no box here") is None
    assert reward.extract_answer(r"\boxed{unclosed") is None
    assert reward.extract_answer(None) is None
    assert reward.has_boxed(r"so \boxed{B}") and not reward.has_boxed(r"so B, \boxed{B")


def test_reward_is_accuracy_unless_a_format_coefficient_is_given():
    assert score(boxed("green"), "B", COLOURS) == 1.0
    assert score(boxed("red"), "B", COLOURS) == 0.0
    assert score("The answer is B.", "B", COLOURS) == 0.0
    assert score("The answer is B.", "B", COLOURS, invalid_penalty=0.1) == -0.1
    assert score(boxed("red"), "B", COLOURS, invalid_penalty=0.1) == 0.0
    assert score(boxed("B"), "B", COLOURS, invalid_penalty=0.1) == 1.0
    # cut off by the length cap: invalid even with a right box in it
    assert score(boxed("B"), "B", COLOURS, finished=False, invalid_penalty=0.1) == -0.1
    assert score(boxed("B"), "B", COLOURS, finished=False) == 1.0  # the paper's plain reward
    looping = "Wait. " * 6 + boxed("B")
    assert score(looping, "B", COLOURS, invalid_penalty=0.1) == -0.1
    assert score("Wait. " * 5 + boxed("B"), "B", COLOURS, invalid_penalty=0.1) == 1.0


def test_grade_returns_every_verdict_at_once():
    assert reward.grade(boxed("green"), "B", COLOURS) == reward.Grade(correct=True, reward=1.0, boxed=True, valid=True)
    assert reward.grade(boxed("red"), "B", COLOURS) == reward.Grade(correct=False, reward=0.0, boxed=True, valid=True)
    assert reward.grade("The answer is B.", "B", COLOURS, invalid_penalty=0.1) == reward.Grade(
        correct=False, reward=-0.1, boxed=False, valid=False)
    assert reward.grade(boxed("B"), "B", finished=False, invalid_penalty=0.1) == reward.Grade(
        correct=True, reward=-0.1, boxed=True, valid=False)
    assert reward.grade(None, "B") == reward.Grade(correct=False, reward=0.0, boxed=False, valid=False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        reward.grade(boxed("B"), "B").reward = 2.0


PUBLISHED = {"reflection_bonus": 0.1, "wait_penalty": 0.2, "invalid_penalty": 0.1}  # experience_maker.py


def reflecting(*phrases: str, answer: str = "B") -> str:
    """A response that reflects with each of `phrases` before its final answer."""
    return "The colour is red. " + " ".join(f"{p} let me look again." for p in phrases) + " " + boxed(answer)


# (response, expected reward under the published shaping): 1 or 2 reflections earn 1.1, more cost 0.2
# each (1.0 - 0.2 n), floored at the invalid score -0.1; "Wait." is no reflection in the published count
SHAPED = [
    (reflecting(), 1.0),
    (reflecting("Wait,"), 1.1),
    (reflecting("wait a moment,"), 1.1),
    (reflecting("Wait,", "Alternatively,"), 1.1),
    (reflecting("Wait,", "Wait,", "Alternatively,"), 0.4),
    (reflecting(*["Wait,"] * 4), 0.2),
    (reflecting(*["Alternatively,"] * 5), 0.0),
    (reflecting(*["Alternatively,"] * 6), -0.1),  # 1.0 - 1.2, floored
    (reflecting(*["Wait,"] * 6), -0.1),  # six "wait"s: invalid
    (reflecting("Wait.", "Wait.", "Wait."), 1.0),
    (reflecting("Wait,", answer="C"), 0.0),  # wrong answers are not shaped
    (reflecting(*["Wait,"] * 3, answer="C"), 0.0),
]


@pytest.mark.parametrize("response,expected", SHAPED)
def test_the_published_wait_shaping(response, expected):
    assert score(response, "B", COLOURS, **PUBLISHED) == pytest.approx(expected)
    assert reward.grade(response, "B", COLOURS, **PUBLISHED).reward == pytest.approx(expected)


def test_the_wait_shaping_is_off_by_default_and_each_part_is_separate():
    one, three = reflecting("Wait,"), reflecting("Wait,", "Wait,", "Wait,")
    assert score(one, "B", COLOURS) == 1.0
    assert score(three, "B", COLOURS) == 1.0
    assert score(one, "B", COLOURS, reflection_bonus=0.1) == pytest.approx(1.1)
    assert score(three, "B", COLOURS, reflection_bonus=0.1) == 1.0
    assert score(three, "B", COLOURS, wait_penalty=0.2) == pytest.approx(0.4)
    six = reflecting(*["Alternatively,"] * 6)
    assert score(six, "B", COLOURS, wait_penalty=0.2) == 0.0  # floored at 0.0, the invalid score here


def test_a_forced_rethinking_response_is_not_shaped():
    assert score(reflecting("Wait,"), "B", COLOURS, forced_waits=1, **PUBLISHED) == 1.0
    assert score(reflecting(*["Wait,"] * 3), "B", COLOURS, forced_waits=1, **PUBLISHED) == 1.0
    assert score(reflecting("Wait,", answer="C"), "B", COLOURS, forced_waits=1, **PUBLISHED) == 0.0


def test_an_invalid_response_gets_the_penalty_even_with_a_bonus():
    # the published code gives this one 1.1; here the invalid penalty comes first (see _right_reward)
    assert score(reflecting("Wait,"), "B", COLOURS, finished=False, **PUBLISHED) == -0.1
    assert score(reflecting("Wait,"), "B", COLOURS, finished=False, reflection_bonus=0.1) == pytest.approx(1.1)


HOSTILE = [
    r"\boxed{9^{9^{9^{9}}}}",
    r"\boxed{100000!}",
    r"\boxed{(99!)!}",
    r"\boxed{2^{10000}}",
    r"\boxed{10^{10^{10}}}",
    r"\boxed{(10^{300})^{300}}",
    r"\boxed{(2^{999})^{999}}",
    r"\boxed{((((x^{999})^{999})^{999})^{999})}",
    r"\boxed{x^{x^{x^{x}}}}",
    r"\boxed{e^{e^{e^{e^{e}}}}}",
    r"\boxed{\sin(10^{999})}",
    r"\boxed{\tan(\frac{\pi}{2})}",
    r"\boxed{1/0}",
    "\\boxed{" + "2^{999}" * 40 + "}",
    "\\boxed{" + "9" * 100_000 + "}",
    "9" * 100_000,
    "\\boxed{" + "{" * 50_000 + "1" + "}" * 50_000 + "}",
    "\\boxed{" + "(" * 140 + "1" + ")" * 140 + "}",
    "\\boxed{" + "\\sqrt{" * 40 + "2" + "}" * 40 + "}",
    "\\boxed{" + "\\frac{1}{" * 40 + "2" + "}" * 40 + "}",
    "\\boxed{" * 50_000,
    "\\boxed{{}" * 30_000 + "}",
    "\\boxed{" + "-" * 250 + "2}",
    r"\boxed{__import__('os').system('touch pwned')}",
    r"\boxed{open('pwned', 'w').write('x')}",
    r"\boxed{exec(\"open('pwned', 'w')\")}",
    r"\boxed{eval(compile('import os', 'x', 'exec'))}",
    r"\boxed{().__class__.__bases__[0].__subclasses__()}",
    r"\boxed{\input{/etc/passwd}}",
    r"\boxed{\write18{touch pwned}}",
    r"\boxed{2^{10001}}",  # past MAX_POW_BITS: refused, where 2^{2024} is computed exactly
    r"\boxed{(2^{5000})^{3}}",
    r"\boxed{2^{2^{14}}}",
    "\\boxed{" + "2^{9999}" * 36 + "}",  # 36 exact 10,000-bit powers, multiplied
    "\\boxed{" + "9" * 299 + "}",  # the longest number an answer can hold
    "\\boxed{" + "9" * 150 + "^{" + "9" * 140 + "}}",
    "\\boxed{" + "x=" * 140 + "1}",
    "\\boxed{" + "\\left(" * 30 + "1" + "\\right)" * 30 + "}",
    "\\boxed{" + "√" * 140 + "0}",
    "\\boxed{" + "x^{" * 40 + "2" + "}" * 40 + "}",
]


@pytest.mark.parametrize("response", HOSTILE, ids=[f"hostile{i}" for i in range(len(HOSTILE))])
def test_hostile_input_scores_zero_quickly_and_touches_nothing(response, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    start = time.perf_counter()
    assert reward.accuracy(response, "1") == 0.0
    assert score(response, "1", invalid_penalty=0.1) in (0.0, -0.1)
    assert time.perf_counter() - start < 1.0
    assert list(tmp_path.iterdir()) == []


def test_timer_is_a_backstop_and_leaves_nothing_armed(monkeypatch):
    def spin(*args):
        while True:
            pass

    monkeypatch.setattr(latex, "equivalent", spin)  # the value comparison never returns
    before = signal.getsignal(signal.SIGALRM)
    start = time.perf_counter()
    assert reward.accuracy(boxed("\\frac{1}{2}"), "0.5") == 0.0
    assert time.perf_counter() - start < 1.0
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    assert signal.getsignal(signal.SIGALRM) is before


def test_an_armed_timer_is_left_alone():
    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *a: fired.append(1))
    signal.setitimer(signal.ITIMER_REAL, 100.0)
    try:
        assert reward.accuracy(boxed(r"\frac{x+2}{7}"), r"\frac{x}{7}+\frac{2}{7}") == 1.0
        assert 99.0 < signal.getitimer(signal.ITIMER_REAL)[0] <= 100.0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert fired == []


def test_works_off_the_main_thread():
    results = []
    worker = threading.Thread(target=lambda: results.extend(
        [reward.accuracy(boxed(r"2\sqrt{3}"), r"\sqrt{12}"), reward.accuracy(HOSTILE[0], "1")]))
    worker.start()
    worker.join(timeout=5)
    assert results == [1.0, 0.0]
