"""Rewards: grade a response's final \\boxed{} answer against the gold answer, exactly and safely.

The reward is the only signal RL gets, so a grader that calls a right answer wrong (or the other
way round) teaches the model the wrong thing. And the text it grades is model output: hostile input.

The grading pipeline (`accuracy`):
  1. `extract_answer`: the content of the last complete \\boxed{...}; a rethought response revises
     its answer, so the last box counts. No box, no answer (score 0): the prompt asks for a box, the
     paper's code requires one in training, and a fallback such as "the last number in the text"
     would reward guessing.
  2. Multiple choice: a gold letter ("B") meets the predicted letter in its usual dresses (B, (B),
     B., B. 12, \\text{B}, b) or, when the options are given, the text of option B.
  3. Both strings are normalised: $, \\text{}, \\left/\\right, spacing, degrees, percent signs,
     units after a number, thousands separators and a leading "x =" go; \\dfrac and \\tfrac become
     \\frac. Equal strings (ignoring case and spaces) match: that settles the text answers (yes, red).
  4. Both are parsed by our own tokenizer and recursive-descent parser for a LaTeX subset (numbers,
     single letters, + - * / ^ !, \\frac, \\sqrt, \\pi, trig and log functions, \\pm, tuples and
     intervals), which builds the sympy objects itself: model text never reaches eval, exec,
     sympify or parse_expr, and anything outside the whitelist is simply not math.
  5. Values are compared numerically, in plain double precision: constants directly, expressions
     at random points (identity testing), both within REL_TOL. Neither sympy's simplify nor its
     evalf is called: nothing bounds their run time (evalf chases precision: cos(10^{999^x}) never
     returns), and for this subset agreement at random points decides the same question.

Safety bounds, checked before sympy does any work; they are what keeps every call under a second:
  - a response over MAX_RESPONSE_CHARS has no answer, and extraction is one linear scan;
  - an answer over MAX_ANSWER_CHARS characters is wrong (no final answer is that long); one over
    MAX_TOKENS tokens or nested deeper than MAX_DEPTH is not parsed; a number has at most MAX_DIGITS;
  - a constant exponent is at most MAX_EXPONENT in size, a constant power at most 2^MAX_POW_BITS,
    exponents nest at most MAX_POW_NESTING deep (9^{9^{9^9}} stops here), n! needs n <= MAX_FACTORIAL,
    and a function's constant argument must fit a double (sympy may evaluate log(cos(e^{9!})) to
    learn its sign, at a precision that grows with the argument: seconds).
Behind them, in the main thread, a timer (TIME_LIMIT_S) stops whatever is left. Any failure scores 0.0.
"""
import cmath
import contextlib
import math
import random
import re
import signal
import threading

import sympy

MAX_RESPONSE_CHARS = 100_000
MAX_ANSWER_CHARS = 300
MAX_TOKENS = 150
MAX_DEPTH = 20  # nested brackets, braces and macro arguments
MAX_DIGITS = 40
MAX_EXPONENT = 1000
MAX_POW_BITS = 1000  # a constant power fits a double (below 2^1024)
MAX_POW_NESTING = 2
MAX_FACTORIAL = 100
MAX_VALUES = 8  # items of a list like "1, 2, 3", with both signs of each \pm
REL_TOL = 1e-4  # "1.0000" is 1 and "0.33333" is 1/3, but "0.33" is not 1/3 (see _equivalent for golds like 0.33)
N_POINTS = 3  # random points an expression with variables is evaluated at
TIME_LIMIT_S = 0.5
MAX_WAITS = 5  # a valid response says "wait" at most this often (the published rule)


def extract_answer(response: str) -> str | None:
    """The stripped content of the last complete \\boxed{...}, braces balanced; None if there is none.

    One linear scan keeps a stack of open braces, noting which ones open a box; "last" is by where
    the box closes. Escaped braces \\{ \\} are text, not grouping."""
    if not isinstance(response, str) or len(response) > MAX_RESPONSE_CHARS:
        return None
    stack, last = [], None
    for m in re.finditer(r"\\boxed\s*\{|\\[{}]|[{}]", response):
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


