// The x86 vector intrinsics that gguf_cpu.cpp uses, written in plain C++ for the "portable" build
// of the kernels: CPUs without AVX2/FMA/F16C and other architectures (ARM). Each function does what
// Intel's documentation says the intrinsic of the same name does, lane by lane; the compiler
// vectorises the short fixed-length loops with whatever the target has (SSE2, NEON).
//
// The names are macros onto functions in namespace edgellm_simd, so that this header also works
// where <immintrin.h> has been included by another header (its functions keep their own names).
// Include it after every system and PyTorch header.
//
// One difference from AVX2 is deliberate: _mm256_fmadd_ps is a * b + c, which the compiler fuses
// only where the target has a fused multiply-add. Sums then round differently from the AVX2 build
// (by float32 rounding steps); products that are exact (every dequantisation of Q4_0, Q4_1, Q5_0
// and Q8_0) give the same bits.
#pragma once

#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace edgellm_simd {

struct m256 { float f[8]; };
struct m128 { float f[4]; };
struct m256i { uint8_t b[32]; };
struct m128i { uint8_t b[16]; };

// lanes of an integer vector as another element type (copies: no aliasing questions)
template <typename T, typename V> inline void get_lanes(const V& v, T* out) { std::memcpy(out, v.b, sizeof(v.b)); }
template <typename T, typename V> inline V from_lanes(const T* in) { V v; std::memcpy(v.b, in, sizeof(v.b)); return v; }

// ---- float32 x 8 ----------------------------------------------------------------------------
inline m256 setzero_ps() { m256 r; for (int i = 0; i < 8; i++) r.f[i] = 0.0f; return r; }
inline m256 set1_ps(float x) { m256 r; for (int i = 0; i < 8; i++) r.f[i] = x; return r; }
inline m256 loadu_ps(const float* p) { m256 r; std::memcpy(r.f, p, sizeof(r.f)); return r; }
inline void storeu_ps(float* p, m256 v) { std::memcpy(p, v.f, sizeof(v.f)); }
#define EDGELLM_SIMD_BINARY(name, expr) \
  inline m256 name(m256 a, m256 b) { m256 r; for (int i = 0; i < 8; i++) r.f[i] = (expr); return r; }
EDGELLM_SIMD_BINARY(add_ps, a.f[i] + b.f[i])
EDGELLM_SIMD_BINARY(sub_ps, a.f[i] - b.f[i])
EDGELLM_SIMD_BINARY(mul_ps, a.f[i] * b.f[i])
EDGELLM_SIMD_BINARY(div_ps, a.f[i] / b.f[i])
EDGELLM_SIMD_BINARY(min_ps, a.f[i] < b.f[i] ? a.f[i] : b.f[i])   // as minps: b when either is NaN
EDGELLM_SIMD_BINARY(max_ps, a.f[i] > b.f[i] ? a.f[i] : b.f[i])
#undef EDGELLM_SIMD_BINARY
inline m256 fmadd_ps(m256 a, m256 b, m256 c) { m256 r; for (int i = 0; i < 8; i++) r.f[i] = a.f[i] * b.f[i] + c.f[i]; return r; }
inline m256 fnmadd_ps(m256 a, m256 b, m256 c) { m256 r; for (int i = 0; i < 8; i++) r.f[i] = c.f[i] - a.f[i] * b.f[i]; return r; }
inline m256 xor_ps(m256 a, m256 b) {
  m256 r;
  for (int i = 0; i < 8; i++) {
    uint32_t x, y;
    std::memcpy(&x, &a.f[i], 4);
    std::memcpy(&y, &b.f[i], 4);
    x ^= y;
    std::memcpy(&r.f[i], &x, 4);
  }
  return r;
}
// Only round-to-nearest-even is used (the default rounding mode, which nearbyint follows).
inline m256 round_ps(m256 a, int) { m256 r; for (int i = 0; i < 8; i++) r.f[i] = std::nearbyint(a.f[i]); return r; }
inline m256i cvtps_epi32(m256 a) {
  int32_t v[8];
  for (int i = 0; i < 8; i++) v[i] = static_cast<int32_t>(std::nearbyint(a.f[i]));
  return from_lanes<int32_t, m256i>(v);
}
inline m256 cvtepi32_ps(m256i a) {
  int32_t v[8];
  get_lanes(a, v);
  m256 r;
  for (int i = 0; i < 8; i++) r.f[i] = static_cast<float>(v[i]);
  return r;
}
inline m256 castsi256_ps(m256i a) { m256 r; std::memcpy(r.f, a.b, 32); return r; }
// within each 128-bit half: pairwise sums of a, then of b
inline m256 hadd_ps(m256 a, m256 b) {
  m256 r;
  for (int h = 0; h < 8; h += 4) {
    r.f[h + 0] = a.f[h + 0] + a.f[h + 1];
    r.f[h + 1] = a.f[h + 2] + a.f[h + 3];
    r.f[h + 2] = b.f[h + 0] + b.f[h + 1];
    r.f[h + 3] = b.f[h + 2] + b.f[h + 3];
  }
  return r;
}
// each 128-bit half of the result: a.lo, a.hi, b.lo or b.hi by two bits of imm (bit 3 / 7: zero)
inline m256 permute2f128_ps(m256 a, m256 b, int imm) {
  m256 r;
  for (int h = 0; h < 2; h++) {
    const int c = imm >> (4 * h);
    const float* src = (c & 2 ? b.f : a.f) + 4 * (c & 1);
    for (int i = 0; i < 4; i++) r.f[4 * h + i] = (c & 8) ? 0.0f : src[i];
  }
  return r;
}
inline m128 castps256_ps128(m256 a) { m128 r; std::memcpy(r.f, a.f, 16); return r; }
inline m128 extractf128_ps(m256 a, int half) { m128 r; std::memcpy(r.f, a.f + 4 * (half & 1), 16); return r; }

