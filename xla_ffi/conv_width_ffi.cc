// The width variant of the sparse convolution: SIMD lanes over runs of one
// output row of one image (the output width), for large images. The
// handlers lay the activations out in recycled scratch (WidthLayout); the
// products compute one row of one image (a range of its channels) at a time
// into a buffer that is transposed into the NHWC result while it is still in
// cache. What both variants share is in conv_common.h. The handlers exist
// for float32 and bfloat16 (T) operands, as the batch variant's.
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

// The width layout of a padded batch of images: (n, c, rows, s, wq), padded
// column pc of a row at stride phase pc % s, column pc / s. A strided
// window's columns are then one run per tap: output column j of a tap at
// column kx reads phase kx % s, column j + kx / s.
struct WidthLayout {
  int64_t n, c, rows, s, wq;
  int64_t row() const { return s * wq; }
  int64_t plane() const { return rows * row(); }
  int64_t image() const { return c * plane(); }
  int64_t size() const { return n * image(); }
  // Where padded pixel (r, pc) of channel ci of image b is.
  int64_t at(int64_t b, int64_t ci, int64_t r, int64_t pc) const {
    return b * image() + ci * plane() + r * row() + (pc % s) * wq + pc / s;
  }
};

// The padded x, and the output gradient padded as the input gradient reads
// it (conv_common.h), in the width layout.
WidthLayout x_layout(const ConvGeometry& g) { return {g.n, g.cin, g.hp(), g.s, g.wq()}; }
WidthLayout dy_layout(const ConvGeometry& g) { return {g.n, g.cout, g.hd(), 1, g.wd()}; }

// Tasks copying each slice of NHWC `src` (n, h, w, c) into the width layout
// `to` at `dst`, the images at (top, left) and zeros around them; split over
// the destination's image rows.
template <typename T>
Phase to_width_layout(const RoutinesFor<T>& k, const T* src, const Stack& ss, T* dst,
                      const WidthLayout& to, int64_t top, int64_t left, int parts) {
  const int64_t h = ss.dims[1], w = ss.dims[2], c = ss.dims[3];
  const bool stream = streams_past_cache(ss.count * to.size());
  Phase phase;
  for (int64_t v = 0; v < ss.count; ++v) split_even(to.n * to.rows, v, 0, parts, &phase.tasks);
  phase.fn = [=, &k](const Task& t) {
    const T* images = src + t.slice * ss.slice();
    T* slice = dst + t.slice * to.size();
    for (int64_t pos = t.begin; pos < t.end; ++pos) {
      const int64_t b = pos / to.rows, r = pos % to.rows, y = r - top;
      const bool inside = y >= 0 && y < h;
      for (int64_t a = 0; a < to.s; ++a) {
        // Columns q of phase a hold padded columns q * s + a: the image's
        // pixels for q in [lo, hi), zeros around them.
        const int64_t lo = inside ? std::min(to.wq, ceil_div(left - a, to.s)) : to.wq;
        const int64_t hi = inside ? std::max(lo, std::min(to.wq, ceil_div(left + w - a, to.s)))
                                  : to.wq;
        for (int64_t ci = 0; ci < to.c; ++ci) {
          T* run = slice + to.at(b, ci, r, a);
          std::fill(run, run + lo, T{});
          std::fill(run + hi, run + to.wq, T{});
        }
        if (hi > lo)
          k.transpose(images + ((b * h + y) * w + lo * to.s + a - left) * c, to.s * c,
                      slice + to.at(b, 0, r, lo * to.s + a), to.plane(), hi - lo, 0, c, stream);
      }
    }
    return ffi::Error::Success();
  };
  return phase;
}

// Each entry's tap as its offset in the width layout `x` from a window's origin.
std::function<int64_t(int32_t)> tap_offsets(const WidthLayout& x, int64_t kw) {
  return [=](int32_t r) -> int64_t {
    const Tap t = tap_of(r, x.c, kw);
    return t.ci * x.plane() + t.ky * x.row() + (t.kx % x.s) * x.wq + t.kx / x.s;
  };
}

