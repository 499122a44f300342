// A CUDA emulator for tests on machines without a GPU: csrc/*_cuda.cu, rewritten a little by
// tests/_cuda_emulator.py (launch syntax, shared-memory declarations, the op namespace), compiled as
// C++ against this header and run on the CPU.
//
// Every CUDA thread of a block is a fiber (ucontext) on one OS thread. A fiber runs until it reaches
// __syncthreads() or a warp shuffle, then the next one runs; a barrier opens once every live thread
// of its block (or warp) has reached it. Ready fibers run in a seeded random order, so code that
// reads another thread's shared-memory write without a barrier between them sees stale data in
// some runs. Shared memory starts each block filled with 0xFF bytes (NaN floats), as GPU shared
// memory holds garbage. Blocks run one at a time, in a random order too. Each launch starts from the
// same seed (cuda_emu::set_seed), so a failure reproduces whatever ran before. Threads that have
// returned count as arrived at __syncthreads, as on current GPUs. Threads that wait for each other at
// different barriers (a deadlock: part of a warp at __syncthreads, the rest at a shuffle), a shuffle
// with a lane that left, more shared memory than a block gets (48 KB static + dynamic without
// cudaFuncSetAttribute, 227 KB with it), or a launch the GPU would refuse raise an error naming it.
// A thread that overflows its 1 MB stack hits a guard page (a crash, not silent corruption).
// Not modelled: the memory model, out-of-bounds global accesses, __launch_bounds__, timing.
#pragma once

#include <torch/extension.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <random>
#include <sstream>
#include <string>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

// ---- CUDA vocabulary ---------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)
#define C10_CUDA_CHECK(expr) TORCH_CHECK((expr) == cudaSuccess, "cuda emulator: ", #expr, " failed")

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};
struct float2 {
  float x, y;
};
inline float2 make_float2(float x, float y) { return {x, y}; }

typedef struct CUstream_st* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

using __half = c10::Half;
using __nv_bfloat16 = c10::BFloat16;
inline float __half2float(__half v) { return static_cast<float>(v); }
inline float __bfloat162float(__nv_bfloat16 v) { return static_cast<float>(v); }
inline __half __float2half_rn(float v) { return __half(v); }  // both round to nearest even
inline __nv_bfloat16 __float2bfloat16_rn(float v) { return __nv_bfloat16(v); }
inline float rsqrtf(float v) { return 1.f / std::sqrt(v); }

inline uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

namespace c10::cuda {
struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return {}; }
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace c10::cuda

