"""What each data task adds to a training step: its prompts before the rollout, its teacher rows after it.

    math  MathTask   student prompt + one teacher prompt per view, all known before the rollout (spec 3.3)
    code  CodeTask   student prompt + the reference / hint teacher prompts before the rollout (spec 3.4); after it,
                     every completion's extracted program runs on the example's public tests in the sandbox
                     (`views.feedback_payload`) and that completion gets its own feedback teacher prompt
                     (`prompts.code_feedback_prompt`): the feedback rows differ per completion, not per prompt

The trainer builds one at construction (`TASKS[cfg.data.task]`) and calls, per step,

    task.encode(example)                             -> EncodedPrompts | None (None: skipped for length)
    task.teacher_rows(examples, prompts, completions) -> TeacherRows: per completion its M teacher prompts in
                                                        avsd.views order, loss masks, metrics, log extras
    task.rewards(examples, prompts, completions, grpo) -> [Graded] per completion (algorithm='grpo'): its
                                                        grader's outcome (correct / wrong / unparseable) and reward

Code execution (CodeTask): only the first rank of each model-parallel group (TP x PP) runs the programs; the
feedback is broadcast to the other ranks of the group (`share`), so every TP shard and pipeline stage of a
replica builds identical teacher rows even if a run's timing (a timeout) would differ between ranks. Programs
run in the sandbox of the `sandbox` config section (bubblewrap unless sandbox.unsafe_subprocess), `sandbox.workers`
at a time. A feedback prompt longer than prompts.max_prompt_tokens with prompts.overlong='skip' cannot drop its
completion from an already sampled batch: the row is laid out with the prompt truncated and the whole completion
is masked out of the loss (counted as `feedback/prompts_skipped`).

Metrics of the code task (summed over data-parallel ranks): `feedback/<status>` = number of completions of the
step with each `sandbox.STATUSES` status (passed, wrong_answer, syntax_error, runtime_error, timeout,
extraction_failure), `rollout/pass_rate` = passed / completions, `feedback/prompts_skipped`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.distributed as dist

from avsd_megatron.data.examples import CodeExample, MathExample
from avsd_megatron.data.prompts import EncodedPrompts, PromptReport, code_feedback_prompt, code_prompts, math_prompts
from avsd_megatron.data.views import CodeFeedback, ViewStats, feedback_payload, final_answer
from avsd_megatron.rollout.engine import Completion
from avsd_megatron.training.config import TrainConfig
from avsd_megatron.verify.grading import grade_math_completion
from avsd_megatron.verify.sandbox import STATUSES, Sandbox

__all__ = ["OUTCOMES", "TASKS", "CodeTask", "Graded", "MathTask", "TeacherRows", "run_feedback"]


@dataclass(frozen=True)
class TeacherRows:
    """The teacher side of a step's E completions (E = prompts x rollout.n, completions of a prompt consecutive)."""

    ids: list[list[list[int]]] | None
    """[E][M] token ids: completion e's teacher prompt carrying view m (avsd.views order); None without a teacher
    (algorithm='grpo')."""
    masks: list[list[bool]] | None = None
    """[E][len(completion e)] loss mask; None = every completion token is valid."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Step metrics of the task (already reduced over data-parallel ranks)."""
    extras: list[dict[str, Any]] | None = None
    """[E] per-completion fields for the generations log; None = none."""
    advantages: list[float] | None = None
    """[E] per-completion advantage (algorithm='grpo'); None for AVSD, whose targets come from the teachers."""


OUTCOMES = ("correct", "wrong", "unparseable")
"""How a graded completion ended: its reward is grpo.correct_reward / wrong_reward / failure_reward."""


@dataclass(frozen=True)
class Graded:
    """One completion graded for a reward (GRPO)."""

    outcome: str
    """One of OUTCOMES."""
    reward: float
    extras: dict[str, Any] = field(default_factory=dict)
    """Fields for the generations log (the extracted answer, the sandbox status)."""


def _reward(outcome: str, grpo: Any) -> float:
    return {"correct": grpo.correct_reward, "wrong": grpo.wrong_reward, "unparseable": grpo.failure_reward}[outcome]


