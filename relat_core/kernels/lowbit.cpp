// Weight-only int8 and int4 products for relat's frozen linear layers on the CPU (relat_core/quantized.py).
//
// Why our own: torch's `_weight_int8pack_mm` and `_weight_int4pack_mm_for_cpu` ran 2-6x slower than the fp32
// product on this project's AVX2 CPU, even at one row (bench/RESULTS.md, section 22). These loops read each weight
// byte once per call, convert it to fp32 in registers, and are bandwidth-bound at the few rows relat's latent and
// decoding steps multiply; the compiler vectorises them (-O3 -mavx2 -mfma). Threads: ATen's pool (at::parallel_for).
//
// int8: q (N, K) int8, s (N) fp32, W = s[:, None] * q.
// int4: p (N, K/2) uint8, groups of 32 along K; in a group's 16 bytes, byte j holds element j in its low nibble and
//       element j + 16 in its high nibble; s, z (N, K/32) fp32, W[o, i] = s[o, g] * q[o, i] + z[o, g], g = i / 32.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kGroup = 32;

inline float dot(const float* a, const float* b, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
  float total = 0;
  for (int j = 0; j < 8; ++j) total += acc[j];
  for (; i < n; ++i) total += a[i] * b[i];
  return total;
}

// One row of W as fp32 (int8: without its scale, applied to the dot products).
inline void int8_row(const int8_t* q, float* out, int64_t k) {
  for (int64_t i = 0; i < k; ++i) out[i] = static_cast<float>(q[i]);
}

inline void int4_row(const uint8_t* p, const float* s, const float* z, float* out, int64_t k) {
  for (int64_t g = 0; g < k / kGroup; ++g) {
    const uint8_t* b = p + g * (kGroup / 2);
    float* w = out + g * kGroup;
    const float scale = s[g], zero = z[g];
    for (int j = 0; j < kGroup / 2; ++j) w[j] = static_cast<float>(b[j] & 15) * scale + zero;
    for (int j = 0; j < kGroup / 2; ++j) w[j + kGroup / 2] = static_cast<float>(b[j] >> 4) * scale + zero;
  }
}

// One row's dot product with x, straight from the packed bytes: s * (x . q) + z * sum(x) per group.
inline float int4_dot(const uint8_t* p, const float* s, const float* z, const float* x, const float* x_sums,
                      int64_t groups) {
  float total = 0;
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* b = p + g * (kGroup / 2);
    const float* xg = x + g * kGroup;
    float acc[kGroup / 2];
    for (int j = 0; j < kGroup / 2; ++j)
      acc[j] = xg[j] * static_cast<float>(b[j] & 15) + xg[j + kGroup / 2] * static_cast<float>(b[j] >> 4);
    float sum = 0;
    for (int j = 0; j < kGroup / 2; ++j) sum += acc[j];
    total += s[g] * sum + z[g] * x_sums[g];
  }
  return total;
}

inline float int8_dot(const float* x, const int8_t* q, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += x[i + j] * static_cast<float>(q[i + j]);
  float total = 0;
  for (int j = 0; j < 8; ++j) total += acc[j];
  for (; i < n; ++i) total += x[i] * static_cast<float>(q[i]);
  return total;
}

// Up to this many rows, each reads the weight's bytes itself (converted in registers); past it, a row of W is
// converted to fp32 once and shared by the rows.
constexpr int64_t kDirectRows = 2;

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
    if (m_rows <= kDirectRows) {
      for (int64_t o = o0; o < o1; ++o)
        for (int64_t m = 0; m < m_rows; ++m) yp[m * n + o] = int8_dot(xp + m * k, qp + o * k, k) * sp[o];
      return;
    }
    std::vector<float> row(k);
    for (int64_t o = o0; o < o1; ++o) {
      int8_row(qp + o * k, row.data(), k);
      for (int64_t m = 0; m < m_rows; ++m) yp[m * n + o] = dot(xp + m * k, row.data(), k) * sp[o];
    }
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
    std::vector<float> row(i1 - i0);
    for (int64_t o = 0; o < n; ++o) {
      int8_row(qp + o * k + i0, row.data(), i1 - i0);
      for (int64_t m = 0; m < m_rows; ++m) {
        const float coef = cp[m * n + o];
        float* d = dp + m * k + i0;
        for (int64_t i = 0; i < i1 - i0; ++i) d[i] += coef * row[i];
      }
    }
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
  auto x_sums = x.view({m_rows, groups, kGroup}).sum(-1).contiguous();  // (M, groups): the zeros' share
  const float* xs = x_sums.data_ptr<float>();
  at::parallel_for(0, n, 16, [&](int64_t o0, int64_t o1) {
    if (m_rows <= kDirectRows) {
      for (int64_t o = o0; o < o1; ++o)
        for (int64_t m = 0; m < m_rows; ++m)
          yp[m * n + o] = int4_dot(pp + o * (k / 2), sp + o * groups, zp + o * groups, xp + m * k,
                                   xs + m * groups, groups);
      return;
    }
    std::vector<float> row(k);
    for (int64_t o = o0; o < o1; ++o) {
      int4_row(pp + o * (k / 2), sp + o * groups, zp + o * groups, row.data(), k);
      for (int64_t m = 0; m < m_rows; ++m) yp[m * n + o] = dot(xp + m * k, row.data(), k);
    }
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
    std::vector<float> row(width);
    for (int64_t o = 0; o < n; ++o) {
      int4_row(pp + o * (k / 2) + i0 / 2, sp + o * groups + g0, zp + o * groups + g0, row.data(), width);
      for (int64_t m = 0; m < m_rows; ++m) {
        const float coef = cp[m * n + o];
        float* d = dp + m * k + i0;
        for (int64_t i = 0; i < width; ++i) d[i] += coef * row[i];
      }
    }
  });
  return dx;
}

// W as fp32 (N, K), for the products of many rows, which run on torch's fp32 kernels.
torch::Tensor int8_dequantize(torch::Tensor q, torch::Tensor s) {
  const int64_t n = q.size(0), k = q.size(1);
  auto w = torch::empty({n, k}, s.options());
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = s.data_ptr<float>();
  float* wp = w.data_ptr<float>();
  at::parallel_for(0, n, 16, [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o)
      for (int64_t i = 0; i < k; ++i) wp[o * k + i] = static_cast<float>(qp[o * k + i]) * sp[o];
  });
  return w;
}

torch::Tensor int4_dequantize(torch::Tensor p, torch::Tensor s, torch::Tensor z) {
  const int64_t n = p.size(0), k = p.size(1) * 2, groups = k / kGroup;
  auto w = torch::empty({n, k}, s.options());
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
