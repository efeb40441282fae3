// Bitmap-encoded tensor decode, CPU: C ABI, loaded with ctypes (offload/kernels/_build.py).
//
// Encoding of one tensor of n elements of `elem` bytes (2 or 4), see offload/kernels/bitmap.py:
//   masks   uint64[ntiles]       bit j of mask t set <=> element 64*t + j is non-zero
//   offsets int64[ngroups + 1]   index into values of the first value of each group of 32
//                                tiles (2048 elements); offsets[ngroups] == nnz
//   values  elem[nnz]            the non-zero elements, in order (at values_off, 64-aligned)
// Decoding moves bytes only (no arithmetic on values), so it is bit-exact for every dtype.
//
// offload_bitmap_validate checks every group's popcount against its offsets before any value
// is read, so a corrupt bitmap is reported, never decoded out of bounds.
#include <cstdint>

#include "bitmap_layout.h"
#include <cstring>
#include <thread>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace {

using namespace offload_bitmap;

// Scalar tile: zero it, then scatter its values to the set bits (the last tile may be short).
template <typename T>
inline const T* tile_scalar(uint64_t m, const T* src, T* dst, int64_t len) {
  std::memset(dst, 0, len * sizeof(T));
  while (m) {
    dst[__builtin_ctzll(m)] = *src++;
    m &= m - 1;
  }
  return src;
}

template <typename T>
void decode_groups_scalar(const uint64_t* masks, const int64_t* offsets, const T* values,
                          T* out, int64_t n, int64_t ntiles, int64_t g0, int64_t g1) {
  for (int64_t g = g0; g < g1; ++g) {
    const T* src = values + offsets[g];
    int64_t t1 = std::min(ntiles, (g + 1) * GROUP_TILES);
    for (int64_t t = g * GROUP_TILES; t < t1; ++t)
      src = tile_scalar<T>(masks[t], src, out + t * TILE, std::min(TILE, n - t * TILE));
  }
}

#if defined(__x86_64__)
// Non-temporal stores when the output is 64-byte aligned: a decoded Unit (tens of MB) is far
// larger than the caches, and streaming stores skip reading each output line before writing
// it (a third of the memory traffic of the decode).
__attribute__((target("avx512f"))) inline void store(void* dst, __m512i v, bool stream) {
  if (stream)
    _mm512_stream_si512(reinterpret_cast<__m512i*>(dst), v);
  else
    _mm512_storeu_si512(dst, v);
}

// AVX-512: a masked load of the next popcount(k) values, then an in-register expand to the
// positions of k's set bits (VPEXPANDW needs VBMI2, VPEXPANDD AVX512F). Masked loads never
// touch bytes past the values, so the encoded buffer needs no padding.
__attribute__((target("avx512f,avx512bw,avx512vbmi2")))
void decode_groups_avx512_16(const uint64_t* masks, const int64_t* offsets, const uint16_t* values,
                             uint16_t* out, int64_t n, int64_t ntiles, int64_t g0, int64_t g1) {
  const bool stream = reinterpret_cast<uintptr_t>(out) % 64 == 0;
  for (int64_t g = g0; g < g1; ++g) {
    const uint16_t* src = values + offsets[g];
    int64_t t1 = std::min(ntiles, (g + 1) * GROUP_TILES);
    for (int64_t t = g * GROUP_TILES; t < t1; ++t) {
      uint64_t m = masks[t];
      uint16_t* dst = out + t * TILE;
      if (n - t * TILE < TILE) {  // the short last tile
        src = tile_scalar<uint16_t>(m, src, dst, n - t * TILE);
        continue;
      }
      for (int h = 0; h < 2; ++h) {
        __mmask32 k = (__mmask32)(m >> (32 * h));
        int c = __builtin_popcount(k);
        __mmask32 load = c == 32 ? ~0u : ((1u << c) - 1);
        __m512i v = _mm512_maskz_loadu_epi16(load, src);
        store(dst + 32 * h, _mm512_maskz_expand_epi16(k, v), stream);
        src += c;
      }
    }
  }
  _mm_sfence();   // streaming stores are visible before the decode is reported done
}

