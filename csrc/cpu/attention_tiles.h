// Building blocks shared by the CPU forward and backward kernels: call parameters, per-worker
// scratch memory, a row-major fp32 GEMM on BLAS, a vectorisable exp, tile loads with dtype
// conversion, and the visibility rules (causal / window / key padding) for one tile.
//
// Layout conventions: a "query tile" holds BM consecutive queries of every query head of one
// kv head (GQA group of G heads), stored as R = G * bm rows, row r = hh * bm + ii. A "key tile"
// holds up to BN consecutive keys of either the prefix bank entry or the row's own keys.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>

// Fortran BLAS entry point exported by the BLAS that libtorch links (MKL or OpenBLAS).
// Weak: if the running libtorch has none, gemm_rm falls back to a plain loop.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n,
                       const int* k, const float* alpha, const float* a, const int* lda,
                       const float* b, const int* ldb, const float* beta, float* c,
                       const int* ldc) __attribute__((weak));
// MKL's C entry point for the calling thread's BLAS thread count (0 = back to the global
// setting); weak for BLAS libraries without it.
extern "C" int MKL_Set_Num_Threads_Local(int n) __attribute__((weak));

namespace prefix_attn::cpu {

constexpr int64_t kBlockM = 32;  // queries per tile (per head); cascade path
constexpr int64_t kBlockN = 64;  // keys per tile; cascade path
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Pointers and element strides of one call; all tensors already checked by checks.h.
struct AttnParams {
  int64_t B, Hq, Hkv, G, Sq, Skv, D, N, P;
  const void *q, *k, *v, *pk, *pv;
  int64_t q_s[3], k_s[3], v_s[3], pk_s[3], pv_s[3];  // strides of dims 0..2 (dim 3 is 1)
  const int64_t* ids;
  const int64_t* lens;
  const bool* kpm;  // nullptr = no padding
  int64_t kpm_s[2];
  bool causal;
  float scale;
  int64_t window;  // -1 = none
  float softcap;   // 0 = none
};

// 64-byte aligned fp32 scratch owned by one worker (aligned so that BLAS takes the same
// code path on every run: bitwise reproducible results).
struct Scratch {
  float* ptr = nullptr;
  explicit Scratch(int64_t n) {
    const size_t bytes = ((static_cast<size_t>(std::max<int64_t>(n, 1)) * 4 + 63) / 64) * 64;
    ptr = static_cast<float*>(std::aligned_alloc(64, bytes));
    TORCH_CHECK(ptr != nullptr, "prefix_attn: out of memory for ", bytes, " bytes of scratch");
  }
  ~Scratch() { std::free(ptr); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
};

// BLAS takes sizes and leading dims as 32-bit ints: a larger one (a legal stride of a size-1
// dimension, 2**31) was cut, and MKL returned garbage after a message on stdout.
constexpr int64_t kMaxBlasLd = std::numeric_limits<int>::max();

// Row-major C[M,N] = alpha * op(A)[M,K] @ op(B)[K,N] + beta * C, op = transpose when t* set.
inline void gemm_rm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha,
                    const float* A, int64_t lda, const float* Bm, int64_t ldb, float beta,
                    float* C, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  if (sgemm_ != nullptr && std::max({M, N, K, lda, ldb, ldc}) <= kMaxBlasLd) {
    // A row-major matrix is its column-major transpose: C^T = op(B)^T op(A)^T.
    const char ca = ta ? 'T' : 'N', cb = tb ? 'T' : 'N';
    const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
    const int la = static_cast<int>(std::max<int64_t>(ldb, 1));
    const int lb = static_cast<int>(std::max<int64_t>(lda, 1));
    const int lc = static_cast<int>(std::max<int64_t>(ldc, 1));
    sgemm_(&cb, &ca, &m, &n, &k, &alpha, Bm, &la, A, &lb, &beta, C, &lc);
    return;
  }
  for (int64_t i = 0; i < M; ++i) {
    for (int64_t j = 0; j < N; ++j) {
      float acc = 0.f;
      for (int64_t p = 0; p < K; ++p) {
        const float a = ta ? A[p * lda + i] : A[i * lda + p];
        const float b = tb ? Bm[j * ldb + p] : Bm[p * ldb + j];
        acc += a * b;
      }
      C[i * ldc + j] = alpha * acc + (beta == 0.f ? 0.f : beta * C[i * ldc + j]);
    }
  }
}

// 8 floats as a GCC/Clang vector: compiles to one AVX register (or two SSE ones), so the
// softmax loops vectorise whatever the auto-vectoriser decides.
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

inline v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store8(float* p, v8f v) { std::memcpy(p, &v, sizeof(v)); }
inline v8f splat8(float x) { return v8f{x, x, x, x, x, x, x, x}; }

// exp(x) to ~2 ulp for x in [-87, 88]; exactly 0 below -87 (and for -inf).
inline v8f exp8(v8f x) {
  const v8f lo = splat8(-87.f), hi = splat8(88.f);
  v8f xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const v8f n = (xc * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round to nearest
  v8f r = xc - n * 0.693145751953125f;
  r = r - n * 1.428606765330187045e-06f;
  v8f p = splat8(1.f / 5040.f);
  p = p * r + 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const v8i e = (__builtin_convertvector(n, v8i) + 127) << 23;
  const v8f res = p * reinterpret_cast<const v8f&>(e);
  return x < lo ? splat8(0.f) : res;
}

// Scalar exp with the same rounding as exp8 (for the tails of rows).
inline float fast_exp(float x) { return exp8(splat8(x))[0]; }

// max(x[0..n)) with 8 independent lanes (an in-order reduction would not vectorise).
inline float row_max(const float* x, int64_t n) {
  v8f m = splat8(kNegInf);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const v8f v = load8(x + j);
    m = v > m ? v : m;
  }
  float r = kNegInf;
  for (int l = 0; l < 8; ++l) r = m[l] > r ? m[l] : r;
  for (; j < n; ++j) r = x[j] > r ? x[j] : r;
  return r;
}

// x <- exp(x - sub) in place; returns the sum (8 lanes, fixed order: deterministic).
inline float exp_sub_sum(float* x, int64_t n, float sub) {
  v8f acc = splat8(0.f);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const v8f e = exp8(load8(x + j) - sub);
    store8(x + j, e);
    acc += e;
  }
  float r = 0.f;
  for (int l = 0; l < 8; ++l) r += acc[l];
  for (; j < n; ++j) {
    const float e = fast_exp(x[j] - sub);
    x[j] = e;
    r += e;
  }
  return r;
}

