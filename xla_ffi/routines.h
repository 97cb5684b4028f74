// Numeric routines for sparse x dense products. Plain C++: pointers, sizes and
// strides only, no XLA types, so they can be tested and benchmarked alone.
//
// A sparse matrix is given in compressed rows: row r owns the entries
// p in [indptr[r], indptr[r + 1]) with values[p]. Instead of a column index,
// each entry carries an element offset into the dense operand: the start of a
// contiguous run of `length` floats it multiplies. The same two routines then
// serve every pass of the linear layer (offset = column * batch) and of the
// convolutions (offset = a shifted window of the padded input).
//
// The routines run over a grid of positions (i, j): position q = i * n_inner + j
// reads the dense input from `in + i * in_outer + j * in_inner` and its output
// rows at `out + i * out_outer + j * out_inner`. A linear layer is a 1 x 1 grid.
#pragma once

#include <cstdint>

#include "bfloat16.h"

namespace sparseprop {

struct Grid {
  int64_t n_outer = 1, n_inner = 1;
  int64_t in_outer = 0, in_inner = 0;
  int64_t out_outer = 0, out_inner = 0;
  int64_t size() const { return n_outer * n_inner; }
};

// The linear layer's transposed operands are cut into tiles of this many
// batch columns: tile t holds columns [t * kBatchTile, t * kBatchTile +
// width(t)) of every row, stored from t * kBatchTile * rows on as
// [rows][width(t)], width(t) = min(kBatchTile, batch - t * kBatchTile). A
// product then reads its scattered rows from one tile, small enough for the
// core's L2 cache (3072 rows x 64 = 768 KiB), instead of from the whole
// matrix. 64 floats fill the routines' registers (4 AVX-512 vectors) and
// measured faster than 32 or 128 (see benchmarks/results/NOTES.md).
constexpr int64_t kBatchTile = 64;

// The tiles of a batch of `batch` columns: tile t starts at column first(t)
// and is width(t) wide (the last one may be narrower).
struct BatchTiles {
  int64_t batch;
  int64_t count() const { return (batch + kBatchTile - 1) / kBatchTile; }
  int64_t first(int64_t t) const { return t * kBatchTile; }
  int64_t width(int64_t t) const {
    return batch - first(t) < kBatchTile ? batch - first(t) : kBatchTile;
  }
};

// The window geometry of a max pool over an NHWC image of h x w pixels and
// c channels: windows of kh x kw with strides sh, sw, the image at
// (pad_top, pad_left) in the padded plane, ho x wo windows. A window's tap
// t (row-major in the window) reads pixel (i * sh - pad_top + t / kw,
// j * sw - pad_left + t % kw) for window (i, j).
struct PoolGeometry {
  int64_t h, w, c, ho, wo, kh, kw, sh, sw, pad_top, pad_left;
};

// One instruction set's numeric routines (routines_<isa>.cc) over dense
// operands stored as T (float or BFloat16); the dispatch table of
// simd_dispatch.cc lists every instruction set's tables. Whatever T, the
// products multiply and accumulate in float32: the values, the block
// buffers and the sums are float, and only the dense operands (the runs the
// products read, the bulk of their traffic) are T. The dense convolution and
// the norm-pool routines exist for float only (nullptr in the BFloat16
// tables): their handlers take float32 alone.
template <typename T>
struct RoutinesFor {
  // For grid positions q in [q_begin, q_end) and rows r in [row_begin, row_end):
  //   out_q[r * ld_row + l] = sum_p values[p] * in_q[offsets[p] + l],  l < length.
  // Every output element of the range is written (empty rows get 0).
  void (*spmm)(const int32_t* indptr, const int64_t* offsets, const float* values,
               const T* in, float* out, int64_t ld_row, int64_t length,
               const Grid& grid, int64_t q_begin, int64_t q_end, int64_t row_begin,
               int64_t row_end);

  // The sampled dense-dense product (the weight gradient): for every entry p of
  // rows r in [row_begin, row_end),
  //   out_values[p] (+)= sum_q sum_l rows_q[r * ld_row + l] * in_q[offsets[p] + l]
  // over the grid positions q in [q_begin, q_end), where rows_q is the
  // output-side operand at position q; added to out_values if `accumulate`,
  // else written. Each entry is summed in an order fixed by its row, so for a
  // fixed sequence of position ranges the results are deterministic.
  void (*sddmm)(const int32_t* indptr, const int64_t* offsets, const T* rows,
                int64_t ld_row, const T* in, float* out_values, int64_t length,
                const Grid& grid, int64_t q_begin, int64_t q_end, int64_t row_begin,
                int64_t row_end, bool accumulate);

