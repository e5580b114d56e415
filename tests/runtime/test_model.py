"""The Llama-family model over packed batches, with the ContiguousAttention reference backend.

The tiny models here are random (seeded); transformers checks the flavours (Qwen2 biases, RoPE
scalings, untied heads) on the same weights.
"""

from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch

from infinillm.errors import ValidationError
from infinillm.kernels.reference import partial_attention_ref
from infinillm.loader import load_model
from infinillm.model import ContiguousAttention, LlamaModel, ModelArgs, RopeScaling, rope_inv_freq
from infinillm.testing import import_transformers, make_tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY = ModelArgs(
    vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
    tie_word_embeddings=True,
)


def tiny_model(args: ModelArgs = TINY, seed: int = 0) -> LlamaModel:
    return LlamaModel(args).init_random_weights(seed=seed, std=0.2)


def run(model: LlamaModel, seqs: list[tuple[str, list[int], list[int]]], attn: ContiguousAttention) -> torch.Tensor:
    """One forward of a packed batch: seqs are (seq_id, token ids, positions)."""
    ids = torch.tensor([t for _, toks, _ in seqs for t in toks])
    pos = torch.tensor([p for _, _, ps in seqs for p in ps])
    attn.prepare([(s, len(toks)) for s, toks, _ in seqs], pos)
    with torch.inference_mode():
        return model(ids, pos, attn)


class SpyAttention(ContiguousAttention):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__(args)
        self.calls: list[tuple[int, tuple, tuple, tuple]] = []

    def forward(self, layer_index, q, k, v):
        self.calls.append((layer_index, tuple(q.shape), tuple(k.shape), tuple(v.shape)))
        return super().forward(layer_index, q, k, v)


def test_shapes_of_hidden_logits_and_what_the_backend_sees():
    model = tiny_model()
    attn = SpyAttention(TINY)
    hidden = run(model, [("a", [5, 6, 7], [0, 1, 2]), ("b", [8, 9], [0, 1])], attn)
    assert hidden.shape == (5, 64) and hidden.dtype == torch.float32
    logits = model.compute_logits(hidden[[2, 4]])
    assert logits.shape == (2, 97) and logits.dtype == torch.float32
    # each layer hands the backend q [T, H, Dh] and the GQA k, v [T, Hkv, Dh], in layer order
    assert attn.calls == [(0, (5, 4, 16), (5, 2, 16), (5, 2, 16)), (1, (5, 4, 16), (5, 2, 16), (5, 2, 16))]
    assert attn.seq_len("a") == 3 and attn.seq_len("b") == 2


def test_gqa_equals_multi_head_attention_with_each_kv_head_repeated():
    # Hkv=2 serving H=4 query heads (groups of 2) is MHA whose kv heads are repeated in groups.
    gqa = tiny_model()
    mha_args = dataclasses.replace(TINY, num_kv_heads=4)
    mha = LlamaModel(mha_args)
    with torch.no_grad():
        for name, p in mha.named_parameters():
            src = gqa.get_parameter(name)
            if name.endswith("wqkv.weight"):
                q, k, v = src.split((64, 32, 32))
                rep = lambda w: w.view(2, 16, 64).repeat_interleave(2, dim=0).reshape(64, 64)  # noqa: E731
                p.copy_(torch.cat((q, rep(k), rep(v))))
            else:
                p.copy_(src)
    toks = [[3, 1, 4, 1, 5, 9, 2, 6]]
    a = run(gqa, [("s", toks[0], list(range(8)))], ContiguousAttention(TINY))
    b = run(mha, [("s", toks[0], list(range(8)))], ContiguousAttention(mha_args))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_tied_and_untied_embeddings():
    torch.manual_seed(0)
    tied = tiny_model()
    assert tied.lm_head is None
    hidden = torch.randn(3, 64)
    torch.testing.assert_close(tied.compute_logits(hidden), hidden @ tied.embed.weight.T)
    untied = tiny_model(dataclasses.replace(TINY, tie_word_embeddings=False))
    assert untied.lm_head is not None and untied.lm_head.weight.data_ptr() != untied.embed.weight.data_ptr()
    torch.testing.assert_close(untied.compute_logits(hidden), hidden @ untied.lm_head.weight.T)
    assert "lm_head.weight" in dict(untied.named_parameters()) and "lm_head.weight" not in dict(tied.named_parameters())


