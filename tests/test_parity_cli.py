"""`jaxformer parity`: checkpoints on disk, run in-process through the CLI's main (exit status and --json).

Each model is tiny (2 layers, width 32) with seeded random weights (norm scales and biases moved off their init),
so a case takes a couple of seconds: most of it is compiling the jaxformer side once per input shape.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from flax import nnx

import jaxformer
from jaxformer import cli
from jaxformer.config import EncDecConfig, ModelConfig
from jaxformer.interop import from_state_dict, to_numpy_state_dict
from jaxformer.parity.compare import BFLOAT16, FLOAT32
from parity_tests.conftest import GRAD_REL_TOL, OUT_REL_TOL, random_jax_module

torch.set_num_threads(1)  # two pytest workers on two cores: torch's eager ops would oversubscribe them

SMALL = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=48, max_seq_len=32)
CONFIGS = {
    "gpt2": ModelConfig.gpt2(**SMALL),
    "qwen3": ModelConfig.llama(**SMALL, n_kv_heads=2, qk_norm="head", rope_theta=1e6, tie_embeddings=True,
                               export_as="qwen3"),
    "marian": EncDecConfig(**SMALL, n_encoder_layers=2, logits_bias=True),
}
PERTURBED = {"gpt2": "layers.1.mlp.down_proj.weight", "qwen3": "layers.1.self_attn.v_proj.weight",
             "marian": "encoder.layers.1.self_attn.o_proj.weight"}
FAST = ["--tokens", "12", "--greedy", "4"]
DOC = Path(__file__).resolve().parent.parent / "docs" / "parity.md"


def random_model(cfg: ModelConfig, seed: int):
    return random_jax_module(lambda: jaxformer.models.model_class(cfg)(cfg, rngs=nnx.Rngs(0)), seed)


def parity(*argv) -> tuple[int, dict | None]:
    """(exit status, the --json record) of `jaxformer parity ARGV`."""
    out = next((argv[i + 1] for i, a in enumerate(argv) if a == "--json"), None)
    try:
        cli.main(["parity", *map(str, argv)])
        status = 0
    except SystemExit as e:
        status = e.code
    return status, json.loads(open(out).read()) if out and status != 2 else None


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (jaxformer directory, Hugging Face export of the same weights)."""
    root = tmp_path_factory.mktemp("parity")
    out = {}
    for name, cfg in CONFIGS.items():
        model = random_model(cfg, seed=1)
        out[name] = (jaxformer.save(model, root / f"{name}-jax"), jaxformer.save_hf(model, root / f"{name}-hf"))
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_perturbed_layer_is_located(name, saved, tmp_path):
    """One weight matrix of layer 1 scaled by 1.5: first_divergent names layer 1 (exit 1); unperturbed: exit 0."""
    jax_dir, hf_dir = saved[name]
    status, rec = parity(jax_dir, "--against", hf_dir, *FAST, "--json", tmp_path / "same.json")
    assert status == 0 and rec["ok"] and rec["first_divergent"] is None
    stacks = ["embed_source_tokens", "encoder.layers.0", "encoder.layers.1", "embed_tokens", "decoder.layers.0",
              "decoder.layers.1"] if name == "marian" else ["embed_tokens", "layers.0", "layers.1", "norm"]
    assert [r["name"] for r in rec["layers"]] == stacks + ["lm_head"]
    assert rec["greedy_match"] == rec["greedy_tokens"] == 4 and rec["top1_agreement"] == 1.0

    model = jaxformer.load(jax_dir)
    weights = to_numpy_state_dict(model)
    weights[PERTURBED[name]] = weights[PERTURBED[name]] * 1.5
    perturbed = jaxformer.save(from_state_dict(model.config, weights), tmp_path / "perturbed")
    status, rec = parity(perturbed, "--against", hf_dir, "--tokens", "12", "--greedy", "0",
                         "--json", tmp_path / "perturbed.json")
    layer1 = "encoder.layers.1" if name == "marian" else "layers.1"
    assert status == 1 and not rec["ok"] and rec["first_divergent"] == layer1
    rows = {r["name"]: r for r in rec["layers"]}
    before = "encoder.layers.0" if name == "marian" else "layers.0"
    assert rows[before]["rel"] < 1e-5 < 1e-2 < rows[layer1]["rel"]
    assert rec["logits_max_abs"] > 1e-3 and rec["kl_max"] > 0


