// CPU forward of prefix attention: per (row, kv head, query tile) a tiled online softmax over
// the prefix tiles of bank entry prefix_ids[b] and then the row's own keys. All query heads of
// one kv head share the key tiles (GQA without repetition); scores and the P @ V product go
// through BLAS on fp32 tiles.
#include "attention_cpu.h"
#include "attention_tiles.h"
#include "params.h"

#include <ATen/ops/empty.h>

namespace prefix_attn::cpu {
namespace {

template <typename T>
void fwd_impl(const AttnParams& p, T* out, float* lse) {
  const int64_t G = p.G, D = p.D;
  const TileSizes ts = tile_sizes();
  const int64_t kBlockM = ts.fwd_m, kBlockN = ts.fwd_n;
  const int64_t n_qt = (p.Sq + kBlockM - 1) / kBlockM;
  const int64_t n_bg = p.B * p.Hkv;
  const int64_t n_items = n_bg * n_qt;
  const int64_t Rmax = G * kBlockM;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  const T* pk = static_cast<const T*>(p.pk);
  const T* pv = static_cast<const T*>(p.pv);

  run_items(n_items, [&](std::atomic<int64_t>& next) {
    Scratch qs(Rmax * D), s(Rmax * kBlockN), o(Rmax * D), ml(2 * Rmax), kb(kBlockN * D),
        vb(kBlockN * D);
    for (int64_t it; (it = next.fetch_add(1)) < n_items;) {
      // late (most expensive under causal) query tiles first
      const int64_t qt = n_qt - 1 - it / n_bg;
      const int64_t bg = it % n_bg, b = bg / p.Hkv, g = bg % p.Hkv;
      const int64_t q0 = qt * kBlockM, bm = std::min(kBlockM, p.Sq - q0), R = G * bm;
      TileState st{R, D, qs.ptr, s.ptr, o.ptr, ml.ptr, ml.ptr + Rmax, kb.ptr, vb.ptr, kBlockN};
      for (int64_t hh = 0; hh < G; ++hh) {
        const T* src = q + b * p.q_s[0] + (g * G + hh) * p.q_s[1] + q0 * p.q_s[2];
        load_rows(st.Qs + hh * bm * D, src, p.q_s[2], bm, D, p.scale);
      }
      std::fill(st.O, st.O + R * D, 0.f);
      std::fill(st.m, st.m + R, kNegInf);
      std::fill(st.l, st.l + R, 0.f);

      // -- prefix tiles: always visible up to the entry's length ----
      const int64_t n = p.ids[b], L = p.lens[n];
      for (int64_t j0 = 0; j0 < L; j0 += kBlockN) {
        const int64_t bn = std::min(kBlockN, L - j0);
        const auto [K, ldk, V, ldv] =
            kv_tile(pk, p.pk_s, pv, p.pv_s, n, g, j0, bn, D, st.Kb, st.Vb);
        fold_tile(st, K, ldk, V, ldv, bn, p, nullptr, G, q0, bm, j0);
      }
      // -- own tiles: skip hidden ones, mask only the partially visible ----
      const OwnKeys own(p, b);
      int64_t lo, hi;
      own.key_range(q0, bm, &lo, &hi);
      for (int64_t j0 = lo; j0 < hi; j0 += kBlockN) {
        const int64_t bn = std::min(kBlockN, hi - j0);
        if (own.all_padding(j0, bn)) continue;
        const auto [K, ldk, V, ldv] = kv_tile(k, p.k_s, v, p.v_s, b, g, j0, bn, D, st.Kb, st.Vb);
        const bool masked = own.needs_mask(q0, bm, j0, bn);
        fold_tile(st, K, ldk, V, ldv, bn, p, masked ? &own : nullptr, G, q0, bm, j0);
      }
      // -- normalise and store; rows that saw no key give zeros and lse = -inf ----
      for (int64_t hh = 0; hh < G; ++hh) {
        const int64_t h = g * G + hh;
        for (int64_t ii = 0; ii < bm; ++ii) {
          const int64_t r = hh * bm + ii;
          const int64_t row = (b * p.Hq + h) * p.Sq + q0 + ii;
          const bool seen = st.l[r] > 0.f;
          store_row(out + row * D, st.O + r * D, D, seen ? 1.f / st.l[r] : 0.f);
          lse[row] = seen ? st.m[r] + std::log(st.l[r]) : kNegInf;
        }
      }
    }
  });
}

}  // namespace

AttnParams make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const at::Tensor& prefix_k, const at::Tensor& prefix_v,
                       const at::Tensor& prefix_ids, const at::Tensor& prefix_lens,
                       const c10::optional<at::Tensor>& key_padding_mask, bool causal,
                       double scale, int64_t window, double softcap) {
  AttnParams p{};
  fill_common_params(p, q, k, v, prefix_k, prefix_v, prefix_ids, prefix_lens, key_padding_mask,
                     causal, scale, window, softcap);
  return p;
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const AttnParams& p,
                                                     const at::Tensor& q) {
  auto out = at::empty({p.B, p.Hq, p.Sq, p.D}, q.options());
  auto lse = at::empty({p.B, p.Hq, p.Sq}, q.options().dtype(at::kFloat));
  if (cascade_chosen(p)) {
    cascade_fwd(p, q.scalar_type(), out.data_ptr(), lse.data_ptr<float>());
    return {out, lse};
  }
  switch (q.scalar_type()) {
    case at::kFloat:
      fwd_impl<float>(p, out.data_ptr<float>(), lse.data_ptr<float>());
      break;
    case at::kHalf:
      fwd_impl<c10::Half>(p, out.data_ptr<c10::Half>(), lse.data_ptr<float>());
      break;
    case at::kBFloat16:
      fwd_impl<c10::BFloat16>(p, out.data_ptr<c10::BFloat16>(), lse.data_ptr<float>());
      break;
    default:
      TORCH_CHECK(false, "prefix_attn: unsupported dtype ", q.scalar_type());
  }
  return {out, lse};
}

}  // namespace prefix_attn::cpu
