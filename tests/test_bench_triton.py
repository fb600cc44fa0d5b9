"""The CPU-checkable parts of bench/bench_triton_gpu.py: arguments, FLOP counting, targets
and the JSON it writes (--dry-run: tiny sizes, torch backend, wall clock)."""
import importlib.util
import json
import os

import pytest

_PATH = os.path.join(os.path.dirname(__file__), "..", "bench", "bench_triton_gpu.py")


@pytest.fixture(scope="module")
def bench():
    pytest.importorskip("triton")
    spec = importlib.util.spec_from_file_location("bench_triton_gpu", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_defaults_are_the_h200_target_shape(bench):
    a = bench.parse_args(["--out", "x"])
    assert (a.batch, a.hq, a.hkv, a.head_dim, a.seq, a.dtype) == (8, 32, 8, 128, 4096, "bf16")
    assert a.prefix_lens == [16, 64, 128, 256] and bench.TARGET_P in a.prefix_lens
    with pytest.raises(SystemExit):
        bench.parse_args(["--out", "x", "--modes", "fwd,nope"])


def test_flop_counting(bench):
    # S queries over P prefix keys and their causal own keys: 3 queries, P=2 -> 6 + 6 pairs
    assert bench.causal_pairs(3, 2) == 3 * 2 + 6
    assert bench.causal_pairs(4, 0) == 10
    f = bench.attn_flops(2, 4, 8, 10, "fwd")
    assert f == 4 * 2 * 4 * 8 * 10
    assert bench.attn_flops(2, 4, 8, 10, "bwd") == 2.5 * f
    assert bench.tflops(1e12, 1000.0) == pytest.approx(1.0)


def test_targets_are_checked_at_the_target_prefix(bench):
    recs = [{"mode": "fwd", "P": 128, "ours_tflops": 450.0, "tflops_ratio": 0.9},
            {"mode": "bwd", "P": 128, "ours_tflops": 260.0},
            {"mode": "e2e", "P": 64, "time_ratio": 3.0}]
    base = {"e2e": "peft_transformers"}
    recs = [dict(r, baseline=base.get(r["mode"], "sdpa_flash")) for r in recs]
    # a second e2e record at P 128 against another baseline does not count for the target
    recs.append({"mode": "e2e", "P": 128, "time_ratio": 5.0, "baseline": "peft_sdpa"})
    t = bench.check_targets(recs)
    assert t["fwd_tflops_min"]["met"] is True
    assert t["fwd_vs_sdpa_flash_min"]["met"] is False
    assert t["bwd_tflops_min"]["met"] is True
    assert t["e2e_vs_peft_min"]["met"] is None        # not measured at P = 128


def test_dry_run_writes_json(bench, tmp_path):
    res = bench.main(["--out", str(tmp_path), "--dry-run", "--prefix", "5", "--reps", "1"])
    data = json.loads((tmp_path / "bench_triton_gpu.json").read_text())
    assert data["dry_run"] is True and data == json.loads(json.dumps(res))
    assert {"gpu", "torch", "triton", "date"} <= set(data["environment"])
    assert [r["mode"] for r in data["records"]] == ["fwd", "bwd", "e2e", "e2e", "decode", "decode"]
    assert [r["baseline"] for r in data["records"][2:]] == [
        "peft_transformers", "peft_sdpa", "per_row_kernel", "peft_transformers"]
    for r in data["records"]:
        assert r["P"] == 5 and r["ours_ms"] > 0 and r["baseline_ms"] > 0 and r["ours_tflops"] > 0
    # the kernel switch comparison: through the interpreter here, one row per switch
    from prefix_attn.kernels import bwd
    abl = data["ablations"]
    assert [r["switch"] for r in abl] == list(bench.ABLATIONS)
    assert bwd.SPLIT_MASKED_TILES is True and bwd.HOIST_QUERY_OFFSETS is True   # restored
    assert all(r["P"] == 5 and r["default_ms"] > 0 and r["other_ms"] > 0 for r in abl)
    sweep = data["decode_sweep"]
    assert [(r["B"], r["P"], r["Skv"]) for r in sweep] == bench.DRY_SWEEP
    assert all(r["cascade_ms"] > 0 and r["per_row_ms"] > 0 and r["auto"] in ("cascade", "per_row")
               for r in sweep)
    # the Markdown table: written with the JSON, and again by --render next to a given JSON
    # the kernel breakdown: every variant profiled, largest first
    prof = data["profile"]
    assert prof["P"] == 5
    for name in ("ours", "peft_transformers", "peft_sdpa"):
        ms = [r["ms"] for r in prof[name]["top"]]
        assert ms and ms == sorted(ms, reverse=True) and prof[name]["total_ms"] >= sum(ms)
    md = (tmp_path / "bench_triton_gpu.md").read_text()
    assert "Kernel time of one forward + backward" in md
    assert md.count("\n| 5 | ") == 6 and "decode (cascade)" in md and "Targets at P" in md
    assert "Decode path choice" in md and md.count("\n| 3 | 8 | 32 |") == 1
    assert md.count("\n| `dkdv_split_masked_tiles` | 5 | True |") == 1
    assert md.count("\n| `hoist_query_offsets` | 5 | True |") == 1
    copy = tmp_path / "copy.json"
    copy.write_text(json.dumps(data))
    bench.main(["--render", str(copy)])
    assert (tmp_path / "copy.md").read_text() == md


def test_peft_path_matches_reference(bench):
    # the baseline of the end-to-end comparison computes the same attention
    import torch
    from prefix_attn import prefix_attention_ref
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 6, 8, generator=g), torch.randn(2, 2, 6, 8, generator=g),
               torch.randn(2, 2, 6, 8, generator=g))
    pk, pv = torch.randn(2, 3, 8, generator=g), torch.randn(2, 3, 8, generator=g)
    torch.testing.assert_close(bench.peft_attention(q, k, v, pk, pv),
                               prefix_attention_ref(q, k, v, pk, pv), atol=1e-5, rtol=1e-5)


