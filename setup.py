"""Build of prefix_attn: the Python package, `prefix_attn.kernels` (from kernels/) and the
C++/CUDA extension `prefix_attn._C` (from csrc/). setup.py imports torch, so install with
`pip install --no-build-isolation -e .` against the torch you already have."""
import os
import sys

from setuptools import setup

# The commands that compile the extension and so need torch; the others (a source
# distribution, the metadata steps pip's isolated build environment runs) build without it.
_BUILDS = {"build", "build_ext", "bdist", "bdist_wheel", "bdist_egg", "install", "develop",
           "editable_wheel"}


def _cuda_headers_found(cuda_home: str) -> bool:
    """Whether cuda_runtime.h is where the build will look: CUDA_HOME/include (what torch
    passes), CUDA_INC_PATH (torch passes it too) or the compiler's own include paths."""
    dirs = [os.path.join(cuda_home, "include"), os.environ.get("CUDA_INC_PATH", "")]
    for var in ("CPATH", "CPLUS_INCLUDE_PATH", "C_INCLUDE_PATH"):
        dirs += os.environ.get(var, "").split(os.pathsep)
    return any(d and os.path.isfile(os.path.join(d, "cuda_runtime.h")) for d in dirs)


def _build_ext_class(torch_cuda=None):
    """torch's BuildExtension, with a last line on how to install anyway when the build fails
    (no compiler, no C++20, a CUDA toolkit of another major version than torch's: torch stops
    that build with "The detected CUDA version ... mismatches"). ``torch_cuda``: the CUDA version
    of torch when the CUDA part is built."""
    from torch.utils.cpp_extension import BuildExtension

    class BuildWithHint(BuildExtension):
        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception:
                cpu_only = (f"PREFIX_ATTN_NO_CUDA=1 builds its CPU part only (the CUDA part needs "
                            f"a CUDA toolkit of torch's major version, CUDA {torch_cuda}); "
                            if torch_cuda else "")
                print("prefix_attn: the C++ extension did not build (the compiler's messages are "
                      f"above); {cpu_only}PREFIX_ATTN_NO_EXT=1 installs the package without it "
                      "(the triton and torch backends only)", file=sys.stderr)
                raise

    return BuildWithHint


def ext_modules_and_cmdclass():
    """The C++/CUDA extension `prefix_attn._C` (see csrc/), built with ninja.

    PREFIX_ATTN_NO_EXT=1 skips it; PREFIX_ATTN_NO_CUDA=1 builds the CPU part only (the CUDA
    part is built where torch has CUDA and nvcc exists); MAX_JOBS bounds the parallel compiles;
    PREFIX_ATTN_PORTABLE=1 drops -march=native (for binaries that move to other CPUs);
    TORCH_CUDA_ARCH_LIST picks the GPU architectures (default: the visible GPU's, or
    "8.0;9.0+PTX" where none is visible).
    """
    if os.environ.get("PREFIX_ATTN_NO_EXT") == "1":
        return [], {}
    import glob

    try:
        import torch
    except ImportError:
        if not _BUILDS.intersection(sys.argv[1:]):
            return [], {}
        raise SystemExit(
            "prefix_attn: setup.py needs torch to build its C++ extension, and this Python has "
            "none (pip builds in an isolated environment unless told not to): install torch "
            "first, then `pip install --no-build-isolation .` (or `-e .`); PREFIX_ATTN_NO_EXT=1 "
            "installs without the extension (the triton and torch backends only)") from None
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    sources = ["csrc/module.cpp", "csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # -fopenmp: at::parallel_for is inline (ATen/ParallelOpenMP.h); without it the kernels'
    # parallel loops compile to serial code. libgomp.so.1 resolves to the copy torch loaded.
    cxx = ["-O3", "-std=c++20", "-fopenmp"]
    if os.environ.get("PREFIX_ATTN_PORTABLE") != "1":
        cxx.append("-march=native")
    with_cuda = (os.environ.get("PREFIX_ATTN_NO_CUDA") != "1" and torch.version.cuda is not None
                 and CUDA_HOME is not None)
    if with_cuda and not _cuda_headers_found(CUDA_HOME):
        # torch derives CUDA_HOME from the nvcc on PATH: a wrapper script in /usr/local/bin
        # gives /usr/local, and the build then stops at a missing cuda_runtime.h
        raise SystemExit(f"prefix_attn: no CUDA headers (include/cuda_runtime.h) under CUDA_HOME="
                         f"{CUDA_HOME}: set CUDA_HOME to the CUDA toolkit (e.g. /usr/local/cuda), "
                         "or PREFIX_ATTN_NO_CUDA=1 to build the CPU part only")
    if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # No GPU to read the architecture from (a build host, a container build; torch's own
        # detection then fails with an IndexError): the GPUs the kernels target (bf16 and
        # > 48 KiB of shared memory need sm_80), and PTX that newer ones compile at load.
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cpp")) + sorted(glob.glob("csrc/cuda/*.cu"))
        ext = CUDAExtension(
            "prefix_attn._C", sources, include_dirs=[os.path.abspath("csrc")],
            define_macros=[("PREFIX_ATTN_WITH_CUDA", "1")], extra_link_args=["-fopenmp"],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++20", "--use_fast_math",
                                                     "-lineinfo"]})
    else:
        ext = CppExtension("prefix_attn._C", sources, include_dirs=[os.path.abspath("csrc")],
                           extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": _build_ext_class(torch.version.cuda if with_cuda else None)
                   .with_options(use_ninja=True)}


ext_modules, cmdclass = ext_modules_and_cmdclass()

setup(
    name="prefix_attn",
    version="0.1.0",
    description="Fused attention kernels for prefix tuning and shared-prefix serving",
    python_requires=">=3.9",
    packages=["prefix_attn", "prefix_attn.hf", "prefix_attn.kernels"],
    package_dir={"prefix_attn": "prefix_attn", "prefix_attn.kernels": "kernels"},
    install_requires=["torch>=2.4", "safetensors", "tqdm>=4.58"],
    extras_require={
        "triton": ["triton>=3.2"],
        "hf": ["transformers>=5.15"],  # PEFT files are read without peft
        "bench": ["pytest-benchmark", "matplotlib"],
        "structured": ["xgrammar>=0.2.9"],  # serve's response_format / forced tool_choice
    },
    entry_points={"console_scripts": ["prefix-attn=prefix_attn.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
