"""The CPU main job (avsd_megatron/pipelines/main_job.py) end to end in miniature (its warm start: tests/pipelines/test_warm_start.py).

Run: python -m pytest -q tests/pipelines/test_main_job.py
"""

import json
import re

import pytest

from avsd_megatron.pipelines import main_job
from avsd_megatron.training.config import load_config

pytest.importorskip("transformers")
pytest.importorskip("megatron.core")


KNOWN_NOTICES = ("MimoModelConfig is experimental", "we are deprecating ShardedTensor",
                 "The argument order of load has been changed")
"""Library notices the job's processes (this one and both trainers) silence at the calls that raise them."""


def test_main_job_miniature_writes_summary(tmp_path, capfd):
    out = tmp_path / "run"
    summary = main_job.main(["--out", str(out), "--sft-steps", "2", "--sft-batch", "4", "--steps", "1",
                             "--prompts-per-step", "2", "--heldout", "4", "--k", "1", "--max-new-tokens", "8",
                             "--probe", "3", "--sft-error-share", "0.5"])
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    delta = on_disk["heldout_accuracy_after"] - on_disk["heldout_accuracy_before"]
    assert on_disk["heldout_delta"] == pytest.approx(delta)
    for key in ("heldout_accuracy_before", "heldout_accuracy_after", "heldout_accuracy_single_after"):
        assert 0.0 <= on_disk[key] <= 100.0
    assert on_disk["steps"] == 1
    assert {"init", "sft", "probe", "convert", "train", "eval_warm", "eval_avsd", "eval_single",
            "total"} <= set(on_disk["seconds"])
    assert set(on_disk["warm_start_view_probe"]) == {"student", "full_solution", "partial_solution", "answer_only"}
    assert all(0.0 <= v <= 100.0 for v in on_disk["warm_start_view_probe"].values())
    rates = {name: [sum(c["correct"] for c in s["completions"]) for s in
                    json.loads((out / f"eval_{name}.json").read_text())["samples"]] for name in ("warm", "avsd")}
    if rates["warm"] == rates["avsd"]:  # identical per-problem hits: the paired difference has no spread
        assert on_disk["heldout_delta_stderr"] == 0.0
    assert 0.0 <= on_disk["heldout_accuracy_grpo_after"] <= 100.0  # the default job has the GRPO row
    assert set(on_disk["runs"]) == {"avsd", "single", "grpo"}
    assert on_disk["runs"]["avsd"]["delta_vs_avsd"] == 0.0 and on_disk["runs"]["avsd"]["delta_vs_avsd_stderr"] == 0.0
    assert "reward/mean" in on_disk["run_stats"]["grpo"] and "mv_gate_mean" in on_disk["run_stats"]["avsd"]
    grpo_cfg = load_config(out / "grpo" / "config.yaml")
    assert grpo_cfg.algorithm == "grpo" and grpo_cfg.rollout.n == 4 and grpo_cfg.prompts_per_step == 1
    for name in ("avsd", "single", "grpo"):
        metrics = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics] == [1]
        assert (out / f"hf_{name}" / "config.json").is_file()
        assert len(json.loads((out / f"eval_{name}.json").read_text())["samples"]) == 4
    assert on_disk["train_config_avsd"]["avsd"]["views"] == ["full_solution", "partial_solution", "answer_only"]
    output = capfd.readouterr()
    for notice in KNOWN_NOTICES:
        assert notice not in output.err and notice not in output.out, notice
    for name in ("avsd", "single", "grpo"):  # each run's own output (its plan, library notices) is in its train.log
        assert "verdict: fits" in (out / name / "train.log").read_text(), name
    assert "verdict: fits" not in output.out and "GPTModel IS DEPRECATED" not in output.out + output.err
    for phase in ("init", "sft", "probe", "convert", "train", "export_avsd", "eval_single"):  # start and duration
        assert re.search(rf"\[main_job\] {phase} \.\.\. \(job at \d+ s\)\n", output.out), phase
        assert re.search(rf"\[main_job\] {phase}: [0-9.]+ s \(job at \d+ s\)\n", output.out), phase
    assert re.search(r"train \(avsd \+ single \+ grpo\): 100%\|[^|]*\| 3/3 ", output.err)  # every run's steps
    for bar in ("sft: 100%", "probe: 100%", "hf->megatron: 100%", "megatron->hf: 100%", "eval: 100%"):
        assert bar in output.err, bar
    _check_summary_png(out / "summary.png", on_disk)
    with pytest.raises(FileExistsError, match="summary.json exists"):
        main_job.main(["--out", str(out)])