def test_gpu_script_parses_and_refuses_a_machine_without_cuda(tmp_path):
    """bench/gpu.sh: valid bash; without CUDA it stops before any stage, saying why."""
    import subprocess
    import sys

    import torch
    script = os.path.join(os.path.dirname(_PATH), "gpu.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the script would run its stages")
    r = subprocess.run(["bash", script, str(tmp_path / "out")], capture_output=True, text=True,
                       env={**os.environ, "PYTHON": sys.executable, "STAGES": "bench"}, timeout=120)
    assert r.returncode == 1 and "no CUDA device" in r.stdout + r.stderr
    assert (tmp_path / "out" / "summary.txt").exists()


def test_gpu_timer_asks_do_bench_for_enough_calls(bench, monkeypatch):
    """do_bench's `rep` is milliseconds: the timer raises it to cover at least --reps calls."""
    import time

    import torch
    import triton.testing
    seen = {}
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    def fake_do_bench(fn, warmup, rep, return_mode):
        seen.update(rep=rep, mode=return_mode)
        return 1.5

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    time_ms = bench.timer("cuda", reps=20, rep_ms=100.0)
    assert time_ms(lambda: time.sleep(0.02)) == 1.5          # a 20 ms call: 20 calls > 100 ms
    assert seen["mode"] == "median" and 20 * 20 <= seen["rep"] < 20 * 60
    time_ms(lambda: None)                                      # a fast call: the floor
    assert seen["rep"] == 100.0


def test_a_failing_baseline_is_recorded_as_nan_not_a_crash(bench):
    def boom():
        raise RuntimeError("CUDA out of memory (simulated)")

    assert bench._baseline_ms(lambda fn: fn(), boom, "x") != bench._baseline_ms(
        lambda fn: fn(), boom, "x")                   # NaN != NaN
    assert bench._baseline_ms(lambda fn: 3.0, boom, "x") == 3.0
    rec = bench._record("e2e", 128, 10.0, float("nan"), "peft_transformers", 1, 1, 8, 10, 10)
    t = bench.check_targets([rec])
    assert t["e2e_vs_peft_min"]["met"] is False


def test_table_says_how_many_calls_stand_behind_each_figure(bench):
    """The committed H200 result predates the fixed timer (adad051) and records no timing
    rule: its caption says so and how few calls each figure was (one for the PEFT path's
    fwd+bwd); a result with a timing rule shows it."""
    path = os.path.join(os.path.dirname(_PATH), "results", "triton_gpu.json")
    with open(path) as f:
        old = json.load(f)
    assert "timing" not in old
    caption = bench.markdown(old).splitlines()[0]
    assert "Timing not recorded" in caption and "adad051" in caption
    assert "fwd+bwd baseline 1," in caption and "fwd+bwd ours 3," in caption
    assert "backward ours 4," in caption
    new = dict(old, timing="triton.testing.do_bench median, at least 10 calls")
    assert "Timing: triton.testing.do_bench median, at least 10 calls." in bench.markdown(new)


