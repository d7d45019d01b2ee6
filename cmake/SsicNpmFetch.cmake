# Shared by the CMake modules that take third-party files from npm packages (the ONNX Runtime
# headers, the ONNX Runtime library of the C++ example): the cache directory outside the repository
# and a checked `npm pack`. Nothing fetched is ever committed.

include_guard(GLOBAL)

# ssic_cache_dir(<var>): $SSIC_CACHE_DIR, else $XDG_CACHE_HOME/ssic, else ~/.cache/ssic (created).
function(ssic_cache_dir var)
  if(DEFINED ENV{SSIC_CACHE_DIR} AND NOT "$ENV{SSIC_CACHE_DIR}" STREQUAL "")
    set(dir "$ENV{SSIC_CACHE_DIR}")
  elseif(DEFINED ENV{XDG_CACHE_HOME} AND NOT "$ENV{XDG_CACHE_HOME}" STREQUAL "")
    set(dir "$ENV{XDG_CACHE_HOME}/ssic")
  else()
    set(dir "$ENV{HOME}/.cache/ssic")
  endif()
  file(MAKE_DIRECTORY "${dir}")
  set(${var} "${dir}" PARENT_SCOPE)
endfunction()

# ssic_npm_pack(<package> <version> <sha256> <workdir> <tgz var> <hint>): `npm pack` the package into
# <workdir> (emptied first) and check the tarball's sha256; FATAL_ERROR with <hint> when npm is missing.
function(ssic_npm_pack package version sha256 workdir tgz_var hint)
  find_program(SSIC_NPM npm)
  if(NOT SSIC_NPM)
    message(FATAL_ERROR "ssic: npm not found; it is needed once to fetch ${package}@${version}. ${hint}")
  endif()
  file(REMOVE_RECURSE "${workdir}")
  file(MAKE_DIRECTORY "${workdir}")
  message(STATUS "ssic: fetching ${package}@${version} with npm pack")
  execute_process(
    COMMAND "${SSIC_NPM}" pack "${package}@${version}" --silent
    WORKING_DIRECTORY "${workdir}"
    RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  set(tgz "${workdir}/${package}-${version}.tgz")
  if(NOT rc EQUAL 0 OR NOT EXISTS "${tgz}")
    message(FATAL_ERROR "ssic: `npm pack ${package}@${version}` failed (${rc}): ${err}")
  endif()
  file(SHA256 "${tgz}" got)
  if(NOT got STREQUAL sha256)
    file(REMOVE_RECURSE "${workdir}")
    message(FATAL_ERROR "ssic: sha256 mismatch for ${package}-${version}.tgz: got ${got}, expected ${sha256}. "
                        "Refusing to use it.")
  endif()
  set(${tgz_var} "${tgz}" PARENT_SCOPE)
endfunction()
