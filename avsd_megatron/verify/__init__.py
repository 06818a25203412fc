"""Running and grading completions: answer and program extraction, the code sandbox, math and code graders.

| module     | what it holds                                                                                |
|------------|----------------------------------------------------------------------------------------------|
| `extract`  | the last `\\boxed{...}` of a text, the program of a code completion                          |
| `sandbox`  | `Sandbox` (bubblewrap; time / memory / CPU limits), `TestCase`, `run_tests` (the judge)        |
| `grading`  | math answers with math-verify, Avg@k / Pass@k, code pass@k in the sandbox                     |

Used by training (the code feedback view, `data.views`) and by evaluation (`pipelines.evaluate`).
"""

from avsd_megatron.verify.extract import extract_code, last_boxed_content, last_boxed_span
from avsd_megatron.verify.grading import (
    CodeScores,
    MathGrade,
    MathScores,
    code_scores,
    grade_code_completion,
    grade_math_answer,
    grade_math_completion,
    math_answer,
    math_scores,
    pass_at_k,
)
from avsd_megatron.verify.sandbox import (
    INSTALL_BWRAP,
    STATUSES,
    ExecutionResult,
    RunResult,
    Sandbox,
    SandboxConfig,
    SandboxUnavailableError,
    Status,
    TestCase,
    normalize_output,
    run_tests,
)

__all__ = [
    "INSTALL_BWRAP",
    "STATUSES",
    "CodeScores",
    "ExecutionResult",
    "MathGrade",
    "MathScores",
    "RunResult",
    "Sandbox",
    "SandboxConfig",
    "SandboxUnavailableError",
    "Status",
    "TestCase",
    "code_scores",
    "extract_code",
    "grade_code_completion",
    "grade_math_answer",
    "grade_math_completion",
    "last_boxed_content",
    "last_boxed_span",
    "math_answer",
    "math_scores",
    "normalize_output",
    "pass_at_k",
    "run_tests",
]
