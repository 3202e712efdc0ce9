// Host-side packing of 3-bit ap weights for the pure-CUDA A/B tools (after ../csrc/common.cuh, which defines
// kl_offset): the checkpoint's bit-planes [3][out][words] into the shipped kernels' layout [out][words/8][3][8]
// (decdec/formats.py pack_ap3_kernel is the framework's packer; scripts/gemv_ab.cu checks both give identical outputs).
#pragma once

#include <cstdint>
#include <vector>

inline std::vector<uint32_t> pack_kernel_layout(const std::vector<uint32_t>& planes, int out, int words) {
  std::vector<uint32_t> p((size_t)out * words * 3);
  const size_t ps = (size_t)out * words;
  for (int r = 0; r < out; ++r)
    for (int wd = 0; wd < words; ++wd)
      for (int q = 0; q < 3; ++q) {
        const size_t i = (size_t)r * words + wd;
        uint32_t w = planes[q * ps + i] & 0x88888888u;
        for (int b = 0; b < 3; ++b) w |= ((planes[b * ps + i] >> q) & 0x11111111u) << b;
        p[decdec::kl_offset(r, words, wd) + 8 * q] = w;
      }
  return p;
}
