"""The package can be shipped: the source distribution carries every file a build needs (the
C++/CUDA headers and CUDA sources too, which setuptools leaves out unless MANIFEST.in names
them), and a wheel built from that sdist alone installs, loads its extension and computes."""
import glob
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What a build from the sdist reads: the host package, the Triton kernels, every C++/CUDA source.
SHIPPED = ["prefix_attn/*.py", "prefix_attn/hf/*.py", "kernels/*.py", "csrc/**/*.cpp", "csrc/**/*.cu",
           "csrc/**/*.h", "setup.py", "pyproject.toml", "README.md", "MANIFEST.in", "CMakeLists.txt"]


def _copy_tree(dst):
    """The source tree without build outputs, virtual environments or git (what a clean clone
    holds), so the build leaves nothing behind in the checkout."""
    skip = shutil.ignore_patterns(".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__",
                                  "*.so", ".pytest_cache", ".benchmarks", "tmp")
    shutil.copytree(ROOT, dst, ignore=skip, symlinks=True)
    link = os.path.join(dst, "prefix_attn", "kernels")  # the test-compat symlink, if any
    if os.path.islink(link):
        os.unlink(link)
    return dst


def _build_sdist(tmp_path):
    src = _copy_tree(str(tmp_path / "src"))
    out = tmp_path / "sdist"
    env = dict(os.environ, PREFIX_ATTN_NO_EXT="1")  # the manifest alone must carry csrc/
    code = "import sys, setuptools.build_meta as b; print(b.build_sdist(sys.argv[1]))"
    res = subprocess.run([sys.executable, "-c", code, str(out)], cwd=src, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    return src, out / res.stdout.strip().splitlines()[-1]


def test_sdist_carries_every_source(tmp_path):
    src, sdist = _build_sdist(tmp_path)
    expected = {os.path.relpath(p, src) for pattern in SHIPPED
                for p in glob.glob(os.path.join(src, pattern), recursive=True)}
    assert any(p.endswith(".cu") for p in expected) and any(p.endswith(".h") for p in expected)
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    missing = sorted(expected - names)
    assert not missing, f"{sdist.name} lacks {missing}"
    # the test suite needs the checkout (conftest.py, pytest.ini, bench/): none of it, not half
    assert not [n for n in names if n.startswith(("tests/", "bench/")) or n == "Makefile"], names


@pytest.mark.slow
def test_wheel_built_from_sdist_installs_and_runs(tmp_path):
    _, sdist = _build_sdist(tmp_path)
    unpacked = tmp_path / "unpacked"
    with tarfile.open(sdist) as tar:
        tar.extractall(unpacked, filter="data")
    (root,) = unpacked.iterdir()
    wheels = tmp_path / "wheels"
    env = dict(os.environ, PREFIX_ATTN_NO_CUDA="1", MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    env.pop("PREFIX_ATTN_NO_EXT", None)
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation",
                          "--no-deps", "-w", str(wheels), str(root)], env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    (wheel,) = wheels.glob("prefix_attn-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    assert any(n.startswith("prefix_attn/_C") and n.endswith(".so") for n in names), names
    assert "prefix_attn/kernels/fwd.py" in names

    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    # Run from an empty folder with only the unpacked wheel on the path: the checkout (and its
    # editable install) must not be what gets imported.
    code = (
        "import torch, prefix_attn, os\n"
        "assert os.path.dirname(prefix_attn.__file__).startswith(os.environ['SITE']), "
        "prefix_attn.__file__\n"
        "assert 'cpu' in prefix_attn.available_backends(), prefix_attn.available_backends()\n"
        "g = torch.Generator().manual_seed(0)\n"
        "q = torch.randn(2, 4, 5, 16, generator=g, requires_grad=True)\n"
        "k, v = (torch.randn(2, 2, 7, 16, generator=g) for _ in range(2))\n"
        "pk, pv = (torch.randn(2, 3, 16, generator=g) for _ in range(2))\n"
        "args = (q, k, v, pk, pv)\n"
        "out = prefix_attn.prefix_attention(*args, backend='cpu')\n"
        "ref = prefix_attn.prefix_attention_ref(*args)\n"
        "torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)\n"
        "out.sum().backward()\n"
        "assert q.grad is not None and torch.isfinite(q.grad).all()\n"
        "print('ok')\n")
    run_env = {k: v for k, v in os.environ.items()
               if k not in ("PYTHONPATH", "PREFIX_ATTN_BACKEND")}
    run_env.update(PYTHONPATH=str(site), SITE=str(site), PYTHONNOUSERSITE="1")
    empty = tmp_path / "cwd"
    empty.mkdir()
    res = subprocess.run([sys.executable, "-c", code], cwd=empty, env=run_env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-4000:]


def _run_at_root(code, site):
    """``python -c code`` with the checkout's root first on sys.path (as ``python -m pytest``
    or a script run there has it) and ``site`` after it."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-4000:]
    return res.stdout.split()


def test_checkout_root_does_not_shadow_pypi_kernels(tmp_path):
    """PyPI's ``kernels`` (Hugging Face's hub kernels) is a dependency of transformers >= 5.25,
    which imports it: from the checkout's root, ``import kernels`` must give that package, not
    our ``kernels/`` folder (transformers' import failed there: "cannot import name
    'CUDAProperties' from 'kernels'"); ``prefix_attn.kernels`` stays ours."""
    pypi = tmp_path / "site" / "kernels"
    pypi.mkdir(parents=True)
    (pypi / "__init__.py").write_text("__version__ = '0.19.1'\nfrom kernels.layer import Mode\n")
    (pypi / "layer.py").write_text("Mode = 'pypi'\n")
    code = ("import kernels, prefix_attn.kernels.autotune as ours\n"
            "from kernels import Mode\n"
            "print(Mode, kernels.__version__, ours.bucket(5))")
    assert _run_at_root(code, tmp_path / "site") == ["pypi", "0.19.1", "8"]


def test_checkout_kernels_without_pypi_kernels_looks_absent(tmp_path):
    """Without PyPI's package, the top-level ``kernels`` from a checkout is an empty module with
    no version (transformers then treats hub kernels as unavailable) and loads no Triton code,
    also with a second copy of the checkout on the path (the two handed over to each other
    until the recursion limit: building the sdist of a copy failed so)."""
    shutil.copytree(os.path.join(ROOT, "kernels"), tmp_path / "kernels",
                    ignore=shutil.ignore_patterns("__pycache__"))
    code = ("import os, sys\n"  # no PyPI kernels: hide an installed one (transformers >= 5.25's)
            "sys.path[:] = [p for p in sys.path if not os.path.isdir(os.path.join(p, 'kernels')) "
            "or os.path.isfile(os.path.join(p, 'kernels', 'interpreter_compat.py'))]\n"
            "import kernels\n"
            "print(getattr(kernels, '__version__', 'none'), hasattr(kernels, 'autotune'), "
            "'triton' in sys.modules)")
    assert _run_at_root(code, tmp_path) == ["none", "False", "False"]


_NO_TORCH = "import sys; sys.modules['torch'] = None  # as in pip's isolated build environment\n"


def test_sdist_and_metadata_build_without_torch(tmp_path):
    """pip's isolated build environment has no torch: the source distribution and the metadata
    step need none (setup.py imported torch first and every `pip install .`, `python -m build`
    failed with "No module named 'torch'"); a wheel says how to install instead."""
    src = _copy_tree(str(tmp_path / "src"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFIX_ATTN_")}

    def build(step):
        code = _NO_TORCH + f"import setuptools.build_meta as b; print(b.{step})"
        return subprocess.run([sys.executable, "-c", code], cwd=src, env=env,
                              capture_output=True, text=True, timeout=300)

    sdist = build(f"build_sdist({str(tmp_path / 'out')!r})")
    assert sdist.returncode == 0, sdist.stderr[-4000:]
    assert sdist.stdout.strip().splitlines()[-1] == "prefix_attn-0.1.0.tar.gz"
    assert build("get_requires_for_build_wheel()").returncode == 0
    wheel = build(f"build_wheel({str(tmp_path / 'whl')!r})")
    assert wheel.returncode != 0
    assert "install torch first, then `pip install --no-build-isolation" in wheel.stderr
    assert "PREFIX_ATTN_NO_EXT=1" in wheel.stderr


@pytest.mark.slow
def test_a_compiler_failure_names_the_way_to_install_without_the_extension(tmp_path):
    src = _copy_tree(str(tmp_path / "src"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFIX_ATTN_")}
    env.update(CXX=str(tmp_path / "no-such-compiler"), PREFIX_ATTN_NO_CUDA="1")
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation",
                          "--no-deps", "-w", str(tmp_path / "whl"), src], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode != 0
    assert "the C++ extension did not build" in res.stderr + res.stdout
    assert "PREFIX_ATTN_NO_EXT=1 installs the package without it" in res.stderr + res.stdout


def test_make_clean_forgets_the_install_it_removes():
    """`make clean` removes the built extension: its install stamp must go too, else the next
    `make test` / `make demo` skipped the rebuild and ran without the C++ backend."""
    if shutil.which("make") is None:
        pytest.skip("no make")
    res = subprocess.run(["make", "-n", "clean"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "prefix_attn/*.so" in res.stdout and ".venv/.stamp-install" in res.stdout, res.stdout
