// ssic_serve: serve an ssic artefact from C++ with the ONNX Runtime C++ API and libssic_ort.
//
//   ssic_serve ARTEFACT --input NAME=orig.npy ... [--edited NAME=edited.npy ...] [--mask mask.npy]
//              -o out.npy [--ops-library libssic_ort.so] [--threads N] [--mode auto|sparse|dense]
//
// Does what ssic.Session does for one edit: prime.onnx on the original input (its cache outputs stay
// resident as Ort::Values), mask.onnx on the edit mask (active tiles per grid), then sparse.onnx with
// the edited inputs, the tile tensors and every cache bound by IoBinding straight from the prime
// run's outputs (no copy). An empty mask returns the primed output; in auto mode a mask whose sparse
// MACs exceed the manifest's fallback ratio of dense runs dense.onnx, as the Python session does.
// Every error a user can cause prints one line and exits with status 2.

#include <dlfcn.h>
#include <sys/stat.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iomanip>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include "json.hpp"
#include "npy.hpp"

namespace {

constexpr int kFormatVersion = 2;  // ssic.artefact.FORMAT_VERSION this program reads
constexpr const char* kLibraryEnv = "SSIC_ORT_LIBRARY";

struct UserError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

[[noreturn]] void fail(const std::string& msg) { throw UserError(msg); }

std::string first_line(const std::string& s, size_t max = 300) {
  std::string line = s.substr(0, s.find('\n'));
  if (line.size() > max) line = line.substr(0, max) + "...";
  return line;
}

bool is_file(const std::string& p) {
  struct stat st;
  return stat(p.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

bool is_dir(const std::string& p) {
  struct stat st;
  return stat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

double ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

// ------------------------------------------------------------------ command line
struct Options {
  std::string artefact;
  std::vector<std::pair<std::string, std::string>> inputs, edited, outputs;
  std::string mask, output, ops_library, mode = "auto";
  int threads = 0;
  bool quiet = false;
};

const char* kUsage =
    "usage: ssic_serve ARTEFACT --input NAME=orig.npy [...] [--edited NAME=edited.npy ...]\n"
    "                  [--mask mask.npy] -o out.npy [--output NAME=file.npy ...]\n"
    "                  [--ops-library libssic_ort.so] [--threads N] [--mode auto|sparse|dense] [-q]\n"
    "\n"
    "  ARTEFACT          directory written by `ssic compile` (target ort)\n"
    "  --input N=F       original value of model input N (.npy); primes the caches\n"
    "  --edited N=F      edited value of input N (default: the original)\n"
    "  --mask F          edit mask .npy, [H, W] or [1, 1, H, W], nonzero = edited\n"
    "                    (default: where the mask-source input changed, as ssic.Session.edit)\n"
    "  -o F              write the model's first output to F (.npy, float32)\n"
    "  --output N=F      write output N to F (repeatable)\n"
    "  --ops-library P   libssic_ort.so (default: $SSIC_ORT_LIBRARY); needed for fused artefacts\n"
    "  --threads N       intra-op threads (default: ONNX Runtime's)\n"
    "  --mode M          auto (dense fallback when sparse would not pay), sparse or dense\n"
    "  -q                no timing summary\n";

std::pair<std::string, std::string> split_assign(const std::string& flag, const std::string& v) {
  size_t eq = v.find('=');
  if (eq == std::string::npos || eq == 0 || eq + 1 == v.size())
    fail(flag + " expects NAME=FILE.npy, got '" + v + "'");
  return {v.substr(0, eq), v.substr(eq + 1)};
}

Options parse_args(int argc, char** argv) {
  Options o;
  std::vector<std::string> args(argv + 1, argv + argc);
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= args.size()) fail(a + " needs a value");
      return args[++i];
    };
    if (a == "-h" || a == "--help") {
      std::fputs(kUsage, stdout);
      std::exit(0);
    } else if (a == "--input" || a == "-i") {
      o.inputs.push_back(split_assign(a, value()));
    } else if (a == "--edited" || a == "-e") {
      o.edited.push_back(split_assign(a, value()));
    } else if (a == "--output") {
      o.outputs.push_back(split_assign(a, value()));
    } else if (a == "--mask" || a == "-m") {
      o.mask = value();
    } else if (a == "-o") {
      o.output = value();
    } else if (a == "--ops-library") {
      o.ops_library = value();
    } else if (a == "--threads") {
      std::string v = value();
      char* end = nullptr;
      long n = std::strtol(v.c_str(), &end, 10);
      if (*end || n < 0 || n > 1024) fail("--threads expects a non-negative integer, got '" + v + "'");
      o.threads = static_cast<int>(n);
    } else if (a == "--mode") {
      o.mode = value();
      if (o.mode != "auto" && o.mode != "sparse" && o.mode != "dense")
        fail("unknown --mode '" + o.mode + "' (auto, sparse or dense)");
    } else if (a == "-q" || a == "--quiet") {
      o.quiet = true;
    } else if (!a.empty() && a[0] == '-') {
      fail("unknown option '" + a + "' (see --help)");
    } else if (o.artefact.empty()) {
      o.artefact = a;
    } else {
      fail("unexpected argument '" + a + "' (one artefact directory only)");
    }
  }
  if (o.artefact.empty()) fail("missing ARTEFACT directory (see --help)");
  if (o.output.empty() && o.outputs.empty()) fail("missing -o OUT.npy");
  return o;
}

// ------------------------------------------------------------------ manifest
struct TensorSpec {
  std::string name, dtype;
  std::vector<int64_t> shape;
};

struct Grid {
  std::string name, tiles_input;
  int64_t num_cells = 0;
};

struct Manifest {
  std::string lowering, library_version;
  std::map<std::string, std::string> graphs;
  std::vector<TensorSpec> inputs, outputs;
  std::vector<Grid> grids;
  std::vector<std::string> caches;
  struct MaskSource {
    std::string input, mask_input;  // input "" = the finest grid itself (a model without image inputs)
    int64_t h = 0, w = 0;
    int channel_axis = 1;  // 1 NCHW, 3 NHWC
  };
  std::vector<MaskSource> sources;  // one per spatial model input (manifest "mask.sources")
  int64_t mask_h = 0, mask_w = 0;
  double mask_eps = 0.0;
  double macs_dense = 0, macs_fixed = 0, fallback_ratio = 0.6;
  std::map<std::string, double> macs_per_tile;
};

std::vector<int64_t> shape_of(const ssic_json::Value& v) {
  std::vector<int64_t> s;
  for (const auto& d : v.arr()) s.push_back(d.integer());
  return s;
}

Manifest read_manifest(const std::string& dir) {
  if (!is_dir(dir)) fail("artefact not found: " + dir);
  std::string path = dir + "/manifest.json";
  if (!is_file(path)) fail(dir + " is not an ssic artefact (no manifest.json); compile one with `ssic compile`");
  std::ifstream f(path, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  ssic_json::Value j;
  try {
    j = ssic_json::parse(ss.str());
  } catch (const ssic_json::ParseError& e) {
    fail(path + " is corrupt (not valid JSON: " + e.what() + "); recompile the artefact");
  }
  if (!j.is_object() || !j.has("format") || !j.at("format").is_string() || j.at("format").str() != "ssic-artefact")
    fail(path + " is not an ssic manifest");
  if (!j.has("format_version") || !j.at("format_version").is_number() ||
      j.at("format_version").num() != kFormatVersion)
    fail(dir + " has an artefact format version this program does not read (it reads version " +
         std::to_string(kFormatVersion) + "); recompile it with a matching ssic");
  for (const char* key : {"graphs", "inputs", "outputs", "grids", "caches", "mask", "macs"})
    if (!j.has(key)) fail(path + " is missing '" + key + "'; recompile the artefact");
  Manifest m;
  try {
    std::string target = j.has("target") ? j.at("target").str() : "ort";
    if (target != "ort") fail(dir + " was compiled for target '" + target + "'; ssic_serve runs ort artefacts");
    m.lowering = j.has("lowering") ? j.at("lowering").str() : "fused";
    if (j.has("custom_op_library") && j.at("custom_op_library").has("version"))
      m.library_version = j.at("custom_op_library").at("version").str();
    for (const auto& [k, v] : j.at("graphs").object) m.graphs[k] = v.str();
    for (const auto& v : j.at("inputs").arr())
      m.inputs.push_back({v.at("name").str(), v.at("dtype").str(), shape_of(v.at("shape"))});
    for (const auto& v : j.at("outputs").arr())
      m.outputs.push_back({v.at("name").str(), v.has("dtype") ? v.at("dtype").str() : "float",
                           v.has("shape") ? shape_of(v.at("shape")) : std::vector<int64_t>{}});
    for (const auto& v : j.at("grids").arr())
      m.grids.push_back({v.at("name").str(), v.at("tiles_input").str(), v.at("num_cells").integer()});
    for (const auto& v : j.at("caches").arr()) m.caches.push_back(v.at("name").str());
    const auto& mask = j.at("mask");
    m.mask_h = mask.at("height").integer();
    m.mask_w = mask.at("width").integer();
    if (mask.has("eps") && mask.at("eps").is_number()) m.mask_eps = mask.at("eps").num();
    for (const auto& v : mask.at("sources").arr())
      m.sources.push_back({v.at("input").str(), v.at("mask_input").str(), v.at("height").integer(),
                           v.at("width").integer(), static_cast<int>(v.at("channel_axis").integer())});
    if (m.sources.empty()) fail(path + " lists no mask sources; recompile the artefact");
    const auto& macs = j.at("macs");
    m.macs_dense = macs.at("dense").num();
    m.macs_fixed = macs.at("sparse_fixed").num();
    for (const auto& [k, v] : macs.at("per_tile").object) m.macs_per_tile[k] = v.num();
    if (j.has("fallback_ratio") && j.at("fallback_ratio").is_number()) m.fallback_ratio = j.at("fallback_ratio").num();
  } catch (const UserError&) {
    throw;
  } catch (const std::exception& e) {
    fail(path + " is malformed (" + e.what() + "); recompile the artefact");
  }
  if (m.outputs.empty()) fail(path + " lists no outputs; recompile the artefact");
  return m;
}

// ------------------------------------------------------------------ tensors
// A host tensor owning its bytes; Ort::Values made from it are views (no copy).
struct HostTensor {
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;

  int64_t size() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
  Ort::Value view(const Ort::MemoryInfo& mem) {
    return Ort::Value::CreateTensor(mem, bytes.data(), bytes.size(), shape.data(), shape.size(), type);
  }
};

ONNXTensorElementDataType ort_type(const std::string& dtype, const std::string& what) {
  if (dtype == "float" || dtype == "float32") return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  if (dtype == "int64") return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
  if (dtype == "int32") return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
  if (dtype == "double" || dtype == "float64") return ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE;
  if (dtype == "bool") return ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL;
  fail(what + " has dtype '" + dtype + "', which ssic_serve does not handle");
}

// Load `file` as model input `spec`: exact shape, dtype converted like ssic.Session (numbers -> float32
// for float inputs), finite values only.
HostTensor load_input(const TensorSpec& spec, const std::string& file, const std::string& flag) {
  npy::Array a;
  try {
    a = npy::load(file);
  } catch (const npy::Error& e) {
    fail(flag + " " + spec.name + ": " + e.what());
  }
  if (a.shape != spec.shape)
    fail("input '" + spec.name + "' (" + file + ") has shape " + npy::shape_str(a.shape) + ", expected " +
         npy::shape_str(spec.shape));
  HostTensor t;
  t.type = ort_type(spec.dtype, "input '" + spec.name + "'");
  t.shape = spec.shape;
  int64_t n = a.size();
  if (t.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
    t.bytes.resize(static_cast<size_t>(n) * 4);
    float* dst = reinterpret_cast<float*>(t.bytes.data());
    int64_t bad = 0;
    for (int64_t i = 0; i < n; ++i) {
      dst[i] = static_cast<float>(a.get(i));
      if (!std::isfinite(dst[i])) ++bad;
    }
    if (bad) fail("input '" + spec.name + "' (" + file + ") has " + std::to_string(bad) + " non-finite value(s) (NaN or Inf)");
  } else {
    npy::DType want = t.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64   ? npy::DType::Int64
                      : t.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32 ? npy::DType::Int32
                      : t.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE ? npy::DType::Float64
                                                                       : npy::DType::Bool;
    if (a.dtype != want)
      fail("input '" + spec.name + "' (" + file + ") has dtype " + npy::dtype_name(a.dtype) + ", expected " +
           npy::dtype_name(want));
    t.bytes = std::move(a.data);
  }
  return t;
}

// A 0/1 mask [h, w] resized to [H, W] conservatively: an output pixel is set when any input pixel its
// footprint overlaps is set (as ssic.masks.resize_mask_any).
std::vector<float> resize_any(const std::vector<float>& m, int64_t h, int64_t w, int64_t H, int64_t W) {
  if (h == H && w == W) return m;
  std::vector<int64_t> integral(static_cast<size_t>((h + 1) * (w + 1)), 0);
  for (int64_t y = 0; y < h; ++y)
    for (int64_t x = 0; x < w; ++x)
      integral[(y + 1) * (w + 1) + x + 1] = (m[y * w + x] != 0.0f) + integral[y * (w + 1) + x + 1] +
                                            integral[(y + 1) * (w + 1) + x] - integral[y * (w + 1) + x];
  auto lo = [](int64_t i, int64_t n_in, int64_t n_out) { return (i * n_in) / n_out; };
  auto hi = [&](int64_t i, int64_t n_in, int64_t n_out) {
    return std::max(lo(i, n_in, n_out) + 1, ((i + 1) * n_in + n_out - 1) / n_out);
  };
  std::vector<float> out(static_cast<size_t>(H * W), 0.0f);
  for (int64_t Y = 0; Y < H; ++Y) {
    const int64_t r0 = lo(Y, h, H), r1 = hi(Y, h, H);
    for (int64_t X = 0; X < W; ++X) {
      const int64_t c0 = lo(X, w, W), c1 = hi(X, w, W);
      const int64_t n = integral[r1 * (w + 1) + c1] - integral[r0 * (w + 1) + c1] - integral[r1 * (w + 1) + c0] +
                        integral[r0 * (w + 1) + c0];
      out[Y * W + X] = n > 0 ? 1.0f : 0.0f;
    }
  }
  return out;
}

HostTensor mask_tensor(const std::vector<float>& v, int64_t h, int64_t w) {
  HostTensor t;
  t.shape = {1, 1, h, w};
  t.bytes.resize(v.size() * 4);
  std::memcpy(t.bytes.data(), v.data(), t.bytes.size());
  return t;
}

// The user's edit mask (at the finest grid's or any source's resolution) for every mask source.
std::map<std::string, HostTensor> load_mask(const Manifest& m, const std::string& file) {
  npy::Array a;
  try {
    a = npy::load(file);
  } catch (const npy::Error& e) {
    fail(std::string("--mask: ") + e.what());
  }
  std::vector<int64_t> s = a.shape;
  while (s.size() > 2 && s.front() == 1) s.erase(s.begin());
  bool known = s.size() == 2 && s[0] == m.mask_h && s[1] == m.mask_w;
  std::string accepted = "[" + std::to_string(m.mask_h) + ", " + std::to_string(m.mask_w) + "]";
  for (const auto& src : m.sources) {
    known = known || (s.size() == 2 && s[0] == src.h && s[1] == src.w);
    accepted += " or [" + std::to_string(src.h) + ", " + std::to_string(src.w) + "]";
  }
  if (!known) fail("mask (" + file + ") has shape " + npy::shape_str(a.shape) + ", expected " + accepted);
  std::vector<float> v(static_cast<size_t>(s[0] * s[1]));
  for (size_t i = 0; i < v.size(); ++i) {
    double x = a.get(static_cast<int64_t>(i));
    if (!std::isfinite(x)) fail("mask (" + file + ") has non-finite values");
    v[i] = x != 0.0 ? 1.0f : 0.0f;
  }
  std::map<std::string, HostTensor> out;
  for (const auto& src : m.sources) out[src.mask_input] = mask_tensor(resize_any(v, s[0], s[1], src.h, src.w), src.h, src.w);
  return out;
}

// Where each spatial input changed by more than eps (any channel), as ssic.Session.source_masks.
std::map<std::string, HostTensor> difference_masks(const Manifest& m, const std::map<std::string, HostTensor>& orig,
                                                   const std::map<std::string, HostTensor>& edited) {
  std::map<std::string, HostTensor> out;
  for (const auto& src : m.sources) {
    std::vector<float> v(static_cast<size_t>(src.h * src.w), 0.0f);
    if (src.input.empty()) fail("this model has no image input to derive the edit from: pass --mask");
    const HostTensor& o = orig.at(src.input);
    const HostTensor& e = edited.at(src.input);
    if (o.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || o.shape.size() != 4)
      fail("cannot derive the mask from input '" + src.input + "': pass --mask");
    const float* a = reinterpret_cast<const float*>(o.bytes.data());
    const float* b = reinterpret_cast<const float*>(e.bytes.data());
    const int64_t hw = src.h * src.w;
    const int64_t c = src.channel_axis == 3 ? o.shape[3] : o.shape[1];
    for (int64_t ch = 0; ch < c; ++ch)
      for (int64_t i = 0; i < hw; ++i) {
        const int64_t k = src.channel_axis == 3 ? i * c + ch : ch * hw + i;
        if (std::fabs(a[k] - b[k]) > m.mask_eps) v[i] = 1.0f;
      }
    out[src.mask_input] = mask_tensor(v, src.h, src.w);
  }
  return out;
}

void save_value(const std::string& file, const std::string& name, const Ort::Value& v) {
  auto info = v.GetTensorTypeAndShapeInfo();
  npy::DType d;
  switch (info.GetElementType()) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: d = npy::DType::Float32; break;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: d = npy::DType::Float64; break;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: d = npy::DType::Int64; break;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: d = npy::DType::Int32; break;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL: d = npy::DType::Bool; break;
    default: fail("output '" + name + "' has an element type ssic_serve cannot write");
  }
  try {
    npy::save(file, d, info.GetShape(), v.GetTensorRawData());
  } catch (const npy::Error& e) {
    fail(e.what());
  }
}

// ------------------------------------------------------------------ ONNX Runtime
std::string library_version(const std::string& path) {
  void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!h) fail("cannot load the ssic op library " + path + ": " + first_line(dlerror()));
  using Fn = const char* (*)();
  auto fn = reinterpret_cast<Fn>(dlsym(h, "SSIC_OrtLibraryVersion"));
  if (!fn) fail(path + " is not the ssic op library (no SSIC_OrtLibraryVersion)");
  std::string v = fn();
  return v;  // keep the handle: ONNX Runtime loads the same library again
}

