"""orbax checkpoints of a run: last K steps plus the best by validation loss, saved asynchronously.

Each step directory holds three items: `state` (params, optimizer state, step, RNG key data),
`data` (the input iterator's state, JSON) and `meta` (configs and metrics, JSON). orbax writes
to a temporary directory and renames it on commit, so a half-written checkpoint is never listed.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm

from jaxformer.config import ModelConfig, model_config_from_dict

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """No usable checkpoint could be restored."""


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
        """(step, state, data_state, meta) of `step`, or of the newest readable checkpoint.

        A corrupt newest checkpoint is reported and the previous one is tried instead.
        """
        candidates = [step] if step is not None else list(reversed(self.steps()))
        if not candidates:
            raise CheckpointError(f"no checkpoints in {self.directory}")
        errors, unreadable = [], []
        for s in candidates:
            try:
                out = self.manager.restore(s, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
                    meta=ocp.args.JsonRestore()))
                self._set_aside(unreadable)
                return s, out["state"], out["data"], out["meta"]
            except Exception as e:  # noqa: BLE001 - any failure to read means "corrupt", fall back
                msg = f"checkpoint at step {s} in {self.directory} is unreadable ({type(e).__name__}: {e})"
                errors.append(msg)
                unreadable.append(s)
                warnings.warn(msg + ("; falling back to the previous checkpoint" if s != candidates[-1] else ""),
                              stacklevel=2)
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

    def wait(self) -> None:
        """Block until pending asynchronous saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) for a pytree of arrays: what restore fills in."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


def read_run_config(path: str | Path) -> dict | None:
    """The {section: dict} config stored with a run's newest checkpoint, or None if `path` is no run."""
    ckpt_dir = Path(path) / "checkpoints"
    if not ckpt_dir.is_dir():
        return None
    import json

    for step_dir in sorted((p for p in ckpt_dir.iterdir() if p.name.isdigit()), key=lambda p: -int(p.name)):
        meta = step_dir / "meta" / "metadata"
        if meta.exists():
            return json.loads(meta.read_text()).get("config")
    return None


def load_run_params(run_dir: str | Path) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """(model config, {param name: array}) from a run's newest readable checkpoint."""
    ckpt = Checkpointer(Path(run_dir) / "checkpoints", async_save=False)
    try:
        for step in reversed(ckpt.steps()):
            try:
                out = ckpt.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
            except Exception:  # noqa: BLE001 - corrupt: try the previous one
                continue
            flat = {}
            for path, leaf in jax.tree_util.tree_flatten_with_path(out["state"]["params"])[0]:
                names = [str(getattr(k, "key", k)) for k in path]
                flat[".".join(n for n in names if n != "value")] = np.asarray(leaf)
            return model_config_from_dict(out["meta"]["config"]["model"]), flat
    finally:
        ckpt.close()
    raise FileNotFoundError(f"no readable checkpoint under {run_dir}/checkpoints")