class MathTask:
    """Math rows (spec 3.3): every teacher prompt is fixed by the example, shared by its n completions."""

    def __init__(self, tokenizer: Any, cfg: TrainConfig, report: PromptReport, **_: Any) -> None:
        self.tokenizer, self.cfg, self.report = tokenizer, cfg, report
        self.view_stats = ViewStats()
        """How each encoded example's views were built: answer_only's rule ("boxed" or a fallback), the
        partial_solution cut (counted per encoding; the trainer logs them)."""

    def encode(self, example: MathExample) -> EncodedPrompts | None:
        return math_prompts(self.tokenizer, example, self.cfg.avsd.views, self.cfg.prompts, self.report,
                            ratio=self.cfg.avsd.partial_solution_ratio, view_stats=self.view_stats)

    def teacher_rows(self, examples: Sequence[MathExample], prompts: Sequence[EncodedPrompts],
                     completions: Sequence[Completion]) -> TeacherRows:
        n = _per_prompt(prompts, completions)
        views = self.cfg.avsd.views
        return TeacherRows([[p.teacher_ids[v] for v in views] for p in prompts for _ in range(n)])

    def rewards(self, examples: Sequence[MathExample], prompts: Sequence[EncodedPrompts],
                completions: Sequence[Completion], grpo: Any) -> list[Graded]:
        """Grade each completion with math-verify (`grading.grade_math_completion`) against the final answer of
        its example's reference solution (`views.final_answer`, what the answer_only view shows). A completion
        without a closed \\boxed{} answer is 'unparseable' (grpo.failure_reward), even if its text contains the
        right answer: the reward never falls back to searching free text."""
        n = _per_prompt(prompts, completions)
        golds = [final_answer(e.solution)[0] for e in examples]
        out = []
        for e, completion in enumerate(completions):
            grade = grade_math_completion(completion.text, golds[e // n])
            outcome = "unparseable" if grade.answer is None else ("correct" if grade.correct else "wrong")
            out.append(Graded(outcome, _reward(outcome, grpo), {"answer": grade.answer, "gold": golds[e // n]}))
        return out


class CodeTask:
    """Code rows (spec 3.4): reference / hint prompts per example, a feedback prompt per completion.

    Args:
        tokenizer, cfg, report: as for MathTask.
        executes: whether this rank runs the programs (the first rank of its model-parallel group); only then is
            a `Sandbox` built (which checks that bwrap works).
        share: broadcasts the executing rank's feedback list to the rest of the model-parallel group (identity on a
            group of one); called on every rank with the list or None.
        dp_group: data-parallel group the status counts are summed over (None = one DP rank).
        device: where the count tensor lives for that reduction (the model's device).
    Raises:
        SandboxUnavailableError: executes and bwrap is missing or unusable (sandbox.unsafe_subprocess=false).
    """

    def __init__(self, tokenizer: Any, cfg: TrainConfig, report: PromptReport, *, executes: bool = True,
                 share: Callable[[Any], Any] = lambda x: x, dp_group: Any = None,
                 device: torch.device | str = "cpu") -> None:
        self.tokenizer, self.cfg, self.report = tokenizer, cfg, report
        self.view_stats = ViewStats()  # hint payloads that fell back to the static hint
        self.sandbox = Sandbox(cfg.sandbox.sandbox_config()) if executes else None
        self.share, self.dp_group, self.device = share, dp_group, device

    def encode(self, example: CodeExample) -> EncodedPrompts | None:
        return code_prompts(self.tokenizer, example, self.cfg.avsd.views, self.cfg.prompts, self.report,
                            view_stats=self.view_stats)

    def teacher_rows(self, examples: Sequence[CodeExample], prompts: Sequence[EncodedPrompts],
                     completions: Sequence[Completion]) -> TeacherRows:
        n = _per_prompt(prompts, completions)
        owners = [examples[e // n] for e in range(len(completions))]
        feedbacks = None
        if self.sandbox is not None:
            feedbacks = run_feedback(owners, completions, self.sandbox, workers=self.cfg.sandbox.workers)
        feedbacks = self.share(feedbacks)
        ids, masks, skipped = [], [], 0
        for e, (example, completion, feedback) in enumerate(zip(owners, completions, feedbacks)):
            feedback_ids, kept = self._feedback_ids(example, feedback)
            skipped += not kept
            prompt = prompts[e // n]
            ids.append([feedback_ids if v == "feedback" else prompt.teacher_ids[v] for v in self.cfg.avsd.views])
            masks.append([kept] * len(completion.token_ids))
        counts = [sum(f.status == s for f in feedbacks) for s in STATUSES] + [skipped]
        counts = _sum_over(self.dp_group, counts, self.device)
        metrics = {f"feedback/{s}": float(c) for s, c in zip(STATUSES, counts)}
        metrics["feedback/prompts_skipped"] = float(counts[-1])
        metrics["rollout/pass_rate"] = metrics["feedback/passed"] / max(1.0, sum(counts[:-1]))
        extras = [{"feedback_status": f.status, "feedback": f.payload} for f in feedbacks]
        return TeacherRows(ids, None if all(all(m) for m in masks) else masks, metrics, extras)

    def rewards(self, examples: Sequence[CodeExample], prompts: Sequence[EncodedPrompts],
                completions: Sequence[Completion], grpo: Any) -> list[Graded]:
        """Run each completion's extracted program on its example's public tests in the sandbox (the tests the
        feedback view uses; only the executing rank runs them, the group shares the outcome): passed -> 'correct',
        no extractable program -> 'unparseable' (grpo.failure_reward), any other status -> 'wrong'."""
        n = _per_prompt(prompts, completions)
        owners = [examples[e // n] for e in range(len(completions))]
        feedbacks = None
        if self.sandbox is not None:
            feedbacks = run_feedback(owners, completions, self.sandbox, workers=self.cfg.sandbox.workers)
        statuses = self.share(None if feedbacks is None else [f.status for f in feedbacks])
        out = []
        for status in statuses:
            outcome = {"passed": "correct", "extraction_failure": "unparseable"}.get(status, "wrong")
            out.append(Graded(outcome, _reward(outcome, grpo), {"status": status}))
        return out

    def _feedback_ids(self, example: CodeExample, feedback: CodeFeedback) -> tuple[list[int], bool]:
        """(token ids of the feedback teacher prompt, whether the completion stays in the loss)."""
        encoded = code_feedback_prompt(self.tokenizer, example, feedback, self.cfg.prompts, self.report)
        if encoded is not None:
            return encoded[1], True
        # overlong='skip' said no, but the completion is already in the batch: lay the row out truncated (not
        # counted again) and mask the completion out of the loss.
        truncate = replace(self.cfg.prompts, overlong="truncate")
        _, ids = code_feedback_prompt(self.tokenizer, example, feedback, truncate, PromptReport())
        return ids, False


def run_feedback(examples: Sequence[CodeExample], completions: Sequence[Completion], sandbox: Sandbox, *,
                 workers: int = 1) -> list[CodeFeedback]:
    """`views.feedback_payload` of each completion on its example's public tests, in order; `workers` at once."""
    def one(pair: tuple[CodeExample, Completion]) -> CodeFeedback:
        example, completion = pair
        return feedback_payload(completion.text, example.public_tests, sandbox)

    pairs = list(zip(examples, completions, strict=True))
    if workers <= 1:
        return [one(p) for p in pairs]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, pairs))


TASKS = {"math": MathTask, "code": CodeTask}
"""data.task -> the task class the trainer builds."""


def _per_prompt(prompts: Sequence[EncodedPrompts], completions: Sequence[Completion]) -> int:
    if not prompts or len(completions) % len(prompts):
        raise ValueError(f"{len(completions)} completions do not divide over {len(prompts)} prompts")
    return len(completions) // len(prompts)


def _sum_over(group: Any, values: list[int], device: torch.device | str) -> list[int]:
    """Elementwise sum of `values` over the ranks of `group` (None = this rank only)."""
    if group is None:
        return values
    tensor = torch.tensor(values, dtype=torch.long, device=device)
    dist.all_reduce(tensor, group=group)
    return tensor.tolist()