namespace cf_emu {

constexpr int kWarpSize = 32;
constexpr unsigned kMaxThreads = 1024;
constexpr size_t kStaticSharedLimit = 48 * 1024;
constexpr size_t kDefaultDynamicLimit = 48 * 1024;
constexpr int kOptinSharedLimit = 232448;  // an H100's cudaDevAttrMaxSharedMemoryPerBlockOptin
constexpr size_t kStackBytes = 1024 * 1024;  // a GPU allows up to 512 KB of local memory per thread

enum class State { kReady, kBlockBarrier, kWarpBarrier, kDone };

struct Fiber {
  ucontext_t context;
  char* stack = nullptr;
  State state = State::kDone;
  uint3 tid{0, 0, 0};
  uint64_t slot[2] = {0, 0};  // shuffle values, double-buffered by shuffle parity
  unsigned shuffles = 0;
};

struct Emulator {
  std::mutex mutex;
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  int current = -1;
  const std::function<void()>* body = nullptr;
  std::vector<unsigned char> dynamic_shared;
  std::unordered_map<const void*, std::unique_ptr<unsigned char[]>> static_shared;
  size_t static_shared_bytes = 0;
  std::unordered_map<const void*, int> dynamic_limit;  // raised by cudaFuncSetAttribute, per kernel
  size_t dynamic_bytes = 0;  // of the running launch
  size_t shared_limit = 0;   // static + dynamic bytes the running launch may use
  std::string error;
  uint64_t seed = 0;
  std::mt19937_64 rng{0};
  int64_t launches = 0;
};

inline Emulator& emulator() {
  static Emulator e;
  return e;
}

inline void fail(const std::string& message) {  // device side: the first error is raised after the launch
  Emulator& e = emulator();
  if (e.error.empty()) e.error = message;
}

inline Fiber& current_fiber() { return emulator().fibers[emulator().current]; }

inline void yield(State state) {
  Emulator& e = emulator();
  Fiber& f = current_fiber();
  f.state = state;
  swapcontext(&f.context, &e.scheduler);
}

inline void fiber_main(int index) {
  Emulator& e = emulator();
  (*e.body)();
  e.fibers[index].state = State::kDone;
  swapcontext(&e.fibers[index].context, &e.scheduler);  // never resumed
}

inline std::string describe_states(int threads) {
  std::ostringstream out;
  const char* names[] = {"ready", "at __syncthreads", "at a warp shuffle", "exited"};
  for (int i = 0; i < threads; ++i) {
    const Fiber& f = emulator().fibers[i];
    if (i == 0 || f.state != emulator().fibers[i - 1].state) out << " thread " << i << ": ";
    else continue;
    out << names[static_cast<int>(f.state)] << ";";
  }
  return out.str();
}

// Opens the barriers every live thread has reached; false when none can open (a deadlock).
inline bool release(int threads) {
  std::vector<Fiber>& fibers = emulator().fibers;
  bool all_at_block_barrier = true, any_live = false;
  for (int i = 0; i < threads; ++i) {
    if (fibers[i].state == State::kDone) continue;
    any_live = true;
    all_at_block_barrier &= fibers[i].state == State::kBlockBarrier;
  }
  if (!any_live) return true;
  if (all_at_block_barrier) {
    for (int i = 0; i < threads; ++i)
      if (fibers[i].state == State::kBlockBarrier) fibers[i].state = State::kReady;
    return true;
  }
  bool released = false;
  for (int first = 0; first < threads; first += kWarpSize) {
    const int last = std::min(first + kWarpSize, threads);
    bool waiting = false, all = true;
    for (int i = first; i < last; ++i) {
      if (fibers[i].state == State::kDone) continue;
      waiting |= fibers[i].state == State::kWarpBarrier;
      all &= fibers[i].state == State::kWarpBarrier;
    }
    if (!waiting || !all) continue;
    for (int i = first; i < last; ++i)
      if (fibers[i].state == State::kWarpBarrier) fibers[i].state = State::kReady;
    released = true;
  }
  return released;
}

inline void run_block(int threads) {
  Emulator& e = emulator();
  for (int i = 0; i < threads; ++i) {
    Fiber& f = e.fibers[i];
    if (!f.stack) {  // a guard page below each stack: an overflow faults instead of corrupting a neighbour
      const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
      void* mem = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                       -1, 0);
      TORCH_CHECK(mem != MAP_FAILED, "cuda emulator: out of memory for thread stacks");
      mprotect(mem, page, PROT_NONE);
      f.stack = static_cast<char*>(mem) + page;
    }
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack;
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = nullptr;
    makecontext(&f.context, reinterpret_cast<void (*)()>(fiber_main), 1, i);
    f.state = State::kReady;
    f.tid = {i % blockDim.x, (i / blockDim.x) % blockDim.y, i / (blockDim.x * blockDim.y)};
    f.shuffles = 0;
  }
  std::vector<int> order;
  while (true) {
    order.clear();
    for (int i = 0; i < threads; ++i)
      if (e.fibers[i].state == State::kReady) order.push_back(i);
    std::shuffle(order.begin(), order.end(), e.rng);
    for (int i : order) {
      e.current = i;
      threadIdx = e.fibers[i].tid;
      swapcontext(&e.scheduler, &e.fibers[i].context);
    }
    e.current = -1;
    if (std::all_of(e.fibers.begin(), e.fibers.begin() + threads, [](const Fiber& f) { return f.state == State::kDone; }))
      return;
    TORCH_CHECK(release(threads), "cuda emulator: deadlock in block (", blockIdx.x, ", ", blockIdx.y, ", ",
                blockIdx.z, "): a barrier not every thread reaches (divergent __syncthreads or shuffle);",
                describe_states(threads));
  }
}

