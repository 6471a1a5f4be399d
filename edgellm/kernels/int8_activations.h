// ---- int8 activations (opt-in: --activations int8) ------------------------------------------
// Included by gguf_cpu.cpp (after its block formats and helpers, before the fused decode step);
// kept in its own file so that the exact fp32 kernels above stay untouched.
//
// The scheme is llama.cpp's Q8 activation blocks: every 32 values of an activation row become
// 32 int8 and one float scale, d = max|x| / 127 and q = round(x / d) (float32 division, ties to
// even), and each weight block meets them in an integer dot product:
//   AVX2:     _mm256_maddubs_epi16 (u8 x s8 -> pairs summed in int16) + _mm256_madd_epi16 (-> int32)
//   VNNI:     _mm256_dpbusd_epi32 (u8 x s8 -> int32 in one instruction), chosen at run time in the
//             avx512 build when the CPU reports avx512_vnni
//   portable: plain C++ loops
// maddubs multiplies unsigned by signed bytes, so 4- and 5-bit weights are used as their unsigned
// codes (0..15, 0..31) and signed ones (Q8_0, Q6_KR) with the sign trick |w| * (x * sign w).
// No sum can overflow: a pair is at most 2 * 128 * 127 < 32767 in int16, a block 32 * 128 * 127 in int32.
//
// Offsets: Q4_1 and Q4_KR (w = d q + m), and Q4_0 / Q5_0 written the same way (m = -8 d, -16 d),
// add m * s per block with s = d_x * sum(q_x), the sum of the *quantised* activations. Then every
// format computes exactly W . x^ (x^ = d_x q_x, the dequantised activations): the only error is
// each true weight times x's rounding error. The exact float sum of x would make the offset term
// exact but leave the error weighted by d q alone, which for Q4_1 is biased (q in 0..15) and so
// larger than the centred weight d q + m. The int32 sums are exact; what differs from W . x^ in
// exact arithmetic is the float32 scaling and accumulation of the block terms.

// 1: the VNNI copy takes 16 weight rows a vector (int8_row_lanes.inc); 0 (a build flag, for A/B
// measurements): tile() as the maddubs copy.
#ifndef EDGELLM_ROW_LANES
#define EDGELLM_ROW_LANES 1
#endif

namespace int8act {

// Quantised activation rows: q [M, K] int8; d and s [M, K / 32]: per block the scale and d * sum(q).
struct Q8Rows {
  const int8_t* q;
  const float* d;
  const float* s;
};

// One block of 32 floats -> 32 int8 and its scale and scaled sum.
inline void quantize_block(const float* x, int8_t* q, float* d_out, float* s_out) {
#if defined(__AVX2__)
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 v[4], mx = _mm256_setzero_ps();
  for (int j = 0; j < 4; j++) {
    v[j] = _mm256_loadu_ps(x + 8 * j);
    mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, v[j]));
  }
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
  const float amax = _mm_cvtss_f32(m4);
  if (amax == 0.0f) {
    std::memset(q, 0, 32);
    *d_out = 0.0f;
    *s_out = 0.0f;
    return;
  }
  const float d = amax / 127.0f;
  const __m256 vd = _mm256_set1_ps(d);
  __m256i i[4];
  for (int j = 0; j < 4; j++) i[j] = _mm256_cvtps_epi32(_mm256_div_ps(v[j], vd));   // nearest, ties to even
  const __m256i sum8 = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
  __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum8), _mm256_extracti128_si256(sum8, 1));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
  // the packs interleave 4-value groups per 128-bit lane; the permute puts them back in order
  const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q),
                      _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  *d_out = d;
  *s_out = d * static_cast<float>(_mm_cvtsi128_si32(s4));
#else
  float amax = 0.0f;
  for (int j = 0; j < 32; j++) amax = std::max(amax, std::fabs(x[j]));
  int sum = 0;
  const float d = amax / 127.0f;
  for (int j = 0; j < 32; j++) {
    q[j] = amax == 0.0f ? 0 : static_cast<int8_t>(std::nearbyint(x[j] / d));   // ties to even
    sum += q[j];
  }
  *d_out = amax == 0.0f ? 0.0f : d;
  *s_out = *d_out * static_cast<float>(sum);
