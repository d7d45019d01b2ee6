// CPU kernels of TileGather / TileScatter. See kernels.h.
#include "kernels.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <type_traits>

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define SSIC_F16C_DISPATCH 1
#endif

#include "../common/tile_geometry.h"
#include "gemm.h"

namespace ssic {

// Portable float16 -> float32 on the bits, branch-free so that loops over it vectorise: the
// exponent/mantissa field moves to float position and the exponent is rebiased (15 -> 127);
// exponent 31 (inf/NaN) is rebiased to 255; exponent 0 (zero/subnormal, value m * 2^-24) is built
// as the normal float (2^-14 + m * 2^-24) minus 2^-14, which is exact.
float half_to_float(uint16_t h) {
  const uint32_t em = static_cast<uint32_t>(h & 0x7fffu) << 13;
  const uint32_t exp = em & 0x0f800000u;
  uint32_t bits = em + (112u << 23);
  bits = exp == 0x0f800000u ? bits + (112u << 23) : bits;
  float normal, shifted, two_m14;
  std::memcpy(&normal, &bits, sizeof bits);
  const uint32_t sub_bits = em + (113u << 23), m14_bits = 113u << 23;
  std::memcpy(&shifted, &sub_bits, sizeof sub_bits);
  std::memcpy(&two_m14, &m14_bits, sizeof m14_bits);
  const float magnitude = exp == 0 ? shifted - two_m14 : normal;
  uint32_t out;
  std::memcpy(&out, &magnitude, sizeof out);
  out |= static_cast<uint32_t>(h & 0x8000u) << 16;
  float f;
  std::memcpy(&f, &out, sizeof f);
  return f;
}

uint16_t float_to_half(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  const uint32_t sign = (bits >> 16) & 0x8000u;
  uint32_t mag = bits & 0x7fffffffu;
  if (mag >= 0x47800000u)  // 2^16 and above, inf, NaN: inf, or a quiet NaN
    return static_cast<uint16_t>(sign | (mag > 0x7f800000u ? 0x7e00u : 0x7c00u));
  if (mag < 0x38800000u) {
    // below 2^-14 the result is subnormal (or zero): its bits are round(|f| * 2^24). Adding 0.5 (whose
    // ulp is 2^-24) lets the float adder round to nearest even; the low mantissa bits are the result.
    float m;
    std::memcpy(&m, &mag, sizeof m);
    m += 0.5f;
    uint32_t r;
    std::memcpy(&r, &m, sizeof r);
    return static_cast<uint16_t>(sign | (r - 0x3f000000u));
  }
  // normal: rebias the exponent (127 -> 15) and round the 13 dropped mantissa bits to nearest even; a
  // carry out of the mantissa moves to the exponent (65520 and above become inf)
  const uint32_t odd = (mag >> 13) & 1u;
  mag += 0xc8000fffu + odd;  // -(112 << 23) + 0xfff
  return static_cast<uint16_t>(sign | (mag >> 13));
}

namespace {

void halfs_to_floats_portable(const uint16_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = half_to_float(src[i]);
}

#ifdef SSIC_F16C_DISPATCH
// VCVTPH2PS, 8 values at a time (the library is built for x86-64-v2, which lacks F16C).
__attribute__((target("avx,f16c"))) void halfs_to_floats_f16c(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  for (; i < n; ++i) dst[i] = half_to_float(src[i]);
}
// VCVTPS2PH with round to nearest even, 8 values at a time.
__attribute__((target("avx,f16c"))) void floats_to_halfs_f16c(const float* src, uint16_t* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  for (; i < n; ++i) dst[i] = float_to_half(src[i]);
}
#endif

void floats_to_halfs_portable(const float* src, uint16_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = float_to_half(src[i]);
}

bool f16c_usable() {
  if (env_flag_on("SSIC_DISABLE_F16C")) return false;
#ifdef SSIC_F16C_DISPATCH
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

using HalfConverter = void (*)(const uint16_t*, float*, int64_t);

HalfConverter pick_half_converter() {
#ifdef SSIC_F16C_DISPATCH
  if (f16c_usable()) return halfs_to_floats_f16c;
#endif
  return halfs_to_floats_portable;
}

using FloatConverter = void (*)(const float*, uint16_t*, int64_t);

FloatConverter pick_float_converter() {
#ifdef SSIC_F16C_DISPATCH
  if (f16c_usable()) return floats_to_halfs_f16c;
#endif
  return floats_to_halfs_portable;
}

}  // namespace

void halfs_to_floats(const uint16_t* src, float* dst, int64_t n) {
  static const HalfConverter convert = pick_half_converter();
  convert(src, dst, n);
}

void floats_to_halfs(const float* src, uint16_t* dst, int64_t n) {
  static const FloatConverter convert = pick_float_converter();
  convert(src, dst, n);
}

namespace {

// exp(x) for the swish activation, branch-free so the compiler vectorises the channel loop
// (std::exp is a libm call that blocks vectorisation; the loops also need -fno-trapping-math,
// see cmake/SsicFlags.cmake). Cephes-style range reduction (rounding by adding 1.5*2^23) and a
// degree-6 polynomial; relative error ~1e-7 on the clamped range [-87, 88].
//
// The clamp bounds arrive at run time (ActArgs): with constant bounds GCC if-converts the clamp
// into a second, constant-folded branch (v / (1 + e^88)) evaluated on every lane, whose denormal
// results cost ~10x through microcode assists.
inline float exp_approx(float x, float lo, float hi) {
  x = x > hi ? hi : x;
  x = x < lo ? lo : x;
  constexpr float kRound = 12582912.0f;
  const float t = x * 1.44269504088896341f + kRound;
  const float n = t - kRound;  // round(x / ln 2)
  int32_t t_bits;
  std::memcpy(&t_bits, &t, sizeof t_bits);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t bits = (t_bits - 0x4B400000 + 127) * (1 << 23);  // 2^n as a float
  float two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return y * two_n;
}

struct ActArgs {
  float alpha;   // leaky relu slope
  float exp_lo;  // clamp range of exp_approx: -87, 88
  float exp_hi;
};

ActArgs act_args(float alpha) {
  static volatile float lo = -87.0f, hi = 88.0f;  // opaque to the optimiser, see exp_approx
  return ActArgs{alpha, lo, hi};
}

template <int64_t Act>
inline float activate(float v, const ActArgs& a) {
  if (Act == kRelu) return v > 0.0f ? v : 0.0f;
  if (Act == kLeakyRelu) return v >= 0.0f ? v : v * a.alpha;
  if (Act == kSwish) return v / (1.0f + exp_approx(-v, a.exp_lo, a.exp_hi));
  return v;
}

// dst[c] = act(src[c*stride] * scale[c] + shift[c]) over C channels; the contiguous, unscaled,
// identity case is a memcpy.
template <int64_t Act, bool Affine>
inline void transform(const float* __restrict src, int64_t stride, const float* __restrict scale,
                      const float* __restrict shift, ActArgs act, float* __restrict dst,
                      int64_t channels) {
  if (stride == 1) {
    if (Act == kIdentity && !Affine) {
      std::memcpy(dst, src, sizeof(float) * channels);
      return;
    }
    for (int64_t c = 0; c < channels; ++c) {
      float v = src[c];
      if (Affine) v = v * scale[c] + shift[c];
      dst[c] = activate<Act>(v, act);
    }
  } else {
    for (int64_t c = 0; c < channels; ++c) {
      float v = src[c * stride];
      if (Affine) v = v * scale[c] + shift[c];
      dst[c] = activate<Act>(v, act);
    }
  }
}

// One cached pixel's C channels (stride 1: NHWC, else the NCHW plane size) through the epilogue into
// dst. A float16 cache is converted first, into dst itself when there is no epilogue, else into buf.
template <int64_t Act, bool Affine>
inline void read_cached(const float* src, int64_t stride, const float* scale, const float* shift,
                        ActArgs act, float* dst, int64_t channels, float* /*buf*/) {
  transform<Act, Affine>(src, stride, scale, shift, act, dst, channels);
}

template <int64_t Act, bool Affine>
inline void read_cached(const uint16_t* src, int64_t stride, const float* scale, const float* shift,
                        ActArgs act, float* dst, int64_t channels, float* buf) {
  constexpr bool plain = Act == kIdentity && !Affine;
  float* tmp = plain ? dst : buf;
  if (stride == 1) {
    halfs_to_floats(src, tmp, channels);
  } else {
    for (int64_t c = 0; c < channels; ++c) tmp[c] = half_to_float(src[c * stride]);
  }
  if (!plain) transform<Act, Affine>(tmp, 1, scale, shift, act, dst, channels);
}

// Map from tile cell to the index of the tile covering it (-1 = not active); later entries win.
// The error for a tile corner (y, x) that is off the grid's tile multiples or outside the image.
std::string corner_error(const char* what, const TileGrid& grid, int64_t y, int64_t x) {
  return std::string(what) + ": tile corner (" + std::to_string(y) + ", " + std::to_string(x) +
         ") is not a multiple of " + std::to_string(grid.tile) + " inside " + std::to_string(grid.height) + "x" +
         std::to_string(grid.width);
}

std::string build_cell_map(const TileGrid& grid, const int64_t* idx, int64_t count, const char* what,
                           std::vector<int32_t>& map) {
  map.assign(static_cast<size_t>(grid_cells(grid)), -1);
  for (int64_t j = 0; j < count; ++j) {
    const int64_t y = idx[2 * j], x = idx[2 * j + 1];
    if (!valid_corner(grid, y, x)) return corner_error(what, grid, y, x);
    map[static_cast<size_t>(corner_cell(grid, y, x))] = static_cast<int32_t>(j);
  }
  return {};
}

// Everything a row producer needs, prepared once per call (kernels.h's arguments plus the cell map).
struct GatherPlan {
  GatherParams p;
  GatherArgs a;
  TileGrid grid;
  std::vector<int32_t> cells;
  const float* scale = nullptr;
  const float* shift = nullptr;
  std::vector<float> ones, zeros;
};

// Writes the im2col rows of work items [begin, end) at out, rows ld floats apart (ld >= k*k*C). One
// work item is one row py of one output tile i: t rows of k*k*C floats.
using RowProducer = void (*)(const GatherPlan& plan, int64_t begin, int64_t end, float* out, int64_t ld);

// Index of v in vals[0:n], appending it when absent (the distinct source coordinates of one tile).
inline int64_t slot_of(int64_t v, int64_t* vals, int64_t& n) {
  for (int64_t i = 0; i < n; ++i)
    if (vals[i] == v) return i;
  vals[n] = v;
  return n++;
}

// Reads source pixels through the gather's epilogue: act(v*scale + shift) of pixel (y, x), from the new
// tiles where a tile covers it, else from the cache (converted from float16); zeros outside the image.
template <int64_t Act, bool Affine, typename CacheT>
struct PixelReader {
  const GatherPlan& plan;
  const CacheT* cache;
  const int64_t C, plane;
  const bool nhwc;
  const ActArgs act;
  std::vector<float> buf;  // one converted float16 pixel

