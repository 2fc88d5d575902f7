"""LFM2's gated short convolution (models/short_conv.py, torch_ref/short_conv.py) against transformers'
Lfm2ShortConv (forward and its own cached decoding), jaxformer against torch_ref (output, dx, every parameter
gradient), and the decode state: prefill + one-token steps, bucketed prefill with padding, packed documents.

Errors are elementwise, relative to the reference's max |value|; bounds keep >= 4x margin over measured errors.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.models.short_conv import ConvState, ShortConv
from parity_tests.conftest import jax_params, max_rel_err, quiet_transformers
from torch_ref import short_conv as tsc

# measured on a 2-core x86 CPU, identical pinned to one core (taskset -c 0), max over every comparison of a kind:
#   torch_ref vs transformers, forward and its cached decoding: 2.1e-7
#   jaxformer vs torch_ref: output 4.2e-7, dx 6.3e-7, parameter gradients 6.8e-7
#   jaxformer decoding (prefill + steps, bucketed, packed) vs its full forward, transformers, torch_ref: 3.1e-7
TOL = 2e-6  # outputs and states, float32 against float32
GRAD_TOL = 3e-6  # dx and parameter gradients

D = 32


def _cfg(kernel: int = 3, bias: bool = True) -> ModelConfig:
    return ModelConfig.llama(vocab_size=64, d_model=D, n_layers=2, n_heads=4, d_ff=64,
                             layer_types=("conv", "full_attention"), conv=dict(kernel=kernel, bias=bias))


def _x(seed: int, *shape: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _weights(names_shapes, seed: int) -> dict[str, np.ndarray]:
    """Matrices ~ 0.3 N (in_proj, out_proj), conv taps ~ 0.6 N, biases ~ 0.3 N: every term of the same order."""
    r = np.random.default_rng(seed)
    std = lambda name, shape: 0.6 if name.startswith("conv") and len(shape) == 3 else 0.3  # noqa: E731
    return {n: (std(n, s) * r.standard_normal(s)).astype(np.float32) for n, s in sorted(names_shapes)}


def _jax_module(cfg: ModelConfig, seed: int) -> ShortConv:
    m = nnx.eval_shape(lambda: ShortConv(cfg, rngs=nnx.Rngs(0)))
    params = jax_params(m)
    for name, w in _weights([(k, tuple(v.shape)) for k, v in params.items()], seed).items():
        params[name].set_value(jnp.asarray(w))
    return m


def _torch_twin(m: ShortConv, module: torch.nn.Module) -> torch.nn.Module:
    """module with m's weights, copied by name (strict: transformers' names are jaxformer's)."""
    module.load_state_dict({k: torch.from_numpy(np.array(v[...])) for k, v in jax_params(m).items()}, strict=True)
    return module.eval()


def _hf(cfg: ModelConfig):
    quiet_transformers()
    from transformers import Lfm2Config
    from transformers.models.lfm2.modeling_lfm2 import Lfm2ShortConv

    hc = Lfm2Config(vocab_size=64, hidden_size=D, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                    num_key_value_heads=4, layer_types=["conv"], conv_L_cache=cfg.conv.kernel, conv_bias=cfg.conv.bias)
    return hc, Lfm2ShortConv(hc, 0)


def _hf_decode(hf, hc, x: np.ndarray, n: int) -> torch.Tensor:
    """transformers' own cached decoding: prefill n tokens, then one token at a time."""
    from transformers.cache_utils import DynamicCache

    cache, xt = DynamicCache(config=hc), torch.from_numpy(x)
    with torch.no_grad():
        ys = [hf(xt[:, :n], cache=cache)] + [hf(xt[:, t:t + 1], cache=cache) for t in range(n, x.shape[1])]
    return torch.cat(ys, 1)


def _stepper(m: ShortConv):
    """Compiled stateful call (x, state, segment_ids, valid) -> (y, state)."""
    graphdef, params = nnx.split(m)
    fn = jax.jit(lambda p, x, s, seg, valid: nnx.merge(graphdef, p)(x, seg, state=s, valid=valid))
    return lambda x, s, seg=None, valid=None: fn(params, jnp.asarray(x), s, seg, valid)


def _forward(m: ShortConv):
    graphdef, params = nnx.split(m)
    fn = jax.jit(lambda p, x, seg: nnx.merge(graphdef, p)(x, seg))
    return lambda x, seg=None: np.asarray(fn(params, jnp.asarray(x), None if seg is None else jnp.asarray(seg)))


