"""Data / FSDP / tensor parallelism on 8 fake CPU devices, multi-process over gloo, resharding restores.

Every multi-device run happens in a subprocess: XLA reads XLA_FLAGS once, at import.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from jaxformer.config import MeshConfig, ModelConfig
from jaxformer.interop import native, to_numpy_state_dict
from jaxformer.sharding import check_model_fits, resolve_mesh_shape
from jaxformer.train.metrics import read_metrics
from tests.conftest import fake_devices_env, tiny_run

MESHES = ["8,1,1", "1,8,1", "1,1,8", "2,2,2"]  # pure data, pure fsdp, pure tensor, all three
ROOT = Path(__file__).resolve().parent.parent


def _run(cmd: list[str], devices: int, **extra: str) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, env=fake_devices_env(devices, **extra), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def _cli(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "jaxformer.cli", "train", "--config", str(config), "--no-progress", *extra]


def _losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if r["kind"] == "train"]


def _weights(run_dir: Path) -> dict[str, np.ndarray]:
    return to_numpy_state_dict(native.load(run_dir / "model"))


def _close(a: list[float], b: list[float], rtol: float = 1e-5) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= rtol * abs(y) for x, y in zip(a, b))


def _assert_trained_alike(got: dict[str, np.ndarray], want: dict[str, np.ndarray], lr: float, skip=()) -> None:
    """Weights trained on two meshes: AdamW moves a weight by up to lr a step, so a sharding bug shows as ~lr, while
    the float order of the reductions moved them by 2.9e-7 at most (lr 3e-3, 5 steps): the bound is lr / 1000."""
    assert sorted(got) == sorted(want)
    for name in want:
        if not name.endswith(skip):
            diff = float(np.abs(got[name] - want[name]).max())
            assert diff <= 1e-3 * lr, f"{name}: max|diff| {diff:.2e} > lr / 1000 = {1e-3 * lr:.1e}"


@pytest.fixture(scope="module")
def config(tmp_path_factory, shards_dir) -> Path:
    d = tmp_path_factory.mktemp("sharding")
    cfgs = tiny_run(d / "unused", shards_dir, steps=5, batch_size=8, schedule="constant", warmup_steps=2,
                    ckpt_every=5, eval_every=5, eval_batches=1, async_checkpoint=False,
                    model=dict(d_model=64, n_heads=8, n_kv_heads=2, d_ff=128))
    raw = {name: dataclasses.asdict(c) for name, c in cfgs.items()}
    raw["data"]["sources"] = list(raw["data"]["sources"])
    path = d / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def runs(config, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("meshes")
    worker = str(ROOT / "tests" / "sharding_worker.py")
    _run([sys.executable, worker, str(config), str(out / "one"), "1,1,1"], devices=1)
    _run([sys.executable, worker, str(config), str(out / "eight"), *MESHES], devices=8)
    return out


@pytest.mark.parametrize("mesh", MESHES)
def test_mesh_matches_one_device(runs, config, mesh):
    d, f, t = mesh.split(",")
    base, run = runs / "one" / "d1f1t1", runs / "eight" / f"d{d}f{f}t{t}"
    assert _close(_losses(run), _losses(base))
    _assert_trained_alike(_weights(run), _weights(base), lr=yaml.safe_load(config.read_text())["train"]["lr"])


def test_params_are_split_as_the_table_says(runs):
    report = json.loads((runs / "eight" / "report.json").read_text())
    assert report["devices"] == 8
    spec = {m: {k: v["spec"] for k, v in report[m].items()} for m in MESHES}
    shard = {m: {k: tuple(v["shard"]) for k, v in report[m].items()} for m in MESHES}
    s = spec["2,2,2"]
    assert s["embed_tokens.weight"] == ["tensor", "fsdp"]  # vocab-parallel, FSDP over embed
    assert s["lm_head.weight"] == ["tensor", "fsdp"]
    for col in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
        assert s[f"layers.0.{col}.weight"] == ["tensor", "fsdp"], col  # column-parallel
    for row in ("self_attn.o_proj", "mlp.down_proj"):
        assert s[f"layers.0.{row}.weight"] == ["fsdp", "tensor"], row  # row-parallel
    assert s["layers.0.input_layernorm.weight"] == [None]
    # what each device really holds (V=512, D=64, F=128, N*H=64, K*H=16)
    assert shard["2,2,2"]["layers.0.mlp.up_proj.weight"] == (64, 32)
    assert shard["2,2,2"]["layers.0.self_attn.k_proj.weight"] == (8, 32)  # 2 kv heads, one per tensor shard
    assert shard["1,8,1"]["layers.0.mlp.down_proj.weight"] == (8, 128)  # FSDP-8 over embed
    assert shard["1,8,1"]["embed_tokens.weight"] == (512, 8)
    assert shard["1,1,8"]["embed_tokens.weight"] == (64, 64)  # vocab split 8 ways
    assert shard["1,1,8"]["layers.1.self_attn.q_proj.weight"] == (8, 64)  # one head per device
    assert shard["1,1,8"]["layers.1.self_attn.k_proj.weight"] == (16, 64)  # 2 kv heads cannot split 8 ways
    assert shard["8,1,1"]["layers.0.mlp.up_proj.weight"] == (128, 64)  # pure data parallel: replicated
    for m in MESHES[1:]:  # every mesh with model parallelism splits the big matrices
        assert shard[m]["layers.0.mlp.up_proj.weight"] != (128, 64), m


def test_checkpoint_restores_onto_other_meshes(runs, config, tmp_path):
    """Saved under data=2 x fsdp=2 x tensor=2; restored under tensor=2 x data=4 and on one device."""
    import shutil

    saved = runs / "eight" / "d2f2t2"
    for name, devices, mesh in (("tp2dp4", 8, ["--mesh.data=4", "--mesh.fsdp=1", "--mesh.tensor=2"]),
                                ("single", 1, ["--mesh.data=1", "--mesh.fsdp=1", "--mesh.tensor=1"])):
        run = tmp_path / name
        shutil.copytree(saved, run)
        shutil.rmtree(run / "model")
        _run(_cli(config, "--resume", f"--train.run_dir={run}", *mesh), devices=devices)
        restored, original = _weights(run), _weights(saved)
        assert all(np.array_equal(restored[k], original[k]) for k in original), name  # exact restore
        _run(_cli(config, "--resume", f"--train.run_dir={run}", "--train.steps=7", *mesh), devices=devices)
    assert _close(_losses(tmp_path / "tp2dp4")[5:], _losses(tmp_path / "single")[5:])
    assert len(_losses(tmp_path / "single")) == 7


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_over_gloo_match_one(runs, config, tmp_path):
    run = tmp_path / "mp"
    cmd = _cli(config, f"--train.run_dir={run}", "--mesh.data=1", "--mesh.fsdp=-1", "--mesh.tensor=1")
    port = _free_port()
    procs = [subprocess.Popen(cmd, env=fake_devices_env(4, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                                                        JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    assert _close(_losses(run), _losses(runs / "one" / "d1f1t1"))
    # the checkpoint the two processes wrote together restores in a one-process run
    single = tmp_path / "single"
    import shutil

    shutil.copytree(run, single)
    shutil.rmtree(single / "model")
    _run(_cli(config, "--resume", f"--train.run_dir={single}", "--mesh.fsdp=1"), devices=1)
    restored, original = _weights(single), _weights(run)
    assert all(np.array_equal(restored[k], original[k]) for k in original)


def test_encoder_decoder_on_a_mesh_matches_one_device(tmp_path):
    """The encoder-decoder (copy head included) trains on a data x fsdp x tensor mesh as on one device."""
    from tests.test_seq2seq import _reverse_task

    data = _reverse_task(tmp_path)
    args = ["--seq2seq.data_dir", str(data), "--seq2seq.task=null", "--seq2seq.min_bucket=8",
            "--seq2seq.eval_max_examples=8", "--model.vocab_size=300", "--model.pointer_generator=true",
            "--train.steps=4", "--train.batch_size=16", "--train.log_every=1", "--train.eval_every=4",
            "--train.eval_batches=1", "--train.ckpt_every=4"]
    _run(_cli("seq2seq_tiny", *args, f"--train.run_dir={tmp_path / 'one'}"), devices=1)  # trains the tokenizer
    _run(_cli("seq2seq_tiny", *args, f"--train.run_dir={tmp_path / 'mesh'}", "--mesh.data=2", "--mesh.fsdp=2",
              "--mesh.tensor=2"), devices=8)
    assert _close(_losses(tmp_path / "mesh"), _losses(tmp_path / "one"))
    want, got = _weights(tmp_path / "one"), _weights(tmp_path / "mesh")
    assert any(k.startswith("pointer.") for k in want)
    # k_proj.bias: its gradient is exactly zero in math (softmax ignores a per-query constant); AdamW turns the
    # float noise there into +-lr steps, which differ with the reduction order of each mesh
    lr = yaml.safe_load((ROOT / "configs" / "seq2seq_tiny.yaml").read_text())["train"]["lr"]
    _assert_trained_alike(got, want, lr, skip=("k_proj.bias",))


def _grads_on_a_mesh_and_one_device(tmp_path, cfgs) -> tuple[dict, dict, dict]:
    """(one device's gradients, data 2 x fsdp 2 x tensor 2's, the mesh's parameter specs) of the run config's model
    on one batch (tests/sharding_worker.py --grads, 8 fake devices); the two losses agree within 1e-5 relative and
    the gradients have the same names."""
    raw = json.loads(json.dumps({name: dataclasses.asdict(c) for name, c in cfgs.items()}))  # tuples as lists
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(raw))
    _run([sys.executable, str(ROOT / "tests" / "sharding_worker.py"), "--grads", str(tmp_path / "config.yaml"),
          str(tmp_path / "out"), "2,2,2"], devices=8)
    got = np.load(tmp_path / "out" / "grads.npz")
    one = {k.removeprefix("one/"): got[k] for k in got.files if k.startswith("one/")}
    mesh = {k.removeprefix("mesh/"): got[k] for k in got.files if k.startswith("mesh/")}
    assert abs(got["loss/mesh"] - got["loss/one"]) <= 1e-5 * abs(got["loss/one"])
    assert sorted(mesh) == sorted(one)
    return one, mesh, json.loads((tmp_path / "out" / "report.json").read_text())["2,2,2"]


FAMILY_FIELDS = dict(  # Gemma 2/3, Qwen2 and OLMo 2 fields in one model: every new parameter kind on the mesh
    qkv_bias=True, qk_norm="proj", norm_placement="sandwich", norm_unit_offset=True, scale_embedding=True,
    sliding_window=8, layer_types=("sliding_attention", "full_attention"), rope_local_theta=1e4,
    attn_logit_softcap=20.0, final_logit_softcap=15.0, query_pre_attn_scalar=12.0, activation="gelu_tanh",
    tie_embeddings=True)


def test_family_fields_on_a_mesh_match_one_device(tmp_path, shards_dir):
    """q/k norms over whole projections, sandwich norms, q/k/v biases, sliding layers and soft-caps: the loss and
    every gradient on data 2 x fsdp 2 x tensor 2 equal one device's, with the layouts the table gives."""
    cfgs = tiny_run(tmp_path / "unused", shards_dir, batch_size=8,
                    model=dict(d_model=64, n_heads=8, n_kv_heads=2, d_ff=128, **FAMILY_FIELDS))
    one, mesh, spec = _grads_on_a_mesh_and_one_device(tmp_path, cfgs)
    assert "layers.0.self_attn.q_norm.weight" in one
    for name, g in one.items():  # k_proj.bias too: k is normed and rotated after it, so its gradient is not zero
        assert np.abs(g).max() > 1e-6, name
        # the project's gradient bound (docs/testing.md); q/k norm weights reach 4.8e-6: each entry is a sum over
        # every token and head that cancels, so its relative error is far above its terms' rounding
        rel = np.linalg.norm(mesh[name] - g) / np.linalg.norm(g)
        assert rel <= 1e-4, f"{name}: relative gradient error {rel:.1e}"
    for norm in ("self_attn.q_norm", "self_attn.k_norm", "input_layernorm", "post_attention_layernorm",
                 "pre_feedforward_layernorm", "post_feedforward_layernorm"):
        assert spec[f"layers.1.{norm}.weight"] == [None], norm  # replicated: the same scale on every shard
    assert spec["layers.0.self_attn.q_proj.bias"] == ["tensor"]  # split with the projection's heads
    assert spec["layers.0.self_attn.k_proj.bias"] == ["tensor"]  # 2 kv heads over tensor 2


def test_chunked_loss_on_a_mesh_matches_one_device(tmp_path, shards_dir):
    """train.loss_chunk on data 2 x fsdp 2 x tensor 2: each chunk's logits split over the vocabulary (the tied head
    is vocab-parallel), its rows over data and fsdp; the loss and every gradient equal one device's (also chunked;
    tests/test_chunked_ce.py: chunked equals the whole logits)."""
    cfgs = tiny_run(tmp_path / "unused", shards_dir, batch_size=8, loss_chunk=48,
                    model=dict(d_model=64, n_heads=8, n_kv_heads=2, d_ff=128, tie_embeddings=True,
                               final_logit_softcap=15.0))
    one, mesh, spec = _grads_on_a_mesh_and_one_device(tmp_path, cfgs)
    assert spec["embed_tokens.weight"] == ["tensor", "fsdp"]
    for name, g in one.items():
        assert np.abs(mesh[name] - g).max() <= 1e-4 * np.abs(g).max(), name


def test_bad_meshes_fail_clearly(config):
    with pytest.raises(ValueError, match=r"data=2 x fsdp=2 x tensor=3 = 12 devices, but there are 8"):
        resolve_mesh_shape(MeshConfig(data=2, fsdp=2, tensor=3), 8)
    with pytest.raises(ValueError, match="only one mesh axis may be -1"):
        resolve_mesh_shape(MeshConfig(data=-1, fsdp=-1), 8)
    with pytest.raises(ValueError, match="3 does not divide 8"):
        resolve_mesh_shape(MeshConfig(data=3, fsdp=-1), 8)
    assert resolve_mesh_shape(MeshConfig(data=2, fsdp=-1, tensor=2), 8) == (2, 2, 1, 1, 2)
    cfg = ModelConfig.llama(d_model=48, n_heads=6, n_kv_heads=3)
    with pytest.raises(ValueError, match="mesh.tensor=4 divides neither n_heads=6 nor n_kv_heads=3"):
        check_model_fits(cfg, 4)
    check_model_fits(cfg, 2)  # 6 heads split 2 ways; 3 kv heads stay whole
    res = subprocess.run(_cli(config, "--mesh.data=1", "--mesh.fsdp=1", "--mesh.tensor=3"), env=fake_devices_env(8),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    assert "error: mesh data=1 x fsdp=1 x tensor=3 = 3 devices, but there are 8" in res.stderr
    assert "Traceback" not in res.stderr


def test_multi_host_initialisation_follows_the_environment(monkeypatch):
    """JAX's own distributed runtime: explicit coordinator env, SLURM, or an opt-in for JAX's cluster detection."""
    import jax

    from jaxformer.sharding import maybe_initialize_distributed

    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    for var in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "JAXFORMER_DISTRIBUTED"):
        monkeypatch.delenv(var, raising=False)
    assert not maybe_initialize_distributed() and calls == []  # one machine: nothing to join
    assert maybe_initialize_distributed(force=True) and calls[-1] == ((), {})  # Cloud TPU / GKE: JAX detects it
    monkeypatch.setenv("JAXFORMER_DISTRIBUTED", "1")
    assert maybe_initialize_distributed() and calls[-1] == ((), {})
    monkeypatch.delenv("JAXFORMER_DISTRIBUTED")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert maybe_initialize_distributed() and calls[-1] == ((), {})
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    monkeypatch.setattr(jax.config, "update", lambda *a: None)
    assert maybe_initialize_distributed() and calls[-1] == (("10.0.0.1:1234",), {"num_processes": 2, "process_id": 1})


GEMMA4_FIELDS = dict(  # Gemma 4's block: per-layer inputs, kv-shared layers, wider k = v full layers, experts
    n_layers=4, head_dim=8, block="gemma4", norm_placement="sandwich", scale_embedding=True, activation="gelu_tanh",
    tie_embeddings=True, final_logit_softcap=30.0, layer_types=("sliding_attention", "full_attention") * 2,
    per_layer_dim=16, kv_shared_layers=2, double_wide_shared_mlp=True,
    rope=dict(theta=1e6, local_theta=1e4, scaling=dict(rope_type="proportional", partial_rotary_factor=0.25)),
    attention=dict(qk_norm="head", v_norm=True, scale=1.0, sliding_window=8, global_head_dim=16, global_kv_heads=2,
                   k_eq_v=True),
    moe=dict(n_experts=4, n_experts_per_token=2, d_ff=32, router="gemma4"))


GEMMA3N_FIELDS = dict(  # Gemma 3n's block: AltUp streams, LAuReL, sparse gates, per-layer inputs, kv sharing
    n_layers=4, head_dim=8, block="gemma3n", norm_placement="sandwich", scale_embedding=True, activation="gelu_tanh",
    tie_embeddings=True, final_logit_softcap=30.0, layer_types=("sliding_attention", "full_attention") * 2,
    per_layer_dim=16, kv_shared_layers=2, laurel_rank=8, activation_sparsity=(0.9, 0.0, 0.0, 0.0),
    altup=dict(inputs=4), rope=dict(theta=1e6, local_theta=1e4),
    attention=dict(qk_norm="head", v_norm=True, scale=1.0, sliding_window=8))


@pytest.mark.parametrize("fields", ["gemma4", "gemma3n"])
def test_gemma_blocks_on_a_mesh_match_one_device(fields, tmp_path, shards_dir):
    """Gemma 4's and Gemma 3n's blocks on data 2 x fsdp 2 x tensor 2: the loss and every gradient equal one
    device's."""
    cfgs = tiny_run(tmp_path / "unused", shards_dir, batch_size=8, model=dict(
        d_model=64, n_heads=8, n_kv_heads=2, d_ff=128, **{"gemma4": GEMMA4_FIELDS, "gemma3n": GEMMA3N_FIELDS}[fields]))
    one, mesh, _ = _grads_on_a_mesh_and_one_device(tmp_path, cfgs)
    assert "embed_tokens_per_layer.weight" in one
    for name, g in one.items():
        if name.endswith("layer_scalar"):  # Gemma 4: stored, not trained: no gradient on either side
            assert not np.abs(g).any() and not np.abs(mesh[name]).any(), name
            continue
        assert np.abs(g).max() > 0, name  # AltUp's router norm weight: ~3e-7 (its input is scaled by 1 / D)
        rel = np.linalg.norm(mesh[name] - g) / np.linalg.norm(g)
        assert rel <= 1e-4, f"{name}: relative gradient error {rel:.1e}"


PROJECT_ON_MESHES = """
import json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from jaxformer.models.layers import project
x = np.random.default_rng(0).standard_normal((8, 64, 32)).astype(np.float32)
w = np.random.default_rng(1).standard_normal((48, 32)).astype(np.float32)
out = {}
for axes, x_spec in (("data", "context"), P("data", "context")), (("data", "fsdp"), P(("data", "fsdp"))):
    mesh = jax.make_mesh((2, 4), axes, axis_types=(jax.sharding.AxisType.Auto,) * 2)
    with jax.set_mesh(mesh):
        fn = jax.jit(jax.value_and_grad(lambda w, x: jnp.sum(jnp.sin(project(x, w))), argnums=(0, 1)),
                     in_shardings=(NamedSharding(mesh, P()), NamedSharding(mesh, x_spec)))
        hlo = fn.lower(w, x).compile().as_text()
        loss, (gw, _) = fn(jax.device_put(w, NamedSharding(mesh, P())),
                           jax.device_put(x, NamedSharding(mesh, x_spec)))
    out["x".join(axes)] = {"gathers": [l.split("=")[1].split("(")[0].strip() for l in hlo.splitlines()
                                       if "all-gather(" in l or "all-to-all(" in l],
                           "loss": float(loss), "gw": np.asarray(gw).tolist()}
print(json.dumps(out))
"""


def test_projection_rows_never_gather_a_split_sequence():
    """layers.project runs on flat [B*T] rows, except where the mesh splits the sequence (context parallelism): there
    rows would interleave the sequence's shards and XLA would gather the activations. Neither mesh gathers them, and
    both give the single-device loss and weight gradient (float64 numpy)."""
    from tests.conftest import run_on_eight_devices

    out = json.loads(run_on_eight_devices("-c", PROJECT_ON_MESHES).strip().splitlines()[-1])
    x = np.random.default_rng(0).standard_normal((8, 64, 32))
    w = np.random.default_rng(1).standard_normal((48, 32))
    y = x @ w.T
    want_gw = np.einsum("bto,bti->oi", np.cos(y), x)
    for mesh, r in out.items():
        assert r["gathers"] == [], f"{mesh}: {r['gathers']}"
        assert abs(r["loss"] - np.sin(y).sum()) <= 1e-4 * np.abs(np.sin(y)).sum(), mesh
        assert np.abs(np.asarray(r["gw"]) - want_gw).max() <= 1e-5 * np.abs(want_gw).max(), mesh
