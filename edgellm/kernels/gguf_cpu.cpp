// Native CPU kernels for GGUF block-quantised weights, written with AVX2 + FMA + F16C intrinsics.
//
// One source, built per CPU kind (edgellm/kernels/build.py, VARIANTS): "avx2" with those
// instructions; "avx512" with AVX-512 F/BW/VL/DQ enabled too (the same intrinsics, so the same
// bits; the compiler gets 32 vector registers and EVEX encodings); "portable" without any, where
// simd_portable.h supplies the intrinsics in plain C++ (CPUs without AVX2, ARM).
//
// Why: decode multiplies one activation row by every weight matrix, so it is bound by the bytes
// of weights read. Reading GGUF blocks as they lie in the file (Q4_1: 20 bytes per 32 weights)
// and dequantising inside registers keeps the weights at 4.5-8.5 bits in memory while the
// activations stay float32, so results match "dequantise, then matmul in fp32" up to summation
// order. PyTorch's own weight-only kernels need bf16 activations to be fast, which would break
// fp32 parity with the reference.
//
// Layouts (ggml's, bit for bit):
//   Q4_0: fp16 d, 16 bytes of nibbles        w[j] = d * (q[j] - 8)
//   Q4_1: fp16 d, fp16 m, 16 bytes nibbles   w[j] = d * q[j] + m
//   Q8_0: fp16 d, 32 int8                    w[j] = d * q[j]
//   Q5_0: fp16 d, u32 qh, 16 bytes nibbles   w[j] = d * ((q[j] | bit j of qh << 4) - 16)
// and two layouts of our own that K-quants are repacked into at load time (quant/repack.py),
// because their 256-weight super-blocks carry 6- or 8-bit sub-block scales: the products below
// are exact in float32, so the repacked weights equal the reference's dequantised ones bit for bit.
//   Q4_KR (Q4_K): fp32 d, fp32 m, 16 bytes nibbles  w[j] = d * q[j] + m   (d = d_K * sc, m = -dmin_K * mn)
//   Q6_KR (Q6_K): fp32 d0, fp32 d1, 32 int8         w[j] = (j < 16 ? d0 : d1) * q[j]  (q = q6 - 32, d = d_K * sc)
// In a nibble byte i, the low nibble is element i and the high nibble element i + 16.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>
#include <omp.h>
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#else
#include "simd_portable.h"   // after every other header: it defines the intrinsics' names as macros
#endif

namespace {

enum Format { Q4_0 = 0, Q4_1 = 1, Q8_0 = 2, Q4_KR = 3, Q6_KR = 4, Q5_0 = 5 };
constexpr int64_t N_FORMATS = 6;

constexpr int block_bytes(int64_t fmt) {
  return fmt == Q4_0 ? 18 : fmt == Q4_1 ? 20 : fmt == Q8_0 ? 34 : fmt == Q4_KR ? 24 : fmt == Q6_KR ? 40 : 22;
}
// formats with an offset term m * sum(x) per block
constexpr bool has_offset(int fmt) { return fmt == Q4_0 || fmt == Q4_1 || fmt == Q4_KR || fmt == Q5_0; }

inline float fp16(const uint8_t* p) { return _cvtsh_ss(*reinterpret_cast<const uint16_t*>(p)); }
inline float fp32(const uint8_t* p) { float f; std::memcpy(&f, p, 4); return f; }

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(s);
}

// exp(x) for 8 floats: range reduction by ln 2 (split in two constants, Cody-Waite) and the
// degree-5 minimax polynomial of the Cephes library's expf; relative error about 2e-7, like expf.
// Arguments are clamped to [-87, 88]: below, ~1e-38 instead of 0 (softmax weights that small do not
// count); above, 1.6e38 instead of overflow.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// The 32 integer values of one block as four vectors of 8 floats, plus its scale and offset.
// dm holds the scale d in lane 0 and the offset m (Q6_KR: the second scale d1) in lane 1: Q4_1's
// two fp16 numbers are converted by one instruction from one 32-bit load, d is broadcast from the
// vector, and the offset sum runs in lane 1 of a vector (see pair_offset). That took three
// shuffle-port operations a block fewer than converting d and m one by one (two vpinsrw, one
// vcvtph2ps) and gives the same bits: every lane does what the scalar operation did.
struct Block {
  __m256 v[4];
  __m128 dm;
  float d, m;
  float d1;   // Q6_KR: the scale of elements 16..31 (d is that of 0..15)
};

// Widen bytes to 32-bit lanes first (straight from memory) and split the nibbles after: two
// byte-widening shuffles a block instead of six, which was the bottleneck of the decode matmul
// (the shuffle port), while the masks and shifts go to the other ports.
// Q5_0: 32 five-bit values, built as bytes first (bit j of qh spread to byte j with one shuffle,
// an OR that sets every other bit of each byte and a compare; the nibbles with one shift), then
// widened to 32-bit lanes: half the vector operations of widening first and testing the bits per lane.
inline void unpack_q5(const uint8_t* qh_bytes, const uint8_t* qs, __m256* v) {
  uint32_t qh;
  std::memcpy(&qh, qh_bytes, 4);
  const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(qh)),
      _mm256_setr_epi64x(0x0000000000000000LL, 0x0101010101010101LL, 0x0202020202020202LL, 0x0303030303030303LL));
  const __m256i others = _mm256_set1_epi64x(0x7fbfdfeff7fbfdfeLL);   // all bits but bit (j mod 8) of byte j
  const __m256i high = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_or_si256(spread, others), _mm256_set1_epi8(-1)),
                                        _mm256_set1_epi8(0x10));
  const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m256i nib = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(q, 4), q), _mm256_set1_epi8(0x0F));
  const __m256i bytes = _mm256_or_si256(nib, high);   // byte j = value of element j
  const __m128i lo = _mm256_castsi256_si128(bytes), hi = _mm256_extracti128_si256(bytes, 1);
  v[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
  v[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
  v[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
  v[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
}

// LOOKUP (AVX-512 builds, for the few-row tiles): the low nibbles as floats by one two-table
// permute of the 16 values 0..15 (it reads only an index's low 4 bits), instead of a mask and a
// conversion; the same values. A one-row Q4_1 matmul, 2 Zen 4 threads, both builds in one process
// in either order: 19.4-20.1 against 18.7-19.1 GB/s in cache, 20.6-20.7 against 19.6-20.2 from
// DRAM. The many-row tiles keep the mask: they use every vector register, the tables would take
// two, and there the A/B moved with the order the two builds ran in (no figure to go by).
template <bool LOOKUP = false>
inline void unpack_nibbles(const uint8_t* qs, __m256* v) {
  const __m256i a = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qs)));      // bytes 0..7
  const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qs + 8)));  // bytes 8..15
#if defined(__AVX512VL__)
  if (LOOKUP) {
    const __m256 lo = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), hi = _mm256_setr_ps(8, 9, 10, 11, 12, 13, 14, 15);
    v[0] = _mm256_permutex2var_ps(lo, a, hi);   // elements 0..7: low nibbles
    v[1] = _mm256_permutex2var_ps(lo, b, hi);   // 8..15
  } else
#endif
  {
    const __m256i mask = _mm256_set1_epi32(0x0F);
    v[0] = _mm256_cvtepi32_ps(_mm256_and_si256(a, mask));   // elements 0..7: low nibbles
    v[1] = _mm256_cvtepi32_ps(_mm256_and_si256(b, mask));   // 8..15
  }
  v[2] = _mm256_cvtepi32_ps(_mm256_srli_epi32(a, 4));     // 16..23: high nibbles
  v[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));     // 24..31
}

inline void widen_int8(const uint8_t* q, __m256* v) {
  for (int j = 0; j < 4; j++)   // 8 int8 at a time, widened straight from memory
    v[j] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8 * j))));
}

inline __m128i load32(const uint8_t* p) { int32_t v; std::memcpy(&v, p, 4); return _mm_cvtsi32_si128(v); }

template <int FMT, bool LOOKUP = false>
inline void load_block(const uint8_t* blk, Block& b) {
  if (FMT == Q4_KR || FMT == Q6_KR) {   // two fp32 numbers: [d, m] or [d0, d1]
    b.dm = _mm_castsi128_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk)));
    if (FMT == Q4_KR) unpack_nibbles<LOOKUP>(blk + 8, b.v); else widen_int8(blk + 8, b.v);
  } else if (FMT == Q4_1) {             // two fp16 numbers [d, m], converted together
    b.dm = _mm_cvtph_ps(load32(blk));
    unpack_nibbles<LOOKUP>(blk + 4, b.v);
  } else if (FMT == Q8_0) {             // lane 1: m = 0
    uint16_t d16;
    std::memcpy(&d16, blk, 2);
    b.dm = _mm_cvtph_ps(_mm_cvtsi32_si128(d16));
    widen_int8(blk + 2, b.v);
  } else {                              // Q4_0, Q5_0: m = -8 d or -16 d (exact), d * (q - 8) = d * q + m
    uint16_t d16;
    std::memcpy(&d16, blk, 2);
    const __m128 dd = _mm_cvtph_ps(_mm_cvtsi32_si128(static_cast<int>(d16 * 0x10001u)));
    b.dm = _mm_mul_ps(dd, _mm_setr_ps(1.0f, FMT == Q4_0 ? -8.0f : -16.0f, 0.0f, 0.0f));
    if (FMT == Q4_0) unpack_nibbles<LOOKUP>(blk + 2, b.v); else unpack_q5(blk + 2, blk + 6, b.v);
  }
  b.d = _mm_cvtss_f32(b.dm);
  const float lane1 = _mm_cvtss_f32(_mm_movehdup_ps(b.dm));
  b.m = FMT == Q6_KR ? 0.0f : lane1;
  b.d1 = FMT == Q6_KR ? lane1 : b.d;
}

// Vector operations named alike for 8 floats (__m256) and 16 (V16, below), so that a pair's
// arithmetic (pair_products) is written once for both.
inline __m256 vmul(__m256 a, __m256 b) { return _mm256_mul_ps(a, b); }
inline __m256 vfmadd(__m256 a, __m256 b, __m256 c) { return _mm256_fmadd_ps(a, b, c); }
template <typename V> V vload(const float* p);
template <> inline __m256 vload<__m256>(const float* p) { return _mm256_loadu_ps(p); }
template <typename V> V vset1(float x);
template <> inline __m256 vset1<__m256>(float x) { return _mm256_set1_ps(x); }

