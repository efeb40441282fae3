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
//
// Paths (csrc/cpu_isa.h; the caller passes the highest level it allows): AVX-512 expands each
// 32- or 16-element half tile in a register; AVX2, which has no expand instruction, shuffles
// 8 elements at a time by a table indexed with the mask byte; scalar scatters bit by bit.
#include <cstdint>

#include "bitmap_layout.h"
#include "cpu_isa.h"
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

// Every path walks groups g0..g1 tile by tile the same way: a full tile with at least TILE
// values left goes to `full(mask, src, dst)` (the vector path, inlined into the ISA-specific
// caller), the short last tile and the tiles near the end of the values to tile_scalar, so
// no vector load reads past the values.
template <typename T, typename Full>
__attribute__((always_inline)) inline void for_each_tile(
    const uint64_t* masks, const int64_t* offsets, const T* values, const T* end, T* out,
    int64_t n, int64_t ntiles, int64_t g0, int64_t g1, const Full& full) {
  for (int64_t g = g0; g < g1; ++g) {
    const T* src = values + offsets[g];
    int64_t t1 = std::min(ntiles, (g + 1) * GROUP_TILES);
    for (int64_t t = g * GROUP_TILES; t < t1; ++t) {
      T* dst = out + t * TILE;
      if (n - t * TILE < TILE || end - src < TILE)
        src = tile_scalar<T>(masks[t], src, dst, std::min(TILE, n - t * TILE));
      else
        src = full(masks[t], src, dst);
    }
  }
}

template <typename T>
struct ScalarTile {
  const T* operator()(uint64_t m, const T* src, T* dst) const {
    return tile_scalar<T>(m, src, dst, TILE);
  }
};

#if defined(__x86_64__)
// Non-temporal stores when the output is 64-byte aligned: a decoded Unit (tens of MB) is far
// larger than the caches, and streaming stores skip reading each output line before writing
// it (a third of the memory traffic of the decode). An sfence ends every vector decode, so
// the stores are visible before the decode is reported done.
__attribute__((target("avx512f"))) inline void store512(void* dst, __m512i v, bool stream) {
  if (stream)
    _mm512_stream_si512(reinterpret_cast<__m512i*>(dst), v);
  else
    _mm512_storeu_si512(dst, v);
}

__attribute__((target("avx2"))) inline void store256(void* dst, __m256i v, bool stream) {
  if (stream)
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst), v);
  else
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), v);
}

// AVX-512: a masked load of the next popcount(k) values, then an in-register expand to the
// positions of k's set bits (VPEXPANDW needs VBMI2, VPEXPANDD AVX512F).
struct Avx512Tile16 {
  bool stream;
  __attribute__((target("avx512f,avx512bw,avx512vbmi2"))) inline const uint16_t* operator()(
      uint64_t m, const uint16_t* src, uint16_t* dst) const {
    for (int h = 0; h < 2; ++h) {
      __mmask32 k = (__mmask32)(m >> (32 * h));
      int c = __builtin_popcount(k);
      __mmask32 load = c == 32 ? ~0u : ((1u << c) - 1);
      __m512i v = _mm512_maskz_loadu_epi16(load, src);
      store512(dst + 32 * h, _mm512_maskz_expand_epi16(k, v), stream);
      src += c;
    }
    return src;
  }
};

struct Avx512Tile32 {
  bool stream;
  __attribute__((target("avx512f"))) inline const uint32_t* operator()(
      uint64_t m, const uint32_t* src, uint32_t* dst) const {
    for (int q = 0; q < 4; ++q) {
      __mmask16 k = (__mmask16)(m >> (16 * q));
      int c = __builtin_popcount(k);
      __mmask16 load = (__mmask16)(c == 16 ? 0xFFFFu : ((1u << c) - 1));
      __m512i v = _mm512_maskz_loadu_epi32(load, src);
      store512(dst + 16 * q, _mm512_maskz_expand_epi32(k, v), stream);
      src += c;
    }
    return src;
  }
};

// AVX2: no expand instruction, so each mask byte (8 output elements) indexes a table saying
// which of the next popcount(byte) values go where; loads are unmasked (for_each_tile keeps
// them inside the values).
struct Avx2Tables {
  uint8_t shuffle16[256][16];  // 16-bit: PSHUFB control, 0x80 zeroes a byte
  uint8_t permute32[256][8];   // 32-bit: VPERMD index of each output element
  constexpr Avx2Tables() : shuffle16(), permute32() {
    for (int m = 0; m < 256; ++m) {
      int rank = 0;
      for (int j = 0; j < 8; ++j) {
        bool set = (m >> j) & 1;
        shuffle16[m][2 * j] = set ? uint8_t(2 * rank) : 0x80;
        shuffle16[m][2 * j + 1] = set ? uint8_t(2 * rank + 1) : 0x80;
        permute32[m][j] = set ? uint8_t(rank) : 0;
        rank += set;
      }
    }
  }
};
constexpr Avx2Tables AVX2_TABLES{};

struct Avx2Tile16 {
  bool stream;
  __attribute__((target("avx2,popcnt"))) inline const uint16_t* operator()(
      uint64_t m, const uint16_t* src, uint16_t* dst) const {
    for (int q = 0; q < 4; ++q) {  // two mask bytes (16 elements) per 256-bit store
      unsigned b0 = (m >> (16 * q)) & 0xFF, b1 = (m >> (16 * q + 8)) & 0xFF;
      const uint16_t* src1 = src + __builtin_popcount(b0);
      __m256i v = _mm256_set_m128i(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src1)),
                                   _mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
      __m256i c = _mm256_set_m128i(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(AVX2_TABLES.shuffle16[b1])),
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(AVX2_TABLES.shuffle16[b0])));
      store256(dst + 16 * q, _mm256_shuffle_epi8(v, c), stream);
      src = src1 + __builtin_popcount(b1);
    }
    return src;
  }
};

