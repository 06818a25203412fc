"""Rollout engines (avsd_megatron/rollout/engine.py): HFEngine on tiny random Qwen3s: exact T/top-k/top-p sampling,
seeded determinism, stop/length handling, strict weight updates, the sleep/wake state machine.

Run: python -m pytest -q tests/rollout/test_rollout.py
"""

import pytest
import torch

from avsd_megatron.data import tiny
from avsd_megatron.rollout.config import RolloutConfig
from avsd_megatron.rollout.engine import Completion, SamplingParams, preserved_process_state, request_seed
from avsd_megatron.rollout.hf_engine import HFEngine

transformers = pytest.importorskip("transformers")


def _config(**overrides) -> dict:
    """The bundled tiny Qwen3 config, smaller (2 layers, hidden 64)."""
    cfg = tiny.tiny_qwen3_config()
    cfg.update(num_hidden_layers=2, hidden_size=64, intermediate_size=128)
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="module")
def tokenizer():
    return tiny.load_tiny_tokenizer()


@pytest.fixture(scope="module")
def peaked_engine():
    """Untied, final norm x25: next-token distributions peaked enough that top-k / top-p cut real mass."""
    engine = HFEngine.from_config(_config(tie_word_embeddings=False), seed=0)
    with torch.no_grad():
        engine.model.model.norm.weight.fill_(25.0)
    return engine


def _reference_sample(model, ids, params: SamplingParams, seed: int, stop) -> list[int]:
    """Token-by-token sampler written from the definition (no KV cache): z / T, top-k, top-p, multinomial."""
    seq, out = list(ids), []
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for _ in range(params.max_new_tokens):
            scores = model(torch.tensor([seq])).logits[0, -1].float()
            if params.temperature == 0:
                token = int(scores.argmax())
            else:
                scores = scores / params.temperature
                if params.top_k > 0:
                    kth = torch.topk(scores, params.top_k).values[-1]
                    scores = scores.masked_fill(scores < kth, float("-inf"))
                if params.top_p < 1:
                    ascending, order = torch.sort(scores)
                    remove = ascending.softmax(-1).cumsum(-1) <= 1 - params.top_p
                    remove[-1] = False  # keep at least the most likely token
                    scores = scores.masked_fill(remove.scatter(0, order, remove), float("-inf"))
                token = int(torch.multinomial(scores.softmax(-1)[None], 1))
            seq.append(token)
            out.append(token)
            if token in stop:
                break
    return out


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.7, top_k=5, top_p=0.8, max_new_tokens=20),
        SamplingParams(temperature=1.3, top_k=0, top_p=1.0, max_new_tokens=20),
        SamplingParams(temperature=0.7, top_k=-1, top_p=0.5, max_new_tokens=20),
        SamplingParams(temperature=0.0, max_new_tokens=20),
    ],
    ids=["T0.7-k5-p0.8", "T1.3-off", "T0.7-p0.5", "greedy"],
)
def test_hf_engine_sampling_matches_the_definition(peaked_engine, params):
    prompts = [[1, 2, 3, 4], [10, 20], [300, 7, 9]]
    got = peaked_engine.generate(prompts, params, seed=5)
    for index, (ids, completion) in enumerate(zip(prompts, got)):
        seed = request_seed(5, index)
        assert list(completion.token_ids) == _reference_sample(
            peaked_engine.model, ids, params, seed, peaked_engine.eos_token_ids
        )


def test_hf_engine_top_k_and_top_p_change_the_samples(peaked_engine):
    prompts = [[1, 2, 3, 4], [10, 20]]
    base = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=20)
    outputs = {
        str(p): peaked_engine.generate(prompts, p, seed=1)
        for p in (base, SamplingParams(temperature=1.0, top_k=2, top_p=1.0, max_new_tokens=20),
                  SamplingParams(temperature=1.0, top_k=0, top_p=0.3, max_new_tokens=20))
    }  # fmt: skip
    assert len({tuple(c.token_ids for c in out) for out in outputs.values()}) == 3


