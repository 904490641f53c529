// Native CPU implementation of the Attention Regulation inner optimisation (stattn.regulation_core.
// inner_loop): all iterations of one layer call in one op. Semantics: stattn/regulation_core.py.
//
// Heads (b, h) are independent except for the choice of the best iterate (one best for all), so
// each head runs all iterations in its own at::parallel_for task and records its per-iteration
// loss terms and theta; the losses are then summed over heads in a fixed order, the first minimum
// is the best iterate, and every head's theta of that iterate is returned. Per iteration and head:
// S_t = G_y theta_t G_x^T and its adjoint as vectorised separable products, the softmax restricted
// to the target columns (the other columns enter once, through their log-sum-exp), the quantile by
// selection (bisection on the keys of a sampled window, O(M)) instead of a sort, and the closed-form
// gradient; the row loops are multi-versioned like region_attention.cpp's.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <type_traits>
#include <vector>

#include "native_common.h"

namespace stattn_native {

using at::Tensor;

// Row-major C[m, n] = alpha op(A)[m, k] op(B)[k, n] + beta C (op = transpose when ta / tb); lda,
// ldb, ldc are the row strides of the stored matrices.
template <typename T>
void mm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* A, int64_t lda, const T* B,
        int64_t ldb, T beta, T* C, int64_t ldc) {
  gemm(tb, ta, n, m, k, alpha, B, ldb, A, lda, beta, C, ldc);  // column-major view: C^T = op(B)^T op(A)^T
}

template <typename acc_t>
struct LoopArgs {
  int64_t M, T, Ky, Kx, Hg, W, iters;
  acc_t lr, quantile, frac, m_target, w0, w1, w2;
  int64_t lo, hi;
  const acc_t* gyT;  // [Ky, Hg]
  const acc_t* gx;   // [W, Kx]
  const acc_t* gxT;  // [Kx, W]
  const int32_t* sample;  // order_stats' pixel sample [S] (quantile_sample)
  int64_t S;
};

// Softmax over {target columns + the rest}: P[t, m] from E[t, m] = Z_t + S_t and rest[m].
template <typename acc_t>
STATTN_INLINE void target_probs_impl(int64_t M, int64_t T, const acc_t* E, const acc_t* rest, acc_t* c,
                                     acc_t* den, acc_t* P) {
  for (int64_t m = 0; m < M; ++m) c[m] = rest[m];
  for (int64_t t = 0; t < T; ++t)
    for (int64_t m = 0; m < M; ++m) c[m] = c[m] > E[t * M + m] ? c[m] : E[t * M + m];
  for (int64_t m = 0; m < M; ++m) den[m] = exp_t(rest[m] - c[m]);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t m = 0; m < M; ++m) {
      P[t * M + m] = exp_t(E[t * M + m] - c[m]);
      den[m] += P[t * M + m];
    }
  for (int64_t m = 0; m < M; ++m) den[m] = acc_t(1) / den[m];
  for (int64_t t = 0; t < T; ++t)
    for (int64_t m = 0; m < M; ++m) P[t * M + m] *= den[m];
}

// Tie pixels of the quantile: n * dL/dP gets cq_t * weight there on top of the mean term cm_t.
template <typename acc_t>
struct TiePoint {
  int64_t t, m;
  acc_t g;  // cq_t * (share of the lo / hi order statistic)
};

// dS[t, m] = P (G - sum_t' P G), G[t, m] = cm_t + (cq_t w at the quantile's tie pixels): the softmax
// backward of n * dL/dP (the quantile's weight shared among ties, as the closed form); G is
// constant per t except at those few pixels, which are added afterwards.
template <typename acc_t>
STATTN_INLINE void loss_backward_impl(int64_t M, int64_t T, const acc_t* P, const acc_t* cm,
                                      const std::vector<TiePoint<acc_t>>& ties, acc_t* PG, acc_t* dS) {
  for (int64_t m = 0; m < M; ++m) PG[m] = 0;
  for (int64_t t = 0; t < T; ++t) axpy_row(PG, cm[t], P + t * M, M);
  for (const auto& tp : ties) PG[tp.m] += P[tp.t * M + tp.m] * tp.g;
  for (int64_t t = 0; t < T; ++t) {
    const acc_t c = cm[t];
    const acc_t* Pt = P + t * M;
    acc_t* d = dS + t * M;
    for (int64_t m = 0; m < M; ++m) d[m] = Pt[m] * (c - PG[m]);
  }
  for (const auto& tp : ties) dS[tp.t * M + tp.m] += P[tp.t * M + tp.m] * tp.g;
}

