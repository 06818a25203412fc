"""The CPU main job (avsd_megatron/main_job.py) end to end in miniature, and its SFT warm-start pieces.

Run: python -m pytest -q tests/test_main_job.py
"""

import json
import random

import pytest

from avsd_megatron import main_job, tiny
from avsd_megatron.warm_start import IGNORE, sft_example_ids

pytest.importorskip("transformers")
pytest.importorskip("megatron.core")


def test_sft_example_ids_mask_the_prompt_and_end_in_eos():
    tokenizer = tiny.load_tiny_tokenizer()
    row = tiny.read_jsonl(tiny.TINY_TRAIN_PATH)[0]
    answer = tokenizer.encode(row["solution"], add_special_tokens=False) + [tokenizer.eos_token_id]
    for share in (0.0, 1.0):
        ids, labels = sft_example_ids(tokenizer, row, random.Random(0), teacher_share=share)
        assert len(ids) == len(labels) and ids[-len(answer):] == answer
        assert labels[-len(answer):] == answer and set(labels[: -len(answer)]) == {IGNORE}
        assert ("PRIVILEGED REFERENCE" in tokenizer.decode(ids)) == (share == 1.0)


def test_main_job_miniature_writes_summary(tmp_path):
    out = tmp_path / "run"
    summary = main_job.main(["--out", str(out), "--sft-steps", "2", "--sft-batch", "4", "--steps", "1",
                             "--prompts-per-step", "2", "--heldout", "4", "--k", "1", "--max-new-tokens", "8"])
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    delta = on_disk["heldout_accuracy_after"] - on_disk["heldout_accuracy_before"]
    assert on_disk["heldout_delta"] == pytest.approx(delta)
    for key in ("heldout_accuracy_before", "heldout_accuracy_after", "heldout_accuracy_single_after"):
        assert 0.0 <= on_disk[key] <= 100.0
    assert on_disk["steps"] == 1
    assert {"init", "sft", "convert", "train_avsd", "train_single", "eval_warm", "eval_avsd", "eval_single",
            "total"} <= set(on_disk["seconds"])
    for name in ("avsd", "single"):
        metrics = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics] == [1]
        assert (out / f"hf_{name}" / "config.json").is_file()
        assert len(json.loads((out / f"eval_{name}.json").read_text())["samples"]) == 4
    assert on_disk["train_config_avsd"]["avsd"]["views"] == ["full_solution", "partial_solution", "answer_only"]
    with pytest.raises(FileExistsError, match="summary.json exists"):
        main_job.main(["--out", str(out)])
