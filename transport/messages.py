"""Every message the system sends, as a typed, frozen dataclass (the wire's contract).

One class per message; ``codec.py`` is the one encoder and decoder for all of them. The wire
type id of each class is fixed here (``@message(n)``) and never reused. Field types are what
the codec knows how to carry::

    int, float, str, bool          and ``X | None`` of each
    tuple[int, ...]                (also float, str)
    torch.Tensor                   raw frames: dtype and shape in the header, bytes zero-copy
    torch.Tensor | None
    dict[str, Any]                 small maps of scalars or tuples of scalars (sampling options)
    tuple[<record>, ...]           records: plain frozen dataclasses of the scalar kinds above

Messages check their own shapes and ranges when built (``_check``, raising ``ValidationError``),
so a malformed message is refused where it is built and where it is decoded.

Peer traffic (one decode step, DESIGN.md §4)::

    home A                                      creditor B
      | AttentionQuery(layer, q, blocks, k/v) ---> |  append k/v, partial attention
      | <--------------------- AttentionResult(out, lse)

Runtime <-> instance: ``ConnectPeers`` (once), ``AddRequest`` / ``AbortRequest`` and
``LendableUpdate`` (the gManager's view of who may lend) in,
``StepOutputs`` and ``HeartbeatDelta`` out. Lending: ``ReserveBlocks`` -> ``Reservation``; ``CommitReservation`` ->
``Committed``; ``CancelReservation``; ``ReleaseBlocks`` (with the hashes naming full blocks
the creditor keeps cached); ``ClaimCached`` -> ``Claimed`` (a new request takes blocks cached
there, prefix caching). Migration: ``MoveBlocks`` (a plan
step, to the source) and ``BlockTransfer`` (the KV itself, to the destination). Any request may
be answered with ``ErrorReply``; requests with nothing to say are answered with ``Ack``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

import torch

from ..errors import ValidationError

__all__ = [
    "Message",
    "MESSAGE_TYPES",
    "message",
    "AttentionQuery",
    "AttentionResult",
    "HeartbeatDelta",
    "ReserveBlocks",
    "Reservation",
    "CommitReservation",
    "Committed",
    "CancelReservation",
    "ReleaseBlocks",
    "ClaimCached",
    "Claimed",
    "MoveBlocks",
    "BlockTransfer",
    "AddRequest",
    "AbortRequest",
    "ConnectPeers",
    "LendableUpdate",
    "InstancesLost",
    "FetchBlocks",
    "JoinRequest",
    "Joined",
    "JoinReady",
    "Sync",
    "Synced",
    "RequestDelta",
    "StepOutputs",
    "ErrorReply",
    "Ack",
]


class Message:
    """Base of every wire message (the fields live in the dataclass subclasses).

    ``_check`` validates the fields when a message is built. It reads tensor fields only
    through ``.dtype``, ``.shape`` and ``.ndim``, so the decoder runs it on the header's
    tensor specs and refuses a malformed message before it builds any tensor.
    """

    __slots__ = ()

    def __post_init__(self) -> None:
        self._check()

    def _check(self) -> None:
        pass


MESSAGE_TYPES: dict[int, type[Message]] = {}  # wire type id -> class

_M = TypeVar("_M", bound=type)


def message(type_id: int) -> Callable[[_M], _M]:
    """Register a message dataclass under its wire type id (1..65535, never reused)."""

    def register(cls: _M) -> _M:
        if not 1 <= type_id <= 0xFFFF:
            raise ValueError(f"type_id={type_id} must be in [1, 65535]")
        if type_id in MESSAGE_TYPES:
            raise ValueError(f"type_id={type_id} is taken by {MESSAGE_TYPES[type_id].__name__}")
        cls.TYPE_ID = type_id
        MESSAGE_TYPES[type_id] = cls
        return cls

    return register


# ---- checks shared by the _check methods ---------------------------------------------------------

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INDEX_DTYPES = (torch.int32, torch.int64)


def _fail(owner: str, name: str, value: Any, allowed: str) -> None:
    raise ValidationError(name, value, allowed, owner=owner)


def _nonneg(owner: str, **values: int | None) -> None:
    for name, value in values.items():
        if value is not None and value < 0:
            _fail(owner, name, value, "must be >= 0")


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


# ---- attention (the hot path: one per creditor per layer per step) -------------------------


@message(1)
@dataclass(frozen=True, slots=True)
class AttentionQuery(Message):
    """A home instance's queries for one layer, to one creditor, batched over its requests.

    Request b (``request_ids[b]``) owns query rows ``cu_q[b]:cu_q[b+1]`` of ``q`` (``cu_q``
    None: one row each, the decode case, which saves a frame on the hot path); row i sits at
    position ``q_pos[i]`` and sees keys at positions ``<= q_pos[i]`` (causal), and, in a layer
    with a sliding window W, only those ``> q_pos[i] - W``: the creditor serves the same model,
    so it applies ``ModelArgs.window(layer)`` itself and the window never travels. Its keys on
    the creditor are in the blocks ``block_table[b, j]``, block j holding positions
    ``block_start[b, j] .. block_start[b, j] + block_len[b, j] - 1`` (``block_len`` 0 pads);
    the three tables travel stacked as ``blocks`` (one frame instead of three). When the
    request's tail block is on the creditor, the new tokens' ``k`` and ``v`` ride along, to be
    written to flat ``slot_mapping`` slots (``block * block_size + offset``) before attention.
    These are ``kernels.partial_attention`` / ``append_kv``'s inputs::

        q            [total_q, num_heads, head_dim]      fp16 / bf16 / fp32
        cu_q         [B + 1]                             int32, or None (total_q == B)
        q_pos        [total_q]                           int32
        blocks       [3, B, max_blocks]                  int32: block_table, block_start, block_len
        k, v         [n, num_kv_heads, head_dim]         q's dtype, or None
        slot_mapping [n]                                 int32 / int64, or None
    """

    layer: int
    request_ids: tuple[int, ...]
    q: torch.Tensor
    cu_q: torch.Tensor | None
    q_pos: torch.Tensor
    blocks: torch.Tensor
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    slot_mapping: torch.Tensor | None = None

    def _check(self) -> None:
        o = "AttentionQuery"
        q = self.q
        if self.layer < 0:
            _fail(o, "layer", self.layer, "must be >= 0")
        q_shape = q.shape  # each tensor attribute read costs: read each once
        if len(q_shape) != 3 or q.dtype not in _FLOAT_DTYPES:
            _fail(o, "q", f"{q.dtype}{_shape(q)}", "must be [total_q, num_heads, head_dim] fp16/bf16/fp32")
        batch = len(self.request_ids)
        cu_q, q_pos, blocks = self.cu_q, self.q_pos, self.blocks
        if cu_q is None:
            if q_shape[0] != batch:
                _fail(o, "cu_q", None, f"may be None only with one query row per request (total_q={q_shape[0]}, B={batch})")
        elif cu_q.dtype != torch.int32 or cu_q.shape != (batch + 1,):
            _fail(o, "cu_q", f"{cu_q.dtype}{_shape(cu_q)}", f"must be int32 [B + 1 = {batch + 1}]")
        if q_pos.dtype != torch.int32 or q_pos.shape != q_shape[:1]:
            _fail(o, "q_pos", f"{q_pos.dtype}{_shape(q_pos)}", f"must be int32 [total_q = {q_shape[0]}]")
        b_shape = blocks.shape
        if blocks.dtype != torch.int32 or len(b_shape) != 3 or b_shape[:2] != (3, batch):
            _fail(o, "blocks", f"{blocks.dtype}{_shape(blocks)}", f"must be int32 [3, B = {batch}, max_blocks]")
        k = self.k
        if k is None:
            if self.v is not None or self.slot_mapping is not None:
                _fail(o, "k", None, "must be given with v and slot_mapping")
            return
        v, slots = self.v, self.slot_mapping
        if v is None or slots is None:
            _fail(o, "v" if v is None else "slot_mapping", None, "must be given with k")
        if k.ndim != 3 or k.shape[2] != q.shape[2] or k.dtype != q.dtype:
            _fail(o, "k", f"{k.dtype}{_shape(k)}", f"must be {q.dtype} [n, num_kv_heads, head_dim = {q.shape[2]}]")
        if v.shape != k.shape or v.dtype != k.dtype:
            _fail(o, "v", f"{v.dtype}{_shape(v)}", f"must be {k.dtype}{_shape(k)} like k")
        if slots.shape != k.shape[:1] or slots.dtype not in _INDEX_DTYPES:
            _fail(o, "slot_mapping", f"{slots.dtype}{_shape(slots)}", f"must be int32/int64 [n = {k.shape[0]}]")

    @classmethod
    def build(
        cls,
        layer: int,
        request_ids: tuple[int, ...] | list[int],
        q: torch.Tensor,
        cu_q: torch.Tensor | None,
        q_pos: torch.Tensor,
        block_table: torch.Tensor,
        block_start: torch.Tensor,
        block_len: torch.Tensor,
        k: torch.Tensor | None = None,
        v: torch.Tensor | None = None,
        slot_mapping: torch.Tensor | None = None,
    ) -> AttentionQuery:
        """From the three block tables as ``BlockTables.batch_tables`` gives them (arrays or
        tensors, [B, max_blocks] each). ``cu_q`` may be None for one query row per request."""
        tables = [torch.as_tensor(t, dtype=torch.int32) for t in (block_table, block_start, block_len)]
        if not tables[0].dim() == 2 or tables[1].shape != tables[0].shape or tables[2].shape != tables[0].shape:
            _fail("AttentionQuery", "block_table", tuple(tables[0].shape), "must be [B, max_blocks] like block_start and block_len")
        return cls(layer, tuple(request_ids), q, cu_q, q_pos, torch.stack(tables), k, v, slot_mapping)

    @property
    def num_requests(self) -> int:
        return len(self.request_ids)

    def query_offsets(self) -> torch.Tensor:
        """``cu_q``, made when it was None ([B + 1] int32: 0, 1, ..., B)."""
        if self.cu_q is not None:
            return self.cu_q
        return torch.arange(len(self.request_ids) + 1, dtype=torch.int32)

    @property
    def block_table(self) -> torch.Tensor:
        """[B, max_blocks] int32: the creditor's block ids (a view of ``blocks``)."""
        return self.blocks[0]

    @property
    def block_start(self) -> torch.Tensor:
        """[B, max_blocks] int32: the first position each block holds."""
        return self.blocks[1]

    @property
    def block_len(self) -> torch.Tensor:
        """[B, max_blocks] int32: how many positions each block holds (0: padding)."""
        return self.blocks[2]


