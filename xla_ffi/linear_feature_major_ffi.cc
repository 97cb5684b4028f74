// XLA FFI handlers of the feature-major sparse linear layer: x and y are
// [groups, features, n], and the layer contracts the middle dim. Each group
// is already the transposed operand the routines want (features by rows, a
// run of n batch columns each), so nothing is transposed: the routines read
// x, dy and write y, dx in place, tile by tile of each group's columns (so
// the rows they read at random stay in L2). Consecutive feature-major layers
// (a Mixer's token mixing on [batch, tokens, dim]) then pay no transpose at
// all, where the batch-major layer (linear_ffi.cc) and the swapaxes around
// it would move every activation three times.
//
// The weight W (out x in) is stored in compressed rows as in linear_ffi.cc;
// the input gradient walks it by columns (the transposed pattern, its values
// gathered through the permutation first). The weight gradient sums over
// the groups, in windows of groups, so each sum's order depends only on the
// shapes.
//
// The handlers exist for float32 and bfloat16 (T) operands: with bfloat16
// the products read x and dy as bfloat16 and sum in float, into a buffer
// of a block of rows that is rounded into the result.
#include <algorithm>
#include <memory>
#include <vector>

#include "ffi_common.h"
#include "float_values.h"
#include "linear_backward.h"
#include "linear_feature_major_ffi.h"
#include "pattern.h"
#include "permute.h"
#include "simd_dispatch.h"

