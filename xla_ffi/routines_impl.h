// The routine templates, written once over a vector of Isa::kWidth floats
// (GCC/Clang vector extensions). Each routines_<isa>.cc defines its
// instruction set's record `Isa`, then includes this file inside its own
// namespace and compiles it with its own target flags, so no symbol built for
// one instruction set can be linked into another's path. Every choice that
// depends on the instruction set is read from `Isa`, never inferred from the
// width; routines_avx2.cc lists the members a record must have and what each
// means. The width-1 instantiation is the scalar reference path.
//
// Include only from within a namespace, after defining `Isa`.

constexpr int kWidth = Isa::kWidth;
// At most this many vectors of a run are held in registers at once by the
// products (Isa::kRunVectors: one accumulator each, enough independent
// multiply-adds to hide their latency).
constexpr int kMaxVectors = Isa::kRunVectors;
// The same bound for the one-pass backward, which also holds the run of x in
// registers beside its accumulators.
constexpr int kMaxBackwardVectors = 4;

// A vector of W floats; for W = 1 a plain float (the scalar path).
template <int W>
struct VectorOf {
  typedef float type __attribute__((vector_size(4 * W)));
};
template <>
struct VectorOf<1> {
  typedef float type;
};
typedef VectorOf<kWidth>::type vfloat;

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

// kWidth bfloat16, widened to floats in registers (exact: a bfloat16 is the
// upper half of the float with the same bits). How is the instruction
// set's (Isa::widen): GCC's generic vector conversion splits it into halves.
static inline vfloat load(const BFloat16* p) { return Isa::template widen<vfloat>(p); }

// Entries ahead whose operand run is prefetched: the runs sit at scattered
// rows (one per nonzero), which the hardware prefetchers cannot predict.
constexpr int64_t kPrefetchDistance = 8;

// Prefetches the first cache line of a run. Only the first: the loop is bound
// by its loads, and a prefetch of every line of the run spent a load slot on
// each: the first line alone measured faster, and distances 4 and 16 the
// same as 8 (see benchmarks/results/NOTES.md).
template <typename In>
static inline void prefetch_run(const In* p) { __builtin_prefetch(p); }

// Where entry p's run starts in the dense operand: a precomputed offset
// (convolutions: a shifted window) or its index times a stride (the linear
// layer: computed on the fly, which spares an 8-byte-per-entry table that
// would cost more memory traffic than the multiply).
struct TableOffset {
  const int64_t* offsets;
  int64_t operator()(int64_t p) const { return offsets[p]; }
};
struct ScaledIndex {
  const int32_t* indices;
  int64_t stride;
  int64_t operator()(int64_t p) const { return static_cast<int64_t>(indices[p]) * stride; }
};

// out[0 : V * kWidth] = sum_p values[p] * in[offset(p) + (0 : V * kWidth)],
// the output held in V registers across the whole row.
template <int V, typename Offset, typename In>
static inline void spmm_tile(int64_t lo, int64_t hi, Offset offset, const float* values,
                             const In* in, float* out) {
  vfloat acc[V];
  for (int v = 0; v < V; ++v) acc[v] = vfloat{};
  for (int64_t p = lo; p < hi; ++p) {
    if (p + kPrefetchDistance < hi) prefetch_run(in + offset(p + kPrefetchDistance));
    const In* src = in + offset(p);
    const vfloat w = broadcast(values[p]);
    for (int v = 0; v < V; ++v) acc[v] += w * load(src + v * kWidth);
  }
  for (int v = 0; v < V; ++v) store(out + v * kWidth, acc[v]);
}

// Cuts a run of `length` floats into chunks of M vectors, then (M being 8)
// one of 4, then one of 3, 2 or 1 for what is left, calling
// chunk(std::integral_constant<int, V>{}, l) for the chunk of V vectors at l,
// in order. Returns where the last length % kWidth lanes start, which the
// caller finishes one by one.
template <int M = kMaxVectors, typename Chunk>
static inline int64_t in_vector_chunks(int64_t length, Chunk&& chunk) {
  static_assert(M == 4 || M == 8, "runs are cut into chunks of 4 or 8 vectors");
  int64_t l = 0;
  for (; l + M * kWidth <= length; l += M * kWidth) chunk(std::integral_constant<int, M>{}, l);
  if constexpr (M == 8) {
    if (l + 4 * kWidth <= length) {
      chunk(std::integral_constant<int, 4>{}, l);
      l += 4 * kWidth;
    }
  }
  switch ((length - l) / kWidth) {
    case 3: chunk(std::integral_constant<int, 3>{}, l); return l + 3 * kWidth;
    case 2: chunk(std::integral_constant<int, 2>{}, l); return l + 2 * kWidth;
    case 1: chunk(std::integral_constant<int, 1>{}, l); return l + kWidth;
    default: return l;
  }
}

// One sparse row times its runs, for a run of `length` floats.
template <typename Offset, typename In>
static inline void spmm_row(int64_t lo, int64_t hi, Offset offset, const float* values,
                            const In* in, float* out, int64_t length) {
  int64_t l = in_vector_chunks(length, [&](auto vectors, int64_t at) {
    spmm_tile<decltype(vectors)::value>(lo, hi, offset, values, in + at, out + at);
  });
  for (; l < length; ++l) {
    float a = 0.0f;
    for (int64_t p = lo; p < hi; ++p) a += values[p] * as_float(in[offset(p) + l]);
    out[l] = a;
  }
}

// Accumulator registers a position block fills: P positions x V vectors <=
// kBlockRegisters. A short run (the width variant's output rows: 7 or 14
// floats fit one AVX-512 vector) gives one row only V independent sums, too
// few to hide the multiply-add latency; P grid positions share the row's
// entries instead (same values and offsets, windows at different origins),
// which also loads each entry's value and offset once for all P.
constexpr int kBlockRegisters = 8;

// out[i][0 : V * kWidth] = sum_p values[p] * in[i][offset(p) + (0 : V * kWidth)]
// for P positions i at once.
template <int V, int P, typename Offset, typename In>
static inline void spmm_tile_positions(int64_t lo, int64_t hi, Offset offset,
                                       const float* values, const In* const* in,
                                       float* const* out, int64_t l) {
  vfloat acc[P][V];
  for (int i = 0; i < P; ++i)
    for (int v = 0; v < V; ++v) acc[i][v] = vfloat{};
  for (int64_t p = lo; p < hi; ++p) {
    const int64_t o = offset(p) + l;
    const vfloat w = broadcast(values[p]);
    for (int i = 0; i < P; ++i)
      for (int v = 0; v < V; ++v) acc[i][v] += w * load(in[i] + o + v * kWidth);
  }
  for (int i = 0; i < P; ++i)
    for (int v = 0; v < V; ++v) store(out[i] + l + v * kWidth, acc[i][v]);
}

