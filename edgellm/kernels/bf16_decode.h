// ---- bf16 dot products for decode (opt-in: --dtype bfloat16) ------------------------------------
// Included by gguf_cpu.cpp after int8_activations.h; kept apart so that the exact kernels stay
// untouched. Compiled in the avx512 build only, under `#pragma GCC target("avx512bf16")`, and taken
// at run time where the CPU reports avx512_bf16 (bf16_dot_available()).
//
// The arithmetic is the bf16 GEMM's of the mode's prefill (edgellm/quant/bf16.py): each weight
// dequantised as the exact path does (d q + m in float32) and rounded to bf16, the activations
// rounded to bf16, products summed in float32 (vdpbf16ps: two bf16 products a lane, added to the
// float32 lane). The per-block scale is folded into the weights, so a (weight row, activation row)
// pair costs two vdpbf16ps a 32-block (8 lanes x 2 products each, twice) against the exact
// kernel's five 8-lane multiplies and FMAs; the dequantisation is shared by the activation rows.
// Unlike the prefill's GEMM the product is left in float32 (not rounded to bf16).

namespace bf16dot {

#if defined(__AVX512F__) && defined(__AVX512VL__) && defined(__AVX512BW__) && defined(__GNUC__)
#define EDGELLM_HAVE_BF16_DOT 1
#pragma GCC push_options
#pragma GCC target("avx512bf16")

// One block's 32 weights as two vectors of 16 bf16 (elements 0-15, 16-31), in element order.
// 4-bit formats: the 16 values a code can take, bf16(d q + m) for q = 0..15, made once a block
// and looked up by the codes (vpermw): the same values as converting each weight (fma, then
// round), in about half the operations a block.
template <int FMT>
inline void weights_bf16(const uint8_t* blk, __m256bh& lo, __m256bh& hi) {
  if constexpr (FMT == Q4_0 || FMT == Q4_1 || FMT == Q4_KR) {
    __m128 dm;   // [d, m] as load_block makes them
    if (FMT == Q4_KR) {
      dm = _mm_castsi128_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk)));
    } else if (FMT == Q4_1) {
      dm = _mm_cvtph_ps(load32(blk));
    } else {
      uint16_t d16;
      std::memcpy(&d16, blk, 2);
      dm = _mm_mul_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(static_cast<int>(d16 * 0x10001u))),
                      _mm_setr_ps(1.0f, -8.0f, 0.0f, 0.0f));
    }
    const uint8_t* qs = blk + (FMT == Q4_KR ? 8 : FMT == Q4_1 ? 4 : 2);
    const __m256 d = _mm256_broadcastss_ps(dm), m = _mm256_broadcastss_ps(_mm_movehdup_ps(dm));
    const __m256 codes0 = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), codes1 = _mm256_setr_ps(8, 9, 10, 11, 12, 13, 14, 15);
    const __m256i table = (__m256i)_mm256_cvtne2ps_pbh(_mm256_fmadd_ps(d, codes1, m), _mm256_fmadd_ps(d, codes0, m));
    const __m256i bytes = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs)));
    lo = (__m256bh)_mm256_permutexvar_epi16(_mm256_and_si256(bytes, _mm256_set1_epi16(0x0F)), table);
    hi = (__m256bh)_mm256_permutexvar_epi16(_mm256_srli_epi16(bytes, 4), table);
    return;
  }
  Block b;
  load_block<FMT>(blk, b);
  const __m256 d = _mm256_set1_ps(b.d), m = _mm256_set1_ps(b.m);
  const __m256 d1 = FMT == Q6_KR ? _mm256_set1_ps(b.d1) : d;
  // cvtne2ps_pbh(a, b): b's 8 values in the low half, a's in the high half
  lo = _mm256_cvtne2ps_pbh(_mm256_fmadd_ps(d, b.v[1], m), _mm256_fmadd_ps(d, b.v[0], m));
  hi = _mm256_cvtne2ps_pbh(_mm256_fmadd_ps(d1, b.v[3], m), _mm256_fmadd_ps(d1, b.v[2], m));
}

