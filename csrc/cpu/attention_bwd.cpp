// CPU backward of prefix attention (FlashAttention-2 recomputation scheme, deterministic):
//   1. delta[b, h, i] = sum_d dout * out
//   2. dq: per (row, kv head, query tile), loop over the visible key tiles (as the forward).
//   3. dk/dv: one work item per own key tile (row, kv head, tile) and one per prefix tile
//      (bank entry, kv head, tile); a prefix item loops over every row that selects its entry
//      in increasing row order. Each item owns its output rows: no atomics, no races, and the
//      summation order does not depend on the thread count or schedule.
// Fused path (fused_bwd_chosen: enough (row, kv head) pairs): steps 2 and 3 in one pass with
// one item per (row, kv head) that owns dq of its queries and dk/dv of its own keys, the prefix
// gradient as per-row partials reduced in row order; 5 GEMMs per tile pair instead of 7.
#include "attention_cpu.h"
#include "attention_tiles.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <cstdlib>
#include <cstring>
#include <vector>

namespace prefix_attn::cpu {
namespace {

// Scratch of one worker: a query tile (scaled q, dout, lse, delta) and score-sized buffers.
struct BwdWork {
  int64_t R = 0, D, ldS;  // ldS: row stride of S, dP, T
  float *Qs, *dO, *lse, *delta, *S, *dP, *T, *Kb, *Vb, *acc0, *acc1;
};

template <typename T>
struct BwdCall {
  const AttnParams& p;
  const T* dout;
  const float* lse;
  const float* delta;

  // Loads the query tile (b, kv head g, queries [q0, q0 + bm)) into w; R = G * bm rows.
  void load_queries(BwdWork& w, int64_t b, int64_t g, int64_t q0, int64_t bm) const {
    const T* q = static_cast<const T*>(p.q);
    const int64_t G = p.G, D = p.D;
    w.R = G * bm;
    for (int64_t hh = 0; hh < G; ++hh) {
      const int64_t h = g * G + hh;
      const T* src = q + b * p.q_s[0] + h * p.q_s[1] + q0 * p.q_s[2];
      load_rows(w.Qs + hh * bm * D, src, p.q_s[2], bm, D, p.scale);
      const int64_t row0 = (b * p.Hq + h) * p.Sq + q0;
      load_rows(w.dO + hh * bm * D, dout + row0 * D, D, bm, D, 1.f);
      std::copy(lse + row0, lse + row0 + bm, w.lse + hh * bm);
      std::copy(delta + row0, delta + row0 + bm, w.delta + hh * bm);
    }
  }

