"""The AVSD trainer on Megatron-Core: one optimizer step reads rollout -> score_teachers -> update_student -> sync.

    trainer = Trainer(load_config("examples/configs/tiny_cpu.yaml"))   # torch.distributed already initialised
    trainer.train()                                                     # max_steps optimizer steps, then a save

Construction (`Trainer.__init__`), done once, with every mode chosen here and never inside the loop:
1. Megatron's parallel state (TP, PP from `parallel`; DP = the rest) unless the caller initialised it (sizes checked).
2. The inputs, checked before anything heavy is built (`preflight`): config.json, the tokenizer (chat template, pad
   token, no more tokens than config.json's vocab_size), every data source loaded and every row validated
   (`load_examples`), the prompts and views of the first examples built by the data task (`tasks.TASKS[data.task]`:
   `MathTask` or `CodeTask`, which for code builds the sandbox), and, with avsd.teacher_storage='device', a GPU
   memory estimate. A Hub dataset that the node cannot reach fails here, in seconds.
3. The policy `GPTModel` from `model.hf_path`'s config.json (`megatron_model`), its initial weights from
   `model.megatron_checkpoint`, or else from `<output_dir>/megatron_init` (rank 0 converts `model.hf_path` there
   once with `convert.convert_hf_to_megatron`, the other ranks waiting in a gloo barrier with an explicit timeout),
   wrapped in `Float16Module` for bf16/fp16 and in Megatron's DDP; Megatron's optimizer (Adam, optionally the
   distributed optimizer); the LR of step s is `optim.lr_at(s, max_steps)`.
4. The teacher (`avsd.teacher`: frozen θ₀ / live / EMA) over the initial weights (θ restored after each scoring pass
   from the optimizer's fp32 master or from a swap buffer: `avsd.teacher_restore`), and `AVSDStep` with
   `avsd.loss_config(rollout.temperature, V)` (mode single / consensus / arithmetic / avsd and its gate all live in
   the loss config: baselines need nothing here); the rollout engine (`rollout.engine`: `HFEngine` or `VLLMEngine`)
   and the prompt stream (`PromptStream`).
5. Resume (`checkpoint.resume`): model, optimizer, Adam step count, RNG, EMA teacher, step and data cursor
   (`checkpointing`); then the engine gets the current weights. Which checkpoint is decided first, from files
   alone (`_plan_resume`, before step 1): the newest one that verifies (corrupt newer ones are skipped with a
   warning naming the bad file), a refusal to start a run into a checkpoint directory holding another run's
   checkpoints (unless checkpoint.overwrite), an error for max_steps below the saved step, a warning when a changed
   max_steps changes the LR schedule; rank 0 then prints "resumed from step N (path)" (`notices`).

One step (`train_step`), per rank:
- `rollout()`: the next `prompts_per_step` prompts (identical on every rank), this DP rank's slice, `generate` with
  seed `request_seed(rollout.seed, step)` and `first_index` = dp_rank x prompts per rank on every rank, so prompt j of
  the global batch samples with `request_seed(that seed, j)` (vLLM's TP engines generate together); the completions of
  the model-parallel group's first rank are then broadcast to the others, so every TP/PP rank of a DP replica
  trains on identical samples. After generating the engine sleeps (colocated memory goes back to training):
  discarding its weights when a sync follows this step, else (`rollout.sync_every` > 1) keeping them in host memory
  (`sleep(keep_weights=True)`, vLLM's level 1) for the next rollout. Around the rollout
  `rollout_memory.RolloutOffload` frees DDP's grad buffers (`memory.offload_grad_buffers`) and moves the optimizer
  states to host memory (`memory.offload_optimizer_states`), restored before the teacher scoring;
- the algorithm's targets step (`algorithms.TARGETS[algorithm]`, chosen once). avsd: `task.teacher_rows()` (timed
  as `views`), then after `build_batch()` the teacher scoring pass (`score_teachers`); grpo: `task.rewards()` and
  group-normalised advantages (timed as `rewards`), then per-token advantages (`advantages`) and no teacher pass.
  AVSD's teacher rows, `task.teacher_rows()`: each completion's M teacher prompts. Math: the example's view prompts.
  Code (`tasks.CodeTask`): the reference / hint prompts of the example, and a feedback prompt of the completion's
  own: its extracted program is run on the example's public tests in the sandbox (`sandbox` section; bubblewrap
  unless sandbox.unsafe_subprocess) and the outcome (passed, or the failing input with expected vs printed
  output, the traceback, ...) is the feedback view's payload;
- `build_batch()`: `build_avsd_batch` of student rows and M view rows sharing each completion (none for grpo);
  completion tokens equal to the pad id leave the loss unless avsd.train_pad_tokens (the reference, spec 3.5);
  with parallel.sequence_packing each stream's rows are packed back to back (THD, `hook/packing.pack_batch`);
- `score_teachers()` (avsd) and `update_student()` (`AVSDStep`'s phases), then the optimizer step and the teacher
  update;
- `sync_weights()` every `rollout.sync_every` steps: `export_hf_weights` -> `engine.update_weights`;
- metrics (rank 0, `metrics_log`) every `logging.log_every` steps; every `logging.generations_every` steps the
  problems, prompts and completions of DP rank 0's slice; a checkpoint every `checkpoint.save_every` steps (its
  time is reported as `time/checkpoint` in the next step's record), and one at the end of `train()`. Rank 0 also
  writes the resolved config (overrides applied) to <output_dir>/config.yaml at construction, and prints the
  planner's table for this layout (`training.plan.write_plan`: plan.txt and plan.json next to it).

Metrics per record: loss, grad_norm, num_tokens, lr, the kernels' `mv_*` means (`step.reduce_metrics`, over DP),
rollout/completion_len_mean, rollout/stop_rate, data/cursor, data/prompts_skipped, time/<phase> and time/total;
grpo runs add reward/mean, reward/std, reward/correct_frac, reward/unparseable_frac, grpo/zero_variance_frac,
grpo/advantage_abs_mean and the pg_* loss metrics instead of mv_* (`algorithms`); code runs add feedback/<status>
counts (passed, wrong_answer, syntax_error, runtime_error, timeout, extraction_failure; summed over DP),
feedback/prompts_skipped and rollout/pass_rate (`tasks`), and their generation records the feedback status and
payload of each logged completion.

Raises at construction (`ValueError`/`ConfigError` naming the field, `SandboxUnavailableError`):
parallel.sequence_packing without CUDA and Transformer Engine, a parallel layout that differs from an
already-initialised Megatron, prompts_per_step not divisible by micro_batch_size * dp, a code run whose bubblewrap
is missing or unusable (sandbox.unsafe_subprocess=false), a dataset whose every prompt is over
prompts.max_prompt_tokens (at the first step).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from avsd_megatron.convert import (
    export_hf_weights,
    load_megatron_checkpoint,
    qwen3_gpt_model_kwargs,
    read_hf_config,
    write_conversion_metadata,
)
from avsd_megatron.convert.convert import HF_ASSETS_DIR
from avsd_megatron.convert.safetensors_io import copy_hf_assets
from avsd_megatron.data.examples import CodeExample, MathExample, load_examples
from avsd_megatron.data.prompts import EncodedPrompts, PromptReport
from avsd_megatron.hook.batch import AVSDBatch, build_avsd_batch
from avsd_megatron.hook.packing import pack_batch, packing_multiples
from avsd_megatron.hook.step import AVSDStep, MegatronGroups, StepResult, reduce_metrics
from avsd_megatron.hook.teacher_kinds import build_teacher
from avsd_megatron.rollout.engine import Completion, SamplingParams, request_seed
from avsd_megatron.rollout.hf_engine import HFEngine
from avsd_megatron.training.algorithms import TARGETS
from avsd_megatron.training.checkpointing import (
    CheckpointManager,
    adam_step_count,
    check_fresh_run,
    prime_optimizer,
    read_trainer_state,
    remove_checkpoints,
)
from avsd_megatron.training.config import ConfigError, TrainConfig, dump_config, to_dict
from avsd_megatron.training.kernels import check_sequence_packing, detect_providers
from avsd_megatron.training.megatron_model import DTYPES, build_gpt_model, build_optimizer, initial_checkpoint, wrap_ddp
from avsd_megatron.training.metrics_log import MetricsLog, PhaseTimer
from avsd_megatron.training.notices import notice
from avsd_megatron.training.plan import write_plan
from avsd_megatron.training.preflight import check_prompts_encode, check_teacher_storage_fits, load_checked_tokenizer
from avsd_megatron.training.rollout_memory import RolloutOffload
from avsd_megatron.training.tasks import TASKS, TeacherRows

__all__ = ["PromptStream", "Rollout", "Trainer"]

Example = MathExample | CodeExample

# ----------------------------------------------------------------------------------------------------------------
# Data: the prompt stream


class PromptStream:
    """Encoded prompts in a seeded per-epoch order; the cursor (examples consumed) is the resumable data position.

    Every rank draws the same global batch; examples whose prompts are too long (prompts.overlong='skip') are
    passed over and counted in `report`.
    """

    def __init__(self, examples: Sequence[Example], encode: Callable[[Example], EncodedPrompts | None],
                 *, seed: int, cursor: int = 0) -> None:
        if not examples:
            raise ValueError("data.sources gave no examples")
        self.examples = list(examples)
        self.encode = encode
        self.seed = seed
        self.cursor = cursor
        self._order: tuple[int, list[int]] = (-1, [])  # (epoch, permutation) of the current epoch

    def _permutation(self, epoch: int) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(len(self.examples), generator=gen).tolist()

    def take(self, count: int) -> list[tuple[Example, EncodedPrompts]]:
        """The next `count` encodable examples. Raises ValueError if a whole epoch in a row encodes none."""
        out, passed = [], 0
        while len(out) < count:
            epoch, index = divmod(self.cursor, len(self.examples))
            if self._order[0] != epoch:
                self._order = (epoch, self._permutation(epoch))
            example = self.examples[self._order[1][index]]
            self.cursor += 1
            encoded = self.encode(example)
            passed = 0 if encoded is not None else passed + 1
            if passed > len(self.examples):
                raise ValueError(
                    "every prompt exceeds prompts.max_prompt_tokens; raise it or set prompts.overlong='truncate'"
                )
            if encoded is not None:
                out.append((example, encoded))
        return out


@dataclass(frozen=True)
class Rollout:
    """This DP rank's prompts and sampled completions of one step (n completions per prompt, consecutive)."""

    examples: list[Example]
    prompts: list[EncodedPrompts]
    completions: list[Completion]


