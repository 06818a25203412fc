"""Student and teacher prompts: the user-message text (spec 3.3, 3.4), chat-template rendering with thinking
set separately for the student and the teachers, and tokenisation with an over-length policy.

Message structure (this project's wording; the structure follows the reference):

    math student   "Problem: {problem}" + blank line + BOXED_INSTRUCTION
    math eval      "{problem}" + blank line + BOXED_INSTRUCTION (no "Problem:" prefix, spec 5.2)
    math teacher   "Problem: {problem}"; a line saying privileged material follows; begin marker naming the
                   view; payload; end marker; three rules (hidden guidance only; never reveal it; solve
                   independently); BOXED_INSTRUCTION
    code student   instructions (complete Python 3 program, directly, inside <final_code> tags, one block, no
                   explanation) + problem fields + the answer layout
    code teacher   the same instructions plus the private-material rules, then the marked payload block
                   *before* the problem fields, then fields and layout

Rendering: one user message, `add_generation_prompt=True`; `enable_thinking` is passed only when the chat
template mentions it (Qwen3 yes, DeepSeek-R1-Distill no; spec 3.3). Defaults follow the released scripts
(spec 1): student thinking off, teachers thinking on. Code prompts with thinking off always end in an empty
think block (spec 3.4); math prompts are left as the template renders them.

Tokenisation: the rendered text already holds the template's special tokens, so it is encoded with
`add_special_tokens=False` (the reference's collator added a second BOS for DeepSeek, spec 6 item 8). A prompt
longer than `max_prompt_tokens` skips the whole example ("skip", default) or is cut from the right
("truncate", the reference's collator behaviour); both are counted in `PromptReport`.
"""

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from avsd_megatron.data.examples import CodeExample, MathExample
from avsd_megatron.data.views import (
    CODE_VIEWS,
    DEFAULT_PARTIAL_RATIO,
    MATH_VIEWS,
    CodeFeedback,
    ViewStats,
    code_view_payload,
    math_view_payload,
    normalize_views,
)
from avsd_megatron.verify.sandbox import TestCase

OVERLONG_POLICIES = ("skip", "truncate")
BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
"""The model vendors' standard math instruction (Qwen3 / DeepSeek-R1 model cards), kept verbatim: the
evaluation benchmarks are run with it."""
EMPTY_THINK = "<think>\n\n</think>\n\n"
"""Empty reasoning block, as Qwen3's template writes it for enable_thinking=False."""
_EMPTY_THINK_AT_END = re.compile(r"<think>\s*</think>\s*$")
_OPEN_THINK_AT_END = re.compile(r"<think>\s*$")


@dataclass(frozen=True)
class PromptConfig:
    """Chat-template and length settings for student and teacher prompts."""

    student_thinking: bool = False
    """enable_thinking for the student (released scripts: off)."""
    teacher_thinking: bool = True
    """enable_thinking for every teacher view (released scripts: on; spec 6 item 6 on the mismatch)."""
    max_prompt_tokens: int = 12288
    """Longest prompt in tokens (spec 1: max_length 16384 - max_completion_length 4096)."""
    overlong: Literal["skip", "truncate"] = "skip"
    """"skip": drop an example any of whose prompts is too long. "truncate": keep the first max_prompt_tokens
    tokens of each (the reference; it cuts off the instructions and the generation prompt)."""

    def __post_init__(self) -> None:
        if self.overlong not in OVERLONG_POLICIES:
            raise ValueError(f"prompts.overlong={self.overlong!r} is not one of {OVERLONG_POLICIES}")
        if self.max_prompt_tokens < 1:
            raise ValueError(f"prompts.max_prompt_tokens={self.max_prompt_tokens!r} must be >= 1")


# ----------------------------------------------------------------------------------------------------------------
# Message text


def _reference_block(view: str, payload: str) -> str:
    return (
        f"----- BEGIN PRIVILEGED REFERENCE ({view}) -----\n"
        f"{payload.strip()}\n"
        f"----- END PRIVILEGED REFERENCE ({view}) -----"
    )


def math_student_message(problem: str) -> str:
    """Training student prompt (spec 3.3)."""
    return f"Problem: {problem}\n\n{BOXED_INSTRUCTION}"


def math_eval_message(problem: str) -> str:
    """Evaluation prompt (spec 5.2): like the student's, without the "Problem:" prefix."""
    return f"{problem}\n\n{BOXED_INSTRUCTION}"


