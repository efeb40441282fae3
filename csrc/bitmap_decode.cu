// Bitmap-encoded tensor decode, CUDA. The encoding is described in bitmap_decode_cpu.cpp and
// offload/kernels/bitmap.py. Built like gguf_dequant.cu (offload/kernels/cuda.py): by NVRTC
// through CuPy, which launches the two C-named kernels below, or by nvcc into a library whose
// C launcher, offload_bitmap_decode_cuda, ctypes calls.
//
// One warp decodes one group of 32 tiles (2048 elements): lane l reads tile l's mask, a warp
// scan of the popcounts gives each tile's first value, then the warp walks the 32 tiles with
// lane l writing elements 2l and 2l+1 of each (one coalesced 128- or 256-byte row per tile).
// Bytes are moved, never converted: the result is bit-exact for every dtype.
//
// The host validates a bitmap against its offsets before the copy (offload_bitmap_validate on
// the pinned buffer); the kernel still never reads past nnz values: a group whose offsets
// disagree with its popcounts is written as zeros and raises *error.
#include "bitmap_layout.h"

namespace {

using namespace offload_bitmap;

constexpr unsigned FULL = 0xffffffffu;

template <typename T>
struct alignas(2 * sizeof(T)) Pair {
  T a, b;
};

template <typename T>
__device__ __forceinline__ void decode_groups(const uint8_t* __restrict__ enc,
                                              T* __restrict__ out, int64_t n, int64_t nnz,
                                              Layout l, int* error) {
  const int lane = threadIdx.x & 31;
  const int64_t first = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) >> 5;
  const int64_t step = ((int64_t)gridDim.x * blockDim.x) >> 5;
  const uint64_t* masks = reinterpret_cast<const uint64_t*>(enc);
  const int64_t* offsets = reinterpret_cast<const int64_t*>(enc + 8 * l.ntiles);
  const T* values = reinterpret_cast<const T*>(enc + l.values_off);
  for (int64_t g = first; g < l.ngroups; g += step) {
    const int64_t t = g * GROUP_TILES + lane;
    const uint64_t m = t < l.ntiles ? __ldg(masks + t) : 0ull;
    const int c = __popcll(m);
    int incl = c;
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const int v = __shfl_up_sync(FULL, incl, d);
      if (lane >= d) incl += v;
    }
    const int total = __shfl_sync(FULL, incl, 31);
    const int64_t base = offsets[g];
    const bool ok = base >= 0 && base + total <= nnz && offsets[g + 1] - base == total;
    if (!ok && lane == 0) atomicExch(error, 1);
    const int excl = incl - c;
    const int64_t tiles = min((int64_t)GROUP_TILES, l.ntiles - g * GROUP_TILES);
    for (int k = 0; k < tiles; ++k) {
      const uint64_t mk = ok ? __shfl_sync(FULL, m, k) : 0ull;
      const int64_t at = base + __shfl_sync(FULL, excl, k);
      const int j = 2 * lane;
      const int64_t e = (g * GROUP_TILES + k) * TILE + j;
      int r = __popcll(mk & ((1ull << j) - 1ull));
      const bool ha = (mk >> j) & 1ull, hb = (mk >> (j + 1)) & 1ull;
      Pair<T> p;
      p.a = ha ? values[at + r] : T(0);
      r += ha;
      p.b = hb ? values[at + r] : T(0);
      if (e + 1 < n) {
        *reinterpret_cast<Pair<T>*>(out + e) = p;
      } else if (e < n) {
        out[e] = p.a;
      }
    }
  }
}

}  // namespace

// One tensor of 2-byte or 4-byte elements; ``ntiles``, ``ngroups`` and ``values_off`` are its
// layout (offload_bitmap::layout(n)). *error (device memory) is set to 1 when a group
// disagrees with its offsets.
#define OFFLOAD_BITMAP_KERNEL(BITS)                                                          \
  extern "C" __global__ void offload_bitmap_decode_u##BITS(                                  \
      const uint8_t* __restrict__ enc, uint8_t* __restrict__ out, int64_t n, int64_t nnz,    \
      int64_t ntiles, int64_t ngroups, int64_t values_off, int* error) {                     \
    decode_groups<uint##BITS##_t>(enc, reinterpret_cast<uint##BITS##_t*>(out), n, nnz,      \
                                  Layout{ntiles, ngroups, values_off}, error);               \
  }

OFFLOAD_BITMAP_KERNEL(16)
OFFLOAD_BITMAP_KERNEL(32)

#if !defined(__CUDACC_RTC__)
#include <cuda_runtime.h>

extern "C" {

// Launch the decode of one tensor on `stream` (a cudaStream_t; 0 for the legacy stream).
// enc and out are device pointers; out must be aligned to 2 * elem bytes. Returns a
// cudaError_t.
int offload_bitmap_decode_cuda(const uint8_t* enc, uint8_t* out, int64_t n, int64_t nnz, int elem,
                               void* stream, int* error) {
  if (n == 0) return 0;
  Layout l = layout(n);
  const int threads = 256;                       // 8 warps, one group each
  int64_t blocks = (l.ngroups + 7) / 8;
  if (blocks > 65535) blocks = 65535;            // grid-stride beyond that
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (elem == 2) {
    offload_bitmap_decode_u16<<<(unsigned)blocks, threads, 0, s>>>(
        enc, out, n, nnz, l.ntiles, l.ngroups, l.values_off, error);
  } else if (elem == 4) {
    offload_bitmap_decode_u32<<<(unsigned)blocks, threads, 0, s>>>(
        enc, out, n, nnz, l.ntiles, l.ngroups, l.values_off, error);
  } else {
    return (int)cudaErrorInvalidValue;
  }
  return (int)cudaGetLastError();
}

}  // extern "C"
#endif
