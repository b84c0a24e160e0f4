// bf16 x bf16 -> float32 (batched) matrix product through oneDNN, as an XLA FFI handler.
//
// C[g] = op(A[g]) @ op(B[g]) for g < G, row-major, op = transpose when trans_a / trans_b.
// A: bf16[G, M, K] (or [G, K, M] when trans_a), B: bf16[G, K, N] (or [G, N, K]);
// G may be 1 on either side (broadcast). C: f32[G, M, N], or bf16 (float32 sums rounded
// once) for a result that the next product reads as bf16 anyway. oneDNN picks its kernel for
// the CPU at hand (AMX, AVX512-BF16, or an upconverting fallback); `siamjax_onednn_isa`
// reports which ISA it dispatches to. Built on demand by siamjax.cpu_kernels (python -m siamjax.cpu_kernels build).
//
// Also a 'valid', stride-1 2-D convolution (NHWC input, HWIO kernel, NHWC output) with
// bf16 operands and float32 accumulation: forward (bf16 result), input gradient (bf16
// result) and weight gradient (float32 result), oneDNN's convolution primitives with the
// kernel in oneDNN's own layout (reordered from / to HWIO).
//
// And that convolution followed by bias, ReLU and 2x2 max-pooling in one call (float32
// result): the batch is convolved a few images at a time into a bf16 buffer that stays in
// the cache, and each chunk is pooled from there, so the full-size convolution output is
// never written to memory; its weight and bias gradient in one call that forms the
// convolution again the same way; and the pooling block alone, forward and gradient, for
// a convolution output kept from the forward pass.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <map>
#include <mutex>
#include <tuple>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

using Key = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, bool, bool,
                       bool>;  // ..., trans_a, trans_b, bf16 result

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
  auto [ga, gb, g, m, k, n, ta, tb, c_bf16] = key;
  using dt = dnnl::memory::data_type;
  auto a = Desc(ga, m, k, ta, dt::bf16);
  auto b = Desc(gb, k, n, tb, dt::bf16);
  auto c = dnnl::memory::desc({g, m, n}, c_bf16 ? dt::bf16 : dt::f32, {m * n, n, 1});
  dnnl::matmul::primitive_desc pd(Engine(), a, b, c);
  return cache.emplace(key, dnnl::matmul(pd)).first->second;
}

// T: the result's type, F32 or BF16 (the float32 sums rounded to nearest even once).
template <ffi::DataType T>
ffi::Error MatmulBf16(ffi::Buffer<ffi::BF16> a, ffi::Buffer<ffi::BF16> b,
                      ffi::ResultBuffer<T> c, bool trans_a, bool trans_b) {
  auto da = a.dimensions(), db = b.dimensions(), dc = c->dimensions();
  if (da.size() != 3 || db.size() != 3 || dc.size() != 3)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "operands must be rank 3");
  int64_t ga = da[0], gb = db[0], g = dc[0], m = dc[1], n = dc[2];
  int64_t k = trans_a ? da[1] : da[2];
  if ((trans_a ? da[2] : da[1]) != m || (trans_b ? db[1] : db[2]) != n ||
      (trans_b ? db[2] : db[1]) != k || (ga != g && ga != 1) || (gb != g && gb != 1))
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "operand shapes do not match");
  try {
    constexpr bool c_bf16 = T == ffi::DataType::BF16;
    Key key{ga, gb, g, m, k, n, trans_a, trans_b, c_bf16};
    dnnl::matmul& prim = Primitive(key);
    using dt = dnnl::memory::data_type;
    dnnl::memory ma(Desc(ga, m, k, trans_a, dt::bf16), Engine(), a.untyped_data());
    dnnl::memory mb(Desc(gb, k, n, trans_b, dt::bf16), Engine(), b.untyped_data());
    dnnl::memory mc(dnnl::memory::desc({g, m, n}, c_bf16 ? dt::bf16 : dt::f32, {m * n, n, 1}),
                    Engine(), c->untyped_data());
    dnnl::stream stream(Engine());
    prim.execute(stream, {{DNNL_ARG_SRC, ma}, {DNNL_ARG_WEIGHTS, mb}, {DNNL_ARG_DST, mc}});
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, e.what());
  }
  return ffi::Error::Success();
}

