"""Multi-task prefix tuning under FSDP2 (`fully_shard`, 2 CPU processes, gloo), one spawn for
every case (start-up dominates):

* the layers and the root sharded, rank 0's rows on prefix "a", rank 1's on "b" and none:
  the prefix gradients equal one process computing the mean of the two ranks' losses (FSDP2
  needs every rank to use the same parameters; an entry unused on one rank gave wrong
  gradients with no error);
* each trainable entry its own FSDP unit as well (its gathered weight is freed after its
  forward: the prefix must not be a view of it), and an evaluation forward there equal to one
  process (every rank calls every such entry); a projected one without FSDP's view warning;
* mixed precision (bf16 parameters for the forward, the bank attached in float32);
* saving while sharded, and a sharded PrefixBank: clear errors, no hang.
"""
import os
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("torch.distributed.fsdp")
pytestmark = pytest.mark.hf

sys.path.insert(0, os.path.dirname(__file__))  # spawned workers import this module
from test_ddp import WORLD, _model, _prefix_grads  # noqa: E402

ROWS = {0: ["a", "a"], 1: ["b", None]}  # "b" unused on rank 0, "a" on rank 1, "c" everywhere
CASES = ("layers", "entries", "bf16")


def _batch(rank):
    g = torch.Generator().manual_seed(rank + 1)
    ids = torch.randint(3, 100, (2, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding in one row
    return ids, mask


def _loss(model, rank):
    ids, mask = _batch(rank)
    return model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100),
                 prefixes=ROWS[rank]).loss


def _eval_logits(model, rank):
    """An evaluation forward (no_grad): with each entry its own FSDP unit, a rank called only the
    entries its rows select, so rank 0's all-gather of "a" met rank 1's of "b" (each got a mix
    of both shards: logits 0.3-0.5 off, silently; a crash where one rank selected none)."""
    ids, mask = _batch(rank)
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, prefixes=ROWS[rank]).logits


def _sharded(case):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model, modules = _model(checkpointing=False)
    kw = {}
    if case == "bf16":
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                               reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, **kw)
    if case == "entries":
        for m in model.prefix_bank.trainable.values():
            fully_shard(m)
    fully_shard(model, **kw)
    return model, modules


def _full_grads(modules):
    return {name: None if g is None else g.full_tensor()
            for name, g in ((n, m.embedding.weight.grad) for n, m in modules.items())}


def _projected_entry_warnings(rank):
    """A projected prefix made an FSDP unit of its own returned a view of its MLP's output:
    FSDP2 warned on every forward that backward could fail or be wrong (it was not)."""
    import warnings

    from torch.distributed.fsdp import fully_shard

    import prefix_attn
    from prefix_attn.tiny import tiny_model

    torch.manual_seed(0)
    model = tiny_model("llama")
    for name in ("a", "b"):
        prefix_attn.prefix_tuning(model, num_virtual_tokens=3, projection_hidden_size=8, name=name)
    for layer in model.model.layers:
        fully_shard(layer)
    for m in model.prefix_bank.trainable.values():
        fully_shard(m)
    fully_shard(model)
    model.train()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _loss(model, rank).backward()
    return [str(w.message) for w in seen if "view" in str(w.message)]


def _worker(rank, init_file, out_dir):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        results = {}
        for case in CASES:
            model, modules = _sharded(case)
            _loss(model, rank).backward()
            results[case] = _full_grads(modules)
            if case == "layers":  # after a step the entries hold DTensor shards
                for call in (lambda: model.prefix_bank.save(os.path.join(out_dir, f"bank{rank}")),
                             lambda: model.prefix_bank.save_peft("a", os.path.join(out_dir, f"a{rank}"))):
                    with pytest.raises(ValueError, match="sharded by FSDP"):
                        call()
            if case == "entries" and rank == 0:  # one rank alone: an error, not a hang
                with pytest.raises(ValueError, match="sharded by FSDP"):
                    model.prefix_bank.save_peft("a", os.path.join(out_dir, "a"))
            if case == "entries":
                torch.save(_eval_logits(model, rank), os.path.join(out_dir, f"eval{rank}.pt"))
            dist.barrier()
        results["view_warnings"] = _projected_entry_warnings(rank)
        model, _ = _model(checkpointing=False)
        fully_shard(model.prefix_bank)  # the bank's forward never runs: nothing gathers it
        with pytest.raises(ValueError, match="not the PrefixBank itself"):
            _loss(model, rank)
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "grads.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_fsdp2_prefix_grads_equal_single_process_mean(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD)
    got = torch.load(tmp_path / "grads.pt")
    assert got.pop("view_warnings") == []

    model, modules = _model(checkpointing=False)
    (sum(_loss(model, r) for r in range(WORLD)) / WORLD).backward()
    want = _prefix_grads(modules)
    assert want["c"] is None
    for name in ("a", "b"):
        assert want[name] is not None and want[name].abs().sum() > 0
    for case in CASES:
        for name in ("a", "b"):
            tol = dict(rtol=5e-2, atol=5e-4) if case == "bf16" else dict(rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(got[case][name], want[name], **tol,
                                       msg=lambda m, case=case, name=name: f"{case} {name}: {m}")
        # every trainable entry takes part on every rank: "c" gets an exact zero gradient
        torch.testing.assert_close(got[case]["c"], torch.zeros_like(want["a"]), rtol=0, atol=0)
    for rank in range(WORLD):
        torch.testing.assert_close(torch.load(tmp_path / f"eval{rank}.pt"), _eval_logits(model, rank),
                                   rtol=1e-5, atol=1e-5)
