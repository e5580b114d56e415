// The cluster's debt ledger (the state of the paper's gManager).
//
// Two sources feed it, and it keeps them apart:
//
//   counters   per instance, from heartbeats: capacity, free, used, lent, reserved, borrowed,
//              exactly as the instance's BlockPool counts them (PoolDelta / PoolCounters), with
//              the version of the last heartbeat applied. Invariant: after every pool's deltas
//              are applied in order, the ledger's counters equal that pool's counters().
//   placement  per request, from the runtime (`record_blocks`): its home instance and how many
//              of its blocks sit on each instance. Blocks of a request on an instance other
//              than its home are a debt of the home to that instance.
//
// plus per instance its load (batch size, waiting requests, blocks the head of its waiting
// queue needs), which the planner reads.
//
//   requests_  request -> { home, total, placement: instance -> blocks }      (one entry)
//   instance   parts:      request -> { blocks here, home }   every request with blocks here
//              homed_away: own requests with blocks elsewhere, away_blocks their sum
//
// The per-instance indexes make the planner's questions cheap: "the debtor's longest own
// request" walks only that debtor's parts, "what can this instance bring home" only its
// homed_away. Every map that the planner iterates is ordered (std::map / std::set) so that
// floating-point sums run in the same order as in the Python twin (ledger.py), which sorts.
#pragma once

#include <algorithm>
#include <cstdint>
#include <map>
#include <set>
#include <tuple>
#include <unordered_map>
#include <utility>
#include <vector>

#include "block_pool.hpp"  // PoolCounters

namespace infinillm {

// Status codes of the mutating calls; the Cython layer turns them into exceptions.
enum LedgerStatus : int32_t {
  LEDGER_OK = 0,
  LEDGER_UNKNOWN_INSTANCE = -1,
  LEDGER_DUPLICATE_INSTANCE = -2,
  LEDGER_STALE = -3,         // delta's base version is not the version last applied
  LEDGER_VERSION_BACK = -4,  // delta goes to an older version than its base
  LEDGER_INCONSISTENT = -5,  // counters would break capacity == free + used + reserved, ...
  LEDGER_OTHER_HOME = -6,    // request already recorded with another home
  LEDGER_NEGATIVE = -7,      // would take a request's blocks on an instance below 0
  LEDGER_TOO_MANY = -8,      // would take them above INT32_MAX
};

constexpr int64_t LEDGER_INT32_MAX = 2147483647;

// Heartbeat delta (or, for apply_snapshot, absolute counters), widened so that checks see the
// real result before anything is narrowed.
struct LedgerDelta {
  int64_t base_version;
  int64_t version;
  int64_t capacity;
  int64_t free;
  int64_t used;
  int64_t lent;
  int64_t reserved;
  int64_t borrowed;
};

struct LedgerPart {
  int32_t blocks;
  int32_t home;
};

struct LedgerInstance {
  int32_t id = 0;
  int32_t host = 0;
  int32_t max_lent = 0;
  PoolCounters counters{};
  int32_t batch_size = 0;
  int32_t num_waiting = 0;
  int32_t waiting_blocks = 0;  // blocks the head of the waiting queue needs
  std::map<int64_t, LedgerPart> parts;  // request -> its blocks here (own and lent-in)
  std::set<int64_t> homed_away;         // own requests with blocks on other instances
  int64_t away_blocks = 0;              // their blocks elsewhere (placement's view of borrowed)

  // Blocks this instance could lend now: free ones, capped by max_lent minus lent and reserved.
  int32_t lendable() const { return lendable_with(counters.free, counters.lent); }
  int32_t lendable_with(int32_t free, int32_t lent) const {
    int64_t room = int64_t(max_lent) - lent - counters.reserved;
    if (room < 0) room = 0;
    return room < free ? static_cast<int32_t>(room) : free;
  }
  int64_t load() const { return int64_t(batch_size) + num_waiting; }
};

struct LedgerRequest {
  int32_t home = 0;
  int64_t total = 0;                    // blocks over all instances
  std::map<int32_t, int32_t> placement;  // instance -> blocks (> 0), by instance id

