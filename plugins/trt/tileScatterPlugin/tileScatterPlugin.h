// TensorRT plugin "TileScatter" (namespace "ssic", version "1"): a full NCHW tensor, the cache with
// every active tile's in-image pixels replaced by act(tiles + residual). README.md lists the I/O.
#pragma once

#include <vector>

#include "common/ssicPlugin.h"

namespace ssic {
namespace trt {

class TileScatterPlugin : public SsicPlugin<TileScatterPlugin> {
 public:
  static constexpr const char* kName = "TileScatter";
  enum Attr : size_t { kTile, kActivation, kAlpha, kHasResidual };
  enum Input : int32_t { kTiles = 0, kCache = 1, kIdx = 2, kResidual = 3 };

  static const std::vector<AttrSpec>& attrSpecs();
  static bool validate(const Attrs& a, std::string& err);

  explicit TileScatterPlugin(const Attrs& attrs) : SsicPlugin(attrs) {}
  TileScatterPlugin(const TileScatterPlugin&) = default;

  int32_t expectedInputs() const { return 3 + static_cast<int32_t>(mAttrs.i(kHasResidual)); }

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

using TileScatterPluginCreator = SsicPluginCreator<TileScatterPlugin>;

}  // namespace trt
}  // namespace ssic