// ---- convolution: src bf16[N, H, W, C], weights bf16[KH, KW, C, O], dst bf16[N, Ho, Wo, O]
// (float32 accumulation, rounded once on output: half the memory traffic of a float32 dst);
// weight gradient from src and a bf16 diff_dst, accumulated and returned in float32.

using ConvKey = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t>;

struct ConvFwd {
  dnnl::convolution_forward prim;
  dnnl::memory::desc weights;  // the primitive's weight layout
  dnnl::reorder to_prim;       // user HWIO -> weights
};

struct ConvBwdW {
  dnnl::convolution_backward_weights prim;
  dnnl::memory::desc diff_weights;
  dnnl::reorder to_user;  // diff_weights -> user HWIO (f32)
};

struct ConvBwdD {
  dnnl::convolution_backward_data prim;
  dnnl::memory::desc weights;
  dnnl::reorder to_prim;  // user HWIO -> weights
};

struct ConvDescs {
  dnnl::memory::desc src, dst_f32, dst_bf16, w_any_bf16, w_any_f32, w_user_bf16, w_user_f32;
  dnnl::memory::dims strides{1, 1}, padding{0, 0};
};

ConvDescs MakeConvDescs(const ConvKey& key) {
  auto [n, h, w, c, kh, kw, o] = key;
  using dt = dnnl::memory::data_type;
  using tag = dnnl::memory::format_tag;
  ConvDescs d;
  d.src = dnnl::memory::desc({n, c, h, w}, dt::bf16, tag::nhwc);
  d.dst_f32 = dnnl::memory::desc({n, o, h - kh + 1, w - kw + 1}, dt::f32, tag::nhwc);
  d.dst_bf16 = dnnl::memory::desc({n, o, h - kh + 1, w - kw + 1}, dt::bf16, tag::nhwc);
  d.w_any_bf16 = dnnl::memory::desc({o, c, kh, kw}, dt::bf16, tag::any);
  d.w_any_f32 = dnnl::memory::desc({o, c, kh, kw}, dt::f32, tag::any);
  d.w_user_bf16 = dnnl::memory::desc({o, c, kh, kw}, dt::bf16, tag::hwio);
  d.w_user_f32 = dnnl::memory::desc({o, c, kh, kw}, dt::f32, tag::hwio);
  return d;
}

dnnl::convolution_forward::primitive_desc FwdPd(const ConvDescs& d) {
  return dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
      d.src, d.w_any_bf16, d.dst_bf16, d.strides, d.padding, d.padding);
}

ConvFwd& FwdPrimitive(const ConvKey& key) {
  static std::mutex mu;
  static std::map<ConvKey, ConvFwd> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  ConvDescs d = MakeConvDescs(key);
  auto pd = FwdPd(d);
  ConvFwd f{dnnl::convolution_forward(pd), pd.weights_desc(),
            dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), d.w_user_bf16, Engine(),
                                                         pd.weights_desc()))};
  return cache.emplace(key, std::move(f)).first->second;
}

ConvBwdW& BwdWPrimitive(const ConvKey& key) {
  static std::mutex mu;
  static std::map<ConvKey, ConvBwdW> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  ConvDescs d = MakeConvDescs(key);
  auto hint = dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
      d.src, d.w_any_bf16, d.dst_bf16, d.strides, d.padding, d.padding);
  dnnl::convolution_backward_weights::primitive_desc pd(
      Engine(), dnnl::algorithm::convolution_direct, d.src, d.w_any_f32, d.dst_bf16,
      d.strides, d.padding, d.padding, hint);
  ConvBwdW b{dnnl::convolution_backward_weights(pd), pd.diff_weights_desc(),
             dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), pd.diff_weights_desc(),
                                                          Engine(), d.w_user_f32))};
  return cache.emplace(key, std::move(b)).first->second;
}

ConvBwdD& BwdDPrimitive(const ConvKey& key) {
  static std::mutex mu;
  static std::map<ConvKey, ConvBwdD> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  ConvDescs d = MakeConvDescs(key);
  auto hint = FwdPd(d);
  dnnl::convolution_backward_data::primitive_desc pd(
      Engine(), dnnl::algorithm::convolution_direct, d.src, d.w_any_bf16, d.dst_bf16,
      d.strides, d.padding, d.padding, hint);
  ConvBwdD b{dnnl::convolution_backward_data(pd), pd.weights_desc(),
             dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), d.w_user_bf16, Engine(),
                                                          pd.weights_desc()))};
  return cache.emplace(key, std::move(b)).first->second;
}

