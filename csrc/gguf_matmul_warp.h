// The fused GGUF matmul of a CUDA warp, lane by lane: what each of a warp's 32 lanes adds up
// for one output row, and the butterfly that sums the lanes. Shared by the CUDA kernels
// (gguf_matmul.cu) and their CPU emulation (gguf_matmul_warp_cpu.cpp), which runs the same
// lanes and the same butterfly in the same order: with multiply-adds unfused in both builds
// (--fmad=false, -ffp-contract=off) the emulation is bitwise what a GPU computes, so the
// kernels' arithmetic is checked on any machine and a GPU run is checked bit for bit.
//
// y[i, r] = sum_k x[i, k] * W[r, k] for up to MAX_N rows i of float32 activations. W is whole
// rows of GGUF blocks as stored; each weight is decoded in registers with the float operations
// of gguf_blocks.h (bitwise the gguf package's dequantization), multiplied by its activation in
// float32 and added in float32: no activation is rounded to 8 bits (the CPU kernel's way, for
// its integer dot products), so the error is float32 accumulation's alone.
//
// A lane takes the blocks lane, lane + 32, ... of the row (a warp's loads cover 32 adjacent
// blocks), then the 32 partial sums meet in a butterfly (lane L adds lane L ^ 16, then L ^ 8,
// ... L ^ 1: every lane ends with the same sum, as float addition commutes).
#pragma once

#include "gguf_blocks.h"

namespace offload_gguf_mm {

using namespace offload_gguf;

constexpr int LANES = 32;   // a warp
constexpr int MAX_N = 8;    // rows of activations one call multiplies (a decode batch)

// Each type's block: its size, and its weights one by one (gguf_blocks.h's ``each_<type>``).
template <int T> struct Block;
#define OFFLOAD_MM_BLOCK(TYPE, NAME, ELEMS, BYTES)                                            \
  template <> struct Block<TYPE> {                                                            \
    static constexpr int elems = ELEMS, bytes = BYTES;                                        \
    template <class F> static OFFLOAD_HD void each(const uint8_t* b, F&& f) { NAME(b, f); }   \
  };
OFFLOAD_MM_BLOCK(Q4_0, each_q4_0, 32, 18)
OFFLOAD_MM_BLOCK(Q4_1, each_q4_1, 32, 20)
OFFLOAD_MM_BLOCK(Q5_0, each_q5_0, 32, 22)
OFFLOAD_MM_BLOCK(Q5_1, each_q5_1, 32, 24)
OFFLOAD_MM_BLOCK(Q8_0, each_q8_0, 32, 34)
OFFLOAD_MM_BLOCK(Q4_K, each_q4_k, 256, 144)
OFFLOAD_MM_BLOCK(Q5_K, each_q5_k, 256, 176)
OFFLOAD_MM_BLOCK(Q6_K, each_q6_k, 256, 210)
#undef OFFLOAD_MM_BLOCK

// One block's products: acc[i] += x[i * ldx + e] * w_e for each row i < n of the activations
// (x at the block's first column), each weight w_e as the decoders compute it. The loop over
// rows runs to MAX_N so that acc stays in registers.
template <int T> OFFLOAD_HD void block_dot(const uint8_t* b, const float* x, int64_t ldx,
                                           int n, float* acc) {
  Block<T>::each(b, [&](int e, float w) {
    for (int i = 0; i < MAX_N; ++i)
      if (i < n) acc[i] += x[i * ldx + e] * w;
  });
}

// Lane ``lane``'s partial sums of one row of W (``nblocks`` blocks from ``wrow``) against the
// ``n`` rows of ``x`` (row stride ``ldx``): blocks lane, lane + LANES, ...
template <int T> OFFLOAD_HD void lane_partial(const uint8_t* wrow, int64_t nblocks,
                                              const float* x, int64_t ldx, int n, int lane,
                                              float* acc) {
  for (int i = 0; i < MAX_N; ++i) acc[i] = 0.0f;
  for (int64_t blk = lane; blk < nblocks; blk += LANES)
    block_dot<T>(wrow + blk * Block<T>::bytes, x + blk * Block<T>::elems, ldx, n, acc);
}

// The butterfly's steps: lane L adds lane L ^ offset, for offset 16, 8, 4, 2, 1.
constexpr int FIRST_OFFSET = LANES / 2;

}  // namespace offload_gguf_mm
