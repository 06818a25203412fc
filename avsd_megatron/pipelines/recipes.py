"""NeMo-Run recipes: convert HF -> Megatron, train AVSD under torchrun, convert back to HF, evaluate.

    python examples/avsd_tiny_cpu.py --yes                                   # 2 CPU processes (gloo), this machine
    python examples/avsd_qwen3_8b.py executor=slurm nodes=2 account=ACCT partition=batch \\
        container_image=/images/avsd-megatron.sqsh hf_path=/lustre/models/Qwen3-8B workdir=/lustre/avsd/q8b \\
        'container_mounts=["/lustre:/lustre"]' socket_ifname=ib0 'data=["/lustre/data/math.jsonl"]' \\
        eval_data=/lustre/aime24.jsonl --dryrun --yes                   # print the sbatch scripts, submit nothing
    nemorun avsd qwen3_4b executor=slurm ...                                 # the same through the nemo-run CLI

Every recipe is a list of steps, each a NeMo-Run task run after the previous one (`sequential=True`: local tasks
wait for each other, Slurm jobs get `afterok` dependencies). `steps=[...]` picks a subset, in `STEPS` order:

| step          | command (run from the repository root)                     | skipped when                         |
|---------------|------------------------------------------------------------|--------------------------------------|
| `tiny_init`   | `python -m avsd_megatron tiny checkpoint <hf_path>`        | hf_path exists (tiny recipe only)    |
| `convert_in`  | `tools/convert_checkpoint.py hf-to-megatron --tp T --pp P` | `<workdir>/megatron_init` exists, or |
|               |                                                            | `megatron_checkpoint=` is given      |
| `train`       | `torchrun ... -m avsd_megatron train --config C --set ...` | never (resumes per the config); on   |
|               | (Slurm: `train`, `train_2`, ... chained jobs, see below)   | Slurm a job after the last step exits |
| `convert_out` | `tools/convert_checkpoint.py megatron-to-hf` (newest step; | `<workdir>/hf/<step>` exists         |
|               | fails if it is not max_steps: training did not finish)     |                                      |
| `evaluate`    | `python -m avsd_megatron evaluate --hf <workdir>/hf/latest` | no evaluate module or no eval_data=  |
|               | `--data <eval_data> --out <workdir>/eval.json`             | (dropped with a printed message)     |

Before anything is built, the planner (`training.plan`, as `python -m avsd_megatron plan`) runs on the train step's
exact config (the recipe's YAML with the step's --set items) for `gpu=` (default h100-80gb) and prints its table:
GPU memory per phase, host memory, checkpoint disk, step and run time (Slurm: against `time=`), scaling. A layout
that does not fit in some phase raises ConfigError naming the phases and numbers; `allow_no_fit=true` submits it
anyway. Shapes come from hf_path's config.json, or `Recipe.plan_model` when it is not there yet.

Layout of `workdir`: `megatron_init/` (converted start weights), `train/` (the trainer's output_dir: metrics,
generations, `checkpoints/step_*`), `hf/step_*` + `hf/latest` (HF exports), `eval.json`, and for Slurm `nemo_run/`
(job scripts and logs). On Slurm, workdir and hf_path must be on a filesystem every node mounts (`container_mounts`),
and the code that runs is the git HEAD of this checkout (NeMo-Run's `GitArchivePackager`): commit first.

Parallelism presets (`PRESETS`, picked by `nodes=`; TP stays inside a node's NVLink domain, DP spans nodes, PP is
not needed at 8B/4B; rollouts use one vLLM engine per TP group). Not yet measured on GPUs: starting points sized
from the memory arithmetic (bf16 weights + frozen teacher copy, distributed Adam, vLLM at 0.4 of memory).

| recipe     | nodes x GPUs | TP | PP | DP | micro-batch | micro-batches/step | prompts/step |
|------------|--------------|----|----|----|-------------|--------------------|--------------|
| `qwen3_8b` | 1 x 8        | 2  | 1  | 4  | 4           | 2                  | 32           |
| `qwen3_8b` | 2 x 8        | 2  | 1  | 8  | 4           | 1                  | 32           |
| `qwen3_8b` | 4 x 8        | 2  | 1  | 16 | 2           | 1                  | 32           |
| `qwen3_4b` | 1 x 8        | 1  | 1  | 8  | 4           | 1                  | 32           |
| `qwen3_4b` | 2 x 8        | 1  | 1  | 16 | 2           | 1                  | 32           |
| `qwen3_4b` | 4 x 8        | 1  | 1  | 32 | 1           | 1                  | 32           |
| `tiny_cpu` | 1 x 2 CPU    | 1  | 1  | 2  | 2           | 2                  | 8            |

Executors: `local` (one machine: `run.LocalExecutor`, torchrun with `nproc_per_node` processes, default the
preset's GPUs per node) and `slurm` (`run.SlurmExecutor`: account, partition, the preset's nodes, 8 GPUs per node,
a Pyxis container image built from docker/Dockerfile, container mounts, NCCL/InfiniBand environment; submitted
through a `LocalTunnel` on a login node, or an `SSHTunnel` when `ssh_host=` is given). Every job exports
CUDA_DEVICE_MAX_CONNECTIONS=1 (`COMMON_ENV`).

Slurm specifics:
- data: compute nodes run with HF_HUB_OFFLINE=1, so training rows come from `data=[FILE.jsonl|FILE.parquet, ...]` on
  shared storage (a config naming a Hub dataset is refused); HF_HOME and the vLLM / Triton / TorchInductor caches go
  under `cache_dir=` (default `<workdir>/cache`, `CACHE_ENV`), so every node and job shares them;
- memory: GPU jobs take whole nodes (`exclusive`) with all their memory (`mem=0`): the frozen teacher's pinned host
  copy is ≈ 15 GiB per rank at 8B TP2, ≈ 122 GiB per node;
- time: `time=` is the longest limit a job may ask for (the partition's MaxTime); the training work is estimated from
  `Recipe.work` (max_steps x seconds per step + saves x seconds per save, x 1.25) and split over as many chained jobs
  `train`, `train_2`, ... as it takes, each resuming from the last checkpoint (`checkpoint.resume: auto`) and
  started `afterany` the previous one (Slurm's `--requeue` does not requeue a TIMEOUT, and `afterok` would leave the
  rest pending forever); `convert_out` runs after the last one and fails unless training reached max_steps; the
  evaluation's limit is problems x k x max_new_tokens over the node's GPUs (`eval_problems=` when eval_data is not
  readable from the submitting machine);
- network: with nodes > 1, `socket_ifname=IFACE` sets GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME (Megatron and
  vLLM open gloo groups across nodes); job names are `<account>-avsd-<recipe>.<step>`.
"""