#endif
}

inline void quantize_rows(const float* X, int64_t M, int64_t K, int8_t* q, float* d, float* s) {
  const int64_t nb = K / 32;
  for (int64_t i = 0; i < M * nb; i++) quantize_block(X + 32 * i, q + 32 * i, d + i, s + i);
}

// A thread's buffers for quantised rows of up to M x K values.
struct Q8Scratch {
  std::vector<int8_t> q;
  std::vector<float> d, s;
  Q8Scratch(int64_t M, int64_t K) : q(M * K), d(M * K / 32), s(M * K / 32) {}
  Q8Rows quantize(const float* X, int64_t M, int64_t K) {
    quantize_rows(X, M, K, q.data(), d.data(), s.data());
    return {q.data(), d.data(), s.data()};
  }
};

// formats whose weights are signed bytes (the sign trick); the others are unsigned codes
constexpr bool signed_weights(int fmt) { return fmt == Q8_0 || fmt == Q6_KR; }

// The scales of one weight block: w = d q + m (d1: Q6_KR's second half).
struct WScale {
  float d, d1, m;
};

template <int FMT>
inline WScale block_scales(const uint8_t* blk) {
  if (FMT == Q4_KR) return {fp32(blk), 0.0f, fp32(blk + 4)};
  if (FMT == Q6_KR) return {fp32(blk), fp32(blk + 4), 0.0f};
  const float d = fp16(blk);
  if (FMT == Q4_1) return {d, 0.0f, fp16(blk + 2)};
  if (FMT == Q4_0) return {d, 0.0f, -8.0f * d};
  if (FMT == Q5_0) return {d, 0.0f, -16.0f * d};
  return {d, 0.0f, 0.0f};   // Q8_0
}

// Where a block's quantised values start.
constexpr int values_at(int fmt) {
  return fmt == Q4_0 ? 2 : fmt == Q4_1 ? 4 : fmt == Q8_0 ? 2 : fmt == Q4_KR ? 8 : fmt == Q6_KR ? 8 : 6;
}

// Element j of a block's integer codes (the portable path; and the meaning of the vector one).
template <int FMT>
inline int code_at(const uint8_t* blk, int j) {
  const uint8_t* v = blk + values_at(FMT);
  if (FMT == Q8_0 || FMT == Q6_KR) return static_cast<int8_t>(v[j]);
  const int nib = j < 16 ? (v[j] & 0x0F) : (v[j - 16] >> 4);
  if (FMT != Q5_0) return nib;
  uint32_t qh;
  std::memcpy(&qh, blk + 2, 4);
  return nib | static_cast<int>(((qh >> j) & 1u) << 4);
}

#if defined(__AVX2__)
// The 32 codes of a block as bytes in element order (unsigned for 4/5-bit, signed for 8-bit).
template <int FMT>
inline __m256i block_bytes_of(const uint8_t* blk) {
  const uint8_t* v = blk + values_at(FMT);
  if (FMT == Q8_0 || FMT == Q6_KR) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v));
  const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(v));
  const __m256i nib = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(q, 4), q), _mm256_set1_epi8(0x0F));
  if (FMT != Q5_0) return nib;
  uint32_t qh;   // bit j -> 16 in byte j: spread the bits to bytes, test each byte's own bit
  std::memcpy(&qh, blk + 2, 4);
  const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(qh)),
      _mm256_setr_epi64x(0x0000000000000000LL, 0x0101010101010101LL, 0x0202020202020202LL, 0x0303030303030303LL));
  const __m256i others = _mm256_set1_epi64x(0x7fbfdfeff7fbfdfeLL);   // all bits but bit (j mod 8) of byte j
  const __m256i high = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_or_si256(spread, others), _mm256_set1_epi8(-1)),
                                        _mm256_set1_epi8(0x10));
  return _mm256_or_si256(nib, high);
}
#endif

}  // namespace int8act


