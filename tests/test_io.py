"""Tests for llmbatch.io: formats, per-record errors, stable keys, limits and counts."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from llmbatch.io import FORMATS, Record, count_records, detect_format, read_records

# -- helpers ---------------------------------------------------------------------------


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8", newline="")
    return path


def _read(path: str | Path, **kwargs: Any) -> list[Record]:
    return list(read_records(path, **kwargs))


def _rows(records: list[Record]) -> list[tuple[int, str, dict[str, Any], str | None]]:
    """Everything about the records but their keys (hashes are checked separately)."""
    return [(r.index, r.source, dict(r.fields), r.error) for r in records]


def _folder(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


# -- format detection ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("docs.jsonl", "jsonl"),
        ("docs.ndjson", "jsonl"),
        ("docs.json", "jsonl"),
        ("DOCS.JSONL", "jsonl"),
        ("table.csv", "csv"),
        ("table.CSV", "csv"),
        ("table.parquet", "parquet"),
        ("table.pq", "parquet"),
    ],
)
def test_detect_format_by_suffix(tmp_path: Path, name: str, expected: str) -> None:
    """The suffix, in any case, names the format (the file need not exist yet)."""
    assert expected == detect_format(tmp_path / name)


def test_detect_format_directory_is_folder(tmp_path: Path) -> None:
    """A directory is a folder input, even when its name has a file suffix."""
    folder = tmp_path / "looks_like.csv"
    folder.mkdir()
    assert "folder" == detect_format(folder)
    assert "folder" == detect_format(str(folder))


def test_detect_format_dash_is_jsonl() -> None:
    """``-`` (standard input) is read as JSON lines."""
    assert "jsonl" == detect_format("-")


@pytest.mark.parametrize("name", ["notes.txt", "data.xml", "no_suffix"])
def test_detect_format_unknown_suffix_raises(tmp_path: Path, name: str) -> None:
    """An unknown suffix is a ValueError naming the file and the way out (--format)."""
    with pytest.raises(ValueError, match=rf"cannot tell the format of '{name}'.*--format"):
        detect_format(tmp_path / name)


def test_read_records_rejects_unknown_format(tmp_path: Path) -> None:
    """An explicit format outside FORMATS is a ValueError listing the known ones."""
    path = _write(tmp_path / "docs.jsonl", '{"a": 1}\n')
    with pytest.raises(ValueError, match="unknown input format 'xml': use one of jsonl, csv"):
        _read(path, format="xml")


def test_formats_constant() -> None:
    """The formats read_records understands are exactly these four."""
    assert ("jsonl", "csv", "parquet", "folder") == FORMATS


def test_explicit_format_overrides_suffix(tmp_path: Path) -> None:
    """``format=`` reads a file whose suffix says nothing (or something else)."""
    path = _write(tmp_path / "docs.txt", '{"a": 1}\n')
    assert [(0, "docs.txt:1", {"a": 1}, None)] == _rows(_read(path, format="jsonl"))


@pytest.mark.parametrize("name", ["missing.jsonl", "missing.csv", "missing.parquet"])
def test_missing_path_raises_file_not_found(tmp_path: Path, name: str) -> None:
    """A path that does not exist is a FileNotFoundError naming it."""
    with pytest.raises(FileNotFoundError, match=f"input not found: .*{name}"):
        _read(tmp_path / name)


def test_missing_folder_raises_file_not_found(tmp_path: Path) -> None:
    """A mistyped folder is reported as missing, not as an unknown format."""
    with pytest.raises(FileNotFoundError, match="input not found"):
        _read(tmp_path / "mistyped_folder")


# -- JSONL -----------------------------------------------------------------------------


def test_jsonl_objects_in_order(tmp_path: Path) -> None:
    """Each line's object becomes a record, in order, with ``name:line`` as its source."""
    path = _write(tmp_path / "docs.jsonl", '{"text": "a", "n": 1}\n{"text": "b", "n": 2}\n')
    expected = [
        (0, "docs.jsonl:1", {"text": "a", "n": 1}, None),
        (1, "docs.jsonl:2", {"text": "b", "n": 2}, None),
    ]
    assert expected == _rows(_read(path))


def test_jsonl_bare_string_becomes_text(tmp_path: Path) -> None:
    """A line holding a JSON string is the record ``{"text": ...}``."""
    path = _write(tmp_path / "docs.jsonl", '"just a sentence"\n')
    assert [(0, "docs.jsonl:1", {"text": "just a sentence"}, None)] == _rows(_read(path))


