"""HF Qwen3 <-> Megatron checkpoint conversion (`avsd_megatron.convert`, `tools/convert_checkpoint.py`).

    .venv/bin/python -m pytest -q tests/convert/test_convert_checkpoint.py            # all (~1 min on 2 cores)
    .venv/bin/python -m pytest -q tests/convert/test_convert_checkpoint.py -m "not integration"   # single-process only

Fixtures are tiny random `transformers.Qwen3ForCausalLM`s, tied and untied, with GQA (4 heads, 2 KV heads),
head_dim 24 != hidden/heads 16, V=250 (not a multiple of 128), RoPE theta 1e6 under `rope_parameters`, and random
RMSNorm weights (so a swapped norm shows). The untied one is saved in several safetensors shards.

Single-process tests: config mapping, layout rules, file round trips (bit-exact), the CLI, error paths, and
`export_hf_weights` on a TE-named stand-in model. The `integration` tests run one 4-rank gloo launch of real
Megatron-Core on CPU that, for TP1PP1, TP2, PP2 and TP2xPP2, loads the converted checkpoints, compares logits with
transformers (fp32, atol 1e-4), runs `export_hf_weights`, and saves a Megatron checkpoint at TP2xPP2 that is then
converted back to HF.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from avsd_megatron.convert import (
    Qwen3Dims,
    TorchDistReader,
    convert_hf_to_megatron,
    convert_megatron_to_hf,
    export_hf_weights,
    iter_hf_weights_from_checkpoint,
    qwen3_config_to_transformer_config,
    qwen3_gpt_model_kwargs,
)
from avsd_megatron.convert.mapping import (
    GLOBAL_MAPPINGS,
    LAYER_MAPPINGS,
    expected_hf_shapes,
    gather_tp_shards,
    hf_names,
    megatron_key,
    model_mappings,
    split_tp_shard,
    to_hf,
    to_megatron,
)
from avsd_megatron.training.megatron_model import CPU_OVERRIDES

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

REPO = Path(__file__).resolve().parents[2]
V = 250  # not a multiple of 128: Megatron pads, export strips
TOKENS = torch.tensor([[3, 17, 249, 0, 128, 64, 5, 200], [9, 9, 1, 248, 100, 33, 77, 2]])
LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]  # (tp, pp)
TOKENIZER_FILES = {"tokenizer.json": '{"fake": true}\n', "tokenizer_config.json": '{"model_max_length": 128}\n'}


QWEN3_IDS = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"}  # what config.json carries


def _hf_config(tied: bool) -> dict:
    """Qwen3Config keyword arguments (config.json minus the architecture ids, see QWEN3_IDS)."""
    return dict(
        vocab_size=V,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        tie_word_embeddings=tied,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        initializer_range=0.1,
    )


def _make_hf_dir(path: Path, tied: bool, max_shard_size: str | None = None) -> Path:
    torch.manual_seed(1 if tied else 2)
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**_hf_config(tied))).float()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.2 * torch.randn_like(param))  # non-trivial RMSNorm / QK-norm weights
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    for name, text in TOKENIZER_FILES.items():
        (path / name).write_text(text)
    return path


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[bool, Path]:
    """tied -> HF directory; the untied model is split over several safetensors shards (index + files)."""
    root = tmp_path_factory.mktemp("hf")
    return {True: _make_hf_dir(root / "tied", True), False: _make_hf_dir(root / "untied", False, "100KB")}


@pytest.fixture(scope="module")
def megatron_dirs(hf_dirs, tmp_path_factory) -> dict[bool, Path]:
    """tied -> converted fp32 Megatron checkpoint. Untied: padded V = 250 (divisible_by=2), so the TP2 model (256 rows)
    loads it through Megatron's shape-mismatch path; tied: padded V = 256."""
    root = tmp_path_factory.mktemp("mcore")
    return {
        True: convert_hf_to_megatron(hf_dirs[True], root / "tied", dtype=torch.float32, tensor_model_parallel_size=2),
        False: convert_hf_to_megatron(
            hf_dirs[False], root / "untied", dtype=torch.float32, make_vocab_size_divisible_by=2
        ),
    }


def _hf_state(hf_dir: Path) -> dict[str, torch.Tensor]:
    state = {}
    for path in sorted(hf_dir.glob("*.safetensors")):
        state.update(safetensors_torch.load_file(path))
    return state


