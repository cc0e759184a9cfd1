"""Exploration (not part of the suite): launch configs (HEADS, BLOCK_S, WARPS) of the fused replay step,
one layer at 128 rows, step t = 128 (device time per call, CUDA-graph replay)."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_decode_step as b  # noqa: E402
from _common import time_graph  # noqa: E402

from aim_kernels import replay  # noqa: E402


def main():
    for model in ("AiM-B", "AiM-XL"):
        h = b.MODELS[model]
        for dtype in (torch.bfloat16, torch.float32):
            for t in (128,):
                sets = [b.make_set(h, dtype, t) for _ in range(3)]
                nbytes = b.step_bytes(h, dtype.itemsize, "replay", t)
                for cfg in ((8, 8, 4), (8, 16, 4), (16, 4, 4), (16, 8, 4), (16, 8, 8)):
                    if h % cfg[0]:
                        continue

                    def fn(i):
                        s = sets[i]
                        return replay.mamba2_replay_step_triton(
                            s["zxbcdt"], s["conv_state"], *s["hist"], s["step"], s["conv_weight"], s["conv_bias"],
                            s["A_log"], s["D"], s["dt_bias"], s["norm_weight"], 1e-5, b.P, 1, config=cfg)
                    r = time_graph(fn, 3, calls=10, replays=7)
                    print(f"{model} {str(dtype)[6:]} t={t} {cfg}: {r['median_us']:.1f} us "
                          f"{nbytes / r['median_us'] / 1e3:.0f} GB/s", flush=True)
                del sets
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
