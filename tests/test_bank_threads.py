"""The bank's writers and set-up under threads: one bank per model however many threads attach
it, entries built before a concurrent dtype / device move stored in the moved dtype, and a
device move while another thread adds and removes trainable entries. (Readers: a running
generate keeps its prefixes, tests/test_serve_api.py.)"""
import sys
import threading
import time

import pytest
import torch

from prefix_attn import hf
from prefix_attn.bank import PrefixBank
from prefix_attn.tiny import tiny_model
from prefix_attn.tuning import PrefixParameters

pytestmark = pytest.mark.hf


def _kv(bank, P=3):
    return torch.randn(2, bank.num_layers, bank.num_kv_heads, P, bank.head_dim)


def test_threads_attaching_one_model_share_one_bank(monkeypatch):
    """attach checks for a bank, does slow work (reads the modeling source), then sets one: two
    threads each made a bank, the last set won and the other thread's entries were lost."""
    model = tiny_model("llama")
    slow = hf.unsupported_model

    def unsupported(m):
        time.sleep(0.05)  # the window in which the other thread attached too
        return slow(m)

    monkeypatch.setattr(hf, "unsupported_model", unsupported)
    start = threading.Barrier(2)
    banks = {}

    def attach_and_add(i):
        start.wait()
        bank = PrefixBank.attach(model)
        banks[i] = bank
        bank.add(f"e{i}", *_kv(bank))

    threads = [threading.Thread(target=attach_and_add, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert banks[0] is banks[1] is model.prefix_bank
    assert sorted(model.prefix_bank.names()) == ["e0", "e1"]
    assert len(model._forward_pre_hooks) == 1


def test_an_entry_built_before_a_dtype_move_is_stored_moved():
    """add converts to the bank's dtype, then commits under the lock: a model.double() in
    between left a float32 entry in a float64 bank (requests using it: TypeError)."""
    model = tiny_model("llama")
    bank = PrefixBank.attach(model)
    entry = bank._fixed_entry("late", torch.cat([k[:, None] for k in _kv(bank)], 1), "fixed")
    assert entry.kv.dtype == torch.float32
    model.double()  # another thread's move, between the conversion and the commit
    bank._commit("late", entry)
    assert bank.get("late")[0].dtype == torch.float64
    ids = torch.randint(3, 100, (1, 4))
    with torch.no_grad():
        assert model(ids, prefixes=["late"]).logits.dtype == torch.float64


def test_a_move_while_trainable_entries_come_and_go():
    """model.to() walks the bank's trainable modules while another thread adds and removes
    them: 'dictionary keys changed during iteration'."""
    model = tiny_model("llama")
    bank = PrefixBank.attach(model)
    errors, stop = [], threading.Event()
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)

    def churn():
        try:
            i = 0
            while not stop.is_set():
                name = f"t{i % 4}"
                if name in bank:
                    bank.remove(name)
                else:
                    bank.add_trainable(name, PrefixParameters(bank.num_layers, bank.num_kv_heads,
                                                              bank.head_dim, 2))
                i += 1
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    worker = threading.Thread(target=churn)
    worker.start()
    try:
        for _ in range(300):
            model.to("cpu")
    except Exception as e:
        errors.append(e)
    finally:
        stop.set()
        worker.join()
        sys.setswitchinterval(interval)
    assert not errors, errors


@pytest.mark.parametrize("change", ["add", "replace", "remove", "clear"])
def test_a_walk_of_the_model_survives_trainable_entries_changing(change):
    """add_trainable reordered the bank's module dict in place (clear, then update) and remove
    deleted from it: another thread walking the model meanwhile (model.train() inside
    add_prompt, named_parameters, state_dict) failed with "dictionary changed size during
    iteration". The dict is now swapped whole; a walk in progress finishes on the old one."""
    model = tiny_model("llama")
    bank = PrefixBank.attach(model)
    dims = (bank.num_layers, bank.num_kv_heads, bank.head_dim)
    for name in ("a", "c"):
        bank.add_trainable(name, PrefixParameters(*dims, 2))
    walk = bank.trainable.named_children()
    first = next(walk)[0]
    if change == "add":
        bank.add_trainable("b", PrefixParameters(*dims, 2))
    elif change == "replace":
        bank.add_trainable("c", PrefixParameters(*dims, 3))
    elif change == "remove":
        bank.remove("c")
    else:
        bank.clear()
    assert [first] + [n for n, _ in walk] == ["a", "c"]  # the walk as it began
    expected = {"add": ["a", "b", "c"], "replace": ["a", "c"], "remove": ["a"], "clear": []}[change]
    assert list(bank.trainable.keys()) == expected