// fp32 as a signed integer of the same order (for non-NaN values: a < b <=> key(a) < key(b)), and back.
STATTN_INLINE int32_t order_key(float x) {
  int32_t b;
  std::memcpy(&b, &x, sizeof b);
  return b >= 0 ? b : b ^ 0x7FFFFFFF;
}
STATTN_INLINE float key_value(int32_t k) {
  const int32_t b = k >= 0 ? k : k ^ 0x7FFFFFFF;
  float x;
  std::memcpy(&x, &b, sizeof x);
  return x;
}

// The r-th smallest (0-based) of keys[0..n), known to lie in [klo, khi], by bisection on the key
// range: the smallest u with more than r keys <= u, which is an element's key. log2(khi - klo + 1)
// vectorised counting passes and no branch on the data: std::nth_element mispredicts about every
// other comparison and took more time than all the loop's arithmetic.
STATTN_INLINE int32_t kth_key(const int32_t* keys, int64_t n, int64_t r, int64_t klo, int64_t khi) {
  while (klo < khi) {
    const int64_t mid = klo + (khi - klo) / 2;
    const int32_t mid32 = static_cast<int32_t>(mid);
    int32_t count = 0;
    for (int64_t i = 0; i < n; ++i) count += keys[i] <= mid32;
    if (count > r)
      khi = mid;
    else
      klo = mid + 1;
  }
  return static_cast<int32_t>(klo);
}

// The (r + 1)-th smallest of keys[0..n) given the r-th, k: k again if more than r + 1 keys are <= k,
// else the smallest key above k.
STATTN_INLINE int32_t next_key(const int32_t* keys, int64_t n, int64_t r, int32_t k) {
  int32_t at_most = 0, above = std::numeric_limits<int32_t>::max();
  for (int64_t i = 0; i < n; ++i) {
    at_most += keys[i] <= k;
    above = keys[i] > k && keys[i] < above ? keys[i] : above;
  }
  return at_most > r + 1 ? k : above;
}

// The pixel sample of order_stats: S = M / 8 (at most kMaxSample, none below kMinSample) pixels of a
// fixed xorshift sequence, the same for every call (deterministic, and no grid bias: a strided sample
// aliases with the Gaussian basis' period).
constexpr int64_t kMaxSample = 256, kMinSample = 64;
std::vector<int32_t> quantile_sample(int64_t M) {
  const int64_t S = std::min(kMaxSample, M / 8);
  std::vector<int32_t> idx(S >= kMinSample ? S : 0);
  uint32_t state = 0x9E3779B9u;
  for (auto& i : idx) {
    state ^= state << 13, state ^= state >> 17, state ^= state << 5;
    i = static_cast<int32_t>((static_cast<uint64_t>(state) * static_cast<uint64_t>(M)) >> 32);
  }
  return idx;
}

