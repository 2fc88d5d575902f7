"""Frozen, validated configuration dataclasses and preset loading with dotted overrides."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

POSITIONS = ("learned", "rope", "sinusoidal", "none")
NORMS = ("layernorm", "rmsnorm", "layernorm_nobias")
NORM_PLACEMENTS = ("pre", "sandwich", "post", "parallel")
QK_NORMS = ("none", "head", "proj", "rms")  # rms: per head, no weight, after RoPE, RoPE layers only
LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention", "linear_attention", "conv")
STATE_LAYER_TYPES = ("linear_attention", "conv")  # token mixers with a recurrent state, no keys/values:
#   Gated DeltaNet (models/delta_net.py, model.linear.*) and LFM2's short convolution (models/short_conv.py, model.conv.*)
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope", "proportional")
BLOCKS = ("standard", "gemma4", "gemma3n")  # the residual block's module: models/decoder.py | gemma4.py | gemma3n.py
ACTIVATIONS = ("gelu", "gelu_tanh", "silu", "relu", "relu2", "xielu")  # xielu: learned, MLPs only (Apertus)
ATTENTION_IMPLS = ("xla", "cudnn", "auto", "pallas")
DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "save_dots")
ROUTERS = ("mixtral", "qwen", "deepseek", "gemma4", "llama4")  # softmax top-k styles; deepseek: sigmoid, grouped; gemma4: qwen's
#   on a normed, scaled input, times a learned scale per expert (jaxformer/models/moe.py, models/gemma4.py); llama4:
#   the top-k logits' sigmoids scale the chosen experts' inputs (Llama 4)


def _choice(name: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {list(allowed)}")


def _positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _non_negative(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")


def _number(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")


def _flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")


def require_local(name: str, value: Any) -> None:
    """Runs read and write plain files: a URL (gs://, s3://, ...) is refused with what to do instead."""
    if isinstance(value, str) and re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", value):
        raise ValueError(f"{name}={value!r} is a URL; jaxformer reads and writes runs and data on a local or mounted "
                         "filesystem. Mount the bucket (e.g. gcsfuse, s3fs) or use a shared filesystem, and give its "
                         "path")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling, as transformers' `rope_parameters` / `rope_scaling` (modeling_rope_utils.py).

    linear: positions / factor. dynamic (NTK): the base grows with the longest position seen once it passes
    original_max_position_embeddings. llama3: wavelengths between the low/high frequency bounds are blended
    (Llama 3.1). yarn: NTK-by-parts with beta_fast/beta_slow and cos/sin times attention_factor. longrope
    (Phi-3): per-frequency short_factor / long_factor, the long ones once a sequence passes the original context.
    proportional (Gemma 4's full layers): default frequencies over the whole head for the first
    partial_rotary_factor share of the pairs, zero (no rotation) for the rest, all / factor. None fields take transformers' defaults for the type.
    """

    rope_type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None  # None: the model's max_seq_len
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    attention_factor: float | None = None  # yarn, longrope: None = derived from factor
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    mscale: float | None = None  # yarn (DeepSeek style attention_factor)
    mscale_all_dim: float | None = None  # yarn
    truncate: bool = True  # yarn: floor/ceil the correction range
    short_factor: tuple[float, ...] | None = None  # longrope, head_dim / 2 values
    long_factor: tuple[float, ...] | None = None  # longrope
    partial_rotary_factor: float = 1.0  # proportional: the share of frequency pairs that rotate

    def __post_init__(self) -> None:
        _choice("rope_scaling.rope_type", self.rope_type, ROPE_TYPES)
        _number("rope_scaling.partial_rotary_factor", self.partial_rotary_factor)
        if not 0 <= self.partial_rotary_factor <= 1:
            raise ValueError(f"rope_scaling.partial_rotary_factor must be in [0, 1], got {self.partial_rotary_factor}")
        _number("rope_scaling.factor", self.factor)
        if self.factor <= 0:
            raise ValueError(f"rope_scaling.factor must be > 0, got {self.factor}")
        for name in ("short_factor", "long_factor"):
            v = getattr(self, name)
            if v is not None:
                object.__setattr__(self, name, tuple(float(x) for x in v))
        if self.rope_type == "longrope" and (self.short_factor is None or self.long_factor is None):
            raise ValueError("rope_scaling type 'longrope' needs short_factor and long_factor (head_dim / 2 each)")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding (Su et al. 2021): the base, a base of its own for sliding layers, a scaling."""

    theta: float = 10000.0
    local_theta: float | None = None  # RoPE base of sliding-window layers (Gemma 3); None: theta
    scaling: RopeScaling | None = None  # frequency scaling (Llama 3.1 llama3, yarn, Phi-3 longrope...)
    nope_layers: tuple[int, ...] = ()  # layers whose attention takes no RoPE (SmolLM3, EXAONE 4's full layers)
    partial_factor: float = 1.0  # rotate the first head_dim * partial_factor dims of each head, pass the rest (GLM)

    def __post_init__(self) -> None:
        object.__setattr__(self, "nope_layers", tuple(sorted(set(self.nope_layers))))
        if isinstance(self.scaling, Mapping):
            object.__setattr__(self, "scaling", build_section(RopeScaling, self.scaling, "model.rope.scaling"))
        if self.scaling is not None and not isinstance(self.scaling, RopeScaling):
            raise ValueError(f"rope.scaling must be a mapping of RopeScaling fields or null, got {self.scaling!r}")
        _number("rope.theta", self.theta)
        if self.theta <= 0:
            raise ValueError(f"rope.theta must be > 0, got {self.theta}")
        if self.local_theta is not None:
            _number("rope.local_theta", self.local_theta)
            if self.local_theta <= 0:
                raise ValueError(f"rope.local_theta must be > 0 (or null), got {self.local_theta}")
        _number("rope.partial_factor", self.partial_factor)
        if not 0 < self.partial_factor <= 1:
            raise ValueError(f"rope.partial_factor must be in (0, 1] (the rotated share of each head), got "
                             f"{self.partial_factor}")


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """What softmax attention adds to q k^T / sqrt(d) v: biases, q/k norms, a window, another scale, a soft-cap."""

    qkv_bias: bool = False  # biases on q/k/v only (Qwen2); ModelConfig.use_bias puts them on every projection
    qk_norm: str = "none"  # RMSNorm of q and k: per head (Qwen3, Gemma 3) | over the whole projection (OLMo 2)
    sliding_window: int | None = None  # keys within the last W positions (self included) on sliding layers
    query_pre_attn_scalar: float | None = None  # scores scaled by this ** -0.5 (Gemma); None: head_dim
    logit_softcap: float | None = None  # scores -> cap * tanh(scores / cap) (Gemma 2)
    scale: float | None = None  # the factor on q.k itself (Granite's attention_multiplier); None: from the above
    qk_norm_after_rope: bool = False  # per-head q/k norms after RoPE instead of before (Hunyuan)
    sinks: bool = False  # a learned logit per head in each softmax's denominator (gpt-oss's attention sinks)
    global_head_dim: int | None = None  # full-attention layers' head dim (Gemma 4); None: head_dim
    global_kv_heads: int | None = None  # full-attention layers' kv heads (Gemma 4); None: n_kv_heads
    k_eq_v: bool = False  # full-attention layers have no v_proj: values are the key projection (Gemma 4)
    v_norm: bool = False  # values RMS-normalised per head, without a weight (Gemma 4)
    chunk_size: int | None = None  # chunked_attention layers: a query sees the keys of its own chunk of C positions
    temperature_floor: float | None = None  # NoPE layers' queries times 1 + temperature_scale * log(1 + floor((p + 1)
    temperature_scale: float = 0.1  # / temperature_floor)) at position p (Llama 4's attention temperature); None: off
    output_gate: bool = False  # q_proj also emits a gate per head; sigmoid(gate) multiplies the attention output
    #   before o_proj (Qwen3-Next, Qwen3.5's gated attention)

    def __post_init__(self) -> None:
        _flag("attention.qkv_bias", self.qkv_bias)
        for name in ("k_eq_v", "v_norm", "output_gate"):
            _flag(f"attention.{name}", getattr(self, name))
        for name in ("global_head_dim", "global_kv_heads", "chunk_size"):
            if getattr(self, name) is not None:
                _positive(f"attention.{name}", getattr(self, name))
        _number("attention.temperature_scale", self.temperature_scale)
        if self.temperature_floor is not None:
            _number("attention.temperature_floor", self.temperature_floor)
            if self.temperature_floor <= 0:
                raise ValueError(f"attention.temperature_floor must be > 0 (or null), got {self.temperature_floor}")
        _flag("attention.qk_norm_after_rope", self.qk_norm_after_rope)
        _flag("attention.sinks", self.sinks)
        if self.qk_norm_after_rope and self.qk_norm != "head":
            raise ValueError("attention.qk_norm_after_rope=true needs attention.qk_norm='head' (per-head norms)")
        _choice("attention.qk_norm", self.qk_norm, QK_NORMS)
        if self.sliding_window is not None:
            _positive("attention.sliding_window", self.sliding_window)
        for name in ("query_pre_attn_scalar", "logit_softcap", "scale"):
            v = getattr(self, name)
            if v is not None:
                _number(f"attention.{name}", v)
                if v <= 0:
                    raise ValueError(f"attention.{name} must be > 0 (or null), got {v}")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Mixture of Experts in the MLP slot (jaxformer/models/moe.py); n_experts = 0: a dense model."""

    n_experts: int = 0  # E routed SwiGLU experts in each sparse layer's MLP slot
    n_experts_per_token: int = 2  # top-k experts per token
    d_ff: int | None = None  # each routed expert's hidden size; None: the model's d_ff
    shared_d_ff: int = 0  # a dense SwiGLU every token also takes (Qwen2-MoE); 0: none
    shared_gate: bool = False  # the shared expert's output times sigmoid(x @ w), w [1, D] (Qwen2-MoE)
    router: str = "mixtral"  # mixtral: softmax over the top-k logits | qwen: softmax over all E, then top-k |
    #   deepseek: sigmoid scores + a correction bias choose (within the topk_group best of n_group groups), the
    #   chosen scores weigh (DeepSeek-V3, GLM-4.5)
    n_group: int = 1  # deepseek router: experts in n_group groups, ranked by their two best scores
    topk_group: int = 1  # deepseek router: the groups a token may choose from
    routed_scaling_factor: float = 1.0  # deepseek router: the routed output's factor
    bias_update_rate: float = 0.0  # deepseek router, training: after each step every correction bias moves by this
    #   rate toward balance (+ for under-, - for over-loaded experts), outside the gradient (DeepSeek-V3 2.1.2); 0 off
    norm_topk_prob: bool = True  # qwen router: renormalise the top-k probabilities to sum 1 (mixtral always does)
    every: int = 1  # layer i is sparse when (i + 1) % every == 0 (Qwen's decoder_sparse_step)
    dense_layers: tuple[int, ...] = ()  # layers kept dense whatever `every` says (Qwen's mlp_only_layers)
    aux_loss_coef: float = 0.001  # training loss + coef * load-balancing loss (Switch Transformer eq. 4)
    z_loss_coef: float = 0.0  # training loss + coef * router z-loss (ST-MoE eq. 5)
    capacity_factor: float | None = None  # None: dropless; else each expert takes ceil(cf * N * k / E) of N tokens
    swiglu_limit: float | None = None  # gpt-oss's clamped GLU: (clip(up, +-L) + 1) g sigmoid(alpha g), g = min(gate, L)
    swiglu_alpha: float = 1.702  # its alpha (None limit: act(gate) * up)

    def __post_init__(self) -> None:
        if not isinstance(self.n_experts, int) or isinstance(self.n_experts, bool) or self.n_experts < 0:
            raise ValueError(f"moe.n_experts must be an integer >= 0 (0: a dense model), got {self.n_experts!r}")
        object.__setattr__(self, "dense_layers", tuple(self.dense_layers))
        if self.n_experts == 0:
            set_ = [f"moe.{k}" for k, v in (("d_ff", self.d_ff), ("shared_d_ff", self.shared_d_ff),
                                            ("capacity_factor", self.capacity_factor)) if v not in (None, 0)]
            if set_:
                raise ValueError(f"{set_} are Mixture-of-Experts settings but moe.n_experts=0 (a dense model); set "
                                 "moe.n_experts or remove them")
            return
        _positive("moe.n_experts_per_token", self.n_experts_per_token)
        if self.n_experts_per_token > self.n_experts:
            raise ValueError(f"moe.n_experts_per_token={self.n_experts_per_token} exceeds moe.n_experts="
                             f"{self.n_experts}; each token takes at most every expert")
        if self.d_ff is not None:
            _positive("moe.d_ff", self.d_ff)
        if not isinstance(self.shared_d_ff, int) or self.shared_d_ff < 0:
            raise ValueError(f"moe.shared_d_ff must be an integer >= 0 (0: none), got {self.shared_d_ff!r}")
        for name in ("shared_gate", "norm_topk_prob"):
            _flag(f"moe.{name}", getattr(self, name))
        if self.shared_gate and not self.shared_d_ff:
            raise ValueError("moe.shared_gate=true needs a shared expert: set moe.shared_d_ff > 0")
        _choice("moe.router", self.router, ROUTERS)
        for name in ("n_group", "topk_group"):
            _positive(f"moe.{name}", getattr(self, name))
        _number("moe.routed_scaling_factor", self.routed_scaling_factor)
        if self.n_experts % self.n_group or self.topk_group > self.n_group:
            raise ValueError(f"moe.n_group={self.n_group} must divide n_experts={self.n_experts} and be >= "
                             f"moe.topk_group={self.topk_group}")
        _number("moe.bias_update_rate", self.bias_update_rate)
        if self.bias_update_rate < 0 or (self.bias_update_rate and self.router != "deepseek"):
            raise ValueError(f"moe.bias_update_rate={self.bias_update_rate} must be >= 0, and > 0 only with "
                             "router='deepseek' (the only router with a correction bias to move)")
        if self.router == "deepseek" and self.n_experts_per_token > self.topk_group * (self.n_experts // self.n_group):
            raise ValueError(f"moe.n_experts_per_token={self.n_experts_per_token} exceeds the experts of the "
                             f"moe.topk_group={self.topk_group} groups a token may choose from ({self.topk_group} x "
                             f"{self.n_experts // self.n_group}); raise topk_group or lower n_experts_per_token")
        if self.router == "deepseek" and self.n_experts // self.n_group < 2:
            raise ValueError("the deepseek router ranks each group by its two best experts: give every group at "
                             "least 2 (n_experts / n_group >= 2)")
        if self.router == "mixtral" and not self.norm_topk_prob:
            raise ValueError("moe.router='mixtral' always normalises over the top-k experts; for unnormalised top-k "
                             "probabilities use router='qwen' with norm_topk_prob=false")
        _positive("moe.every", self.every)
        for name in ("aux_loss_coef", "z_loss_coef"):
            _number(f"moe.{name}", getattr(self, name))
            if getattr(self, name) < 0:
                raise ValueError(f"moe.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("swiglu_limit", "swiglu_alpha"):
            v = getattr(self, name)
            if v is not None:
                _number(f"moe.{name}", v)
                if v <= 0:
                    raise ValueError(f"moe.{name} must be > 0, got {v}")
        if self.capacity_factor is not None:
            _number("moe.capacity_factor", self.capacity_factor)
            if self.capacity_factor <= 0:
                raise ValueError(f"moe.capacity_factor must be > 0 (or null for dropless routing), got "
                                 f"{self.capacity_factor}")


@dataclasses.dataclass(frozen=True)
class ScalesConfig:
    """Constant multipliers on the embedding, each residual branch and the logits (muP-style: Granite; Cohere's
    logit_scale). 1.0 leaves each alone."""

    embedding: float = 1.0  # token embeddings times this (Granite's embedding_multiplier)
    residual: float = 1.0  # each block's attention and MLP output times this before the residual add (Granite)
    logits: float = 1.0  # logits times this (Cohere's logit_scale; Granite's 1 / logits_scaling)

    def __post_init__(self) -> None:
        for name in ("embedding", "residual", "logits"):
            _number(f"scales.{name}", getattr(self, name))
            if getattr(self, name) <= 0:
                raise ValueError(f"scales.{name} must be > 0, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class AltUpConfig:
    """Alternating updates (Baykal et al. 2023, AltUp; Gemma 3n): the residual stream is `inputs` streams, a block
    runs on the active one, a learned map predicts the others before it and corrects them from its output."""

    inputs: int = 0  # streams (Gemma 3n: 4); 0: no AltUp
    active_idx: int = 0  # the stream blocks compute on
    coef_clip: float | None = 120.0  # prediction and correction coefficients clipped to +-this in every forward
    correct_scale: bool = True  # the active corrected stream times correct_output_scale before the per-layer input

    def __post_init__(self) -> None:
        if not isinstance(self.inputs, int) or isinstance(self.inputs, bool) or self.inputs < 0:
            raise ValueError(f"altup.inputs must be an integer >= 0 (0: none), got {self.inputs!r}")
        if self.inputs and not 0 <= self.active_idx < self.inputs:
            raise ValueError(f"altup.active_idx={self.active_idx} must be a stream index in [0, {self.inputs})")
        _flag("altup.correct_scale", self.correct_scale)
        if self.coef_clip is not None:
            _number("altup.coef_clip", self.coef_clip)


@dataclasses.dataclass(frozen=True)
class LatentConfig:
    """Multi-head latent attention (DeepSeek-V2 / V3, Kimi-K2; models/latent_attention.py): keys and values come
    from a shared low-rank latent of `kv_rank` dims that decoding caches instead of them, each head's q/k split into
    head_dim - rope_dim dims without position and rope_dim rotated ones (one rotated key shared by all heads)."""

    kv_rank: int = 0  # the latent's width (kv_lora_rank); 0: standard attention
    q_rank: int = 0  # queries through a rank-q_rank bottleneck with an RMSNorm (q_lora_rank); 0: one q_proj
    rope_dim: int = 0  # each head's rotated q/k dims (qk_rope_head_dim); the rest of head_dim is qk_nope_head_dim
    v_head_dim: int | None = None  # each head's value dims; None: head_dim - rope_dim
    bias: bool = False  # biases on q_a_proj, kv_a_proj_with_mqa and o_proj (DeepSeek's attention_bias)

    def __post_init__(self) -> None:
        for name in ("kv_rank", "q_rank", "rope_dim"):
            _non_negative(f"latent.{name}", getattr(self, name))
        if self.v_head_dim is not None:
            _positive("latent.v_head_dim", self.v_head_dim)
        _flag("latent.bias", self.bias)
        if not self.kv_rank and (self.q_rank or self.rope_dim or self.v_head_dim or self.bias):
            raise ValueError("latent.q_rank / rope_dim / v_head_dim / bias are latent-attention settings but "
                             "latent.kv_rank=0 (standard attention); set latent.kv_rank or remove them")
        if self.kv_rank and (not self.rope_dim or self.rope_dim % 2):
            raise ValueError(f"latent attention rotates rope_dim dims of each head: set latent.rope_dim to an even "
                             f"number > 0, got {self.rope_dim}")


@dataclasses.dataclass(frozen=True)
class LinearAttentionConfig:
    """Gated DeltaNet layers (Qwen3-Next, Qwen3.5; models/delta_net.py): linear attention whose decode state is a
    [value_heads, key_head_dim, value_head_dim] matrix per sequence instead of a growing KV cache. Its key_heads
    query/key heads are shared by value_heads / key_heads value heads each; q, k and v pass a causal depthwise
    convolution of conv_kernel taps first. Names follow transformers' linear_num_key_heads, linear_key_head_dim..."""

    key_heads: int = 0  # linear_num_key_heads; 0: no Gated DeltaNet layers
    value_heads: int = 0  # linear_num_value_heads (a multiple of key_heads)
    key_head_dim: int = 0  # linear_key_head_dim
    value_head_dim: int = 0  # linear_value_head_dim
    conv_kernel: int = 4  # linear_conv_kernel_dim: taps of the causal depthwise conv1d on q, k, v
    chunk_size: int = 64  # training's chunked form: tokens per chunk (how it runs, not what it computes)

    def __post_init__(self) -> None:
        for name in ("key_heads", "value_heads", "key_head_dim", "value_head_dim"):
            _non_negative(f"linear.{name}", getattr(self, name))
        _positive("linear.conv_kernel", self.conv_kernel)
        _positive("linear.chunk_size", self.chunk_size)
        sizes = (self.key_heads, self.value_heads, self.key_head_dim, self.value_head_dim)
        if any(sizes) and not all(sizes):
            raise ValueError(f"Gated DeltaNet layers need linear.key_heads, value_heads, key_head_dim and "
                             f"value_head_dim all > 0, got {sizes}")
        if self.key_heads and self.value_heads % self.key_heads:
            raise ValueError(f"linear.key_heads={self.key_heads} must divide linear.value_heads={self.value_heads} "
                             "(each query/key head serves a whole group of value heads)")


@dataclasses.dataclass(frozen=True)
class ShortConvConfig:
    """LFM2's gated short convolution layers (models/short_conv.py): in_proj to (b, c, x), b * x through a causal
    depthwise conv1d of `kernel` taps (conv_L_cache), times c, out_proj; decoding keeps the last kernel - 1 inputs."""

    kernel: int = 0  # conv_L_cache; 0: no short-convolution layers
    bias: bool = False  # conv_bias: biases on in_proj, the conv and out_proj

    def __post_init__(self) -> None:
        _non_negative("conv.kernel", self.kernel)
        _flag("conv.bias", self.bias)
        if self.bias and not self.kernel:
            raise ValueError("conv.bias is a short-convolution setting but conv.kernel=0; set conv.kernel or remove it")


# The model's sub-configs: ModelConfig field -> its class. Their fields are reached as model.<sub>.<field>.
SUBCONFIGS: dict[str, type] = {"rope": RopeConfig, "attention": AttentionConfig, "moe": MoEConfig,
                               "scales": ScalesConfig, "altup": AltUpConfig, "latent": LatentConfig,
                               "linear": LinearAttentionConfig, "conv": ShortConvConfig}
# Flat names of earlier versions (run directories, exported models, configs written before sub-configs) and
# their place now; every entry point (constructor, files, --model.X overrides) still takes them.
FLAT_NAMES: dict[str, tuple[str, str]] = {
    "rope_theta": ("rope", "theta"), "rope_local_theta": ("rope", "local_theta"), "rope_scaling": ("rope", "scaling"),
    "qkv_bias": ("attention", "qkv_bias"), "qk_norm": ("attention", "qk_norm"),
    "sliding_window": ("attention", "sliding_window"),
    "query_pre_attn_scalar": ("attention", "query_pre_attn_scalar"),
    "attn_logit_softcap": ("attention", "logit_softcap"),
    "n_experts": ("moe", "n_experts"), "n_experts_per_token": ("moe", "n_experts_per_token"),
    "moe_d_ff": ("moe", "d_ff"), "shared_expert_d_ff": ("moe", "shared_d_ff"),
    "shared_expert_gate": ("moe", "shared_gate"), "router": ("moe", "router"),
    "norm_topk_prob": ("moe", "norm_topk_prob"), "moe_every": ("moe", "every"), "dense_layers": ("moe", "dense_layers"),
    "router_aux_loss_coef": ("moe", "aux_loss_coef"), "router_z_loss_coef": ("moe", "z_loss_coef"),
    "capacity_factor": ("moe", "capacity_factor"),
}


def nest_flat_names(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Model fields with FLAT_NAMES moved into their sub-configs (merged over a sub-config given beside them)."""
    out = {k: v for k, v in kwargs.items() if k not in FLAT_NAMES}
    moved: dict[str, dict[str, Any]] = {}
    for flat, (sub, name) in FLAT_NAMES.items():
        if flat in kwargs:
            moved.setdefault(sub, {})[name] = kwargs[flat]
    for sub, fields in moved.items():
        given = out.get(sub)
        if given is None:
            out[sub] = fields
        elif isinstance(given, Mapping):
            out[sub] = {**given, **fields}
        else:
            out[sub] = dataclasses.replace(given, **fields)
    return out


def accepts_flat_names(cls: type) -> type:
    """Let cls(...) (and dataclasses.replace, which calls it) take FLAT_NAMES beside the sub-configs."""
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, **kwargs: Any) -> None:
        init(self, **nest_flat_names(kwargs))

    cls.__init__ = __init__
    return cls


# How a model runs, not what it is: these may change between a checkpoint and its resume or load.
EXECUTION_FIELDS = ("attention_impl", "compute_dtype", "remat", "scan_layers")


@accepts_flat_names
@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder-only LM shape and components; GPT-2 and Llama are two settings of these fields.

    The core shape is flat; RoPE, attention variants, Mixture of Experts and constant multipliers are sub-configs
    (model.rope.theta, model.attention.sliding_window, model.moe.n_experts, model.scales.logits), given as their
    dataclass or a mapping.
    """

    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: same as n_heads (MHA); 1: MQA; else GQA
    head_dim: int | None = None  # None: d_model // n_heads
    d_ff: int = 256
    max_seq_len: int = 256
    position: str = "rope"  # learned (GPT-2) | rope (Llama) | sinusoidal | none
    norm: str = "rmsnorm"  # layernorm (with bias) | rmsnorm
    norm_eps: float = 1e-5
    activation: str = "silu"
    gated_mlp: bool = True  # gated + silu = SwiGLU (Llama); plain + gelu_tanh = GPT-2
    use_bias: bool = False  # biases on every projection (GPT-2)
    tie_embeddings: bool = False
    attention_impl: str = "xla"
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    init_std: float = 0.02
    remat: str = "none"  # activation checkpointing per block: none | full | save_dots
    scan_layers: bool = False  # lax.scan over blocks: one compiled body however deep the model
    # --- the open families (docs/models.md): each field is read in one place of models/ and torch_ref/
    layer_types: tuple[str, ...] | None = None  # per layer full_attention | sliding_attention | chunked_attention |
    #   linear_attention | conv (LAYER_TYPES); None: all full,
    #   or all sliding when attention.sliding_window is set (Mistral)
    norm_placement: str = "pre"  # pre (Llama) | sandwich (Gemma 2/3: norms before and after) | post (OLMo 2)
    norm_unit_offset: bool = False  # RMSNorm scales by (1 + weight), in float32 (Gemma); weights start at 0
    scale_embedding: bool = False  # token embeddings times sqrt(d_model) (Gemma; the Transformer paper)
    final_logit_softcap: float | None = None  # logits -> cap * tanh(logits / cap) (Gemma 2)
    export_as: str | None = None  # the Hugging Face model_type to export to (set on import); None: inferred
    # --- Gemma 4 (models/gemma4.py): the block, per-layer inputs, layers that reuse earlier layers' keys/values
    block: str = "standard"  # standard: models/decoder.py Block | gemma4: models/gemma4.py Gemma4Block
    per_layer_dim: int = 0  # per-layer input width: every block adds a gated [P] embedding of its own (0: none)
    per_layer_vocab_size: int | None = None  # the per-layer embedding table's rows; None: vocab_size
    kv_shared_layers: int = 0  # the last N layers attend to the keys/values of the last earlier layer of their type
    double_wide_shared_mlp: bool = False  # the kv-shared layers' MLPs are 2 x d_ff wide (Gemma 4)
    # --- Gemma 3n (models/gemma3n.py, with the per-layer inputs and kv sharing above)
    laurel_rank: int = 0  # LAuReL: each block adds norm(x W_left W_right) of this rank to its attention branch
    activation_sparsity: tuple[float, ...] = ()  # per layer: the MLP gate keeps values above its mean + std *
    #   Phi^-1(s) (a Gaussian top-k, s the target sparsity; 0: dense); empty: none
    rope: RopeConfig = RopeConfig()
    attention: AttentionConfig = AttentionConfig()
    moe: MoEConfig = MoEConfig()
    scales: ScalesConfig = ScalesConfig()
    altup: AltUpConfig = AltUpConfig()
    latent: LatentConfig = LatentConfig()
    linear: LinearAttentionConfig = LinearAttentionConfig()
    conv: ShortConvConfig = ShortConvConfig()

    def __post_init__(self) -> None:
        for sub, cls in SUBCONFIGS.items():
            value = getattr(self, sub)
            if isinstance(value, Mapping):
                object.__setattr__(self, sub, build_section(cls, value, f"model.{sub}"))
            elif not isinstance(value, cls):
                raise ValueError(f"model.{sub} must be a mapping of {cls.__name__} fields, got {value!r}")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
            _positive(name, getattr(self, name))
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        _positive("n_kv_heads", self.n_kv_heads)
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ValueError(
                    f"n_heads={self.n_heads} must divide d_model={self.d_model} "
                    "(or set head_dim explicitly)"
                )
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        _positive("head_dim", self.head_dim)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads} "
                "(each kv head serves a whole group of query heads)"
            )
        _choice("position", self.position, POSITIONS)
        _choice("norm", self.norm, NORMS)
        _choice("activation", self.activation, ACTIVATIONS)
        _choice("attention_impl", self.attention_impl, ATTENTION_IMPLS)
        _choice("remat", self.remat, REMAT_POLICIES)
        _choice("param_dtype", self.param_dtype, DTYPES)
        _choice("compute_dtype", self.compute_dtype, DTYPES)
        for name in ("norm_eps", "init_std"):
            _number(name, getattr(self, name))
        for name in ("gated_mlp", "use_bias", "tie_embeddings", "scan_layers"):
            _flag(name, getattr(self, name))
        if self.position == "rope" and self.rotary_dim % 2:
            raise ValueError(f"rope needs an even number of rotated dims, got head_dim={self.head_dim} x "
                             f"rope.partial_factor={self.rope.partial_factor} = {self.rotary_dim}")
        if not 0 < self.norm_eps < 1:
            raise ValueError(f"norm_eps must be in (0, 1), got {self.norm_eps}")
        if self.init_std <= 0:
            raise ValueError(f"init_std must be > 0, got {self.init_std}")
        self._check_family_fields()
        self._check_moe_fields()
        self._check_block_fields()
        self._check_latent_fields()

    def _set(self, sub: str, **changes: Any) -> None:
        """Replace fields of a frozen sub-config during validation (one spelling per architecture)."""
        object.__setattr__(self, sub, dataclasses.replace(getattr(self, sub), **changes))

    def _check_moe_fields(self) -> None:
        moe = self.moe
        if moe.n_experts == 0:
            return
        if moe.d_ff == self.d_ff:
            self._set("moe", d_ff=None)  # one spelling: None is d_ff
        bad = [i for i in moe.dense_layers if not isinstance(i, int) or not 0 <= i < self.n_layers]
        if bad:
            raise ValueError(f"moe.dense_layers {bad} are not layer indices in [0, n_layers={self.n_layers})")
        if self.activation == "xielu":
            raise ValueError("activation='xielu' has learned parameters per MLP; Mixture-of-Experts layers take a "
                             "fixed activation (silu, gelu_tanh, ...)")
        if not self.gated_mlp:
            raise ValueError("Mixture-of-Experts layers are gated (SwiGLU) experts: set gated_mlp=true")
        if self.use_bias and moe.capacity_factor is not None:
            raise ValueError("biased experts (use_bias=true, gpt-oss) route dropless: set moe.capacity_factor=null")
        if not any(self.is_moe_layer(i) for i in range(self.n_layers)):
            raise ValueError(f"moe.n_experts={moe.n_experts} but no layer is sparse (moe.every={moe.every}, "
                             f"moe.dense_layers={list(moe.dense_layers)}); make at least one layer sparse")

    def _check_block_fields(self) -> None:
        _choice("block", self.block, BLOCKS)
        _flag("double_wide_shared_mlp", self.double_wide_shared_mlp)
        for name in ("per_layer_dim", "kv_shared_layers", "laurel_rank"):
            _non_negative(name, getattr(self, name))
        if self.per_layer_vocab_size is not None:
            _positive("per_layer_vocab_size", self.per_layer_vocab_size)
            if self.per_layer_vocab_size == self.vocab_size:
                object.__setattr__(self, "per_layer_vocab_size", None)  # one spelling: None is vocab_size
        attn = self.attention
        if attn.global_head_dim == self.head_dim:
            self._set("attention", global_head_dim=None)
        if attn.global_kv_heads == self.n_kv_heads:
            self._set("attention", global_kv_heads=None)
        if attn.global_kv_heads and self.n_heads % attn.global_kv_heads:
            raise ValueError(f"attention.global_kv_heads={attn.global_kv_heads} must divide n_heads={self.n_heads}")
        object.__setattr__(self, "activation_sparsity", tuple(float(v) for v in self.activation_sparsity))
        if self.activation_sparsity and (len(self.activation_sparsity) != self.n_layers
                                         or not all(0 <= v < 1 for v in self.activation_sparsity)):
            raise ValueError(f"activation_sparsity must give one value in [0, 1) per layer (n_layers={self.n_layers})"
                             f", got {list(self.activation_sparsity)}")
        if not any(self.activation_sparsity):
            object.__setattr__(self, "activation_sparsity", ())  # one spelling: no sparse layer
        shared = {k: v for k, v in (  # Gemma 4 and Gemma 3n
            ("per_layer_dim", self.per_layer_dim), ("kv_shared_layers", self.kv_shared_layers),
            ("per_layer_vocab_size", self.per_layer_vocab_size), ("attention.v_norm", attn.v_norm)) if v}
        gemma4 = {k: v for k, v in (
            ("double_wide_shared_mlp", self.double_wide_shared_mlp),
            ("attention.global_head_dim", self.attention.global_head_dim),
            ("attention.global_kv_heads", self.attention.global_kv_heads), ("attention.k_eq_v", attn.k_eq_v),
            ("moe.router", "gemma4" if self.moe.router == "gemma4" and self.moe.n_experts else None)) if v}
        gemma3n = {k: v for k, v in (("laurel_rank", self.laurel_rank), ("activation_sparsity", self.activation_sparsity),
                                     ("altup.inputs", self.altup.inputs)) if v}
        wrong = {"standard": {**shared, **gemma4, **gemma3n}, "gemma4": gemma3n, "gemma3n": gemma4}[self.block]
        if wrong:
            owner = "Gemma 4 / Gemma 3n" if self.block == "standard" else ("Gemma 3n" if self.block == "gemma4" else
                                                                          "Gemma 4")
            raise ValueError(f"{sorted(wrong)} are {owner} block settings but block={self.block!r}: set the block "
                             "they belong to or remove them")
        if self.block == "standard":
            return
        # gemma4 / gemma3n: sandwich norms scaled by their weight, RoPE, per-head q/k norms, no biases
        if self.norm_placement != "sandwich" or self.norm_unit_offset:
            raise ValueError(f"block={self.block!r} has sandwich norms scaled by their weight: set "
                             "norm_placement='sandwich' and norm_unit_offset=false")
        if self.position != "rope" or self.norm != "rmsnorm" or not self.gated_mlp or self.use_bias \
                or attn.qk_norm != "head" or attn.qkv_bias:
            raise ValueError(f"block={self.block!r} is a RoPE model with RMSNorm, gated MLPs, per-head q/k norms and "
                             "no biases: set position='rope', norm='rmsnorm', gated_mlp=true, use_bias=false, "
                             "attention.qk_norm='head', attention.qkv_bias=false")
        if self.block == "gemma4" and self.moe.n_experts and (
                self.moe.router != "gemma4" or self.moe.every != 1 or self.moe.dense_layers or self.moe.shared_d_ff
                or self.moe.capacity_factor is not None):
            raise ValueError("block='gemma4' puts a MoE beside the dense MLP of every layer, routed by its own router: "
                             "set moe.router='gemma4', moe.every=1, no moe.dense_layers, moe.shared_d_ff=0, "
                             "moe.capacity_factor=null")
        if self.block == "gemma3n" and (self.moe.n_experts or not self.per_layer_dim or not self.laurel_rank
                                        or not self.altup.inputs):
            raise ValueError("block='gemma3n' has per-layer inputs, LAuReL and AltUp and no experts: set "
                             "per_layer_dim, laurel_rank and altup.inputs > 0, moe.n_experts=0")
        if self.kv_shared_layers >= self.n_layers:
            raise ValueError(f"kv_shared_layers={self.kv_shared_layers} must leave at least one of n_layers="
                             f"{self.n_layers} layers computing its own keys and values")
        first = self.n_layers - self.kv_shared_layers
        missing = sorted({self.layer_type(i) for i in range(first, self.n_layers)}
                         - {self.layer_type(i) for i in range(first)})
        if missing:
            raise ValueError(f"kv-shared layers of type {missing} have no earlier layer of that type to take keys and "
                             f"values from; lower kv_shared_layers={self.kv_shared_layers}")
        if self.scan_layers:
            raise ValueError(f"block={self.block!r} layers differ (per-layer inputs, shared keys/values): set "
                             "scan_layers=false (remat works)")

    def _check_latent_fields(self) -> None:
        lat = self.latent
        if not lat.kv_rank:
            return
        if lat.v_head_dim == self.head_dim - lat.rope_dim:
            self._set("latent", v_head_dim=None)  # one spelling: None is the nope dims
        if lat.rope_dim >= self.head_dim:
            raise ValueError(f"latent.rope_dim={lat.rope_dim} must be below head_dim={self.head_dim} (head_dim is "
                             "the rotated plus the unrotated q/k dims)")
        attn = self.attention
        other = {k: v for k, v in (
            ("n_kv_heads", self.n_kv_heads != self.n_heads), ("block", self.block != "standard"),
            ("position", self.position != "rope"), ("rope.partial_factor", self.rope.partial_factor != 1.0),
            ("attention.qk_norm", attn.qk_norm != "none"), ("attention.qkv_bias", attn.qkv_bias),
            ("attention.sinks", attn.sinks), ("attention.logit_softcap", attn.logit_softcap is not None),
            ("attention.chunk_size", attn.chunk_size is not None), ("attention.output_gate", attn.output_gate),
            ("use_bias", self.use_bias)) if v}
        if other:
            raise ValueError(f"latent attention (latent.kv_rank={lat.kv_rank}) has one key per head from a shared "
                             f"latent, RoPE on latent.rope_dim dims and latent.bias for its biases; {sorted(other)} "
                             "do not apply to it: set n_kv_heads=n_heads, block='standard', position='rope', "
                             "rope.partial_factor=1, and leave the others at their defaults")

    @property
    def v_head_dim(self) -> int:
        """Each head's value dims: latent.v_head_dim (or head_dim - rope_dim) with latent attention, else head_dim."""
        lat = self.latent
        return (lat.v_head_dim or self.head_dim - lat.rope_dim) if lat.kv_rank else self.head_dim

    def layer_cache_dims(self, i: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """(heads, dims) of block i's two cache entries: keys and values, or with latent attention the normed latent
        (1, kv_rank) and the rotated shared key (1, rope_dim), which is all an absorbed decode step reads."""
        if self.layer_type(i) in STATE_LAYER_TYPES:  # a recurrent state per sequence instead (cache.layer_states)
            return (0, 0), (0, 0)
        if self.latent.kv_rank:
            return (1, self.latent.kv_rank), (1, self.latent.rope_dim)
        kv = (self.layer_kv_heads(i), self.layer_head_dim(i))
        return kv, kv

    def type_head_dim(self, layer_type: str) -> int:
        """A layer type's head dim: attention.global_head_dim for full attention when set (Gemma 4), else head_dim."""
        g = self.attention.global_head_dim
        return g if g is not None and layer_type == "full_attention" else self.head_dim

    def layer_head_dim(self, i: int) -> int:
        """Block i's head dim (its layer type's)."""
        return self.type_head_dim(self.layer_type(i))

    def layer_kv_heads(self, i: int) -> int:
        """Block i's kv heads: attention.global_kv_heads on full-attention layers when set, else n_kv_heads."""
        g = self.attention.global_kv_heads
        return g if g is not None and self.layer_type(i) == "full_attention" else self.n_kv_heads

    def layer_d_ff(self, i: int) -> int:
        """Block i's MLP width: 2 x d_ff on kv-shared layers with double_wide_shared_mlp (Gemma 4), else d_ff."""
        return 2 * self.d_ff if self.double_wide_shared_mlp and self.kv_source(i) != i else self.d_ff

    def kv_source(self, i: int) -> int:
        """The layer whose keys and values block i attends to: itself, or for the last kv_shared_layers layers
        the last layer before them of the same type (Gemma 3n / 4); the one place that reads kv_shared_layers."""
        first = self.n_layers - self.kv_shared_layers
        if i < first:
            return i
        return max(j for j in range(first) if self.layer_type(j) == self.layer_type(i))

    @property
    def n_cache_layers(self) -> int:
        """Layers that keep keys/values in a cache (the first n_layers - kv_shared_layers; cache index = layer)."""
        return self.n_layers - self.kv_shared_layers

    def kv_bytes_per_token(self, itemsize: int) -> int:
        """Cache bytes one token takes over all layers, keys and values."""
        return sum((k[0] * k[1] + v[0] * v[1]) * itemsize
                   for k, v in map(self.layer_cache_dims, range(self.n_cache_layers)))

    def is_moe_layer(self, i: int) -> bool:
        """Whether block i's MLP slot is a Mixture of Experts (the one place that reads moe.every / dense_layers)."""
        moe = self.moe
        return moe.n_experts > 0 and (i + 1) % moe.every == 0 and i not in moe.dense_layers

    @property
    def expert_d_ff(self) -> int:
        """F of each routed expert: moe.d_ff, else d_ff."""
        return self.moe.d_ff or self.d_ff

    def _check_family_fields(self) -> None:
        _choice("norm_placement", self.norm_placement, NORM_PLACEMENTS)
        for name in ("norm_unit_offset", "scale_embedding"):
            _flag(name, getattr(self, name))
        if self.final_logit_softcap is not None:
            _number("final_logit_softcap", self.final_logit_softcap)
            if self.final_logit_softcap <= 0:
                raise ValueError(f"final_logit_softcap must be > 0 (or null), got {self.final_logit_softcap}")
        bad = [i for i in self.rope.nope_layers if not isinstance(i, int) or not 0 <= i < self.n_layers]
        if bad:
            raise ValueError(f"rope.nope_layers {bad} are not layer indices in [0, n_layers={self.n_layers})")
        if self.rope.nope_layers and self.position != "rope":
            raise ValueError(f"rope.nope_layers is set but position={self.position!r}: only RoPE models have layers "
                             "without it")
        attn = self.attention
        if attn.query_pre_attn_scalar is not None and attn.query_pre_attn_scalar == self.head_dim:
            self._set("attention", query_pre_attn_scalar=None)  # the default scale, said one way
        if self.layer_types is not None:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
            for t in self.layer_types:
                _choice("layer_types[i]", t, LAYER_TYPES)
            if len(self.layer_types) != self.n_layers:
                raise ValueError(f"layer_types has {len(self.layer_types)} entries for n_layers={self.n_layers}; "
                                 "give one per layer")
            if "sliding_attention" in self.layer_types and attn.sliding_window is None:
                raise ValueError("layer_types has sliding_attention layers but attention.sliding_window is not set")
            if "chunked_attention" in self.layer_types and attn.chunk_size is None:
                raise ValueError("layer_types has chunked_attention layers but attention.chunk_size is not set")
            # one spelling per architecture: uniform layer types are said by attention.sliding_window alone
            if set(self.layer_types) == {"sliding_attention"}:
                object.__setattr__(self, "layer_types", None)
            elif set(self.layer_types) == {"full_attention"}:
                object.__setattr__(self, "layer_types", None)
                self._set("attention", sliding_window=None)
        if attn.chunk_size is not None and "chunked_attention" not in (self.layer_types or ()):
            self._set("attention", chunk_size=None)  # one spelling: no chunked layer, no chunk
        types = set(self.layer_types or ())
        for kind, sub, field, value in (("linear_attention", "linear", "key_heads", self.linear.key_heads),
                                        ("conv", "conv", "kernel", self.conv.kernel)):
            if kind in types and not value:
                raise ValueError(f"layer_types has {kind} layers but {sub}.{field}=0: set model.{sub}.* for them")
            if value and kind not in types:
                raise ValueError(f"model.{sub}.{field}={value} but no layer is of type {kind!r}: list them in "
                                 f"layer_types or remove model.{sub}.*")
        if types & set(STATE_LAYER_TYPES):
            if types <= set(STATE_LAYER_TYPES):
                raise ValueError(f"layer_types has no attention layer ({sorted(types)}); hybrid models put at least "
                                 "one attention layer among their linear_attention / conv layers")
            if self.block != "standard" or self.latent.kv_rank or self.kv_shared_layers:
                raise ValueError("linear_attention / conv layers go in the standard block, beside softmax attention "
                                 "layers (block='standard', no latent attention, no kv sharing)")

    def layer_type(self, i: int) -> str:
        """Block i's token mixer: full / sliding / chunked softmax attention, linear_attention (Gated DeltaNet) or
        conv (LFM2's short convolution); the one place that reads layer_types."""
        if self.layer_types is not None:
            return self.layer_types[i]
        return "full_attention" if self.attention.sliding_window is None else "sliding_attention"

    def layer_rope(self, i: int) -> str | None:
        """Which RoPE table block i rotates by (its layer type's: sliding layers may have their own base), or None
        for no RoPE (a NoPE layer, or a model without RoPE); the one place that reads rope.nope_layers."""
        if self.position != "rope" or i in self.rope.nope_layers or self.layer_type(i) in STATE_LAYER_TYPES:
            return None
        return self.layer_type(i)

    @property
    def has_state_layers(self) -> bool:
        """Whether some block mixes tokens with a recurrent state (linear_attention / conv) instead of attention."""
        return bool(set(self.layer_types or ()) & set(STATE_LAYER_TYPES))

    def layer_chunk(self, i: int) -> int | None:
        """Block i's attention chunk (keys of the query's own chunk of C positions, causal), or None."""
        return self.attention.chunk_size if self.layer_type(i) == "chunked_attention" else None

    def layer_window(self, i: int) -> int | None:
        """Block i's sliding window (keys t - W < s <= t), or None for full causal attention."""
        return self.attention.sliding_window if self.layer_type(i) == "sliding_attention" else None

    @property
    def rope_switch_len(self) -> int | None:
        """Where longrope's factors switch (its original context), at which generation re-encodes; else None."""
        s = self.rope.scaling
        if s is None or s.rope_type != "longrope" or self.position != "rope":
            return None
        return s.original_max_position_embeddings or self.max_seq_len

    def layer_attention_scale(self, i: int) -> float:
        """The factor on q·k in block i: attention.scale (Granite), else attention.query_pre_attn_scalar ** -0.5
        (Gemma), else the block's head dim ** -0.5 (Gemma 4's full layers have heads of their own size)."""
        if self.attention.scale is not None:
            return self.attention.scale
        scale = (self.attention.query_pre_attn_scalar or self.layer_head_dim(i)) ** -0.5
        s = self.rope.scaling
        if self.latent.kv_rank and s is not None and s.rope_type == "yarn" and s.mscale_all_dim:
            scale *= (0.1 * s.mscale_all_dim * math.log(s.factor) + 1.0) ** 2 if s.factor > 1 else 1.0  # DeepSeek
        return scale

    @property
    def rotary_dim(self) -> int:
        """How many of each head's dims RoPE rotates (the first ones): head_dim x rope.partial_factor (latent
        attention: its latent.rope_dim, the last ones)."""
        if self.latent.kv_rank:
            return self.latent.rope_dim
        return int(self.head_dim * self.rope.partial_factor)

    def type_rotary_dim(self, layer_type: str) -> int:
        """rotary_dim for a layer type's head dim (Gemma 4's full layers have heads of their own size); latent
        attention rotates latent.rope_dim dims."""
        if self.latent.kv_rank:
            return self.latent.rope_dim
        return int(self.type_head_dim(layer_type) * self.rope.partial_factor)

    @classmethod
    def gpt2(cls, **overrides: Any) -> "ModelConfig":
        """GPT-2 family: learned positions, LayerNorm, GELU(tanh) MLP, biases, tied head."""
        base = dict(position="learned", norm="layernorm", activation="gelu_tanh",
                    gated_mlp=False, use_bias=True, tie_embeddings=True)
        return cls(**{**base, **overrides})

    @classmethod
    def llama(cls, **overrides: Any) -> "ModelConfig":
        """Llama family: RoPE, RMSNorm, SwiGLU, no biases."""
        base = dict(position="rope", norm="rmsnorm", activation="silu",
                    gated_mlp=True, use_bias=False)
        return cls(**{**base, **overrides})

    @property
    def family(self) -> str | None:
        """The Hugging Face model_type these fields read as (export_as when set), or None when none fits.

        The name only: jaxformer.interop checks, field by field, that the architecture can express them.
        """
        if self.export_as is not None:
            return self.export_as
        if "conv" in (self.layer_types or ()):
            return "lfm2"
        if "linear_attention" in (self.layer_types or ()):
            return "qwen3_5_moe_text" if self.moe.n_experts else "qwen3_5_text"
        if (self.position, self.norm, self.gated_mlp, self.use_bias) == ("learned", "layernorm", False, True) \
                and self.n_kv_heads == self.n_heads and self.head_dim * self.n_heads == self.d_model:
            return "gpt2"
        if (self.position, self.norm, self.gated_mlp) != ("rope", "rmsnorm", True):
            return None
        attn = self.attention
        if self.moe.n_experts:
            if attn.qk_norm == "head":
                return "qwen3_moe"
            return "qwen2_moe" if attn.qkv_bias or self.moe.shared_d_ff else "mixtral"
        if self.norm_unit_offset:
            return {"sandwich": "gemma3_text" if attn.qk_norm == "head" else "gemma2"}.get(self.norm_placement, "gemma")
        if self.norm_placement == "post":
            return "olmo2"
        if attn.qk_norm == "head":
            return "qwen3"
        if attn.qkv_bias:
            return "qwen2"
        if attn.sliding_window is not None:
            return "mistral"
        return "llama" if self.activation == "silu" else None

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def architecture(self) -> dict[str, Any]:
        """The fields that define the parameters and the function they compute (EXECUTION_FIELDS left out), sub-
        config fields by dotted name ("moe.n_experts"), so that a difference names the one field that differs."""
        out = {}
        for k, v in self.to_dict().items():
            if k in SUBCONFIGS:
                out.update({f"{k}.{name}": value for name, value in v.items()})
            elif k not in EXECUTION_FIELDS:
                out[k] = v
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        """The config from a mapping: sub-configs nested or by FLAT_NAMES (what earlier versions wrote)."""
        return build_section(cls, nest_flat_names(d), "model")


ENCDEC_POSITIONS = ("sinusoidal", "learned")
MARIAN_ACTIVATIONS = ("gelu", "gelu_tanh", "silu", "relu")  # what transformers' Marian can express


@accepts_flat_names
@dataclasses.dataclass(frozen=True)
class EncDecConfig(ModelConfig):
    """Encoder-decoder Transformer (Vaswani et al. 2017): n_encoder_layers encoder blocks, n_layers decoder blocks.

    A model section with `n_encoder_layers` describes one (see model_config_from_dict). It is a ModelConfig, so
    the decoder-only model's attention, MLP and norm layers read it unchanged. The defaults are the paper's
    base architecture: post-LN, sinusoidal positions, ReLU MLP with biases, embeddings scaled by sqrt(d_model),
    one source/target table tied to the output projection.
    """

    n_encoder_layers: int = 2
    position: str = "sinusoidal"  # sinusoidal (the paper, Marian) | learned
    norm: str = "layernorm"
    activation: str = "relu"
    gated_mlp: bool = False
    use_bias: bool = True
    tie_embeddings: bool = True  # output projection = the target embedding table
    post_norm: bool = True  # x = norm(x + f(x)) (the paper, Marian); False: pre-LN x + f(norm(x)), final norms
    scale_embedding: bool = True  # token embeddings times sqrt(d_model) (the paper, section 3.4)
    share_embeddings: bool = True  # one table for source and target tokens (a joint vocabulary)
    logits_bias: bool = False  # a learned bias on the logits (Marian's final_logits_bias)
    pointer_generator: bool = False  # a copy head mixing in the source's tokens (See et al. 2017; encdec.py)
    dropout: float = 0.0  # on embeddings and every sublayer output, training only (the paper: 0.1)
    init_std: float | None = None  # None: d_model ** -0.5 (Xavier-like; GPT-2's 0.02 stalls small models)
    pad_id: int = 0
    decoder_start_id: int = 0  # the decoder's first input (Marian uses the pad id)
    eos_id: int = 2

    def __post_init__(self) -> None:
        moe = self.moe
        if (moe.get("n_experts") if isinstance(moe, Mapping) else getattr(moe, "n_experts", 0)):
            raise ValueError("Mixture-of-Experts layers (moe.n_experts > 0) are a decoder-only option; the "
                             "encoder-decoder needs moe.n_experts=0")
        if self.init_std is None and isinstance(self.d_model, int) and self.d_model > 0:
            object.__setattr__(self, "init_std", self.d_model ** -0.5)
        super().__post_init__()
        _positive("n_encoder_layers", self.n_encoder_layers)
        if self.position not in ENCDEC_POSITIONS:
            raise ValueError(f"position={self.position!r} is not supported by the encoder-decoder; choose one of "
                             f"{list(ENCDEC_POSITIONS)}")
        for name in ("post_norm", "scale_embedding", "share_embeddings", "logits_bias", "pointer_generator"):
            _flag(name, getattr(self, name))
        _number("dropout", self.dropout)
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        for name in ("pad_id", "decoder_start_id", "eos_id"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < self.vocab_size:
                raise ValueError(f"{name} must be a token id in [0, vocab_size={self.vocab_size}), got {v!r}")
        if self.remat != "none" or self.scan_layers:
            raise ValueError("remat and scan_layers are decoder-only options; the encoder-decoder needs "
                             "remat='none' and scan_layers=false")

    @property
    def family(self) -> str | None:
        """'marian' when transformers' MarianMTModel has the same architecture, else None."""
        return None if self.marian_mismatches()[0] else "marian"

    def marian_mismatches(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(fields that MarianMTModel cannot express, with their values; what Marian needs of them)."""
        wants: dict[str, Any] = dict(position="sinusoidal", norm="layernorm", norm_eps=1e-5, post_norm=True,
                                     gated_mlp=False, use_bias=True, pointer_generator=False, n_kv_heads=self.n_heads)
        differ = {k: getattr(self, k) for k, v in wants.items() if getattr(self, k) != v}
        if self.head_dim * self.n_heads != self.d_model:
            differ["head_dim"] = self.head_dim
        if self.activation not in MARIAN_ACTIVATIONS:
            differ["activation"] = self.activation
        wants.update(head_dim="d_model / n_heads", activation=list(MARIAN_ACTIVATIONS))
        return differ, wants


def model_config_from_dict(d: Mapping[str, Any]) -> ModelConfig:
    """A model section as its config: EncDecConfig when it has `n_encoder_layers`, else ModelConfig.

    This is the one place that decides between the decoder-only LM and the encoder-decoder; everything
    downstream (model class, training loop, evaluation, Hugging Face export) follows the config's type.
    """
    d = nest_flat_names(d)
    if "n_encoder_layers" in d:
        return build_section(EncDecConfig, d, "model")
    encdec_only = sorted(set(d) & (ENCDEC_FIELDS - set(MODEL_FIELDS)))
    if encdec_only:
        raise ValueError(f"model key(s) {encdec_only} are encoder-decoder settings: add model.n_encoder_layers "
                         "to describe an encoder-decoder, or remove them")
    return build_section(ModelConfig, d, "model")


def build_section(cls: type, d: Mapping[str, Any], section: str):
    """The frozen dataclass `cls` from a config section's mapping; unknown keys are named in the error."""
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(valid))
    if unknown:
        raise ValueError(f"unknown {section} key(s) {unknown}; valid keys: {valid}")
    return cls(**d)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where text comes from, where its tokenizer and token shards live, how windows are cut."""

    sources: tuple[str, ...] = ("stdlib",)  # files, directories, JSONL; "stdlib" = Python's own .py files
    jsonl_field: str = "text"
    data_dir: str = "data/stdlib"  # tokenizer.json + shards; built on first use when missing
    tokenizer: str | None = None  # an existing tokenizer.json to use instead of training one
    val_fraction: float = 0.02
    seq_len: int = 256
    packed: bool = True  # segment ids + per-document positions; False = plain fixed windows
    seed: int = 0
    # "DIR:WEIGHT,DIR:WEIGHT,...": train on several prepared directories, windows drawn by weight (sources and
    # data_dir are then unused); YAML may give a mapping {DIR: WEIGHT}
    mixture: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.mixture, Mapping):
            object.__setattr__(self, "mixture", ",".join(f"{d}:{w}" for d, w in self.mixture.items()))
        if self.mixture is not None:
            for d, _ in self.mixture_weights():
                require_local("data.mixture", d)
        if isinstance(self.sources, (str, list)):
            object.__setattr__(self, "sources", (self.sources,) if isinstance(self.sources, str) else tuple(self.sources))
        if not self.sources:
            raise ValueError("data.sources is empty: give files, directories, JSONL, or 'stdlib'")
        _positive("seq_len", self.seq_len)
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        for name in ("data_dir", "tokenizer"):
            require_local(f"data.{name}", getattr(self, name))
        for source in self.sources:
            require_local("data.sources", source)

    def mixture_weights(self) -> list[tuple[str, float]]:
        """[(directory, weight)] of data.mixture, weights summing to 1; [] without a mixture."""
        if self.mixture is None:
            return []
        pairs = []
        for item in str(self.mixture).split(","):
            d, sep, w = item.strip().rpartition(":")
            try:
                weight = float(w)
            except ValueError:
                weight = -1.0
            if not sep or not d or not weight > 0:
                raise ValueError(f"data.mixture entry {item!r} must be DIR:WEIGHT with a weight > 0, e.g. "
                                 "--data.mixture=data/web:0.7,data/code:0.3")
            pairs.append((d, weight))
        if len({d for d, _ in pairs}) < len(pairs):
            raise ValueError(f"data.mixture names a directory twice: {self.mixture!r}")
        total = sum(w for _, w in pairs)
        return [(d, w / total) for d, w in pairs]


SCHEDULES = ("cosine", "linear", "constant")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation, checkpointing, evaluation and logging of one run."""

    run_dir: str = "runs/default"
    steps: int = 1000
    batch_size: int = 16  # sequences per optimizer step (all micro-batches together)
    grad_accum: int = 1  # micro-batches per step; batch_size must be a multiple
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio (cosine / linear)
    warmup_steps: int = 100
    schedule: str = "cosine"
    weight_decay: float = 0.1  # not applied to norms, biases or embeddings
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # global-norm clipping; 0 disables
    z_loss: float = 0.0  # PaLM's auxiliary log(Z)^2 weight; 0 disables
    loss_chunk: int = 0  # > 0: the loss from hidden states, this many tokens' logits at a time (0: all at once)
    seed: int = 0
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 20
    ckpt_every: int = 200
    keep_last: int = 3  # plus the best checkpoint by validation loss
    async_checkpoint: bool = True
    peak_tflops: float | None = None  # for MFU; None = measured fp32 matmul rate (CPU) or the GPU's spec
    sample_tokens: int = 200
    sample_prompt: str = "def "
    sample_temperature: float = 0.8
    sample_top_k: int = 40
    parity_every: int = 0  # every N steps, logits max|diff| and KL vs torch_ref on a fixed batch (0: off)
    spike_threshold: float = 0.0  # skip a step whose loss or grad norm passes this x the recent median (0: off)
    spike_patience: int = 3  # consecutive skipped steps that roll the run back to a checkpoint before them

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "log_every", "eval_every", "eval_batches",
                     "ckpt_every", "keep_last"):
            _positive(name, getattr(self, name))
        _number("spike_threshold", self.spike_threshold)
        if self.spike_threshold != 0 and not self.spike_threshold > 1:
            raise ValueError(f"spike_threshold must be 0 (off) or > 1 (a spike is a loss or gradient norm that many "
                             f"times the recent median, e.g. 3), got {self.spike_threshold}")
        if not isinstance(self.spike_patience, int) or isinstance(self.spike_patience, bool) or self.spike_patience < 1:
            raise ValueError(f"spike_patience must be an integer >= 1 (the consecutive spikes that roll the run back "
                             f"to a checkpoint), got {self.spike_patience!r}")
        if not isinstance(self.loss_chunk, int) or isinstance(self.loss_chunk, bool) or self.loss_chunk < 0:
            raise ValueError(f"loss_chunk must be a token count >= 0 (e.g. 4096: the loss takes that many tokens' "
                             f"logits at a time; 0 takes them all at once), got {self.loss_chunk!r}")
        if not isinstance(self.parity_every, int) or isinstance(self.parity_every, bool) or self.parity_every < 0:
            raise ValueError(f"parity_every must be a step count >= 0 (0 turns the torch_ref check off), "
                             f"got {self.parity_every!r}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"grad_accum={self.grad_accum} must divide batch_size={self.batch_size}")
        _choice("schedule", self.schedule, SCHEDULES)
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"need lr > 0 and 0 <= min_lr_ratio <= 1, got lr={self.lr}, "
                             f"min_lr_ratio={self.min_lr_ratio}")
        if self.warmup_steps < 0 or self.grad_clip < 0 or self.z_loss < 0 or self.weight_decay < 0:
            raise ValueError("warmup_steps, grad_clip, z_loss and weight_decay must be >= 0")
        require_local("train.run_dir", self.run_dir)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes; one may be -1 to take the remaining devices (see jaxformer.sharding)."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    expert: int = 1  # expert parallelism: MoE experts split over it; a data axis elsewhere
    context: int = 1  # context parallelism: each sequence split over it (ring attention)

    def __post_init__(self) -> None:
        for name in ("data", "fsdp", "tensor", "expert", "context"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or (v < 1 and v != -1):
                raise ValueError(f"mesh.{name} must be a positive integer or -1, got {v!r}")


SEQ2SEQ_TASKS = ("code2doc",)
SEQ2SEQ_SPLITS = ("train", "val", "test")


@dataclasses.dataclass(frozen=True)
class Seq2SeqConfig:
    """Source -> target pairs for an encoder-decoder run: data, lengths, loss, decoding and evaluation."""

    data_dir: str = "data/code2doc"  # {train,val,test}.jsonl of {"source", "target"}; tokenizer.json beside them
    task: str | None = "code2doc"  # built into data_dir when its files are missing; null: bring your own JSONL
    tokenizer: str | None = None  # an existing tokenizer.json instead of one trained on the train split
    max_source_len: int = 256  # tokens, EOS included; longer sources are truncated
    max_target_len: int = 32  # tokens, EOS included; also the decoding limit
    split_identifiers: bool = False  # sources: identifiers as lower-case words (get_event_loop -> get event loop)
    truecase_targets: bool = False  # targets: a capitalised first word in its in-sentence form ("Return" -> " return")
    min_bucket: int = 16  # batches are padded to a power-of-two multiple of this (one compile per bucket)
    label_smoothing: float = 0.1  # the paper's epsilon_ls
    beam_size: int = 4
    length_penalty: float = 1.0  # beam score = sum log p / length ** length_penalty
    eval_split: str = "test"  # decoded and scored (BLEU, ROUGE) at the end of training
    eval_batch_size: int = 64
    eval_max_examples: int | None = None  # None: the whole split
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("max_source_len", "max_target_len", "min_bucket", "beam_size", "eval_batch_size"):
            _positive(name, getattr(self, name))
        if self.eval_max_examples is not None:
            _positive("eval_max_examples", self.eval_max_examples)
        for name in ("split_identifiers", "truecase_targets"):
            _flag(name, getattr(self, name))
        if self.task is not None:
            _choice("task", self.task, SEQ2SEQ_TASKS)
        _choice("eval_split", self.eval_split, SEQ2SEQ_SPLITS)
        for name in ("label_smoothing", "length_penalty"):
            _number(name, getattr(self, name))
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.length_penalty < 0:
            raise ValueError(f"length_penalty must be >= 0, got {self.length_penalty}")
        if self.max_target_len < 2:
            raise ValueError(f"max_target_len must be at least 2 (a token and EOS), got {self.max_target_len}")
        for name in ("data_dir", "tokenizer"):
            require_local(f"seq2seq.{name}", getattr(self, name))


# Sections of a run configuration, each a frozen dataclass.
# The model section is a ModelConfig or an EncDecConfig (model_config_from_dict); seq2seq is read by encoder-decoder runs.
SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "mesh": MeshConfig,
                             "seq2seq": Seq2SeqConfig}
MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig))
ENCDEC_FIELDS = frozenset(f.name for f in dataclasses.fields(EncDecConfig))


