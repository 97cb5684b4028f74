// Numeric kernels for sparse x dense products. Plain C++: pointers, sizes and
// strides only, no XLA types, so they can be tested and benchmarked alone.
//
// A sparse matrix is given in compressed rows: row r owns the entries
// p in [indptr[r], indptr[r + 1]) with values[p]. Instead of a column index,
// each entry carries an element offset into the dense operand: the start of a
// contiguous run of `length` floats it multiplies. The same two kernels then
// serve every pass of the linear layer (offset = column * batch) and of the
// convolutions (offset = a shifted window of the padded input).
//
// The kernels run over a grid of positions (i, j): position q = i * n_inner + j
// reads the dense input from `in + i * in_outer + j * in_inner` and its output
// rows at `out + i * out_outer + j * out_inner`. A linear layer is a 1 x 1 grid.
#pragma once

#include <cstdint>

namespace sparseprop {

struct Grid {
  int64_t n_outer = 1, n_inner = 1;
  int64_t in_outer = 0, in_inner = 0;
  int64_t out_outer = 0, out_inner = 0;
  int64_t size() const { return n_outer * n_inner; }
};

struct KernelTable {
  // For grid positions q in [q_begin, q_end) and rows r in [row_begin, row_end):
  //   out_q[r * ld_row + l] = sum_p values[p] * in_q[offsets[p] + l],  l < length.
  // Every output element of the range is written (empty rows get 0).
  void (*spmm)(const int32_t* indptr, const int64_t* offsets, const float* values,
               const float* in, float* out, int64_t ld_row, int64_t length,
               const Grid& grid, int64_t q_begin, int64_t q_end, int64_t row_begin,
               int64_t row_end);

  // The sampled dense-dense product (the weight gradient): for every entry p of
  // rows r in [row_begin, row_end),
  //   out_values[p] = sum_q sum_l rows_q[r * ld_row + l] * in_q[offsets[p] + l],
  // where rows_q is the output-side operand at grid position q. Each entry is
  // summed by one call in a fixed order, so results are deterministic.
  void (*sddmm)(const int32_t* indptr, const int64_t* offsets, const float* rows,
                int64_t ld_row, const float* in, float* out_values, int64_t length,
                const Grid& grid, int64_t row_begin, int64_t row_end);

  // The linear layer's forms (a 1 x 1 grid over runs of `length` floats, the
  // batch): entry p's run starts at indices[p] * length, so no offset table
  // is needed:
  //   out[r * ld_row + l] = sum_p values[p] * in[indices[p] * length + l];
  //   out_values[p] = sum_l rows[r * length + l] * in[indices[p] * length + l].
  void (*spmm_indexed)(const int32_t* indptr, const int32_t* indices, const float* values,
                       const float* in, float* out, int64_t ld_row, int64_t length,
                       int64_t row_begin, int64_t row_end);
  void (*sddmm_indexed)(const int32_t* indptr, const int32_t* indices, const float* rows,
                        const float* in, float* out_values, int64_t length,
                        int64_t row_begin, int64_t row_end);

  // Out-of-place transpose of the columns [col_begin, col_end) of a
  // rows x cols matrix: dst[c * ld_dst + r] = src[r * ld_src + c].
  void (*transpose)(const float* src, int64_t ld_src, float* dst, int64_t ld_dst,
                    int64_t rows, int64_t col_begin, int64_t col_end);
};

// One table per instruction set, each compiled in its own translation unit
// with its own target flags (see CMakeLists.txt).
namespace scalar { extern const KernelTable kKernels; }
namespace avx2 { extern const KernelTable kKernels; }
namespace avx512 { extern const KernelTable kKernels; }

}  // namespace sparseprop
