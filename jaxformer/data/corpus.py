"""Documents from text files, directories and JSONL; the embedded default corpus.

A document is one text file, or one JSONL record's field. Empty and undecodable inputs are
skipped and counted, never raised: real corpora always hold a few.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import sysconfig
from pathlib import Path
from typing import Iterator, Sequence

DEFAULT_CORPUS = "stdlib"  # the Python standard library's own .py files: ~30 MB of real code, no download
TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst", ".json", ".jsonl", ".c", ".h", ".js", ".ts", ".java",
                 ".go", ".rs", ".toml", ".yaml", ".yml", ".cfg", ".ini", ".html", ".css", ".sh", ".tex")


@dataclasses.dataclass
class CorpusStats:
    """What reading the corpus met: documents kept and inputs skipped (with reasons)."""

    documents: int = 0
    bytes: int = 0
    skipped_empty: int = 0
    skipped_undecodable: int = 0
    skipped_bad_json: int = 0

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Document:
    """One document, or one piece of a large one (pieces of a document share its doc_id)."""

    doc_id: str  # stable name (relative path, or path:line for JSONL) used for the train/val split
    text: str
    final: bool = True  # False while more pieces of this document follow


# Files larger than this stream in line-aligned pieces. The tokenizer's working memory for one text is
# a few hundred bytes per input byte (offsets, alignments, token strings), so this bounds prepare's RSS.
PIECE_BYTES = 1 << 20


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def resolve_sources(sources: Sequence[str | Path] | str | Path) -> list[tuple[Path, tuple[str, ...]]]:
    """(path, suffixes to read under it) per source; 'stdlib' means the standard library's .py files.

    A missing source is a clear error naming it.
    """
    if isinstance(sources, (str, Path)):
        sources = [sources]
    out = []
    for s in sources:
        if str(s) == DEFAULT_CORPUS:
            out.append((stdlib_root(), (".py",)))
            continue
        p = Path(s).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"corpus source {str(s)!r} does not exist (give files, directories, "
                                    f"JSONL files, or {DEFAULT_CORPUS!r} for the Python standard library)")
        out.append((p, TEXT_SUFFIXES))
    return out


def list_files(sources) -> list[Path]:
    """All files of the sources, sorted (stable across runs); directories filtered by suffix."""
    return [path for path, _ in named_files(sources)]


def named_files(sources) -> list[tuple[Path, str]]:
    """(file, doc_id): the id is the path relative to its source directory (or the file name), so a
    corpus gets the same train/val split wherever it lives on disk."""
    files: list[tuple[Path, str]] = []
    for p, suffixes in resolve_sources(sources):
        if p.is_file():
            files.append((p, p.name))
            continue
        for f in sorted(p.rglob("*")):
            if f.is_file() and f.suffix in suffixes and "site-packages" not in f.parts and "__pycache__" not in f.parts:
                files.append((f, f.relative_to(p).as_posix()))
    return files


def iter_documents(sources, *, jsonl_field: str = "text", stats: CorpusStats | None = None) -> Iterator[Document]:
    """Stream documents from sources one at a time (memory stays bounded by one file or piece)."""
    stats = stats if stats is not None else CorpusStats()
    for path, doc_id in named_files(sources):
        if path.suffix == ".jsonl":
            yield from _iter_jsonl(path, doc_id, jsonl_field, stats)
            continue
        try:
            if path.stat().st_size > PIECE_BYTES:
                yield from _iter_pieces(path, doc_id, stats)
                continue
            text = path.read_bytes().decode("utf-8")
        except (UnicodeDecodeError, OSError):
            stats.skipped_undecodable += 1
            continue
        yield from _keep(Document(doc_id, text), stats)


def _iter_pieces(path: Path, doc_id: str, stats: CorpusStats) -> Iterator[Document]:
    """A large file as line-aligned pieces of about PIECE_BYTES; validated as UTF-8 first."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    with path.open("rb") as f:  # first pass: never emit half of an undecodable file
        while block := f.read(PIECE_BYTES):
            decoder.decode(block)
        decoder.decode(b"", final=True)
    stats.documents += 1
    with path.open("r", encoding="utf-8", newline="") as f:
        piece: list[str] = []
        size = 0
        for line in f:
            piece.append(line)
            size += len(line)
            if size >= PIECE_BYTES:
                text = "".join(piece)
                stats.bytes += len(text.encode("utf-8"))
                yield Document(doc_id, text, final=False)
                piece, size = [], 0
        text = "".join(piece)
        stats.bytes += len(text.encode("utf-8"))
        yield Document(doc_id, text, final=True)


def _iter_jsonl(path: Path, doc_id: str, field: str, stats: CorpusStats) -> Iterator[Document]:
    with path.open("rb") as f:
        for i, raw in enumerate(f):
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                stats.skipped_undecodable += 1
                continue
            except json.JSONDecodeError:
                if raw.strip():
                    stats.skipped_bad_json += 1
                continue
            text = record.get(field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                stats.skipped_bad_json += 1
                continue
            yield from _keep(Document(f"{doc_id}:{i}", text), stats)


def _keep(doc: Document, stats: CorpusStats) -> Iterator[Document]:
    if not doc.text.strip():
        stats.skipped_empty += 1
        return
    stats.documents += 1
    stats.bytes += len(doc.text.encode("utf-8"))
    yield doc
