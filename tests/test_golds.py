"""The grader against real golds (issue 22): every gold of tests/data/golds.jsonl (the benchmarks' published
answers and the adapters' fixtures; where they come from is in its first lines) is rewritten the ways a right
answer is written, each of which must score 1.0, and changed the ways a wrong one is, each of which must score 0.0.

A class that does not apply to a gold (no fraction to write as \\dfrac) counts as not applicable. A gold marked
"unread" is one the grader does not read as the benchmark means it (a sentence, an inequality); its rewrites are
counted apart, and docs/grader.md names each such kind. The counts are printed (pytest -s) and given in docs/grader.md."""
import collections
import json
import re
from pathlib import Path

import latex
import reward

RECORDS = [json.loads(line) for line in (Path(__file__).parent / "data" / "golds.jsonl").read_text().splitlines()
           if line and not line.startswith("#")]
LETTERS = "ABCDEFGH"
# A trailing unit as the benchmarks write it: \mathrm{~cm}^{2}, \text{ units}^2, "square units", °, ^\circ T
_UNIT = re.compile(r"(?:\s*(?:\\mathrm\s*\{[^{}]*\}|\\text\s*\{[^{}]*\}"
                   r"|\$?\s*(?:(?:square |cubic )?units|litres|metres|km|m|cm)\b\s*\$?)"
                   r"(?:\s*\$?\^\s*\{?\d\}?\$?)?|\s*(?:\^\s*\{?\\circ\}?|°)\s*T?)\s*\$?\s*$")
_TERM = re.compile(r"(?<=[^\s^_({\[=,e])\s*(?=[-+])")  # before a + or - that joins two terms
_TO_UNICODE = [(r"\sqrt", "√"), (r"\pi", "π"), (r"\times", "×"), (r"\cdot", "·"), (r"\infty", "∞"), (r"^{\circ}", "°"),
               (r"^\circ", "°"), (r"\leq", "≤"), (r"\geq", "≥"), ("-", "−")]


def boxed(answer: str) -> str:
    return f"So the answer is \\boxed{{{answer}}}."


def value_part(gold: str) -> str:
    """The gold without its trailing unit (12 \\mathrm{~cm}^{2} -> 12), its box and its $ around it."""
    inner = re.fullmatch(r"\$?(?:\\boxed\{(.*)\}|(.*))\$?", gold.strip())
    return _UNIT.sub("", inner.group(1) or inner.group(2)).strip()


def depth_zero(s: str, i: int) -> bool:
    """Is s[i] outside every bracket, brace and |...|?"""
    opened = s[:i].count("(") + s[:i].count("{") + s[:i].count("[")
    return opened == s[:i].count(")") + s[:i].count("}") + s[:i].count("]") and s[:i].count("|") % 2 == 0


def reordered(gold: str) -> list[str]:
    """The first term of a sum moved to its end (in a relation: of its right side); else an equation's sides swapped."""
    v = value_part(gold)
    relation = re.search(r"\\[lg]eq|[<>=]", v)
    lhs, rhs = (v[:relation.end()], v[relation.end():]) if relation else ("", v)
    cuts = [m.start() for m in _TERM.finditer(rhs) if depth_zero(rhs, m.start())]
    if cuts and "," not in rhs and re.search(r"\d", rhs):
        first, rest = rhs[:cuts[0]].strip(), rhs[cuts[0]:].strip().lstrip("+")
        return [lhs + rest + ("" if first.startswith("-") else "+") + first]
    if v.count("=") == 1 and relation.group() == "=" and lhs.strip("= ") and rhs.strip():
        return [f"{rhs}={lhs[:-1]}"]
    return []


def spaced(gold: str) -> list[str]:
    s = re.sub(r"\s*([-+=()^])\s*", r" \1 ", gold)
    s = " ".join(re.sub(r"(?<=\d)(?=[a-zA-Z\\])", " ", s).split())
    return [s] if s != gold else []


def unspaced(gold: str) -> list[str]:
    s = re.sub(r"(?<=[^a-zA-Z\d$])\s+|\s+(?=[^a-zA-Z])|(?<=[\d$])\s+(?=[a-zA-Z](?![a-zA-Z]))", "", gold)  # not 452cubic
    return [s] if s != gold else []


def frac_forms(gold: str) -> list[str]:
    if re.search(r"\\[dt]frac", gold):
        return [re.sub(r"\\[dt]frac", r"\\frac", gold)]
    return [gold.replace(r"\frac", form) for form in (r"\dfrac", r"\tfrac")] if r"\frac" in gold else []


def left_right(gold: str) -> list[str]:
    if r"\left" in gold:
        return [gold.replace(r"\left", "").replace(r"\right", "")]
    return [gold.replace("(", r"\left(").replace(")", r"\right)")] if "(" in gold else []


def unicode(gold: str) -> list[str]:
    """LaTeX signs as unicode ones, or a gold's unicode signs as LaTeX."""
    s = gold
    for tex, sign in _TO_UNICODE:
        s = s.replace(sign, tex + " " if tex[0] == "\\" else tex) if sign in gold else s.replace(tex, sign)
    return [s] if s != gold else []


def decimal(record: dict) -> list[str]:
    """The exact value (from the data file, computed apart from the grader) to 7 significant digits: within 1e-4."""
    return [f"{record['value']:.7g}"] if "value" in record else []


def thousands(gold: str) -> list[str]:
    v = value_part(gold).strip("$")
    if re.fullmatch(r"\d{1,3}(,\d{3})+(\.\d+)?", v):
        return [v.replace(",", "")]
    return [f"{float(v):,}" if "." in v else f"{int(v):,}"] if re.fullmatch(r"\d{4,}(\.\d+)?", v) else []


