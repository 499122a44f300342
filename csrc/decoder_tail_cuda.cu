// Decoder tail on CUDA: three 1x1 convs (ReLU, ReLU, tanh), mask tanh and the attention blend, one
// thread per pixel. The weights sit in shared memory as fp32 (every thread of a warp reads the same
// weight, a broadcast); activations live in per-thread (local, L1-cached) arrays, and in registers
// for the layer inputs of the (dim 64, 12 raw channels) forward, compiled with fixed sizes. Only the
// inner loops unroll: fully unrolled 64x64 layers took nvcc tens of minutes, too long for a JIT build.
// Backward: the per-pixel kernel recomputes the forward, writes grad_h and grad_images, and leaves
// the pre-activation gradients and the layer inputs of a chunk of pixels in fp32 buffers; the
// weight gradients are then three matrix products over pixels (cuBLAS), chunk by chunk.
#include <torch/extension.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <vector>

#include "checks.h"

namespace {

constexpr int kThreads = 128;
constexpr int kMaxGeneric = 256;  // largest dim / raw-channel count of the generic kernels
constexpr int kMaxOut = 8;
constexpr int kMaxMasks = 64;
static_assert(kMaxOut == 8 && kMaxMasks == 64, "csrc/checks.h enforces these bounds");

// The element type is a run-time switch (uniform across a launch), not a template parameter: three
// instantiations of the unrolled kernels would triple the compile time for nothing.
enum : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return kF32;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    default: TORCH_CHECK(false, "decoder_tail cuda: float32, float16 or bfloat16 tensors only, got ", t.scalar_type());
  }
  return kF32;
}

__device__ __forceinline__ float load_elem(const void* p, int64_t i, int code) {
  if (code == kF32) return static_cast<const float*>(p)[i];
  if (code == kF16) return __half2float(static_cast<const __half*>(p)[i]);
  return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
}

__device__ __forceinline__ void store_elem(void* p, int64_t i, float v, int code) {
  if (code == kF32) static_cast<float*>(p)[i] = v;
  else if (code == kF16) static_cast<__half*>(p)[i] = __float2half_rn(v);
  else static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
}

struct Pixels {  // element (b, c, p) of a (B, C, H, W) tensor with H*W merged
  int64_t sb, sc, sp;
};

Pixels pixels_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(3)}; }

struct Shape {
  int D, N, O, M, code;  // code: element type of h, images and the outputs
  int64_t HW, total;  // pixels per image, pixels in this launch
};

// D_ and N_ fixed at compile time (> 0) or read from the shape (0).
template <int D_, int N_>
struct Sizes {
  static constexpr int kD = D_ > 0 ? D_ : kMaxGeneric;
  static constexpr int kN = N_ > 0 ? N_ : kMaxGeneric;
  __device__ static int d(const Shape& s) { return D_ > 0 ? D_ : s.D; }
  __device__ static int n(const Shape& s) { return N_ > 0 ? N_ : s.N; }
};

__device__ __forceinline__ float tanh_f(float x) { return tanhf(x); }

template <int D_, int N_>
__device__ void load_weights(float* sw, const float* w1, const float* b1, const float* w2, const float* b2,
                             const float* w3, const float* b3, const Shape& s) {
  using S = Sizes<D_, N_>;
  const int D = S::d(s), N = S::n(s);
  const int sizes[6] = {D * D, D, D * D, D, N * D, N};
  const float* src[6] = {w1, b1, w2, b2, w3, b3};
  int offset = 0;
  for (int k = 0; k < 6; ++k) {
    for (int i = threadIdx.x; i < sizes[k]; i += blockDim.x) sw[offset + i] = src[k][i];
    offset += sizes[k];
  }
  __syncthreads();
}

