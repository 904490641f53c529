// Native CPU implementation of stattn's fused multi-region cross-attention (forward and backward).
//
// Same semantics as stattn/reference.py and kernels/region_attention.py. Per batch row b, head h,
// pixel m and region r: z_r = scale * q k_r^T (+ S = G_y theta G_x^T on region 0's target
// columns, built per pixel from theta), p_r = softmax(z_r) (region 0's pinned columns take the
// un-offset probability), alpha_r = weights * masks (affine: alpha_0 = 1 - sum_{r>=1} alpha_r),
// o = sum_r alpha_r p_r v_r. The target tokens and pinned columns are shared by the batch rows or
// given per row; with lengths, region r attends to its first lengths[r] keys only (the others are
// padding: logits -inf, keys and values never read, dk and dv 0).
//
// Work is split over (b, h, pixel block) with at::parallel_for. A block of kBlockM pixels holds
// the full rows of logits of every region (N is small: 77 text tokens), so no online softmax is
// needed; the products are BLAS calls (the sgemm_/dgemm_ inside libtorch_cpu, with MKL's own
// runtime CPU dispatch), one per block for all regions (the forward's output: one per region),
// except at M <= kSmallM in fp32 (the host-bound calls), where every product of the forward and the
// backward runs in register tiles (small_mm, native_common.h), and the row work (softmax, softmax
// backward) uses the vectorised row helpers of native_common.h.
// Inputs of any float dtype are packed into fp32 blocks (fp64 stays fp64) where they are not fp32
// rows already (those are read and written in place, rows any distance apart: q and grad_out are
// read with their strides, o and dq are written in [B, M, H, D] memory order). The backward's
// cross-pixel sums (dk, dv, dtheta, dweights) go to per-task partials over a fixed pixel partition
// and are summed in a fixed order afterwards (dk and dv, with one chunk of pixels per head and fp32
// / fp64 inputs, are written by their head's task directly), so results do not depend on the thread
// count or scheduling.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>
#include <ATen/ops/zeros.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "native_common.h"

namespace stattn_native {

using at::Tensor;

constexpr int64_t kBlockM = 128;  // pixel rows per block: the logits block kBlockM x R Np stays in L2
constexpr int64_t kChunkM = 1024;  // pixels per backward task (a fixed partition: deterministic sums)
// The fp32 products in registers (small_mm, small_nt) up to this many pixels: per forward call
// (B = 2, H = 8, N = 77, one thread) 15-20 % faster than BLAS at M = 16 .. 48, 4-20 % at M = 64
// (D = 160 .. 40), no faster at M = 96 and 128 (D = 160: 5-10 % slower). The backward, with its
// dk / dv written directly: 145-162 -> 83-90 us at M = 16, D = 40; 1.0-1.9 -> 0.83-0.91 ms at
// M = 64, D = 160 (Xeon, AVX-512).
constexpr int64_t kSmallM = 64;

// ---------------------------------------------------------------------------------------------
// Problem description: sizes, flags and the inputs converted once to the compute type acc_t.

// Region 0's target and pinned columns for one batch row (Problem::cols), with the masks derived
// from them. Shared by every row (tokens [T], pin [N]) or one set per row (tokens [B, T] or pin
// [B, N]): the row kernels index them by b, so the shared form costs one lookup per call.
template <typename acc_t>
struct Cols {
  const int64_t* tokens;   // [T]
  const int64_t* pinned;   // [P]
  int64_t P;
  const acc_t *nt_one, *nt_neg;  // [Np] over region 0's non-target real columns: 1 / 0, else 0 / -inf
  bool pin_is_target;
};

template <typename acc_t>
struct Problem {
  int64_t B, H, M, D, R, N, T = 0, Ky = 0, Kx = 0, W = 1;
  bool affine = false, has_pin = false;
  acc_t scale;
  Tensor k, v, theta, gy, gx;  // contiguous, acc_t
  // weights [B, R] and masks [B, R, M] in acc_t, read with their strides (the default ones are an
  // expanded 1: no copies per call)
  Tensor weights, masks;
  int64_t w_sb = 0, w_sr = 0, m_sb = 0, m_sr = 0, m_sm = 0;
  // Block layout (forward and backward): every region's keys padded to Np (a multiple of 16: the
  // row loops run without scalar tails) and all regions of a head side by side, so that one
  // product per block serves every region (see pack_head).
  int64_t Np = 0;
  // Keys region r attends to: its first len[r] (N without lengths); the rest of its Np columns are
  // padding (logits -inf, zero keys and values in the packed heads).
  std::vector<int64_t> len;
  bool has_len = false;
  // Column sets of Cols, one per row when tokens or pin is per row, else one (col_rows = B or 1):
  // tokens [col_rows, T]; row i's pinned columns pinned[pin_start[i] .. pin_start[i + 1]);
  // nt_one, nt_neg [col_rows, Np]; pin_is_target [col_rows].
  int64_t col_rows = 1;
  std::vector<int64_t> tokens, pinned, pin_start;
  std::vector<acc_t> nt_one, nt_neg;
  std::vector<char> pin_is_target;

  // keys or values x (k or v) of region r, head (b, h): [N, D]
  const acc_t* head(const Tensor& x, int64_t b, int64_t r, int64_t h) const {
    return x.data_ptr<acc_t>() + ((b * R + r) * H + h) * N * D;
  }
  Cols<acc_t> cols(int64_t b) const {
    const int64_t i = col_rows == 1 ? 0 : b;
    return {tokens.data() + i * T, pinned.data() + pin_start[i], pin_start[i + 1] - pin_start[i],
            nt_one.data() + i * Np, nt_neg.data() + i * Np, pin_is_target[i] != 0};
  }
  bool offset_on(int64_t r) const { return r == 0 && T > 0; }
  bool pin_on(int64_t r) const { return r == 0 && has_pin; }
};

// The integer tensor `what` (int32 by the op's convention; pin flags may be bool) as int64 values
// in out, shaped [n] (shared by the batch rows) or [B, n] (one row each); returns its rows (1 or B).
inline int64_t index_rows(const Tensor& x, int64_t B, int64_t n, const char* what, const char* shape,
                          std::vector<int64_t>& out, bool flags = false) {
  TORCH_CHECK_TYPE(at::isIntegralType(x.scalar_type(), /*includeBool=*/flags),
                   "stattn native: ", what, " must be an integer tensor, got ", x.scalar_type());
  TORCH_CHECK_VALUE((x.dim() == 1 && x.size(0) == n) || (x.dim() == 2 && x.size(0) == B && x.size(1) == n),
                    "stattn native: ", what, " must have shape [", shape, "] or [B, ", shape, "] = [", n,
                    "] or [", B, ", ", n, "], got ", x.sizes());
  auto c = x.to(at::kLong).contiguous();
  out.assign(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
  return x.dim() == 1 ? 1 : B;
}

template <typename acc_t>
Problem<acc_t> make_problem(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& weights,
                            const Tensor& masks, bool affine, const c10::optional<Tensor>& theta,
                            const c10::optional<Tensor>& tokens, const c10::optional<Tensor>& gy,
                            const c10::optional<Tensor>& gx, const c10::optional<Tensor>& pin,
                            double scale, const c10::optional<Tensor>& lengths) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 5 && v.sizes() == k.sizes(),
              "stattn native: q [B, H, M, D], k and v [B, R, H, N, D] expected");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "stattn native: q, k, v must share a dtype");
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  Problem<acc_t> p;
  p.B = q.size(0), p.H = q.size(1), p.M = q.size(2), p.D = q.size(3);
  p.R = k.size(1), p.N = k.size(3);
  TORCH_CHECK(k.size(0) == p.B && k.size(2) == p.H && k.size(4) == p.D, "stattn native: k does not match q");
  p.affine = affine;
  p.scale = static_cast<acc_t>(scale);
  // (each conversion or view is a dispatcher call; a host-bound call's inputs need none of them)
  const auto as_acc = [&](const Tensor& t, bool contiguous) {
    if (t.scalar_type() == acc && (!contiguous || t.is_contiguous())) return t;
    Tensor c = t.to(acc);
    return contiguous ? c.contiguous() : c;
  };
  const auto expanded = [](const Tensor& t, at::IntArrayRef sizes) { return t.sizes() == sizes ? t : t.expand(sizes); };
  p.k = as_acc(k, true);
  p.v = as_acc(v, true);
  p.weights = expanded(as_acc(weights, false), {p.B, p.R});
  p.masks = expanded(as_acc(masks, false), {p.B, p.R, p.M});
  p.w_sb = p.weights.stride(0), p.w_sr = p.weights.stride(1);
  p.m_sb = p.masks.stride(0), p.m_sr = p.masks.stride(1), p.m_sm = p.masks.stride(2);
  p.len.assign(p.R, p.N);
  if (lengths.has_value() && lengths->defined()) {
    std::vector<int64_t> len;
    TORCH_CHECK_VALUE(lengths->dim() == 1 && lengths->size(0) == p.R, "stattn native: lengths must have shape [R] = [",
                      p.R, "], got ", lengths->sizes());
    index_rows(*lengths, 1, p.R, "lengths", "R", len);  // (the integer check and the values)
    for (int64_t r = 0; r < p.R; ++r)
      TORCH_CHECK_VALUE(len[r] >= 1 && len[r] <= p.N, "stattn native: lengths[", r, "] = ", len[r],
                        " must be in [1, N = ", p.N, "]");
    p.len = len;
    p.has_len = true;
  }
  const int64_t len0 = p.len[0];  // region 0's real columns: its targets and pins lie below
  std::vector<int64_t> pin_flags;
  int64_t pin_rows = 1;
  if (pin.has_value() && pin->defined()) {
    pin_rows = index_rows(*pin, p.B, p.N, "pin", "N", pin_flags, /*flags=*/true);
    p.has_pin = true;  // the lse layout has slot R whenever pin is given, even with no flag set
  }
  int64_t tok_rows = 1;
  if (theta.has_value() && theta->defined() && theta->size(2) > 0) {
    TORCH_CHECK(tokens.has_value() && gy.has_value() && gx.has_value(),
                "stattn native: theta needs tokens, gy and gx");
    p.theta = theta->to(acc).contiguous();
    p.gy = gy->to(acc).contiguous();
    p.gx = gx->to(acc).contiguous();
    p.T = p.theta.size(2), p.Ky = p.theta.size(3), p.Kx = p.theta.size(4);
    p.W = p.gx.size(0);
    TORCH_CHECK(p.theta.size(0) == p.B && p.theta.size(1) == p.H, "stattn native: theta [B, H, T, Ky, Kx]");
    TORCH_CHECK(p.gy.size(0) * p.W == p.M && p.gy.size(1) == p.Ky && p.gx.size(1) == p.Kx,
                "stattn native: basis does not match theta / M");
    tok_rows = index_rows(*tokens, p.B, p.T, "tokens", "T", p.tokens);
  }
  p.Np = (p.N + 15) / 16 * 16;
  p.col_rows = std::max(tok_rows, pin_rows);
  if (tok_rows < p.col_rows) {  // shared tokens with per-row pins: one copy per row
    std::vector<int64_t> shared = p.tokens;
    p.tokens.clear();
    for (int64_t b = 0; b < p.B; ++b) p.tokens.insert(p.tokens.end(), shared.begin(), shared.end());
  }
  const acc_t inf = std::numeric_limits<acc_t>::infinity();
  p.nt_one.assign(p.col_rows * p.Np, acc_t(0));
  p.nt_neg.assign(p.col_rows * p.Np, -inf);
  p.pin_start.assign(1, 0);
  p.pin_is_target.assign(p.col_rows, 0);
  for (int64_t i = 0; i < p.col_rows; ++i) {
    acc_t *one = p.nt_one.data() + i * p.Np, *neg = p.nt_neg.data() + i * p.Np;
    for (int64_t n = 0; n < len0; ++n) one[n] = 1, neg[n] = 0;
    for (int64_t t = 0; t < p.T; ++t) {
      const int64_t tok = p.tokens[i * p.T + t];
      TORCH_CHECK_VALUE(tok >= 0 && tok < len0, "stattn native: tokens", tok_rows > 1 ? " of row " : "",
                        tok_rows > 1 ? std::to_string(i) : std::string(), ": index ", tok, " out of range [0, ",
                        len0, p.has_len ? ") (lengths[0])" : ") (N)");
      TORCH_CHECK_VALUE(one[tok] == 1, "stattn native: tokens", tok_rows > 1 ? " of row " : "",
                        tok_rows > 1 ? std::to_string(i) : std::string(), ": index ", tok, " repeated");
      one[tok] = 0, neg[tok] = -inf;
    }
    if (p.has_pin) {
      const int64_t* flags = pin_flags.data() + (pin_rows == 1 ? 0 : i) * p.N;
      for (int64_t n = 0; n < p.N; ++n) {
        if (flags[n] == 0) continue;
        TORCH_CHECK_VALUE(n < len0, "stattn native: pin", pin_rows > 1 ? " of row " : "",
                          pin_rows > 1 ? std::to_string(i) : std::string(), " flags column ", n,
                          ", a padding key (lengths[0] = ", len0, ")");
        p.pinned.push_back(n);
        if (one[n] == 0) p.pin_is_target[i] = 1;
      }
    }
    p.pin_start.push_back(static_cast<int64_t>(p.pinned.size()));
  }
  return p;
}

