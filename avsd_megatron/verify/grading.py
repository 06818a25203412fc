"""Evaluation graders and metrics: math answers (spec 5.2) and code samples (spec 5.3).

Math: the predicted answer is the content of the last brace-matched `\\boxed{...}` of the completion (an
unclosed last `\\boxed{` means no answer, as in the reference's evaluator). Gold and prediction are each wrapped
in `$...$` unless they already contain a `$`, parsed with `math_verify.parse(..., fallback_mode="no_fallback")`
and compared with `math_verify.verify(gold, pred, timeout_seconds=5)`. If math_verify raises, the grade is an
exact match after removing whitespace and `$` and lower-casing. Note that math_verify's timeouts use SIGALRM:
called off the main thread they raise, and the exact-match fallback decides.

    Avg@k       = 100 * correct / (problems * k)
    Pass@k      = 100 * (problems with any correct sample) / problems
    format rate = 100 * (samples with a boxed answer) / (problems * k)

Code: a sample passes when `run_tests` on the problem's tests (hidden = official tests for evaluation) returns
"passed". With n samples per problem:

    avg@n       = 100 * passed samples / (problems * n)
    pass@1      = 100 * share of problems whose *first* sample passes (the reference's definition)
    pass@n      = 100 * share of problems with any passing sample
    pass@k (unbiased, Chen et al. 2021) = 100 * mean over problems of 1 - C(n-c, k) / C(n, k), c = passing
                  samples; for k = 1 it equals avg@n, for k = n it equals pass@n.

All metrics are percentages.
"""

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from avsd_megatron.verify.extract import extract_code, last_boxed_content
from avsd_megatron.verify.sandbox import STATUSES, ExecutionResult, Sandbox, TestCase, run_tests

MATH_VERIFY_TIMEOUT_S = 5


# ----------------------------------------------------------------------------------------------------------------
# Math


def math_answer(completion: str) -> str | None:
    """Content of the last brace-matched \\boxed{...}; None if there is none (or the last one never closes)."""
    return last_boxed_content(completion, skip_unclosed=False)


def _exact_form(text: str) -> str:
    return "".join(text.replace("$", "").split()).lower()


def grade_math_answer(predicted: str | None, gold: str, *, timeout_s: int = MATH_VERIFY_TIMEOUT_S) -> bool:
    """Whether `predicted` (already extracted) equals `gold` (module docstring for the rule)."""
    try:
        from math_verify import parse, verify
    except ImportError as err:
        raise ImportError("math grading needs math-verify: pip install -e '.[eval]'") from err
    if predicted is None:
        return False
    pred = predicted if "$" in predicted else f"${predicted}$"
    ref = gold if "$" in gold else f"${gold}$"
    try:
        parsed_ref = parse(ref, fallback_mode="no_fallback", parsing_timeout=timeout_s)
        parsed_pred = parse(pred, fallback_mode="no_fallback", parsing_timeout=timeout_s)
        return bool(verify(parsed_ref, parsed_pred, timeout_seconds=timeout_s))
    except Exception:  # the reference's rule: any math_verify failure falls back to exact match
        return _exact_form(pred) == _exact_form(ref)


@dataclass(frozen=True)
class MathGrade:
    """One graded math completion."""

    answer: str | None
    """Extracted boxed answer, None if the completion has none."""
    correct: bool

    @property
    def formatted(self) -> bool:
        return self.answer is not None


def grade_math_completion(completion: str, gold: str) -> MathGrade:
    answer = math_answer(completion)
    return MathGrade(answer, grade_math_answer(answer, gold))


@dataclass(frozen=True)
class MathScores:
    problems: int
    k: int
    avg_at_k: float
    pass_at_k: float
    format_rate: float

    def as_dict(self) -> dict[str, float]:
        return {
            f"avg@{self.k}": self.avg_at_k,
            f"pass@{self.k}": self.pass_at_k,
            "format_rate": self.format_rate,
            "problems": float(self.problems),
        }


