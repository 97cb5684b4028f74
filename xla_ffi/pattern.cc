#include "pattern.h"

#include <algorithm>
#include <climits>
#include <cstring>
#include <string>

#include "permute.h"

namespace sparseprop {
namespace {

// Whether some v[p], p in [lo, hi), lies outside [0, bound). The checks run
// on every call over every entry, so the common case has no branch per
// entry: the top bit of x | (last - x) is set exactly when x < 0 or
// x > last, so four entries at a time are ORed (GCC vector extensions:
// SSE2, NEON).
bool any_outside(const int32_t* v, int64_t lo, int64_t hi, int64_t bound) {
  typedef uint32_t u32x4 __attribute__((vector_size(16)));
  // bound 0: last wraps to 2^32 - 1, and every entry is outside.
  const uint32_t last = static_cast<uint32_t>(std::min<int64_t>(bound, INT32_MAX)) - 1u;
  u32x4 any = {};
  int64_t p = lo;
  for (; p + 4 <= hi; p += 4) {
    u32x4 x;
    std::memcpy(&x, v + p, sizeof x);
    any |= x | (last - x);
  }
  uint32_t top = any[0] | any[1] | any[2] | any[3];
  for (; p < hi; ++p) {
    const uint32_t x = static_cast<uint32_t>(v[p]);
    top |= x | (last - x);
  }
  return (top >> 31) != 0;
}

// Whether some index of rows [row_begin, row_end) lies outside [0, cols),
// or is not larger than the one before it in its row. One pass per row, four
// entries at a time as in any_outside: with every index in range, each
// difference to the one before minus one fits in 32 bits, with its top bit
// set exactly where the order is broken (where one is out of range, the
// answer is true anyway).
bool any_bad_row(const int32_t* indptr, const int32_t* indices, int64_t row_begin,
                 int64_t row_end, int64_t cols) {
  typedef uint32_t u32x4 __attribute__((vector_size(16)));
  const uint32_t last = static_cast<uint32_t>(std::min<int64_t>(cols, INT32_MAX)) - 1u;
  u32x4 any = {};
  uint32_t top = 0;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const int64_t begin = indptr[r], end = indptr[r + 1];
    if (begin == end) continue;
    top |= static_cast<uint32_t>(indices[begin]) | (last - static_cast<uint32_t>(indices[begin]));
    int64_t p = begin + 1;
    for (; p + 4 <= end; p += 4) {
      u32x4 x, prev;
      std::memcpy(&x, indices + p, sizeof x);
      std::memcpy(&prev, indices + p - 1, sizeof prev);
      any |= x | (last - x) | (x - prev - 1u);
    }
    for (; p < end; ++p) {
      const uint32_t x = static_cast<uint32_t>(indices[p]);
      top |= x | (last - x) | (x - static_cast<uint32_t>(indices[p - 1]) - 1u);
    }
  }
  top |= any[0] | any[1] | any[2] | any[3];
  return (top >> 31) != 0;
}

ffi::Error validate_indptr(const int32_t* indptr, int64_t rows, int64_t nnz, const char* op,
                           const std::string& name) {
  if (indptr[0] != 0 || indptr[rows] != nnz)
    return invalid(op, name + " row pointers must run from 0 to nnz=" + std::to_string(nnz) +
                           ", got " + std::to_string(indptr[0]) + " to " +
                           std::to_string(indptr[rows]));
  for (int64_t r = 0; r < rows; ++r)
    if (indptr[r + 1] < indptr[r])
      return invalid(op, name + " row pointers decrease at row " + std::to_string(r));
  return ffi::Error::Success();
}

// Row r of a compressed-rows pattern that holds entry p.
int64_t row_of(const int32_t* indptr, int64_t rows, int64_t p) {
  return std::upper_bound(indptr, indptr + rows + 1, p) - indptr - 1;
}

}  // namespace

ffi::Error decode_pattern(ffi::Buffer<ffi::S32> indptr, ffi::Buffer<ffi::S32> indices,
                          int64_t rows, int64_t cols, const Stack& result, const char* op,
                          const char* name, Pattern* out, bool rows_checked_by_tasks) {
  Pattern p;
  const std::string ptr_name = std::string(name) + " indptr";
  const std::string idx_name = std::string(name) + " indices";
  ffi::Error error =
      decode_operand(indptr.dimensions(), 1, result, op, ptr_name.c_str(), &p.indptr_stack);
  if (error.failure()) return error;
  error = decode_operand(indices.dimensions(), 1, result, op, idx_name.c_str(), &p.indices_stack);
  if (error.failure()) return error;
  error = check_size(p.indptr_stack.dims[0], rows + 1, op, (ptr_name + " length").c_str());
  if (error.failure()) return error;
  if (cols > INT32_MAX)
    return invalid(op, std::string(name) + " has " + std::to_string(cols) +
                           " columns, more than int32 indices address");
  p.indptr = indptr.typed_data();
  p.indices = indices.typed_data();
  p.rows = rows;
  p.cols = cols;
  p.nnz = p.indices_stack.dims[0];
  const Stack both = joint({&p.indptr_stack, &p.indices_stack});
  for (int64_t i = 0; i < both.count; ++i) {
    const int64_t v = both.representative(i);
    error = validate_indptr(p.row_ptr(v), rows, p.nnz, op, name);
    if (error.success() && !rows_checked_by_tasks) error = check_rows(p, v, 0, rows, op, name);
    if (error.failure()) return error;
  }
  *out = p;
  return ffi::Error::Success();
}

