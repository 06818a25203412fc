"""Tests for avsd_megatron.data.examples: loading local jsonl/parquet rows through `datasets`, bad-row errors and skips.

Run: .venv/bin/python -m pytest -q tests/data/test_data.py

Files are written by the tests into tmp_path; the `datasets` cache goes there too. Nothing touches the network.
"""

import json
from pathlib import Path

import pytest

from avsd_megatron.data.examples import BadRowError, CodeExample, DataConfig, MathExample, RowRef, load_examples
from avsd_megatron.verify.sandbox import TestCase


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def write_parquet(path: Path, rows: list[dict]) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def load(tmp_path: Path, sources, task="math", **kw):
    sources = (sources,) if isinstance(sources, str) else tuple(sources)
    return load_examples(DataConfig(sources=sources, task=task, cache_dir=str(tmp_path / "cache"), **kw))


def code_row(**overrides) -> dict:
    row = {
        "id": "1A",
        "problem": "Add two numbers.",
        "input_format": "Two integers.",
        "output_format": None,
        "constraints": "1 <= a, b <= 10",
        "examples": [{"input": "1 2\n", "output": "3\n"}],
        "public_tests": [{"input": "1 2\n", "output": "3\n"}],
        "hidden_tests": [{"input": "4 5\n", "output": "9\n"}, {"input": "0 0\n", "output": "0\n"}],
        "reference_solution": "print(sum(map(int, input().split())))",
        "algorithm_hint": "Read and add.",
    }
    row.update(overrides)
    return row


# ----------------------------------------------------------------------------------------------------------------
# Good rows


def test_load_math_jsonl_and_parquet_in_order(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"problem": "1+1?", "solution": "\\boxed{2}", "extra": 5}])
    b = write_parquet(
        tmp_path / "b.parquet",
        [{"problem": "2+2?", "solution": "4"}, {"problem": " 3+3? ", "solution": "It is 6.\n"}],
    )
    examples, report = load(tmp_path, (a, b))
    assert examples == [
        MathExample("1+1?", "\\boxed{2}", RowRef(a, 0)),
        MathExample("2+2?", "4", RowRef(b, 0)),
        MathExample(" 3+3? ", "It is 6.\n", RowRef(b, 1)),  # kept verbatim
    ]
    assert (report.rows_read, report.kept, report.num_skipped) == (3, 3, 0)


def test_load_code_rows_with_defaults(tmp_path):
    minimal = {
        "problem": "P",
        "reference_solution": "print(1)",
        "public_tests": [{"input": "", "output": "1\n"}],
    }
    path = write_jsonl(tmp_path / "code.jsonl", [code_row(), minimal, code_row(id=17)])
    examples, report = load(tmp_path, path, task="code")
    full, small, int_id = examples
    assert isinstance(full, CodeExample)
    assert full.id == "1A" and full.output_format == "" and full.algorithm_hint == "Read and add."
    assert full.hidden_tests == (TestCase("4 5\n", "9\n"), TestCase("0 0\n", "0\n"))
    assert small.id == f"{path}#1"
    assert (small.input_format, small.examples, small.hidden_tests, small.algorithm_hint) == ("", (), (), "")
    assert small.public_tests == (TestCase("", "1\n"),)
    assert int_id.id == "17"
    assert report.kept == 3


def test_load_code_parquet_nested_tests(tmp_path):
    path = write_parquet(tmp_path / "code.parquet", [code_row(), code_row(id="2B", algorithm_hint=None)])
    examples, _ = load(tmp_path, path, task="code")
    assert [e.id for e in examples] == ["1A", "2B"]
    assert examples[1].public_tests == (TestCase("1 2\n", "3\n"),)
    assert examples[1].algorithm_hint == ""


# ----------------------------------------------------------------------------------------------------------------
# Bad rows


@pytest.mark.parametrize(
    "bad, field, reason",
    [
        ({"problem": "p"}, "solution", "is missing or null"),
        ({"problem": "p", "solution": None}, "solution", "is missing or null"),
        ({"problem": 7, "solution": "s"}, "problem", "must be a str, got int 7"),
        ({"problem": "p", "solution": ["s"]}, "solution", "must be a str, got list"),
        ({"problem": "  \n", "solution": "s"}, "problem", "is empty"),
    ],
)
def test_bad_math_row_error_names_row_and_field(tmp_path, bad, field, reason):
    path = write_jsonl(tmp_path / "m.jsonl", [{"problem": "ok", "solution": "ok"}, bad])
    with pytest.raises(BadRowError) as info:
        load(tmp_path, path)
    err = info.value
    assert (err.row, err.field) == (RowRef(path, 1), field)
    assert str(err).startswith(f"row 1 of {path}: field {field!r} {reason}")