def accuracy(response: str, answer: str, choices: list[str] | None = None) -> float:
    """1.0 if the response's last boxed answer matches the gold `answer`, else 0.0. Never raises.

    With `choices` (the option texts, gold "A" meaning choices[0]) a letter and an option's text are
    interchangeable on either side."""
    try:
        with _time_limit(TIME_LIMIT_S):
            pred = extract_answer(response)
            return float(pred is not None and _matches(pred, str(answer), [str(c) for c in choices or []]))
    except Exception:  # a bound hit, the timer, or input no parser expects: not a right answer
        return 0.0


def is_valid(response: str, finished: bool = True) -> bool:
    """A well-formed response: it ended by itself (`finished`: a stop token, not the length cap),
    has a \\boxed{} answer, and says "wait" at most MAX_WAITS times (more is a rethinking loop)."""
    return finished and has_boxed(response) and response.lower().count("wait") <= MAX_WAITS


def reward(response: str, answer: str, choices: list[str] | None = None, finished: bool = True,
           invalid_penalty: float = 0.0) -> float:
    """The trainer's reward for one response: its accuracy, or -invalid_penalty when not `is_valid`."""
    # VL-Rethinker's reward is binary correctness with no format term: "a simple binary reward
    # signal is used to indicate the correctness of a response" (paper, Section 3.1). The released
    # code (TIGER-AI-Lab/VL-Rethinker, experience_maker.py) has its format bonuses commented out
    # ("not using fmt reward") but scores -0.1 instead of 0 for an invalid response: no end-of-text
    # token, no \boxed, or more than five "wait"s. invalid_penalty=0.1 reproduces that; 0.0 is the
    # paper's text. The penalty matters: without it a response that rambles to the length cap
    # scores the same 0 as a wrong answer, nothing pushes the policy to stop, and on the toy task
    # responses grow until the format is gone (see README, "the reward"). (That code also nudges
    # correct rewards by the number of "wait"s, which the paper does not describe; left out here.)
    if invalid_penalty and not is_valid(response, finished):
        return -invalid_penalty
    return accuracy(response, answer, choices)


# ---------------------------------------------------------------------------------------------
# Matching: multiple choice, then normalised strings, then values
# ---------------------------------------------------------------------------------------------

_LETTER = re.compile(r"\(?([A-Za-z])(?:[).:]|$)")  # B, (B), B), B., B: and B. 12 -- not "Blue" or "B 12"


def _choice_index(s: str, gold: bool) -> int | None:
    """The option `s` names by letter (0 for A), else None. A gold letter must be upper case:
    a lower-case gold like "x" is an answer, not an option."""
    m = _LETTER.match(s)
    if m is None or (gold and not m.group(1).isupper()):
        return None
    return ord(m.group(1).upper()) - ord("A")


def _matches(pred: str, gold: str, options: list[str]) -> bool:
    if len(pred) > MAX_ANSWER_CHARS:  # no final answer is that long; and it bounds all the work below
        return False
    pred, gold, options = _clean(pred), _clean(gold), [_clean(o) for o in options]
    if not pred or not gold:
        return False
    g, p = _choice_index(gold, gold=True), _choice_index(pred, gold=False)
    if g is not None:
        if p is not None:
            return p == g
        return g < len(options) and _equivalent(pred, options[g])
    if p is not None and p < len(options):  # the gold is an option's text and the prediction its letter
        return _equivalent(options[p], gold)
    return _equivalent(pred, gold)


_DROP = re.compile(r"\\[,;:! {}]|\\q?quad(?![a-zA-Z])|\\(?:left|right|displaystyle)(?![a-zA-Z])"
                   r"|\^\s*\{?\s*\\circ\s*\}?|\\circ|\\degree|°|\\?%|\\?\$")
