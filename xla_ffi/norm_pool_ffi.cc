// The backward of y = max_pool(relu(z)), z = BatchNorm(x) in training mode,
// channels last. With g = dy * (y > 0) at each window's winner (the tap the
// forward recorded) and dz the sum of g over the windows a pixel won,
//   dx = scale * invstd * (dz - mean(dz) - xhat * mean(dz * xhat)),
// whose means over the batch's pixels need sum(g) and sum(g * (x - mean)).
// XLA runs this as strided pads of every tap's share, with the
// normalisation recomputed in each; here it is two passes over the pixels:
// NormPoolGradSums writes g and the sums, NormPoolInputGrad gathers dz for
// each pixel and writes dx = a * dz + b * (x - mean) + d, with per-channel
// a, b, d that the caller derives from the sums. (x - mean), not x: the
// sums and dx then lose no precision where the mean is large.
//
// A tap that names a position outside the image (a window wholly in the
// padding) or outside the window is skipped; no tap leads to a read outside
// the buffers.
#include <algorithm>
#include <memory>
#include <vector>

#include "ffi_common.h"
#include "norm_pool_ffi.h"
#include "simd_dispatch.h"

namespace sparseprop {
namespace {

struct PoolAttrs {
  int64_t window_h, window_w, stride_h, stride_w, pad_top, pad_left;
};

// The geometry from x [N, H, W, C] and a pooled array [N, Ho, Wo, C].
ffi::Error decode_geometry(const Stack& xs, const Stack& ps, const PoolAttrs& a,
                           const char* op, PoolGeometry* g) {
  if (a.window_h < 1 || a.window_w < 1 || a.stride_h < 1 || a.stride_w < 1 ||
      a.pad_top < 0 || a.pad_left < 0)
    return invalid(op, "bad attributes (window and strides >= 1, pads >= 0)");
  if (a.window_h * a.window_w > 127)
    return invalid(op, "the window has more than 127 taps (the taps are int8)");
  *g = {xs.dims[1], xs.dims[2], xs.dims[3], ps.dims[1], ps.dims[2], a.window_h, a.window_w,
        a.stride_h, a.stride_w, a.pad_top, a.pad_left};
  ffi::Error error = check_size(ps.dims[0], xs.dims[0], op, "pooled batch size");
  if (error.success()) error = check_size(ps.dims[3], g->c, op, "pooled channels");
  return error;
}

ffi::Future NormPoolGradSums(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dpool,
                             ffi::Buffer<ffi::F32> pooled, ffi::Buffer<ffi::S8> taps,
                             ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> shift,
                             ffi::ResultBuffer<ffi::F32> g,
                             ffi::ResultBuffer<ffi::F32> sum_g,
                             ffi::ResultBuffer<ffi::F32> sum_gx, int64_t window_h,
                             int64_t window_w, int64_t stride_h, int64_t stride_w,
                             int64_t pad_top, int64_t pad_left) {
  constexpr const char* op = "max pool backward (sums)";
  Stack gs, ss, sxs, ds, ps, ts, xs, hs;
  SPARSEPROP_RETURN_IF_ERROR(decode_stack(g->dimensions(), 4, op, "g", &gs));
  SPARSEPROP_RETURN_IF_ERROR(decode_stack(sum_g->dimensions(), 1, op, "sum_g", &ss));
  SPARSEPROP_RETURN_IF_ERROR(decode_stack(sum_gx->dimensions(), 1, op, "sum_gx", &sxs));
  SPARSEPROP_RETURN_IF_ERROR(check_same_lead(gs, ss, op, "sum_g"));
  SPARSEPROP_RETURN_IF_ERROR(check_same_lead(gs, sxs, op, "sum_gx"));
  SPARSEPROP_RETURN_IF_ERROR(decode_operand(dpool.dimensions(), 4, gs, op, "dpool", &ds));
  SPARSEPROP_RETURN_IF_ERROR(decode_operand(pooled.dimensions(), 4, gs, op, "pooled", &ps));
  SPARSEPROP_RETURN_IF_ERROR(decode_operand(taps.dimensions(), 4, gs, op, "taps", &ts));
  SPARSEPROP_RETURN_IF_ERROR(decode_operand(x.dimensions(), 4, gs, op, "x", &xs));
  SPARSEPROP_RETURN_IF_ERROR(decode_operand(shift.dimensions(), 1, gs, op, "shift", &hs));
  PoolGeometry geo;
  SPARSEPROP_RETURN_IF_ERROR(decode_geometry(
      xs, gs, {window_h, window_w, stride_h, stride_w, pad_top, pad_left}, op, &geo));
  SPARSEPROP_RETURN_IF_ERROR(check_same_dims(ds, gs, op, "dpool shape"));
  SPARSEPROP_RETURN_IF_ERROR(check_same_dims(ps, gs, op, "pooled shape"));
  SPARSEPROP_RETURN_IF_ERROR(check_same_dims(ts, gs, op, "taps shape"));
  SPARSEPROP_RETURN_IF_ERROR(check_size(hs.dims[0], geo.c, op, "shift length"));
  SPARSEPROP_RETURN_IF_ERROR(check_size(ss.dims[0], geo.c, op, "sum_g length"));
  SPARSEPROP_RETURN_IF_ERROR(check_size(sxs.dims[0], geo.c, op, "sum_gx length"));

  const int64_t total = gs.count, n = gs.dims[0], c = geo.c;
  const int64_t image = geo.h * geo.w * c, pooled_image = geo.ho * geo.wo * c;
  // Per image, the sums of its windows (2 x c); added up in image order.
  auto partial = scratch<float>(total * n * 2 * c);
  const Routines& k = active_routines();
  const int parts = parallel_parts(pool, total * n * pooled_image * geo.kh * geo.kw);
  Phase windows;
  for (int64_t v = 0; v < total; ++v)
    for (int64_t i = 0; i < n; ++i) windows.tasks.push_back({v, i, i + 1});
  const float* dp = dpool.typed_data();
  const float* pv = pooled.typed_data();
  const int8_t* tp = taps.typed_data();
  const float* xd = x.typed_data();
  const float* hd = shift.typed_data();
  float* gd = g->typed_data();
  windows.fn = [=, &k](const Task& t) {
    float* sums = partial.get() + (t.slice * n + t.begin) * 2 * c;
    std::fill(sums, sums + 2 * c, 0.0f);
    const int64_t at = t.begin * pooled_image;
    k.pool_grad_sums(geo, dp + slice_offset(ds, t.slice) + at,
                     pv + slice_offset(ps, t.slice) + at, tp + slice_offset(ts, t.slice) + at,
                     xd + slice_offset(xs, t.slice) + t.begin * image,
                     hd + slice_offset(hs, t.slice), 0, geo.ho,
                     gd + t.slice * gs.slice() + at, sums, sums + c);
    return ffi::Error::Success();
  };
  Phase totals;
  for (int64_t v = 0; v < total; ++v) totals.tasks.push_back({v, 0, c});
  float* sg = sum_g->typed_data();
  float* sgx = sum_gx->typed_data();
  totals.fn = [=](const Task& t) {
    const float* sums = partial.get() + t.slice * n * 2 * c;
    for (int64_t ch = 0; ch < c; ++ch) {
      double a = 0.0, b = 0.0;
      for (int64_t i = 0; i < n; ++i) {
        a += sums[i * 2 * c + ch];
        b += sums[i * 2 * c + c + ch];
      }
      sg[t.slice * c + ch] = static_cast<float>(a);
      sgx[t.slice * c + ch] = static_cast<float>(b);
    }
    return ffi::Error::Success();
  };
  std::vector<Phase> phases;
  phases.push_back(std::move(windows));
  phases.push_back(std::move(totals));
  return run_phases(pool, parts, std::move(phases));
}

ffi::Future NormPoolInputGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> g,
                              ffi::Buffer<ffi::S8> taps, ffi::Buffer<ffi::F32> x,
                              ffi::Buffer<ffi::F32> shift, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                              ffi::Buffer<ffi::F32> d, ffi::ResultBuffer<ffi::F32> dx,
                              int64_t window_h, int64_t window_w, int64_t stride_h,
                              int64_t stride_w, int64_t pad_top, int64_t pad_left) {
  constexpr const char* op = "max pool backward (input gradient)";
  Stack dxs, gs, ts, xs, hs, as, bs, cs;
  SPARSEPROP_RETURN_IF_ERROR(decode_stack(dx->dimensions(), 4, op, "dx", &dxs));
  SPARSEPROP_RETURN_IF_ERROR(decode_operand(g.dimensions(), 4, dxs, op, "g", &gs));
  SPARSEPROP_RETURN_IF_ERROR(decode_operand(taps.dimensions(), 4, dxs, op, "taps", &ts));
  SPARSEPROP_RETURN_IF_ERROR(decode_operand(x.dimensions(), 4, dxs, op, "x", &xs));
  SPARSEPROP_RETURN_IF_ERROR(decode_operand(shift.dimensions(), 1, dxs, op, "shift", &hs));
  SPARSEPROP_RETURN_IF_ERROR(decode_operand(a.dimensions(), 1, dxs, op, "a", &as));
  SPARSEPROP_RETURN_IF_ERROR(decode_operand(b.dimensions(), 1, dxs, op, "b", &bs));
  SPARSEPROP_RETURN_IF_ERROR(decode_operand(d.dimensions(), 1, dxs, op, "d", &cs));
  PoolGeometry geo;
  SPARSEPROP_RETURN_IF_ERROR(decode_geometry(
      xs, gs, {window_h, window_w, stride_h, stride_w, pad_top, pad_left}, op, &geo));
  SPARSEPROP_RETURN_IF_ERROR(check_same_dims(dxs, xs, op, "dx shape"));
  SPARSEPROP_RETURN_IF_ERROR(check_same_dims(ts, gs, op, "taps shape"));
  for (const Stack* s : {&hs, &as, &bs, &cs})
    SPARSEPROP_RETURN_IF_ERROR(check_size(s->dims[0], geo.c, op, "coefficient length"));

  const int64_t total = dxs.count, n = dxs.dims[0], c = geo.c;
  const int64_t image = geo.h * geo.w * c, pooled_image = geo.ho * geo.wo * c;
  const int parts = parallel_parts(pool, total * n * image * 4);
  std::vector<Task> tasks;
  for (int64_t v = 0; v < total; ++v)
    for (int64_t i = 0; i < n; ++i)
      split_even(geo.h, v, i, std::max<int64_t>(1, parts / std::max<int64_t>(1, total * n)),
                 &tasks);
  const Routines& k = active_routines();
  const float* gd = g.typed_data();
  const int8_t* tp = taps.typed_data();
  const float* xd = x.typed_data();
  const float *hd = shift.typed_data(), *ad = a.typed_data(), *bd = b.typed_data(),
              *dd = d.typed_data();
  float* out = dx->typed_data();
  return run_phases(pool, parts, {Phase{std::move(tasks), [=, &k](const Task& t) {
    const int64_t img = t.group;
    const float* gi = gd + slice_offset(gs, t.slice) + img * pooled_image;
    const int8_t* ti = tp + slice_offset(ts, t.slice) + img * pooled_image;
    const float* xi = xd + slice_offset(xs, t.slice) + img * image;
    float* oi = out + t.slice * dxs.slice() + img * image;
    for (int64_t row = t.begin; row < t.end; ++row)
      k.pool_input_grad_row(geo, gi, ti, xi, hd + slice_offset(hs, t.slice),
                            ad + slice_offset(as, t.slice),
                            bd + slice_offset(bs, t.slice), dd + slice_offset(cs, t.slice), row,
                            oi);
    return ffi::Error::Success();
  }}});
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(kNormPoolGradSums, Guarded<NormPoolGradSums>::Call,
                              bind<kNormPoolGradSumsSignature>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(kNormPoolInputGrad, Guarded<NormPoolInputGrad>::Call,
                              bind<kNormPoolInputGradSignature>());

}  // namespace sparseprop