__attribute__((target("avx512f")))
void decode_groups_avx512_32(const uint64_t* masks, const int64_t* offsets, const uint32_t* values,
                             uint32_t* out, int64_t n, int64_t ntiles, int64_t g0, int64_t g1) {
  const bool stream = reinterpret_cast<uintptr_t>(out) % 64 == 0;
  for (int64_t g = g0; g < g1; ++g) {
    const uint32_t* src = values + offsets[g];
    int64_t t1 = std::min(ntiles, (g + 1) * GROUP_TILES);
    for (int64_t t = g * GROUP_TILES; t < t1; ++t) {
      uint64_t m = masks[t];
      uint32_t* dst = out + t * TILE;
      if (n - t * TILE < TILE) {
        src = tile_scalar<uint32_t>(m, src, dst, n - t * TILE);
        continue;
      }
      for (int q = 0; q < 4; ++q) {
        __mmask16 k = (__mmask16)(m >> (16 * q));
        int c = __builtin_popcount(k);
        __mmask16 load = (__mmask16)(c == 16 ? 0xFFFFu : ((1u << c) - 1));
        __m512i v = _mm512_maskz_loadu_epi32(load, src);
        store(dst + 16 * q, _mm512_maskz_expand_epi32(k, v), stream);
        src += c;
      }
    }
  }
  _mm_sfence();
}

bool has_avx512_16() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vbmi2");
}
bool has_avx512_32() { return __builtin_cpu_supports("avx512f"); }
#endif

void decode_range(const uint8_t* enc, uint8_t* out, int64_t n, int elem, const Layout& l,
                  int64_t g0, int64_t g1, bool vector) {
  auto masks = reinterpret_cast<const uint64_t*>(enc);
  auto offsets = reinterpret_cast<const int64_t*>(enc + 8 * l.ntiles);
  const uint8_t* values = enc + l.values_off;
  if (elem == 2) {
#if defined(__x86_64__)
    if (vector && has_avx512_16())
      return decode_groups_avx512_16(masks, offsets, (const uint16_t*)values, (uint16_t*)out, n,
                                     l.ntiles, g0, g1);
#endif
    decode_groups_scalar<uint16_t>(masks, offsets, (const uint16_t*)values, (uint16_t*)out, n,
                                   l.ntiles, g0, g1);
  } else {
#if defined(__x86_64__)
    if (vector && has_avx512_32())
      return decode_groups_avx512_32(masks, offsets, (const uint32_t*)values, (uint32_t*)out, n,
                                     l.ntiles, g0, g1);
#endif
    decode_groups_scalar<uint32_t>(masks, offsets, (const uint32_t*)values, (uint32_t*)out, n,
                                   l.ntiles, g0, g1);
  }
}

}  // namespace

extern "C" {

// 0 when the bitmap agrees with its offsets and nnz; otherwise 1 + the first bad group
// (ngroups + 1 when offsets[ngroups] != nnz or the first offset is not 0).
int64_t offload_bitmap_validate(const uint8_t* enc, int64_t n, int64_t nnz) {
  Layout l = layout(n);
  auto masks = reinterpret_cast<const uint64_t*>(enc);
  auto offsets = reinterpret_cast<const int64_t*>(enc + 8 * l.ntiles);
  if (offsets[0] != 0 || offsets[l.ngroups] != nnz) return l.ngroups + 1;
  for (int64_t g = 0; g < l.ngroups; ++g) {
    int64_t count = 0, t1 = std::min(l.ntiles, (g + 1) * GROUP_TILES);
    for (int64_t t = g * GROUP_TILES; t < t1; ++t) count += __builtin_popcountll(masks[t]);
    if (offsets[g + 1] - offsets[g] != count) return g + 1;
  }
  // Bits past the last element must be clear: they would name values beyond the tensor.
  int64_t tail = n % TILE;
  if (tail && (masks[l.ntiles - 1] >> tail)) return l.ngroups;
  return 0;
}

// Decode into out (n * elem bytes) with `threads` threads (the caller's and threads - 1 more).
// vector = 0 forces the scalar path (tests compare the two). Returns the validation result:
// nothing is written unless it is 0.
int64_t offload_bitmap_decode(const uint8_t* enc, uint8_t* out, int64_t n, int64_t nnz, int elem,
                              int threads, int vector) {
  if (elem != 2 && elem != 4) return -1;
  int64_t bad = offload_bitmap_validate(enc, n, nnz);
  if (bad) return bad;
  Layout l = layout(n);
  int64_t parts = std::max<int64_t>(1, std::min<int64_t>(threads, l.ngroups));
  int64_t per = (l.ngroups + parts - 1) / parts;
  std::vector<std::thread> pool;
  for (int64_t p = 1; p < parts; ++p) {
    int64_t g0 = p * per, g1 = std::min(l.ngroups, g0 + per);
    if (g0 < g1)
      pool.emplace_back(decode_range, enc, out, n, elem, std::cref(l), g0, g1, vector != 0);
  }
  decode_range(enc, out, n, elem, l, 0, std::min(l.ngroups, per), vector != 0);
  for (auto& t : pool) t.join();
  return 0;
}

int offload_bitmap_vector_isa(int elem) {
#if defined(__x86_64__)
  return elem == 2 ? has_avx512_16() : has_avx512_32();
#else
  return 0;
#endif
}

}  // extern "C"
