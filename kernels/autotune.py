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


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) on the host (triton.cdiv is a constexpr function: ~3 us per host call, and a
    decode step makes several per layer). Works on SymInts under torch.compile too."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (n >= 1) on the host, in 0.02 us for an int where
    triton.next_power_of_2 takes 1.5 us; a SymInt (torch.compile) goes to Triton's."""
    if type(n) is int:
        return 1 << (n - 1).bit_length() if n > 1 else 1
    return triton.next_power_of_2(n)


def strides3(t) -> tuple:
    """The first three strides of a 4-D tensor (one `stride()` call: three took 0.46 us, this
    0.12 us; the launchers pass a dozen such triples per call)."""
    return t.stride()[:3]


# CUDA caps grid axes 1 and 2 at 65535 programs (axis 0 at 2**31 - 1).
MAX_GRID_YZ = 65535


def row_chunks(B: int, Hkv: int) -> list:
    """``(rows, n)`` launches for kernels with one program per (row, kv head) on grid axis 1:
    ``[(None, B)]`` (all rows at once, no view made) when ``B * Hkv`` fits the axis, else
    consecutive slices of at most ``MAX_GRID_YZ // Hkv`` rows and their lengths."""
    step = max(1, MAX_GRID_YZ // max(Hkv, 1))
    if B <= step:
        return [(None, B)]
    return [(slice(b, min(B, b + step)), min(B, b + step) - b) for b in range(0, B, step)]


def rows_of(t, r):
    """``t[r]`` (rows ``r`` of a [B, ...] tensor), or ``t`` itself for ``r`` None."""
    return t if r is None else t[r]


def bucket(n: int) -> int:
    """Power-of-two bucket of a length (autotune key): 0 -> 1, 5 -> 8, 64 -> 64."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def _configs(candidates, singles):
    if interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
    # one_config(): candidates from large to small, `prune` keeps the first that fits the call
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in (singles if one_config() else candidates)]


# Full searches are short explicit lists (BLOCK_M, BLOCK_N, warps, stages), not cartesian
# products: each config costs one compile (1-3 s) per kernel and key on first use. Chosen on
# an H200 (bf16, D 128, S 4096): fwd (128, 64, 8, 4), dK/dV own (64, 128, 8, 2), dK/dV prefix
# (32, 128, 8, 3), dQ (128, 32, 8, 3); neighbours of these that ptxas compiles without spills
# were added afterwards (not yet timed).
def fwd_configs():
    """Forward configs: BLOCK_M packed query rows x BLOCK_N keys."""
    return _configs([(128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3), (128, 64, 8, 4),
                     (64, 64, 4, 3), (64, 128, 4, 3), (128, 32, 4, 3), (64, 32, 4, 2)],
                    singles=[(128, 64, 8, 3), (64, 64, 4, 2), (64, 32, 4, 2)])


def dkdv_configs():
    """dK/dV configs: BLOCK_N resident keys, BLOCK_M streamed packed queries. The single
    configs were the ones ptxas compiled without register spills at D = 128 (sm_90) before the
    hoisted query offsets (HOIST, now the default); with them (64, 32, 4, 2) spills 8 bytes
    (own keys) and 104 bytes (prefix) per thread (sm_90 compile, not timed)."""
    return _configs([(32, 128, 4, 3), (32, 128, 8, 3), (64, 128, 8, 2), (64, 128, 8, 3),
                     (64, 64, 4, 3), (32, 64, 4, 3), (64, 32, 4, 2), (32, 32, 4, 2)],
                    singles=[(64, 32, 4, 2), (32, 32, 4, 2), (16, 32, 4, 1)])


def dq_configs():
    """dQ configs: BLOCK_M resident packed queries, BLOCK_N streamed keys."""
    return _configs([(128, 32, 4, 3), (128, 32, 8, 3), (128, 32, 8, 4), (128, 64, 8, 2),
                     (128, 64, 8, 3), (64, 64, 4, 3),
                     (64, 32, 4, 3), (32, 64, 4, 3), (32, 32, 4, 2)],
                    singles=[(128, 32, 8, 2), (64, 32, 4, 2), (32, 32, 4, 1)])


# Shared memory when the device cannot be asked (CPU, tests); H100/H200 allow 227 KiB per
# block, A100 163 KiB.
DEFAULT_SMEM = 200 * 1024
_SMEM_BY_DEVICE = {}


def smem_budget(tensor) -> int:
    """Shared memory per block (opt-in maximum) of the tensor's CUDA device, cached."""
    if tensor is None or getattr(tensor, "device", None) is None or tensor.device.type != "cuda":
        return DEFAULT_SMEM
    idx = tensor.device.index if tensor.device.index is not None else 0
    if idx not in _SMEM_BY_DEVICE:
        import torch

        props = torch.cuda.get_device_properties(idx)
        _SMEM_BY_DEVICE[idx] = int(getattr(props, "shared_memory_per_block_optin", DEFAULT_SMEM))
    return _SMEM_BY_DEVICE[idx]


# Streaming multiprocessors assumed when the device is not known (an H100/H200 has 132).
DEFAULT_SMS = 132
_SMS_BY_DEVICE = {}


def sm_count(device) -> int:
    """Multiprocessors of a CUDA device (cached: launchers ask per call); DEFAULT_SMS elsewhere."""
    if device is None or device.type != "cuda":
        return DEFAULT_SMS
    import torch

    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SMS_BY_DEVICE:
        _SMS_BY_DEVICE[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SMS_BY_DEVICE[idx]


def smem_estimate(block_m, block_n, block_d, stages, elsize, kind="fwd"):
    """Bytes of shared memory a config needs, a fit to what the Triton 3.6 compiler allocated
    for sm_90 (fwd: the query tile plus `stages` buffers of K and V; bwd: `stages` buffers of
    the two streamed tiles plus the two resident ones). Not an upper bound: compiled sizes
    were up to 1 KiB over it, 8 KiB for dQ in fp32 at (32, 64, 4, 3)."""
    if kind == "fwd":
        return elsize * block_d * (block_m + 2 * block_n * stages)
    return elsize * block_d * (2 * block_m * stages + 2 * block_n)


def prune(configs, named_args, kind="fwd", **kwargs):
    """Drop configs that cannot fit or waste work for this call; keep at least one.

    * shared memory over the device's per-block maximum (see smem_estimate);
    * more than 64 packed query rows when ``G * Sq`` is small (decode);
    * accumulators too big for registers (head dim 256 with 128-row tiles; 128x128 tiles
      at head dim 128 only with 8 warps);
    * 8 warps on tiles of fewer than 64x64 elements.
    With PREFIX_ATTN_TRITON_ONE_CONFIG=1 only the first surviving config is kept.
    """
    if len(configs) <= 1:
        return configs
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 128))
    m_bucket = named_args.get("M_BUCKET", kwargs.get("M_BUCKET", 1 << 20))
    q = named_args.get("Q")
    elsize = q.element_size() if q is not None else 2
    budget = smem_budget(q)
    kept = []
    for c in configs:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        if smem_estimate(bm, bn, block_d, c.num_stages, elsize, kind) > budget:
            continue
        if bm > max(64, m_bucket):
            continue
        if block_d >= 256 and bm * bn > 64 * 64:
            continue
        if block_d >= 128 and bn > 64 and bm > 64 and (c.num_warps < 8 or block_d > 128):
            continue
        if c.num_warps == 8 and bm * bn < 64 * 64:
            continue
        kept.append(c)
    if not kept:  # nothing fits the rules: the config needing the least shared memory
        kept = [min(configs, key=lambda c: smem_estimate(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"],
                                                         block_d, c.num_stages, elsize, kind))]
    return kept[:1] if one_config() else kept


def smem_shortfall(kernels, block_d: int, elsize: int, budget: int):
    """For ``kernels`` ((name, kind, configs) of each autotuned kernel): the first none of
    whose configs can fit ``budget`` at this padded head dim and element size, said in words;
    None when each has one that may. It counts one pipeline stage, a lower bound: in each of
    159 sm_90 compiles (Triton 3.6, every kernel, fp16/fp32, head dims 64-256) the compiler
    allocated at least that. (prune would keep the smallest config anyway, and its launch
    would fail: the backend is not chosen for such a call.)"""
    for name, kind, configs in kernels:
        need = min(smem_estimate(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], block_d, 1, elsize,
                                 kind) for c in configs)
        if need > budget:
            return (f"its {name} kernel needs {need} bytes of shared memory per block at this "
                    f"head dim and dtype, the GPU allows {budget}")
    return None


def prune_bwd(configs, named_args, **kwargs):
    """`prune` with the backward's shared-memory estimate."""
    return prune(configs, named_args, kind="bwd", **kwargs)
