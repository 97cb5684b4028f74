#include "ffi_common.h"

#include <algorithm>
#include <atomic>
#include <chrono>
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
// only for requests of at least half its size. What is kept is bounded: at
// most kScratchCacheBytes, and a buffer no call has reused for
// kScratchIdleSeconds is freed at the next acquire or release (a training
// loop reuses its buffers every step; the buffers of shapes no longer run
// go). release_scratch() frees them all at once, and the buffers in use then
// when their calls end.
constexpr std::size_t kScratchCacheBytes = std::size_t(512) << 20;
constexpr double kScratchIdleSeconds = 10.0;
constexpr std::size_t kScratchAlign = 64;

using Clock = std::chrono::steady_clock;

struct FreeBuffer {
  std::size_t capacity;
  void* data;
  Clock::time_point released;
};

struct ScratchCache {
  std::mutex mutex;
  std::vector<FreeBuffer> free;  // oldest release first
  std::size_t bytes = 0;
  std::uint64_t generation = 0;  // release_scratch() calls so far

  // Frees the buffers released before `cutoff`, then the oldest ones while
  // more than `limit` bytes are kept. The caller holds the mutex.
  void trim(Clock::time_point cutoff, std::size_t limit) {
    std::size_t kept = 0;
    for (const FreeBuffer& b : free) {
      if (b.released < cutoff || bytes > limit) {
        std::free(b.data);
        bytes -= b.capacity;
      } else {
        free[kept++] = b;
      }
    }
    free.resize(kept);
  }
};

ScratchCache& scratch_cache() {
  static ScratchCache* cache = new ScratchCache;  // never destroyed: used until exit
  return *cache;
}

std::size_t scratch_capacity(std::size_t bytes) {
  return (std::max<std::size_t>(bytes, 1) + kScratchAlign - 1) / kScratchAlign * kScratchAlign;
}

Clock::time_point idle_cutoff() {
  return Clock::now() - std::chrono::duration_cast<Clock::duration>(
                            std::chrono::duration<double>(kScratchIdleSeconds));
}

}  // namespace

void* scratch_acquire(std::size_t bytes, ScratchTicket* ticket) {
  const std::size_t want = scratch_capacity(bytes);
  ScratchCache& cache = scratch_cache();
  {
    std::lock_guard<std::mutex> lock(cache.mutex);
    ticket->generation = cache.generation;
    cache.trim(idle_cutoff(), kScratchCacheBytes);
    auto best = cache.free.end();
    for (auto it = cache.free.begin(); it != cache.free.end(); ++it)
      if (it->capacity >= want && it->capacity / 2 <= want &&
          (best == cache.free.end() || it->capacity < best->capacity))
        best = it;
    if (best != cache.free.end()) {
      void* data = best->data;
      ticket->capacity = best->capacity;
      cache.bytes -= best->capacity;
      cache.free.erase(best);
      return data;
    }
  }
  void* data = std::aligned_alloc(kScratchAlign, want);
  if (data == nullptr) throw std::bad_alloc();
  ticket->capacity = want;
  return data;
}

void scratch_release(void* data, ScratchTicket ticket) {
  ScratchCache& cache = scratch_cache();
  {
    std::lock_guard<std::mutex> lock(cache.mutex);
    if (ticket.generation == cache.generation) {
      cache.free.push_back({ticket.capacity, data, Clock::now()});
      cache.bytes += ticket.capacity;
      cache.trim(idle_cutoff(), kScratchCacheBytes);
      return;
    }
  }
  std::free(data);  // handed out before a release_scratch(): not kept
}

std::size_t cached_scratch_bytes() {
  ScratchCache& cache = scratch_cache();
  std::lock_guard<std::mutex> lock(cache.mutex);
  return cache.bytes;
}

void release_scratch() {
  ScratchCache& cache = scratch_cache();
  std::lock_guard<std::mutex> lock(cache.mutex);
  cache.trim(Clock::time_point::max(), 0);
  ++cache.generation;
}

int64_t Stack::index(int64_t v) const {
  if (count == 1) return 0;
  if (count == result.size()) return v;  // varies along every leading dim
  int64_t i = 0, step = 1;
  for (int d = result.rank - 1; d >= 0; --d) {
    const int64_t coord = v % result.dims[d];
    v /= result.dims[d];
    const int own = d - (result.rank - lead.rank);
    if (own >= 0 && lead.dims[own] > 1) {
      i += coord * step;
      step *= lead.dims[own];
    }
  }
  return i;
}

int64_t Stack::representative(int64_t i) const {
  int64_t v = 0, step = 1;
  for (int d = result.rank - 1; d >= 0; --d) {
    const int own = d - (result.rank - lead.rank);
    if (own >= 0 && lead.dims[own] > 1) {
      v += (i % lead.dims[own]) * step;
      i /= lead.dims[own];
    }
    step *= result.dims[d];
  }
  return v;
}

