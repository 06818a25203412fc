"""Evaluation of an HF checkpoint on a jsonl set of problems: math Avg@k (spec 5.2) or code pass@k (spec 5.3).

    python -m avsd_megatron evaluate --hf outputs/tiny_cpu/hf_final \\
        --data avsd_megatron/data/assets/tiny_math/heldout.jsonl --k 8 --out outputs/tiny_cpu/eval.json
    python -m avsd_megatron evaluate --hf Qwen3-8B-avsd --data aime24.jsonl --k 16 --engine vllm \\
        --max-new-tokens 32768 --temperature 0.7 --top-p 0.95 --top-k -1 --thinking on
    python -m avsd_megatron evaluate --task code --hf outputs/tiny_code_cpu/hf_final \\
        --data avsd_megatron/data/assets/tiny_code/heldout.jsonl --k 8 --tests all --out outputs/tiny_code_cpu/eval.json

Math (`--task math`, the default). Per problem, the prompt is the problem text followed by the boxed-answer
instruction (`prompts.math_eval_message`: no "Problem:" prefix), rendered as one user turn with the checkpoint's
chat template, `enable_thinking` set by `--thinking`; k completions are sampled (seed
`rollout.request_seed(seed, problem index)`); each is graded by `grading.grade_math_completion` (last `\\boxed{}`
content, math-verify against the gold answer). The scores are
`grading.math_scores` (percentages) plus the standard error of Avg@k over problems,

    avg@k_stderr = 100 * std_i(c_i / k) / sqrt(P)       (c_i correct samples of problem i, P problems, ddof 1)

which treats the problems as a sample from a larger pool (the sampling noise of the k draws is inside it).

Data: jsonl, one object per line with string fields `problem` and `answer` (an int answer is accepted and turned
into its decimal string); other fields are ignored. A bad file or row raises `ValueError` naming the file, line and
field. The bundled `avsd_megatron/data/assets/tiny_math/*.jsonl` rows have this shape.

Output (`--out FILE.json`): {"summary": {...}, "config": {...}, "samples": [{"index", "problem", "answer",
"completions": [{"text", "extracted", "correct", "finish_reason", "num_tokens"}]}]}; the summary is also printed.
`--out` is checked (directory created, writable) before the model is loaded; each problem's sample is appended to
`FILE.json.samples.jsonl` as soon as it is graded, and running the same command again skips the problems already
there (`eval_output.SampleRecord`; another k, seed, checkpoint, data or test set is refused). `--limit` must be
>= 1; `--hf` must be a local HF directory with config.json.

Engines, for both tasks: `hf` (transformers generate, CPU or one GPU; `rollout.hf_engine.HFEngine`) or `vllm` (GPU only; one
rank of `rollout.vllm_engine.VLLMEngine`, which this module feeds the checkpoint's safetensors; not yet run on a GPU).

Benchmarks (spec 5.2) on a machine with Hub access, with `datasets`:

    import json
    from datasets import load_dataset
    for name, repo in [("aime24", "HuggingFaceH4/aime_2024"), ("aime25", "yentinglin/aime_2025"),
                       ("hmmt25", "MathArena/hmmt_feb_2025")]:
        with open(f"{name}.jsonl", "w") as f:
            for row in load_dataset(repo, split="train"):
                f.write(json.dumps({"problem": row["problem"], "answer": str(row["answer"])}) + "\\n")

(30 problems each; column names as on the dataset cards, not checked from this sandbox, which has no Hub access.)

Code (`--task code`, spec 5.3). Rows are code rows as the trainer reads them (`data.py`: `problem`,
`reference_solution`, non-empty `public_tests`, optional `id`, `input_format`, `output_format`, `constraints`,
`examples`, `hidden_tests`, ...; the bundled `avsd_megatron/data/assets/tiny_code/*.jsonl` have this shape); a bad row
raises `ValueError` naming file, line and field. The prompt is the training student's (`prompts.code_student_message`:
instructions, problem fields, the `<final_code>` layout), with an empty think block when thinking is off (the
default, as in the reference's code evaluation). k completions per problem (seed `request_seed(seed, index)`); each
is graded by `grading.grade_code_completion`: its program (`verify.extract.extract_code`) runs in the sandbox on the row's
tests, `--tests all` (public + hidden, the default), `hidden` (the reference's protocol; every row must have hidden
tests) or `public`, stopping at the first failure; its status is one of `sandbox.STATUSES`. Scores, with c_i passing
samples of problem i out of k:

    pass@1              = 100 * mean_i c_i / k                   (unbiased pass@1 = avg@k)
    pass@k              = 100 * mean_i [1 - C(k - c_i, k) / C(k, k)] = share of problems with a passing sample
                          (`grading.pass_at_k`, Chen et al. 2021; for 1 < j < k also `pass@j` with --pass-at j)
    pass@1_first_sample = 100 * share of problems whose first sample passes (the reference's pass@1)
    status_counts       = samples per status; pass@1_stderr as avg@k_stderr above

Programs run in bubblewrap (`sandbox.py`; 2 s wall time per test, 512 MiB) unless `--unsafe-subprocess-sandbox`
(the reference's flag: a plain subprocess, resource limits only, no isolation). Output as for math, the samples'
completions being {"text", "code", "status", "tests_run", "finish_reason", "num_tokens"}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from avsd_megatron.data.examples import BadRowError, CodeExample, RowRef, code_example_from_row
from avsd_megatron.data.prompts import code_student_message, math_eval_message, render_chat
from avsd_megatron.rollout.engine import SamplingParams, request_seed
from avsd_megatron.verify.extract import extract_code
from avsd_megatron.pipelines.eval_output import SampleRecord
from avsd_megatron.verify.grading import (
    MathGrade,
    code_scores,
    grade_code_completion,
    grade_math_completion,
    math_scores,
)
from avsd_megatron.verify.sandbox import STATUSES, Sandbox, SandboxConfig, TestCase

__all__ = [
    "EvalConfig",
    "evaluate_code",
    "evaluate_hf_dir",
    "evaluate_math",
    "load_code_eval_rows",
    "load_math_eval_rows",
    "main",
    "parse_args",
]

TASKS = ("math", "code")
TEST_SETS = ("all", "hidden", "public")
"""Which tests of a code row grade a sample: public + hidden, hidden only (spec 5.3), public only."""


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
    _check_limit(limit)
    rows: list[dict[str, str]] = []
    for lineno, row in _jsonl_objects(path):
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


def _check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise ValueError(f"--limit {limit} must be >= 1 (omit it to evaluate every problem)")


def _jsonl_objects(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based line number, object) of each non-empty line; FileNotFoundError / ValueError naming file:line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"evaluation data {path} does not exist")
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
            yield lineno, row


def evaluate_math(
    engine: Any, tokenizer: Any, rows: Sequence[dict[str, str]], cfg: EvalConfig, *, progress: bool = True,
    record: SampleRecord | None = None,
) -> dict[str, Any]:
    """Sample cfg.k completions per row with `engine` (a rollout.RolloutEngine), grade them, score them.

    `record` (`eval_output.SampleRecord`): each problem's sample is appended to it as soon as it is graded, and a
    problem it already holds is taken from it instead of being generated again.

    Returns:
        {"summary": {avg@k, pass@k, format_rate, problems, k, avg@k_stderr, mean_completion_tokens, length_rate,
        eval_seconds}, "config": asdict(cfg), "samples": [...]} (module docstring).
    """
    from tqdm import tqdm

    params = cfg.sampling()
    start = time.perf_counter()
    samples, grades = [], []
    for index, row in enumerate(tqdm(rows, desc="eval", disable=not progress, dynamic_ncols=True)):
        sample = _recorded(record, index, row["problem"])
        if sample is None:
            text = render_chat(tokenizer, math_eval_message(row["problem"]), thinking=cfg.thinking)
            ids = tokenizer.encode(text, add_special_tokens=False)
            # one prompt per call: its seed depends on the problem index only, not on batching
            completions = engine.generate([ids], params, seed=request_seed(cfg.seed, index))
            row_grades = [grade_math_completion(c.text, row["answer"]) for c in completions]
            sample = {
                "index": index, "problem": row["problem"], "answer": row["answer"],
                "completions": [
                    {"text": c.text, "extracted": g.answer, "correct": g.correct, "finish_reason": c.finish_reason,
                     "num_tokens": len(c.token_ids)}
                    for c, g in zip(completions, row_grades)
                ],
            }
            if record is not None:
                record.append(sample)
        grades.append([MathGrade(c["extracted"], c["correct"]) for c in sample["completions"]])
        samples.append(sample)
    scores = math_scores(grades)
    summary = scores.as_dict() | {
        "k": cfg.k,
        f"avg@{cfg.k}_stderr": _stderr([[g.correct for g in row] for row in grades]),
        **_length_stats(samples),
        "eval_seconds": time.perf_counter() - start,
    }
    return {"summary": summary, "config": asdict(cfg), "samples": samples}


def _recorded(record: SampleRecord | None, index: int, problem: str) -> dict[str, Any] | None:
    """The sample of problem `index` already in `record`, if any; it must be of the same problem text."""
    sample = None if record is None else record.done.get(index)
    if sample is not None and sample.get("problem") != problem:
        raise ValueError(
            f"{record.path}: problem {index} differs from the data file's (the data changed since those samples "
            "were written); delete the samples file or choose another --out"
        )
    return sample


def _stderr(hits: Sequence[Sequence[bool]]) -> float:
    """100 * std over problems of the per-problem hit rate / sqrt(P) (module docstring); 0 for one problem."""
    per_problem = [sum(row) / len(row) for row in hits]
    return 100.0 * statistics.stdev(per_problem) / math.sqrt(len(per_problem)) if len(per_problem) > 1 else 0.0


def _length_stats(samples: Sequence[dict[str, Any]]) -> dict[str, float]:
    flat = [c for s in samples for c in s["completions"]]
    return {
        "mean_completion_tokens": sum(c["num_tokens"] for c in flat) / len(flat),
        "length_rate": 100.0 * sum(c["finish_reason"] == "length" for c in flat) / len(flat),
    }


# ----------------------------------------------------------------------------------------------------------------
# Code (spec 5.3)


def load_code_eval_rows(path: str | Path, limit: int | None = None, tests: str = "all") -> list[CodeExample]:
    """Code rows of a jsonl file (`data.code_example_from_row`), the first `limit` if given.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not valid JSON, a bad code row, a row without hidden tests under tests='hidden' (the message
            names file, line and field), an unknown `tests`, or no rows.
    """
    if tests not in TEST_SETS:
        raise ValueError(f"tests={tests!r} is not one of {TEST_SETS}")
    _check_limit(limit)
    rows: list[CodeExample] = []
    for lineno, row in _jsonl_objects(path):
        try:
            example = code_example_from_row(row, RowRef(str(path), lineno - 1))
        except BadRowError as err:
            raise ValueError(f"{path}:{lineno}: field {err.field!r} {err.reason} (row keys: {sorted(row)})") from None
        if tests == "hidden" and not example.hidden_tests:
            raise ValueError(f"{path}:{lineno}: field 'hidden_tests' is missing or empty, which --tests hidden needs")
        rows.append(example)
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def code_eval_tests(example: CodeExample, tests: str = "all") -> tuple[TestCase, ...]:
    """The tests that grade a sample of `example` (TEST_SETS)."""
    if tests == "all":
        return example.public_tests + example.hidden_tests
    if tests == "hidden":
        return example.hidden_tests
    if tests == "public":
        return example.public_tests
    raise ValueError(f"tests={tests!r} is not one of {TEST_SETS}")


def code_eval_prompt(tokenizer: Any, example: CodeExample, cfg: EvalConfig) -> str:
    """The training student's code prompt, rendered (spec 3.4, 5.3)."""
    return render_chat(tokenizer, code_student_message(example), thinking=cfg.thinking, ensure_empty_think=True)