// The lo-th and hi-th smallest of x[0..M) (hi is lo or lo + 1), exactly, and the pixels holding
// either value (`at`, ascending: the quantile's gradient goes there, shared among ties). fp32: the
// sample gives two pivots bracketing the ranks (selection in the sample), one pass counts the values
// below and between them and gathers those between (about a quarter of M, branch-free), and the
// ranks are found by bisection on that window's keys within the pivots' range; without a sample
// (M < 512) or when the pivots miss the ranks (a 4-sigma event) the bisection runs over all M.
// fp64: std::nth_element over all M. O(M), no sort. keys, idx (fp32), buf (fp64): scratch [M].
template <typename acc_t>
STATTN_INLINE void order_stats(const acc_t* x, int64_t M, int64_t lo, int64_t hi, const int32_t* sample, int64_t S,
                               int32_t* keys, int32_t* idx, acc_t* buf, acc_t& v_lo, acc_t& v_hi,
                               std::vector<int64_t>& at) {
  at.clear();
  if constexpr (std::is_same_v<acc_t, float>) {
    int64_t n = M, rank = lo, klo = std::numeric_limits<int32_t>::min(), khi = std::numeric_limits<int32_t>::max();
    bool window = false;
    if (S > 0) {
      int32_t skeys[kMaxSample];
      for (int64_t s = 0; s < S; ++s) skeys[s] = order_key(x[sample[s]]);
      // the sample rank of the target scatters by sqrt(S p (1 - p)): a 4-sigma margin
      const double p = static_cast<double>(lo) / M;
      const int64_t margin = 2 + static_cast<int64_t>(4.0 * std::sqrt(S * p * (1.0 - p)));
      const int64_t at_s = lo * S / M;
      const int64_t ra = std::max<int64_t>(at_s - margin, 0), rb = std::min<int64_t>(at_s + margin, S - 1);
      const int32_t ka = kth_key(skeys, S, ra, klo, khi), kb = kth_key(skeys, S, rb, ka, khi);
      int64_t below = 0, inside = 0;
      for (int64_t m = 0; m < M; ++m) {  // compaction without a branch: always store, advance when inside
        const int32_t k = order_key(x[m]);
        const bool in = (k >= ka) & (k <= kb);
        keys[inside] = k;
        idx[inside] = static_cast<int32_t>(m);
        inside += in;
        below += k < ka;
      }
      if (below <= lo && below + inside > hi) {
        window = true;
        n = inside, rank = lo - below, klo = ka, khi = kb;
      }
    }
    if (!window)
      for (int64_t m = 0; m < M; ++m) keys[m] = order_key(x[m]), idx[m] = static_cast<int32_t>(m);
    const int32_t k_lo = kth_key(keys, n, rank, klo, khi);
    const int32_t k_hi = hi == lo ? k_lo : next_key(keys, n, rank, k_lo);
    for (int64_t i = 0; i < n; ++i)  // rarely true: well predicted
      if (keys[i] == k_lo || keys[i] == k_hi) at.push_back(idx[i]);
    v_lo = key_value(k_lo);
    v_hi = key_value(k_hi);
  } else {
    std::copy(x, x + M, buf);
    std::nth_element(buf, buf + lo, buf + M);
    v_lo = buf[lo];
    v_hi = hi == lo ? v_lo : *std::min_element(buf + lo + 1, buf + M);
    for (int64_t m = 0; m < M; ++m)
      if (x[m] == v_lo || x[m] == v_hi) at.push_back(m);
  }
}

// y[0..n) += sum_r coef[r * coef_stride] rows[r * n + (0..n)], r < R: blocks of kBlock outputs stay
// in registers over r (kBlock / kLanes independent accumulator chains, one load/store of y per block).
// fp32 then takes blocks of 2 and 1 vectors (n is an image side, 16 at SD's 16 x 16 maps): y must
// not go through memory once per r (a store-forwarding chain per term, which the scalar tail was).
constexpr int64_t kBlock = 4 * kLanes;

template <int V>
STATTN_INLINE void add_combination_f32(float* __restrict y, const float* coef, int64_t coef_stride,
                                       const float* __restrict rows, int64_t n, int64_t R) {
  f32x8 acc[V];
  for (int j = 0; j < V; ++j) acc[j] = load8(y + j * kLanes);
  for (int64_t r = 0; r < R; ++r) {
    const float c = coef[r * coef_stride];
    for (int j = 0; j < V; ++j) acc[j] += c * load8(rows + r * n + j * kLanes);
  }
  for (int j = 0; j < V; ++j) store8(y + j * kLanes, acc[j]);
}

template <typename acc_t>
STATTN_INLINE void add_combination(acc_t* __restrict y, const acc_t* coef, int64_t coef_stride,
                                   const acc_t* __restrict rows, int64_t n, int64_t R) {
  int64_t i = 0;
  if constexpr (std::is_same_v<acc_t, float>) {
    for (; i + 4 * kLanes <= n; i += 4 * kLanes) add_combination_f32<4>(y + i, coef, coef_stride, rows + i, n, R);
    for (; i + 2 * kLanes <= n; i += 2 * kLanes) add_combination_f32<2>(y + i, coef, coef_stride, rows + i, n, R);
    for (; i + kLanes <= n; i += kLanes) add_combination_f32<1>(y + i, coef, coef_stride, rows + i, n, R);
  }
  for (; i + kBlock <= n; i += kBlock) {
    acc_t acc[kBlock];
    for (int64_t j = 0; j < kBlock; ++j) acc[j] = y[i + j];
    for (int64_t r = 0; r < R; ++r) {
      const acc_t c = coef[r * coef_stride];
      for (int64_t j = 0; j < kBlock; ++j) acc[j] += c * rows[r * n + i + j];
    }
    for (int64_t j = 0; j < kBlock; ++j) y[i + j] = acc[j];
  }
  for (int64_t r = 0; r < R && i < n; ++r) axpy_row(y + i, coef[r * coef_stride], rows + r * n + i, n - i);
}

