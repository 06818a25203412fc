"""Layers depend one way (README, style.md §3.1): every module's imports are parsed, an upward edge fails.

    math (signals) <- kernels (vocab_parallel) <- hook / convert / data <- trainer <- examples/
    testing (Megatron-on-CPU patches, the multi-rank launcher) sits above the trainer: only tests and the `train`
    CLI (which installs the CPU patches on a machine without CUDA) may import it.

Run: python -m pytest -q tests/test_layering.py
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "avsd_megatron"

# Top-level module (or subpackage) of avsd_megatron -> layer rank. A module may import avsd_megatron modules of
# its own rank or below. A new module must be classified here: the test fails until it is.
LAYERS = {
    "__init__": 0,
    # pure per-token math
    "signals": 0,
    "candidate_signals": 0,
    # TP-sharded kernels (explicit process groups)
    "vocab_parallel": 1,
    # Megatron hook, model I/O and the data side, siblings
    "batch": 2,
    "completion_output": 2,
    "loss": 2,
    "step": 2,
    "teacher": 2,
    "teacher_kinds": 2,
    "convert": 2,
    "data": 2,
    "views": 2,
    "prompts": 2,
    "sandbox": 2,
    "grading": 2,
    # the trainer and what only it composes
    "config": 3,
    "rollout": 3,
    "rollout_vllm": 3,
    "tiny": 3,
    "tiny_code": 3,
    "assets": 3,
    "checkpointing": 3,
    "megatron_model": 3,
    "metrics_log": 3,
    "tasks": 3,
    "trainer": 3,
    "warm_start": 3,
    "evaluate": 3,
    "main_job": 3,
    # NeMo-Run recipes: build launch commands from config; never import the trainer or train
    "recipes": 3,
    # test utilities
    "testing": 4,
    # entry point: on a machine without CUDA it installs testing's CPU patches before building the trainer
    "train": 5,
}

# Extra rules on top of the ranks (style.md §3.1): the math never communicates, the kernels never reach for
# Megatron's global process groups.
FORBIDDEN = {
    "signals": ("torch.distributed", "megatron"),
    "candidate_signals": ("torch.distributed", "megatron"),
    "vocab_parallel": ("megatron",),
}


def _layer_of(path: Path, package: Path = PACKAGE) -> str:
    return path.relative_to(package).with_suffix("").parts[0]


def _imports(path: Path, package: Path = PACKAGE) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, relative imports resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package_parts = ("avsd_megatron",) + path.relative_to(package).with_suffix("").parts[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package_parts[: len(package_parts) - node.level + 1]
                module = ".".join(base + ((node.module,) if node.module else ()))
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            if module == "avsd_megatron":  # `from avsd_megatron import signals`
                found += [(node.lineno, f"avsd_megatron.{alias.name}") for alias in node.names]
    return found


def _package_modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_layering_every_module_is_classified():
    unknown = sorted({_layer_of(p) for p in _package_modules()} - set(LAYERS))
    assert not unknown, f"classify these avsd_megatron modules in tests/test_layering.py LAYERS: {unknown}"


def _violations(path: Path, package: Path = PACKAGE) -> list[str]:
    """Upward or forbidden imports of one classified module, as readable lines."""
    layer = _layer_of(path, package)
    rank = LAYERS[layer]
    violations = []
    for line, module in _imports(path, package):
        parts = module.split(".")
        if parts[0] == "avsd_megatron" and len(parts) > 1:
            target = parts[1]
            if target in LAYERS and LAYERS[target] > rank:
                violations.append(f"line {line}: {module} (layer {target}, rank {LAYERS[target]} > {rank})")
        for prefix in FORBIDDEN.get(layer, ()):
            if module == prefix or module.startswith(prefix + "."):
                violations.append(f"line {line}: {module} is forbidden in {layer}")
    return violations


@pytest.mark.parametrize("path", _package_modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_layering_no_upward_import(path):
    if _layer_of(path) not in LAYERS:
        pytest.skip(f"{_layer_of(path)} is not classified (reported by test_layering_every_module_is_classified)")
    violations = _violations(path)
    assert not violations, f"{path.relative_to(ROOT)} imports upward:\n" + "\n".join(violations)


def test_layering_converter_cli_never_imports_the_trainer():
    path = ROOT / "tools" / "convert_checkpoint.py"
    bad = [
        (line, module)
        for line, module in _imports(path, package=path.parent)  # a script: no relative imports
        if module.startswith("avsd_megatron.") and LAYERS.get(module.split(".")[1], 0) >= LAYERS["config"]
    ]
    assert not bad, f"tools/convert_checkpoint.py must stay below the trainer layer, imports {bad}"


def test_layering_checker_flags_planted_upward_edges(tmp_path):
    """The checker itself: upward, relative and forbidden imports planted in a fake package are all reported."""
    package = tmp_path / "avsd_megatron"
    (package / "vocab_parallel").mkdir(parents=True)
    signals = package / "signals.py"
    signals.write_text(
        "from avsd_megatron.vocab_parallel import sampled_token_logprobs\n"
        "from avsd_megatron import trainer_free_name, teacher\n"
        "import torch.distributed as dist\n"
    )
    kernel = package / "vocab_parallel" / "logprob.py"
    kernel.write_text("from ..loss import x\nfrom megatron.core import parallel_state\nfrom ..signals import y\n")
    signal_violations = _violations(signals, package)
    assert [v.split(":")[0] for v in signal_violations] == ["line 1", "line 2", "line 3"], signal_violations
    kernel_violations = _violations(kernel, package)
    assert len(kernel_violations) == 2 and "avsd_megatron.loss" in kernel_violations[0], kernel_violations
    assert "megatron.core is forbidden" in kernel_violations[1]
