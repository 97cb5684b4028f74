// Numeric kernels for sparse x dense products. Plain C++: pointers, sizes and
// leading dimensions only, no XLA types, so they can be tested and benchmarked
// on their own.
//
// A sparse matrix S is given in compressed rows: row r owns the entries
// p in [indptr[r], indptr[r + 1]), entry p sits in column indices[p] with value
// values[p]. Dense operands are row-major with the batch as the contiguous
// (minor) dimension, so every entry of S costs one broadcast multiply-add over
// the batch.
#pragma once

#include <cstdint>

namespace sparseprop {

struct KernelTable {
  // out[r, :] = sum_p values[p] * dense[indices[p], :] for rows r in
  // [row_begin, row_end). Every row of the range is written (empty rows get 0).
  void (*spmm_rows)(const int32_t* indptr, const int32_t* indices,
                    const float* values, const float* dense, int64_t ld_dense,
                    float* out, int64_t ld_out, int64_t batch,
                    int64_t row_begin, int64_t row_end);

  // out_values[p] = <row_operand[r, :], col_operand[indices[p], :]> for every
  // entry p of rows r in [row_begin, row_end): a sampled dense-dense product,
  // one dot product of length `batch` per entry.
  void (*sddmm_rows)(const int32_t* indptr, const int32_t* indices,
                     const float* row_operand, int64_t ld_row,
                     const float* col_operand, int64_t ld_col,
                     float* out_values, int64_t batch, int64_t row_begin,
                     int64_t row_end);
};

// One table per instruction set, each compiled in its own translation unit
// with its own target flags (see CMakeLists.txt).
namespace scalar { extern const KernelTable kKernels; }
namespace avx2 { extern const KernelTable kKernels; }
namespace avx512 { extern const KernelTable kKernels; }

}  // namespace sparseprop
