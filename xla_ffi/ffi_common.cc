#include "ffi_common.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <thread>

#include "simd_dispatch.h"

namespace sparseprop {
namespace {

std::string prefix(const char* op) { return std::string("sparseprop_jax ") + op + ": "; }

// Below this many multiply-adds (about 50 us on one core) a call is not worth
// the cost of scheduling tasks on the pool.
constexpr int64_t kMinParallelFlops = 1 << 20;

// Scratch buffers are kept for the next call instead of freed: a fresh
// buffer of megabytes is mapped anew by the OS, and faulting in its zeroed
// pages costs more than a sparse product at high sparsity. A buffer is reused
// only for requests of at least half its size, and at most kScratchCacheBytes
// are kept.
constexpr std::size_t kScratchCacheBytes = std::size_t(512) << 20;
constexpr std::size_t kScratchAlign = 64;

struct ScratchCache {
  std::mutex mutex;
  std::vector<std::pair<std::size_t, void*>> free;  // (capacity, data)
  std::size_t bytes = 0;
};

ScratchCache& scratch_cache() {
  static ScratchCache* cache = new ScratchCache;  // never destroyed: used until exit
  return *cache;
}

std::size_t scratch_capacity(std::size_t bytes) {
  return (std::max<std::size_t>(bytes, 1) + kScratchAlign - 1) / kScratchAlign * kScratchAlign;
}

}  // namespace

void* scratch_acquire(std::size_t bytes, std::size_t* capacity) {
  const std::size_t want = scratch_capacity(bytes);
  ScratchCache& cache = scratch_cache();
  {
    std::lock_guard<std::mutex> lock(cache.mutex);
    auto best = cache.free.end();
    for (auto it = cache.free.begin(); it != cache.free.end(); ++it)
      if (it->first >= want && it->first / 2 <= want &&
          (best == cache.free.end() || it->first < best->first))
        best = it;
    if (best != cache.free.end()) {
      void* data = best->second;
      *capacity = best->first;
      cache.bytes -= best->first;
      cache.free.erase(best);
      return data;
    }
  }
  void* data = std::aligned_alloc(kScratchAlign, want);
  if (data == nullptr) throw std::bad_alloc();
  *capacity = want;
  return data;
}

void scratch_release(void* data, std::size_t capacity) {
  ScratchCache& cache = scratch_cache();
  std::lock_guard<std::mutex> lock(cache.mutex);
  cache.free.emplace_back(capacity, data);
  cache.bytes += capacity;
  while (cache.bytes > kScratchCacheBytes) {  // drop the oldest
    std::free(cache.free.front().second);
    cache.bytes -= cache.free.front().first;
    cache.free.erase(cache.free.begin());
  }
}

ffi::Error decode_stack(ffi::Span<const int64_t> dims, int rank, const char* op,
                        const char* name, Stack* out) {
  const int64_t ndim = static_cast<int64_t>(dims.size());
  if (ndim < rank)
    return ffi::Error::InvalidArgument(prefix(op) + name + " must have at least " +
                                       std::to_string(rank) + " dims, got " +
                                       std::to_string(ndim));
  Stack s;
  s.rank = rank;
  for (int64_t i = 0; i < ndim - rank; ++i) s.count *= dims[i];
  for (int i = 0; i < rank; ++i) s.dims[i] = dims[ndim - rank + i];
  *out = s;
  return ffi::Error::Success();
}

ffi::Error check_stack_count(const Stack& s, int64_t total, const char* op, const char* name) {
  if (s.count == 1 || s.count == total) return ffi::Error::Success();
  return ffi::Error::InvalidArgument(prefix(op) + name + " is stacked " +
                                     std::to_string(s.count) +
                                     " times, expected 1 or " + std::to_string(total));
}

ffi::Error decode_operand(ffi::Span<const int64_t> dims, int rank, int64_t total,
                          const char* op, const char* name, Stack* out) {
  ffi::Error error = decode_stack(dims, rank, op, name, out);
  if (error.failure()) return error;
  return check_stack_count(*out, total, op, name);
}

ffi::Error decode_pattern(ffi::Buffer<ffi::S32> indptr, ffi::Buffer<ffi::S32> indices,
                          int64_t rows, int64_t cols, int64_t total, const char* op,
                          const char* name, Pattern* out, bool indices_checked_by_tasks) {
  Pattern p;
  const std::string ptr_name = std::string(name) + " indptr";
  const std::string idx_name = std::string(name) + " indices";
  ffi::Error error = decode_operand(indptr.dimensions(), 1, total, op, ptr_name.c_str(), &p.indptr_stack);
  if (error.failure()) return error;
  error = decode_operand(indices.dimensions(), 1, total, op, idx_name.c_str(), &p.indices_stack);
  if (error.failure()) return error;
  error = check_size(p.indptr_stack.dims[0], rows + 1, op, (ptr_name + " length").c_str());
  if (error.failure()) return error;
  p.indptr = indptr.typed_data();
  p.indices = indices.typed_data();
  p.rows = rows;
  p.cols = cols;
  p.nnz = p.indices_stack.dims[0];
  const int64_t distinct = std::max(p.indptr_stack.count, p.indices_stack.count);
  for (int64_t v = 0; v < distinct; ++v) {
    error = indices_checked_by_tasks
                ? validate_indptr(p.row_ptr(v), rows, p.nnz, op, name)
                : validate_compressed(p.row_ptr(v), rows, p.col_idx(v), p.nnz, cols, op, name);
    if (error.failure()) return error;
  }
  *out = p;
  return ffi::Error::Success();
}

EntryOffsets entry_offsets(const Pattern& pat, const std::function<int64_t(int32_t)>& offset) {
  EntryOffsets offsets;
  offsets.nnz = pat.nnz;
  offsets.shared = pat.indices_stack.count == 1;
  offsets.data = std::make_shared<std::vector<int64_t>>(pat.indices_stack.count * pat.nnz);
  for (int64_t v = 0; v < pat.indices_stack.count; ++v) {
    const int32_t* idx = pat.col_idx(v);
    int64_t* dst = offsets.data->data() + v * pat.nnz;
    for (int64_t p = 0; p < pat.nnz; ++p) dst[p] = offset(idx[p]);
  }
  return offsets;
}

ffi::Error check_size(int64_t got, int64_t expected, const char* op, const char* what) {
  if (got == expected) return ffi::Error::Success();
  return ffi::Error::InvalidArgument(prefix(op) + what + " is " + std::to_string(got) +
                                     ", expected " + std::to_string(expected));
}

ffi::Error validate_compressed(const int32_t* indptr, int64_t rows,
                               const int32_t* indices, int64_t nnz, int64_t cols,
                               const char* op, const char* name) {
  ffi::Error error = validate_indptr(indptr, rows, nnz, op, name);
  if (error.failure()) return error;
  return check_indices(indices, 0, nnz, cols, op, name);
}

ffi::Error validate_indptr(const int32_t* indptr, int64_t rows, int64_t nnz, const char* op,
                           const char* name) {
  if (indptr[0] != 0 || indptr[rows] != nnz)
    return ffi::Error::InvalidArgument(
        prefix(op) + name + " row pointers must run from 0 to nnz=" + std::to_string(nnz) +
        ", got " + std::to_string(indptr[0]) + " to " + std::to_string(indptr[rows]));
  for (int64_t r = 0; r < rows; ++r)
    if (indptr[r + 1] < indptr[r])
      return ffi::Error::InvalidArgument(prefix(op) + name +
                                         " row pointers decrease at row " + std::to_string(r));
  return ffi::Error::Success();
}

namespace {

// Whether some v[p], p in [lo, hi), lies outside [0, bound). The checks run
// on every call over every entry, and a loop that stops at each entry took
// 8% of the CPU time of a 64 x 4096 -> 4096 f+b at 95%. Here the top bit of
// x | (last - x) is set exactly when x < 0 or x > last, so four entries at a
// time are ORed with no branch (GCC vector extensions: SSE2, NEON).
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

}  // namespace

ffi::Error check_indices(const int32_t* indices, int64_t lo, int64_t hi, int64_t cols,
                         const char* op, const char* name) {
  if (!any_outside(indices, lo, hi, cols)) return ffi::Error::Success();
  for (int64_t p = lo; p < hi; ++p)
    if (indices[p] < 0 || indices[p] >= cols)
      return ffi::Error::InvalidArgument(prefix(op) + name + " index " +
                                         std::to_string(indices[p]) + " at entry " +
                                         std::to_string(p) + " is outside [0, " +
                                         std::to_string(cols) + ")");
  return ffi::Error::Success();
}

ffi::Error check_permutation(const int32_t* perm, int64_t lo, int64_t hi, int64_t nnz,
                             const char* op, const char* name) {
  if (!any_outside(perm, lo, hi, nnz)) return ffi::Error::Success();
  for (int64_t p = lo; p < hi; ++p)
    if (perm[p] < 0 || perm[p] >= nnz)
      return ffi::Error::InvalidArgument(prefix(op) + name + " entry " + std::to_string(p) +
                                         " is " + std::to_string(perm[p]) +
                                         ", outside [0, " + std::to_string(nnz) + ")");
  return ffi::Error::Success();
}

void split_rows(const int32_t* indptr, int64_t rows, int64_t slice, int parts,
                std::vector<Task>* tasks) {
  // Work before row r is indptr[r] + r: monotone, so each cut is a binary search.
  const int64_t total = indptr[rows] + rows;
  parts = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(parts, rows)));
  int64_t begin = 0;
  for (int k = 1; k <= parts; ++k) {
    int64_t end = rows;
    if (k < parts) {
      const int64_t target = total * k / parts;
      int64_t lo = begin, hi = rows;
      while (lo < hi) {
        const int64_t mid = lo + (hi - lo) / 2;
        if (indptr[mid] + mid < target) lo = mid + 1; else hi = mid;
      }
      end = lo;
    }
    if (end > begin) tasks->push_back({slice, begin, end});
    begin = end;
  }
  if (rows == 0) tasks->push_back({slice, 0, 0});
}