  int32_t on(int32_t instance) const {
    auto it = placement.find(instance);
    return it == placement.end() ? 0 : it->second;
  }
};

struct LedgerTotals {
  int64_t num_instances;
  int64_t num_requests;
  int64_t capacity;
  int64_t free;
  int64_t used;
  int64_t lent;
  int64_t reserved;
  int64_t borrowed;
  int64_t lendable;
  int64_t batch_size;
  int64_t num_waiting;
};

inline bool ledger_counters_consistent(int64_t capacity, int64_t free, int64_t used, int64_t lent,
                                       int64_t reserved, int64_t borrowed) {
  for (int64_t v : {capacity, free, used, lent, reserved, borrowed})
    if (v < 0 || v > LEDGER_INT32_MAX) return false;
  return capacity == free + used + reserved && lent <= used;
}

class DebtLedger {
 public:
  // ---- instances ----------------------------------------------------------------------------

  // A fresh instance's counters are a fresh BlockPool's: version 0, everything free.
  int32_t register_instance(int64_t id, int32_t capacity, int32_t max_lent, int32_t host) {
    if (instances_.count(id)) return LEDGER_DUPLICATE_INSTANCE;
    LedgerInstance& x = instances_[id];
    x.id = static_cast<int32_t>(id);
    x.host = host;
    x.max_lent = max_lent;
    x.counters = PoolCounters{0, capacity, capacity, 0, 0, 0, 0};
    return LEDGER_OK;
  }

  // Drop a dead instance. `affected` gets (sorted) every request that had blocks there or had
  // it as home. Requests homed there are forgotten entirely (their blocks elsewhere are the
  // caller's to free); the others lose only their part on the dead instance.
  int32_t remove_instance(int64_t id, std::vector<int64_t>& affected) {
    auto it = instances_.find(id);
    if (it == instances_.end()) return LEDGER_UNKNOWN_INSTANCE;
    const int32_t me = it->second.id;
    for (auto& kv : it->second.parts) affected.push_back(kv.first);
    for (auto& kv : requests_)
      if (kv.second.home == me && !it->second.parts.count(kv.first)) affected.push_back(kv.first);
    std::sort(affected.begin(), affected.end());
    for (int64_t rid : affected) {
      auto r = requests_.find(rid);
      if (r->second.home == me) {
        forget_request(rid);
      } else {
        int32_t b = r->second.on(me);
        r->second.placement.erase(me);
        r->second.total -= b;
        update_away(r->first, r->second, -b);
      }
    }
    instances_.erase(it);
    return LEDGER_OK;
  }

  bool has_instance(int64_t id) const { return instances_.count(id) != 0; }
  const LedgerInstance* instance(int64_t id) const {
    auto it = instances_.find(id);
    return it == instances_.end() ? nullptr : &it->second;
  }
  const std::map<int64_t, LedgerInstance>& instances() const { return instances_; }
  void instance_ids(std::vector<int64_t>& out) const {
    for (auto& kv : instances_) out.push_back(kv.first);
  }
  int64_t num_instances() const { return static_cast<int64_t>(instances_.size()); }

  // ---- heartbeats ---------------------------------------------------------------------------

  // Applies only on top of the version last applied (else LEDGER_STALE, nothing changes: the
  // caller asks that instance for a snapshot).
  int32_t apply_delta(int64_t id, const LedgerDelta& d) {
    auto it = instances_.find(id);
    if (it == instances_.end()) return LEDGER_UNKNOWN_INSTANCE;
    PoolCounters& c = it->second.counters;
    if (d.base_version != c.version) return LEDGER_STALE;
    if (d.version < d.base_version) return LEDGER_VERSION_BACK;
    // Counters sit in [0, INT32_MAX], so a change outside +-INT32_MAX can only break them;
    // refusing it first also keeps the sums below from overflowing int64.
    for (int64_t v : {d.capacity, d.free, d.used, d.lent, d.reserved, d.borrowed})
      if (v < -LEDGER_INT32_MAX || v > LEDGER_INT32_MAX) return LEDGER_INCONSISTENT;
    int64_t capacity = c.capacity + d.capacity, free = c.free + d.free, used = c.used + d.used,
            lent = c.lent + d.lent, reserved = c.reserved + d.reserved,
            borrowed = c.borrowed + d.borrowed;
    if (!ledger_counters_consistent(capacity, free, used, lent, reserved, borrowed))
      return LEDGER_INCONSISTENT;
    c = PoolCounters{d.version, int32_t(capacity), int32_t(free), int32_t(used), int32_t(lent),
                     int32_t(reserved), int32_t(borrowed)};
    return LEDGER_OK;
  }