// ---- float32 x 4 ----------------------------------------------------------------------------
inline m128 add_ps128(m128 a, m128 b) { m128 r; for (int i = 0; i < 4; i++) r.f[i] = a.f[i] + b.f[i]; return r; }
inline m128 hadd_ps128(m128 a, m128 b) {
  return m128{{a.f[0] + a.f[1], a.f[2] + a.f[3], b.f[0] + b.f[1], b.f[2] + b.f[3]}};
}
inline float cvtss_f32(m128 a) { return a.f[0]; }
inline m128 setzero_ps128() { return m128{{0.0f, 0.0f, 0.0f, 0.0f}}; }
inline m128 set1_ps128(float x) { return m128{{x, x, x, x}}; }
inline m128 setr_ps128(float a, float b, float c, float d) { return m128{{a, b, c, d}}; }
inline m128 mul_ps128(m128 a, m128 b) { m128 r; for (int i = 0; i < 4; i++) r.f[i] = a.f[i] * b.f[i]; return r; }
inline m128 fmadd_ps128(m128 a, m128 b, m128 c) { m128 r; for (int i = 0; i < 4; i++) r.f[i] = a.f[i] * b.f[i] + c.f[i]; return r; }
inline m128 movehdup_ps(m128 a) { return m128{{a.f[1], a.f[1], a.f[3], a.f[3]}}; }
inline m256 broadcastss_ps(m128 a) { return set1_ps(a.f[0]); }

