"""A pytest plugin that measures how much room every numerical bound in the suite has (docs/testing.md).

    PYTHONPYCACHEPREFIX=/tmp/bound-audit-pyc .venv/bin/python -m pytest -p tests.bound_audit \
        -o enable_assertion_pass_hook=true [the usual arguments; -n 2 works]

It records, for every passing check, how much of its bound the measured value used (1.0: exactly at the bound):
np.testing.assert_allclose and torch.testing.assert_close (the worst element's |diff| / (atol + rtol |ref|)),
`assert a <= b` / `a < b` between numbers below 1 (a / b), and parity_tests' gradient checks (rel / 1e-4).
At the end it prints the tightest checks; the records stay in the JSONL file named by --bound-audit-log.
PYTHONPYCACHEPREFIX gives pytest a fresh cache for its rewritten test modules: ones rewritten without the
assertion-pass hook (the normal cache) would report nothing.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest

_NUMBER = r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?"
_COMPARISON = re.compile(rf"({_NUMBER})\s*(?:<=|<)\s*({_NUMBER})")
_state: dict = {"log": None, "test": None}


def pytest_addoption(parser):
    parser.addoption("--bound-audit-log", default="bound_audit.jsonl", help="where tests.bound_audit writes records")
    parser.addoption("--bound-audit-top", type=int, default=30, help="how many of the tightest checks to print")


def _record(kind: str, used: float, detail: str) -> None:
    if _state["log"] is not None and np.isfinite(used):
        with open(_state["log"], "a") as f:  # one short line per write: appends from xdist workers stay whole
            f.write(json.dumps({"test": _state["test"], "kind": kind, "used": used, "detail": detail}) + "\n")


def _used(got, ref, rtol: float, atol: float) -> float:
    got, ref = np.broadcast_arrays(np.asarray(got, np.float64), np.asarray(ref, np.float64))
    allowed = atol + rtol * np.abs(ref)
    diff = np.abs(got - ref)
    if not diff.size or not (allowed > 0).any():
        return float("nan")
    return float(np.max(np.where(allowed > 0, diff / np.where(allowed > 0, allowed, 1.0), 0.0)))


def _wrap_numpy():
    original = np.testing.assert_allclose

    def assert_allclose(actual, desired, rtol=1e-7, atol=0, *args, **kwargs):
        result = original(actual, desired, rtol, atol, *args, **kwargs)  # raises first when it fails
        _record("assert_allclose", _used(actual, desired, rtol, atol), f"rtol={rtol:g} atol={atol:g}")
        return result

    np.testing.assert_allclose = assert_allclose


def _wrap_torch():
    if "torch" not in sys.modules and not _importable("torch"):
        return
    import torch

    original = torch.testing.assert_close

    def assert_close(actual, expected, *args, rtol=None, atol=None, **kwargs):
        result = original(actual, expected, *args, rtol=rtol, atol=atol, **kwargs)
        if rtol is not None and atol is not None:
            as_np = lambda t: t.detach().double().cpu().numpy() if isinstance(t, torch.Tensor) else t  # noqa: E731
            _record("assert_close", _used(as_np(actual), as_np(expected), rtol, atol), f"rtol={rtol:g} atol={atol:g}")
        return result

    torch.testing.assert_close = assert_close


def _wrap_parity_grads():
    try:
        import parity_tests.conftest as parity
    except ImportError:
        return
    original = parity.assert_grads_close

    def assert_grads_close(got, ref, what="grad", zero=()):
        errs = original(got, ref, what, zero)
        checked = {k: v for k, v in errs.items() if not (zero and k.endswith(zero))}
        if checked:
            worst = max(checked, key=checked.get)
            _record("gradient", checked[worst] / parity.GRAD_REL_TOL, f"{worst}: {checked[worst]:.2e}")
        return errs

    parity.assert_grads_close = assert_grads_close


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def pytest_configure(config):
    if not config.getini("enable_assertion_pass_hook") or sys.pycache_prefix is None:
        raise pytest.UsageError("tests.bound_audit needs `-o enable_assertion_pass_hook=true` and a fresh cache for "
                                "rewritten modules: PYTHONPYCACHEPREFIX=/tmp/bound-audit-pyc (see its docstring)")
    _state["log"] = str(Path(config.getoption("--bound-audit-log")).resolve())
    if not hasattr(config, "workerinput"):  # the controller (or a run without xdist) starts a fresh log
        Path(_state["log"]).write_text("")
    _wrap_numpy()
    _wrap_torch()
    _wrap_parity_grads()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    _state["test"] = item.nodeid


def pytest_assertion_pass(item, lineno, orig, expl):
    first = re.sub(r"np\.float(?:16|32|64)\(([^)]*)\)", r"\1", expl.splitlines()[0] if expl else "")
    used = [float(a) / float(b) for a, b in _COMPARISON.findall(first) if 0 < float(b) < 1 and float(a) >= 0]
    if used:
        _record("assert", max(used), f"line {lineno}: {orig.strip()[:100]}")


def pytest_terminal_summary(terminalreporter, config):
    if hasattr(config, "workerinput") or not os.path.exists(_state["log"] or ""):
        return
    worst: dict[tuple, dict] = {}
    for line in Path(_state["log"]).read_text().splitlines():
        rec = json.loads(line)
        key = (rec["test"], rec["kind"], rec["detail"].split(":")[0])
        if rec["used"] > worst.get(key, {"used": -1.0})["used"]:
            worst[key] = rec
    top = sorted(worst.values(), key=lambda r: -r["used"])[:config.getoption("--bound-audit-top")]
    terminalreporter.section(f"bound audit: the {len(top)} tightest of {len(worst)} checks (used = measured / bound)")
    for rec in top:
        terminalreporter.write_line(f"{rec['used']:6.3f}  {rec['test']}  [{rec['kind']}] {rec['detail']}")
