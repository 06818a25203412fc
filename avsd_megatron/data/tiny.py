"""Tiny bundled assets for CPU runs and tests: a synthetic math dataset, a small BPE tokenizer with Qwen3's special
tokens and chat template, a 4-layer Qwen3 config, and `make_tiny_hf_checkpoint` (random weights, HF layout).

What ships under `avsd_megatron/data/assets/` (package data; rebuild all of it with `python -m avsd_megatron tiny assets`):

| path                                   | what                                                                   |
|----------------------------------------|------------------------------------------------------------------------|
| `tiny_math/train.jsonl`                | 3000 word problems `{problem, solution, answer}`; `generate_math_rows` |
| `tiny_math/heldout.jsonl`              | 200 more, disjoint from train by problem text                          |
| `tiny_tokenizer/tokenizer.json`        | byte-level BPE, 512 ids: 507 BPE tokens + 5 Qwen3 special tokens       |
| `tiny_tokenizer/tokenizer_config.json` | eos `<|im_end|>`, pad `<|endoftext|>`, no BOS, Qwen3-like chat template |
| `tiny_qwen3/config.json`               | Qwen3ForCausalLM: 4 layers, hidden 128, 4 heads / 2 KV heads,          |
|                                        | head_dim 32, ffn 384, tied embeddings, vocab 512                       |
| `tiny_qwen3/generation_config.json`    | eos ids (`<|im_end|>`, `<|endoftext|>`) and pad id; no sampling values |

Dataset. Each row is a 2-3 number arithmetic word problem (sums, differences, products, an exact division, change
from a purchase) with a numbered worked solution, one step per line, whose last line ends in `\\boxed{answer}`, e.g.

    1. Maya starts with 14 marbles.
    2. After buying 9 more marbles: 14 + 9 = 23.
    3. After giving away 5 marbles: 23 - 5 = 18.
    4. So Maya has 18 marbles. The answer is \\boxed{18}.

The numbers are small (summands up to 30, one-digit factors, answers up to 81) so that the 4-layer model learns the
arithmetic within the main job's minutes of SFT; with operands up to 90 and two-digit factors it stayed near 5%.
`wrong_intermediate_references(rows, share=)` is the variant where the views disagree (the main job's
`--experiment views-disagree`): a share of the references print one wrong intermediate result, the final answer
right. The numbered lines make `views.partial_solution` cut by step (its bullet/numbered-line strategy). Rows come from
`random.Random(seed)` only, de-duplicated by problem text; the first `heldout` unique problems form the held-out
split and the next `train` ones the train split, so the two never share a problem.

Tokenizer. Qwen2/3's pre-tokenizer regex (digits split one by one, so numbers are digit sequences) + byte-level
BPE trained on the train split, the chat markup and the project's prompt messages; every string round-trips.
Special tokens are `<|endoftext|>` (pad), `<|im_start|>`, `<|im_end|>` (EOS) and the non-special `<think>`,
`</think>`, at the top ids as in Qwen3. The chat template is a shortened Qwen3 template: system/user/assistant
turns in ChatML, earlier assistant turns lose their `<think>` block, and the generation prompt gets an empty think
block when `enable_thinking=false` (Qwen3's behaviour; `prompts.render_chat` passes the flag because the template
mentions it).

Checkpoint. `make_tiny_hf_checkpoint(out_dir, seed)` draws every weight from a `torch.Generator(seed)` (matrices
N(0, 0.02), RMSNorm weights 1), independent of transformers' init code, and writes config.json,
generation_config.json, model.safetensors and the tokenizer files: a directory that `transformers`, vLLM and
`convert.convert_hf_to_megatron` all read.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from avsd_megatron.data.examples import RowRef, math_example_from_row

__all__ = [
    "ASSETS_DIR",
    "CHAT_TEMPLATE",
    "SPECIAL_TOKENS",
    "TINY_CONFIG_DIR",
    "TINY_HELDOUT_PATH",
    "TINY_TOKENIZER_DIR",
    "TINY_TRAIN_PATH",
    "build_tokenizer",
    "generate_math_rows",
    "load_tiny_tokenizer",
    "make_tiny_hf_checkpoint",
    "split_math_rows",
    "tiny_qwen3_config",
    "write_assets",
    "wrong_intermediate_references",
]

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
TINY_MATH_DIR = ASSETS_DIR / "tiny_math"
TINY_TRAIN_PATH = TINY_MATH_DIR / "train.jsonl"
TINY_HELDOUT_PATH = TINY_MATH_DIR / "heldout.jsonl"
TINY_TOKENIZER_DIR = ASSETS_DIR / "tiny_tokenizer"
TINY_CONFIG_DIR = ASSETS_DIR / "tiny_qwen3"

DATASET_SEED = 20260520  # the paper's date; any fixed value would do
NUM_TRAIN = 3000
NUM_HELDOUT = 200
VOCAB_SIZE = 512
INIT_STD = 0.02  # HF Qwen3 `initializer_range`

PAD_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
"""In id order at the top of the vocabulary; the first three are special (skipped when decoding), the think tags
are not (Qwen3 keeps them in decoded text)."""
_QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
"""Qwen2/Qwen3 tokenizer.json pre-tokenizer regex."""

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}"
    "{%- set content = message.content %}"
    "{%- if '</think>' in content %}{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
"""Qwen3's ChatML layout, shortened (no tools, no reasoning_content field)."""


