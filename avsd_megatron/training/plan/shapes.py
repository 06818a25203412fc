"""Model shapes for the planner: the Qwen3 sizes in code, this rank's parameter tensors, and the FLOP count.

`QWEN3_SIZES` holds the fields of the public HF `config.json` of every dense Qwen3 (0.6B ... 32B) that the shape
depends on, so a run can be planned without the weights; `model_dims(name_or_dir)` resolves a size name, an HF
directory (its config.json) or the bundled tiny model (`tiny`). Shapes go through `convert.Qwen3Dims`, the
converter's own validation, and the embedding through `convert.padded_vocab_size`, Megatron-LM's padding rule.

`rank_parameters(dims, tp, pp, stage)` lists the parameter tensors one Megatron `GPTModel` rank holds (name,
elements), in the order the model creates them; tests compare it with a real `GPTModel` on CPU at TP1 / TP2.
`forward_flops` is the dense-matmul count `benchmarks/gpu_step.py` reports MFU with (its docstring): per layer and
token 2H(Q + 2K) + 2QH + 6HF, causal attention 4Q(position + 1), and 2HV per position that runs the output layer.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from avsd_megatron.convert.qwen3_config import Qwen3Dims, padded_vocab_size

__all__ = [
    "QWEN3_SIZES",
    "TINY",
    "ModelSource",
    "RankParameters",
    "ddp_buffer_elements",
    "forward_flops",
    "model_dims",
    "rank_parameters",
    "total_parameters",
]

_COMMON = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151_936, head_dim=128,
               num_key_value_heads=8, rms_norm_eps=1e-6, rope_theta=1_000_000.0, max_position_embeddings=40_960,
               hidden_act="silu", attention_bias=False)


def _qwen3(hidden: int, layers: int, heads: int, ffn: int, tied: bool) -> dict:
    return dict(_COMMON, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                intermediate_size=ffn, tie_word_embeddings=tied)


QWEN3_SIZES: dict[str, dict] = {  # the public Qwen/Qwen3-* config.json values
    "Qwen3-0.6B": _qwen3(1024, 28, 16, 3072, tied=True),
    "Qwen3-1.7B": _qwen3(2048, 28, 16, 6144, tied=True),
    "Qwen3-4B": _qwen3(2560, 36, 32, 9728, tied=True),
    "Qwen3-8B": _qwen3(4096, 36, 32, 12288, tied=False),
    "Qwen3-14B": _qwen3(5120, 40, 40, 17408, tied=False),
    "Qwen3-32B": _qwen3(5120, 64, 64, 25600, tied=False),
}
TINY = "tiny"
"""The bundled tiny Qwen3 (`data/assets/tiny_qwen3/config.json`, what `python -m avsd_megatron tiny checkpoint`
writes)."""


@dataclass(frozen=True)
class ModelSource:
    """Which shapes were planned with, and where they came from."""

    name: str
    """A `QWEN3_SIZES` key, 'tiny', or the HF directory."""
    origin: str
    """'config.json', 'named size' or 'bundled tiny'."""
    dims: Qwen3Dims


def _size_key(text: str) -> str | None:
    base = Path(text.rstrip("/")).name.lower()
    return next((key for key in QWEN3_SIZES if key.lower() == base), None)


def model_dims(name_or_dir: str, *, prefer_named: bool = False) -> ModelSource:
    """Shapes of `name_or_dir`: an HF directory with config.json, a Qwen3 size ('Qwen3-8B', 'Qwen/Qwen3-8B', or a
    directory named like one that has no config.json), or 'tiny'. `prefer_named` skips a local config.json.

    Raises:
        ValueError: none of these; the message lists the sizes.
    """
    if name_or_dir == TINY:
        path = resources.files("avsd_megatron.data") / "assets" / "tiny_qwen3" / "config.json"
        return ModelSource(TINY, "bundled tiny", Qwen3Dims.from_hf_config(json.loads(path.read_text("utf-8"))))
    config = Path(name_or_dir) / "config.json"
    key = _size_key(name_or_dir)
    if config.is_file() and not (prefer_named and key):
        with open(config, encoding="utf-8") as f:
            return ModelSource(str(name_or_dir), "config.json", Qwen3Dims.from_hf_config(json.load(f)))
    if key is not None:
        return ModelSource(key, "named size", Qwen3Dims.from_hf_config(QWEN3_SIZES[key]))
    raise ValueError(
        f"model {name_or_dir!r}: no {config} and not a Qwen3 size; pass one of {[*QWEN3_SIZES, TINY]} "
        "(plan --model NAME) or an HF directory with a config.json"
    )


@dataclass(frozen=True)
class RankParameters:
    """The parameter tensors of one model-parallel rank: (name, elements) in creation order."""

    tensors: tuple[tuple[str, int], ...]

    @property
    def count(self) -> int:
        return sum(n for _, n in self.tensors)


def rank_parameters(dims: Qwen3Dims, tp: int, pp: int, stage: int = 0) -> RankParameters:
    """What `GPTModel` allocates on pipeline stage `stage` of a TP x PP layout (any TP rank: shards are equal).

    Embedding and output layer are vocab-sharded over the padded vocabulary; QKV, fc1 [gate; up] column-sharded;
    proj and fc2 row-sharded; the RMSNorm weights (input, q/k norms over head_dim, pre-MLP, final) replicated. A
    tied model (0.6B/1.7B/4B) has no output layer at PP1; at PP > 1 the last stage holds its own copy of the
    embedding as the output weight (Megatron's `shared_embedding` path), kept equal by an all-reduce. Names are
    the local spec's; the TE spec keeps the two pre-norm weights inside linear_qkv / linear_fc1 as
    `layer_norm_weight` (same sizes).
    """
    dims.check_parallel(tp, pp)
    if not 0 <= stage < pp:
        raise ValueError(f"stage={stage} must be in [0, pp={pp})")
    h, d = dims.hidden_size, dims.head_dim
    q, kv, f = dims.num_attention_heads * d, dims.num_query_groups * d, dims.ffn_hidden_size
    vocab = padded_vocab_size(dims.vocab_size, tp)
    per_stage = dims.num_layers // pp
    tensors: list[tuple[str, int]] = []
    if stage == 0:
        tensors.append(("embedding.word_embeddings.weight", vocab // tp * h))
    for i in range(per_stage):  # numbered within the stage, as `named_parameters()` names them
        p = f"decoder.layers.{i}."
        tensors += [
            (p + "input_layernorm.weight", h),
            (p + "self_attention.linear_proj.weight", h * (q // tp)),  # `Attention.__init__` builds proj first
            (p + "self_attention.linear_qkv.weight", (q + 2 * kv) // tp * h),
            (p + "self_attention.q_layernorm.weight", d),
            (p + "self_attention.k_layernorm.weight", d),
            (p + "pre_mlp_layernorm.weight", h),
            (p + "mlp.linear_fc1.weight", 2 * f // tp * h),
            (p + "mlp.linear_fc2.weight", h * (f // tp)),
        ]
    if stage == pp - 1:
        tensors.append(("decoder.final_layernorm.weight", h))
        if not dims.tie_word_embeddings or pp > 1:
            tensors.append(("output_layer.weight", vocab // tp * h))
    return RankParameters(tuple(tensors))


def ddp_buffer_elements(rank: RankParameters, dp: int, *, distributed_optimizer: bool) -> int:
    """Elements of Megatron DDP's contiguous param / grad buffer for `rank` (one bucket: no overlapped reduce).

    With the distributed optimizer every parameter starts on a 64-element boundary and the bucket end is padded to a
    multiple of lcm(DP, 128) (megatron/core/optimizer/param_layout.py:24-42, `pad_param_start` /
    `pad_bucket_end`; parameters are laid out in reverse order, param_and_grad_buffer.py); without it the buffer
    is the parameters exactly.
    """
    if not distributed_optimizer:
        return rank.count
    end = 0
    for _, numel in reversed(rank.tensors):
        end = -(-end // 64) * 64 + numel
    divisor = math.lcm(dp, 128)
    return -(-end // divisor) * divisor


def total_parameters(dims: Qwen3Dims, *, padded_for_tp: int | None = None) -> int:
    """Parameters of the whole model (HF count: unpadded vocab; `padded_for_tp`: Megatron's padded embedding)."""
    vocab = dims.vocab_size if padded_for_tp is None else padded_vocab_size(dims.vocab_size, padded_for_tp)
    h, d = dims.hidden_size, dims.head_dim
    q, kv, f = dims.num_attention_heads * d, dims.num_query_groups * d, dims.ffn_hidden_size
    layer = 2 * h + (q + 2 * kv) * h + 2 * d + h * q + 3 * f * h
    return vocab * h * (1 if dims.tie_word_embeddings else 2) + dims.num_layers * layer + h


def forward_flops(dims: Qwen3Dims, rows: int, length: int, output_positions: int, num_layers: int | None = None
                  ) -> float:
    """Dense forward FLOPs of `rows` causal rows of `length` tokens, the output layer at `output_positions`
    (module docstring; `benchmarks/gpu_step.py`'s count with these dims; `num_layers` default: all)."""
    h, q = dims.hidden_size, dims.num_attention_heads * dims.head_dim
    kv, f = dims.num_query_groups * dims.head_dim, dims.ffn_hidden_size
    layers = dims.num_layers if num_layers is None else num_layers
    per_token = 2 * h * (q + 2 * kv) + 2 * q * h + 6 * h * f
    attention = 4 * q * length * (length + 1) / 2  # sum over positions of 4 Q (position + 1)
    return layers * rows * (length * per_token + attention) + output_positions * 2 * h * dims.vocab_size