def test_decode_rows_time_one_layer_of_the_peft_path(bench, tmp_path, monkeypatch):
    """The decode rows' baseline times one layer: the mask is built and dropped once per
    forward, before timing (recorded in the JSON); the committed result, timed with the mask
    work in every call, says so in its caption."""
    import prefix_attn.baselines as base

    calls = []
    real = base.peft_path_forward
    monkeypatch.setattr(base, "peft_path_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    data = bench.main(["--out", str(tmp_path), "--dry-run", "--prefix", "5", "--reps", "3",
                       "--modes", "decode"])
    assert len(calls) == 1                             # once, not once per timed call
    assert data["decode_baseline_mask"]
    assert "read it back inside every timed call" not in bench.markdown(data)
    with open(os.path.join(os.path.dirname(_PATH), "results", "triton_gpu.json")) as f:
        old = json.load(f)
    assert "read it back inside every timed call" in bench.markdown(old).splitlines()[0]


def test_the_fwd_bwd_baselines_build_their_mask_once(bench, tmp_path, monkeypatch):
    """The fwd+bwd (e2e) rows' PEFT-path baselines built the dense mask inside every timed call,
    as the decode rows did; built once now (once per prefix length), and old results say so."""
    import prefix_attn.baselines as base

    calls = []
    for name in ("peft_path_forward", "older_baseline_mask"):
        real = getattr(base, name)
        monkeypatch.setattr(base, name, lambda *a, _r=real, **k: calls.append(1) or _r(*a, **k))
    data = bench.main(["--out", str(tmp_path), "--dry-run", "--prefix", "5", "--reps", "3",
                       "--modes", "e2e"])
    assert len(calls) <= 3  # peft path, older path, profile: not once per timed call
    assert data["e2e_baseline_mask"] and "built their dense mask inside" not in bench.markdown(data)
    with open(os.path.join(os.path.dirname(_PATH), "results", "triton_gpu.json")) as f:
        old = json.load(f)
    assert "built their dense mask inside every timed call" in bench.markdown(old).splitlines()[0]


def test_a_failing_part_does_not_cost_the_parts_after_it(bench, tmp_path, monkeypatch):
    """Each part of a GPU run is guarded: a prefix length, the ablations, the profile or the
    sweep that raises is recorded as <part>_error (and in the table) and the run goes on
    (an ablation failing used to end the run before the profile and the decode sweep)."""
    def boom(what):
        def fail(*a, **k):
            raise RuntimeError(f"simulated failure in {what}")
        return fail
    real_one = bench.bench_one
    monkeypatch.setattr(bench, "bench_one",
                        lambda a, P, *r: boom("P 5")() if P == 5 else real_one(a, P, *r))
    monkeypatch.setattr(bench, "bench_ablations", boom("ablations"))
    monkeypatch.setattr(bench, "bench_profile", boom("profile"))
    monkeypatch.setattr(bench, "bench_decode_sweep", boom("sweep"))
    data = bench.main(["--out", str(tmp_path), "--dry-run", "--prefix", "5,6", "--reps", "1",
                       "--modes", "fwd,ablate,profile,sweep"])
    assert data["records_error"] == {"5": "RuntimeError('simulated failure in P 5')"}
    assert [r["P"] for r in data["records"]] == [6]          # the next P was still measured
    for part in ("ablations", "profile", "decode_sweep"):
        assert part not in data and "simulated failure" in data[part + "_error"]
    md = (tmp_path / "bench_triton_gpu.md").read_text()
    assert "Parts that failed" in md and "- `ablations`: `RuntimeError(" in md
    # only the sweep fails: the ablations and profile before it are kept
    monkeypatch.setattr(bench, "bench_ablations", lambda *a: [])
    monkeypatch.setattr(bench, "bench_profile", lambda *a: {"P": 6})
    data = bench.main(["--out", str(tmp_path), "--dry-run", "--prefix", "6", "--reps", "1",
                       "--modes", "fwd,ablate,profile,sweep"])
    assert data["ablations"] == [] and data["profile"] == {"P": 6}
    assert "decode_sweep_error" in data and "records_error" not in data
