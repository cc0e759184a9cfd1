"""Without a GPU: compile the decode kernels (batch 1: state form; batch 64: replay form) for sm_90 and
print, per kernel, its registers and spills (cuobjdump) and the order of its global loads, barriers and
the PDL wait in the PTX.

  python scripts/inspect_kernels.py

A load written after a block-wide reduction's barrier is issued after it: every `LD` group after `WAIT`
is one more dependent round trip to L2/HBM in the kernel's critical path.
"""
import inspect
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from aim_kernels import decode, gemv, norm, replay

TARGET = GPUTarget("cuda", 90, 32)
POINTERS = ("X", "R", "W", "SHIFT", "SCALE", "GATE", "MS", "OUT", "ROUT")  # norm.py's pointer names
DIVISIBLE = ("K", "D_INNER", "N_OUT", "dim")  # d_model or d_inner (in_proj's N = 3352 is not a multiple of 16)


def compile_sm90(fn, pointer_types: dict, constexprs: dict, num_warps: int = 4):
    """fn compiled for sm_90 as a launch would specialise it: pointers, stride_* and the feature sizes in
    DIVISIBLE divisible by 16 (torch's allocations and AiM's widths are), so loads vectorise as on the
    GPU (without the hints every load is scalar and the register counts come out up to 2.6x high)."""
    names = list(inspect.signature(fn.fn).parameters)
    constexprs = {k: v for k, v in constexprs.items() if k in names}  # a branch may lack one (ROWS_PAD)
    signature, aligned = {}, []
    for name in names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr") or name in POINTERS:
            signature[name] = pointer_types.get(name, "*bf16")
            aligned.append(name)
        else:
            signature[name] = "fp32" if name == "eps" else "i32"
            if name.startswith("stride") or name in DIVISIBLE:
                aligned.append(name)
    source = ASTSource(fn, signature, constexprs={(names.index(k),): v for k, v in constexprs.items()},
                       attrs={(names.index(name),): [["tt.divisibility", 16]] for name in aligned})
    return triton.compile(source, target=TARGET, options=dict(num_warps=num_warps))


def registers(kernel) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    os.unlink(f.name)
    line = next(l for l in out.splitlines() if "REG:" in l)
    return " ".join(re.findall(r"(REG:\d+|STACK:\d+)", line))


def memory_order(kernel) -> str:
    """'LDx72 WAIT LDx80 STx16 BARx5 ...': runs of global loads/stores, barriers and the PDL wait."""
    events = []
    for line in kernel.asm["ptx"].splitlines():
        op = line.strip()
        op = op.split(" ", 1)[1] if op.startswith("@") else op
        kind = ("WAIT" if op.startswith("griddepcontrol.wait") else "BAR" if op.startswith(("bar.sync", "barrier"))
                else "LD" if op.startswith("ld.global") else "ST" if op.startswith("st.global") else None)
        if kind:
            if events and events[-1][0] == kind:
                events[-1][1] += 1
            else:
                events.append([kind, 1])
    return " ".join(k if n == 1 else f"{k}x{n}" for k, n in events)


