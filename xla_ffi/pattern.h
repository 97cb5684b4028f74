// A sparse weight's pattern as the handlers receive it, and its validation.
//
// The pattern's arrays are pytree leaves, so any tree map over a model's
// state, a cast, or a checkpoint can change them; the handlers therefore
// validate every pattern they read, on every call, before any result of
// theirs is used. A pattern (indptr, indices) of `rows` x `cols` is valid
// when indptr runs from 0 to nnz without decreasing and each row's indices
// strictly increase within [0, cols): it then has no duplicate entries and
// stands for exactly the dense matrix that SparseWeight.to_dense() builds.
//
// The input gradient reads the same nonzeros grouped the other way: the
// transposed pattern (t_indptr, t_indices) with the permutation t_perm into
// the values. It is consistent with the pattern when it is valid itself and
// each of its entries p, in row m with index n, maps to an entry q = t_perm[p]
// of the pattern's row n whose index is m. Since the transposed pattern has
// no duplicates, two of its entries never map to the same q, so with equal
// nnz the map is a bijection: both describe the same nonzeros, and every
// value and every weight-gradient entry is read or written exactly once.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "ffi_common.h"

namespace sparseprop {

// A compressed-rows pattern operand pair (indptr, indices), possibly stacked.
struct Pattern {
  const int32_t* indptr = nullptr;
  const int32_t* indices = nullptr;
  Stack indptr_stack, indices_stack;
  int64_t rows = 0, cols = 0, nnz = 0;
  const int32_t* row_ptr(int64_t v) const { return indptr + slice_offset(indptr_stack, v); }
  const int32_t* col_idx(int64_t v) const { return indices + slice_offset(indices_stack, v); }
};

// Decodes a pattern of `rows` x `cols` used in a call whose results are
// stacked like `result`, and validates its row pointers (O(rows)) and, unless
// `rows_checked_by_tasks`, its indices (check_rows, O(nnz)). With
// `rows_checked_by_tasks`, each task calls check_rows (or
// check_transposed_rows) on its own rows before it reads them, in parallel.
ffi::Error decode_pattern(ffi::Buffer<ffi::S32> indptr, ffi::Buffer<ffi::S32> indices,
                          int64_t rows, int64_t cols, const Stack& result, const char* op,
                          const char* name, Pattern* out, bool rows_checked_by_tasks = false);

// Error unless the indices of rows [row_begin, row_end) of slice v strictly
// increase within each row and lie in [0, cols). The row pointers must have
// been validated (decode_pattern).
ffi::Error check_rows(const Pattern& pat, int64_t v, int64_t row_begin, int64_t row_end,
                      const char* op, const char* name);

// Error unless every perm[p], p in [lo, hi), lies in [0, nnz): what a gather
// or scatter through the permutation needs to stay in bounds.
ffi::Error check_permutation(const int32_t* perm, int64_t lo, int64_t hi, int64_t nnz,
                             const char* op, const char* name);

// Error unless rows [row_begin, row_end) of slice v of the transposed pattern
// `tpat` are valid (check_rows) and each of their entries maps through
// `perm` (slice v's t_perm) to the matching entry of `pat` (see above).
// Run over all rows of a slice, it proves the two consistent; together with
// the nnz check of decode time, it also validates `pat`'s indices.
ffi::Error check_transposed_rows(const Pattern& tpat, const int32_t* perm, const Pattern& pat,
                                 int64_t v, int64_t row_begin, int64_t row_end,
                                 const char* op);

// Decodes what the linear layer's input gradient reads besides dy, for a
// call stacked like `result`: the values (`vs`), the transposed pattern of
// the decoded `pat` (`tpat`, its indices left to check_transposed_rows) and
// its permutation into the values (`ps`), each checked to hold pat's nnz
// entries.
ffi::Error decode_transposed(ffi::Span<const int64_t> values_dims, ffi::Buffer<ffi::S32> t_indptr,
                             ffi::Buffer<ffi::S32> t_indices, ffi::Buffer<ffi::S32> t_perm,
                             const Pattern& pat, const Stack& result, const char* op,
                             Stack* vs, Pattern* tpat, Stack* ps);

// The routines' offsets `offset(index)` of every entry, for each stacked slice of
// the pattern's indices; `of(v)` finds the one result slice v reads.
struct EntryOffsets {
  std::shared_ptr<std::vector<int64_t>> data;
  int64_t nnz = 0;
  Stack stack;  // the indices' stacking
  const int64_t* of(int64_t v) const { return data->data() + stack.index(v) * nnz; }
};
EntryOffsets entry_offsets(const Pattern& pat, const std::function<int64_t(int32_t)>& offset);

}  // namespace sparseprop
