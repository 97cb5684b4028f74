// The weight gradient of a dense 2-D convolution, channels last:
//   dkernel[i, j, c, o] = sum_{n, p, q} x[n, p * sh + i, q * sw + j, c] * dy[n, p, q, o]
// on an input the caller has padded. Each output pixel's patch is kh runs of
// kw x cin floats in x as it lies, so no patch matrix is built (for a 7x7
// stem on 3 channels that matrix is 49 times the input, and building it cost
// as much as the product).
//
// The output pixels are cut into blocks of a size fixed by the shapes; each
// task sums one block into its own partial kernel, and a second phase adds
// the partials in block order. Every sum's order then depends on the shapes
// alone: the result is the same for any number of threads.
#include <algorithm>
#include <memory>
#include <vector>

#include "dense_conv_ffi.h"
#include "ffi_common.h"
#include "simd_dispatch.h"

namespace sparseprop {
namespace {

// Output pixels per block, at least: enough multiply-adds per partial kernel
// that adding up the partials costs little beside them.
constexpr int64_t kBlockPixels = 1024;
// Partial kernels in scratch, at most (in floats); past it the blocks grow.
constexpr int64_t kMaxPartialFloats = int64_t{16} << 20;
// The output gradient of the pixels taken at a time (floats): it is read
// once per 3 kernel entries, so it should stay in L1/L2.
constexpr int64_t kChunkFloats = 16384;
constexpr int64_t kMaxChunkPixels = 256;

struct Geometry {
  int64_t n, hp, wp, cin, ho, wo, cout, kh, kw, sh, sw;
  int64_t pixels() const { return n * ho * wo; }
  int64_t kernel() const { return kh * kw * cin * cout; }
};

ffi::Error decode(const Stack& xs, const Stack& dys, const Stack& dws, int64_t sh, int64_t sw,
                  const char* op, Geometry* g) {
  if (sh < 1 || sw < 1) return invalid(op, "strides must be >= 1");
  *g = {xs.dims[0], xs.dims[1], xs.dims[2], xs.dims[3], dys.dims[1], dys.dims[2], dys.dims[3],
        dws.dims[0], dws.dims[1], sh, sw};
  ffi::Error error = check_size(dws.dims[2], g->cin, op, "kernel input channels");
  if (error.success()) error = check_size(dws.dims[3], g->cout, op, "kernel output channels");
  if (error.success()) error = check_size(dys.dims[0], g->n, op, "dy batch size");
  if (error.success() && (g->kh < 1 || g->kw < 1 || g->hp < g->kh || g->wp < g->kw))
    error = invalid(op, "the kernel is empty or larger than the padded input");
  if (error.success())
    error = check_size(g->ho, (g->hp - g->kh) / sh + 1, op, "dy height");
  if (error.success())
    error = check_size(g->wo, (g->wp - g->kw) / sw + 1, op, "dy width");
  return error;
}

// Entries [e_begin, e_end) of the kernel (rows of the [kh * kw * cin, cout]
// matrix) summed over the pixels [begin, end) of the n x ho x wo output
// pixels into dw, which they overwrite.
void block_product(const Routines& k, const Geometry& g, const float* x, const float* dy,
                   int64_t begin, int64_t end, int64_t e_begin, int64_t e_end, float* dw) {
  std::fill(dw + e_begin * g.cout, dw + e_end * g.cout, 0.0f);
  const int64_t seg = g.kw * g.cin, ld_seg = g.wp * g.cin, per_image = g.ho * g.wo;
  const int64_t chunk = std::clamp<int64_t>(kChunkFloats / g.cout, 1, kMaxChunkPixels);
  int64_t base[kMaxChunkPixels];
  for (int64_t first = begin; first < end; first += chunk) {
    const int64_t count = std::min(chunk, end - first);
    for (int64_t q = 0; q < count; ++q) {
      const int64_t pixel = first + q, image = pixel / per_image;
      const int64_t row = pixel % per_image / g.wo, col = pixel % g.wo;
      base[q] = ((image * g.hp + row * g.sh) * g.wp + col * g.sw) * g.cin;
    }
    // The entries of the range, a kernel row (segment) at a time.
    for (int64_t e = e_begin; e < e_end;) {
      const int64_t i = e / seg, r = e % seg, stop = std::min(e_end, (i + 1) * seg);
      k.patch_weight_grad(x + i * ld_seg + r, base, count, 1, ld_seg, stop - e,
                          dy + first * g.cout, g.cout, dw + e * g.cout);
      e = stop;
    }
  }
}

ffi::Future DenseConvWeightGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dkernel,
                                int64_t stride_h, int64_t stride_w) {
  constexpr const char* op = "conv_general_dilated weight gradient";
  Stack dws, xs, dys;
  SPARSEPROP_RETURN_IF_ERROR(decode_stack(dkernel->dimensions(), 4, op, "kernel gradient", &dws));
  SPARSEPROP_RETURN_IF_ERROR(decode_operand(x.dimensions(), 4, dws, op, "x", &xs));
  SPARSEPROP_RETURN_IF_ERROR(decode_operand(dy.dimensions(), 4, dws, op, "dy", &dys));
  Geometry g;
  SPARSEPROP_RETURN_IF_ERROR(decode(xs, dys, dws, stride_h, stride_w, op, &g));

  const int64_t total = dws.count, pixels = g.pixels(), kernel = g.kernel();
  float* out = dkernel->typed_data();
  if (pixels == 0 || kernel == 0) {  // an empty sum
    return run_tasks(pool, {{0, 0, total * kernel}}, [=](const Task& t) {
      std::fill(out + t.begin, out + t.end, 0.0f);
      return ffi::Error::Success();
    });
  }
  // Blocks of at least kBlockPixels, as many as the partials' budget allows;
  // each block's kernel entries split over tasks where the blocks are fewer
  // than the parts (a small image with many channels).
  const int64_t most =
      std::max<int64_t>(1, kMaxPartialFloats / std::max<int64_t>(1, total * kernel));
  const int64_t blocks = std::max<int64_t>(1, std::min(most, pixels / kBlockPixels));
  const int parts = parallel_parts(pool, total * pixels * kernel);
  const int64_t entries = g.kh * g.kw * g.cin;
  const int64_t entry_parts = std::clamp<int64_t>(parts / (total * blocks), 1, entries);
  // A single block is the result itself.
  std::shared_ptr<float[]> partials;
  if (blocks > 1) partials = scratch<float>(total * blocks * kernel);
  float* sums_of = blocks > 1 ? partials.get() : out;
  const Routines& k = active_routines();
  const float* xd = x.typed_data();
  const float* dyd = dy.typed_data();

  Phase products;
  for (int64_t v = 0; v < total; ++v)
    for (int64_t b = 0; b < blocks; ++b) split_even(entries, v, b, entry_parts, &products.tasks);
  products.fn = [=, &k](const Task& t) {
    const int64_t b = t.group;
    block_product(k, g, xd + slice_offset(xs, t.slice), dyd + slice_offset(dys, t.slice),
                  pixels * b / blocks, pixels * (b + 1) / blocks, t.begin, t.end,
                  sums_of + (t.slice * blocks + b) * kernel);
    return ffi::Error::Success();
  };
  std::vector<Phase> phases;
  phases.push_back(std::move(products));
  if (blocks > 1) {
    Phase sums;
    for (int64_t v = 0; v < total; ++v) split_even(kernel, v, 0, parts, &sums.tasks);
    sums.fn = [=](const Task& t) {
      float* dst = out + t.slice * kernel;
      const float* src = partials.get() + t.slice * blocks * kernel;
      std::copy(src + t.begin, src + t.end, dst + t.begin);
      for (int64_t b = 1; b < blocks; ++b)
        for (int64_t e = t.begin; e < t.end; ++e) dst[e] += src[b * kernel + e];
      return ffi::Error::Success();
    };
    phases.push_back(std::move(sums));
  }
  return run_phases(pool, parts, std::move(phases));
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(kDenseConvWeightGrad, Guarded<DenseConvWeightGrad>::Call,
                              bind<kDenseConvWeightGradSignature>());

}  // namespace sparseprop
