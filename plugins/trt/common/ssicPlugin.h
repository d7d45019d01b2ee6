// Shared scaffolding of the ssic TensorRT plugins (IPluginV3 with the V3One core/build/runtime
// capabilities, and an IPluginCreatorV3One): attribute parsing/serialisation and the boilerplate
// every plugin repeats. A plugin derives from SsicPlugin<Derived> and provides:
//   static constexpr const char* kName;       // = the ONNX op_type (ssic/ops.py)
//   static const std::vector<AttrSpec>& attrSpecs();
//   getOutputShapes, supportsFormatCombination, getWorkspaceSize, enqueue, number of inputs.
#pragma once

#include <NvInferRuntime.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

namespace ssic {
namespace trt {

using namespace nvinfer1;

constexpr const char* kPluginNamespace = "ssic";
constexpr const char* kPluginVersion = "1";

void logError(const std::string& msg) noexcept;  // through TensorRT's logger when set (ssicPlugins.cpp)

// One plugin attribute: ints are stored as int32 (what TensorRT's ONNX parser hands over for ONNX
// INT attributes), floats as float32.
struct AttrSpec {
  const char* name;
  bool isFloat;
  double defaultValue;
  bool required;
};

// Attribute values of one plugin instance, by the index of their AttrSpec.
class Attrs {
 public:
  explicit Attrs(const std::vector<AttrSpec>& specs) : mSpecs(&specs), mValues(specs.size()) {
    for (size_t i = 0; i < specs.size(); ++i) mValues[i] = specs[i].defaultValue;
  }

  // Reads a PluginFieldCollection (any int/float field type). Returns false with `err` set when a
  // required attribute is missing or a field has an unusable type; unknown fields are ignored
  // (plugin_namespace, plugin_version and ONNX attributes of later op versions).
  bool parse(const PluginFieldCollection* fc, std::string& err) {
    std::vector<bool> seen(mValues.size(), false);
    for (int32_t f = 0; fc != nullptr && f < fc->nbFields; ++f) {
      const PluginField& field = fc->fields[f];
      if (field.name == nullptr || field.data == nullptr || field.length < 1) continue;
      for (size_t i = 0; i < mSpecs->size(); ++i) {
        if (std::strcmp(field.name, (*mSpecs)[i].name) != 0) continue;
        if (!scalar(field, mValues[i])) {
          err = std::string("attribute '") + field.name + "' has an unsupported field type";
          return false;
        }
        seen[i] = true;
      }
    }
    for (size_t i = 0; i < mSpecs->size(); ++i) {
      if ((*mSpecs)[i].required && !seen[i]) {
        err = std::string("missing required attribute '") + (*mSpecs)[i].name + "'";
        return false;
      }
    }
    return true;
  }

  int64_t i(size_t k) const { return static_cast<int64_t>(mValues[k]); }
  float f(size_t k) const { return static_cast<float>(mValues[k]); }

  // Fields for serialisation (engine building) and for the creator's field list.
  const PluginFieldCollection* fields() {
    mInts.assign(mValues.size(), 0);
    mFloats.assign(mValues.size(), 0.f);
    mFields.clear();
    for (size_t k = 0; k < mSpecs->size(); ++k) {
      const AttrSpec& s = (*mSpecs)[k];
      if (s.isFloat) {
        mFloats[k] = f(k);
        mFields.emplace_back(s.name, &mFloats[k], PluginFieldType::kFLOAT32, 1);
      } else {
        mInts[k] = static_cast<int32_t>(i(k));
        mFields.emplace_back(s.name, &mInts[k], PluginFieldType::kINT32, 1);
      }
    }
    mCollection.nbFields = static_cast<int32_t>(mFields.size());
    mCollection.fields = mFields.data();
    return &mCollection;
  }

  Attrs(const Attrs& o) : mSpecs(o.mSpecs), mValues(o.mValues) {}
  Attrs& operator=(const Attrs& o) {
    mSpecs = o.mSpecs;
    mValues = o.mValues;
    return *this;
  }

 private:
  static bool scalar(const PluginField& field, double& out) {
    switch (field.type) {
      case PluginFieldType::kINT32: out = *static_cast<const int32_t*>(field.data); return true;
      case PluginFieldType::kINT64: out = static_cast<double>(*static_cast<const int64_t*>(field.data)); return true;
      case PluginFieldType::kINT16: out = *static_cast<const int16_t*>(field.data); return true;
      case PluginFieldType::kINT8: out = *static_cast<const int8_t*>(field.data); return true;
      case PluginFieldType::kFLOAT32: out = *static_cast<const float*>(field.data); return true;
      case PluginFieldType::kFLOAT64: out = *static_cast<const double*>(field.data); return true;
      default: return false;
    }
  }

