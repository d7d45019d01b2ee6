#include "tileScatterPlugin/tileScatterPlugin.h"

#include "common/tileKernels.h"

namespace ssic {
namespace trt {

const std::vector<AttrSpec>& TileScatterPlugin::attrSpecs() {
  // Same names and defaults as ssic/ops.py TILE_SCATTER, plus has_residual.
  static const std::vector<AttrSpec> specs = {
      {"tile", false, 0, true}, {"activation", false, 0, false}, {"alpha", true, 0.01, false},
      {"has_residual", false, 0, false},
  };
  return specs;
}

bool TileScatterPlugin::validate(const Attrs& a, std::string& err) {
  if (a.i(kTile) < 1 || a.i(kActivation) < 0 || a.i(kActivation) > 3) {
    err = "tile must be >= 1 and activation 0..3";
    return false;
  }
  return true;
}

int32_t TileScatterPlugin::getOutputShapes(const DimsExprs* inputs, int32_t nbInputs, const DimsExprs* shapeInputs,
                                           int32_t nbShapeInputs, DimsExprs* outputs, int32_t nbOutputs,
                                           IExprBuilder& exprBuilder) noexcept {
  (void)shapeInputs;
  (void)nbShapeInputs;
  (void)exprBuilder;
  if (nbInputs != expectedInputs() || nbOutputs != 1 || inputs[kCache].nbDims != 4) return -1;
  outputs[0] = inputs[kCache];
  return 0;
}

bool TileScatterPlugin::supportsFormatCombination(int32_t pos, const DynamicPluginTensorDesc* inOut, int32_t nbInputs,
                                                  int32_t nbOutputs) noexcept {
  return supportsFloatAndIndex(pos, inOut, nbInputs, nbOutputs, [](int32_t p) { return p == kIdx; });
}

size_t TileScatterPlugin::getWorkspaceSize(const DynamicPluginTensorDesc* inputs, int32_t nbInputs,
                                           const DynamicPluginTensorDesc* outputs, int32_t nbOutputs) const noexcept {
  (void)outputs;
  (void)nbOutputs;
  if (nbInputs <= kCache) return 0;
  const Dims& d = inputs[kCache].max;
  return cell_map_bytes(d.d[2], d.d[3], mAttrs.i(kTile));
}

int32_t TileScatterPlugin::enqueue(const PluginTensorDesc* inputDesc, const PluginTensorDesc* outputDesc,
                                   const void* const* inputs, void* const* outputs, void* workspace,
                                   cudaStream_t stream) noexcept {
  (void)outputDesc;
  const Dims& cache = inputDesc[kCache].dims;
  ScatterParams p{};
  p.c = cache.d[1];
  p.h = cache.d[2];
  p.w = cache.d[3];
  p.tile = mAttrs.i(kTile);
  p.activation = static_cast<int32_t>(mAttrs.i(kActivation));
  p.alpha = mAttrs.f(kAlpha);
  p.n = inputDesc[kIdx].dims.d[0];
  const auto* tiles = static_cast<const float*>(inputs[kTiles]);
  const auto* src = static_cast<const float*>(inputs[kCache]);
  const float* residual = mAttrs.i(kHasResidual) ? static_cast<const float*>(inputs[kResidual]) : nullptr;
  auto* out = static_cast<float*>(outputs[0]);
  if (inputDesc[kIdx].type == DataType::kINT64) {
    return launchTileScatter(p, tiles, src, static_cast<const int64_t*>(inputs[kIdx]), residual, out, workspace,
                             stream);
  }
  return launchTileScatter(p, tiles, src, static_cast<const int32_t*>(inputs[kIdx]), residual, out, workspace,
                           stream);
}

}  // namespace trt
}  // namespace ssic
