"""Checks before anything heavy (avsd_megatron/training/preflight.py) and the trainer's order of construction.

Run: python -m pytest -q tests/training/test_preflight.py

- the tokenizer check refuses a tokenizer without a chat template, without a pad token, or with more tokens than
  config.json's vocab_size, naming model.hf_path;
- the GPU memory estimate adds up its documented terms for Qwen3-8B, and teacher_storage='device' is refused (with
  the numbers) where they exceed an 80 GiB GPU, accepted on a 141 GiB one, never checked for 'cpu';
- a Trainer with a missing data source, a bad data row or a bad tokenizer raises that error with the model builder
  and the HF -> Megatron conversion patched to fail if called: the error comes before anything heavy;
- the in-job conversion's barrier is a gloo group with CONVERT_TIMEOUT (not the default NCCL group's 10 minutes).
"""

from __future__ import annotations

import json
import math
import shutil
from datetime import timedelta
from pathlib import Path

import pytest

from avsd_megatron.testing import run_on_ranks
from avsd_megatron.training import megatron_model, preflight
from avsd_megatron.training.config import ConfigError, from_dict, load_config, to_dict

ROOT = Path(__file__).resolve().parents[2]
TINY_YAML = ROOT / "examples" / "configs" / "tiny_cpu.yaml"
QWEN3_8B = {  # Qwen/Qwen3-8B config.json (the fields the dims read)
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 4096,
    "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 128, "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
    "tie_word_embeddings": False, "attention_bias": False, "hidden_act": "silu",
}
GIB = 2**30


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    from avsd_megatron.data.tiny import make_tiny_hf_checkpoint

    return Path(make_tiny_hf_checkpoint(tmp_path_factory.mktemp("tiny") / "hf_init"))


def _edited_copy(hf_dir: Path, dest: Path, *, tokenizer_config=None, config=None) -> Path:
    shutil.copytree(hf_dir, dest)
    for name, edit in (("tokenizer_config.json", tokenizer_config), ("config.json", config)):
        if edit is not None:
            data = json.loads((dest / name).read_text())
            edit(data)
            (dest / name).write_text(json.dumps(data))
    for template in dest.glob("chat_template.*"):
        if tokenizer_config is not None:
            template.unlink()
    return dest


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_check_accepts_the_tiny_checkpoint(hf_dir):
    vocab = json.loads((hf_dir / "config.json").read_text())["vocab_size"]
    tokenizer = preflight.load_checked_tokenizer(str(hf_dir), vocab)
    assert len(tokenizer) <= vocab and tokenizer.chat_template


def test_tokenizer_check_refuses_no_template_no_pad_and_too_many_tokens(hf_dir, tmp_path):
    vocab = json.loads((hf_dir / "config.json").read_text())["vocab_size"]
    no_template = _edited_copy(hf_dir, tmp_path / "t", tokenizer_config=lambda d: d.pop("chat_template", None))
    with pytest.raises(ValueError, match=r"model\.hf_path=.*no chat template"):
        preflight.load_checked_tokenizer(str(no_template), vocab)
    with pytest.raises(ValueError, match=r"more than config\.json's vocab_size=100"):
        preflight.load_checked_tokenizer(str(hf_dir), 100)


def test_tokenizer_check_refuses_a_tokenizer_without_pad(hf_dir, monkeypatch):
    from transformers import AutoTokenizer

    real = AutoTokenizer.from_pretrained(str(hf_dir))
    real.pad_token = None
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *a, **k: real)
    with pytest.raises(ValueError, match=r"model\.hf_path=.*no pad token"):
        preflight.load_checked_tokenizer(str(hf_dir), 10**6)


# ----------------------------------------------------------------------------------------------------------------
# GPU memory


def _qwen3_8b_cfg(**avsd):
    data = to_dict(load_config(ROOT / "examples" / "configs" / "qwen3_8b.yaml"))
    data["avsd"].update(avsd)
    return from_dict(data)


def test_gpu_memory_estimate_terms_for_qwen3_8b_at_tp2():
    cfg = _qwen3_8b_cfg(teacher_storage="device")
    terms = preflight.gpu_memory_estimate(cfg, QWEN3_8B, world_size=16, gpu_bytes=80 * GIB)
    # parameters of Qwen3-8B, re-derived from the config: embedding + lm_head + 36 layers + final norm
    h, f, heads, kv, d, v, layers = 4096, 12288, 32, 8, 128, 151936, 36
    layer = h * heads * d + 2 * h * kv * d + heads * d * h + 3 * h * f + 2 * h + 2 * d
    total = 2 * v * h + layers * layer + h
    assert 8.1e9 < total < 8.3e9
    per_rank = total / 2
    assert terms["weights"] == pytest.approx(per_rank * 2) and terms["gradients"] == pytest.approx(per_rank * 4)
    assert terms["optimizer"] == pytest.approx(per_rank * 12 / 8)  # distributed optimizer over DP 8
    assert terms["teacher"] == pytest.approx(per_rank * 2)  # θ₀ in bf16; θ comes back from the fp32 master
    assert terms["vllm"] == pytest.approx(0.4 * 80 * GIB) and terms["reserve"] == pytest.approx(0.1 * 80 * GIB)
    swap = preflight.gpu_memory_estimate(_qwen3_8b_cfg(teacher_storage="device", teacher_restore="swap"), QWEN3_8B,
                                         world_size=16, gpu_bytes=80 * GIB)
    assert swap["teacher"] == pytest.approx(per_rank * 2 * 2)  # θ₀ + swap, bf16
    ema = preflight.gpu_memory_estimate(_qwen3_8b_cfg(teacher_storage="device", teacher="ema"), QWEN3_8B,
                                        world_size=16, gpu_bytes=80 * GIB)
    assert ema["teacher"] == pytest.approx(per_rank * 4)  # ē in fp32, no swap buffer


def test_teacher_storage_device_is_refused_with_numbers_where_it_cannot_fit():
    device = _qwen3_8b_cfg(teacher_storage="device", teacher_restore="swap")
    with pytest.raises(ConfigError, match=r"avsd\.teacher_storage='device' does not fit: per GPU \d+\.\d GiB "
                                          r"\(weights 7\.6, gradients 15\.3, optimizer 5\.7, teacher 15\.3, "
                                          r"vllm 32\.0, reserve 8\.0\) > 80\.0 GiB at parallel\.tp=2"):
        preflight.check_teacher_storage_fits(device, QWEN3_8B, 16, gpu_bytes=80 * GIB)
    preflight.check_teacher_storage_fits(device, QWEN3_8B, 16, gpu_bytes=141 * GIB)  # an H200 holds it
    preflight.check_teacher_storage_fits(device, QWEN3_8B, 16, gpu_bytes=None)  # no GPU: nothing to check
    preflight.check_teacher_storage_fits(_qwen3_8b_cfg(teacher_storage="cpu"), QWEN3_8B, 16, gpu_bytes=80 * GIB)
    # without the swap buffer (θ restored from the fp32 master, the default here) θ₀ fits next to vLLM on 80 GB
    preflight.check_teacher_storage_fits(_qwen3_8b_cfg(teacher_storage="device"), QWEN3_8B, 16, gpu_bytes=80 * GIB)


# ----------------------------------------------------------------------------------------------------------------
# The trainer checks its inputs before it builds anything heavy


def early_error_rank(cfg_data: dict) -> str:
    """Construct a Trainer whose model builder and conversion fail if called; return the error it raised."""
    from avsd_megatron.runtime import install
    from avsd_megatron.training import trainer as trainer_module

    def heavy(*args, **kwargs):
        raise AssertionError("built something heavy before the inputs were checked")

    install()
    trainer_module.build_gpt_model = heavy
    trainer_module.initial_checkpoint = heavy
    try:
        trainer_module.Trainer(from_dict(cfg_data), progress=False)
    except AssertionError:
        raise
    except Exception as err:  # noqa: BLE001 - the test reads which error it was
        return f"{type(err).__name__}: {err}"
    raise AssertionError("the Trainer accepted bad inputs")


def _tiny_cfg(out: Path, hf: Path, sources: list[str]) -> dict:
    data = to_dict(load_config(TINY_YAML))
    data.update(output_dir=str(out), prompts_per_step=4, micro_batch_size=2, max_steps=1)
    data["model"]["hf_path"] = str(hf)
    data["data"]["sources"] = sources
    data["checkpoint"]["resume"] = None
    return data


