// Fused AdaIN on the CPU: per (b, c) plane statistics, affine, ReLU and residual add, and the backward.
// One plane at a time per thread (at::parallel_for over the B*C planes); a bf16 plane is widened into
// a per-thread fp32 buffer first (fp16 likewise) so the inner loops are plain fp32 loops the compiler vectorises.
// Sums run in fp32 SIMD lanes over blocks of kBlock elements and in double across blocks.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "checks.h"

namespace {

constexpr int64_t kBlock = 2048;

// bf16 <-> fp32 through the raw bits (round to nearest even), written so that loops over them vectorise;
// c10's own conversions do the same per element but the compiler does not vectorise them.
template <typename T>
inline float to_float(T v) {
  return static_cast<float>(v);
}
template <>
inline float to_float(c10::BFloat16 v) {
  const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
template <typename T>
inline T from_float(float f) {
  return static_cast<T>(f);
}
template <>
inline c10::BFloat16 from_float(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  return c10::BFloat16(static_cast<uint16_t>(f != f ? 0x7FC0u : rounded), c10::BFloat16::from_bits());
}

template <typename scalar_t>
const float* as_float_plane(const scalar_t* src, int64_t n, std::vector<float>& buffer) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return src;
  } else {
    buffer.resize(n);
    float* out = buffer.data();
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = to_float(src[i]);
    return out;
  }
}

double block_sum(const float* x, int64_t n) {
  double total = 0.0;
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t end = std::min(n, start + kBlock);
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = start; i < end; ++i) s += x[i];
    total += s;
  }
  return total;
}

double block_centered_squares(const float* x, int64_t n, float mean) {
  double total = 0.0;
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t end = std::min(n, start + kBlock);
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = start; i < end; ++i) {
      const float d = x[i] - mean;
      s += d * d;
    }
    total += s;
  }
  return total;
}

template <bool RELU, bool RESIDUAL, typename scalar_t>
void normalize_plane(const float* x, const scalar_t* residual, scalar_t* y, int64_t n, float mean, float scale,
                     float shift) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float v = (x[i] - mean) * scale + shift;
    if constexpr (RELU) v = v > 0.f ? v : 0.f;
    if constexpr (RESIDUAL) v += to_float(residual[i]);
    y[i] = from_float<scalar_t>(v);
  }
}

template <typename scalar_t>
void normalize_plane_dispatch(bool relu, const float* x, const scalar_t* residual, scalar_t* y, int64_t n,
                              float mean, float scale, float shift) {
  if (relu) {
    if (residual) normalize_plane<true, true>(x, residual, y, n, mean, scale, shift);
    else normalize_plane<true, false>(x, residual, y, n, mean, scale, shift);
  } else {
    if (residual) normalize_plane<false, true>(x, residual, y, n, mean, scale, shift);
    else normalize_plane<false, false>(x, residual, y, n, mean, scale, shift);
  }
}

int64_t grain_for(int64_t plane_size) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(plane_size, 1)); }

template <typename scalar_t>
void forward_planes(const scalar_t* x, const float* weight, const float* bias, const scalar_t* residual, scalar_t* y,
                    float* mean_out, float* rstd_out, int64_t planes, int64_t n, bool relu, float eps) {
  at::parallel_for(0, planes, grain_for(n), [&](int64_t begin, int64_t end) {
    std::vector<float> buffer;
    for (int64_t p = begin; p < end; ++p) {
      const float* xp = as_float_plane(x + p * n, n, buffer);
      const float mean = static_cast<float>(block_sum(xp, n) / n);
      const float var = static_cast<float>(block_centered_squares(xp, n, mean) / n);
      const float rstd = 1.f / std::sqrt(var + eps);
      mean_out[p] = mean;
      rstd_out[p] = rstd;
      normalize_plane_dispatch<scalar_t>(relu, xp, residual ? residual + p * n : nullptr, y + p * n, n, mean,
                                         rstd * weight[p], bias[p]);
    }
  });
}