import dataclasses
import importlib.util
import math
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

try:
    import nemo_run as run
except ImportError as exc:  # the launch extra is optional for everything else in the package
    raise ImportError(
        "avsd_megatron.pipelines.recipes needs NeMo-Run: pip install -e '.[launch]' (nemo-run 0.11.x with leptonai<0.47)"
    ) from exc

from avsd_megatron.data.examples import LOCAL_FORMATS
from avsd_megatron.pipelines.evaluate import parse_args as parse_eval_args
from avsd_megatron.training.checkpointing import step_dir_name
from avsd_megatron.training.config import ConfigError, ParallelConfig, TrainConfig, apply_overrides, load_config
from avsd_megatron.training.plan import Estimate, format_table, plan_run

__all__ = ["PRESETS", "RECIPES", "STEPS", "Layout", "Recipe", "build_tasks", "launch", "plan_layout",
           "presets_markdown", "qwen3_4b", "qwen3_8b", "tiny_cpu"]

STEPS = ("tiny_init", "convert_in", "train", "convert_out", "evaluate")
EVAL_MODULE = "avsd_megatron.pipelines.evaluate"

# What every job needs, local or Slurm.
COMMON_ENV = {
    "CUDA_DEVICE_MAX_CONNECTIONS": "1",  # Megatron TP/SP: keeps communication kernels ordered before compute
    "TOKENIZERS_PARALLELISM": "false",
}
# Slurm jobs: what every multi-node NCCL job here needs. Cluster-specific settings (NCCL_IB_HCA, the socket
# interface) are arguments; anything else goes through env={...}.
SLURM_ENV = {
    **COMMON_ENV,
    "NCCL_IB_DISABLE": "0",  # inter-node traffic over InfiniBand
    "NCCL_NVLS_ENABLE": "0",  # NVLink SHARP buffers cost GPU memory that vLLM and the teacher need
    "TORCH_NCCL_AVOID_RECORD_STREAMS": "1",  # frees collective buffers earlier
    "NCCL_DEBUG": "WARN",
    "HF_HUB_OFFLINE": "1",  # compute nodes: hf_path and data= are paths on the shared filesystem
    "HF_DATASETS_OFFLINE": "1",
}
CACHE_ENV = {  # name -> folder under the run's cache dir (shared storage: every node and every job sees one cache)
    "HF_HOME": "huggingface",
    "VLLM_CACHE_ROOT": "vllm",  # torch.compile artefacts and CUDA graphs' inputs of the vLLM engines
    "TRITON_CACHE_DIR": "triton",
    "TORCHINDUCTOR_CACHE_DIR": "torchinductor",
}


@dataclass(frozen=True)
class WorkEstimate:
    """Wall time of a recipe's GPU work on its presets, for the Slurm time limits (not yet measured on GPUs: the
    train step from the issue's 30-40 s estimate at 8B, the rest from bandwidth arithmetic; a margin is added)."""

    seconds_per_step: float
    """One optimizer step: rollout + scoring + update + weight sync."""
    seconds_per_checkpoint: float
    """One save (≈ 115 GB at 8B: bf16 weights + fp32 master + Adam moments under the distributed optimizer)."""
    startup_seconds: float = 900.0
    """Per job: container start, model build, checkpoint load, vLLM start and first weight sync."""
    eval_tokens_per_second_per_gpu: float = 1000.0
    """Generated tokens per second of one vLLM engine (one GPU) at long completions."""
    margin: float = 1.25
    """Every estimate is multiplied by this."""


def _hms(seconds: float) -> str:
    minutes = max(1, math.ceil(seconds / 60))
    return f"{minutes // 60:02d}:{minutes % 60:02d}:00"


def _seconds(hms: str) -> int:
    """'HH:MM:SS' or 'D-HH:MM:SS' -> seconds (Slurm's --time forms used here)."""
    days, _, rest = hms.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if len(parts) != 3:
        raise ConfigError(f"time={hms!r}: expected HH:MM:SS or D-HH:MM:SS")
    return int(days or 0) * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]


