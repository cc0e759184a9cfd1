"""Build of aim-kernels: pure Python, plus the CUDA extension `aim_kernels._C` when it can be built.

Environment:
  AIM_KERNELS_BUILD_CUDA   auto (default): build the extension when torch has CUDA and nvcc is found,
                           else install pure Python (Triton kernels + references) and say why;
                           1: build it or fail loudly; 0: never build it.
  TORCH_CUDA_ARCH_LIST     architectures to compile for (default "8.0;9.0+PTX": sm_80, sm_90 and PTX
                           that newer GPUs compile at load time). Where it names 9.0, the sm_90a image is
                           built too (Hopper's arch-specific instructions: the decode chain's setmaxnreg);
                           the driver runs it on H100/H200 in place of the sm_90 one.
  MAX_JOBS                 parallel compile jobs (ninja); CUDA_HOME: the CUDA toolkit (nvcc).
  AIM_KERNELS_DEBUG=1      -O0 -G device code (for cuda-gdb), otherwise -O3 -lineinfo.

CUDA builds need torch at build time: `pip install --no-build-isolation .` (see docs/build.md).
"""
from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0+PTX"


def _banner(msg: str) -> None:
    print(f"\n*** aim-kernels: {msg}\n", file=sys.stderr, flush=True)


def _cuda_reasons():
    """Why the CUDA extension cannot be built here (empty list: it can), and the torch extension module."""
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as e:  # noqa: BLE001 - any import failure means no build
        return [f"torch is not importable at build time ({e!s}); with pip use --no-build-isolation"], None
    reasons = []
    if torch.version.cuda is None:
        reasons.append(f"torch {torch.__version__} is not a CUDA build")
    home = cpp_extension.CUDA_HOME
    nvcc = os.path.join(home, "bin", "nvcc") if home else None
    if not nvcc or not os.path.exists(nvcc):
        reasons.append("nvcc not found (set CUDA_HOME to the CUDA toolkit, e.g. /usr/local/cuda)")
    return reasons, cpp_extension


def _ext_modules():
    mode = os.environ.get("AIM_KERNELS_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("0", "1", "auto"):
        raise SystemExit(f"AIM_KERNELS_BUILD_CUDA must be 0, 1 or auto, got {mode!r}")
    if mode == "0":
        _banner("AIM_KERNELS_BUILD_CUDA=0: installing pure Python (Triton kernels + references), no CUDA extension")
        return [], {}
    # Only build commands need the extension; `egg_info`, `sdist` and the like need no torch.
    reasons, cpp_extension = _cuda_reasons()
    if reasons:
        msg = "cannot build the CUDA extension: " + "; ".join(reasons)
        if mode == "1":
            raise SystemExit("aim-kernels: AIM_KERNELS_BUILD_CUDA=1 but " + msg)
        _banner(msg + ". Installing pure Python (Triton kernels + references).")
        return [], {}

    archs = _with_sm90a(os.environ.get("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS))
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    debug = os.environ.get("AIM_KERNELS_DEBUG", "0") == "1"
    _banner(f"building the CUDA extension aim_kernels._C for TORCH_CUDA_ARCH_LIST={archs!r} "
            f"(MAX_JOBS={os.environ.get('MAX_JOBS', 'default')}, CUDA_HOME={cpp_extension.CUDA_HOME})")
    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/*/*.cu", root_dir=ROOT))
    # The arch list travels as a bare token (no quotes or ';' on the command line), stringified in ops.cpp.
    arch_token = "".join(c if c.isalnum() or c in ".+" else "_" for c in archs)
    define_macros = [("Py_LIMITED_API", "0x030A0000"), ("AIMK_CUDA_ARCHS", arch_token)]
    opt = ["-O0", "-g"] if debug else ["-O3"]
    nvcc = opt + (["-G"] if debug else ["-lineinfo", "--use_fast_math"]) + [
        "--expt-relaxed-constexpr", "-Xptxas=-warn-spills"]
    ext = cpp_extension.CUDAExtension(
        name="aim_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=define_macros,
        extra_compile_args={"cxx": opt, "nvcc": nvcc},
        py_limited_api=True,
    )
    use_ninja = shutil.which("ninja") is not None or _has_ninja_module()
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=use_ninja, no_python_abi_suffix=False)
    return [ext], {"build_ext": build_ext}


def _with_sm90a(archs: str) -> str:
    """The arch list plus 9.0a where it names 9.0 (with or without +PTX) and not 9.0a already."""
    entries = [a for a in archs.replace(" ", ";").split(";") if a]
    if "9.0" in (a.split("+")[0] for a in entries) and not any(a.startswith("9.0a") for a in entries):
        entries.append("9.0a")
    return ";".join(entries)


def _has_ninja_module() -> bool:
    try:
        import ninja  # noqa: F401
        return True
    except ImportError:
        return False


ext_modules, cmdclass = _ext_modules()
options = {"bdist_wheel": {"py_limited_api": "cp310"}} if ext_modules else {}
setup(ext_modules=ext_modules, cmdclass=cmdclass, options=options)
