"""The codec: every message round-trips; golden frames pin the wire format; tensors arrive as
views of the frames; malformed, truncated, oversized and wrong-version input is refused with a
DecodeError that says why; whatever fuzzed input decodes re-encodes to the bytes it came in
(in the encoder's spelling: ``canonical``).

Every test runs twice: with the compiled hot path (``_wire``) in front of the Python codec, and
with the Python codec alone (tests of ``_wire``'s own parts are skipped there); the last section
checks that the fast paths (the compiled one and the Python one) accept exactly what the
generic path accepts, with the same result, and that a bug inside one is raised, not hidden."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import types
import typing

import msgpack
import numpy as np
import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from infinillm import TransportError, ValidationError
from infinillm.transport import (
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    SMALL_TENSOR_BYTES,
    AbortRequest,
    Ack,
    AddRequest,
    AttentionQuery,
    AttentionResult,
    BlockTransfer,
    CancelReservation,
    Codec,
    CommitReservation,
    Committed,
    DecodeError,
    ErrorReply,
    HeartbeatDelta,
    MoveBlocks,
    ReleaseBlocks,
    ClaimCached,
    Claimed,
    RequestDelta,
    Reservation,
    ReserveBlocks,
    StepOutputs,
    Sync,
    Synced,
    ConnectPeers,
    LendableUpdate,
    InstancesLost,
    FetchBlocks,
    JoinRequest,
    Joined,
    JoinReady,
)

from .conftest import make_query

from infinillm.transport import codec as codec_module

CODEC = Codec(max_message_bytes=1 << 24, compiled=False)  # the module's tests swap it (below)


@pytest.fixture(autouse=True, scope="module", params=["compiled", "python"])
def which_codec(request):
    """Run the module against each implementation (CODEC is read at call time). The compiled
    one runs under INFINILLM_CORE=python too, where it is built: ``Codec(compiled=True)``
    overrides the variable."""
    global CODEC
    if request.param == "compiled" and not codec_module.compiled_available():
        if os.environ.get("INFINILLM_CORE", "").strip().lower() == "python":
            pytest.skip("INFINILLM_CORE=python and the compiled codec is not built")
        pytest.fail("the compiled codec (infinillm.transport._wire) is not built: run `make build`")
    saved = CODEC
    CODEC = Codec(max_message_bytes=1 << 24, compiled=request.param == "compiled")
    yield request.param
    CODEC = saved


@pytest.fixture(scope="module")
def compiled_only(which_codec):
    """For the tests of ``_wire``'s own parts (its header msgpack): skipped, not passed, with the
    Python codec."""
    if which_codec != "compiled":
        pytest.skip("tests the compiled codec's own msgpack: nothing to run with the Python codec")


def wire(frames) -> list[zmq.Frame]:
    """What a receiver gets: zmq.Frame objects holding copies of the sent bytes."""
    return [zmq.Frame(bytes(memoryview(f).cast("B"))) for f in frames]


def roundtrip(msg, seq: int = 0):
    got_seq, got = CODEC.decode(wire(CODEC.encode(msg, seq)))
    assert got_seq == seq
    return got


def assert_same(a, b) -> None:
    assert type(a) is type(b)
    for name in a.__dataclass_fields__:
        x, y = getattr(a, name), getattr(b, name)
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor), name
            assert x.dtype == y.dtype and x.shape == y.shape, name
            assert torch.equal(x, y), name
        else:
            assert x == y or (x != x and y != y), name  # NaN (a logprob may be one) equals NaN


def as_bytes(frames) -> list[bytes]:
    return [bytes(memoryview(f).cast("B")) for f in frames]


_ITEMSIZE = {"f16": 2, "bf16": 2, "f32": 4, "f64": 8, "i8": 1, "u8": 1, "i16": 2, "i32": 4, "i64": 8}


def _spelled(value, hint):
    """A header ``value`` as the encoder writes a field of type ``hint``: the decoder takes an
    int where a float belongs, the encoder writes the float."""
    args = typing.get_args(hint)
    if type(value) is int and (hint is float or (typing.get_origin(hint) in (typing.Union, types.UnionType) and float in args)):
        return float(value)
    if typing.get_origin(hint) is tuple and args[1:] == (Ellipsis,) and type(value) is tuple:
        if dataclasses.is_dataclass(args[0]):  # records: lists of their fields
            hints = typing.get_type_hints(args[0])
            names = [f.name for f in dataclasses.fields(args[0])]
            return [[_spelled(x, hints[n]) for x, n in zip(record, names)] for record in value]
        return [_spelled(x, args[0]) for x in value]
    return value


def canonical(frames, cls) -> list[bytes]:
    """``frames``, which decode to a ``cls``, spelled as the encoder spells them, worked out from
    the bytes alone (not by the codec). The format leaves a few spellings free that decode to
    the same message: msgpack's longer forms of a value and repeated map keys, an int where a
    float belongs, and the padding between small tensors (skipped by the decoder, zeros from
    the encoder); a fuzzed input may use them. On the encoder's own frames this is the
    identity (``test_every_message_round_trips`` checks), so comparing a re-encoding with it
    is comparing byte for byte."""
    frames = as_bytes(frames)
    header = msgpack.unpackb(frames[0], use_list=False, raw=False, strict_map_key=True)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    out = [msgpack.packb([*header[:3], *[_spelled(v, hints[n]) for v, n in zip(header[3:], names)]], use_bin_type=True)]
    small = []  # byte sizes of the tensors in the small-tensor frame, in field order
    for v, n in zip(header[3:], names):
        if torch.Tensor in (hints[n], *typing.get_args(hints[n])) and v is not None:
            nbytes = _ITEMSIZE[v[0]] * int(np.prod(v[1:], dtype=np.int64))
            if nbytes < SMALL_TENSOR_BYTES:
                small.append(nbytes)
    rest = frames[1:]
    if small:
        pack, rest = rest[0], rest[1:]
        spelled = bytearray(len(pack))
        offset = 0
        for nbytes in small:
            offset = (offset + 15) & -16
            spelled[offset : offset + nbytes] = pack[offset : offset + nbytes]
            offset += nbytes
        out.append(bytes(spelled))
    return out + rest


def one_of_each() -> list:
    g = torch.Generator().manual_seed(3)
    return [
        make_query(batch=3, with_kv=True),
        make_query(batch=2, dtype=torch.bfloat16),
        AttentionQuery.build(1, [5, 6], torch.randn(5, 4, 16, generator=g), torch.tensor([0, 2, 5], dtype=torch.int32),
                             torch.arange(5, dtype=torch.int32), torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3)),
        AttentionResult(2, torch.randn(3, 32, 128, generator=g).half(), torch.randn(3, 32, generator=g)),
        AttentionResult(0, torch.empty(0, 8, 64), torch.empty(0, 8)),
        HeartbeatDelta(1, 4, 7, 100, 60, 40, 10, 0, 3, batch_size=5, num_waiting=2, waiting_blocks=9),
        ReserveBlocks(borrower=2, num_blocks=8),
        Reservation(reservation_id=11, num_blocks=8, ttl_s=2.0),
        Reservation(reservation_id=None, num_blocks=8),
        CommitReservation(11, 42),
        Committed(11, 42, (3, 4, 5)),
        CancelReservation(11),
        ReleaseBlocks(42),
        ReleaseBlocks(42, (1, 2)),
        ReleaseBlocks(42, (1, 2), (2,), (-(2**63),)),
        ClaimCached(42, 1, (3, 4), (2**63 - 1, -7)),
        Claimed(42, True),
        Claimed(42, False),
        MoveBlocks(42, 4, src=0, dst=3, kind="home"),
        BlockTransfer(42, (7, 8), torch.randn(2, 2, 2, 16, 4, 64, generator=g)),  # 128 KiB: a frame of its own
        AddRequest(42, torch.tensor([1, 2, 3], dtype=torch.int32), {"max_tokens": 8, "temperature": 0.0, "stop": ("a", "b"), "seed": None}),
        AddRequest(43, torch.tensor([1, 2], dtype=torch.int64), {}, torch.tensor([5, 6], dtype=torch.int64)),
        AbortRequest(42),
        StepOutputs(0, 17, (RequestDelta(1, (5, 6), (-0.5, -1.25)), RequestDelta(2, (9,), (), "stop"))),
        StepOutputs(2, 5, (RequestDelta(
            7, (5, 6), (-0.5, -1.25), "stop", text_offset=3, text=" two", cumulative_logprob=-1.75, stop_reason="\n",
            error=None, top_counts=(2, 1), top_token_ids=(5, 8, 6), top_logprobs=(-0.5, -0.25, -1.25), top_ranks=(2, 1, 1),
            top_decoded=(" t", " x", "wo"), num_preemptions=1, arrival_time=10.5, first_scheduled_time=10.75,
            first_token_time=11.0, last_token_time=11.5, placement=(0, 3, 2, 1)),)),
        ConnectPeers((0, 2), ("ipc:///tmp/peer0", "tcp://127.0.0.1:5555"), (4, 4)),
        LendableUpdate((0, 1, 2), (3, 0, 4)),
        InstancesLost((2,), (8,), "exited with -9"),
        FetchBlocks(42, (7, 8)),
        JoinRequest("llama:30x576:49152", 64),
        Joined(3, {"block_size": 16, "heartbeat_address": "tcp://10.0.0.1:5601", "max_model_len": None}),
        JoinReady(3, "tcp://10.0.0.2:5602", "tcp://10.0.0.2:5603"),
        ConnectPeers((3,), ("tcp://10.0.0.2:5602",), (32,), joined=True),
        Sync(),
        Sync(snapshot=True),
        Sync(False, 3),
        Synced(1, 7, 3),
        ErrorReply("CapacityError", "no room"),
        Ack(),
    ]


def test_every_message_type_has_an_example():
    assert {type(m) for m in one_of_each()} == set(MESSAGE_TYPES.values())


@pytest.mark.parametrize("msg", one_of_each(), ids=lambda m: type(m).__name__)
def test_every_message_round_trips(msg):
    frames = as_bytes(CODEC.encode(msg, 9))
    assert canonical(frames, type(msg)) == frames  # (the fuzz tests' yardstick is exact here)
    seq, got = CODEC.decode(wire(frames))
    assert seq == 9
    assert_same(got, msg)
    assert as_bytes(CODEC.encode(got, seq)) == frames


# ---- golden frames: the wire format, pinned -----------------------------------------------------


def _golden():
    """(name, message, seq, frames as hex) for a handful of representative messages."""
    f16 = torch.float16
    i32 = torch.int32
    return [
        ("AttentionQuery", AttentionQuery(
            2, (7, 8), torch.arange(8, dtype=f16).view(2, 1, 4), None, torch.tensor([5, 9], dtype=i32),
            torch.tensor([[[3], [4]], [[0], [16]], [[6], [10]]], dtype=i32)), 5, [
            "9c" "04" "01" "05"  # [12 items: version 4, type 1, seq 5,
            "02" "920708"  # layer 2, request_ids [7, 8],
            "94a3663136020104" "c0"  # q ["f16", 2, 1, 4], cu_q None,
            "92a369333202" "94a3693332030201"  # q_pos ["i32", 2], blocks ["i32", 3, 2, 1],
            "c0c0c0",  # k, v, slot_mapping None]
            "0000003c0040004200440045004600470500000009000000"  # q at 0 (16 bytes), q_pos at 16 (8)
            "0000000000000000"  # padding to 32
            "03000000040000000000000010000000060000000a000000",  # blocks at 32 (24): 56 bytes
        ]),
        ("AttentionQuery with k/v", AttentionQuery(
            0, (3,), torch.arange(4, dtype=f16).view(2, 1, 2), torch.tensor([0, 2], dtype=i32),
            torch.tensor([4, 5], dtype=i32), torch.tensor([[[1]], [[0]], [[6]]], dtype=i32),
            k=torch.tensor([[[-1.0, 0.5]], [[2.0, -2.0]]], dtype=f16),
            v=torch.tensor([[[1.0, 1.0]], [[0.25, 3.0]]], dtype=f16),
            slot_mapping=torch.tensor([20, 21], dtype=torch.int64)), 6, [
            "9c" "04" "01" "06" "00" "9103"  # [version 4, type 1, seq 6, layer 0, request_ids [3],
            "94a3663136020102" "92a369333202" "92a369333202"  # q ["f16", 2, 1, 2], cu_q ["i32", 2], q_pos
            "94a3693332030101"  # blocks ["i32", 3, 1, 1],
            "94a3663136020102" "94a3663136020102" "92a369363402",  # k, v ["f16", 2, 1, 2], slot_mapping ["i64", 2]]
            "0000003c00400042" "0000000000000000"  # q at 0, padding
            "0000000002000000" "0000000000000000"  # cu_q at 16, padding
            "0400000005000000" "0000000000000000"  # q_pos at 32, padding
            "010000000000000006000000" "00000000"  # blocks at 48 (12), padding
            "00bc0038004000c0" "0000000000000000"  # k at 64 (-1, 0.5, 2, -2), padding
            "003c003c00340042" "0000000000000000"  # v at 80 (1, 1, 0.25, 3), padding
            "14000000000000001500000000000000",  # slot_mapping at 96 (20, 21): 112 bytes
        ]),
        ("AttentionResult", AttentionResult(
            2, torch.arange(8, dtype=f16).view(2, 1, 4), torch.tensor([[0.5], [-float("inf")]])), 5, [
            "96" "04" "02" "05" "02"  # [version 4, type 2, seq 5, layer 2,
            "94a3663136020104" "93a36633320201",  # out ["f16", 2, 1, 4], lse ["f32", 2, 1]]
            "0000003c004000420044004500460047" "0000003f000080ff",  # out at 0, lse at 16 (0.5, -inf)
        ]),
        ("HeartbeatDelta", HeartbeatDelta(1, 4, 7, 100, 60, 40, 10, 0, 3, batch_size=5, num_waiting=2,
                                          waiting_blocks=300, cached_blocks=7,
                                          prefix_query_tokens=400, prefix_hit_tokens=64), 0, [
            "dc0015" "04" "03" "00"  # [21 items: version 4, type 3, seq 0 (one-way),
            "010407643c280a000305" "02" "cd012c"  # 1, 4, 7, 100, 60, 40, 10, 0, 3, 5, 2, 300 (uint16),
            "ff" "00" "00"  # max_lent -1 (not reported), memory_total 0, memory_free 0,
            "07" "cd0190" "40",  # cached_blocks 7, prefix_query_tokens 400, prefix_hit_tokens 64]
        ]),
        ("AddRequest", AddRequest(42, torch.tensor([1, 2, 300], dtype=i32),
                                  {"max_tokens": 8, "temperature": 0.5, "stop": ("a",), "seed": None}), 9, [
            "97" "04" "0c" "09" "2a" "92a369333203"  # [version 4, type 12, seq 9, request_id 42, ["i32", 3],
            "84" "aa6d61785f746f6b656e73" "08"  # {4 items: "max_tokens": 8,
            "ab74656d7065726174757265" "cb3fe0000000000000"  # "temperature": 0.5 (float64),
            "a473746f70" "91a161" "a473656564" "c0" "c0",  # "stop": ["a"], "seed": None}, output_token_ids None]
            "01000000020000002c010000",
        ]),
        ("StepOutputs", StepOutputs(0, 17, (RequestDelta(1, (5, 6), (-0.5,)), RequestDelta(2, (9,), (), "stop"))), 0, [
            "96" "04" "0e" "00" "00" "11" "92"  # [version 4, type 14, seq 0, instance 0, step 17, [2 records:
            "dc0015" "01" "920506" "91cbbfe0000000000000" "c0"  # [21 fields: 1, [5, 6], [-0.5], finish None,
            "00" "a0" "c0c0c0c0" "9090909090" "00"  # text_offset 0, text "", cumulative, stop x2, error None, top_* [], 0 preemptions,
            "cb0000000000000000" "c0c0c0" "90"  # arrival 0.0, three times None, placement []],
            "dc0015" "02" "9109" "90" "a473746f70"  # [2, [9], [], "stop",
            "00" "a0" "c0c0c0c0" "9090909090" "00" "cb0000000000000000" "c0c0c0" "90",  # the rest as above]]]
        ]),
        ("Reservation", Reservation(None, 8, 2.0), 7, ["96" "04" "05" "07" "c0" "08" "cb4000000000000000"]),
        ("ErrorReply", ErrorReply("CapacityError", "no room"), 5, [
            "95" "04" "0f" "05" "ad43617061636974794572726f72" "a76e6f20726f6f6d",  # "CapacityError", "no room"
        ]),
        ("Ack", Ack(), 6, ["93" "04" "10" "06"]),  # [version 4, type 16, seq 6]
        ("ReleaseBlocks", ReleaseBlocks(42, (1, 2), (2,), (-2,)), 3, [
            "97" "04" "09" "03" "2a"  # [version 4, type 9, seq 3, request_id 42,
            "920102" "9102" "91fe",  # block_ids [1, 2], cached_blocks [2], cached_hashes [-2]]
        ]),
        ("ClaimCached", ClaimCached(42, 1, (3,), (2**63 - 1,)), 4, [
            "97" "04" "1a" "04" "2a" "01"  # [version 4, type 26, seq 4, request_id 42, home 1,
            "9103" "91cf7fffffffffffffff",  # block_ids [3], hashes [2**63 - 1] (uint64)]
        ]),
    ]


@pytest.mark.parametrize("name, msg, seq, golden", _golden(), ids=[g[0] for g in _golden()])
def test_golden_frames_pin_the_wire_format(name, msg, seq, golden):
    """The exact bytes of a few messages, both ways, with both codecs.

    These bytes ARE the wire format (version 4: releases name the blocks a creditor keeps cached, and claims take them). Changing any of them changes the format: bump
    ``PROTOCOL_VERSION`` in ``transport/codec.py`` in the same change (peers of different
    versions then refuse each other's messages by name instead of misreading them), and update
    these bytes and the version pinned below together.
    """
    assert PROTOCOL_VERSION == 4, "a new wire version: update the golden frames with it"
    frames = [bytes.fromhex(h) for h in golden]
    assert as_bytes(CODEC.encode(msg, seq)) == frames
    got_seq, got = CODEC.decode(wire(frames))
    assert got_seq == seq
    assert_same(got, msg)


@pytest.mark.parametrize(
    "what, frames, golden",
    [
        ("a longer msgpack int", ["930410cc06"], ["93041006"]),  # seq 6 as uint8
        ("an int for a float", ["96040507c00802"], ["96040507c008cb4000000000000000"]),  # ttl_s 2
        ("a repeated map key", ["97040c092a92a36933320182a17401a17402c0", "01000000"],
         ["97040c092a92a36933320181a17402c0", "01000000"]),  # {"t": 1, "t": 2}
        ("non-zero padding", ["960402050294a366313602010193a36633320201", "0000003c" "0102030405060708090a0b0c" "0000003f000080ff"],
         ["960402050294a366313602010193a36633320201", "0000003c" "000000000000000000000000" "0000003f000080ff"]),
    ],
    ids=["longer-int", "int-for-float", "repeated-map-key", "non-zero-padding"],
)
def test_what_the_format_leaves_free_decodes_and_re_encodes_as_the_encoder_spells_it(what, frames, golden):
    # Spellings the decoder takes that the encoder never writes: the fuzz tests compare a
    # re-encoding with canonical(input), which must be the encoder's spelling of these too.
    frames, golden = [bytes.fromhex(h) for h in frames], [bytes.fromhex(h) for h in golden]
    seq, msg = CODEC.decode(wire(frames))
    assert as_bytes(CODEC.encode(msg, seq)) == golden == canonical(frames, type(msg))
    assert golden != frames


def test_frame_layout_small_tensors_share_one_frame_large_ones_get_their_own():
    q = make_query(batch=2, with_kv=True)
    frames = CODEC.encode(q, 1)
    assert len(frames) == 2  # header + one frame for q, q_pos, blocks, k, v, slot_mapping
    big = BlockTransfer(1, (1, 2), torch.zeros(2, 2, 2, 16, 4, 64))
    frames = CODEC.encode(big)
    assert [memoryview(f).nbytes for f in frames[1:]] == [big.kv.nbytes]  # no small-tensor frame
    assert big.kv.nbytes >= SMALL_TENSOR_BYTES


def test_received_tensors_are_views_of_the_frames_not_copies():
    big = BlockTransfer(1, (1, 2), torch.randn(2, 2, 2, 16, 4, 64))
    frames = wire(CODEC.encode(big))
    _, got = CODEC.decode(frames)
    base = np.frombuffer(frames[1].buffer, np.uint8).ctypes.data
    assert got.kv.data_ptr() == base  # the frame's memory itself (libzmq allocates it aligned)
    q = make_query()
    frames = wire(CODEC.encode(q))
    _, got = CODEC.decode(frames)
    lo = np.frombuffer(frames[1].buffer, np.uint8).ctypes.data
    assert lo <= got.q.data_ptr() < lo + len(frames[1])


def test_sent_tensors_are_not_copied_when_large():
    kv = torch.randn(2, 2, 2, 16, 4, 64)
    frames = CODEC.encode(BlockTransfer(1, (1, 2), kv))
    assert np.frombuffer(frames[1], np.uint8).ctypes.data == kv.data_ptr()


def test_tensors_that_need_care_are_encoded_contiguous_and_detached():
    base = torch.randn(6, 32, 128, requires_grad=True)
    q = AttentionResult(0, base[::2].detach().transpose(0, 0), base.detach()[::2, :, 0].contiguous())
    got = roundtrip(AttentionResult(0, base[::2], base.detach()[::2, :, 0]))  # strided, requires_grad
    assert torch.equal(got.out, q.out) and got.out.is_contiguous() and not got.out.requires_grad


def _tricky_tensors():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 4, 8, generator=g)
    return {
        "strided": x[::2],
        "requires_grad": x.clone().requires_grad_(True),
        "bf16": x.bfloat16(),
        "neg_view": torch._neg_view(x),
        "transposed": x.transpose(1, 2),
        "empty": torch.empty(0, 4, 8),
        "large_bf16": torch.randn(64, 32, 32, generator=g).bfloat16(),  # 128 KiB: its own frame
        "large_strided": torch.randn(64, 32, 64, generator=g)[:, ::2],
        "large_requires_grad": torch.randn(64, 32, 32, generator=g).requires_grad_(True),
    }


@pytest.mark.parametrize("name", list(_tricky_tensors()))
def test_tensors_of_every_layout_encode_as_the_generic_path_does(name):
    t = _tricky_tensors()[name]
    msg = AttentionResult(3, t, torch.zeros(t.shape[:2]))
    frames = CODEC.encode(msg, 2)
    assert [bytes(memoryview(f).cast("B")) for f in frames] == [bytes(memoryview(f).cast("B")) for f in _generic_frames(msg, 2)]
    got = roundtrip(msg)
    assert torch.equal(got.out, t.detach()) and got.out.dtype == t.dtype and got.out.is_contiguous()


def test_tensors_at_misaligned_addresses_are_copied_not_misread():
    msg = AttentionResult(1, torch.randn(2, 4, 8), torch.randn(2, 4))
    head, pack = CODEC.encode(msg, 3)
    shifted = memoryview(bytearray(len(pack) + 1))[1:]  # an odd address: no float32 lies there
    shifted[:] = pack
    _, got = CODEC.decode([head, shifted])
    assert torch.equal(got.out, msg.out) and torch.equal(got.lse, msg.lse)
    assert got.out.data_ptr() % 4 == 0


def test_decoded_messages_are_checked_like_built_ones():
    with pytest.raises(ValidationError, match=r"AttentionResult.lse='torch.float64\(2, 4\)' is invalid: must be float32 \(2, 4\)"):
        AttentionResult(0, torch.zeros(2, 4, 8), torch.zeros(2, 4, dtype=torch.float64))
    with pytest.raises(ValidationError, match=r"AttentionQuery.cu_q=None is invalid: may be None only with one query "
                                              r"row per request \(total_q=2, B=1\)"):
        AttentionQuery.build(0, [1], torch.zeros(2, 4, 8), None, torch.zeros(2), torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1, 1))
    with pytest.raises(ValidationError, match=r"RequestDelta.finish_reason='done' is invalid: must be None, 'stop', "
                                              r"'length', 'abort' or 'error'"):
        RequestDelta(1, (2,), (), "done")  # a record is checked when built, as a message is


# ---- refusals: each names the value and the limit ----------------------------------------------


def header(*fields, version=PROTOCOL_VERSION, type_id=16, seq=3) -> bytes:
    return msgpack.packb([version, type_id, seq, *fields])


def refused(frames, pattern: str, codec: Codec | None = None) -> DecodeError:
    with pytest.raises(DecodeError, match=pattern) as info:
        (codec or CODEC).decode(frames)
    return info.value


def test_wrong_version_is_refused():
    e = refused([header(version=1)], rf"protocol version 1 is not supported: this side speaks {PROTOCOL_VERSION}")
    assert e.seq is None


def test_garbage_and_non_msgpack_headers_are_refused():
    refused([], "empty message: no header frame")
    refused([b"\xc1"], r"malformed header: not msgpack \(FormatError")
    refused([b"\x93\x01"], r"malformed header: not msgpack \(ValueError: 3 exceeds max_array_len\(2\)\)")  # truncated
    refused([msgpack.packb({"a": 1})], r"malformed header: must be a list \[version, type, seq, fields...\], got \{'a': 1\}")
    refused([msgpack.packb([1, 16])], r"malformed header: must be a list \[version, type, seq, fields...\], got \(1, 16\)")
    refused([msgpack.packb([PROTOCOL_VERSION, 16, -1])], r"malformed header: seq=-1 must be an integer in \[0, 2\*\*63\)")
    refused([header() + b"x"], r"malformed header: not msgpack \(ExtraData")  # trailing bytes


def test_unknown_type_and_wrong_field_count_are_refused():
    assert refused([header(type_id=999)], "unknown message type 999").seq == 3
    refused([header(1, type_id=16)], r"malformed Ack: 1 fields, expected 0")
    refused([header(1, type_id=13)] + [b""], r"malformed AbortRequest: 2 frames, expected 1 \(it carries no tensors\)")


@pytest.mark.parametrize(
    "fields, pattern",
    [
        (["x"], r"request_id='x' must be an integer"),
        ([True], r"request_id=True must be an integer"),
        ([1.5], r"request_id=1.5 must be an integer"),
        ([-1], r"AbortRequest.request_id=-1 is invalid: must be >= 0"),
    ],
)
def test_fields_of_the_wrong_type_or_range_are_refused(fields, pattern):
    refused([header(*fields, type_id=13)], pattern)


# RequestDelta's fields after (request_id, token_ids, logprobs, finish_reason), at their defaults.
DELTA_TAIL = [0, "", None, None, None, None, [], [], [], [], [], 0, 0.0, None, None, None, []]


def test_records_and_maps_are_checked():
    refused([header(0, 1, [[1, [2], [], 7, *DELTA_TAIL]], type_id=14)],
            r"malformed StepOutputs: outputs=\(\(1, \(2,\), \(\), 7, 0, .*\.\.\. holds a RequestDelta whose finish_reason=7 "
            r"must be a string")
    refused([header(0, 1, [[1, [2], [], "done", *DELTA_TAIL]], type_id=14)],
            r"malformed StepOutputs: outputs=.* holds a bad RequestDelta: RequestDelta.finish_reason='done' is invalid: "
            r"must be None, 'stop', 'length', 'abort' or 'error'")
    refused([header(0, 1, [[1, [2]]], type_id=14)], r"malformed StepOutputs: outputs=\(\(1, \(2,\)\),\) must hold RequestDelta records of 21 fields")
    refused([header(0, 1, [[1, [2], [], None, 0, "", None, None, None, None, [3], [], [], [], [], 0, 0.0, None, None, None, []]],
                    type_id=14)], r"RequestDelta.top_token_ids=\(\) is invalid: must have sum\(top_counts\)=3 entries")
    q = CODEC.encode(AddRequest(1, torch.tensor([1]), {"t": 1}))
    bad = msgpack.unpackb(q[0])
    bad[5] = {"t": {"nested": 1}}
    refused([msgpack.packb(bad), q[1]], r"malformed AddRequest: sampling=\{'t': \{'nested': 1\}\} \['t'\]=\{'nested': 1\} must be a scalar or a tuple of scalars")


def test_tensor_specs_are_checked():
    good = CODEC.encode(AttentionResult(0, torch.zeros(1, 2, 4), torch.zeros(1, 2)), 5)
    h = msgpack.unpackb(good[0])

    def with_out(spec):
        return [msgpack.packb([*h[:4], spec, h[5]]), good[1]]

    assert refused(with_out(["c64", 1, 2, 4]), r"out has dtype 'c64', not one of f16, bf16, f32, f64, i8, u8, i16, i32, i64").seq == 5
    refused(with_out(["f32", *([1] * 9)]), r"out has 9 dims, more than MAX_DIMS=8")
    refused(with_out(["f32", 1, -2, 4]), r"malformed AttentionResult: out shape \(1, -2, 4\) must hold integers >= 0")
    refused(with_out(["f32", 1, 1 << 40, 4]), r"out f32\[1, 1099511627776, 4\] is 17592186044416 bytes, over max_message_bytes=16777216")
    refused(with_out("f32"), r"malformed AttentionResult: out='f32' must be a tensor spec \[dtype, dims...\]")
    refused(with_out(["f32", 1, 2, 8]), r"truncated AttentionResult: the small-tensor frame holds 40 bytes, its tensors \(out, lse\) need 72")
    refused(with_out(["f32", 1, 2, 2]), r"malformed AttentionResult: the small-tensor frame holds 40 bytes, its tensors \(out, lse\) need 24")


def test_missing_extra_and_short_frames_are_refused():
    big = CODEC.encode(BlockTransfer(1, (1, 2), torch.zeros(2, 2, 2, 16, 4, 64)))
    refused(big[:1], r"truncated BlockTransfer: 1 frames, its tensors \(kv\) need 2")
    refused([*big, b"extra"], r"malformed BlockTransfer: 3 frames, its tensors \(kv\) need 2")
    refused([big[0], bytes(memoryview(big[1]).cast("B"))[:-1]], r"truncated BlockTransfer: frame 1 holds 131071 bytes, kv needs 131072")
    q = CODEC.encode(make_query())
    refused([q[0], bytes(q[1])[:100]], r"truncated AttentionQuery: the small-tensor frame holds 100 bytes, its tensors \(q, q_pos, blocks\) need 8256")


def test_oversized_input_is_refused_before_it_is_parsed():
    small = Codec(max_message_bytes=4096, max_header_bytes=256)
    refused([b"\x00" * 300], r"header of 300 bytes exceeds max_header_bytes=256", small)
    refused([header(), b"\x00" * 5000], r"message of 5004 bytes exceeds max_message_bytes=4096", small)


def test_semantic_checks_run_on_decode():
    good = CODEC.encode(AttentionResult(0, torch.zeros(1, 2, 4), torch.zeros(1, 2)), 5)
    h = msgpack.unpackb(good[0])
    bad = [msgpack.packb([*h[:5], ["f64", 1, 2]]), bytes(48)]
    refused(bad, r"malformed AttentionResult: AttentionResult.lse='torch.float64\(1, 2\)' is invalid: must be float32 \(1, 2\)")


def test_encoder_refuses_what_it_cannot_carry():
    with pytest.raises(TransportError, match="cannot encode object: not a registered message type"):
        CODEC.encode(object())
    with pytest.raises(TransportError, match=r"AttentionResult.out=.*must be a torch.Tensor"):
        CODEC.encode(_raw(AttentionResult, 0, [1.0, 2.0], torch.zeros(1, 2)))
    with pytest.raises(TransportError, match=r"AddRequest.prompt_token_ids: dtype torch.bool is not one of"):
        CODEC.encode(_raw(AddRequest, 1, torch.tensor([True]), {}))
    with pytest.raises(TransportError, match=r"AbortRequest.request_id='x': must be an integer"):
        CODEC.encode(_raw(AbortRequest, "x"))
    with pytest.raises(TransportError, match=r"cannot encode StepOutputs.outputs=.*: holds a RequestDelta whose "
                                             r"finish_reason=7 must be a string"):
        CODEC.encode(StepOutputs(0, 1, (_raw(RequestDelta, 1, (2,), (), 7, *DELTA_TAIL),)))
    with pytest.raises(TransportError, match=r"cannot encode BlockTransfer: 131\d\d\d bytes exceed max_message_bytes=4096"):
        Codec(max_message_bytes=4096).encode(BlockTransfer(1, (1, 2), torch.zeros(2, 2, 2, 16, 4, 64)))
    # what the fast paths decline (torch cannot export it, msgpack cannot carry it) is refused by name
    with pytest.raises(TransportError, match=r"cannot encode AttentionResult.out: layout torch.sparse_coo is not strided"):
        CODEC.encode(_raw(AttentionResult, 0, torch.zeros(1, 2, 4).to_sparse(), torch.zeros(1, 2)))
    with pytest.raises(TransportError, match=r"cannot encode AttentionResult.out: Cannot copy out of meta tensor"):
        CODEC.encode(_raw(AttentionResult, 0, torch.zeros(1, 2, 4, device="meta"), torch.zeros(1, 2)))
    for seed in (1 << 64, -(1 << 63) - 1):  # beyond both int64 and uint64
        with pytest.raises(TransportError, match=r"cannot encode AddRequest: Integer value out of range"):
            CODEC.encode(AddRequest(1, torch.tensor([1]), {"seed": seed}))
    with pytest.raises(TransportError, match=r"cannot encode ErrorReply: 'utf-8' codec can't encode character '\\udc80'"):
        CODEC.encode(ErrorReply("x", "\udc80"))


def test_a_bug_inside_a_fast_path_surfaces_instead_of_falling_back(monkeypatch):
    """A fast path hands a message to the generic path only when it says "not mine"; any other
    exception out of it is a bug, raised as it is (not hidden behind the generic path, which
    might well succeed)."""
    from infinillm.transport.codec import _PLANS_BY_CLASS

    class Bug(Exception):
        pass

    def bug(*args):
        raise Bug("inside a fast path")

    msg = AddRequest(1, torch.tensor([1, 2], dtype=torch.int32), {"t": 1})
    frames = wire(CODEC.encode(msg, 3))
    if CODEC.compiled:
        class ExplodingMap(dict):  # a field check that fails, not by refusing the value
            def items(self):
                raise Bug("inside a field check")

        with pytest.raises(Bug, match="inside a field check"):
            codec_module._wire.encode(_raw(AddRequest, 1, torch.tensor([1]), ExplodingMap(t=1)), 0, 1 << 20, 1 << 24)
        monkeypatch.setattr(AddRequest, "_check", bug)  # a message check that fails, not by refusing
        with pytest.raises(Bug, match="inside a fast path"):
            codec_module._wire.decode(frames, 1 << 24, 1 << 20)
    else:
        plan = _PLANS_BY_CLASS[AddRequest]
        monkeypatch.setattr(plan, "fast_encode", bug)
        monkeypatch.setattr(plan, "fast_decode", bug)
    with pytest.raises(Bug, match="inside a fast path"):
        CODEC.decode(frames)
    if not CODEC.compiled:
        with pytest.raises(Bug, match="inside a fast path"):
            CODEC.encode(msg, 3)


def _raw(cls, *values):
    """A message built without its checks (to feed the encoder what a buggy caller might)."""
    msg = cls.__new__(cls)
    for name, value in zip(cls.__dataclass_fields__, values):
        object.__setattr__(msg, name, value)
    return msg


def test_codec_limits_are_validated():
    with pytest.raises(ValidationError, match=r"Codec.max_message_bytes=10 is invalid"):
        Codec(max_message_bytes=10)


def test_no_pickle_anywhere_in_the_transport():
    root = pathlib.Path(__file__).parents[2] / "transport"
    for path in root.glob("*.py"):
        code = re.sub(r'""".*?"""', "", path.read_text(), flags=re.S)
        assert "pickle" not in code, path.name


# ---- fuzz: anything at all is either a message or a DecodeError --------------------------------


def _valid_frames() -> list[list[bytes]]:
    return [[bytes(memoryview(f).cast("B")) for f in CODEC.encode(m, 7)] for m in one_of_each()]


VALID = _valid_frames()


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzzed_frames_decode_or_raise_decode_error(data):
    frames = [bytearray(f) for f in data.draw(st.sampled_from(VALID))]
    for _ in range(data.draw(st.integers(0, 4))):
        i = data.draw(st.integers(0, len(frames) - 1))
        f = frames[i]
        op = data.draw(st.sampled_from(["flip", "cut", "grow", "drop", "dup", "junk"]))
        if op == "flip" and f:
            j = data.draw(st.integers(0, len(f) - 1))
            f[j] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            frames[i] = f[: data.draw(st.integers(0, len(f)))]
        elif op == "grow":
            f.extend(data.draw(st.binary(max_size=16)))
        elif op == "drop" and len(frames) > 1:
            del frames[i]
        elif op == "dup":
            frames.insert(i, bytearray(f))
        elif op == "junk":
            frames[i] = bytearray(data.draw(st.binary(max_size=64)))
    try:
        seq, msg = CODEC.decode([zmq.Frame(bytes(f)) for f in frames])
    except DecodeError:
        return
    assert type(msg) in MESSAGE_TYPES.values()
    assert as_bytes(CODEC.encode(msg, seq)) == canonical(frames, type(msg))


_PACKABLE = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1) | st.floats() | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=12,
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(type_id=st.sampled_from(sorted(MESSAGE_TYPES)), data=st.data())
def test_well_formed_headers_with_arbitrary_fields_decode_or_raise_decode_error(type_id, data):
    n = len(MESSAGE_TYPES[type_id].__dataclass_fields__)
    fields = data.draw(st.lists(_PACKABLE | st.lists(st.sampled_from(["f16", "i32", 1, 2, 0]), max_size=4), min_size=n, max_size=n))
    extra = data.draw(st.lists(st.binary(max_size=64), max_size=3))
    frames = [msgpack.packb([PROTOCOL_VERSION, type_id, 1, *fields]), *extra]
    try:
        seq, msg = CODEC.decode(frames)
    except DecodeError:
        return
    assert as_bytes(CODEC.encode(msg, seq)) == canonical(frames, type(msg))


# ---- the compiled fast paths agree with the generic encoder and decoder -------------------------


def _decoded_both_ways(frames):
    """(Python fast path, generic path) decodes of ``frames``; None where one declines or
    refuses. With the compiled codec under test, the fast result is the compiled one's."""
    from infinillm.transport.codec import _PLANS_BY_ID

    header = msgpack.unpackb(frames[0].buffer, use_list=False, raw=False, strict_map_key=True)
    plan = _PLANS_BY_ID[header[1]]
    if CODEC.compiled:
        got = codec_module._wire.decode(frames, CODEC.max_message_bytes, CODEC.max_header_bytes)
        fast = None if got is None else got[1]
        assert got is None or got[0] == header[2]
    else:
        try:
            fast = plan.fast_decode(CODEC, header, frames, header[2])
        except (codec_module._Slow, codec_module._Bad, DecodeError):  # declined, or refused as the generic path does
            fast = None
    try:
        generic = CODEC._decode_fields(plan, header, frames, header[2])
    except DecodeError:
        generic = None
    return fast, generic


def _generic_frames(msg, seq):
    from infinillm.transport.codec import _PLANS_BY_CLASS

    plan = _PLANS_BY_CLASS[type(msg)]
    return CODEC._frames(plan, *CODEC._encode_fields(plan, msg, seq))


@pytest.mark.parametrize("msg", one_of_each(), ids=lambda m: type(m).__name__)
def test_fast_paths_match_the_generic_ones(msg):
    from infinillm.transport.codec import _PLANS_BY_CLASS

    plan = _PLANS_BY_CLASS[type(msg)]
    if CODEC.compiled:  # the compiled encoder's frames are the generic encoder's, byte for byte
        frames = codec_module._wire.encode(msg, 4, CODEC.max_header_bytes, CODEC.max_message_bytes)
        assert frames is not None, "the compiled encoder should take every well-formed message"
        assert [bytes(memoryview(f).cast("B")) for f in frames] == [
            bytes(memoryview(f).cast("B")) for f in _generic_frames(msg, 4)]
    try:
        fast_header, fast_views = plan.fast_encode(msg, 4)
    except codec_module._Slow:  # it may decline (an empty tensor here): then the generic path encodes
        assert any(isinstance(v, torch.Tensor) and v.numel() == 0 for v in map(lambda n: getattr(msg, n), msg.__dataclass_fields__))
    else:
        header, views = CODEC._encode_fields(plan, msg, 4)
        assert fast_header == header
        assert [bytes(v) for v in fast_views] == [bytes(v) for v in views]
    fast, generic = _decoded_both_ways(wire(CODEC.encode(msg, 4)))
    assert fast is not None, "the fast path should take well-formed input"
    assert_same(fast, generic)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fast_decoder_never_accepts_what_the_generic_one_refuses(data):
    frames = [bytearray(f) for f in data.draw(st.sampled_from(VALID))]
    h = msgpack.unpackb(bytes(frames[0]), use_list=False)
    fields = list(h)
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(3, len(fields) - 1)) if len(fields) > 3 else None
        if i is not None:
            fields[i] = data.draw(_PACKABLE | st.lists(st.sampled_from(["f16", "f32", "i32", 1, 2, 3, 0, -1]), max_size=5))
    frames[0] = bytearray(msgpack.packb(fields))
    if data.draw(st.booleans()) and len(frames) > 1:
        frames[1] = frames[1][: data.draw(st.integers(0, len(frames[1])))]
    fast, generic = _decoded_both_ways([zmq.Frame(bytes(f)) for f in frames])
    if fast is not None:
        assert generic is not None
        assert_same(fast, generic)
        assert as_bytes(CODEC.encode(fast, h[2])) == canonical(frames, type(fast))


