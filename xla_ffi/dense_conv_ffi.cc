// The forward and the weight gradient of a dense 2-D convolution, channels
// last, on an input the caller has padded:
//   y[n, p, q, o] = sum_{i, j, c} x[n, p * sh + i, q * sw + j, c] * kernel[i, j, c, o]
//   dkernel[i, j, c, o] = sum_{n, p, q} x[n, p * sh + i, q * sw + j, c] * dy[n, p, q, o]
// Each output pixel's patch is kh runs of kw x cin floats in x as it lies, so
// no patch matrix is built (for a 7x7 stem on 3 channels that matrix is 49
// times the input, and building it cost as much as the product).
//
// The forward splits the output pixels over the tasks. In the weight
// gradient, the output pixels are cut into blocks of a size fixed by the shapes; each
// task sums one block into its own partial kernel, and a second phase adds
// the partials in block order. Every sum's order then depends on the shapes
// alone: the result is the same for any number of threads.
#include <algorithm>
#include <memory>
#include <string>
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

// Reads the shapes of the padded input `xs`, the output-side array `ys` (y or
// dy, named `y_name`) and the kernel `ks` (HWIO), and checks that they agree.
ffi::Error decode(const Stack& xs, const Stack& ys, const Stack& ks, int64_t sh, int64_t sw,
                  const char* op, const std::string& y_name, Geometry* g) {
  if (sh < 1 || sw < 1) return invalid(op, "strides must be >= 1");
  *g = {xs.dims[0], xs.dims[1], xs.dims[2], xs.dims[3], ys.dims[1], ys.dims[2], ys.dims[3],
        ks.dims[0], ks.dims[1], sh, sw};
  ffi::Error error = check_size(ks.dims[2], g->cin, op, "kernel input channels");
  if (error.success()) error = check_size(ks.dims[3], g->cout, op, "kernel output channels");
  if (error.success())
    error = check_size(ys.dims[0], g->n, op, (y_name + " batch size").c_str());
  if (error.success() && (g->kh < 1 || g->kw < 1 || g->hp < g->kh || g->wp < g->kw))
    error = invalid(op, "the kernel is empty or larger than the padded input");
  if (error.success())
    error = check_size(g->ho, (g->hp - g->kh) / sh + 1, op, (y_name + " height").c_str());
  if (error.success())
    error = check_size(g->wo, (g->wp - g->kw) / sw + 1, op, (y_name + " width").c_str());
  return error;
}

// Where the patches of output pixels [first, first + count) start in x.
void patch_bases(const Geometry& g, int64_t first, int64_t count, int64_t* base) {
  const int64_t per_image = g.ho * g.wo;
  for (int64_t q = 0; q < count; ++q) {
    const int64_t pixel = first + q, image = pixel / per_image;
    const int64_t row = pixel % per_image / g.wo, col = pixel % g.wo;
    base[q] = ((image * g.hp + row * g.sh) * g.wp + col * g.sw) * g.cin;
  }
}

ffi::Future DenseConvForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                             ffi::Buffer<ffi::F32> kernel, ffi::ResultBuffer<ffi::F32> y,
                             int64_t stride_h, int64_t stride_w) {
  constexpr const char* op = "conv_general_dilated forward";
  Stack ys, xs, ks;
  SPARSEPROP_RETURN_IF_ERROR(decode_stack(y->dimensions(), 4, op, "output", &ys));
  SPARSEPROP_RETURN_IF_ERROR(decode_operand(x.dimensions(), 4, ys, op, "x", &xs));
  SPARSEPROP_RETURN_IF_ERROR(decode_operand(kernel.dimensions(), 4, ys, op, "kernel", &ks));
  Geometry g;
  SPARSEPROP_RETURN_IF_ERROR(decode(xs, ys, ks, stride_h, stride_w, op, "output", &g));
  const int64_t total = ys.count, pixels = g.pixels();
  const int parts = parallel_parts(pool, total * pixels * g.kernel());
  std::vector<Task> tasks;
  for (int64_t v = 0; v < total; ++v) split_even(pixels, v, 0, parts, &tasks);
  const Routines& k = active_routines();
  const float* xd = x.typed_data();
  const float* kd = kernel.typed_data();
  float* out = y->typed_data();
  return run_phases(pool, parts, {Phase{std::move(tasks), [=, &k](const Task& t) {
    const float* xv = xd + slice_offset(xs, t.slice);
    const float* kv = kd + slice_offset(ks, t.slice);
    float* yv = out + t.slice * ys.slice();
    int64_t base[kMaxChunkPixels];
    for (int64_t first = t.begin; first < t.end; first += kMaxChunkPixels) {
      const int64_t count = std::min(kMaxChunkPixels, t.end - first);
      patch_bases(g, first, count, base);
      k.patch_conv(xv, base, count, g.kh, g.wp * g.cin, g.kw * g.cin, kv, g.cout,
                   yv + first * g.cout);
    }
    return ffi::Error::Success();
  }}});
}

// Entries [e_begin, e_end) of the kernel (rows of the [kh * kw * cin, cout]
// matrix) summed over the pixels [begin, end) of the n x ho x wo output
// pixels into dw, which they overwrite.
void block_product(const Routines& k, const Geometry& g, const float* x, const float* dy,
                   int64_t begin, int64_t end, int64_t e_begin, int64_t e_end, float* dw) {
  std::fill(dw + e_begin * g.cout, dw + e_end * g.cout, 0.0f);
  const int64_t seg = g.kw * g.cin, ld_seg = g.wp * g.cin;
  const int64_t chunk = std::clamp<int64_t>(kChunkFloats / g.cout, 1, kMaxChunkPixels);
  int64_t base[kMaxChunkPixels];
  for (int64_t first = begin; first < end; first += chunk) {
    const int64_t count = std::min(chunk, end - first);
    patch_bases(g, first, count, base);
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
  SPARSEPROP_RETURN_IF_ERROR(decode(xs, dys, dws, stride_h, stride_w, op, "dy", &g));

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

XLA_FFI_DEFINE_HANDLER_SYMBOL(kDenseConvForward, Guarded<DenseConvForward>::Call,
                              bind<kDenseConvForwardSignature>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(kDenseConvWeightGrad, Guarded<DenseConvWeightGrad>::Call,
                              bind<kDenseConvWeightGradSignature>());

}  // namespace sparseprop