inline __m256bh load_bh(const uint16_t* p) { return (__m256bh)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

// One weight row against MT activation rows (bf16, K values each). Each pair sums the block
// halves 0-15 and 16-31 in two accumulators (one vdpbf16ps a block on each chain, whose latency
// would otherwise bound one activation row), added at the end: the same order for every tile
// shape, so a row's result does not depend on the rows computed beside it.
template <int FMT, bool ACC, int MT>
inline void row_dot(const uint8_t* row, const uint16_t* X, float* O, int64_t K, int64_t N) {
  const int64_t nb = K / 32;
  const int bb = block_bytes(FMT);
  __m256 acc_lo[MT], acc_hi[MT];
  for (int i = 0; i < MT; i++) acc_lo[i] = acc_hi[i] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; b++) {
    __m256bh lo, hi;
    weights_bf16<FMT>(row + b * bb, lo, hi);
    for (int i = 0; i < MT; i++) {
      const uint16_t* x = X + i * K + b * 32;
      acc_lo[i] = _mm256_dpbf16_ps(acc_lo[i], lo, load_bh(x));
      acc_hi[i] = _mm256_dpbf16_ps(acc_hi[i], hi, load_bh(x + 16));
    }
  }
  for (int i = 0; i < MT; i++) {
    const float v = hsum(_mm256_add_ps(acc_lo[i], acc_hi[i]));
    if (ACC) O[i * N] += v; else O[i * N] = v;
  }
}

// Two adjacent weight rows against one activation row: each row's operations are row_dot<.., 1>'s
// in its order (the same bits), with four accumulator chains instead of two and one load of each
// activation block. 4-bit formats only: a one-row Q4_1 matmul,
// Zen 4, medians of 21 alternating, 43 MB from DRAM: 15.3 -> 16.4 GB/s on one thread, 30.3 -> 32.6
// on two; the Q8_0 vocabulary projection level (20.5 / 20.6), so it stays one row at a time.
template <int FMT, bool ACC>
inline void two_rows_dot(const uint8_t* r0, int64_t row_bytes, const uint16_t* x, float* o, int64_t K) {
  const int64_t nb = K / 32;
  const int bb = block_bytes(FMT);
  const uint8_t* r1 = r0 + row_bytes;
  __m256 lo0 = _mm256_setzero_ps(), hi0 = lo0, lo1 = lo0, hi1 = lo0;
  for (int64_t b = 0; b < nb; b++) {
    __m256bh w0l, w0h, w1l, w1h;
    weights_bf16<FMT>(r0 + b * bb, w0l, w0h);
    weights_bf16<FMT>(r1 + b * bb, w1l, w1h);
    const __m256bh xl = load_bh(x + b * 32), xh = load_bh(x + b * 32 + 16);
    lo0 = _mm256_dpbf16_ps(lo0, w0l, xl);
    hi0 = _mm256_dpbf16_ps(hi0, w0h, xh);
    lo1 = _mm256_dpbf16_ps(lo1, w1l, xl);
    hi1 = _mm256_dpbf16_ps(hi1, w1h, xh);
  }
  const float v0 = hsum(_mm256_add_ps(lo0, hi0)), v1 = hsum(_mm256_add_ps(lo1, hi1));
  if (ACC) { o[0] += v0; o[1] += v1; } else { o[0] = v0; o[1] = v1; }
}

// Output rows [n0, n1) for up to 8 activation rows: one weight row at a time (two at one activation
// row), in address order, as the exact kernel (prefetch_rows). Four rows interleaved, as first
// built: 95.1 tok/s of SmolLM2 decode against 173.9 (Zen 4, 2 threads, neither with a working
// prefetch).
template <int FMT, bool ACC, int MT>
inline void tile_range(const uint8_t* W, int64_t row_bytes, const uint16_t* X, float* O, int64_t K, int64_t N,
                       int64_t n0, int64_t n1) {
  if (MT == 1 && (FMT == Q4_0 || FMT == Q4_1 || FMT == Q4_KR))
    for (; n0 + 1 < n1; n0 += 2) {
      prefetch_rows(W, row_bytes, n0, 2, n1);
      two_rows_dot<FMT, ACC>(W + n0 * row_bytes, row_bytes, X, O + n0, K);
    }
  for (int64_t n = n0; n < n1; n++) {
    prefetch_rows(W, row_bytes, n, 1, n1);
    row_dot<FMT, ACC, MT>(W + n * row_bytes, X, O + n, K, N);
  }
}

