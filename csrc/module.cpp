// The Python module that torch's extension tooling (pybind11) imports. Kernels live in the other
// files of this folder and register themselves as torch operators with TORCH_LIBRARY_FRAGMENT,
// so loading this module is all it takes to make them callable as torch.ops.<namespace>.<name>.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "council-fast kernels (registered as torch operators on import)";
}
