"""Cascade forward for small Sq (decode): a shared prefix read once per BLOCK_M packed
queries of its rows (not once per row), own KV split.

Three launches write partial results (normalised output + LSE, fp32) into a scratch of
``1 + splits`` slots, then merge them exactly:

1. ``_cascade_prefix`` (slot 0): rows grouped by bank entry (host: stable sort of
   ``prefix_ids``). A program owns BLOCK_M packed queries of ONE entry - all query heads of a
   kv head, all queries of several rows of that entry - and streams that entry's prefix tiles
   once for all of them. Tiles are assigned per entry without a host sync:
   ``tile_offsets[n]`` = first tile of entry n, ``tile_entry[t]`` = entry of tile t.
2. ``_cascade_own`` (slots 1..splits): flash-decoding over each row's own keys, cut into
   ``splits`` chunks so a few long rows still fill the GPU.
3. ``_cascade_merge``: out = sum_s w_s o_s / sum_s w_s with w_s = exp(lse_s - max lse);
   rows with no visible key anywhere -> out 0, lse -inf.
"""

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .autotune import (DEFAULT_SMS, cdiv, interpreting, next_pow2, row_chunks, rows_of, sm_count,
                       smem_budget, smem_estimate, strides3)
from .common import LN2, own_ranges, packed_rows
from .bwd import prefix_row_lists
from .fwd import _fwd_inner, _prefix_pass, dot_precision, head_block

# Decode = at most this many queries per row; above it the per-row kernel is used.
CASCADE_MAX_SQ = 16
# Own keys per row from which splitting the own KV pays off when the grid is underfilled.
CASCADE_MIN_OWN_KEYS = 512


# Packed queries (rows x query heads of a kv head x queries) per program of the prefix part
# on a GPU: each program streams its entry's prefix once (16 under the interpreter).
CASCADE_BLOCK_M = 64


def use_cascade(B: int, N: int, P: int, Sq: int, Skv: int, Hkv: int = 1,
                sms: int = DEFAULT_SMS, G: int = 1) -> bool:
    """The shape rule of the triton backend's forward (documented in the README's backend
    section). Cascade iff Sq <= 16 and either

    * the prefix bytes it saves are at least the own-KV bytes every row reads anyway:
      ``P * (B - reads) >= B * Skv``, where ``reads = cdiv(B * G * Sq, 64) + N - 1`` bounds
      the prefix reads per kv head without reading ``prefix_ids`` (an entry is read once per
      64 packed queries of its rows: G query heads per kv head, Sq queries each; the per-row
      kernel reads it once per row). Measured on
      an H200 (bf16, B 64, Hkv 8, D 128, Skv 4096, one shared entry, P 16..256, 2026-11-28):
      there the saving is <= 6 % and the per-row kernel, already at ~4 TB/s, was 1.6-1.8x
      faster than the cascade's three launches; the break-even ratio itself is unmeasured;
    * or the per-row grid (one program per row and kv head) fills less than half the GPU
      and the own KV is long (>= 512 keys): the cascade splits it (flash-decoding). This
      branch is reasoning, not yet timed on a GPU.
    """
    if Sq == 0 or B == 0 or Sq > CASCADE_MAX_SQ:
        return False
    reads = cdiv(B * G * Sq, CASCADE_BLOCK_M) + N - 1
    shared_saving = P > 0 and reads < B and P * (B - reads) >= B * Skv
    underfilled = B * Hkv < sms // 2 and Skv >= CASCADE_MIN_OWN_KEYS
    return shared_saving or underfilled