// One weight row, already in bf16 (K values), against MT activation rows: row_dot's arithmetic
// with the weights loaded instead of dequantised, so the same bits.
template <bool ACC, int MT>
inline void bf16_row_dot(const uint16_t* wrow, const uint16_t* X, float* O, int64_t K, int64_t N) {
  __m256 acc_lo[MT], acc_hi[MT];
  for (int i = 0; i < MT; i++) acc_lo[i] = acc_hi[i] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    const __m256bh lo = load_bh(wrow + k), hi = load_bh(wrow + k + 16);
    for (int i = 0; i < MT; i++) {
      acc_lo[i] = _mm256_dpbf16_ps(acc_lo[i], lo, load_bh(X + i * K + k));
      acc_hi[i] = _mm256_dpbf16_ps(acc_hi[i], hi, load_bh(X + i * K + k + 16));
    }
  }
  for (int i = 0; i < MT; i++) {
    const float v = hsum(_mm256_add_ps(acc_lo[i], acc_hi[i]));
    if (ACC) O[i * N] += v; else O[i * N] = v;
  }
}

// More than 8 activation rows: each weight row is dequantised once into a bf16 row (in L1) that
// every tile of 8 rows then reads, instead of once per tile.
template <int FMT, bool ACC>
void matmul_many(const uint16_t* X, const uint8_t* W, float* O, int64_t M, int64_t N, int64_t K, int64_t n0,
                 int64_t n1) {
  const int64_t nb = K / 32, row_bytes = nb * block_bytes(FMT);
  thread_local std::vector<uint16_t> wrow;   // (as the exact kernel's buffers: no allocation a call)
  if (static_cast<int64_t>(wrow.size()) < K) wrow.resize(K);
  for (int64_t n = n0; n < n1; n++) {
    const uint8_t* row = W + n * row_bytes;
    prefetch_rows(W, row_bytes, n, 1, n1);
    for (int64_t b = 0; b < nb; b++) {
      __m256bh lo, hi;
      weights_bf16<FMT>(row + b * block_bytes(FMT), lo, hi);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(wrow.data() + b * 32), (__m256i)lo);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(wrow.data() + b * 32 + 16), (__m256i)hi);
    }
    for (int64_t m0 = 0; m0 < M; m0 += 8) {
      const uint16_t* x = X + m0 * K;
      float* o = O + m0 * N + n;
      switch (std::min<int64_t>(8, M - m0)) {
        case 1: bf16_row_dot<ACC, 1>(wrow.data(), x, o, K, N); break;
        case 2: bf16_row_dot<ACC, 2>(wrow.data(), x, o, K, N); break;
        case 3: bf16_row_dot<ACC, 3>(wrow.data(), x, o, K, N); break;
        case 4: bf16_row_dot<ACC, 4>(wrow.data(), x, o, K, N); break;
        case 5: bf16_row_dot<ACC, 5>(wrow.data(), x, o, K, N); break;
        case 6: bf16_row_dot<ACC, 6>(wrow.data(), x, o, K, N); break;
        case 7: bf16_row_dot<ACC, 7>(wrow.data(), x, o, K, N); break;
        default: bf16_row_dot<ACC, 8>(wrow.data(), x, o, K, N); break;
      }
    }
  }
}

