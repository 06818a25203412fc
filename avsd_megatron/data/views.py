"""Privileged views: the payload text each teacher view sees (math spec 3.3, code spec 3.4).

    math  full_solution      the reference solution, stripped
          partial_solution   the solution without its last \\boxed{...}, cut to ceil(r*n) of n segments + a notice
          answer_only        the final answer: last \\boxed{...}, else an "Answer: ..." line, else the last line
    code  reference          the accepted reference program (first 12,000 characters) in a python fence
          hint               the algorithm hint (first 2,000 characters), or a deterministic static hint
          feedback           what happened when the student's own code ran on the public tests (per rollout)

The prompt around a payload (problem text, privileged-reference markers, instructions) is `prompts.py`'s job.
Fallbacks that the spec wants counted (answer extraction rule, segmentation strategy) are tallied in a
`ViewStats` the caller passes in and reports.
"""

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction

from avsd_megatron.data.examples import CodeExample
from avsd_megatron.verify.extract import extract_code, last_boxed_content, last_boxed_span
from avsd_megatron.verify.sandbox import ExecutionResult, Sandbox, Status, TestCase, run_tests

MATH_VIEWS = ("full_solution", "partial_solution", "answer_only")
CODE_VIEWS = ("reference", "hint", "feedback")

DEFAULT_PARTIAL_RATIO = 0.5
"""`partial_solution_ratio` (spec 2.5); must lie in (0, 1)."""
REFERENCE_MAX_CHARS = 12_000
HINT_MAX_CHARS = 2_000
FEEDBACK_FIELD_MAX_CHARS = 1_200
"""Each quoted field of the feedback text (input, expected, output, traceback) is cut to this (spec 3.4)."""

PARTIAL_NOTICE = "[Note: this reference stops partway through; later steps and the final answer may be missing.]"
ANSWER_PREFIX = "Final answer (checked): "
_TRUNCATION_MARK = "\n...[cut]"


def normalize_views(views: str | Iterable[str], allowed: Sequence[str], *, name: str = "views") -> tuple[str, ...]:
    """Parse a view list ("a,b" or a sequence): order kept, duplicates dropped, each in `allowed`, not empty."""
    items = views.split(",") if isinstance(views, str) else list(views)
    out: list[str] = []
    for item in items:
        view = str(item).strip()
        if not view:
            continue
        if view not in allowed:
            raise ValueError(f"{name}: {view!r} is not one of {tuple(allowed)}")
        if view not in out:
            out.append(view)
    if not out:
        raise ValueError(f"{name}={views!r} names no view; choose from {tuple(allowed)}")
    return tuple(out)


@dataclass
class ViewStats:
    """Counts of the rule behind each answer_only answer and partial_solution cut, and of static hints."""

    answer_rules: Counter = field(default_factory=Counter)
    """"boxed" | "answer_line" | "last_line" | "empty" -> count. Anything but "boxed" is a fallback."""
    partial_strategies: Counter = field(default_factory=Counter)
    """"blank_lines" | "step_lines" | "sentences" | "char_prefix" | "empty" -> count."""
    static_hints: int = 0
    """hint payloads that fell back to `static_hint` (no algorithm_hint)."""

    @property
    def answer_fallbacks(self) -> int:
        return sum(n for rule, n in self.answer_rules.items() if rule != "boxed")


# ----------------------------------------------------------------------------------------------------------------
# Math views (spec 3.3)

_BLANK_LINES = re.compile(r"\n\s*\n+")
_STEP_LINE_START = re.compile(r"(?=^\s*(?:[-*•]|\d+[.)]))", flags=re.MULTILINE)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_SEGMENTERS = (  # (name, splitter, joiner), tried in order; the first giving > 1 segment wins
    ("blank_lines", _BLANK_LINES, "\n\n"),
    ("step_lines", _STEP_LINE_START, "\n"),
    ("sentences", _SENTENCE_END, " "),
)
_ANSWER_LINE = re.compile(r"^(?:final answer|answer)\s*:\s*(.+)$", flags=re.IGNORECASE)


def segment_solution(text: str) -> tuple[list[str], str, str] | None:
    """(segments, joiner, strategy) by the first strategy with > 1 non-empty stripped segment (spec 3.3):
    blank lines ("\\n\\n"), then before bullet/numbered lines `-`, `*`, `•`, `N.`, `N)` ("\\n"), then after
    `.`/`!`/`?` + whitespace (" "). None if none splits the text."""
    for name, pattern, joiner in _SEGMENTERS:
        segments = [s.strip() for s in pattern.split(text) if s.strip()]
        if len(segments) > 1:
            return segments, joiner, name
    return None


def _ceil_fraction(ratio: float, n: int) -> int:
    return math.ceil(Fraction(ratio) * n)  # exact: float 0.3 * 10 rounds to 3.0000000000000004


