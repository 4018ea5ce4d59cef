// Weight-only int8 and int4 products for relat's frozen linear layers on the CPU (relat_core/quantized.py).
//
// Why our own: torch's `_weight_int8pack_mm` and `_weight_int4pack_mm_for_cpu` ran 2-6x slower than the fp32
// product on this project's AVX2 CPU, even at one row (bench/RESULTS.md, section 22). These loops read each weight
// byte once per call and convert it to fp32 in registers, once for up to 8 rows of x: bandwidth-bound at the few
// rows relat's latent and decoding steps multiply. AVX2 + FMA intrinsics where the compiler targets them (-mavx2
// -mfma, set by quantized.py when torch reports AVX2), plain loops elsewhere. Threads: ATen's pool
// (at::parallel_for).
//
// int8: q (N, K) int8, s (N) fp32, W = s[:, None] * q.
// int4: p (N, K/2) uint8, groups of 32 along K; in a group's 16 bytes, byte j holds element j in its low nibble and
//       element j + 16 in its high nibble; s, z (N, K/32) fp32, W[o, i] = s[o, g] * q[o, i] + z[o, g], g = i / 32.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define RELAT_AVX2 1
#endif

namespace {

constexpr int64_t kGroup = 32;

#ifdef RELAT_AVX2
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 8 int8 weights as fp32.
inline __m256 int8_vector(const int8_t* q) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q))));
}

// The 32 weights of one int4 group, dequantised (q * s + z), as 4 vectors of 8 in order.
inline void int4_group(const uint8_t* b, float scale, float zero, __m256 w[4]) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b));
  const __m128i mask = _mm_set1_epi8(15);
  const __m128i low = _mm_and_si128(bytes, mask), high = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
  const __m256 s = _mm256_set1_ps(scale), z = _mm256_set1_ps(zero);
  w[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(low)), s, z);
  w[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(low, 8))), s, z);
  w[2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(high)), s, z);
  w[3] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(high, 8))), s, z);
}
#endif

// R rows of x (row stride k) against one stored int8 row q: out[r] = x[r] . q (the scale is applied by the caller).
// Each weight is loaded and converted once for the R rows; U independent sums per row hide the FMA's latency.
template <int R, int U>
inline void int8_dots(const float* x, int64_t k, const int8_t* q, float* out) {
  int64_t i = 0;
#ifdef RELAT_AVX2
  __m256 acc[R][U];
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < U; ++u) acc[r][u] = _mm256_setzero_ps();
  for (; i + 8 * U <= k; i += 8 * U)
    for (int u = 0; u < U; ++u) {
      const __m256 w = int8_vector(q + i + 8 * u);
      for (int r = 0; r < R; ++r) acc[r][u] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * k + i + 8 * u), w, acc[r][u]);
    }
  for (int r = 0; r < R; ++r) {
    for (int u = 1; u < U; ++u) acc[r][0] = _mm256_add_ps(acc[r][0], acc[r][u]);
    out[r] = hsum(acc[r][0]);
  }
#else
  for (int r = 0; r < R; ++r) out[r] = 0;
#endif
  for (; i < k; ++i)
    for (int r = 0; r < R; ++r) out[r] += x[r * k + i] * static_cast<float>(q[i]);
}

// One row of W as fp32 (int8: without its scale, applied to the dot products).
inline void int8_row(const int8_t* q, float* out, int64_t k) {
  for (int64_t i = 0; i < k; ++i) out[i] = static_cast<float>(q[i]);
}

inline void int4_row(const uint8_t* p, const float* s, const float* z, float* out, int64_t k) {
  for (int64_t g = 0; g < k / kGroup; ++g) {
    const uint8_t* b = p + g * (kGroup / 2);
    float* w = out + g * kGroup;
#ifdef RELAT_AVX2
    __m256 v[4];
    int4_group(b, s[g], z[g], v);
    for (int j = 0; j < 4; ++j) _mm256_storeu_ps(w + 8 * j, v[j]);
#else
    const float scale = s[g], zero = z[g];
    for (int j = 0; j < kGroup / 2; ++j) w[j] = static_cast<float>(b[j] & 15) * scale + zero;
    for (int j = 0; j < kGroup / 2; ++j) w[j + kGroup / 2] = static_cast<float>(b[j] >> 4) * scale + zero;
#endif
  }
}

// R rows of x against one stored int4 row: out[r] = x[r] . (q * s + z), the group dequantised in registers once
// for the R rows.
template <int R, int U>
inline void int4_dots(const float* x, int64_t k, const uint8_t* p, const float* s, const float* z, float* out) {
  const int64_t groups = k / kGroup;
#ifdef RELAT_AVX2
  __m256 acc[R][U];
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < U; ++u) acc[r][u] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m256 w[4];
    int4_group(p + g * (kGroup / 2), s[g], z[g], w);
    for (int j = 0; j < 4; ++j)
      for (int r = 0; r < R; ++r)
        acc[r][j % U] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * k + g * kGroup + 8 * j), w[j], acc[r][j % U]);
  }
  for (int r = 0; r < R; ++r) {
    for (int u = 1; u < U; ++u) acc[r][0] = _mm256_add_ps(acc[r][0], acc[r][u]);
    out[r] = hsum(acc[r][0]);
  }
