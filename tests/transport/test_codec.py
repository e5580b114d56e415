"""The codec: every message round-trips; tensors arrive as views of the frames; malformed,
truncated, oversized and wrong-version input is refused with a DecodeError that says why.

Every test runs twice: with the compiled hot path (``_wire``) in front of the Python codec, and
with the Python codec alone; the last section checks that the fast paths (the compiled one
and the Python one) accept exactly what the generic path accepts, with the same result."""

from __future__ import annotations

import pathlib
import re

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
    RequestDelta,
    Reservation,
    ReserveBlocks,
    StepOutputs,
)

from .conftest import make_query

from infinillm.transport import codec as codec_module

CODEC = Codec(max_message_bytes=1 << 24, compiled=False)  # the module's tests swap it (below)


@pytest.fixture(autouse=True, scope="module", params=["compiled", "python"])
def which_codec(request):
    """Run the module against each implementation (CODEC is read at call time)."""
    global CODEC
    if request.param == "compiled" and not codec_module.compiled_available():
        pytest.fail("the compiled codec (infinillm.transport._wire) is not built: run `make build`")
    saved = CODEC
    CODEC = Codec(max_message_bytes=1 << 24, compiled=request.param == "compiled")
    yield request.param
    CODEC = saved


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
        MoveBlocks(42, 4, src=0, dst=3, kind="home"),
        BlockTransfer(42, (7, 8), torch.randn(2, 2, 2, 16, 4, 64, generator=g)),  # 128 KiB: a frame of its own
        AddRequest(42, torch.tensor([1, 2, 3], dtype=torch.int32), {"max_tokens": 8, "temperature": 0.0, "stop": ("a", "b"), "seed": None}),
        AbortRequest(42),
        StepOutputs(0, 17, (RequestDelta(1, (5, 6), (-0.5, -1.25)), RequestDelta(2, (9,), (), "stop"))),
        ErrorReply("CapacityError", "no room"),
        Ack(),
    ]


def test_every_message_type_has_an_example():
    assert {type(m) for m in one_of_each()} == set(MESSAGE_TYPES.values())


@pytest.mark.parametrize("msg", one_of_each(), ids=lambda m: type(m).__name__)
def test_every_message_round_trips(msg):
    assert_same(roundtrip(msg, seq=9), msg)


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
    with pytest.raises(ValidationError, match="lse"):
        AttentionResult(0, torch.zeros(2, 4, 8), torch.zeros(2, 4, dtype=torch.float64))
    with pytest.raises(ValidationError, match=r"cu_q=None.*one query row per request"):
        AttentionQuery.build(0, [1], torch.zeros(2, 4, 8), None, torch.zeros(2), torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1, 1))


# ---- refusals: each names the value and the limit ----------------------------------------------


def header(*fields, version=PROTOCOL_VERSION, type_id=16, seq=3) -> bytes:
    return msgpack.packb([version, type_id, seq, *fields])


def refused(frames, pattern: str, codec: Codec | None = None) -> DecodeError:
    with pytest.raises(DecodeError, match=pattern) as info:
        (codec or CODEC).decode(frames)
    return info.value


def test_wrong_version_is_refused():
    e = refused([header(version=2)], rf"protocol version 2 is not supported: this side speaks {PROTOCOL_VERSION}")
    assert e.seq is None


def test_garbage_and_non_msgpack_headers_are_refused():
    refused([], "empty message")
    refused([b"\xc1"], "malformed header: not msgpack")
    refused([b"\x93\x01"], "malformed header: not msgpack")  # truncated array
    refused([msgpack.packb({"a": 1})], "malformed header: must be a list")
    refused([msgpack.packb([1, 16])], "malformed header: must be a list")
    refused([msgpack.packb([1, 16, -1])], r"seq=-1 must be an integer in \[0, 2\*\*63\)")
    refused([header() + b"x"], "not msgpack")  # trailing bytes


def test_unknown_type_and_wrong_field_count_are_refused():
    assert refused([header(type_id=999)], "unknown message type 999").seq == 3
    refused([header(1, type_id=16)], r"malformed Ack: 1 fields, expected 0")
    refused([header(1, type_id=13)] + [b""], "carries no tensors")


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


def test_records_and_maps_are_checked():
    refused([header(0, 1, [[1, [2], [], 7]], type_id=14)], r"outputs=.* holds a bad RequestDelta|must be a string")
    refused([header(0, 1, [[1, [2]]], type_id=14)], "RequestDelta records of 4 fields")
    q = CODEC.encode(AddRequest(1, torch.tensor([1]), {"t": 1}))
    bad = msgpack.unpackb(q[0])
    bad[5] = {"t": {"nested": 1}}
    refused([msgpack.packb(bad), q[1]], r"must be a scalar or a tuple of scalars")


