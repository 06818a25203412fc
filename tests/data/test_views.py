"""Tests for avsd_megatron.data.views: math view builders against spec 3.3, code views and feedback against spec 3.4.

Run: .venv/bin/python -m pytest -q tests/data/test_views.py

Expected payloads are written out by hand from the spec's rules. The feedback tests run real tiny programs in
the bubblewrap sandbox (one program per status).
"""

from collections import Counter

import pytest

from avsd_megatron.data.examples import CodeExample, RowRef
from avsd_megatron.data.views import (
    ANSWER_PREFIX,
    FEEDBACK_FIELD_MAX_CHARS,
    HINT_MAX_CHARS,
    PARTIAL_NOTICE,
    REFERENCE_MAX_CHARS,
    ViewStats,
    code_view_payload,
    feedback_payload,
    feedback_text,
    final_answer,
    hint_payload,
    math_view_payload,
    normalize_views,
    partial_solution,
    reference_payload,
    segment_solution,
    static_hint,
)
from avsd_megatron.verify.extract import extract_code, last_boxed_content, last_boxed_span
from avsd_megatron.verify.sandbox import Sandbox, SandboxConfig, TestCase


def notice(partial: str) -> str:
    return f"{partial}\n\n{PARTIAL_NOTICE}"


# ----------------------------------------------------------------------------------------------------------------
# \boxed{...}


def test_last_boxed_content_matches_nested_braces():
    assert last_boxed_content(r"so \boxed{1} and then \boxed{\frac{1}{2}} done") == r"\frac{1}{2}"
    assert last_boxed_content(r"\boxed{ {a}{b} }") == "{a}{b}"
    assert last_boxed_content("no box here") is None


def test_last_boxed_unclosed_last_box_falls_back_or_gives_none():
    text = r"first \boxed{7} then \boxed{\frac{1}{2}"
    assert last_boxed_content(text) == "7"  # views: the previous balanced box
    assert last_boxed_content(text, skip_unclosed=False) is None  # evaluation grader
    assert last_boxed_span("x \\boxed{12} y") == (2, 12)


# ----------------------------------------------------------------------------------------------------------------
# partial_solution


def test_partial_blank_line_segments_keep_ceil_half():
    solution = "Step one.\n\nStep two.\n\n  \nStep three.\n\nThus \\boxed{4}."
    stats = ViewStats()
    # boxed removed -> "Thus ." is the 4th segment; ceil(0.5 * 4) = 2 kept, joined by a blank line
    assert partial_solution(solution, 0.5, stats) == notice("Step one.\n\nStep two.")
    assert stats.partial_strategies == Counter(blank_lines=1)


def test_partial_removes_only_the_last_boxed():
    solution = "a \\boxed{1}\n\nb\n\nc \\boxed{2}"
    assert segment_solution("a \\boxed{1}\n\nb\n\nc") == (["a \\boxed{1}", "b", "c"], "\n\n", "blank_lines")
    assert partial_solution(solution) == notice("a \\boxed{1}\n\nb")


def test_partial_step_lines_when_no_blank_lines():
    solution = "Setup:\n1. expand\n2) collect terms\n- simplify\n* check\n• conclude"
    segments, joiner, strategy = segment_solution(solution)
    assert (segments, joiner, strategy) == (
        ["Setup:", "1. expand", "2) collect terms", "- simplify", "* check", "• conclude"],
        "\n",
        "step_lines",
    )
    assert partial_solution(solution) == notice("Setup:\n1. expand\n2) collect terms")  # ceil(0.5 * 6) = 3


def test_partial_sentences_when_no_lines():
    solution = "We add. Then we divide! Is it even? Yes."
    stats = ViewStats()
    assert partial_solution(solution, 0.5, stats) == notice("We add. Then we divide!")
    assert partial_solution(solution, 0.2, stats) == notice("We add.")  # ceil(0.8) = 1
    assert stats.partial_strategies == Counter(sentences=2)


def test_partial_keeps_at_most_n_minus_one_and_at_least_one():
    two = "First.\n\nSecond."
    assert partial_solution(two, 0.99) == notice("First.")  # ceil(1.98) = 2 -> capped at n - 1 = 1
    assert partial_solution(two, 0.01) == notice("First.")  # ceil(0.02) = 1
    ten = "\n\n".join(f"s{i}" for i in range(10))
    assert partial_solution(ten, 0.3) == notice("s0\n\ns1\n\ns2")  # exact ceil(3) = 3, not 4 from 3.0000000000000004
    assert partial_solution(ten, 0.31) == notice("s0\n\ns1\n\ns2\n\ns3")