def partial_solution(solution: str, ratio: float = DEFAULT_PARTIAL_RATIO, stats: ViewStats | None = None) -> str:
    """partial_solution payload (spec 3.3).

    Removes the last brace-matched \\boxed{...}; segments (`segment_solution`); keeps the first ceil(ratio*n)
    segments, at least 1 and at most n-1; if the text does not segment, keeps a ceil(ratio*len)-character
    prefix (at least 1, at most len-1). Appends a blank line and `PARTIAL_NOTICE`; an empty base gives the
    notice alone.
    """
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"partial_solution_ratio={ratio!r} must lie in (0, 1)")
    span = last_boxed_span(solution)
    base = (solution[: span[0]] + solution[span[1] :] if span else solution).strip()
    if not base:
        _count(stats, "partial_strategies", "empty")
        return PARTIAL_NOTICE
    segmented = segment_solution(base)
    if segmented is not None:
        segments, joiner, strategy = segmented
        keep = min(max(1, _ceil_fraction(ratio, len(segments))), len(segments) - 1)
        partial = joiner.join(segments[:keep]).strip()
    else:
        strategy = "char_prefix"
        keep = max(1, _ceil_fraction(ratio, len(base)))
        if len(base) > 1:
            keep = min(keep, len(base) - 1)
        partial = base[:keep].rstrip() or base[:1]
    _count(stats, "partial_strategies", strategy)
    return f"{partial}\n\n{PARTIAL_NOTICE}"


def final_answer(solution: str, stats: ViewStats | None = None) -> tuple[str, str]:
    """(answer, rule) for the answer_only view (spec 3.3), first rule that applies:

        "boxed"        stripped content of the last brace-matched \\boxed{...}
        "answer_line"  the last line `final answer: X` / `answer: X` (case-insensitive) -> X
        "last_line"    the last non-empty line
        "empty"        the solution is blank -> ""

    The spec's fourth fallback (the last 128 characters) can only fire when no non-empty line exists, i.e.
    for a blank solution, where it yields "" as well; it is therefore folded into "empty".
    """
    text = solution.strip()
    boxed = last_boxed_content(text)
    if boxed is not None:
        answer, rule = boxed, "boxed"
    else:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        matches = [m.group(1).strip() for m in map(_ANSWER_LINE.match, lines) if m]
        if matches:
            answer, rule = matches[-1], "answer_line"
        elif lines:
            answer, rule = lines[-1], "last_line"
        else:
            answer, rule = "", "empty"
    _count(stats, "answer_rules", rule)
    return answer, rule


def math_view_payload(
    view: str, solution: str, *, ratio: float = DEFAULT_PARTIAL_RATIO, stats: ViewStats | None = None
) -> str:
    """Payload text of one math view (`MATH_VIEWS`)."""
    if view == "full_solution":
        return solution.strip()
    if view == "partial_solution":
        return partial_solution(solution, ratio, stats)
    if view == "answer_only":
        return ANSWER_PREFIX + final_answer(solution, stats)[0]
    raise ValueError(f"math view {view!r} is not one of {MATH_VIEWS}")


def _count(stats: ViewStats | None, counter: str, key: str) -> None:
    if stats is not None:
        getattr(stats, counter)[key] += 1


# ----------------------------------------------------------------------------------------------------------------
# Code views (spec 3.4, 5.1)

_TECHNIQUE_CUES = (  # (technique, regex over the reference program), for the static hint
    ("sorting", r"\bsorted\(|\.sort\("),
    ("binary search", r"\bbisect\b|\bwhile\s+(?:lo|l|left)\s*<"),
    ("a heap / priority queue", r"\bheapq\b|\bheappush\b"),
    ("graph traversal (BFS/DFS)", r"\bdeque\b|\bdfs\b|\bbfs\b|\badj\b|\bgraph\b"),
    ("dynamic programming", r"\bdp\b|\bmemo\b|\blru_cache\b|\bcache\b"),
    ("prefix sums", r"\bprefix\b|\bpref\b|\baccumulate\b"),
    ("counting with hash maps / sets", r"\bCounter\b|\bdefaultdict\b|\bset\("),
    ("modular arithmetic", r"\bMOD\b|\bmod\b|%\s*\(?10\s*\*\*\s*9"),
    ("number theory (gcd / lcm)", r"\bgcd\b|\blcm\b"),
    ("bit manipulation", r"<<|>>|\bbin\("),
)
_IMPORT = re.compile(r"^\s*(?:from\s+([\w.]+)\s+import|import\s+([\w., ]+))", flags=re.MULTILINE)


def truncate_text(text: str, max_chars: int) -> str:
    """`text` cut to `max_chars` characters (right-stripped) plus a visible cut mark, or unchanged if short."""
    return text if len(text) <= max_chars else text[:max_chars].rstrip() + _TRUNCATION_MARK


