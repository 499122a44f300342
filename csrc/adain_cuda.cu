// Fused AdaIN on CUDA: per (b, c) plane statistics (fp32 Welford), affine, ReLU, residual add, and the backward.
// Planes are rows of a (P = B*C, N = H*W) matrix. A plane of at most split_threshold elements is done by one
// block (statistics pass, then an elementwise pass that mostly hits L2). Larger planes are split: several blocks
// per plane write partial statistics (Welford mean/M2, or the two backward sums), then a grid of tile blocks
// merges the partials of its plane and does the elementwise pass.
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

#include "checks.h"

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kChunk = 8192;  // elements reduced by one statistics block on the split path
constexpr int64_t kTile = 4096;   // elements per elementwise block on the split path

__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

struct Welford {
  float mean;
  float m2;
  float n;
};

__device__ __forceinline__ Welford welford_merge(const Welford& a, const Welford& b) {
  const float n = a.n + b.n;
  if (n == 0.f) return {0.f, 0.f, 0.f};
  const float delta = b.mean - a.mean;
  const float fb = b.n / n;
  return {a.mean + delta * fb, a.m2 + b.m2 + delta * delta * a.n * fb, n};
}

__device__ __forceinline__ Welford warp_merge(Welford w) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    Welford other{__shfl_xor_sync(0xffffffffu, w.mean, offset), __shfl_xor_sync(0xffffffffu, w.m2, offset),
                  __shfl_xor_sync(0xffffffffu, w.n, offset)};
    w = welford_merge(w, other);
  }
  return w;
}

// Merge of every thread's Welford state; the result is returned to all threads. Call once per kernel.
__device__ Welford block_merge(Welford w) {
  __shared__ Welford per_warp[kWarps];
  __shared__ Welford result;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  w = warp_merge(w);
  if (lane == 0) per_warp[warp] = w;
  __syncthreads();
  if (warp == 0) {
    w = lane < kWarps ? per_warp[lane] : Welford{0.f, 0.f, 0.f};
    w = warp_merge(w);
    if (lane == 0) result = w;
  }
  __syncthreads();
  return result;
}

// Block-wide sums of two values, returned to all threads. Call once per kernel.
__device__ float2 block_sum2(float a, float b) {
  __shared__ float2 per_warp[kWarps];
  __shared__ float2 result;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    a += __shfl_xor_sync(0xffffffffu, a, offset);
    b += __shfl_xor_sync(0xffffffffu, b, offset);
  }
  if (lane == 0) per_warp[warp] = make_float2(a, b);
  __syncthreads();
  if (warp == 0) {
    float2 v = lane < kWarps ? per_warp[lane] : make_float2(0.f, 0.f);
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      v.x += __shfl_xor_sync(0xffffffffu, v.x, offset);
      v.y += __shfl_xor_sync(0xffffffffu, v.y, offset);
    }
    if (lane == 0) result = v;
  }
  __syncthreads();
  return result;
}

template <typename scalar_t>
__device__ __forceinline__ Welford thread_welford(const scalar_t* x, int64_t begin, int64_t end) {
  Welford w{0.f, 0.f, 0.f};
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const float v = static_cast<float>(x[i]);
    w.n += 1.f;
    const float delta = v - w.mean;
    w.mean += delta / w.n;
    w.m2 += delta * (v - w.mean);
  }
  return w;
}

template <bool RELU, bool RESIDUAL, typename scalar_t>
__device__ __forceinline__ void normalize_range(const scalar_t* x, const scalar_t* residual, scalar_t* y, int64_t begin,
                                                int64_t end, float mean, float scale, float shift) {
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    float v = (static_cast<float>(x[i]) - mean) * scale + shift;
    if (RELU) v = fmaxf(v, 0.f);
    if (RESIDUAL) v += static_cast<float>(residual[i]);
    y[i] = static_cast<scalar_t>(v);
  }
}

