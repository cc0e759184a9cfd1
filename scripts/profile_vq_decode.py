"""Exploration: where the VQ decode's time goes at batch 64 (bf16, channels_last)."""
import torch
from torch.profiler import profile, ProfilerActivity
from aim.vq import VQConfig, VQModel

torch.manual_seed(0)
vq = VQModel(VQConfig()).cuda().to(torch.bfloat16).to(memory_format=torch.channels_last).eval()
codes = torch.randint(0, vq.config.n_embed, (64, 16, 16), device="cuda")
with torch.no_grad():
    for _ in range(3):
        vq.decode_code(codes)
    torch.cuda.synchronize()
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    ev[0].record(); vq.decode_code(codes); ev[1].record(); torch.cuda.synchronize()
    print("decode_code batch 64:", ev[0].elapsed_time(ev[1]), "ms")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        vq.decode_code(codes)
        torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=90))
