# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The transport's hot path, compiled (``infinillm.transport._wire``).

Each attention query and result is encoded, sent, received and decoded once per creditor per
layer per step, right after a wait, when nothing is in the CPU's caches and every Python-level
call costs several times its hot-loop price. This module does that work with as little as
possible between libzmq and the tensors:

- the codec's fast path (``encode`` / ``decode``): the header walked once, in C, with the checks
  of ``codec._fast_kind``'s kinds and a msgpack subset of our own (byte-identical to msgpack for
  what headers hold); a sent tensor's bytes copied into the small-tensor frame from its DLPack
  description (one torch call tells pointer, dtype, shape and strides; a large tensor still
  goes out zero-copy through numpy); a received tensor made by one ``torch._C._from_dlpack``
  over the frame's memory, which it keeps alive;
- the socket layer's libzmq calls (``zmq_events``, ``recv_multipart``, ``send_multipart``), on
  the libzmq pyzmq loaded, and ``Frame``, a received frame that owns its libzmq message.

``codec.py`` stays the specification: this module never refuses anything itself. On any input
it does not take (a malformed frame, a tensor on another device, a neg-bit view, a field its
kinds do not cover...) ``encode`` / ``decode`` return None and the caller runs the Python path,
which accepts it or raises the exact error. Declining is explicit: a check that returns None,
``_Decline`` from the header's msgpack, or what the codec names as a refusal (a field check's
``_Bad``, what ``Message._check`` raises); any other exception is a bug and propagates. So the
two agree by construction on what is refused;
``tests/transport/test_codec.py`` checks that they agree on what is accepted, field by field and
byte by byte.
"""

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_FromStringAndSize
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_FillInfo, PyBuffer_Release, PyObject_CheckBuffer, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.object cimport PyObject_GenericSetAttr
from cpython.pycapsule cimport PyCapsule_GetPointer, PyCapsule_IsValid, PyCapsule_New
from cpython.ref cimport Py_DECREF, Py_INCREF, PyObject
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport int8_t, int16_t, int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy, memset

import torch
import torch.utils.dlpack
import zmq

# DLPack (dlpack.h, the unversioned ABI that torch.utils.dlpack.to_dlpack produces and
# torch._C._from_dlpack takes): how tensors cross without numpy.
cdef struct DLDevice:
    int32_t device_type
    int32_t device_id

cdef struct DLDataType:
    uint8_t code
    uint8_t bits
    uint16_t lanes

cdef struct DLTensor:
    void* data
    DLDevice device
    int32_t ndim
    DLDataType dtype
    int64_t* shape
    int64_t* strides
    uint64_t byte_offset

cdef struct DLManagedTensor:
    DLTensor dl_tensor
    void* manager_ctx
    void (*deleter)(DLManagedTensor*) noexcept

cdef struct _Owned:  # a received tensor: its DLPack description and room for its geometry
    DLManagedTensor managed
    int64_t shape[8]
    int64_t strides[8]

cdef enum:
    kDLCPU = 1
    kDLInt = 0
    kDLUInt = 1
    kDLFloat = 2
    kDLBfloat = 4

cdef extern from "Python.h":
    long long PyLong_AsLongLongAndOverflow(object o, int* overflow) except? -1
    unsigned long long PyLong_AsUnsignedLongLong(object o) except? -1
    const char* PyUnicode_AsUTF8AndSize(object o, Py_ssize_t* size) except NULL

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
cdef object _to_dlpack = torch.utils.dlpack.to_dlpack  # torch._C._to_dlpack itself
# What torch.utils.dlpack.from_dlpack calls for a capsule; the public function where it is gone.
cdef object _from_dlpack = getattr(torch._C, "_from_dlpack", None) or torch.utils.dlpack.from_dlpack
cdef object _torch_empty = torch.empty
cdef object _Frame = zmq.Frame
cdef object _int16 = torch.int16
cdef object _bfloat16 = torch.bfloat16

# dtype tables, filled by configure(): wire code and DLPack type <-> torch dtype, item size.
cdef dict _BY_CODE = {}  # wire code str -> _DType
cdef dict _BY_DL = {}  # DLPack (code << 8 | bits) -> _DType
cdef dict _PLANS_BY_ID = {}  # type id -> FastPlan
cdef dict _PLANS_BY_CLASS = {}  # class -> FastPlan
# Set by configure(): the codec's field checks' refusal (codec._Bad), and what Message._check
# raises for a value it refuses (codec._CHECK_ERRORS). Both mean "the Python path decides".
cdef object _FIELD_REFUSED = None
cdef object _CHECK_REFUSED = None


cdef class _DType:
    cdef str code
    cdef object torch_dtype
    cdef Py_ssize_t itemsize
    cdef DLDataType dl


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


_DL_CODES = {torch.float16: kDLFloat, torch.float32: kDLFloat, torch.float64: kDLFloat, torch.bfloat16: kDLBfloat,
             torch.int8: kDLInt, torch.int16: kDLInt, torch.int32: kDLInt, torch.int64: kDLInt, torch.uint8: kDLUInt}


def configure(*, int version, Py_ssize_t small_tensor_bytes, Py_ssize_t align, int max_dims, dict dtypes,
              declined, tuple check_errors):
    """The codec's constants; ``dtypes`` maps wire code -> (torch dtype, itemsize);
    ``declined``: what the codec's field checks raise to refuse a value; ``check_errors``:
    what ``Message._check`` raises to refuse one."""
    global _VERSION, _SMALL, _ALIGN, _MAX_DIMS, _FIELD_REFUSED, _CHECK_REFUSED
    if max_dims > 8:
        raise ValueError(f"max_dims={max_dims}: the compiled codec holds at most 8 dims")
    _VERSION = version
    _SMALL = small_tensor_bytes
    _ALIGN = align
    _MAX_DIMS = max_dims
    _FIELD_REFUSED = declined
    _CHECK_REFUSED = check_errors
    _BY_CODE.clear()
    _BY_DL.clear()
    cdef _DType d
    for code, (torch_dtype, itemsize) in dtypes.items():
        d = _DType()
        d.code = code
        d.torch_dtype = torch_dtype
        d.itemsize = itemsize
        d.dl.code = _DL_CODES[torch_dtype]
        d.dl.bits = 8 * itemsize
        d.dl.lanes = 1
        _BY_CODE[code] = d
        _BY_DL[d.dl.code << 8 | d.dl.bits] = d


def register(cls, int type_id, tuple names, list kinds, list encoders, list decoders):
    """Compile the plan of one message class (``kinds``: codec._fast_kind's names)."""
    plan = FastPlan(cls, type_id, names, kinds, encoders, decoders)
    _PLANS_BY_ID[type_id] = plan
    _PLANS_BY_CLASS[cls] = plan


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

    cdef list encode(self, object msg, object seq, Py_ssize_t max_header, Py_ssize_t max_message):
        cdef list h = [_VERSION, self.type_id, seq]
        cdef list tensors = []  # the tensors, in field order
        cdef list caps = []  # their DLPack capsules
        cdef uintptr_t ptrs[MAX_TENSORS]
        cdef Py_ssize_t nbytes[MAX_TENSORS]
        cdef DLTensor* dl
        cdef int num_tensors = 0
        cdef bint has_small = False
        cdef int i, j, kind, ndim
        cdef Py_ssize_t total, small_end = 0, numel
        cdef object v, dims, cap
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
                # One call tells where the bytes are, their type and geometry: DLPack.
                if type(v) is not _Tensor or num_tensors == MAX_TENSORS or v.is_neg():
                    return None
                try:
                    cap = _to_dlpack(v)
                except (RuntimeError, BufferError):  # torch cannot export it (sparse, meta): not ours
                    return None
                dl = &(<DLManagedTensor*>PyCapsule_GetPointer(cap, "dltensor")).dl_tensor
                if dl.device.device_type != kDLCPU or dl.dtype.lanes != 1 or dl.ndim > _MAX_DIMS:
                    return None
                dt = _BY_DL.get(dl.dtype.code << 8 | dl.dtype.bits)
                if dt is None:
                    return None
                ndim = dl.ndim
                dims = [dt.code]
                numel = 1
                for j in range(ndim):
                    dims.append(dl.shape[j])
                for j in range(ndim - 1, -1, -1):  # C-contiguous (size-1 dims may stride anyhow)
                    if dl.strides != NULL and dl.shape[j] != 1 and dl.strides[j] != numel:
                        return None
                    numel *= dl.shape[j]
                h.append(dims)
                tensors.append(v)
                caps.append(cap)  # holds the tensor, so the pointer stays good until copied
                ptrs[num_tensors] = <uintptr_t>dl.data + dl.byte_offset
                nbytes[num_tensors] = numel * dt.itemsize
                num_tensors += 1
            elif kind == K_OTHER:
                try:
                    h.append(self.encoders[i](v))
                except _FIELD_REFUSED:
                    return None
            else:
                if not _scalar_ok(kind, v):
                    return None
                h.append(v)
        try:
            head = _pack_header(h)
        except _Decline:
            return None
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
        if has_small:
            pack = PyByteArray_FromStringAndSize(NULL, small_end)
            base = PyByteArray_AS_STRING(pack)
            memset(base, 0, small_end)
            for j in range(num_tensors):
                if nbytes[j] < _SMALL:
                    off = _aligned(off)
                    if nbytes[j]:
                        memcpy(base + off, <const void*>ptrs[j], nbytes[j])
                    off += nbytes[j]
            frames.append(pack)
        for j in range(num_tensors):
            if nbytes[j] >= _SMALL:  # zero-copy: ZeroMQ holds the tensor's memory until sent
                v = tensors[j]
                if v.requires_grad:  # numpy will not view it otherwise (the memory is the same)
                    v = v.detach()
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
                try:
                    values[i] = self.decoders[i](v)
                except _FIELD_REFUSED:
                    return None
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
        try:
            msg._check()
        except _CHECK_REFUSED:
            return None
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


cdef void _release_owned(DLManagedTensor* m) noexcept with gil:
    # torch calls this when the tensor's memory is freed, from whichever thread: drop our
    # hold on the frame's buffer.
    Py_DECREF(<object>m.manager_ctx)
    free(m)


cdef void _release_capsule(object capsule) noexcept:
    # A capsule torch never took (an error between making and taking it) still owns the tensor.
    if PyCapsule_IsValid(capsule, "dltensor"):
        m = <DLManagedTensor*>PyCapsule_GetPointer(capsule, "dltensor")
        m.deleter(m)


cdef object _tensor_at(object buf, Spec spec):
    """The tensor ``spec`` describes, viewing ``buf`` (a writable byte view that owns the
    frame's memory): a DLPack capsule over it, taken by torch (no numpy, no copy)."""
    cdef Py_buffer view
    cdef _Owned* owned
    cdef _DType dt = spec.dt
    cdef int j, ndim = spec.ndim
    cdef int64_t stride = 1
    cdef uintptr_t address
    if spec.nbytes == 0:
        return _torch_empty(spec.shape, dtype=dt.torch_dtype)
    PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
    address = <uintptr_t>view.buf + spec.offset
    PyBuffer_Release(&view)  # buf (a memoryview) keeps the memory: the capsule holds buf
    owned = <_Owned*>malloc(sizeof(_Owned))
    if owned == NULL:
        raise MemoryError()
    for j in range(ndim - 1, -1, -1):
        owned.shape[j] = spec.shape[j]
        owned.strides[j] = stride
        stride *= owned.shape[j]
    owned.managed.dl_tensor.data = <void*>address
    owned.managed.dl_tensor.device.device_type = kDLCPU
    owned.managed.dl_tensor.device.device_id = 0
    owned.managed.dl_tensor.ndim = ndim
    owned.managed.dl_tensor.dtype = dt.dl
    owned.managed.dl_tensor.shape = owned.shape
    owned.managed.dl_tensor.strides = owned.strides
    owned.managed.dl_tensor.byte_offset = 0
    owned.managed.manager_ctx = <void*>buf
    owned.managed.deleter = _release_owned
    Py_INCREF(buf)
    try:
        capsule = PyCapsule_New(<void*>owned, "dltensor", _release_capsule)
    except BaseException:
        _release_owned(&owned.managed)
        raise
    t = _from_dlpack(capsule)
    if address % dt.itemsize:  # libzmq may hand us a frame at any address
        t = t.clone()
    return t


# ---- the header's msgpack, in C ---------------------------------------------------------------------
# The subset headers use: nil, bools, ints (int64 and uint64), float64, str, arrays, and maps
# with str keys. Packing writes exactly the bytes msgpack-python's Packer(use_bin_type=True)
# writes (the smallest encoding of each value); unpacking returns what
# msgpack.unpackb(use_list=False, raw=False, strict_map_key=True) returns. Anything else (bin,
# ext, float32 on the way out, int subclasses, too deep) raises _Decline, and the caller
# hands the message to the Python path, which uses msgpack itself.

DEF MAX_DEPTH = 32
cdef object _UINT64_MAX = (1 << 64) - 1


class _Decline(Exception):
    pass


cdef class _Writer:
    cdef char* buf
    cdef Py_ssize_t size
    cdef Py_ssize_t cap

    def __cinit__(self):
        self.cap = 512
        self.size = 0
        self.buf = <char*>malloc(self.cap)
        if self.buf == NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self.buf)

    cdef inline char* room(self, Py_ssize_t n) except NULL:
        cdef char* grown
        if self.size + n > self.cap:
            while self.size + n > self.cap:
                self.cap *= 2
            grown = <char*>realloc(self.buf, self.cap)
            if grown == NULL:
                raise MemoryError()
            self.buf = grown
        cdef char* at = self.buf + self.size
        self.size += n
        return at


