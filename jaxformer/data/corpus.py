"""Documents from corpus sources: files and directories in the formats data/formats.py reads; the default corpus.

A document is one text file, or one record of a record format (a JSON line, a parquet or Arrow row, a WARC
record, a wiki page). Documents that cannot be used (empty, undecodable, malformed) are skipped and counted:
real corpora always hold a few. A file that cannot be read at all (corrupt, truncated, not its format) is a
CorpusFileError naming the file and the reason, or, with skip_bad_files, a counted skip with its reason.
"""

from __future__ import annotations

import dataclasses
import json
import sysconfig
from pathlib import Path
from typing import Iterator, Sequence

from jaxformer.data import formats

DEFAULT_CORPUS = "stdlib"  # the Python standard library's own .py files: ~30 MB of real code, no download
TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst", ".json", ".jsonl", ".c", ".h", ".js", ".ts", ".java",
                 ".go", ".rs", ".toml", ".yaml", ".yml", ".cfg", ".ini", ".html", ".css", ".sh", ".tex")
SKIP_EXAMPLES = 10  # skipped documents whose file, id and reason the stats keep, for a look


class CorpusFileError(ValueError):
    """A corpus file that cannot be read (corrupt, truncated, or not the format its name says)."""


class EmptyCorpusError(ValueError):
    """Reading the sources gave no document at all."""


@dataclasses.dataclass
class CorpusStats:
    """What reading the corpus met: documents kept, documents skipped (by reason) and files skipped (with why)."""

    documents: int = 0
    bytes: int = 0
    files: int = 0
    skipped_empty: int = 0
    skipped_undecodable: int = 0
    skipped_bad_record: int = 0  # malformed JSON, a missing or non-text field
    skipped_files: list[dict] = dataclasses.field(default_factory=list)  # {"file", "reason", "documents_read"}
    skip_examples: list[dict] = dataclasses.field(default_factory=list)  # the first few skipped documents

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def add(self, other: "CorpusStats") -> None:
        """Fold another reader's stats into these (counts summed, lists concatenated)."""
        for f in dataclasses.fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            setattr(self, f.name, mine + theirs)
        self.skip_examples = self.skip_examples[:SKIP_EXAMPLES]

    def describe(self) -> str:
        """'14,747 documents from 1,203 files (3 empty, 1 undecodable, 0 bad records, 0 files skipped)'."""
        return (f"{self.documents:,} documents from {self.files:,} files ({self.skipped_empty} empty, "
                f"{self.skipped_undecodable} undecodable, {self.skipped_bad_record} bad records, "
                f"{len(self.skipped_files)} files skipped)")


@dataclasses.dataclass(frozen=True)
class Document:
    """One document, or one piece of a large one (pieces of a document share its doc_id)."""

    doc_id: str  # stable name (relative path, path:record for record formats) used for the train/val split
    text: str
    final: bool = True  # False while more pieces of this document follow


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def resolve_sources(sources: Sequence[str | Path] | str | Path) -> list[tuple[Path, tuple[str, ...], bool]]:
    """(path, text suffixes to read under it, whether record formats are read too) per source; 'stdlib' means the
    standard library's .py files. A missing source is a clear error naming it."""
    if isinstance(sources, (str, Path)):
        sources = [sources]
    out = []
    for s in sources:
        if str(s) == DEFAULT_CORPUS:
            out.append((stdlib_root(), (".py",), False))
            continue
        p = Path(s).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"corpus source {str(s)!r} does not exist (give files or directories of text, "
                                    f"JSONL, parquet, Arrow, WARC/WET or MediaWiki XML, or {DEFAULT_CORPUS!r} for the "
                                    "Python standard library)")
        out.append((p, TEXT_SUFFIXES, True))
    return out


def list_files(sources) -> list[Path]:
    """All files of the sources, sorted (stable across runs); directories filtered by format."""
    return [path for path, _ in named_files(sources)]


def named_files(sources) -> list[tuple[Path, str]]:
    """(file, doc_id): the id is the path relative to its source directory (or the file name), so a
    corpus gets the same train/val split wherever it lives on disk."""
    files: list[tuple[Path, str]] = []
    for p, suffixes, records in resolve_sources(sources):
        if p.is_file():
            files.append((p, p.name))
            continue
        datasets = _hf_dataset_dirs(p)
        for f in sorted(p.rglob("*")):
            if not f.is_file() or "site-packages" in f.parts or "__pycache__" in f.parts:
                continue
            if f.parent in datasets:  # a `save_to_disk` directory: its data files, not its metadata
                if f.name in datasets[f.parent]:
                    files.append((f, f.relative_to(p).as_posix()))
                continue
            kind = formats.format_of(f, suffixes)
            if kind == "text" or (records and kind is not None and (kind != "mediawiki" or _is_mediawiki(f))):
                files.append((f, f.relative_to(p).as_posix()))
    return files