@message(2)
@dataclass(frozen=True, slots=True)
class AttentionResult(Message):
    """The creditor's partial attention for an ``AttentionQuery``: ``out`` [total_q,
    num_heads, head_dim] (q's dtype) and ``lse`` [total_q, num_heads] fp32 (natural log;
    -inf where no key was visible). The home merges it with ``kernels.merge_partials``."""

    layer: int
    out: torch.Tensor
    lse: torch.Tensor

    def _check(self) -> None:
        o = "AttentionResult"
        out, lse = self.out, self.lse
        shape = out.shape  # each tensor attribute read costs: read each once
        if len(shape) != 3 or out.dtype not in _FLOAT_DTYPES:
            _fail(o, "out", f"{out.dtype}{_shape(out)}", "must be [total_q, num_heads, head_dim] fp16/bf16/fp32")
        if lse.dtype != torch.float32 or lse.shape != shape[:2]:
            _fail(o, "lse", f"{lse.dtype}{_shape(lse)}", f"must be float32 {tuple(shape[:2])}")


# ---- heartbeats, lending, migration ---------------------------------------------------------


@message(3)
@dataclass(frozen=True, slots=True)
class HeartbeatDelta(Message):
    """An instance's pool counter changes since its last heartbeat (``core_sched.PoolDelta``:
    signed differences, ``capacity`` .. ``borrowed``) and its load (absolute), to the gManager.

    The receiver applies it only if ``base_version`` is the version it last saw from this
    instance; otherwise it asks for a snapshot (a delta with ``base_version == 0`` is one).
    ``max_lent`` is the pool's lending cap now (it follows the device's free memory; -1: not
    reported), ``memory_total`` / ``memory_free`` the instance's device memory in bytes as last
    read (NVML, or the host's on CPU; 0: not read). ``cached_blocks``, ``prefix_query_tokens``
    and ``prefix_hit_tokens`` are its prefix cache's figures (absolute, as ``EngineStats``).
    """

    instance_id: int
    base_version: int
    version: int
    capacity: int
    free: int
    used: int
    lent: int
    reserved: int
    borrowed: int
    batch_size: int = 0
    num_waiting: int = 0
    waiting_blocks: int = 0
    max_lent: int = -1
    memory_total: int = 0
    memory_free: int = 0
    cached_blocks: int = 0
    prefix_query_tokens: int = 0
    prefix_hit_tokens: int = 0

    def _check(self) -> None:
        o = "HeartbeatDelta"
        _nonneg(o, instance_id=self.instance_id, base_version=self.base_version, version=self.version,
                batch_size=self.batch_size, num_waiting=self.num_waiting, waiting_blocks=self.waiting_blocks,
                memory_total=self.memory_total, memory_free=self.memory_free, cached_blocks=self.cached_blocks,
                prefix_query_tokens=self.prefix_query_tokens, prefix_hit_tokens=self.prefix_hit_tokens)
        if self.version < self.base_version:
            _fail(o, "version", self.version, f"must be >= base_version={self.base_version}")
        if self.max_lent < -1:
            _fail(o, "max_lent", self.max_lent, "must be >= 0, or -1 (not reported)")
        if self.memory_free > self.memory_total:
            _fail(o, "memory_free", self.memory_free, f"must be <= memory_total={self.memory_total}")

    def to_pool_delta(self) -> Any:
        """The ``core_sched.PoolDelta`` to give ``DebtLedger.apply_delta``."""
        from ..core_sched.types import PoolDelta

        return PoolDelta(self.instance_id, self.base_version, self.version, self.capacity, self.free, self.used,
                         self.lent, self.reserved, self.borrowed)

    @classmethod
    def from_pool_delta(cls, delta: Any, *, batch_size: int = 0, num_waiting: int = 0,
                        waiting_blocks: int = 0, max_lent: int = -1, memory_total: int = 0,
                        memory_free: int = 0, cached_blocks: int = 0, prefix_query_tokens: int = 0,
                        prefix_hit_tokens: int = 0) -> HeartbeatDelta:
        """From a ``core_sched.PoolDelta``, the batch planner's load, the lending cap, the
        last memory reading and the prefix cache's figures."""
        return cls(delta.instance_id, delta.base_version, delta.version, delta.capacity, delta.free,
                   delta.used, delta.lent, delta.reserved, delta.borrowed, batch_size, num_waiting,
                   waiting_blocks, max_lent, memory_total, memory_free, cached_blocks, prefix_query_tokens,
                   prefix_hit_tokens)