  // A full snapshot is authoritative: it replaces the counters whatever their version.
  int32_t apply_snapshot(int64_t id, const LedgerDelta& s) {
    auto it = instances_.find(id);
    if (it == instances_.end()) return LEDGER_UNKNOWN_INSTANCE;
    if (!ledger_counters_consistent(s.capacity, s.free, s.used, s.lent, s.reserved, s.borrowed))
      return LEDGER_INCONSISTENT;
    it->second.counters = PoolCounters{s.version, int32_t(s.capacity), int32_t(s.free),
                                       int32_t(s.used), int32_t(s.lent), int32_t(s.reserved),
                                       int32_t(s.borrowed)};
    return LEDGER_OK;
  }

  int32_t set_max_lent(int64_t id, int32_t max_lent) {
    auto it = instances_.find(id);
    if (it == instances_.end()) return LEDGER_UNKNOWN_INSTANCE;
    it->second.max_lent = max_lent;
    return LEDGER_OK;
  }

  int32_t set_load(int64_t id, int32_t batch_size, int32_t num_waiting, int32_t waiting_blocks) {
    auto it = instances_.find(id);
    if (it == instances_.end()) return LEDGER_UNKNOWN_INSTANCE;
    it->second.batch_size = batch_size;
    it->second.num_waiting = num_waiting;
    it->second.waiting_blocks = waiting_blocks;
    return LEDGER_OK;
  }

  // ---- placement ----------------------------------------------------------------------------

  // +n when n blocks of the request are placed on `instance`, -n when freed or moved away.
  // The first call for a request records its home (even with delta 0).
  int32_t record_blocks(int64_t rid, int64_t home, int64_t instance, int64_t delta) {
    if (!instances_.count(home)) return LEDGER_UNKNOWN_INSTANCE;
    auto iit = instances_.find(instance);
    if (iit == instances_.end()) return LEDGER_UNKNOWN_INSTANCE;
    auto rit = requests_.find(rid);
    if (rit != requests_.end() && rit->second.home != home) return LEDGER_OTHER_HOME;
    int64_t have = 0;
    if (rit != requests_.end()) have = rit->second.on(static_cast<int32_t>(instance));
    int64_t now = have + delta;
    if (now < 0) return LEDGER_NEGATIVE;
    if (now > LEDGER_INT32_MAX) return LEDGER_TOO_MANY;
    if (rit == requests_.end()) {
      rit = requests_.emplace(rid, LedgerRequest{}).first;
      rit->second.home = static_cast<int32_t>(home);
    }
    LedgerRequest& r = rit->second;
    const int32_t inst = static_cast<int32_t>(instance);
    if (now == 0) {
      r.placement.erase(inst);
      iit->second.parts.erase(rid);
    } else {
      r.placement[inst] = static_cast<int32_t>(now);
      iit->second.parts[rid] = LedgerPart{static_cast<int32_t>(now), r.home};
    }
    r.total += delta;
    if (inst != r.home) update_away(rid, r, delta);
    return LEDGER_OK;
  }

  // Forget a finished or aborted request; returns the blocks it still had recorded.
  int64_t forget_request(int64_t rid) {
    auto rit = requests_.find(rid);
    if (rit == requests_.end()) return 0;
    LedgerRequest& r = rit->second;
    int64_t total = r.total;
    int64_t away = total - r.on(r.home);
    for (auto& kv : r.placement) {
      auto iit = instances_.find(kv.first);
      if (iit != instances_.end()) iit->second.parts.erase(rid);
    }
    auto hit = instances_.find(r.home);
    if (hit != instances_.end()) {
      hit->second.away_blocks -= away;
      hit->second.homed_away.erase(rid);
    }
    requests_.erase(rit);
    return total;
  }

