"""LaTeX-subset math, compared safely: is a predicted answer the same value as the gold one?

reward.py decides what counts as an answer and strips its dress (units, degrees, \\text{}); this
module answers one question about the two cleaned strings, `equivalent(pred, gold)`, and treats
both as hostile input (the prediction is model output).

  1. Both are parsed by our own tokenizer and recursive-descent parser for a LaTeX subset (numbers,
     single letters, + - * / ^ !, \\frac, \\sqrt, \\pi, trig and log functions, \\pm, |x|, tuples and
     intervals, equations and inequalities), which builds the sympy objects itself: model text never reaches eval, exec,
     sympify or parse_expr, and anything outside the whitelist is simply not math.
  2. Values are compared numerically, in plain double precision: constants directly, expressions
     at random points (identity testing), both within REL_TOL. Neither sympy's simplify nor its
     evalf is called: nothing bounds their run time (evalf chases precision: cos(10^{999^x}) never
     returns), and for this subset agreement at random points decides the same question.

Safety bounds, checked before sympy does any work; they keep the answers seen so far under a second:
  - an answer over MAX_TOKENS tokens or nested deeper than MAX_DEPTH is not parsed; a number has
    at most MAX_DIGITS (reward.py bounds the characters before this: MAX_ANSWER_CHARS);
  - a constant exponent is at most MAX_EXPONENT in size, a constant power at most 2^MAX_POW_BITS,
    exponents nest at most MAX_POW_NESTING deep (9^{9^{9^9}} stops here), n! needs n <= MAX_FACTORIAL,
    and a function's constant argument must fit a double (sympy may evaluate log(cos(e^{9!})) to
    learn its sign, at a precision that grows with the argument: seconds).
Behind them, in the main thread, a timer that reward.py arms around the whole grading call
(`reward.time_limit`) stops whatever is left. It is the guarantee, not the bounds: functions
nested without braces (\\sqrt\\tan\\sqrt\\tan... 1, 73 characters) or a root of a 10,000-bit
fraction keep sympy's assumptions busy for seconds. Both callers, the trainer and eval.py, grade
on their main thread.
"""
import cmath
import contextlib
import math
import random
import re

import sympy

MAX_TOKENS = 150
MAX_DEPTH = 20  # nested brackets, braces and macro arguments
MAX_DIGITS = 3000  # about the length of the largest power below, written out
MAX_EXPONENT = 10_000
MAX_POW_BITS = 10_000  # a constant power is computed exactly while it has at most this many bits: microseconds
MAX_POW_NESTING = 2
MAX_FACTORIAL = 100
MAX_VALUES = 8  # items of a list like "1, 2, 3", with both signs of each \pm
REL_TOL = 1e-4  # "0.33333" is 1/3, but "0.33" is not (golds like 0.33: abs_tol below); two numbers written
# out in full (34427, 1608.5) are compared exactly: within REL_TOL, 34427 would be 34426
N_POINTS = 3  # random points an expression with variables is evaluated at


# ---------------------------------------------------------------------------------------------
# Comparing values: in order or as a set, exactly or at random points, in double precision
# ---------------------------------------------------------------------------------------------

def equivalent(pred: str, gold: str, abs_tol: float = 0.0) -> bool:
    """True when both strings parse as math in the subset and have the same values: equal within
    REL_TOL, or within `abs_tol` (the caller's allowance for a gold rounded to a few decimals).
    False for anything outside the subset or over a bound."""
    p, g = parse(pred), parse(gold)
    return p is not None and g is not None and _same_values(p, g, abs_tol)


def _same_values(p, g, abs_tol: float) -> bool:
    """Tuples and intervals compare in order and need the same brackets; bare lists in any order."""
    (p_brackets, p_values), (g_brackets, g_values) = p, g
    if p_brackets != g_brackets or len(p_values) != len(g_values):
        return False
    if p_brackets in _RELATIONS:
        return _same_relation(p_values[0], g_values[0], p_brackets != "=")
    if p_brackets:
        return all(_same_expr(a, b, abs_tol) for a, b in zip(p_values, g_values))
    unmatched = list(g_values)
    for a in p_values:
        hit = next((i for i, b in enumerate(unmatched) if _same_expr(a, b, abs_tol)), None)
        if hit is None:
            return False
        unmatched.pop(hit)
    return True


def _points(a, b) -> list[dict]:
    """Where to compare a and b: once for constants, else at N_POINTS random points (the same every call)."""
    symbols = sorted(a.free_symbols | b.free_symbols, key=str)
    rng = random.Random(0)
    return [{s: rng.uniform(0.5, 2.5) for s in symbols}  # positive: keeps sqrt and log real
            for _ in range(N_POINTS if symbols else 1)]