def math_teacher_message(problem: str, view: str, payload: str) -> str:
    """Teacher prompt of one math view (spec 3.3); `payload` from views.math_view_payload."""
    if view not in MATH_VIEWS:
        raise ValueError(f"math view {view!r} is not one of {MATH_VIEWS}")
    return (
        f"Problem: {problem}\n\n"
        "For training only, you are also shown privileged reference material about this problem; it may be "
        "the final answer, a hint, part of a solution or a complete solution.\n"
        f"{_reference_block(view, payload)}\n\n"
        "Treat the reference as private guidance: use it only to understand the problem and to check or repair "
        "your own reasoning.\n"
        "Never mention, quote, copy or allude to the reference, and do not reveal that it exists.\n"
        "Solve the problem yourself, from the beginning, in your own words.\n"
        f"{BOXED_INSTRUCTION}"
    )


_CODE_TASK = (
    "Solve the programming problem below with a complete Python 3 program.\n\nGive the final program directly."
)
_CODE_TAGS = (
    "Wrap the program in <final_code> and </final_code> tags.\n"
    "Put exactly one complete Python code block inside the tags, and no explanation."
)
_CODE_PRIVATE_RULES = (
    "For training only, you also get private reference material about this problem.\n"
    "Use it only as hidden guidance to understand the task and to check or repair your solution.\n"
    "Never mention, quote, copy or allude to it in your answer."
)
CODE_ANSWER_LAYOUT = "Answer layout:\n<final_code>\n```python\n# the complete program\n```\n</final_code>"
_FIELD_DEFAULT = "Given in the problem statement."


def _format_tests(tests: Sequence[TestCase]) -> str:
    if not tests:
        return "None given."
    return "\n\n".join(
        f"Example {i}\nInput:\n{t.input.rstrip()}\nOutput:\n{t.output.rstrip()}" for i, t in enumerate(tests, 1)
    )


def code_problem_fields(example: CodeExample) -> str:
    """Problem, input/output format, constraints (each defaulting to a fixed sentence) and the examples."""
    return (
        f"Problem:\n{example.problem}\n\n"
        f"Input format:\n{example.input_format or _FIELD_DEFAULT}\n\n"
        f"Output format:\n{example.output_format or _FIELD_DEFAULT}\n\n"
        f"Constraints:\n{example.constraints or _FIELD_DEFAULT}\n\n"
        f"Examples:\n{_format_tests(example.examples)}"
    )


def code_student_message(example: CodeExample) -> str:
    """Code student prompt (spec 3.4)."""
    return f"{_CODE_TASK}\n{_CODE_TAGS}\n\n{code_problem_fields(example)}\n\n{CODE_ANSWER_LAYOUT}"


def code_teacher_message(example: CodeExample, view: str, payload: str) -> str:
    """Teacher prompt of one code view (spec 3.4): the privileged block comes before the problem fields."""
    if view not in CODE_VIEWS:
        raise ValueError(f"code view {view!r} is not one of {CODE_VIEWS}")
    return (
        f"{_CODE_TASK}\n{_CODE_PRIVATE_RULES}\n{_CODE_TAGS}\n\n"
        f"{_reference_block(view, payload)}\n\n"
        f"{code_problem_fields(example)}\n\n{CODE_ANSWER_LAYOUT}"
    )


# ----------------------------------------------------------------------------------------------------------------
# Chat template


def template_mentions(tokenizer: Any, name: str) -> bool:
    """Whether the tokenizer's chat template(s) contain `name` (e.g. "enable_thinking")."""
    template = getattr(tokenizer, "chat_template", None)
    if template is None:
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} has no chat_template; prompts are rendered with the "
            "checkpoint's own template (tokenizer_config.json / chat_template.jinja)"
        )

    def search(value: Any) -> bool:
        if isinstance(value, str):
            return name in value
        if isinstance(value, Mapping):
            return any(search(v) for v in value.values())
        if isinstance(value, Sequence):
            return any(search(v) for v in value)
        return False

    return search(template)