# ----------------------------------------------------------------------------------------------------------------
# Engines (chosen once)


def _hf_engine(cfg: TrainConfig, *, on_cpu: bool) -> Any:
    return HFEngine.from_pretrained(cfg.model.hf_path, dtype=DTYPES[cfg.model.dtype], device="cpu" if on_cpu else
                                    torch.device("cuda", torch.cuda.current_device()))


def _vllm_engine(cfg: TrainConfig, *, on_cpu: bool) -> Any:
    from avsd_megatron.rollout.vllm_engine import VLLMEngine, import_vllm, vllm_platform

    if on_cpu:  # without CUDA only vLLM's CPU build can run (the `vllm` test tier: tools/install_vllm_cpu_tier.sh)
        import_vllm()  # ImportError naming what to install, or rollout.engine='hf'
        if not vllm_platform().is_cpu():
            raise ConfigError(
                "rollout.engine='vllm' without a GPU needs vLLM's CPU build (tools/install_vllm_cpu_tier.sh); "
                "use rollout.engine='hf' on CPU"
            )
    return VLLMEngine(cfg.model.hf_path, cfg.rollout, tensor_parallel_size=cfg.parallel.tp, rank=dist.get_rank(),
                      world_size=dist.get_world_size(), max_prompt_tokens=cfg.prompts.max_prompt_tokens,
                      dtype=cfg.model.dtype)