namespace {

std::string dims_string(const Lead& lead) {
  std::string s = "[";
  for (int i = 0; i < lead.rank; ++i) s += (i ? ", " : "") + std::to_string(lead.dims[i]);
  return s + "]";
}

// Splits `dims` into leading dims and the `rank` trailing dims of the op.
ffi::Error split_dims(ffi::Span<const int64_t> dims, int rank, const char* op, const char* name,
                      Stack* out) {
  const int64_t ndim = static_cast<int64_t>(dims.size());
  if (ndim < rank)
    return ffi::Error::InvalidArgument(prefix(op) + name + " must have at least " +
                                       std::to_string(rank) + " dims, got " +
                                       std::to_string(ndim));
  if (ndim - rank > Lead::kMaxDims)
    return ffi::Error::InvalidArgument(prefix(op) + name + " has " + std::to_string(ndim - rank) +
                                       " leading (vmap) dims, at most " +
                                       std::to_string(Lead::kMaxDims) + " are supported");
  Stack s;
  s.rank = rank;
  s.lead.rank = static_cast<int>(ndim - rank);
  for (int i = 0; i < s.lead.rank; ++i) s.lead.dims[i] = dims[i];
  for (int i = 0; i < rank; ++i) s.dims[i] = dims[ndim - rank + i];
  s.count = s.lead.size();
  *out = s;
  return ffi::Error::Success();
}

}  // namespace

ffi::Error decode_stack(ffi::Span<const int64_t> dims, int rank, const char* op,
                        const char* name, Stack* out) {
  ffi::Error error = split_dims(dims, rank, op, name, out);
  out->result = out->lead;
  return error;
}

ffi::Error check_same_lead(const Stack& a, const Stack& b, const char* op, const char* name) {
  bool same = a.lead.rank == b.lead.rank;
  for (int i = 0; same && i < a.lead.rank; ++i) same = a.lead.dims[i] == b.lead.dims[i];
  if (same) return ffi::Error::Success();
  return ffi::Error::InvalidArgument(prefix(op) + name + " has leading dims " +
                                     dims_string(b.lead) + ", expected " + dims_string(a.lead));
}

ffi::Error decode_operand(ffi::Span<const int64_t> dims, int rank, const Stack& result,
                          const char* op, const char* name, Stack* out) {
  ffi::Error error = split_dims(dims, rank, op, name, out);
  if (error.failure()) return error;
  out->result = result.lead;
  const Lead& own = out->lead;
  bool fits = own.rank <= result.lead.rank;
  for (int i = 0; fits && i < own.rank; ++i) {
    const int64_t want = result.lead.dims[result.lead.rank - own.rank + i];
    fits = own.dims[i] == 1 || own.dims[i] == want;
  }
  if (fits) return ffi::Error::Success();
  return ffi::Error::InvalidArgument(prefix(op) + name + " has leading (vmap) dims " +
                                     dims_string(own) + ", which do not broadcast to the "
                                     "result's " + dims_string(result.lead));
}

Stack joint(std::initializer_list<const Stack*> stacks) {
  Stack j;
  j.result = (*stacks.begin())->result;
  j.lead = j.result;
  for (int d = 0; d < j.lead.rank; ++d) j.lead.dims[d] = 1;
  for (const Stack* s : stacks)
    for (int i = 0; i < s->lead.rank; ++i) {
      int64_t& dim = j.lead.dims[j.lead.rank - s->lead.rank + i];
      dim = std::max(dim, s->lead.dims[i]);
    }
  j.count = j.lead.size();
  return j;
}

ffi::Error invalid(const char* op, const std::string& message) {
  return ffi::Error::InvalidArgument(prefix(op) + message);
}

ffi::Error check_size(int64_t got, int64_t expected, const char* op, const char* what) {
  if (got == expected) return ffi::Error::Success();
  return ffi::Error::InvalidArgument(prefix(op) + what + " is " + std::to_string(got) +
                                     ", expected " + std::to_string(expected));
}

ffi::Error check_same_dims(const Stack& got, const Stack& expected, const char* op,
                           const char* what) {
  ffi::Error error = check_size(got.rank, expected.rank, op, what);
  for (int i = 0; i < expected.rank && error.success(); ++i)
    error = check_size(got.dims[i], expected.dims[i], op, what);
  return error;
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
      ffi::Error task_error = ffi::Error::Success();
      try {
        task_error = phases_[phase].fn(phases_[phase].tasks[i - first]);
      } catch (...) {
        task_error = caught("task");
      }
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

ffi::Error caught(const char* op) {
  try {
    throw;
  } catch (const std::bad_alloc&) {
    return ffi::Error(ffi::ErrorCode::kResourceExhausted, prefix(op) + "out of memory");
  } catch (const std::exception& e) {
    return ffi::Error::Internal(prefix(op) + e.what());
  } catch (...) {
    return ffi::Error::Internal(prefix(op) + "unknown exception");
  }
}

ffi::Future failed(ffi::Error error) {
  ffi::Promise promise;
  ffi::Future future(promise);
  promise.SetError(std::move(error));
  return future;
}

}  // namespace sparseprop
