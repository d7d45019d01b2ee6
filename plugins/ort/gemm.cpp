// Indirect SGEMM on a packed right-hand side, the matrix half of ssic::TileConv. See gemm.h.
#include "gemm.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define SSIC_AVX2_DISPATCH 1
#endif

namespace ssic {
namespace {

constexpr int64_t kMr = 6;    // rows of the register tile
constexpr int64_t kKc = 256;  // K slice: a 256 x 16 panel slice (16 KiB) stays in L1

// c[r, 0:16] += sum over ntaps taps t and cn channels p of a[t][r][a_off + p] * b[(t*cn + p), 0:16] for
// r < MR: a is a [ntaps][kMr] table of row pointers, b the matching ntaps*cn rows of one packed panel.
using IndirectKernel = void (*)(int64_t ntaps, int64_t cn, const float* const* a, int64_t a_off, const float* b,
                                float* c, int64_t ldc);

template <int MR>
void micro_indirect_portable(int64_t ntaps, int64_t cn, const float* const* a, int64_t a_off, const float* b,
                             float* c, int64_t ldc) {
  float acc[MR][kGemmNr];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < kGemmNr; ++j) acc[r][j] = c[r * ldc + j];
  for (int64_t t = 0; t < ntaps; ++t) {
    for (int64_t p = 0; p < cn; ++p, b += kGemmNr) {
      for (int r = 0; r < MR; ++r) {
        const float av = a[t * kMr + r][a_off + p];
        for (int j = 0; j < kGemmNr; ++j) acc[r][j] += av * b[j];
      }
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < kGemmNr; ++j) c[r * ldc + j] = acc[r][j];
}

#ifdef SSIC_AVX2_DISPATCH
// 6 x 16 register tile: 12 accumulators, two B vectors and one broadcast of A per row and k.
template <int MR>
__attribute__((target("avx2,fma"))) void micro_indirect_avx2(int64_t ntaps, int64_t cn, const float* const* a,
                                                              int64_t a_off, const float* b, float* c, int64_t ldc) {
  __m256 lo[MR], hi[MR];
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
    lo[r] = _mm256_loadu_ps(c + r * ldc);
    hi[r] = _mm256_loadu_ps(c + r * ldc + 8);
  }
  for (int64_t t = 0; t < ntaps; ++t) {
    const float* ar[MR];
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) ar[r] = a[t * kMr + r] + a_off;
    for (int64_t p = 0; p < cn; ++p, b += kGemmNr) {
      const __m256 b0 = _mm256_loadu_ps(b);
      const __m256 b1 = _mm256_loadu_ps(b + 8);
#pragma GCC unroll 6
      for (int r = 0; r < MR; ++r) {
        const __m256 av = _mm256_broadcast_ss(ar[r] + p);
        lo[r] = _mm256_fmadd_ps(av, b0, lo[r]);
        hi[r] = _mm256_fmadd_ps(av, b1, hi[r]);
      }
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
    _mm256_storeu_ps(c + r * ldc, lo[r]);
    _mm256_storeu_ps(c + r * ldc + 8, hi[r]);
  }
}
#endif

struct Kernels {
  IndirectKernel rows[kMr + 1];  // rows[r]: an r-row register tile (1..6)
  const char* name;
};

Kernels pick_kernels() {
#ifdef SSIC_AVX2_DISPATCH
  if (avx2_fma_usable()) {
    return {{nullptr, micro_indirect_avx2<1>, micro_indirect_avx2<2>, micro_indirect_avx2<3>, micro_indirect_avx2<4>,
             micro_indirect_avx2<5>, micro_indirect_avx2<6>},
            "avx2-fma"};
  }
#endif
  return {{nullptr, micro_indirect_portable<1>, micro_indirect_portable<2>, micro_indirect_portable<3>,
           micro_indirect_portable<4>, micro_indirect_portable<5>, micro_indirect_portable<6>},
          "portable"};
}

const Kernels& kernels() {
  static const Kernels k = pick_kernels();
  return k;
}

}  // namespace

bool env_flag_on(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && v[0] != '\0' && v[0] != '0';
}

bool avx2_fma_usable() {
  if (env_flag_on("SSIC_DISABLE_AVX2")) return false;
#ifdef SSIC_AVX2_DISPATCH
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

const char* gemm_kernel_name() { return kernels().name; }

void gemm_indirect_accumulate(int64_t m, int64_t n, int64_t taps, int64_t ch, const float* const* rows,
                              const float* b_packed, float* c, int64_t ldc, int64_t n0, int64_t n1) {
  const Kernels& ks = kernels();
  const int64_t k = taps * ch;
  // the row pointers regrouped per register tile: [ceil(m/6)][taps][6]
  thread_local std::vector<const float*> table;
  const int64_t row_tiles = (m + kMr - 1) / kMr;
  table.assign(static_cast<size_t>(row_tiles * taps * kMr), nullptr);
  for (int64_t r = 0; r < m; ++r)
    for (int64_t t = 0; t < taps; ++t)
      table[static_cast<size_t>(((r / kMr) * taps + t) * kMr + r % kMr)] = rows[r * taps + t];
  // K slices of about kKc that do not split a tap unless a tap alone is longer
  const int64_t group = ch >= kKc ? 1 : kKc / ch;
  const int64_t chunk = ch >= kKc ? kKc : ch;
  float edge[kMr * kGemmNr];
  for (int64_t t0 = 0; t0 < taps; t0 += group) {
    const int64_t nt = std::min(group, taps - t0);
    for (int64_t c0 = 0; c0 < ch; c0 += chunk) {
      const int64_t cn = std::min(chunk, ch - c0);
      const int64_t koff = t0 * ch + c0;
      for (int64_t j0 = n0; j0 < n1; j0 += kGemmNr) {
        const float* panel = b_packed + ((j0 / kGemmNr) * k + koff) * kGemmNr;
        const int64_t cols = std::min(kGemmNr, n - j0);
        for (int64_t i0 = 0; i0 < m; i0 += kMr) {
          const int64_t nrows = std::min(kMr, m - i0);
          const float* const* ap = table.data() + ((i0 / kMr) * taps + t0) * kMr;
          float* cp = c + i0 * ldc + j0;
          if (cols == kGemmNr) {
            ks.rows[nrows](nt, cn, ap, c0, panel, cp, ldc);
            continue;
          }
          for (int64_t r = 0; r < nrows; ++r) {
            std::memcpy(edge + r * kGemmNr, cp + r * ldc, sizeof(float) * cols);
            std::memset(edge + r * kGemmNr + cols, 0, sizeof(float) * (kGemmNr - cols));
          }
          ks.rows[nrows](nt, cn, ap, c0, panel, edge, kGemmNr);
          for (int64_t r = 0; r < nrows; ++r) std::memcpy(cp + r * ldc, edge + r * kGemmNr, sizeof(float) * cols);
        }
      }
    }
  }
}

}  // namespace ssic