struct Runtime {
  Ort::Env env{nullptr};
  Ort::SessionOptions options{nullptr};
  Ort::MemoryInfo cpu{nullptr};
  std::map<std::string, std::unique_ptr<Ort::Session>> sessions;
  std::string dir;
  const Manifest* manifest = nullptr;

  Ort::Session& session(const std::string& which) {
    auto it = sessions.find(which);
    if (it != sessions.end()) return *it->second;
    auto g = manifest->graphs.find(which);
    if (g == manifest->graphs.end()) fail(dir + "/manifest.json lists no '" + which + "' graph; recompile the artefact");
    std::string file = dir + "/" + g->second;
    if (!is_file(file)) fail(dir + " is incomplete: " + g->second + " is missing; recompile the artefact");
    try {
      auto s = std::make_unique<Ort::Session>(env, file.c_str(), options);
      return *(sessions[which] = std::move(s));
    } catch (const Ort::Exception& e) {
      fail("cannot load " + g->second + ": " + first_line(e.what()));
    }
  }
};

std::vector<std::string> input_names(Ort::Session& s) {
  Ort::AllocatorWithDefaultOptions alloc;
  std::vector<std::string> out;
  for (size_t i = 0; i < s.GetInputCount(); ++i) out.emplace_back(s.GetInputNameAllocated(i, alloc).get());
  return out;
}

