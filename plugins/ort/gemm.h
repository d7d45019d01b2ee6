// Single-precision indirect GEMM on a packed right-hand side, the matrix half of ssic::TileConv
// (kernels.cpp reads each output tile's source window once and hands over pointers into it; this
// multiplies a block of rows while the windows are in cache).
//
// Blocking follows the BLIS/GotoBLAS scheme (Goto & van de Geijn, "Anatomy of high-performance matrix
// multiplication", ACM TOMS 2008): the right-hand side is stored as panels of kNr = 16 columns
// ([ceil(N/16), K, 16], packed once by the compiler), K is cut into slices of about kKc that keep one
// panel slice in L1 while a 6 x 16 register tile of C accumulates. The micro-kernel is picked at
// run time: AVX2+FMA where the CPU has it (SSIC_DISABLE_AVX2=1 forces the portable path), else
// portable C++ that the compiler vectorises for the baseline ISA.
#pragma once

#include <cstdint>

namespace ssic {

constexpr int64_t kGemmNr = 16;  // columns per packed panel

// Indirect GEMM: C[0:m, n0:n1] += sum over taps t of A_t[0:m, 0:ch] * B[t*ch:(t+1)*ch, n0:n1], where row r
// of A_t is the ch floats at rows[r*taps + t]. A convolution's im2col row is never written: each tap points
// into a source window gathered once (the indirection buffer of M. Dukhan, "The Indirect Convolution
// Algorithm", 2019). B: packed [ceil(n/16), taps*ch, 16] (zero-padded columns; K tap-major, as an im2col
// row); C: row-major, row stride ldc; n0 a multiple of 16, n1 <= n (the full column count).
void gemm_indirect_accumulate(int64_t m, int64_t n, int64_t taps, int64_t ch, const float* const* rows,
                              const float* b_packed, float* c, int64_t ldc, int64_t n0, int64_t n1);

// Name of the micro-kernel in use ("avx2-fma" or "portable"), for diagnostics and tests.
const char* gemm_kernel_name();

// Whether environment variable `name` is set to something other than "" or "0" (SSIC_DISABLE_AVX2,
// SSIC_DISABLE_F16C: the switches that force the portable paths).
bool env_flag_on(const char* name);

// Whether AVX2 and FMA code may run: the CPU has both and SSIC_DISABLE_AVX2 is unset (or 0). Every
// AVX2 path of the library asks here (the micro-kernel above, CacheStore's transpose in kernels.cpp).
bool avx2_fma_usable();

}  // namespace ssic
