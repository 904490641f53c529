// Row kernels and BLAS access shared by the native ops; every sum in a fixed order (deterministic).
// acc_t is float or double.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

// Fortran BLAS (LP64) as exported by libtorch_cpu (MKL or OpenBLAS inside): torch's own C++ gemm
// wrappers are not exported to extensions. Weak, so that a torch without them still loads and
// takes the loop fallback below.
extern "C" {
void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

// Row helpers are force-inlined so that a multi-versioned caller compiles them for its target.
#define STATTN_INLINE __attribute__((always_inline)) inline

namespace stattn_native {

// BLAS available (and not switched off with STATTN_NATIVE_BLAS=0, which tests the fallback)?
inline bool use_blas() {
  static const bool on = sgemm_ != nullptr && dgemm_ != nullptr &&
                         !(std::getenv("STATTN_NATIVE_BLAS") && std::getenv("STATTN_NATIVE_BLAS")[0] == '0');
  return on;
}

// Column-major C[m, n] = alpha op(A)[m, k] op(B)[k, n] + beta C (beta == 0 ignores C's contents).
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
          const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (use_blas()) {
    const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
    const int im = m, in = n, ik = k, ilda = lda, ildb = ldb, ildc = ldc;
    if constexpr (std::is_same_v<T, float>)
      sgemm_(&ta, &tb, &im, &in, &ik, &alpha, a, &ilda, b, &ildb, &beta, c, &ildc);
    else
      dgemm_(&ta, &tb, &im, &in, &ik, &alpha, a, &ilda, b, &ildb, &beta, c, &ildc);
    return;
  }
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t i = 0; i < m; ++i) {
      T s = 0;
      for (int64_t l = 0; l < k; ++l)
        s += (trans_a ? a[l + i * lda] : a[i + l * lda]) * (trans_b ? b[j + l * ldb] : b[l + j * ldb]);
      c[i + j * ldc] = alpha * s + (beta == T(0) ? T(0) : beta * c[i + j * ldc]);
    }
  }
}

// The row kernels below are plain loops over kLanes independent lanes (fixed order: lane partials,
// then a fixed combine), written so that the compiler vectorises them for whatever target the
// calling function is compiled for. The callers (fwd_rows / bwd_rows) are multi-versioned for
// x86-64-v3 and the baseline. at::vec::Vectorized is not used here: without -m flags ATen's
// headers select the generic Vectorized, whose array-backed ops (NaN-checking maximum, map-based
// floor, array round-trips in casts) compiled to spilled scalar-ish code and made the forward
// slower than the eager reference; the lane loops vectorise cleanly in every clone.
constexpr int64_t kLanes = 8;

template <typename T>
STATTN_INLINE T row_max(const T* x, int64_t n) {
  T m = -std::numeric_limits<T>::infinity();
  int64_t i = 0;
  if (n >= kLanes) {
    T acc[kLanes];
    for (int64_t j = 0; j < kLanes; ++j) acc[j] = x[j];
    for (i = kLanes; i + kLanes <= n; i += kLanes)
      for (int64_t j = 0; j < kLanes; ++j) acc[j] = acc[j] > x[i + j] ? acc[j] : x[i + j];
    for (int64_t j = 0; j < kLanes; ++j) m = m > acc[j] ? m : acc[j];
  }
  for (; i < n; ++i) m = m > x[i] ? m : x[i];
  return m;
}

// exp(x) in fp32: Cephes range reduction (round to nearest by the 1.5 * 2^23 trick, so no floor
// call) and its degree-6 polynomial, about 2 ulp on the softmax range; inputs are clamped to
// [-87.3, 88.3] (results below ~1e-38 become tiny normals instead of 0). fp64 uses std::exp.
STATTN_INLINE float exp_f32(float x) {
  x = x < -87.3365447f ? -87.3365447f : x;
  x = x > 88.3762589f ? 88.3762589f : x;
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) * (1 << 23);  // 2^n as float bits
  float scale;
  std::memcpy(&scale, &bits, sizeof(float));
  return y * scale;
}
template <typename T>
STATTN_INLINE T exp_t(T x) {
  if constexpr (std::is_same_v<T, float>)
    return exp_f32(x);
  else
    return std::exp(x);
}

template <typename T>
STATTN_INLINE T lane_sum(const T* acc) {
  T s = 0;
  for (int64_t j = 0; j < kLanes; ++j) s += acc[j];
  return s;
}

// y = exp(x - shift) (y may alias x); returns sum(y)
template <typename T>
STATTN_INLINE T exp_shift_sum(const T* x, T shift, T* y, int64_t n) {
  T acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) {
      const T e = exp_t(x[i + j] - shift);
      y[i + j] = e;
      acc[j] += e;
    }
  T sum = lane_sum(acc);
  for (; i < n; ++i) {
    y[i] = exp_t(x[i] - shift);
    sum += y[i];
  }
  return sum;
}

// log(sum(exp(x))) without writing x
template <typename T>
STATTN_INLINE T row_lse(const T* x, int64_t n) {
  const T mx = row_max(x, n);
  T acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) acc[j] += exp_t(x[i + j] - mx);
  T sum = lane_sum(acc);
  for (; i < n; ++i) sum += exp_t(x[i] - mx);
  return mx + std::log(sum);
}

template <typename T>
STATTN_INLINE T row_sum(const T* x, int64_t n) {
  T acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) acc[j] += x[i + j];
  T s = lane_sum(acc);
  for (; i < n; ++i) s += x[i];
  return s;
}

template <typename T>
STATTN_INLINE void scale_row(T* x, T a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] *= a;
}

template <typename T>
STATTN_INLINE T row_dot(const T* x, const T* y, int64_t n) {
  T acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) acc[j] += x[i + j] * y[i + j];
  T s = lane_sum(acc);
  for (; i < n; ++i) s += x[i] * y[i];
  return s;
}

// y += a * x
template <typename T>
STATTN_INLINE void axpy_row(T* __restrict y, T a, const T* __restrict x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

// softmax backward of one row: out = a * p * (g - dot)
template <typename T>
STATTN_INLINE void softmax_bwd_row(const T* p, const T* g, T a, T dot, T* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = a * p[i] * (g[i] - dot);
}

}  // namespace stattn_native
