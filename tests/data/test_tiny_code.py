"""Tests for the bundled tiny code dataset (avsd_megatron/data/tiny_code.py): the shipped files are what the generator
writes, every row is a valid code row, every reference program passes all its tests in the bubblewrap sandbox,
and the tiny tokenizer round-trips the code prompts.

Run: .venv/bin/python -m pytest -q tests/data/test_tiny_code.py
"""

from concurrent.futures import ThreadPoolExecutor

import pytest

from avsd_megatron.data import tiny, tiny_code
from avsd_megatron.data.examples import DataConfig, load_examples
from avsd_megatron.verify.grading import grade_code_completion
from avsd_megatron.verify.sandbox import Sandbox, SandboxConfig, TestCase


@pytest.fixture(scope="module")
def shipped():
    return tiny.read_jsonl(tiny_code.TINY_CODE_TRAIN_PATH), tiny.read_jsonl(tiny_code.TINY_CODE_HELDOUT_PATH)


def test_tiny_code_shipped_files_equal_the_generator(shipped, tmp_path):
    train, heldout = shipped
    assert train == tiny_code.code_rows(tiny_code.TRAIN_PROBLEMS)
    assert heldout == tiny_code.code_rows(tiny_code.HELDOUT_PROBLEMS)
    written = tiny_code.write_code_assets(tmp_path)
    assert [p.read_bytes() for p in written] == [
        tiny_code.TINY_CODE_TRAIN_PATH.read_bytes(), tiny_code.TINY_CODE_HELDOUT_PATH.read_bytes()
    ]


def test_tiny_code_splits_are_disjoint_and_load_as_code_rows(shipped):
    train, heldout = shipped
    assert (len(train), len(heldout)) == (32, 12)
    assert not {r["id"] for r in train} & {r["id"] for r in heldout}
    assert not {r["problem"] for r in train} & {r["problem"] for r in heldout}
    for path, count in ((tiny_code.TINY_CODE_TRAIN_PATH, 32), (tiny_code.TINY_CODE_HELDOUT_PATH, 12)):
        examples, report = load_examples(DataConfig(sources=(str(path),), task="code"))
        assert report.kept == count and report.num_skipped == 0
        for example in examples:
            assert len(example.public_tests) == tiny_code.NUM_PUBLIC and example.examples == example.public_tests
            assert len(example.hidden_tests) == tiny_code.NUM_HIDDEN
            tests = example.public_tests + example.hidden_tests
            assert len({t.input for t in tests}) == len(tests)  # distinct inputs


@pytest.mark.bwrap
def test_tiny_code_references_pass_every_test_in_the_sandbox(shipped):
    sandbox = Sandbox(SandboxConfig(wall_time_s=5.0))

    def grade(row):
        tests = [TestCase(**t) for t in row["public_tests"] + row["hidden_tests"]]
        completion = f"<final_code>\n```python\n{row['reference_solution']}```\n</final_code>"
        return row["id"], len(tests), grade_code_completion(completion, tests, sandbox)

    with ThreadPoolExecutor(max_workers=4) as pool:  # the runs mostly wait for bwrap to start
        for problem_id, num_tests, result in pool.map(grade, shipped[0] + shipped[1]):
            assert (result.status, result.tests_run) == ("passed", num_tests), (problem_id, result)


def test_tiny_code_run_reference_is_what_a_program_prints():
    assert tiny_code.run_reference("a, b = map(int, input().split())\nprint(a + b)\n", "2 3\n") == "5\n"


def test_tiny_tokenizer_round_trips_code_rows(shipped):
    tokenizer = tiny.load_tiny_tokenizer()
    for row in shipped[0] + shipped[1]:
        for text in (row["problem"], row["reference_solution"], row["public_tests"][0]["input"]):
            assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