@message(4)
@dataclass(frozen=True, slots=True)
class ReserveBlocks(Message):
    """Borrower ``borrower`` asks a creditor to hold ``num_blocks`` blocks (``try_reserve``).
    Answered with ``Reservation``."""

    borrower: int
    num_blocks: int

    def _check(self) -> None:
        _nonneg("ReserveBlocks", borrower=self.borrower)
        if self.num_blocks < 1:
            _fail("ReserveBlocks", "num_blocks", self.num_blocks, "must be >= 1")


@message(5)
@dataclass(frozen=True, slots=True)
class Reservation(Message):
    """The answer to ``ReserveBlocks``: ``reservation_id`` None when the creditor cannot lend
    that many now (its view was fresher than the ledger's); otherwise it holds the blocks for
    ``ttl_s`` seconds, until ``CommitReservation`` or ``CancelReservation``."""

    reservation_id: int | None
    num_blocks: int
    ttl_s: float = 0.0

    def _check(self) -> None:
        _nonneg("Reservation", reservation_id=self.reservation_id, num_blocks=self.num_blocks)
        if not 0.0 <= self.ttl_s < float("inf"):  # NaN fails this too
            _fail("Reservation", "ttl_s", self.ttl_s, "must be a finite number of seconds >= 0")


@message(6)
@dataclass(frozen=True, slots=True)
class CommitReservation(Message):
    """Turn a reservation into blocks of ``request_id`` (whose home is the borrower).
    Answered with ``Committed``."""

    reservation_id: int
    request_id: int

    def _check(self) -> None:
        _nonneg("CommitReservation", reservation_id=self.reservation_id, request_id=self.request_id)


