// The KV block pool of one instance (the paper's rManager).
//
// An instance's KV memory is `num_blocks` fixed-size blocks. Every block is in exactly one
// state at every moment:
//
//   FREE      on the free stack, owned by nobody
//   CACHED    held by no request but keeps the KV of a full block, named by its hash (prefix
//             caching): evictable, least recently used first. It counts as free everywhere
//             (admission, lending, heartbeats); an allocation takes the free stack first and
//             then evicts the oldest cached block.
//   RESERVED  held for a pending loan reservation (not yet written by the borrower)
//   USED      holds KV of one or more requests of one home (more than one when requests share
//             a cached prefix: `refs` counts them). When the home is another instance the
//             block is *lent*.
//
//   capacity = free + reserved + used        lent <= used        lent + reserved <= max_lent
//   (free counts the CACHED blocks)
//
// Prefix caching: `register_block` names a USED full block by the hash of its tokens and of
// everything before them (the engine computes it); `lookup` / `acquire` find the longest run
// of a request's hashes cached here for the same home and take a reference on each block.
// When its last holder frees a named block it becomes CACHED instead of FREE.
//
// Allocation and free are O(1) per block: the free blocks sit on a stack (LIFO, so a block
// freed now is the next one handed out, which keeps the working set warm and makes the order
// deterministic for the pure-Python twin to reproduce exactly).
//
// Loans: a borrower first reserves (`try_reserve`), because the global view it decided on
// may be stale; reservations are served first come, first served and expire if not committed
// in time. `commit` turns the reserved blocks into USED blocks of the borrower's request.
// The pool never borrows for a request whose home is another instance (no borrowing chains):
// `add_borrowed` refuses it.
//
// Every mutation bumps `version`; `take_delta` returns the counter changes since the last call,
// which is what a heartbeat carries to the global ledger.
#pragma once

#include <cstdint>
#include <map>
#include <unordered_map>
#include <vector>

namespace infinillm {

enum BlockState : uint8_t { BLOCK_FREE = 0, BLOCK_RESERVED = 1, BLOCK_USED = 2, BLOCK_CACHED = 3 };

// Status codes returned by the mutating calls; the Cython layer turns them into exceptions.
enum PoolStatus : int32_t {
  POOL_OK = 0,
  POOL_NO_SPACE = -1,        // not enough free blocks
  POOL_OVER_LEND_CAP = -2,   // lending would pass max_lent
  POOL_BAD_BLOCK = -3,       // block id out of range or not owned by the named request
  POOL_BAD_REQUEST = -4,     // unknown request, or a request of another home where ours is needed
  POOL_BAD_RESERVATION = -5, // unknown (or already used) reservation
  POOL_EXPIRED = -6,         // reservation expired before commit
  POOL_BAD_COUNT = -7,       // negative count, or more than held
};

struct PoolCounters {
  int64_t version;
  int32_t capacity;
  int32_t free;
  int32_t used;
  int32_t lent;
  int32_t reserved;
  int32_t borrowed;
};

struct Reservation {
  int32_t borrower;
  double expires_at;
  std::vector<int32_t> blocks;
};

class BlockPool {
 public:
  BlockPool(int32_t instance_id, int32_t num_blocks, int32_t max_lent)
      : instance_id_(instance_id),
        num_blocks_(num_blocks),
        max_lent_(max_lent),
        state_(num_blocks, BLOCK_FREE),
        marked_(num_blocks, 0),
        owner_request_(num_blocks, -1),
        owner_home_(num_blocks, -1),
        refs_(num_blocks, 0),
        hashed_(num_blocks, 0),
        hash_(num_blocks, 0),
        lru_prev_(num_blocks, -1),
        lru_next_(num_blocks, -1) {
    free_stack_.reserve(num_blocks);
    for (int32_t b = num_blocks - 1; b >= 0; --b) free_stack_.push_back(b);
    reported_ = counters();
  }

  int32_t instance_id() const { return instance_id_; }
  int32_t num_blocks() const { return num_blocks_; }
  int32_t max_lent() const { return max_lent_; }
  // A new lending cap (memory pressure lowers it, relief raises it back). Loans already made
  // stay; while lent + reserved >= the cap, nothing more is lent.
  void set_max_lent(int32_t n) { max_lent_ = n; }
  // Free blocks, the cached (evictable) ones included.
  int32_t num_free() const { return static_cast<int32_t>(free_stack_.size()) + num_evictable_; }
  int32_t num_evictable() const { return num_evictable_; }
  int32_t num_cached() const { return static_cast<int32_t>(cache_.size()); }
  int64_t num_evicted() const { return num_evicted_; }  // cached blocks taken by allocations so far
  int32_t num_used() const { return used_; }
  int32_t num_lent() const { return lent_; }
  int32_t num_reserved() const { return reserved_; }
  int32_t num_borrowed() const { return borrowed_; }
  int64_t version() const { return version_; }