template <bool RELU, bool RESIDUAL, typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    fwd_plane_kernel(const scalar_t* __restrict__ x, const float* __restrict__ weight, const float* __restrict__ bias,
        const scalar_t* __restrict__ residual, scalar_t* __restrict__ y, float* __restrict__ mean_out,
        float* __restrict__ rstd_out, int64_t n, float eps) {
  const int64_t plane = blockIdx.x;
  const int64_t offset = plane * n;
  const Welford w = block_merge(thread_welford(x + offset, 0, n));
  const float mean = w.mean;
  const float rstd = rsqrtf(w.m2 / static_cast<float>(n) + eps);
  if (threadIdx.x == 0) {
    mean_out[plane] = mean;
    rstd_out[plane] = rstd;
  }
  normalize_range<RELU, RESIDUAL>(x + offset, RESIDUAL ? residual + offset : residual, y + offset, 0, n, mean,
                                  rstd * weight[plane], bias[plane]);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    fwd_stats_kernel(const scalar_t* __restrict__ x, float* __restrict__ part_mean, float* __restrict__ part_m2,
        int64_t n, int splits) {
  const int64_t plane = blockIdx.x;
  const int split = blockIdx.y;
  const int64_t begin = split * kChunk, end = min64(begin + kChunk, n);
  const Welford w = block_merge(thread_welford(x + plane * n, begin, end));
  if (threadIdx.x == 0) {
    part_mean[plane * splits + split] = w.mean;
    part_m2[plane * splits + split] = w.m2;
  }
}

template <bool RELU, bool RESIDUAL, typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    fwd_normalize_kernel(const scalar_t* __restrict__ x, const float* __restrict__ weight,
        const float* __restrict__ bias, const scalar_t* __restrict__ residual, scalar_t* __restrict__ y,
        float* __restrict__ mean_out, float* __restrict__ rstd_out, const float* __restrict__ part_mean,
        const float* __restrict__ part_m2, int64_t n, int splits, float eps) {
  const int64_t plane = blockIdx.x;
  Welford w{0.f, 0.f, 0.f};
  for (int s = threadIdx.x; s < splits; s += blockDim.x) {
    const float count = static_cast<float>(min64(kChunk, n - s * kChunk));
    w = welford_merge(w, Welford{part_mean[plane * splits + s], part_m2[plane * splits + s], count});
  }
  w = block_merge(w);
  const float mean = w.mean;
  const float rstd = rsqrtf(w.m2 / static_cast<float>(n) + eps);
  if (blockIdx.y == 0 && threadIdx.x == 0) {
    mean_out[plane] = mean;
    rstd_out[plane] = rstd;
  }
  const int64_t offset = plane * n;
  const int64_t begin = blockIdx.y * kTile, end = min64(begin + kTile, n);
  normalize_range<RELU, RESIDUAL>(x + offset, RESIDUAL ? residual + offset : residual, y + offset, begin, end, mean,
                                  rstd * weight[plane], bias[plane]);
}

// Backward. g = dy, masked by the ReLU of the recomputed pre-activation; with xc = x - mean:
// dbias = sum(g), dweight = rstd * sum(g * xc), dx = scale * (g - sum(g) / n - xc * rstd^2 * sum(g * xc) / n).
template <bool RELU, typename scalar_t>
__device__ __forceinline__ float2 thread_grad_sums(const scalar_t* dy, const scalar_t* x, int64_t begin, int64_t end,
                                                   float mean, float scale, float shift) {
  float sum_g = 0.f, sum_gxc = 0.f;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const float xc = static_cast<float>(x[i]) - mean;
    float g = static_cast<float>(dy[i]);
    if (RELU) g = xc * scale + shift > 0.f ? g : 0.f;
    sum_g += g;
    sum_gxc += g * xc;
  }
  return make_float2(sum_g, sum_gxc);
}

template <bool RELU, typename scalar_t>
__device__ __forceinline__ void dx_range(const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t begin, int64_t end,
                                         float mean, float scale, float shift, float k_x, float k_0) {
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const float xc = static_cast<float>(x[i]) - mean;
    float g = static_cast<float>(dy[i]);
    if (RELU) g = xc * scale + shift > 0.f ? g : 0.f;
    dx[i] = static_cast<scalar_t>(scale * g + k_x * xc + k_0);
  }
}