// One input channel (conv1 on grey images): the kw columns of each window become kw
// channels, out[n, h, j, q] = x[n, h, j + q] for j < W - kw + 1, and the kernel
// [kh, kw, 1, O] is read as [kh, 1, kw, O] (the same memory). oneDNN 3.2 runs a
// one-channel bf16 convolution on its older jit kernel and this one on brgconv, about 1.7x
// faster on the 2-core Zen 4; the widened input is kw / (W / Wo) times the input's size.
void WidenColumns(const uint16_t* x, int64_t n, int64_t h, int64_t w, int64_t kw,
                  uint16_t* out) {
  int64_t wo = w - kw + 1;
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < n * h; ++r) {
    const uint16_t* src = x + r * w;
    uint16_t* dst = out + r * wo * kw;
    for (int64_t j = 0; j < wo; ++j)
      for (int64_t q = 0; q < kw; ++q) dst[j * kw + q] = src[j + q];
  }
}

// The primitive's key and source for x [N, H, W, C] and a [KH, KW, C, O] kernel: widened
// (see WidenColumns) when C == 1 < KW, into `wide`.
ConvKey PrimKey(int64_t n, int64_t h, int64_t w, int64_t c, int64_t kh, int64_t kw, int64_t o) {
  if (c == 1 && kw > 1) return ConvKey{n, h, w - kw + 1, kw, kh, 1, o};
  return ConvKey{n, h, w, c, kh, kw, o};
}

void* PrimSource(void* x, int64_t n, int64_t h, int64_t w, int64_t c, int64_t kw,
                 std::vector<uint16_t>& wide) {
  if (!(c == 1 && kw > 1)) return x;
  wide.resize(n * h * (w - kw + 1) * kw);
  WidenColumns(static_cast<const uint16_t*>(x), n, h, w, kw, wide.data());
  return wide.data();
}

// x [N, H, W, C], w [KH, KW, C, O], y [N, H - KH + 1, W - KW + 1, O] ('valid', stride 1).
template <typename Dims>
bool ValidConvShapes(const Dims& x, const Dims& w, const Dims& y) {
  return x.size() == 4 && w.size() == 4 && y.size() == 4 && w[2] == x[3] && y[0] == x[0] &&
         y[1] == x[1] - w[0] + 1 && y[2] == x[2] - w[1] + 1 && y[3] == w[3];
}

ffi::Error ConvFwdBf16(ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> w,
                       ffi::ResultBuffer<ffi::BF16> y) {
  auto dx = x.dimensions(), dw = w.dimensions(), dy = y->dimensions();
  if (!ValidConvShapes(dx, dw, dy))
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "conv operand shapes do not match");
  try {
    ConvKey key = PrimKey(dx[0], dx[1], dx[2], dx[3], dw[0], dw[1], dw[3]);
    ConvFwd& f = FwdPrimitive(key);
    ConvDescs d = MakeConvDescs(key);
    dnnl::stream stream(Engine());
    dnnl::memory wu(d.w_user_bf16, Engine(), w.untyped_data());
    dnnl::memory wp(f.weights, Engine());
    f.to_prim.execute(stream, wu, wp);
    std::vector<uint16_t> wide;
    dnnl::memory src(d.src, Engine(),
                     PrimSource(x.untyped_data(), dx[0], dx[1], dx[2], dx[3], dw[1], wide));
    dnnl::memory dst(d.dst_bf16, Engine(), y->untyped_data());
    f.prim.execute(stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, wp}, {DNNL_ARG_DST, dst}});
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, e.what());
  }
  return ffi::Error::Success();
}

