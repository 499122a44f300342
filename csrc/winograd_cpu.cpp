// Winograd F(4x4, 3x3) transforms for 3x3 convolutions (stride 1, zero padding 1) on the CPU.
// The convolution is  y = A^T [ (G w G^T) . (B^T d B) ] A  per 6x6 input tile d / 4x4 output tile. The weight
// transform (G, float64) runs in torch (council_fast/ops/winograd.py); here:
//   input_transform:  x (B, C, H, W) fp32  -> v (36, C, B * TH * TW), tile t = (b * TH + ty) * TW + tx
//   gemm:             m[k] = u[k] v[k] for the 36 components k
//   output_transform: m (36, Co, B * TH * TW) -> y (B, Co, H, W), plus the bias
// One (b, c) plane per task; inside, 16 tiles of a tile row go through the transform at once, one per
// vector lane, with B^T / A^T as compile-time constants so their zeros cost nothing.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu_simd.h"

namespace {

using council_fast::kLanes;  // tiles per vector
using council_fast::load;
using council_fast::splat;
using council_fast::store;
using council_fast::vec;

constexpr int kOut = 4;                 // output tile side
constexpr int kIn = 6;                  // input tile side (kOut + 3 - 1)
constexpr int kPoints = kIn * kIn;      // transformed components = GEMMs

// Points 0, -1, 1, 1/2, -2 and infinity; the same tables as _BT / _AT in council_fast/ops/winograd.py.
constexpr float kBT[kIn][kIn] = {{1.f, -1.5f, -2.f, 1.5f, 1.f, 0.f},  {0.f, 1.f, -2.5f, 0.5f, 1.f, 0.f},
                                 {0.f, -1.f, 0.5f, 2.5f, 1.f, 0.f},   {0.f, -2.f, -1.f, 2.f, 1.f, 0.f},
                                 {0.f, 0.5f, -1.f, -0.5f, 1.f, 0.f},  {0.f, 1.f, -1.5f, -2.f, 1.5f, 1.f}};
constexpr float kAT[kOut][kIn] = {{1.f, 1.f, 1.f, 1.f, 1.f, 0.f},
                                  {0.f, -1.f, 1.f, 0.5f, -2.f, 0.f},
                                  {0.f, 1.f, 1.f, 0.25f, 4.f, 0.f},
                                  {0.f, -1.f, 1.f, 0.125f, -8.f, 1.f}};

// out = M d M^T for an (R x N) matrix M and N x N tiles d, lane-wise; zero coefficients vanish at compile time.
template <int R, int N>
inline void sandwich(const float (&m)[R][N], const vec (&d)[N][N], vec (&out)[R][R]) {
  vec half[R][N];
#pragma GCC unroll 8
  for (int j = 0; j < R; ++j) {
#pragma GCC unroll 8
    for (int i = 0; i < N; ++i) {
      vec acc = {};
#pragma GCC unroll 8
      for (int r = 0; r < N; ++r) {
        if (m[j][r] != 0.f) acc += m[j][r] * d[r][i];
      }
      half[j][i] = acc;
    }
  }
#pragma GCC unroll 8
  for (int j = 0; j < R; ++j) {
#pragma GCC unroll 8
    for (int l = 0; l < R; ++l) {
      vec acc = {};
#pragma GCC unroll 8
      for (int i = 0; i < N; ++i) {
        if (m[l][i] != 0.f) acc += m[l][i] * half[j][i];
      }
      out[j][l] = acc;
    }
  }
}

int64_t tiles(int64_t size) { return (size + kOut - 1) / kOut; }
int64_t round_up(int64_t n, int64_t k) { return (n + k - 1) / k * k; }

// A transformed tensor (36, rows, stride): row r of component k at (k * rows + r) * stride. At least `channels`
// rows (the GEMM's output may carry padding rows) and `columns` of its `stride` columns are used.
void check_v(const at::Tensor& v, int64_t channels, int64_t columns, const char* what) {
  TORCH_CHECK(v.device().is_cpu() && v.scalar_type() == at::kFloat && v.is_contiguous() && v.dim() == 3 &&
                  v.size(0) == kPoints && v.size(1) >= channels && v.size(2) >= columns,
              what, " must be a contiguous fp32 (36, >= ", channels, ", >= ", columns, ") CPU tensor");
}

void check_image(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == 4, what,
              " must be a contiguous (B, C, H, W) fp32 CPU tensor");
}