template <bool RELU, typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    bwd_plane_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
        const float* __restrict__ weight, const float* __restrict__ bias, const float* __restrict__ mean_in,
        const float* __restrict__ rstd_in, scalar_t* __restrict__ dx, float* __restrict__ dweight,
        float* __restrict__ dbias, int64_t n) {
  const int64_t plane = blockIdx.x;
  const int64_t offset = plane * n;
  const float mean = mean_in[plane], rstd = rstd_in[plane];
  const float scale = rstd * weight[plane], shift = bias[plane];
  const float2 t = thread_grad_sums<RELU>(dy + offset, x + offset, 0, n, mean, scale, shift);
  const float2 sums = block_sum2(t.x, t.y);
  const float sum_gxhat = sums.y * rstd;
  if (threadIdx.x == 0) {
    dweight[plane] = sum_gxhat;
    dbias[plane] = sums.x;
  }
  const float inv_n = 1.f / static_cast<float>(n);
  dx_range<RELU>(dy + offset, x + offset, dx + offset, 0, n, mean, scale, shift, -scale * rstd * sum_gxhat * inv_n,
                 -scale * sums.x * inv_n);
}

template <bool RELU, typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    bwd_reduce_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
        const float* __restrict__ weight, const float* __restrict__ bias, const float* __restrict__ mean_in,
        const float* __restrict__ rstd_in, float* __restrict__ part_g, float* __restrict__ part_gxhat, int64_t n,
        int splits) {
  const int64_t plane = blockIdx.x;
  const int split = blockIdx.y;
  const int64_t begin = split * kChunk, end = min64(begin + kChunk, n);
  const float mean = mean_in[plane], rstd = rstd_in[plane];
  const float2 t = thread_grad_sums<RELU>(dy + plane * n, x + plane * n, begin, end, mean, rstd * weight[plane],
                                          bias[plane]);
  const float2 sums = block_sum2(t.x, t.y);
  if (threadIdx.x == 0) {
    part_g[plane * splits + split] = sums.x;
    part_gxhat[plane * splits + split] = sums.y * rstd;
  }
}

template <bool RELU, typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    bwd_dx_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x, const float* __restrict__ weight,
        const float* __restrict__ bias, const float* __restrict__ mean_in, const float* __restrict__ rstd_in,
        const float* __restrict__ part_g, const float* __restrict__ part_gxhat, scalar_t* __restrict__ dx,
        float* __restrict__ dweight, float* __restrict__ dbias, int64_t n, int splits) {
  const int64_t plane = blockIdx.x;
  float a = 0.f, b = 0.f;
  for (int s = threadIdx.x; s < splits; s += blockDim.x) {
    a += part_g[plane * splits + s];
    b += part_gxhat[plane * splits + s];
  }
  const float2 sums = block_sum2(a, b);
  if (blockIdx.y == 0 && threadIdx.x == 0) {
    dweight[plane] = sums.y;
    dbias[plane] = sums.x;
  }
  const float mean = mean_in[plane], rstd = rstd_in[plane];
  const float scale = rstd * weight[plane];
  const float inv_n = 1.f / static_cast<float>(n);
  const int64_t offset = plane * n;
  const int64_t begin = blockIdx.y * kTile, end = min64(begin + kTile, n);
  dx_range<RELU>(dy + offset, x + offset, dx + offset, begin, end, mean, scale, bias[plane],
                 -scale * rstd * sums.y * inv_n, -scale * sums.x * inv_n);
}

// ---------------------------------------------------------------------------------------------------------------
// Host side

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool use_split(int64_t n, int64_t split_threshold) { return split_threshold > 0 && n > split_threshold; }