def test_tensor_specs_are_checked():
    good = CODEC.encode(AttentionResult(0, torch.zeros(1, 2, 4), torch.zeros(1, 2)), 5)
    h = msgpack.unpackb(good[0])

    def with_out(spec):
        return [msgpack.packb([*h[:4], spec, h[5]]), good[1]]

    assert refused(with_out(["c64", 1, 2, 4]), r"out has dtype 'c64', not one of").seq == 5
    refused(with_out(["f32", *([1] * 9)]), r"out has 9 dims, more than MAX_DIMS=8")
    refused(with_out(["f32", 1, -2, 4]), r"shape .* must hold integers >= 0")
    refused(with_out(["f32", 1, 1 << 40, 4]), r"out f32\[1, 1099511627776, 4\] is 17592186044416 bytes, over max_message_bytes=16777216")
    refused(with_out("f32"), r"must be a tensor spec")
    refused(with_out(["f32", 1, 2, 8]), r"truncated AttentionResult: the small-tensor frame holds 40 bytes, its tensors \(out, lse\) need 72")
    refused(with_out(["f32", 1, 2, 2]), r"malformed AttentionResult: the small-tensor frame holds 40 bytes, its tensors \(out, lse\) need 24")


def test_missing_extra_and_short_frames_are_refused():
    big = CODEC.encode(BlockTransfer(1, (1, 2), torch.zeros(2, 2, 2, 16, 4, 64)))
    refused(big[:1], r"truncated BlockTransfer: 1 frames, its tensors \(kv\) need 2")
    refused([*big, b"extra"], r"malformed BlockTransfer: 3 frames, its tensors \(kv\) need 2")
    refused([big[0], bytes(memoryview(big[1]).cast("B"))[:-1]], r"truncated BlockTransfer: frame 1 holds 131071 bytes, kv needs 131072")
    q = CODEC.encode(make_query())
    refused([q[0], bytes(q[1])[:100]], r"truncated AttentionQuery: the small-tensor frame holds 100 bytes")


def test_oversized_input_is_refused_before_it_is_parsed():
    small = Codec(max_message_bytes=4096, max_header_bytes=256)
    refused([b"\x00" * 300], r"header of 300 bytes exceeds max_header_bytes=256", small)
    refused([header(), b"\x00" * 5000], r"message of \d+ bytes exceeds max_message_bytes=4096", small)


def test_semantic_checks_run_on_decode():
    good = CODEC.encode(AttentionResult(0, torch.zeros(1, 2, 4), torch.zeros(1, 2)), 5)
    h = msgpack.unpackb(good[0])
    bad = [msgpack.packb([*h[:5], ["f64", 1, 2]]), bytes(48)]
    refused(bad, r"malformed AttentionResult: AttentionResult.lse='torch.float64\(1, 2\)' is invalid: must be float32")


def test_encoder_refuses_what_it_cannot_carry():
    with pytest.raises(TransportError, match="not a registered message type"):
        CODEC.encode(object())
    with pytest.raises(TransportError, match=r"AttentionResult.out=.*must be a torch.Tensor"):
        CODEC.encode(_raw(AttentionResult, 0, [1.0, 2.0], torch.zeros(1, 2)))
    with pytest.raises(TransportError, match=r"AddRequest.prompt_token_ids: dtype torch.bool is not one of"):
        CODEC.encode(_raw(AddRequest, 1, torch.tensor([True]), {}))
    with pytest.raises(TransportError, match=r"AbortRequest.request_id='x': must be an integer"):
        CODEC.encode(_raw(AbortRequest, "x"))
    with pytest.raises(TransportError, match=r"exceed max_message_bytes=4096"):
        Codec(max_message_bytes=4096).encode(BlockTransfer(1, (1, 2), torch.zeros(2, 2, 2, 16, 4, 64)))


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
    assert isinstance(seq, int)


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
    try:
        CODEC.decode([msgpack.packb([PROTOCOL_VERSION, type_id, 1, *fields]), *extra])
    except DecodeError:
        pass


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
        except Exception:
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
    except Exception:  # it may decline (an empty tensor here): then the generic path encodes
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


# ---- the compiled header msgpack is msgpack ------------------------------------------------------

_HEADER_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1) | st.floats(allow_nan=False)
    | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=20) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=40,
)


@settings(max_examples=400)
@given(value=st.lists(_HEADER_VALUES, max_size=8))
def test_compiled_header_packing_writes_msgpacks_bytes(value):
    if not CODEC.compiled:
        return
    _wire = codec_module._wire
    packed = msgpack.packb(value, use_bin_type=True)
    assert _wire.pack_header(value) == packed
    assert _wire.unpack_header(packed) == msgpack.unpackb(packed, use_list=False, raw=False, strict_map_key=True)


@settings(max_examples=400)
@given(data=st.binary(max_size=64) | _PACKABLE.map(lambda v: msgpack.packb(v, use_bin_type=True)))
def test_compiled_header_unpacking_reads_what_msgpack_reads_or_declines(data):
    if not CODEC.compiled:
        return
    try:
        got = codec_module._wire.unpack_header(data)
    except codec_module._wire._Decline:
        return
    expected = msgpack.unpackb(data, use_list=False, raw=False, strict_map_key=True)
    assert msgpack.packb(got) == msgpack.packb(expected)  # equal values, NaN payloads included
    assert repr(got) == repr(expected)  # and equal types (tuples, ints, floats...)


def test_compiled_header_edge_values():
    if not CODEC.compiled:
        pytest.skip("compiled codec only")
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
    with pytest.raises(ValidationError, match="ttl_s"):
        Reservation(1, 8, ttl)
    refused([msgpack.packb([PROTOCOL_VERSION, Reservation.TYPE_ID, 3, 1, 8, ttl])], r"malformed Reservation: .*ttl_s")
