// CPU cascade forward for short query blocks (decode, Sq <= kCascadeMaxSq by default).
//
// The prefix part is computed per bank entry, not per row: the queries of every row that
// selects entry n (all query heads of one kv head, all Sq positions) form one [rows, D]
// matrix, multiplied against the entry's tiles (one GEMM per tile for all of them), so each
// entry is read once per kCascadeRows such rows instead of once per row. The own-KV part is computed per
// (row, kv head, query tile) as in the tiled forward. Both parts may be split along the keys
// (split-KV) so that a single long row still keeps every core busy. Each part leaves
// (unnormalised O, running max m, sum l); a final pass merges the parts of every query
// exactly through their log-sum-exp, in a fixed order. The path and the splits follow the
// shape alone (not torch.get_num_threads()): results are bitwise equal at any thread count.
#include "attention_cpu.h"
#include "attention_tiles.h"

#include <ATen/ops/empty.h>

#include <cstdlib>
#include <cstring>
#include <vector>

namespace prefix_attn::cpu {

// Path rule (measured in bench/bench_decode.py, results in bench/results/decode_cpu.md):
// query blocks up to kCascadeMaxSq take the cascade when a bank entry is shared by two or
// more rows and a row brings at most kCascadeMaxPackedRows query rows per kv head (G * Sq),
// or when per-row work items are too few for the threads (split-KV); otherwise, and for
// longer query blocks (prefill), the per-row tiled forward runs.
constexpr int64_t kCascadeMaxSq = 16;
// Query rows per prefix work item (one GEMM operand: large enough for BLAS efficiency): an
// entry is read once per kCascadeRows packed query rows (rows x G x Sq) of its users.
constexpr int64_t kCascadeRows = 256;
// The per-row tiles already share each prefix tile among the G * Sq query rows of one (row,
// kv head): at G * Sq >= 32 they were faster than the cascade in 35 of 39 timings (per-row /
// cascade 0.50-0.98; 1.00, 1.01, 1.03 and 1.35 once each), at G * Sq <= 16 the two were even
// (0.90-1.35) on a shared 2048-token prefix (1 thread, B 8, three runs of bench_decode.py's
// G x Sq table on a loaded 2-core machine, 2026-12-06).
constexpr int64_t kCascadeMaxPackedRows = 16;
// Upper bound on the key splits of one part.
constexpr int64_t kMaxSplits = 16;
// Work items the split-KV aims at, and the per-row items below which the cascade's split-KV
// is taken for rows that share nothing: constants planned for up to 8 threads (4 and 2 items a
// thread), not the thread count, whose every change (torch.set_num_threads, a DataLoader
// worker's one thread, OMP_NUM_THREADS) changed the splits and so the output's last bits.
constexpr int64_t kSplitTarget = 32;
constexpr int64_t kMinRowItems = 16;

bool cascade_chosen(const AttnParams& p) {
  // PREFIX_ATTN_CPU_PATH=cascade|rows forces a path (tests, benchmarks).
  if (const char* env = std::getenv("PREFIX_ATTN_CPU_PATH"); env && *env) {
    if (std::strcmp(env, "cascade") == 0) return true;
    if (std::strcmp(env, "rows") == 0) return false;
    TORCH_CHECK_VALUE(false, "environment variable PREFIX_ATTN_CPU_PATH='", env,
                      "': expected one of cascade, rows (or unset)");
  }
  if (p.Sq > kCascadeMaxSq) return false;
  // An entry shared by several rows: the cascade reads it once per kCascadeRows packed rows.
  if (p.G * p.Sq <= kCascadeMaxPackedRows) {
    std::vector<int64_t> users(p.N, 0);
    for (int64_t b = 0; b < p.B; ++b)
      if (p.lens[p.ids[b]] > 0 && ++users[p.ids[b]] >= 2) return true;
  }
  // Every row alone with its prefix: per-row tiles (less set-up), unless they are too few to
  // keep the threads busy, where the cascade's split-KV helps.
  const int64_t row_items = p.B * p.Hkv * ((p.Sq + kBlockM - 1) / kBlockM);
  return row_items < kMinRowItems;
}

namespace {

// Splits needed so that base_items * splits >= target, bounded by the tiles to split.
int64_t choose_splits(int64_t base_items, int64_t tiles, int64_t target) {
  if (base_items <= 0) return 0;
  const int64_t want = (target + base_items - 1) / base_items;
  return std::clamp<int64_t>(want, 1, std::clamp<int64_t>(tiles, 1, kMaxSplits));
}

template <typename T>
void cascade_impl(const AttnParams& p, T* out, float* lse) {
  const int64_t G = p.G, D = p.D, Sq = p.Sq;
  const int64_t n_rows = p.B * p.Hq * Sq;
  if (n_rows == 0) return;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  const T* pk = static_cast<const T*>(p.pk);
  const T* pv = static_cast<const T*>(p.pv);

  // -- rows grouped by bank entry (increasing row order inside a group) ----
  std::vector<std::vector<int64_t>> rows_of(p.N);
  for (int64_t b = 0; b < p.B; ++b)
    if (p.lens[p.ids[b]] > 0) rows_of[p.ids[b]].push_back(b);
  const int64_t rows_per_b = G * Sq;  // query rows one batch row brings per kv head
  const int64_t chunk_b = std::max<int64_t>(1, kCascadeRows / rows_per_b);
  struct PrefixItem {
    int64_t n, g, c0, c1;  // entry, kv head, range [c0, c1) of rows_of[n]
  };
  std::vector<PrefixItem> prefix_items;
  int64_t max_prefix_tiles = 0;
  for (int64_t n = 0; n < p.N; ++n) {
    const auto& rows = rows_of[n];
    if (rows.empty()) continue;
    max_prefix_tiles = std::max(max_prefix_tiles, (p.lens[n] + kBlockN - 1) / kBlockN);
    for (int64_t g = 0; g < p.Hkv; ++g)
      for (int64_t c0 = 0; c0 < static_cast<int64_t>(rows.size()); c0 += chunk_b)
        prefix_items.push_back({n, g, c0, std::min<int64_t>(c0 + chunk_b, rows.size())});
  }
  const int64_t n_qt = (Sq + kBlockM - 1) / kBlockM;
  const int64_t n_own = p.B * p.Hkv * n_qt;
  const int64_t ps = choose_splits(prefix_items.size(), max_prefix_tiles, kSplitTarget);
  const int64_t os = choose_splits(n_own, (p.Skv + kBlockN - 1) / kBlockN, kSplitTarget);
  const int64_t n_parts = ps + os;

  // -- partial results: part x row -> O [D], m, l (l == 0: the part saw no key) ----
  auto part_o = at::empty({n_parts * n_rows * D}, at::kFloat);
  auto part_ml = at::empty({2 * n_parts * n_rows}, at::kFloat);
  float* pO = part_o.data_ptr<float>();
  float* pM = part_ml.data_ptr<float>();
  float* pL = pM + n_parts * n_rows;
  std::fill(pM, pM + n_parts * n_rows, kNegInf);
  std::fill(pL, pL + n_parts * n_rows, 0.f);

  const int64_t n_prefix_work = static_cast<int64_t>(prefix_items.size()) * ps;
  const int64_t n_items = n_prefix_work + n_own * os;
  const int64_t Rmax = std::max({kCascadeRows, rows_per_b, G * kBlockM});
  run_items(n_items, [&](std::atomic<int64_t>& next) {
    Scratch qs(Rmax * D), s(Rmax * kBlockN), o(Rmax * D), ml(2 * Rmax), kb(kBlockN * D),
        vb(kBlockN * D);
    std::vector<int64_t> orow(Rmax);
    for (int64_t it; (it = next.fetch_add(1)) < n_items;) {
      int64_t R = 0, part = 0;
      TileState st{0, D, qs.ptr, s.ptr, o.ptr, ml.ptr, ml.ptr + Rmax, kb.ptr, vb.ptr};
      auto start = [&](int64_t rows) {
        R = st.R = rows;
        std::fill(st.O, st.O + R * D, 0.f);
        std::fill(st.m, st.m + R, kNegInf);
        std::fill(st.l, st.l + R, 0.f);
      };
      if (it < n_prefix_work) {
        // -- one entry's tiles [t0, t1) against the queries of all its rows ----
        const PrefixItem& pi = prefix_items[it / ps];
        const int64_t split = it % ps, L = p.lens[pi.n];
        const int64_t tiles = (L + kBlockN - 1) / kBlockN;
        const int64_t t0 = split * tiles / ps, t1 = (split + 1) * tiles / ps;
        if (t0 == t1) continue;
        const auto& rows = rows_of[pi.n];
        start((pi.c1 - pi.c0) * rows_per_b);
        for (int64_t c = pi.c0; c < pi.c1; ++c) {
          const int64_t b = rows[c];
          for (int64_t hh = 0; hh < G; ++hh) {
            const int64_t h = pi.g * G + hh, r0 = ((c - pi.c0) * G + hh) * Sq;
            load_rows(st.Qs + r0 * D, q + b * p.q_s[0] + h * p.q_s[1], p.q_s[2], Sq, D,
                      p.scale);
            for (int64_t ii = 0; ii < Sq; ++ii) orow[r0 + ii] = (b * p.Hq + h) * Sq + ii;
          }
        }
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t j0 = t * kBlockN, bn = std::min(kBlockN, L - j0);
          const auto [K, ldk, V, ldv] =
              kv_tile(pk, p.pk_s, pv, p.pv_s, pi.n, pi.g, j0, bn, D, st.Kb, st.Vb);
          fold_tile(st, K, ldk, V, ldv, bn, p, nullptr, G, 0, Sq, j0);
        }
        part = split;
      } else {
        // -- one row's own keys, split [t0, t1) of the tiles its query tile may see ----
        const int64_t o_it = it - n_prefix_work, split = o_it % os, base = o_it / os;
        const int64_t qt = base % n_qt, bg = base / n_qt, b = bg / p.Hkv, g = bg % p.Hkv;
        const int64_t q0 = qt * kBlockM, bm = std::min(kBlockM, Sq - q0);
        const OwnKeys own(p, b);
        int64_t lo, hi;
        own.key_range(q0, bm, &lo, &hi);
        const int64_t tiles = (hi - lo + kBlockN - 1) / kBlockN;
        const int64_t t0 = split * tiles / os, t1 = (split + 1) * tiles / os;
        if (t0 >= t1) continue;
        start(G * bm);
        for (int64_t hh = 0; hh < G; ++hh) {
          const int64_t h = g * G + hh;
          load_rows(st.Qs + hh * bm * D, q + b * p.q_s[0] + h * p.q_s[1] + q0 * p.q_s[2],
                    p.q_s[2], bm, D, p.scale);
          for (int64_t ii = 0; ii < bm; ++ii) orow[hh * bm + ii] = (b * p.Hq + h) * Sq + q0 + ii;
        }
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t j0 = lo + t * kBlockN, bn = std::min(kBlockN, hi - j0);
          if (own.all_padding(j0, bn)) continue;
          const auto [K, ldk, V, ldv] =
              kv_tile(k, p.k_s, v, p.v_s, b, g, j0, bn, D, st.Kb, st.Vb);
          const bool masked = own.needs_mask(q0, bm, j0, bn);
          fold_tile(st, K, ldk, V, ldv, bn, p, masked ? &own : nullptr, G, q0, bm, j0);
        }
        part = ps + split;
      }
      for (int64_t r = 0; r < R; ++r) {
        const int64_t idx = part * n_rows + orow[r];
        std::memcpy(pO + idx * D, st.O + r * D, D * sizeof(float));
        pM[idx] = st.m[r];
        pL[idx] = st.l[r];
      }
    }
  });

