// GGUF block dequantization on the CPU: C ABI, loaded with ctypes (offload/kernels/_build.py).
//
// Each decoder turns whole blocks of one GGML block type into float32, bitwise equal to the
// gguf package's numpy reference (gguf.quants.dequantize), which offload's tests compare
// against. Equality needs the same arithmetic in the same order: every product and sum is
// rounded to float32 on its own (built with -ffp-contract=off: no fused multiply-add), scales
// are formed first (d * sc) and applied after, exactly as the numpy code does.
//
// Paths (csrc/cpu_isa.h): scalar, the block functions of gguf_blocks.h (the CUDA decoder's
// too) compiled portably; AVX2 and AVX-512 run
// explicit 8-wide loops for Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K and Q6_K (streaming stores
// into an aligned slot) and the compiler's loops for Q2_K and Q3_K. Decoding is bound by
// writing float32, so the AVX-512 level runs the 8-wide loops too. The caller passes the
// highest level it allows.
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#include "cpu_isa.h"
#include "gguf_blocks.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace {

using namespace offload_gguf;   // the block types and their scalar decoders

#define OFFLOAD_INLINE __attribute__((always_inline)) inline   // into each ISA's function

template <void (*Block)(const uint8_t*, float*)>
OFFLOAD_INLINE void run(const uint8_t* src, float* dst, int64_t b0, int64_t b1, int bytes,
                        int block) {
  for (int64_t i = b0; i < b1; ++i) Block(src + i * bytes, dst + i * block);
}

OFFLOAD_INLINE int dequant_blocks(int type, const uint8_t* src, float* dst, int64_t b0,
                                  int64_t b1) {
  const Traits t = traits(type);
  switch (type) {
    case Q4_0: run<q4_0>(src, dst, b0, b1, t.bytes, t.block); return 0;
    case Q4_1: run<q4_1>(src, dst, b0, b1, t.bytes, t.block); return 0;
    case Q5_0: run<q5_0>(src, dst, b0, b1, t.bytes, t.block); return 0;
    case Q5_1: run<q5_1>(src, dst, b0, b1, t.bytes, t.block); return 0;
    case Q8_0: run<q8_0>(src, dst, b0, b1, t.bytes, t.block); return 0;
    case Q2_K: run<q2_k>(src, dst, b0, b1, t.bytes, t.block); return 0;
    case Q3_K: run<q3_k>(src, dst, b0, b1, t.bytes, t.block); return 0;
    case Q4_K: run<q4_k>(src, dst, b0, b1, t.bytes, t.block); return 0;
    case Q5_K: run<q5_k>(src, dst, b0, b1, t.bytes, t.block); return 0;
    case Q6_K: run<q6_k>(src, dst, b0, b1, t.bytes, t.block); return 0;
    default: return -1;
  }
}


// -- explicit AVX2 loops for the common types (8 floats a step; at least 2x the compiler's
// loops, which do not vectorise the nibble and bit unpacking). The same arithmetic in the same
// order as the block functions above: an integer formed exactly, widened, multiplied by the
// scale (then the min added or subtracted): separate IEEE operations, no fused multiply-add.
// The AVX-512 level runs these too (compiled for it): decoding is bound by writing float32.
#if defined(__x86_64__)
#define OFFLOAD_AVX2 __attribute__((target("avx2"), always_inline)) inline

// A store of 8 floats: streaming (past the caches: the slot is read by the matmul later, and
// is larger than them) where the destination is 32-byte aligned, else an ordinary one.
template <bool NT>
OFFLOAD_AVX2 void put(float* y, __m256 v) {
  if (NT) _mm256_stream_ps(y, v); else _mm256_storeu_ps(y, v);
}

// 8 bytes (the low 8 of ``b``) as float32, ``bias`` subtracted as integers first.
OFFLOAD_AVX2 __m256 f8(__m128i b, __m256i bias) {
  return _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(b), bias));
}

// 16 bytes as 16 floats ``d * (byte - bias)`` at y[0..15].
template <bool NT>
OFFLOAD_AVX2 void scaled16(__m128i b, __m256i bias, __m256 d, float* y) {
  put<NT>(y, _mm256_mul_ps(d, f8(b, bias)));
  put<NT>(y + 8, _mm256_mul_ps(d, f8(_mm_srli_si128(b, 8), bias)));
}

