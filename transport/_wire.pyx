# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The codec's hot path, compiled (``infinillm.transport._wire``).

``codec.py`` is the specification: its generic encoder and decoder say what goes on the wire
and what is refused, and with which message. This module does the same work for well-formed
input with as little as possible between the wire and the tensors, because each attention
query and result is encoded and decoded once per creditor per layer per step, right after a
wait, when nothing is in the CPU's caches:

- a sent tensor's bytes are copied into the small-tensor frame straight from ``data_ptr()``
  (no numpy array per tensor); a large tensor still goes out zero-copy through numpy;
- a received tensor is one ``numpy.ndarray`` over the frame and one ``torch.from_numpy``;
- the header is walked once, in C, with the checks of ``codec._fast_kind``'s kinds.

It never refuses anything itself: on any input it does not take (a malformed frame, a
tensor on another device, a field its kinds do not cover...) ``encode`` / ``decode`` return
None and the caller runs the Python path, which accepts it or raises the exact error. So the
two agree by construction on what is refused; ``tests/transport/test_codec.py`` checks that
they agree on what is accepted, field by field and byte by byte.
"""

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_FromStringAndSize
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.object cimport PyObject_GenericSetAttr
from libc.stdint cimport int64_t, uintptr_t
from libc.string cimport memcpy, memset

import msgpack
import numpy as np
import torch
import zmq

cdef extern from "Python.h":
    long long PyLong_AsLongLongAndOverflow(object o, int* overflow) except? -1

# Field kinds, as codec._fast_kind names them.
cdef enum:
    K_INT, K_OPT_INT, K_FLOAT, K_OPT_FLOAT, K_STR, K_OPT_STR, K_BOOL, K_OPT_BOOL, K_INTS, K_TENSOR, K_OPT_TENSOR, K_OTHER

_KINDS = {"int": K_INT, "int?": K_OPT_INT, "float": K_FLOAT, "float?": K_OPT_FLOAT, "str": K_STR, "str?": K_OPT_STR,
          "bool": K_BOOL, "bool?": K_OPT_BOOL, "ints": K_INTS, "tensor": K_TENSOR, "tensor?": K_OPT_TENSOR,
          "other": K_OTHER}

DEF MAX_FIELDS = 32
DEF MAX_TENSORS = 16

cdef int _VERSION = 0
cdef Py_ssize_t _SMALL = 0
cdef Py_ssize_t _ALIGN = 16
cdef int _MAX_DIMS = 8

cdef object _Tensor = torch.Tensor
cdef object _from_numpy = torch.from_numpy
cdef object _torch_empty = torch.empty
cdef object _ndarray = np.ndarray
cdef object _Frame = zmq.Frame
cdef object _unpackb = msgpack.unpackb
cdef object _int16 = torch.int16
cdef object _bfloat16 = torch.bfloat16

# dtype tables, filled by configure(): wire code <-> torch dtype, numpy dtype, item size.
cdef dict _CODE_OF = {}  # torch dtype -> _DType
cdef dict _BY_CODE = {}  # wire code str -> _DType
cdef dict _PLANS_BY_ID = {}  # type id -> FastPlan
cdef dict _PLANS_BY_CLASS = {}  # class -> FastPlan


cdef class _DType:
    cdef str code
    cdef object torch_dtype
    cdef object np_dtype  # bf16 rides as int16
    cdef bint is_bf16
    cdef Py_ssize_t itemsize


cdef class Spec:
    """A tensor as the header describes it: what ``Message._check`` reads before the tensor
    is built (``dtype``, ``shape``, ``ndim``)."""

    cdef readonly object dtype
    cdef readonly tuple shape
    cdef readonly int ndim
    cdef _DType dt
    cdef Py_ssize_t nbytes
    cdef Py_ssize_t offset

    def __repr__(self):
        return f"{self.dtype}{self.shape}"


def configure(*, int version, Py_ssize_t small_tensor_bytes, Py_ssize_t align, int max_dims, dict dtypes):
    """The codec's constants; ``dtypes`` maps wire code -> (torch dtype, numpy dtype, itemsize)."""
    global _VERSION, _SMALL, _ALIGN, _MAX_DIMS
    _VERSION = version
    _SMALL = small_tensor_bytes
    _ALIGN = align
    _MAX_DIMS = max_dims
    _CODE_OF.clear()
    _BY_CODE.clear()
    cdef _DType d
    for code, (torch_dtype, np_dtype, itemsize) in dtypes.items():
        d = _DType()
        d.code = code
        d.torch_dtype = torch_dtype
        d.np_dtype = np_dtype
        d.is_bf16 = torch_dtype == _bfloat16
        d.itemsize = itemsize
        _CODE_OF[torch_dtype] = d
        _BY_CODE[code] = d


