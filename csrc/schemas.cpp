// The one schema of every kernel. Implementations register with TORCH_LIBRARY_IMPL(council_fast, CPU, m)
// (the *_cpu.cpp files) and TORCH_LIBRARY_IMPL(council_fast, CUDA, m) (the *_cuda.cu files); the
// dispatcher picks by the tensors' device.
//
// A namespace may be defined by one library only, so this file is compiled into exactly one module:
// the CPU one, which every machine can build and which the CUDA module loads first (see
// council_fast/ops/extension.py). Compiling it into both would register every op twice; defining the
// schemas from Python would leave the C++ without them.
//
// The kernels write into the output tensors they are given ("_out"); Python allocates those (see
// council_fast/ops/registry.py). An argument only one device's kernel uses is part of the one schema,
// and the other ignores it: the CUDA AdaIN splits planes above split_threshold elements over several
// blocks, and the CUDA decoder-tail backward works through at most max_chunk pixels at a time.
#include <torch/library.h>

TORCH_LIBRARY(council_fast, m) {
  m.def("adain_forward_out(Tensor x, Tensor weight, Tensor bias, Tensor? residual, bool relu, float eps, "
        "int split_threshold, Tensor(a!) y, Tensor(b!) mean, Tensor(c!) rstd) -> ()");
  m.def("adain_backward_out(Tensor dy, Tensor x, Tensor weight, Tensor bias, Tensor mean, Tensor rstd, bool relu, "
        "int split_threshold, Tensor(a!) dx, Tensor(b!) dweight, Tensor(c!) dbias) -> ()");
  m.def("decoder_tail_forward_out(Tensor h, Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor w3, Tensor b3, "
        "Tensor images, int num_masks, Tensor(a!) out, Tensor(b!) masks) -> ()");
  // Returns the six weight and bias gradients (w1, b1, w2, b2, w3, b3).
  m.def("decoder_tail_backward_out(Tensor grad_out, Tensor? grad_masks, Tensor h, Tensor w1, Tensor b1, Tensor w2, "
        "Tensor b2, Tensor w3, Tensor b3, Tensor images, int num_masks, int max_chunk, Tensor(a!) grad_h, "
        "Tensor(b!) grad_images) -> Tensor[]");
  // Winograd F(4x4, 3x3) on the CPU (no CUDA implementation: cuDNN covers GPUs).
  m.def("winograd_input_transform(Tensor x, Tensor(a!) v) -> ()");
  m.def("winograd_output_transform(Tensor m, Tensor? bias, Tensor(a!) y) -> ()");
  m.def("winograd_gemm(Tensor u, Tensor v, Tensor(a!) m) -> ()");
}
