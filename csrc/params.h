// The fields every backend's parameter struct shares: sizes, data pointers, element strides,
// masks and flags of one call, read from already-checked tensors (checks.h). The CPU
// (cpu/attention_tiles.h: AttnParams) and CUDA (cuda/attention_cuda.h: CudaAttnParams)
// structs both have these members; each adds its own extras after fill_common_params.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cstdint>

namespace prefix_attn {

template <typename Params>
void fill_common_params(Params& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& prefix_k, const at::Tensor& prefix_v,
                        const at::Tensor& prefix_ids, const at::Tensor& prefix_lens,
                        const c10::optional<at::Tensor>& key_padding_mask, bool causal,
                        double scale, int64_t window, double softcap) {
  p.B = q.size(0);
  p.Hq = q.size(1);
  p.Sq = q.size(2);
  p.D = q.size(3);
  p.Hkv = k.size(1);
  p.G = p.Hq / p.Hkv;
  p.Skv = k.size(2);
  p.N = prefix_k.size(0);
  p.P = prefix_k.size(2);
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.pk = prefix_k.data_ptr();
  p.pv = prefix_v.data_ptr();
  for (int d = 0; d < 3; ++d) {  // dim 3 has unit stride (checked)
    p.q_s[d] = q.stride(d);
    p.k_s[d] = k.stride(d);
    p.v_s[d] = v.stride(d);
    p.pk_s[d] = prefix_k.stride(d);
    p.pv_s[d] = prefix_v.stride(d);
  }
  p.ids = prefix_ids.data_ptr<int64_t>();
  p.lens = prefix_lens.data_ptr<int64_t>();
  p.kpm = nullptr;
  if (key_padding_mask.has_value()) {
    p.kpm = key_padding_mask->data_ptr<bool>();
    p.kpm_s[0] = key_padding_mask->stride(0);
    p.kpm_s[1] = key_padding_mask->stride(1);
  }
  p.causal = causal;
  p.scale = static_cast<float>(scale);
  p.window = window;
  p.softcap = static_cast<float>(softcap);
}

}  // namespace prefix_attn
