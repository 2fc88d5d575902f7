"""`jaxformer prepare` on corpora in the formats they ship in, each file written by its own library.

Every reader is checked end to end: the prepared shards must hold exactly the tokens of the expected documents
(written here by hand, independently of the readers), each followed by EOS, in the split its id hashes to.
Corrupt and truncated files are errors naming the file (or, with skip_bad_files, skips with their reason), and
a run that finds no document is an error, never an empty dataset.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
from pathlib import Path

import numpy as np
import pytest

from jaxformer import cli
from jaxformer.data.corpus import CorpusFileError, CorpusStats, EmptyCorpusError, iter_documents
from jaxformer.data.prepare import prepare
from jaxformer.data.shards import open_split, read_manifest, split_of

DOCS = [f"def f{i}(x):\n    return x * {i}  # café {i}\n" for i in range(12)]


def assert_dataset_holds(out: Path, expected: dict[str, str], tokenizer) -> None:
    """The shards in `out` are exactly each expected document's tokens + EOS, per split, in the given order."""
    manifest = read_manifest(out)
    want = {"train": [], "val": []}
    for doc_id, text in expected.items():
        want[split_of(doc_id, manifest["val_fraction"])] += tokenizer.encode(text) + [tokenizer.eos_id]
    for split in ("train", "val"):
        tokens = open_split(out, split)
        got = np.concatenate(tokens.shards) if tokens.shards else np.zeros(0, np.int64)
        np.testing.assert_array_equal(got, np.asarray(want[split], np.int64))
    assert manifest["corpus"]["documents"] == len(expected)


def _jsonl_bytes(records: list) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode("utf-8")


def _records(field: str = "text") -> list[dict]:
    return [{field: d, "id": i} for i, d in enumerate(DOCS)]


@pytest.mark.parametrize("suffix", ["jsonl", "jsonl.gz", "jsonl.zst", "json.bz2", "jsonl.xz", "ndjson"])
def test_json_lines_plain_and_compressed(tmp_path, tokenizer, suffix):
    import zstandard

    raw = _jsonl_bytes(_records("content") + [{"content": None}, {"other": "x"}, {"content": 3}])
    compress = {"gz": gzip.compress, "zst": zstandard.ZstdCompressor().compress, "bz2": bz2.compress,
                "xz": lzma.compress}.get(suffix.rsplit(".", 1)[-1], lambda b: b)
    path = tmp_path / f"docs.{suffix}"
    path.write_bytes(compress(raw) + (b"\n{broken" if suffix == "jsonl" else b""))
    m = prepare([path], tokenizer, tmp_path / "out", jsonl_field="content", val_fraction=0.3, progress=False)
    assert_dataset_holds(tmp_path / "out", {f"docs.{suffix}:{i}": d for i, d in enumerate(DOCS)}, tokenizer)
    assert m["corpus"]["skipped_empty"] == 1
    assert m["corpus"]["skipped_bad_record"] == (3 if suffix == "jsonl" else 2)


def test_parquet_by_row_groups(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"url": [f"u{i}" for i in range(len(DOCS) + 1)], "text": DOCS + [None]})
    pq.write_table(table, tmp_path / "fineweb.parquet", row_group_size=5)  # three row groups
    prepare([tmp_path / "fineweb.parquet"], tokenizer, tmp_path / "out", val_fraction=0.3, progress=False)
    assert_dataset_holds(tmp_path / "out", {f"fineweb.parquet:{i}": d for i, d in enumerate(DOCS)}, tokenizer)
    with pytest.raises(CorpusFileError, match=r"no column 'body' \(columns: url, text\).*--field"):
        prepare([tmp_path / "fineweb.parquet"], tokenizer, tmp_path / "bad", jsonl_field="body", progress=False)


