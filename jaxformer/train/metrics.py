"""Run logging: metrics.jsonl (one JSON object per record), TensorBoard event files, loss plots."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np

METRICS_FILE = "metrics.jsonl"


class MetricsLogger:
    """Appends records to RUN/metrics.jsonl and scalars to RUN/tb (TensorBoard)."""

    def __init__(self, run_dir: str | Path, *, resume_step: int | None = None, enabled: bool = True):
        self.path = Path(run_dir) / METRICS_FILE
        self.enabled = enabled
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():  # steps after the checkpoint will be recomputed: drop their old records
            records = _records(self.path)
            # in file order: a loss-spike rollback numbers steps again from its checkpoint, so the records
            # logged before the checkpoint end with the last one at or before its step
            last = max((i for i, r in enumerate(records) if r.get("step", 0) <= resume_step), default=-1)
            self._write(records[:last + 1])
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(str(Path(run_dir) / "tb"))

    def log(self, step: int, kind: str, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "kind": kind, **{k: _plain(v) for k, v in values.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in record.items():
            if k not in ("step", "kind") and isinstance(v, (int, float)):
                self._tb.add_scalar(f"{kind}/{k}", v, step)

    def rewind(self, step: int, keep: tuple[str, ...] = ("spike", "rollback")) -> None:
        """Drop the records of steps after `step` (a rollback discarded them), except those of the kinds in `keep`."""
        if self.enabled:
            self._write([r for r in _records(self.path) if r.get("step", 0) <= step or r.get("kind") in keep])

    def _write(self, records: list[dict]) -> None:
        self.path.write_text("".join(json.dumps(r) + "\n" for r in records))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()


def moe_scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """A train step's Mixture-of-Experts metrics as scalars: moe_aux_loss, moe_z_loss, moe_dropped and
    moe_load/{e} (the fraction of routed assignments that went to expert e); {} for a dense model."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        if not k.startswith("moe_"):
            continue
        arr = np.asarray(v)
        out.update({f"{k}/{e}": float(x) for e, x in enumerate(arr)} if arr.ndim else {k: float(arr)})
    return out


def _plain(v: Any) -> Any:
    try:
        return float(v) if not isinstance(v, (str, bool, int)) else v
    except (TypeError, ValueError):
        return str(v)


def _records(path: Path) -> list[dict]:
    """The records of a metrics.jsonl; a line cut short (a process killed mid-write) is dropped with a warning."""
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            warnings.warn(f"{path}: line {n} is not a complete JSON record (cut short by a kill?); dropped it",
                          stacklevel=3)
    return records


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        raise FileNotFoundError(f"no {METRICS_FILE} in {run_dir}: is it a jaxformer run directory?")
    return _records(path)


def plot_losses(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the train/val loss curve of a run to a PNG (default RUN/loss.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]
    val = [(r["step"], r["val_loss"]) for r in records if r["kind"] == "eval"]
    if not train:
        raise ValueError(f"{run_dir} has no training records to plot yet")
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot(*zip(*train), label="train", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="val", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(Path(run_dir).name)
    ax.grid(alpha=0.3)
    ax.legend()
    out = Path(out) if out else Path(run_dir) / "loss.png"
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