// ---- two activation rows per vector (AVX-512) ----------------------------------------------------
// With 16-float vectors, tile_wide's arithmetic for rows i and i + 1 runs in one instruction: the
// low 8 lanes do row i's 8-lane operation and the high 8 lanes row i + 1's, on the same unpacked
// block (copied into both halves) and on the two rows' activations side by side (a pair-interleaved
// copy of the slice). Every lane does exactly what tile_wide's lane does, in the same order, so the
// bits are those of the AVX2 build at every row count; the multiplies per (weight row, activation
// row) block are halved, which is what bounds a many-row step (docs/kernels.md, "Rows").
// EDGELLM_EMULATE_512 builds the same code on AVX2 with each 16-float vector as two 8-float halves:
// the way to test this path's indexing on a machine without AVX-512 (bench/paired_rows_check.py).
#if defined(__AVX512F__) && defined(__AVX512DQ__) && !defined(EDGELLM_EMULATE_512)
#define EDGELLM_PAIRED_ROWS 1
using V16 = __m512;
inline V16 v16_zero() { return _mm512_setzero_ps(); }
template <> inline V16 vload<V16>(const float* p) { return _mm512_loadu_ps(p); }
inline void v16_store(float* p, V16 v) { _mm512_storeu_ps(p, v); }
inline V16 vmul(V16 a, V16 b) { return _mm512_mul_ps(a, b); }
inline V16 vfmadd(V16 a, V16 b, V16 c) { return _mm512_fmadd_ps(a, b, c); }
inline V16 v16_dup(__m256 v) { return _mm512_broadcast_f32x8(v); }
template <> inline V16 vset1<V16>(float x) { return _mm512_set1_ps(x); }
inline __m256 v16_lo(V16 v) { return _mm512_castps512_ps256(v); }
inline __m256 v16_hi(V16 v) { return _mm512_extractf32x8_ps(v, 1); }
#elif defined(EDGELLM_EMULATE_512) && defined(__AVX2__)
#define EDGELLM_PAIRED_ROWS 1
struct V16 { __m256 lo, hi; };
inline V16 v16_zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
template <> inline V16 vload<V16>(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline void v16_store(float* p, V16 v) { _mm256_storeu_ps(p, v.lo); _mm256_storeu_ps(p + 8, v.hi); }
inline V16 vmul(V16 a, V16 b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
inline V16 vfmadd(V16 a, V16 b, V16 c) { return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }
inline V16 v16_dup(__m256 v) { return {v, v}; }
template <> inline V16 vset1<V16>(float x) { return {_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
inline __m256 v16_lo(V16 v) { return v.lo; }
inline __m256 v16_hi(V16 v) { return v.hi; }
#else
#define EDGELLM_PAIRED_ROWS 0
#endif

// acc += d * dot(w, x[0..32)): the vector part of a (weight row, activation row) pair's block, w
// the block's values as 4 vectors. The products run in one fixed order (elements 0-7, 8-15, 16-23,
// 24-31), whichever function calls it. With V16 every lane does the same for two activation rows
// at once (tile_pairs): xp then holds each 8-float group of the two rows side by side.
template <int FMT, typename V>
inline void pair_products(const V* w, const V d, float d1, const float* xp, V& acc) {
  constexpr int L = sizeof(V) / sizeof(float);   // floats a vector
  V t = vmul(w[0], vload<V>(xp));
  t = vfmadd(w[1], vload<V>(xp + L), t);
  if (FMT == Q6_KR) {   // two half-blocks, two scales
    V u = vmul(w[2], vload<V>(xp + 2 * L));
    u = vfmadd(w[3], vload<V>(xp + 3 * L), u);
    acc = vfmadd(vset1<V>(d1), u, vfmadd(d, t, acc));
    return;
  }
  t = vfmadd(w[2], vload<V>(xp + 2 * L), t);
  t = vfmadd(w[3], vload<V>(xp + 3 * L), t);
  acc = vfmadd(d, t, acc);
}

template <int FMT>
inline void pair_block(const Block& blk, const __m256 d, const float* xp, __m256& acc) {
  pair_products<FMT>(blk.v, d, blk.d1, xp, acc);
}

// The offset sum off = fma(m, sum(x_blk), off) of a pair, kept in lane 1 of off (lane 0 does
// d * sum(x) and is never read): the same fused multiply-add as a scalar one, without moving m out.
inline void pair_offset(const Block& blk, float xsum, __m128& off) { off = _mm_fmadd_ps(blk.dm, _mm_set1_ps(xsum), off); }
inline float offset_of(__m128 off) { return _mm_cvtss_f32(_mm_movehdup_ps(off)); }

// Block sums of x (for the offset term of Q4_0/Q4_1): xsum[m * nb + b] = sum of x[m, 32b .. 32b+31].
inline void block_sums(const float* X, int64_t M, int64_t K, float* xsum) {
  const int64_t nb = K / 32;
  for (int64_t i = 0; i < M; i++)
    for (int64_t b = 0; b < nb; b++) {
      __m256 s = _mm256_loadu_ps(X + i * K + b * 32);
      for (int j = 1; j < 4; j++) s = _mm256_add_ps(s, _mm256_loadu_ps(X + i * K + b * 32 + 8 * j));
      xsum[i * nb + b] = hsum(s);
    }
}

// O[m, n] (+)= sum_k X[m, k] * W[n, k] for output rows n in [n0, n1): the serial core of every
// matmul. Each block contributes d * dot(q, x_blk) + m * sum(x_blk). With ACC, adds into O.
// One weight row against MT activation rows (MT known at compile time, so the accumulators stay
// in registers: with a run-time count they lived in memory and every block waited on them).
template <int FMT, bool ACC, int MT>
inline void tile_dot(const uint8_t* row, const float* X, const float* xsum, float* O, int64_t K, int64_t N) {
  const int64_t nb = K / 32;
  const int bb = block_bytes(FMT);
  __m256 acc[MT];
  __m128 off[MT];
  for (int i = 0; i < MT; i++) { acc[i] = _mm256_setzero_ps(); off[i] = _mm_setzero_ps(); }
  Block blk;
  for (int64_t b = 0; b < nb; b++) {
    load_block<FMT, true>(row + b * bb, blk);
    const __m256 d = _mm256_broadcastss_ps(blk.dm);
    for (int i = 0; i < MT; i++) {
      pair_block<FMT>(blk, d, X + i * K + b * 32, acc[i]);
      if (has_offset(FMT)) pair_offset(blk, xsum[i * nb + b], off[i]);
    }
  }
  for (int i = 0; i < MT; i++) {
    const float v = hsum(acc[i]) + offset_of(off[i]);
    if (ACC) O[i * N] += v; else O[i * N] = v;
  }
}

// ---- streaming the weights ----------------------------------------------------------------------
// A decode step reads every weight once, from DRAM, so the order of the reads matters as much as
// the arithmetic. Every matmul loop walks the weights in address order, one weight row after the
// next (at one activation row, two adjacent 4-bit or Q8_0 rows at a time: two_rows_dot), with the
// activation rows tiled against each row. The batch-1 and batch-2 loops had
// interleaved four (two) weight rows block by block, 22% faster per block in cache; from DRAM,
// with the software prefetch they had (four rows ahead, into L1), they read Q8_0's 612-byte rows
// at 9.6 GB/s, and the SmolLM2 decode ran at 123 tok/s against 168 in address order (two Zen 4
// threads, one process, alternating; docs/kernels.md, "Weights in address order").
// The prefetch asks for the rows PREFETCH_BYTES ahead into L1. In address order it measured the
// same as none on Zen 4 (156.4 against 156.7 tok/s; 2 KB and 8 KB into L2 were slower: 145.5,
// 146.3), and stays for prefetchers that stop at each 4 KiB page.
constexpr int64_t PREFETCH_BYTES = 1536;

// Asks for the cache lines of [p, p + bytes): into L1, or with L2 into L2 only. Every prefetch of
// the kernels goes through here. always_inline, here and in its callers: GCC 12 judged a function
// whose only effect is a prefetch to have no side effects and deleted every call of it
// (tests/test_kernel_variants.py checks the builds for the instructions).
template <bool L2 = false>
__attribute__((always_inline)) inline void prefetch_bytes(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t o = 0; o < bytes; o += 64) _mm_prefetch(c + o, L2 ? _MM_HINT_T1 : _MM_HINT_T0);
}

// A second stream a thread's matmuls ask for alongside their weights: the next layer's KV rows
// that its attention items will read (the fused decode step sets it, plan_kv_ahead), spread over
// the weight rows that run before the attention does. Without it the attention waits on DRAM while
// the matmuls, bound by their arithmetic, leave bandwidth unused. SmolLM2's fused step, 2 Zen 4
// threads, context 576, time split at the barriers: attention 1.41 -> 0.58 ms, the matmuls +0.42 ms
// (the two streams now share the bandwidth). Both builds in one process, alternating, the
// vocabulary projection between steps (medians): context 576 level to 0.94x, 1024 0.92-0.96x, 8 rows
// 0.94-0.95x; generate after a 1024-token prompt: blocks 6.44 -> 5.64 ms. Prefetching only K or
// only V, 8 lines a row instead of spreading them, or the T2 hint: no better.
struct KVAhead {
  struct Span { const int64_t* slots; int64_t p, p1; };   // positions [p, p1) of a row's slot list
  std::vector<Span> spans;
  size_t s = 0;
  const char *K = nullptr, *V = nullptr;
  int64_t row = 0, off = 0;   // bytes of a position's row (all KV heads); offset in its K row, then V row
  int64_t per_row = 0;        // cache lines asked for a weight row: the stream spread over the rows before it is read
  // Asks for the cache lines of `rows` weight rows' share of the stream, if any are left.
  __attribute__((always_inline)) inline void step(int64_t rows) {
    int64_t lines = per_row * rows;
    while (lines > 0 && s < spans.size()) {
      Span& g = spans[s];
      if (g.p >= g.p1) { s++; continue; }
      const int64_t slot = g.slots[g.p];
      _mm_prefetch(off < row ? K + slot * row + off : V + slot * row + off - row, _MM_HINT_T1);
      off += 64;
      lines--;
      if (off >= 2 * row) { off = 0; g.p++; }
    }
  }
};
// The calling thread's stream while a fused decode step runs, else null (a plain pointer: the
// matmul loops read it with no thread_local initialisation check, which a KVAhead object here
// cost: decode 0.86x).
inline thread_local KVAhead* kv_ahead = nullptr;

// Asks for weight rows [n + ahead, n + ahead + count) of W (rows row_bytes long, the range ending
// at row n1); by default ahead is the rows PREFETCH_BYTES cover. And for count rows' share of the
// thread's KV stream (kv_ahead).
__attribute__((always_inline)) inline void prefetch_rows(const uint8_t* W, int64_t row_bytes, int64_t n,
                                                         int64_t count, int64_t n1, int64_t ahead = 0) {
  if (ahead <= 0) ahead = std::max<int64_t>(1, (PREFETCH_BYTES + row_bytes - 1) / row_bytes);
  const int64_t first = n + ahead;
  prefetch_bytes(W + first * row_bytes, (std::min(n1, first + count) - first) * row_bytes);
  if (kv_ahead) kv_ahead->step(count);
}

// From this many activation rows on, matmul_many; at 4, tile_dot's one tile of 4 was as fast
// (block_matmul alone, SmolLM2's gate/up and down: 1.42 and 1.61 ns per pair-block against 1.48, 1.59).
constexpr int64_t MANY_ROWS = 5;

// ---- many activation rows ---------------------------------------------------------------------
// Past a few rows tile_dot's cost is the per-pair scalar offset term (an FMA on the same ports as
// the vector ones, and a chain that holds registers) and the block unpacked again for every TILE
// rows. matmul_many computes the same pairs with the same operations, grouped differently:
//  - the offset sums off = fma(m, xsum, off), block after block, for 8 weight rows at once in the
//    8 lanes of a vector (each lane runs tile_dot's scalar sequence for its pair, bit for bit);
//  - without those scalars in registers a block unpacked once serves up to WIDE_TILE = 8 rows
//    (8 accumulators, the 4 unpacked vectors, the scale and a temporary fill the 16 registers).
// So every pair still ends as hsum(acc) + off with acc and off what tile_dot computes, and a
// row's result is bit-identical on either path, in any tile, alone or in a batch.
constexpr int WIDE_TILE = 8;
constexpr int CHUNK = 8;   // weight rows whose offsets share a vector

// One weight row against MT activation rows over blocks [b0, b1) (X: their columns from 32 b0 on,
// rows xstride floats apart): tile_dot's vector part. The
// accumulators start at zero (b0 = 0) or from acc, and end in acc, or (b1 = nb) as the results
// hsum(acc) + off, off[i * CHUNK] being the pair's offset sum computed beforehand.
template <int FMT, bool ACC, int MT>
inline void tile_wide(const uint8_t* row, const float* X, int64_t xstride, int64_t nb, int64_t b0, int64_t b1,
                      float* accp, const float* off, float* O, int64_t N) {
  const int bb = block_bytes(FMT);
  __m256 acc[MT];
  for (int i = 0; i < MT; i++) acc[i] = b0 == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(accp + 8 * i);
  Block blk;
  for (int64_t b = b0; b < b1; b++) {
    load_block<FMT>(row + b * bb, blk);
    const __m256 d = _mm256_broadcastss_ps(blk.dm);
    for (int i = 0; i < MT; i++) pair_block<FMT>(blk, d, X + i * xstride + (b - b0) * 32, acc[i]);
  }
  if (b1 < nb) {
    for (int i = 0; i < MT; i++) _mm256_storeu_ps(accp + 8 * i, acc[i]);
    return;
  }
  for (int i = 0; i < MT; i++) {
    const float v = hsum(acc[i]) + off[i * CHUNK];
    if (ACC) O[i * N] += v; else O[i * N] = v;
  }
}

// Whether matmul_many takes the paired path (set_paired_rows; the bits are the same either way, so
// this is a speed choice per CPU: edgellm.kernels.native() makes it).
bool paired_rows_on = EDGELLM_PAIRED_ROWS;
// From this many rows on: at 5 rows (three pairs, one half empty) the Xeon measured 0.85-0.98x the
// unpaired time, at 8 rows 1.11-1.25x (docs/kernels.md).
constexpr int64_t PAIRED_MIN_ROWS = 8;

#if EDGELLM_PAIRED_ROWS
constexpr int PAIR_TILE = 8;   // row pairs sharing an unpacked block: 8 accumulators of 32 registers

// One weight row against MP row pairs over blocks [b0, b1): tile_wide for rows 2i and 2i + 1 at
// once. X: the pair-interleaved slice (pair i at X + i * pstride; block b's 8-float group j of the
// pair's first row at (b - b0) * 64 + 16 j, of its second row 8 floats after). accp, off, O as in
// tile_wide, for the pair's first row (the second: 16 floats, 1 CHUNK, 1 N further). Only the
// first `rows` rows are written: an odd row count's last pair has a row of zeros for its second.
template <int FMT, bool ACC, int MP>
inline void tile_pairs(const uint8_t* row, const float* X, int64_t pstride, int64_t nb, int64_t b0, int64_t b1,
                       float* accp, const float* off, float* O, int64_t N, int64_t rows) {
  const int bb = block_bytes(FMT);
  V16 acc[MP];
  for (int i = 0; i < MP; i++) acc[i] = b0 == 0 ? v16_zero() : vload<V16>(accp + 16 * i);
  Block blk;
  for (int64_t b = b0; b < b1; b++) {
    load_block<FMT>(row + b * bb, blk);
    const V16 w[4] = {v16_dup(blk.v[0]), v16_dup(blk.v[1]), v16_dup(blk.v[2]), v16_dup(blk.v[3])};
    const V16 d = vset1<V16>(blk.d);
    for (int i = 0; i < MP; i++) pair_products<FMT>(w, d, blk.d1, X + i * pstride + (b - b0) * 64, acc[i]);
  }
  if (b1 < nb) {
    for (int i = 0; i < MP; i++) v16_store(accp + 16 * i, acc[i]);
    return;
  }
  for (int i = 0; i < MP; i++) {
    const float lo = hsum(v16_lo(acc[i])) + off[2 * i * CHUNK];
    if (ACC) O[2 * i * N] += lo; else O[2 * i * N] = lo;
    if (2 * i + 1 >= rows) break;
    const float hi = hsum(v16_hi(acc[i])) + off[(2 * i + 1) * CHUNK];
    if (ACC) O[(2 * i + 1) * N] += hi; else O[(2 * i + 1) * N] = hi;
  }
}

// The pair-interleaved copy of columns [32 b0, 32 b1) of the M rows of X (rows K floats apart), in
// (M + 1) / 2 pairs; an odd M's last pair gets zeros for its second row (unpacking a block again
// for one row alone cost more than the products of a row of zeros).
inline void interleave_pairs(const float* X, int64_t K, int64_t M, int64_t b0, int64_t b1, float* out) {
  const int64_t w = (b1 - b0) * 32;
  for (int64_t i = 0; i < (M + 1) / 2; i++)
    for (int64_t g = 0; g < w; g += 8) {
      std::memcpy(out + i * 2 * w + 2 * g, X + 2 * i * K + 32 * b0 + g, 32);
      if (2 * i + 1 < M) std::memcpy(out + i * 2 * w + 2 * g + 8, X + (2 * i + 1) * K + 32 * b0 + g, 32);
      else std::memset(out + i * 2 * w + 2 * g + 8, 0, 32);
    }
}
#endif

// off[i * CHUNK + r] = the offset sum of weight row n + r and activation row i, for the nc <= CHUNK
// rows from n (lanes past nc get m = 0). m[b * CHUNK + r]: scratch for the blocks' offsets.
template <int FMT>
void offset_sums(const uint8_t* W, int64_t row_bytes, int nc, const float* xsum, int64_t M, int64_t nb, float* m,
                 float* off) {
  Block blk;
  for (int r = 0; r < CHUNK; r++)
    for (int64_t b = 0; b < nb; b++) {
      if (r < nc) load_block<FMT>(W + r * row_bytes + b * block_bytes(FMT), blk);
      m[b * CHUNK + r] = r < nc ? blk.m : 0.0f;
    }
  for (int64_t i = 0; i < M; i++) {
    __m256 o = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++)
      o = _mm256_fmadd_ps(_mm256_loadu_ps(m + b * CHUNK), _mm256_set1_ps(xsum[i * nb + b]), o);
    _mm256_storeu_ps(off + i * CHUNK, o);
  }
}

// Columns per slice: the slice of every activation row (M x cols floats) should stay in L1
// (SLICE_BYTES of it) while the chunk's weight rows run over it; at least 2 blocks, whole blocks.
// When there are several slices, each is copied into a buffer of its own with its rows adjacent:
// rows K floats apart (K = 1536: 6 KB) fall on the same few L1 sets and evicted each other (32
// rows of the down projection took 1.5-1.8x the time per pair of 16).
constexpr int64_t SLICE_BYTES = 16 << 10;
inline int64_t slice_blocks(int64_t M, int64_t nb) {
  return std::min<int64_t>(nb, std::max<int64_t>(2, SLICE_BYTES / (M * 32 * 4)));
}

template <int FMT, bool ACC>
void matmul_many(const float* X, const float* xsum, const uint8_t* W, float* O, int64_t M, int64_t N, int64_t K,
                 int64_t n0, int64_t n1) {
  const int64_t nb = K / 32, sb = slice_blocks(M, nb);
  const int64_t row_bytes = nb * block_bytes(FMT);
  thread_local std::vector<float> mv, offv, accv, xv;
  if (static_cast<int64_t>(mv.size()) < nb * CHUNK) mv.resize(nb * CHUNK);
  const bool paired = EDGELLM_PAIRED_ROWS && paired_rows_on && M >= PAIRED_MIN_ROWS;
  const bool copy_x = sb < nb && !paired;   // (the paired path reads its own copy)
  if (copy_x) {   // slice-major copy of X: slice [b0, b1) at xv[M * 32 * b0], rows (b1 - b0) * 32 apart
    if (static_cast<int64_t>(xv.size()) < M * K) xv.resize(M * K);
    for (int64_t b0 = 0; b0 < nb; b0 += sb) {
      const int64_t w = (std::min(nb, b0 + sb) - b0) * 32;
      for (int64_t i = 0; i < M; i++) std::memcpy(xv.data() + M * 32 * b0 + i * w, X + i * K + 32 * b0, w * 4);
    }
  }
  if (static_cast<int64_t>(offv.size()) < M * CHUNK) offv.resize(M * CHUNK);
  if (static_cast<int64_t>(accv.size()) < CHUNK * M * 8) accv.resize(CHUNK * M * 8);
  float *off = offv.data(), *accs = accv.data();
#if EDGELLM_PAIRED_ROWS   // all rows in pairs (tile_pairs); tile_wide takes none
  const int64_t P = paired ? (M + 1) / 2 : 0;
  thread_local std::vector<float> pv, pacc;
  if (static_cast<int64_t>(pv.size()) < 2 * P * K) pv.resize(2 * P * K);
  if (static_cast<int64_t>(pacc.size()) < CHUNK * P * 16) pacc.resize(CHUNK * P * 16);
  for (int64_t b0 = 0; P && b0 < nb; b0 += sb) interleave_pairs(X, K, M, b0, std::min(nb, b0 + sb), pv.data() + P * 64 * b0);
#endif
  if (!has_offset(FMT)) std::fill(off, off + M * CHUNK, 0.0f);
  for (int64_t c = n0; c < n1; c += CHUNK) {
    const int nc = static_cast<int>(std::min<int64_t>(CHUNK, n1 - c));
    if (has_offset(FMT)) offset_sums<FMT>(W + c * row_bytes, row_bytes, nc, xsum, M, nb, mv.data(), off);
    prefetch_rows(W, row_bytes, c, CHUNK, n1, nc);   // the next chunk, while this one computes
    for (int64_t b0 = 0; b0 < nb; b0 += sb) {
      const int64_t b1 = std::min(nb, b0 + sb);
      const float* xs = copy_x ? xv.data() + M * 32 * b0 : X;
      const int64_t xstride = copy_x ? (b1 - b0) * 32 : K;
      for (int r = 0; r < nc; r++) {
        const uint8_t* row = W + (c + r) * row_bytes;
#if EDGELLM_PAIRED_ROWS
        const int64_t pstride = 2 * (b1 - b0) * 32;
        for (int64_t p0 = 0; p0 < P; p0 += PAIR_TILE) {
          const float* x = pv.data() + P * 64 * b0 + p0 * pstride;
          float* acc = pacc.data() + (r * P + p0) * 16;
          const float* of = off + 2 * p0 * CHUNK + r;
          float* o = O + 2 * p0 * N + c + r;
          const int64_t left = M - 2 * p0;
          switch (std::min<int64_t>(PAIR_TILE, P - p0)) {
            case 8: tile_pairs<FMT, ACC, 8>(row, x, pstride, nb, b0, b1, acc, of, o, N, left); break;
            case 7: tile_pairs<FMT, ACC, 7>(row, x, pstride, nb, b0, b1, acc, of, o, N, left); break;
            case 6: tile_pairs<FMT, ACC, 6>(row, x, pstride, nb, b0, b1, acc, of, o, N, left); break;
            case 5: tile_pairs<FMT, ACC, 5>(row, x, pstride, nb, b0, b1, acc, of, o, N, left); break;
            case 4: tile_pairs<FMT, ACC, 4>(row, x, pstride, nb, b0, b1, acc, of, o, N, left); break;
            case 3: tile_pairs<FMT, ACC, 3>(row, x, pstride, nb, b0, b1, acc, of, o, N, left); break;
            case 2: tile_pairs<FMT, ACC, 2>(row, x, pstride, nb, b0, b1, acc, of, o, N, left); break;
            default: tile_pairs<FMT, ACC, 1>(row, x, pstride, nb, b0, b1, acc, of, o, N, left); break;
          }
        }
#endif
        for (int64_t m0 = paired ? M : 0; m0 < M; m0 += WIDE_TILE) {   // the rows not taken in pairs
          const float* x = xs + m0 * xstride;
          float* acc = accs + (r * M + m0) * 8;
          const float* of = off + m0 * CHUNK + r;
          float* o = O + m0 * N + c + r;
          switch (std::min<int64_t>(WIDE_TILE, M - m0)) {
            case 8: tile_wide<FMT, ACC, 8>(row, x, xstride, nb, b0, b1, acc, of, o, N); break;
            case 7: tile_wide<FMT, ACC, 7>(row, x, xstride, nb, b0, b1, acc, of, o, N); break;
            case 6: tile_wide<FMT, ACC, 6>(row, x, xstride, nb, b0, b1, acc, of, o, N); break;
            case 5: tile_wide<FMT, ACC, 5>(row, x, xstride, nb, b0, b1, acc, of, o, N); break;
            case 4: tile_wide<FMT, ACC, 4>(row, x, xstride, nb, b0, b1, acc, of, o, N); break;
            case 3: tile_wide<FMT, ACC, 3>(row, x, xstride, nb, b0, b1, acc, of, o, N); break;
            case 2: tile_wide<FMT, ACC, 2>(row, x, xstride, nb, b0, b1, acc, of, o, N); break;
            default: tile_wide<FMT, ACC, 1>(row, x, xstride, nb, b0, b1, acc, of, o, N); break;
          }
        }
      }
    }
  }
}

// Two adjacent weight rows against one activation row, block by block: two independent chains,
// and each row's pair runs tile_dot's operations in tile_dot's order (the same bits). The batch-1
// loop takes 4-bit (and Q8_0, below) rows two at a time: adjacent rows are one stream in address order (2 x 360
// bytes for SmolLM2's Q4_1), unlike the four rows of the old rows_dot. SmolLM2 generate, avx512
// build, 2 Zen 4 threads, both builds in one process alternating (7 rounds): 157.7 against 149.2
// tok/s, the fused blocks 4.64 against 4.94 ms a step; the avx2 build on the same CPU: level
// (134.7, 134.2). Q8_0 (the vocabulary projection) first measured slower two rows at a time (1.34
// against 1.03 ms, within a `generate` profile); measured again on 2026-12-05, both builds in one
// process: the 49152 x 576 matrix 0.605 -> 0.552 ms (2 threads, from DRAM), `generate` after a
// 512-token prompt 247.3 -> 254.8 tok/s (9 alternating rounds, same tokens); the avx2 build on the
// same CPU 0.551 -> 0.513 ms. So it takes them too. Q5_0 and Q6_KR stay one row at a time (not
// measured).
template <int FMT, bool ACC>
inline void two_rows_dot(const uint8_t* r0, int64_t row_bytes, const float* x, const float* xsum, float* o,
                         int64_t K) {
  const int64_t nb = K / 32;
  const int bb = block_bytes(FMT);
  const uint8_t* r1 = r0 + row_bytes;
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  __m128 off0 = _mm_setzero_ps(), off1 = _mm_setzero_ps();
  Block b0, b1;
  for (int64_t b = 0; b < nb; b++) {
    load_block<FMT, true>(r0 + b * bb, b0);
    load_block<FMT, true>(r1 + b * bb, b1);
    pair_block<FMT>(b0, _mm256_broadcastss_ps(b0.dm), x + b * 32, acc0);
    if (has_offset(FMT)) pair_offset(b0, xsum[b], off0);
    pair_block<FMT>(b1, _mm256_broadcastss_ps(b1.dm), x + b * 32, acc1);
    if (has_offset(FMT)) pair_offset(b1, xsum[b], off1);
  }
  const float v0 = hsum(acc0) + offset_of(off0), v1 = hsum(acc1) + offset_of(off1);
  if (ACC) { o[0] += v0; o[1] += v1; } else { o[0] = v0; o[1] = v1; }
}

template <int FMT, bool ACC>
void matmul_range(const float* X, const float* xsum, const uint8_t* W, float* O, int64_t M, int64_t N,
                  int64_t K, int64_t n0, int64_t n1) {
  const int64_t nb = K / 32;
  const int bb = block_bytes(FMT);
  constexpr int TILE = 4;  // rows of x sharing each unpacked block
  const int64_t row_bytes = nb * bb;
  if (M >= MANY_ROWS) return matmul_many<FMT, ACC>(X, xsum, W, O, M, N, K, n0, n1);
  if (M == 1 && (FMT == Q4_0 || FMT == Q4_1 || FMT == Q4_KR || FMT == Q8_0))
    for (; n0 + 1 < n1; n0 += 2) {
      prefetch_rows(W, row_bytes, n0, 2, n1);
      two_rows_dot<FMT, ACC>(W + n0 * row_bytes, row_bytes, X, xsum, O + n0, K);
    }
  for (int64_t n = n0; n < n1; n++) {   // one weight row at a time, in address order (see prefetch_rows)
    const uint8_t* row = W + n * row_bytes;
    prefetch_rows(W, row_bytes, n, 1, n1);
    for (int64_t m0 = 0; m0 < M; m0 += TILE) {
      const float* x = X + m0 * K;
      const float* xs = xsum + m0 * nb;
      float* o = O + m0 * N + n;
      switch (std::min<int64_t>(TILE, M - m0)) {
        case 4: tile_dot<FMT, ACC, 4>(row, x, xs, o, K, N); break;
        case 3: tile_dot<FMT, ACC, 3>(row, x, xs, o, K, N); break;
        case 2: tile_dot<FMT, ACC, 2>(row, x, xs, o, K, N); break;
        default: tile_dot<FMT, ACC, 1>(row, x, xs, o, K, N); break;
      }
    }
  }
}

// Runs CALL with the compile-time constant FMT set to the run-time format code.
#define WITH_FORMAT(fmt, CALL)                                   \
  switch (fmt) {                                                 \
    case Q4_0: { constexpr int FMT = Q4_0; CALL; } break;        \
    case Q4_1: { constexpr int FMT = Q4_1; CALL; } break;        \
    case Q8_0: { constexpr int FMT = Q8_0; CALL; } break;        \
    case Q4_KR: { constexpr int FMT = Q4_KR; CALL; } break;      \
    case Q6_KR: { constexpr int FMT = Q6_KR; CALL; } break;      \
    default: { constexpr int FMT = Q5_0; CALL; } break;          \
  }

template <bool ACC>
void matmul_range_fmt(int64_t fmt, const float* X, const float* xsum, const uint8_t* W, float* O, int64_t M,
                      int64_t N, int64_t K, int64_t n0, int64_t n1) {
  WITH_FORMAT(fmt, (matmul_range<FMT, ACC>(X, xsum, W, O, M, N, K, n0, n1)));
}

template <int FMT>
void matmul_rows(const float* X, const uint8_t* W, float* O, int64_t M, int64_t N, int64_t K) {
  std::vector<float> xsum(M * (K / 32), 0.0f);
  if (has_offset(FMT)) block_sums(X, M, K, xsum.data());
  at::parallel_for(0, N, 8, [&](int64_t n0, int64_t n1) {
    matmul_range<FMT, false>(X, xsum.data(), W, O, M, N, K, n0, n1);
  });
}

// float32 -> bfloat16 bits, rounded to nearest, ties to even: torch's .to(torch.bfloat16) for
// every finite value (dequantised weights are finite).
inline uint16_t bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// Eight floats rounded to bf16 (bf16_bits, lane by lane) and stored.
inline void store_bf16x8(uint16_t* o, __m256 v) {
#if defined(__AVX2__)
  const __m256i u = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  // lanes hold 0..0xFFFF, so the signed-to-unsigned saturating pack keeps them as they are
  _mm_storeu_si128(reinterpret_cast<__m128i*>(o),
                   _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
#else
  float f[8];
  _mm256_storeu_ps(f, v);
  for (int j = 0; j < 8; j++) o[j] = bf16_bits(f[j]);
#endif
}

inline void store8(float* o, __m256 v) { _mm256_storeu_ps(o, v); }
inline void store8(uint16_t* o, __m256 v) { store_bf16x8(o, v); }

// Rows of blocks as float32 (T = float: prefill's slab for the sgemm) or rounded to bf16 as they
// go (T = uint16_t, --dtype bfloat16's prefill: no float32 slab written and read back).
template <int FMT, typename T>
void dequant_rows(const uint8_t* W, T* O, int64_t N, int64_t K) {
  const int64_t nb = K / 32;
  const int bb = block_bytes(FMT);
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    Block blk;
    for (int64_t n = n0; n < n1; n++)
      for (int64_t b = 0; b < nb; b++) {
        load_block<FMT>(W + (n * nb + b) * bb, blk);
        const __m256 d = _mm256_set1_ps(blk.d), m = _mm256_set1_ps(blk.m);
        const __m256 d1 = FMT == Q6_KR ? _mm256_set1_ps(blk.d1) : d;
        T* o = O + n * K + b * 32;
        for (int j = 0; j < 4; j++) store8(o + 8 * j, _mm256_fmadd_ps(j < 2 ? d : d1, blk.v[j], m));
      }
  });
}

void check(const torch::Tensor& w, int64_t fmt, int64_t N, int64_t K) {
  TORCH_CHECK(fmt >= 0 && fmt < N_FORMATS, "unknown block format ", fmt);
  TORCH_CHECK(K % 32 == 0, "K must be a multiple of 32");
  TORCH_CHECK(w.scalar_type() == torch::kUInt8 && w.is_contiguous(), "weights must be contiguous uint8");
  TORCH_CHECK(w.numel() == N * (K / 32) * block_bytes(fmt), "weight bytes do not match N x K");
}

}  // namespace