// Every output and intermediate the kernels must fully write: NaN-filled when STATTN_NATIVE_POISON=1
// (the tests' poisoning, so that an element the kernels fail to write fails a test).
Tensor poisoned(Tensor t) {
  const char* poison = std::getenv("STATTN_NATIVE_POISON");
  if (poison && poison[0] == '1') t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}
Tensor output(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  return poisoned(at::empty(sizes, opts.memory_format(at::MemoryFormat::Contiguous)));
}

// o and dq: shape [B, H, M, D] in [B, M, H, D] memory order (stattn.ops.empty_output's layout), so
// that the callers' o.transpose(1, 2).reshape(B, M, H * D) is a view, as with SDPA's output. One
// strided allocation (a permuted view of a [B, M, H, D] one cost a second tensor per call).
Tensor output_bmhd(const Tensor& q) {
  const int64_t B = q.size(0), H = q.size(1), M = q.size(2), D = q.size(3);
  return poisoned(at::empty_strided({B, H, M, D}, {M * H * D, D, H * D, 1}, q.options()));
}

// Freed scratch buffers of this thread, kept for the next call (at most kMaxBuffers, kMaxBytes):
// the host-bound calls repeat a few shapes, whose buffers are then taken back by size, already
// mapped and in cache, instead of a dozen aligned_alloc / free pairs per call (2-4 % of a call at
// M = 16, D = 160).
class ScratchPool {
 public:
  void* take(size_t bytes) {
    for (size_t i = 0; i < free_.size(); ++i)
      if (free_[i].second == bytes) {
        void* p = free_[i].first;
        free_[i] = free_.back();
        free_.pop_back();
        held_ -= bytes;
        return p;
      }
    return std::aligned_alloc(64, bytes);
  }
  void give(void* p, size_t bytes) {
    if (free_.size() >= kMaxBuffers || held_ + bytes > kMaxBytes) return std::free(p);
    free_.emplace_back(p, bytes);
    held_ += bytes;
  }
  ~ScratchPool() {
    for (auto& b : free_) std::free(b.first);
  }

 private:
  static constexpr size_t kMaxBuffers = 64, kMaxBytes = size_t(16) << 20;
  std::vector<std::pair<void*, size_t>> free_;
  size_t held_ = 0;
};

inline ScratchPool& scratch_pool() {
  thread_local ScratchPool pool;
  return pool;
}

// 64-byte aligned per-thread scratch (BLAS may take alignment-dependent paths; aligned buffers
// keep results independent of where the allocator puts them), from this thread's ScratchPool.
// Contents start undefined.
template <typename T>
class Scratch {
 public:
  explicit Scratch(int64_t n)
      : n_(n), bytes_(((std::max<int64_t>(n, 1) * sizeof(T) + 63) / 64) * 64),
        p_(static_cast<T*>(scratch_pool().take(bytes_))) {
    TORCH_CHECK(p_ != nullptr, "stattn native: out of memory for scratch buffers");
  }
  ~Scratch() { scratch_pool().give(p_, bytes_); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  T* data() const { return p_; }
  T& operator[](int64_t i) const { return p_[i]; }
  T* begin() const { return p_; }
  T* end() const { return p_ + n_; }

 private:
  int64_t n_;
  size_t bytes_;
  T* p_;
};

// ---------------------------------------------------------------------------------------------
// Per-block pieces.

// Pixel rows [m0, m0 + rows) of x [B, H, M, D] (any strides, any float dtype) -> dst [rows, D].
template <typename in_t, typename acc_t>
void pack_rows(const Tensor& x, int64_t b, int64_t h, int64_t m0, int64_t rows, acc_t* dst) {
  const in_t* base = x.data_ptr<in_t>() + b * x.stride(0) + h * x.stride(1);
  const int64_t sm = x.stride(2), sd = x.stride(3), D = x.size(3);
  for (int64_t i = 0; i < rows; ++i) {
    const in_t* src = base + (m0 + i) * sm;
    acc_t* out = dst + i * D;
    if (sd == 1 && std::is_same_v<in_t, acc_t>) {
      std::copy(src, src + D, out);
    } else {
      for (int64_t d = 0; d < D; ++d) out[d] = static_cast<acc_t>(src[d * sd]);
    }
  }
}

// Pixel rows [m0, m0 + rows) of x as a [rows, D] block of acc_t with rows ld apart: x's own memory
// where it already is one (acc_t, unit stride in D, rows >= D apart: a [B, H, M, D] tensor has ld = D,
// the processors' transposed view of [B, M, H * D] ld = H * D), else packed into dst (ld = D).
template <typename in_t, typename acc_t>
const acc_t* block_rows(const Tensor& x, int64_t b, int64_t h, int64_t m0, int64_t rows, acc_t* dst, int64_t& ld) {
  if constexpr (std::is_same_v<in_t, acc_t>) {
    if (x.stride(3) == 1 && x.stride(2) >= x.size(3)) {
      ld = x.stride(2);
      return x.data_ptr<acc_t>() + b * x.stride(0) + h * x.stride(1) + m0 * x.stride(2);
    }
  }
  pack_rows<in_t, acc_t>(x, b, h, m0, rows, dst);
  ld = x.size(3);
  return dst;
}

// Pixel rows [m0, m0 + rows) of x [B, H, M, D] (unit stride in D) as a place to write a [rows, D] block
// to, and the distance between its rows.
template <typename in_t>
in_t* out_rows(Tensor& x, int64_t b, int64_t h, int64_t m0, int64_t& ld) {
  ld = x.stride(2);
  return x.data_ptr<in_t>() + b * x.stride(0) + h * x.stride(1) + m0 * x.stride(2);
}

// A packed [rows, D] block src -> rows ld apart in dst, converted to in_t.
template <typename acc_t, typename in_t>
void store_rows(const acc_t* src, int64_t rows, int64_t D, in_t* dst, int64_t ld) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t d = 0; d < D; ++d) dst[i * ld + d] = static_cast<in_t>(src[i * D + d]);
}

// alpha of region r for pixel rows [m0, m0 + rows).
template <typename acc_t>
void block_alpha(const Problem<acc_t>& p, int64_t b, int64_t r, int64_t m0, int64_t rows, acc_t* out) {
  const acc_t* w = p.weights.template data_ptr<acc_t>() + b * p.w_sb;
  const acc_t* mk = p.masks.template data_ptr<acc_t>() + b * p.m_sb + m0 * p.m_sm;
  const int64_t sm = p.m_sm;
  if (p.affine && r == 0) {
    std::fill(out, out + rows, acc_t(1));
    for (int64_t rr = 1; rr < p.R; ++rr)
      for (int64_t i = 0; i < rows; ++i) out[i] -= w[rr * p.w_sr] * mk[rr * p.m_sr + i * sm];
  } else {
    for (int64_t i = 0; i < rows; ++i) out[i] = w[r * p.w_sr] * mk[r * p.m_sr + i * sm];
  }
}

