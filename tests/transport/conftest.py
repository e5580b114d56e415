"""Shared pieces of the transport tests: message factories and a peer-server script path."""

from __future__ import annotations

import os

import pytest
import torch

from infinillm.transport import AttentionQuery, AttentionResult

PEER_SERVER = os.path.join(os.path.dirname(__file__), "peer_server.py")


def make_query(batch: int = 1, num_heads: int = 32, head_dim: int = 128, max_blocks: int = 4, *, layer: int = 0,
               seed: int = 0, with_kv: bool = False, dtype: torch.dtype = torch.float16) -> AttentionQuery:
    """A decode-shaped query: one row per request, ``max_blocks`` blocks of 16 tokens each."""
    g = torch.Generator().manual_seed(seed)
    table = torch.arange(batch * max_blocks, dtype=torch.int32).view(batch, max_blocks)
    kv = {}
    if with_kv:
        kv = dict(
            k=torch.randn(batch, num_heads // 4, head_dim, generator=g).to(dtype),
            v=torch.randn(batch, num_heads // 4, head_dim, generator=g).to(dtype),
            slot_mapping=torch.arange(batch, dtype=torch.int64) * 16,
        )
    return AttentionQuery.build(
        layer,
        tuple(range(100, 100 + batch)),
        torch.randn(batch, num_heads, head_dim, generator=g).to(dtype),
        None,
        torch.full((batch,), max_blocks * 16 - 1, dtype=torch.int32),
        table,
        table % max_blocks * 16,
        torch.full((batch, max_blocks), 16, dtype=torch.int32),
        **kv,
    )


def result_for(q: AttentionQuery) -> AttentionResult:
    """A deterministic answer that depends on the query (so mixed-up replies show)."""
    return AttentionResult(q.layer, q.q * 2, q.q.float().sum(-1))


@pytest.fixture
def query() -> AttentionQuery:
    return make_query()