# ----------------------------------------------------------------------------------------------------------------
# Synthetic math dataset

_NAMES = (
    "Ava", "Ben", "Chloe", "Dev", "Emma", "Finn", "Grace", "Hugo", "Ines", "Jack",
    "Kai", "Lena", "Maya", "Noah", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tara",
)  # fmt: skip
_ITEMS = (
    ("apple", "apples"), ("pencil", "pencils"), ("sticker", "stickers"), ("marble", "marbles"),
    ("book", "books"), ("cookie", "cookies"), ("shell", "shells"), ("card", "cards"),
    ("stamp", "stamps"), ("ribbon", "ribbons"), ("toy car", "toy cars"), ("balloon", "balloons"),
)  # fmt: skip

Problem = tuple[str, list[str], int]  # (problem text, solution steps without numbering, answer)


def _boxed_step(text: str, answer: int) -> str:
    return f"{text} The answer is \\boxed{{{answer}}}."


def _buy_then_give(rng: random.Random) -> Problem:
    name, (_, items) = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b = rng.randint(5, 30), rng.randint(2, 20)
    c = rng.randint(1, a + b - 1)
    problem = (
        f"{name} has {a} {items}. {name} buys {b} more and then gives away {c}. "
        f"How many {items} does {name} have now?"
    )
    steps = [
        f"{name} starts with {a} {items}.",
        f"After buying {b} more {items}: {a} + {b} = {a + b}.",
        f"After giving away {c} {items}: {a + b} - {c} = {a + b - c}.",
        _boxed_step(f"So {name} has {a + b - c} {items}.", a + b - c),
    ]
    return problem, steps, a + b - c


def _three_sum(rng: random.Random) -> Problem:
    name, (_, items) = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b, c = rng.randint(1, 20), rng.randint(1, 20), rng.randint(1, 20)
    problem = (
        f"{name} collects {items}. {name} finds {a} on Monday, {b} on Tuesday and {c} on Wednesday. "
        f"How many {items} does {name} find in total?"
    )
    steps = [
        f"Monday and Tuesday together: {a} + {b} = {a + b}.",
        f"Adding Wednesday: {a + b} + {c} = {a + b + c}.",
        _boxed_step(f"So {name} finds {a + b + c} {items}.", a + b + c),
    ]
    return problem, steps, a + b + c


def _boxes(rng: random.Random) -> Problem:
    name, (_, items) = rng.choice(_NAMES), rng.choice(_ITEMS)
    boxes, per_box = rng.randint(2, 9), rng.randint(2, 9)
    problem = f"{name} has {boxes} boxes with {per_box} {items} in each box. How many {items} does {name} have?"
    steps = [
        f"There are {boxes} boxes of {per_box} {items} each.",
        f"In total: {boxes} * {per_box} = {boxes * per_box}.",
        _boxed_step(f"So {name} has {boxes * per_box} {items}.", boxes * per_box),
    ]
    return problem, steps, boxes * per_box


def _boxes_plus_loose(rng: random.Random) -> Problem:
    name, (_, items) = rng.choice(_NAMES), rng.choice(_ITEMS)
    boxes, per_box, loose = rng.randint(2, 6), rng.randint(2, 9), rng.randint(1, 20)
    total = boxes * per_box + loose
    problem = (
        f"{name} has {boxes} bags of {per_box} {items} and {loose} more {items} on the table. "
        f"How many {items} does {name} have altogether?"
    )
    steps = [
        f"The bags hold {boxes} * {per_box} = {boxes * per_box} {items}.",
        f"With the ones on the table: {boxes * per_box} + {loose} = {total}.",
        _boxed_step(f"So {name} has {total} {items}.", total),
    ]
    return problem, steps, total


