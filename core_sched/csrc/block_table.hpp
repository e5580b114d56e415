// Block tables of the requests whose home is one instance.
//
// A request's KV cache is a list of *logical* blocks: logical block i holds the token positions
// [i*block_size, (i+1)*block_size). Each logical block is a physical block (an id in some
// instance's BlockPool). With DistAttention a request's blocks may live on several instances:
// consecutive logical blocks on the same instance form a *run*.
//
//   request 7, block_size 4, 14 tokens, 5 logical blocks (the last one allocated ahead, empty)
//
//   logical  |   0    |   1    |   2    |   3        |   4    |
//   tokens   | 0..3   | 4..7   | 8..11  | 12,13 + 2  |  --    |   <- partially filled tail
//   block id |   5    |   9    |   2    |   6        |   3    |
//   instance |   A    |   A    |   B    |   B        |   A    |
//            '-- run 0: A -----'-- run 1: B ---------'-- run 2: A
//
//   runs(7) == [(A, [5, 9]), (B, [2, 6]), (A, [3])]
//
// Storage per request is O(blocks): one vector of block ids in logical order and one vector of
// runs, each run being (instance, first logical block); a run ends where the next one starts.
// Invariants: runs[0].start == 0, starts strictly increase, adjacent runs differ in instance,
// and num_tokens <= num_blocks * block_size. Appending blocks extends the tail run when they are
// on the tail's instance, else starts a new run ("the tail spills onto the next run"): O(1)
// amortised per block. Migration (`move_blocks`) relabels blocks to another instance, splitting
// a run where only its end moves and merging neighbours that end up on the same instance.
//
// Per step, the attention kernel of an instance reads, for its batch, the blocks of each request
// that are on that instance (`fill_batch_tables`), and the KV append writes the new tokens' k/v
// into (instance, slot = block*block_size + offset) (`fill_slot_mapping`). Both fill caller-owned
// buffers (numpy arrays on the Python side) without allocating.
//
// The mutating calls return a TableStatus; the Cython layer turns it into an exception with
// the numbers in it. Argument ranges (instance ids and block ids in [0, INT32_MAX], counts >= 0)
// are checked by the caller before the call.
#pragma once

#include <algorithm>
#include <cstdint>
#include <unordered_map>
#include <utility>
#include <vector>

namespace infinillm {

enum TableStatus : int32_t {
  TABLE_OK = 0,
  TABLE_NO_REQUEST = -1,      // unknown request id
  TABLE_DUPLICATE = -2,       // add_request of a request that already has a table
  TABLE_NO_ROOM = -3,         // append_tokens beyond the slots of the blocks held
  TABLE_BAD_COUNT = -4,       // a count or position out of the request's range
  TABLE_TOO_FEW_BLOCKS = -5,  // move_blocks: the source holds fewer blocks than asked
};

// Logical blocks [start, next run's start) of one request, all on `instance`.
struct Run {
  int32_t instance;
  int32_t start;
};

struct RequestTable {
  int64_t num_tokens = 0;
  std::vector<int32_t> blocks;  // [num_blocks] block id of each logical block
  std::vector<Run> runs;        // [num_runs]

  int32_t num_blocks() const { return static_cast<int32_t>(blocks.size()); }

  // One past the last logical block of run k.
  int32_t run_end(size_t k) const {
    return k + 1 < runs.size() ? runs[k + 1].start : static_cast<int32_t>(blocks.size());
  }

  // The run holding logical block `logical` (0 <= logical < num_blocks()): binary search.
  size_t run_of(int32_t logical) const {
    auto after = std::upper_bound(runs.begin(), runs.end(), logical,
                                  [](int32_t x, const Run& r) { return x < r.start; });
    return static_cast<size_t>(after - runs.begin()) - 1;
  }

  // Logical blocks that hold at least one token: ceil(num_tokens / block_size).
  int32_t num_filled(int32_t block_size) const {
    return static_cast<int32_t>((num_tokens + block_size - 1) / block_size);
  }

  // Blocks on `instance` among the logical blocks [0, limit).
  int32_t count_on(int32_t instance, int32_t limit) const {
    int32_t n = 0;
    for (size_t k = 0; k < runs.size() && runs[k].start < limit; ++k)
      if (runs[k].instance == instance) n += std::min(run_end(k), limit) - runs[k].start;
    return n;
  }

  void append(int32_t instance, const int32_t* ids, int32_t n) {
    if (n == 0) return;
    if (runs.empty() || runs.back().instance != instance) runs.push_back(Run{instance, num_blocks()});
    blocks.insert(blocks.end(), ids, ids + n);
  }

  // Merge adjacent runs on the same instance, from run k0 on (runs before k0 are normal).
  void merge_runs_from(size_t k0) {
    if (runs.empty()) return;
    size_t kept = k0;
    for (size_t k = k0 + 1; k < runs.size(); ++k)
      if (runs[k].instance != runs[kept].instance) runs[++kept] = runs[k];
    runs.resize(kept + 1);
  }