_UNIT_TEXT = re.compile(r"(?<=[\d}])\s*\\(?:text|mathrm|mbox)\s*\{[^{}]*\}(?:\^\{?[23]\}?)?")  # 12\text{ cm}^2
_WRAPPER = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|boxed)\s*\{([^{}]*)\}")
_UNIT_WORDS = re.compile(r"(?<=\d)(?:\s+[a-zA-Z]+\.?(?:\s+[a-zA-Z]+\.?){0,2}|\s*(?:cm|mm|km|kg|ft|inches|feet|units?"
                         r"|degrees?|dollars?|meters?|hours?|minutes?|seconds?))(?:\^\{?[23]\}?|²|³)?$")
_UNICODE = str.maketrans({"−": "-", "×": "*", "·": "*", "÷": "/", "π": "\\pi"})
_DECIMAL = re.compile(r"-?\d*\.(\d+)")
_NUMBER = re.compile(r"-?(?:\d+\.?\d*|\.\d+)")


def _clean(s: str) -> str:
    """Strip the LaTeX dress: $, spacing, \\left/\\right, degrees, %, \\text{...} and friends."""
    s = _DROP.sub("", s.translate(_UNICODE))
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = re.sub(r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}", s)  # \frac12
    s = _UNIT_TEXT.sub("", s)
    for _ in range(3):  # innermost first: \text{\textbf{B}}
        s = _WRAPPER.sub(r"\1", s)
    return " ".join(s.split()).rstrip(".").strip()


def _normalize(s: str) -> str:
    """Reduce a cleaned answer to its value: drop a leading "x =", units and thousands commas."""
    s = s.replace("\\approx", "=")
    if s.count("=") == 1:
        lhs, rhs = s.split("=")
        if len(lhs) <= 20 and "," not in lhs:  # "x = 5", "\angle ABC = 30": the answer is the right side
            s = rhs.strip()
    s = _UNIT_WORDS.sub("", s)
    if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):  # 1,000,000 but not (1,000) or "1, 2"
        s = s.replace(",", "")
    return s.rstrip(".").strip()


def _text_key(s: str) -> str:
    return "".join(re.sub(r"^(?:the|a|an)\s+", "", s.lower()).split())


def _equivalent(pred: str, gold: str) -> bool:
    pred, gold = _normalize(pred), _normalize(gold)
    if _text_key(pred) == _text_key(gold):
        return True
    p, g = _parse(pred), _parse(gold)
    if p is None or g is None:
        return False
    # A gold written as a rounded decimal (MathVista's "1.73") accepts an exact answer that rounds to
    # it (\sqrt{3}); a decimal answer still has to agree within REL_TOL, so 1.7 is not 1.73.
    abs_tol = 0.0
    if (m := _DECIMAL.fullmatch(gold)) and not _NUMBER.fullmatch(pred):
        abs_tol = 0.5 * 10.0 ** -len(m.group(1))
    return _same_values(p, g, abs_tol)


def _same_values(p, g, abs_tol: float) -> bool:
    """Tuples and intervals compare in order and need the same brackets; bare lists in any order."""
    (p_brackets, p_values), (g_brackets, g_values) = p, g
    if p_brackets != g_brackets or len(p_values) != len(g_values):
        return False
    if p_brackets:
        return all(_same_expr(a, b, abs_tol) for a, b in zip(p_values, g_values))
    unmatched = list(g_values)
    for a in p_values:
        hit = next((i for i, b in enumerate(unmatched) if _same_expr(a, b, abs_tol)), None)
        if hit is None:
            return False
        unmatched.pop(hit)
    return True


