# The .pxd interface of the C++ debt ledger and planner (core_sched/csrc/ledger.hpp,
# core_sched/csrc/planner.hpp). _ledger.pyx cimports it (`from ledger cimport ...`, with
# core_sched/csrc on the include path); any other Cython module may do the same.

from libc.stdint cimport int32_t, int64_t
from libcpp cimport bool
from libcpp.map cimport map
from libcpp.set cimport set
from libcpp.utility cimport pair
from libcpp.vector cimport vector

from block_pool cimport CPoolCounters


cdef extern from "ledger.hpp":
    cdef enum LedgerStatus "infinillm::LedgerStatus":
        LEDGER_OK "infinillm::LEDGER_OK"
        LEDGER_UNKNOWN_INSTANCE "infinillm::LEDGER_UNKNOWN_INSTANCE"
        LEDGER_DUPLICATE_INSTANCE "infinillm::LEDGER_DUPLICATE_INSTANCE"
        LEDGER_STALE "infinillm::LEDGER_STALE"
        LEDGER_VERSION_BACK "infinillm::LEDGER_VERSION_BACK"
        LEDGER_INCONSISTENT "infinillm::LEDGER_INCONSISTENT"
        LEDGER_OTHER_HOME "infinillm::LEDGER_OTHER_HOME"
        LEDGER_NEGATIVE "infinillm::LEDGER_NEGATIVE"
        LEDGER_TOO_MANY "infinillm::LEDGER_TOO_MANY"

    cdef struct CLedgerDelta "infinillm::LedgerDelta":
        int64_t base_version
        int64_t version
        int64_t capacity
        int64_t free
        int64_t used
        int64_t lent
        int64_t reserved
        int64_t borrowed

    cdef struct CLedgerPart "infinillm::LedgerPart":
        int32_t blocks
        int32_t home

    cdef cppclass CLedgerInstance "infinillm::LedgerInstance":
        int32_t id
        int32_t host
        int32_t max_lent
        CPoolCounters counters
        int32_t batch_size
        int32_t num_waiting
        int32_t waiting_blocks
        map[int64_t, CLedgerPart] parts
        set[int64_t] homed_away
        int64_t away_blocks
        int32_t lendable()
        int64_t load()

    cdef cppclass CLedgerRequest "infinillm::LedgerRequest":
        int32_t home
        int64_t total
        map[int32_t, int32_t] placement
        int32_t on(int32_t instance)

    cdef struct CLedgerTotals "infinillm::LedgerTotals":
        int64_t num_instances
        int64_t num_requests
        int64_t capacity
        int64_t free
        int64_t used
        int64_t lent
        int64_t reserved
        int64_t borrowed
        int64_t lendable
        int64_t batch_size
        int64_t num_waiting

    cdef cppclass CppDebtLedger "infinillm::DebtLedger":
        CppDebtLedger() except +
        int32_t register_instance(int64_t id, int32_t capacity, int32_t max_lent, int32_t host) except +
        int32_t remove_instance(int64_t id, vector[int64_t]& affected) except +
        bool has_instance(int64_t id)
        const CLedgerInstance* instance(int64_t id)
        void instance_ids(vector[int64_t]& out) except +
        int64_t num_instances()
        int32_t apply_delta(int64_t id, const CLedgerDelta& d)
        int32_t apply_snapshot(int64_t id, const CLedgerDelta& s)
        int32_t set_max_lent(int64_t id, int32_t max_lent)
        int32_t set_load(int64_t id, int32_t batch_size, int32_t num_waiting, int32_t waiting_blocks)
        int32_t record_blocks(int64_t rid, int64_t home, int64_t instance, int64_t delta) except +
        int64_t forget_request(int64_t rid) except +
        const CLedgerRequest* request(int64_t rid)
        int64_t num_requests()
        @staticmethod
        void placement_of(const CLedgerRequest& r, vector[pair[int32_t, int32_t]]& out) except +
        @staticmethod
        void requests_on(const CLedgerInstance& x, vector[pair[int64_t, int32_t]]& out) except +
        void creditors(int64_t borrower, int32_t n, int64_t limit, vector[int32_t]& out) except +
        void debtors_of(const CLedgerInstance& creditor, vector[pair[int32_t, int64_t]]& out) except +
        void creditors_of(const CLedgerInstance& debtor, vector[pair[int32_t, int64_t]]& out) except +
        CLedgerTotals totals()


cdef extern from "planner.hpp":
    cdef enum MoveKind "infinillm::MoveKind":
        MOVE_SPREAD "infinillm::MOVE_SPREAD"
        MOVE_HOME "infinillm::MOVE_HOME"

    cdef struct CPlanMove "infinillm::PlanMove":
        int64_t request_id
        int32_t num_blocks
        int32_t src
        int32_t dst
        int32_t kind

    cdef cppclass CppThroughputModel "infinillm::ThroughputModel":
        CppThroughputModel() except +
        CppThroughputModel(vector[double] dense_batch, vector[double] dense_tokens_per_s,
                           vector[double] attn_ctx, vector[double] attn_tokens_per_s,
                           int32_t num_layers, int32_t block_size) except +
        int32_t num_layers()
        int32_t block_size()
        double dense_throughput(double batch)
        double attention_throughput(double ctx)
        double dense_time(double batch)
        double attention_time(double ctx)
        double layer_time(double batch, const double* ctx, size_t n)
        double step_time(double batch, const double* ctx, size_t n)
        double tokens_per_s_at(double batch, double attn)
        double tokens_per_s_with(double batch, double dense, double attn)

    cdef cppclass CppPlanner "infinillm::Planner":
        CppPlanner() except +
        CppPlanner(const CppThroughputModel& model, int64_t max_moves_per_step, int64_t home_headroom) except +
        void plan(const CppDebtLedger& ledger, vector[CPlanMove]& out) except +
        int64_t max_moves_per_step()
        int64_t home_headroom()
