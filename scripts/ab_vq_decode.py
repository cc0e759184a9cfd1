"""A/B on the GPU: VQ decode at batch 64 (bf16, channels_last), eager vs CUDA graph, nearest-2x upsample +
3x3 conv (old) vs the 4x4 stride-2 transposed conv (new). CUDA events, interleaved rounds, medians. Then
the decode in float32/bfloat16 x NCHW/channels_last, eager and graphed (the user path loads float32 NCHW).

  python scripts/ab_vq_decode.py
"""
import statistics, torch
from aim.vq import VQConfig, VQModel, Upsample, conv_without_bias
from aim_kernels import add_bias, upsample_nearest2x

new_forward = Upsample.forward
def old_forward(self, x):
    return add_bias(conv_without_bias(self.conv, upsample_nearest2x(x)), self.conv.bias)

def events(fn, n):
    ts = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b))
    return statistics.median(ts)

torch.manual_seed(0)
vq = VQModel(VQConfig()).cuda().to(torch.bfloat16).to(memory_format=torch.channels_last).eval()
codes = torch.randint(0, vq.config.n_embed, (64, 16, 16), device="cuda")
fwds = {"old": old_forward, "new": new_forward}
with torch.no_grad():
    graphs, eager_out = {}, {}
    for name, fwd in fwds.items():
        Upsample.forward = fwd
        eager_out[name] = vq.decode_code(codes).float()
        before = torch.cuda.memory_reserved()
        vq.__dict__.pop("_decode_graphs", None)
        g_out = vq.decode_code(codes, cuda_graph=True).float()
        graphs[name] = vq.__dict__["_decode_graphs"][codes.shape]
        print(f"{name}: graph vs eager rel diff {((g_out - eager_out[name]).norm() / eager_out[name].norm()).item():.2e}, "
              f"reserved +{(torch.cuda.memory_reserved() - before) / 2**30:.2f} GiB", flush=True)
    print("new vs old rel diff", ((eager_out["new"] - eager_out["old"]).norm() / eager_out["old"].norm()).item())
    res = {k: [] for k in ("eager old", "eager new", "graph old", "graph new", "decode_code(cuda_graph=True) new")}
    for r in range(3):
        for name, fwd in fwds.items():
            Upsample.forward = fwd
            events(lambda: vq.decode_code(codes), 2)
            res[f"eager {name}"].append(events(lambda: vq.decode_code(codes), 7))
            g = graphs[name]
            events(lambda: g(codes), 2)
            res[f"graph {name}"].append(events(lambda: g(codes), 10))
        res["decode_code(cuda_graph=True) new"].append(events(lambda: vq.decode_code(codes, cuda_graph=True), 10))
    for k, v in res.items():
        print(f"{k:36s} median {statistics.median(v):7.2f} ms  rounds {[round(x, 2) for x in v]}")

    # the user path's layout and dtype: a checkpoint loads float32 NCHW; only the benchmark converts
    Upsample.forward = new_forward
    for dtype in (torch.float32, torch.bfloat16):
        for layout in (torch.contiguous_format, torch.channels_last):
            model = VQModel(VQConfig()).cuda().to(dtype).to(memory_format=layout).eval()
            model.load_state_dict(vq.state_dict())
            for graph in (False, True):
                model.decode_code(codes, cuda_graph=graph)
                ms = events(lambda: model.decode_code(codes, cuda_graph=graph), 7)
                print(f"{str(dtype):15s} {str(layout):25s} graph={graph!s:5s} {ms:7.2f} ms", flush=True)
            del model
            torch.cuda.empty_cache()
