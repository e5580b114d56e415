"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2) in one file, gpt-fast style.

The model runs the dense part of every layer over a *packed batch*: the tokens of many requests
(prefill chunks and decode tokens mixed) laid end to end, T tokens in all, each with its own
absolute position. Attention is not computed here: each layer hands its q, k, v to an attention
backend, which knows which request each token belongs to and where that request's KV lives
(DistAttention: local blocks, lent blocks on other instances, merged by log-sum-exp)::

    input_ids [T] --embed--> h [T, D]
    for each layer i:
        x = rms_norm(h)
        q, k, v = x @ Wqkv^T (+ b)                 # [T, H, Dh], [T, Hkv, Dh], [T, Hkv, Dh]
        q, k = rope(q, positions), rope(k, positions)
        o = attn.forward(i, q, k, v)               # [T, H, Dh]: the backend stores k, v and attends
        h = h + o @ Wo^T
        x = rms_norm(h)
        g, u = x @ Wgate_up^T                       # [T, I] each
        h = h + (silu(g) * u) @ Wdown^T
    hidden = rms_norm(h)                           # [T, D]: what forward() returns
    logits = hidden[rows] @ Wlm^T                  # compute_logits(), float32 [n, V]

D = hidden_size, H / Hkv = query / key-value heads (GQA: H is a multiple of Hkv), Dh = head_dim,
I = intermediate_size, V = vocab_size. q/k/v and gate/up are fused into one matmul each; the
loaders split nothing, they copy each checkpoint tensor into its rows of the fused weight.

RoPE is the Hugging Face "rotate half" form (the pairs are (j, j + Dh/2)); llama.cpp's GGUF files
store q and k permuted for its interleaved form, which the GGUF loader undoes. Scaling follows the
config: linear, llama3, yarn, or per-frequency factors from a GGUF ``rope_freqs`` tensor.

``ContiguousAttention`` at the end is a small reference backend (each sequence's keys and values
in growing contiguous tensors) so the model runs standalone, in tests and as ground truth.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ValidationError
from .quant import QuantWeight

# Steps of at most this many tokens use the quantised weights when the model has them (decode
# batches): each block of weights is dequantised once for a tile of tokens, so up to here they
# are as fast as the fp32 products or faster, from a quarter of the memory (bench_generate,
# docs/PERFORMANCE.md); prefill chunks use the fp32 products.
QUANT_MAX_TOKENS = 64

__all__ = [
    "ModelArgs",
    "RopeScaling",
    "LlamaModel",
    "AttentionBackend",
    "ContiguousAttention",
    "rope_inv_freq",
    "SUPPORTED_HF_ARCHITECTURES",
    "SUPPORTED_GGUF_ARCHITECTURES",
]

# model_type of config.json -> the flavour of the family it is.
SUPPORTED_HF_ARCHITECTURES = ("llama", "mistral", "qwen2")
SUPPORTED_GGUF_ARCHITECTURES = ("llama", "qwen2")
ROPE_TYPES = ("linear", "llama3", "yarn")


# ---- configuration ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RopeScaling:
    """How RoPE frequencies are stretched beyond the pre-training context (None: not at all).

    ``linear``  every inverse frequency divided by ``factor`` (position interpolation).
    ``llama3``  low frequencies divided by ``factor``, high ones kept, a smooth ramp between,
                set by ``low_freq_factor``, ``high_freq_factor`` and
                ``original_max_position_embeddings`` (Llama 3.1+).
    ``yarn``    NTK-by-parts interpolation (``beta_fast``, ``beta_slow``) plus an attention
                temperature folded into cos/sin (``attention_factor``, derived when None).
    """

    type: str
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    def __post_init__(self) -> None:
        o = "RopeScaling"
        if self.type not in ROPE_TYPES:
            raise ValidationError("type", self.type, f"must be one of {', '.join(map(repr, ROPE_TYPES))}", owner=o)
        if not (isinstance(self.factor, (int, float)) and self.factor > 0):
            raise ValidationError("factor", self.factor, "must be a number > 0", owner=o)
        if self.type == "llama3":
            if self.original_max_position_embeddings is None:
                raise ValidationError(
                    "original_max_position_embeddings", None, "is required for llama3 rope scaling", owner=o
                )
            if self.high_freq_factor <= self.low_freq_factor:
                raise ValidationError(
                    "high_freq_factor", self.high_freq_factor, f"must exceed low_freq_factor={self.low_freq_factor}", owner=o
                )

    @classmethod
    def from_hf(cls, scaling: Mapping[str, Any] | None, max_position_embeddings: int) -> RopeScaling | None:
        """From config.json's ``rope_scaling`` (or transformers 5's ``rope_parameters``)."""
        if not scaling:
            return None
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind == "default":
            return None
        if kind not in ROPE_TYPES:
            raise ValidationError(
                "rope_scaling.rope_type", kind, f"unsupported; supported: 'default', {', '.join(map(repr, ROPE_TYPES))}"
            )
        known = {f.name for f in dataclasses.fields(cls)} - {"type"}
        values = {k: v for k, v in scaling.items() if k in known and v is not None}
        if kind == "yarn":
            values.setdefault("original_max_position_embeddings", max_position_embeddings)
        return cls(type=kind, **values)


