"""Small models and references for tests: fast, deterministic, offline.

``make_tiny_model(folder)``      a random-weight Llama-family model written as a Hugging Face folder
                                 (config.json, safetensors, tokenizer.json, tokenizer_config.json
                                 with a ChatML template), loadable by ``load_model`` and by
                                 transformers.
``hf_folder_to_gguf(folder, path)``  the same model as a GGUF file, the way llama.cpp's converter
                                 writes it (q/k rows permuted for ``llama``, optional quantisation,
                                 tokenizer metadata), to test the GGUF loader against the folder.
``greedy_reference(model, ids)`` greedy decoding through ``ContiguousAttention``: ground truth for
                                 engine tests.
``default_device()``             where tests run the runtime: cuda where a GPU is present, else cpu.
``assert_runtime_idle(rt)``      nothing left behind: no live request anywhere, every KV block free.
``FakeNvmlProbe``                a test double for NVML (``MemoryProbe``) on machines without a GPU.
``import_transformers()``        transformers (the reference in tests and benchmarks), imported so
                                 that it works from the repository root (see its docstring).

The tiny tokenizer is a byte-level BPE (every text encodes) over 256 byte symbols, a few dozen
merges of common English words, and the special tokens ``<|endoftext|>`` (0), ``<|im_start|>``
(1) and ``<|im_end|>`` (2, the EOS).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import ValidationError
from .memory import MemoryInfo
from .model import ContiguousAttention, LlamaModel, ModelArgs, rope_inv_freq
from .tokenizer import bytes_to_unicode

__all__ = [
    "make_tiny_model",
    "hf_folder_to_gguf",
    "greedy_reference",
    "import_transformers",
    "FakeNvmlProbe",
    "FileMemoryProbe",
    "outputs_alone",
    "generate_all",
    "assert_runtime_idle",
    "default_device",
    "TINY_CHAT_TEMPLATE",
    "TINY_SPECIAL_TOKENS",
]

TINY_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_TINY_WORDS = (
    "the", "and", "is", "in", "of", "to", "a", "hello", "world", "user", "assistant", "system",
    "what", "capital", "France", "Paris", "you", "are", "helpful", "tell", "me", "story", "about",
)
_ARCHITECTURE_NAMES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


# ---- the tiny tokenizer ----------------------------------------------------------------------


def _tiny_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Special tokens, the 256 byte symbols, then the merges that build each word left to
    right, and the word with a leading space ('Ġ')."""
    vocab = {tok: i for i, tok in enumerate(TINY_SPECIAL_TOKENS)}
    spell = bytes_to_unicode()
    for b in range(256):
        vocab[spell[b]] = len(vocab)
    merges: list[tuple[str, str]] = []

    def merge(left: str, right: str) -> str:
        if left + right not in vocab:
            merges.append((left, right))
            vocab[left + right] = len(vocab)
        return left + right

    for word in _TINY_WORDS:
        piece = word[0]
        for ch in word[1:]:
            piece = merge(piece, ch)
        merge("Ġ", piece)  # after the word's own merges, so BPE reaches it
    return vocab, merges


def _tiny_tokenizer_json() -> dict[str, Any]:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab, merges = _tiny_vocab_and_merges()
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in TINY_SPECIAL_TOKENS])
    return json.loads(tok.to_str())


# ---- the tiny model ----------------------------------------------------------------------------


