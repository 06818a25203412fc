"""Supervised warm start of an HF causal LM on worked math solutions (plain torch + transformers, CPU or one GPU).

The main job (`main_job`) starts AVSD from a random-init tiny Qwen3, which can neither solve a problem nor read a
privileged reference. A short SFT fixes both, as pre-training does for a real model:

* each train row {problem, solution} becomes one chat example: a user turn, then `solution + <|im_end|>` as the
  assistant turn; the loss is the token mean of the assistant turn only (prompt tokens are masked);
* the user turn is, per example (seeded draw), the training student prompt (`prompts.math_student_message`,
  thinking off), the evaluation prompt (`math_eval_message`, thinking off), or, with probability `teacher_share`,
  one of the math teacher prompts (`math_teacher_message` with a `views.math_view_payload` of a uniformly drawn
  view, teacher thinking on). The teacher rows teach the model to use a reference in its context, so that the
  privileged views carry information at the start of AVSD (the frozen teacher is this warm start);
* with probability `error_share` the target solution has one wrong intermediate result and every later step
  recomputed from it (`corrupt_solution`), the wrong digits masked out of the loss. The model never learns to make
  the error, only to continue consistently after one. Without these rows a teacher that has learned to copy the
  reference keeps copying after a student's mistake, so the AVSD target punishes every later token of a wrong
  rollout, even correct arithmetic on the wrong number. That pushed held-out accuracy down in our runs. With them,
  the teacher's disagreement is concentrated on the wrong step itself.

`view_probe` measures the second point: greedy accuracy with the student prompt against each view's teacher prompt.

AdamW (β = (0.9, 0.95), weight decay 0.01), linear warmup over the first 5% of steps then cosine decay to 10% of
`lr`, grad-norm clip 1.0, fp32. The examples are drawn without replacement from a seeded permutation of the rows.
A step's examples are sorted by length and run as (at most) two micro-batches, each weighted by its share of the
step's label tokens: the same token-mean gradient as one padded batch, without padding the ~90-token student
prompts to the ~350-token teacher prompts.
"""

from __future__ import annotations

import math
import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from avsd_megatron.data.prompts import math_eval_message, math_student_message, math_teacher_message, render_chat
from avsd_megatron.data.views import MATH_VIEWS, math_view_payload

__all__ = ["SFTConfig", "sft_example_ids", "warm_start"]

IGNORE = -100


