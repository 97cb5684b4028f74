// XLA FFI handlers of the sparse linear layer. They decode and validate the
// buffers, then schedule the kernels of sparse_kernels.h over XLA's pool.
//
// Activations travel feature-major with the batch minor ("transposed"):
// x^T is [in, batch], y^T is [out, batch]. The weight W (out x in, i.e. the
// transpose of Flax's (in, out) kernel) is stored in compressed rows, one row
// per output feature; the input gradient uses the same nonzeros in compressed
// columns plus a permutation into the values.
#include <memory>
#include <vector>

#include "ffi_common.h"
#include "linear_ffi.h"
#include "simd_dispatch.h"

namespace sparseprop {
namespace {

// The per-entry work of a task's rows that is O(nnz) per call (checking the
// indices, turning them into kernel offsets, gathering permuted values) runs
// inside the task, in parallel and just before the kernel reads the same
// entries, instead of serially in the handler.

// Checks the indices of the entries of task `t`'s rows and writes their kernel
// offsets (index * batch) into `off`; returns the entries' range in `lo`, `hi`.
ffi::Error task_offsets(const Pattern& pat, const Task& t, int64_t batch, int64_t* off,
                        const char* op, const char* name, int64_t* lo, int64_t* hi) {
  const int32_t* ptr = pat.row_ptr(t.slice);
  const int32_t* idx = pat.col_idx(t.slice);
  *lo = ptr[t.begin];
  *hi = ptr[t.end];
  ffi::Error error = check_indices(idx, *lo, *hi, pat.cols, op, name);
  if (error.failure()) return error;
  for (int64_t p = *lo; p < *hi; ++p) off[p] = idx[p] * batch;
  return ffi::Error::Success();
}

// y^T = W x^T.
ffi::Future LinearForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> xt,
                          ffi::Buffer<ffi::F32> values, ffi::Buffer<ffi::S32> indptr,
                          ffi::Buffer<ffi::S32> indices, ffi::ResultBuffer<ffi::F32> yt) {
  constexpr const char* op = "sparse_linear forward";
  Stack ys, xs, vs;
  SPARSEPROP_RETURN_IF_ERROR(decode_stack(yt->dimensions(), 2, op, "output", &ys));
  const int64_t total = ys.count, batch = ys.dims[1];
  SPARSEPROP_RETURN_IF_ERROR(decode_operand(xt.dimensions(), 2, total, op, "x^T", &xs));
  SPARSEPROP_RETURN_IF_ERROR(check_size(xs.dims[1], batch, op, "x^T batch size"));
  SPARSEPROP_RETURN_IF_ERROR(decode_operand(values.dimensions(), 1, total, op, "values", &vs));
  Pattern pat;
  SPARSEPROP_RETURN_IF_ERROR(decode_pattern(indptr, indices, ys.dims[0], xs.dims[0], total, op,
                                            "pattern", &pat, /*indices_checked_by_tasks=*/true));
  SPARSEPROP_RETURN_IF_ERROR(check_size(vs.dims[0], pat.nnz, op, "values length"));

  std::vector<Task> tasks;
  const int parts = parallel_parts(pool, total * batch * pat.nnz);
  for (int64_t v = 0; v < total; ++v) split_rows(pat.row_ptr(v), pat.rows, v, parts, &tasks);
  const KernelTable& k = active_kernels();
  const int64_t nnz = pat.nnz;
  auto offsets = scratch<int64_t>(total * nnz);
  const float* x = xt.typed_data();
  const float* w = values.typed_data();
  float* y = yt->typed_data();
  return run_tasks(pool, std::move(tasks), [=, &k](const Task& t) -> ffi::Error {
    int64_t* off = offsets.get() + t.slice * nnz;
    int64_t lo, hi;
    ffi::Error error = task_offsets(pat, t, batch, off, op, "pattern", &lo, &hi);
    if (error.failure()) return error;
    k.spmm(pat.row_ptr(t.slice), off, w + slice_offset(vs, t.slice),
           x + slice_offset(xs, t.slice), y + t.slice * ys.slice(), batch, batch, Grid{}, 0, 1,
           t.begin, t.end);
    return ffi::Error::Success();
  });
}

// dx^T = W^T dy^T, iterating W by columns (the transposed pattern) so each row
// of dx^T accumulates in registers; the values are gathered into that order.
ffi::Future LinearInputGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dyt,
                            ffi::Buffer<ffi::F32> values, ffi::Buffer<ffi::S32> t_indptr,
                            ffi::Buffer<ffi::S32> t_indices, ffi::Buffer<ffi::S32> t_perm,
                            ffi::ResultBuffer<ffi::F32> dxt) {
  constexpr const char* op = "sparse_linear input gradient";
  Stack dxs, dys, vs, ps;
  SPARSEPROP_RETURN_IF_ERROR(decode_stack(dxt->dimensions(), 2, op, "output", &dxs));
  const int64_t total = dxs.count, batch = dxs.dims[1];
  SPARSEPROP_RETURN_IF_ERROR(decode_operand(dyt.dimensions(), 2, total, op, "dy^T", &dys));
  SPARSEPROP_RETURN_IF_ERROR(check_size(dys.dims[1], batch, op, "dy^T batch size"));
  SPARSEPROP_RETURN_IF_ERROR(decode_operand(values.dimensions(), 1, total, op, "values", &vs));
  SPARSEPROP_RETURN_IF_ERROR(
      decode_operand(t_perm.dimensions(), 1, total, op, "transposed permutation", &ps));
  Pattern pat;
  SPARSEPROP_RETURN_IF_ERROR(decode_pattern(t_indptr, t_indices, dxs.dims[0], dys.dims[0], total,
                                            op, "transposed pattern", &pat,
                                            /*indices_checked_by_tasks=*/true));
  SPARSEPROP_RETURN_IF_ERROR(check_size(vs.dims[0], pat.nnz, op, "values length"));
  SPARSEPROP_RETURN_IF_ERROR(check_size(ps.dims[0], pat.nnz, op, "transposed permutation length"));

  std::vector<Task> tasks;
  const int64_t nnz = pat.nnz;
  const int parts = parallel_parts(pool, total * batch * nnz);
  for (int64_t v = 0; v < total; ++v) split_rows(pat.row_ptr(v), pat.rows, v, parts, &tasks);
  const KernelTable& k = active_kernels();
  auto offsets = scratch<int64_t>(total * nnz);
  auto gathered = scratch<float>(total * nnz);
  const float* dy = dyt.typed_data();
  const float* w = values.typed_data();
  const int32_t* perm = t_perm.typed_data();
  float* dx = dxt->typed_data();
  return run_tasks(pool, std::move(tasks), [=, &k](const Task& t) -> ffi::Error {
    const int32_t* perm_v = perm + slice_offset(ps, t.slice);
    const float* w_v = w + slice_offset(vs, t.slice);
    int64_t* off = offsets.get() + t.slice * nnz;
    float* g = gathered.get() + t.slice * nnz;
    int64_t lo, hi;
    ffi::Error error = task_offsets(pat, t, batch, off, op, "transposed pattern", &lo, &hi);
    if (error.success())
      error = check_permutation(perm_v, lo, hi, nnz, op, "transposed permutation");
    if (error.failure()) return error;
    for (int64_t p = lo; p < hi; ++p) g[p] = w_v[perm_v[p]];
    k.spmm(pat.row_ptr(t.slice), off, g, dy + slice_offset(dys, t.slice), dx + t.slice * dxs.slice(), batch,
           batch, Grid{}, 0, 1, t.begin, t.end);
    return ffi::Error::Success();
  });
}

