// CUDA kernel of the TileGather plugin. One warp per (output pixel, kernel tap): the warp finds the
// source pixel once (common/tile_index.h's geometry, shared with the CPU check) and its lanes copy the
// C channels, four at a time where C and the pointers allow. Channels are the innermost axis of both
// the cols row and an NHWC cache or tile, so reads and writes are coalesced; an NCHW (dense) source is
// read with a channel stride.
#include <stdint.h>

#include "common/cellMap.cuh"
#include "common/tileKernels.h"

namespace ssic {
namespace trt {

namespace {

__device__ __forceinline__ float4 epilogue4(float4 v, const GatherParams& p, const float* scale,
                                            const float* shift, int64_t ch) {
  float* e = reinterpret_cast<float*>(&v);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    if (scale) e[j] *= scale[ch + j];
    if (shift) e[j] += shift[ch + j];
    e[j] = activate(e[j], p.activation, p.alpha);
  }
  return v;
}

}  // namespace

template <typename I, bool kVec4>
__global__ void tileGatherKernel(GatherParams p, const float* __restrict__ tiles, const float* __restrict__ cache,
                                 const int32_t* __restrict__ map, const I* __restrict__ dst_idx,
                                 const float* __restrict__ scale, const float* __restrict__ shift,
                                 float* __restrict__ cols) {
  const int lane = threadIdx.x & 31;
  const int64_t taps = p.kernel * p.kernel;
  const int64_t tt = p.tile * p.tile;
  const int64_t jobs = p.n * tt * taps;  // one warp each
  const int64_t warps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  const TileGrid g = make_grid(p.hs, p.ws, p.src_tile);
  const GatherGeometry gy{p.stride, p.pad_top, p.upsample, p.hs, p.pad_mode};
  const GatherGeometry gx{p.stride, p.pad_left, p.upsample, p.ws, p.pad_mode};
  for (int64_t job = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) >> 5; job < jobs; job += warps) {
    const int64_t row = job / taps, tap = job - row * taps;
    const int64_t i = row / tt, r = row - i * tt;
    const int64_t py = r / p.tile, px = r - py * p.tile;
    const int64_t ky = tap / p.kernel, kx = tap - ky * p.kernel;
    float* out = cols + row * taps * p.c + tap * p.c;
    const int64_t sy = gather_source(gy, static_cast<int64_t>(dst_idx[2 * i]), py, ky);
    const int64_t sx = gather_source(gx, static_cast<int64_t>(dst_idx[2 * i + 1]), px, kx);
    if (sy < 0 || sx < 0) {  // zero padding: 0 after the epilogue too
      for (int64_t ch = lane; ch < p.c; ch += 32) out[ch] = 0.f;
      continue;
    }
    const int32_t ti = map[pixel_cell(g, sy, sx)];
    const float* src;
    int64_t step = 1;
    if (ti >= 0) {
      src = tiles + tile_row(g, ti, sy, sx) * p.c;
    } else if (p.layout == kNHWC) {
      src = cache + (sy * p.ws + sx) * p.c;
    } else {
      src = cache + sy * p.ws + sx;
      step = p.hs * p.ws;
    }
    if (kVec4 && step == 1) {
      for (int64_t ch = 4 * lane; ch < p.c; ch += 128) {
        float4 v = *reinterpret_cast<const float4*>(src + ch);
        *reinterpret_cast<float4*>(out + ch) = epilogue4(v, p, scale, shift, ch);
      }
    } else {
      for (int64_t ch = lane; ch < p.c; ch += 32) {
        float v = src[ch * step];
        if (scale) v *= scale[ch];
        if (shift) v += shift[ch];
        out[ch] = activate(v, p.activation, p.alpha);
      }
    }
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
  const int64_t warp_threads = 32 * p.n * p.tile * p.tile * p.kernel * p.kernel;
  const auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  const bool vec4 = p.c % 4 == 0 && aligned(tiles) && aligned(cache) && aligned(cols);
  if (vec4) {
    tileGatherKernel<I, true><<<gridFor(warp_threads, threads), threads, 0, stream>>>(p, tiles, cache, map, dst_idx,
                                                                                     scale, shift, cols);
  } else {
    tileGatherKernel<I, false><<<gridFor(warp_threads, threads), threads, 0, stream>>>(p, tiles, cache, map, dst_idx,
                                                                                      scale, shift, cols);
  }
  return static_cast<int>(cudaGetLastError());
}

template int launchTileGather<int32_t>(const GatherParams&, const float*, const float*, const int32_t*,
                                       const int32_t*, const float*, const float*, float*, void*, cudaStream_t);
template int launchTileGather<int64_t>(const GatherParams&, const float*, const float*, const int64_t*,
                                       const int64_t*, const float*, const float*, float*, void*, cudaStream_t);

}  // namespace trt
}  // namespace ssic
