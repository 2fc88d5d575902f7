"""Gated DeltaNet token mixer (models/delta_net.py, torch_ref/delta_net.py) against transformers' Qwen3_5GatedDeltaNet.

Chain: transformers (float32 and float64) <- torch_ref (a plain token loop) <- jaxformer (chunked, and the token scan
for single-token steps); then jaxformer's state handling (prefill + steps, padded rows, packed documents) against
itself and against transformers' cache. Errors are elementwise, relative to max|ref|. Weights are redrawn far from
init (matrices 0.3 N(0,1), 1-D weights moved by 0.3 N(0,1)), so g reaches -60 per token and the decays matter.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from jaxformer.config import ModelConfig  # noqa: E402
from jaxformer.interop.state_dict import to_torch_state_dict  # noqa: E402
from jaxformer.models.delta_net import DeltaNetState, GatedDeltaNet  # noqa: E402
from parity_tests.conftest import max_rel_err  # noqa: E402
from torch_ref.delta_net import GatedDeltaNet as TorchGatedDeltaNet  # noqa: E402

torch.set_num_threads(1)

D, K, H, DK, DV, W, CHUNK = 32, 2, 4, 8, 6, 4, 16  # value_heads = 2 x key_heads; T below never divisible by CHUNK
C = 2 * K * DK + H * DV
CFG = ModelConfig.llama(vocab_size=50, d_model=D, n_layers=2, n_heads=4, head_dim=8, d_ff=64, norm_eps=1e-6,
                        layer_types=("linear_attention", "full_attention"), linear=dict(key_heads=K, value_heads=H, key_head_dim=DK, value_head_dim=DV, conv_kernel=W,
                                    chunk_size=CHUNK))


def _hf_module(seed: int = 0, dtype=torch.float32):
    from transformers.models.qwen3_5 import modeling_qwen3_5 as hf
    from transformers.models.qwen3_5.configuration_qwen3_5 import Qwen3_5TextConfig

    config = Qwen3_5TextConfig(hidden_size=D, num_hidden_layers=1, layer_types=["linear_attention"], vocab_size=50,
                               linear_num_key_heads=K, linear_num_value_heads=H, linear_key_head_dim=DK,
                               linear_value_head_dim=DV, linear_conv_kernel_dim=W, rms_norm_eps=CFG.norm_eps,
                               num_attention_heads=2, num_key_value_heads=1, head_dim=16, intermediate_size=64)
    torch.manual_seed(seed)
    module = hf.Qwen3_5GatedDeltaNet(config, 0)
    with torch.no_grad():
        for p in module.parameters():  # dt_bias, A_log, norm.weight moved off init; matrices redrawn
            p.copy_(p + 0.3 * torch.randn_like(p) if p.ndim == 1 else 0.3 * torch.randn_like(p))
    return config, module.to(dtype)


def _jax_module(state_dict) -> GatedDeltaNet:
    """jaxformer's module holding the given (torch, by name) weights."""
    model = GatedDeltaNet(CFG, rngs=nnx.Rngs(0))
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        var.set_value(jnp.asarray(state_dict[".".join(map(str, path))].detach().float().numpy()))
    return model


@nnx.jit
def _apply(model, x, segment_ids=None, state=None, valid=None):
    """model(x, ...) compiled once per shape (eager dispatch of the chunked form is slow on CPU)."""
    if state is None:
        return model(x, segment_ids, valid=valid)
    return model(x, segment_ids, state=state, valid=valid)


