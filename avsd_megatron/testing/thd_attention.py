"""A core attention for the local layer spec that also takes packed (THD) input, for CPU tests of packing.

Transformer Engine's `TEDotProductAttention` is the only Megatron attention that runs `qkv_format='thd'`; the local
spec's `DotProductAttention` asserts `packed_seq_params is None` (megatron/core/transformer/dot_product_attention.py:
153). `THDDotProductAttention` is that local attention with one addition: given packed_seq_params it runs Megatron's
own local attention math on the pack as one sequence with a block-diagonal causal mask built from
`cu_seqlens_q_padded` (a position attends to the positions of its own segment up to itself), which is what TE's
THD attention computes (padding_causal per segment, extensions/transformer_engine.py:2036-2042). Without
packed_seq_params it is the local attention unchanged.

Shapes: THD input q [T, np, hn], k / v [T, ng, hn] (attention.py:1468-1471 squeezes the batch dimension); output
[T, 1, np * hn], which attention.py:1597-1602 reshapes as it does TE's [T, np * hn].
"""

from __future__ import annotations

import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention

__all__ = ["THDDotProductAttention", "segment_causal_mask"]


def segment_causal_mask(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[1, 1, T, T] bool, True = masked (Megatron's attention_mask_func): other segments and the future."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long().cpu()
    segment = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)  # [T]
    if segment.numel() != total:
        raise ValueError(f"cu_seqlens cover {segment.numel()} positions, the pack has {total}")
    position = torch.arange(total)
    masked = (segment[:, None] != segment[None, :]) | (position[None, :] > position[:, None])
    return masked.to(cu_seqlens.device)[None, None]


class THDDotProductAttention(DotProductAttention):
    """Megatron's local `DotProductAttention`, plus packed (THD) input via a block-diagonal causal mask."""

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is None:
            return super().forward(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                                   attention_bias=attention_bias)
        if packed_seq_params.qkv_format != "thd" or attention_mask is not None:
            raise ValueError("THDDotProductAttention takes qkv_format='thd' without an attention mask")
        cu_seqlens = packed_seq_params.cu_seqlens_q_padded
        if cu_seqlens is None:
            cu_seqlens = packed_seq_params.cu_seqlens_q
        mask = segment_causal_mask(cu_seqlens, query.shape[0])
        # [T, heads, hn] -> [T, 1, heads, hn]: the pack as one sequence of a batch of one, masked per segment
        return super().forward(query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1), mask,
                               attn_mask_type=attn_mask_type, attention_bias=attention_bias)  # [T, 1, np * hn]
