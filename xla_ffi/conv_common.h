// What the two sparse convolution variants share: the geometry of a call,
// the decoding of its operands, the taps of the pattern's entries, the
// blocked weight gradient, and the stride-phase sub-kernels of the input
// gradient.
//
// Both variants take the caller's NHWC activations and lay them out
// themselves, in the same parallel run as the products, rather than leaving
// pads and transposes to XLA: each of those is one more pass over megabytes
// of activations and one more buffer whose fresh pages the OS must fault in,
// which at high sparsity cost more than the products. Each variant's layout
// lives in its own file (conv_batch_ffi.cc, conv_width_ffi.cc).
//
// The pattern is that of the HWIO kernel flattened to (kh * kw * cin, cout):
// one compressed row per output channel, entry index (ky * kw + kx) * cin + ci.
//
// The input gradient is split into s x s stride phases: the input positions
// (j * s + a, i * s + b) receive only taps ky = a (mod s), kx = b (mod s), so
// each phase is a stride-1 sparse correlation of the padded output gradient
// with a sub-kernel, and no work is spent on zeros.
#pragma once

#include <algorithm>
#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "ffi_common.h"
#include "pattern.h"
#include "routines.h"

namespace sparseprop {

inline int64_t ceil_div(int64_t a, int64_t b) { return a <= 0 ? 0 : (a + b - 1) / b; }

// The geometry of one call: the NHWC input, the kernel, stride and pads.
struct ConvGeometry {
  int64_t n, h, w, cin, cout, s, kh, kw, pt, pb, pl, pr;
  int64_t hp() const { return h + pt + pb; }
  int64_t wp() const { return w + pl + pr; }
  int64_t ho() const { return (hp() - kh) / s + 1; }
  int64_t wo() const { return (wp() - kw) / s + 1; }
  // Columns per stride phase of the padded input: enough for every window.
  int64_t wq() const { return ceil_div(wp(), s); }
  // The padded output gradient the input gradient reads: P rows and Q
  // columns of zeros on top and left, enough below and right for every
  // phase's windows.
  int64_t P() const { return ceil_div(kh, s) - 1; }
  int64_t Q() const { return ceil_div(kw, s) - 1; }
  int64_t hd() const { return std::max(ho(), ceil_div(hp(), s)) + P(); }
  int64_t wd() const { return std::max(wo(), wq()) + Q(); }
};

// The decoded operands of a forward call: x (NHWC) and the pattern's values
// -> y (NHWC).
struct ConvForwardCall {
  Stack ys, xs, vs;
  ConvGeometry g;
  Pattern pat;
};

// The decoded operands of a backward call: x, dy (NHWC), the values and
// both patterns -> dx (NHWC), dvalues.
struct ConvBackwardCall {
  Stack dxs, dws, xs, dys, vs, ps;
  ConvGeometry g;
  Pattern pat, tpat;
};

// The attributes of both variants' calls.
struct ConvAttrs {
  int64_t stride, kh, kw, pad_top, pad_bottom, pad_left, pad_right;
};

// (The floating operands are read only for their dims: the dtype is the
// handler's.)
ffi::Error decode_conv_forward(ffi::Span<const int64_t> x_dims,
                               ffi::Span<const int64_t> values_dims,
                               ffi::Buffer<ffi::S32> indptr, ffi::Buffer<ffi::S32> indices,
                               ffi::Span<const int64_t> y_dims, const ConvAttrs& attrs,
                               const char* op, ConvForwardCall* call);

ffi::Error decode_conv_backward(ffi::Span<const int64_t> x_dims,
                                ffi::Span<const int64_t> dy_dims,
                                ffi::Span<const int64_t> values_dims,
                                ffi::Buffer<ffi::S32> indptr,
                                ffi::Buffer<ffi::S32> indices, ffi::Buffer<ffi::S32> t_indptr,
                                ffi::Buffer<ffi::S32> t_indices, ffi::Buffer<ffi::S32> t_perm,
                                ffi::Span<const int64_t> dx_dims,
                                ffi::Span<const int64_t> dvalues_dims, const ConvAttrs& attrs,
                                const char* op, ConvBackwardCall* call);

// The tap of entry column index r = (ky * kw + kx) * cin + ci.
struct Tap {
  int64_t ky, kx, ci;
};
inline Tap tap_of(int32_t r, int64_t cin, int64_t kw) {
  const int64_t k = r / cin;
  return {k / kw, k % kw, r % cin};
}

// Grid, run length and entry offsets of a weight gradient: output position
// q reads the window at its strided origin.
struct WindowPlan {
  Grid grid;
  int64_t ld_row, length;
  // Positions the weight gradient sums per block (weight_gradient_blocks).
  int64_t block;
};

// Positions per weight-gradient block: as many as keep the dense operands
// the block reads within a budget, given the first position's input window
// (`window` bytes), `step` more input bytes per further position and `out`
// output-side bytes per position. The budget is the last-level cache's share
// of a core (4 MiB): with all positions at once, the windows stream from
// memory once per row of the pattern.
int64_t block_positions(int64_t window, int64_t step, int64_t out);

// The weight gradient of rows [row_begin, row_end) in blocks of plan.block
// grid positions: every row sums one block before the next block starts, so
// the block's windows stay in cache across rows (walking all positions per
// entry would stream the whole image from memory once per nonzero). The
// blocks depend only on the geometry, so results are deterministic.
// (Float sums of operands stored as T.)
template <typename T>
void weight_gradient_blocks(const RoutinesFor<T>& k, const int32_t* indptr,
                            const int64_t* offsets, const T* rows, const T* in,
                            float* out_values, const WindowPlan& plan, int64_t row_begin,
                            int64_t row_end) {
  const int64_t positions = plan.grid.size();
  int64_t q0 = 0;
  do {  // at least once: with no positions, the sums are written as zeros
    const int64_t q1 = std::min(positions, q0 + plan.block);
    k.sddmm(indptr, offsets, rows, plan.ld_row, in, out_values, plan.length, plan.grid, q0, q1,
            row_begin, row_end, q0 > 0);
    q0 = q1;
  } while (q0 < positions);
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

// The phase sub-kernels for every distinct slice of the transposed pattern
// with t_perm and the values, each slice first checked against the pattern
// (check_transposed_rows); dy_offset(t, u, co) is the offset of
// output-gradient channel co at tap (t, u) of a phase. The values (stored as
// T: float or BFloat16) are widened to float.
template <typename T>
ffi::Error phase_matrices(const ConvBackwardCall& call, const T* values,
                          ffi::Buffer<ffi::S32> t_perm,
                          const std::function<int64_t(int64_t, int64_t, int64_t)>& dy_offset,
                          const char* op, std::shared_ptr<PhaseMatrices>* out);

// The positions of the input gradient inside the image, per stride phase
// (a, b): input rows j * s + a (j in [j0, j0 + rows)) and columns i * s + b
// (i in [i0, i0 + cols)).
struct PhaseRows {
  int64_t a, b, j0, rows, i0, cols;
};
std::vector<PhaseRows> phase_rows(const ConvGeometry& g);

// Channel ranges per output row: enough tasks for every worker even when an
// image has few rows (a 7 x 7 output).
int channel_parts(int parts, int64_t rows, int64_t channels);

}  // namespace sparseprop