def _assert_same_state(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    for name in expected:
        assert actual[name].dtype == expected[name].dtype, name
        assert torch.equal(actual[name], expected[name]), name


# ----------------------------------------------------------------------------------------------------------------
# Config mapping


def test_qwen3_config_maps_hf_fields():
    cfg = _hf_config(tied=True) | QWEN3_IDS
    tc = qwen3_config_to_transformer_config(cfg, tensor_model_parallel_size=2, params_dtype=torch.bfloat16)
    assert (tc.num_layers, tc.hidden_size, tc.ffn_hidden_size) == (4, 64, 96)
    assert (tc.num_attention_heads, tc.num_query_groups, tc.kv_channels) == (4, 2, 24)
    assert tc.normalization == "RMSNorm" and tc.layernorm_epsilon == 1e-6 and tc.qk_layernorm
    assert tc.gated_linear_unit and tc.activation_func is torch.nn.functional.silu and not tc.add_bias_linear
    assert tc.params_dtype == torch.bfloat16 and tc.bf16 and tc.tensor_model_parallel_size == 2
    kwargs = qwen3_gpt_model_kwargs(cfg, tensor_model_parallel_size=2)
    assert kwargs == dict(
        vocab_size=256,
        max_sequence_length=128,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=1_000_000,
        share_embeddings_and_output_weights=True,
    )


def test_qwen3_config_reads_rope_theta_from_either_field():
    legacy = _hf_config(tied=False) | QWEN3_IDS
    del legacy["rope_parameters"]
    legacy |= {"rope_theta": 5e5, "rope_scaling": None}
    assert Qwen3Dims.from_hf_config(legacy).rope_theta == 5e5
    assert Qwen3Dims.from_hf_config(transformers.Qwen3Config(**_hf_config(False))).rope_theta == 1e6
    with pytest.raises(ValueError, match="rope_theta=5.*disagree"):
        Qwen3Dims.from_hf_config(_hf_config(False) | QWEN3_IDS | {"rope_theta": 5e5})


@pytest.mark.parametrize(
    "change, match",
    [
        ({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}, "architectures=.*LlamaForCausalLM"),
        ({"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe"}, "model_type='qwen3_moe'"),
        ({"architectures": None, "model_type": None}, "architectures=None"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}, "rope_type='yarn'"),
        ({"attention_bias": True}, "attention_bias=True"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"num_key_value_heads": 3}, "num_attention_heads=4 is not a multiple of num_key_value_heads=3"),
        ({"head_dim": None, "hidden_size": None}, "'hidden_size' is missing"),
        # issue 16.7: a wrong-typed field is named (int("four") said only "invalid literal"; 4.5 and true were cast)
        ({"num_hidden_layers": "four"}, "num_hidden_layers='four' must be an integer"),
        ({"num_hidden_layers": 4.5}, "num_hidden_layers=4.5 must be an integer"),
        ({"vocab_size": True}, "vocab_size=True must be an integer"),
        ({"rms_norm_eps": "1e-6"}, "rms_norm_eps='1e-6' must be a number"),
        ({"tie_word_embeddings": "no"}, "tie_word_embeddings='no' must be true or false"),
    ],
)
def test_qwen3_config_rejects_unsupported(change, match):
    with pytest.raises(ValueError, match=match):
        Qwen3Dims.from_hf_config(_hf_config(False) | QWEN3_IDS | change)


def test_read_hf_config_invalid_json_names_file_and_line(tmp_path):
    from avsd_megatron.convert import read_hf_config

    (tmp_path / "config.json").write_text('{\n  "hidden_size": 64,\n  oops\n}')
    with pytest.raises(ValueError, match=r"config\.json: not valid JSON .* at line 3"):
        read_hf_config(tmp_path)


def test_qwen3_config_rejects_indivisible_parallel_sizes():
    with pytest.raises(ValueError, match="num_key_value_heads=2 is not divisible by tensor_model_parallel_size=4"):
        qwen3_config_to_transformer_config(_hf_config(False) | QWEN3_IDS, tensor_model_parallel_size=4)
    with pytest.raises(ValueError, match="num_hidden_layers=4 is not divisible by pipeline_model_parallel_size=3"):
        qwen3_config_to_transformer_config(_hf_config(False) | QWEN3_IDS, pipeline_model_parallel_size=3)
    with pytest.raises(ValueError, match=r"overrides\['num_layers'\]=2 contradicts"):
        qwen3_config_to_transformer_config(_hf_config(False) | QWEN3_IDS, overrides={"num_layers": 2})


# ----------------------------------------------------------------------------------------------------------------
# Layout rules


