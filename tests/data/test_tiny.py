"""Bundled tiny assets (avsd_megatron/data/tiny.py): synthetic math dataset, BPE tokenizer + chat template, tiny Qwen3
config and the random-init HF checkpoint (loads in transformers, converts to Megatron).

Run: python -m pytest -q tests/data/test_tiny.py
"""

import json

import pytest
import torch

from avsd_megatron.data import tiny
from avsd_megatron.data.examples import DataConfig, load_examples
from avsd_megatron.data.prompts import EMPTY_THINK, render_chat
from avsd_megatron.data.views import partial_solution
from avsd_megatron.verify.grading import math_answer

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def shipped_rows():
    return tiny.read_jsonl(tiny.TINY_TRAIN_PATH), tiny.read_jsonl(tiny.TINY_HELDOUT_PATH)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny.load_tiny_tokenizer()


def test_tiny_dataset_shipped_files_equal_the_generator(shipped_rows):
    train, heldout = shipped_rows
    assert (train, heldout) == tiny.split_math_rows()
    assert len(train) == tiny.NUM_TRAIN and len(heldout) == tiny.NUM_HELDOUT


def test_tiny_dataset_is_deterministic_and_prefix_stable():
    rows = tiny.generate_math_rows(300, seed=7)
    assert rows == tiny.generate_math_rows(300, seed=7)
    assert rows[:100] == tiny.generate_math_rows(100, seed=7)
    assert rows != tiny.generate_math_rows(300, seed=8)


def test_tiny_dataset_splits_are_disjoint(shipped_rows):
    train, heldout = shipped_rows
    train_problems = {r["problem"] for r in train}
    assert len(train_problems) == len(train)
    assert not train_problems & {r["problem"] for r in heldout}


def test_tiny_dataset_answers_parse_with_the_grader(shipped_rows):
    for row in shipped_rows[0] + shipped_rows[1]:
        assert set(row) == {"problem", "solution", "answer"}
        assert math_answer(row["solution"]) == row["answer"]
        assert row["solution"].rstrip().endswith(f"\\boxed{{{row['answer']}}}.")


def test_tiny_dataset_loads_through_data_config():
    examples, report = load_examples(DataConfig(sources=(str(tiny.TINY_HELDOUT_PATH),), task="math"))
    assert report.kept == tiny.NUM_HELDOUT and report.num_skipped == 0


def test_tiny_dataset_partial_view_cuts_whole_steps(shipped_rows):
    solution = shipped_rows[0][0]["solution"]
    lines = solution.split("\n")
    kept = partial_solution(solution, 0.5).split("\n\n")[0]
    assert kept == "\n".join(lines[: -(-len(lines) // 2)])


def test_tiny_tokenizer_round_trips_the_dataset(tokenizer, shipped_rows):
    assert len(tokenizer) == tiny.VOCAB_SIZE
    for row in shipped_rows[0] + shipped_rows[1]:
        for text in (row["problem"], row["solution"]):
            assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_tiny_tokenizer_special_tokens_and_digits(tokenizer):
    ids = [tokenizer.convert_tokens_to_ids(t) for t in tiny.SPECIAL_TOKENS]
    assert ids == list(range(tiny.VOCAB_SIZE - 5, tiny.VOCAB_SIZE))
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token) == ("<|im_end|>", "<|endoftext|>", None)
    for token, token_id in zip(tiny.SPECIAL_TOKENS, ids):
        assert tokenizer.encode(f"a{token}b", add_special_tokens=False)[1] == token_id
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("2026", add_special_tokens=False)) == list("2026")
    text = "<|im_start|>user\nhi<|im_end|><think>x</think>"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False), skip_special_tokens=True) == (
        "user\nhi<think>x</think>"
    )


def test_tiny_chat_template_honours_enable_thinking(tokenizer):
    off = render_chat(tokenizer, "What is 2 + 3?", thinking=False)
    on = render_chat(tokenizer, "What is 2 + 3?", thinking=True)
    assert on == "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    assert off == on + EMPTY_THINK
    history = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "<think>\nwork\n</think>\n\nfive"},
    ]
    text = tokenizer.apply_chat_template(history, tokenize=False)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nq<|im_end|>\n"
        "<|im_start|>assistant\nfive<|im_end|>\n"
    )


