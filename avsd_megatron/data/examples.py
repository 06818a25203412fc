"""Training/eval rows: load math and code problems with `datasets`, validate every row, count what was skipped.

Sources (spec 5.1): local `.jsonl` / `.json` / `.parquet` files, or one Hugging Face hub dataset id (that path
needs the network and is not exercised by the tests). Each source is loaded on its own so that every row keeps
its file and 0-based index (`RowRef`), and every error names them.

Row schemas:

    math (spec 3.3, 5.1): problem: str, solution: str                       (both required, non-empty)
    code (spec 3.4, 5.1): problem: str, reference_solution: str,
                          public_tests: [{input: str, output: str}, ...]    (required, non-empty)
                          id: str | int                                     (optional; default "<source>#<index>")
                          input_format, output_format, constraints,
                          algorithm_hint: str                               (optional; missing/null -> "")
                          examples, hidden_tests: [{input, output}, ...]    (optional; missing/null -> [])

A missing, null, empty or ill-typed required field, or an ill-typed optional one, is a bad row.
`on_bad_row="error"` raises `BadRowError` naming the row and the dotted field (`public_tests[2].output`);
`on_bad_row="skip"` drops the row and counts it in `LoadReport.skipped` under "<field>: <reason>".
Values are kept verbatim (no stripping): the view builders and prompt renderers decide about whitespace.
"""

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from avsd_megatron.verify.sandbox import TestCase

TASKS = ("math", "code")
BAD_ROW_POLICIES = ("error", "skip")
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
"""File suffix -> `datasets` packaged builder."""
_MAX_SKIPPED_EXAMPLES = 20  # LoadReport keeps this many "row i of file: message" lines for the log


@dataclass(frozen=True)
class RowRef:
    """Where a row came from: a local file path or "<hub id>[<split>]", and its 0-based index there."""

    source: str
    index: int

    def __str__(self) -> str:
        return f"row {self.index} of {self.source}"


class BadRowError(ValueError):
    """A row whose field is missing or ill-typed; `row` and `field` say which."""

    def __init__(self, row: RowRef, field: str, reason: str):
        super().__init__(f"{row}: field {field!r} {reason}")
        self.row = row
        self.field = field
        self.reason = reason


@dataclass(frozen=True)
class MathExample:
    """One math training problem (spec 3.3)."""

    problem: str
    solution: str
    """Reference solution text; the full_solution / partial_solution / answer_only views are built from it."""
    row: RowRef


@dataclass(frozen=True)
class CodeExample:
    """One code problem (spec 3.4, 5.1)."""

    id: str
    problem: str
    input_format: str
    output_format: str
    constraints: str
    examples: tuple[TestCase, ...]
    """Statement examples, shown in the prompt."""
    public_tests: tuple[TestCase, ...]
    """Run on the student's code to build the feedback view (= the statement examples in the released data)."""
    hidden_tests: tuple[TestCase, ...]
    """Official tests, for evaluation only."""
    reference_solution: str
    algorithm_hint: str
    """May be ""; the hint view then uses a deterministic static hint (views.static_hint)."""
    row: RowRef


