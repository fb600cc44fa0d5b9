"""Multi-task prefix tuning under DistributedDataParallel (2 CPU processes, gloo): each rank
trains on its own rows and prefixes, some prefix unused on a rank; the averaged prefix
gradients equal one process computing the mean of the two ranks' losses. DDP needs
`find_unused_parameters=True` here, as for any model whose batch uses a subset of its
parameters (a prefix no row of a rank selects gets no gradient there)."""
import gc
import os
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytestmark = pytest.mark.hf

WORLD = 2
# rank -> (input seed, prefixes of its two rows): "b" is unused on rank 0, "c" on every rank
ROWS = {0: (1, ["a", "a"]), 1: (2, ["b", None])}
# rank 1's rows select no trainable prefix: its loss reached no parameter, so its DDP reducer
# never joined the all-reduce and both ranks hung (from a training audit)
ROWS_NONE = {0: (1, ["a", "b"]), 1: (2, [None, None])}


def _model(checkpointing):
    import prefix_attn
    from prefix_attn.tiny import tiny_model
    from prefix_attn.tuning import enable_checkpointing

    torch.manual_seed(0)
    model = tiny_model("llama")
    modules = {name: prefix_attn.prefix_tuning(model, num_virtual_tokens=3, name=name)
               for name in ("a", "b", "c")}
    if checkpointing:
        enable_checkpointing(model)
    model.train()
    return model, modules


def _rows(rank, rows=ROWS):
    seed, prefixes = rows[rank]
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (2, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding in one row
    return ids, mask, prefixes


def _loss(model, rank, rows=ROWS):
    ids, mask, prefixes = _rows(rank, rows)
    return model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100),
                 prefixes=prefixes).loss


def _prefix_grads(modules):
    return {name: None if m.embedding.weight.grad is None else m.embedding.weight.grad.clone()
            for name, m in modules.items()}


def _worker(rank, init_file, checkpointing, out_file, rows=ROWS):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        model, modules = _model(checkpointing)
        ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        _loss(ddp, rank, rows).backward()
        if rank == 0:
            torch.save(_prefix_grads(modules), out_file)
        # The DDP reducer goes before its process group: torch 2.13 otherwise aborts at exit
        # now and then ("terminate called without an active exception"), with a bare
        # nn.Linear too (3 of 20 runs; 0 of 40 with this del).
        del ddp
        gc.collect()
    finally:
        dist.destroy_process_group()


def _spawn(args, timeout=240):
    """mp.spawn of the workers, failing (the workers killed) instead of hanging past ``timeout``."""
    import time

    import torch.multiprocessing as mp

    sys.path.insert(0, os.path.dirname(__file__))  # spawned workers import this module
    context = mp.spawn(_worker, args=args, nprocs=WORLD, join=False)
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail(f"the DDP workers did not finish in {timeout} s (a hang)")


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("rows", [ROWS, ROWS_NONE], ids=["some_unused", "rank_without_prefix"])
def test_ddp_prefix_grads_equal_single_process_mean(tmp_path, checkpointing, rows):
    out_file = str(tmp_path / "grads.pt")
    _spawn((str(tmp_path / "init"), checkpointing, out_file, rows))
    got = torch.load(out_file)

    model, modules = _model(checkpointing)
    (sum(_loss(model, r, rows) for r in range(WORLD)) / WORLD).backward()
    want = _prefix_grads(modules)
    # unused on every rank: no gradient at all (a rank selecting no prefix joins "a" only)
    assert want["c"] is None and got["c"] is None
    for name in ("a", "b"):
        assert want[name] is not None and want[name].abs().sum() > 0
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7)
