"""Backward kernels of prefix attention and their launcher.

Four launches, none with float atomics (two runs give bitwise-equal gradients):

1. ``_bwd_delta``: Delta = rowsum(O * dO) - dLSE per query, fp32 [B, Hq, Sq].
2. ``_bwd_dkdv_own``: one program owns a tile of row b's own keys for kv head h and loops
   over the packed queries (all G query heads) that can see it -> dK, dV; only the query
   tiles on the causal diagonal / window edges (every tile with key padding) are masked.
3. ``_bwd_dkdv_prefix``: prefix-major. One program owns a tile of bank entry n (kv head h)
   and loops over the rows that selected n (a sorted row list built on the host:
   ``rows = argsort(prefix_ids)``, entry n's rows are ``rows[offsets[n]:offsets[n+1]]``),
   and over one chunk of their queries -> dprefix_k, dprefix_v (fp32 partials per chunk,
   summed in a fixed order when there are several chunks). Unused entries and positions
   beyond ``prefix_lens[n]`` come out as exact zeros.
4. ``_bwd_dq``: one program per packed query tile, the forward's loop (prefix, then own
   tiles) recomputing P -> dQ.
"""

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .autotune import (bucket, cdiv, dkdv_configs, dq_configs, interpreting, prune_bwd,
                       row_chunks, rows_of, sm_count)
from .common import (LOG2E, key_tile_query_ranges, mask_tile, own_ranges, own_visible_t,
                     packed_rows, scores)
from .fwd import dot_precision, head_block, row_kernel_strides


