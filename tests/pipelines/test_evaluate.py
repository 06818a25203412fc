"""Evaluation (avsd_megatron/pipelines/evaluate.py). Math: CLI on the tiny checkpoint, scores re-derived from the saved samples,
known scores from a scripted engine, bad data files. Code (samples run in bubblewrap, as in tests/verify/test_sandbox.py):
CLI on the tiny code set with the tiny random model, known pass@k from scripted reference / wrong programs, bad rows.

Run: python -m pytest -q tests/pipelines/test_evaluate.py
"""

import json

import pytest

from avsd_megatron.data import tiny
from avsd_megatron.data.prompts import BOXED_INSTRUCTION
from avsd_megatron.pipelines import evaluate
from avsd_megatron.rollout.engine import Completion
from avsd_megatron.verify.grading import grade_math_completion

pytest.importorskip("transformers")
pytest.importorskip("math_verify")


def _write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def three_rows(tmp_path_factory):
    rows = [{"problem": r["problem"], "answer": r["answer"]} for r in tiny.read_jsonl(tiny.TINY_HELDOUT_PATH)[:3]]
    return _write_rows(tmp_path_factory.mktemp("data") / "three.jsonl", rows)


def test_evaluate_cli_tiny_checkpoint_scores_equal_regrading_saved_samples(tmp_path, three_rows):
    hf = tiny.make_tiny_hf_checkpoint(tmp_path / "hf", seed=0)
    out = tmp_path / "results.json"
    evaluate.main(["--hf", str(hf), "--data", str(three_rows), "--k", "2", "--max-new-tokens", "12",
                   "--out", str(out), "--no-progress"])
    result = json.loads(out.read_text())
    summary, samples = result["summary"], result["samples"]
    assert summary["problems"] == 3 and summary["k"] == 2 and len(samples) == 3
    gold = [json.loads(line)["answer"] for line in three_rows.read_text().splitlines()]
    regraded = []
    for sample, answer in zip(samples, gold):
        assert sample["answer"] == answer and len(sample["completions"]) == 2
        for c in sample["completions"]:
            grade = grade_math_completion(c["text"], answer)
            assert (grade.answer, grade.correct) == (c["extracted"], c["correct"])
            assert c["finish_reason"] in ("stop", "length") and 1 <= c["num_tokens"] <= 12
            regraded.append(grade)
    assert summary["avg@2"] == pytest.approx(100.0 * sum(g.correct for g in regraded) / 6)
    assert summary["format_rate"] == pytest.approx(100.0 * sum(g.formatted for g in regraded) / 6)
    assert result["config"]["k"] == 2 and result["config"]["thinking"] is False


class ScriptedEngine:
    """Returns fixed completion texts per prompt index; records the prompts it was given."""

    def __init__(self, texts_per_prompt):
        self.texts, self.calls = texts_per_prompt, []

    def generate(self, prompt_token_ids, params, seed):
        self.calls.append((prompt_token_ids, params, seed))
        texts = self.texts[len(self.calls) - 1]
        assert params.n == len(texts)
        return [Completion(token_ids=(1, 2), text=t, finish_reason="stop") for t in texts]


def test_evaluate_math_known_scores_and_eval_prompt():
    tokenizer = tiny.load_tiny_tokenizer()
    rows = [{"problem": "What is 2 + 3?", "answer": "5"}, {"problem": "What is 10 - 4?", "answer": "6"}]
    engine = ScriptedEngine([["so \\boxed{5}", "\\boxed{4}"], ["\\boxed{6.0}", "no answer"]])
    result = evaluate.evaluate_math(engine, tokenizer, rows, evaluate.EvalConfig(k=2), progress=False)
    s = result["summary"]
    assert s["avg@2"] == pytest.approx(50.0) and s["pass@2"] == pytest.approx(100.0)
    assert s["format_rate"] == pytest.approx(75.0)
    assert s["avg@2_stderr"] == pytest.approx(0.0)  # both problems 1/2
    prompt = tokenizer.decode(engine.calls[0][0][0])
    assert "What is 2 + 3?\n\n" + BOXED_INSTRUCTION in prompt and "Problem:" not in prompt
    assert prompt.endswith("<think>\n\n</think>\n\n")  # thinking off
    assert engine.calls[0][2] != engine.calls[1][2]  # a seed per problem


