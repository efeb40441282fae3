// The bitmap encoding's layout, shared by the CPU and CUDA decoders (see
// offload/kernels/bitmap.py: masks uint64[ntiles], offsets int64[ngroups + 1], then the values
// from values_off, 64-aligned).
#pragma once
#include "int_types.h"

namespace offload_bitmap {

constexpr int64_t TILE = 64;         // elements per mask word
constexpr int64_t GROUP_TILES = 32;  // tiles per offsets entry (2048 elements)

struct Layout {
  int64_t ntiles, ngroups, values_off;
};

#if !defined(__CUDACC_RTC__)   // host code: NVRTC compiles device code only (the caller
                               // passes the layout to its kernels)
inline Layout layout(int64_t n) {
  Layout l;
  l.ntiles = (n + TILE - 1) / TILE;
  l.ngroups = (l.ntiles + GROUP_TILES - 1) / GROUP_TILES;
  int64_t head = 8 * l.ntiles + 8 * (l.ngroups + 1);
  l.values_off = (head + 63) / 64 * 64;
  return l;
}
#endif

}  // namespace offload_bitmap
