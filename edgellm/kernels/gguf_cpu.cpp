// Native CPU kernels for GGUF block-quantised weights (AVX2 + FMA + F16C).
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
// In a nibble byte i, the low nibble is element i and the high nibble element i + 16.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstdint>
#include <vector>

namespace {

enum Format { Q4_0 = 0, Q4_1 = 1, Q8_0 = 2 };

inline int block_bytes(int64_t fmt) { return fmt == Q4_0 ? 18 : fmt == Q4_1 ? 20 : 34; }

inline float fp16(const uint8_t* p) { return _cvtsh_ss(*reinterpret_cast<const uint16_t*>(p)); }

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(s);
}

// The 32 integer values of one block as four vectors of 8 floats, plus its scale and offset.
struct Block {
  __m256 v[4];
  float d, m;
};

inline void unpack_nibbles(const uint8_t* qs, __m256* v) {
  const __m128i mask = _mm_set1_epi8(0x0F);
  __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  __m128i lo = _mm_and_si128(q, mask);
  __m128i hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
  v[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
  v[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
  v[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
  v[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
}

template <int FMT>
inline void load_block(const uint8_t* blk, Block& b) {
  b.d = fp16(blk);
  if (FMT == Q4_1) {
    b.m = fp16(blk + 2);
    unpack_nibbles(blk + 4, b.v);
  } else if (FMT == Q4_0) {
    b.m = -8.0f * b.d;  // d * (q - 8) = d * q + (-8 d)
    unpack_nibbles(blk + 2, b.v);
  } else {
    b.m = 0.0f;
    __m128i q0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 2));
    __m128i q1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 18));
    b.v[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q0));
    b.v[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q0, 8)));
    b.v[2] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q1));
    b.v[3] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q1, 8)));
  }
}

// out[m, n] = sum_k x[m, k] * w[n, k] for a few rows of x (decode, small batches).
// Each block contributes d * dot(q, x_blk) + m * sum(x_blk); the block sums of x are computed once.
template <int FMT>
void matmul_rows(const float* X, const uint8_t* W, float* O, int64_t M, int64_t N, int64_t K) {
  const int64_t nb = K / 32;
  const int bb = block_bytes(FMT);
  std::vector<float> xsum(M * nb, 0.0f);
  if (FMT != Q8_0)
    for (int64_t i = 0; i < M; i++)
      for (int64_t b = 0; b < nb; b++) {
        __m256 s = _mm256_loadu_ps(X + i * K + b * 32);
        for (int j = 1; j < 4; j++) s = _mm256_add_ps(s, _mm256_loadu_ps(X + i * K + b * 32 + 8 * j));
        xsum[i * nb + b] = hsum(s);
      }
  constexpr int TILE = 4;  // rows of x sharing each unpacked block
  at::parallel_for(0, N, 8, [&](int64_t n0, int64_t n1) {
    Block blk;
    for (int64_t n = n0; n < n1; n++) {
      const uint8_t* row = W + n * nb * bb;
      for (int64_t m0 = 0; m0 < M; m0 += TILE) {
        const int mt = static_cast<int>(std::min<int64_t>(TILE, M - m0));
        __m256 acc[TILE];
        float off[TILE];
        for (int i = 0; i < TILE; i++) { acc[i] = _mm256_setzero_ps(); off[i] = 0.0f; }
        for (int64_t b = 0; b < nb; b++) {
          load_block<FMT>(row + b * bb, blk);
          const __m256 d = _mm256_set1_ps(blk.d);
          for (int i = 0; i < mt; i++) {
            const float* xp = X + (m0 + i) * K + b * 32;
            __m256 t = _mm256_mul_ps(blk.v[0], _mm256_loadu_ps(xp));
            t = _mm256_fmadd_ps(blk.v[1], _mm256_loadu_ps(xp + 8), t);
            t = _mm256_fmadd_ps(blk.v[2], _mm256_loadu_ps(xp + 16), t);
            t = _mm256_fmadd_ps(blk.v[3], _mm256_loadu_ps(xp + 24), t);
            acc[i] = _mm256_fmadd_ps(d, t, acc[i]);
            if (FMT != Q8_0) off[i] += blk.m * xsum[(m0 + i) * nb + b];
          }
        }
        for (int i = 0; i < mt; i++) O[(m0 + i) * N + n] = hsum(acc[i]) + off[i];
      }
    }
  });
}

template <int FMT>
void dequant_rows(const uint8_t* W, float* O, int64_t N, int64_t K) {
  const int64_t nb = K / 32;
  const int bb = block_bytes(FMT);
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    Block blk;
    for (int64_t n = n0; n < n1; n++)
      for (int64_t b = 0; b < nb; b++) {
        load_block<FMT>(W + (n * nb + b) * bb, blk);
        const __m256 d = _mm256_set1_ps(blk.d), m = _mm256_set1_ps(blk.m);
        float* o = O + n * K + b * 32;
        for (int j = 0; j < 4; j++) _mm256_storeu_ps(o + 8 * j, _mm256_fmadd_ps(d, blk.v[j], m));
      }
  });
}

void check(const torch::Tensor& w, int64_t fmt, int64_t N, int64_t K) {
  TORCH_CHECK(fmt >= 0 && fmt <= 2, "unknown block format ", fmt);
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
  if (fmt == Q4_0) matmul_rows<Q4_0>(X, W, O, M, N, K);
  else if (fmt == Q4_1) matmul_rows<Q4_1>(X, W, O, M, N, K);
  else matmul_rows<Q8_0>(X, W, O, M, N, K);
  return out;
}

// Dequantise rows [r0, r1) of an [N, K] matrix into float32 (prefill: then one sgemm).
torch::Tensor block_dequant(torch::Tensor w, int64_t fmt, int64_t N, int64_t K, int64_t r0, int64_t r1) {
  check(w, fmt, N, K);
  TORCH_CHECK(0 <= r0 && r0 <= r1 && r1 <= N, "row range out of bounds");
  auto out = torch::empty({r1 - r0, K}, torch::kFloat32);
  const uint8_t* W = w.data_ptr<uint8_t>() + r0 * (K / 32) * block_bytes(fmt);
  float* O = out.data_ptr<float>();
  if (fmt == Q4_0) dequant_rows<Q4_0>(W, O, r1 - r0, K);
  else if (fmt == Q4_1) dequant_rows<Q4_1>(W, O, r1 - r0, K);
  else dequant_rows<Q8_0>(W, O, r1 - r0, K);
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("block_matmul", &block_matmul, "x @ W.T for a GGUF block-quantised W (Q4_0, Q4_1, Q8_0)");
  m.def("block_dequant", &block_dequant, "rows of a GGUF block-quantised matrix as float32");
}