  // The linear layer's forms, over operands transposed so that the batch is
  // minor and cut into tiles (kBatchTile):
  //   spmm_indexed, on one tile of `length` columns, where entry p's run
  //   starts at indices[p] * ld_in (no offset table needed; ld_in is
  //   `length` in a tile, the whole batch in the untiled x^T):
  //     out[r * ld_row + l] = sum_p values[p] * in[indices[p] * ld_in + l];
  //   sddmm_indexed, on tiled operands of `batch` columns, `rows` with
  //   n_rows rows and `in` with n_in rows:
  //     out_values[p] (+)= sum_b rows[r, b] * in[indices[p], b],
  //   added to out_values if `accumulate`, else written. (Called on one tile
  //   at a time, with accumulate for the tiles after the first, it reads
  //   `in` from one tile at a time.)
  void (*spmm_indexed)(const int32_t* indptr, const int32_t* indices, const float* values,
                       const T* in, int64_t ld_in, float* out, int64_t ld_row,
                       int64_t length, int64_t row_begin, int64_t row_end);
  void (*sddmm_indexed)(const int32_t* indptr, const int32_t* indices, const T* rows,
                        int64_t n_rows, const T* in, int64_t n_in, float* out_values,
                        int64_t batch, int64_t row_begin, int64_t row_end, bool accumulate);

  // Both backward products of the linear layer in one pass, over one tile of
  // `length` batch columns, for the rows m in [row_begin, row_end) of the
  // transposed pattern (indptr/indices: W by columns, values in that order):
  //   dx[m * length + l] = sum_p values[p] * dy[indices[p] * length + l]
  //   sums[p] (+)= sum_l dy[indices[p] * length + l] * x[m * ld_x + l]
  // with the sums in the transposed pattern's order, added to if
  // `accumulate` (the tiles after the first), else written. Each sum's order
  // depends only on its row and `length`.
  void (*spmm_sddmm_indexed)(const int32_t* indptr, const int32_t* indices,
                             const float* values, const T* dy, const T* x,
                             int64_t ld_x, float* dx, float* sums, int64_t length,
                             int64_t row_begin, int64_t row_end, bool accumulate);

  // Out-of-place transpose of the columns [col_begin, col_end) of a
  // rows x cols matrix: dst[c * ld_dst + r] = src[r * ld_src + c]. `stream`
  // asks for stores past the caches where the SIMD path can write whole
  // destination lines (see streams_past_cache in ffi_common.h).
  void (*transpose)(const T* src, int64_t ld_src, T* dst, int64_t ld_dst,
                    int64_t rows, int64_t col_begin, int64_t col_end, bool stream);
  // The same from a float buffer (the products' output) into T, each element
  // rounded to the nearest T, ties to even (for float: transpose itself).
  void (*transpose_rounded)(const float* src, int64_t ld_src, T* dst, int64_t ld_dst,
                            int64_t rows, int64_t col_begin, int64_t col_end, bool stream);

  // The forward of a dense convolution over output pixels, the patches read
  // where they lie in the padded input:
  //   y[q * cout + o] = sum_{i < n_segs, r < seg} x[base[q] + i * ld_seg + r]
  //                                              * w[(i * seg + r) * cout + o]
  // for q < n_pixels and o < cout (w the kernel as [kh * kw * cin, cout]).
  void (*patch_conv)(const float* x, const int64_t* base, int64_t n_pixels, int64_t n_segs,
                     int64_t ld_seg, int64_t seg, const float* w, int64_t cout, float* y);

  // The weight gradient of a dense convolution over a block of output pixels,
  // the patches read where they lie in the padded input (no patch matrix):
  //   dw[(i * seg + r) * cout + o] +=
  //       sum_{q < n_pixels} x[base[q] + i * ld_seg + r] * dy[q * cout + o]
  // for kernel rows i < n_segs, r < seg (a kernel row's kw x cin entries,
  // contiguous in an NHWC input) and o < cout. Each sum runs over q in order.
  void (*patch_weight_grad)(const float* x, const int64_t* base, int64_t n_pixels,
                            int64_t n_segs, int64_t ld_seg, int64_t seg, const float* dy,
                            int64_t cout, float* dw);

  // The backward of BatchNorm, ReLU and max pool (in that order) on one
  // image, in two steps. The pool's forward recorded each output's winning
  // tap (`taps`); relu'd values equal to 0 (or below) pass no gradient.
  // pool_grad_sums, for the windows of output rows [i_begin, i_end):
  //   g = dpool * (pooled > 0), written to `grad`;
  //   sum_g[c] += g,  sum_gx[c] += g * (x[the winner] - shift[c])   (over the windows).
  // pool_input_grad_row, for image row `row`:
  //   dx[row, w, c] = a[c] * dz + b[c] * (x[row, w, c] - shift[c]) + d[c]
  // where dz is the sum of g over the windows whose winner is (row, w).
  void (*pool_grad_sums)(const PoolGeometry& g, const float* dpool, const float* pooled,
                         const int8_t* taps, const float* x, const float* shift,
                         int64_t i_begin, int64_t i_end, float* grad, float* sum_g,
                         float* sum_gx);
  void (*pool_input_grad_row)(const PoolGeometry& g, const float* grad, const int8_t* taps,
                              const float* x, const float* shift, const float* a,
                              const float* b, const float* d, int64_t row, float* dx);

  // Whether the linear backward runs spmm_sddmm_indexed when it wants both
  // gradients, rather than spmm_indexed and sddmm_indexed apart.
  bool one_pass_backward;

  // The instruction set whose code this is (Isa::kName): for a bfloat16
  // table, the path's name as set_simd_path takes it.
  const char* name;
};

using Routines = RoutinesFor<float>;

}  // namespace sparseprop
