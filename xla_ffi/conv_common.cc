#include "conv_common.h"

#include <string>

namespace sparseprop {
namespace {

// Reads the NHWC input shape and the attributes; checks that the windows fit.
ffi::Error decode_geometry(const Stack& xs, int64_t cout, const ConvAttrs& a, const char* op,
                           ConvGeometry* g) {
  if (a.stride < 1 || a.kh < 1 || a.kw < 1 ||
      std::min({a.pad_top, a.pad_bottom, a.pad_left, a.pad_right}) < 0)
    return invalid(op, "bad attributes (stride, kh, kw >= 1, pads >= 0)");
  *g = {xs.dims[0], xs.dims[1], xs.dims[2], xs.dims[3], cout, a.stride, a.kh, a.kw,
        a.pad_top, a.pad_bottom, a.pad_left, a.pad_right};
  if (g->hp() < a.kh || g->wp() < a.kw)
    return invalid(op, "the kernel is larger than the padded input");
  return ffi::Error::Success();
}

// Error unless an NHWC output-side array (y or dy) has the shape the geometry gives.
ffi::Error check_output_shape(const Stack& s, const ConvGeometry& g, const char* op,
                              const std::string& name) {
  ffi::Error error = check_size(s.dims[0], g.n, op, (name + " batch size").c_str());
  if (error.success()) error = check_size(s.dims[1], g.ho(), op, (name + " height").c_str());
  if (error.success()) error = check_size(s.dims[2], g.wo(), op, (name + " width").c_str());
  return error;
}

}  // namespace

ffi::Error decode_conv_forward(ffi::Span<const int64_t> x_dims,
                               ffi::Span<const int64_t> values_dims,
                               ffi::Buffer<ffi::S32> indptr, ffi::Buffer<ffi::S32> indices,
                               ffi::Span<const int64_t> y_dims, const ConvAttrs& attrs,
                               const char* op, ConvForwardCall* call) {
  ConvForwardCall c;
  ffi::Error error = decode_stack(y_dims, 4, op, "output", &c.ys);
  if (error.success()) error = decode_operand(x_dims, 4, c.ys, op, "x", &c.xs);
  if (error.success()) error = decode_geometry(c.xs, c.ys.dims[3], attrs, op, &c.g);
  if (error.success()) error = check_output_shape(c.ys, c.g, op, "output");
  if (error.success())
    error = decode_operand(values_dims, 1, c.ys, op, "values", &c.vs);
  if (error.success())
    error = decode_pattern(indptr, indices, c.g.cout, c.g.kh * c.g.kw * c.g.cin, c.ys, op,
                           "pattern", &c.pat);
  if (error.success()) error = check_size(c.vs.dims[0], c.pat.nnz, op, "values length");
  if (error.success()) *call = c;
  return error;
}

ffi::Error decode_conv_backward(ffi::Span<const int64_t> x_dims,
                                ffi::Span<const int64_t> dy_dims,
                                ffi::Span<const int64_t> values_dims,
                                ffi::Buffer<ffi::S32> indptr,
                                ffi::Buffer<ffi::S32> indices, ffi::Buffer<ffi::S32> t_indptr,
                                ffi::Buffer<ffi::S32> t_indices, ffi::Buffer<ffi::S32> t_perm,
                                ffi::Span<const int64_t> dx_dims,
                                ffi::Span<const int64_t> dvalues_dims, const ConvAttrs& attrs,
                                const char* op, ConvBackwardCall* call) {
  ConvBackwardCall c;
  ffi::Error error = decode_stack(dx_dims, 4, op, "input gradient", &c.dxs);
  if (error.success()) error = decode_stack(dvalues_dims, 1, op, "weight gradient", &c.dws);
  if (error.success()) error = check_same_lead(c.dxs, c.dws, op, "weight gradient");
  if (error.success()) error = decode_operand(x_dims, 4, c.dxs, op, "x", &c.xs);
  if (error.success()) error = decode_operand(dy_dims, 4, c.dxs, op, "dy", &c.dys);
  if (error.success()) error = decode_geometry(c.xs, c.dys.dims[3], attrs, op, &c.g);
  if (error.success()) error = check_same_dims(c.dxs, c.xs, op, "input gradient shape");
  if (error.success()) error = check_output_shape(c.dys, c.g, op, "dy");
  if (error.success())
    error = decode_operand(values_dims, 1, c.dxs, op, "values", &c.vs);
  if (error.success())
    error = decode_operand(t_perm.dimensions(), 1, c.dxs, op, "transposed permutation", &c.ps);
  const int64_t rows = c.g.kh * c.g.kw * c.g.cin;
  if (error.success())
    error = decode_pattern(indptr, indices, c.g.cout, rows, c.dxs, op, "pattern", &c.pat);
  if (error.success())
    error = decode_pattern(t_indptr, t_indices, rows, c.g.cout, c.dxs, op, "transposed pattern",
                           &c.tpat);
  if (error.success()) error = check_size(c.vs.dims[0], c.pat.nnz, op, "values length");
  if (error.success())
    error = check_size(c.tpat.nnz, c.pat.nnz, op, "transposed pattern length");
  if (error.success())
    error = check_size(c.ps.dims[0], c.pat.nnz, op, "transposed permutation length");
  if (error.success())
    error = check_size(c.dws.dims[0], c.pat.nnz, op, "weight gradient length");
  if (error.success()) *call = c;
  return error;
}

int64_t block_positions(int64_t window, int64_t step, int64_t out) {
  const int64_t budget = int64_t{4} << 20;
  int64_t b = 1;
  while (b < 4096 && window + b * step + (b + 1) * out <= budget) ++b;
  return b;
}

template <typename T>
ffi::Error phase_matrices(const ConvBackwardCall& call, const T* values,
                          ffi::Buffer<ffi::S32> t_perm,
                          const std::function<int64_t(int64_t, int64_t, int64_t)>& dy_offset,
                          const char* op, std::shared_ptr<PhaseMatrices>* out) {
  const Pattern& pat = call.pat;
  const Pattern& tpat = call.tpat;
  const int64_t nnz = tpat.nnz, s = call.g.s, kh = call.g.kh, kw = call.g.kw;
  const int64_t cin = call.g.cin;
  auto phases = std::make_shared<PhaseMatrices>();
  phases->stack = joint({&call.vs, &call.ps, &tpat.indptr_stack, &tpat.indices_stack,
                         &pat.indptr_stack, &pat.indices_stack});
  phases->slices.resize(phases->stack.count);
  for (int64_t i = 0; i < phases->stack.count; ++i) {
    const int64_t v = phases->stack.representative(i);
    const int32_t* perm = t_perm.typed_data() + slice_offset(call.ps, v);
    ffi::Error error = check_transposed_rows(tpat, perm, pat, v, 0, tpat.rows, op);
    if (error.failure()) return error;
    const T* w = values + slice_offset(call.vs, v);
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
                m.values.push_back(as_float(w[perm[p]]));
              }
            }
          m.indptr.push_back(static_cast<int32_t>(m.offsets.size()));
        }
  }
  *out = std::move(phases);
  return ffi::Error::Success();
}