ffi::Error ConvBwdWeightsBf16(ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> dy,
                              ffi::ResultBuffer<ffi::F32> dw) {
  auto sx = x.dimensions(), sy = dy.dimensions(), sw = dw->dimensions();
  if (!ValidConvShapes(sx, sw, sy))
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "conv operand shapes do not match");
  try {
    ConvKey key = PrimKey(sx[0], sx[1], sx[2], sx[3], sw[0], sw[1], sw[3]);
    ConvBwdW& b = BwdWPrimitive(key);
    ConvDescs d = MakeConvDescs(key);
    dnnl::stream stream(Engine());
    std::vector<uint16_t> wide;  // widened: the [KH, 1, KW, O] gradient is [KH, KW, 1, O]'s
    dnnl::memory src(d.src, Engine(),
                     PrimSource(x.untyped_data(), sx[0], sx[1], sx[2], sx[3], sw[1], wide));
    dnnl::memory ddst(d.dst_bf16, Engine(), dy.untyped_data());
    dnnl::memory dwp(b.diff_weights, Engine());
    b.prim.execute(stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_DST, ddst},
                            {DNNL_ARG_DIFF_WEIGHTS, dwp}});
    dnnl::memory dwu(d.w_user_f32, Engine(), dw->untyped_data());
    b.to_user.execute(stream, dwp, dwu);
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, e.what());
  }
  return ffi::Error::Success();
}


// dx[N, H, W, C] (bf16: float32 sums rounded once) from w[KH, KW, C, O] and dy[N, Ho, Wo, O].
// Not for a one-channel input (nothing differentiates with respect to the data there).
ffi::Error ConvBwdDataBf16(ffi::Buffer<ffi::BF16> w, ffi::Buffer<ffi::BF16> dy,
                           ffi::ResultBuffer<ffi::BF16> dx) {
  auto sx = dx->dimensions(), sy = dy.dimensions(), sw = w.dimensions();
  if (!ValidConvShapes(sx, sw, sy))
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "conv operand shapes do not match");
  try {
    ConvKey key{sx[0], sx[1], sx[2], sx[3], sw[0], sw[1], sw[3]};
    ConvBwdD& b = BwdDPrimitive(key);
    ConvDescs d = MakeConvDescs(key);
    dnnl::stream stream(Engine());
    dnnl::memory wu(d.w_user_bf16, Engine(), w.untyped_data());
    dnnl::memory wp(b.weights, Engine());
    b.to_prim.execute(stream, wu, wp);
    dnnl::memory ddst(d.dst_bf16, Engine(), dy.untyped_data());
    dnnl::memory dsrc(d.src, Engine(), dx->untyped_data());
    b.prim.execute(stream, {{DNNL_ARG_DIFF_DST, ddst}, {DNNL_ARG_WEIGHTS, wp},
                            {DNNL_ARG_DIFF_SRC, dsrc}});
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, e.what());
  }
  return ffi::Error::Success();
}

// ---- y = maxpool2x2(relu(conv(x, w) + b)), dst f32[N, Ho/2, Wo/2, O] (the forward pass of
// a one-channel first layer, and inference).
// The convolution's bf16 output (float32 sums rounded once, as ConvFwdBf16) is formed
// `kChunk` images at a time in a reused buffer; bias and ReLU commute with the max
// (the same bias per channel, monotone), so the result is pool(relu(float(conv_bf16) + b))
// (the float32 sums of a chunk's primitive may be accumulated in another order than the
// whole batch's: the bf16 rounding may then differ by an ulp).

constexpr int64_t kChunk = 4;

