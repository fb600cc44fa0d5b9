"""Forward kernel of prefix attention and its launcher.

One program per (packed query tile, row b * kv head h). Its loop runs over
1. the prefix tiles of bank entry ``prefix_ids[b]`` (length ``prefix_lens[...]``, no other
   mask), 2. the own tiles visible to every query of the tile, 3. the own tiles that need
the causal / window / padding / length mask. Online softmax in fp32 with exp2; the LSE
(natural log) is stored for the backward and for merging partial results.
"""

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .autotune import bucket, cdiv, fwd_configs, next_pow2, prune, row_chunks, rows_of, strides3
from .common import LN2, mask_tile, own_ranges, packed_rows, scores


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, K, V, stride_kn, stride_vn, KPM, stride_kpm,
               lo, hi, n_limit, offs_i, offs_d, D, off, window,
               qk_scale, softcap_inv, softcap_log2,
               MASK: tl.constexpr, PREFIX: tl.constexpr, CAUSAL: tl.constexpr,
               HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr, SOFTCAP: tl.constexpr,
               BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    """Online-softmax update over key tiles [lo, hi) of one KV range (prefix or own).

    K, V point at key 0 of the range; keys >= n_limit are never read.
    """
    d_ok = offs_d < D
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_limit
        kt = tl.load(K + offs_n[None, :].to(tl.int64) * stride_kn + offs_d[:, None],
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        # -- compute qk ----
        s, t = scores(q, kt, qk_scale, softcap_inv, softcap_log2, SOFTCAP, DOT_PREC)
        if MASK:
            s = mask_tile(s, offs_i, offs_n, n_ok, n_limit, off, window, KPM, stride_kpm,
                          PREFIX, CAUSAL, HAS_WINDOW, HAS_KPM)
        # -- online softmax (rows that saw nothing yet keep m = -inf without NaN) ----
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + offs_n[:, None].to(tl.int64) * stride_vn + offs_d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _prefix_pass(acc, l_i, m_i, q, PK, PV, stride_pks, stride_pvs, DUMMY, plen, offs_i, offs_d, D,
                 qk_scale, softcap_inv, softcap_log2,
                 SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    """The prefix keys [0, plen) of one bank entry: whole tiles unmasked, then the tile that
    crosses plen masked by the length only (the prefix is always visible, never windowed).
    DUMMY: any pointer (no key padding is read for the prefix)."""
    plen_full = plen // BLOCK_N * BLOCK_N
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, PK, PV, stride_pks, stride_pvs, DUMMY, 0,
                               0, plen_full, plen, offs_i, offs_d, D, 0, 0,
                               qk_scale, softcap_inv, softcap_log2,
                               False, True, False, False, False, SOFTCAP, BLOCK_N, DOT_PREC)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, PK, PV, stride_pks, stride_pvs, DUMMY, 0,
                               plen_full, plen, plen, offs_i, offs_d, D, 0, 0,
                               qk_scale, softcap_inv, softcap_log2,
                               True, True, False, False, False, SOFTCAP, BLOCK_N, DOT_PREC)
    return acc, l_i, m_i


@triton.autotune(configs=fwd_configs(), key=["BLOCK_D", "M_BUCKET", "KV_BUCKET", "CAUSAL"],
                 prune_configs_by={"early_config_prune": prune})