  explicit PixelReader(const GatherPlan& pl)
      : plan(pl), cache(nullptr), C(pl.a.channels), plane(pl.a.hs * pl.a.ws), nhwc(pl.p.src_layout == 0),
        act(act_args(pl.p.alpha)), buf(static_cast<size_t>(pl.a.channels)) {
    if constexpr (std::is_same_v<CacheT, uint16_t>) {
      cache = pl.a.cache_f16;
    } else {
      cache = pl.a.cache;
    }
  }

  void operator()(int64_t y, int64_t x, float* dst) {
    if (y < 0 || x < 0) {
      std::memset(dst, 0, sizeof(float) * C);
      return;
    }
    const GatherArgs& a = plan.a;
    const int32_t j = plan.cells[static_cast<size_t>(pixel_cell(plan.grid, y, x))];
    if (j >= 0) {
      transform<Act, Affine>(a.tiles + tile_row(plan.grid, j, y, x) * C, 1, plan.scale, plan.shift, act, dst, C);
    } else if (nhwc) {
      read_cached<Act, Affine>(cache + (y * a.ws + x) * C, 1, plan.scale, plan.shift, act, dst, C, buf.data());
    } else {
      read_cached<Act, Affine>(cache + y * a.ws + x, plane, plan.scale, plan.shift, act, dst, C, buf.data());
    }
  }
};

// The source window of the output tile at (dy, dx): its distinct source rows ys[0:rows_n] and columns
// xs[0:cols_n] (-1 = outside the image), and for each output row/column q and tap kk the window slot
// wy[q*k + kk] / wx[q*k + kk] (a k x k window reads each source pixel up to k*k times).
struct TileWindow {
  std::vector<int64_t> ys, xs, wy, wx;
  int64_t rows_n = 0, cols_n = 0;

