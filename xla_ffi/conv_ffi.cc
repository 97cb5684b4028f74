// XLA FFI handlers of the sparse 2-D convolution: direct convolution over the
// nonzeros (no im2col), on the generic routines of routines.h.
//
// The pattern is that of the HWIO kernel flattened to (kh * kw * cin, cout):
// one compressed row per output channel, entry index (ky * kw + kx) * cin + ci.
// sparse_conv2d's two variants run on two sets of handlers:
//   width (vectorised over the output width, for large images):
//   ConvForward, ConvWeightGrad and ConvInputGrad, on operands that Python
//   lays out. The padded width is split into `stride` phases, so strided
//   windows are runs:
//     x (N, Cin, Hp, s, Wq)      y (N, Cout, Ho, Wo)
//   where x[.., s_phase, q] is padded column q * s + s_phase. Each nonzero
//   then reads one contiguous run per output position: the routines' entry
//   offsets.
//   batch (vectorised over the batch): the ConvNhwc* handlers (below), which
//   take the caller's NHWC arrays and lay them out themselves, in rows of
//   (channel, width x batch) runs (RowRuns).
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
#include "pattern.h"
#include "simd_dispatch.h"

namespace sparseprop {
namespace {

struct Geometry {
  int64_t stride, kh, kw;
};

// Sizes of the padded input x and output y in the width variant's layout.
struct Shapes {
  int64_t n, cin, hp, wq, cout, ho, wo;
};

int64_t ceil_div(int64_t a, int64_t b) { return a <= 0 ? 0 : (a + b - 1) / b; }

ffi::Error check_geometry(const Geometry& g, const char* op) {
  if (g.stride < 1 || g.kh < 1 || g.kw < 1)
    return ffi::Error::InvalidArgument(std::string("sparseprop_jax ") + op +
                                       ": bad attributes (stride, kh, kw >= 1)");
  return ffi::Error::Success();
}

// Reads the input-side (x or dx) and output-side (y or dy) shapes; y is the
// call's result where `result` is null, else an operand stacked against it.
ffi::Error decode_shapes(const Geometry& g, ffi::Span<const int64_t> x_dims,
                         ffi::Span<const int64_t> y_dims, const Stack* result, const char* op,
                         const char* x_name, const char* y_name, Stack* xs, Stack* ys,
                         Shapes* sh) {
  ffi::Error e = result == nullptr ? decode_stack(y_dims, 4, op, y_name, ys)
                                   : decode_operand(y_dims, 4, *result, op, y_name, ys);
  if (e.failure()) return e;
  e = decode_operand(x_dims, 5, result == nullptr ? *ys : *result, op, x_name, xs);
  if (e.failure()) return e;
  const int64_t* x = xs->dims;
  const int64_t* y = ys->dims;
  *sh = {x[0], x[1], x[2], x[4], y[1], y[2], y[3]};
  e = check_size(y[0], sh->n, op, "output batch size");
  if (e.success()) e = check_size(x[3], g.stride, op, "input stride phases");
  return e;
}

// Every window of the forward pass lies inside the padded input.
ffi::Error check_windows(const Geometry& g, const Shapes& sh, const char* op) {
  const bool rows_ok = sh.ho == 0 || (sh.ho - 1) * g.stride + g.kh <= sh.hp;
  const bool cols_ok = sh.wo == 0 || sh.wo - 1 + (g.kw - 1) / g.stride < sh.wq;
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
  // Positions the weight gradient sums per block (weight_gradient_blocks).
  int64_t block;
};

// Positions per weight-gradient block: as many as keep the dense operands
// the block reads within a budget, given the first position's input window
// (`window` bytes), `step` more input bytes per further position and `out`
// output-side bytes per position. The budget (4 MiB, the last-level cache's
// share) was measured: 0.5-16 MiB were about equal in the row-run layout,
// and all positions at once was 30% slower on 56 x 56 x 64 (the windows
// then stream from memory once per row of the pattern).
int64_t block_positions(int64_t window, int64_t step, int64_t out) {
  const int64_t budget = int64_t{4} << 20;
  int64_t b = 1;
  while (b < 4096 && window + b * step + (b + 1) * out <= budget) ++b;
  return b;
}

// The tap of entry column index r = (ky * kw + kx) * cin + ci.
struct Tap {
  int64_t ky, kx, ci;
};
Tap tap_of(int32_t r, int64_t cin, int64_t kw) {
  const int64_t k = r / cin;
  return {k / kw, k % kw, r % cin};
}

WindowPlan window_plan(const Geometry& g, const Shapes& sh) {
  const int64_t s = g.stride, kw = g.kw, cin = sh.cin;
  const int64_t wq = sh.wq, row = s * wq, plane = sh.hp * row;
  WindowPlan plan;
  plan.grid = {sh.n, sh.ho, cin * plane, s * row, sh.cout * sh.ho * sh.wo, sh.wo};
  plan.ld_row = sh.ho * sh.wo;
  plan.length = sh.wo;
  plan.offset = [=](int32_t r) -> int64_t {
    const Tap t = tap_of(r, cin, kw);
    return t.ci * plane + t.ky * row + (t.kx % s) * wq + t.kx / s;
  };
  plan.block = block_positions(4 * cin * g.kh * row, 4 * cin * s * row, 4 * sh.cout * sh.wo);
  return plan;
}

// The weight gradient of rows [row_begin, row_end) in blocks of plan.block
// grid positions: every row sums one block before the next block starts, so
// the block's windows stay in cache across rows (walking all positions per
// entry would stream the whole image from memory once per nonzero). The
// blocks depend only on the geometry, so results are deterministic.
void weight_gradient_blocks(const Routines& k, const int32_t* indptr, const int64_t* offsets,
                            const float* rows, const float* in, float* out_values,
                            const WindowPlan& plan, int64_t row_begin, int64_t row_end) {
  const int64_t positions = plan.grid.size();
  int64_t q0 = 0;
  do {  // at least once: with no positions, the sums are written as zeros
    const int64_t q1 = std::min(positions, q0 + plan.block);
    k.sddmm(indptr, offsets, rows, plan.ld_row, in, out_values, plan.length, plan.grid, q0, q1,
            row_begin, row_end, q0 > 0);
    q0 = q1;
  } while (q0 < positions);
}

ffi::Future ConvForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                        ffi::Buffer<ffi::F32> values, ffi::Buffer<ffi::S32> indptr,
                        ffi::Buffer<ffi::S32> indices, ffi::ResultBuffer<ffi::F32> y,
                        int64_t stride, int64_t kh, int64_t kw) {
  constexpr const char* op = "sparse_conv2d forward";
  const Geometry g{stride, kh, kw};
  SPARSEPROP_RETURN_IF_ERROR(check_geometry(g, op));
  Stack xs, ys, vs;
  Shapes sh;
  SPARSEPROP_RETURN_IF_ERROR(decode_shapes(g, x.dimensions(), y->dimensions(), nullptr, op, "x",
                                           "output", &xs, &ys, &sh));
  const int64_t total = ys.count;
  SPARSEPROP_RETURN_IF_ERROR(check_windows(g, sh, op));
  SPARSEPROP_RETURN_IF_ERROR(decode_operand(values.dimensions(), 1, ys, op, "values", &vs));
  Pattern pat;
  SPARSEPROP_RETURN_IF_ERROR(decode_pattern(indptr, indices, sh.cout, kh * kw * sh.cin, ys,
                                            op, "pattern", &pat));
  SPARSEPROP_RETURN_IF_ERROR(check_size(vs.dims[0], pat.nnz, op, "values length"));

  const WindowPlan plan = window_plan(g, sh);
  const EntryOffsets offsets = entry_offsets(pat, plan.offset);
  std::vector<Task> tasks;
  const int parts = parallel_parts(pool, total * plan.grid.size() * plan.length * pat.nnz);
  for (int64_t v = 0; v < total; ++v) split_even(plan.grid.size(), v, 0, parts, &tasks);
  const Routines& k = active_routines();
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
                           int64_t stride, int64_t kh, int64_t kw) {
  constexpr const char* op = "sparse_conv2d weight gradient";
  const Geometry g{stride, kh, kw};
  SPARSEPROP_RETURN_IF_ERROR(check_geometry(g, op));
  Stack ds, xs, ys;
  SPARSEPROP_RETURN_IF_ERROR(decode_stack(dvalues->dimensions(), 1, op, "output", &ds));
  const int64_t total = ds.count;
  Shapes sh;
  SPARSEPROP_RETURN_IF_ERROR(decode_shapes(g, x.dimensions(), dy.dimensions(), &ds, op, "x",
                                           "dy", &xs, &ys, &sh));
  SPARSEPROP_RETURN_IF_ERROR(check_windows(g, sh, op));
  Pattern pat;
  SPARSEPROP_RETURN_IF_ERROR(decode_pattern(indptr, indices, sh.cout, kh * kw * sh.cin, ds,
                                            op, "pattern", &pat));
  SPARSEPROP_RETURN_IF_ERROR(check_size(ds.dims[0], pat.nnz, op, "output length"));

  const WindowPlan plan = window_plan(g, sh);
  const EntryOffsets offsets = entry_offsets(pat, plan.offset);
  std::vector<Task> tasks;
  const int parts = parallel_parts(pool, total * plan.grid.size() * plan.length * pat.nnz);
  for (int64_t v = 0; v < total; ++v) split_rows(pat.row_ptr(v), pat.rows, v, parts, &tasks);
  const Routines& k = active_routines();
  const float* dyd = dy.typed_data();
  const float* xd = x.typed_data();
  float* dw = dvalues->typed_data();
  return run_tasks(pool, std::move(tasks), [=, &k](const Task& t) {
    weight_gradient_blocks(k, pat.row_ptr(t.slice), offsets.of(t.slice),
                           dyd + slice_offset(ys, t.slice), xd + slice_offset(xs, t.slice),
                           dw + t.slice * ds.slice(), plan, t.begin, t.end);
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

// One PhaseMatrix per slice of the operands they are built from (`stack`).
struct PhaseMatrices {
  std::vector<PhaseMatrix> slices;
  Stack stack;
  const PhaseMatrix& of(int64_t v) const { return slices[stack.index(v)]; }
};

// The s x s phase sub-kernels of the input gradient for every distinct
// slice of the transposed pattern `tpat` with `t_perm` and the values, each
// slice first checked against the pattern `pat`; dy_offset(t, u, co) is the
// offset of output-gradient channel co at tap (t, u) of a phase.
ffi::Error phase_matrices(const Pattern& pat, const Pattern& tpat, ffi::Buffer<ffi::F32> values,
                          const Stack& vs, ffi::Buffer<ffi::S32> t_perm, const Stack& ps,
                          int64_t s, int64_t kh, int64_t kw, int64_t cin,
                          const std::function<int64_t(int64_t, int64_t, int64_t)>& dy_offset,
                          const char* op, std::shared_ptr<PhaseMatrices>* out) {
  const int64_t nnz = tpat.nnz;
  auto phases = std::make_shared<PhaseMatrices>();
  phases->stack = joint({&vs, &ps, &tpat.indptr_stack, &tpat.indices_stack, &pat.indptr_stack,
                         &pat.indices_stack});
  phases->slices.resize(phases->stack.count);
  for (int64_t i = 0; i < phases->stack.count; ++i) {
    const int64_t v = phases->stack.representative(i);
    const int32_t* perm = t_perm.typed_data() + slice_offset(ps, v);
    ffi::Error error = check_transposed_rows(tpat, perm, pat, v, 0, tpat.rows, op);
    if (error.failure()) return error;
    const float* w = values.typed_data() + slice_offset(vs, v);
    const int32_t* rp = tpat.row_ptr(v);
    const int32_t* co = tpat.col_idx(v);
    PhaseMatrix& m = phases->slices[i];
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
  *out = std::move(phases);
  return ffi::Error::Success();
}

ffi::Future ConvInputGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dyp,
                          ffi::Buffer<ffi::F32> values, ffi::Buffer<ffi::S32> indptr,
                          ffi::Buffer<ffi::S32> indices, ffi::Buffer<ffi::S32> t_indptr,
                          ffi::Buffer<ffi::S32> t_indices, ffi::Buffer<ffi::S32> t_perm,
                          ffi::ResultBuffer<ffi::F32> dx, int64_t stride, int64_t kh,
                          int64_t kw) {
  constexpr const char* op = "sparse_conv2d input gradient";
  SPARSEPROP_RETURN_IF_ERROR(check_geometry(Geometry{stride, kh, kw}, op));
  Stack dxs, dys, vs, ps;
  // dx has the padded input's layout; dyp is the output gradient padded by
  // (P, Q) = (ceil(kh / s) - 1, ceil(kw / s) - 1) on top and left and with
  // zeros below and right, in the output's layout.
  SPARSEPROP_RETURN_IF_ERROR(decode_stack(dx->dimensions(), 5, op, "output", &dxs));
  const int64_t total = dxs.count;
  SPARSEPROP_RETURN_IF_ERROR(decode_operand(dyp.dimensions(), 4, dxs, op, "padded dy", &dys));
  const int64_t* xd = dxs.dims;
  const int64_t* yd = dys.dims;
  const int64_t s = stride;
  const int64_t n = xd[0], cin = xd[1], hp = xd[2], wq = xd[4];
  const int64_t cout = yd[1], hd = yd[2], wd = yd[3];
  const int64_t P = ceil_div(kh, s) - 1, Q = ceil_div(kw, s) - 1;
  SPARSEPROP_RETURN_IF_ERROR(check_size(yd[0], n, op, "padded dy batch size"));
  SPARSEPROP_RETURN_IF_ERROR(check_size(xd[3], s, op, "output stride phases"));
  if (hd < ceil_div(hp, s) + P || wd < wq + Q)
    return failed(ffi::Error::InvalidArgument(std::string("sparseprop_jax ") + op +
                                              ": padded dy is too small for the input size"));
  SPARSEPROP_RETURN_IF_ERROR(decode_operand(values.dimensions(), 1, dxs, op, "values", &vs));
  SPARSEPROP_RETURN_IF_ERROR(
      decode_operand(t_perm.dimensions(), 1, dxs, op, "transposed permutation", &ps));
  Pattern pat, tpat;
  SPARSEPROP_RETURN_IF_ERROR(decode_pattern(indptr, indices, cout, kh * kw * cin, dxs, op,
                                            "pattern", &pat));
  SPARSEPROP_RETURN_IF_ERROR(decode_pattern(t_indptr, t_indices, kh * kw * cin, cout, dxs, op,
                                            "transposed pattern", &tpat));
  const int64_t nnz = tpat.nnz;
  SPARSEPROP_RETURN_IF_ERROR(check_size(nnz, pat.nnz, op, "transposed pattern nnz"));
  SPARSEPROP_RETURN_IF_ERROR(check_size(vs.dims[0], nnz, op, "values length"));
  SPARSEPROP_RETURN_IF_ERROR(check_size(ps.dims[0], nnz, op, "transposed permutation length"));

  // Offset of output-gradient channel co at tap (t, u) of a phase.
  auto dy_offset = [=](int64_t t, int64_t u, int64_t co) -> int64_t {
    return co * hd * wd + (P - t) * wd + (Q - u);
  };
  std::shared_ptr<PhaseMatrices> phases;
  SPARSEPROP_RETURN_IF_ERROR(phase_matrices(pat, tpat, values, vs, t_perm, ps, s, kh, kw, cin,
                                            dy_offset, op, &phases));
  // Phase (a, b) writes input positions (j * s + a, i * s + b).
  std::vector<Grid> grids(s * s);
  std::vector<int64_t> origins(s * s);
  int64_t positions = 0;
  for (int64_t a = 0; a < s; ++a)
    for (int64_t b = 0; b < s; ++b) {
      const int64_t ph = a * s + b;
      grids[ph] = {n, ceil_div(hp - a, s), cout * hd * wd, wd, cin * hp * s * wq, s * s * wq};
      origins[ph] = (a * s + b) * wq;
      positions += grids[ph].size();
    }
  const int64_t ld_row = hp * s * wq, length = wq;
  const int parts = parallel_parts(pool, total * positions * length * nnz / (s * s));
  std::vector<Task> tasks;
  for (int64_t v = 0; v < total; ++v)
    for (int64_t ph = 0; ph < s * s; ++ph) split_even(grids[ph].size(), v, ph, parts, &tasks);
  const Routines& k = active_routines();
  const float* dyd = dyp.typed_data();
  float* dxd = dx->typed_data();
  return run_tasks(pool, std::move(tasks), [=, &k](const Task& t) {
    const PhaseMatrix& m = phases->of(t.slice);
    k.spmm(m.indptr.data() + t.group * cin, m.offsets.data(), m.values.data(),
           dyd + slice_offset(dys, t.slice), dxd + t.slice * dxs.slice() + origins[t.group],
           ld_row, length, grids[t.group], t.begin, t.end, 0, cin);
    return ffi::Error::Success();
  });
}


// ---------------------------------------------------------------------------
// The batch variant on the caller's NHWC activations.
//
// These handlers lay the activations out themselves, in the same parallel
// run as the products (as the linear handlers do), rather than leaving pads
// and transposes to XLA: each of those is one more pass over megabytes of
// activations and one more buffer whose fresh pages the OS must fault in,
// which at high sparsity cost more than the products. x and the padded dy go
// to the row-run layout (RowRuns) in recycled scratch; the products compute
// one output row (a range of its channels) at a time into a buffer that is
// transposed into the NHWC result while it is still in cache.

// The row-run layout: a padded image of `rows` x (s * wq) pixels stored as
// (rows, c, s, wq, n), padded column pc at stride phase pc % s, column
// pc / s. Per image row, channel and phase, the wq pixels x n batch floats
// form one run, so a tap (ky, kx, ci) over a whole output row is one
// contiguous run of wo * n floats: the products stream long runs (where
// the batch-minor (rows, cols, c, n) layout gave one 2-vector run per tap and
// output pixel), and every SIMD lane is used for any batch size.
struct RowRuns {
  int64_t rows, c, s, wq, n;
  int64_t run() const { return wq * n; }
  int64_t row() const { return c * s * run(); }
  int64_t size() const { return rows * row(); }
  // Where padded pixel (r, pc) of channel ci starts.
  int64_t at(int64_t r, int64_t pc, int64_t ci) const {
    return r * row() + (ci * s + pc % s) * run() + pc / s * n;
  }
};

struct NhwcGeometry {
  int64_t n, h, w, cin, cout, s, kh, kw, pt, pb, pl, pr;
  int64_t hp() const { return h + pt + pb; }
  int64_t wp() const { return w + pl + pr; }
  int64_t ho() const { return (hp() - kh) / s + 1; }
  int64_t wo() const { return (wp() - kw) / s + 1; }
  // The padded output gradient: P rows and Q columns of zeros on top and
  // left, enough below and right for every phase's windows.
  int64_t P() const { return ceil_div(kh, s) - 1; }
  int64_t Q() const { return ceil_div(kw, s) - 1; }
  int64_t hd() const { return std::max(ho(), ceil_div(hp(), s)) + P(); }
  int64_t wd() const { return std::max(wo(), ceil_div(wp(), s)) + Q(); }
  // The layouts of the padded x (stride phases) and of the padded dy.
  RowRuns x_runs() const { return {hp(), cin, s, ceil_div(wp(), s), n}; }
  RowRuns dy_runs() const { return {hd(), cout, 1, wd(), n}; }
};

// Reads the NHWC input shape and the attributes; checks that the windows fit.
ffi::Error decode_nhwc(const Stack& xs, int64_t cout, int64_t stride, int64_t kh, int64_t kw,
                       int64_t pad_top, int64_t pad_bottom, int64_t pad_left, int64_t pad_right,
                       const char* op, NhwcGeometry* g) {
  if (stride < 1 || kh < 1 || kw < 1 || std::min({pad_top, pad_bottom, pad_left, pad_right}) < 0)
    return ffi::Error::InvalidArgument(std::string("sparseprop_jax ") + op +
                                       ": bad attributes (stride, kh, kw >= 1, pads >= 0)");
  *g = {xs.dims[0], xs.dims[1], xs.dims[2], xs.dims[3], cout, stride, kh, kw,
        pad_top, pad_bottom, pad_left, pad_right};
  if (g->hp() < kh || g->wp() < kw)
    return ffi::Error::InvalidArgument(std::string("sparseprop_jax ") + op +
                                       ": the kernel is larger than the padded input");
  return ffi::Error::Success();
}

// Tasks copying each slice of NHWC `src` (n, h, w, c) into the row-run
// layout `to` at `dst`, the image at (top, left) and zeros around it; split
// over the destination rows.
Phase to_row_runs(const Routines& k, const float* src, const Stack& ss, float* dst,
                  const RowRuns& to, int64_t top, int64_t left, int parts) {
  const int64_t n = ss.dims[0], h = ss.dims[1], w = ss.dims[2], c = ss.dims[3];
  const bool stream = streams_past_cache(ss.count * to.size());
  Phase phase;
  for (int64_t v = 0; v < ss.count; ++v) split_even(to.rows, v, 0, parts, &phase.tasks);
  phase.fn = [=, &k](const Task& t) {
    const float* image = src + t.slice * ss.slice();
    float* slice = dst + t.slice * to.size();
    for (int64_t r = t.begin; r < t.end; ++r) {
      const int64_t y = r - top;
      if (y < 0 || y >= h) {
        std::fill(slice + r * to.row(), slice + (r + 1) * to.row(), 0.0f);
        continue;
      }
      for (int64_t pc = 0; pc < to.s * to.wq; ++pc) {
        float* pixel = slice + to.at(r, pc, 0);
        const int64_t x = pc - left;
        if (x >= 0 && x < w) {
          k.transpose(image + (y * w + x) * c, h * w * c, pixel, to.s * to.run(), n, 0, c, stream);
        } else {
          for (int64_t ci = 0; ci < c; ++ci)
            std::fill(pixel + ci * to.s * to.run(), pixel + ci * to.s * to.run() + n, 0.0f);
        }
      }
    }
    return ffi::Error::Success();
  };
  return phase;
}

// Each entry's tap as its offset in the row-run layout `x` (relative to the
// window's origin).
std::function<int64_t(int32_t)> tap_offsets(const RowRuns& x, int64_t kw) {
  return [=](int32_t r) -> int64_t {
    const Tap t = tap_of(r, x.c, kw);
    return x.at(t.ky, t.kx, t.ci);
  };
}

// One output row of the sparse product: rows [begin, end) of the pattern
// (channels), each a run of `cols` pixels x n batch floats read from `in`,
// into a buffer, then transposed into NHWC: pixel i's channels go to
// dst + i * pixel_step, whose batch rows are ld_dst apart; `stream` for a
// destination past the cache (streams_past_cache). (Going through the
// row in blocks of pixels, to keep a block's windows in L2 across channels,
// measured no faster.)
void row_product_to_nhwc(const Routines& k, const int32_t* indptr, const int64_t* offsets,
                         const float* values, const float* in, int64_t begin, int64_t end,
                         int64_t cols, int64_t n, float* dst, int64_t pixel_step,
                         int64_t ld_dst, bool stream) {
  const int64_t run = cols * n, channels = end - begin;
  const auto buffer = scratch<float>(channels * run);
  // indptr + begin: the range's rows as rows 0.. (the entries keep their
  // positions in offsets and values).
  k.spmm(indptr + begin, offsets, values, in, buffer.get(), run, run, Grid{}, 0, 1, 0, channels);
  for (int64_t i = 0; i < cols; ++i)
    k.transpose(buffer.get() + i * n, run, dst + i * pixel_step, ld_dst, channels, 0, n, stream);
}

// Channel ranges per output row: enough tasks for every worker even when an
// image has few rows (a 7 x 7 output).
int channel_parts(int parts, int64_t rows, int64_t channels) {
  return static_cast<int>(std::max<int64_t>(
      1, std::min<int64_t>(channels, ceil_div(2 * static_cast<int64_t>(parts), rows))));
}

ffi::Future ConvNhwcForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                            ffi::Buffer<ffi::F32> values, ffi::Buffer<ffi::S32> indptr,
                            ffi::Buffer<ffi::S32> indices, ffi::ResultBuffer<ffi::F32> y,
                            int64_t stride, int64_t kh, int64_t kw, int64_t pad_top,
                            int64_t pad_bottom, int64_t pad_left, int64_t pad_right) {
  constexpr const char* op = "sparse_conv2d forward";
  Stack ys, xs, vs;
  SPARSEPROP_RETURN_IF_ERROR(decode_stack(y->dimensions(), 4, op, "output", &ys));
  const int64_t total = ys.count;
  SPARSEPROP_RETURN_IF_ERROR(decode_operand(x.dimensions(), 4, ys, op, "x", &xs));
  NhwcGeometry g;
  SPARSEPROP_RETURN_IF_ERROR(decode_nhwc(xs, ys.dims[3], stride, kh, kw, pad_top, pad_bottom,
                                         pad_left, pad_right, op, &g));
  SPARSEPROP_RETURN_IF_ERROR(check_size(ys.dims[0], g.n, op, "output batch size"));
  SPARSEPROP_RETURN_IF_ERROR(check_size(ys.dims[1], g.ho(), op, "output height"));
  SPARSEPROP_RETURN_IF_ERROR(check_size(ys.dims[2], g.wo(), op, "output width"));
  SPARSEPROP_RETURN_IF_ERROR(decode_operand(values.dimensions(), 1, ys, op, "values", &vs));
  Pattern pat;
  SPARSEPROP_RETURN_IF_ERROR(decode_pattern(indptr, indices, g.cout, kh * kw * g.cin, ys, op,
                                            "pattern", &pat));
  SPARSEPROP_RETURN_IF_ERROR(check_size(vs.dims[0], pat.nnz, op, "values length"));

  const RowRuns xr = g.x_runs();
  const EntryOffsets offsets = entry_offsets(pat, tap_offsets(xr, kw));
  const Routines& k = active_routines();
  const int64_t ho = g.ho(), wo = g.wo(), cout = g.cout, n = g.n, s = g.s;
  const int parts = parallel_parts(pool, total * ho * wo * n * pat.nnz);
  auto xl = scratch<float>(xs.count * xr.size());
  std::vector<Phase> phases;
  phases.push_back(to_row_runs(k, x.typed_data(), xs, xl.get(), xr, g.pt, g.pl, parts));
  // Tasks: (output row = group, range of output channels).
  Phase products;
  for (int64_t v = 0; v < total; ++v) {
    std::vector<Task> channels;
    split_rows(pat.row_ptr(v), cout, v, channel_parts(parts, ho, cout), &channels);
    for (int64_t i = 0; i < ho; ++i)
      for (const Task& c : channels) products.tasks.push_back({v, c.begin, c.end, i});
  }
  const float* w = values.typed_data();
  float* out = y->typed_data();
  const bool stream_y = streams_past_cache(total * ys.slice());
  products.fn = [=, &k](const Task& t) {
    float* image = out + t.slice * ys.slice() + t.group * wo * cout + t.begin;
    const float* in = xl.get() + xs.index(t.slice) * xr.size() + t.group * s * xr.row();
    row_product_to_nhwc(k, pat.row_ptr(t.slice), offsets.of(t.slice),
                        w + slice_offset(vs, t.slice), in, t.begin, t.end, wo, n, image, cout,
                        ho * wo * cout, stream_y);
    return ffi::Error::Success();
  };
  phases.push_back(std::move(products));
  return run_phases(pool, parts, std::move(phases));
}

// The fused backward: phase 1 lays x and dy out in row runs; phase 2 runs the
// weight gradient (tasks split over output channels) and the rows of the
// s x s stride phases of the input gradient side by side.
ffi::Future ConvNhwcBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                             ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> values,
                             ffi::Buffer<ffi::S32> indptr, ffi::Buffer<ffi::S32> indices,
                             ffi::Buffer<ffi::S32> t_indptr, ffi::Buffer<ffi::S32> t_indices,
                             ffi::Buffer<ffi::S32> t_perm, ffi::ResultBuffer<ffi::F32> dx,
                             ffi::ResultBuffer<ffi::F32> dvalues, int64_t stride, int64_t kh,
                             int64_t kw, int64_t pad_top, int64_t pad_bottom, int64_t pad_left,
                             int64_t pad_right) {
  constexpr const char* op = "sparse_conv2d backward";
  Stack dxs, dws, xs, dys, vs, ps;
  SPARSEPROP_RETURN_IF_ERROR(decode_stack(dx->dimensions(), 4, op, "input gradient", &dxs));
  const int64_t total = dxs.count;
  SPARSEPROP_RETURN_IF_ERROR(decode_stack(dvalues->dimensions(), 1, op, "weight gradient", &dws));
  SPARSEPROP_RETURN_IF_ERROR(check_same_lead(dxs, dws, op, "weight gradient"));
  SPARSEPROP_RETURN_IF_ERROR(decode_operand(x.dimensions(), 4, dxs, op, "x", &xs));
  SPARSEPROP_RETURN_IF_ERROR(decode_operand(dy.dimensions(), 4, dxs, op, "dy", &dys));
  NhwcGeometry g;
  SPARSEPROP_RETURN_IF_ERROR(decode_nhwc(xs, dys.dims[3], stride, kh, kw, pad_top, pad_bottom,
                                         pad_left, pad_right, op, &g));
  for (int i = 0; i < 4; ++i)
    SPARSEPROP_RETURN_IF_ERROR(check_size(dxs.dims[i], xs.dims[i], op, "input gradient shape"));
  SPARSEPROP_RETURN_IF_ERROR(check_size(dys.dims[0], g.n, op, "dy batch size"));
  SPARSEPROP_RETURN_IF_ERROR(check_size(dys.dims[1], g.ho(), op, "dy height"));
  SPARSEPROP_RETURN_IF_ERROR(check_size(dys.dims[2], g.wo(), op, "dy width"));
  SPARSEPROP_RETURN_IF_ERROR(decode_operand(values.dimensions(), 1, dxs, op, "values", &vs));
  SPARSEPROP_RETURN_IF_ERROR(
      decode_operand(t_perm.dimensions(), 1, dxs, op, "transposed permutation", &ps));
  const int64_t cin = g.cin, cout = g.cout, n = g.n, s = g.s;
  Pattern pat, tpat;
  SPARSEPROP_RETURN_IF_ERROR(decode_pattern(indptr, indices, cout, kh * kw * cin, dxs, op,
                                            "pattern", &pat));
  SPARSEPROP_RETURN_IF_ERROR(decode_pattern(t_indptr, t_indices, kh * kw * cin, cout, dxs, op,
                                            "transposed pattern", &tpat));
  SPARSEPROP_RETURN_IF_ERROR(check_size(vs.dims[0], pat.nnz, op, "values length"));
  SPARSEPROP_RETURN_IF_ERROR(check_size(tpat.nnz, pat.nnz, op, "transposed pattern length"));
  SPARSEPROP_RETURN_IF_ERROR(check_size(ps.dims[0], pat.nnz, op, "transposed permutation length"));
  SPARSEPROP_RETURN_IF_ERROR(check_size(dws.dims[0], pat.nnz, op, "weight gradient length"));

  const int64_t P = g.P(), Q = g.Q();
  const RowRuns xr = g.x_runs(), dr = g.dy_runs();
  // Offset of output-gradient channel co at tap (t, u) of a phase, from the
  // phase's origin in the padded dy.
  auto dy_offset = [=](int64_t t, int64_t u, int64_t co) -> int64_t {
    return dr.at(P - t, Q - u, co);
  };
  std::shared_ptr<PhaseMatrices> phase_mats;
  SPARSEPROP_RETURN_IF_ERROR(phase_matrices(pat, tpat, values, vs, t_perm, ps, s, kh, kw, cin,
                                            dy_offset, op, &phase_mats));

  // The weight gradient: per output row, the run of wo pixels of each
  // channel of dy (inside the padded copy) against the forward's windows
  // over the padded x.
  const int64_t ho = g.ho(), wo = g.wo();
  WindowPlan plan;
  plan.grid = {ho, 1, s * xr.row(), 0, dr.row(), 0};
  plan.ld_row = dr.run();
  plan.length = wo * n;
  plan.block = block_positions(4 * kh * xr.row(), 4 * s * xr.row(), 4 * cout * dr.run());
  const EntryOffsets offsets = entry_offsets(pat, tap_offsets(xr, kw));

  // Input-gradient phase (a, b) computes the input positions
  // (j * s + a, i * s + b) inside the image: j in [j0, j0 + rows), i in
  // [i0, i0 + cols), one row j (a range of its channels) per task.
  struct InputRow {
    int64_t a, b, j, i0, cols;
  };
  std::vector<InputRow> in_rows;
  for (int64_t a = 0; a < s; ++a)
    for (int64_t b = 0; b < s; ++b) {
      const int64_t j0 = ceil_div(g.pt - a, s), i0 = ceil_div(g.pl - b, s);
      const int64_t rows = std::max<int64_t>(0, ceil_div(g.pt + g.h - a, s) - j0);
      const int64_t cols = std::max<int64_t>(0, ceil_div(g.pl + g.w - b, s) - i0);
      if (cols > 0)
        for (int64_t j = j0; j < j0 + rows; ++j) in_rows.push_back({a, b, j, i0, cols});
    }

  const Routines& k = active_routines();
  const int parts = parallel_parts(pool, total * ho * wo * n * pat.nnz);
  auto xl = scratch<float>(xs.count * xr.size());
  auto dyp = scratch<float>(dys.count * dr.size());
  std::vector<Phase> layout, phases;
  layout.push_back(to_row_runs(k, x.typed_data(), xs, xl.get(), xr, g.pt, g.pl, parts));
  layout.push_back(to_row_runs(k, dy.typed_data(), dys, dyp.get(), dr, P, Q, parts));
  phases.push_back(concurrent(std::move(layout)));

  // Tasks: group 0 = weight-gradient rows; group 1 + e = input row
  // in_rows[e], over a range of input channels.
  Phase products;
  for (int64_t v = 0; v < total; ++v) split_rows(pat.row_ptr(v), pat.rows, v, parts, &products.tasks);
  const int in_parts = channel_parts(parts, static_cast<int64_t>(in_rows.size()), cin);
  for (int64_t v = 0; v < total; ++v)
    for (int64_t e = 0; e < static_cast<int64_t>(in_rows.size()); ++e)
      split_even(cin, v, 1 + e, in_parts, &products.tasks);
  const float* w = values.typed_data();
  float* dxd = dx->typed_data();
  float* dwd = dvalues->typed_data();
  const int64_t h = g.h, wdt = g.w, pt = g.pt, pl = g.pl;
  const bool stream_dx = streams_past_cache(total * dxs.slice());
  products.fn = [=, &k](const Task& t) {
    const float* dyv = dyp.get() + dys.index(t.slice) * dr.size();
    if (t.group == 0) {
      weight_gradient_blocks(k, pat.row_ptr(t.slice), offsets.of(t.slice), dyv + dr.at(P, Q, 0),
                             xl.get() + xs.index(t.slice) * xr.size(),
                             dwd + t.slice * pat.nnz, plan, t.begin, t.end);
      return ffi::Error::Success();
    }
    const InputRow& ir = in_rows[t.group - 1];
    const PhaseMatrix& m = phase_mats->of(t.slice);
    float* pixel0 = dxd + t.slice * dxs.slice() +
                    (((ir.j * s + ir.a - pt) * wdt + ir.i0 * s + ir.b - pl) * cin) + t.begin;
    row_product_to_nhwc(k, m.indptr.data() + (ir.a * s + ir.b) * cin, m.offsets.data(),
                        m.values.data(), dyv + dr.at(ir.j, ir.i0, 0), t.begin, t.end, ir.cols, n,
                        pixel0, s * cin, h * wdt * cin, stream_dx);
    return ffi::Error::Success();
  };
  phases.push_back(std::move(products));
  return run_phases(pool, parts, std::move(phases));
}
}  // namespace

#define SPARSEPROP_CONV_ATTRS \
  .Attr<int64_t>("stride")    \
      .Attr<int64_t>("kh")    \
      .Attr<int64_t>("kw")

XLA_FFI_DEFINE_HANDLER_SYMBOL(kConvForward, Guarded<ConvForward>::Call,
                              (bind_operands<2, 2>())
                                  .Ret<ffi::Buffer<ffi::F32>>() SPARSEPROP_CONV_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(kConvWeightGrad, Guarded<ConvWeightGrad>::Call,
                              (bind_operands<2, 2>())
                                  .Ret<ffi::Buffer<ffi::F32>>() SPARSEPROP_CONV_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(kConvInputGrad, Guarded<ConvInputGrad>::Call,
                              (bind_operands<2, 5>())
                                  .Ret<ffi::Buffer<ffi::F32>>() SPARSEPROP_CONV_ATTRS);

}  // namespace sparseprop

#define SPARSEPROP_CONV_NHWC_ATTRS       \
  .Attr<int64_t>("stride")               \
      .Attr<int64_t>("kh")               \
      .Attr<int64_t>("kw")               \
      .Attr<int64_t>("pad_top")          \
      .Attr<int64_t>("pad_bottom")       \
      .Attr<int64_t>("pad_left")         \
      .Attr<int64_t>("pad_right")

namespace sparseprop {

XLA_FFI_DEFINE_HANDLER_SYMBOL(kConvNhwcForward, Guarded<ConvNhwcForward>::Call,
                              (bind_operands<2, 2>())
                                  .Ret<ffi::Buffer<ffi::F32>>() SPARSEPROP_CONV_NHWC_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(kConvNhwcBackward, Guarded<ConvNhwcBackward>::Call,
                              (bind_operands<3, 5>())
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() SPARSEPROP_CONV_NHWC_ATTRS);

}  // namespace sparseprop