  bool can_allocate(int32_t n) const { return n >= 0 && n <= num_free(); }

  // Room this pool can still lend: free blocks, capped by max_lent minus what is lent or held.
  int32_t lendable() const {
    int32_t room = max_lent_ - lent_ - reserved_;
    if (room < 0) room = 0;
    return room < num_free() ? room : num_free();
  }

  // Allocate n blocks for a request whose home is this instance; appends their ids to `out`.
  int32_t allocate(int64_t request_id, int32_t n, std::vector<int32_t>& out) {
    if (n < 0) return POOL_BAD_COUNT;
    if (n > num_free()) return POOL_NO_SPACE;
    size_t at = out.size();
    out.resize(at + static_cast<size_t>(n));
    return allocate_into(request_id, n, out.data() + at);
  }

  // Same, writing the ids to out[0..n) (the batch path: straight into a numpy buffer).
  int32_t allocate_into(int64_t request_id, int32_t n, int32_t* out) {
    if (n < 0) return POOL_BAD_COUNT;
    if (n > num_free()) return POOL_NO_SPACE;
    if (n == 0) return POOL_OK;
    auto& held = held_list(request_id);
    held.reserve(held.size() + static_cast<size_t>(n));
    for (int32_t i = 0; i < n; ++i) {
      int32_t b = pop_free();
      state_[b] = BLOCK_USED;
      refs_[b] = 1;
      owner_request_[b] = request_id;
      owner_home_[b] = instance_id_;
      held.push_back(b);
      out[i] = b;
    }
    used_ += n;
    ++version_;
    return POOL_OK;
  }

  // Free the named blocks of a request (e.g. truncation). All must be held by it, or nothing
  // is freed.
  int32_t free_blocks(int64_t request_id, const int32_t* blocks, int32_t n) {
    auto it = held_.find(request_id);
    if (it == held_.end()) return n == 0 ? POOL_OK : POOL_BAD_REQUEST;
    // Linear in n and in the request's blocks here (a creditor frees a long request's part of
    // thousands of blocks at once): each named block is marked, the held list is checked to
    // hold every one of them (a shared block has other holders, so the owner alone does not
    // tell), then compacted in one pass. A block named twice is found by its mark.
    int32_t i = 0;
    int32_t status = POOL_OK;
    for (; i < n; ++i) {
      int32_t b = blocks[i];
      if (b < 0 || b >= num_blocks_ || state_[b] != BLOCK_USED || marked_[b]) {
        status = POOL_BAD_BLOCK;
        break;
      }
      marked_[b] = 1;
    }
    std::vector<int32_t>& held = it->second;
    if (status == POOL_OK) {
      int32_t found = 0;
      for (int32_t b : held) found += marked_[b];
      if (found != n) status = POOL_BAD_BLOCK;
    }
    if (status != POOL_OK) {
      for (int32_t j = 0; j < i; ++j) marked_[blocks[j]] = 0;
      return status;
    }
    size_t keep = 0;
    for (size_t k = 0; k < held.size(); ++k)
      if (!marked_[held[k]]) held[keep++] = held[k];
    held.resize(keep);
    for (int32_t j = 0; j < n; ++j) {
      marked_[blocks[j]] = 0;
      release_used(blocks[j]);
    }
    if (held.empty()) recycle(it);
    if (n) ++version_;
    return POOL_OK;
  }

  // Free every block a request holds here, own or lent. Returns the count (0 if none).
  int32_t free_request(int64_t request_id) {
    auto it = held_.find(request_id);
    if (it == held_.end()) return 0;
    int32_t n = static_cast<int32_t>(it->second.size());
    // Free in reverse allocation order so the next allocation reuses them in the same order.
    for (size_t k = it->second.size(); k-- > 0;) release_used(it->second[k]);
    recycle(it);
    if (n) ++version_;
    return n;
  }

  const std::vector<int32_t>* blocks_of(int64_t request_id) const {
    auto it = held_.find(request_id);
    return it == held_.end() ? nullptr : &it->second;
  }

  int32_t num_requests() const { return static_cast<int32_t>(held_.size()); }

