// Python entry of dms._C. Kept apart from the kernels so the CMake op library has no
// Python in it (docs/building.md #7); importing the module runs the static op registration.
#include <pybind11/pybind11.h>

#ifndef DMS_WITH_CUDA
#define DMS_WITH_CUDA 0
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "dms operator library; the operators live in torch.ops.dms";
  m.attr("cuda_compiled") = static_cast<bool>(DMS_WITH_CUDA);
}
