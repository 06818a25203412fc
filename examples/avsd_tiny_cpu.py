"""AVSD on the bundled tiny Qwen3, on this machine: 2 CPU processes under torchrun (gloo), no GPU.

    python examples/avsd_tiny_cpu.py --yes                      # tiny_init -> convert_in -> train -> convert_out
    python examples/avsd_tiny_cpu.py --yes 'train_overrides=["max_steps=2"]' workdir=outputs/avsd/tiny_try
    python examples/avsd_tiny_cpu.py --dryrun --yes             # print the commands, run nothing

Run from the repository root with the venv active (`torchrun` on PATH). Arguments: avsd_megatron/pipelines/recipes.py.
"""

import nemo_run as run

from avsd_megatron.pipelines.recipes import tiny_cpu

if __name__ == "__main__":
    run.cli.main(tiny_cpu)