def test_hf_engine_is_deterministic_batch_independent_and_leaves_the_global_rng(peaked_engine):
    params = SamplingParams(max_new_tokens=12, n=2)
    prompts = [[1, 2, 3], [4, 5], [6]]
    rng = torch.get_rng_state()
    first = peaked_engine.generate(prompts, params, seed=11)
    assert torch.equal(torch.get_rng_state(), rng)
    assert first == peaked_engine.generate(prompts, params, seed=11)
    assert first != peaked_engine.generate(prompts, params, seed=12)
    assert first[:2] == peaked_engine.generate(prompts[:1], params, seed=11)  # prompt 0 alone: same completions
    assert len(first) == 6 and all(isinstance(c, Completion) for c in first)
    # first_index: prompt i of the call is prompt first_index + i of a larger batch (a DP rank's slice)
    assert first[2:] == peaked_engine.generate(prompts[1:], params, seed=11, first_index=1)
    assert first[2:4] != peaked_engine.generate(prompts[1:2], params, seed=11)


def test_preserved_process_state_undoes_what_vllm_does_to_the_process(monkeypatch):
    """What vLLM's construction and its CPU generate change (vllm_engine docstring) is the caller's again on exit,
    including a `torch.set_num_threads` that vLLM's CPU worker replaced by a no-op."""
    import random

    import numpy as np

    threads = torch.get_num_threads()
    monkeypatch.setattr(torch, "set_num_threads", torch.set_num_threads)  # restored after the test whatever happens
    original_set_num_threads = torch.set_num_threads
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    state = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    precision = torch.get_float32_matmul_precision()
    with preserved_process_state():
        torch.manual_seed(0)
        random.seed(0)
        np.random.seed(0)
        torch.rand(3)
        torch.set_float32_matmul_precision("medium" if precision != "medium" else "high")
        torch.set_num_threads(1 if threads != 1 else 2)
        torch.set_num_threads = lambda n: None  # vLLM's CPU worker: "skip_set_num_threads"
    assert torch.equal(torch.get_rng_state(), state[0]) and random.getstate() == state[1]
    assert (np.random.get_state()[1] == state[2]).all()
    assert torch.get_float32_matmul_precision() == precision
    assert torch.set_num_threads is original_set_num_threads and torch.get_num_threads() == threads


def test_hf_engine_stops_after_the_stop_token_and_at_max_new_tokens(peaked_engine):
    prompt = [[1, 2, 3, 4]]
    greedy = peaked_engine.generate(prompt, SamplingParams(temperature=0.0, max_new_tokens=16), seed=0)[0]
    assert greedy.finish_reason == "length" and len(greedy.token_ids) == 16
    stop_at = greedy.token_ids.index(greedy.token_ids[5])  # first occurrence of the 6th token
    stopped = peaked_engine.generate(
        prompt, SamplingParams(temperature=0.0, max_new_tokens=16, stop_token_ids=(greedy.token_ids[5],)), seed=0
    )[0]
    assert stopped.token_ids == greedy.token_ids[: stop_at + 1] and stopped.finish_reason == "stop"
    # sampling: every completion ends at its first stop token, or runs to max_new_tokens without one
    stop = set(peaked_engine.eos_token_ids) | {7, 11, 13}
    params = SamplingParams(temperature=1.5, top_k=0, top_p=1.0, max_new_tokens=12, n=4, stop_token_ids=(7, 11, 13))
    for completion in peaked_engine.generate([[1, 2], [3, 4], [5]], params, seed=3):
        hits = [i for i, t in enumerate(completion.token_ids) if t in stop]
        if completion.finish_reason == "stop":
            assert hits == [len(completion.token_ids) - 1] and len(completion.token_ids) <= 12
        else:
            assert not hits and len(completion.token_ids) == 12