@triton.jit
def _bwd_delta(O, DO, DLSE, DELTA, stride_ob, stride_oh, stride_os, stride_db, stride_dh,
               stride_ds, Hq, Sq, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
               HAS_DLSE: tl.constexpr):
    # one grid axis (m tiles of each row and query head in turn): B * Hq alone may exceed
    # CUDA's 65535 limit on grid axes 1 and 2, and so may cdiv(Sq, BLOCK_M)
    pid = tl.program_id(0)
    m_tiles = tl.cdiv(Sq, BLOCK_M)
    pid_bh = pid // m_tiles
    pid_m = pid % m_tiles
    b = (pid_bh // Hq).to(tl.int64)
    hq = (pid_bh % Hq).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < Sq) & (offs_d[None, :] < D)
    rows = offs_m[:, None].to(tl.int64)
    o = tl.load(O + b * stride_ob + hq * stride_oh + rows * stride_os + offs_d[None, :],
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_db + hq * stride_dh + rows * stride_ds + offs_d[None, :],
                 mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    if HAS_DLSE:  # the LSE's gradient: d lse_i / d s_ij = p_ij, Delta's term with a minus sign
        delta -= tl.load(DLSE + (b * Hq + hq) * Sq + offs_m, mask=offs_m < Sq, other=0.0)
    tl.store(DELTA + (b * Hq + hq) * Sq + offs_m, delta, mask=offs_m < Sq)


@triton.jit
def _load_query_tile(Q, DO, LSE, DELTA, b, h, start_m, Hq, Sq, D,
                     stride_qb, stride_qh, stride_qs, stride_db, stride_dh, stride_ds,
                     stride_lb, stride_lh,
                     G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                     HOIST: tl.constexpr):
    """Packed query tile of row b, kv head h: q, dO [BLOCK_M, BLOCK_D], LSE (log2 domain,
    +inf for rows that see nothing or do not exist, so their P is 0), Delta, query index.

    start_m is a multiple of BLOCK_M. When G divides BLOCK_M every tile has the same head
    pattern, so (HOIST) the addresses are a scalar per tile (query start_m // G) plus offsets
    that do not depend on start_m, which the compiler hoists out of the dK/dV loops: on sm_90
    (bf16, D 128, G 4) that took the own dK/dV loop from 568 to 372 instructions per 32-row
    tile (bench/sass_report.py).
    """
    offs_d = tl.arange(0, BLOCK_D)
    if HOIST and BLOCK_M % G == 0:
        r = tl.arange(0, BLOCK_M)
        heads = (h * G + r % G).to(tl.int64)
        i_tile = start_m // G
        i_in = (r // G).to(tl.int64)
        row_ok = i_tile + i_in < Sq
        offs_i = tl.where(row_ok, i_tile + r // G, -1)
        mask = row_ok[:, None] & (offs_d[None, :] < D)
        q = tl.load((Q + b * stride_qb + i_tile.to(tl.int64) * stride_qs)
                    + (heads[:, None] * stride_qh + i_in[:, None] * stride_qs + offs_d[None, :]),
                    mask=mask, other=0.0)
        do = tl.load((DO + b * stride_db + i_tile.to(tl.int64) * stride_ds)
                     + (heads[:, None] * stride_dh + i_in[:, None] * stride_ds + offs_d[None, :]),
                     mask=mask, other=0.0)
        lse = tl.load((LSE + b * stride_lb + i_tile) + (heads * stride_lh + i_in),
                      mask=row_ok, other=float("-inf"))
        delta = tl.load((DELTA + b * Hq * Sq + i_tile) + (heads * Sq + i_in), mask=row_ok,
                        other=0.0)
    else:
        offs_m, row_ok, offs_i, heads = packed_rows(start_m, h, Sq, G, BLOCK_M)
        rows = offs_i[:, None].to(tl.int64)
        mask = row_ok[:, None] & (offs_d[None, :] < D)
        q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + rows * stride_qs
                    + offs_d[None, :], mask=mask, other=0.0)
        do = tl.load(DO + b * stride_db + heads[:, None] * stride_dh + rows * stride_ds
                     + offs_d[None, :], mask=mask, other=0.0)
        lse = tl.load(LSE + b * stride_lb + heads * stride_lh + offs_i.to(tl.int64),
                      mask=row_ok, other=float("-inf"))
        delta = tl.load(DELTA + (b * Hq + heads) * Sq + offs_i.to(tl.int64), mask=row_ok,
                        other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
    return q, do, lse2, delta, offs_i


@triton.jit
def _dkdv_tile(dk, dv, q, do, lse2, delta, k, v, vis_t,
               qk_scale, softcap_inv, softcap_log2,
               SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr, MASK: tl.constexpr):
    """Accumulate one query tile's contribution into dk, dv [BLOCK_N, BLOCK_D] (fp32).

    k, v: [BLOCK_N, BLOCK_D]; q, do: [BLOCK_M, BLOCK_D]; vis_t [BLOCK_N, BLOCK_M], applied
    only when MASK. Scores are formed transposed (keys x queries) so P^T and dS^T feed the
    dots without transposes.
    """
    s_t, t_t = scores(k, tl.trans(q), qk_scale, softcap_inv, softcap_log2, SOFTCAP, DOT_PREC)
    if MASK:
        s_t = tl.where(vis_t, s_t, float("-inf"))
    p_t = tl.math.exp2(s_t - lse2[None, :])
    dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PREC)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
    ds_t = p_t * (dp_t - delta[None, :])
    if SOFTCAP:
        ds_t = ds_t * (1.0 - t_t * t_t)
    dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PREC)
    return dk, dv


@triton.autotune(configs=dkdv_configs(), key=["BLOCK_D", "M_BUCKET", "KV_BUCKET", "CAUSAL"],
                 prune_configs_by={"early_config_prune": prune_bwd})
@triton.jit
def _bwd_dkdv_own(Q, K, V, DO, LSE, DELTA, KPM, DK, DV,
                  stride_qb, stride_qh, stride_qs,
                  stride_kb, stride_kh, stride_ks,
                  stride_vb, stride_vh, stride_vs,
                  stride_db, stride_dh, stride_ds,
                  stride_lb, stride_lh,
                  stride_kpmb, stride_kpms,
                  stride_dkb, stride_dkh, stride_dks,
                  stride_dvb, stride_dvh, stride_dvs,
                  Hkv, Sq, Skv, D: tl.constexpr, window, qk_scale, softcap_inv, softcap_log2,
                  M_BUCKET, KV_BUCKET,
                  G: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                  HAS_KPM: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr,
                  SPLIT: tl.constexpr,
                  HOIST: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hkv).to(tl.int64)
    h = pid_bh % Hkv
    h64 = h.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < Skv
    keys = offs_n[:, None].to(tl.int64)
    kv_mask = n_ok[:, None] & (offs_d[None, :] < D)
    k = tl.load(K + b * stride_kb + h64 * stride_kh + keys * stride_ks + offs_d[None, :],
                mask=kv_mask, other=0.0)
    v = tl.load(V + b * stride_vb + h64 * stride_vh + keys * stride_vs + offs_d[None, :],
                mask=kv_mask, other=0.0)
    kpm = offs_n
    if HAS_KPM:
        kpm = tl.load(KPM + b * stride_kpmb + offs_n.to(tl.int64) * stride_kpms, mask=n_ok, other=0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    Hq = Hkv * G
    off = Skv - Sq
    # -- packed query tiles that can see this key tile: masked, fully visible, masked ----
    m_start, full_lo, full_hi, m_end = key_tile_query_ranges(
        pid_n * BLOCK_N, Skv, Sq, off, window, G, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW,
        HAS_KPM or not SPLIT)
    for part in tl.static_range(3):
        if part == 0:
            lo, hi = m_start, full_lo
        elif part == 1:
            lo, hi = full_lo, full_hi
        else:
            lo, hi = full_hi, m_end
        for start_m in range(lo, hi, BLOCK_M):
            q, do, lse2, delta, offs_i = _load_query_tile(
                Q, DO, LSE, DELTA, b, h, start_m, Hq, Sq, D, stride_qb, stride_qh, stride_qs,
                stride_db, stride_dh, stride_ds, stride_lb, stride_lh, G, BLOCK_M, BLOCK_D,
                HOIST)
            vis_t = offs_n[:, None] >= 0
            if part != 1:
                vis_t = own_visible_t(offs_i, offs_n, off, window, Skv, kpm, CAUSAL, HAS_WINDOW,
                                      HAS_KPM)
            dk, dv = _dkdv_tile(dk, dv, q, do, lse2, delta, k, v, vis_t, qk_scale, softcap_inv,
                                softcap_log2, SOFTCAP, DOT_PREC, part != 1)
    # dS was taken w.r.t. q.k (softcap derivative included): apply the softmax scale once
    dk = dk * (qk_scale / LOG2E)
    rows = offs_n[:, None].to(tl.int64)
    mask = n_ok[:, None] & (offs_d[None, :] < D)
    tl.store(DK + b * stride_dkb + h64 * stride_dkh + rows * stride_dks + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + b * stride_dvb + h64 * stride_dvh + rows * stride_dvs + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=mask)


@triton.autotune(configs=dkdv_configs(), key=["BLOCK_D", "M_BUCKET", "KV_BUCKET", "CAUSAL"],
                 prune_configs_by={"early_config_prune": prune_bwd})
@triton.jit
def _bwd_dkdv_prefix(Q, PK, PV, DO, LSE, DELTA, PLENS, ROWS, ROW_OFFS, DPK, DPV,
                     stride_qb, stride_qh, stride_qs,
                     stride_pkn, stride_pkh, stride_pks,
                     stride_pvn, stride_pvh, stride_pvs,
                     stride_db, stride_dh, stride_ds,
                     stride_lb, stride_lh,
                     stride_dkc, stride_dkn, stride_dkh, stride_dks,
                     stride_dvc, stride_dvn, stride_dvh, stride_dvs,
                     Hkv, Sq, P, chunk_rows, D: tl.constexpr, qk_scale, softcap_inv, softcap_log2,
                     M_BUCKET, KV_BUCKET,
                     G: tl.constexpr, CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr,
                     DOT_PREC: tl.constexpr,
                     HOIST: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_eh = tl.program_id(1)
    entry = (pid_eh // Hkv).to(tl.int64)
    h = pid_eh % Hkv
    h64 = h.to(tl.int64)
    plen = tl.load(PLENS + entry).to(tl.int32)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < plen
    keys = offs_n[:, None].to(tl.int64)
    kv_mask = n_ok[:, None] & (offs_d[None, :] < D)
    k = tl.load(PK + entry * stride_pkn + h64 * stride_pkh + keys * stride_pks + offs_d[None, :],
                mask=kv_mask, other=0.0)
    v = tl.load(PV + entry * stride_pvn + h64 * stride_pvh + keys * stride_pvs + offs_d[None, :],
                mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    Hq = Hkv * G
    # -- the rows that selected this entry, in a fixed order (deterministic sum) ----
    r_start = tl.load(ROW_OFFS + entry)
    r_end = tl.load(ROW_OFFS + entry + 1)
    r_end = tl.where(pid_n * BLOCK_N < plen, r_end, r_start)
    # -- this program's chunk of query tiles (of every row of the entry) ----
    # tile indices times the constexpr BLOCK_M: the compiler then knows the alignment of
    # start_m (a chunk start passed as rows made ptxas spill ~1 KB here)
    chunk_tiles = chunk_rows // BLOCK_M
    pid_c = tl.program_id(2)
    tile_lo = pid_c * chunk_tiles
    tile_hi = tl.minimum(tile_lo + chunk_tiles, (G * Sq + BLOCK_M - 1) // BLOCK_M)
    for r in range(r_start, r_end):
        b = tl.load(ROWS + r).to(tl.int64)
        for tile in range(tile_lo, tile_hi):
            q, do, lse2, delta, offs_i = _load_query_tile(
                Q, DO, LSE, DELTA, b, h, tile * BLOCK_M, Hq, Sq, D, stride_qb, stride_qh,
                stride_qs, stride_db, stride_dh, stride_ds, stride_lb, stride_lh, G, BLOCK_M,
                BLOCK_D, HOIST)
            vis_t = n_ok[:, None] & (offs_i[None, :] >= 0)
            dk, dv = _dkdv_tile(dk, dv, q, do, lse2, delta, k, v, vis_t,
                                qk_scale, softcap_inv, softcap_log2, SOFTCAP, DOT_PREC, True)
    # dS was taken w.r.t. q.k (softcap derivative included): apply the softmax scale once
    dk = dk * (qk_scale / LOG2E)
    # positions in [plen, P) are stored too: as exact zeros
    rows = offs_n[:, None].to(tl.int64)
    mask = (offs_n[:, None] < P) & (offs_d[None, :] < D)
    DPK += pid_c.to(tl.int64) * stride_dkc
    DPV += pid_c.to(tl.int64) * stride_dvc
    tl.store(DPK + entry * stride_dkn + h64 * stride_dkh + rows * stride_dks + offs_d[None, :],
             dk.to(DPK.dtype.element_ty), mask=mask)
    tl.store(DPV + entry * stride_dvn + h64 * stride_dvh + rows * stride_dvs + offs_d[None, :],
             dv.to(DPV.dtype.element_ty), mask=mask)


@triton.jit
def _dq_inner(dq, q, do, lse2, delta, K, V, stride_kn, stride_vn, KPM, stride_kpm,
              lo, hi, n_limit, offs_i, offs_d, D, off, window,
              qk_scale, softcap_inv, softcap_log2,
              MASK: tl.constexpr, PREFIX: tl.constexpr, CAUSAL: tl.constexpr,
              HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr, SOFTCAP: tl.constexpr,
              BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    """dQ contribution of key tiles [lo, hi) of one KV range (prefix or own)."""
    d_ok = offs_d < D
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_limit
        cols = offs_n[None, :].to(tl.int64)
        kt = tl.load(K + cols * stride_kn + offs_d[:, None], mask=n_ok[None, :] & d_ok[:, None],
                     other=0.0)
        vt = tl.load(V + cols * stride_vn + offs_d[:, None], mask=n_ok[None, :] & d_ok[:, None],
                     other=0.0)
        s, t = scores(q, kt, qk_scale, softcap_inv, softcap_log2, SOFTCAP, DOT_PREC)
        if MASK:
            s = mask_tile(s, offs_i, offs_n, n_ok, n_limit, off, window, KPM, stride_kpm,
                          PREFIX, CAUSAL, HAS_WINDOW, HAS_KPM)
        p = tl.math.exp2(s - lse2[:, None])
        dp = tl.dot(do, vt, input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=DOT_PREC)
    return dq


@triton.autotune(configs=dq_configs(), key=["BLOCK_D", "M_BUCKET", "KV_BUCKET", "CAUSAL"],
                 prune_configs_by={"early_config_prune": prune_bwd})
@triton.jit
def _bwd_dq(Q, K, V, PK, PV, PIDS, PLENS, KPM, DO, LSE, DELTA, DQ,
            stride_qb, stride_qh, stride_qs,
            stride_kb, stride_kh, stride_ks,
            stride_vb, stride_vh, stride_vs,
            stride_pkn, stride_pkh, stride_pks,
            stride_pvn, stride_pvh, stride_pvs,
            stride_kpmb, stride_kpms,
            stride_db, stride_dh, stride_ds,
            stride_lb, stride_lh,
            stride_dqb, stride_dqh, stride_dqs,
            Hkv, Sq, Skv, D: tl.constexpr, window, qk_scale, softcap_inv, softcap_log2,
            M_BUCKET, KV_BUCKET,
            G: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
            HAS_KPM: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr,
            HOIST: tl.constexpr,
            BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)   # heaviest tiles first
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hkv).to(tl.int64)
    h = pid_bh % Hkv
    h64 = h.to(tl.int64)
    Hq = Hkv * G
    start_m = pid_m * BLOCK_M
    q, do, lse2, delta, offs_i = _load_query_tile(
        Q, DO, LSE, DELTA, b, h, start_m, Hq, Sq, D, stride_qb, stride_qh, stride_qs,
        stride_db, stride_dh, stride_ds, stride_lb, stride_lh, G, BLOCK_M, BLOCK_D, HOIST)
    offs_d = tl.arange(0, BLOCK_D)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # -- prefix of entry prefix_ids[b] ----
    entry = tl.load(PIDS + b).to(tl.int64)
    plen = tl.load(PLENS + entry).to(tl.int32)
    PKb = PK + entry * stride_pkn + h64 * stride_pkh
    PVb = PV + entry * stride_pvn + h64 * stride_pvh
    plen_full = plen // BLOCK_N * BLOCK_N
    dq = _dq_inner(dq, q, do, lse2, delta, PKb, PVb, stride_pks, stride_pvs, KPM, 0,
                   0, plen_full, plen, offs_i, offs_d, D, 0, 0, qk_scale, softcap_inv,
                   softcap_log2, False, True, False, False, False, SOFTCAP, BLOCK_N, DOT_PREC)
    dq = _dq_inner(dq, q, do, lse2, delta, PKb, PVb, stride_pks, stride_pvs, KPM, 0,
                   plen_full, plen, plen, offs_i, offs_d, D, 0, 0, qk_scale, softcap_inv,
                   softcap_log2, True, True, False, False, False, SOFTCAP, BLOCK_N, DOT_PREC)
    # -- own keys ----
    off = Skv - Sq
    i_lo = start_m // G
    i_hi = tl.minimum((start_m + BLOCK_M - 1) // G, Sq - 1)
    lo, full_lo, full_hi, hi = own_ranges(i_lo, i_hi, off, window, Skv, BLOCK_N,
                                          CAUSAL, HAS_WINDOW)
    Kb = K + b * stride_kb + h64 * stride_kh
    Vb = V + b * stride_vb + h64 * stride_vh
    KPMb = KPM + b * stride_kpmb
    dq = _dq_inner(dq, q, do, lse2, delta, Kb, Vb, stride_ks, stride_vs, KPMb, stride_kpms,
                   full_lo, full_hi, Skv, offs_i, offs_d, D, off, window, qk_scale, softcap_inv,
                   softcap_log2, HAS_KPM, False, CAUSAL, HAS_WINDOW, HAS_KPM, SOFTCAP, BLOCK_N,
                   DOT_PREC)
    dq = _dq_inner(dq, q, do, lse2, delta, Kb, Vb, stride_ks, stride_vs, KPMb, stride_kpms,
                   lo, full_lo, Skv, offs_i, offs_d, D, off, window, qk_scale, softcap_inv,
                   softcap_log2, True, False, CAUSAL, HAS_WINDOW, HAS_KPM, SOFTCAP, BLOCK_N,
                   DOT_PREC)
    dq = _dq_inner(dq, q, do, lse2, delta, Kb, Vb, stride_ks, stride_vs, KPMb, stride_kpms,
                   full_hi, hi, Skv, offs_i, offs_d, D, off, window, qk_scale, softcap_inv,
                   softcap_log2, True, False, CAUSAL, HAS_WINDOW, HAS_KPM, SOFTCAP, BLOCK_N,
                   DOT_PREC)
    # dS was taken w.r.t. q.k (softcap derivative included): apply the softmax scale once
    dq = dq * (qk_scale / LOG2E)
    # store indices from packed_rows, not from _load_query_tile: torch.compile's mutation
    # analysis would see a pointer derived from Q/DO/LSE/DELTA and mark them written
    _, row_ok, rows, heads = packed_rows(start_m, h, Sq, G, BLOCK_M)
    ptrs = (DQ + b * stride_dqb + heads[:, None] * stride_dqh
            + rows[:, None].to(tl.int64) * stride_dqs + offs_d[None, :])
    tl.store(ptrs, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < D))


def prefix_row_lists(prefix_ids: torch.Tensor, num_entries: int):
    """Rows grouped by bank entry, without a device sync.

    prefix_ids [B] int64 -> (rows [B] int64: row indices sorted by entry (stable),
    offsets [N + 1] int64: entry n's rows are rows[offsets[n]:offsets[n + 1]]).
    """
    sorted_ids, rows = torch.sort(prefix_ids, stable=True)
    bounds = torch.arange(num_entries + 1, device=prefix_ids.device, dtype=sorted_ids.dtype)
    offsets = torch.searchsorted(sorted_ids, bounds)
    return rows.contiguous(), offsets.to(torch.int64).contiguous()


# The own dK/dV loop masks only the query tiles on the causal diagonal / window edges (True) or
# every tile (False, as before 2026-11-28). Same math: bitwise equal in the interpreter; on a
# GPU the compiler may fuse an unmasked tile's scale and LSE subtraction into one FMA
# (last-bit differences). The switch exists for the same-run comparison in
# bench/bench_triton_gpu.py and for the test of that equality.
SPLIT_MASKED_TILES = True

# Packed query tiles address q, dO, LSE and Delta as a per-tile scalar plus loop-invariant
# offsets when G divides BLOCK_M (True), or recompute every row's head and query (False, as
# before 2026-11-28). Same loads and arithmetic: bitwise-equal gradients. The switch exists for
# the same-run comparison in bench/bench_triton_gpu.py and for the test of that equality.
HOIST_QUERY_OFFSETS = True

# Packed query rows per prefix-gradient chunk are a multiple of this (the largest BLOCK_M).
_CHUNK_ALIGN = 16 if interpreting() else 128


def _prefix_chunks(device: torch.device, M: int, P: int, programs: int):
    """Split of the packed queries (M = G * Sq per row) for the prefix dK/dV.

    A program per (prefix tile, entry, kv head) alone is far too few at P = 128; each chunk
    of queries gets its own program (about four per SM in all) and writes fp32 partial sums,
    summed afterwards in a fixed order. Returns (chunks, packed rows per chunk).
    """
    if interpreting() or device.type != "cuda":
        chunk_rows = _CHUNK_ALIGN * max(1, cdiv(M, 2 * _CHUNK_ALIGN))  # 2 chunks: tested
    else:
        tiles = programs * cdiv(P, 64)
        want = max(1, cdiv(4 * sm_count(device), tiles))
        chunk_rows = _CHUNK_ALIGN * max(1, cdiv(M, want * _CHUNK_ALIGN))
    return cdiv(M, chunk_rows), chunk_rows


def attn_bwd(dout, q, k, v, prefix_k, prefix_v, prefix_ids, prefix_lens, key_padding_mask,
             out, lse, dlse, dq, dk, dv, dprefix_k, dprefix_v,
             causal: bool, scale: float, window: int, softcap: float) -> None:
    """Launch the backward kernels; writes dq, dk, dv, dprefix_k, dprefix_v in place.

    Shapes as in ``attn_fwd``; dout/out [B, Hq, Sq, D], lse and dlse (the LSE's gradient, or
    None) [B, Hq, Sq] fp32; each gradient
    has its input's shape (last dim contiguous). Every element of every gradient is written.
    """
    B, Hq, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    N, P = prefix_k.shape[0], prefix_k.shape[2]
    G = Hq // Hkv if Hkv else 1
    has_softcap = softcap > 0.0
    log2e = 1.4426950408889634
    qk_scale = scale * log2e
    softcap_inv = scale / softcap if has_softcap else 0.0
    softcap_log2 = softcap * log2e
    block_d = head_block(D)
    common = dict(DOT_PREC=dot_precision(q.dtype), BLOCK_D=block_d, SOFTCAP=has_softcap, G=G,
                  CAUSAL=bool(causal), HOIST=HOIST_QUERY_OFFSETS)
    M = G * Sq
    m_bucket, kv_bucket = bucket(M), bucket(Skv + P)
    if B == 0 or Sq == 0 or Hkv == 0:
        # no query: every gradient is zero
        for t in (dq, dk, dv, dprefix_k, dprefix_v):
            t.zero_()
        return

    delta = torch.empty((B, Hq, Sq), device=q.device, dtype=torch.float32)
    wrap_triton(_bwd_delta)[(B * Hq * cdiv(Sq, 16),)](
        out, dout, delta if dlse is None else dlse, delta, out.stride(0), out.stride(1),
        out.stride(2), dout.stride(0), dout.stride(1), dout.stride(2), Hq, Sq, D, BLOCK_M=16,
        BLOCK_D=block_d, HAS_DLSE=dlse is not None)

    kpm = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else prefix_ids
    kpm_strides = (kpm.stride(0), kpm.stride(1)) if key_padding_mask is not None else (0, 0)
    flags = dict(HAS_WINDOW=window > 0, HAS_KPM=key_padding_mask is not None)
    scal = (qk_scale, softcap_inv, softcap_log2)

    chunks_of_rows = row_chunks(B, Hkv)  # one program per (row, kv head) on grid axis 1
    for r, n in chunks_of_rows if Skv > 0 else ():
        wrap_triton(_bwd_dkdv_own)[lambda meta, n=n: (cdiv(Skv, meta["BLOCK_N"]), n * Hkv)](
            *(rows_of(t, r) for t in (q, k, v, dout, lse, delta, kpm, dk, dv)),
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            dout.stride(0), dout.stride(1), dout.stride(2),
            lse.stride(0), lse.stride(1),
            kpm_strides[0], kpm_strides[1],
            dk.stride(0), dk.stride(1), dk.stride(2),
            dv.stride(0), dv.stride(1), dv.stride(2),
            Hkv, Sq, Skv, D, window, *scal, m_bucket, kv_bucket, SPLIT=SPLIT_MASKED_TILES,
            **common, **flags)

    if P > 0 and N > 0:
        rows, offsets = prefix_row_lists(prefix_ids, N)
        chunks, chunk_rows = _prefix_chunks(q.device, M, P, N * Hkv)
        if chunks == 1:
            gk, gv = dprefix_k, dprefix_v
            ck = cv = 0
        else:
            # fp32 partial sums per chunk, reduced below in a fixed order (no atomics)
            gk = torch.empty((chunks,) + tuple(dprefix_k.shape), device=q.device,
                             dtype=torch.float32)
            gv = torch.empty_like(gk)
            ck, cv = gk.stride(0), gv.stride(0)
            gk_, gv_ = gk[0], gv[0]
        sk = dprefix_k.stride() if chunks == 1 else gk_.stride()
        sv = dprefix_v.stride() if chunks == 1 else gv_.stride()
        wrap_triton(_bwd_dkdv_prefix)[
            lambda meta: (cdiv(P, meta["BLOCK_N"]), N * Hkv, chunks)](
            q, prefix_k, prefix_v, dout, lse, delta, prefix_lens, rows, offsets, gk, gv,
            q.stride(0), q.stride(1), q.stride(2),
            prefix_k.stride(0), prefix_k.stride(1), prefix_k.stride(2),
            prefix_v.stride(0), prefix_v.stride(1), prefix_v.stride(2),
            dout.stride(0), dout.stride(1), dout.stride(2),
            lse.stride(0), lse.stride(1),
            ck, sk[0], sk[1], sk[2],
            cv, sv[0], sv[1], sv[2],
            Hkv, Sq, P, chunk_rows, D, *scal, m_bucket, kv_bucket, **common)
        if chunks > 1:
            dprefix_k.copy_(gk.sum(0))
            dprefix_v.copy_(gv.sum(0))

    for r, n in chunks_of_rows:
        wrap_triton(_bwd_dq)[lambda meta, n=n: (cdiv(M, meta["BLOCK_M"]), n * Hkv)](
            rows_of(q, r), rows_of(k, r), rows_of(v, r), prefix_k, prefix_v,
            rows_of(prefix_ids, r), prefix_lens,
            *(rows_of(t, r) for t in (kpm, dout, lse, delta, dq)),
            *row_kernel_strides(q, k, v, prefix_k, prefix_v, kpm_strides, dout, lse),
            dq.stride(0), dq.stride(1), dq.stride(2),
            Hkv, Sq, Skv, D, window, *scal, m_bucket, kv_bucket, **common, **flags)
