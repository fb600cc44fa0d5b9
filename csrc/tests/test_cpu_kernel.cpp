// C++ test of the CPU kernels (run by ctest): prefix_attn::fwd / ::bwd called through the
// dispatcher, checked against a naive double-precision loop over every (row, head, query,
// key) on small shapes that cross the kernel's tiles: bank entries of different lengths,
// GQA, padding, causal / non-causal, window, softcap; backward run twice, bitwise equal.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include "cpu/attention_cpu.h"
#include "cpu/attention_tiles.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace {

struct Case {
  std::string name;
  int64_t B, Hq, Hkv, Sq, Skv, D, N, P;
  std::vector<int64_t> ids, lens;
  bool pad, causal;
  int64_t window;
  double softcap;
};

struct Naive {
  at::Tensor out, lse, dq, dk, dv, dpk, dpv;
};

// Materialised attention in double; gradients for the upstream gradient dout.
Naive naive(const Case& c, at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor pk,
            at::Tensor pv, const std::optional<at::Tensor>& kpm, double scale, at::Tensor dout) {
  auto opt = at::TensorOptions().dtype(at::kDouble);
  q = q.to(at::kDouble), k = k.to(at::kDouble), v = v.to(at::kDouble);
  pk = pk.to(at::kDouble), pv = pv.to(at::kDouble), dout = dout.to(at::kDouble);
  Naive r{at::zeros_like(q), at::zeros({c.B, c.Hq, c.Sq}, opt), at::zeros_like(q),
          at::zeros_like(k), at::zeros_like(v), at::zeros_like(pk), at::zeros_like(pv)};
  auto Q = q.accessor<double, 4>(), K = k.accessor<double, 4>(), V = v.accessor<double, 4>();
  auto PK = pk.accessor<double, 4>(), PV = pv.accessor<double, 4>();
  auto dO = dout.accessor<double, 4>();
  auto O = r.out.accessor<double, 4>();
  auto L = r.lse.accessor<double, 3>();
  auto dQ = r.dq.accessor<double, 4>(), dK = r.dk.accessor<double, 4>(),
       dV = r.dv.accessor<double, 4>(), dPK = r.dpk.accessor<double, 4>(),
       dPV = r.dpv.accessor<double, 4>();
  const int64_t G = c.Hq / c.Hkv;
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t h = 0; h < c.Hq; ++h)
      for (int64_t i = 0; i < c.Sq; ++i) {
        const int64_t g = h / G, n = c.ids[b], pos = c.Skv - c.Sq + i;
        // visible keys: (is_prefix, index)
        std::vector<std::pair<bool, int64_t>> keys;
        for (int64_t j = 0; j < c.lens[n]; ++j) keys.push_back({true, j});
        for (int64_t j = 0; j < c.Skv; ++j) {
          if (c.causal && j > pos) continue;
          if (c.window > 0 && pos - j >= c.window) continue;
          if (kpm && !kpm->index({b, j}).item<bool>()) continue;
          keys.push_back({false, j});
        }
        if (keys.empty()) {
          L[b][h][i] = -std::numeric_limits<double>::infinity();
          continue;
        }
        auto kd = [&](size_t t, int64_t d) {
          return keys[t].first ? PK[n][g][keys[t].second][d] : K[b][g][keys[t].second][d];
        };
        auto vd = [&](size_t t, int64_t d) {
          return keys[t].first ? PV[n][g][keys[t].second][d] : V[b][g][keys[t].second][d];
        };
        std::vector<double> s(keys.size()), th(keys.size()), p(keys.size());
        double mx = -std::numeric_limits<double>::infinity();
        for (size_t t = 0; t < keys.size(); ++t) {
          double dot = 0;
          for (int64_t d = 0; d < c.D; ++d) dot += Q[b][h][i][d] * kd(t, d);
          s[t] = dot * scale;
          if (c.softcap > 0) {
            th[t] = std::tanh(s[t] / c.softcap);
            s[t] = c.softcap * th[t];
          }
          mx = std::max(mx, s[t]);
        }
        double sum = 0;
        for (size_t t = 0; t < keys.size(); ++t) sum += (p[t] = std::exp(s[t] - mx));
        for (auto& x : p) x /= sum;
        L[b][h][i] = mx + std::log(sum);
        for (int64_t d = 0; d < c.D; ++d) {
          double o = 0;
          for (size_t t = 0; t < keys.size(); ++t) o += p[t] * vd(t, d);
          O[b][h][i][d] = o;
        }
        // backward of this query
        std::vector<double> dp(keys.size());
        double pdp = 0;
        for (size_t t = 0; t < keys.size(); ++t) {
          double x = 0;
          for (int64_t d = 0; d < c.D; ++d) x += dO[b][h][i][d] * vd(t, d);
          dp[t] = x;
          pdp += p[t] * x;
        }
        for (size_t t = 0; t < keys.size(); ++t) {
          double ds = p[t] * (dp[t] - pdp);
          if (c.softcap > 0) ds *= 1 - th[t] * th[t];
          const auto j = keys[t].second;
          for (int64_t d = 0; d < c.D; ++d) {
            dQ[b][h][i][d] += ds * scale * kd(t, d);
            auto& dk = keys[t].first ? dPK[n][g][j][d] : dK[b][g][j][d];
            auto& dv = keys[t].first ? dPV[n][g][j][d] : dV[b][g][j][d];
            dk += ds * scale * Q[b][h][i][d];
            dv += p[t] * dO[b][h][i][d];
          }
        }
      }
  return r;
}

