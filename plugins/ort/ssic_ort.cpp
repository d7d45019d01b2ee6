// ONNX Runtime binding of the ssic ops (domain "ssic", version 1) through the lite custom-op API.
// The library does not link against libonnxruntime: the API table comes from the OrtApiBase* that
// RegisterCustomOps receives (ORT_API_MANUAL_INIT).
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#include <onnxruntime_lite_custom_op.h>
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "kernels.h"

#ifndef SSIC_ORT_VERSION
#define SSIC_ORT_VERSION "0.0.0"
#endif

namespace {

using Ort::Custom::Tensor;
using OptionalTensor = std::optional<const Tensor<float>*>;

static_assert(sizeof(Ort::Float16_t) == sizeof(uint16_t), "Ort::Float16_t must be the bare binary16 bits");

constexpr const char* kDomain = "ssic";
constexpr int kOpVersion = 1;

// Reads attributes with defaults; a missing required attribute is reported at Compute time
// (exceptions must not cross ORT's C callbacks).
struct AttrReader {
  const OrtApi* api;
  const OrtKernelInfo* info;
  std::string error;

  int64_t get_int(const char* name, std::optional<int64_t> dflt) {
    int64_t v = 0;
    if (OrtStatus* st = api->KernelInfoGetAttribute_int64(info, name, &v)) {
      api->ReleaseStatus(st);
      if (!dflt && error.empty()) error = std::string("missing required attribute '") + name + "'";
      return dflt.value_or(1);
    }
    return v;
  }
  float get_float(const char* name, float dflt) {
    float v = 0.0f;
    if (OrtStatus* st = api->KernelInfoGetAttribute_float(info, name, &v)) {
      api->ReleaseStatus(st);
      return dflt;
    }
    return v;
  }
};

// Runs chunks of a range on the session's intra-op thread pool.
ssic::ParallelFor make_pfor(OrtKernelContext* ctx) {
  return [ctx](int64_t total, const std::function<void(int64_t, int64_t)>& body) {
    if (total <= 0) return;
    // We cut the range ourselves (at most 64 chunks, fine enough for dynamic balance on a few
    // cores) and hand ORT one callback per chunk.
    const int64_t chunks = std::min<int64_t>(total, 64);
    if (chunks == 1) {
      body(0, total);
      return;
    }
    struct Job {
      const std::function<void(int64_t, int64_t)>* body;
      int64_t total, chunks;
    } job{&body, total, chunks};
    auto fn = [](void* data, size_t c) {
      const Job* j = static_cast<const Job*>(data);
      const int64_t ci = static_cast<int64_t>(c);
      (*j->body)(j->total * ci / j->chunks, j->total * (ci + 1) / j->chunks);
    };
    Ort::ThrowOnError(Ort::GetApi().KernelContext_ParallelFor(ctx, fn, static_cast<size_t>(chunks), 0, &job));
  };
}

Ort::Status invalid(const std::string& msg) { return Ort::Status(msg.c_str(), ORT_INVALID_ARGUMENT); }

std::string shape_str(const std::vector<int64_t>& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

bool is_pairs(const std::vector<int64_t>& s) { return s.size() == 2 && s[1] == 2; }

// An input as the kernels see it, whichever way it was read (lite API or raw context).
template <typename T>
struct View {
  const T* data = nullptr;
  std::vector<int64_t> shape;
  bool present = false;
};

template <typename T>
View<T> view(const Tensor<T>& t) {
  return {t.Data(), t.Shape(), true};
}

View<float> view(const OptionalTensor& t) {
  if (!t.has_value() || *t == nullptr) return {};
  return view(**t);
}

// Reads input i straight from the context; absent (not given, or given as "") -> !present.
template <typename T>
View<T> raw_input(OrtKernelContext* ctx, size_t i) {
  Ort::KernelContext k(ctx);
  if (i >= k.GetInputCount()) return {};
  Ort::ConstValue v = k.GetInput(i);
  if (static_cast<const OrtValue*>(v) == nullptr) return {};
  return {v.GetTensorData<T>(), v.GetTensorTypeAndShapeInfo().GetShape(), true};
}

using Allocator = std::function<float*(const std::vector<int64_t>&)>;

// A cache input goes to the kernels as float32 or as float16 bits (kernels.h: exactly one pointer set).
void set_cache(const float* data, const float*& f32, const uint16_t*& /*f16*/) { f32 = data; }
void set_cache(const Ort::Float16_t* data, const float*& /*f32*/, const uint16_t*& f16) {
  f16 = reinterpret_cast<const uint16_t*>(data);
}

Allocator raw_output(OrtKernelContext* ctx) {
  return [ctx](const std::vector<int64_t>& shape) {
    return Ort::KernelContext(ctx).GetOutput(0, shape).GetTensorMutableData<float>();
  };
}

const float* optional_vector(const View<float>& t, int64_t channels, const char* op, const char* what,
                             std::string& err) {
  if (!t.present) return nullptr;
  if (t.shape.size() != 1 || t.shape[0] != channels) {
    err = std::string(op) + ": " + what + " must have shape [" + std::to_string(channels) + "], got " +
          shape_str(t.shape);
    return nullptr;
  }
  return t.data;
}

// The lite API builds every input up to the last one given, and crashes on an optional input that
// is omitted ("") before a given one (TileGather with shift but no scale). Kernels therefore have
// two entry points: Compute (the lite API's typed path) and ComputeRaw (reads the context itself);
// install_guard routes nodes with an omitted middle input to ComputeRaw.
template <typename K>
struct ComputeGuard {
  static inline OrtStatusPtr(ORT_API_CALL* lite_compute)(void*, OrtKernelContext*) = nullptr;

  static OrtStatusPtr ORT_API_CALL compute(void* op_kernel, OrtKernelContext* ctx) {
    Ort::KernelContext k(ctx);
    const size_t count = k.GetInputCount();
    for (size_t i = 0; i < count; ++i) {
      if (static_cast<const OrtValue*>(k.GetInput(i)) == nullptr) {
        auto* kernel = reinterpret_cast<typename Ort::Custom::OrtLiteCustomStruct<K>::Kernel*>(op_kernel);
        return kernel->custom_op_->ComputeRaw(ctx).release();
      }
    }
    return lite_compute(op_kernel, ctx);
  }
};

template <typename K>
OrtCustomOp* create_op(const char* name) {
  auto* op = Ort::Custom::CreateLiteCustomOp<K>(name, "CPUExecutionProvider", kOpVersion, kOpVersion);
  ComputeGuard<K>::lite_compute = op->KernelComputeV2;
  op->KernelComputeV2 = &ComputeGuard<K>::compute;
  return op;
}

// The gather attributes of TileGather and TileConv.
std::string read_gather_params(AttrReader& r, ssic::GatherParams& p) {
  p.src_tile = r.get_int("src_tile", std::nullopt);
  p.tile = r.get_int("tile", std::nullopt);
  p.kernel = r.get_int("kernel", std::nullopt);
  p.stride = r.get_int("stride", 1);
  p.pad_top = r.get_int("pad_top", 0);
  p.pad_left = r.get_int("pad_left", 0);
  p.upsample = r.get_int("upsample", 1);
  p.activation = r.get_int("activation", 0);
  p.alpha = r.get_float("alpha", 0.01f);
  p.src_layout = r.get_int("src_layout", 0);
  p.pad_mode = r.get_int("pad_mode", 0);
  if (!r.error.empty()) return r.error;
  if (p.src_tile < 1 || p.tile < 1 || p.kernel < 1 || p.stride < 1 || p.upsample < 1)
    return "src_tile, tile, kernel, stride and upsample must be >= 1";
  if (p.activation < 0 || p.activation > 3) return "activation must be 0..3";
  if (p.src_layout != 0 && p.src_layout != 1) return "src_layout must be 0 or 1";
  if (p.pad_mode < 0 || p.pad_mode > 2) return "pad_mode must be 0..2";
  return {};
}

// Checks the gather inputs (shared by TileGather and TileConv) and fills the kernel arguments.
template <typename CacheT>
std::string gather_args(const char* op, const ssic::GatherParams& p, const View<float>& tiles,
                        const View<CacheT>& cache, const View<int64_t>& src_idx, const View<int64_t>& dst_idx,
                        const View<float>& scale, const View<float>& shift, ssic::GatherArgs& a) {
  const std::string o(op);
  if (!tiles.present || !cache.present || !src_idx.present || !dst_idx.present)
    return o + ": tiles, cache, src_idx and dst_idx are required";
  const auto& cs = cache.shape;
  if (p.src_layout == 0) {
    if (cs.size() != 3) return o + ": NHWC cache must be [Hs, Ws, C], got " + shape_str(cs);
    a.hs = cs[0], a.ws = cs[1], a.channels = cs[2];
  } else {
    if (cs.size() != 4 || cs[0] != 1) return o + ": NCHW cache must be [1, C, Hs, Ws], got " + shape_str(cs);
    a.channels = cs[1], a.hs = cs[2], a.ws = cs[3];
  }
  if (!is_pairs(src_idx.shape)) return o + ": src_idx must be [m, 2], got " + shape_str(src_idx.shape);
  if (!is_pairs(dst_idx.shape)) return o + ": dst_idx must be [n, 2], got " + shape_str(dst_idx.shape);
  a.m = src_idx.shape[0];
  a.n = dst_idx.shape[0];
  const std::vector<int64_t> want{a.m * p.src_tile * p.src_tile, a.channels};
  if (tiles.shape != want)
    return o + ": tiles must be [m*src_tile^2, C] = " + shape_str(want) + ", got " + shape_str(tiles.shape);
  std::string err;
  a.scale = optional_vector(scale, a.channels, op, "scale", err);
  if (err.empty()) a.shift = optional_vector(shift, a.channels, op, "shift", err);
  if (!err.empty()) return err;
  a.tiles = tiles.data;
  set_cache(cache.data, a.cache, a.cache_f16);
  a.src_idx = src_idx.data;
  a.dst_idx = dst_idx.data;
  return {};
}

// Each op is registered twice, with a float32 and with a float16 `cache` input (CacheT): ONNX Runtime
// merges the two into one schema and picks the kernel by the cache's type. Every other input and the
// output are float32 in both.
template <typename CacheT>
struct TileGatherKernel {
  ssic::GatherParams p{};
  std::string attr_error;

  TileGatherKernel(const OrtApi* api, const OrtKernelInfo* info) {
    AttrReader r{api, info, {}};
    attr_error = read_gather_params(r, p);
  }

  Ort::Status Compute(OrtKernelContext* ctx, const Tensor<float>& tiles, const Tensor<CacheT>& cache,
                      const Tensor<int64_t>& src_idx, const Tensor<int64_t>& dst_idx, OptionalTensor scale,
                      OptionalTensor shift, Tensor<float>& cols) {
    return Run(ctx, view(tiles), view(cache), view(src_idx), view(dst_idx), view(scale), view(shift),
               [&cols](const std::vector<int64_t>& shape) { return cols.Allocate(shape); });
  }

  Ort::Status ComputeRaw(OrtKernelContext* ctx) {
    return Run(ctx, raw_input<float>(ctx, 0), raw_input<CacheT>(ctx, 1), raw_input<int64_t>(ctx, 2),
               raw_input<int64_t>(ctx, 3), raw_input<float>(ctx, 4), raw_input<float>(ctx, 5), raw_output(ctx));
  }

  Ort::Status Run(OrtKernelContext* ctx, const View<float>& tiles, const View<CacheT>& cache,
                  const View<int64_t>& src_idx, const View<int64_t>& dst_idx, const View<float>& scale,
                  const View<float>& shift, const Allocator& allocate) {
    try {
      if (!attr_error.empty()) return invalid("TileGather: " + attr_error);
      ssic::GatherArgs a{};
      std::string err = gather_args("TileGather", p, tiles, cache, src_idx, dst_idx, scale, shift, a);
      if (!err.empty()) return invalid(err);
      a.cols = allocate({a.n * p.tile * p.tile, p.kernel * p.kernel * a.channels});
      err = ssic::tile_gather(p, a, make_pfor(ctx));
      if (!err.empty()) return invalid(err);
      return Ort::Status{nullptr};
    } catch (const std::exception& e) {
      return Ort::Status(e.what(), ORT_RUNTIME_EXCEPTION);
    }
  }
};

// TileGather fused with the conv's MatMul (+ bias, + a partial sum): no im2col buffer.
template <typename CacheT>
struct TileConvKernel {
  ssic::GatherParams p{};
  int64_t cout = 0;
  std::string attr_error;

  TileConvKernel(const OrtApi* api, const OrtKernelInfo* info) {
    AttrReader r{api, info, {}};
    attr_error = read_gather_params(r, p);
    cout = r.get_int("cout", std::nullopt);
    if (attr_error.empty()) attr_error = r.error;
    if (attr_error.empty() && cout < 1) attr_error = "cout must be >= 1";
  }

  Ort::Status Compute(OrtKernelContext* ctx, const Tensor<float>& tiles, const Tensor<CacheT>& cache,
                      const Tensor<int64_t>& src_idx, const Tensor<int64_t>& dst_idx, const Tensor<float>& weight,
                      OptionalTensor scale, OptionalTensor shift, OptionalTensor bias, OptionalTensor addend,
                      Tensor<float>& out) {
    return Run(ctx, view(tiles), view(cache), view(src_idx), view(dst_idx), view(weight), view(scale), view(shift),
               view(bias), view(addend), [&out](const std::vector<int64_t>& shape) { return out.Allocate(shape); });
  }

  Ort::Status ComputeRaw(OrtKernelContext* ctx) {
    return Run(ctx, raw_input<float>(ctx, 0), raw_input<CacheT>(ctx, 1), raw_input<int64_t>(ctx, 2),
               raw_input<int64_t>(ctx, 3), raw_input<float>(ctx, 4), raw_input<float>(ctx, 5),
               raw_input<float>(ctx, 6), raw_input<float>(ctx, 7), raw_input<float>(ctx, 8), raw_output(ctx));
  }

  Ort::Status Run(OrtKernelContext* ctx, const View<float>& tiles, const View<CacheT>& cache,
                  const View<int64_t>& src_idx, const View<int64_t>& dst_idx, const View<float>& weight,
                  const View<float>& scale, const View<float>& shift, const View<float>& bias,
                  const View<float>& addend, const Allocator& allocate) {
    try {
      if (!attr_error.empty()) return invalid("TileConv: " + attr_error);
      ssic::GatherArgs a{};
      std::string err = gather_args("TileConv", p, tiles, cache, src_idx, dst_idx, scale, shift, a);
      if (!err.empty()) return invalid(err);
      const int64_t K = p.kernel * p.kernel * a.channels, M = a.n * p.tile * p.tile;
      const std::vector<int64_t> wshape{(cout + 15) / 16, K, 16};
      if (!weight.present || weight.shape != wshape)
        return invalid("TileConv: weight must be packed as [ceil(cout/16), k*k*C, 16] = " + shape_str(wshape) +
                       ", got " + shape_str(weight.shape));
      ssic::ConvArgs c{};
      c.weight = weight.data;
      c.cout = cout;
      c.bias = optional_vector(bias, cout, "TileConv", "bias", err);
      if (!err.empty()) return invalid(err);
      if (addend.present) {
        if (addend.shape != std::vector<int64_t>{M, cout})
          return invalid("TileConv: addend must be " + shape_str({M, cout}) + ", got " + shape_str(addend.shape));
        c.addend = addend.data;
      }
      c.out = allocate({M, cout});
      err = ssic::tile_conv(p, a, c, make_pfor(ctx));
      if (!err.empty()) return invalid(err);
      return Ort::Status{nullptr};
    } catch (const std::exception& e) {
      return Ort::Status(e.what(), ORT_RUNTIME_EXCEPTION);
    }
  }
};

template <typename CacheT>
struct TileScatterKernel {
  ssic::ScatterParams p{};
  std::string attr_error;

  TileScatterKernel(const OrtApi* api, const OrtKernelInfo* info) {
    AttrReader r{api, info, {}};
    p.tile = r.get_int("tile", std::nullopt);
    p.activation = r.get_int("activation", 0);
    p.alpha = r.get_float("alpha", 0.01f);
    attr_error = r.error;
    if (attr_error.empty() && p.tile < 1) attr_error = "tile must be >= 1";
    if (attr_error.empty() && (p.activation < 0 || p.activation > 3)) attr_error = "activation must be 0..3";
  }

  Ort::Status Compute(OrtKernelContext* ctx, const Tensor<float>& tiles, const Tensor<CacheT>& cache,
                      const Tensor<int64_t>& idx, OptionalTensor residual, Tensor<float>& out) {
    return Run(ctx, view(tiles), view(cache), view(idx), view(residual),
               [&out](const std::vector<int64_t>& shape) { return out.Allocate(shape); });
  }

  Ort::Status ComputeRaw(OrtKernelContext* ctx) {
    return Run(ctx, raw_input<float>(ctx, 0), raw_input<CacheT>(ctx, 1), raw_input<int64_t>(ctx, 2),
               raw_input<float>(ctx, 3), raw_output(ctx));
  }

  Ort::Status Run(OrtKernelContext* ctx, const View<float>& tiles, const View<CacheT>& cache,
                  const View<int64_t>& idx, const View<float>& residual, const Allocator& allocate) {
    try {
      if (!attr_error.empty()) return invalid("TileScatter: " + attr_error);
      if (!tiles.present || !cache.present || !idx.present)
        return invalid("TileScatter: tiles, cache and idx are required");
      const auto& cs = cache.shape;
      if (cs.size() != 4 || cs[0] != 1) return invalid("TileScatter: cache must be [1, C, H, W], got " + shape_str(cs));
      ssic::ScatterArgs a{};
      a.channels = cs[1], a.height = cs[2], a.width = cs[3];
      if (!is_pairs(idx.shape)) return invalid("TileScatter: idx must be [n, 2], got " + shape_str(idx.shape));
      a.n = idx.shape[0];
      const std::vector<int64_t> want{a.n * p.tile * p.tile, a.channels};
      if (tiles.shape != want)
        return invalid("TileScatter: tiles must be " + shape_str(want) + ", got " + shape_str(tiles.shape));
      if (residual.present) {
        if (residual.shape != want)
          return invalid("TileScatter: residual must be " + shape_str(want) + ", got " + shape_str(residual.shape));
        a.residual = residual.data;
      }
      a.tiles = tiles.data;
      set_cache(cache.data, a.cache, a.cache_f16);
      a.idx = idx.data;
      a.out = allocate(cs);
      const std::string err = ssic::tile_scatter(p, a, make_pfor(ctx));
      if (!err.empty()) return invalid(err);
      return Ort::Status{nullptr};
    } catch (const std::exception& e) {
      return Ort::Status(e.what(), ORT_RUNTIME_EXCEPTION);
    }
  }
};

template <typename CacheT>
struct TileMomentsKernel {
  int64_t tile = 1;
  std::string attr_error;

  TileMomentsKernel(const OrtApi* api, const OrtKernelInfo* info) {
    AttrReader r{api, info, {}};
    tile = r.get_int("tile", std::nullopt);
    attr_error = r.error;
    if (attr_error.empty() && tile < 1) attr_error = "tile must be >= 1";
  }

  Ort::Status Compute(OrtKernelContext* ctx, const Tensor<float>& tiles, const Tensor<CacheT>& cache,
                      const Tensor<int64_t>& idx, Tensor<double>& sum, Tensor<double>& sumsq) {
    try {
      if (!attr_error.empty()) return invalid("TileMoments: " + attr_error);
      const auto cs = cache.Shape();
      if (cs.size() != 3) return invalid("TileMoments: cache must be [H, W, C], got " + shape_str(cs));
      if (!is_pairs(idx.Shape())) return invalid("TileMoments: idx must be [n, 2], got " + shape_str(idx.Shape()));
      ssic::MomentsArgs a{};
      a.height = cs[0], a.width = cs[1], a.channels = cs[2], a.tile = tile, a.n = idx.Shape()[0];
      const std::vector<int64_t> want{a.n * tile * tile, a.channels};
      if (tiles.Shape() != want)
        return invalid("TileMoments: tiles must be " + shape_str(want) + ", got " + shape_str(tiles.Shape()));
      a.tiles = tiles.Data();
      set_cache(cache.Data(), a.cache, a.cache_f16);
      a.idx = idx.Data();
      a.sum = sum.Allocate({a.channels});
      a.sumsq = sumsq.Allocate({a.channels});
      const std::string err = ssic::tile_moments(a, make_pfor(ctx));
      if (!err.empty()) return invalid(err);
      return Ort::Status{nullptr};
    } catch (const std::exception& e) {
      return Ort::Status(e.what(), ORT_RUNTIME_EXCEPTION);
    }
  }

  // Every input is required: the guard never routes here, but create_op needs the entry point.
  Ort::Status ComputeRaw(OrtKernelContext* /*ctx*/) { return invalid("TileMoments: tiles, cache and idx are required"); }
};

// A per-channel affine map and activation over the rows of a tile tensor (the pending epilogue of a
// GroupNorm or BatchNorm, made one pass instead of ONNX Runtime's broadcasting Mul, Add and activation).
struct TileAffineKernel {
  int64_t activation = 0;
  float alpha = 0.01f;
  std::string attr_error;

  TileAffineKernel(const OrtApi* api, const OrtKernelInfo* info) {
    AttrReader r{api, info, {}};
    activation = r.get_int("activation", 0);
    alpha = r.get_float("alpha", 0.01f);
    attr_error = r.error;
    if (attr_error.empty() && (activation < 0 || activation > 3)) attr_error = "activation must be 0..3";
  }

  Ort::Status Compute(OrtKernelContext* ctx, const Tensor<float>& x, const Tensor<float>& scale,
                      const Tensor<float>& shift, Tensor<float>& y) {
    try {
      if (!attr_error.empty()) return invalid("TileAffine: " + attr_error);
      const auto xs = x.Shape();
      if (xs.size() != 2) return invalid("TileAffine: x must be [rows, C], got " + shape_str(xs));
      const std::vector<int64_t> want{xs[1]};
      if (scale.Shape() != want || shift.Shape() != want)
        return invalid("TileAffine: scale and shift must be " + shape_str(want) + ", got " + shape_str(scale.Shape()) +
                       " and " + shape_str(shift.Shape()));
      ssic::AffineArgs a{};
      a.x = x.Data(), a.scale = scale.Data(), a.shift = shift.Data();
      a.rows = xs[0], a.channels = xs[1], a.activation = activation, a.alpha = alpha;
      a.y = y.Allocate(xs);
      const std::string err = ssic::tile_affine(a, make_pfor(ctx));
      if (!err.empty()) return invalid(err);
      return Ort::Status{nullptr};
    } catch (const std::exception& e) {
      return Ort::Status(e.what(), ORT_RUNTIME_EXCEPTION);
    }
  }

  // Every input is required: the guard never routes here, but create_op needs the entry point.
  Ort::Status ComputeRaw(OrtKernelContext* /*ctx*/) { return invalid("TileAffine: x, scale and shift are required"); }
};

// A GroupNorm's scale and shift from its sums: [C] vectors, so one thread and no blocking.
struct GroupNormAffineKernel {
  int64_t groups = 1, count = 1;
  float epsilon = 1e-5f;
  std::string attr_error;

  GroupNormAffineKernel(const OrtApi* api, const OrtKernelInfo* info) {
    AttrReader r{api, info, {}};
    groups = r.get_int("groups", std::nullopt);
    count = r.get_int("count", std::nullopt);
    epsilon = r.get_float("epsilon", 1e-5f);
    attr_error = r.error;
  }

  Ort::Status Compute(OrtKernelContext* /*ctx*/, const Tensor<double>& sum, const Tensor<double>& sumsq,
                      const Tensor<double>& dsum, const Tensor<double>& dsumsq, const Tensor<double>& gamma,
                      const Tensor<double>& beta, Tensor<double>& new_sum, Tensor<double>& new_sumsq,
                      Tensor<float>& scale, Tensor<float>& shift) {
    try {
      if (!attr_error.empty()) return invalid("GroupNormAffine: " + attr_error);
      const auto shape = sum.Shape();
      if (shape.size() != 1) return invalid("GroupNormAffine: sum must be [C], got " + shape_str(shape));
      for (const auto* t : {&sumsq, &dsum, &dsumsq, &gamma, &beta}) {
        if (t->Shape() != shape)
          return invalid("GroupNormAffine: every input must be " + shape_str(shape) + ", got " + shape_str(t->Shape()));
      }
      ssic::GroupNormAffineArgs a{};
      a.sum = sum.Data(), a.sumsq = sumsq.Data(), a.dsum = dsum.Data(), a.dsumsq = dsumsq.Data();
      a.gamma = gamma.Data(), a.beta = beta.Data();
      a.channels = shape[0], a.groups = groups, a.count = count, a.epsilon = epsilon;
      a.new_sum = new_sum.Allocate(shape);
      a.new_sumsq = new_sumsq.Allocate(shape);
      a.scale = scale.Allocate(shape);
      a.shift = shift.Allocate(shape);
      const std::string err = ssic::group_norm_affine(a);
      if (!err.empty()) return invalid(err);
      return Ort::Status{nullptr};
    } catch (const std::exception& e) {
      return Ort::Status(e.what(), ORT_RUNTIME_EXCEPTION);
    }
  }

  // Every input is required: the guard never routes here, but create_op needs the entry point.
  Ort::Status ComputeRaw(OrtKernelContext* /*ctx*/) { return invalid("GroupNormAffine: all six inputs are required"); }
};

// The NHWC cache of a prime-run activation and its per-channel moments. The cache's element type is the
// node's (float32 or float16, attribute `to`): the op is registered once with that output left open
// (create_cache_store), so the lite API's typed output is not used for it.
struct CacheStoreKernel {
  int64_t to = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;

  CacheStoreKernel(const OrtApi* api, const OrtKernelInfo* info) {
    AttrReader r{api, info, {}};
    to = r.get_int("to", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
  }

  Ort::Status Compute(OrtKernelContext* ctx, const Tensor<float>& x, Tensor<float>& /*cache*/, Tensor<double>& sum,
                      Tensor<double>& sumsq) {
    try {
      const auto xs = x.Shape();
      if (xs.size() != 4 || xs[0] != 1) return invalid("CacheStore: x must be [1, C, H, W], got " + shape_str(xs));
      ssic::StoreArgs a{};
      a.x = x.Data();
      a.channels = xs[1], a.height = xs[2], a.width = xs[3];
      Ort::UnownedValue out = Ort::KernelContext(ctx).GetOutput(0, {a.height, a.width, a.channels});
      const auto type = out.GetTensorTypeAndShapeInfo().GetElementType();
      if (type != to)
        return invalid("CacheStore: the cache output has element type " + std::to_string(type) + ", attribute to " +
                       std::to_string(to));
      if (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
        a.out = out.GetTensorMutableData<float>();
      else if (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16)
        a.out_f16 = reinterpret_cast<uint16_t*>(out.GetTensorMutableData<Ort::Float16_t>());
      else
        return invalid("CacheStore: the cache must be float32 or float16, got element type " + std::to_string(type));
      a.sum = sum.Allocate({a.channels});
      a.sumsq = sumsq.Allocate({a.channels});
      const std::string err = ssic::cache_store(a, make_pfor(ctx));
      if (!err.empty()) return invalid(err);
      return Ort::Status{nullptr};
    } catch (const std::exception& e) {
      return Ort::Status(e.what(), ORT_RUNTIME_EXCEPTION);
    }
  }

  // The one input is required: the guard never routes here, but create_op needs the entry point.
  Ort::Status ComputeRaw(OrtKernelContext* /*ctx*/) { return invalid("CacheStore: x is required"); }
};

OrtCustomOp* create_cache_store() {
  OrtCustomOp* op = create_op<CacheStoreKernel>("CacheStore");
  op->GetOutputType = [](const OrtCustomOp* /*op*/, size_t index) {
    return index == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED : ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE;
  };
  return op;
}

}  // namespace

extern "C" {

// The library version (recorded in compiled artefacts' manifests).
__attribute__((visibility("default"))) const char* SSIC_OrtLibraryVersion() { return SSIC_ORT_VERSION; }

__attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                                const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {
    // An older runtime: report through the oldest API table, which every runtime provides.
    const OrtApi* old = api_base->GetApi(1);
    return old ? old->CreateStatus(ORT_FAIL, "libssic_ort needs a newer ONNX Runtime (C API version 29)")
               : nullptr;
  }
  Ort::InitApi(api);
  try {
    // Created once and intentionally never freed: sessions keep pointers to the domain and the ops
    // and may outlive any static destructor of this library.
    static Ort::CustomOpDomain* domain = nullptr;
    static std::once_flag once;
    std::call_once(once, [] {
      domain = new Ort::CustomOpDomain(kDomain);
      domain->Add(create_op<TileGatherKernel<float>>("TileGather"));
      domain->Add(create_op<TileGatherKernel<Ort::Float16_t>>("TileGather"));
      domain->Add(create_op<TileConvKernel<float>>("TileConv"));
      domain->Add(create_op<TileConvKernel<Ort::Float16_t>>("TileConv"));
      domain->Add(create_op<TileScatterKernel<float>>("TileScatter"));
      domain->Add(create_op<TileScatterKernel<Ort::Float16_t>>("TileScatter"));
      domain->Add(create_op<TileMomentsKernel<float>>("TileMoments"));
      domain->Add(create_op<TileMomentsKernel<Ort::Float16_t>>("TileMoments"));
      domain->Add(create_cache_store());
      domain->Add(create_op<GroupNormAffineKernel>("GroupNormAffine"));
      domain->Add(create_op<TileAffineKernel>("TileAffine"));
    });
    Ort::UnownedSessionOptions(options).Add(static_cast<OrtCustomOpDomain*>(*domain));
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_FAIL, e.what());
  }
  return nullptr;
}

}  // extern "C"