def _rows_minus_taken(rng: random.Random) -> Problem:
    name = rng.choice(_NAMES)
    rows, per_row = rng.randint(2, 9), rng.randint(2, 9)
    taken = rng.randint(1, rows * per_row - 1)
    left = rows * per_row - taken
    problem = (
        f"A hall has {rows} rows of {per_row} chairs. {taken} chairs are taken when {name} arrives. "
        "How many chairs are still free?"
    )
    steps = [
        f"The hall has {rows} * {per_row} = {rows * per_row} chairs.",
        f"Free chairs: {rows * per_row} - {taken} = {left}.",
        _boxed_step(f"So {left} chairs are free.", left),
    ]
    return problem, steps, left


def _share_then_eat(rng: random.Random) -> Problem:
    name, (_, items) = rng.choice(_NAMES), rng.choice(_ITEMS)
    friends, each = rng.randint(2, 6), rng.randint(3, 9)
    total, used = friends * each, rng.randint(1, each - 1)
    problem = (
        f"{name} shares {total} {items} equally among {friends} friends. Each friend then loses {used} of them. "
        f"How many {items} does each friend have left?"
    )
    steps = [
        f"Each friend gets {total} / {friends} = {each} {items}.",
        f"After losing {used}: {each} - {used} = {each - used}.",
        _boxed_step(f"So each friend has {each - used} {items} left.", each - used),
    ]
    return problem, steps, each - used


def _change(rng: random.Random) -> Problem:
    name, (item, items) = rng.choice(_NAMES), rng.choice(_ITEMS)
    price, count = rng.randint(2, 9), rng.randint(2, 5)
    cost = price * count
    bill = next(b for b in (10, 20, 50, 100, 200) if b >= cost)
    problem = (
        f"One {item} costs {price} dollars. {name} buys {count} {items} and pays with a {bill} dollar bill. "
        f"How many dollars of change does {name} get?"
    )
    steps = [
        f"The {items} cost {count} * {price} = {cost} dollars.",
        f"The change is {bill} - {cost} = {bill - cost} dollars.",
        _boxed_step(f"So {name} gets {bill - cost} dollars back.", bill - cost),
    ]
    return problem, steps, bill - cost


def _more_than(rng: random.Random) -> Problem:
    first, second = rng.sample(_NAMES, 2)
    (_, items) = rng.choice(_ITEMS)
    a, more = rng.randint(2, 30), rng.randint(1, 15)
    problem = (
        f"{first} has {a} {items}. {second} has {more} more {items} than {first}. "
        f"How many {items} do they have together?"
    )
    steps = [
        f"{second} has {a} + {more} = {a + more} {items}.",
        f"Together: {a} + {a + more} = {2 * a + more}.",
        _boxed_step(f"So they have {2 * a + more} {items}.", 2 * a + more),
    ]
    return problem, steps, 2 * a + more


def _give_two_friends(rng: random.Random) -> Problem:
    giver, f1, f2 = rng.sample(_NAMES, 3)
    (_, items) = rng.choice(_ITEMS)
    a = rng.randint(10, 50)
    b = rng.randint(1, a - 2)
    c = rng.randint(1, a - b - 1)
    problem = f"{giver} has {a} {items}, gives {b} to {f1} and {c} to {f2}. How many {items} does {giver} keep?"
    steps = [
        f"After giving {b} to {f1}: {a} - {b} = {a - b}.",
        f"After giving {c} to {f2}: {a - b} - {c} = {a - b - c}.",
        _boxed_step(f"So {giver} keeps {a - b - c} {items}.", a - b - c),
    ]
    return problem, steps, a - b - c


_TEMPLATES: tuple[Callable[[random.Random], Problem], ...] = (
    _buy_then_give, _three_sum, _boxes, _boxes_plus_loose, _rows_minus_taken,
    _share_then_eat, _change, _more_than, _give_two_friends,
)  # fmt: skip


def _row(problem: Problem) -> dict[str, str]:
    text, steps, answer = problem
    solution = "\n".join(f"{i}. {step}" for i, step in enumerate(steps, 1))
    return {"problem": text, "solution": solution, "answer": str(answer)}