double max_err(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0) return 0;
  auto fa = a.to(at::kDouble), fb = b.to(at::kDouble);
  auto both_inf = at::logical_and(at::isinf(fa), at::isinf(fb)).logical_and(fa.eq(fb));
  return at::where(both_inf, at::zeros_like(fa), (fa - fb).abs()).max().item<double>();
}

using FwdFn = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
    bool, double, int64_t, double);
using BwdFn = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
    const std::optional<at::Tensor>&, bool, double, int64_t, double);

bool run_case(const Case& c, at::ScalarType dtype, double tol) {
  at::manual_seed(0);
  auto opt = at::TensorOptions().dtype(dtype);
  auto q = at::randn({c.B, c.Hq, c.Sq, c.D}).to(opt), k = at::randn({c.B, c.Hkv, c.Skv, c.D}).to(opt),
       v = at::randn({c.B, c.Hkv, c.Skv, c.D}).to(opt), pk = at::randn({c.N, c.Hkv, c.P, c.D}).to(opt),
       pv = at::randn({c.N, c.Hkv, c.P, c.D}).to(opt);
  auto ids = at::tensor(c.ids, at::kLong), lens = at::tensor(c.lens, at::kLong);
  std::optional<at::Tensor> kpm;
  if (c.pad) {
    auto m = at::ones({c.B, c.Skv}, at::kBool);
    for (int64_t b = 0; b < c.B; ++b) m.index_put_({b, at::indexing::Slice(0, b + 1)}, false);
    kpm = m;
  }
  const double scale = 1.0 / std::sqrt(static_cast<double>(c.D));
  auto fwd = c10::Dispatcher::singleton().findSchemaOrThrow("prefix_attn::fwd", "").typed<FwdFn>();
  auto bwd = c10::Dispatcher::singleton().findSchemaOrThrow("prefix_attn::bwd", "").typed<BwdFn>();
  auto [out, lse] = fwd.call(q, k, v, pk, pv, ids, lens, kpm, c.causal, scale, c.window, c.softcap);
  auto dout = at::randn({c.B, c.Hq, c.Sq, c.D}).to(opt);
  auto ref = naive(c, q, k, v, pk, pv, kpm, scale, dout);
  auto g1 = bwd.call(dout, q, k, v, pk, pv, ids, lens, kpm, out, lse, std::nullopt, c.causal, scale,
                     c.window,
                     c.softcap);
  auto g2 = bwd.call(dout, q, k, v, pk, pv, ids, lens, kpm, out, lse, std::nullopt, c.causal, scale,
                     c.window,
                     c.softcap);
  const std::vector<std::pair<const char*, double>> errs = {
      {"out", max_err(out, ref.out)},          {"lse", max_err(lse, ref.lse)},
      {"dq", max_err(std::get<0>(g1), ref.dq)}, {"dk", max_err(std::get<1>(g1), ref.dk)},
      {"dv", max_err(std::get<2>(g1), ref.dv)}, {"dpk", max_err(std::get<3>(g1), ref.dpk)},
      {"dpv", max_err(std::get<4>(g1), ref.dpv)}};
  bool ok = true;
  for (const auto& [name, e] : errs) {
    if (!(e <= tol)) {
      std::printf("FAIL %s [%s] %s: max error %.3g > %.3g\n", c.name.c_str(),
                  c10::toString(dtype), name, e, tol);
      ok = false;
    }
  }
  const bool same = at::equal(std::get<0>(g1), std::get<0>(g2)) &&
                    at::equal(std::get<1>(g1), std::get<1>(g2)) &&
                    at::equal(std::get<3>(g1), std::get<3>(g2)) &&
                    at::equal(std::get<4>(g1), std::get<4>(g2));
  if (!same) {
    std::printf("FAIL %s: two backward runs differ\n", c.name.c_str());
    ok = false;
  }
  const bool no_nan = !out.isnan().any().item<bool>();
  if (!no_nan) {
    std::printf("FAIL %s: NaN in out\n", c.name.c_str());
    ok = false;
  }
  if (ok) std::printf("ok   %s [%s]\n", c.name.c_str(), c10::toString(dtype));
  return ok;
}