def make_tiny_model(
    folder: str | os.PathLike,
    *,
    vocab_size: int | None = None,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    seed: int = 0,
    tie_word_embeddings: bool = True,
    architecture: str = "llama",
    rope_theta: float = 10000.0,
    rope_scaling: dict[str, Any] | None = None,
    max_position_embeddings: int = 2048,
    num_shards: int = 1,
    sliding_window: int | None = None,
    max_window_layers: int = 0,
) -> Path:
    """Write a random-weight model as a Hugging Face folder and return the folder.

    ``vocab_size`` None is the tokenizer's own size (3 special + 256 byte + merged tokens);
    larger pads the model's vocabulary as real checkpoints do. ``architecture`` is ``llama``,
    ``mistral`` or ``qwen2`` (q/k/v biases). ``rope_scaling`` is config.json's dict (e.g.
    ``{"rope_type": "llama3", "factor": 8.0, ...}``). ``num_shards > 1`` writes sharded
    safetensors with an index. ``sliding_window`` gives the model a sliding window (``mistral``:
    every layer; ``qwen2``: ``use_sliding_window`` on, sliding from layer ``max_window_layers``
    on, as transformers reads it; ``llama`` has none). Weights: N(0, 1/fan_in) for
    q/k/v/gate/up, N(0, 9/fan_in) for o/down (layers that change the residual stream enough
    that greedy decoding does not just repeat the last token), N(0, 0.09) for embeddings,
    1 + N(0, 0.01) for norms, N(0, 0.01) for biases: logits are separated well enough that
    greedy decoding is stable under float reordering.
    """
    from safetensors.torch import save_file

    if architecture not in _ARCHITECTURE_NAMES:
        raise ValidationError("architecture", architecture, f"must be one of {', '.join(_ARCHITECTURE_NAMES)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer_json = _tiny_tokenizer_json()
    n_tokens = len(tokenizer_json["model"]["vocab"])
    vocab_size = n_tokens if vocab_size is None else vocab_size
    if vocab_size < n_tokens:
        raise ValidationError("vocab_size", vocab_size, f"must be >= the tiny tokenizer's {n_tokens} tokens")
    if num_shards < 1:
        raise ValidationError("num_shards", num_shards, "must be >= 1")
    if sliding_window is not None and architecture == "llama":
        raise ValidationError("sliding_window", sliding_window, "needs architecture 'mistral' or 'qwen2'")
    head_dim = hidden_size // num_heads
    config: dict[str, Any] = {
        "architectures": [_ARCHITECTURE_NAMES[architecture]],
        "model_type": architecture,
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_theta": rope_theta,
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": tie_word_embeddings,
        "attention_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }
    if architecture == "qwen2":
        config["use_sliding_window"] = sliding_window is not None
        config["max_window_layers"] = max_window_layers
    if architecture in ("mistral", "qwen2"):
        config["sliding_window"] = sliding_window
    args = ModelArgs.from_hf_config(config)

    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(shape, generator=gen) * std

    d, q, kv, inter = hidden_size, args.q_size, args.kv_size, intermediate_size
    tensors: dict[str, torch.Tensor] = {"model.embed_tokens.weight": randn(vocab_size, d, std=0.3)}
    for i in range(num_layers):
        p = f"model.layers.{i}."
        tensors |= {
            p + "input_layernorm.weight": 1 + randn(d, std=0.1),
            p + "self_attn.q_proj.weight": randn(q, d, std=d**-0.5),
            p + "self_attn.k_proj.weight": randn(kv, d, std=d**-0.5),
            p + "self_attn.v_proj.weight": randn(kv, d, std=d**-0.5),
            p + "self_attn.o_proj.weight": randn(d, q, std=3 * q**-0.5),
            p + "post_attention_layernorm.weight": 1 + randn(d, std=0.1),
            p + "mlp.gate_proj.weight": randn(inter, d, std=d**-0.5),
            p + "mlp.up_proj.weight": randn(inter, d, std=d**-0.5),
            p + "mlp.down_proj.weight": randn(d, inter, std=3 * inter**-0.5),
        }
        if args.attention_bias:
            tensors |= {
                p + "self_attn.q_proj.bias": randn(q, std=0.1),
                p + "self_attn.k_proj.bias": randn(kv, std=0.1),
                p + "self_attn.v_proj.bias": randn(kv, std=0.1),
            }
    tensors["model.norm.weight"] = 1 + randn(d, std=0.1)
    if not tie_word_embeddings:
        tensors["lm_head.weight"] = randn(vocab_size, d, std=d**-0.5 * 4)

    names = list(tensors)
    if num_shards == 1:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map: dict[str, str] = {}
        for s, chunk in enumerate(np.array_split(np.arange(len(names)), num_shards)):
            file = f"model-{s + 1:05d}-of-{num_shards:05d}.safetensors"
            save_file({names[j]: tensors[names[j]] for j in chunk}, str(folder / file), metadata={"format": "pt"})
            weight_map |= {names[j]: file for j in chunk}
        index = {"metadata": {"total_size": sum(t.numel() * 4 for t in tensors.values())}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json, ensure_ascii=False))
    tokenizer_config = {
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|im_end|>",
        "add_bos_token": False,
        "chat_template": TINY_CHAT_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_position_embeddings,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return folder


# ---- GGUF conversion (what llama.cpp's convert_hf_to_gguf.py does, for the tiny models) -------


def _llamacpp_permute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's q/k permutation: rotate-half row order -> interleaved pairs, per head."""
    return w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_HF_TO_GGUF_LAYER = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _gguf_name(hf_name: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    if hf_name in top:
        return top[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)  # model.layers.{i}.{module}.{weight|bias}
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_HF_TO_GGUF_LAYER[module]}.{kind}"


def hf_folder_to_gguf(folder: str | os.PathLike, path: str | os.PathLike, *, qtype: str = "F32") -> Path:
    """Convert a (tiny) Hugging Face folder into a GGUF file as llama.cpp would.

    ``qtype`` (a ``gguf.GGMLQuantizationType`` name: F32, F16, Q8_0, Q4_0, ...) quantises every
    2-D weight whose rows divide into the type's blocks; norms stay F32. llama3 rope scaling
    becomes a ``rope_freqs`` tensor, linear scaling metadata; a sliding window in every layer
    ``{arch}.attention.sliding_window`` (windows in only some layers are a ValidationError).
    The tokenizer must be byte-level BPE (the tiny one is).
    """
    import gguf
    from safetensors import safe_open

    folder, path = Path(folder), Path(path)
    config = json.loads((folder / "config.json").read_text())
    args = ModelArgs.from_hf_config(config)
    arch = "qwen2" if args.architecture == "qwen2" else "llama"
    try:
        quant = gguf.GGMLQuantizationType[qtype]
    except KeyError:
        raise ValidationError("qtype", qtype, "must name a gguf.GGMLQuantizationType") from None

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(folder.name)
    w.add_block_count(args.num_layers)
    w.add_context_length(args.max_position_embeddings)
    w.add_embedding_length(args.hidden_size)
    w.add_feed_forward_length(args.intermediate_size)
    w.add_head_count(args.num_heads)
    w.add_head_count_kv(args.num_kv_heads)
    w.add_key_length(args.head_dim)
    w.add_value_length(args.head_dim)
    w.add_rope_dimension_count(args.head_dim)
    w.add_rope_freq_base(args.rope_theta)
    w.add_layer_norm_rms_eps(args.rms_norm_eps)
    w.add_vocab_size(args.vocab_size)
    scaling = args.rope_scaling
    if scaling is not None and scaling.type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(scaling.factor)
    if args.layer_windows is not None:
        if len(set(args.layer_windows)) != 1:
            raise ValidationError("layer_windows", args.layer_windows, "GGUF holds one sliding window for every layer")
        w.add_sliding_window(args.layer_windows[0])

    # tokenizer: tokens in id order (padded as llama.cpp pads), merges, types
    tok_json = json.loads((folder / "tokenizer.json").read_text())
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    by_id = {i: t for t, i in tok_json["model"]["vocab"].items()}
    special = {a["content"] for a in tok_json.get("added_tokens", []) if a.get("special")}
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(args.vocab_size)]
    types = [3 if t in special else (1 if i in by_id else 5) for i, t in enumerate(tokens)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok_json["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    vocab = tok_json["model"]["vocab"]
    w.add_bos_token_id(vocab[tok_config["bos_token"]])
    w.add_eos_token_id(vocab[tok_config["eos_token"]])
    w.add_add_bos_token(bool(tok_config.get("add_bos_token", False)))
    if tok_config.get("chat_template"):
        w.add_chat_template(tok_config["chat_template"])

    def add(name: str, data: np.ndarray) -> None:
        block = gguf.GGML_QUANT_SIZES[quant][0]
        if data.ndim == 2 and quant != gguf.GGMLQuantizationType.F32 and data.shape[1] % block == 0:
            w.add_tensor(name, gguf.quants.quantize(data, quant), raw_dtype=quant)
        else:
            w.add_tensor(name, data.astype(np.float32))

    if scaling is not None and scaling.type == "llama3":
        # llama.cpp writes llama3 scaling as per-frequency divisors of the plain inverse frequencies
        plain, _ = rope_inv_freq(dataclasses.replace(args, rope_scaling=None))
        scaled, _ = rope_inv_freq(args)
        add("rope_freqs.weight", (plain / scaled).numpy().astype(np.float32))
    files = sorted(folder.glob("*.safetensors"))
    for f in files:
        with safe_open(str(f), framework="np") as st:
            for name in st.keys():
                data = st.get_tensor(name).astype(np.float32)
                if arch == "llama" and ".q_proj." in name:
                    data = _llamacpp_permute(data, args.num_heads)
                elif arch == "llama" and ".k_proj." in name:
                    data = _llamacpp_permute(data, args.num_kv_heads)
                add(_gguf_name(name), data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ---- greedy reference ------------------------------------------------------------------------


@torch.inference_mode()
def greedy_reference(
    model: LlamaModel,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    *,
    eos_token_ids: Sequence[int] = (),
    prefill_chunk: int | None = None,
) -> tuple[list[int], torch.Tensor]:
    """Greedy decoding of one prompt through ``ContiguousAttention``.

    Returns the generated ids (stopping after an id in ``eos_token_ids``) and the fp32 logits
    [n, V] each was chosen from. ``prefill_chunk`` prefills the prompt in chunks of that many
    tokens, as chunked prefill does.
    """
    if not prompt_ids:
        raise ValidationError("prompt_ids", list(prompt_ids), "must be non-empty")
    attn = ContiguousAttention(model.args)
    device = model.device
    ids = torch.tensor(list(prompt_ids), dtype=torch.long, device=device)
    chunk = prefill_chunk or len(ids)
    for start in range(0, len(ids), chunk):
        piece = ids[start : start + chunk]
        pos = torch.arange(start, start + len(piece), device=device)
        attn.prepare([(0, len(piece))], pos)
        hidden = model(piece, pos, attn)
    logits = model.compute_logits(hidden[-1:])  # [1, V]
    out: list[int] = []
    all_logits = []
    for step in range(max_new_tokens):
        all_logits.append(logits[0])
        token = int(logits[0].argmax())
        out.append(token)
        if token in eos_token_ids or step == max_new_tokens - 1:
            break
        pos = torch.tensor([len(ids) + step], device=device)
        attn.prepare([(0, 1)], pos)
        logits = model.compute_logits(model(torch.tensor([token], device=device), pos, attn))
    return out, torch.stack(all_logits) if all_logits else torch.empty(0, model.args.vocab_size)


# ---- transformers, the reference ---------------------------------------------------------------


def import_transformers() -> types.ModuleType:
    """Import ``transformers`` for use as a reference, also from the repository root.

    transformers probes for an optional hub package named ``kernels`` (``find_spec``, then an
    import). Run from the repository root (``python -m pytest`` puts it on ``sys.path``), that
    finds our source folder ``kernels/``, whose relative imports fail outside the ``infinillm``
    package, and ``import transformers.activations`` dies with "attempted relative import
    beyond top-level package". The probe is cached, so it is made once here with the source
    tree hidden from ``sys.path``; later imports are unaffected. Nothing is downloaded:
    ``HF_HUB_OFFLINE`` defaults to 1 (set before huggingface_hub reads it).
    """
    def is_source_tree(entry: str) -> bool:
        root = Path(entry or ".")
        return (root / "kernels" / "reference.py").is_file() and (root / "core_sched").is_dir()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if not is_source_tree(p)]
    try:
        import transformers
        from transformers.utils import import_utils

        import_utils.is_kernels_available()  # lru_cache'd: answer the probe now
        from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401  (resolve the lazy modules)
        import transformers.activations  # noqa: F401
    finally:
        sys.path[:] = saved
    return transformers


class FakeNvmlProbe:
    """Test double for NVML (a ``MemoryProbe``) on machines without a GPU: reports the memory
    it is told to; set ``free`` to play another process taking or leaving device memory."""

    def __init__(self, total: int, free: int, count: int = 1) -> None:
        self.total, self.free, self.count = total, free, count

    def device_count(self) -> int:
        return self.count

    def read(self, device_index: int) -> MemoryInfo:
        if not 0 <= device_index < self.count:
            raise ValidationError("device_index", device_index, f"must be in [0, {self.count - 1}]")
        return MemoryInfo(device_index, self.total, self.free, self.total - self.free)


class FileMemoryProbe:
    """Test double for NVML in another process (a worker): reads ``"<total> <free>"`` (bytes)
    from a file the test writes, so a test can play another process taking device memory.
    Selected by ``INFINILLM_FAKE_MEMORY_FILE`` (``memory.default_probe``)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def device_count(self) -> int:
        return 1

    def read(self, device_index: int) -> MemoryInfo:
        with open(self.path) as f:
            text = f.read()
        try:
            total, free = (int(x) for x in text.split())
        except ValueError:
            raise ValueError(f"{self.path} holds {text[:40]!r}, not '<total bytes> <free bytes>'") from None
        return MemoryInfo(device_index, total, free, total - free)


async def outputs_alone(model: str, prompts, params, **options):
    """The final ``RequestOutput`` of each prompt (token ids), run one after another on one
    instance with room for them all: what the many-instance tests compare against."""
    from .runtime import open_runtime

    options = {"device": "cpu", "kv_capacity_tokens": 4096, "max_model_len": 1024, **options}
    finals = []
    async with open_runtime(model=model, **options) as rt:
        for p in prompts:
            async for out in rt.generate({"prompt_token_ids": list(p)}, params):
                pass
            finals.append(out)
    return finals


async def generate_all(rt, prompts, params, watch=None) -> list[tuple]:
    """Every prompt's token ids through ``rt`` at once (request ids ``r0``, ``r1``, ...), in
    prompt order; ``watch(i, out)`` sees each streamed output."""
    import trio

    finals = {}

    async def one(i):
        async for out in rt.generate({"prompt_token_ids": list(prompts[i])}, params, request_id=f"r{i}"):
            finals[i] = out
            if watch is not None:
                watch(i, out)

    async with trio.open_nursery() as nursery:
        for i in range(len(prompts)):
            nursery.start_soon(one, i)
    return [tuple(finals[i].outputs[0].token_ids) for i in range(len(prompts))]


def assert_runtime_idle(rt) -> None:
    """Assert a runtime holds nothing of any request: no live id, nothing queued or to abort,
    no engine request, every KV block of the in-process instance free (none borrowed: every
    block lent by a worker was given back) and no block table left. (Workers' own figures in
    ``statistics()`` come from their heartbeats and may lag; tests that need them exact ask the
    worker.)"""
    assert not rt._requests, f"live request ids: {sorted(rt._requests)}"
    assert not rt._queue, f"queued requests: {sorted(rt._queue)}"
    assert not rt._aborts, f"aborts not applied: {sorted(rt._aborts)}"
    engine = rt.engine
    assert not engine.requests, f"engine requests: {sorted(r.request_id for r in engine.requests.values())}"
    plan = engine.planner.statistics()
    assert (plan.num_running, plan.num_waiting) == (0, 0), plan
    assert engine.tables.num_requests == 0, f"{engine.tables.num_requests} block tables left"
    for inst in rt.statistics().instances[:1]:
        assert (inst.kv_used_blocks, inst.kv_reserved_blocks, inst.kv_lent_blocks, inst.kv_borrowed_blocks) == (0, 0, 0, 0), inst
        assert inst.kv_free_blocks == inst.kv_capacity_blocks, inst


def assert_same_outputs(got: dict, want: dict, logprob_tol: float = 1e-3) -> None:
    """``{request id: (token ids, logprobs)}`` twice: the same tokens, and each chosen token's
    log-probability (the rank-1 entry of ``want``) within ``logprob_tol``."""
    import math

    assert got.keys() == want.keys()
    for rid in want:
        assert got[rid][0] == want[rid][0], rid
        for g, w in zip(got[rid][1] or (), want[rid][1] or ()):
            (tok,) = [t for t in w if w[t].rank == 1]
            assert math.isclose(g[tok].logprob, w[tok].logprob, abs_tol=logprob_tol), rid


def assert_engines_idle(*engines) -> None:
    """Assert engines hold no KV of any request: nothing used, lent, reserved or borrowed, every
    block free (cached ones count as free) and no block table left."""
    for e in engines:
        c = e.pool.counters()
        assert (c.used, c.lent, c.reserved, c.borrowed) == (0, 0, 0, 0), (e.instance_id, c)
        assert c.free == c.capacity and e.tables.num_requests == 0, (e.instance_id, c)


def default_device() -> str:
    """The device runtime tests run on: ``INFINILLM_TEST_DEVICE`` if set, else ``cuda`` where
    torch sees a GPU, else ``cpu``. The tests' ``device`` fixture returns it."""
    return os.environ.get("INFINILLM_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
