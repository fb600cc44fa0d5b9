// CUDA kernels of prefix attention (the `cuda` backend, a fallback where Triton is missing).
//
// forward / dq: one warp per query row, WARPS rows per block sharing key tiles of BN = 32
//   keys staged in shared memory (fp32); lane j scores key j of the tile, lanes own head-dim
//   columns d = lane + 32 c of the accumulators (D <= 256 -> 8 registers). The prefix tiles of
//   entry prefix_ids[b] come first, then the own tiles the block's rows may see.
// dk / dv: one warp per block owns a tile of 16 keys (own keys of one row, or prefix
//   positions of one bank entry) and loops over every query row that may see it in a fixed
//   order, accumulating in shared memory: deterministic, no atomics.
// All fp32 accumulation; fp16 / bf16 / fp32 inputs. No tensor cores: clarity first.
#include "attention_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>
#include <cstdint>

namespace prefix_attn::cuda {
namespace {

constexpr int kWarps = 4;       // query rows per block (forward, dq)
constexpr int kBlockN = 32;     // keys per tile (forward, dq)
constexpr int kBlockNKV = 16;   // keys per tile (dk/dv)
constexpr int kMaxCols = 8;     // head-dim columns per lane: D <= 256
constexpr int64_t kMaxGridYZ = 65535;  // CUDA's limit on grid axes y and z
constexpr float kNegInf = -INFINITY;

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// tanh for the softcap, accurate to a few 1e-7 *relative* (the score softcap * tanh(s / softcap)
// then has the error of an fp32 rounding of itself, for any softcap). Not tanhf: under
// --use_fast_math nvcc turns tanhf into tanh.approx.f32 (MUFU.TANH, relative error up to
// ~1.1e-5), which put fp32 outputs 1.3e-5 off the reference on an H200. Not 1 - 2/(e^2x + 1)
// alone either: it cancels for small |x| (about 6e-8 absolute, so softcap 1e4 gave scores
// 6e-4 off). Same split as kernels/common.py `tanh`: the odd Taylor series (7 terms,
// truncation < 2e-9 relative) for |x| < 0.4, the exp form on |x| with x's sign above it.
// |x| >= 15 rounds to +-1 in fp32 anyway.
__device__ __forceinline__ float softcap_tanh(float x) {
  const float ax = fabsf(x);
  if (ax < 0.4f) {
    const float x2 = x * x;
    float p = 0.003592128036572481f;      // 21844/6081075
    p = p * x2 - 0.008863235529902197f;   // 1382/155925
    p = p * x2 + 0.021869488536155203f;   // 62/2835
    p = p * x2 - 0.05396825396825397f;    // 17/315
    p = p * x2 + 0.13333333333333333f;    // 2/15
    p = p * x2 - 0.3333333333333333f;     // 1/3
    return x + x * (x2 * p);
  }
  const float e = __expf(2.f * fminf(ax, 15.f));
  return copysignf(1.f - 2.f / (e + 1.f), x);
}
__device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

__device__ __forceinline__ float warp_max(float x) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Visibility of own key j for query i of row b (causal bottom-right, window, padding).
__device__ __forceinline__ bool own_visible(const CudaAttnParams& p, int64_t b, int64_t i,
                                            int64_t j) {
  const int64_t pos = p.Skv - p.Sq + i;
  if (p.causal && j > pos) return false;
  if (p.window > 0 && pos - j >= p.window) return false;
  if (p.kpm && !p.kpm[b * p.kpm_s[0] + j * p.kpm_s[1]]) return false;
  return true;
}

// Stages rows [j0, j0 + bn) of a [*, D] matrix with row stride ld into smem [bn][D + 1].
template <typename T>
__device__ __forceinline__ void stage_tile(float* dst, const T* src, int64_t ld, int bn, int D) {
  for (int idx = threadIdx.x; idx < bn * D; idx += blockDim.x) {
    const int j = idx / D, d = idx - j * D;
    dst[j * (D + 1) + d] = to_f(src[j * ld + d]);
  }
}

// Rows of a block: [row0, row1) of the G * Sq rows of (b, g); queries [i_min, i_max].
struct BlockRows {
  int64_t row0, row1, i_min, i_max;
  __device__ BlockRows(const CudaAttnParams& p) {
    row0 = static_cast<int64_t>(blockIdx.x) * kWarps;
    row1 = imin(row0 + kWarps, p.G * p.Sq);
    const bool one_head = row0 / p.Sq == (row1 - 1) / p.Sq;
    i_min = one_head ? row0 % p.Sq : 0;
    i_max = one_head ? (row1 - 1) % p.Sq : p.Sq - 1;
  }
  // Own keys [lo, hi) that some row of the block may see.
  __device__ void key_range(const CudaAttnParams& p, int64_t* lo, int64_t* hi) const {
    const int64_t off = p.Skv - p.Sq;
    *hi = p.causal ? imin(p.Skv, imax(0, off + i_max + 1)) : p.Skv;
    *lo = p.window > 0 ? imin(*hi, imax(0, off + i_min - p.window + 1)) : 0;
  }
};

// One key tile folded into a query row. Mode kForward: online softmax into acc; kDq: dS @ K
// into acc (P from the saved lse).
enum class Mode { kForward, kDq };

template <Mode M>
__device__ __forceinline__ void row_tile(const CudaAttnParams& p, const float* Ks,
                                         const float* Vs, const float* qrow, const float* dorow,
                                         float* prow, int bn, bool own, int64_t b, int64_t i,
                                         int64_t j0, float& m, float& l, float lse, float delta,
                                         float (&acc)[kMaxCols]) {
  const int lane = threadIdx.x & 31, D = static_cast<int>(p.D);
  float s = kNegInf, t = 0.f, dp = 0.f;
  if (lane < bn) {
    const float* kr = Ks + lane * (D + 1);
    float dot = 0.f;
    for (int d = 0; d < D; ++d) dot += qrow[d] * kr[d];
    s = dot;
    if (p.softcap > 0.f) {
      t = softcap_tanh(s / p.softcap);
      s = p.softcap * t;
    }
    if (own && !own_visible(p, b, i, j0 + lane)) s = kNegInf;
    if (M == Mode::kDq) {
      const float* vr = Vs + lane * (D + 1);
      for (int d = 0; d < D; ++d) dp += dorow[d] * vr[d];
    }
  }
  float w;  // the weight of key `lane` for the accumulator
  float alpha = 1.f;
  if (M == Mode::kForward) {
    const float m_new = fmaxf(m, warp_max(s));
    if (m_new == kNegInf) return;  // nothing visible yet (uniform across the warp)
    w = s == kNegInf ? 0.f : __expf(s - m_new);
    alpha = m == kNegInf ? 0.f : __expf(m - m_new);
    l = l * alpha + warp_sum(w);
    m = m_new;
  } else {
    const float pr = (s == kNegInf || lse == kNegInf) ? 0.f : __expf(s - lse);
    w = pr * (dp - delta);
    if (p.softcap > 0.f) w *= 1.f - t * t;
  }
  prow[lane] = w;
  __syncwarp();
  const float* src = M == Mode::kForward ? Vs : Ks;
#pragma unroll
  for (int c = 0; c < kMaxCols; ++c) {
    const int d = lane + 32 * c;
    if (d < D) {
      float a = acc[c] * alpha;
      for (int j = 0; j < bn; ++j) a += prow[j] * src[j * (D + 1) + d];
      acc[c] = a;
    }
  }
  __syncwarp();
}

// Forward (M = kForward) or dq (M = kDq). Grid: (ceil(G * Sq / kWarps), Hkv, rows of this
// launch); row b = p.b0 + blockIdx.z (launches of at most kMaxGridYZ rows each).
template <typename T, Mode M>
__global__ void __launch_bounds__(kWarps * 32) rows_kernel(const CudaAttnParams p) {
  extern __shared__ float smem[];
  const int D = static_cast<int>(p.D);
  float* Ks = smem;
  float* Vs = Ks + kBlockN * (D + 1);
  float* Qs = Vs + kBlockN * (D + 1);  // [kWarps][D]
  float* dOs = Qs + kWarps * D;        // [kWarps][D] (dq only)
  float* Ps = dOs + kWarps * D;        // [kWarps][kBlockN]
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t b = p.b0 + blockIdx.z, g = blockIdx.y;
  const BlockRows rows(p);
  const int64_t row = rows.row0 + warp;
  const bool valid = row < rows.row1;
  const int64_t hh = valid ? row / p.Sq : 0, i = valid ? row % p.Sq : 0, h = g * p.G + hh;
  const int64_t orow = (b * p.Hq + h) * p.Sq + i;  // row index of out / lse / dout

  const T* q = static_cast<const T*>(p.q) + b * p.q_s[0] + h * p.q_s[1] + i * p.q_s[2];
  float* qrow = Qs + warp * D;
  float* dorow = dOs + warp * D;
  float lse = 0.f, delta = 0.f;
  if (valid) {
    for (int d = lane; d < D; d += 32) qrow[d] = to_f(q[d]) * p.scale;
    if (M == Mode::kDq) {
      const T* dO = static_cast<const T*>(p.dout) + orow * D;
      for (int d = lane; d < D; d += 32) dorow[d] = to_f(dO[d]);
      lse = p.lse_in[orow];
      delta = p.delta[orow];
    }
  }
  float acc[kMaxCols];
#pragma unroll
  for (int c = 0; c < kMaxCols; ++c) acc[c] = 0.f;
  float m = kNegInf, l = 0.f;
  __syncthreads();

  // -- prefix tiles of entry prefix_ids[b] ----
  const int64_t n = p.ids[b], L = p.lens[n];
  const T* pk = static_cast<const T*>(p.pk) + n * p.pk_s[0] + g * p.pk_s[1];
  const T* pv = static_cast<const T*>(p.pv) + n * p.pv_s[0] + g * p.pv_s[1];
  for (int64_t j0 = 0; j0 < L; j0 += kBlockN) {
    const int bn = static_cast<int>(imin(kBlockN, L - j0));
    stage_tile(Ks, pk + j0 * p.pk_s[2], p.pk_s[2], bn, D);
    stage_tile(Vs, pv + j0 * p.pv_s[2], p.pv_s[2], bn, D);
    __syncthreads();
    if (valid)
      row_tile<M>(p, Ks, Vs, qrow, dorow, Ps + warp * kBlockN, bn, false, b, i, j0, m, l, lse,
                  delta, acc);
    __syncthreads();
  }
  // -- own tiles the block's rows may see ----
  int64_t lo, hi;
  rows.key_range(p, &lo, &hi);
  const T* k = static_cast<const T*>(p.k) + b * p.k_s[0] + g * p.k_s[1];
  const T* v = static_cast<const T*>(p.v) + b * p.v_s[0] + g * p.v_s[1];
  for (int64_t j0 = lo; j0 < hi; j0 += kBlockN) {
    const int bn = static_cast<int>(imin(kBlockN, hi - j0));
    stage_tile(Ks, k + j0 * p.k_s[2], p.k_s[2], bn, D);
    stage_tile(Vs, v + j0 * p.v_s[2], p.v_s[2], bn, D);
    __syncthreads();
    if (valid)
      row_tile<M>(p, Ks, Vs, qrow, dorow, Ps + warp * kBlockN, bn, true, b, i, j0, m, l, lse,
                  delta, acc);
    __syncthreads();
  }
  if (!valid) return;
  if (M == Mode::kForward) {
    T* out = static_cast<T*>(p.out) + orow * D;
    const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
    for (int c = 0; c < kMaxCols; ++c)
      if (lane + 32 * c < D) out[lane + 32 * c] = from_f<T>(acc[c] * inv);
    if (lane == 0) p.lse[orow] = l > 0.f ? m + logf(l) : kNegInf;
  } else {
    T* dq = static_cast<T*>(p.dq) + orow * D;
#pragma unroll
    for (int c = 0; c < kMaxCols; ++c)
      if (lane + 32 * c < D) dq[lane + 32 * c] = from_f<T>(acc[c] * p.scale);
  }
}

// delta[r] = sum_d dout[r, d] * out[r, d] - dlse[r]; one warp per row.
template <typename T>
__global__ void delta_kernel(const CudaAttnParams p) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (r >= p.B * p.Hq * p.Sq) return;
  const T* dO = static_cast<const T*>(p.dout) + r * p.D;
  const T* o = static_cast<const T*>(p.o) + r * p.D;
  float acc = 0.f;
  for (int d = threadIdx.x & 31; d < p.D; d += 32) acc += to_f(dO[d]) * to_f(o[d]);
  acc = warp_sum(acc);
  if ((threadIdx.x & 31) == 0) p.delta[r] = p.dlse ? acc - p.dlse[r] : acc;
}

// dk/dv of one tile of kBlockNKV keys; one warp per block. Grid.x enumerates the prefix
// tiles (N * Hkv * ceil(P / 16)) and then the own tiles (B * Hkv * ceil(Skv / 16)).
template <typename T>
__global__ void __launch_bounds__(32) dkv_kernel(const CudaAttnParams p) {
  extern __shared__ float smem[];
  const int D = static_cast<int>(p.D), lane = threadIdx.x;
  float* Ks = smem;                          // [16][D + 1]
  float* Vs = Ks + kBlockNKV * (D + 1);      // [16][D + 1]
  float* dKs = Vs + kBlockNKV * (D + 1);     // [16][D]
  float* dVs = dKs + kBlockNKV * D;          // [16][D]
  float* qrow = dVs + kBlockNKV * D;         // [D]
  float* dorow = qrow + D;                   // [D]
  float* ps = dorow + D;                     // [16]
  float* dss = ps + kBlockNKV;               // [16]

  const int64_t n_pt = (p.P + kBlockNKV - 1) / kBlockNKV;
  const int64_t n_kt = (p.Skv + kBlockNKV - 1) / kBlockNKV;
  int64_t tile = blockIdx.x;
  const bool prefix = tile < p.N * p.Hkv * n_pt;
  int64_t n = 0, b = 0, g, j0, bn;
  const T *ks, *vs;
  T *dk, *dv;
  if (prefix) {
    n = tile / (p.Hkv * n_pt);
    g = (tile / n_pt) % p.Hkv;
    j0 = (tile % n_pt) * kBlockNKV;
    bn = imin(kBlockNKV, p.lens[n] - j0);
    ks = static_cast<const T*>(p.pk) + n * p.pk_s[0] + g * p.pk_s[1] + j0 * p.pk_s[2];
    vs = static_cast<const T*>(p.pv) + n * p.pv_s[0] + g * p.pv_s[1] + j0 * p.pv_s[2];
    dk = static_cast<T*>(p.dpk) + ((n * p.Hkv + g) * p.P + j0) * D;
    dv = static_cast<T*>(p.dpv) + ((n * p.Hkv + g) * p.P + j0) * D;
    if (bn <= 0) return;  // beyond the entry's length: the gradient stays zero
    stage_tile(Ks, ks, p.pk_s[2], static_cast<int>(bn), D);
    stage_tile(Vs, vs, p.pv_s[2], static_cast<int>(bn), D);
  } else {
    tile -= p.N * p.Hkv * n_pt;
    b = tile / (p.Hkv * n_kt);
    g = (tile / n_kt) % p.Hkv;
    j0 = (tile % n_kt) * kBlockNKV;
    bn = imin(kBlockNKV, p.Skv - j0);
    ks = static_cast<const T*>(p.k) + b * p.k_s[0] + g * p.k_s[1] + j0 * p.k_s[2];
    vs = static_cast<const T*>(p.v) + b * p.v_s[0] + g * p.v_s[1] + j0 * p.v_s[2];
    dk = static_cast<T*>(p.dk) + ((b * p.Hkv + g) * p.Skv + j0) * D;
    dv = static_cast<T*>(p.dv) + ((b * p.Hkv + g) * p.Skv + j0) * D;
    stage_tile(Ks, ks, p.k_s[2], static_cast<int>(bn), D);
    stage_tile(Vs, vs, p.v_s[2], static_cast<int>(bn), D);
  }
  for (int idx = lane; idx < kBlockNKV * D; idx += 32) dKs[idx] = dVs[idx] = 0.f;
  __syncwarp();

  // queries that may see the tile (own keys: causal / window bounds)
  const int64_t off = p.Skv - p.Sq;
  int64_t i_lo = 0, i_hi = p.Sq;
  if (!prefix) {
    if (p.causal) i_lo = imin(p.Sq, imax(0, j0 - off));
    if (p.window > 0) i_hi = imin(p.Sq, imax(0, j0 + bn - 1 - off + p.window));
  }
  const int key = lane & (kBlockNKV - 1), half = lane / kBlockNKV, Dh = (D + 1) / 2;
  const int64_t b_lo = prefix ? 0 : b, b_hi = prefix ? p.B : b + 1;
  for (int64_t bb = b_lo; bb < b_hi; ++bb) {
    if (prefix && p.ids[bb] != n) continue;
    for (int64_t hh = 0; hh < p.G; ++hh) {
      const int64_t h = g * p.G + hh;
      for (int64_t i = i_lo; i < i_hi; ++i) {
        const int64_t orow = (bb * p.Hq + h) * p.Sq + i;
        const T* q = static_cast<const T*>(p.q) + bb * p.q_s[0] + h * p.q_s[1] + i * p.q_s[2];
        const T* dO = static_cast<const T*>(p.dout) + orow * D;
        for (int d = lane; d < D; d += 32) {
          qrow[d] = to_f(q[d]) * p.scale;
          dorow[d] = to_f(dO[d]);
        }
        __syncwarp();
        const float lse = p.lse_in[orow], delta = p.delta[orow];
        // lanes key and key + 16 each take half of the head dim, then combine
        float s = 0.f, dp = 0.f;
        if (key < bn) {
          const float* kr = Ks + key * (D + 1);
          const float* vr = Vs + key * (D + 1);
          for (int d = half * Dh; d < imin(D, (half + 1) * Dh); ++d) {
            s += qrow[d] * kr[d];
            dp += dorow[d] * vr[d];
          }
        }
        s += __shfl_xor_sync(0xffffffffu, s, kBlockNKV);
        dp += __shfl_xor_sync(0xffffffffu, dp, kBlockNKV);
        float t = 0.f;
        if (p.softcap > 0.f) {
          t = softcap_tanh(s / p.softcap);
          s = p.softcap * t;
        }
        bool vis = key < bn && lse != kNegInf;
        if (vis && !prefix) vis = own_visible(p, bb, i, j0 + key);
        const float pr = vis ? __expf(s - lse) : 0.f;
        float ds = pr * (dp - delta);
        if (p.softcap > 0.f) ds *= 1.f - t * t;
        if (half == 0) {
          ps[key] = pr;
          dss[key] = ds;
        }
        __syncwarp();
        for (int d = lane; d < D; d += 32) {
          const float qd = qrow[d], dod = dorow[d];
          for (int j = 0; j < bn; ++j) {
            dVs[j * D + d] += ps[j] * dod;
            dKs[j * D + d] += dss[j] * qd;
          }
        }
        __syncwarp();
      }
    }
  }
  for (int idx = lane; idx < bn * D; idx += 32) {
    dk[idx] = from_f<T>(dKs[idx]);
    dv[idx] = from_f<T>(dVs[idx]);
  }
}

size_t rows_smem_bytes(int64_t D) {
  return sizeof(float) * (2 * kBlockN * (D + 1) + 2 * kWarps * D + kWarps * kBlockN);
}
size_t dkv_smem_bytes(int64_t D) {
  return sizeof(float) * (2 * kBlockNKV * (D + 1) + 2 * kBlockNKV * D + 2 * D + 2 * kBlockNKV);
}

template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(bytes));
}