struct Avx2Tile32 {
  bool stream;
  __attribute__((target("avx2,popcnt"))) inline const uint32_t* operator()(
      uint64_t m, const uint32_t* src, uint32_t* dst) const {
    const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    for (int q = 0; q < 8; ++q) {
      unsigned b = (m >> (8 * q)) & 0xFF;
      __m256i idx = _mm256_cvtepu8_epi32(
          _mm_loadl_epi64(reinterpret_cast<const __m128i*>(AVX2_TABLES.permute32[b])));
      __m256i keep = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(b), bit), bit);
      __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
      store256(dst + 8 * q, _mm256_and_si256(_mm256_permutevar8x32_epi32(v, idx), keep),
               stream);
      src += __builtin_popcount(b);
    }
    return src;
  }
};

// One entry point per ISA, compiled for it, so the tile loop and its vector body are inlined
// together.
#define OFFLOAD_DECODE_GROUPS(name, isa, T, Tile)                                            \
  __attribute__((target(isa))) void name(const uint64_t* masks, const int64_t* offsets,     \
                                         const T* values, const T* end, T* out, int64_t n,  \
                                         int64_t ntiles, int64_t g0, int64_t g1) {          \
    Tile tile{reinterpret_cast<uintptr_t>(out) % 64 == 0};                                   \
    for_each_tile(masks, offsets, values, end, out, n, ntiles, g0, g1, tile);                \
    _mm_sfence();                                                                            \
  }
OFFLOAD_DECODE_GROUPS(decode_groups_avx512_16, "avx512f,avx512bw,avx512vbmi2", uint16_t,
                      Avx512Tile16)
OFFLOAD_DECODE_GROUPS(decode_groups_avx512_32, "avx512f", uint32_t, Avx512Tile32)
OFFLOAD_DECODE_GROUPS(decode_groups_avx2_16, "avx2,popcnt", uint16_t, Avx2Tile16)
OFFLOAD_DECODE_GROUPS(decode_groups_avx2_32, "avx2,popcnt", uint32_t, Avx2Tile32)
#undef OFFLOAD_DECODE_GROUPS
#endif

template <typename T>
void decode_groups_scalar(const uint64_t* masks, const int64_t* offsets, const T* values,
                          const T* end, T* out, int64_t n, int64_t ntiles, int64_t g0,
                          int64_t g1) {
  for_each_tile(masks, offsets, values, end, out, n, ntiles, g0, g1, ScalarTile<T>{});
}

void decode_range(const uint8_t* enc, uint8_t* out, int64_t n, int64_t nnz, int elem,
                  const Layout& l, int64_t g0, int64_t g1, int level) {
  auto masks = reinterpret_cast<const uint64_t*>(enc);
  auto offsets = reinterpret_cast<const int64_t*>(enc + 8 * l.ntiles);
  const uint8_t* values = enc + l.values_off;
  if (elem == 2) {
    auto v = reinterpret_cast<const uint16_t*>(values);
    auto o = reinterpret_cast<uint16_t*>(out);
#if defined(__x86_64__)
    if (level >= offload_isa::AVX512)
      return decode_groups_avx512_16(masks, offsets, v, v + nnz, o, n, l.ntiles, g0, g1);
    if (level >= offload_isa::AVX2)
      return decode_groups_avx2_16(masks, offsets, v, v + nnz, o, n, l.ntiles, g0, g1);
#endif
    decode_groups_scalar<uint16_t>(masks, offsets, v, v + nnz, o, n, l.ntiles, g0, g1);
  } else {
    auto v = reinterpret_cast<const uint32_t*>(values);
    auto o = reinterpret_cast<uint32_t*>(out);
#if defined(__x86_64__)
    if (level >= offload_isa::AVX512)
      return decode_groups_avx512_32(masks, offsets, v, v + nnz, o, n, l.ntiles, g0, g1);
    if (level >= offload_isa::AVX2)
      return decode_groups_avx2_32(masks, offsets, v, v + nnz, o, n, l.ntiles, g0, g1);
#endif
    decode_groups_scalar<uint32_t>(masks, offsets, v, v + nnz, o, n, l.ntiles, g0, g1);
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

// Decode into out (n * elem bytes) with `threads` threads (the caller's and threads - 1 more),
// at the highest path at or below `isa` (csrc/cpu_isa.h) that this CPU runs. Returns the
// validation result: nothing is written unless it is 0.
int64_t offload_bitmap_decode(const uint8_t* enc, uint8_t* out, int64_t n, int64_t nnz, int elem,
                              int threads, int isa) {
  if (elem != 2 && elem != 4) return -1;
  int64_t bad = offload_bitmap_validate(enc, n, nnz);
  if (bad) return bad;
  Layout l = layout(n);
  int64_t parts = std::max<int64_t>(1, std::min<int64_t>(threads, l.ngroups));
  int64_t per = (l.ngroups + parts - 1) / parts;
  int level = offload_isa::effective(isa);
  std::vector<std::thread> pool;
  for (int64_t p = 1; p < parts; ++p) {
    int64_t g0 = p * per, g1 = std::min(l.ngroups, g0 + per);
    if (g0 < g1)
      pool.emplace_back(decode_range, enc, out, n, nnz, elem, std::cref(l), g0, g1, level);
  }
  decode_range(enc, out, n, nnz, elem, l, 0, std::min(l.ngroups, per), level);
  for (auto& t : pool) t.join();
  return 0;
}

// The best level this CPU runs (csrc/cpu_isa.h).
int offload_cpu_isa() { return offload_isa::best(); }

}  // extern "C"