def test_jsonl_blank_lines_are_not_items(tmp_path: Path) -> None:
    """Blank and whitespace-only lines are skipped; sources keep the real line numbers."""
    path = _write(tmp_path / "docs.jsonl", '\n{"a": 1}\n   \n\t\n{"a": 2}\n\n')
    expected = [(0, "docs.jsonl:2", {"a": 1}, None), (1, "docs.jsonl:5", {"a": 2}, None)]
    assert expected == _rows(_read(path))


def test_jsonl_crlf_line_endings(tmp_path: Path) -> None:
    """Windows line endings read like Unix ones."""
    path = tmp_path / "docs.jsonl"
    path.write_bytes(b'{"a": 1}\r\n{"a": 2}\r\n')
    expected = [(0, "docs.jsonl:1", {"a": 1}, None), (1, "docs.jsonl:2", {"a": 2}, None)]
    assert expected == _rows(_read(path))


def test_jsonl_malformed_line_is_an_error_record_and_the_run_continues(tmp_path: Path) -> None:
    """A line that is not JSON is a record with an error naming its line; later lines read."""
    path = _write(tmp_path / "docs.jsonl", '{"a": 1}\n{"a": \n{"a": 3}\n')
    records = _read(path)
    assert [0, 1, 2] == [r.index for r in records]
    assert [None, None] == [records[0].error, records[2].error]
    assert {"a": 3} == records[2].fields
    bad = records[1]
    assert "docs.jsonl:2" == bad.source
    assert {} == dict(bad.fields)
    assert "unreadable@docs.jsonl:2" == bad.key
    assert bad.error is not None
    assert bad.error.startswith("line 2: not valid JSON (")


@pytest.mark.parametrize(
    ("line", "kind"),
    [
        ("[1, 2]", "list"),
        ("42", "int"),
        ("1.5", "float"),
        ("true", "bool"),
        ("null", "NoneType"),
    ],
)
def test_jsonl_non_object_is_an_error_record(tmp_path: Path, line: str, kind: str) -> None:
    """JSON that is neither an object nor a string is an error naming what it was."""
    path = _write(tmp_path / "docs.jsonl", f'{{"ok": true}}\n{line}\n{{"ok": false}}\n')
    expected = [
        (0, "docs.jsonl:1", {"ok": True}, None),
        (1, "docs.jsonl:2", {}, f"line 2: expected a JSON object, got {kind}"),
        (2, "docs.jsonl:3", {"ok": False}, None),
    ]
    assert expected == _rows(_read(path))


def test_stdin_reads_json_lines() -> None:
    """``-`` reads JSON lines from the given stream, with ``stdin:N`` sources."""
    stream = io.StringIO('{"a": 1}\n\n"hello"\nnope\n')
    records = _read("-", stdin=stream)
    expected = [
        (0, "stdin:1", {"a": 1}, None),
        (1, "stdin:3", {"text": "hello"}, None),
    ]
    assert expected == _rows(records[:2])
    assert "stdin:4" == records[2].source
    assert records[2].error is not None
    assert records[2].error.startswith("line 4: not valid JSON")


def test_stdin_csv_with_explicit_format() -> None:
    """``-`` with ``format="csv"`` reads CSV from the stream."""
    records = _read("-", format="csv", stdin=io.StringIO("id,text\n1,hi\n"))
    assert [(0, "-:2", {"id": "1", "text": "hi"}, None)] == _rows(records)


def test_jsonl_undecodable_line_is_an_error_record(tmp_path: Path) -> None:
    """A line with bytes that are not UTF-8 is one error record; the others still read."""
    path = tmp_path / "docs.jsonl"
    path.write_bytes(b'{"a": 1}\n{"b": "\xff"}\n{"c": 3}\n')
    records = _read(path)
    assert [None, None] == [records[0].error, records[2].error]
    assert records[1].error is not None
    assert records[1].error.startswith("line 2:")


@pytest.mark.parametrize(
    ("name", "content"),
    [("table.csv", "id,text\nx1,hi\n"), ("docs.jsonl", '{"id": "x1", "text": "hi"}\n')],
)
def test_utf8_byte_order_mark_is_ignored(tmp_path: Path, name: str, content: str) -> None:
    """A UTF-8 BOM at the start of the file is not part of the first field or line."""
    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + content.encode())
    records = _read(path, id_field="id")
    assert [("x1", {"id": "x1", "text": "hi"}, None)] == [
        (r.key, dict(r.fields), r.error) for r in records
    ]


