// Few-row matrix-vector products for CPU decoding: out[m, n] = sum_k x[m, k] * w[n, k] for m < M <= 4.
//
// At batch 1 a decoding step is a chain of GEMVs whose cost is reading the weights once. Each weight row is read
// once and multiplied with all M input rows while it is in registers, so a step over a few tokens (a speculative
// verification) costs about what one token costs. fp32 uses FMA, bf16 uses AVX512-BF16's dot product of pairs
// (products accumulated in fp32). Rows of the weight are split over the ATen thread pool.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>

namespace {

constexpr int64_t kMaxRows = 4;  // beyond 4 rows oneDNN's blocked kernel is as fast (measured)

// What differs between the two dtypes: the element, how many fit one 512-bit vector, the masked load, the
// multiply-add into fp32 lanes, and how a finished fp32 sum is stored.
struct F32 {
  using T = float;
  using Vec = __m512;
  static constexpr int64_t kWidth = 16;
  static Vec load(int64_t left, const T* p) { return _mm512_maskz_loadu_ps(left >= 16 ? 0xFFFF : (1u << left) - 1, p); }
  static __m512 fma(__m512 acc, Vec w, Vec x) { return _mm512_fmadd_ps(w, x, acc); }
  static T store(float v) { return v; }
};

struct BF16 {  // bf16 as its raw bits
  using T = uint16_t;
  using Vec = __m512bh;
  static constexpr int64_t kWidth = 32;
  static Vec load(int64_t left, const T* p) {
    return (Vec)_mm512_maskz_loadu_epi16(left >= 32 ? 0xFFFFFFFFu : (1u << left) - 1, p);
  }
  static __m512 fma(__m512 acc, Vec w, Vec x) { return _mm512_dpbf16_ps(acc, w, x); }  // pairs, fp32 accumulation
  static T store(float v) { return c10::BFloat16(v).x; }  // round to nearest even, as torch does
};

// R weight rows at a time: M x R independent accumulator chains keep the FMA units busy (one chain per row would
// wait on the FMA latency), and each loaded input vector serves R rows. The next block's rows are prefetched (1.3x
// on this machine's streaming rate). The tail of K is a masked step.
template <typename D, int M, int R>
inline void rows(const typename D::T* x, const typename D::T* w, typename D::T* out, int64_t K, int64_t N, int64_t n) {
  __m512 acc[M * R];
  for (int i = 0; i < M * R; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += D::kWidth) {
    typename D::Vec wv[R];
    for (int r = 0; r < R; ++r) {
      _mm_prefetch((const char*)(w + (n + R + r) * K + k), _MM_HINT_T0);
      wv[r] = D::load(K - k, w + (n + r) * K + k);
    }
    for (int m = 0; m < M; ++m) {
      const typename D::Vec xv = D::load(K - k, x + m * K + k);
      for (int r = 0; r < R; ++r) acc[m * R + r] = D::fma(acc[m * R + r], wv[r], xv);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) out[m * N + n + r] = D::store(_mm512_reduce_add_ps(acc[m * R + r]));
}

// Rows [n0, n1): blocks of R = 8 / M rows (at most 8 accumulators), then one row at a time. A prefetch past the
// last row is harmless: prefetches never fault.
template <typename D, int M>
void gemv_rows(const typename D::T* x, const typename D::T* w, typename D::T* out, int64_t K, int64_t N, int64_t n0,
               int64_t n1) {
  constexpr int R = 8 / M;
  int64_t n = n0;
  for (; n + R <= n1; n += R) rows<D, M, R>(x, w, out, K, N, n);
  for (; n < n1; ++n) rows<D, M, 1>(x, w, out, K, N, n);
}

template <typename D>
void run(const typename D::T* x, const typename D::T* w, typename D::T* out, int64_t M, int64_t K, int64_t N) {
  using T = typename D::T;
  using Kernel = void (*)(const T*, const T*, T*, int64_t, int64_t, int64_t, int64_t);
  static constexpr Kernel kernels[kMaxRows] = {gemv_rows<D, 1>, gemv_rows<D, 2>, gemv_rows<D, 3>, gemv_rows<D, 4>};
  const Kernel kernel = kernels[M - 1];
  // ~64 KB of weights per task: small enough to balance two threads, large enough to amortise the dispatch
  const int64_t grain = std::max<int64_t>(16, 65536 / (K * (int64_t)sizeof(T)));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) { kernel(x, w, out, K, N, n0, n1); });
}

}  // namespace

// x: [M, K] contiguous, w: [N, K] contiguous, same dtype (float32 or bfloat16), 1 <= M <= 4 -> [M, N].
torch::Tensor gemv(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "gemv: x [M, K] and w [N, K]");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= kMaxRows, "gemv: 1 <= M <= ", kMaxRows);
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "gemv: x and w must have one dtype");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), "gemv: contiguous inputs");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto out = torch::empty({M, N}, x.options());
  if (x.scalar_type() == torch::kFloat) {
    run<F32>(x.data_ptr<float>(), w.data_ptr<float>(), out.data_ptr<float>(), M, K, N);
  } else {
    TORCH_CHECK(x.scalar_type() == torch::kBFloat16, "gemv: float32 or bfloat16");
    auto bits = [](torch::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>()); };
    run<BF16>(bits(x), bits(w), bits(out), M, K, N);
  }
  return out;
}

// RMSNorm in one pass per row, as transformers computes it: y = x * rsqrt(mean(x^2) + eps) in fp32, cast to x's
// dtype, times the weight (in x's dtype). F.rms_norm is ~6 separate ops on CPU (~40 us per call at one row).
template <typename T>
void rms_norm_rows(const T* x, const T* w, T* out, int64_t D, float eps, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    const T* row = x + t * D;
    float ss = 0.f;
    for (int64_t d = 0; d < D; ++d) ss += static_cast<float>(row[d]) * static_cast<float>(row[d]);
    const float scale = 1.f / std::sqrt(ss / static_cast<float>(D) + eps);
    for (int64_t d = 0; d < D; ++d)
      out[t * D + d] = static_cast<T>(static_cast<float>(w[d]) * static_cast<float>(static_cast<T>(row[d] * scale)));
  }
}

// x: [T, D] contiguous, w: [D], same dtype (float32 or bfloat16) -> [T, D].
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 1 && x.size(1) == w.size(0), "rms_norm: x [T, D] and w [D]");
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "rms_norm: x and w must have one dtype");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), "rms_norm: contiguous inputs");
  auto out = torch::empty_like(x);
  const int64_t T = x.size(0), D = x.size(1);
  const int64_t grain = std::max<int64_t>(1, 16384 / D);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "rms_norm", [&] {
    at::parallel_for(0, T, grain, [&](int64_t t0, int64_t t1) {
      rms_norm_rows(x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), D, (float)eps, t0, t1);
    });
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv", &gemv, "few-row matrix-vector product, x @ w.T");
  m.def("rms_norm", &rms_norm, "RMSNorm of each row, computed in fp32");
}
