"""bench/record.py: what every CPU result records of its machine, versions, date and load."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "bench"))
import record  # noqa: E402


def test_environment_records_versions_date_and_load_before_and_after():
    env = record.cpu_environment(load_before=[1.5, 1.0, 0.5])
    assert env["torch"] and env["date"] and env["load_before"] == 1.5 and "load" in env
    for name in ("transformers", "peft"):
        assert name in env                               # None when not installed
    pytest.importorskip("transformers")
    import transformers
    assert env["transformers"] == transformers.__version__


def test_provenance_says_not_recorded_for_what_an_older_result_lacks():
    new = {"date": "2026-12-06T01:02:03+00:00", "torch": "2.13", "transformers": "5.25",
           "load_before": 1.25, "load": 2.5}
    assert record.provenance(new) == ("2026-12-06, torch 2.13, transformers 5.25, "
                                      "load average 1.25 before / 2.50 after")
    old = {"torch": "2.13", "load": 2.5}
    assert record.provenance(old) == ("date not recorded, torch 2.13, transformers not "
                                      "recorded, load average not recorded before / 2.50 after")


def _bench_module(name, monkeypatch):
    import importlib.util
    root = os.path.join(os.path.dirname(__file__), os.pardir)
    monkeypatch.syspath_prepend(os.path.join(root, "bench"))
    # bench_launch_overhead drops TRITON_INTERPRET from the environment when imported: put
    # back what the session had after the test
    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "0"))
    spec = importlib.util.spec_from_file_location(name, os.path.join(root, "bench", name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_train_table_is_rendered_from_its_json_with_date_and_versions(tmp_path, monkeypatch):
    """bench_train --render JSON rewrites the .md from the result alone: the date, torch,
    transformers, peft and the loads it recorded, 'not recorded' for what an older one lacks."""
    import json
    train = _bench_module("bench_train", monkeypatch)
    root = os.path.join(os.path.dirname(__file__), os.pardir, "bench", "results")
    with open(os.path.join(root, "train_cpu.json")) as f:
        result = json.load(f)
    # a result as older runs wrote it: no transformers, peft or load averages
    old = {k: v for k, v in result.items()
           if k not in ("transformers", "peft", "load_average_before", "load_average")}
    old["timestamp"] = "2026-11-28T19:00:00Z"
    caption = train.markdown(old).splitlines()[0]
    assert "2026-11-28, torch 2.13.0+cpu, transformers not recorded, peft not recorded" in caption
    assert "load average not recorded" in caption
    new = dict(old, transformers="5.25.0", peft="0.21.2", load_average_before=[1.0, 1, 1],
               load_average=[1.5, 1, 1])
    (tmp_path / "r.json").write_text(json.dumps(new))
    assert train.main(["--render", str(tmp_path / "r.json")]) == 0
    md = (tmp_path / "r.md").read_text()
    assert "transformers 5.25.0, peft 0.21.2, load average 1.00 before / 1.50 after" in md
    assert md.count("\n| ") == 2 + len(old["rows"])


def test_packed_bench_alternates_the_two_paths(monkeypatch):
    """The regrouped kernel and the dense fallback are timed call by call in alternation
    (they were timed in separate blocks: a load change hit one only)."""
    packed = _bench_module("bench_packed", monkeypatch)
    order = []
    monkeypatch.setattr(packed, "_step", lambda fused, *a: order.append(fused))
    packed.measure(packed.QUICK, 3)
    assert order == [True, False] * 4            # one warm-up each, then 3 rounds


def test_launch_overhead_alternates_the_variants_block_by_block(monkeypatch):
    lo = _bench_module("bench_launch_overhead", monkeypatch)
    from prefix_attn.kernels import decode, fwd
    order = []
    monkeypatch.setattr(fwd, "attn_fwd", lambda *a: order.append("per_row"))
    monkeypatch.setattr(decode, "cascade_fwd", lambda *a: order.append(
        "sorted" if decode._entry_tiles == decode._sorted_entry_tiles else "cascade"))
    monkeypatch.setattr(lo, "SHAPES", [(2, 4, 2, 16, 8, 4)])
    lo.measure(2)
    assert decode._entry_tiles != decode._sorted_entry_tiles              # restored
    rounds = order[60:]                                                   # after the warm-ups
    assert rounds == ["per_row", "per_row", "cascade", "cascade", "sorted", "sorted"] * 5
