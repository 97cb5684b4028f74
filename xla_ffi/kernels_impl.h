// The kernel templates, written once over a vector of SPARSEPROP_SIMD_WIDTH
// floats (GCC/Clang vector extensions). Each kernels_<isa>.cc includes this
// file inside its own namespace and compiles it with its own target flags, so
// no symbol built for one instruction set can be linked into another's path.
// The width-1 instantiation is the scalar reference path.
//
// Include only from within a namespace, after defining SPARSEPROP_SIMD_WIDTH.

constexpr int kWidth = SPARSEPROP_SIMD_WIDTH;
// Batch columns held in registers per pass: four independent accumulators hide
// the multiply-add latency.
constexpr int kTile = 4 * kWidth;

#if SPARSEPROP_SIMD_WIDTH > 1
typedef float vfloat __attribute__((vector_size(4 * SPARSEPROP_SIMD_WIDTH)));
#else
typedef float vfloat;
#endif

static inline vfloat load(const float* p) {
  vfloat v;
  __builtin_memcpy(&v, p, sizeof v);  // unaligned load
  return v;
}

static inline void store(float* p, vfloat v) { __builtin_memcpy(p, &v, sizeof v); }

static inline vfloat broadcast(float s) {
  vfloat v = {};
  return v + s;
}

static inline float horizontal_sum(vfloat v) {
#if SPARSEPROP_SIMD_WIDTH > 1
  float s = 0.0f;
  for (int i = 0; i < kWidth; ++i) s += v[i];
  return s;
#else
  return v;
#endif
}

static void spmm_rows(const int32_t* indptr, const int32_t* indices,
                      const float* values, const float* dense,
                      int64_t ld_dense, float* out, int64_t ld_out,
                      int64_t batch, int64_t row_begin, int64_t row_end) {
  for (int64_t r = row_begin; r < row_end; ++r) {
    const int64_t lo = indptr[r], hi = indptr[r + 1];
    float* o = out + r * ld_out;
    int64_t b = 0;
    // Full tiles: the output tile stays in registers across the whole row.
    for (; b + kTile <= batch; b += kTile) {
      vfloat a0 = {}, a1 = {}, a2 = {}, a3 = {};
      for (int64_t p = lo; p < hi; ++p) {
        const float* d = dense + indices[p] * ld_dense + b;
        const vfloat w = broadcast(values[p]);
        a0 += w * load(d);
        a1 += w * load(d + kWidth);
        a2 += w * load(d + 2 * kWidth);
        a3 += w * load(d + 3 * kWidth);
      }
      store(o + b, a0);
      store(o + b + kWidth, a1);
      store(o + b + 2 * kWidth, a2);
      store(o + b + 3 * kWidth, a3);
    }
    for (; b + kWidth <= batch; b += kWidth) {
      vfloat a = {};
      for (int64_t p = lo; p < hi; ++p)
        a += broadcast(values[p]) * load(dense + indices[p] * ld_dense + b);
      store(o + b, a);
    }
    for (; b < batch; ++b) {
      float a = 0.0f;
      for (int64_t p = lo; p < hi; ++p)
        a += values[p] * dense[indices[p] * ld_dense + b];
      o[b] = a;
    }
  }
}

static void sddmm_rows(const int32_t* indptr, const int32_t* indices,
                       const float* row_operand, int64_t ld_row,
                       const float* col_operand, int64_t ld_col,
                       float* out_values, int64_t batch, int64_t row_begin,
                       int64_t row_end) {
  for (int64_t r = row_begin; r < row_end; ++r) {
    const float* g = row_operand + r * ld_row;
    for (int64_t p = indptr[r], hi = indptr[r + 1]; p < hi; ++p) {
      const float* x = col_operand + indices[p] * ld_col;
      vfloat a0 = {}, a1 = {}, a2 = {}, a3 = {};
      int64_t b = 0;
      for (; b + kTile <= batch; b += kTile) {
        a0 += load(g + b) * load(x + b);
        a1 += load(g + b + kWidth) * load(x + b + kWidth);
        a2 += load(g + b + 2 * kWidth) * load(x + b + 2 * kWidth);
        a3 += load(g + b + 3 * kWidth) * load(x + b + 3 * kWidth);
      }
      for (; b + kWidth <= batch; b += kWidth) a0 += load(g + b) * load(x + b);
      float s = horizontal_sum((a0 + a1) + (a2 + a3));
      for (; b < batch; ++b) s += g[b] * x[b];
      out_values[p] = s;
    }
  }
}

const KernelTable kKernels = {&spmm_rows, &sddmm_rows};