  explicit TileWindow(int64_t t, int64_t k)
      : ys(static_cast<size_t>(t * k)), xs(static_cast<size_t>(t * k)), wy(static_cast<size_t>(t * k)),
        wx(static_cast<size_t>(t * k)) {}

  // Reads the window located last, row-major [rows_n][cols_n][C], into dst through `read_pixel`.
  template <typename Reader>
  void read(Reader& read_pixel, float* dst, int64_t C) const {
    for (int64_t r = 0; r < rows_n; ++r)
      for (int64_t c = 0; c < cols_n; ++c) read_pixel(ys[r], xs[c], dst + (r * cols_n + c) * C);
  }

  void locate(const GatherPlan& plan, int64_t dy, int64_t dx) {
    const GatherParams& p = plan.p;
    const GatherGeometry gy{p.stride, p.pad_top, p.upsample, plan.a.hs, p.pad_mode};
    const GatherGeometry gx{p.stride, p.pad_left, p.upsample, plan.a.ws, p.pad_mode};
    rows_n = cols_n = 0;
    for (int64_t q = 0; q < p.tile; ++q)
      for (int64_t kk = 0; kk < p.kernel; ++kk) {
        wy[q * p.kernel + kk] = slot_of(gather_source(gy, dy, q, kk), ys.data(), rows_n);
        wx[q * p.kernel + kk] = slot_of(gather_source(gx, dx, q, kk), xs.data(), cols_n);
      }
  }
};

template <int64_t Act, bool Affine, typename CacheT>
void gather_rows(const GatherPlan& plan, int64_t begin, int64_t end, float* out, int64_t ld) {
  const GatherParams& p = plan.p;
  const GatherArgs& a = plan.a;
  const int64_t t = p.tile, k = p.kernel, C = a.channels;
  const bool nhwc = p.src_layout == 0;
  const GatherGeometry gy{p.stride, p.pad_top, p.upsample, a.hs, p.pad_mode};
  const GatherGeometry gx{p.stride, p.pad_left, p.upsample, a.ws, p.pad_mode};
  PixelReader<Act, Affine, CacheT> read_pixel(plan);

  // Where reading costs more than a copy (swish's exp; the strided reads of an NCHW cache), each output
  // tile's source window is read once into `window` and its im2col rows are copied from there. Measured
  // (plugins/ort/bench_ab.py, 1 thread): a float16 cache with GroupNorm + swish gathers 1.4-1.5x faster;
  // relu/leaky relu and F16C conversion cost about a copy, and there the window's extra copy made the
  // gather 10% slower.
  const bool windowed = k > 1 && (Act == kSwish || !nhwc);
  TileWindow win(t, k);
  std::vector<float> window;
  int64_t tile_in_window = -1;
  for (int64_t item = begin; item < end; ++item) {
    const int64_t i = item / t, py = item % t;
    const int64_t dy = a.dst_idx[2 * i], dx = a.dst_idx[2 * i + 1];
    float* rows = out + (item - begin) * t * ld;
    if (!windowed) {
      // direct: each tap read (and converted) where it goes
      for (int64_t ky = 0; ky < k; ++ky) win.ys[ky] = gather_source(gy, dy, py, ky);
      for (int64_t px = 0; px < t; ++px)
        for (int64_t kx = 0; kx < k; ++kx) win.xs[px * k + kx] = gather_source(gx, dx, px, kx);
      for (int64_t px = 0; px < t; ++px)
        for (int64_t ky = 0; ky < k; ++ky) {
          float* dst = rows + px * ld + ky * k * C;
          for (int64_t kx = 0; kx < k; ++kx, dst += C) read_pixel(win.ys[ky], win.xs[px * k + kx], dst);
        }
      continue;
    }
    if (i != tile_in_window) {
      win.locate(plan, dy, dx);
      window.resize(static_cast<size_t>(win.rows_n * win.cols_n * C));
      win.read(read_pixel, window.data(), C);
      tile_in_window = i;
    }
    for (int64_t px = 0; px < t; ++px) {
      for (int64_t ky = 0; ky < k; ++ky) {
        const int64_t r = win.wy[py * k + ky];
        float* dst = rows + px * ld + ky * k * C;
        for (int64_t kx = 0; kx < k; ++kx, dst += C)
          std::memcpy(dst, window.data() + (r * win.cols_n + win.wx[px * k + kx]) * C, sizeof(float) * C);
      }
    }
  }
}

// TileConv's left-hand side for output tiles [j0, j1): their source windows, each read once through the
// epilogue into `windows`, and for each of their t*t output rows the k*k tap pointers into them
// (`taps`, [rows][k*k], the order of an im2col row) for gemm_indirect_accumulate.
using WindowProducer = void (*)(const GatherPlan& plan, int64_t j0, int64_t j1, std::vector<float>& windows,
                                std::vector<const float*>& taps);

template <int64_t Act, bool Affine, typename CacheT>
void gather_windows(const GatherPlan& plan, int64_t j0, int64_t j1, std::vector<float>& windows,
                    std::vector<const float*>& taps) {
  const int64_t t = plan.p.tile, k = plan.p.kernel, C = plan.a.channels, kk = k * k;
  PixelReader<Act, Affine, CacheT> read_pixel(plan);
  TileWindow win(t, k);
  thread_local std::vector<size_t> offsets;  // pointers once `windows` has its final size
  offsets.resize(static_cast<size_t>((j1 - j0) * t * t * kk));
  size_t used = 0;
  for (int64_t j = j0; j < j1; ++j) {
    win.locate(plan, plan.a.dst_idx[2 * j], plan.a.dst_idx[2 * j + 1]);
    const size_t base = used;
    used += static_cast<size_t>(win.rows_n * win.cols_n * C);
    if (windows.size() < used) windows.resize(used);
    win.read(read_pixel, windows.data() + base, C);
    size_t* o = offsets.data() + static_cast<size_t>((j - j0) * t * t * kk);
    for (int64_t py = 0; py < t; ++py)
      for (int64_t px = 0; px < t; ++px)
        for (int64_t ky = 0; ky < k; ++ky)
          for (int64_t kx = 0; kx < k; ++kx)
            *o++ = base + static_cast<size_t>((win.wy[py * k + ky] * win.cols_n + win.wx[px * k + kx]) * C);
  }
  taps.resize(offsets.size());
  for (size_t i = 0; i < offsets.size(); ++i) taps[i] = windows.data() + offsets[i];
}

// The row and window producers of one (activation, affine, cache type): the channel loops have no branches.
struct Producers {
  RowProducer rows = nullptr;
  WindowProducer windows = nullptr;
};

template <int64_t Act, bool Affine, typename CacheT>
Producers producers_of() {
  return {gather_rows<Act, Affine, CacheT>, gather_windows<Act, Affine, CacheT>};
}

template <int64_t Act>
Producers producers_for(bool affine, bool f16) {
  if (affine) return f16 ? producers_of<Act, true, uint16_t>() : producers_of<Act, true, float>();
  return f16 ? producers_of<Act, false, uint16_t>() : producers_of<Act, false, float>();
}

// Validates the arguments, builds the cell map and picks the row producer (activation, affine and
// cache type are template parameters: the channel loop has no branches).
std::string plan_gather(const GatherParams& p, const GatherArgs& a, const char* op, GatherPlan& plan,
                        Producers& produce) {
  if ((a.cache == nullptr) == (a.cache_f16 == nullptr))
    return std::string(op) + ": exactly one cache pointer must be set";
  plan.p = p;
  plan.a = a;
  plan.grid = make_grid(a.hs, a.ws, p.src_tile);
  std::string err = build_cell_map(plan.grid, a.src_idx, a.m, (std::string(op) + " src_idx").c_str(), plan.cells);
  if (!err.empty()) return err;
  plan.scale = a.scale;
  plan.shift = a.shift;
  const bool affine = a.scale || a.shift;
  if (affine && !plan.scale) {
    plan.ones.assign(static_cast<size_t>(a.channels), 1.0f);
    plan.scale = plan.ones.data();
  }
  if (affine && !plan.shift) {
    plan.zeros.assign(static_cast<size_t>(a.channels), 0.0f);
    plan.shift = plan.zeros.data();
  }
  const bool f16 = a.cache_f16 != nullptr;
  switch (p.activation) {
    case kIdentity: produce = producers_for<kIdentity>(affine, f16); break;
    case kRelu: produce = producers_for<kRelu>(affine, f16); break;
    case kLeakyRelu: produce = producers_for<kLeakyRelu>(affine, f16); break;
    case kSwish: produce = producers_for<kSwish>(affine, f16); break;
    default: return std::string(op) + ": unknown activation " + std::to_string(p.activation);
  }
  return {};
}

template <int64_t Act>
void scatter_impl(const ScatterParams& p, const ScatterArgs& a, const std::vector<int32_t>& cells,
                  const TileGrid& grid, const ParallelFor& pfor) {
  const int64_t t = p.tile, C = a.channels, H = a.height, W = a.width;
  const int64_t plane = H * W;
  const ActArgs act = act_args(p.alpha);
  pfor(a.n, [&](int64_t begin, int64_t end) {
    std::vector<float> row(static_cast<size_t>(t * C));
    for (int64_t i = begin; i < end; ++i) {
      const int64_t y0 = a.idx[2 * i], x0 = a.idx[2 * i + 1];
      if (cells[static_cast<size_t>(corner_cell(grid, y0, x0))] != i) continue;  // a later duplicate wins
      const int64_t h = clipped_extent(y0, t, H), w = clipped_extent(x0, t, W);
      for (int64_t py = 0; py < h; ++py) {
        // act(tile + residual) for the in-image pixels of this tile row, channels last ...
        const int64_t r0 = (i * t + py) * t;
        const float* src = a.tiles + r0 * C;
        const int64_t len = w * C;
        if (a.residual) {
          const float* res = a.residual + r0 * C;
          for (int64_t e = 0; e < len; ++e) row[e] = activate<Act>(src[e] + res[e], act);
        } else {
          for (int64_t e = 0; e < len; ++e) row[e] = activate<Act>(src[e], act);
        }
        // ... then transposed into the NCHW output.
        float* dst = a.out + (y0 + py) * W + x0;
        for (int64_t c = 0; c < C; ++c) {
          float* d = dst + c * plane;
          for (int64_t px = 0; px < w; ++px) d[px] = row[px * C + c];
        }
      }
    }
  });
}

}  // namespace

std::string tile_gather(const GatherParams& p, const GatherArgs& a, const ParallelFor& pfor) {
  GatherPlan plan;
  Producers produce;
  std::string err = plan_gather(p, a, "TileGather", plan, produce);
  if (!err.empty() || a.n == 0) return err;
  const int64_t row_len = p.kernel * p.kernel * a.channels;
  pfor(a.n * p.tile, [&](int64_t begin, int64_t end) {
    produce.rows(plan, begin, end, a.cols + begin * p.tile * row_len, row_len);
  });
  return {};
}

std::string tile_conv(const GatherParams& p, const GatherArgs& a, const ConvArgs& c, const ParallelFor& pfor) {
  GatherPlan plan;
  Producers produce;
  std::string err = plan_gather(p, a, "TileConv", plan, produce);
  if (!err.empty() || a.n == 0) return err;
  const int64_t t = p.tile, taps = p.kernel * p.kernel, N = c.cout, tile_rows = t * t;
  const int64_t m_rows = a.n * tile_rows;
  const int64_t panels = (N + kGemmNr - 1) / kGemmNr;
  const int64_t block_rows = conv_block_rows(m_rows, taps * a.channels * N * 4);
  const int64_t per_block = std::max<int64_t>(1, block_rows / tile_rows);
  const int64_t blocks = (a.n + per_block - 1) / per_block;
  // With fewer than 8 blocks the columns are split too, so that the threads have about 8 parts to share;
  // a thread that takes several parts of one block gathers its windows once (`gathered` below).
  const int64_t splits = blocks >= 8 ? 1 : std::min(panels, (8 + blocks - 1) / blocks);
  static std::atomic<uint64_t> calls{0};
  const uint64_t call = ++calls;
  pfor(blocks * splits, [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> windows;
    thread_local std::vector<const float*> tap_ptrs;
    thread_local uint64_t gathered_call = 0;
    thread_local int64_t gathered = -1;  // the block of call `gathered_call` whose windows are in `windows`
    for (int64_t w = begin; w < end; ++w) {
      const int64_t b = w / splits, part = w % splits;
      const int64_t j0 = b * per_block, j1 = std::min(a.n, j0 + per_block);
      const int64_t r0 = j0 * tile_rows, rows = (j1 - j0) * tile_rows;
      if (gathered_call != call || gathered != b) {
        produce.windows(plan, j0, j1, windows, tap_ptrs);
        gathered_call = call;
        gathered = b;
      }
      const int64_t n0 = panels * part / splits * kGemmNr;
      const int64_t n1 = std::min(N, panels * (part + 1) / splits * kGemmNr);
      float* y = c.out + r0 * N;
      for (int64_t r = 0; r < rows; ++r) {
        float* yr = y + r * N;
        const float* add = c.addend ? c.addend + (r0 + r) * N : nullptr;
        for (int64_t j = n0; j < n1; ++j) yr[j] = (c.bias ? c.bias[j] : 0.0f) + (add ? add[j] : 0.0f);
      }
      gemm_indirect_accumulate(rows, N, taps, a.channels, tap_ptrs.data(), c.weight, y, N, n0, n1);
    }
  });
  return {};
}

std::string tile_scatter(const ScatterParams& p, const ScatterArgs& a, const ParallelFor& pfor) {
  if ((a.cache == nullptr) == (a.cache_f16 == nullptr)) return "TileScatter: exactly one cache pointer must be set";
  const TileGrid grid = make_grid(a.height, a.width, p.tile);
  std::vector<int32_t> cells;
  std::string err = build_cell_map(grid, a.idx, a.n, "TileScatter idx", cells);
  if (!err.empty()) return err;

  // Copy of the cache (converted when float16), in chunks of 16K values so that both threads share it.
  const int64_t total = a.channels * a.height * a.width;
  constexpr int64_t kChunk = 1 << 14;
  pfor((total + kChunk - 1) / kChunk, [&](int64_t begin, int64_t end) {
    const int64_t lo = begin * kChunk, hi = std::min(total, end * kChunk);
    if (hi <= lo) return;
    if (a.cache_f16)
      halfs_to_floats(a.cache_f16 + lo, a.out + lo, hi - lo);
    else
      std::memcpy(a.out + lo, a.cache + lo, sizeof(float) * (hi - lo));
  });
  if (a.n == 0) return {};
  switch (p.activation) {
    case kIdentity: scatter_impl<kIdentity>(p, a, cells, grid, pfor); break;
    case kRelu: scatter_impl<kRelu>(p, a, cells, grid, pfor); break;
    case kLeakyRelu: scatter_impl<kLeakyRelu>(p, a, cells, grid, pfor); break;
    case kSwish: scatter_impl<kSwish>(p, a, cells, grid, pfor); break;
    default: return "TileScatter: unknown activation " + std::to_string(p.activation);
  }
  return {};
}

std::string tile_moments(const MomentsArgs& a, const ParallelFor& pfor) {
  if ((a.cache == nullptr) == (a.cache_f16 == nullptr)) return "TileMoments: exactly one cache pointer must be set";
  const TileGrid grid = make_grid(a.height, a.width, a.tile);
  for (int64_t j = 0; j < a.n; ++j) {
    if (!valid_corner(grid, a.idx[2 * j], a.idx[2 * j + 1]))
      return corner_error("TileMoments idx", grid, a.idx[2 * j], a.idx[2 * j + 1]);
  }
  const int64_t c = a.channels, t = a.tile;
  // Per-tile float sums, then a double sum in tile order: the result does not depend on how the
  // tiles were split between threads.
  std::vector<float> part(static_cast<size_t>(2 * a.n * c), 0.0f);
  pfor(a.n, [&](int64_t begin, int64_t end) {
    std::vector<float> old(static_cast<size_t>(c));
    for (int64_t j = begin; j < end; ++j) {
      const int64_t y0 = a.idx[2 * j], x0 = a.idx[2 * j + 1];
      const int64_t hh = clipped_extent(y0, t, a.height), ww = clipped_extent(x0, t, a.width);
      float* f1 = part.data() + 2 * j * c;
      float* f2 = f1 + c;
      for (int64_t py = 0; py < hh; ++py) {
        for (int64_t px = 0; px < ww; ++px) {
          const float* nv = a.tiles + ((j * t + py) * t + px) * c;
          const int64_t at = ((y0 + py) * a.width + x0 + px) * c;
          const float* ov = a.cache ? a.cache + at : old.data();
          if (a.cache_f16) halfs_to_floats(a.cache_f16 + at, old.data(), c);
          for (int64_t k = 0; k < c; ++k) {  // vectorised over channels
            const float d = nv[k] - ov[k];
            f1[k] += d;
            f2[k] += d * (nv[k] + ov[k]);
          }
        }
      }
    }
  });
  std::fill(a.sum, a.sum + c, 0.0);
  std::fill(a.sumsq, a.sumsq + c, 0.0);
  for (int64_t j = 0; j < a.n; ++j) {
    const float* f1 = part.data() + 2 * j * c;
    for (int64_t k = 0; k < c; ++k) {
      a.sum[k] += f1[k];
      a.sumsq[k] += f1[c + k];
    }
  }
  return {};
}

namespace {

// CacheStore over image rows [y0, y1): the cache's pixels of those rows, and per row its float sums
// (part + 2*y*C: sum, then sum of squares).
using StoreRows = void (*)(const StoreArgs& a, int64_t y0, int64_t y1, float* part);

// Portable: blocks of kPix pixels transposed through a buffer (vectorised over 8 channels read side
// by side), then written (converted) in one contiguous run.
void store_rows_portable(const StoreArgs& a, int64_t y0, int64_t y1, float* part) {
  const int64_t C = a.channels, W = a.width, P = a.height * W;
  constexpr int64_t kPix = 32;
  constexpr int64_t kLanes = 8;
  std::vector<float> buf(static_cast<size_t>(kPix * C));
  for (int64_t y = y0; y < y1; ++y) {
    float* s1 = part + 2 * y * C;
    float* s2 = s1 + C;
    for (int64_t x0 = 0; x0 < W; x0 += kPix) {
      const int64_t np = std::min(kPix, W - x0), p0 = y * W + x0;
      int64_t c0 = 0;
      for (; c0 + kLanes <= C; c0 += kLanes) {
        const float* src = a.x + c0 * P + p0;
        float t1[kLanes] = {}, t2[kLanes] = {};
        for (int64_t p = 0; p < np; ++p) {
          float* dst = buf.data() + p * C + c0;
          for (int64_t j = 0; j < kLanes; ++j) {
            const float v = src[j * P + p];
            t1[j] += v;
            t2[j] += v * v;
            dst[j] = v;
          }
        }
        for (int64_t j = 0; j < kLanes; ++j) {
          s1[c0 + j] += t1[j];
          s2[c0 + j] += t2[j];
        }
      }
      for (; c0 < C; ++c0) {
        const float* src = a.x + c0 * P + p0;
        for (int64_t p = 0; p < np; ++p) {
          const float v = src[p];
          s1[c0] += v;
          s2[c0] += v * v;
          buf[static_cast<size_t>(p * C + c0)] = v;
        }
      }
      if (a.out)
        std::memcpy(a.out + p0 * C, buf.data(), sizeof(float) * np * C);
      else
        floats_to_halfs(buf.data(), a.out_f16 + p0 * C, np * C);
    }
  }
}

#ifdef SSIC_F16C_DISPATCH
// 8 channels x 8 pixels in registers: 8 row loads, an 8 x 8 transpose (unpack, shuffle, permute), 8
// pixel stores of 8 channels. Measured on [128, 256, 256], 2 threads: 3.5 ms against 7.1 ms for the
// portable blocks (the 8 strided loads per pixel of those alias in L1: the channels are H*W floats apart).
template <bool Half>
__attribute__((target("avx2,fma,f16c"))) inline void store8(const StoreArgs& a, int64_t at, __m256 v) {
  if (Half)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(a.out_f16 + at), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  else
    _mm256_storeu_ps(a.out + at, v);
}

template <bool Half>
__attribute__((target("avx2,fma,f16c"))) void store_rows_avx2(const StoreArgs& a, int64_t y0, int64_t y1, float* part) {
  const int64_t C = a.channels, W = a.width, P = a.height * W;
  const int64_t c8 = C / 8 * 8, w8 = W / 8 * 8;
  for (int64_t y = y0; y < y1; ++y) {
    float* s1 = part + 2 * y * C;
    float* s2 = s1 + C;
    const int64_t row = y * W;
    for (int64_t c0 = 0; c0 < c8; c0 += 8) {
      const float* src = a.x + c0 * P + row;
      __m256 acc1 = _mm256_setzero_ps(), acc2 = _mm256_setzero_ps();
      for (int64_t p = 0; p < w8; p += 8) {
        const __m256 r0 = _mm256_loadu_ps(src + p), r1 = _mm256_loadu_ps(src + P + p);
        const __m256 r2 = _mm256_loadu_ps(src + 2 * P + p), r3 = _mm256_loadu_ps(src + 3 * P + p);
        const __m256 r4 = _mm256_loadu_ps(src + 4 * P + p), r5 = _mm256_loadu_ps(src + 5 * P + p);
        const __m256 r6 = _mm256_loadu_ps(src + 6 * P + p), r7 = _mm256_loadu_ps(src + 7 * P + p);
        // pairs of channels interleaved, then quads, then the two 128-bit halves: pixel k's 8 channels
        const __m256 a0 = _mm256_unpacklo_ps(r0, r1), a1 = _mm256_unpackhi_ps(r0, r1);
        const __m256 a2 = _mm256_unpacklo_ps(r2, r3), a3 = _mm256_unpackhi_ps(r2, r3);
        const __m256 a4 = _mm256_unpacklo_ps(r4, r5), a5 = _mm256_unpackhi_ps(r4, r5);
        const __m256 a6 = _mm256_unpacklo_ps(r6, r7), a7 = _mm256_unpackhi_ps(r6, r7);
        const __m256 b0 = _mm256_shuffle_ps(a0, a2, 0x44), b1 = _mm256_shuffle_ps(a0, a2, 0xEE);
        const __m256 b2 = _mm256_shuffle_ps(a1, a3, 0x44), b3 = _mm256_shuffle_ps(a1, a3, 0xEE);
        const __m256 b4 = _mm256_shuffle_ps(a4, a6, 0x44), b5 = _mm256_shuffle_ps(a4, a6, 0xEE);
        const __m256 b6 = _mm256_shuffle_ps(a5, a7, 0x44), b7 = _mm256_shuffle_ps(a5, a7, 0xEE);
        const __m256 px[8] = {_mm256_permute2f128_ps(b0, b4, 0x20), _mm256_permute2f128_ps(b1, b5, 0x20),
                              _mm256_permute2f128_ps(b2, b6, 0x20), _mm256_permute2f128_ps(b3, b7, 0x20),
                              _mm256_permute2f128_ps(b0, b4, 0x31), _mm256_permute2f128_ps(b1, b5, 0x31),
                              _mm256_permute2f128_ps(b2, b6, 0x31), _mm256_permute2f128_ps(b3, b7, 0x31)};
        for (int k = 0; k < 8; ++k) {
          acc1 = _mm256_add_ps(acc1, px[k]);
          acc2 = _mm256_fmadd_ps(px[k], px[k], acc2);
          store8<Half>(a, (row + p + k) * C + c0, px[k]);
        }
      }
      for (int64_t p = w8; p < W; ++p) {  // the row's last W % 8 pixels
        alignas(32) float v[8];
        for (int64_t j = 0; j < 8; ++j) v[j] = src[j * P + p];
        const __m256 pv = _mm256_load_ps(v);
        acc1 = _mm256_add_ps(acc1, pv);
        acc2 = _mm256_fmadd_ps(pv, pv, acc2);
        store8<Half>(a, (row + p) * C + c0, pv);
      }
      _mm256_storeu_ps(s1 + c0, acc1);
      _mm256_storeu_ps(s2 + c0, acc2);
    }
    for (int64_t c = c8; c < C; ++c) {  // the last C % 8 channels
      const float* src = a.x + c * P + row;
      for (int64_t p = 0; p < W; ++p) {
        const float v = src[p];
        s1[c] += v;
        s2[c] += v * v;
        if (Half)
          a.out_f16[(row + p) * C + c] = float_to_half(v);
        else
          a.out[(row + p) * C + c] = v;
      }
    }
  }
}
#endif

StoreRows pick_store_rows(bool half) {
#ifdef SSIC_F16C_DISPATCH
  if (avx2_fma_usable() && f16c_usable()) return half ? store_rows_avx2<true> : store_rows_avx2<false>;
#endif
  (void)half;
  return store_rows_portable;
}

}  // namespace

std::string cache_store(const StoreArgs& a, const ParallelFor& pfor) {
  if ((a.out == nullptr) == (a.out_f16 == nullptr)) return "CacheStore: exactly one output pointer must be set";
  static const StoreRows rows_f32 = pick_store_rows(false), rows_f16 = pick_store_rows(true);
  const StoreRows rows = a.out ? rows_f32 : rows_f16;
  const int64_t C = a.channels, H = a.height;
  std::vector<float> part(static_cast<size_t>(2 * H * C), 0.0f);  // per image row: sum, sum of squares
  pfor(H, [&](int64_t y0, int64_t y1) { rows(a, y0, y1, part.data()); });
  std::fill(a.sum, a.sum + C, 0.0);
  std::fill(a.sumsq, a.sumsq + C, 0.0);
  for (int64_t y = 0; y < H; ++y) {
    const float* s1 = part.data() + 2 * y * C;
    for (int64_t c = 0; c < C; ++c) {
      a.sum[c] += s1[c];
      a.sumsq[c] += s1[C + c];
    }
  }
  return {};
}

namespace {

template <int64_t Act>
void affine_rows(const AffineArgs& a, const ParallelFor& pfor) {
  const ActArgs act = act_args(a.alpha);
  const int64_t c = a.channels;
  const int64_t block = std::max<int64_t>(1, 16384 / std::max<int64_t>(c, 1));  // rows per chunk
  pfor((a.rows + block - 1) / block, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin * block; r < std::min(a.rows, end * block); ++r)
      transform<Act, true>(a.x + r * c, 1, a.scale, a.shift, act, a.y + r * c, c);
  });
}

}  // namespace

