// Interface between the torch side (ops_cuda.cpp) and the CUDA kernels (attention.cu).
// Plain C++ only: attention.cu compiles without any torch header.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace prefix_attn::cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Device pointers and element strides of one call (dim 3 of every tensor is contiguous).
// Outputs and the backward-only tensors are contiguous.
struct CudaAttnParams {
  int64_t B, Hq, Hkv, G, Sq, Skv, D, N, P;
  int64_t b0;  // first row of a launch of the rows kernels (set by the launcher; 0 here)
  const void *q, *k, *v, *pk, *pv;
  int64_t q_s[3], k_s[3], v_s[3], pk_s[3], pv_s[3];
  const int64_t* ids;   // [B]
  const int64_t* lens;  // [N]
  const bool* kpm;      // [B, Skv] or nullptr
  int64_t kpm_s[2];
  bool causal;
  float scale;
  int64_t window;  // -1 = none
  float softcap;   // 0 = none
  DType dtype;
  // forward outputs: out [B, Hq, Sq, D] (dtype), lse [B, Hq, Sq] float32
  void* out;
  float* lse;
  // backward: dout/o [B, Hq, Sq, D] (dtype); delta scratch (rowsum(dout * o) - dlse) [B, Hq, Sq] float32; gradients
  // (dtype, zero-initialised by the caller) dq, dk, dv, dpk, dpv
  const void* dout;
  const void* o;
  const float* lse_in;
  const float* dlse;  // [B, Hq, Sq] float32: the LSE's gradient, or nullptr
  float* delta;
  void *dq, *dk, *dv, *dpk, *dpv;
};

// Launch the kernels on `stream`; return the first CUDA error (cudaSuccess when none).
cudaError_t launch_fwd(const CudaAttnParams& p, cudaStream_t stream);
cudaError_t launch_bwd(const CudaAttnParams& p, cudaStream_t stream);

}  // namespace prefix_attn::cuda
