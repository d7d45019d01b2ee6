// A C entry point per TensorRT-plugin kernel, for plugins/trt/gpu_check/check_kernels.py: host arrays
// in, host arrays out, so the check needs only NumPy and ctypes on the GPU host. Each call copies its
// inputs to the device, runs the same launcher the plugin's enqueue runs (launchTileGather /
// launchTileScatter), copies the result back and, when iters > 0, times that many further launches
// with CUDA events (mean milliseconds per launch, cell map included; copies excluded).
//
// Build (nvcc; no TensorRT needed):
//   nvcc -O3 -std=c++17 -shared -Xcompiler -fPIC -I plugins/trt -I plugins/common
//        plugins/trt/gpu_check/kernel_api.cu plugins/trt/tileGatherPlugin/tileGatherKernel.cu
//        plugins/trt/tileScatterPlugin/tileScatterKernel.cu -o libssic_trt_kernel_api.so
// Every function returns 0 or a cudaError_t value (nonzero); ssic_error_string names it.
#include <cuda_runtime_api.h>
#include <stdint.h>

#include <vector>

#include "common/cellMap.cuh"
#include "common/tileKernels.h"

namespace {

using ssic::trt::GatherParams;
using ssic::trt::ScatterParams;

// The first plugin kernel (one thread per cols element, common/tile_index.h's gather_element), kept
// here as the baseline that check_kernels.py times the plugin's warp-per-tap kernel against.
template <typename I>
__global__ void elementGatherKernel(GatherParams p, const float* tiles, const float* cache, const int32_t* map,
                                    const I* dst_idx, const float* scale, const float* shift, float* cols) {
  const int64_t width = p.kernel * p.kernel * p.c;
  const int64_t total = p.n * p.tile * p.tile * width;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    cols[e] = ssic::trt::gather_element(p, tiles, cache, map, dst_idx, scale, shift, e / width, e % width);
  }
}

template <typename I>
int launchElementGather(const GatherParams& p, const float* tiles, const float* cache, const I* src_idx,
                        const I* dst_idx, const float* scale, const float* shift, float* cols, void* workspace) {
  auto* map = static_cast<int32_t*>(workspace);
  const int err = ssic::trt::buildCellMap(ssic::make_grid(p.hs, p.ws, p.src_tile), src_idx, p.m, map, nullptr);
  if (err != 0) return err;
  const int64_t total = p.n * p.tile * p.tile * p.kernel * p.kernel * p.c;
  if (total == 0) return 0;
  elementGatherKernel<I><<<ssic::trt::gridFor(total, 256), 256>>>(p, tiles, cache, map, dst_idx, scale, shift, cols);
  return static_cast<int>(cudaGetLastError());
}

// Device buffers freed at scope exit; the first failing call's code is kept.
struct DeviceBuffers {
  std::vector<void*> ptrs;
  int err = 0;
  void* put(const void* host, size_t bytes) {
    if (err != 0 || host == nullptr) return nullptr;
    void* d = alloc(bytes);
    if (d != nullptr && bytes > 0) keep(cudaMemcpy(d, host, bytes, cudaMemcpyHostToDevice));
    return d;
  }
  void* alloc(size_t bytes) {
    if (err != 0) return nullptr;
    void* d = nullptr;
    keep(cudaMalloc(&d, bytes < 4 ? 4 : bytes));
    if (err == 0) ptrs.push_back(d);
    return err == 0 ? d : nullptr;
  }
  void keep(cudaError_t e) {
    if (err == 0 && e != cudaSuccess) err = static_cast<int>(e);
  }
  void keep(int e) {
    if (err == 0 && e != 0) err = e;
  }
  ~DeviceBuffers() {
    for (void* p : ptrs) cudaFree(p);
  }
};

// Runs `launch` once, then `iters` times between two events; writes the mean into *ms.
template <typename F>
int run_and_time(DeviceBuffers& b, F launch, int iters, float* ms) {
  b.keep(launch());
  b.keep(cudaDeviceSynchronize());
  if (b.err != 0 || iters <= 0) return b.err;
  cudaEvent_t start, stop;
  b.keep(cudaEventCreate(&start));
  b.keep(cudaEventCreate(&stop));
  if (b.err != 0) return b.err;
  b.keep(cudaEventRecord(start));
  for (int i = 0; i < iters && b.err == 0; ++i) b.keep(launch());
  b.keep(cudaEventRecord(stop));
  b.keep(cudaEventSynchronize(stop));
  float total = 0.f;
  b.keep(cudaEventElapsedTime(&total, start, stop));
  if (ms != nullptr) *ms = total / static_cast<float>(iters);
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  return b.err;
}

}  // namespace