@dataclass(frozen=True)
class SFTConfig:
    steps: int = 300
    """Optimizer steps."""
    batch_size: int = 32
    """Examples per step."""
    lr: float = 3e-3
    """Peak learning rate (toy model from random init)."""
    teacher_share: float = 0.5
    """Share of examples shown with a teacher prompt (module docstring)."""
    error_share: float = 0.0
    """Share of examples whose target solution carries one wrong intermediate result, continued consistently, with
    the wrong digits masked out of the loss (`corrupt_solution`; module docstring)."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError(f"SFTConfig: steps={self.steps} >= 0, batch_size={self.batch_size} >= 1 and "
                             f"lr={self.lr} > 0 needed")
        for name in ("teacher_share", "error_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"SFTConfig.{name}={getattr(self, name)!r} must be in [0, 1]")


_EQUATION = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")
"""One arithmetic step of a worked solution: `a op b = c` (the tiny dataset's step format)."""
_MENTION = re.compile(r"(?<=[ {])\d+(?=[ }.,])")
"""A number in prose (after a space or `{`, before a space, `}`, `.` or `,`); step numbers start lines: no match."""
_WRONG_OFFSETS = (-10, -2, -1, 1, 2, 10)


def _apply(a: int, op: str, b: int) -> int | None:
    if op == "/":
        return a // b if b and a % b == 0 else None
    return {"+": a + b, "-": a - b, "*": a * b}[op]


def corrupt_solution(solution: str, rng: random.Random) -> tuple[str, tuple[int, int]] | None:
    """`solution` with one `a op b = c` step's result c replaced by a wrong value, and every later step recomputed
    from it (operands equal to a changed value follow it, and so do numbers in the prose after the step, such as the
    final `\\boxed{}`). Values are matched as text, so a given quantity that happens to equal a changed result
    follows it too; the text stays self-consistent.

    Returns:
        (new text, (start, end) character span of the wrong value), or None when the solution has no such step or
        the consistent continuation would need a negative number or an inexact division.
    """
    steps = list(_EQUATION.finditer(solution))
    if not steps:
        return None
    target = rng.randrange(len(steps))
    true = int(steps[target].group(4))
    wrong = rng.choice([true + d for d in _WRONG_OFFSETS if true + d >= 0])
    changed: dict[str, str] = {}
    out: list[str] = []
    cursor, span = 0, (0, 0)
    for index, step in enumerate(steps):
        between = solution[cursor : step.start()]
        out.append(_MENTION.sub(lambda m: changed.get(m.group(), m.group()), between) if changed else between)
        a, op, b, c = step.group(1), step.group(2), step.group(3), step.group(4)
        if index == target:
            new_c = str(wrong)
        elif index > target:
            a, b = changed.get(a, a), changed.get(b, b)
            value = _apply(int(a), op, int(b))
            if value is None or value < 0:
                return None
            new_c = str(value)
        else:
            new_c = c
        head = f"{a} {op} {b} = "
        if index == target:
            start = sum(len(piece) for piece in out) + len(head)
            span = (start, start + len(new_c))
        out.append(head + new_c)
        if new_c != c:
            changed[c] = new_c
        cursor = step.end()
    out.append(_MENTION.sub(lambda m: changed.get(m.group(), m.group()), solution[cursor:]))
    return "".join(out), span


def sft_example_ids(tokenizer: Any, row: dict[str, str], rng: random.Random, teacher_share: float,
                    error_share: float = 0.0) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one row: rendered user turn + solution + EOS; labels IGNORE on the prompt and, for an
    error example (probability `error_share`, `corrupt_solution`), on the wrong result's tokens."""
    if rng.random() < teacher_share:
        view = rng.choice(MATH_VIEWS)
        message = math_teacher_message(row["problem"], view, math_view_payload(view, row["solution"]))
        prompt = render_chat(tokenizer, message, thinking=True)
    else:
        message = (math_student_message if rng.random() < 0.5 else math_eval_message)(row["problem"])
        prompt = render_chat(tokenizer, message, thinking=False)
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    corrupted = corrupt_solution(row["solution"], rng) if error_share and rng.random() < error_share else None
    if corrupted is None:
        answer_ids = tokenizer.encode(row["solution"], add_special_tokens=False) + [tokenizer.eos_token_id]
        return prompt_ids + answer_ids, [IGNORE] * len(prompt_ids) + answer_ids
    text, (start, end) = corrupted
    pieces = [tokenizer.encode(part, add_special_tokens=False) for part in (text[:start], text[start:end], text[end:])]
    if pieces[0] + pieces[1] + pieces[2] != tokenizer.encode(text, add_special_tokens=False):
        raise ValueError(f"corrupt_solution: the wrong value {text[start:end]!r} does not tokenize on its own in "
                         f"{text!r}; error examples need a tokenizer that splits digits (Qwen's pre-tokenizer does)")
    answer_ids = pieces[0] + pieces[1] + pieces[2] + [tokenizer.eos_token_id]
    labels = pieces[0] + [IGNORE] * len(pieces[1]) + pieces[2] + [tokenizer.eos_token_id]
    return prompt_ids + answer_ids, [IGNORE] * len(prompt_ids) + labels


def _lr_at(step: int, cfg: SFTConfig) -> float:
    warmup = max(1, cfg.steps // 20)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg.steps - warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def warm_start(hf_in: str | Path, hf_out: str | Path, rows: Sequence[dict[str, str]], cfg: SFTConfig,
               *, log_every: int = 50, log=print, progress: bool = True) -> dict[str, Any]:
    """SFT the HF checkpoint `hf_in` on `rows` (module docstring) and save it (with its tokenizer) to `hf_out`.

    With `progress`, a tqdm bar over the steps (rate, ETA) carries the mean loss of the last `log_every` steps;
    without it, that loss goes to `log` every `log_every` steps.

    Returns:
        {"steps", "final_loss" (mean of the last min(20, steps) steps), "seconds"}.
    """
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not rows:
        raise ValueError("warm_start: no rows")
    tokenizer = AutoTokenizer.from_pretrained(str(hf_in))
    model = AutoModelForCausalLM.from_pretrained(str(hf_in), dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.01)
    rng = random.Random(cfg.seed)
    order: list[int] = []
    losses: list[float] = []
    start = time.perf_counter()
    pad = tokenizer.pad_token_id
    bar = tqdm(range(cfg.steps), desc="sft", unit="step", disable=not progress, dynamic_ncols=True)
    for step in bar:
        batch = []
        for _ in range(cfg.batch_size):
            if not order:
                order = list(range(len(rows)))
                rng.shuffle(order)
            batch.append(sft_example_ids(tokenizer, rows[order.pop()], rng, cfg.teacher_share, cfg.error_share))
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, cfg)
        optimizer.zero_grad(set_to_none=True)
        loss = _accumulate_token_mean_loss(model, batch, pad)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss)
        if log_every and (step + 1) % log_every == 0:
            recent = sum(losses[-log_every:]) / len(losses[-log_every:])
            if progress:
                bar.set_postfix(loss=f"{recent:.4f}", refresh=False)
            else:
                log(f"sft step {step + 1}/{cfg.steps} loss {recent:.4f}")
    bar.close()
    model.eval()
    model.save_pretrained(str(hf_out), safe_serialization=True)
    tokenizer.save_pretrained(str(hf_out))
    _copy_generation_config(hf_in, hf_out)
    tail = losses[-20:]
    return {"steps": cfg.steps, "final_loss": sum(tail) / len(tail) if tail else None,
            "seconds": time.perf_counter() - start}