ENGINES = {"hf": _hf_engine, "vllm": _vllm_engine}


# ----------------------------------------------------------------------------------------------------------------
# Trainer


class Trainer:
    """An AVSD run (module docstring). Needs `torch.distributed` initialised; every rank constructs one.

    Args:
        cfg: the run config.
        engine: a `RolloutEngine` to use instead of building `rollout.engine` (tests); it must hold the HF weights
            of `model.hf_path` or accept `update_weights` (the trainer always syncs once before the first rollout).
        progress: show rank 0's tqdm bar.
    Raises:
        ConfigError / ValueError: see the module docstring.
    """

    def __init__(self, cfg: TrainConfig, *, engine: Any = None, progress: bool = True) -> None:
        self.cfg = cfg
        self.on_cpu = not torch.cuda.is_available()
        if cfg.parallel.sequence_packing:  # before anything is loaded: THD needs TE on CUDA
            check_sequence_packing(cfg.parallel, detect_providers())
        self.rank = dist.get_rank()
        self.groups = _init_parallel(cfg)
        self.dp_rank, self.dp_size = self.groups["dp_rank"], self.groups["dp_size"]
        self.prompts_per_rank = cfg.prompts_per_step // self.dp_size
        cfg.num_microbatches(dist.get_world_size())  # raises ConfigError if DP does not divide the batch
        self.megatron_groups = MegatronGroups.from_parallel_state()
        self.checkpoints = CheckpointManager(cfg.checkpoint_dir, keep_last=cfg.checkpoint.keep_last)
        self.resumed_from = self._plan_resume()  # file checks only: before the model, the conversion, the engine

        # Everything that can be wrong with the inputs is checked before anything heavy (model, conversion,
        # optimizer, engine) is built: a bad data source or tokenizer fails in seconds, not after minutes of GPU time.
        self.hf_config = read_hf_config(cfg.model.hf_path)
        self.vocab_size = int(self.hf_config["vocab_size"])
        self.tokenizer = load_checked_tokenizer(cfg.model.hf_path, self.vocab_size)
        self.prompt_report = PromptReport()
        self.task = TASKS[cfg.data.task](
            self.tokenizer, cfg, self.prompt_report, executes=self.rank == self.groups["mp_src"],
            share=self._share_within_replica, dp_group=self.megatron_groups.dp, device=_compute_device(self.on_cpu),
        )
        examples, self.load_report = load_examples(cfg.data)
        if self.load_report.num_skipped:
            skipped = self.load_report
            notice(f"data.on_bad_row=skip: skipped {skipped.num_skipped} of {skipped.rows_read} rows "
                   f"({dict(skipped.skipped)}; first: {skipped.skipped_examples[0]})", warning=True)
        self._fallbacks_noticed = False
        self.stream = PromptStream(examples, self.task.encode, seed=cfg.optim.seed)
        check_prompts_encode(examples, self.task.encode, self.prompt_report)
        check_teacher_storage_fits(cfg, self.hf_config, dist.get_world_size(), _gpu_bytes(self.on_cpu))

        gpt = build_gpt_model(cfg, self.hf_config, on_cpu=self.on_cpu)
        load_megatron_checkpoint(gpt, initial_checkpoint(cfg))
        self.model = wrap_ddp(gpt, cfg)
        self.optimizer = build_optimizer(self.model, cfg)
        self.teacher = build_teacher(cfg.teacher_config(), self.model.parameters(), self.model, self.optimizer)
        self.avsd = AVSDStep(self.model, self.optimizer, cfg.loss_config(self.vocab_size), self.teacher,
                             groups=self.megatron_groups)

        self.rollout_offload = RolloutOffload(self.model, self.optimizer, on_cpu=self.on_cpu,
                                              grad_buffers=cfg.memory.offload_grad_buffers,
                                              optimizer_states=cfg.memory.offload_optimizer_states)
        with self.rollout_offload():  # vLLM checks its budget against the free memory at construction
            self.engine = engine if engine is not None else ENGINES[cfg.rollout.engine](cfg, on_cpu=self.on_cpu)
        self.sampling = SamplingParams.from_config(cfg.rollout)
        self.targets = TARGETS[cfg.algorithm](
            self.task, cfg, score=self.score_teachers, prepare=self.avsd.zero_grads, dp_group=self.megatron_groups.dp,
            is_last_stage=self.megatron_groups.is_last_stage, device=self._device,
        )

        self.step = 0
        self.last_saved_step: int | None = None
        if self.resumed_from is not None:
            self.load_checkpoint(self.resumed_from)
            notice(f"resumed from step {self.step} ({self.resumed_from})")
        self.timer = PhaseTimer(None if self.on_cpu else torch.cuda.synchronize)
        self.log = MetricsLog.for_rank(self.rank, cfg.output_dir, jsonl=cfg.logging.jsonl, total_steps=cfg.max_steps,
                                       first_step=self.step, progress=progress,
                                       tensorboard=cfg.logging.tensorboard)
        if self.rank == 0:
            dump_config(cfg, Path(cfg.output_dir) / "config.yaml")  # the run's resolved config, --set included
            print(write_plan(cfg, cfg.output_dir, world_size=dist.get_world_size()), flush=True)  # plan.txt/.json
        self.sync_weights()  # the engine starts from model.hf_path; the model may hold resumed weights

    def close(self) -> None:
        """Release the rollout engine; call before destroying the process group (`RolloutEngine.close`)."""
        self.engine.close()

    # -- the loop ----------------------------------------------------------------------------------------------------

    def train(self) -> list[dict[str, Any]]:
        """Run steps until max_steps; save at the end (unless that step was just saved). Returns the metrics of the
        steps run."""
        history = []
        if self.step >= self.cfg.max_steps:
            notice(f"nothing to train: {self.resumed_from} is at step {self.step} = max_steps; raise max_steps to "
                   "continue this run")
        while self.step < self.cfg.max_steps:
            history.append(self.train_step())
        if self.last_saved_step != self.step:
            self.save_checkpoint()
        self.log.close()
        return history

    def train_step(self) -> dict[str, Any]:
        """One optimizer step (module docstring); returns its metrics."""
        with self.timer("rollout"), self.rollout_offload():  # memory.*: training memory lent to the engine
            rollout = self.rollout()
        with self.timer(self.targets.rows_phase):  # avsd: the views' teacher rows; grpo: rewards, advantages
            rows = self.targets.rows(rollout.examples, rollout.prompts, rollout.completions)
        batch = self.build_batch(rollout, rows)
        lr = self.set_lr()
        with self.timer(self.targets.outputs_phase):  # avsd: the teacher scoring pass; grpo: per-token advantages
            teacher_outputs = self.targets.outputs(batch.to(self._device), rows)
        with self.timer("update_student"):
            result = self.update_student(batch, teacher_outputs)
        self.step += 1
        if self.step % self.cfg.rollout.sync_every == 0:
            with self.timer("sync_weights"):
                self.sync_weights()
        metrics = self.step_metrics(result, rollout, rows, lr)
        self.write_logs(metrics, rollout, rows)
        if self._saves_at(self.step):
            self.save_checkpoint()
        return metrics

    # -- phases ------------------------------------------------------------------------------------------------------

    def rollout(self) -> Rollout:
        """This DP rank's prompts of the next global batch and their sampled completions."""
        drawn = self.stream.take(self.cfg.prompts_per_step)
        mine = drawn[self.dp_rank * self.prompts_per_rank : (self.dp_rank + 1) * self.prompts_per_rank]
        self.engine.wake_up()  # the KV cache; and the weights after a keep-weights sleep
        # seeds by global position: prompt j of the step's global batch samples with request_seed(step seed, j), so
        # no two DP ranks repeat each other's noise and the TP ranks of one engine (same dp_rank) agree
        completions = self.engine.generate([p.student_ids for _, p in mine], self.sampling,
                                           seed=request_seed(self.cfg.rollout.seed, self.step),
                                           first_index=self.dp_rank * self.prompts_per_rank)
        self._after_generate()
        completions = self._share_within_replica(completions)
        return Rollout([e for e, _ in mine], [p for _, p in mine], completions)

    def _after_generate(self) -> None:
        """Give the engine's GPU memory back to training. If the weights are synced after this step, they are
        discarded (level 2); otherwise (rollout.sync_every > 1) kept in host memory for the next rollout (level 1)."""
        synced_next = (self.step + 1) % self.cfg.rollout.sync_every == 0
        self.engine.sleep(keep_weights=not synced_next)

    def build_batch(self, rollout: Rollout, rows: TeacherRows) -> AVSDBatch:
        n = self.cfg.rollout.n
        prompts = [p for p in rollout.prompts for _ in range(n)]  # completions of a prompt are consecutive
        batch = build_avsd_batch(
            [p.student_ids for p in prompts],
            rows.ids,
            [list(c.token_ids) for c in rollout.completions],
            view_names=self.cfg.avsd.views if rows.ids is not None else (),  # grpo: no teacher rows
            micro_batch_size=self.cfg.micro_batch_size * n,
            pad_id=self.tokenizer.pad_token_id, vocab_size=self.vocab_size, completion_masks=rows.masks,
            train_pad_tokens=self.cfg.avsd.train_pad_tokens,
            pad_to_multiple_of=self.cfg.parallel.tp if self.cfg.parallel.sequence_parallel else 1,  # SP: S % tp == 0
        )
        if not self.cfg.parallel.sequence_packing:
            return batch
        # THD: each stream's rows back to back; with SP the pack length is a multiple of tp (hook/packing.py)
        return pack_batch(batch, **packing_multiples(tp=self.cfg.parallel.tp,
                                                     sequence_parallel=self.cfg.parallel.sequence_parallel))

    def set_lr(self) -> float:
        lr = self.cfg.optim.lr_at(self.step, self.cfg.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def score_teachers(self, batch: AVSDBatch) -> list:
        self.avsd.zero_grads()
        return self.avsd.score_teachers(batch.to(self._device))

    def update_student(self, batch: AVSDBatch, teacher_outputs: list) -> StepResult:
        per_microbatch = self.avsd.update_student(batch.to(self._device), teacher_outputs)
        update_successful, grad_norm, _ = self.optimizer.step()
        if update_successful:
            self.teacher.after_optimizer_step()
        return self._result(per_microbatch, bool(update_successful), grad_norm)

    def sync_weights(self) -> None:
        """Push the current weights to the rollout engine (HF names, TP-gathered, PP-broadcast)."""
        self.engine.wake_up(("weights",))
        weights = export_hf_weights(self.model, self.hf_config, tp_group=self.megatron_groups.tp,
                                    pp_group=self.groups["pp_group"])
        self.engine.update_weights(weights)  # every rank of the TP x PP grid drives the collective export

    # -- metrics, logs, checkpoints -----------------------------------------------------------------------------------

    def step_metrics(self, result: StepResult, rollout: Rollout, rows: TeacherRows, lr: float) -> dict[str, Any]:
        lengths = [len(c.token_ids) for c in rollout.completions]
        metrics = {
            "loss": result.loss, "grad_norm": result.grad_norm, "num_tokens": result.num_tokens, "lr": lr,
            "update_successful": result.update_successful, **result.metrics,
            "rollout/completion_len_mean": sum(lengths) / len(lengths),
            "rollout/stop_rate": sum(c.finish_reason == "stop" for c in rollout.completions) / len(lengths),
            "data/cursor": self.stream.cursor, "data/prompts_skipped": self.prompt_report.skipped,
            "data/rows_skipped": self.load_report.num_skipped,
            "views/answer_fallbacks": self.task.view_stats.answer_fallbacks,
            "views/static_hints": self.task.view_stats.static_hints,
            **rows.metrics,
        }
        self._notice_view_fallbacks()
        metrics = self._from_last_stage(metrics)
        return metrics | self.timer.pop()

    def _notice_view_fallbacks(self) -> None:
        """Once per run: the first answer_only / hint payload built by a fallback rule (the counts go on in the
        metrics: views/answer_fallbacks, views/static_hints)."""
        stats = self.task.view_stats
        if self._fallbacks_noticed or not (stats.answer_fallbacks or stats.static_hints):
            return
        self._fallbacks_noticed = True
        rules = {rule: n for rule, n in stats.answer_rules.items() if rule != "boxed"}
        notice(f"views: {stats.answer_fallbacks} answer_only payloads without a \\boxed{{}} answer so far (rules "
               f"used: {rules}), {stats.static_hints} hints from the static fallback; counts continue in "
               "metrics views/answer_fallbacks and views/static_hints", warning=True)

    def write_logs(self, metrics: dict[str, Any], rollout: Rollout, rows: TeacherRows) -> None:
        if self.step % self.cfg.logging.log_every == 0:
            self.log.step(self.step, metrics)
        every = self.cfg.logging.generations_every
        if every and self.step % every == 0:
            n = self.cfg.rollout.n
            extras = rows.extras or [{}] * len(rollout.completions)
            self.log.generations(self.step, [
                {"problem": e.problem, "prompt": p.student_text, "completion": c.text, "finish_reason": c.finish_reason,
                 **extra}
                for e, p, c, extra in zip(rollout.examples, rollout.prompts, rollout.completions[::n], extras[::n])
            ])

    def save_checkpoint(self) -> Path:
        with self.timer("checkpoint"):
            adam_step = torch.tensor([adam_step_count(self.optimizer)], dtype=torch.long, device=self._device)
            dist.all_reduce(adam_step, op=dist.ReduceOp.MAX)  # a DP shard may hold no parameter of its own
            state = {"step": self.step, "data_cursor": self.stream.cursor, "adam_step": int(adam_step),
                     "prompt_skipped": self.prompt_report.skipped, "config": to_dict(self.cfg)}
            path = self.checkpoints.save(self.step, self.model, self.optimizer, state, self._rank_state(),
                                         describe=self._describe_checkpoint)
        self.last_saved_step = self.step
        return path

    def _describe_checkpoint(self, ckpt_dir: Path) -> None:
        """hf_conversion.json + hf_assets/ (tokenizer, generation config): `tools/convert_checkpoint.py
        megatron-to-hf <step dir>` then needs no --hf-reference."""
        padded = qwen3_gpt_model_kwargs(self.hf_config, tensor_model_parallel_size=self.cfg.parallel.tp)["vocab_size"]
        write_conversion_metadata(ckpt_dir, self.hf_config, dtype=DTYPES[self.cfg.model.dtype],
                                  padded_vocab_size=padded, source=str(Path(self.cfg.model.hf_path).absolute()))
        (ckpt_dir / HF_ASSETS_DIR).mkdir()
        copy_hf_assets(self.cfg.model.hf_path, ckpt_dir / HF_ASSETS_DIR)

    def load_checkpoint(self, path: Path) -> None:
        """Restore model, optimizer, step, data cursor, RNG and the EMA teacher from `path` (same layout).

        Raises:
            ConfigError: the checkpoint was trained with another avsd.teacher kind, or (teacher restore 'master')
                its weights are not bf16 of its fp32 master.
        """
        prime_optimizer(self.model, self.optimizer)
        state, rank_state = self.checkpoints.load(path, self.model, self.optimizer)
        saved_teacher = state["config"]["avsd"]["teacher"]
        if saved_teacher != self.cfg.avsd.teacher:
            raise ConfigError(
                f"avsd.teacher={self.cfg.avsd.teacher!r} but {path} was trained with avsd.teacher={saved_teacher!r}; "
                "resume with the same teacher kind (or set checkpoint.resume=null)"
            )
        self.step = self.last_saved_step = int(state["step"])
        self.stream.cursor = int(state["data_cursor"])
        self.prompt_report.skipped = int(state.get("prompt_skipped", 0))
        _set_rng_state(rank_state["rng"])
        if rank_state["teacher"] is not None:
            with torch.no_grad():
                for stored, saved in zip(self.teacher.teacher_tensors, rank_state["teacher"]):
                    stored.copy_(saved)
        if getattr(self.teacher, "restore", "swap") == "master":
            # θ is put back from the fp32 master after every scoring pass: the loaded weights must be bf16 of it
            agree = torch.tensor([float(self.teacher.matches_master())], device=self._device)
            dist.all_reduce(agree, op=dist.ReduceOp.MIN)  # every rank raises, or none
            if agree.item() < 1.0:
                raise ConfigError(
                    f"{path}: the model weights are not bf16 of the optimizer's fp32 master on every rank, so "
                    "restoring θ from the master after the scoring pass would change them; resume with "
                    "avsd.teacher_restore='swap'"
                )

    def _plan_resume(self) -> Path | None:
        """The verified checkpoint to resume from (None = a fresh run), decided from files alone.

        Warns about each newer checkpoint that failed verification and about an LR schedule that a changed
        max_steps recomputes. Raises:
            CheckpointError: no valid checkpoint (the bad files named), or a fresh run into a checkpoint directory
                holding another run's checkpoints without checkpoint.overwrite.
            ConfigError: the checkpoint is already past max_steps.
        """
        cfg = self.cfg
        path, skipped = self.checkpoints.resolve(cfg.checkpoint.resume, dist.get_world_size())
        for message in skipped:
            notice(message, warning=True)
        if path is None or path.parent.absolute() != cfg.checkpoint_dir.absolute():  # saves go among others'
            stale = check_fresh_run(cfg.checkpoint_dir, overwrite=cfg.checkpoint.overwrite, resumed_from=path)
            if stale:
                notice(f"checkpoint.overwrite=true: deleting {len(stale)} entries of another run in "
                       f"{cfg.checkpoint_dir}", warning=True)
                if self.rank == 0:
                    remove_checkpoints(stale)
            dist.barrier()
        if path is None:
            return None
        state = read_trainer_state(path)
        saved_step, saved_max = int(state["step"]), state.get("config", {}).get("max_steps")
        if saved_step > cfg.max_steps:
            raise ConfigError(
                f"max_steps={cfg.max_steps} is below the step of the checkpoint to resume ({path}: step {saved_step}); "
                "raise max_steps, or start a new run (checkpoint.resume=null and a new output_dir)"
            )
        if saved_max is not None and int(saved_max) != cfg.max_steps and saved_step < cfg.max_steps:
            before = cfg.optim.lr_at(saved_step, int(saved_max)) if saved_step < int(saved_max) else float("nan")
            after = cfg.optim.lr_at(saved_step, cfg.max_steps)
            if before != after:
                notice(
                    f"max_steps changed from {saved_max} (in {path}) to {cfg.max_steps}: the LR schedule "
                    f"(optim.lr_decay={cfg.optim.lr_decay!r}) is recomputed over {cfg.max_steps} steps; step "
                    f"{saved_step} gets lr {after:.6g} instead of {before:.6g}", warning=True,
                )
        return path

    # -- helpers -----------------------------------------------------------------------------------------------------

    def _saves_at(self, step: int) -> bool:
        every = self.cfg.checkpoint.save_every
        return every > 0 and step % every == 0

    @property
    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _share_within_replica(self, obj: Any) -> Any:
        """The model-parallel group's first rank's `obj`, on every rank of the group (completions; code feedback).
        Every rank generated with identical prompts and seeds already; this makes a numerical divergence between
        their engines (thread counts, kernels) harmless instead of a silent mismatch between TP shards."""
        group = self.groups["mp_group"]
        if group is None:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=self.groups["mp_src"], group=group)
        return box[0]

    def _result(self, per_microbatch: list, update_successful: bool, grad_norm: Any) -> StepResult:
        grad_norm = None if grad_norm is None else float(grad_norm)
        if not self.megatron_groups.is_last_stage:
            return StepResult(None, None, grad_norm, update_successful, {})
        totals = reduce_metrics(per_microbatch, dp_group=self.megatron_groups.dp)
        loss_sum, loss_count = totals.pop("avsd_loss")
        return StepResult(
            loss=loss_sum / max(loss_count, 1.0),
            num_tokens=int(totals["avsd_tokens_per_microbatch"][0]),
            grad_norm=grad_norm,
            update_successful=update_successful,
            metrics={name: s / c if c else float("nan") for name, (s, c) in totals.items()},
        )

    def _from_last_stage(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """With PP > 1 the loss exists on the last stage: broadcast its metrics over the pipeline group."""
        group = self.groups["pp_group"]
        if group is None:
            return metrics
        box = [metrics]
        dist.broadcast_object_list(box, src=self.groups["pp_last"], group=group)
        return box[0]

    def _rank_state(self) -> dict[str, Any]:
        teacher = getattr(self.teacher, "teacher_tensors", None) if self.cfg.avsd.teacher == "ema" else None
        return {"rng": _get_rng_state(), "teacher": None if teacher is None else [t.cpu() for t in teacher]}


def _compute_device(on_cpu: bool) -> torch.device:
    """Where the model will live (known before it is built): this rank's GPU, or the CPU."""
    return torch.device("cpu") if on_cpu else torch.device("cuda", torch.cuda.current_device())


def _gpu_bytes(on_cpu: bool) -> int | None:
    return None if on_cpu else torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory


def _init_parallel(cfg: TrainConfig) -> dict[str, Any]:
    """Initialise Megatron's parallel state (or check the caller's) and return the groups the trainer uses."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    cfg.parallel.data_parallel_size(dist.get_world_size())  # raises ConfigError for a bad world size
    if ps.model_parallel_is_initialized():
        have = (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size())
        if have != (tp, pp):
            raise ConfigError(
                f"parallel.tp={tp}, parallel.pp={pp} differ from the initialised Megatron parallel state {have}"
            )
    else:
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    model_parallel_cuda_manual_seed(cfg.optim.seed)
    torch.manual_seed(cfg.optim.seed)
    random.seed(cfg.optim.seed)
    mp_group = ps.get_model_parallel_group()
    pp_group = ps.get_pipeline_model_parallel_group()
    return {
        "dp_rank": ps.get_data_parallel_rank(), "dp_size": ps.get_data_parallel_world_size(),
        "mp_group": mp_group if dist.get_world_size(mp_group) > 1 else None,
        "mp_src": dist.get_global_rank(mp_group, 0),
        "pp_group": pp_group if dist.get_world_size(pp_group) > 1 else None,
        "pp_last": dist.get_global_rank(pp_group, dist.get_world_size(pp_group) - 1),
    }


def _get_rng_state() -> dict[str, Any]:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