@dataclass(frozen=True, slots=True)
class ModelArgs:
    """The shape of a Llama-family model: everything the model needs to build its layers.

    ``attention_bias`` puts biases on q, k and v (Qwen2; Llama with ``attention_bias``),
    ``attention_out_bias`` on the output projection (Llama with ``attention_bias`` only).
    ``rope_freq_factors`` (Dh/2 values) divide the inverse frequencies one by one: llama.cpp's
    form of llama3 scaling in GGUF files (the ``rope_freqs`` tensor).
    ``layer_windows`` holds each layer's sliding window: in layer i a query at ``q_pos`` sees
    only keys at ``q_pos - layer_windows[i] < k_pos <= q_pos`` (the last ``layer_windows[i]``
    positions, its own included); an entry None is full causal attention there, and
    ``layer_windows`` None is full attention in every layer. Mistral v0.1 slides in every layer,
    Qwen2 with ``use_sliding_window`` in some (``from_hf_config`` says which). The attention
    backend, not the model, applies it.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rope_freq_factors: tuple[float, ...] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    attention_out_bias: bool = False
    layer_windows: tuple[int | None, ...] | None = None
    architecture: str = "llama"

    def __post_init__(self) -> None:
        o = "ModelArgs"
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValidationError(name, value, "must be a positive integer", owner=o)
        if self.num_heads % self.num_kv_heads:
            raise ValidationError(
                "num_kv_heads", self.num_kv_heads, f"must divide num_heads={self.num_heads} (GQA groups)", owner=o
            )
        if self.head_dim % 2:
            raise ValidationError("head_dim", self.head_dim, "must be even (RoPE rotates pairs)", owner=o)
        if not (self.rope_theta > 0):
            raise ValidationError("rope_theta", self.rope_theta, "must be > 0", owner=o)
        if not (self.rms_norm_eps > 0):
            raise ValidationError("rms_norm_eps", self.rms_norm_eps, "must be > 0", owner=o)
        if self.rope_freq_factors is not None and len(self.rope_freq_factors) != self.head_dim // 2:
            raise ValidationError(
                "rope_freq_factors", f"{len(self.rope_freq_factors)} values", f"must have head_dim/2={self.head_dim // 2}", owner=o
            )
        if self.layer_windows is not None:
            if len(self.layer_windows) != self.num_layers:
                raise ValidationError(
                    "layer_windows", self.layer_windows, f"must hold one window per layer ({self.num_layers})", owner=o
                )
            for w in self.layer_windows:
                if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 1):
                    raise ValidationError("layer_windows", self.layer_windows, "each must be an int >= 1 (a sliding window) or None", owner=o)

    def window(self, layer: int) -> int | None:
        """Layer ``layer``'s sliding window (None: full causal attention)."""
        return None if self.layer_windows is None else self.layer_windows[layer]

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any]) -> ModelArgs:
        """From a Hugging Face ``config.json`` (Llama, Mistral, Qwen2 and SmolLM2 checkpoints).

        Reads both the classic keys (``rope_theta``, ``rope_scaling``) and transformers 5's
        ``rope_parameters``; the sliding windows as ``_hf_layer_windows`` says. An unsupported
        ``model_type`` is a ValidationError naming it.
        """
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_HF_ARCHITECTURES:
            raise ValidationError(
                "model_type", model_type, f"unsupported architecture; supported: {', '.join(SUPPORTED_HF_ARCHITECTURES)}"
            )
        try:
            hidden = int(config["hidden_size"])
            heads = int(config["num_attention_heads"])
            max_pos = int(config.get("max_position_embeddings", 2048))
            rope = config.get("rope_parameters") or {}
            theta = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
            scaling = RopeScaling.from_hf(config.get("rope_scaling") or rope, max_pos)
            bias = bool(config.get("attention_bias", False))
            num_layers = int(config["num_hidden_layers"])
            return cls(
                vocab_size=int(config["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(config["intermediate_size"]),
                num_layers=num_layers,
                num_heads=heads,
                num_kv_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or hidden // heads),
                rms_norm_eps=float(config.get("rms_norm_eps", 1e-5)),
                rope_theta=theta,
                rope_scaling=scaling,
                max_position_embeddings=max_pos,
                tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                attention_bias=bias or model_type == "qwen2",  # Qwen2 always biases q, k, v (not o)
                attention_out_bias=bias,
                layer_windows=_hf_layer_windows(config, model_type, num_layers),
                architecture=model_type,
            )
        except KeyError as e:
            raise ValidationError("config.json", e.args[0], "is a required key of a Llama-family config") from None

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any], tensor_names: Sequence[str] = ()) -> ModelArgs:
        """From GGUF key/values (``general.architecture``, ``{arch}.block_count``, ...).

        ``tensor_names`` decide what metadata does not say: embeddings are tied when there is
        no ``output.weight``; q/k/v biases exist when ``blk.0.attn_q.bias`` does.
        ``{arch}.attention.sliding_window`` (absent or 0: none) slides in every layer; a file
        with a per-layer ``{arch}.attention.sliding_window_pattern`` is refused.
        """
        arch = metadata.get("general.architecture")
        if arch not in SUPPORTED_GGUF_ARCHITECTURES:
            raise ValidationError(
                "general.architecture", arch, f"unsupported GGUF architecture; supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)}"
            )

        def get(key: str, default: Any = None) -> Any:
            value = metadata.get(f"{arch}.{key}", default)
            if value is None:
                raise ValidationError(f"{arch}.{key}", None, "is a required GGUF metadata key")
            return value

        hidden = int(get("embedding_length"))
        heads = int(get("attention.head_count"))
        head_dim = int(get("attention.key_length", hidden // heads))
        rope_dim = int(get("rope.dimension_count", head_dim))
        if rope_dim != head_dim:
            raise ValidationError(f"{arch}.rope.dimension_count", rope_dim, f"must equal head_dim={head_dim} (partial RoPE is unsupported)")
        vocab = metadata.get(f"{arch}.vocab_size")
        if vocab is None:
            tokens = metadata.get("tokenizer.ggml.tokens")
            if tokens is None:
                raise ValidationError(f"{arch}.vocab_size", None, "is required when the file has no tokenizer.ggml.tokens")
            vocab = len(tokens)
        ctx = int(get("context_length", 2048))
        scaling = None
        kind = metadata.get(f"{arch}.rope.scaling.type", "none")
        if kind not in ("none", None):
            factor = float(get("rope.scaling.factor", 1.0))
            orig = metadata.get(f"{arch}.rope.scaling.original_context_length")
            if kind == "yarn":
                scaling = RopeScaling(
                    type="yarn",
                    factor=factor,
                    original_max_position_embeddings=int(orig) if orig else ctx,
                    beta_fast=float(metadata.get(f"{arch}.rope.scaling.yarn_beta_fast", 32.0)),
                    beta_slow=float(metadata.get(f"{arch}.rope.scaling.yarn_beta_slow", 1.0)),
                )
            elif kind == "linear":
                scaling = RopeScaling(type="linear", factor=factor)
            else:
                raise ValidationError(f"{arch}.rope.scaling.type", kind, "unsupported; supported: 'none', 'linear', 'yarn'")
        names = set(tensor_names)
        has_bias = "blk.0.attn_q.bias" in names
        num_layers = int(get("block_count"))
        window = int(metadata.get(f"{arch}.attention.sliding_window") or 0)
        pattern = metadata.get(f"{arch}.attention.sliding_window_pattern")
        if window and pattern is not None:
            raise ValidationError(
                f"{arch}.attention.sliding_window_pattern", pattern,
                "must be absent: only a sliding window in every layer is read from GGUF files",
            )
        return cls(
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=int(get("attention.head_count_kv", heads)),
            head_dim=head_dim,
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            max_position_embeddings=ctx,
            tie_word_embeddings="output.weight" not in names,
            attention_bias=has_bias or arch == "qwen2",
            attention_out_bias="blk.0.attn_output.bias" in names,
            layer_windows=(window,) * num_layers if window else None,
            architecture=arch,
        )


def _hf_layer_windows(config: Mapping[str, Any], model_type: str, num_layers: int) -> tuple[int | None, ...] | None:
    """Each layer's sliding window from a config.json, as transformers (5.x) decides it.

    ``mistral``  ``sliding_window`` in every layer (absent: MistralConfig's default 4096; null:
                 none).
    ``qwen2``    only with ``use_sliding_window``: ``sliding_window`` (absent: 4096; null: none)
                 in the layers ``layer_types`` marks ``"sliding_attention"``, or, without
                 ``layer_types``, in layers ``i >= max_window_layers`` (absent: 28).
    ``llama``    none.
    """
    if model_type == "mistral":
        window = config.get("sliding_window", 4096)
        return None if window is None else (int(window),) * num_layers
    if model_type != "qwen2" or not config.get("use_sliding_window", False):
        return None
    window = config.get("sliding_window", 4096)
    if window is None:
        return None
    kinds = config.get("layer_types")
    if kinds is None:
        first = int(config.get("max_window_layers", 28))
        kinds = ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
    allowed = ("sliding_attention", "full_attention")
    if len(kinds) != num_layers or any(k not in allowed for k in kinds):
        raise ValidationError("layer_types", kinds, f"must be {num_layers} of {', '.join(map(repr, allowed))}")
    windows = tuple(int(window) if k == "sliding_attention" else None for k in kinds)
    return windows if any(w is not None for w in windows) else None


# ---- rotary embeddings -----------------------------------------------------------------------


def rope_inv_freq(args: ModelArgs) -> tuple[Tensor, float]:
    """Inverse frequencies [Dh/2] (fp32) and the attention factor that scales cos and sin.

    Bit for bit the arithmetic of transformers' rope initialisers, so logits agree closely.
    """
    dim, base = args.head_dim, args.rope_theta
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim  # [Dh/2]
    inv_freq = 1.0 / (base**exponents)
    attention_factor = 1.0
    s = args.rope_scaling
    if s is not None and s.type == "linear":
        inv_freq = inv_freq / s.factor
    elif s is not None and s.type == "llama3":
        old_ctx = s.original_max_position_embeddings
        low_wavelen = old_ctx / s.low_freq_factor
        high_wavelen = old_ctx / s.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)  # low frequencies
        smooth = (old_ctx / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
        smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    elif s is not None and s.type == "yarn":
        inv_freq, attention_factor = _yarn(dim, base, s)
    if args.rope_freq_factors is not None:
        inv_freq = inv_freq / torch.tensor(args.rope_freq_factors, dtype=torch.float32)
    return inv_freq, attention_factor


def _yarn(dim: int, base: float, s: RopeScaling) -> tuple[Tensor, float]:
    """YaRN: interpolate low frequencies, extrapolate high ones, a linear ramp between."""

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = s.attention_factor
    if attention_factor is None:
        if s.mscale and s.mscale_all_dim:
            attention_factor = mscale(s.factor, s.mscale) / mscale(s.factor, s.mscale_all_dim)
        else:
            attention_factor = mscale(s.factor)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp  # 1 for high frequencies (kept), 0 for low ones (interpolated)
    inv_freq = (1.0 / (s.factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE: x [T, heads, Dh], cos/sin [T, 1, Dh] (already in x's dtype)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


# ---- the model -------------------------------------------------------------------------------


class AttentionBackend(Protocol):
    """What a layer calls for attention. The engine's DistAttention backend implements it.

    Before a forward the engine tells its backend which request each of the T tokens belongs
    to, at which position, and where each request's KV blocks live; the model only passes
    q [T, H, Dh] and the new k, v [T, Hkv, Dh] of layer ``layer_index`` (RoPE applied,
    contiguous, in the model's dtype). The backend stores k, v, attends causally by position
    with scale 1/sqrt(Dh) (within the layer's window, ``ModelArgs.window(layer_index)``, when it
    has one), and returns [T, H, Dh] in q's dtype. Query head h reads KV head h // (H / Hkv).
    """

    def forward(self, layer_index: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor: ...


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 and cast back (as transformers does)."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def _linear(in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device) -> nn.Linear:
    """A Linear whose storage is allocated but not initialised (the loaders fill it)."""
    layer = nn.Linear(in_features, out_features, bias=bias, device="meta", dtype=dtype)
    layer.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device))
    if bias:
        layer.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device))
    return layer


class DecoderLayer(nn.Module):
    """Pre-norm attention then pre-norm SwiGLU MLP, each added to the residual stream.

    ``wqkv`` rows are [q (H*Dh) | k (Hkv*Dh) | v (Hkv*Dh)]; ``w_gate_up`` rows are
    [gate (I) | up (I)].
    """

    def __init__(self, args: ModelArgs, index: int, dtype: torch.dtype, device) -> None:
        super().__init__()
        self.index = index
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        self.q_size, self.kv_size, self.intermediate_size = args.q_size, args.kv_size, args.intermediate_size
        d = args.hidden_size
        self.attn_norm = RMSNorm(d, args.rms_norm_eps, dtype, device)
        self.wqkv = _linear(d, args.q_size + 2 * args.kv_size, args.attention_bias, dtype, device)
        self.wo = _linear(args.q_size, d, args.attention_out_bias, dtype, device)
        self.mlp_norm = RMSNorm(d, args.rms_norm_eps, dtype, device)
        self.w_gate_up = _linear(d, 2 * args.intermediate_size, False, dtype, device)
        self.w_down = _linear(args.intermediate_size, d, False, dtype, device)
        # Quantised copies of the projections (``LlamaModel.attach_quantized``), by attribute name.
        self.quant: dict[str, QuantWeight] = {}

    def _project(self, name: str, x: Tensor) -> Tensor:
        """``getattr(self, name)(x)``, from the quantised weight for steps of a few tokens."""
        layer = getattr(self, name)
        qw = self.quant.get(name) if x.shape[0] <= QUANT_MAX_TOKENS else None
        if qw is None:
            return layer(x)
        y = qw.matmul(x.float())
        if layer.bias is not None:
            y = y + layer.bias
        return y.to(x.dtype)

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, attn: AttentionBackend) -> Tensor:
        t = h.shape[0]
        qkv = self._project("wqkv", self.attn_norm(h))  # [T, (H + 2 Hkv) Dh]
        q, k, v = qkv.split((self.q_size, self.kv_size, self.kv_size), dim=-1)
        q = apply_rope(q.view(t, self.num_heads, self.head_dim), cos, sin)  # [T, H, Dh]
        k = apply_rope(k.view(t, self.num_kv_heads, self.head_dim), cos, sin)  # [T, Hkv, Dh]
        v = v.reshape(t, self.num_kv_heads, self.head_dim).contiguous()  # [T, Hkv, Dh]
        o = attn.forward(self.index, q, k, v)  # [T, H, Dh]
        h = h + self._project("wo", o.reshape(t, self.q_size))
        gate, up = self._project("w_gate_up", self.mlp_norm(h)).split(self.intermediate_size, dim=-1)  # [T, I] each
        return h + self._project("w_down", F.silu(gate) * up)


class LlamaModel(nn.Module):
    """A Llama-family decoder over packed token batches; attention is the backend's.

    The constructor allocates the weights without initialising them (the loaders in
    ``infinillm.loader`` fill every one); ``init_random_weights`` gives a random model for
    tests. Parameters are those of :class:`DecoderLayer` plus ``embed`` [V, D], ``norm`` and,
    unless embeddings are tied, ``lm_head`` [V, D].
    """

    def __init__(self, args: ModelArgs, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        super().__init__()
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValidationError("dtype", dtype, "must be torch.float32, torch.bfloat16 or torch.float16")
        self.args = args
        self.dtype = dtype
        device = torch.device(device)
        self.embed = nn.Embedding(args.vocab_size, args.hidden_size, device="meta", dtype=dtype)
        self.embed.weight = nn.Parameter(torch.empty(args.vocab_size, args.hidden_size, dtype=dtype, device=device))
        self.layers = nn.ModuleList(DecoderLayer(args, i, dtype, device) for i in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps, dtype, device)
        self.lm_head = None if args.tie_word_embeddings else _linear(args.hidden_size, args.vocab_size, False, dtype, device)
        self.quant_head: QuantWeight | None = None  # quantised output projection (attach_quantized)
        self.num_quantized = 0  # projections with a quantised copy
        inv_freq, self.attention_factor = rope_inv_freq(args)
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)  # [Dh/2] fp32

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin [T, 1, Dh] in the model's dtype, for absolute positions [T] (computed in fp32)."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, Dh/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, Dh]
        cos = (emb.cos() * self.attention_factor).to(self.dtype)
        sin = (emb.sin() * self.attention_factor).to(self.dtype)
        return cos[:, None, :], sin[:, None, :]

    def forward(self, input_ids: Tensor, positions: Tensor, attn: AttentionBackend) -> Tensor:
        """Hidden states [T, D] after the final norm, for input_ids and positions [T] (int64)."""
        if input_ids.dim() != 1 or positions.shape != input_ids.shape:
            raise ValidationError(
                "input_ids.shape", tuple(input_ids.shape),
                f"must be [T], the shape of positions {tuple(positions.shape)}",
            )
        h = self.embed(input_ids)  # [T, D]
        cos, sin = self.rope(positions)
        for layer in self.layers:
            h = layer(h, cos, sin, attn)
        return self.norm(h)

    def compute_logits(self, hidden: Tensor) -> Tensor:
        """[n, D] -> [n, V] float32."""
        if self.quant_head is not None and hidden.shape[0] <= QUANT_MAX_TOKENS:
            return self.quant_head.matmul(hidden.float())
        weight = self.embed.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight).float()

    def attach_quantized(self, weights: Mapping[str, QuantWeight]) -> int:
        """Use GGUF-quantised copies of the projections for steps of a few tokens (CPU, fp32).

        ``weights`` are keyed by Hugging Face name (``model.layers.0.self_attn.q_proj.weight``);
        fused projections are used only when all their parts are there, of one kind. Returns
        how many projections got a quantised copy.
        """
        fused = {
            "wqkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            "wo": ("self_attn.o_proj",),
            "w_gate_up": ("mlp.gate_proj", "mlp.up_proj"),
            "w_down": ("mlp.down_proj",),
        }
        count = 0
        for i, layer in enumerate(self.layers):
            for attr, parts in fused.items():
                found = [weights.get(f"model.layers.{i}.{p}.weight") for p in parts]
                if any(w is None for w in found):
                    continue
                qw = QuantWeight.concat(found)
                target = getattr(layer, attr).weight
                if qw is not None and (qw.out_features, qw.in_features) == tuple(target.shape):
                    layer.quant[attr] = qw
                    count += 1
        head = weights.get("model.embed_tokens.weight" if self.lm_head is None else "lm_head.weight")
        if head is not None and (head.out_features, head.in_features) == (self.args.vocab_size, self.args.hidden_size):
            self.quant_head = head
            count += 1
        self.num_quantized += count
        return count

    @torch.no_grad()
    def init_random_weights(self, seed: int = 0, std: float = 0.02) -> LlamaModel:
        """Fill every weight from N(0, std) (biases too), norms with 1: a random model for tests."""
        gen = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
        return self