// x: [M, K] float32, w: raw blocks of an [N, K] matrix -> [M, N] float32
torch::Tensor block_matmul(torch::Tensor x, torch::Tensor w, int64_t fmt, int64_t N) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "x must be 2-D float32");
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  check(w, fmt, N, K);
  auto out = torch::empty({M, N}, x.options());
  const float* X = x.data_ptr<float>();
  const uint8_t* W = w.data_ptr<uint8_t>();
  float* O = out.data_ptr<float>();
  WITH_FORMAT(fmt, (matmul_rows<FMT>(X, W, O, M, N, K)));
  return out;
}

// Dequantise rows [r0, r1) of an [N, K] matrix into float32 (prefill: then one sgemm).
torch::Tensor block_dequant(torch::Tensor w, int64_t fmt, int64_t N, int64_t K, int64_t r0, int64_t r1) {
  check(w, fmt, N, K);
  TORCH_CHECK(0 <= r0 && r0 <= r1 && r1 <= N, "row range out of bounds");
  auto out = torch::empty({r1 - r0, K}, torch::kFloat32);
  const uint8_t* W = w.data_ptr<uint8_t>() + r0 * (K / 32) * block_bytes(fmt);
  float* O = out.data_ptr<float>();
  WITH_FORMAT(fmt, (dequant_rows<FMT>(W, O, r1 - r0, K)));
  return out;
}