  const LedgerRequest* request(int64_t rid) const {
    auto it = requests_.find(rid);
    return it == requests_.end() ? nullptr : &it->second;
  }
  int64_t num_requests() const { return static_cast<int64_t>(requests_.size()); }

  // The request's blocks per instance, by instance id (for the Python layer).
  static void placement_of(const LedgerRequest& r, std::vector<std::pair<int32_t, int32_t>>& out) {
    for (auto& kv : r.placement) out.emplace_back(kv.first, kv.second);
  }
  // Blocks per request held on the instance, by request id (for the Python layer).
  static void requests_on(const LedgerInstance& x, std::vector<std::pair<int64_t, int32_t>>& out) {
    for (auto& kv : x.parts) out.emplace_back(kv.first, kv.second.blocks);
  }

  // ---- queries ------------------------------------------------------------------------------

  // Instances other than the borrower whose lendable >= n, ranked by free blocks (most first),
  // then load (batch + waiting, least first), then the borrower's host first, then id.
  // `limit` < 0: all. The borrower must be registered (the caller checks).
  void creditors(int64_t borrower, int32_t n, int64_t limit, std::vector<int32_t>& out) const {
    const LedgerInstance& b = instances_.at(borrower);
    std::vector<std::tuple<int64_t, int64_t, int32_t, int32_t>> ranked;
    for (auto& kv : instances_) {
      const LedgerInstance& x = kv.second;
      if (x.id == b.id || x.lendable() < n) continue;
      ranked.emplace_back(-int64_t(x.counters.free), x.load(), x.host == b.host ? 0 : 1, x.id);
    }
    std::sort(ranked.begin(), ranked.end());
    size_t count = ranked.size();
    if (limit >= 0 && static_cast<size_t>(limit) < count) count = static_cast<size_t>(limit);
    for (size_t i = 0; i < count; ++i) out.push_back(std::get<3>(ranked[i]));
  }

  // Blocks of other instances' requests that `creditor` holds, per home (by id).
  void debtors_of(const LedgerInstance& creditor, std::vector<std::pair<int32_t, int64_t>>& out) const {
    std::map<int32_t, int64_t> sums;
    for (auto& kv : creditor.parts)
      if (kv.second.home != creditor.id) sums[kv.second.home] += kv.second.blocks;
    for (auto& kv : sums) out.emplace_back(kv.first, kv.second);
  }

  // Blocks of `debtor`'s requests held by other instances, per instance (by id).
  void creditors_of(const LedgerInstance& debtor, std::vector<std::pair<int32_t, int64_t>>& out) const {
    std::map<int32_t, int64_t> sums;
    for (int64_t rid : debtor.homed_away)
      for (auto& kv : requests_.at(rid).placement)
        if (kv.first != debtor.id) sums[kv.first] += kv.second;
    for (auto& kv : sums) out.emplace_back(kv.first, kv.second);
  }

  LedgerTotals totals() const {
    LedgerTotals t{};
    t.num_instances = num_instances();
    t.num_requests = num_requests();
    for (auto& kv : instances_) {
      const LedgerInstance& x = kv.second;
      t.capacity += x.counters.capacity;
      t.free += x.counters.free;
      t.used += x.counters.used;
      t.lent += x.counters.lent;
      t.reserved += x.counters.reserved;
      t.borrowed += x.counters.borrowed;
      t.lendable += x.lendable();
      t.batch_size += x.batch_size;
      t.num_waiting += x.num_waiting;
    }
    return t;
  }

 private:
  // The request's blocks away from home changed by `delta`: keep its home's index in step.
  void update_away(int64_t rid, const LedgerRequest& r, int64_t delta) {
    auto hit = instances_.find(r.home);
    if (hit == instances_.end()) return;
    hit->second.away_blocks += delta;
    if (r.total - r.on(r.home) > 0)
      hit->second.homed_away.insert(rid);
    else
      hit->second.homed_away.erase(rid);
  }

  std::map<int64_t, LedgerInstance> instances_;  // by id: iteration order is id order
  std::unordered_map<int64_t, LedgerRequest> requests_;
};

}  // namespace infinillm
