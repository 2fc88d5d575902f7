"""ModelConfig validation, preset loading with dotted overrides, and preset parameter counts."""

from __future__ import annotations

import dataclasses
import json

import pytest
from flax import nnx

import jaxformer
from jaxformer.config import (ACTIVATIONS, ATTENTION_IMPLS, CONFIG_DIR, DTYPES, EXECUTION_FIELDS, NORMS, POSITIONS,
                              SUBCONFIGS,
                              DataConfig, EncDecConfig, ModelConfig, TrainConfig, load_config, load_model_config,
                              parse_overrides)

PRESETS = ["tiny", "gpt2-124m", "llama-tiny", "llama3-8b"]  # required; any other preset on disk is loaded too
ALL_PRESETS = sorted({*PRESETS, *(p.stem for p in CONFIG_DIR.glob("*.yaml"))})
FIELDS = [f.name for f in dataclasses.fields(ModelConfig)]


# ----------------------------------------------------------------------------- validation

def test_heads_must_divide_width():
    with pytest.raises(ValueError, match=r"n_heads=5.*d_model=64"):
        ModelConfig(d_model=64, n_heads=5)


def test_explicit_head_dim_lifts_the_divisibility_rule():
    cfg = ModelConfig(d_model=60, n_heads=4, head_dim=16)
    assert cfg.head_dim == 16 and cfg.n_kv_heads == 4


def test_kv_heads_must_divide_heads():
    with pytest.raises(ValueError, match=r"n_kv_heads=3.*n_heads=4"):
        ModelConfig(d_model=64, n_heads=4, n_kv_heads=3)


def test_odd_head_dim_rejected_with_rope_only():
    with pytest.raises(ValueError, match=r"rope.*head_dim=7"):
        ModelConfig(d_model=28, n_heads=4, position="rope")
    assert ModelConfig(d_model=28, n_heads=4, position="learned").head_dim == 7


@pytest.mark.parametrize("field, choices", [("position", POSITIONS), ("norm", NORMS), ("activation", ACTIVATIONS),
                                            ("attention_impl", ATTENTION_IMPLS), ("param_dtype", DTYPES),
                                            ("compute_dtype", DTYPES)])
def test_bad_choice_lists_valid_ones(field, choices):
    with pytest.raises(ValueError) as e:
        ModelConfig(**{field: "bogus"})
    msg = str(e.value)
    assert field in msg and "bogus" in msg
    assert all(c in msg for c in choices)


@pytest.mark.parametrize("field", ["vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff",
                                   "max_seq_len"])
@pytest.mark.parametrize("value", [0, -4, 2.5, True])
def test_sizes_must_be_positive_integers(field, value):
    with pytest.raises(ValueError, match=rf"{field} must be a positive integer"):
        ModelConfig(**{field: value})


