"""Each family added for issues 28 and 26 through the user-facing commands, from a Hugging Face directory on disk.

For every family a tiny random-init transformers model (its distinctive options on, 1-D weights moved off their
init) is saved with a tokenizer, then: `jaxformer parity --against hf` (jaxformer vs transformers, logits and
greedy tokens), `jaxformer generate` (the paged engine, greedy, the tokens the uncached forward picks),
`jaxformer convert` to jaxformer's format and back to Hugging Face (every tensor bit-equal to the original),
LoRA (adapters on the attention and MLP projections, logits unchanged at init) and, for three of them, `serve`
(one OpenAI completion). The numerics of each family are proven in parity_tests/; this file
proves the commands carry them.
"""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import torch
from flax import nnx

from jaxformer.data.tokenizer import Tokenizer
from jaxformer.finetune.lora import LoRAConfig, apply_lora, lora_modules
from jaxformer.interop import load_hf
from parity_tests.conftest import jax_logits
from parity_tests.test_generate import greedy_jax
from parity_tests.test_hf_families import CASES as HF_CASES
from tests.test_cli import main_in_process

transformers = pytest.importorskip("transformers")

FAMILIES = ["olmo3", "smollm3", "exaone4", "arcee", "helium", "ernie4_5", "seed_oss", "starcoder2", "glm4", "granite",
            "hunyuan_v1_dense", "cohere2", "apertus", "gpt_oss", "glm4_moe", "gemma4", "gemma4_moe", "gemma3n", "minimax_m2", "llama4", "deepseek_v3",
            "qwen3_5_text", "lfm2"]  # qwen3_next: test_hf_families, test_generate_families (its fused import, experts)
PROMPT = "def add(a, b):"


@pytest.fixture(scope="module")
def hf_dirs(tokenizer, tmp_path_factory):
    """family -> a saved random-init transformers model (vocabulary = the test tokenizer's) with tokenizer.json."""
    root = tmp_path_factory.mktemp("families")
    small = dict(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.3,
                 tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    out = {}
    for name in FAMILIES:
        cls_name, extra = HF_CASES[name]
        extra = {k: v for k, v in extra.items() if k not in ("head_dim", "layer_types", "no_rope_layers")}
        if name == "smollm3":
            extra.update(no_rope_layers=[1, 0], layer_types=["full_attention", "sliding_attention"])
        if name in ("olmo3", "cohere2"):
            extra.update(layer_types=["sliding_attention", "full_attention"])
        if name in ("qwen3_5_text", "lfm2"):  # hybrids: a state layer, then an attention layer
            mixer = "conv" if name == "lfm2" else "linear_attention"
            extra.update(layer_types=[mixer, "full_attention"] * (extra.get("num_hidden_layers", 2) // 2))
        if name.startswith(("gemma4", "gemma3n")):  # kv-shared layers need an earlier layer of each type
            extra.update(layer_types=["sliding_attention", "full_attention"] * (extra.get("num_hidden_layers", 2) // 2),
                         vocab_size_per_layer_input=tokenizer.vocab_size)
        cfg = getattr(transformers, cls_name)(**{**small, "head_dim": 8, **extra})
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim == 1:
                    p.add_(0.3 * torch.randn_like(p))
            for n, b in model.named_buffers():  # Gemma 4's layer scalars are buffers
                if n.endswith("layer_scalar"):
                    b.add_(0.3 * torch.randn_like(b))
        model.generation_config.eos_token_id = None
        model.save_pretrained(root / name)
        tokenizer.save(root / name)
        out[name] = root / name
    return out


@pytest.mark.parametrize("name", FAMILIES)
def test_family_through_the_commands(name, hf_dirs, tokenizer, tmp_path, capsys):
    hf_dir = hf_dirs[name]

    # parity: jaxformer against transformers on the same directory (exit 0: within tolerance, greedy tokens equal)
    report = tmp_path / "parity.json"
    code, _, err = main_in_process(capsys, "parity", hf_dir, "--against", "hf", "--tokens", "24", "--greedy", "4",
                                   "--json", report)
    assert code == 0, err
    assert json.loads(report.read_text())["ok"] is True

    # generate: greedy through the paged engine equals the argmax of the uncached forward, token by token
    model = load_hf(hf_dir)
    tok = Tokenizer(tokenizer.tok)
    code, out, err = main_in_process(capsys, "generate", "--ckpt", hf_dir, "--prompt", PROMPT, "--max-new-tokens", "5",
                                     "--temperature", "0")
    assert code == 0, err
    prompt = tok.encode(PROMPT)
    tokens, _ = greedy_jax(model, np.asarray([prompt], np.int32), 5)  # [1, P + 5]
    assert tok.decode(tokens[0, len(prompt):].tolist()) in out

    # convert: Hugging Face -> jaxformer -> Hugging Face gives back every tensor bit for bit
    code, _, err = main_in_process(capsys, "convert", "--to", "jaxformer", hf_dir, tmp_path / "jf")
    assert code == 0, err
    code, _, err = main_in_process(capsys, "convert", "--to", "hf", tmp_path / "jf", tmp_path / "hf2")
    assert code == 0, err
    sd0 = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).state_dict()
    sd1 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf2").state_dict()
    assert sorted(sd0) == sorted(sd1) and all(torch.equal(sd0[k], sd1[k]) for k in sd0)

    # LoRA: adapters on the family's projections leave the logits alone at init
    before = jax_logits(model, tokens)
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0), rngs=nnx.Rngs(1))
    targets = {n.split(".")[-1] for n, _ in lora_modules(model)}
    dense_mlp = not model.config.moe.n_experts  # routed experts take no adapters; attention (and dense MLPs) do
    attention = {"q_b_proj", "kv_b_proj", "o_proj"} if model.config.latent.kv_rank else {"q_proj", "v_proj"}
    assert attention | ({"down_proj"} if dense_mlp else set()) <= targets, targets
    after = jax_logits(model, tokens)  # its own compile: equal up to float rounding
    np.testing.assert_allclose(after, before, rtol=0, atol=1e-5 * np.abs(before).max())


@pytest.mark.parametrize("name", ["cohere2", "glm4", "granite", "gemma4", "deepseek_v3", "qwen3_5_text"])
def test_family_serves(name, hf_dirs, tokenizer):
    from jaxformer.serve import ServerThread, create_app

    server = ServerThread(create_app(load_hf(hf_dirs[name]), Tokenizer(tokenizer.tok), model_name=name,
                                     max_batch=2, max_queue=4)).start()
    try:
        r = httpx.post(server.url + "/v1/completions", timeout=120,
                       json={"model": name, "prompt": PROMPT, "max_tokens": 4, "temperature": 0})
    finally:
        server.stop()
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 4
