"""A/B end to end: `generate_tokens` timed for two or more source trees on one GPU, in alternating rounds.

    python scripts/ab_generate.py prepare main experiments/my-branch     # here: trees under .ab/
    python scripts/ab_generate.py run --configs AiM-B:1:bfloat16 AiM-XL:64:float32   # on the GPU machine

`prepare` writes each revision's `aim`, `aim_kernels`, `csrc` and `setup.py` to .ab/<name> (git-ignored: pass
".ab" in the device tool's `carry`). `run` copies the freshly built CUDA extension (aim_kernels/_C*.so) into
every tree, or with --build-each builds each tree's own (for trees whose CUDA code differs), then for each
round runs each tree in its own process with the tree as working directory (a process imports one tree only),
and prints the median of each configuration per tree and its speed-up over the first tree. Interleaved rounds
keep clock and thermal drift out of the comparison.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TREES = ROOT / ".ab"
BENCH = """
import json, sys
from aim.bench import bench_generate
for spec in sys.argv[1:]:
    preset, batch, dtype = spec.split(":")
    r = bench_generate(preset, int(batch), dtype, repeats={repeats})
    print("AB " + json.dumps(dict(config=spec, seconds=r["tokens_s"])), flush=True)
"""


def tree_name(rev: str) -> str:
    return rev.replace("/", "_")


def prepare(revs: list[str]) -> None:
    shutil.rmtree(TREES, ignore_errors=True)
    for rev in revs:
        dest = TREES / tree_name(rev)
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        paths = ["aim", "aim_kernels", "csrc", "setup.py"]
        archive = subprocess.run(["git", "archive", rev, *paths], cwd=ROOT, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        commit = subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, check=True, capture_output=True,
                                text=True).stdout.strip()
        (dest / "REVISION").write_text(f"{rev} {commit}\n")
        print(f"{dest.relative_to(ROOT)}: {rev} ({commit})")
    (TREES / "ORDER").write_text("\n".join(tree_name(rev) for rev in revs) + "\n")


def summary(times: dict[str, dict[str, list[float]]]) -> str:
    """Markdown table: per configuration, each tree's median and its speed-up over the first tree."""
    names = list(times)
    configs = list(dict.fromkeys(c for per_tree in times.values() for c in per_tree))
    lines = ["| config | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for config in configs:
        base = times[names[0]].get(config)
        cells = []
        for name in names:
            runs = times[name].get(config)
            if not runs:
                cells.append("-")
                continue
            median = statistics.median(runs)
            ratio = f" ({statistics.median(base) / median:.3f}x)" if base and name != names[0] else ""
            cells.append(f"{median:.4f} s{ratio}")
        lines.append(f"| {config} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def build_extension(tree: Path) -> None:
    """The tree's own CUDA extension, built in place (the environment says how: TORCH_CUDA_ARCH_LIST, MAX_JOBS)."""
    env = dict(os.environ, AIM_KERNELS_BUILD_CUDA="1")
    proc = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tree, env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"building {tree.name}'s extension failed:\n{proc.stderr[-3000:]}")
    print(f"{tree.name}: extension built", flush=True)


def run(configs: list[str], names: list[str], rounds: int, repeats: int, timeout: int, build_each: bool) -> None:
    if not names:
        if not (TREES / "ORDER").exists():
            raise SystemExit("no trees: run `prepare` first (and carry .ab to the GPU machine)")
        names = (TREES / "ORDER").read_text().split()
    built = glob.glob(str(ROOT / "aim_kernels" / "_C*.so"))
    times: dict[str, dict[str, list[float]]] = {name: {} for name in names}
    for name in names:
        if build_each:
            build_extension(TREES / name)
            continue
        for so in built:
            shutil.copy(so, TREES / name / "aim_kernels")
    for r in range(rounds):
        for name in names:
            tree = TREES / name
            env = dict(os.environ, PYTHONPATH=str(tree))
            try:
                proc = subprocess.run([sys.executable, "-c", BENCH.format(repeats=repeats), *configs], cwd=tree,
                                      env=env, capture_output=True, text=True, timeout=timeout)
            except subprocess.TimeoutExpired as e:  # keep what it printed (bytes, even with text=True)
                out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
                proc = subprocess.CompletedProcess(e.cmd, -1, out, f"timed out after {timeout} s")
            for line in proc.stdout.splitlines():
                if line.startswith("AB "):
                    row = json.loads(line[3:])
                    times[name].setdefault(row["config"], []).append(row["seconds"])
            if proc.returncode:
                print(f"[round {r + 1}] {name}: exit {proc.returncode}\n{proc.stderr[-2000:]}", flush=True)
            print(f"[round {r + 1}] {name}: " + json.dumps({c: v[-1] for c, v in times[name].items()}), flush=True)
    print(summary(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="write revisions' trees to .ab/ (here)")
    p.add_argument("revs", nargs="+")
    r = sub.add_parser("run", help="time every tree in .ab/ (on the GPU machine)")
    r.add_argument("--configs", nargs="+", required=True, help="PRESET:BATCH:DTYPE, e.g. AiM-B:1:bfloat16")
    r.add_argument("--trees", nargs="*", default=[], help="names under .ab/ (default: prepare's order)")
    r.add_argument("--rounds", type=int, default=2)
    r.add_argument("--repeats", type=int, default=5, help="timed calls per configuration and round (median)")
    r.add_argument("--timeout", type=int, default=300, help="seconds per tree and round")
    r.add_argument("--build-each", action="store_true", help="build each tree's own CUDA extension (~30 s each)")
    args = ap.parse_args()
    if args.command == "prepare":
        prepare(args.revs)
    else:
        run(args.configs, args.trees, args.rounds, args.repeats, args.timeout, args.build_each)


if __name__ == "__main__":
    main()