void split_even(int64_t n, int64_t slice, int64_t group, int parts, std::vector<Task>* tasks) {
  const int64_t k = std::max<int64_t>(1, std::min<int64_t>(parts, n));
  for (int64_t i = 0; i < k; ++i) {
    const int64_t begin = n * i / k, end = n * (i + 1) / k;
    if (end > begin || n == 0) tasks->push_back({slice, begin, end, group});
  }
}

int parallel_parts(ffi::ThreadPool& pool, int64_t flops) {
  if (tasks_per_call() > 0) return tasks_per_call();
  if (flops < kMinParallelFlops) return 1;
  // Two parts per thread: workers claim parts as they come free, so a thread
  // that starts late or gets a slower part does not hold the others back.
  return static_cast<int>(std::max<int64_t>(1, 2 * pool.num_threads()));
}

namespace {

// The state of one run_phases call, shared by its workers.
class PhaseRun {
 public:
  // At most `workers` workers, and no more than there are tasks (at least one).
  PhaseRun(std::vector<Phase> phases, int workers) : phases_(std::move(phases)) {
    for (const Phase& phase : phases_) {
      total_ += static_cast<int64_t>(phase.tasks.size());
      phase_end_.push_back(total_);
    }
    workers_ = std::max<int64_t>(1, std::min<int64_t>(workers, total_));
    done_ = ffi::CountDownPromise(workers_);
  }