@pytest.mark.parametrize(
    "line, match",
    [
        ('{"problem": "x"}', r"bad\.jsonl:2: field 'answer' must be a non-empty string"),
        ('{"problem": "", "answer": "1"}', r"bad\.jsonl:2: field 'problem'"),
        ("{not json", r"bad\.jsonl:2: not valid JSON"),
        ('["a", "b"]', r"bad\.jsonl:2: expected a JSON object"),
    ],
)
def test_load_math_eval_rows_bad_row_names_file_line_field(tmp_path, line, match):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"problem": "ok", "answer": 3}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=match):
        evaluate.load_math_eval_rows(path)


def test_load_math_eval_rows_missing_or_empty_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl does not exist"):
        evaluate.load_math_eval_rows(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty.jsonl: no rows"):
        evaluate.load_math_eval_rows(tmp_path / "empty.jsonl")


def test_load_math_eval_rows_int_answer_and_limit(tmp_path):
    path = _write_rows(tmp_path / "d.jsonl", [{"problem": f"p{i}", "answer": i, "extra": 1} for i in range(5)])
    rows = evaluate.load_math_eval_rows(path, limit=2)
    assert rows == [{"problem": "p0", "answer": "0"}, {"problem": "p1", "answer": "1"}]


# ----------------------------------------------------------------------------------------------------------------
# Code


@pytest.mark.bwrap
def test_evaluate_cli_code_tiny_checkpoint_counts_every_sample(tmp_path):
    from avsd_megatron.data.tiny_code import TINY_CODE_HELDOUT_PATH
    from avsd_megatron.verify.extract import extract_code
    from avsd_megatron.verify.sandbox import STATUSES

    hf = tiny.make_tiny_hf_checkpoint(tmp_path / "hf", seed=0)
    out = tmp_path / "code.json"
    evaluate.main(["--task", "code", "--hf", str(hf), "--data", str(TINY_CODE_HELDOUT_PATH), "--limit", "3",
                   "--k", "2", "--max-new-tokens", "12", "--workers", "2", "--out", str(out), "--no-progress"])
    result = json.loads(out.read_text())
    summary, samples = result["summary"], result["samples"]
    assert summary["problems"] == 3 and summary["k"] == 2 and len(samples) == 3
    for key in ("pass@1", "pass@2", "pass@1_first_sample", "avg@2"):
        assert 0.0 <= summary[key] <= 100.0, (key, summary[key])
    assert set(summary["status_counts"]) == set(STATUSES) and sum(summary["status_counts"].values()) == 6
    statuses = [c["status"] for s in samples for c in s["completions"]]
    assert summary["status_counts"] == {status: statuses.count(status) for status in STATUSES}
    assert summary["pass@1"] == pytest.approx(100.0 * statuses.count("passed") / 6)
    for sample in samples:
        assert sample["tests"] == 6  # --tests all: 2 public + 4 hidden
        for c in sample["completions"]:
            assert c["code"] == extract_code(c["text"]) and 1 <= c["num_tokens"] <= 12
    assert result["config"]["task"] == "code" and result["config"]["sandbox"]["kind"] == "bwrap"


def _fenced(code: str) -> str:
    return f"<final_code>\n```python\n{code}```\n</final_code>"


@pytest.mark.bwrap
def test_evaluate_code_known_pass_at_k_from_reference_and_wrong_programs():
    from avsd_megatron.data.tiny_code import TINY_CODE_HELDOUT_PATH
    from avsd_megatron.verify.sandbox import Sandbox, SandboxConfig

    tokenizer = tiny.load_tiny_tokenizer()
    examples = evaluate.load_code_eval_rows(TINY_CODE_HELDOUT_PATH, limit=2)
    good = [_fenced(e.reference_solution) for e in examples]
    wrong = _fenced("print('wrong')\n")
    sandbox = Sandbox(SandboxConfig(wall_time_s=5.0))

    alone = evaluate.evaluate_code(ScriptedEngine([[good[0]]]), tokenizer, examples[:1], evaluate.EvalConfig(k=1),
                                   sandbox, progress=False)
    assert alone["summary"]["pass@1"] == 100.0 and alone["summary"]["status_counts"]["passed"] == 1
    assert alone["samples"][0]["completions"][0]["tests_run"] == 6  # every public and hidden test ran

    engine = ScriptedEngine([[good[0], good[0], good[0]], [wrong, good[1], wrong]])
    result = evaluate.evaluate_code(engine, tokenizer, examples, evaluate.EvalConfig(k=3), sandbox, pass_at=(2,),
                                    workers=2, progress=False)
    s = result["summary"]
    assert s["pass@1"] == pytest.approx(100.0 * (3 / 3 + 1 / 3) / 2)  # unbiased pass@1 = avg@k
    assert s["pass@2"] == pytest.approx(100.0 * (1.0 + (1 - 1 / 3)) / 2)  # 1 - C(2,2)/C(3,2) for problem 2
    assert s["pass@3"] == pytest.approx(100.0) and s["avg@3"] == pytest.approx(s["pass@1"])
    assert s["pass@1_first_sample"] == pytest.approx(50.0)  # problem 2's first sample is wrong
    assert s["status_counts"] == {"passed": 4, "syntax_error": 0, "runtime_error": 0, "wrong_answer": 2,
                                  "timeout": 0, "extraction_failure": 0}
    prompt = tokenizer.decode(engine.calls[0][0][0])
    assert f"Problem:\n{examples[0].problem}" in prompt and "<final_code>" in prompt
    assert prompt.endswith("<think>\n\n</think>\n\n")  # thinking off


def test_code_eval_tests_selects_public_hidden_or_all():
    from avsd_megatron.data.tiny_code import TINY_CODE_TRAIN_PATH

    (example,) = evaluate.load_code_eval_rows(TINY_CODE_TRAIN_PATH, limit=1, tests="hidden")
    assert evaluate.code_eval_tests(example, "public") == example.public_tests
    assert evaluate.code_eval_tests(example, "hidden") == example.hidden_tests
    assert evaluate.code_eval_tests(example, "all") == example.public_tests + example.hidden_tests


@pytest.mark.parametrize(
    "row, tests, match",
    [
        ({"problem": "p", "reference_solution": "print(1)"}, "all", r"bad\.jsonl:2: field 'public_tests' is missing"),
        ({"problem": "p", "reference_solution": "print(1)", "public_tests": [{"input": "1"}]}, "all",
         r"bad\.jsonl:2: field 'public_tests\[0\]\.output'"),
        ({"problem": "p", "reference_solution": "print(1)", "public_tests": [{"input": "", "output": "1"}]},
         "hidden", r"bad\.jsonl:2: field 'hidden_tests' is missing or empty"),
    ],
)
def test_load_code_eval_rows_bad_row_names_file_line_field(tmp_path, row, tests, match):
    ok = {"problem": "p", "reference_solution": "print(1)", "public_tests": [{"input": "", "output": "1"}],
          "hidden_tests": [{"input": "", "output": "1"}]}
    path = _write_rows(tmp_path / "bad.jsonl", [ok, row])
    with pytest.raises(ValueError, match=match):
        evaluate.load_code_eval_rows(path, tests=tests)


# ----------------------------------------------------------------------------------------------------------------
# --engine vllm: one plain engine per GPU, the problems sharded (a fake engine factory in each GPU's process)

RECORD_DIR_ENV = "AVSD_TEST_ENGINE_RECORDS"


def recording_engine_factory(**kwargs):
    """Stands in for StandaloneVLLMEngine in the spawned GPU processes: records the vllm.LLM kwargs and the process
    environment, then samples with HFEngine on the checkpoint the kwargs name (vLLM would load it the same way)."""
    import os
    from pathlib import Path

    from avsd_megatron.rollout.hf_engine import HFEngine

    record = {"kwargs": kwargs, "pid": os.getpid(),
              "env": {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "RANK", "LOCAL_RANK", "WORLD_SIZE")}}
    out = Path(os.environ[RECORD_DIR_ENV]) / f"{os.getpid()}.json"
    out.write_text(json.dumps(record))
    return HFEngine.from_pretrained(kwargs["model"])