template <int FMT, bool ACC>
void matmul_range(const uint16_t* X, const uint8_t* W, float* O, int64_t M, int64_t N, int64_t K, int64_t n0,
                  int64_t n1) {
  if (M > 8) return matmul_many<FMT, ACC>(X, W, O, M, N, K, n0, n1);
  const int64_t row_bytes = K / 32 * block_bytes(FMT);
  switch (M) {   // up to 8 rows: one tile
    case 1: tile_range<FMT, ACC, 1>(W, row_bytes, X, O, K, N, n0, n1); break;
    case 2: tile_range<FMT, ACC, 2>(W, row_bytes, X, O, K, N, n0, n1); break;
    case 3: tile_range<FMT, ACC, 3>(W, row_bytes, X, O, K, N, n0, n1); break;
    case 4: tile_range<FMT, ACC, 4>(W, row_bytes, X, O, K, N, n0, n1); break;
    case 5: tile_range<FMT, ACC, 5>(W, row_bytes, X, O, K, N, n0, n1); break;
    case 6: tile_range<FMT, ACC, 6>(W, row_bytes, X, O, K, N, n0, n1); break;
    case 7: tile_range<FMT, ACC, 7>(W, row_bytes, X, O, K, N, n0, n1); break;
    default: tile_range<FMT, ACC, 8>(W, row_bytes, X, O, K, N, n0, n1); break;
  }
}

template <bool ACC>
void matmul_range_fmt(int64_t fmt, const uint16_t* X, const uint8_t* W, float* O, int64_t M, int64_t N, int64_t K,
                      int64_t n0, int64_t n1) {
  WITH_FORMAT(fmt, (matmul_range<FMT, ACC>(X, W, O, M, N, K, n0, n1)));
}

#pragma GCC pop_options
#endif

inline bool available() {
#if defined(EDGELLM_HAVE_BF16_DOT)
  return __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

// Activation rows rounded to bf16 (bf16_bits, as the prefill's conversion), reused by each matmul.
struct BF16Scratch {
  std::vector<uint16_t> x;
  explicit BF16Scratch(int64_t elements) : x(elements) {}
  const uint16_t* convert(const float* X, int64_t M, int64_t K) {
    for (int64_t i = 0; i < M * K; i += 8) store_bf16x8(x.data() + i, _mm256_loadu_ps(X + i));
    return x.data();
  }
};

// One matmul of the fused decode step: this thread's bf16 copy of x [M, K], then its share [n0, n1)
// of the output rows (as int8act::step_matmul). Never called where available() is false.
template <bool ACC>
inline void step_matmul(BF16Scratch& scratch, int64_t fmt, const float* X, int64_t M, int64_t K, const uint8_t* W,
                        float* O, int64_t N, int64_t n0, int64_t n1) {
#if defined(EDGELLM_HAVE_BF16_DOT)
  matmul_range_fmt<ACC>(fmt, scratch.convert(X, M, K), W, O, M, N, K, n0, n1);
#endif
}

}  // namespace bf16dot

bool bf16_dot_available() { return bf16dot::available(); }

// x [M, K] float32 (rounded here to bf16) @ W.T for W's raw blocks (each weight rounded to bf16)
// -> [M, N] float32, with vdpbf16ps. Only where bf16_dot_available().
torch::Tensor block_matmul_bf16(torch::Tensor x, torch::Tensor w, int64_t fmt, int64_t N) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "x must be 2-D float32");
  TORCH_CHECK(bf16dot::available(), "bf16 dot products need the avx512 kernels and a CPU with AVX512_BF16");
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  check(w, fmt, N, K);
  auto out = torch::empty({M, N}, x.options());
  // No rows (a prefill chunk whose logits nobody wants): the tile switch below has no empty case.
  if (M == 0) return out;
#if defined(EDGELLM_HAVE_BF16_DOT)
  bf16dot::BF16Scratch scratch(M * K);
  const uint16_t* X = scratch.convert(x.data_ptr<float>(), M, K);
  const uint8_t* W = w.data_ptr<uint8_t>();
  float* O = out.data_ptr<float>();
  at::parallel_for(0, N, 8, [&](int64_t n0, int64_t n1) {
    bf16dot::matmul_range_fmt<false>(fmt, X, W, O, M, N, K, n0, n1);
  });
#endif
  return out;
}
// ---- end of bf16 dot products -------------------------------------------------------------------
