"""Multiple choice: the prompt that lists the options, circular rotations, and reading the
chosen letter out of whatever the model wrote.

Parsing follows the rules of MMBench's own matcher in spirit (a letter first, then the
option's text, ambiguous answers count as no answer), written for the messy outputs small
models give: "B", "(B)", "b.", "The answer is B.", "Option B: cat", "cat", "B, because…".
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

LETTERS = string.ascii_uppercase
MAX_OPTIONS = len(LETTERS)
DEFAULT_CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices directly."

# Letters that are also English words ("A cat", "I think"): taken as an option letter only
# when written like one — bracketed, or followed by . ) : — never as a bare word.
_WORDLIKE = {"A", "I"}
# A letter written as an option label: "(B)", "[B]", "B." "B)" "B:" (the label's end is
# punctuation, or the end of the text).
_LABEL_END = r"(?:\s*[.):\]]|\s*$)"
_EXPLICIT = re.compile(
    r"\b(?:answer|option|choice)s?(?:\s+(?:is|would\s+be|should\s+be|will\s+be))?\s*[:\-]?\s*"
    r"(?:option\s+|choice\s+)?[(\[]?([A-Za-z])(?![A-Za-z0-9'])",
    re.IGNORECASE,
)
_TOKEN = re.compile(r"(?<![A-Za-z0-9'’])([(\[]?)([A-Za-z])(?![A-Za-z0-9'’])")
_NOT_WORD = re.compile(r"[^0-9a-z]+")
# "A or B": a word-like capital joined to another choice is a letter, not the article.
_JOINED = re.compile(r"\s+(?:or|and|nor|vs\.?)\s+[(\[]?[A-Z](?![A-Za-z])")


@dataclass(frozen=True)
class ChoiceParse:
    """The chosen letter (None: no clear choice) and how it was found: "letter" (the model
    wrote a letter) or "text" (it wrote one option's text)."""

    letter: str | None
    how: str | None = None


def option_letters(count: int) -> str:
    if not 1 <= count <= MAX_OPTIONS:
        raise ValueError(f"a question needs 1 to {MAX_OPTIONS} options, got {count}")
    return LETTERS[:count]


def build_choice_prompt(question: str, options: list[str], hint: str | None = None,
                        instruction: str | None = DEFAULT_CHOICE_INSTRUCTION) -> str:
    """Hint (if any), question, one "A. option" line per option, then the instruction —
    the layout MMBench, SEED and AI2D prompts use."""
    letters = option_letters(len(options))
    lines = [hint.strip()] if hint and hint.strip() else []
    lines.append(question.strip())
    lines += [f"{letter}. {str(text).strip()}" for letter, text in zip(letters, options)]
    if instruction:
        lines.append(instruction)
    return "\n".join(lines)


def rotate(options: list[str], answer: int, shift: int) -> tuple[list[str], int]:
    """MMBench's circular pass `shift`: option i moves to slot (i - shift) mod n, so every
    option takes every letter once over n passes. Returns (options, new answer index)."""
    n = len(options)
    shift %= n
    return options[shift:] + options[:shift], (answer - shift) % n


def answer_index(answer: str, options: list[str]) -> int:
    """The correct option of a row: its letter ("B", "(b)") or its exact text. Raises
    ValueError naming what is wrong, so the row becomes an error, never a silent miss."""
    text = str(answer).strip()
    letters = option_letters(len(options))
    bare = text.strip("()[]. ").upper()
    if len(bare) == 1 and bare in letters:
        return letters.index(bare)
    matches = [i for i, o in enumerate(options) if str(o).strip().lower() == text.lower()]
    if len(matches) == 1:
        return matches[0]
    if len(bare) == 1 and bare in LETTERS:
        raise ValueError(f"answer {text!r} is not one of the letters {', '.join(letters)}")
    raise ValueError(f"answer {text!r} is neither a letter {letters[0]}-{letters[-1]} nor exactly one option's text")


def _normal_words(text: str) -> str:
    return " ".join(_NOT_WORD.sub(" ", text.lower()).split())


def _valid(letter: str, letters: str) -> str | None:
    upper = letter.upper()
    return upper if upper in letters else None


def _explicit_letters(text: str, letters: str) -> set[str]:
    """Letters named by "answer is B", "Option B", "answer: (c)"; a lowercase or word-like
    letter must end like a label ("the answer is a cat" names no letter)."""
    found = set()
    for match in _EXPLICIT.finditer(text):
        letter = match.group(1)
        if (letter.islower() or letter in _WORDLIKE) and not re.match(_LABEL_END, text[match.end():]):
            continue
        if (valid := _valid(letter, letters)) is not None:
            found.add(valid)
    return found


def _token_letters(text: str, letters: str) -> set[str]:
    """Stand-alone letters: "(b)" or "B." anywhere, and bare capitals other than A and I."""
    found = set()
    for match in _TOKEN.finditer(text):
        bracket, letter = match.group(1), match.group(2)
        labelled = bool(bracket) or bool(re.match(_LABEL_END, text[match.end():]))
        if labelled and letter.islower() and not bracket and match.start() > 0:
            labelled = False  # "… option a." mid-sentence is a word; a leading "b." is a label
        joined = letter in _WORDLIKE and bool(_JOINED.match(text[match.end():]))
        if labelled or joined or (letter.isupper() and letter not in _WORDLIKE):
            if (valid := _valid(letter, letters)) is not None:
                found.add(valid)
    return found


def _text_letters(text: str, options: list[str], letters: str) -> set[str]:
    """Options whose text appears as whole words; an option found only inside a longer
    matching option ("cat" within "black cat") does not count."""
    haystack = f" {_normal_words(text)} "
    spans: dict[str, tuple[int, int]] = {}
    for letter, option in zip(letters, options):
        needle = _normal_words(str(option))
        if not needle:
            continue
        at = haystack.find(f" {needle} ")
        if at >= 0:
            spans[letter] = (at, at + len(needle) + 2)
    inside = {a for a, (s, e) in spans.items() for b, (s2, e2) in spans.items()
              if a != b and s2 <= s and e <= e2 and (e2 - s2) > (e - s)}
    return set(spans) - inside


def parse_choice(output: str | None, options: list[str]) -> ChoiceParse:
    """The option a free-text answer chooses, or ChoiceParse(None) when it chooses none
    or several (refusals, "A or B", empty output)."""
    letters = option_letters(len(options))
    text = (output or "").replace("*", "").strip().strip("\"'`").strip()
    if not text:
        return ChoiceParse(None)
    whole = re.fullmatch(r"[(\[]?\s*([A-Za-z])\s*[)\].:]?", text)
    if whole and (valid := _valid(whole.group(1), letters)):
        return ChoiceParse(valid, "letter")
    for finder in (_explicit_letters, _token_letters):
        found = finder(text, letters)
        if len(found) == 1:
            return ChoiceParse(found.pop(), "letter")
        if len(found) > 1 and finder is _explicit_letters:
            return ChoiceParse(None)  # "the answer is B … the answer is C": no single choice
    by_text = _text_letters(text, options, letters)
    if len(by_text) == 1:
        return ChoiceParse(by_text.pop(), "text")
    return ChoiceParse(None)
