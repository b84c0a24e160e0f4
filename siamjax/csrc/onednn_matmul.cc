// bf16 x bf16 -> float32 (batched) matrix product through oneDNN, as an XLA FFI handler.
//
// C[g] = op(A[g]) @ op(B[g]) for g < G, row-major, op = transpose when trans_a / trans_b.
// A: bf16[G, M, K] (or [G, K, M] when trans_a), B: bf16[G, K, N] (or [G, N, K]);
// G may be 1 on either side (broadcast). C: f32[G, M, N]. oneDNN picks its kernel for
// the CPU at hand (AMX, AVX512-BF16, or an upconverting fallback); `siamjax_onednn_isa`
// reports which ISA it dispatches to. Built on demand by siamjax/cpu_kernels.py.
#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

using Key = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, bool, bool>;

dnnl::memory::desc Desc(int64_t g, int64_t rows, int64_t cols, bool trans,
                        dnnl::memory::data_type dt) {
  // Logical [g, rows, cols]; stored as [g, cols, rows] when trans (row-major).
  dnnl::memory::dims dims = {g, rows, cols};
  dnnl::memory::dims strides = trans ? dnnl::memory::dims{rows * cols, 1, rows}
                                     : dnnl::memory::dims{rows * cols, cols, 1};
  return dnnl::memory::desc(dims, dt, strides);
}

dnnl::matmul& Primitive(const Key& key) {
  static std::mutex mu;
  static std::map<Key, dnnl::matmul> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  auto [ga, gb, g, m, k, n, ta, tb] = key;
  using dt = dnnl::memory::data_type;
  auto a = Desc(ga, m, k, ta, dt::bf16);
  auto b = Desc(gb, k, n, tb, dt::bf16);
  auto c = dnnl::memory::desc({g, m, n}, dt::f32, {m * n, n, 1});
  dnnl::matmul::primitive_desc pd(Engine(), a, b, c);
  return cache.emplace(key, dnnl::matmul(pd)).first->second;
}

ffi::Error MatmulBf16(ffi::Buffer<ffi::BF16> a, ffi::Buffer<ffi::BF16> b,
                      ffi::ResultBuffer<ffi::F32> c, bool trans_a, bool trans_b) {
  auto da = a.dimensions(), db = b.dimensions(), dc = c->dimensions();
  if (da.size() != 3 || db.size() != 3 || dc.size() != 3)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "operands must be rank 3");
  int64_t ga = da[0], gb = db[0], g = dc[0], m = dc[1], n = dc[2];
  int64_t k = trans_a ? da[1] : da[2];
  if ((trans_a ? da[2] : da[1]) != m || (trans_b ? db[1] : db[2]) != n ||
      (trans_b ? db[2] : db[1]) != k || (ga != g && ga != 1) || (gb != g && gb != 1))
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "operand shapes do not match");
  try {
    Key key{ga, gb, g, m, k, n, trans_a, trans_b};
    dnnl::matmul& prim = Primitive(key);
    using dt = dnnl::memory::data_type;
    dnnl::memory ma(Desc(ga, m, k, trans_a, dt::bf16), Engine(), a.untyped_data());
    dnnl::memory mb(Desc(gb, k, n, trans_b, dt::bf16), Engine(), b.untyped_data());
    dnnl::memory mc(dnnl::memory::desc({g, m, n}, dt::f32, {m * n, n, 1}), Engine(),
                    c->untyped_data());
    dnnl::stream stream(Engine());
    prim.execute(stream, {{DNNL_ARG_SRC, ma}, {DNNL_ARG_WEIGHTS, mb}, {DNNL_ARG_DST, mc}});
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, e.what());
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SiamjaxOnednnMatmulBf16, MatmulBf16,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("trans_a")
                                  .Attr<bool>("trans_b"));

extern "C" int siamjax_onednn_isa() {
  return static_cast<int>(dnnl::get_effective_cpu_isa());
}
