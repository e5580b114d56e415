// The gManager's greedy planner over a DebtLedger (DESIGN.md §2), and its throughput model.
//
// ThroughputModel: per layer of the model,
//
//   T_layer(batch, contexts) = batch / f(batch) + sum_r ctx_r / g(ctx_r)
//   tokens/s(batch, contexts) = batch / (num_layers * T_layer)
//
// f (dense-layer tokens/s at a batch size) and g (attention context tokens/s at a context
// length) are tables profiled per model and device, interpolated piecewise-linearly and
// clamped at both ends.
//
// Planner::plan, one call per planning period; it reads the ledger and returns moves, it never
// changes the ledger (the runtime carries moves out; heartbeats and record_blocks report them):
//
// 1. Spread. Debtors: num_waiting > 0 and free < waiting_blocks (the batch is memory-bound),
//    most blocks short first, then id. Creditors: num_waiting == 0 and lendable > 0, ranked as
//    DebtLedger::creditors (free desc, load asc, the debtor's host first, id asc) on the counts
//    as this plan has changed them. For each debtor: its longest own request r (most blocks on
//    the debtor, then lowest id; requests homed elsewhere are left to their home), the best
//    creditor c, and k in 1..min(budget, lendable(c), blocks(r on d) - 1) maximising
//
//        tps(d: batch + a(k), local(k)) + tps(c: batch, attn_c - t(r on c) + remote(k))
//
//      a(k)      = min(num_waiting, (free + k) / waiting_blocks): waiting requests that fit,
//                  each taken to need waiting_blocks blocks (the head's need as the estimate)
//      local(k)  = sum_{other parts on d} t(part) + t(r on d - k) + a(k) * t(waiting_blocks)
//      remote(k) = t(r on c + k)            t(n blocks) = attention time of n * block_size tokens
//
//    subject to remote(k) <= local(k) (the remote partial attention hides behind the debtor's
//    local one). A k must beat k = 0 strictly; on equal totals the smaller k wins. An
//    instance's attention covers every part held there, own or lent-in, each part's context
//    being its blocks there * block_size (the ledger counts blocks, not tokens).
// 2. Bring home. Instances with num_waiting == 0, blocks of own requests elsewhere, and
//    free - home_headroom > 0 (most blocks away first, then id), pull blocks back: requests
//    with most blocks away first (then id), from each holder with most of its blocks first
//    (then id), up to free - home_headroom and the budget.
//
// The budget (max_moves_per_step) caps the blocks moved by one plan, over both phases. Within a
// plan a creditor's free/lent and attention follow the moves already chosen; a move's source
// gets no credit for blocks it will free (they are free only once the migration is done).
//
// Every sum runs in a fixed order (parts by request id) and every expression is written the
// same way in the Python twin (planner.py), so both produce bit-identical floats and plans.
// Contraction into fused multiply-adds would break that, hence the pragmas below.
#pragma once

#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#endif

#include <algorithm>
#include <cstdint>
#include <map>
#include <set>
#include <tuple>
#include <utility>
#include <vector>

#include "ledger.hpp"

namespace infinillm {

class ThroughputModel {
 public:
  ThroughputModel() = default;
  ThroughputModel(std::vector<double> dense_batch, std::vector<double> dense_tokens_per_s,
                  std::vector<double> attn_ctx, std::vector<double> attn_tokens_per_s,
                  int32_t num_layers, int32_t block_size)
      : dense_batch_(std::move(dense_batch)),
        dense_tps_(std::move(dense_tokens_per_s)),
        attn_ctx_(std::move(attn_ctx)),
        attn_tps_(std::move(attn_tokens_per_s)),
        num_layers_(num_layers),
        block_size_(block_size) {}

  int32_t num_layers() const { return num_layers_; }
  int32_t block_size() const { return block_size_; }

  // f(batch), g(ctx).
  double dense_throughput(double batch) const { return interpolate(dense_batch_, dense_tps_, batch); }
  double attention_throughput(double ctx) const { return interpolate(attn_ctx_, attn_tps_, ctx); }

  double dense_time(double batch) const { return batch > 0 ? batch / dense_throughput(batch) : 0.0; }
  double attention_time(double ctx) const { return ctx > 0 ? ctx / attention_throughput(ctx) : 0.0; }
  double blocks_time(int64_t blocks) const { return attention_time(double(blocks * block_size_)); }