void winograd_input_transform(const at::Tensor& x, const at::Tensor& v) {
  check_image(x, "winograd_input_transform: x");
  const int64_t batch = x.size(0), channels = x.size(1), height = x.size(2), width = x.size(3);
  const int64_t th = tiles(height), tw = tiles(width), per_sample = th * tw, twp = round_up(tw, kLanes);
  check_v(v, channels, batch * per_sample, "winograd_input_transform: v");
  const float* xp = x.data_ptr<float>();
  float* vp = v.data_ptr<float>();
  const int64_t stride = v.size(2), component_stride = v.size(1) * stride;
  at::parallel_for(0, batch * channels, 1, [&](int64_t begin, int64_t end) {
    // padded: one input row with its zero border (column j at j + 1); phases[r][i][tx] = row r, column 4 tx - 1 + i.
    std::vector<float> padded(twp * kOut + kIn, 0.f), phases(kPoints * twp);
    vec d[kIn][kIn], out[kIn][kIn];
    float last[kLanes];
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t b = plane / channels, c = plane % channels;
      const float* src = xp + plane * height * width;
      float* dst = vp + c * stride + b * per_sample;
      for (int64_t ty = 0; ty < th; ++ty) {
        for (int r = 0; r < kIn; ++r) {
          const int64_t row = ty * kOut - 1 + r;
          if (row >= 0 && row < height) {
            std::copy(src + row * width, src + (row + 1) * width, padded.begin() + 1);
          } else {
            std::fill(padded.begin() + 1, padded.begin() + 1 + width, 0.f);
          }
          float* pr = phases.data() + static_cast<int64_t>(r) * kIn * twp;
          for (int64_t tx = 0; tx < twp; ++tx) {
            for (int i = 0; i < kIn; ++i) pr[i * twp + tx] = padded[tx * kOut + i];
          }
        }
        for (int64_t t0 = 0; t0 < tw; t0 += kLanes) {
          for (int r = 0; r < kIn; ++r)
            for (int i = 0; i < kIn; ++i) d[r][i] = load(phases.data() + (r * kIn + i) * twp + t0);
          sandwich(kBT, d, out);
          const int64_t n = std::min<int64_t>(kLanes, tw - t0);
          float* dt = dst + ty * tw + t0;
          for (int j = 0; j < kIn; ++j) {
            for (int l = 0; l < kIn; ++l) {
              float* dk = dt + (j * kIn + l) * component_stride;
              if (n == kLanes) {
                store(dk, out[j][l]);
              } else {
                store(last, out[j][l]);
                std::copy(last, last + n, dk);
              }
            }
          }
        }
      }
    }
  });
}

void winograd_output_transform(const at::Tensor& m, const c10::optional<at::Tensor>& bias, const at::Tensor& y) {
  check_image(y, "winograd_output_transform: y");
  const int64_t batch = y.size(0), channels = y.size(1), height = y.size(2), width = y.size(3);
  const int64_t th = tiles(height), tw = tiles(width), per_sample = th * tw, twp = round_up(tw, kLanes);
  check_v(m, channels, batch * per_sample, "winograd_output_transform: m");
  const float* bias_p = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == at::kFloat && bias->is_contiguous() &&
                    bias->numel() == channels,
                "winograd_output_transform: bias must hold C fp32 values");
    bias_p = bias->data_ptr<float>();
  }
  const float* mp = m.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t stride = m.size(2), component_stride = m.size(1) * stride;
  at::parallel_for(0, batch * channels, 1, [&](int64_t begin, int64_t end) {
    // rows[i][x]: output row 4 ty + i of the tile row being finished (twp * 4 columns, the first `width` kept).
    std::vector<float> rows(kOut * twp * kOut);
    vec d[kIn][kIn], out[kOut][kOut];
    float lanes[kLanes];
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t b = plane / channels, c = plane % channels;
      const float shift = bias_p ? bias_p[c] : 0.f;
      float* dst = yp + plane * height * width;
      const float* src = mp + c * stride + b * per_sample;
      for (int64_t ty = 0; ty < th; ++ty) {
        for (int64_t t0 = 0; t0 < tw; t0 += kLanes) {
          const int64_t n = std::min<int64_t>(kLanes, tw - t0);
          const float* st = src + ty * tw + t0;
          for (int j = 0; j < kIn; ++j) {
            for (int l = 0; l < kIn; ++l) {
              const float* sk = st + (j * kIn + l) * component_stride;
              if (n == kLanes) {
                d[j][l] = load(sk);
              } else {
                std::fill(lanes, lanes + kLanes, 0.f);
                std::copy(sk, sk + n, lanes);
                d[j][l] = load(lanes);
              }
            }
          }
          sandwich(kAT, d, out);
          for (int i = 0; i < kOut; ++i) {
            float* row = rows.data() + static_cast<int64_t>(i) * twp * kOut;
            for (int k = 0; k < kOut; ++k) {
              store(lanes, out[i][k] + shift);
              for (int lane = 0; lane < kLanes; ++lane) row[(t0 + lane) * kOut + k] = lanes[lane];
            }
          }
        }
        for (int i = 0; i < kOut && ty * kOut + i < height; ++i) {
          const float* row = rows.data() + static_cast<int64_t>(i) * twp * kOut;
          std::copy(row, row + width, dst + (ty * kOut + i) * width);
        }
      }
    }
  });
}