def evaluate_code(
    engine: Any, tokenizer: Any, examples: Sequence[CodeExample], cfg: EvalConfig, sandbox: Sandbox, *,
    tests: str = "all", pass_at: Sequence[int] = (), workers: int = 1, progress: bool = True,
    record: SampleRecord | None = None,
) -> dict[str, Any]:
    """Sample cfg.k completions per example with `engine`, run each in `sandbox` on its tests, score them.

    Args:
        record: as for `evaluate_math`.
        pass_at: extra k' in [1, cfg.k] for which to report the unbiased pass@k' (1 and cfg.k always are).
        workers: samples graded at once (threads driving sandbox processes); the results do not depend on it.
    Returns:
        {"summary": {pass@1, pass@k, pass@1_first_sample, avg@k, pass@1_stderr, status_counts, problems, k,
        mean_completion_tokens, length_rate, eval_seconds}, "config": asdict(cfg), "samples": [...]} (module
        docstring).
    """
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    params = cfg.sampling()
    start = time.perf_counter()
    samples, statuses = [], []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for index, example in enumerate(tqdm(examples, desc="eval", disable=not progress, dynamic_ncols=True)):
            sample = _recorded(record, index, example.problem)
            if sample is None:
                ids = tokenizer.encode(code_eval_prompt(tokenizer, example, cfg), add_special_tokens=False)
                completions = engine.generate([ids], params, seed=request_seed(cfg.seed, index))
                row_tests = code_eval_tests(example, tests)
                results = list(pool.map(lambda c: grade_code_completion(c.text, row_tests, sandbox), completions))
                sample = {
                    "index": index, "id": example.id, "problem": example.problem, "tests": len(row_tests),
                    "completions": [
                        {"text": c.text, "code": extract_code(c.text), "status": r.status, "tests_run": r.tests_run,
                         "finish_reason": c.finish_reason, "num_tokens": len(c.token_ids)}
                        for c, r in zip(completions, results)
                    ],
                }
                if record is not None:
                    record.append(sample)
            statuses.append([c["status"] for c in sample["completions"]])
            samples.append(sample)
    scores = code_scores(statuses, ks=(1, *pass_at))
    counts = {status: sum(row.count(status) for row in statuses) for status in STATUSES}
    summary = {
        "pass@1": scores.unbiased_pass_at_k[1],
        **{f"pass@{k}": v for k, v in scores.unbiased_pass_at_k.items() if k != 1},
        "pass@1_first_sample": scores.pass_at_1_first,
        f"avg@{cfg.k}": scores.avg_at_n,
        "pass@1_stderr": _stderr([[s == "passed" for s in row] for row in statuses]),
        "status_counts": counts,
        "problems": float(scores.problems),
        "k": cfg.k,
        **_length_stats(samples),
        "eval_seconds": time.perf_counter() - start,
    }
    return {"summary": summary, "config": asdict(cfg) | {"tests": tests}, "samples": samples}


