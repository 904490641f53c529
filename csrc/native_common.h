// Row kernels and BLAS access shared by the native ops; every sum in a fixed order (deterministic).
// acc_t is float or double.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#if defined(__SSE__)
#include <xmmintrin.h>  // _mm_getcsr / _mm_setcsr
#endif

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
// MKL's per-thread thread count (absent from a torch built with OpenBLAS: weak, then not called)
int MKL_Set_Num_Threads_Local(int n) __attribute__((weak));  // (the lower-case symbol is the Fortran one)
}

// Row helpers are force-inlined so that a multi-versioned caller compiles them for its target.
#define STATTN_INLINE __attribute__((always_inline)) inline

// The fp32 row work is compiled for x86-64-v3 (AVX2 + FMA) and the baseline, picked at load time
// (GCC/clang function multi-versioning), and for x86-64-v4 (AVX-512, 16 lanes) where the callers
// provide a STATTN_V4 version: the build itself uses no -march.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(STATTN_NO_MULTIVERSION)
#define STATTN_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define STATTN_MULTIVERSION
#endif

namespace stattn_native {

// BLAS available (and not switched off with STATTN_NATIVE_BLAS=0, which tests the fallback)?
inline bool use_blas() {
  static const bool on = sgemm_ != nullptr && dgemm_ != nullptr &&
                         !(std::getenv("STATTN_NATIVE_BLAS") && std::getenv("STATTN_NATIVE_BLAS")[0] == '0');
  return on;
}

// The state one task body of the ops' parallel regions sets on its thread, restored on exit:
// - MKL on 1 thread. Every product runs on its own thread there; MKL runs nested calls sequentially
//   anyway, but picks its kernel by its thread setting: with torch's 2 threads it took its copying
//   kernel for these small products, 40 % slower than the no-copy one it picks on 1.
// - fp32 only: subnormals flushed to zero (MXCSR FTZ and DAZ). The Gaussian basis is subnormal far
//   from its centres (exp(-d^2 / 2 sigma^2) < 2^-126) and every operation on a subnormal took a
//   microcode assist: the Attention Regulation loop ran 1.2-1.7x slower. Values below 2^-126 ~ 1.2e-38
//   then count as 0, far below the resolution of any fp32 result; fp64 keeps IEEE subnormals.
template <typename acc_t>
class TaskScope {
 public:
  TaskScope() : blas_threads_(MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0) {
#if defined(__SSE__)
    if constexpr (std::is_same_v<acc_t, float>) {
      csr_ = _mm_getcsr();
      _mm_setcsr(csr_ | kFlushZero | kDenormalsZero);
    }
#endif
  }
  ~TaskScope() {
#if defined(__SSE__)
    if constexpr (std::is_same_v<acc_t, float>) _mm_setcsr(csr_);
#endif
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(blas_threads_);
  }
  TaskScope(const TaskScope&) = delete;
  TaskScope& operator=(const TaskScope&) = delete;

