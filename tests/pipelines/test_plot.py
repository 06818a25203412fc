"""Tests for avsd_megatron/pipelines/plot.py on metrics.jsonl files written by the real MetricsLog, with the metric
names and values of the real sampled-token kernel (`avsd_sampled_token_loss`) and of a candidate-loss-like run
that lacks the sampled-token metrics. The figures are checked through matplotlib's objects, not pixels.

Run: python -m pytest -q tests/pipelines/test_plot.py
"""

import json

import pytest
import torch

from avsd_megatron.pipelines import plot
from avsd_megatron.training.metrics_log import MetricsLog
from avsd_megatron.vocab_parallel import avsd_sampled_token_loss

pytest.importorskip("matplotlib")

VIEWS = ("full_solution", "partial_solution", "answer_only")


def _sampled_records(seed: int, steps: int) -> list[dict]:
    """What the trainer logs per step for the sampled-token loss: the kernel's (sum, count) metrics as means."""
    gen = torch.Generator().manual_seed(seed)
    records = []
    for step in range(1, steps + 1):
        n, vocab = 12, 40
        student = torch.randn(n, vocab, generator=gen, requires_grad=True)
        views = torch.log_softmax(torch.randn(len(VIEWS), n, vocab, generator=gen), dim=-1)
        tokens = torch.randint(0, vocab, (n,), generator=gen)
        view_logprobs = views.gather(-1, tokens.expand(len(VIEWS), n)[..., None])[..., 0]  # [M, N]
        loss_sum, count, metrics = avsd_sampled_token_loss(
            student, tokens, view_logprobs, torch.ones(n, dtype=torch.bool), temperature=0.7, mode="avsd",
            gate="avsd", group=None, view_names=VIEWS)
        means = {name: float(value[0] / value[1]) for name, value in metrics.items()}
        records.append({"loss": float(loss_sum.detach() / count), "grad_norm": 1.0, **means})
    return records


def _write_run(run_dir, records, first_step=1):
    log = MetricsLog(run_dir, jsonl=True, total_steps=len(records), progress=False)
    for step, record in enumerate(records, start=first_step):
        log.step(step, record)
    log.close()
    return run_dir


@pytest.fixture
def runs(tmp_path):
    avsd = _write_run(tmp_path / "avsd", _sampled_records(0, 4))
    candidate = [{"loss": 0.1 * s, "mv_gate_mean": 0.5 + 0.01 * s, "mv_jensen_gap_mean": 0.02} for s in range(3)]
    return {"avsd": avsd, "candidate": _write_run(tmp_path / "candidate", candidate)}


def _axes(fig):
    return {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}


def test_plot_runs_overlays_every_curve_of_every_run(runs, tmp_path):
    out = tmp_path / "curves.png"
    fig = plot.plot_runs([runs["avsd"], runs["candidate"]], out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000
    axes = _axes(fig)
    assert list(axes) == [c.title for c in plot.CURVES]
    records = [json.loads(line) for line in (runs["avsd"] / "metrics.jsonl").read_text().splitlines()]
    for curve in plot.CURVES[:4]:  # one line per run that logged the metric, its values as logged
        lines = {line.get_label(): line for line in axes[curve.title].get_lines()}
        assert list(lines["avsd"].get_xdata()) == [1, 2, 3, 4]
        assert list(lines["avsd"].get_ydata()) == pytest.approx([r[curve.metric] for r in records])
        assert ("candidate" in lines) == (curve.metric != "mv_tinker_advantage_mean")
    views = {line.get_label(): line for line in axes[plot.CURVES[4].title].get_lines()}
    assert set(views) == {"avsd: student", *(f"avsd: {v}" for v in VIEWS)}
    assert list(views["avsd: answer_only"].get_ydata()) == pytest.approx(
        [r["mv_tinker_view_logprob_answer_only"] for r in records])
    assert views["avsd: student"].get_linestyle() == "-" and views["avsd: answer_only"].get_linestyle() != "-"
    assert axes[plot.CURVES[0].title].get_xlabel() == "step"


def test_panels_without_the_metric_say_so(runs, tmp_path):
    fig = plot.plot_runs([runs["candidate"]], tmp_path / "c.png")
    axes = _axes(fig)
    for title in (plot.CURVES[2].title, plot.CURVES[4].title):
        assert axes[title].get_lines() == []
        (note,) = axes[title].texts
        assert "is not in these runs' metrics.jsonl" in note.get_text()


def test_resumed_run_keeps_the_later_record_of_a_repeated_step(tmp_path):
    run = _write_run(tmp_path / "r", [{"loss": 1.0}, {"loss": 2.0}, {"loss": 3.0}])
    _write_run(run, [{"loss": 20.0}, {"loss": 30.0}], first_step=2)  # resumed from step 1: steps 2, 3 again
    (records,) = plot.load_runs([run]).values()
    assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0), (2, 20.0), (3, 30.0)]


def test_same_named_runs_keep_their_paths_as_labels(tmp_path):
    a = _write_run(tmp_path / "a" / "run", [{"loss": 1.0}])
    b = _write_run(tmp_path / "b" / "run", [{"loss": 2.0}])
    assert list(plot.load_runs([a, b])) == [str(a), str(b)]


def test_cli_default_out_and_errors(runs, tmp_path, capsys):
    assert plot.main([str(runs["avsd"]), str(runs["candidate"])]) == runs["avsd"] / "curves.png"
    assert (runs["avsd"] / "curves.png").stat().st_size > 20_000
    with pytest.raises(SystemExit) as exit_info:
        plot.main([str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2
    assert f"{tmp_path / 'nowhere' / 'metrics.jsonl'} does not exist" in capsys.readouterr().err


def test_plot_summary_bars_are_avg_at_k_with_standard_errors(runs, tmp_path):
    summary = {"settings": {"k": 4, "heldout": 200}, "steps": 4, "seconds": {"total": 763.0},
               "scores": {"warm": {"avg@4": 36.38, "avg@4_stderr": 2.82},
                          "avsd": {"avg@4": 42.25, "avg@4_stderr": 2.89}}}
    fig = plot.plot_summary(summary, {"warm": "warm start", "avsd": "AVSD"}, {"avsd": runs["avsd"]},
                            tmp_path / "summary.png")
    assert (tmp_path / "summary.png").stat().st_size > 20_000
    ax = fig.axes[0]
    assert ax.get_title() == "held-out Avg@4 ± s.e. (200 problems)"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["warm start", "AVSD"]
    from matplotlib.container import BarContainer

    (bars,) = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert [b.get_height() for b in bars] == [36.38, 42.25]
    (segments,) = bars.errorbar.lines[2]  # the error bars' vertical segments: mean ± s.e.
    spans = [y for seg in segments.get_segments() for y in (seg[0][1], seg[1][1])]
    assert spans == pytest.approx([36.38 - 2.82, 36.38 + 2.82, 42.25 - 2.89, 42.25 + 2.89])
    assert [a.get_title() for a in fig.axes[1:] if a.get_visible()] == [c.title for c in plot.CURVES]