  // S <- P (probabilities), dP <- dS (gradient of the pre-scale scores) for one key tile.
  void scores_to_grads(BwdWork& w, const float* K, int64_t ldk, const float* V, int64_t ldv,
                       int64_t bn, const OwnKeys* own, int64_t q0, int64_t bm, int64_t j0) const {
    const int64_t R = w.R, D = w.D;
    gemm_rm(false, true, R, bn, D, 1.f, w.Qs, D, K, ldk, 0.f, w.S, w.ldS);
    const bool capped = p.softcap > 0.f;
    if (capped) apply_softcap(w.S, w.ldS, R, bn, p.softcap, w.T);
    if (own) own->apply(w.S, w.ldS, p.G, q0, bm, j0, bn);
    gemm_rm(false, true, R, bn, D, 1.f, w.dO, D, V, ldv, 0.f, w.dP, w.ldS);
    for (int64_t r = 0; r < R; ++r) {
      float* s = w.S + r * w.ldS;
      float* dp = w.dP + r * w.ldS;
      const float l = w.lse[r], dl = w.delta[r];
      if (l == kNegInf) {  // the query saw no key: no gradient
        std::fill(s, s + bn, 0.f);
        std::fill(dp, dp + bn, 0.f);
        continue;
      }
      probs_and_dscores(s, dp, bn, l, dl);
      if (capped) {
        const float* t = w.T + r * w.ldS;
        for (int64_t jj = 0; jj < bn; ++jj) dp[jj] *= 1.f - t[jj] * t[jj];
      }
    }
  }
};

// The fused backward holds all queries of one (row, kv head) in fp32 (3 copies) and a prefix
// gradient partial per (row, kv head) (2 * B * Hkv * P * D fp32, reduced per entry after), so
// it runs when there are enough (row, kv head) items for the cores (a shape rule: results do
// not depend on the thread count) and both stay moderate (at B 32, Hkv 4, P 2048, D 64 the
// partials took 147 MB for a 4 MB gradient, and the split path was not slower);
// PREFIX_ATTN_CPU_BWD=fused|split forces a path (tests).
bool fused_bwd_chosen(const AttnParams& p, int64_t bm) {
  if (const char* env = std::getenv("PREFIX_ATTN_CPU_BWD"); env && *env) {
    if (std::strcmp(env, "fused") == 0) return true;
    if (std::strcmp(env, "split") == 0) return false;
    TORCH_CHECK_VALUE(false, "environment variable PREFIX_ATTN_CPU_BWD='", env,
                      "': expected one of fused, split (or unset)");
  }
  const int64_t rows_all = ((p.Sq + bm - 1) / bm) * bm * p.G;
  return p.B * p.Hkv >= 4 && rows_all * p.D <= (int64_t{1} << 22) &&
         2 * p.B * p.Hkv * p.P * p.D <= (int64_t{1} << 23);
}

template <typename T>
void bwd_impl(const AttnParams& p, const T* dout, const T* out, const float* lse,
              const float* dlse, float* delta, T* dq, T* dk, T* dv, T* dpk, T* dpv) {
  const TileSizes ts = tile_sizes();
  const int64_t kBlockM = ts.bwd_m, kBlockN = ts.bwd_n;
  const int64_t G = p.G, D = p.D, Rmax = G * kBlockM;
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  const T* pk = static_cast<const T*>(p.pk);
  const T* pv = static_cast<const T*>(p.pv);

  // -- 1. delta = rowsum(dout * out) - dlse (d lse_i / d s_ij = P_ij: Delta's term, minus) ----
  const int64_t n_rows = p.B * p.Hq * p.Sq;
  at::parallel_for(0, n_rows, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float acc = 0.f;
      for (int64_t c = 0; c < D; ++c) acc += to_float(dout[r * D + c]) * to_float(out[r * D + c]);
      delta[r] = dlse ? acc - dlse[r] : acc;
    }
  });
  const BwdCall<T> call{p, dout, lse, delta};
  auto make_work = [&](Scratch& a, Scratch& b) {
    BwdWork w;
    w.D = D;
    w.ldS = kBlockN;
    float* x = a.ptr;
    w.Qs = x, x += Rmax * D;
    w.dO = x, x += Rmax * D;
    w.lse = x, x += Rmax;
    w.delta = x, x += Rmax;
    w.S = x, x += Rmax * kBlockN;
    w.dP = x, x += Rmax * kBlockN;
    w.T = x, x += Rmax * kBlockN;
    float* y = b.ptr;
    w.Kb = y, y += kBlockN * D;
    w.Vb = y, y += kBlockN * D;
    w.acc0 = y, y += std::max(Rmax, kBlockN) * D;
    w.acc1 = y;
    return w;
  };
  const int64_t scratch_a = 2 * Rmax * D + 2 * Rmax + 3 * Rmax * kBlockN;
  const int64_t scratch_b = 2 * kBlockN * D + 2 * std::max(Rmax, kBlockN) * D;