  BlockState state(int32_t b) const { return static_cast<BlockState>(state_[b]); }
  int64_t owner_request(int32_t b) const { return owner_request_[b]; }
  int32_t owner_home(int32_t b) const { return owner_home_[b]; }

  // ---- prefix caching -----------------------------------------------------------------------

  // Name a USED block by `hash`. Returns 1 when named, 0 when the hash already names another
  // block here (the same prefix computed twice: this copy stays unnamed) or the block is named
  // already, POOL_BAD_BLOCK for a block that is not USED.
  int32_t register_block(int32_t b, int64_t hash) {
    if (b < 0 || b >= num_blocks_ || state_[b] != BLOCK_USED) return POOL_BAD_BLOCK;
    if (hashed_[b] || cache_.count(hash)) return 0;
    hashed_[b] = 1;
    hash_[b] = hash;
    cache_.emplace(hash, b);
    ++version_;
    return 1;
  }

  // How many of `hashes`, from the first, name blocks cached here for requests of `home`.
  int32_t lookup(int32_t home, const int64_t* hashes, int32_t n) const {
    int32_t k = 0;
    for (; k < n; ++k) {
      auto it = cache_.find(hashes[k]);
      if (it == cache_.end() || owner_home_[it->second] != home) break;
    }
    return k;
  }

  // Of the blocks `lookup` finds, how many no request holds (taking them uses free blocks).
  int32_t lookup_evictable(int32_t home, const int64_t* hashes, int32_t n) const {
    int32_t k = lookup(home, hashes, n), e = 0;
    for (int32_t i = 0; i < k; ++i) e += state_[cache_.find(hashes[i])->second] == BLOCK_CACHED;
    return e;
  }

  // Take a reference for request `request_id` (of `home`) on the blocks named by the longest
  // cached run of `hashes` from the first (as `lookup`), and append them to its blocks here and
  // to `out`. Returns how many, or POOL_BAD_REQUEST when the request is held here for another
  // home. A block the request holds already ends the run.
  int32_t acquire(int64_t request_id, int32_t home, const int64_t* hashes, int32_t n,
                  std::vector<int32_t>& out) {
    auto hit = held_.find(request_id);
    if (hit != held_.end() && !hit->second.empty() && owner_home_[hit->second.front()] != home)
      return POOL_BAD_REQUEST;
    int32_t k = lookup(home, hashes, n);
    if (k == 0) return 0;
    if (hit != held_.end())
      for (int32_t b : hit->second) marked_[b] = 1;
    int32_t took = 0;
    for (; took < k; ++took)
      if (marked_[cache_.find(hashes[took])->second]) break;
    if (hit != held_.end())
      for (int32_t b : hit->second) marked_[b] = 0;
    if (took == 0) return 0;
    auto& held = held_list(request_id);
    held.reserve(held.size() + static_cast<size_t>(took));
    for (int32_t i = 0; i < took; ++i) {
      int32_t b = cache_.find(hashes[i])->second;
      if (state_[b] == BLOCK_CACHED) {
        lru_unlink(b);
        --num_evictable_;
        state_[b] = BLOCK_USED;
        refs_[b] = 1;
        ++used_;
        if (home != instance_id_) ++lent_;
      } else {
        ++refs_[b];
      }
      owner_request_[b] = request_id;
      held.push_back(b);
      out.push_back(b);
    }
    ++version_;
    return took;
  }

  // Forget every cached block no request holds (they become plain free blocks); blocks in use
  // keep their names. Returns how many were dropped.
  int32_t reset_cache() {
    int32_t n = 0;
    while (lru_head_ >= 0) {
      int32_t b = lru_head_;
      lru_unlink(b);
      --num_evictable_;
      forget_hash(b);
      state_[b] = BLOCK_FREE;
      owner_home_[b] = -1;
      free_stack_.push_back(b);
      ++n;
    }
    if (n) ++version_;
    return n;
  }

  int32_t refs(int32_t b) const { return refs_[b]; }
  bool hashed(int32_t b) const { return hashed_[b] != 0; }
  int64_t block_hash(int32_t b) const { return hash_[b]; }

  // ---- loans --------------------------------------------------------------------------------

  // Reserve n blocks for `borrower`; returns a reservation id > 0, or a negative status.
  int64_t try_reserve(int32_t borrower, int32_t n, double now, double ttl) {
    if (n <= 0) return POOL_BAD_COUNT;
    if (borrower == instance_id_) return POOL_BAD_REQUEST;
    if (n > num_free()) return POOL_NO_SPACE;
    if (lent_ + reserved_ + n > max_lent_) return POOL_OVER_LEND_CAP;
    int64_t id = next_reservation_++;
    Reservation& r = reservations_[id];
    r.borrower = borrower;
    r.expires_at = now + ttl;
    r.blocks.reserve(n);
    for (int32_t i = 0; i < n; ++i) {
      int32_t b = pop_free();
      state_[b] = BLOCK_RESERVED;
      owner_home_[b] = borrower;
      r.blocks.push_back(b);
    }
    reserved_ += n;
    ++version_;
    return id;
  }

