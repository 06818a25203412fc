"""Math evaluation (spec 5.2): Avg@k, Pass@k and format rate of an HF checkpoint on a jsonl set of problems.

    python -m avsd_megatron.evaluate --hf outputs/tiny_cpu/hf_final \\
        --data avsd_megatron/assets/tiny_math/heldout.jsonl --k 8 --out outputs/tiny_cpu/eval.json
    python -m avsd_megatron.evaluate --hf Qwen3-8B-avsd --data aime24.jsonl --k 16 --engine vllm \\
        --max-new-tokens 32768 --temperature 0.7 --top-p 0.95 --top-k -1 --thinking on

Per problem, the prompt is the problem text followed by the boxed-answer instruction (`prompts.math_eval_message`:
no "Problem:" prefix), rendered as one user turn with the checkpoint's chat template, `enable_thinking` set by
`--thinking`; k completions are sampled (seed `rollout.request_seed(seed, problem index)`); each is graded by
`grading.grade_math_completion` (last `\\boxed{}` content, math-verify against the gold answer). The scores are
`grading.math_scores` (percentages) plus the standard error of Avg@k over problems,

    avg@k_stderr = 100 * std_i(c_i / k) / sqrt(P)       (c_i correct samples of problem i, P problems, ddof 1)

which treats the problems as a sample from a larger pool (the sampling noise of the k draws is inside it).

Data: jsonl, one object per line with string fields `problem` and `answer` (an int answer is accepted and turned
into its decimal string); other fields are ignored. A bad file or row raises `ValueError` naming the file, line and
field. The bundled `avsd_megatron/assets/tiny_math/*.jsonl` rows have this shape.

Output (`--out FILE.json`): {"summary": {...}, "config": {...}, "samples": [{"index", "problem", "answer",
"completions": [{"text", "extracted", "correct", "finish_reason", "num_tokens"}]}]}; the summary is also printed.

Engines: `hf` (transformers generate, CPU or one GPU; `rollout.HFEngine`) or `vllm` (GPU only; one rank of
`rollout_vllm.VLLMEngine`, which this module feeds the checkpoint's safetensors; not yet run on a GPU).

Benchmarks (spec 5.2) on a machine with Hub access, with `datasets`:

    import json
    from datasets import load_dataset
    for name, repo in [("aime24", "HuggingFaceH4/aime_2024"), ("aime25", "yentinglin/aime_2025"),
                       ("hmmt25", "MathArena/hmmt_feb_2025")]:
        with open(f"{name}.jsonl", "w") as f:
            for row in load_dataset(repo, split="train"):
                f.write(json.dumps({"problem": row["problem"], "answer": str(row["answer"])}) + "\\n")

(30 problems each; column names as on the dataset cards, not checked from this sandbox, which has no Hub access.)
Code pass@k (spec 5.3: `grading.code_scores` with the sandbox) has no CLI yet.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from avsd_megatron.grading import grade_math_completion, math_scores
from avsd_megatron.prompts import math_eval_message, render_chat
from avsd_megatron.rollout import SamplingParams, request_seed

__all__ = ["EvalConfig", "evaluate_math", "load_math_eval_rows", "main", "parse_args"]


@dataclass(frozen=True)
class EvalConfig:
    """What to sample and how many times."""

    k: int = 8
    """Samples per problem (Avg@k)."""
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = -1
    """-1 or 0 = off."""
    max_new_tokens: int = 4096
    thinking: bool = False
    """enable_thinking of the chat template."""
    seed: int = 0
    """Problem i is sampled with seed request_seed(seed, i)."""

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k={self.k!r} must be >= 1")

    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              max_new_tokens=self.max_new_tokens, n=self.k)


def load_math_eval_rows(path: str | Path, limit: int | None = None) -> list[dict[str, str]]:
    """{problem, answer} rows of a jsonl file, the first `limit` if given.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not valid JSON, not an object, a missing / empty / non-string `problem` or `answer` (the message
            names file, line and field), or no rows.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"evaluation data {path} does not exist")
    rows: list[dict[str, str]] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            clean = {}
            for name in ("problem", "answer"):
                value = row.get(name)
                if isinstance(value, int) and not isinstance(value, bool) and name == "answer":
                    value = str(value)
                if not isinstance(value, str) or not value.strip():
                    raise ValueError(
                        f"{path}:{lineno}: field {name!r} must be a non-empty string, got {value!r}"
                        f" (row keys: {sorted(row)})"
                    )
                clean[name] = value
            rows.append(clean)
            if limit is not None and len(rows) >= limit:
                break
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def evaluate_math(
    engine: Any, tokenizer: Any, rows: Sequence[dict[str, str]], cfg: EvalConfig, *, progress: bool = True
) -> dict[str, Any]:
    """Sample cfg.k completions per row with `engine` (a rollout.RolloutEngine), grade them, score them.

    Returns:
        {"summary": {avg@k, pass@k, format_rate, problems, k, avg@k_stderr, mean_completion_tokens, length_rate,
        eval_seconds}, "config": asdict(cfg), "samples": [...]} (module docstring).
    """
    from tqdm import tqdm

    params = cfg.sampling()
    start = time.perf_counter()
    samples, grades = [], []
    for index, row in enumerate(tqdm(rows, desc="eval", disable=not progress, dynamic_ncols=True)):
        text = render_chat(tokenizer, math_eval_message(row["problem"]), thinking=cfg.thinking)
        ids = tokenizer.encode(text, add_special_tokens=False)
        # one prompt per call: its seed depends on the problem index only, not on batching
        completions = engine.generate([ids], params, seed=request_seed(cfg.seed, index))
        row_grades = [grade_math_completion(c.text, row["answer"]) for c in completions]
        grades.append(row_grades)
        samples.append({
            "index": index, "problem": row["problem"], "answer": row["answer"],
            "completions": [
                {"text": c.text, "extracted": g.answer, "correct": g.correct, "finish_reason": c.finish_reason,
                 "num_tokens": len(c.token_ids)}
                for c, g in zip(completions, row_grades)
            ],
        })
    scores = math_scores(grades)
    per_problem = [sum(g.correct for g in row) / len(row) for row in grades]
    stderr = 100.0 * statistics.stdev(per_problem) / math.sqrt(len(per_problem)) if len(per_problem) > 1 else 0.0
    flat = [c for s in samples for c in s["completions"]]
    summary = scores.as_dict() | {
        "k": cfg.k,
        f"avg@{cfg.k}_stderr": stderr,
        "mean_completion_tokens": sum(c["num_tokens"] for c in flat) / len(flat),
        "length_rate": 100.0 * sum(c["finish_reason"] == "length" for c in flat) / len(flat),
        "eval_seconds": time.perf_counter() - start,
    }
    return {"summary": summary, "config": asdict(cfg), "samples": samples}


