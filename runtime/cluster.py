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
the engine computes its own partial meanwhile and waits on the returned ``PendingAttention``,
and ``release``, which does not wait (it may come from the serving loop, between steps).
``LocalPeer`` is another ``Engine`` in the same process, reached through the wire format (each
query and result is encoded and decoded by the codec, with no socket): it is how the cluster
logic is tested without processes. The worker transport implements the same protocol over
ZeroMQ.

``RemoteAttention`` is one step's share of one creditor: which query rows and which new k/v
rows travel there, built once per step from the block tables, called once per layer.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
import trio
import zmq

from .errors import InstanceDeadError, TransportError, ValidationError
from .transport import (
    AttentionQuery,
    AttentionResult,
    BlockTransfer,
    CancelReservation,
    Client,
    Codec,
    CommitReservation,
    Committed,
    ErrorReply,
    FetchBlocks,
    ReleaseBlocks,
    ClaimCached,
    Claimed,
    ReserveBlocks,
    Reservation,
    error_from_reply,
)

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["Peer", "PendingAttention", "LocalPeer", "RemoteAttention", "PeerService", "ZmqPeer", "connect_peer"]

log = logging.getLogger("infinillm.cluster")

# A query of at most this many rows is answered on the loop itself (microseconds of work);
# longer ones (prefill chunks) in a worker thread, so the loop keeps serving meanwhile.
_INLINE_QUERY_ROWS = 64

PendingAttention = Callable[[], AttentionResult]

# A step waiting on a creditor's attention result looks this often whether it was lost.
_LOST_POLL_S = 0.1
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

    def release(self, request_id: int, blocks: list[int], cached=()) -> None:
        """Free blocks it holds for ``request_id`` (the request ended or was preempted);
        ``cached``: (block, hash) pairs among them that it keeps cached (prefix caching)."""
        ...

    def claim(self, request_id: int, home: int, blocks: list[int], hashes: list[int]) -> bool:
        """Take blocks it keeps cached for instance ``home`` (named by ``hashes``) for a new request
        ``request_id``: all of them, or none (False: evicted meanwhile)."""
        ...

    def write_blocks(self, request_id: int, block_ids: list[int], kv: torch.Tensor) -> None:
        """Migration out: write ``kv`` [layers, 2, n, block_size, Hkv, D] into blocks it lends
        ``request_id`` (committed beforehand)."""
        ...

    def read_blocks(self, request_id: int, block_ids: list[int]) -> torch.Tensor:
        """Migration home: the KV of blocks it lends ``request_id``, as ``write_blocks`` takes it."""
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
        return self.engine.lend_reserve(borrower, n, self.reservation_ttl_s)

    def commit(self, reservation_id: int, request_id: int) -> list[int]:
        return self.engine.lend_commit(reservation_id, request_id)

    def release(self, request_id: int, blocks: list[int], cached=()) -> None:
        _, msg = self.codec.decode(self.codec.encode(_release_message(request_id, blocks, cached)))
        self.engine.lend_release(msg.request_id, list(msg.block_ids), list(zip(msg.cached_blocks, msg.cached_hashes)))

    def claim(self, request_id: int, home: int, blocks: list[int], hashes: list[int]) -> bool:
        _, msg = self.codec.decode(self.codec.encode(ClaimCached(request_id, home, tuple(blocks), tuple(hashes))))
        return self.engine.lend_claim(msg.request_id, msg.home, list(msg.block_ids), list(msg.hashes))

    def write_blocks(self, request_id: int, block_ids: list[int], kv: torch.Tensor) -> None:
        _, msg = self.codec.decode(self.codec.encode(BlockTransfer(request_id, tuple(block_ids), kv)))
        self.engine.write_lent_blocks(msg.request_id, list(msg.block_ids), msg.kv)

    def read_blocks(self, request_id: int, block_ids: list[int]) -> torch.Tensor:
        _, msg = self.codec.decode(self.codec.encode(FetchBlocks(request_id, tuple(block_ids))))
        _, answer = self.codec.decode(self.codec.encode(self.engine.read_lent_blocks(msg.request_id, list(msg.block_ids))))
        return answer.kv

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


# ---- over ZeroMQ ---------------------------------------------------------------------------------


