// Per-element math of the ssic TensorRT plugins' CUDA kernels, as host/device inline functions so a
// CPU program (tile_index_check.cpp, run by tests/test_trt.py) checks exactly what the kernels run
// against the NumPy references in ssic/ops.py. Tile arithmetic comes from plugins/common/tile_geometry.h.
#pragma once

#include <math.h>
#include <stdint.h>

#include "tile_geometry.h"

namespace ssic {
namespace trt {

enum Activation : int32_t { kIdentity = 0, kRelu = 1, kLeakyRelu = 2, kSwish = 3 };
enum Layout : int32_t { kNHWC = 0, kNCHW = 1 };

SSIC_HD inline float activate(float v, int32_t act, float alpha) {
  switch (act) {
    case kRelu: return v > 0.f ? v : 0.f;
    case kLeakyRelu: return v >= 0.f ? v : v * alpha;
    case kSwish: return v / (1.f + expf(-v));
    default: return v;
  }
}

// Everything a TileGather kernel needs besides the tensors. m = source tiles, n = output tiles.
struct GatherParams {
  int64_t hs, ws, c;          // source image and channels
  int64_t src_tile, tile;     // ts, t
  int64_t kernel, stride;     // k, s
  int64_t pad_top, pad_left;
  int64_t upsample;           // u
  int32_t activation;
  float alpha;
  int32_t layout;             // kNHWC: cache [Hs, Ws, C]; kNCHW: [1, C, Hs, Ws]
  int64_t m, n;
  int64_t pad_mode;           // PadMode (tile_geometry.h): 0 zeros, 1 reflect, 2 edge
};

struct ScatterParams {
  int64_t h, w, c, tile;
  int32_t activation;
  float alpha;
  int64_t n;
};

// Cell map: one int32 per grid cell, -1 where no tile is active, else the index of the LAST tile in
// idx at that cell (ssic/ops.py: "the later entry wins"). Fill with -1, then call this for each tile
// (the CUDA kernel uses atomicMax, the CPU a plain max; both give the last index). Invalid corners
// (not multiples of the tile size, or outside the image) are ignored. Returns the cell or -1.
template <typename I>
SSIC_HD inline int64_t cell_of_tile(const TileGrid& g, const I* idx, int64_t i) {
  const int64_t y = static_cast<int64_t>(idx[2 * i]);
  const int64_t x = static_cast<int64_t>(idx[2 * i + 1]);
  return valid_corner(g, y, x) ? corner_cell(g, y, x) : -1;
}

// Element (row, col) of TileGather's output cols [n*t*t, k*k*C] (docs/architecture.md).
template <typename I>
SSIC_HD inline float gather_element(const GatherParams& p, const float* tiles, const float* cache,
                                    const int32_t* cell_map, const I* dst_idx, const float* scale,
                                    const float* shift, int64_t row, int64_t col) {
  const int64_t tt = p.tile * p.tile;
  const int64_t i = row / tt, r = row % tt;
  const int64_t py = r / p.tile, px = r % p.tile;
  const int64_t tap = col / p.c, ch = col % p.c;
  const int64_t ky = tap / p.kernel, kx = tap % p.kernel;
  const GatherGeometry gy{p.stride, p.pad_top, p.upsample, p.hs, p.pad_mode};
  const GatherGeometry gx{p.stride, p.pad_left, p.upsample, p.ws, p.pad_mode};
  const int64_t sy = gather_source(gy, static_cast<int64_t>(dst_idx[2 * i]), py, ky);
  const int64_t sx = gather_source(gx, static_cast<int64_t>(dst_idx[2 * i + 1]), px, kx);
  if (sy < 0 || sx < 0) return 0.f;  // zero padding, before scale/shift/activation
  const TileGrid g = make_grid(p.hs, p.ws, p.src_tile);
  const int32_t ti = cell_map[pixel_cell(g, sy, sx)];
  float v;
  if (ti >= 0) {
    v = tiles[tile_row(g, ti, sy, sx) * p.c + ch];
  } else if (p.layout == kNHWC) {
    v = cache[(sy * p.ws + sx) * p.c + ch];
  } else {
    v = cache[(ch * p.hs + sy) * p.ws + sx];
  }
  if (scale) v *= scale[ch];
  if (shift) v += shift[ch];
  return activate(v, p.activation, p.alpha);
}

// TileScatter: writes tile element e of [n*t*t, C] into out [1, C, H, W] (already a copy of the
// cache) when the pixel is in the image and tile i is the one the cell map keeps for its cell.
template <typename I>
SSIC_HD inline void scatter_element(const ScatterParams& p, const float* tiles, const float* residual,
                                    const int32_t* cell_map, const I* idx, float* out, int64_t e) {
  const int64_t row = e / p.c, ch = e % p.c;
  const int64_t tt = p.tile * p.tile;
  const int64_t i = row / tt, r = row % tt;
  const TileGrid g = make_grid(p.h, p.w, p.tile);
  const int64_t cell = cell_of_tile(g, idx, i);
  if (cell < 0 || cell_map[cell] != i) return;
  const int64_t y = static_cast<int64_t>(idx[2 * i]) + r / p.tile;
  const int64_t x = static_cast<int64_t>(idx[2 * i + 1]) + r % p.tile;
  if (y >= p.h || x >= p.w) return;  // clipped tile: its outside pixels are never written
  float v = tiles[e];
  if (residual) v += residual[e];
  out[(ch * p.h + y) * p.w + x] = activate(v, p.activation, p.alpha);
}

}  // namespace trt
}  // namespace ssic