  double layer_time(double batch, const double* ctx, size_t n) const {
    double attn = 0.0;
    for (size_t i = 0; i < n; ++i) attn += attention_time(ctx[i]);
    return dense_time(batch) + attn;
  }
  double step_time(double batch, const double* ctx, size_t n) const {
    return num_layers_ * layer_time(batch, ctx, n);
  }
  // Decode tokens/s of an instance with this batch and this total attention time per layer.
  double tokens_per_s_at(double batch, double attn) const {
    return tokens_per_s_with(batch, dense_time(batch), attn);
  }
  // The same, with dense_time(batch) already known (the planner's inner loop reuses it).
  double tokens_per_s_with(double batch, double dense, double attn) const {
    if (batch <= 0) return 0.0;
    return batch / (num_layers_ * (dense + attn));
  }

 private:
  static double interpolate(const std::vector<double>& xs, const std::vector<double>& ys, double x) {
    if (x <= xs.front()) return ys.front();
    if (x >= xs.back()) return ys.back();
    size_t i = static_cast<size_t>(std::upper_bound(xs.begin(), xs.end(), x) - xs.begin()) - 1;
    return ys[i] + (ys[i + 1] - ys[i]) * (x - xs[i]) / (xs[i + 1] - xs[i]);
  }

  std::vector<double> dense_batch_{1.0}, dense_tps_{1.0}, attn_ctx_{1.0}, attn_tps_{1.0};
  int32_t num_layers_ = 1;
  int32_t block_size_ = 1;
};

enum MoveKind : int32_t { MOVE_SPREAD = 0, MOVE_HOME = 1 };

struct PlanMove {
  int64_t request_id;
  int32_t num_blocks;
  int32_t src;
  int32_t dst;
  int32_t kind;
};

class Planner {
 public:
  Planner() = default;
  Planner(const ThroughputModel& model, int64_t max_moves_per_step, int64_t home_headroom)
      : model_(model), max_moves_(max_moves_per_step), home_headroom_(home_headroom) {}