// Sums of g and g * (x - mean) over the plane, g = dy masked by the ReLU of the recomputed output.
template <bool RELU>
void backward_sums(const float* x, const float* dy, int64_t n, float mean, float scale, float shift, double& sum_g,
                   double& sum_gxc) {
  sum_g = 0.0;
  sum_gxc = 0.0;
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t end = std::min(n, start + kBlock);
    float sg = 0.f, sgx = 0.f;
#pragma omp simd reduction(+ : sg, sgx)
    for (int64_t i = start; i < end; ++i) {
      const float xc = x[i] - mean;
      float g = dy[i];
      if constexpr (RELU) g = xc * scale + shift > 0.f ? g : 0.f;
      sg += g;
      sgx += g * xc;
    }
    sum_g += sg;
    sum_gxc += sgx;
  }
}

// dx = w * rstd * (g - mean(g) - xhat * mean(g * xhat)) = k_g * g + k_x * (x - mean) + k_0.
template <bool RELU, typename scalar_t>
void backward_dx(const float* x, const float* dy, scalar_t* dx, int64_t n, float mean, float scale, float shift,
                 float k_g, float k_x, float k_0) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float xc = x[i] - mean;
    float g = dy[i];
    if constexpr (RELU) g = xc * scale + shift > 0.f ? g : 0.f;
    dx[i] = from_float<scalar_t>(k_g * g + k_x * xc + k_0);
  }
}

template <bool RELU, typename scalar_t>
void backward_planes(const scalar_t* dy, const scalar_t* x, const float* weight, const float* bias, const float* mean,
                     const float* rstd, scalar_t* dx, float* dweight, float* dbias, int64_t planes, int64_t n) {
  at::parallel_for(0, planes, grain_for(n), [&](int64_t begin, int64_t end) {
    std::vector<float> x_buffer, dy_buffer;
    for (int64_t p = begin; p < end; ++p) {
      const float* xp = as_float_plane(x + p * n, n, x_buffer);
      const float* dyp = as_float_plane(dy + p * n, n, dy_buffer);
      const float scale = rstd[p] * weight[p];
      double sum_g, sum_gxc;
      backward_sums<RELU>(xp, dyp, n, mean[p], scale, bias[p], sum_g, sum_gxc);
      const double sum_gxhat = sum_gxc * rstd[p];
      dweight[p] = static_cast<float>(sum_gxhat);
      dbias[p] = static_cast<float>(sum_g);
      const float k_x = static_cast<float>(-scale * rstd[p] * sum_gxhat / n);
      const float k_0 = static_cast<float>(-scale * sum_g / n);
      backward_dx<RELU>(xp, dyp, dx + p * n, n, mean[p], scale, bias[p], scale, k_x, k_0);
    }
  });
}

// split_threshold (the CUDA kernels' plane split) does not apply: one thread does a whole plane.
void adain_forward_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                       const std::optional<at::Tensor>& residual, bool relu, double eps, int64_t /*split_threshold*/,
                       const at::Tensor& y, const at::Tensor& mean, const at::Tensor& rstd) {
  council_fast::checks::adain_forward_args(x, weight, bias, residual, y, mean, rstd);
  const int64_t planes = x.size(0) * x.size(1);
  const int64_t n = x.size(2) * x.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "adain_forward_cpu", [&] {
    forward_planes<scalar_t>(x.data_ptr<scalar_t>(), weight.data_ptr<float>(), bias.data_ptr<float>(),
                             residual.has_value() ? residual->data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>(),
                             mean.data_ptr<float>(), rstd.data_ptr<float>(), planes, n, relu,
                             static_cast<float>(eps));
  });
}

void adain_backward_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                        const at::Tensor& mean, const at::Tensor& rstd, bool relu, int64_t /*split_threshold*/,
                        const at::Tensor& dx, const at::Tensor& dweight, const at::Tensor& dbias) {
  council_fast::checks::adain_backward_args(dy, x, weight, bias, mean, rstd, dx, dweight, dbias);
  const int64_t planes = x.size(0) * x.size(1);
  const int64_t n = x.size(2) * x.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "adain_backward_cpu", [&] {
    auto run = relu ? backward_planes<true, scalar_t> : backward_planes<false, scalar_t>;
    run(dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), weight.data_ptr<float>(), bias.data_ptr<float>(),
        mean.data_ptr<float>(), rstd.data_ptr<float>(), dx.data_ptr<scalar_t>(), dweight.data_ptr<float>(),
        dbias.data_ptr<float>(), planes, n);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(council_fast, CPU, m) {  // schemas: csrc/schemas.cpp
  m.impl("adain_forward_out", &adain_forward_cpu);
  m.impl("adain_backward_out", &adain_backward_cpu);
}