// y[o] = bias[o] + sum_i w[o * in + i] * x[i], optional ReLU. Fixed sizes (OUT, IN > 0): the input
// is copied into registers once and the inner loop unrolls (consecutive weights, vector shared
// loads); the output loop stays a loop, which keeps nvcc's compile time short. Generic sizes (0)
// loop at run time over local memory.
template <int OUT, int IN>
__device__ __forceinline__ void dense(const float* __restrict__ w, const float* __restrict__ bias,
                                      const float* x, float* y, int out, int in, bool relu) {
  if constexpr (OUT > 0 && IN > 0) {
    float xr[IN];
#pragma unroll
    for (int i = 0; i < IN; ++i) xr[i] = x[i];
#pragma unroll 1
    for (int o = 0; o < OUT; ++o) {
      float acc = bias[o];
#pragma unroll
      for (int i = 0; i < IN; ++i) acc = fmaf(w[o * IN + i], xr[i], acc);
      y[o] = relu ? fmaxf(acc, 0.f) : acc;
    }
  } else {
#pragma unroll 1
    for (int o = 0; o < out; ++o) {
      float acc = bias[o];
#pragma unroll 4
      for (int i = 0; i < in; ++i) acc = fmaf(w[o * in + i], x[i], acc);
      y[o] = relu ? fmaxf(acc, 0.f) : acc;
    }
  }
}

// x[i] = sum_o w[o * in + i] * g[o] (the transposed product).
template <int OUT, int IN>
__device__ __forceinline__ void dense_t(const float* __restrict__ w, const float* g, float* x, int out, int in) {
  if constexpr (OUT > 0 && IN > 0) {  // as dense: g in registers, the inner loop unrolled, the outer not
    float gr[OUT];
#pragma unroll
    for (int o = 0; o < OUT; ++o) gr[o] = g[o];
#pragma unroll 1
    for (int i = 0; i < IN; ++i) {
      float acc = 0.f;
#pragma unroll
      for (int o = 0; o < OUT; ++o) acc = fmaf(w[o * IN + i], gr[o], acc);
      x[i] = acc;
    }
  } else {
#pragma unroll 1
    for (int i = 0; i < in; ++i) {
      float acc = 0.f;
#pragma unroll 4
      for (int o = 0; o < out; ++o) acc = fmaf(w[o * in + i], g[o], acc);
      x[i] = acc;
    }
  }
}

// Fixed-size loops unroll; generic ones do not (a 256-wide unroll would explode the code).
#define FOR_CHANNELS(var, FIXED, count) \
  _Pragma("unroll") for (int var = 0; var < ((FIXED) > 0 ? (FIXED) : (count)); ++var)

template <int D_, int N_>
__global__ void __launch_bounds__(kThreads) forward_kernel(
    const void* __restrict__ h, const float* w1, const float* b1, const float* w2, const float* b2,
    const float* w3, const float* b3, const void* __restrict__ images, void* __restrict__ out,
    void* __restrict__ masks, Shape s, Pixels hs, Pixels is) {
  using S = Sizes<D_, N_>;
  extern __shared__ float sw[];
  load_weights<D_, N_>(sw, w1, b1, w2, b2, w3, b3, s);
  const int D = S::d(s), N = S::n(s);
  const float *sw1 = sw, *sb1 = sw1 + D * D, *sw2 = sb1 + D, *sb2 = sw2 + D * D, *sw3 = sb2 + D, *sb3 = sw3 + N * D;
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= s.total) return;
  const int64_t b = idx / s.HW, p = idx % s.HW;
  float x[S::kD], y[S::kD], t[S::kN];
  FOR_CHANNELS(i, D_, D) x[i] = load_elem(h, b * hs.sb + i * hs.sc + p * hs.sp, s.code);
  dense<D_, D_>(sw1, sb1, x, y, D, D, true);
  dense<D_, D_>(sw2, sb2, y, x, D, D, true);
  dense<N_, D_>(sw3, sb3, x, t, N, D, false);
  FOR_CHANNELS(n, N_, N) t[n] = tanh_f(t[n]);
  const int O = s.O, M = s.M;
  float state[kMaxOut];
  for (int c = 0; c < O; ++c) state[c] = load_elem(images, b * is.sb + c * is.sc + p * is.sp, s.code);
  for (int k = 0; k < M; ++k) {
    const float m = (tanh_f(10.f * t[O * M + k]) + 1.f) * 0.5f;
    store_elem(masks, (b * M + k) * s.HW + p, m, s.code);
    for (int c = 0; c < O; ++c) state[c] = (1.f - m) * state[c] + m * t[O * k + c];
  }
  for (int c = 0; c < O; ++c) store_elem(out, (b * O + c) * s.HW + p, state[c], s.code);
}