std::string tile_affine(const AffineArgs& a, const ParallelFor& pfor) {
  switch (a.activation) {
    case kIdentity: affine_rows<kIdentity>(a, pfor); break;
    case kRelu: affine_rows<kRelu>(a, pfor); break;
    case kLeakyRelu: affine_rows<kLeakyRelu>(a, pfor); break;
    case kSwish: affine_rows<kSwish>(a, pfor); break;
    default: return "TileAffine: unknown activation " + std::to_string(a.activation);
  }
  return {};
}

std::string group_norm_affine(const GroupNormAffineArgs& a) {
  if (a.groups < 1 || a.channels % a.groups != 0)
    return "GroupNormAffine: " + std::to_string(a.channels) + " channels are not a multiple of groups=" +
           std::to_string(a.groups);
  if (a.count < 1) return "GroupNormAffine: count must be >= 1";
  const int64_t per = a.channels / a.groups;
  const double n = static_cast<double>(a.count);
  for (int64_t g = 0; g < a.groups; ++g) {
    double s1 = 0.0, s2 = 0.0;
    for (int64_t k = g * per; k < (g + 1) * per; ++k) {
      a.new_sum[k] = a.sum[k] + a.dsum[k];
      a.new_sumsq[k] = a.sumsq[k] + a.dsumsq[k];
      s1 += a.new_sum[k];
      s2 += a.new_sumsq[k];
    }
    const double mean = s1 / n;
    const double inv = 1.0 / std::sqrt(s2 / n - mean * mean + a.epsilon);
    for (int64_t k = g * per; k < (g + 1) * per; ++k) {
      const double scale = inv * a.gamma[k];
      a.scale[k] = static_cast<float>(scale);
      a.shift[k] = static_cast<float>(a.beta[k] - mean * scale);
    }
  }
  return {};
}

}  // namespace ssic
