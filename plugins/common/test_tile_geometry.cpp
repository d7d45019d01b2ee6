// Host test of plugins/common/tile_geometry.h (run by ctest and by tests/test_ops_kernels.py).
#include "tile_geometry.h"

#include <cstdio>
#include <cstdlib>

static int failures = 0;
#define CHECK_EQ(a, b)                                                                     \
  do {                                                                                     \
    long long va = (long long)(a), vb = (long long)(b);                                    \
    if (va != vb) {                                                                        \
      std::fprintf(stderr, "%s:%d: %s == %lld, expected %lld\n", __FILE__, __LINE__, #a, va, vb); \
      ++failures;                                                                          \
    }                                                                                      \
  } while (0)

int main() {
  using namespace ssic;
  // 10 x 11 image, tile 4: 3 x 3 cells, bottom/right tiles clipped to 2 and 3.
  TileGrid g = make_grid(10, 11, 4);
  CHECK_EQ(g.rows, 3);
  CHECK_EQ(g.cols, 3);
  CHECK_EQ(grid_cells(g), 9);
  CHECK_EQ(valid_corner(g, 8, 8), 1);
  CHECK_EQ(valid_corner(g, 12, 0), 0);
  CHECK_EQ(valid_corner(g, 2, 0), 0);
  CHECK_EQ(valid_corner(g, -4, 0), 0);
  CHECK_EQ(corner_cell(g, 8, 4), 7);
  CHECK_EQ(pixel_cell(g, 9, 10), 8);
  CHECK_EQ(tile_row(g, 2, 9, 10), 2 * 16 + 1 * 4 + 2);
  CHECK_EQ(clipped_extent(8, 4, 10), 2);
  CHECK_EQ(clipped_extent(8, 4, 11), 3);
  CHECK_EQ(clipped_extent(4, 4, 11), 4);
  CHECK_EQ(clipped_extent(12, 4, 11), 0);
  // Tiny image smaller than a tile.
  TileGrid tiny = make_grid(1, 2, 9);
  CHECK_EQ(grid_cells(tiny), 1);
  // 3x3 conv, pad 1, stride 1 on a 10-pixel extent.
  GatherGeometry gg{1, 1, 1, 10};
  CHECK_EQ(gather_source(gg, 0, 0, 0), -1);
  CHECK_EQ(gather_source(gg, 0, 0, 1), 0);
  CHECK_EQ(gather_source(gg, 8, 1, 2), -1);
  CHECK_EQ(gather_source(gg, 8, 1, 1), 9);
  // Stride 2, pad 0, nearest upsample 2 on a 5-pixel extent (10 upsampled pixels).
  GatherGeometry up{2, 0, 2, 5};
  CHECK_EQ(gather_coord(up, 2, 1, 2), 8);
  CHECK_EQ(gather_source(up, 2, 1, 2), 4);
  CHECK_EQ(gather_source(up, 4, 0, 2), -1);
  CHECK_EQ(gather_source(up, 0, 1, 1), 1);
  // Reflect and edge padding on a 4-pixel extent, pad 2: coordinates -2..5 -> 2 1 0 1 2 3 2 1 / 0 0 0 1 2 3 3 3.
  GatherGeometry refl{1, 2, 1, 4, kPadReflect};
  GatherGeometry edge{1, 2, 1, 4, kPadEdge};
  const int64_t want_reflect[8] = {2, 1, 0, 1, 2, 3, 2, 1};
  const int64_t want_edge[8] = {0, 0, 0, 1, 2, 3, 3, 3};
  for (int64_t kk = 0; kk < 8; ++kk) {
    CHECK_EQ(gather_source(refl, 0, 0, kk), want_reflect[kk]);
    CHECK_EQ(gather_source(edge, 0, 0, kk), want_edge[kk]);
  }
  // Reflection in the upsampled image (u = 2, 3 source pixels = 6 upsampled): -1 -> 1 -> pixel 0, 6 -> 4 -> 2.
  GatherGeometry refl_up{1, 1, 2, 3, kPadReflect};
  CHECK_EQ(gather_source(refl_up, 0, 0, 0), 0);
  CHECK_EQ(gather_source(refl_up, 6, 0, 1), 2);
  if (failures) {
    std::fprintf(stderr, "%d failure(s)\n", failures);
    return 1;
  }
  std::printf("tile_geometry: all checks passed\n");
  return 0;
}
