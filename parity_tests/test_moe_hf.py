"""Mixture-of-Experts families against transformers: MoE blocks, import, export and greedy generation.

Blocks: jaxformer's MoE with the weights of transformers' MixtralSparseMoeBlock / Qwen2MoeSparseMoeBlock /
Qwen3MoeSparseMoeBlock (fused `experts.gate_up_proj` mapped by jaxformer.interop.moe) on random inputs.
Models: a random-init transformers model per family (1-D weights moved off their init), saved with
save_pretrained (per-expert checkpoint names), loaded by load_hf, compared on a 320-token prompt; save_hf
writes it back and from_pretrained must give the same logits. Configs here are used by no other test.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flax import nnx  # noqa: E402

from jaxformer.config import ModelConfig  # noqa: E402
from jaxformer.interop import load_hf, save_hf  # noqa: E402
from jaxformer.interop.hf import config_from_hf  # noqa: E402
from jaxformer.interop.moe import FAMILIES  # noqa: E402
from jaxformer.interop.state_dict import from_state_dict  # noqa: E402
from jaxformer.models.moe import MoE  # noqa: E402
from parity_tests.conftest import assert_hf_close, jax_logits, jax_params, quiet_transformers  # noqa: E402

T = 320
COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.15, tie_word_embeddings=False,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)
CASES = {
    "mixtral": ("MixtralConfig", dict(num_local_experts=5, num_experts_per_tok=2, sliding_window=200,
                                      rope_parameters=dict(rope_type="default", rope_theta=1e6))),
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_experts=6, num_experts_per_tok=3, moe_intermediate_size=24,
                                         shared_expert_intermediate_size=36, norm_topk_prob=False,
                                         decoder_sparse_step=1, mlp_only_layers=[1])),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=20,
                                         norm_topk_prob=True, decoder_sparse_step=2, head_dim=16)),
}


def _hf_config(name: str):
    cls_name, extra = CASES[name]
    return getattr(transformers, cls_name)(**{**COMMON, **extra})


def _hf_model(name: str, seed: int = 0):
    quiet_transformers()
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(_hf_config(name), attn_implementation="eager").eval()
    with torch.no_grad():  # norms and biases away from their init values, routers with a real preference
        for n, p in model.named_parameters():
            if p.ndim == 1 or n.endswith("mlp.gate.weight"):
                p.add_(0.3 * torch.randn_like(p))
    return model


def _hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(tokens)).logits.float().numpy()


@pytest.mark.parametrize("name", sorted(CASES))
def test_moe_block_matches_transformers(name):
    """jaxformer's MoE layer == transformers' sparse MoE block (router style, shared expert and gate included)."""
    hf = _hf_model(name)
    sparse = next(i for i, layer in enumerate(hf.model.layers) if hasattr(layer.mlp, "experts"))
    block = hf.model.layers[sparse].mlp
    cfg = config_from_hf(_hf_config(name).to_dict())
    sd = {k.removeprefix(f"model.layers.{sparse}.mlp."): v.numpy() for k, v in hf.state_dict().items()
          if k.startswith(f"model.layers.{sparse}.mlp.")}
    # the fused in-memory names, mapped as the importer maps a checkpoint
    sd = {k.removeprefix("layers.0.mlp."): v for k, v in FAMILIES[name].from_hf(
        {f"model.layers.0.mlp.{k}": v for k, v in sd.items()}, cfg).items()}
    moe = nnx.eval_shape(lambda: MoE(cfg, rngs=nnx.Rngs(0)))
    params = jax_params(moe)
    assert set(params) == set(sd), (sorted(params), sorted(sd))
    for k, var in params.items():
        var.set_value(jnp.asarray(sd[k]))
    x = np.random.default_rng(1).standard_normal((2, 37, COMMON["hidden_size"])).astype(np.float32)
    with torch.no_grad():
        ref = block(torch.from_numpy(x)).numpy()
    graphdef, state = nnx.split(moe)
    y = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x))(state, jnp.asarray(x))
    assert_hf_close(np.asarray(y), ref, f"{name} block")


@pytest.mark.parametrize("name", sorted(CASES))
def test_import_and_export_match_transformers(name, tmp_path):
    hf_model = _hf_model(name)
    hf_model.save_pretrained(tmp_path / "hf")
    model = load_hf(tmp_path / "hf")
    n_experts = getattr(hf_model.config, "num_local_experts", None) or hf_model.config.num_experts
    assert model.config.family == name and model.config.moe.n_experts == n_experts
    tokens = np.random.default_rng(2).integers(3, COMMON["vocab_size"], (2, T)).astype(np.int64)
    ref = _hf_logits(hf_model, tokens)
    ours = jax_logits(model, tokens.astype(np.int32))
    assert np.abs(ref).max() > 1.0, "logits too small to prove anything"
    assert_hf_close(ours, ref, f"{name} import")
    save_hf(model, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    assert type(back).__name__ == type(hf_model).__name__
    assert_hf_close(ours, _hf_logits(back, tokens), f"{name} export")
    # the fused in-memory state dict (what a transformers 5 model holds) imports the same
    fused = FAMILIES[name].from_hf({k: v.numpy() for k, v in hf_model.state_dict().items()}, model.config)
    again = from_state_dict(model.config, fused)
    assert np.array_equal(jax_logits(again, tokens.astype(np.int32)), ours)


def test_greedy_generation_matches_transformers(tmp_path):
    """Greedy decoding through jaxformer's KV-cache engine is token-identical to transformers' generate."""
    from jaxformer.infer import Engine, SamplingParams, generate

    new = 16
    hf_model = _hf_model("qwen2_moe", seed=3)
    hf_model.generation_config.eos_token_id = None  # exactly `new` tokens
    hf_model.save_pretrained(tmp_path / "hf")
    prompt = np.random.default_rng(4).integers(3, COMMON["vocab_size"], (1, 12))
    with torch.no_grad():
        ref = hf_model.generate(torch.from_numpy(prompt), do_sample=False, max_new_tokens=new, pad_token_id=0,
                                output_logits=True, return_dict_in_generate=True)
    hf_new = ref.sequences[0, 12:].numpy()
    top2 = np.sort(torch.stack(ref.logits, 1)[0].float().numpy(), -1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0]).min() > 1e-3, "near-tie in the reference: pick another seed"
    assert len(set(hf_new.tolist())) > 3, "degenerate continuation: the test would be weak"
    engine = Engine(load_hf(tmp_path / "hf"), max_batch=2, max_len=12 + new + 4)
    (seq, _) = generate(engine, [prompt[0].tolist(), prompt[0, :7].tolist()],
                        SamplingParams(max_new_tokens=new, temperature=0.0))
    np.testing.assert_array_equal(np.asarray(seq.tokens), hf_new)


def test_moe_config_readback_and_refusals():
    """Export configs read back field by field; options without a jaxformer equivalent are named."""
    from jaxformer.interop import config_to_hf
    from jaxformer.interop.state_dict import UnsupportedCheckpointError

    for name in CASES:
        cfg = config_from_hf(_hf_config(name).to_dict())
        assert config_from_hf(config_to_hf(cfg)).architecture() == cfg.architecture()
    with pytest.raises(UnsupportedCheckpointError, match="router_jitter_noise=0.1"):
        config_from_hf({**_hf_config("mixtral").to_dict(), "router_jitter_noise": 0.1})
    with pytest.raises(UnsupportedCheckpointError, match="use_sliding_window=True"):
        config_from_hf({**_hf_config("qwen3_moe").to_dict(), "use_sliding_window": True})
    # a qwen-router model cannot be written as Mixtral (its router always renormalises): the field is named
    cfg = ModelConfig.llama(n_experts=4, router="qwen", norm_topk_prob=False, export_as="mixtral")
    with pytest.raises(UnsupportedCheckpointError, match="router='qwen'"):
        config_to_hf(cfg)