// All iterations of one head. Pixels are in x-major order (m' = x * Hg + y) so that both halves of
// the separable offset and of its adjoint are axpys along y (no horizontal sums):
//   E_t[x, :] = Z_t[x, :] + sum_i A_t[i, x] gy[:, i],  A_t = theta_t gx^T        (S = gy theta gx^T)
//   C_t[j, :] = sum_x gx[x, j] dS_t[x, :],  step_t[i, j] = <gy[:, i], C_t[j, :]>  (gy^T dS gx)
// zt [T, M'] target logits, rest [M'] log-sum-exp of the other columns, theta [T, Ky, Kx] (updated in
// place); writes traj [iters, T, Ky, Kx] (theta_i) and terms [iters, 3] (sum_t l_q, sum_t l_m,
// mean theta^2) of this head.
template <typename acc_t>
STATTN_INLINE void head_loop_impl(const LoopArgs<acc_t>& a, const acc_t* zt, const acc_t* rest, acc_t* theta,
                                  acc_t* traj, acc_t* terms) {
  const int64_t M = a.M, T = a.T, K = a.Ky * a.Kx, Hg = a.Hg, W = a.W;
  constexpr bool f32 = std::is_same_v<acc_t, float>;  // order_stats' scratch: keys, idx for fp32, buf for fp64
  std::vector<acc_t> A(a.Ky * W), E(T * M), P(T * M), c(M), den(M), dS(T * M), C(a.Kx * Hg), step(T * K), cm(T),
      buf(f32 ? 0 : M);
  std::vector<int32_t> keys(f32 ? M : 0), idx(f32 ? M : 0);
  std::vector<int64_t> at;
  std::vector<TiePoint<acc_t>> ties;
  const acc_t M1 = static_cast<acc_t>(M);
  for (int64_t it = 0; it < a.iters; ++it) {
    std::copy(theta, theta + T * K, traj + it * T * K);
    for (int64_t t = 0; t < T; ++t) {
      std::fill(A.begin(), A.end(), acc_t(0));
      for (int64_t ki = 0; ki < a.Ky; ++ki)
        add_combination(A.data() + ki * W, theta + t * K + ki * a.Kx, 1, a.gxT, W, a.Kx);
      acc_t* Et = E.data() + t * M;
      std::copy(zt + t * M, zt + (t + 1) * M, Et);
      for (int64_t x = 0; x < W; ++x) add_combination(Et + x * Hg, A.data() + x, W, a.gyT, Hg, a.Ky);
    }
    target_probs_impl(M, T, E.data(), rest, c.data(), den.data(), P.data());
    acc_t lq = 0, lm = 0, lth = 0;
    ties.clear();
    for (int64_t t = 0; t < T; ++t) {
      const acc_t* Pt = P.data() + t * M;
      acc_t v_lo, v_hi;
      order_stats(Pt, M, a.lo, a.hi, a.sample, a.S, keys.data(), idx.data(), buf.data(), v_lo, v_hi, at);
      // torch.lerp's formula, so that the value matches torch.quantile's
      const acc_t qv = a.frac < acc_t(0.5) ? v_lo + a.frac * (v_hi - v_lo) : v_hi - (v_hi - v_lo) * (acc_t(1) - a.frac);
      const acc_t mean = row_sum(Pt, M) / M1;
      lq += (qv - a.quantile) * (qv - a.quantile);
      lm += (mean - a.m_target) * (mean - a.m_target);
      const acc_t cq = acc_t(2) * a.w0 / T * (qv - a.quantile);
      cm[t] = acc_t(2) * a.w1 / (T * M1) * (mean - a.m_target);
      // the quantile's weight (1 - frac, frac) on the lo / hi order statistics, shared among ties
      const size_t first = ties.size();
      int64_t n_lo = 0, n_hi = 0;
      for (int64_t m : at) {
        n_lo += Pt[m] == v_lo;
        n_hi += Pt[m] == v_hi;
        ties.push_back({t, m, acc_t(0)});
      }
      const acc_t w_lo = (acc_t(1) - a.frac) / static_cast<acc_t>(std::max<int64_t>(n_lo, 1));
      const acc_t w_hi = a.frac / static_cast<acc_t>(std::max<int64_t>(n_hi, 1));
      for (size_t i = first; i < ties.size(); ++i) {
        const acc_t v = Pt[ties[i].m];
        ties[i].g = cq * ((v == v_lo ? w_lo : acc_t(0)) + (v == v_hi ? w_hi : acc_t(0)));
      }
    }
    for (int64_t i = 0; i < T * K; ++i) lth += theta[i] * theta[i];
    terms[it * 3 + 0] = lq;
    terms[it * 3 + 1] = lm;
    terms[it * 3 + 2] = lth / static_cast<acc_t>(T * K);
    loss_backward_impl(M, T, P.data(), cm.data(), ties, c.data(), dS.data());
    // step_t = gy^T dS_t gx + 2 w2 / (K T) theta_t;  theta -= lr * step
    for (int64_t t = 0; t < T; ++t) {
      const acc_t* dSt = dS.data() + t * M;  // [W, Hg]
      std::fill(C.begin(), C.end(), acc_t(0));
      for (int64_t kj = 0; kj < a.Kx; ++kj) add_combination(C.data() + kj * Hg, a.gx + kj, a.Kx, dSt, Hg, W);
      for (int64_t ki = 0; ki < a.Ky; ++ki)
        for (int64_t kj = 0; kj < a.Kx; ++kj) step[t * K + ki * a.Kx + kj] = row_dot(a.gyT + ki * Hg, C.data() + kj * Hg, Hg);
    }
    const acc_t reg = acc_t(2) * a.w2 / static_cast<acc_t>(K * T);
    for (int64_t i = 0; i < T * K; ++i) theta[i] -= a.lr * (step[i] + reg * theta[i]);
  }
}