@dataclass(frozen=True)
class Layout:
    """One parallelism preset: how TP x PP x DP map onto `nodes` machines of `gpus_per_node` devices."""

    nodes: int
    tp: int
    pp: int
    micro_batch_size: int
    """Prompts per micro-batch per DP rank (`TrainConfig.micro_batch_size`)."""
    gpus_per_node: int = 8

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def dp(self) -> int:
        """Data-parallel size (derived): world_size / (tp * pp)."""
        return ParallelConfig(tp=self.tp, pp=self.pp).data_parallel_size(self.world_size)

    def train_overrides(self) -> list[str]:
        return [f"parallel.tp={self.tp}", f"parallel.pp={self.pp}", f"micro_batch_size={self.micro_batch_size}"]


@dataclass(frozen=True)
class Recipe:
    """A model's run: its YAML config, default weights, checkpoint dtype, presets and default steps."""

    name: str
    config: str
    """Training YAML, relative to the repository root (the working directory of every step)."""
    hf_path: str
    """Default HF checkpoint directory (`hf_path=` overrides it; Slurm: a path on the shared filesystem);
    '{workdir}' is replaced by the run's workdir."""
    dtype: Literal["bf16", "fp32"]
    """Storage dtype of the converted start checkpoint (the config's model.dtype)."""
    layouts: dict[int, Layout]
    """Parallelism presets by node count."""
    steps: tuple[str, ...] = ("convert_in", "train", "convert_out", "evaluate")
    eval_data: str = ""
    """Default `evaluate --data` jsonl (problem, answer); empty = the user passes eval_data= or evaluate is skipped."""
    eval_args: tuple[str, ...] = ()
    """Default extra `python -m avsd_megatron evaluate` arguments (the user's eval_args= come after them)."""
    work: WorkEstimate = WorkEstimate(seconds_per_step=40.0, seconds_per_checkpoint=300.0)
    """Wall-time estimates that size the Slurm jobs' time limits and the number of chained training jobs."""
    plan_model: str = ""
    """Shapes the planner uses when hf_path has no config.json yet (a `training.plan.QWEN3_SIZES` key or 'tiny')."""


def _layouts(*layouts: Layout) -> dict[int, Layout]:
    return {layout.nodes: layout for layout in layouts}


# Evaluation of the Qwen3 recipes (spec 5.2 sampling: T 0.7, top-p 0.95; 16 samples, thinking on; one vLLM engine per
# GPU of the evaluation node, the problems sharded over them).
QWEN3_EVAL_ARGS = ("--engine", "vllm", "--k", "16", "--thinking", "on", "--max-new-tokens", "32768")

RECIPES = {
    "qwen3_8b": Recipe(
        "qwen3_8b", "examples/configs/qwen3_8b.yaml", "models/Qwen3-8B", "bf16",
        _layouts(Layout(1, tp=2, pp=1, micro_batch_size=4), Layout(2, tp=2, pp=1, micro_batch_size=4),
                 Layout(4, tp=2, pp=1, micro_batch_size=2)),
        eval_args=QWEN3_EVAL_ARGS, plan_model="Qwen3-8B",
    ),
    "qwen3_4b": Recipe(  # the paper's math setting (qwen3_8b.yaml) with the 4B weights and layouts
        "qwen3_4b", "examples/configs/qwen3_8b.yaml", "models/Qwen3-4B", "bf16",
        _layouts(Layout(1, tp=1, pp=1, micro_batch_size=4), Layout(2, tp=1, pp=1, micro_batch_size=2),
                 Layout(4, tp=1, pp=1, micro_batch_size=1)),
        eval_args=QWEN3_EVAL_ARGS, work=WorkEstimate(seconds_per_step=25.0, seconds_per_checkpoint=150.0),
        plan_model="Qwen3-4B",
    ),
    "tiny_cpu": Recipe(
        "tiny_cpu", "examples/configs/tiny_cpu.yaml", "{workdir}/hf_init", "fp32",
        _layouts(Layout(1, tp=1, pp=1, micro_batch_size=2, gpus_per_node=2)),
        steps=("tiny_init", "convert_in", "train", "convert_out", "evaluate"),
        eval_data="avsd_megatron/data/assets/tiny_math/heldout.jsonl",
        eval_args=("--limit", "4", "--k", "1", "--max-new-tokens", "16"), plan_model="tiny",
        work=WorkEstimate(seconds_per_step=10.0, seconds_per_checkpoint=5.0, startup_seconds=60.0,
                          eval_tokens_per_second_per_gpu=50.0),
    ),
}
PRESETS = {name: recipe.layouts for name, recipe in RECIPES.items()}