# -- CSV -------------------------------------------------------------------------------


def test_csv_header_names_the_fields(tmp_path: Path) -> None:
    """Each row is a record of strings keyed by the header; the header is line 1."""
    path = _write(tmp_path / "table.csv", 'id,text\n1,alpha\n2,"beta, gamma"\n')
    expected = [
        (0, "table.csv:2", {"id": "1", "text": "alpha"}, None),
        (1, "table.csv:3", {"id": "2", "text": "beta, gamma"}, None),
    ]
    assert expected == _rows(_read(path))


def test_csv_blank_rows_are_skipped_and_lines_still_counted(tmp_path: Path) -> None:
    """Blank rows are not items, and the lines after them keep their real numbers."""
    path = _write(tmp_path / "table.csv", "text\nalpha\n\nbeta\n")
    expected = [
        (0, "table.csv:2", {"text": "alpha"}, None),
        (1, "table.csv:4", {"text": "beta"}, None),
    ]
    assert expected == _rows(_read(path))


def test_csv_rows_of_the_wrong_width_are_error_records(tmp_path: Path) -> None:
    """Too many or too few values is an error for that row; the rows after it read."""
    path = _write(tmp_path / "table.csv", "a,b,c\n1,2,3\n1,2,3,4\n5\n6,7,8\n")
    expected = [
        (0, "table.csv:2", {"a": "1", "b": "2", "c": "3"}, None),
        (1, "table.csv:3", {}, "line 3: more values than the header has columns"),
        (2, "table.csv:4", {}, "line 4: no value for b, c"),
        (3, "table.csv:5", {"a": "6", "b": "7", "c": "8"}, None),
    ]
    records = _read(path)
    assert expected == _rows(records)
    assert ["unreadable@table.csv:3", "unreadable@table.csv:4"] == [r.key for r in records[1:3]]


@pytest.mark.parametrize("content", ["", "id,text\n", "id,text"])
def test_csv_without_rows_has_no_records(tmp_path: Path, content: str) -> None:
    """An empty CSV, or one with only a header, yields nothing."""
    path = _write(tmp_path / "table.csv", content)
    assert [] == _read(path)
    assert 0 == count_records(path)


# -- Parquet ---------------------------------------------------------------------------


