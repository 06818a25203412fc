"""A tiny Qwen3-shaped Megatron-Core `GPTModel` for CPU tests: `tiny_qwen3_config` + `build_tiny_gpt_model`.

It has every Qwen3 feature that changes tensor layouts or maths, at toy sizes:

| Qwen3 (HF `Qwen3Config`)           | here (Megatron `TransformerConfig` / `GPTModel`)          | tiny default        |
|------------------------------------|-----------------------------------------------------------|---------------------|
| RMSNorm, `rms_norm_eps`            | `normalization="RMSNorm"`, `layernorm_epsilon`            | 1e-6                |
| GQA `num_key_value_heads`          | `num_attention_heads`, `num_query_groups`                 | 4 heads, 2 groups   |
| `head_dim` != hidden/heads         | `kv_channels`                                             | 32 (not 64/4 = 16)  |
| QK-norm (RMSNorm over head_dim)    | `qk_layernorm=True` in config and layer spec              | on                  |
| SwiGLU MLP                         | `gated_linear_unit=True`, `activation_func=F.silu`        | ffn 128             |
| RoPE, `rope_theta`                 | `position_embedding_type="rope"`, `rotary_base`           | 1e6                 |
| no biases (`attention_bias=False`) | `add_bias_linear=False`, `add_qkv_bias=False`             |                     |
| `tie_word_embeddings`              | `share_embeddings_and_output_weights`                     | untied (Qwen3-8B)   |

CPU settings (see `megatron_cpu`): fp32 params, no dropout, `use_cpu_initialization=True`, no fused kernels,
`gradient_accumulation_fusion=False`, `batch_p2p_comm=False`, `pipeline_dtype=fp32`, local layer spec (no TE).

Vocab: `build_tiny_gpt_model(vocab_size=V)` passes V to `GPTModel` unchanged: V is the number of embedding/output
rows, padding included, as in Megatron-Bridge (`should_pad_vocab=False`; HF Qwen3's 151936 is already padded). V must
be divisible by TP. A raw tokenizer size is padded with `padded_vocab_size` (Megatron-LM's rule). The tests use
V=250, which is deliberately not a multiple of 128.

Weights: `use_cpu_initialization=True` draws each TP-sharded weight as a full master tensor from the default CPU
generator and keeps this rank's slice (`_initialize_affine_weight_cpu`, with stride 2 for the fused [gate; up] fc1),
so the same seed gives the same logical weights at any TP size. Across PP sizes it does not (a later stage starts
drawing at a different point of the generator stream); load a reference with `full_state.load_full_state_into`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from avsd_megatron.convert.qwen3_config import padded_vocab_size  # Megatron-LM's rule; re-exported for tests
from avsd_megatron.training.megatron_model import CPU_OVERRIDES

if TYPE_CHECKING:  # Megatron is imported inside the functions: importing this module must not load it
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer import TransformerConfig

__all__ = ["build_tiny_gpt_model", "padded_vocab_size", "tiny_qwen3_config"]

QWEN3_ROPE_THETA = 1_000_000  # Qwen3 `rope_theta`


def tiny_qwen3_config(**overrides: Any) -> TransformerConfig:
    """A `TransformerConfig` for a 2-layer Qwen3-shaped model on CPU; keyword overrides replace any field.

    Set `tensor_model_parallel_size` / `pipeline_model_parallel_size` to the sizes `parallel_state` was initialised
    with (`build_tiny_gpt_model` checks). `num_layers` must be divisible by the PP size.
    """
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.enums import AttnBackend

    fields: dict[str, Any] = dict(
        num_layers=2,
        hidden_size=64,
        ffn_hidden_size=128,
        num_attention_heads=4,
        num_query_groups=2,  # GQA: 2 query heads per KV group
        kv_channels=32,  # head_dim != hidden_size / num_attention_heads (= 16), as in Qwen3-0.6B/4B
        normalization="RMSNorm",
        layernorm_epsilon=1e-6,
        qk_layernorm=True,
        gated_linear_unit=True,  # SwiGLU: fc1 = [gate; up], silu(gate) * up
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.02,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,  # p2p buffer dtype; required when PP > 1
        perform_initialization=True,
        **CPU_OVERRIDES,  # no fused kernels, master-weight init, plain p2p (the trainer's own CPU switches)
        calculate_per_token_loss=True,  # loss_func returns (loss_sum, num_tokens, metrics); see anchors.md §2
        attention_backend=AttnBackend.local,
        tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1,
    )
    fields.update(overrides)
    return TransformerConfig(**fields)


def build_tiny_gpt_model(
    config: TransformerConfig,
    vocab_size: int,
    max_seq_len: int,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    *,
    seed: int = 0,
    share_embeddings_and_output_weights: bool = False,
    rotary_base: int = QWEN3_ROPE_THETA,
    core_attention: type | None = None,
) -> GPTModel:
    """Build a `GPTModel` with the local layer spec (RMSNorm + QK-norm) for this rank's pipeline stage.

    Args:
        config: a `TransformerConfig`, normally from `tiny_qwen3_config`.
        vocab_size: V, embedding/output rows used as-is (no padding here); must be divisible by TP.
        max_seq_len: `max_sequence_length` of the model.
        pre_process / post_process: whether this stage holds the embedding / the final norm and output layer;
            None means "from parallel_state" (first / last pipeline stage).
        seed: weights are drawn from a CPU generator seeded with `seed` inside `torch.random.fork_rng`, so the
            caller's RNG state is untouched and the same seed gives the same logical weights at any TP size.
        share_embeddings_and_output_weights: tie the output layer to the embedding (Qwen3 <= 4B); default untied.
        rotary_base: RoPE theta.
        core_attention: a replacement for the local spec's `DotProductAttention` class (e.g.
            `testing.thd_attention.THDDotProductAttention`, which also takes packed input); None = the spec's.
    Returns:
        the rank-local `GPTModel` (fp32, CPU, train mode).
    Raises:
        ValueError: config's TP/PP sizes differ from `parallel_state`, V is not divisible by TP, or
            `num_layers` is not divisible by PP.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if (config.tensor_model_parallel_size, config.pipeline_model_parallel_size) != (tp, pp):
        raise ValueError(
            f"config.tensor_model_parallel_size={config.tensor_model_parallel_size}, "
            f"config.pipeline_model_parallel_size={config.pipeline_model_parallel_size} differ from "
            f"parallel_state (tp={tp}, pp={pp}); pass them to tiny_qwen3_config(...)"
        )
    if vocab_size % tp != 0:
        raise ValueError(f"vocab_size={vocab_size} is not divisible by tp={tp}; pad it (see padded_vocab_size)")
    if config.num_layers % pp != 0:
        raise ValueError(f"config.num_layers={config.num_layers} is not divisible by pp={pp}")
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=True)

    layer_spec = get_gpt_layer_local_spec(qk_layernorm=config.qk_layernorm, normalization=config.normalization)
    if core_attention is not None:
        layer_spec.submodules.self_attention.submodules.core_attention = core_attention
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPTModel(
            config=config,
            transformer_layer_spec=layer_spec,
            vocab_size=vocab_size,
            max_sequence_length=max_seq_len,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=True,  # logits stay vocab-sharded [b, s, V/tp]
            share_embeddings_and_output_weights=share_embeddings_and_output_weights,
            position_embedding_type="rope",
            rotary_base=rotary_base,
        )
    return model