namespace sparseprop {
namespace {

// The columns of a [groups, features, n] operand as units of work: the batch
// tiles of each group; unit u is tile u % tiles of group u / tiles.
struct Units {
  BatchTiles tiles;
  int64_t groups;
  int64_t count() const { return groups * tiles.count(); }
  int64_t width(int64_t u) const { return tiles.width(u % tiles.count()); }
  // Where unit u's columns start in an operand with `features` rows a group.
  int64_t offset(int64_t u, int64_t features) const {
    return u / tiles.count() * features * tiles.batch + tiles.first(u % tiles.count());
  }
};

// Rows of a unit computed into the float buffer per block before they are
// rounded into a bfloat16 result: a 64 KiB buffer, in cache when it is read.
constexpr int64_t kRowsPerRoundedBlock = 16384 / kBatchTile;

// out[r, 0 : width] (rows ld_out apart) = sum_p values[p] * in[idx[p], 0 : width]
// (rows ld_in apart) for the rows r in [row_begin, row_end): straight into out
// for float, through a float buffer a block of rows at a time for bfloat16.
template <typename T>
void rows_product(const RoutinesFor<T>& k, const int32_t* indptr, const int32_t* idx,
                  const float* values, const T* in, int64_t ld_in, T* out, int64_t ld_out,
                  int64_t width, int64_t row_begin, int64_t row_end) {
  if constexpr (std::is_same_v<T, float>) {
    k.spmm_indexed(indptr, idx, values, in, ld_in, out, ld_out, width, row_begin, row_end);
  } else {
    std::vector<float> buffer(kRowsPerRoundedBlock * kBatchTile);
    for (int64_t r0 = row_begin; r0 < row_end; r0 += kRowsPerRoundedBlock) {
      const int64_t rows = std::min(kRowsPerRoundedBlock, row_end - r0);
      // indptr + r0: the block's rows as rows 0.. (entries keep their positions).
      k.spmm_indexed(indptr + r0, idx, values, in, ld_in, buffer.data(), width, width, 0, rows);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t l = 0; l < width; ++l)
          out[(r0 + r) * ld_out + l] = rounded<T>(buffer[r * width + l]);
    }
  }
}

// Tasks running out[r] = sum_p value(p) * in[idx[p]] on every unit's
// columns, for the rows of `pat` (out has pat.rows features, in pat.cols):
// split over the units where there are enough to go round, else over the
// rows. `check`: each task first validates the rows it reads (check_rows);
// else the caller has already.
template <typename T>
Phase products_phase(const RoutinesFor<T>& k, const Pattern& pat, const Stack& in_stack,
                     const T* in, const Stack& out_stack, T* out,
                     std::function<const float*(int64_t)> values_of, const Units& units,
                     int parts, bool check, const char* op) {
  Phase phase;
  const bool by_units = units.count() >= parts;
  for (int64_t v = 0; v < out_stack.count; ++v) {
    if (by_units)
      split_even(units.count(), v, 0, parts, &phase.tasks);
    else
      split_rows(pat.row_ptr(v), pat.rows, v, parts, &phase.tasks);
  }
  const int64_t n = units.tiles.batch, in_rows = pat.cols, out_rows = pat.rows;
  phase.fn = [=, &k](const Task& t) -> ffi::Error {
    const int64_t row_begin = by_units ? 0 : t.begin, row_end = by_units ? out_rows : t.end;
    if (check) {
      ffi::Error error = check_rows(pat, t.slice, row_begin, row_end, op, "pattern");
      if (error.failure()) return error;
    }
    const int64_t u_begin = by_units ? t.begin : 0, u_end = by_units ? t.end : units.count();
    const T* in_v = in + slice_offset(in_stack, t.slice);
    T* out_v = out + t.slice * out_stack.slice();
    const float* vals = values_of(t.slice);
    for (int64_t u = u_begin; u < u_end; ++u)
      rows_product(k, pat.row_ptr(t.slice), pat.col_idx(t.slice), vals,
                   in_v + units.offset(u, in_rows), n, out_v + units.offset(u, out_rows), n,
                   units.width(u), row_begin, row_end);
    return ffi::Error::Success();
  };
  return phase;
}

// Bytes of x and dy (all their rows, a group's columns) the weight gradient
// reads per window of groups: about half a core's L2.
constexpr int64_t kWeightGradWindowBytes = 256 * 1024;

template <ffi::DataType D>
ffi::Future LinearFeatureMajorForward(ffi::ThreadPool pool, ffi::Buffer<D> x,
                                      ffi::Buffer<D> values, ffi::Buffer<ffi::S32> indptr,
                                      ffi::Buffer<ffi::S32> indices, ffi::ResultBuffer<D> y) {
  using T = ffi::NativeType<D>;
  constexpr const char* op = "sparse_linear forward (feature-major)";
  Stack ys, xs, vs;
  SPARSEPROP_RETURN_IF_ERROR(decode_stack(y->dimensions(), 3, op, "output", &ys));
  const int64_t groups = ys.dims[0], n_out = ys.dims[1], n = ys.dims[2];
  SPARSEPROP_RETURN_IF_ERROR(decode_operand(x.dimensions(), 3, ys, op, "x", &xs));
  SPARSEPROP_RETURN_IF_ERROR(check_size(xs.dims[0], groups, op, "x groups"));
  SPARSEPROP_RETURN_IF_ERROR(check_size(xs.dims[2], n, op, "x columns"));
  const int64_t n_in = xs.dims[1];
  SPARSEPROP_RETURN_IF_ERROR(decode_operand(values.dimensions(), 1, ys, op, "values", &vs));
  Pattern pat;
  SPARSEPROP_RETURN_IF_ERROR(decode_pattern(indptr, indices, n_out, n_in, ys, op, "pattern",
                                            &pat, /*rows_checked_by_tasks=*/true));
  SPARSEPROP_RETURN_IF_ERROR(check_size(vs.dims[0], pat.nnz, op, "values length"));

  const RoutinesFor<T>& k = active_routines<T>();
  const Units units{BatchTiles{n}, groups};
  const int parts = parallel_parts(pool, ys.count * groups * n * (pat.nnz + n_out));
  const T* w = values.typed_data();
  std::vector<Phase> phases;
  const FloatValues<T> wv(w, vs, pat.nnz, parts, &phases);  // widened first, for bfloat16
  phases.push_back(products_phase(
      k, pat, xs, x.typed_data(), ys, y->typed_data(),
      [wv](int64_t v) { return wv.of(v); }, units, parts, /*check=*/true, op));
  return run_phases(pool, parts, std::move(phases));
}

// dx = W^T dy, group by group, and dvalues[p] = sum over the groups of
// <dy[g, r, :], x[g, c, :]> for every entry p = (r, c) of W. A first phase
// checks the transposed pattern against the pattern and gathers the values
// into its order; the second runs the input-gradient tasks (over units or
// the transposed pattern's rows) beside the weight-gradient tasks (over the
// pattern's rows).
template <ffi::DataType D>
ffi::Future linear_feature_major_backward(ffi::ThreadPool pool, ffi::Buffer<D> dy,
                                          const LinearBackwardOperands<D>& b, const char* op) {
  using T = ffi::NativeType<D>;
  const bool want_dx = b.dx != nullptr, want_dw = b.dvalues != nullptr;
  // The results first: the operands' leading (vmap) dims broadcast against theirs.
  Stack dxs, ds, dys, xs, vs, ps;
  if (want_dx)
    SPARSEPROP_RETURN_IF_ERROR(decode_stack((*b.dx)->dimensions(), 3, op, "dx output", &dxs));
  if (want_dw) {
    SPARSEPROP_RETURN_IF_ERROR(
        decode_stack((*b.dvalues)->dimensions(), 1, op, "dvalues output", &ds));
    if (want_dx) SPARSEPROP_RETURN_IF_ERROR(check_same_lead(dxs, ds, op, "dvalues output"));
  }
  const Stack& result = want_dx ? dxs : ds;
  SPARSEPROP_RETURN_IF_ERROR(decode_operand(dy.dimensions(), 3, result, op, "dy", &dys));
  const int64_t groups = dys.dims[0], n_out = dys.dims[1], n = dys.dims[2];
  int64_t n_in = 0;
  if (want_dx) {
    n_in = dxs.dims[1];
    SPARSEPROP_RETURN_IF_ERROR(check_size(dxs.dims[0], groups, op, "dx groups"));
    SPARSEPROP_RETURN_IF_ERROR(check_size(dxs.dims[2], n, op, "dx columns"));
  }
  if (want_dw) {
    SPARSEPROP_RETURN_IF_ERROR(decode_operand(b.x->dimensions(), 3, result, op, "x", &xs));
    SPARSEPROP_RETURN_IF_ERROR(check_size(xs.dims[0], groups, op, "x groups"));
    SPARSEPROP_RETURN_IF_ERROR(check_size(xs.dims[2], n, op, "x columns"));
    if (want_dx) SPARSEPROP_RETURN_IF_ERROR(check_size(xs.dims[1], n_in, op, "x features"));
    n_in = xs.dims[1];
  }
  // The pattern always: the input gradient checks the transposed pattern against it.
  Pattern pat, tpat;
  SPARSEPROP_RETURN_IF_ERROR(decode_pattern(*b.indptr, *b.indices, n_out, n_in, result, op,
                                            "pattern", &pat, /*rows_checked_by_tasks=*/true));
  if (want_dw)
    SPARSEPROP_RETURN_IF_ERROR(check_size(ds.dims[0], pat.nnz, op, "dvalues output length"));
  if (want_dx) {
    SPARSEPROP_RETURN_IF_ERROR(decode_transposed(b.values->dimensions(), *b.t_indptr, *b.t_indices,
                                                 *b.t_perm, pat, result, op, &vs, &tpat, &ps));
  }

  const RoutinesFor<T>& k = active_routines<T>();
  const Units units{BatchTiles{n}, groups};
  const int64_t nnz = pat.nnz;
  const int parts = parallel_parts(
      pool, result.count * groups * n * ((want_dx + want_dw) * nnz + n_out + n_in));
  std::vector<Phase> phases;
  std::vector<Phase> products;
  if (want_dx) {
    // The gathered values, one slice per slice of all the operands they come
    // from and are checked against. Checking every row of the transposed
    // pattern against the pattern validates both.
    const Stack gs = joint({&vs, &ps, &tpat.indptr_stack, &tpat.indices_stack,
                            &pat.indptr_stack, &pat.indices_stack});
    std::shared_ptr<float[]> gathered = scratch<float>(std::max<int64_t>(1, gs.count * nnz));
    const T* w = b.values->typed_data();
    const int32_t* perm = b.t_perm->typed_data();
    Phase gathering;
    for (int64_t i = 0; i < gs.count; ++i)
      split_rows(tpat.row_ptr(gs.representative(i)), n_in, i, parts, &gathering.tasks);
    gathering.fn = [=](const Task& t) -> ffi::Error {
      const int64_t v = gs.representative(t.slice);
      const int32_t* perm_v = perm + slice_offset(ps, v);
      ffi::Error error = check_transposed_rows(tpat, perm_v, pat, v, t.begin, t.end, op);
      if (error.failure()) return error;
      const int32_t* tptr = tpat.row_ptr(v);
      gather(w + slice_offset(vs, v), perm_v, tptr[t.begin], tptr[t.end],
             gathered.get() + t.slice * nnz);
      return ffi::Error::Success();
    };
    phases.push_back(std::move(gathering));
    products.push_back(products_phase(
        k, tpat, dys, dy.typed_data(), dxs, (*b.dx)->typed_data(),
        [=](int64_t v) -> const float* { return gathered.get() + gs.index(v) * nnz; }, units,
        parts, /*check=*/false, op));
  }
  if (want_dw) {
    // The routines' sddmm over the groups as grid positions, a few groups at
    // a time (accumulating), so the rows it reads at random stay in L2. It
    // finds an entry's run through an offsets table, which each task fills
    // for its own rows.
    Grid grid;
    grid.n_outer = groups;
    grid.in_outer = n_in * n;
    grid.out_outer = n_out * n;
    const int64_t window = std::max<int64_t>(
        1, kWeightGradWindowBytes / std::max<int64_t>(1, 4 * (n_in + n_out) * n));
    auto offsets = scratch<int64_t>(std::max<int64_t>(1, ds.count * nnz));
    Phase wgrad;
    for (int64_t v = 0; v < ds.count; ++v)
      split_rows(pat.row_ptr(v), n_out, v, parts, &wgrad.tasks);
    const T* x = b.x->typed_data();
    const T* dyd = dy.typed_data();
    T* dw = (*b.dvalues)->typed_data();
    const FloatSums<T> sums_of(dw, ds.count, ds.slice());
    wgrad.fn = [=, &k](const Task& t) -> ffi::Error {
      ffi::Error error = check_rows(pat, t.slice, t.begin, t.end, op, "pattern");
      if (error.failure()) return error;
      const int32_t* ptr = pat.row_ptr(t.slice);
      const int32_t* idx = pat.col_idx(t.slice);
      T* dw_v = dw + t.slice * ds.slice();
      if (groups == 0 || n == 0) {  // an empty batch: every sum is 0
        std::fill(dw_v + ptr[t.begin], dw_v + ptr[t.end], T{});
        return ffi::Error::Success();
      }
      float* sums_v = sums_of.of(t.slice);
      int64_t* offsets_v = offsets.get() + t.slice * nnz;
      for (int64_t p = ptr[t.begin]; p < ptr[t.end]; ++p) offsets_v[p] = int64_t{idx[p]} * n;
      const T* dy_v = dyd + slice_offset(dys, t.slice);
      const T* x_v = x + slice_offset(xs, t.slice);
      for (int64_t q = 0; q < groups; q += window)
        k.sddmm(ptr, offsets_v, dy_v, n, x_v, sums_v, n, grid, q, std::min(groups, q + window),
                t.begin, t.end, /*accumulate=*/q > 0);
      sums_of.finish(t.slice, ptr[t.begin], ptr[t.end]);
      return ffi::Error::Success();
    };
    products.push_back(std::move(wgrad));
  }
  phases.push_back(concurrent(std::move(products)));
  return run_phases(pool, parts, std::move(phases));
}

template <ffi::DataType D>
ffi::Future LinearFeatureMajorInputGrad(ffi::ThreadPool pool, ffi::Buffer<D> dy,
                                        ffi::Buffer<D> values, ffi::Buffer<ffi::S32> indptr,
                                        ffi::Buffer<ffi::S32> indices,
                                        ffi::Buffer<ffi::S32> t_indptr,
                                        ffi::Buffer<ffi::S32> t_indices,
                                        ffi::Buffer<ffi::S32> t_perm, ffi::ResultBuffer<D> dx) {
  const auto b = LinearBackwardOperands<D>::input_grad(values, indptr, indices, t_indptr,
                                                       t_indices, t_perm, dx);
  return linear_feature_major_backward<D>(pool, dy, b,
                                          "sparse_linear input gradient (feature-major)");
}

template <ffi::DataType D>
ffi::Future LinearFeatureMajorWeightGrad(ffi::ThreadPool pool, ffi::Buffer<D> dy,
                                         ffi::Buffer<D> x, ffi::Buffer<ffi::S32> indptr,
                                         ffi::Buffer<ffi::S32> indices,
                                         ffi::ResultBuffer<D> dvalues) {
  const auto b = LinearBackwardOperands<D>::weight_grad(x, indptr, indices, dvalues);
  return linear_feature_major_backward<D>(pool, dy, b,
                                          "sparse_linear weight gradient (feature-major)");
}

template <ffi::DataType D>
ffi::Future LinearFeatureMajorBackward(
    ffi::ThreadPool pool, ffi::Buffer<D> dy, ffi::Buffer<D> x, ffi::Buffer<D> values,
    ffi::Buffer<ffi::S32> indptr, ffi::Buffer<ffi::S32> indices,
    ffi::Buffer<ffi::S32> t_indptr, ffi::Buffer<ffi::S32> t_indices,
    ffi::Buffer<ffi::S32> t_perm, ffi::ResultBuffer<D> dx, ffi::ResultBuffer<D> dvalues) {
  LinearBackwardOperands<D> b{&x, &values, &indptr, &indices, &t_indptr,
                              &t_indices, &t_perm, &dx, &dvalues};
  return linear_feature_major_backward<D>(pool, dy, b, "sparse_linear backward (feature-major)");
}

}  // namespace