def _same_expr(a, b, abs_tol: float) -> bool:
    """Equal as sympy builds them (2\\sqrt{3} and \\sqrt{12} already are), else equal in value:
    once for constants, at N_POINTS random points (the same ones every call) with variables."""
    if a == b:
        return True
    symbols = sorted(a.free_symbols | b.free_symbols, key=str)
    rng = random.Random(0)
    for _ in range(N_POINTS if symbols else 1):
        point = {s: rng.uniform(0.5, 2.5) for s in symbols}  # positive: keeps sqrt and log real
        x, y = _evaluate(a, point), _evaluate(b, point)
        if x is None or y is None or abs(x - y) > max(REL_TOL * max(abs(x), abs(y)), abs_tol):
            return False
    return True


_FLOAT_FUNCTIONS = {sympy.sin: cmath.sin, sympy.cos: cmath.cos, sympy.tan: cmath.tan, sympy.asin: cmath.asin,
                    sympy.acos: cmath.acos, sympy.atan: cmath.atan, sympy.log: cmath.log, sympy.exp: cmath.exp,
                    sympy.cot: lambda z: 1 / cmath.tan(z), sympy.sec: lambda z: 1 / cmath.cos(z),
                    sympy.csc: lambda z: 1 / cmath.sin(z)}


def _evaluate(e, point: dict) -> complex | None:
    """The value of sympy expression `e` with its symbols set to `point`, as a double-precision
    complex; None where it is not finite or not a number. Floats overflow at once where mpmath
    would chase digits, so this takes microseconds whatever `e` is."""
    try:
        v = _float_value(e, point)
    except (OverflowError, ZeroDivisionError, ValueError, TypeError, KeyError):
        return None
    return v if cmath.isfinite(v) else None


def _float_value(e, point: dict) -> complex:
    if e.is_Symbol:
        return point[e]
    if e.is_Rational:
        return complex(e.p / e.q)  # int / int is correctly rounded, and raises rather than overflows
    if e.is_Number or e.is_NumberSymbol:  # floats, pi, e; oo and nan come out non-finite or raise
        return complex(e)
    args = [_float_value(a, point) for a in e.args]
    if e.is_Add:
        return sum(args)
    if e.is_Mul:
        return math.prod(args)
    if e.is_Pow:
        return args[0] ** args[1]
    return _FLOAT_FUNCTIONS[e.func](*args)


# ---------------------------------------------------------------------------------------------
# The LaTeX subset: a whitelist tokenizer and a recursive-descent parser that builds sympy objects
# ---------------------------------------------------------------------------------------------

class _Reject(Exception):
    """Outside the subset or over a bound: not math we grade as math."""


_FUNCTIONS = {"sin": sympy.sin, "cos": sympy.cos, "tan": sympy.tan, "cot": sympy.cot, "sec": sympy.sec,
              "csc": sympy.csc, "arcsin": sympy.asin, "arccos": sympy.acos, "arctan": sympy.atan,
              "ln": sympy.log, "log": lambda x: sympy.log(x, 10), "exp": sympy.exp}  # school convention: log is log10
_CONSTANTS = {"pi": sympy.pi, "infty": sympy.oo}
_GREEK = {"alpha", "beta", "gamma", "theta", "phi", "lambda", "mu", "omega"}
_OPERATORS = {"cdot": "*", "times": "*", "div": "/"}
_COMMANDS = {"frac", "sqrt", "pm", *_FUNCTIONS, *_CONSTANTS, *_GREEK}
_WORDS = {"sqrt", "pi", *_FUNCTIONS}  # also understood without a backslash: sqrt(2)
_TOKEN = re.compile(r"\s*(?:(\d+\.?\d*|\.\d+)|\\([a-zA-Z]+)|([a-zA-Z]+)|([-+*/^_()\[\]{},!]))")