@triton.jit
def _store_partial(OP, LP, slot, b, heads, offs_i, row_ok, acc, l_i, m_i, offs_d,
                   s_slot, s_b, s_h, Sq, D: tl.constexpr):
    """Write a partial result (o = acc / l, lse) into scratch slot `slot` (fp32, contiguous
    [slots, B, Hq, Sq, D] and [slots, B, Hq, Sq])."""
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * LN2, float("-inf"))
    row = slot * s_slot + b * s_b + heads * s_h + offs_i.to(tl.int64) * D
    tl.store(OP + row[:, None] + offs_d[None, :], acc / l_safe[:, None],
             mask=row_ok[:, None] & (offs_d[None, :] < D))
    tl.store(LP + (row // D), lse, mask=row_ok)


@triton.jit
def _cascade_prefix(Q, PK, PV, PLENS, ROWS, ROW_OFFS, TILE_OFFS, TILE_ENTRY, OP, LP,
                    stride_qb, stride_qh, stride_qs,
                    stride_pkn, stride_pkh, stride_pks,
                    stride_pvn, stride_pvh, stride_pvs,
                    s_slot, s_b, s_h,
                    N, Hkv, Sq, qk_scale, softcap_inv, softcap_log2,
                    D: tl.constexpr, G: tl.constexpr, SOFTCAP: tl.constexpr,
                    DOT_PREC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr):
    pid_t = tl.program_id(0)
    h = tl.program_id(1)
    entry = tl.load(TILE_ENTRY + pid_t).to(tl.int64)
    live = entry < N
    entry = tl.where(live, entry, 0)
    # -- packed queries of this entry's rows: (row r, query i, head g) ----
    first_row = tl.load(ROW_OFFS + entry)
    n_rows = tl.load(ROW_OFFS + entry + 1) - first_row
    tile = pid_t - tl.load(TILE_OFFS + entry)
    per_row = G * Sq
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    # one comparison (`(...) & live` splats a scalar bool: Triton 3.9's interpreter makes it int)
    row_ok = offs_m < tl.where(live, n_rows * per_row, 0)
    r = first_row + offs_m // per_row
    rem = offs_m % per_row
    b = tl.load(ROWS + r, mask=row_ok, other=0).to(tl.int64)
    offs_i = tl.where(row_ok, rem // G, -1)
    heads = (h * G + rem % G).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(Q + b[:, None] * stride_qb + heads[:, None] * stride_qh
                + offs_i[:, None].to(tl.int64) * stride_qs + offs_d[None, :],
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    plen = tl.load(PLENS + entry).to(tl.int32)
    plen = tl.where(live, plen, 0)
    PKb = PK + entry * stride_pkn + h.to(tl.int64) * stride_pkh
    PVb = PV + entry * stride_pvn + h.to(tl.int64) * stride_pvh
    acc, l_i, m_i = _prefix_pass(acc, l_i, m_i, q, PKb, PVb, stride_pks, stride_pvs, PLENS, plen,
                                 offs_i, offs_d, D, qk_scale, softcap_inv, softcap_log2,
                                 SOFTCAP, BLOCK_N, DOT_PREC)
    _store_partial(OP, LP, 0, b, heads, offs_i, row_ok, acc, l_i, m_i, offs_d,
                   s_slot, s_b, s_h, Sq, D)


@triton.jit
def _cascade_own(Q, K, V, KPM, OP, LP,
                 stride_qb, stride_qh, stride_qs,
                 stride_kb, stride_kh, stride_ks,
                 stride_vb, stride_vh, stride_vs,
                 stride_kpmb, stride_kpms,
                 s_slot, s_b, s_h,
                 Hkv, Sq, Skv, window, chunk_tiles, m_tiles, qk_scale, softcap_inv, softcap_log2,
                 D: tl.constexpr, G: tl.constexpr, CAUSAL: tl.constexpr,
                 HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr, SOFTCAP: tl.constexpr,
                 DOT_PREC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    split = pid // m_tiles
    pid_m = pid % m_tiles
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hkv).to(tl.int64)
    h = pid_bh % Hkv
    offs_m, row_ok, offs_i, heads = packed_rows(pid_m * BLOCK_M, h, Sq, G, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh
                + offs_i[:, None].to(tl.int64) * stride_qs + offs_d[None, :],
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # -- this split's keys, intersected with what the tile's queries may see ----
    off = Skv - Sq
    i_lo = (pid_m * BLOCK_M) // G
    i_hi = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // G, Sq - 1)
    lo, full_lo, full_hi, hi = own_ranges(i_lo, i_hi, off, window, Skv, BLOCK_N,
                                          CAUSAL, HAS_WINDOW)
    # split bounds as tile counts times the constexpr BLOCK_N (known alignment)
    lo = tl.maximum(lo, split * chunk_tiles * BLOCK_N)
    hi = tl.minimum(hi, (split + 1) * chunk_tiles * BLOCK_N)
    Kb = K + b * stride_kb + h.to(tl.int64) * stride_kh
    Vb = V + b * stride_vb + h.to(tl.int64) * stride_vh
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, Kb, Vb, stride_ks, stride_vs,
                               KPM + b * stride_kpmb, stride_kpms,
                               lo, hi, Skv, offs_i, offs_d, D, off, window,
                               qk_scale, softcap_inv, softcap_log2,
                               True, False, CAUSAL, HAS_WINDOW, HAS_KPM, SOFTCAP, BLOCK_N,
                               DOT_PREC)
    _store_partial(OP, LP, 1 + split, b, heads, offs_i, row_ok, acc, l_i, m_i, offs_d,
                   s_slot, s_b, s_h, Sq, D)


@triton.jit
def _cascade_merge(OP, LP, OUT, LSE, slots, s_slot, Hq, Sq,
                   stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
                   D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    # one grid axis (m tiles of each row and query head in turn): cdiv(Sq, BLOCK_M) on axis 1
    # would exceed CUDA's 65535 limit there from Sq > 1048560 (a forced cascade)
    pid = tl.program_id(0)
    m_tiles = tl.cdiv(Sq, BLOCK_M)
    pid_bh = pid // m_tiles
    pid_m = pid % m_tiles
    b = (pid_bh // Hq).to(tl.int64)
    hq = (pid_bh % Hq).to(tl.int64)
    offs_i = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_i < Sq
    base = pid_bh.to(tl.int64) * Sq + offs_i           # row in [B * Hq * Sq]
    mask = row_ok[:, None] & (offs_d[None, :] < D)
    # -- pass 1: max LSE over slots (pointers advanced per slot: 64-bit arithmetic) ----
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    lp = LP + base
    for s in range(0, slots):
        m = tl.maximum(m, tl.load(lp, mask=row_ok, other=float("-inf")))
        lp += s_slot // D
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    # -- pass 2: weighted sum ----
    w_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lp = LP + base
    op = OP + base[:, None] * D + offs_d[None, :]
    for s in range(0, slots):
        w = tl.exp(tl.load(lp, mask=row_ok, other=float("-inf")) - m_safe)
        acc += w[:, None] * tl.load(op, mask=mask, other=0.0)
        w_sum += w
        lp += s_slot // D
        op += s_slot
    seen = w_sum > 0.0
    w_safe = tl.where(seen, w_sum, 1.0)
    out = acc / w_safe[:, None]
    lse = tl.where(seen, m_safe + tl.log(w_safe), float("-inf"))
    tl.store(OUT + b * stride_ob + hq * stride_oh + offs_i[:, None].to(tl.int64) * stride_os
             + offs_d[None, :], out.to(OUT.dtype.element_ty), mask=mask)
    tl.store(LSE + b * stride_lb + hq * stride_lh + offs_i, lse, mask=row_ok)


def _num_splits(device: torch.device, B: int, Hkv: int, m_tiles: int, Skv: int,
                block_n: int, small: bool) -> int:
    """Own-KV splits: enough programs for about two waves of the GPU, each split at least
    four key tiles; under the interpreter (`small`: `interpreting()`, read once by the
    caller) up to 4 one-tile splits (exercises the merge)."""
    if Skv == 0:
        return 1
    if small or device.type != "cuda":
        return max(1, min(4, cdiv(Skv, block_n)))
    want = cdiv(2 * sm_count(device), max(1, B * Hkv * m_tiles))
    return max(1, min(want, cdiv(Skv, 4 * block_n)))


# Index tensors of a one-entry bank depend on shapes only: (device, B, tiles) -> tensors.
_ONE_ENTRY_TILES = {}


def _entry_tiles(prefix_ids, N: int, rows_per_row: int, block_m: int):
    """Rows grouped by bank entry and each entry's tiles of ``block_m`` packed queries, without
    a host sync: (rows [B]: row indices sorted by entry, row_offs [N + 1], tile_offs [N + 1]:
    first tile of each entry, tile_entry [max_tiles]: entry of each tile (N = idle), max_tiles).

    One entry (every row shares it, the serving case) needs no sort: its tensors are built
    once per shape and stream and reused (a decode step calls this once per layer); under
    torch.compile, for traced tensors and while a CUDA graph is captured they are rebuilt each
    time instead.
    """
    B, dev = prefix_ids.shape[0], prefix_ids.device
    if N == 1:
        tiles = cdiv(B * rows_per_row, block_m)
        reuse = type(prefix_ids) is torch.Tensor and not torch.compiler.is_compiling()
        stream = None
        if reuse and dev.type == "cuda":
            # made while a CUDA graph is captured, the tensors would hold nothing until its
            # first replay; made on one stream, another would read them unordered
            reuse = not torch.cuda.is_current_stream_capturing()
            stream = torch.cuda.current_stream(dev).cuda_stream
        key = (dev, B, tiles, stream)
        got = _ONE_ENTRY_TILES.get(key) if reuse else None
        if got is None:
            def ar(*a):
                return torch.arange(*a, device=dev, dtype=torch.int64)
            got = (ar(B), ar(0, 2 * B, B), ar(0, 2 * tiles, tiles),
                   torch.zeros(tiles, device=dev, dtype=torch.int64), tiles)
            if reuse and len(_ONE_ENTRY_TILES) < 256:
                _ONE_ENTRY_TILES[key] = got
        return got
    return _sorted_entry_tiles(prefix_ids, N, rows_per_row, block_m)


def _sorted_entry_tiles(prefix_ids, N: int, rows_per_row: int, block_m: int):
    """`_entry_tiles` for any bank: the rows of each entry as the backward groups them
    (`bwd.prefix_row_lists`), then each entry's tiles."""
    B, dev = prefix_ids.shape[0], prefix_ids.device
    rows, row_offs = prefix_row_lists(prefix_ids, N)                         # [B], [N + 1]
    counts = row_offs[1:] - row_offs[:-1]
    tiles = (counts * rows_per_row + block_m - 1) // block_m                  # [N]
    tile_offs = torch.cat([torch.zeros(1, device=dev, dtype=tiles.dtype), tiles.cumsum(0)])
    max_tiles = cdiv(B * rows_per_row, block_m) + N                           # no host sync
    tile_entry = torch.searchsorted(tile_offs[1:], torch.arange(max_tiles, device=dev),
                                    right=True)                               # N = idle
    return rows, row_offs, tile_offs, tile_entry, max_tiles


# (BLOCK_N, num_stages) of the cascade kernels, best first; the first that fits is taken
CASCADE_TILES = ((64, 3), (64, 2), (32, 3), (32, 2), (16, 2), (16, 1))
SMEM_MARGIN = 4096  # the estimate is a fit to the compiler's allocation, not an exact count


def cascade_tiles(block_m: int, D: int, elsize: int, budget: int) -> tuple:
    """(BLOCK_N, num_stages) for a cascade kernel with ``block_m`` query rows: the largest key
    tile and pipeline depth whose shared memory fits ``budget`` (64 keys and 3 stages needed
    256 KiB at head dim 256 in fp16 with 128 rows, and more in fp32: over an H200's 227 KiB,
    an error at launch)."""
    for block_n, stages in CASCADE_TILES:
        if smem_estimate(block_m, block_n, head_block(D), stages, elsize) + SMEM_MARGIN <= budget:
            return block_n, stages
    return CASCADE_TILES[-1]


def cascade_fwd(q, k, v, prefix_k, prefix_v, prefix_ids, prefix_lens, key_padding_mask,
                out, lse, causal: bool, scale: float, window: int, softcap: float) -> None:
    """Cascade forward (same contract as ``fwd.attn_fwd``): writes ``out`` and ``lse``.

    q [B, Hq, Sq, D] (Sq small), k/v [B, Hkv, Skv, D], prefix_k/prefix_v [N, Hkv, P, D],
    prefix_ids [B] int64, prefix_lens [N] int64, key_padding_mask [B, Skv] bool or None.
    """
    B, Hq, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    N = prefix_k.shape[0]
    if B == 0 or Sq == 0 or Hq == 0:
        return
    G = Hq // Hkv
    dev = q.device
    small = interpreting()
    block_m_pre = 16 if small else CASCADE_BLOCK_M
    block_m_own = 16 if small else min(128, max(16, next_pow2(G * Sq)))
    budget, elsize = smem_budget(q), q.element_size()
    bn_pre, stages_pre = (16, 1) if small else cascade_tiles(block_m_pre, D, elsize, budget)
    block_n, stages_own = (16, 1) if small else cascade_tiles(block_m_own, D, elsize, budget)
    m_tiles = cdiv(G * Sq, block_m_own)
    splits = _num_splits(dev, B, Hkv, m_tiles, Skv, block_n, small)
    slots = 1 + splits
    if slots * B * Hq * Sq * D >= 2 ** 31:
        # scratch offsets are 32-bit in the partial stores: use the per-row kernel instead
        from .fwd import attn_fwd
        return attn_fwd(q, k, v, prefix_k, prefix_v, prefix_ids, prefix_lens,
                        key_padding_mask, out, lse, causal, scale, window, softcap)
    o_part = torch.empty((slots, B, Hq, Sq, D), device=dev, dtype=torch.float32)
    l_part = torch.empty((slots, B, Hq, Sq), device=dev, dtype=torch.float32)
    s_slot, s_b, s_h = B * Hq * Sq * D, Hq * Sq * D, Sq * D
    has_softcap = softcap > 0.0
    log2e = 1.4426950408889634
    scal = (scale * log2e, scale / softcap if has_softcap else 0.0, softcap * log2e)
    common = dict(D=D, G=G, SOFTCAP=has_softcap, DOT_PREC=dot_precision(q.dtype),
                  BLOCK_D=head_block(D))

    # -- 1. prefix per entry: rows grouped by entry, tiles assigned per entry ----
    rows, row_offs, tile_offs, tile_entry, max_tiles = _entry_tiles(prefix_ids, N, G * Sq,
                                                                    block_m_pre)
    wrap_triton(_cascade_prefix)[(max_tiles, Hkv)](
        q, prefix_k, prefix_v, prefix_lens, rows, row_offs, tile_offs, tile_entry,
        o_part, l_part,
        *strides3(q), *strides3(prefix_k), *strides3(prefix_v),
        s_slot, s_b, s_h, N, Hkv, Sq, *scal, BLOCK_M=block_m_pre, BLOCK_N=bn_pre,
        num_warps=4, num_stages=stages_pre, **common)

    # -- 2. own keys, split ----
    kpm = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else prefix_ids
    kpm_strides = (kpm.stride(0), kpm.stride(1)) if key_padding_mask is not None else (0, 0)
    chunk_tiles = cdiv(cdiv(max(Skv, 1), splits), block_n)
    for r, n in row_chunks(B, Hkv):  # one program per (row, kv head) on grid axis 1
        wrap_triton(_cascade_own)[(splits * m_tiles, n * Hkv)](
            rows_of(q, r), rows_of(k, r), rows_of(v, r), rows_of(kpm, r),
            o_part if r is None else o_part[:, r], l_part if r is None else l_part[:, r],
            *strides3(q), *strides3(k), *strides3(v),
            kpm_strides[0], kpm_strides[1],
            s_slot, s_b, s_h, Hkv, Sq, Skv, window, chunk_tiles, m_tiles, *scal,
            CAUSAL=bool(causal), HAS_WINDOW=window > 0, HAS_KPM=key_padding_mask is not None,
            BLOCK_M=block_m_own, BLOCK_N=block_n, num_warps=4, num_stages=stages_own, **common)

    # -- 3. exact merge ----
    wrap_triton(_cascade_merge)[(B * Hq * cdiv(Sq, 16),)](
        o_part, l_part, out, lse, slots, s_slot, Hq, Sq,
        *strides3(out), *lse.stride()[:2],
        D=D, BLOCK_M=16, BLOCK_D=common["BLOCK_D"], num_warps=4)
