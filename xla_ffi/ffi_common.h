// Shared plumbing of the FFI handlers: decoding operands that vmap stacked,
// validating sparse patterns before any routine reads them, and spreading the
// routine's rows over XLA's intra-op thread pool.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace sparseprop {

namespace ffi = xla::ffi;

// The leading (vmap) dims of an operand or a result. A call's results all
// have the same leading dims; an operand's broadcast against them, as jnp
// operands do: right-aligned, each 1 or equal to the result's. (vmap with
// vmap_method="expand_dims" gives unbatched operands size-1 dims there, and
// nested vmaps give operands batched at different levels dims like [2, 1]
// and [1, 3] against a result's [2, 3].)
struct Lead {
  static constexpr int kMaxDims = 16;
  int rank = 0;
  int64_t dims[kMaxDims] = {};
  int64_t size() const {
    int64_t n = 1;
    for (int i = 0; i < rank; ++i) n *= dims[i];
    return n;
  }
};

// An operand seen as `count` stacked slices. The op's own operand has `rank`
// trailing dims `dims[0..rank)`; `lead` holds its leading dims and `result`
// the call's results', against which they broadcast.
struct Stack {
  static constexpr int kMaxRank = 6;
  int64_t count = 1;
  int rank = 0;
  int64_t dims[kMaxRank] = {};
  Lead lead, result;
  int64_t slice() const {
    int64_t n = 1;
    for (int i = 0; i < rank; ++i) n *= dims[i];
    return n;
  }
  // The slice of this operand that result slice `v` reads.
  int64_t index(int64_t v) const;
  // A result slice that reads slice `i` of this operand (the first one).
  int64_t representative(int64_t i) const;
};

// Decodes a result's `dims` into a Stack (its leading dims are the call's),
// or an InvalidArgument error naming `op` and `name` if it has fewer than
// `rank` dims.
ffi::Error decode_stack(ffi::Span<const int64_t> dims, int rank, const char* op,
                        const char* name, Stack* out);

// Offset of the slice that result slice `v` reads: a single slice is shared
// (broadcast) by all.
inline int64_t slice_offset(const Stack& s, int64_t v) { return s.index(v) * s.slice(); }

// Error unless result stacks `a` and `b` have the same leading dims.
ffi::Error check_same_lead(const Stack& a, const Stack& b, const char* op, const char* name);

// Decodes an operand's `dims` into a Stack whose leading dims broadcast
// against those of `result` (a decoded result), or an InvalidArgument error.
ffi::Error decode_operand(ffi::Span<const int64_t> dims, int rank, const Stack& result,
                          const char* op, const char* name, Stack* out);

// The stacking that several operands of one call share: leading dims where
// any of them varies. Derived per-slice data (a gathered copy of the values,
// an offset table) is built once per slice of it, not once per result slice.
Stack joint(std::initializer_list<const Stack*> stacks);

// An InvalidArgument error "sparseprop_jax <op>: <message>".
ffi::Error invalid(const char* op, const std::string& message);

// Error unless `got` == `expected`.
ffi::Error check_size(int64_t got, int64_t expected, const char* op, const char* what);

// Error unless `got`'s own dims (not its leading ones) equal `expected`'s.
ffi::Error check_same_dims(const Stack& got, const Stack& expected, const char* op,
                           const char* what);

// Whether a copy into a destination of `floats` floats should use streaming
// (non-temporal) stores: a plain store first reads each line into the cache,
// which is wasted where the destination outgrows the cache and is evicted
// before it is read again; on destinations that fit the cache they measured
// slower (see benchmarks/results/NOTES.md). Hence from the 4 MiB that is a
// core's share of the last-level cache (block_positions in conv_common.cc
// budgets the same share).
constexpr int64_t kStreamMinBytes = int64_t{4} << 20;
inline bool streams_past_cache(int64_t floats) { return 4 * floats >= kStreamMinBytes; }

// What scratch_release needs back about a buffer: its true size, and the
// number of release_scratch() calls before it was handed out (a buffer
// handed out before a release_scratch() is freed when its call ends, not kept).
struct ScratchTicket {
  std::size_t capacity = 0;
  std::uint64_t generation = 0;
};

// Raw storage for scratch(): at least `bytes`, 64-byte aligned, reused from
// earlier calls where one fits (see ffi_common.cc).
void* scratch_acquire(std::size_t bytes, ScratchTicket* ticket);
void scratch_release(void* data, ScratchTicket ticket);

// Bytes of scratch kept for reuse, not in use by any call; release_scratch()
// frees them (buffers in use are freed when their call ends).
std::size_t cached_scratch_bytes();
void release_scratch();

// A buffer of `n` elements left uninitialised (every element is written
// before it is read), shared by the tasks of one call and recycled after it.
template <typename T>
std::shared_ptr<T[]> scratch(int64_t n) {
  ScratchTicket ticket;
  void* data = scratch_acquire(sizeof(T) * static_cast<std::size_t>(n > 0 ? n : 1), &ticket);
  return std::shared_ptr<T[]>(static_cast<T*>(data),
                              [ticket](T* p) { scratch_release(p, ticket); });
}


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

// The error for an exception a handler or task caught (an allocation that
// failed): no exception may cross into XLA.
ffi::Error caught(const char* op);

// The handler `Fn` with its exceptions turned into errors (see caught):
// handlers are registered as Guarded<Fn>::Call.
template <auto Fn>
struct Guarded;
template <typename... Args, ffi::Future (*Fn)(Args...)>
struct Guarded<Fn> {
  static ffi::Future Call(Args... args) {
    try {
      return Fn(std::move(args)...);
    } catch (...) {
      return failed(caught("handler"));
    }
  }
};

}  // namespace sparseprop