// A [T, Ky, W] = theta[b, h, t] . gx^T: the x-half of the separable offset, once per (b, h).
template <typename acc_t>
void offset_half(const Problem<acc_t>& p, int64_t b, int64_t h, acc_t* A) {
  const acc_t* th = p.theta.template data_ptr<acc_t>() + (b * p.H + h) * p.T * p.Ky * p.Kx;
  const acc_t* gx = p.gx.template data_ptr<acc_t>();
  for (int64_t tk = 0; tk < p.T * p.Ky; ++tk)
    for (int64_t x = 0; x < p.W; ++x) {
      acc_t s = 0;
      for (int64_t kj = 0; kj < p.Kx; ++kj) s += th[tk * p.Kx + kj] * gx[x * p.Kx + kj];
      A[tk * p.W + x] = s;
    }
}

// S [rows, T] = sum_i gy[y, i] A[t, i, x] for the block's pixels (m = y * W + x), per run of
// pixels of one image row and per chunk of kRun, vectorised over x (a sum per pixel was a chain of
// Ky dependent multiply-adds).
template <typename acc_t>
void block_offset(const Problem<acc_t>& p, const acc_t* A, int64_t m0, int64_t rows, acc_t* S) {
  constexpr int64_t kRun = 64;
  const acc_t* gy = p.gy.template data_ptr<acc_t>();
  acc_t acc[kRun];
  for (int64_t i = 0; i < rows;) {
    const int64_t y = (m0 + i) / p.W, x0 = (m0 + i) % p.W, n = std::min({p.W - x0, rows - i, kRun});
    for (int64_t t = 0; t < p.T; ++t) {
      std::fill(acc, acc + n, acc_t(0));
      for (int64_t ki = 0; ki < p.Ky; ++ki) {
        const acc_t g = gy[y * p.Ky + ki];
        const acc_t* a = A + (t * p.Ky + ki) * p.W + x0;
        for (int64_t j = 0; j < n; ++j) acc[j] += g * a[j];
      }
      for (int64_t j = 0; j < n; ++j) S[(i + j) * p.T + t] = acc[j];
    }
    i += n;
  }
}

// ---------------------------------------------------------------------------------------------
// Forward.

// Region 0 with an offset, one row, exactly as copy + add + softmax + a second softmax for the pinned
// columns: the fallback of fwd_rows when the two softmaxes' shifts are too far apart to share exps.
template <typename acc_t, typename V>
STATTN_INLINE void fwd_row_offset_twopass(const Problem<acc_t>& p, const Cols<acc_t>& cs, acc_t* zi, acc_t* tmp,
                                          acc_t a, const acc_t* Si, float* lse_r, float* lse_0) {
  const int64_t Np = p.Np;
  std::copy(zi, zi + Np, tmp);  // un-offset logits
  for (int64_t t = 0; t < p.T; ++t) zi[cs.tokens[t]] += Si[t];
  const acc_t mx = row_max<acc_t, V>(zi, Np);
  const acc_t sum = exp_shift_sum<acc_t, V>(zi, mx, zi, Np);
  *lse_r = static_cast<float>(mx + std::log(sum));
  scale_row<acc_t, V>(zi, a / sum, Np);
  if (p.has_pin) {
    const acc_t mx0 = row_max<acc_t, V>(tmp, Np);
    const acc_t sum0 = exp_shift_sum<acc_t, V>(tmp, mx0, tmp, Np);
    *lse_0 = static_cast<float>(mx0 + std::log(sum0));
    for (int64_t k = 0; k < cs.P; ++k) zi[cs.pinned[k]] = a * tmp[cs.pinned[k]] / sum0;
  }
}

// Softmax of one region for a block of rows of batch row b, in place: z [rows, ldz] holds this
// region's Np logit columns (pads, and keys beyond its length, -inf) and becomes alpha * p_r;
// writes the log-sum-exps (region 0 with pins: also that of the un-offset logits). Region 0 with
// an offset shares one exp pass between the edited and the un-offset softmax: both differ only on
// the few target columns, so with e = exp(z - mx0) (mx0 the un-offset maximum) the edited row is
// e * exp(mx0 - mxe) off the targets, renormalised by the sum over the non-target columns; target
// and pinned columns are then set directly.
// The rows are swept three times (maxima, exps, then logs and scaling): within a row each step
// waits on the previous one's horizontal reduction, across rows they are independent, and the
// sweeps let the CPU overlap consecutive rows. work: [Np + rows * (7 + T)].
template <typename acc_t, typename V>
STATTN_INLINE void fwd_rows_impl(const Problem<acc_t>& p, int64_t b, int64_t r, int64_t rows, acc_t* z,
                                 int64_t ldz, acc_t* work, const acc_t* al, const acc_t* S, float* lse_r,
                                 float* lse_0) {
  const int64_t Np = p.Np, T = p.T;
  constexpr int64_t kMaxT = 16;      // targets on the shared-exp path (more: the two-pass fallback)
  constexpr acc_t kMaxShift = 60;    // beyond this gap between the two maxima the shared exps would
                                     // leave the normal range
  acc_t* tmp = work;                                        // [Np]
  acc_t *mx0 = work + Np, *sum0 = mx0 + rows, *log0 = sum0 + rows;  // un-offset: max, sum, log(sum)
  acc_t *mxe = log0 + rows, *sum_e = mxe + rows, *loge = sum_e + rows, *c = loge + rows;  // edited
  acc_t* ze = c + rows;                                     // [rows, T]: edited target logits, then exps
  if (!p.offset_on(r)) {  // plain softmax; pinned columns (no offset) take the same probability
    for (int64_t i = 0; i < rows; ++i) mx0[i] = row_max<acc_t, V>(z + i * ldz, Np);
    for (int64_t i = 0; i < rows; ++i) sum0[i] = exp_shift_sum<acc_t, V>(z + i * ldz, mx0[i], z + i * ldz, Np);
    log_rows<acc_t, V>(sum0, rows, log0);
    for (int64_t i = 0; i < rows; ++i) {
      lse_r[i] = static_cast<float>(mx0[i] + log0[i]);
      if (p.pin_on(r)) lse_0[i] = lse_r[i];
      scale_row<acc_t, V>(z + i * ldz, al[i] / sum0[i], Np);
    }
    return;
  }
  const Cols<acc_t> cs = p.cols(b);
  for (int64_t i = 0; i < rows; ++i) {
    const acc_t* zi = z + i * ldz;
    mx0[i] = mxe[i] = row_max_plus<acc_t, V>(zi, cs.nt_neg, Np);
    for (int64_t t = 0; t < T; ++t) {
      ze[i * T + t] = zi[cs.tokens[t]] + S[i * T + t];
      mx0[i] = std::max(mx0[i], zi[cs.tokens[t]]);
      mxe[i] = std::max(mxe[i], ze[i * T + t]);
    }
  }
  auto shared = [&](int64_t i) { return T <= kMaxT && std::abs(mx0[i] - mxe[i]) <= kMaxShift; };
  for (int64_t i = 0; i < rows; ++i) {
    acc_t* zi = z + i * ldz;
    if (!shared(i)) {
      fwd_row_offset_twopass<acc_t, V>(p, cs, zi, tmp, al[i], S + i * T, lse_r + i, lse_0 + i);
      sum0[i] = sum_e[i] = 1;  // (placeholders for the logs below)
      continue;
    }
    acc_t sum_nt;
    exp_shift_sum2<acc_t, V>(zi, mx0[i], cs.nt_one, zi, Np, sum0[i], sum_nt);
    c[i] = exp_t(mx0[i] - mxe[i]);
    sum_e[i] = c[i] * sum_nt;
    for (int64_t t = 0; t < T; ++t) {
      ze[i * T + t] = exp_t(ze[i * T + t] - mxe[i]);
      sum_e[i] += ze[i * T + t];
    }
  }
  log_rows<acc_t, V>(sum_e, rows, loge);
  if (p.has_pin) log_rows<acc_t, V>(sum0, rows, log0);
  for (int64_t i = 0; i < rows; ++i) {
    if (!shared(i)) continue;
    acc_t* zi = z + i * ldz;
    lse_r[i] = static_cast<float>(mxe[i] + loge[i]);
    if (p.has_pin) {
      lse_0[i] = static_cast<float>(mx0[i] + log0[i]);
      for (int64_t k = 0; k < cs.P; ++k) tmp[k] = zi[cs.pinned[k]];
    }
    const acc_t a = al[i];
    scale_row<acc_t, V>(zi, a * c[i] / sum_e[i], Np);
    for (int64_t t = 0; t < T; ++t) zi[cs.tokens[t]] = a * ze[i * T + t] / sum_e[i];
    for (int64_t k = 0; k < cs.P; ++k) zi[cs.pinned[k]] = a * tmp[k] / sum0[i];
  }
}

// fp32: 16 lanes on AVX-512 machines, else 8 (the x86-64-v3 clone or the baseline); fp64: plain loops
STATTN_MULTIVERSION void fwd_rows_w8(const Problem<float>& p, int64_t b, int64_t r, int64_t rows, float* z,
                                     int64_t ldz, float* work, const float* al, const float* S, float* lse_r,
                                     float* lse_0) {
  fwd_rows_impl<float, f32x8>(p, b, r, rows, z, ldz, work, al, S, lse_r, lse_0);
}
#if STATTN_HAVE_V4
STATTN_V4 void fwd_rows_w16(const Problem<float>& p, int64_t b, int64_t r, int64_t rows, float* z, int64_t ldz,
                            float* work, const float* al, const float* S, float* lse_r, float* lse_0) {
  fwd_rows_impl<float, f32x16>(p, b, r, rows, z, ldz, work, al, S, lse_r, lse_0);
}
#endif
void fwd_rows(const Problem<float>& p, int64_t b, int64_t r, int64_t rows, float* z, int64_t ldz, float* work,
              const float* al, const float* S, float* lse_r, float* lse_0) {
#if STATTN_HAVE_V4
  if (has_v4()) return fwd_rows_w16(p, b, r, rows, z, ldz, work, al, S, lse_r, lse_0);
#endif
  fwd_rows_w8(p, b, r, rows, z, ldz, work, al, S, lse_r, lse_0);
}
void fwd_rows(const Problem<double>& p, int64_t b, int64_t r, int64_t rows, double* z, int64_t ldz, double* work,
              const double* al, const double* S, float* lse_r, float* lse_0) {
  fwd_rows_impl<double, f32x8>(p, b, r, rows, z, ldz, work, al, S, lse_r, lse_0);
}

