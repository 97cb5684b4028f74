// Shared plumbing of the FFI handlers: decoding operands that vmap stacked,
// validating sparse patterns before any kernel reads them, and spreading the
// kernel's rows over XLA's intra-op thread pool.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace sparseprop {

namespace ffi = xla::ffi;

// An operand seen as `count` stacked slices. The op's own operand has `rank`
// trailing dims `dims[0..rank)`; vmap with vmap_method="expand_dims" adds
// leading dims, size 1 where it broadcasts.
struct Stack {
  static constexpr int kMaxRank = 6;
  int64_t count = 1;
  int rank = 0;
  int64_t dims[kMaxRank] = {};
  int64_t slice() const {
    int64_t n = 1;
    for (int i = 0; i < rank; ++i) n *= dims[i];
    return n;
  }
};

// Decodes `dims` into a Stack, or an InvalidArgument error naming `op` and
// `name` if the operand has fewer than `rank` dims.
ffi::Error decode_stack(ffi::Span<const int64_t> dims, int rank, const char* op,
                        const char* name, Stack* out);

// Offset of slice `v` of an operand with `count` slices inside a vmap of size
// `total` slices: a single slice is shared (broadcast) by all.
inline int64_t slice_offset(const Stack& s, int64_t v) { return s.count == 1 ? 0 : v * s.slice(); }

// Checks that an operand's stack is either shared (1) or matches `total`.
ffi::Error check_stack_count(const Stack& s, int64_t total, const char* op, const char* name);

// decode_stack followed by check_stack_count against `total` slices.
ffi::Error decode_operand(ffi::Span<const int64_t> dims, int rank, int64_t total,
                          const char* op, const char* name, Stack* out);

// Error unless `got` == `expected`.
ffi::Error check_size(int64_t got, int64_t expected, const char* op, const char* what);

// Validates a compressed-rows pattern: indptr starts at 0, never decreases and
// ends at nnz (validate_indptr); every index lies in [0, cols) (check_indices).
// Sortedness is not needed for memory safety and is checked in Python where
// patterns are built.
ffi::Error validate_compressed(const int32_t* indptr, int64_t rows,
                               const int32_t* indices, int64_t nnz, int64_t cols,
                               const char* op, const char* name);
ffi::Error validate_indptr(const int32_t* indptr, int64_t rows, int64_t nnz, const char* op,
                           const char* name);

// Error unless indices[p] lies in [0, cols) for every p in [lo, hi).
ffi::Error check_indices(const int32_t* indices, int64_t lo, int64_t hi, int64_t cols,
                         const char* op, const char* name);

// Error unless every perm[p], p in [lo, hi), lies in [0, nnz).
ffi::Error check_permutation(const int32_t* perm, int64_t lo, int64_t hi, int64_t nnz,
                             const char* op, const char* name);

// Whether a copy into a destination of `floats` floats should use streaming
// (non-temporal) stores: a plain store first reads each line into the cache,
// which is wasted where the destination outgrows the cache and is evicted
// before it is read again. Measured, f+b on 1 thread: the conv layouts at
// 98% sparsity 20-26% faster at 26 MB, 8% at 8 MiB, even at 5 MiB; the
// linear 1024 x 768 -> 3072 at 95% 5-8% faster; but 1.2-1.5x slower when
// forced on the 3 MiB operands of 256 x 768 -> 3072 at 99%. Hence from the
// 4 MiB that is a core's share of the last-level cache (block_positions in
// conv_ffi.cc budgets the same share).
constexpr int64_t kStreamMinBytes = int64_t{4} << 20;
inline bool streams_past_cache(int64_t floats) { return 4 * floats >= kStreamMinBytes; }

// Raw storage for scratch(): at least `bytes`, 64-byte aligned, reused from
// earlier calls where one fits (see ffi_common.cc); `capacity` receives its
// true size, which scratch_release takes back with it.
void* scratch_acquire(std::size_t bytes, std::size_t* capacity);
void scratch_release(void* data, std::size_t capacity);

// A buffer of `n` elements left uninitialised (every element is written
// before it is read), shared by the tasks of one call and recycled after it.
template <typename T>
std::shared_ptr<T[]> scratch(int64_t n) {
  std::size_t capacity = 0;
  void* data = scratch_acquire(sizeof(T) * static_cast<std::size_t>(n > 0 ? n : 1), &capacity);
  return std::shared_ptr<T[]>(static_cast<T*>(data),
                              [capacity](T* p) { scratch_release(p, capacity); });
}

// A compressed-rows pattern operand pair (indptr, indices), possibly stacked.
struct Pattern {
  const int32_t* indptr = nullptr;
  const int32_t* indices = nullptr;
  Stack indptr_stack, indices_stack;
  int64_t rows = 0, cols = 0, nnz = 0;
  const int32_t* row_ptr(int64_t v) const { return indptr + slice_offset(indptr_stack, v); }
  const int32_t* col_idx(int64_t v) const { return indices + slice_offset(indices_stack, v); }
};

