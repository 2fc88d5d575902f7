"""orbax checkpoints of a run: last K steps plus the best by validation loss, saved asynchronously.

Each step directory holds three items: `state` (params, optimizer state, RNG key data), `data` (the
input iterator's state, JSON) and `meta` (configs, metrics and what the run must match to resume,
JSON). orbax writes to a temporary directory and renames it on commit, so a half-written checkpoint is
never listed.

Restoring tells two kinds of failure apart. A checkpoint whose bytes do not decode (a truncated or
overwritten file, a missing one) is corrupt: it is reported, the previous checkpoint is tried, and once
one restores the unreadable directories are renamed `STEP.unreadable` (kept for inspection). Anything
else (a state that does not fit the run's config, a mesh that cannot hold it, running out of memory) is
raised with its cause, and nothing is renamed.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm

from jaxformer.config import ModelConfig, model_config_from_dict

# tensorstore's status codes for bytes that are missing or do not decode (its errors start "CODE: ...")
CORRUPT_STATUS = ("DATA_LOSS", "NOT_FOUND", "OUT_OF_RANGE")


class CheckpointError(RuntimeError):
    """No usable checkpoint could be restored."""


class IncompatibleCheckpointError(ValueError):
    """A readable checkpoint does not fit what the run expects (its tree, shapes or dtypes)."""


def is_corrupt(e: BaseException) -> bool:
    """True for errors that mean "these bytes are damaged", never for memory, mesh or config errors."""
    if isinstance(e, (json.JSONDecodeError, UnicodeDecodeError, EOFError, FileNotFoundError)):
        return True
    return isinstance(e, ValueError) and str(e).split(":", 1)[0].strip() in CORRUPT_STATUS


class Checkpointer:
    def __init__(self, directory: str | Path, *, keep_last: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        keep = cm.AnyPreservationPolicy([
            cm.LatestN(n=keep_last),
            # BestN keeps the last n after sorting; reverse=True sorts descending, so the lowest loss
            cm.BestN(get_metric_fn=lambda m: m["val_loss"], reverse=True, n=1,
                     keep_checkpoints_without_metrics=False),
        ])
        options = ocp.CheckpointManagerOptions(preservation_policy=keep, enable_async_checkpointing=async_save,
                                               create=True, cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "meta"))

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict, meta: dict, val_loss: float | None = None) -> None:
        """Start saving (returns once arrays are copied off the device; files finish in background)."""
        metrics = None if val_loss is None else {"val_loss": float(val_loss)}
        # The train step donates these buffers next step; on CPU the "device-to-host" copy orbax makes
        # before returning can alias them, so the background writer gets private copies.
        state = jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else x, state)
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta)), metrics=metrics, force=True)

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[int, Any, dict, dict]:
        """(step, state, data_state, meta) of `step`, or of the newest readable checkpoint (see module doc)."""
        candidates = [step] if step is not None else list(reversed(self.steps()))
        if not candidates:
            raise CheckpointError(f"no checkpoints in {self.directory}")
        errors, unreadable = [], []
        for s in candidates:
            try:
                out = self.manager.restore(s, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
                    meta=ocp.args.JsonRestore()))
            except Exception as e:
                if not is_corrupt(e):
                    raise _explained(e, s, self.directory) from e
                msg = f"checkpoint at step {s} in {self.directory} is unreadable ({type(e).__name__}: {e})"
                errors.append(msg)
                unreadable.append(s)
                warnings.warn(msg + ("; falling back to the previous checkpoint" if s != candidates[-1] else ""),
                              stacklevel=2)
                continue
            self._set_aside(unreadable)
            return s, out["state"], out["data"], out["meta"]
        raise CheckpointError("no readable checkpoint:\n  " + "\n  ".join(errors))

    def _set_aside(self, steps: list[int]) -> None:
        """Rename unreadable step directories (kept for inspection) so training can save those steps anew."""
        for s in steps:
            src = self.directory / str(s)
            dst = self.directory / f"{s}.unreadable"
            n = 1
            while dst.exists():
                dst, n = self.directory / f"{s}.unreadable{n}", n + 1
            src.rename(dst)
            warnings.warn(f"moved unreadable checkpoint {src} to {dst}", stacklevel=3)
        if steps:
            self.manager.reload()

    def delete_from(self, step: int) -> None:
        """Delete the checkpoints at `step` and after (a loss-spike rollback discarded what they hold)."""
        self.wait()
        for s in self.steps():
            if s >= step:
                self.manager.delete(s)

    def wait(self) -> None:
        """Block until pending asynchronous saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _explained(e: Exception, step: int, directory: Path) -> Exception:
    """A restore error that is not corruption, with the checkpoint it came from in its message."""
    where = f"checkpoint at step {step} in {directory}"
    msg = str(e).split("\n")[0][:500]
    if isinstance(e, ValueError) and ("shape" in msg or "tructure" in msg or "dtype" in msg):
        return IncompatibleCheckpointError(f"{where} does not fit this run's state ({msg}); was it written with "
                                       "another model config? Nothing was changed on disk")
    return type(e)(f"{where} could not be restored: {type(e).__name__}: {msg}") if isinstance(e, ValueError) else e


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) for a pytree of arrays: what restore fills in."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


def read_run_meta(path: str | Path) -> dict | None:
    """The meta item (config, metrics, fingerprints) of a run's newest checkpoint, or None if `path` is no run."""
    ckpt_dir = Path(path) / "checkpoints"
    if not ckpt_dir.is_dir():
        return None
    for step_dir in sorted((p for p in ckpt_dir.iterdir() if p.name.isdigit()), key=lambda p: -int(p.name)):
        meta = step_dir / "meta" / "metadata"
        try:
            return json.loads(meta.read_text())
        except (OSError, ValueError):  # a damaged meta item: the previous checkpoint's describes the run
            continue
    return None


def read_run_config(path: str | Path) -> dict | None:
    """The {section: dict} config stored with a run's newest checkpoint, or None if `path` is no run."""
    meta = read_run_meta(path)
    return None if meta is None else meta.get("config")


def load_run_params(run_dir: str | Path) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """(model config, {param name: array}) from a run's newest readable checkpoint.

    A corrupt checkpoint is reported and the previous one is read instead; any other error is raised.
    """
    ckpt = Checkpointer(Path(run_dir) / "checkpoints", async_save=False)
    errors = []
    try:
        for step in reversed(ckpt.steps()):
            try:
                out = ckpt.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
            except Exception as e:
                if not is_corrupt(e):
                    raise _explained(e, step, ckpt.directory) from e
                errors.append(f"step {step}: {type(e).__name__}: {str(e)[:300]}")
                warnings.warn(f"checkpoint at step {step} in {ckpt.directory} is unreadable ({errors[-1]}); "
                              "reading the previous one", stacklevel=2)
                continue
            flat = {}
            for path, leaf in jax.tree_util.tree_flatten_with_path(out["state"]["params"])[0]:
                names = [str(getattr(k, "key", k)) for k in path]
                flat[".".join(n for n in names if n != "value")] = np.asarray(leaf)
            return model_config_from_dict(out["meta"]["config"]["model"]), flat
    finally:
        ckpt.close()
    reasons = "".join(f"\n  {e}" for e in errors)
    raise FileNotFoundError(f"no readable checkpoint under {run_dir}/checkpoints{reasons}")
