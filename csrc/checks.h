// Input checks shared by the CPU and CUDA implementations of prefix_attn::fwd / ::bwd.
// Python normalises the arguments, but a compiled op never trusts its caller: every
// rank, shape, dtype, device and index is checked here before any pointer is formed.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/_assert_async.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <limits>
#include <utility>

namespace prefix_attn {

// Sizes of one call, read from the checked tensors.
struct Dims {
  int64_t B, Hq, Hkv, Sq, Skv, D, N, P;
};

inline void check_floating(const at::Tensor& t, const char* name, at::ScalarType want) {
  TORCH_CHECK(t.scalar_type() == want, "prefix_attn: ", name, " has dtype ", t.scalar_type(),
              " but q has dtype ", want, " (all of q, k, v, prefix_k, prefix_v must match)");
}

inline void check_device(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK(t.device() == q.device(), "prefix_attn: ", name, " is on ", t.device(),
              " but q is on ", q.device());
}

inline void check_last_dim(const at::Tensor& t, const char* name) {
  // an empty tensor is read nowhere, whatever its strides (a slice [..., ::2] of zero rows)
  TORCH_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1 || t.numel() == 0, "prefix_attn: ", name,
              " must have a contiguous last dimension, got strides ", t.strides());
}

// Checks the forward arguments and returns the sizes. `check_values` reads prefix_ids and
// prefix_lens (a device sync on CUDA) to reject out-of-range entries.
inline Dims check_fwd_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const at::Tensor& prefix_k, const at::Tensor& prefix_v,
                           const at::Tensor& prefix_ids, const at::Tensor& prefix_lens,
                           const c10::optional<at::Tensor>& key_padding_mask, double scale,
                           int64_t window, double softcap, int64_t max_head_dim) {
  TORCH_CHECK(q.dim() == 4, "prefix_attn: q must be [B, Hq, Sq, D], got shape ", q.sizes());
  TORCH_CHECK(k.dim() == 4 && v.dim() == 4, "prefix_attn: k and v must be [B, Hkv, Skv, D], got ",
              k.sizes(), " and ", v.sizes());
  TORCH_CHECK(k.sizes() == v.sizes(), "prefix_attn: k ", k.sizes(), " and v ", v.sizes(),
              " must have the same shape");
  TORCH_CHECK(prefix_k.dim() == 4 && prefix_v.dim() == 4,
              "prefix_attn: prefix_k and prefix_v must be [N, Hkv, P, D], got ", prefix_k.sizes(),
              " and ", prefix_v.sizes());
  TORCH_CHECK(prefix_k.sizes() == prefix_v.sizes(), "prefix_attn: prefix_k ", prefix_k.sizes(),
              " and prefix_v ", prefix_v.sizes(), " must have the same shape");
  Dims d{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), prefix_k.size(0),
         prefix_k.size(2)};
  TORCH_CHECK(k.size(0) == d.B && k.size(3) == d.D, "prefix_attn: k ", k.sizes(),
              " does not match q ", q.sizes(), " in batch or head dim");
  TORCH_CHECK(prefix_k.size(1) == d.Hkv && prefix_k.size(3) == d.D, "prefix_attn: prefix_k ",
              prefix_k.sizes(), " does not match k ", k.sizes(), " in kv heads or head dim");
  TORCH_CHECK(d.Hkv > 0 && d.Hq > 0 && d.Hq % d.Hkv == 0, "prefix_attn: Hq=", d.Hq,
              " must be a multiple of Hkv=", d.Hkv);
  TORCH_CHECK(d.N >= 1, "prefix_attn: the prefix bank needs N >= 1 entries, got ", prefix_k.sizes());
  TORCH_CHECK(d.D >= 1 && d.D <= max_head_dim, "prefix_attn: head dim ", d.D,
              " not supported (1..", max_head_dim, ")");
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
              "prefix_attn: q dtype ", dt, " not supported (float32, float16, bfloat16)");
  check_floating(k, "k", dt);
  check_floating(v, "v", dt);
  check_floating(prefix_k, "prefix_k", dt);
  check_floating(prefix_v, "prefix_v", dt);
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{k, "k"}, {v, "v"},
                                {prefix_k, "prefix_k"}, {prefix_v, "prefix_v"},
                                {prefix_ids, "prefix_ids"}, {prefix_lens, "prefix_lens"}}) {
    check_device(t, name, q);
  }
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{q, "q"}, {k, "k"},
                                {v, "v"}, {prefix_k, "prefix_k"}, {prefix_v, "prefix_v"}}) {
    check_last_dim(t, name);
  }
  TORCH_CHECK(prefix_ids.scalar_type() == at::kLong && prefix_ids.dim() == 1 &&
                  prefix_ids.size(0) == d.B,
              "prefix_attn: prefix_ids must be int64 [B=", d.B, "], got ", prefix_ids.scalar_type(),
              " ", prefix_ids.sizes());
  TORCH_CHECK(prefix_lens.scalar_type() == at::kLong && prefix_lens.dim() == 1 &&
                  prefix_lens.size(0) == d.N,
              "prefix_attn: prefix_lens must be int64 [N=", d.N, "], got ",
              prefix_lens.scalar_type(), " ", prefix_lens.sizes());
  if (key_padding_mask.has_value()) {
    const auto& m = *key_padding_mask;
    check_device(m, "key_padding_mask", q);
    TORCH_CHECK(m.scalar_type() == at::kBool && m.dim() == 2 && m.size(0) == d.B &&
                    m.size(1) == d.Skv,
                "prefix_attn: key_padding_mask must be bool [B=", d.B, ", Skv=", d.Skv, "], got ",
                m.scalar_type(), " ", m.sizes());
  }
  // the kernels take scale and softcap as float32: a value that overflows there, or a softcap
  // that rounds to 0 (read as "none"), is refused
  constexpr double kFloatMax = std::numeric_limits<float>::max();
  TORCH_CHECK(std::isfinite(scale) && std::abs(scale) <= kFloatMax,
              "prefix_attn: scale must be finite in float32, got ", scale);
  TORCH_CHECK(softcap == 0.0 || (softcap >= std::numeric_limits<float>::min() &&
                                 softcap <= kFloatMax && std::abs(scale) / softcap <= kFloatMax),
              "prefix_attn: softcap must be 0 (none) or a normal float32 with scale / softcap "
              "finite in float32, got ", softcap);
  // at most 2**62 as in Python: the kernels add it to positions in int64
  TORCH_CHECK(window == -1 || (window > 0 && window <= (int64_t{1} << 62)),
              "prefix_attn: window must be -1 (none) or in [1, 2**62], got ", window);
  TORCH_CHECK(softcap >= 0.0 && std::isfinite(softcap),
              "prefix_attn: softcap must be 0 (none) or positive, got ", softcap);
  if (prefix_ids.device().is_cpu()) {
    // a plain loop: on small (decode) calls the tensor-op version costs more than the kernel
    auto ids = prefix_ids.accessor<int64_t, 1>();
    for (int64_t b = 0; b < d.B; ++b)
      TORCH_CHECK(ids[b] >= 0 && ids[b] < d.N, "prefix_attn: prefix_ids must lie in [0, N=", d.N,
                  "), got ", ids[b], " at row ", b);
    auto lens = prefix_lens.accessor<int64_t, 1>();
    for (int64_t n = 0; n < d.N; ++n)
      TORCH_CHECK(lens[n] >= 0 && lens[n] <= d.P, "prefix_attn: prefix_lens must lie in [0, P=",
                  d.P, "], got ", lens[n], " for entry ", n);
  } else {
    // On the device: asserted there, without a host sync per call (two per layer and step
    // before, and .item() is not allowed while a CUDA graph is captured). The Python layer
    // has raised a ValueError for eager calls already; this guards direct op calls.
    if (d.B > 0)
      at::_assert_async(prefix_ids.ge(0).logical_and(prefix_ids.lt(d.N)).all(),
                        "prefix_attn: prefix_ids must lie in [0, N) (N = bank entries)");
    at::_assert_async(prefix_lens.ge(0).logical_and(prefix_lens.le(d.P)).all(),
                      "prefix_attn: prefix_lens must lie in [0, P] (P = bank length)");
  }
  return d;
}