inline void run(const void* kernel, dim3 grid, dim3 block, size_t dynamic_bytes, const std::function<void()>& body) {
  Emulator& e = emulator();
  const std::lock_guard<std::mutex> lock(e.mutex);
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  TORCH_CHECK(threads >= 1 && threads <= kMaxThreads && block.z <= 64,
              "cuda emulator: invalid block size (", block.x, ", ", block.y, ", ", block.z, ")");
  TORCH_CHECK(grid.x >= 1 && grid.y >= 1 && grid.z >= 1 && grid.x <= 0x7fffffffu && grid.y <= 65535 && grid.z <= 65535,
              "cuda emulator: invalid grid (", grid.x, ", ", grid.y, ", ", grid.z, ")");
  const auto raised = e.dynamic_limit.find(kernel);
  const size_t limit = raised == e.dynamic_limit.end() ? kDefaultDynamicLimit : size_t(raised->second);
  TORCH_CHECK(dynamic_bytes <= limit, "cuda emulator: the launch asks for ", dynamic_bytes,
              " bytes of dynamic shared memory, the kernel allows ", limit,
              " (raise it with cudaFuncSetAttribute(cudaFuncAttributeMaxDynamicSharedMemorySize))");
  e.dynamic_bytes = dynamic_bytes;
  e.shared_limit = raised == e.dynamic_limit.end() ? kDefaultDynamicLimit : size_t(kOptinSharedLimit);
  e.rng.seed(e.seed);
  e.error.clear();
  e.body = &body;
  e.fibers.resize(std::max<size_t>(e.fibers.size(), threads));
  gridDim = grid;
  blockDim = block;
  ++e.launches;
  std::vector<uint3> blocks;  // run in a random order: a block may not rely on another having run
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) blocks.push_back({x, y, z});
  std::shuffle(blocks.begin(), blocks.end(), e.rng);
  for (const uint3& b : blocks) {
    blockIdx = b;
    e.dynamic_shared.assign(dynamic_bytes + 16, 0xFF);
    e.static_shared.clear();
    e.static_shared_bytes = 0;
    run_block(static_cast<int>(threads));
    TORCH_CHECK(e.error.empty(), "cuda emulator: ", e.error, " (block ", b.x, ", ", b.y, ", ", b.z, ")");
  }
}

// kernel<<<grid, block, bytes, stream>>>(args...) is rewritten as launch(kernel, grid, block, bytes, stream)(args...).
template <typename... Params>
struct Launch {
  void (*kernel)(Params...);
  dim3 grid, block;
  size_t bytes;
  template <typename... Args>
  void operator()(Args&&... args) const {
    static_assert(sizeof...(Args) == sizeof...(Params), "kernel launched with the wrong number of arguments");
    const std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
    const std::function<void()> body = [&] { std::apply(kernel, params); };
    run(reinterpret_cast<const void*>(kernel), grid, block, bytes, body);
  }
};

template <typename... Params>
Launch<Params...> launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t bytes = 0, cudaStream_t = nullptr) {
  return {kernel, grid, block, bytes};
}

template <typename T>
T* dynamic_shared() {
  return reinterpret_cast<T*>(emulator().dynamic_shared.data());
}

