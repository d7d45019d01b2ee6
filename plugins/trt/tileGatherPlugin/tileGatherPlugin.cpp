#include "tileGatherPlugin/tileGatherPlugin.h"

#include "common/tileKernels.h"

namespace ssic {
namespace trt {

const std::vector<AttrSpec>& TileGatherPlugin::attrSpecs() {
  // Same names and defaults as ssic/ops.py TILE_GATHER, plus has_scale/has_shift (ssic.targets.trt
  // drops absent optional inputs from plugin nodes and records them here).
  static const std::vector<AttrSpec> specs = {
      {"src_tile", false, 0, true},  {"tile", false, 0, true},     {"kernel", false, 0, true},
      {"stride", false, 1, false},   {"pad_top", false, 0, false}, {"pad_left", false, 0, false},
      {"upsample", false, 1, false}, {"activation", false, 0, false}, {"alpha", true, 0.01, false},
      {"src_layout", false, 0, false}, {"has_scale", false, 0, false}, {"has_shift", false, 0, false},
      {"pad_mode", false, 0, false},
  };
  return specs;
}

bool TileGatherPlugin::validate(const Attrs& a, std::string& err) {
  if (a.i(kSrcTile) < 1 || a.i(kTile) < 1 || a.i(kKernel) < 1 || a.i(kStride) < 1 || a.i(kUpsample) < 1) {
    err = "src_tile, tile, kernel, stride and upsample must be >= 1";
    return false;
  }
  if (a.i(kActivation) < 0 || a.i(kActivation) > 3 || (a.i(kSrcLayout) != kNHWC && a.i(kSrcLayout) != kNCHW) ||
      a.i(kPadMode) < 0 || a.i(kPadMode) > 2) {
    err = "activation must be 0..3, src_layout 0 or 1 and pad_mode 0..2";
    return false;
  }
  return true;
}

int32_t TileGatherPlugin::getOutputShapes(const DimsExprs* inputs, int32_t nbInputs, const DimsExprs* shapeInputs,
                                          int32_t nbShapeInputs, DimsExprs* outputs, int32_t nbOutputs,
                                          IExprBuilder& exprBuilder) noexcept {
  (void)shapeInputs;
  (void)nbShapeInputs;
  if (nbInputs != expectedInputs() || nbOutputs != 1) return -1;
  const DimsExprs& cache = inputs[kCache];
  const bool nhwc = mAttrs.i(kSrcLayout) == kNHWC;
  if (cache.nbDims != (nhwc ? 3 : 4) || inputs[kDstIdx].nbDims != 2) return -1;
  const IDimensionExpr* channels = nhwc ? cache.d[2] : cache.d[1];
  const int64_t t = mAttrs.i(kTile), k = mAttrs.i(kKernel);
  outputs[0].nbDims = 2;
  outputs[0].d[0] = exprBuilder.operation(DimensionOperation::kPROD, *inputs[kDstIdx].d[0],
                                          *exprBuilder.constant(t * t));
  outputs[0].d[1] = exprBuilder.operation(DimensionOperation::kPROD, *channels, *exprBuilder.constant(k * k));
  return 0;
}

bool TileGatherPlugin::supportsFormatCombination(int32_t pos, const DynamicPluginTensorDesc* inOut, int32_t nbInputs,
                                                 int32_t nbOutputs) noexcept {
  return supportsFloatAndIndex(pos, inOut, nbInputs, nbOutputs,
                               [](int32_t p) { return p == kSrcIdx || p == kDstIdx; });
}

size_t TileGatherPlugin::getWorkspaceSize(const DynamicPluginTensorDesc* inputs, int32_t nbInputs,
                                          const DynamicPluginTensorDesc* outputs, int32_t nbOutputs) const noexcept {
  (void)outputs;
  (void)nbOutputs;
  if (nbInputs <= kCache) return 0;
  const Dims& d = inputs[kCache].max;
  const bool nhwc = mAttrs.i(kSrcLayout) == kNHWC;
  return cell_map_bytes(nhwc ? d.d[0] : d.d[2], nhwc ? d.d[1] : d.d[3], mAttrs.i(kSrcTile));
}

int32_t TileGatherPlugin::enqueue(const PluginTensorDesc* inputDesc, const PluginTensorDesc* outputDesc,
                                  const void* const* inputs, void* const* outputs, void* workspace,
                                  cudaStream_t stream) noexcept {
  (void)outputDesc;
  const Dims& cache = inputDesc[kCache].dims;
  const bool nhwc = mAttrs.i(kSrcLayout) == kNHWC;
  GatherParams p{};
  p.hs = nhwc ? cache.d[0] : cache.d[2];
  p.ws = nhwc ? cache.d[1] : cache.d[3];
  p.c = nhwc ? cache.d[2] : cache.d[1];
  p.src_tile = mAttrs.i(kSrcTile);
  p.tile = mAttrs.i(kTile);
  p.kernel = mAttrs.i(kKernel);
  p.stride = mAttrs.i(kStride);
  p.pad_top = mAttrs.i(kPadTop);
  p.pad_left = mAttrs.i(kPadLeft);
  p.upsample = mAttrs.i(kUpsample);
  p.activation = static_cast<int32_t>(mAttrs.i(kActivation));
  p.alpha = mAttrs.f(kAlpha);
  p.layout = static_cast<int32_t>(mAttrs.i(kSrcLayout));
  p.pad_mode = mAttrs.i(kPadMode);
  p.m = inputDesc[kSrcIdx].dims.d[0];
  p.n = inputDesc[kDstIdx].dims.d[0];
  int32_t next = 4;
  const float* scale = mAttrs.i(kHasScale) ? static_cast<const float*>(inputs[next++]) : nullptr;
  const float* shift = mAttrs.i(kHasShift) ? static_cast<const float*>(inputs[next++]) : nullptr;
  const auto* tiles = static_cast<const float*>(inputs[kTiles]);
  const auto* src = static_cast<const float*>(inputs[kCache]);
  auto* cols = static_cast<float*>(outputs[0]);
  if (inputDesc[kSrcIdx].type == DataType::kINT64) {
    return launchTileGather(p, tiles, src, static_cast<const int64_t*>(inputs[kSrcIdx]),
                            static_cast<const int64_t*>(inputs[kDstIdx]), scale, shift, cols, workspace, stream);
  }
  return launchTileGather(p, tiles, src, static_cast<const int32_t*>(inputs[kSrcIdx]),
                          static_cast<const int32_t*>(inputs[kDstIdx]), scale, shift, cols, workspace, stream);
}

}  // namespace trt
}  // namespace ssic