@dataclass(frozen=True)
class Plan:
    """The resolved paths and arguments every step command is built from."""

    recipe: Recipe
    layout: Layout
    workdir: str
    hf_path: str
    megatron_checkpoint: str
    train_overrides: tuple[str, ...]
    """The trainer's --set items after the recipe's own (layout, data=): the user's, which win."""
    eval_data: str
    eval_args: tuple[str, ...]
    cfg: TrainConfig
    """The training config as the train step will resolve it (layout, data= and the user's overrides applied)."""
    data: tuple[str, ...] = ()
    """data= sources (jsonl / parquet files on shared storage); empty = the config's data.sources."""
    cache_dir: str = ""
    """HF_HOME, vLLM, Triton and TorchInductor caches go under it (CACHE_ENV); default <workdir>/cache."""
    eval_problems: int = 0
    """Problems the evaluation runs (its time limit); 0 = count eval_data's lines."""

    @property
    def train_dir(self) -> str:
        return f"{self.workdir}/train"

    @property
    def checkpoint_root(self) -> str:
        """The trainer's checkpoint root: checkpoint.dir if overridden, else <train_dir>/checkpoints."""
        for item in reversed(self.train_overrides):
            if item.startswith("checkpoint.dir="):
                return item.partition("=")[2]
        return f"{self.train_dir}/checkpoints"

    @property
    def hf_out(self) -> str:
        return f"{self.workdir}/hf"


# ----------------------------------------------------------------------------------------------------------------
# Steps: each returns the NeMo-Run task; `kind` picks the executor ("util": one process, "train": torchrun,
# "eval": one process on a whole GPU node, one vLLM engine per GPU).


def _tiny_init(plan: Plan) -> run.Script:
    hf = shlex.quote(plan.hf_path)
    return run.Script(inline=(
        f'if [ -f {hf}/config.json ]; then echo "tiny_init: {hf} exists, kept"; '
        f"else python -m avsd_megatron tiny checkpoint {hf}; fi\n"
    ))


def _convert_in(plan: Plan) -> run.Script:
    out, hf = shlex.quote(plan.megatron_checkpoint), shlex.quote(plan.hf_path)
    return run.Script(inline=(
        f'if [ -f {out}/metadata.json ]; then echo "convert_in: {out} exists (converted before), kept"; '
        f"else python tools/convert_checkpoint.py hf-to-megatron --hf {hf} --out {out} "
        f"--tp {plan.layout.tp} --pp {plan.layout.pp} --dtype {plan.recipe.dtype}; fi\n"
    ))


def _train_overrides(plan: Plan) -> list[str]:
    """The train step's --set items: paths, the preset's layout, then the user's (later items win)."""
    overrides = [f"output_dir={plan.train_dir}", f"model.hf_path={plan.hf_path}", *plan.layout.train_overrides()]
    if plan.megatron_checkpoint:
        overrides.append(f"model.megatron_checkpoint={plan.megatron_checkpoint}")
    overrides += _data_overrides(plan.data)
    return overrides + list(plan.train_overrides)  # the user's win: later --set items override earlier ones


def _train(plan: Plan) -> run.Script:
    return run.Script(path="avsd_megatron", m=True, entrypoint="python",
                      args=["train", "--config", plan.recipe.config, "--no-progress", "--set", *_train_overrides(plan)])


def _data_overrides(data: tuple[str, ...]) -> list[str]:
    import json

    return [f"data.sources={json.dumps(list(data))}"] if data else []


def _convert_out(plan: Plan) -> run.Script:
    ckpt, hf, out = shlex.quote(plan.checkpoint_root), shlex.quote(plan.hf_path), shlex.quote(plan.hf_out)
    final = step_dir_name(plan.cfg.max_steps)
    return run.Script(inline=(
        "set -e\n"
        f"step=$(cat {ckpt}/latest) || "
        f'{{ echo "convert_out: no {ckpt}/latest: training saved nothing" >&2; exit 1; }}\n'
        # it runs after the last training job whatever that job's end (afterany): refuse an unfinished run
        f'if [ "$step" != {final} ]; then echo "convert_out: training stopped at $step, not {final} '
        f'(max_steps={plan.cfg.max_steps}); run the same command again to resume it" >&2; exit 1; fi\n'
        f'if [ -f {out}/"$step"/config.json ]; then echo "convert_out: {out}/$step exists, kept"; '
        f'else python tools/convert_checkpoint.py megatron-to-hf --megatron {ckpt}/"$step" --out {out}/"$step" '
        f"--hf-reference {hf}; fi\n"
        f'ln -sfn "$step" {out}/latest\n'
    ))


def _evaluate(plan: Plan) -> run.Script:
    return run.Script(path="avsd_megatron", m=True, entrypoint="python",
                      args=["evaluate", "--hf", f"{plan.hf_out}/latest", "--data", plan.eval_data, "--out",
                            f"{plan.workdir}/eval.json", "--no-progress", *plan.recipe.eval_args, *plan.eval_args])


STEP_BUILDERS = {
    "tiny_init": (_tiny_init, "util"),
    "convert_in": (_convert_in, "util"),
    "train": (_train, "train"),
    "convert_out": (_convert_out, "util"),
    "evaluate": (_evaluate, "eval"),
}


# ----------------------------------------------------------------------------------------------------------------
# Executors


