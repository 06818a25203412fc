"""Tests for avsd_megatron.data.prompts: message structure, chat-template rendering with thinking toggled separately
for student and teachers, tokenisation without a second BOS, over-length skip/truncate counts.

Run: .venv/bin/python -m pytest -q tests/data/test_prompts.py

The tokenizers are built here: a byte-level BPE with no merges (one token per byte, plus special tokens)
wrapped in `PreTrainedTokenizerFast`, with a Qwen3-like template that reads `enable_thinking` and a
DeepSeek-R1-like template that does not (and starts with the BOS token).
"""

from collections import Counter

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from avsd_megatron.data.examples import CodeExample, MathExample, RowRef
from avsd_megatron.data.prompts import (
    BOXED_INSTRUCTION,
    EMPTY_THINK,
    PromptConfig,
    PromptReport,
    code_feedback_prompt,
    code_problem_fields,
    code_prompts,
    code_student_message,
    code_teacher_message,
    math_eval_message,
    math_prompts,
    math_student_message,
    math_teacher_message,
    render_chat,
    template_mentions,
)
from avsd_megatron.data.views import CodeFeedback, ViewStats
from avsd_megatron.verify.sandbox import ExecutionResult, TestCase

QWEN_LIKE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{% endif %}"
)
DEEPSEEK_LIKE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|User|>' + m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|Assistant|><think>\\n' }}{% endif %}"
)
SPECIALS = ["<bos>", "<|im_start|>", "<|im_end|>", "<|User|>", "<|Assistant|>"]


def byte_tokenizer(chat_template: str) -> PreTrainedTokenizerFast:
    """One token per UTF-8 byte; `encode(add_special_tokens=True)` prepends <bos> like Llama/DeepSeek."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(SPECIALS + alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<|im_end|>")
    fast.add_special_tokens({"additional_special_tokens": SPECIALS[1:]})
    fast.chat_template = chat_template
    return fast


@pytest.fixture(scope="module")
def qwen():
    return byte_tokenizer(QWEN_LIKE)


@pytest.fixture(scope="module")
def deepseek():
    return byte_tokenizer(DEEPSEEK_LIKE)


class SpyTokenizer:
    """Records the keyword arguments of every apply_chat_template call."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.chat_template = tokenizer.chat_template
        self.calls = []

    def apply_chat_template(self, messages, **kwargs):
        self.calls.append(kwargs)
        return self.tokenizer.apply_chat_template(messages, **kwargs)

    def encode(self, text, **kwargs):
        return self.tokenizer.encode(text, **kwargs)


MATH = MathExample("What is 1+1?", "One plus one.\n\nIt is two.\n\n\\boxed{2}", RowRef("m.jsonl", 0))
CODE = CodeExample(
    id="1A",
    problem="Add two numbers.",
    input_format="Two integers a and b.",
    output_format="",
    constraints="",
    examples=(TestCase("1 2\n", "3\n"), TestCase("5 5", "10")),
    public_tests=(TestCase("1 2\n", "3\n"),),
    hidden_tests=(),
    reference_solution="a, b = map(int, input().split())\nprint(a + b)",
    algorithm_hint="",
    row=RowRef("c.jsonl", 0),
)


# ----------------------------------------------------------------------------------------------------------------
# Message text


def test_math_messages_structure():
    assert math_student_message("Find x.") == f"Problem: Find x.\n\n{BOXED_INSTRUCTION}"
    assert math_eval_message("Find x.") == f"Find x.\n\n{BOXED_INSTRUCTION}"
    teacher = math_teacher_message("Find x.", "answer_only", "  x = 3  ")
    assert teacher.startswith("Problem: Find x.\n\n")
    begin = "----- BEGIN PRIVILEGED REFERENCE (answer_only) -----\nx = 3\n"
    end = "----- END PRIVILEGED REFERENCE (answer_only) -----"
    assert begin in teacher and end in teacher and teacher.index(begin) < teacher.index(end)
    assert teacher.endswith(BOXED_INSTRUCTION)
    with pytest.raises(ValueError, match="math view 'reference' is not one of"):
        math_teacher_message("Find x.", "reference", "p")