// Keys of head (b, h) for the backward's dq = dz K, all regions side by side with zero pad rows
// (from each region's length on): dst [R * Np, D]. Packed per task into thread-local scratch
// (whenever the head changes), not per call into a new tensor: at small M a fresh
// B * H * R * Np * D tensor cost more in page faults than the products.
template <typename acc_t>
void pack_head(const Problem<acc_t>& p, const Tensor& x, int64_t b, int64_t h, acc_t* dst) {
  for (int64_t r = 0; r < p.R; ++r) {
    const acc_t* src = p.head(x, b, r, h);
    acc_t* out = dst + r * p.Np * p.D;
    const int64_t ND = p.len[r] * p.D;
    std::copy(src, src + ND, out);
    std::fill(out + ND, out + p.Np * p.D, acc_t(0));
  }
}

// The pad columns of every region's logits (z [rows, R * Np]), from its length on, to -inf:
// probability exactly 0.
template <typename acc_t>
void set_pad_logits(const Problem<acc_t>& p, int64_t rows, acc_t* z) {
  if (p.Np == p.N && !p.has_len) return;
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t r = 0; r < p.R; ++r)
      std::fill(z + i * p.R * p.Np + r * p.Np + p.len[r], z + i * p.R * p.Np + (r + 1) * p.Np,
                -std::numeric_limits<acc_t>::infinity());
}

// A block's logits z [rows, R * Np] (their first N columns; -inf from a region's length on) to /
// from saved logits [rows, R * N]: the forward keeps them for the backward when asked (save_logits),
// which then skips its first product.
template <typename acc_t>
void save_logits_block(const Problem<acc_t>& p, const acc_t* z, int64_t rows, acc_t* dst) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t r = 0; r < p.R; ++r)
      std::copy(z + i * p.R * p.Np + r * p.Np, z + i * p.R * p.Np + r * p.Np + p.N, dst + (i * p.R + r) * p.N);
}
template <typename acc_t>
void load_logits_block(const Problem<acc_t>& p, const acc_t* src, int64_t rows, acc_t* z) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t r = 0; r < p.R; ++r)
      std::copy(src + (i * p.R + r) * p.N, src + (i * p.R + r + 1) * p.N, z + i * p.R * p.Np + r * p.Np);
  set_pad_logits(p, rows, z);
}

// Keys (or values) of head (b, h) transposed: dst [D, R * Np] (zero pad columns, from each region's
// length on: keys and values beyond it are never read, whatever they hold). The logits
// product (and the backward's dO . V^T) then has no transposed operand, which MKL serves without
// packing it again for every block (measured 5-15 % faster at D = 160); dq = dz K needs the
// untransposed keys of pack_head.
template <typename acc_t>
STATTN_INLINE void pack_head_t_impl(const Problem<acc_t>& p, const Tensor& x, int64_t b, int64_t h, acc_t* dst) {
  const int64_t RN = p.R * p.Np;
  for (int64_t d = 0; d < p.D; ++d)  // the pad columns
    for (int64_t r = 0; r < p.R; ++r)
      std::fill(dst + d * RN + r * p.Np + p.len[r], dst + d * RN + (r + 1) * p.Np, acc_t(0));
  for (int64_t r = 0; r < p.R; ++r) {
    const acc_t* src = p.head(x, b, r, h);
    acc_t* out = dst + r * p.Np;
    const int64_t len = p.len[r];
    int64_t n0 = 0, d0 = 0;
    if constexpr (std::is_same_v<acc_t, float>) {  // 8 x 8 tiles in registers
      for (; n0 + 8 <= len; n0 += 8)
        for (d0 = 0; d0 + 8 <= p.D; d0 += 8) transpose8x8(src + n0 * p.D + d0, p.D, out + d0 * RN + n0, RN);
      d0 = p.D - p.D % 8;
    }
    for (int64_t n = 0; n < len; ++n)  // what the tiles left: the last len % 8 keys, the last D % 8 dims
      for (int64_t d = n < n0 ? d0 : 0; d < p.D; ++d) out[d * RN + n] = src[n * p.D + d];
  }
}
STATTN_MULTIVERSION void pack_head_t(const Problem<float>& p, const Tensor& x, int64_t b, int64_t h, float* dst) {
  pack_head_t_impl(p, x, b, h, dst);
}
void pack_head_t(const Problem<double>& p, const Tensor& x, int64_t b, int64_t h, double* dst) {
  pack_head_t_impl(p, x, b, h, dst);
}

// The small products (M <= kSmallM, fp32): small_mm_impl for the machine. AVX-512: 16 lanes, tiles
// of 6 rows x up to 4 vectors (24 of its 32 registers accumulate; a tile's loads are then 10 per 24
// multiply-adds), or 12 rows x 1 vector where n is one vector. Else 8 lanes, 4 x 3 or 8 x 1 (of 16
// registers).
STATTN_MULTIVERSION void small_mm_w8(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                                     const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  if (n <= 8)
    small_mm_impl<f32x8, 8, 1>(m, n, k, alpha, a, lda, b, ldb, c, ldc, accumulate);
  else
    small_mm_impl<f32x8, 4, 3>(m, n, k, alpha, a, lda, b, ldb, c, ldc, accumulate);
}
#if STATTN_HAVE_V4
STATTN_V4 void small_mm_w16(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                            const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  if (n <= 16)
    small_mm_impl<f32x16, 12, 1>(m, n, k, alpha, a, lda, b, ldb, c, ldc, accumulate);
  else
    small_mm_impl<f32x16, 6, 4>(m, n, k, alpha, a, lda, b, ldb, c, ldc, accumulate);
}
#endif
void small_mm(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda, const float* b, int64_t ldb,
              float* c, int64_t ldc, bool accumulate) {
#if STATTN_HAVE_V4
  if (has_v4()) return small_mm_w16(m, n, k, alpha, a, lda, b, ldb, c, ldc, accumulate);
#endif
  small_mm_w8(m, n, k, alpha, a, lda, b, ldb, c, ldc, accumulate);
}

STATTN_MULTIVERSION void transpose_rows(const float* src, int64_t ld_src, int64_t rows, int64_t cols, float* dst,
                                        int64_t ld_dst) {
  transpose_block(src, ld_src, rows, cols, dst, ld_dst);
}

// Whether the forward's products (and the backward's recomputed logits) are the small ones: fp32 at
// M <= kSmallM. One decision for both, so that the recomputed logits are the forward's bit for bit,
// as the saved ones are.
template <typename acc_t>
bool small_products(const Problem<acc_t>& p) {
  return std::is_same_v<acc_t, float> && p.M <= kSmallM;
}

// out [rows, R * Np] = alpha A X_r^T per region r with the small products (A [rows, D], lda apart; X the
// keys or values of head (b, h), read in place): per region outT [Np, rp] = alpha X_r A^T, then
// transposed into out. One operand must be transposed for small_mm; at M <= kSmallM A's block
// (rows x D) is the smaller one, not X (N x D; its transposed pack cost 40 % of the products at
// M = 16), and outT (N x rows) is small too. A^T [D, rp] has rp = rows rounded up to a multiple of 8,
// zero pad columns. outT's rows from the region's length on are set to pad first, so out's pad
// columns are. at [D, rp], outt [Np, rp]: scratch. The logits (X = K, alpha = scale, pad = -inf)
// and the backward's dO V_r^T (X = V, alpha = 1, pad = 0).
void small_nt(const Problem<float>& p, const Tensor& x, int64_t b, int64_t h, const float* a, int64_t lda,
              int64_t rows, float alpha, float pad, float* at, float* outt, float* out) {
  const int64_t rp = (rows + 7) / 8 * 8, D = p.D, Np = p.Np;
  transpose_rows(a, lda, rows, D, at, rp);
  if (rp > rows)
    for (int64_t d = 0; d < D; ++d) std::fill(at + d * rp + rows, at + (d + 1) * rp, 0.0f);
  for (int64_t r = 0; r < p.R; ++r) {
    small_mm(p.len[r], rp, D, alpha, p.head(x, b, r, h), D, at, rp, outt, rp, false);
    std::fill(outt + p.len[r] * rp, outt + Np * rp, pad);
    transpose_rows(outt, rp, Np, rows, out + r * Np, p.R * Np);
  }
}

// A block's logits z [rows, R * Np] = scale q K_r^T with the small products (-inf from each region's
// length on).
void small_logits(const Problem<float>& p, int64_t b, int64_t h, const float* qrows, int64_t ldq, int64_t rows,
                  float* qt, float* zt, float* z) {
  small_nt(p, p.k, b, h, qrows, ldq, rows, p.scale, -std::numeric_limits<float>::infinity(), qt, zt, z);
}

// Region 0's probabilities of a block (z [rows, ldz], alpha = 1) -> their first N columns in probs
// (rows N apart), then z scaled by each row's alpha: the forward's want_probs.
template <typename acc_t>
void store_probs_block(const Problem<acc_t>& p, acc_t* z, int64_t ldz, int64_t rows, const acc_t* al,
                       acc_t* probs) {
  for (int64_t i = 0; i < rows; ++i) {
    std::copy(z + i * ldz, z + i * ldz + p.N, probs + i * p.N);
    scale_row<acc_t>(z + i * ldz, al[i], p.Np);
  }
}