// rows_kernel over every row, in launches of at most kMaxGridYZ rows (grid axis z).
template <typename T, Mode M>
cudaError_t launch_rows(const CudaAttnParams& p, cudaStream_t stream) {
  const size_t smem = rows_smem_bytes(p.D);
  auto kernel = rows_kernel<T, M>;
  if (cudaError_t e = allow_smem(kernel, smem); e != cudaSuccess) return e;
  for (int64_t b0 = 0; b0 < p.B; b0 += kMaxGridYZ) {
    CudaAttnParams part = p;
    part.b0 = b0;
    const int64_t n = p.B - b0 < kMaxGridYZ ? p.B - b0 : kMaxGridYZ;
    const dim3 grid(static_cast<unsigned>((p.G * p.Sq + kWarps - 1) / kWarps),
                    static_cast<unsigned>(p.Hkv), static_cast<unsigned>(n));
    kernel<<<grid, kWarps * 32, smem, stream>>>(part);
    if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t fwd_typed(const CudaAttnParams& p, cudaStream_t stream) {
  if (p.B == 0 || p.Sq == 0) return cudaSuccess;
  return launch_rows<T, Mode::kForward>(p, stream);
}

template <typename T>
cudaError_t bwd_typed(const CudaAttnParams& p, cudaStream_t stream) {
  if (p.B == 0 || p.Sq == 0) return cudaSuccess;
  const int64_t rows = p.B * p.Hq * p.Sq;
  delta_kernel<T><<<static_cast<unsigned>((rows + kWarps - 1) / kWarps), kWarps * 32, 0,
                    stream>>>(p);
  if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;

  if (cudaError_t e = launch_rows<T, Mode::kDq>(p, stream); e != cudaSuccess) return e;

  const int64_t tiles = p.N * p.Hkv * ((p.P + kBlockNKV - 1) / kBlockNKV) +
                        p.B * p.Hkv * ((p.Skv + kBlockNKV - 1) / kBlockNKV);
  if (tiles == 0) return cudaSuccess;
  const size_t smem_kv = dkv_smem_bytes(p.D);
  auto kv_kernel = dkv_kernel<T>;
  if (cudaError_t e = allow_smem(kv_kernel, smem_kv); e != cudaSuccess) return e;
  kv_kernel<<<static_cast<unsigned>(tiles), 32, smem_kv, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_fwd(const CudaAttnParams& p, cudaStream_t stream) {
  switch (p.dtype) {
    case DType::kFloat32: return fwd_typed<float>(p, stream);
    case DType::kFloat16: return fwd_typed<__half>(p, stream);
    case DType::kBFloat16: return fwd_typed<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_bwd(const CudaAttnParams& p, cudaStream_t stream) {
  switch (p.dtype) {
    case DType::kFloat32: return bwd_typed<float>(p, stream);
    case DType::kFloat16: return bwd_typed<__half>(p, stream);
    case DType::kBFloat16: return bwd_typed<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace prefix_attn::cuda