cdef inline void _be(char* at, uint64_t v, int n):
    cdef int i
    for i in range(n):
        at[i] = <char>((v >> (8 * (n - 1 - i))) & 0xFF)


cdef inline int _head(_Writer w, uint8_t code, uint64_t v, int n) except -1:
    cdef char* at = w.room(1 + n)
    at[0] = <char>code
    _be(at + 1, v, n)
    return 0


cdef int _pack_len(_Writer w, Py_ssize_t n, uint8_t fix, Py_ssize_t fix_max, uint8_t c8, uint8_t c16, uint8_t c32) except -1:
    if n <= fix_max:
        return _head(w, fix | <uint8_t>n, 0, 0)
    if c8 and n < 256:
        return _head(w, c8, n, 1)
    if n < 65536:
        return _head(w, c16, n, 2)
    if n <= 0xFFFFFFFF:
        return _head(w, c32, n, 4)
    raise _Decline()


cdef int _pack(_Writer w, object v, int depth) except -1:
    cdef long long i
    cdef int overflow = 0
    cdef double d
    cdef Py_ssize_t n
    cdef const char* text
    cdef char* at
    if depth > MAX_DEPTH:
        raise _Decline()
    t = type(v)
    if v is None:
        return _head(w, 0xC0, 0, 0)
    if t is bool:
        return _head(w, 0xC3 if v else 0xC2, 0, 0)
    if t is int:
        i = PyLong_AsLongLongAndOverflow(v, &overflow)
        if overflow > 0:  # beyond int64: uint64 if it fits
            if v > _UINT64_MAX:
                raise _Decline()
            return _head(w, 0xCF, PyLong_AsUnsignedLongLong(v), 8)
        if overflow < 0:
            raise _Decline()
        if i < -(1 << 5):
            if i < -(1 << 15):
                if i < -(1LL << 31):
                    return _head(w, 0xD3, <uint64_t>i, 8)
                return _head(w, 0xD2, <uint64_t>i, 4)
            if i < -(1 << 7):
                return _head(w, 0xD1, <uint64_t>i, 2)
            return _head(w, 0xD0, <uint64_t>i, 1)
        if i < (1 << 7):
            return _head(w, <uint8_t>(i & 0xFF), 0, 0)
        if i < (1 << 16):
            if i < (1 << 8):
                return _head(w, 0xCC, i, 1)
            return _head(w, 0xCD, i, 2)
        if i < (1LL << 32):
            return _head(w, 0xCE, i, 4)
        return _head(w, 0xCF, i, 8)
    cdef uint64_t bits
    if t is float:
        d = v
        memcpy(&bits, &d, 8)
        return _head(w, 0xCB, bits, 8)
    if t is str:
        try:
            text = PyUnicode_AsUTF8AndSize(v, &n)
        except UnicodeEncodeError:  # a lone surrogate: not UTF-8
            raise _Decline() from None
        _pack_len(w, n, 0xA0, 31, 0xD9, 0xDA, 0xDB)
        at = w.room(n)
        memcpy(at, text, n)
        return 0
    if t is list or t is tuple:
        n = len(v)
        _pack_len(w, n, 0x90, 15, 0, 0xDC, 0xDD)
        for x in v:
            _pack(w, x, depth + 1)
        return 0
    if t is dict:
        n = len(v)
        _pack_len(w, n, 0x80, 15, 0, 0xDE, 0xDF)
        for key, x in (<dict>v).items():
            _pack(w, key, depth + 1)
            _pack(w, x, depth + 1)
        return 0
    raise _Decline()


