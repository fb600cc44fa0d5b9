"""The `torch` backend: a PyTorch composite for CPU and CUDA tensors, with no extension.

It never expands a prefix over the batch. For a chunk of queries it computes
  * the attention of every row over its own keys ([B*Hkv, G*C, Skv] scores), and
  * for each bank entry in use, one GEMM of the queries of *all rows that select it* (and
    all query heads of a kv head) against that entry ([Hkv, rows*G*C, P] scores),
and merges the two partial results exactly through their log-sum-exp. The backward
recomputes the scores chunk by chunk from the saved LSE (no [B, H, S, S] tensor is kept).
"""

from typing import List, Optional, Tuple

import torch

from .backends import AnyDevice, Backend, register_backend
from .validation import AttnArgs

# Upper bound on the fp32 elements of one chunk's score matrix (4 MiB): small chunks stay in
# cache and let causal/window chunks skip the keys they cannot see. Measured at B 4, Hq 16,
# S 512, P 64 on 2 cores: 1 << 26 (one chunk) took 3.5x longer than 1 << 20.
_SCORE_BUDGET = 1 << 20
_NEG_INF = float("-inf")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _groups(prefix_ids: torch.Tensor, prefix_lens: torch.Tensor,
            P: int) -> List[Tuple[int, int, torch.Tensor]]:
    """[(entry, length, rows)] for the entries in use with a non-zero length, in entry order.

    Re-checks the ranges (the values are on the host here anyway): an id outside [0, N) would
    otherwise pick an entry by Python's negative indexing, or fail with an IndexError, and a
    length outside [0, P] would be clipped by slicing, if a value changed after validation."""
    ids = prefix_ids.tolist()
    lens = prefix_lens.tolist()
    N = len(lens)
    if any(not 0 <= n < N for n in ids):
        raise ValueError(f"prefix_ids must lie in [0, {N}) for a bank of N={N}, got "
                         f"values in [{min(ids)}, {max(ids)}]")
    if any(not 0 <= L <= P for L in lens):
        raise ValueError(f"prefix_lens must lie in [0, P={P}], got values in "
                         f"[{min(lens)}, {max(lens)}]")
    rows: dict = {}
    for b, n in enumerate(ids):
        if lens[n] > 0:
            rows.setdefault(n, []).append(b)
    dev = prefix_ids.device
    return [(n, lens[n], torch.tensor(r, dtype=torch.long, device=dev)) for n, r in sorted(rows.items())]


def _own_mask(a: AttnArgs, i0: int, i1: int, j0: int, j1: int) -> Optional[torch.Tensor]:
    """Bool [B or 1, C, j1-j0] visibility of own keys j0..j1 for queries i0..i1, or None."""
    Sq, Skv = a.q.shape[2], a.k.shape[2]
    dev = a.q.device
    mask = None
    if a.causal or a.window > 0:
        diag = (Skv - Sq + torch.arange(i0, i1, device=dev))[:, None]
        j = torch.arange(j0, j1, device=dev)[None, :]
        mask = torch.ones(i1 - i0, j1 - j0, dtype=torch.bool, device=dev)
        if a.causal:
            mask &= j <= diag
        if a.window > 0:
            mask &= (diag - j) < a.window
        mask = mask[None]
    if a.key_padding_mask is not None:
        kpm = a.key_padding_mask[:, None, j0:j1]
        mask = kpm if mask is None else mask & kpm
    return mask


def _key_range(a: AttnArgs, i0: int, i1: int) -> Tuple[int, int]:
    """Own keys that any query of i0..i1 may see (tiles outside are skipped)."""
    Sq, Skv = a.q.shape[2], a.k.shape[2]
    hi = Skv if not a.causal else max(0, min(Skv, Skv - Sq + i1))
    lo = 0 if a.window <= 0 else max(0, Skv - Sq + i0 - a.window + 1)
    return min(lo, hi), hi


def _scores(a: AttnArgs, qm, keys):
    """Scaled (and soft-capped) scores; returns (s, tanh) where tanh is kept for backward."""
    s = torch.matmul(qm, keys.transpose(-1, -2)) * a.scale
    if a.softcap > 0:
        t = torch.tanh(s / a.softcap)
        return t * a.softcap, t
    return s, None