extern "C" {

// geom (15 int64): hs ws c src_tile tile kernel stride pad_top pad_left upsample activation layout m n
// pad_mode. tiles [m*ts*ts, C]; cache [Hs, Ws, C] (layout 0) or [1, C, Hs, Ws] (layout 1); src_idx
// [m, 2], dst_idx [n, 2] (int64 when idx64, else int32); scale/shift [C] or null; cols out
// [n*t*t, k*k*C]. variant 0 runs the plugin's launcher, 1 the per-element baseline above.
int ssic_tile_gather(const int64_t* geom, float alpha, int idx64, int variant, const float* tiles, const float* cache,
                     const void* src_idx, const void* dst_idx, const float* scale, const float* shift, float* cols,
                     int iters, float* ms) {
  GatherParams p{geom[0], geom[1], geom[2], geom[3], geom[4], geom[5], geom[6], geom[7], geom[8], geom[9],
                 static_cast<int32_t>(geom[10]), alpha, static_cast<int32_t>(geom[11]), geom[12], geom[13],
                 geom[14]};
  const size_t isz = idx64 ? sizeof(int64_t) : sizeof(int32_t);
  const size_t n_tiles = static_cast<size_t>(p.m * p.src_tile * p.src_tile * p.c);
  const size_t n_cache = static_cast<size_t>(p.hs * p.ws * p.c);
  const size_t n_cols = static_cast<size_t>(p.n * p.tile * p.tile * p.kernel * p.kernel * p.c);
  DeviceBuffers b;
  auto* d_tiles = static_cast<float*>(b.put(tiles, n_tiles * sizeof(float)));
  auto* d_cache = static_cast<float*>(b.put(cache, n_cache * sizeof(float)));
  void* d_src = b.put(src_idx, 2 * p.m * isz);
  void* d_dst = b.put(dst_idx, 2 * p.n * isz);
  auto* d_scale = static_cast<float*>(b.put(scale, p.c * sizeof(float)));
  auto* d_shift = static_cast<float*>(b.put(shift, p.c * sizeof(float)));
  auto* d_cols = static_cast<float*>(b.alloc(n_cols * sizeof(float)));
  void* d_ws = b.alloc(ssic::trt::cell_map_bytes(p.hs, p.ws, p.src_tile));
  if (b.err != 0) return b.err;
  const auto* s64 = static_cast<const int64_t*>(d_src);
  const auto* t64 = static_cast<const int64_t*>(d_dst);
  const auto* s32 = static_cast<const int32_t*>(d_src);
  const auto* t32 = static_cast<const int32_t*>(d_dst);
  auto launch = [&]() {
    if (variant == 1) {
      return idx64 ? launchElementGather(p, d_tiles, d_cache, s64, t64, d_scale, d_shift, d_cols, d_ws)
                   : launchElementGather(p, d_tiles, d_cache, s32, t32, d_scale, d_shift, d_cols, d_ws);
    }
    return idx64 ? ssic::trt::launchTileGather(p, d_tiles, d_cache, s64, t64, d_scale, d_shift, d_cols, d_ws, nullptr)
                 : ssic::trt::launchTileGather(p, d_tiles, d_cache, s32, t32, d_scale, d_shift, d_cols, d_ws, nullptr);
  };
  if (run_and_time(b, launch, 0, nullptr) != 0) return b.err;
  b.keep(cudaMemcpy(cols, d_cols, n_cols * sizeof(float), cudaMemcpyDeviceToHost));
  if (b.err == 0 && iters > 0) run_and_time(b, launch, iters, ms);
  return b.err;
}

// geom (6 int64): h w c tile activation n. tiles [n*t*t, C]; cache [1, C, H, W]; idx [n, 2];
// residual [n*t*t, C] or null; out [1, C, H, W].
int ssic_tile_scatter(const int64_t* geom, float alpha, int idx64, const float* tiles, const float* cache,
                      const void* idx, const float* residual, float* out, int iters, float* ms) {
  ScatterParams p{geom[0], geom[1], geom[2], geom[3], static_cast<int32_t>(geom[4]), alpha, geom[5]};
  const size_t isz = idx64 ? sizeof(int64_t) : sizeof(int32_t);
  const size_t n_tiles = static_cast<size_t>(p.n * p.tile * p.tile * p.c);
  const size_t n_img = static_cast<size_t>(p.c * p.h * p.w);
  DeviceBuffers b;
  auto* d_tiles = static_cast<float*>(b.put(tiles, n_tiles * sizeof(float)));
  auto* d_cache = static_cast<float*>(b.put(cache, n_img * sizeof(float)));
  void* d_idx = b.put(idx, 2 * p.n * isz);
  auto* d_res = static_cast<float*>(b.put(residual, n_tiles * sizeof(float)));
  auto* d_out = static_cast<float*>(b.alloc(n_img * sizeof(float)));
  void* d_ws = b.alloc(ssic::trt::cell_map_bytes(p.h, p.w, p.tile));
  if (b.err != 0) return b.err;
  auto launch = [&]() {
    return idx64 ? ssic::trt::launchTileScatter<int64_t>(p, d_tiles, d_cache, static_cast<const int64_t*>(d_idx),
                                                          d_res, d_out, d_ws, nullptr)
                 : ssic::trt::launchTileScatter<int32_t>(p, d_tiles, d_cache, static_cast<const int32_t*>(d_idx),
                                                          d_res, d_out, d_ws, nullptr);
  };
  if (run_and_time(b, launch, 0, nullptr) != 0) return b.err;
  b.keep(cudaMemcpy(out, d_out, n_img * sizeof(float), cudaMemcpyDeviceToHost));
  if (b.err == 0 && iters > 0) run_and_time(b, launch, iters, ms);
  return b.err;
}

const char* ssic_error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }

// Name and compute capability of device 0, or the error.
int ssic_device(char* name, int len, int* major, int* minor) {
  cudaDeviceProp prop;
  const cudaError_t e = cudaGetDeviceProperties(&prop, 0);
  if (e != cudaSuccess) return static_cast<int>(e);
  int i = 0;
  for (; i + 1 < len && prop.name[i] != '\0'; ++i) name[i] = prop.name[i];
  if (len > 0) name[i] = '\0';
  *major = prop.major;
  *minor = prop.minor;
  return 0;
}

}  // extern "C"
