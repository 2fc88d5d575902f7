"""The two sides of a parity check: jaxformer, torch_ref (its PyTorch mirror) and transformers, on the same tokens.

Each side runs `Inputs` three ways: `trace` (logits and the residual stream under jaxformer's parameter paths),
`logits`, and `grads` (the next-token loss and the gradient of every parameter, named as jaxformer names it).
The residual stream comes from one capture mechanism: the `capture` dict of jaxformer's and torch_ref's models
(`embed_tokens`, `layers.{i}`, `norm`; `embed_source_tokens`, `encoder.layers.{i}`, `decoder.layers.{i}`, ...
for the encoder-decoder), and forward hooks on the same modules of a transformers model.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import json
import os
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from flax import nnx

from jaxformer.config import EncDecConfig, ModelConfig
from jaxformer.interop import hf as hf_interop
from jaxformer.interop import marian, to_torch

Grads = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Inputs:
    """The same token ids for both sides: decoder inputs [B, T]; the encoder-decoder's source [B, S]; packed rows'
    positions and segment ids [B, T] (decoder-only, jaxformer and torch_ref only)."""

    tokens: np.ndarray
    src: np.ndarray | None = None
    positions: np.ndarray | None = None
    segment_ids: np.ndarray | None = None

    def arrays(self) -> dict[str, Any]:
        """The fields by name, not copied (dataclasses.asdict would deep-copy device arrays)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def row(self, tokens: np.ndarray) -> "Inputs":
        """Decoder inputs `tokens` [1, L] with this batch's first source row (greedy decoding)."""
        return Inputs(tokens, None if self.src is None else self.src[:1])


@dataclasses.dataclass
class Trace:
    """What a forward pass showed: the residual stream {name: [B, T, D]} in forward order, and the logits [B, T, V]."""

    hidden: dict[str, np.ndarray]
    logits: np.ndarray


def forward_order(name: str) -> tuple[int, int, int]:
    """Sort key of captured names in the order a forward pass makes them: the source's stack (the encoder) before
    the decoder's; in a stack its embedding, its layers by number, its final norm."""
    stack = 0 if name.startswith(("encoder.", "embed_source")) else 1
    leaf = name.removeprefix("encoder.").removeprefix("decoder.")
    if leaf.startswith("layers."):
        return stack, 1, int(leaf.split(".")[1])
    return stack, 2 if leaf == "norm" else 0, 0


def call_model(model: Any, x: dict, capture: dict | None = None):
    """Logits of a jaxformer or torch_ref model (their call signatures are the same) on Inputs' arrays `x`."""
    if x["src"] is not None:
        return model(x["src"], x["tokens"], capture=capture)
    return model(x["tokens"], x["positions"], x["segment_ids"], capture=capture)