// One sparse row for P positions: runs of `length` floats in chunks of at
// most kBlockRegisters / P vectors (4 at most), then the last lanes one by one.
template <int P, typename Offset, typename In>
static inline void spmm_row_positions(int64_t lo, int64_t hi, Offset offset,
                                      const float* values, const In* const* in,
                                      float* const* out, int64_t length) {
  constexpr int chunk = kBlockRegisters / P < kMaxVectors ? kBlockRegisters / P : kMaxVectors;
  int64_t l = 0;
  for (; l + chunk * kWidth <= length; l += chunk * kWidth)
    spmm_tile_positions<chunk, P>(lo, hi, offset, values, in, out, l);
  const int64_t rest = (length - l) / kWidth;
  if (rest >= 2 && chunk > 2) {
    spmm_tile_positions<2, P>(lo, hi, offset, values, in, out, l);
    l += 2 * kWidth;
  }
  if (rest % 2 == 1 && chunk > 1) {
    spmm_tile_positions<1, P>(lo, hi, offset, values, in, out, l);
    l += kWidth;
  }
  for (; l < length; ++l)
    for (int i = 0; i < P; ++i) {
      float a = 0.0f;
      for (int64_t p = lo; p < hi; ++p) a += values[p] * as_float(in[i][offset(p) + l]);
      out[i][l] = a;
    }
}

// Grid positions [q_begin, q_end) in blocks of P (then of P / 2, ... for the
// last few), every row of the range for each block.
template <int P, typename Offset, typename In>
static void spmm_position_blocks(const int32_t* indptr, Offset offset, const float* values,
                                 const In* in, float* out, int64_t ld_row, int64_t length,
                                 const Grid& grid, int64_t q_begin, int64_t q_end,
                                 int64_t row_begin, int64_t row_end) {
  int64_t q = q_begin;
  for (; q + P <= q_end; q += P) {
    const In* in_q[P];
    float* out_q[P];
    for (int i = 0; i < P; ++i) {
      const int64_t gi = (q + i) / grid.n_inner, gj = (q + i) % grid.n_inner;
      in_q[i] = in + gi * grid.in_outer + gj * grid.in_inner;
      out_q[i] = out + gi * grid.out_outer + gj * grid.out_inner;
    }
    for (int64_t r = row_begin; r < row_end; ++r) {
      float* out_r[P];
      for (int i = 0; i < P; ++i) out_r[i] = out_q[i] + r * ld_row;
      if constexpr (P == 1)
        spmm_row(indptr[r], indptr[r + 1], offset, values, in_q[0], out_r[0], length);
      else
        spmm_row_positions<P>(indptr[r], indptr[r + 1], offset, values, in_q, out_r, length);
    }
  }
  if constexpr (P > 1)
    spmm_position_blocks<P / 2>(indptr, offset, values, in, out, ld_row, length, grid, q, q_end,
                                row_begin, row_end);
}

// Positions per block for runs of `length` floats: as many as fill
// kBlockRegisters accumulators with the run's vectors (at most kMaxVectors).
static inline int register_block_positions(int64_t length) {
  const int64_t vectors = (length + kWidth - 1) / kWidth;
  return vectors <= 1 ? 8 : vectors == 2 ? 4 : vectors <= 4 ? 2 : 1;
}

template <typename Offset, typename In>
static void spmm_rows(const int32_t* indptr, Offset offset, const float* values, const In* in,
                      float* out, int64_t ld_row, int64_t length, const Grid& grid,
                      int64_t q_begin, int64_t q_end, int64_t row_begin, int64_t row_end) {
  switch (register_block_positions(length)) {
    case 8:
      spmm_position_blocks<8>(indptr, offset, values, in, out, ld_row, length, grid, q_begin,
                              q_end, row_begin, row_end);
      break;
    case 4:
      spmm_position_blocks<4>(indptr, offset, values, in, out, ld_row, length, grid, q_begin,
                              q_end, row_begin, row_end);
      break;
    case 2:
      spmm_position_blocks<2>(indptr, offset, values, in, out, ld_row, length, grid, q_begin,
                              q_end, row_begin, row_end);
      break;
    default:
      spmm_position_blocks<1>(indptr, offset, values, in, out, ld_row, length, grid, q_begin,
                              q_end, row_begin, row_end);
  }
}

template <typename In>
static void spmm(const int32_t* indptr, const int64_t* offsets, const float* values,
                 const In* in, float* out, int64_t ld_row, int64_t length,
                 const Grid& grid, int64_t q_begin, int64_t q_end, int64_t row_begin,
                 int64_t row_end) {
  spmm_rows(indptr, TableOffset{offsets}, values, in, out, ld_row, length, grid, q_begin, q_end,
            row_begin, row_end);
}

template <typename In>
static void spmm_indexed(const int32_t* indptr, const int32_t* indices, const float* values,
                         const In* in, int64_t ld_in, float* out, int64_t ld_row,
                         int64_t length, int64_t row_begin, int64_t row_end) {
  const ScaledIndex offset{indices, ld_in};
  for (int64_t r = row_begin; r < row_end; ++r)
    spmm_row(indptr[r], indptr[r + 1], offset, values, in, out + r * ld_row, length);
}

// acc[e] += g[0 : length] * x[e][0 : length] lane-wise for e < G; the last
// length % kWidth products go to tail[e]. `kWholeVectors`: the caller knows
// that length is a multiple of kWidth, so there is no tail to handle.
// bfloat16 runs, where the instruction set multiplies bfloat16 pairs
// (I::kPairedBf16Dot), go 2 * kWidth elements at a time: lane i of acc[e]
// adds the products of elements 2i and 2i + 1, so each lane sums other
// elements than when widened, but the lanes together sum them all.
template <int G, bool kWholeVectors = false, typename In, typename I = Isa>
static inline void sddmm_group(const In* g, const In* const* x, int64_t length,
                               vfloat* acc, float* tail) {
  int64_t l = 0;
  if constexpr (std::is_same_v<In, BFloat16> && I::kPairedBf16Dot) {
    for (; l + 2 * kWidth <= length; l += 2 * kWidth) {
      const auto gp = I::load_pairs(g + l);
      for (int e = 0; e < G; ++e) acc[e] = I::dot_pairs(acc[e], gp, I::load_pairs(x[e] + l));
    }
  }
  for (; l + kWidth <= length; l += kWidth) {
    const vfloat gv = load(g + l);
    for (int e = 0; e < G; ++e) acc[e] += gv * load(x[e] + l);
  }
  if constexpr (!kWholeVectors)
    for (; l < length; ++l)
      for (int e = 0; e < G; ++e) tail[e] += as_float(g[l]) * as_float(x[e][l]);
}