// The same rows rounded to bfloat16 (ties to even), for the bf16 GEMM of --dtype bfloat16.
torch::Tensor block_dequant_bf16(torch::Tensor w, int64_t fmt, int64_t N, int64_t K, int64_t r0, int64_t r1) {
  check(w, fmt, N, K);
  TORCH_CHECK(0 <= r0 && r0 <= r1 && r1 <= N, "row range out of bounds");
  auto out = torch::empty({r1 - r0, K}, torch::kBFloat16);
  const uint8_t* W = w.data_ptr<uint8_t>() + r0 * (K / 32) * block_bytes(fmt);
  uint16_t* O = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  WITH_FORMAT(fmt, (dequant_rows<FMT>(W, O, r1 - r0, K)));
  return out;
}

// ---- fused small ops of a decode step ---------------------------------------------------
// A decode step of a small model is dominated by per-op overhead, not arithmetic: these fold
// the ~40 little PyTorch ops of RoPE, the KV write, attention and the MLP gate into four calls.

// qkv: [T, (H + 2 KVH) * D] -> q [T, H, D] with RoPE (rotate-half); k (rotated) and v written to
// the float32 caches [slots, KVH, D] at write_slots[t]. cos/sin: [T, D].
torch::Tensor rope_qkv_write(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, torch::Tensor k_cache,
                             torch::Tensor v_cache, torch::Tensor write_slots, int64_t H, int64_t KVH) {
  TORCH_CHECK(qkv.scalar_type() == torch::kFloat32 && k_cache.scalar_type() == torch::kFloat32, "float32 only");
  qkv = qkv.contiguous(); cos = cos.contiguous(); sin = sin.contiguous(); write_slots = write_slots.contiguous();
  const int64_t T = qkv.size(0), D = k_cache.size(2), half = D / 2, row = (H + 2 * KVH) * D;
  TORCH_CHECK(qkv.size(1) == row && cos.size(0) == T && write_slots.numel() == T, "shape mismatch");
  auto q = torch::empty({T, H, D}, qkv.options());
  const float *X = qkv.data_ptr<float>(), *C = cos.data_ptr<float>(), *S = sin.data_ptr<float>();
  const int64_t* W = write_slots.data_ptr<int64_t>();
  float *Q = q.data_ptr<float>(), *KC = k_cache.data_ptr<float>(), *VC = v_cache.data_ptr<float>();
  const int64_t n_slots = k_cache.size(0);
  for (int64_t t = 0; t < T; t++) TORCH_CHECK(W[t] >= 0 && W[t] < n_slots, "write slot out of range");
  auto rotate = [&](const float* x, const float* c, const float* s, float* out) {
    for (int64_t i = 0; i < half; i++) {
      out[i] = x[i] * c[i] - x[i + half] * s[i];
      out[i + half] = x[i + half] * c[i + half] + x[i] * s[i + half];
    }
  };
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; t++) {
      const float *x = X + t * row, *c = C + t * D, *s = S + t * D;
      for (int64_t h = 0; h < H; h++) rotate(x + h * D, c, s, Q + (t * H + h) * D);
      float* kc = KC + W[t] * KVH * D;
      float* vc = VC + W[t] * KVH * D;
      for (int64_t h = 0; h < KVH; h++) rotate(x + (H + h) * D, c, s, kc + h * D);
      std::memcpy(vc, x + (H + KVH) * D, sizeof(float) * KVH * D);
    }
  });
  return q;
}

// Decode attention: one query token per sequence over its cached history, read through slots.
// q: [B, H, D]; caches [slots, KVH, D]; ctx_slots: [B, Lmax] (row b valid up to ctx_lens[b]).
// Returns [B, H * D]. Softmax in float32 with the running-max trick, like the reference.
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                               torch::Tensor ctx_slots, torch::Tensor ctx_lens) {
  q = q.contiguous(); ctx_slots = ctx_slots.contiguous(); ctx_lens = ctx_lens.contiguous();
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), KVH = k_cache.size(1), G = H / KVH;
  const int64_t Lmax = ctx_slots.size(1), n_slots = k_cache.size(0);
  TORCH_CHECK(D % 8 == 0 && H % KVH == 0, "head_dim must be a multiple of 8");
  auto out = torch::empty({B, H * D}, q.options());
  const float *Qp = q.data_ptr<float>(), *KC = k_cache.data_ptr<float>(), *VC = v_cache.data_ptr<float>();
  const int64_t *SL = ctx_slots.data_ptr<int64_t>(), *LN = ctx_lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; b++) {
    TORCH_CHECK(LN[b] >= 1 && LN[b] <= Lmax, "context length out of range");
    for (int64_t l = 0; l < LN[b]; l++) TORCH_CHECK(SL[b * Lmax + l] >= 0 && SL[b * Lmax + l] < n_slots, "slot out of range");
  }
  float* O = out.data_ptr<float>();
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  at::parallel_for(0, B * KVH, 1, [&](int64_t w0, int64_t w1) {
    std::vector<float> scores(G * Lmax);
    for (int64_t w = w0; w < w1; w++) {
      const int64_t b = w / KVH, g = w % KVH, L = LN[b];
      const int64_t* slots = SL + b * Lmax;
      for (int64_t l = 0; l < L; l++) {
        const float* k = KC + (slots[l] * KVH + g) * D;
        for (int64_t j = 0; j < G; j++) {
          const float* qv = Qp + (b * H + g * G + j) * D;
          __m256 acc = _mm256_setzero_ps();
          for (int64_t i = 0; i < D; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(qv + i), _mm256_loadu_ps(k + i), acc);
          scores[j * Lmax + l] = hsum(acc) * scale;
        }
      }
      for (int64_t j = 0; j < G; j++) {
        float* sc = scores.data() + j * Lmax;
        float mx = sc[0];
        for (int64_t l = 1; l < L; l++) mx = std::max(mx, sc[l]);
        float sum = 0.0f;
        for (int64_t l = 0; l < L; l++) { sc[l] = std::exp(sc[l] - mx); sum += sc[l]; }
        const float inv = 1.0f / sum;
        for (int64_t l = 0; l < L; l++) sc[l] *= inv;
      }
      for (int64_t j = 0; j < G; j++) {
        float* o = O + (b * H + g * G + j) * D;
        for (int64_t i = 0; i < D; i++) o[i] = 0.0f;
      }
      for (int64_t l = 0; l < L; l++) {
        const float* v = VC + (slots[l] * KVH + g) * D;
        for (int64_t j = 0; j < G; j++) {
          float* o = O + (b * H + g * G + j) * D;
          const __m256 p = _mm256_set1_ps(scores[j * Lmax + l]);
          for (int64_t i = 0; i < D; i += 8)
            _mm256_storeu_ps(o + i, _mm256_fmadd_ps(p, _mm256_loadu_ps(v + i), _mm256_loadu_ps(o + i)));
        }
      }
    }
  });
  return out;
}

// [M, 2F] (gate | up) -> [M, F] = silu(gate) * up
torch::Tensor silu_mul(torch::Tensor gu) {
  gu = gu.contiguous();
  const int64_t M = gu.size(0), F = gu.size(1) / 2;
  auto out = torch::empty({M, F}, gu.options());
  const float* X = gu.data_ptr<float>();
  float* O = out.data_ptr<float>();
  const int64_t F8 = F / 8 * 8;
  at::parallel_for(0, M, 4, [&](int64_t m0, int64_t m1) {
    const __m256 one = _mm256_set1_ps(1.0f), neg = _mm256_set1_ps(-0.0f);
    for (int64_t m = m0; m < m1; m++) {
      const float *g = X + m * 2 * F, *u = g + F;
      float* o = O + m * F;
      for (int64_t i = 0; i < F8; i += 8) {   // silu(g) * u = g / (1 + exp(-g)) * u, 8 at a time
        const __m256 gv = _mm256_loadu_ps(g + i);
        const __m256 den = _mm256_add_ps(one, exp8(_mm256_xor_ps(gv, neg)));
        _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_div_ps(gv, den), _mm256_loadu_ps(u + i)));
      }
      for (int64_t i = F8; i < F; i++) o[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
    }
  });
  return out;
}

// residual + x @ W.T for a block-quantised W, in one call (the output projections of a block).
torch::Tensor block_matmul_add(torch::Tensor x, torch::Tensor w, int64_t fmt, int64_t N, torch::Tensor residual) {
  auto y = block_matmul(x, w, fmt, N);
  y.add_(residual);
  return y;
}

// int8 activations (opt-in), in their own files: quantised blocks, integer dot products
#include "int8_activations.h"
// bf16 dot products for the decode of --dtype bfloat16, in their own file too
#include "bf16_decode.h"
// and bf16 dot products for its prefill attention
#include "bf16_attention.h"

// ---- every transformer block of a decode step, in one parallel region ------------------------
// Launching a parallel region per matmul costs more than the matmul at SmolLM2's widths when two
// threads share a busy machine (measured: 120 small matmuls ran slower on 2 threads than on 1).
// Here the threads enter once per step and meet at 4 barriers per layer. Each thread computes
// the RMSNorm of the residual privately (it is tiny), takes a contiguous share of every weight
// matrix's output rows, and takes whole (sequence, KV head) pairs for RoPE, the KV write and
// attention. The math is the Python model's (models/llama.py), which the parity tests check.

inline void rms_norm(const float* x, const float* w, float* y, int64_t C, float eps) {
  float ss = 0.0f;
  for (int64_t i = 0; i < C; i++) ss += x[i] * x[i];
  const float r = 1.0f / std::sqrt(ss / static_cast<float>(C) + eps);
  for (int64_t i = 0; i < C; i++) y[i] = w[i] * (x[i] * r);
}

inline void rope_head(const float* x, const float* bias, const float* c, const float* s, float* out, int64_t D) {
  const int64_t half = D / 2;
  for (int64_t i = 0; i < half; i++) {
    const float a = x[i] + (bias ? bias[i] : 0.0f), b = x[i + half] + (bias ? bias[i + half] : 0.0f);
    out[i] = a * c[i] - b * s[i];
    out[i + half] = b * c[i + half] + a * s[i + half];
  }
}

