"""Readers for the formats corpora ship in, each streaming (memory bounded whatever the file's size).

A file's format comes from its suffixes, after an optional compression suffix (.gz, .bz2, .xz, .zst):

  text        .py .txt .md ... (corpus.TEXT_SUFFIXES), compressed or not: one document per file
  JSON lines  .jsonl .ndjson, and .json when compressed (Dolma, RedPajama): one document per record's field
  parquet     .parquet (FineWeb, HF datasets' hub files): one document per row's field, read a row group
              at a time
  Arrow       .arrow (HF datasets' cache and `save_to_disk` files, IPC stream or file format): per row
  WARC / WET  .warc .warc.wet .wet (Common Crawl, usually .gz): the text of WET conversion records, and of
              WARC response records holding HTML, extracted by resiliparse (main content only)
  MediaWiki   .xml (Wikipedia's pages-articles dumps, usually .bz2): main-namespace articles, redirects
              dropped, wikitext reduced to plain text by mwparserfromhell

Each reader yields (id, text, skip) triples: `id` unique and stable within the file (a line or row number, a
WARC record id, a page id); `text` may be empty or None (the caller counts those); `skip` is None, or the
reason a document cannot be used (undecodable bytes, a malformed JSON line, a non-text field), which the
caller counts and the reader goes on past. A file that cannot be read raises, and corpus.iter_documents turns
that into a CorpusFileError naming the file.
"""

from __future__ import annotations

import bz2
import codecs
import gzip
import importlib
import io
import json
import lzma
from pathlib import Path
from typing import Callable, Iterator

COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
WARC_SUFFIXES = (".warc", ".wet")
HTML_TYPES = ("text/html", "application/xhtml+xml")
PIECE_CHARS = 1 << 20  # text files stream in line-aligned pieces of about this many characters

Record = tuple[str, "str | None", "str | None"]  # (id, text, reason the document is skipped)


class NotText(ValueError):
    """A record whose text field is missing or not a string."""


def split_suffix(path: Path) -> tuple[str, str | None]:
    """(the format suffix, the compression suffix or None): 'a.jsonl.zst' -> ('.jsonl', '.zst')."""
    suffixes = [s.lower() for s in path.suffixes]
    compression = suffixes.pop() if suffixes and suffixes[-1] in COMPRESSIONS else None
    if suffixes[-2:] == [".warc", ".wet"]:
        return ".wet", compression
    return (suffixes[-1] if suffixes else ""), compression


def format_of(path: Path, text_suffixes: tuple[str, ...]) -> str | None:
    """'text', 'jsonl', 'parquet', 'arrow', 'warc' or 'mediawiki' for a file a directory walk should read, else None."""
    suffix, compression = split_suffix(path)
    if suffix in JSONL_SUFFIXES or (suffix == ".json" and compression):
        return "jsonl"
    if suffix in WARC_SUFFIXES:
        return "warc"
    if suffix == ".xml":
        return "mediawiki"
    if compression is None and suffix in (".parquet", ".arrow"):
        return suffix[1:]
    return "text" if suffix in text_suffixes else None


def open_binary(path: Path) -> io.BufferedIOBase:
    """The file's bytes, decompressed as its last suffix says."""
    compression = split_suffix(path)[1]
    if compression == ".gz":
        return gzip.open(path, "rb")
    if compression == ".bz2":
        return bz2.open(path, "rb")
    if compression == ".xz":
        return lzma.open(path, "rb")
    if compression == ".zst":
        zstandard = need("zstandard", ".zst files")
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True,
                                                                            read_across_frames=True))
    return open(path, "rb")