@pytest.mark.parametrize("bias", [False, True])
def test_torch_ref_matches_transformers(bias):
    cfg = _cfg(bias=bias)
    m = _jax_module(cfg, seed=1)
    hc, hf = _hf(cfg)
    hf, ref = _torch_twin(m, hf), _torch_twin(m, tsc.ShortConv(cfg))
    x = _x(2, 2, 128, D)
    with torch.no_grad():
        want = hf(torch.from_numpy(x))
        assert max_rel_err(ref(torch.from_numpy(x)), want) <= TOL
        # torch_ref's stateful steps against transformers' cached decoding
        y, s = ref(torch.from_numpy(x[:, :100]), state=torch.zeros(2, 2, D))
        ys = [y]
        for t in range(100, 128):
            y, s = ref(torch.from_numpy(x[:, t:t + 1]), state=s)
            ys.append(y)
    hf_steps = _hf_decode(hf, hc, x, 100)
    assert max_rel_err(hf_steps, want) <= TOL
    assert max_rel_err(torch.cat(ys, 1), hf_steps) <= TOL


@pytest.mark.parametrize("bias,kernel,packed", [(True, 3, False), (False, 3, True), (True, 4, True)])
def test_jax_matches_torch_ref_with_gradients(bias, kernel, packed):
    cfg = _cfg(kernel, bias)
    m = _jax_module(cfg, seed=3)
    ref = _torch_twin(m, tsc.ShortConv(cfg))
    B, T = 2, 112
    x, cot = _x(4, B, T, D), _x(5, B, T, D)
    seg = None
    if packed:  # documents of 40, 1, 2 and 69 tokens in row 0, of 7 and 105 in row 1 (ids need not start at 0)
        seg = np.zeros((B, T), np.int32) + 5
        seg[0, 40:] += 1
        seg[0, 41:] += 1
        seg[0, 43:] += 1
        seg[1, 7:] += 1
    graphdef, params = nnx.split(m)

    def f(p, x):
        return nnx.merge(graphdef, p)(x, None if seg is None else jnp.asarray(seg))

    y, vjp = jax.vjp(jax.jit(f), params, jnp.asarray(x))
    g_params, g_x = vjp(jnp.asarray(cot))
    grads = {".".join(map(str, k)): v[...] for k, v in nnx.to_flat_state(g_params)}

    xt = torch.from_numpy(x).requires_grad_(True)
    yt = ref(xt, None if seg is None else torch.from_numpy(seg))
    (yt * torch.from_numpy(cot)).sum().backward()
    assert max_rel_err(y, yt) <= TOL
    assert max_rel_err(g_x, xt.grad) <= GRAD_TOL
    tgrads = dict(ref.named_parameters())
    assert set(grads) == set(tgrads) and ("conv.bias" in grads) == bias
    for name, p in tgrads.items():
        assert max_rel_err(grads[name], p.grad) <= GRAD_TOL, name


def test_decoding_equals_the_full_forward_and_transformers_cache():
    cfg = _cfg(bias=True)
    m = _jax_module(cfg, seed=6)
    x = _x(7, 2, 112, D)
    full = _forward(m)(x)
    step = _stepper(m)
    y, s = step(x[:, :100], ConvState.init(cfg, 2))
    ys = [y]
    for t in range(100, 112):
        y, s = step(x[:, t:t + 1], s)
        ys.append(y)
    got = np.asarray(jnp.concatenate(ys, 1))
    assert max_rel_err(got, full) <= TOL
    hc, hf = _hf(cfg)
    assert max_rel_err(got, _hf_decode(_torch_twin(m, hf), hc, x, 100)) <= TOL
    # the state holds the last K - 1 convolution inputs, as transformers' cache's last K - 1 columns
    with torch.no_grad():
        b, _, h = _torch_twin(m, tsc.ShortConv(cfg)).in_proj(torch.from_numpy(x[:, -2:])).chunk(3, -1)
    assert max_rel_err(s.conv, b * h) <= TOL