inline float Bf16ToF32(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// Pools one image: conv [Ho, Wo, O] bf16 -> out [Ho/2, Wo/2, O] f32. (Registered only on
// CPUs with AVX512-BF16 or AMX, so AVX512F/BW are there.)
__attribute__((target("avx512f,avx512bw"))) void PoolReluBias(
    const uint16_t* conv, const float* bias, float* out, int64_t ho, int64_t wo, int64_t o) {
  int64_t hp = ho / 2, wp = wo / 2;
  for (int64_t i = 0; i < hp; ++i) {
    const uint16_t* r0 = conv + (2 * i) * wo * o;
    const uint16_t* r1 = r0 + wo * o;
    float* dst = out + i * wp * o;
    for (int64_t j = 0; j < wp; ++j) {
      const uint16_t* a = r0 + 2 * j * o;
      const uint16_t* c = r1 + 2 * j * o;
      float* d = dst + j * o;
      for (int64_t k = 0; k < o; ++k) {
        float m = std::max(std::max(Bf16ToF32(a[k]), Bf16ToF32(a[k + o])),
                           std::max(Bf16ToF32(c[k]), Bf16ToF32(c[k + o])));
        d[k] = std::max(m + bias[k], 0.0f);
      }
    }
  }
}

// conv(x, w) of x bf16[N, H, W, C] and w bf16[KH, KW, C, O], formed `kChunk` images at a
// time into `buf` (bf16[chunk, Ho, Wo, O]) by Form(start), which returns the chunk's image
// count; a short last chunk is zero-padded. `src` is the chunk's (widened) input.
struct ConvChunks {
  ConvChunks(const uint16_t* x, const void* w, int64_t n, int64_t h, int64_t wd, int64_t c,
             int64_t kh, int64_t kw, int64_t o)
      : x(x), n(n), h(h), wd(wd), kw(kw), widen(c == 1 && kw > 1), chunk(std::min(n, kChunk)),
        in_image(h * wd * c), key(PrimKey(chunk, h, wd, c, kh, kw, o)),
        d(MakeConvDescs(key)), f(FwdPrimitive(key)), stream(Engine()),
        wp(f.weights, Engine()),
        in(chunk * h * std::get<2>(key) * std::get<3>(key)),
        buf(chunk * (h - kh + 1) * (wd - kw + 1) * o),
        src(d.src, Engine(), in.data()), dst(d.dst_bf16, Engine(), buf.data()) {
    dnnl::memory wu(d.w_user_bf16, Engine(), const_cast<void*>(w));
    f.to_prim.execute(stream, wu, wp);
  }

  int64_t Form(int64_t start) {
    int64_t m = std::min(chunk, n - start);
    const uint16_t* xs = x + start * in_image;
    if (m < chunk) std::fill(in.begin(), in.end(), 0);
    if (widen)
      WidenColumns(xs, m, h, wd, kw, in.data());
    else
      std::memcpy(in.data(), xs, m * in_image * sizeof(uint16_t));
    f.prim.execute(stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, wp}, {DNNL_ARG_DST, dst}});
    stream.wait();
    return m;
  }

  const uint16_t* x;
  int64_t n, h, wd, kw;
  bool widen;
  int64_t chunk, in_image;
  ConvKey key;
  ConvDescs d;
  ConvFwd& f;
  dnnl::stream stream;
  dnnl::memory wp;
  std::vector<uint16_t> in, buf;
  dnnl::memory src, dst;
};

ffi::Error ConvReluPoolBf16(ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> w,
                            ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> y) {
  auto dx = x.dimensions(), dw = w.dimensions(), dy = y->dimensions();
  int64_t ho = dx.size() == 4 && dw.size() == 4 ? dx[1] - dw[0] + 1 : -1;
  int64_t wo = dx.size() == 4 && dw.size() == 4 ? dx[2] - dw[1] + 1 : -1;
  if (dx.size() != 4 || dw.size() != 4 || dy.size() != 4 || dw[2] != dx[3] ||
      ho % 2 || wo % 2 || dy[0] != dx[0] || dy[1] != ho / 2 || dy[2] != wo / 2 ||
      dy[3] != dw[3] || b.element_count() != dw[3])
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "conv_relu_pool operand shapes do not match");
  try {
    int64_t conv_image = ho * wo * dw[3], out_image = (ho / 2) * (wo / 2) * dw[3];
    ConvChunks cc(static_cast<const uint16_t*>(x.untyped_data()), w.untyped_data(), dx[0],
                  dx[1], dx[2], dx[3], dw[0], dw[1], dw[3]);
    float* out = y->typed_data();
    for (int64_t start = 0; start < dx[0]; start += cc.chunk) {
      int64_t m = cc.Form(start);
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < m; ++i)
        PoolReluBias(cc.buf.data() + i * conv_image, b.typed_data(),
                     out + (start + i) * out_image, ho, wo, dw[3]);
    }
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, e.what());
  }
  return ffi::Error::Success();
}

// ---- its training gradient: dw f32[KH, KW, C, O] and db f32[O] of
// sum(dy * maxpool2x2(relu(conv(x, w) + b))) for dy f32[N, Ho/2, Wo/2, O]. The convolution
// is formed again `kChunk` images at a time (as ConvReluPoolBf16); in each 2x2 block the
// output gradient goes to the positions of the block's maximum, split evenly between exact
// ties, and nowhere where that maximum is not positive (ReLU), as the unfused layer's
// gradient; the chunk's bf16 convolution-output gradient feeds oneDNN's weight gradient,
// summed over chunks in float32. Neither full-size tensor goes to memory.

