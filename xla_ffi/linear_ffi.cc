// XLA FFI handlers of the sparse linear layer. They decode and validate the
// buffers, then schedule the kernels of sparse_kernels.h over XLA's pool.
//
// The caller's activations are batch-major: x is [batch, in], y is [batch,
// out]. The kernels want the batch minor ("transposed": x^T is [in, batch])
// so that one nonzero multiplies a contiguous run of the batch. The handlers
// transpose on the way in and out themselves, in the same parallel tasks as
// the products, instead of leaving separate transposes to XLA: each
// separate op is one more pass over memory and one more thread-pool round
// trip, which cost more than the products themselves at high sparsity.
// The forward returns x^T as the residual the weight gradient reads.
//
// The weight W (out x in, i.e. the transpose of Flax's (in, out) kernel) is
// stored in compressed rows, one row per output feature; the input gradient
// uses the same nonzeros in compressed columns plus a permutation into the
// values.
#include <algorithm>
#include <memory>
#include <vector>

#include "ffi_common.h"
#include "linear_ffi.h"
#include "simd_dispatch.h"

namespace sparseprop {
namespace {

// Output features computed per block before the block is transposed into the
// batch-major output: bounds the block to about 64 KiB, so it is still in
// cache when it is transposed.
int64_t rows_per_block(int64_t batch) {
  return std::max<int64_t>(8, (16384 / std::max<int64_t>(batch, 1)) / 8 * 8);
}

// out[b, r] = sum_p value(p) * in_t[idx[p] * batch + b] over the entries p
// of rows r in [begin, end), written batch-major (row stride ld_out) through
// a feature-major block buffer; value(p) = vals[perm[p]] if perm, else
// vals[p]. The permuted values (the input gradient walks the weight by
// columns) are gathered a block at a time into a small buffer that stays in
// cache, rather than into a reordered copy of all values.
void spmm_batch_major(const KernelTable& k, const int32_t* indptr, const int32_t* idx,
                      const float* vals, const int32_t* perm, const float* in_t, int64_t batch,
                      float* out, int64_t ld_out, int64_t begin, int64_t end) {
  const int64_t block = rows_per_block(batch);
  std::vector<float> buffer(std::max<int64_t>(1, block * batch));
  std::vector<int32_t> block_ptr(block + 1);
  std::vector<float> block_vals;
  for (int64_t r0 = begin; r0 < end; r0 += block) {
    const int64_t n = std::min(block, end - r0);
    if (perm == nullptr) {
      k.spmm_indexed(indptr + r0, idx, vals, in_t, buffer.data(), batch, batch, 0, n);
    } else {
      const int32_t lo = indptr[r0];
      for (int64_t i = 0; i <= n; ++i) block_ptr[i] = indptr[r0 + i] - lo;
      block_vals.resize(std::max<int32_t>(1, block_ptr[n]));
      for (int32_t p = 0; p < block_ptr[n]; ++p) block_vals[p] = vals[perm[lo + p]];
      k.spmm_indexed(block_ptr.data(), idx + lo, block_vals.data(), in_t, buffer.data(), batch,
                     batch, 0, n);
    }
    k.transpose(buffer.data(), batch, out + r0, ld_out, n, 0, batch);
  }
}

// Checks the indices of the entries of task `t`'s rows (each task checks the
// entries it reads); returns the entries' range in `lo`, `hi`.
ffi::Error check_task_indices(const Pattern& pat, const Task& t, const char* op,
                              const char* name, int64_t* lo, int64_t* hi) {
  *lo = pat.row_ptr(t.slice)[t.begin];
  *hi = pat.row_ptr(t.slice)[t.end];
  return check_indices(pat.col_idx(t.slice), *lo, *hi, pat.cols, op, name);
}

// Tasks transposing each of `count` slices of a batch x features matrix at
// `src` into features x batch at `dst`, split over the features.
Phase transpose_phase(const KernelTable& k, const float* src, const Stack& src_stack,
                      float* dst, int64_t count, int parts) {
  const int64_t batch = src_stack.dims[0], features = src_stack.dims[1];
  Phase phase;
  for (int64_t v = 0; v < count; ++v) split_even(features, v, 0, parts, &phase.tasks);
  phase.fn = [=, &k](const Task& t) {
    k.transpose(src + slice_offset(src_stack, t.slice), features, dst + t.slice * batch * features,
                batch, batch, t.begin, t.end);
    return ffi::Error::Success();
  };
  return phase;
}

// The forward, y = x W^T; x^T goes to `xt_out` if given, else to scratch.
ffi::Future linear_forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                           ffi::Buffer<ffi::F32> values, ffi::Buffer<ffi::S32> indptr,
                           ffi::Buffer<ffi::S32> indices, ffi::Result<ffi::Buffer<ffi::F32>> y,
                           float* xt_out, ffi::Span<const int64_t> xt_dims) {
  constexpr const char* op = "sparse_linear forward";
  Stack ys, xs, vs;
  SPARSEPROP_RETURN_IF_ERROR(decode_stack(y->dimensions(), 2, op, "output", &ys));
  const int64_t total = ys.count, batch = ys.dims[0];
  SPARSEPROP_RETURN_IF_ERROR(decode_operand(x.dimensions(), 2, total, op, "x", &xs));
  SPARSEPROP_RETURN_IF_ERROR(check_size(xs.dims[0], batch, op, "x batch size"));
  SPARSEPROP_RETURN_IF_ERROR(decode_operand(values.dimensions(), 1, total, op, "values", &vs));
  const int64_t n_in = xs.dims[1];
  if (xt_out != nullptr) {
    Stack ts;
    SPARSEPROP_RETURN_IF_ERROR(decode_stack(xt_dims, 2, op, "x^T output", &ts));
    SPARSEPROP_RETURN_IF_ERROR(check_size(ts.count, total, op, "x^T output stack"));
    SPARSEPROP_RETURN_IF_ERROR(check_size(ts.dims[0], n_in, op, "x^T output rows"));
    SPARSEPROP_RETURN_IF_ERROR(check_size(ts.dims[1], batch, op, "x^T output batch size"));
  }
  Pattern pat;
  SPARSEPROP_RETURN_IF_ERROR(decode_pattern(indptr, indices, ys.dims[1], n_in, total, op,
                                            "pattern", &pat, /*indices_checked_by_tasks=*/true));
  SPARSEPROP_RETURN_IF_ERROR(check_size(vs.dims[0], pat.nnz, op, "values length"));

  const KernelTable& k = active_kernels();
  const int parts =
      parallel_parts(pool, total * batch * (pat.nnz + kFlopsPerMovedFloat * (n_in + pat.rows)));
  std::shared_ptr<float[]> xt_scratch;
  if (xt_out == nullptr) {
    xt_scratch = scratch<float>(total * n_in * batch);
    xt_out = xt_scratch.get();
  }
  const float* w = values.typed_data();
  const float* xt = xt_out;
  float* out = y->typed_data();

  std::vector<Phase> phases;
  phases.push_back(transpose_phase(k, x.typed_data(), xs, xt_out, total, parts));
  Phase products;
  for (int64_t v = 0; v < total; ++v)
    split_rows(pat.row_ptr(v), pat.rows, v, parts, &products.tasks);
  products.fn = [=, &k](const Task& t) -> ffi::Error {
    int64_t lo, hi;
    ffi::Error error = check_task_indices(pat, t, op, "pattern", &lo, &hi);
    if (error.failure()) return error;
    (void)xt_scratch;  // kept alive until the tasks are done
    spmm_batch_major(k, pat.row_ptr(t.slice), pat.col_idx(t.slice), w + slice_offset(vs, t.slice),
                     nullptr, xt + t.slice * n_in * batch, batch, out + t.slice * ys.slice(),
                     pat.rows, t.begin, t.end);
    return ffi::Error::Success();
  };
  phases.push_back(std::move(products));
  return run_phases(pool, parts, std::move(phases));
}

ffi::Future LinearForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                          ffi::Buffer<ffi::F32> values, ffi::Buffer<ffi::S32> indptr,
                          ffi::Buffer<ffi::S32> indices, ffi::ResultBuffer<ffi::F32> y) {
  return linear_forward(pool, x, values, indptr, indices, y, nullptr, {});
}