cdef bytes _pack_header(list h):
    cdef _Writer w = _Writer()
    _pack(w, h, 0)
    return PyBytes_FromStringAndSize(w.buf, w.size)


cdef struct _Reader:
    const uint8_t* p
    Py_ssize_t n
    Py_ssize_t pos


cdef inline uint64_t _take(_Reader* r, int n) except? 0xFFFFFFFFFFFFFFFF:
    cdef uint64_t v = 0
    cdef int i
    if r.pos + n > r.n:
        raise _Decline()
    for i in range(n):
        v = (v << 8) | r.p[r.pos + i]
    r.pos += n
    return v


cdef object _unpack_str(_Reader* r, Py_ssize_t n):
    if r.pos + n > r.n:
        raise _Decline()
    try:
        s = PyUnicode_DecodeUTF8(<const char*>(r.p + r.pos), n, NULL)
    except UnicodeDecodeError:
        raise _Decline() from None
    r.pos += n
    return s


cdef object _unpack_array(_Reader* r, Py_ssize_t n, int depth):
    if n > r.n - r.pos:  # every element takes a byte at least
        raise _Decline()
    items = [None] * n
    cdef Py_ssize_t i
    for i in range(n):
        items[i] = _unpack(r, depth + 1)
    return tuple(items)


cdef object _unpack_map(_Reader* r, Py_ssize_t n, int depth):
    if 2 * n > r.n - r.pos:
        raise _Decline()
    out = {}
    cdef Py_ssize_t i
    for i in range(n):
        key = _unpack(r, depth + 1)
        if type(key) is not str:
            raise _Decline()
        out[key] = _unpack(r, depth + 1)
    return out


