"""Packed sequences (padding-free training), attention forward + backward on this CPU.

A row packing several sequences (transformers finds them from restarting position_ids) used
to reach the attention function as a dense block-diagonal ``T x T`` mask, which only the
PyTorch fallback can take (`hf.eager_prefix_attention`: materialised scores). Now the
sequences are regrouped one per kernel row (`prefix_attn.packed.packed_attention`). This
script times both on the same tensors, in one run: attention forward + backward of one
layer, one packed row, a shared prefix, fp32, the default backend for CPU tensors.

Writes <out>.json and <out>.md (default bench/results/packed_cpu.*).
"""
from __future__ import annotations

import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from prefix_attn import hf  # noqa: E402
from prefix_attn.demo import paired_ms  # noqa: E402
from record import (cpu_environment, loadavg, parser, provenance, rendered, table,  # noqa: E402
                    write_results)
from prefix_attn.packed import packed_attention, packed_dense_mask  # noqa: E402

SHAPES = [  # (sequence lengths packed in one row, Hq, Hkv, D, P)
    ([512] * 8, 8, 2, 64, 32),
    ([300, 1200, 80, 700, 1500, 316], 8, 2, 64, 32),
    ([256] * 4, 16, 4, 64, 64),
]
QUICK = [([64, 40, 24], 4, 2, 16, 8)]


def _inputs(lens, Hq, Hkv, D, P):
    g = torch.Generator().manual_seed(0)
    T = sum(lens)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).requires_grad_()

    seq = torch.cat([torch.full((n,), i) for i, n in enumerate(lens)])[None]
    return (rnd(1, Hq, T, D), rnd(1, Hkv, T, D), rnd(1, Hkv, T, D), rnd(1, Hkv, P, D),
            rnd(1, Hkv, P, D)), seq, torch.zeros(1, dtype=torch.long), torch.tensor([P])


def _step(fused: bool, tensors, seq, ids, lens, D):
    q, k, v, pk, pv = tensors
    if fused:
        out = packed_attention(q, k, v, seq, pk, pv, prefix_ids=ids, prefix_lens=lens,
                               causal=True, scale=D ** -0.5)
    else:
        dense = packed_dense_mask(seq, True, None)
        out, _ = hf.eager_prefix_attention(q, k, v, pk, pv, ids, lens, None, dense, True,
                                           D ** -0.5, None, None)
    out.sum().backward()
    for t in tensors:
        t.grad = None
    return out


def measure(shapes, reps: int) -> list:
    rows = []
    for lens, Hq, Hkv, D, P in shapes:
        tensors, seq, ids, plens = _inputs(lens, Hq, Hkv, D, P)
        with torch.no_grad():  # the two paths agree before they are timed
            a = packed_attention(*tensors[:3], seq, *tensors[3:], prefix_ids=ids, prefix_lens=plens)
            b, _ = hf.eager_prefix_attention(*tensors, ids, plens, None,
                                             packed_dense_mask(seq, True, None), True, None,
                                             None, None)
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        # alternated call by call (demo.paired_ms): a change of load on the shared cores hits
        # both alike (they were timed in separate blocks)
        fused, dense = paired_ms([lambda: _step(True, tensors, seq, ids, plens, D),
                                  lambda: _step(False, tensors, seq, ids, plens, D)], reps)
        rows.append(dict(lens=lens, T=sum(lens), Hq=Hq, Hkv=Hkv, D=D, P=P, fused_ms=fused,
                         dense_ms=dense, ratio=dense / fused))
        print(rows[-1], flush=True)
    return rows


def markdown(res: dict) -> str:
    env = res["environment"]
    caption = (f"Packed rows, attention forward + backward of one layer, fp32, {env['cpu']}, "
               f"{env['threads']} threads, {provenance(env)}; medians of "
               f"{res['reps']} {'alternating ' if res.get('timing') else ''}runs; ratio = dense-mask fallback "
               "/ regrouped kernel, same run.")
    header = ["sequences packed in one row", "T", "Hq/Hkv", "D", "P", "regrouped kernel ms",
              "dense-mask fallback ms", "ratio"]
    return table(caption, header, [
        ["+".join(map(str, r["lens"])), r["T"], f"{r['Hq']}/{r['Hkv']}", r["D"], r["P"],
         f"{r['fused_ms']:.1f}", f"{r['dense_ms']:.1f}", f"{r['ratio']:.1f}x"] for r in res["rows"]])


def main(argv=None) -> dict:
    p = parser(__doc__, "packed_cpu", reps=3)
    p.add_argument("--quick", action="store_true", help="one small shape (smoke run)")
    a = p.parse_args(argv)
    res = rendered(a, markdown)
    if res is not None:
        return res
    load_before = loadavg()
    rows = measure(QUICK if a.quick else SHAPES, a.reps)
    res = {"environment": cpu_environment(load_before), "reps": a.reps, "rows": rows,
           "timing": "the two paths alternated call by call (demo.paired_ms), medians"}
    write_results(a.out, res, markdown(res), smoke=a.quick)
    return res


if __name__ == "__main__":
    main()