def test_parquet_rows(tmp_path: Path) -> None:
    """Each Parquet row is a record with ``name:row N`` sources, across row groups."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    n = 2500  # more than one 1024-row batch and several row groups
    table = pa.table({"id": list(range(n)), "text": [f"t{i}" for i in range(n)]})
    path = tmp_path / "table.parquet"
    pq.write_table(table, path, row_group_size=700)

    records = _read(path, id_field="id")
    assert n == len(records)
    assert (0, "table.parquet:row 1", {"id": 0, "text": "t0"}, None) == _rows(records)[0]
    last = (n - 1, f"table.parquet:row {n}", {"id": n - 1, "text": f"t{n - 1}"}, None)
    assert last == _rows(records)[-1]
    assert [str(i) for i in range(n)] == [r.key for r in records]
    assert n == count_records(path)


@pytest.mark.parametrize("content", [b"", b"id,text\n1,not parquet\n"])
def test_a_non_parquet_file_with_parquet_suffix_raises(tmp_path: Path, content: bytes) -> None:
    """A .parquet file that is not Parquet is a ValueError naming the file."""
    pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "table.parquet"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"table\.parquet is not a readable Parquet file"):
        _read(path)


# -- folder ----------------------------------------------------------------------------


def test_folder_reads_text_files_sorted_and_recursively(tmp_path: Path) -> None:
    """Only .txt/.md/.rst/.text files (any case), sorted, from every subfolder."""
    root = _folder(
        tmp_path / "docs",
        {
            "g.TXT": b"upper suffix",
            "b.md": b"# title",
            "a.txt": b"alpha",
            "c/e/f.text": b"deep",
            "c/d.rst": b"rest",
            "image.png": b"\x89PNG",
            "data.json": b"{}",
            "c/notes.pdf": b"%PDF",
            "c/e/README": b"no suffix",
        },
    )
    expected = [
        (0, "docs/a.txt", {"name": "a", "path": "a.txt", "text": "alpha"}, None),
        (1, "docs/b.md", {"name": "b", "path": "b.md", "text": "# title"}, None),
        (2, "docs/c/d.rst", {"name": "d", "path": "c/d.rst", "text": "rest"}, None),
        (3, "docs/c/e/f.text", {"name": "f", "path": "c/e/f.text", "text": "deep"}, None),
        (4, "docs/g.TXT", {"name": "g", "path": "g.TXT", "text": "upper suffix"}, None),
    ]
    records = _read(root)
    assert expected == _rows(records)
    assert ["a.txt", "b.md", "c/d.rst", "c/e/f.text", "g.TXT"] == [r.key for r in records]
    assert 5 == count_records(root)


def test_folder_keys_do_not_depend_on_the_folders_location(tmp_path: Path) -> None:
    """The same tree in two places gives the same keys (the relative paths)."""
    files = {"x/one.txt": b"1", "two.md": b"2"}
    first = _read(_folder(tmp_path / "here", files))
    second = _read(_folder(tmp_path / "elsewhere" / "there", files))
    assert ["two.md", "x/one.txt"] == [r.key for r in first]
    assert [r.key for r in first] == [r.key for r in second]


def test_folder_undecodable_file_is_an_error_record(tmp_path: Path) -> None:
    """A file that is not UTF-8 is an error record; the files after it still read."""
    root = _folder(tmp_path / "docs", {"a.txt": b"fine", "b.txt": b"caf\xe9 noir", "c.txt": b"ok"})
    records = _read(root)
    expected = [
        (0, "docs/a.txt", {"name": "a", "path": "a.txt", "text": "fine"}, None),
        (
            1,
            "docs/b.txt",
            {"name": "b", "path": "b.txt"},
            "docs/b.txt: not UTF-8 text (invalid continuation byte at byte 3)",
        ),
        (2, "docs/c.txt", {"name": "c", "path": "c.txt", "text": "ok"}, None),
    ]
    assert expected == _rows(records)
    assert "b.txt" == records[1].key  # the same key once the file is fixed


def test_folder_empty_file_is_a_record(tmp_path: Path) -> None:
    """An empty text file is still an item, with empty text."""
    root = _folder(tmp_path / "docs", {"empty.txt": b""})
    assert [(0, "docs/empty.txt", {"name": "empty", "path": "empty.txt", "text": ""}, None)] == (
        _rows(_read(root))
    )


def test_empty_folder_has_no_records(tmp_path: Path) -> None:
    """A folder with no text files yields nothing and counts 0."""
    root = _folder(tmp_path / "docs", {"image.png": b"\x89PNG"})
    assert [] == _read(root)
    assert 0 == count_records(root)


def test_folder_source_for_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading ``.`` does not give sources that look like absolute paths."""
    _folder(tmp_path, {"a.txt": b"alpha"})
    monkeypatch.chdir(tmp_path)
    (record,) = _read(".")
    assert "a.txt" == record.key
    assert not record.source.startswith("/")


_MIXED = {
    "a.txt": b"alpha",
    "b.png": b"\x89PNG",
    "c/d.bin": b"\x00",
    "c/e.PNG": b"\x89PNG",
    "c/README": b"no suffix",
    "f.md": b"# f",
}


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        (
            _MIXED,
            [
                {
                    "event": "io.skipped_files",
                    "log_level": "info",
                    "folder": "docs",
                    "count": 4,
                    "suffixes": {"(none)": 1, ".bin": 1, ".png": 2},
                    "examples": ["b.png", "c/README", "c/d.bin"],
                    "reads": [".md", ".rst", ".text", ".txt"],
                },
                {
                    "event": "io.skipped_file",
                    "log_level": "debug",
                    "folder": "docs",
                    "path": "b.png",
                },
                {
                    "event": "io.skipped_file",
                    "log_level": "debug",
                    "folder": "docs",
                    "path": "c/README",
                },
                {
                    "event": "io.skipped_file",
                    "log_level": "debug",
                    "folder": "docs",
                    "path": "c/d.bin",
                },
                {
                    "event": "io.skipped_file",
                    "log_level": "debug",
                    "folder": "docs",
                    "path": "c/e.PNG",
                },
            ],
        ),
        ({"a.txt": b"alpha", "B.MD": b"# b"}, []),  # nothing skipped: nothing said
    ],
)
def test_folder_logs_the_files_it_skips(
    tmp_path: Path, files: dict[str, bytes], expected: list[dict[str, Any]]
) -> None:
    """Reading a folder logs one info summary of the files it skips (count, suffixes,
    the first names) and one debug event per skipped file; text files are still read."""
    root = _folder(tmp_path / "docs", files)
    with capture_logs() as logs:
        records = _read(root)
    assert expected == logs
    assert sorted(n for n in files if n.lower().endswith((".txt", ".md"))) == [
        r.key for r in records
    ]