// ---- integers -------------------------------------------------------------------------------
inline m256i set1_epi8(int8_t x) { m256i r; std::memset(r.b, static_cast<uint8_t>(x), 32); return r; }
inline m256i set1_epi32(int32_t x) { int32_t v[8]; for (int i = 0; i < 8; i++) v[i] = x; return from_lanes<int32_t, m256i>(v); }
inline m256i set1_epi64x(int64_t x) { int64_t v[4] = {x, x, x, x}; return from_lanes<int64_t, m256i>(v); }
inline m256i setr_epi64x(int64_t e0, int64_t e1, int64_t e2, int64_t e3) {
  int64_t v[4] = {e0, e1, e2, e3};
  return from_lanes<int64_t, m256i>(v);
}
inline m256i and_si256(m256i a, m256i b) { m256i r; for (int i = 0; i < 32; i++) r.b[i] = a.b[i] & b.b[i]; return r; }
inline m256i or_si256(m256i a, m256i b) { m256i r; for (int i = 0; i < 32; i++) r.b[i] = a.b[i] | b.b[i]; return r; }
inline m256i cmpeq_epi8(m256i a, m256i b) { m256i r; for (int i = 0; i < 32; i++) r.b[i] = a.b[i] == b.b[i] ? 0xFF : 0; return r; }
// within each 128-bit half: byte i = a's byte (idx & 15) of the same half, or 0 when idx's top bit is set
inline m256i shuffle_epi8(m256i a, m256i idx) {
  m256i r;
  for (int i = 0; i < 32; i++) {
    const uint8_t k = idx.b[i];
    r.b[i] = (k & 0x80) ? 0 : a.b[(i & 16) + (k & 15)];
  }
  return r;
}
inline m256i srli_epi32(m256i a, int n) {
  uint32_t v[8];
  get_lanes(a, v);
  for (int i = 0; i < 8; i++) v[i] = n > 31 ? 0 : v[i] >> n;
  return from_lanes<uint32_t, m256i>(v);
}
inline m256i slli_epi32(m256i a, int n) {
  uint32_t v[8];
  get_lanes(a, v);
  for (int i = 0; i < 8; i++) v[i] = n > 31 ? 0 : v[i] << n;
  return from_lanes<uint32_t, m256i>(v);
}
inline m256i add_epi32(m256i a, m256i b) {
  uint32_t x[8], y[8];
  get_lanes(a, x);
  get_lanes(b, y);
  for (int i = 0; i < 8; i++) x[i] += y[i];   // wraps, as the instruction does
  return from_lanes<uint32_t, m256i>(x);
}
inline m256i cvtepu8_epi32(m128i a) { int32_t v[8]; for (int i = 0; i < 8; i++) v[i] = a.b[i]; return from_lanes<int32_t, m256i>(v); }
inline m256i cvtepi8_epi32(m128i a) {
  int32_t v[8];
  for (int i = 0; i < 8; i++) v[i] = static_cast<int8_t>(a.b[i]);
  return from_lanes<int32_t, m256i>(v);
}
inline m256i set_m128i(m128i hi, m128i lo) { m256i r; std::memcpy(r.b, lo.b, 16); std::memcpy(r.b + 16, hi.b, 16); return r; }
inline m128i extracti128_si256(m256i a, int half) { m128i r; std::memcpy(r.b, a.b + 16 * (half & 1), 16); return r; }
inline m128i castsi256_si128(m256i a) { m128i r; std::memcpy(r.b, a.b, 16); return r; }
inline m128i loadl_epi64(const m128i* p) { m128i r; std::memset(r.b, 0, 16); std::memcpy(r.b, p, 8); return r; }
inline m128i loadu_si128(const m128i* p) { m128i r; std::memcpy(r.b, p, 16); return r; }
inline void storeu_si128(m128i* p, m128i v) { std::memcpy(p, v.b, 16); }
// the whole register shifted right by n bytes, zeros coming in
inline m128i cvtsi32_si128(int32_t x) { m128i r; std::memset(r.b, 0, 16); std::memcpy(r.b, &x, 4); return r; }
inline m128 castsi128_ps(m128i a) { m128 r; std::memcpy(r.f, a.b, 16); return r; }
inline m128i srli_si128(m128i a, int n) { m128i r; for (int i = 0; i < 16; i++) r.b[i] = i + n < 16 ? a.b[i + n] : 0; return r; }
inline m128i srli_epi16(m128i a, int n) {
  uint16_t v[8];
  get_lanes(a, v);
  for (int i = 0; i < 8; i++) v[i] = n > 15 ? 0 : static_cast<uint16_t>(v[i] >> n);
  return from_lanes<uint16_t, m128i>(v);
}

// ---- float16 --------------------------------------------------------------------------------
inline float cvtsh_ss(uint16_t h) { return c10::detail::fp16_ieee_to_fp32_value(h); }
inline m256 cvtph_ps(m128i a) {
  uint16_t v[8];
  get_lanes(a, v);
  m256 r;
  for (int i = 0; i < 8; i++) r.f[i] = c10::detail::fp16_ieee_to_fp32_value(v[i]);
  return r;
}
inline m128 cvtph_ps128(m128i a) {   // the low four lanes of cvtph_ps
  const m256 all = cvtph_ps(a);
  m128 r;
  std::memcpy(r.f, all.f, sizeof(r.f));
  return r;
}
// round to nearest even, as _MM_FROUND_TO_NEAREST_INT asks (the only mode used)
inline m128i cvtps_ph(m256 a, int) {
  uint16_t v[8];
  for (int i = 0; i < 8; i++) v[i] = c10::detail::fp16_ieee_from_fp32_value(a.f[i]);
  return from_lanes<uint16_t, m128i>(v);
}

inline void prefetch(const char* p, int) { __builtin_prefetch(p); }

}  // namespace edgellm_simd