  // Drop every logical block from `keep` on; the dropped blocks and their runs go to `out`
  // (runs renumbered from 0).
  void cut(int32_t keep, RequestTable& out) {
    out.num_tokens = 0;
    out.blocks.assign(blocks.begin() + keep, blocks.end());
    out.runs.clear();
    if (keep < num_blocks()) {
      for (size_t k = run_of(keep); k < runs.size(); ++k)
        out.runs.push_back(Run{runs[k].instance, std::max(runs[k].start, keep) - keep});
    }
    while (!runs.empty() && runs.back().start >= keep) runs.pop_back();
    blocks.resize(keep);
  }
};

class BlockTables {
 public:
  explicit BlockTables(int32_t block_size) : block_size_(block_size) {}

  int32_t block_size() const { return block_size_; }
  int64_t num_requests() const { return static_cast<int64_t>(tables_.size()); }
  bool has_request(int64_t request_id) const { return tables_.count(request_id) != 0; }

  RequestTable* find(int64_t request_id) {
    auto it = tables_.find(request_id);
    return it == tables_.end() ? nullptr : &it->second;
  }

  int32_t add_request(int64_t request_id) {
    return tables_.try_emplace(request_id).second ? TABLE_OK : TABLE_DUPLICATE;
  }

  // Forget a request; its whole table (every block, as runs) goes to `out`.
  int32_t remove_request(int64_t request_id, RequestTable& out) {
    auto it = tables_.find(request_id);
    if (it == tables_.end()) return TABLE_NO_REQUEST;
    out = std::move(it->second);
    tables_.erase(it);
    return TABLE_OK;
  }

  int32_t append_blocks(int64_t request_id, int32_t instance, const int32_t* ids, int32_t n) {
    RequestTable* t = find(request_id);
    if (t == nullptr) return TABLE_NO_REQUEST;
    t->append(instance, ids, n);
    return TABLE_OK;
  }

  // n >= 0. All or nothing: TABLE_NO_ROOM leaves the table as it was.
  int32_t append_tokens(int64_t request_id, int64_t n) {
    RequestTable* t = find(request_id);
    if (t == nullptr) return TABLE_NO_REQUEST;
    int64_t slots = static_cast<int64_t>(t->num_blocks()) * block_size_;
    if (n > slots - t->num_tokens) return TABLE_NO_ROOM;  // (no overflow: slots >= num_tokens)
    t->num_tokens += n;
    return TABLE_OK;
  }

  int32_t locate(int64_t request_id, int64_t position, int32_t& instance, int32_t& block,
                 int32_t& offset) {
    RequestTable* t = find(request_id);
    if (t == nullptr) return TABLE_NO_REQUEST;
    if (position < 0 || position >= t->num_tokens) return TABLE_BAD_COUNT;
    int32_t logical = static_cast<int32_t>(position / block_size_);
    instance = t->runs[t->run_of(logical)].instance;
    block = t->blocks[logical];
    offset = static_cast<int32_t>(position % block_size_);
    return TABLE_OK;
  }

  // Keep the first `num_tokens` tokens and the ceil(num_tokens / block_size) blocks holding
  // them; every later block goes to `dropped`.
  int32_t truncate(int64_t request_id, int64_t num_tokens, RequestTable& dropped) {
    RequestTable* t = find(request_id);
    if (t == nullptr) return TABLE_NO_REQUEST;
    if (num_tokens < 0 || num_tokens > t->num_tokens) return TABLE_BAD_COUNT;
    t->num_tokens = num_tokens;
    t->cut(t->num_filled(block_size_), dropped);
    return TABLE_OK;
  }

  int32_t blocks_on(int64_t request_id, int32_t instance, std::vector<int32_t>& out) {
    RequestTable* t = find(request_id);
    if (t == nullptr) return TABLE_NO_REQUEST;
    for (size_t k = 0; k < t->runs.size(); ++k)
      if (t->runs[k].instance == instance)
        out.insert(out.end(), t->blocks.begin() + t->runs[k].start, t->blocks.begin() + t->run_end(k));
    return TABLE_OK;
  }