// 16 bytes as 16 floats ``d * byte + m``.
template <bool NT>
OFFLOAD_AVX2 void affine16(__m128i b, __m256 d, __m256 m, float* y) {
  const __m256i zero = _mm256_setzero_si256();
  put<NT>(y, _mm256_add_ps(_mm256_mul_ps(d, f8(b, zero)), m));
  put<NT>(y + 8, _mm256_add_ps(_mm256_mul_ps(d, f8(_mm_srli_si128(b, 8), zero)), m));
}

// 16 bytes as 16 floats ``d * byte - m``.
template <bool NT>
OFFLOAD_AVX2 void affine16_sub(__m128i b, __m256 d, __m256 m, float* y) {
  const __m256i zero = _mm256_setzero_si256();
  put<NT>(y, _mm256_sub_ps(_mm256_mul_ps(d, f8(b, zero)), m));
  put<NT>(y + 8, _mm256_sub_ps(_mm256_mul_ps(d, f8(_mm_srli_si128(b, 8), zero)), m));
}

// Bits ``first .. first+15`` of ``qh`` as 16 bytes of 0x10 (set) or 0 (clear).
OFFLOAD_AVX2 __m128i high_bits(uint32_t qh, int first) {
  const __m128i spread = _mm_shuffle_epi8(
      _mm_set1_epi32((int)qh),
      _mm_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1));
  const __m128i spread_hi = _mm_shuffle_epi8(
      _mm_set1_epi32((int)qh),
      _mm_setr_epi8(2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
  const __m128i bit = _mm_setr_epi8(1, 2, 4, 8, 16, 32, 64, (char)128, 1, 2, 4, 8, 16, 32, 64,
                                    (char)128);
  const __m128i s = first ? spread_hi : spread;
  return _mm_and_si128(_mm_cmpeq_epi8(_mm_and_si128(s, bit), bit), _mm_set1_epi8(0x10));
}

// The 16 low (``upper`` false) or high nibbles of ``q``, as bytes.
OFFLOAD_AVX2 __m128i nibbles(__m128i q, bool upper) {
  return _mm_and_si128(upper ? _mm_srli_epi16(q, 4) : q, _mm_set1_epi8(0x0f));
}

// Q5_0 / Q5_1: the nibbles with their fifth bits (bits 0-15 of ``qh`` low, 16-31 high).
OFFLOAD_AVX2 __m128i five_bits(__m128i q, uint32_t qh, bool upper) {
  return _mm_or_si128(nibbles(q, upper), high_bits(qh, upper ? 16 : 0));
}

template <bool NT>
OFFLOAD_AVX2 void q4_0_v(const uint8_t* b, float* y) {
  const __m256 d = _mm256_set1_ps(half(b));
  const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 2));
  const __m256i bias = _mm256_set1_epi32(8);
  scaled16<NT>(nibbles(q, false), bias, d, y);
  scaled16<NT>(nibbles(q, true), bias, d, y + 16);
}

template <bool NT>
OFFLOAD_AVX2 void q4_1_v(const uint8_t* b, float* y) {
  const __m256 d = _mm256_set1_ps(half(b)), mn = _mm256_set1_ps(half(b + 2));
  const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 4));
  affine16<NT>(nibbles(q, false), d, mn, y);
  affine16<NT>(nibbles(q, true), d, mn, y + 16);
}

template <bool NT>
OFFLOAD_AVX2 void q5_0_v(const uint8_t* b, float* y) {
  const __m256 d = _mm256_set1_ps(half(b));
  uint32_t qh;
  std::memcpy(&qh, b + 2, 4);
  const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 6));
  const __m256i bias = _mm256_set1_epi32(16);
  scaled16<NT>(five_bits(q, qh, false), bias, d, y);
  scaled16<NT>(five_bits(q, qh, true), bias, d, y + 16);
}

template <bool NT>
OFFLOAD_AVX2 void q5_1_v(const uint8_t* b, float* y) {
  const __m256 d = _mm256_set1_ps(half(b)), mn = _mm256_set1_ps(half(b + 2));
  uint32_t qh;
  std::memcpy(&qh, b + 4, 4);
  const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 8));
  affine16<NT>(five_bits(q, qh, false), d, mn, y);
  affine16<NT>(five_bits(q, qh, true), d, mn, y + 16);
}

