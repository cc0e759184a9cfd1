// The one translation unit that includes torch headers: it defines the compiled low-level ops in the
// `aim_kernels_cuda` namespace (TORCH_LIBRARY, no pybind11) and implements them for the CUDA dispatch
// key by checking the tensors and calling the torch-free launchers in csrc/<kernel>/*.cu.
//
// The ops are "out" style: the caller (Python, aim_kernels/*.py) allocates every output, so the
// layout policy (torch.empty_like(x)) lives next to the reference and the fake implementations.
// Python registers them on the public `aim_kernels::` ops; see aim_kernels/_ext.py.
//
// Keep this the only file including torch headers: each such file costs about a minute of build on
// two cores. A new kernel adds its launcher header, its schemas and its impls here.
#include <Python.h>

#include <c10/cuda/CUDAGuard.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <string>

#include "causal_conv1d/causal_conv1d.h"
#include "decode_chain/decode_chain.h"

#define AIMK_STR2(x) #x
#define AIMK_STR(x) AIMK_STR2(x)
#ifndef AIMK_CUDA_ARCHS
#define AIMK_CUDA_ARCHS unknown
#endif

namespace {

aimk::DType dtype_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return aimk::kFloat32;
    case at::kBFloat16: return aimk::kBFloat16;
    case at::kHalf: return aimk::kFloat16;
    default: TORCH_CHECK(false, "aim_kernels_cuda: ", name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

void check_on(const at::Tensor& t, const char* name, const at::Tensor& ref) {
  TORCH_CHECK(t.is_cuda(), "aim_kernels_cuda: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == ref.device(), "aim_kernels_cuda: ", name, " is on ", t.device(), ", x on ", ref.device());
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// Weight (dim, width) and bias (dim,): contiguous, 16-byte aligned, both of x's dtype or both float32.
// Returns whether they are float32 (the kernels' params_f32).
bool check_params(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, int64_t dim) {
  check_on(weight, "weight", x);
  const bool f32 = weight.scalar_type() == at::kFloat;
  TORCH_CHECK(f32 || weight.scalar_type() == x.scalar_type(), "aim_kernels_cuda: weight must be float32 or x's dtype ",
              x.scalar_type(), ", got ", weight.scalar_type());
  TORCH_CHECK(weight.is_contiguous() && aligned16(weight) && weight.dim() == 2 && weight.size(0) == dim,
              "aim_kernels_cuda: weight must be a contiguous, 16-byte aligned (dim, width) tensor");
  TORCH_CHECK(weight.size(1) >= 2 && weight.size(1) <= 4, "aim_kernels_cuda: width must be 2..4, got ", weight.size(1));
  if (bias.has_value()) {
    check_on(*bias, "bias", x);
    TORCH_CHECK(bias->scalar_type() == weight.scalar_type(), "aim_kernels_cuda: bias must have weight's dtype ",
                weight.scalar_type(), ", got ", bias->scalar_type());
    TORCH_CHECK(bias->is_contiguous() && aligned16(*bias) && bias->dim() == 1 && bias->size(0) == dim,
                "aim_kernels_cuda: bias must be a contiguous, 16-byte aligned (dim,) tensor");
  }
  return f32;
}

void check_same(const at::Tensor& t, const char* name, const at::Tensor& x) {
  check_on(t, name, x);
  TORCH_CHECK(t.sizes() == x.sizes(), "aim_kernels_cuda: ", name, " must have x's shape ", x.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "aim_kernels_cuda: ", name, " must have x's dtype");
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "aim_kernels_cuda: ", what, " failed: ", cudaGetErrorString(err));
}

aimk::ConvParams conv_params(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             const at::Tensor& out, bool silu) {
  TORCH_CHECK(x.dim() == 3, "aim_kernels_cuda: x must be (batch, dim, seqlen)");
  aimk::ConvParams p{};
  p.params_f32 = check_params(x, weight, bias, x.size(1));
  check_same(out, "out", x);
  p.x = x.data_ptr();
  p.out = out.data_ptr();
  p.weight = weight.data_ptr();
  p.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  p.batch = x.size(0); p.dim = x.size(1); p.seqlen = x.size(2);
  p.x_sb = x.stride(0); p.x_sd = x.stride(1); p.x_st = x.stride(2);
  p.o_sb = out.stride(0); p.o_sd = out.stride(1); p.o_st = out.stride(2);
  p.width = static_cast<int>(weight.size(1));
  p.silu = silu;
  p.dtype = dtype_of(x, "x");
  return p;
}

void causal_conv1d_fwd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const at::Tensor& out, bool silu) {
  check_on(x, "x", x);
  c10::cuda::CUDAGuard guard(x.device());
  aimk::ConvParams p = conv_params(x, weight, bias, out, silu);
  check_launch(aimk::causal_conv1d_fwd(p, c10::cuda::getCurrentCUDAStream(x.get_device()).stream()),
               "causal_conv1d_fwd");
}

void causal_conv1d_bwd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const at::Tensor& dout, const at::Tensor& dx, const at::Tensor& dweight_bias, bool silu) {
  check_on(x, "x", x);
  c10::cuda::CUDAGuard guard(x.device());
  aimk::ConvParams p = conv_params(x, weight, bias, dx, silu);
  check_same(dout, "dout", x);
  check_on(dweight_bias, "dweight_bias", x);
  TORCH_CHECK(dweight_bias.scalar_type() == at::kFloat && dweight_bias.is_contiguous() && dweight_bias.dim() == 2 &&
                  dweight_bias.size(0) == p.dim && dweight_bias.size(1) == p.width + 1,
              "aim_kernels_cuda: dweight_bias must be a contiguous float32 (dim, width + 1) tensor");
  p.dout = dout.data_ptr();
  p.g_sb = dout.stride(0); p.g_sd = dout.stride(1); p.g_st = dout.stride(2);
  p.dweight_bias = dweight_bias.data_ptr<float>();
  check_launch(aimk::causal_conv1d_bwd(p, c10::cuda::getCurrentCUDAStream(x.get_device()).stream()),
               "causal_conv1d_bwd");
}

void causal_conv1d_update(const at::Tensor& x, const at::Tensor& conv_state, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias, const at::Tensor& out, bool silu) {
  check_on(x, "x", x);
  c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK(x.dim() == 2, "aim_kernels_cuda: x must be (batch, dim)");
  aimk::UpdateParams p{};
  p.params_f32 = check_params(x, weight, bias, x.size(1));
  check_same(out, "out", x);
  check_on(conv_state, "conv_state", x);
  TORCH_CHECK(conv_state.dim() == 3 && conv_state.size(0) == x.size(0) && conv_state.size(1) == x.size(1),
              "aim_kernels_cuda: conv_state must be (batch, dim, state_len)");
  TORCH_CHECK(conv_state.size(2) >= weight.size(1) - 1, "aim_kernels_cuda: conv_state holds ", conv_state.size(2),
              " steps, width ", weight.size(1), " needs ", weight.size(1) - 1);
  TORCH_CHECK(conv_state.scalar_type() == x.scalar_type(), "aim_kernels_cuda: conv_state must have x's dtype");
  p.x = x.data_ptr();
  p.state = conv_state.data_ptr();
  p.out = out.data_ptr();
  p.weight = weight.data_ptr();
  p.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  p.batch = x.size(0); p.dim = x.size(1); p.state_len = conv_state.size(2);
  p.x_sb = x.stride(0); p.x_sd = x.stride(1);
  p.s_sb = conv_state.stride(0); p.s_sd = conv_state.stride(1); p.s_st = conv_state.stride(2);
  p.o_sb = out.stride(0); p.o_sd = out.stride(1);
  p.width = static_cast<int>(weight.size(1));
  p.silu = silu;
  p.dtype = dtype_of(x, "x");
  check_launch(aimk::causal_conv1d_update(p, c10::cuda::getCurrentCUDAStream(x.get_device()).stream()),
               "causal_conv1d_update");
}

// A contiguous, 16-byte aligned tensor of `dtype` and `sizes` on ref's device.
void check_dense(const at::Tensor& t, const char* name, const at::Tensor& ref, at::ScalarType dtype,
                 at::IntArrayRef sizes) {
  check_on(t, name, ref);
  TORCH_CHECK(t.scalar_type() == dtype && t.is_contiguous() && aligned16(t) && t.sizes() == sizes,
              "aim_kernels_cuda: ", name, " must be a contiguous, 16-byte aligned ", dtype, " ", sizes, " tensor, got ",
              t.scalar_type(), " ", t.sizes());
}

int64_t decode_chain_scratch_bytes(int64_t layers, int64_t d_model, int64_t heads) {
  return static_cast<int64_t>(aimk::decode_chain_scratch_bytes(static_cast<int>(layers), static_cast<int>(d_model),
                                                               static_cast<int>(heads)));
}

void decode_chain(const at::TensorList in_weight, const at::Tensor& in_weight_ptrs, const at::Tensor& out_weight_t,
                  const at::Tensor& adaln, const at::Tensor& conv_state, const at::Tensor& ssm_state,
                  const at::Tensor& conv_weight, const at::Tensor& conv_bias, const at::Tensor& A_log, const at::Tensor& D,
                  const at::Tensor& dt_bias, const at::Tensor& x, const at::Tensor& residual, const at::Tensor& out,
                  const at::Tensor& scratch, double eps) {
  check_on(x, "x", x);
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t L = static_cast<int64_t>(in_weight.size()), R = aimk::kChainRows;
  TORCH_CHECK(L >= 1 && ssm_state.dim() == 5, "aim_kernels_cuda: decode_chain needs layers and an (L, 2, H, P, N) ssm_state");
  const int64_t d = x.size(-1), di = 2 * d, H = ssm_state.size(2), ns = aimk::kChainDState;
  const int64_t conv_dim = di + 2 * ns, n1 = 2 * di + 2 * ns + H;
  const auto wt = out_weight_t.scalar_type();
  TORCH_CHECK(wt == at::kBFloat16 || wt == at::kFloat, "aim_kernels_cuda: decode_chain takes bfloat16 or float32 weights");
  const int smem = aimk::decode_chain_smem_bytes(static_cast<int>(d), wt == at::kFloat);
  TORCH_CHECK(smem > 0, "aim_kernels_cuda: decode_chain is built for d_model 768, 1024 or 1536, got ", d);
  const auto io = x.scalar_type();
  TORCH_CHECK(io == at::kBFloat16 || io == at::kFloat, "aim_kernels_cuda: decode_chain takes a bfloat16 or float32 x");
  check_dense(x, "x", x, io, {R, d});
  check_dense(residual, "residual", x, at::kFloat, {R, d});
  check_dense(out, "out", x, io, {R, d});
  for (int64_t l = 0; l < L; ++l) check_dense(in_weight[l], "in_weight[l]", x, wt, {n1, d});
  check_on(in_weight_ptrs, "in_weight_ptrs", x);
  TORCH_CHECK(in_weight_ptrs.scalar_type() == at::kLong && in_weight_ptrs.is_contiguous() && in_weight_ptrs.numel() == L,
              "aim_kernels_cuda: in_weight_ptrs must be L int64 pointers");
  check_dense(out_weight_t, "out_weight_t", x, wt, {L, di, d});
  check_dense(adaln, "adaln", x, wt, {3, L, R, d});
  check_dense(conv_state, "conv_state", x, at::kFloat, {L, R, conv_dim, aimk::kChainConvWidth - 1});
  check_dense(ssm_state, "ssm_state", x, at::kFloat, {L, R, H, aimk::kChainHeaddim, ns});
  check_dense(conv_weight, "conv_weight", x, at::kFloat, {L, conv_dim, aimk::kChainConvWidth});
  check_dense(conv_bias, "conv_bias", x, at::kFloat, {L, conv_dim});
  for (const auto* t : {&A_log, &D, &dt_bias}) check_dense(*t, "A_log, D and dt_bias", x, at::kFloat, {L, H});
  const int64_t scratch_bytes = decode_chain_scratch_bytes(L, d, H);
  check_on(scratch, "scratch", x);
  TORCH_CHECK(scratch.is_contiguous() && aligned16(scratch) && scratch.nbytes() == static_cast<size_t>(scratch_bytes),
              "aim_kernels_cuda: scratch must be a contiguous, 16-byte aligned tensor of decode_chain_scratch_bytes = ",
              scratch_bytes, " bytes, got ", scratch.nbytes());
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  const int grid = prop->multiProcessorCount;
  TORCH_CHECK(prop->major >= 9, "aim_kernels_cuda: decode_chain needs sm_90 or newer");
  TORCH_CHECK(H <= aimk::kChainMaxHeads && (di + grid - 1) / grid <= std::min<int64_t>(aimk::kChainMaxChannels, d / 64) &&
                  (2 * ns + H + grid - 1) / grid <= aimk::kChainMaxBCDTRows,
              "aim_kernels_cuda: decode_chain needs more SMs for d_model ", d, " (", grid, ")");
  TORCH_CHECK(static_cast<int64_t>(prop->sharedMemPerBlockOptin) >= smem, "aim_kernels_cuda: decode_chain needs ", smem,
              " bytes of shared memory per block");
  aimk::ChainParams p{};
  p.in_weight = reinterpret_cast<const void* const*>(in_weight_ptrs.data_ptr<int64_t>());
  p.out_weight_t = out_weight_t.data_ptr();
  p.adaln = adaln.data_ptr();
  p.weights_f32 = wt == at::kFloat;
  p.conv_state = conv_state.data_ptr<float>();
  p.ssm_state = ssm_state.data_ptr<float>();
  p.conv_weight = conv_weight.data_ptr<float>();
  p.conv_bias = conv_bias.data_ptr<float>();
  p.A_log = A_log.data_ptr<float>();
  p.D = D.data_ptr<float>();
  p.dt_bias = dt_bias.data_ptr<float>();
  p.x = x.data_ptr();
  p.residual = residual.data_ptr<float>();
  p.out = out.data_ptr();
  p.io_bf16 = io == at::kBFloat16;
  p.layers = static_cast<int>(L);
  p.d_model = static_cast<int>(d);
  p.heads = static_cast<int>(H);
  p.eps = static_cast<float>(eps);
  check_launch(aimk::decode_chain(p, scratch.data_ptr(), grid, c10::cuda::getCurrentCUDAStream(x.get_device()).stream()),
               "decode_chain");
}

std::string build_info() {
  return std::string("cuda_archs=") + AIMK_STR(AIMK_CUDA_ARCHS) + ";cuda_version=" + std::to_string(CUDART_VERSION);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(aim_kernels_cuda, m) {
  m.def("build_info() -> str", &build_info);
  m.def("causal_conv1d_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor(a!) out, bool silu) -> ()");
  m.def("causal_conv1d_bwd(Tensor x, Tensor weight, Tensor? bias, Tensor dout, Tensor(a!) dx, "
        "Tensor(b!) dweight_bias, bool silu) -> ()");
  m.def("causal_conv1d_update(Tensor x, Tensor(a!) conv_state, Tensor weight, Tensor? bias, Tensor(b!) out, "
        "bool silu) -> ()");
  m.def("decode_chain(Tensor[] in_weight, Tensor in_weight_ptrs, Tensor out_weight_t, Tensor adaln, "
        "Tensor(a!) conv_state, Tensor(b!) ssm_state, Tensor conv_weight, Tensor conv_bias, Tensor A_log, Tensor D, "
        "Tensor dt_bias, Tensor x, Tensor(c!) residual, Tensor(d!) out, Tensor(e!) scratch, float eps) -> ()");
  m.def("decode_chain_scratch_bytes(int layers, int d_model, int heads) -> int", &decode_chain_scratch_bytes);
}

TORCH_LIBRARY_IMPL(aim_kernels_cuda, CUDA, m) {
  m.impl("causal_conv1d_fwd", &causal_conv1d_fwd);
  m.impl("causal_conv1d_bwd", &causal_conv1d_bwd);
  m.impl("causal_conv1d_update", &causal_conv1d_update);
  m.impl("decode_chain", &decode_chain);
}

// An empty Python module, so `import aim_kernels._C` works too (loading the library registers the
// ops); it uses only the limited C API, so the file does not depend on the Python version (abi3).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
