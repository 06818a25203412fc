"""`HFEngine`: rollouts with transformers `generate` on an HF causal LM (CPU or one GPU), behind the
`RolloutEngine` protocol of `avsd_megatron.rollout.engine` (life cycle, sampling semantics, seeds and the strict
weight update are described there)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from avsd_megatron.rollout.engine import (
    Completion,
    EngineState,
    SamplingParams,
    WeightNameCheck,
    as_id_list,
    eos_ids_of,
    preserved_process_state,
    request_seed,
)

if TYPE_CHECKING:  # transformers is imported inside the functions
    from transformers import PreTrainedModel

__all__ = ["HFEngine"]


class HFEngine:
    """Rollouts with `transformers` `generate` on an HF causal LM (CPU or one GPU). The engine owns the model.

    Build with `HFEngine.from_pretrained(hf_dir)` (model + tokenizer + EOS ids of the directory) or
    `HFEngine.from_config(config, tokenizer, seed=...)` (random init), or wrap a model: `HFEngine(model, tokenizer)`.
    The model's own generation defaults are discarded: only SamplingParams decide how to sample.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: Any = None, *, eos_token_ids: Sequence[int] | None = None):
        from transformers import GenerationConfig

        self.model = model.eval()
        self.tokenizer = tokenizer
        eos = tuple(eos_token_ids) if eos_token_ids is not None else eos_ids_of(model.generation_config, model.config)
        if not eos:
            raise ValueError("HFEngine: the model has no eos_token_id (generation_config.json or config.json)")
        self.eos_token_ids = eos
        pad = getattr(model.generation_config, "pad_token_id", None)
        if pad is None and tokenizer is not None:
            pad = tokenizer.pad_token_id
        self.pad_token_id = int(pad) if pad is not None else eos[0]
        self.vocab_size = int(model.config.vocab_size)
        # Only what we pass applies: no sampling defaults from generation_config.json (e.g. Qwen3's T=0.6).
        model.generation_config = GenerationConfig(eos_token_id=list(eos), pad_token_id=self.pad_token_id)
        self._params = dict(model.named_parameters(remove_duplicate=False))
        self._shapes, self._aliases = _hf_names(model)
        self.state = EngineState(awake=True, weights_valid=True)

    @classmethod
    def from_pretrained(
        cls, hf_dir: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ) -> HFEngine:
        """Model, tokenizer and EOS ids of an HF checkpoint directory."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype).to(device)
        return cls(model, AutoTokenizer.from_pretrained(str(hf_dir)))

    @classmethod
    def from_config(
        cls,
        config: Mapping[str, Any] | Any,
        tokenizer: Any = None,
        *,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> HFEngine:
        """A randomly initialised model (transformers' init under `seed`; global RNG untouched)."""
        from transformers import AutoConfig, AutoModelForCausalLM

        if isinstance(config, Mapping):
            fields = dict(config)
            config = AutoConfig.for_model(fields.pop("model_type"), **fields)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        return cls(model.to(device), tokenizer)

    # -- RolloutEngine ---------------------------------------------------------------------------------------------

    def sleep(self, keep_weights: bool = False) -> None:
        """Marks the weights invalid (vLLM level-2 semantics) unless keep_weights (level 1); memory stays allocated."""
        self.state.sleep(keep_weights=keep_weights)

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        self.state.to_wake(tags)

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        self.state.check_can_load()
        check = WeightNameCheck(self._shapes, self._aliases)
        for name, tensor in check.wrap(named_tensors):
            self._params[name].copy_(tensor)  # casts to the model's dtype and device
        check.finish()
        self.state.weights_valid = True

    @torch.no_grad()
    def generate(
        self, prompt_token_ids: Sequence[Sequence[int]], params: SamplingParams, seed: int, first_index: int = 0
    ) -> list[Completion]:
        self.state.check_can_generate()
        prompts = as_id_list(prompt_token_ids, self.vocab_size)
        stop = tuple(dict.fromkeys(self.eos_token_ids + params.stop_token_ids))
        generation_config = self._generation_config(params, stop)
        device = next(iter(self._params.values())).device
        completions = []
        for index, ids in enumerate(prompts):
            input_ids = torch.tensor([ids], dtype=torch.long, device=device)  # [1, P]
            with preserved_process_state():
                torch.manual_seed(request_seed(seed, first_index + index))  # seeds CUDA too
                out = self.model.generate(
                    input_ids, attention_mask=torch.ones_like(input_ids), generation_config=generation_config
                )  # [n, P + new]
            for row in out[:, len(ids) :].tolist():
                completions.append(self._completion(row, stop, params.max_new_tokens))
        return completions

    def close(self) -> None:
        """Nothing to release (the model is freed with the engine); the protocol's last call."""

    # -- helpers ---------------------------------------------------------------------------------------------------

    def _generation_config(self, params: SamplingParams, stop: tuple[int, ...]):
        from transformers import GenerationConfig

        common = dict(
            max_new_tokens=params.max_new_tokens,
            num_return_sequences=params.n,
            eos_token_id=list(stop),
            pad_token_id=self.pad_token_id,
            repetition_penalty=1.0,
        )
        if params.temperature == 0:
            return GenerationConfig(do_sample=False, **common)
        return GenerationConfig(
            do_sample=True,
            temperature=params.temperature,
            top_k=params.top_k if params.top_k > 0 else 0,  # transformers: 0 = off
            top_p=params.top_p,
            **common,
        )

    def _completion(self, row: list[int], stop: tuple[int, ...], max_new_tokens: int) -> Completion:
        end = next((i for i, t in enumerate(row) if t in stop), None)
        if end is None:
            token_ids, reason = tuple(row[:max_new_tokens]), "length"
        else:
            token_ids, reason = tuple(row[: end + 1]), "stop"
        text = self.tokenizer.decode(list(token_ids), skip_special_tokens=True) if self.tokenizer is not None else ""
        return Completion(token_ids=token_ids, text=text, finish_reason=reason)


def _hf_names(model: torch.nn.Module) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """(checkpoint name -> shape, tied alias -> the name it shares storage with) of an HF model's parameters."""
    shapes: dict[str, tuple[int, ...]] = {}
    aliases: dict[str, str] = {}
    first_name: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first_name:
            aliases[name] = first_name[id(param)]
        else:
            first_name[id(param)] = name
            shapes[name] = tuple(param.shape)
    return shapes, aliases
