// GGUF block decoding, shared by the CPU decoder (gguf_dequant_cpu.cpp, its scalar path) and
// the CUDA one (gguf_dequant.cu, compiled by NVRTC through CuPy or by nvcc).
//
// Each function turns one block of one GGML type into float32, bitwise equal to the gguf
// package's numpy reference (gguf.quants.dequantize): every product and sum is rounded to
// float32 on its own, in the numpy code's order, so every build of this header must keep
// multiply-adds unfused (-ffp-contract=off on the CPU, --fmad=false for CUDA). Block layouts
// are ggml's (ggml-common.h), little-endian; fp16 scales are widened exactly in software.
#pragma once

#include "int_types.h"
#if !defined(__CUDACC_RTC__)
#include <cstring>
#endif

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define OFFLOAD_HD __host__ __device__ __forceinline__
#else
#define OFFLOAD_HD __attribute__((always_inline)) inline
#endif

namespace offload_gguf {

constexpr int QK = 32;    // elements per block of the legacy types
constexpr int QK_K = 256; // elements per super-block of the K types

// ggml type ids (gguf.GGMLQuantizationType)
enum Type : int {
  Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8,
  Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13, Q6_K = 14,
};

// Little-endian loads from a block (blocks are byte-aligned: 18, 20, 22 ... bytes long).
OFFLOAD_HD uint16_t load16(const uint8_t* p) { return (uint16_t)(p[0] | (p[1] << 8)); }
OFFLOAD_HD uint32_t load32(const uint8_t* p) {
  return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

OFFLOAD_HD float from_bits(uint32_t bits) {
#if defined(__CUDA_ARCH__)   // device code (nvcc's device pass, or NVRTC)
  return __uint_as_float(bits);
#else
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
#endif
}

// Exact IEEE half -> float, the way numpy widens float16 (payload kept, subnormals exact).
OFFLOAD_HD float half(const uint8_t* p) {
  const uint16_t h = load16(p);
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ffu, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    int e = -1;
    do {
      ++e;
      man <<= 1;
    } while (!(man & 0x400u));
    bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ffu) << 13);
  }
  return from_bits(bits);
}

struct Traits {
  int block;   // elements per block
  int bytes;   // bytes per block
};

OFFLOAD_HD Traits traits(int type) {
  switch (type) {
    case Q4_0: return {QK, 18};
    case Q4_1: return {QK, 20};
    case Q5_0: return {QK, 22};
    case Q5_1: return {QK, 24};
    case Q8_0: return {QK, 34};
    case Q2_K: return {QK_K, 84};
    case Q3_K: return {QK_K, 110};
    case Q4_K: return {QK_K, 144};
    case Q5_K: return {QK_K, 176};
    case Q6_K: return {QK_K, 210};
    default: return {0, 0};
  }
}

// -- one block of each type (inlined into each CPU path's loop and into the CUDA kernels) ----
//
// ``each_<type>(b, f)`` hands each weight of one block to ``f(element, value)``, computed with
// the float operations of the gguf package's numpy: the decoders below store them, the fused
// CUDA matmul (gguf_matmul_warp.h) multiplies them where they are computed.

template <class F> OFFLOAD_HD void each_q4_0(const uint8_t* b, F&& f) {
  const float d = half(b);
  const uint8_t* qs = b + 2;
  for (int j = 0; j < 16; ++j) {
    f(j, d * (float)((int)(qs[j] & 0x0f) - 8));
    f(j + 16, d * (float)((int)(qs[j] >> 4) - 8));
  }
}

template <class F> OFFLOAD_HD void each_q4_1(const uint8_t* b, F&& f) {
  const float d = half(b), m = half(b + 2);
  const uint8_t* qs = b + 4;
  for (int j = 0; j < 16; ++j) {
    f(j, d * (float)(qs[j] & 0x0f) + m);
    f(j + 16, d * (float)(qs[j] >> 4) + m);
  }
}