// Per block: one product for the logits of all regions (z [rows, R * Np] = scale q Kp^T; small:
// small_logits), the softmax of each region in place, then o = sum_r (alpha_r p_r) V_r as one
// product per region on V_r in place (accumulating into o; packing V cost more than the extra calls:
// -3..-10 % at M <= 256).
// probs (or nullptr): region 0's probabilities [B, H, M, N], taken from the same softmax (computed
// at alpha = 1, then scaled: alpha may be 0).
template <typename in_t, typename acc_t>
void forward_kernel(const Problem<acc_t>& p, const Tensor& q, Tensor& o, Tensor& lse, acc_t* logits,
                    acc_t* probs) {
  const int64_t nblk = (p.M + kBlockM - 1) / kBlockM;
  const int64_t Np = p.Np, D = p.D, T = p.T, L = p.R + p.has_pin, RN = p.R * Np;
  float* lse_p = lse.data_ptr<float>();
  constexpr bool fp32 = std::is_same_v<acc_t, float>;
  const bool small = small_products(p);
  // One region and one block per head (M <= kBlockM): the transposed pack would serve a single
  // product, so the logits take the keys in place as a transposed operand.
  const bool keys_in_place = !small && p.R == 1 && nblk == 1;
  const int64_t rp = small ? (p.M + 7) / 8 * 8 : 0;  // small_logits' q^T columns
  at::parallel_for(0, p.B * p.H * nblk, 1, [&](int64_t begin, int64_t end) {
    TaskScope<acc_t> scope;
    constexpr bool in_place = std::is_same_v<in_t, acc_t>;  // o written by its product directly
    Scratch<acc_t> qb(kBlockM * D), ob(in_place ? 0 : kBlockM * D), z(kBlockM * RN), work(Np + kBlockM * (7 + T)),
        al(kBlockM), S(kBlockM * T), A(T * p.Ky * p.W), kh(keys_in_place || small ? 0 : RN * D),
        ones(probs ? kBlockM : 0), qt(D * rp), zt(Np * rp);
    std::fill(ones.begin(), ones.end(), acc_t(1));
    int64_t cur_bh = -1;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / nblk, b = bh / p.H, h = bh % p.H;
      const int64_t m0 = (task % nblk) * kBlockM, rows = std::min(kBlockM, p.M - m0);
      if (bh != cur_bh) {
        if (!keys_in_place && !small) pack_head_t(p, p.k, b, h, kh.data());
        if (T > 0) offset_half(p, b, h, A.data());
        cur_bh = bh;
      }
      int64_t ldq, ldo;
      const acc_t* qrows = block_rows<in_t, acc_t>(q, b, h, m0, rows, qb.data(), ldq);
      if (T > 0) block_offset(p, A.data(), m0, rows, S.data());
      if (small) {
        if constexpr (fp32) small_logits(p, b, h, qrows, ldq, rows, qt.data(), zt.data(), z.data());
      } else {
        if (keys_in_place)  // z[:, :len] = scale q K^T (K [N, D] row-major); set_pad_logits fills the rest
          gemm(true, false, p.len[0], rows, D, p.scale, p.head(p.k, b, 0, h), D, qrows, ldq, acc_t(0), z.data(), RN);
        else
          gemm(false, false, RN, rows, D, p.scale, kh.data(), RN, qrows, ldq, acc_t(0), z.data(), RN);
        set_pad_logits(p, rows, z.data());
      }
      if (logits) save_logits_block(p, z.data(), rows, logits + ((b * p.H + h) * p.M + m0) * p.R * p.N);
      for (int64_t r = 0; r < p.R; ++r) {
        block_alpha(p, b, r, m0, rows, al.data());
        float* lse_r = lse_p + ((b * L + r) * p.H + h) * p.M + m0;
        float* lse_0 = lse_p + ((b * L + p.R) * p.H + h) * p.M + m0;
        if (probs && r == 0) {
          fwd_rows(p, b, r, rows, z.data(), RN, work.data(), ones.data(), S.data(), lse_r, lse_0);
          store_probs_block(p, z.data(), RN, rows, al.data(), probs + ((b * p.H + h) * p.M + m0) * p.N);
        } else {
          fwd_rows(p, b, r, rows, z.data() + r * Np, RN, work.data(), al.data(), S.data(), lse_r, lse_0);
        }
      }
      in_t* dst = out_rows<in_t>(o, b, h, m0, ldo);
      acc_t* out = in_place ? reinterpret_cast<acc_t*>(dst) : ob.data();
      const int64_t ld_out = in_place ? ldo : D;
      for (int64_t r = 0; r < p.R; ++r) {  // (over the region's own keys: values beyond are never read)
        if (small) {
          if constexpr (fp32)
            small_mm(rows, D, p.len[r], 1.0f, z.data() + r * Np, RN, p.head(p.v, b, r, h), D, out, ld_out, r > 0);
        } else {
          gemm(false, false, D, rows, p.len[r], acc_t(1), p.head(p.v, b, r, h), D, z.data() + r * Np, RN,
               acc_t(r == 0 ? 0 : 1), out, ld_out);
        }
      }
      if constexpr (!in_place) store_rows(ob.data(), rows, D, dst, ldo);
    }
  });
}

// (o, lse, logits, probs): o [B, H, M, D] in [B, M, H, D] memory order (output_bmhd); logits
// [B, H, M, R * N] (scale q k_r^T, region r at columns r * N, -inf from lengths[r] on; float32,
// float64 for float64 inputs) when save_logits, else empty; probs [B, H, M, N] (region 0's
// probabilities as applied, 0 from lengths[0] on; the logits' dtype) when want_probs, else the
// logits tensor again (one allocation less on the plain path; stattn.native drops it). tokens [T]
// or [B, T], pin [N] or [B, N] (per batch row), lengths [R] or none (every region uses its N keys).
std::tuple<Tensor, Tensor, Tensor, Tensor> region_attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v,
                                                        const Tensor& weights, const Tensor& masks, bool affine,
                                                        const c10::optional<Tensor>& theta,
                                                        const c10::optional<Tensor>& tokens,
                                                        const c10::optional<Tensor>& gy,
                                                        const c10::optional<Tensor>& gx,
                                                        const c10::optional<Tensor>& pin, double scale,
                                                        bool save_logits,
                                                        const c10::optional<Tensor>& lengths, bool want_probs) {
  TORCH_CHECK(q.device().is_cpu(), "stattn native: CPU tensors only");
  Tensor o = output_bmhd(q);
  Tensor lse, logits, probs;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "stattn_native_fwd", [&] {
    using in_t = scalar_t;
    using acc_t = std::conditional_t<std::is_same_v<in_t, double>, double, float>;
    const auto acc = c10::CppTypeToScalarType<acc_t>::value;
    auto p = make_problem<acc_t>(q, k, v, weights, masks, affine, theta, tokens, gy, gx, pin, scale, lengths);
    lse = output({p.B, p.R + p.has_pin, p.H, p.M}, q.options().dtype(at::kFloat));
    logits = save_logits ? output({p.B, p.H, p.M, p.R * p.N}, q.options().dtype(acc))
                         : at::empty({0}, q.options().dtype(acc));
    probs = want_probs ? output({p.B, p.H, p.M, p.N}, q.options().dtype(acc)) : logits;
    forward_kernel<in_t, acc_t>(p, q, o, lse, save_logits ? logits.data_ptr<acc_t>() : nullptr,
                                want_probs ? probs.data_ptr<acc_t>() : nullptr);
  });
  return {o, lse, logits, probs};
}

// ---------------------------------------------------------------------------------------------
// Backward.

struct Needs {
  bool q, k, v, w, m, t;
};

// Softmax backward of one row of region r, the general way: the edited probabilities pe and the
// un-offset ones p0 from two exp passes. The fallback of bwd_rows for what its shared-exp path does
// not take (fp64's recomputed log-sum-exps, > kMaxT targets or pins, a pinned target, log-sum-exps
// more than kMaxShift apart, a gradient on the probabilities). In: zi = logits, dpi = dO . V^T,
// Gi = nullptr or the gradient w.r.t. this row's probabilities as applied [N] (region 0's maps);
// out as bwd_rows.
template <typename acc_t, typename V>
STATTN_INLINE void bwd_row_general(const Problem<acc_t>& p, const Cols<acc_t>& cs, bool off, bool pinr,
                                   bool need_v, bool need_th, bool recompute_lse, acc_t* zi, acc_t* dpi, acc_t* pe,
                                   acc_t* p0, acc_t a, const acc_t* Si, acc_t* dSi, float lse_r, float lse_0,
                                   acc_t* dfull, const acc_t* Gi) {
  const int64_t Np = p.Np, T = p.T;
  std::copy(zi, zi + Np, pe);
  if (off)
    for (int64_t t = 0; t < T; ++t) pe[cs.tokens[t]] += Si[t];
  const acc_t lse_e = recompute_lse ? row_lse<acc_t, V>(pe, Np) : static_cast<acc_t>(lse_r);
  exp_shift_sum<acc_t, V>(pe, lse_e, pe, Np);
  acc_t D0 = 0;
  if (pinr) {
    const acc_t l0 = recompute_lse ? row_lse<acc_t, V>(zi, Np) : static_cast<acc_t>(lse_0);
    exp_shift_sum<acc_t, V>(zi, l0, p0, Np);
    for (int64_t k = 0; k < cs.P; ++k) D0 += p0[cs.pinned[k]] * dpi[cs.pinned[k]];
  }
  // De = <pe, dpv> over the non-pinned columns
  acc_t De = row_dot<acc_t, V>(pe, dpi, Np);
  if (pinr)
    for (int64_t k = 0; k < cs.P; ++k) De -= pe[cs.pinned[k]] * dpi[cs.pinned[k]];
  *dfull = De + D0;
  // dL/dp = s dpv: s = a; with the maps' gradient dL/dp = a dpv + G, held in dpv with s = 1 (De, D0
  // the same dots of it; the pad columns from N on have p = 0 whatever dpv holds)
  acc_t s = a;
  if (Gi) {
    acc_t Ge = row_dot<acc_t, V>(pe, Gi, p.N), G0 = 0;
    for (int64_t k = 0; k < cs.P; ++k) {
      Ge -= pe[cs.pinned[k]] * Gi[cs.pinned[k]];
      G0 += p0[cs.pinned[k]] * Gi[cs.pinned[k]];
    }
    scale_row<acc_t, V>(dpi, a, Np);
    axpy_row<acc_t, V>(dpi, acc_t(1), Gi, p.N);
    De = a * De + Ge, D0 = a * D0 + G0, s = 1;
  }
  // dze = s pe (dpv [not pinned] - De) -> z; dtheta reads it at the target columns
  softmax_bwd_row<acc_t, V>(pe, dpi, s, De, zi, Np);
  if (pinr)
    for (int64_t k = 0; k < cs.P; ++k) zi[cs.pinned[k]] = -s * pe[cs.pinned[k]] * De;
  if (need_th)
    for (int64_t t = 0; t < T; ++t) dSi[t] = zi[cs.tokens[t]];
  if (pinr) {  // + s p0 (dpv [pinned] - D0): pinned columns go through the un-offset softmax
    axpy_row<acc_t, V>(zi, -s * D0, p0, Np);
    for (int64_t k = 0; k < cs.P; ++k) zi[cs.pinned[k]] += s * p0[cs.pinned[k]] * dpi[cs.pinned[k]];
  }
  if (need_v) {  // dv uses alpha * p_used: overwrite dpv (no longer needed for this row)
    for (int64_t n = 0; n < Np; ++n) dpi[n] = a * pe[n];
    if (pinr)
      for (int64_t k = 0; k < cs.P; ++k) dpi[cs.pinned[k]] = a * p0[cs.pinned[k]];
  }
}