ffi::Error check_rows(const Pattern& pat, int64_t v, int64_t row_begin, int64_t row_end,
                      const char* op, const char* name) {
  const int32_t* ptr = pat.row_ptr(v);
  const int32_t* idx = pat.col_idx(v);
  if (!any_bad_row(ptr, idx, row_begin, row_end, pat.cols))
    return ffi::Error::Success();
  for (int64_t r = row_begin; r < row_end; ++r)
    for (int64_t p = ptr[r]; p < ptr[r + 1]; ++p) {
      if (idx[p] < 0 || idx[p] >= pat.cols)
        return invalid(op, std::string(name) + " index " + std::to_string(idx[p]) +
                               " at entry " + std::to_string(p) + " is outside [0, " +
                               std::to_string(pat.cols) + ")");
      if (p > ptr[r] && idx[p] <= idx[p - 1])
        return invalid(op, std::string(name) + " indices must strictly increase within a row: " +
                               (idx[p] == idx[p - 1] ? "duplicate" : "unsorted") + " index " +
                               std::to_string(idx[p]) + " at entry " + std::to_string(p) +
                               " of row " + std::to_string(r));
    }
  return ffi::Error::Success();
}

ffi::Error check_permutation(const int32_t* perm, int64_t lo, int64_t hi, int64_t nnz,
                             const char* op, const char* name) {
  if (!any_outside(perm, lo, hi, nnz)) return ffi::Error::Success();
  for (int64_t p = lo; p < hi; ++p)
    if (perm[p] < 0 || perm[p] >= nnz)
      return invalid(op, std::string(name) + " entry " + std::to_string(p) + " is " +
                             std::to_string(perm[p]) + ", outside [0, " + std::to_string(nnz) +
                             ")");
  return ffi::Error::Success();
}

ffi::Error decode_transposed(ffi::Span<const int64_t> values_dims, ffi::Buffer<ffi::S32> t_indptr,
                             ffi::Buffer<ffi::S32> t_indices, ffi::Buffer<ffi::S32> t_perm,
                             const Pattern& pat, const Stack& result, const char* op,
                             Stack* vs, Pattern* tpat, Stack* ps) {
  ffi::Error error = decode_operand(values_dims, 1, result, op, "values", vs);
  if (error.success())
    error = decode_operand(t_perm.dimensions(), 1, result, op, "transposed permutation", ps);
  if (error.success())
    error = decode_pattern(t_indptr, t_indices, pat.cols, pat.rows, result, op,
                           "transposed pattern", tpat, /*rows_checked_by_tasks=*/true);
  if (error.success()) error = check_size(tpat->nnz, pat.nnz, op, "transposed pattern nnz");
  if (error.success()) error = check_size(vs->dims[0], tpat->nnz, op, "values length");
  if (error.failure()) return error;
  return check_size(ps->dims[0], tpat->nnz, op, "transposed permutation length");
}

ffi::Error check_transposed_rows(const Pattern& tpat, const int32_t* perm, const Pattern& pat,
                                 int64_t v, int64_t row_begin, int64_t row_end,
                                 const char* op) {
  ffi::Error error = check_rows(tpat, v, row_begin, row_end, op, "transposed pattern");
  if (error.failure()) return error;
  const int32_t* tptr = tpat.row_ptr(v);
  const int32_t* tidx = tpat.col_idx(v);
  const int64_t lo = tptr[row_begin], hi = tptr[row_end];
  error = check_permutation(perm, lo, hi, pat.nnz, op, "transposed permutation");
  if (error.failure()) return error;
  const int32_t* ptr = pat.row_ptr(v);
  const int32_t* idx = pat.col_idx(v);
  // idx[q] is a read at random, as in the gathers: prefetched ahead.
  bool bad = false;
  for (int64_t r = row_begin; r < row_end; ++r)
    for (int64_t p = tptr[r]; p < tptr[r + 1]; ++p) {
      if (p + kPermuteAhead < hi) __builtin_prefetch(idx + perm[p + kPermuteAhead], 0);
      const int32_t q = perm[p], n = tidx[p];
      bad |= (idx[q] != r) | (q < ptr[n]) | (q >= ptr[n + 1]);
    }
  if (!bad) return ffi::Error::Success();
  for (int64_t r = row_begin; r < row_end; ++r)
    for (int64_t p = tptr[r]; p < tptr[r + 1]; ++p) {
      const int32_t q = perm[p], n = tidx[p];
      if (idx[q] == r && q >= ptr[n] && q < ptr[n + 1]) continue;
      return invalid(op, "the transposed pattern does not hold the pattern's nonzeros: its "
                         "entry " + std::to_string(p) + " (row " + std::to_string(r) +
                         ", index " + std::to_string(n) + ") maps through the transposed "
                         "permutation to entry " + std::to_string(q) + " (row " +
                         std::to_string(row_of(ptr, pat.rows, q)) + ", index " +
                         std::to_string(idx[q]) + ")");
    }
  return ffi::Error::Success();
}

EntryOffsets entry_offsets(const Pattern& pat, const std::function<int64_t(int32_t)>& offset) {
  EntryOffsets offsets;
  offsets.nnz = pat.nnz;
  offsets.stack = pat.indices_stack;
  offsets.data = std::make_shared<std::vector<int64_t>>(pat.indices_stack.count * pat.nnz);
  for (int64_t i = 0; i < pat.indices_stack.count; ++i) {
    const int32_t* idx = pat.indices + i * pat.nnz;
    int64_t* dst = offsets.data->data() + i * pat.nnz;
    for (int64_t p = 0; p < pat.nnz; ++p) dst[p] = offset(idx[p]);
  }
  return offsets;
}

}  // namespace sparseprop
