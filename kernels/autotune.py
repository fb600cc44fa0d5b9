"""Autotuning configurations for the prefix-attention Triton kernels.

The kernels are keyed on the padded head dim, the dtype (added by Triton's autotuner for
every tensor argument), the causal flag and power-of-two buckets of the packed query
length (``G * Sq``) and of the key length (``P + Skv``), so a new shape inside a bucket
reuses the tuned config instead of benchmarking again.

Two switches cut the search to a single config:

* ``TRITON_INTERPRET=1`` (CPU interpreter, tests): one small 16x16 tile, which keeps the
  interpreter fast and makes tiny test shapes cross several tile boundaries;
* ``PREFIX_ATTN_TRITON_ONE_CONFIG=1``: one ordinary GPU config (GPU tests, quick runs).

Both are read when ``prefix_attn.kernels`` is first imported.
"""

import os

import triton


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def one_config() -> bool:
    """True when the config search is cut to one config (interpreter or env switch)."""
    return interpreting() or os.environ.get("PREFIX_ATTN_TRITON_ONE_CONFIG", "0") not in ("", "0")


def bucket(n: int) -> int:
    """Power-of-two bucket of a length (autotune key): 0 -> 1, 5 -> 8, 64 -> 64."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def _configs(block_m, block_n, warps, stages, singles):
    if interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
    if one_config():
        # candidates from large to small: `prune` keeps the first that fits the call
        return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
                for bm, bn, w, s in singles]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm in block_m for bn in block_n for w in warps for s in stages]


def fwd_configs():
    """Forward configs: BLOCK_M packed query rows x BLOCK_N keys."""
    return _configs([64, 128], [32, 64, 128], [4, 8], [2, 3, 4],
                    singles=[(128, 64, 8, 3), (64, 64, 4, 2), (64, 32, 4, 2)])


def bwd_configs():
    """Backward configs (dK/dV and dQ): smaller tiles, three accumulators live at once."""
    return _configs([32, 64, 128], [32, 64, 128], [4, 8], [2, 3],
                    singles=[(64, 64, 4, 2), (32, 64, 4, 2), (32, 32, 4, 1)])


# Shared memory we allow a config to need (H100/H200 have 227 KiB per block; estimate is rough).
SMEM_BUDGET = 160 * 1024


def smem_estimate(block_m, block_n, block_d, stages, elsize):
    """Bytes of shared memory a config needs, roughly: the resident tile of one side plus the
    pipelined (stages - 1) buffers of the two streamed tiles of the other side."""
    resident, streamed = min(block_m, block_n), max(block_m, block_n)
    return elsize * block_d * (resident + 2 * streamed * max(1, stages - 1))


def prune(configs, named_args, **kwargs):
    """Drop configs that cannot fit or waste work for this call; keep at least one.

    * shared memory over SMEM_BUDGET (head dim x dtype size x tiles x stages);
    * more than 64 packed query rows when ``G * Sq`` is small (decode);
    * accumulators too big for registers (head dim 256 with 128-row tiles);
    * 8 warps on tiles of fewer than 64x64 elements.
    With PREFIX_ATTN_TRITON_ONE_CONFIG=1 only the first surviving config is kept.
    """
    if len(configs) <= 1:
        return configs
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 128))
    m_bucket = named_args.get("M_BUCKET", kwargs.get("M_BUCKET", 1 << 20))
    q = named_args.get("Q")
    elsize = q.element_size() if q is not None else 2
    kept = []
    for c in configs:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        if smem_estimate(bm, bn, block_d, c.num_stages, elsize) > SMEM_BUDGET:
            continue
        if bm > max(64, m_bucket):
            continue
        if block_d >= 256 and bm * bn > 64 * 64:
            continue
        if block_d >= 128 and bn > 64 and bm > 64:
            continue
        if c.num_warps == 8 and bm * bn < 64 * 64:
            continue
        kept.append(c)
    kept = kept or configs[-1:]
    return kept[:1] if one_config() else kept