# ---- the compiled header msgpack is msgpack ------------------------------------------------------

_HEADER_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1) | st.floats(allow_nan=False)
    | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=20) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=40,
)


@settings(max_examples=400)
@given(value=st.lists(_HEADER_VALUES, max_size=8))
def test_compiled_header_packing_writes_msgpacks_bytes(compiled_only, value):
    _wire = codec_module._wire
    packed = msgpack.packb(value, use_bin_type=True)
    assert _wire.pack_header(value) == packed
    assert _wire.unpack_header(packed) == msgpack.unpackb(packed, use_list=False, raw=False, strict_map_key=True)


@settings(max_examples=400)
@given(data=st.binary(max_size=64) | _PACKABLE.map(lambda v: msgpack.packb(v, use_bin_type=True)))
def test_compiled_header_unpacking_reads_what_msgpack_reads_or_declines(compiled_only, data):
    try:
        got = codec_module._wire.unpack_header(data)
    except codec_module._wire._Decline:
        return
    expected = msgpack.unpackb(data, use_list=False, raw=False, strict_map_key=True)
    assert msgpack.packb(got) == msgpack.packb(expected)  # equal values, NaN payloads included
    assert repr(got) == repr(expected)  # and equal types (tuples, ints, floats...)


def test_compiled_header_edge_values(compiled_only):
    _wire = codec_module._wire
    edges = [0, 127, 128, 255, 256, 65535, 65536, (1 << 32) - 1, 1 << 32, (1 << 63) - 1, 1 << 63, (1 << 64) - 1,
             -1, -32, -33, -128, -129, -32768, -32769, -(1 << 31), -(1 << 31) - 1, -(1 << 63),
             "", "a" * 31, "a" * 32, "a" * 255, "a" * 256, "é" * 40, 1.5, -0.0, float("inf"),
             list(range(15)), list(range(16)), list(range(70000)), {"k": 1}, {str(i): i for i in range(16)}]
    for v in edges:
        packed = msgpack.packb([v], use_bin_type=True)
        assert _wire.pack_header([v]) == packed, v
        assert _wire.unpack_header(packed) == msgpack.unpackb(packed, use_list=False, raw=False, strict_map_key=True)
    for bad in (b"\xc4\x01a", b"\xc1", b"\x91", b"\x01\x02", b"\xa3ab", b"\x81\x01\x02", b"\xd4\x00\x00"):
        with pytest.raises(_wire._Decline):
            _wire.unpack_header(bad)
    with pytest.raises(_wire._Decline):
        _wire.pack_header([b"bytes"])


