"""AVSD on Qwen3-8B (the paper's math setting, examples/configs/qwen3_8b.yaml): convert, train, convert back, eval.

    python examples/avsd_qwen3_8b.py executor=slurm nodes=2 account=ACCT partition=batch \\
        container_image=/images/avsd-megatron.sqsh 'container_mounts=["/lustre:/lustre"]' \\
        hf_path=/lustre/models/Qwen3-8B workdir=/lustre/avsd/qwen3_8b --dryrun --yes   # drop --dryrun to submit
    python examples/avsd_qwen3_8b.py hf_path=models/Qwen3-8B --yes                     # one local 8-GPU node

nodes= picks the TP/PP/DP preset (avsd_megatron/pipelines/recipes.py); the same command is `nemorun avsd qwen3_8b ...`.
"""

import nemo_run as run

from avsd_megatron.pipelines.recipes import qwen3_8b

if __name__ == "__main__":
    run.cli.main(qwen3_8b)
