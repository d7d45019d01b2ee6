// CUDA kernel of the TileScatter plugin: out = cache, then every kept tile's in-image pixels
// (math in common/tile_index.h, shared with the CPU check).
#include "common/cellMap.cuh"
#include "common/tileKernels.h"

namespace ssic {
namespace trt {

template <typename I>
__global__ void tileScatterKernel(ScatterParams p, const float* __restrict__ tiles, const float* __restrict__ residual,
                                  const int32_t* __restrict__ map, const I* __restrict__ idx, float* __restrict__ out) {
  const int64_t total = p.n * p.tile * p.tile * p.c;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    scatter_element(p, tiles, residual, map, idx, out, e);
  }
}

template <typename I>
int launchTileScatter(const ScatterParams& p, const float* tiles, const float* cache, const I* idx,
                      const float* residual, float* out, void* workspace, cudaStream_t stream) {
  cudaError_t copy = cudaMemcpyAsync(out, cache, static_cast<size_t>(p.c * p.h * p.w) * sizeof(float),
                                     cudaMemcpyDeviceToDevice, stream);
  if (copy != cudaSuccess) return static_cast<int>(copy);
  auto* map = static_cast<int32_t*>(workspace);
  const int err = buildCellMap(make_grid(p.h, p.w, p.tile), idx, p.n, map, stream);
  if (err != 0) return err;
  const int64_t total = p.n * p.tile * p.tile * p.c;
  if (total == 0) return 0;
  const int threads = 256;
  tileScatterKernel<I><<<gridFor(total, threads), threads, 0, stream>>>(p, tiles, residual, map, idx, out);
  return static_cast<int>(cudaGetLastError());
}

template int launchTileScatter<int32_t>(const ScatterParams&, const float*, const float*, const int32_t*,
                                        const float*, float*, void*, cudaStream_t);
template int launchTileScatter<int64_t>(const ScatterParams&, const float*, const float*, const int64_t*,
                                        const float*, float*, void*, cudaStream_t);

}  // namespace trt
}  // namespace ssic
