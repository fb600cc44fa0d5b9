"""Device helpers shared by the forward and backward kernels.

Index conventions (all kernels):

* the packed query dimension M holds, for one (row b, kv head h), the ``G = Hq // Hkv``
  query heads of that kv head for every query: packed row ``m`` is query ``i = m // G``
  of query head ``h * G + m % G`` (GQA packing keeps ``tl.dot`` full when Sq is small);
* scores live in the log2 domain (``s * log2(e)``) so the softmax uses ``exp2``;
* own key ``j`` is visible to query ``i`` iff ``j <= Skv - Sq + i`` (causal, bottom-right
  aligned), ``(Skv - Sq + i) - j < window`` (window) and ``key_padding_mask[b, j]``;
  prefix keys are visible up to ``prefix_lens[prefix_ids[b]]``.
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


# Below this |x| tanh is its odd Taylor series (7 terms, truncation < 2e-9 relative); from it
# on, (1 - e) / (1 + e) with e = exp(-2|x|) <= 0.45, which does not cancel. Measured in fp32
# (numpy, as the interpreter): series <= 9e-8 relative on [0, 0.4); the whole function within
# 3e-7 relative everywhere (tests/test_numerics_edges.py). (An exp form alone is 1e-6 off at
# 0.125 and 6e-8 *absolute* near 0, which a large softcap multiplies.)
TANH_SERIES_MAX = tl.constexpr(0.4)


@triton.jit
def tanh(x):
    """tanh accurate to ~2e-7 relative in fp32 for every x (no libdevice in the interpreter):
    an odd series for |x| < TANH_SERIES_MAX, else (1 - e)/(1 + e) with e = exp(-2|x|) and x's
    sign, which saturates cleanly to +-1 with no overflow (exp(2|x|) reached inf, and numpy
    warned in the interpreter). The backward differentiates through the value (1 - t^2)."""
    ax = tl.abs(x)
    small = ax < TANH_SERIES_MAX
    xs = tl.where(small, x, 0.0)  # keeps x*x finite where the series is not used
    x2 = xs * xs
    p = 0.003592128036572481                    # 21844/6081075
    p = p * x2 - 0.008863235529902197           # 1382/155925
    p = p * x2 + 0.021869488536155203           # 62/2835
    p = p * x2 - 0.05396825396825397            # 17/315
    p = p * x2 + 0.13333333333333333            # 2/15
    p = p * x2 - 0.3333333333333333             # 1/3
    series = xs + xs * (x2 * p)
    e = tl.exp(-2.0 * ax)  # in (0, exp(-2 * TANH_SERIES_MAX)]: no cancellation in 1 - e
    big = (1.0 - e) / (1.0 + e)
    big = tl.where(x < 0.0, -big, big)
    return tl.where(small, series, big)


@triton.jit
def scores(q, kt, qk_scale, softcap_inv, softcap_log2,
           SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr):
    """Scores of a [BLOCK_M, BLOCK_D] query tile against a [BLOCK_D, BLOCK_N] key tile.

    Returns (s, t): s [BLOCK_M, BLOCK_N] fp32 in the log2 domain (scale and softcap folded
    in); t = tanh(qk * scale / softcap) when SOFTCAP (needed by the backward), else s.
    """
    qk = tl.dot(q, kt, input_precision=DOT_PREC)
    if SOFTCAP:
        t = tanh(qk * softcap_inv)
        s = t * softcap_log2
    else:
        s = qk * qk_scale
        t = s
    return s, t


@triton.jit
def packed_rows(start_m, h, Sq, G: tl.constexpr, BLOCK_M: tl.constexpr):
    """Packed rows start_m .. start_m + BLOCK_M of kv head h: (offs_m, row_ok, offs_i = query
    index or -1 past the end, heads = query head, int64). Takes no pointer, so torch.compile's
    mutation analysis never links a store through these indices to an input."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    row_ok = offs_m < G * Sq
    offs_i = tl.where(row_ok, offs_m // G, -1)
    heads = (h * G + offs_m % G).to(tl.int64)
    return offs_m, row_ok, offs_i, heads


@triton.jit
def own_visible(offs_i, offs_n, off, window, Skv, kpm,
                CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr):
    """[BLOCK_M, BLOCK_N] visibility of own keys offs_n for queries offs_i.

    kpm is the [BLOCK_N] key padding row (True = real token), ignored unless HAS_KPM.
    """
    vis = (offs_n[None, :] < Skv) & (offs_i[:, None] >= 0)
    if CAUSAL:
        vis = vis & (offs_n[None, :] <= off + offs_i[:, None])
    if HAS_WINDOW:
        vis = vis & ((off + offs_i[:, None] - offs_n[None, :]) < window)
    if HAS_KPM:
        vis = vis & (kpm[None, :] != 0)
    return vis


@triton.jit
def mask_tile(s, offs_i, offs_n, n_ok, n_limit, off, window, KPM, stride_kpm,
              PREFIX: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
              HAS_KPM: tl.constexpr):
    """Scores s [BLOCK_M, BLOCK_N] with hidden keys set to -inf: a prefix tile hides only keys
    beyond its length; an own tile applies causal / window / key padding (own_visible)."""
    if PREFIX:
        vis = (offs_n[None, :] < n_limit) & (offs_i[:, None] >= 0)
    else:
        kpm = offs_n
        if HAS_KPM:
            kpm = tl.load(KPM + offs_n.to(tl.int64) * stride_kpm, mask=n_ok, other=0)
        vis = own_visible(offs_i, offs_n, off, window, n_limit, kpm, CAUSAL, HAS_WINDOW, HAS_KPM)
    return tl.where(vis, s, float("-inf"))


@triton.jit
def own_visible_t(offs_i, offs_n, off, window, Skv, kpm,
                  CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr):
    """[BLOCK_N, BLOCK_M]: own_visible transposed (keys x queries), for the dK/dV kernels."""
    vis = (offs_n[:, None] < Skv) & (offs_i[None, :] >= 0)
    if CAUSAL:
        vis = vis & (offs_n[:, None] <= off + offs_i[None, :])
    if HAS_WINDOW:
        vis = vis & ((off + offs_i[None, :] - offs_n[:, None]) < window)
    if HAS_KPM:
        vis = vis & (kpm[:, None] != 0)
    return vis


@triton.jit
def own_ranges(i_lo, i_hi, off, window, Skv, BLOCK_N: tl.constexpr,
               CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Own-key tile ranges for the queries i_lo..i_hi (inclusive) of one query tile.

    Returns (lo, full_lo, full_hi, hi): tiles in [full_lo, full_hi) are visible to every
    query of the tile (no causal/window/length mask needed); [lo, full_lo) and
    [full_hi, hi) need the mask; keys outside [lo, hi) are invisible to all of them.
    """
    lo = i_lo * 0
    hi = lo + Skv
    full_hi = Skv // BLOCK_N * BLOCK_N
    if CAUSAL:
        hi = tl.minimum(hi, tl.maximum(off + i_hi + 1, 0))
        full_hi = tl.minimum(full_hi, tl.maximum(off + i_lo + 1, 0) // BLOCK_N * BLOCK_N)
    full_lo = lo
    if HAS_WINDOW:
        lo = tl.maximum(off + i_lo - window + 1, 0) // BLOCK_N * BLOCK_N
        full_lo = (tl.maximum(off + i_hi - window + 1, 0) + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    # no fully visible tile: mask everything in [lo, hi)
    empty = full_lo >= full_hi
    full_lo = tl.where(empty, hi, full_lo)
    full_hi = tl.where(empty, hi, full_hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def key_tile_query_ranges(n_first, Skv, Sq, off, window, G: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                          MASK_ALL: tl.constexpr):
    """Packed query tiles (starts, multiples of BLOCK_M) for the own key tile starting at
    n_first: the transpose of own_ranges, for the dK/dV loop.

    Returns (m_start, full_lo, full_hi, m_end): packed rows outside [m_start, m_end) see no
    key of the tile; tiles in [full_lo, full_hi) see every key of it (rows past the end of
    the queries are harmless there: their P is 0), so only [m_start, full_lo) and
    [full_hi, m_end) need the mask. MASK_ALL (key padding) leaves no unmasked tile.
    """
    n_last = tl.minimum(n_first + BLOCK_N, Skv) - 1
    i_start = n_first * 0
    i_end = i_start + Sq
    if CAUSAL:
        i_start = tl.minimum(tl.maximum(n_first - off, 0), Sq)
    if HAS_WINDOW:
        i_end = tl.minimum(tl.maximum(n_last - off + window, 0), Sq)
    m_start = (i_start * G) // BLOCK_M * BLOCK_M
    m_end = i_end * G
    # queries i that see all of n_first..n_last: i >= n_last - off (causal) and
    # i < n_first - off + window (window)
    full_lo = m_start
    full_hi = m_end
    if CAUSAL:
        full_lo = (tl.maximum(n_last - off, 0) * G + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    if HAS_WINDOW:
        full_hi = tl.maximum(n_first - off + window, 0) * G // BLOCK_M * BLOCK_M
    full_lo = tl.maximum(full_lo, m_start)
    full_hi = tl.minimum(full_hi, m_end)
    empty = full_lo >= full_hi
    full_lo = tl.where(empty, m_end, full_lo)
    full_hi = tl.where(empty, m_end, full_hi)
    if MASK_ALL:
        full_lo = m_end
        full_hi = m_end
    return m_start, full_lo, full_hi, m_end
