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

Engines, for both tasks: `hf` (transformers generate, CPU or one GPU; `rollout.hf_engine.HFEngine`) or `vllm` (GPU
only; not yet run on a GPU): one plain `rollout.vllm_engine.StandaloneVLLMEngine` per visible GPU (`--gpus N` for
fewer), each in its own process with CUDA_VISIBLE_DEVICES set to its GPU, loading the HF checkpoint itself; problem
i goes to engine i mod G and samples with seed request_seed(seed, i), so the merged result is that of one engine.
No torchrun, no process group, no RANK / LOCAL_RANK: run it as one plain process on a GPU node.

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
    "VLLMEvalOptions",
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
    start = time.perf_counter()
    samples, grades = sample_math(engine, tokenizer, rows, cfg, range(len(rows)), progress=progress, record=record)
    return math_result(samples, grades, cfg, time.perf_counter() - start)


def sample_math(engine: Any, tokenizer: Any, rows: Sequence[dict[str, str]], cfg: EvalConfig,
                indices: Sequence[int], *, progress: bool = False,
                record: SampleRecord | None = None) -> tuple[list[dict[str, Any]], list[list[Any]]]:
    """(samples, grades) of `rows`, whose positions in the whole set are `indices` (they pick the seeds)."""
    from tqdm import tqdm

    params = cfg.sampling()
    samples, grades = [], []
    for index, row in zip(indices, tqdm(rows, desc="eval", disable=not progress, dynamic_ncols=True), strict=True):
        sample = _recorded(record, index, row["problem"])
        if sample is None:
            text = render_chat(tokenizer, math_eval_message(row["problem"]), thinking=cfg.thinking)
            ids = tokenizer.encode(text, add_special_tokens=False)
            # one prompt per call: its seed depends on the problem index only, not on batching or sharding
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
        grades.append(_graded("math", sample))
        samples.append(sample)
    return samples, grades


def _graded(task: str, sample: dict[str, Any]) -> list[Any]:
    """The grades (math: `MathGrade`s) or statuses (code) of one problem's sample, as `sample_*` return them."""
    if task == "math":
        return [MathGrade(c["extracted"], c["correct"]) for c in sample["completions"]]
    return [c["status"] for c in sample["completions"]]


def math_result(samples: list[dict[str, Any]], grades: list[list[Any]], cfg: EvalConfig,
                seconds: float) -> dict[str, Any]:
    """The result dict of `evaluate_math` from all problems' samples and grades (in problem order)."""
    scores = math_scores(grades)
    summary = scores.as_dict() | {
        "k": cfg.k,
        f"avg@{cfg.k}_stderr": _stderr([[g.correct for g in row] for row in grades]),
        **_length_stats(samples),
        "eval_seconds": seconds,
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
    start = time.perf_counter()
    samples, statuses = sample_code(engine, tokenizer, examples, cfg, sandbox, range(len(examples)), tests=tests,
                                    workers=workers, progress=progress, record=record)
    return code_result(samples, statuses, cfg, tests, pass_at, time.perf_counter() - start)


def sample_code(engine: Any, tokenizer: Any, examples: Sequence[CodeExample], cfg: EvalConfig, sandbox: Sandbox,
                indices: Sequence[int], *, tests: str = "all", workers: int = 1,
                progress: bool = False,
                record: SampleRecord | None = None) -> tuple[list[dict[str, Any]], list[list[str]]]:
    """(samples, statuses) of `examples`, whose positions in the whole set are `indices` (they pick the seeds)."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    params = cfg.sampling()
    samples, statuses = [], []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        rows = tqdm(examples, desc="eval", disable=not progress, dynamic_ncols=True)
        for index, example in zip(indices, rows, strict=True):
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
            statuses.append(_graded("code", sample))
            samples.append(sample)
    return samples, statuses


def code_result(samples: list[dict[str, Any]], statuses: list[list[str]], cfg: EvalConfig, tests: str,
                pass_at: Sequence[int], seconds: float) -> dict[str, Any]:
    """The result dict of `evaluate_code` from all problems' samples and statuses (in problem order)."""
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
        "eval_seconds": seconds,
    }
    return {"summary": summary, "config": asdict(cfg) | {"tests": tests}, "samples": samples}


@dataclass(frozen=True)
class VLLMEvalOptions:
    """How `--engine vllm` runs: one plain vLLM engine per GPU, each loading the HF checkpoint itself and sampling
    its share of the problems (problem i goes to engine i mod G)."""

    gpus: int | None = None
    """Engines (one GPU each); None = every visible GPU (CUDA_VISIBLE_DEVICES, else all of the node's)."""
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 256
    """Concurrent sequences per engine (the k samples of a problem run together)."""
    engine_factory: Any = None
    """Module-level callable `factory(**vllm_llm_kwargs) -> engine` run in each GPU's process; None =
    `rollout.vllm_engine.StandaloneVLLMEngine` (tests pass a fake here)."""


