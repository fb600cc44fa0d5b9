// Schema of the C++ ops prefix_attn::fwd / prefix_attn::bwd (docs/INTERNALS.md) and their CPU
// implementations. The CUDA implementations register in csrc/cuda/ops_cuda.cpp; fake
// (meta) kernels and autograd are registered from Python (prefix_attn/cpp_backend.py).
#include <torch/library.h>

#include "checks.h"
#include "cpu/attention_cpu.h"
#include "cpu/attention_tiles.h"

namespace prefix_attn {
namespace {

constexpr int64_t kCpuMaxHeadDim = 256;

std::tuple<at::Tensor, at::Tensor> fwd_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                           const at::Tensor& v_in, const at::Tensor& pk_in,
                                           const at::Tensor& pv_in, const at::Tensor& ids_in,
                                           const at::Tensor& lens_in,
                                           const c10::optional<at::Tensor>& key_padding_mask,
                                           bool causal, double scale, int64_t window,
                                           double softcap) {
  const auto in = prepare_inputs(q_in, k_in, v_in, pk_in, pv_in, ids_in, lens_in,
                                 key_padding_mask, scale, window, softcap, kCpuMaxHeadDim);
  TORCH_CHECK(in.q.device().is_cpu(), "prefix_attn::fwd (CPU kernel) got tensors on ",
              in.q.device());
  const auto p = cpu::make_params(in.q, in.k, in.v, in.pk, in.pv, in.ids, in.lens,
                                  key_padding_mask, causal, scale, window, softcap);
  return cpu::attention_fwd_cpu(p, in.q);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& pk_in, const at::Tensor& pv_in,
    const at::Tensor& ids_in, const at::Tensor& lens_in,
    const c10::optional<at::Tensor>& key_padding_mask, const at::Tensor& out,
    const at::Tensor& lse, const c10::optional<at::Tensor>& dlse, bool causal, double scale,
    int64_t window, double softcap) {
  const auto in = prepare_inputs(q_in, k_in, v_in, pk_in, pv_in, ids_in, lens_in,
                                 key_padding_mask, scale, window, softcap, kCpuMaxHeadDim);
  check_bwd_args(in.d, in.q, dout, out, lse, dlse);
  TORCH_CHECK(in.q.device().is_cpu(), "prefix_attn::bwd (CPU kernel) got tensors on ",
              in.q.device());
  const auto p = cpu::make_params(in.q, in.k, in.v, in.pk, in.pv, in.ids, in.lens,
                                  key_padding_mask, causal, scale, window, softcap);
  const auto dlse_c = dlse.has_value() ? c10::optional<at::Tensor>(dlse->contiguous()) : dlse;
  return cpu::attention_bwd_cpu(p, dout.contiguous(), out.contiguous(), lse.contiguous(), dlse_c,
                                in.q);
}

}  // namespace
}  // namespace prefix_attn

TORCH_LIBRARY(prefix_attn, m) {
  m.def(
      "fwd(Tensor q, Tensor k, Tensor v, Tensor prefix_k, Tensor prefix_v, Tensor prefix_ids, "
      "Tensor prefix_lens, Tensor? key_padding_mask, bool causal, float scale, int window, "
      "float softcap) -> (Tensor out, Tensor lse)");
  m.def(
      "bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor prefix_k, Tensor prefix_v, "
      "Tensor prefix_ids, Tensor prefix_lens, Tensor? key_padding_mask, Tensor out, Tensor lse, "
      "Tensor? dlse, bool causal, float scale, int window, float softcap) "
      "-> (Tensor dq, Tensor dk, Tensor dv, Tensor dprefix_k, Tensor dprefix_v)");
}

TORCH_LIBRARY_IMPL(prefix_attn, CPU, m) {
  m.impl("fwd", &prefix_attn::fwd_cpu);
  m.impl("bwd", &prefix_attn::bwd_cpu);
}
