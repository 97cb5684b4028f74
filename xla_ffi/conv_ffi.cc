// XLA FFI handlers of the sparse 2-D convolution: direct convolution over the
// nonzeros (no im2col), on the generic kernels of sparse_kernels.h.
//
// The pattern is that of the HWIO kernel flattened to (kh * kw * cin, cout):
// one compressed row per output channel, entry index (ky * kw + kx) * cin + ci.
// Python pads the input and lays it out for one of two variants:
//   batch-minor (vectorised over the batch, for small images):
//     x (Hp, Wp, Cin, N)         y (Ho, Wo, Cout, N)
//   width-minor (vectorised over the output width, for large images): the
//   padded width is split into `stride` phases, so strided windows are runs:
//     x (N, Cin, Hp, s, Wq)      y (N, Cout, Ho, Wo)
// where x[.., s_phase, q] is padded column q * s + s_phase. Each nonzero then
// reads one contiguous run per output position: the kernels' entry offsets.
//
// The input gradient is split into s x s stride phases: the input positions
// (j * s + a, i * s + b) receive only taps ky = a (mod s), kx = b (mod s), so
// each phase is a stride-1 sparse correlation of the padded output gradient
// with a sub-kernel, and no work is spent on zeros.
#include <algorithm>
#include <memory>
#include <vector>

#include "conv_ffi.h"
#include "ffi_common.h"
#include "simd_dispatch.h"