def generate_math_rows(count: int, seed: int = DATASET_SEED) -> list[dict[str, str]]:
    """`count` distinct rows {problem, solution, answer}; a pure function of (count, seed), prefix-stable in count."""
    if count < 0:
        raise ValueError(f"count={count!r} must be >= 0")
    rng = random.Random(seed)
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    attempts = 0
    while len(rows) < count:
        attempts += 1
        if attempts > 50 * count + 1000:
            raise RuntimeError(f"could not find {count} distinct problems (found {len(rows)}); lower count")
        row = _row(rng.choice(_TEMPLATES)(rng))
        if row["problem"] not in seen:
            seen.add(row["problem"])
            rows.append(row)
    return rows


def split_math_rows(
    train: int = NUM_TRAIN, heldout: int = NUM_HELDOUT, seed: int = DATASET_SEED
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(train rows, held-out rows): the first `heldout` distinct problems are held out, the next `train` train."""
    rows = generate_math_rows(train + heldout, seed)
    return rows[heldout:], rows[:heldout]


_EQUATION = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")
_WRONG_OFFSETS = (-3, -2, -1, 1, 2, 3)


def wrong_intermediate_references(
    rows: Iterable[dict[str, str]], *, share: float, seed: int = DATASET_SEED
) -> tuple[list[dict[str, str]], int]:
    """Rows whose reference solutions show a wrong intermediate result while the final answer stays right.

    For a `share` of the rows (drawn with `random.Random(seed)`), one `a op b = c` step of the solution, chosen at
    random, prints a wrong result c' = c + d (d in +-1..3, c' >= 0); nothing else changes: later steps still use
    the true c, and the last line's `\\boxed{answer}` and the row's `answer` are right. The privileged views then
    disagree: full_solution (and partial_solution when the step is in its first half) carry the wrong value,
    answer_only does not. The student prompt (the problem) is untouched.

    Returns:
        (rows, number of rows changed), in input order.
    Raises:
        ValueError: share outside [0, 1].
    """
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share={share!r} must be in [0, 1]")
    rng = random.Random(seed)
    out, changed = [], 0
    for row in rows:
        steps = list(_EQUATION.finditer(row["solution"]))
        if not steps or rng.random() >= share:
            out.append(dict(row))
            continue
        step = rng.choice(steps)
        true = int(step.group(4))
        wrong = rng.choice([true + d for d in _WRONG_OFFSETS if true + d >= 0])
        text = row["solution"]
        out.append(dict(row, solution=text[: step.start(4)] + str(wrong) + text[step.end(4) :]))
        changed += 1
    return out, changed


def _write_jsonl(path: Path, rows: Iterable[dict[str, str]]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a jsonl file (one object per non-empty line)."""
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer


def _tokenizer_corpus(rows: list[dict[str, str]]) -> Iterator[str]:
    """What the BPE merges are learned from: the rows, and chat-rendered prompts of the first rows."""
    from avsd_megatron.data.prompts import math_student_message, math_teacher_message
    from avsd_megatron.data.views import MATH_VIEWS, math_view_payload

    for row in rows:
        yield row["problem"]
        yield row["solution"]
    for row in rows[:200]:
        messages = [math_student_message(row["problem"])]
        messages += [
            math_teacher_message(row["problem"], view, math_view_payload(view, row["solution"]))
            for view in MATH_VIEWS
        ]
        for message in messages:
            yield f"<|im_start|>user\n{message}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def build_tokenizer(rows: list[dict[str, str]], vocab_size: int = VOCAB_SIZE):
    """A byte-level BPE `tokenizers.Tokenizer` of exactly `vocab_size` ids (the last 5 are SPECIAL_TOKENS)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    bpe_size = vocab_size - len(SPECIAL_TOKENS)
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_size,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(_tokenizer_corpus(rows), trainer=trainer)
    if tokenizer.get_vocab_size() != bpe_size:
        raise RuntimeError(f"BPE training gave {tokenizer.get_vocab_size()} tokens, wanted {bpe_size}; more text?")
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS[:3]])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in SPECIAL_TOKENS[3:]])
    if tokenizer.get_vocab_size() != vocab_size:
        raise RuntimeError(f"tokenizer has {tokenizer.get_vocab_size()} ids, wanted {vocab_size}")
    return tokenizer


def _tokenizer_config() -> dict[str, Any]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
        "chat_template": CHAT_TEMPLATE,
    }


def save_tokenizer(tokenizer, out_dir: str | Path) -> Path:
    """Write tokenizer.json + tokenizer_config.json (an HF tokenizer directory)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"), pretty=True)
    _write_json(out / "tokenizer_config.json", _tokenizer_config())
    return out


