// Entry points of libssic_trt_plugins.so, loaded by `trtexec --dynamicPlugins=libssic_trt_plugins.so`
// or IPluginRegistry::loadLibrary: getCreators (V3 creators) and setLoggerFinder. No
// getPluginCreators: that entry returns legacy IPluginCreator (IPluginV2) creators, and every ssic
// plugin is an IPluginV3.
#include <NvInferRuntime.h>

#include <mutex>
#include <string>

#include "tileGatherPlugin/tileGatherPlugin.h"
#include "tileScatterPlugin/tileScatterPlugin.h"

// TENSORRTAPI is empty outside TensorRT's own build: export explicitly (exports.map keeps only these).
#define SSIC_TRT_EXPORT extern "C" __attribute__((visibility("default")))

namespace ssic {
namespace trt {
namespace {
std::mutex gLoggerMutex;
nvinfer1::ILoggerFinder* gLoggerFinder = nullptr;
}  // namespace

void logError(const std::string& msg) noexcept {
  std::lock_guard<std::mutex> lock(gLoggerMutex);
  nvinfer1::ILogger* logger = gLoggerFinder ? gLoggerFinder->findLogger() : nullptr;
  if (logger) {
    logger->log(nvinfer1::ILogger::Severity::kERROR, msg.c_str());
  } else {
    std::fprintf(stderr, "[ssic TensorRT plugins] %s\n", msg.c_str());
  }
}

}  // namespace trt
}  // namespace ssic

SSIC_TRT_EXPORT void setLoggerFinder(nvinfer1::ILoggerFinder* finder) {
  std::lock_guard<std::mutex> lock(ssic::trt::gLoggerMutex);
  ssic::trt::gLoggerFinder = finder;
}

SSIC_TRT_EXPORT nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
  static ssic::trt::TileGatherPluginCreator gatherCreator;
  static ssic::trt::TileScatterPluginCreator scatterCreator;
  static nvinfer1::IPluginCreatorInterface* const creators[] = {&gatherCreator, &scatterCreator};
  nbCreators = 2;
  return creators;
}
