"""Packaging lives in setup.cfg; this file only adds the CUDA extension ``decdec._C`` (csrc/).

The extension is built when a CUDA build of torch and a CUDA toolkit (nvcc / CUDA_HOME) are both
present; otherwise decdec installs as pure Python (CPU reference kernels only) and says so.
Target arch: ``TORCH_CUDA_ARCH_LIST`` if set, else the visible GPU's, else sm_90.
``DECDEC_NO_CUDA=1`` forces the pure-Python install.
"""

import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
SOURCES = ["csrc/bindings.cpp", "csrc/ap_gemv.cu", "csrc/ap_bmma.cu", "csrc/lutgemm_gemv.cu", "csrc/dec.cu", "csrc/attention.cu"]


def _note(msg: str) -> None:
    print(f"decdec setup: {msg}", file=sys.stderr)


def cuda_arch_list() -> str:
    """TORCH_CUDA_ARCH_LIST, else the visible GPU's compute capability, else 9.0 (H100/H200)."""
    import torch

    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return ";".join(f"{major}.{minor}" for major, minor in caps)
    return "9.0"


def extension_kwargs() -> dict:
    if os.environ.get("DECDEC_NO_CUDA") == "1":
        _note("DECDEC_NO_CUDA=1: skipping the CUDA extension")
        return {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except Exception as e:  # torch missing or broken: still install the Python package
        _note(f"torch not importable ({e}); skipping the CUDA extension")
        return {}
    if torch.version.cuda is None:
        _note(f"torch {torch.__version__} is a CPU build; skipping the CUDA extension (CPU reference only)")
        return {}
    if CUDA_HOME is None:
        _note("no CUDA toolkit found (CUDA_HOME / nvcc); skipping the CUDA extension")
        return {}
    os.environ["TORCH_CUDA_ARCH_LIST"] = cuda_arch_list()  # read by torch.utils.cpp_extension
    _note(f"building decdec._C for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
    ext = CUDAExtension(
        "decdec._C",
        sources=SOURCES,
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}}


setup(**extension_kwargs())
