// ---- prefill attention with bf16 dot products (opt-in: --dtype bfloat16) -----------------------
// Included by gguf_cpu.cpp after bf16_decode.h (whose EDGELLM_HAVE_BF16_DOT it uses); compiled in
// the avx512 build only, taken where the CPU reports avx512_bf16 and has no AMX (edgellm/layers/
// attention.py: native_bf16_attention). On Zen 4 PyTorch's flash kernel runs bf16 inputs no faster
// than float32 ones, while vdpbf16ps does eight pairs of products an instruction.
//
// Arithmetic: q, k and v rounded to bf16; scores q.k summed in float32 (vdpbf16ps) and scaled by
// 1/sqrt(D); softmax in float32; its weights rounded to bf16 and multiplied with v (vdpbf16ps),
// summed in float32, divided by the float32 sum of the unrounded weights.
//
// Layouts, made once a call per KV head (so that no vector is summed across its lanes):
//   keys   [key block of 8][dim pair p][8 keys][2]: a vector holds dims 2p, 2p+1 of 8 keys, and
//          vdpbf16ps against the query's pair (2p, 2p+1) broadcast adds to 8 scores at once;
//   values [key pair][dim][2]: a vector holds dims d..d+7 of keys 2j and 2j+1, and vdpbf16ps
//          against the pair of softmax weights (2j, 2j+1) broadcast adds to 8 output dims.

namespace bf16attn {

#if defined(EDGELLM_HAVE_BF16_DOT)
#pragma GCC push_options
#pragma GCC target("avx512bf16")

using bf16dot::load_bh;

constexpr int64_t QB = 16;   // queries of one head a work item
constexpr int64_t KB = 16;   // keys a step of the score loop (two vectors of 8)

inline __m256bh bcast_pair(const uint16_t* p) {
  uint32_t u;
  std::memcpy(&u, p, 4);
  return (__m256bh)_mm256_set1_epi32(static_cast<int>(u));
}

// Keys and values of KV head g rounded to bf16 in the layouts above; keys past L are zero.
void pack_head(const float* K, const float* V, int64_t L, int64_t KVH, int64_t D, int64_t g, int64_t Lp,
               uint16_t* kp, uint16_t* vp) {
  std::vector<uint16_t> rows(4 * D);   // keys j0, j0 + 1, then values j0, j0 + 1, as bf16 rows
  for (int64_t j0 = 0; j0 < L; j0 += 2) {
    for (int64_t e = 0; e < 2; e++) {
      const int64_t j = j0 + e;
      uint16_t *kr = rows.data() + e * D, *vr = rows.data() + (2 + e) * D;
      if (j >= L) { std::fill(kr, kr + D, uint16_t(0)); std::fill(vr, vr + D, uint16_t(0)); continue; }
      const float *ks = K + (j * KVH + g) * D, *vs = V + (j * KVH + g) * D;
      for (int64_t d = 0; d < D; d += 8) {
        store_bf16x8(kr + d, _mm256_loadu_ps(ks + d));
        store_bf16x8(vr + d, _mm256_loadu_ps(vs + d));
      }
      uint16_t* kdst = kp + (j / 8) * 8 * D + (j % 8) * 2;   // block j/8, lane j%8
      for (int64_t p = 0; p < D / 2; p++) std::memcpy(kdst + p * 16, kr + 2 * p, 4);
    }
    uint16_t* vdst = vp + (j0 / 2) * 2 * D;   // dims of the two values interleaved
    for (int64_t d = 0; d < D; d += 8) {
      const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows.data() + 2 * D + d));
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows.data() + 3 * D + d));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(vdst + 2 * d), _mm_unpacklo_epi16(a, b));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(vdst + 2 * d + 8), _mm_unpackhi_epi16(a, b));
    }
  }
}

// The largest of s[lo..hi].
inline float max_of(const float* s, int64_t lo, int64_t hi) {
  __m256 m = _mm256_set1_ps(-INFINITY);
  int64_t j = lo;
  for (; j + 8 <= hi + 1; j += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(s + j));
  float f[8], mx = -INFINITY;
  _mm256_storeu_ps(f, m);
  for (int i = 0; i < 8; i++) mx = std::max(mx, f[i]);
  for (; j <= hi; j++) mx = std::max(mx, s[j]);
  return mx;
}

