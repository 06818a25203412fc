"""Where an evaluation's results go: checked before any generation, samples kept as they are made, resumable.

    record = SampleRecord(Path("eval.json"), header={"task": "math", "config": {...}, "hf": ..., "data": ...})
    ...                                       # record.done: {problem index: sample} already in the file
    record.append(sample)                     # one problem's graded completions, flushed at once
    record.finish(result)                     # eval.json (summary, config, samples), written atomically

Layout: next to `--out FILE.json`, `FILE.json.samples.jsonl` holds a header line `{"header": {...}}` (what the
samples depend on: task, sampling config, checkpoint, data, test set) and then one line per evaluated problem, each
written and flushed as soon as its completions are graded. A killed evaluation loses at most the problem in flight.
Running the same command again reads the file, skips the problems already in it (`done`) and appends the rest; a
different header (another k, seed, checkpoint, ...) is refused naming the differing fields, so samples of two
settings are never mixed. A last line cut by a kill is dropped. `finish` writes FILE.json through a temporary
sibling and `os.replace`; the samples file stays (a re-run then re-scores without generating).

The constructor is the early check: it creates the parent directory and opens the samples file for appending, so
an unwritable `--out` fails before the model is loaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["SampleRecord", "samples_path"]


def samples_path(out: Path) -> Path:
    return out.with_name(out.name + ".samples.jsonl")


class SampleRecord:
    """The samples file of `out` (module docstring).

    Raises:
        ValueError: `out` is a directory, the samples file holds another header or is not ours (names the fields).
        OSError: the directory cannot be created or written (PermissionError names the path).
    """

    def __init__(self, out: str | Path, header: dict[str, Any]) -> None:
        self.out = Path(out)
        if self.out.is_dir():
            raise ValueError(f"--out {self.out} is a directory; give a file path such as {self.out / 'eval.json'}")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.path = samples_path(self.out)
        self.header = json.loads(json.dumps(header))  # as it reads back (tuples -> lists)
        self.done: dict[int, dict[str, Any]] = {}
        if self.path.is_file() and self.path.stat().st_size:
            self._read()
        else:
            self.path.write_text(json.dumps({"header": self.header}) + "\n", encoding="utf-8")
        self._file = self.path.open("a", encoding="utf-8")
        probe = self.out.with_name(f".{self.out.name}.tmp-{os.getpid()}")
        probe.touch()  # the final file is written through such a sibling: check that it can be
        probe.unlink()

    def _read(self) -> None:
        text = self.path.read_text(encoding="utf-8")
        lines = text.split("\n")
        complete, tail = lines[:-1], lines[-1]  # text after the last newline: a line a kill cut short
        try:
            saved = json.loads(complete[0])["header"] if complete else None
        except (ValueError, KeyError, TypeError):
            saved = None
        if not isinstance(saved, dict):
            raise ValueError(f"{self.path} is not an evaluation samples file (no header line); move it away")
        if saved != self.header:
            fields = sorted(k for k in saved.keys() | self.header.keys() if saved.get(k) != self.header.get(k))
            diff = {k: (saved.get(k), self.header.get(k)) for k in fields}
            raise ValueError(
                f"{self.path} holds samples of another evaluation ({diff}, saved vs now); delete it or choose "
                "another --out"
            )
        for lineno, line in enumerate(complete[1:], 2):
            if line.strip():
                try:
                    sample = json.loads(line)
                except ValueError as err:
                    raise ValueError(f"{self.path}:{lineno}: not valid JSON ({err})") from None
                self.done[int(sample["index"])] = sample
        if tail:
            with open(self.path, "r+b") as f:
                f.truncate(len(text.encode("utf-8")) - len(tail.encode("utf-8")))

    def append(self, sample: dict[str, Any]) -> None:
        self._file.write(json.dumps(sample, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.done[int(sample["index"])] = sample

    def finish(self, result: dict[str, Any]) -> Path:
        self._file.close()
        tmp = self.out.with_name(f".{self.out.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, self.out)
        return self.out