STATTN_MULTIVERSION void head_loop(const LoopArgs<float>& a, const float* zt, const float* rest, float* theta,
                                   float* traj, float* terms) {
  head_loop_impl(a, zt, rest, theta, traj, terms);
}
void head_loop(const LoopArgs<double>& a, const double* zt, const double* rest, double* theta, double* traj,
               double* terms) {
  head_loop_impl(a, zt, rest, theta, traj, terms);
}

// For logit rows z [rows, Np] of pixels m0... (N real columns): Z_t into zt [T, M'] and the
// log-sum-exp of the non-target columns into rest [M'] (-inf when every column is a target), at the
// x-major positions xmajor[m]. The target and pad columns of z are set to -inf (exp gives 0 there;
// fp32's clamped exp 1.6e-38, nothing next to the row maximum's 1) so that rows are whole vectors, and
// the block is swept three times (maxima, exps, logs) so that consecutive rows overlap. z is
// overwritten; mx, sum: scratch [rows].
template <typename acc_t, typename V>
STATTN_INLINE void split_rows_impl(int64_t rows, int64_t N, int64_t Np, int64_t M, int64_t m0, acc_t* z,
                                   const std::vector<int64_t>& tok, bool all_targets, const int64_t* xmajor,
                                   acc_t* mx, acc_t* sum, acc_t* zt, acc_t* rest) {
  constexpr acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  for (int64_t i = 0; i < rows; ++i) {
    acc_t* zi = z + i * Np;
    for (size_t t = 0; t < tok.size(); ++t) zt[t * M + xmajor[m0 + i]] = zi[tok[t]];
    for (int64_t c : tok) zi[c] = ninf;
    std::fill(zi + N, zi + Np, ninf);
  }
  if (all_targets) {
    for (int64_t i = 0; i < rows; ++i) rest[xmajor[m0 + i]] = ninf;
    return;
  }
  for (int64_t i = 0; i < rows; ++i) mx[i] = row_max<acc_t, V>(z + i * Np, Np);
  for (int64_t i = 0; i < rows; ++i) sum[i] = exp_shift_sum<acc_t, V>(z + i * Np, mx[i], z + i * Np, Np);
  log_rows<acc_t, V>(sum, rows, sum);
  for (int64_t i = 0; i < rows; ++i) rest[xmajor[m0 + i]] = mx[i] + sum[i];
}
// fp32: 16 lanes on AVX-512 machines, else 8 (as region_attention.cpp's fwd_rows); fp64: plain loops
STATTN_MULTIVERSION void split_rows_w8(int64_t rows, int64_t N, int64_t Np, int64_t M, int64_t m0, float* z,
                                       const std::vector<int64_t>& tok, bool all_targets, const int64_t* xmajor,
                                       float* mx, float* sum, float* zt, float* rest) {
  split_rows_impl<float, f32x8>(rows, N, Np, M, m0, z, tok, all_targets, xmajor, mx, sum, zt, rest);
}
#if STATTN_HAVE_V4
STATTN_V4 void split_rows_w16(int64_t rows, int64_t N, int64_t Np, int64_t M, int64_t m0, float* z,
                              const std::vector<int64_t>& tok, bool all_targets, const int64_t* xmajor, float* mx,
                              float* sum, float* zt, float* rest) {
  split_rows_impl<float, f32x16>(rows, N, Np, M, m0, z, tok, all_targets, xmajor, mx, sum, zt, rest);
}
#endif
void split_rows(int64_t rows, int64_t N, int64_t Np, int64_t M, int64_t m0, float* z, const std::vector<int64_t>& tok,
                bool all_targets, const int64_t* xmajor, float* mx, float* sum, float* zt, float* rest) {
#if STATTN_HAVE_V4
  if (has_v4()) return split_rows_w16(rows, N, Np, M, m0, z, tok, all_targets, xmajor, mx, sum, zt, rest);
#endif
  split_rows_w8(rows, N, Np, M, m0, z, tok, all_targets, xmajor, mx, sum, zt, rest);
}
void split_rows(int64_t rows, int64_t N, int64_t Np, int64_t M, int64_t m0, double* z, const std::vector<int64_t>& tok,
                bool all_targets, const int64_t* xmajor, double* mx, double* sum, double* zt, double* rest) {
  split_rows_impl<double, f32x8>(rows, N, Np, M, m0, z, tok, all_targets, xmajor, mx, sum, zt, rest);
}