def test_packed_batch_equals_each_sequence_alone():
    torch.manual_seed(0)
    model = tiny_model()
    prompts = {"a": torch.randint(0, 97, (11,)).tolist(), "b": torch.randint(0, 97, (4,)).tolist(), "c": torch.randint(0, 97, (7,)).tolist()}
    alone = {}
    for s, toks in prompts.items():
        alone[s] = run(model, [(s, toks, list(range(len(toks))))], ContiguousAttention(TINY))

    # The same tokens through one cache in three steps, each a packed mix of prefill chunks and
    # single tokens of different sequences, listed in a different order each step.
    attn = ContiguousAttention(TINY)
    a, b, c = prompts["a"], prompts["b"], prompts["c"]
    step1 = run(model, [("a", a[:6], list(range(6))), ("b", b[:3], [0, 1, 2])], attn)
    step2 = run(model, [("c", c, list(range(7))), ("b", b[3:], [3]), ("a", a[6:9], [6, 7, 8])], attn)
    step3 = run(model, [("a", a[9:], [9, 10])], attn)
    torch.testing.assert_close(step1[:6], alone["a"][:6], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(step1[6:], alone["b"][:3], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(step2[:7], alone["c"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(step2[7:8], alone["b"][3:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(step2[8:], alone["a"][6:9], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(step3, alone["a"][9:], rtol=1e-5, atol=1e-5)


def test_attention_is_causal_by_position_not_by_order():
    # Tokens of one chunk given out of order attend by their positions.
    model = tiny_model()
    toks = [10, 20, 30, 40, 50]
    in_order = run(model, [("s", toks, [0, 1, 2, 3, 4])], ContiguousAttention(TINY))
    perm = [3, 0, 4, 2, 1]
    shuffled = run(model, [("s", [toks[i] for i in perm], perm)], ContiguousAttention(TINY))
    torch.testing.assert_close(shuffled, in_order[perm], rtol=1e-5, atol=1e-5)


def test_contiguous_attention_agrees_with_the_kernel_reference():
    # The standalone backend computes what the paged DistAttention reference computes.
    torch.manual_seed(1)
    args = TINY
    attn = ContiguousAttention(args)
    q = torch.randn(6, 4, 16)
    k, v = torch.randn(6, 2, 16), torch.randn(6, 2, 16)
    pos = torch.tensor([0, 1, 2, 3, 4, 5])
    attn.prepare([("s", 6)], pos)
    ours = attn.forward(0, q, k, v)
    out, lse = partial_attention_ref(
        q, torch.tensor([0, 6], dtype=torch.int32), pos.int(), k[None], v[None],
        torch.tensor([[0]], dtype=torch.int32), torch.tensor([[0]], dtype=torch.int32), torch.tensor([[6]], dtype=torch.int32),
    )
    torch.testing.assert_close(ours, out, rtol=1e-5, atol=1e-5)


def test_sliding_window_limits_what_a_query_sees():
    # One layer: layer-0 keys depend only on their own token, so with a window of 3 the last
    # token's output equals running just the last 3 tokens at their positions.
    args = dataclasses.replace(TINY, num_layers=1, layer_windows=(3,))
    model = tiny_model(args)
    toks = [5, 17, 2, 33, 8, 41]
    full = run(model, [("s", toks, list(range(6)))], ContiguousAttention(args))
    tail = run(model, [("s", toks[3:], [3, 4, 5])], ContiguousAttention(args))
    torch.testing.assert_close(full[-1], tail[-1], rtol=1e-5, atol=1e-5)
    unwindowed = run(model, [("s", toks, list(range(6)))], ContiguousAttention(dataclasses.replace(args, layer_windows=None)))
    assert not torch.allclose(full[-1], unwindowed[-1], atol=1e-3)


def test_qwen2_style_biases_on_q_k_v_only():
    args = dataclasses.replace(TINY, attention_bias=True, architecture="qwen2")
    model = tiny_model(args)
    layer = model.layers[0]
    assert layer.wqkv.bias is not None and layer.wqkv.bias.shape == (64 + 32 + 32,)
    assert layer.wo.bias is None and layer.w_gate_up.bias is None
    toks = [1, 2, 3, 4]
    with_bias = run(model, [("s", toks, [0, 1, 2, 3])], ContiguousAttention(args))
    with torch.no_grad():
        for lay in model.layers:
            lay.wqkv.bias.zero_()
    without = run(model, [("s", toks, [0, 1, 2, 3])], ContiguousAttention(args))
    assert not torch.allclose(with_bias, without, atol=1e-3)


def test_linear_rope_scaling_is_position_interpolation():
    # With linear scaling by f, positions f*p rotate exactly as positions p do unscaled.
    scaled_args = dataclasses.replace(TINY, rope_scaling=RopeScaling(type="linear", factor=4.0))
    plain, scaled = tiny_model(), tiny_model(scaled_args)
    toks = [7, 3, 9, 1, 4]
    a = run(plain, [("s", toks, [0, 1, 2, 3, 4])], ContiguousAttention(TINY))
    b = run(scaled, [("s", toks, [0, 4, 8, 12, 16])], ContiguousAttention(scaled_args))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_llama3_rope_scaling_keeps_high_frequencies_and_divides_low_ones():
    s = RopeScaling(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)
    args = dataclasses.replace(TINY, head_dim=16, rope_theta=10000.0, rope_scaling=s)
    base, _ = rope_inv_freq(dataclasses.replace(args, rope_scaling=None))
    scaled, factor = rope_inv_freq(args)
    wavelen = 2 * math.pi / base
    high = wavelen < 64 / 4.0  # short wavelengths: kept
    low = wavelen > 64 / 1.0  # long wavelengths: divided by the factor
    assert factor == 1.0 and high.any() and low.any()
    torch.testing.assert_close(scaled[high], base[high])
    torch.testing.assert_close(scaled[low], base[low] / 8.0)
    mid = ~high & ~low
    assert bool(((scaled[mid] < base[mid]) & (scaled[mid] > base[mid] / 8.0)).all())


def test_rope_freq_factors_divide_inverse_frequencies():
    factors = tuple(float(i + 1) for i in range(8))
    base, _ = rope_inv_freq(TINY)
    scaled, _ = rope_inv_freq(dataclasses.replace(TINY, rope_freq_factors=factors))
    torch.testing.assert_close(scaled, base / torch.tensor(factors))


def test_model_args_from_hf_config_flavours():
    base = {"vocab_size": 100, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
    llama = ModelArgs.from_hf_config({**base, "model_type": "llama", "num_key_value_heads": 2, "rope_theta": 5e5,
                                      "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}})
    assert (llama.num_kv_heads, llama.head_dim, llama.rope_theta, llama.attention_bias) == (2, 16, 5e5, False)
    assert llama.rope_scaling == RopeScaling(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
    qwen = ModelArgs.from_hf_config({**base, "model_type": "qwen2", "sliding_window": 4096, "use_sliding_window": False, "tie_word_embeddings": True})
    assert (qwen.attention_bias, qwen.attention_out_bias, qwen.layer_windows, qwen.num_kv_heads, qwen.tie_word_embeddings) == (True, False, None, 4, True)
    mistral = ModelArgs.from_hf_config({**base, "model_type": "mistral", "sliding_window": 4096, "head_dim": 32})
    assert (mistral.layer_windows, mistral.head_dim, mistral.q_size) == ((4096, 4096), 32, 128)
    # transformers 5 writes rope_parameters instead of rope_theta / rope_scaling
    v5 = ModelArgs.from_hf_config({**base, "model_type": "llama", "rope_parameters": {"rope_theta": 1e6, "rope_type": "linear", "factor": 2.0}})
    assert v5.rope_theta == 1e6 and v5.rope_scaling == RopeScaling(type="linear", factor=2.0)
    assert ModelArgs.from_hf_config({**base, "model_type": "llama", "rope_parameters": {"rope_theta": 1e4, "rope_type": "default"}}).rope_scaling is None


@pytest.mark.parametrize(
    "config, windows",
    [
        ({"model_type": "llama", "sliding_window": 64}, None),  # Llama has no sliding window
        ({"model_type": "mistral"}, (4096,) * 4),  # MistralConfig's default window
        ({"model_type": "mistral", "sliding_window": None}, None),  # Mistral v0.2+
        ({"model_type": "mistral", "sliding_window": 100}, (100,) * 4),
        ({"model_type": "qwen2", "sliding_window": 100}, None),  # use_sliding_window defaults to False
        ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": None}, None),
        ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 100}, None),  # max_window_layers 28 > 4 layers
        ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 100, "max_window_layers": 1}, (None, 100, 100, 100)),
        ({"model_type": "qwen2", "use_sliding_window": True, "max_window_layers": 3}, (None, None, None, 4096)),
        ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 100, "max_window_layers": 1,  # layer_types win
          "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]}, (100, None, 100, None)),
    ],
)
def test_sliding_windows_per_layer_from_hf_config(config, windows):
    base = {"vocab_size": 100, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4}
    args = ModelArgs.from_hf_config({**base, **config})
    assert args.layer_windows == windows
    assert [args.window(i) for i in range(4)] == list(windows or (None,) * 4)


def test_bad_layer_windows_are_refused():
    with pytest.raises(ValidationError, match=r"ModelArgs\.layer_windows=\(8,\) is invalid: must hold one window per layer \(2\)"):
        dataclasses.replace(TINY, layer_windows=(8,))  # 2 layers
    with pytest.raises(ValidationError) as e:
        dataclasses.replace(TINY, layer_windows=(8, 0))
    assert str(e.value) == "ModelArgs.layer_windows=(8, 0) is invalid: each must be an int >= 1 (a sliding window) or None"
    config = {"model_type": "qwen2", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "use_sliding_window": True, "layer_types": ["sliding_attention", "chunked_attention"]}
    with pytest.raises(ValidationError) as e:
        ModelArgs.from_hf_config(config)
    assert str(e.value) == (
        "layer_types=['sliding_attention', 'chunked_attention'] is invalid: must be 2 of 'sliding_attention', 'full_attention'"
    )


@pytest.mark.parametrize(
    "change, field, message",
    [
        ({"model_type": "gpt2"}, "model_type", "model_type='gpt2' is invalid: unsupported architecture; supported: llama, mistral, qwen2"),
        ({"num_key_value_heads": 3}, "num_kv_heads", "ModelArgs.num_kv_heads=3 is invalid: must divide num_heads=4 (GQA groups)"),
        (
            {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
            "rope_scaling.rope_type",
            "rope_scaling.rope_type='dynamic' is invalid: unsupported; supported: 'default', 'linear', 'llama3', 'yarn'",
        ),
        ({"hidden_size": None}, "config.json", "config.json='hidden_size' is invalid: is a required key of a Llama-family config"),
    ],
)
def test_bad_configs_raise_validation_errors_naming_the_value(change, field, message):
    config = {"model_type": "llama", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
    config = {k: v for k, v in (config | change).items() if v is not None}
    with pytest.raises(ValidationError) as e:
        ModelArgs.from_hf_config(config)
    assert e.value.field == field and str(e.value) == message


def test_forward_rejects_mismatched_inputs():
    model = tiny_model()
    with pytest.raises(ValidationError) as e:
        model(torch.tensor([1, 2, 3]), torch.tensor([0, 1]), ContiguousAttention(TINY))
    assert str(e.value) == "input_ids.shape=(3,) is invalid: must be [T], the shape of positions (2,)"
    with pytest.raises(ValidationError) as e:
        LlamaModel(TINY, dtype=torch.int32)
    assert str(e.value) == "dtype=torch.int32 is invalid: must be torch.float32, torch.bfloat16 or torch.float16"
    with pytest.raises(ValidationError) as e:
        ContiguousAttention(TINY).prepare([("a", 2)], torch.arange(3))
    assert str(e.value) == "seqs=[2] is invalid: token counts must be >= 1 and sum to len(positions)=3"


def test_bfloat16_model_runs_and_stays_close_to_float32():
    model32 = tiny_model()
    model16 = LlamaModel(TINY, dtype=torch.bfloat16)
    model16.load_state_dict(model32.state_dict())
    toks = [4, 8, 15, 16, 23, 42]
    a = run(model32, [("s", toks, list(range(6)))], ContiguousAttention(TINY))
    b = run(model16, [("s", toks, list(range(6)))], ContiguousAttention(TINY))
    assert b.dtype == torch.bfloat16
    assert float((a - b.float()).abs().max()) < 0.1 * float(a.abs().max())


# ---- the same weights in transformers ---------------------------------------------------------


@pytest.mark.parametrize(
    "flavour",
    [
        dict(architecture="llama"),
        dict(architecture="llama", tie_word_embeddings=False, num_kv_heads=1),
        dict(architecture="qwen2", rope_theta=1e6),
        dict(architecture="mistral"),
        dict(architecture="llama", rope_scaling={"rope_type": "linear", "factor": 4.0}),
        dict(architecture="llama", rope_theta=5e5, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 256}),
        dict(architecture="qwen2", rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512}),
    ],
    ids=["llama", "untied-mqa", "qwen2", "mistral", "linear", "llama3", "yarn"],
)
def test_tiny_flavours_match_transformers(tmp_path, flavour):
    transformers = import_transformers()
    folder = make_tiny_model(tmp_path / "m", seed=3, **flavour)
    ours, _, args = load_model(folder, progress=False)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    torch.manual_seed(0)
    ids = torch.randint(0, args.vocab_size, (300,))
    pos = torch.arange(300) * 5  # far positions, so the scaled frequencies matter
    attn = ContiguousAttention(args)
    attn.prepare([("s", 300)], pos)
    with torch.inference_mode():
        logits = ours.compute_logits(ours(ids, pos, attn))
        ref = theirs(input_ids=ids[None], position_ids=pos[None]).logits[0].float()
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)
