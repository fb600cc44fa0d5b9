"""setup.py's decisions for a CUDA build, checked without a GPU or a CUDA torch: setup.py runs
with torch reporting a CUDA version, CUDA_HOME pointing at a folder we make, no visible GPU,
and ``setuptools.setup`` replaced by a recorder (nothing is compiled)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DRIVER = r"""
import json, os, runpy, sys
import setuptools, torch
import torch.utils.cpp_extension as ce
torch.version.cuda = "13.0"            # a CUDA build of torch ...
ce.CUDA_HOME = sys.argv[1]             # ... whose toolkit is here ...
torch.cuda.is_available = lambda: False  # ... on a machine without a GPU (a build host)
seen = {}
setuptools.setup = lambda **kw: seen.update(kw)
try:
    runpy.run_path("setup.py")
except SystemExit as e:
    print(json.dumps({"exit": str(e)}))
    sys.exit(0)
ext = seen["ext_modules"][0]
print(json.dumps({"arch": os.environ.get("TORCH_CUDA_ARCH_LIST"),
                  "cu": [s for s in ext.sources if s.endswith(".cu")],
                  "macros": [list(m) for m in ext.define_macros]}))
"""


def _run_setup(cuda_home, **env):
    full = {k: v for k, v in os.environ.items()
            if k not in ("TORCH_CUDA_ARCH_LIST", "PREFIX_ATTN_NO_CUDA", "PREFIX_ATTN_NO_EXT",
                         "CUDA_INC_PATH", "CPATH", "CPLUS_INCLUDE_PATH", "C_INCLUDE_PATH")}
    full.update(env)
    res = subprocess.run([sys.executable, "-c", DRIVER, str(cuda_home)], cwd=ROOT, env=full,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def _toolkit(path):
    (path / "include").mkdir(parents=True)
    (path / "include" / "cuda_runtime.h").write_text("")
    return path


def test_cuda_build_without_a_gpu_targets_sm80_and_sm90(tmp_path):
    """torch's own architecture detection fails without a visible GPU (IndexError): setup.py
    picks the architectures the kernels target, and builds the CUDA sources."""
    got = _run_setup(_toolkit(tmp_path / "cuda"))
    assert got["arch"] == "8.0;9.0+PTX"
    assert got["cu"] and ["PREFIX_ATTN_WITH_CUDA", "1"] in got["macros"]


def test_given_architectures_are_kept(tmp_path):
    assert _run_setup(_toolkit(tmp_path / "cuda"), TORCH_CUDA_ARCH_LIST="9.0")["arch"] == "9.0"


def test_missing_cuda_headers_stop_the_build_with_a_reason(tmp_path):
    """A CUDA_HOME without headers (torch derives /usr/local from a wrapper script for nvcc in
    /usr/local/bin) stops before compiling, naming CUDA_HOME and the way out."""
    got = _run_setup(tmp_path / "not-a-toolkit")
    assert "CUDA_HOME" in got["exit"] and "PREFIX_ATTN_NO_CUDA=1" in got["exit"]


@pytest.mark.parametrize("var", ["CUDA_INC_PATH", "CPATH"])
def test_headers_found_through_include_variables(tmp_path, var):
    headers = _toolkit(tmp_path / "elsewhere") / "include"
    got = _run_setup(tmp_path / "not-a-toolkit", **{var: str(headers)})
    assert "exit" not in got and got["cu"]


def test_no_cuda_builds_the_cpu_extension(tmp_path):
    got = _run_setup(tmp_path / "not-a-toolkit", PREFIX_ATTN_NO_CUDA="1")
    assert "exit" not in got and not got["cu"] and not got["macros"]


HINT_DRIVER = r"""
import contextlib, io, json, runpy, sys
import setuptools, torch
import torch.utils.cpp_extension as ce
torch.version.cuda = "12.1"            # a CUDA build of torch ...
ce.CUDA_HOME = sys.argv[1]             # ... and a toolkit whose nvcc torch then refuses
torch.cuda.is_available = lambda: False

def refuse(self):
    raise RuntimeError("The detected CUDA version (13.0) mismatches the version that was used "
                       "to compile PyTorch (12.1)")

ce.BuildExtension.build_extensions = refuse
seen = {}
setuptools.setup = lambda **kw: seen.update(kw)
runpy.run_path("setup.py")
cls = seen["cmdclass"]["build_ext"]
err = io.StringIO()
with contextlib.redirect_stderr(err):
    try:
        cls.build_extensions(cls.__new__(cls))
    except RuntimeError:
        pass
print(json.dumps({"hint": err.getvalue()}))
"""


@pytest.mark.parametrize("no_cuda", [False, True])
def test_a_failed_cuda_build_names_the_cpu_only_build(tmp_path, no_cuda):
    """A CUDA toolkit of another major version than torch's (a cu121 torch, nvcc 13) fails the
    build inside torch: the hint named only PREFIX_ATTN_NO_EXT=1 (no C++ backend at all), not
    PREFIX_ATTN_NO_CUDA=1 (the CPU part, which builds)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFIX_ATTN_")}
    if no_cuda:
        env["PREFIX_ATTN_NO_CUDA"] = "1"
    res = subprocess.run([sys.executable, "-c", HINT_DRIVER, str(_toolkit(tmp_path / "cuda"))],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    hint = json.loads(res.stdout.strip().splitlines()[-1])["hint"]
    assert "the C++ extension did not build" in hint and "PREFIX_ATTN_NO_EXT=1" in hint
    assert ("PREFIX_ATTN_NO_CUDA=1 builds its CPU part only" in hint) is not no_cuda
    assert ("CUDA 12.1" in hint) is not no_cuda