def test_bucketed_prefill_takes_the_state_at_the_last_valid_token():
    """Rows of 9, 16 and 1 valid tokens in a bucket of 16 (junk after them), continuing a nonzero state: each row's
    outputs and new state are those of its unpadded run, in both frameworks; a row of 0 keeps its state."""
    cfg = _cfg(bias=False)
    m = _jax_module(cfg, seed=8)
    ref = _torch_twin(m, tsc.ShortConv(cfg))
    step = _stepper(m)
    x, head = _x(9, 4, 16, D), _x(10, 4, 5, D)
    _, s0 = step(head, ConvState.init(cfg, 4))
    n = np.array([9, 16, 1, 0])
    valid = np.arange(16) < n[:, None]
    y, s = step(x, s0, valid=jnp.asarray(valid))
    with torch.no_grad():
        yt, st = ref(torch.from_numpy(x), state=torch.from_numpy(np.array(s0.conv)), valid=torch.from_numpy(valid))
    assert max_rel_err(st, s.conv) <= TOL
    for b in range(3):
        yb, sb = step(x[b:b + 1, :n[b]], s0.replace(conv=s0.conv[b:b + 1]))
        assert max_rel_err(y[b, :n[b]], yb[0]) <= TOL and max_rel_err(yt[b, :n[b]], yb[0]) <= TOL
        assert max_rel_err(s.conv[b], sb.conv[0]) <= TOL
    np.testing.assert_array_equal(s.conv[3], s0.conv[3])


def test_packed_documents_equal_separate_runs():
    """Without a state each document starts from zeros; with one, the row's first document continues it and the
    new state is the last document's alone (a 1-token last document: one zero, then its value)."""
    cfg = _cfg(bias=True)
    m = _jax_module(cfg, seed=11)
    ref = _torch_twin(m, tsc.ShortConv(cfg))
    fwd, step = _forward(m), _stepper(m)
    lengths = [30, 2, 1, 47, 1]
    x = _x(12, 1, sum(lengths), D)
    seg = np.repeat(np.arange(len(lengths)) % 2, lengths)[None].astype(np.int32)  # ids 0,1,0,1,0: reused ids
    cuts = np.cumsum([0] + lengths)
    docs = [x[:, a:b] for a, b in zip(cuts[:-1], cuts[1:])]
    packed = fwd(x, seg)
    for d, a, b in zip(docs, cuts[:-1], cuts[1:]):
        assert max_rel_err(packed[:, a:b], fwd(d)) <= TOL
    with torch.no_grad():
        assert max_rel_err(ref(torch.from_numpy(x), torch.from_numpy(seg)), packed) <= TOL

    _, s0 = step(_x(13, 1, 6, D), ConvState.init(cfg, 1))
    y, s = step(x, s0, jnp.asarray(seg))
    first, _ = step(docs[0], s0)
    assert max_rel_err(y[:, :cuts[1]], first) <= TOL
    for d, a, b in zip(docs[1:], cuts[1:-1], cuts[2:]):
        yd, sd = step(d, ConvState.init(cfg, 1))
        assert max_rel_err(y[:, a:b], yd) <= TOL
    assert max_rel_err(s.conv, sd.conv) <= TOL and not np.any(np.asarray(s.conv[0, 0]))
    with torch.no_grad():
        yt, st = ref(torch.from_numpy(x), torch.from_numpy(seg), state=torch.from_numpy(np.array(s0.conv)))
    assert max_rel_err(yt, y) <= TOL and max_rel_err(st, s.conv) <= TOL


def test_state_shapes_and_errors():
    cfg = _cfg(kernel=4, bias=False)
    s = ConvState.init(cfg, 3)
    assert s.conv.shape == (3, 3, D) and s.conv.dtype == jnp.float32 and s.nbytes() == 3 * 3 * D * 4
    assert ConvState.init(cfg, 2, "bfloat16").nbytes() == 2 * 3 * D * 2
    assert jax.tree.leaves(s)[0] is s.conv  # a pytree: caches and jit carry it
    m = nnx.eval_shape(lambda: ShortConv(cfg, rngs=nnx.Rngs(0)))
    assert m.conv.weight.shape == (D, 1, 4) and m.in_proj.weight.shape == (3 * D, D) and m.conv.bias is None
    with pytest.raises(ValueError, match="needs a state"):
        m(jnp.ones((1, 4, D)), valid=jnp.ones((1, 4), bool))
    with pytest.raises(ValueError, match="conv.kernel"):
        ShortConv(ModelConfig.llama(vocab_size=64, d_model=D, n_heads=4), rngs=nnx.Rngs(0))