  // -- 2'. fused path: one item per (row, kv head) owns dq of all its queries, dk/dv of its
  //    own keys and a per-row partial of the prefix gradient (summed over rows afterwards,
  //    in row order): 5 GEMMs per tile pair instead of 7, and still deterministic.
  if (fused_bwd_chosen(p, kBlockM)) {
    const int64_t n_bg = p.B * p.Hkv, n_qt = (p.Sq + kBlockM - 1) / kBlockM;
    const int64_t rows_all = n_qt * Rmax;  // query tile qt at rows [qt * Rmax, ...)
    std::vector<float> dpart(static_cast<size_t>(2 * n_bg * p.P * D), 0.f);
    run_items(n_bg, [&](std::atomic<int64_t>& next) {
      Scratch a(scratch_a), bscr(scratch_b), qa(3 * rows_all * D + 2 * rows_all);
      BwdWork w = make_work(a, bscr);
      float* Qall = qa.ptr;
      float* dOall = Qall + rows_all * D;
      float* dQall = dOall + rows_all * D;
      float* lse_all = dQall + rows_all * D;
      float* dl_all = lse_all + rows_all;
      auto tile_work = [&](int64_t qt) {
        BwdWork t = w;
        t.Qs = Qall + qt * Rmax * D;
        t.dO = dOall + qt * Rmax * D;
        t.lse = lse_all + qt * Rmax;
        t.delta = dl_all + qt * Rmax;
        return t;
      };
      for (int64_t it; (it = next.fetch_add(1)) < n_bg;) {
        const int64_t b = it / p.Hkv, g = it % p.Hkv;
        for (int64_t qt = 0; qt < n_qt; ++qt) {
          BwdWork t = tile_work(qt);
          const int64_t q0 = qt * kBlockM;
          call.load_queries(t, b, g, q0, std::min(kBlockM, p.Sq - q0));
        }
        std::fill(dQall, dQall + rows_all * D, 0.f);
        float* dK = w.acc0;
        float* dV = w.acc1;
        // dK/dV of one key tile over query tiles [qt_lo, qt_hi); adds dS K into their dQ
        auto key_tile_grads = [&](const float* K, int64_t ldk, const float* V, int64_t ldv,
                                  int64_t bn, const OwnKeys* own, int64_t j0, int64_t qt_lo,
                                  int64_t qt_hi) {
          std::fill(dK, dK + bn * D, 0.f);
          std::fill(dV, dV + bn * D, 0.f);
          for (int64_t qt = qt_lo; qt < qt_hi; ++qt) {
            BwdWork t = tile_work(qt);
            const int64_t q0 = qt * kBlockM, bm = std::min(kBlockM, p.Sq - q0);
            t.R = G * bm;
            const bool masked = own != nullptr && own->needs_mask(q0, bm, j0, bn);
            call.scores_to_grads(t, K, ldk, V, ldv, bn, masked ? own : nullptr, q0, bm, j0);
            gemm_rm(true, false, bn, D, t.R, 1.f, t.S, t.ldS, t.dO, D, 1.f, dV, D);
            gemm_rm(true, false, bn, D, t.R, 1.f, t.dP, t.ldS, t.Qs, D, 1.f, dK, D);
            gemm_rm(false, false, t.R, D, bn, 1.f, t.dP, t.ldS, K, ldk, 1.f,
                    dQall + qt * Rmax * D, D);
          }
        };
        // prefix tiles of the row's entry: seen by every query, no mask
        const int64_t n = p.ids[b], L = p.lens[n];
        for (int64_t j0 = 0; j0 < L; j0 += kBlockN) {
          const int64_t bn = std::min(kBlockN, L - j0);
          const auto [K, ldk, V, ldv] =
              kv_tile(pk, p.pk_s, pv, p.pv_s, n, g, j0, bn, D, w.Kb, w.Vb);
          key_tile_grads(K, ldk, V, ldv, bn, nullptr, j0, 0, n_qt);
          float* part = dpart.data() + (it * p.P + j0) * D;
          std::copy(dK, dK + bn * D, part);
          std::copy(dV, dV + bn * D, part + n_bg * p.P * D);
        }
        // own key tiles: only the query tiles that see some key of the tile
        const OwnKeys own(p, b);
        for (int64_t j0 = 0; j0 < p.Skv; j0 += kBlockN) {
          const int64_t bn = std::min(kBlockN, p.Skv - j0);
          if (own.all_padding(j0, bn)) continue;  // dk/dv rows stay zero
          int64_t ilo, ihi;
          own.query_range(j0, bn, &ilo, &ihi);
          if (ilo >= ihi) continue;
          const auto [K, ldk, V, ldv] = kv_tile(k, p.k_s, v, p.v_s, b, g, j0, bn, D, w.Kb, w.Vb);
          key_tile_grads(K, ldk, V, ldv, bn, &own, j0, ilo / kBlockM,
                         (ihi + kBlockM - 1) / kBlockM);
          for (int64_t jj = 0; jj < bn; ++jj) {
            const int64_t off = ((b * p.Hkv + g) * p.Skv + j0 + jj) * D;
            store_row(dk + off, dK + jj * D, D, 1.f);
            store_row(dv + off, dV + jj * D, D, 1.f);
          }
        }
        for (int64_t qt = 0; qt < n_qt; ++qt) {
          const int64_t q0 = qt * kBlockM, bm = std::min(kBlockM, p.Sq - q0);
          for (int64_t hh = 0; hh < G; ++hh) {
            for (int64_t ii = 0; ii < bm; ++ii) {
              const int64_t row = (b * p.Hq + g * G + hh) * p.Sq + q0 + ii;
              store_row(dq + row * D, dQall + (qt * Rmax + hh * bm + ii) * D, D, p.scale);
            }
          }
        }
      }
    });
    // prefix gradient: per (entry, kv head), the rows' partials summed in row order
    at::parallel_for(0, p.N * p.Hkv, 1, [&](int64_t e0, int64_t e1) {
      std::vector<float> acc(static_cast<size_t>(2 * p.P * D));
      for (int64_t e = e0; e < e1; ++e) {
        const int64_t n = e / p.Hkv, g = e % p.Hkv, L = p.lens[n];
        if (L <= 0) continue;  // gradient stays zero
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t b = 0; b < p.B; ++b) {
          if (p.ids[b] != n) continue;
          const float* part = dpart.data() + (b * p.Hkv + g) * p.P * D;
          for (int64_t x = 0; x < L * D; ++x) {
            acc[x] += part[x];
            acc[p.P * D + x] += part[n_bg * p.P * D + x];
          }
        }
        for (int64_t j = 0; j < L; ++j) {
          const int64_t off = ((n * p.Hkv + g) * p.P + j) * D;
          store_row(dpk + off, acc.data() + j * D, D, 1.f);
          store_row(dpv + off, acc.data() + (p.P + j) * D, D, 1.f);
        }
      }
    });
    return;
  }

  // -- 2. dq, per query tile ----
  const int64_t n_qt = (p.Sq + kBlockM - 1) / kBlockM, n_bg = p.B * p.Hkv;
  run_items(n_bg * n_qt, [&](std::atomic<int64_t>& next) {
    Scratch a(scratch_a), bscr(scratch_b);
    BwdWork w = make_work(a, bscr);
    for (int64_t it; (it = next.fetch_add(1)) < n_bg * n_qt;) {
      const int64_t qt = n_qt - 1 - it / n_bg;
      const int64_t bg = it % n_bg, b = bg / p.Hkv, g = bg % p.Hkv;
      const int64_t q0 = qt * kBlockM, bm = std::min(kBlockM, p.Sq - q0);
      call.load_queries(w, b, g, q0, bm);
      float* dQ = w.acc0;
      std::fill(dQ, dQ + w.R * D, 0.f);
      // keys [j0, j0 + bn) of slice `outer` (row or entry) of the pair kk, vv
      auto tile = [&](const T* kk, const int64_t* ks, const T* vv, const int64_t* vs,
                      int64_t outer, int64_t j0, int64_t bn, const OwnKeys* own) {
        const KVTile t = kv_tile(kk, ks, vv, vs, outer, g, j0, bn, D, w.Kb, w.Vb);
        call.scores_to_grads(w, t.K, t.ldk, t.V, t.ldv, bn, own, q0, bm, j0);
        gemm_rm(false, false, w.R, D, bn, 1.f, w.dP, kBlockN, t.K, t.ldk, 1.f, dQ, D);
      };
      const int64_t n = p.ids[b], L = p.lens[n];
      for (int64_t j0 = 0; j0 < L; j0 += kBlockN)
        tile(pk, p.pk_s, pv, p.pv_s, n, j0, std::min(kBlockN, L - j0), nullptr);
      const OwnKeys own(p, b);
      int64_t lo, hi;
      own.key_range(q0, bm, &lo, &hi);
      for (int64_t j0 = lo; j0 < hi; j0 += kBlockN) {
        const int64_t bn = std::min(kBlockN, hi - j0);
        if (own.all_padding(j0, bn)) continue;
        tile(k, p.k_s, v, p.v_s, b, j0, bn, own.needs_mask(q0, bm, j0, bn) ? &own : nullptr);
      }
      for (int64_t hh = 0; hh < G; ++hh) {
        for (int64_t ii = 0; ii < bm; ++ii) {
          const int64_t row = (b * p.Hq + g * G + hh) * p.Sq + q0 + ii;
          store_row(dq + row * D, dQ + (hh * bm + ii) * D, D, p.scale);
        }
      }
    }
  });

  // -- 3. dk/dv: prefix tiles first (they loop over many rows), then own key tiles ----
  const int64_t n_pt = (p.P + kBlockN - 1) / kBlockN, n_prefix_items = p.N * p.Hkv * n_pt;
  const int64_t n_kt = (p.Skv + kBlockN - 1) / kBlockN, n_own_items = n_bg * n_kt;
  const int64_t n_items = n_prefix_items + n_own_items;
  run_items(n_items, [&](std::atomic<int64_t>& next) {
    Scratch a(scratch_a), bscr(scratch_b);
    BwdWork w = make_work(a, bscr);
    for (int64_t it; (it = next.fetch_add(1)) < n_items;) {
      float* dK = w.acc0;
      float* dV = w.acc1;
      // accumulates the query tile (b, g, q0, bm) into dK/dV of the loaded key tile
      auto queries = [&](const float* K, int64_t ldk, const float* V, int64_t ldv, int64_t bn,
                         const OwnKeys* own, int64_t b, int64_t g, int64_t q0, int64_t bm,
                         int64_t j0) {
        call.load_queries(w, b, g, q0, bm);
        call.scores_to_grads(w, K, ldk, V, ldv, bn, own, q0, bm, j0);
        gemm_rm(true, false, bn, D, w.R, 1.f, w.S, kBlockN, w.dO, D, 1.f, dV, D);
        gemm_rm(true, false, bn, D, w.R, 1.f, w.dP, kBlockN, w.Qs, D, 1.f, dK, D);
      };
      if (it < n_prefix_items) {
        const int64_t pt = it % n_pt, ng = it / n_pt, n = ng / p.Hkv, g = ng % p.Hkv;
        const int64_t j0 = pt * kBlockN, bn = std::min(kBlockN, p.lens[n] - j0);
        if (bn <= 0) continue;  // beyond the entry's length: gradient stays zero
        const auto [K, ldk, V, ldv] = kv_tile(pk, p.pk_s, pv, p.pv_s, n, g, j0, bn, D, w.Kb, w.Vb);
        std::fill(dK, dK + bn * D, 0.f);
        std::fill(dV, dV + bn * D, 0.f);
        for (int64_t b = 0; b < p.B; ++b) {
          if (p.ids[b] != n) continue;
          for (int64_t q0 = 0; q0 < p.Sq; q0 += kBlockM)
            queries(K, ldk, V, ldv, bn, nullptr, b, g, q0, std::min(kBlockM, p.Sq - q0), j0);
        }
        for (int64_t jj = 0; jj < bn; ++jj) {
          const int64_t off = ((n * p.Hkv + g) * p.P + j0 + jj) * D;
          store_row(dpk + off, dK + jj * D, D, 1.f);
          store_row(dpv + off, dV + jj * D, D, 1.f);
        }
      } else {
        const int64_t o = it - n_prefix_items;
        const int64_t kt = o / n_bg, bg = o % n_bg, b = bg / p.Hkv, g = bg % p.Hkv;
        const int64_t j0 = kt * kBlockN, bn = std::min(kBlockN, p.Skv - j0);
        const OwnKeys own(p, b);
        if (own.all_padding(j0, bn)) continue;
        int64_t ilo, ihi;
        own.query_range(j0, bn, &ilo, &ihi);
        if (ilo >= ihi) continue;
        const auto [K, ldk, V, ldv] = kv_tile(k, p.k_s, v, p.v_s, b, g, j0, bn, D, w.Kb, w.Vb);
        std::fill(dK, dK + bn * D, 0.f);
        std::fill(dV, dV + bn * D, 0.f);
        for (int64_t q0 = ilo; q0 < ihi; q0 += kBlockM) {
          const int64_t bm = std::min(kBlockM, ihi - q0);
          queries(K, ldk, V, ldv, bn, own.needs_mask(q0, bm, j0, bn) ? &own : nullptr, b, g, q0,
                  bm, j0);
        }
        for (int64_t jj = 0; jj < bn; ++jj) {
          const int64_t off = ((b * p.Hkv + g) * p.Skv + j0 + jj) * D;
          store_row(dk + off, dK + jj * D, D, 1.f);
          store_row(dv + off, dV + jj * D, D, 1.f);
        }
      }
    }
  });
}

