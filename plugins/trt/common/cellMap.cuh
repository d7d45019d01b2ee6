// The cell-map kernel shared by both plugins' .cu files (see tile_index.h: last tile index wins).
#pragma once

#include "common/tile_index.h"

namespace ssic {
namespace trt {

template <typename I>
__global__ void fillCellMapKernel(TileGrid g, const I* idx, int64_t count, int32_t* map) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= count) return;
  const int64_t cell = cell_of_tile(g, idx, i);
  if (cell >= 0) atomicMax(map + cell, static_cast<int32_t>(i));
}

// map := -1 everywhere, then the last tile index per cell. Returns a cudaError_t value.
template <typename I>
inline int buildCellMap(const TileGrid& g, const I* idx, int64_t count, int32_t* map, cudaStream_t stream) {
  cudaError_t err = cudaMemsetAsync(map, 0xFF, static_cast<size_t>(grid_cells(g)) * sizeof(int32_t), stream);
  if (err != cudaSuccess) return static_cast<int>(err);
  if (count > 0) {
    const int threads = 256;
    const unsigned blocks = static_cast<unsigned>((count + threads - 1) / threads);
    fillCellMapKernel<I><<<blocks, threads, 0, stream>>>(g, idx, count, map);
  }
  return static_cast<int>(cudaGetLastError());
}

inline unsigned gridFor(int64_t total, int threads) {
  const int64_t blocks = (total + threads - 1) / threads;
  return static_cast<unsigned>(blocks < 65535 * 32 ? blocks : 65535 * 32);  // grid-stride loops cover the rest
}

}  // namespace trt
}  // namespace ssic
