"""The SFT warm start (avsd_megatron/pipelines/warm_start.py): example layout, error examples, the bucketed token mean.

Run: python -m pytest -q tests/pipelines/test_warm_start.py
"""

import random
import re

import pytest
import torch

from avsd_megatron.data import tiny
from avsd_megatron.pipelines.warm_start import (
    IGNORE,
    SFTConfig,
    _accumulate_token_mean_loss,
    _length_buckets,
    corrupt_solution,
    greedy_completions,
    sft_example_ids,
    view_probe,
    warm_start,
)

pytest.importorskip("transformers")

STEP = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")


@pytest.fixture(scope="module")
def rows():
    return tiny.read_jsonl(tiny.TINY_TRAIN_PATH)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny.load_tiny_tokenizer()


def _value(a: str, op: str, b: str) -> int:
    return {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b), "/": int(a) // int(b)}[op]


def test_sft_example_ids_mask_the_prompt_and_end_in_eos(tokenizer, rows):
    row = rows[0]
    answer = tokenizer.encode(row["solution"], add_special_tokens=False) + [tokenizer.eos_token_id]
    for share in (0.0, 1.0):
        ids, labels = sft_example_ids(tokenizer, row, random.Random(0), teacher_share=share)
        assert len(ids) == len(labels) and ids[-len(answer):] == answer
        assert labels[-len(answer):] == answer and set(labels[: -len(answer)]) == {IGNORE}
        assert ("PRIVILEGED REFERENCE" in tokenizer.decode(ids)) == (share == 1.0)


def test_corrupt_solution_has_one_wrong_step_and_a_consistent_rest(rows):
    rng = random.Random(0)
    corrupted_rows = 0
    for row in rows[:500]:
        out = corrupt_solution(row["solution"], rng)
        if out is None:
            continue
        corrupted_rows += 1
        text, (start, end) = out
        steps = list(STEP.finditer(text))
        assert len(steps) == len(STEP.findall(row["solution"]))
        wrong = [s for s in steps if _value(*s.group(1, 2, 3)) != int(s.group(4))]
        assert len(wrong) == 1, text  # exactly the corrupted step is wrong; every later one is recomputed
        assert (wrong[0].start(4), wrong[0].end(4)) == (start, end)
        boxed = re.search(r"\\boxed\{(\d+)\}", text).group(1)
        assert boxed == steps[-1].group(4) or wrong[0] is steps[-1]  # the answer follows the last step
        assert text.count("\n") == row["solution"].count("\n") and text.startswith("1. ")
    assert corrupted_rows > 400  # None only for negative / inexact continuations


def test_corrupt_solution_without_arithmetic_steps_is_none():
    assert corrupt_solution("The answer is \\boxed{4}.", random.Random(0)) is None


def test_error_examples_mask_only_the_wrong_value(tokenizer, rows):
    rng = random.Random(3)
    for row in rows[:50]:
        ids, labels = sft_example_ids(tokenizer, row, rng, teacher_share=0.5, error_share=1.0)
        masked = [i for i, (tok, lab) in enumerate(zip(ids, labels)) if lab == IGNORE]
        prompt_len = next(i for i, lab in enumerate(labels) if lab != IGNORE)
        hidden = [i for i in masked if i >= prompt_len]
        text = tokenizer.decode(ids[prompt_len:], skip_special_tokens=True)
        if text == row["solution"]:  # corrupt_solution gave None: a clean example
            assert hidden == []
            continue
        wrong_value = tokenizer.decode([ids[i] for i in hidden])
        assert hidden == list(range(hidden[0], hidden[-1] + 1)) and wrong_value.isdigit()
        assert f"= {wrong_value}" in text and labels[-1] == tokenizer.eos_token_id


def test_length_buckets_keep_every_example_and_cut_where_padding_is_least():
    batch = [([0] * n, [IGNORE] * n) for n in (300, 90, 310, 85, 95, 305)]
    buckets = _length_buckets(batch)
    assert sorted(len(ids) for b in buckets for ids, _ in b) == sorted(len(ids) for ids, _ in batch)
    assert [[len(ids) for ids, _ in b] for b in buckets] == [[85, 90, 95], [300, 305, 310]]
    assert len(_length_buckets(batch[:1])) == 1