template <bool NT>
OFFLOAD_AVX2 void q8_0_v(const uint8_t* b, float* y) {
  const __m256 d = _mm256_set1_ps(half(b));
  const int8_t* qs = reinterpret_cast<const int8_t*>(b + 2);
  for (int k = 0; k < 4; ++k) {   // (float)q * d, as the block function
    const __m128i q8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(qs + 8 * k));
    put<NT>(y + 8 * k, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q8)), d));
  }
}

// Q4_K, and Q5_K (``Five``: 32 bytes of fifth bits after the scales): 8 sub-blocks of 32
// elements, ``d * sc * q - dmin * m`` each.
template <bool NT, bool Five>
OFFLOAD_AVX2 void k_quant_v(const uint8_t* b, float* y) {
  const float d = half(b), dmin = half(b + 2);
  const uint8_t* s = b + 4;
  const uint8_t* qh = b + 16;
  const uint8_t* qs = b + (Five ? 48 : 16);
  const __m128i one = _mm_set1_epi8(1);
  for (int j = 0; j < 8; ++j) {
    int sc, mn;
    scale_min(s, j, &sc, &mn);
    const __m256 dd = _mm256_set1_ps(d * (float)sc), dm = _mm256_set1_ps(dmin * (float)mn);
    const uint8_t* q = qs + 32 * (j / 2);
    for (int h = 0; h < 2; ++h) {
      __m128i v = nibbles(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16 * h)), j % 2);
      if (Five) {
        const __m128i hb = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qh + 16 * h));
        v = _mm_or_si128(v, _mm_slli_epi16(_mm_and_si128(_mm_srli_epi16(hb, j), one), 4));
      }
      affine16_sub<NT>(v, dd, dm, y + 32 * j + 16 * h);
    }
  }
}

template <bool NT>
OFFLOAD_AVX2 void q4_k_v(const uint8_t* b, float* y) { k_quant_v<NT, false>(b, y); }

template <bool NT>
OFFLOAD_AVX2 void q5_k_v(const uint8_t* b, float* y) { k_quant_v<NT, true>(b, y); }

template <bool NT>
OFFLOAD_AVX2 void q6_k_v(const uint8_t* b, float* y) {
  const uint8_t* ql = b;
  const uint8_t* qh = b + 128;
  const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
  const float d = half(b + 208);
  const __m128i m = _mm_set1_epi8(0x0f), three = _mm_set1_epi8(3);
  const __m256i bias = _mm256_set1_epi32(32);
  for (int g = 0; g < 2; ++g) {
    for (int s = 0; s < 4; ++s) {          // 32 elements e = 128 g + 32 s + l
      for (int h = 0; h < 2; ++h) {        // 16 of them, one scale
        __m128i lo = _mm_loadu_si128(
            reinterpret_cast<const __m128i*>(ql + 64 * g + 32 * (s % 2) + 16 * h));
        if (s / 2) lo = _mm_srli_epi16(lo, 4);
        __m128i hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qh + 32 * g + 16 * h));
        hi = _mm_slli_epi16(_mm_and_si128(_mm_srli_epi16(hi, 2 * s), three), 4);
        const __m256 ds = _mm256_set1_ps(d * (float)sc[8 * g + 2 * s + h]);
        scaled16<NT>(_mm_or_si128(_mm_and_si128(lo, m), hi), bias, ds,
                 y + 128 * g + 32 * s + 16 * h);
      }
    }
  }
}

template <void (*Block)(const uint8_t*, float*)>
OFFLOAD_AVX2 void run_v(const uint8_t* src, float* dst, int64_t b0, int64_t b1, int bytes,
                        int block) {
  for (int64_t i = b0; i < b1; ++i) Block(src + i * bytes, dst + i * block);
}