def preset_path(name_or_path: str | Path) -> Path:
    """A config file path, or the name of a preset in configs/ (e.g. 'tiny', 'gpt2-124m')."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml", ".json") and p.exists():
        return p
    for cand in (CONFIG_DIR / f"{name_or_path}.yaml", CONFIG_DIR / f"{name_or_path}.yml"):
        if cand.exists():
            return cand
    names = sorted(q.stem for q in CONFIG_DIR.glob("*.yaml"))
    raise FileNotFoundError(f"no config file or preset named {str(name_or_path)!r}; presets: {names}")


def parse_value(text: str) -> Any:
    """A command-line value as YAML scalar: '4' -> 4, 'true' -> True, '1e-5' -> 1e-05, 'null' -> None."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:  # YAML 1.1 reads '1e-5' as a string
            return float(value)
        except ValueError:
            return value
    return value


def parse_overrides(args: Sequence[str]) -> dict[str, Any]:
    """['--model.n_layers=4', '--model.position', 'rope'] -> {'model.n_layers': 4, ...}."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ValueError(f"override {arg!r} must look like --section.key=value (e.g. --model.n_layers=4)")
        if "=" in arg:
            key, text = arg[2:].split("=", 1)
        elif i + 1 < len(args):
            key, text = arg[2:], args[i + 1]
            i += 1
        else:
            raise ValueError(f"override {arg!r} has no value")
        out[key] = parse_value(text)
        i += 1
    return out


NESTED: dict[type, dict[str, type]] = {RopeConfig: {"scaling": RopeScaling}}  # besides the model's SUBCONFIGS


def _set_dotted(section: dict[str, Any], cls: type, keys: list[str], value: Any, dotted: str) -> None:
    """section[k1][k2]... = value, each key checked against the dataclass it names (sub-configs nest)."""
    valid = [f.name for f in dataclasses.fields(cls)]
    if keys[0] not in valid:
        raise ValueError(f"unknown key {keys[0]!r} in {dotted!r}; valid keys there: {valid}")
    if len(keys) == 1:
        section[keys[0]] = value
        return
    sub = (SUBCONFIGS if issubclass(cls, ModelConfig) else NESTED.get(cls, {})).get(keys[0])
    if sub is None:
        raise ValueError(f"{keys[0]!r} in {dotted!r} has no fields of its own to set")
    given = section.get(keys[0])
    inner = dataclasses.asdict(given) if dataclasses.is_dataclass(given) else dict(given or {})
    _set_dotted(inner, sub, keys[1:], value, dotted)
    section[keys[0]] = inner


def apply_overrides(raw: dict[str, dict[str, Any]], overrides: Mapping[str, Any]) -> dict:
    """Merge dotted overrides into a raw {section: {key: value}} mapping, rejecting unknown names.

    The model section nests: --model.moe.n_experts=8, --model.rope.scaling.factor=8; the flat names of earlier
    versions (--model.n_experts=8) reach the same fields."""
    merged = {s: dict(v) for s, v in raw.items()}
    if "model" in merged:
        merged["model"] = nest_flat_names(merged["model"])
    for dotted, value in overrides.items():
        section, _, key = dotted.partition(".")
        if section not in SECTIONS:
            raise ValueError(f"unknown config section {section!r} in {dotted!r}; sections: {sorted(SECTIONS)}")
        cls = EncDecConfig if section == "model" else SECTIONS[section]  # the model section may be either
        keys = key.split(".")
        if section == "model" and keys[0] in FLAT_NAMES:
            keys = [*FLAT_NAMES[keys[0]], *keys[1:]]
        if section != "model" and len(keys) > 1:
            raise ValueError(f"unknown key {key!r} in {dotted!r}; valid {section} keys: "
                             f"{[f.name for f in dataclasses.fields(cls)]}")
        _set_dotted(merged.setdefault(section, {}), cls, keys, value, dotted)
    return merged


def load_config(name_or_path: str | Path, overrides: Mapping[str, Any] | Sequence[str] = ()) -> dict:
    """Load a preset or file into {section: frozen dataclass}, applying dotted overrides."""
    path = preset_path(name_or_path)
    raw = (json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())) or {}
    if not isinstance(raw, Mapping) or not all(v is None or isinstance(v, Mapping) for v in raw.values()):
        raise ValueError(f"{path}: expected sections {sorted(SECTIONS)}, each a mapping of key: value")
    raw = {s: dict(v or {}) for s, v in raw.items()}  # an empty section means all defaults
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        hint = "; it is a fine-tuning config: run `jaxformer finetune --config` with it" if "sft" in unknown else ""
        raise ValueError(f"{path}: unknown section(s) {unknown}; sections: {sorted(SECTIONS)}{hint}")
    if not isinstance(overrides, Mapping):
        overrides = parse_overrides(list(overrides))
    merged = apply_overrides(raw, overrides)
    return {s: model_config_from_dict(merged.get(s, {})) if s == "model" else build_section(cls, merged.get(s, {}), s)
            for s, cls in SECTIONS.items()}


def load_model_config(name_or_path: str | Path, overrides: Mapping[str, Any] | Sequence[str] = ()) -> ModelConfig:
    """The ModelConfig of a preset or config file, with dotted overrides applied."""
    return load_config(name_or_path, overrides)["model"]