cdef object _unpack(_Reader* r, int depth):
    cdef uint8_t c
    cdef uint64_t u
    cdef double d
    cdef float f
    cdef uint32_t u32
    if depth > MAX_DEPTH or r.pos >= r.n:
        raise _Decline()
    c = r.p[r.pos]
    r.pos += 1
    if c < 0x80:
        return c
    if c >= 0xE0:
        return <int>c - 256
    if c >= 0xA0 and c <= 0xBF:
        return _unpack_str(r, c & 0x1F)
    if c >= 0x90 and c <= 0x9F:
        return _unpack_array(r, c & 0x0F, depth)
    if c >= 0x80 and c <= 0x8F:
        return _unpack_map(r, c & 0x0F, depth)
    if c == 0xC0:
        return None
    if c == 0xC2:
        return False
    if c == 0xC3:
        return True
    if c == 0xCC:
        return _take(r, 1)
    if c == 0xCD:
        return _take(r, 2)
    if c == 0xCE:
        return _take(r, 4)
    if c == 0xCF:
        return _take(r, 8)
    if c == 0xD0:
        return <int8_t>_take(r, 1)
    if c == 0xD1:
        return <int16_t>_take(r, 2)
    if c == 0xD2:
        return <int32_t>_take(r, 4)
    if c == 0xD3:
        return <int64_t>_take(r, 8)
    if c == 0xCA:
        u32 = <uint32_t>_take(r, 4)
        memcpy(&f, &u32, 4)
        return <double>f
    if c == 0xCB:
        u = _take(r, 8)
        memcpy(&d, &u, 8)
        return d
    if c == 0xD9:
        return _unpack_str(r, _take(r, 1))
    if c == 0xDA:
        return _unpack_str(r, _take(r, 2))
    if c == 0xDB:
        return _unpack_str(r, _take(r, 4))
    if c == 0xDC:
        return _unpack_array(r, _take(r, 2), depth)
    if c == 0xDD:
        return _unpack_array(r, _take(r, 4), depth)
    if c == 0xDE:
        return _unpack_map(r, _take(r, 2), depth)
    if c == 0xDF:
        return _unpack_map(r, _take(r, 4), depth)
    raise _Decline()  # bin, ext, reserved


