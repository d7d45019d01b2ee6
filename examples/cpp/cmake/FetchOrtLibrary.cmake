# Provides the ONNX Runtime shared library for the C++ serving example.
#
# Either -DSSIC_ORT_LIBRARY=<path to libonnxruntime.so[.1]> or, by default, the library shipped in
# the npm package onnxruntime-node (MIT; bin/napi-v6/linux/<arch>/libonnxruntime.so.1), fetched with
# `npm pack`, checked against a pinned sha256 and cached outside the repository in $SSIC_CACHE_DIR,
# else $XDG_CACHE_HOME/ssic, else ~/.cache/ssic. The library is never committed.
#
# onnxruntime-node has no 1.31 release; 1.30.0 is the closest to the Python onnxruntime 1.31.x and
# serves the headers' ORT_API_VERSION (29).
#
# Defines the imported target ssic::onnxruntime and sets SSIC_ORT_LIBRARY_FILE.

set(SSIC_ORT_NODE_VERSION "1.30.0")
set(SSIC_ORT_NODE_SHA256 "6e3390d6b783e7be946fad629292799da28d0b42f84856e50d2c1b0383291e75")

set(SSIC_ORT_LIBRARY "" CACHE FILEPATH "ONNX Runtime shared library (empty: fetch onnxruntime-node with npm)")

if(SSIC_ORT_LIBRARY)
  if(NOT EXISTS "${SSIC_ORT_LIBRARY}")
    message(FATAL_ERROR "ssic: SSIC_ORT_LIBRARY=${SSIC_ORT_LIBRARY} does not exist")
  endif()
  set(SSIC_ORT_LIBRARY_FILE "${SSIC_ORT_LIBRARY}")
else()
  if(NOT CMAKE_SYSTEM_NAME STREQUAL "Linux")
    message(FATAL_ERROR "ssic: the npm ONNX Runtime is fetched for Linux only; pass -DSSIC_ORT_LIBRARY=<libonnxruntime>")
  endif()
  string(TOLOWER "${CMAKE_SYSTEM_PROCESSOR}" _ssic_proc)
  if(_ssic_proc MATCHES "^(x86_64|amd64)$")
    set(_ssic_arch x64)
  elseif(_ssic_proc MATCHES "^(aarch64|arm64)$")
    set(_ssic_arch arm64)
  else()
    message(FATAL_ERROR "ssic: no npm ONNX Runtime for ${CMAKE_SYSTEM_PROCESSOR}; pass -DSSIC_ORT_LIBRARY=<libonnxruntime>")
  endif()

  include("${CMAKE_CURRENT_LIST_DIR}/../../../cmake/SsicNpmFetch.cmake")
  ssic_cache_dir(_ssic_cache)
  set(_ssic_dir "${_ssic_cache}/ort-node-${SSIC_ORT_NODE_VERSION}/${_ssic_arch}")
  set(_ssic_stamp "${_ssic_dir}/sha256.txt")
  set(SSIC_ORT_LIBRARY_FILE "${_ssic_dir}/libonnxruntime.so.1")

  file(LOCK "${_ssic_cache}/ort-node.lock" GUARD FILE TIMEOUT 600)

  set(_ssic_have FALSE)
  if(EXISTS "${_ssic_stamp}" AND EXISTS "${SSIC_ORT_LIBRARY_FILE}")
    file(READ "${_ssic_stamp}" _ssic_stamp_sha)
    string(STRIP "${_ssic_stamp_sha}" _ssic_stamp_sha)
    if(_ssic_stamp_sha STREQUAL SSIC_ORT_NODE_SHA256)
      set(_ssic_have TRUE)
    endif()
  endif()

  if(NOT _ssic_have)
    set(_ssic_tmp "${_ssic_cache}/tmp-ort-node")
    ssic_npm_pack("onnxruntime-node" "${SSIC_ORT_NODE_VERSION}" "${SSIC_ORT_NODE_SHA256}" "${_ssic_tmp}" _ssic_tgz
      "Install node/npm or pass -DSSIC_ORT_LIBRARY=<path to libonnxruntime.so>")
    set(_ssic_in_tgz "package/bin/napi-v6/linux/${_ssic_arch}/libonnxruntime.so.1")
    file(ARCHIVE_EXTRACT INPUT "${_ssic_tgz}" DESTINATION "${_ssic_tmp}/x" PATTERNS "${_ssic_in_tgz}")
    if(NOT EXISTS "${_ssic_tmp}/x/${_ssic_in_tgz}")
      message(FATAL_ERROR "ssic: ${_ssic_in_tgz} not found in the npm package")
    endif()
    file(REMOVE_RECURSE "${_ssic_dir}")
    file(MAKE_DIRECTORY "${_ssic_dir}")
    file(COPY "${_ssic_tmp}/x/${_ssic_in_tgz}" DESTINATION "${_ssic_dir}")
    file(WRITE "${_ssic_stamp}" "${SSIC_ORT_NODE_SHA256}\n")
    file(REMOVE_RECURSE "${_ssic_tmp}")
  endif()
  file(LOCK "${_ssic_cache}/ort-node.lock" RELEASE)
endif()

add_library(ssic::onnxruntime SHARED IMPORTED)
set_target_properties(ssic::onnxruntime PROPERTIES
  IMPORTED_LOCATION "${SSIC_ORT_LIBRARY_FILE}"
  IMPORTED_NO_SONAME FALSE)
message(STATUS "ssic: ONNX Runtime library ${SSIC_ORT_LIBRARY_FILE}")
