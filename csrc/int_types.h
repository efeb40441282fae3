// Fixed-width integer types for every build of the kernels: the C++ compiler, nvcc, and NVRTC
// (which has no C library headers).
#pragma once
#if defined(__CUDACC_RTC__)
typedef unsigned char uint8_t;
typedef signed char int8_t;
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
typedef long long int64_t;
typedef unsigned long long uint64_t;
#else
#include <cstdint>
#endif
