"""Tests for avsd_megatron.training.tasks: the teacher rows of math and code steps, with real sandbox runs for the code
feedback view (bubblewrap; `apt-get install -y bubblewrap`, as for tests/verify/test_sandbox.py).

Run: .venv/bin/python -m pytest -q tests/training/test_tasks.py
"""

from dataclasses import replace

import pytest

from avsd_megatron.data import tiny
from avsd_megatron.data.examples import CodeExample, RowRef
from avsd_megatron.data.prompts import PromptReport
from avsd_megatron.data.views import feedback_payload
from avsd_megatron.rollout.engine import Completion
from avsd_megatron.training.config import from_dict
from avsd_megatron.training.tasks import CodeTask, MathTask, run_feedback
from avsd_megatron.verify.sandbox import STATUSES, Sandbox, SandboxConfig, TestCase

pytest.importorskip("transformers")

CODE_VIEWS = ["reference", "hint", "feedback"]
EXAMPLE = CodeExample(
    id="add", problem="Print the sum of two integers a and b.", input_format="One line with a and b.",
    output_format="One integer.", constraints="", examples=(TestCase("1 2\n", "3\n"),),
    public_tests=(TestCase("1 2\n", "3\n"), TestCase("10 -4\n", "6\n")), hidden_tests=(),
    reference_solution="a, b = map(int, input().split())\nprint(a + b)\n", algorithm_hint="Add them.",
    row=RowRef("test", 0),
)
CORRECT = "<final_code>\n```python\na, b = map(int, input().split())\nprint(a + b)\n```\n</final_code>"
WRONG = "<final_code>\n```python\na, b = map(int, input().split())\nprint(a * b)\n```\n</final_code>"


@pytest.fixture(scope="module")
def tokenizer():
    return tiny.load_tiny_tokenizer()


def _code_cfg(**prompts):
    return from_dict({"data": {"sources": ["x.jsonl"], "task": "code"}, "avsd": {"views": CODE_VIEWS},
                      "prompts": {"max_prompt_tokens": 2048, **prompts}, "sandbox": {"wall_time_s": 5.0}})


def _completion(tokenizer, text: str) -> Completion:
    return Completion(tuple(tokenizer.encode(text, add_special_tokens=False)), text, "stop")


@pytest.mark.bwrap
def test_code_task_feedback_prompts_passed_and_wrong_answer(tokenizer):
    """A correct and a wrong program for the same prompt: each completion's feedback row carries its own outcome;
    the reference and hint rows are the prompt's, shared."""
    report = PromptReport()
    task = CodeTask(tokenizer, _code_cfg(), report)
    prompts = task.encode(EXAMPLE)
    completions = [_completion(tokenizer, CORRECT), _completion(tokenizer, WRONG)]
    rows = task.teacher_rows([EXAMPLE], [prompts], completions)

    assert [x["feedback_status"] for x in rows.extras] == ["passed", "wrong_answer"]
    texts = [tokenizer.decode(r[2]) for r in rows.ids]
    assert "passed every public test" in texts[0] and "wrong answer" not in texts[0]
    assert "printed a wrong answer" in texts[1]
    assert "Input:\n1 2\n" in texts[1] and "Expected output:\n3\n" in texts[1]
    assert "Program output:\n2\n" in texts[1]  # 1 * 2 printed where 1 + 2 was expected
    for text, payload in zip(texts, [x["feedback"] for x in rows.extras]):
        assert payload in text and "PRIVILEGED REFERENCE (feedback)" in text
        assert text.index("END PRIVILEGED REFERENCE") < text.index("Problem:\n")  # the block precedes the fields
    assert rows.ids[0][0] == rows.ids[1][0] == prompts.teacher_ids["reference"]
    assert rows.ids[0][1] == rows.ids[1][1] == prompts.teacher_ids["hint"]
    assert rows.masks is None and report.skipped == 0
    assert rows.metrics["feedback/passed"] == 1 and rows.metrics["feedback/wrong_answer"] == 1
    assert sum(rows.metrics[f"feedback/{s}"] for s in STATUSES) == 2
    assert rows.metrics["rollout/pass_rate"] == 0.5 and rows.metrics["feedback/prompts_skipped"] == 0