// Lane i of the concatenation (x, y) of two vectors of `width` lanes that
// one halving step of transpose_sum reads: the half of the result from x (or
// y) holds the even (or, with `odd`, the odd) blocks of S lanes of x (of y),
// in order. (Vectors only; the scalar path has no lanes to fold.)
constexpr int fold_lane(int i, int s, bool odd, int width) {
  const int half = width / 2, j = i % half;
  return (i < half ? 0 : width) + (2 * (j / s) + odd) * s + j % s;
}

// The even plus the odd blocks of S lanes of x and y: each half of the result
// holds pairwise sums of the blocks of one input.
template <int S, typename V, int... I>
static inline V fold(V x, V y, std::integer_sequence<int, I...>) {
  return __builtin_shufflevector(x, y, fold_lane(I, S, false, kWidth)...) +
         __builtin_shufflevector(x, y, fold_lane(I, S, true, kWidth)...);
}

// One halving step over the first n vectors of v (in place), then the next,
// down to blocks of one lane. A missing partner (n odd) is replaced by a live
// vector, which only affects lanes that are never read.
template <int S, typename V>
static inline void fold_all(V* v, int n) {
  for (int i = 0; i < (n + 1) / 2; ++i)
    v[i] = fold<S>(v[2 * i], v[2 * i + 1 < n ? 2 * i + 1 : 2 * i],
                   std::make_integer_sequence<int, kWidth>{});
  if constexpr (S > 1) fold_all<S / 2>(v, (n + 1) / 2);
}

// Lane sums of N <= kWidth vectors at once: lane e of the result is the sum
// of the lanes of a[e] (lanes N and up are left undefined). Halving the
// vectors pairwise takes kWidth - 1 shuffle-add steps for all of them, where
// halving each vector alone would take kWidth times log2(kWidth); steps whose
// inputs are all beyond N are skipped (8 for N = 8 on 16 lanes, 5 for N = 4).
// A float has no lanes to sum. (A template over the vector type V = vfloat,
// as are fold and finish_sums, so that only the branch that fits vfloat is
// compiled.)
template <int N, typename V>
static inline V transpose_sum(const V* a) {
  if constexpr (kWidth > 1) {
    V v[N];
    for (int e = 0; e < N; ++e) v[e] = a[e];
    fold_all<kWidth / 2>(v, N);
    return v[0];
  } else {
    return a[0];
  }
}

// Entries of one row the weight gradients take together, at most: they
// share each load of the row's gradient, their independent sums hide the
// multiply-add latency, and transpose_sum finishes them all at once.
constexpr int kEntryGroup = Isa::kEntryGroup;

// sums[e] = acc[e]'s lanes + tail[e] for e < G, added to what sums holds if
// `accumulate`.
template <int G, typename V>
static inline void finish_sums(const V* acc, const float* tail, float* sums, bool accumulate) {
  if constexpr (kWidth > 1) {
    const V total = transpose_sum<G>(acc);
    for (int e = 0; e < G; ++e) sums[e] = (accumulate ? sums[e] : 0.0f) + (total[e] + tail[e]);
  } else {
    for (int e = 0; e < G; ++e) sums[e] = (accumulate ? sums[e] : 0.0f) + (acc[e] + tail[e]);
  }
}

// The weight gradients' driver: for the rows [row_begin, row_end), every
// entry's sum is computed by `dot` and written to out_values (or, with
// `accumulate`, added). A row's entries go in whole groups of kEntryGroup,
// then one group of up to 4 at a time for the rest (padded with repeats of
// its first entry), so each sum's order depends only on the row, never on
// how rows are split into tasks. dot.run<G>(r, entries, sums, accumulate)
// finishes the G entries `entries` of row r into sums.
template <typename Dot>
static inline void sddmm_row_groups(const int32_t* indptr, int64_t row_begin, int64_t row_end,
                                    float* out_values, bool accumulate, const Dot& dot) {
  for (int64_t r = row_begin; r < row_end; ++r) {
    int64_t p = indptr[r];
    const int64_t hi = indptr[r + 1];
    int64_t entries[kEntryGroup];
    for (; p + kEntryGroup <= hi; p += kEntryGroup) {
      for (int e = 0; e < kEntryGroup; ++e) entries[e] = p + e;
      dot.template run<kEntryGroup>(r, entries, out_values + p, accumulate);
    }
    while (p < hi) {
      const int n = static_cast<int>(std::min<int64_t>(4, hi - p));
      float sums[4];
      for (int e = 0; e < n; ++e) sums[e] = out_values[p + e];
      for (int e = 0; e < 4; ++e) entries[e] = p + (e < n ? e : 0);
      dot.template run<4>(r, entries, sums, accumulate);
      for (int e = 0; e < n; ++e) out_values[p + e] = sums[e];
      p += n;
    }
  }
}

// The convolutions' entry sums over the grid positions [q_begin, q_end):
// sum_q sum_l rows_q[r * ld_row + l] * in_q[offset(p) + l]. The caller keeps
// the range small enough that its windows stay in cache across all rows.
template <typename Offset, typename In>
struct GridDot {
  Offset offset;
  const In* rows;
  int64_t ld_row;
  const In* in;
  int64_t length;
  const Grid& grid;
  int64_t q_begin, q_end;

  template <int G>
  void run(int64_t r, const int64_t* entries, float* sums, bool accumulate) const {
    vfloat acc[G] = {};
    float tail[G] = {};
    int64_t off[G];
    for (int e = 0; e < G; ++e) off[e] = offset(entries[e]);
    int64_t i = q_begin / grid.n_inner, j = q_begin % grid.n_inner;
    for (int64_t q = q_begin; q < q_end; ++q) {
      const In* base = in + i * grid.in_outer + j * grid.in_inner;
      const In* x[G];
      for (int e = 0; e < G; ++e) x[e] = base + off[e];
      sddmm_group<G>(rows + i * grid.out_outer + j * grid.out_inner + r * ld_row, x, length, acc,
                     tail);
      if (++j == grid.n_inner) {
        j = 0;
        ++i;
      }
    }
    finish_sums<G>(acc, tail, sums, accumulate);
  }
};

template <typename In>
static void sddmm(const int32_t* indptr, const int64_t* offsets, const In* rows,
                  int64_t ld_row, const In* in, float* out_values, int64_t length,
                  const Grid& grid, int64_t q_begin, int64_t q_end, int64_t row_begin,
                  int64_t row_end, bool accumulate) {
  const GridDot<TableOffset, In> dot{TableOffset{offsets}, rows, ld_row, in, length,
                                 grid, q_begin, q_end};
  sddmm_row_groups(indptr, row_begin, row_end, out_values, accumulate, dot);
}

// The linear layer's entry sums over the whole batch, of two operands in the
// batch-tiled layout (routines.h) with n_rows and n_in rows: one run
// per tile each, all summed in the same registers and reduced once.
template <typename In>
struct TiledDot {
  const int32_t* indices;
  const In* rows;
  int64_t n_rows;
  const In* in;
  int64_t n_in;
  int64_t batch;