def test_a_folder_of_skipped_files_only_says_so_once_per_read(tmp_path: Path) -> None:
    """A folder with nothing to read yields no record but logs why, once per read;
    counting its records logs nothing (a read that follows will)."""
    root = _folder(tmp_path / "docs", {"scan.pdf": b"%PDF", "photo.jpg": b"\xff\xd8"})
    with capture_logs() as logs:
        assert 0 == count_records(root)
        assert [] == _read(root)
        assert [] == _read(root)
    summaries = [(e["count"], e["suffixes"]) for e in logs if e["event"] == "io.skipped_files"]
    assert [(2, {".jpg": 1, ".pdf": 1})] * 2 == summaries


def test_count_records_of_a_folder_counts_its_text_files_without_reading_them(
    tmp_path: Path,
) -> None:
    """A folder's count is its text files, an undecodable one included (it becomes an
    error record)."""
    root = _folder(tmp_path / "docs", {**_MIXED, "bad.txt": b"caf\xe9"})
    assert len(_read(root)) == count_records(root) == 3


# -- keys ------------------------------------------------------------------------------


def test_hash_keys_are_stable_across_reads(tmp_path: Path) -> None:
    """Reading the same input twice gives the same keys: 20 hex characters each."""
    path = _write(tmp_path / "docs.jsonl", '{"a": 1}\n{"a": 2}\n"three"\n')
    first = [r.key for r in _read(path)]
    second = [r.key for r in _read(path)]
    assert first == second
    assert 3 == len(set(first))
    assert [20, 20, 20] == [len(k) for k in first]
    assert all(set(k) <= set("0123456789abcdef") for k in first)


def test_hash_keys_do_not_depend_on_position_or_file(tmp_path: Path) -> None:
    """A record moved elsewhere in the input (or to another file) keeps its key."""
    lines = ['{"t": "x"}', '{"t": "y"}', '{"t": "z"}']
    before = _read(_write(tmp_path / "before.jsonl", "\n".join(lines) + "\n"))
    after = _read(_write(tmp_path / "after.jsonl", "\n".join(lines[::-1]) + "\n"))
    assert {r.fields["t"]: r.key for r in before} == {r.fields["t"]: r.key for r in after}
    assert ["z", "y", "x"] == [r.fields["t"] for r in after]


def test_hash_keys_ignore_field_order(tmp_path: Path) -> None:
    """The same fields written in another order are the same record."""
    one = _read(_write(tmp_path / "one.jsonl", '{"a": 1, "b": 2}\n'))
    two = _read(_write(tmp_path / "two.jsonl", '{"b": 2, "a": 1}\n'))
    assert one[0].key == two[0].key


def test_hash_keys_differ_for_different_content(tmp_path: Path) -> None:
    """Records that differ in any value get different keys."""
    path = _write(tmp_path / "docs.jsonl", '{"a": 1}\n{"a": "1"}\n{"a": 1, "b": null}\n')
    assert 3 == len({r.key for r in _read(path)})


def test_identical_records_get_distinct_keys(tmp_path: Path) -> None:
    """Repeats of one record are told apart by occurrence: ``key``, ``key~2``, ``key~3``."""
    path = _write(tmp_path / "docs.jsonl", '"same"\n"other"\n"same"\n{"text": "same"}\n')
    keys = [r.key for r in _read(path)]
    base = keys[0]
    assert [base, keys[1], f"{base}~2", f"{base}~3"] == keys
    assert base != keys[1]


def test_id_field_keys(tmp_path: Path) -> None:
    """With ``id_field`` the record's own field is its key (stringified)."""
    path = _write(tmp_path / "docs.jsonl", '{"id": "doc-a"}\n{"id": 7}\n{"id": 0}\n')
    assert ["doc-a", "7", "0"] == [r.key for r in _read(path, id_field="id")]