// Backward, one row: P = exp(S - lse) into S, dS = P * (dP - delta) into dP.
inline void probs_and_dscores(float* s, float* dp, int64_t n, float lse, float delta) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const v8f pr = exp8(load8(s + j) - lse);
    store8(s + j, pr);
    store8(dp + j, pr * (load8(dp + j) - delta));
  }
  for (; j < n; ++j) {
    const float pr = fast_exp(s[j] - lse);
    s[j] = pr;
    dp[j] = pr * (dp[j] - delta);
  }
}

inline float to_float(float x) { return x; }
inline float to_float(c10::Half x) { return static_cast<float>(x); }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }

// dst[r, :] = src[r * ld, :] * mul for r < rows, dst row stride D.
template <typename T>
inline void load_rows(float* dst, const T* src, int64_t ld, int64_t rows, int64_t D, float mul) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* s = src + r * ld;
    float* d = dst + r * D;
    for (int64_t c = 0; c < D; ++c) d[c] = to_float(s[c]) * mul;
  }
}

template <typename T>
inline void store_row(T* dst, const float* src, int64_t D, float mul) {
  for (int64_t c = 0; c < D; ++c) dst[c] = static_cast<T>(src[c] * mul);
}

// A key tile as fp32 rows: fp32 inputs are read in place, other dtypes converted into buf.
template <typename T>
inline const float* key_tile(const T* src, int64_t ld, int64_t rows, int64_t D, float* buf,
                             int64_t* ld_out) {
  if constexpr (std::is_same_v<T, float>) {
    if (ld <= kMaxBlasLd) {  // read in place; else copied (BLAS takes a 32-bit leading dim)
      *ld_out = ld;
      return src;
    }
    load_rows(buf, src, ld, rows, D, 1.f);
    *ld_out = D;
    return buf;
  } else {
    load_rows(buf, src, ld, rows, D, 1.f);
    *ld_out = D;
    return buf;
  }
}

// Keys [j0, j0 + bn) of one slice (row b or bank entry n, kv head g) of a [*, Hkv, S, D] pair
// k, v with element strides ks, vs: K and V as fp32 tiles with leading dims ldk, ldv.
struct KVTile {
  const float* K;
  int64_t ldk;
  const float* V;
  int64_t ldv;
};