std::vector<std::string> output_names(Ort::Session& s) {
  Ort::AllocatorWithDefaultOptions alloc;
  std::vector<std::string> out;
  for (size_t i = 0; i < s.GetOutputCount(); ++i) out.emplace_back(s.GetOutputNameAllocated(i, alloc).get());
  return out;
}

std::vector<const char*> c_names(const std::vector<std::string>& v) {
  std::vector<const char*> out;
  for (const auto& s : v) out.push_back(s.c_str());
  return out;
}

int run(int argc, char** argv) {
  Options opt = parse_args(argc, argv);
  Manifest m = read_manifest(opt.artefact);

  // Inputs: every model input needs an original value; edited values default to the original.
  std::map<std::string, HostTensor> orig, edited;
  for (const auto& [name, file] : opt.inputs) {
    if (orig.count(name)) fail("--input " + name + " given twice");
    auto spec = std::find_if(m.inputs.begin(), m.inputs.end(), [&](const TensorSpec& s) { return s.name == name; });
    if (spec == m.inputs.end()) fail("unknown input '" + name + "'; the model takes " + [&] {
      std::string s;
      for (const auto& i : m.inputs) s += (s.empty() ? "" : ", ") + i.name;
      return s;
    }());
    orig[name] = load_input(*spec, file, "--input");
  }
  for (const auto& [name, file] : opt.edited) {
    auto spec = std::find_if(m.inputs.begin(), m.inputs.end(), [&](const TensorSpec& s) { return s.name == name; });
    if (spec == m.inputs.end()) fail("unknown edited input '" + name + "'");
    edited[name] = load_input(*spec, file, "--edited");
  }
  for (const auto& spec : m.inputs) {
    if (!orig.count(spec.name))
      fail("missing input '" + spec.name + "' (shape " + npy::shape_str(spec.shape) + "): pass --input " + spec.name +
           "=FILE.npy");
    if (!edited.count(spec.name)) {
      edited[spec.name] = orig[spec.name];
    } else if (std::none_of(m.sources.begin(), m.sources.end(),
                            [&](const Manifest::MaskSource& s) { return s.input == spec.name; }) &&
               edited[spec.name].bytes != orig[spec.name].bytes) {
      fail("edited input '" + spec.name + "' differs from the original; non-image inputs must equal the primed ones");
    }
  }
  std::vector<std::pair<std::string, std::string>> outputs = opt.outputs;
  if (!opt.output.empty()) outputs.insert(outputs.begin(), {m.outputs[0].name, opt.output});
  for (const auto& [name, file] : outputs) {
    (void)file;
    if (std::none_of(m.outputs.begin(), m.outputs.end(), [&](const TensorSpec& s) { return s.name == name; }))
      fail("unknown output '" + name + "'");
  }
  std::map<std::string, HostTensor> masks = opt.mask.empty() ? difference_masks(m, orig, edited)
                                                             : load_mask(m, opt.mask);

  // ONNX Runtime, with the ssic op library for fused artefacts.
  const OrtApi* api = OrtGetApiBase()->GetApi(ORT_API_VERSION);
  if (!api)
    fail(std::string("libonnxruntime ") + OrtGetApiBase()->GetVersionString() + " does not provide ORT API version " +
         std::to_string(ORT_API_VERSION) + "; use a newer ONNX Runtime");
  Ort::InitApi(api);
  Runtime rt;
  rt.dir = opt.artefact;
  rt.manifest = &m;
  rt.env = Ort::Env(ORT_LOGGING_LEVEL_ERROR, "ssic_serve");
  rt.options = Ort::SessionOptions();
  if (opt.threads > 0) {
    rt.options.SetIntraOpNumThreads(opt.threads);
    rt.options.SetInterOpNumThreads(1);
  }
  // each session's threads stop spinning when its run ends: the mask graph's spinners took a core from the
  // sparse run right after it (as ssic/targets/ort.py; BENCHMARKS.md, ninth session)
  rt.options.AddConfigEntry("session.force_spinning_stop", "1");
  rt.cpu = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
  std::string lib = opt.ops_library;
  if (lib.empty() && std::getenv(kLibraryEnv)) lib = std::getenv(kLibraryEnv);
  if (m.lowering == "fused" || !lib.empty()) {
    if (lib.empty())
      fail("no ssic op library: pass --ops-library PATH or set SSIC_ORT_LIBRARY "
           "(python -c \"import ssic; print(ssic.get_library_path())\")");
    if (!is_file(lib)) fail("ssic op library not found: " + lib);
    std::string have = library_version(lib);
    if (!m.library_version.empty() && have != m.library_version)
      fail(opt.artefact + " needs libssic_ort version " + m.library_version + ", " + lib + " is version " + have +
           "; recompile the artefact or use the matching library");
    try {
      rt.options.RegisterCustomOpsLibrary(lib.c_str());
    } catch (const Ort::Exception& e) {
      fail("cannot register the ssic op library " + lib + ": " + first_line(e.what()));
    }
  }

  std::ostringstream report;
  report << std::fixed << std::setprecision(1);
  // 1. Prime on the original input: all outputs (model outputs + caches) stay resident as Ort::Values.
  auto t0 = std::chrono::steady_clock::now();
  Ort::Session& prime = rt.session("prime");
  std::vector<std::string> prime_in = input_names(prime), prime_out = output_names(prime);
  std::vector<Ort::Value> feeds;
  for (const auto& n : prime_in) {
    if (!orig.count(n)) fail("prime.onnx takes input '" + n + "' that the manifest does not list; recompile the artefact");
    feeds.push_back(orig[n].view(rt.cpu));
  }
  auto in_c = c_names(prime_in), out_c = c_names(prime_out);
  std::vector<Ort::Value> primed =
      prime.Run(Ort::RunOptions{nullptr}, in_c.data(), feeds.data(), feeds.size(), out_c.data(), out_c.size());
  std::map<std::string, const Ort::Value*> resident;
  for (size_t i = 0; i < prime_out.size(); ++i) resident[prime_out[i]] = &primed[i];
  for (const auto& c : m.caches)
    if (!resident.count(c)) fail("prime.onnx has no output for cache '" + c + "'; recompile the artefact");
  report << "prime " << ms_since(t0) << " ms";

  // 2. Active tiles per grid from the mask.
  bool any = false;
  for (const auto& [name, mask] : masks)
    for (int64_t i = 0; i < mask.size(); ++i) any = any || reinterpret_cast<const float*>(mask.bytes.data())[i] != 0.0f;
  std::map<std::string, const Ort::Value*> result;  // model output name -> value
  std::vector<Ort::Value> tiles, produced;
  std::string mode;
  if (!any) {
    mode = "cached (empty mask)";
    for (const auto& o : m.outputs) result[o.name] = resident.at(o.name);
  } else {
    t0 = std::chrono::steady_clock::now();
    Ort::Session& mask_sess = rt.session("mask");
    std::vector<std::string> tile_names;
    for (const auto& g : m.grids) tile_names.push_back(g.tiles_input);
    auto tn = c_names(tile_names);
    std::vector<std::string> mask_names;
    std::vector<Ort::Value> mask_values;
    for (auto& [name, mask] : masks) {
      mask_names.push_back(name);
      mask_values.push_back(mask.view(rt.cpu));
    }
    auto mn = c_names(mask_names);
    tiles = mask_sess.Run(Ort::RunOptions{nullptr}, mn.data(), mask_values.data(), mask_values.size(), tn.data(),
                          tn.size());
    double macs = m.macs_fixed;
    std::ostringstream tile_report;
    int64_t active = 0, cells = 0;
    for (size_t i = 0; i < m.grids.size(); ++i) {
      int64_t n = tiles[i].GetTensorTypeAndShapeInfo().GetShape()[0];
      macs += m.macs_per_tile[m.grids[i].name] * static_cast<double>(n);
      active += n;
      cells += m.grids[i].num_cells;
      tile_report << (i ? ", " : "") << m.grids[i].name << ": " << n << "/" << m.grids[i].num_cells;
    }
    report << "; mask " << ms_since(t0) << " ms";
    bool dense = opt.mode == "dense" || (opt.mode == "auto" && macs > m.fallback_ratio * m.macs_dense);

    t0 = std::chrono::steady_clock::now();
    std::vector<std::string> want;
    for (const auto& o : m.outputs) want.push_back(o.name);
    if (dense) {
      // 3a. Dense fallback: the plain model on the edited input.
      mode = "dense";
      Ort::Session& d = rt.session("dense");
      std::vector<std::string> names = input_names(d);
      std::vector<Ort::Value> vals;
      for (const auto& n : names) vals.push_back(edited.at(n).view(rt.cpu));
      auto nc = c_names(names), wc = c_names(want);
      produced = d.Run(Ort::RunOptions{nullptr}, nc.data(), vals.data(), vals.size(), wc.data(), wc.size());
    } else {
      // 3b. Sparse: edited inputs, tile tensors and caches bound without copying.
      mode = "sparse";
      Ort::Session& s = rt.session("sparse");
      Ort::IoBinding io(s);
      std::vector<Ort::Value> views;  // edited-input views must outlive the run
      views.reserve(m.inputs.size());
      for (const auto& n : input_names(s)) {
        auto g = std::find_if(m.grids.begin(), m.grids.end(), [&](const Grid& x) { return x.tiles_input == n; });
        if (edited.count(n)) {
          views.push_back(edited[n].view(rt.cpu));
          io.BindInput(n.c_str(), views.back());
        } else if (g != m.grids.end()) {
          io.BindInput(n.c_str(), tiles[static_cast<size_t>(g - m.grids.begin())]);
        } else if (resident.count(n)) {
          io.BindInput(n.c_str(), *resident[n]);
        } else {
          fail("sparse.onnx takes input '" + n + "' that neither the manifest nor prime.onnx provides; recompile the artefact");
        }
      }
      for (const auto& n : want) io.BindOutput(n.c_str(), rt.cpu);
      s.Run(Ort::RunOptions{nullptr}, io);
      produced = io.GetOutputValues();
    }
    for (size_t i = 0; i < want.size(); ++i) result[want[i]] = &produced[i];
    report << "; " << mode << " " << ms_since(t0) << " ms (active tiles " << tile_report.str() << "; "
           << static_cast<int>(100.0 * static_cast<double>(active) / static_cast<double>(std::max<int64_t>(cells, 1)))
           << "% of cells, MACs " << static_cast<int>(100.0 * macs / std::max(m.macs_dense, 1.0)) << "% of dense)";
  }

  for (const auto& [name, file] : outputs) {
    save_value(file, name, *result.at(name));
    report << "; wrote " << name << " -> " << file;
  }
  if (!opt.quiet) std::printf("%s\n", report.str().c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const UserError& e) {
    std::fprintf(stderr, "ssic_serve: error: %s\n", e.what());
  } catch (const Ort::Exception& e) {
    std::fprintf(stderr, "ssic_serve: error: onnxruntime: %s\n", first_line(e.what()).c_str());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "ssic_serve: error: %s\n", first_line(e.what()).c_str());
  }
  return 2;
}