cdef object _unpack_header(object head):
    cdef Py_buffer view
    cdef _Reader r
    if not PyObject_CheckBuffer(head):  # msgpack refuses it: the Python path says so
        raise _Decline()
    PyObject_GetBuffer(head, &view, PyBUF_SIMPLE)
    try:
        r.p = <const uint8_t*>view.buf
        r.n = view.len
        r.pos = 0
        out = _unpack(&r, 0)
        if r.pos != r.n:  # extra data after the header
            raise _Decline()
        return out
    finally:
        PyBuffer_Release(&view)


def pack_header(h):
    """The header's bytes, as msgpack would write them (for the tests)."""
    return _pack_header(list(h))


def unpack_header(head):
    """The header, as msgpack.unpackb would read it (for the tests); _Decline otherwise."""
    return _unpack_header(head)


# ---- the socket layer's libzmq calls -------------------------------------------------------------
# The socket layer reads ZMQ_EVENTS before every receive and after every wake, then takes a
# whole message; it sends whole messages. Through pyzmq each of these costs microseconds of
# Python-level work per call (its Socket.get builds a SocketOption enum from the option number,
# each received frame is a zmq.Frame built through its Python constructor), and more right
# after a wait, when nothing is in the caches. These functions make the same libzmq calls
# directly, on the libzmq pyzmq itself loaded (``bind_libzmq`` takes the functions' addresses)
# and the socket's handle (``zmq.Socket.underlying``). The caller makes sure the socket is open.