def _same_expr(a, b, abs_tol: float) -> bool:
    """Equal as sympy builds them (2\\sqrt{3} and \\sqrt{12} already are, and 4^{1012} and 2^{2024}, exactly),
    else equal in value at `_points`."""
    if a == b:
        return True
    if not abs_tol and _written_out(a) and _written_out(b):  # 34427 is not 34426, nor 1608.6 1608.5
        return False
    for point in _points(a, b):
        x, y = _evaluate(a, point), _evaluate(b, point)
        if x is None or y is None or abs(x - y) > max(REL_TOL * max(abs(x), abs(y)), abs_tol):
            return False
    return True


def _written_out(e) -> bool:
    """An integer or a terminating decimal: a number whose every digit is written, so two of them
    are equal only exactly. 1/3 is not one: "0.33333" stands for it, within REL_TOL."""
    if not e.is_Rational:
        return False
    q = int(e.q)
    for f in (2, 5):
        while q % f == 0:
            q //= f
    return q == 1


def _same_relation(a, b, inequality: bool) -> bool:
    """a = 0 and b = 0 (each equation read as lhs - rhs) are the same when a is a nonzero constant times b:
    sides swapped, or both scaled (x^2/81 + y^2/9 = 1 and x^2 + 9y^2 = 81); a < 0 and b < 0 when it is a positive
    one (y > -3x is -3x < y). Relations without a variable never are."""
    if not (a.free_symbols or b.free_symbols):
        return False
    ratios = []
    for point in _points(a, b):
        x, y = _evaluate(a, point), _evaluate(b, point)
        if x is None or y is None or x == 0 or y == 0:
            return False
        ratios.append(x / y)
    same = all(abs(r - ratios[0]) <= REL_TOL * abs(ratios[0]) for r in ratios)
    return same and (not inequality or ratios[0].real > 0)


_FLOAT_FUNCTIONS = {sympy.sin: cmath.sin, sympy.cos: cmath.cos, sympy.tan: cmath.tan, sympy.asin: cmath.asin,
                    sympy.acos: cmath.acos, sympy.atan: cmath.atan, sympy.log: cmath.log, sympy.exp: cmath.exp,
                    sympy.cot: lambda z: 1 / cmath.tan(z), sympy.sec: lambda z: 1 / cmath.cos(z),
                    sympy.csc: lambda z: 1 / cmath.sin(z), sympy.Abs: abs}


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
_INVERSE = {"sin": "arcsin", "cos": "arccos", "tan": "arctan"}
_CONSTANTS = {"pi": sympy.pi, "infty": sympy.oo}
_GREEK = {"alpha", "beta", "gamma", "theta", "phi", "lambda", "mu", "omega"}
_OPERATORS = {"cdot": "*", "times": "*", "div": "/", "le": "<=", "leq": "<=", "ge": ">=", "geq": ">="}
_RELATIONS = {"=": 1, "<": 1, "<=": 1, ">": -1, ">=": -1}  # a > b is read as b < a: lhs - rhs times this sign
_COMMANDS = {"frac", "sqrt", "pm", *_FUNCTIONS, *_CONSTANTS, *_GREEK}
_WORDS = {"sqrt", "pi", *_FUNCTIONS}  # also understood without a backslash: sqrt(2)
_TOKEN = re.compile(r"\s*(?:(\d+\.?\d*|\.\d+)|\\([a-zA-Z]+)|([a-zA-Z]+)|([<>]=?|[-+*/^_()\[\]{},!=|]))")


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
        if len(tokens) > MAX_TOKENS:  # stop reading here: a long string costs no more than a short one
            raise _Reject
        pos = m.end()
    if not tokens:
        raise _Reject
    return tokens


def parse(s: str):
    """A math answer as `equivalent` compares it: (brackets, values), brackets "(]" etc. for a tuple
    or interval, "" for a bare list or single value; None for anything outside the subset or over a
    bound."""
    try:
        return _Parser(_tokenize(s)).answer()
    except _Reject:
        return None


def _checked_pow(base, exponent):
    """base ** exponent, refused before sympy computes something astronomically large: a constant power
    only while its value has at most MAX_POW_BITS bits. The bound is on the work, not on the number: sympy
    computes 4^{1012} exactly, as Python's integers do, in microseconds."""
    if not exponent.free_symbols:
        e = _evaluate(exponent, {})
        if e is None or abs(e) > MAX_EXPONENT:
            raise _Reject
        if not base.free_symbols and abs(e) * _bits(base) > MAX_POW_BITS:
            raise _Reject
    return sympy.Pow(base, exponent)


def _bits(x) -> float:
    """|log2| of constant x's size: of a rational's larger part, exactly (it may be past a double's range)."""
    if x.is_Rational:
        return max(math.log2(abs(x.p)) if x.p else 0.0, math.log2(x.q))
    v = _evaluate(x, {})
    if v is None:
        raise _Reject
    return abs(math.log2(abs(v))) if v != 0 else 0.0