  template <int G>
  void run(int64_t r, const int64_t* entries, float* sums, bool accumulate) const {
    vfloat acc[G] = {};
    float tail[G] = {};
    const In* g = rows + r * kBatchTile;
    const In* x[G];
    for (int e = 0; e < G; ++e) x[e] = in + indices[entries[e]] * kBatchTile;
    const int64_t full = batch / kBatchTile;
    // The tiles by hand rather than through BatchTiles: whole tiles at a fixed
    // length and fixed strides, then the narrower last one. Recomputing each
    // tile's offsets through BatchTiles measured slower (see
    // benchmarks/results/NOTES.md).
    for (int64_t t = 0; t < full; ++t) {
      sddmm_group<G, /*kWholeVectors=*/kBatchTile % kWidth == 0>(g, x, kBatchTile, acc, tail);
      g += kBatchTile * n_rows;
      for (int e = 0; e < G; ++e) x[e] += kBatchTile * n_in;
    }
    if (const int64_t width = batch - full * kBatchTile; width > 0) {  // a last, narrower tile
      const int64_t first = full * kBatchTile;
      g = rows + first * n_rows + r * width;
      for (int e = 0; e < G; ++e) x[e] = in + first * n_in + indices[entries[e]] * width;
      sddmm_group<G>(g, x, width, acc, tail);
    }
    finish_sums<G>(acc, tail, sums, accumulate);
  }
};

template <typename In>
static void sddmm_indexed(const int32_t* indptr, const int32_t* indices, const In* rows,
                          int64_t n_rows, const In* in, int64_t n_in, float* out_values,
                          int64_t batch, int64_t row_begin, int64_t row_end, bool accumulate) {
  const TiledDot<In> dot{indices, rows, n_rows, in, n_in, batch};
  sddmm_row_groups(indptr, row_begin, row_end, out_values, accumulate, dot);
}

// The linear layer's two backward products in one pass over the entries by
// column of W (the transposed pattern: its row m holds the entries (n, m)).
// Both products read the same run of dy per entry: the input gradient adds
// value * dy_n to dx_m, the weight gradient takes <dy_n, x_m>. Run apart,
// each loads every run, and a load per multiply-add is what bounds both
// loops; here each run is loaded once and used twice, with x_m and dx_m held
// in registers for the whole row.

// v, kept in a register: without this, the compiler folds the load that
// made v into each multiply-add that uses it, loading the run twice. How to
// say so is the instruction set's (Isa::keep_in_register).
static inline vfloat in_register(vfloat v) {
  Isa::keep_in_register(v);
  return v;
}

// Entries [p, p + G) of a row on one chunk of V vectors: acc (dx_m) += each
// value times its run, and sums[p + e] (+)= <run, xv>.
template <int G, int V, typename In>
static inline void spmm_sddmm_group(int64_t p, int64_t hi, ScaledIndex offset,
                                    const float* values, const In* dy, const vfloat* xv,
                                    vfloat* acc, float* sums, bool accumulate) {
  vfloat dot[G];
  for (int e = 0; e < G; ++e) dot[e] = vfloat{};
  // Unrolled, so that the sums stay in registers and each run is loaded once.
#pragma GCC unroll 16
  for (int e = 0; e < G; ++e) {
    if (p + e + kPrefetchDistance < hi) prefetch_run(dy + offset(p + e + kPrefetchDistance));
    const In* src = dy + offset(p + e);
    const vfloat w = broadcast(values[p + e]);
    for (int v = 0; v < V; ++v) {
      const vfloat d = in_register(load(src + v * kWidth));
      acc[v] += w * d;
      dot[e] += d * xv[v];
    }
  }
  const float no_tail[G] = {};
  finish_sums<G>(dot, no_tail, sums + p, accumulate);
}

// The last entries of a row, fewer than G: in groups of G / 2, G / 4, ..., 1,
// so each entry's sum depends only on its row.
template <int G, int V, typename In>
static inline void spmm_sddmm_rest(int64_t p, int64_t hi, ScaledIndex offset,
                                   const float* values, const In* dy, const vfloat* xv,
                                   vfloat* acc, float* sums, bool accumulate) {
  if constexpr (G > 1) {
    constexpr int half = G / 2;
    if (hi - p >= half) {
      spmm_sddmm_group<half, V>(p, hi, offset, values, dy, xv, acc, sums, accumulate);
      p += half;
    }
    spmm_sddmm_rest<half, V>(p, hi, offset, values, dy, xv, acc, sums, accumulate);
  }
}

// Entries the one-pass backward takes together: as many as the registers
// hold next to x_m, dx_m and a run.
constexpr int kBackwardGroup = Isa::kBackwardGroup;

// One row's entries [lo, hi) on V vectors of the runs: dx[0 : V * kWidth]
// is written, sums[p] (+)= <dy run of p, x[0 : V * kWidth]>.
template <int V, typename In>
static inline void spmm_sddmm_tile(int64_t lo, int64_t hi, ScaledIndex offset,
                                   const float* values, const In* dy, const In* x,
                                   float* dx, float* sums, bool accumulate) {
  vfloat xv[V], acc[V];
  for (int v = 0; v < V; ++v) {
    xv[v] = load(x + v * kWidth);
    acc[v] = vfloat{};
  }
  int64_t p = lo;
  for (; p + kBackwardGroup <= hi; p += kBackwardGroup)
    spmm_sddmm_group<kBackwardGroup, V>(p, hi, offset, values, dy, xv, acc, sums, accumulate);
  spmm_sddmm_rest<kBackwardGroup, V>(p, hi, offset, values, dy, xv, acc, sums, accumulate);
  for (int v = 0; v < V; ++v) store(dx + v * kWidth, acc[v]);
}

// One row over runs of `length` floats: in chunks of at most
// kMaxBackwardVectors vectors (each a pass over the row's entries), then the
// last lanes one by one. The first chunk writes the sums unless `accumulate`,
// the rest add.
template <typename In>
static inline void spmm_sddmm_row(int64_t lo, int64_t hi, ScaledIndex offset,
                                  const float* values, const In* dy, const In* x,
                                  float* dx, float* sums, int64_t length, bool accumulate) {
  int64_t l = in_vector_chunks<kMaxBackwardVectors>(length, [&](auto vectors, int64_t at) {
    spmm_sddmm_tile<decltype(vectors)::value>(lo, hi, offset, values, dy + at, x + at, dx + at,
                                              sums, accumulate);
    accumulate = true;
  });
  for (; l < length; ++l, accumulate = true) {
    float a = 0.0f;
    for (int64_t p = lo; p < hi; ++p) {
      const float d = as_float(dy[offset(p) + l]);
      a += values[p] * d;
      sums[p] = (accumulate ? sums[p] : 0.0f) + d * as_float(x[l]);
    }
    dx[l] = a;
  }
}