def _x(seed: int, B: int, T: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((B, T, D)).astype(np.float32)


def _random_state(seed: int, B: int) -> DeltaNetState:
    rng = np.random.default_rng(seed)
    return DeltaNetState(jnp.asarray(rng.standard_normal((B, W - 1, C)), jnp.float32),
                         jnp.asarray(0.3 * rng.standard_normal((B, H, DK, DV)), jnp.float32))


def test_parameters_are_named_and_shaped_as_transformers():
    _, hf = _hf_module()
    model = GatedDeltaNet(CFG, rngs=nnx.Rngs(0))
    ours = {k: tuple(v.shape) for k, v in to_torch_state_dict(model).items()}
    assert ours == {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    assert ours == {k: tuple(v.shape) for k, v in TorchGatedDeltaNet(CFG).state_dict().items()}
    A = np.exp(np.asarray(model.A_log[...]))
    assert np.all((A >= 0.01) & (A <= 16)) and np.all(np.asarray(model.dt_bias[...]) == 1)
    state = DeltaNetState.init(CFG, 3)
    assert state.conv.shape == (3, W - 1, C) and state.recurrent.shape == (3, H, DK, DV)
    assert state.recurrent.dtype == jnp.float32 and state.nbytes() == 3 * ((W - 1) * C + H * DK * DV) * 4


def test_torch_ref_matches_transformers():
    """T = 103: one full chunk of transformers' 64 and a partial one."""
    _, hf = _hf_module()
    ref = TorchGatedDeltaNet(CFG)
    ref.load_state_dict(hf.state_dict())
    x = torch.from_numpy(_x(1, 2, 103))
    with torch.no_grad():
        y, y_hf = ref(x), hf(x)
        y_hf64 = hf.double()(x.double())
    # measured: 8.9e-6 vs transformers in float32 and 9.0e-6 vs transformers in float64 (both float32 sides carry
    # ~1e-5 of rounding at these weights: g reaches -60 per token, transformers' chunk cumsums ~-1000)
    assert max_rel_err(y, y_hf) <= 5e-5
    assert max_rel_err(y, y_hf64) <= 5e-5


def test_jax_matches_torch_ref_outputs_and_gradients():
    _, hf = _hf_module(2)
    ref = TorchGatedDeltaNet(CFG)
    ref.load_state_dict(hf.state_dict())
    model = _jax_module(hf.state_dict())
    x, ct = _x(3, 2, 45), _x(4, 2, 45)

    xt = torch.from_numpy(x).requires_grad_(True)
    y_ref = ref(xt)
    (y_ref * torch.from_numpy(ct)).sum().backward()
    grads_ref = {k: p.grad for k, p in ref.named_parameters()}

    graphdef, params = nnx.split(model, nnx.Param)

    def loss(params, x):
        y = nnx.merge(graphdef, params)(x)
        return jnp.sum(y * ct), y

    (_, y), (g_params, g_x) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, jnp.asarray(x))
    grads = {".".join(map(str, p)): v[...] for p, v in nnx.to_flat_state(g_params)}
    assert set(grads) == set(grads_ref)
    # measured: output 1.0e-6, dx 3.4e-6, parameters <= 3.3e-6 (out_proj, in_proj_qkv 3.2e-6, A_log 2.3e-6)
    assert max_rel_err(y, y_ref) <= 5e-6
    assert max_rel_err(g_x, xt.grad) <= 2e-5
    errs = {k: max_rel_err(grads[k], grads_ref[k]) for k in grads}
    assert max(errs.values()) <= 2e-5, errs


def test_prefill_then_single_steps_equal_the_full_forward_and_transformers_cache():
    from transformers import DynamicCache

    config, hf = _hf_module(5)
    model = _jax_module(hf.state_dict())
    n, k = 37, 4
    x = _x(6, 2, n + k)
    y_full, state_full = _apply(model, jnp.asarray(x), state=DeltaNetState.init(CFG, 2))
    assert max_rel_err(y_full, _apply(model, jnp.asarray(x))) <= 1e-6  # the same computation

    y, state = _apply(model, jnp.asarray(x[:, :n]), state=DeltaNetState.init(CFG, 2))
    ys = [y]
    for t in range(n, n + k):
        y, state = _apply(model, jnp.asarray(x[:, t:t + 1]), state=state)
        ys.append(y)
    y_steps = jnp.concatenate(ys, axis=1)

    cache = DynamicCache(config=config)
    with torch.no_grad():
        xt = torch.from_numpy(x)
        y_hf = torch.cat([hf(xt[:, :n], cache=cache)] + [hf(xt[:, t:t + 1], cache=cache) for t in range(n, n + k)], 1)
    conv_hf = cache.get_conv_state(0).transpose(1, 2)[:, 1:]  # transformers keeps W inputs, [B, C, W]
    # measured: steps vs full 1.2e-7 (outputs and state); vs transformers 1.2e-6 (outputs), 3.5e-7 (recurrent
    # state), 2.9e-7 (conv state: in_proj_qkv's matmul rounding)
    assert max_rel_err(y_steps, y_full) <= 5e-6
    assert max_rel_err(state.recurrent, state_full.recurrent) <= 5e-6
    assert max_rel_err(state.conv, state_full.conv) <= 1e-6  # conv inputs: in_proj_qkv's products, any shape
    assert max_rel_err(state.conv, model.in_proj_qkv(jnp.asarray(x))[:, -(W - 1):]) <= 1e-6
    assert max_rel_err(y_steps, y_hf) <= 1e-5
    assert max_rel_err(state.recurrent, cache.get_recurrent_state(0)) <= 5e-6
    assert max_rel_err(state.conv, conv_hf) <= 2e-6


@pytest.mark.parametrize("n_valid,T", [(13, 20), (2, 9), (0, 1)])
def test_padded_positions_leave_the_state_as_it_was(n_valid, T):
    """Row 1 padded at the end (n_valid < W - 1: its conv tail keeps entries of the previous state) gets the state
    of its unpadded run; row 0 is unaffected. From a random state, so that a padded step's decay would show."""
    _, hf = _hf_module(7)
    model = _jax_module(hf.state_dict())
    x, state0 = jnp.asarray(_x(8, 2, T)), _random_state(9, 2)
    valid = jnp.asarray(np.arange(T)[None, :] < np.array([[T], [n_valid]]))
    y, state = _apply(model, x, state=state0, valid=valid)
    y_all, state_all = _apply(model, x, state=state0)
    assert max_rel_err(y[0], y_all[0]) <= 1e-6 and max_rel_err(state.recurrent[0], state_all.recurrent[0]) <= 1e-6
    row1 = DeltaNetState(state0.conv[1:], state0.recurrent[1:])
    if n_valid:
        y_alone, alone = _apply(model, x[1:, :n_valid], state=row1)
        # measured 0 (outputs and state: the padded steps are exact identities); row 0 above 1.8e-8
        assert max_rel_err(y[1, :n_valid], y_alone[0]) <= 1e-6
        assert max_rel_err(state.recurrent[1], alone.recurrent[0]) <= 1e-6
        assert max_rel_err(state.conv[1], alone.conv[0]) <= 1e-6
    else:  # a row that is all padding keeps its state bit for bit
        assert np.array_equal(np.asarray(state.recurrent[1]), np.asarray(row1.recurrent[0]))
        assert np.array_equal(np.asarray(state.conv[1]), np.asarray(row1.conv[0]))
    # torch_ref takes the same state and mask
    ref = TorchGatedDeltaNet(CFG)
    ref.load_state_dict(hf.state_dict())
    as_torch = lambda a: torch.from_numpy(np.array(a))  # noqa: E731
    with torch.no_grad():
        y_ref, (conv_ref, recurrent_ref) = ref(as_torch(x), state=(as_torch(state0.conv), as_torch(state0.recurrent)),
                                               valid=as_torch(valid))
    # measured: outputs <= 8.7e-7, recurrent state <= 2.6e-7, conv state 0
    assert max_rel_err(y[0], y_ref[0]) <= 5e-6
    assert not n_valid or max_rel_err(y[1, :n_valid], y_ref[1, :n_valid]) <= 5e-6
    assert max_rel_err(state.recurrent, recurrent_ref) <= 5e-6 and max_rel_err(state.conv, conv_ref) <= 1e-6


def test_packed_documents_equal_separate_runs():
    """Row 0 packs documents of 17 and 22 tokens (a boundary inside a chunk, ids as a packer writes them); the conv
    must not reach across the boundary and the delta-rule state restarts there."""
    _, hf = _hf_module(10)
    model = _jax_module(hf.state_dict())
    x = jnp.asarray(_x(11, 1, 39))
    seg = jnp.asarray([[3] * 17 + [4] * 22])
    y = _apply(model, x, seg)  # the training path (no state)
    y_a, _ = _apply(model, x[:, :17], state=DeltaNetState.init(CFG, 1))
    y_b, state_b = _apply(model, x[:, 17:], state=DeltaNetState.init(CFG, 1))
    # measured 5.6e-8 (outputs), 0 (state after the second document); torch_ref's loop 8.1e-7
    assert max_rel_err(y, jnp.concatenate([y_a, y_b], axis=1)) <= 5e-6
    _, state = _apply(model, x, seg, state=DeltaNetState.init(CFG, 1))
    assert max_rel_err(state.recurrent, state_b.recurrent) <= 5e-6
    assert max_rel_err(state.conv, state_b.conv) <= 1e-6
    # torch_ref's token loop agrees on the packed row
    ref = TorchGatedDeltaNet(CFG)
    ref.load_state_dict(hf.state_dict())
    with torch.no_grad():
        y_ref = ref(torch.from_numpy(np.array(x)), torch.from_numpy(np.array(seg)))
    assert max_rel_err(y, y_ref) <= 5e-6


def test_bf16_compute_stays_near_float32():
    _, hf = _hf_module(12)
    model = _jax_module(hf.state_dict())
    x = jnp.asarray(_x(13, 2, 21)).astype(jnp.bfloat16)
    ref = np.asarray(_apply(model, x.astype(jnp.float32)))
    cfg16 = CFG.replace(compute_dtype="bfloat16")
    model16 = GatedDeltaNet(cfg16, rngs=nnx.Rngs(0))
    nnx.update(model16, nnx.state(model, nnx.Param))
    y = np.asarray(_apply(model16, x).astype(jnp.float32))
    # measured 5.8e-3 (7.7e-3 with init weights): bf16's rounding of six intermediates (projections, conv, the
    # rule's output, the gated norm), as transformers' bf16 module rounds them; the project's usual 1e-2 would leave
    # under 2x margin
    assert np.linalg.norm(y - ref) / np.linalg.norm(ref) <= 3e-2
    _, state = _apply(model16, x[:, :1], state=DeltaNetState.init(cfg16, 2))  # a decode step: the token scan
    assert state.conv.dtype == jnp.bfloat16 and state.recurrent.dtype == jnp.float32