@dataclass(frozen=True)
class SlurmSettings:
    """What `run.SlurmExecutor` needs beyond the layout."""

    account: str
    partition: str
    container_image: str
    container_mounts: tuple[str, ...] = ()
    time: str = "04:00:00"
    """The longest time limit a job may ask for (the partition's MaxTime, HH:MM:SS or D-HH:MM:SS). Each job's
    limit is sized from the work (`Recipe.work`) up to this; training longer than one job is split over chained
    jobs that resume from the last checkpoint."""
    util_time: str = "01:00:00"
    """Time limit of the convert jobs."""
    job_dir: str = ""
    """Where NeMo-Run writes sbatch scripts and logs (shared filesystem); default <workdir>/nemo_run."""
    ssh_host: str = ""
    """Submit from this machine through an SSHTunnel; empty = run sbatch here (LocalTunnel, e.g. a login node)."""
    ssh_user: str = ""
    socket_ifname: str = ""
    """The nodes' network interface for bootstrap and gloo traffic (GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME),
    e.g. ib0 or eth0 (`ip -br addr` on a compute node); needed with nodes > 1 unless env= sets both."""
    env: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        for name in ("account", "partition", "container_image"):
            if not getattr(self, name):
                raise ConfigError(
                    f"executor=slurm needs {name}=... (container_image: an image built from docker/Dockerfile, e.g. "
                    "an enroot .sqsh file or a registry tag Pyxis can pull)"
                )
        for name in ("time", "util_time"):
            _seconds(getattr(self, name))


@dataclass(frozen=True)
class SlurmPlan:
    """The sized Slurm jobs of a plan: time limits and how many chained training jobs."""

    train_jobs: int
    train_time: str
    eval_time: str
    train_seconds: float
    """Estimated training work (steps + checkpoints, margin included), not counting per-job start-up."""
    eval_seconds: float


def size_slurm_jobs(plan: Plan, settings: SlurmSettings, *, evaluate: bool = True) -> SlurmPlan:
    """Time limits from the work: max_steps x seconds_per_step + saves x seconds_per_checkpoint (x margin), split
    over as many jobs of at most `settings.time` as it takes, each paying the start-up again; the evaluation from
    problems x k x max_new_tokens over the node's GPUs (a long-completion upper bound)."""
    work, cfg = plan.recipe.work, plan.cfg
    saves = cfg.max_steps // cfg.checkpoint.save_every if cfg.checkpoint.save_every else 0
    train = work.margin * (cfg.max_steps * work.seconds_per_step + (saves + 1) * work.seconds_per_checkpoint)
    cap = _seconds(settings.time)
    usable = cap - work.startup_seconds
    if usable < max(work.seconds_per_step, work.seconds_per_checkpoint) * 2:
        raise ConfigError(f"time={settings.time}: shorter than a job's start-up ({work.startup_seconds:.0f} s) plus "
                          "two steps; ask for a longer limit")
    jobs = max(1, math.ceil(train / usable))
    train_limit = min(cap, work.startup_seconds + train / jobs)
    evaluation = _eval_seconds(plan, work) if evaluate else 0.0
    return SlurmPlan(jobs, _hms(train_limit), _hms(min(cap, work.startup_seconds + evaluation)), train, evaluation)


def _eval_seconds(plan: Plan, work: WorkEstimate) -> float:
    args = parse_eval_args(["--hf", "-", "--data", "-", *plan.recipe.eval_args, *plan.eval_args])
    problems = plan.eval_problems or _count_rows(plan.eval_data)
    if args.limit is not None:
        problems = min(problems, args.limit)
    gpus = args.gpus or plan.layout.gpus_per_node
    tokens = problems * args.k * args.max_new_tokens
    return work.margin * tokens / (work.eval_tokens_per_second_per_gpu * min(gpus, max(problems, 1)))


def _count_rows(path: str) -> int:
    try:
        with open(path, encoding="utf-8") as f:
            return sum(1 for line in f if line.strip())
    except OSError as err:
        raise ConfigError(f"eval_data={path!r} is not readable here ({err.strerror}), so the evaluation's time "
                          "limit cannot be sized from it; pass eval_problems=N") from None


def _slurm_executors(settings: SlurmSettings, plan: Plan, sized: SlurmPlan) -> dict[str, Any]:
    layout = plan.layout
    job_dir = settings.job_dir
    tunnel = (run.SSHTunnel(host=settings.ssh_host, user=settings.ssh_user, job_dir=job_dir) if settings.ssh_host
              else run.LocalTunnel(job_dir=job_dir))
    env = {**SLURM_ENV, **_cache_env(plan)}
    if settings.socket_ifname:
        env |= {"GLOO_SOCKET_IFNAME": settings.socket_ifname, "NCCL_SOCKET_IFNAME": settings.socket_ifname}
    env |= dict(settings.env)
    if layout.nodes > 1 and "GLOO_SOCKET_IFNAME" not in env:
        raise ConfigError(
            f"nodes={layout.nodes}: Megatron and vLLM open gloo groups across nodes, which need the interface the "
            "nodes reach each other on: pass socket_ifname=IFACE (e.g. ib0; `ip -br addr` on a compute node), which "
            "sets GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME"
        )
    common = dict(account=settings.account, partition=settings.partition, container_image=settings.container_image,
                  container_mounts=list(settings.container_mounts), env_vars=env, tunnel=tunnel,
                  job_name_prefix=f"{settings.account}-avsd-{plan.recipe.name}.")  # NeMo's default repeats account
    # GPU jobs take whole nodes and all of their memory (mem=0): the frozen teacher's host copy is ≈ 15 GiB per
    # rank at 8B TP2 (hook/teacher_kinds.py), vLLM's level-1 sleep keeps another copy, and a cluster's default
    # memory per job would OOM-kill them.
    gpu_node = dict(gpus_per_node=layout.gpus_per_node, exclusive=True, mem="0")

    def train(index: int) -> Any:
        # the 2nd, 3rd, ... training job starts whatever the previous one's end (a TIMEOUT is not "ok") and resumes
        return run.SlurmExecutor(**common, **gpu_node, nodes=layout.nodes, ntasks_per_node=layout.gpus_per_node,
                                 time=sized.train_time, launcher="torchrun",
                                 dependency_type="afterany" if index else "afterok")

    return {
        "train": train,
        "util": lambda: run.SlurmExecutor(**common, nodes=1, ntasks_per_node=1, time=settings.util_time),
        # after the last training job, however it ended: it refuses an unfinished run itself
        "convert_out": lambda: run.SlurmExecutor(**common, nodes=1, ntasks_per_node=1, time=settings.util_time,
                                                 dependency_type="afterany"),
        "eval": lambda: run.SlurmExecutor(**common, **gpu_node, nodes=1, ntasks_per_node=1, time=sized.eval_time),
    }


