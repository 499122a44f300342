// Kernels that check the CUDA emulator itself (tests/test_cuda_emulator.py): each models one thing
// the emulator claims to catch or to get right. Written as CUDA and rewritten like csrc/*_cuda.cu.
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>

namespace {

// Thread 0 writes a shared value that every thread reads, with or without a barrier in between.
__global__ void broadcast_kernel(float* out, bool barrier) {
  __shared__ float value;
  if (threadIdx.x == 0) value = 42.f;
  if (barrier) __syncthreads();
  out[threadIdx.x] = value;
}

// Every lane gets its warp's sum (xor butterfly); lane 0 also gets it from a shift-down tree.
__global__ void warp_sum_kernel(float* xor_sums, float* down_sums) {
  const float v = static_cast<float>(threadIdx.x);
  float a = v, b = v;
  for (int offset = 16; offset > 0; offset >>= 1) {
    a += __shfl_xor_sync(0xffffffffu, a, offset);
    b += __shfl_down_sync(0xffffffffu, b, offset);
  }
  xor_sums[threadIdx.x] = a;
  down_sums[threadIdx.x] = b;
}

// Half a warp waits at __syncthreads, the other half at a shuffle with it: neither can go on.
__global__ void divergent_barrier_kernel(float* out) {
  float v = 1.f;
  if (threadIdx.x < 16) __syncthreads();
  else v = __shfl_xor_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

__global__ void exited_lane_kernel(float* out) {
  if (threadIdx.x == 5) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
}

// Block x sums its slice through dynamic shared memory.
__global__ void dynamic_shared_kernel(const float* in, float* out, int n) {
  extern __shared__ float buffer[];
  for (int i = threadIdx.x; i < n; i += blockDim.x) buffer[i] = in[blockIdx.x * n + i];
  __syncthreads();
  if (threadIdx.x == 0) {
    float sum = 0.f;
    for (int i = 0; i < n; ++i) sum += buffer[i];
    out[blockIdx.x] = sum;
  }
}

// One shuffle of each lane's own index: kind 0 xor, 1 down, 2 from a given lane.
__global__ void shuffle_kernel(float* out, int kind, int arg, int width) {
  const float v = static_cast<float>(threadIdx.x);
  if (kind == 0) out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, v, arg, width);
  else if (kind == 1) out[threadIdx.x] = __shfl_down_sync(0xffffffffu, v, static_cast<unsigned>(arg), width);
  else out[threadIdx.x] = __shfl_sync(0xffffffffu, v, arg, width);
}

// 16 KB of static shared memory beside the dynamic buffer.
__global__ void mixed_shared_kernel(float* out) {
  __shared__ float table[4096];
  extern __shared__ float extra[];
  table[threadIdx.x] = 1.f;
  extra[threadIdx.x] = 2.f;
  __syncthreads();
  out[threadIdx.x] = table[threadIdx.x] + extra[threadIdx.x];
}

__global__ void index_kernel(float* out) {
  const int64_t i = (blockIdx.y * gridDim.x + blockIdx.x) * static_cast<int64_t>(blockDim.x * blockDim.y) +
                    threadIdx.y * blockDim.x + threadIdx.x;
  out[i] = static_cast<float>(i);
}

void broadcast(at::Tensor out, bool barrier) {
  broadcast_kernel<<<1, out.numel(), 0, c10::cuda::getCurrentCUDAStream()>>>(out.data_ptr<float>(), barrier);
}

void warp_sums(at::Tensor xor_sums, at::Tensor down_sums) {
  warp_sum_kernel<<<1, xor_sums.numel()>>>(xor_sums.data_ptr<float>(), down_sums.data_ptr<float>());
}

void divergent_barrier(at::Tensor out) { divergent_barrier_kernel<<<1, out.numel()>>>(out.data_ptr<float>()); }

void exited_lane(at::Tensor out) { exited_lane_kernel<<<1, out.numel()>>>(out.data_ptr<float>()); }

void dynamic_shared(at::Tensor in, at::Tensor out, bool raise_limit) {
  const int n = static_cast<int>(in.size(1));
  const size_t bytes = sizeof(float) * n;
  if (raise_limit)
    C10_CUDA_CHECK(cudaFuncSetAttribute(dynamic_shared_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
  dynamic_shared_kernel<<<in.size(0), 128, bytes>>>(in.data_ptr<float>(), out.data_ptr<float>(), n);
}

void shuffle(at::Tensor out, int64_t kind, int64_t arg, int64_t width) {
  shuffle_kernel<<<1, out.numel()>>>(out.data_ptr<float>(), static_cast<int>(kind), static_cast<int>(arg),
                                     static_cast<int>(width));
}

void mixed_shared(at::Tensor out, int64_t dynamic_bytes) {
  mixed_shared_kernel<<<1, out.numel(), static_cast<size_t>(dynamic_bytes)>>>(out.data_ptr<float>());
}

void indices(at::Tensor out, int64_t grid_x, int64_t grid_y, int64_t block_x, int64_t block_y) {
  index_kernel<<<dim3(grid_x, grid_y), dim3(block_x, block_y)>>>(out.data_ptr<float>());
}

}  // namespace

TORCH_LIBRARY(cuda_emu_selftest, m) {
  m.def("broadcast(Tensor(a!) out, bool barrier) -> ()", &broadcast);
  m.def("warp_sums(Tensor(a!) xor_sums, Tensor(b!) down_sums) -> ()", &warp_sums);
  m.def("divergent_barrier(Tensor(a!) out) -> ()", &divergent_barrier);
  m.def("exited_lane(Tensor(a!) out) -> ()", &exited_lane);
  m.def("dynamic_shared(Tensor input, Tensor(a!) out, bool raise_limit) -> ()", &dynamic_shared);
  m.def("indices(Tensor(a!) out, int grid_x, int grid_y, int block_x, int block_y) -> ()", &indices);
  m.def("shuffle(Tensor(a!) out, int kind, int arg, int width) -> ()", &shuffle);
  m.def("mixed_shared(Tensor(a!) out, int dynamic_bytes) -> ()", &mixed_shared);
}