def test_hf_engine_decodes_text_without_special_tokens(tokenizer):
    engine = HFEngine.from_config(_config(), tokenizer, seed=1)
    prompt = tokenizer.encode("<|im_start|>user\n2 + 2?<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    for completion in engine.generate([prompt], SamplingParams(temperature=1.0, max_new_tokens=24, n=3), seed=0):
        assert completion.text == tokenizer.decode(list(completion.token_ids), skip_special_tokens=True)


def _state_dict(config: dict, seed: int) -> dict[str, torch.Tensor]:
    """HF checkpoint tensors of a random model (tied: no lm_head.weight)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**config))
    state = model.state_dict()
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight")
    return state


def test_hf_engine_update_weights_equals_a_model_loaded_with_them(tmp_path):
    config = _config()
    engine = HFEngine.from_config(config, seed=0)
    params = SamplingParams(max_new_tokens=16, n=2)
    prompts = [[1, 2, 3], [40, 50]]
    before = engine.generate(prompts, params, seed=9)
    new = _state_dict(config, seed=1)
    engine.update_weights(iter(new.items()))
    after = engine.generate(prompts, params, seed=9)
    assert after != before
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**config))
    model.load_state_dict(new, strict=False)  # tied lm_head follows the embedding
    model.save_pretrained(tmp_path / "hf")
    loaded = HFEngine.from_pretrained(tmp_path / "hf")
    assert loaded.generate(prompts, params, seed=9) == after
    ids = torch.tensor([prompts[0]])
    with torch.no_grad():
        torch.testing.assert_close(engine.model(ids).logits, loaded.model(ids).logits, rtol=0, atol=0)


def test_hf_engine_takes_the_converters_weight_stream(tmp_path):
    """Megatron checkpoint -> HF-named stream (the export layout) -> engine == the HF checkpoint it came from."""
    from avsd_megatron.convert import Qwen3Dims, TorchDistReader, convert_hf_to_megatron, read_hf_config
    from avsd_megatron.convert.convert import iter_hf_weights_from_checkpoint

    source = tiny.make_tiny_hf_checkpoint(tmp_path / "source", seed=3)
    megatron = convert_hf_to_megatron(source, tmp_path / "megatron", dtype=torch.float32)
    engine = HFEngine.from_pretrained(tiny.make_tiny_hf_checkpoint(tmp_path / "other", seed=4))
    dims = Qwen3Dims.from_hf_config(read_hf_config(source))
    engine.update_weights(iter_hf_weights_from_checkpoint(TorchDistReader(megatron), dims))
    params = SamplingParams(max_new_tokens=12)
    assert engine.generate([[5, 6, 7]], params, seed=0) == HFEngine.from_pretrained(source).generate(
        [[5, 6, 7]], params, seed=0
    )


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda s: [("model.layers.9.mlp.up_proj.weight", torch.zeros(1)), *s.items()], r"unknown tensor 'model\.l"),
        (lambda s: [*s.items(), ("model.norm.weight", s["model.norm.weight"])], r"'model.norm.weight' was sent twi"),
        (lambda s: [("lm_head.weight", s["model.embed_tokens.weight"]), *s.items()], r"'lm_head.weight' is tied"),
        (lambda s: [(k, v[:-1] if k == "model.norm.weight" else v) for k, v in s.items()], r"has shape \(63,\)"),
        (lambda s: [(k, v) for k, v in s.items() if "layers.1." not in k], r"11 of 24 tensors were not sent"),
    ],
    ids=["unknown", "duplicate", "tied-alias", "shape", "missing"],
)
def test_hf_engine_update_weights_is_strict(edit, match):
    config = _config()
    engine = HFEngine.from_config(config, seed=0)
    with pytest.raises(ValueError, match=match):
        engine.update_weights(edit(_state_dict(config, seed=1)))
    with pytest.raises(RuntimeError, match="last update_weights failed"):
        engine.generate([[1]], SamplingParams(max_new_tokens=2), seed=0)
    engine.update_weights(_state_dict(config, seed=1).items())  # a complete update makes it usable again
    assert len(engine.generate([[1]], SamplingParams(max_new_tokens=2), seed=0)) == 1


def test_hf_engine_sleep_wake_order_is_enforced():
    config = _config()
    engine = HFEngine.from_config(config, seed=0)
    params = SamplingParams(max_new_tokens=2)
    engine.sleep()
    with pytest.raises(RuntimeError, match=r"generate while \['weights', 'kv_cache'\] asleep"):
        engine.generate([[1]], params, seed=0)
    with pytest.raises(RuntimeError, match="update_weights while the weights are asleep"):
        engine.update_weights(_state_dict(config, seed=0).items())
    with pytest.raises(ValueError, match="wake_up tags=.*must be one of"):
        engine.wake_up(("weight",))
    engine.wake_up(("weights",))
    engine.update_weights(_state_dict(config, seed=0).items())
    with pytest.raises(RuntimeError, match=r"\['kv_cache'\] asleep"):
        engine.generate([[1]], params, seed=0)
    engine.wake_up(("kv_cache",))
    engine.generate([[1]], params, seed=0)
    engine.sleep()
    engine.wake_up()
    with pytest.raises(RuntimeError, match="sleep\\(\\) discarded them"):
        engine.generate([[1]], params, seed=0)
    engine.update_weights(_state_dict(config, seed=0).items())
    engine.sleep(keep_weights=True)  # vLLM's level 1: waking is enough
    with pytest.raises(RuntimeError, match="asleep"):
        engine.generate([[1]], params, seed=0)
    engine.wake_up()
    engine.generate([[1]], params, seed=0)


def test_hf_engine_from_pretrained_uses_the_checkpoint_eos_and_no_sampling_defaults(tmp_path):
    engine = HFEngine.from_pretrained(tiny.make_tiny_hf_checkpoint(tmp_path / "hf", seed=0))
    assert engine.eos_token_ids == (509, 507) and engine.pad_token_id == 507  # <|im_end|>, <|endoftext|>
    assert engine.model.generation_config.top_k is None and engine.model.generation_config.temperature is None
    with pytest.raises(ValueError, match=r"prompt_token_ids\[1\] has ids outside \[0, 512\)"):
        engine.generate([[1], [512]], SamplingParams(max_new_tokens=2), seed=0)
    with pytest.raises(ValueError, match=r"prompt_token_ids\[0\] is empty"):
        engine.generate([[]], SamplingParams(max_new_tokens=2), seed=0)


def test_sampling_params_from_config_and_checks():
    params = SamplingParams.from_config(RolloutConfig(max_new_tokens=64, n=2), stop_token_ids=[7])
    assert params == SamplingParams(
        temperature=0.7, top_p=0.95, top_k=20, max_new_tokens=64, n=2, stop_token_ids=(7,)
    )
    for bad, match in [
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(n=0), r"SamplingParams.n=0"),
    ]:
        with pytest.raises(ValueError, match=match):
            SamplingParams(**bad)


def test_request_seed_is_stable_and_distinct():
    seeds = {request_seed(s, i) for s in range(50) for i in range(50)}
    assert len(seeds) == 2500 and all(0 <= s < 2**63 for s in seeds)
    assert request_seed(1, 2) == request_seed(1, 2) != request_seed(2, 1)


def test_tiny_cpu_config_pieces_compose(tmp_path):
    """examples/configs/tiny_cpu.yaml -> tiny checkpoint -> bundled rows -> prompts -> HFEngine rollouts -> grades."""
    from pathlib import Path

    from avsd_megatron.data.examples import DataConfig, load_examples
    from avsd_megatron.data.prompts import PromptReport, math_prompts
    from avsd_megatron.training.config import load_config
    from avsd_megatron.verify.grading import grade_math_completion, math_answer

    root = Path(__file__).resolve().parents[2]
    cfg = load_config(root / "examples" / "configs" / "tiny_cpu.yaml")
    engine = HFEngine.from_pretrained(tiny.make_tiny_hf_checkpoint(tmp_path / "hf_init", seed=cfg.optim.seed))
    examples, _ = load_examples(DataConfig(sources=(str(root / cfg.data.sources[0]),), task=cfg.data.task))
    report = PromptReport()
    encoded = [
        math_prompts(engine.tokenizer, ex, cfg.avsd.views, cfg.prompts, report, ratio=cfg.avsd.partial_solution_ratio)
        for ex in examples[: cfg.micro_batch_size]
    ]
    assert report.overlong.total() == 0 and all(e is not None for e in encoded)
    params = SamplingParams.from_config(cfg.rollout)
    completions = engine.generate([e.student_ids for e in encoded], params, seed=request_seed(cfg.rollout.seed, 0))
    assert len(completions) == cfg.micro_batch_size * cfg.rollout.n
    for example, completion in zip(examples, completions):
        assert 1 <= len(completion.token_ids) <= cfg.rollout.max_new_tokens
        grade = grade_math_completion(completion.text, math_answer(example.solution))
        assert grade.correct in (True, False)