template <typename T>
inline KVTile kv_tile(const T* k, const int64_t* ks, const T* v, const int64_t* vs, int64_t outer,
                      int64_t g, int64_t j0, int64_t bn, int64_t D, float* Kb, float* Vb) {
  KVTile t;
  t.K = key_tile(k + outer * ks[0] + g * ks[1] + j0 * ks[2], ks[2], bn, D, Kb, &t.ldk);
  t.V = key_tile(v + outer * vs[0] + g * vs[1] + j0 * vs[2], vs[2], bn, D, Vb, &t.ldv);
  return t;
}

// Visibility of the own keys of row b: causal (bottom-right aligned), window, key padding.
struct OwnKeys {
  int64_t Sq, Skv, off;  // off = Skv - Sq: query i sits at key position off + i
  bool causal;
  int64_t window;
  const bool* kpm;  // row b of key_padding_mask, or nullptr
  int64_t kpm_stride;

  OwnKeys(const AttnParams& p, int64_t b)
      : Sq(p.Sq), Skv(p.Skv), off(p.Skv - p.Sq), causal(p.causal), window(p.window),
        kpm(p.kpm ? p.kpm + b * p.kpm_s[0] : nullptr), kpm_stride(p.kpm_s[1]) {}

  // Keys [lo, hi) that some query of [q0, q0 + bm) may see.
  void key_range(int64_t q0, int64_t bm, int64_t* lo, int64_t* hi) const {
    *hi = causal ? std::clamp<int64_t>(off + q0 + bm, 0, Skv) : Skv;
    *lo = window >= 0 ? std::clamp<int64_t>(off + q0 - window + 1, 0, Skv) : 0;
  }
  // Queries [lo, hi) that may see some key of [j0, j0 + bn).
  void query_range(int64_t j0, int64_t bn, int64_t* lo, int64_t* hi) const {
    *lo = causal ? std::clamp<int64_t>(j0 - off, 0, Sq) : 0;
    *hi = window >= 0 ? std::clamp<int64_t>(j0 + bn - 1 - off + window, 0, Sq) : Sq;
  }
  bool any_padding(int64_t j0, int64_t bn) const {
    if (!kpm) return false;
    for (int64_t j = j0; j < j0 + bn; ++j)
      if (!kpm[j * kpm_stride]) return true;
    return false;
  }
  bool all_padding(int64_t j0, int64_t bn) const {
    if (!kpm) return false;
    for (int64_t j = j0; j < j0 + bn; ++j)
      if (kpm[j * kpm_stride]) return false;
    return true;
  }
  // True when some (query, key) pair of the tile is hidden.
  bool needs_mask(int64_t q0, int64_t bm, int64_t j0, int64_t bn) const {
    if (causal && j0 + bn - 1 > off + q0) return true;
    if (window >= 0 && (off + q0 + bm - 1) - j0 >= window) return true;
    return any_padding(j0, bn);
  }
  // Sets S[r, jj] = -inf for hidden pairs; rows r = hh * bm + ii for hh < G.
  void apply(float* S, int64_t ldS, int64_t G, int64_t q0, int64_t bm, int64_t j0,
             int64_t bn) const {
    for (int64_t ii = 0; ii < bm; ++ii) {
      const int64_t pos = off + q0 + ii;
      // visible own keys of this query before padding, as tile columns [clo, chi)
      const int64_t chi = causal ? std::clamp<int64_t>(pos + 1 - j0, 0, bn) : bn;
      const int64_t clo = window >= 0 ? std::clamp<int64_t>(pos - window + 1 - j0, 0, bn) : 0;
      for (int64_t hh = 0; hh < G; ++hh) {
        float* row = S + (hh * bm + ii) * ldS;
        if (clo >= chi) {  // nothing of this tile visible to the query
          std::fill(row, row + bn, kNegInf);
          continue;
        }
        std::fill(row, row + clo, kNegInf);
        std::fill(row + chi, row + bn, kNegInf);
        if (kpm) {
          for (int64_t jj = clo; jj < chi; ++jj)
            if (!kpm[(j0 + jj) * kpm_stride]) row[jj] = kNegInf;
        }
      }
    }
  }
};