def test_against_hf_passes_and_another_model_fails(saved, tmp_path):
    """A Hugging Face directory against its own transformers model agrees; against another model's it does not."""
    _, hf_dir = saved["qwen3"]
    status, rec = parity(hf_dir, "--against", "hf", *FAST, "--json", tmp_path / "hf.json")
    assert status == 0 and rec["ok"] and rec["logits_max_abs"] <= 1e-4 and rec["kl_max"] < 1e-9
    other = jaxformer.save_hf(random_model(CONFIGS["qwen3"], seed=2), tmp_path / "other")
    status, rec = parity(hf_dir, "--against", other, *FAST, "--json", tmp_path / "other.json")
    assert status == 1 and rec["first_divergent"] == "embed_tokens"
    assert rec["top1_agreement"] < 0.5 and rec["kl_mean"] > 0.1


def test_bf16_report_is_finite_within_its_tolerance(saved, tmp_path):
    """bf16 drifts (nonzero differences) but stays within the documented bf16 tolerance; every number is finite."""
    jax_dir, _ = saved["qwen3"]
    status, rec = parity(jax_dir, "--dtype", "bfloat16", "--tokens", "12", "--greedy", "0",
                         "--json", tmp_path / "bf16.json")
    assert status == 0 and rec["ok"]
    numbers = [rec[k] for k in ("logits_max_abs", "kl_mean", "kl_max", "top1_agreement")]
    numbers += [r[k] for r in rec["layers"] for k in ("max_abs", "rel", "cosine")]
    assert all(math.isfinite(x) for x in numbers)
    assert all(r["max_abs"] > 1e-4 for r in rec["layers"]), "bf16 left no trace: did it run in bf16?"
    assert BFLOAT16.norm_rtol == 5e-2 and "5e-2" in DOC.read_text()  # the tolerance docs/parity.md gives


def test_grads_match_the_parity_tests_bounds(saved, tmp_path):
    """--grads: every parameter's gradient within parity_tests' 1e-4 relative error of torch_ref's."""
    jax_dir, _ = saved["qwen3"]
    status, rec = parity(jax_dir, "--grads", "--greedy", "0", "--tokens", "12", "--json", tmp_path / "g.json")
    assert status == 0 and rec["ok"] and FLOAT32.grad_rtol == GRAD_REL_TOL and FLOAT32.rtol == OUT_REL_TOL
    model = jaxformer.load(jax_dir)
    assert {r["name"] for r in rec["grads"]} == set(to_numpy_state_dict(model))
    assert max(r["rel"] for r in rec["grads"]) <= GRAD_REL_TOL


def test_pallas_kernels_checked_in_interpret_mode(saved, tmp_path):
    """--attention-impl pallas runs the flash-attention kernel (interpreted on CPU) against torch_ref."""
    jax_dir, _ = saved["qwen3"]
    status, rec = parity(jax_dir, "--attention-impl", "pallas", "--tokens", "12", "--batch", "1", "--greedy", "0",
                         "--json", tmp_path / "pallas.json")
    assert status == 0 and rec["ok"] and rec["logits_max_abs"] < 1e-4


def test_usage_errors_exit_2(saved, tmp_path, capsys):
    """Unreadable SOURCE, a family the other side cannot run, models of different shapes: exit 2 and a message."""
    assert parity(tmp_path / "missing")[0] == 2
    assert "does not exist" in capsys.readouterr().err
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    jax_dir, _ = saved["qwen3"]
    assert parity(jax_dir, "--against", bert)[0] == 2
    assert "'bert'" in capsys.readouterr().err
    sinusoidal = ModelConfig.llama(**SMALL, position="sinusoidal")  # no Hugging Face family has it
    assert parity(jaxformer.save(random_model(sinusoidal, 3), tmp_path / "sin"), "--against", "hf")[0] == 2
    assert "no Hugging Face architecture" in capsys.readouterr().err
    wider = jaxformer.save_hf(random_model(CONFIGS["qwen3"].replace(d_model=48), 4), tmp_path / "wider")
    assert parity(jax_dir, "--against", wider)[0] == 2
    assert "different shapes" in capsys.readouterr().err