// The 36 channel GEMMs m[k] = u[k] v[k]: u packed as (36, rows / 8, C_in, 8) (8 output rows side by side per
// input channel), v (36, C_in, stride) and m (36, rows, stride) with stride a multiple of kGemmColumns. Each
// task computes an 8 x 32 block of m in 16 vector registers over the whole C_in (the v panel, C_in x 32,
// stays in L1/L2 while the row blocks stream past it).
constexpr int kGemmRows = 8;
constexpr int kGemmColumns = 2 * kLanes;

inline void gemm_block(const float* a, const float* b, int64_t b_stride, float* c, int64_t c_stride, int64_t depth) {
  vec acc[kGemmRows][2];
  for (int r = 0; r < kGemmRows; ++r) acc[r][0] = acc[r][1] = vec{};
  for (int64_t k = 0; k < depth; ++k) {
    const vec b0 = load(b + k * b_stride), b1 = load(b + k * b_stride + kLanes);
    const float* ak = a + k * kGemmRows;
#pragma GCC unroll 8
    for (int r = 0; r < kGemmRows; ++r) {
      const vec ar = splat(ak[r]);
      acc[r][0] += ar * b0;
      acc[r][1] += ar * b1;
    }
  }
  for (int r = 0; r < kGemmRows; ++r) {
    store(c + r * c_stride, acc[r][0]);
    store(c + r * c_stride + kLanes, acc[r][1]);
  }
}

void winograd_gemm(const at::Tensor& u, const at::Tensor& v, const at::Tensor& m) {
  TORCH_CHECK(u.device().is_cpu() && v.device().is_cpu() && m.device().is_cpu(), "winograd_gemm: CPU tensors only");
  TORCH_CHECK(u.scalar_type() == at::kFloat && u.is_contiguous() && u.dim() == 4 && u.size(0) == kPoints &&
                  u.size(3) == kGemmRows,
              "winograd_gemm: u must be a contiguous fp32 (36, rows / 8, C_in, 8) tensor");
  const int64_t blocks = u.size(1), depth = u.size(2), rows = blocks * kGemmRows;
  TORCH_CHECK(v.scalar_type() == at::kFloat && v.is_contiguous() && v.dim() == 3 && v.size(0) == kPoints &&
                  v.size(1) == depth && v.size(2) % kGemmColumns == 0,
              "winograd_gemm: v must be a contiguous fp32 (36, C_in, 32 k) tensor");
  const int64_t stride = v.size(2), column_blocks = stride / kGemmColumns;
  TORCH_CHECK(m.scalar_type() == at::kFloat && m.is_contiguous() && m.dim() == 3 && m.size(0) == kPoints &&
                  m.size(1) == rows && m.size(2) == stride,
              "winograd_gemm: m must be a contiguous fp32 (36, rows, stride of v) tensor");
  const float* up = u.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  float* mp = m.data_ptr<float>();
  at::parallel_for(0, kPoints * column_blocks, 1, [&](int64_t begin, int64_t end) {
    // The v panel is copied out first: its rows lie `stride` floats apart, and at power-of-two strides they
    // would all land in the same few L1 sets.
    std::vector<float> panel(depth * kGemmColumns);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t k = task / column_blocks, col = (task % column_blocks) * kGemmColumns;
      const float* b = vp + k * depth * stride + col;
      for (int64_t r = 0; r < depth; ++r) std::copy(b + r * stride, b + r * stride + kGemmColumns, panel.data() + r * kGemmColumns);
      for (int64_t blk = 0; blk < blocks; ++blk) {
        gemm_block(up + (k * blocks + blk) * depth * kGemmRows, panel.data(), kGemmColumns,
                   mp + (k * rows + blk * kGemmRows) * stride + col, stride, depth);
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(council_fast, CPU, m) {  // schemas: csrc/schemas.cpp
  m.impl("winograd_input_transform", &winograd_input_transform);
  m.impl("winograd_output_transform", &winograd_output_transform);
  m.impl("winograd_gemm", &winograd_gemm);
}