@pytest.mark.parametrize(
    "line", ['{"text": "no id"}', '{"id": null}', '{"id": ""}', '{"id": "  "}']
)
def test_missing_id_is_an_error_record(tmp_path: Path, line: str) -> None:
    """A record without a usable id is an error; the records around it keep theirs."""
    path = _write(tmp_path / "docs.jsonl", f'{{"id": "a"}}\n{line}\n{{"id": "b"}}\n')
    records = _read(path, id_field="id")
    assert ["a", "unreadable@docs.jsonl:2", "b"] == [r.key for r in records]
    assert [None, "docs.jsonl:2: no 'id' field to key it by", None] == [r.error for r in records]


def test_duplicate_id_is_an_error_naming_the_first(tmp_path: Path) -> None:
    """A repeated id is an error that names where it first appeared; the first one stands."""
    path = _write(tmp_path / "docs.jsonl", '{"id": "a"}\n{"id": "b"}\n\n{"id": "a"}\n')
    records = _read(path, id_field="id")
    assert ["a", "b", "unreadable@docs.jsonl:4"] == [r.key for r in records]
    assert [None, None, "docs.jsonl:4: duplicate id 'a' (first at docs.jsonl:1)"] == [
        r.error for r in records
    ]


def test_duplicate_id_in_csv_names_the_first_line(tmp_path: Path) -> None:
    """CSV ids are checked the same way, with CSV line numbers."""
    path = _write(tmp_path / "table.csv", "id,text\nk1,a\nk1,b\n")
    records = _read(path, id_field="id")
    assert [None, "table.csv:3: duplicate id 'k1' (first at table.csv:2)"] == [
        r.error for r in records
    ]


# -- limit and count -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("limit", "expected"),
    [(None, ["a", "b", "c"]), (0, []), (1, ["a"]), (2, ["a", "b"]), (3, ["a", "b", "c"])],
)
def test_limit(tmp_path: Path, limit: int | None, expected: list[str]) -> None:
    """``limit`` reads at most that many records, from the start."""
    path = _write(tmp_path / "docs.jsonl", '"a"\n"b"\n"c"\n')
    assert expected == [r.fields["text"] for r in _read(path, limit=limit)]


def test_limit_counts_error_records(tmp_path: Path) -> None:
    """An error record is a record: it counts towards the limit."""
    path = _write(tmp_path / "docs.jsonl", 'oops\n"b"\n"c"\n')
    records = _read(path, limit=2)
    assert ["docs.jsonl:1", "docs.jsonl:2"] == [r.source for r in records]
    assert records[0].error is not None
    assert records[1].error is None


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("docs.jsonl", '{"a": 1}\n\nnot json\n[1]\n"s"\n', 4),
        ("docs.jsonl", "", 0),
        ("table.csv", "a,b\n1,2\n1\n1,2,3\n\n4,5\n", 4),
    ],
)
def test_count_records(tmp_path: Path, name: str, content: str, expected: int) -> None:
    """count_records counts what read_records yields, error records included."""
    path = _write(tmp_path / name, content)
    assert expected == count_records(path)
    assert expected == len(_read(path))


def test_count_records_with_explicit_format(tmp_path: Path) -> None:
    """``format=`` applies to counting as it does to reading."""
    path = _write(tmp_path / "docs.txt", '"a"\n"b"\n')
    assert 2 == count_records(path, format="jsonl")


def test_count_records_of_stdin_is_unknown() -> None:
    """Standard input cannot be counted without consuming it: None."""
    assert count_records("-") is None
    assert count_records("-", format="jsonl") is None


def test_count_records_rejects_unknown_format(tmp_path: Path) -> None:
    """An unknown format is a ValueError when counting, as when reading."""
    path = _write(tmp_path / "docs.jsonl", '"a"\n')
    with pytest.raises(ValueError, match="unknown input format"):
        count_records(path, format="xml")


def test_hidden_files_and_folders_are_skipped(tmp_path: Path) -> None:
    """Hidden files (``.notes.txt``) and anything in a hidden folder (``.git/``) are not
    documents: skipped, and said so."""
    root = _folder(
        tmp_path / "docs",
        {"a.txt": b"alpha", ".notes.txt": b"hidden", ".git/HEAD.txt": b"ref", "b/c.md": b"c"},
    )
    with capture_logs() as logs:
        keys = [r.key for r in _read(root)]
    assert ["a.txt", "b/c.md"] == keys
    summary = next(e for e in logs if e["event"] == "io.skipped_files")
    assert 2 == summary["count"]
