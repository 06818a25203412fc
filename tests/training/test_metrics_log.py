"""MetricsLog writes what the trainer logs: JSONL records, and TensorBoard scalars read back from the event files.

Run: python -m pytest -q tests/training/test_metrics_log.py
"""

import math

import pytest

from avsd_megatron.training.metrics_log import TENSORBOARD_DIR, MetricsLog, NullLog, read_jsonl_metrics


def _scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_metrics_log_tensorboard_scalars_equal_logged_values(tmp_path):
    log = MetricsLog(tmp_path, jsonl=True, total_steps=3, progress=False, tensorboard=True)
    records = {1: {"loss": 0.5, "num_tokens": 12, "mv_gate_mean": 0.25, "update_successful": True, "note": "x"},
               2: {"loss": -0.125, "num_tokens": 7, "mv_gate_mean": 0.75, "update_successful": True, "note": "y"}}
    for step, metrics in records.items():
        log.step(step, metrics)
    log.close()

    scalars = _scalars(tmp_path / TENSORBOARD_DIR)
    assert set(scalars) == {"loss", "num_tokens", "mv_gate_mean"}  # booleans and strings are not scalars
    for name in scalars:
        assert [s for s, _ in scalars[name]] == [1, 2]
        for (step, value) in scalars[name]:
            assert math.isclose(value, records[step][name], rel_tol=1e-6)
    assert read_jsonl_metrics(tmp_path) == [{"step": s, **m} for s, m in records.items()]


def test_metrics_log_without_tensorboard_writes_no_event_files(tmp_path):
    log = MetricsLog(tmp_path, jsonl=True, total_steps=1, progress=False)
    log.step(1, {"loss": 1.0})
    log.close()
    assert not (tmp_path / TENSORBOARD_DIR).exists()
    assert read_jsonl_metrics(tmp_path) == [{"step": 1, "loss": 1.0}]


def test_metrics_log_for_rank_only_rank0_writes(tmp_path):
    assert type(MetricsLog.for_rank(1, tmp_path, jsonl=True, total_steps=1, progress=False)) is NullLog
    log = MetricsLog.for_rank(0, tmp_path, jsonl=True, total_steps=1, progress=False, tensorboard=True)
    assert isinstance(log, MetricsLog)
    log.close()


def test_metrics_log_tensorboard_missing_package_names_the_fix(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "torch.utils.tensorboard":
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"logging\.tensorboard=true needs the tensorboard package"):
        MetricsLog(tmp_path, jsonl=False, total_steps=1, progress=False, tensorboard=True)