@dataclass(frozen=True)
class DataConfig:
    """Which rows to load and what to do with bad ones."""

    sources: tuple[str, ...]
    """Local .jsonl/.json/.parquet files (rows concatenated in this order), or exactly one hub dataset id."""
    task: Literal["math", "code"]
    """Row schema: "math" (problem, solution) or "code" (module docstring)."""
    split: str = "train"
    """Split of a hub dataset; local files always form one "train" split."""
    on_bad_row: Literal["error", "skip"] = "error"
    """"error": raise BadRowError at the first bad row; "skip": drop bad rows and count them."""
    cache_dir: str | None = None
    """`datasets` cache directory (Arrow files); None = the library's default."""

    def __post_init__(self) -> None:
        if isinstance(self.sources, str) or not isinstance(self.sources, Sequence) or not self.sources:
            raise ValueError(f"data.sources={self.sources!r} must be a non-empty tuple of paths or one hub id")
        object.__setattr__(self, "sources", tuple(str(s) for s in self.sources))
        if self.task not in TASKS:
            raise ValueError(f"data.task={self.task!r} is not one of {TASKS}")
        if self.on_bad_row not in BAD_ROW_POLICIES:
            raise ValueError(f"data.on_bad_row={self.on_bad_row!r} is not one of {BAD_ROW_POLICIES}")
        hub = [s for s in self.sources if not _is_local(s)]
        if hub and len(self.sources) > 1:
            raise ValueError(
                f"data.sources={self.sources!r}: {hub[0]!r} is neither an existing file nor a path ending in "
                f"{tuple(LOCAL_FORMATS)}; a hub dataset id must be the only source"
            )


@dataclass
class LoadReport:
    """What loading read, kept and skipped."""

    rows_read: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    """"<field>: <reason>" -> number of rows skipped for it."""
    skipped_examples: list[str] = field(default_factory=list)
    """The first few skipped rows as "row i of <source>: field ... <reason>"."""

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())


def load_examples(cfg: DataConfig) -> tuple[list[MathExample] | list[CodeExample], LoadReport]:
    """Load, validate and convert every row of `cfg.sources`.

    Returns:
        (examples in source order, report).
    Raises:
        FileNotFoundError: a local source does not exist.
        ValueError: a local source has an unsupported suffix.
        BadRowError: a bad row with on_bad_row="error".
    """
    convert = math_example_from_row if cfg.task == "math" else code_example_from_row
    examples: list = []
    report = LoadReport()
    for source in cfg.sources:
        name, rows = _load_rows(source, split=cfg.split, cache_dir=cfg.cache_dir)
        for index, row in enumerate(rows):
            report.rows_read += 1
            ref = RowRef(name, index)
            try:
                examples.append(convert(row, ref))
            except BadRowError as err:
                if cfg.on_bad_row == "error":
                    raise
                report.skipped[f"{err.field}: {err.reason}"] += 1
                if len(report.skipped_examples) < _MAX_SKIPPED_EXAMPLES:
                    report.skipped_examples.append(str(err))
    report.kept = len(examples)
    return examples, report


# ----------------------------------------------------------------------------------------------------------------
# Row -> example


def math_example_from_row(row: Mapping[str, Any], ref: RowRef) -> MathExample:
    """Validate one math row (fields `problem`, `solution`); raises BadRowError."""
    _check_mapping(row, ref)
    return MathExample(
        problem=_required_text(row, "problem", ref),
        solution=_required_text(row, "solution", ref),
        row=ref,
    )


def code_example_from_row(row: Mapping[str, Any], ref: RowRef) -> CodeExample:
    """Validate one code row (module docstring); raises BadRowError."""
    _check_mapping(row, ref)
    raw_id = row.get("id")
    if raw_id is None:
        example_id = f"{ref.source}#{ref.index}"
    elif isinstance(raw_id, (str, int)) and not isinstance(raw_id, bool) and str(raw_id).strip():
        example_id = str(raw_id)
    else:
        raise BadRowError(ref, "id", f"must be a non-empty str or int, got {_describe(raw_id)}")
    public_tests = _tests(row, "public_tests", ref, required=True)
    return CodeExample(
        id=example_id,
        problem=_required_text(row, "problem", ref),
        input_format=_optional_text(row, "input_format", ref),
        output_format=_optional_text(row, "output_format", ref),
        constraints=_optional_text(row, "constraints", ref),
        examples=_tests(row, "examples", ref, required=False),
        public_tests=public_tests,
        hidden_tests=_tests(row, "hidden_tests", ref, required=False),
        reference_solution=_required_text(row, "reference_solution", ref),
        algorithm_hint=_optional_text(row, "algorithm_hint", ref),
        row=ref,
    )