namespace sparseprop {
namespace {

enum Variant : int64_t { kBatchMinor = 0, kWidthMinor = 1 };

struct Geometry {
  int64_t variant, stride, kh, kw;
};

// Sizes of the padded input x and output y in either layout; `wx` is Wp
// (batch-minor) or Wq (width-minor).
struct Shapes {
  int64_t n, cin, hp, wx, cout, ho, wo;
};

int64_t ceil_div(int64_t a, int64_t b) { return a <= 0 ? 0 : (a + b - 1) / b; }

ffi::Error check_geometry(const Geometry& g, const char* op) {
  if ((g.variant != kBatchMinor && g.variant != kWidthMinor) || g.stride < 1 || g.kh < 1 ||
      g.kw < 1)
    return ffi::Error::InvalidArgument(std::string("sparseprop_jax ") + op +
                                       ": bad attributes (variant 0 or 1, stride, kh, kw >= 1)");
  return ffi::Error::Success();
}

// Reads the input-side (x or dx) and output-side (y or dy) shapes.
ffi::Error decode_shapes(const Geometry& g, ffi::Span<const int64_t> x_dims,
                         ffi::Span<const int64_t> y_dims, int64_t total, const char* op,
                         const char* x_name, const char* y_name, bool y_is_result, Stack* xs,
                         Stack* ys, Shapes* sh) {
  const bool bm = g.variant == kBatchMinor;
  ffi::Error e = y_is_result ? decode_stack(y_dims, 4, op, y_name, ys)
                             : decode_operand(y_dims, 4, total, op, y_name, ys);
  if (e.failure()) return e;
  e = decode_operand(x_dims, bm ? 4 : 5, y_is_result ? ys->count : total, op, x_name, xs);
  if (e.failure()) return e;
  const int64_t* x = xs->dims;
  const int64_t* y = ys->dims;
  if (bm) {
    *sh = {x[3], x[2], x[0], x[1], y[2], y[0], y[1]};
    e = check_size(y[3], sh->n, op, "output batch size");
  } else {
    *sh = {x[0], x[1], x[2], x[4], y[1], y[2], y[3]};
    e = check_size(y[0], sh->n, op, "output batch size");
    if (e.success()) e = check_size(x[3], g.stride, op, "input stride phases");
  }
  return e;
}

// Every window of the forward pass lies inside the padded input.
ffi::Error check_windows(const Geometry& g, const Shapes& sh, const char* op) {
  const bool rows_ok = sh.ho == 0 || (sh.ho - 1) * g.stride + g.kh <= sh.hp;
  const bool cols_ok = sh.wo == 0 || (g.variant == kBatchMinor
                                          ? (sh.wo - 1) * g.stride + g.kw <= sh.wx
                                          : sh.wo - 1 + (g.kw - 1) / g.stride < sh.wx);
  if (rows_ok && cols_ok) return ffi::Error::Success();
  return ffi::Error::InvalidArgument(std::string("sparseprop_jax ") + op +
                                     ": the output's windows do not fit in the padded input");
}

// Grid, run length and entry offsets of the forward pass and the weight
// gradient: output position q reads the window at its strided origin.
struct WindowPlan {
  Grid grid;
  int64_t ld_row, length;
  std::function<int64_t(int32_t)> offset;
};

WindowPlan window_plan(const Geometry& g, const Shapes& sh) {
  const int64_t s = g.stride, kw = g.kw, cin = sh.cin;
  WindowPlan plan;
  if (g.variant == kBatchMinor) {
    const int64_t pixel = cin * sh.n, wp = sh.wx, n = sh.n;
    plan.grid = {sh.ho, sh.wo, s * wp * pixel, s * pixel, sh.wo * sh.cout * n, sh.cout * n};
    plan.ld_row = n;
    plan.length = n;
    plan.offset = [=](int32_t r) -> int64_t {
      const int64_t ci = r % cin, k = r / cin, ky = k / kw, kx = k % kw;
      return (ky * wp + kx) * pixel + ci * n;
    };
  } else {
    const int64_t wq = sh.wx, row = s * wq, plane = sh.hp * row;
    plan.grid = {sh.n, sh.ho, cin * plane, s * row, sh.cout * sh.ho * sh.wo, sh.wo};
    plan.ld_row = sh.ho * sh.wo;
    plan.length = sh.wo;
    plan.offset = [=](int32_t r) -> int64_t {
      const int64_t ci = r % cin, k = r / cin, ky = k / kw, kx = k % kw;
      return ci * plane + ky * row + (kx % s) * wq + kx / s;
    };
  }
  return plan;
}

ffi::Future ConvForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                        ffi::Buffer<ffi::F32> values, ffi::Buffer<ffi::S32> indptr,
                        ffi::Buffer<ffi::S32> indices, ffi::ResultBuffer<ffi::F32> y,
                        int64_t variant, int64_t stride, int64_t kh, int64_t kw) {
  constexpr const char* op = "sparse_conv2d forward";
  const Geometry g{variant, stride, kh, kw};
  SPARSEPROP_RETURN_IF_ERROR(check_geometry(g, op));
  Stack xs, ys, vs;
  Shapes sh;
  SPARSEPROP_RETURN_IF_ERROR(decode_shapes(g, x.dimensions(), y->dimensions(), 0, op, "x",
                                           "output", true, &xs, &ys, &sh));
  const int64_t total = ys.count;
  SPARSEPROP_RETURN_IF_ERROR(check_windows(g, sh, op));
  SPARSEPROP_RETURN_IF_ERROR(decode_operand(values.dimensions(), 1, total, op, "values", &vs));
  Pattern pat;
  SPARSEPROP_RETURN_IF_ERROR(decode_pattern(indptr, indices, sh.cout, kh * kw * sh.cin, total,
                                            op, "pattern", &pat));
  SPARSEPROP_RETURN_IF_ERROR(check_size(vs.dims[0], pat.nnz, op, "values length"));

  const WindowPlan plan = window_plan(g, sh);
  const EntryOffsets offsets = entry_offsets(pat, plan.offset);
  std::vector<Task> tasks;
  const int parts = parallel_parts(pool, total * plan.grid.size() * plan.length * pat.nnz);
  for (int64_t v = 0; v < total; ++v) split_even(plan.grid.size(), v, 0, parts, &tasks);
  const KernelTable& k = active_kernels();
  const float* xd = x.typed_data();
  const float* w = values.typed_data();
  float* yd = y->typed_data();
  return run_tasks(pool, std::move(tasks), [=, &k](const Task& t) {
    k.spmm(pat.row_ptr(t.slice), offsets.of(t.slice), w + slice_offset(vs, t.slice),
           xd + slice_offset(xs, t.slice), yd + t.slice * ys.slice(), plan.ld_row, plan.length,
           plan.grid, t.begin, t.end, 0, pat.rows);
    return ffi::Error::Success();
  });
}

ffi::Future ConvWeightGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dy,
                           ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> indptr,
                           ffi::Buffer<ffi::S32> indices, ffi::ResultBuffer<ffi::F32> dvalues,
                           int64_t variant, int64_t stride, int64_t kh, int64_t kw) {
  constexpr const char* op = "sparse_conv2d weight gradient";
  const Geometry g{variant, stride, kh, kw};
  SPARSEPROP_RETURN_IF_ERROR(check_geometry(g, op));
  Stack ds, xs, ys;
  SPARSEPROP_RETURN_IF_ERROR(decode_stack(dvalues->dimensions(), 1, op, "output", &ds));
  const int64_t total = ds.count;
  Shapes sh;
  SPARSEPROP_RETURN_IF_ERROR(decode_shapes(g, x.dimensions(), dy.dimensions(), total, op, "x",
                                           "dy", false, &xs, &ys, &sh));
  SPARSEPROP_RETURN_IF_ERROR(check_windows(g, sh, op));
  Pattern pat;
  SPARSEPROP_RETURN_IF_ERROR(decode_pattern(indptr, indices, sh.cout, kh * kw * sh.cin, total,
                                            op, "pattern", &pat));
  SPARSEPROP_RETURN_IF_ERROR(check_size(ds.dims[0], pat.nnz, op, "output length"));

  const WindowPlan plan = window_plan(g, sh);
  const EntryOffsets offsets = entry_offsets(pat, plan.offset);
  std::vector<Task> tasks;
  const int parts = parallel_parts(pool, total * plan.grid.size() * plan.length * pat.nnz);
  for (int64_t v = 0; v < total; ++v) split_rows(pat.row_ptr(v), pat.rows, v, parts, &tasks);
  const KernelTable& k = active_kernels();
  const float* dyd = dy.typed_data();
  const float* xd = x.typed_data();
  float* dw = dvalues->typed_data();
  return run_tasks(pool, std::move(tasks), [=, &k](const Task& t) {
    k.sddmm(pat.row_ptr(t.slice), offsets.of(t.slice), dyd + slice_offset(ys, t.slice),
            plan.ld_row, xd + slice_offset(xs, t.slice), dw + t.slice * ds.slice(), plan.length,
            plan.grid, t.begin, t.end);
    return ffi::Error::Success();
  });
}