#define __m256 edgellm_simd::m256
#define __m128 edgellm_simd::m128
#define __m256i edgellm_simd::m256i
#define __m128i edgellm_simd::m128i
#define _mm256_setzero_ps edgellm_simd::setzero_ps
#define _mm256_set1_ps edgellm_simd::set1_ps
#define _mm256_loadu_ps edgellm_simd::loadu_ps
#define _mm256_storeu_ps edgellm_simd::storeu_ps
#define _mm256_add_ps edgellm_simd::add_ps
#define _mm256_sub_ps edgellm_simd::sub_ps
#define _mm256_mul_ps edgellm_simd::mul_ps
#define _mm256_div_ps edgellm_simd::div_ps
#define _mm256_min_ps edgellm_simd::min_ps
#define _mm256_max_ps edgellm_simd::max_ps
#define _mm256_fmadd_ps edgellm_simd::fmadd_ps
#define _mm256_fnmadd_ps edgellm_simd::fnmadd_ps
#define _mm256_xor_ps edgellm_simd::xor_ps
#define _mm256_round_ps edgellm_simd::round_ps
#define _mm256_cvtps_epi32 edgellm_simd::cvtps_epi32
#define _mm256_cvtepi32_ps edgellm_simd::cvtepi32_ps
#define _mm256_castsi256_ps edgellm_simd::castsi256_ps
#define _mm256_hadd_ps edgellm_simd::hadd_ps
#define _mm256_permute2f128_ps edgellm_simd::permute2f128_ps
#define _mm256_castps256_ps128 edgellm_simd::castps256_ps128
#define _mm256_extractf128_ps edgellm_simd::extractf128_ps
#define _mm_add_ps edgellm_simd::add_ps128
#define _mm_hadd_ps edgellm_simd::hadd_ps128
#define _mm_cvtss_f32 edgellm_simd::cvtss_f32
#define _mm_setzero_ps edgellm_simd::setzero_ps128
#define _mm_set1_ps edgellm_simd::set1_ps128
#define _mm_setr_ps edgellm_simd::setr_ps128
#define _mm_mul_ps edgellm_simd::mul_ps128
#define _mm_fmadd_ps edgellm_simd::fmadd_ps128
#define _mm_movehdup_ps edgellm_simd::movehdup_ps
#define _mm256_broadcastss_ps edgellm_simd::broadcastss_ps
#define _mm_cvtsi32_si128 edgellm_simd::cvtsi32_si128
#define _mm_castsi128_ps edgellm_simd::castsi128_ps
#define _mm_cvtph_ps edgellm_simd::cvtph_ps128
#define _mm256_set1_epi8 edgellm_simd::set1_epi8
#define _mm256_set1_epi32 edgellm_simd::set1_epi32
#define _mm256_set1_epi64x edgellm_simd::set1_epi64x
#define _mm256_setr_epi64x edgellm_simd::setr_epi64x
#define _mm256_and_si256 edgellm_simd::and_si256
#define _mm256_or_si256 edgellm_simd::or_si256
#define _mm256_cmpeq_epi8 edgellm_simd::cmpeq_epi8
#define _mm256_shuffle_epi8 edgellm_simd::shuffle_epi8
#define _mm256_srli_epi32 edgellm_simd::srli_epi32
#define _mm256_slli_epi32 edgellm_simd::slli_epi32
#define _mm256_add_epi32 edgellm_simd::add_epi32
#define _mm256_cvtepu8_epi32 edgellm_simd::cvtepu8_epi32
#define _mm256_cvtepi8_epi32 edgellm_simd::cvtepi8_epi32
#define _mm256_set_m128i edgellm_simd::set_m128i
#define _mm256_extracti128_si256 edgellm_simd::extracti128_si256
#define _mm256_castsi256_si128 edgellm_simd::castsi256_si128
#define _mm_loadl_epi64 edgellm_simd::loadl_epi64
#define _mm_loadu_si128 edgellm_simd::loadu_si128
#define _mm_storeu_si128 edgellm_simd::storeu_si128
#define _mm_srli_si128 edgellm_simd::srli_si128
#define _mm_srli_epi16 edgellm_simd::srli_epi16
#define _cvtsh_ss edgellm_simd::cvtsh_ss
#define _mm256_cvtph_ps edgellm_simd::cvtph_ps
#define _mm256_cvtps_ph edgellm_simd::cvtps_ph
#define _mm_prefetch edgellm_simd::prefetch
#ifndef _MM_FROUND_TO_NEAREST_INT
#define _MM_FROUND_TO_NEAREST_INT 0x00
#define _MM_FROUND_NO_EXC 0x08
#endif
#ifndef _MM_HINT_T0
#define _MM_HINT_T0 3
#endif
#ifndef _MM_HINT_T1
#define _MM_HINT_T1 2
#endif