def _chunk_size(a: AttnArgs) -> int:
    B, Hq, Hkv, Sq, Skv, N, P, D = a.dims
    per_query = max(1, B * Hq * (Skv + P))
    return max(1, min(Sq, _SCORE_BUDGET // per_query))


def _q_block(a: AttnArgs, ct, i0, i1):
    """q[:, :, i0:i1] as [B, Hkv, G*C, D] in the compute dtype (query heads of a kv head packed)."""
    B, Hq, Hkv = a.q.shape[0], a.q.shape[1], a.k.shape[1]
    G, C, D = Hq // Hkv, i1 - i0, a.q.shape[3]
    return a.q[:, :, i0:i1].to(ct).reshape(B, Hkv, G * C, D)


def _own_scores(a: AttnArgs, qm, k, i0: int, i1: int):
    """Masked scores of the packed queries i0..i1 against the own keys they may see.

    Returns (s [B, Hkv, G*C, L] with -inf where hidden, tanh or None, j0, j1)."""
    B, Hkv = qm.shape[0], qm.shape[1]
    C = i1 - i0
    G = qm.shape[2] // C
    j0, j1 = _key_range(a, i0, i1)
    s, t = _scores(a, qm, k[:, :, j0:j1])
    mask = _own_mask(a, i0, i1, j0, j1)
    if mask is not None:
        s = s.view(B, Hkv, G, C, j1 - j0).masked_fill_(~mask[:, None, None], _NEG_INF).view_as(s)
    return s, t, j0, j1


def _chunks(a: AttnArgs, ct):
    """(i0, i1, packed queries [B, Hkv, G*C, D]) for each chunk of queries."""
    Sq = a.q.shape[2]
    step = _chunk_size(a)
    for i0 in range(0, Sq, step):
        i1 = min(Sq, i0 + step)
        yield i0, i1, _q_block(a, ct, i0, i1)


def _unpack(x, B, Hkv, G, C):
    """[B, Hkv, G*C, ...] -> [B, Hq, C, ...]."""
    return x.reshape(B, Hkv * G, C, *x.shape[3:])


def _fwd(a: AttnArgs):
    B, Hq, Hkv, Sq, Skv, N, P, D = a.dims
    G = Hq // Hkv
    ct = _compute_dtype(a.q.dtype)
    out = torch.empty(B, Hq, Sq, D, dtype=a.q.dtype, device=a.q.device)
    lse = torch.empty(B, Hq, Sq, dtype=torch.float32 if ct == torch.float32 else ct, device=a.q.device)
    groups = _groups(a.prefix_ids, a.prefix_lens, P)
    k, v = a.k.to(ct), a.v.to(ct)
    for i0, i1, qm in _chunks(a, ct):                                      # qm [B, Hkv, M, D]
        C, M = i1 - i0, qm.shape[2]
        # -- own keys ------------------------------------------------------------------
        s, _, j0, j1 = _own_scores(a, qm, k, i0, i1)                        # [B, Hkv, M, L]
        m = s.amax(dim=-1, keepdim=True) if j1 > j0 else s.new_full((B, Hkv, M, 1), _NEG_INF)
        # -- prefix entries: all rows of an entry in one GEMM per kv head --------------
        pre = []
        for n, L, rows in groups:
            qg = qm.index_select(0, rows).transpose(0, 1).reshape(Hkv, -1, D)   # [Hkv, b*M, D]
            sp, _ = _scores(a, qg, a.prefix_k[n, :, :L].to(ct))                  # [Hkv, b*M, L]
            mp = sp.amax(dim=-1).view(Hkv, -1, M).transpose(0, 1)[..., None]    # [b, Hkv, M, 1]
            m.index_copy_(0, rows, torch.maximum(m.index_select(0, rows), mp))
            pre.append((n, L, rows, sp))
        # -- merge: one shared running max, exact sums ---------------------------------
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        e = torch.exp(s - m)
        l = e.sum(dim=-1, keepdim=True)
        acc = torch.matmul(e, v[:, :, j0:j1])                               # [B, Hkv, M, D]
        for n, L, rows, sp in pre:
            mg = m.index_select(0, rows).transpose(0, 1).reshape(Hkv, -1, 1)
            ep = torch.exp(sp - mg)
            lp = ep.sum(dim=-1).view(Hkv, -1, M).transpose(0, 1)[..., None]
            op = torch.matmul(ep, a.prefix_v[n, :, :L].to(ct)).view(Hkv, -1, M, D).transpose(0, 1)
            l.index_add_(0, rows, lp)
            acc.index_add_(0, rows, op)
        o = acc / torch.where(l > 0, l, torch.ones_like(l))
        out[:, :, i0:i1] = _unpack(o, B, Hkv, G, C).to(a.q.dtype)
        lse[:, :, i0:i1] = _unpack((torch.log(l) + m).squeeze(-1), B, Hkv, G, C).to(lse.dtype)
    return out, lse


def _bwd(a: AttnArgs, dout, out, lse, dlse=None):
    B, Hq, Hkv, Sq, Skv, N, P, D = a.dims
    G = Hq // Hkv
    ct = _compute_dtype(a.q.dtype)
    dev = a.q.device
    k, v = a.k.to(ct), a.v.to(ct)
    dq = torch.empty(B, Hq, Sq, D, dtype=a.q.dtype, device=dev)
    dk = torch.zeros(B, Hkv, Skv, D, dtype=ct, device=dev)
    dv = torch.zeros_like(dk)
    dpk = torch.zeros(N, Hkv, P, D, dtype=ct, device=dev)
    dpv = torch.zeros_like(dpk)
    groups = _groups(a.prefix_ids, a.prefix_lens, P)
    for i0, i1, qm in _chunks(a, ct):                                      # qm [B, Hkv, M, D]
        C, M = i1 - i0, qm.shape[2]
        dom = dout[:, :, i0:i1].to(ct).reshape(B, Hkv, M, D)
        lm = lse[:, :, i0:i1].to(ct).reshape(B, Hkv, M, 1)
        lm = torch.where(torch.isfinite(lm), lm, torch.zeros_like(lm))    # empty rows: p == 0
        delta = (dom * out[:, :, i0:i1].to(ct).reshape(B, Hkv, M, D)).sum(-1, keepdim=True)
        if dlse is not None:  # d lse_i / d s_ij = p_ij: the same term as Delta, opposite sign
            delta = delta - dlse[:, :, i0:i1].to(ct).reshape(B, Hkv, M, 1)
        # -- own keys ------------------------------------------------------------------
        s, t, j0, j1 = _own_scores(a, qm, k, i0, i1)
        kr, vr = k[:, :, j0:j1], v[:, :, j0:j1]
        p = torch.exp(s - lm)
        dv[:, :, j0:j1] += torch.matmul(p.transpose(-1, -2), dom)
        ds = p * (torch.matmul(dom, vr.transpose(-1, -2)) - delta)
        if t is not None:
            ds = ds * (1 - t * t)
        ds = ds * a.scale
        dqm = torch.matmul(ds, kr)
        dk[:, :, j0:j1] += torch.matmul(ds.transpose(-1, -2), qm)
        # -- prefix entries (deterministic: one serial reduction per entry) -------------
        for n, L, rows in groups:
            pack = lambda x: x.index_select(0, rows).transpose(0, 1).reshape(Hkv, -1, x.shape[-1])
            qg, dog, lg, dg = pack(qm), pack(dom), pack(lm), pack(delta)
            pk, pv = a.prefix_k[n, :, :L].to(ct), a.prefix_v[n, :, :L].to(ct)
            sp, tp = _scores(a, qg, pk)
            pp = torch.exp(sp - lg)
            dpv[n, :, :L] += torch.matmul(pp.transpose(-1, -2), dog)
            dsp = pp * (torch.matmul(dog, pv.transpose(-1, -2)) - dg)
            if tp is not None:
                dsp = dsp * (1 - tp * tp)
            dsp = dsp * a.scale
            dpk[n, :, :L] += torch.matmul(dsp.transpose(-1, -2), qg)
            dqg = torch.matmul(dsp, pk).view(Hkv, -1, M, D).transpose(0, 1)
            dqm.index_add_(0, rows, dqg)
        dq[:, :, i0:i1] = _unpack(dqm, B, Hkv, G, C).to(a.q.dtype)
    dt = a.q.dtype
    return dq, dk.to(dt), dv.to(dt), dpk.to(dt), dpv.to(dt)


def _args(q, k, v, prefix_k, prefix_v, prefix_ids, prefix_lens, key_padding_mask,
          causal, scale, window, softcap) -> AttnArgs:
    return AttnArgs(q, k, v, prefix_k, prefix_v, prefix_ids, prefix_lens, key_padding_mask,
                    causal, scale, window, softcap)


@torch.library.custom_op("prefix_attn::torch_fwd", mutates_args=())
def torch_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor,
              prefix_v: torch.Tensor, prefix_ids: torch.Tensor, prefix_lens: torch.Tensor,
              key_padding_mask: Optional[torch.Tensor], causal: bool, scale: float,
              window: int, softcap: float) -> Tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return _fwd(_args(q, k, v, prefix_k, prefix_v, prefix_ids, prefix_lens,
                          key_padding_mask, causal, scale, window, softcap))


@torch_fwd.register_fake
def _(q, k, v, prefix_k, prefix_v, prefix_ids, prefix_lens, key_padding_mask, causal, scale,
      window, softcap):
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=lse_dtype)


@torch.library.custom_op("prefix_attn::torch_bwd", mutates_args=())
def torch_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              prefix_k: torch.Tensor, prefix_v: torch.Tensor, prefix_ids: torch.Tensor,
              prefix_lens: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
              out: torch.Tensor, lse: torch.Tensor, dlse: Optional[torch.Tensor], causal: bool,
              scale: float, window: int, softcap: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        a = _args(q, k, v, prefix_k, prefix_v, prefix_ids, prefix_lens, key_padding_mask,
                  causal, scale, window, softcap)
        return _bwd(a, dout, out, lse, dlse)


@torch_bwd.register_fake
def _(dout, q, k, v, prefix_k, prefix_v, prefix_ids, prefix_lens, key_padding_mask, out, lse,
      dlse, causal, scale, window, softcap):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            prefix_k.new_empty(prefix_k.shape), prefix_v.new_empty(prefix_v.shape))


register_backend(Backend(
    name="torch", fwd=torch.ops.prefix_attn.torch_fwd.default,
    bwd=torch.ops.prefix_attn.torch_bwd.default, devices=AnyDevice(), priority=0,
    description="PyTorch composite: per-entry GEMMs merged by LSE, query-chunked"))