  const std::vector<AttrSpec>* mSpecs;
  std::vector<double> mValues;
  std::vector<int32_t> mInts;
  std::vector<float> mFloats;
  std::vector<PluginField> mFields;
  PluginFieldCollection mCollection{};
};

// Float tensors and int32/int64 tile indices, linear format only. `isIndex(pos)` says which
// positions (inputs then outputs) are tile-index tensors; all of them must share one type.
template <typename IsIndex>
bool supportsFloatAndIndex(int32_t pos, const DynamicPluginTensorDesc* inOut, int32_t nbInputs, int32_t nbOutputs,
                           IsIndex isIndex) {
  const PluginTensorDesc& d = inOut[pos].desc;
  if (d.format != TensorFormat::kLINEAR) return false;
  if (!isIndex(pos)) return d.type == DataType::kFLOAT;
  if (d.type != DataType::kINT32 && d.type != DataType::kINT64) return false;
  for (int32_t q = 0; q < pos; ++q)
    if (isIndex(q) && inOut[q].desc.type != d.type) return false;
  (void)nbInputs;
  (void)nbOutputs;
  return true;
}

template <typename Derived>
class SsicPlugin : public IPluginV3, public IPluginV3OneCore, public IPluginV3OneBuild, public IPluginV3OneRuntime {
 public:
  explicit SsicPlugin(const Attrs& attrs) : mAttrs(attrs) {}
  ~SsicPlugin() noexcept override = default;

  IPluginCapability* getCapabilityInterface(PluginCapabilityType type) noexcept override {
    switch (type) {
      case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
      case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
      case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    }
    return nullptr;
  }
  IPluginV3* clone() noexcept override {
    try {
      return new Derived(*static_cast<Derived*>(this));
    } catch (...) {
      return nullptr;
    }
  }

  // core
  const char* getPluginName() const noexcept override { return Derived::kName; }
  const char* getPluginVersion() const noexcept override { return kPluginVersion; }
  const char* getPluginNamespace() const noexcept override { return kPluginNamespace; }

  // build
  int32_t getNbOutputs() const noexcept override { return 1; }
  int32_t getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs, const DataType* inputTypes,
                             int32_t nbInputs) const noexcept override {
    if (nbOutputs != 1 || nbInputs < 1 || inputTypes[0] != DataType::kFLOAT) return -1;
    outputTypes[0] = DataType::kFLOAT;
    return 0;
  }
  int32_t configurePlugin(const DynamicPluginTensorDesc* in, int32_t nbInputs, const DynamicPluginTensorDesc* out,
                          int32_t nbOutputs) noexcept override {
    (void)in;
    (void)out;
    return nbInputs == static_cast<const Derived*>(this)->expectedInputs() && nbOutputs == 1 ? 0 : -1;
  }

  // runtime
  int32_t onShapeChange(const PluginTensorDesc* in, int32_t nbInputs, const PluginTensorDesc* out,
                        int32_t nbOutputs) noexcept override {
    (void)in;
    (void)out;
    return nbInputs == static_cast<const Derived*>(this)->expectedInputs() && nbOutputs == 1 ? 0 : -1;
  }
  IPluginV3* attachToContext(IPluginResourceContext* context) noexcept override {
    (void)context;
    return clone();
  }
  const PluginFieldCollection* getFieldsToSerialize() noexcept override { return mAttrs.fields(); }

 protected:
  SsicPlugin(const SsicPlugin&) = default;
  Attrs mAttrs;
};

template <typename Plugin>
class SsicPluginCreator : public IPluginCreatorV3One {
 public:
  SsicPluginCreator() : mAttrs(Plugin::attrSpecs()) {}
  const char* getPluginName() const noexcept override { return Plugin::kName; }
  const char* getPluginVersion() const noexcept override { return kPluginVersion; }
  const char* getPluginNamespace() const noexcept override { return kPluginNamespace; }
  const PluginFieldCollection* getFieldNames() noexcept override { return mAttrs.fields(); }

  IPluginV3* createPlugin(const char* name, const PluginFieldCollection* fc, TensorRTPhase phase) noexcept override {
    (void)phase;
    try {
      Attrs attrs(Plugin::attrSpecs());
      std::string err;
      if (!attrs.parse(fc, err) || !Plugin::validate(attrs, err)) {
        logError(std::string("ssic::") + Plugin::kName + " node '" + (name ? name : "") + "': " + err);
        return nullptr;
      }
      return new Plugin(attrs);
    } catch (...) {
      return nullptr;
    }
  }

 private:
  Attrs mAttrs;
};

}  // namespace trt
}  // namespace ssic
