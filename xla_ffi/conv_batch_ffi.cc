// The batch variant of the sparse convolution: SIMD lanes over runs of
// output width x batch. The handlers lay x and the padded dy out in row runs
// (RowRuns) in recycled scratch; the products compute one output row (a
// range of its channels) at a time into a buffer that is transposed into the
// NHWC result while it is still in cache. What both variants share is in
// conv_common.h. The handlers exist for float32 and bfloat16 (T) operands:
// bfloat16 row runs, float products and sums, results rounded once.
#include <algorithm>
#include <memory>
#include <vector>

#include "conv_common.h"
#include "conv_ffi.h"
#include "ffi_common.h"
#include "float_values.h"
#include "pattern.h"
#include "simd_dispatch.h"

namespace sparseprop {
namespace {

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

// The layouts of the padded x (stride phases) and of the padded dy.
RowRuns x_runs(const ConvGeometry& g) { return {g.hp(), g.cin, g.s, g.wq(), g.n}; }
RowRuns dy_runs(const ConvGeometry& g) { return {g.hd(), g.cout, 1, g.wd(), g.n}; }

// Tasks copying each slice of NHWC `src` (n, h, w, c) into the row-run
// layout `to` at `dst`, the image at (top, left) and zeros around it; split
// over the destination rows.
template <typename T>
Phase to_row_runs(const RoutinesFor<T>& k, const T* src, const Stack& ss, T* dst,
                  const RowRuns& to, int64_t top, int64_t left, int parts) {
  const int64_t n = ss.dims[0], h = ss.dims[1], w = ss.dims[2], c = ss.dims[3];
  const bool stream = streams_past_cache(ss.count * to.size());
  Phase phase;
  for (int64_t v = 0; v < ss.count; ++v) split_even(to.rows, v, 0, parts, &phase.tasks);
  phase.fn = [=, &k](const Task& t) {
    const T* image = src + t.slice * ss.slice();
    T* slice = dst + t.slice * to.size();
    for (int64_t r = t.begin; r < t.end; ++r) {
      const int64_t y = r - top;
      if (y < 0 || y >= h) {
        std::fill(slice + r * to.row(), slice + (r + 1) * to.row(), T{});
        continue;
      }
      for (int64_t pc = 0; pc < to.s * to.wq; ++pc) {
        T* pixel = slice + to.at(r, pc, 0);
        const int64_t x = pc - left;
        if (x >= 0 && x < w) {
          k.transpose(image + (y * w + x) * c, h * w * c, pixel, to.s * to.run(), n, 0, c, stream);
        } else {
          for (int64_t ci = 0; ci < c; ++ci)
            std::fill(pixel + ci * to.s * to.run(), pixel + ci * to.s * to.run() + n, T{});
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
template <typename T>
void row_product_to_nhwc(const RoutinesFor<T>& k, const int32_t* indptr,
                         const int64_t* offsets, const float* values, const T* in,
                         int64_t begin, int64_t end, int64_t cols, int64_t n, T* dst,
                         int64_t pixel_step, int64_t ld_dst, bool stream) {
  const int64_t run = cols * n, channels = end - begin;
  const auto buffer = scratch<float>(channels * run);
  // indptr + begin: the range's rows as rows 0.. (the entries keep their
  // positions in offsets and values).
  k.spmm(indptr + begin, offsets, values, in, buffer.get(), run, run, Grid{}, 0, 1, 0, channels);
  for (int64_t i = 0; i < cols; ++i)
    k.transpose_rounded(buffer.get() + i * n, run, dst + i * pixel_step, ld_dst, channels, 0, n,
                        stream);
}

template <ffi::DataType D>
ffi::Future ConvBatchForward(ffi::ThreadPool pool, ffi::Buffer<D> x, ffi::Buffer<D> values,
                             ffi::Buffer<ffi::S32> indptr, ffi::Buffer<ffi::S32> indices,
                             ffi::ResultBuffer<D> y, int64_t stride, int64_t kh, int64_t kw,
                             int64_t pad_top, int64_t pad_bottom, int64_t pad_left,
                             int64_t pad_right) {
  using T = ffi::NativeType<D>;
  constexpr const char* op = "sparse_conv2d forward";
  ConvForwardCall c;
  SPARSEPROP_RETURN_IF_ERROR(decode_conv_forward(
      x.dimensions(), values.dimensions(), indptr, indices, y->dimensions(),
      {stride, kh, kw, pad_top, pad_bottom, pad_left, pad_right}, op, &c));
  const ConvGeometry& g = c.g;
  const Stack &ys = c.ys, &xs = c.xs, &vs = c.vs;
  const Pattern& pat = c.pat;
  const int64_t total = ys.count;

  const RowRuns xr = x_runs(g);
  const EntryOffsets offsets = entry_offsets(pat, tap_offsets(xr, kw));
  const RoutinesFor<T>& k = active_routines<T>();
  const int64_t ho = g.ho(), wo = g.wo(), cout = g.cout, n = g.n, s = g.s;
  const int parts = parallel_parts(pool, total * ho * wo * n * pat.nnz);
  auto xl = scratch<T>(xs.count * xr.size());
  std::vector<Phase> layout, phases;
  layout.push_back(to_row_runs(k, x.typed_data(), xs, xl.get(), xr, g.pt, g.pl, parts));
  // The products' values: for bfloat16, widened to float beside the layout.
  const FloatValues<T> wv(values.typed_data(), vs, pat.nnz, parts, &layout);
  phases.push_back(concurrent(std::move(layout)));
  // Tasks: (output row = group, range of output channels).
  Phase products;
  for (int64_t v = 0; v < total; ++v) {
    std::vector<Task> channels;
    split_rows(pat.row_ptr(v), cout, v, channel_parts(parts, ho, cout), &channels);
    for (int64_t i = 0; i < ho; ++i)
      for (const Task& ch : channels) products.tasks.push_back({v, ch.begin, ch.end, i});
  }
  T* out = y->typed_data();
  const bool stream_y = streams_past_cache(total * ys.slice());
  products.fn = [=, &k](const Task& t) {
    T* image = out + t.slice * ys.slice() + t.group * wo * cout + t.begin;
    const T* in = xl.get() + xs.index(t.slice) * xr.size() + t.group * s * xr.row();
    row_product_to_nhwc(k, pat.row_ptr(t.slice), offsets.of(t.slice), wv.of(t.slice), in,
                        t.begin, t.end, wo, n, image, cout, ho * wo * cout, stream_y);
    return ffi::Error::Success();
  };
  phases.push_back(std::move(products));
  return run_phases(pool, parts, std::move(phases));
}

// The fused backward: phase 1 lays x and dy out in row runs; phase 2 runs the
// weight gradient (tasks split over output channels) and the rows of the
// s x s stride phases of the input gradient side by side.
// For bfloat16, the weight gradient's float sums are rounded into dvalues
// by each task, for its rows' entries.
template <ffi::DataType D>
ffi::Future ConvBatchBackward(ffi::ThreadPool pool, ffi::Buffer<D> x, ffi::Buffer<D> dy,
                              ffi::Buffer<D> values, ffi::Buffer<ffi::S32> indptr,
                              ffi::Buffer<ffi::S32> indices, ffi::Buffer<ffi::S32> t_indptr,
                              ffi::Buffer<ffi::S32> t_indices, ffi::Buffer<ffi::S32> t_perm,
                              ffi::ResultBuffer<D> dx, ffi::ResultBuffer<D> dvalues,
                              int64_t stride, int64_t kh, int64_t kw, int64_t pad_top,
                              int64_t pad_bottom, int64_t pad_left, int64_t pad_right) {
  using T = ffi::NativeType<D>;
  constexpr const char* op = "sparse_conv2d backward";
  ConvBackwardCall c;
  SPARSEPROP_RETURN_IF_ERROR(decode_conv_backward(
      x.dimensions(), dy.dimensions(), values.dimensions(), indptr, indices, t_indptr, t_indices, t_perm, dx->dimensions(),
      dvalues->dimensions(), {stride, kh, kw, pad_top, pad_bottom, pad_left, pad_right}, op,
      &c));
  const ConvGeometry& g = c.g;
  const Stack &dxs = c.dxs, &xs = c.xs, &dys = c.dys;
  const Pattern& pat = c.pat;
  const int64_t total = dxs.count, cin = g.cin, cout = g.cout, n = g.n, s = g.s;

  const int64_t P = g.P(), Q = g.Q();
  const RowRuns xr = x_runs(g), dr = dy_runs(g);
  // Offset of output-gradient channel co at tap (t, u) of a phase, from the
  // phase's origin in the padded dy.
  auto dy_offset = [=](int64_t t, int64_t u, int64_t co) -> int64_t {
    return dr.at(P - t, Q - u, co);
  };
  std::shared_ptr<PhaseMatrices> phase_mats;
  SPARSEPROP_RETURN_IF_ERROR(
      phase_matrices(c, values.typed_data(), t_perm, dy_offset, op, &phase_mats));

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
  // (j * s + a, i * s + b) inside the image, one row j (a range of its
  // channels) per task.
  struct InputRow {
    int64_t a, b, j, i0, cols;
  };
  std::vector<InputRow> in_rows;
  for (const PhaseRows& pr : phase_rows(g))
    for (int64_t j = pr.j0; j < pr.j0 + pr.rows; ++j)
      in_rows.push_back({pr.a, pr.b, j, pr.i0, pr.cols});

  const RoutinesFor<T>& k = active_routines<T>();
  const int parts = parallel_parts(pool, total * ho * wo * n * pat.nnz);
  auto xl = scratch<T>(xs.count * xr.size());
  auto dyp = scratch<T>(dys.count * dr.size());
  std::vector<Phase> layout, phases;
  layout.push_back(to_row_runs(k, x.typed_data(), xs, xl.get(), xr, g.pt, g.pl, parts));
  layout.push_back(to_row_runs(k, dy.typed_data(), dys, dyp.get(), dr, P, Q, parts));
  phases.push_back(concurrent(std::move(layout)));

  // Tasks: group 0 = weight-gradient rows; group 1 + e = input row
  // in_rows[e], over a range of input channels.
  Phase products;
  for (int64_t v = 0; v < total; ++v)
    split_rows(pat.row_ptr(v), pat.rows, v, parts, &products.tasks);
  const int in_parts = channel_parts(parts, static_cast<int64_t>(in_rows.size()), cin);
  for (int64_t v = 0; v < total; ++v)
    for (int64_t e = 0; e < static_cast<int64_t>(in_rows.size()); ++e)
      split_even(cin, v, 1 + e, in_parts, &products.tasks);
  T* dxd = dx->typed_data();
  const FloatSums<T> sums_of(dvalues->typed_data(), total, pat.nnz);
  const int64_t h = g.h, wdt = g.w, pt = g.pt, pl = g.pl;
  const bool stream_dx = streams_past_cache(total * dxs.slice());
  products.fn = [=, &k](const Task& t) {
    const T* dyv = dyp.get() + dys.index(t.slice) * dr.size();
    if (t.group == 0) {
      weight_gradient_blocks(k, pat.row_ptr(t.slice), offsets.of(t.slice), dyv + dr.at(P, Q, 0),
                             xl.get() + xs.index(t.slice) * xr.size(), sums_of.of(t.slice), plan,
                             t.begin, t.end);
      const int32_t* ptr = pat.row_ptr(t.slice);
      sums_of.finish(t.slice, ptr[t.begin], ptr[t.end]);
      return ffi::Error::Success();
    }
    const InputRow& ir = in_rows[t.group - 1];
    const PhaseMatrix& m = phase_mats->of(t.slice);
    T* pixel0 = dxd + t.slice * dxs.slice() +
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(kConvBatchForward, Guarded<ConvBatchForward<ffi::F32>>::Call,
                              bind<kConvForwardSignature<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(kConvBatchBackward, Guarded<ConvBatchBackward<ffi::F32>>::Call,
                              bind<kConvBackwardSignature<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(kConvBatchForwardBf16, Guarded<ConvBatchForward<ffi::BF16>>::Call,
                              bind<kConvForwardSignature<ffi::BF16>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(kConvBatchBackwardBf16,
                              Guarded<ConvBatchBackward<ffi::BF16>>::Call,
                              bind<kConvBackwardSignature<ffi::BF16>>());

}  // namespace sparseprop