 private:
  static constexpr unsigned kFlushZero = 0x8000, kDenormalsZero = 0x0040;  // MXCSR bits
  int blas_threads_;
  unsigned csr_ = 0;
};

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

// The row kernels below keep independent lane partials (fixed order: lane partials, then a fixed
// tree combine), so results do not depend on the thread count. fp32 uses GCC vector types V: f32x8
// (one AVX register in the x86-64-v3 clone of the multi-versioned callers such as fwd_rows, two SSE
// registers in the baseline) or f32x16 (one AVX-512 register in the callers' x86-64-v4 versions,
// see STATTN_V4); the rows of the op are padded to multiples of 16, so neither width has tails there.
// Every row loop of a caller uses the same V: a wide load of data just stored by narrower stores
// stalls on store forwarding. Plain loops of arrays did not do: GCC neither vectorises an IEEE max
// (a > b ? a : b) nor keeps an accumulator array in registers (it went through the stack, a
// store-forwarding chain per 8 elements). at::vec::Vectorized is not used either: without -m flags
// ATen's headers select the generic Vectorized, whose array-backed ops compiled to spilled
// scalar-ish code. fp64 (the exactness path) keeps plain loops of kLanes lanes.
constexpr int64_t kLanes = 8;

// These helpers are always inlined, so no vector ever crosses a call: GCC's note that returning an
// AVX vector from a function compiled without AVX changes the ABI does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));

// The x86-64-v4 (AVX-512) versions of the row work: functions with this attribute, picked at run
// time by has_v4() (GCC's target_clones cannot give the clones different vector widths).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(STATTN_NO_MULTIVERSION)
#define STATTN_HAVE_V4 1
#define STATTN_V4 __attribute__((target("arch=x86-64-v4")))
inline bool has_v4() {
  // x86-64-v4's AVX-512 sets, named one by one (older compilers do not know the level names); every
  // AVX-512 CPU has the x86-64-v3 ones
  static const bool on = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
                         __builtin_cpu_supports("avx512vl") &&
                         !(std::getenv("STATTN_NATIVE_V4") && std::getenv("STATTN_NATIVE_V4")[0] == '0');
  return on;
}
#else
#define STATTN_HAVE_V4 0
inline bool has_v4() { return false; }
#endif

template <typename V>
constexpr int64_t lanes_of = sizeof(V) / sizeof(float);
template <typename V>
struct int_vec;
template <>
struct int_vec<f32x8> {
  using type = i32x8;
};
template <>
struct int_vec<f32x16> {
  using type = i32x16;
};

template <typename V>
STATTN_INLINE V loadv(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <typename V>
STATTN_INLINE void storev(float* p, const V& v) {
  std::memcpy(p, &v, sizeof v);
}
template <typename V>
STATTN_INLINE V splatv(float a) {
  return V{} + a;
}
template <typename V>
STATTN_INLINE V maxv(const V& a, const V& b) {
  return a > b ? a : b;
}
STATTN_INLINE f32x8 load8(const float* p) { return loadv<f32x8>(p); }
STATTN_INLINE void store8(float* p, const f32x8& v) { storev(p, v); }
STATTN_INLINE f32x8 max8(const f32x8& a, const f32x8& b) { return maxv(a, b); }
#if defined(__clang__)
#define STATTN_SHUF8(a, b, i0, i1, i2, i3, i4, i5, i6, i7) __builtin_shufflevector(a, b, i0, i1, i2, i3, i4, i5, i6, i7)
#else
#define STATTN_SHUF8(a, b, i0, i1, i2, i3, i4, i5, i6, i7) __builtin_shuffle(a, b, i32x8{i0, i1, i2, i3, i4, i5, i6, i7})
#endif

// dst[j * ld_dst + i] = src[i * ld_src + j] for an 8 x 8 tile (three rounds of two-vector shuffles,
// the unpack / shuffle / permute pattern of an AVX transpose).
STATTN_INLINE void transpose8x8(const float* src, int64_t ld_src, float* dst, int64_t ld_dst) {
  f32x8 r[8], t[8], u[8];
  for (int i = 0; i < 8; ++i) r[i] = load8(src + i * ld_src);
  for (int i = 0; i < 8; i += 2) {
    t[i] = STATTN_SHUF8(r[i], r[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[i + 1] = STATTN_SHUF8(r[i], r[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int i = 0; i < 8; i += 4)
    for (int k = 0; k < 2; ++k) {
      u[i + 2 * k] = STATTN_SHUF8(t[i + k], t[i + k + 2], 0, 1, 8, 9, 4, 5, 12, 13);
      u[i + 2 * k + 1] = STATTN_SHUF8(t[i + k], t[i + k + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    }
  for (int j = 0; j < 4; ++j) {
    store8(dst + j * ld_dst, STATTN_SHUF8(u[j], u[j + 4], 0, 1, 2, 3, 8, 9, 10, 11));
    store8(dst + (j + 4) * ld_dst, STATTN_SHUF8(u[j], u[j + 4], 4, 5, 6, 7, 12, 13, 14, 15));
  }
}

// dst[j * ld_dst + i] = src[i * ld_src + j] for i < rows, j < cols: 8 x 8 tiles, scalars at the edges.
STATTN_INLINE void transpose_block(const float* src, int64_t ld_src, int64_t rows, int64_t cols, float* dst,
                                   int64_t ld_dst) {
  const int64_t r8 = rows - rows % 8, c8 = cols - cols % 8;
  for (int64_t i = 0; i < r8; i += 8)
    for (int64_t j = 0; j < c8; j += 8) transpose8x8(src + i * ld_src + j, ld_src, dst + j * ld_dst + i, ld_dst);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = i < r8 ? c8 : 0; j < cols; ++j) dst[j * ld_dst + i] = src[i * ld_src + j];
}

// Horizontal sum and max as a tree of shuffles (a fixed order; the lane-by-lane loop was a chain
// of seven dependent scalar adds per row). 16 lanes: the two halves first.
STATTN_INLINE float hsum(const f32x8& v) {
  f32x8 t = v + STATTN_SHUF8(v, v, 4, 5, 6, 7, 0, 1, 2, 3);
  t = t + STATTN_SHUF8(t, t, 2, 3, 0, 1, 6, 7, 4, 5);
  t = t + STATTN_SHUF8(t, t, 1, 0, 3, 2, 5, 4, 7, 6);
  return t[0];
}
STATTN_INLINE float hmax(const f32x8& v) {
  f32x8 t = max8(v, STATTN_SHUF8(v, v, 4, 5, 6, 7, 0, 1, 2, 3));
  t = max8(t, STATTN_SHUF8(t, t, 2, 3, 0, 1, 6, 7, 4, 5));
  t = max8(t, STATTN_SHUF8(t, t, 1, 0, 3, 2, 5, 4, 7, 6));
  return t[0];
}
STATTN_INLINE void halves(const f32x16& v, f32x8& lo, f32x8& hi) {
  std::memcpy(&lo, &v, sizeof lo);
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof lo, sizeof hi);
}
STATTN_INLINE float hsum(const f32x16& v) {
  f32x8 lo, hi;
  halves(v, lo, hi);
  return hsum(lo + hi);
}
STATTN_INLINE float hmax(const f32x16& v) {
  f32x8 lo, hi;
  halves(v, lo, hi);
  return hmax(max8(lo, hi));
}

// exp(x) in fp32: Cephes range reduction (round to nearest by the 1.5 * 2^23 trick, so no floor
// call) and its degree-6 polynomial, about 2 ulp on the softmax range. Below kExpLo the result is
// 0 (the true value is below 1.7e-38) and the discarded lanes are computed at kExpLo: a denormal
// anywhere, even in a lane that is thrown away, costs a microcode assist per instruction, and the
// -inf pad columns of the logits would hit that on every row. Inputs above kExpHi are clamped.
// One lane and a vector compute the same operations. fp64 uses std::exp.
constexpr float kExpLo = -87.0f, kExpHi = 88.3762589f;
template <typename V>
STATTN_INLINE V exp_poly(const V& x) {  // x already clamped; returns exp(x) / 2^n
  const V n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  V r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  V y = r * 1.9875691500e-4f + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  return y * (r * r) + r + 1.0f;
}
STATTN_INLINE float exp_f32(float x) {
  float c = x < kExpLo ? kExpLo : x;
  c = c > kExpHi ? kExpHi : c;
  const float n = (c * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) * (1 << 23);  // 2^n as float bits
  float scale;
  std::memcpy(&scale, &bits, sizeof(float));
  const float e = exp_poly(c) * scale;
  return x < kExpLo ? 0.0f : e;
}
template <typename V>
STATTN_INLINE V expv(const V& x) {
  using I = typename int_vec<V>::type;
  V c = x < kExpLo ? splatv<V>(kExpLo) : x;
  c = c > kExpHi ? splatv<V>(kExpHi) : c;
  const V n = (c * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const I bits = (__builtin_convertvector(n, I) + 127) << 23;
  V scale;
  std::memcpy(&scale, &bits, sizeof scale);
  const V e = exp_poly(c) * scale;
  return x < kExpLo ? splatv<V>(0.0f) : e;
}
template <typename T>
STATTN_INLINE T exp_t(T x) {
  if constexpr (std::is_same_v<T, float>)
    return exp_f32(x);
  else
    return std::exp(x);
}

// log(x) in fp32 for normal x > 0 (the softmax sums, >= 1): Cephes logf (frexp by bit operations,
// its degree-9 polynomial on [sqrt(1/2) - 1, sqrt(2) - 1]), about 1 ulp.
template <typename V>
STATTN_INLINE V logv(const V& x) {
  using I = typename int_vec<V>::type;
  I bits;
  std::memcpy(&bits, &x, sizeof bits);
  V e = __builtin_convertvector(((bits >> 23) & 0xff) - 126, V);
  const I mbits = (bits & 0x807fffff) | 0x3f000000;  // mantissa in [0.5, 1)
  V m;
  std::memcpy(&m, &mbits, sizeof m);
  const auto small = m < 0.707106781186547524f;
  e = small ? e - 1.0f : e;
  m = (small ? m + m : m) - 1.0f;
  const V z = m * m;
  V y = m * 7.0376836292e-2f - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y = y + e * -2.12194440e-4f;
  y = y - z * 0.5f;
  return (m + y) + e * 0.693359375f;
}

// out[i] = log(x[i]) for n values > 0: vectors of V (the tail through a 1-padded vector, so every
// value takes the same operations); fp64: std::log.
template <typename T, typename V = f32x8>
STATTN_INLINE void log_rows(const T* x, int64_t n, T* out) {
  if constexpr (std::is_same_v<T, float>) {
    constexpr int64_t L = lanes_of<V>;
    int64_t i = 0;
    for (; i + L <= n; i += L) storev(out + i, logv(loadv<V>(x + i)));
    if (i < n) {
      float buf[L];
      for (int64_t j = 0; j < L; ++j) buf[j] = i + j < n ? x[i + j] : 1.0f;
      storev(buf, logv(loadv<V>(buf)));
      for (int64_t j = 0; i + j < n; ++j) out[i + j] = buf[j];
    }
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = std::log(x[i]);
  }
}

template <typename T>
STATTN_INLINE T lane_sum(const T* acc) {
  T s = 0;
  for (int64_t j = 0; j < kLanes; ++j) s += acc[j];
  return s;
}

// In the helpers below, V is the fp32 vector type (ignored for fp64).
template <typename T, typename V = f32x8>
STATTN_INLINE T row_max(const T* x, int64_t n) {
  T m = -std::numeric_limits<T>::infinity();
  int64_t i = 0;
  if constexpr (std::is_same_v<T, float>) {
    constexpr int64_t L = lanes_of<V>;
    if (n >= L) {
      V acc = loadv<V>(x);
      for (i = L; i + L <= n; i += L) acc = maxv(acc, loadv<V>(x + i));
      m = hmax(acc);
    }
  } else if (n >= kLanes) {
    T acc[kLanes];
    for (int64_t j = 0; j < kLanes; ++j) acc[j] = x[j];
    for (i = kLanes; i + kLanes <= n; i += kLanes)
      for (int64_t j = 0; j < kLanes; ++j) acc[j] = acc[j] > x[i + j] ? acc[j] : x[i + j];
    for (int64_t j = 0; j < kLanes; ++j) m = m > acc[j] ? m : acc[j];
  }
  for (; i < n; ++i) m = m > x[i] ? m : x[i];
  return m;
}

// max over n of x + add (add: 0 on the columns that count, -inf on the others)
template <typename T, typename V = f32x8>
STATTN_INLINE T row_max_plus(const T* x, const T* add, int64_t n) {
  T m = -std::numeric_limits<T>::infinity();
  int64_t i = 0;
  if constexpr (std::is_same_v<T, float>) {
    constexpr int64_t L = lanes_of<V>;
    V acc = splatv<V>(m);
    for (; i + L <= n; i += L) acc = maxv(acc, loadv<V>(x + i) + loadv<V>(add + i));
    m = hmax(acc);
  } else {
    T acc[kLanes];
    for (int64_t j = 0; j < kLanes; ++j) acc[j] = m;
    for (; i + kLanes <= n; i += kLanes)
      for (int64_t j = 0; j < kLanes; ++j) {
        const T v = x[i + j] + add[i + j];
        acc[j] = acc[j] > v ? acc[j] : v;
      }
    for (int64_t j = 0; j < kLanes; ++j) m = m > acc[j] ? m : acc[j];
  }
  for (; i < n; ++i) m = m > x[i] + add[i] ? m : x[i] + add[i];
  return m;
}

// y = exp(x - shift) (y may alias x); sum_all = sum(y), sum_w = sum(w * y)
template <typename T, typename V = f32x8>
STATTN_INLINE void exp_shift_sum2(const T* x, T shift, const T* w, T* y, int64_t n, T& sum_all, T& sum_w) {
  int64_t i = 0;
  if constexpr (std::is_same_v<T, float>) {
    constexpr int64_t L = lanes_of<V>;
    V acc = {}, accw = {};
    for (; i + L <= n; i += L) {
      const V e = expv(loadv<V>(x + i) - shift);
      storev(y + i, e);
      acc += e;
      accw += loadv<V>(w + i) * e;
    }
    sum_all = hsum(acc);
    sum_w = hsum(accw);
  } else {
    T acc[kLanes] = {}, accw[kLanes] = {};
    for (; i + kLanes <= n; i += kLanes)
      for (int64_t j = 0; j < kLanes; ++j) {
        const T e = exp_t(x[i + j] - shift);
        y[i + j] = e;
        acc[j] += e;
        accw[j] += w[i + j] * e;
      }
    sum_all = lane_sum(acc);
    sum_w = lane_sum(accw);
  }
  for (; i < n; ++i) {
    y[i] = exp_t(x[i] - shift);
    sum_all += y[i];
    sum_w += w[i] * y[i];
  }
}

// y = exp(x - shift) (y may alias x); returns sum(w * y * g), w or g nullptr: all ones (the
// loop-invariant tests are hoisted out of the loop at -O3)
template <typename T, typename V = f32x8>
STATTN_INLINE T exp_shift_dot(const T* x, T shift, const T* w, const T* g, T* y, int64_t n) {
  T dot;
  int64_t i = 0;
  if constexpr (std::is_same_v<T, float>) {
    constexpr int64_t L = lanes_of<V>;
    V acc = {};
    for (; i + L <= n; i += L) {
      const V e = expv(loadv<V>(x + i) - shift);
      storev(y + i, e);
      const V we = w ? loadv<V>(w + i) * e : e;
      acc += g ? we * loadv<V>(g + i) : we;
    }
    dot = hsum(acc);
  } else {
    T acc[kLanes] = {};
    for (; i + kLanes <= n; i += kLanes)
      for (int64_t j = 0; j < kLanes; ++j) {
        const T e = exp_t(x[i + j] - shift);
        y[i + j] = e;
        acc[j] += (w ? w[i + j] * e : e) * (g ? g[i + j] : T(1));
      }
    dot = lane_sum(acc);
  }
  for (; i < n; ++i) {
    y[i] = exp_t(x[i] - shift);
    dot += (w ? w[i] * y[i] : y[i]) * (g ? g[i] : T(1));
  }
  return dot;
}

// y = exp(x - shift) (y may alias x); returns sum(y)
template <typename T, typename V = f32x8>
STATTN_INLINE T exp_shift_sum(const T* x, T shift, T* y, int64_t n) {
  return exp_shift_dot<T, V>(x, shift, nullptr, nullptr, y, n);
}

// log(sum(exp(x))) without writing x
template <typename T, typename V = f32x8>
STATTN_INLINE T row_lse(const T* x, int64_t n) {
  const T mx = row_max<T, V>(x, n);
  T sum;
  int64_t i = 0;
  if constexpr (std::is_same_v<T, float>) {
    constexpr int64_t L = lanes_of<V>;
    V acc = {};
    for (; i + L <= n; i += L) acc += expv(loadv<V>(x + i) - mx);
    sum = hsum(acc);
  } else {
    T acc[kLanes] = {};
    for (; i + kLanes <= n; i += kLanes)
      for (int64_t j = 0; j < kLanes; ++j) acc[j] += exp_t(x[i + j] - mx);
    sum = lane_sum(acc);
  }
  for (; i < n; ++i) sum += exp_t(x[i] - mx);
  return mx + std::log(sum);
}

template <typename T, typename V = f32x8>
STATTN_INLINE T row_sum(const T* x, int64_t n) {
  T s;
  int64_t i = 0;
  if constexpr (std::is_same_v<T, float>) {
    constexpr int64_t L = lanes_of<V>;
    V acc = {};
    for (; i + L <= n; i += L) acc += loadv<V>(x + i);
    s = hsum(acc);
  } else {
    T acc[kLanes] = {};
    for (; i + kLanes <= n; i += kLanes)
      for (int64_t j = 0; j < kLanes; ++j) acc[j] += x[i + j];
    s = lane_sum(acc);
  }
  for (; i < n; ++i) s += x[i];
  return s;
}

template <typename T, typename V = f32x8>
STATTN_INLINE void scale_row(T* x, T a, int64_t n) {
  int64_t i = 0;
  if constexpr (std::is_same_v<T, float>) {
    constexpr int64_t L = lanes_of<V>;
    for (; i + L <= n; i += L) storev(x + i, loadv<V>(x + i) * a);
  }
  for (; i < n; ++i) x[i] *= a;
}

template <typename T, typename V = f32x8>
STATTN_INLINE T row_dot(const T* x, const T* y, int64_t n) {
  T s;
  int64_t i = 0;
  if constexpr (std::is_same_v<T, float>) {
    constexpr int64_t L = lanes_of<V>;
    V acc = {};
    for (; i + L <= n; i += L) acc += loadv<V>(x + i) * loadv<V>(y + i);
    s = hsum(acc);
  } else {
    T acc[kLanes] = {};
    for (; i + kLanes <= n; i += kLanes)
      for (int64_t j = 0; j < kLanes; ++j) acc[j] += x[i + j] * y[i + j];
    s = lane_sum(acc);
  }
  for (; i < n; ++i) s += x[i] * y[i];
  return s;
}

// y += a * x
template <typename T, typename V = f32x8>
STATTN_INLINE void axpy_row(T* __restrict y, T a, const T* __restrict x, int64_t n) {
  int64_t i = 0;
  if constexpr (std::is_same_v<T, float>) {
    constexpr int64_t L = lanes_of<V>;
    for (; i + L <= n; i += L) storev(y + i, loadv<V>(y + i) + a * loadv<V>(x + i));
  }
  for (; i < n; ++i) y[i] += a * x[i];
}

// softmax backward of one row in place: p <- a * p * (g - dot) and, with write_g, g <- a * p
template <typename T, typename V = f32x8>
STATTN_INLINE void softmax_bwd_inplace(T* __restrict p, T* __restrict g, T a, T dot, bool write_g, int64_t n) {
  int64_t i = 0;
  if constexpr (std::is_same_v<T, float>) {
    constexpr int64_t L = lanes_of<V>;
    for (; i + L <= n; i += L) {
      const V pa = a * loadv<V>(p + i), gi = loadv<V>(g + i);
      storev(p + i, pa * (gi - dot));
      if (write_g) storev(g + i, pa);
    }
  }
  for (; i < n; ++i) {
    const T pa = a * p[i];
    p[i] = pa * (g[i] - dot);
    if (write_g) g[i] = pa;
  }
}

// softmax backward of one row: out = a * p * (g - dot)
template <typename T, typename V = f32x8>
STATTN_INLINE void softmax_bwd_row(const T* p, const T* g, T a, T dot, T* out, int64_t n) {
  int64_t i = 0;
  if constexpr (std::is_same_v<T, float>) {
    constexpr int64_t L = lanes_of<V>;
    for (; i + L <= n; i += L) storev(out + i, a * loadv<V>(p + i) * (loadv<V>(g + i) - dot));
  }
  for (; i < n; ++i) out[i] = a * p[i] * (g[i] - dot);
}

// ---------------------------------------------------------------------------------------------
// Small fp32 products C[m, n] = alpha A[m, k] B[k, n] (+ C when accumulate), all row-major with rows
// lda / ldb / ldc apart: the forward's products at small M, where a BLAS call's fixed cost (argument
// checks, kernel selection, packing) was as large as its arithmetic. Column chunks of CV vectors V
// (at most CVmax, as even as possible), each swept over the rows in register tiles of RB rows x CV
// vectors (B's chunk then comes from L1 after the first tile): per l one load of B's CV vectors, RB
// broadcasts of A and RB * CV multiply-adds. A column rest of 8 (16-lane V) takes an 8-lane tile,
// smaller rests scalars. Each element's sum runs over l = 0 .. k-1 in order whatever the tile, so
// results depend on neither the tiling nor the thread count.
template <typename V, int RB, int CV>
STATTN_INLINE void mm_tile(int64_t k, float alpha, const float* a, int64_t lda, const float* b, int64_t ldb,
                           float* c, int64_t ldc, bool accumulate) {
  constexpr int64_t L = lanes_of<V>;
  V s[RB][CV];
#pragma GCC unroll 16
  for (int i = 0; i < RB; ++i)
#pragma GCC unroll 16
    for (int j = 0; j < CV; ++j) s[i][j] = V{};
  for (int64_t l = 0; l < k; ++l) {
    V bl[CV];
#pragma GCC unroll 16
    for (int j = 0; j < CV; ++j) bl[j] = loadv<V>(b + l * ldb + j * L);
#pragma GCC unroll 16
    for (int i = 0; i < RB; ++i) {
      const V ai = a[i * lda + l] - V{};  // a broadcast (x - 0 = x exactly, so it folds; V{} + x does not: -0 + 0 = +0)
#pragma GCC unroll 16
      for (int j = 0; j < CV; ++j) s[i][j] += ai * bl[j];
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < RB; ++i)
#pragma GCC unroll 16
    for (int j = 0; j < CV; ++j) {
      const V r = s[i][j] * alpha;
      storev(c + i * ldc + j * L, accumulate ? r + loadv<V>(c + i * ldc + j * L) : r);
    }
}

// All m rows of one column chunk of CV vectors: tiles of RBmax rows, then one of the rest.
template <typename V, int RBmax, int CV>
STATTN_INLINE void mm_chunk(int64_t m, int64_t k, float alpha, const float* a, int64_t lda, const float* b,
                            int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  static_assert(RBmax <= 12, "mm_chunk's switch covers rests of up to 11 rows");
  int64_t i = 0;
  for (; i + RBmax <= m; i += RBmax) mm_tile<V, RBmax, CV>(k, alpha, a + i * lda, lda, b, ldb, c + i * ldc, ldc, accumulate);
  switch (m - i) {
#define STATTN_MM_ROWS(RB)                                                                           \
  case RB:                                                                                           \
    if constexpr (RB < RBmax) mm_tile<V, RB, CV>(k, alpha, a + i * lda, lda, b, ldb, c + i * ldc, ldc, accumulate); \
    break;
    STATTN_MM_ROWS(1)
    STATTN_MM_ROWS(2)
    STATTN_MM_ROWS(3)
    STATTN_MM_ROWS(4)
    STATTN_MM_ROWS(5)
    STATTN_MM_ROWS(6)
    STATTN_MM_ROWS(7)
    STATTN_MM_ROWS(8)
    STATTN_MM_ROWS(9)
    STATTN_MM_ROWS(10)
    STATTN_MM_ROWS(11)
#undef STATTN_MM_ROWS
  }
}

template <typename V, int RBmax, int CVmax>
STATTN_INLINE void small_mm_impl(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                                 const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  static_assert(CVmax <= 6, "small_mm_impl's switch covers chunks of up to 6 vectors");
  constexpr int64_t L = lanes_of<V>;
  const int64_t nv = n / L, chunks = (nv + CVmax - 1) / CVmax;
  int64_t j = 0;
  for (int64_t ch = 0; ch < chunks; ++ch) {  // 5 vectors as 3 + 2, not 4 + 1
    const int64_t cv = nv / chunks + (ch < nv % chunks);
    switch (cv) {
#define STATTN_MM_CHUNK(CV)                                                                                  \
  case CV:                                                                                                   \
    if constexpr (CV <= CVmax) mm_chunk<V, RBmax, CV>(m, k, alpha, a, lda, b + j, ldb, c + j, ldc, accumulate); \
    break;
      STATTN_MM_CHUNK(1)
      STATTN_MM_CHUNK(2)
      STATTN_MM_CHUNK(3)
      STATTN_MM_CHUNK(4)
      STATTN_MM_CHUNK(5)
      STATTN_MM_CHUNK(6)
#undef STATTN_MM_CHUNK
    }
    j += cv * L;
  }
  if constexpr (L > 8) {
    if (n - j >= 8) {
      mm_chunk<f32x8, RBmax, 1>(m, k, alpha, a, lda, b + j, ldb, c + j, ldc, accumulate);
      j += 8;
    }
  }
  for (int64_t i = 0; i < m; ++i)  // the last n % 8 columns
    for (int64_t jj = j; jj < n; ++jj) {
      float s = 0;
      for (int64_t l = 0; l < k; ++l) s += a[i * lda + l] * b[l * ldb + jj];
      c[i * ldc + jj] = s * alpha + (accumulate ? c[i * ldc + jj] : 0.0f);
    }
}

}  // namespace stattn_native