def main() -> None:
    fp32 = "*fp32"
    d_model, d_inner = 768, 1536  # AiM-B, batch 1 with CFG (2 rows)
    bn_in, bk_in = gemv.tile_shape(d_model)
    bn_out, bk_out = gemv.tile_shape(d_inner)
    rows = dict(ROWS=2, ROWS_PAD=2, PDL=True)
    ssm = dict(P=64, N=128, W=4, P_PER_PROGRAM=16, BLOCK_P=16, BLOCK_S=4, HAS_BIAS=True, PDL=True)
    kernels = {
        "prologue + in_proj GEMV": (gemv._prologue_gemv_kernel, {"res_ptr": fp32, "res_out_ptr": fp32},
                                    dict(rows, HAS_RESIDUAL=True, HAS_GATE=True, WRITE_H=False, BLOCK_N=bn_in,
                                         BLOCK_K=bk_in)),
        "SSM step": (decode._ssm_step_kernel, {"ssm_state_ptr": fp32, "A_log_ptr": fp32, "v_ptr": fp32,
                                              "sumsq_ptr": fp32}, ssm),
        "gated norm + out_proj GEMV": (decode._norm_shift_out_kernel, {"v_ptr": fp32, "sumsq_ptr": fp32},
                                       dict(rows, N=128, BLOCK_N=bn_out, BLOCK_K=bk_out, BLOCK_PARTS=128,
                                            BLOCK_S=4, Z_GATE=False)),
        "block: prologue + x/B/C/dt GEMV": (gemv._prologue_gemv_kernel, {"res_ptr": fp32, "res_out_ptr": fp32},
                                            dict(rows, HAS_RESIDUAL=True, HAS_GATE=True, WRITE_H=True,
                                                 BLOCK_N=bn_in, BLOCK_K=bk_in)),
        "block: z GEMV + SSM step": (decode._ssm_step_z_kernel, {"ssm_state_ptr": fp32, "A_log_ptr": fp32,
                                                                "v_ptr": fp32}, dict(ssm, ROWS=2, ROWS_PAD=2,
                                                                                     BLOCK_N=bn_in, BLOCK_K=bk_in)),
        "block: gate + norm + out_proj GEMV": (decode._norm_shift_out_kernel, {"v_ptr": fp32, "sumsq_ptr": fp32},
                                               dict(rows, N=128, BLOCK_N=bn_out, BLOCK_K=bk_out, BLOCK_PARTS=1,
                                                    BLOCK_S=4, Z_GATE=True)),
        "GEMV (lm_head, unfused projections)": (gemv._gemv_kernel, {}, dict(rows, BLOCK_N=bn_in, BLOCK_K=bk_in)),
        "gated norm (unfused)": (decode._norm_shift_kernel, {"v_ptr": fp32, "sumsq_ptr": fp32},
                                 dict(N=128, BLOCK_D=4096, BLOCK_PARTS=256, BLOCK_S=4, Z_GATE=False, PDL=True)),
        "block prologue (unfused)": (norm._add_rmsnorm_modulate_kernel, {"R": fp32, "ROUT": fp32, "MS": fp32},
                                     dict(HAS_RESIDUAL=True, HAS_MOD=True, HAS_GATE=True, HAS_MS=True, BLOCK=2048,
                                          BLOCK_MS=32, PDL=True)),
        "replay weights (batch 64)": (replay._weights_kernel, {"A_ptr": fp32, "hdt_ptr": fp32, "hcum_ptr": fp32,
                                                               "w_ptr": fp32, "step_ptr": "*i64"},
                                      dict(P=64, N=128, GROUP_PAD=32, BLOCK_S=replay.WEIGHTS_BLOCK_S, CONV=True, W=4,
                                           HAS_CONV_BIAS=True, PDL=True)),
    }
    # the weighted sum at batch 64 with AiM-B/L's and AiM-XL's head blocks (launch_config: 8 and 16 heads)
    for model, heads in (("AiM-B", 8), ("AiM-XL", 16)):
        kernels[f"replay weighted sum (b64, {model})"] = (
            replay._weighted_sum_kernel, {"w_ptr": fp32, "part_ptr": fp32, "ms_ptr": fp32, "step_ptr": "*i64"},
            dict(P=64, N=128, HEADS=heads, BLOCK_S=8192 // (heads * 64), SPLIT=False, CONV=True, W=4,
                 HAS_CONV_BIAS=True, GATED=True, BLOCK_STATE=4, PDL=True))
    for name, (fn, pointers, consts) in kernels.items():
        kernel = compile_sm90(fn, pointers, consts)
        print(f"{name:38s} {registers(kernel):18s} {memory_order(kernel)}", flush=True)


if __name__ == "__main__":
    main()