@pytest.mark.integration
def test_evaluate_vllm_shards_problems_over_one_plain_engine_per_gpu(tmp_path, monkeypatch):
    rows = [{"problem": r["problem"], "answer": r["answer"]} for r in tiny.read_jsonl(tiny.TINY_HELDOUT_PATH)[:5]]
    data = _write_rows(tmp_path / "five.jsonl", rows)
    hf = tiny.make_tiny_hf_checkpoint(tmp_path / "hf", seed=0)
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)  # a plain srun / python process: no torchrun environment
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")  # the node's visible GPUs, as Slurm would set them
    records = tmp_path / "records"
    records.mkdir()
    monkeypatch.setenv(RECORD_DIR_ENV, str(records))
    cfg = evaluate.EvalConfig(k=2, max_new_tokens=6, seed=7)
    options = evaluate.VLLMEvalOptions(engine_factory=recording_engine_factory, gpu_memory_utilization=0.85)
    sharded = evaluate.evaluate_hf_dir(hf, data, cfg, engine="vllm", vllm=options, progress=False)

    made = [json.loads(p.read_text()) for p in sorted(records.iterdir())]
    assert sorted(m["env"]["CUDA_VISIBLE_DEVICES"] for m in made) == ["3", "5"]  # one engine per GPU
    assert len({m["pid"] for m in made}) == 2  # each in its own process
    for m in made:
        assert m["env"]["RANK"] is None and m["env"]["LOCAL_RANK"] is None
        kwargs = m["kwargs"]
        assert kwargs["model"] == str(hf) and "load_format" not in kwargs  # vLLM loads the HF weights itself
        assert kwargs["tensor_parallel_size"] == 1 and "distributed_executor_backend" not in kwargs
        assert kwargs["gpu_memory_utilization"] == 0.85 and kwargs["seed"] == 7
        assert kwargs["max_model_len"] > cfg.max_new_tokens
    # sharding changes nothing: the merged result is the one-engine run's, problem by problem
    single = evaluate.evaluate_hf_dir(hf, data, cfg, engine="hf", progress=False)
    assert [s["index"] for s in sharded["samples"]] == list(range(5))
    assert sharded["samples"] == single["samples"]
    for key in ("avg@2", "pass@2", "format_rate", "avg@2_stderr", "mean_completion_tokens"):
        assert sharded["summary"][key] == single["summary"][key], key
    assert sharded["config"]["gpus"] == 2 and sharded["config"]["engine"] == "vllm"