# ---- a reference attention backend -----------------------------------------------------------


class ContiguousAttention:
    """The simplest attention backend: each sequence keeps its keys and values per layer in
    contiguous tensors that grow as it goes; attention is torch's fp32 scaled-dot-product
    attention over them, masked by position.

    A forward's packed batch is described first with :meth:`prepare`: which sequence owns each
    run of tokens, in order, and every token's position::

        attn = ContiguousAttention(args)
        attn.prepare([("a", 5), ("b", 3)], positions)   # T = 8: five tokens of "a", three of "b"
        hidden = model(input_ids, positions, attn)
        attn.prepare([("a", 1), ("b", 1)], positions)   # next step: one decode token each

    A query sees the keys of its own sequence whose position is <= its own (and, in a layer
    with a sliding window, > its own minus the window), the current chunk's included, just as
    the paged DistAttention kernels do. Used by the tests as ground truth and by
    ``infinillm.testing.greedy_reference``.
    """

    _QUERY_SLICE = 1024  # bounds the [n, L] mask (and any [H, n, L] scores) of a long prefill

    def __init__(self, args: ModelArgs) -> None:
        self.num_layers = args.num_layers
        self.group = args.num_heads // args.num_kv_heads
        self.scale = 1.0 / math.sqrt(args.head_dim)
        self.layer_windows = args.layer_windows
        self._keys: dict[Hashable, list[Tensor | None]] = {}
        self._values: dict[Hashable, list[Tensor | None]] = {}
        self._positions: dict[Hashable, Tensor] = {}
        self._batch: list[tuple[Hashable, int, Tensor]] = []  # (seq, tokens in this forward, their positions)

    def prepare(self, seqs: Sequence[tuple[Hashable, int]], positions: Tensor) -> None:
        """Describe the next forward: ``seqs`` is [(seq_id, num_tokens)] in packed order."""
        counts = [n for _, n in seqs]
        if any(n < 1 for n in counts) or sum(counts) != positions.numel():
            raise ValidationError("seqs", counts, f"token counts must be >= 1 and sum to len(positions)={positions.numel()}")
        if len({s for s, _ in seqs}) != len(seqs):
            raise ValidationError("seqs", [s for s, _ in seqs], "a sequence may appear once per forward")
        self._batch = []
        for (seq, n), pos in zip(seqs, positions.long().split(counts)):
            if seq not in self._keys:
                self._keys[seq] = [None] * self.num_layers
                self._values[seq] = [None] * self.num_layers
                self._positions[seq] = pos.new_empty(0)
            self._positions[seq] = torch.cat((self._positions[seq], pos))
            self._batch.append((seq, n, pos))

    def seq_len(self, seq: Hashable) -> int:
        """Tokens stored for ``seq`` (0 when unknown)."""
        return int(self._positions[seq].numel()) if seq in self._positions else 0

    def free(self, seq: Hashable) -> None:
        """Forget a sequence's cache."""
        for store in (self._keys, self._values, self._positions):
            store.pop(seq, None)

    def forward(self, layer_index: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        out = torch.empty_like(q)  # [T, H, Dh]
        window = None if self.layer_windows is None else self.layer_windows[layer_index]
        start = 0
        for seq, n, q_pos in self._batch:
            ks, vs = self._keys[seq], self._values[seq]
            new_k, new_v = k[start : start + n], v[start : start + n]
            ks[layer_index] = new_k if ks[layer_index] is None else torch.cat((ks[layer_index], new_k))
            vs[layer_index] = new_v if vs[layer_index] is None else torch.cat((vs[layer_index], new_v))
            out[start : start + n] = self._attend(
                q[start : start + n], q_pos, ks[layer_index], vs[layer_index], self._positions[seq], window
            )
            start += n
        return out

    def _attend(self, q: Tensor, q_pos: Tensor, keys: Tensor, values: Tensor, key_pos: Tensor, window: int | None) -> Tensor:
        """q [n, H, Dh] over keys/values [L, Hkv, Dh] at key_pos [L] -> [n, H, Dh], in fp32."""
        k = keys.float().repeat_interleave(self.group, dim=1).transpose(0, 1)  # [H, L, Dh]: KV head j serves query heads jG..jG+G-1
        v = values.float().repeat_interleave(self.group, dim=1).transpose(0, 1)
        out = torch.empty_like(q)
        for s0 in range(0, q.shape[0], self._QUERY_SLICE):
            qs, ps = q[s0 : s0 + self._QUERY_SLICE].float().transpose(0, 1), q_pos[s0 : s0 + self._QUERY_SLICE]  # [H, n, Dh]
            visible = key_pos[None, :] <= ps[:, None]  # [n, L]; every query sees at least itself
            if window is not None:
                visible &= key_pos[None, :] > ps[:, None] - window
            o = F.scaled_dot_product_attention(qs, k, v, attn_mask=visible, scale=self.scale)  # [H, n, Dh]
            out[s0 : s0 + self._QUERY_SLICE] = o.transpose(0, 1).to(q.dtype)
        return out