  int64_t workers() const { return workers_; }
  ffi::Future future() const { return ffi::Future(done_); }

  // Claims and runs tasks until none is left, then counts itself done.
  void work() {
    ffi::Error error = ffi::Error::Success();
    for (;;) {
      const int64_t i = next_.fetch_add(1);
      if (i >= total_ || failed_.load(std::memory_order_relaxed)) break;
      size_t phase = 0;
      while (i >= phase_end_[phase]) ++phase;
      // Every task before this phase was claimed before task i, by a running
      // worker: wait for them to finish.
      const int64_t first = phase == 0 ? 0 : phase_end_[phase - 1];
      while (finished_.load(std::memory_order_acquire) < first &&
             !failed_.load(std::memory_order_relaxed))
        std::this_thread::yield();
      if (failed_.load(std::memory_order_relaxed)) break;
      ffi::Error task_error = phases_[phase].fn(phases_[phase].tasks[i - first]);
      if (task_error.failure()) {
        failed_.store(true);
        error = std::move(task_error);
      }
      finished_.fetch_add(1, std::memory_order_release);
    }
    done_.CountDown(1, error);
  }

 private:
  std::vector<Phase> phases_;
  std::vector<int64_t> phase_end_;  // tasks in this phase and the ones before
  int64_t total_ = 0, workers_ = 1;
  std::atomic<int64_t> next_{0}, finished_{0};
  std::atomic<bool> failed_{false};
  ffi::CountDownPromise done_;
};

}  // namespace

Phase concurrent(std::vector<Phase> phases) {
  Phase all;
  std::vector<std::function<ffi::Error(const Task&)>> fns;
  for (Phase& phase : phases) {
    for (Task task : phase.tasks) {
      task.group = static_cast<int64_t>(fns.size());
      all.tasks.push_back(task);
    }
    fns.push_back(std::move(phase.fn));
  }
  all.fn = [fns = std::move(fns)](const Task& t) { return fns[t.group](t); };
  return all;
}

ffi::Future run_phases(ffi::ThreadPool& pool, int workers, std::vector<Phase> phases) {
  auto run = std::make_shared<PhaseRun>(std::move(phases), workers);
  ffi::Future future = run->future();
  if (run->workers() == 1) {
    run->work();
    return future;
  }
  for (int64_t w = 0; w < run->workers(); ++w) pool.Schedule([run]() { run->work(); });
  return future;
}

ffi::Future run_tasks(ffi::ThreadPool& pool, std::vector<Task> tasks,
                      std::function<ffi::Error(const Task&)> fn) {
  const int workers = static_cast<int>(tasks.size());
  std::vector<Phase> phases;
  phases.push_back({std::move(tasks), std::move(fn)});
  return run_phases(pool, workers, std::move(phases));
}

ffi::Future failed(ffi::Error error) {
  ffi::Promise promise;
  ffi::Future future(promise);
  promise.SetError(std::move(error));
  return future;
}

}  // namespace sparseprop