// Softmax backward of one region for a block of rows of batch row b, on the padded layout of the
// forward (rows of stride ld, this region's Np columns; pad logits, and those from the region's
// length on, -inf, so their probabilities and gradients are 0).
// In: z = logits, dpv = dO . V^T, G = nullptr or (region 0) the gradient w.r.t. its probabilities
// as applied [rows, N] (the general path then takes every row). Out: z = dz (pinned columns through
// the un-offset softmax), dS = dz_edited at the target columns, dpv = alpha * p_used (for dv),
// dfull = <dO, O_r>.
// Two passes per row, as the forward: pe = exp(z - lse) in place with <pe, dpv>, then dz and dv.
// With an offset, pe off the targets is exact from the un-offset logits, the few target columns are
// fixed up, and the un-offset probabilities the pins need are p0 = pe * exp(lse_e - lse_0) off the
// targets (the forward's shared-exp argument: no second exp pass).
template <typename acc_t, typename V>
STATTN_INLINE void bwd_rows_impl(const Problem<acc_t>& p, int64_t b, int64_t r, int64_t rows, bool need_v,
                                 bool need_th, bool recompute_lse, acc_t* z, acc_t* dpv, int64_t ld, acc_t* pe,
                                 acc_t* p0, const acc_t* al, const acc_t* S, acc_t* dS, const float* lse_r,
                                 const float* lse_0, acc_t* dfull_r, const acc_t* G) {
  const Cols<acc_t> cs = p.cols(b);
  const int64_t Np = p.Np, T = p.T, P = cs.P;
  constexpr int64_t kMax = 16;       // targets and pins held in registers on the shared-exp path
  constexpr acc_t kMaxShift = 60;    // as the forward's
  const bool off = p.offset_on(r), pinr = p.pin_on(r);
  const bool general = recompute_lse || G || (off && (T > kMax || P > kMax || cs.pin_is_target));
  for (int64_t i = 0; i < rows; ++i) {
    acc_t* zi = z + i * ld;
    acc_t* dpi = dpv + i * ld;
    const acc_t a = al[i];
    const acc_t le = static_cast<acc_t>(lse_r[i]);
    const acc_t l0 = pinr ? static_cast<acc_t>(lse_0[i]) : le;
    if (general || (off && pinr && !(std::abs(le - l0) <= kMaxShift))) {
      bwd_row_general<acc_t, V>(p, cs, off, pinr, need_v, need_th, recompute_lse, zi, dpi, pe, p0, a, S + i * T,
                                dS + i * T, lse_r[i], pinr ? lse_0[i] : 0.0f, dfull_r + i, G ? G + i * p.N : nullptr);
      continue;
    }
    if (!off) {  // plain softmax (pins without an offset see the same probabilities)
      const acc_t dot = exp_shift_dot<acc_t, V>(zi, le, static_cast<const acc_t*>(nullptr), dpi, zi, Np);
      dfull_r[i] = dot;
      softmax_bwd_inplace<acc_t, V>(zi, dpi, a, dot, need_v, Np);
      continue;
    }
    acc_t pt[kMax], gt[kMax], p0t[kMax], pp[kMax], gp[kMax], p0p[kMax];  // at the targets / the pins
    for (int64_t t = 0; t < T; ++t) {
      const int64_t n = cs.tokens[t];
      pt[t] = exp_t(zi[n] + S[i * T + t] - le);
      p0t[t] = exp_t(zi[n] - l0);
      gt[t] = dpi[n];
    }
    for (int64_t k = 0; k < P; ++k) {
      const int64_t n = cs.pinned[k];
      p0p[k] = exp_t(zi[n] - l0);
      gp[k] = dpi[n];
    }
    acc_t De = exp_shift_dot<acc_t, V>(zi, le, cs.nt_one, dpi, zi, Np), D0 = 0;  // over the non-targets
    for (int64_t t = 0; t < T; ++t) De += pt[t] * gt[t];
    for (int64_t k = 0; k < P; ++k) {
      pp[k] = zi[cs.pinned[k]];
      De -= pp[k] * gp[k];
      D0 += p0p[k] * gp[k];
    }
    dfull_r[i] = De + D0;
    // off the targets and pins: a pe (dpv - De) - a D0 p0 = a pe (dpv - De - D0 exp(le - l0))
    softmax_bwd_inplace<acc_t, V>(zi, dpi, a, De + (pinr ? D0 * exp_t(le - l0) : acc_t(0)), need_v, Np);
    for (int64_t t = 0; t < T; ++t) {
      const int64_t n = cs.tokens[t];
      const acc_t dze = a * pt[t] * (gt[t] - De);
      if (need_th) dS[i * T + t] = dze;
      zi[n] = dze - a * D0 * p0t[t];
      if (need_v) dpi[n] = a * pt[t];
    }
    for (int64_t k = 0; k < P; ++k) {
      const int64_t n = cs.pinned[k];
      zi[n] = -a * pp[k] * De + a * p0p[k] * (gp[k] - D0);
      if (need_v) dpi[n] = a * p0p[k];
    }
  }
}

STATTN_MULTIVERSION void bwd_rows_w8(const Problem<float>& p, int64_t b, int64_t r, int64_t rows, bool need_v,
                                     bool need_th, bool recompute_lse, float* z, float* dpv, int64_t ld, float* pe,
                                     float* p0, const float* al, const float* S, float* dS, const float* lse_r,
                                     const float* lse_0, float* dfull_r, const float* G) {
  bwd_rows_impl<float, f32x8>(p, b, r, rows, need_v, need_th, recompute_lse, z, dpv, ld, pe, p0, al, S, dS, lse_r,
                              lse_0, dfull_r, G);
}
#if STATTN_HAVE_V4
STATTN_V4 void bwd_rows_w16(const Problem<float>& p, int64_t b, int64_t r, int64_t rows, bool need_v, bool need_th,
                            bool recompute_lse, float* z, float* dpv, int64_t ld, float* pe, float* p0,
                            const float* al, const float* S, float* dS, const float* lse_r, const float* lse_0,
                            float* dfull_r, const float* G) {
  bwd_rows_impl<float, f32x16>(p, b, r, rows, need_v, need_th, recompute_lse, z, dpv, ld, pe, p0, al, S, dS, lse_r,
                               lse_0, dfull_r, G);
}
#endif
void bwd_rows(const Problem<float>& p, int64_t b, int64_t r, int64_t rows, bool need_v, bool need_th,
              bool recompute_lse, float* z, float* dpv, int64_t ld, float* pe, float* p0, const float* al,
              const float* S, float* dS, const float* lse_r, const float* lse_0, float* dfull_r, const float* G) {
#if STATTN_HAVE_V4
  if (has_v4())
    return bwd_rows_w16(p, b, r, rows, need_v, need_th, recompute_lse, z, dpv, ld, pe, p0, al, S, dS, lse_r, lse_0,
                        dfull_r, G);
#endif
  bwd_rows_w8(p, b, r, rows, need_v, need_th, recompute_lse, z, dpv, ld, pe, p0, al, S, dS, lse_r, lse_0, dfull_r, G);
}
void bwd_rows(const Problem<double>& p, int64_t b, int64_t r, int64_t rows, bool need_v, bool need_th,
              bool recompute_lse, double* z, double* dpv, int64_t ld, double* pe, double* p0, const double* al,
              const double* S, double* dS, const float* lse_r, const float* lse_0, double* dfull_r,
              const double* G) {
  bwd_rows_impl<double, f32x8>(p, b, r, rows, need_v, need_th, recompute_lse, z, dpv, ld, pe, p0, al, S, dS, lse_r,
                               lse_0, dfull_r, G);
}

