// XLA FFI handlers of the sparse linear layer. They decode and validate the
// buffers, then schedule the routines of routines.h over XLA's pool.
//
// The caller's activations are batch-major: x is [batch, in], y is [batch,
// out]. The routines want the batch minor ("transposed": x^T is [in, batch])
// so that one nonzero multiplies a contiguous run of the batch. The handlers
// transpose on the way in and out themselves, in the same parallel tasks as
// the products, instead of leaving separate transposes to XLA: each
// separate op is one more pass over memory and one more thread-pool round
// trip, which cost more than the products themselves at high sparsity.
//
// The transposed operands are cut into tiles of the batch (kBatchTile in
// routines.h), and the products run one tile after another, so the rows
// they read at random stay in the core's L2 cache: tile t of a [batch,
// features] operand holds its rows [first(t), first(t) + width(t)) transposed,
// [features, width(t)], at row first(t).
//
// Where the weight gradient will be wanted, the forward transposes x into
// x^T, [in, batch], a result (LinearForwardAndXt), instead of into tiles in
// scratch, and the backward reads it in place of x: x is then transposed once
// per step, not once in each direction. Untiled, x^T splits along the batch
// like x (a shard of it is its shard's x^T), so any split of the batch that
// XLA makes between the forward and the backward reads it correctly; the
// tasks still read it one tile's columns at a time.
//
// The weight W (out x in, i.e. the transpose of Flax's (in, out) kernel) is
// stored in compressed rows, one row per output feature; the input gradient
// uses the same nonzeros in compressed columns plus a permutation into the
// values.
#include <algorithm>
#include <memory>
#include <vector>

#include "ffi_common.h"
#include "float_values.h"
#include "linear_backward.h"
#include "linear_ffi.h"
#include "pattern.h"
#include "permute.h"
#include "simd_dispatch.h"

