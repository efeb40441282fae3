// Fused GGUF matmul on the CPU (compute="fast"): y[m, n] = sum_k x[m, k] * W[n, k], reading W
// straight from its GGUF blocks. C ABI, loaded with ctypes (offload/kernels/_build.py).
//
// Activations are quantized per block to 8 bits the way llama.cpp's CPU path does (one scale
// per 32 values for the legacy types, one per 256 with sums of each 16 for the K types; here
// the scales are float32 where llama.cpp rounds some to fp16), and each weight block is
// unpacked in registers and multiplied with integer dot products: the weights never exist as
// float32. The result is not bitwise anything: its error is bounded by the activations'
// rounding (at most half a step, amax/254 per value of a block), which
// tests/test_qmatmul.py checks against a float64 reference per output.
//
// Paths (csrc/cpu_isa.h): scalar (portable integer loops), AVX2 (VPMADDUBSW/VPMADDWD integer
// dot products, as llama.cpp's) and, at the AVX-512 level on a CPU with VNNI, the same rows
// with VPDPBUSD for the legacy types (csrc/legacy_rows.h, one source for both; the K types run
// the AVX2 rows there). The two give the same sums, so the same bits. A legacy block costs
// about 1.0 ns (AVX2) and 0.9 ns (VNNI) per thread on the AMD EPYC we have (SmolLM2's Q4_1
// rows of 48 blocks, in cache), 1.4 ns before the per-block scale work was cut (the block's
// fp16 scale and min widened together, the nibbles unpacked in two operations). Rows are split
// over a persistent pool of threads
// (thread_pool.h) owned by the caller.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "attention.h"
#include "cpu_isa.h"
#include "gguf_blocks.h"
#include "thread_pool.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace {

using namespace offload_gguf;

// Activation blocks.
struct Q8 {        // legacy types: 32 values
  float d;         // scale: value = d * q
  float s;         // d * sum(q): the min term of Q4_1 / Q5_1
  int8_t q[QK];
};
struct Q8K {       // K types: 256 values
  float d;
  int16_t bsums[16];   // sum of each 16 q
  int8_t q[QK_K];
};

// Rows of activations a tile call takes at once (legacy types): its output buffer's length.
constexpr int TILE_ROWS = 16;

bool k_type(int type) { return type >= Q2_K; }

bool supported(int type) {
  switch (type) {
    case Q4_0: case Q4_1: case Q5_0: case Q5_1: case Q8_0: case Q4_K: case Q5_K: case Q6_K:
      return true;
    default:
      return false;
  }
}

// Clamped to the int8 range the dot products assume ([-127, 127]: an infinity to its end; a
// NaN, which the block's amax ignored, to 0), then rounded to nearest by adding and taking off
// 1.5 * 2^23, which rounds a float of magnitude below 2^22 to an integer in the current
// rounding mode as nearbyint does, without its libm call per value (some 5% of a decode
// step's products in perf: this file is built for CPUs without SSE4.1's roundss). Clamping
// first gives the same integer as rounding first for every finite value (both ends are
// integers).
inline int8_t q8(float v) {
  if (!(v == v)) return 0;
  constexpr float shift = 12582912.f;
  const float c = std::max(-127.f, std::min(127.f, v));
  return (int8_t)((c + shift) - shift);
}

// ``n`` values as int8 ``q`` at a step of amax / 127; returns the step.
float round_block(const float* v, int n, int8_t* q) {
  float amax = 0.f;
  for (int i = 0; i < n; ++i) amax = std::max(amax, std::fabs(v[i]));
  const float d = amax / 127.f, id = d != 0.f ? 1.f / d : 0.f;
  for (int i = 0; i < n; ++i) q[i] = q8(v[i] * id);
  return d;
}

// ``round_block`` or a vector path with its bits (``round_block_avx2``).
using RoundFn = float (*)(const float*, int, int8_t*);

void quantize_row(const float* x, int64_t k, Q8* out, RoundFn round) {
  for (int64_t b = 0; b < k / QK; ++b) {
    out[b].d = round(x + QK * b, QK, out[b].q);
    int sum = 0;
    for (int i = 0; i < QK; ++i) sum += out[b].q[i];
    out[b].s = out[b].d * (float)sum;
  }
}

void quantize_row_k(const float* x, int64_t k, Q8K* out, RoundFn round) {
  for (int64_t b = 0; b < k / QK_K; ++b) {
    out[b].d = round(x + QK_K * b, QK_K, out[b].q);
    for (int j = 0; j < 16; ++j) {
      int sum = 0;
      for (int i = 0; i < 16; ++i) sum += out[b].q[16 * j + i];
      out[b].bsums[j] = (int16_t)sum;
    }
  }
}

// -- scalar rows: exact integer sums per block, scaled in float ------------------------------

float row_q4_0(const uint8_t* w, const Q8* x, int64_t nb) {
  float sum = 0.f;
  for (int64_t b = 0; b < nb; ++b, w += 18) {
    const uint8_t* qs = w + 2;
    int s = 0;
    for (int j = 0; j < 16; ++j)
      s += ((qs[j] & 0x0f) - 8) * x[b].q[j] + ((qs[j] >> 4) - 8) * x[b].q[j + 16];
    sum += half(w) * x[b].d * (float)s;
  }
  return sum;
}

float row_q4_1(const uint8_t* w, const Q8* x, int64_t nb) {
  float sum = 0.f;
  for (int64_t b = 0; b < nb; ++b, w += 20) {
    const uint8_t* qs = w + 4;
    int s = 0;
    for (int j = 0; j < 16; ++j) s += (qs[j] & 0x0f) * x[b].q[j] + (qs[j] >> 4) * x[b].q[j + 16];
    sum += half(w) * x[b].d * (float)s + half(w + 2) * x[b].s;
  }
  return sum;
}