def test_visible_gpus_follows_cuda_visible_devices_and_refuses_none(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,4,6")
    assert evaluate.visible_gpus(None) == ["2", "4", "6"] and evaluate.visible_gpus(2) == ["2", "4"]
    with pytest.raises(ValueError, match=r"--gpus 4: must be in \[1, 3\]"):
        evaluate.visible_gpus(4)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(ValueError, match="needs a GPU and none is visible"):
        evaluate.visible_gpus(None)
# Output handling (issue 16.4): checked first, written as it goes, resumable


def _no_engine(*args, **kwargs):
    raise AssertionError("the model was loaded before the output path was checked")


def test_cli_unwritable_out_fails_before_the_model_is_loaded(tmp_path, three_rows, monkeypatch):
    from avsd_megatron.rollout.hf_engine import HFEngine

    hf = tiny.make_tiny_hf_checkpoint(tmp_path / "hf", seed=0)
    monkeypatch.setattr(HFEngine, "from_pretrained", _no_engine)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(OSError):  # its parent is a file: the directory cannot be created
        evaluate.main(["--hf", str(hf), "--data", str(three_rows), "--k", "1", "--no-progress",
                       "--out", str(tmp_path / "a_file" / "eval.json")])
    with pytest.raises(ValueError, match="is a directory"):
        evaluate.main(["--hf", str(hf), "--data", str(three_rows), "--k", "1", "--no-progress",
                       "--out", str(tmp_path)])


def test_cli_rejects_limit_zero_and_a_missing_hf_dir(tmp_path, three_rows, monkeypatch):
    from avsd_megatron.rollout.hf_engine import HFEngine

    monkeypatch.setattr(HFEngine, "from_pretrained", _no_engine)
    hf = tiny.make_tiny_hf_checkpoint(tmp_path / "hf", seed=0)
    with pytest.raises(ValueError, match="--limit 0 must be >= 1"):
        evaluate.main(["--hf", str(hf), "--data", str(three_rows), "--limit", "0", "--no-progress"])
    with pytest.raises(ValueError, match="--limit 0 must be >= 1"):
        evaluate.load_math_eval_rows(three_rows, limit=0)  # it used to return one row
    with pytest.raises(FileNotFoundError, match="no such directory"):
        evaluate.main(["--hf", str(tmp_path / "missing"), "--data", str(three_rows), "--no-progress"])


class DyingEngine(ScriptedEngine):
    """A ScriptedEngine that is 'killed' (raises) when asked for prompt number `dies_at` (0-based)."""

    def __init__(self, texts_per_prompt, dies_at):
        super().__init__(texts_per_prompt)
        self.dies_at = dies_at

    def generate(self, prompt_token_ids, params, seed):
        if len(self.calls) == self.dies_at:
            raise KeyboardInterrupt("killed")
        return super().generate(prompt_token_ids, params, seed)


def test_samples_are_written_as_they_are_made_and_a_rerun_resumes(tmp_path):
    from avsd_megatron.pipelines.eval_output import SampleRecord, samples_path

    tokenizer = tiny.load_tiny_tokenizer()
    rows = [{"problem": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(4)]
    texts = [[f"\\boxed{{{i + 1}}}", "\\boxed{0}"] for i in range(4)]
    cfg = evaluate.EvalConfig(k=2)
    header = {"task": "math", "config": {"k": 2}}
    reference = evaluate.evaluate_math(ScriptedEngine(texts), tokenizer, rows, cfg, progress=False)

    out = tmp_path / "eval.json"
    with pytest.raises(KeyboardInterrupt):
        evaluate.evaluate_math(DyingEngine(texts, dies_at=2), tokenizer, rows, cfg, progress=False,
                               record=SampleRecord(out, header))
    lines = samples_path(out).read_text().splitlines()
    assert len(lines) == 3 and [json.loads(x)["index"] for x in lines[1:]] == [0, 1]  # header + 2 problems
    with open(samples_path(out), "a") as f:
        f.write('{"index": 2, "probl')  # a line cut short by the kill

    record = SampleRecord(out, header)
    assert sorted(record.done) == [0, 1]
    engine = ScriptedEngine(texts[2:])
    resumed = evaluate.evaluate_math(engine, tokenizer, rows, cfg, progress=False, record=record)
    assert len(engine.calls) == 2  # only problems 2 and 3 were generated
    assert resumed["samples"] == reference["samples"]
    assert {k: v for k, v in resumed["summary"].items() if k != "eval_seconds"} == {
        k: v for k, v in reference["summary"].items() if k != "eval_seconds"}
    record.finish(resumed)
    assert json.loads(out.read_text())["samples"] == reference["samples"]

    with pytest.raises(ValueError, match=r"another evaluation.*'config'"):
        SampleRecord(out, {"task": "math", "config": {"k": 4}})
    changed = [dict(r) for r in rows]
    changed[0]["problem"] = "What is 7 + 7?"
    with pytest.raises(ValueError, match="problem 0 differs"):
        evaluate.evaluate_math(ScriptedEngine(texts), tokenizer, changed, cfg, progress=False,
                               record=SampleRecord(out, header))


@pytest.mark.integration
def test_evaluate_vllm_sharded_resumes_from_the_record_and_appends_the_rest(tmp_path, monkeypatch):
    """--engine vllm with --out: problems already in the samples file are not generated again; the engines get only
    the others (round-robin over the pending ones), their samples are appended, and the merged result equals a
    one-engine run's."""
    from avsd_megatron.pipelines.eval_output import SampleRecord, samples_path

    rows = [{"problem": r["problem"], "answer": r["answer"]} for r in tiny.read_jsonl(tiny.TINY_HELDOUT_PATH)[:5]]
    data = _write_rows(tmp_path / "five.jsonl", rows)
    hf = tiny.make_tiny_hf_checkpoint(tmp_path / "hf", seed=0)
    cfg = evaluate.EvalConfig(k=2, max_new_tokens=6, seed=7)
    single = evaluate.evaluate_hf_dir(hf, data, cfg, engine="hf", progress=False)
    header = {"task": "math", "config": {"k": 2}}
    out = tmp_path / "eval.json"
    record = SampleRecord(out, header)
    for sample in single["samples"][:2]:  # problems 0 and 1 done by an earlier, interrupted run
        record.append(sample)

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    records = tmp_path / "records"
    records.mkdir()
    monkeypatch.setenv(RECORD_DIR_ENV, str(records))
    options = evaluate.VLLMEvalOptions(engine_factory=recording_engine_factory)
    resumed = evaluate.evaluate_hf_dir(hf, data, cfg, engine="vllm", vllm=options, progress=False,
                                       record=SampleRecord(out, header))

    assert resumed["samples"] == single["samples"]
    assert resumed["summary"]["avg@2"] == single["summary"]["avg@2"]
    lines = [json.loads(x) for x in samples_path(out).read_text().splitlines()[1:]]
    assert [s["index"] for s in lines] == [0, 1, 2, 3, 4]  # the pending three appended once each, in order
    assert len(list(records.iterdir())) == 2  # one engine per GPU for the three pending problems