// The forward's path rule (csrc/cpu/attention_decode.cpp): the cascade for short query
// blocks that share an entry, unless a row brings many query rows per kv head (G * Sq > 16),
// where the per-row tiles already share each prefix tile and were faster.
bool check_path_rule() {
  auto path = [](int64_t B, int64_t Hq, int64_t Hkv, int64_t Sq, bool shared) {
    auto f = at::TensorOptions().dtype(at::kFloat);
    auto i64 = at::TensorOptions().dtype(at::kLong);
    auto q = at::randn({B, Hq, Sq, 8}, f), k = at::randn({B, Hkv, 40, 8}, f);
    auto pk = at::randn({B, Hkv, 5, 8}, f);
    auto ids = shared ? at::zeros({B}, i64) : at::arange(B, i64);
    auto lens = at::full({B}, 5, i64);
    const auto p = prefix_attn::cpu::make_params(q, k, k, pk, pk, ids, lens, c10::nullopt, true,
                                                 0.125, -1, 0.0);
    return prefix_attn::cpu::cascade_chosen(p);
  };
  const int64_t B = 8 * at::get_num_threads();  // enough per-row items for the threads
  struct Want {
    int64_t Hq, Hkv, Sq;
    bool shared, cascade;
  };
  const Want wants[] = {{16, 4, 1, true, true},    {16, 4, 4, true, true},
                        {16, 4, 8, true, false},   {16, 4, 16, false, false},
                        {16, 1, 1, true, true},    {32, 1, 1, true, false},
                        {16, 4, 1, false, false},  {16, 4, 17, true, false}};
  bool ok = true;
  for (const auto& w : wants) {
    const bool got = path(B, w.Hq, w.Hkv, w.Sq, w.shared);
    if (got != w.cascade) {
      std::printf("FAIL path rule: B %lld Hq %lld Hkv %lld Sq %lld shared %d: cascade %d, "
                  "expected %d\n", (long long)B, (long long)w.Hq, (long long)w.Hkv,
                  (long long)w.Sq, w.shared, got, w.cascade);
      ok = false;
    }
  }
  if (ok) std::printf("ok   path rule\n");
  return ok;
}

}  // namespace

int main() {
  const std::vector<Case> cases = {
      {"gqa_bank_tiles", 3, 6, 2, 37, 70, 16, 3, 70, {2, 0, 1}, {70, 0, 5}, false, true, -1, 0},
      {"mqa_leftpad", 2, 4, 1, 9, 9, 8, 1, 3, {0, 0}, {3}, true, true, -1, 0},
      {"noncausal_softcap", 2, 2, 2, 5, 33, 8, 2, 4, {1, 1}, {4, 2}, true, false, -1, 2.0},
      {"window_decode", 2, 4, 2, 1, 50, 8, 1, 17, {0, 0}, {17}, false, true, 4, 0},
      {"no_prefix_more_queries", 1, 2, 1, 6, 3, 8, 1, 0, {0}, {0}, false, true, -1, 0},
      // crosses the per-row kernels' larger tiles (256 keys forward, 64 queries x 64 keys
      // backward) with padding and a window; four (row, kv head) items take the fused backward
      {"long_pad_window", 2, 4, 2, 150, 300, 8, 2, 270, {1, 0}, {270, 130}, true, true, 200, 0},
  };
  bool ok = true;
  // both backward paths on every case (PREFIX_ATTN_CPU_BWD is read at each call)
  for (const char* bwd : {"split", "fused"}) {
    setenv("PREFIX_ATTN_CPU_BWD", bwd, 1);
    std::printf("backward path: %s\n", bwd);
    for (const auto& c : cases) {
      ok &= run_case(c, at::kFloat, 2e-5);
      ok &= run_case(c, at::kBFloat16, 0.1);
    }
  }
  unsetenv("PREFIX_ATTN_CPU_BWD");
  unsetenv("PREFIX_ATTN_CPU_PATH");
  ok &= check_path_rule();
  std::printf(ok ? "all passed\n" : "FAILED\n");
  return ok ? 0 : 1;
}
