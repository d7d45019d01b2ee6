# Compiler flags shared by the ssic native targets. Defines the interface target ssic_flags.
include(CheckCXXCompilerFlag)

add_library(ssic_flags INTERFACE)
# -fno-trapping-math lets GCC if-convert the float compares of the activations and vectorise the
# channel loops; results are unchanged (the kernels never rely on FP exceptions).
target_compile_options(ssic_flags INTERFACE -Wall -Wextra -fno-trapping-math)

if(SSIC_SANITIZE)
  set(_ssic_san -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer)
  target_compile_options(ssic_flags INTERFACE ${_ssic_san} -O1 -g)
  target_link_options(ssic_flags INTERFACE ${_ssic_san})
else()
  # Portable optimisation: the wheel may run on another machine, so no -march=native.
  target_compile_options(ssic_flags INTERFACE $<$<CONFIG:Release,RelWithDebInfo>:-O3>)
  if(CMAKE_SYSTEM_PROCESSOR MATCHES "x86_64|AMD64|amd64")
    check_cxx_compiler_flag(-march=x86-64-v2 SSIC_HAVE_X86_64_V2)
    if(SSIC_HAVE_X86_64_V2)
      target_compile_options(ssic_flags INTERFACE -march=x86-64-v2)
    endif()
  endif()
endif()
