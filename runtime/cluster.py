"""Instances as one engine sees the others: the ``Peer`` protocol, and one step's remote attention.

An engine (the *home* of its requests) borrows KV blocks from other instances (*creditors*) and
asks them for partial attention over those blocks (DistAttention, ../shared/DESIGN.md §2)::

    home A                                           creditor B
    plan: request r short of blocks ──reserve(A, n)──► pool.try_reserve   (first come, first served)
                                    ◄──reservation──
                                    ──commit(res, r)─► blocks now r's     (A appends them to r's table)
    each layer:  q, k, v of the step
      AttentionQuery(rows of r, q, the new k/v whose slots are on B) ──► append_kv, partial attention
      local partial attention (A's blocks) meanwhile                      over r's blocks on B
      merge (log-sum-exp, fp32)                   ◄── AttentionResult(out fp32, lse) ──
    r finishes / aborts / is preempted ──release(r, blocks)──► pool.free_blocks

``Peer`` is what the engine needs of another instance; every call is made from the engine's
step (its worker thread) and returns when done, except ``start_attention``, which only sends:
the engine computes its own partial meanwhile and waits on the returned ``PendingAttention``.
``LocalPeer`` is another ``Engine`` in the same process, reached through the wire format (each
query and result is encoded and decoded by the codec, with no socket): it is how the cluster
logic is tested without processes. The worker transport implements the same protocol over
ZeroMQ.

``RemoteAttention`` is one step's share of one creditor: which query rows and which new k/v
rows travel there, built once per step from the block tables, called once per layer.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from .transport import AttentionQuery, AttentionResult, Codec

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["Peer", "PendingAttention", "LocalPeer", "RemoteAttention"]

PendingAttention = Callable[[], AttentionResult]
"""Waits for a creditor's answer to one ``AttentionQuery`` and returns it."""


class Peer(Protocol):
    """Another instance, as a home engine sees it."""

    @property
    def instance_id(self) -> int: ...

    def lendable(self) -> int:
        """Blocks it could lend now (free, under its lending cap): a hint, the reservation decides."""
        ...

    def reserve(self, borrower: int, n: int) -> int | None:
        """Reserve ``n`` blocks for instance ``borrower``: a reservation id, or None (no room)."""
        ...

    def commit(self, reservation_id: int, request_id: int) -> list[int]:
        """Turn a reservation into blocks of ``request_id``; their ids, in order."""
        ...

    def release(self, request_id: int, blocks: list[int]) -> None:
        """Free blocks it holds for ``request_id`` (the request ended or was preempted)."""
        ...

    def start_attention(self, query: AttentionQuery) -> PendingAttention:
        """Send a query; the returned callable waits for the result."""
        ...


class LocalPeer:
    """An ``Engine`` of this process as a peer, through the wire format but no socket.

    Queries and results go through ``Codec`` encode and decode, so what crosses is exactly what
    a socket would carry. Calls run at once, in the caller's thread: the engines of one process
    must not step at the same time (tests drive them one after another).
    """

    def __init__(self, engine: Engine, *, reservation_ttl_s: float = 2.0, codec: Codec | None = None) -> None:
        self.engine = engine
        self.reservation_ttl_s = reservation_ttl_s
        self.codec = codec or Codec()

    @property
    def instance_id(self) -> int:
        return self.engine.instance_id

    def lendable(self) -> int:
        return self.engine.pool.lendable

    def reserve(self, borrower: int, n: int) -> int | None:
        return self.engine.pool.try_reserve(borrower, n, time.monotonic(), self.reservation_ttl_s)

    def commit(self, reservation_id: int, request_id: int) -> list[int]:
        return self.engine.pool.commit(reservation_id, request_id, time.monotonic())

    def release(self, request_id: int, blocks: list[int]) -> None:
        self.engine.pool.free_blocks(request_id, blocks)

    def start_attention(self, query: AttentionQuery) -> PendingAttention:
        _, received = self.codec.decode(self.codec.encode(query))
        result = self.engine.serve_attention(received)
        _, answer = self.codec.decode(self.codec.encode(result))
        return lambda: answer


class RemoteAttention:
    """One step's remote partial attention on one creditor.

    ``rows`` [T'] are the step's query rows of the requests with blocks on the creditor,
    ``kv_rows`` [n] the rows whose new k, v go there (their slots in ``slot_mapping``). Per
    layer, ``start`` sends the query and returns a callable that waits and gives the partial
    spread back over all T rows (out fp32 zeros and lse -inf for the rows not sent)::

        q [T, H, D] ──rows──► q' [T', H, D] ──► creditor ──► out' [T', H, D], lse' [T', H]
                                                              └─scatter─► out [T, H, D], lse [T, H]
    """

    def __init__(
        self,
        peer: Peer,
        request_ids: list[int],
        rows: np.ndarray,
        cu_q: np.ndarray,
        q_pos: np.ndarray,
        tables: tuple[np.ndarray, np.ndarray, np.ndarray],
        kv_rows: np.ndarray,
        slot_mapping: np.ndarray,
        device: torch.device,
    ) -> None:
        self.peer = peer
        self.request_ids = tuple(request_ids)
        self.rows = torch.from_numpy(rows).to(device)
        self.cu_q = torch.from_numpy(cu_q)
        self.q_pos = torch.from_numpy(q_pos)
        self.blocks = torch.from_numpy(np.stack(tables))  # [3, B', M]
        self.kv_rows = torch.from_numpy(kv_rows).to(device) if len(kv_rows) else None
        self.slot_mapping = torch.from_numpy(slot_mapping) if len(kv_rows) else None

    def start(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
        kv = {}
        if self.kv_rows is not None:
            kv = dict(k=k.index_select(0, self.kv_rows).cpu(), v=v.index_select(0, self.kv_rows).cpu(),
                      slot_mapping=self.slot_mapping)
        query = AttentionQuery(layer, self.request_ids, q.index_select(0, self.rows).cpu(), self.cu_q, self.q_pos,
                               self.blocks, **kv)
        pending = self.peer.start_attention(query)
        total, num_heads, head_dim = q.shape

        def wait() -> tuple[torch.Tensor, torch.Tensor]:
            result = pending()
            out = torch.zeros(total, num_heads, head_dim, dtype=torch.float32, device=q.device)
            lse = torch.full((total, num_heads), float("-inf"), dtype=torch.float32, device=q.device)
            out.index_copy_(0, self.rows, result.out.to(device=q.device, dtype=torch.float32))
            lse.index_copy_(0, self.rows, result.lse.to(q.device))
            return out, lse

        return wait