// One image: conv [Ho, Wo, O] bf16 and dy [Ho/2, Wo/2, O] -> dconv [Ho, Wo, O] bf16, db += .
__attribute__((target("avx512f,avx512bw"))) void PoolReluBiasGrad(
    const uint16_t* __restrict__ conv, const float* __restrict__ bias,
    const float* __restrict__ dy, uint16_t* __restrict__ dconv, float* __restrict__ db,
    int64_t ho, int64_t wo, int64_t o) {
  int64_t hp = ho / 2, wp = wo / 2;
  for (int64_t i = 0; i < hp; ++i) {
    for (int64_t j = 0; j < wp; ++j) {
      int64_t p0 = (2 * i * wo + 2 * j) * o, p2 = p0 + wo * o;
      const uint16_t *a0 = conv + p0, *a1 = conv + p0 + o, *a2 = conv + p2, *a3 = conv + p2 + o;
      uint16_t *d0 = dconv + p0, *d1 = dconv + p0 + o, *d2 = dconv + p2, *d3 = dconv + p2 + o;
      const float* g = dy + (i * wp + j) * o;
      for (int64_t k = 0; k < o; ++k) {
        float v0 = Bf16ToF32(a0[k]) + bias[k], v1 = Bf16ToF32(a1[k]) + bias[k];
        float v2 = Bf16ToF32(a2[k]) + bias[k], v3 = Bf16ToF32(a3[k]) + bias[k];
        float m = std::max(std::max(v0, v1), std::max(v2, v3));
        float ties = static_cast<float>(v0 == m) + static_cast<float>(v1 == m) +
                     static_cast<float>(v2 == m) + static_cast<float>(v3 == m);
        float share = m > 0.0f ? g[k] / ties : 0.0f;
        uint32_t u;
        std::memcpy(&u, &share, sizeof(u));
        uint16_t sb = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
        d0[k] = v0 == m ? sb : 0;
        d1[k] = v1 == m ? sb : 0;
        d2[k] = v2 == m ? sb : 0;
        d3[k] = v3 == m ? sb : 0;
        db[k] += share * ties;
      }
    }
  }
}

ffi::Error ConvReluPoolBwdBf16(ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> w,
                               ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::F32> dy,
                               ffi::ResultBuffer<ffi::F32> dw, ffi::ResultBuffer<ffi::F32> db) {
  auto dx = x.dimensions(), sw = w.dimensions(), sy = dy.dimensions();
  int64_t ho = dx.size() == 4 && sw.size() == 4 ? dx[1] - sw[0] + 1 : -1;
  int64_t wo = dx.size() == 4 && sw.size() == 4 ? dx[2] - sw[1] + 1 : -1;
  auto sdw = dw->dimensions();
  if (dx.size() != 4 || sw.size() != 4 || sy.size() != 4 || sw[2] != dx[3] ||
      ho % 2 || wo % 2 || sy[0] != dx[0] || sy[1] != ho / 2 || sy[2] != wo / 2 ||
      sy[3] != sw[3] || b.element_count() != sw[3] || db->element_count() != sw[3] ||
      sdw.size() != 4 || sdw[0] != sw[0] || sdw[1] != sw[1] || sdw[2] != sw[2] ||
      sdw[3] != sw[3])
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "conv_relu_pool gradient operand shapes do not match");
  try {
    int64_t o = sw[3], conv_image = ho * wo * o, out_image = (ho / 2) * (wo / 2) * o;
    int64_t wsize = sw[0] * sw[1] * sw[2] * o;
    ConvChunks cc(static_cast<const uint16_t*>(x.untyped_data()), w.untyped_data(), dx[0],
                  dx[1], dx[2], dx[3], sw[0], sw[1], o);
    ConvBwdW& bw = BwdWPrimitive(cc.key);
    std::vector<uint16_t> grad(cc.buf.size());
    std::vector<float> part(wsize), dbs(cc.chunk * o);
    dnnl::memory ddst(cc.d.dst_bf16, Engine(), grad.data());
    dnnl::memory dwp(bw.diff_weights, Engine());
    dnnl::memory dwu(cc.d.w_user_f32, Engine(), part.data());
    float* out_w = dw->typed_data();
    float* out_b = db->typed_data();
    std::fill(out_w, out_w + wsize, 0.0f);
    std::fill(out_b, out_b + o, 0.0f);
    for (int64_t start = 0; start < dx[0]; start += cc.chunk) {
      int64_t m = cc.Form(start);
      if (m < cc.chunk) std::fill(grad.begin(), grad.end(), 0);  // short chunk: zero tail
      std::fill(dbs.begin(), dbs.end(), 0.0f);
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < m; ++i)
        PoolReluBiasGrad(cc.buf.data() + i * conv_image, b.typed_data(),
                         dy.typed_data() + (start + i) * out_image,
                         grad.data() + i * conv_image, dbs.data() + i * o, ho, wo, o);
      bw.prim.execute(cc.stream, {{DNNL_ARG_SRC, cc.src}, {DNNL_ARG_DIFF_DST, ddst},
                                  {DNNL_ARG_DIFF_WEIGHTS, dwp}});
      bw.to_user.execute(cc.stream, dwp, dwu);
      cc.stream.wait();
      for (int64_t k = 0; k < wsize; ++k) out_w[k] += part[k];
      for (int64_t i = 0; i < m; ++i)
        for (int64_t k = 0; k < o; ++k) out_b[k] += dbs[i * o + k];
    }
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, e.what());
  }
  return ffi::Error::Success();
}

