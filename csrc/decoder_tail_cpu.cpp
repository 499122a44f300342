// Decoder tail on the CPU: three 1x1 convs (ReLU, ReLU, tanh), mask tanh and the attention blend,
// one pass over blocks of pixels (threads split the blocks; fp32 arithmetic for every dtype).
// Tensors are (B, C, H, W) whose H and W flatten to one pixel stride (NCHW and channels_last both
// do). Inside a block activations live as [channel][pixel] arrays so the inner loops run over
// pixels and vectorise. The backward recomputes the block's forward and keeps weight gradients
// per thread, summed in thread order at the end.
#include <torch/extension.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "checks.h"
#include "cpu_simd.h"

namespace {

constexpr int64_t kBlock = 256;  // pixels per block: long contiguous runs per channel when reading h
constexpr int64_t kSub = 32;     // pixels per register tile of the 1x1 convs (a multiple of kLanes)
using council_fast::kLanes;
using council_fast::load;
using council_fast::splat;
using council_fast::store;
using council_fast::tanh_fast;
using council_fast::vec;

// The hot loops get AVX-512 / AVX2 clones picked at load time, so a generic -march build is fast too.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define COUNCIL_FAST_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define COUNCIL_FAST_SIMD_CLONES
#endif

struct Pixels {  // element (b, c, p) of a (B, C, H, W) tensor with H*W merged
  int64_t sb, sc, sp;
  explicit Pixels(const at::Tensor& t) : sb(t.stride(0)), sc(t.stride(1)), sp(t.stride(3)) {}
  int64_t at(int64_t b, int64_t c, int64_t p) const { return b * sb + c * sc + p * sp; }
};

// y[o][:] = bias[o] + sum_i w[o * in + i] * x[i][:] for R output channels o0 .. o0 + R - 1, in registers.
template <int R>
inline void linear_rows(const float* w, const float* bias, const float* x, float* y, int64_t o0, int64_t in) {
  constexpr int V = kSub / kLanes;
  for (int64_t q = 0; q < kBlock; q += kSub) {
    vec acc[R][V];
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < V; ++v) acc[r][v] = splat(bias ? bias[o0 + r] : 0.f);
    for (int64_t i = 0; i < in; ++i) {
      vec xv[V];
      for (int v = 0; v < V; ++v) xv[v] = load(x + i * kBlock + q + v * kLanes);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const float wr = w[(o0 + r) * in + i];
        for (int v = 0; v < V; ++v) acc[r][v] += wr * xv[v];
      }
    }
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < V; ++v) store(y + (o0 + r) * kBlock + q + v * kLanes, acc[r][v]);
  }
}

// y[o][p] = bias[o] + sum_i w[o * in + i] * x[i][p] over a block of pixels ([channel][pixel] arrays).
COUNCIL_FAST_SIMD_CLONES
void linear(const float* w, const float* bias, const float* x, float* y, int64_t out, int64_t in) {
  int64_t o = 0;
  for (; o + 8 <= out; o += 8) linear_rows<8>(w, bias, x, y, o, in);
  for (; o + 4 <= out; o += 4) linear_rows<4>(w, bias, x, y, o, in);
  for (; o < out; ++o) linear_rows<1>(w, bias, x, y, o, in);
}

// gw[o * in + i] += sum_p g[o][p] * x[i][p]
COUNCIL_FAST_SIMD_CLONES
void accumulate_outer(const float* g, const float* x, float* gw, int64_t out, int64_t in) {
  for (int64_t o = 0; o < out; ++o) {
    const float* go = g + o * kBlock;
    for (int64_t i = 0; i < in; ++i) {
      const float* xi = x + i * kBlock;
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t p = 0; p < kBlock; ++p) s += go[p] * xi[p];
      gw[o * in + i] += s;
    }
  }
}

std::vector<float> to_float(const at::Tensor& t) {
  at::Tensor f = t.to(at::kFloat).contiguous();
  return std::vector<float>(f.data_ptr<float>(), f.data_ptr<float>() + f.numel());
}

std::vector<float> transposed(const std::vector<float>& w, int64_t rows, int64_t cols) {
  std::vector<float> t(w.size());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) t[c * rows + r] = w[r * cols + c];
  return t;
}