def test_tiny_config_matches_the_tokenizer(tokenizer):
    config = transformers.AutoConfig.from_pretrained(tiny.TINY_CONFIG_DIR)
    assert config.model_type == "qwen3" and config.tie_word_embeddings
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (4, 128, 4)
    assert (config.num_key_value_heads, config.head_dim) == (2, 32)
    assert config.vocab_size == len(tokenizer) and config.eos_token_id == tokenizer.eos_token_id
    generation = json.loads((tiny.TINY_CONFIG_DIR / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [tokenizer.eos_token_id, tokenizer.pad_token_id]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny.make_tiny_hf_checkpoint(tmp_path_factory.mktemp("tiny") / "hf", seed=3)


def test_make_tiny_hf_checkpoint_loads_in_transformers(checkpoint):
    from safetensors.torch import load_file

    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    assert type(model).__name__ == "Qwen3ForCausalLM"
    saved = load_file(checkpoint / "model.safetensors")
    assert "lm_head.weight" not in saved  # tied, as HF files of tied models
    state = model.state_dict()
    for name, tensor in saved.items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=0)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    ids = tokenizer(render_chat(tokenizer, "1 + 1?", thinking=False), add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape[-1] == tiny.VOCAB_SIZE and torch.isfinite(logits).all()


def test_make_tiny_hf_checkpoint_is_seeded_and_leaves_the_global_rng(tmp_path, checkpoint):
    from safetensors.torch import load_file

    before = torch.get_rng_state()
    again = tiny.make_tiny_hf_checkpoint(tmp_path / "again", seed=3)
    other = tiny.make_tiny_hf_checkpoint(tmp_path / "other", seed=4)
    assert torch.equal(torch.get_rng_state(), before)
    assert (again / "model.safetensors").read_bytes() == (checkpoint / "model.safetensors").read_bytes()
    a, b = load_file(checkpoint / "model.safetensors"), load_file(other / "model.safetensors")
    assert not torch.equal(a["model.embed_tokens.weight"], b["model.embed_tokens.weight"])
    with pytest.raises(FileExistsError, match="not empty"):
        tiny.make_tiny_hf_checkpoint(other)


def test_make_tiny_hf_checkpoint_converts_to_megatron(checkpoint, tmp_path):
    from avsd_megatron.convert import convert_hf_to_megatron, read_conversion_metadata

    out = convert_hf_to_megatron(checkpoint, tmp_path / "megatron", dtype=torch.float32)
    metadata = read_conversion_metadata(out)
    assert metadata is not None
    assert (out / "hf_assets" / "tokenizer.json").is_file()


def test_wrong_intermediate_references_change_one_step_and_keep_the_answer(shipped_rows):
    import re

    from avsd_megatron.data.tiny import wrong_intermediate_references
    from avsd_megatron.data.views import final_answer

    train, _ = shipped_rows
    rows = train[:400]
    changed_rows, changed = wrong_intermediate_references(rows, share=0.5, seed=3)
    assert 150 <= changed <= 250  # about half
    equation = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a // b}
    differing = 0
    for old, new in zip(rows, changed_rows, strict=True):
        assert new["problem"] == old["problem"] and new["answer"] == old["answer"]
        assert final_answer(new["solution"])[0] == old["answer"]  # the boxed final answer is still right
        wrong = [m for m in equation.finditer(new["solution"])
                 if ops[m.group(2)](int(m.group(1)), int(m.group(3))) != int(m.group(4))]
        if new["solution"] != old["solution"]:
            differing += 1
            assert len(wrong) == 1 and 1 <= abs(int(wrong[0].group(4)) - int(
                ops[wrong[0].group(2)](int(wrong[0].group(1)), int(wrong[0].group(3))))) <= 3
        else:
            assert not wrong
    assert differing == changed
    assert wrong_intermediate_references(rows, share=0.5, seed=3) == (changed_rows, changed)  # seeded
    assert wrong_intermediate_references(rows, share=0.0)[1] == 0