def test_partial_char_prefix_fallback():
    stats = ViewStats()
    assert partial_solution("x=2+3", 0.5, stats) == notice("x=2")  # ceil(2.5) = 3 characters
    assert partial_solution("ab", 0.9, stats) == notice("a")  # ceil(1.8) = 2 -> capped at len - 1
    assert partial_solution("z \\boxed{9}", 0.5, stats) == notice("z")  # base "z": one char, kept whole
    assert partial_solution("a     b", 0.5, stats) == notice("a")  # prefix "a   " right-stripped
    assert stats.partial_strategies == Counter(char_prefix=4)


def test_partial_empty_base_gives_notice_only():
    stats = ViewStats()
    assert partial_solution("  \\boxed{42}  ", 0.5, stats) == PARTIAL_NOTICE
    assert stats.partial_strategies == Counter(empty=1)


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.5, 1.5])
def test_partial_rejects_ratio_outside_open_unit_interval(ratio):
    with pytest.raises(ValueError, match="partial_solution_ratio"):
        partial_solution("a. b.", ratio)


# ----------------------------------------------------------------------------------------------------------------
# answer_only


@pytest.mark.parametrize(
    "solution, answer, rule",
    [
        ("so \\boxed{3} and finally \\boxed{ \\frac{\\pi}{2} }", "\\frac{\\pi}{2}", "boxed"),
        ("work\nAnswer: 12\nmore\nFINAL ANSWER :  x = 5 \ncheck done", "x = 5", "answer_line"),
        ("work\nanswer:7", "7", "answer_line"),
        ("some work\n\nthe result is 19\n\n   ", "the result is 19", "last_line"),
        ("Answer:\nlast", "last", "last_line"),  # "Answer:" with nothing after the colon does not match
        ("   \n  ", "", "empty"),
    ],
)
def test_final_answer_rules(solution, answer, rule):
    stats = ViewStats()
    assert final_answer(solution, stats) == (answer, rule)
    assert stats.answer_rules == Counter({rule: 1})
    assert stats.answer_fallbacks == (rule != "boxed")


def test_math_view_payloads():
    solution = "  Line one.\n\nLine two.\n\n\\boxed{5}  "
    stats = ViewStats()
    assert math_view_payload("full_solution", solution) == "Line one.\n\nLine two.\n\n\\boxed{5}"
    assert math_view_payload("partial_solution", solution, stats=stats) == notice("Line one.")
    assert math_view_payload("answer_only", solution, stats=stats) == ANSWER_PREFIX + "5"
    assert stats.answer_rules == Counter(boxed=1)
    with pytest.raises(ValueError, match="'hint' is not one of"):
        math_view_payload("hint", solution)


def test_normalize_views_dedupes_and_validates():
    allowed = ("full_solution", "partial_solution", "answer_only")
    assert normalize_views("answer_only, full_solution,answer_only", allowed) == ("answer_only", "full_solution")
    with pytest.raises(ValueError, match="'hints' is not one of"):
        normalize_views(["hints"], allowed)
    with pytest.raises(ValueError, match="names no view"):
        normalize_views(" , ", allowed)


# ----------------------------------------------------------------------------------------------------------------
# Code views


def code_example(**overrides) -> CodeExample:
    fields = dict(
        id="1A",
        problem="Print the sum of two integers.",
        input_format="",
        output_format="",
        constraints="",
        examples=(TestCase("1 2\n", "3\n"),),
        public_tests=(TestCase("1 2\n", "3\n"), TestCase("5 7\n", "12\n")),
        hidden_tests=(),
        reference_solution="import sys\nfrom collections import Counter\na, b = map(int, input().split())\nprint(a+b)",
        algorithm_hint="",
        row=RowRef("mem.jsonl", 0),
    )
    fields.update(overrides)
    return CodeExample(**fields)


def test_reference_payload_truncates_to_12000_chars():
    long_code = "x = 1\n" * 3000  # 18,000 characters
    payload = reference_payload(code_example(reference_solution=long_code))
    body = payload.split("```python\n", 1)[1].rsplit("\n```", 1)[0]
    assert body == long_code[:REFERENCE_MAX_CHARS].rstrip()
    assert payload.endswith("\n```")


def test_hint_payload_uses_hint_truncated_or_static_fallback():
    stats = ViewStats()
    given = hint_payload(code_example(algorithm_hint="  Use a greedy scan.  "), stats=stats)
    assert given.endswith("\nUse a greedy scan.")
    long_hint = hint_payload(code_example(algorithm_hint="h" * 5000))
    assert long_hint.endswith("\n" + "h" * HINT_MAX_CHARS)
    assert stats.static_hints == 0
    fallback = hint_payload(code_example(algorithm_hint="   "), stats=stats)
    assert stats.static_hints == 1
    expected = static_hint(code_example().problem, code_example().reference_solution)
    assert fallback.endswith("\n" + expected)


