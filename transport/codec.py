"""The one encoder and decoder of every message in ``messages.py``: never pickle.

A message travels as one ZeroMQ multipart message::

    frame 0      header, msgpack: [PROTOCOL_VERSION, type_id, seq, field_0, field_1, ...]
    frame 1      the small tensors, packed at 16-byte aligned offsets  (when there are any)
    frame 2...   one frame per large tensor (>= 64 KiB), sent zero-copy

Fields appear in the dataclass's order. A tensor field is ``[dtype, dim_0, dim_1, ...]`` in the
header (``None`` when absent) and its bytes (C order) sit in the frames; which frame and offset
follow from the dtypes and shapes alone, so the decoder recomputes the layout and refuses any
frame whose length does not match it exactly. A record (``tuple[RequestDelta, ...]``) is a
list of its field lists. ``seq`` (0: one-way) pairs a reply with its request.

The decoder refuses, with ``DecodeError`` (a ``TransportError``) naming the value and the
limit: input over ``max_message_bytes`` or a header over ``max_header_bytes``, malformed
msgpack, another protocol version, an unknown type id, a wrong field count, a field of the
wrong type or out of range, an unknown dtype, more than 8 dims, frames missing, extra or of
the wrong length, and anything the message's own ``_check`` rejects.

The message is checked (``Message._check``) on the header's tensor specs before any tensor is
built. Received tensors are views of the received frames (through numpy, or DLPack on the compiled
path, on the frame's writable buffer: no copy) unless libzmq placed a tensor at an address not aligned to its
element size, when that tensor is copied. Sent tensors are viewed through numpy, not copied,
except that small tensors are packed into one frame (ZeroMQ copies frames under 64 KiB anyway);
a large tensor's memory is handed to ZeroMQ as it is, so it must not be written to after the
send (messages are immutable).

Two implementations of the hot path. This module is the specification: its generic encoder and
decoder, with straight-line Python compiled per message type for well-formed input. The
compiled ``_wire`` extension (Cython) does the same for well-formed input and hands everything
else to the Python path, so only Python ever refuses input or explains why. A fast path says
"not mine" in one way only (``_Slow`` here, None from ``_wire``); any other exception out of it
is a bug, and surfaces as one instead of quietly taking the slow path. ``INFINILLM_CORE``
chooses, as for the scheduler core: ``compiled`` (the default; an error if the extension is
missing), ``python``, or ``auto``; ``Codec(compiled=...)`` overrides it per codec.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Callable, Sequence

import msgpack
import numpy as np
import torch
import zmq

from .._choice import core_choice
from ..errors import TransportError, ValidationError
from .messages import MESSAGE_TYPES, Message

try:
    from . import _wire
except ImportError as exc:  # not built (a bare checkout): the Python path serves
    _wire = None
    _wire_import_error: ImportError | None = exc
else:
    _wire_import_error = None

__all__ = ["Codec", "DecodeError", "PROTOCOL_VERSION", "SMALL_TENSOR_BYTES", "MAX_DIMS"]

PROTOCOL_VERSION = 4
SMALL_TENSOR_BYTES = 1 << 16  # tensors below this share one frame
MAX_DIMS = 8
_ALIGN = 16
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1

# Wire names of the dtypes a message may carry (no bool: arbitrary bytes are not valid bools).
_DTYPES: dict[str, torch.dtype] = {
    "f16": torch.float16,
    "bf16": torch.bfloat16,
    "f32": torch.float32,
    "f64": torch.float64,
    "i8": torch.int8,
    "u8": torch.uint8,
    "i16": torch.int16,
    "i32": torch.int32,
    "i64": torch.int64,
}
_DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in _DTYPES.items()}
_ITEMSIZE: dict[str, int] = {k: torch.empty(0, dtype=v).element_size() for k, v in _DTYPES.items()}
# Received bytes go through numpy (cheaper than torch.frombuffer + views); bf16 rides as int16.
_NP_DTYPES: dict[str, tuple[np.dtype, torch.dtype | None]] = {
    k: (np.dtype(np.int16), torch.bfloat16) if v == torch.bfloat16 else (torch.empty(0, dtype=v).numpy().dtype, None)
    for k, v in _DTYPES.items()
}


class DecodeError(TransportError):
    """Input the decoder refused. ``seq`` is the request's sequence number when the header
    was readable that far (so the receiver can answer with an error), else None."""

    def __init__(self, message: str, *, seq: int | None = None) -> None:
        super().__init__(message)
        self.seq = seq


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---- field kinds: one check per kind, used by both directions --------------------------------
# A check returns the value to put in the message (decode) or on the wire (encode) and raises
# _Bad(reason) for anything else.


class _Bad(Exception):
    pass


# What ``Message._check`` (and a record's constructor) raises for a value it refuses: the
# decoders turn these into DecodeError, the fast ones into "declined".
_CHECK_ERRORS = (ValidationError, TypeError, ValueError)


def _check_int(v: Any) -> int:
    if type(v) is not int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise _Bad("must be an integer")
        v = int(v)
    if v < _INT64_MIN or v > _INT64_MAX:
        raise _Bad("must fit in int64")
    return v


def _check_float(v: Any) -> float:
    if type(v) is float:
        return v
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _Bad("must be a number")
    return float(v)


def _check_str(v: Any) -> str:
    if type(v) is not str:
        raise _Bad("must be a string")
    return v


def _check_bool(v: Any) -> bool:
    if type(v) is not bool:
        raise _Bad("must be a bool")
    return v


def _optional(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def check_optional(v: Any) -> Any:
        return None if v is None else check(v)

    return check_optional


def _tuple_of(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def check_tuple(v: Any) -> tuple:
        if type(v) is not tuple:
            if not isinstance(v, (tuple, list)):
                raise _Bad("must be a tuple")
        return tuple([check(x) for x in v])

    return check_tuple


_SCALAR_TYPES = (int, float, str, bool, type(None))


def _check_params(v: Any) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise _Bad("must be a map of option names to values")
    out = {}
    for key, value in v.items():
        if type(key) is not str:
            raise _Bad(f"has a key {_short(key)} that is not a string")
        if isinstance(value, (tuple, list)):
            if not all(type(x) in _SCALAR_TYPES for x in value):
                raise _Bad(f"[{key!r}] must hold only scalars")
            value = tuple(value)
        elif type(value) not in _SCALAR_TYPES:
            raise _Bad(f"[{key!r}]={_short(value)} must be a scalar or a tuple of scalars")
        out[key] = value
    return out


_SCALAR_CHECKS: dict[Any, Callable[[Any], Any]] = {int: _check_int, float: _check_float, str: _check_str, bool: _check_bool}

_TENSOR = "tensor"
_OPT_TENSOR = "tensor?"


def _record_check(cls: type) -> tuple[Callable[[Any], Any], Callable[[Any], Any]]:
    """(encode, decode) checks for ``tuple[cls, ...]`` of a record dataclass of scalar kinds."""
    names = [f.name for f in dataclasses.fields(cls)]
    hints = typing.get_type_hints(cls)
    checks = []
    for name in names:
        kind = _kind_of(hints[name], f"{cls.__name__}.{name}")
        if isinstance(kind, str) or kind is _check_params:
            raise TypeError(f"{cls.__name__}.{name}: records carry only scalars and tuples of scalars")
        checks.append(kind)
    n = len(names)

    def bad_field(values: Sequence[Any]) -> _Bad:
        # (off the hot path: a record failed its checks) which field, with what value
        for check, name, x in zip(checks, names, values):
            try:
                check(x)
            except _Bad as e:
                return _Bad(f"holds a {cls.__name__} whose {name}={_short(x)} {e}")
        raise AssertionError("a record check failed, then passed")  # pragma: no cover

    def encode(v: Any) -> list:
        if not isinstance(v, (tuple, list)):
            raise _Bad(f"must be a tuple of {cls.__name__}")
        out = []
        for item in v:
            if type(item) is not cls:
                raise _Bad(f"must hold only {cls.__name__}, not {type(item).__name__}")
            values = [getattr(item, name) for name in names]
            try:
                out.append([check(x) for check, x in zip(checks, values)])
            except _Bad:
                raise bad_field(values) from None
        return out

    def decode(v: Any) -> tuple:
        if type(v) is not tuple:
            raise _Bad(f"must be a list of {cls.__name__} records")
        out = []
        for item in v:
            if type(item) is not tuple or len(item) != n:
                raise _Bad(f"must hold {cls.__name__} records of {n} fields")
            try:
                values = [check(x) for check, x in zip(checks, item)]
            except _Bad:
                raise bad_field(item) from None
            try:
                out.append(cls(*values))
            except _CHECK_ERRORS as e:
                raise _Bad(f"holds a bad {cls.__name__}: {e}") from None
        return tuple(out)

    return encode, decode


def _kind_of(hint: Any, where: str) -> Any:
    """The check for a field type (or _TENSOR / _OPT_TENSOR / a (encode, decode) pair)."""
    if hint is torch.Tensor:
        return _TENSOR
    if hint in _SCALAR_CHECKS:
        return _SCALAR_CHECKS[hint]
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType) and len(args) == 2 and type(None) in args:
        inner = args[0] if args[1] is type(None) else args[1]
        if inner is torch.Tensor:
            return _OPT_TENSOR
        if inner in _SCALAR_CHECKS:
            return _optional(_SCALAR_CHECKS[inner])
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        if args[0] in _SCALAR_CHECKS:
            return _tuple_of(_SCALAR_CHECKS[args[0]])
        if dataclasses.is_dataclass(args[0]):
            return _record_check(args[0])
    if origin is dict and args and args[0] is str:
        return _check_params
    raise TypeError(f"{where}: the codec cannot carry a field of type {hint!r}")


class _Plan:
    """How one message class goes on the wire (built once per class)."""

    __slots__ = ("cls", "name", "type_id", "names", "encoders", "decoders", "tensor_fields", "num_fields",
                 "kinds", "fast_encode", "fast_decode")

    def __init__(self, cls: type[Message]) -> None:
        self.cls = cls
        self.name = cls.__name__
        self.type_id: int = cls.TYPE_ID  # type: ignore[attr-defined]
        hints = typing.get_type_hints(cls)
        self.names = tuple(f.name for f in dataclasses.fields(cls))
        self.encoders: list[Any] = []
        self.decoders: list[Any] = []
        for name in self.names:
            kind = _kind_of(hints[name], f"{self.name}.{name}")
            if isinstance(kind, tuple):
                self.encoders.append(kind[0])
                self.decoders.append(kind[1])
            else:
                self.encoders.append(kind)
                self.decoders.append(kind)
        self.tensor_fields = tuple(i for i, k in enumerate(self.encoders) if k in (_TENSOR, _OPT_TENSOR))
        self.num_fields = len(self.names)
        self.kinds = [_fast_kind(hints[name]) for name in self.names]  # the fast paths' view
        self.fast_encode = _compile_encoder(self, self.kinds)
        self.fast_decode = _compile_decoder(self, self.kinds)


# ---- fast paths: straight-line code per message type ---------------------------------------------
# The generic encoder and decoder above walk a message's fields in a loop and dispatch on each
# field's kind. On the hot path (an attention query per creditor per layer) that dispatch is a
# good share of the cost, so each plan also gets an encoder and a decoder compiled from its
# fields (as dataclasses compile __init__). They accept only what the generic path accepts and
# produce the same result; on anything unusual they raise _Slow (or a field check's _Bad), and
# the caller runs the generic path, which gives the exact error (or handles the case: a
# strided, empty or CUDA tensor...). Nothing else is caught: any other exception is a bug. The
# fast decoder's DecodeError comes from the generic path's own helpers (``_parse_spec``,
# ``_layout``), reached in the same field order: it is the error the generic path would raise.


class _Slow(Exception):
    """The fast path declines: let the generic path decide."""


_DECLINED = (_Slow, _Bad)  # all a fast path raises to say "not mine"


_LO, _HI = _INT64_MIN, _INT64_MAX
_FAST_SCALARS = {int: "int", float: "float", str: "str", bool: "bool"}


def _fast_kind(hint: Any) -> str:
    if hint is torch.Tensor:
        return "tensor"
    if hint in _FAST_SCALARS:
        return _FAST_SCALARS[hint]
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 2 and type(None) in args:
        inner = args[0] if args[1] is type(None) else args[1]
        if inner is torch.Tensor:
            return "tensor?"
        if inner in _FAST_SCALARS:
            return _FAST_SCALARS[inner] + "?"
    if typing.get_origin(hint) is tuple and args == (int, Ellipsis):
        return "ints"
    return "other"  # the generic check, called from the compiled code


def _check_lines(kind: str, v: str, indent: str) -> list[str]:
    """Lines that raise _Slow unless ``v`` is a valid value of a scalar ``kind``."""
    base = kind.rstrip("?")
    if base == "int":
        test = f"type({v}) is not int or {v} < _LO or {v} > _HI"
    elif base == "ints":
        return [f"{indent}if type({v}) is not tuple: raise _Slow",
                f"{indent}for _x in {v}:",
                f"{indent}    if type(_x) is not int or _x < _LO or _x > _HI: raise _Slow"]
    else:
        test = f"type({v}) is not {base}"
    if kind.endswith("?"):
        test = f"{v} is not None and ({test})"
    return [f"{indent}if {test}: raise _Slow"]


def _compile(source: str, name: str, namespace: dict[str, Any]) -> Callable[..., Any]:
    exec(compile(source, f"<codec {name}>", "exec"), namespace)
    return namespace[name]


def _compile_encoder(plan: _Plan, kinds: list[str]) -> Callable[..., Any]:
    """``fast(msg, seq) -> (header list, tensor byte views)``, or raises."""
    lines = ["def fast_encode(msg, seq):", f"    h = [{PROTOCOL_VERSION}, {plan.type_id}, seq]", "    views = []"]
    for i, (name, kind) in enumerate(zip(plan.names, kinds)):
        v = f"f{i}"
        lines.append(f"    {v} = msg.{name}")
        if kind in ("tensor", "tensor?"):
            ind = "    "
            if kind == "tensor?":
                lines.append(f"    if {v} is None: h.append(None)")
                lines.append("    else:")
                ind = "        "
            lines += [
                f"{ind}if type({v}) is not _Tensor: raise _Slow",
                f"{ind}_c = _plain_code({v})",
                f"{ind}if _c is None: raise _Slow",
                f"{ind}_s = {v}.shape",
                f"{ind}if len(_s) > {MAX_DIMS}: raise _Slow",
                f"{ind}views.append(_mv(({v}.view(_int16) if _c == 'bf16' else {v}).numpy()).cast('B'))",
                f"{ind}h.append([_c, *_s])",
            ]
        elif kind == "other":
            lines.append(f"    h.append(enc{i}({v}))")
        else:
            lines += _check_lines(kind, v, "    ")
            lines.append(f"    h.append({v})")
    lines.append("    return h, views")
    namespace: dict[str, Any] = {
        "_Slow": _Slow, "_LO": _LO, "_HI": _HI, "_Tensor": torch.Tensor, "_plain_code": _plain_code,
        "_mv": memoryview, "_int16": torch.int16,
        **{f"enc{i}": enc for i, enc in enumerate(plan.encoders)},
    }
    return _compile("\n".join(lines), "fast_encode", namespace)


def _compile_decoder(plan: _Plan, kinds: list[str]) -> Callable[..., Any]:
    """``fast(codec, header, frames, seq) -> message``, or raises (header length checked)."""
    n = len(kinds)
    unpack = ", ".join(f"f{i}" for i in range(n))
    lines = ["def fast_decode(codec, h, frames, seq):", f"    _, _, _, {unpack}{',' if n == 1 else ''} = h" if n else "    pass",
             "    specs = []"]
    for i, kind in enumerate(kinds):
        v = f"f{i}"
        if kind in ("tensor", "tensor?"):
            ind = "    "
            if kind == "tensor?":
                lines.append(f"    if {v} is not None:")
                ind = "        "
            lines += [f"{ind}{v} = codec._parse_spec(plan, {i}, {v}, seq)", f"{ind}specs.append({v})"]
        elif kind == "other":
            lines.append(f"    {v} = dec{i}({v})")
        else:
            lines += _check_lines(kind, v, "    ")
    lines.append("    if specs: buffers = codec._layout(plan, frames, specs, seq)")
    lines.append("    elif len(frames) != 1: raise _Slow")
    lines.append("    msg = _new(cls)")
    lines += [f"    _setattr(msg, {name!r}, f{i})" for i, name in enumerate(plan.names)]
    lines.append("    try: msg._check()")
    lines.append("    except _CHECK_ERRORS: raise _Slow from None  # the generic path says why")
    lines.append("    if specs:")
    lines.append("        for spec, buf in zip(specs, buffers): _setattr(msg, spec.name, _tensor_at(buf, spec))")
    lines.append("    return msg")
    namespace: dict[str, Any] = {
        "_Slow": _Slow, "_CHECK_ERRORS": _CHECK_ERRORS, "_LO": _LO, "_HI": _HI, "plan": plan, "cls": plan.cls,
        "_new": plan.cls.__new__,
        "_setattr": object.__setattr__, "_tensor_at": _tensor_at,
        **{f"dec{i}": dec for i, dec in enumerate(plan.decoders)},
    }
    return _compile("\n".join(lines), "fast_decode", namespace)


_PLANS_BY_ID: dict[int, _Plan] = {}
_PLANS_BY_CLASS: dict[type, _Plan] = {}


def _plans() -> None:
    for type_id, cls in MESSAGE_TYPES.items():
        if type_id not in _PLANS_BY_ID:
            plan = _Plan(cls)
            _PLANS_BY_ID[type_id] = plan
            _PLANS_BY_CLASS[cls] = plan
            if _wire is not None:
                _wire.register(cls, plan.type_id, plan.names, plan.kinds, list(plan.encoders), list(plan.decoders))


def compiled_available() -> bool:
    """Whether the compiled hot path (``infinillm.transport._wire``) is built."""
    return _wire is not None


def _use_compiled(choice: bool | None) -> bool:
    if choice is None:
        name = core_choice()
        if name == "python":
            return False
        choice = name == "compiled" or _wire is not None
    if choice and _wire is None:
        raise ImportError(
            "the compiled codec (infinillm.transport._wire) is not built: run `make build` (or `pip install -e .`)"
        ) from _wire_import_error
    return bool(choice)



def _buffer(frame: Any) -> memoryview:
    """A writable memoryview of a received frame (zmq.Frame, bytes, bytearray, memoryview)."""
    if isinstance(frame, zmq.Frame):
        buf = frame.buffer
    else:
        buf = memoryview(frame)
    if buf.readonly:  # bytes: torch wants writable memory
        buf = memoryview(bytearray(buf))
    if buf.ndim != 1 or buf.itemsize != 1:
        buf = buf.cast("B")
    return buf


class Codec:
    """Encodes messages to frames and decodes frames to messages, within limits.

    ``max_message_bytes`` bounds the sum of a message's frames (``TransportConfig``'s field of
    that name), ``max_header_bytes`` its msgpack header. One codec per trio loop (it keeps a
    msgpack packer).
    """

    __slots__ = ("max_message_bytes", "max_header_bytes", "compiled", "_packb")

    def __init__(self, *, max_message_bytes: int = 1 << 30, max_header_bytes: int = 1 << 20,
                 compiled: bool | None = None) -> None:
        if isinstance(max_message_bytes, bool) or not isinstance(max_message_bytes, int) or max_message_bytes < 1024:
            raise ValidationError("max_message_bytes", max_message_bytes, "must be an integer >= 1024", owner="Codec")
        if isinstance(max_header_bytes, bool) or not isinstance(max_header_bytes, int) or max_header_bytes < 64:
            raise ValidationError("max_header_bytes", max_header_bytes, "must be an integer >= 64", owner="Codec")
        self.max_message_bytes = max_message_bytes
        self.max_header_bytes = min(max_header_bytes, max_message_bytes)
        self.compiled = _use_compiled(compiled)  # the compiled hot path first (see the module docstring)
        self._packb = msgpack.Packer(use_bin_type=True, autoreset=True).pack

    @classmethod
    def from_config(cls, config: Any) -> Codec:
        return cls(max_message_bytes=config.max_message_bytes)

    # ---- encode -------------------------------------------------------------------------------

    def encode(self, msg: Message, seq: int = 0) -> list[Any]:
        """The frames of ``msg`` (``seq``: 0 for one-way, else the request's number)."""
        if self.compiled:
            frames = _wire.encode(msg, seq, self.max_header_bytes, self.max_message_bytes)
            if frames is not None:
                return frames
        plan = _PLANS_BY_CLASS.get(type(msg))
        if plan is None:
            raise TransportError(f"cannot encode {type(msg).__name__}: not a registered message type")
        try:
            header, views = plan.fast_encode(msg, seq)
        except _DECLINED:  # the generic path decides (and explains)
            header, views = self._encode_fields(plan, msg, seq)
        return self._frames(plan, header, views)

    def _encode_fields(self, plan: _Plan, msg: Message, seq: int) -> tuple[list[Any], list[memoryview]]:
        header: list[Any] = [PROTOCOL_VERSION, plan.type_id, seq]
        views: list[memoryview] = []  # the tensors' bytes, in field order
        for name, enc in zip(plan.names, plan.encoders):
            value = getattr(msg, name)
            if enc is _TENSOR or enc is _OPT_TENSOR:
                if value is None:
                    if enc is _TENSOR:
                        raise TransportError(f"cannot encode {plan.name}.{name}=None: must be a tensor")
                    header.append(None)
                    continue
                code = _plain_code(value) if isinstance(value, torch.Tensor) else None
                if code is None:  # not viewable as it is: check it, make it contiguous on the CPU
                    code, value = _normalize(plan, name, value)
                view = _bytes_of(value)
                shape = value.shape
                if len(shape) > MAX_DIMS:
                    raise TransportError(f"cannot encode {plan.name}.{name}: {len(shape)} dims exceed MAX_DIMS={MAX_DIMS}")
                header.append([code, *shape])
                views.append(view)
                continue
            try:
                header.append(enc(value))
            except _Bad as e:
                raise TransportError(f"cannot encode {plan.name}.{name}={_short(value)}: {e}") from None
        return header, views

    def _frames(self, plan: _Plan, header: list[Any], views: list[memoryview]) -> list[Any]:
        try:
            head = self._packb(header)
        except (TypeError, ValueError, OverflowError) as e:
            raise TransportError(f"cannot encode {plan.name}: {e}") from None
        if len(head) > self.max_header_bytes:
            raise TransportError(
                f"cannot encode {plan.name}: header of {len(head)} bytes exceeds max_header_bytes={self.max_header_bytes}"
            )
        if not views:
            return [head]
        total = len(head)
        small_end = 0
        num_small = 0
        for view in views:
            nbytes = view.nbytes
            total += nbytes
            if nbytes < SMALL_TENSOR_BYTES:
                small_end = ((small_end + _ALIGN - 1) & -_ALIGN) + nbytes
                num_small += 1
        if total > self.max_message_bytes:
            raise TransportError(f"cannot encode {plan.name}: {total} bytes exceed max_message_bytes={self.max_message_bytes}")
        frames: list[Any] = [head]
        if num_small:
            pack = bytearray(small_end)
            off = 0
            for view in views:
                nbytes = view.nbytes
                if nbytes < SMALL_TENSOR_BYTES:
                    off = (off + _ALIGN - 1) & -_ALIGN
                    pack[off : off + nbytes] = view
                    off += nbytes
            frames.append(pack)
        if num_small < len(views):
            for view in views:
                if view.nbytes >= SMALL_TENSOR_BYTES:
                    frames.append(view)
        return frames

    # ---- decode -------------------------------------------------------------------------------

    def decode(self, frames: Sequence[Any]) -> tuple[int, Message]:
        """``(seq, message)`` from received frames, or ``DecodeError``."""
        if self.compiled:
            got = _wire.decode(frames, self.max_message_bytes, self.max_header_bytes)
            if got is not None:
                return got
        n_frames = len(frames)
        if n_frames == 0:
            raise DecodeError("empty message: no header frame")
        total = 0
        for f in frames:
            total += len(f)
        if total > self.max_message_bytes:
            raise DecodeError(f"message of {total} bytes exceeds max_message_bytes={self.max_message_bytes}")
        head = frames[0]
        if len(head) > self.max_header_bytes:
            raise DecodeError(f"header of {len(head)} bytes exceeds max_header_bytes={self.max_header_bytes}")
        try:
            header = msgpack.unpackb(
                head.buffer if isinstance(head, zmq.Frame) else head, use_list=False, raw=False, strict_map_key=True
            )
        except Exception as e:  # msgpack raises several kinds (ValueError, ExtraData, TypeError...)
            raise DecodeError(f"malformed header: not msgpack ({type(e).__name__}: {e})") from None
        if type(header) is not tuple or len(header) < 3:
            raise DecodeError(f"malformed header: must be a list [version, type, seq, fields...], got {_short(header)}")
        version, type_id, seq = header[0], header[1], header[2]
        if version != PROTOCOL_VERSION or type(version) is not int:
            raise DecodeError(f"protocol version {_short(version)} is not supported: this side speaks {PROTOCOL_VERSION}")
        if type(seq) is not int or not 0 <= seq <= _INT64_MAX:
            raise DecodeError(f"malformed header: seq={_short(seq)} must be an integer in [0, 2**63)")
        plan = _PLANS_BY_ID.get(type_id) if type(type_id) is int else None
        if plan is None:
            raise DecodeError(f"unknown message type {_short(type_id)}", seq=seq)
        if len(header) - 3 != plan.num_fields:
            raise DecodeError(
                f"malformed {plan.name}: {len(header) - 3} fields, expected {plan.num_fields} ({', '.join(plan.names)})",
                seq=seq,
            )
        try:
            return seq, plan.fast_decode(self, header, frames, seq)
        except _DECLINED:  # the generic path decides (and explains)
            return seq, self._decode_fields(plan, header, frames, seq)

    def _decode_fields(self, plan: _Plan, header: tuple, frames: Sequence[Any], seq: int) -> Message:
        n_frames = len(frames)
        values: list[Any] = []
        specs: list[_Spec] = []
        for i, (name, dec) in enumerate(zip(plan.names, plan.decoders)):
            v = header[3 + i]
            if dec is _TENSOR or dec is _OPT_TENSOR:
                if v is None and dec is _OPT_TENSOR:
                    values.append(None)
                    continue
                spec = self._parse_spec(plan, i, v, seq)
                specs.append(spec)
                values.append(spec)  # stands in for the tensor until the message is checked
                continue
            try:
                values.append(dec(v))
            except _Bad as e:
                raise DecodeError(f"malformed {plan.name}: {name}={_short(v)} {e}", seq=seq) from None
        buffers: list[memoryview] = []
        if specs:
            buffers = self._layout(plan, frames, specs, seq)
        elif n_frames != 1:
            raise DecodeError(f"malformed {plan.name}: {n_frames} frames, expected 1 (it carries no tensors)", seq=seq)
        # Build the message around the specs and check it, then put the tensors in.
        msg = plan.cls.__new__(plan.cls)
        for name, v in zip(plan.names, values):
            _setattr(msg, name, v)
        try:
            msg._check()
        except _CHECK_ERRORS as e:
            raise DecodeError(f"malformed {plan.name}: {e}", seq=seq) from None
        for spec, buf in zip(specs, buffers):
            _setattr(msg, spec.name, _tensor_at(buf, spec))
        return msg

    def _parse_spec(self, plan: _Plan, field: int, v: Any, seq: int) -> _Spec:
        name = plan.names[field]
        if type(v) is not tuple or not v or type(v[0]) is not str:
            raise DecodeError(f"malformed {plan.name}: {name}={_short(v)} must be a tensor spec [dtype, dims...]", seq=seq)
        code = v[0]
        if code not in _DTYPES:
            raise DecodeError(f"malformed {plan.name}: {name} has dtype {_short(code)}, not one of {', '.join(_DTYPES)}", seq=seq)
        shape = v[1:]
        if len(shape) > MAX_DIMS:
            raise DecodeError(f"malformed {plan.name}: {name} has {len(shape)} dims, more than MAX_DIMS={MAX_DIMS}", seq=seq)
        numel = 1
        for d in shape:
            if type(d) is not int or d < 0:
                raise DecodeError(f"malformed {plan.name}: {name} shape {_short(shape)} must hold integers >= 0", seq=seq)
            numel *= d
        nbytes = numel * _ITEMSIZE[code]
        if nbytes > self.max_message_bytes:
            raise DecodeError(
                f"malformed {plan.name}: {name} {code}{list(shape)} is {nbytes} bytes, over max_message_bytes={self.max_message_bytes}",
                seq=seq,
            )
        return _Spec(name, code, shape, nbytes)

    @staticmethod
    def _layout(plan: _Plan, frames: Sequence[Any], specs: list[_Spec], seq: int) -> list[memoryview]:
        """Check the frames against the layout the specs imply; set each spec's offset and
        return the buffer each tensor lies in."""
        small_end = 0
        num_small = 0
        for spec in specs:
            if spec.nbytes < SMALL_TENSOR_BYTES:
                spec.offset = off = (small_end + _ALIGN - 1) & -_ALIGN
                small_end = off + spec.nbytes
                num_small += 1
        expected = 1 + (1 if num_small else 0) + len(specs) - num_small
        if len(frames) != expected:
            what = "truncated" if len(frames) < expected else "malformed"
            raise DecodeError(
                f"{what} {plan.name}: {len(frames)} frames, its tensors ({', '.join(s.name for s in specs)}) need {expected}",
                seq=seq,
            )
        buffers: list[memoryview] = []
        small_buf = None
        if num_small:
            small_buf = _buffer(frames[1])
            if len(small_buf) != small_end:
                raise DecodeError(
                    f"{'truncated' if len(small_buf) < small_end else 'malformed'} {plan.name}: the small-tensor frame "
                    f"holds {len(small_buf)} bytes, its tensors "
                    f"({', '.join(s.name for s in specs if s.nbytes < SMALL_TENSOR_BYTES)}) need {small_end}",
                    seq=seq,
                )
        k = 2 if num_small else 1
        for spec in specs:
            if spec.nbytes < SMALL_TENSOR_BYTES:
                buffers.append(small_buf)
                continue
            buf = _buffer(frames[k])
            if len(buf) != spec.nbytes:
                raise DecodeError(
                    f"{'truncated' if len(buf) < spec.nbytes else 'malformed'} {plan.name}: frame {k} holds {len(buf)} "
                    f"bytes, {spec.name} needs {spec.nbytes}",
                    seq=seq,
                )
            buffers.append(buf)
            k += 1
        return buffers


class _Spec:
    """A tensor as the header describes it: what ``Message._check`` reads (``dtype``,
    ``shape``, ``ndim``) before the tensor itself is built."""

    __slots__ = ("name", "code", "dtype", "shape", "ndim", "nbytes", "offset")

    def __init__(self, name: str, code: str, shape: tuple[int, ...], nbytes: int) -> None:
        self.name = name
        self.code = code
        self.dtype = _DTYPES[code]
        self.shape = shape
        self.ndim = len(shape)
        self.nbytes = nbytes
        self.offset = 0

    def __repr__(self) -> str:
        return f"{self.dtype}{self.shape}"


_setattr = object.__setattr__


def _normalize(plan: _Plan, name: str, t: Any) -> tuple[str, torch.Tensor]:
    """The slow path of encoding a tensor field: check it, and make it contiguous on the CPU."""
    if not isinstance(t, torch.Tensor):
        raise TransportError(f"cannot encode {plan.name}.{name}={_short(t)}: must be a torch.Tensor")
    code = _DTYPE_NAMES.get(t.dtype)
    if code is None:
        raise TransportError(
            f"cannot encode {plan.name}.{name}: dtype {t.dtype} is not one of {', '.join(map(str, _DTYPES.values()))}"
        )
    if t.layout != torch.strided:
        raise TransportError(f"cannot encode {plan.name}.{name}: layout {t.layout} is not strided")
    try:
        if not t.is_cpu:
            t = t.cpu()
        if t.requires_grad:
            t = t.detach()
        if t.is_neg():  # a lazily negated view: its memory holds the values un-negated
            t = t.resolve_neg()
        if not t.is_contiguous():
            t = t.contiguous()
    except (RuntimeError, NotImplementedError) as e:  # a meta tensor, ...
        raise TransportError(f"cannot encode {plan.name}.{name}: {e}") from None
    return code, t


def _plain_code(t: torch.Tensor) -> str | None:
    """The wire dtype of a tensor whose memory goes on the wire as it is (numpy views it, no
    copy): a non-empty, contiguous, strided CPU tensor of a wire dtype, without grad or a lazy
    negation; None for any other, which ``_normalize`` makes so first."""
    code = _DTYPE_NAMES.get(t.dtype)
    if (code is None or t.layout is not torch.strided or not t.is_cpu or t.requires_grad or t.is_neg()
            or not t.is_contiguous() or t.numel() == 0):
        return None
    return code


def _tensor_at(buf: memoryview, spec: _Spec) -> torch.Tensor:
    """The tensor ``spec`` describes, viewing ``buf`` (copied only if misaligned)."""
    if spec.nbytes == 0:
        return torch.empty(spec.shape, dtype=spec.dtype)
    np_dtype, torch_view = _NP_DTYPES[spec.code]
    itemsize = np_dtype.itemsize
    t = torch.from_numpy(np.frombuffer(buf, np_dtype, spec.nbytes // itemsize, spec.offset).reshape(spec.shape))
    if t.data_ptr() % itemsize:  # libzmq may hand us frames at any address
        t = t.clone()
    if torch_view is not None:
        t = t.view(torch_view)
    return t


def _bytes_of(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy."""
    if t.numel() == 0:
        return memoryview(b"")
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: the same bytes as int16
        t = t.view(torch.int16)
    return memoryview(t.numpy()).cast("B")


if _wire is not None:
    _wire.configure(
        version=PROTOCOL_VERSION, small_tensor_bytes=SMALL_TENSOR_BYTES, align=_ALIGN, max_dims=MAX_DIMS,
        dtypes={code: (dtype, _ITEMSIZE[code]) for code, dtype in _DTYPES.items()},
        declined=_Bad, check_errors=_CHECK_ERRORS,
    )
_plans()  # after everything the compiled fast paths refer to