def _check_summary_png(path, summary):
    """summary.png is a real PNG with the Avg@k panel first, then the training curves (checked in test_plot.py)."""
    from avsd_megatron.pipelines.plot import CURVES, plot_summary

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000
    labels = {"warm": "warm start (SFT)", "avsd": "AVSD (3 views)", "single": "single view"}
    fig = plot_summary(summary, labels, {n: path.parent / n for n in ("avsd", "single")}, path.parent / "again.png")
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert titles == ["held-out Avg@1 ± s.e. (4 problems)", *(c.title for c in CURVES)]


def test_a_failed_run_names_its_log_and_quotes_its_end(tmp_path, capfd):
    run = tmp_path / "bad"
    run.mkdir()
    (run / "config.yaml").write_text("optim:\n  lr: -1.0\n")
    with pytest.raises(RuntimeError, match="run 'bad' exit 2") as err:
        main_job._train({"bad": run / "config.yaml"}, threads=1, steps=1, poll_s=0.1)
    log = (run / "train.log").read_text()
    assert "optim.lr" in log and "optim.lr" in str(err.value) and str(run / "train.log") in str(err.value)
    output = capfd.readouterr()
    assert "optim.lr" not in output.out + output.err  # in the log and the error, not on the terminal


def test_paired_stderr_is_the_spread_of_per_problem_differences():
    def result(hits):
        return {"samples": [{"completions": [{"correct": bool(h)} for h in row]} for row in hits]}

    before = result([[1, 0], [0, 0], [1, 1], [0, 1]])
    after = result([[1, 1], [0, 1], [1, 1], [0, 1]])  # d = [.5, .5, 0, 0]
    diffs = [0.5, 0.5, 0.0, 0.0]
    mean = sum(diffs) / 4
    want = 100 * (sum((d - mean) ** 2 for d in diffs) / 3 / 4) ** 0.5
    assert main_job._paired_stderr(before, after) == pytest.approx(want)
    assert main_job._paired_stderr(before, before) == 0.0


def test_views_disagree_experiment_plumbing(tmp_path):
    """--experiment views-disagree at miniature size (two of its runs): the training references are the variant,
    the warm start is not, the stats and the plot are written. The numbers mean nothing at this size."""
    import importlib.util

    plot = importlib.util.find_spec("matplotlib") is not None  # the `plot` extra; CI installs train,test,launch
    out = tmp_path / "exp"
    summary = main_job.main(["--out", str(out), "--experiment", "views-disagree", "--runs", "avsd,consensus",
                             "--sft-steps", "1", "--sft-batch", "2", "--steps", "1", "--prompts-per-step", "2",
                             "--heldout", "2", "--k", "1", "--max-new-tokens", "4", "--probe", "0"]
                            + ["--plot"] * plot)
    exp = summary["experiment"]
    assert exp["name"] == "views-disagree" and exp["changed_references"] > 1000  # about half of 3000
    cfg = load_config(out / "consensus" / "config.yaml")
    assert cfg.data.sources == (str(out / "train_views_disagree.jsonl"),) and cfg.avsd.mode == "consensus"
    assert set(summary["runs"]) == {"avsd", "consensus"}
    assert set(json.loads((out / "run_stats.json").read_text())) == {"avsd", "consensus"}
    assert "mv_gate_mean" in summary["run_stats"]["consensus"]
    if plot:
        assert (out / "run_stats.png").stat().st_size > 0
    assert summary["heldout_accuracy_single_after"] is None and summary["heldout_accuracy_grpo_after"] is None


def test_selected_runs():
    args = main_job.parse_args([])
    assert main_job._selected_runs(args) == ["avsd", "single", "grpo"]
    args = main_job.parse_args(["--experiment", "views-disagree"])
    assert main_job._selected_runs(args) == list(main_job.RUNS) and len(main_job.RUNS) == 7
    with pytest.raises(ValueError, match="must include avsd"):
        main_job._selected_runs(main_job.parse_args(["--runs", "single,grpo"]))
    with pytest.raises(ValueError, match=r"unknown run\(s\) \['nope'\]"):
        main_job._selected_runs(main_job.parse_args(["--runs", "avsd,nope"]))
    with pytest.raises(ValueError, match="--grpo-n=1 must be >= 2"):
        main_job._selected_runs(main_job.parse_args(["--grpo-n", "1"]))


@pytest.mark.parametrize("delta, stderr, verdict", [(0.0, 0.0, "no significant change"), (3.0, 1.0, "improved"),
                                                     (-3.0, 1.0, "got worse"), (2.0, 1.0, "no significant change"),
                                                     (-2.0, 1.0, "no significant change"), (0.5, 0.0, "improved")])
def test_verdict_reads_the_two_standard_error_band(delta, stderr, verdict):
    """No change within ±2 s.e., zero included (a 0 ± 0 difference was reported as "got worse")."""
    assert main_job._verdict(delta, stderr) == verdict