def evaluate_hf_dir(hf_dir: str | Path, data: str | Path, cfg: EvalConfig, *, limit: int | None = None,
                    engine: str = "hf", progress: bool = True, task: str = "math", tests: str = "all",
                    sandbox: SandboxConfig | None = None, pass_at: Sequence[int] = (),
                    workers: int = 1, record: SampleRecord | None = None) -> dict[str, Any]:
    """Load the checkpoint and the data, then `evaluate_math` (task='math') or `evaluate_code` (task='code', in a
    `Sandbox(sandbox)`, default `SandboxConfig()` = bubblewrap); the result also records the paths. `record`: see
    `evaluate_math`.

    Raises:
        ValueError: unknown task / engine, bad data (see the loaders).
        SandboxUnavailableError: task='code' and bubblewrap is missing or unusable (sandbox.kind='bwrap').
    """
    if task == "math":
        rows: Sequence[Any] = load_math_eval_rows(data, limit)

        def render(tok: Any, row: dict[str, str]) -> str:
            return render_chat(tok, math_eval_message(row["problem"]), thinking=cfg.thinking)
    elif task == "code":
        rows = load_code_eval_rows(data, limit, tests)
        box = Sandbox(sandbox if sandbox is not None else SandboxConfig())  # before any model is loaded

        def render(tok: Any, row: CodeExample) -> str:
            return code_eval_prompt(tok, row, cfg)
    else:
        raise ValueError(f"task={task!r} is not one of {TASKS}")
    check_hf_dir(hf_dir)
    if engine == "hf":
        from avsd_megatron.rollout.hf_engine import HFEngine

        eng = HFEngine.from_pretrained(hf_dir)
        tokenizer = eng.tokenizer
    elif engine == "vllm":
        eng, tokenizer = _vllm_engine(hf_dir, cfg, max_prompt_tokens=_longest_prompt(hf_dir, rows, render))
    else:
        raise ValueError(f"engine={engine!r} is not one of ('hf', 'vllm')")
    if task == "math":
        result = evaluate_math(eng, tokenizer, rows, cfg, progress=progress, record=record)
    else:
        result = evaluate_code(eng, tokenizer, rows, cfg, box, tests=tests, pass_at=pass_at, workers=workers,
                               progress=progress, record=record)
        result["config"] |= {"sandbox": asdict(box.cfg)}
    result["config"] |= {"task": task, "hf": str(hf_dir), "data": str(data), "limit": limit, "engine": engine}
    return result