  // Migration: the last n blocks (logical order) the request has on `src` now live on `dst`
  // under `new_ids` (new_ids[i] replaces the i-th of them); their old ids go to `old_ids`.
  //
  //   before   A[5 9] B[2] A[4 8]          move 3 blocks A -> C, new ids [70 71 72]
  //   after    A[5] C[70] B[2] C[71 72]    old ids [9 4 8]
  //
  // Walking the runs backwards, every run on `src` moves whole except the last one visited,
  // of which only a suffix moves (that run splits in two). Neighbours on `dst` then merge.
  int32_t move_blocks(int64_t request_id, int32_t src, int32_t dst, const int32_t* new_ids,
                      int32_t n, std::vector<int32_t>& old_ids, int32_t keep_last = 0) {
    RequestTable* t = find(request_id);
    if (t == nullptr) return TABLE_NO_REQUEST;
    int32_t limit = t->num_blocks() - std::min(std::max(keep_last, 0), t->num_blocks());
    if (t->count_on(src, limit) < n) return TABLE_TOO_FEW_BLOCKS;
    old_ids.assign(n, -1);
    if (n == 0) return TABLE_OK;
    // The last keep_last logical blocks stay: a run that straddles `limit` is split there
    // first (two runs on one instance, merged again at the end).
    size_t s = t->run_of(limit < t->num_blocks() ? limit : t->num_blocks() - 1);
    if (limit < t->num_blocks() && t->runs[s].start < limit) {
      t->runs.insert(t->runs.begin() + static_cast<std::ptrdiff_t>(s) + 1, Run{t->runs[s].instance, limit});
    }
    int32_t left = n;  // blocks still to move; the next one found (walking back) is number left-1
    size_t k = t->runs.size();
    while (left > 0) {
      --k;
      if (t->runs[k].instance != src || t->runs[k].start >= limit) continue;
      int32_t lo = t->runs[k].start, hi = t->run_end(k);
      int32_t cut = hi - std::min(left, hi - lo);  // blocks [cut, hi) of this run move
      for (int32_t i = hi; i-- > cut;) {
        --left;
        old_ids[left] = t->blocks[i];
        t->blocks[i] = new_ids[left];
      }
      if (cut == lo) {
        t->runs[k].instance = dst;
      } else {
        t->runs.insert(t->runs.begin() + static_cast<std::ptrdiff_t>(k) + 1, Run{dst, cut});
      }
    }
    t->merge_runs_from(k == 0 ? 0 : k - 1);
    return TABLE_OK;
  }

  // ---- per-step conversions for a batch -------------------------------------------------------

  // Width of the batch tables: the most blocks holding tokens that one request of the batch
  // has on `instance`, at least 1. Every request id must have a table (checked by the caller).
  int32_t batch_width(const int64_t* request_ids, int32_t batch, int32_t instance) {
    int32_t width = 1;
    for (int32_t r = 0; r < batch; ++r) {
      const RequestTable& t = *find(request_ids[r]);
      width = std::max(width, t.count_on(instance, t.num_filled(block_size_)));
    }
    return width;
  }

  // Fill [batch, width] row-major buffers: block ids (padding -1), the absolute position of
  // each block's first token (padding 0), and its number of tokens (padding 0); only the blocks
  // on `instance` that hold at least one token, in logical order.
  void fill_batch_tables(const int64_t* request_ids, int32_t batch, int32_t instance,
                         int32_t width, int32_t* block_table, int32_t* block_start,
                         int32_t* block_len) {
    for (int32_t r = 0; r < batch; ++r) {
      const RequestTable& t = *find(request_ids[r]);
      int32_t filled = t.num_filled(block_size_);
      int64_t row = static_cast<int64_t>(r) * width;
      int32_t col = 0;
      for (size_t k = 0; k < t.runs.size() && t.runs[k].start < filled; ++k) {
        if (t.runs[k].instance != instance) continue;
        for (int32_t i = t.runs[k].start, end = std::min(t.run_end(k), filled); i < end; ++i, ++col) {
          int64_t first = static_cast<int64_t>(i) * block_size_;
          block_table[row + col] = t.blocks[i];
          block_start[row + col] = static_cast<int32_t>(first);
          block_len[row + col] = static_cast<int32_t>(std::min<int64_t>(block_size_, t.num_tokens - first));
        }
      }
      for (; col < width; ++col) {
        block_table[row + col] = -1;
        block_start[row + col] = 0;
        block_len[row + col] = 0;
      }
    }
  }

  // For the last counts[r] tokens of each request (0 <= counts[r] <= its num_tokens, checked by
  // the caller), in batch order: the instance and slot (block*block_size + offset) that holds
  // each one. Buffers of sum(counts) entries.
  void fill_slot_mapping(const int64_t* request_ids, const int64_t* counts, int32_t batch,
                         int32_t* instance_out, int64_t* slot_out) {
    int64_t o = 0;
    for (int32_t r = 0; r < batch; ++r) {
      if (counts[r] == 0) continue;
      const RequestTable& t = *find(request_ids[r]);
      int64_t position = t.num_tokens - counts[r];
      size_t k = t.run_of(static_cast<int32_t>(position / block_size_));
      for (; position < t.num_tokens; ++position, ++o) {
        int32_t logical = static_cast<int32_t>(position / block_size_);
        while (logical >= t.run_end(k)) ++k;
        instance_out[o] = t.runs[k].instance;
        slot_out[o] = static_cast<int64_t>(t.blocks[logical]) * block_size_ + position % block_size_;
      }
    }
  }

 private:
  int32_t block_size_;
  std::unordered_map<int64_t, RequestTable> tables_;
};

}  // namespace infinillm
