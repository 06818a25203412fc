"""Layers depend one way, between folders (README, style.md §3.1): every module's imports are parsed, an upward edge
fails.

    signals (per-token math) <- vocab_parallel (TP kernels) <- hook | convert | verify | runtime
        <- data | rollout <- training <- pipelines <- testing (test helpers) ; __main__ (the command lines)

A module may import its own folder and folders of a lower rank; folders of the same rank never import each other
(so there is no cycle between folders). Only `testing/` itself and `tests/` import `avsd_megatron.testing`.

Run: python -m pytest -q tests/test_layering.py
"""

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "avsd_megatron"

# Folder (sub-package) of avsd_megatron -> layer rank. A new folder or top-level module must be classified here:
# the test fails until it is.
LAYERS = {
    "__init__": 0,
    # the AVSD per-token math, no communication
    "signals": 0,
    # TP-sharded kernels (explicit process groups)
    "vocab_parallel": 1,
    # siblings: the Megatron hook, the checkpoint converter, running / grading completions, Megatron-on-CPU patches
    "hook": 2,
    "convert": 2,
    "verify": 2,
    "runtime": 2,
    # siblings: rows -> views -> prompts (the code feedback view runs programs: verify), the rollout engines
    "data": 3,
    "rollout": 3,
    # the trainer and what only it composes
    "training": 4,
    # whole jobs: evaluation, warm start, main job, NeMo-Run recipes
    "pipelines": 5,
    # test utilities (launcher, full-state gather, tiny models): only tests import them
    "testing": 6,
    # `python -m avsd_megatron COMMAND`
    "__main__": 7,
}

# Extra rules on top of the ranks (style.md §3.1): the math never communicates, the kernels never reach for
# Megatron's global process groups, and the recipes build launch commands from the config without importing the
# trainer.
FORBIDDEN = {
    "signals": ("torch.distributed", "megatron"),
    "vocab_parallel": ("megatron",),
}
FORBIDDEN_MODULES = {
    "pipelines/recipes.py": ("avsd_megatron.training.trainer", "avsd_megatron.training.train"),
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
    """Upward, sideways or forbidden imports of one classified module, as readable lines."""
    layer = _layer_of(path, package)
    rank = LAYERS[layer]
    relative = path.relative_to(package).as_posix()
    violations = []
    for line, module in _imports(path, package):
        parts = module.split(".")
        if parts[0] == "avsd_megatron" and len(parts) > 1:
            target = parts[1]
            if target == "testing" and layer != "testing":
                violations.append(f"line {line}: {module} (only tests and testing/ import avsd_megatron.testing)")
            elif target != layer and target in LAYERS and LAYERS[target] >= rank:
                violations.append(f"line {line}: {module} (folder {target}, rank {LAYERS[target]} >= {rank})")
        for prefix in FORBIDDEN.get(layer, ()) + FORBIDDEN_MODULES.get(relative, ()):
            if module == prefix or module.startswith(prefix + "."):
                violations.append(f"line {line}: {module} is forbidden in {relative}")
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
        if module.startswith("avsd_megatron.") and LAYERS.get(module.split(".")[1], 0) >= LAYERS["training"]
    ]
    assert not bad, f"tools/convert_checkpoint.py must stay below the trainer layer, imports {bad}"


def test_layering_top_level_holds_only_subpackages():
    """avsd_megatron/ shows its layers: sub-packages, `__init__.py` and `__main__.py`, no loose modules."""
    entries = {p.name for p in PACKAGE.iterdir() if p.name != "__pycache__"}
    loose = sorted(e for e in entries if e not in ("__init__.py", "__main__.py") and not (PACKAGE / e).is_dir())
    assert not loose, f"move these into a sub-package: {loose}"
    folders = sorted(e for e in entries if (PACKAGE / e).is_dir())
    assert all((PACKAGE / f / "__init__.py").is_file() for f in folders), folders


def _subpackages() -> list[str]:
    return sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())


@pytest.mark.parametrize("name", _subpackages())
def test_layering_subpackage_says_what_it_is_and_exports_its_names(name):
    """Each sub-package's docstring opens with one line saying what the layer is; every name in `__all__` is there."""
    if name == "pipelines":
        pytest.importorskip("nemo_run")  # pipelines re-exports evaluate / warm_start / main_job, not recipes
    package = importlib.import_module(f"avsd_megatron.{name}")
    first_line = (package.__doc__ or "").strip().split("\n")[0]
    assert first_line and len(first_line) <= 120, f"avsd_megatron/{name}/__init__.py: a one-line docstring summary"
    exported = getattr(package, "__all__", None)
    assert exported, f"avsd_megatron/{name}/__init__.py re-exports nothing (__all__)"
    missing = [n for n in exported if not hasattr(package, n)]
    assert not missing, f"avsd_megatron.{name}.__all__ names missing attributes: {missing}"


def test_layering_only_tests_import_testing():
    """Scripts outside the package (tools/, examples/, benchmarks/) never import the test helpers either."""
    bad = []
    for folder in ("tools", "examples", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            bad += [f"{path.relative_to(ROOT)}:{line}: {m}" for line, m in _imports(path, package=path.parent)
                    if m == "avsd_megatron.testing" or m.startswith("avsd_megatron.testing.")]
    assert not bad, "only tests/ and avsd_megatron/testing/ import avsd_megatron.testing:\n" + "\n".join(bad)


def test_layering_checker_flags_planted_upward_edges(tmp_path):
    """The checker itself: upward, sideways, relative and forbidden imports planted in a fake package are reported."""
    package = tmp_path / "avsd_megatron"
    for folder in ("signals", "vocab_parallel", "data", "training"):
        (package / folder).mkdir(parents=True)
    signals = package / "signals" / "sampled.py"
    signals.write_text(
        "from avsd_megatron.vocab_parallel import sampled_token_logprobs\n"
        "from avsd_megatron import trainer_free_name, hook\n"
        "import torch.distributed as dist\n"
        "from .candidate import x\n"
    )
    kernel = package / "vocab_parallel" / "logprob.py"
    kernel.write_text("from ..hook.loss import x\nfrom megatron.core import parallel_state\nfrom ..signals import y\n")
    views = package / "data" / "views.py"
    views.write_text("from avsd_megatron.rollout.engine import x\nfrom .examples import y\nfrom ..verify import z\n")
    trainer = package / "training" / "trainer.py"
    trainer.write_text("from avsd_megatron.testing import launcher\nfrom avsd_megatron.data import views\n")
    signal_violations = _violations(signals, package)
    assert [v.split(":")[0] for v in signal_violations] == ["line 1", "line 2", "line 3"], signal_violations
    kernel_violations = _violations(kernel, package)
    assert len(kernel_violations) == 2 and "avsd_megatron.hook.loss" in kernel_violations[0], kernel_violations
    assert "megatron.core is forbidden" in kernel_violations[1]
    view_violations = _violations(views, package)  # rollout is data's sibling: sideways is refused too
    assert len(view_violations) == 1 and "avsd_megatron.rollout.engine" in view_violations[0], view_violations
    trainer_violations = _violations(trainer, package)
    assert len(trainer_violations) == 1 and "only tests and testing/" in trainer_violations[0], trainer_violations