// Extra checks of the backward-only tensors against the forward sizes.
inline void check_bwd_args(const Dims& d, const at::Tensor& q, const at::Tensor& dout,
                           const at::Tensor& out, const at::Tensor& lse,
                           const c10::optional<at::Tensor>& dlse) {
  TORCH_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes(), "prefix_attn: dout ",
              dout.sizes(), " and out ", out.sizes(), " must have q's shape ", q.sizes());
  check_floating(dout, "dout", q.scalar_type());
  check_floating(out, "out", q.scalar_type());
  check_device(dout, "dout", q);
  check_device(out, "out", q);
  check_device(lse, "lse", q);
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 3 && lse.size(0) == d.B &&
                  lse.size(1) == d.Hq && lse.size(2) == d.Sq,
              "prefix_attn: lse must be float32 [B, Hq, Sq] = [", d.B, ", ", d.Hq, ", ", d.Sq,
              "], got ", lse.scalar_type(), " ", lse.sizes());
  if (dlse.has_value()) {
    check_device(*dlse, "dlse", q);
    TORCH_CHECK(dlse->scalar_type() == at::kFloat && dlse->sizes() == lse.sizes(),
                "prefix_attn: dlse must be float32 with lse's shape ", lse.sizes(), ", got ",
                dlse->scalar_type(), " ", dlse->sizes());
  }
}

// A copy only where the rows are not distinct row-major rows: a strided last dim, or rows that
// overlap (a row stride below the row length: an expand over the sequence, an unfold). BLAS
// takes the row stride as a leading dimension, which must be at least the row length. The
// kernels take any other strides (batch, heads) as they are.
inline at::Tensor distinct_rows(const at::Tensor& t) {
  const bool strided_last = t.dim() > 0 && t.size(-1) > 1 && t.stride(-1) != 1;
  const bool overlapping = t.dim() > 1 && t.numel() > 0 && t.stride(-2) < t.size(-1);
  return (strided_last || overlapping) ? t.contiguous() : t;
}

// The tensors every fwd/bwd implementation hands its kernels, checked (check_fwd_args).
struct OpInputs {
  at::Tensor q, k, v, pk, pv, ids, lens;
  Dims d;
};

inline OpInputs prepare_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& pk, const at::Tensor& pv,
                               const at::Tensor& ids, const at::Tensor& lens,
                               const c10::optional<at::Tensor>& key_padding_mask, double scale,
                               int64_t window, double softcap, int64_t max_head_dim) {
  OpInputs in{distinct_rows(q), distinct_rows(k), distinct_rows(v), distinct_rows(pk),
              distinct_rows(pv),
              // the kernels index prefix_ids / prefix_lens as flat arrays
              ids.contiguous(), lens.contiguous(), Dims{}};
  in.d = check_fwd_args(in.q, in.k, in.v, in.pk, in.pv, in.ids, in.lens, key_padding_mask,
                        scale, window, softcap, max_head_dim);
  return in;
}

}  // namespace prefix_attn