struct Weights {
  int64_t D, N, O, M;
  std::vector<float> w1, b1, w2, b2, w3, b3;
  Weights(const at::Tensor& w1_, const at::Tensor& b1_, const at::Tensor& w2_, const at::Tensor& b2_,
          const at::Tensor& w3_, const at::Tensor& b3_, int64_t out_dim, int64_t num_masks)
      : D(w1_.size(0)), N(w3_.size(0)), O(out_dim), M(num_masks), w1(to_float(w1_)), b1(to_float(b1_)),
        w2(to_float(w2_)), b2(to_float(b2_)), w3(to_float(w3_)), b3(to_float(b3_)) {}
};

// Per-block scratch: every activation of the block's forward, [channel][pixel].
struct Scratch {
  std::vector<float> x, a1, r1, a2, r2, t, masks;
  explicit Scratch(const Weights& w)
      : x(w.D * kBlock), a1(w.D * kBlock), r1(w.D * kBlock), a2(w.D * kBlock), r2(w.D * kBlock),
        t(w.N * kBlock), masks(w.M * kBlock) {}
};

template <typename scalar_t>
void block_forward(const Weights& w, const scalar_t* h, const Pixels& hs, int64_t b, int64_t p0, int64_t count,
                   Scratch& s) {
  for (int64_t c = 0; c < w.D; ++c) {
    float* xc = s.x.data() + c * kBlock;
    const scalar_t* hc = h + hs.at(b, c, p0);
    if (hs.sp == 1) {
      for (int64_t p = 0; p < count; ++p) xc[p] = static_cast<float>(hc[p]);
    } else {
      for (int64_t p = 0; p < count; ++p) xc[p] = static_cast<float>(hc[p * hs.sp]);
    }
    std::fill(xc + count, xc + kBlock, 0.f);
  }
  linear(w.w1.data(), w.b1.data(), s.x.data(), s.a1.data(), w.D, w.D);
  for (int64_t i = 0; i < w.D * kBlock; ++i) s.r1[i] = s.a1[i] > 0.f ? s.a1[i] : 0.f;
  linear(w.w2.data(), w.b2.data(), s.r1.data(), s.a2.data(), w.D, w.D);
  for (int64_t i = 0; i < w.D * kBlock; ++i) s.r2[i] = s.a2[i] > 0.f ? s.a2[i] : 0.f;
  linear(w.w3.data(), w.b3.data(), s.r2.data(), s.t.data(), w.N, w.D);
  council_fast::tanh_array(s.t.data(), s.t.data(), w.N * kBlock);
}

void forward(const at::Tensor& h, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
             const at::Tensor& b2, const at::Tensor& w3, const at::Tensor& b3, const at::Tensor& images,
             int64_t num_masks, at::Tensor& out, at::Tensor& masks) {
  council_fast::checks::decoder_tail_inputs(h, w1, b1, w2, b2, w3, b3, images, num_masks);
  council_fast::checks::decoder_tail_outputs(h, images, num_masks, out, masks);
  const Weights w(w1, b1, w2, b2, w3, b3, images.size(1), num_masks);
  const int64_t B = h.size(0), HW = h.size(2) * h.size(3);
  const int64_t per_image = (HW + kBlock - 1) / kBlock;
  const Pixels hs(h), is(images);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "decoder_tail_forward_cpu", [&] {
    const scalar_t* hp = h.data_ptr<scalar_t>();
    const scalar_t* ip = images.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    scalar_t* mp = masks.data_ptr<scalar_t>();
    at::parallel_for(0, B * per_image, 1, [&](int64_t begin, int64_t end) {
      Scratch s(w);
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t b = blk / per_image, p0 = (blk % per_image) * kBlock;
        const int64_t count = std::min(kBlock, HW - p0);
        block_forward(w, hp, hs, b, p0, count, s);
        float* masks_now = s.masks.data();  // masks_now[k * kBlock + p]
        const float* logits = s.t.data() + w.O * w.M * kBlock;
        for (int64_t i = 0; i < w.M * kBlock; i += kLanes)
          store(masks_now + i, (council_fast::tanh_vec(10.f * load(logits + i)) + 1.f) * 0.5f);
        for (int64_t k = 0; k < w.M; ++k)
          for (int64_t p = 0; p < count; ++p)
            mp[(b * w.M + k) * HW + p0 + p] = static_cast<scalar_t>(masks_now[k * kBlock + p]);
        for (int64_t c = 0; c < w.O; ++c) {
          float v[kBlock];
          for (int64_t p = 0; p < kBlock; ++p) v[p] = p < count ? static_cast<float>(ip[is.at(b, c, p0 + p)]) : 0.f;
          for (int64_t k = 0; k < w.M; ++k) {
            const float* m = masks_now + k * kBlock;
            const float* cand = s.t.data() + (w.O * k + c) * kBlock;
_Pragma("omp simd")
            for (int64_t p = 0; p < kBlock; ++p) v[p] = (1.f - m[p]) * v[p] + m[p] * cand[p];
          }
          for (int64_t p = 0; p < count; ++p) op[(b * w.O + c) * HW + p0 + p] = static_cast<scalar_t>(v[p]);
        }
      }
    });
  });
}

