// A decode position's attention over a KV cache written in place (compute="fast"): each
// sequence's new keys and values appended to its buffers, then for each head
// out = softmax(scale * q . K^T, masked) V, grouped heads reading their KV head.
//
// In torch this is the cache's update (two copies) and scaled_dot_product_attention: some 40 us
// a layer and step for SmolLM2's 9 heads over a hundred positions, single-threaded, most of it
// the calls' own cost. Here it is part of the layer's one kernel call.
//
// The arithmetic is written as 16 independent float lanes (the dot products, the sums) that the
// compiler turns into vector registers of any width, with multiply and add unfused
// (-ffp-contract=off) and no reassociation: the same bits at every CPU level. exp is Cephes'
// expf polynomial in plain float operations for the same reason (within 1 ulp of libm's expf
// over [-87, 0], checked in steps of 1e-4; libm's is one call per score).
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

#include "thread_pool.h"

namespace offload_attention {

constexpr int LANES = 16;

#define OFFLOAD_ATTN_INLINE __attribute__((always_inline)) inline

// The 16 lanes summed pairwise (halves, quarters, ...), written out so that every index is a
// constant: the lanes stay in registers.
OFFLOAD_ATTN_INLINE float lanes_sum(float* acc) {
  for (int l = 0; l < 8; ++l) acc[l] += acc[l + 8];
  for (int l = 0; l < 4; ++l) acc[l] += acc[l + 4];
  for (int l = 0; l < 2; ++l) acc[l] += acc[l + 2];
  return acc[0] + acc[1];
}

// sum a[i] * b[i], i < n: lane l takes i = l mod 16 of the whole sixteens, the lanes summed
// pairwise, then the rest in order. (The lanes only ever indexed by constants: registers.)
OFFLOAD_ATTN_INLINE float dot(const float* a, const float* b, int64_t n) {
  float acc[LANES] = {};
  int64_t i = 0;
  for (; i + LANES <= n; i += LANES)
    for (int l = 0; l < LANES; ++l) acc[l] += a[i + l] * b[i + l];
  float sum = lanes_sum(acc);
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// e^x for x <= 0 (a score minus the row's largest; above 0 taken as 0), e^-87 below -87 (the
// least normal power of two).
OFFLOAD_ATTN_INLINE float exp_nonpositive(float x) {
  x = x < -87.f ? -87.f : x > 0.f ? 0.f : x;
  const float magic = 12582912.f;                 // 1.5 * 2^23: rounds to an integer
  const float n = (x * 1.44269504089f + magic) - magic;
  float r = x - n * 0.693359375f;                 // ln 2 in two parts (Cephes)
  r = r - n * -2.12194440e-4f;
  const float z = r * r;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * z + r + 1.f;
  const int32_t bits = ((int32_t)n + 127) << 23;  // 2^n, n >= -126
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// One head of one sequence: ``q`` (d values) against ``n`` positions of ``k`` and ``v`` (d
// apart), ``mask`` null or n flags (0: not attended), into ``out`` (d values); ``scratch``
// n + d floats.
OFFLOAD_ATTN_INLINE void head(const float* q, const float* k, const float* v, int64_t n,
                              int64_t d, const uint8_t* mask, float scale, float* scratch,
                              float* out) {
  float *s = scratch, *acc = s + n;   // the scores, out's sums (apart from k, v and out)
  float top = -3.4e38f;
  for (int64_t j = 0; j < n; ++j) {
    s[j] = dot(q, k + j * d, d) * scale;
    if ((mask == nullptr || mask[j]) && s[j] > top) top = s[j];
  }
  float sums[LANES] = {};
  int64_t j = 0;
  for (; j + LANES <= n; j += LANES)
    for (int l = 0; l < LANES; ++l) {
      const float e = exp_nonpositive(s[j + l] - top);
      s[j + l] = (mask == nullptr || mask[j + l]) ? e : 0.f;
      sums[l] += s[j + l];
    }
  float sum = lanes_sum(sums);
  for (; j < n; ++j) {
    const float e = exp_nonpositive(s[j] - top);
    s[j] = (mask == nullptr || mask[j]) ? e : 0.f;
    sum += s[j];
  }
  const float inv = sum > 0.f ? 1.f / sum : 0.f;   // every position masked: zeros
  for (int64_t i = 0; i < d; ++i) acc[i] = 0.f;
  for (j = 0; j < n; ++j) {
    const float p = s[j];
    const float* vj = v + j * d;
    for (int64_t i = 0; i < d; ++i) acc[i] += p * vj[i];
  }
  for (int64_t i = 0; i < d; ++i) out[i] = acc[i] * inv;
}

// The caller's view of one layer's cache and one step.
struct Step {
  const float* q;      // [b, heads * d], rotary applied
  const float* k;      // [b, kv_heads * d]
  const float* v;      // [b, kv_heads * d]
  int64_t b, heads, kv_heads, d;
  float* kbuf;         // keys: sequence i, head g, position j at kbuf[i*sb + g*sh + j*d]
  float* vbuf;         // values, laid out as the keys
  int64_t sb, sh;
  int64_t pos;         // positions held before this step: the new ones go there
  const uint8_t* mask; // null, or b rows of pos + 1 flags ``mask_stride`` apart (0 for one row)
  int64_t mask_stride;
  float scale;
  float* out;          // [b, heads * d]
};

// Parts [p0, p1) of the step, a part p being head p % heads of sequence p / heads; ``scratch``
// n + d floats per part. Inlined into a function per CPU level (the caller's dispatch).
OFFLOAD_ATTN_INLINE void heads(const Step& a, int64_t p0, int64_t p1, float* scratch) {
  const int64_t d = a.d, n = a.pos + 1, group = a.heads / a.kv_heads;
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t i = p / a.heads, h = p % a.heads, kv = h / group;
    head(a.q + (i * a.heads + h) * d, a.kbuf + i * a.sb + kv * a.sh,
         a.vbuf + i * a.sb + kv * a.sh, n, d,
         a.mask == nullptr ? nullptr : a.mask + i * a.mask_stride, a.scale,
         scratch + p * (n + d), a.out + (i * a.heads + h) * d);
  }
}

using HeadsFn = void (*)(const Step&, int64_t, int64_t, float*);

// Appends the step's keys and values, then attends with ``fn`` (``heads`` at a CPU level): the
// parts over ``pool`` where there is work enough to share (a dispatch costs a few us).
inline void attend(const Step& a, offload_pool::Pool* pool, HeadsFn fn) {
  const int64_t d = a.d, n = a.pos + 1;
  for (int64_t i = 0; i < a.b; ++i)
    for (int64_t g = 0; g < a.kv_heads; ++g) {
      const int64_t at = i * a.sb + g * a.sh + a.pos * d, from = (i * a.kv_heads + g) * d;
      std::memcpy(a.kbuf + at, a.k + from, sizeof(float) * d);
      std::memcpy(a.vbuf + at, a.v + from, sizeof(float) * d);
    }
  const int64_t parts = a.b * a.heads;
  std::vector<float> scratch((size_t)(parts * (n + d)));
  if (pool == nullptr || pool->threads() == 1 || parts * n * d < (1 << 16)) {
    fn(a, 0, parts, scratch.data());
    return;
  }
  pool->run(parts, [&](int64_t p) { fn(a, p, p + 1, scratch.data()); });
}

#undef OFFLOAD_ATTN_INLINE

}  // namespace offload_attention