template <bool Min>
float row_q5(const uint8_t* w, const Q8* x, int64_t nb) {
  const int bytes = Min ? 24 : 22, bias = Min ? 0 : 16;
  float sum = 0.f;
  for (int64_t b = 0; b < nb; ++b, w += bytes) {
    const uint32_t qh = load32(w + (Min ? 4 : 2));
    const uint8_t* qs = w + (Min ? 8 : 6);
    int s = 0;
    for (int j = 0; j < 16; ++j) {
      const int lo = (qs[j] & 0x0f) | (((qh >> j) & 1) << 4);
      const int hi = (qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
      s += (lo - bias) * x[b].q[j] + (hi - bias) * x[b].q[j + 16];
    }
    sum += half(w) * x[b].d * (float)s + (Min ? half(w + 2) * x[b].s : 0.f);
  }
  return sum;
}

float row_q8_0(const uint8_t* w, const Q8* x, int64_t nb) {
  float sum = 0.f;
  for (int64_t b = 0; b < nb; ++b, w += 34) {
    const int8_t* qs = reinterpret_cast<const int8_t*>(w + 2);
    int s = 0;
    for (int j = 0; j < QK; ++j) s += qs[j] * x[b].q[j];
    sum += half(w) * x[b].d * (float)s;
  }
  return sum;
}

// Q4_K and Q5_K: 8 sub-blocks of 32, value = d * sc * q - dmin * mn.
template <bool Five>
float row_q45_k(const uint8_t* w, const Q8K* x, int64_t nb) {
  const int bytes = Five ? 176 : 144;
  float sum = 0.f;
  for (int64_t b = 0; b < nb; ++b, w += bytes) {
    const uint8_t* qh = w + 16;
    const uint8_t* qs = w + (Five ? 48 : 16);
    int64_t s = 0, mins = 0;
    for (int j = 0; j < 8; ++j) {
      int sc, mn;
      scale_min(w + 4, j, &sc, &mn);
      const uint8_t* q = qs + 32 * (j / 2);
      const int shift = 4 * (j % 2);
      int dot = 0;
      for (int l = 0; l < 32; ++l) {
        int v = (q[l] >> shift) & 0x0f;
        if (Five) v |= ((qh[l] >> j) & 1) << 4;
        dot += v * x[b].q[32 * j + l];
      }
      s += (int64_t)sc * dot;
      mins += (int64_t)mn * (x[b].bsums[2 * j] + x[b].bsums[2 * j + 1]);
    }
    sum += half(w) * x[b].d * (float)s - half(w + 2) * x[b].d * (float)mins;
  }
  return sum;
}

float row_q6_k(const uint8_t* w, const Q8K* x, int64_t nb) {
  float sum = 0.f;
  for (int64_t b = 0; b < nb; ++b, w += 210) {
    const uint8_t* ql = w;
    const uint8_t* qh = w + 128;
    const int8_t* sc = reinterpret_cast<const int8_t*>(w + 192);
    int64_t s = 0;
    for (int i = 0; i < 16; ++i) {
      int dot = 0;
      for (int k = 0; k < 16; ++k) {
        const int e = 16 * i + k, g = e / 128, h = (e % 128) / 64, m = e % 64;
        const int sh = (e % 128) / 32, l = e % 32;
        const int lo = (ql[64 * g + m] >> (4 * h)) & 0x0f, hi = (qh[32 * g + l] >> (2 * sh)) & 3;
        dot += ((lo | (hi << 4)) - 32) * x[b].q[e];
      }
      s += (int64_t)sc[i] * dot;
    }
    sum += half(w + 208) * x[b].d * (float)s;
  }
  return sum;
}

// -- AVX2 rows ---------------------------------------------------------------------------------
#if defined(__x86_64__)
#define OFFLOAD_AVX2 __attribute__((target("avx2,fma,f16c"), always_inline)) inline

OFFLOAD_AVX2 float f16(const uint8_t* p) { return _cvtsh_ss(load16(p)); }

OFFLOAD_AVX2 float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

OFFLOAD_AVX2 __m256i load(const void* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}

// How far ahead of the block being multiplied a row's weights are prefetched. A row's blocks
// come from DRAM (a model's weights are beyond the caches): left to the hardware prefetcher,
// SmolLM2's 30 layers of Q4_1 products (66 MB) ran at 17-21 GB/s on 2 threads here, against 31
// GB/s of plain reads; 4 KiB ahead, 22-25 GB/s (1 and 2 KiB ahead less, 8 and 16 KiB no more).
constexpr int64_t PREFETCH_BYTES = 4096;

// Prefetch ``lines`` cache lines from ``PREFETCH_BYTES`` past ``w`` (a prefetch never faults,
// past the weight's end included).
template <int lines = 1>
OFFLOAD_AVX2 void prefetch_ahead(const uint8_t* w) {
  for (int i = 0; i < lines; ++i)
    _mm_prefetch(reinterpret_cast<const char*>(w) + PREFETCH_BYTES + 64 * i, _MM_HINT_T0);
}

// Unsigned bytes (< 128) times signed bytes, summed in fours: 8 int32.
OFFLOAD_AVX2 __m256i dot_us(__m256i u, __m256i s) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}

// The 32 bits of ``qh`` as 32 bytes of 0x10 (set) or 0.
OFFLOAD_AVX2 __m256i fifth_bits(uint32_t qh) {
  const __m256i spread = _mm256_shuffle_epi8(
      _mm256_set1_epi32((int)qh),
      _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                       2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
  const __m256i bit = _mm256_set1_epi64x((int64_t)0x8040201008040201LL);
  return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit),
                          _mm256_set1_epi8(0x10));
}

