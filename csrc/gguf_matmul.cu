// The fused GGUF matmul on a CUDA GPU (compute="fast"): y = x @ W.T for up to MAX_N rows of
// float32 activations, W multiplied straight from its GGUF blocks, never expanded in memory.
// One warp per output row (grid-stride over rows), the lanes' work as gguf_matmul_warp.h says;
// its CPU emulation (gguf_matmul_warp_cpu.cpp) computes the same bits.
//
// Built as gguf_dequant.cu is (offload/kernels/cuda.py): NVRTC through CuPy, the kernels looked
// up by their C names, or nvcc into a library whose C launcher ctypes calls; --fmad=false
// either way (the emulation's bits depend on it).
#include "gguf_matmul_warp.h"

namespace offload_gguf_mm {

template <int T>
__device__ __forceinline__ void warp_rows(const uint8_t* __restrict__ w, int64_t rows,
                                          int64_t nblocks, const float* __restrict__ x,
                                          int64_t ldx, int n, float* __restrict__ y,
                                          int64_t ldy) {
  const int lane = threadIdx.x & (LANES - 1);
  const int64_t warps = ((int64_t)gridDim.x * blockDim.x) / LANES;
  // every lane of a warp takes the same rows: the shuffles below see the whole warp
  for (int64_t r = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / LANES; r < rows;
       r += warps) {
    float acc[MAX_N];
    lane_partial<T>(w + r * nblocks * Block<T>::bytes, nblocks, x, ldx, n, lane, acc);
    for (int offset = FIRST_OFFSET; offset > 0; offset >>= 1)
      for (int i = 0; i < MAX_N; ++i) acc[i] += __shfl_xor_sync(0xffffffffu, acc[i], offset);
    if (lane == 0)
      for (int i = 0; i < MAX_N; ++i)
        if (i < n) y[i * ldy + r] = acc[i];
  }
}

}  // namespace offload_gguf_mm

#define OFFLOAD_QMATMUL_KERNEL(NAME, TYPE)                                                    \
  extern "C" __global__ void offload_qmatmul_##NAME(                                          \
      const uint8_t* __restrict__ w, int64_t rows, int64_t nblocks,                           \
      const float* __restrict__ x, int64_t ldx, int n, float* __restrict__ y, int64_t ldy) {  \
    offload_gguf_mm::warp_rows<offload_gguf::TYPE>(w, rows, nblocks, x, ldx, n, y, ldy);      \
  }

OFFLOAD_QMATMUL_KERNEL(q4_0, Q4_0)
OFFLOAD_QMATMUL_KERNEL(q4_1, Q4_1)
OFFLOAD_QMATMUL_KERNEL(q5_0, Q5_0)
OFFLOAD_QMATMUL_KERNEL(q5_1, Q5_1)
OFFLOAD_QMATMUL_KERNEL(q8_0, Q8_0)
OFFLOAD_QMATMUL_KERNEL(q4_k, Q4_K)
OFFLOAD_QMATMUL_KERNEL(q5_k, Q5_K)
OFFLOAD_QMATMUL_KERNEL(q6_k, Q6_K)

#if !defined(__CUDACC_RTC__)
#include <cuda_runtime.h>

extern "C" {

// Launch y = x @ W.T on ``stream`` (a cudaStream_t; 0 for the legacy stream): W is ``rows``
// rows of ``nblocks`` blocks of ggml type ``type``, x is ``n`` (1..MAX_N) rows of float32 with
// stride ``ldx``, y ``n`` rows with stride ``ldy`` (device pointers). Returns a cudaError_t,
// -1 for a type this file lacks, -2 for an ``n`` out of range (nothing launched).
int offload_qmatmul_cuda(int type, const uint8_t* w, int64_t rows, int64_t nblocks,
                         const float* x, int64_t ldx, int n, float* y, int64_t ldy,
                         void* stream) {
  if (n < 1 || n > offload_gguf_mm::MAX_N) return -2;
  if (rows <= 0) return 0;
  const int threads = 256;   // 8 warps: 8 rows a block
  int64_t grid = (rows + threads / 32 - 1) / (threads / 32);
  if (grid > 65535) grid = 65535;   // grid-stride beyond that
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const unsigned g = (unsigned)grid;
#define OFFLOAD_QMATMUL_CASE(NAME, TYPE)                                                      \
  case offload_gguf::TYPE:                                                                    \
    offload_qmatmul_##NAME<<<g, threads, 0, s>>>(w, rows, nblocks, x, ldx, n, y, ldy);        \
    break;
  switch (type) {
    OFFLOAD_QMATMUL_CASE(q4_0, Q4_0)
    OFFLOAD_QMATMUL_CASE(q4_1, Q4_1)
    OFFLOAD_QMATMUL_CASE(q5_0, Q5_0)
    OFFLOAD_QMATMUL_CASE(q5_1, Q5_1)
    OFFLOAD_QMATMUL_CASE(q8_0, Q8_0)
    OFFLOAD_QMATMUL_CASE(q4_k, Q4_K)
    OFFLOAD_QMATMUL_CASE(q5_k, Q5_K)
    OFFLOAD_QMATMUL_CASE(q6_k, Q6_K)
    default: return -1;
  }
#undef OFFLOAD_QMATMUL_CASE
  return (int)cudaGetLastError();
}

}  // extern "C"
#endif