#else
  float row[kGroup];
  for (int r = 0; r < R; ++r) out[r] = 0;
  for (int64_t g = 0; g < groups; ++g) {
    int4_row(p + g * (kGroup / 2), s + g, z + g, row, kGroup);
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < kGroup; ++j) out[r] += x[r * k + g * kGroup + j] * row[j];
  }
#endif
}

// Rows are taken 8 at a time (the last block 1-7), each weight converted once per block: 8 rows x 1 sum (or 4 x 2,
// 2 x 4, 1 x 4 independent sums, enough to hide the FMA's latency) fit the 16 vector registers beside the weights'.
template <typename Dots>
inline void row_blocks(int64_t m_rows, Dots dots) {
  int64_t m = 0;
  for (; m + 8 <= m_rows; m += 8) dots(m, std::integral_constant<int, 8>{});
  switch (m_rows - m) {
    case 7: dots(m, std::integral_constant<int, 7>{}); break;
    case 6: dots(m, std::integral_constant<int, 6>{}); break;
    case 5: dots(m, std::integral_constant<int, 5>{}); break;
    case 4: dots(m, std::integral_constant<int, 4>{}); break;
    case 3: dots(m, std::integral_constant<int, 3>{}); break;
    case 2: dots(m, std::integral_constant<int, 2>{}); break;
    case 1: dots(m, std::integral_constant<int, 1>{}); break;
    default: break;
  }
}

constexpr int unroll(int rows) { return rows <= 2 ? 4 : rows <= 4 ? 2 : 1; }

// dx[:, i0:i0+width] += c W[:, i0:i0+width] (c: (M, N) coefficients, dx: (M, K)), W's rows converted by
// `fill(o, row)` four at a time into a small buffer: each row of dx is then loaded and stored once per four rows of
// W rather than once per row (stores, not loads, bound this loop).
template <typename Fill>
void accumulate_rows(const float* c, float* dx, int64_t m_rows, int64_t n, int64_t k, int64_t i0, int64_t width,
                     Fill fill) {
  constexpr int64_t kBlock = 4;
  std::vector<float> buffer(kBlock * width);
  float* rows[kBlock];
  for (int64_t b = 0; b < kBlock; ++b) rows[b] = buffer.data() + b * width;
  int64_t o = 0;
  for (; o + kBlock <= n; o += kBlock) {
    for (int64_t b = 0; b < kBlock; ++b) fill(o + b, rows[b]);
    for (int64_t m = 0; m < m_rows; ++m) {
      const float* cm = c + m * n + o;
      const float c0 = cm[0], c1 = cm[1], c2 = cm[2], c3 = cm[3];
      const float *r0 = rows[0], *r1 = rows[1], *r2 = rows[2], *r3 = rows[3];
      float* d = dx + m * k + i0;
      for (int64_t i = 0; i < width; ++i) d[i] += c0 * r0[i] + c1 * r1[i] + c2 * r2[i] + c3 * r3[i];
    }
  }
  for (; o < n; ++o) {
    fill(o, rows[0]);
    for (int64_t m = 0; m < m_rows; ++m) {
      const float coef = c[m * n + o];
      float* d = dx + m * k + i0;
      for (int64_t i = 0; i < width; ++i) d[i] += coef * rows[0][i];
    }
  }
}

void check(const torch::Tensor& x, const torch::Tensor& w, int64_t k) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(), "x: contiguous fp32 (M, K)");
  TORCH_CHECK(k % kGroup == 0 || w.scalar_type() == torch::kChar, "K must be a multiple of ", kGroup);
  TORCH_CHECK(x.size(1) == k, "x has ", x.size(1), " columns, the weight ", k);
  TORCH_CHECK(w.is_contiguous(), "the weight must be contiguous");
}

}  // namespace

// y = x W^T (M, N)
torch::Tensor int8_forward(torch::Tensor x, torch::Tensor q, torch::Tensor s) {
  const int64_t m_rows = x.size(0), k = q.size(1), n = q.size(0);
  check(x, q, k);
  auto y = torch::empty({m_rows, n}, x.options());
  const float* xp = x.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = s.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, n, 16, [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o)
      row_blocks(m_rows, [&](int64_t m, auto rows) {
        constexpr int R = decltype(rows)::value;
        float dots[R];
        int8_dots<R, unroll(R)>(xp + m * k, k, qp + o * k, dots);
        for (int r = 0; r < R; ++r) yp[(m + r) * n + o] = dots[r] * sp[o];
      });
  });
  return y;
}