// 16 bytes of packed nibbles as 32 bytes, the low nibbles then the high ones, in two vector
// operations: the 16 bytes broadcast to both halves (a load), the upper half shifted by 4.
OFFLOAD_AVX2 __m256i nibbles32(const uint8_t* qs) {
  const __m256i q = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs)));
  return _mm256_and_si256(_mm256_srlv_epi32(q, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4)),
                          _mm256_set1_epi8(0x0f));
}

// round_block for ``n`` a multiple of 32, 8 values a vector, with its bits: the same amax (a
// max ignores NaN either way: VMAXPS returns its second operand, the running max, for a NaN),
// the same step and its inverse, the same products, a NaN product zeroed and the rest clamped
// to [-127, 127] as q8 does, then rounded to nearest even by VCVTPS2DQ, as q8's shift rounds
// in the default rounding mode.
OFFLOAD_AVX2 float round_block_avx2(const float* v, int n, int8_t* q) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 amax = _mm256_setzero_ps();
  for (int i = 0; i < n; i += 8)
    amax = _mm256_max_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(v + i)), amax);
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  const float d = _mm_cvtss_f32(m) / 127.f, id = d != 0.f ? 1.f / d : 0.f;
  const __m256 mul = _mm256_set1_ps(id), lo = _mm256_set1_ps(-127.f), hi = _mm256_set1_ps(127.f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int i = 0; i < n; i += 32) {
    __m256i r[4];
    for (int j = 0; j < 4; ++j) {
      __m256 p = _mm256_mul_ps(_mm256_loadu_ps(v + i + 8 * j), mul);
      p = _mm256_and_ps(p, _mm256_cmp_ps(p, p, _CMP_ORD_Q));   // NaN: 0
      r[j] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(p, lo), hi));
    }
    const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(r[0], r[1]),
                                         _mm256_packs_epi32(r[2], r[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i), _mm256_permutevar8x32_epi32(b, order));
  }
  return d;
}

// The legacy types' rows (csrc/legacy_rows.h), here with VPMADDUBSW + VPMADDWD.
#define LEGACY_ATTR OFFLOAD_AVX2
#define LEGACY_DOT_US(u, s) dot_us(u, s)
namespace avx2_rows {
#include "legacy_rows.h"
}  // namespace avx2_rows
#undef LEGACY_ATTR
#undef LEGACY_DOT_US

// The K types' AVX2 rows (also the AVX-512 level's), for a tile of R rows of activations
// against one row of W (xs blocks apart): each weight block's scales decoded and its codes
// unpacked once for all R rows, each row's float work in the same order as alone (its output
// the same bits whatever R).
template <bool Five>
struct Q45K {
  template <int R>
  OFFLOAD_AVX2 static void tile(const uint8_t* w, const Q8K* x, int64_t xs, int64_t nb,
                                float* out) {
    const int bytes = Five ? 176 : 144;
    const __m256i m4 = _mm256_set1_epi8(0x0f), one = _mm256_set1_epi8(1);
    __m256 acc[R];
    float mins[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps(), mins[r] = 0.f;
    for (int64_t b = 0; b < nb; ++b, w += bytes) {
      prefetch_ahead<Five ? 3 : 2>(w);
      const uint8_t* qs = w + (Five ? 48 : 16);
      const __m256i hbits = Five ? load(w + 16) : _mm256_setzero_si256();
      int sc[8], mn[8], msum[R];
      __m256i sumi[R];
      for (int j = 0; j < 8; ++j) scale_min(w + 4, j, &sc[j], &mn[j]);
      for (int r = 0; r < R; ++r) {
        const Q8K& xr = x[r * xs + b];
        msum[r] = 0;
        for (int j = 0; j < 8; ++j) msum[r] += mn[j] * (xr.bsums[2 * j] + xr.bsums[2 * j + 1]);
        sumi[r] = _mm256_setzero_si256();
      }
      for (int j = 0; j < 4; ++j) {
        const __m256i q = load(qs + 32 * j);
        __m256i lo = _mm256_and_si256(q, m4), hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
        if (Five) {
          const __m256i h0 = _mm256_and_si256(_mm256_srli_epi16(hbits, 2 * j), one);
          const __m256i h1 = _mm256_and_si256(_mm256_srli_epi16(hbits, 2 * j + 1), one);
          lo = _mm256_or_si256(lo, _mm256_slli_epi16(h0, 4));
          hi = _mm256_or_si256(hi, _mm256_slli_epi16(h1, 4));
        }
        const __m256i s0 = _mm256_set1_epi16(sc[2 * j]), s1 = _mm256_set1_epi16(sc[2 * j + 1]);
        for (int r = 0; r < R; ++r) {
          const int8_t* xq = x[r * xs + b].q + 64 * j;
          const __m256i plo = _mm256_maddubs_epi16(lo, load(xq));
          const __m256i phi = _mm256_maddubs_epi16(hi, load(xq + 32));
          sumi[r] = _mm256_add_epi32(sumi[r], _mm256_madd_epi16(plo, s0));
          sumi[r] = _mm256_add_epi32(sumi[r], _mm256_madd_epi16(phi, s1));
        }
      }
      const float dw = f16(w), mw = f16(w + 2);
      for (int r = 0; r < R; ++r) {
        const float xd = x[r * xs + b].d;
        acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(dw * xd), _mm256_cvtepi32_ps(sumi[r]), acc[r]);
        mins[r] += mw * xd * (float)msum[r];
      }
    }
    for (int r = 0; r < R; ++r) out[r] = hsum(acc[r]) - mins[r];
  }
};