std::tuple<Tensor, Tensor, Tensor> regulation_inner_loop(const Tensor& q, const Tensor& k, const Tensor& tokens,
                                                         const Tensor& theta0, const Tensor& gy, const Tensor& gx,
                                                         double scale, int64_t iters, double lr, double quantile,
                                                         int64_t lo, int64_t hi, double frac, double m_target,
                                                         double w0, double w1, double w2) {
  TORCH_CHECK(q.device().is_cpu(), "stattn native: CPU tensors only");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && theta0.dim() == 5, "stattn native: q, k [B, H, *, D], theta0 5-D");
  TORCH_CHECK(iters >= 1, "stattn native: iters >= 1");
  const int64_t B = q.size(0), H = q.size(1), M = q.size(2), D = q.size(3), N = k.size(2);
  const int64_t T = tokens.numel(), Ky = gy.size(1), Kx = gx.size(1), Hg = gy.size(0), W = gx.size(0);
  TORCH_CHECK(Hg * W == M && theta0.size(2) == T && theta0.size(3) == Ky && theta0.size(4) == Kx,
              "stattn native: basis / theta0 do not match q");
  TORCH_CHECK(0 <= lo && lo <= hi && hi < M, "stattn native: quantile position out of range");
  std::tuple<Tensor, Tensor, Tensor> result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "stattn_native_regulation", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const auto acc = c10::CppTypeToScalarType<acc_t>::value;
    const Tensor qc = q.to(acc).contiguous(), kc = k.to(acc).contiguous();
    const Tensor gyc = gy.to(acc).contiguous(), gxc = gx.to(acc).contiguous();
    Tensor theta = theta0.to(acc).contiguous().clone();
    std::vector<int64_t> tok(T);
    {
      const Tensor tc = tokens.to(at::kLong).contiguous();
      for (int64_t t = 0; t < T; ++t) {
        tok[t] = tc.data_ptr<int64_t>()[t];
        TORCH_CHECK(0 <= tok[t] && tok[t] < N, "stattn native: token index out of range");
      }
    }
    bool all_targets = true;  // (tokens may repeat: count the columns, not the tokens)
    for (int64_t c = 0; c < N; ++c) all_targets = all_targets && std::find(tok.begin(), tok.end(), c) != tok.end();
    const Tensor gxT = gxc.t().contiguous(), gyT = gyc.t().contiguous();
    std::vector<int64_t> xmajor(M);  // pixel m = y * W + x -> x * Hg + y
    for (int64_t m = 0; m < M; ++m) xmajor[m] = (m % W) * Hg + m / W;
    const std::vector<int32_t> sample = std::is_same_v<acc_t, float> ? quantile_sample(M) : std::vector<int32_t>();
    LoopArgs<acc_t> a{M, T, Ky, Kx, Hg, W, iters, static_cast<acc_t>(lr), static_cast<acc_t>(quantile),
                      static_cast<acc_t>(frac), static_cast<acc_t>(m_target), static_cast<acc_t>(w0),
                      static_cast<acc_t>(w1), static_cast<acc_t>(w2), lo, hi, gyT.data_ptr<acc_t>(),
                      gxc.data_ptr<acc_t>(), gxT.data_ptr<acc_t>(), sample.data(),
                      static_cast<int64_t>(sample.size())};
    const int64_t n = B * H, TK = T * Ky * Kx;
    std::vector<acc_t> traj(n * iters * TK), terms(n * iters * 3);
    acc_t* th = theta.data_ptr<acc_t>();
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      TaskScope<acc_t> scope;
      constexpr int64_t kRows = 256;  // logits computed in pixel blocks: only Z_t and the rest's lse are kept
      const int64_t Np = (N + 15) / 16 * 16;  // rows of whole 16-lane vectors
      std::vector<acc_t> z(kRows * Np), zt(T * M), rest(M), mx(kRows), sum(kRows);
      for (int64_t bh = begin; bh < end; ++bh) {
        const acc_t* qh = qc.data_ptr<acc_t>() + bh * M * D;
        const acc_t* kh = kc.data_ptr<acc_t>() + bh * N * D;
        for (int64_t m0 = 0; m0 < M; m0 += kRows) {
          const int64_t rows = std::min(kRows, M - m0);
          mm(false, true, rows, N, D, static_cast<acc_t>(scale), qh + m0 * D, D, kh, D, acc_t(0), z.data(), Np);
          split_rows(rows, N, Np, M, m0, z.data(), tok, all_targets, xmajor.data(), mx.data(), sum.data(), zt.data(),
                     rest.data());
        }
        head_loop(a, zt.data(), rest.data(), th + bh * TK, traj.data() + bh * iters * TK,
                  terms.data() + bh * iters * 3);
      }
    });
    // losses over all heads in a fixed order; the first minimum is the best iterate (NaN never wins)
    Tensor losses = at::empty({iters}, q.options().dtype(acc));
    int64_t best = 0;
    acc_t best_loss = std::numeric_limits<acc_t>::infinity();
    for (int64_t it = 0; it < iters; ++it) {
      acc_t lq = 0, lm = 0, lth = 0;
      for (int64_t bh = 0; bh < n; ++bh) {
        const acc_t* tr = terms.data() + (bh * iters + it) * 3;
        lq += tr[0];
        lm += tr[1];
        lth += tr[2];
      }
      const acc_t loss = a.w0 * (lq / static_cast<acc_t>(n * T)) + a.w1 * (lm / static_cast<acc_t>(n * T)) +
                         a.w2 * (lth / static_cast<acc_t>(n));
      losses.data_ptr<acc_t>()[it] = loss;
      if (loss < best_loss) {
        best_loss = loss;
        best = it;
      }
    }
    Tensor theta_best = at::empty(theta0.sizes(), q.options().dtype(acc));
    for (int64_t bh = 0; bh < n; ++bh)
      std::copy(traj.data() + (bh * iters + best) * TK, traj.data() + (bh * iters + best + 1) * TK,
                theta_best.data_ptr<acc_t>() + bh * TK);
    Tensor best_t = at::empty({}, q.options().dtype(at::kLong));
    best_t.data_ptr<int64_t>()[0] = best;
    result = {theta_best, best_t, losses};
  });
  return result;
}

}  // namespace stattn_native

TORCH_LIBRARY_FRAGMENT(stattn_native, m) {
  m.def("regulation_inner_loop(Tensor q, Tensor k, Tensor tokens, Tensor theta0, Tensor gy, Tensor gx, "
        "float scale, int iters, float lr, float quantile, int lo, int hi, float frac, float m_target, "
        "float w0, float w1, float w2) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(stattn_native, CPU, m) { m.impl("regulation_inner_loop", &stattn_native::regulation_inner_loop); }