def _cache_env(plan: Plan) -> dict[str, str]:
    return {name: f"{plan.cache_dir}/{folder}" for name, folder in CACHE_ENV.items()}


def _local_executors(nproc_per_node: int, env: dict[str, str]) -> dict[str, Any]:
    env = {**COMMON_ENV, **env}
    return {
        "train": lambda index: run.LocalExecutor(ntasks_per_node=nproc_per_node, launcher="torchrun",
                                                 env_vars=dict(env)),
        "util": lambda: run.LocalExecutor(env_vars=dict(env)),
        "convert_out": lambda: run.LocalExecutor(env_vars=dict(env)),
        "eval": lambda: run.LocalExecutor(env_vars=dict(env)),
    }


# ----------------------------------------------------------------------------------------------------------------
# The experiment


def make_plan(
    recipe: Recipe,
    *,
    nodes: int,
    workdir: str = "",
    hf_path: str = "",
    megatron_checkpoint: str = "",
    steps: tuple[str, ...] = (),
    train_overrides: tuple[str, ...] = (),
    eval_data: str = "",
    eval_args: tuple[str, ...] = (),
    gpus_per_node: Optional[int] = None,
    data: tuple[str, ...] = (),
    cache_dir: str = "",
    eval_problems: int = 0,
) -> tuple[Plan, tuple[str, ...]]:
    """Resolve a recipe's arguments into a `Plan` and its ordered step names. Raises ConfigError naming the
    argument: unknown step, no preset for `nodes`, a layout the config's batch does not divide, a bad override, a
    data= file of another format."""
    if nodes not in recipe.layouts:
        raise ConfigError(f"nodes={nodes}: recipe {recipe.name!r} has presets for nodes in {sorted(recipe.layouts)}")
    layout = recipe.layouts[nodes]
    if gpus_per_node is not None:
        layout = dataclasses.replace(layout, gpus_per_node=gpus_per_node)
    bad = [d for d in data if Path(d).suffix.lower() not in LOCAL_FORMATS]
    if bad:
        raise ConfigError(f"data={list(data)}: {bad} are not {'/'.join(LOCAL_FORMATS)} files")
    workdir = (workdir or f"outputs/avsd/{recipe.name}").rstrip("/")
    cfg = apply_overrides(load_config(recipe.config),
                          [f"output_dir={workdir}/train", *layout.train_overrides(), *_data_overrides(tuple(data)),
                           *train_overrides])
    cfg = dataclasses.replace(cfg, parallel=ParallelConfig(tp=layout.tp, pp=layout.pp))
    cfg.num_microbatches(layout.world_size)  # the preset must divide the config's batch

    chosen = tuple(steps) or recipe.steps
    unknown = [s for s in chosen if s not in STEPS]
    if unknown:
        raise ConfigError(f"steps={list(chosen)}: unknown {unknown}; choose from {STEPS}")
    if megatron_checkpoint and "convert_in" in chosen:
        chosen = tuple(s for s in chosen if s != "convert_in")  # given start weights: nothing to convert
    if not megatron_checkpoint and "convert_in" in chosen:
        megatron_checkpoint = f"{workdir}/megatron_init"
    hf_path = hf_path or recipe.hf_path.format(workdir=workdir)
    plan = Plan(recipe, layout, workdir, hf_path, megatron_checkpoint, tuple(train_overrides),
                eval_data or recipe.eval_data, tuple(eval_args), cfg, tuple(data), cache_dir or f"{workdir}/cache",
                eval_problems)
    return plan, tuple(s for s in STEPS if s in chosen)  # always in pipeline order


def plan_layout(plan: Plan, *, gpu: str = "h100-80gb", time_limit: str | None = None) -> Estimate:
    """The planner's estimate of the train step exactly as it will run (`training.plan.plan_run` on the recipe's
    config with the train step's --set items), shapes from hf_path's config.json or else `Recipe.plan_model`."""
    cfg = apply_overrides(load_config(plan.recipe.config), _train_overrides(plan))
    has_config = (Path(plan.hf_path) / "config.json").is_file()
    return plan_run(cfg, nodes=plan.layout.nodes, gpus_per_node=plan.layout.gpus_per_node, gpu=gpu,
                    model=None if has_config or not plan.recipe.plan_model else plan.recipe.plan_model,
                    time_limit=time_limit)


