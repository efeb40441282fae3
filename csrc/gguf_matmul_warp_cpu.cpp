// The CUDA fused matmul (gguf_matmul.cu) emulated on the CPU, lane by lane: each row's 32
// lanes run gguf_matmul_warp.h's lane_partial, then the butterfly adds them in the order the
// warp's shuffles do (lane L takes lane L ^ offset's value as it was before the step). Built
// with -ffp-contract=off as every offload CPU kernel: bitwise what the kernels compute on a
// GPU (built with --fmad=false). The reference the CUDA kernels are checked against on a GPU,
// and the check of their arithmetic on a machine without one; not a fast path.
#include "gguf_matmul_warp.h"

namespace {

using namespace offload_gguf_mm;

template <int T>
void emulate(const uint8_t* w, int64_t rows, int64_t nblocks, const float* x, int64_t ldx,
             int n, float* y, int64_t ldy) {
  float lanes[LANES][MAX_N], next[LANES][MAX_N];
  for (int64_t r = 0; r < rows; ++r) {
    for (int lane = 0; lane < LANES; ++lane)
      lane_partial<T>(w + r * nblocks * Block<T>::bytes, nblocks, x, ldx, n, lane, lanes[lane]);
    for (int offset = FIRST_OFFSET; offset > 0; offset >>= 1) {
      for (int lane = 0; lane < LANES; ++lane)
        for (int i = 0; i < MAX_N; ++i) next[lane][i] = lanes[lane][i] + lanes[lane ^ offset][i];
      for (int lane = 0; lane < LANES; ++lane)
        for (int i = 0; i < MAX_N; ++i) lanes[lane][i] = next[lane][i];
    }
    for (int i = 0; i < n; ++i) y[i * ldy + r] = lanes[0][i];
  }
}

}  // namespace

extern "C" {

// y = x @ W.T as offload_qmatmul_cuda computes it (the same arguments, host pointers).
// Returns 0, -1 for a type the CUDA kernels lack, -2 for an ``n`` outside 1..MAX_N.
int offload_qmatmul_warp_emulated(int type, const uint8_t* w, int64_t rows, int64_t nblocks,
                                  const float* x, int64_t ldx, int n, float* y, int64_t ldy) {
  if (n < 1 || n > MAX_N) return -2;
#define OFFLOAD_EMULATED_CASE(TYPE)                                                          \
  case offload_gguf::TYPE:                                                                    \
    emulate<offload_gguf::TYPE>(w, rows, nblocks, x, ldx, n, y, ldy);                         \
    break;
  switch (type) {
    OFFLOAD_EMULATED_CASE(Q4_0)
    OFFLOAD_EMULATED_CASE(Q4_1)
    OFFLOAD_EMULATED_CASE(Q5_0)
    OFFLOAD_EMULATED_CASE(Q5_1)
    OFFLOAD_EMULATED_CASE(Q8_0)
    OFFLOAD_EMULATED_CASE(Q4_K)
    OFFLOAD_EMULATED_CASE(Q5_K)
    OFFLOAD_EMULATED_CASE(Q6_K)
    default: return -1;
  }
#undef OFFLOAD_EMULATED_CASE
  return 0;
}

}  // extern "C"