// ---- the pooling block alone, for a convolution output kept from the forward pass:
// y f32[N, Ho/2, Wo/2, O] = maxpool2x2(relu(conv + b)) from conv bf16[N, Ho, Wo, O], and
// its gradient (dconv bf16, db f32) as ConvReluPoolBwdBf16's, without forming conv again.

template <typename Dims>
bool PoolShapes(const Dims& c, const Dims& y, int64_t bias) {
  return c.size() == 4 && y.size() == 4 && c[1] % 2 == 0 && c[2] % 2 == 0 && y[0] == c[0] &&
         y[1] == c[1] / 2 && y[2] == c[2] / 2 && y[3] == c[3] && bias == c[3];
}

ffi::Error PoolReluBiasBf16(ffi::Buffer<ffi::BF16> conv, ffi::Buffer<ffi::F32> b,
                            ffi::ResultBuffer<ffi::F32> y) {
  auto sc = conv.dimensions(), sy = y->dimensions();
  if (!PoolShapes(sc, sy, b.element_count()))
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "pool operand shapes do not match");
  int64_t n = sc[0], ho = sc[1], wo = sc[2], o = sc[3];
  const uint16_t* c = static_cast<const uint16_t*>(conv.untyped_data());
  float* out = y->typed_data();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i)
    PoolReluBias(c + i * ho * wo * o, b.typed_data(), out + i * (ho / 2) * (wo / 2) * o, ho,
                 wo, o);
  return ffi::Error::Success();
}

ffi::Error PoolReluBiasBwdBf16(ffi::Buffer<ffi::BF16> conv, ffi::Buffer<ffi::F32> b,
                               ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::BF16> dconv,
                               ffi::ResultBuffer<ffi::F32> db) {
  auto sc = conv.dimensions(), sy = dy.dimensions(), sd = dconv->dimensions();
  if (!PoolShapes(sc, sy, b.element_count()) || db->element_count() != sc[3] ||
      sd.size() != 4 || sd[0] != sc[0] || sd[1] != sc[1] || sd[2] != sc[2] || sd[3] != sc[3])
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "pool gradient shapes do not match");
  int64_t n = sc[0], ho = sc[1], wo = sc[2], o = sc[3];
  int64_t conv_image = ho * wo * o, out_image = (ho / 2) * (wo / 2) * o;
  const uint16_t* c = static_cast<const uint16_t*>(conv.untyped_data());
  uint16_t* dc = static_cast<uint16_t*>(dconv->untyped_data());
  std::vector<float> dbs(n * o, 0.0f);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i)
    PoolReluBiasGrad(c + i * conv_image, b.typed_data(), dy.typed_data() + i * out_image,
                     dc + i * conv_image, dbs.data() + i * o, ho, wo, o);
  float* out_b = db->typed_data();
  std::fill(out_b, out_b + o, 0.0f);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t k = 0; k < o; ++k) out_b[k] += dbs[i * o + k];
  return ffi::Error::Success();
}

