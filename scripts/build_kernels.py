"""JIT-build the CUDA extension ``decdec._C`` with torch.utils.cpp_extension.load (GPU machine).

Compiles csrc/ into build/jit/ and copies the module to decdec/_C.so, where ``import decdec._C``
(``decdec.ops.load_cuda_kernels``) finds it. Arch: TORCH_CUDA_ARCH_LIST, else the visible GPU. Extra nvcc flags
(e.g. a -D for an A/B build): DECDEC_NVCC_FLAGS.

    python scripts/build_kernels.py [--verbose]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["csrc/bindings.cpp", "csrc/ap_gemv.cu", "csrc/ap_bmma.cu", "csrc/lutgemm_gemv.cu", "csrc/dec.cu", "csrc/attention.cu"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--build-dir", default=str(ROOT / "build" / "jit"))
    args = ap.parse_args()

    import torch
    from torch.utils import cpp_extension

    if torch.version.cuda is None:
        print(f"build_kernels: torch {torch.__version__} is a CPU build; a CUDA torch is needed", file=sys.stderr)
        return 2
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
    build_dir = Path(args.build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    # Imported here as the top-level module "_C"; this process never imports decdec._C, so the
    # CUDA kernels are registered only once per process.
    mod = cpp_extension.load(
        name="_C",
        sources=[str(ROOT / s) for s in SOURCES],
        extra_include_paths=[str(ROOT / "csrc")],
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3", "-lineinfo", *os.environ.get("DECDEC_NVCC_FLAGS", "").split()],
        build_directory=str(build_dir),
        verbose=args.verbose,
    )
    dst = ROOT / "decdec" / "_C.so"
    shutil.copy2(mod.__file__, dst)
    print(f"build_kernels: built {mod.__file__} for sm {os.environ['TORCH_CUDA_ARCH_LIST']} "
          f"in {time.time() - t0:.0f} s -> {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