// One row of the sparse product: rows [begin, end) of the pattern (channels),
// each a run of `cols` floats read from `in`, into `buffer`, then transposed
// into NHWC: pixel i's channels go to dst + i * pixel_step.
template <typename T>
void row_product_to_nhwc(const RoutinesFor<T>& k, const int32_t* indptr,
                         const int64_t* offsets, const float* values, const T* in,
                         int64_t begin, int64_t end, int64_t cols, float* buffer, T* dst,
                         int64_t pixel_step, bool stream) {
  const int64_t channels = end - begin;
  // indptr + begin: the range's rows as rows 0.. (the entries keep their
  // positions in offsets and values).
  k.spmm(indptr + begin, offsets, values, in, buffer, cols, cols, Grid{}, 0, 1, 0, channels);
  k.transpose_rounded(buffer, cols, dst, pixel_step, channels, 0, cols, stream);
}

template <ffi::DataType D>
ffi::Future ConvWidthForward(ffi::ThreadPool pool, ffi::Buffer<D> x, ffi::Buffer<D> values,
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
  const int64_t total = ys.count, ho = g.ho(), wo = g.wo(), cout = g.cout, s = g.s;

  const WidthLayout xl = x_layout(g);
  const EntryOffsets offsets = entry_offsets(pat, tap_offsets(xl, kw));
  const RoutinesFor<T>& k = active_routines<T>();
  const int parts = parallel_parts(pool, total * g.n * ho * wo * pat.nnz);
  auto xd = scratch<T>(xs.count * xl.size());
  std::vector<Phase> layout, phases;
  layout.push_back(to_width_layout(k, x.typed_data(), xs, xd.get(), xl, g.pt, g.pl, parts));
  // The products' values: for bfloat16, widened to float beside the layout.
  const FloatValues<T> wv(values.typed_data(), vs, pat.nnz, parts, &layout);
  phases.push_back(concurrent(std::move(layout)));
  // Tasks: ranges of output rows (image, row).
  Phase products;
  for (int64_t v = 0; v < total; ++v) split_even(g.n * ho, v, 0, parts, &products.tasks);
  T* out = y->typed_data();
  const bool stream_y = streams_past_cache(total * ys.slice());
  products.fn = [=, &k](const Task& t) {
    const auto buffer = scratch<float>(cout * wo);
    const T* x_v = xd.get() + xs.index(t.slice) * xl.size();
    for (int64_t pos = t.begin; pos < t.end; ++pos) {
      const int64_t b = pos / ho, i = pos % ho;
      row_product_to_nhwc(k, pat.row_ptr(t.slice), offsets.of(t.slice), wv.of(t.slice),
                          x_v + b * xl.image() + i * s * xl.row(),
                          0, cout, wo, buffer.get(), out + t.slice * ys.slice() + pos * wo * cout,
                          cout, stream_y);
    }
    return ffi::Error::Success();
  };
  phases.push_back(std::move(products));
  return run_phases(pool, parts, std::move(phases));
}