def test_hugging_face_save_to_disk_directory_and_arrow_files(tmp_path, tokenizer):
    import datasets
    import pyarrow as pa

    ds = datasets.Dataset.from_dict({"text": DOCS, "n": list(range(len(DOCS)))})
    ds.save_to_disk(str(tmp_path / "hf" / "saved"), num_shards=2)  # data-0000x-of-00002.arrow + json metadata
    prepare([tmp_path / "hf"], tokenizer, tmp_path / "out", val_fraction=0.3, progress=False)
    ids = [f"saved/data-0000{s}-of-00002.arrow:{i}" for s in range(2) for i in range(len(DOCS) // 2)]
    assert_dataset_holds(tmp_path / "out", dict(zip(ids, DOCS)), tokenizer)

    with pa.OSFile(str(tmp_path / "file_format.arrow"), "wb") as sink:  # the IPC file format reads too
        with pa.ipc.new_file(sink, pa.schema([("text", pa.string())])) as writer:
            writer.write_table(pa.table({"text": DOCS[:3]}))
    prepare([tmp_path / "file_format.arrow"], tokenizer, tmp_path / "out2", val_fraction=0.3, progress=False)
    assert_dataset_holds(tmp_path / "out2", {f"file_format.arrow:{i}": d for i, d in enumerate(DOCS[:3])}, tokenizer)


def _writer(path: Path):
    from warcio.warcwriter import WARCWriter

    f = open(path, "wb")
    w = WARCWriter(f, gzip=True)
    w.write_record(w.create_warcinfo_record(path.name, {"software": "jaxformer tests"}))
    return f, w


def _record_id(w, record) -> str:
    w.write_record(record)
    return record.rec_headers.get_header("WARC-Record-ID")


WET_TEXTS = ["Plain text of a crawled page.\nIts second line, in UTF-8: naïve café.", "Another page's text."]
PAGE = ("<html><head><title>T</title><script>var tracking = 1;</script></head><body>"
        "<nav>Home | About | Contact</nav><main><h1>Compilers</h1><p>A compiler translates a program written in "
        "one language into another language, usually machine code.</p><p>Parsing builds a syntax tree "
        "from the tokens that the lexer produced.</p></main><footer>Copyright 2026</footer></body></html>")


def test_common_crawl_wet_conversion_records(tmp_path, tokenizer):
    path = tmp_path / "crawl" / "CC-MAIN-20261101-00000.warc.wet.gz"
    path.parent.mkdir()
    f, w = _writer(path)
    with f:
        ids = [_record_id(w, w.create_warc_record(f"http://example.com/{i}", "conversion",
                                                  payload=io.BytesIO(t.encode()), warc_content_type="text/plain"))
               for i, t in enumerate(WET_TEXTS)]
    prepare([path.parent], tokenizer, tmp_path / "out", val_fraction=0.3, progress=False)
    assert_dataset_holds(tmp_path / "out", {f"{path.name}:{i}": t for i, t in zip(ids, WET_TEXTS)}, tokenizer)


def test_common_crawl_warc_html_responses_as_main_text(tmp_path):
    from warcio.statusandheaders import StatusAndHeaders

    path = tmp_path / "CC-MAIN-20261101-00000.warc.gz"
    f, w = _writer(path)
    with f:
        w.write_record(w.create_warc_record("http://example.com/", "request",
                                            payload=io.BytesIO(b"GET / HTTP/1.1\r\n\r\n")))
        html = StatusAndHeaders("200 OK", [("Content-Type", "text/html; charset=utf-8")], protocol="HTTP/1.1")
        page_id = _record_id(w, w.create_warc_record("http://example.com/", "response",
                                                     payload=io.BytesIO(PAGE.encode()), http_headers=html))
        png = StatusAndHeaders("200 OK", [("Content-Type", "image/png")], protocol="HTTP/1.1")
        w.write_record(w.create_warc_record("http://example.com/x.png", "response",
                                            payload=io.BytesIO(b"\x89PNG\r\n"), http_headers=png))
    docs = {d.doc_id: d.text for d in iter_documents([path])}
    assert list(docs) == [f"{path.name}:{page_id}"]  # not the request, the PNG or the warcinfo record
    text = docs[f"{path.name}:{page_id}"]
    assert "A compiler translates a program" in text and "Parsing builds a syntax tree" in text
    assert "tracking" not in text and "<p>" not in text and "Home | About" not in text  # script, tags, menu gone


WIKI = """<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.11/" version="0.11" xml:lang="en">
  <siteinfo><sitename>Wikipedia</sitename></siteinfo>
  <page>
    <title>Alan Turing</title><ns>0</ns><id>1208</id>
    <revision><id>1</id><text bytes="300" xml:space="preserve">'''Alan Turing''' was an English [[mathematician]] and [[computer science|computer scientist]].&lt;ref&gt;{{cite book|title=Biography}}&lt;/ref&gt; {{Infobox person|name=Alan}}
[[File:Turing.jpg|thumb|Turing in 1936]]
== Early life ==
He was born in [[London]] in 1912.
[[Category:Mathematicians]]</text></revision>
  </page>
  <page>
    <title>Turing</title><ns>0</ns><id>30</id><redirect title="Alan Turing" />
    <revision><id>2</id><text xml:space="preserve">#REDIRECT [[Alan Turing]]</text></revision>
  </page>
  <page>
    <title>Talk:Alan Turing</title><ns>1</ns><id>31</id>
    <revision><id>3</id><text xml:space="preserve">A discussion page, not an article.</text></revision>
  </page>
  <page>
    <title>Enigma</title><ns>0</ns><id>77</id>
    <revision><id>4</id><text xml:space="preserve">The '''Enigma''' machine &amp; its ''rotors''.</text></revision>
  </page>
</mediawiki>
"""
WIKI_TEXT = {"1208": "Alan Turing was an English mathematician and computer scientist.\n\nEarly life\n"
                     "He was born in London in 1912.",
             "77": "The Enigma machine & its rotors."}


def test_wikipedia_dump_main_articles_as_plain_text(tmp_path, tokenizer):
    path = tmp_path / "enwiki-latest-pages-articles.xml.bz2"
    path.write_bytes(bz2.compress(WIKI.encode()))
    prepare([tmp_path], tokenizer, tmp_path / "out", val_fraction=0.3, progress=False)
    assert_dataset_holds(tmp_path / "out", {f"{path.name}:{k}": v for k, v in WIKI_TEXT.items()}, tokenizer)


def test_corrupt_and_truncated_files_name_the_file_or_are_skipped_with_a_reason(tmp_path, tokenizer):
    good = tmp_path / "good.jsonl"
    good.write_bytes(_jsonl_bytes(_records()))
    whole = gzip.compress(_jsonl_bytes(_records() * 50))
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[:len(whole) // 2])  # a download cut short
    (tmp_path / "noise.parquet").write_bytes(b"PAR1" + bytes(range(256)) * 4)
    (tmp_path / "noise.warc.gz").write_bytes(gzip.compress(b"not a warc record\r\n\r\n"))
    (tmp_path / "notwiki.xml").write_text("<mediawiki><page><title>x</title>")  # truncated XML
    for bad in ("cut.jsonl.gz", "noise.parquet", "noise.warc.gz", "notwiki.xml"):
        with pytest.raises(CorpusFileError, match=rf"cannot read .*{bad}.*--skip-bad-files"):
            prepare([good, tmp_path / bad], tokenizer, tmp_path / "out", progress=False)
        assert not (tmp_path / "out" / "manifest.json").exists()  # no dataset claims to be complete
    m = prepare([good, *(tmp_path / b for b in ("cut.jsonl.gz", "noise.parquet", "noise.warc.gz", "notwiki.xml"))],
                tokenizer, tmp_path / "out", skip_bad_files=True, val_fraction=0.3, progress=False)
    skipped = {Path(s["file"]).name: s for s in m["corpus"]["skipped_files"]}
    assert sorted(skipped) == ["cut.jsonl.gz", "noise.parquet", "noise.warc.gz", "notwiki.xml"]
    assert "EOFError" in skipped["cut.jsonl.gz"]["reason"] and skipped["cut.jsonl.gz"]["documents_read"] > 0
    assert all(s["reason"] for s in skipped.values())
    n_cut = skipped["cut.jsonl.gz"]["documents_read"]
    assert m["corpus"]["documents"] == len(DOCS) + n_cut  # the good file, and what the cut one held before the cut


def test_no_document_at_all_is_an_error(tmp_path, tokenizer):
    path = tmp_path / "docs.jsonl.gz"
    path.write_bytes(gzip.compress(_jsonl_bytes(_records("content"))))
    with pytest.raises(EmptyCorpusError, match=r"no documents.*12 bad records.*--field"):
        prepare([path], tokenizer, tmp_path / "out", progress=False)  # the text is under "content", not "text"
    assert not (tmp_path / "out" / "manifest.json").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(EmptyCorpusError, match="0 documents from 0 files"):
        prepare([tmp_path / "empty"], tokenizer, tmp_path / "out", progress=False)


def test_cli_prepare_reads_formats_and_reports_errors(tmp_path, tokenizer, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    tokenizer.save(tmp_path / "tok")
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(_jsonl_bytes(_records("body"))))
    pq.write_table(pa.table({"body": DOCS[:4]}), tmp_path / "b.parquet")
    cli.main(["prepare", "--input", str(tmp_path / "a.jsonl.gz"), str(tmp_path / "b.parquet"), "--field", "body",
              "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "out")])
    report = json.loads(capsys.readouterr().out)
    assert report["corpus"]["documents"] == len(DOCS) + 4 and report["corpus"]["files"] == 2
    (tmp_path / "c.jsonl.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(SystemExit) as e:
        cli.main(["prepare", "--input", str(tmp_path / "c.jsonl.gz"), "--tokenizer", str(tmp_path / "tok"),
                  "--out", str(tmp_path / "out2")])
    assert e.value.code == 2 and "c.jsonl.gz" in capsys.readouterr().err


def test_stats_fold_and_describe():
    a, b = CorpusStats(documents=2, files=1, skipped_empty=1), CorpusStats(documents=3, files=2, skipped_bad_record=4)
    b.skipped_files.append({"file": "x", "reason": "y", "documents_read": 0})
    a.add(b)
    assert (a.documents, a.files, a.skipped_empty, a.skipped_bad_record, len(a.skipped_files)) == (5, 3, 1, 4, 1)
    assert a.describe() == "5 documents from 3 files (1 empty, 0 undecodable, 4 bad records, 1 files skipped)"