@pytest.mark.bwrap
def test_code_task_overlong_feedback_masks_its_completion(tokenizer):
    """overlong='skip' cannot drop a sampled completion: its row is truncated and its tokens leave the loss."""
    long_input = " ".join(["7"] * 300) + "\n"
    long_reference = "# " + "a long comment " * 20 + "\n" + EXAMPLE.reference_solution  # longer than "passed"
    example = replace(EXAMPLE, public_tests=(TestCase(long_input, "0\n"),),  # not in the prompt's examples
                      reference_solution=long_reference)
    probe = CodeTask(tokenizer, _code_cfg(), PromptReport())
    encoded = probe.encode(example)
    limit = max(len(encoded.student_ids), *(len(ids) for ids in encoded.teacher_ids.values()))
    report = PromptReport()
    task = CodeTask(tokenizer, _code_cfg(max_prompt_tokens=limit), report)
    prompts = task.encode(example)
    completions = [_completion(tokenizer, "```python\nprint(0)\n```"), _completion(tokenizer, WRONG)]
    rows = task.teacher_rows([example], [prompts], completions)
    assert [x["feedback_status"] for x in rows.extras] == ["passed", "runtime_error"]  # a, b = 300 values
    assert rows.masks == [[True] * len(completions[0].token_ids), [False] * len(completions[1].token_ids)]
    assert len(rows.ids[1][2]) == limit and rows.metrics["feedback/prompts_skipped"] == 1
    assert report.skipped == 1 and report.overlong["feedback"] == 1


@pytest.mark.bwrap
def test_code_task_non_executing_rank_uses_the_shared_feedback(tokenizer):
    """Ranks other than the model-parallel group's first build no sandbox and take the broadcast feedback."""
    sandbox = Sandbox(SandboxConfig(wall_time_s=5.0))
    shared = [feedback_payload(CORRECT, EXAMPLE.public_tests, sandbox)]
    task = CodeTask(tokenizer, _code_cfg(), PromptReport(), executes=False, share=lambda mine: shared)
    assert task.sandbox is None
    rows = task.teacher_rows([EXAMPLE], [task.encode(EXAMPLE)], [_completion(tokenizer, WRONG)])
    assert rows.extras[0]["feedback_status"] == "passed"  # the shared outcome, not this rank's own


@pytest.mark.bwrap
def test_run_feedback_workers_give_the_same_results(tokenizer):
    sandbox = Sandbox(SandboxConfig(wall_time_s=5.0))
    completions = [_completion(tokenizer, t) for t in (CORRECT, WRONG, "", "```python\nprint(\n```")]
    serial = run_feedback([EXAMPLE] * 4, completions, sandbox, workers=1)
    threaded = run_feedback([EXAMPLE] * 4, completions, sandbox, workers=3)
    assert [f.status for f in serial] == ["passed", "wrong_answer", "extraction_failure", "syntax_error"]
    assert [f.payload for f in threaded] == [f.payload for f in serial]


def test_math_task_rows_repeat_the_prompt_views_per_completion(tokenizer):
    cfg = from_dict({"data": {"sources": ["x.jsonl"], "task": "math"}, "prompts": {"max_prompt_tokens": 2048}})
    task = MathTask(tokenizer, cfg, PromptReport())
    example = tiny.math_example_from_row(tiny.read_jsonl(tiny.TINY_TRAIN_PATH)[0], RowRef("t", 0))
    prompts = task.encode(example)
    rows = task.teacher_rows([example], [prompts], [_completion(tokenizer, "a"), _completion(tokenizer, "b")])
    want = [prompts.teacher_ids[v] for v in cfg.avsd.views]
    assert rows.ids == [want, want] and rows.masks is None and rows.metrics == {}
    with pytest.raises(ValueError, match="3 completions do not divide over 2 prompts"):
        task.teacher_rows([example] * 2, [prompts] * 2, [_completion(tokenizer, "a")] * 3)