// Per block, as the forward: one product each for the logits (or the forward's saved ones) and
// dO . V^T of all regions, the softmax backward per region, one product each for dq and the dk / dv
// rows of all regions. Those go to per-task partials [R * Np, D] (dk_part, dv_part: the pad rows
// ignored by the final sum), or, when direct (one chunk per head and outputs in the compute type),
// straight into the outputs [B, R, H, N, D] (dk_part, dv_part then point at them): the task owns
// its head's rows, so there is nothing to zero, sum or copy afterwards (at M = 16 that was a third
// of the backward). At M <= kSmallM in fp32 (one block per head) every product is a small_mm:
// register tiles instead of a BLAS call's fixed cost, and no pack of the keys or values.
// gprobs (or nullptr): the gradient w.r.t. region 0's probabilities [B, H, M, N] (the forward's probs).
template <typename in_t, typename acc_t>
void backward_kernel(const Problem<acc_t>& p, const Needs& need, const Tensor& q, const Tensor& dout,
                     const Tensor& lse, bool recompute_lse, const acc_t* logits, Tensor& dq, acc_t* dk_part,
                     acc_t* dv_part, bool direct, acc_t* dth_part, acc_t* dfull, int64_t nchunk,
                     const acc_t* gprobs) {
  static_assert(kSmallM <= kBlockM, "the small backward takes a head's pixels as one block");
  const int64_t Np = p.Np, D = p.D, T = p.T, L = p.R + p.has_pin, RN = p.R * Np;
  const int64_t KK = p.Ky * p.Kx;
  const bool need_th = need.t && T > 0;
  const int64_t Hg = p.M / p.W;  // image rows of the offset grid
  const float* lse_p = lse.data_ptr<float>();
  constexpr bool fp32 = std::is_same_v<acc_t, float>;
  const bool small = small_products(p);  // logits recomputed as the forward computed them
  const int64_t rp = small ? (p.M + 7) / 8 * 8 : 0;
  TORCH_INTERNAL_ASSERT(!direct || nchunk == 1, "direct dk / dv need one chunk per head");
  // region r's dk / dv rows of a task: [N, D] of the output (direct) or [Np, D] of the task's partial
  auto kv_rows = [&](acc_t* base, int64_t task, int64_t b, int64_t h, int64_t r) {
    return direct ? base + ((b * p.R + r) * p.H + h) * p.N * D : base + (task * p.R + r) * Np * D;
  };
  at::parallel_for(0, p.B * p.H * nchunk, 1, [&](int64_t begin, int64_t end) {
    TaskScope<acc_t> scope;
    constexpr bool in_place = std::is_same_v<in_t, acc_t>;  // dq written by its product directly
    Scratch<acc_t> qb(kBlockM * D), dob(kBlockM * D), dqb(in_place ? 0 : kBlockM * D), z(kBlockM * RN),
        dpv(kBlockM * RN), pe(Np), p0(Np), al(kBlockM), S(kBlockM * T), dS(kBlockM * T), A(T * p.Ky * p.W),
        C(need_th ? T * Hg * p.Kx : 0), kh(small ? 0 : RN * D), kt(small || logits ? 0 : RN * D),
        vt(small ? 0 : RN * D), at(D * rp), outt(Np * rp), zt(RN * rp);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / nchunk, b = bh / p.H, h = bh % p.H;
      const int64_t c0 = (task % nchunk) * kChunkM, c1 = std::min(p.M, c0 + kChunkM);
      acc_t* dthp = need_th ? dth_part + task * T * KK : nullptr;
      const acc_t* gy = need_th ? p.gy.template data_ptr<acc_t>() : nullptr;
      const acc_t* gx = need_th ? p.gx.template data_ptr<acc_t>() : nullptr;
      if (!small) {
        pack_head(p, p.k, b, h, kh.data());
        if (!logits) pack_head_t(p, p.k, b, h, kt.data());
        pack_head_t(p, p.v, b, h, vt.data());
      }
      if (T > 0) offset_half(p, b, h, A.data());
      std::fill(C.begin(), C.end(), acc_t(0));
      for (int64_t m0 = c0; m0 < c1; m0 += kBlockM) {
        const int64_t rows = std::min(kBlockM, c1 - m0);
        int64_t ldq, lddo;
        const acc_t* qrows = block_rows<in_t, acc_t>(q, b, h, m0, rows, qb.data(), ldq);
        const acc_t* dorows = block_rows<in_t, acc_t>(dout, b, h, m0, rows, dob.data(), lddo);
        if (T > 0) block_offset(p, A.data(), m0, rows, S.data());
        if (logits) {  // the forward's, bit for bit what the product would give
          load_logits_block(p, logits + ((b * p.H + h) * p.M + m0) * p.R * p.N, rows, z.data());
        } else if (small) {
          if constexpr (fp32) small_logits(p, b, h, qrows, ldq, rows, at.data(), outt.data(), z.data());
        } else {
          gemm(false, false, RN, rows, D, p.scale, kt.data(), RN, qrows, ldq, acc_t(0), z.data(), RN);
          set_pad_logits(p, rows, z.data());
        }
        // dpv[rows, R * Np] = dO . V^T (0 on the pad columns)
        if (small) {
          if constexpr (fp32) small_nt(p, p.v, b, h, dorows, lddo, rows, 1.0f, 0.0f, at.data(), outt.data(), dpv.data());
        } else {
          gemm(false, false, RN, rows, D, acc_t(1), vt.data(), RN, dorows, lddo, acc_t(0), dpv.data(), RN);
        }
        for (int64_t r = 0; r < p.R; ++r) {
          block_alpha(p, b, r, m0, rows, al.data());
          const float* lse_r = lse_p + ((b * L + r) * p.H + h) * p.M + m0;
          const float* lse_0 = lse_p + ((b * L + p.R) * p.H + h) * p.M + m0;
          acc_t* dfull_r = dfull + ((b * p.H + h) * p.R + r) * p.M + m0;
          const acc_t* G = gprobs && r == 0 ? gprobs + ((b * p.H + h) * p.M + m0) * p.N : nullptr;
          bwd_rows(p, b, r, rows, need.v, need_th, recompute_lse, z.data() + r * Np, dpv.data() + r * Np, RN, pe.data(),
                   p0.data(), al.data(), S.data(), dS.data(), lse_r, lse_0, dfull_r, G);
          if (need_th && p.offset_on(r)) {  // C[t, y] += dS[m, t] gx[x]: the x-half of dtheta, per image row y
            for (int64_t i = 0, y = m0 / p.W, x = m0 % p.W; i < rows; ++i) {
              for (int64_t t = 0; t < T; ++t)
                axpy_row(C.data() + (t * Hg + y) * p.Kx, dS[i * T + t], gx + x * p.Kx, p.Kx);
              if (++x == p.W) x = 0, ++y;
            }
          }
        }
        if (small) {
          if constexpr (fp32) {
            if (need.q) {  // dq = scale sum_r dz_r . K_r (keys in place)
              int64_t lddq;
              in_t* dst = out_rows<in_t>(dq, b, h, m0, lddq);
              float* out = in_place ? reinterpret_cast<float*>(dst) : dqb.data();
              const int64_t ld_out = in_place ? lddq : D;
              for (int64_t r = 0; r < p.R; ++r)
                small_mm(rows, D, p.len[r], p.scale, z.data() + r * Np, RN, p.head(p.k, b, r, h), D, out, ld_out, r > 0);
              if constexpr (!in_place) store_rows(dqb.data(), rows, D, dst, lddq);
            }
            // dk_r = scale dz_r^T . q and dv_r = (alpha p)_r^T . dO over the region's own keys, from the
            // transposed block zt [R * Np, rows] of g (dz or alpha p); direct: scaled here (the same
            // s * scale the final sum does), partials: there
            const auto kv_small = [&](const float* g, const float* x, int64_t ldx, float* base, float alpha) {
              transpose_rows(g, RN, rows, RN, zt.data(), rows);
              for (int64_t r = 0; r < p.R; ++r)
                small_mm(p.len[r], D, rows, alpha, zt.data() + r * Np * rows, rows, x, ldx,
                         kv_rows(base, task, b, h, r), D, false);
            };
            if (need.k) kv_small(z.data(), qrows, ldq, dk_part, direct ? p.scale : 1.0f);
            if (need.v) kv_small(dpv.data(), dorows, lddo, dv_part, 1.0f);
          }
          continue;
        }
        if (need.q) {  // dq = scale dz . K
          int64_t lddq;
          in_t* dst = out_rows<in_t>(dq, b, h, m0, lddq);
          if constexpr (in_place) {  // unit stride in D: the product writes dq's rows directly
            gemm(false, false, D, rows, RN, p.scale, kh.data(), D, z.data(), RN, acc_t(0), dst, lddq);
          } else {
            gemm(false, false, D, rows, RN, p.scale, kh.data(), D, z.data(), RN, acc_t(0), dqb.data(), D);
            store_rows(dqb.data(), rows, D, dst, lddq);
          }
        }
        // dk += dz^T . q (times scale afterwards: alpha = 1 keeps MKL's result independent of the
        // thread count, which alpha != 1 here did not); dv += (alpha p)^T . dO. Direct: per region,
        // over its own keys, the first block overwriting what the output holds.
        if (direct) {
          const acc_t beta = m0 == c0 ? acc_t(0) : acc_t(1);
          for (int64_t r = 0; r < p.R; ++r) {
            if (need.k)
              gemm(false, true, D, p.len[r], rows, acc_t(1), qrows, ldq, z.data() + r * Np, RN, beta,
                   kv_rows(dk_part, task, b, h, r), D);
            if (need.v)
              gemm(false, true, D, p.len[r], rows, acc_t(1), dorows, lddo, dpv.data() + r * Np, RN, beta,
                   kv_rows(dv_part, task, b, h, r), D);
          }
        } else {
          if (need.k)
            gemm(false, true, D, RN, rows, acc_t(1), qrows, ldq, z.data(), RN, acc_t(1),
                 kv_rows(dk_part, task, b, h, 0), D);
          if (need.v)
            gemm(false, true, D, RN, rows, acc_t(1), dorows, lddo, dpv.data(), RN, acc_t(1),
                 kv_rows(dv_part, task, b, h, 0), D);
        }
      }
      if (direct) {  // the outputs' rows from each region's length on are 0; dk's BLAS sums times scale
        for (int64_t r = 0; r < p.R; ++r) {
          const int64_t len = p.len[r] * D;
          if (need.k) {
            acc_t* g = kv_rows(dk_part, task, b, h, r);
            if (!small) scale_row(g, p.scale, len);
            std::fill(g + len, g + p.N * D, acc_t(0));
          }
          if (need.v) {
            acc_t* g = kv_rows(dv_part, task, b, h, r);
            std::fill(g + len, g + p.N * D, acc_t(0));
          }
        }
      }
      if (need_th)  // dtheta_t[i, :] = sum_y gy[y, i] C[t, y, :]
        for (int64_t t = 0; t < T; ++t)
          for (int64_t y = 0; y < Hg; ++y)
            for (int64_t ki = 0; ki < p.Ky; ++ki)
              axpy_row(dthp + t * KK + ki * p.Kx, gy[y * p.Ky + ki], C.data() + (t * Hg + y) * p.Kx, p.Kx);
    }
  });
}

// dst[i] = sum_c part[c][i] in chunk order (the fixed-order half of the deterministic reductions)
template <typename acc_t, typename out_t>
void sum_chunks(const acc_t* part, int64_t nchunk, int64_t len, out_t* dst) {
  for (int64_t i = 0; i < len; ++i) {
    acc_t s = part[i];
    for (int64_t c = 1; c < nchunk; ++c) s += part[c * len + i];
    dst[i] = static_cast<out_t>(s);
  }
}

