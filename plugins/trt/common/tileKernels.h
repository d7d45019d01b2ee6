// Launchers of the ssic plugins' CUDA kernels (tileGatherKernel.cu, tileScatterKernel.cu). Plain C++
// declarations: the plugin .cpp files include this without CUDA device code. Return a cudaError_t
// value as int (0 = success).
#pragma once

#include <cuda_runtime_api.h>
#include <stddef.h>
#include <stdint.h>

#include "common/tile_index.h"

namespace ssic {
namespace trt {

// Bytes of workspace a kernel needs for the cell map of a grid (int32 per cell, 256-byte aligned).
inline size_t cell_map_bytes(int64_t height, int64_t width, int64_t tile) {
  const size_t cells = static_cast<size_t>(tiles_along(height, tile) * tiles_along(width, tile));
  return (cells * sizeof(int32_t) + 255) / 256 * 256;
}

// I is int32_t or int64_t (the tile-index tensors' type). scale/shift may be null.
template <typename I>
int launchTileGather(const GatherParams& p, const float* tiles, const float* cache, const I* src_idx,
                     const I* dst_idx, const float* scale, const float* shift, float* cols, void* workspace,
                     cudaStream_t stream);

// out must not alias cache; residual may be null.
template <typename I>
int launchTileScatter(const ScatterParams& p, const float* tiles, const float* cache, const I* idx,
                      const float* residual, float* out, void* workspace, cudaStream_t stream);

}  // namespace trt
}  // namespace ssic