// The s x s phase sub-kernels of the input gradient, as one compressed-rows
// matrix: rows (phase, ci), phase = a * s + b; entries carry their offset into
// the padded output gradient and their value.
struct PhaseMatrix {
  std::vector<int32_t> indptr;
  std::vector<int64_t> offsets;
  std::vector<float> values;
};

ffi::Future ConvInputGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dyp,
                          ffi::Buffer<ffi::F32> values, ffi::Buffer<ffi::S32> t_indptr,
                          ffi::Buffer<ffi::S32> t_indices, ffi::Buffer<ffi::S32> t_perm,
                          ffi::ResultBuffer<ffi::F32> dx, int64_t variant, int64_t stride,
                          int64_t kh, int64_t kw) {
  constexpr const char* op = "sparse_conv2d input gradient";
  const Geometry g{variant, stride, kh, kw};
  SPARSEPROP_RETURN_IF_ERROR(check_geometry(g, op));
  const bool bm = variant == kBatchMinor;
  Stack dxs, dys, vs, ps;
  // dx has the padded input's layout; dyp is the output gradient padded by
  // (P, Q) = (ceil(kh / s) - 1, ceil(kw / s) - 1) on top and left and with
  // zeros below and right, in the output's layout.
  SPARSEPROP_RETURN_IF_ERROR(decode_stack(dx->dimensions(), bm ? 4 : 5, op, "output", &dxs));
  const int64_t total = dxs.count;
  SPARSEPROP_RETURN_IF_ERROR(decode_operand(dyp.dimensions(), 4, total, op, "padded dy", &dys));
  const int64_t* xd = dxs.dims;
  const int64_t* yd = dys.dims;
  const int64_t s = stride;
  const int64_t n = bm ? xd[3] : xd[0], cin = bm ? xd[2] : xd[1], hp = bm ? xd[0] : xd[2];
  const int64_t wx = bm ? xd[1] : xd[4];
  const int64_t cout = bm ? yd[2] : yd[1], hd = bm ? yd[0] : yd[2], wd = bm ? yd[1] : yd[3];
  const int64_t P = ceil_div(kh, s) - 1, Q = ceil_div(kw, s) - 1;
  SPARSEPROP_RETURN_IF_ERROR(check_size(bm ? yd[3] : yd[0], n, op, "padded dy batch size"));
  if (!bm) SPARSEPROP_RETURN_IF_ERROR(check_size(xd[3], s, op, "output stride phases"));
  if (hd < ceil_div(hp, s) + P || wd < (bm ? ceil_div(wx, s) : wx) + Q)
    return failed(ffi::Error::InvalidArgument(std::string("sparseprop_jax ") + op +
                                              ": padded dy is too small for the input size"));
  SPARSEPROP_RETURN_IF_ERROR(decode_operand(values.dimensions(), 1, total, op, "values", &vs));
  SPARSEPROP_RETURN_IF_ERROR(
      decode_operand(t_perm.dimensions(), 1, total, op, "transposed permutation", &ps));
  Pattern pat;
  SPARSEPROP_RETURN_IF_ERROR(decode_pattern(t_indptr, t_indices, kh * kw * cin, cout, total, op,
                                            "transposed pattern", &pat));
  const int64_t nnz = pat.nnz;
  SPARSEPROP_RETURN_IF_ERROR(check_size(vs.dims[0], nnz, op, "values length"));
  SPARSEPROP_RETURN_IF_ERROR(check_size(ps.dims[0], nnz, op, "transposed permutation length"));

  // Offset of output-gradient channel co at tap (t, u) of a phase.
  auto dy_offset = [=](int64_t t, int64_t u, int64_t co) -> int64_t {
    return bm ? ((P - t) * wd + (Q - u)) * cout * n + co * n
              : co * hd * wd + (P - t) * wd + (Q - u);
  };
  const int64_t distinct = std::max({vs.count, ps.count, pat.indptr_stack.count,
                                     pat.indices_stack.count});
  auto phases = std::make_shared<std::vector<PhaseMatrix>>(distinct);
  for (int64_t d = 0; d < distinct; ++d) {
    const int32_t* perm = t_perm.typed_data() + slice_offset(ps, d);
    SPARSEPROP_RETURN_IF_ERROR(check_permutation(perm, 0, nnz, nnz, op, "transposed permutation"));
    const float* w = values.typed_data() + slice_offset(vs, d);
    const int32_t* rp = pat.row_ptr(d);
    const int32_t* co = pat.col_idx(d);
    PhaseMatrix& m = (*phases)[d];
    m.indptr.assign(1, 0);
    m.offsets.reserve(nnz);
    m.values.reserve(nnz);
    for (int64_t a = 0; a < s; ++a)
      for (int64_t b = 0; b < s; ++b)
        for (int64_t ci = 0; ci < cin; ++ci) {
          for (int64_t t = 0, ky = a; ky < kh; ++t, ky += s)
            for (int64_t u = 0, kx = b; kx < kw; ++u, kx += s) {
              const int64_t r = (ky * kw + kx) * cin + ci;
              for (int64_t p = rp[r]; p < rp[r + 1]; ++p) {
                m.offsets.push_back(dy_offset(t, u, co[p]));
                m.values.push_back(w[perm[p]]);
              }
            }
          m.indptr.push_back(static_cast<int32_t>(m.offsets.size()));
        }
  }

  // Phase (a, b) writes input positions (j * s + a, i * s + b).
  std::vector<Grid> grids(s * s);
  std::vector<int64_t> origins(s * s);
  int64_t positions = 0;
  for (int64_t a = 0; a < s; ++a)
    for (int64_t b = 0; b < s; ++b) {
      const int64_t ph = a * s + b;
      if (bm) {
        grids[ph] = {ceil_div(hp - a, s), ceil_div(wx - b, s), wd * cout * n, cout * n,
                     s * wx * cin * n, s * cin * n};
        origins[ph] = (a * wx + b) * cin * n;
      } else {
        grids[ph] = {n, ceil_div(hp - a, s), cout * hd * wd, wd, cin * hp * s * wx, s * s * wx};
        origins[ph] = (a * s + b) * wx;
      }
      positions += grids[ph].size();
    }
  const int64_t ld_row = bm ? n : hp * s * wx, length = bm ? n : wx;
  const int parts = parallel_parts(pool, total * positions * length * nnz / (s * s));
  std::vector<Task> tasks;
  for (int64_t v = 0; v < total; ++v)
    for (int64_t ph = 0; ph < s * s; ++ph) split_even(grids[ph].size(), v, ph, parts, &tasks);
  const KernelTable& k = active_kernels();
  const float* dyd = dyp.typed_data();
  float* dxd = dx->typed_data();
  return run_tasks(pool, std::move(tasks), [=, &k](const Task& t) {
    const PhaseMatrix& m = (*phases)[distinct == 1 ? 0 : t.slice];
    k.spmm(m.indptr.data() + t.group * cin, m.offsets.data(), m.values.data(),
           dyd + slice_offset(dys, t.slice), dxd + t.slice * dxs.slice() + origins[t.group],
           ld_row, length, grids[t.group], t.begin, t.end, 0, cin);
    return ffi::Error::Success();
  });
}

}  // namespace

#define SPARSEPROP_CONV_ATTRS            \
  .Attr<int64_t>("variant")              \
      .Attr<int64_t>("stride")           \
      .Attr<int64_t>("kh")               \
      .Attr<int64_t>("kw")

XLA_FFI_DEFINE_HANDLER_SYMBOL(kConvForward, ConvForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() SPARSEPROP_CONV_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(kConvWeightGrad, ConvWeightGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() SPARSEPROP_CONV_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(kConvInputGrad, ConvInputGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() SPARSEPROP_CONV_ATTRS);

}  // namespace sparseprop