def register(cls, int type_id, tuple names, list kinds, list encoders, list decoders):
    """Compile the plan of one message class (``kinds``: codec._fast_kind's names)."""
    plan = FastPlan(cls, type_id, names, kinds, encoders, decoders)
    _PLANS_BY_ID[type_id] = plan
    _PLANS_BY_CLASS[cls] = plan


def registered():
    return {cls: plan.type_id for cls, plan in _PLANS_BY_CLASS.items()}


cdef inline bint _is_int64(object v):
    cdef int overflow = 0
    if type(v) is not int:
        return False
    PyLong_AsLongLongAndOverflow(v, &overflow)
    return overflow == 0


cdef inline bint _scalar_ok(int kind, object v):
    """codec._check_lines for the scalar kinds."""
    if kind == K_INT:
        return _is_int64(v)
    if kind == K_OPT_INT:
        return v is None or _is_int64(v)
    if kind == K_FLOAT:
        return type(v) is float
    if kind == K_OPT_FLOAT:
        return v is None or type(v) is float
    if kind == K_STR:
        return type(v) is str
    if kind == K_OPT_STR:
        return v is None or type(v) is str
    if kind == K_BOOL:
        return type(v) is bool
    if kind == K_OPT_BOOL:
        return v is None or type(v) is bool
    if kind == K_INTS:
        if type(v) is not tuple:
            return False
        for x in <tuple>v:
            if not _is_int64(x):
                return False
        return True
    return False


cdef inline Py_ssize_t _aligned(Py_ssize_t off):
    return (off + _ALIGN - 1) & -_ALIGN