def static_hint(problem: str, reference_solution: str, max_chars: int = HINT_MAX_CHARS) -> str:
    """Deterministic stand-in for a missing algorithm hint (spec 5.1): a problem excerpt, the modules the
    reference imports, and techniques spotted in it by keyword. No model call; same input -> same text."""
    modules = set()
    for a, b in _IMPORT.findall(reference_solution):
        names = [a] if a else [n.strip().split(" ")[0] for n in b.split(",")]
        modules.update(n.split(".")[0] for n in names if n)
    techniques = [name for name, cue in _TECHNIQUE_CUES if re.search(cue, reference_solution)]
    excerpt = " ".join(problem.split())[:400]
    lines = [
        "No written hint exists for this problem; these cues come from the problem and the accepted program.",
        f"Problem in brief: {excerpt}",
        f"Modules the accepted program uses: {', '.join(sorted(modules)) or 'none beyond built-ins'}.",
        f"Techniques it appears to use: {', '.join(techniques) or 'none detected by keyword'}.",
        "Read the input exactly as specified, handle the smallest and largest cases, and keep the complexity "
        "within the constraints.",
    ]
    return "\n".join(lines)[:max_chars].rstrip()


def reference_payload(example: CodeExample, max_chars: int = REFERENCE_MAX_CHARS) -> str:
    """reference view: the accepted program, its first `max_chars` characters, in a python fence."""
    code = example.reference_solution[:max_chars].rstrip()
    return f"An accepted solution to this problem:\n```python\n{code}\n```"


def hint_payload(example: CodeExample, max_chars: int = HINT_MAX_CHARS, stats: ViewStats | None = None) -> str:
    """hint view: `algorithm_hint` (first `max_chars` characters), or `static_hint` when it is blank
    (counted in `stats.static_hints`)."""
    hint = example.algorithm_hint.strip()[:max_chars].rstrip()
    if not hint:
        if stats is not None:
            stats.static_hints += 1
        hint = static_hint(example.problem, example.reference_solution, max_chars)
    return f"How to solve it:\n{hint}"


def feedback_text(result: ExecutionResult, max_field_chars: int = FEEDBACK_FIELD_MAX_CHARS) -> str:
    """The feedback view's text for one execution result (spec 3.4); every quoted field cut to
    `max_field_chars`."""

    def quote(value: str | None) -> str:
        return truncate_text(value or "", max_field_chars)

    status = result.status
    if status == "passed":
        return "Outcome: the student's program passed every public test.\nKeep what already works."
    if status == "extraction_failure":
        return (
            "Outcome: no Python program was found in the student's answer.\n"
            "A complete Python 3 program is needed."
        )
    if status == "syntax_error":
        return (
            f"Outcome: the student's program does not compile.\n\nCompiler message:\n{quote(result.traceback)}"
            "\n\nThe syntax has to be fixed first."
        )
    if status == "runtime_error":
        return (
            "Outcome: the student's program crashed.\n\n"
            f"Error:\n{quote(result.error_type)}\n\n"
            f"Traceback:\n{quote(result.traceback)}\n\n"
            f"Input that triggered it:\n{quote(result.failing_input)}"
        )
    if status == "wrong_answer":
        return (
            "Outcome: the student's program printed a wrong answer.\n\n"
            f"Input:\n{quote(result.failing_input)}\n\n"
            f"Expected output:\n{quote(result.expected_output)}\n\n"
            f"Program output:\n{quote(result.actual_output)}"
        )
    if status == "timeout":
        return (
            "Outcome: the student's program ran past the time limit.\n\n"
            f"Input:\n{quote(result.failing_input)}\n\n"
            "It is probably too slow, or it never stops."
        )
    raise ValueError(f"execution status {status!r} is not one of the known statuses")


@dataclass(frozen=True)
class CodeFeedback:
    """The feedback view of one rollout."""

    status: Status
    payload: str
    """Feedback view payload (goes inside the privileged-reference block)."""
    code: str
    """The extracted program ("" on extraction_failure)."""
    result: ExecutionResult


def feedback_payload(completion: str, tests: Sequence[TestCase], sandbox: Sandbox) -> CodeFeedback:
    """feedback view (spec 3.4): extract the student's code, run it on `tests` (the public tests) in the
    sandbox, stop at the first failure, and describe the outcome."""
    code = extract_code(completion)
    result = run_tests(code, tests, sandbox)
    payload = f"What happened when the student's program was run:\n{feedback_text(result)}"
    return CodeFeedback(result.status, payload, code, result)


def code_view_payload(
    view: str, example: CodeExample, *, feedback: CodeFeedback | None = None, stats: ViewStats | None = None
) -> str:
    """Payload text of one code view (`CODE_VIEWS`); "feedback" needs the rollout's `feedback_payload`."""
    if view == "reference":
        return reference_payload(example)
    if view == "hint":
        return hint_payload(example, stats=stats)
    if view == "feedback":
        if feedback is None:
            raise ValueError("code view 'feedback' needs feedback=feedback_payload(completion, ...) of the rollout")
        return feedback.payload
    raise ValueError(f"code view {view!r} is not one of {CODE_VIEWS}")