template <class F> OFFLOAD_HD void each_q5_0(const uint8_t* b, F&& f) {
  const float d = half(b);
  const uint32_t qh = load32(b + 2);
  const uint8_t* qs = b + 6;
  for (int j = 0; j < 16; ++j) {
    int lo = (qs[j] & 0x0f) | (((qh >> j) & 1) << 4);
    int hi = (qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
    f(j, d * (float)(lo - 16));
    f(j + 16, d * (float)(hi - 16));
  }
}

template <class F> OFFLOAD_HD void each_q5_1(const uint8_t* b, F&& f) {
  const float d = half(b), m = half(b + 2);
  const uint32_t qh = load32(b + 4);
  const uint8_t* qs = b + 8;
  for (int j = 0; j < 16; ++j) {
    int lo = (qs[j] & 0x0f) | (((qh >> j) & 1) << 4);
    int hi = (qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
    f(j, d * (float)lo + m);
    f(j + 16, d * (float)hi + m);
  }
}

template <class F> OFFLOAD_HD void each_q8_0(const uint8_t* b, F&& f) {
  const float d = half(b);
  const int8_t* qs = reinterpret_cast<const int8_t*>(b + 2);
  for (int j = 0; j < QK; ++j) f(j, (float)qs[j] * d);
}

OFFLOAD_HD void q4_0(const uint8_t* b, float* y) {
  each_q4_0(b, [y](int e, float v) { y[e] = v; });
}
OFFLOAD_HD void q4_1(const uint8_t* b, float* y) {
  each_q4_1(b, [y](int e, float v) { y[e] = v; });
}
OFFLOAD_HD void q5_0(const uint8_t* b, float* y) {
  each_q5_0(b, [y](int e, float v) { y[e] = v; });
}
OFFLOAD_HD void q5_1(const uint8_t* b, float* y) {
  each_q5_1(b, [y](int e, float v) { y[e] = v; });
}
OFFLOAD_HD void q8_0(const uint8_t* b, float* y) {
  each_q8_0(b, [y](int e, float v) { y[e] = v; });
}

OFFLOAD_HD void q2_k(const uint8_t* b, float* y) {
  const uint8_t* scales = b;       // 16
  const uint8_t* qs = b + 16;      // 64
  const float d = half(b + 80), dmin = half(b + 82);
  for (int i = 0; i < 16; ++i) {   // sub-blocks of 16
    const float dl = d * (float)(scales[i] & 0x0f), ml = dmin * (float)(scales[i] >> 4);
    for (int k = 0; k < 16; ++k) {
      const int e = 16 * i + k, g = e / 128, s = (e % 128) / 32, l = e % 32;
      y[e] = dl * (float)((qs[32 * g + l] >> (2 * s)) & 3) - ml;
    }
  }
}

OFFLOAD_HD void q3_k(const uint8_t* b, float* y) {
  const uint8_t* hmask = b;        // 32
  const uint8_t* qs = b + 32;      // 64
  const uint8_t* sc = b + 96;      // 12
  const float d = half(b + 108);
  for (int i = 0; i < 16; ++i) {
    int lo = (sc[i % 8] >> (4 * (i / 8))) & 0x0f, hi = (sc[8 + i % 4] >> (2 * (i / 4))) & 3;
    const float dl = d * (float)((int8_t)(lo | (hi << 4)) - 32);
    for (int k = 0; k < 16; ++k) {
      const int e = 16 * i + k, g = e / 128, s = (e % 128) / 32, l = e % 32;
      const int ql = (qs[32 * g + l] >> (2 * s)) & 3, qh = ((hmask[l] >> (e / 32)) & 1) ^ 1;
      y[e] = dl * (float)(int8_t)(ql - (qh << 2));
    }
  }
}

// The K types' 12 bytes of 6-bit scales and mins (gguf's Q4_K.get_scale_min).
OFFLOAD_HD void scale_min(const uint8_t* s, int j, int* sc, int* mn) {
  if (j < 4) {
    *sc = s[j] & 0x3f;
    *mn = s[4 + j] & 0x3f;
  } else {
    *sc = (s[8 + j - 4] & 0x0f) | ((s[j - 4] >> 2) & 0x30);
    *mn = (s[8 + j - 4] >> 4) | ((s[4 + j - 4] >> 2) & 0x30);
  }
}

template <class F> OFFLOAD_HD void each_q4_k(const uint8_t* b, F&& f) {
  const float d = half(b), dmin = half(b + 2);
  const uint8_t* s = b + 4;        // 12
  const uint8_t* qs = b + 16;      // 128
  for (int j = 0; j < 8; ++j) {    // sub-blocks of 32: j = 2 * chunk + nibble
    int sc, mn;
    scale_min(s, j, &sc, &mn);
    const float dd = d * (float)sc, dm = dmin * (float)mn;
    const uint8_t* q = qs + 32 * (j / 2);
    const int shift = 4 * (j % 2);
    for (int l = 0; l < 32; ++l) f(32 * j + l, dd * (float)((q[l] >> shift) & 0x0f) - dm);
  }
}

template <class F> OFFLOAD_HD void each_q5_k(const uint8_t* b, F&& f) {
  const float d = half(b), dmin = half(b + 2);
  const uint8_t* s = b + 4;        // 12
  const uint8_t* qh = b + 16;      // 32
  const uint8_t* qs = b + 48;      // 128
  for (int j = 0; j < 8; ++j) {
    int sc, mn;
    scale_min(s, j, &sc, &mn);
    const float dd = d * (float)sc, dm = dmin * (float)mn;
    const uint8_t* q = qs + 32 * (j / 2);
    const int shift = 4 * (j % 2);
    for (int l = 0; l < 32; ++l) {
      const int v = ((q[l] >> shift) & 0x0f) | (((qh[l] >> j) & 1) << 4);
      f(32 * j + l, dd * (float)v - dm);
    }
  }
}

template <class F> OFFLOAD_HD void each_q6_k(const uint8_t* b, F&& f) {
  const uint8_t* ql = b;           // 128
  const uint8_t* qh = b + 128;     // 64
  const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);  // 16
  const float d = half(b + 208);
  for (int i = 0; i < 16; ++i) {
    const float ds = d * (float)sc[i];
    for (int k = 0; k < 16; ++k) {
      const int e = 16 * i + k, g = e / 128, h = (e % 128) / 64, m = e % 64;
      const int s = (e % 128) / 32, l = e % 32;
      const int lo = (ql[64 * g + m] >> (4 * h)) & 0x0f, hi = (qh[32 * g + l] >> (2 * s)) & 3;
      f(e, ds * (float)((int8_t)(lo | (hi << 4)) - 32));
    }
  }
}

OFFLOAD_HD void q4_k(const uint8_t* b, float* y) {
  each_q4_k(b, [y](int e, float v) { y[e] = v; });
}
OFFLOAD_HD void q5_k(const uint8_t* b, float* y) {
  each_q5_k(b, [y](int e, float v) { y[e] = v; });
}
OFFLOAD_HD void q6_k(const uint8_t* b, float* y) {
  each_q6_k(b, [y](int e, float v) { y[e] = v; });
}

}  // namespace offload_gguf