ffi::Future LinearForwardResidual(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                  ffi::Buffer<ffi::F32> values, ffi::Buffer<ffi::S32> indptr,
                                  ffi::Buffer<ffi::S32> indices, ffi::ResultBuffer<ffi::F32> y,
                                  ffi::ResultBuffer<ffi::F32> xt) {
  return linear_forward(pool, x, values, indptr, indices, y, xt->typed_data(),
                        xt->dimensions());
}

// What one backward call computes; the handlers below fill the parts they
// have. The input gradient needs the values and the transposed pattern, the
// weight gradient x^T and the pattern.
struct Backward {
  ffi::Buffer<ffi::F32>* xt = nullptr;
  ffi::Buffer<ffi::F32>* values = nullptr;
  ffi::Buffer<ffi::S32>* indptr = nullptr;
  ffi::Buffer<ffi::S32>* indices = nullptr;
  ffi::Buffer<ffi::S32>* t_indptr = nullptr;
  ffi::Buffer<ffi::S32>* t_indices = nullptr;
  ffi::Buffer<ffi::S32>* t_perm = nullptr;
  ffi::Result<ffi::Buffer<ffi::F32>>* dx = nullptr;
  ffi::Result<ffi::Buffer<ffi::F32>>* dvalues = nullptr;
};