cdef struct zmq_msg_t:
    uint64_t _[8]  # libzmq's 64 opaque bytes, pointer-aligned

ctypedef int (*getsockopt_t)(void* socket, int option, void* value, size_t* size) noexcept nogil
ctypedef int (*msg_init_t)(zmq_msg_t* msg) noexcept nogil
ctypedef int (*msg_recv_t)(zmq_msg_t* msg, void* socket, int flags) noexcept nogil
ctypedef int (*msg_close_t)(zmq_msg_t* msg) noexcept nogil
ctypedef void* (*msg_data_t)(zmq_msg_t* msg) noexcept nogil
ctypedef size_t (*msg_size_t)(const zmq_msg_t* msg) noexcept nogil
ctypedef int (*msg_more_t)(const zmq_msg_t* msg) noexcept nogil
ctypedef int (*send_t)(void* socket, const void* buf, size_t len, int flags) noexcept nogil

cdef getsockopt_t _getsockopt = NULL
cdef msg_init_t _msg_init = NULL
cdef msg_recv_t _msg_recv = NULL
cdef msg_close_t _msg_close = NULL
cdef msg_data_t _msg_data = NULL
cdef msg_size_t _msg_size = NULL
cdef msg_more_t _msg_more = NULL
cdef send_t _zmq_send = NULL
cdef int _ZMQ_EVENTS = 15
cdef int _DONTWAIT = 1
cdef int _SNDMORE = 2
cdef int _EAGAIN = 11
cdef Py_ssize_t _COPY_THRESHOLD = 65536
cdef object _ZMQError = zmq.ZMQError
cdef object _Again = zmq.Again

