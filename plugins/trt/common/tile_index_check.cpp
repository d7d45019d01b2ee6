// CPU check of the plugins' per-element math (tile_index.h), run by tests/test_trt.py against
// ssic.ops.tile_gather_ref. Reads from stdin:
//   hs ws c ts t k s pad_top pad_left u act m n  src_idx[m*2] dst_idx[n*2]  tiles cache[Hs*Ws*C NHWC] scale[C] shift[C]
// and prints the TileGather output cols [n*t*t, k*k*C] (alpha 0.1), building the cell map as the
// CUDA kernel does (fill -1, keep the largest tile index per cell).
#include <stdio.h>

#include <algorithm>
#include <vector>

#include "common/tile_index.h"

int main() {
  using namespace ssic;
  using namespace ssic::trt;
  long long v[13];
  for (long long& x : v)
    if (scanf("%lld", &x) != 1) return 2;
  GatherParams p{v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8], v[9], static_cast<int32_t>(v[10]),
                 0.1f, kNHWC, v[11], v[12]};
  std::vector<int64_t> src(2 * p.m), dst(2 * p.n);
  for (auto& x : src) scanf("%ld", &x);
  for (auto& x : dst) scanf("%ld", &x);
  std::vector<float> tiles(p.m * p.src_tile * p.src_tile * p.c), cache(p.hs * p.ws * p.c), scale(p.c), shift(p.c);
  for (auto* vec : {&tiles, &cache, &scale, &shift})
    for (float& x : *vec)
      if (scanf("%f", &x) != 1) return 3;
  const TileGrid g = make_grid(p.hs, p.ws, p.src_tile);
  std::vector<int32_t> map(grid_cells(g), -1);
  for (int64_t i = 0; i < p.m; ++i) {
    const int64_t cell = cell_of_tile(g, src.data(), i);
    if (cell >= 0) map[cell] = std::max(map[cell], static_cast<int32_t>(i));
  }
  const int64_t rows = p.n * p.tile * p.tile, cols = p.kernel * p.kernel * p.c;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c)
      printf("%.9g\n", gather_element(p, tiles.data(), cache.data(), map.data(), dst.data(), scale.data(),
                                       shift.data(), r, c));
  return 0;
}