@message(7)
@dataclass(frozen=True, slots=True)
class Committed(Message):
    """The creditor's block ids now holding ``request_id``'s tokens, in logical order."""

    reservation_id: int
    request_id: int
    block_ids: tuple[int, ...]

    def _check(self) -> None:
        _nonneg("Committed", reservation_id=self.reservation_id, request_id=self.request_id)


@message(8)
@dataclass(frozen=True, slots=True)
class CancelReservation(Message):
    """Give back an uncommitted reservation. Answered with ``Ack``."""

    reservation_id: int

    def _check(self) -> None:
        _nonneg("CancelReservation", reservation_id=self.reservation_id)


@message(9)
@dataclass(frozen=True, slots=True)
class ReleaseBlocks(Message):
    """Free blocks a creditor holds for ``request_id`` (finished, aborted, truncated or moved
    away): the listed ``block_ids``, or all of them when the tuple is empty. ``cached`` pairs
    (block id, hash) name full blocks among them that the creditor keeps cached for later
    requests of the same home (prefix caching). Answered with ``Ack``."""

    request_id: int
    block_ids: tuple[int, ...] = ()
    cached_blocks: tuple[int, ...] = ()
    cached_hashes: tuple[int, ...] = ()

    def _check(self) -> None:
        _nonneg("ReleaseBlocks", request_id=self.request_id)
        if len(self.cached_blocks) != len(self.cached_hashes):
            _fail("ReleaseBlocks", "cached_hashes", len(self.cached_hashes),
                  f"must name each of the {len(self.cached_blocks)} cached blocks")


