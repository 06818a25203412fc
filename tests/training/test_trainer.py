"""Tests for the AVSD trainer, its checkpoints and its CLI, on the bundled tiny Qwen3 / dataset on CPU.

Run: .venv/bin/python -m pytest -q tests/training/test_trainer.py                        (all, ~70 s on 2 idle cores)
     .venv/bin/python -m pytest -q tests/training/test_trainer.py -m "not integration"   (in-process only, seconds)

End to end (integration): the CLI (`python -m avsd_megatron train`, one process, TP1, converting the HF start
checkpoint itself, saving every step with keep_last=1) and TP2 / PP2 launches (2 gloo ranks) each run 2 steps of the
whole loop (rollout with HFEngine -> teacher scoring -> student update -> weight sync) and write finite metrics to
metrics.jsonl; their first loss equals TP1's (same weights, same samples). A saved checkpoint converts to HF
without a reference directory.

Resume: a run with save_every=1 takes 3 steps; the save of step 3 is made to fail half-way (after the shards,
before the rename), so `latest` must still name step 2 and every `step_*` directory must be complete. A fresh
trainer resuming from step 1's checkpoint (saving into the same root, which clears the interrupted save) must
reproduce the losses and gradient norms of steps 2 and 3 within 1e-6 (step 3 depends on the restored Adam moments
and step count); once with the frozen teacher and the distributed optimizer, once with a fast EMA teacher and
Megatron's plain optimizer. Resuming with another teacher kind is refused.

The baselines (single, consensus, arithmetic, sigmoid gate, candidate loss), rollout.n=2 and rollout.sync_every=2
each run through the unchanged trainer with finite losses; so does algorithm=grpo (scripted completions, rewards from
math-verify, no teacher pass). The code task (views reference, hint, feedback on the
bundled tiny code set; bubblewrap) runs 2 steps with a scripted engine that answers every prompt with its reference
program and a wrong one: each completion's feedback row must carry that completion's own sandbox outcome, the
status counts must be logged, and the losses finite; then a step with the real HF engine. Unit tests cover the bad
configs the trainer and CLI refuse, the `latest` fallback, and the prompt stream's order.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from avsd_megatron.testing import run_on_ranks
from avsd_megatron.training.checkpointing import CheckpointManager, find_latest
from avsd_megatron.training.config import ConfigError, from_dict, load_config, to_dict

ROOT = Path(__file__).resolve().parents[2]
TINY_YAML = ROOT / "examples" / "configs" / "tiny_cpu.yaml"
TINY_CODE_YAML = ROOT / "examples" / "configs" / "tiny_code_cpu.yaml"
LOSS_ATOL = 1e-6
TP_LOSS_ATOL = 1e-4  # TP2 vs TP1: same maths, different reduction order


SANDBOX_WALL_S = 30.0
"""Per-test wall limit of the code tests' sandbox. With tiny_code_cpu.yaml's 2 s, a TP2 run on 2 cores that were also
busy with other work counted 4 of its 8 programs as neither passed nor wrong_answer (Python starting in bubblewrap
is slow under load); the statuses, not the speed, are what these tests check."""


def _config(out_dir: Path, hf_dir: str, yaml: Path = TINY_YAML, **top) -> dict:
    """tiny_cpu.yaml (or `yaml`) made small: 4 prompts, 8 new tokens, 2 steps, a per-run output directory."""
    data = to_dict(load_config(yaml))
    data.update(output_dir=str(out_dir), prompts_per_step=4, micro_batch_size=2, max_steps=2)
    data["model"]["hf_path"] = hf_dir
    data["rollout"]["max_new_tokens"] = 8
    data["optim"]["distributed_optimizer"] = True
    data["logging"].update(log_every=1, generations_every=2)
    data["checkpoint"].update(save_every=0, keep_last=None, resume=None)
    for key, value in top.items():
        section, _, field = key.partition("__")
        (data[section].__setitem__(field, value) if field else data.__setitem__(section, value))
    return data


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> str:
    from avsd_megatron.data.tiny import make_tiny_hf_checkpoint

    return str(make_tiny_hf_checkpoint(tmp_path_factory.mktemp("tiny") / "hf_init"))


def _records(out_dir: Path) -> list[dict]:
    from avsd_megatron.training.metrics_log import read_jsonl_metrics

    return read_jsonl_metrics(out_dir)


def _assert_finite_records(records: list[dict], steps: int) -> None:
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    for r in records:
        for key in ("loss", "grad_norm", "lr", "mv_avsd_mean", "time/total"):
            assert isinstance(r[key], float) and math.isfinite(r[key]), (key, r[key])
        assert r["num_tokens"] > 0 and r["update_successful"]


# ----------------------------------------------------------------------------------------------------------------
# Rank functions (module level: launched ranks import them by name)
# ----------------------------------------------------------------------------------------------------------------


def train_rank(cfg_data: dict) -> list[dict]:
    """Install the CPU patches, build a Trainer from `cfg_data`, train to max_steps; return the step metrics."""
    from avsd_megatron.runtime import install
    from avsd_megatron.training.trainer import Trainer

    install()
    return Trainer(from_dict(cfg_data), progress=False).train()


def restore_kind_rank(cfg_data: dict) -> dict:
    """train_rank, and how the teacher restores θ (`teacher_kinds`: 'master' or 'swap')."""
    from avsd_megatron.runtime import install
    from avsd_megatron.training.trainer import Trainer

    install()
    trainer = Trainer(from_dict(cfg_data), progress=False)
    return {"restore": trainer.teacher.restore, "metrics": trainer.train(),
            "swap_tensors": len(trainer.teacher._swap)}


def interrupted_run_rank(cfg_data: dict) -> dict:
    """3 steps with save_every=1; the third save fails after the shards are written, before the rename."""
    import avsd_megatron.training.checkpointing as checkpointing
    from avsd_megatron.runtime import install
    from avsd_megatron.training.trainer import Trainer

    install()
    trainer = Trainer(from_dict(cfg_data), progress=False)
    metrics = [trainer.train_step(), trainer.train_step()]
    applied = {group["lr"] for opt in checkpointing._torch_optimizers(trainer.optimizer) for group in opt.param_groups}
    assert applied == {metrics[-1]["lr"]}, (applied, metrics[-1]["lr"])  # the schedule reaches torch's Adam

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("simulated kill during save")

    checkpointing.write_rank_state = killed
    try:
        trainer.train_step()
    except KeyboardInterrupt:
        pass
    else:
        raise AssertionError("the patched save did not fail")
    return {"metrics": metrics}


def baselines_rank(cfg_datas: list[dict]) -> list[float]:
    """max_steps steps per config, each in a fresh Trainer over the same (already initialised) parallel state;
    returns each config's last loss."""
    from avsd_megatron.runtime import install
    from avsd_megatron.training.trainer import Trainer

    install()
    losses = []
    for data in cfg_datas:
        trainer = Trainer(from_dict(data), progress=False)
        losses.append([trainer.train_step()["loss"] for _ in range(trainer.cfg.max_steps)][-1])
    return losses