// ---- inference dense layer: C = A @ round_bf16(B), A bf16[M, K], B f32[K, N] (float32
// parameters), C f32[M, N]. B is rounded to bf16 (to nearest even, as XLA's convert)
// kDenseCols columns at a time into a buffer that stays in the cache, and each block of
// C is one oneDNN product: the rounded copy of B is never written to memory.

constexpr int64_t kDenseCols = 256;

__attribute__((target("avx512f,avx512bw"))) void RoundColumns(
    const float* b, int64_t k, int64_t n, int64_t n0, int64_t cols, uint16_t* out) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < k; ++r) {
    const float* src = b + r * n + n0;
    uint16_t* dst = out + r * cols;
    for (int64_t j = 0; j < cols; ++j) {
      uint32_t u;
      std::memcpy(&u, &src[j], sizeof(u));
      dst[j] = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    }
  }
}

ffi::Error DenseF32WeightsBf16(ffi::Buffer<ffi::BF16> a, ffi::Buffer<ffi::F32> b,
                               ffi::ResultBuffer<ffi::F32> c) {
  auto da = a.dimensions(), db = b.dimensions(), dc = c->dimensions();
  if (da.size() != 2 || db.size() != 2 || dc.size() != 2 || da[1] != db[0] ||
      dc[0] != da[0] || dc[1] != db[1])
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "dense operand shapes do not match");
  try {
    int64_t m = da[0], k = da[1], n = db[1];
    using dt = dnnl::memory::data_type;
    std::vector<uint16_t> buf(k * std::min(n, kDenseCols));
    dnnl::memory ma(dnnl::memory::desc({1, m, k}, dt::bf16, {m * k, k, 1}), Engine(),
                    a.untyped_data());
    dnnl::stream stream(Engine());
    for (int64_t n0 = 0; n0 < n; n0 += kDenseCols) {
      int64_t cols = std::min(kDenseCols, n - n0);
      RoundColumns(b.typed_data(), k, n, n0, cols, buf.data());
      dnnl::memory::desc wd({1, k, cols}, dt::bf16, {k * cols, cols, 1});
      dnnl::memory::desc cd({1, m, cols}, dt::f32, {m * n, n, 1});  // columns of C
      static std::mutex mu;
      static std::map<std::tuple<int64_t, int64_t, int64_t, int64_t>, dnnl::matmul> cache;
      dnnl::matmul* prim;
      {
        std::lock_guard<std::mutex> lock(mu);
        auto key = std::make_tuple(m, k, cols, n);
        auto it = cache.find(key);
        if (it == cache.end()) {
          dnnl::matmul::primitive_desc pd(Engine(), ma.get_desc(), wd, cd);
          it = cache.emplace(key, dnnl::matmul(pd)).first;
        }
        prim = &it->second;
      }
      dnnl::memory mb(wd, Engine(), buf.data());
      dnnl::memory mc(cd, Engine(), c->typed_data() + n0);
      prim->execute(stream, {{DNNL_ARG_SRC, ma}, {DNNL_ARG_WEIGHTS, mb}, {DNNL_ARG_DST, mc}});
      stream.wait();
    }
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, e.what());
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SiamjaxOnednnMatmulBf16, MatmulBf16<ffi::DataType::F32>,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("trans_a")
                                  .Attr<bool>("trans_b"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SiamjaxOnednnMatmulBf16Out, MatmulBf16<ffi::DataType::BF16>,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>()
                                  .Attr<bool>("trans_a")
                                  .Attr<bool>("trans_b"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SiamjaxOnednnConvBf16, ConvFwdBf16,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SiamjaxOnednnConvBwdWeightsBf16, ConvBwdWeightsBf16,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SiamjaxOnednnConvBwdDataBf16, ConvBwdDataBf16,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SiamjaxOnednnConvReluPoolBf16, ConvReluPoolBf16,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SiamjaxOnednnConvReluPoolBwdBf16, ConvReluPoolBwdBf16,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SiamjaxPoolReluBiasBf16, PoolReluBiasBf16,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SiamjaxPoolReluBiasBwdBf16, PoolReluBiasBwdBf16,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SiamjaxOnednnDenseF32WeightsBf16, DenseF32WeightsBf16,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

extern "C" int siamjax_onednn_isa() {
  return static_cast<int>(dnnl::get_effective_cpu_isa());
}