struct Share { int64_t n0, n1; };
inline Share share(int64_t N, int t, int T) { return {N * t / T, N * (t + 1) / T}; }

// KV cache elements: float32, or float16 (half the bytes read per decode step; F16C converts).
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline void store_row(const float* x, float* out, int64_t D) { std::memcpy(out, x, D * sizeof(float)); }
inline void store_row(const float* x, at::Half* out, int64_t D) {
  for (int64_t i = 0; i < D; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// The sums of eight vectors, as one vector (a horizontal add shared by eight dot products).
inline __m256 hsum8x8(const __m256* a) {
  const __m256 t0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 t1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31));
}

// Decode attention takes one KV head at a time, and the cache holds each position's row of all
// KV heads together ([slot][KV head][D]): a head's pass reads a third of every row (SmolLM2: 256
// of 768 bytes), too little in a row for the hardware prefetchers (a torch sum of one head of
// three: 4.0 GB/s against 20.8 for the whole rows). So the first KV head a thread takes of a
// position range asks for whole rows: the keys KV_AHEAD positions ahead into L1, the values of the
// positions it scores into L2 for the value passes; the range's other heads, which the same thread
// takes next, find their rows in cache. SmolLM2's fused decode step at context 1024: 6.68 ms
// against 7.80 (two Zen 4 threads, alternating; 8 and 32 positions ahead: 6.83, 6.89).
constexpr int64_t KV_AHEAD = 16;

// Whole rows (all KV heads, row = KVH * D values) of position p of a range of n: its values into
// L2, the keys of position p + KV_AHEAD into L1.
template <typename KV>
__attribute__((always_inline)) inline void prefetch_position(const KV* KC, const KV* VC, const int64_t* slots,
                                                             int64_t p, int64_t n, int64_t row) {
  const int64_t bytes = row * static_cast<int64_t>(sizeof(KV));
  prefetch_bytes<true>(VC + slots[p] * row, bytes);
  if (p + KV_AHEAD < n) prefetch_bytes(KC + slots[p + KV_AHEAD] * row, bytes);
}

template <typename KV>
inline __m256 dot_row(const float* q, const KV* k, int64_t D) {
  __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(q), load8(k));
  for (int64_t i = 8; i < D; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load8(k + i), acc);
  return acc;
}

// Attention of the G query heads of one KV head over positions [p0, p1) of one sequence, as a
// partial result: per head the running max m, the sum l of exp(score - m) and the unnormalised
// output o = sum exp(score - m) * v. Partials of several position ranges merge exactly
// (merge_partials), which lets two threads share one long sequence when there are fewer
// (sequence, KV head) pairs than threads -- the batch-1 case. Scores are made eight positions
// at a time (one shared horizontal add) and exponentiated eight at a time.
#if defined(__AVX2__) && defined(__FMA__)
// The G query heads of a KV head (G known at compile time, D = 64) read each key and value row
// once instead of once per head. Every head's sums run in the same order as in attend_range's
// loops below, so the scores and outputs are the same bits. shared_scores: positions [0, n8) of the
// range; shared_outputs: o_j = sum over the range of sc_j[p] * v[p] to part + j * head_stride + 2.
// The value pass keeps G x 8 accumulators in registers where there are 32 (AVX-512); with AVX2's
// 16 it runs twice, over each half of the row (G x 4), which reads the same cache lines.
#if defined(__AVX512F__)
constexpr int V_PASSES = 1;
#else
constexpr int V_PASSES = 2;
#endif
template <typename KV, int G>
inline void shared_scores(const float* qr, const KV* KC, const KV* VC, const int64_t* slots, int64_t p0, int64_t n,
                          int64_t n8, int64_t KVH, int64_t g, bool whole_rows, __m256 vscale, float* scores) {
  constexpr int64_t D = 64;
  for (int64_t p = 0; p < n8; p += 8) {
    if (whole_rows)
      for (int u = 0; u < 8; u++) prefetch_position(KC, VC, slots + p0, p + u, n, KVH * D);
    __m256 acc[G][8];
    for (int u = 0; u < 8; u++) {
      const KV* k = KC + (slots[p0 + p + u] * KVH + g) * D;
      const __m256 k0 = load8(k);
      for (int j = 0; j < G; j++) acc[j][u] = _mm256_mul_ps(_mm256_loadu_ps(qr + j * D), k0);
      for (int64_t i = 8; i < D; i += 8) {
        const __m256 ki = load8(k + i);
        for (int j = 0; j < G; j++) acc[j][u] = _mm256_fmadd_ps(_mm256_loadu_ps(qr + j * D + i), ki, acc[j][u]);
      }
    }
    for (int j = 0; j < G; j++) _mm256_storeu_ps(scores + j * n + p, _mm256_mul_ps(hsum8x8(acc[j]), vscale));
  }
}

template <typename KV, int G>
inline void shared_outputs(const KV* VC, const int64_t* slots, int64_t p0, int64_t n, int64_t KVH, int64_t g,
                           const float* scores, float* part, int64_t head_stride) {
  constexpr int64_t D = 64;
  constexpr int W = 8 / V_PASSES;   // 8-float vectors of the row a pass covers
  for (int pass = 0; pass < V_PASSES; pass++) {
    __m256 r[G][W];
    for (int j = 0; j < G; j++)
      for (int i = 0; i < W; i++) r[j][i] = _mm256_setzero_ps();
    for (int64_t p = 0; p < n; p++) {
      const KV* v = VC + (slots[p0 + p] * KVH + g) * D + pass * 8 * W;
      for (int i = 0; i < W; i++) {
        const __m256 vi = load8(v + 8 * i);
        for (int j = 0; j < G; j++) r[j][i] = _mm256_fmadd_ps(_mm256_broadcast_ss(scores + j * n + p), vi, r[j][i]);
      }
    }
    for (int j = 0; j < G; j++)
      for (int i = 0; i < W; i++) _mm256_storeu_ps(part + j * head_stride + 2 + pass * 8 * W + 8 * i, r[j][i]);
  }
}

// Runs f(std::integral_constant<int, G>{}) where the shared path is built for G query heads of
// size D, and says whether it did.
template <typename F>
inline bool with_shared_heads(int64_t G, int64_t D, F f) {
  if (D != 64) return false;
  switch (G) {
    case 2: f(std::integral_constant<int, 2>{}); return true;
    case 3: f(std::integral_constant<int, 3>{}); return true;
    default: return false;
  }
}
#endif

template <typename KV>
void attend_range(const float* qr, const KV* KC, const KV* VC, const int64_t* slots, int64_t p0, int64_t p1,
                  int64_t KVH, int64_t g, int64_t G, int64_t D, float scale, float* scores, float* part,
                  int64_t head_stride, bool whole_rows) {
  const int64_t n = p1 - p0, n8 = n / 8 * 8;
  const __m256 vscale = _mm256_set1_ps(scale);
  bool shared = false;   // the scores of [0, n8) made for all heads at once (avx512 and avx2 builds)
#if defined(__AVX2__) && defined(__FMA__)
  shared = with_shared_heads(G, D, [&](auto heads) {
    shared_scores<KV, decltype(heads)::value>(qr, KC, VC, slots, p0, n, n8, KVH, g, whole_rows, vscale, scores);
  });
#endif
  for (int64_t j = 0; j < G; j++) {
    const float* q = qr + j * D;
    float* sc = scores + j * n;
    __m256 acc[8];
    for (int64_t p = shared ? n8 : 0; p < n8; p += 8) {
      if (whole_rows && j == 0)
        for (int u = 0; u < 8; u++) prefetch_position(KC, VC, slots + p0, p + u, n, KVH * D);
      for (int u = 0; u < 8; u++) acc[u] = dot_row(q, KC + (slots[p0 + p + u] * KVH + g) * D, D);
      _mm256_storeu_ps(sc + p, _mm256_mul_ps(hsum8x8(acc), vscale));
    }
    for (int64_t p = n8; p < n; p++) sc[p] = hsum(dot_row(q, KC + (slots[p0 + p] * KVH + g) * D, D)) * scale;
  }
  for (int64_t j = 0; j < G; j++) {
    float* out = part + j * head_stride;
    float* sc = scores + j * n;
    float mx = -INFINITY;
    for (int64_t p = 0; p < n; p++) mx = std::max(mx, sc[p]);
    const __m256 vmx = _mm256_set1_ps(mx);
    __m256 vsum = _mm256_setzero_ps();
    for (int64_t p = 0; p < n8; p += 8) {
      const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(sc + p), vmx));
      _mm256_storeu_ps(sc + p, e);
      vsum = _mm256_add_ps(vsum, e);
    }
    float sum = hsum(vsum);
    for (int64_t p = n8; p < n; p++) { sc[p] = std::exp(sc[p] - mx); sum += sc[p]; }
    out[0] = mx;
    out[1] = sum;
    if (shared) continue;   // the outputs of all heads at once, below
    float* o = out + 2;
    if (D == 64) {   // the usual head size: the output row stays in registers
      __m256 r[8];
      for (int i = 0; i < 8; i++) r[i] = _mm256_setzero_ps();
      for (int64_t p = 0; p < n; p++) {
        const KV* v = VC + (slots[p0 + p] * KVH + g) * D;
        const __m256 w = _mm256_set1_ps(sc[p]);
        for (int i = 0; i < 8; i++) r[i] = _mm256_fmadd_ps(w, load8(v + 8 * i), r[i]);
      }
      for (int i = 0; i < 8; i++) _mm256_storeu_ps(o + 8 * i, r[i]);
    } else {
      for (int64_t i = 0; i < D; i++) o[i] = 0.0f;
      for (int64_t p = 0; p < n; p++) {
        const KV* v = VC + (slots[p0 + p] * KVH + g) * D;
        const __m256 w = _mm256_set1_ps(sc[p]);
        for (int64_t i = 0; i < D; i += 8)
          _mm256_storeu_ps(o + i, _mm256_fmadd_ps(w, load8(v + i), _mm256_loadu_ps(o + i)));
      }
    }
  }
#if defined(__AVX2__) && defined(__FMA__)
  if (shared)
    with_shared_heads(G, D, [&](auto heads) {
      shared_outputs<KV, decltype(heads)::value>(VC, slots, p0, n, KVH, g, scores, part, head_stride);
    });
#endif
}

// out[D] = the softmax-weighted output from S partials ([m, l, o[D]] each) of one query head.
inline void merge_partials(const float* part, int64_t S, int64_t part_stride, int64_t D, float* out) {
  float M = -INFINITY;
  for (int64_t s = 0; s < S; s++) M = std::max(M, part[s * part_stride]);
  float L = 0.0f;
  for (int64_t i = 0; i < D; i++) out[i] = 0.0f;
  for (int64_t s = 0; s < S; s++) {
    const float* p = part + s * part_stride;
    if (p[1] == 0.0f) continue;            // an empty range
    const float w = std::exp(p[0] - M);
    L += w * p[1];
    for (int64_t i = 0; i < D; i++) out[i] += w * p[2 + i];
  }
  const float inv = 1.0f / L;
  for (int64_t i = 0; i < D; i++) out[i] *= inv;
}

// How the fused decode step's matmuls multiply: exactly (float32), with int8 activation blocks
// (--activations int8, int8_activations.h) or with bf16 dot products (--dtype bfloat16, bf16_decode.h).
enum Arith { ARITH_FP32 = 0, ARITH_INT8 = 1, ARITH_BF16 = 2 };

// One matmul of the fused step in the step's arithmetic: this thread's share s of O [M, N] (+)= X [M, K]
// @ W.T. Each arithmetic prepares X its own way (block sums in xs, int8 blocks in q8, bf16 in b16).
template <int ARITH, bool ACC>
inline void step_matmul(int8act::Q8Scratch& q8, bf16dot::BF16Scratch& b16, float* xs, int64_t fmt, const float* X,
                        int64_t M, int64_t K, const uint8_t* W, float* O, int64_t N, Share s) {
  if (ARITH == ARITH_INT8) {
    int8act::step_matmul<ACC>(q8, fmt, X, M, K, W, O, N, s.n0, s.n1);
  } else if (ARITH == ARITH_BF16) {
    bf16dot::step_matmul<ACC>(b16, fmt, X, M, K, W, O, N, s.n0, s.n1);
  } else {
    block_sums(X, M, K, xs);
    matmul_range_fmt<ACC>(fmt, X, xs, W, O, M, N, K, s.n0, s.n1);
  }
}

// Attention work item `item` of a decode step (items: row by row, range by range, a range's KV
// heads adjacent): its row b, KV head g and position range r. Each thread takes a contiguous run of
// items (share), so it takes a range's heads one after another, and the first of them a thread
// takes asks for the range's whole KV rows (prefetch_position). first = the thread's first item.
struct KVItem {
  int64_t b, g, r;
  bool whole_rows;
};
inline KVItem kv_item(const std::vector<int64_t>& first_item, const std::vector<int64_t>& ranges, int64_t KVH,
                      int64_t item, int64_t first) {
  int64_t b = 0;
  while (first_item[b + 1] <= item) b++;
  const int64_t local = item - first_item[b], g = local % KVH;
  return {b, g, local / KVH, g == 0 || item == first};
}

