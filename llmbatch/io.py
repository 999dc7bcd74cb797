"""A job's files: its input (JSONL, CSV, Parquet, a folder of text files, or stdin) and
its output tables (CSV, Parquet).

Every input item becomes one :class:`Record`, read lazily in input order. A record
that cannot be read (a malformed JSON line, a missing or duplicate id, an undecodable
file) is still a record, with ``error`` saying why and where, so that it ends as one
error line in the output instead of sinking the run or vanishing.

Keys name items across runs (the checkpoint store is keyed by them):

* ``id_field="id"``: the record's own field (duplicates are errors);
* a folder: the file's path relative to the folder;
* otherwise a hash of the record's content, so reordering the input keeps the keys;
  identical records are told apart by their occurrence (``…~2``).

A folder input reads the text files it holds (:data:`TEXT_SUFFIXES`) and skips the rest
(images, binaries, files without a suffix), but never silently: each read logs one
``io.skipped_files`` event (info) with their count, suffixes and a few names, and one
``io.skipped_file`` event (debug) per file, so a folder of ``.pdf`` files does not look
like an empty job.

Output tables (:class:`TableWriter`) have one column per top-level field of a typed
answer (:func:`field_kinds` reads them from the response model's JSON Schema); each is
written to ``NAME.partial`` and renamed over ``NAME`` (:class:`AtomicFile`), so a reader
never sees a torn file.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import json
import os
import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal, TextIO, cast

from llmbatch._log import get_logger

__all__ = [
    "FORMATS",
    "OUTPUT_FORMATS",
    "AtomicFile",
    "ColumnKind",
    "Record",
    "TableWriter",
    "answer_fields",
    "check_output_format",
    "count_records",
    "detect_format",
    "detect_output_format",
    "field_kinds",
    "read_records",
]

#: the input formats ``read_records`` understands
FORMATS = ("jsonl", "csv", "parquet", "folder")
#: the formats a job's output can be written in
OUTPUT_FORMATS = ("jsonl", "csv", "parquet")
_PARQUET_EXTRA = "pip install 'llmbatch[parquet]'"
_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv"}
_SUFFIXES |= {".parquet": "parquet", ".pq": "parquet"}
#: the files a folder input reads (other files are skipped, and logged)
TEXT_SUFFIXES = frozenset({".txt", ".md", ".rst", ".text"})
#: how many skipped files the summary event names
_EXAMPLES = 3

logger = get_logger("llmbatch.io")


@dataclass(frozen=True, slots=True)
class Record:
    """One input item.

    Attributes:
        index: its position in the input, from 0.
        source: where it came from, for messages: ``"docs.jsonl:3"`` (line 3),
            ``"table.csv:5"`` (line 5, the header being line 1), ``"docs/a.txt"``.
        key: its stable name (see the module docstring).
        fields: its fields (a folder's file: ``text``, ``name``, ``path``).
        error: why it could not be read, or ``None``.
    """

    index: int
    source: str
    key: str
    fields: Mapping[str, Any]
    error: str | None = None


def detect_format(path: str | Path) -> str:
    """The format of *path* from its suffix (a directory is ``"folder"``; ``-`` is JSONL).

    Raises:
        ValueError: the suffix is not one llmbatch reads.
    """
    if str(path) == "-":
        return "jsonl"
    p = Path(path)
    if p.is_dir():
        return "folder"
    found = _SUFFIXES.get(p.suffix.lower())
    if found is None:
        raise ValueError(
            f"cannot tell the format of {p.name!r} from its suffix: "
            "use .jsonl, .csv, .parquet or a folder of text files, or pass --format"
        )
    return found


def read_records(
    path: str | Path,
    *,
    format: str | None = None,
    id_field: str | None = None,
    limit: int | None = None,
    stdin: TextIO | None = None,
    report_skipped: bool = True,
) -> Iterator[Record]:
    """The records of *path* in input order (``-``: JSON lines from standard input).

    Args:
        path: a file, a folder, or ``-``.
        format: one of :data:`FORMATS` (default: from the suffix).
        id_field: the field holding each record's key (default: a content hash).
        limit: read at most this many records.
        stdin: the stream ``-`` reads (default ``sys.stdin``).
        report_skipped: log the files a folder input skips (``False`` for a second
            read of the same input, so that it is said once).

    Raises:
        FileNotFoundError: *path* does not exist.
        ValueError: the format is unknown, or the file as a whole is unreadable (a CSV
            without a header, a Parquet file that is not one).
    """
    rows = _rows(path, format, stdin or sys.stdin, report_skipped)  # raises here
    by_path = (format or detect_format(path)) == "folder"
    return _records(rows, _Keys(id_field, by_path=by_path), limit)


def _records(rows: Iterator[_Row], keys: _Keys, limit: int | None) -> Iterator[Record]:
    for index, (source, fields, error) in enumerate(rows):
        if limit is not None and index >= limit:
            return
        if error is None:
            key, error = keys.key(source, fields)
        elif keys.by_path:
            key = str(fields["path"])  # fixing the file's encoding keeps its key
        else:
            key = keys.error_key(source)
        yield Record(index=index, source=source, key=key, fields=fields, error=error)


def count_records(path: str | Path, *, format: str | None = None) -> int | None:
    """How many records *path* holds (``None`` for stdin), without keeping them.

    A folder's files are counted, not read, and its skipped files are not logged
    again: reading it logs them.
    """
    if str(path) == "-":
        return None
    if Path(path).is_dir() and (format or "folder") == "folder":
        return len(_folder_files(Path(path))[0])
    return sum(1 for _ in _rows(path, format, sys.stdin))


def _rows(
    path: str | Path, format: str | None, stdin: TextIO, report_skipped: bool = False
) -> Iterator[_Row]:
    if str(path) != "-" and not Path(path).exists():
        raise FileNotFoundError(f"input not found: {path}")
    fmt = format or detect_format(path)
    if fmt not in FORMATS:
        raise ValueError(f"unknown input format {fmt!r}: use one of {', '.join(FORMATS)}")
    if fmt == "folder":
        return _folder_rows(path, stdin, report_skipped=report_skipped)
    return _ROW_READERS[fmt](path, stdin)


# -- row readers: (source, fields, error) in input order --------------------------------

_Row = tuple[str, Mapping[str, Any], str | None]
_EMPTY: Mapping[str, Any] = {}
_BAD_BYTE = re.compile("[\udc80-\udcff]")


def _jsonl_rows(path: str | Path, stdin: TextIO) -> Iterator[_Row]:
    name = "stdin" if str(path) == "-" else Path(path).name
    with _open_lines(path, stdin) as lines:
        for lineno, raw in enumerate(lines, start=1):
            source = f"{name}:{lineno}"
            try:
                line = raw if isinstance(raw, str) else raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield (
                    source,
                    _EMPTY,
                    f"line {lineno}: not UTF-8 text ({exc.reason} at byte {exc.start})",
                )
                continue
            if lineno == 1:
                line = line.removeprefix("\ufeff")  # a byte-order mark
            if not line.strip():
                continue  # blank lines (a trailing newline, spacing) are not items
            try:
                value = json.loads(line)
            except ValueError as exc:
                yield source, _EMPTY, f"line {lineno}: not valid JSON ({exc})"
                continue
            if isinstance(value, str):
                value = {"text": value}
            if not isinstance(value, dict):
                kind = type(value).__name__
                yield source, _EMPTY, f"line {lineno}: expected a JSON object, got {kind}"
                continue
            yield source, value, None


def _csv_rows(path: str | Path, stdin: TextIO) -> Iterator[_Row]:
    name = Path(path).name
    with _open_text(path, stdin) as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            return  # an empty file: no items
        for row in reader:
            lineno = reader.line_num
            source = f"{name}:{lineno}"
            if None in row:
                yield source, _EMPTY, f"line {lineno}: more values than the header has columns"
                continue
            missing = [k for k, v in row.items() if v is None]
            if missing:
                yield source, _EMPTY, f"line {lineno}: no value for {', '.join(missing)}"
                continue
            if any(_BAD_BYTE.search(v) for v in row.values()):
                yield source, _EMPTY, f"line {lineno}: not UTF-8 text"
                continue
            yield source, row, None


def _parquet_rows(path: str | Path, stdin: TextIO) -> Iterator[_Row]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError("reading Parquet needs pyarrow: pip install 'llmbatch[parquet]'") from None
    name = Path(path).name
    try:
        table = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a bad file
        raise ValueError(f"{name} is not a readable Parquet file: {exc}") from None
    row_number = 0
    for batch in table.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            row_number += 1
            yield f"{name}:row {row_number}", row, None


def _folder_files(root: Path) -> tuple[list[Path], list[Path]]:
    """The files under *root*, sorted: those a folder input reads (by suffix, in any
    case), and those it skips (other suffixes, and hidden files and folders such as
    ``.DS_Store`` or ``.git/``)."""
    read: list[Path] = []
    skipped: list[Path] = []
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        hidden = any(part.startswith(".") for part in file.relative_to(root).parts)
        usable = not hidden and file.suffix.lower() in TEXT_SUFFIXES
        (read if usable else skipped).append(file)
    return read, skipped


def _log_skipped(root: Path, label: str, skipped: list[Path]) -> None:
    """Say which files a folder read skips: a summary (info), then each file (debug)."""
    relative = [file.relative_to(root).as_posix() for file in skipped]
    suffixes: dict[str, int] = {}
    for file in skipped:
        suffix = file.suffix.lower() or "(none)"
        suffixes[suffix] = suffixes.get(suffix, 0) + 1
    logger.info(
        "io.skipped_files",
        folder=label,
        count=len(skipped),
        suffixes=dict(sorted(suffixes.items())),
        examples=relative[:_EXAMPLES],
        reads=sorted(TEXT_SUFFIXES),
    )
    for name in relative:
        logger.debug("io.skipped_file", folder=label, path=name)


def _folder_rows(path: str | Path, stdin: TextIO, *, report_skipped: bool = True) -> Iterator[_Row]:
    root = Path(path)
    label = root.resolve().name
    files, skipped = _folder_files(root)
    if skipped and report_skipped:
        _log_skipped(root, label, skipped)
    for file in files:
        relative = file.relative_to(root).as_posix()
        source = f"{label}/{relative}"
        fields = {"name": file.stem, "path": relative}
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            yield source, fields, f"{source}: not UTF-8 text ({exc.reason} at byte {exc.start})"
            continue
        except OSError as exc:
            yield source, fields, f"{source}: cannot be read ({exc.strerror})"
            continue
        yield source, {**fields, "text": text}, None


_ROW_READERS = {
    "jsonl": _jsonl_rows,
    "csv": _csv_rows,
    "parquet": _parquet_rows,
    "folder": _folder_rows,
}


def _open_text(path: str | Path, stdin: TextIO) -> contextlib.AbstractContextManager[TextIO]:
    """The file at *path* as UTF-8 text (a byte-order mark dropped), or *stdin* for
    ``-`` (left open)."""
    if str(path) == "-":
        return contextlib.nullcontext(stdin)
    # undecodable bytes become lone surrogates, so that one bad row is one bad record
    return open(path, encoding="utf-8-sig", errors="surrogateescape", newline="")


def _open_lines(
    path: str | Path, stdin: TextIO
) -> contextlib.AbstractContextManager[Iterable[str | bytes]]:
    """The lines of *path* as bytes (each decoded by the caller, so one bad line is one
    bad record), or of *stdin* for ``-``."""
    if str(path) == "-":
        return contextlib.nullcontext(stdin)
    return open(path, "rb")


# -- keys ------------------------------------------------------------------------------


class _Keys:
    """Hands out each record's key; remembers them to catch duplicates."""

    def __init__(self, id_field: str | None, *, by_path: bool) -> None:
        self.id_field = id_field
        self.by_path = by_path
        self._seen: dict[str, str] = {}  # key -> source of its first record

    def key(self, source: str, fields: Mapping[str, Any]) -> tuple[str, str | None]:
        """``(key, error)`` for a readable record."""
        if self.id_field is not None:
            value = fields.get(self.id_field)
            if value is None or (isinstance(value, str) and not value.strip()):
                return self.error_key(source), f"{source}: no {self.id_field!r} field to key it by"
            key = str(value)
            first = self._seen.get(key)
            if first is not None:
                return self.error_key(source), f"{source}: duplicate id {key!r} (first at {first})"
            self._seen[key] = source
            return key, None
        if self.by_path:
            key = str(fields["path"])
            self._seen[key] = source
            return key, None
        digest = hashlib.sha256(
            json.dumps(fields, sort_keys=True, default=str).encode()
        ).hexdigest()[:20]
        key, n = digest, 1
        while key in self._seen:
            n += 1
            key = f"{digest}~{n}"
        self._seen[key] = source
        return key, None

    def error_key(self, source: str) -> str:
        """A key for an unreadable record: where it is (it has no content to hash)."""
        key = f"unreadable@{source}"
        self._seen[key] = source
        return key


# -- output ----------------------------------------------------------------------------

_OUTPUT_SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


def detect_output_format(path: str | Path) -> str:
    """The output format *path*'s suffix asks for: ``.csv`` is CSV, ``.parquet``/``.pq``
    Parquet, anything else JSON lines."""
    return _OUTPUT_SUFFIXES.get(Path(path).suffix.lower(), "jsonl")


def check_output_format(format: str) -> None:
    """Whether *format* can be written here.

    Raises:
        ValueError: an unknown format, or Parquet without pyarrow (saying what to install).
    """
    if format not in OUTPUT_FORMATS:
        raise ValueError(
            f"unknown output format {format!r}: use one of {', '.join(OUTPUT_FORMATS)}"
        )
    if format == "parquet":
        try:
            import pyarrow.parquet  # noqa: F401
        except ImportError:
            raise ValueError(f"writing Parquet needs pyarrow: {_PARQUET_EXTRA}") from None


def answer_fields(parsed: Any, *, mode: Literal["json", "python"] = "json") -> Any:
    """A typed answer (``Response.parsed``) as plain data.

    A pydantic model is dumped with ``model_dump(mode=mode, by_alias=True)`` (by alias:
    its keys are the JSON Schema's property names, which the answer came with); a
    dataclass becomes a dict; in ``"json"`` mode whatever else pydantic can serialize
    (dates, enums, a ``TypedDict`` holding them) becomes JSON values. A dict of JSON
    values (a JSON Schema's answer) comes back as it is.
    """
    if parsed is None or isinstance(parsed, str | int | float | bool):
        return parsed
    dump = getattr(parsed, "model_dump", None)
    if callable(dump):
        return dump(mode=mode, by_alias=True)
    if mode == "python":
        if dataclasses.is_dataclass(parsed) and not isinstance(parsed, type):
            return dataclasses.asdict(parsed)
        return parsed
    try:
        from pydantic_core import to_jsonable_python
    except ImportError:  # no pydantic: the answer came from a JSON Schema, already JSON
        return parsed
    return to_jsonable_python(parsed, by_alias=True)


#: the column kinds of an output table: how a value is typed in Parquet (CSV writes
#: text either way); ``"json"`` is a JSON-encoded string (objects, mixed types)
ColumnKind = Literal[
    "string",
    "integer",
    "number",
    "boolean",
    "json",
    "list[string]",
    "list[integer]",
    "list[number]",
    "list[boolean]",
]
_SCALARS = {"string", "integer", "number", "boolean"}


def field_kinds(schema: Mapping[str, Any]) -> dict[str, ColumnKind]:
    """The top-level properties of an object JSON Schema, in order, each with the kind
    of column that holds it: a scalar type (or an array of one) where the schema says
    so unambiguously (``null`` allowed), ``"json"`` for anything else."""
    properties = schema.get("properties")
    if not isinstance(properties, Mapping):
        return {}
    return {str(name): _kind(sub, schema) for name, sub in properties.items()}


def _kind(sub: Any, root: Mapping[str, Any], depth: int = 0) -> ColumnKind:
    scalar = _scalar(sub, root, depth)
    if scalar is not None:
        return cast(ColumnKind, scalar)
    sub = _deref(sub, root)
    if isinstance(sub, Mapping) and _types(sub) == {"array"} and depth == 0:
        inner = _scalar(sub.get("items"), root, depth + 1)
        if inner is not None:
            return cast(ColumnKind, f"list[{inner}]")
    if isinstance(sub, Mapping) and depth == 0:
        branches = [b for b in _branches(sub) if _types(_deref(b, root)) != {"null"}]
        if len(branches) == 1:
            return _kind(branches[0], root, depth)
    return "json"


def _scalar(sub: Any, root: Mapping[str, Any], depth: int) -> str | None:
    """``"string"``/``"integer"``/``"number"``/``"boolean"``, if *sub* is that (or null)."""
    sub = _deref(sub, root)
    if not isinstance(sub, Mapping) or depth > 8:
        return None
    types = _types(sub) - {"null"}
    if not types and isinstance(sub.get("enum"), list):
        values = [v for v in sub["enum"] if v is not None]
        if values and all(isinstance(v, str) for v in values):
            types = {"string"}
    if not types and "const" in sub and isinstance(sub["const"], str):
        types = {"string"}
    if types == {"integer", "number"}:
        types = {"number"}
    if len(types) == 1 and next(iter(types)) in _SCALARS:
        return next(iter(types))
    branches = [b for b in _branches(sub) if _types(_deref(b, root)) != {"null"}]
    if not types and len(branches) == 1:
        return _scalar(branches[0], root, depth + 1)
    return None


def _types(sub: Any) -> set[str]:
    if not isinstance(sub, Mapping):
        return set()
    kind = sub.get("type")
    if isinstance(kind, str):
        return {kind}
    if isinstance(kind, list):
        return {str(k) for k in kind}
    return set()


def _branches(sub: Mapping[str, Any]) -> list[Any]:
    for key in ("anyOf", "oneOf"):
        if isinstance(sub.get(key), list):
            return list(sub[key])
    return []


def _deref(sub: Any, root: Mapping[str, Any]) -> Any:
    """*sub*, or what its local ``$ref`` points at (``#/$defs/Name``)."""
    for _ in range(8):
        if not isinstance(sub, Mapping) or not isinstance(sub.get("$ref"), str):
            return sub
        target: Any = root
        for part in sub["$ref"].lstrip("#").split("/")[1:]:
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, Mapping) or part not in target:
                return {}
            target = target[part]
        sub = target
    return sub