// The fused backward: phase 1 lays x and dy out; phase 2 runs the weight
// gradient (tasks split over output channels) and the rows of the s x s
// stride phases of the input gradient (tasks split over input channels)
// side by side.
template <ffi::DataType D>
ffi::Future ConvWidthBackward(ffi::ThreadPool pool, ffi::Buffer<D> x, ffi::Buffer<D> dy,
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
      x.dimensions(), dy.dimensions(), values.dimensions(), indptr, indices, t_indptr,
      t_indices, t_perm, dx->dimensions(),
      dvalues->dimensions(), {stride, kh, kw, pad_top, pad_bottom, pad_left, pad_right}, op,
      &c));
  const ConvGeometry& g = c.g;
  const Stack &dxs = c.dxs, &xs = c.xs, &dys = c.dys;
  const Pattern& pat = c.pat;
  const int64_t total = dxs.count, cin = g.cin, cout = g.cout, s = g.s;
  const int64_t ho = g.ho(), wo = g.wo(), P = g.P(), Q = g.Q();
  const WidthLayout xl = x_layout(g), dl = dy_layout(g);

  // Offset of output-gradient channel co at tap (t, u) of a phase, from a
  // row's origin in the padded dy.
  auto dy_offset = [=](int64_t t, int64_t u, int64_t co) -> int64_t {
    return co * dl.plane() + (P - t) * dl.row() + (Q - u);
  };
  std::shared_ptr<PhaseMatrices> phase_mats;
  SPARSEPROP_RETURN_IF_ERROR(
      phase_matrices(c, values.typed_data(), t_perm, dy_offset, op, &phase_mats));

  // The weight gradient: per output row (image, row), the run of wo pixels
  // of each channel of dy (inside the padded copy) against the forward's
  // windows over the padded x.
  WindowPlan plan;
  plan.grid = {g.n, ho, xl.image(), s * xl.row(), dl.image(), dl.row()};
  plan.ld_row = dl.plane();
  plan.length = wo;
  plan.block = block_positions(4 * cin * kh * xl.row(), 4 * cin * s * xl.row(), 4 * cout * wo);
  const EntryOffsets offsets = entry_offsets(pat, tap_offsets(xl, kw));

  // Input-gradient phase (a, b) computes the input positions
  // (j * s + a, i * s + b) inside the image, one row j of one image (a
  // range of its channels) per task.
  struct InputRow {
    int64_t a, b, image, j, i0, cols;
  };
  std::vector<InputRow> in_rows;
  for (const PhaseRows& pr : phase_rows(g))
    for (int64_t image = 0; image < g.n; ++image)
      for (int64_t j = pr.j0; j < pr.j0 + pr.rows; ++j)
        in_rows.push_back({pr.a, pr.b, image, j, pr.i0, pr.cols});

  const RoutinesFor<T>& k = active_routines<T>();
  const int parts = parallel_parts(pool, total * g.n * ho * wo * pat.nnz);
  auto xd = scratch<T>(xs.count * xl.size());
  auto dyd = scratch<T>(dys.count * dl.size());
  std::vector<Phase> layout, phases;
  layout.push_back(to_width_layout(k, x.typed_data(), xs, xd.get(), xl, g.pt, g.pl, parts));
  layout.push_back(to_width_layout(k, dy.typed_data(), dys, dyd.get(), dl, P, Q, parts));
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
    const T* dy_v = dyd.get() + dys.index(t.slice) * dl.size();
    if (t.group == 0) {
      weight_gradient_blocks(k, pat.row_ptr(t.slice), offsets.of(t.slice),
                             dy_v + P * dl.row() + Q, xd.get() + xs.index(t.slice) * xl.size(),
                             sums_of.of(t.slice), plan, t.begin, t.end);
      const int32_t* ptr = pat.row_ptr(t.slice);
      sums_of.finish(t.slice, ptr[t.begin], ptr[t.end]);
      return ffi::Error::Success();
    }
    const InputRow& ir = in_rows[t.group - 1];
    const PhaseMatrix& m = phase_mats->of(t.slice);
    const auto buffer = scratch<float>((t.end - t.begin) * ir.cols);
    T* pixel0 = dxd + t.slice * dxs.slice() +
                    (((ir.image * h + ir.j * s + ir.a - pt) * wdt + ir.i0 * s + ir.b - pl) * cin) +
                    t.begin;
    row_product_to_nhwc(k, m.indptr.data() + (ir.a * s + ir.b) * cin, m.offsets.data(),
                        m.values.data(), dy_v + ir.image * dl.image() + ir.j * dl.row() + ir.i0,
                        t.begin, t.end, ir.cols, buffer.get(), pixel0, s * cin, stream_dx);
    return ffi::Error::Success();
  };
  phases.push_back(std::move(products));
  return run_phases(pool, parts, std::move(phases));
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(kConvWidthForward, Guarded<ConvWidthForward<ffi::F32>>::Call,
                              bind<kConvForwardSignature<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(kConvWidthBackward, Guarded<ConvWidthBackward<ffi::F32>>::Call,
                              bind<kConvBackwardSignature<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(kConvWidthForwardBf16, Guarded<ConvWidthForward<ffi::BF16>>::Call,
                              bind<kConvForwardSignature<ffi::BF16>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(kConvWidthBackwardBf16,
                              Guarded<ConvWidthBackward<ffi::BF16>>::Call,
                              bind<kConvBackwardSignature<ffi::BF16>>());

}  // namespace sparseprop
