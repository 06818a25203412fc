"""Tests for avsd_megatron.verify.grading: math answer extraction and equivalence (spec 5.2), Avg@k / format rate,
unbiased pass@k against the closed form, code metrics (spec 5.3) on real sandbox runs.

Run: .venv/bin/python -m pytest -q tests/verify/test_grading.py

Every expected value is worked out by hand in the test (or from math.comb for pass@k).
"""

import math

import pytest

from avsd_megatron.verify.grading import (
    MathGrade,
    code_scores,
    grade_code_completion,
    grade_math_answer,
    grade_math_completion,
    math_answer,
    math_scores,
    pass_at_k,
)
from avsd_megatron.verify.sandbox import Sandbox, SandboxConfig, TestCase

# ----------------------------------------------------------------------------------------------------------------
# Math


def test_math_answer_is_last_brace_matched_box():
    assert math_answer(r"first \boxed{1}, finally \boxed{\frac{1}{2}}.") == r"\frac{1}{2}"
    assert math_answer(r"\boxed{ 3 } and \boxed{\sqrt{4}") is None  # unclosed last box: no answer
    assert math_answer("The answer is 5.") is None


@pytest.mark.parametrize(
    "predicted, gold",
    [
        (r"\frac{1}{2}", "0.5"),
        ("0.5", r"\frac12"),
        (r"\dfrac{3}{6}", "1/2"),
        ("3.0", "3"),
        (r"\frac{\sqrt{3}}{2}", r"\frac{\sqrt3}{2}"),
        ("x + 1", "1 + x"),
        (r"2\pi", r"\pi \cdot 2"),
        ("$12$", "12"),
        ("(1, 2)", "(1,2)"),
    ],
)
def test_grade_math_answer_equivalent_forms(predicted, gold):
    assert grade_math_answer(predicted, gold)


@pytest.mark.parametrize("predicted, gold", [("5", "6"), (r"\frac{1}{3}", "0.33"), ("x + 2", "x + 1"), (None, "1")])
def test_grade_math_answer_different_values(predicted, gold):
    assert not grade_math_answer(predicted, gold)


def test_grade_math_answer_falls_back_to_exact_match_when_math_verify_raises(monkeypatch):
    import math_verify

    def broken(*args, **kwargs):
        raise RuntimeError("parser exploded")

    monkeypatch.setattr(math_verify, "verify", broken)
    assert grade_math_answer(r"\text{ A B }", r"$\text{ab}$")  # whitespace and $ removed, lower-cased
    assert grade_math_answer("0.5", "0.5")
    assert not grade_math_answer("ab c", "abd")
    assert not grade_math_answer(r"\frac{1}{2}", "0.5")  # no maths without math_verify


def test_math_scores_avg_pass_and_format_rate():
    g = lambda answer, correct: MathGrade(answer, correct)  # noqa: E731
    grades = [
        [g("2", True), g("3", False), g(None, False), g("2", True)],  # 2 correct, 3 formatted
        [g(None, False), g("7", False), g("7", False), g("7", False)],  # 0 correct, 3 formatted
        [g("1", True), g("1", True), g("1", True), g("1", True)],  # 4 correct, 4 formatted
    ]
    scores = math_scores(grades)
    assert scores.k == 4 and scores.problems == 3
    assert scores.avg_at_k == pytest.approx(100 * 6 / 12)
    assert scores.pass_at_k == pytest.approx(100 * 2 / 3)
    assert scores.format_rate == pytest.approx(100 * 10 / 12)
    assert scores.as_dict()["avg@4"] == pytest.approx(50.0)


def test_math_scores_rejects_ragged_or_empty_grids():
    with pytest.raises(ValueError, match="problem 1 has 1 samples, problem 0 has 2"):
        math_scores([[MathGrade("1", True)] * 2, [MathGrade("1", True)]])
    with pytest.raises(ValueError, match="no problems"):
        math_scores([])