  void plan(const DebtLedger& ledger, std::vector<PlanMove>& out) const {
    out.clear();
    int64_t budget = max_moves_;
    const auto& all = ledger.instances();
    const int32_t n = static_cast<int32_t>(all.size());
    if (budget <= 0 || n == 0) return;

    // Plan-local view, indexed by position in id order (so comparing positions compares ids).
    std::vector<const LedgerInstance*> inst;
    inst.reserve(n);
    std::vector<int32_t> free(n), lent(n);
    std::vector<double> attn(n, 0.0);  // attention time per layer of the parts held there
    std::vector<char> attn_known(n, 0);
    std::vector<std::pair<int64_t, int32_t>> debtors;  // (-blocks short, position)
    using Key = std::tuple<int64_t, int64_t, int32_t>;  // (-free, load, position)
    std::set<Key> ranked;
    std::map<int32_t, std::set<Key>> ranked_by_host;
    {
      int32_t i = 0;
      for (auto& kv : all) {
        const LedgerInstance& x = kv.second;
        inst.push_back(&x);
        free[i] = x.counters.free;
        lent[i] = x.counters.lent;
        if (x.num_waiting > 0 && x.counters.free < x.waiting_blocks) {
          debtors.emplace_back(-(int64_t(x.waiting_blocks) - x.counters.free), i);
        } else if (x.num_waiting == 0 && x.lendable() > 0) {
          Key k{-int64_t(x.counters.free), x.load(), i};
          ranked.insert(k);
          ranked_by_host[x.host].insert(k);
        }
        ++i;
      }
    }
    std::sort(debtors.begin(), debtors.end());

    // ---- 1. spread ------------------------------------------------------------------------
    for (const auto& debtor : debtors) {
      if (budget <= 0 || ranked.empty()) break;
      const int32_t d = debtor.second;
      const LedgerInstance& D = *inst[d];
      int64_t rid = -1;
      int32_t rb = 0;  // blocks of r on d
      for (const auto& kv : D.parts)
        if (kv.second.home == D.id && kv.second.blocks > rb) {
          rid = kv.first;
          rb = kv.second.blocks;
        }
      if (rb < 2) continue;  // a request keeps at least one block at home

      const Key top = *ranked.begin();
      int32_t c = std::get<2>(top);
      auto same_host = ranked_by_host.find(D.host);
      if (same_host != ranked_by_host.end() && !same_host->second.empty()) {
        const Key& h = *same_host->second.begin();
        if (std::get<0>(h) == std::get<0>(top) && std::get<1>(h) == std::get<1>(top)) c = std::get<2>(h);
      }
      const LedgerInstance& C = *inst[c];
      int64_t kmax = std::min<int64_t>(budget, C.lendable_with(free[c], lent[c]));
      kmax = std::min<int64_t>(kmax, rb - 1);

      double rest = 0.0;
      for (const auto& kv : D.parts)
        if (kv.first != rid) rest += model_.blocks_time(kv.second.blocks);
      if (!attn_known[c]) {
        double s = 0.0;
        for (const auto& kv : C.parts) s += model_.blocks_time(kv.second.blocks);
        attn[c] = s;
        attn_known[c] = 1;
      }
      auto on_c = C.parts.find(rid);
      const int64_t prc = on_c == C.parts.end() ? 0 : on_c->second.blocks;
      const double crest = attn[c] - model_.blocks_time(prc);
      const double tw = model_.blocks_time(D.waiting_blocks);
      const int64_t free_d = free[d];

      const double dense_c = model_.dense_time(double(C.batch_size));
      int64_t dense_d_for = -1;  // the debtor's dense time depends on k only through a(k)
      double dense_d = 0.0;
      double local = 0.0, remote = 0.0;
      auto pair_tps = [&](int64_t k) {
        int64_t a = std::min<int64_t>(D.num_waiting, (free_d + k) / D.waiting_blocks);
        if (a != dense_d_for) {
          dense_d = model_.dense_time(double(D.batch_size + a));
          dense_d_for = a;
        }
        local = rest + model_.blocks_time(rb - k) + double(a) * tw;
        remote = model_.blocks_time(prc + k);
        return model_.tokens_per_s_with(double(D.batch_size + a), dense_d, local) +
               model_.tokens_per_s_with(double(C.batch_size), dense_c, crest + remote);
      };
      double best = pair_tps(0);
      int64_t best_k = 0;
      double best_remote = 0.0;
      for (int64_t k = 1; k <= kmax; ++k) {
        double total = pair_tps(k);
        if (remote <= local && total > best) {
          best = total;
          best_k = k;
          best_remote = remote;
        }
      }
      if (best_k == 0) continue;

      out.push_back(PlanMove{rid, static_cast<int32_t>(best_k), D.id, C.id, MOVE_SPREAD});
      budget -= best_k;
      const Key old_key{-int64_t(free[c]), C.load(), c};
      ranked.erase(old_key);
      ranked_by_host[C.host].erase(old_key);
      free[c] -= static_cast<int32_t>(best_k);
      lent[c] += static_cast<int32_t>(best_k);
      attn[c] = crest + best_remote;
      if (C.lendable_with(free[c], lent[c]) > 0) {
        const Key new_key{-int64_t(free[c]), C.load(), c};
        ranked.insert(new_key);
        ranked_by_host[C.host].insert(new_key);
      }
    }

    // ---- 2. bring home --------------------------------------------------------------------
    if (budget <= 0) return;
    std::vector<std::pair<int64_t, int32_t>> homes;  // (-blocks away, position)
    for (int32_t i = 0; i < n; ++i) {
      const LedgerInstance& x = *inst[i];
      if (x.num_waiting == 0 && x.away_blocks > 0 && free[i] - home_headroom_ > 0)
        homes.emplace_back(-x.away_blocks, i);
    }
    std::sort(homes.begin(), homes.end());
    std::vector<std::pair<int64_t, int64_t>> reqs;   // (-blocks away, request)
    std::vector<std::pair<int64_t, int32_t>> holders;  // (-blocks, instance id)
    for (const auto& home : homes) {
      if (budget <= 0) break;
      const LedgerInstance& H = *inst[home.second];
      int64_t room = free[home.second] - home_headroom_;
      reqs.clear();
      for (int64_t r : H.homed_away) {
        const LedgerRequest& req = *ledger.request(r);
        reqs.emplace_back(-(req.total - req.on(H.id)), r);
      }
      std::sort(reqs.begin(), reqs.end());
      for (const auto& rq : reqs) {
        if (room <= 0 || budget <= 0) break;
        holders.clear();
        for (const auto& kv : ledger.request(rq.second)->placement)
          if (kv.first != H.id) holders.emplace_back(-int64_t(kv.second), kv.first);
        std::sort(holders.begin(), holders.end());
        for (const auto& holder : holders) {
          int64_t m = std::min(std::min(-holder.first, room), budget);
          if (m <= 0) break;
          out.push_back(PlanMove{rq.second, static_cast<int32_t>(m), holder.second, H.id, MOVE_HOME});
          room -= m;
          budget -= m;
          free[home.second] -= static_cast<int32_t>(m);
        }
      }
    }
  }

  const ThroughputModel& model() const { return model_; }
  int64_t max_moves_per_step() const { return max_moves_; }
  int64_t home_headroom() const { return home_headroom_; }

 private:
  ThroughputModel model_;
  int64_t max_moves_ = 0;
  int64_t home_headroom_ = 0;
};

}  // namespace infinillm

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif
