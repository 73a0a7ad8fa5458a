"""Scorers, prompts and metrics of the evaluate job: pure functions, no Ray, no model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipelines.evaluate.answers import (normalize_answer, parse_number, parse_yes_no, relaxed_correct,
                                        short_answer_correct, yes_no_label)
from pipelines.evaluate.benchmark_spec import BenchmarkSpec
from pipelines.evaluate.choices import answer_index, build_choice_prompt, parse_choice, rotate
from pipelines.evaluate.metrics import benchmark_metrics
from pipelines.evaluate.report import compare_table, metrics_table
from pipelines.evaluate.rows import ask, score

OPTIONS = ["cat", "dog", "black cat", "bird"]


@pytest.mark.parametrize("output, letter, how", [
    ("B", "B", "letter"),
    ("b", "B", "letter"),
    ("(B)", "B", "letter"),
    ("B.", "B", "letter"),
    ("**B**", "B", "letter"),
    ("The answer is B.", "B", "letter"),
    ("the answer is b", "B", "letter"),
    ("Answer: (d)", "D", "letter"),
    ("Option B: dog", "B", "letter"),
    ("The correct option is option D", "D", "letter"),
    ("B. dog, because it barks", "B", "letter"),
    ("D) bird\nThe image shows a bird on a branch.", "D", "letter"),
    ("A. cat", "A", "letter"),
    ("The answer is A.", "A", "letter"),
    ("The answer is B, not C.", "B", "letter"),
    ("I think it is C", "C", "letter"),
    ("dog", "B", "text"),
    ("It is a dog.", "B", "text"),
    ("A cat sitting on a mat", "A", "text"),       # "A" is an article here, "cat" the option
    ("a black cat on a sofa", "C", "text"),        # "cat" lies inside the longer option "black cat"
    ("a handwritten dog", "B", "text"),
    ("A or B", None, None),                        # several letters: no single choice
    ("The answer is B. The answer is C.", None, None),
    ("cat or dog", None, None),                    # two options' texts
    ("I cannot answer this question.", None, None),  # a refusal ("I" is not option I)
    ("Sorry, I don't know.", None, None),
    ("", None, None),
    (None, None, None),
    ("E", None, None),                             # a letter past the last option
    ("The answer is F.", None, None),
])
def test_parse_choice_on_messy_outputs(output, letter, how):
    parsed = parse_choice(output, OPTIONS)
    assert (parsed.letter, parsed.how) == (letter, how)


def test_parse_choice_reads_letters_past_h_and_word_like_i():
    options = [f"option {i}" for i in range(10)]
    assert parse_choice("J", options).letter == "J"
    assert parse_choice("I.", options).letter == "I"
    assert parse_choice("I think so", options).letter is None


def test_prompt_layout_rotations_and_answers():
    prompt = build_choice_prompt("What animal is it?", ["cat", "dog"], hint="A photo of a pet.")
    assert prompt == ("A photo of a pet.\nWhat animal is it?\nA. cat\nB. dog\n"
                      "Answer with the option's letter from the given choices directly.")
    assert build_choice_prompt("Q?", ["x", "y"], instruction=None) == "Q?\nA. x\nB. y"
    seen = [rotate(OPTIONS, 2, s) for s in range(4)]
    assert [opts[ans] for opts, ans in seen] == ["black cat"] * 4       # the answer follows its text
    assert sorted(ans for _, ans in seen) == [0, 1, 2, 3]               # and takes every letter once
    assert answer_index("C", OPTIONS) == 2 and answer_index("(c)", OPTIONS) == 2 and answer_index("Bird", OPTIONS) == 3
    for bad in ("E", "horse", ""):
        with pytest.raises(ValueError, match="answer"):
            answer_index(bad, OPTIONS)


@pytest.mark.parametrize("output, label", [
    ("Yes", "yes"), ("yes.", "yes"), ("YES, there is a dog.", "yes"), ("Yes, there is no cat.", "yes"),
    ("No", "no"), ("no, it is not", "no"), ("There is no dog in the image.", "no"), ("It isn't red.", "no"),
    ("There is a dog in the image.", None),    # POPE would call this yes; we do not guess
    ("I can't tell from this image.", None), ("Not sure.", None), ("", None), (None, None),
    ("The dog is not here. Yes it is.", "no"),  # only the first sentence counts
])
def test_parse_yes_no(output, label):
    assert parse_yes_no(output) == label


def test_vqa_normalisation_and_short_answers():
    assert normalize_answer("The Two dogs!") == "2 dogs"
    assert normalize_answer("  An apple.\n") == "apple"
    assert normalize_answer("1,000") == "1000" and normalize_answer("3.5") == "3.5"
    assert normalize_answer("don't") == normalize_answer("dont") == "dont"
    assert normalize_answer("red/white") == "red white"
    assert short_answer_correct("Two.", ["2"]) == ("2", True)
    assert short_answer_correct("a red car", ["red car", "car"]) == ("red car", True)
    assert short_answer_correct("red", ["red car"])[1] is False
    assert short_answer_correct("", [""])[1] is False


def test_relaxed_numeric_accuracy():
    assert parse_number("about 1,234.5 units") == 1234.5
    assert parse_number("12%") == 12 and parse_number("seven") == 7 and parse_number("none here") == 0
    assert parse_number("no number") is None
    assert relaxed_correct("104", ["100"]) == ("104", True)
    assert relaxed_correct("105", ["100"])[1] is True and relaxed_correct("105.1", ["100"])[1] is False
    assert relaxed_correct("-95.5", ["-100"])[1] is True
    assert relaxed_correct("The value is 12%", ["12"])[1] is True
    assert relaxed_correct("0", ["0"])[1] is True and relaxed_correct("0.01", ["0"])[1] is False
    assert relaxed_correct("Yes.", ["yes"]) == ("yes", True)       # text answers: exact, any case
    assert relaxed_correct("Q3 2019", ["Q3 2019"])[1] is True      # a reference with digits is not a number
    assert relaxed_correct("none", ["100"])[1] is False


def bench(**kw) -> BenchmarkSpec:
    return BenchmarkSpec(**{"name": "b", "data": "x", "kind": "multiple_choice", **kw})


def test_ask_builds_questions_from_option_columns_choices_and_bad_rows():
    row = {"index": 7.0, "question": "What is it?", "A": "cat", "B": "dog", "C": float("nan"), "answer": "B",
           "category": "pets", "hint": None}
    [q] = ask(row, bench(), "s#0")
    assert (q["id"], q["category"], q["answer"], q["problem"]) == ("7", "pets", "B", None)
    assert q["prompt"].splitlines()[1:3] == ["A. cat", "B. dog"]
    circular = ask({**row, "choices": np.array(["x", "y", "z"]), "answer": "z"}, bench(circular=True), "s#0")
    assert [(q["rotation"], q["answer"]) for q in circular] == [(0, "C"), (1, "B"), (2, "A")]
    assert [json.loads(q["options"])[ord(q["answer"]) - 65] for q in circular] == ["z"] * 3
    gap = ask({**row, "C": None, "D": "bird"}, bench(), "s#1")
    assert gap[0]["problem"].startswith("bad row: option column C is empty")
    assert ask({**row, "answer": "E"}, bench(), "s#2")[0]["problem"] is not None
    assert ask({"question": " ", "answer": "yes"}, bench(kind="yes_no"), "s#3")[0]["problem"].endswith("empty")
    [yn] = ask({"question": "Is it red? Please answer yes or no.", "answer": "No", "id": "q"}, bench(kind="yes_no"), "p")
    assert yn["prompt"] == "Is it red? Please answer yes or no." and yn["answer"] == "no"
    [short] = ask({"question": "Colour?", "answer": ["red", "dark red"]}, bench(kind="short_answer"), "s#9")
    assert short["id"] == "s#9" and short["answer"] == "red | dark red"
    assert score("short_answer", "Dark red.", short).correct


def rows_for(kind, outputs_answers, circular=False, **extra):
    rows = []
    for i, (output, answer, more) in enumerate(outputs_answers):
        asked = {"id": more.get("id", str(i)), "benchmark": "b", "category": more.get("category"),
                 "rotation": more.get("rotation", 0), "answer": answer, "image_key": more.get("image_key"),
                 "error": more.get("error"), "options": json.dumps(more.get("options", ["x", "y", "z"])),
                 "references": json.dumps([answer])}
        s = score(kind, output, asked)
        rows.append({**asked, "output": output, "parsed": s.parsed, "correct": s.correct, "parsed_by": s.how})
    return rows


def test_circular_question_is_right_only_if_every_rotation_is():
    rows = rows_for("multiple_choice", [
        ("A", "A", {"id": "q1", "rotation": 0}), ("C", "C", {"id": "q1", "rotation": 1}),
        ("B", "B", {"id": "q1", "rotation": 2}),
        ("A", "A", {"id": "q2", "rotation": 0}), ("A", "C", {"id": "q2", "rotation": 1}),  # always says A
        ("A", "B", {"id": "q2", "rotation": 2}),
        (None, "B", {"id": "q3", "rotation": 0, "error": "image: cannot decode"}),
        ("x", "A", {"id": "q3", "rotation": 1}), ("", "C", {"id": "q3", "rotation": 2}),
    ])
    m = benchmark_metrics(rows, kind="multiple_choice", circular=True)["overall"]
    assert (m["count"], m["correct"], m["rows"], m["errors"], m["unparsed"]) == (3, 1, 9, 1, 1)
    assert m["accuracy"] == pytest.approx(1 / 3) and m["single_pass_accuracy"] == pytest.approx(2 / 3)
    assert m["parsed_from_text"] == 1  # "x" is the text of option A


def test_pope_counts_and_mme_score():
    rows = rows_for("yes_no", [
        ("Yes", "yes", {"category": "color", "image_key": "i1"}), ("No", "no", {"category": "color", "image_key": "i1"}),
        ("Yes", "yes", {"category": "color", "image_key": "i2"}), ("Yes", "no", {"category": "color", "image_key": "i2"}),
        ("hmm", "yes", {"category": "count", "image_key": "i3"}), ("No", "no", {"category": "count", "image_key": "i3"}),
    ])
    m = benchmark_metrics(rows, kind="yes_no", mme_score=True)
    o = m["overall"]
    assert (o["tp"], o["fp"], o["tn"], o["fn"], o["other"]) == (2, 1, 2, 1, 1)
    assert o["precision"] == pytest.approx(2 / 3) and o["recall"] == pytest.approx(2 / 3)
    assert o["f1"] == pytest.approx(2 / 3) and o["yes_ratio"] == pytest.approx(3 / 6)
    assert m["categories"]["color"]["mme"] == {"images": 2, "acc": 75.0, "acc_plus": 50.0, "score": 125.0}
    assert m["categories"]["count"]["mme"] == {"images": 1, "acc": 50.0, "acc_plus": 0.0, "score": 50.0}
    assert m["mme_total"] == pytest.approx(175.0)
    assert "mme" not in o and o["unparsed"] == 1


def test_tables_show_counts_and_deltas():
    def run(model, outputs):
        rows = rows_for("multiple_choice", [(out, "A", {"category": c}) for out, c in outputs])
        return {"model": model, "benchmarks": {"digits": benchmark_metrics(rows, kind="multiple_choice")}}

    before = run("untrained", [("B", "even"), ("C", "odd"), ("A", "odd"), (None, "even")])
    after = run("trained", [("A", "even"), ("A", "odd"), ("A", "odd"), ("A", "even")])
    table = metrics_table(after)
    assert "| digits | all | 4 | 4 | 100.0 % | 0 | 0 |  |" in table and "|  | even | 2 | 2 | 100.0 % |" in table
    compared = compare_table(after, before, this_label="fine-tuned", other_label="untrained")
    assert "| untrained | fine-tuned | Δ |" in compared.splitlines()[0]
    assert "| digits | all | accuracy | 25.0 % | 100.0 % | +75.0 pt |" in compared
    assert "|  | even | accuracy | 0.0 % | 100.0 % | +100.0 pt |" in compared
    assert "|  |  | questions | 4 | 4 | +0 |" in compared


def test_benchmark_spec_rules_name_the_field():
    with pytest.raises(ValueError, match="circular applies to kind: multiple_choice"):
        bench(kind="yes_no", circular=True)
    with pytest.raises(ValueError, match="mme_score"):
        bench(mme_score=True)
    with pytest.raises(ValueError, match="name"):
        bench(name="a b")
    assert yes_no_label(" Yes ") == "yes"


def test_set_overrides_reach_into_the_benchmark_list():
    from pipelines.evaluate.spec import EvaluateSpec
    from pipelines.specs import SpecError, build_spec

    data = {"model": "m", "output": "o", "benchmarks": [{"name": "a", "data": "x", "kind": "yes_no"},
                                                        {"name": "b", "data": "y", "kind": "numeric"}]}
    spec = build_spec(EvaluateSpec, data, ["benchmarks.1.limit=5", "benchmarks.0.data=s3://b/p", "concurrency=[1, 3]"])
    assert (spec.benchmarks[1].limit, spec.benchmarks[0].data, spec.concurrency) == (5, "s3://b/p", (1, 3))
    with pytest.raises(SpecError) as err:
        build_spec(EvaluateSpec, data, ["benchmarks.2.limit=5"])
    assert err.value.field == "benchmarks" and "list of 2" in str(err.value)
    with pytest.raises(SpecError) as err:
        build_spec(EvaluateSpec, {**data, "benchmarks": data["benchmarks"] * 2})
    assert err.value.field == "benchmarks" and "unique" in str(err.value)