  // -- merge the parts of every query through their log-sum-exp ----
  at::parallel_for(0, n_rows, 64, [&](int64_t r0, int64_t r1) {
    std::vector<float> acc(D);
    for (int64_t r = r0; r < r1; ++r) {
      float m = kNegInf;
      for (int64_t part = 0; part < n_parts; ++part) {
        const int64_t idx = part * n_rows + r;
        if (pL[idx] > 0.f) m = std::max(m, pM[idx]);
      }
      if (m == kNegInf) {  // no visible key at all
        std::fill(out + r * D, out + (r + 1) * D, static_cast<T>(0.f));
        lse[r] = kNegInf;
        continue;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      float l = 0.f;
      for (int64_t part = 0; part < n_parts; ++part) {
        const int64_t idx = part * n_rows + r;
        if (!(pL[idx] > 0.f)) continue;
        const float w = std::exp(pM[idx] - m);
        l += pL[idx] * w;
        const float* src = pO + idx * D;
        for (int64_t c = 0; c < D; ++c) acc[c] += w * src[c];
      }
      store_row(out + r * D, acc.data(), D, 1.f / l);
      lse[r] = m + std::log(l);
    }
  });
}

}  // namespace

void cascade_fwd(const AttnParams& p, at::ScalarType dtype, void* out, float* lse) {
  switch (dtype) {
    case at::kFloat:
      cascade_impl<float>(p, static_cast<float*>(out), lse);
      break;
    case at::kHalf:
      cascade_impl<c10::Half>(p, static_cast<c10::Half*>(out), lse);
      break;
    case at::kBFloat16:
      cascade_impl<c10::BFloat16>(p, static_cast<c10::BFloat16*>(out), lse);
      break;
    default:
      TORCH_CHECK(false, "prefix_attn: unsupported dtype ", dtype);
  }
}

}  // namespace prefix_attn::cpu