def evaluate_hf_dir(hf_dir: str | Path, data: str | Path, cfg: EvalConfig, *, limit: int | None = None,
                    engine: str = "hf", progress: bool = True, task: str = "math", tests: str = "all",
                    sandbox: SandboxConfig | None = None, pass_at: Sequence[int] = (),
                    workers: int = 1, vllm: VLLMEvalOptions | None = None,
                    record: SampleRecord | None = None) -> dict[str, Any]:
    """Load the checkpoint and the data, then `evaluate_math` (task='math') or `evaluate_code` (task='code', in a
    `Sandbox(sandbox)`, default `SandboxConfig()` = bubblewrap); the result also records the paths. `record`: see
    `evaluate_math`.

    engine='vllm': one `StandaloneVLLMEngine` per GPU in its own process (`VLLMEvalOptions`), the problems sharded
    round-robin; the merged result equals a one-engine run's, since problem i always samples with seed
    request_seed(cfg.seed, i). No torchrun or process group is needed.

    Raises:
        ValueError: unknown task / engine, bad data (see the loaders), no GPU for engine='vllm'.
        SandboxUnavailableError: task='code' and bubblewrap is missing or unusable (sandbox.kind='bwrap').
    """
    if task == "math":
        rows: Sequence[Any] = load_math_eval_rows(data, limit)
    elif task == "code":
        rows = load_code_eval_rows(data, limit, tests)
        box = Sandbox(sandbox if sandbox is not None else SandboxConfig())  # before any model is loaded
    else:
        raise ValueError(f"task={task!r} is not one of {TASKS}")
    check_hf_dir(hf_dir)
    if engine == "hf":
        from avsd_megatron.rollout.hf_engine import HFEngine

        eng = HFEngine.from_pretrained(hf_dir)
        tokenizer = eng.tokenizer
        if task == "math":
            result = evaluate_math(eng, tokenizer, rows, cfg, progress=progress, record=record)
        else:
            result = evaluate_code(eng, tokenizer, rows, cfg, box, tests=tests, pass_at=pass_at, workers=workers,
                                   progress=progress, record=record)
    elif engine == "vllm":
        result = _evaluate_sharded(hf_dir, rows, cfg, vllm or VLLMEvalOptions(), task=task, tests=tests,
                                   sandbox=box.cfg if task == "code" else None, pass_at=pass_at, workers=workers,
                                   record=record)
    else:
        raise ValueError(f"engine={engine!r} is not one of ('hf', 'vllm')")
    if task == "code":
        result["config"] |= {"sandbox": asdict(box.cfg)}
    result["config"] |= {"task": task, "hf": str(hf_dir), "data": str(data), "limit": limit, "engine": engine}
    return result


def visible_gpus(count: int | None) -> list[str]:
    """The device ids (as CUDA_VISIBLE_DEVICES entries) of the first `count` visible GPUs (None = all of them).

    Raises:
        ValueError: no GPU is visible, or fewer than `count`.
    """
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        devices = [d.strip() for d in listed.split(",") if d.strip()]
    else:
        import torch

        devices = [str(i) for i in range(torch.cuda.device_count())]
    if not devices:
        raise ValueError("--engine vllm needs a GPU and none is visible; use --engine hf on CPU")
    if count is not None and not (1 <= count <= len(devices)):
        raise ValueError(f"--gpus {count}: must be in [1, {len(devices)}] (the visible GPUs: {devices})")
    return devices[: count or len(devices)]


@dataclass(frozen=True)
class _Shard:
    """One GPU's share of an evaluation: what its process needs."""

    device: str
    indices: tuple[int, ...]
    rows: tuple[Any, ...]
    hf_dir: str
    cfg: EvalConfig
    engine_kwargs: dict[str, Any]
    engine_factory: Any
    task: str
    tests: str
    sandbox: SandboxConfig | None
    workers: int