// Sets `a` to the KV rows (whole rows: K, then V) of one cache layer that the thread's attention
// items `mine` will read: the positions of each row range they cover.
template <typename KV>
void plan_kv_ahead(KVAhead& a, const KV* KC, const KV* VC, int64_t KVH, int64_t D, const std::vector<int64_t>& first_item,
                   const std::vector<int64_t>& ranges, const int64_t* CL, const int64_t* CI, int64_t Lmax, Share mine,
                   int64_t weight_rows) {
  a.spans.clear();
  a.s = 0;
  a.off = 0;
  a.K = reinterpret_cast<const char*>(KC);
  a.V = reinterpret_cast<const char*>(VC);
  a.row = KVH * D * static_cast<int64_t>(sizeof(KV));
  int64_t lines = 0;
  for (int64_t item = mine.n0; item < mine.n1; item++) {
    const KVItem it = kv_item(first_item, ranges, KVH, item, mine.n0);
    if (!it.whole_rows) continue;   // a range's other heads: the same rows
    const int64_t S = ranges[it.b], len = CL[it.b];
    a.spans.push_back({CI + it.b * Lmax, len * it.r / S, len * (it.r + 1) / S});
    lines += (a.spans.back().p1 - a.spans.back().p) * 2 * a.row / 64;
  }
  a.per_row = (lines + weight_rows - 1) / std::max<int64_t>(1, weight_rows);
}

template <typename KV, int ARITH>
void decode_blocks_impl(torch::Tensor h, const std::vector<torch::Tensor>& weights, const std::vector<int64_t>& fmts,
                        const std::vector<torch::Tensor>& qkv_bias, torch::Tensor cos, torch::Tensor sin,
                        torch::Tensor kv, torch::Tensor write_index, torch::Tensor ctx_index, torch::Tensor ctx_lens,
                        int64_t H, int64_t KVH, int64_t F, double eps_d, int nt,
                        const std::vector<int64_t>& kv_layers) {
  // L blocks run (weights hold 6 tensors each); block l reads and writes KV layer kv_layers[l]
  // (l itself when kv_layers is empty): a speculative draft runs a subset of the blocks.
  const int64_t B = h.size(0), C = h.size(1), L = static_cast<int64_t>(weights.size()) / 6,
                n_slots = kv.size(2), D = kv.size(4);
  const int64_t G = H / KVH, Q = H * D, QKV = (H + 2 * KVH) * D, Lmax = ctx_index.size(1);
  const float eps = static_cast<float>(eps_d);
  const int64_t *WI = write_index.data_ptr<int64_t>(), *CI = ctx_index.data_ptr<int64_t>(),
                *CL = ctx_lens.data_ptr<int64_t>();
  float* Hp = h.data_ptr<float>();
  KV* KVp = kv.data_ptr<KV>();
  const float *COS = cos.data_ptr<float>(), *SIN = sin.data_ptr<float>();
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  // Attention work items: (sequence, KV head, position range). A row's positions are cut into
  // ranges of at least RANGE_POSITIONS (at most MAX_RANGES), so that a long context is shared by
  // several threads even at batch 1; partials are merged after the barrier. The cut depends only
  // on the row's own context length -- never on the batch or the thread count -- so a row's
  // result is the same alone, in a batch, or as one row of a speculative verify pass.
  constexpr int64_t RANGE_POSITIONS = 128, MAX_RANGES = 8;
  const int64_t pairs = B * KVH;
  std::vector<int64_t> ranges(B), first_item(B + 1, 0);   // per row: its ranges, its first item
  for (int64_t b = 0; b < B; b++) {
    ranges[b] = std::max<int64_t>(1, std::min<int64_t>(MAX_RANGES, CL[b] / RANGE_POSITIONS));
    first_item[b + 1] = first_item[b] + KVH * ranges[b];
  }
  const int64_t n_items = first_item[B];
  const int64_t part_stride = D + 2;
  std::vector<float> qkv(B * QKV), gu(B * 2 * F), part(n_items * G * part_stride);

#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num(), T = omp_get_num_threads();
    std::vector<float> xn(B * std::max(C, F)), xs(B * std::max(std::max(C, F), Q) / 32);
    std::vector<float> scores(G * Lmax), qr(G * D), krow(D), attn(B * Q);
    int8act::Q8Scratch q8(ARITH == ARITH_INT8 ? B : 0, std::max(std::max(C, F), Q));
    bf16dot::BF16Scratch b16(ARITH == ARITH_BF16 ? B * std::max(std::max(C, F), Q) : 0);
    KVAhead ahead;
    kv_ahead = &ahead;
    for (int64_t l = 0; l < L; l++) {
      const float* attn_norm = weights[6 * l + 0].data_ptr<float>();
      const float* ffn_norm = weights[6 * l + 3].data_ptr<float>();
      const float* bias = qkv_bias.empty() ? nullptr : qkv_bias[l].data_ptr<float>();
      const int64_t kl = kv_layers.empty() ? l : kv_layers[l];
      KV* KC = KVp + (kl * 2 + 0) * n_slots * KVH * D;
      KV* VC = KVp + (kl * 2 + 1) * n_slots * KVH * D;
      // 1. x = norm(h); qkv = x @ Wqkv.T (my rows)
      for (int64_t b = 0; b < B; b++) rms_norm(Hp + b * C, attn_norm, xn.data() + b * C, C, eps);
      Share s = share(QKV, t, T);
      step_matmul<ARITH, false>(q8, b16, xs.data(), fmts[4 * l], xn.data(), B, C,
                                weights[6 * l + 1].data_ptr<uint8_t>(), qkv.data(), QKV, s);
#pragma omp barrier
      // 2a. per (row, KV head): RoPE on the new token's K, its K and V written to the cache. All
      //     writes land before any row attends: the rows of one sequence's verify pass (positions
      //     p..p+k) read each other's keys.
      for (int64_t pair = t; pair < pairs; pair += T) {
        const int64_t b = pair / KVH, g = pair % KVH;
        const float *x = qkv.data() + b * QKV, *c = COS + b * D, *sn = SIN + b * D;
        rope_head(x + Q + g * D, bias ? bias + Q + g * D : nullptr, c, sn, krow.data(), D);
        store_row(krow.data(), KC + (WI[b] * KVH + g) * D, D);
        for (int64_t i = 0; i < D; i++) krow[i] = x[Q + KVH * D + g * D + i] + (bias ? bias[Q + KVH * D + g * D + i] : 0.0f);
        store_row(krow.data(), VC + (WI[b] * KVH + g) * D, D);
      }
#pragma omp barrier
      // 2b. per (row, KV head, position range): attention of the G query heads as a partial result,
      //     laid out [row][KV head][head j][range r] so that one head's ranges are adjacent
      const Share mine = share(n_items, t, T);
      for (int64_t item = mine.n0; item < mine.n1; item++) {
        const KVItem it = kv_item(first_item, ranges, KVH, item, mine.n0);
        const int64_t b = it.b, g = it.g, r = it.r, S = ranges[b], len = CL[b];
        const int64_t p0 = len * r / S, p1 = len * (r + 1) / S;
        const float *x = qkv.data() + b * QKV, *c = COS + b * D, *sn = SIN + b * D;
        for (int64_t j = 0; j < G; j++)
          rope_head(x + (g * G + j) * D, bias ? bias + (g * G + j) * D : nullptr, c, sn, qr.data() + j * D, D);
        attend_range<KV>(qr.data(), KC, VC, CI + b * Lmax, p0, p1, KVH, g, G, D, scale, scores.data(),
                         part.data() + ((first_item[b] + g * S) * G + r) * part_stride, S * part_stride, it.whole_rows);
      }
#pragma omp barrier
      ahead.spans.clear();   // the next layer's KV rows, asked for during this layer's matmuls
      if (l + 1 < L) {
        const int64_t kn = kv_layers.empty() ? l + 1 : kv_layers[l + 1];
        plan_kv_ahead(ahead, KVp + (kn * 2 + 0) * n_slots * KVH * D, KVp + (kn * 2 + 1) * n_slots * KVH * D, KVH, D,
                      first_item, ranges, CL, CI, Lmax, mine, (2 * C + 2 * F + QKV) / T);
      }
      // 3. every thread merges the partials into its own copy of the attention output (cheaper
      //    than another barrier), then h += attn @ Wo.T (my rows)
      for (int64_t pair = 0; pair < pairs; pair++) {
        const int64_t b = pair / KVH, g = pair % KVH, S = ranges[b];
        for (int64_t j = 0; j < G; j++)
          merge_partials(part.data() + ((first_item[b] + g * S) * G + j * S) * part_stride, S, part_stride, D,
                         attn.data() + b * Q + (g * G + j) * D);
      }
      s = share(C, t, T);
      step_matmul<ARITH, true>(q8, b16, xs.data(), fmts[4 * l + 1], attn.data(), B, Q,
                               weights[6 * l + 2].data_ptr<uint8_t>(), Hp, C, s);
#pragma omp barrier
      // 4. gate|up = norm(h) @ Wgu.T (my rows)
      for (int64_t b = 0; b < B; b++) rms_norm(Hp + b * C, ffn_norm, xn.data() + b * C, C, eps);
      s = share(2 * F, t, T);
      step_matmul<ARITH, false>(q8, b16, xs.data(), fmts[4 * l + 2], xn.data(), B, C,
                                weights[6 * l + 4].data_ptr<uint8_t>(), gu.data(), 2 * F, s);
#pragma omp barrier
      // 5. h += (silu(gate) * up) @ Wdown.T (my rows); the activation is rebuilt privately
      for (int64_t b = 0; b < B; b++)   // F is a multiple of 32 (checked)
        for (int64_t i = 0; i < F; i += 8) {
          const __m256 gt = _mm256_loadu_ps(gu.data() + b * 2 * F + i);
          const __m256 den = _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(_mm256_xor_ps(gt, _mm256_set1_ps(-0.0f))));
          _mm256_storeu_ps(xn.data() + b * F + i,
                           _mm256_mul_ps(_mm256_div_ps(gt, den), _mm256_loadu_ps(gu.data() + b * 2 * F + F + i)));
        }
      s = share(C, t, T);
      step_matmul<ARITH, true>(q8, b16, xs.data(), fmts[4 * l + 3], xn.data(), B, F,
                               weights[6 * l + 5].data_ptr<uint8_t>(), Hp, C, s);
#pragma omp barrier
    }
    kv_ahead = nullptr;
  }
}

// The blocks given (weights: 6 tensors per block, fmts: 4 per block), block l on KV layer
// kv_layers[l] (empty: on layer l, and then every layer of the cache must be given).
// int8: the int8-activation flavour (decode_blocks_on(..., int8 = true)).
void decode_blocks_run(torch::Tensor h, std::vector<torch::Tensor> weights, std::vector<int64_t> fmts,
                       std::vector<torch::Tensor> qkv_bias, torch::Tensor cos, torch::Tensor sin, torch::Tensor kv,
                       torch::Tensor write_index, torch::Tensor ctx_index, torch::Tensor ctx_lens,
                       int64_t H, int64_t KVH, int64_t F, double eps_d, int64_t num_threads,
                       std::vector<int64_t> kv_layers, int64_t arith) {
  TORCH_CHECK(h.is_contiguous() && h.scalar_type() == torch::kFloat32, "h must be contiguous float32");
  TORCH_CHECK(arith >= ARITH_FP32 && arith <= ARITH_BF16, "arith: 0 (float32), 1 (int8) or 2 (bf16)");
  TORCH_CHECK(arith != ARITH_BF16 || bf16dot::available(),
              "bf16 dot products need the avx512 kernels and a CPU with AVX512_BF16");
  const int nt = num_threads > 0 ? static_cast<int>(num_threads) : at::get_num_threads();
  TORCH_CHECK(kv.is_contiguous() && (kv.scalar_type() == torch::kFloat32 || kv.scalar_type() == torch::kHalf),
              "KV cache must be contiguous float32 or float16");
  cos = cos.contiguous(); sin = sin.contiguous();
  write_index = write_index.contiguous(); ctx_index = ctx_index.contiguous(); ctx_lens = ctx_lens.contiguous();
  const int64_t B = h.size(0), C = h.size(1), L = static_cast<int64_t>(weights.size()) / 6,
                n_slots = kv.size(2), D = kv.size(4);
  const int64_t Q = H * D, QKV = (H + 2 * KVH) * D, Lmax = ctx_index.size(1);
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == 6 * L && static_cast<int64_t>(fmts.size()) == 4 * L,
              "weights/fmts do not match the number of layers");
  if (kv_layers.empty()) {
    TORCH_CHECK(L == kv.size(0), "without kv_layers, one block per KV cache layer");
  } else {
    TORCH_CHECK(static_cast<int64_t>(kv_layers.size()) == L, "one KV layer per block");
  }
  for (int64_t kl : kv_layers) TORCH_CHECK(kl >= 0 && kl < kv.size(0), "KV layer out of range");
  TORCH_CHECK(qkv_bias.empty() || static_cast<int64_t>(qkv_bias.size()) == L, "one qkv bias per layer");
  TORCH_CHECK(C % 32 == 0 && F % 32 == 0 && Q % 32 == 0 && D % 8 == 0, "widths must be multiples of 32");
  for (int64_t l = 0; l < L; l++) {
    check(weights[6 * l + 1], fmts[4 * l + 0], QKV, C);
    check(weights[6 * l + 2], fmts[4 * l + 1], C, Q);
    check(weights[6 * l + 4], fmts[4 * l + 2], 2 * F, C);
    check(weights[6 * l + 5], fmts[4 * l + 3], C, F);
  }
  const int64_t *WI = write_index.data_ptr<int64_t>(), *CI = ctx_index.data_ptr<int64_t>(),
                *CL = ctx_lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; b++) {
    TORCH_CHECK(CL[b] >= 1 && CL[b] <= Lmax && WI[b] >= 0 && WI[b] < n_slots, "bad slot or length");
    for (int64_t i = 0; i < CL[b]; i++) TORCH_CHECK(CI[b * Lmax + i] >= 0 && CI[b * Lmax + i] < n_slots, "bad slot");
  }
  // the six combinations of cache type and arithmetic
  auto run = [&](auto kv_tag) {
    using KV = decltype(kv_tag);
    auto go = [&](auto arith_tag) {
      decode_blocks_impl<KV, decltype(arith_tag)::value>(h, weights, fmts, qkv_bias, cos, sin, kv, write_index,
                                                         ctx_index, ctx_lens, H, KVH, F, eps_d, nt, kv_layers);
    };
    if (arith == ARITH_INT8) go(std::integral_constant<int, ARITH_INT8>());
    else if (arith == ARITH_BF16) go(std::integral_constant<int, ARITH_BF16>());
    else go(std::integral_constant<int, ARITH_FP32>());
  };
  if (kv.scalar_type() == torch::kHalf) run(at::Half()); else run(0.0f);
}

