"""Shared helpers for the parity suite: random weights, tolerance checks, jax<->torch plumbing.

Tolerances (float32 on CPU; how they were set: docs/testing.md):
  jaxformer vs torch_ref   outputs max|diff| <= 5e-5 * max|ref|, elementwise,
                           gradients ||g - g_ref|| / ||g_ref|| <= 1e-4
  jaxformer vs HF          logits max|diff| <= max(1e-4, 5e-5 * max|ref|)
Both float32 sides of a comparison are off from the exact (float64) result by float32's own rounding: for the
Gemma test model 4.5e-6 x max|ref| each (logits 11, embeddings scaled by sqrt(d)), so they may differ by twice
that; 5e-5 keeps 7x over the largest difference measured on any family (7.1e-6 x max|ref|, Gemma).
"""

from __future__ import annotations

import functools
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from typing import Any, Callable, Mapping  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

OUT_REL_TOL = 5e-5
GRAD_REL_TOL = 1e-4
HF_ABS_TOL = 1e-4

torch.set_num_threads(1)  # `pytest -n 2` on two cores: one thread per worker avoids oversubscription


def quiet_transformers():
    """No progress bars or advisory logging from transformers (call before using it)."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


# ----------------------------------------------------------------------------- numbers

def as_numpy(x: Any) -> np.ndarray:
    """numpy float64 view of a jax array, torch tensor or numpy array (for comparisons only)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def max_abs_diff(a: Any, b: Any) -> float:
    """max |a - b| over all elements; shapes must match exactly."""
    a, b = as_numpy(a), as_numpy(b)
    assert a.shape == b.shape, f"shape mismatch {a.shape} vs {b.shape}"
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def max_rel_err(got: Any, ref: Any) -> float:
    """max |got - ref| / max |ref|, elementwise (the suite's bound shape); shapes must match exactly."""
    got, ref = as_numpy(got), as_numpy(ref)
    assert got.shape == ref.shape, f"shape mismatch {got.shape} vs {ref.shape}"
    scale = np.abs(ref).max()
    assert scale > 0, "reference is all zeros: the check would be meaningless"
    return float(np.abs(got - ref).max() / scale)


def rel_err(got: Any, ref: Any) -> float:
    """||got - ref|| / ||ref|| (Frobenius)."""
    got, ref = as_numpy(got), as_numpy(ref)
    assert got.shape == ref.shape, f"shape mismatch {got.shape} vs {ref.shape}"
    denom = np.linalg.norm(ref)
    assert denom > 0, "reference is all zeros: the check would be meaningless"
    return float(np.linalg.norm(got - ref) / denom)


def assert_outputs_close(got: Any, ref: Any, what: str = "output") -> float:
    """The jaxformer-vs-torch_ref output check; returns the measured max |diff|."""
    ref_np = as_numpy(ref)
    scale = float(np.max(np.abs(ref_np)))
    assert scale > 0, f"{what}: reference is all zeros"
    tol = OUT_REL_TOL * scale
    diff = max_abs_diff(got, ref_np)
    assert diff <= tol, f"{what}: max|diff|={diff:.3e} > tol={tol:.3e} (max|ref|={scale:.3e})"
    report("torch_ref", what, diff, scale)
    return diff


def assert_grads_close(got: Mapping[str, Any], ref: Mapping[str, Any], what: str = "grad",
                       zero: tuple[str, ...] = ()) -> dict[str, float]:
    """Same keys, and every gradient within GRAD_REL_TOL relative error of the reference.

    Names ending in one of `zero` have an exactly-zero true gradient (e.g. the key bias without
    RoPE: softmax cancels a per-query constant), so both sides must be round-off small instead.
    """
    assert set(got) == set(ref), f"{what}: names differ: only jax {sorted(set(got) - set(ref))}, " \
                                 f"only torch {sorted(set(ref) - set(got))}"
    largest = max(float(np.linalg.norm(as_numpy(g))) for g in ref.values())
    errs, bad = {}, {}
    for k in ref:
        if zero and k.endswith(zero):
            norms = (float(np.linalg.norm(as_numpy(got[k]))), float(np.linalg.norm(as_numpy(ref[k]))))
            errs[k] = max(norms) / largest
            if not errs[k] <= 1e-5:
                bad[k] = f"expected ~0 gradient, got norms {norms} (largest gradient norm {largest:.3e})"
            continue
        errs[k] = rel_err(got[k], ref[k])
        if not errs[k] <= GRAD_REL_TOL:
            bad[k] = errs[k]
    assert not bad, f"{what}: relative gradient error above {GRAD_REL_TOL}: {bad}"
    return errs