std::vector<Tensor> region_attention_bwd(const Tensor& grad_out, const Tensor& q, const Tensor& k,
                                         const Tensor& v, const Tensor& weights, const Tensor& masks, bool affine,
                                         const c10::optional<Tensor>& theta, const c10::optional<Tensor>& tokens,
                                         const c10::optional<Tensor>& gy, const c10::optional<Tensor>& gx,
                                         const c10::optional<Tensor>& pin, double scale, const Tensor& lse,
                                         const c10::List<bool>& needs, const c10::optional<Tensor>& logits,
                                         const c10::optional<Tensor>& lengths,
                                         const c10::optional<Tensor>& grad_probs) {
  TORCH_CHECK(q.device().is_cpu(), "stattn native: CPU tensors only");
  TORCH_CHECK(needs.size() == 6, "stattn native: needs must hold 6 flags");
  TORCH_CHECK(grad_out.sizes() == q.sizes(), "stattn native: grad_out must have q's shape");
  const bool has_theta = theta.has_value() && theta->defined();
  Needs need{needs.get(0), needs.get(1), needs.get(2), needs.get(3), needs.get(4), needs.get(5) && has_theta};
  std::vector<Tensor> out(6);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "stattn_native_bwd", [&] {
    using in_t = scalar_t;
    using acc_t = std::conditional_t<std::is_same_v<in_t, double>, double, float>;
    const auto acc = c10::CppTypeToScalarType<acc_t>::value;
    auto p = make_problem<acc_t>(q, k, v, weights, masks, affine, theta, tokens, gy, gx, pin, scale, lengths);
    TORCH_CHECK(lse.sizes() == at::IntArrayRef({p.B, p.R + p.has_pin, p.H, p.M}) && lse.scalar_type() == at::kFloat,
                "stattn native: lse must be float32 [B, R + has_pin, H, M]");
    const int64_t nchunk = (p.M + kChunkM - 1) / kChunkM, tasks = p.B * p.H * nchunk;
    const int64_t NDR = p.R * p.Np * p.D, KK = p.Ky * p.Kx;  // per-task dk / dv partials: [R * Np, D]
    auto opts = q.options().dtype(acc);
    Tensor lse_c = lse.contiguous();
    const bool saved = logits.has_value() && logits->defined() && logits->numel() > 0;
    TORCH_CHECK(!saved || (logits->sizes() == at::IntArrayRef({p.B, p.H, p.M, p.R * p.N}) &&
                           logits->scalar_type() == acc && logits->is_contiguous()),
                "stattn native: logits must be the forward's saved logits [B, H, M, R * N], contiguous");
    const bool has_g = grad_probs.has_value() && grad_probs->defined();
    TORCH_CHECK_VALUE(!has_g || (grad_probs->sizes() == at::IntArrayRef({p.B, p.H, p.M, p.N}) &&
                                 grad_probs->scalar_type() == acc),
                      "stattn native: grad_probs must be [B, H, M, N] = [", p.B, ", ", p.H, ", ", p.M, ", ", p.N,
                      "] in the compute dtype ", acc, ", got ", grad_probs->sizes(), " ", grad_probs->scalar_type());
    Tensor g_c = has_g ? grad_probs->contiguous() : Tensor();
    Tensor dq = need.q ? output_bmhd(q) : Tensor();  // in o's layout
    // dk / dv: written by the kernel into the outputs (direct: one chunk per head, outputs in the
    // compute type) or summed from per-(b, h, chunk) partials afterwards
    const bool direct = nchunk == 1 && std::is_same_v<in_t, acc_t>;
    Tensor dk_g = need.k && direct ? output(k.sizes(), k.options()) : Tensor();
    Tensor dv_g = need.v && direct ? output(k.sizes(), k.options()) : Tensor();
    Tensor dk_part = need.k && !direct ? at::zeros({tasks, NDR}, opts) : dk_g;
    Tensor dv_part = need.v && !direct ? at::zeros({tasks, NDR}, opts) : dv_g;
    Tensor dth_part = (need.t && p.T > 0) ? at::zeros({tasks, p.T * KK}, opts) : Tensor();
    Tensor dfull = output({p.B, p.H, p.R, p.M}, opts);
    // fp64 recomputes the log-sum-exps in fp64 (the saved ones are float32)
    backward_kernel<in_t, acc_t>(p, need, q, grad_out, lse_c, std::is_same_v<acc_t, double>,
                                 saved ? logits->data_ptr<acc_t>() : nullptr, dq,
                                 need.k ? dk_part.data_ptr<acc_t>() : nullptr,
                                 need.v ? dv_part.data_ptr<acc_t>() : nullptr, direct,
                                 dth_part.defined() ? dth_part.data_ptr<acc_t>() : nullptr,
                                 dfull.data_ptr<acc_t>(), nchunk, has_g ? g_c.data_ptr<acc_t>() : nullptr);
    out[0] = need.q ? dq : at::empty({0}, q.options());
    // dk / dv [B, R, H, N, D] from the per-(b, h, chunk) partials [B, H, C, R, Np, D]
    for (int which = 0; which < 2; ++which) {
      const bool wanted = which == 0 ? need.k : need.v;
      if (!wanted || direct) {
        out[1 + which] = wanted ? (which == 0 ? dk_g : dv_g) : at::empty({0}, q.options());
        continue;
      }
      const acc_t* part = (which == 0 ? dk_part : dv_part).template data_ptr<acc_t>();
      const acc_t factor = which == 0 ? p.scale : acc_t(1);
      Tensor g = output(k.sizes(), k.options());
      in_t* gp = g.data_ptr<in_t>();
      const int64_t ND = p.N * p.D;
      at::parallel_for(0, p.B * p.R * p.H, 1, [&](int64_t begin, int64_t end) {
        for (int64_t brh = begin; brh < end; ++brh) {
          const int64_t b = brh / (p.R * p.H), r = (brh / p.H) % p.R, h = brh % p.H;
          const acc_t* first = part + ((b * p.H + h) * nchunk) * NDR + r * p.Np * p.D;
          if (nchunk == 1) {  // (a loop the compiler vectorises)
            for (int64_t i = 0; i < ND; ++i) gp[brh * ND + i] = static_cast<in_t>(first[i] * factor);
            continue;
          }
          for (int64_t i = 0; i < ND; ++i) {
            acc_t acc_v = first[i];
            for (int64_t c = 1; c < nchunk; ++c) acc_v += first[c * NDR + i];
            gp[brh * ND + i] = static_cast<in_t>(acc_v * factor);
          }
        }
      });
      out[1 + which] = g;
    }
    // dalpha [B, R, M] = sum_h D (fixed head order); affine: regions >= 1 see D_r - D_0
    if (need.w || need.m) {
      Tensor dalpha = output({p.B, p.R, p.M}, opts);
      acc_t* da = dalpha.data_ptr<acc_t>();
      const acc_t* df = dfull.data_ptr<acc_t>();
      for (int64_t b = 0; b < p.B; ++b)
        for (int64_t r = 0; r < p.R; ++r)
          for (int64_t m = 0; m < p.M; ++m) {
            acc_t s = 0;
            for (int64_t h = 0; h < p.H; ++h) s += df[((b * p.H + h) * p.R + r) * p.M + m];
            da[(b * p.R + r) * p.M + m] = s;
          }
      if (p.affine) {
        for (int64_t b = 0; b < p.B; ++b)
          for (int64_t m = 0; m < p.M; ++m) {
            const acc_t d0 = da[b * p.R * p.M + m];
            for (int64_t r = 1; r < p.R; ++r) da[(b * p.R + r) * p.M + m] -= d0;
            da[b * p.R * p.M + m] = 0;
          }
      }
      const Tensor wc = p.weights.contiguous(), mc = p.masks.contiguous();
      const acc_t* w = wc.template data_ptr<acc_t>();
      const acc_t* mk = mc.template data_ptr<acc_t>();
      if (need.w) {
        Tensor dw = output({p.B, p.R}, opts);
        for (int64_t br = 0; br < p.B * p.R; ++br) {
          acc_t s = 0;
          for (int64_t m = 0; m < p.M; ++m) s += da[br * p.M + m] * mk[br * p.M + m];
          dw.data_ptr<acc_t>()[br] = s;
        }
        out[3] = dw.to(weights.scalar_type());
      } else {
        out[3] = at::empty({0}, q.options());
      }
      if (need.m) {
        Tensor dm = output({p.B, p.R, p.M}, opts);
        for (int64_t br = 0; br < p.B * p.R; ++br)
          for (int64_t m = 0; m < p.M; ++m) dm.data_ptr<acc_t>()[br * p.M + m] = da[br * p.M + m] * w[br];
        out[4] = dm.to(masks.scalar_type());
      } else {
        out[4] = at::empty({0}, q.options());
      }
    } else {
      out[3] = at::empty({0}, q.options());
      out[4] = at::empty({0}, q.options());
    }
    if (need.t) {
      const auto tdt = theta->scalar_type();
      if (p.T == 0) {
        out[5] = at::zeros(theta->sizes(), theta->options().memory_format(at::MemoryFormat::Contiguous));
      } else {
        Tensor dth = output(theta->sizes(), opts);
        const int64_t len = p.T * KK;
        for (int64_t bh = 0; bh < p.B * p.H; ++bh)
          sum_chunks(dth_part.data_ptr<acc_t>() + bh * nchunk * len, nchunk, len, dth.data_ptr<acc_t>() + bh * len);
        out[5] = dth.to(tdt);
      }
    } else {
      out[5] = at::empty({0}, q.options());
    }
  });
  return out;
}

}  // namespace stattn_native

TORCH_LIBRARY(stattn_native, m) {
  m.def("region_attention(Tensor q, Tensor k, Tensor v, Tensor weights, Tensor masks, bool affine, "
        "Tensor? theta, Tensor? tokens, Tensor? gy, Tensor? gx, Tensor? pin, float scale, bool save_logits=False, "
        "Tensor? lengths=None, bool want_probs=False) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("region_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor weights, "
        "Tensor masks, bool affine, Tensor? theta, Tensor? tokens, Tensor? gy, Tensor? gx, Tensor? pin, "
        "float scale, Tensor lse, bool[] needs, Tensor? logits=None, Tensor? lengths=None, "
        "Tensor? grad_probs=None) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(stattn_native, CPU, m) {
  m.impl("region_attention", &stattn_native::region_attention_fwd);
  m.impl("region_attention_backward", &stattn_native::region_attention_bwd);
}
