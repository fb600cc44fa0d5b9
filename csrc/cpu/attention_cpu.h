// Entry points of the CPU kernels (csrc/cpu/attention_fwd.cpp, attention_bwd.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace prefix_attn::cpu {

struct AttnParams;

// Raw pointers and strides of checked inputs (see csrc/checks.h); tensors must outlive it.
AttnParams make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const at::Tensor& prefix_k, const at::Tensor& prefix_v,
                       const at::Tensor& prefix_ids, const at::Tensor& prefix_lens,
                       const c10::optional<at::Tensor>& key_padding_mask, bool causal,
                       double scale, int64_t window, double softcap);

// out [B, Hq, Sq, D] in q's dtype, lse [B, Hq, Sq] float32 (-inf where no key is visible).
std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const AttnParams& p, const at::Tensor& q);

// dq, dk, dv, dprefix_k, dprefix_v with the shapes and dtype of q, k, v, prefix_k, prefix_v.
// dout, out: [B, Hq, Sq, D] contiguous; lse and dlse (the LSE's gradient, or none) [B, Hq, Sq]
// float32 contiguous.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const AttnParams& p, const at::Tensor& dout, const at::Tensor& out, const at::Tensor& lse,
    const c10::optional<at::Tensor>& dlse, const at::Tensor& q);

// Cascade forward for short query blocks (csrc/cpu/attention_decode.cpp): whether this call
// takes it (shape rule, or PREFIX_ATTN_CPU_PATH=cascade|rows), and the kernel itself, which
// writes out (q's dtype, contiguous [B, Hq, Sq, D]) and lse ([B, Hq, Sq]).
bool cascade_chosen(const AttnParams& p);
void cascade_fwd(const AttnParams& p, at::ScalarType dtype, void* out, float* lse);

}  // namespace prefix_attn::cpu