// Buffers of one chunk of pixels, [channel][pixel]: layer inputs and pre-activation gradients.
struct Buffers {
  float *x, *r1, *r2, *g1, *g2, *g3;
  int64_t chunk;
};

template <int D_, int N_>
__global__ void __launch_bounds__(kThreads) backward_kernel(
    const float* __restrict__ grad_out, const float* __restrict__ grad_masks, const void* __restrict__ h,
    const float* w1, const float* b1, const float* w2, const float* b2, const float* w3, const float* b3,
    const void* __restrict__ images, void* __restrict__ grad_h, void* __restrict__ grad_images,
    Shape s, int64_t first, Pixels hs, Pixels is, Pixels ghs, Pixels gis, Buffers buf) {
  using S = Sizes<D_, N_>;
  extern __shared__ float sw[];
  load_weights<D_, N_>(sw, w1, b1, w2, b2, w3, b3, s);
  const int D = S::d(s), N = S::n(s);
  const float *sw1 = sw, *sb1 = sw1 + D * D, *sw2 = sb1 + D, *sb2 = sw2 + D * D, *sw3 = sb2 + D, *sb3 = sw3 + N * D;
  const int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;  // pixel within the chunk
  if (j >= s.total) return;
  const int64_t idx = first + j;
  const int64_t b = idx / s.HW, p = idx % s.HW;
  float x[S::kD], r1[S::kD], r2[S::kD], t[S::kN];
  FOR_CHANNELS(i, D_, D) {
      x[i] = load_elem(h, b * hs.sb + i * hs.sc + p * hs.sp, s.code);
      buf.x[i * buf.chunk + j] = x[i];
    }
  dense<D_, D_>(sw1, sb1, x, r1, D, D, true);
  dense<D_, D_>(sw2, sb2, r1, r2, D, D, true);
  dense<N_, D_>(sw3, sb3, r2, t, N, D, false);
  FOR_CHANNELS(i, D_, D) {
      buf.r1[i * buf.chunk + j] = r1[i];
      buf.r2[i * buf.chunk + j] = r2[i];
    }
  FOR_CHANNELS(n, N_, N) t[n] = tanh_f(t[n]);
  // Blend backward: replay the blend to get the state before each step.
  const int O = s.O, M = s.M;
  // (M + 1) * O blend states; with N = (O + 1) * M fixed, that is at most N + O
  float states[N_ > 0 ? N_ + kMaxOut : (kMaxMasks + 1) * kMaxOut];
  float g[kMaxOut];
  for (int c = 0; c < O; ++c) {
    states[c] = load_elem(images, b * is.sb + c * is.sc + p * is.sp, s.code);
    g[c] = grad_out[(b * O + c) * s.HW + p];
  }
  for (int k = 0; k < M; ++k) {
    const float m = (tanh_f(10.f * t[O * M + k]) + 1.f) * 0.5f;
    for (int c = 0; c < O; ++c) states[(k + 1) * O + c] = (1.f - m) * states[k * O + c] + m * t[O * k + c];
  }
  float g_t[S::kN];
  for (int k = M - 1; k >= 0; --k) {
    const float th = tanh_f(10.f * t[O * M + k]);
    const float m = (th + 1.f) * 0.5f;
    float gm = grad_masks ? grad_masks[(b * M + k) * s.HW + p] : 0.f;
    for (int c = 0; c < O; ++c) {
      gm += g[c] * (t[O * k + c] - states[k * O + c]);
      g_t[O * k + c] = m * g[c];
      g[c] *= 1.f - m;
    }
    g_t[O * M + k] = gm * 5.f * (1.f - th * th);
  }
  for (int c = 0; c < O; ++c) store_elem(grad_images, b * gis.sb + c * gis.sc + p * gis.sp, g[c], s.code);
  FOR_CHANNELS(n, N_, N) {
      g_t[n] *= 1.f - t[n] * t[n];
      buf.g3[n * buf.chunk + j] = g_t[n];
    }
  float ga[S::kD], gb[S::kD];
  dense_t<N_, D_>(sw3, g_t, ga, N, D);
  FOR_CHANNELS(i, D_, D) {
      ga[i] = r2[i] > 0.f ? ga[i] : 0.f;
      buf.g2[i * buf.chunk + j] = ga[i];
    }
  dense_t<D_, D_>(sw2, ga, gb, D, D);
  FOR_CHANNELS(i, D_, D) {
      gb[i] = r1[i] > 0.f ? gb[i] : 0.f;
      buf.g1[i * buf.chunk + j] = gb[i];
    }
  dense_t<D_, D_>(sw1, gb, ga, D, D);
  FOR_CHANNELS(i, D_, D) store_elem(grad_h, b * ghs.sb + i * ghs.sc + p * ghs.sp, ga[i], s.code);
}