def test_code_messages_structure():
    fields = code_problem_fields(CODE)
    assert fields == (
        "Problem:\nAdd two numbers.\n\n"
        "Input format:\nTwo integers a and b.\n\n"
        "Output format:\nGiven in the problem statement.\n\n"
        "Constraints:\nGiven in the problem statement.\n\n"
        "Examples:\nExample 1\nInput:\n1 2\nOutput:\n3\n\nExample 2\nInput:\n5 5\nOutput:\n10"
    )
    student = code_student_message(CODE)
    assert "<final_code>" in student and fields in student and "PRIVILEGED" not in student
    teacher = code_teacher_message(CODE, "hint", "Use addition.")
    block = "----- BEGIN PRIVILEGED REFERENCE (hint) -----\nUse addition.\n----- END PRIVILEGED REFERENCE (hint) -----"
    assert block in teacher
    assert teacher.index(block) < teacher.index("Problem:\nAdd two numbers.")  # payload before the problem
    no_examples = CodeExample(**{**CODE.__dict__, "examples": ()})
    assert code_problem_fields(no_examples).endswith("Examples:\nNone given.")


# ----------------------------------------------------------------------------------------------------------------
# Chat template and thinking


def test_template_mentions(qwen, deepseek):
    assert template_mentions(qwen, "enable_thinking")
    assert not template_mentions(deepseek, "enable_thinking")
    named = type("Named", (), {"chat_template": {"default": "plain", "tool_use": QWEN_LIKE}})()
    assert template_mentions(named, "enable_thinking")  # a dict of named templates is searched too
    with pytest.raises(ValueError, match="has no chat_template"):
        template_mentions(type("Bare", (), {"chat_template": None})(), "enable_thinking")


def test_enable_thinking_passed_only_if_template_mentions_it(qwen, deepseek):
    spy_qwen, spy_deepseek = SpyTokenizer(qwen), SpyTokenizer(deepseek)
    render_chat(spy_qwen, "hi", thinking=False)
    render_chat(spy_deepseek, "hi", thinking=False)
    assert spy_qwen.calls == [dict(tokenize=False, add_generation_prompt=True, enable_thinking=False)]
    assert spy_deepseek.calls == [dict(tokenize=False, add_generation_prompt=True)]


def test_math_prompts_toggle_thinking_separately_for_student_and_teachers(qwen):
    report = PromptReport()
    default = math_prompts(qwen, MATH, ["full_solution", "answer_only"], PromptConfig(), report)
    student_text = f"<|im_start|>user\nProblem: What is 1+1?\n\n{BOXED_INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n"
    assert default.student_text == student_text + EMPTY_THINK  # student: thinking off
    assert list(default.teacher_texts) == ["full_solution", "answer_only"]
    for text in default.teacher_texts.values():  # teachers: thinking on -> no empty think block
        assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert "Final answer (checked): 2" in default.teacher_texts["answer_only"]

    flipped = math_prompts(
        qwen, MATH, ["answer_only"], PromptConfig(student_thinking=True, teacher_thinking=False), report
    )
    assert flipped.student_text == student_text
    assert flipped.teacher_texts["answer_only"].endswith("<|im_start|>assistant\n" + EMPTY_THINK)
    assert report.examples == 2 and report.skipped == 0