// Scores of up to 4 queries (bf16 rows q, D each) against keys [k0, k0 + 16) of a packed head.
template <int NQ>
inline void score_tile(const uint16_t* q, int64_t D, const uint16_t* kp, int64_t k0, float scale, float* S,
                       int64_t ld) {
  __m256 a0[NQ], a1[NQ];
  for (int i = 0; i < NQ; i++) a0[i] = a1[i] = _mm256_setzero_ps();
  const uint16_t* b0 = kp + (k0 / 8) * 8 * D;
  const uint16_t* b1 = b0 + 8 * D;
  for (int64_t p = 0; p < D / 2; p++) {
    const __m256bh k0v = load_bh(b0 + p * 16), k1v = load_bh(b1 + p * 16);
    for (int i = 0; i < NQ; i++) {
      const __m256bh qp = bcast_pair(q + i * D + 2 * p);
      a0[i] = _mm256_dpbf16_ps(a0[i], k0v, qp);
      a1[i] = _mm256_dpbf16_ps(a1[i], k1v, qp);
    }
  }
  const __m256 s = _mm256_set1_ps(scale);
  for (int i = 0; i < NQ; i++) {
    _mm256_storeu_ps(S + i * ld + k0, _mm256_mul_ps(a0[i], s));
    _mm256_storeu_ps(S + i * ld + k0 + 8, _mm256_mul_ps(a1[i], s));
  }
}

// out rows of up to 2 queries: sum over key pairs [j0, j1) of the bf16 weights P times the values,
// dims [d0, d0 + 64), each divided by its row's sum.
template <int NQ>
inline void value_tile(const uint16_t* P, int64_t ldp, const uint16_t* vp, int64_t D, int64_t d0, int64_t j0,
                       int64_t j1, const float* inv, float* out, int64_t ldo) {
  __m256 acc[NQ][8];
  for (int i = 0; i < NQ; i++)
    for (int c = 0; c < 8; c++) acc[i][c] = _mm256_setzero_ps();
  for (int64_t j = j0; j < j1; j += 2) {
    const uint16_t* v = vp + (j / 2) * 2 * D + 2 * d0;
    __m256bh vv[8];
    for (int c = 0; c < 8; c++) vv[c] = load_bh(v + 16 * c);
    for (int i = 0; i < NQ; i++) {
      const __m256bh pp = bcast_pair(P + i * ldp + j);
      for (int c = 0; c < 8; c++) acc[i][c] = _mm256_dpbf16_ps(acc[i][c], vv[c], pp);
    }
  }
  for (int i = 0; i < NQ; i++) {
    const __m256 s = _mm256_set1_ps(inv[i]);
    for (int c = 0; c < 8; c++) _mm256_storeu_ps(out + i * ldo + d0 + 8 * c, _mm256_mul_ps(acc[i][c], s));
  }
}

// One work item: queries [i0, i1) of head h. Query i sits at position first + i, key j at lo + j.
void attend_block(const float* Q, int64_t H, int64_t D, int64_t h, int64_t i0, int64_t i1,
                  int64_t first, int64_t lo, int64_t window, const uint16_t* kp, const uint16_t* vp, int64_t Lp,
                  float scale, float* O) {
  const int64_t nq = i1 - i0;
  // keys any query of the block sees: from the first query's window start to the last query
  const int64_t jlast = first + i1 - 1 - lo;
  const int64_t jfirst = window > 0 ? std::max<int64_t>(0, first + i0 - window + 1 - lo) : 0;
  const int64_t ka = jfirst / KB * KB, kb = std::min(Lp, (jlast / KB + 1) * KB);
  const int64_t ld = Lp;
  thread_local std::vector<float> S;
  thread_local std::vector<uint16_t> qb, P;
  if (static_cast<int64_t>(S.size()) < QB * Lp) { S.resize(QB * Lp); P.resize(QB * Lp); }
  if (static_cast<int64_t>(qb.size()) < QB * D) qb.resize(QB * D);
  for (int64_t i = 0; i < nq; i++) {
    const float* q = Q + ((i0 + i) * H + h) * D;
    for (int64_t d = 0; d < D; d += 8) store_bf16x8(qb.data() + i * D + d, _mm256_loadu_ps(q + d));
  }
  for (int64_t k0 = ka; k0 < kb; k0 += KB) {
    int64_t i = 0;
    for (; i + 4 <= nq; i += 4) score_tile<4>(qb.data() + i * D, D, kp, k0, scale, S.data() + i * ld, ld);
    for (; i < nq; i++) score_tile<1>(qb.data() + i * D, D, kp, k0, scale, S.data() + i * ld, ld);
  }
  float inv[QB];
  for (int64_t i = 0; i < nq; i++) {   // softmax over the keys query i sees, zero elsewhere in [ka, kb)
    const int64_t jhi = first + i0 + i - lo;                                          // inclusive
    const int64_t jlo = window > 0 ? std::max<int64_t>(0, first + i0 + i - window + 1 - lo) : 0;
    float* s = S.data() + i * ld;
    const __m256 vmx = _mm256_set1_ps(max_of(s, jlo, jhi));
    for (int64_t j = ka; j < kb; j += 8) _mm256_storeu_ps(s + j, exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), vmx)));
    for (int64_t j = ka; j < jlo; j++) s[j] = 0.0f;
    for (int64_t j = jhi + 1; j < kb; j++) s[j] = 0.0f;
    __m256 vsum = _mm256_setzero_ps();
    for (int64_t j = ka; j < kb; j += 8) vsum = _mm256_add_ps(vsum, _mm256_loadu_ps(s + j));
    inv[i] = 1.0f / hsum(vsum);
    uint16_t* p = P.data() + i * ld;
    for (int64_t j = ka; j < kb; j += 8) store_bf16x8(p + j, _mm256_loadu_ps(s + j));
  }
  const int64_t ldo = H * D;
  float* out = O + (i0 * H + h) * D;
  for (int64_t d0 = 0; d0 < D; d0 += 64) {
    int64_t i = 0;
    for (; i + 2 <= nq; i += 2)
      value_tile<2>(P.data() + i * ld, ld, vp, D, d0, ka, kb, inv + i, out + i * ldo, ldo);
    for (; i < nq; i++) value_tile<1>(P.data() + i * ld, ld, vp, D, d0, ka, kb, inv + i, out + i * ldo, ldo);
  }
}

