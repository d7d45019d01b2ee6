// CPU kernels of the ssic ops, independent of ONNX Runtime (semantics: docs/architecture.md,
// reference: ssic/ops.py). The ORT binding (ssic_ort.cpp) validates inputs and supplies a
// parallel-for; everything here is plain loops over raw pointers.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace ssic {

enum Activation : int64_t { kIdentity = 0, kRelu = 1, kLeakyRelu = 2, kSwish = 3 };

// Runs body(begin, end) over [0, total) in chunks, possibly in parallel.
using ParallelFor = std::function<void(int64_t total, const std::function<void(int64_t, int64_t)>& body)>;

struct GatherParams {
  int64_t src_tile, tile, kernel, stride, pad_top, pad_left, upsample;
  int64_t activation;
  float alpha;
  int64_t src_layout;  // 0 NHWC [Hs, Ws, C], 1 NCHW [1, C, Hs, Ws]
  int64_t pad_mode;    // 0 zeros, 1 reflect, 2 edge (PadMode in tile_geometry.h)
};

// A cache is float32 or float16 (IEEE binary16 bits): exactly one of cache / cache_f16 is set; a
// float16 value is converted to float32 as it is read.
struct GatherArgs {
  const float* tiles;    // [m*ts*ts, C]
  const float* cache;    // NHWC or NCHW, float32 (or nullptr)
  const uint16_t* cache_f16;  // NHWC or NCHW, float16 (or nullptr)
  const int64_t* src_idx;  // [m, 2]
  const int64_t* dst_idx;  // [n, 2]
  const float* scale;    // [C] or nullptr
  const float* shift;    // [C] or nullptr
  int64_t m, n, hs, ws, channels;
  float* cols;           // [n*t*t, k*k*C]
};

struct ScatterParams {
  int64_t tile;
  int64_t activation;
  float alpha;
};

struct ScatterArgs {
  const float* tiles;     // [n*t*t, C]
  const float* cache;     // [1, C, H, W], float32 (or nullptr)
  const uint16_t* cache_f16;  // [1, C, H, W], float16 (or nullptr)
  const int64_t* idx;     // [n, 2]
  const float* residual;  // [n*t*t, C] or nullptr
  int64_t n, height, width, channels;
  float* out;             // [1, C, H, W]
};

// The matrix half of TileConv: out = gathered rows [M, K] x W [K, cout] + bias + addend.
struct ConvArgs {
  const float* weight;  // W packed as [ceil(cout/16), K, 16] (gemm.h), zero-padded columns
  const float* bias;    // [cout] or nullptr
  const float* addend;  // [M, cout] or nullptr (a partial sum: conv of a channel concat)
  int64_t cout;
  float* out;           // [M, cout], M = n*t*t
};

// Rows per block of TileConv: one K slice of the block's source rows stays in L2 while every column panel
// of the weights multiplies it, and each block reads all of the weights once more.
constexpr int64_t kConvBlockRows = 96;       // weights that stay in L2: small blocks balance the threads
constexpr int64_t kConvBlockRowsMax = 384;   // weights that stream from L3/DRAM: few blocks, columns split
constexpr int64_t kConvResidentWeights = 1 << 20;  // bytes of weights taken to stay in L2

// Rows per block for an M-row TileConv whose packed weights take `weight_bytes`: up to kConvBlockRows
// rows (fewer for small M, about 16 blocks to balance) when the weights stay in L2; up to
// kConvBlockRowsMax when they do not, where every block more reads all the weights from memory again
// (GauGAN's 1024-channel convs at the 16x32 level, M = 144, read their 37.7 MB of weights six times in
// 24-row blocks; a GauGAN 1.2% edit with the weights cold ran 262 -> 233 ms with this rule, DDIM 5% and
// PD 1.2% 2-3% faster; 576-row blocks measured the same as 384).
inline int64_t conv_block_rows(int64_t m_rows, int64_t weight_bytes) {
  if (weight_bytes > kConvResidentWeights) return std::min(m_rows, kConvBlockRowsMax);
  if (m_rows <= kConvBlockRows) return m_rows;
  return std::max<int64_t>(24, std::min<int64_t>(kConvBlockRows, m_rows / 16));
}

