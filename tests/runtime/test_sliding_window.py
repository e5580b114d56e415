"""Sliding-window models end to end: the runtime's greedy tokens equal transformers'.

A tiny random-weight Mistral (window 24 in every layer) and Qwen2 (window 24 from layer 1 on,
``max_window_layers=1``) with blocks of 16: the window is not a multiple of the block size, the
prompts are longer than the window, ``max_num_batched_tokens=16`` prefills them in chunks of
16 tokens, and decoding runs well past the window. transformers (eager attention, the whole
sequence recomputed each token, no cache) is the reference; each test first checks that the
window changes transformers' tokens on these prompts, or it would prove nothing.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import trio

import infinillm
from infinillm import SamplingParams
from infinillm.loader import load_model
from infinillm.testing import greedy_reference, import_transformers, make_tiny_model

BLOCK = 16
WINDOW = 24
NEW_TOKENS = 40
PROMPT_LENGTHS = (61, 37)  # 4 and 3 prefill chunks; decode reaches positions 100 and 76


def prompts(vocab_size: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(5)
    return [torch.randint(3, vocab_size, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


def without_window(folder, target):
    """A copy of the model folder whose config.json turns the sliding window off."""
    shutil.copytree(folder, target)
    config = json.loads((target / "config.json").read_text())
    config["sliding_window"] = None
    config["use_sliding_window"] = False
    (target / "config.json").write_text(json.dumps(config))
    return target


@torch.inference_mode()
def transformers_greedy(folder, prompt: list[int], n: int) -> list[int]:
    transformers = import_transformers()
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


async def runtime_greedy(folder, batch: list[list[int]], n: int, device: str) -> list[list[int]]:
    """Greedy tokens of every prompt, all generated concurrently (batched prefill chunks and
    decode steps)."""
    results: list[list[int]] = [[] for _ in batch]
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    async with infinillm.open_runtime(
        model=str(folder), device=device, block_size=BLOCK, kv_capacity_tokens=32 * BLOCK, max_model_len=256,
        max_num_batched_tokens=16,
    ) as rt:

        async def one(i: int) -> None:
            async for out in rt.generate({"prompt_token_ids": batch[i]}, params):
                results[i] = list(out.outputs[0].token_ids)

        async with trio.open_nursery() as nursery:
            for i in range(len(batch)):
                nursery.start_soon(one, i)
    return results


@pytest.mark.parametrize(
    "flavour, windows",
    [
        (dict(architecture="mistral"), (WINDOW, WINDOW)),
        (dict(architecture="qwen2", max_window_layers=1), (None, WINDOW)),
    ],
    ids=["mistral", "qwen2"],
)
async def test_greedy_tokens_equal_transformers_past_the_window(tmp_path, flavour, windows, device):
    folder = make_tiny_model(tmp_path / "m", seed=2, sliding_window=WINDOW, **flavour)
    model, _, args = load_model(folder, progress=False)
    assert args.layer_windows == windows
    batch = prompts(args.vocab_size)
    theirs = [transformers_greedy(folder, p, NEW_TOKENS) for p in batch]
    full = without_window(folder, tmp_path / "full")
    # The window matters on these prompts: full attention picks other tokens.
    assert all(transformers_greedy(full, p, NEW_TOKENS) != t for p, t in zip(batch, theirs))
    assert [greedy_reference(model, p, NEW_TOKENS)[0] for p in batch] == theirs  # ContiguousAttention
    assert await runtime_greedy(folder, batch, NEW_TOKENS, device) == theirs


@pytest.mark.parametrize("with_chunk", [False, True], ids=["decode-only", "mixed"])
def test_backend_attends_each_layer_within_its_window(monkeypatch, with_chunk):
    # Three layers, windows (None, 5, 5); requests decoding at positions 12 and 8 and, mixed,
    # a chunk at positions 4..6. Blocks of 4, 4 KV heads over 2: each layer's output equals
    # the reference's with that layer's window, and one decode plan is built per distinct
    # window per step (2), not per layer (3).
    import infinillm.attention as attention_module
    from infinillm.attention import AttentionMetadata, DistAttentionBackend, KVCache
    from infinillm.kernels.reference import append_kv_ref, partial_attention_ref

    windows = (None, 5, 5)
    bs, hkv, d = 4, 2, 16
    ctx = [13, 9, 7] if with_chunk else [13, 9]
    new = [1, 1, 3] if with_chunk else [1, 1]
    blocks = [[0, 3, 5, 7], [1, 4, 6], [2, 8]][: len(ctx)]
    cache = KVCache(3, 9, bs, hkv, d, torch.float32, "cpu")
    gen = torch.Generator().manual_seed(0)
    for layer in range(3):  # the keys and values already there
        for c, n, bl in zip(ctx, new, blocks):
            slots = torch.tensor([bl[p // bs] * bs + p % bs for p in range(c - n)])
            append_kv_ref(torch.randn(c - n, hkv, d, generator=gen), torch.randn(c - n, hkv, d, generator=gen),
                          cache.k[layer], cache.v[layer], slots)
    q_pos = torch.tensor([p for c, n in zip(ctx, new) for p in range(c - n, c)], dtype=torch.int32)
    slot_mapping = torch.tensor([bl[p // bs] * bs + p % bs for c, n, bl in zip(ctx, new, blocks) for p in range(c - n, c)])
    table = torch.full((len(ctx), 4), -1, dtype=torch.int32)
    start = torch.zeros((len(ctx), 4), dtype=torch.int32)
    length = torch.zeros((len(ctx), 4), dtype=torch.int32)
    for r, (c, bl) in enumerate(zip(ctx, blocks)):
        for j, blk in enumerate(bl):
            table[r, j], start[r, j], length[r, j] = blk, j * bs, min(bs, c - j * bs)
    cu = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32)
    meta = AttentionMetadata(cu, q_pos, table, start, length, slot_mapping)
    built = []  # the window of each plan built
    real_build = attention_module.build_decode_plan

    def counting_build(*args):
        built.append(args[-1])
        return real_build(*args)

    monkeypatch.setattr(attention_module, "build_decode_plan", counting_build)
    backend = DistAttentionBackend(cache, meta, backend="torch", layer_windows=windows)
    assert sorted(built, key=str) == [5, None]
    t = len(q_pos)
    for layer, window in enumerate(windows):
        q, k, v = torch.randn(t, 4, d, generator=gen), torch.randn(t, hkv, d, generator=gen), torch.randn(t, hkv, d, generator=gen)
        out = backend.forward(layer, q, k, v)
        ref, _ = partial_attention_ref(q, cu, q_pos, cache.k[layer], cache.v[layer], table, start, length, window=window)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert len(built) == 2