// arith: how the matmuls multiply (Arith): 0 float32 (exact), 1 int8 activation blocks
// (--activations int8, int8_activations.h), 2 bf16 dot products (--dtype bfloat16, bf16_decode.h)
void decode_blocks_on(torch::Tensor h, std::vector<torch::Tensor> weights, std::vector<int64_t> fmts,
                      std::vector<torch::Tensor> qkv_bias, torch::Tensor cos, torch::Tensor sin, torch::Tensor kv,
                      torch::Tensor write_index, torch::Tensor ctx_index, torch::Tensor ctx_lens,
                      int64_t H, int64_t KVH, int64_t F, double eps_d, int64_t num_threads,
                      std::vector<int64_t> kv_layers, int64_t arith) {
  decode_blocks_run(h, weights, fmts, qkv_bias, cos, sin, kv, write_index, ctx_index, ctx_lens, H, KVH, F, eps_d,
                    num_threads, kv_layers, arith);
}

void decode_blocks(torch::Tensor h, std::vector<torch::Tensor> weights, std::vector<int64_t> fmts,
                   std::vector<torch::Tensor> qkv_bias, torch::Tensor cos, torch::Tensor sin, torch::Tensor kv,
                   torch::Tensor write_index, torch::Tensor ctx_index, torch::Tensor ctx_lens,
                   int64_t H, int64_t KVH, int64_t F, double eps_d, int64_t num_threads) {
  decode_blocks_on(h, weights, fmts, qkv_bias, cos, sin, kv, write_index, ctx_index, ctx_lens, H, KVH, F, eps_d,
                   num_threads, {}, ARITH_FP32);
}

void moe_decode_blocks(torch::Tensor, std::vector<torch::Tensor>, std::vector<int64_t>, std::vector<torch::Tensor>,
                       std::vector<int64_t>, std::vector<torch::Tensor>, std::vector<int64_t>, torch::Tensor,
                       torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, int64_t, int64_t,
                       int64_t, int64_t, int64_t, int64_t, bool, double, int64_t, std::vector<int64_t>);  // MoE section, below

// Turns the paired path on or off where this build has it; returns whether it is on now.
bool set_paired_rows(bool on) {
  paired_rows_on = EDGELLM_PAIRED_ROWS && on;
  return paired_rows_on;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("set_paired_rows", &set_paired_rows,
        "two activation rows per 16-float vector in many-row matmuls (avx512 build only; same bits): on/off");
  m.def("block_matmul", &block_matmul, "x @ W.T for a block-quantised W (Q4_0, Q4_1, Q8_0, repacked Q4_K and Q6_K)");
  m.def("block_dequant", &block_dequant, "rows of a GGUF block-quantised matrix as float32");
  m.def("block_dequant_bf16", &block_dequant_bf16, "rows of a GGUF block-quantised matrix rounded to bfloat16");
  m.def("block_matmul_add", &block_matmul_add, "residual + x @ W.T for a block-quantised W");
  m.def("rope_qkv_write", &rope_qkv_write, "RoPE on q and k, k and v written to the KV cache");
  m.def("decode_attention", &decode_attention, "one-token attention over slot-addressed history");
  m.def("silu_mul", &silu_mul, "silu(gate) * up");
  m.def("decode_blocks", &decode_blocks, "every transformer block of a decode step, in one parallel region");
  m.def("decode_blocks_on", &decode_blocks_on, "chosen blocks of a decode step on chosen KV layers (a draft); arith 0 float32, 1 int8 activations, 2 bf16 dot products");
  // int8 activations (int8_activations.h)
  m.def("quantize_q8", &quantize_q8, "activation rows as int8 blocks of 32: (q, scale d, d * sum q)");
  m.def("block_matmul_q8", &block_matmul_q8, "x @ W.T with x quantised to int8 blocks, integer dot products");
  m.def("int8_dot_product", &int8_dot_product, "the integer dot product the int8 matmul uses here");
  m.def("int8_row_lanes", &int8_row_lanes,
        "whether block_matmul_q8 takes 16 weight rows a vector for this format here (then it beats rounding + BLAS at any row count)");
  // bf16 dot products (bf16_decode.h)
  m.def("bf16_dot_available", &bf16_dot_available, "whether block_matmul_bf16 runs here (avx512 build, AVX512_BF16)");
  m.def("block_matmul_bf16", &block_matmul_bf16, "x @ W.T with x and the weights rounded to bf16, vdpbf16ps");
  m.def("prefill_attention_bf16", &prefill_attention_bf16, "causal attention of a prefill chunk with bf16 dot products (bf16_attention.h)");
  m.def("moe_decode_blocks", &moe_decode_blocks, "every mixture-of-experts block of a decode step, in one parallel region");
}

// ==== mixture-of-experts decode step (edgellm/models/moe.py) ==================================
// Every block of a Mixtral / Qwen2-MoE / Qwen3-MoE decode step in one parallel region, as
// decode_blocks does for Llama's dense block: the attention half is the same (plus Qwen3-MoE's
// RMSNorm of each query and key head before RoPE), and the MLP is the sparse layer of
// models/moe.py. Run per layer as separate native calls, a step of a 16-expert model made ~40
// calls and as many tensor allocations per layer, which took three times llama.cpp's step.
//
// Routing is tiny ([rows, experts] logits), so every thread computes it privately and gets the
// same (row, expert) pairs, grouped by expert, without a barrier. Then only the chosen experts
// are read: the gate|up rows of all chosen experts (and the shared expert's) are shared out as
// one flat range among the threads; the down projections are shared by output column, so each
// thread adds its columns of every pair's weighted output into the residual without a race.