def hf_tol(scale: float) -> float:
    """The jaxformer-vs-Hugging Face bound for a reference whose largest entry is `scale`."""
    return max(HF_ABS_TOL, OUT_REL_TOL * scale)


def assert_hf_close(got: Any, ref: Any, what: str = "logits") -> float:
    """The jaxformer-vs-Hugging Face check; returns the measured max |diff|."""
    diff = max_abs_diff(got, ref)
    scale = float(np.abs(as_numpy(ref)).max())
    assert diff <= hf_tol(scale), f"{what}: max|diff|={diff:.3e} > {hf_tol(scale):.3e} (max|ref|={scale:.3e})"
    report("hf", what, diff, scale)
    return diff


def report(pair: str, what: str, diff: float, scale: float) -> None:
    """One line per check (seen with `pytest -s`): `PARITY <test> <pair> <what> max|diff|=... max|ref|=...`."""
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
    print(f"PARITY {test} {pair} {what} max|diff|={diff:.2e} max|ref|={scale:.2e}")


# ----------------------------------------------------------------------------- random weights

def _is_norm(name: str) -> bool:
    leaf_owner = name.rsplit(".", 2)[-2] if name.count(".") else name
    return "norm" in leaf_owner or leaf_owner.startswith("ln_")


UNIT_SCALES = ("layer_scalar", "router.scale", "per_expert_scale")  # (Gemma 3n's correct_output_scale starts at 0)


def random_value(name: str, shape: tuple[int, ...], rng: np.random.Generator, std: float) -> np.ndarray:
    """Norm scales and other multipliers that start at 1 (Gemma 4's layer_scalar, router scale, per_expert_scale)
    ~ 1 + 0.1 N(0,1), biases and norm shifts ~ 0.1 N(0,1), matrices ~ std N(0,1)."""
    if len(shape) == 1 and (_is_norm(name) and name.endswith("weight") or name.endswith(UNIT_SCALES)):
        v = 1.0 + 0.1 * rng.standard_normal(shape)
    elif len(shape) == 1:
        v = 0.1 * rng.standard_normal(shape)
    else:
        v = std * rng.standard_normal(shape)
    return v.astype(np.float32)


def jax_params(module: nnx.Module) -> dict[str, Any]:
    """{dotted name: Param variable} of an nnx module (variables are live references)."""
    return {".".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def randomize_jax(module: nnx.Module, seed: int, std: float = 0.2, prefix: str = "") -> nnx.Module:
    """Overwrite every parameter (norm scales and biases included) with seeded random values.

    `prefix` names the module for the norm-vs-bias choice (a bare LayerNorm: prefix="norm.").
    """
    rng = np.random.default_rng(seed)
    for name, var in sorted(jax_params(module).items()):
        var.set_value(jnp.asarray(random_value(prefix + name, tuple(var.shape), rng, std)))
    return module


def random_jax_module(ctor: Callable[[], nnx.Module], seed: int, std: float = 0.2, prefix: str = "") -> nnx.Module:
    """`ctor()` built abstractly (no init compute: eager random init compiles per shape), then randomized."""
    return randomize_jax(nnx.eval_shape(ctor), seed, std, prefix)


def randomize_torch(module: torch.nn.Module, seed: int, std: float = 0.2) -> torch.nn.Module:
    """Same as randomize_jax for a torch module (tied parameters are written once)."""
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            p.copy_(torch.from_numpy(random_value(name, tuple(p.shape), rng, std)))
    return module


def copy_jax_to_torch(jmod: nnx.Module, tmod: torch.nn.Module) -> None:
    """Load jaxformer weights into the torch_ref twin by name (strict: names must match exactly)."""
    sd = {k: torch.from_numpy(np.array(v[...], dtype=np.float32)) for k, v in jax_params(jmod).items()}
    tmod.load_state_dict(sd, strict=True)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens, positions, segment_ids):
    return nnx.merge(graphdef, state)(tokens, positions, segment_ids)