def test_static_hint_is_deterministic_and_reads_the_reference():
    ref = "import heapq, sys\nfrom bisect import bisect_left\nxs = sorted(a)\nMOD = 10**9 + 7\n"
    hint = static_hint("Find   the\nk-th element.", ref)
    assert hint == static_hint("Find   the\nk-th element.", ref)
    assert "Problem in brief: Find the k-th element." in hint
    assert "Modules the accepted program uses: bisect, heapq, sys." in hint
    for technique in ("sorting", "binary search", "a heap / priority queue", "modular arithmetic"):
        assert technique in hint
    assert len(static_hint("p" * 10_000, ref, max_chars=300)) <= 300


# ----------------------------------------------------------------------------------------------------------------
# Code extraction (spec 3.4 order)


def test_extract_code_prefers_last_final_code_region():
    text = (
        "<final_code>\n```python\nprint(1)\n```\n</final_code>\n"
        "Actually better:\n<final_code>\n```python\nprint(2)\n```\n</final_code>\n```python\nprint(3)\n```"
    )
    assert extract_code(text) == "print(2)"


def test_extract_code_prefers_python_fence_then_any_fence():
    assert extract_code("```python\nprint(1)\n```\ntext\n```py\nprint(2)\n```\n```text\nnot code\n```") == "print(2)"
    assert extract_code("```\nprint(1)\n```\n```cpp\nint main(){}\n```") == "int main(){}"


def test_extract_code_strips_leading_prose_without_fences():
    text = "Here is my solution.\nIt reads two numbers.\n\nn, m = map(int, input().split())\nprint(n + m)\n\n"
    assert extract_code(text) == "n, m = map(int, input().split())\nprint(n + m)"
    assert extract_code("import sys\r\nprint(sys.stdin.read())\r\n") == "import sys\nprint(sys.stdin.read())"
    assert extract_code("   \n ") == ""
    assert extract_code("<final_code>\n</final_code>") == ""


# ----------------------------------------------------------------------------------------------------------------
# Feedback: one real program per status


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    return Sandbox(SandboxConfig(wall_time_s=1.0, memory_mb=256))


def fenced(code: str) -> str:
    return f"I think this works.\n<final_code>\n```python\n{code}\n```\n</final_code>"


@pytest.mark.parametrize(
    "completion, status, must_contain",
    [
        (fenced("a, b = map(int, input().split())\nprint(a + b)"), "passed", ["passed every public test"]),
        (fenced("def f(:\n    pass"), "syntax_error", ["does not compile", "SyntaxError"]),
        (
            fenced("a, b = map(int, input().split())\nprint([a][b])"),
            "runtime_error",
            ["crashed", "IndexError", "Traceback", "main.py", "Input that triggered it:\n1 2"],
        ),
        (
            fenced("a, b = map(int, input().split())\nprint(a + b if a < 5 else a * b)"),
            "wrong_answer",
            ["wrong answer", "Input:\n5 7", "Expected output:\n12", "Program output:\n35"],
        ),
        (fenced("while True:\n    pass"), "timeout", ["time limit", "Input:\n1 2"]),
        ("<final_code>\n</final_code>", "extraction_failure", ["no Python program"]),
    ],
)
@pytest.mark.bwrap
def test_feedback_payload_status_from_real_program(sandbox, completion, status, must_contain):
    example = code_example()
    feedback = feedback_payload(completion, example.public_tests, sandbox)
    assert feedback.status == status
    assert feedback.result.status == status
    for text in must_contain:
        assert text in feedback.payload
    assert code_view_payload("feedback", example, feedback=feedback) == feedback.payload


@pytest.mark.bwrap
def test_feedback_output_comparison_normalises_line_ends(sandbox):
    tests = (TestCase("", "a\nb\n"),)
    ok = feedback_payload(fenced("print('a  \\r\\nb\\n\\n\\n', end='')"), tests, sandbox)
    assert ok.status == "passed"
    leading = feedback_payload(fenced("print(' a\\nb')"), tests, sandbox)  # leading space still counts
    assert leading.status == "wrong_answer"
    gap = feedback_payload(fenced("print('a\\n\\nb')"), tests, sandbox)  # inner blank line still counts
    assert gap.status == "wrong_answer"


@pytest.mark.bwrap
def test_feedback_fields_are_truncated_to_1200_chars(sandbox):
    big = "9" * 3000
    tests = (TestCase(big + "\n", "0\n"),)
    feedback = feedback_payload(fenced("print(input())"), tests, sandbox)
    assert feedback.status == "wrong_answer"
    assert big[:FEEDBACK_FIELD_MAX_CHARS] + "\n...[cut]" in feedback.payload
    assert big[: FEEDBACK_FIELD_MAX_CHARS + 1] not in feedback.payload
    assert feedback_text(feedback.result, max_field_chars=10).count("9" * 10 + "\n...[cut]") == 2


def test_code_view_payload_requires_feedback_for_feedback_view():
    with pytest.raises(ValueError, match="needs feedback="):
        code_view_payload("feedback", code_example())
    with pytest.raises(ValueError, match="'answer_only' is not one of"):
        code_view_payload("answer_only", code_example())