def _check_mapping(row: Any, ref: RowRef) -> None:
    if not isinstance(row, Mapping):
        raise BadRowError(ref, "<row>", f"must be an object, got {_describe(row)}")


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"


def _required_text(row: Mapping[str, Any], name: str, ref: RowRef, *, prefix: str = "") -> str:
    value = row.get(name)
    if value is None:
        raise BadRowError(ref, prefix + name, "is missing or null")
    if not isinstance(value, str):
        raise BadRowError(ref, prefix + name, f"must be a str, got {_describe(value)}")
    if not value.strip():
        raise BadRowError(ref, prefix + name, "is empty")
    return value


def _optional_text(row: Mapping[str, Any], name: str, ref: RowRef) -> str:
    value = row.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadRowError(ref, name, f"must be a str or null, got {_describe(value)}")
    return value


def _tests(row: Mapping[str, Any], name: str, ref: RowRef, *, required: bool) -> tuple[TestCase, ...]:
    value = row.get(name)
    if value is None:
        if required:
            raise BadRowError(ref, name, "is missing or null")
        return ()
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        raise BadRowError(ref, name, f"must be a list of {{input, output}} objects, got {_describe(value)}")
    if required and not value:
        raise BadRowError(ref, name, "is empty")
    cases = []
    for i, case in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(case, Mapping):
            raise BadRowError(ref, where, f"must be an {{input, output}} object, got {_describe(case)}")
        fields = []
        for key in ("input", "output"):
            text = case.get(key)
            if not isinstance(text, str):  # an empty string is a legal input or output
                reason = "is missing or null" if text is None else f"must be a str, got {_describe(text)}"
                raise BadRowError(ref, f"{where}.{key}", reason)
            fields.append(text)
        cases.append(TestCase(*fields))
    return tuple(cases)


# ----------------------------------------------------------------------------------------------------------------
# Sources


def _is_local(source: str) -> bool:
    return Path(source).exists() or Path(source).suffix.lower() in LOCAL_FORMATS


def _load_rows(source: str, *, split: str, cache_dir: str | None):
    """(name for messages, iterable of row dicts) for one source, through `datasets`."""
    import datasets  # imported here: the `data` extra is not needed by the rest of the package

    if not _is_local(source):
        # Hub dataset id (needs the network; not exercised by the tests).
        return f"{source}[{split}]", datasets.load_dataset(source, split=split, cache_dir=cache_dir)
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"data source {source!r} does not exist or is not a file")
    builder = LOCAL_FORMATS.get(path.suffix.lower())
    if builder is None:
        raise ValueError(f"data source {source!r}: suffix {path.suffix!r} is not one of {tuple(LOCAL_FORMATS)}")
    if _is_blank(path):
        raise ValueError(f"data source {source!r} is empty: no rows")
    try:
        dataset = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache_dir)
    except Exception as err:  # Arrow/JSON parse errors name neither the file nor the line nor the fix
        where = _first_bad_json_line(path) if builder == "json" else None
        raise ValueError(
            f"data source {source!r}{where or ''}: `datasets` could not read it as {builder}: "
            f"{err or type(err).__name__}"
        ) from err
    return str(path), dataset


def _is_blank(path: Path, chunk: int = 1 << 16) -> bool:
    """Whether the file holds only whitespace (read until the first other byte)."""
    with path.open("rb") as f:
        while block := f.read(chunk):
            if block.strip():
                return False
    return True


def _first_bad_json_line(path: Path) -> str | None:
    """', line N: not valid JSON (...)' for the first non-blank line that is no JSON value (JSON lines), None if
    every line parses or the whole file is one JSON document."""
    import json

    if path.suffix.lower() == ".json":
        try:
            with path.open(encoding="utf-8") as f:
                json.load(f)
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass  # maybe JSON lines under a .json name: check line by line
    with path.open(encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError as err:
                    return f", line {lineno}: not valid JSON ({err.msg}, column {err.colno})"
    return None