def _hf_dataset_dirs(root: Path) -> dict[Path, set[str]]:
    """{directory: its Arrow data files} for the Hugging Face `save_to_disk` directories under root."""
    out = {}
    for state in root.rglob("state.json"):
        if (state.parent / "dataset_info.json").exists():
            try:
                out[state.parent] = {d["filename"] for d in json.loads(state.read_text())["_data_files"]}
            except (ValueError, KeyError, TypeError):
                continue
    return out


def _is_mediawiki(path: Path) -> bool:
    """A directory walk reads .xml as a wiki dump only when compressed (as dumps ship) or rooted in <mediawiki."""
    if formats.split_suffix(path)[1]:
        return True
    with open(path, "rb") as f:
        return b"<mediawiki" in f.read(4096)


def iter_documents(sources, *, jsonl_field: str = "text", stats: CorpusStats | None = None,
                   skip_bad_files: bool = False) -> Iterator[Document]:
    """Stream documents from sources one at a time (memory stays bounded by one record or piece)."""
    stats = stats if stats is not None else CorpusStats()
    for path, doc_id in named_files(sources):
        yield from file_documents(path, doc_id, jsonl_field, stats, skip_bad_files=skip_bad_files)


def file_documents(path: Path, doc_id: str, field: str, stats: CorpusStats, *,
                   skip_bad_files: bool = False) -> Iterator[Document]:
    """The documents of one file, in order; its skips counted in `stats`."""
    kind = formats.format_of(path, TEXT_SUFFIXES) or "text"  # a file named on the command line is text by default
    stats.files += 1
    read = {"n": 0}
    try:
        documents = _text_file(path, doc_id, stats) if kind == "text" else _records(kind, path, doc_id, field, stats)
        for doc in documents:
            read["n"] += doc.final
            yield doc
    except ImportError:  # a format's optional package is missing: the same for every file of it
        raise
    except Exception as e:  # noqa: BLE001 - any failure to read the container is this file's error
        reason = f"{type(e).__name__}: {e}"
        if not skip_bad_files:
            raise CorpusFileError(f"cannot read {path} ({reason}); fix or remove the file, or pass --skip-bad-files "
                                  "to skip unreadable files and record them in the manifest") from e
        stats.skipped_files.append({"file": str(path), "reason": reason, "documents_read": read["n"]})


def _text_file(path: Path, doc_id: str, stats: CorpusStats) -> Iterator[Document]:
    """A text file as one document, in pieces when large (all but the last with final=False)."""
    held, pieces = "", 0
    for _, text, skip in formats.read_text(path, ""):
        if skip is not None:
            _count_skip(stats, "skipped_undecodable", path, "", skip)
            return
        if pieces:
            yield _kept(Document(doc_id, held, final=False), stats)
        held, pieces = text, pieces + 1
    if pieces == 1 and not held.strip():  # (a text over formats.PIECE_CHARS arrives in several pieces)
        stats.skipped_empty += 1
        return
    yield _kept(Document(doc_id, held), stats)


def _records(kind: str, path: Path, doc_id: str, field: str, stats: CorpusStats) -> Iterator[Document]:
    for rid, text, skip in formats.READERS[kind](path, field):
        if skip is not None:
            _count_skip(stats, "skipped_undecodable" if "UTF-8" in skip else "skipped_bad_record", path, rid, skip)
        elif not text or not text.strip():
            stats.skipped_empty += 1
        else:
            yield _kept(Document(f"{doc_id}:{rid}", text), stats)


def _kept(doc: Document, stats: CorpusStats) -> Document:
    stats.bytes += len(doc.text.encode("utf-8"))
    stats.documents += doc.final
    return doc


def _count_skip(stats: CorpusStats, counter: str, path: Path, rid: str, reason: str) -> None:
    setattr(stats, counter, getattr(stats, counter) + 1)
    if len(stats.skip_examples) < SKIP_EXAMPLES:
        stats.skip_examples.append({"file": str(path), "id": rid, "reason": reason})


def check_not_empty(stats: CorpusStats, sources) -> None:
    """Raise EmptyCorpusError, saying what was met instead, when reading `sources` kept no document."""
    if stats.documents:
        return
    met = stats.describe()
    hint = ("--field names the text column of JSONL, parquet and Arrow files" if stats.skipped_bad_record
            else "directories are read for text, JSONL, parquet, Arrow, WARC/WET and MediaWiki XML files by suffix")
    examples = "".join(f"\n  {e['file']} {e['id']}: {e['reason']}" for e in stats.skip_examples[:3])
    raise EmptyCorpusError(f"no documents in {list(map(str, sources)) if not isinstance(sources, (str, Path)) else [str(sources)]}: "
                           f"{met}; {hint}{examples}")
