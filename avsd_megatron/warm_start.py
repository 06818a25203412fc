"""Supervised warm start of an HF causal LM on worked math solutions (plain torch + transformers, CPU or one GPU).

The main job (`main_job`) starts AVSD from a random-init tiny Qwen3, which can neither solve a problem nor read a
privileged reference. A short SFT fixes both, as pre-training does for a real model:

* each train row {problem, solution} becomes one chat example: a user turn, then `solution + <|im_end|>` as the
  assistant turn; the loss is the token mean of the assistant turn only (prompt tokens are masked);
* the user turn is, per example (seeded draw), the training student prompt (`prompts.math_student_message`,
  thinking off), the evaluation prompt (`math_eval_message`, thinking off), or, with probability `teacher_share`,
  one of the math teacher prompts (`math_teacher_message` with a `views.math_view_payload` of a uniformly drawn
  view, teacher thinking on). The teacher rows teach the model to use a reference in its context, so that the
  privileged views carry information at the start of AVSD (the frozen teacher is this warm start).

AdamW (β = (0.9, 0.95), weight decay 0.01), linear warmup over the first 5% of steps then cosine decay to 10% of
`lr`, grad-norm clip 1.0, fp32. The examples are drawn without replacement from a seeded permutation of the rows.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from avsd_megatron.prompts import math_eval_message, math_student_message, math_teacher_message, render_chat
from avsd_megatron.views import MATH_VIEWS, math_view_payload

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
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError(f"SFTConfig: steps={self.steps} >= 0, batch_size={self.batch_size} >= 1 and "
                             f"lr={self.lr} > 0 needed")
        if not 0.0 <= self.teacher_share <= 1.0:
            raise ValueError(f"SFTConfig.teacher_share={self.teacher_share!r} must be in [0, 1]")


def sft_example_ids(tokenizer: Any, row: dict[str, str], rng: random.Random, teacher_share: float
                    ) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one row: rendered user turn + solution + EOS; labels IGNORE on the prompt."""
    if rng.random() < teacher_share:
        view = rng.choice(MATH_VIEWS)
        message = math_teacher_message(row["problem"], view, math_view_payload(view, row["solution"]))
        prompt = render_chat(tokenizer, message, thinking=True)
    else:
        message = (math_student_message if rng.random() < 0.5 else math_eval_message)(row["problem"])
        prompt = render_chat(tokenizer, message, thinking=False)
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    answer_ids = tokenizer.encode(row["solution"], add_special_tokens=False) + [tokenizer.eos_token_id]
    return prompt_ids + answer_ids, [IGNORE] * len(prompt_ids) + answer_ids


def _lr_at(step: int, cfg: SFTConfig) -> float:
    warmup = max(1, cfg.steps // 20)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg.steps - warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def warm_start(hf_in: str | Path, hf_out: str | Path, rows: Sequence[dict[str, str]], cfg: SFTConfig,
               *, log_every: int = 50, log=print) -> dict[str, Any]:
    """SFT the HF checkpoint `hf_in` on `rows` (module docstring) and save it (with its tokenizer) to `hf_out`.

    Returns:
        {"steps", "final_loss" (mean of the last min(20, steps) steps), "seconds"}.
    """
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
    for step in range(cfg.steps):
        batch = []
        for _ in range(cfg.batch_size):
            if not order:
                order = list(range(len(rows)))
                rng.shuffle(order)
            batch.append(sft_example_ids(tokenizer, rows[order.pop()], rng, cfg.teacher_share))
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in batch])  # [B, T]
        labels = torch.tensor([lab + [IGNORE] * (width - len(lab)) for _, lab in batch])  # [B, T]
        attention_mask = (torch.arange(width)[None, :] < torch.tensor([len(i) for i, _ in batch])[:, None]).long()
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, cfg)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        if log_every and (step + 1) % log_every == 0:
            log(f"sft step {step + 1}/{cfg.steps} loss {sum(losses[-log_every:]) / len(losses[-log_every:]):.4f}")
    model.eval()
    model.save_pretrained(str(hf_out), safe_serialization=True)
    tokenizer.save_pretrained(str(hf_out))
    _copy_generation_config(hf_in, hf_out)
    tail = losses[-20:]
    return {"steps": cfg.steps, "final_loss": sum(tail) / len(tail) if tail else None,
            "seconds": time.perf_counter() - start}


def _copy_generation_config(hf_in: str | Path, hf_out: str | Path) -> None:
    """The input's generation_config.json (EOS ids) wins over what save_pretrained derived."""
    src = Path(hf_in) / "generation_config.json"
    if src.is_file():
        (Path(hf_out) / "generation_config.json").write_bytes(src.read_bytes())
