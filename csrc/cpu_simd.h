// Shared helpers of the CPU kernels: a 16-lane float vector (GCC/Clang vector extension, so it compiles for
// any target ISA and maps onto one AVX-512 register where there is one) and a tanh that vectorises.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace council_fast {

constexpr int kLanes = 16;
typedef float vec __attribute__((vector_size(kLanes * sizeof(float))));

#define COUNCIL_FAST_INLINE inline __attribute__((always_inline))  // 64-byte vectors by value: keep them in registers

COUNCIL_FAST_INLINE vec load(const float* p) {
  vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
COUNCIL_FAST_INLINE void store(float* p, const vec& v) { std::memcpy(p, &v, sizeof v); }
COUNCIL_FAST_INLINE vec splat(float f) { return f - vec{}; }  // x - 0 is x exactly (also for -0), so this folds to a broadcast

typedef int32_t ivec __attribute__((vector_size(kLanes * sizeof(int32_t))));

// exp(y) for 0 <= y <= 88, lane-wise: 2^n * e^r with |r| <= ln2 / 2 and a degree-7 Taylor polynomial
// (relative error ~1e-7). y >= 0, so truncating y / ln2 + 1/2 rounds to the nearest n.
COUNCIL_FAST_INLINE vec exp_nonnegative(vec y) {
  const ivec n = __builtin_convertvector(y * 1.44269504f + 0.5f, ivec);
  const vec nf = __builtin_convertvector(n, vec);
  const vec r = (y - nf * 0.693359375f) + nf * 2.12194440e-4f;  // ln 2 in two parts: nf * 0.693359375 is exact
  vec p = splat(1.f / 5040.f);
  p = p * r + 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const ivec bits = (n + 127) << 23;
  vec scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// tanh lane-wise and without libm, so it vectorises: an odd Taylor polynomial near 0 (where
// 1 - 2 / (e^2x + 1) would cancel), the exp form elsewhere. Relative error <= 8e-7 (worst just above
// |x| = 0.125, where the exp form still cancels a little); NaN, +-inf, +-0 and subnormals behave.
COUNCIL_FAST_INLINE vec tanh_vec(vec x) {
  ivec bits;
  std::memcpy(&bits, &x, sizeof bits);
  const ivec sign = bits & static_cast<int32_t>(0x80000000u);
  const ivec abs_bits = bits & 0x7fffffff;
  vec a;
  std::memcpy(&a, &abs_bits, sizeof a);
  const vec x2 = a * a;
  const vec small = a * (1.f + x2 * (-1.f / 3.f + x2 * (2.f / 15.f + x2 * (-17.f / 315.f + x2 * (62.f / 2835.f)))));
  const vec two_a = 2.f * a;
  const vec big = 1.f - 2.f / (exp_nonnegative(two_a < 88.f ? two_a : splat(88.f)) + 1.f);
  const vec magnitude = a < 0.125f ? small : (a == a ? big : a);  // NaN stays NaN
  ivec out_bits;
  std::memcpy(&out_bits, &magnitude, sizeof out_bits);
  out_bits |= sign;
  vec out;
  std::memcpy(&out, &out_bits, sizeof out);
  return out;
}

// The same function for one value (slow path: one vector for one number).
inline float tanh_fast(float x) { return tanh_vec(splat(x))[0]; }

// y[i] = tanh(x[i]) for n a multiple of kLanes.
inline void tanh_array(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; i += kLanes) store(y + i, tanh_vec(load(x + i)));
}

}  // namespace council_fast
