// GGUF block dequantization on a CUDA GPU: the block decoders of gguf_blocks.h (the CPU
// decoder's scalar path), one kernel per type.
//
// Built two ways (offload/kernels/cuda.py): at run time by NVRTC through CuPy (no CUDA toolkit
// needed; the kernels are looked up by their C names), or by nvcc into a shared library whose
// C launcher, offload_gguf_dequant_cuda, ctypes calls. Either way with --fmad=false: a fused
// multiply-add would round otherwise than the gguf package's numpy reference.
//
// A thread decodes whole blocks (grid-stride): 34 stored bytes in, 128 bytes out for the
// 32-element types, 1 KiB out for the K types. Reads and writes are not coalesced across a
// warp; the decode moves a slot's worth (tens of MB) per Unit, far below the copy that brings
// the stored bytes over the host link.
#include "gguf_blocks.h"

#define OFFLOAD_GGUF_KERNEL(NAME, BYTES, ELEMS)                                            \
  extern "C" __global__ void offload_gguf_##NAME(const uint8_t* __restrict__ src,          \
                                                 float* __restrict__ dst, int64_t nblocks) { \
    const int64_t step = (int64_t)gridDim.x * blockDim.x;                                  \
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < nblocks; i += step) \
      offload_gguf::NAME(src + i * BYTES, dst + i * ELEMS);                                \
  }

OFFLOAD_GGUF_KERNEL(q4_0, 18, 32)
OFFLOAD_GGUF_KERNEL(q4_1, 20, 32)
OFFLOAD_GGUF_KERNEL(q5_0, 22, 32)
OFFLOAD_GGUF_KERNEL(q5_1, 24, 32)
OFFLOAD_GGUF_KERNEL(q8_0, 34, 32)
OFFLOAD_GGUF_KERNEL(q2_k, 84, 256)
OFFLOAD_GGUF_KERNEL(q3_k, 110, 256)
OFFLOAD_GGUF_KERNEL(q4_k, 144, 256)
OFFLOAD_GGUF_KERNEL(q5_k, 176, 256)
OFFLOAD_GGUF_KERNEL(q6_k, 210, 256)

#if !defined(__CUDACC_RTC__)
#include <cuda_runtime.h>

extern "C" {

// Launch the decode of ``nblocks`` blocks of ggml type ``type`` from ``src`` into ``dst``
// (device pointers, float32) on ``stream`` (a cudaStream_t; 0 for the legacy stream). Returns
// a cudaError_t, or -1 for a type this file lacks (nothing launched).
int offload_gguf_dequant_cuda(int type, const uint8_t* src, float* dst, int64_t nblocks,
                              void* stream) {
  if (nblocks <= 0) return 0;
  const int threads = 256;
  int64_t grid = (nblocks + threads - 1) / threads;
  if (grid > 65535) grid = 65535;   // grid-stride beyond that
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const unsigned g = (unsigned)grid;
  switch (type) {
    case offload_gguf::Q4_0: offload_gguf_q4_0<<<g, threads, 0, s>>>(src, dst, nblocks); break;
    case offload_gguf::Q4_1: offload_gguf_q4_1<<<g, threads, 0, s>>>(src, dst, nblocks); break;
    case offload_gguf::Q5_0: offload_gguf_q5_0<<<g, threads, 0, s>>>(src, dst, nblocks); break;
    case offload_gguf::Q5_1: offload_gguf_q5_1<<<g, threads, 0, s>>>(src, dst, nblocks); break;
    case offload_gguf::Q8_0: offload_gguf_q8_0<<<g, threads, 0, s>>>(src, dst, nblocks); break;
    case offload_gguf::Q2_K: offload_gguf_q2_k<<<g, threads, 0, s>>>(src, dst, nblocks); break;
    case offload_gguf::Q3_K: offload_gguf_q3_k<<<g, threads, 0, s>>>(src, dst, nblocks); break;
    case offload_gguf::Q4_K: offload_gguf_q4_k<<<g, threads, 0, s>>>(src, dst, nblocks); break;
    case offload_gguf::Q5_K: offload_gguf_q5_k<<<g, threads, 0, s>>>(src, dst, nblocks); break;
    case offload_gguf::Q6_K: offload_gguf_q6_k<<<g, threads, 0, s>>>(src, dst, nblocks); break;
    default: return -1;
  }
  return (int)cudaGetLastError();
}

}  // extern "C"
#endif