class AtomicFile:
    """A file written as ``PATH.partial`` and renamed over *path* when closed without
    error (after an fsync): readers see the old file or the whole new one. Closed with
    an error, the partial file is removed and *path* is left as it was.

    Args:
        path: the file to write.
        binary: open the partial file in binary mode (default: UTF-8 text).
    """

    def __init__(self, path: Path, *, binary: bool = False) -> None:
        self.path = path
        self.partial = path.with_name(path.name + ".partial")
        self.binary = binary
        self._file: IO[Any] | None = None

    def __enter__(self) -> IO[Any]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.binary:
            self._file = self.partial.open("wb")
        else:
            self._file = self.partial.open("w", encoding="utf-8", newline="")
        return self._file

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._file is not None
        if exc_type is not None:
            self._file.close()
            self.partial.unlink(missing_ok=True)
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.partial, self.path)


class TableWriter:
    """Rows written as a CSV or Parquet table with fixed columns, atomically
    (:class:`AtomicFile`); use it as a context manager.

    CSV cells are text: strings as they are, ``None`` empty, booleans ``true``/``false``,
    lists and objects as JSON. Parquet columns are typed by their kind (a ``"json"``
    column holds JSON text), and rows go out in row groups of *batch_rows*, so a large
    output never sits in memory whole.

    Args:
        path: the file to write.
        format: ``"csv"`` or ``"parquet"`` (the ``parquet`` extra).
        columns: the column names, in order, with their kinds (see :data:`ColumnKind`).
        batch_rows: rows per Parquet row group.

    Raises:
        ValueError: another format, or Parquet without pyarrow.
    """

    def __init__(
        self,
        path: Path,
        format: str,
        columns: Mapping[str, ColumnKind],
        *,
        batch_rows: int = 10_000,
    ) -> None:
        if format not in ("csv", "parquet"):
            raise ValueError(f"a table is written as csv or parquet, not {format!r}")
        check_output_format(format)
        self.format = format
        self.columns = dict(columns)
        self.batch_rows = batch_rows
        self._atomic = AtomicFile(path, binary=format == "parquet")
        self._file: IO[Any] | None = None
        self._csv: Any = None
        self._parquet: Any = None
        self._schema: Any = None
        self._rows: list[dict[str, Any]] = []

    def __enter__(self) -> TableWriter:
        self._file = self._atomic.__enter__()
        if self.format == "csv":
            self._csv = csv.writer(self._file)
            self._csv.writerow(list(self.columns))
        else:
            import pyarrow.parquet as pq

            self._schema = _arrow_schema(self.columns)
            self._parquet = pq.ParquetWriter(self._file, self._schema)
        return self

    def write(self, row: Mapping[str, Any]) -> None:
        """Add one row (missing columns are empty; other keys are ignored)."""
        if self._csv is not None:
            self._csv.writerow([_csv_cell(row.get(name)) for name in self.columns])
            return
        self._rows.append(
            {name: _arrow_value(row.get(name), kind) for name, kind in self.columns.items()}
        )
        if len(self._rows) >= self.batch_rows:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if self._rows and self._parquet is not None:
            table = pa.Table.from_pylist(self._rows, schema=self._schema)
            self._parquet.write_table(table)
        self._rows = []

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self._parquet is not None:
                if exc_type is None:
                    self._flush()
                self._parquet.close()  # writes the footer; the file stays open
        except BaseException as error:  # the partial file is not to replace the old one
            self._atomic.__exit__(type(error), error, error.__traceback__)
            raise
        self._atomic.__exit__(exc_type, exc, tb)


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value) if isinstance(value, float) else str(value)
    return json.dumps(value, ensure_ascii=False, default=str)


def _arrow_value(value: Any, kind: ColumnKind) -> Any:
    if value is None or kind != "json":
        return value
    return json.dumps(value, ensure_ascii=False, default=str)


def _arrow_schema(columns: Mapping[str, ColumnKind]) -> Any:
    import pyarrow as pa

    scalars = {
        "string": pa.string(),
        "integer": pa.int64(),
        "number": pa.float64(),
        "boolean": pa.bool_(),
        "json": pa.string(),
    }
    fields = []
    for name, kind in columns.items():
        if kind.startswith("list["):
            fields.append(pa.field(name, pa.list_(scalars[kind[5:-1]])))
        else:
            fields.append(pa.field(name, scalars[kind]))
    return pa.schema(fields)