def check_hf_dir(hf_dir: str | Path) -> None:
    """An HF checkpoint directory with config.json (not a hub id: evaluation reads local files only)."""
    path = Path(hf_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"--hf {hf_dir}: no such directory (an HF checkpoint directory; hub ids are not read)")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--hf {hf_dir}: no config.json in it (not an HF checkpoint directory)")


def _longest_prompt(hf_dir: str | Path, rows: Sequence[Any], render: Any) -> int:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    return max(len(tokenizer.encode(render(tokenizer, r), add_special_tokens=False)) for r in rows)


def _vllm_engine(hf_dir: str | Path, cfg: EvalConfig, *, max_prompt_tokens: int) -> tuple[Any, Any]:
    """A one-rank VLLMEngine holding the checkpoint's weights (GPU only; initialises a one-rank process group)."""
    import torch.distributed as dist
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from avsd_megatron.rollout.config import RolloutConfig, VLLMConfig
    from avsd_megatron.rollout.vllm_engine import VLLMEngine

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
    parser = argparse.ArgumentParser(
        prog="python -m avsd_megatron evaluate",
        description="Evaluate an HF checkpoint on a jsonl of problems: math Avg@k / Pass@k / format rate "
        "(--task math), or code pass@1 / pass@k / status counts with every sample run in the sandbox (--task code).",
        epilog="Scores, data schemas and output layout: the module docstring (avsd_megatron/pipelines/evaluate.py).",
    )
    # -- what -----------------------------------------------------------------------------------------------------
    parser.add_argument("--task", choices=TASKS, default="math",
                        help="math: boxed answers graded with math-verify; code: programs run on the row's tests")
    parser.add_argument("--hf", required=True, help="HF checkpoint directory (config, safetensors, tokenizer)")
    parser.add_argument("--data", required=True,
                        help="jsonl; math: string fields problem, answer; code: code rows (problem, "
                        "reference_solution, public_tests, optional hidden_tests, ...; avsd_megatron/data/examples.py)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N >= 1 problems only")
    parser.add_argument("--engine", choices=("hf", "vllm"), default="hf", help="hf: transformers; vllm: GPU only")
    # -- sampling -------------------------------------------------------------------------------------------------
    parser.add_argument("--k", type=int, default=8, help="samples per problem")
    parser.add_argument("--max-new-tokens", type=int, default=4096, help="completion length cap")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--top-k", type=int, default=-1, help="-1 = off")
    parser.add_argument("--thinking", choices=("on", "off"), default="off", help="chat template enable_thinking")
    parser.add_argument("--seed", type=int, default=0, help="problem i samples with request_seed(seed, i)")
    # -- code grading ---------------------------------------------------------------------------------------------
    parser.add_argument("--tests", choices=TEST_SETS, default="all",
                        help="code: tests that grade a sample: public + hidden (default), hidden only (the "
                        "reference's protocol), public only")
    parser.add_argument("--pass-at", type=int, nargs="+", default=[], metavar="J",
                        help="code: also report the unbiased pass@J for these J in [1, k] (pass@1, pass@k always)")
    parser.add_argument("--test-timeout", type=float, default=2.0, help="code: wall-time limit per test, seconds")
    parser.add_argument("--memory-mb", type=int, default=512, help="code: address-space limit of a program, MiB")
    parser.add_argument("--workers", type=int, default=1, help="code: samples graded at once")
    parser.add_argument("--unsafe-subprocess-sandbox", action="store_true",
                        help="code: run programs in a plain subprocess (resource limits only, NO isolation; the "
                        "reference's flag) instead of bubblewrap")
    # -- output ---------------------------------------------------------------------------------------------------
    parser.add_argument("--out", default=None,
                        help="write summary, config and every sample to this JSON file; samples are kept as made in "
                        "OUT.samples.jsonl and a re-run skips the problems already there")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    cfg = EvalConfig(k=args.k, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                     max_new_tokens=args.max_new_tokens, thinking=args.thinking == "on", seed=args.seed)
    _check_limit(args.limit)
    if args.workers < 1:
        raise ValueError(f"--workers {args.workers} must be >= 1")
    bad_j = [j for j in args.pass_at if not 1 <= j <= args.k]
    if bad_j:
        raise ValueError(f"--pass-at {bad_j} must lie in [1, --k={args.k}]")
    check_hf_dir(args.hf)
    sandbox = None
    if args.task == "code":
        sandbox = SandboxConfig(kind="subprocess" if args.unsafe_subprocess_sandbox else "bwrap",
                                wall_time_s=args.test_timeout, memory_mb=args.memory_mb)
    record = None
    if args.out:  # before the model is loaded: an unwritable --out fails now, not after the evaluation
        header = {"task": args.task, "config": asdict(cfg), "hf": str(Path(args.hf).absolute()),
                  "data": str(Path(args.data).absolute()), "tests": args.tests if args.task == "code" else None}
        record = SampleRecord(args.out, header)
        if record.done:
            print(f"evaluate: {len(record.done)} problems already in {record.path}; evaluating the rest")
    result = evaluate_hf_dir(args.hf, args.data, cfg, limit=args.limit, engine=args.engine,
                             progress=not args.no_progress, task=args.task, tests=args.tests, sandbox=sandbox,
                             pass_at=args.pass_at, workers=args.workers, record=record)
    if record is not None:
        record.finish(result)
    print(json.dumps(result["summary"], indent=1))
    return result


if __name__ == "__main__":
    main()
