"""bench/run_all.py: README blocks are refreshed from result files, history is appended."""
import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load():
    spec = importlib.util.spec_from_file_location("run_all", os.path.join(ROOT, "bench", "run_all.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_readme_block_replaced_from_result_file(tmp_path):
    run_all = _load()
    (tmp_path / "decode_cpu.md").write_text("| a | b |\n| --- | --- |\n| 1 | 2 |\n")
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- bench:decode_cpu -->\nold table\n<!-- /bench:decode_cpu -->\nend\n")
    assert run_all.refresh_readme(str(tmp_path), str(readme)) == ["decode_cpu"]
    text = readme.read_text()
    assert "old table" not in text and "| 1 | 2 |" in text and text.endswith("end\n")


def test_history_appends_fresh_results(tmp_path):
    run_all = _load()
    (tmp_path / "train_cpu.json").write_text(json.dumps({"rows": [1], "meta": {"torch": "x"}}))
    rec = {"name": "train", "status": "ok", "seconds": 1.0, "stem": "train_cpu"}
    run_all.append_history(str(tmp_path), rec)
    run_all.append_history(str(tmp_path), dict(rec, status="exit 1"))  # failed runs are not recorded
    lines = (tmp_path / "history.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["result"]["rows"] == [1]


def test_launch_overhead_bench_writes_its_table(tmp_path):
    """bench/bench_launch_overhead.py in a subprocess (it needs the non-interpreted kernels)."""
    import subprocess
    import sys
    pytest.importorskip("triton")
    script = os.path.join(os.path.dirname(__file__), "..", "bench", "bench_launch_overhead.py")
    out = tmp_path / "lo"
    proc = subprocess.run([sys.executable, script, "--reps", "3", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "lo.json").read_text())
    assert len(res["rows"]) == 3
    for r in res["rows"]:
        assert r["per_row_us"] > 0 and r["cascade_us"] > 0 and r["cascade_sorted_us"] > 0
    assert (tmp_path / "lo.md").read_text().count("\n| ") == 4   # header + 3 rows


def test_packed_bench_quick_writes_its_table(tmp_path):
    """bench/bench_packed.py --quick: both paths agree (checked inside) and are timed."""
    import subprocess
    import sys
    script = os.path.join(ROOT, "bench", "bench_packed.py")
    out = tmp_path / "pk"
    proc = subprocess.run([sys.executable, script, "--quick", "--reps", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads((tmp_path / "pk.json").read_text())["rows"]
    assert row["fused_ms"] > 0 and row["dense_ms"] > 0 and row["T"] == 128
    assert "| 64+40+24 | 128 |" in (tmp_path / "pk.md").read_text()


@pytest.mark.hf
def test_generate_bench_quick_writes_its_table(tmp_path):
    """bench/bench_generate.py --quick: the three ways give the same tokens (checked inside,
    exit status otherwise) and are timed."""
    import subprocess
    import sys
    script = os.path.join(os.path.dirname(__file__), "..", "bench", "bench_generate.py")
    out = tmp_path / "gen"
    proc = subprocess.run([sys.executable, script, "--quick", "--reps", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "gen.json").read_text())
    (row,) = res["rows"]
    assert row["same_tokens"] and len(row["ms"]) == 3 and all(v > 0 for v in row["ms"].values())
    assert row["prompt_copies_bytes"]["copied per row"] == 3 * row["prompt_copies_bytes"]["ours"]
    assert (tmp_path / "gen.md").read_text().count("\n| ") == 2   # header + 1 row
