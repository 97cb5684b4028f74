// Single-thread timings of the numeric routines on their own, outside XLA and
// Python: the minimum over repeats, per instruction set, for the three passes
// of a linear layer. Meant for work on the routines, where the noise of a shared
// machine and the framework's dispatch would hide small changes.
//
// Build and run (see benchmarks/README.md):
//   cmake -S . -B build/bench -DSPARSEPROP_ROUTINES_BENCHMARK=ON && cmake --build build/bench
//   build/bench/routines_bench                       # default shapes
//   build/bench/routines_bench 64 4096 4096 0.1      # batch in out density ...
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <new>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "simd_dispatch.h"

namespace {

using sparseprop::Routines;
using sparseprop::BatchTiles;

// Dense operands start on a cache line, as XLA's buffers and the handlers'
// scratch do: a run of whole vectors then spans as few lines as it can.
template <typename T>
struct LineAligned {
  using value_type = T;
  LineAligned() = default;
  template <typename U>
  LineAligned(const LineAligned<U>&) {}
  T* allocate(std::size_t n) {
    return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t{64}));
  }
  void deallocate(T* p, std::size_t) { ::operator delete(p, std::align_val_t{64}); }
  bool operator==(const LineAligned&) const { return true; }
  bool operator!=(const LineAligned&) const { return false; }
};
using Floats = std::vector<float, LineAligned<float>>;

// Compressed rows.
struct Sparse {
  std::vector<int32_t> indptr;
  std::vector<int32_t> indices;
  std::vector<float> values;
  std::vector<int32_t> perm;  // transpose(): where each entry came from
};

Sparse random_sparse(int64_t rows, int64_t cols, double density, std::mt19937& rng) {
  std::bernoulli_distribution keep(density);
  std::normal_distribution<float> normal;
  Sparse s;
  s.indptr.push_back(0);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c)
      if (keep(rng)) {
        s.indices.push_back(static_cast<int32_t>(c));
        s.values.push_back(normal(rng));
      }
    s.indptr.push_back(static_cast<int32_t>(s.indices.size()));
  }
  return s;
}

// The same entries grouped by column, values permuted along.
Sparse transpose(const Sparse& s, int64_t cols) {
  Sparse t;
  t.indptr.assign(cols + 1, 0);
  for (int32_t c : s.indices) ++t.indptr[c + 1];
  std::partial_sum(t.indptr.begin(), t.indptr.end(), t.indptr.begin());
  t.indices.resize(s.indices.size());
  t.values.resize(s.values.size());
  t.perm.resize(s.values.size());
  std::vector<int32_t> next(t.indptr.begin(), t.indptr.end() - 1);
  for (int64_t r = 0; r + 1 < static_cast<int64_t>(s.indptr.size()); ++r)
    for (int32_t p = s.indptr[r]; p < s.indptr[r + 1]; ++p) {
      const int32_t q = next[s.indices[p]]++;
      t.indices[q] = static_cast<int32_t>(r);
      t.values[q] = s.values[p];
      t.perm[q] = p;
    }
  return t;
}

template <typename F>
double min_seconds(F&& f, int repeats) {
  f();  // warm caches and pages
  double best = 1e30;
  for (int i = 0; i < repeats; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    const auto t1 = std::chrono::steady_clock::now();
    best = std::min(best, std::chrono::duration<double>(t1 - t0).count());
  }
  return best;
}

template <typename V>
float max_abs_diff(const V& a, const V& b) {
  float d = 0.0f;
  for (size_t i = 0; i < a.size(); ++i) d = std::max(d, std::fabs(a[i] - b[i]));
  return d;
}

// The transposed operands in the batch-tiled layout of routines.h.
Floats tiled(const Floats& transposed, int64_t rows, int64_t batch) {
  const BatchTiles tiles{batch};
  Floats out(transposed.size());
  for (int64_t t = 0; t < tiles.count(); ++t)
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t b = 0; b < tiles.width(t); ++b)
        out[tiles.first(t) * rows + r * tiles.width(t) + b] =
            transposed[r * batch + tiles.first(t) + b];
  return out;
}

// A product of tiled operands, tile after tile, as the handlers run it.
template <typename F>
void per_tile(int64_t batch, F&& product) {
  const BatchTiles tiles{batch};
  for (int64_t t = 0; t < tiles.count(); ++t) product(tiles.first(t), tiles.width(t));
}