// The matmul with AVX2's maddubs + madd (or plain C++ in the portable build) ...
#define INT8_DOT_NS int8_maddubs
#define INT8_DOT_VNNI 0
#include "int8_dot.inc"
#undef INT8_DOT_VNNI
#undef INT8_DOT_NS
// ... and, in the avx512 build, a copy with VNNI's dpbusd, taken where the CPU reports avx512_vnni
// (the build's own flags do not require VNNI: AVX-512 CPUs without it still run that build).
#if defined(__AVX512F__) && defined(__AVX512VL__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512vnni")
#define INT8_DOT_NS int8_vnni
#define INT8_DOT_VNNI 1
#include "int8_dot.inc"
#undef INT8_DOT_VNNI
#undef INT8_DOT_NS
#pragma GCC pop_options
#define EDGELLM_HAVE_VNNI_COPY 1
#endif

namespace int8act {

inline bool use_vnni() {
#if defined(EDGELLM_HAVE_VNNI_COPY)
  static const bool vnni = __builtin_cpu_supports("avx512vnni");
  return vnni;
#else
  return false;
#endif
}

// Which integer dot product the int8 matmul runs here: "vnni", "avx2" (maddubs) or "portable".
inline const char* dot_product_name() {
#if defined(__AVX2__)
  return use_vnni() ? "vnni" : "avx2";
#else
  return "portable";
#endif
}

template <bool ACC>
inline void matmul_range_fmt(int64_t fmt, Q8Rows x, const uint8_t* W, float* O, int64_t M, int64_t N, int64_t K,
                             int64_t n0, int64_t n1) {
#if defined(EDGELLM_HAVE_VNNI_COPY)
  if (use_vnni()) return int8_vnni::matmul_range_fmt<ACC>(fmt, x, W, O, M, N, K, n0, n1);
#endif
  int8_maddubs::matmul_range_fmt<ACC>(fmt, x, W, O, M, N, K, n0, n1);
}

// One matmul of the fused decode step: quantise this thread's copy of x [M, K], then its share
// [n0, n1) of the output rows (each thread quantises the whole input: M x K values, a few us).
template <bool ACC>
inline void step_matmul(Q8Scratch& scratch, int64_t fmt, const float* X, int64_t M, int64_t K, const uint8_t* W,
                        float* O, int64_t N, int64_t n0, int64_t n1) {
  matmul_range_fmt<ACC>(fmt, scratch.quantize(X, M, K), W, O, M, N, K, n0, n1);
}

}  // namespace int8act

// x [M, K] float32 -> (q [M, K] int8, d [M, K/32], s [M, K/32]): the activation blocks
std::vector<torch::Tensor> quantize_q8(torch::Tensor x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "x must be 2-D float32");
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K % 32 == 0, "K must be a multiple of 32");
  auto q = torch::empty({M, K}, torch::kInt8);
  auto d = torch::empty({M, K / 32}, torch::kFloat32), s = torch::empty({M, K / 32}, torch::kFloat32);
  int8act::quantize_rows(x.data_ptr<float>(), M, K, q.data_ptr<int8_t>(), d.data_ptr<float>(), s.data_ptr<float>());
  return {q, d, s};
}

// x [M, K] float32 (quantised here to int8 blocks) @ W.T for W's raw blocks -> [M, N] float32
torch::Tensor block_matmul_q8(torch::Tensor x, torch::Tensor w, int64_t fmt, int64_t N) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "x must be 2-D float32");
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  check(w, fmt, N, K);
  int8act::Q8Scratch scratch(M, K);
  const int8act::Q8Rows xq = scratch.quantize(x.data_ptr<float>(), M, K);
  auto out = torch::empty({M, N}, x.options());
  const uint8_t* W = w.data_ptr<uint8_t>();
  float* O = out.data_ptr<float>();
  at::parallel_for(0, N, 8, [&](int64_t n0, int64_t n1) {
    int8act::matmul_range_fmt<false>(fmt, xq, W, O, M, N, K, n0, n1);
  });
  return out;
}

std::string int8_dot_product() { return int8act::dot_product_name(); }

bool int8_row_lanes(int64_t fmt) {
#if defined(EDGELLM_HAVE_VNNI_COPY) && defined(__AVX512BW__) && EDGELLM_ROW_LANES
  return int8act::use_vnni() && int8_vnni::rowlanes::takes_row_lanes(static_cast<int>(fmt));
#else
  (void)fmt;
  return false;
#endif
}
// ---- end of int8 activations --------------------------------------------------------------------