@message(26)
@dataclass(frozen=True, slots=True)
class ClaimCached(Message):
    """A home's new request ``request_id`` reuses blocks the creditor keeps cached for the
    home ``home``: ``block_ids``, named by ``hashes``, in order. Taken all or none; answered
    with ``Claimed``."""

    request_id: int
    home: int
    block_ids: tuple[int, ...]
    hashes: tuple[int, ...]

    def _check(self) -> None:
        _nonneg("ClaimCached", request_id=self.request_id, home=self.home)
        if len(self.block_ids) != len(self.hashes):
            _fail("ClaimCached", "hashes", len(self.hashes), f"must name each of the {len(self.block_ids)} blocks")


@message(27)
@dataclass(frozen=True, slots=True)
class Claimed(Message):
    """The answer to ``ClaimCached``: whether the blocks were still cached and are now held
    for the request (False: evicted or reused meanwhile; nothing taken)."""

    request_id: int
    ok: bool


@message(10)
@dataclass(frozen=True, slots=True)
class MoveBlocks(Message):
    """A planner step (``core_sched.Move``) sent to the source instance ``src``: move
    ``num_blocks`` blocks of ``request_id`` to ``dst``. ``kind`` is ``"spread"`` (from the
    home to a creditor) or ``"home"`` (back to the request's home)."""

    request_id: int
    num_blocks: int
    src: int
    dst: int
    kind: str = "spread"

    def _check(self) -> None:
        o = "MoveBlocks"
        _nonneg(o, request_id=self.request_id, src=self.src, dst=self.dst)
        if self.num_blocks < 1:
            _fail(o, "num_blocks", self.num_blocks, "must be >= 1")
        if self.kind not in ("spread", "home"):
            _fail(o, "kind", self.kind, "must be 'spread' or 'home'")

    @classmethod
    def from_move(cls, move: Any) -> MoveBlocks:
        return cls(move.request_id, move.num_blocks, move.src, move.dst, move.kind)