// One handler of each per dtype, F32 and BF16 (the signatures are the
// batch-major layer's: linear_ffi.h).
#define SPARSEPROP_FEATURE_MAJOR_HANDLERS(suffix, D)                                   \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(kLinearFeatureMajorForward##suffix,                    \
                                Guarded<LinearFeatureMajorForward<D>>::Call,           \
                                bind<kLinearForwardSignature<D>>());                   \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(kLinearFeatureMajorBackward##suffix,                   \
                                Guarded<LinearFeatureMajorBackward<D>>::Call,          \
                                bind<kLinearBackwardSignature<D>>());                  \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(kLinearFeatureMajorInputGrad##suffix,                  \
                                Guarded<LinearFeatureMajorInputGrad<D>>::Call,         \
                                bind<kLinearInputGradSignature<D>>());                 \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(kLinearFeatureMajorWeightGrad##suffix,                 \
                                Guarded<LinearFeatureMajorWeightGrad<D>>::Call,        \
                                bind<kLinearWeightGradSignature<D>>());
SPARSEPROP_FEATURE_MAJOR_HANDLERS(, ffi::F32)
SPARSEPROP_FEATURE_MAJOR_HANDLERS(Bf16, ffi::BF16)
#undef SPARSEPROP_FEATURE_MAJOR_HANDLERS

}  // namespace sparseprop
