// CUDA implementations of prefix_attn::fwd / prefix_attn::bwd: checks (csrc/checks.h), output
// allocation and the launch of the kernels of attention.cu on the current stream.
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "checks.h"
#include "params.h"
#include "cuda/attention_cuda.h"

namespace prefix_attn {
namespace {

constexpr int64_t kCudaMaxHeadDim = 256;

cuda::DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kHalf: return cuda::DType::kFloat16;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    default: TORCH_CHECK(false, "prefix_attn: unsupported dtype ", t);
  }
}

cuda::CudaAttnParams make_params(const OpInputs& in, const c10::optional<at::Tensor>& kpm,
                                 bool causal, double scale, int64_t window, double softcap) {
  cuda::CudaAttnParams p{};
  fill_common_params(p, in.q, in.k, in.v, in.pk, in.pv, in.ids, in.lens, kpm, causal, scale,
                     window, softcap);
  TORCH_CHECK(p.Hkv <= 65535, "prefix_attn (cuda): Hkv=", p.Hkv, " must be <= 65535 (a grid "
              "axis; more rows than that run in several launches)");
  p.dtype = to_dtype(in.q.scalar_type());
  return p;
}

std::tuple<at::Tensor, at::Tensor> fwd_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                            const at::Tensor& v_in, const at::Tensor& pk_in,
                                            const at::Tensor& pv_in, const at::Tensor& ids_in,
                                            const at::Tensor& lens_in,
                                            const c10::optional<at::Tensor>& kpm, bool causal,
                                            double scale, int64_t window, double softcap) {
  const auto in = prepare_inputs(q_in, k_in, v_in, pk_in, pv_in, ids_in, lens_in, kpm, scale,
                                 window, softcap, kCudaMaxHeadDim);
  const auto& q = in.q;
  const auto& d = in.d;
  TORCH_CHECK(q.is_cuda(), "prefix_attn::fwd (CUDA kernel) got tensors on ", q.device());
  const c10::cuda::CUDAGuard guard(q.device());
  auto out = at::empty({d.B, d.Hq, d.Sq, d.D}, q.options());
  auto lse = at::empty({d.B, d.Hq, d.Sq}, q.options().dtype(at::kFloat));
  auto p = make_params(in, kpm, causal, scale, window, softcap);
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  const auto err = cuda::launch_fwd(p, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "prefix_attn (cuda) forward launch failed: ",
              cudaGetErrorString(err));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_cuda(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& pk_in, const at::Tensor& pv_in,
    const at::Tensor& ids_in, const at::Tensor& lens_in, const c10::optional<at::Tensor>& kpm,
    const at::Tensor& out_in, const at::Tensor& lse_in, const c10::optional<at::Tensor>& dlse_in,
    bool causal, double scale, int64_t window, double softcap) {
  const auto in = prepare_inputs(q_in, k_in, v_in, pk_in, pv_in, ids_in, lens_in, kpm, scale,
                                 window, softcap, kCudaMaxHeadDim);
  const auto& q = in.q;
  const auto& d = in.d;
  check_bwd_args(d, q, dout_in, out_in, lse_in, dlse_in);
  TORCH_CHECK(q.is_cuda(), "prefix_attn::bwd (CUDA kernel) got tensors on ", q.device());
  const c10::cuda::CUDAGuard guard(q.device());
  const auto dout = dout_in.contiguous(), out = out_in.contiguous(), lse = lse_in.contiguous();
  const auto dlse = dlse_in.has_value() ? dlse_in->contiguous() : at::Tensor();
  auto dq = at::zeros({d.B, d.Hq, d.Sq, d.D}, q.options());
  auto dk = at::zeros({d.B, d.Hkv, d.Skv, d.D}, q.options());
  auto dv = at::zeros({d.B, d.Hkv, d.Skv, d.D}, q.options());
  auto dpk = at::zeros({d.N, d.Hkv, d.P, d.D}, q.options());
  auto dpv = at::zeros({d.N, d.Hkv, d.P, d.D}, q.options());
  auto delta = at::empty({d.B, d.Hq, d.Sq}, q.options().dtype(at::kFloat));
  auto p = make_params(in, kpm, causal, scale, window, softcap);
  p.dout = dout.data_ptr();
  p.o = out.data_ptr();
  p.lse_in = lse.data_ptr<float>();
  p.dlse = dlse.defined() ? dlse.data_ptr<float>() : nullptr;
  p.delta = delta.data_ptr<float>();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.dpk = dpk.data_ptr();
  p.dpv = dpv.data_ptr();
  const auto err = cuda::launch_bwd(p, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "prefix_attn (cuda) backward launch failed: ",
              cudaGetErrorString(err));
  return {dq, dk, dv, dpk, dpv};
}

}  // namespace
}  // namespace prefix_attn

TORCH_LIBRARY_IMPL(prefix_attn, CUDA, m) {
  m.impl("fwd", &prefix_attn::fwd_cuda);
  m.impl("bwd", &prefix_attn::bwd_cuda);
}