OFFLOAD_AVX2 __m256i two_scales(const int8_t* sc) {
  return _mm256_set_m128i(_mm_set1_epi16(sc[1]), _mm_set1_epi16(sc[0]));
}

struct Q6K {
  template <int R>
  OFFLOAD_AVX2 static void tile(const uint8_t* w, const Q8K* x, int64_t xs, int64_t nb,
                                float* out) {
    const __m256i m4 = _mm256_set1_epi8(0x0f), m2 = _mm256_set1_epi8(3);
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b, w += 210) {
      prefetch_ahead<3>(w);
      const int8_t* sc = reinterpret_cast<const int8_t*>(w + 192);
      int corr[R];
      __m256i sumi[R];
      for (int r = 0; r < R; ++r) {
        corr[r] = 0;
        for (int i = 0; i < 16; ++i) corr[r] += sc[i] * x[r * xs + b].bsums[i];
        sumi[r] = _mm256_setzero_si256();
      }
      for (int g = 0; g < 2; ++g) {
        const __m256i la = load(w + 64 * g), lb = load(w + 64 * g + 32);
        const __m256i h = load(w + 128 + 32 * g);
        const int8_t* s = sc + 8 * g;
        const __m256i q[4] = {
            _mm256_or_si256(_mm256_and_si256(la, m4),
                            _mm256_slli_epi16(_mm256_and_si256(h, m2), 4)),
            _mm256_or_si256(_mm256_and_si256(lb, m4),
                            _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 2), m2), 4)),
            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(la, 4), m4),
                            _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 4), m2), 4)),
            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(lb, 4), m4),
                            _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 6), m2), 4))};
        for (int i = 0; i < 4; ++i) {
          const __m256i ts = two_scales(s + 2 * i);
          for (int r = 0; r < R; ++r) {
            const __m256i p = _mm256_maddubs_epi16(q[i], load(x[r * xs + b].q + 128 * g + 32 * i));
            sumi[r] = _mm256_add_epi32(sumi[r], _mm256_madd_epi16(p, ts));
          }
        }
      }
      const float dw = f16(w + 208);
      for (int r = 0; r < R; ++r) {
        const float d = dw * x[r * xs + b].d;
        acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi[r]), acc[r]);
        acc[r] = _mm256_sub_ps(acc[r],
                               _mm256_setr_ps(d * 32.f * (float)corr[r], 0, 0, 0, 0, 0, 0, 0));
      }
    }
    for (int r = 0; r < R; ++r) out[r] = hsum(acc[r]);
  }
};

// ``rows`` rows of activations in tiles of 4, then the rest.
template <typename K>
OFFLOAD_AVX2 void k_rows(const uint8_t* w, const Q8K* x, int64_t xs, int64_t nb, int rows,
                         float* out) {
  for (; rows >= 4; rows -= 4, x += 4 * xs, out += 4) K::template tile<4>(w, x, xs, nb, out);
  switch (rows) {
    case 3: K::template tile<3>(w, x, xs, nb, out); break;
    case 2: K::template tile<2>(w, x, xs, nb, out); break;
    case 1: K::template tile<1>(w, x, xs, nb, out); break;
    default: break;
  }
}

// -- AVX-512 VNNI rows (the legacy types) ------------------------------------------------------
// The AVX2 rows with one VPDPBUSD (unsigned bytes times signed bytes, summed in fours into
// int32; AVX512-VNNI on 256-bit registers) where they take VPMADDUBSW + VPMADDWD. 256 bits, not
// 512: on the AMD EPYC we have (512-bit work run as two halves) the earlier 512-bit rows (two
// blocks a register) measured no faster than the AVX2 rows, and slower than these.
#define LEGACY_ATTR                                                                         \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c"), always_inline)) \
  inline
#define LEGACY_DOT_US(u, s) _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s)
namespace vnni_rows {
#include "legacy_rows.h"
}  // namespace vnni_rows
#undef LEGACY_ATTR
#undef LEGACY_DOT_US

// Each legacy type's row function for ctypes' dispatch, from the rows of namespace ``ns``
// compiled for ``features``: ``<prefix>q4_0`` (one row of activations) and ``<prefix>q4_0_tile``
// (``rows`` of them, ``xs`` blocks apart, each weight block unpacked once for all).
#define LEGACY_ROW(features, ns, name, Block, bytes)                                           \
  __attribute__((target(features))) float name(const uint8_t* w, const void* x, int64_t nb) { \
    float out;                                                                                \
    ns::legacy_tile<1>(w, static_cast<const Q8*>(x), 0, nb, bytes, ns::Block(), &out);        \
    return out;                                                                               \
  }                                                                                           \
  __attribute__((target(features))) void name##_tile(const uint8_t* w, const void* x,        \
                                                     int64_t xs, int64_t nb, int rows,       \
                                                     float* out) {                           \
    ns::legacy_rows<ns::Block>(w, static_cast<const Q8*>(x), xs, nb, bytes, rows, out);      \
  }