namespace moe {

struct Step {   // one layer's pairs: pair p is (row tok[p], weight w[p]), grouped by expert
  std::vector<int64_t> experts, first, tok;   // chosen experts in order, their first pair (+ end)
  std::vector<float> w;
};

// softmax over the experts, the n_used largest (ties: the lower index, a fixed rule), renormalised
// to sum to one when norm_top_k; then the pairs grouped by expert (a counting sort).
inline void route(const float* logits, int64_t B, int64_t E, int64_t n_used, bool norm_top_k, Step& s,
                  std::vector<float>& prob, std::vector<int64_t>& chosen, std::vector<float>& weight) {
  std::vector<int64_t> count(E, 0);
  for (int64_t b = 0; b < B; b++) {
    const float* lg = logits + b * E;
    float mx = -INFINITY, sum = 0.0f;
    for (int64_t e = 0; e < E; e++) mx = std::max(mx, lg[e]);
    for (int64_t e = 0; e < E; e++) { prob[e] = std::exp(lg[e] - mx); sum += prob[e]; }
    float kept = 0.0f;
    for (int64_t k = 0; k < n_used; k++) {
      int64_t best = -1;
      for (int64_t e = 0; e < E; e++)
        if (prob[e] >= 0.0f && (best < 0 || prob[e] > prob[best])) best = e;
      chosen[b * n_used + k] = best;
      weight[b * n_used + k] = prob[best] / sum;
      kept += prob[best] / sum;
      prob[best] = -1.0f;   // taken
      count[best]++;
    }
    if (norm_top_k)
      for (int64_t k = 0; k < n_used; k++) weight[b * n_used + k] /= kept;
  }
  s.experts.clear(); s.first.clear();
  std::vector<int64_t> next(E, 0);
  int64_t at = 0;
  for (int64_t e = 0; e < E; e++) {
    next[e] = at;
    if (count[e] == 0) continue;
    s.experts.push_back(e);
    s.first.push_back(at);
    at += count[e];
  }
  s.first.push_back(at);
  s.tok.assign(at, 0); s.w.assign(at, 0.0f);
  for (int64_t b = 0; b < B; b++)   // rows in order within each expert
    for (int64_t k = 0; k < n_used; k++) {
      const int64_t p = next[chosen[b * n_used + k]]++;
      s.tok[p] = b;
      s.w[p] = weight[b * n_used + k];
    }
}

inline void silu_mul_rows(const float* gu, float* out, int64_t M, int64_t F) {   // F % 8 == 0
  const __m256 one = _mm256_set1_ps(1.0f), neg = _mm256_set1_ps(-0.0f);
  for (int64_t m = 0; m < M; m++)
    for (int64_t i = 0; i < F; i += 8) {
      const __m256 g = _mm256_loadu_ps(gu + m * 2 * F + i);
      const __m256 den = _mm256_add_ps(one, exp8(_mm256_xor_ps(g, neg)));
      _mm256_storeu_ps(out + m * F + i, _mm256_mul_ps(_mm256_div_ps(g, den), _mm256_loadu_ps(gu + m * 2 * F + F + i)));
    }
}

inline const float* opt(const torch::Tensor& t) { return t.numel() ? t.data_ptr<float>() : nullptr; }

// Per layer l: attn[8 l ..] = attn_norm, qkv, qkv_bias|empty, q_norm|empty, k_norm|empty, o, ffn_norm,
// router (float32 [E, C] when fmts[3 l + 2] is -1, else blocks); fmts[3 l ..] = qkv, o, router;
// experts[2 E l ..] = gate|up of experts 0..E-1, then their down; expert_fmts alike;
// shared[3 l ..] = gate|up, down, gate vector [C] (all empty when S == 0); shared_fmts[2 l ..].
template <typename KV>
void decode_impl(torch::Tensor h, const std::vector<torch::Tensor>& attn, const std::vector<int64_t>& fmts,
                 const std::vector<torch::Tensor>& experts, const std::vector<int64_t>& expert_fmts,
                 const std::vector<torch::Tensor>& shared, const std::vector<int64_t>& shared_fmts,
                 torch::Tensor cos, torch::Tensor sin, torch::Tensor kv, torch::Tensor write_index,
                 torch::Tensor ctx_index, torch::Tensor ctx_lens, int64_t H, int64_t KVH, int64_t E, int64_t n_used,
                 int64_t F, int64_t S, bool norm_top_k, double eps_d, int nt, const std::vector<int64_t>& kv_layers) {
  const int64_t B = h.size(0), C = h.size(1), L = static_cast<int64_t>(attn.size()) / 8,
                n_slots = kv.size(2), D = kv.size(4);
  const int64_t G = H / KVH, Q = H * D, QKV = (H + 2 * KVH) * D, Lmax = ctx_index.size(1), P = B * n_used;
  const float eps = static_cast<float>(eps_d);
  const int64_t *WI = write_index.data_ptr<int64_t>(), *CI = ctx_index.data_ptr<int64_t>(),
                *CL = ctx_lens.data_ptr<int64_t>();
  float* Hp = h.data_ptr<float>();
  KV* KVp = kv.data_ptr<KV>();
  const float *COS = cos.data_ptr<float>(), *SIN = sin.data_ptr<float>();
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  constexpr int64_t RANGE_POSITIONS = 128, MAX_RANGES = 8;   // as decode_blocks: a row's cut is its own
  const int64_t pairs = B * KVH;
  std::vector<int64_t> ranges(B), first_item(B + 1, 0);
  for (int64_t b = 0; b < B; b++) {
    ranges[b] = std::max<int64_t>(1, std::min<int64_t>(MAX_RANGES, CL[b] / RANGE_POSITIONS));
    first_item[b + 1] = first_item[b] + KVH * ranges[b];
  }
  const int64_t n_items = first_item[B], part_stride = D + 2;
  const int64_t W = std::max(std::max(C, Q), std::max(F, S));
  std::vector<float> qkv(B * QKV), part(n_items * G * part_stride), gu(P * 2 * F), sgu(B * 2 * S);

#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num(), T = omp_get_num_threads();
    std::vector<float> xn(B * C), xs(std::max(B, P) * W / 32), scores(G * Lmax), qr(G * D), krow(D), kn(D);
    std::vector<float> attn_out(B * Q), logits(B * E), prob(E), weight(P), xg(P * C), act(P * F), tmp(P * C);
    std::vector<float> act_s(B * S), tmp_s(B * C);
    std::vector<int64_t> chosen(P);
    Step st;
    KVAhead ahead;
    kv_ahead = &ahead;
    for (int64_t l = 0; l < L; l++) {
      const torch::Tensor* a = &attn[8 * l];
      const float *attn_norm = a[0].data_ptr<float>(), *bias = opt(a[2]), *q_norm = opt(a[3]), *k_norm = opt(a[4]),
                  *ffn_norm = a[6].data_ptr<float>();
      const int64_t kl = kv_layers.empty() ? l : kv_layers[l];
      KV* KC = KVp + (kl * 2 + 0) * n_slots * KVH * D;
      KV* VC = KVp + (kl * 2 + 1) * n_slots * KVH * D;
      // 1. qkv = norm(h) @ Wqkv.T (my rows)
      for (int64_t b = 0; b < B; b++) rms_norm(Hp + b * C, attn_norm, xn.data() + b * C, C, eps);
      block_sums(xn.data(), B, C, xs.data());
      Share s = share(QKV, t, T);
      matmul_range_fmt<false>(fmts[3 * l], xn.data(), xs.data(), a[1].data_ptr<uint8_t>(), qkv.data(), B, QKV, C,
                              s.n0, s.n1);
#pragma omp barrier
      // 2a. per (row, KV head): the key (+ bias, head norm), RoPE, written with the value
      for (int64_t pair = t; pair < pairs; pair += T) {
        const int64_t b = pair / KVH, g = pair % KVH;
        const float *x = qkv.data() + b * QKV, *c = COS + b * D, *sn = SIN + b * D;
        for (int64_t i = 0; i < D; i++) kn[i] = x[Q + g * D + i] + (bias ? bias[Q + g * D + i] : 0.0f);
        if (k_norm) rms_norm(kn.data(), k_norm, kn.data(), D, eps);
        rope_head(kn.data(), nullptr, c, sn, krow.data(), D);
        store_row(krow.data(), KC + (WI[b] * KVH + g) * D, D);
        for (int64_t i = 0; i < D; i++) krow[i] = x[Q + KVH * D + g * D + i] + (bias ? bias[Q + KVH * D + g * D + i] : 0.0f);
        store_row(krow.data(), VC + (WI[b] * KVH + g) * D, D);
      }
#pragma omp barrier
      // 2b. attention partials per (row, KV head, position range), queries normed and rotated here
      const Share mine = share(n_items, t, T);
      for (int64_t item = mine.n0; item < mine.n1; item++) {
        const KVItem it = kv_item(first_item, ranges, KVH, item, mine.n0);
        const int64_t b = it.b, g = it.g, r = it.r, R = ranges[b], len = CL[b];
        const int64_t p0 = len * r / R, p1 = len * (r + 1) / R;
        const float *x = qkv.data() + b * QKV, *c = COS + b * D, *sn = SIN + b * D;
        for (int64_t j = 0; j < G; j++) {
          const int64_t head = g * G + j;
          for (int64_t i = 0; i < D; i++) kn[i] = x[head * D + i] + (bias ? bias[head * D + i] : 0.0f);
          if (q_norm) rms_norm(kn.data(), q_norm, kn.data(), D, eps);
          rope_head(kn.data(), nullptr, c, sn, qr.data() + j * D, D);
        }
        attend_range<KV>(qr.data(), KC, VC, CI + b * Lmax, p0, p1, KVH, g, G, D, scale, scores.data(),
                         part.data() + ((first_item[b] + g * R) * G + r) * part_stride, R * part_stride, it.whole_rows);
      }
#pragma omp barrier
      ahead.spans.clear();   // the next layer's KV rows, asked for during this layer's matmuls
      if (l + 1 < L) {
        const int64_t kn = kv_layers.empty() ? l + 1 : kv_layers[l + 1];
        plan_kv_ahead(ahead, KVp + (kn * 2 + 0) * n_slots * KVH * D, KVp + (kn * 2 + 1) * n_slots * KVH * D, KVH, D,
                      first_item, ranges, CL, CI, Lmax, mine, (2 * C + QKV) / T);
      }
      // 3. merge the partials (every thread, privately), h += attn @ Wo.T (my rows)
      for (int64_t pair = 0; pair < pairs; pair++) {
        const int64_t b = pair / KVH, g = pair % KVH, R = ranges[b];
        for (int64_t j = 0; j < G; j++)
          merge_partials(part.data() + ((first_item[b] + g * R) * G + j * R) * part_stride, R, part_stride, D,
                         attn_out.data() + b * Q + (g * G + j) * D);
      }
      block_sums(attn_out.data(), B, Q, xs.data());
      s = share(C, t, T);
      matmul_range_fmt<true>(fmts[3 * l + 1], attn_out.data(), xs.data(), a[5].data_ptr<uint8_t>(), Hp, B, C, Q,
                             s.n0, s.n1);
#pragma omp barrier
      // 4. x = norm(h); the router (every thread); gate|up of the chosen experts and the shared one
      for (int64_t b = 0; b < B; b++) rms_norm(Hp + b * C, ffn_norm, xn.data() + b * C, C, eps);
      if (fmts[3 * l + 2] < 0) {
        const float* R = a[7].data_ptr<float>();
        for (int64_t b = 0; b < B; b++)
          for (int64_t e = 0; e < E; e++) {
            __m256 acc = _mm256_setzero_ps();
            for (int64_t i = 0; i < C; i += 8)
              acc = _mm256_fmadd_ps(_mm256_loadu_ps(xn.data() + b * C + i), _mm256_loadu_ps(R + e * C + i), acc);
            logits[b * E + e] = hsum(acc);
          }
      } else {
        block_sums(xn.data(), B, C, xs.data());
        matmul_range_fmt<false>(fmts[3 * l + 2], xn.data(), xs.data(), a[7].data_ptr<uint8_t>(), logits.data(), B, E,
                                C, 0, E);
      }
      route(logits.data(), B, E, n_used, norm_top_k, st, prob, chosen, weight);
      const int64_t n_chosen = static_cast<int64_t>(st.experts.size());
      for (int64_t p = 0; p < P; p++) std::memcpy(xg.data() + p * C, xn.data() + st.tok[p] * C, C * sizeof(float));
      block_sums(xg.data(), P, C, xs.data());
      const int64_t rows = n_chosen * 2 * F + 2 * S;   // one flat range: every chosen expert's rows, then the shared
      s = share(rows, t, T);
      for (int64_t j = 0; j < n_chosen && s.n0 < s.n1; j++) {
        const int64_t r0 = std::max<int64_t>(s.n0 - j * 2 * F, 0), r1 = std::min<int64_t>(s.n1 - j * 2 * F, 2 * F);
        if (r0 >= r1) continue;
        const int64_t e = st.experts[j], p0 = st.first[j], cnt = st.first[j + 1] - p0;
        matmul_range_fmt<false>(expert_fmts[2 * E * l + e], xg.data() + p0 * C, xs.data() + p0 * (C / 32),
                                experts[2 * E * l + e].data_ptr<uint8_t>(), gu.data() + p0 * 2 * F, cnt, 2 * F, C,
                                r0, r1);
      }
      if (S > 0) {
        const int64_t base = n_chosen * 2 * F;
        const int64_t r0 = std::max<int64_t>(s.n0 - base, 0), r1 = std::min<int64_t>(s.n1 - base, 2 * S);
        if (r0 < r1) {
          block_sums(xn.data(), B, C, xs.data());
          matmul_range_fmt<false>(shared_fmts[2 * l], xn.data(), xs.data(), shared[3 * l].data_ptr<uint8_t>(),
                                  sgu.data(), B, 2 * S, C, r0, r1);
        }
      }
#pragma omp barrier
      // 5. h += sum over pairs of weight * (silu(gate) * up) @ Wdown.T, my columns of h
      s = share(C, t, T);
      silu_mul_rows(gu.data(), act.data(), P, F);
      block_sums(act.data(), P, F, xs.data());
      for (int64_t j = 0; j < n_chosen; j++) {
        const int64_t e = st.experts[j], p0 = st.first[j], cnt = st.first[j + 1] - p0;
        matmul_range_fmt<false>(expert_fmts[2 * E * l + E + e], act.data() + p0 * F, xs.data() + p0 * (F / 32),
                                experts[2 * E * l + E + e].data_ptr<uint8_t>(), tmp.data() + p0 * C, cnt, C, F,
                                s.n0, s.n1);
        for (int64_t p = p0; p < p0 + cnt; p++) {
          float *hr = Hp + st.tok[p] * C, *o = tmp.data() + p * C;
          for (int64_t n = s.n0; n < s.n1; n++) hr[n] += st.w[p] * o[n];
        }
      }
      if (S > 0) {   // Qwen2-MoE: + sigmoid(x . gate) * the shared expert's output
        silu_mul_rows(sgu.data(), act_s.data(), B, S);
        block_sums(act_s.data(), B, S, xs.data());
        matmul_range_fmt<false>(shared_fmts[2 * l + 1], act_s.data(), xs.data(), shared[3 * l + 1].data_ptr<uint8_t>(),
                                tmp_s.data(), B, C, S, s.n0, s.n1);
        const float* sg = shared[3 * l + 2].data_ptr<float>();
        for (int64_t b = 0; b < B; b++) {
          float dot = 0.0f;
          for (int64_t i = 0; i < C; i++) dot += xn[b * C + i] * sg[i];
          const float gate = 1.0f / (1.0f + std::exp(-dot));
          for (int64_t n = s.n0; n < s.n1; n++) Hp[b * C + n] += gate * tmp_s[b * C + n];
        }
      }
#pragma omp barrier
    }
    kv_ahead = nullptr;
  }
}

}  // namespace moe

void moe_decode_blocks(torch::Tensor h, std::vector<torch::Tensor> attn, std::vector<int64_t> fmts,
                       std::vector<torch::Tensor> experts, std::vector<int64_t> expert_fmts,
                       std::vector<torch::Tensor> shared, std::vector<int64_t> shared_fmts, torch::Tensor cos,
                       torch::Tensor sin, torch::Tensor kv, torch::Tensor write_index, torch::Tensor ctx_index,
                       torch::Tensor ctx_lens, int64_t H, int64_t KVH, int64_t E, int64_t n_used, int64_t F,
                       int64_t S, bool norm_top_k, double eps, int64_t num_threads, std::vector<int64_t> kv_layers) {
  TORCH_CHECK(h.is_contiguous() && h.scalar_type() == torch::kFloat32, "h must be contiguous float32");
  TORCH_CHECK(kv.is_contiguous() && (kv.scalar_type() == torch::kFloat32 || kv.scalar_type() == torch::kHalf),
              "KV cache must be contiguous float32 or float16");
  const int nt = num_threads > 0 ? static_cast<int>(num_threads) : at::get_num_threads();
  cos = cos.contiguous(); sin = sin.contiguous();
  write_index = write_index.contiguous(); ctx_index = ctx_index.contiguous(); ctx_lens = ctx_lens.contiguous();
  const int64_t B = h.size(0), C = h.size(1), L = static_cast<int64_t>(attn.size()) / 8, n_slots = kv.size(2),
                D = kv.size(4), Q = H * D, QKV = (H + 2 * KVH) * D, Lmax = ctx_index.size(1);
  TORCH_CHECK(static_cast<int64_t>(attn.size()) == 8 * L && static_cast<int64_t>(fmts.size()) == 3 * L &&
              static_cast<int64_t>(experts.size()) == 2 * E * L && static_cast<int64_t>(expert_fmts.size()) == 2 * E * L &&
              static_cast<int64_t>(shared.size()) == 3 * L && static_cast<int64_t>(shared_fmts.size()) == 2 * L,
              "per-layer argument lists do not match the number of layers");
  TORCH_CHECK(kv_layers.empty() ? L == kv.size(0) : static_cast<int64_t>(kv_layers.size()) == L,
              "one KV layer per block");
  for (int64_t kl : kv_layers) TORCH_CHECK(kl >= 0 && kl < kv.size(0), "KV layer out of range");
  TORCH_CHECK(C % 32 == 0 && F % 32 == 0 && S % 32 == 0 && Q % 32 == 0 && D % 8 == 0, "widths must be multiples of 32");
  TORCH_CHECK(1 <= n_used && n_used <= E, "experts used must be between 1 and the number of experts");
  for (int64_t l = 0; l < L; l++) {
    check(attn[8 * l + 1], fmts[3 * l], QKV, C);
    check(attn[8 * l + 5], fmts[3 * l + 1], C, Q);
    if (fmts[3 * l + 2] < 0) {
      TORCH_CHECK(attn[8 * l + 7].scalar_type() == torch::kFloat32 && attn[8 * l + 7].is_contiguous() &&
                  attn[8 * l + 7].numel() == E * C, "a float router must be contiguous float32 [experts, hidden]");
    } else {
      check(attn[8 * l + 7], fmts[3 * l + 2], E, C);
    }
    for (int64_t i : {0, 2, 3, 4, 6}) {
      const auto& v = attn[8 * l + i];
      const int64_t want = i == 0 || i == 6 ? C : i == 2 ? QKV : D;
      TORCH_CHECK(v.numel() == 0 || (v.scalar_type() == torch::kFloat32 && v.is_contiguous() && v.numel() == want),
                  "norm weights and biases must be contiguous float32 of their width");
    }
    TORCH_CHECK(attn[8 * l].numel() == C && attn[8 * l + 6].numel() == C, "every block needs its two norms");
    for (int64_t e = 0; e < E; e++) {
      check(experts[2 * E * l + e], expert_fmts[2 * E * l + e], 2 * F, C);
      check(experts[2 * E * l + E + e], expert_fmts[2 * E * l + E + e], C, F);
    }
    if (S > 0) {
      check(shared[3 * l], shared_fmts[2 * l], 2 * S, C);
      check(shared[3 * l + 1], shared_fmts[2 * l + 1], C, S);
      TORCH_CHECK(shared[3 * l + 2].scalar_type() == torch::kFloat32 && shared[3 * l + 2].numel() == C &&
                  shared[3 * l + 2].is_contiguous(), "the shared expert's gate must be contiguous float32 [hidden]");
    }
  }
  const int64_t *WI = write_index.data_ptr<int64_t>(), *CI = ctx_index.data_ptr<int64_t>(),
                *CL = ctx_lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; b++) {
    TORCH_CHECK(CL[b] >= 1 && CL[b] <= Lmax && WI[b] >= 0 && WI[b] < n_slots, "bad slot or length");
    for (int64_t i = 0; i < CL[b]; i++) TORCH_CHECK(CI[b * Lmax + i] >= 0 && CI[b * Lmax + i] < n_slots, "bad slot");
  }
  if (kv.scalar_type() == torch::kHalf)
    moe::decode_impl<at::Half>(h, attn, fmts, experts, expert_fmts, shared, shared_fmts, cos, sin, kv, write_index,
                               ctx_index, ctx_lens, H, KVH, E, n_used, F, S, norm_top_k, eps, nt, kv_layers);
  else
    moe::decode_impl<float>(h, attn, fmts, experts, expert_fmts, shared, shared_fmts, cos, sin, kv, write_index,
                            ctx_index, ctx_lens, H, KVH, E, n_used, F, S, norm_top_k, eps, nt, kv_layers);
}
