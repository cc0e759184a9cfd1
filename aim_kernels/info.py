"""`python -m aim_kernels.info`: which backend serves each op on this machine, and why others cannot.

Prints the versions (aim-kernels, Python, torch and its CUDA, Triton, the NVIDIA driver), the GPUs
(through nvidia-ml-py when installed), the compiled extension, and for every op each backend with
'available' or the reasons it is not. `--json` prints the same as one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from typing import Optional

import torch

import aim_kernels
from aim_kernels import _ext


def _triton() -> dict:
    try:
        import triton
    except Exception as e:  # noqa: BLE001
        return {"version": None, "error": f"{type(e).__name__}: {e}"}
    interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return {"version": triton.__version__, "interpreter": interp}


def gpu_info() -> dict:
    """Driver and GPUs from NVML (nvidia-ml-py), with clocks; falls back to torch for names."""
    out: dict = {"driver": None, "nvml": None, "gpus": []}
    try:
        import pynvml
    except ImportError:
        out["nvml"] = "nvidia-ml-py not installed (pip install nvidia-ml-py)"
        pynvml = None
    if pynvml is not None:
        try:
            pynvml.nvmlInit()
            try:
                drv = pynvml.nvmlSystemGetDriverVersion()
                out["driver"] = drv.decode() if isinstance(drv, bytes) else drv
                out["nvml"] = "ok"
                for i in range(pynvml.nvmlDeviceGetCount()):
                    h = pynvml.nvmlDeviceGetHandleByIndex(i)
                    name = pynvml.nvmlDeviceGetName(h)
                    g = {"index": i, "name": name.decode() if isinstance(name, bytes) else name,
                         "memory_gib": round(pynvml.nvmlDeviceGetMemoryInfo(h).total / 2**30, 1)}
                    for key, fn in (("sm_clock_mhz", lambda: pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM)),
                                    ("mem_clock_mhz", lambda: pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_MEM)),
                                    ("max_sm_clock_mhz", lambda: pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM)),
                                    ("power_limit_w", lambda: pynvml.nvmlDeviceGetPowerManagementLimit(h) / 1000),
                                    ("temperature_c", lambda: pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU))):
                        try:
                            g[key] = fn()
                        except Exception:  # noqa: BLE001 - not every field exists on every GPU
                            pass
                    out["gpus"].append(g)
            finally:
                pynvml.nvmlShutdown()
        except Exception as e:  # noqa: BLE001
            out["nvml"] = f"NVML unavailable: {type(e).__name__}: {e}"
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            entry = next((g for g in out["gpus"] if g["index"] == i), None)
            if entry is None:
                entry = {"index": i, "name": p.name}
                out["gpus"].append(entry)
            entry.update(capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                         l2_mib=round(getattr(p, "L2_cache_size", 0) / 2**20, 1))
    return out


def collect() -> dict:
    """Everything the report prints, as a dict (also used for benchmark metadata)."""
    info = {
        "aim_kernels": aim_kernels.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "triton": _triton(),
        "extension": {"path": _ext.extension_path(), "error": _ext.extension_error(), "build": _ext.build_info()},
    }
    info.update(gpu_info())
    ops = {}
    for name, bks in _ext.backends().items():
        entries = [{"backend": "reference", "device": "any", "available": True, "reasons": []}]
        for b in bks:
            reasons = list(b.unavailable_reasons())
            entries.append({"backend": b.name, "device": b.device_type, "available": not reasons, "reasons": reasons})
        ops[name] = entries
    info["ops"] = ops
    return info


def format_report(info: dict) -> str:
    lines = [f"aim-kernels {info['aim_kernels']}  (Python {info['python']}, {info['platform']})"]
    lines.append(f"torch {info['torch']}  CUDA {info['torch_cuda'] or 'none (CPU build)'}  "
                 f"cuda available: {info['cuda_available']}")
    tr = info["triton"]
    lines.append("triton " + (tr["version"] + ("  (interpreter: TRITON_INTERPRET=1)" if tr.get("interpreter") else "")
                              if tr.get("version") else f"not importable: {tr.get('error')}"))
    lines.append(f"NVIDIA driver {info['driver'] or '-'}  (NVML: {info['nvml']})")
    for g in info["gpus"]:
        extra = ", ".join(f"{k} {v}" for k, v in g.items() if k not in ("index", "name"))
        lines.append(f"  GPU {g['index']}: {g['name']}  {extra}")
    if not info["gpus"]:
        lines.append("  no GPU")
    ext = info["extension"]
    if ext["path"]:
        b = ext["build"]
        lines.append(f"extension aim_kernels._C: loaded from {ext['path']}")
        lines.append(f"  built for {';'.join(b.get('cuda_archs', []))}, CUDA runtime {b.get('cuda_version')}")
    else:
        lines.append(f"extension aim_kernels._C: not loaded: {ext['error']}")
    lines.append("")
    lines.append("ops (backends in the order tried; the reference serves every device and any input):")
    for name, entries in info["ops"].items():
        lines.append(f"  {name}")
        for e in entries:
            head = f"    {e['backend']:<10} [{e['device']}]"
            if e["available"]:
                lines.append(f"{head} available")
            else:
                lines.append(f"{head} unavailable:")
                lines.extend(f"        - {r}" for r in e["reasons"])
    lines.append("")
    lines.append("Per call, backends also decline inputs they do not support (e.g. float64, width > 4); "
                 "the reference then runs. See not_supported_reasons() of each op module.")
    return "\n".join(lines)


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m aim_kernels.info", description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    info = collect()
    print(json.dumps(info, indent=1, default=str) if args.json else format_report(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
