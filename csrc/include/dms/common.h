// Shared by the CPU (.cpp) and CUDA (.cu) kernels: per-element logic is written once as
// DMS_HOST_DEVICE inline functions so the CPU tests exercise the code the GPU runs.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define DMS_HOST_DEVICE __host__ __device__
#else
#define DMS_HOST_DEVICE
#endif
