"""AVSD on Qwen3-4B (the paper's math config with the 4B weights and TP1 presets): convert, train, convert back, eval.

    python examples/avsd_qwen3_4b.py executor=slurm nodes=1 account=ACCT partition=batch \\
        container_image=/images/avsd-megatron.sqsh 'container_mounts=["/lustre:/lustre"]' \\
        hf_path=/lustre/models/Qwen3-4B workdir=/lustre/avsd/qwen3_4b --dryrun --yes   # drop --dryrun to submit

nodes= picks the TP/PP/DP preset (avsd_megatron/pipelines/recipes.py); the same command is `nemorun avsd qwen3_4b ...`.
"""

import nemo_run as run

from avsd_megatron.pipelines.recipes import qwen3_4b

if __name__ == "__main__":
    run.cli.main(qwen3_4b)
