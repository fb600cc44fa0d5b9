"""bench/run_all.py: README blocks are refreshed from result files, history is appended."""
import importlib.util
import json
import os
import re

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
    # a smoke run writes <out>_quick, never <out> (the committed result's stem)
    assert sorted(os.listdir(tmp_path)) == ["pk_quick.json", "pk_quick.md"]
    res = json.loads((tmp_path / "pk_quick.json").read_text())
    (row,) = res["rows"]
    assert res["smoke"] is True
    assert row["fused_ms"] > 0 and row["dense_ms"] > 0 and row["T"] == 128
    md = (tmp_path / "pk_quick.md").read_text()
    assert md.startswith("Smoke run") and "| 64+40+24 | 128 |" in md


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
    assert sorted(os.listdir(tmp_path)) == ["gen_quick.json", "gen_quick.md"]   # a smoke run
    res = json.loads((tmp_path / "gen_quick.json").read_text())
    (row,) = res["rows"]
    assert row["same_tokens"] and len(row["ms"]) == 3 and all(v > 0 for v in row["ms"].values())
    assert row["prompt_copies_bytes"]["copied per row"] == 3 * row["prompt_copies_bytes"]["ours"]
    md = (tmp_path / "gen_quick.md").read_text()
    assert md.startswith("Smoke run") and md.count("\n| ") == 2   # header + 1 row


def _run_script(name, *args, timeout=600):
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", name), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("script, extra", [("bench_cpu_kernel.py", ["--reps", "1"]),
                                           ("bench_decode.py", ["--budget-s", "0", "--threads", "1"])])
def test_smoke_runs_never_write_the_committed_stem(tmp_path, script, extra):
    """--quick writes <out>_quick with a caption saying it is a smoke run: a later README
    refresh, which reads <out>.md, cannot publish it."""
    _run_script(script, "--quick", "--out", str(tmp_path / "r"), *extra)
    names = sorted(n for n in os.listdir(tmp_path) if not n.endswith(".png"))
    assert names == ["r_quick.json", "r_quick.md"]
    assert (tmp_path / "r_quick.md").read_text().startswith("Smoke run")


def test_cpu_kernel_bench_other_shape_is_not_the_readme_table(tmp_path):
    _run_script("bench_cpu_kernel.py", "--reps", "1", "--shape", "1,2,1,16,32,8",
                "--out", str(tmp_path / "r"))
    assert sorted(os.listdir(tmp_path)) == ["r_shape_1-2-1-16-32-8.json", "r_shape_1-2-1-16-32-8.md"]


def test_run_all_quick_uses_the_smoke_stems(tmp_path, monkeypatch):
    """run_all --quick: every benchmark's history entry is found under <stem>_quick (it
    looked for memory.json / train_cpu.json and skipped most), in a scratch folder, README
    untouched. The scripts are stood in for by one that writes what the real ones write."""
    run_all = _load()
    monkeypatch.setattr(run_all.tempfile, "mkdtemp", lambda prefix: str(tmp_path))
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    import record

    def fake_call(cmd, cwd=None):
        out = cmd[cmd.index("--out") + 1]
        name = next(n for n, b in run_all.BENCHMARKS.items() if cmd[1].endswith(b[0]))
        stem = run_all.BENCHMARKS[name][2]
        assert cmd[4:] == run_all.BENCHMARKS[name][1]
        target = out if run_all.BENCHMARKS[name][3] == "stem" else os.path.join(out, stem)
        record.write_results(target, {"rows": [name]}, "table\n", smoke=True)
        return 0
    monkeypatch.setattr(run_all.subprocess, "call", fake_call)
    before = open(os.path.join(ROOT, "README.md")).read()
    assert run_all.main(["--quick"]) == 0
    entries = [json.loads(l) for l in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert [e["benchmark"] for e in entries] == list(run_all.BENCHMARKS)
    assert open(os.path.join(ROOT, "README.md")).read() == before
    for name, (script, quick_args, stem, kind) in run_all.BENCHMARKS.items():
        assert "--quick" in quick_args, name     # each script's own smoke flag, no sizes here



def _bench_serve(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))   # its `from record import ...`
    spec = importlib.util.spec_from_file_location("bench_serve", os.path.join(ROOT, "bench", "bench_serve.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.hf
def test_serve_bench_quick_answers_are_generate_s(tmp_path, monkeypatch):
    """bench/bench_serve.py --quick: both servers timed at each C, and what each answered
    (recorded in the JSON) is `prefix-attn generate`'s for the same requests, computed here
    again on the benchmark's model and prefixes."""
    import subprocess
    import sys
    from prefix_attn import serve
    out = tmp_path / "sv"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_serve.py"), "--quick", "--reps", "1",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(os.listdir(tmp_path)) == ["sv_quick.json", "sv_quick.md"]   # a smoke run
    res = json.loads((tmp_path / "sv_quick.json").read_text())
    assert res["smoke"] is True and [r["C"] for r in res["rows"]] == [1, 4]
    for r in res["rows"]:
        modes = r["modes"]
        assert sorted(modes) == ["batched", "one at a time"]
        for s in modes.values():
            assert s["req_s"] > 0 and s["tok_s"] > 0 and 0 < s["p50_ms"] <= s["p95_ms"]
        assert r["speedup"] == modes["batched"]["req_s"] / modes["one at a time"]["req_s"]
    assert res["checked"] == sum(s["requests"] for r in res["rows"] for s in r["modes"].values()) == 2 * (3 + 4)
    bench = _bench_serve(monkeypatch)
    options = bench.make_fixtures(str(tmp_path / "fixtures"), quick=True)
    for mode, answers in res["answers"].items():
        assert answers and {a["prefix"] for a in answers} <= set(bench.prefix_names(quick=True))
        src, dst = tmp_path / "r.jsonl", tmp_path / "a.jsonl"
        src.write_text("".join(json.dumps({"prefix": a["prefix"], "prompt": a["prompt"]}) + "\n" for a in answers))
        assert serve.main(["-i", str(src), "-o", str(dst), "--no-progress", "--max-new-tokens", "4", *options]) == 0
        expected = [json.loads(line) for line in dst.read_text().splitlines()]
        assert [(a["text"], a["completion_tokens"], a["finish_reason"]) for a in answers] == \
               [(e["completion"], e["num_tokens"], e["finish_reason"]) for e in expected], mode
    md = (tmp_path / "sv_quick.md").read_text()
    assert md.startswith("Smoke run") and md.count("\n| ") == 3   # header + 2 rows


@pytest.mark.parametrize("status, body, words", [
    (503, {"error": {"message": "out of memory"}}, "answered 503"),
    (200, {"choices": [{"text": "xy", "finish_reason": "length"}], "usage": {"completion_tokens": 4}},
     "generate ('ab', 4, 'length')"),
    (200, {"choices": [{"text": "ab", "finish_reason": "stop"}], "usage": {"completion_tokens": 4}},
     "generate ('ab', 4, 'length')"),
])
def test_serve_bench_refuses_errors_and_wrong_answers(status, body, words, monkeypatch):
    """An answer counts only as a 200 of generate's text, token count and finish_reason."""
    bench = _bench_serve(monkeypatch)
    with pytest.raises(bench.BenchError, match=re.escape(words)):
        bench.checked(status, body, {"prompt": "p"}, ("ab", 4, "length"))
    assert bench.checked(200, {"choices": [{"text": "ab", "finish_reason": "length"}],
                               "usage": {"completion_tokens": 4}}, {}, ("ab", 4, "length")) == ("ab", 4, "length")