@pytest.mark.parametrize("kw, pattern", [
    (dict(rope_theta=0.0), r"rope\.theta"), (dict(rope_theta=-1.0), r"rope\.theta"),
    (dict(norm_eps=0.0), "norm_eps"), (dict(norm_eps=1.5), "norm_eps"), (dict(init_std=0.0), "init_std"),
    # wrong types: a clear ValueError, not a TypeError from a comparison deep inside
    (dict(norm_eps="abc"), "norm_eps"), (dict(rope_theta="x"), r"rope\.theta"), (dict(init_std=None), "init_std"),
    (dict(gated_mlp="yes"), "gated_mlp"), (dict(tie_embeddings=1), "tie_embeddings"),
    (dict(use_bias=None), "use_bias"),
])
def test_bad_scalars_rejected(kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        ModelConfig(**kw)


@pytest.mark.parametrize("make", [lambda u: TrainConfig(run_dir=u), lambda u: DataConfig(data_dir=u),
                                  lambda u: DataConfig(sources=(u,))], ids=["run_dir", "data_dir", "sources"])
def test_remote_urls_are_refused_with_what_to_do(make):
    with pytest.raises(ValueError, match=r"is a URL; .* Mount the bucket"):
        make("gs://bucket/runs/llama")
    make("/mnt/bucket/runs/llama")  # a mounted bucket is a path


def test_architecture_leaves_out_how_it_runs():
    cfg = ModelConfig.llama(remat="full", scan_layers=True, attention_impl="pallas", compute_dtype="bfloat16")
    assert cfg.architecture() == ModelConfig.llama().architecture()
    nested = {k for k, v in cfg.architecture().items() if "." in k}  # sub-config fields by dotted name
    assert set(cfg.to_dict()) - set(cfg.architecture()) == set(EXECUTION_FIELDS) | set(SUBCONFIGS)
    assert {k.split(".")[0] for k in nested} == set(SUBCONFIGS) and "moe.n_experts" in nested
    assert cfg.architecture() != ModelConfig.llama(d_ff=512).architecture()


def test_defaults_resolve():
    cfg = ModelConfig(d_model=96, n_heads=6)
    assert cfg.n_kv_heads == 6 and cfg.head_dim == 16
    gqa = ModelConfig(d_model=96, n_heads=6, n_kv_heads=2)
    assert gqa.n_kv_heads == 2 and gqa.head_dim == 16


def test_frozen():
    cfg = ModelConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.d_model = 128
    assert cfg.replace(d_model=128).d_model == 128 and cfg.d_model == 64


def test_replace_revalidates():
    with pytest.raises(ValueError, match="n_heads=3"):
        ModelConfig().replace(n_heads=3, head_dim=None)


@pytest.mark.parametrize("cfg", [ModelConfig(), ModelConfig.gpt2(d_model=48, n_heads=3),
                                 ModelConfig.llama(n_kv_heads=1, rope_theta=5e5, param_dtype="bfloat16")])
def test_dict_round_trip(cfg):
    d = cfg.to_dict()
    assert set(d) == set(FIELDS)
    assert ModelConfig.from_dict(d) == cfg
    assert ModelConfig.from_dict(json.loads(json.dumps(d))) == cfg  # survives JSON (what checkpoints store)


def test_from_dict_rejects_unknown_keys_listing_valid_ones():
    with pytest.raises(ValueError) as e:
        ModelConfig.from_dict({"d_model": 64, "n_layer": 2})
    msg = str(e.value)
    assert "n_layer" in msg
    assert all(f in msg for f in FIELDS)


def test_family():
    assert ModelConfig.gpt2().family == "gpt2"
    assert ModelConfig.llama().family == "llama"
    assert ModelConfig(position="sinusoidal").family is None


# ----------------------------------------------------------------------------- presets and overrides

@pytest.mark.parametrize("name", ALL_PRESETS)
def test_every_preset_loads(name):
    assert (CONFIG_DIR / f"{name}.yaml").exists()
    if name.startswith("finetune"):  # fine-tuning presets: sft / lora / train / mesh sections, no model
        from jaxformer.finetune.config import load_finetune_config

        assert {"sft", "lora", "train"} <= set(load_finetune_config(name))
        return
    cfg = load_model_config(name)
    assert isinstance(cfg, EncDecConfig if name.startswith("seq2seq") else ModelConfig)
    assert load_config(name)["model"] == cfg


def test_preset_values():
    gpt2 = load_model_config("gpt2-124m")
    assert gpt2.family == "gpt2" and gpt2.tie_embeddings and gpt2.max_seq_len == 1024
    llama = load_model_config("llama3-8b")
    assert llama.family == "llama" and (llama.n_heads, llama.n_kv_heads, llama.head_dim) == (32, 8, 128)
    assert llama.rope.theta == 500000.0 and llama.param_dtype == "bfloat16"


@pytest.mark.parametrize("overrides", [["--model.n_layers=4"], ["--model.n_layers", "4"]])
def test_override_forms(overrides):
    assert load_model_config("tiny", overrides).n_layers == 4
    assert load_model_config("tiny").n_layers == 2


def test_override_mapping_form():
    assert load_model_config("tiny", {"model.d_ff": 128}).d_ff == 128


def test_nested_overrides_reach_sub_configs(tmp_path):
    cfg = load_model_config("mixtral-8x7b", ["--model.moe.n_experts=4", "--model.attention.sliding_window=64",
                                             "--model.rope.scaling.rope_type=linear", "--model.rope.scaling.factor=4"])
    assert (cfg.moe.n_experts, cfg.moe.n_experts_per_token, cfg.moe.aux_loss_coef) == (4, 2, 0.02)  # rest kept
    assert cfg.attention.sliding_window == 64 and cfg.rope.scaling.factor == 4.0 and cfg.rope.theta == 1e6
    # the flat names of earlier versions reach the same fields, over a preset written nested
    assert load_model_config("mixtral-8x7b", ["--model.n_experts=4"]).moe == cfg.moe
    with pytest.raises(ValueError, match=r"unknown key 'n_expert' in 'model.moe.n_expert'.*n_experts_per_token"):
        load_model_config("mixtral-8x7b", ["--model.moe.n_expert=4"])
    with pytest.raises(ValueError, match="has no fields of its own"):
        load_model_config("tiny", ["--model.d_model.x=4"])


def test_configs_written_flat_by_earlier_versions_still_load():
    """Run directories and exported models store model sections as earlier versions wrote them: flat."""
    flat = {"vocab_size": 97, "d_model": 32, "n_layers": 4, "n_heads": 4, "rope_theta": 5e5, "qk_norm": "head",
            "sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"] * 2, "n_experts": 4,
            "moe_d_ff": 48, "shared_expert_d_ff": 16, "shared_expert_gate": True, "router": "qwen",
            "router_aux_loss_coef": 0.01, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}
    cfg = ModelConfig.from_dict(flat)
    assert cfg == ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))  # and the nested form it writes now
    assert (cfg.rope.theta, cfg.rope.scaling.factor, cfg.attention.qk_norm, cfg.attention.sliding_window) == \
        (5e5, 2.0, "head", 8)
    assert (cfg.moe.d_ff, cfg.moe.shared_d_ff, cfg.moe.shared_gate, cfg.moe.aux_loss_coef) == (48, 16, True, 0.01)
    assert cfg.to_dict()["moe"]["n_experts"] == 4 and "n_experts" not in cfg.to_dict()