// dx = dy W (iterating W by columns, the transposed pattern, so each row of
// dx^T accumulates in registers; the values are gathered into that order) and
// dvalues[p] = <dy^T[n, :], x^T[m, :]> for every nonzero (n, m) of W. Both
// read dy^T, transposed once in a first phase.
ffi::Future linear_backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dy, const Backward& b,
                            const char* op) {
  Stack dys;
  SPARSEPROP_RETURN_IF_ERROR(decode_stack(dy.dimensions(), 2, op, "dy", &dys));
  const int64_t batch = dys.dims[0], n_out = dys.dims[1];
  Stack dxs, ds, xts, vs, ps;
  int64_t total = 0, n_in = 0;
  if (b.dx != nullptr) {
    SPARSEPROP_RETURN_IF_ERROR(decode_stack((*b.dx)->dimensions(), 2, op, "dx output", &dxs));
    total = dxs.count;
    n_in = dxs.dims[1];
    SPARSEPROP_RETURN_IF_ERROR(check_size(dxs.dims[0], batch, op, "dx batch size"));
  }
  if (b.dvalues != nullptr) {
    SPARSEPROP_RETURN_IF_ERROR(
        decode_stack((*b.dvalues)->dimensions(), 1, op, "dvalues output", &ds));
    if (b.dx != nullptr)
      SPARSEPROP_RETURN_IF_ERROR(check_size(ds.count, total, op, "dvalues output stack"));
    total = ds.count;
    SPARSEPROP_RETURN_IF_ERROR(decode_operand(b.xt->dimensions(), 2, total, op, "x^T", &xts));
    SPARSEPROP_RETURN_IF_ERROR(check_size(xts.dims[1], batch, op, "x^T batch size"));
    if (b.dx != nullptr)
      SPARSEPROP_RETURN_IF_ERROR(check_size(xts.dims[0], n_in, op, "x^T rows"));
    n_in = xts.dims[0];
  }
  SPARSEPROP_RETURN_IF_ERROR(check_stack_count(dys, total, op, "dy"));
  Pattern pat, tpat;
  if (b.dvalues != nullptr) {
    SPARSEPROP_RETURN_IF_ERROR(decode_pattern(*b.indptr, *b.indices, n_out, n_in, total, op,
                                              "pattern", &pat, /*indices_checked_by_tasks=*/true));
    SPARSEPROP_RETURN_IF_ERROR(check_size(ds.dims[0], pat.nnz, op, "dvalues output length"));
  }
  if (b.dx != nullptr) {
    SPARSEPROP_RETURN_IF_ERROR(decode_operand(b.values->dimensions(), 1, total, op, "values", &vs));
    SPARSEPROP_RETURN_IF_ERROR(
        decode_operand(b.t_perm->dimensions(), 1, total, op, "transposed permutation", &ps));
    SPARSEPROP_RETURN_IF_ERROR(decode_pattern(*b.t_indptr, *b.t_indices, n_in, n_out, total, op,
                                              "transposed pattern", &tpat,
                                              /*indices_checked_by_tasks=*/true));
    SPARSEPROP_RETURN_IF_ERROR(check_size(vs.dims[0], tpat.nnz, op, "values length"));
    SPARSEPROP_RETURN_IF_ERROR(
        check_size(ps.dims[0], tpat.nnz, op, "transposed permutation length"));
    if (b.dvalues != nullptr)
      SPARSEPROP_RETURN_IF_ERROR(check_size(tpat.nnz, pat.nnz, op, "transposed pattern nnz"));
  }

  const KernelTable& k = active_kernels();
  const int64_t nnz = b.dx != nullptr ? tpat.nnz : pat.nnz;
  const int passes = (b.dx != nullptr) + (b.dvalues != nullptr);
  const int64_t moved = n_out + (b.dx != nullptr ? n_in : 0);  // dy^T in, dx out
  const int parts =
      parallel_parts(pool, total * batch * (passes * nnz + kFlopsPerMovedFloat * moved));
  const int64_t dy_slices = dys.count;
  auto dyt = scratch<float>(dy_slices * n_out * batch);
  Stack dyts = dys;  // dy^T: same stacking, [n_out, batch] per slice
  std::vector<Phase> phases;
  phases.push_back(transpose_phase(k, dy.typed_data(), dys, dyt.get(), dy_slices, parts));

  // Group 0: input-gradient tasks over the rows of the transposed pattern;
  // group 1: weight-gradient tasks over the rows of the pattern.
  Phase products;
  std::vector<Task> group;
  for (int64_t v = 0; v < total; ++v) {
    if (b.dx != nullptr) split_rows(tpat.row_ptr(v), n_in, v, parts, &products.tasks);
    if (b.dvalues != nullptr) {
      group.clear();
      split_rows(pat.row_ptr(v), n_out, v, parts, &group);
      for (Task& t : group) t.group = 1;
      products.tasks.insert(products.tasks.end(), group.begin(), group.end());
    }
  }
  const float* w = b.dx != nullptr ? b.values->typed_data() : nullptr;
  const int32_t* perm = b.dx != nullptr ? b.t_perm->typed_data() : nullptr;
  const float* xt = b.dvalues != nullptr ? b.xt->typed_data() : nullptr;
  float* dx = b.dx != nullptr ? (*b.dx)->typed_data() : nullptr;
  float* dw = b.dvalues != nullptr ? (*b.dvalues)->typed_data() : nullptr;
  const int64_t dx_slice = dxs.slice(), dw_slice = ds.slice();
  products.fn = [=, &k](const Task& t) -> ffi::Error {
    const float* dyt_v = dyt.get() + slice_offset(dyts, t.slice);
    int64_t lo, hi;
    if (t.group == 0) {
      const int32_t* perm_v = perm + slice_offset(ps, t.slice);
      ffi::Error error = check_task_indices(tpat, t, op, "transposed pattern", &lo, &hi);
      if (error.success())
        error = check_permutation(perm_v, lo, hi, nnz, op, "transposed permutation");
      if (error.failure()) return error;
      spmm_batch_major(k, tpat.row_ptr(t.slice), tpat.col_idx(t.slice),
                       w + slice_offset(vs, t.slice), perm_v, dyt_v, batch,
                       dx + t.slice * dx_slice, n_in, t.begin, t.end);
      return ffi::Error::Success();
    }
    ffi::Error error = check_task_indices(pat, t, op, "pattern", &lo, &hi);
    if (error.failure()) return error;
    k.sddmm_indexed(pat.row_ptr(t.slice), pat.col_idx(t.slice), dyt_v,
                    xt + slice_offset(xts, t.slice), dw + t.slice * dw_slice, batch, t.begin,
                    t.end);
    return ffi::Error::Success();
  };
  phases.push_back(std::move(products));
  return run_phases(pool, parts, std::move(phases));
}