def _scripted_completions(engine, prompt_token_ids, n, texts) -> list:
    """A scripted engine's completions: per prompt the first n of `texts(decoded prompt)`, each encoded and ended
    with the engine's EOS (real tokenizer, no sampling)."""
    from avsd_megatron.rollout.engine import Completion

    out = []
    for ids in prompt_token_ids:
        for text in texts(engine.tokenizer.decode(ids))[:n]:
            token_ids = engine.tokenizer.encode(text, add_special_tokens=False) + [engine.eos_token_ids[0]]
            out.append(Completion(tuple(token_ids), text, "stop"))
    return out


def grpo_train_rank(cfg_data: dict) -> dict:
    """algorithm=grpo on the tiny math set with a scripted engine: per prompt completion 0 boxes the right answer,
    completion 1 states it without a box (unparseable: the reward-hacking guard gives it the failure reward)."""
    from avsd_megatron.data.tiny import TINY_TRAIN_PATH, read_jsonl
    from avsd_megatron.rollout.hf_engine import HFEngine
    from avsd_megatron.runtime import install
    from avsd_megatron.training.trainer import Trainer

    answers = {row["problem"]: row["answer"] for row in read_jsonl(TINY_TRAIN_PATH)}

    def texts(prompt):
        (answer,) = [a for problem, a in answers.items() if f"Problem: {problem}\n" in prompt]
        return f"So it is \\boxed{{{answer}}}.", f"So it is {answer}."

    class ScriptedMathEngine(HFEngine):
        def generate(self, prompt_token_ids, params, seed, first_index=0):
            return _scripted_completions(self, prompt_token_ids, params.n, texts)

    install()
    cfg = from_dict(cfg_data)
    hf = HFEngine.from_pretrained(cfg.model.hf_path)
    trainer = Trainer(cfg, engine=ScriptedMathEngine(hf.model, hf.tokenizer), progress=False)
    scored = []
    trainer.score_teachers = lambda batch: scored.append(batch) or []  # must never run for GRPO
    metrics = trainer.train()
    return {"metrics": metrics, "scored": len(scored), "teacher_kind": trainer.teacher.kind}


def code_train_rank(cfg_data: dict, real_cfg_data: dict | None) -> dict:
    """`cfg_data` (data.task=code) for max_steps with a scripted engine (tests/training/test_trainer.py docstring), recording
    each step's completions and decoded feedback rows; then `real_cfg_data` (if given) with the real HF engine."""
    from avsd_megatron.rollout.hf_engine import HFEngine
    from avsd_megatron.runtime import install
    from avsd_megatron.training.trainer import Trainer

    class ScriptedCodeEngine(HFEngine):
        """Real weights and state machine; completion 0 of a prompt is its reference program, 1 a wrong one."""

        def __init__(self, *args, programs: dict[str, str], **kwargs):
            super().__init__(*args, **kwargs)
            self.programs = programs

        def generate(self, prompt_token_ids, params, seed, first_index=0):
            return _scripted_completions(self, prompt_token_ids, params.n, self.texts)

        def texts(self, prompt):
            (reference,) = [code for problem, code in self.programs.items() if f"Problem:\n{problem}\n" in prompt]
            return f"<final_code>\n```python\n{reference}```\n</final_code>", "print('wrong')"

    install()
    cfg = from_dict(cfg_data)
    hf = HFEngine.from_pretrained(cfg.model.hf_path)
    programs = {row["problem"]: row["reference_solution"] for row in _tiny_code_rows()}
    engine = ScriptedCodeEngine(hf.model, hf.tokenizer, programs=programs)
    trainer = Trainer(cfg, engine=engine, progress=False)
    feedback = cfg.avsd.views.index("feedback")
    steps, teacher_rows = [], trainer.task.teacher_rows

    def recording(examples, prompts, completions):
        rows = teacher_rows(examples, prompts, completions)
        steps.append({
            "problem_ids": [e.id for e in examples], "completions": [c.text for c in completions],
            "feedback_rows": [trainer.tokenizer.decode(ids[feedback]) for ids in rows.ids],
            "other_rows": [[ids[v] for v in range(len(ids)) if v != feedback] for ids in rows.ids],
        })
        return rows

    trainer.task.teacher_rows = recording
    metrics = trainer.train()
    real = None
    if real_cfg_data is not None:
        real = Trainer(from_dict(real_cfg_data), progress=False).train()  # same parallel state, the HF engine
    return {"metrics": metrics, "steps": steps, "real": real}