template <bool RELU, bool RESIDUAL, typename scalar_t>
void launch_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, const scalar_t* residual,
                    const at::Tensor& y, const at::Tensor& mean, const at::Tensor& rstd, float eps,
                    int64_t split_threshold) {
  const int64_t planes = x.size(0) * x.size(1), n = x.size(2) * x.size(3);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto* xp = x.data_ptr<scalar_t>();
  if (!use_split(n, split_threshold)) {
    fwd_plane_kernel<RELU, RESIDUAL, scalar_t><<<planes, kThreads, 0, stream>>>(
        xp, weight.data_ptr<float>(), bias.data_ptr<float>(), residual, y.data_ptr<scalar_t>(),
        mean.data_ptr<float>(), rstd.data_ptr<float>(), n, eps);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const int splits = static_cast<int>(ceil_div(n, kChunk));
  auto part = at::empty({2, planes, splits}, x.options().dtype(at::kFloat));
  float* part_mean = part.data_ptr<float>();
  float* part_m2 = part_mean + planes * splits;
  fwd_stats_kernel<scalar_t><<<dim3(planes, splits), kThreads, 0, stream>>>(xp, part_mean, part_m2, n, splits);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  fwd_normalize_kernel<RELU, RESIDUAL, scalar_t><<<dim3(planes, ceil_div(n, kTile)), kThreads, 0, stream>>>(
      xp, weight.data_ptr<float>(), bias.data_ptr<float>(), residual, y.data_ptr<scalar_t>(), mean.data_ptr<float>(),
      rstd.data_ptr<float>(), part_mean, part_m2, n, splits, eps);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <bool RELU, typename scalar_t>
void launch_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                     const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& dx, const at::Tensor& dweight,
                     const at::Tensor& dbias, int64_t split_threshold) {
  const int64_t planes = x.size(0) * x.size(1), n = x.size(2) * x.size(3);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto* dyp = dy.data_ptr<scalar_t>();
  const auto* xp = x.data_ptr<scalar_t>();
  if (!use_split(n, split_threshold)) {
    bwd_plane_kernel<RELU, scalar_t><<<planes, kThreads, 0, stream>>>(
        dyp, xp, weight.data_ptr<float>(), bias.data_ptr<float>(), mean.data_ptr<float>(), rstd.data_ptr<float>(),
        dx.data_ptr<scalar_t>(), dweight.data_ptr<float>(), dbias.data_ptr<float>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const int splits = static_cast<int>(ceil_div(n, kChunk));
  auto part = at::empty({2, planes, splits}, x.options().dtype(at::kFloat));
  float* part_g = part.data_ptr<float>();
  float* part_gxhat = part_g + planes * splits;
  bwd_reduce_kernel<RELU, scalar_t><<<dim3(planes, splits), kThreads, 0, stream>>>(
      dyp, xp, weight.data_ptr<float>(), bias.data_ptr<float>(), mean.data_ptr<float>(), rstd.data_ptr<float>(),
      part_g, part_gxhat, n, splits);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  bwd_dx_kernel<RELU, scalar_t><<<dim3(planes, ceil_div(n, kTile)), kThreads, 0, stream>>>(
      dyp, xp, weight.data_ptr<float>(), bias.data_ptr<float>(), mean.data_ptr<float>(), rstd.data_ptr<float>(),
      part_g, part_gxhat, dx.data_ptr<scalar_t>(), dweight.data_ptr<float>(), dbias.data_ptr<float>(), n, splits);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void adain_forward_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                        const std::optional<at::Tensor>& residual, bool relu, double eps, int64_t split_threshold,
                        const at::Tensor& y, const at::Tensor& mean, const at::Tensor& rstd) {
  council_fast::checks::adain_forward_args(x, weight, bias, residual, y, mean, rstd);
  const bool has_residual = residual.has_value();
  if (x.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const float eps_f = static_cast<float>(eps);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "adain_forward_cuda", [&] {
    const scalar_t* res = has_residual ? residual->data_ptr<scalar_t>() : nullptr;
    const int64_t t = split_threshold;
    if (relu && has_residual) launch_forward<true, true, scalar_t>(x, weight, bias, res, y, mean, rstd, eps_f, t);
    else if (relu) launch_forward<true, false, scalar_t>(x, weight, bias, res, y, mean, rstd, eps_f, t);
    else if (has_residual) launch_forward<false, true, scalar_t>(x, weight, bias, res, y, mean, rstd, eps_f, t);
    else launch_forward<false, false, scalar_t>(x, weight, bias, res, y, mean, rstd, eps_f, t);
  });
}

void adain_backward_cuda(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                         const at::Tensor& mean, const at::Tensor& rstd, bool relu, int64_t split_threshold,
                         const at::Tensor& dx, const at::Tensor& dweight, const at::Tensor& dbias) {
  council_fast::checks::adain_backward_args(dy, x, weight, bias, mean, rstd, dx, dweight, dbias);
  if (x.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "adain_backward_cuda", [&] {
    if (relu) launch_backward<true, scalar_t>(dy, x, weight, bias, mean, rstd, dx, dweight, dbias, split_threshold);
    else launch_backward<false, scalar_t>(dy, x, weight, bias, mean, rstd, dx, dweight, dbias, split_threshold);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(council_fast, CUDA, m) {  // schemas: csrc/schemas.cpp
  m.impl("adain_forward_out", &adain_forward_cuda);
  m.impl("adain_backward_out", &adain_backward_cuda);
}