@pytest.mark.parametrize("ttl", [float("nan"), float("inf"), -1.0])
def test_a_reservation_ttl_must_be_finite_and_not_negative(ttl):
    problem = rf"Reservation.ttl_s={ttl!r} is invalid: must be a finite number of seconds >= 0"
    with pytest.raises(ValidationError, match=problem):
        Reservation(1, 8, ttl)
    refused([msgpack.packb([PROTOCOL_VERSION, Reservation.TYPE_ID, 3, 1, 8, ttl])], rf"malformed Reservation: {problem}")


def test_a_heartbeat_carries_signed_changes_from_a_pool_to_the_ledger(core):
    # Heartbeat 1: a request takes 3 blocks (free -3, used +3). Heartbeat 2: it ends (free +3,
    # used -3), then 1 block is reserved and lent (free -1, used +1, lent +1): used -2, free +2.
    pool = core.BlockPool(1, 16, 8)
    ledger = core.DebtLedger()
    ledger.register_instance(1, 16, 8)
    ledger.apply_snapshot(1, pool.counters())
    pool.take_delta()
    pool.allocate(5, 3)
    ledger_before = ledger.instance(1)
    assert ledger.apply_delta(_through_the_wire(pool.take_delta()).to_pool_delta())
    pool.free_request(5)
    res = pool.try_reserve(2, 1, 0.0, 10.0)
    pool.commit(res, 77, 1.0)
    delta = pool.take_delta()
    assert (delta.free, delta.used, delta.lent) == (2, -2, 1)  # a real delta has negative changes
    hb = _through_the_wire(delta)
    assert (hb.free, hb.used, hb.lent, hb.reserved) == (delta.free, delta.used, delta.lent, delta.reserved)
    assert ledger.apply_delta(hb.to_pool_delta())
    view, c = ledger.instance(1), pool.counters()
    assert (view.free, view.used, view.lent, view.reserved, view.version) == (c.free, c.used, c.lent, c.reserved, c.version)
    assert ledger_before.free == 16


def _through_the_wire(delta) -> HeartbeatDelta:
    hb = HeartbeatDelta.from_pool_delta(delta, batch_size=1)
    _, back = CODEC.decode(CODEC.encode(hb))
    assert back == hb
    return back


def test_a_heartbeat_that_goes_back_in_version_is_refused():
    with pytest.raises(ValidationError, match=r"HeartbeatDelta.version=3 is invalid: must be >= base_version=4"):
        HeartbeatDelta(1, 4, 3, 0, -1, 1, 0, 0, 0)
    with pytest.raises(ValidationError, match=r"HeartbeatDelta.batch_size=-1 is invalid"):
        HeartbeatDelta(1, 4, 5, 0, -1, 1, 0, 0, 0, batch_size=-1)