@message(11)
@dataclass(frozen=True, slots=True)
class BlockTransfer(Message):
    """The KV of some blocks of ``request_id``, to be written into the receiver's blocks
    ``block_ids`` (reserved and committed there beforehand)::

        kv  [num_layers, 2 (k, v), len(block_ids), block_size, num_kv_heads, head_dim]
    """

    request_id: int
    block_ids: tuple[int, ...]
    kv: torch.Tensor

    def _check(self) -> None:
        s = _shape(self.kv)
        if len(s) != 6 or s[1] != 2 or s[2] != len(self.block_ids):
            _fail("BlockTransfer", "kv", s,
                  f"must be [num_layers, 2, {len(self.block_ids)} blocks, block_size, num_kv_heads, head_dim]")


@message(22)
@dataclass(frozen=True, slots=True)
class FetchBlocks(Message):
    """A home asks a creditor for the KV of blocks it lends ``request_id`` (migration home);
    the answer is a ``BlockTransfer`` of those blocks, in that order."""

    request_id: int
    block_ids: tuple[int, ...]

    def _check(self) -> None:
        _nonneg("FetchBlocks", request_id=self.request_id)
        if not self.block_ids or any(b < 0 for b in self.block_ids):
            _fail("FetchBlocks", "block_ids", self.block_ids, "must be one or more block ids >= 0")


# ---- workers joining from other hosts --------------------------------------------------------


@message(23)
@dataclass(frozen=True, slots=True)
class JoinRequest(Message):
    """A worker on another host asks to join (to the runtime's join socket, over tcp with
    CURVE): the model it loaded (``model``: a fingerprint of its shape, which must be the
    runtime's) and how many KV blocks it has. Answered by ``Joined``."""

    model: str
    num_blocks: int

    def _check(self) -> None:
        if self.num_blocks < 1:
            _fail("JoinRequest", "num_blocks", self.num_blocks, "must be >= 1")


@message(24)
@dataclass(frozen=True, slots=True)
class Joined(Message):
    """The runtime's answer to ``JoinRequest``: the instance id the worker is to have, and the
    cluster's settings it runs with (block size, lending, heartbeats, batching, ...)."""

    instance_id: int
    options: dict[str, Any] = field(default_factory=dict)

    def _check(self) -> None:
        _nonneg("Joined", instance_id=self.instance_id)


@message(25)
@dataclass(frozen=True, slots=True)
class JoinReady(Message):
    """A joining worker serves: its peer and control sockets. Once the runtime has connected
    them (and told every other instance), it answers ``Ack``: the worker is a member."""

    instance_id: int
    peer_address: str
    control_address: str

    def _check(self) -> None:
        _nonneg("JoinReady", instance_id=self.instance_id)


# ---- requests and their outputs (runtime <-> instance) ---------------------------------------


@message(12)
@dataclass(frozen=True, slots=True)
class AddRequest(Message):
    """Admit a request: its prompt's token ids (int32/int64 [n]) and its sampling options by
    vLLM ``SamplingParams`` field name (``{"max_tokens": 64, "temperature": 0.0}``).
    ``output_token_ids`` (int32/int64 [m], or None): tokens it generated already on an
    instance that was lost; it resumes after them (``Engine.add_request``)."""

    request_id: int
    prompt_token_ids: torch.Tensor
    sampling: dict[str, Any] = field(default_factory=dict)
    output_token_ids: torch.Tensor | None = None

    def _check(self) -> None:
        o = "AddRequest"
        _nonneg(o, request_id=self.request_id)
        t = self.prompt_token_ids
        if t.ndim != 1 or t.dtype not in _INDEX_DTYPES or t.shape[0] < 1:
            _fail(o, "prompt_token_ids", f"{t.dtype}{_shape(t)}", "must be int32/int64 [n >= 1]")
        d = self.output_token_ids
        if d is not None and (d.ndim != 1 or d.dtype not in _INDEX_DTYPES):
            _fail(o, "output_token_ids", f"{d.dtype}{_shape(d)}", "must be int32/int64 [m], or None")