def test_typed_override_parsing():
    args = ["--model.norm_eps=1e-5", "--model.rope_theta", "5e5", "--model.init_std=0.01",
            "--model.tie_embeddings=true", "--model.use_bias", "False", "--model.n_kv_heads=null",
            "--model.d_model", "128", "--model.position=learned"]
    parsed = parse_overrides(args)
    assert parsed == {"model.norm_eps": 1e-5, "model.rope_theta": 5e5, "model.init_std": 0.01,
                      "model.tie_embeddings": True, "model.use_bias": False, "model.n_kv_heads": None,
                      "model.d_model": 128, "model.position": "learned"}
    assert type(parsed["model.d_model"]) is int and type(parsed["model.norm_eps"]) is float
    cfg = load_model_config("tiny", args)
    assert cfg.norm_eps == 1e-5 and cfg.rope.theta == 5e5 and cfg.tie_embeddings is True
    assert cfg.n_kv_heads == cfg.n_heads == 4  # null -> default -> n_heads
    assert cfg.d_model == 128 and cfg.head_dim == 32 and cfg.position == "learned"


def test_override_unknown_key_lists_valid_keys():
    with pytest.raises(ValueError) as e:
        load_model_config("tiny", ["--model.n_layer=4"])
    msg = str(e.value)
    assert "n_layer" in msg and all(f in msg for f in FIELDS)


def test_override_unknown_section():
    with pytest.raises(ValueError, match=r"unknown config section 'optim'.*model"):
        load_model_config("tiny", ["--optim.lr=1e-3"])


@pytest.mark.parametrize("args", [["model.n_layers=4"], ["--n_layers=4"], ["-model.n_layers=4"],
                                  ["--model.n_layers"], ["4"]])
def test_bad_override_syntax(args):
    with pytest.raises(ValueError, match="override"):
        load_model_config("tiny", args)


