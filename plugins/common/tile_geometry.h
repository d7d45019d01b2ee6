// Tile arithmetic shared by the ssic kernels: ONNX Runtime CPU ops (plugins/ort) and the TensorRT
// CUDA plugins (plugins/trt). Semantics: docs/architecture.md, reference: ssic/ops.py.
//
// Everything is an inline function on plain integers and pointers so that host C++ and CUDA device
// code share it unchanged.
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define SSIC_HD __host__ __device__
#else
#define SSIC_HD
#endif

namespace ssic {

// Number of tiles of size t covering `extent` pixels (the last one may be clipped).
SSIC_HD inline int64_t tiles_along(int64_t extent, int64_t t) { return (extent + t - 1) / t; }

// Grid of tile cells over an H x W image: cell (gy, gx) covers [gy*t, gy*t+t) x [gx*t, gx*t+t).
struct TileGrid {
  int64_t height;  // image height in pixels
  int64_t width;   // image width in pixels
  int64_t tile;    // tile size t
  int64_t rows;    // ceil(height / tile)
  int64_t cols;    // ceil(width / tile)
};

SSIC_HD inline TileGrid make_grid(int64_t height, int64_t width, int64_t tile) {
  TileGrid g;
  g.height = height;
  g.width = width;
  g.tile = tile;
  g.rows = tiles_along(height, tile);
  g.cols = tiles_along(width, tile);
  return g;
}

SSIC_HD inline int64_t grid_cells(const TileGrid& g) { return g.rows * g.cols; }

// Whether (y, x) is a valid tile corner of the grid: multiples of t inside the image.
SSIC_HD inline bool valid_corner(const TileGrid& g, int64_t y, int64_t x) {
  return y >= 0 && x >= 0 && y < g.height && x < g.width && y % g.tile == 0 && x % g.tile == 0;
}

// Linear cell index of a valid tile corner.
SSIC_HD inline int64_t corner_cell(const TileGrid& g, int64_t y, int64_t x) {
  return (y / g.tile) * g.cols + (x / g.tile);
}

// Linear cell index of the cell holding in-image pixel (y, x).
SSIC_HD inline int64_t pixel_cell(const TileGrid& g, int64_t y, int64_t x) {
  return (y / g.tile) * g.cols + (x / g.tile);
}

// Row of in-image pixel (y, x) inside a tile tensor [m*t*t, C], given the index `tile_index` of
// the tile covering it: tile_index*t*t + (y mod t)*t + (x mod t).
SSIC_HD inline int64_t tile_row(const TileGrid& g, int64_t tile_index, int64_t y, int64_t x) {
  const int64_t t = g.tile;
  return (tile_index * t + (y % t)) * t + (x % t);
}

// Rows/cols of a tile at corner (y, x) that fall inside the image (clipped at the bottom/right).
SSIC_HD inline int64_t clipped_extent(int64_t corner, int64_t tile, int64_t extent) {
  const int64_t left = extent - corner;
  return left < tile ? (left < 0 ? 0 : left) : tile;
}

// What a TileGather reads outside the (upsampled) source: zeros (a conv's padding), the mirror image
// without repeating the border pixel (Pad mode "reflect"), or the border pixel (Pad mode "edge").
enum PadMode : int64_t { kPadZeros = 0, kPadReflect = 1, kPadEdge = 2 };

// Conv geometry of a TileGather: where output pixel (dst corner + p) reads kernel tap kk.
struct GatherGeometry {
  int64_t stride;    // s
  int64_t pad;       // pad_top for rows, pad_left for columns
  int64_t upsample;  // u (nearest)
  int64_t extent;    // source extent Hs or Ws (before upsampling)
  int64_t pad_mode = kPadZeros;
};

// Reflection of coordinate v into [0, n) without repeating the border (period 2n - 2).
SSIC_HD inline int64_t reflect_coord(int64_t v, int64_t n) {
  if (n <= 1) return 0;
  const int64_t period = 2 * n - 2;
  int64_t r = (v < 0 ? -v : v) % period;
  return r >= n ? period - r : r;
}

// Coordinate in the upsampled source of output pixel `dst + p` and kernel tap `kk`:
// (dst + p)*s - pad + kk. Valid when 0 <= value < extent*u.
SSIC_HD inline int64_t gather_coord(const GatherGeometry& g, int64_t dst, int64_t p, int64_t kk) {
  return (dst + p) * g.stride - g.pad + kk;
}

// Source pixel coordinate of an upsampled coordinate, or -1 when outside the image (zero padding).
// Reflect/edge padding map outside coordinates into the upsampled image first.
SSIC_HD inline int64_t gather_source(const GatherGeometry& g, int64_t dst, int64_t p, int64_t kk) {
  int64_t v = gather_coord(g, dst, p, kk);
  const int64_t n = g.extent * g.upsample;
  if (v < 0 || v >= n) {
    if (g.pad_mode == kPadReflect) {
      v = reflect_coord(v, n);
    } else if (g.pad_mode == kPadEdge) {
      v = v < 0 ? 0 : n - 1;
    } else {
      return -1;
    }
  }
  return v / g.upsample;
}

}  // namespace ssic
