"""Prepare the wheel folder `benchmarks/device_check.sh` installs from on a GPU machine without network.

    python benchmarks/device_wheels.py DIR [--tier core|trainer] [--python-version 3.12] [--platform ...]

Tier `core` (about 19 MiB): megatron-core, numpy, packaging: all that `gpu_step.py` and `pinned_memory.py` import
beyond torch. Tier `trainer` (about 110 MiB, pyarrow alone 53 MiB) adds what the tiny trainer run imports:
transformers, safetensors, datasets, psutil, pyyaml, tqdm and their requirements. Both are resolved to the versions
installed in *this*
environment, minus what a CUDA torch install already brings (torch, triton, nvidia-*, and their pure-Python
requirements such as sympy, networkx, jinja2, fsspec, filelock), then `pip download --no-deps` exactly those pins as
binary wheels for the target interpreter and platform. vLLM and Transformer Engine stay out (too large; the device
check does not need them). Writes DIR/requirements.txt (the pins) and prints the folder's size.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

TIERS = {
    "core": ("megatron-core", "numpy", "packaging"),
    "trainer": ("megatron-core", "numpy", "packaging", "transformers", "safetensors", "datasets", "psutil", "pyyaml",
                "tqdm"),
}
"""What the device check imports beyond torch (trainer: setup.py's `train` extra without tensorboard)."""
SKIP = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*|setuptools|pip|wheel)$")
"""Shipped with a CUDA torch install (and what its wheel pulls in is added below), never downloaded."""


def _name(requirement: str) -> str:
    return re.split(r"[\s;<>=!~\[(]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _closure(roots: tuple[str, ...]) -> dict[str, str]:
    """Installed distribution name -> version for `roots` and their (non-extra) requirements, recursively."""
    torch_side = {_name(r) for r in (metadata.requires("torch") or []) if "extra ==" not in r}
    found: dict[str, str] = {}
    todo = list(roots)
    while todo:
        name = _name(todo.pop())
        if name in found or SKIP.match(name) or name in torch_side:
            continue
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # a platform-conditional requirement not installed here
        todo += [r for r in (metadata.requires(name) or []) if "extra ==" not in r]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--tier", choices=tuple(TIERS), default="trainer")
    parser.add_argument("--python-version", default=f"{sys.version_info.major}.{sys.version_info.minor}")
    parser.add_argument("--platform", default="manylinux_2_28_x86_64")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    pins = _closure(TIERS[args.tier])
    lines = [f"{name}=={version}" for name, version in sorted(pins.items())]
    (args.dir / "requirements.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(args.dir),
         "--python-version", args.python_version, "--platform", args.platform, "--platform", "manylinux2014_x86_64",
         "--platform", "any", *lines],
        check=True,
    )
    size = sum(p.stat().st_size for p in args.dir.iterdir())
    print(f"{len(lines)} wheels pinned in {args.dir / 'requirements.txt'}; folder {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