def _f32(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(jnp.asarray(x, jnp.float32))


# ----------------------------------------------------------------------------- jaxformer

@functools.partial(jax.jit, static_argnums=(0, 3))
def _jax_forward(graphdef, state, x: dict, capture: bool):
    hidden = {} if capture else None
    logits = call_model(nnx.merge(graphdef, state), x, hidden)
    return logits, hidden


def next_token_loss_jax(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """Mean cross-entropy of logits[:, t] against tokens[:, t + 1] (float32)."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()


@functools.partial(jax.jit, static_argnums=0)
def _jax_loss_grads(graphdef, params, rest, x: dict):
    loss = lambda p: next_token_loss_jax(call_model(nnx.merge(graphdef, p, rest), x), x["tokens"])  # noqa: E731
    return jax.value_and_grad(loss)(params)


class JaxSide:
    """A jaxformer model, run compiled (one compile per input shape)."""

    def __init__(self, model: nnx.Module):
        self.model, self.config = model, model.config
        cfg = model.config
        self.label = f"jaxformer ({cfg.compute_dtype}, attention {cfg.attention_impl})"

    def _x(self, inputs: Inputs) -> dict:
        return {k: None if v is None else jnp.asarray(v, jnp.int32) for k, v in inputs.arrays().items()}

    def trace(self, inputs: Inputs) -> Trace:
        logits, hidden = _jax_forward(*nnx.split(self.model), self._x(inputs), True)  # jit sorts the dict's keys
        return Trace({k: _f32(hidden[k]) for k in sorted(hidden, key=forward_order)}, _f32(logits))

    def logits_array(self, inputs: Inputs) -> jax.Array:
        """The logits as a jax array, laid out as the model's weights are (on a mesh: sharded like training)."""
        return _jax_forward(*nnx.split(self.model), self._x(inputs), False)[0]

    def logits(self, inputs: Inputs) -> np.ndarray:
        return _f32(self.logits_array(inputs))

    def grads(self, inputs: Inputs) -> tuple[float, Grads]:
        graphdef, params, rest = nnx.split(self.model, nnx.Param, ...)
        loss, grads = _jax_loss_grads(graphdef, params, rest, self._x(inputs))
        return float(loss), {".".join(map(str, p)): _f32(v[...]) for p, v in nnx.to_flat_state(grads)}


# ----------------------------------------------------------------------------- torch

def next_token_loss_torch(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The same loss as next_token_loss_jax, by torch's own cross_entropy."""
    V = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), tokens[:, 1:].reshape(-1).long())


class _TorchSide(abc.ABC):
    """Shared by torch_ref and transformers: eager float32 forward, backward for gradients."""

    module: torch.nn.Module

    def _x(self, inputs: Inputs) -> dict:
        return {k: None if v is None else torch.from_numpy(np.array(v, np.int64))
                for k, v in inputs.arrays().items()}

    @abc.abstractmethod
    def _logits(self, x: dict) -> torch.Tensor:
        """Logits [B, T, V] of Inputs' tensors `x`."""

    def logits(self, inputs: Inputs) -> np.ndarray:
        with torch.no_grad():
            return _f32(self._logits(self._x(inputs)))

    def _named_grads(self) -> Grads:
        return {k: _f32(p.grad) for k, p in self.module.named_parameters() if p.grad is not None}

    def grads(self, inputs: Inputs) -> tuple[float, Grads]:
        x = self._x(inputs)
        self.module.zero_grad(set_to_none=True)
        loss = next_token_loss_torch(self._logits(x), x["tokens"])
        loss.backward()
        grads = self._named_grads()
        self.module.zero_grad(set_to_none=True)
        return loss.item(), grads


class TorchRefSide(_TorchSide):
    """The torch_ref twin of a jaxformer model: same modules, same parameter names, the weights copied by name."""

    def __init__(self, model: nnx.Module):
        self.module = to_torch(model).float()
        self.config = model.config
        self.label = "torch_ref (float32)"

    def _logits(self, x: dict, capture: dict | None = None) -> torch.Tensor:
        return call_model(self.module, x, capture)

    def trace(self, inputs: Inputs) -> Trace:
        hidden: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            logits = self._logits(self._x(inputs), hidden)
        return Trace({k: _f32(v) for k, v in hidden.items()}, _f32(logits))


def read_hf_config(path: str | Path) -> dict:
    """config.json of a Hugging Face directory, checked to be a family jaxformer reads (else a ValueError)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}/config.json not found: not a Hugging Face model directory")
    hf = json.loads((path / "config.json").read_text())
    if hf.get("model_type") not in hf_interop.SUPPORTED:
        raise ValueError(f"{path} is a transformers {hf.get('model_type')!r} model; parity runs the families jaxformer "
                         f"imports: {', '.join(hf_interop.SUPPORTED)}")
    return hf


def load_transformers(path: str | Path) -> torch.nn.Module:
    """The transformers model of a save_pretrained directory: float32, eager attention, evaluation mode, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    hf = read_hf_config(path)
    auto = transformers.AutoModelForSeq2SeqLM if hf["model_type"] == "marian" else transformers.AutoModelForCausalLM
    return auto.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager").eval()


def hook_points(module: torch.nn.Module) -> list[tuple[str, str, Any, Any]]:
    """Per stack of a transformers model: (embedding name, layer-name prefix, its layer list, its final norm or None).

    The embedding is the first layer's input (scaled, positions added), as jaxformer's `embed_tokens` capture is.
    """
    if hasattr(getattr(module, "model", None), "encoder"):  # Marian: an encoder and a decoder stack
        enc, dec = module.model.encoder, module.model.decoder
        return [("embed_source_tokens", "encoder.", enc.layers, getattr(enc, "layer_norm", None)),
                ("embed_tokens", "decoder.", dec.layers, getattr(dec, "layer_norm", None))]
    base = module.base_model  # LlamaModel, GPT2Model, ...
    if not hasattr(base, "layers") and not hasattr(base, "h"):  # Llama4ForCausalLM names no base model prefix
        base = module.model
    layers = base.layers if hasattr(base, "layers") else base.h
    final = next(getattr(base, n) for n in ("norm", "ln_f", "embedding_norm") if hasattr(base, n))  # LFM2: the last
    return [("embed_tokens", "", layers, final)]


def _first(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


class HFSide(_TorchSide):
    """A transformers model from a Hugging Face directory; its gradients renamed by jaxformer's importer."""

    def __init__(self, path: str | Path):
        hf = read_hf_config(path)
        self.module = load_transformers(path)
        self.config: ModelConfig = hf_interop.config_from_hf(hf)
        self.rename: Callable[[Grads, ModelConfig], Grads] = (
            marian.from_hf if isinstance(self.config, EncDecConfig) else hf_interop.FAMILIES[hf["model_type"]].from_hf)
        self.label = f"transformers {type(self.module).__name__} (float32, eager) from {path}"

    def _logits(self, x: dict) -> torch.Tensor:
        if x["positions"] is not None or x["segment_ids"] is not None:
            raise ValueError("packed rows (positions, segment ids) run against torch_ref only")
        if x["src"] is not None:
            return self.module(input_ids=x["src"], decoder_input_ids=x["tokens"]).logits
        return self.module(input_ids=x["tokens"]).logits

    def trace(self, inputs: Inputs) -> Trace:
        hidden: dict[str, torch.Tensor] = {}

        def record_input(name, _module, args, kwargs):
            hidden[name] = args[0] if args else kwargs["hidden_states"]

        def record_output(name, _module, _args, out):
            hidden[name] = _first(out)

        handles = []
        for embed_name, prefix, layers, norm in hook_points(self.module):
            handles.append(layers[0].register_forward_pre_hook(functools.partial(record_input, embed_name),
                                                               with_kwargs=True))
            handles += [layer.register_forward_hook(functools.partial(record_output, f"{prefix}layers.{i}"))
                        for i, layer in enumerate(layers)]
            if norm is not None:
                handles.append(norm.register_forward_hook(functools.partial(record_output, f"{prefix}norm")))
        try:
            with torch.no_grad():
                logits = self._logits(self._x(inputs))
        finally:
            for h in handles:
                h.remove()
        if getattr(self.config, "altup", None) is not None and self.config.altup.inputs:  # Gemma 3n: [A, B, T, D]
            active = self.config.altup.active_idx  # streams; jaxformer records the active one
            hidden = {k: v[active] if v.ndim == 4 else v for k, v in hidden.items()}
        return Trace({k: _f32(v) for k, v in hidden.items()}, _f32(logits))

    def _named_grads(self) -> Grads:
        return self.rename(super()._named_grads(), self.config)

    def grads(self, inputs: Inputs) -> tuple[float, Grads]:
        """The loss gradient; transformers' embeddings zero their padding row's gradient (padding_idx), which is
        a training choice, not the loss's derivative: it is switched off for the duration."""
        padded = [(m, m.padding_idx) for m in self.module.modules()
                  if isinstance(m, torch.nn.Embedding) and m.padding_idx is not None]
        try:
            for m, _ in padded:
                m.padding_idx = None
            return super().grads(inputs)
        finally:
            for m, idx in padded:
                m.padding_idx = idx


def greedy(side, prompt: Inputs, n: int) -> list[int]:
    """`n` greedy tokens after row 0 of `prompt`, by full forwards over a buffer of fixed length (causal: the
    slots after position t do not change its logits, and a compiled side compiles once)."""
    T0 = prompt.tokens.shape[1]
    buf = np.zeros((1, T0 + n), np.int32)
    buf[0, :T0] = prompt.tokens[0]
    for t in range(T0, T0 + n):
        buf[0, t] = int(np.argmax(side.logits(prompt.row(buf))[0, t - 1]))
    return buf[0, T0:].tolist()