template <bool NT>
__attribute__((target("avx2"))) int blocks_vec_(int type, const uint8_t* src, float* dst,
                                               int64_t b0, int64_t b1) {
  const Traits t = traits(type);
  switch (type) {
    case Q4_0: run_v<q4_0_v<NT>>(src, dst, b0, b1, t.bytes, t.block); return 0;
    case Q4_1: run_v<q4_1_v<NT>>(src, dst, b0, b1, t.bytes, t.block); return 0;
    case Q5_0: run_v<q5_0_v<NT>>(src, dst, b0, b1, t.bytes, t.block); return 0;
    case Q5_1: run_v<q5_1_v<NT>>(src, dst, b0, b1, t.bytes, t.block); return 0;
    case Q8_0: run_v<q8_0_v<NT>>(src, dst, b0, b1, t.bytes, t.block); return 0;
    case Q4_K: run_v<q4_k_v<NT>>(src, dst, b0, b1, t.bytes, t.block); return 0;
    case Q5_K: run_v<q5_k_v<NT>>(src, dst, b0, b1, t.bytes, t.block); return 0;
    case Q6_K: run_v<q6_k_v<NT>>(src, dst, b0, b1, t.bytes, t.block); return 0;
    default: return 1;   // no explicit loop: the compiler's
  }
}

__attribute__((target("avx2"))) int blocks_vec(int type, const uint8_t* src, float* dst,
                                               int64_t b0, int64_t b1) {
  if (reinterpret_cast<uintptr_t>(dst + b0 * traits(type).block) % 32) {
    return blocks_vec_<false>(type, src, dst, b0, b1);
  }
  const int r = blocks_vec_<true>(type, src, dst, b0, b1);
  _mm_sfence();   // streaming stores visible before the caller reads the slot
  return r;
}
#endif

// The same loops, compiled for each level.
#if defined(__x86_64__)
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))) int blocks_avx512(
    int type, const uint8_t* src, float* dst, int64_t b0, int64_t b1) {
  if (blocks_vec(type, src, dst, b0, b1) == 0) return 0;
  return dequant_blocks(type, src, dst, b0, b1);
}
__attribute__((target("avx2,f16c,bmi2"))) int blocks_avx2(
    int type, const uint8_t* src, float* dst, int64_t b0, int64_t b1) {
  if (blocks_vec(type, src, dst, b0, b1) == 0) return 0;
  return dequant_blocks(type, src, dst, b0, b1);
}
#endif
__attribute__((noinline)) int blocks_scalar(int type, const uint8_t* src, float* dst,
                                            int64_t b0, int64_t b1) {
  return dequant_blocks(type, src, dst, b0, b1);
}

int blocks(int level, int type, const uint8_t* src, float* dst, int64_t b0, int64_t b1) {
#if defined(__x86_64__)
  if (level >= offload_isa::AVX512) return blocks_avx512(type, src, dst, b0, b1);
  if (level >= offload_isa::AVX2) return blocks_avx2(type, src, dst, b0, b1);
#endif
  return blocks_scalar(type, src, dst, b0, b1);
}

}  // namespace

extern "C" {

// Bytes per block and elements per block of ``type`` (0, 0 for a type this kernel lacks).
int offload_gguf_block_bytes(int type) { return traits(type).bytes; }
int offload_gguf_block_elems(int type) { return traits(type).block; }

// Dequantize ``nblocks`` blocks of ``type`` at ``src`` into ``dst`` (float32, nblocks x block
// elements) with ``threads`` threads, at the highest path at or below ``isa``. Returns 0, or
// -1 for an unknown type (nothing written).
int offload_gguf_dequant(int type, const uint8_t* src, float* dst, int64_t nblocks, int threads,
                         int isa) {
  if (traits(type).block == 0) return -1;
  const int level = offload_isa::effective(isa);
  int64_t parts = std::max<int64_t>(1, std::min<int64_t>(threads, nblocks));
  int64_t per = (nblocks + parts - 1) / parts;
  std::vector<std::thread> pool;
  for (int64_t p = 1; p < parts; ++p) {
    int64_t b0 = p * per, b1 = std::min(nblocks, b0 + per);
    if (b0 < b1) pool.emplace_back(blocks, level, type, src, dst, b0, b1);
  }
  blocks(level, type, src, dst, 0, std::min(nblocks, per));
  for (auto& t : pool) t.join();
  return 0;
}

int offload_cpu_isa() { return offload_isa::best(); }

}  // extern "C"