def test_grade_math_completion():
    grade = grade_math_completion(r"... so the total is \boxed{\frac{4}{8}}.", "0.5")
    assert grade == MathGrade(r"\frac{4}{8}", True) and grade.formatted
    unformatted = grade_math_completion("I think it is 0.5", "0.5")
    assert not unformatted.correct and not unformatted.formatted


# ----------------------------------------------------------------------------------------------------------------
# pass@k


def closed_form_pass_at_k(n: int, c: int, k: int) -> float:
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)  # comb(m, k) = 0 for m < k


@pytest.mark.parametrize("n", [1, 2, 5, 8, 20])
def test_pass_at_k_matches_closed_form(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(closed_form_pass_at_k(n, c, k), rel=1e-12, abs=1e-12)


def test_pass_at_k_hand_checked_values():
    assert pass_at_k(8, 0, 1) == 0.0
    assert pass_at_k(8, 2, 1) == pytest.approx(2 / 8)  # k = 1: c / n
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # C(3,2)/C(4,2) = 3/6
    assert pass_at_k(5, 4, 2) == 1.0  # n - c < k: every 2-subset holds a pass


@pytest.mark.parametrize("n, c, k", [(0, 0, 1), (4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)])
def test_pass_at_k_rejects_bad_arguments(n, c, k):
    with pytest.raises(ValueError, match="pass_at_k needs"):
        pass_at_k(n, c, k)


def test_code_scores_hand_checked():
    statuses = [
        ["passed", "wrong_answer", "passed", "timeout"],  # first passes, c = 2
        ["runtime_error", "passed", "wrong_answer", "wrong_answer"],  # first fails, c = 1
        ["syntax_error", "extraction_failure", "wrong_answer", "timeout"],  # c = 0
    ]
    scores = code_scores(statuses, ks=(1, 2))
    assert (scores.problems, scores.n) == (3, 4)
    assert scores.avg_at_n == pytest.approx(100 * 3 / 12)
    assert scores.pass_at_1_first == pytest.approx(100 * 1 / 3)
    assert scores.pass_at_n == pytest.approx(100 * 2 / 3)
    assert scores.unbiased_pass_at_k[1] == pytest.approx(scores.avg_at_n)  # k = 1 is avg@n
    p2 = [1 - math.comb(2, 2) / math.comb(4, 2), 1 - math.comb(3, 2) / math.comb(4, 2), 0.0]
    assert scores.unbiased_pass_at_k[2] == pytest.approx(100 * sum(p2) / 3)
    assert scores.unbiased_pass_at_k[4] == pytest.approx(scores.pass_at_n)  # k = n is "any passes"
    assert scores.status_rates["wrong_answer"] == pytest.approx(100 * 4 / 12)
    assert scores.status_rates["passed"] == pytest.approx(25.0)
    d = scores.as_dict()
    assert d["avg@4"] == scores.avg_at_n and d["pass@1"] == scores.pass_at_1_first and "unbiased_pass@2" in d


def test_code_scores_rejects_bad_input():
    with pytest.raises(ValueError, match=r"statuses\[0\]\[1\]='ok' is not one of"):
        code_scores([["passed", "ok"]])
    with pytest.raises(ValueError, match=r"ks=\(3,\) must lie in \[1, n=2\]"):
        code_scores([["passed", "passed"]], ks=(3,))


@pytest.mark.bwrap
def test_grade_code_completion_runs_hidden_tests():
    sandbox = Sandbox(SandboxConfig(wall_time_s=1.0))
    tests = (TestCase("2 3\n", "5\n"), TestCase("10 -4\n", "6\n"))
    good = "<final_code>\n```python\na, b = map(int, input().split())\nprint(a + b)\n```\n</final_code>"
    bad = "```python\na, b = map(int, input().split())\nprint(abs(a) + abs(b))\n```"
    statuses = [[grade_code_completion(c, tests, sandbox).status for c in (good, bad)]]
    assert statuses == [["passed", "wrong_answer"]]
    assert code_scores(statuses).avg_at_n == pytest.approx(50.0)