// TileMoments: the change of the per-channel sums under the active tiles (ssic/ops.py tile_moments_ref).
struct MomentsArgs {
  const float* tiles;         // [n*t*t, C] new values
  const float* cache;         // [H, W, C] NHWC, float32 (or nullptr)
  const uint16_t* cache_f16;  // [H, W, C] NHWC, float16 (or nullptr)
  const int64_t* idx;         // [n, 2]
  int64_t n, tile, height, width, channels;
  double* sum;                // [C]: sum of new - old over the tiles' in-image pixels
  double* sumsq;              // [C]: sum of (new - old) * (new + old)
};

// CacheStore: a prime-run activation written as its NHWC cache, with its per-channel moments.
struct StoreArgs {
  const float* x;        // [C, H*W]: the NCHW activation of batch 1
  int64_t channels, height, width;
  float* out;            // [H*W, C] float32 (or nullptr)
  uint16_t* out_f16;     // [H*W, C] float16 bits, rounded to nearest even (or nullptr)
  double* sum;           // [C]: sum of x over the image
  double* sumsq;         // [C]: sum of x * x
};

// GroupNormAffine: a GroupNorm's per-channel scale and shift from its updated sums
// (ssic/ops.py group_norm_affine_ref).
struct GroupNormAffineArgs {
  const double *sum, *sumsq, *dsum, *dsumsq, *gamma, *beta;  // [C] each
  int64_t channels, groups, count;                         // count: elements per group
  double epsilon;
  double *new_sum, *new_sumsq;                             // [C]: sum + dsum, sumsq + dsumsq
  float *scale, *shift;                                    // [C]
};

// TileAffine: y = act(x * scale + shift) per channel over the rows of a tile tensor
// (ssic/ops.py tile_affine_ref).
struct AffineArgs {
  const float* x;                      // [rows, C]
  const float *scale, *shift;          // [C]
  int64_t rows, channels, activation;  // activation: an Activation code
  float alpha;                         // leaky relu slope
  float* y;                            // [rows, C]
};

// float16 (IEEE binary16 bits) -> float32, exact for every value (subnormals, infinities, NaNs).
float half_to_float(uint16_t h);
// dst[i] = half_to_float(src[i]) for i < n: F16C instructions where the CPU has them (checked at run
// time; SSIC_DISABLE_F16C=1 in the environment forces the portable path), else portable code.
void halfs_to_floats(const uint16_t* src, float* dst, int64_t n);
// float32 -> float16 bits rounded to nearest even (as numpy's astype and ONNX Cast): overflow to +-inf,
// subnormal results where the magnitude is below 2^-14, NaN stays NaN (quiet).
uint16_t float_to_half(float f);
// dst[i] = float_to_half(src[i]) for i < n: F16C where the CPU has it (SSIC_DISABLE_F16C=1 forces the
// portable path).
void floats_to_halfs(const float* src, uint16_t* dst, int64_t n);

// Both return an empty string on success, else an error message (no exceptions cross threads).
std::string tile_gather(const GatherParams& p, const GatherArgs& a, const ParallelFor& pfor);
// TileGather's rows multiplied block by block without forming them: each output tile's source window is
// read once and the GEMM reads its taps through pointers (gemm_indirect_accumulate; args.cols unused).
std::string tile_conv(const GatherParams& p, const GatherArgs& a, const ConvArgs& c, const ParallelFor& pfor);
std::string tile_scatter(const ScatterParams& p, const ScatterArgs& a, const ParallelFor& pfor);
// One pass over each tile's rows and the cache under it; per-tile float sums added up in double.
std::string tile_moments(const MomentsArgs& a, const ParallelFor& pfor);
// One pass over x: blocks of pixels transposed through a small buffer, image rows split between the
// threads; per-row float sums added up in double in row order (the same result for any thread count).
std::string cache_store(const StoreArgs& a, const ParallelFor& pfor);
// Row blocks of about 16K values split between the threads; swish through the vectorised exp.
std::string tile_affine(const AffineArgs& a, const ParallelFor& pfor);
// [C] work only: one thread, channels in order within each group.
std::string group_norm_affine(const GroupNormAffineArgs& a);

}  // namespace ssic