template <typename T>
void dispatch_bwd(const AttnParams& p, const at::Tensor& dout, const at::Tensor& out,
                  const at::Tensor& lse, const float* dlse, at::Tensor& delta, at::Tensor& dq,
                  at::Tensor& dk, at::Tensor& dv, at::Tensor& dpk, at::Tensor& dpv) {
  bwd_impl<T>(p, dout.data_ptr<T>(), out.data_ptr<T>(), lse.data_ptr<float>(), dlse,
              delta.data_ptr<float>(), dq.data_ptr<T>(), dk.data_ptr<T>(), dv.data_ptr<T>(),
              dpk.data_ptr<T>(), dpv.data_ptr<T>());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const AttnParams& p, const at::Tensor& dout, const at::Tensor& out, const at::Tensor& lse,
    const c10::optional<at::Tensor>& dlse_opt, const at::Tensor& q) {
  TORCH_CHECK(dout.is_contiguous() && out.is_contiguous() && lse.is_contiguous() &&
                  (!dlse_opt.has_value() || dlse_opt->is_contiguous()),
              "prefix_attn: internal error, dout/out/lse/dlse must be contiguous here");
  const float* dlse = dlse_opt.has_value() ? dlse_opt->data_ptr<float>() : nullptr;
  const auto opts = q.options();
  auto dq = at::empty({p.B, p.Hq, p.Sq, p.D}, opts);  // every row written by the dq pass
  auto dk = at::zeros({p.B, p.Hkv, p.Skv, p.D}, opts);
  auto dv = at::zeros({p.B, p.Hkv, p.Skv, p.D}, opts);
  auto dpk = at::zeros({p.N, p.Hkv, p.P, p.D}, opts);
  auto dpv = at::zeros({p.N, p.Hkv, p.P, p.D}, opts);
  auto delta = at::empty({p.B * p.Hq * p.Sq}, opts.dtype(at::kFloat));
  switch (q.scalar_type()) {
    case at::kFloat:
      dispatch_bwd<float>(p, dout, out, lse, dlse, delta, dq, dk, dv, dpk, dpv);
      break;
    case at::kHalf:
      dispatch_bwd<c10::Half>(p, dout, out, lse, dlse, delta, dq, dk, dv, dpk, dpv);
      break;
    case at::kBFloat16:
      dispatch_bwd<c10::BFloat16>(p, dout, out, lse, dlse, delta, dq, dk, dv, dpk, dpv);
      break;
    default:
      TORCH_CHECK(false, "prefix_attn: unsupported dtype ", q.scalar_type());
  }
  return {dq, dk, dv, dpk, dpv};
}

}  // namespace prefix_attn::cpu