def test_mapping_qkv_interleaves_query_groups():
    dims = Qwen3Dims.from_hf_config(_hf_config(False) | QWEN3_IDS)
    d, H = dims.head_dim, dims.hidden_size
    q = torch.arange(4 * d).repeat_interleave(H).view(4 * d, H).float()  # row r holds value r
    k, v = 1000 + q[: 2 * d], 2000 + q[: 2 * d]
    qkv = to_megatron(LAYER_MAPPINGS[1], [q, k, v], dims, padded_vocab=V)
    # group 0 = [q heads 0,1; k head 0; v head 0], group 1 = [q heads 2,3; k head 1; v head 1]
    expected = torch.cat([q[: 2 * d], k[:d], v[:d], q[2 * d :], k[d:], v[d:]])
    assert torch.equal(qkv, expected)
    assert all(torch.equal(a, b) for a, b in zip(to_hf(LAYER_MAPPINGS[1], qkv, dims), (q, k, v)))


@pytest.mark.parametrize("tp", [1, 2])
def test_mapping_tp_split_then_gather_is_identity(tp):
    dims = Qwen3Dims.from_hf_config(_hf_config(False) | QWEN3_IDS)
    padded, shapes = 256, expected_hf_shapes(dims)
    gen = torch.Generator().manual_seed(0)
    for mapping, layer in model_mappings(dims):
        if layer not in (None, 0):
            continue
        hf = [torch.randn(shapes[name], generator=gen) for name in hf_names(mapping, layer)]
        full = to_megatron(mapping, hf, dims, padded)
        shards = [split_tp_shard(mapping, full, r, tp) for r in range(tp)]
        assert torch.equal(gather_tp_shards(mapping, shards), full), mapping.megatron
        assert all(torch.equal(a, b) for a, b in zip(to_hf(mapping, full, dims), hf)), mapping.megatron


def test_mapping_gate_up_shard_is_gate_r_then_up_r():
    mapping = LAYER_MAPPINGS[6]
    gate, up = torch.arange(4.0).view(4, 1), 10 + torch.arange(4.0).view(4, 1)
    full = torch.cat([gate, up])
    assert split_tp_shard(mapping, full, 1, 2).flatten().tolist() == [2.0, 3.0, 12.0, 13.0]


# ----------------------------------------------------------------------------------------------------------------
# File conversion (single process)


@pytest.mark.parametrize("tied", [False, True])
def test_roundtrip_fp32_is_bit_exact(hf_dirs, megatron_dirs, tmp_path, tied):
    out = convert_megatron_to_hf(megatron_dirs[tied], tmp_path / "hf")
    _assert_same_state(_hf_state(out), _hf_state(hf_dirs[tied]))
    assert ("lm_head.weight" in _hf_state(out)) is not tied
    for name, text in TOKENIZER_FILES.items():
        assert (out / name).read_text() == text
    assert (out / "generation_config.json").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is tied and config["vocab_size"] == V


