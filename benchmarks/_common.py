"""Shared pieces of the benchmark scripts: device-time measurement, the copy ceiling, run metadata,
and appending result rows (one JSON object a line) to the data file that report.py turns into
BENCHMARKS.md.

Timing: every measured call is captured N times in a CUDA graph (cycling through input sets that
together exceed the L2 several times, so no run reads another's inputs from cache) and the graph is
replayed; the figure is the median over replays of (replay time / N), from CUDA events. This is device
time: Python and launch overhead are excluded (the model runs decode steps in CUDA graphs too). The
eager time per call (CUDA events around a loop of N plain calls) is recorded beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable, Sequence

import torch

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "benchmarks" / "results.jsonl"
H200_COPY_TBPS = 4.25  # AIM_SPEC 8: device-to-device copy measured on the official stack's H200


def l2_bytes() -> int:
    p = torch.cuda.get_device_properties(torch.cuda.current_device())
    return int(getattr(p, "L2_cache_size", 50 * 2**20))


def n_sets(bytes_per_set: int, factor: float = 4.0, cap: int = 64) -> int:
    """How many input sets to rotate so that they span `factor` times the L2."""
    return max(2, min(cap, int(factor * l2_bytes() / max(bytes_per_set, 1)) + 1))


def time_graph(fn: Callable[[int], object], n_inputs: int, calls: int = 20, replays: int = 15,
               warmup: int = 3) -> dict:
    """Median device time of fn(i) per call, i cycling over n_inputs, measured by CUDA-graph replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(3):
            fn(i % n_inputs)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i % n_inputs)
    for _ in range(warmup):
        graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)  # microseconds per call
    del graph
    times.sort()
    return {"median_us": statistics.median(times), "p20_us": times[len(times) // 5],
            "p80_us": times[(4 * len(times)) // 5], "replays": replays, "calls_per_replay": calls}


def time_eager(fn: Callable[[int], object], n_inputs: int, calls: int = 50) -> float:
    """Eager microseconds per call (CUDA events around `calls` plain calls; includes CPU overhead when the
    GPU waits for the CPU)."""
    for i in range(5):
        fn(i % n_inputs)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(calls):
        fn(i % n_inputs)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / calls


def peak_memory_mib(fn: Callable[[], object]) -> float:
    """Extra device memory at peak while running fn once (over what was allocated before)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    r = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del r
    return peak / 2**20


_NVML = {}


def sm_clock_mhz() -> int | None:
    """Current SM clock from NVML (None without nvidia-ml-py)."""
    try:
        import pynvml
        if "h" not in _NVML:
            pynvml.nvmlInit()
            _NVML["h"] = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        return pynvml.nvmlDeviceGetClockInfo(_NVML["h"], pynvml.NVML_CLOCK_SM)
    except Exception:  # noqa: BLE001
        return None


def warm_up_gpu(seconds: float = 1.0) -> None:
    """Keep the GPU busy for a while so its clocks leave the idle state before anything is timed."""
    a = torch.randn(4096, 4096, device="cuda")
    t0 = time.time()
    while time.time() - t0 < seconds:
        for _ in range(20):
            a = a @ a
            a = a / a.norm()
        torch.cuda.synchronize()


def copy_ceiling() -> dict:
    """Device-to-device copy bandwidth (bytes read + bytes written per second) on this card now: the best
    of a few buffer sizes, all far larger than the L2."""
    return max((_copy(n) for n in (256 * 2**20, 1 * 2**30, 4 * 2**30)), key=lambda r: r["tbps"])


def _copy(nbytes: int) -> dict:
    n = nbytes // 4
    src = torch.randn(n, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(50):
        dst.copy_(src)
    r = time_graph(lambda i: dst.copy_(src), 1, calls=10, replays=20)
    tbps = 2 * n * 4 / (r["median_us"] * 1e-6) / 1e12
    del src, dst
    torch.cuda.empty_cache()
    return {"median_us": r["median_us"], "bytes": 2 * n * 4, "tbps": tbps}


def _git_commit() -> str | None:
    """AIM_GIT_COMMIT when set (the device machines get a copy of the tree whose .git may be stale),
    else `git rev-parse` here."""
    if os.environ.get("AIM_GIT_COMMIT"):
        return os.environ["AIM_GIT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=5).stdout.strip() or None
    except Exception:  # noqa: BLE001
        return None


def run_metadata() -> dict:
    """GPU (name, clocks, driver via nvidia-ml-py), versions, and a run id shared by this run's rows."""
    from aim_kernels import info

    i = info.collect()
    gpu = next((g for g in i["gpus"] if g["index"] == torch.cuda.current_device()), {})
    return {
        "run_id": os.environ.get("AIM_BENCH_RUN_ID") or time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6],
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "gpu": gpu, "driver": i["driver"], "torch": i["torch"], "torch_cuda": i["torch_cuda"],
        "triton": i["triton"].get("version"), "python": i["python"], "aim_kernels": i["aim_kernels"],
        "extension_archs": i["extension"]["build"].get("cuda_archs"), "git": _git_commit(),
    }


def peer_version(module: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(module)
    except Exception:  # noqa: BLE001
        return None


def bench_parser(doc: str) -> argparse.ArgumentParser:
    """The arguments every per-kernel benchmark takes (it adds its own): where its rows go."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--out", type=Path, action="append", default=[], help="also append rows here")
    ap.add_argument("--no-data-file", action="store_true", help=f"do not append to {DATA}")
    return ap


def no_cuda() -> bool:
    """True (and says so) when there is no GPU to benchmark on."""
    if torch.cuda.is_available():
        return False
    print("no CUDA device: nothing to benchmark", file=sys.stderr)
    return True


class Recorder:
    """Collects rows, prints a one-line summary of each, appends them to the data file(s)."""

    @classmethod
    def for_args(cls, kernel: str, args: argparse.Namespace) -> "Recorder":
        """The recorder of a benchmark run with `bench_parser`'s arguments."""
        return cls(kernel, ([] if args.no_data_file else [DATA]) + args.out)

    def __init__(self, kernel: str, outs: Sequence[Path]):
        self.kernel, self.outs, self.meta, self.rows = kernel, list(outs), run_metadata(), []
        warm_up_gpu()
        self.copy = copy_ceiling()
        print(f"# {self.meta['gpu'].get('name')} driver {self.meta['driver']} torch {self.meta['torch']} "
              f"run {self.meta['run_id']}: copy ceiling {self.copy['tbps']:.2f} TB/s", flush=True)
        self.add(case="copy", backend="torch.copy_", shape={"bytes": self.copy["bytes"]}, dtype="float32",
                 timing={"median_us": self.copy["median_us"]}, bytes_moved=self.copy["bytes"])

    def add(self, *, case: str, backend: str, shape: dict, dtype: str, timing: dict, bytes_moved: int,
            model: str | None = None, **extra) -> dict:
        us = timing["median_us"]
        extra.setdefault("sm_clock_mhz", sm_clock_mhz())
        gbps = bytes_moved / (us * 1e-6) / 1e9
        row = {"kernel": self.kernel, "case": case, "model": model, "backend": backend, "dtype": dtype,
               "shape": shape, **timing, "bytes": bytes_moved, "gbps": gbps,
               "frac_copy_measured": gbps / (self.copy["tbps"] * 1e3),
               "frac_h200_copy": gbps / (H200_COPY_TBPS * 1e3), "copy_tbps_measured": self.copy["tbps"],
               **extra, **self.meta}
        self.rows.append(row)
        print(f"{case:<8} {model or '-':<7} {dtype:<9} {backend:<22} {us:9.2f} us {gbps:8.0f} GB/s "
              f"{100 * row['frac_copy_measured']:5.1f}% of copy" +
              (f"  eager {extra['eager_us']:.1f} us" if extra.get("eager_us") else "") +
              (f"  peak {extra['peak_mib']:.0f} MiB" if extra.get("peak_mib") is not None else ""), flush=True)
        return row

    def finish(self) -> None:
        """Measure the copy ceiling again at the end; keep the higher figure for every row."""
        again = copy_ceiling()
        print(f"# copy ceiling at the end: {again['tbps']:.2f} TB/s (start {self.copy['tbps']:.2f})", flush=True)
        best = max(self.copy["tbps"], again["tbps"])
        for row in self.rows:
            row["copy_tbps_start"], row["copy_tbps_end"] = self.copy["tbps"], again["tbps"]
            row["copy_tbps_measured"] = best
            row["frac_copy_measured"] = row["gbps"] / (best * 1e3)

    def save(self) -> None:
        for out in self.outs:
            out.parent.mkdir(parents=True, exist_ok=True)
            with open(out, "a") as f:
                for row in self.rows:
                    f.write(json.dumps(row, default=str) + "\n")
        print(f"# appended {len(self.rows)} rows to {', '.join(map(str, self.outs))}", file=sys.stderr)
