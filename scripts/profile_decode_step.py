"""Where one decode step's device time goes: torch.profiler over eager steps of a random-weights preset.

  python scripts/profile_decode_step.py [--preset AiM-B] [--batch 1] [--dtype bfloat16] [--steps 8] [--start 4]

--start: steps decoded before the profiled ones (replay-form steps cost more as the sequence grows: 128 is
the mean step of a 256-token generation).
"""
import argparse

import torch

from aim import AiM, AiMConfig
from aim.generation import Decoding, Settings


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="AiM-B")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--start", type=int, default=4)
    args = ap.parse_args()
    with torch.device("cuda"):
        model = AiM(AiMConfig.from_preset(args.preset)).to(getattr(torch, args.dtype)).eval()
    labels = torch.randint(1000, (args.batch,), device="cuda")
    s = Settings(2.0, 1.0, 0, 1.0, "official", torch.float32, "auto")
    run = Decoding(model, labels, s, torch.rand(args.batch, 256, device="cuda"), None, False)
    with torch.no_grad():
        run.prologue()
        for _ in range(args.start):
            run.advance()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                run.advance()
            torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60)
    print(f"{args.preset} {args.dtype} batch {args.batch}, {args.steps} steps from step {args.start}:\n{table}")


if __name__ == "__main__":
    main()
