// What every block format header shares: the SIMD level this build targets, exact fp16/bf16 → fp32 conversion,
// unaligned little-endian loads. A format header defines one struct with
//   kBlockWeights, kBlockBytes                 the GGUF block (32 or 256 weights)
//   dequant(row, g, w[32])                     weights 32g .. 32g+31 of a row, exactly as gguf-py's dequantize
//   dequant16x2(row, g, lo, hi)  (AVX-512)     the same 32 values in two registers, bit for bit; the K-quants
//                                              (256-weight super-blocks) take the scales that
//                                              prepare(row, g, KScales&) decoded once per super-block
// Exactness: each weight is built by the same fp32 operations as gguf-py (a multiply, then an add or subtract,
// never fused: the extension is built with -ffp-contract=off), so a one-hot input reads the dequantized weight.
#pragma once
#include <cstdint>
#include <cstring>
#if defined(__AVX512F__)
#define HASTEN_AVX512 1
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__)
#define HASTEN_AVX2 1
#include <immintrin.h>
#endif

namespace hasten {

inline uint16_t load_u16(const uint8_t* p) { uint16_t v; std::memcpy(&v, p, 2); return v; }
inline uint32_t load_u32(const uint8_t* p) { uint32_t v; std::memcpy(&v, p, 4); return v; }
inline float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

// IEEE half → float, exact for every input (subnormals, inf, nan), as numpy's float16.astype(float32).
inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  const uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1f;
  uint32_t mant = h & 0x3ff;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (mant << 13));
  if (exp != 0) return bits_to_float(sign | ((exp + 112) << 23) | (mant << 13));
  if (mant == 0) return bits_to_float(sign);
  uint32_t e = 113;  // subnormal: shift the mantissa up until its leading one is the implicit bit
  while (!(mant & 0x400)) { mant <<= 1; --e; }
  return bits_to_float(sign | (e << 23) | ((mant & 0x3ff) << 13));
#endif
}
inline float bf16_to_float(uint16_t b) { return bits_to_float(uint32_t(b) << 16); }
inline float load_half(const uint8_t* p) { return half_to_float(load_u16(p)); }

// The K-quants' 6-bit sub-block scale and min (gguf-py Q4_K.get_scale_min), sub-block j of 8.
inline void k_scale_min(const uint8_t* s, int j, uint8_t& sc, uint8_t& m) {
  if (j < 4) {
    sc = s[j] & 63;
    m = s[j + 4] & 63;
  } else {
    sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
    m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

#ifdef HASTEN_AVX512
inline __m512 iota16(float from) {
  return _mm512_add_ps(_mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_ps(from));
}
inline __m512i bytes16(const uint8_t* p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
#endif

}  // namespace hasten