ffi::Future LinearInputGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dy,
                            ffi::Buffer<ffi::F32> values, ffi::Buffer<ffi::S32> t_indptr,
                            ffi::Buffer<ffi::S32> t_indices, ffi::Buffer<ffi::S32> t_perm,
                            ffi::ResultBuffer<ffi::F32> dx) {
  Backward b;
  b.values = &values;
  b.t_indptr = &t_indptr;
  b.t_indices = &t_indices;
  b.t_perm = &t_perm;
  b.dx = &dx;
  return linear_backward(pool, dy, b, "sparse_linear input gradient");
}

ffi::Future LinearWeightGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dy,
                             ffi::Buffer<ffi::F32> xt, ffi::Buffer<ffi::S32> indptr,
                             ffi::Buffer<ffi::S32> indices, ffi::ResultBuffer<ffi::F32> dvalues) {
  Backward b;
  b.xt = &xt;
  b.indptr = &indptr;
  b.indices = &indices;
  b.dvalues = &dvalues;
  return linear_backward(pool, dy, b, "sparse_linear weight gradient");
}

ffi::Future LinearBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dy,
                           ffi::Buffer<ffi::F32> xt, ffi::Buffer<ffi::F32> values,
                           ffi::Buffer<ffi::S32> indptr, ffi::Buffer<ffi::S32> indices,
                           ffi::Buffer<ffi::S32> t_indptr, ffi::Buffer<ffi::S32> t_indices,
                           ffi::Buffer<ffi::S32> t_perm, ffi::ResultBuffer<ffi::F32> dx,
                           ffi::ResultBuffer<ffi::F32> dvalues) {
  Backward b{&xt, &values, &indptr, &indices, &t_indptr, &t_indices, &t_perm, &dx, &dvalues};
  return linear_backward(pool, dy, b, "sparse_linear backward");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(kLinearForward, LinearForward,
                              (bind_operands<2, 2>())
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(kLinearForwardResidual, LinearForwardResidual,
                              (bind_operands<2, 2>())
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(kLinearInputGrad, LinearInputGrad,
                              (bind_operands<2, 3>())
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(kLinearWeightGrad, LinearWeightGrad,
                              (bind_operands<2, 2>())
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(kLinearBackward, LinearBackward,
                              (bind_operands<3, 5>())
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

}  // namespace sparseprop