// Applies the softcap in place: s <- c * tanh(s / c); keeps tanh in T (for the backward).
inline void apply_softcap(float* S, int64_t ldS, int64_t R, int64_t bn, float c, float* Tbuf) {
  for (int64_t r = 0; r < R; ++r) {
    float* row = S + r * ldS;
    float* trow = Tbuf ? Tbuf + r * ldS : nullptr;
    for (int64_t jj = 0; jj < bn; ++jj) {
      const float t = std::tanh(row[jj] / c);
      if (trow) trow[jj] = t;
      row[jj] = c * t;
    }
  }
}

// Online-softmax state of one query tile: R rows of m (running max), l (running sum), O (acc).
struct TileState {
  int64_t R, D;
  float *Qs, *S, *O, *m, *l, *Kb, *Vb;
  int64_t ldS = kBlockN;  // row stride of S (>= every bn folded)
};

// Folds one key tile (bn keys, fp32 rows K/V with strides ldk/ldv) into the state.
inline void fold_tile(TileState& st, const float* K, int64_t ldk, const float* V, int64_t ldv,
                      int64_t bn, const AttnParams& p, const OwnKeys* own, int64_t G,
                      int64_t q0, int64_t bm, int64_t j0) {
  const int64_t R = st.R, D = st.D, ldS = st.ldS;
  gemm_rm(false, true, R, bn, D, 1.f, st.Qs, D, K, ldk, 0.f, st.S, ldS);
  if (p.softcap > 0.f) apply_softcap(st.S, ldS, R, bn, p.softcap, nullptr);
  if (own) own->apply(st.S, ldS, G, q0, bm, j0, bn);
  for (int64_t r = 0; r < R; ++r) {
    float* row = st.S + r * ldS;
    const float m_new = std::max(st.m[r], row_max(row, bn));
    if (m_new == kNegInf) {  // nothing visible yet in this row
      std::fill(row, row + bn, 0.f);
      continue;
    }
    const float sum = exp_sub_sum(row, bn, m_new);
    const float alpha = fast_exp(st.m[r] - m_new);
    st.l[r] = st.l[r] * alpha + sum;
    st.m[r] = m_new;
    if (alpha != 1.f) {
      float* o = st.O + r * D;
      for (int64_t c = 0; c < D; ++c) o[c] *= alpha;
    }
  }
  gemm_rm(false, false, R, D, bn, 1.f, st.S, ldS, V, ldv, 1.f, st.O, D);
}

// Tile sizes of the per-row forward / backward (bigger GEMMs than the cascade's: BLAS runs
// far below peak on 32 x 64 tiles). PREFIX_ATTN_CPU_TILES="fm,fn,bm,bn" overrides them
// (tuning only); each must be a multiple of 8 in [8, 1024].
struct TileSizes {
  int64_t fwd_m = 64, fwd_n = 256, bwd_m = 64, bwd_n = 64;
};
inline TileSizes tile_sizes() {
  TileSizes t;
  if (const char* env = std::getenv("PREFIX_ATTN_CPU_TILES"); env && *env) {
    long v[4] = {0, 0, 0, 0};
    bool ok = std::sscanf(env, "%ld,%ld,%ld,%ld", &v[0], &v[1], &v[2], &v[3]) == 4;
    for (long x : v) ok = ok && x >= 8 && x <= 1024 && x % 8 == 0;
    TORCH_CHECK_VALUE(ok, "environment variable PREFIX_ATTN_CPU_TILES='", env,
                      "': expected four comma-separated multiples of 8 in [8, 1024] "
                      "(fwd_m,fwd_n,bwd_m,bwd_n)");
    t = TileSizes{v[0], v[1], v[2], v[3]};
  }
  return t;
}

// Runs worker(next) once per thread; workers take items from the shared counter one at a
// time (costs differ a lot under causal masks) until it reaches n_items. Each item writes
// disjoint outputs, so the result does not depend on which thread ran it.
template <typename Worker>
inline void run_items(int64_t n_items, const Worker& worker) {
  if (n_items <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), n_items);
  at::parallel_for(0, workers, 1, [&](int64_t wb, int64_t we) {
    // BLAS calls inside a worker stay on the worker's thread: a nested BLAS thread team
    // per worker oversubscribes the cores (measured: 10x slower on 2 threads).
    const int prev = MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0;
    for (int64_t w = wb; w < we; ++w) worker(next);
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(prev);
  });
}

}  // namespace prefix_attn::cpu