def test_roundtrip_bf16_storage_equals_cast(hf_dirs, tmp_path):
    mcore = convert_hf_to_megatron(hf_dirs[False], tmp_path / "mcore", dtype=torch.bfloat16)
    assert {m.properties.dtype for m in TorchDistReader(mcore).tensors().values()} == {torch.bfloat16}
    out = convert_megatron_to_hf(mcore, tmp_path / "hf", dtype=torch.bfloat16)
    expected = {k: v.to(torch.bfloat16) for k, v in _hf_state(hf_dirs[False]).items()}
    _assert_same_state(_hf_state(out), expected)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_megatron_to_hf_shards_load_in_transformers(hf_dirs, megatron_dirs, tmp_path):
    out = convert_megatron_to_hf(megatron_dirs[False], tmp_path / "hf", max_shard_bytes=150_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and all((out / f).is_file() for f in files)
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    ours = transformers.Qwen3ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ref = transformers.Qwen3ForCausalLM.from_pretrained(hf_dirs[False], dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(ours(TOKENS).logits, ref(TOKENS).logits)


def test_megatron_checkpoint_layout(megatron_dirs):
    reader = TorchDistReader(megatron_dirs[True])
    tensors = reader.tensors()
    assert tuple(tensors["embedding.word_embeddings.weight"].size) == (256, 64)  # padded for --tp 2
    assert "output_layer.weight" not in tensors  # tied
    assert tuple(tensors["decoder.layers.self_attention.linear_qkv.weight"].size) == (4, (4 + 2 * 2) * 24, 64)
    assert tuple(tensors["decoder.layers.mlp.linear_fc1.weight"].size) == (4, 2 * 96, 64)
    keys = set(reader.metadata.state_dict_metadata)
    assert "common_state/shard_0_1" in keys and "decoder.layers.mlp.linear_fc2._extra_state/shard_3_4" in keys
    assert json.loads((megatron_dirs[True] / "metadata.json").read_text())["sharded_backend"] == "torch_dist"
    (embedding,) = reader.read([("embedding.word_embeddings.weight", (0, 0), (256, 64))])
    assert embedding[V:].abs().sum() == 0  # padding rows are zeros


def _cli_main():
    spec = importlib.util.spec_from_file_location("convert_checkpoint", REPO / "tools" / "convert_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_cli_roundtrip(hf_dirs, tmp_path):
    main = _cli_main()

    args = ["--hf", str(hf_dirs[True]), "--out", str(tmp_path / "m"), "--tp", "2", "--pp", "2", "--dtype", "fp32"]
    assert main(["hf-to-megatron", *args]) == 0
    assert (tmp_path / "m" / "hf_assets" / "tokenizer.json").is_file()
    assert main(["megatron-to-hf", "--megatron", str(tmp_path / "m"), "--out", str(tmp_path / "h")]) == 0
    _assert_same_state(_hf_state(tmp_path / "h"), _hf_state(hf_dirs[True]))


def test_cli_reports_input_errors_without_traceback(hf_dirs, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _cli_main()(["hf-to-megatron", "--hf", str(hf_dirs[True]), "--out", str(tmp_path / "m"), "--tp", "3"])
    assert exit_info.value.code == 2
    assert "hf-to-megatron: error: config.json: num_attention_heads=4 is not divisible by" in capsys.readouterr().err
    assert _no_output(tmp_path / "m")


def test_cli_and_converter_never_import_trainer():
    files = [REPO / "tools" / "convert_checkpoint.py", *sorted((REPO / "avsd_megatron" / "convert").glob("*.py"))]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any("trainer" in name.split(".") for name in names), f"{path} imports {names}"


def test_export_hf_weights_with_te_names_equals_file_export(megatron_dirs):
    """Single rank, TE parameter names (the GPU layer spec), built straight from the checkpoint's global tensors."""
    for tied, ckpt in megatron_dirs.items():
        reader = TorchDistReader(ckpt)
        config = json.loads((ckpt / "hf_conversion.json").read_text())["hf_config"]
        dims = Qwen3Dims.from_hf_config(config)
        model = _te_named_model(reader, dims)
        exported = list(export_hf_weights(model, config, tp_group=None, pp_group=None))
        from_file = list(iter_hf_weights_from_checkpoint(reader, dims))
        assert [n for n, _ in exported] == [n for n, _ in from_file]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(exported, from_file))


def _te_named_model(reader: TorchDistReader, dims: Qwen3Dims) -> torch.nn.Module:
    """A module tree with GPTModel's TE parameter names holding the checkpoint's tensors (layer i from row i)."""

    def put(root: torch.nn.Module, dotted: str, value: torch.Tensor) -> None:
        *path, leaf = dotted.split(".")
        for part in path:
            if not hasattr(root, part):
                root.add_module(part, torch.nn.Module())
            root = getattr(root, part)
        root.register_parameter(leaf, torch.nn.Parameter(value, requires_grad=False))

    stored = reader.tensors()
    full = {k: reader.read([(k, (0,) * len(m.size), tuple(m.size))])[0] for k, m in stored.items()}
    model = torch.nn.Module()
    model.pre_process = model.post_process = True
    for mapping in GLOBAL_MAPPINGS:
        if megatron_key(mapping) in full:
            put(model, mapping.megatron, full[megatron_key(mapping)])
    layers = torch.nn.ModuleList()
    for i in range(dims.num_layers):
        layer = torch.nn.Module()
        layer.layer_number = i + 1
        for mapping in LAYER_MAPPINGS:
            put(layer, mapping.megatron, full[megatron_key(mapping)][i])
        layers.append(layer)
    model.decoder.add_module("layers", layers)
    return model


# ----------------------------------------------------------------------------------------------------------------
# Error paths: clear messages, no partial output


def _copy_hf(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _no_output(out: Path) -> bool:
    return not out.exists() and not any(p.name.startswith(f".{out.name}.partial-") for p in out.parent.iterdir())


def test_hf_to_megatron_rejects_unknown_architecture(hf_dirs, tmp_path):
    hf = _copy_hf(hf_dirs[True], tmp_path / "hf")
    config = json.loads((hf / "config.json").read_text())
    config |= {"architectures": ["MistralForCausalLM"], "model_type": "mistral"}
    (hf / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="MistralForCausalLM.*not supported"):
        convert_hf_to_megatron(hf, tmp_path / "out")
    assert _no_output(tmp_path / "out")


def _rewrite_single_file(hf: Path, edit) -> None:
    state = safetensors_torch.load_file(hf / "model.safetensors")
    edit(state)
    safetensors_torch.save_file(state, hf / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize(
    "edit, match",
    [
        (
            lambda s: s.pop("model.layers.2.self_attn.k_norm.weight"),
            r"lacks 1 tensor.*model\.layers\.2\.self_attn\.k_norm",
        ),
        (
            lambda s: s.update({"model.layers.0.mlp.extra.weight": torch.ones(2)}),
            r"'model\.layers\.0\.mlp\.extra\.weight' in model\.safetensors",
        ),
        (
            lambda s: s.update({"model.layers.1.mlp.up_proj.weight": torch.ones(95, 64)}),
            r"up_proj\.weight' in model\.safetensors has shape \[95, 64\].*\[96, 64\].*intermediate_size=96",
        ),
    ],
    ids=["missing", "unexpected", "shape"],
)
def test_hf_to_megatron_names_the_bad_tensor(hf_dirs, tmp_path, edit, match):
    hf = _copy_hf(hf_dirs[True], tmp_path / "hf")
    _rewrite_single_file(hf, edit)
    with pytest.raises(ValueError, match=match):
        convert_hf_to_megatron(hf, tmp_path / "out")
    assert _no_output(tmp_path / "out")


def test_tied_checkpoint_with_lm_head_copy_is_accepted(hf_dirs, tmp_path):
    """Some tied HF checkpoints still store lm_head.weight (= the embedding); it is ignored, not an error."""
    hf = _copy_hf(hf_dirs[True], tmp_path / "hf")
    _rewrite_single_file(hf, lambda s: s.update({"lm_head.weight": s["model.embed_tokens.weight"].clone()}))
    out = convert_megatron_to_hf(convert_hf_to_megatron(hf, tmp_path / "m", dtype=torch.float32), tmp_path / "h")
    _assert_same_state(_hf_state(out), _hf_state(hf_dirs[True]))


def test_megatron_lm_save_dir_resolves_to_latest_iteration(hf_dirs, megatron_dirs, tmp_path):
    save = tmp_path / "run"
    shutil.copytree(megatron_dirs[False], save / "iter_0000020")
    (save / "latest_checkpointed_iteration.txt").write_text("20\n")
    out = convert_megatron_to_hf(save, tmp_path / "hf")
    _assert_same_state(_hf_state(out), _hf_state(hf_dirs[False]))
    with pytest.raises(FileNotFoundError, match="not a Megatron dist checkpoint"):
        convert_megatron_to_hf(tmp_path, tmp_path / "hf2")


def test_trainer_checkpoint_root_follows_its_latest_file(hf_dirs, megatron_dirs, tmp_path):
    """Issue 16 (smaller): megatron-to-hf on the trainer's checkpoints/ root converts the step `latest` names."""
    root = tmp_path / "checkpoints"
    shutil.copytree(megatron_dirs[True], root / "step_00000010")
    shutil.copytree(megatron_dirs[False], root / "step_00000020")
    (root / "latest").write_text("step_00000010\n")  # not the highest step: the file decides
    out = convert_megatron_to_hf(root, tmp_path / "hf")
    _assert_same_state(_hf_state(out), _hf_state(hf_dirs[True]))
    (root / "latest").write_text("step_00000030\n")
    with pytest.raises(FileNotFoundError, match="latest names .*step_00000030"):
        convert_megatron_to_hf(root, tmp_path / "hf2")


def test_conversion_output_is_not_private_and_stale_partials_are_removed(hf_dirs, tmp_path):
    """Issue 16 (smaller): the output gets 0777 & ~umask (mkdtemp's 0700 made it unreadable to others on shared
    storage); a partial directory of a killed conversion (its pid gone) is removed, a running one's is kept."""
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".out.partial-{dead.pid}-abcd"
    legacy = tmp_path / ".out.partial-k3j2h1"  # the older naming, without a pid
    live = tmp_path / f".out.partial-{os.getpid()}-efgh"
    for d in (stale, legacy, live):
        d.mkdir()
        (d / "shard").write_text("x")
    umask = os.umask(0o022)
    try:
        out = convert_hf_to_megatron(hf_dirs[True], tmp_path / "out")
    finally:
        os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o755
    assert not stale.exists() and not legacy.exists() and live.exists()


def test_failed_conversion_leaves_no_output(hf_dirs, tmp_path, monkeypatch):
    """A read fails mid-write (headers valid), after some chunks reached the disk: the partial output is removed."""
    from avsd_megatron.convert.safetensors_io import SafetensorsReader

    hf = _copy_hf(hf_dirs[True], tmp_path / "hf")
    real_read, reads = SafetensorsReader.read, []

    def failing_read(self, name):
        reads.append(name)
        if len(reads) == 5:
            raise OSError(f"simulated read failure at {name!r}")
        return real_read(self, name)

    monkeypatch.setattr(SafetensorsReader, "read", failing_read)
    with pytest.raises(OSError, match="simulated read failure"):
        convert_hf_to_megatron(hf, tmp_path / "out")
    assert len(reads) == 5 and _no_output(tmp_path / "out")


def _corrupt_length_prefix(path: Path) -> None:
    """An 8-byte header length far beyond the file (what made the hand-written reader raise OverflowError)."""
    data = bytearray(path.read_bytes())
    data[:8] = (2**63 - 1).to_bytes(8, "little")
    path.write_bytes(data)


def _corrupt_header_json(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8:10] = b"[["
    path.write_bytes(data)


def _truncate_data(path: Path) -> None:
    os.truncate(path, path.stat().st_size - 100)


@pytest.mark.parametrize(
    "corrupt, reason",
    [
        (_corrupt_length_prefix, "header too large"),
        (_corrupt_header_json, "invalid JSON in header"),
        (_truncate_data, "incomplete metadata, file not fully covered"),
        (lambda path: path.write_bytes(b"\x01\x02"), "header too small"),
    ],
    ids=["length-prefix", "json", "truncated-data", "tiny-file"],
)
def test_corrupt_safetensors_file_is_named_before_any_output(hf_dirs, tmp_path, corrupt, reason):
    """Every shard is validated up front by safetensors.safe_open; the error names the file and the library's reason."""
    from avsd_megatron.convert.safetensors_io import SafetensorsReader

    hf = _copy_hf(hf_dirs[False], tmp_path / "hf")  # sharded: the error must name the bad shard, not the directory
    shard = sorted(hf.glob("model-*.safetensors"))[1]
    corrupt(shard)
    match = rf"{re.escape(str(shard))}: not a readable safetensors file \(.*{reason}"
    with pytest.raises(ValueError, match=match):
        SafetensorsReader(hf)
    with pytest.raises(ValueError, match=match):
        convert_hf_to_megatron(hf, tmp_path / "out")
    assert _no_output(tmp_path / "out")


def test_cli_reports_a_corrupt_shard_without_traceback(hf_dirs, tmp_path, capsys):
    hf = _copy_hf(hf_dirs[True], tmp_path / "hf")
    _corrupt_length_prefix(hf / "model.safetensors")
    with pytest.raises(SystemExit) as exit_info:
        _cli_main()(["hf-to-megatron", "--hf", str(hf), "--out", str(tmp_path / "m")])
    assert exit_info.value.code == 2
    assert f"{hf / 'model.safetensors'}: not a readable safetensors file" in capsys.readouterr().err


def test_shard_writer_plans_like_huggingface_hub(tmp_path):
    """The writer's files are hub's plan (transformers' save_pretrained layout), an oversize tensor on its own."""
    from huggingface_hub import split_torch_state_dict_into_shards

    from avsd_megatron.convert.safetensors_io import SafetensorsShardWriter

    state = {"a": torch.ones(10), "big": torch.arange(100.0), "c": torch.full((5,), 2.0), "d": torch.zeros(20)}
    writer = SafetensorsShardWriter(tmp_path, [(k, v.nbytes) for k, v in state.items()], max_shard_bytes=100)
    for name, tensor in state.items():
        writer.add(name, tensor)
    writer.finish()
    expected = split_torch_state_dict_into_shards(state, max_shard_size=100)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == expected.tensor_to_filename and index["metadata"] == {"total_size": 540}
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == sorted(expected.filename_to_tensors)
    _assert_same_state(_hf_state(tmp_path), state)
    with pytest.raises(RuntimeError, match="out of plan order"):
        SafetensorsShardWriter(tmp_path / "x", [("a", 40), ("c", 20)], 100).add("c", state["c"])


def test_conversion_progress_bars_count_every_byte(hf_dirs, tmp_path, capsys):
    """Both directions show a tqdm bar over the bytes written that ends at exactly its total (rate and ETA shown)."""
    mcore = convert_hf_to_megatron(hf_dirs[False], tmp_path / "m", dtype=torch.float32, progress=True)
    convert_megatron_to_hf(mcore, tmp_path / "h", progress=True)
    err = capsys.readouterr().err
    model_bytes = sum(t.nbytes for t in _hf_state(hf_dirs[False]).values())  # fp32 in, fp32 out
    for desc in ("hf->megatron", "megatron->hf"):
        final = re.findall(rf"{re.escape(desc)}: 100%\|[^|]*\| (\S+)/(\S+) \[[0-9:]+<[0-9:]+, +[0-9.]+[kMG]?B/s\]", err)
        assert final and final[-1][0] == final[-1][1], (desc, err[-2000:])
    from tqdm import tqdm

    written = re.search(r"megatron->hf: 100%\|[^|]*\| (\S+)/", err).group(1)
    assert written == tqdm.format_sizeof(model_bytes, divisor=1024)
    convert_megatron_to_hf(mcore, tmp_path / "quiet")  # the library default: no bar
    assert "megatron->hf" not in capsys.readouterr().err


def test_conversion_refuses_existing_output(hf_dirs, megatron_dirs, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        convert_hf_to_megatron(hf_dirs[True], tmp_path / "out")
    with pytest.raises(FileExistsError, match="already exists"):
        convert_megatron_to_hf(megatron_dirs[True], tmp_path / "out")


def test_megatron_to_hf_needs_a_config(megatron_dirs, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(megatron_dirs[True], ckpt)
    (ckpt / "hf_conversion.json").unlink()
    with pytest.raises(ValueError, match="no hf_conversion.json.*--hf-reference"):
        convert_megatron_to_hf(ckpt, tmp_path / "out")
    assert _no_output(tmp_path / "out")


def test_megatron_to_hf_rejects_mismatched_reference(hf_dirs, megatron_dirs, tmp_path):
    with pytest.raises(ValueError, match="disagrees.*tie_word_embeddings"):
        convert_megatron_to_hf(megatron_dirs[True], tmp_path / "out", hf_reference_dir=hf_dirs[False])
    ckpt = tmp_path / "ckpt"
    shutil.copytree(megatron_dirs[True], ckpt)
    (ckpt / "hf_conversion.json").unlink()  # now the (untied) reference is the only config: output_layer is missing
    with pytest.raises(ValueError, match="lacks tensor 'output_layer.weight'"):
        convert_megatron_to_hf(ckpt, tmp_path / "out", hf_reference_dir=hf_dirs[False])
    assert _no_output(tmp_path / "out")


def test_megatron_to_hf_rejects_wrong_layer_count(hf_dirs, megatron_dirs, tmp_path):
    ref = _copy_hf(hf_dirs[True], tmp_path / "ref")
    config = json.loads((ref / "config.json").read_text())
    (ref / "config.json").write_text(json.dumps(config | {"num_hidden_layers": 3}))
    ckpt = tmp_path / "ckpt"
    shutil.copytree(megatron_dirs[True], ckpt)
    (ckpt / "hf_conversion.json").unlink()
    match = r"'decoder\.layers\.[a-z_.]+' has global shape \[4, .*\[3, .*num_hidden_layers=3"
    with pytest.raises(ValueError, match=match):
        convert_megatron_to_hf(ckpt, tmp_path / "out", hf_reference_dir=ref)


# ----------------------------------------------------------------------------------------------------------------
# Real Megatron-Core on CPU (one 4-rank gloo launch)

# The TransformerConfig switches every CPU run uses (the trainer's own, so the test builds the model the same way).
_CPU_OVERRIDES = CPU_OVERRIDES


def _rank_megatron_checks(megatron_dirs: dict[bool, str], save_root: str) -> dict:
    """On each of 4 ranks: for every layout and both models, load -> logits -> export; save at TP2xPP2."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    from avsd_megatron.testing import init_megatron

    results = {}
    for tp, pp in LAYOUTS:
        init_megatron(tp, pp)
        groups = dict(tp_group=ps.get_tensor_model_parallel_group(), pp_group=ps.get_pipeline_model_parallel_group())
        for tied, ckpt in megatron_dirs.items():
            model, config = _build_and_load(ckpt, tp, pp)
            logits = _forward_logits(model, tp)
            exported = dict(export_hf_weights(model, config, **groups))
            if dist.get_rank() == 0:
                results[(tp, pp, tied, "exported")] = exported
            if logits is not None and ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
                results[(tp, pp, tied, "logits")] = logits
            if (tp, pp) == (2, 2):
                save_dir = Path(save_root) / f"saved-{int(tied)}"
                if dist.get_rank() == 0:
                    save_dir.mkdir(parents=True)
                dist.barrier()
                dist_checkpointing.save(model.sharded_state_dict(), str(save_dir))
        ps.destroy_model_parallel()
    return results


def _build_and_load(ckpt: str, tp: int, pp: int):
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.enums import AttnBackend

    from avsd_megatron.convert import load_megatron_checkpoint, read_conversion_metadata

    config = read_conversion_metadata(ckpt)["hf_config"]
    transformer_config = qwen3_config_to_transformer_config(
        config,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        overrides=_CPU_OVERRIDES | {"attention_backend": AttnBackend.local},
    )
    model = GPTModel(
        transformer_config,
        get_gpt_layer_local_spec(qk_layernorm=True),
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        parallel_output=True,
        **qwen3_gpt_model_kwargs(config, tensor_model_parallel_size=tp),
    )
    load_megatron_checkpoint(model, ckpt)
    return model.eval(), config


def _forward_logits(model, tp: int) -> torch.Tensor | None:
    """Full-vocab logits [B, T, V] on the last stage (TP-gathered, padding stripped); None elsewhere."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batch, seq = TOKENS.shape
    positions = torch.arange(seq).expand(batch, seq)

    def forward_step(data_iterator, chunk):
        return chunk(TOKENS, positions, None), lambda output, non_loss_data=False: output

    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter([None]),
            model=[model],
            num_microbatches=1,
            seq_length=seq,
            micro_batch_size=batch,
            forward_only=True,
            collect_non_loss_data=True,
        )
    if not ps.is_pipeline_last_stage():
        return None
    local = outputs[0].contiguous()  # [B, T, Vp/tp]
    parts = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(parts, local, group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)[..., :V]


@pytest.fixture(scope="module")
def megatron_results(megatron_dirs, tmp_path_factory):
    from avsd_megatron.testing import run_on_ranks

    save_root = tmp_path_factory.mktemp("saved")
    dirs = {tied: str(path) for tied, path in megatron_dirs.items()}
    results = {}
    for rank_results in run_on_ranks(_rank_megatron_checks, 4, dirs, str(save_root), timeout=400):
        results.update(rank_results)  # exports from rank 0, logits from a last-stage rank
    return results, save_root


@pytest.fixture(scope="module")
def hf_logits(hf_dirs) -> dict[bool, torch.Tensor]:
    """tied -> transformers' fp32 logits [B, T, V] for TOKENS."""
    logits = {}
    for tied, path in hf_dirs.items():
        model = transformers.Qwen3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            logits[tied] = model(TOKENS).logits
    return logits


@pytest.mark.integration
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("tp, pp", LAYOUTS, ids=[f"tp{t}pp{p}" for t, p in LAYOUTS])
def test_megatron_logits_match_transformers(hf_logits, megatron_results, tp, pp, tied):
    results, _ = megatron_results
    torch.testing.assert_close(results[(tp, pp, tied, "logits")], hf_logits[tied], rtol=0, atol=1e-4)


@pytest.mark.integration
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("tp, pp", LAYOUTS, ids=[f"tp{t}pp{p}" for t, p in LAYOUTS])
def test_export_hf_weights_equals_file_export(megatron_dirs, megatron_results, tmp_path, tp, pp, tied):
    results, _ = megatron_results
    exported = results[(tp, pp, tied, "exported")]
    reader = TorchDistReader(megatron_dirs[tied])
    from_file = dict(iter_hf_weights_from_checkpoint(reader, Qwen3Dims.from_hf_config(_hf_config(tied) | QWEN3_IDS)))
    assert list(exported) == list(from_file)  # same order as the file export
    _assert_same_state(exported, from_file)


@pytest.mark.integration
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_megatron_saved_tp2pp2_checkpoint_converts_to_hf_bit_exact(hf_dirs, megatron_results, tmp_path, tied):
    """A checkpoint Megatron itself wrote at TP2xPP2 (4 rank files, swiglu-factory fc1, TP-padded vocab)."""
    _, save_root = megatron_results
    out = convert_megatron_to_hf(save_root / f"saved-{int(tied)}", tmp_path / "hf", hf_reference_dir=hf_dirs[tied])
    _assert_same_state(_hf_state(out), _hf_state(hf_dirs[tied]))
