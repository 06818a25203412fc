"""The per-algorithm "targets" step of a training step: what the student is trained toward, after the rollout.

    targets = TARGETS[cfg.algorithm](task, cfg, ...)        # chosen once, at trainer construction
    rows = targets.rows(examples, prompts, completions)      # timed as targets.rows_phase
    batch = trainer.build_batch(rollout, rows)
    outputs = targets.outputs(batch, rows)                   # timed as targets.outputs_phase; one per micro-batch

| algorithm | rows (`tasks.TeacherRows`)                          | outputs (`hook.TeacherOutputs`, last stage)       |
|-----------|-----------------------------------------------------|---------------------------------------------------|
| `avsd`    | the task's M teacher prompts per completion         | the teacher scoring pass (`score_teachers`)       |
| `grpo`    | no teacher prompts; the task's rewards (`rewards`)  | token_advantages [N]: each token carries its       |
|           | -> group-normalised advantages (`signals.grpo`)     | completion's advantage; no forward pass            |

Everything else of the step (rollout, student update with `AVSDStep.update_student`, optimizer, weight sync,
checkpoints, logs) is the same code for both.

GRPO metrics (summed over data-parallel ranks before the ratios): `reward/mean` (over completions), `reward/std`
(mean over groups of the group's std, TRL's `reward_std`), `reward/correct_frac`, `reward/unparseable_frac`,
`grpo/zero_variance_frac` (groups whose rewards are all equal: zero advantage, zero gradient) and
`grpo/advantage_abs_mean`. Each completion's reward, outcome and advantage go to the generations log.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from avsd_megatron.data.prompts import EncodedPrompts
from avsd_megatron.hook.batch import AVSDBatch
from avsd_megatron.hook.loss import TeacherOutputs
from avsd_megatron.rollout.engine import Completion
from avsd_megatron.signals.grpo import group_advantages
from avsd_megatron.training.config import TrainConfig
from avsd_megatron.training.tasks import TeacherRows

__all__ = ["AVSDTargets", "GRPOTargets", "TARGETS", "token_advantages"]


class AVSDTargets:
    """algorithm='avsd': the task's teacher rows, then the teacher scoring pass.

    Args:
        task: the data task (`tasks.TASKS`); its `teacher_rows` is looked up at every call.
        score: `batch -> list[TeacherOutputs | None]`, the scoring pass (the trainer's `score_teachers`).
    """

    rows_phase = "views"
    outputs_phase = "score_teachers"

    def __init__(self, task: Any, cfg: TrainConfig, *, score: Callable[[AVSDBatch], list], **_: Any) -> None:
        self.task, self.score = task, score

    def rows(self, examples: Sequence[Any], prompts: Sequence[EncodedPrompts],
             completions: Sequence[Completion]) -> TeacherRows:
        return self.task.teacher_rows(examples, prompts, completions)

    def outputs(self, batch: AVSDBatch, rows: TeacherRows) -> list[TeacherOutputs | None]:
        return self.score(batch)


class GRPOTargets:
    """algorithm='grpo': rewards from the task's grader, group-normalised advantages, no teacher.

    Args:
        task: the data task; its `rewards(examples, prompts, completions, grpo)` grades each completion.
        cfg: the run config (grpo section, rollout.n).
        prepare: called before the outputs are formed (the trainer's gradient zeroing, which the scoring pass
            otherwise does).
        dp_group: data-parallel group the metrics are summed over (None = one rank).
        is_last_stage: whether this rank holds the loss (outputs are None elsewhere).
        device: where the advantages live (the model's device).
    """

    rows_phase = "rewards"
    outputs_phase = "advantages"

    def __init__(self, task: Any, cfg: TrainConfig, *, prepare: Callable[[], None] = lambda: None,
                 dp_group: Any = None, is_last_stage: bool = True, device: torch.device | str = "cpu",
                 **_: Any) -> None:
        self.task, self.cfg, self.prepare = task, cfg, prepare
        self.dp_group, self.is_last_stage, self.device = dp_group, is_last_stage, device

    def rows(self, examples: Sequence[Any], prompts: Sequence[EncodedPrompts],
             completions: Sequence[Completion]) -> TeacherRows:
        n = self.cfg.rollout.n
        graded = self.task.rewards(examples, prompts, completions, self.cfg.grpo)
        rewards = torch.tensor([g.reward for g in graded], dtype=torch.float64).view(-1, n)  # [G, n]
        adv = group_advantages(rewards, scale=self.cfg.grpo.scale_rewards, eps=self.cfg.grpo.std_eps)
        advantages = adv.advantages.reshape(-1)
        sums = torch.tensor(
            [rewards.sum(), adv.std.sum(), float(rewards.shape[0]), adv.zero_variance.sum(),
             sum(g.outcome == "correct" for g in graded), sum(g.outcome == "unparseable" for g in graded),
             advantages.abs().sum(), float(rewards.numel())],
            dtype=torch.float64, device=self.device,
        )
        if self.dp_group is not None:
            dist.all_reduce(sums, group=self.dp_group)
        r_sum, std_sum, groups, zero_var, correct, unparseable, adv_abs, count = sums.tolist()
        metrics = {
            "reward/mean": r_sum / count, "reward/std": std_sum / groups,
            "reward/correct_frac": correct / count, "reward/unparseable_frac": unparseable / count,
            "grpo/zero_variance_frac": zero_var / groups, "grpo/advantage_abs_mean": adv_abs / count,
        }
        extras = [{"reward": g.reward, "outcome": g.outcome, "advantage": float(a), **g.extras}
                  for g, a in zip(graded, advantages)]
        return TeacherRows(ids=None, masks=None, metrics=metrics, extras=extras, advantages=advantages.tolist())

    def outputs(self, batch: AVSDBatch, rows: TeacherRows) -> list[TeacherOutputs | None]:
        self.prepare()
        if not self.is_last_stage:
            return [None] * batch.num_microbatches
        return [TeacherOutputs(token_advantages=a.to(self.device))
                for a in token_advantages(batch, rows.advantages)]


def token_advantages(batch: AVSDBatch, advantages: Sequence[float]) -> list[torch.Tensor]:
    """Per micro-batch, [N] fp32: completion e's advantage repeated over its tokens (the batch's token order).

    Raises:
        ValueError: len(advantages) differs from the batch's completion count.
    """
    total = sum(mb.num_prompts for mb in batch.micro_batches)
    if len(advantages) != total:
        raise ValueError(f"{len(advantages)} advantages for the batch's {total} completions")
    out, start = [], 0
    for mb in batch.micro_batches:
        per_completion = torch.tensor(advantages[start : start + mb.num_prompts], dtype=torch.float32)
        out.append(per_completion.repeat_interleave(mb.completion_lengths.cpu()))  # [N]
        start += mb.num_prompts
    return out


TARGETS = {"avsd": AVSDTargets, "grpo": GRPOTargets}
"""algorithm -> its targets step."""
