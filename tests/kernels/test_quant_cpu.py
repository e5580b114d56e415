"""Matrix-vector products straight from GGUF-quantised weights, against gguf's dequantisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from infinillm.quant import QuantWeight, quant_kernels_available

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.skipif(not quant_kernels_available(), reason="the _quant_cpu extension is not built")


def quantized(kind: str, rows: int, cols: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random weights quantised with the gguf package: (raw blocks, the dequantised fp32 matrix)."""
    w = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    qtype = getattr(gguf.GGMLQuantizationType, kind)
    raw = gguf.quants.quantize(w, qtype)
    return raw, gguf.quants.dequantize(raw, qtype).reshape(rows, cols).astype(np.float32)


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
@pytest.mark.parametrize("tokens", [1, 3])
def test_products_equal_the_dequantised_weights(kind, tokens):
    """(Tiles of 1 to 8 tokens and of two rows, an odd row left over, and rows split over threads
    are covered by ``test_every_tile_and_split_gives_the_same_products``.)"""
    raw, ref = quantized(kind, 96, 160, seed=tokens)  # 160 = 5 blocks of 32
    qw = QuantWeight.from_gguf_blocks(kind, raw, 96, 160)
    assert torch.equal(qw.dequantize(), torch.from_numpy(ref))  # the repacking loses nothing
    x = torch.randn(tokens, 160, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(qw.matmul(x), x @ torch.from_numpy(ref).T, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
def test_every_tile_and_split_gives_the_same_products(kind):
    raw, ref = quantized(kind, 99, 96, seed=7)  # 99 rows: two-row tiles leave one over
    qw = QuantWeight.from_gguf_blocks(kind, raw, 99, 96)
    want = torch.from_numpy(ref)
    for tokens in [1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 33]:
        x = torch.randn(tokens, 96, generator=torch.Generator().manual_seed(tokens))
        for threads in (1, 2, 3):
            got = qw.matmul(x, threads=threads, min_macs=0)
            torch.testing.assert_close(got, x @ want.T, atol=2e-5, rtol=1e-5, msg=f"{tokens} tokens, {threads} threads")


def test_rows_reorder_and_concatenate_like_the_fp32_matrices():
    raw_a, ref_a = quantized("Q4_1", 64, 64, seed=1)
    raw_b, ref_b = quantized("Q4_1", 32, 64, seed=2)
    a = QuantWeight.from_gguf_blocks("Q4_1", raw_a, 64, 64)
    b = QuantWeight.from_gguf_blocks("Q4_1", raw_b, 32, 64)
    perm = np.random.default_rng(3).permutation(64)
    fused = QuantWeight.concat([a.take_rows(perm), b])
    assert torch.equal(fused.dequantize(), torch.from_numpy(np.concatenate([ref_a[perm], ref_b])))
    mixed = QuantWeight.concat([a, QuantWeight.from_gguf_blocks("Q8_0", quantized("Q8_0", 8, 64, 4)[0], 8, 64)])
    assert mixed is None  # parts of different kinds are not fused


def test_bad_shapes_are_refused():
    raw, _ = quantized("Q8_0", 4, 64, seed=5)
    qw = QuantWeight.from_gguf_blocks("Q8_0", raw, 4, 64)
    with pytest.raises(ValueError, match="do not agree"):
        qw.matmul(torch.zeros(1, 96))


def test_the_row_pool_hands_over_many_products_from_several_threads():
    """Products back to back from two Python threads at once, each split over the pool (whose
    threads spin between jobs, then sleep): every result is right and none is lost."""
    import threading

    raw, ref = quantized("Q4_1", 80, 64, seed=3)
    qw = QuantWeight.from_gguf_blocks("Q4_1", raw, 80, 64)
    want = torch.from_numpy(ref)
    errors = []

    def work(seed):
        x = torch.randn(9, 64, generator=torch.Generator().manual_seed(seed))
        expect = x @ want.T
        for _ in range(300):
            got = qw.matmul(x, threads=2, min_macs=0)
            if not torch.allclose(got, expect, atol=2e-5, rtol=1e-5):
                errors.append(seed)
                return

    threads = [threading.Thread(target=work, args=(s,)) for s in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a product never returned"
    assert errors == []