// dx = dy W (M, K): the columns split among threads, each reading every row of W over its columns.
torch::Tensor int8_backward(torch::Tensor dy, torch::Tensor q, torch::Tensor s) {
  const int64_t m_rows = dy.size(0), n = q.size(0), k = q.size(1);
  TORCH_CHECK(dy.dim() == 2 && dy.scalar_type() == torch::kFloat && dy.is_contiguous() && dy.size(1) == n,
              "dy: contiguous fp32 (M, N)");
  TORCH_CHECK(q.is_contiguous(), "the weight must be contiguous");
  auto scaled = (dy * s).contiguous();  // (dy * s) q: the scale is per output of the forward, a row of W
  auto dx = torch::zeros({m_rows, k}, dy.options());
  const float* cp = scaled.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  float* dp = dx.data_ptr<float>();
  at::parallel_for(0, k, 64, [&](int64_t i0, int64_t i1) {
    accumulate_rows(cp, dp, m_rows, n, k, i0, i1 - i0,
                    [&](int64_t o, float* row) { int8_row(qp + o * k + i0, row, i1 - i0); });
  });
  return dx;
}

torch::Tensor int4_forward(torch::Tensor x, torch::Tensor p, torch::Tensor s, torch::Tensor z) {
  const int64_t m_rows = x.size(0), n = p.size(0), k = p.size(1) * 2, groups = k / kGroup;
  check(x, p, k);
  auto y = torch::empty({m_rows, n}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint8_t* pp = p.data_ptr<uint8_t>();
  const float* sp = s.data_ptr<float>();
  const float* zp = z.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, n, 16, [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o)
      row_blocks(m_rows, [&](int64_t m, auto rows) {
        constexpr int R = decltype(rows)::value;
        float dots[R];
        int4_dots<R, unroll(R)>(xp + m * k, k, pp + o * (k / 2), sp + o * groups, zp + o * groups, dots);
        for (int r = 0; r < R; ++r) yp[(m + r) * n + o] = dots[r];
      });
  });
  return y;
}

// dx = dy W: the groups split among threads.
torch::Tensor int4_backward(torch::Tensor dy, torch::Tensor p, torch::Tensor s, torch::Tensor z) {
  const int64_t m_rows = dy.size(0), n = p.size(0), k = p.size(1) * 2, groups = k / kGroup;
  TORCH_CHECK(dy.dim() == 2 && dy.scalar_type() == torch::kFloat && dy.is_contiguous() && dy.size(1) == n,
              "dy: contiguous fp32 (M, N)");
  auto dx = torch::zeros({m_rows, k}, dy.options());
  const float* cp = dy.data_ptr<float>();
  const uint8_t* pp = p.data_ptr<uint8_t>();
  const float* sp = s.data_ptr<float>();
  const float* zp = z.data_ptr<float>();
  float* dp = dx.data_ptr<float>();
  at::parallel_for(0, groups, 2, [&](int64_t g0, int64_t g1) {
    const int64_t i0 = g0 * kGroup, width = (g1 - g0) * kGroup;
    accumulate_rows(cp, dp, m_rows, n, k, i0, width, [&](int64_t o, float* row) {
      int4_row(pp + o * (k / 2) + i0 / 2, sp + o * groups + g0, zp + o * groups + g0, row, width);
    });
  });
  return dx;
}

// W as fp32 (N, K) written into `w`, for the products of many rows, which run on torch's fp32 kernels. The caller
// passes a scratch matrix it keeps (quantized.py): a fresh one per product page-faults its every page in.
void check_out(const torch::Tensor& w, int64_t n, int64_t k) {
  TORCH_CHECK(w.scalar_type() == torch::kFloat && w.is_contiguous() && w.dim() == 2 && w.size(0) == n &&
                  w.size(1) == k, "out: contiguous fp32 (", n, ", ", k, ")");
}

torch::Tensor int8_dequantize(torch::Tensor q, torch::Tensor s, torch::Tensor w) {
  const int64_t n = q.size(0), k = q.size(1);
  check_out(w, n, k);
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = s.data_ptr<float>();
  float* wp = w.data_ptr<float>();
  at::parallel_for(0, n, 16, [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o)
      for (int64_t i = 0; i < k; ++i) wp[o * k + i] = static_cast<float>(qp[o * k + i]) * sp[o];
  });
  return w;
}

torch::Tensor int4_dequantize(torch::Tensor p, torch::Tensor s, torch::Tensor z, torch::Tensor w) {
  const int64_t n = p.size(0), k = p.size(1) * 2, groups = k / kGroup;
  check_out(w, n, k);
  const uint8_t* pp = p.data_ptr<uint8_t>();
  const float* sp = s.data_ptr<float>();
  const float* zp = z.data_ptr<float>();
  float* wp = w.data_ptr<float>();
  at::parallel_for(0, n, 16, [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o) int4_row(pp + o * (k / 2), sp + o * groups, zp + o * groups, wp + o * k, k);
  });
  return w;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("int8_forward", &int8_forward);
  module.def("int8_backward", &int8_backward);
  module.def("int4_forward", &int4_forward);
  module.def("int4_backward", &int4_backward);
  module.def("int8_dequantize", &int8_dequantize);
  module.def("int4_dequantize", &int4_dequantize);
}
