"""Fine-tuning runs end to end: LoRA and full, frozen base, exact resume, CLI, serving, sharded meshes."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.finetune import finetune, load_finetune_config
from jaxformer.interop import native, to_numpy_state_dict
from jaxformer.models import DecoderLM
from jaxformer.train.metrics import read_metrics
from tests.conftest import run_on_eight_devices

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tokenizer) -> Path:
    """A small random Llama saved in jaxformer format with the fixture tokenizer (chat tokens reserved)."""
    d = tmp_path_factory.mktemp("base") / "model"
    cfg = ModelConfig.llama(vocab_size=512, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64)
    native.save(DecoderLM(cfg, rngs=nnx.Rngs(0)), d)
    tokenizer.save(d)
    return d


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("sft")
    rng = np.random.default_rng(0)
    lines = []
    for i in range(80):
        a, b = (int(x) for x in rng.integers(0, 50, 2))
        if i % 2:
            lines.append({"prompt": f"What is {a} plus {b}?", "completion": f"{a + b}."})
        else:
            lines.append({"messages": [{"role": "system", "content": "Answer with a number."},
                                       {"role": "user", "content": f"{a} + {b} = ?"},
                                       {"role": "assistant", "content": f"{a + b}"}]})
    (d / "train.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines[:64]))
    (d / "val.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines[64:]))
    return d / "train.jsonl", d / "val.jsonl"


def _cfgs(run_dir: Path, base_dir: Path, data, method: str = "lora", **train) -> dict:
    t = dict(run_dir=str(run_dir), steps=8, batch_size=4, lr=1e-2, warmup_steps=2, log_every=1, eval_every=4,
             eval_batches=2, ckpt_every=4, keep_last=2, peak_tflops=1.0, weight_decay=0.1, async_checkpoint=False)
    overrides = {"sft.base": str(base_dir), "sft.data": [str(data[0])], "sft.val_data": [str(data[1])],
                 "sft.method": method, "sft.seq_len": 32, "sft.sample_prompts": 0, "lora.rank": 4, "lora.alpha": 8.0,
                 "lora.targets": ["q", "v", "down"], "lora.dropout": 0.1, "mesh.fsdp": 1}
    overrides.update({f"train.{k}": v for k, v in {**t, **train}.items()})
    return load_finetune_config("finetune_lora", overrides)


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r["kind"] == "train"}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, base_dir, sft_data) -> tuple[Path, dict]:
    run = tmp_path_factory.mktemp("lora") / "run"
    return run, finetune(_cfgs(run, base_dir, sft_data), progress=False)


def test_lora_run_trains_adapters_only(lora_run, base_dir):
    run, out = lora_run
    assert out["step"] == 8 and out["val_loss"] < out["val_loss_before"]  # held-out task loss falls
    rep = out["trainable"]
    assert rep["trainable_params"] == 2 * 4 * ((32 + 32) + (32 + 16) + (64 + 32))
    assert rep["optimizer_bytes"] < rep["full_finetune_optimizer_bytes"] / 10
    base = to_numpy_state_dict(native.load(base_dir))
    merged = to_numpy_state_dict(native.load(run / "model"))
    # the base stayed bit-identical: everything but the adapted projections equals the base exactly
    adapted = {f"layers.{i}.{t}.weight" for i in range(2) for t in TARGETS}
    assert all(np.array_equal(merged[k], base[k]) for k in base if k not in adapted)
    assert all(not np.allclose(merged[k], base[k]) for k in adapted)
    # ... and the adapted ones are exactly base + the adapter's update (PEFT files read back with numpy)
    from safetensors.numpy import load_file

    cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
    ad = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    s = cfg["lora_alpha"] / cfg["r"]
    for k in adapted:
        mod = "base_model.model.model." + k.removesuffix(".weight")
        delta = s * ad[f"{mod}.lora_B.weight"].astype(np.float64) @ ad[f"{mod}.lora_A.weight"]
        np.testing.assert_allclose(merged[k], base[k] + delta, atol=1e-6)
    # checkpoints hold the adapters and their optimizer state only
    from jaxformer.checkpoint import Checkpointer

    ckpt = Checkpointer(run / "checkpoints", async_save=False)
    meta = json.loads((run / "checkpoints" / "8" / "meta" / "metadata").read_text())
    ckpt.close()
    assert meta["trainable"]["trainable_params"] == rep["trainable_params"]
    sizes = sum(f.stat().st_size for f in (run / "checkpoints" / "8" / "state").rglob("*") if f.is_file())
    assert sizes < sum(v.nbytes for v in base.values())  # smaller than the base weights alone
    assert (run / "model" / "tokenizer.json").exists() and (run / "loss.png").exists()


def test_resume_reproduces_the_run_exactly(lora_run, tmp_path, base_dir, sft_data):
    """The 8-step run, cut back to its step-4 checkpoint (as a kill after step 4 leaves it), resumes bitwise."""
    import shutil

    ref_run, _ = lora_run
    run = tmp_path / "run"
    shutil.copytree(ref_run, run)
    for stale in ("checkpoints/8", "model", "adapter"):
        shutil.rmtree(run / stale)
    with pytest.raises(ValueError, match="--resume"):
        finetune(_cfgs(run, base_dir, sft_data), progress=False)
    with pytest.raises(ValueError, match=r"lora config differs in \['rank'\]"):
        finetune({**_cfgs(run, base_dir, sft_data), "lora": dataclasses.replace(
            _cfgs(run, base_dir, sft_data)["lora"], rank=8)}, resume=True, progress=False)
    out = finetune(_cfgs(run, base_dir, sft_data), resume=True, progress=False)
    assert out["step"] == 8 and "val_loss_before" not in out
    assert _losses(run) == _losses(ref_run)  # floats from JSON: equal means bitwise equal
    a, b = (to_numpy_state_dict(native.load(r / "model")) for r in (run, ref_run))
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_full_finetune_changes_every_parameter(tmp_path, base_dir, sft_data):
    out = finetune(_cfgs(tmp_path / "full", base_dir, sft_data, method="full", steps=3, eval_every=3, ckpt_every=3),
                   progress=False)
    assert out["trainable"]["trainable_params"] == out["trainable"]["total_params"]
    assert not (tmp_path / "full" / "adapter").exists()
    base = to_numpy_state_dict(native.load(base_dir))
    tuned = to_numpy_state_dict(native.load(tmp_path / "full" / "model"))
    assert all(not np.array_equal(tuned[k], base[k]) for k in base)


def test_cli_finetune_then_serve_chat(tmp_path, base_dir, sft_data):
    import httpx

    from jaxformer.data.tokenizer import load_tokenizer_for
    from jaxformer.infer import load_model
    from jaxformer.serve import ServerThread, create_app

    run = tmp_path / "cli"
    cmd = [sys.executable, "-m", "jaxformer.cli", "finetune", "--base", str(base_dir), "--data", str(sft_data[0]),
           "--val-data", str(sft_data[1]), "--no-progress", "--lora.rank", "2", "--lora.targets", "q,v",
           f"--train.run_dir={run}", "--train.steps=3", "--train.batch_size=4", "--train.eval_every=3",
           "--train.ckpt_every=3", "--sft.seq_len=32", "--sft.sample_prompts=1", "--sft.sample_tokens=4",
           "--mesh.fsdp=1"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads(res.stdout[res.stdout.rindex("\n{") + 1:])
    assert summary["step"] == 3 and summary["trainable"]["trainable_params"] == 2 * 2 * ((32 + 32) + (32 + 16))
    assert "held-out task loss before fine-tuning" in res.stdout and "--- reply" in res.stdout
    bad = subprocess.run(cmd[:6] + ["--data", str(tmp_path / "nope.jsonl")], capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr

    model_dir = Path(summary["model_dir"])
    app = create_app(load_model(model_dir), load_tokenizer_for(model_dir), model_name="ft", max_batch=2)
    with ServerThread(app) as server:
        r = httpx.post(f"{server.url}/v1/chat/completions", timeout=120, json={
            "model": "ft", "messages": [{"role": "user", "content": "What is 2 plus 3?"}], "max_tokens": 5,
            "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["role"] == "assistant"


def test_lora_on_a_2x2x2_mesh_equals_one_device(tmp_path, base_dir, sft_data):
    cfgs = _cfgs(tmp_path / "unused", base_dir, sft_data, steps=4, batch_size=8, eval_every=4, ckpt_every=4)
    raw = {name: dataclasses.asdict(c) for name, c in cfgs.items()}
    config = tmp_path / "ft.yaml"
    config.write_text(yaml.safe_dump(json.loads(json.dumps(raw))))
    run_on_eight_devices(str(ROOT / "tests" / "finetune_worker.py"), str(config), str(tmp_path))
    report = json.loads((tmp_path / "report.json").read_text())
    one, mesh = tmp_path / "d1f1t1", tmp_path / "d2f2t2"
    a, b = _losses(one), _losses(mesh)
    assert sorted(a) == [1, 2, 3, 4] and all(abs(a[k] - b[k]) <= 1e-5 * abs(a[k]) for k in a)
    wa, wb = (to_numpy_state_dict(native.load(r / "model")) for r in (one, mesh))
    for k in wa:
        np.testing.assert_allclose(wb[k], wa[k], rtol=1e-5, atol=1e-6, err_msg=k)
    specs = report["2,2,2"]
    assert specs["layers.0.self_attn.q_proj.lora_A.weight"]["spec"] == [None, "fsdp"]
    assert specs["layers.0.self_attn.q_proj.lora_B.weight"]["spec"] == ["tensor", None]
    assert specs["layers.0.mlp.down_proj.lora_A.weight"]["spec"] == [None, "tensor"]
    assert specs["layers.0.mlp.down_proj.lora_B.weight"]["spec"] == ["fsdp", None]
    assert specs["layers.0.self_attn.q_proj.weight"]["spec"] == ["tensor", "fsdp"]  # the frozen base, sharded


HF_BASES = {  # transformers config class and its family's fields (tiny, random-init; windows shorter than the prompt)
    # one family with the most to map (sliding windows, soft-caps, sandwich norms, offset RMSNorm); PEFT export of
    # biased and tied projections is tests/test_lora.py's (gpt2)
    "gemma2": ("Gemma2Config", dict(head_dim=16, sliding_window=8, query_pre_attn_scalar=12,
                                    attn_logit_softcapping=5.0, final_logit_softcapping=3.0)),
}


@pytest.mark.parametrize("family", sorted(HF_BASES))
def test_lora_from_a_hugging_face_directory_exports_peft(family, tmp_path, tokenizer, sft_data):
    """`jaxformer finetune --base HF_DIR` (LoRA on all seven projections); peft loads RUN/adapter onto the
    transformers model, which then gives the fine-tuned jaxformer model's logits."""
    import torch
    import transformers
    from peft import PeftModel

    cls, extra = HF_BASES[family]
    hf_cfg = getattr(transformers, cls)(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        initializer_range=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=0, **extra)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="eager")
    with torch.no_grad():  # norms and biases away from their init values
        for p in hf.parameters():
            if p.ndim == 1:
                p.add_(0.3 * torch.randn_like(p))
    hf.save_pretrained(tmp_path / "hf")
    tokenizer.save(tmp_path / "hf")
    cfgs = _cfgs(tmp_path / "run", tmp_path / "hf", sft_data, steps=4, eval_every=4, ckpt_every=4)
    cfgs["lora"] = dataclasses.replace(cfgs["lora"], targets=("q", "k", "v", "o", "gate", "up", "down"))
    out = finetune(cfgs, progress=False)
    assert out["val_loss"] < out["val_loss_before"]

    tuned = native.load(tmp_path / "run" / "model")  # the merged fine-tuned model
    assert tuned.config.family == family
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    peft_model = PeftModel.from_pretrained(base, out["adapter_dir"]).eval()
    tokens = np.random.default_rng(1).integers(3, 400, (2, 40))  # past every window
    with torch.no_grad():
        got = peft_model(torch.from_numpy(tokens)).logits.numpy()
        with peft_model.disable_adapter():
            before = peft_model(torch.from_numpy(tokens)).logits.numpy()
    want = np.asarray(tuned(tokens.astype(np.int32)))
    assert np.abs(got - before).max() > 1e-3  # the adapter changed the model ...
    np.testing.assert_allclose(got, want, atol=1e-4)  # ... as fine-tuning changed jaxformer's


def test_lora_base_without_a_peft_naming_fails_before_training(tmp_path, tokenizer, sft_data):
    cfg = ModelConfig.llama(vocab_size=512, d_model=32, n_layers=1, n_heads=4, d_ff=64, max_seq_len=64,
                            export_as="llama_v9")  # a family name no exporter knows
    native.save(DecoderLM(cfg, rngs=nnx.Rngs(0)), tmp_path / "base")
    tokenizer.save(tmp_path / "base")
    with pytest.raises(ValueError, match=r"set model.export_as to one of \[.*'qwen2'"):
        finetune(_cfgs(tmp_path / "run", tmp_path / "base", sft_data), progress=False)
    assert not (tmp_path / "run").exists()  # nothing trained, nothing written