def _evaluate_sharded(hf_dir: str | Path, rows: Sequence[Any], cfg: EvalConfig, options: VLLMEvalOptions, *,
                      task: str, tests: str, sandbox: SandboxConfig | None, pass_at: Sequence[int],
                      workers: int, record: SampleRecord | None = None) -> dict[str, Any]:
    """The GPUs' engines on the problems `record` does not hold yet (round-robin over the pending ones; seeds by the
    problem's index, so the split does not matter); their samples are appended to `record` in problem order when
    the engines are done, and merged with the recorded ones."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from avsd_megatron.rollout.vllm_engine import StandaloneVLLMEngine, standalone_engine_kwargs

    start = time.perf_counter()
    recorded = {i: s for i in range(len(rows))
                if (s := _recorded(record, i, rows[i]["problem"] if task == "math" else rows[i].problem)) is not None}
    pending = [i for i in range(len(rows)) if i not in recorded]
    devices = visible_gpus(options.gpus)[: len(pending)]  # none when the record holds every problem
    shards = []
    if devices:
        render = ((lambda tok, row: render_chat(tok, math_eval_message(row["problem"]), thinking=cfg.thinking))
                  if task == "math" else (lambda tok, row: code_eval_prompt(tok, row, cfg)))
        engine_kwargs = standalone_engine_kwargs(
            hf_dir, max_model_len=_longest_prompt(hf_dir, rows, render) + cfg.max_new_tokens, seed=cfg.seed,
            gpu_memory_utilization=options.gpu_memory_utilization, max_num_seqs=options.max_num_seqs,
        )
        factory = options.engine_factory or StandaloneVLLMEngine
        shards = [_Shard(device, tuple(share), tuple(rows[i] for i in share), str(hf_dir), cfg, engine_kwargs,
                         factory, task, tests, sandbox, workers)
                  for g, device in enumerate(devices) if (share := pending[g :: len(devices)])]
    # one process per GPU, started fresh (spawn): CUDA_VISIBLE_DEVICES must be set before CUDA initialises there,
    # and a process that forked after CUDA started cannot use it. Each builds its own engine (vLLM's TP-1
    # UniProcExecutor: no torch.distributed, no RANK / LOCAL_RANK).
    context = multiprocessing.get_context("spawn")
    pools = [ProcessPoolExecutor(max_workers=1, mp_context=context) for _ in shards]
    try:
        futures = [pool.submit(_run_shard, shard) for pool, shard in zip(pools, shards)]
        parts = [future.result() for future in futures]
    finally:
        for pool in pools:
            pool.shutdown(wait=True, cancel_futures=True)
    new = sorted(((i, s, g) for part in parts for i, s, g in zip(*part, strict=True)), key=lambda t: t[0])
    if record is not None:
        for _, sample, _ in new:
            record.append(sample)
    order = sorted(new + [(i, s, _graded(task, s)) for i, s in recorded.items()], key=lambda t: t[0])
    samples, grades = [sample for _, sample, _ in order], [grade for _, _, grade in order]
    seconds = time.perf_counter() - start
    result = (math_result(samples, grades, cfg, seconds) if task == "math"
              else code_result(samples, grades, cfg, tests, pass_at, seconds))
    result["config"] |= {"gpus": len(devices)}
    return result


def _run_shard(shard: _Shard) -> tuple[list[int], list[dict[str, Any]], list[list[Any]]]:
    """In the GPU's own process: (indices, samples, grades or statuses) of the shard's problems."""
    os.environ["CUDA_VISIBLE_DEVICES"] = shard.device  # before anything initialises CUDA in this process
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(shard.hf_dir)
    engine = shard.engine_factory(**shard.engine_kwargs)
    if shard.task == "math":
        samples, grades = sample_math(engine, tokenizer, shard.rows, shard.cfg, shard.indices)
    else:
        samples, grades = sample_code(engine, tokenizer, shard.rows, shard.cfg, Sandbox(shard.sandbox),
                                      shard.indices, tests=shard.tests, workers=shard.workers)
    return list(shard.indices), samples, grades


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
    parser.add_argument("--engine", choices=("hf", "vllm"), default="hf",
                        help="hf: transformers; vllm: one plain vLLM engine per GPU, problems sharded (GPU only)")
    parser.add_argument("--gpus", type=int, default=None,
                        help="vllm: engines to run, one per GPU (default: every visible GPU)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="vllm: per engine")
    parser.add_argument("--max-num-seqs", type=int, default=256, help="vllm: concurrent sequences per engine")
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
    vllm = VLLMEvalOptions(gpus=args.gpus, gpu_memory_utilization=args.gpu_memory_utilization,
                           max_num_seqs=args.max_num_seqs)
    result = evaluate_hf_dir(args.hf, args.data, cfg, limit=args.limit, engine=args.engine,
                             progress=not args.no_progress, task=args.task, tests=args.tests, sandbox=sandbox,
                             pass_at=args.pass_at, workers=args.workers, vllm=vllm, record=record)
    if record is not None:
        record.finish(result)
    print(json.dumps(result["summary"], indent=1))
    return result


if __name__ == "__main__":
    main()