  // Turn a reservation into blocks of the borrower's request `request_id`.
  int32_t commit(int64_t reservation_id, int64_t request_id, double now, std::vector<int32_t>& out) {
    auto it = reservations_.find(reservation_id);
    if (it == reservations_.end()) return POOL_BAD_RESERVATION;
    if (now > it->second.expires_at) {
      release_reservation(it);
      ++version_;
      return POOL_EXPIRED;
    }
    auto hit = held_.find(request_id);
    if (hit != held_.end() && !hit->second.empty() &&
        owner_home_[hit->second.front()] != it->second.borrower)
      return POOL_BAD_REQUEST;  // the same request id held for another home
    auto& held = held_list(request_id);
    int32_t n = static_cast<int32_t>(it->second.blocks.size());
    for (int32_t b : it->second.blocks) {
      state_[b] = BLOCK_USED;
      refs_[b] = 1;
      owner_request_[b] = request_id;
      held.push_back(b);
      out.push_back(b);
    }
    reserved_ -= n;
    used_ += n;
    lent_ += n;
    reservations_.erase(it);
    ++version_;
    return n;
  }

  // Give a reservation's blocks back. Returns the count, or a negative status.
  int32_t cancel(int64_t reservation_id) {
    auto it = reservations_.find(reservation_id);
    if (it == reservations_.end()) return POOL_BAD_RESERVATION;
    int32_t n = release_reservation(it);
    ++version_;
    return n;
  }

  // Give back every reservation whose expiry is before `now`. Returns the blocks released.
  int32_t expire(double now) {
    int32_t n = 0;
    for (auto it = reservations_.begin(); it != reservations_.end();) {
      if (now > it->second.expires_at) {
        auto dead = it++;
        n += release_reservation(dead);
      } else {
        ++it;
      }
    }
    if (n) ++version_;
    return n;
  }

  int32_t num_reservations() const { return static_cast<int32_t>(reservations_.size()); }

  // A pending reservation, or nullptr (unknown, committed, cancelled or expired).
  const Reservation* reservation(int64_t reservation_id) const {
    auto it = reservations_.find(reservation_id);
    return it == reservations_.end() ? nullptr : &it->second;
  }

  // ---- what this instance's own requests hold elsewhere -------------------------------------

  int32_t add_borrowed(int64_t request_id, int32_t home, int32_t n) {
    if (home != instance_id_) return POOL_BAD_REQUEST;  // never borrow for a remote request
    if (n < 0) return POOL_BAD_COUNT;
    borrowed_by_request_[request_id] += n;
    borrowed_ += n;
    if (n) ++version_;
    return POOL_OK;
  }

  int32_t remove_borrowed(int64_t request_id, int32_t n) {
    auto it = borrowed_by_request_.find(request_id);
    int32_t have = it == borrowed_by_request_.end() ? 0 : it->second;
    if (n < 0 || n > have) return POOL_BAD_COUNT;
    if (n == 0) return POOL_OK;
    it->second -= n;
    if (it->second == 0) borrowed_by_request_.erase(it);
    borrowed_ -= n;
    ++version_;
    return POOL_OK;
  }

  int32_t borrowed_by(int64_t request_id) const {
    auto it = borrowed_by_request_.find(request_id);
    return it == borrowed_by_request_.end() ? 0 : it->second;
  }

  // ---- heartbeats ---------------------------------------------------------------------------

  PoolCounters counters() const {
    return PoolCounters{version_, num_blocks_, num_free(), used_, lent_, reserved_, borrowed_};
  }

  // Counter changes since the previous call (version is the new absolute version; the base
  // version is returned through `base_version`).
  PoolCounters take_delta(int64_t& base_version) {
    PoolCounters now = counters();
    PoolCounters d{now.version,
                   now.capacity - reported_.capacity,
                   now.free - reported_.free,
                   now.used - reported_.used,
                   now.lent - reported_.lent,
                   now.reserved - reported_.reserved,
                   now.borrowed - reported_.borrowed};
    base_version = reported_.version;
    reported_ = now;
    return d;
  }