def render_chat(tokenizer: Any, user_text: str, *, thinking: bool, ensure_empty_think: bool = False) -> str:
    """One user message through the tokenizer's chat template, with the generation prompt.

    Args:
        thinking: enable_thinking; passed only if the template mentions it.
        ensure_empty_think: with thinking off, make the prompt end in an empty think block (code prompts,
            spec 3.4): appended if missing, or closed if the template ends in an open `<think>`.
    """
    kwargs = {"enable_thinking": thinking} if template_mentions(tokenizer, "enable_thinking") else {}
    messages = [{"role": "user", "content": user_text}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, expected str")
    if ensure_empty_think and not thinking and not _EMPTY_THINK_AT_END.search(text):
        open_think = _OPEN_THINK_AT_END.search(text)
        text = text[: open_think.start()] + EMPTY_THINK if open_think else text.rstrip() + "\n" + EMPTY_THINK
    return text


# ----------------------------------------------------------------------------------------------------------------
# Tokenised prompts of one example


@dataclass
class PromptReport:
    """Prompt lengths seen so far."""

    examples: int = 0
    """Examples whose prompts were rendered (math_prompts / code_prompts)."""
    skipped: int = 0
    """Prompt groups dropped for length (overlong="skip"): an example, or one rollout's feedback prompt."""
    encoded: Counter = field(default_factory=Counter)
    """"student" or view name -> prompts tokenised."""
    overlong: Counter = field(default_factory=Counter)
    """"student" or view name -> prompts longer than max_prompt_tokens (skipped or truncated)."""
    truncated: Counter = field(default_factory=Counter)
    """"student" or view name -> prompts cut to max_prompt_tokens (overlong="truncate")."""


@dataclass(frozen=True)
class EncodedPrompts:
    """Rendered and tokenised prompts of one example."""

    student_text: str
    student_ids: list[int]
    teacher_texts: dict[str, str]
    """view -> rendered teacher prompt, in view order."""
    teacher_ids: dict[str, list[int]]
    """view -> token ids, in view order."""


def encode_prompts(
    tokenizer: Any, texts: Mapping[str, str], cfg: PromptConfig, report: PromptReport
) -> dict[str, list[int]] | None:
    """Tokenise rendered prompts {stream: text}; None if any is too long and cfg.overlong == "skip"."""
    ids = {name: list(tokenizer.encode(text, add_special_tokens=False)) for name, text in texts.items()}
    report.encoded.update(ids.keys())
    over = [name for name, seq in ids.items() if len(seq) > cfg.max_prompt_tokens]
    report.overlong.update(over)
    if over and cfg.overlong == "skip":
        report.skipped += 1
        return None
    for name in over:
        ids[name] = ids[name][: cfg.max_prompt_tokens]
        report.truncated[name] += 1
    return ids


def _encode(tokenizer, student: str, teachers: dict[str, str], cfg, report) -> EncodedPrompts | None:
    report.examples += 1
    ids = encode_prompts(tokenizer, {"student": student, **teachers}, cfg, report)
    if ids is None:
        return None
    return EncodedPrompts(student, ids["student"], dict(teachers), {view: ids[view] for view in teachers})


def math_prompts(
    tokenizer: Any,
    example: MathExample,
    views: Sequence[str],
    cfg: PromptConfig,
    report: PromptReport,
    *,
    ratio: float = DEFAULT_PARTIAL_RATIO,
    view_stats: ViewStats | None = None,
) -> EncodedPrompts | None:
    """Student prompt and one teacher prompt per math view; None if skipped for length."""
    views = normalize_views(views, MATH_VIEWS, name="math views")
    student = render_chat(tokenizer, math_student_message(example.problem), thinking=cfg.student_thinking)
    teachers = {
        view: render_chat(
            tokenizer,
            math_teacher_message(
                example.problem, view, math_view_payload(view, example.solution, ratio=ratio, stats=view_stats)
            ),
            thinking=cfg.teacher_thinking,
        )
        for view in views
    }
    return _encode(tokenizer, student, teachers, cfg, report)


def code_prompts(
    tokenizer: Any,
    example: CodeExample,
    views: Sequence[str],
    cfg: PromptConfig,
    report: PromptReport,
    *,
    view_stats: ViewStats | None = None,
) -> EncodedPrompts | None:
    """Student prompt and the teacher prompts of the views known before the rollout (reference, hint);
    "feedback" in `views` is ignored here and built per rollout with `code_feedback_prompt`."""
    views = [v for v in normalize_views(views, CODE_VIEWS, name="code views") if v != "feedback"]
    student = render_chat(
        tokenizer, code_student_message(example), thinking=cfg.student_thinking, ensure_empty_think=True
    )
    teachers = {
        view: render_chat(
            tokenizer,
            code_teacher_message(example, view, code_view_payload(view, example, stats=view_stats)),
            thinking=cfg.teacher_thinking,
            ensure_empty_think=True,
        )
        for view in views
    }
    return _encode(tokenizer, student, teachers, cfg, report)


def code_feedback_prompt(
    tokenizer: Any, example: CodeExample, feedback: CodeFeedback, cfg: PromptConfig, report: PromptReport
) -> tuple[str, list[int]] | None:
    """(text, ids) of the feedback-view teacher prompt of one rollout; None if too long and overlong="skip"."""
    text = render_chat(
        tokenizer,
        code_teacher_message(example, "feedback", code_view_payload("feedback", example, feedback=feedback)),
        thinking=cfg.teacher_thinking,
        ensure_empty_think=True,
    )
    ids = encode_prompts(tokenizer, {"feedback": text}, cfg, report)
    return None if ids is None else (text, ids["feedback"])
