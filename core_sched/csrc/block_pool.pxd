# The .pxd interface of the C++ block pool (core_sched/csrc/block_pool.hpp).
# _pool.pyx cimports it (`from block_pool cimport ...`, with core_sched/csrc on the include
# path); any other Cython module may do the same to drive the core without Python overhead.

from libc.stdint cimport int32_t, int64_t, uint8_t
from libcpp cimport bool
from libcpp.vector cimport vector


cdef extern from "block_pool.hpp":
    cdef enum PoolStatus "infinillm::PoolStatus":
        POOL_OK "infinillm::POOL_OK"
        POOL_NO_SPACE "infinillm::POOL_NO_SPACE"
        POOL_OVER_LEND_CAP "infinillm::POOL_OVER_LEND_CAP"
        POOL_BAD_BLOCK "infinillm::POOL_BAD_BLOCK"
        POOL_BAD_REQUEST "infinillm::POOL_BAD_REQUEST"
        POOL_BAD_RESERVATION "infinillm::POOL_BAD_RESERVATION"
        POOL_EXPIRED "infinillm::POOL_EXPIRED"
        POOL_BAD_COUNT "infinillm::POOL_BAD_COUNT"

    cdef struct CPoolCounters "infinillm::PoolCounters":
        int64_t version
        int32_t capacity
        int32_t free
        int32_t used
        int32_t lent
        int32_t reserved
        int32_t borrowed

    cdef cppclass CReservation "infinillm::Reservation":
        int32_t borrower
        double expires_at
        vector[int32_t] blocks

    cdef cppclass CppBlockPool "infinillm::BlockPool":
        CppBlockPool(int32_t instance_id, int32_t num_blocks, int32_t max_lent) except +
        int32_t instance_id()
        int32_t num_blocks()
        int32_t max_lent()
        void set_max_lent(int32_t n)
        int32_t num_free()
        int32_t num_evictable()
        int32_t num_cached()
        int64_t num_evicted()
        int32_t num_used()
        int32_t num_lent()
        int32_t num_reserved()
        int32_t num_borrowed()
        int32_t num_requests()
        int32_t num_reservations()
        int64_t version()
        bool can_allocate(int32_t n)
        int32_t lendable()
        int32_t allocate(int64_t request_id, int32_t n, vector[int32_t]& out) except +
        int32_t allocate_into(int64_t request_id, int32_t n, int32_t* out) except +
        int32_t free_blocks(int64_t request_id, const int32_t* blocks, int32_t n) except +
        int32_t free_request(int64_t request_id) except +
        const vector[int32_t]* blocks_of(int64_t request_id)
        uint8_t state(int32_t b)
        int64_t owner_request(int32_t b)
        int32_t owner_home(int32_t b)
        int32_t register_block(int32_t b, int64_t hash) except +
        int32_t lookup(int32_t home, const int64_t* hashes, int32_t n)
        int32_t lookup_evictable(int32_t home, const int64_t* hashes, int32_t n)
        int32_t acquire(int64_t request_id, int32_t home, const int64_t* hashes, int32_t n, vector[int32_t]& out) except +
        int32_t reset_cache() except +
        int32_t refs(int32_t b)
        bool hashed(int32_t b)
        int64_t block_hash(int32_t b)
        int64_t try_reserve(int32_t borrower, int32_t n, double now, double ttl) except +
        int32_t commit(int64_t reservation_id, int64_t request_id, double now, vector[int32_t]& out) except +
        int32_t cancel(int64_t reservation_id) except +
        int32_t expire(double now) except +
        const CReservation* reservation(int64_t reservation_id)
        int32_t add_borrowed(int64_t request_id, int32_t home, int32_t n) except +
        int32_t remove_borrowed(int64_t request_id, int32_t n) except +
        int32_t borrowed_by(int64_t request_id)
        CPoolCounters counters()
        CPoolCounters take_delta(int64_t& base_version)