def read_text(path: Path, field: str) -> Iterator[Record]:
    """A whole file as one document, in line-aligned pieces of about PIECE_CHARS (all with the id '')."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    with open_binary(path) as f:  # first pass: never yield half of an undecodable file
        try:
            while block := f.read(1 << 20):
                decoder.decode(block)
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as e:
            yield "", None, f"not UTF-8 ({e.reason} at byte {e.start})"
            return
    with io.TextIOWrapper(open_binary(path), encoding="utf-8", newline="") as f:
        piece, size = [], 0
        for line in f:
            piece.append(line)
            size += len(line)
            if size >= PIECE_CHARS:
                yield "", "".join(piece), None
                piece, size = [], 0
        yield "", "".join(piece), None


def read_jsonl(path: Path, field: str) -> Iterator[Record]:
    """One record per line; the document is record[field] (ids: line numbers from 0)."""
    with open_binary(path) as f:
        for i, raw in enumerate(f):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
                yield str(i), _field(record, field), None
            except UnicodeDecodeError as e:
                yield str(i), None, f"not UTF-8 ({e.reason})"
            except json.JSONDecodeError as e:
                if i == 0 and raw.lstrip()[:1] == b"[":
                    raise ValueError("a JSON array, not JSON lines (one object per line)") from None
                yield str(i), None, f"not JSON ({e.msg})"
            except NotText as e:
                yield str(i), None, str(e)


def read_parquet(path: Path, field: str) -> Iterator[Record]:
    """Rows of a parquet file, one row group at a time (ids: row numbers)."""
    pq = need("pyarrow.parquet", "parquet files")
    with pq.ParquetFile(path) as pf:
        _check_column(pf.schema_arrow.names, field)
        row = 0
        for batch in pf.iter_batches(batch_size=1024, columns=[field]):
            for value in batch.column(0).to_pylist():
                yield _row(row, value)
                row += 1


def read_arrow(path: Path, field: str) -> Iterator[Record]:
    """Rows of an Arrow IPC file (HF datasets write the stream format; the file format is read too)."""
    pa = need("pyarrow", "Arrow files")
    with pa.memory_map(str(path)) as source:
        try:
            reader = pa.ipc.open_stream(source)
        except pa.ArrowInvalid:
            source.seek(0)
            f = pa.ipc.open_file(source)
            reader = (f.get_batch(i) for i in range(f.num_record_batches))
            _check_column(f.schema.names, field)
        else:
            _check_column(reader.schema.names, field)
        row = 0
        for batch in reader:
            for value in batch.column(field).to_pylist():
                yield _row(row, value)
                row += 1


def read_warc(path: Path, field: str) -> Iterator[Record]:
    """WET conversion records as they are, WARC response records with an HTML payload as extracted text."""
    ArchiveIterator = need("warcio.archiveiterator", "WARC/WET files").ArchiveIterator
    with open(path, "rb") as f:  # warcio reads gzip member by member itself
        for record in ArchiveIterator(f, check_digests=False):
            rid = record.rec_headers.get_header("WARC-Record-ID") or ""
            if record.rec_type == "conversion":
                body = record.content_stream().read()
                try:
                    yield rid, body.decode("utf-8"), None
                except UnicodeDecodeError as e:
                    yield rid, None, f"not UTF-8 ({e.reason})"
            elif record.rec_type == "response" and _is_html(record):
                yield rid, html_to_text(record.content_stream().read()), None


def _is_html(record) -> bool:
    kind = record.rec_headers.get_header("WARC-Identified-Payload-Type")
    if not kind and record.http_headers is not None:
        kind = record.http_headers.get_header("Content-Type")
    return bool(kind) and kind.split(";")[0].strip().lower() in HTML_TYPES


def html_to_text(body: bytes) -> str:
    """The main text of an HTML page (resiliparse: charset detected, boilerplate such as menus dropped)."""
    html2text = need("resiliparse.extract.html2text", "HTML in WARC files")
    encoding = need("resiliparse.parse.encoding", "HTML in WARC files")
    return html2text.extract_plain_text(encoding.bytes_to_str(body, encoding.detect_encoding(body)),
                                        main_content=True)


def read_mediawiki(path: Path, field: str) -> Iterator[Record]:
    """Main-namespace, non-redirect pages of a MediaWiki XML export as plain text (ids: page ids)."""
    import xml.etree.ElementTree as ET

    with open_binary(path) as f:
        context = ET.iterparse(f, events=("start", "end"))
        _, root = next(context)
        if _local(root.tag) != "mediawiki":
            raise ValueError(f"root element is <{_local(root.tag)}>, not a MediaWiki export's <mediawiki>")
        for event, elem in context:
            if event != "end" or _local(elem.tag) != "page":
                continue
            page = {_local(c.tag): c for c in elem}
            ns, redirect = _text(page.get("ns")), "redirect" in page
            revision = page.get("revision")
            text = None if revision is None else next((c.text for c in revision if _local(c.tag) == "text"), None)
            page_id = _text(page.get("id"))
            root.clear()  # the pages read so far: memory stays one page
            if ns == "0" and not redirect and text and not text.lstrip().upper().startswith("#REDIRECT"):
                yield page_id, wikitext_to_text(text), None


def wikitext_to_text(wikitext: str) -> str:
    """Readable text of an article: templates, references, tables, files and categories dropped, links as their
    text, bold/italic marks removed (mwparserfromhell's strip_code)."""
    code = need("mwparserfromhell", "MediaWiki dumps").parse(wikitext)
    for tag in code.filter_tags(matches=lambda t: str(t.tag).lower() in ("ref", "table", "gallery"), recursive=False):
        _remove(code, tag)
    for link in code.filter_wikilinks(recursive=False):
        if str(link.title).strip().lower().split(":", 1)[0] in ("file", "image", "category"):
            _remove(code, link)
    text = code.strip_code(normalize=True, collapse=True)
    return "\n".join(line.strip() for line in text.splitlines()).strip()


READERS: dict[str, Callable[[Path, str], Iterator[Record]]] = {
    "text": read_text, "jsonl": read_jsonl, "parquet": read_parquet, "arrow": read_arrow, "warc": read_warc,
    "mediawiki": read_mediawiki,
}


def need(module: str, what: str):
    """An optional package's module, or an ImportError that says how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"reading {what} needs the {module.split('.')[0]} package: "
                          "pip install 'jaxformer[data]'") from None


def _remove(code, node) -> None:
    try:
        code.remove(node)
    except ValueError:  # already gone with an enclosing node
        pass


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _text(elem) -> str | None:
    return None if elem is None else (elem.text or "").strip()


def _check_column(names: list[str], field: str) -> None:
    if field not in names:
        raise ValueError(f"no column {field!r} (columns: {', '.join(names)}); name the text column with --field")


def _field(record, field: str) -> str | None:
    if not isinstance(record, dict):
        raise NotText(f"a JSON {type(record).__name__}, not an object")
    if field not in record:
        raise NotText(f"no field {field!r} (fields: {', '.join(list(record)[:8])})")
    value = record[field]
    if value is None or isinstance(value, str):
        return value
    raise NotText(f"field {field!r} holds a {type(value).__name__}, not a string")


def _row(row: int, value) -> Record:
    if value is None or isinstance(value, str):
        return str(row), value, None
    return str(row), None, f"the text column holds a {type(value).__name__}, not a string"