#pragma GCC pop_options
#endif

}  // namespace bf16attn

// Causal attention of a prefill chunk with bf16 dot products: q [T, H, D] at positions first ..
// first + T - 1, k and v [L, KVH, D] at positions lo .. lo + L - 1 (float32, contiguous), within
// `window` positions if window > 0. Returns [T, H, D] float32. D a multiple of 64.
torch::Tensor prefill_attention_bf16(torch::Tensor q, torch::Tensor k, torch::Tensor v, int64_t first, int64_t lo,
                                     int64_t window) {
  TORCH_CHECK(bf16dot::available(), "bf16 dot products need the avx512 kernels and a CPU with AVX512_BF16");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.sizes() == k.sizes(), "q [T, H, D], k and v [L, KVH, D]");
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && k.scalar_type() == torch::kFloat32 &&
              v.scalar_type() == torch::kFloat32, "q, k and v must be float32");
  q = q.contiguous(), k = k.contiguous(), v = v.contiguous();
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2), L = k.size(0), KVH = k.size(1);
  TORCH_CHECK(k.size(2) == D && D % 64 == 0 && KVH > 0 && H % KVH == 0, "head size a multiple of 64, H a multiple of KVH");
  TORCH_CHECK(first >= lo && first + T - lo == L, "the keys must end at the last query's position");
  auto out = torch::empty({T, H, D}, q.options());
  if (T == 0) return out;
#if defined(EDGELLM_HAVE_BF16_DOT)
  const int64_t Lp = (L + bf16attn::KB - 1) / bf16attn::KB * bf16attn::KB, G = H / KVH;
  std::vector<uint16_t> kp(KVH * Lp * D), vp(KVH * Lp * D);
  const float *K = k.data_ptr<float>(), *V = v.data_ptr<float>(), *Q = q.data_ptr<float>();
  at::parallel_for(0, KVH, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; g++)
      bf16attn::pack_head(K, V, L, KVH, D, g, Lp, kp.data() + g * Lp * D, vp.data() + g * Lp * D);
  });
  // Work items (query block, head), taken from both ends in turn so that each thread's contiguous
  // share mixes early (short) and late (long) query blocks.
  const int64_t nblocks = (T + bf16attn::QB - 1) / bf16attn::QB, items = nblocks * H;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  float* O = out.data_ptr<float>();
  at::parallel_for(0, items, 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; w++) {
      const int64_t slot = w / H, h = w % H;
      const int64_t b = slot % 2 == 0 ? slot / 2 : nblocks - 1 - slot / 2;
      const int64_t g = h / G;
      bf16attn::attend_block(Q, H, D, h, b * bf16attn::QB, std::min(T, (b + 1) * bf16attn::QB), first, lo,
                             window, kp.data() + g * Lp * D, vp.data() + g * Lp * D, Lp, scale, O);
    }
  });
#endif
  return out;
}
