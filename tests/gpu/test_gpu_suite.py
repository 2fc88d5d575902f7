"""bench/gpu_suite.py runs end to end on CPU (tiny shapes, Pallas in interpret mode), so it cannot rot.

On a GPU the same code measures kernel correctness, attention TFLOP/s against three baselines, GPT-2
training MFU and decode tokens/s; here every section must run and its checks must pass.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "gpu_suite.py"


def test_tiny_suite_runs_every_section(tmp_path):
    out = tmp_path / "suite.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--tiny", "--out", str(out)], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == json.loads(out.read_text()) and result["tiny"]
    sections = result["sections"]
    assert set(sections) == {"device", "kernels", "attention", "train", "decode"}
    assert not [name for name, s in sections.items() if "error" in s]
    assert sections["kernels"]["all_ok"] and sections["kernels"]["cases"]
    assert all(check["ok"] for check in sections["attention"]["correctness"].values())
    assert {r["impl"] for r in sections["attention"]["rows"] if "ms" in r} == {"ours", "xla"}
    for impl in ("pallas", "xla"):
        assert sections["train"][impl]["tokens_per_s"] > 0 and sections["train"][impl]["mfu"] > 0
        assert sections["decode"][f"{impl}/batch2"]["tokens_per_s"] > 0


def test_without_a_gpu_the_full_suite_refuses_to_run(capsys):
    sys.path.insert(0, str(BENCH.parent))
    import gpu_suite

    with pytest.raises(SystemExit) as e:
        gpu_suite.main(["--out", "unused.json"])
    assert e.value.code == 2 and "--tiny" in capsys.readouterr().err