def _tokenize(s: str) -> list[str]:
    """Numbers, single letters, "\\command"s and operator characters; anything else rejects."""
    tokens, pos, s = [], 0, s.strip()
    while pos < len(s):
        m = _TOKEN.match(s, pos)
        if m is None:
            raise _Reject
        number, command, word, op = m.groups()
        if command is not None:
            if command in _OPERATORS:
                tokens.append(_OPERATORS[command])
            elif command in _COMMANDS:
                tokens.append("\\" + command)
            else:
                raise _Reject
        elif word is not None and len(word) > 1:
            if word not in _WORDS:  # "red", "xy": text, not a product of letters ("red" would equal "der")
                raise _Reject
            tokens.append("\\" + word)
        else:
            tokens.append(number or word or op)
        pos = m.end()
    if not tokens or len(tokens) > MAX_TOKENS:
        raise _Reject
    return tokens


def _parse(s: str):
    """(brackets, values) for a math answer -- brackets "(]" etc. for a tuple or interval, "" for a
    bare list or single value -- or None for anything outside the subset or over a bound."""
    try:
        return _Parser(_tokenize(s)).answer()
    except _Reject:
        return None


def _checked_pow(base, exponent):
    """base ** exponent, refused before sympy computes something astronomically large."""
    if not exponent.free_symbols:
        e = _evaluate(exponent, {})
        if e is None or abs(e) > MAX_EXPONENT:
            raise _Reject
        if not base.free_symbols:
            b = _evaluate(base, {})
            if b is None or (b != 0 and abs(e) * abs(math.log2(abs(b))) > MAX_POW_BITS):
                raise _Reject
    return sympy.Pow(base, exponent)


def _checked_call(function, *args):
    """function(*args), refused when a constant argument does not fit a double (see the docstring)."""
    if any(not a.free_symbols and _evaluate(a, {}) is None for a in args):
        raise _Reject
    return function(*args)