 private:
  using HeldMap = std::unordered_map<int64_t, std::vector<int32_t>>;

  // The block list of a request, created on first use from a recycled vector, so a steady
  // stream of requests joining and leaving allocates no memory.
  std::vector<int32_t>& held_list(int64_t request_id) {
    auto it = held_.find(request_id);
    if (it != held_.end()) return it->second;
    std::vector<int32_t> v;
    if (!spare_.empty()) {
      v.swap(spare_.back());
      spare_.pop_back();
    }
    return held_.emplace(request_id, std::move(v)).first->second;
  }

  void recycle(HeldMap::iterator it) {
    it->second.clear();
    if (spare_.size() < 1024) spare_.push_back(std::move(it->second));
    held_.erase(it);
  }

  // A free block: the top of the free stack, else the least recently used cached block, whose
  // name is forgotten (evicted). The caller sets its new state.
  int32_t pop_free() {
    if (!free_stack_.empty()) {
      int32_t b = free_stack_.back();
      free_stack_.pop_back();
      return b;
    }
    int32_t b = lru_head_;
    lru_unlink(b);
    --num_evictable_;
    forget_hash(b);
    ++num_evicted_;
    return b;
  }

  // Drop one holder of a USED block; the last one frees it (to the free stack, or to the tail
  // of the cache's eviction order when it is named).
  void release_used(int32_t b) {
    if (--refs_[b] > 0) return;
    if (owner_home_[b] != instance_id_) --lent_;
    --used_;
    owner_request_[b] = -1;
    if (hashed_[b]) {
      state_[b] = BLOCK_CACHED;  // keeps owner_home_: the home whose requests may reuse it
      lru_append(b);
      ++num_evictable_;
      return;
    }
    state_[b] = BLOCK_FREE;
    owner_home_[b] = -1;
    free_stack_.push_back(b);
  }

  void forget_hash(int32_t b) {
    if (!hashed_[b]) return;
    cache_.erase(hash_[b]);
    hashed_[b] = 0;
  }

  void lru_append(int32_t b) {
    lru_prev_[b] = lru_tail_;
    lru_next_[b] = -1;
    if (lru_tail_ >= 0) lru_next_[lru_tail_] = b; else lru_head_ = b;
    lru_tail_ = b;
  }

  void lru_unlink(int32_t b) {
    int32_t p = lru_prev_[b], q = lru_next_[b];
    if (p >= 0) lru_next_[p] = q; else lru_head_ = q;
    if (q >= 0) lru_prev_[q] = p; else lru_tail_ = p;
    lru_prev_[b] = lru_next_[b] = -1;
  }


  int32_t release_reservation(std::map<int64_t, Reservation>::iterator it) {
    int32_t n = static_cast<int32_t>(it->second.blocks.size());
    for (size_t k = it->second.blocks.size(); k-- > 0;) {
      int32_t b = it->second.blocks[k];
      state_[b] = BLOCK_FREE;
      owner_home_[b] = -1;
      free_stack_.push_back(b);
    }
    reserved_ -= n;
    reservations_.erase(it);
    return n;
  }

  int32_t instance_id_;
  int32_t num_blocks_;
  int32_t max_lent_;
  std::vector<uint8_t> state_;
  std::vector<uint8_t> marked_;  // scratch for free_blocks: all 0 between calls
  std::vector<int64_t> owner_request_;
  std::vector<int32_t> owner_home_;
  std::vector<int32_t> refs_;       // holders of a USED block (1 unless a cached prefix is shared)
  std::vector<uint8_t> hashed_;     // named by hash_ (in cache_)
  std::vector<int64_t> hash_;
  std::vector<int32_t> lru_prev_;   // the CACHED blocks, least recently freed first
  std::vector<int32_t> lru_next_;
  int32_t lru_head_ = -1;
  int32_t lru_tail_ = -1;
  int32_t num_evictable_ = 0;
  int64_t num_evicted_ = 0;
  std::unordered_map<int64_t, int32_t> cache_;  // hash -> block
  std::vector<int32_t> free_stack_;
  HeldMap held_;
  std::vector<std::vector<int32_t>> spare_;
  std::map<int64_t, Reservation> reservations_;  // ordered: expiry frees in reservation order
  std::unordered_map<int64_t, int32_t> borrowed_by_request_;
  int64_t next_reservation_ = 1;
  int32_t used_ = 0;
  int32_t lent_ = 0;
  int32_t reserved_ = 0;
  int32_t borrowed_ = 0;
  int64_t version_ = 0;
  PoolCounters reported_{};
};

}  // namespace infinillm
