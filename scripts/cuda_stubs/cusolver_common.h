// Stand-in for a CUDA library header that the CPU build of torch does not ship, so that scripts/check_bindings.sh can
// syntax-check csrc/bindings.cpp on a machine without a CUDA torch: only the names ATen's CUDA headers mention.
// Never used for a real build.
#pragma once
typedef int cusolverStatus_t;
