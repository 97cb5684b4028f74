// An FFI target's signature, declared once beside its handler: the dtypes of
// its operands and results (all buffers) and the names of its int64
// attributes. The handler's binding is made from it (bind<S>()), and the
// extension reports it (module.cc), so Python checks its own declaration of
// each target (operand names, batch dims) against it at import.
#pragma once

#include <cstdint>
#include <initializer_list>

#include "xla/ffi/api/ffi.h"

namespace sparseprop {

namespace ffi = xla::ffi;

struct Signature {
  static constexpr int kMax = 8;
  int n_operands = 0, n_results = 0, n_attrs = 0;
  ffi::DataType operands[kMax] = {};
  ffi::DataType results[kMax] = {};
  const char* attrs[kMax] = {};
};

constexpr Signature signature(std::initializer_list<ffi::DataType> operands,
                              std::initializer_list<ffi::DataType> results,
                              std::initializer_list<const char*> attrs = {}) {
  Signature s;
  for (ffi::DataType d : operands) s.operands[s.n_operands++] = d;
  for (ffi::DataType d : results) s.results[s.n_results++] = d;
  for (const char* a : attrs) s.attrs[s.n_attrs++] = a;
  return s;
}

// Bindings cannot be moved outside XLA's own code, so each step builds on
// the previous one as a temporary: the first N operands, then the first N
// results after all operands, then the first N attributes after those.
namespace signature_detail {

template <const Signature& S, int N>
auto operands() {
  if constexpr (N == 0) {
    return ffi::Ffi::Bind().Ctx<ffi::ThreadPool>();
  } else {
    return operands<S, N - 1>().template Arg<ffi::Buffer<S.operands[N - 1]>>();
  }
}

template <const Signature& S, int N>
auto results() {
  if constexpr (N == 0) {
    return operands<S, S.n_operands>();
  } else {
    return results<S, N - 1>().template Ret<ffi::Buffer<S.results[N - 1]>>();
  }
}

template <const Signature& S, int N>
auto attrs() {
  if constexpr (N == 0) {
    return results<S, S.n_results>();
  } else {
    return attrs<S, N - 1>().template Attr<int64_t>(S.attrs[N - 1]);
  }
}

}  // namespace signature_detail

// The binding of a handler with signature S: XLA's thread pool, then S's
// operands, results and attributes, in that order.
template <const Signature& S>
auto bind() {
  return signature_detail::attrs<S, S.n_attrs>();
}

}  // namespace sparseprop