namespace sparseprop {
namespace {

// T, in a parameter that takes nullptr without deducing T from it.
template <typename T>
struct Identity {
  using type = T;
};
template <typename T>
using NotDeduced = typename Identity<T>::type;

// Output features computed per block before the block is transposed into the
// batch-major output: bounds the block to 64 KiB, so it is still in cache
// when it is transposed.
constexpr int64_t kRowsPerBlock = 16384 / kBatchTile;

// Where tile t of a transposed operand with `features` rows starts, and how
// far apart its rows are: in the batch-tiled layout (`untiled_ld` 0) at row
// first(t) * features, rows width(t) apart; untiled ([features, batch] with
// rows untiled_ld apart: x^T as the forward saves it) at column first(t).
struct TileAt {
  int64_t offset, ld;
};
TileAt tile_at(const BatchTiles& tiles, int64_t t, int64_t features, int64_t untiled_ld) {
  if (untiled_ld != 0) return {tiles.first(t), untiled_ld};
  return {tiles.first(t) * features, tiles.width(t)};
}

// out[b, r] = sum_p value(p) * in_t[idx[p], b] over the entries p of rows r
// in [begin, end), written batch-major (row stride ld_out) through a
// feature-major block buffer; `in_t` is tiled (BatchTiles) with `in_rows`
// features, or, with `in_ld`, untiled: [in_rows, batch] with rows in_ld
// apart. value(p) = vals[perm[p]] if perm, else vals[p]: the permuted
// values are gathered a block at a time into a buffer that stays in cache
// (once per tile: see linear_backward for when the caller gathers instead),
// widened to float where they are stored as another type (Val): such values
// always come with `perm` (the forward widens its values first).
// `stream`: write `out` with streaming stores (streams_past_cache).
// With `xt` (the linear layer's input x transposed, [ld_out, batch]: the rows
// here are its input features), the weight gradient in the same pass
// (spmm_sddmm_indexed): sums[p] = sum_b in_t[idx[p], b] * x[b, r] for the
// entries p of row r, in the rows' order.
template <typename T, typename Val>
void spmm_batch_major(const RoutinesFor<T>& k, const int32_t* indptr, const int32_t* idx,
                      const Val* vals, const int32_t* perm, const T* in_t,
                      int64_t in_rows, int64_t batch, T* out, int64_t ld_out, int64_t begin,
                      int64_t end, bool stream, const NotDeduced<T>* xt = nullptr,
                      float* sums = nullptr, int64_t in_ld = 0) {
  const BatchTiles tiles{batch};
  std::vector<float> buffer(kRowsPerBlock * kBatchTile);
  std::vector<int32_t> block_ptr(kRowsPerBlock + 1);
  std::vector<float> block_vals;
  if (sums != nullptr && tiles.count() == 0)  // an empty batch: every sum is 0
    std::fill(sums + indptr[begin], sums + indptr[end], 0.0f);
  for (int64_t t = 0; t < tiles.count(); ++t) {
    const int64_t width = tiles.width(t);
    const T* in_tile = in_ld ? in_t + tiles.first(t) : in_t + tiles.first(t) * in_rows;
    const int64_t ld_in = in_ld ? in_ld : width;
    T* out_tile = out + tiles.first(t) * ld_out;
    for (int64_t r0 = begin; r0 < end; r0 += kRowsPerBlock) {
      const int64_t n = std::min(kRowsPerBlock, end - r0);
      // Rows [0, n) of the block, entries from ptr[0] on, sums from `block_sums` on.
      const auto product = [&](const int32_t* ptr, const int32_t* block_idx,
                               const float* block_values, float* block_sums) {
        if (xt == nullptr) {
          k.spmm_indexed(ptr, block_idx, block_values, in_tile, ld_in, buffer.data(), width,
                         width, 0, n);
          return;
        }
        k.spmm_sddmm_indexed(ptr, block_idx, block_values, in_tile,
                             xt + r0 * batch + tiles.first(t), batch, buffer.data(),
                             block_sums, width, 0, n, /*accumulate=*/t > 0);
      };
      if constexpr (std::is_same_v<Val, float>) {
        if (perm == nullptr) {
          product(indptr + r0, idx, vals, sums);
          k.transpose_rounded(buffer.data(), width, out_tile + r0, ld_out, n, 0, width, stream);
          continue;
        }
      }
      const int32_t lo = indptr[r0];
      for (int64_t i = 0; i <= n; ++i) block_ptr[i] = indptr[r0 + i] - lo;
      block_vals.resize(std::max<int32_t>(1, block_ptr[n]));
      gather(vals, perm + lo, 0, block_ptr[n], block_vals.data());
      product(block_ptr.data(), idx + lo, block_vals.data(),
              sums != nullptr ? sums + lo : nullptr);
      k.transpose_rounded(buffer.data(), width, out_tile + r0, ld_out, n, 0, width, stream);
    }
  }
}

// dvalues[p] = <dy^T[n, :], x^T[m, :]> for the entries (n, m) of rows
// [begin, end), over tiled operands: either one tile after another, so the
// scattered rows of x^T come from one tile in L2, at the price of one
// reduction per entry and tile; or over the whole batch at once, reducing
// each entry once. Per tile wins when rows are long (reading x^T dominates),
// the whole batch when they are short (the reductions do); they measured
// even at about 23 entries a row (see benchmarks/results/NOTES.md). The
// caller decides from the whole pattern, so each sum's order depends only on
// the pattern, the batch size and the entry's row, not on the task split.
constexpr int64_t kPerTileMinEntriesPerRow = 24;

template <typename T>
void weight_gradient(const RoutinesFor<T>& k, const int32_t* indptr, const int32_t* idx,
                     const T* dyt, int64_t n_out, const T* xt, int64_t n_in,
                     int64_t batch, bool per_tile, float* dvalues, int64_t begin, int64_t end) {
  if (!per_tile) {
    k.sddmm_indexed(indptr, idx, dyt, n_out, xt, n_in, dvalues, batch, begin, end, false);
    return;
  }
  const BatchTiles tiles{batch};
  for (int64_t t = 0; t < tiles.count(); ++t)
    k.sddmm_indexed(indptr, idx, dyt + tiles.first(t) * n_out, n_out,
                    xt + tiles.first(t) * n_in, n_in, dvalues, tiles.width(t), begin, end,
                    /*accumulate=*/t > 0);
}

// dst[r * ld_dst + c] = src[r * ld_src + c] for r < rows, c < cols: a block
// of rows between x^T and one of its batch tiles.
template <typename T>
void copy_rows(const T* src, int64_t ld_src, T* dst, int64_t ld_dst, int64_t rows,
               int64_t cols) {
  for (int64_t r = 0; r < rows; ++r)
    std::copy(src + r * ld_src, src + r * ld_src + cols, dst + r * ld_dst);
}

// Tasks transposing each of `count` slices of a batch x features matrix at
// `src` into the batch-tiled layout at `dst` (or, `untiled`, into [features,
// batch]), split over the features. `count` is either the source's own
// number of slices (each transposed once) or the call's result slices (each
// result slice gets the source slice it reads).
template <typename T>
Phase transpose_phase(const RoutinesFor<T>& k, const T* src, const Stack& src_stack,
                      T* dst, int64_t count, int parts, bool untiled = false) {
  const int64_t batch = src_stack.dims[0], features = src_stack.dims[1];
  const bool stream = streams_past_cache(count * batch * features);
  Phase phase;
  for (int64_t v = 0; v < count; ++v) split_even(features, v, 0, parts, &phase.tasks);
  phase.fn = [=, &k](const Task& t) {
    const BatchTiles tiles{batch};
    const T* src_v = src + (count == src_stack.count ? t.slice * src_stack.slice()
                                                     : slice_offset(src_stack, t.slice));
    T* dst_v = dst + t.slice * batch * features;
    for (int64_t tile = 0; tile < tiles.count(); ++tile) {
      const TileAt to = tile_at(tiles, tile, features, untiled ? batch : 0);
      k.transpose(src_v + tiles.first(tile) * features, features, dst_v + to.offset, to.ld,
                  tiles.width(tile), t.begin, t.end, stream);
    }
    return ffi::Error::Success();
  };
  return phase;
}

// Whether split_even shares the tiles out over `parts` tasks within 25% of
// an even split of the batch.
bool tiles_share_evenly(const BatchTiles& tiles, int parts) {
  const int64_t n = tiles.count();
  if (n < parts) return false;
  int64_t most = 0;
  for (int64_t i = 0; i < parts; ++i) {
    int64_t width = 0;
    for (int64_t t = n * i / parts; t < n * (i + 1) / parts; ++t) width += tiles.width(t);
    most = std::max(most, width);
  }
  return 4 * most * parts <= 5 * tiles.batch;
}

// The forward, y = x W^T. With `xt_result` it also writes x^T, [in, batch],
// one slice per slice of y (a shared x repeated), for the backward, and the
// products read that instead of the batch-tiled scratch copy: x^T is laid out
// untiled so that it splits along the batch like x, but each task still
// reads one tile's columns of it.
template <ffi::DataType D>
ffi::Future linear_forward(ffi::ThreadPool pool, ffi::Buffer<D> x, ffi::Buffer<D> values,
                           ffi::Buffer<ffi::S32> indptr, ffi::Buffer<ffi::S32> indices,
                           ffi::Result<ffi::Buffer<D>> y,
                           ffi::Result<ffi::Buffer<D>>* xt_result) {
  using T = ffi::NativeType<D>;
  constexpr const char* op = "sparse_linear forward";
  Stack ys, xs, vs;
  SPARSEPROP_RETURN_IF_ERROR(decode_stack(y->dimensions(), 2, op, "output", &ys));
  const int64_t total = ys.count, batch = ys.dims[0];
  SPARSEPROP_RETURN_IF_ERROR(decode_operand(x.dimensions(), 2, ys, op, "x", &xs));
  SPARSEPROP_RETURN_IF_ERROR(check_size(xs.dims[0], batch, op, "x batch size"));
  SPARSEPROP_RETURN_IF_ERROR(decode_operand(values.dimensions(), 1, ys, op, "values", &vs));
  const int64_t n_in = xs.dims[1];
  if (xt_result != nullptr) {
    Stack ss;
    SPARSEPROP_RETURN_IF_ERROR(decode_stack((*xt_result)->dimensions(), 2, op, "x^T output", &ss));
    SPARSEPROP_RETURN_IF_ERROR(check_same_lead(ys, ss, op, "x^T output"));
    SPARSEPROP_RETURN_IF_ERROR(check_size(ss.dims[0], n_in, op, "x^T output features"));
    SPARSEPROP_RETURN_IF_ERROR(check_size(ss.dims[1], batch, op, "x^T output batch size"));
  }
  Pattern pat;
  SPARSEPROP_RETURN_IF_ERROR(decode_pattern(indptr, indices, ys.dims[1], n_in, ys, op,
                                            "pattern", &pat, /*rows_checked_by_tasks=*/true));
  SPARSEPROP_RETURN_IF_ERROR(check_size(vs.dims[0], pat.nnz, op, "values length"));

  const RoutinesFor<T>& k = active_routines<T>();
  const int parts =
      parallel_parts(pool, total * batch * (pat.nnz + kFlopsPerMovedFloat * (n_in + pat.rows)));
  // x^T: the result (untiled, one slice per slice of y), or scratch (tiled,
  // one per slice of x; a shared x is transposed once).
  const bool saving = xt_result != nullptr;
  const int64_t xt_count = saving ? total : xs.count;
  std::shared_ptr<T[]> scratch_xt;
  if (!saving) scratch_xt = scratch<T>(xs.count * n_in * batch);
  T* xt = saving ? (*xt_result)->typed_data() : scratch_xt.get();
  const int64_t xt_ld = saving ? batch : 0;  // spmm_batch_major's in_ld: 0 for tiled
  const auto xt_of = [=](int64_t v) { return xt + (saving ? v : xs.index(v)) * n_in * batch; };
  const T* w = values.typed_data();
  T* out = y->typed_data();
  // The products' values: for bfloat16, widened to float once, in a first
  // phase (rather than a block at a time in every tile of every task).
  std::vector<Phase> phases;
  const FloatValues<T> wv(w, vs, pat.nnz, parts, &phases);
  const bool stream_y = streams_past_cache(total * ys.slice());

  // Whole batch tiles per task, where they share out evenly over the parts
  // (within 25% of an even split of the batch) and each slice has its own x^T:
  // a task transposes a tile of x and runs every row on it while the tile is
  // in its core's L2, in a single phase. Split over rows instead, every core
  // reads all of x^T, half of it written by the other core.
  const BatchTiles tiles{batch};
  const bool by_tiles = xt_count == total && tiles_share_evenly(tiles, parts);
  if (by_tiles) {
    Phase products;
    for (int64_t v = 0; v < total; ++v) split_even(tiles.count(), v, 0, parts, &products.tasks);
    const T* x_data = x.typed_data();
    products.fn = [=, keep = scratch_xt, &k](const Task& t) -> ffi::Error {
      ffi::Error error = check_rows(pat, t.slice, 0, pat.rows, op, "pattern");  // reads all
      if (error.failure()) return error;
      const T* x_v = x_data + slice_offset(xs, t.slice);
      T* xt_v = xt_of(t.slice);
      T* y_v = out + t.slice * ys.slice();
      for (int64_t tile = t.begin; tile < t.end; ++tile) {
        const int64_t first = tiles.first(tile), width = tiles.width(tile);
        const TileAt at = tile_at(tiles, tile, n_in, xt_ld);
        T* xt_tile = xt_v + at.offset;
        k.transpose(x_v + first * n_in, n_in, xt_tile, at.ld, width, 0, n_in, false);
        spmm_batch_major(k, pat.row_ptr(t.slice), pat.col_idx(t.slice),
                         wv.of(t.slice), nullptr, xt_tile, n_in, width,
                         y_v + first * pat.rows, pat.rows, 0, pat.rows, stream_y, nullptr,
                         nullptr, xt_ld);
      }
      return ffi::Error::Success();
    };
    phases.push_back(std::move(products));
    return run_phases(pool, parts, std::move(phases));
  }
  phases.push_back(transpose_phase(k, x.typed_data(), xs, xt, xt_count, parts, saving));
  Phase products;
  for (int64_t v = 0; v < total; ++v)
    split_rows(pat.row_ptr(v), pat.rows, v, parts, &products.tasks);
  products.fn = [=, keep = scratch_xt, &k](const Task& t) -> ffi::Error {
    ffi::Error error = check_rows(pat, t.slice, t.begin, t.end, op, "pattern");
    if (error.failure()) return error;
    spmm_batch_major(k, pat.row_ptr(t.slice), pat.col_idx(t.slice), wv.of(t.slice),
                     nullptr, xt_of(t.slice), n_in, batch,
                     out + t.slice * ys.slice(), pat.rows, t.begin, t.end, stream_y, nullptr,
                     nullptr, xt_ld);
    return ffi::Error::Success();
  };
  phases.push_back(std::move(products));
  return run_phases(pool, parts, std::move(phases));
}

template <ffi::DataType D>
ffi::Future LinearForward(ffi::ThreadPool pool, ffi::Buffer<D> x, ffi::Buffer<D> values,
                          ffi::Buffer<ffi::S32> indptr, ffi::Buffer<ffi::S32> indices,
                          ffi::ResultBuffer<D> y) {
  return linear_forward<D>(pool, x, values, indptr, indices, y, nullptr);
}

template <ffi::DataType D>
ffi::Future LinearForwardAndXt(ffi::ThreadPool pool, ffi::Buffer<D> x, ffi::Buffer<D> values,
                               ffi::Buffer<ffi::S32> indptr, ffi::Buffer<ffi::S32> indices,
                               ffi::ResultBuffer<D> y, ffi::ResultBuffer<D> xt) {
  return linear_forward<D>(pool, x, values, indptr, indices, y, &xt);
}

// dx = dy W (iterating W by columns, the transposed pattern, so each row of
// dx^T accumulates in registers) and dvalues[p] = <dy^T[n, :], x^T[m, :]> for
// every nonzero (n, m) of W. A first phase transposes dy (both read it) and,
// with several tiles, gathers the values into the transposed pattern's order,
// so the input gradient reads them in sequence tile after tile.
// With both gradients, and where the routines' path gains by it
// (one_pass_backward), one pass over W by columns computes both
// (spmm_batch_major with x^T): the weight gradient's sums come out in the
// transposed pattern's order, which each task scatters into dvalues through
// the permutation at the end. Otherwise the weight gradient runs over W by
// rows.
// With bfloat16 operands (T) the products read dy^T and x^T in bfloat16 and
// sum in float; the values are widened as they are gathered, and the weight
// gradient's float sums rounded as they are written (by rows: through a
// float copy of the task's entries).
template <ffi::DataType D>
ffi::Future linear_backward(ffi::ThreadPool pool, ffi::Buffer<D> dy,
                            const LinearBackwardOperands<D>& b, const char* op) {
  using T = ffi::NativeType<D>;
  // The results first: the operands' leading (vmap) dims broadcast against theirs.
  Stack dxs, ds, dys, xs, vs, ps;
  if (b.dx != nullptr)
    SPARSEPROP_RETURN_IF_ERROR(decode_stack((*b.dx)->dimensions(), 2, op, "dx output", &dxs));
  if (b.dvalues != nullptr) {
    SPARSEPROP_RETURN_IF_ERROR(
        decode_stack((*b.dvalues)->dimensions(), 1, op, "dvalues output", &ds));
    if (b.dx != nullptr)
      SPARSEPROP_RETURN_IF_ERROR(check_same_lead(dxs, ds, op, "dvalues output"));
  }
  const Stack& result = b.dx != nullptr ? dxs : ds;
  const int64_t total = result.count;
  SPARSEPROP_RETURN_IF_ERROR(decode_operand(dy.dimensions(), 2, result, op, "dy", &dys));
  const int64_t batch = dys.dims[0], n_out = dys.dims[1];
  int64_t n_in = 0;
  if (b.dx != nullptr) {
    n_in = dxs.dims[1];
    SPARSEPROP_RETURN_IF_ERROR(check_size(dxs.dims[0], batch, op, "dx batch size"));
  }
  if (b.dvalues != nullptr) {
    SPARSEPROP_RETURN_IF_ERROR(decode_operand(b.x->dimensions(), 2, result, op, "x^T", &xs));
    SPARSEPROP_RETURN_IF_ERROR(check_size(xs.dims[1], batch, op, "x^T batch size"));
    if (b.dx != nullptr)
      SPARSEPROP_RETURN_IF_ERROR(check_size(xs.dims[0], n_in, op, "x^T features"));
    n_in = xs.dims[0];
  }
  // The pattern always: the input gradient checks the transposed pattern against it.
  Pattern pat, tpat;
  SPARSEPROP_RETURN_IF_ERROR(decode_pattern(*b.indptr, *b.indices, n_out, n_in, result, op,
                                            "pattern", &pat, /*rows_checked_by_tasks=*/true));
  if (b.dvalues != nullptr)
    SPARSEPROP_RETURN_IF_ERROR(check_size(ds.dims[0], pat.nnz, op, "dvalues output length"));
  if (b.dx != nullptr) {
    SPARSEPROP_RETURN_IF_ERROR(decode_transposed(b.values->dimensions(), *b.t_indptr, *b.t_indices,
                                                 *b.t_perm, pat, result, op, &vs, &tpat, &ps));
  }

  const RoutinesFor<T>& k = active_routines<T>();
  const bool want_dx = b.dx != nullptr, want_dw = b.dvalues != nullptr;
  const int64_t nnz = want_dx ? tpat.nnz : pat.nnz;
  // dy^T in; dx out.
  const int64_t moved = n_out + (want_dx ? n_in : 0);
  const int parts = parallel_parts(
      pool, total * batch * ((want_dx + want_dw) * nnz + kFlopsPerMovedFloat * moved));

  // Phase 1: the layout work. dy^T has one slice per slice of dy; the
  // gathered values one per slice of the values and permutation together.
  std::vector<Phase> layout;
  auto dyt = scratch<T>(dys.count * n_out * batch);
  layout.push_back(transpose_phase(k, dy.typed_data(), dys, dyt.get(), dys.count, parts));
  std::shared_ptr<float[]> gathered, sums;
  std::shared_ptr<T[]> xt_tiles;
  const bool one_pass = want_dx && want_dw && k.one_pass_backward;
  if (one_pass) sums = scratch<float>(total * nnz);
  // The weight gradient over W by rows reads x^T tile by tile: with several
  // tiles, copied into the tiled layout.
  const BatchTiles tiles{batch};
  const T* xt = want_dw ? b.x->typed_data() : nullptr;
  if (want_dw && !one_pass && tiles.count() > 1) {
    xt_tiles = scratch<T>(xs.count * xs.slice());
    Phase copies;
    for (int64_t v = 0; v < xs.count; ++v) split_even(n_in, v, 0, parts, &copies.tasks);
    copies.fn = [=, tiled = xt_tiles.get()](const Task& t) {
      for (int64_t tile = 0; tile < tiles.count(); ++tile) {
        const TileAt from = tile_at(tiles, tile, n_in, /*untiled_ld=*/batch);
        const TileAt to = tile_at(tiles, tile, n_in, /*untiled_ld=*/0);
        copy_rows(xt + t.slice * xs.slice() + from.offset + t.begin * from.ld, from.ld,
                  tiled + t.slice * xs.slice() + to.offset + t.begin * to.ld, to.ld,
                  t.end - t.begin, tiles.width(tile));
      }
      return ffi::Error::Success();
    };
    layout.push_back(std::move(copies));
  }
  // With several tiles, the values are gathered into the transposed
  // pattern's order once, here, rather than once per tile; with one, a block
  // at a time in the products (a gathered copy of them all costs a write and
  // a read of nnz floats through memory, which only pays where it saves the
  // gathers of the later tiles).
  // The transposed pattern is checked against the pattern before its
  // values are gathered (in the gathering phase, or in the products' tasks),
  // in a pass of its own: fused into the gather, the two arrays it reads at
  // random no longer fit in L2 together, and both loops slow down. No result
  // is kept from an inconsistent pair, and two tasks never scatter to one
  // entry.
  const bool gather_first = want_dx && tiles.count() > 1;
  const T* w = want_dx ? b.values->typed_data() : nullptr;
  const int32_t* perm = want_dx ? b.t_perm->typed_data() : nullptr;
  const auto check_transposed = [=](int64_t v, int64_t begin, int64_t end) {
    return check_transposed_rows(tpat, perm + slice_offset(ps, v), pat, v, begin, end, op);
  };
  // The gathered values, one slice per slice of all the operands they come
  // from and are checked against.
  const Stack gs = joint({&vs, &ps, &tpat.indptr_stack, &tpat.indices_stack, &pat.indptr_stack,
                          &pat.indices_stack});
  if (gather_first) {
    gathered = scratch<float>(gs.count * nnz);
    Phase gathering;
    for (int64_t i = 0; i < gs.count; ++i)
      split_rows(tpat.row_ptr(gs.representative(i)), n_in, i, parts, &gathering.tasks);
    gathering.fn = [=](const Task& t) -> ffi::Error {
      const int64_t v = gs.representative(t.slice);
      ffi::Error error = check_transposed(v, t.begin, t.end);
      if (error.failure()) return error;
      const int32_t* tptr = tpat.row_ptr(v);
      gather(w + slice_offset(vs, v), perm + slice_offset(ps, v), tptr[t.begin], tptr[t.end],
             gathered.get() + t.slice * nnz);
      return ffi::Error::Success();
    };
    layout.push_back(std::move(gathering));
  }

  // Phase 2: the input-gradient tasks over the rows of the transposed
  // pattern (with the weight gradient's sums, one_pass) or the
  // weight-gradient tasks over the rows of the pattern.
  std::vector<Phase> products;
  const int64_t dx_slice = dxs.slice(), dw_slice = ds.slice();
  T* dw = want_dw ? (*b.dvalues)->typed_data() : nullptr;
  if (want_dx) {
    Phase igrad;
    for (int64_t v = 0; v < total; ++v) split_rows(tpat.row_ptr(v), n_in, v, parts, &igrad.tasks);
    T* dx = (*b.dx)->typed_data();
    const bool stream_dx = streams_past_cache(total * dx_slice);
    igrad.fn = [=, &k](const Task& t) -> ffi::Error {
      if (!gather_first) {  // else checked in the gathering phase
        ffi::Error error = check_transposed(t.slice, t.begin, t.end);
        if (error.failure()) return error;
      }
      const int32_t* perm_v = perm + slice_offset(ps, t.slice);
      float* sums_v = one_pass ? sums.get() + t.slice * nnz : nullptr;
      const auto products = [&](const auto* vals, const int32_t* vals_perm) {
        spmm_batch_major(k, tpat.row_ptr(t.slice), tpat.col_idx(t.slice), vals, vals_perm,
                         dyt.get() + slice_offset(dys, t.slice), n_out, batch,
                         dx + t.slice * dx_slice, n_in, t.begin, t.end, stream_dx,
                         one_pass ? xt + slice_offset(xs, t.slice) : nullptr, sums_v);
      };
      if (gather_first)
        products(gathered.get() + gs.index(t.slice) * nnz, nullptr);
      else
        products(w + slice_offset(vs, t.slice), perm_v);
      if (one_pass) {
        const int32_t* tptr = tpat.row_ptr(t.slice);
        scatter(sums_v, perm_v, tptr[t.begin], tptr[t.end], dw + t.slice * dw_slice);
      }
      return ffi::Error::Success();
    };
    products.push_back(std::move(igrad));
  }
  if (want_dw && !one_pass) {
    Phase wgrad;
    for (int64_t v = 0; v < total; ++v) split_rows(pat.row_ptr(v), n_out, v, parts, &wgrad.tasks);
    const bool per_tile = batch > kBatchTile && pat.nnz >= kPerTileMinEntriesPerRow * n_out;
    const FloatSums<T> sums_of(dw, total, dw_slice);
    wgrad.fn = [=, &k](const Task& t) -> ffi::Error {
      ffi::Error error = check_rows(pat, t.slice, t.begin, t.end, op, "pattern");
      if (error.failure()) return error;
      weight_gradient(k, pat.row_ptr(t.slice), pat.col_idx(t.slice),
                      dyt.get() + slice_offset(dys, t.slice), n_out,
                      (xt_tiles ? xt_tiles.get() : xt) + slice_offset(xs, t.slice), n_in,
                      batch, per_tile, sums_of.of(t.slice), t.begin, t.end);
      const int32_t* ptr = pat.row_ptr(t.slice);
      sums_of.finish(t.slice, ptr[t.begin], ptr[t.end]);
      return ffi::Error::Success();
    };
    products.push_back(std::move(wgrad));
  }
  std::vector<Phase> phases;
  phases.push_back(concurrent(std::move(layout)));
  phases.push_back(concurrent(std::move(products)));
  return run_phases(pool, parts, std::move(phases));
}

template <ffi::DataType D>
ffi::Future LinearInputGrad(ffi::ThreadPool pool, ffi::Buffer<D> dy, ffi::Buffer<D> values,
                            ffi::Buffer<ffi::S32> indptr, ffi::Buffer<ffi::S32> indices,
                            ffi::Buffer<ffi::S32> t_indptr, ffi::Buffer<ffi::S32> t_indices,
                            ffi::Buffer<ffi::S32> t_perm, ffi::ResultBuffer<D> dx) {
  const auto b = LinearBackwardOperands<D>::input_grad(values, indptr, indices, t_indptr,
                                                       t_indices, t_perm, dx);
  return linear_backward<D>(pool, dy, b, "sparse_linear input gradient");
}

template <ffi::DataType D>
ffi::Future LinearWeightGrad(ffi::ThreadPool pool, ffi::Buffer<D> dy, ffi::Buffer<D> xt,
                             ffi::Buffer<ffi::S32> indptr, ffi::Buffer<ffi::S32> indices,
                             ffi::ResultBuffer<D> dvalues) {
  const auto b = LinearBackwardOperands<D>::weight_grad(xt, indptr, indices, dvalues);
  return linear_backward<D>(pool, dy, b, "sparse_linear weight gradient");
}

template <ffi::DataType D>
ffi::Future LinearBackward(ffi::ThreadPool pool, ffi::Buffer<D> dy, ffi::Buffer<D> xt,
                           ffi::Buffer<D> values, ffi::Buffer<ffi::S32> indptr,
                           ffi::Buffer<ffi::S32> indices, ffi::Buffer<ffi::S32> t_indptr,
                           ffi::Buffer<ffi::S32> t_indices, ffi::Buffer<ffi::S32> t_perm,
                           ffi::ResultBuffer<D> dx, ffi::ResultBuffer<D> dvalues) {
  LinearBackwardOperands<D> b{&xt, &values, &indptr, &indices, &t_indptr,
                              &t_indices, &t_perm, &dx, &dvalues};
  return linear_backward<D>(pool, dy, b, "sparse_linear backward");
}

}  // namespace

// One handler of each per dtype, F32 and BF16.
#define SPARSEPROP_LINEAR_HANDLERS(suffix, D)                                          \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(kLinearForward##suffix, Guarded<LinearForward<D>>::Call, \
                                bind<kLinearForwardSignature<D>>());                   \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(kLinearForwardAndXt##suffix,                           \
                                Guarded<LinearForwardAndXt<D>>::Call,                  \
                                bind<kLinearForwardAndXtSignature<D>>());              \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(kLinearInputGrad##suffix,                              \
                                Guarded<LinearInputGrad<D>>::Call,                     \
                                bind<kLinearInputGradSignature<D>>());                 \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(kLinearWeightGrad##suffix,                             \
                                Guarded<LinearWeightGrad<D>>::Call,                    \
                                bind<kLinearWeightGradSignature<D>>());                \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(kLinearBackward##suffix, Guarded<LinearBackward<D>>::Call, \
                                bind<kLinearBackwardSignature<D>>());
SPARSEPROP_LINEAR_HANDLERS(, ffi::F32)
SPARSEPROP_LINEAR_HANDLERS(Bf16, ffi::BF16)
#undef SPARSEPROP_LINEAR_HANDLERS

}  // namespace sparseprop