using DyOffset = std::function<int64_t(int64_t, int64_t, int64_t)>;
template ffi::Error phase_matrices<float>(const ConvBackwardCall&, const float*,
                                          ffi::Buffer<ffi::S32>, const DyOffset&, const char*,
                                          std::shared_ptr<PhaseMatrices>*);
template ffi::Error phase_matrices<BFloat16>(const ConvBackwardCall&, const BFloat16*,
                                             ffi::Buffer<ffi::S32>, const DyOffset&,
                                             const char*, std::shared_ptr<PhaseMatrices>*);

std::vector<PhaseRows> phase_rows(const ConvGeometry& g) {
  std::vector<PhaseRows> rows;
  for (int64_t a = 0; a < g.s; ++a)
    for (int64_t b = 0; b < g.s; ++b) {
      const int64_t j0 = ceil_div(g.pt - a, g.s), i0 = ceil_div(g.pl - b, g.s);
      const int64_t n_rows = std::max<int64_t>(0, ceil_div(g.pt + g.h - a, g.s) - j0);
      const int64_t n_cols = std::max<int64_t>(0, ceil_div(g.pl + g.w - b, g.s) - i0);
      if (n_rows > 0 && n_cols > 0) rows.push_back({a, b, j0, n_rows, i0, n_cols});
    }
  return rows;
}

int channel_parts(int parts, int64_t rows, int64_t channels) {
  if (rows == 0) return 1;
  return static_cast<int>(std::max<int64_t>(
      1, std::min<int64_t>(channels, ceil_div(2 * static_cast<int64_t>(parts), rows))));
}

}  // namespace sparseprop