class _Parser:
    """answer := "(" or "[" expr ("," expr)+ ")" or "]"      a tuple or an interval
              |  item ("," item)*                             a bare list, in any order
       item   := expr, where "\\pm" may stand between terms or before the first one
       expr   := ["+" | "-"] term (("+" | "-") term)*
       term   := power (("*" | "/") ["-"] power | power)*    juxtaposition multiplies: 2x, 2\\sqrt{3}
       power  := factor ["^" arg]                             one superscript: x^{2^3}, not x^2^3
       factor := atom "!"*
       atom   := number | letter ["_" subscript] | \\pi | \\infty | greek | "(" expr ")" | "[" expr "]"
              |  "{" expr "}" | \\frac arg arg | \\sqrt ["[" expr "]"] arg | function ["_" arg] arg
       arg    := "{" expr "}" | ["-"] factor                  \\frac{1}{2}, \\frac12, x^2, x^-1"""

    def __init__(self, tokens: list[str]):
        self.tokens, self.i, self.depth, self.pow_nesting = tokens, 0, 0, 0

    def peek(self):
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def eat(self, tok: str) -> bool:
        if self.peek() != tok:
            return False
        self.i += 1
        return True

    def answer(self):
        if self.peek() in ("(", "["):  # try a tuple or an interval first, else read it as an expression
            self.i = 1
            with contextlib.suppress(_Reject):
                values = self.items(allow_pm=False)
                if self.i == len(self.tokens) - 1 and self.peek() in (")", "]") and len(values) > 1:
                    return self.tokens[0] + self.tokens[-1], values
            self.i, self.depth, self.pow_nesting = 0, 0, 0
        values = self.items(allow_pm=True)
        if self.i != len(self.tokens):
            raise _Reject
        return "", values

    def items(self, allow_pm: bool) -> list:
        values = self.expr(allow_pm)
        while self.eat(","):
            values += self.expr(allow_pm)
            if len(values) > MAX_VALUES:
                raise _Reject
        return values

    def expr(self, allow_pm: bool = False) -> list:
        """A sum, as a list of values: one, or with \\pm both (only where allow_pm: the top level)."""
        values, signs = [sympy.Integer(0)], self.sign() or (1,)
        while True:
            if len(signs) > 1 and not allow_pm:
                raise _Reject
            term = self.term()
            values = [v + s * term for v in values for s in signs]
            if len(values) > MAX_VALUES:
                raise _Reject
            signs = self.sign()
            if signs is None:
                return values

    def sign(self):
        for tok, signs in (("+", (1,)), ("-", (-1,)), ("\\pm", (1, -1))):
            if self.eat(tok):
                return signs
        return None

    def term(self):
        value = self.power()
        while True:
            if self.eat("*"):
                value = value * self.signed(self.power)
            elif self.eat("/"):
                value = value / self.signed(self.power)
            elif self.starts_atom():
                value = value * self.power()
            else:
                return value

    def starts_atom(self) -> bool:
        """Can the next token start an implicit factor? Not a number: "2 3" is no product."""
        tok = self.peek()
        return tok is not None and (tok in ("(", "{") or tok.isalpha() or (tok[0] == "\\" and tok != "\\pm"))

    def signed(self, parse):
        return -parse() if self.eat("-") else parse()

    def power(self):
        base = self.factor()
        if not self.eat("^"):
            return base
        self.pow_nesting += 1
        if self.pow_nesting > MAX_POW_NESTING:
            raise _Reject
        exponent = self.arg()
        self.pow_nesting -= 1
        return _checked_pow(base, exponent)

    def factor(self):
        value = self.atom()
        while self.eat("!"):
            if not (value.is_Integer and 0 <= value <= MAX_FACTORIAL):
                raise _Reject
            value = sympy.factorial(value)
        return value

    def arg(self):
        return self.enclosed("{") if self.eat("{") else self.signed(self.factor)

    def enclosed(self, opening: str):
        """The expression inside a bracket or brace whose opening token was just taken."""
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _Reject
        value = self.expr()[0]
        if not self.eat({"(": ")", "[": "]", "{": "}"}[opening]):
            raise _Reject
        self.depth -= 1
        return value

    def atom(self):
        tok = self.peek()
        if tok is None:
            raise _Reject
        self.i += 1
        if tok[0].isdigit() or tok[0] == ".":
            if len(tok) > MAX_DIGITS:
                raise _Reject
            return sympy.Rational(tok)  # exact: "0.1" is 1/10
        if tok.isalpha():
            if tok == "e" and self.peek() != "_":
                return sympy.E
            return sympy.Symbol(tok + "_" + self.subscript() if self.eat("_") else tok)
        if tok in ("(", "[", "{"):
            return self.enclosed(tok)
        name = tok[1:]
        if name in _CONSTANTS:
            return _CONSTANTS[name]
        if name in _GREEK:
            return sympy.Symbol(name)
        if name == "frac":
            return self.arg() / self.arg()
        if name == "sqrt":
            index = self.enclosed("[") if self.eat("[") else sympy.Integer(2)
            if not (index.is_Integer and 2 <= index <= MAX_EXPONENT):
                raise _Reject
            return _checked_call(sympy.root, self.arg(), index)
        if name in _FUNCTIONS:
            if name == "log" and self.eat("_"):  # \log_{2} 8
                base = self.arg()
                return _checked_call(sympy.log, self.signed(self.factor), base)
            return _checked_call(_FUNCTIONS[name], self.signed(self.factor))
        raise _Reject

    def subscript(self) -> str:
        """x_1, x_{12}, a_n: the subscript becomes part of the variable's name."""
        braced = self.eat("{")
        tok = self.peek()
        if tok is None or not tok.isalnum():
            raise _Reject
        self.i += 1
        if braced and not self.eat("}"):
            raise _Reject
        return tok


class _Timeout(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds: float):
    """Raise _Timeout after `seconds`: a backstop behind the static bounds, not a replacement.

    Python runs signal handlers in the main thread only, so elsewhere this does nothing and the
    bounds hold alone. It also stands aside when a real-time timer is already armed (someone
    else's), and on the way out it disarms its timer and puts the previous handler back."""
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


if __name__ == "__main__":  # the grading rate on 10,000 typical responses, about half of them right
    import json
    import time

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