void run(int64_t batch, int64_t n_in, int64_t n_out, double density, int repeats) {
  std::mt19937 rng(0);
  const Sparse w = random_sparse(n_out, n_in, density, rng);  // rows: output features
  const Sparse wt = transpose(w, n_in);
  std::normal_distribution<float> normal;
  Floats xt(n_in * batch), dyt(n_out * batch);
  for (float& v : xt) v = normal(rng);
  for (float& v : dyt) v = normal(rng);
  const Floats xt_untiled = xt;  // [in, batch], as the forward saves it for the backward
  xt = tiled(xt, n_in, batch);
  dyt = tiled(dyt, n_out, batch);
  const double gflop = 2.0 * batch * static_cast<double>(w.values.size()) * 1e-9;
  std::printf("%lldx%lld->%lld density %.3f nnz %zu\n", static_cast<long long>(batch),
              static_cast<long long>(n_in), static_cast<long long>(n_out), density,
              w.values.size());

  Floats ref_y, ref_dx;
  std::vector<float> ref_dv;
  // Every path the build has and the CPU runs, the scalar reference first
  // (the dispatch table lists them best first, scalar last).
  std::vector<std::string> paths = sparseprop::known_simd_paths();
  std::reverse(paths.begin(), paths.end());
  for (const std::string& path : paths) {
    if (!sparseprop::set_simd_path(path)) continue;
    const Routines& k = sparseprop::active_routines();
    Floats yt(n_out * batch), dxt(n_in * batch);
    std::vector<float> dv(w.values.size());
    const double fwd = min_seconds([&] {
      per_tile(batch, [&](int64_t first, int64_t width) {
        k.spmm_indexed(w.indptr.data(), w.indices.data(), w.values.data(),
                       xt.data() + first * n_in, width, yt.data() + first * n_out, width, width,
                       0, n_out);
      });
    }, repeats);
    // The forward as it runs when it saves x^T: on the untiled x^T.
    Floats yt_untiled(n_out * batch);
    const double fwd_untiled = min_seconds([&] {
      per_tile(batch, [&](int64_t first, int64_t width) {
        k.spmm_indexed(w.indptr.data(), w.indices.data(), w.values.data(),
                       xt_untiled.data() + first, batch, yt_untiled.data() + first * n_out,
                       width, width, 0, n_out);
      });
    }, repeats);
    const double igrad = min_seconds([&] {
      per_tile(batch, [&](int64_t first, int64_t width) {
        k.spmm_indexed(wt.indptr.data(), wt.indices.data(), wt.values.data(),
                       dyt.data() + first * n_out, width, dxt.data() + first * n_in, width,
                       width, 0, n_in);
      });
    }, repeats);
    const double wgrad = min_seconds([&] {
      k.sddmm_indexed(w.indptr.data(), w.indices.data(), dyt.data(), n_out, xt.data(), n_in,
                      dv.data(), batch, 0, n_out, false);
    }, repeats);
    std::vector<float> dv_tiles(w.values.size());
    const double wgrad_tiles = min_seconds([&] {
      per_tile(batch, [&](int64_t first, int64_t width) {
        k.sddmm_indexed(w.indptr.data(), w.indices.data(), dyt.data() + first * n_out, n_out,
                        xt.data() + first * n_in, n_in, dv_tiles.data(), width, 0, n_out,
                        first > 0);
      });
    }, repeats);
    // Both backward products in one pass by columns, tile after tile, reading
    // x^T untiled as the handler does; the sums come in the transposed
    // pattern's order.
    Floats dxt_fused(n_in * batch);
    std::vector<float> sums(w.values.size()), dv_fused(w.values.size());
    const double fused = min_seconds([&] {
      per_tile(batch, [&](int64_t first, int64_t width) {
        k.spmm_sddmm_indexed(wt.indptr.data(), wt.indices.data(), wt.values.data(),
                             dyt.data() + first * n_out, xt_untiled.data() + first, batch,
                             dxt_fused.data() + first * n_in, sums.data(), width, 0, n_in,
                             first > 0);
      });
    }, repeats);
    for (size_t q = 0; q < sums.size(); ++q) dv_fused[wt.perm[q]] = sums[q];
    // The transpose routine on a whole out x batch matrix, into batch-major and back.
    Floats y(batch * n_out);
    const double transpose = min_seconds([&] {
      k.transpose(yt.data(), batch, y.data(), n_out, n_out, 0, batch, false);
    }, repeats);
    Floats back(batch * n_out);
    const double transpose_in = min_seconds([&] {
      k.transpose(y.data(), n_out, back.data(), batch, batch, 0, n_out, false);
    }, repeats);
    bool transposed = back == yt;
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t o = 0; o < n_out; ++o) transposed &= y[b * n_out + o] == yt[o * batch + b];
    if (ref_y.empty()) {
      ref_y = yt, ref_dx = dxt, ref_dv = dv;
    }
    std::printf("  %-7s fwd %8.3f ms %6.1f GF/s (x^T untiled %8.3f ms) | igrad %8.3f ms "
                "%6.1f GF/s | wgrad %8.3f ms %6.1f GF/s, per tile %8.3f ms %6.1f GF/s | "
                "both in one pass %8.3f ms (%.2fx igrad + wgrad) | y^T->y %6.3f ms, "
                "back %6.3f ms%s | max diff vs first path %.1e %.1e %.1e %.1e, one pass "
                "%.1e %.1e, untiled fwd %.1e\n",
                path.c_str(), fwd * 1e3, gflop / fwd, fwd_untiled * 1e3, igrad * 1e3,
                gflop / igrad, wgrad * 1e3, gflop / wgrad, wgrad_tiles * 1e3,
                gflop / wgrad_tiles, fused * 1e3, (igrad + std::min(wgrad, wgrad_tiles)) / fused,
                transpose * 1e3, transpose_in * 1e3, transposed ? "" : " WRONG",
                max_abs_diff(yt, ref_y), max_abs_diff(dxt, ref_dx), max_abs_diff(dv, ref_dv),
                max_abs_diff(dv_tiles, ref_dv), max_abs_diff(dxt_fused, ref_dx),
                max_abs_diff(dv_fused, ref_dv), max_abs_diff(yt_untiled, yt));
  }
  sparseprop::set_simd_path("auto");
}

}  // namespace

int main(int argc, char** argv) {
  const int repeats = std::getenv("REPEATS") ? std::atoi(std::getenv("REPEATS")) : 20;
  if (argc > 1 && (argc - 1) % 4 == 0) {
    for (int i = 1; i < argc; i += 4)
      run(std::atoll(argv[i]), std::atoll(argv[i + 1]), std::atoll(argv[i + 2]),
          std::atof(argv[i + 3]), repeats);
    return 0;
  }
  if (argc > 1) {
    std::fprintf(stderr, "usage: %s [batch in out density]...\n", argv[0]);
    return 2;
  }
  for (double density : {0.1, 0.05, 0.01}) {
    run(256, 768, 3072, density, repeats);
    run(256, 3072, 768, density, repeats);
    run(64, 4096, 4096, density, repeats);
    run(128, 512, 256, density, repeats);
  }
  return 0;
}