#define LEGACY_ROWS(features, ns, prefix)                                                      \
  LEGACY_ROW(features, ns, prefix##q4_0, Q4Block<false>, 18)                                   \
  LEGACY_ROW(features, ns, prefix##q4_1, Q4Block<true>, 20)                                    \
  LEGACY_ROW(features, ns, prefix##q5_0, Q5Block<false>, 22)                                   \
  LEGACY_ROW(features, ns, prefix##q5_1, Q5Block<true>, 24)                                    \
  LEGACY_ROW(features, ns, prefix##q8_0, Q8_0Block, 34)
LEGACY_ROWS("avx2,fma,f16c", avx2_rows, avx2_)
LEGACY_ROWS("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c", vnni_rows, vnni_)

bool has_vnni() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl");
}
#endif

// One row of W against one quantized activation row, on ``level``.
using RowFn = float (*)(const uint8_t*, const void*, int64_t);

template <typename X, float (*F)(const uint8_t*, const X*, int64_t)>
float erase(const uint8_t* w, const void* x, int64_t nb) {
  return F(w, static_cast<const X*>(x), nb);
}

#if defined(__x86_64__)
// The K types' rows: one row of activations, and ``<name>_tile`` for ``rows`` of them.
#define K_ROW(name, K)                                                                    \
  __attribute__((target("avx2,fma,f16c"))) float name(const uint8_t* w, const void* x,   \
                                                       int64_t nb) {                     \
    float out;                                                                           \
    K::template tile<1>(w, static_cast<const Q8K*>(x), 0, nb, &out);                     \
    return out;                                                                          \
  }                                                                                      \
  __attribute__((target("avx2,fma,f16c"))) void name##_tile(                             \
      const uint8_t* w, const void* x, int64_t xs, int64_t nb, int rows, float* out) {   \
    k_rows<K>(w, static_cast<const Q8K*>(x), xs, nb, rows, out);                         \
  }
K_ROW(avx2_q4_k, Q45K<false>)
K_ROW(avx2_q5_k, Q45K<true>)
K_ROW(avx2_q6_k, Q6K)
#endif

// ``rows`` rows of activations (``xs`` blocks apart) against one row of W, each weight block
// unpacked once for all of them. The same bits as the row function per row.
using TileFn = void (*)(const uint8_t*, const void*, int64_t, int64_t, int, float*);

// A type's functions on ``level``: its row, and its tile (null where the level has none,
// scalar: the row a row of activations at a time).
struct Kernels {
  RowFn row = nullptr;
  TileFn tile = nullptr;
};

Kernels kernels_for(int type, int level) {
#if defined(__x86_64__)
#define BOTH(name) Kernels{name, name##_tile}
  static const bool vnni = has_vnni();
  if (level >= offload_isa::AVX512 && vnni) {
    switch (type) {
      case Q4_0: return BOTH(vnni_q4_0);
      case Q4_1: return BOTH(vnni_q4_1);
      case Q5_0: return BOTH(vnni_q5_0);
      case Q5_1: return BOTH(vnni_q5_1);
      case Q8_0: return BOTH(vnni_q8_0);
      default: break;   // the K types: the AVX2 rows
    }
  }
  if (level >= offload_isa::AVX2) {
    switch (type) {
      case Q4_0: return BOTH(avx2_q4_0);
      case Q4_1: return BOTH(avx2_q4_1);
      case Q5_0: return BOTH(avx2_q5_0);
      case Q5_1: return BOTH(avx2_q5_1);
      case Q8_0: return BOTH(avx2_q8_0);
      case Q4_K: return BOTH(avx2_q4_k);
      case Q5_K: return BOTH(avx2_q5_k);
      case Q6_K: return BOTH(avx2_q6_k);
      default: return {};
    }
  }
#undef BOTH
#endif
  switch (type) {
    case Q4_0: return {erase<Q8, row_q4_0>};
    case Q4_1: return {erase<Q8, row_q4_1>};
    case Q5_0: return {erase<Q8, row_q5<false>>};
    case Q5_1: return {erase<Q8, row_q5<true>>};
    case Q8_0: return {erase<Q8, row_q8_0>};
    case Q4_K: return {erase<Q8K, row_q45_k<false>>};
    case Q5_K: return {erase<Q8K, row_q45_k<true>>};
    case Q6_K: return {erase<Q8K, row_q6_k>};
    default: return {};
  }
}

// One row x of k values as ``type``'s activation blocks at ``out`` (Q8 or Q8K, k / block of
// them), rounded as ``level``'s path rounds them (every path: the same bytes).
void quantize(int type, const float* x, int64_t k, void* out, int level) {
  RoundFn round = round_block;
#if defined(__x86_64__)
  if (level >= offload_isa::AVX2) round = round_block_avx2;
#endif
  if (k_type(type))
    quantize_row_k(x, k, static_cast<Q8K*>(out), round);
  else
    quantize_row(x, k, static_cast<Q8*>(out), round);
}

}  // namespace

extern "C" {

// A pool of ``threads`` threads (the caller counts as one) for offload_gguf_matmul.
void* offload_pool_new(int threads, int spin_us) {
  return new offload_pool::Pool(std::max(1, threads), std::max(0, spin_us));
}
void offload_pool_free(void* pool) { delete static_cast<offload_pool::Pool*>(pool); }

// Whether offload_gguf_matmul multiplies ``type``.
int offload_gguf_matmul_supports(int type) { return supported(type) ? 1 : 0; }

// For each g < count: ys[g][i * ldys[g] + j] = sum_k x[i * ldx + k] * W_g[j, k] for i < m,
// j < ns[g], where W_g is ns[g] rows of k / block blocks of ``type`` at ws[g] (row after row):
// weights that share their input (an attention's q, k and v; an MLP's gate and up) in one call,
// x quantized once and the rows of all of them split over ``pool`` (offload_pool_new) together,
// or null: the calling thread alone. Each output is the same sum a call per weight gives.
// Returns 0; -1 for a type it lacks, -2 for k not a whole number of blocks (nothing written).
int offload_gguf_matmul_group(int type, int count, const uint8_t* const* ws, const int64_t* ns,
                              int64_t k, const float* x, int64_t ldx, int64_t m,
                              float* const* ys, const int64_t* ldys, void* pool, int isa) {
  if (!supported(type)) return -1;
  const Traits t = traits(type);
  if (k % t.block) return -2;
  const int64_t nb = k / t.block, row_bytes = nb * t.bytes;
  const int level = offload_isa::effective(isa);
  const Kernels fns = kernels_for(type, level);
  const RowFn fn = fns.row;
  const TileFn tile = m > 1 ? fns.tile : nullptr;
  const size_t xbytes = k_type(type) ? sizeof(Q8K) : sizeof(Q8);
  std::vector<uint8_t> xq((size_t)(m * nb) * xbytes);
  for (int64_t i = 0; i < m; ++i)
    quantize(type, x + i * ldx, k, xq.data() + (size_t)(i * nb) * xbytes, level);
  int64_t n = 0;
  for (int g = 0; g < count; ++g) n += ns[g];
  // rows [r0, r1) of the weights stacked in order
  auto rows = [&](int64_t r0, int64_t r1) {
    int64_t base = 0;
    float out[TILE_ROWS];
    for (int g = 0; g < count && base < r1; base += ns[g], ++g) {
      const int64_t lo = std::max(r0, base), hi = std::min(r1, base + ns[g]);
      for (int64_t j = lo; j < hi; ++j) {
        const uint8_t* wj = ws[g] + (j - base) * row_bytes;
        float* y = ys[g] + (j - base);
        if (tile == nullptr) {
          for (int64_t i = 0; i < m; ++i)
            y[i * ldys[g]] = fn(wj, xq.data() + (size_t)(i * nb) * xbytes, nb);
          continue;
        }
        for (int64_t i = 0; i < m; i += TILE_ROWS) {
          const int r = (int)std::min<int64_t>(TILE_ROWS, m - i);
          tile(wj, xq.data() + (size_t)(i * nb) * xbytes, nb, nb, r, out);
          for (int t = 0; t < r; ++t) y[(i + t) * ldys[g]] = out[t];
        }
      }
    }
  };
  // One part of the rows a thread: more (4 a thread, taken as threads come free) measured
  // slower at one row of activations (4.65 -> 5.30 ms for SmolLM2's 30 layers of Q4_1
  // products, 2 threads), each part a new stream for the prefetcher.
  auto* p = static_cast<offload_pool::Pool*>(pool);
  const int64_t parts = p == nullptr ? 1 : std::min<int64_t>(p->threads(), n);
  if (parts <= 1) {
    rows(0, n);
    return 0;
  }
  const int64_t per = (n + parts - 1) / parts;
  p->run(parts, [&](int64_t part) { rows(part * per, std::min(n, (part + 1) * per)); });
  return 0;
}

// The activation blocks offload_gguf_matmul multiplies ``type`` with, for one row x of k
// values, written to ``out`` (k / 32 blocks of {float d, float d * sum, int8 q[32]} for the
// legacy types; k / 256 of {float d, int16 bsums[16], int8 q[256]} for the K types) as the
// path at ``isa`` rounds them: for tests, every path's bytes the same. Returns the bytes
// written; -1 for a type it lacks, -2 for k not a whole number of blocks.
int64_t offload_gguf_quantize_row(int type, const float* x, int64_t k, uint8_t* out, int isa) {
  if (!supported(type)) return -1;
  const int64_t block = k_type(type) ? QK_K : QK;
  if (k % block) return -2;
  quantize(type, x, k, out, offload_isa::effective(isa));
  return k / block * (int64_t)(k_type(type) ? sizeof(Q8K) : sizeof(Q8));
}

// y[i * ldy + j] = sum_k x[i * ldx + k] * W[j, k] for i < m, j < n, where W is n rows of k / block
// blocks of ``type`` at ``w`` (row after row): offload_gguf_matmul_group of one weight.
int offload_gguf_matmul(int type, const uint8_t* w, int64_t n, int64_t k, const float* x,
                        int64_t ldx, int64_t m, float* y, int64_t ldy, void* pool, int isa) {
  return offload_gguf_matmul_group(type, 1, &w, &n, k, x, ldx, m, &y, &ldy, pool, isa);
}

}  // extern "C"

// -- a Llama decoder layer's decode step around the products (compute="fast") -----------------
// The work between a layer's products, done here in the same call as the products, so a decode
// step of a small model is not the framework's per-operation cost (about 5 us per torch call,
// some 20 per layer) times its layers. With the KV cache written in place (the runtime's
// buffered cache) the attention is here too (attention.h): a decode step is one call a layer.

namespace {

// out = x / sqrt(mean(x^2) + eps) * w, for one row of n (out may alias x).
void rms_norm_row(const float* x, const float* w, float eps, int64_t n, float* out) {
  double ss = 0.;   // the sum of squares in double: rounding-free for any row of a model
  for (int64_t i = 0; i < n; ++i) ss += (double)x[i] * x[i];
  const float r = (float)(1. / std::sqrt(ss / (double)n + (double)eps));
  for (int64_t i = 0; i < n; ++i) out[i] = w[i] * (x[i] * r);
}

// Rotary embedding in place on ``heads`` heads of ``d`` values (the rotate-half convention):
// x[i] * cos[i] - x[i + d/2] * sin[i], x[i + d/2] * cos[i + d/2] + x[i] * sin[i + d/2].
void rope_row(float* x, int64_t heads, int64_t d, const float* cos, const float* sin) {
  const int64_t h = d / 2;
  for (int64_t j = 0; j < heads; ++j, x += d)
    for (int64_t i = 0; i < h; ++i) {
      const float a = x[i], b = x[i + h];
      x[i] = a * cos[i] - b * sin[i];
      x[i + h] = b * cos[i + h] + a * sin[i + h];
    }
}

// g[i] = silu(g[i]) * u[i] for n values: g / (1 + e^-g) * u.
void silu_mul(float* g, const float* u, int64_t n) {
  for (int64_t i = 0; i < n; ++i) g[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
}

// The products of weights that share an input ``x`` (m rows of k), each of its own type:
// those of one type in one offload_gguf_matmul_group call. Returns the first refusal, or 0.
int products(const int* types, const uint8_t* const* ws, const int64_t* ns, int count, int64_t k,
             const float* x, int64_t m, float* const* ys, void* pool, int isa);

}  // namespace

extern "C" {

// The attention's input half of a Llama decoder layer for m rows (decode positions):
// h = rms_norm(x) * norm_w (h = x where norm_w is null: the norm done apart); q, k, v =
// h @ W.T for the three weights (types[i], ws[i], ns[i] rows of ``hidden`` columns); the rotary
// embedding (rows of cos and sin, head_dim each) applied to q's and k's heads. q, k and v are
// written as m rows of ns[i] floats.
// Returns 0, or the products' refusal (-1 a type, -2 a width), or -3 for head_dim odd or not
// dividing ns[0] and ns[1] (nothing written).
int offload_llama_attn_in(const int* types, const uint8_t* const* ws, const int64_t* ns,
                          int64_t hidden, const float* x, int64_t m, const float* norm_w,
                          float eps, const float* cos, const float* sin, int64_t head_dim,
                          float* q, float* k, float* v, void* pool, int isa) {
  if (head_dim <= 0 || head_dim % 2 || ns[0] % head_dim || ns[1] % head_dim) return -3;
  std::vector<float> h;
  if (norm_w != nullptr) {
    h.resize((size_t)(m * hidden));
    for (int64_t i = 0; i < m; ++i)
      rms_norm_row(x + i * hidden, norm_w, eps, hidden, h.data() + i * hidden);
    x = h.data();
  }
  float* const ys[3] = {q, k, v};
  const int code = products(types, ws, ns, 3, hidden, x, m, ys, pool, isa);
  if (code) return code;
  for (int64_t i = 0; i < m; ++i) {
    const float* c = cos + i * head_dim;
    const float* s = sin + i * head_dim;
    rope_row(q + i * ns[0], ns[0] / head_dim, head_dim, c, s);
    rope_row(k + i * ns[1], ns[1] / head_dim, head_dim, c, s);
  }
  return 0;
}

// out = rms_norm(x) * w for m rows of n (the decoder layer's norms where they run apart: the same
// arithmetic as inside the layer calls). ``out`` may alias x.
void offload_rms_norm(const float* x, int64_t m, int64_t n, const float* w, float eps,
                      float* out) {
  for (int64_t i = 0; i < m; ++i) rms_norm_row(x + i * n, w, eps, n, out + i * n);
}

// g = silu(g) * u for n values (the MLP's gating where it runs apart).
void offload_silu_mul(float* g, const float* u, int64_t n) { silu_mul(g, u, n); }

// The rest of a Llama decoder layer for m rows, after the attention: with weights o, gate, up
// and down (types[i], ws[i], ns[i] rows; o and down have ``hidden`` rows, gate and up ``inter``),
// r = x + attn @ Wo.T (attn: m rows of ``width``); h = rms_norm(r) * norm_w;
// out = r + (silu(h @ Wgate.T) * (h @ Wup.T)) @ Wdown.T. ``out`` may not alias x or attn.
// Returns 0, or the products' refusal (-1 a type, -2 a width; nothing useful written).
int offload_llama_attn_out_mlp(const int* types, const uint8_t* const* ws, const int64_t* ns,
                               int64_t hidden, int64_t inter, int64_t width, const float* attn,
                               const float* x, int64_t m, const float* norm_w, float eps,
                               float* out, void* pool, int isa) {
  if (ns[0] != hidden || ns[1] != inter || ns[2] != inter || ns[3] != hidden) return -2;
  std::vector<float> h((size_t)(m * hidden)), g((size_t)(m * inter)), u((size_t)(m * inter));
  float* o = out;
  int code = products(types, ws, ns, 1, width, attn, m, &o, pool, isa);
  if (code) return code;
  for (int64_t i = 0; i < m * hidden; ++i) out[i] += x[i];
  for (int64_t i = 0; i < m; ++i)
    rms_norm_row(out + i * hidden, norm_w, eps, hidden, h.data() + i * hidden);
  float* const gu[2] = {g.data(), u.data()};
  code = products(types + 1, ws + 1, ns + 1, 2, hidden, h.data(), m, gu, pool, isa);
  if (code) return code;
  silu_mul(g.data(), u.data(), m * inter);
  float* d = h.data();   // the down product's m rows of hidden, added to out
  code = products(types + 3, ws + 3, ns + 3, 1, inter, g.data(), m, &d, pool, isa);
  if (code) return code;
  for (int64_t i = 0; i < m * hidden; ++i) out[i] += h[i];
  return 0;
}

}  // extern "C"

namespace {

// -- the attention of a decode step (attention.h), compiled at each CPU level ------------------
using offload_attention::Step;

void heads_scalar(const Step& a, int64_t p0, int64_t p1, float* s) {
  offload_attention::heads(a, p0, p1, s);
}
#if defined(__x86_64__)
__attribute__((target("avx2,fma,f16c"))) void heads_avx2(const Step& a, int64_t p0, int64_t p1,
                                                          float* s) {
  offload_attention::heads(a, p0, p1, s);
}
__attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c"))) void heads_avx512(
    const Step& a, int64_t p0, int64_t p1, float* s) {
  offload_attention::heads(a, p0, p1, s);
}
#endif

offload_attention::HeadsFn heads_fn(int isa) {
#if defined(__x86_64__)
  const int level = offload_isa::effective(isa);
  if (level >= offload_isa::AVX512) return heads_avx512;
  if (level >= offload_isa::AVX2) return heads_avx2;
#endif
  return heads_scalar;
}

// A Llama layer's weights and constants for offload_llama_layer_step (layer.py's LayerSpec).
struct LlamaLayer {
  int types[7];             // q, k, v, o, gate, up, down
  int64_t rows[7];
  const uint8_t* ws[7];
  const float* norms[2];    // input, post-attention
  float eps[2];
  int64_t hidden, inter, head_dim;
  float scale;
};

}  // namespace

extern "C" {

// One decode position per sequence against a layer's cache (attention.h's Step, flattened):
// q (b rows of heads * head_dim), k and v (b rows of kv_heads * head_dim) appended at position
// ``pos`` of kbuf / vbuf, then out (b rows of heads * head_dim) = the attention over the pos + 1
// positions. Returns 0, or -3 for head_dim < 1 or heads not a multiple of kv_heads (nothing
// written).
int offload_llama_attend(const float* q, const float* k, const float* v, int64_t b,
                         int64_t heads, int64_t kv_heads, int64_t head_dim, float* kbuf,
                         float* vbuf, int64_t sb, int64_t sh, int64_t pos, const uint8_t* mask,
                         int64_t mask_stride, float scale, float* out, void* pool, int isa) {
  if (head_dim < 1 || kv_heads < 1 || heads % kv_heads) return -3;
  const Step a{q, k, v, b, heads, kv_heads, head_dim, kbuf, vbuf, sb, sh, pos, mask,
               mask_stride, scale, out};
  offload_attention::attend(a, static_cast<offload_pool::Pool*>(pool), heads_fn(isa));
  return 0;
}

// A Llama decoder layer's decode step for b sequences of one position each, in one call:
// offload_llama_attn_in, offload_llama_attend over the layer's cache, and
// offload_llama_attn_out_mlp, with the same arithmetic as those calls made one by one.
// Returns 0 or the first refusal among them.
int offload_llama_layer_step(const LlamaLayer* L, const float* x, int64_t b, const float* cos,
                             const float* sin, float* kbuf, float* vbuf, int64_t sb, int64_t sh,
                             int64_t pos, const uint8_t* mask, int64_t mask_stride, float* out,
                             void* pool, int isa) {
  const int64_t nq = L->rows[0], nkv = L->rows[1], d = L->head_dim;
  if (d < 1 || nkv != L->rows[2]) return -3;
  std::vector<float> qkv((size_t)(b * (nq + 2 * nkv))), att((size_t)(b * nq));
  float *q = qkv.data(), *k = q + b * nq, *v = k + b * nkv;
  int code = offload_llama_attn_in(L->types, L->ws, L->rows, L->hidden, x, b, L->norms[0],
                                   L->eps[0], cos, sin, d, q, k, v, pool, isa);
  if (code) return code;
  code = offload_llama_attend(q, k, v, b, nq / d, nkv / d, d, kbuf, vbuf, sb, sh, pos, mask,
                              mask_stride, L->scale, att.data(), pool, isa);
  if (code) return code;
  return offload_llama_attn_out_mlp(L->types + 3, L->ws + 3, L->rows + 3, L->hidden, L->inter,
                                    nq, att.data(), x, b, L->norms[1], L->eps[1], out, pool,
                                    isa);
}

// ``n`` consecutive layers' decode steps in one call: offload_llama_layer_step of layer i on
// the output of layer i - 1 (x for the first, out for the last), layer i's cache at kbufs[i] /
// vbufs[i] with strides sbs[i], shs[i], written at position poss[i]; the same rotary rows and
// mask for every layer. The same arithmetic as the n calls made one by one. Returns 0 or the
// first refusal (its layer's cache written, the later layers' not).
int offload_llama_layers_step(const LlamaLayer* const* Ls, int64_t n, const float* x, int64_t b,
                              const float* cos, const float* sin, float* const* kbufs,
                              float* const* vbufs, const int64_t* sbs, const int64_t* shs,
                              const int64_t* poss, const uint8_t* mask, int64_t mask_stride,
                              float* out, void* pool, int isa) {
  if (n < 1) return -3;
  const int64_t h = Ls[0]->hidden;
  for (int64_t i = 1; i < n; ++i)
    if (Ls[i]->hidden != h) return -3;
  std::vector<float> tmp((size_t)(n > 1 ? b * h * (n > 2 ? 2 : 1) : 0));
  float* bufs[2] = {tmp.data(), n > 2 ? tmp.data() + b * h : nullptr};
  const float* in = x;
  for (int64_t i = 0; i < n; ++i) {
    float* dst = i == n - 1 ? out : bufs[i & 1];
    const int code = offload_llama_layer_step(Ls[i], in, b, cos, sin, kbufs[i], vbufs[i], sbs[i],
                                              shs[i], poss[i], mask, mask_stride, dst, pool,
                                              isa);
    if (code) return code;
    in = dst;
  }
  return 0;
}

}  // extern "C"

namespace {

int products(const int* types, const uint8_t* const* ws, const int64_t* ns, int count, int64_t k,
             const float* x, int64_t m, float* const* ys, void* pool, int isa) {
  bool done[8] = {};
  for (int a = 0; a < count; ++a) {
    if (done[a]) continue;
    const uint8_t* gw[8];
    int64_t gn[8], gld[8];
    float* gy[8];
    int c = 0;
    for (int b = a; b < count; ++b)
      if (!done[b] && types[b] == types[a]) {
        gw[c] = ws[b], gn[c] = gld[c] = ns[b], gy[c] = ys[b], ++c;
        done[b] = true;
      }
    const int code = offload_gguf_matmul_group(types[a], c, gw, gn, k, x, k, m, gy, gld, pool,
                                               isa);
    if (code) return code;
  }
  return 0;
}

}  // namespace