@message(13)
@dataclass(frozen=True, slots=True)
class AbortRequest(Message):
    """Stop ``request_id`` and free every block it holds. Answered with ``Ack``."""

    request_id: int

    def _check(self) -> None:
        _nonneg("AbortRequest", request_id=self.request_id)


@dataclass(frozen=True, slots=True)
class RequestDelta:
    """One request's progress in one step (a record inside ``StepOutputs``), enough for the
    runtime to extend the request's cumulative ``RequestOutput``:

    - ``token_ids`` the tokens it produced, ``logprobs`` their log-probabilities (empty unless
      asked for), ``cumulative_logprob`` the running sum (None unless asked for);
    - the text: cut what was sent before to ``text_offset`` characters, then append ``text``
      (a stop string found late may take back characters already sent);
    - each new token's logprobs dict, flattened: ``top_counts[i]`` entries for token i, their
      ids, logprobs, ranks (0: unknown) and decoded texts in ``top_*`` one after another;
    - ``finish_reason`` (``"stop"``, ``"length"``, ``"abort"``, ``"error"``) on its last step,
      else None, with ``stop_reason`` (a stop string) or ``stop_token_id``, and ``error``;
    - its metrics so far (home clock: ``time.monotonic`` of the home's host), and
      ``placement``: the blocks each instance holds of it, as (instance, blocks) pairs laid
      flat."""

    request_id: int
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...] = ()
    finish_reason: str | None = None
    text_offset: int = 0
    text: str = ""
    cumulative_logprob: float | None = None
    stop_reason: str | None = None
    stop_token_id: int | None = None
    error: str | None = None
    top_counts: tuple[int, ...] = ()
    top_token_ids: tuple[int, ...] = ()
    top_logprobs: tuple[float, ...] = ()
    top_ranks: tuple[int, ...] = ()
    top_decoded: tuple[str, ...] = ()
    num_preemptions: int = 0
    arrival_time: float = 0.0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    placement: tuple[int, ...] = ()

    def __post_init__(self) -> None:  # (a record, not a Message: checked the same way)
        self._check()

    def _check(self) -> None:
        o = "RequestDelta"
        if self.finish_reason not in (None, "stop", "length", "abort", "error"):
            _fail(o, "finish_reason", self.finish_reason, "must be None, 'stop', 'length', 'abort' or 'error'")
        _nonneg(o, text_offset=self.text_offset, num_preemptions=self.num_preemptions)
        if self.top_counts and len(self.top_counts) != len(self.token_ids):
            _fail(o, "top_counts", self.top_counts, f"must have one count per token ({len(self.token_ids)}) or none")
        n = sum(self.top_counts)
        for name in ("top_token_ids", "top_logprobs", "top_ranks", "top_decoded"):
            if len(getattr(self, name)) != n:
                _fail(o, name, getattr(self, name), f"must have sum(top_counts)={n} entries")
        if len(self.placement) % 2:
            _fail(o, "placement", self.placement, "must be (instance, blocks) pairs laid flat")

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@message(14)
@dataclass(frozen=True, slots=True)
class StepOutputs(Message):
    """What instance ``instance_id``'s step ``step`` produced, one delta per request."""

    instance_id: int
    step: int
    outputs: tuple[RequestDelta, ...]

    def _check(self) -> None:
        _nonneg("StepOutputs", instance_id=self.instance_id, step=self.step)


