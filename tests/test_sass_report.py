"""bench/sass_report.py: the sm_90 SASS statistics used to judge kernel changes without a GPU."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

_PATH = os.path.join(os.path.dirname(__file__), "..", "bench", "sass_report.py")


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("sass_report", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_loop_stats_counts_each_backward_branch_body(report):
    ins = [(0x00, "MOV R1, R2"), (0x10, "HGMMA.64x32x16.F32.BF16 R24, gdesc[UR4], R24"),
           (0x20, "LDL R3, [R1+0x8]"), (0x30, "@P0 BRA 0x10"),              # loop 1: 3 instrs
           (0x40, "HMMA.16816.F32.BF16 R4, R8, R12, R4"), (0x50, "STL [R1], R4"),
           (0x60, "IMAD R5, R5, 0x2, RZ"), (0x70, "@!P1 BRA 0x40"),          # loop 2: 4 instrs
           (0x80, "BRA 0x90"), (0x90, "EXIT")]                                # forward branch
    assert report.loop_stats(ins) == [{"instructions": 3, "mma": 1, "spill_ops": 1},
                                      {"instructions": 4, "mma": 1, "spill_ops": 1}]


def test_quick_report_compiles_for_sm90(tmp_path):
    pytest.importorskip("triton")
    # TRITON_INTERPRET=1 (set for the test session) is dropped by the script itself
    env = {**os.environ, "TRITON_INTERPRET": "1", "TRITON_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, _PATH, "--quick", "--out", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode and "cuobjdump not found" in proc.stderr + proc.stdout:
        pytest.skip("Triton's cuobjdump is not available")
    assert proc.returncode == 0, proc.stderr[-2000:]
    # a smoke run: sass_sm90_quick.*, never the committed report's stem
    assert not (tmp_path / "sass_sm90.json").exists() and not (tmp_path / "sass_sm90.md").exists()
    data = json.loads((tmp_path / "sass_sm90_quick.json").read_text())
    assert data["smoke"] is True
    (case,) = data["cases"]
    assert case["kernel"] == "dkdv_own" and 0 < case["registers"] <= 255
    # SPLIT on: a masked and an unmasked loop over query tiles, both on the tensor cores
    assert len(case["loops"]) == 2 and all(l["mma"] > 0 for l in case["loops"])
    assert case["loops"][1]["instructions"] < case["loops"][0]["instructions"]
    md = (tmp_path / "sass_sm90_quick.md").read_text()
    assert md.startswith("Smoke run") and "| dkdv_own | (32, 32, 4, 2) |" in md