def test_override_value_validated():
    with pytest.raises(ValueError, match="n_layers must be a positive integer"):
        load_model_config("tiny", ["--model.n_layers=0"])
    with pytest.raises(ValueError, match="norm_eps"):
        load_model_config("tiny", ["--model.norm_eps=abc"])


def test_load_config_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("model:\n  d_model: 32\n  n_heads: 2\n  n_layers: 1\n  norm_eps: 1.0e-6\n")
    cfg = load_model_config(str(path), ["--model.n_layers=3"])
    assert (cfg.d_model, cfg.n_heads, cfg.n_layers, cfg.norm_eps) == (32, 2, 3, 1e-6)
    assert cfg.vocab_size == ModelConfig().vocab_size  # unspecified fields keep their defaults
    js = tmp_path / "mine.json"
    js.write_text(json.dumps({"model": {"d_model": 48, "n_heads": 3, "position": "learned"}}))
    assert load_model_config(js).head_dim == 16


def test_load_config_file_with_empty_section(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("model:\n")
    assert load_model_config(path) == ModelConfig()


@pytest.mark.parametrize("text, pattern", [
    ("model:\n  n_layer: 2\n", "n_layer"),
    ("model:\n  d_model: 64\noptimizer:\n  lr: 0.1\n", r"unknown section.*optimizer"),
    ("- model\n", "expected sections"),
    ("model: 3\n", "expected sections"),
])
def test_bad_config_file(tmp_path, text, pattern):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=pattern):
        load_model_config(path)


def test_unknown_preset_lists_presets():
    with pytest.raises(FileNotFoundError) as e:
        load_model_config("gpt5-huge")
    msg = str(e.value)
    assert "gpt5-huge" in msg and all(p in msg for p in PRESETS)


# ----------------------------------------------------------------------------- parameter counts

def _count(cfg: ModelConfig) -> int:
    return jaxformer.count_params(nnx.eval_shape(lambda: jaxformer.DecoderLM(cfg, rngs=nnx.Rngs(0))))


def test_gpt2_124m_param_count():
    V, D, L, F, P = 50257, 768, 12, 3072, 1024
    layer = (2 * D          # ln_1 weight, bias
             + 4 * (D * D + D)  # q, k, v, o projections with biases
             + 2 * D        # ln_2
             + D * F + F    # up (c_fc)
             + F * D + D)   # down (c_proj)
    expected = V * D + P * D + L * layer + 2 * D  # wte (tied lm_head), wpe, blocks, ln_f
    assert expected == 124_439_808
    assert _count(load_model_config("gpt2-124m")) == expected


def test_llama3_8b_param_count():
    V, D, L, N, K, H, F = 128256, 4096, 32, 32, 8, 128, 14336
    layer = D * N * H + 2 * D * K * H + N * H * D + 3 * D * F + 2 * D  # q, k, v, o, gate/up/down, 2 norms
    expected = 2 * V * D + L * layer + D  # embed + untied lm_head, blocks, final norm
    assert expected == 8_030_261_248
    assert _count(load_model_config("llama3-8b")) == expected


@pytest.mark.parametrize("name, tied", [("tiny", False), ("llama-tiny", True)])
def test_small_llama_presets_param_count(name, tied):
    c = load_model_config(name)
    V, D, L, N, K, H, F = c.vocab_size, c.d_model, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.d_ff
    assert c.tie_embeddings == tied
    layer = D * N * H + 2 * D * K * H + N * H * D + 3 * D * F + 2 * D
    assert _count(c) == (1 if tied else 2) * V * D + L * layer + D



GEMMA4 = dict(block="gemma4", norm_placement="sandwich", n_layers=4, layer_types=["sliding_attention", "full_attention"] * 2,
              attention=dict(qk_norm="head", sliding_window=4, global_head_dim=32, global_kv_heads=1, k_eq_v=True))