def presets_markdown(gpu: str = "h100-80gb") -> str:
    """The presets with the planner's predicted peak GPU memory and step time (README "Launch with NeMo-Run")."""
    lines = ["| recipe | nodes × GPUs | TP | PP | DP | micro-batch | micro-batches/step | predicted peak GiB/GPU "
             f"({gpu}) | predicted step (s) | predicted run (h) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, recipe in RECIPES.items():
        if name == "tiny_cpu":
            continue
        for nodes, layout in recipe.layouts.items():
            plan, _ = make_plan(recipe, nodes=nodes, workdir=f"outputs/avsd/{name}")
            est = plan_layout(plan, gpu=gpu)
            lines.append(f"| {name} | {nodes} × {layout.gpus_per_node} | {est.tp} | {est.pp} | {est.dp} | "
                         f"{est.micro_batch_size} | {est.num_microbatches} | {est.peak_gib:.1f} ({est.peak_phase}) | "
                         f"{est.step_seconds['total']:.0f} | {est.run['hours']:.1f} |")
    return "\n".join(lines)


def build_tasks(
    recipe: Recipe,
    *,
    executor: Literal["local", "slurm"] = "local",
    nodes: int = 1,
    nproc_per_node: Optional[int] = None,
    slurm: SlurmSettings | None = None,
    env: Optional[dict[str, str]] = None,
    gpu: str = "h100-80gb",
    allow_no_fit: bool = False,
    **plan_kwargs: Any,
) -> list[tuple[str, run.Script, Any]]:
    """(step name, task, executor) per job, in pipeline order: what `launch` adds to one `run.Experiment`. On Slurm
    the training step may be several chained jobs (`train`, `train_2`, ...; `size_slurm_jobs`).

    With a train step, the planner runs first and prints its table (GPU type `gpu`; Slurm: checked against the
    time limit); a layout that does not fit raises ConfigError naming the phases, unless `allow_no_fit`."""
    plan, steps = make_plan(recipe, nodes=nodes, gpus_per_node=nproc_per_node, **plan_kwargs)
    if "train" in steps:
        estimate = plan_layout(plan, gpu=gpu, time_limit=slurm.time if executor == "slurm" and slurm else None)
        print(format_table(estimate))
        if not estimate.fits:
            failures = "; ".join(estimate.failures())
            if not allow_no_fit:
                raise ConfigError(f"the plan says this layout does not fit on {gpu}: {failures}; change the "
                                  "layout (nodes=, train_overrides=[...]) or pass allow_no_fit=true to submit anyway")
            print(f"warning: allow_no_fit=true: submitting a layout the plan says does not fit: {failures}")
        if estimate.run["fits_time_limit"] is False:
            print(f"note: the plan's run time {estimate.run['hours']} h exceeds one job's limit {slurm.time}: the "
                  "training is split over chained jobs that resume (checkpoint.resume=auto)")
    skip = None
    if "evaluate" in steps and importlib.util.find_spec(EVAL_MODULE) is None:
        skip = f"{EVAL_MODULE} is not in this checkout"
    elif "evaluate" in steps and not plan.eval_data:
        skip = "no eval_data=FILE.jsonl given (problem/answer rows, see avsd_megatron/pipelines/evaluate.py)"
    if skip:
        print(f"evaluate: skipped: {skip}; pass steps=[...] without evaluate to silence this")
        steps = tuple(s for s in steps if s != "evaluate")
    train_jobs = 1
    if executor == "slurm":
        if slurm is None:
            raise ConfigError("executor=slurm needs account=, partition= and container_image=")
        if "train" in steps:
            _refuse_hub_sources(plan)
        if not slurm.job_dir:
            slurm = dataclasses.replace(slurm, job_dir=f"{plan.workdir}/nemo_run")
        sized = size_slurm_jobs(plan, slurm, evaluate="evaluate" in steps)
        train_jobs = sized.train_jobs
        print(f"slurm: training ≈ {sized.train_seconds / 3600:.1f} h of work in {sized.train_jobs} chained job(s) of "
              f"{sized.train_time}; evaluation limit {sized.eval_time} (estimates: Recipe.work)")
        executors = _slurm_executors(slurm, plan, sized)
    elif executor == "local":
        executors = _local_executors(plan.layout.gpus_per_node, env or {})
    else:
        raise ConfigError(f"executor={executor!r} is not one of ('local', 'slurm')")
    tasks = []
    for step in steps:
        build, kind = STEP_BUILDERS[step]
        if step == "train":
            for index in range(train_jobs):
                tasks.append(("train" if index == 0 else f"train_{index + 1}", build(plan), executors["train"](index)))
        else:
            tasks.append((step, build(plan), executors["convert_out" if step == "convert_out" else kind]()))
    return tasks


def _refuse_hub_sources(plan: Plan) -> None:
    hub = [s for s in plan.cfg.data.sources if not Path(s).suffix.lower() in LOCAL_FORMATS]
    if hub:
        raise ConfigError(
            f"executor=slurm: data.sources {hub} name Hub datasets, but the compute nodes run with HF_HUB_OFFLINE=1 "
            "and reach no Hub; export them to jsonl/parquet on the shared filesystem (README: first cluster run) "
            "and pass data=[/shared/path.jsonl]"
        )


def launch(ctx: Any, recipe_name: str, **kwargs: Any) -> None:
    """Build the experiment and run it (or dry-run it) as the NeMo-Run CLI context says."""
    recipe = RECIPES[recipe_name]
    if kwargs["executor"] == "slurm":
        kwargs["slurm"] = SlurmSettings(
            account=kwargs.pop("account"), partition=kwargs.pop("partition"),
            container_image=kwargs.pop("container_image"), container_mounts=tuple(kwargs.pop("container_mounts")),
            time=kwargs.pop("time"), ssh_host=kwargs.pop("ssh_host"), ssh_user=kwargs.pop("ssh_user"),
            socket_ifname=kwargs.pop("socket_ifname"), env=tuple(kwargs.pop("env").items()),
        )
    else:
        for name in ("account", "partition", "container_image", "container_mounts", "time", "ssh_host", "ssh_user",
                     "socket_ifname"):
            kwargs.pop(name)
    for name in ("steps", "train_overrides", "eval_args", "data"):
        kwargs[name] = tuple(kwargs[name] or ())
    try:
        tasks = build_tasks(recipe, **kwargs)
    except ConfigError as exc:  # NeMo-Run's CLI would print it and still exit 0
        raise SystemExit(f"error: {exc}") from exc
    with run.Experiment(f"avsd-{recipe.name}", executor=tasks[0][2], log_level="INFO") as exp:
        for step, task, executor in tasks:
            exp.add(task, executor=executor, name=step)
        if ctx.dryrun:  # print every task's command / sbatch script; submit nothing
            exp.dryrun()
        else:  # not ctx.launch: it runs tasks "direct" (in this process, no torchrun) when no run.executor= is set
            exp.run(sequential=True, detach=ctx.detach, direct=ctx.direct, tail_logs=ctx.tail_logs)
            if kwargs["executor"] == "local" and not ctx.detach:
                _raise_on_failure(exp)


def _raise_on_failure(exp: Any) -> None:
    """Local runs: exit non-zero when a step failed. NeMo-Run has no dependencies between local tasks, so the later
    steps still ran; the first failure is the one to read."""
    for job in exp.jobs:
        if str(job.state) in ("SUBMITTED", "PENDING", "RUNNING"):  # a one-step experiment is not waited for
            job.wait(runner=exp._runner)
    states = {job.id: str(job.state) for job in exp.jobs}
    failed = [name for name, state in states.items() if state != "SUCCEEDED"]
    if failed:
        raise SystemExit(f"error: steps {failed} did not succeed ({states}); logs: "
                         f"nemo experiment logs {exp._id} <task index>")


def _entrypoint(recipe_name: str):
    """A `nemorun avsd <recipe_name>` / `run.cli.main` entry point; every recipe takes the same arguments."""

    def entry(
        ctx: run.cli.RunContext,
        executor: str = "local",
        nodes: int = 1,
        nproc_per_node: Optional[int] = None,
        workdir: str = "",
        hf_path: str = "",
        megatron_checkpoint: str = "",
        steps: Optional[list[str]] = None,
        train_overrides: Optional[list[str]] = None,
        eval_data: str = "",
        eval_args: Optional[list[str]] = None,
        account: str = "",
        partition: str = "",
        container_image: str = "",
        container_mounts: Optional[list[str]] = None,
        time: str = "04:00:00",
        ssh_host: str = "",
        ssh_user: str = "",
        socket_ifname: str = "",
        data: Optional[list[str]] = None,
        cache_dir: str = "",
        eval_problems: int = 0,
        env: Optional[dict[str, str]] = None,
        gpu: str = "h100-80gb",
        allow_no_fit: bool = False,
    ) -> None:
        launch(ctx, recipe_name, executor=executor, nodes=nodes, nproc_per_node=nproc_per_node, workdir=workdir,
               hf_path=hf_path, megatron_checkpoint=megatron_checkpoint, steps=steps,
               train_overrides=train_overrides, eval_data=eval_data, eval_args=eval_args, account=account,
               partition=partition,
               container_image=container_image, container_mounts=container_mounts or [], time=time,
               ssh_host=ssh_host, ssh_user=ssh_user, socket_ifname=socket_ifname, data=data, cache_dir=cache_dir,
               eval_problems=eval_problems, env=env or {}, gpu=gpu, allow_no_fit=allow_no_fit)

    recipe = RECIPES[recipe_name]
    entry.__name__ = entry.__qualname__ = recipe_name
    entry.__doc__ = (
        f"AVSD recipe {recipe_name}: steps {' -> '.join(recipe.steps)} ({recipe.config}).\n\n"
        "executor=local|slurm; nodes= picks the parallelism preset; data=[FILE.jsonl,...] the training rows (on Slurm: "
        "files on shared storage); train_overrides=[...] are the trainer's --set items; time= the longest job limit "
        "(the work is split over chained jobs); socket_ifname= the nodes' interface; gpu= is the GPU type the planner "
        "checks the layout on (allow_no_fit=true submits a layout it refuses); see avsd_megatron/pipelines/recipes.py."
    )
    return run.cli.entrypoint(entry, namespace="avsd", type="experiment")


qwen3_8b = _entrypoint("qwen3_8b")
qwen3_4b = _entrypoint("qwen3_4b")
tiny_cpu = _entrypoint("tiny_cpu")