class PeerService:
    """The creditor side: answers a debtor's reservations, commits, releases and attention
    queries for ``engine`` (the handler of its peer ``Server``).

    Pool changes take the engine's ``pool_lock`` (held by the engine only while it plans, never
    while it waits on a peer), so they are short. Attention over a prefill chunk runs in a worker
    thread, so the loop keeps answering other debtors (and its own engine's peers) meanwhile; a
    decode's few rows are answered on the loop (tens of microseconds, less than a thread hop).
    Either way nothing here waits on the engine's step: an instance waiting on its creditors
    still serves its debtors, and two instances borrowing from each other cannot deadlock.
    """

    def __init__(self, engine: Engine, *, reservation_ttl_s: float = 2.0) -> None:
        self.engine = engine
        self.reservation_ttl_s = reservation_ttl_s

    async def handle(self, msg):
        engine = self.engine
        if isinstance(msg, AttentionQuery):
            if msg.q.shape[0] <= _INLINE_QUERY_ROWS:  # a decode's few rows: cheaper than a thread hop
                return engine.serve_attention(msg)
            return await trio.to_thread.run_sync(engine.serve_attention, msg)
        if isinstance(msg, ReserveBlocks):
            rid = engine.lend_reserve(msg.borrower, msg.num_blocks, self.reservation_ttl_s)
            if rid is None:  # no room: say how much there is now, the borrower's fresh hint
                return Reservation(None, engine.pool.lendable)
            return Reservation(rid, msg.num_blocks, self.reservation_ttl_s)
        if isinstance(msg, CommitReservation):
            blocks = engine.lend_commit(msg.reservation_id, msg.request_id)
            return Committed(msg.reservation_id, msg.request_id, tuple(blocks))
        if isinstance(msg, CancelReservation):
            engine.lend_cancel(msg.reservation_id)
            return None
        if isinstance(msg, ReleaseBlocks):
            engine.lend_release(msg.request_id, list(msg.block_ids), list(zip(msg.cached_blocks, msg.cached_hashes)))
            return None
        if isinstance(msg, ClaimCached):
            ok = engine.lend_claim(msg.request_id, msg.home, list(msg.block_ids), list(msg.hashes))
            return Claimed(msg.request_id, ok)
        if isinstance(msg, BlockTransfer):  # migration out of the debtor: copied in a thread
            await trio.to_thread.run_sync(engine.write_lent_blocks, msg.request_id, list(msg.block_ids), msg.kv)
            return None
        if isinstance(msg, FetchBlocks):  # migration home
            return await trio.to_thread.run_sync(engine.read_lent_blocks, msg.request_id, list(msg.block_ids))
        raise ValidationError(
            "message", type(msg).__name__, "is not a peer request (reservation, commit, release, attention, migration)"
        )