# ----------------------------------------------------------------------------------------------------------------
# GRPO rewards (the graders) and the reward-hacking guard


def _math_example():
    from avsd_megatron.data.examples import MathExample

    return MathExample(problem="What is 6 * 7?", solution="6 * 7 = 42, so the answer is \\boxed{42}.",
                       row=RowRef("test", 0))


def _grpo_cfg(**grpo):
    return from_dict({"data": {"sources": ["x.jsonl"], "task": "math"}, "algorithm": "grpo", "rollout": {"n": 2},
                      "grpo": {"failure_reward": -0.5, **grpo}})


def test_math_rewards_grade_with_math_verify_and_unparseable_answers_get_the_failure_reward(tokenizer):
    pytest.importorskip("math_verify")
    cfg = _grpo_cfg()
    task = MathTask(tokenizer, cfg, PromptReport())
    example = _math_example()
    prompts = task.encode(example)
    texts = [
        "So the result is \\boxed{42}.",            # correct
        "Thus \\boxed{\\frac{84}{2}}",               # correct, another form (math-verify)
        "I get \\boxed{41}.",                        # wrong
        "The answer is 42.",                         # right number, no boxed answer: unparseable (guard)
        "42 42 42 \\boxed{42",                       # the last box never closes: unparseable (guard)
        "Answer: 42 \\boxed{}",                      # an empty box is parsed and wrong, not correct
    ]
    graded = task.rewards([example] * 3, [prompts] * 3, [_completion(tokenizer, t) for t in texts], cfg.grpo)
    assert [g.outcome for g in graded] == ["correct", "correct", "wrong", "unparseable", "unparseable", "wrong"]
    assert [g.reward for g in graded] == [1.0, 1.0, 0.0, -0.5, -0.5, 0.0]
    assert graded[0].extras == {"answer": "42", "gold": "42"}


@pytest.mark.bwrap
def test_code_rewards_run_the_public_tests_and_missing_programs_get_the_failure_reward(tokenizer):
    cfg = from_dict({"data": {"sources": ["x.jsonl"], "task": "code"}, "avsd": {"views": CODE_VIEWS},
                     "algorithm": "grpo", "rollout": {"n": 3}, "grpo": {"failure_reward": -1.0},
                     "prompts": {"max_prompt_tokens": 2048}, "sandbox": {"wall_time_s": 5.0}})
    task = CodeTask(tokenizer, cfg, PromptReport())
    prompts = task.encode(EXAMPLE)
    texts = [CORRECT, WRONG, "<final_code>\n```python\n```\n</final_code>"]  # an empty program: unparseable
    graded = task.rewards([EXAMPLE], [prompts], [_completion(tokenizer, t) for t in texts], cfg.grpo)
    assert [g.outcome for g in graded] == ["correct", "wrong", "unparseable"]
    assert [g.reward for g in graded] == [1.0, 0.0, -1.0]
    assert [g.extras["status"] for g in graded] == ["passed", "wrong_answer", "extraction_failure"]
def test_math_task_counts_answer_only_fallbacks(tokenizer):
    """Issue 16.8: a solution without \\boxed{} gets the answer_only fallback; the task counts it by rule."""
    from avsd_megatron.data.examples import MathExample

    cfg = from_dict({"data": {"sources": ["x.jsonl"], "task": "math"}, "prompts": {"max_prompt_tokens": 2048}})
    task = MathTask(tokenizer, cfg, PromptReport())
    task.encode(MathExample("What is 1 + 1?", "1 + 1 = 2, so it is \\boxed{2}.", RowRef("t", 0)))
    assert task.view_stats.answer_fallbacks == 0
    task.encode(MathExample("What is 2 + 2?", "We add.\nAnswer: 4", RowRef("t", 1)))
    task.encode(MathExample("What is 3 + 3?", "We add.\nIt is 6", RowRef("t", 2)))
    assert task.view_stats.answer_fallbacks == 2
    assert task.view_stats.answer_rules == {"boxed": 1, "answer_line": 1, "last_line": 1}