def jax_logits(model: nnx.Module, tokens: Any, positions: Any = None, segment_ids: Any = None) -> np.ndarray:
    """Compiled forward (cached per model structure): eager op-by-op dispatch compiles every op shape."""
    graphdef, state = nnx.split(model)
    args = [None if a is None else jnp.asarray(a) for a in (tokens, positions, segment_ids)]
    return np.asarray(_forward(graphdef, state, *args))


# ----------------------------------------------------------------------------- inputs

def to_jax_tree(tree: Any) -> Any:
    return jax.tree.map(jnp.asarray, tree)


def to_torch_tree(tree: Any) -> Any:
    if tree is None:
        return None
    if isinstance(tree, (tuple, list)):
        return type(tree)(to_torch_tree(t) for t in tree)
    if isinstance(tree, dict):
        return {k: to_torch_tree(v) for k, v in tree.items()}
    return torch.from_numpy(np.array(tree))


def random_segments(rng: np.random.Generator, batch: int, seq: int, n_docs: int) -> tuple[np.ndarray, np.ndarray]:
    """segment ids [B, T] (documents numbered from 1) and positions restarting at 0 in each document."""
    seg = np.zeros((batch, seq), np.int32)
    pos = np.zeros((batch, seq), np.int32)
    for b in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, seq), size=n_docs - 1, replace=False))
        for i, (s, e) in enumerate(zip([0, *cuts], [*cuts, seq])):
            seg[b, s:e] = i + 1
            pos[b, s:e] = np.arange(e - s)
    return seg, pos


# ----------------------------------------------------------------------------- module parity

def module_parity(jmod: nnx.Module, tmod: torch.nn.Module, call: Callable, inputs: dict[str, Any],
                  diff: tuple[str, ...], seed: int, zero_grads: tuple[str, ...] = ()) -> dict[str, float]:
    """Forward outputs and gradients of sum(out * c) (c random) w.r.t. `diff` inputs and every parameter.

    `call(module, **inputs)` must work unchanged on the jaxformer and torch_ref modules.
    Returns {"out": max|diff|, "grad/<name>": rel err, ...}.
    """
    graphdef, params, rest = nnx.split(jmod, nnx.Param, ...)
    jin = to_jax_tree(inputs)

    def jax_out(p, d):
        return call(nnx.merge(graphdef, p, rest), **{**jin, **d})

    out_shape = jax.eval_shape(jax_out, params, {}).shape
    cot = np.random.default_rng(seed + 1).standard_normal(out_shape).astype(np.float32)

    @jax.jit  # one compiled program for forward + backward: far faster than eager op-by-op on CPU
    def fwd_bwd(p, d):
        out, vjp = jax.vjp(jax_out, p, d)
        return out, vjp(jnp.asarray(cot))

    out_j, (g_params, g_in) = fwd_bwd(params, {k: jin[k] for k in diff})
    grads_j = {".".join(map(str, p)): v[...] for p, v in nnx.to_flat_state(g_params)}
    grads_j.update({f"input:{k}": v for k, v in g_in.items()})

    tin = to_torch_tree(inputs)
    for k in diff:
        tin[k].requires_grad_(True)
    tmod.zero_grad(set_to_none=True)
    out_t = call(tmod, **tin)
    (out_t * torch.from_numpy(cot)).sum().backward()
    grads_t = {k: p.grad for k, p in tmod.named_parameters()}
    grads_t.update({f"input:{k}": tin[k].grad for k in diff})
    missing = [k for k, g in grads_t.items() if g is None]
    assert not missing, f"torch produced no gradient for {missing}"

    report = {"out": assert_outputs_close(out_j, out_t)}
    report.update({f"grad/{k}": e for k, e in assert_grads_close(grads_j, grads_t, zero=zero_grads).items()})
    return report
