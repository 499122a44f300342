// The Python module that torch's extension tooling (pybind11) imports. Kernels live in the other
// files of this folder and register themselves as implementations of the schemas in schemas.cpp
// (TORCH_LIBRARY_IMPL), so loading this module is all it takes to make them callable as
// torch.ops.council_fast.<name>.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "council-fast kernels (registered as torch operators on import)";
}