// Kernel offsets `index * stride` of every entry, for each stacked slice of
// the pattern's indices; `offsets_of(v)` finds slice v's.
struct EntryOffsets {
  std::shared_ptr<std::vector<int64_t>> data;
  int64_t nnz = 0;
  bool shared = true;  // one slice serves every vmap slice
  const int64_t* of(int64_t v) const { return data->data() + (shared ? 0 : v * nnz); }
};
// `offset(index)` maps an entry's column index to its kernel offset.
EntryOffsets entry_offsets(const Pattern& pat, const std::function<int64_t(int32_t)>& offset);

// Decodes and validates a pattern of `rows` x `cols` used in a call of `total`
// vmap slices: always the row pointers (O(rows)); the indices (O(nnz)) too
// unless `indices_checked_by_tasks`, where each task checks its own rows'
// indices with check_indices before using them, in parallel.
ffi::Error decode_pattern(ffi::Buffer<ffi::S32> indptr, ffi::Buffer<ffi::S32> indices,
                          int64_t rows, int64_t cols, int64_t total, const char* op,
                          const char* name, Pattern* out, bool indices_checked_by_tasks = false);

// Returns early from a handler that returns ffi::Future.
#define SPARSEPROP_RETURN_IF_ERROR(expr)                  \
  do {                                                    \
    ::xla::ffi::Error sparseprop_error_ = (expr);         \
    if (sparseprop_error_.failure())                      \
      return ::sparseprop::failed(std::move(sparseprop_error_)); \
  } while (0)

// One unit of work: the range [begin, end) (of rows, or of grid positions) of
// vmap slice `slice`, in sub-problem `group` (e.g. a stride phase).
struct Task {
  int64_t slice;
  int64_t begin;
  int64_t end;
  int64_t group = 0;
};

// Appends tasks covering rows [0, rows) of one slice, split into at most
// `parts` contiguous ranges of about equal work (entries + rows), so a thread
// never waits on another over a few dense rows.
void split_rows(const int32_t* indptr, int64_t rows, int64_t slice, int parts,
                std::vector<Task>* tasks);

// Appends tasks covering [0, n) in at most `parts` ranges of equal length.
void split_even(int64_t n, int64_t slice, int64_t group, int parts, std::vector<Task>* tasks);

// The bindings the handlers start from: the thread pool, then float
// operands and int32 index operands, in that order. Every handler takes two
// floats (activations; values or x) and a pattern (indptr, indices); an
// input gradient adds the transposed permutation; a fused backward takes three
// floats and both patterns (indptr, indices, t_indptr, t_indices, t_perm).
template <int Floats, int Indices>
auto bind_operands() {
  if constexpr (Indices > 0) {
    return bind_operands<Floats, Indices - 1>().template Arg<ffi::Buffer<ffi::S32>>();
  } else if constexpr (Floats > 0) {
    return bind_operands<Floats - 1, 0>().template Arg<ffi::Buffer<ffi::F32>>();
  } else {
    return ffi::Ffi::Bind().Ctx<ffi::ThreadPool>();
  }
}

// How many parts to split a call of `flops` multiply-adds into, given the pool
// (see tasks_per_call in simd_dispatch.h).
int parallel_parts(ffi::ThreadPool& pool, int64_t flops);

// What one float moved by a layout change (a transpose through memory) costs,
// in multiply-adds, for parallel_parts: at high sparsity the transposes are
// most of a call's work and must be split over the threads too.
constexpr int64_t kFlopsPerMovedFloat = 4;

// A set of tasks and the function that runs each of them.
struct Phase {
  std::vector<Task> tasks;
  std::function<ffi::Error(const Task&)> fn;
};

// One phase running the tasks of all of `phases` side by side (they must not
// depend on each other); each task's group is rewritten to pick its phase's
// function.
Phase concurrent(std::vector<Phase> phases);

// Runs the phases in order on up to `workers` workers on the pool (inline
// when one suffices). Workers claim tasks one at a time in order; a task of
// phase k starts only once every task of the earlier phases has finished, so
// it may read what they wrote. A worker only ever waits for tasks that other
// running workers have already claimed, so the wait is short and cannot
// deadlock, and the handler never blocks a thread. Returns a future that
// completes when all have run, with the first error a task returned, if any
// (after an error, unclaimed tasks are skipped).
ffi::Future run_phases(ffi::ThreadPool& pool, int workers, std::vector<Phase> phases);

// run_phases with a single phase and one worker per task.
ffi::Future run_tasks(ffi::ThreadPool& pool, std::vector<Task> tasks,
                      std::function<ffi::Error(const Task&)> fn);

// A future already completed with `error`.
ffi::Future failed(ffi::Error error);

}  // namespace sparseprop