cdef class FastPlan:
    cdef readonly object cls
    cdef readonly int type_id
    cdef tuple names
    cdef int n
    cdef int kinds[MAX_FIELDS]
    cdef list encoders
    cdef list decoders

    def __init__(self, cls, int type_id, tuple names, list kinds, list encoders, list decoders):
        if len(names) > MAX_FIELDS:
            raise ValueError(f"{cls.__name__} has {len(names)} fields, more than {MAX_FIELDS}")
        self.cls = cls
        self.type_id = type_id
        self.names = names
        self.n = len(names)
        for i, k in enumerate(kinds):
            self.kinds[i] = _KINDS[k]
        self.encoders = encoders
        self.decoders = decoders

    # ---- encode -------------------------------------------------------------------------------

    cdef list encode(self, object msg, object seq, object packb, Py_ssize_t max_header, Py_ssize_t max_message):
        cdef list h = [_VERSION, self.type_id, seq]
        cdef list tensors = []  # the tensors, in field order (kept alive until copied)
        cdef Py_ssize_t nbytes[MAX_TENSORS]
        cdef int num_tensors = 0
        cdef bint has_small = False
        cdef int i, j, kind, ndim
        cdef Py_ssize_t total, small_end = 0, numel, d
        cdef object v, shape, dims
        cdef _DType dt
        for i in range(self.n):
            v = getattr(msg, self.names[i])
            kind = self.kinds[i]
            if kind == K_TENSOR or kind == K_OPT_TENSOR:
                if v is None:
                    if kind == K_TENSOR:
                        return None
                    h.append(None)
                    continue
                if type(v) is not _Tensor or num_tensors == MAX_TENSORS:
                    return None
                dt = _CODE_OF.get(v.dtype)
                if dt is None or not v.is_cpu or not v.is_contiguous() or v.is_neg():
                    return None
                shape = v.shape
                ndim = len(shape)
                if ndim > _MAX_DIMS:
                    return None
                dims = [dt.code]
                numel = 1
                for j in range(ndim):
                    d = shape[j]
                    numel *= d
                    dims.append(d)
                h.append(dims)
                tensors.append(v)
                nbytes[num_tensors] = numel * dt.itemsize
                num_tensors += 1
            elif kind == K_OTHER:
                h.append(self.encoders[i](v))
            else:
                if not _scalar_ok(kind, v):
                    return None
                h.append(v)
        head = packb(h)
        if len(head) > max_header:
            return None
        if num_tensors == 0:
            return [head]
        total = len(head)
        for j in range(num_tensors):
            total += nbytes[j]
            if nbytes[j] < _SMALL:
                small_end = _aligned(small_end) + nbytes[j]
                has_small = True
        if total > max_message:
            return None
        frames = [head]
        cdef Py_ssize_t off = 0
        cdef char* base
        cdef uintptr_t ptr
        if has_small:
            pack = PyByteArray_FromStringAndSize(NULL, small_end)
            base = PyByteArray_AS_STRING(pack)
            memset(base, 0, small_end)
            for j in range(num_tensors):
                if nbytes[j] < _SMALL:
                    off = _aligned(off)
                    if nbytes[j]:
                        ptr = tensors[j].data_ptr()
                        memcpy(base + off, <const void*>ptr, nbytes[j])
                    off += nbytes[j]
            frames.append(pack)
        for j in range(num_tensors):
            if nbytes[j] >= _SMALL:  # zero-copy: ZeroMQ holds the tensor's memory until sent
                v = tensors[j]
                if v.dtype == _bfloat16:
                    v = v.view(_int16)
                frames.append(memoryview(v.numpy()).cast("B"))
        return frames

    # ---- decode -------------------------------------------------------------------------------

    cdef object decode(self, tuple header, object frames, Py_ssize_t n_frames, Py_ssize_t max_message):
        cdef list values = [None] * self.n
        cdef list specs = []
        cdef int num_specs = 0, num_small = 0
        cdef int i, j, kind
        cdef Py_ssize_t numel, d, small_end = 0, expected, k
        cdef object v, code
        cdef Spec spec
        cdef _DType dt
        for i in range(self.n):
            v = header[3 + i]
            kind = self.kinds[i]
            if kind == K_TENSOR or kind == K_OPT_TENSOR:
                if v is None:
                    if kind == K_TENSOR:
                        return None
                    values[i] = None
                    continue
                if type(v) is not tuple or len(<tuple>v) == 0:
                    return None
                code = (<tuple>v)[0]
                if type(code) is not str:
                    return None
                dt = _BY_CODE.get(code)
                if dt is None or len(<tuple>v) - 1 > _MAX_DIMS:
                    return None
                shape = (<tuple>v)[1:]
                numel = 1
                for x in <tuple>shape:
                    if not _is_int64(x) or x < 0:
                        return None
                    d = x
                    if d and numel > max_message // d:
                        return None
                    numel *= d
                if numel > max_message // dt.itemsize:
                    return None
                spec = Spec.__new__(Spec)
                spec.dt = dt
                spec.dtype = dt.torch_dtype
                spec.shape = shape
                spec.ndim = len(<tuple>shape)
                spec.nbytes = numel * dt.itemsize
                if spec.nbytes < _SMALL:
                    spec.offset = _aligned(small_end)
                    small_end = spec.offset + spec.nbytes
                    num_small += 1
                specs.append(spec)
                num_specs += 1
                values[i] = spec
            elif kind == K_OTHER:
                values[i] = self.decoders[i](v)
            else:
                if not _scalar_ok(kind, v):
                    return None
                values[i] = v
        # The frames must be exactly what the specs imply.
        expected = 1 + (1 if num_small else 0) + num_specs - num_small
        if n_frames != expected:
            return None
        cdef list buffers = [None] * num_specs
        small_buf = None
        if num_small:
            small_buf = _writable(frames[1])
            if len(small_buf) != small_end:
                return None
        k = 2 if num_small else 1
        for j in range(num_specs):
            spec = <Spec>specs[j]
            if spec.nbytes < _SMALL:
                buffers[j] = small_buf
            else:
                buf = _writable(frames[k])
                if len(buf) != spec.nbytes:
                    return None
                buffers[j] = buf
                k += 1
        # Build the message around the specs, check it, then put the tensors in.
        cls = self.cls
        msg = cls.__new__(cls)
        names = self.names
        for i in range(self.n):
            PyObject_GenericSetAttr(msg, names[i], values[i])
        msg._check()
        j = 0
        for i in range(self.n):
            if values[i] is not None and type(values[i]) is Spec:
                spec = <Spec>values[i]
                PyObject_GenericSetAttr(msg, names[i], _tensor_at(buffers[j], spec))
                j += 1
        return msg


