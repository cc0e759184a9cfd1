"""One-off: generation with the fused mamba2_replay_step vs the previous unfused replay ops."""
import torch
import aim_kernels as ak
from aim import model as M
from aim.bench import bench_generate, format_row

CASES = [("AiM-B", 64, "bfloat16"), ("AiM-B", 64, "float32"), ("AiM-XL", 64, "bfloat16"), ("AiM-XL", 64, "float32"),
         ("AiM-B", 16, "bfloat16")]
for c in CASES:
    print("fused", format_row(bench_generate(*c, with_vq=False)), flush=True)
fused_step = M.Mamba2Mixer.step


def ops_step(self, zxbcdt, cache):
    if isinstance(cache, M.StateCache):
        return fused_step(self, zxbcdt, cache)
    z, xBC, dt = self._split(zxbcdt)
    xBC = ak.causal_conv1d_update(xBC, cache.conv_state, self.conv1d.weight.squeeze(1), self.conv1d.bias, "silu")
    x, B, C = xBC.split([self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], -1)
    n = self.d_state
    y = ak.ssd_replay_step(x.unflatten(-1, (self.nheads, self.headdim)), dt, -torch.exp(self.A_log.float()),
                           B.unflatten(-1, (self.ngroups, n)), C.unflatten(-1, (self.ngroups, n)), self.D,
                           self.dt_bias, cache.hist_x, cache.hist_B, cache.hist_dt, cache.hist_cum, cache.step)
    return self._out(y.flatten(-2), z)


M.Mamba2Mixer.step = ops_step
for c in CASES:
    print("ops  ", format_row(bench_generate(*c, with_vq=False)), flush=True)