def _tiny_code_rows() -> list[dict]:
    from avsd_megatron.data.tiny import read_jsonl
    from avsd_megatron.data.tiny_code import TINY_CODE_TRAIN_PATH

    return read_jsonl(TINY_CODE_TRAIN_PATH)


def bad_layout_rank(cfg_data: dict) -> str:
    """Construct a Trainer that must refuse its config (layout, resume); return the error message."""
    from avsd_megatron.runtime import install
    from avsd_megatron.training.trainer import Trainer

    install()
    try:
        Trainer(from_dict(cfg_data), progress=False)
    except ConfigError as err:
        return str(err)
    raise AssertionError("Trainer accepted a bad layout")


# ----------------------------------------------------------------------------------------------------------------
# Unit tests (in process)
# ----------------------------------------------------------------------------------------------------------------


def test_cli_set_overrides_and_errors(tmp_path):
    from avsd_megatron.training.train import apply_overrides

    cfg = load_config(TINY_YAML)
    new = apply_overrides(cfg, ["max_steps=3", "parallel.tp=2", "avsd.views=[answer_only]", "optim.lr=1e-5"])
    assert (new.max_steps, new.parallel.tp, new.avsd.views, new.optim.lr) == (3, 2, ("answer_only",), 1e-5)
    with pytest.raises(ConfigError, match="unknown key 'optim.lrr'"):
        apply_overrides(cfg, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_overrides(cfg, ["max_steps"])
    with pytest.raises(ConfigError, match=r"rollout\.temperature"):
        apply_overrides(cfg, ["rollout.temperature=0"])
    with pytest.raises(ConfigError, match="'max_steps' is not a config section"):
        apply_overrides(cfg, ["max_steps.x=1"])


def test_cli_set_repeats_accumulate():
    from avsd_megatron.training.train import parse_args

    args = parse_args(["--config", "x.yaml", "--set", "max_steps=2", "optim.lr=1", "--set", "max_steps=3"])
    assert args.overrides == ["max_steps=2", "optim.lr=1", "max_steps=3"]


def test_cli_help_lists_options():
    proc = subprocess.run([sys.executable, "-m", "avsd_megatron", "train", "--help"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "--config" in proc.stdout and "--set" in proc.stdout
    assert "  optim.lr = 5e-06\n" in proc.stdout and "  data.task = 'math'\n" in proc.stdout  # every key listed


def test_checkpoint_resume_missing_path_names_field(tmp_path):
    manager = CheckpointManager(tmp_path / "ckpt", keep_last=2)
    assert manager.resolve(None) == (None, [])
    assert manager.resolve("auto") == (None, [])  # nothing saved yet: a fresh start
    with pytest.raises(FileNotFoundError, match=r"checkpoint\.resume="):
        manager.resolve(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match=r"checkpoint\.keep_last"):
        CheckpointManager(tmp_path, keep_last=0)


def test_checkpoint_find_latest_skips_incomplete(tmp_path):
    for step, complete in ((1, True), (2, True), (3, False)):
        d = tmp_path / f"step_{step:08d}"
        d.mkdir()
        if complete:
            (d / "trainer_state.json").write_text("{}")
    (tmp_path / "step_00000004.tmp").mkdir()
    (tmp_path / "step_00000004.tmp" / "trainer_state.json").write_text("{}")
    assert find_latest(tmp_path).name == "step_00000002"  # no `latest` file: newest complete
    (tmp_path / "latest").write_text("step_00000001\n")
    assert find_latest(tmp_path).name == "step_00000001"  # `latest` wins when it is complete
    (tmp_path / "latest").write_text("step_00000003\n")
    assert find_latest(tmp_path).name == "step_00000002"  # ... and is ignored when it is not


def test_prompt_stream_order_is_seeded_and_resumable():
    from avsd_megatron.training.trainer import PromptStream

    examples = list(range(10))
    encode = lambda e: None if e == 3 else f"p{e}"  # noqa: E731 - example 3 is "overlong"
    stream = PromptStream(examples, encode, seed=5)
    first = stream.take(4) + stream.take(4) + stream.take(4)  # crosses an epoch
    assert all(e != 3 for e, _ in first) and sorted(e for e, _ in first[:9]) == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    resumed = PromptStream(examples, encode, seed=5)
    resumed.take(4)
    again = PromptStream(examples, encode, seed=5, cursor=resumed.cursor)
    assert again.take(8) == first[4:]
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        PromptStream(examples, lambda e: None, seed=0).take(1)


# ----------------------------------------------------------------------------------------------------------------
# Integration tests
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_run(hf_dir, tmp_path_factory) -> Path:
    """`python -m avsd_megatron train` on tiny_cpu.yaml for 2 steps (one process, TP1); returns output_dir."""
    out = tmp_path_factory.mktemp("cli")
    overrides = [f"output_dir={out}", f"model.hf_path={hf_dir}", "max_steps=2", "prompts_per_step=4",
                 "rollout.max_new_tokens=8", "logging.generations_every=2", "checkpoint.resume=null",
                 "checkpoint.save_every=1", "checkpoint.keep_last=1",
                 "optim.distributed_optimizer=true"]
    proc = subprocess.run(
        [sys.executable, "-m", "avsd_megatron", "train", "--config", str(TINY_YAML), "--no-progress", "--set",
         *overrides], capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


@pytest.mark.integration
def test_trainer_cli_tp1_two_steps_writes_finite_metrics(cli_run):
    _assert_finite_records(_records(cli_run), 2)
    assert load_config(cli_run / "config.yaml").prompts_per_step == 4  # the resolved config, --set applied
    generations = (cli_run / "generations" / "step_2.jsonl").read_text().splitlines()
    assert len(generations) == 4 and all("completion" in json.loads(line) for line in generations)
    assert (cli_run / "megatron_init" / "hf_conversion.json").is_file()  # converted from model.hf_path
    root = cli_run / "checkpoints"
    assert find_latest(root).name == "step_00000002"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002"]  # keep_last=1 pruned step 1


def _error_lines(stderr: str) -> list[str]:
    """Our `error: ...` lines (libraries print their own import-time warnings to stderr too)."""
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def _train_cli(*overrides: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "avsd_megatron", "train", "--config", str(TINY_YAML), "--no-progress", "--set",
         "prompts_per_step=4", "rollout.max_new_tokens=8", "logging.generations_every=0", *overrides],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT,
    )


@pytest.mark.integration
def test_trainer_cli_refuses_a_fresh_run_into_another_runs_checkpoints(cli_run, hf_dir):
    """Issue 16.1 and 16.6: the tiny config's resume=null into a directory holding a run's checkpoints: one
    `error:` line naming the directory and the ways out, exit 2, nothing touched."""
    before = sorted(p.name for p in (cli_run / "checkpoints").iterdir())
    proc = _train_cli(f"output_dir={cli_run}", f"model.hf_path={hf_dir}", "checkpoint.resume=null", timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = _error_lines(proc.stderr)
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert str(cli_run / "checkpoints") in errors[0] and "checkpoint.overwrite=true" in errors[0]
    assert sorted(p.name for p in (cli_run / "checkpoints").iterdir()) == before


@pytest.mark.integration
def test_trainer_cli_refuses_to_resume_another_root_into_a_used_one(cli_run, hf_dir, tmp_path):
    """Resuming a checkpoint of root A while saving into root B that holds B's own run would mix the two in B."""
    import shutil

    shutil.copytree(cli_run / "checkpoints", tmp_path / "other" / "checkpoints")
    resume = cli_run / "checkpoints" / "step_00000002"
    proc = _train_cli(f"output_dir={tmp_path / 'other'}", f"model.hf_path={hf_dir}", f"checkpoint.resume={resume}",
                      timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = _error_lines(proc.stderr)
    assert len(errors) == 1 and f"resumes {resume}, which is not one of them" in errors[0], proc.stderr[-3000:]


def _copy_run_with_two_checkpoints(cli_run: Path, out: Path) -> Path:
    """out/checkpoints with cli_run's step 2 and a step 1 made from it (same weights; the trainer state says 1)."""
    import shutil

    root = out / "checkpoints"
    shutil.copytree(cli_run / "checkpoints", root)
    shutil.copytree(root / "step_00000002", root / "step_00000001")
    state_file = root / "step_00000001" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state.update(step=1, adam_step=1)
    state_file.write_text(json.dumps(state))
    return root


@pytest.mark.integration
def test_trainer_cli_resume_skips_a_corrupt_latest_and_says_what_it_resumed(cli_run, hf_dir, tmp_path):
    """Issue 16.3 and 16.8: `latest` (step 2) has a truncated shard: the run warns naming the file, resumes from step
    1, says so, warns that max_steps=3 (saved: 2) changes the LR schedule, trains steps 2-3 and saves step 3; the
    two bad rows of an extra source (data.on_bad_row=skip) are said once and logged every step."""
    root = _copy_run_with_two_checkpoints(cli_run, tmp_path / "run")
    bad = max((root / "step_00000002").glob("*.distcp"), key=lambda p: p.stat().st_size)
    with open(bad, "r+b") as f:
        f.truncate(100)
    bad_rows = tmp_path / "bad_rows.jsonl"  # with data.on_bad_row=skip: counted, said, logged
    bad_rows.write_text('{"problem": "no solution"}\n{"problem": "", "solution": "x"}\n', encoding="utf-8")
    sources = f"data.sources=[{ROOT / 'avsd_megatron/data/assets/tiny_math/train.jsonl'},{bad_rows}]"
    proc = _train_cli(f"output_dir={tmp_path / 'run'}", f"model.hf_path={hf_dir}", "checkpoint.resume=auto",
                      f"model.megatron_checkpoint={cli_run / 'megatron_init'}", "max_steps=3",
                      "checkpoint.save_every=0", "optim.distributed_optimizer=true", sources, "data.on_bad_row=skip")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "avsd: warning: data.on_bad_row=skip: skipped 2 of" in proc.stderr
    assert all(r["data/rows_skipped"] == 2 for r in _records(tmp_path / "run"))
    assert f"avsd: warning: skipped checkpoint {root / 'step_00000002'}" in proc.stderr and str(bad) in proc.stderr
    assert f"avsd: resumed from step 1 ({root / 'step_00000001'})" in proc.stderr
    assert "max_steps changed from 2" in proc.stderr and "to 3: the LR schedule" in proc.stderr
    assert [r["step"] for r in _records(tmp_path / "run")] == [2, 3]
    assert find_latest(root).name == "step_00000003"


@pytest.mark.integration
def test_trainer_cli_resume_past_max_steps_is_an_error_and_at_max_steps_says_so(cli_run, hf_dir, tmp_path):
    """Issue 16.8: a checkpoint at step 2 with max_steps=1 is an error before the model is built; with max_steps=2
    the run says there is nothing to train (exit 0, nothing written)."""
    root = _copy_run_with_two_checkpoints(cli_run, tmp_path / "run")
    common = (f"output_dir={tmp_path / 'run'}", f"model.hf_path={hf_dir}", "checkpoint.resume=auto",
              f"model.megatron_checkpoint={cli_run / 'megatron_init'}", "optim.distributed_optimizer=true")
    proc = _train_cli(*common, "max_steps=1", timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert _error_lines(proc.stderr)[0].startswith("error: max_steps=1 is below"), proc.stderr[-3000:]
    proc = _train_cli(*common, "max_steps=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = proc.stdout + proc.stderr  # train.finished_checkpoint: said before the model is built
    assert "nothing to train" in said and "step_00000002 is at max_steps=2" in said, said[-3000:]
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000001", "step_00000002"]


@pytest.mark.integration
def test_trainer_checkpoint_converts_to_hf_without_reference(cli_run, hf_dir, tmp_path):
    """A trainer checkpoint carries hf_conversion.json + hf_assets: megatron-to-hf needs no --hf-reference."""
    from safetensors.torch import load_file

    from avsd_megatron.convert import convert_megatron_to_hf

    out = convert_megatron_to_hf(cli_run / "checkpoints" / "step_00000002", tmp_path / "hf")
    assert (out / "tokenizer.json").is_file()
    trained, start = load_file(out / "model.safetensors"), load_file(Path(hf_dir) / "model.safetensors")
    assert {k: v.shape for k, v in trained.items()} == {k: v.shape for k, v in start.items()}
    assert any(not torch.equal(trained[k], start[k].to(trained[k].dtype)) for k in start)  # 2 steps moved it


@pytest.mark.integration
def test_trainer_refuses_layouts_that_do_not_fit_the_world(tmp_path, hf_dir):
    tp2_on_one_rank = _config(tmp_path, hf_dir, parallel__tp=2)
    assert "world size 1 is not a multiple of parallel.tp * parallel.pp = 2 * 1" in run_on_ranks(
        bad_layout_rank, 1, tp2_on_one_rank, timeout=120)[0]
    batch_over_dp = _config(tmp_path, hf_dir, prompts_per_step=2)  # dp=2 ranks x micro_batch_size 2 > 2 prompts
    messages = run_on_ranks(bad_layout_rank, 2, batch_over_dp, timeout=120)
    assert all("prompts_per_step=2 is not a multiple of micro_batch_size * dp = 2 * 2" in m for m in messages)


@pytest.mark.integration
def test_trainer_runs_the_baselines_unchanged(cli_run, hf_dir, tmp_path):
    """single / consensus / arithmetic targets, the sigmoid gate and the candidate loss need only AVSDConfig; two
    completions per prompt (rollout.n=2) and a stale engine (rollout.sync_every=2, 2 steps) run too."""
    variants = [
        {"avsd": {"mode": "single", "views": ["answer_only"]}, "max_steps": 1},
        {"avsd": {"mode": "consensus"}, "max_steps": 1},
        {"avsd": {"mode": "arithmetic"}, "max_steps": 1},
        {"avsd": {"mode": "avsd", "gate": "sigmoid"}, "max_steps": 1},
        {"avsd": {"loss": "candidate", "topk": 4}, "max_steps": 1},
        {"rollout": {"n": 2}, "max_steps": 1},
        {"rollout": {"sync_every": 2}, "max_steps": 2},
    ]
    datas = []
    for i, variant in enumerate(variants):
        data = _config(tmp_path / str(i), hf_dir)
        data["model"]["megatron_checkpoint"] = str(cli_run / "megatron_init")
        for key, value in variant.items():
            data[key].update(value) if isinstance(value, dict) else data.__setitem__(key, value)
        datas.append(data)
    losses = run_on_ranks(baselines_rank, 1, datas, timeout=300)[0]
    assert all(math.isfinite(loss) for loss in losses), losses
    assert len(set(losses)) == len(losses), losses  # each target gives its own loss on the same samples


@pytest.mark.integration
def test_trainer_runs_grpo_with_rewards_from_the_grader(cli_run, hf_dir, tmp_path):
    """algorithm=grpo, rollout.n=2, through the same trainer: rewards 1 (boxed right answer) and the failure reward
    (the same answer unboxed), advantages +-1 / (sqrt(2) + 1e-4), no teacher pass, a finite policy-gradient loss."""
    pytest.importorskip("math_verify")
    data = _config(tmp_path / "grpo", hf_dir, algorithm="grpo", rollout__n=2, grpo__failure_reward=-1.0)
    data["model"]["megatron_checkpoint"] = str(cli_run / "megatron_init")
    got = run_on_ranks(grpo_train_rank, 1, data, timeout=300)[0]
    assert got["scored"] == 0 and got["teacher_kind"] == "live"
    records = _records(tmp_path / "grpo")
    assert [r["step"] for r in records] == [1, 2]
    std = math.sqrt(2.0)  # Bessel std of {1, -1}
    for r in records:
        assert r["reward/mean"] == 0.0 and r["reward/std"] == pytest.approx(std)
        assert r["reward/correct_frac"] == 0.5 and r["reward/unparseable_frac"] == 0.5
        assert r["grpo/zero_variance_frac"] == 0.0
        assert r["grpo/advantage_abs_mean"] == pytest.approx(1.0 / (std + 1e-4))
        for key in ("loss", "grad_norm", "pg_student_logprob_mean", "time/rewards", "time/advantages"):
            assert math.isfinite(r[key]), key
        assert r["grad_norm"] > 0 and "mv_avsd_mean" not in r and "time/score_teachers" not in r
    generations = [json.loads(line) for line in (tmp_path / "grpo" / "generations" / "step_2.jsonl").read_text()
                   .splitlines()]
    assert {g["outcome"] for g in generations} == {"correct"} and all(g["reward"] == 1.0 for g in generations)


@pytest.mark.integration
@pytest.mark.parametrize(("tp", "pp"), [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_trainer_two_ranks_two_steps_match_tp1(cli_run, hf_dir, tmp_path, tp, pp):
    data = _config(tmp_path / "run", hf_dir, parallel__tp=tp, parallel__pp=pp)
    data["model"]["megatron_checkpoint"] = str(cli_run / "megatron_init")
    ranks = run_on_ranks(train_rank, 2, data, timeout=300)
    _assert_finite_records(_records(tmp_path / "run"), 2)
    assert ranks[0][0]["loss"] == ranks[1][0]["loss"]  # both ranks report the same reduced loss
    tp1 = _records(cli_run)
    assert abs(ranks[0][0]["loss"] - tp1[0]["loss"]) < TP_LOSS_ATOL


@pytest.mark.integration
@pytest.mark.parametrize(("teacher", "distributed_optimizer"), [("frozen", True), ("ema", False)])
def test_trainer_resume_reproduces_next_steps_and_interrupted_save_keeps_latest(
    cli_run, hf_dir, tmp_path, teacher, distributed_optimizer
):
    """frozen θ₀ + the distributed optimizer; the EMA teacher (restored from the rank state) + Megatron's plain
    fp32 optimizer."""
    avsd = {"avsd__teacher": teacher, "avsd__ema_decay": 0.5}  # a fast EMA: a lost ē would change the loss a lot
    first = _config(tmp_path / "a", hf_dir, max_steps=3, checkpoint__save_every=1,
                    optim__distributed_optimizer=distributed_optimizer, **avsd)
    first["model"]["megatron_checkpoint"] = str(cli_run / "megatron_init")
    run_on_ranks(interrupted_run_rank, 1, first, timeout=300)
    root = tmp_path / "a" / "checkpoints"
    assert find_latest(root).name == "step_00000002"
    assert (root / "latest").read_text().strip() == "step_00000002"
    assert not (root / "step_00000003").exists() and (root / "step_00000003.tmp").is_dir()
    uninterrupted = _records(tmp_path / "a")  # step 3's metrics were logged before its save failed

    second = _config(tmp_path / "b", hf_dir, max_steps=3, optim__distributed_optimizer=distributed_optimizer, **avsd)
    second["model"]["megatron_checkpoint"] = str(cli_run / "megatron_init")
    second["checkpoint"].update(resume=str(root / "step_00000001"), dir=str(root))  # saves into the same root
    resumed = run_on_ranks(train_rank, 1, second, timeout=300)[0]
    assert not (root / "step_00000003.tmp").exists()  # the next save removed the interrupted one
    assert find_latest(root).name == "step_00000003" and (root / "step_00000003" / "hf_conversion.json").is_file()
    assert [r["data/cursor"] for r in resumed] == [r["data/cursor"] for r in uninterrupted[1:]]
    for got, want in zip(resumed, uninterrupted[1:]):
        assert abs(got["loss"] - want["loss"]) <= LOSS_ATOL, (got["loss"], want["loss"])
        assert abs(got["grad_norm"] - want["grad_norm"]) <= LOSS_ATOL, (got["grad_norm"], want["grad_norm"])
    if teacher == "frozen":  # resuming with another teacher kind is refused
        second["avsd"]["teacher"] = "live"
        message = run_on_ranks(bad_layout_rank, 1, second, timeout=300)[0]
        assert "avsd.teacher='live' but" in message and "avsd.teacher='frozen'" in message


@pytest.mark.integration
def test_trainer_bf16_restores_theta_from_the_master_exactly_like_the_swap_and_resumes(hf_dir, tmp_path):
    """bf16 + the distributed optimizer: avsd.teacher_restore auto picks the fp32 master (no swap buffer); every step's
    loss and gradient norm equal a swap run's bit for bit, and a resume from step 1 passes the master check and
    reproduces step 2."""
    bf16 = {"model__dtype": "bfloat16", "checkpoint__save_every": 1}
    master = run_on_ranks(restore_kind_rank, 1, _config(tmp_path / "master", hf_dir, **bf16), timeout=300)[0]
    swap = run_on_ranks(restore_kind_rank, 1, _config(tmp_path / "swap", hf_dir, avsd__teacher_restore="swap",
                                                      **bf16), timeout=300)[0]
    assert (master["restore"], master["swap_tensors"], swap["restore"]) == ("master", 0, "swap")
    assert swap["swap_tensors"] > 0
    for got, want in zip(master["metrics"], swap["metrics"], strict=True):
        assert (got["loss"], got["grad_norm"]) == (want["loss"], want["grad_norm"])
    resume = _config(tmp_path / "resumed", hf_dir, **bf16)
    resume["checkpoint"].update(resume=str(tmp_path / "master" / "checkpoints" / "step_00000001"))
    resumed = run_on_ranks(restore_kind_rank, 1, resume, timeout=300)[0]
    assert resumed["restore"] == "master" and [r["step"] for r in _records(tmp_path / "resumed")] == [2]
    assert resumed["metrics"][0]["loss"] == master["metrics"][1]["loss"]


@pytest.mark.integration
@pytest.mark.bwrap
def test_trainer_code_task_feedback_rows_are_each_completions_own(hf_dir, tmp_path):
    """data.task=code, views reference / hint / feedback, TP1, rollout.n=2: per prompt its reference program (passes)
    and a wrong one; 2 steps with the scripted engine, then 1 with the real HF engine."""
    from avsd_megatron.data.examples import RowRef, code_example_from_row
    from avsd_megatron.data.views import feedback_payload
    from avsd_megatron.verify.sandbox import STATUSES, Sandbox, SandboxConfig

    data = _config(tmp_path / "code", hf_dir, yaml=TINY_CODE_YAML, rollout__n=2, sandbox__wall_time_s=SANDBOX_WALL_S)
    real = _config(tmp_path / "real", hf_dir, yaml=TINY_CODE_YAML, max_steps=1, sandbox__wall_time_s=SANDBOX_WALL_S)
    real["model"]["megatron_checkpoint"] = str(tmp_path / "code" / "megatron_init")  # converted by the first run
    got = run_on_ranks(code_train_rank, 1, data, real, timeout=300)[0]

    examples = {row["id"]: code_example_from_row(row, RowRef("train", i)) for i, row in enumerate(_tiny_code_rows())}
    sandbox = Sandbox(SandboxConfig(wall_time_s=5.0))
    assert len(got["steps"]) == 2
    for step in got["steps"]:
        assert len(step["completions"]) == 2 * len(step["problem_ids"]) == 8
        for e, (text, row) in enumerate(zip(step["completions"], step["feedback_rows"])):
            example = examples[step["problem_ids"][e // 2]]
            own = feedback_payload(text, example.public_tests, sandbox)  # recomputed here, independently
            assert own.status == ("passed", "wrong_answer")[e % 2]
            assert own.payload in row, (e, own.payload, row)
            other = feedback_payload(step["completions"][e ^ 1], example.public_tests, sandbox)
            assert other.payload not in row  # the row of the prompt's other completion is not this one's
        pairs = step["other_rows"]
        assert all(pairs[e] == pairs[e + 1] for e in range(0, 8, 2))  # reference / hint rows: per prompt

    records = _records(tmp_path / "code")
    _assert_finite_records(records, 2)
    for record in records:
        assert {f"feedback/{s}" for s in STATUSES} <= record.keys()
        assert (record["feedback/passed"], record["feedback/wrong_answer"], record["rollout/pass_rate"]) == (4, 4, 0.5)
        assert sum(record[f"feedback/{s}"] for s in STATUSES) == 8
        assert math.isfinite(record["mv_tinker_view_logprob_feedback"])
    lines = (tmp_path / "code" / "generations" / "step_2.jsonl").read_text().splitlines()
    generations = [json.loads(line) for line in lines]
    assert [g["feedback_status"] for g in generations] == ["passed"] * 4  # completion 0 of each prompt

    (last,) = got["real"]
    assert math.isfinite(last["loss"]) and sum(last[f"feedback/{s}"] for s in STATUSES) == 4


@pytest.mark.integration
@pytest.mark.parametrize("tp", [2, 1], ids=["tp2", "dp2"])
@pytest.mark.bwrap
def test_trainer_code_task_on_two_ranks_agrees_and_sums_feedback(hf_dir, tmp_path, tp):
    """data.task=code on 2 ranks: at TP2 only the first rank of the group runs the programs and both shards must build
    the same rows (same loss); at DP2 each rank runs its own prompts and the status counts are summed over DP."""
    from avsd_megatron.verify.sandbox import STATUSES

    data = _config(tmp_path / "code", hf_dir, yaml=TINY_CODE_YAML, rollout__n=2, max_steps=1, parallel__tp=tp,
                   sandbox__wall_time_s=SANDBOX_WALL_S)
    ranks = run_on_ranks(code_train_rank, 2, data, None, timeout=300)
    (record,) = _records(tmp_path / "code")
    _assert_finite_records([record], 1)
    assert ranks[0]["metrics"][0]["loss"] == ranks[1]["metrics"][0]["loss"]
    assert (record["feedback/passed"], record["feedback/wrong_answer"], record["rollout/pass_rate"]) == (4, 4, 0.5)
    assert sum(record[f"feedback/{s}"] for s in STATUSES) == 8
    rows = [rank["steps"][0]["feedback_rows"] for rank in ranks]
    if tp == 2:
        assert rows[0] == rows[1] and len(rows[0]) == 8  # one replica: identical teacher rows on both shards
    else:
        assert len(rows[0]) == len(rows[1]) == 4  # two replicas: half of the step's completions each


# ----------------------------------------------------------------------------------------------------------------
# Rollout seeds and engine sleep (Trainer.rollout / _after_generate on a stand-in trainer: no model needed)


class SeedRecordingEngine:
    """Records each call's per-prompt seeds exactly as HFEngine / VLLMEngine derive them, and its sleep levels."""

    def __init__(self):
        self.seeds, self.sleeps, self.wakes = [], [], []

    def wake_up(self, tags=None):
        self.wakes.append(tags)

    def generate(self, prompt_token_ids, params, seed, first_index=0):
        from avsd_megatron.rollout.engine import Completion, request_seed

        self.seeds.append([request_seed(seed, first_index + i) for i in range(len(prompt_token_ids))])
        return [Completion((1,), "", "stop") for _ in prompt_token_ids for _ in range(params.n)]

    def sleep(self, keep_weights=False):
        self.sleeps.append(keep_weights)


def _stand_in_trainer(dp_rank: int, dp_size: int, step: int, sync_every: int = 1):
    from types import SimpleNamespace

    from avsd_megatron.data.prompts import EncodedPrompts
    from avsd_megatron.rollout.engine import SamplingParams
    from avsd_megatron.training.trainer import Trainer

    cfg = load_config(TINY_YAML)
    prompts_per_step = 8

    class Stream:
        def take(self, count):
            return [(i, EncodedPrompts(student_ids=[1, 2, i], student_text="", teacher_ids={}, teacher_texts={}))
                    for i in range(count)]

    stand_in = SimpleNamespace(
        cfg=from_dict(to_dict(cfg) | {"prompts_per_step": prompts_per_step, "micro_batch_size": 1,
                                      "rollout": to_dict(cfg)["rollout"] | {"sync_every": sync_every}}),
        stream=Stream(), dp_rank=dp_rank, prompts_per_rank=prompts_per_step // dp_size, step=step,
        engine=SeedRecordingEngine(), sampling=SamplingParams(n=1), _share_within_replica=lambda x: x,
    )
    stand_in._after_generate = lambda: Trainer._after_generate(stand_in)
    return stand_in


def _rollout_seeds(dp_rank: int, dp_size: int, step: int) -> list[int]:
    from avsd_megatron.training.trainer import Trainer

    stand_in = _stand_in_trainer(dp_rank, dp_size, step)
    Trainer.rollout(stand_in)
    (seeds,) = stand_in.engine.seeds
    return seeds


def test_rollout_seeds_are_distinct_over_dp_ranks_and_steps_and_equal_over_tp_ranks():
    dp_size = 4
    seeds = [s for step in range(3) for dp in range(dp_size) for s in _rollout_seeds(dp, dp_size, step)]
    assert len(seeds) == 3 * 8 and len(set(seeds)) == len(seeds)  # no two prompts of any step share noise
    # the TP ranks of one engine share the DP rank: identical seeds (their engines must sample the same tokens)
    assert _rollout_seeds(2, dp_size, 1) == _rollout_seeds(2, dp_size, 1)
    # seeds follow the global position: the layout does not change which seed a prompt of the batch gets
    one_rank = _rollout_seeds(0, 1, 1)
    assert [s for dp in range(dp_size) for s in _rollout_seeds(dp, dp_size, 1)] == one_rank


def test_engine_sleeps_keep_weights_between_syncs_and_discard_them_before_a_sync():
    from avsd_megatron.training.trainer import Trainer

    kept = []
    for step in range(4):
        stand_in = _stand_in_trainer(0, 1, step, sync_every=2)
        Trainer.rollout(stand_in)
        kept += stand_in.engine.sleeps
        assert stand_in.engine.wakes == [None]  # every tag: the weights wake too after a keep-weights sleep
    assert kept == [True, False, True, False]  # the weights are synced after steps 2 and 4 (self.step 1, 3)
    every_step = _stand_in_trainer(0, 1, 0, sync_every=1)
    Trainer.rollout(every_step)
    assert every_step.engine.sleeps == [False]
@pytest.mark.integration
def test_trainer_writes_the_plan_and_its_checkpoint_size_matches_the_disk(cli_run):
    """Rank 0 writes the planner's table and JSON next to config.yaml; the plan's checkpoint bytes are the tensor
    bytes of the real checkpoint (model + distributed Adam: master and moments of the padded bucket), the rest of
    the .distcp file being the pickled objects (< 1 MiB)."""
    assert "GPU memory per rank" in (cli_run / "plan.txt").read_text()
    plan = json.loads((cli_run / "plan.json").read_text())
    assert plan["layout"]["dp"] == 1 and plan["model"]["origin"] == "config.json"
    distcp = sum(p.stat().st_size for p in (cli_run / "checkpoints" / "step_00000002").glob("*.distcp"))
    planned = plan["checkpoint"]["per_checkpoint_bytes"]
    assert planned <= distcp <= planned + 2**20
# rollout.engine=vllm without a GPU (the real run: tests/training/test_trainer_vllm.py, the `vllm` tier)


def test_trainer_vllm_engine_on_cpu_needs_vllms_cpu_build(monkeypatch, hf_dir, tmp_path):
    """Without CUDA, rollout.engine=vllm is refused unless vLLM is installed and reports its CPU platform."""
    import types

    from avsd_megatron.training.trainer import _vllm_engine

    cfg = from_dict(_config(tmp_path, hf_dir, rollout__engine="vllm"))
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ImportError, match="VLLMEngine needs vLLM .*tools/install_vllm_cpu_tier.sh"):
        _vllm_engine(cfg, on_cpu=True)
    gpu_platform = types.SimpleNamespace(is_cpu=lambda: False)
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(__version__="0.33.0"))
    monkeypatch.setitem(sys.modules, "vllm.platforms", types.SimpleNamespace(current_platform=gpu_platform))
    with pytest.raises(ConfigError, match="rollout.engine='vllm' without a GPU needs vLLM's CPU build"):
        _vllm_engine(cfg, on_cpu=True)