def load_tiny_tokenizer(path: str | Path = TINY_TOKENIZER_DIR):
    """The bundled tokenizer as a `transformers` fast tokenizer (chat template included)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


# ----------------------------------------------------------------------------------------------------------------
# Tiny Qwen3 config and checkpoint


def tiny_qwen3_config(vocab_size: int = VOCAB_SIZE) -> dict[str, Any]:
    """config.json of the tiny Qwen3ForCausalLM (Qwen3-8B's field set, toy sizes, tied embeddings)."""
    pad_id, eos_id = vocab_size - 5, vocab_size - 3  # SPECIAL_TOKENS order
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": vocab_size,
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": 4,
        "tie_word_embeddings": True,
        "initializer_range": INIT_STD,
        "use_cache": True,
        "bos_token_id": pad_id,
        "eos_token_id": eos_id,
        "torch_dtype": "float32",
    }


def _generation_config(config: dict[str, Any]) -> dict[str, Any]:
    pad_id = config["bos_token_id"]
    return {"bos_token_id": pad_id, "eos_token_id": [config["eos_token_id"], pad_id], "pad_token_id": pad_id}


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def make_tiny_hf_checkpoint(
    out_dir: str | Path,
    seed: int = 0,
    *,
    dtype: torch.dtype = torch.float32,
    config_dir: str | Path = TINY_CONFIG_DIR,
    tokenizer_dir: str | Path = TINY_TOKENIZER_DIR,
) -> Path:
    """Write a random-init HF Qwen3 checkpoint directory: config, generation config, weights, tokenizer.

    Weights: matrices ~ N(0, 0.02²), RMSNorm weights = 1, drawn in HF tensor order from `torch.Generator(seed)`
    (the global RNG is untouched), so the same seed gives the same checkpoint on any machine.

    Args:
        out_dir: created; must not exist or be empty.
        dtype: storage dtype of the safetensors (config.json's torch_dtype follows it).
    Returns:
        `out_dir` as a Path.
    Raises:
        FileExistsError: `out_dir` exists and is not empty.
    """
    from safetensors.torch import save_file

    from avsd_megatron.convert.mapping import expected_hf_shapes
    from avsd_megatron.convert.qwen3_config import Qwen3Dims

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"make_tiny_hf_checkpoint: {out} exists and is not empty")
    config = json.loads((Path(config_dir) / "config.json").read_text(encoding="utf-8"))
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in expected_hf_shapes(Qwen3Dims.from_hf_config(config)).items():
        if len(shape) == 1:  # RMSNorm weights (input/post-attention/final, q_norm, k_norm)
            tensors[name] = torch.ones(shape, dtype=dtype)
        else:
            tensors[name] = (torch.randn(shape, generator=generator) * INIT_STD).to(dtype)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    _write_json(out / "config.json", config)
    shutil.copyfile(Path(config_dir) / "generation_config.json", out / "generation_config.json")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(Path(tokenizer_dir) / name, out / name)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Asset build and CLI


def write_assets(assets_dir: str | Path = ASSETS_DIR) -> None:
    """(Re)build every shipped asset: dataset splits, tokenizer, tiny config."""
    assets = Path(assets_dir)
    train, heldout = split_math_rows()
    for index, row in enumerate(heldout + train):
        math_example_from_row(row, RowRef("generate_math_rows", index))  # raises BadRowError on a bad row
    (assets / "tiny_math").mkdir(parents=True, exist_ok=True)
    _write_jsonl(assets / "tiny_math" / "train.jsonl", train)
    _write_jsonl(assets / "tiny_math" / "heldout.jsonl", heldout)
    tokenizer = build_tokenizer(train)
    save_tokenizer(tokenizer, assets / "tiny_tokenizer")
    (assets / "tiny_qwen3").mkdir(parents=True, exist_ok=True)
    config = tiny_qwen3_config(tokenizer.get_vocab_size())
    _write_json(assets / "tiny_qwen3" / "config.json", config)
    _write_json(assets / "tiny_qwen3" / "generation_config.json", _generation_config(config))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m avsd_megatron tiny", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("assets", help="rebuild the shipped assets under avsd_megatron/data/assets/")
    checkpoint = commands.add_parser("checkpoint", help="write a random-init tiny HF Qwen3 checkpoint directory")
    checkpoint.add_argument("out_dir", help="output directory (must not exist or be empty)")
    checkpoint.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    args = parser.parse_args(argv)
    if args.command == "assets":
        write_assets()
        print(f"wrote assets under {ASSETS_DIR}")
    else:
        try:
            print(make_tiny_hf_checkpoint(args.out_dir, args.seed))
        except FileExistsError as err:
            parser.exit(2, f"error: {err}\n")


if __name__ == "__main__":
    main()
