"""Imports point down: an AST scan of jaxformer/ (function-level imports included) against the layer table.

Each subpackage or top-level module of jaxformer has a rank; a module may import its own group and groups
of lower rank only. So model code never imports data, training, inference, serving, fine-tuning or
interop; data imports none of those either; interop imports no training, fine-tuning, serving,
evaluation or CLI code; only the CLI imports the server; no cycle can form between groups. No module
imports another module's _private name. docs/architecture.md draws the same table.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "jaxformer"

# group -> rank: a group may import only groups of strictly lower rank (and itself)
LAYERS = {
    "runtime": 0,  # process settings the command starts with (huge pages); imports no jaxformer code
    "config": 0,
    "sharding": 1,
    "models": 2,
    "data": 3,
    "checkpoint": 3,
    "interop": 4,
    "infer": 5,
    "parity": 5,  # jaxformer vs torch_ref / transformers (reads interop, models); train's parity_every calls it
    "train": 6,
    "viz": 6,  # figures from the capture parity uses; only the CLI imports it
    "seq2seq": 7,
    "finetune": 7,
    "plan": 7,  # compiles train (and infer) steps for GPU targets; only the CLI imports it
    "serve": 8,
    "cli": 9,
    "__init__": 10,  # the package's public facade
}


def group_of(module: str) -> str:
    """'jaxformer.models.attention' -> 'models'; 'jaxformer' -> '__init__'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def jaxformer_imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, imported names) for every import of jaxformer code in a file, at any depth."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names if a.name.split(".")[0] == "jaxformer"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "jaxformer":
            names = [a.name for a in node.names]
            if node.module == "jaxformer":  # `from jaxformer import sharding` imports the submodule
                out += [(node.lineno, f"jaxformer.{n}", []) for n in names if (PACKAGE / n).exists()
                        or (PACKAGE / f"{n}.py").exists()]
                names = [n for n in names if not ((PACKAGE / n).exists() or (PACKAGE / f"{n}.py").exists())]
                if not names:
                    continue
            out.append((node.lineno, node.module, names))
    return out


FILES = sorted(PACKAGE.rglob("*.py"))


def test_every_group_has_a_rank():
    groups = {group_of(module_name(f)) for f in FILES}
    assert groups <= set(LAYERS), f"add {sorted(groups - set(LAYERS))} to LAYERS (and to docs/architecture.md)"


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path):
    me = group_of(module_name(path))
    wrong = [f"line {line}: {mod}" for line, mod, _ in jaxformer_imports(path)
             if group_of(mod) != me and LAYERS[group_of(mod)] >= LAYERS[me]]
    assert not wrong, f"{me} (rank {LAYERS[me]}) may only import lower layers; it imports {wrong}"


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_private_names_across_modules(path):
    me = module_name(path)
    private = [f"line {line}: {mod}.{n}" for line, mod, names in jaxformer_imports(path) for n in names
               if n.startswith("_") and not n.startswith("__") and mod != me]
    assert not private, f"{me} imports private names of other modules: {private}"


def test_the_scan_sees_function_level_imports(tmp_path):
    """The scanner itself: an import inside a function, pointing up, is found."""
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from jaxformer.serve.app import create_app\n    from jaxformer import sharding\n")
    assert [(m, n) for _, m, n in jaxformer_imports(f)] == [("jaxformer.serve.app", ["create_app"]),
                                                            ("jaxformer.sharding", [])]


def test_kernel_files_that_read_jaxformer_import_first():
    """A pallas_kernels file that imports from jaxformer (gated_delta reads its reference there) must import in a
    fresh interpreter before anything else: jaxformer's models import the kernels back, and a module-level import
    there would meet the kernel file half initialised (CI collected it first once)."""
    import subprocess
    import sys

    kernels = PACKAGE.parent / "pallas_kernels"
    readers = sorted(p.stem for p in kernels.glob("*.py") if "from jaxformer" in p.read_text())
    assert readers, "no kernel file reads jaxformer: drop this test"
    for name in readers:
        done = subprocess.run([sys.executable, "-c", f"import pallas_kernels.{name}"], cwd=PACKAGE.parent,
                              capture_output=True, text=True)
        assert done.returncode == 0, f"pallas_kernels.{name} does not import first:\n{done.stderr[-2000:]}"