def _length_buckets(batch: list[tuple[list[int], list[int]]]) -> list[list[tuple[list[int], list[int]]]]:
    """The step's examples sorted by length and cut into at most two micro-batches, where the padded size is least.

    Teacher-layout rows carry a reference and the privileged-material rules (~300-400 tiny-tokenizer tokens),
    student rows ~90: one padded batch would pad every student row to the teacher length.
    """
    rows = sorted(batch, key=lambda ex: len(ex[0]))
    lengths = [len(ids) for ids, _ in rows]
    cost = {cut: cut * lengths[cut - 1] + (len(rows) - cut) * lengths[-1] for cut in range(1, len(rows) + 1)}
    cut = min(cost, key=cost.get)
    return [group for group in (rows[:cut], rows[cut:]) if group]


def _accumulate_token_mean_loss(model: Any, batch: list[tuple[list[int], list[int]]], pad: int) -> float:
    """Backward of the token mean of the assistant-turn loss over the whole `batch`, in `_length_buckets` micro-batches.

    Each micro-batch's mean loss is weighted by its share of the step's label tokens, so the gradient equals the
    one of a single padded batch (the same token mean), at the padding cost of each group alone. Returns the loss.
    """
    total_tokens = sum(sum(label != IGNORE for label in labels[1:]) for _, labels in batch)  # HF shifts by one
    total = 0.0
    for group in _length_buckets(batch):
        width = max(len(ids) for ids, _ in group)
        input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in group])  # [B, T]
        labels = torch.tensor([lab + [IGNORE] * (width - len(lab)) for _, lab in group])  # [B, T]
        attention_mask = (torch.arange(width)[None, :] < torch.tensor([len(i) for i, _ in group])[:, None]).long()
        tokens = int((labels[:, 1:] != IGNORE).sum())  # HF shifts labels left by one
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss * (tokens / total_tokens)
        loss.backward()
        total += float(loss.detach())
    return total


def _copy_generation_config(hf_in: str | Path, hf_out: str | Path) -> None:
    """The input's generation_config.json (EOS ids) wins over what save_pretrained derived."""
    src = Path(hf_in) / "generation_config.json"
    if src.is_file():
        (Path(hf_out) / "generation_config.json").write_bytes(src.read_bytes())


@torch.no_grad()
def view_probe(hf_dir: str | Path, rows: Sequence[dict[str, str]], views: Sequence[str] = MATH_VIEWS,
               *, max_new_tokens: int = 96, batch_size: int = 50, progress: bool = True) -> dict[str, float]:
    """Does the model read a privileged view? Greedy accuracy (%) on `rows` ({problem, solution, answer}) with the
    evaluation prompt (key "student") and with each view's teacher prompt (teacher thinking on, as in training).

    A frozen-teacher AVSD run only carries information about the answer when the view prompts score far above the
    student prompt; the main job records this before training. `progress`: a tqdm bar over the prompt kinds.
    """
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from avsd_megatron.verify.grading import grade_math_completion

    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    prompts: dict[str, list[str]] = {
        "student": [render_chat(tokenizer, math_eval_message(r["problem"]), thinking=False) for r in rows]
    }
    for view in views:
        prompts[view] = [
            render_chat(tokenizer, math_teacher_message(r["problem"], view, math_view_payload(view, r["solution"])),
                        thinking=True)
            for r in rows
        ]
    accuracy = {}
    for kind, texts in tqdm(prompts.items(), desc="probe", unit="prompt kind", disable=not progress,
                            dynamic_ncols=True):
        completions = greedy_completions(model, tokenizer, texts, max_new_tokens=max_new_tokens, batch_size=batch_size)
        correct = sum(grade_math_completion(text, row["answer"]).correct for text, row in zip(completions, rows))
        accuracy[kind] = 100.0 * correct / max(1, len(rows))
    return accuracy


@torch.no_grad()
def greedy_completions(model: Any, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int,
                       batch_size: int) -> list[str]:
    """Greedy completion text of each rendered prompt, `batch_size` prompts per left-padded `generate` call (the
    tokenizer's padding side is restored afterwards)."""
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # every row continues from its last prompt token
    texts = []
    try:
        for start in range(0, len(prompts), batch_size):
            enc = tokenizer(list(prompts[start : start + batch_size]), return_tensors="pt", padding=True,
                            add_special_tokens=False)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            texts += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return texts