cdef extern from "errno.h":
    int errno

_LIBZMQ_FUNCTIONS = ("zmq_getsockopt", "zmq_msg_init", "zmq_msg_recv", "zmq_msg_close", "zmq_msg_data",
                     "zmq_msg_size", "zmq_msg_more", "zmq_send")


def bind_libzmq(dict addresses, *, int zmq_events, int dontwait, int sndmore, int eagain, Py_ssize_t copy_threshold):
    """Call libzmq at these addresses (``_LIBZMQ_FUNCTIONS`` -> address) from now on."""
    global _getsockopt, _msg_init, _msg_recv, _msg_close, _msg_data, _msg_size, _msg_more, _zmq_send
    global _ZMQ_EVENTS, _DONTWAIT, _SNDMORE, _EAGAIN, _COPY_THRESHOLD
    cdef uintptr_t a
    for name in _LIBZMQ_FUNCTIONS:
        if not addresses.get(name):
            raise ValueError(f"no address for {name}")
    a = addresses["zmq_getsockopt"]; _getsockopt = <getsockopt_t>a
    a = addresses["zmq_msg_init"]; _msg_init = <msg_init_t>a
    a = addresses["zmq_msg_recv"]; _msg_recv = <msg_recv_t>a
    a = addresses["zmq_msg_close"]; _msg_close = <msg_close_t>a
    a = addresses["zmq_msg_data"]; _msg_data = <msg_data_t>a
    a = addresses["zmq_msg_size"]; _msg_size = <msg_size_t>a
    a = addresses["zmq_msg_more"]; _msg_more = <msg_more_t>a
    a = addresses["zmq_send"]; _zmq_send = <send_t>a
    _ZMQ_EVENTS, _DONTWAIT, _SNDMORE, _EAGAIN, _COPY_THRESHOLD = zmq_events, dontwait, sndmore, eagain, copy_threshold


cdef inline object _error(int err):
    return _Again(err) if err == _EAGAIN else _ZMQError(err)


def zmq_events(uintptr_t handle):
    """ZMQ_EVENTS of the open libzmq socket at ``handle``; ``zmq.ZMQError`` as pyzmq raises."""
    cdef int value = 0
    cdef size_t size = sizeof(int)
    if _getsockopt(<void*>handle, _ZMQ_EVENTS, &value, &size) != 0:
        raise _error(errno)
    return value