def test_gemma4_fields_per_layer():
    """Full layers take the global head sizes; the last kv_shared_layers read the last earlier layer of their type."""
    cfg = ModelConfig.llama(**GEMMA4, kv_shared_layers=2, double_wide_shared_mlp=True)
    assert [cfg.layer_head_dim(i) for i in range(4)] == [16, 32, 16, 32]
    assert [cfg.layer_kv_heads(i) for i in range(4)] == [4, 1, 4, 1]
    assert [cfg.kv_source(i) for i in range(4)] == [0, 1, 0, 1]
    assert [cfg.layer_d_ff(i) for i in range(4)] == [256, 256, 512, 512]
    assert cfg.n_cache_layers == 2
    assert cfg.kv_bytes_per_token(4) == 2 * 4 * (4 * 16 + 1 * 32)


@pytest.mark.parametrize("changes,pattern", [
    (dict(block="standard"), r"\['attention.global_head_dim', 'attention.global_kv_heads', 'attention.k_eq_v'\] are "
                             "Gemma 4 / Gemma 3n block settings but block='standard'"),
    (dict(laurel_rank=4), r"\['laurel_rank'\] are Gemma 3n block settings but block='gemma4'"),
    (dict(kv_shared_layers=3), r"kv-shared layers of type \['full_attention'\] have no earlier layer"),
    (dict(kv_shared_layers=4), "must leave at least one"),
    (dict(scan_layers=True), "set scan_layers=false"),
    (dict(norm_placement="pre"), "sandwich"),
    (dict(moe=dict(n_experts=4, router="qwen")), "router='gemma4'"),
    (dict(per_layer_dim=-1), "per_layer_dim must be an integer >= 0"),
])
def test_gemma4_bad_fields_are_named(changes, pattern):
    with pytest.raises(ValueError, match=pattern):
        ModelConfig.llama(**{**GEMMA4, **changes})


def test_chunked_attention_fields():
    """Llama 4's chunked layers need a chunk; a chunk without chunked layers is dropped (one spelling)."""
    cfg = ModelConfig.llama(n_layers=2, layer_types=("chunked_attention", "full_attention"),
                            attention=dict(chunk_size=8, qk_norm="rms"))
    assert [cfg.layer_chunk(i) for i in range(2)] == [8, None]
    assert ModelConfig.llama(attention=dict(chunk_size=8)).attention.chunk_size is None
    with pytest.raises(ValueError, match="chunked_attention layers but attention.chunk_size is not set"):
        ModelConfig.llama(n_layers=2, layer_types=("chunked_attention", "full_attention"))
    with pytest.raises(ValueError, match="attention.temperature_floor must be > 0"):
        ModelConfig.llama(attention=dict(temperature_floor=0.0))


HYBRID = dict(n_layers=3, layer_types=("linear_attention", "conv", "full_attention"),
              linear=dict(key_heads=2, value_heads=4, key_head_dim=8, value_head_dim=8), conv=dict(kernel=3))


@pytest.mark.parametrize("change,pattern", [
    (dict(linear={}), r"linear_attention layers but linear.key_heads=0"),
    (dict(conv={}), r"conv layers but conv.kernel=0"),
    (dict(layer_types=("linear_attention", "full_attention", "full_attention"), conv=dict(kernel=3)),
     r"conv.kernel=3 but no layer is of type 'conv'"),
    (dict(layer_types=("linear_attention", "conv", "conv")), r"no attention layer"),
    (dict(linear=dict(key_heads=3, value_heads=4, key_head_dim=8, value_head_dim=8)), r"key_heads=3 must divide"),
    (dict(linear=dict(key_heads=2, value_heads=4, key_head_dim=8)), r"all > 0"),
])
def test_hybrid_layers_need_their_settings_and_only_then(change, pattern):
    """linear_attention / conv layer types and their sub-configs come together; a hybrid keeps an attention layer."""
    ModelConfig.llama(**HYBRID)
    with pytest.raises(ValueError, match=pattern):
        ModelConfig.llama(**{**HYBRID, **change})


def test_hybrid_layer_types_have_no_rope():
    cfg = ModelConfig.llama(**HYBRID)
    assert [cfg.layer_rope(i) for i in range(3)] == [None, None, "full_attention"]