// dvalues[p] = <dy^T[n, :], x^T[m, :]> for every nonzero (n, m) of W.
ffi::Future LinearWeightGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dyt,
                             ffi::Buffer<ffi::F32> xt, ffi::Buffer<ffi::S32> indptr,
                             ffi::Buffer<ffi::S32> indices, ffi::ResultBuffer<ffi::F32> dvalues) {
  constexpr const char* op = "sparse_linear weight gradient";
  Stack ds, dys, xs;
  SPARSEPROP_RETURN_IF_ERROR(decode_stack(dvalues->dimensions(), 1, op, "output", &ds));
  const int64_t total = ds.count;
  SPARSEPROP_RETURN_IF_ERROR(decode_operand(dyt.dimensions(), 2, total, op, "dy^T", &dys));
  SPARSEPROP_RETURN_IF_ERROR(decode_operand(xt.dimensions(), 2, total, op, "x^T", &xs));
  const int64_t batch = dys.dims[1];
  SPARSEPROP_RETURN_IF_ERROR(check_size(xs.dims[1], batch, op, "x^T batch size"));
  Pattern pat;
  SPARSEPROP_RETURN_IF_ERROR(decode_pattern(indptr, indices, dys.dims[0], xs.dims[0], total, op,
                                            "pattern", &pat, /*indices_checked_by_tasks=*/true));
  SPARSEPROP_RETURN_IF_ERROR(check_size(ds.dims[0], pat.nnz, op, "output length"));

  std::vector<Task> tasks;
  const int64_t nnz = pat.nnz;
  const int parts = parallel_parts(pool, total * batch * nnz);
  for (int64_t v = 0; v < total; ++v) split_rows(pat.row_ptr(v), pat.rows, v, parts, &tasks);
  const KernelTable& k = active_kernels();
  auto offsets = scratch<int64_t>(total * nnz);
  const float* dy = dyt.typed_data();
  const float* x = xt.typed_data();
  float* dw = dvalues->typed_data();
  return run_tasks(pool, std::move(tasks), [=, &k](const Task& t) -> ffi::Error {
    int64_t* off = offsets.get() + t.slice * nnz;
    int64_t lo, hi;
    ffi::Error error = task_offsets(pat, t, batch, off, op, "pattern", &lo, &hi);
    if (error.failure()) return error;
    k.sddmm(pat.row_ptr(t.slice), off, dy + slice_offset(dys, t.slice), batch, x + slice_offset(xs, t.slice),
            dw + t.slice * ds.slice(), batch, Grid{}, t.begin, t.end);
    return ffi::Error::Success();
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(kLinearForward, LinearForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(kLinearInputGrad, LinearInputGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(kLinearWeightGrad, LinearWeightGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

}  // namespace sparseprop
