# The .pxd interface of the C++ block tables (core_sched/csrc/block_table.hpp).
# _block_table.pyx cimports it (`from block_table cimport ...`, with core_sched/csrc on the
# include path); any other Cython module may do the same to drive the core without Python
# overhead.

from libc.stdint cimport int32_t, int64_t
from libcpp cimport bool
from libcpp.vector cimport vector


cdef extern from "block_table.hpp":
    cdef enum TableStatus "infinillm::TableStatus":
        TABLE_OK "infinillm::TABLE_OK"
        TABLE_NO_REQUEST "infinillm::TABLE_NO_REQUEST"
        TABLE_DUPLICATE "infinillm::TABLE_DUPLICATE"
        TABLE_NO_ROOM "infinillm::TABLE_NO_ROOM"
        TABLE_BAD_COUNT "infinillm::TABLE_BAD_COUNT"
        TABLE_TOO_FEW_BLOCKS "infinillm::TABLE_TOO_FEW_BLOCKS"

    cdef struct CRun "infinillm::Run":
        int32_t instance
        int32_t start

    cdef cppclass CRequestTable "infinillm::RequestTable":
        CRequestTable() except +
        int64_t num_tokens
        vector[int32_t] blocks
        vector[CRun] runs
        int32_t num_blocks()
        int32_t run_end(size_t k)
        int32_t num_filled(int32_t block_size)
        int32_t count_on(int32_t instance, int32_t limit)

    cdef cppclass CppBlockTables "infinillm::BlockTables":
        CppBlockTables(int32_t block_size) except +
        int32_t block_size()
        int64_t num_requests()
        bool has_request(int64_t request_id)
        CRequestTable* find(int64_t request_id)
        int32_t add_request(int64_t request_id) except +
        int32_t remove_request(int64_t request_id, CRequestTable& out) except +
        int32_t append_blocks(int64_t request_id, int32_t instance, const int32_t* ids, int32_t n) except +
        int32_t append_tokens(int64_t request_id, int64_t n)
        int32_t locate(int64_t request_id, int64_t position, int32_t& instance, int32_t& block,
                       int32_t& offset)
        int32_t truncate(int64_t request_id, int64_t num_tokens, CRequestTable& dropped) except +
        int32_t blocks_on(int64_t request_id, int32_t instance, vector[int32_t]& out) except +
        int32_t move_blocks(int64_t request_id, int32_t src, int32_t dst, const int32_t* new_ids,
                            int32_t n, vector[int32_t]& old_ids, int32_t keep_last) except +
        int32_t batch_width(const int64_t* request_ids, int32_t batch, int32_t instance)
        void fill_batch_tables(const int64_t* request_ids, int32_t batch, int32_t instance,
                               int32_t width, int32_t* block_table, int32_t* block_start,
                               int32_t* block_len)
        void fill_slot_mapping(const int64_t* request_ids, const int64_t* counts, int32_t batch,
                               int32_t* instance_out, int64_t* slot_out)