cdef class Frame:
    """A received frame: it owns its libzmq message, and lends its bytes (writable) through
    the buffer protocol, ``buffer`` and ``bytes``, as ``zmq.Frame`` does. Views of it (the
    tensors the codec makes) keep it alive."""

    cdef zmq_msg_t msg
    cdef readonly bint more

    def __cinit__(self):
        if _msg_init == NULL:
            raise RuntimeError("bind_libzmq was not called")
        _msg_init(&self.msg)  # an empty message until a receive fills it

    def __dealloc__(self):
        _msg_close(&self.msg)

    def __getbuffer__(self, Py_buffer* view, int flags):
        PyBuffer_FillInfo(view, self, _msg_data(&self.msg), <Py_ssize_t>_msg_size(&self.msg), 0, flags)

    def __releasebuffer__(self, Py_buffer* view):
        pass

    def __len__(self):
        return <Py_ssize_t>_msg_size(&self.msg)

    @property
    def buffer(self):
        return memoryview(self)

    @property
    def bytes(self):
        return PyBytes_FromStringAndSize(<const char*>_msg_data(&self.msg), <Py_ssize_t>_msg_size(&self.msg))

    def __repr__(self):
        return f"<infinillm Frame of {len(self)} bytes>"


def recv_multipart(uintptr_t handle):
    """One whole message from the open socket at ``handle`` without waiting (``zmq.Again``
    if there is none). Multipart messages arrive whole: once the first frame is here, so
    are the others."""
    cdef Frame frame
    cdef list frames = []
    while True:
        frame = Frame.__new__(Frame)
        if _msg_recv(&frame.msg, <void*>handle, _DONTWAIT) < 0:
            raise _error(errno)
        frame.more = _msg_more(&frame.msg) != 0
        frames.append(frame)
        if not frame.more:
            return frames


def send_multipart(uintptr_t handle, frames):
    """Queue a whole message of small frames (each copied, as ZeroMQ copies frames under
    ``zmq.COPY_THRESHOLD``) on the open socket at ``handle`` without waiting. Returns False,
    having sent nothing, if a frame is that large (the caller sends it zero-copy through
    pyzmq); raises ``zmq.Again`` if the first frame cannot be queued (nothing is sent). A later
    frame fails only when the pipe went away under us: the rest is fed to ZeroMQ, which drops
    the whole message, and the error is raised."""
    cdef Py_buffer view
    cdef Py_ssize_t i, n = len(frames)
    cdef int rc, err = 0
    if n == 0:
        raise ValueError("a message needs at least one frame")
    for f in frames:
        if (f.nbytes if type(f) is memoryview else len(f)) >= _COPY_THRESHOLD:
            return False
    for i in range(n):
        PyObject_GetBuffer(frames[i], &view, PyBUF_SIMPLE)
        rc = _zmq_send(<void*>handle, view.buf, <size_t>view.len, _DONTWAIT | (_SNDMORE if i < n - 1 else 0))
        PyBuffer_Release(&view)
        if rc < 0 and not err:
            err = errno
            if i == 0:
                raise _error(err)
    if err:
        raise _error(err)
    return True


# ---- entry points ---------------------------------------------------------------------------------


def encode(msg, seq, Py_ssize_t max_header, Py_ssize_t max_message):
    """``msg``'s frames, or None when the Python path must decide."""
    cdef FastPlan plan = _PLANS_BY_CLASS.get(type(msg))
    if plan is None or not _is_int64(seq) or seq < 0:
        return None
    return plan.encode(msg, seq, max_header, max_message)


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
        header = _unpack_header(head)
    except _Decline:
        return None
    if type(header) is not tuple or len(<tuple>header) < 3:
        return None
    version, type_id, seq = (<tuple>header)[0], (<tuple>header)[1], (<tuple>header)[2]
    if type(version) is not int or version != _VERSION or not _is_int64(seq) or seq < 0 or type(type_id) is not int:
        return None
    plan = _PLANS_BY_ID.get(type_id)
    if plan is None or len(<tuple>header) - 3 != plan.n:
        return None
    msg = plan.decode(<tuple>header, frames, n_frames, max_message)
    if msg is None:
        return None
    return seq, msg