def unit(record: dict) -> list[str]:
    gold = record["gold"]
    if value_part(gold) != gold:
        return [value_part(gold)]
    constant = "value" in record or re.fullmatch(r"-?\d+(\.\d+)?", gold)
    return [gold + r"\text{ cm}", gold + " cm", gold + "^{\\circ}", gold + "°"] if constant else []


def changed_digit(gold: str) -> list[str]:
    """The first digit changed and, in a number written out in full, the last (34426 -> 34427: a
    relative tolerance would take it; 347.4248\\pi is compared within one, so its last digit may go)."""
    v = value_part(gold)
    digits = [m.start() for m in re.finditer(r"\d", v)]
    if not digits:
        return []
    changed = {digits[0], digits[-1]} if re.fullmatch(r"\$?-?[\d,]*\.?\d+\$?", v.strip()) else {digits[0]}
    return [v[:i] + str((int(v[i]) + 1) % 10) + v[i + 1:] for i in sorted(changed)]


def flipped_sign(gold: str) -> list[str]:
    v = value_part(gold)
    i = v.rfind("=") + 1
    i += len(re.match(r"[\s$]*[(\[]?\s*", v[i:]).group())
    if re.match(r"0(\.0*)?(?![\d.])", v[i:]) or not re.search(r"\d", v):  # -0 is 0
        return []
    return [v[:i] + v[i + 1:] if v[i:].startswith("-") else v[:i] + "-" + v[i:]]


def changed_exponent(gold: str) -> list[str]:
    v = value_part(gold)
    m = re.search(r"\^\s*\{?\s*(\d)", v)
    return [v[:m.start(1)] + str(int(m.group(1)) % 9 + 1) + v[m.end(1):]] if m else []


EQUIVALENT = {
    "gold boxed (ViRL39K)": lambda r: [r["gold"]],  # graded against \boxed{gold}, below
    "$ added or removed": lambda r: [r["gold"].replace("$", "") if "$" in r["gold"] else f"${r['gold']}$"],
    "terms reordered": lambda r: reordered(r["gold"]),
    "spaces added": lambda r: spaced(r["gold"]),
    "spaces removed": lambda r: unspaced(r["gold"]),
    "\\frac, \\dfrac, \\tfrac": lambda r: frac_forms(r["gold"]),
    "\\left( \\right)": lambda r: left_right(r["gold"]),
    "unicode <-> LaTeX": lambda r: unicode(r["gold"]),
    "decimal for exact": decimal,
    "thousands separators": lambda r: thousands(r["gold"]),
    "unit or degree sign": unit,
}
NEAR_MISS = {"one digit changed": changed_digit, "sign flipped": flipped_sign, "exponent changed": changed_exponent}


def option_cases(record: dict) -> list[tuple[str, str, float]]:
    """(class, prediction, expected) for a multiple-choice gold: the letter's dresses, its option's text
    (also in unicode or LaTeX), and every other option, by letter and by text."""
    gold, choices = record["gold"], record["choices"]
    text = choices[LETTERS.index(gold)]
    cases = [("letter dress", p, 1.0) for p in (f"({gold})", f"{gold}.", f"{gold}: {text}", gold.lower())]
    cases += [("option text", p, 1.0) for p in [text] + unicode(text)]
    for i, other in enumerate(choices):
        if LETTERS[i] != gold and other != text:
            cases += [("a different option", LETTERS[i], 0.0), ("a different option", other, 0.0)]
    return cases


def free_cases(record: dict) -> list[tuple[str, str, float]]:
    cases = [(name, p, 1.0) for name, rewrite in EQUIVALENT.items() for p in rewrite(record)]
    return cases + [(name, p, 0.0) for name, change in NEAR_MISS.items() for p in change(record["gold"])]


def grade(record: dict, name: str, pred: str) -> float:
    gold = f"\\boxed{{{record['gold']}}}" if name.startswith("gold boxed") else record["gold"]
    return reward.accuracy(boxed(pred), gold, record.get("choices"))


def test_every_rewrite_of_every_real_gold():
    classes = list(EQUIVALENT) + list(NEAR_MISS) + ["letter dress", "option text", "a different option"]
    counts = {kind: collections.defaultdict(collections.Counter) for kind in ("read", "unread")}
    failures = []
    for record in RECORDS:
        cases = option_cases(record) if "choices" in record else free_cases(record)
        kind = "unread" if "unread" in record else "read"
        for name in classes:
            if not any(c[0] == name for c in cases):
                counts[kind][name]["n/a"] += 1
        for name, pred, expected in cases:
            ok = grade(record, name, pred) == expected
            counts[kind][name]["pass" if ok else "fail"] += 1
            if not ok and kind == "read":
                failures.append((record["gold"], name, pred, expected))
    for kind, table in counts.items():
        print(f"\n{kind} golds: " + str(sum(("unread" in r) == (kind == "unread") for r in RECORDS)))
        for name in classes:
            print(f"  {name:24s} rewrites pass {table[name]['pass']:5d}, fail {table[name]['fail']:4d};  golds n/a {table[name]['n/a']:4d}")
    free = [r["gold"] for r in RECORDS if "choices" not in r]
    as_math = sum(latex.parse(reward.normalize(reward.clean(g))) is not None for g in free)
    print(f"free-form golds read as math: {as_math} of {len(free)}; the rest compared as text")
    assert failures == []


def test_every_unread_gold_is_named_and_really_unread():
    """The "unread" mark names a kind docs/grader.md lists, and a marked gold does fail a rewrite (else unmark it)."""
    kinds = {"unit after a variable"}
    for record in RECORDS:
        if "unread" in record:
            assert record["unread"] in kinds
            assert any(grade(record, name, pred) != expected for name, pred, expected in free_cases(record)), record