def test_code_prompts_end_in_one_empty_think_block_when_thinking_is_off(qwen, deepseek):
    cfg = PromptConfig()
    stats = ViewStats()
    q = code_prompts(qwen, CODE, ["reference", "hint", "feedback"], cfg, PromptReport(), view_stats=stats)
    assert q.student_text.endswith("<|im_start|>assistant\n" + EMPTY_THINK)
    assert q.student_text.count("<think>") == 1  # the template's own block, not a second one
    assert list(q.teacher_texts) == ["reference", "hint"]  # feedback is built per rollout
    assert q.teacher_texts["hint"].endswith("<|im_start|>assistant\n")  # teachers think
    assert stats.static_hints == 1  # CODE has no algorithm_hint
    d = code_prompts(deepseek, CODE, ["reference"], cfg, PromptReport())
    assert d.student_text.endswith("<|Assistant|>" + EMPTY_THINK)  # the template's open <think> is closed
    assert d.teacher_texts["reference"].endswith("<|Assistant|><think>\n")  # thinking on: left as rendered
    plain = render_chat(qwen, "hi", thinking=True, ensure_empty_think=False)
    assert plain.endswith("assistant\n")


def test_code_feedback_prompt(qwen):
    feedback = CodeFeedback("passed", "It passed.", "print(3)", ExecutionResult("passed"))
    text, ids = code_feedback_prompt(qwen, CODE, feedback, PromptConfig(), PromptReport())
    assert "(feedback) -----\nIt passed.\n-----" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert ids == qwen.encode(text, add_special_tokens=False)


# ----------------------------------------------------------------------------------------------------------------
# Tokenisation and length


def test_prompt_ids_have_the_templates_bos_only(deepseek):
    prompts = math_prompts(deepseek, MATH, ["answer_only"], PromptConfig(), PromptReport())
    bos = deepseek.bos_token_id
    assert prompts.student_ids[0] == bos and prompts.student_ids[1] != bos
    assert deepseek.encode(prompts.student_text)[:2] == [bos, bos]  # what add_special_tokens=True would do
    assert deepseek.decode(prompts.student_ids) == prompts.student_text


def test_overlong_prompts_skipped_or_truncated_and_counted(qwen):
    views = ["full_solution", "partial_solution", "answer_only"]
    paragraphs = [f"Step {i}: " + "a long line of algebra " * 5 for i in range(4)]
    example = MathExample("What is 1+1?", "\n\n".join(paragraphs + ["\\boxed{2}"]), RowRef("m.jsonl", 0))
    stats = ViewStats()
    full = math_prompts(qwen, example, views, PromptConfig(max_prompt_tokens=100_000), PromptReport(), view_stats=stats)
    lengths = {"student": len(full.student_ids), **{v: len(ids) for v, ids in full.teacher_ids.items()}}
    assert lengths["student"] < lengths["answer_only"] < lengths["partial_solution"] < lengths["full_solution"]
    limit = lengths["answer_only"]  # answer_only fits exactly; the two longer views do not

    report = PromptReport()
    assert math_prompts(qwen, example, views, PromptConfig(max_prompt_tokens=limit), report) is None
    assert (report.examples, report.skipped) == (1, 1)
    assert report.overlong == Counter(full_solution=1, partial_solution=1)
    assert report.encoded == Counter(student=1, full_solution=1, partial_solution=1, answer_only=1)

    cfg = PromptConfig(max_prompt_tokens=limit, overlong="truncate")
    cut = math_prompts(qwen, example, views, cfg, report)
    assert cut.teacher_ids["full_solution"] == full.teacher_ids["full_solution"][:limit]  # right truncation
    assert cut.teacher_ids["answer_only"] == full.teacher_ids["answer_only"]
    assert cut.student_ids == full.student_ids
    assert report.truncated == Counter(full_solution=1, partial_solution=1)
    assert (report.examples, report.skipped) == (2, 1)
    assert report.overlong == Counter(full_solution=2, partial_solution=2)
    assert stats.answer_rules == Counter(boxed=1) and stats.partial_strategies == Counter(blank_lines=1)


def test_prompt_config_validation():
    with pytest.raises(ValueError, match="prompts.overlong='drop' is not one of"):
        PromptConfig(overlong="drop")
    with pytest.raises(ValueError, match="prompts.max_prompt_tokens=0 must be >= 1"):
        PromptConfig(max_prompt_tokens=0)