cdef object _writable(object frame):
    """A writable byte view of a received frame (a read-only one is copied: torch wants to
    own writable memory)."""
    if type(frame) is _Frame:
        buf = frame.buffer
    else:
        buf = memoryview(frame)
    if buf.readonly:
        buf = memoryview(bytearray(buf))
    if buf.ndim != 1 or buf.itemsize != 1:
        buf = buf.cast("B")
    return buf


cdef object _tensor_at(object buf, Spec spec):
    cdef Py_buffer view
    cdef uintptr_t address
    cdef _DType dt = spec.dt
    if spec.nbytes == 0:
        return _torch_empty(spec.shape, dtype=dt.torch_dtype)
    PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
    address = <uintptr_t>view.buf + spec.offset
    PyBuffer_Release(&view)
    t = _from_numpy(_ndarray(spec.shape, dt.np_dtype, buf, spec.offset))
    if address % dt.itemsize:  # libzmq may hand us a frame at any address
        t = t.clone()
    if dt.is_bf16:
        t = t.view(_bfloat16)
    return t


# ---- entry points ---------------------------------------------------------------------------------


def encode(msg, seq, packb, Py_ssize_t max_header, Py_ssize_t max_message):
    """``msg``'s frames, or None when the Python path must decide."""
    cdef FastPlan plan = _PLANS_BY_CLASS.get(type(msg))
    if plan is None or not _is_int64(seq) or seq < 0:
        return None
    try:
        return plan.encode(msg, seq, packb, max_header, max_message)
    except Exception:
        return None


def decode(frames, Py_ssize_t max_message, Py_ssize_t max_header):
    """``(seq, message)``, or None when the Python path must decide (it may refuse)."""
    cdef Py_ssize_t n_frames = len(frames)
    cdef Py_ssize_t total = 0
    cdef FastPlan plan
    if n_frames == 0:
        return None
    for f in frames:
        total += len(f)
    if total > max_message:
        return None
    head = frames[0]
    if len(head) > max_header:
        return None
    try:
        header = _unpackb(head.buffer if type(head) is _Frame else head, use_list=False, raw=False,
                          strict_map_key=True)
    except Exception:
        return None
    if type(header) is not tuple or len(<tuple>header) < 3:
        return None
    version, type_id, seq = (<tuple>header)[0], (<tuple>header)[1], (<tuple>header)[2]
    if type(version) is not int or version != _VERSION or not _is_int64(seq) or seq < 0 or type(type_id) is not int:
        return None
    plan = _PLANS_BY_ID.get(type_id)
    if plan is None or len(<tuple>header) - 3 != plan.n:
        return None
    try:
        msg = plan.decode(<tuple>header, frames, n_frames, max_message)
    except Exception:
        return None
    if msg is None:
        return None
    return seq, msg