def _check_grid(grid: Sequence[Sequence], name: str) -> int:
    """Samples per problem of a [problems][k] grid; raises unless every problem has the same k >= 1."""
    if not grid:
        raise ValueError(f"{name}: no problems")
    k = len(grid[0])
    for i, row in enumerate(grid):
        if len(row) != k or k == 0:
            raise ValueError(f"{name}: problem {i} has {len(row)} samples, problem 0 has {k} (need the same k >= 1)")
    return k


def math_scores(grades: Sequence[Sequence[MathGrade]]) -> MathScores:
    """Avg@k, Pass@k and format rate over grades[problem][sample]."""
    k = _check_grid(grades, "math_scores")
    flat = [g for row in grades for g in row]
    return MathScores(
        problems=len(grades),
        k=k,
        avg_at_k=100.0 * sum(g.correct for g in flat) / len(flat),
        pass_at_k=100.0 * sum(any(g.correct for g in row) for row in grades) / len(grades),
        format_rate=100.0 * sum(g.formatted for g in flat) / len(flat),
    )


# ----------------------------------------------------------------------------------------------------------------
# Code


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with n samples of which c pass: 1 - C(n-c, k) / C(n, k), in [0, 1].

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i), which avoids huge binomials (Chen et al. 2021, Codex).
    """
    if not (n >= 1 and 0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k needs n >= 1, 0 <= c <= n, 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def grade_code_completion(completion: str, tests: Sequence[TestCase], sandbox: Sandbox) -> ExecutionResult:
    """Extract the program from a completion and run it on `tests`, stopping at the first failure."""
    return run_tests(extract_code(completion), tests, sandbox)


@dataclass(frozen=True)
class CodeScores:
    problems: int
    n: int
    """Samples per problem."""
    avg_at_n: float
    pass_at_1_first: float
    """Share of problems whose first sample passes (the reference's pass@1)."""
    pass_at_n: float
    unbiased_pass_at_k: dict[int, float]
    status_rates: dict[str, float]
    """status -> 100 * share of all samples."""

    def as_dict(self) -> dict[str, float]:
        out = {
            f"avg@{self.n}": self.avg_at_n,
            "pass@1": self.pass_at_1_first,
            f"pass@{self.n}": self.pass_at_n,
            "problems": float(self.problems),
        }
        out.update({f"unbiased_pass@{k}": v for k, v in self.unbiased_pass_at_k.items()})
        out.update({f"{status}_rate": v for status, v in self.status_rates.items()})
        return out


def code_scores(statuses: Sequence[Sequence[str]], ks: Sequence[int] = (1,)) -> CodeScores:
    """Metrics over statuses[problem][sample] (values from sandbox.STATUSES); unbiased pass@k for each k in
    `ks` and for k = n."""
    n = _check_grid(statuses, "code_scores")
    for i, row in enumerate(statuses):
        for j, status in enumerate(row):
            if status not in STATUSES:
                raise ValueError(f"code_scores: statuses[{i}][{j}]={status!r} is not one of {STATUSES}")
    bad_k = [k for k in ks if not 1 <= k <= n]
    if bad_k:
        raise ValueError(f"code_scores: ks={tuple(ks)} must lie in [1, n={n}]")
    passed = [[s == "passed" for s in row] for row in statuses]
    counts = Counter(s for row in statuses for s in row)
    total = len(statuses) * n
    unbiased = {
        k: 100.0 * sum(pass_at_k(n, sum(row), k) for row in passed) / len(passed) for k in sorted({*ks, n})
    }
    return CodeScores(
        problems=len(statuses),
        n=n,
        avg_at_n=100.0 * sum(map(sum, passed)) / total,
        pass_at_1_first=100.0 * sum(row[0] for row in passed) / len(passed),
        pass_at_n=100.0 * sum(any(row) for row in passed) / len(passed),
        unbiased_pass_at_k=unbiased,
        status_rates={status: 100.0 * counts[status] / total for status in STATUSES},
    )