struct Grads {  // one thread's weight-gradient sums
  std::vector<float> w1, b1, w2, b2, w3, b3;
  explicit Grads(const Weights& w)
      : w1(w.D * w.D, 0.f), b1(w.D, 0.f), w2(w.D * w.D, 0.f), b2(w.D, 0.f), w3(w.N * w.D, 0.f), b3(w.N, 0.f) {}
};

// Gradient of the blend at one pixel: fills g_t[:, p] and returns nothing else; g_img goes to gi.
void blend_backward(const Weights& w, const Scratch& s, int64_t p, const float* img, const float* gout,
                    const float* gmask, float* g_t, float* g_img) {
  const int64_t O = w.O, M = w.M;
  float states[65 * 8];  // states[k * O + c]: blend value before step k (M <= 64, O <= 8)
  float m[64], th[64];
  for (int64_t c = 0; c < O; ++c) states[c] = img[c];
  for (int64_t k = 0; k < M; ++k) {
    th[k] = tanh_fast(10.f * s.t[(O * M + k) * kBlock + p]);
    m[k] = (th[k] + 1.f) * 0.5f;
    for (int64_t c = 0; c < O; ++c)
      states[(k + 1) * O + c] = (1.f - m[k]) * states[k * O + c] + m[k] * s.t[(O * k + c) * kBlock + p];
  }
  float g[8];
  for (int64_t c = 0; c < O; ++c) g[c] = gout[c];
  for (int64_t k = M - 1; k >= 0; --k) {
    float gm = gmask ? gmask[k] : 0.f;
    for (int64_t c = 0; c < O; ++c) {
      const float cand = s.t[(O * k + c) * kBlock + p];
      gm += g[c] * (cand - states[k * O + c]);
      g_t[(O * k + c) * kBlock + p] = m[k] * g[c];
      g[c] *= 1.f - m[k];
    }
    g_t[(O * M + k) * kBlock + p] = gm * 5.f * (1.f - th[k] * th[k]);
  }
  for (int64_t c = 0; c < O; ++c) g_img[c] = g[c];
}

