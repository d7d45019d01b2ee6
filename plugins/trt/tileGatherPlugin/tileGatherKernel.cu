// CUDA kernel of the TileGather plugin: one thread per output element (grid-stride), the math in
// common/tile_index.h (shared with the CPU check) and plugins/common/tile_geometry.h.
#include "common/cellMap.cuh"
#include "common/tileKernels.h"

namespace ssic {
namespace trt {

template <typename I>
__global__ void tileGatherKernel(GatherParams p, const float* __restrict__ tiles, const float* __restrict__ cache,
                                 const int32_t* __restrict__ map, const I* __restrict__ dst_idx,
                                 const float* __restrict__ scale, const float* __restrict__ shift,
                                 float* __restrict__ cols) {
  const int64_t width = p.kernel * p.kernel * p.c;
  const int64_t total = p.n * p.tile * p.tile * width;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    cols[e] = gather_element(p, tiles, cache, map, dst_idx, scale, shift, e / width, e % width);
  }
}

template <typename I>
int launchTileGather(const GatherParams& p, const float* tiles, const float* cache, const I* src_idx,
                     const I* dst_idx, const float* scale, const float* shift, float* cols, void* workspace,
                     cudaStream_t stream) {
  auto* map = static_cast<int32_t*>(workspace);
  const int err = buildCellMap(make_grid(p.hs, p.ws, p.src_tile), src_idx, p.m, map, stream);
  if (err != 0) return err;
  const int64_t total = p.n * p.tile * p.tile * p.kernel * p.kernel * p.c;
  if (total == 0) return 0;
  const int threads = 256;
  tileGatherKernel<I><<<gridFor(total, threads), threads, 0, stream>>>(p, tiles, cache, map, dst_idx, scale, shift,
                                                                       cols);
  return static_cast<int>(cudaGetLastError());
}

template int launchTileGather<int32_t>(const GatherParams&, const float*, const float*, const int32_t*,
                                       const int32_t*, const float*, const float*, float*, void*, cudaStream_t);
template int launchTileGather<int64_t>(const GatherParams&, const float*, const float*, const int64_t*,
                                       const int64_t*, const float*, const float*, float*, void*, cudaStream_t);

}  // namespace trt
}  // namespace ssic
