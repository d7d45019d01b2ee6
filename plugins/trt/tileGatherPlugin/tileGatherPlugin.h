// TensorRT plugin "TileGather" (namespace "ssic", version "1"): im2col rows of a conv's input read
// from new source tiles where they cover a pixel, else from the cache. README.md lists the I/O.
#pragma once

#include <vector>

#include "common/ssicPlugin.h"

namespace ssic {
namespace trt {

class TileGatherPlugin : public SsicPlugin<TileGatherPlugin> {
 public:
  static constexpr const char* kName = "TileGather";
  enum Attr : size_t { kSrcTile, kTile, kKernel, kStride, kPadTop, kPadLeft, kUpsample, kActivation, kAlpha,
                       kSrcLayout, kHasScale, kHasShift, kPadMode };
  enum Input : int32_t { kTiles = 0, kCache = 1, kSrcIdx = 2, kDstIdx = 3 };

  static const std::vector<AttrSpec>& attrSpecs();
  static bool validate(const Attrs& a, std::string& err);

  explicit TileGatherPlugin(const Attrs& attrs) : SsicPlugin(attrs) {}
  TileGatherPlugin(const TileGatherPlugin&) = default;

  int32_t expectedInputs() const { return 4 + static_cast<int32_t>(mAttrs.i(kHasScale) + mAttrs.i(kHasShift)); }

  int32_t getOutputShapes(const DimsExprs* inputs, int32_t nbInputs, const DimsExprs* shapeInputs,
                          int32_t nbShapeInputs, DimsExprs* outputs, int32_t nbOutputs,
                          IExprBuilder& exprBuilder) noexcept override;
  bool supportsFormatCombination(int32_t pos, const DynamicPluginTensorDesc* inOut, int32_t nbInputs,
                                 int32_t nbOutputs) noexcept override;
  size_t getWorkspaceSize(const DynamicPluginTensorDesc* inputs, int32_t nbInputs,
                          const DynamicPluginTensorDesc* outputs, int32_t nbOutputs) const noexcept override;
  int32_t enqueue(const PluginTensorDesc* inputDesc, const PluginTensorDesc* outputDesc, const void* const* inputs,
                  void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
};

using TileGatherPluginCreator = SsicPluginCreator<TileGatherPlugin>;

}  // namespace trt
}  // namespace ssic