class ZmqPeer:
    """Another instance behind its peer ``Server``, for an engine whose step runs in a worker
    thread of ``token``'s trio loop: each call crosses into that loop (``trio.from_thread``)
    and talks through ``client``. ``release`` does not wait (it may be called from the loop
    itself, between steps); ``start_attention`` only sends, and the returned callable waits.

    ``lendable`` is a hint kept here: the peer's figure from its last answer, less what was
    borrowed since, plus what was given back; the reservation decides.
    """

    def __init__(self, instance_id: int, client: Client, nursery: trio.Nursery, token: trio.lowlevel.TrioToken,
                 lendable: int, *, timeout_s: float = 60.0, direct: zmq.Socket | None = None,
                 codec: Codec | None = None) -> None:
        self._instance_id = instance_id
        self.client = client
        # Attention queries, the hot path (one per creditor per layer), go straight from the
        # step's thread through a DEALER of its own when given (no hop into the loop and back).
        self._direct = direct
        self._codec = codec or Codec()
        self._seq = 0
        self._nursery = nursery
        self._token = token
        self._lendable = lendable
        self.timeout_s = timeout_s
        self._releasing = 0  # releases asked for and not answered yet (any thread may ask)
        self._releasing_lock = threading.Lock()
        self._released = trio.Event()
        self._released.set()
        self.lost: str | None = None  # why the peer is gone (``mark_lost``), or None
        self._scopes: set[trio.CancelScope] = set()  # its requests in flight on the loop

    @property
    def instance_id(self) -> int:
        return self._instance_id

    def lendable(self) -> int:
        return 0 if self.lost is not None else max(0, self._lendable)

    def set_lendable(self, n: int) -> None:
        """The gManager's fresher figure (its ledger, from the peer's heartbeats)."""
        self._lendable = n

    def mark_lost(self, reason: str) -> None:
        """The peer is gone (on the loop's thread): its requests in flight end at once with
        ``InstanceDeadError``, an attention wait raises it within ``_LOST_POLL_S``, and nothing
        more is sent to it (a release is dropped: what it held went with it)."""
        self.lost = reason
        for scope in list(self._scopes):
            scope.cancel()

    def _dead(self) -> InstanceDeadError:
        return InstanceDeadError(f"instance {self._instance_id} is gone: {self.lost}")

    async def _ask(self, msg):
        if self.lost is not None:
            raise self._dead()
        with trio.CancelScope() as scope:
            self._scopes.add(scope)
            try:
                return await self.client.request(msg)
            finally:
                self._scopes.discard(scope)
        raise self._dead()  # cancelled by mark_lost

    def _request(self, msg):
        return trio.from_thread.run(self._ask, msg, trio_token=self._token)

    def reserve(self, borrower: int, n: int) -> int | None:
        reply = self._request(ReserveBlocks(borrower, n))
        if reply.reservation_id is None:
            self._lendable = reply.num_blocks
            return None
        return reply.reservation_id

    def commit(self, reservation_id: int, request_id: int) -> list[int]:
        reply = self._request(CommitReservation(reservation_id, request_id))
        self._lendable -= len(reply.block_ids)
        return list(reply.block_ids)

    def write_blocks(self, request_id: int, block_ids: list[int], kv: torch.Tensor) -> None:
        self._request(BlockTransfer(request_id, tuple(block_ids), kv))

    def read_blocks(self, request_id: int, block_ids: list[int]) -> torch.Tensor:
        return self._request(FetchBlocks(request_id, tuple(block_ids))).kv

    def release(self, request_id: int, blocks: list[int], cached=()) -> None:
        if self.lost is not None:
            return
        with self._releasing_lock:
            if self._releasing == 0:
                self._released = trio.Event()  # before the count shows: a waiter sees this one
            self._releasing += 1
        self._lendable += len(blocks)
        self._token.run_sync_soon(self._nursery.start_soon, self._release, _release_message(request_id, blocks, cached))

    def claim(self, request_id: int, home: int, blocks: list[int], hashes: list[int]) -> bool:
        async def claim() -> bool:
            await self.wait_released()  # a release naming these blocks goes first
            reply = await self._ask(ClaimCached(request_id, home, tuple(blocks), tuple(hashes)))
            return reply.ok

        ok = trio.from_thread.run(claim, trio_token=self._token)
        if ok:
            self._lendable -= len(blocks)
        return ok

    async def _release(self, msg: ReleaseBlocks) -> None:
        try:
            await self._ask(msg)
        except InstanceDeadError:
            pass  # what it held went with it
        except (TransportError, trio.ClosedResourceError) as e:  # the peer has gone, or we are closing
            log.warning("instance %d: releasing blocks of request %d failed: %s", self._instance_id, msg.request_id, e)
        finally:
            with self._releasing_lock:
                self._releasing -= 1
                done = self._releasing == 0
            if done:
                self._released.set()

    async def wait_released(self) -> None:
        """Return once every release asked for so far has been answered (on the loop)."""
        while self._releasing:
            await self._released.wait()

    def start_attention(self, query: AttentionQuery) -> PendingAttention:
        if self._direct is not None:
            return self._start_direct(query)
        done = threading.Event()
        box: dict[str, object] = {}

        async def ask() -> None:
            try:
                box["result"] = await self._ask(query)
            except trio.Cancelled:
                box["error"] = TransportError(f"instance {self._instance_id}: the query was cancelled (closing)")
                raise
            except Exception as e:  # noqa: BLE001 - handed to the waiting step, which fails
                box["error"] = e
            finally:
                done.set()

        self._token.run_sync_soon(self._nursery.start_soon, ask)
        return lambda: self._wait_boxed(done, box)

    def _wait_boxed(self, done: threading.Event, box: dict) -> AttentionResult:
        waited = 0.0
        while not done.wait(_LOST_POLL_S):
            waited += _LOST_POLL_S
            if self.lost is not None:
                raise self._dead()
            if waited >= self.timeout_s:
                raise TransportError(f"instance {self._instance_id}: no attention result within {self.timeout_s} s")
        if "error" in box:
            raise box["error"]
        return box["result"]

    def _start_direct(self, query: AttentionQuery) -> PendingAttention:
        """Send on the step thread's own socket; the callable receives the reply with this
        sequence number (dropping any older one a failed step left unread)."""
        if self.lost is not None:
            raise self._dead()
        sock = self._direct
        self._seq += 1
        seq = self._seq
        sock.send_multipart(self._codec.encode(query, seq), copy=False)

        def wait() -> AttentionResult:
            waited = 0.0
            while True:
                if not sock.poll(int(_LOST_POLL_S * 1000)):  # in slices: a lost peer is noticed
                    waited += _LOST_POLL_S
                    if self.lost is not None:
                        raise self._dead()
                    if waited >= self.timeout_s:
                        raise TransportError(f"instance {self._instance_id}: no attention result within {self.timeout_s} s")
                    continue
                got, reply = self._codec.decode(sock.recv_multipart(copy=False))
                if got == seq:
                    break
            if isinstance(reply, ErrorReply):
                raise error_from_reply(reply, f"instance {self._instance_id}")
            return reply

        return wait


def _release_message(request_id: int, blocks, cached) -> ReleaseBlocks:
    cached = list(cached)
    return ReleaseBlocks(request_id, tuple(blocks), tuple(b for b, _ in cached), tuple(h for _, h in cached))


async def connect_peer(stack, tp, instance_id: int, address: str, nursery: trio.Nursery, lendable: int) -> ZmqPeer:
    """A ``ZmqPeer`` for the instance serving its peer socket at ``address``: a ``Client`` (for
    reservations, commits, releases) and the step thread's own DEALER (attention queries), both
    closed by ``stack`` (an ``AsyncExitStack`` of the calling task, which must own the loop's
    nursery ``nursery``)."""
    from .transport import DealerSocket

    client = await stack.enter_async_context(tp.open_client(address))
    direct = tp.socket(DealerSocket)
    tp.connect(direct, address)
    stack.callback(direct.close)
    return ZmqPeer(instance_id, client, nursery, trio.lowlevel.current_trio_token(), lendable,
                   direct=direct.zmq_socket, codec=tp.codec)