// Limits of these kernels beyond the shared checks (csrc/checks.h).
void check_cuda_limits(const at::Tensor& h, const at::Tensor& w3) {
  TORCH_CHECK(h.size(1) <= kMaxGeneric && w3.size(0) <= kMaxGeneric, "decoder_tail cuda: dim and raw channels <= 256");
}

// The anime decoder's (dim 64, 12 raw channels) forward and backward get the fixed-size kernels.
bool is_common(int64_t D, int64_t N) { return D == 64 && N == 12; }

std::vector<at::Tensor> float_weights(std::initializer_list<at::Tensor> ws) {
  std::vector<at::Tensor> out;
  for (const at::Tensor& w : ws) out.push_back(w.to(at::kFloat).contiguous());
  return out;
}

size_t shared_bytes(int64_t D, int64_t N, const at::Device& device) {
  const size_t bytes = sizeof(float) * (2 * D * D + N * D + 2 * D + N);
  int limit = 0;  // the most a block may opt in to: 227 KB on H100, 163 KB on A100, 99 KB on sm_86/89
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device.index()));
  TORCH_CHECK(bytes <= static_cast<size_t>(limit), "decoder_tail cuda: the fp32 weights (dim ", D, ", ", N,
              " raw channels, ", bytes, " bytes) do not fit in this GPU's shared memory (", limit,
              " bytes); use the triton back-end");
  return bytes;
}

