"""Free-answer scorers: yes/no (POPE, MME), VQA-style normalised exact match, and relaxed
numeric accuracy within 5 % (ChartQA). Pure functions on strings."""

from __future__ import annotations

import math
import re

DEFAULT_YES_NO_INSTRUCTION = "Please answer yes or no."
DEFAULT_SHORT_INSTRUCTION = "Answer the question using a single word or phrase."
RELAXED_TOLERANCE = 0.05

# --- yes / no -------------------------------------------------------------------------------

_YES = {"yes", "yeah", "yep", "yup", "true", "correct"}
_NO = {"no", "nope", "false", "incorrect"}
_NEGATION = {"no", "not", "none", "nothing", "never", "nobody", "neither", "nor"}
# "I can't tell", "not sure": a refusal, not a "no".
_REFUSAL = re.compile(r"\b(?:can ?not|can['’]t|unable to|not sure|unsure|don['’]t know|do not know|impossible to)\b")
_SENTENCE_END = re.compile(r"[.!?;\n]")
_WORDS = re.compile(r"[a-z]+(?:['’][a-z]+)?")


def parse_yes_no(output: str | None) -> str | None:
    """"yes", "no", or None for anything else (a refusal, a description without yes/no).

    Only the first sentence counts (POPE's rule), and its first word decides when it is a
    yes or a no (MME reads the first characters). Otherwise a "yes" without negation is
    yes and a negation ("no", "not", "isn't", …) without "yes" is no. Unlike POPE, a reply
    that says neither, or refuses ("I can't tell"), is not taken as yes: a model that does
    not answer earns nothing."""
    text = (output or "").strip().lower()
    first = next((s for s in _SENTENCE_END.split(text) if s.strip()), "")
    words = _WORDS.findall(first)
    if not words:
        return None
    if words[0] in _YES:
        return "yes"
    if words[0] in _NO:
        return "no"
    if _REFUSAL.search(first):
        return None
    says_yes = any(w == "yes" for w in words)
    says_no = any(w in _NEGATION or w.endswith(("n't", "n’t")) for w in words)
    if says_yes != says_no:
        return "yes" if says_yes else "no"
    return None


def yes_no_label(answer: str) -> str:
    """A reference answer as "yes"/"no"; raises ValueError for anything else."""
    label = str(answer).strip().strip(".").lower()
    if label in _YES:
        return "yes"
    if label in _NO:
        return "no"
    raise ValueError(f"answer {answer!r} is not yes or no")


# --- VQA-style normalisation ------------------------------------------------------------------

_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}\b)")
_PERIOD_NOT_DECIMAL = re.compile(r"(?<!\d)\.|\.(?!\d)")
_PUNCTUATION = re.compile(r"[!\"#$%&()*+,\-/:;<=>?@\[\\\]^_`{|}~]")
_APOSTROPHES = re.compile(r"['’]")


def normalize_answer(text: str | None) -> str:
    """Lower case; thousands commas dropped; punctuation and periods that are not decimal
    points become spaces; apostrophes dropped (so "don't" equals "dont", as VQA's contraction
    table makes them); number words zero-ten become digits; articles a/an/the dropped."""
    text = (text or "").lower().replace("\n", " ").replace("\t", " ")
    text = _THOUSANDS_COMMA.sub("", text)
    text = _PERIOD_NOT_DECIMAL.sub(" ", text)
    text = _PUNCTUATION.sub(" ", text)
    text = _APOSTROPHES.sub("", text)
    words = [_NUMBER_WORDS.get(w, w) for w in text.split()]
    return " ".join(w for w in words if w not in _ARTICLES)


def short_answer_correct(output: str | None, references: list[str]) -> tuple[str, bool]:
    """(normalised output, whether it equals any normalised reference)."""
    parsed = normalize_answer(output)
    return parsed, bool(parsed) and any(parsed == normalize_answer(r) for r in references)


# --- relaxed numeric accuracy ----------------------------------------------------------------

_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
_WORD_NUMBER = re.compile(r"\b(" + "|".join(_NUMBER_WORDS) + r")\b")


def parse_number(text: str | None) -> float | None:
    """The first number in a reply ("about 1,234.5 units" → 1234.5; "12%" → 12; "seven" →
    7), or None. A percent sign is dropped, so "12%" and "12" are the same answer."""
    text = _THOUSANDS_COMMA.sub("", (text or "").strip().lower())
    match = _NUMBER.search(text)
    if match:
        value = float(match.group(0))
        return value if math.isfinite(value) else None
    word = _WORD_NUMBER.search(text)
    return float(_NUMBER_WORDS[word.group(1)]) if word else None


def _exact_text(text: str) -> str:
    return " ".join((text or "").strip().rstrip(".").lower().split())


def relaxed_correct(output: str | None, references: list[str],
                    tolerance: float = RELAXED_TOLERANCE) -> tuple[str, bool]:
    """(parsed answer, correct). Numeric references: the reply's first number within
    `tolerance` relative error (a reference of 0 needs exactly 0); other references: case-
    insensitive exact match, as ChartQA scores its text answers."""
    number = parse_number(output)
    parsed = _exact_text(output or "") if number is None else f"{number:g}"
    for ref in references:
        target = _reference_number(ref)
        if target is None:
            if _exact_text(output or "") == _exact_text(ref):
                return parsed, True
        elif number is not None:
            if target == 0:
                if number == 0:
                    return parsed, True
            elif abs(number - target) <= tolerance * abs(target):
                return parsed, True
    return parsed, False


def _reference_number(ref: str) -> float | None:
    """A reference counts as numeric only when it is a number as a whole ("12", "-3.5",
    "12%", "1,200"), not when it merely contains one ("Q3 2019")."""
    text = _THOUSANDS_COMMA.sub("", str(ref).strip()).rstrip("%").strip()
    if _NUMBER.fullmatch(text):
        value = float(text)
        return value if math.isfinite(value) else None
    return None