// A __shared__ variable: one poisoned buffer per block, keyed by the address of a static tag (so each
// template instantiation has its own, as on the GPU).
template <typename T>
T& shared_var(const void* tag) {
  Emulator& e = emulator();
  auto found = e.static_shared.find(tag);
  if (found == e.static_shared.end()) {
    auto buffer = std::make_unique<unsigned char[]>(sizeof(T) + 16);
    std::memset(buffer.get(), 0xFF, sizeof(T) + 16);
    e.static_shared_bytes += sizeof(T);
    if (e.static_shared_bytes > kStaticSharedLimit) fail("more than 48 KB of static shared memory per block");
    if (e.static_shared_bytes + e.dynamic_bytes > e.shared_limit)
      fail(std::to_string(e.static_shared_bytes) + " bytes of static and " + std::to_string(e.dynamic_bytes) +
           " of dynamic shared memory: more than the " + std::to_string(e.shared_limit) + " a block gets" +
           (e.shared_limit == kDefaultDynamicLimit ? " without cudaFuncSetAttribute" : ""));
    found = e.static_shared.emplace(tag, std::move(buffer)).first;
  }
  void* p = found->second.get();
  size_t space = sizeof(T) + 16;
  return *reinterpret_cast<T*>(std::align(alignof(T), sizeof(T), p, space));
}

template <typename T, typename SourceLane>
T exchange(unsigned mask, T value, SourceLane source_lane) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable<T>::value, "shuffle of a large type");
  Emulator& e = emulator();
  const int me = e.current;
  const int lane = me % kWarpSize, warp_first = me - lane;
  if (mask != 0xffffffffu) fail("a shuffle with a partial mask (not modelled)");
  const unsigned k = e.fibers[me].shuffles++;
  std::memcpy(&e.fibers[me].slot[k & 1], &value, sizeof(T));
  yield(State::kWarpBarrier);
  const int src_lane = source_lane(lane);
  const int src = warp_first + src_lane;
  const int threads = static_cast<int>(blockDim.x * blockDim.y * blockDim.z);
  if (src_lane < 0 || src_lane >= kWarpSize || src >= threads || e.fibers[src].shuffles < k + 1) {
    fail("a shuffle reads lane " + std::to_string(src_lane) + ", which did not take part");
    return value;
  }
  T out;
  std::memcpy(&out, &e.fibers[src].slot[k & 1], sizeof(T));
  return out;
}

}  // namespace cf_emu

inline void __syncthreads() { cf_emu::yield(cf_emu::State::kBlockBarrier); }

// Source lanes as the CUDA guide defines them: a lane may read an earlier group of `width` lanes but
// gets its own value back for a later one (xor), past the end of its group (down).
template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
  return cf_emu::exchange(mask, value, [=](int lane) {
    const int source = lane ^ lane_mask;
    return source >= (lane & ~(width - 1)) + width ? lane : source;
  });
}

template <typename T>
T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = 32) {
  return cf_emu::exchange(mask, value, [=](int lane) {
    const int in_segment = (lane & (width - 1)) + static_cast<int>(delta);
    return in_segment < width ? lane + static_cast<int>(delta) : lane;
  });
}

template <typename T>
T __shfl_sync(unsigned mask, T value, int source, int width = 32) {
  return cf_emu::exchange(mask, value, [=](int lane) { return (lane & ~(width - 1)) + (source & (width - 1)); });
}

template <typename Kernel>
cudaError_t cudaFuncSetAttribute(Kernel kernel, cudaFuncAttribute attribute, int value) {
  if (attribute != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || value > cf_emu::kOptinSharedLimit)
    return cudaErrorInvalidValue;
  const std::lock_guard<std::mutex> lock(cf_emu::emulator().mutex);
  cf_emu::emulator().dynamic_limit[reinterpret_cast<const void*>(kernel)] = value;
  return cudaSuccess;
}

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int /*device*/) {
  if (attribute != cudaDevAttrMaxSharedMemoryPerBlockOptin) return cudaErrorInvalidValue;
  *value = cf_emu::kOptinSharedLimit;
  return cudaSuccess;
}