std::vector<at::Tensor> backward(const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_masks,
                                 const at::Tensor& h, const at::Tensor& w1, const at::Tensor& b1,
                                 const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& w3,
                                 const at::Tensor& b3, const at::Tensor& images, int64_t num_masks,
                                 int64_t /*max_chunk: one pass, per-thread sums*/, at::Tensor& grad_h,
                                 at::Tensor& grad_img) {
  council_fast::checks::decoder_tail_inputs(h, w1, b1, w2, b2, w3, b3, images, num_masks);
  council_fast::checks::decoder_tail_grads(h, images, grad_out, grad_masks, grad_h, grad_img);
  const Weights w(w1, b1, w2, b2, w3, b3, images.size(1), num_masks);
  const std::vector<float> w1t = transposed(w.w1, w.D, w.D), w2t = transposed(w.w2, w.D, w.D),
                           w3t = transposed(w.w3, w.N, w.D);
  const int64_t B = h.size(0), HW = h.size(2) * h.size(3), D = w.D, N = w.N, O = w.O, M = w.M;
  const int64_t per_image = (HW + kBlock - 1) / kBlock;
  at::Tensor gout = grad_out.to(at::kFloat).contiguous();
  at::Tensor gmask = grad_masks.has_value() ? grad_masks->to(at::kFloat).contiguous() : at::Tensor();
  const Pixels hs(h), is(images), ghs(grad_h), gis(grad_img);
  const int threads = at::get_num_threads();
  std::vector<Grads> partial(threads, Grads(w));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "decoder_tail_backward_cpu", [&] {
    const scalar_t* hp = h.data_ptr<scalar_t>();
    const scalar_t* ip = images.data_ptr<scalar_t>();
    scalar_t* ghp = grad_h.data_ptr<scalar_t>();
    scalar_t* gip = grad_img.data_ptr<scalar_t>();
    const float* gop = gout.data_ptr<float>();
    const float* gmp = gmask.defined() ? gmask.data_ptr<float>() : nullptr;
    at::parallel_for(0, B * per_image, 1, [&](int64_t begin, int64_t end) {
      Grads& acc = partial[at::get_thread_num()];
      Scratch s(w);
      std::vector<float> g_t(N * kBlock), g_a(D * kBlock), g_b(D * kBlock);
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t b = blk / per_image, p0 = (blk % per_image) * kBlock;
        const int64_t count = std::min(kBlock, HW - p0);
        block_forward(w, hp, hs, b, p0, count, s);
        std::fill(g_t.begin(), g_t.end(), 0.f);
        for (int64_t p = 0; p < count; ++p) {
          float img[8], go[8], gm[64], gi[8];
          for (int64_t c = 0; c < O; ++c) {
            img[c] = static_cast<float>(ip[is.at(b, c, p0 + p)]);
            go[c] = gop[(b * O + c) * HW + p0 + p];
          }
          for (int64_t k = 0; gmp && k < M; ++k) gm[k] = gmp[(b * M + k) * HW + p0 + p];
          blend_backward(w, s, p, img, go, gmp ? gm : nullptr, g_t.data(), gi);
          for (int64_t c = 0; c < O; ++c) gip[gis.at(b, c, p0 + p)] = static_cast<scalar_t>(gi[c]);
        }
        // tanh': g_a3 = g_t * (1 - t^2), kept in g_t
        for (int64_t i = 0; i < N * kBlock; ++i) g_t[i] *= 1.f - s.t[i] * s.t[i];
        accumulate_outer(g_t.data(), s.r2.data(), acc.w3.data(), N, D);
        for (int64_t n = 0; n < N; ++n)
          for (int64_t p = 0; p < kBlock; ++p) acc.b3[n] += g_t[n * kBlock + p];
        linear(w3t.data(), nullptr, g_t.data(), g_a.data(), D, N);  // g_r2
        for (int64_t i = 0; i < D * kBlock; ++i) g_a[i] = s.a2[i] > 0.f ? g_a[i] : 0.f;
        accumulate_outer(g_a.data(), s.r1.data(), acc.w2.data(), D, D);
        for (int64_t c = 0; c < D; ++c)
          for (int64_t p = 0; p < kBlock; ++p) acc.b2[c] += g_a[c * kBlock + p];
        linear(w2t.data(), nullptr, g_a.data(), g_b.data(), D, D);  // g_r1
        for (int64_t i = 0; i < D * kBlock; ++i) g_b[i] = s.a1[i] > 0.f ? g_b[i] : 0.f;
        accumulate_outer(g_b.data(), s.x.data(), acc.w1.data(), D, D);
        for (int64_t c = 0; c < D; ++c)
          for (int64_t p = 0; p < kBlock; ++p) acc.b1[c] += g_b[c * kBlock + p];
        linear(w1t.data(), nullptr, g_b.data(), g_a.data(), D, D);  // g_h
        for (int64_t c = 0; c < D; ++c)
          for (int64_t p = 0; p < count; ++p) ghp[ghs.at(b, c, p0 + p)] = static_cast<scalar_t>(g_a[c * kBlock + p]);
      }
    });
  });
  Grads total(w);
  for (const Grads& g : partial) {
    for (size_t i = 0; i < total.w1.size(); ++i) total.w1[i] += g.w1[i];
    for (size_t i = 0; i < total.w2.size(); ++i) total.w2[i] += g.w2[i];
    for (size_t i = 0; i < total.w3.size(); ++i) total.w3[i] += g.w3[i];
    for (size_t i = 0; i < total.b1.size(); ++i) total.b1[i] += g.b1[i];
    for (size_t i = 0; i < total.b2.size(); ++i) total.b2[i] += g.b2[i];
    for (size_t i = 0; i < total.b3.size(); ++i) total.b3[i] += g.b3[i];
  }
  auto as_tensor = [&](const std::vector<float>& v, const at::Tensor& like) {
    return at::from_blob(const_cast<float*>(v.data()), like.sizes(), at::kFloat).to(like.scalar_type()).clone();
  };
  return {as_tensor(total.w1, w1), as_tensor(total.b1, b1), as_tensor(total.w2, w2),
          as_tensor(total.b2, b2), as_tensor(total.w3, w3), as_tensor(total.b3, b3)};
}

}  // namespace

TORCH_LIBRARY_IMPL(council_fast, CPU, m) {  // schemas: csrc/schemas.cpp
  m.impl("decoder_tail_forward_out", &forward);
  m.impl("decoder_tail_backward_out", &backward);
}