def _checked_call(function, *args):
    """function(*args), refused when a constant argument does not fit a double (see the docstring)."""
    if any(not a.free_symbols and _evaluate(a, {}) is None for a in args):
        raise _Reject
    return function(*args)


class _Parser:
    """answer := "(" or "[" expr ("," expr)+ ")" or "]"      a tuple or an interval
              |  expr ("=" | "<" | ">" | "<=" | ">=") expr     an equation or inequality (\\leq is <=)
              |  item ("," item)*                             a bare list, in any order
       item   := expr, where "\\pm" may stand between terms or before the first one
       expr   := ["+" | "-"] term (("+" | "-") term)*
       term   := power (("*" | "/") ["-"] power | power)*    juxtaposition multiplies: 2x, 2\\sqrt{3}
       power  := factor ["^" arg]                             one superscript: x^{2^3}, not x^2^3
       factor := atom "!"*
       atom   := number | letter ["_" subscript] | \\pi | \\infty | greek | "(" expr ")" | "[" expr "]" | "|" expr "|"
              |  "{" expr "}" | \\frac arg arg | \\sqrt ["[" expr "]"] arg | function ["_" arg] arg
       arg    := "{" expr "}" | ["-"] factor                  \\frac{1}{2}, \\frac12, x^2, x^-1"""

    def __init__(self, tokens: list[str]):
        self.tokens, self.i, self.depth, self.pow_nesting = tokens, 0, 0, 0
        self.raised = False  # the last factor read was a power
        self.in_abs = 0  # inside |...|, where a "|" closes rather than opens

    def peek(self):
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def eat(self, tok: str) -> bool:
        if self.peek() != tok:
            return False
        self.i += 1
        return True

    def answer(self):
        """A tuple or interval, a relation (as lhs - rhs, its sign for brackets), or a bare list."""
        if self.peek() in ("(", "["):  # try a tuple or an interval first, else read it as an expression
            self.i = 1
            with contextlib.suppress(_Reject):
                values = self.items(allow_pm=False)
                if self.i == len(self.tokens) - 1 and self.peek() in (")", "]") and len(values) > 1:
                    return self.tokens[0] + self.tokens[-1], values
            self.i, self.depth, self.pow_nesting = 0, 0, 0
        values, brackets = self.items(allow_pm=True), ""
        if self.peek() in _RELATIONS:
            relation = self.tokens[self.i]
            self.i += 1
            if len(values) != 1:
                raise _Reject
            values, brackets = [_RELATIONS[relation] * (values[0] - self.expr()[0])], relation.replace(">", "<")
        if self.i != len(self.tokens):
            raise _Reject
        return brackets, values

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
        """Can the next token start an implicit factor? Not a number: "2 3" is no product; but after a
        power it is, as MathVision writes 2^{12} 13^2."""
        tok = self.peek()
        if tok is None:
            return False
        return (tok in ("(", "{") or (tok == "|" and not self.in_abs) or tok.isalpha() or (tok[0] == "\\" and tok != "\\pm")
                or (tok[0].isdigit() and self.tokens[self.i - 1] == "}" and self.raised))

    def signed(self, parse):
        return -parse() if self.eat("-") else parse()

    def power(self):
        base = self.factor()
        self.raised = self.eat("^")
        if not self.raised:
            return base
        self.pow_nesting += 1
        if self.pow_nesting > MAX_POW_NESTING:
            raise _Reject
        exponent = self.arg()
        self.pow_nesting -= 1
        self.raised = True  # the exponent's own powers reset it
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
        self.in_abs += opening == "|"
        if self.depth > MAX_DEPTH:
            raise _Reject
        value = self.expr()[0]
        if not self.eat({"(": ")", "[": "]", "{": "}", "|": "|"}[opening]):
            raise _Reject
        self.depth -= 1
        self.in_abs -= opening == "|"
        return sympy.Abs(value) if opening == "|" else value

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
        if tok in ("(", "[", "{", "|"):
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
            radicand = self.arg()
            if index % 2 and radicand.is_negative:  # \sqrt[3]{-8} is -2, sympy.root's principal root is complex
                return -_checked_call(sympy.root, -radicand, index)
            return _checked_call(sympy.root, radicand, index)
        if name in _FUNCTIONS:
            if name == "log" and self.eat("_"):  # \log_{2} 8
                base = self.arg()
                return _checked_call(sympy.log, self.signed(self.factor), base)
            if name in _INVERSE and self.tokens[self.i:self.i + 3] == ["^", "-", "1"]:  # \tan^{-1} x is arctan
                self.i, name = self.i + 3, _INVERSE[name]
            elif name in _INVERSE and self.tokens[self.i:self.i + 5] == ["^", "{", "-", "1", "}"]:
                self.i, name = self.i + 5, _INVERSE[name]
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