template <typename In>
static void spmm_sddmm_indexed(const int32_t* indptr, const int32_t* indices,
                               const float* values, const In* dy, const In* x,
                               int64_t ld_x, float* dx, float* sums, int64_t length,
                               int64_t row_begin, int64_t row_end, bool accumulate) {
  const ScaledIndex offset{indices, length};
  for (int64_t r = row_begin; r < row_end; ++r)
    spmm_sddmm_row(indptr[r], indptr[r + 1], offset, values, dy, x + r * ld_x,
                   dx + r * length, sums, length, accumulate);
}

// The transposes of whole blocks in registers, where the instruction set has
// them (Isa::kTransposeBlock 16). store_line, transpose16x16 and transpose
// below are templates over the record I = Isa: the members only an
// instruction set with kStreamingStores has (stream, store_fence) are then
// looked up only where it has them, and an instruction set without blocks
// instantiates none of them. (transpose8x8 is generic vector code, emitted
// only where used.)
typedef float vfloat8 __attribute__((vector_size(32)));

// The 8 x 8 block at src (row stride ld_src) into dst (row stride ld_dst),
// transposed in registers by three rounds of shuffles.
static inline void transpose8x8(const float* src, int64_t ld_src, float* dst, int64_t ld_dst) {
  vfloat8 a[8], t[8], u[8];
  for (int i = 0; i < 8; ++i) __builtin_memcpy(&a[i], src + i * ld_src, sizeof(vfloat8));
  for (int i = 0; i < 8; i += 2) {  // interleave row pairs
    t[i] = __builtin_shufflevector(a[i], a[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[i + 1] = __builtin_shufflevector(a[i], a[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int i = 0; i < 8; i += 4) {  // then pairs of pairs
    u[i] = __builtin_shufflevector(t[i], t[i + 2], 0, 1, 8, 9, 4, 5, 12, 13);
    u[i + 1] = __builtin_shufflevector(t[i], t[i + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    u[i + 2] = __builtin_shufflevector(t[i + 1], t[i + 3], 0, 1, 8, 9, 4, 5, 12, 13);
    u[i + 3] = __builtin_shufflevector(t[i + 1], t[i + 3], 2, 3, 10, 11, 6, 7, 14, 15);
  }
  for (int i = 0; i < 4; ++i) {  // then the 128-bit halves: columns i and i + 4
    const vfloat8 lo = __builtin_shufflevector(u[i], u[i + 4], 0, 1, 2, 3, 8, 9, 10, 11);
    const vfloat8 hi = __builtin_shufflevector(u[i], u[i + 4], 4, 5, 6, 7, 12, 13, 14, 15);
    __builtin_memcpy(dst + i * ld_dst, &lo, sizeof lo);
    __builtin_memcpy(dst + (i + 4) * ld_dst, &hi, sizeof hi);
  }
}

// Writes the 64-byte line at dst (64-byte aligned) with the 16 floats of
// `line`; kStream: past the caches (a non-temporal store, I::stream), which
// spares the read of the line that a plain store's write-allocate costs. It
// pays where the destination is larger than the cache, so the line would be
// evicted before it is read again (the callers decide: streams_past_cache).
// From a vector that is the whole line (I::kLineVectors):
template <bool kStream, typename I = Isa>
static inline void store_line(float* dst, vfloat line) {
  if constexpr (kStream)
    I::stream(dst, line);
  else
    store(dst, line);
}
// From memory, one vector of I::kWidth floats at a time:
template <bool kStream, typename I = Isa>
static inline void store_line(float* dst, const float* line) {
  for (int h = 0; h < 16; h += I::kWidth) {
    vfloat part;
    __builtin_memcpy(&part, line + h, sizeof part);
    if constexpr (kStream)
      I::stream(dst + h, part);
    else
      __builtin_memcpy(dst + h, &part, sizeof part);
  }
}

// The 16 x 16 block at src into dst: every source and destination row is
// one whole 64-byte line, read or written at once. Walking 8 x 8 blocks
// instead leaves half-used lines that must stay cached until their other
// half is visited, and with row strides that are multiples of 4 KiB (e.g.
// 1024 or 3072 features) all those lines fall in one cache set and evict
// each other.
//
// Where a vector is a whole line (I::kLineVectors): four rounds of
// two-source shuffles over 16 registers, with no trip through memory:
// interleave row pairs, then pairs of pairs (now each 128-bit lane holds 4
// rows of one column), then gather the lanes twice. (V is vfloat, named
// through I so that only such an instruction set compiles these 16-lane
// shuffles.)
template <bool kStream, typename I>
static inline void transpose16x16_in_line_vectors(const float* src, int64_t ld_src, float* dst,
                                                  int64_t ld_dst) {
  static_assert(I::kWidth == 16, "kLineVectors: one vector is one 64-byte line");
  using V = typename VectorOf<I::kWidth>::type;
  V a[16], t[16];
  for (int i = 0; i < 16; ++i) a[i] = load(src + i * ld_src);
  for (int i = 0; i < 16; i += 2) {
    t[i] = __builtin_shufflevector(a[i], a[i + 1], 0, 16, 1, 17, 4, 20, 5, 21, 8, 24, 9, 25, 12,
                                   28, 13, 29);
    t[i + 1] = __builtin_shufflevector(a[i], a[i + 1], 2, 18, 3, 19, 6, 22, 7, 23, 10, 26, 11, 27,
                                       14, 30, 15, 31);
  }
  // a[4g + k]: rows 4g..4g+3 of column 4L + k in lane L.
  for (int g = 0; g < 16; g += 4) {
    for (int h = 0; h < 2; ++h) {
      a[g + 2 * h] = __builtin_shufflevector(t[g + h], t[g + h + 2], 0, 1, 16, 17, 4, 5, 20, 21,
                                             8, 9, 24, 25, 12, 13, 28, 29);
      a[g + 2 * h + 1] = __builtin_shufflevector(t[g + h], t[g + h + 2], 2, 3, 18, 19, 6, 7, 22,
                                                 23, 10, 11, 26, 27, 14, 15, 30, 31);
    }
  }
  // t[4m + k] (m = 0, 1): lanes 0 and 2 (m = 0) or 1 and 3 of a[k], a[4 + k];
  // t[8 + 4m + k]: the same of a[8 + k], a[12 + k].
  for (int k = 0; k < 4; ++k) {
    for (int g = 0; g < 2; ++g) {
      const V lo = a[8 * g + k], hi = a[8 * g + 4 + k];
      t[8 * g + k] = __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24,
                                             25, 26, 27);
      t[8 * g + 4 + k] = __builtin_shufflevector(lo, hi, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22,
                                                 23, 28, 29, 30, 31);
    }
  }
  // Column 4m + k: lanes 0 and 2 of t[4m + k], t[8 + 4m + k]; column 8 + 4m + k: lanes 1 and 3.
  for (int c = 0; c < 8; ++c) {
    const V lo = t[c], hi = t[8 + c];
    store_line<kStream, I>(dst + c * ld_dst, __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 8, 9,
                                                                     10, 11, 16, 17, 18, 19, 24,
                                                                     25, 26, 27));
    store_line<kStream, I>(dst + (8 + c) * ld_dst,
                           __builtin_shufflevector(lo, hi, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21,
                                                   22, 23, 28, 29, 30, 31));
  }
}

// Otherwise four 8 x 8 blocks; streamed, through a buffer, so that each
// destination line is written whole at once (its vectors' streaming stores in
// a row).
template <bool kStream, typename I>
static inline void transpose16x16_in_8x8_blocks(const float* src, int64_t ld_src, float* dst,
                                                int64_t ld_dst) {
  alignas(64) float block[16 * 16];
  for (int i = 0; i < 16; ++i) __builtin_memcpy(block + 16 * i, src + i * ld_src, 64);
  alignas(64) float lines[16 * 16];
  float* out = kStream ? lines : dst;
  const int64_t ld_out = kStream ? 16 : ld_dst;
  transpose8x8(block, 16, out, ld_out);
  transpose8x8(block + 8 * 16, 16, out + 8, ld_out);
  transpose8x8(block + 8, 16, out + 8 * ld_out, ld_out);
  transpose8x8(block + 8 * 16 + 8, 16, out + 8 * ld_out + 8, ld_out);
  if constexpr (kStream)
    for (int c = 0; c < 16; ++c) store_line<true, I>(dst + c * ld_dst, lines + 16 * c);
}

template <bool kStream, typename I = Isa>
static inline void transpose16x16(const float* src, int64_t ld_src, float* dst,
                                  int64_t ld_dst) {
  if constexpr (I::kLineVectors)
    transpose16x16_in_line_vectors<kStream, I>(src, ld_src, dst, ld_dst);
  else
    transpose16x16_in_8x8_blocks<kStream, I>(src, ld_src, dst, ld_dst);
}

// block(r, c) for the b x b blocks at rows r < in_blocks and columns c in
// [col_begin, cols_in_blocks), in the order `transpose` explains: a band of
// source rows across all the columns (`by_rows`), else a band of columns
// down all the rows.
template <typename Block>
static inline void for_each_block(int64_t b, int64_t in_blocks, int64_t col_begin,
                                  int64_t cols_in_blocks, bool by_rows, const Block& block) {
  if (by_rows) {
    for (int64_t r = 0; r < in_blocks; r += b)
      for (int64_t c = col_begin; c < cols_in_blocks; c += b) block(r, c);
  } else {
    for (int64_t c = col_begin; c < cols_in_blocks; c += b)
      for (int64_t r = 0; r < in_blocks; r += b) block(r, c);
  }
}

// dst[c * ld_dst + r] = src[r * ld_src + c] for r < rows, c in [col_begin,
// col_end): whole blocks in registers, then the edges one by one. The
// blocks go in the order whose inner loop steps along the side with the
// shorter rows: a band of 16 source rows across all the columns when the
// source rows are the farther apart (x into its batch tiles), else a band of
// 16 columns down all the rows (a feature-major buffer into a batch-major
// output). The other side then moves by whole lines per block, in a few
// sequential streams the hardware prefetchers follow; the opposite order
// steps by one line per row of the long side, a page or more apart, and every
// line is a demand miss when it is not cached. The order chosen measured
// faster than the opposite one, from memory and from cache alike (see
// benchmarks/results/NOTES.md).
// With `stream`, the blocks go past the caches where their destination rows
// are whole aligned lines (only where the instruction set has streaming
// stores); a fence then orders those stores before the caller's later ones
// (which publish the result to other threads).
template <typename I = Isa>
static void transpose(const float* src, int64_t ld_src, float* dst, int64_t ld_dst,
                      int64_t rows, int64_t col_begin, int64_t col_end, bool stream) {
  constexpr int64_t b = I::kTransposeBlock;
  static_assert(b == 1 || b == 16, "blocks are transpose16x16's, or none");
  stream = stream && I::kStreamingStores && b == 16 && ld_dst % 16 == 0 &&
           reinterpret_cast<uintptr_t>(dst) % 64 == 0;
  // Rows [0, in_blocks) and columns [col_begin, cols_in_blocks) go in blocks
  // (none where b is 1), the rest one by one.
  const int64_t in_blocks = b > 1 ? rows / b * b : 0;
  const int64_t cols_in_blocks = b > 1 ? col_begin + (col_end - col_begin) / b * b : col_begin;
  if constexpr (b > 1) {
    // (stream is never set without streaming stores; the template argument
    // then keeps the streaming variant from being compiled at all.)
    const auto block = [&](int64_t r, int64_t c) {
      if (stream)
        transpose16x16<I::kStreamingStores, I>(src + r * ld_src + c, ld_src,
                                               dst + c * ld_dst + r, ld_dst);
      else
        transpose16x16<false, I>(src + r * ld_src + c, ld_src, dst + c * ld_dst + r, ld_dst);
    };
    for_each_block(b, in_blocks, col_begin, cols_in_blocks, ld_src > ld_dst, block);
  }
  for (int64_t c = col_begin; c < col_end; ++c)
    for (int64_t r = c < cols_in_blocks ? in_blocks : 0; r < rows; ++r)
      dst[c * ld_dst + r] = src[r * ld_src + c];
  if constexpr (I::kStreamingStores)
    if (stream) I::store_fence();
}

// `transpose` for the bfloat16 tables: from and into bfloat16 operands, or
// from a float buffer into bfloat16 (rounded). Where the instruction set
// transposes 16 x 16 float blocks in registers, each block is widened to
// float in a buffer (unless it is float already), transposed there with
// transpose16x16 and narrowed row by row into the destination (loops the
// compiler vectorises); the edges, and every element on the scalar path,
// go one by one. Half the bytes of float, so no streaming stores.
template <typename Src, typename Dst, typename I = Isa>
static void transpose_elements(const Src* src, int64_t ld_src, Dst* dst, int64_t ld_dst,
                               int64_t rows, int64_t col_begin, int64_t col_end, bool) {
  constexpr int64_t b = I::kTransposeBlock;
  const int64_t in_blocks = b > 1 ? rows / b * b : 0;
  const int64_t cols_in_blocks = b > 1 ? col_begin + (col_end - col_begin) / b * b : col_begin;
  if constexpr (b > 1) {
    alignas(64) float wide[b * b], turned[b * b];
    const auto block = [&](int64_t r, int64_t c) {
      const float* from = wide;
      int64_t ld_from = b;
      if constexpr (std::is_same_v<Src, float>) {
        from = src + r * ld_src + c;
        ld_from = ld_src;
      } else {
        for (int64_t i = 0; i < b; ++i)
          for (int64_t j = 0; j < b; ++j) wide[i * b + j] = as_float(src[(r + i) * ld_src + c + j]);
      }
      transpose16x16<false, I>(from, ld_from, turned, b);
      for (int64_t i = 0; i < b; ++i)
        for (int64_t j = 0; j < b; ++j)
          dst[(c + i) * ld_dst + r + j] = rounded<Dst>(turned[i * b + j]);
    };
    for_each_block(b, in_blocks, col_begin, cols_in_blocks, ld_src > ld_dst, block);
  }
  for (int64_t c = col_begin; c < col_end; ++c)
    for (int64_t r = c < cols_in_blocks ? in_blocks : 0; r < rows; ++r)
      dst[c * ld_dst + r] = rounded<Dst>(as_float(src[r * ld_src + c]));
}

// patch_weight_grad's inner block: KB entries of one kernel row times V
// vectors of output channels, in KB x V accumulators held across all the
// pixels. Per pixel: V loads of dy, shared by the KB entries, and KB
// broadcasts of x (3 x 4 on AVX2: 12 multiply-adds per 7 loads, and with
// the operands 16 registers).
template <int KB, int V>
static inline void patch_weight_grad_block(const float* x, const int64_t* base,
                                           int64_t n_pixels, const float* dy, int64_t ld_dy,
                                           float* dw, int64_t ld_dw) {
  vfloat acc[KB][V];
  for (int a = 0; a < KB; ++a)
    for (int v = 0; v < V; ++v) acc[a][v] = load(dw + a * ld_dw + v * kWidth);
  for (int64_t q = 0; q < n_pixels; ++q) {
    const float* xq = x + base[q];
    const float* dyq = dy + q * ld_dy;
    vfloat d[V];
    for (int v = 0; v < V; ++v) d[v] = load(dyq + v * kWidth);
    for (int a = 0; a < KB; ++a) {
      const vfloat b = broadcast(xq[a]);
      for (int v = 0; v < V; ++v) acc[a][v] += b * d[v];
    }
  }
  for (int a = 0; a < KB; ++a)
    for (int v = 0; v < V; ++v) store(dw + a * ld_dw + v * kWidth, acc[a][v]);
}

// The output channels past the last whole vector, one lane at a time.
template <int KB>
static inline void patch_weight_grad_lanes(const float* x, const int64_t* base,
                                           int64_t n_pixels, const float* dy, int64_t ld_dy,
                                           float* dw, int64_t ld_dw, int64_t lanes) {
  for (int64_t o = 0; o < lanes; ++o) {
    float acc[KB];
    for (int a = 0; a < KB; ++a) acc[a] = dw[a * ld_dw + o];
    for (int64_t q = 0; q < n_pixels; ++q)
      for (int a = 0; a < KB; ++a) acc[a] += x[base[q] + a] * dy[q * ld_dy + o];
    for (int a = 0; a < KB; ++a) dw[a * ld_dw + o] = acc[a];
  }
}

template <int KB>
static inline void patch_weight_grad_entries(const float* x, const int64_t* base,
                                             int64_t n_pixels, const float* dy, int64_t cout,
                                             float* dw) {
  const int64_t l = in_vector_chunks<4>(cout, [&](auto vectors, int64_t at) {
    patch_weight_grad_block<KB, decltype(vectors)::value>(x, base, n_pixels, dy + at, cout,
                                                          dw + at, cout);
  });
  patch_weight_grad_lanes<KB>(x, base, n_pixels, dy + l, cout, dw + l, cout, cout - l);
}

static void patch_weight_grad(const float* x, const int64_t* base, int64_t n_pixels,
                              int64_t n_segs, int64_t ld_seg, int64_t seg, const float* dy,
                              int64_t cout, float* dw) {
  constexpr int64_t kb = 3;
  for (int64_t i = 0; i < n_segs; ++i) {
    const float* xi = x + i * ld_seg;
    float* dwi = dw + i * seg * cout;
    int64_t r = 0;
    for (; r + kb <= seg; r += kb)
      patch_weight_grad_entries<kb>(xi + r, base, n_pixels, dy, cout, dwi + r * cout);
    if (seg - r == 2)
      patch_weight_grad_entries<2>(xi + r, base, n_pixels, dy, cout, dwi + r * cout);
    else if (seg - r == 1)
      patch_weight_grad_entries<1>(xi + r, base, n_pixels, dy, cout, dwi + r * cout);
  }
}

// patch_conv's inner block: PB pixels times V vectors of output channels in
// PB x V accumulators, over all the kernel's entries: per entry V loads of
// the kernel row, shared by the PB pixels, and PB broadcasts of x.
template <int PB, int V>
static inline void patch_conv_block(const float* x, const int64_t* base, int64_t n_segs,
                                    int64_t ld_seg, int64_t seg, const float* w, int64_t ld_w,
                                    float* y, int64_t ld_y) {
  vfloat acc[PB][V];
  for (int a = 0; a < PB; ++a)
    for (int v = 0; v < V; ++v) acc[a][v] = vfloat{};
  const float* xa[PB];
  for (int a = 0; a < PB; ++a) xa[a] = x + base[a];
  for (int64_t i = 0; i < n_segs; ++i) {
    const float* wi = w + i * seg * ld_w;
    const int64_t at = i * ld_seg;
    for (int64_t r = 0; r < seg; ++r) {
      vfloat wv[V];
      for (int v = 0; v < V; ++v) wv[v] = load(wi + r * ld_w + v * kWidth);
      for (int a = 0; a < PB; ++a) {
        const vfloat b = broadcast(xa[a][at + r]);
        for (int v = 0; v < V; ++v) acc[a][v] += b * wv[v];
      }
    }
  }
  for (int a = 0; a < PB; ++a)
    for (int v = 0; v < V; ++v) store(y + a * ld_y + v * kWidth, acc[a][v]);
}

template <int PB>
static inline void patch_conv_pixels(const float* x, const int64_t* base, int64_t n_segs,
                                     int64_t ld_seg, int64_t seg, const float* w, int64_t cout,
                                     float* y) {
  const int64_t l = in_vector_chunks<4>(cout, [&](auto vectors, int64_t at) {
    patch_conv_block<PB, decltype(vectors)::value>(x, base, n_segs, ld_seg, seg, w + at, cout,
                                                   y + at, cout);
  });
  // The output channels past the last whole vector, one lane at a time.
  for (int64_t o = l; o < cout; ++o)
    for (int a = 0; a < PB; ++a) {
      float sum = 0.0f;
      for (int64_t i = 0; i < n_segs; ++i)
        for (int64_t r = 0; r < seg; ++r)
          sum += x[base[a] + i * ld_seg + r] * w[(i * seg + r) * cout + o];
      y[a * cout + o] = sum;
    }
}

static void patch_conv(const float* x, const int64_t* base, int64_t n_pixels, int64_t n_segs,
                       int64_t ld_seg, int64_t seg, const float* w, int64_t cout, float* y) {
  constexpr int64_t pb = 3;
  int64_t q = 0;
  for (; q + pb <= n_pixels; q += pb)
    patch_conv_pixels<pb>(x, base + q, n_segs, ld_seg, seg, w, cout, y + q * cout);
  if (n_pixels - q == 2)
    patch_conv_pixels<2>(x, base + q, n_segs, ld_seg, seg, w, cout, y + q * cout);
  else if (n_pixels - q == 1)
    patch_conv_pixels<1>(x, base + q, n_segs, ld_seg, seg, w, cout, y + q * cout);
}

// The max pool's backward: loops over a block of channels, which the
// compiler vectorizes with this file's instruction set (the taps widened to
// floats first, so that every select compares and picks floats).
constexpr int64_t kPoolChannelBlock = 64;

static inline void taps_as_floats(const int8_t* __restrict taps, int64_t n,
                                  float* __restrict out) {
  for (int64_t k = 0; k < n; ++k) out[k] = static_cast<float>(taps[k]);
}

static void pool_grad_sums(const PoolGeometry& g, const float* dpool, const float* pooled,
                           const int8_t* taps, const float* x, const float* shift,
                           int64_t i_begin, int64_t i_end, float* grad, float* sum_g,
                           float* sum_gx) {
  for (int64_t c0 = 0; c0 < g.c; c0 += kPoolChannelBlock) {
    const int64_t n = std::min(kPoolChannelBlock, g.c - c0);
    float sg[kPoolChannelBlock], sgx[kPoolChannelBlock], tf[kPoolChannelBlock],
        xw[kPoolChannelBlock];
    for (int64_t k = 0; k < n; ++k) sg[k] = sgx[k] = 0.0f;
    for (int64_t i = i_begin; i < i_end; ++i)
      for (int64_t j = 0; j < g.wo; ++j) {
        const int64_t at = (i * g.wo + j) * g.c + c0;
        const float* __restrict dp = dpool + at;
        const float* __restrict pv = pooled + at;
        float* __restrict gr = grad + at;
        for (int64_t k = 0; k < n; ++k) gr[k] = pv[k] > 0.0f ? dp[k] : 0.0f;
        for (int64_t k = 0; k < n; ++k) sg[k] += gr[k];
        taps_as_floats(taps + at, n, tf);
        // The winner's x, channel by channel: each tap's pixel where it won
        // (0 where a padded position won: its window has no pixel, g is 0).
        for (int64_t k = 0; k < n; ++k) xw[k] = 0.0f;
        for (int64_t t = 0; t < g.kh * g.kw; ++t) {
          const int64_t row = i * g.sh - g.pad_top + t / g.kw;
          const int64_t col = j * g.sw - g.pad_left + t % g.kw;
          if (row < 0 || row >= g.h || col < 0 || col >= g.w) continue;
          const float* __restrict xp = x + (row * g.w + col) * g.c + c0;
          const float tap = static_cast<float>(t);
          for (int64_t k = 0; k < n; ++k) xw[k] = tf[k] == tap ? xp[k] : xw[k];
        }
        for (int64_t k = 0; k < n; ++k) sgx[k] += gr[k] * (xw[k] - shift[c0 + k]);
      }
    for (int64_t k = 0; k < n; ++k) {
      sum_g[c0 + k] += sg[k];
      sum_gx[c0 + k] += sgx[k];
    }
  }
}

static inline int64_t floor_div(int64_t a, int64_t b) {
  return a >= 0 ? a / b : -((-a + b - 1) / b);
}

static void pool_input_grad_row(const PoolGeometry& g, const float* grad, const int8_t* taps,
                                const float* x, const float* shift, const float* a,
                                const float* b, const float* d, int64_t row, float* dx) {
  // The window rows that cover image row `row`: i * sh - pad_top <= row < that + kh.
  const int64_t i_lo = std::max<int64_t>(0, floor_div(row + g.pad_top - g.kh, g.sh) + 1);
  const int64_t i_hi = std::min<int64_t>(g.ho - 1, floor_div(row + g.pad_top, g.sh));
  for (int64_t col = 0; col < g.w; ++col) {
    const int64_t j_lo = std::max<int64_t>(0, floor_div(col + g.pad_left - g.kw, g.sw) + 1);
    const int64_t j_hi = std::min<int64_t>(g.wo - 1, floor_div(col + g.pad_left, g.sw));
    for (int64_t c0 = 0; c0 < g.c; c0 += kPoolChannelBlock) {
      const int64_t n = std::min(kPoolChannelBlock, g.c - c0);
      float dz[kPoolChannelBlock], tf[kPoolChannelBlock];
      for (int64_t k = 0; k < n; ++k) dz[k] = 0.0f;
      for (int64_t i = i_lo; i <= i_hi; ++i)
        for (int64_t j = j_lo; j <= j_hi; ++j) {
          const float tap = static_cast<float>((row + g.pad_top - i * g.sh) * g.kw +
                                               (col + g.pad_left - j * g.sw));
          const int64_t at = (i * g.wo + j) * g.c + c0;
          const float* __restrict gr = grad + at;
          taps_as_floats(taps + at, n, tf);
          for (int64_t k = 0; k < n; ++k) dz[k] += tf[k] == tap ? gr[k] : 0.0f;
        }
      const int64_t at = (row * g.w + col) * g.c + c0;
      const float* __restrict xp = x + at;
      float* __restrict out = dx + at;
      for (int64_t k = 0; k < n; ++k)
        out[k] = a[c0 + k] * dz[k] + b[c0 + k] * (xp[k] - shift[c0 + k]) + d[c0 + k];
    }
  }
}

// This instruction set's tables, for the dispatch table of simd_dispatch.cc
// (an instruction set that only adds bfloat16 routines to another's defines
// SPARSEPROP_ROUTINES_BFLOAT16_ONLY and compiles no float table).
#if !defined(SPARSEPROP_ROUTINES_BFLOAT16_ONLY)
extern const Routines kRoutines;
const Routines kRoutines = {&spmm<float>, &sddmm<float>, &spmm_indexed<float>,
                            &sddmm_indexed<float>, &spmm_sddmm_indexed<float>, &transpose<>,
                            &transpose<>, &patch_conv, &patch_weight_grad, &pool_grad_sums,
                            &pool_input_grad_row, Isa::kOnePassBackward, Isa::kName};
#endif
extern const RoutinesFor<BFloat16> kBf16Routines;
const RoutinesFor<BFloat16> kBf16Routines = {
    &spmm<BFloat16>, &sddmm<BFloat16>, &spmm_indexed<BFloat16>, &sddmm_indexed<BFloat16>,
    &spmm_sddmm_indexed<BFloat16>, &transpose_elements<BFloat16, BFloat16>,
    &transpose_elements<float, BFloat16>, nullptr, nullptr, nullptr, nullptr,
    Isa::kOnePassBackward, Isa::kName};