def test_bucketed_loss_gradient_equals_one_padded_batch(tokenizer, rows, tmp_path):
    from transformers import AutoModelForCausalLM

    ckpt = tiny.make_tiny_hf_checkpoint(tmp_path / "init", seed=0)
    model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float64)
    rng = random.Random(0)
    batch = [sft_example_ids(tokenizer, row, rng, teacher_share=0.5, error_share=0.5) for row in rows[:6]]
    assert len(_length_buckets(batch)) == 2
    pad = tokenizer.pad_token_id
    loss = _accumulate_token_mean_loss(model, batch, pad)
    bucketed = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in batch])
    labels = torch.tensor([lab + [IGNORE] * (width - len(lab)) for _, lab in batch])
    mask = (torch.arange(width)[None, :] < torch.tensor([len(i) for i, _ in batch])[:, None]).long()
    reference = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
    reference.backward()
    assert loss == pytest.approx(float(reference), rel=1e-6)  # HF computes the loss in fp32
    for got, want in zip(bucketed, (p.grad for p in model.parameters())):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("field", ["teacher_share", "error_share"])
def test_sft_config_rejects_shares_outside_unit_interval(field):
    with pytest.raises(ValueError, match=f"SFTConfig.{field}"):
        SFTConfig(**{field: 1.5})


def test_greedy_completions_batched_equal_one_at_a_time(tokenizer, rows, tmp_path):
    """Left padding must not change a greedy completion (positions, masks): batched == unbatched generate."""
    from transformers import AutoModelForCausalLM

    from avsd_megatron.data.prompts import math_eval_message, render_chat

    ckpt = tiny.make_tiny_hf_checkpoint(tmp_path / "init", seed=1)
    model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    # prompts of different lengths, so the batch is padded
    prompts = [render_chat(tokenizer, math_eval_message(row["problem"]), thinking=False) for row in rows[:4]]
    assert len({len(tokenizer.encode(p, add_special_tokens=False)) for p in prompts}) > 1
    batched = greedy_completions(model, tokenizer, prompts, max_new_tokens=12, batch_size=4)
    single = greedy_completions(model, tokenizer, prompts, max_new_tokens=12, batch_size=1)
    assert batched == single and all(batched)
    assert tokenizer.padding_side == "right"  # the caller's tokenizer is left as it was


def test_view_probe_scores_every_prompt_kind(rows, tmp_path):
    ckpt = tiny.make_tiny_hf_checkpoint(tmp_path / "init", seed=0)
    probe = view_probe(ckpt, rows[:3], ("answer_only",), max_new_tokens=4)
    assert set(probe) == {"student", "answer_only"} and all(0.0 <= v <= 100.0 for v in probe.values())


def test_warm_start_progress_bar_or_log_lines(rows, tmp_path, capsys):
    """With progress: a tqdm bar over the steps with rate, ETA and the recent loss, no log lines; without: log lines."""
    ckpt = tiny.make_tiny_hf_checkpoint(tmp_path / "init", seed=0)
    cfg = SFTConfig(steps=2, batch_size=2, lr=1e-3, seed=0)
    logged: list[str] = []
    warm_start(ckpt, tmp_path / "bar", rows[:4], cfg, log_every=1, log=logged.append, progress=True)
    err = capsys.readouterr().err
    assert re.search(r"sft: 100%\|[^|]*\| 2/2 \[[0-9:]+<[0-9:]+, +[0-9.]+(s/step|step/s), loss=[0-9.]+\]", err), err
    assert logged == []
    warm_start(ckpt, tmp_path / "log", rows[:4], cfg, log_every=1, log=logged.append, progress=False)
    assert "sft:" not in capsys.readouterr().err
    assert [line.split(" loss ")[0] for line in logged] == ["sft step 1/2", "sft step 2/2"]