def evaluate_hf_dir(hf_dir: str | Path, data: str | Path, cfg: EvalConfig, *, limit: int | None = None,
                    engine: str = "hf", progress: bool = True) -> dict[str, Any]:
    """Load the checkpoint and the data, then `evaluate_math`; the result also records the paths."""
    rows = load_math_eval_rows(data, limit)
    if engine == "hf":
        from avsd_megatron.rollout import HFEngine

        eng = HFEngine.from_pretrained(hf_dir)
        tokenizer = eng.tokenizer
    elif engine == "vllm":
        eng, tokenizer = _vllm_engine(hf_dir, cfg, max_prompt_tokens=_longest_prompt(hf_dir, rows, cfg))
    else:
        raise ValueError(f"engine={engine!r} is not one of ('hf', 'vllm')")
    result = evaluate_math(eng, tokenizer, rows, cfg, progress=progress)
    result["config"] |= {"hf": str(hf_dir), "data": str(data), "limit": limit, "engine": engine}
    return result


def _longest_prompt(hf_dir: str | Path, rows: Sequence[dict[str, str]], cfg: EvalConfig) -> int:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    return max(
        len(tokenizer.encode(render_chat(tokenizer, math_eval_message(r["problem"]), thinking=cfg.thinking),
                             add_special_tokens=False))
        for r in rows
    )


def _vllm_engine(hf_dir: str | Path, cfg: EvalConfig, *, max_prompt_tokens: int) -> tuple[Any, Any]:
    """A one-rank VLLMEngine holding the checkpoint's weights (GPU only; initialises a one-rank process group)."""
    import torch.distributed as dist
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from avsd_megatron.config import RolloutConfig, VLLMConfig
    from avsd_megatron.rollout_vllm import VLLMEngine

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29513")
        dist.init_process_group("nccl", init_method="env://", rank=0, world_size=1)
    rollout = RolloutConfig(
        engine="vllm", temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
        max_new_tokens=cfg.max_new_tokens,
        vllm=VLLMConfig(gpu_memory_utilization=0.85, max_model_len=max_prompt_tokens + cfg.max_new_tokens,
                        max_num_seqs=256),
    )
    engine = VLLMEngine(hf_dir, rollout, tensor_parallel_size=1, rank=0, world_size=1,
                        max_prompt_tokens=max_prompt_tokens, dtype="bfloat16")
    engine.wake_up(("weights",))
    files = sorted(Path(hf_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{hf_dir}: no *.safetensors files")
    engine.update_weights((name, t) for f in files for name, t in load_file(str(f)).items())
    engine.wake_up(("kv_cache",))
    return engine, AutoTokenizer.from_pretrained(str(hf_dir))


# ----------------------------------------------------------------------------------------------------------------
# CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m avsd_megatron.evaluate",
                                     description="Avg@k / Pass@k / format rate of an HF checkpoint on a math jsonl.")
    # -- what -----------------------------------------------------------------------------------------------------
    parser.add_argument("--hf", required=True, help="HF checkpoint directory (config, safetensors, tokenizer)")
    parser.add_argument("--data", required=True, help="jsonl with string fields problem, answer")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N problems only")
    parser.add_argument("--engine", choices=("hf", "vllm"), default="hf", help="hf: transformers; vllm: GPU only")
    # -- sampling -------------------------------------------------------------------------------------------------
    parser.add_argument("--k", type=int, default=8, help="samples per problem")
    parser.add_argument("--max-new-tokens", type=int, default=4096, help="completion length cap")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--top-k", type=int, default=-1, help="-1 = off")
    parser.add_argument("--thinking", choices=("on", "off"), default="off", help="chat template enable_thinking")
    parser.add_argument("--seed", type=int, default=0, help="problem i samples with request_seed(seed, i)")
    # -- output ---------------------------------------------------------------------------------------------------
    parser.add_argument("--out", default=None, help="write summary, config and every sample to this JSON file")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    cfg = EvalConfig(k=args.k, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                     max_new_tokens=args.max_new_tokens, thinking=args.thinking == "on", seed=args.seed)
    result = evaluate_hf_dir(args.hf, args.data, cfg, limit=args.limit, engine=args.engine,
                             progress=not args.no_progress)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(json.dumps(result["summary"], indent=1))
    return result


if __name__ == "__main__":
    main()
