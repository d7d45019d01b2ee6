# Provides the ONNX Runtime C/C++ headers (they ship in no Python or Debian package).
#
# Either -DSSIC_ORT_INCLUDE_DIR=<dir with onnxruntime_cxx_api.h> or, by default, the headers of the
# npm package com.github.asus4.onnxruntime (MIT; ORT_API_VERSION 29, platform-neutral), fetched
# with `npm pack`, checked against a pinned sha256 and cached outside the repository in
# $SSIC_CACHE_DIR, else $XDG_CACHE_HOME/ssic, else ~/.cache/ssic. The headers are never committed.
#
# Sets SSIC_ORT_INCLUDE_DIR.

set(SSIC_ORT_NPM_PACKAGE "com.github.asus4.onnxruntime")
set(SSIC_ORT_NPM_VERSION "0.4.9")
set(SSIC_ORT_NPM_SHA256 "e59788788818fdde1b2e522e766a21ba0f7d8391de55737abf81e32cc801785d")
set(_ssic_ort_headers_in_tgz
    "package/Plugins/iOS~/onnxruntime.xcframework/ios-arm64/onnxruntime.framework/Headers")

set(SSIC_ORT_INCLUDE_DIR "" CACHE PATH "Directory with the ONNX Runtime headers (empty: fetch with npm)")

function(_ssic_check_ort_headers dir)
  foreach(h onnxruntime_c_api.h onnxruntime_cxx_api.h onnxruntime_lite_custom_op.h)
    if(NOT EXISTS "${dir}/${h}")
      message(FATAL_ERROR "ssic: ${h} not found in ONNX Runtime include dir '${dir}'")
    endif()
  endforeach()
endfunction()

if(SSIC_ORT_INCLUDE_DIR)
  _ssic_check_ort_headers("${SSIC_ORT_INCLUDE_DIR}")
  message(STATUS "ssic: ONNX Runtime headers from ${SSIC_ORT_INCLUDE_DIR}")
  return()
endif()

include("${CMAKE_CURRENT_LIST_DIR}/SsicNpmFetch.cmake")
ssic_cache_dir(_ssic_cache)
set(_ssic_dir "${_ssic_cache}/ort-headers-${SSIC_ORT_NPM_VERSION}")
set(_ssic_stamp "${_ssic_dir}/sha256.txt")

# Concurrent builds (pip and a sanitizer build, say) share the cache: serialise the fetch.
file(LOCK "${_ssic_cache}/ort-headers.lock" GUARD FILE TIMEOUT 600)

set(_ssic_have FALSE)
if(EXISTS "${_ssic_stamp}")
  file(READ "${_ssic_stamp}" _ssic_stamp_sha)
  string(STRIP "${_ssic_stamp_sha}" _ssic_stamp_sha)
  if(_ssic_stamp_sha STREQUAL SSIC_ORT_NPM_SHA256 AND EXISTS "${_ssic_dir}/include/onnxruntime_lite_custom_op.h")
    set(_ssic_have TRUE)
  endif()
endif()

if(NOT _ssic_have)
  set(_ssic_tmp "${_ssic_cache}/tmp-ort-headers")
  ssic_npm_pack("${SSIC_ORT_NPM_PACKAGE}" "${SSIC_ORT_NPM_VERSION}" "${SSIC_ORT_NPM_SHA256}" "${_ssic_tmp}" _ssic_tgz
    "Install node/npm, or pass -DSSIC_ORT_INCLUDE_DIR=<dir with onnxruntime_cxx_api.h> (pip: --config-settings=cmake.define.SSIC_ORT_INCLUDE_DIR=...)")
  file(ARCHIVE_EXTRACT INPUT "${_ssic_tgz}" DESTINATION "${_ssic_tmp}/x"
       PATTERNS "${_ssic_ort_headers_in_tgz}/*.h")
  file(GLOB _ssic_headers "${_ssic_tmp}/x/${_ssic_ort_headers_in_tgz}/*.h")
  if(NOT _ssic_headers)
    message(FATAL_ERROR "ssic: no headers under ${_ssic_ort_headers_in_tgz} in the npm package")
  endif()
  file(REMOVE_RECURSE "${_ssic_dir}")
  file(MAKE_DIRECTORY "${_ssic_dir}/include")
  file(COPY ${_ssic_headers} DESTINATION "${_ssic_dir}/include")
  file(WRITE "${_ssic_stamp}" "${SSIC_ORT_NPM_SHA256}\n")
  file(REMOVE_RECURSE "${_ssic_tmp}")
endif()
file(LOCK "${_ssic_cache}/ort-headers.lock" RELEASE)

set(SSIC_ORT_INCLUDE_DIR "${_ssic_dir}/include")
_ssic_check_ort_headers("${SSIC_ORT_INCLUDE_DIR}")
message(STATUS "ssic: ONNX Runtime headers from ${SSIC_ORT_INCLUDE_DIR}")