@pytest.mark.parametrize(
    "overrides, field, reason",
    [
        (dict(public_tests=None), "public_tests", "is missing or null"),
        (dict(public_tests=[]), "public_tests", "is empty"),
        (dict(public_tests="1 2 -> 3"), "public_tests", "must be a list"),
        (dict(public_tests=[{"input": "1", "output": "1"}, ["1", "1"]]), "public_tests[1]", "must be an {input"),
        (dict(public_tests=[{"input": "1"}]), "public_tests[0].output", "is missing or null"),
        (dict(hidden_tests=[{"input": 1, "output": "1"}]), "hidden_tests[0].input", "must be a str, got int"),
        (dict(reference_solution=""), "reference_solution", "is empty"),
        (dict(constraints=5), "constraints", "must be a str or null, got int"),
        (dict(id=["x"]), "id", "must be a non-empty str or int"),
    ],
)
def test_bad_code_row_error_names_row_and_field(tmp_path, overrides, field, reason):
    path = write_jsonl(tmp_path / "c.jsonl", [code_row(), code_row(), code_row(**overrides)])
    with pytest.raises(BadRowError, match=r"^row 2 of .*c\.jsonl: field ") as info:
        load(tmp_path, path, task="code")
    assert info.value.field == field
    assert reason in info.value.reason


def test_bad_rows_skipped_and_counted(tmp_path):
    rows = [
        {"problem": "a", "solution": "1"},
        {"problem": "b"},
        {"problem": 3, "solution": "2"},
        {"problem": "c", "solution": "3"},
        {"problem": "d"},
    ]
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    examples, report = load(tmp_path, path, on_bad_row="skip")
    assert [e.problem for e in examples] == ["a", "c"]
    assert [e.row.index for e in examples] == [0, 3]
    assert (report.rows_read, report.kept, report.num_skipped) == (5, 2, 3)
    assert report.skipped == {"solution: is missing or null": 2, "problem: must be a str, got int 3": 1}
    assert report.skipped_examples[0] == f"row 1 of {path}: field 'solution' is missing or null"


def test_object_in_text_field_is_bad_row(tmp_path):
    rows = [{"problem": "a", "solution": "1"}, {"problem": {"x": 1}, "solution": "2"}]
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    with pytest.raises(BadRowError, match="field 'problem' must be a str, got dict"):
        load(tmp_path, path)


# ----------------------------------------------------------------------------------------------------------------
# Configuration and sources


def test_data_config_validation(tmp_path):
    with pytest.raises(ValueError, match="data.task='maths' is not one of"):
        DataConfig(sources=("a.jsonl",), task="maths")
    with pytest.raises(ValueError, match="data.on_bad_row='ignore' is not one of"):
        DataConfig(sources=("a.jsonl",), task="math", on_bad_row="ignore")
    with pytest.raises(ValueError, match="must be a non-empty tuple"):
        DataConfig(sources="a.jsonl", task="math")
    with pytest.raises(ValueError, match="a hub dataset id must be the only source"):
        DataConfig(sources=("a.jsonl", "org/some-dataset"), task="math")


def test_missing_or_unsupported_local_source(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load(tmp_path, str(tmp_path / "missing.jsonl"))
    csv = tmp_path / "rows.csv"
    csv.write_text("problem,solution\na,b\n")
    with pytest.raises(ValueError, match=r"suffix '\.csv' is not one of"):
        load(tmp_path, str(csv))


def test_unreadable_file_names_the_file(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"problem": "a", "solution": "b"}\n{"problem": \n')
    with pytest.raises(ValueError, match=r"broken\.jsonl.*could not read it as json"):
        load(tmp_path, str(path))


def test_empty_file_and_invalid_json_line_are_named(tmp_path):
    """Issue 16.7: an empty file said "could not read it as json: " and nothing more; a bad JSON line gave no line."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match=r"empty\.jsonl' is empty: no rows"):
        load(tmp_path, str(empty))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "a", "solution": "b"}\n\n{"problem": "c" "solution": "d"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl', line 3: not valid JSON \(Expecting ','"):
        load(tmp_path, str(bad))