@triton.jit
def _attn_fwd(Q, K, V, PK, PV, PIDS, PLENS, KPM, OUT, LSE,
              stride_qb, stride_qh, stride_qs,
              stride_kb, stride_kh, stride_ks,
              stride_vb, stride_vh, stride_vs,
              stride_pkn, stride_pkh, stride_pks,
              stride_pvn, stride_pvh, stride_pvs,
              stride_kpmb, stride_kpms,
              stride_ob, stride_oh, stride_os,
              stride_lb, stride_lh,
              Hkv, Sq, Skv, D: tl.constexpr, window, qk_scale, softcap_inv, softcap_log2,
              M_BUCKET, KV_BUCKET,
              G: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
              HAS_KPM: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr,
              BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # heaviest (last, causal) query tiles first: better tail balance
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hkv).to(tl.int64)
    h = pid_bh % Hkv
    # -- packed rows: query i, query head h * G + g ----
    offs_m, row_ok, offs_i, heads = packed_rows(pid_m * BLOCK_M, h, Sq, G, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_ptrs = (Q + b * stride_qb + heads[:, None] * stride_qh
              + offs_i[:, None].to(tl.int64) * stride_qs + offs_d[None, :])
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # -- 1. prefix of bank entry prefix_ids[b]: only its length masks ----
    entry = tl.load(PIDS + b).to(tl.int64)
    plen = tl.load(PLENS + entry).to(tl.int32)
    PKb = PK + entry * stride_pkn + h.to(tl.int64) * stride_pkh
    PVb = PV + entry * stride_pvn + h.to(tl.int64) * stride_pvh
    acc, l_i, m_i = _prefix_pass(acc, l_i, m_i, q, PKb, PVb, stride_pks, stride_pvs, KPM, plen,
                                 offs_i, offs_d, D, qk_scale, softcap_inv, softcap_log2,
                                 SOFTCAP, BLOCK_N, DOT_PREC)

    # -- 2./3. own keys: fully visible tiles unmasked, edge tiles masked ----
    off = Skv - Sq
    i_lo = (pid_m * BLOCK_M) // G
    i_hi = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // G, Sq - 1)
    lo, full_lo, full_hi, hi = own_ranges(i_lo, i_hi, off, window, Skv, BLOCK_N,
                                          CAUSAL, HAS_WINDOW)
    Kb = K + b * stride_kb + h.to(tl.int64) * stride_kh
    Vb = V + b * stride_vb + h.to(tl.int64) * stride_vh
    KPMb = KPM + b * stride_kpmb
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, Kb, Vb, stride_ks, stride_vs, KPMb, stride_kpms,
                               full_lo, full_hi, Skv, offs_i, offs_d, D, off, window,
                               qk_scale, softcap_inv, softcap_log2,
                               HAS_KPM, False, CAUSAL, HAS_WINDOW, HAS_KPM, SOFTCAP, BLOCK_N,
                               DOT_PREC)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, Kb, Vb, stride_ks, stride_vs, KPMb, stride_kpms,
                               lo, full_lo, Skv, offs_i, offs_d, D, off, window,
                               qk_scale, softcap_inv, softcap_log2,
                               True, False, CAUSAL, HAS_WINDOW, HAS_KPM, SOFTCAP, BLOCK_N,
                               DOT_PREC)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, Kb, Vb, stride_ks, stride_vs, KPMb, stride_kpms,
                               full_hi, hi, Skv, offs_i, offs_d, D, off, window,
                               qk_scale, softcap_inv, softcap_log2,
                               True, False, CAUSAL, HAS_WINDOW, HAS_KPM, SOFTCAP, BLOCK_N,
                               DOT_PREC)

    # -- epilogue: rows with no visible key -> out 0, lse -inf ----
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * LN2, float("-inf"))
    o_ptrs = (OUT + b * stride_ob + heads[:, None] * stride_oh
              + offs_i[:, None].to(tl.int64) * stride_os + offs_d[None, :])
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < D))
    l_ptrs = LSE + b * stride_lb + heads * stride_lh + offs_i.to(tl.int64)
    tl.store(l_ptrs, lse, mask=row_ok)


def head_block(d: int) -> int:
    """Padded head dim: next power of two, at least 16 (tl.dot's minimum)."""
    return max(16, next_pow2(d))


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 dots (no tf32) so fp32 results match fp32 references."""
    return "ieee" if dtype == torch.float32 else "tf32"


def attn_fwd(q, k, v, prefix_k, prefix_v, prefix_ids, prefix_lens, key_padding_mask,
             out, lse, causal: bool, scale: float, window: int, softcap: float) -> None:
    """Launch the forward kernel; writes ``out`` and ``lse`` in place.

    q [B, Hq, Sq, D], k/v [B, Hkv, Skv, D], prefix_k/prefix_v [N, Hkv, P, D] (any strides,
    last dim contiguous), prefix_ids [B] int64, prefix_lens [N] int64, key_padding_mask
    [B, Skv] bool or None, out [B, Hq, Sq, D], lse [B, Hq, Sq] fp32 (last dim contiguous).
    """
    B, Hq, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    if B == 0 or Sq == 0 or Hq == 0:
        return
    G = Hq // Hkv
    kpm = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else prefix_ids
    kpm_strides = (kpm.stride(0), kpm.stride(1)) if key_padding_mask is not None else (0, 0)
    has_softcap = softcap > 0.0
    log2e = 1.4426950408889634
    qk_scale = scale * log2e
    softcap_inv = scale / softcap if has_softcap else 0.0
    softcap_log2 = softcap * log2e
    M = G * Sq

    for r, n in row_chunks(B, Hkv):  # one program per (row, kv head) on grid axis 1
        def grid(meta, n=n):
            return (cdiv(M, meta["BLOCK_M"]), n * Hkv)

        wrap_triton(_attn_fwd)[grid](
            rows_of(q, r), rows_of(k, r), rows_of(v, r), prefix_k, prefix_v,
            rows_of(prefix_ids, r), prefix_lens,
            *(rows_of(t, r) for t in (kpm, out, lse)),
            *row_kernel_strides(q, k, v, prefix_k, prefix_v, kpm_strides, out, lse),
            Hkv, Sq, Skv, D, window, qk_scale, softcap_inv, softcap_log2,
            bucket(M), bucket(Skv + prefix_k.shape[2]),
            G=G, CAUSAL=bool(causal), HAS_WINDOW=window > 0, HAS_KPM=key_padding_mask is not None,
            SOFTCAP=has_softcap, DOT_PREC=dot_precision(q.dtype), BLOCK_D=head_block(D),
        )


def row_kernel_strides(q, k, v, prefix_k, prefix_v, kpm_strides, out, lse) -> tuple:
    """The stride arguments the per-row forward and the dq kernel share, in their order."""
    return (*strides3(q), *strides3(k), *strides3(v), *strides3(prefix_k), *strides3(prefix_v),
            kpm_strides[0], kpm_strides[1], *strides3(out), *lse.stride()[:2])
