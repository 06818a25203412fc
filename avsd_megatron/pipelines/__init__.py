"""Whole jobs over the trainer: evaluation, the SFT warm start, the one-command CPU main job, NeMo-Run recipes.

| module       | what it holds                                                                            |
|--------------|------------------------------------------------------------------------------------------|
| `evaluate`   | math Avg@k / Pass@k and code pass@k of an HF checkpoint (`python -m avsd_megatron evaluate`) |
| `warm_start` | supervised warm start of the tiny model on worked solutions, and the view probe            |
| `main_job`   | init -> SFT -> convert -> AVSD + single-view runs -> HF -> held-out table (`... main-job`)  |
| `plot`       | training curves of runs' metrics.jsonl and the main job's summary.png (`... plot`; matplotlib) |
| `recipes`    | NeMo-Run recipes (`examples/avsd_*.py`, `nemorun avsd ...`); needs the `launch` extra, so it is |
|              | not imported here: `from avsd_megatron.pipelines.recipes import qwen3_8b`                  |
"""

from avsd_megatron.pipelines.evaluate import EvalConfig, evaluate_code, evaluate_hf_dir, evaluate_math
from avsd_megatron.pipelines.main_job import run_config
from avsd_megatron.pipelines.warm_start import SFTConfig, view_probe, warm_start

__all__ = ["EvalConfig", "SFTConfig", "evaluate_code", "evaluate_hf_dir", "evaluate_math", "run_config",
           "view_probe", "warm_start"]
