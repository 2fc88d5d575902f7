"""code2doc: code summarization pairs built from Python source with `ast` (no download).

One example per function or method that has a docstring and a body beyond it:
  source  the function's code (decorators included, dedented) with its docstring removed
  target  the first line of the docstring
Splits are by module (a hash of the module's path relative to its source root), so every function
of a module lands in the same split; an exact duplicate of a function already taken (the standard
library holds a few vendored copies) is dropped, so no function appears in two splits.

    jaxformer data code2doc --out data/code2doc          # the Python standard library
    -> train.jsonl / val.jsonl / test.jsonl  ({"source", "target", "name", "module"} per line), stats.json
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import re
import textwrap
from pathlib import Path
from typing import Iterator, Sequence

from jaxformer.data.corpus import DEFAULT_CORPUS, stdlib_root

SPLITS = ("train", "val", "test")
TEST_DIRS = frozenset({"test", "tests", "idle_test", "testdata"})  # the stdlib's own test suites


@dataclasses.dataclass(frozen=True)
class Example:
    source: str
    target: str
    name: str
    module: str


def module_split(module: str, val_fraction: float, test_fraction: float) -> str:
    """Deterministic split of a module by a hash of its relative path."""
    u = int.from_bytes(hashlib.sha1(module.encode()).digest()[:8], "little") / 2.0**64
    return "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"


def first_doc_line(doc: str) -> str:
    """The first non-empty line of a docstring, whitespace-collapsed."""
    for line in doc.strip().splitlines():
        if line.strip():
            return " ".join(line.split())
    return ""


def function_examples(text: str, module: str, *, min_words: int = 3, max_words: int = 40,
                      max_chars: int = 6000) -> Iterator[Example]:
    """Every (code without docstring, first docstring line) pair of one module's source text."""
    tree = ast.parse(text)
    lines = text.splitlines()
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node, clean=True)
        if not doc or len(node.body) < 2:
            continue  # no docstring, or nothing but one
        doc_node = node.body[0]
        first, last = min([node.lineno] + [d.lineno for d in node.decorator_list]), node.end_lineno
        if doc_node.lineno == node.lineno or node.body[1].lineno == doc_node.end_lineno:
            continue  # docstring shares a line with code: cannot be cut out by lines
        kept = lines[first - 1:doc_node.lineno - 1] + lines[doc_node.end_lineno:last]
        source = textwrap.dedent("\n".join(kept)).strip("\n")
        target = first_doc_line(doc)
        if not min_words <= len(target.split()) <= max_words or len(source) > max_chars:
            continue
        yield Example(source, target, node.name, module)


def iter_modules(roots: Sequence[Path], include_tests: bool) -> Iterator[tuple[str, Path]]:
    """(module id, path) of every .py file under the roots, sorted; test suites skipped unless asked."""
    for root in roots:
        files = [root] if root.is_file() else sorted(root.rglob("*.py"))
        for f in files:
            rel = f.relative_to(root) if root.is_dir() else Path(f.name)
            parts = set(rel.parts)
            if "site-packages" in parts or "__pycache__" in parts or (not include_tests and parts & TEST_DIRS):
                continue
            yield (f"{root.name}/{rel.as_posix()}" if len(roots) > 1 else rel.as_posix()), f


def build_code2doc(out_dir: str | Path, sources: Sequence[str | Path] = (DEFAULT_CORPUS,), *,
                   val_fraction: float = 0.05, test_fraction: float = 0.05, include_tests: bool = False,
                   min_words: int = 3) -> dict:
    """Write {train,val,test}.jsonl and stats.json under out_dir; returns the stats."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"need 0 <= val_fraction, test_fraction and their sum < 1, got {val_fraction}, "
                         f"{test_fraction}")
    roots = []
    for s in sources:
        p = stdlib_root() if str(s) == DEFAULT_CORPUS else Path(s).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"code2doc source {str(s)!r} does not exist (give .py files, directories, "
                                    f"or {DEFAULT_CORPUS!r} for the Python standard library)")
        roots.append(p)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = {s: 0 for s in SPLITS}
    modules = {s: 0 for s in SPLITS}
    skipped = {"unparsable_modules": 0, "duplicate_functions": 0}
    seen: set[str] = set()
    files = {s: (out / f"{s}.jsonl").open("w", encoding="utf-8") for s in SPLITS}
    try:
        for module, path in iter_modules(roots, include_tests):
            try:
                examples = list(function_examples(path.read_text(encoding="utf-8"), module, min_words=min_words))
            except (SyntaxError, UnicodeDecodeError, ValueError, RecursionError):
                skipped["unparsable_modules"] += 1
                continue
            split = module_split(module, val_fraction, test_fraction)
            kept = 0
            for ex in examples:
                digest = hashlib.sha1(ex.source.encode()).hexdigest()
                if digest in seen:
                    skipped["duplicate_functions"] += 1
                    continue
                seen.add(digest)
                files[split].write(json.dumps(dataclasses.asdict(ex)) + "\n")
                kept += 1
            counts[split] += kept
            modules[split] += bool(kept)
    finally:
        for f in files.values():
            f.close()
    stats = {"task": "code2doc", "examples": counts, "modules": modules, "skipped": skipped,
             "sources": [str(r) for r in roots], "val_fraction": val_fraction, "test_fraction": test_fraction,
             "include_tests": include_tests, "min_words": min_words}
    (out / "stats.json").write_text(json.dumps(stats, indent=2))
    return stats


_WORDS = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|\d+")


def name_baseline(name: str) -> str:
    """The trivial summary: the function name split into lower-case words ('getSourceLines' -> 'get source lines')."""
    return " ".join(w.lower() for w in _WORDS.findall(name))


def function_name(source: str) -> str:
    """The name of the first function defined in `source` ('' when none)."""
    m = re.search(r"def\s+(\w+)", source)
    return m.group(1) if m else ""