# ---- replies ---------------------------------------------------------------------------------


@message(17)
@dataclass(frozen=True, slots=True)
class ConnectPeers(Message):
    """Runtime -> worker, once before any request: the other instances' peer sockets, and what
    each may lend at most (the first hint of its room); again when an instance joins later
    (``joined``: the cluster grows by what they may lend)."""

    instance_ids: tuple[int, ...]
    addresses: tuple[str, ...]
    lendable: tuple[int, ...]
    joined: bool = False

    def _check(self) -> None:
        o = "ConnectPeers"
        n = len(self.instance_ids)
        if len(self.addresses) != n or len(self.lendable) != n:
            _fail(o, "addresses", self.addresses, f"must have one address and one lendable per instance ({n})")
        if any(i < 0 for i in self.instance_ids):
            _fail(o, "instance_ids", self.instance_ids, "must be >= 0")
        if any(b < 0 for b in self.lendable):
            _fail(o, "lendable", self.lendable, "must be >= 0")


@message(18)
@dataclass(frozen=True, slots=True)
class LendableUpdate(Message):
    """gManager -> worker: what each instance may lend now, by the ledger (sent when it
    changes). The worker's borrowing hints; the reservation still decides."""

    instance_ids: tuple[int, ...]
    lendable: tuple[int, ...]

    def _check(self) -> None:
        if len(self.lendable) != len(self.instance_ids):
            _fail("LendableUpdate", "lendable", self.lendable, f"must have one figure per instance ({len(self.instance_ids)})")
        if any(b < 0 for b in self.lendable):
            _fail("LendableUpdate", "lendable", self.lendable, "must be >= 0")


@message(19)
@dataclass(frozen=True, slots=True)
class Sync(Message):
    """Runtime -> worker: wait until every release this instance sent has been answered; with
    ``snapshot``, then push a heartbeat (even an empty one) and answer ``Synced`` with its
    version, so the runtime knows when its ledger holds the instance as of now."""

    snapshot: bool = False
    instance_id: int = -1  # a joined worker asking its runtime whether it is still a member


@message(20)
@dataclass(frozen=True, slots=True)
class Synced(Message):
    """The answer to ``Sync``: the version of the heartbeat pushed for it (0 without one), and
    how many heartbeats the instance had pushed with it (the runtime waits until it has heard
    that many: an unchanged pool keeps its version, the load and memory readings do not)."""

    instance_id: int
    version: int
    heartbeats: int = 0

    def _check(self) -> None:
        _nonneg("Synced", instance_id=self.instance_id, version=self.version, heartbeats=self.heartbeats)


@message(21)
@dataclass(frozen=True, slots=True)
class InstancesLost(Message):
    """Runtime -> worker: these instances are gone (their process died, or stopped answering).
    Each could lend at most ``max_lent[i]`` blocks, which leave the cluster; the worker drops
    them as peers, recomputes its requests that had blocks there, and frees what it lent to
    requests homed there. ``reason`` says what happened, for the log."""

    instance_ids: tuple[int, ...]
    max_lent: tuple[int, ...]
    reason: str = ""

    def _check(self) -> None:
        if len(self.max_lent) != len(self.instance_ids):
            _fail("InstancesLost", "max_lent", self.max_lent, f"must have one figure per instance ({len(self.instance_ids)})")
        if any(b < 0 for b in self.max_lent) or any(i < 0 for i in self.instance_ids):
            _fail("InstancesLost", "max_lent", self.max_lent, "must be >= 0, as the instance ids")


@message(15)
@dataclass(frozen=True, slots=True)
class ErrorReply(Message):
    """A request failed on the peer: ``code`` is the exception's class name (an
    ``infinillm.errors`` class where it was one), ``message`` its text."""

    code: str
    message: str

    @classmethod
    def from_exception(cls, exc: BaseException) -> ErrorReply:
        return cls(type(exc).__name__, str(exc))


@message(16)
@dataclass(frozen=True, slots=True)
class Ack(Message):
    """Done; nothing to report."""