@pytest.mark.integration
def test_trainer_reports_bad_inputs_before_building_the_model(hf_dir, tmp_path):
    from avsd_megatron.data.tiny import TINY_TRAIN_PATH

    bad_row = tmp_path / "bad.jsonl"
    bad_row.write_text(json.dumps({"problem": "1 + 1?", "solution": "2"}) + "\n" + json.dumps({"problem": "x"}) + "\n")
    no_template = _edited_copy(hf_dir, tmp_path / "hf_no_template",
                               tokenizer_config=lambda d: d.pop("chat_template", None))
    cases = [
        (_tiny_cfg(tmp_path / "a", hf_dir, [str(tmp_path / "missing.jsonl")]), r"FileNotFoundError: .*missing\.jsonl"),
        (_tiny_cfg(tmp_path / "b", hf_dir, [str(bad_row)]), r"solution"),
        (_tiny_cfg(tmp_path / "c", no_template, [str(TINY_TRAIN_PATH)]), r"no chat template"),
    ]
    for cfg_data, expected in cases:
        if "bad.jsonl" in cfg_data["data"]["sources"][0]:
            cfg_data["data"]["on_bad_row"] = "error"
        (message,) = run_on_ranks(early_error_rank, 1, cfg_data, timeout=120)
        assert _search(expected, message), (expected, message)


def _search(pattern: str, text: str) -> bool:
    import re

    return re.search(pattern, text) is not None


# ----------------------------------------------------------------------------------------------------------------
# The in-job conversion's barrier


def test_in_job_conversion_waits_in_a_gloo_group_with_the_long_timeout(monkeypatch, tmp_path):
    calls = []
    group = object()
    monkeypatch.setattr(megatron_model.dist, "get_world_size", lambda *a: 2)
    monkeypatch.setattr(megatron_model.dist, "new_group",
                        lambda **kw: calls.append(("new_group", kw)) or group)
    monkeypatch.setattr(megatron_model.dist, "barrier", lambda group=None: calls.append(("barrier", group)))
    monkeypatch.setattr(megatron_model.dist, "destroy_process_group", lambda g=None: calls.append(("destroy", g)))
    monkeypatch.setattr(megatron_model, "convert_hf_to_megatron",
                        lambda hf, out, **kw: calls.append(("convert", str(out))) or Path(out).mkdir())
    data = to_dict(load_config(TINY_YAML))
    data.update(output_dir=str(tmp_path))
    cfg = from_dict(data)
    for rank, converts in ((1, False), (0, True)):
        calls.clear()
        monkeypatch.setattr(megatron_model.dist, "get_rank", lambda: rank)
        assert megatron_model.initial_checkpoint(cfg) == tmp_path / megatron_model.INIT_DIR
        expected = [("new_group", {"backend": "gloo", "timeout": megatron_model.CONVERT_TIMEOUT})]
        expected += [("convert", str(tmp_path / megatron_model.INIT_DIR))] if converts else []
        expected += [("barrier", group), ("destroy", group)]
        assert calls == expected
    assert megatron_model.CONVERT_TIMEOUT >= timedelta(hours=1) and math.isfinite(
        megatron_model.CONVERT_TIMEOUT.total_seconds())


# ----------------------------------------------------------------------------------------------------------------
# A chained training job after the run finished exits before building anything


def test_train_cli_exits_at_once_when_the_newest_checkpoint_is_at_max_steps(tmp_path, monkeypatch, capsys):
    from avsd_megatron.training import train

    root = tmp_path / "checkpoints"
    for step in (2, 3):
        (root / f"step_{step:08d}").mkdir(parents=True)
        (root / f"step_{step:08d}" / "trainer_state.json").write_text("{}")
    (root / "latest").write_text("step_00000003")
    overrides = [f"output_dir={tmp_path}", "checkpoint.resume=auto"]
    monkeypatch.setattr(train, "_init_distributed", lambda: pytest.fail("started training"))
    train.main(["--config", str(TINY_YAML), "--set", *overrides, "max_steps=3"])
    assert "is at max_steps=3: nothing to train" in capsys.readouterr().out
    cfg = train.apply_overrides(load_config(TINY_YAML), [*overrides, "max_steps=4"])
    assert train.finished_checkpoint(cfg) is None  # one step left: it trains
    cfg = train.apply_overrides(load_config(TINY_YAML), [*overrides, "max_steps=3", "checkpoint.resume=null"])
    assert train.finished_checkpoint(cfg) is None