template <typename Kernel>
void allow_shared(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

void forward(const at::Tensor& h, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
             const at::Tensor& b2, const at::Tensor& w3, const at::Tensor& b3, const at::Tensor& images,
             int64_t num_masks, at::Tensor& out, at::Tensor& masks) {
  council_fast::checks::decoder_tail_inputs(h, w1, b1, w2, b2, w3, b3, images, num_masks);
  council_fast::checks::decoder_tail_outputs(h, images, num_masks, out, masks);
  check_cuda_limits(h, w3);
  const c10::cuda::CUDAGuard guard(h.device());
  auto w = float_weights({w1, b1, w2, b2, w3, b3});
  const int64_t B = h.size(0), HW = h.size(2) * h.size(3);
  const Shape s{static_cast<int>(h.size(1)), static_cast<int>(w3.size(0)), static_cast<int>(images.size(1)),
                static_cast<int>(num_masks), dtype_code(h), HW, B * HW};
  if (s.total == 0) return;
  const size_t smem = shared_bytes(s.D, s.N, h.device());
  const dim3 grid(static_cast<unsigned>((s.total + kThreads - 1) / kThreads));
  auto stream = c10::cuda::getCurrentCUDAStream();
  {
    auto kernel = is_common(s.D, s.N) ? forward_kernel<64, 12> : forward_kernel<0, 0>;
    allow_shared(kernel, smem);
    kernel<<<grid, kThreads, smem, stream>>>(
        h.data_ptr(), w[0].data_ptr<float>(), w[1].data_ptr<float>(), w[2].data_ptr<float>(),
        w[3].data_ptr<float>(), w[4].data_ptr<float>(), w[5].data_ptr<float>(), images.data_ptr(),
        out.data_ptr(), masks.data_ptr(), s, pixels_of(h), pixels_of(images));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

std::vector<at::Tensor> backward(const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_masks,
                                 const at::Tensor& h, const at::Tensor& w1, const at::Tensor& b1,
                                 const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& w3,
                                 const at::Tensor& b3, const at::Tensor& images, int64_t num_masks,
                                 int64_t max_chunk, at::Tensor& grad_h, at::Tensor& grad_img) {
  council_fast::checks::decoder_tail_inputs(h, w1, b1, w2, b2, w3, b3, images, num_masks);
  council_fast::checks::decoder_tail_grads(h, images, grad_out, grad_masks, grad_h, grad_img);
  check_cuda_limits(h, w3);
  TORCH_CHECK(max_chunk >= 1, "decoder_tail cuda: max_chunk must be positive, got ", max_chunk);
  const c10::cuda::CUDAGuard guard(h.device());
  auto w = float_weights({w1, b1, w2, b2, w3, b3});
  const int64_t B = h.size(0), HW = h.size(2) * h.size(3), D = h.size(1), N = w3.size(0);
  at::Tensor gout = grad_out.to(at::kFloat).contiguous();
  at::Tensor gmask = grad_masks.has_value() ? grad_masks->to(at::kFloat).contiguous() : at::Tensor();
  auto f32 = h.options().dtype(at::kFloat);
  at::Tensor gw1 = at::zeros({D, D}, f32), gw2 = at::zeros({D, D}, f32), gw3 = at::zeros({N, D}, f32);
  at::Tensor gb1 = at::zeros({D}, f32), gb2 = at::zeros({D}, f32), gb3 = at::zeros({N}, f32);
  const int64_t total = B * HW;
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(total, max_chunk));
  at::Tensor xs = at::empty({D, chunk}, f32), r1 = at::empty({D, chunk}, f32), r2 = at::empty({D, chunk}, f32);
  at::Tensor g1 = at::empty({D, chunk}, f32), g2 = at::empty({D, chunk}, f32), g3 = at::empty({N, chunk}, f32);
  const size_t smem = shared_bytes(D, N, h.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  for (int64_t first = 0; first < total; first += chunk) {
    const int64_t count = std::min(chunk, total - first);
    const Shape s{static_cast<int>(D), static_cast<int>(N), static_cast<int>(images.size(1)),
                  static_cast<int>(num_masks), dtype_code(h), HW, count};
    const Buffers buf{xs.data_ptr<float>(), r1.data_ptr<float>(), r2.data_ptr<float>(), g1.data_ptr<float>(),
                      g2.data_ptr<float>(), g3.data_ptr<float>(), chunk};
    const dim3 grid(static_cast<unsigned>((count + kThreads - 1) / kThreads));
    {
      auto kernel = is_common(D, N) ? backward_kernel<64, 12> : backward_kernel<0, 0>;
      allow_shared(kernel, smem);
      kernel<<<grid, kThreads, smem, stream>>>(
          gout.data_ptr<float>(), gmask.defined() ? gmask.data_ptr<float>() : nullptr, h.data_ptr(),
          w[0].data_ptr<float>(), w[1].data_ptr<float>(), w[2].data_ptr<float>(), w[3].data_ptr<float>(),
          w[4].data_ptr<float>(), w[5].data_ptr<float>(), images.data_ptr(), grad_h.data_ptr(),
          grad_img.data_ptr(), s, first, pixels_of(h), pixels_of(images), pixels_of(grad_h),
          pixels_of(grad_img), buf);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    auto used = [&](const at::Tensor& t) { return t.narrow(1, 0, count); };
    gw3.addmm_(used(g3), used(r2).t());
    gw2.addmm_(used(g2), used(r1).t());
    gw1.addmm_(used(g1), used(xs).t());
    gb3.add_(used(g3).sum(1));
    gb2.add_(used(g2).sum(1));
    gb1.add_(used(g1).sum(1));
  }
  return {gw1.to(w1.scalar_type()), gb1.to(b1.scalar_type()), gw2.to(w2.scalar_type()),
          gb2.to(b2.scalar_type()), gw3.to(w3.scalar_type()), gb3.to(b3.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(council_fast, CUDA, m) {  // schemas: csrc/schemas.cpp
  m.impl("decoder_tail_forward_out", &forward);
  m.impl("decoder_tail_backward_out", &backward);
}
