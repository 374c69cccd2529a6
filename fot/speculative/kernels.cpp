// CPU kernels for decoding and verification: a matmul for any number of rows, RMSNorm, SwiGLU's gate and ragged
// attention, in fp32 or bf16, built for one of two instruction sets (`kernels.ISAS`): AVX-512 (bf16 products by
// AVX512-BF16's pair dot product, and AMX tiles where the CPU has them) or AVX2 with FMA (bf16 widened to fp32 on
// load, which is exact). Either way every product is accumulated in fp32. Everything above the small vector layer
// below (`V`, kLanes fp32 lanes, and its ops) is written once for both.
//
// The matmul reads its weight [N, K] in one blocked layout (`kernels.pack`), which is the model's only copy of it:
// blocks of 64 output columns, and within a block the columns' values of one k step (one k in fp32, one pair of k
// in bf16) side by side, so that a block is one contiguous stream and each vector load holds kLanes columns' terms.
// An input value (pair) is broadcast to all lanes: no horizontal sums, and each output element is one fp32 chain
// over k in order. So a row's result never depends on how many rows share the call (batch invariance): a
// verification over several tokens rounds exactly as decoding one token at a time does. Up to kTile rows share
// each weight load from registers (on AVX2 a pass covers kGroup of a block's vectors, so that 4 rows' sums fit in
// its 16 registers, and a bf16 input is widened once per call, so that each broadcast is one load); more rows
// re-read the block from cache in segments of kSegment steps, their partial sums kept exactly in fp32 between
// segments, and each pass prefetches its share of the next segment so that memory keeps streaming while the other
// passes compute. Blocks are split over the ATen thread pool.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

// Runs fn(tag) with a null pointer of the element type the kernels use for t's dtype: float, or bfloat16's raw bits.
template <typename Fn>
void dispatch(const torch::Tensor& t, Fn fn) {
  if (t.scalar_type() == torch::kFloat) {
    fn(static_cast<float*>(nullptr));
  } else {
    TORCH_CHECK(t.scalar_type() == torch::kBFloat16, "float32 or bfloat16 only, got ", t.scalar_type());
    fn(static_cast<uint16_t*>(nullptr));
  }
}
template <typename T>
T* ptr(const torch::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); }
inline float to_float(float v) { return v; }
inline float to_float(uint16_t v) { return c10::BFloat16(v, c10::BFloat16::from_bits()); }

// ---- the vector layer: kLanes fp32 lanes; loads of bf16 widen exactly, stores round to nearest even ---------------
// load/store take kLanes values, loadn/storen the first `left` of them (any left >= 1; past kLanes, all); round_as
// is what storing a value in T and reading it back gives (itself in fp32). exp2n(p, n) = p * 2^n, rounded once.

// The element-wise ops, named alike in both instruction sets' intrinsics (P: _mm512 or _mm256). vfma(a, b, c) is
// a * b + c, vfnma(a, b, c) is c - a * b.
#define FOT_ELEMENTWISE(P)                                                   \
  inline V vzero() { return P##_setzero_ps(); }                              \
  inline V vset(float v) { return P##_set1_ps(v); }                          \
  inline V vadd(V a, V b) { return P##_add_ps(a, b); }                       \
  inline V vsub(V a, V b) { return P##_sub_ps(a, b); }                       \
  inline V vmul(V a, V b) { return P##_mul_ps(a, b); }                       \
  inline V vdiv(V a, V b) { return P##_div_ps(a, b); }                       \
  inline V vmin(V a, V b) { return P##_min_ps(a, b); }                       \
  inline V vmax(V a, V b) { return P##_max_ps(a, b); }                       \
  inline V vfma(V a, V b, V c) { return P##_fmadd_ps(a, b, c); }            \
  inline V vfnma(V a, V b, V c) { return P##_fnmadd_ps(a, b, c); }

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512BF16__)
#define FOT_AVX512 1
using V = __m512;
constexpr const char* kIsa = "avx512";
constexpr int64_t kLanes = 16;
constexpr int kGroup = 4;          // weight vectors per pass: the whole block's 64 columns
constexpr int kTile = 6;           // input rows per pass: 6 x 4 accumulators, 4 weight vectors, 1 broadcast
constexpr int64_t kSegment = 256;  // k steps per pass over a block (64 KB)

FOT_ELEMENTWISE(_mm512)
inline V vround(V x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT); }
inline V exp2n(V p, V n) { return _mm512_scalef_ps(p, n); }
inline float vsum(V v) { return _mm512_reduce_add_ps(v); }
inline float vtop(V v) { return _mm512_reduce_max_ps(v); }

inline __mmask16 tail(int64_t left) { return left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1); }
inline V widen(__m256i bf16) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bf16), 16)); }
inline V loadn(const float* p, int64_t left) { return _mm512_maskz_loadu_ps(tail(left), p); }
inline V loadn(const uint16_t* p, int64_t left) { return widen(_mm256_maskz_loadu_epi16(tail(left), p)); }
inline void storen(float* p, V v, int64_t left) { _mm512_mask_storeu_ps(p, tail(left), v); }
inline void storen(uint16_t* p, V v, int64_t left) {
  _mm256_mask_storeu_epi16(p, tail(left), (__m256i)_mm512_cvtneps_pbh(v));
}
inline V round_as(const uint16_t*, V v) { return widen((__m256i)_mm512_cvtneps_pbh(v)); }
inline V load(const float* p) { return _mm512_loadu_ps(p); }
inline V load(const uint16_t* p) { return loadn(p, kLanes); }
inline void store(float* p, V v) { _mm512_storeu_ps(p, v); }
inline void store(uint16_t* p, V v) { storen(p, v, kLanes); }

// The sums of four vectors' lanes, [sum a, sum b, sum c, sum d]: each in a fixed order of its own lanes, whatever
// the other three hold (three shuffle-and-add levels for four sums, instead of one full reduction each).
inline __m128 hsum4(V a, V b, V c, V d) {
  const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xEE));
  __m512 x = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));
  x = _mm512_add_ps(x, _mm512_permute_ps(x, 0x4E));  // 128-bit block k now holds vector k's partial sums
  x = _mm512_add_ps(x, _mm512_permute_ps(x, 0xB1));
  return _mm512_castps512_ps128(_mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), x));
}

#elif defined(__AVX2__) && defined(__FMA__)
using V = __m256;
constexpr const char* kIsa = "avx2";
constexpr int64_t kLanes = 8;
constexpr int kGroup = 2;          // weight vectors per pass: 16 of the block's 64 columns, 4 fp32 vectors in bf16
constexpr int kTile = 4;           // input rows per pass: 4 x 2 accumulators, 4 weight vectors, 2 broadcasts
constexpr int64_t kSegment = 64;   // k steps per pass over a block (16 KB: the later passes read it from L1)

FOT_ELEMENTWISE(_mm256)
inline V vround(V x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
// 2^e for e in [-126, 127], built in the exponent field.
inline V pow2(__m256i e) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e, _mm256_set1_epi32(127)), 23)); }
// For the |n| <= 150 of `vexp`: two exact halves, so that the one rounding is the last product's (as in scalef).
inline V exp2n(V p, V n) {
  const __m256i e = _mm256_cvtps_epi32(n), h = _mm256_srai_epi32(e, 1);
  return vmul(vmul(p, pow2(h)), pow2(_mm256_sub_epi32(e, h)));
}
inline __m128 halves(V v) { return _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1)); }
// The 8 lanes folded by `op`: halves, then pairs, then the last two.
template <class Op>
inline float reduce(V v, Op op) {
  __m128 s = op(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = op(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(op(s, _mm_movehdup_ps(s)));
}
inline float vsum(V v) { return reduce(v, [](__m128 a, __m128 b) { return _mm_add_ps(a, b); }); }
inline float vtop(V v) { return reduce(v, [](__m128 a, __m128 b) { return _mm_max_ps(a, b); }); }

inline __m256i tail(int64_t left) {  // the first min(left, 8) lanes set
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(left, 8))),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline V widen(__m128i bf16) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bf16), 16)); }
// 8 lanes -> their bf16 bits, to nearest even, NaN to 0x7FC0: what c10::BFloat16 does one value at a time.
inline __m128i narrow(V v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}
inline V loadn(const float* p, int64_t left) { return _mm256_maskload_ps(p, tail(left)); }
inline V load(const float* p) { return _mm256_loadu_ps(p); }
inline V load(const uint16_t* p) { return widen(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline void store(float* p, V v) { _mm256_storeu_ps(p, v); }
inline void store(uint16_t* p, V v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), narrow(v)); }
inline V loadn(const uint16_t* p, int64_t left) {
  if (left >= 8) return load(p);
  alignas(16) uint16_t part[8] = {};
  std::memcpy(part, p, left * sizeof(uint16_t));
  return widen(_mm_load_si128(reinterpret_cast<const __m128i*>(part)));
}
inline void storen(float* p, V v, int64_t left) { _mm256_maskstore_ps(p, tail(left), v); }
inline void storen(uint16_t* p, V v, int64_t left) {
  if (left >= 8) return store(p, v);
  alignas(16) uint16_t part[8];
  _mm_store_si128(reinterpret_cast<__m128i*>(part), narrow(v));
  std::memcpy(p, part, left * sizeof(uint16_t));
}
inline V round_as(const uint16_t*, V v) { return widen(narrow(v)); }

inline __m128 hsum4(V a, V b, V c, V d) {  // as AVX-512's: each sum in a fixed order of its own lanes
  return _mm_hadd_ps(_mm_hadd_ps(halves(a), halves(b)), _mm_hadd_ps(halves(c), halves(d)));
}

#else
#error "kernels.cpp needs AVX-512 (F, BW, VL, BF16) or AVX2 with FMA"
#endif

inline V round_as(const float*, V v) { return v; }

constexpr int64_t kColumns = 64;                // output columns per block of the packed layout
constexpr int64_t kVectors = kColumns / kLanes;  // vectors per block step

// What differs between the two dtypes: the element, the input's element as the passes read it (In: T itself, or
// fp32 where a broadcast would otherwise widen the same value once per pass), how many k one step covers, the
// broadcast of a row's step, the load of kLanes columns' weights of a step (W, loaded once for all the rows of a
// pass), their multiply-add into fp32 lanes, and the store of a finished fp32 sum.
struct F32 {
  using T = float;
  using In = T;
  using X = V;
  using W = V;
  static constexpr int64_t kStep = 1;
  static X broadcast(const T* x, int64_t k) { return vset(x[k]); }
  static X broadcast_last(const T* x, int64_t k) { return broadcast(x, k); }
  static W weights(const T* w) { return load(w); }
  static V fma(V acc, W w, X x) { return vfma(w, x, acc); }
  static T round(float v) { return v; }
};

struct BF16 {  // bf16 as its raw bits; a column's pair (k, k + 1) is one 32-bit lane, k in its low half
  using T = uint16_t;
  static constexpr int64_t kStep = 2;
#ifdef FOT_AVX512
  using In = T;
  using X = __m512i;
  static X broadcast(const T* x, int64_t k) {  // the pair (x[k], x[k + 1])
    uint32_t pair;
    std::memcpy(&pair, x + k, sizeof pair);
    return _mm512_set1_epi32(static_cast<int>(pair));
  }
  static X broadcast_last(const T* x, int64_t k) { return _mm512_set1_epi32(x[k]); }  // (x[k], 0): K odd
  using W = __m512bh;
  static W weights(const T* w) { return (__m512bh)_mm512_loadu_si512(w); }
  static V fma(V acc, W w, X x) { return _mm512_dpbf16_ps(acc, w, (__m512bh)x); }
#else
  struct X {  // x[k] and x[k + 1], each widened and broadcast; W: the lanes' weights for k and for k + 1, likewise
    V even, odd;
  };
  using W = X;
  using In = float;  // widened once per call: each broadcast is then one load
  static X broadcast(const In* x, int64_t k) { return {vset(x[k]), vset(x[k + 1])}; }
  static X broadcast_last(const In* x, int64_t k) { return {vset(x[k]), vzero()}; }
  static W weights(const T* w) {  // each lane's pair, widened in place (exact)
    const __m256i pairs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
    return {_mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16)),
            _mm256_castsi256_ps(_mm256_and_si256(pairs, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))))};
  }
  static V fma(V acc, W w, X x) { return vfma(w.odd, x.odd, vfma(w.even, x.even, acc)); }  // k, then k + 1
#endif
  static T round(float v) { return c10::BFloat16(v).x; }  // to nearest even, as torch does
};

// MT rows x kGroup vectors of one block's columns (from vector g on) over k steps [s0, s1): partial sums start at
// zero (first segment) or from `sums` [MT][64], and go back there. A step that would read past a row (K odd in
// bf16) pairs its last value with a zero. Meanwhile `prefetch` lines of the weights from `ahead` on are asked for,
// spread over the steps: when several passes share a segment, each asks for its share of the next one, so that
// memory keeps streaming while the later passes compute from cache.
template <typename D, int MT>
void tile(const typename D::In* x, int64_t K, const typename D::T* block, int64_t g, float* sums, int64_t s0,
          int64_t s1, const char* ahead, int64_t prefetch) {
  constexpr int64_t S = D::kStep;
  V acc[MT][kGroup];
  for (int m = 0; m < MT; ++m)
    for (int v = 0; v < kGroup; ++v) acc[m][v] = s0 == 0 ? vzero() : load(sums + (m * kVectors + g + v) * kLanes);
  const typename D::T* w = block + (s0 * kColumns + g * kLanes) * S;
  const int64_t whole = std::min(s1, K / S);  // steps whose values all lie inside the row
  int64_t spread = 0;
  for (int64_t s = s0; s < s1; ++s, w += kColumns * S) {
    for (spread += prefetch; spread >= s1 - s0; spread -= s1 - s0, ahead += 64) _mm_prefetch(ahead, _MM_HINT_T0);
    typename D::W ws[kGroup];
    for (int v = 0; v < kGroup; ++v) ws[v] = D::weights(w + v * kLanes * S);
    for (int m = 0; m < MT; ++m) {
      const typename D::X xs = s < whole ? D::broadcast(x + m * K, s * S) : D::broadcast_last(x + m * K, s * S);
      for (int v = 0; v < kGroup; ++v) acc[m][v] = D::fma(acc[m][v], ws[v], xs);
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int v = 0; v < kGroup; ++v) store(sums + (m * kVectors + g + v) * kLanes, acc[m][v]);
}

// Block b's finished fp32 sums [M][64] (+ bias) into its columns of out [M, N], each rounded once to the dtype.
template <typename D>
void store_block(const float* sums, const typename D::T* bias, typename D::T* out, int64_t M, int64_t N, int64_t b) {
  const int64_t n0 = b * kColumns, width = std::min(kColumns, N - n0);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < width; ++j) {
      const float v = sums[m * kColumns + j];
      out[m * N + n0 + j] = D::round(bias ? v + to_float(bias[n0 + j]) : v);
    }
}

template <typename D>
using Tile = void (*)(const typename D::In*, int64_t, const typename D::T*, int64_t, float*, int64_t, int64_t,
                      const char*, int64_t);
template <typename D, size_t... I>
constexpr std::array<Tile<D>, sizeof...(I)> tiles_of(std::index_sequence<I...>) { return {tile<D, I + 1>...}; }

template <typename D>
void matmul_impl(const typename D::T* x, const typename D::T* packed, const typename D::T* bias, typename D::T* out,
                 int64_t M, int64_t K, int64_t N) {
  using T = typename D::T;
  static constexpr auto tiles = tiles_of<D>(std::make_index_sequence<kTile>());  // tiles[r - 1]: r rows
  constexpr int64_t kStepBytes = kColumns * D::kStep * sizeof(T);
  const int64_t steps = (K + D::kStep - 1) / D::kStep, blocks = (N + kColumns - 1) / kColumns;
  const typename D::In* in;
  std::vector<float> wide;
  if constexpr (std::is_same_v<typename D::In, T>) {
    in = x;
  } else {
    wide.resize(static_cast<size_t>(M * K));
    for (int64_t i = 0; i < M * K; i += kLanes) storen(wide.data() + i, loadn(x + i, M * K - i), M * K - i);
    in = wide.data();
  }
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> sums(static_cast<size_t>(M * kColumns));
    for (int64_t b = b0; b < b1; ++b) {
      const T* block = packed + b * steps * kColumns * D::kStep;
      for (int64_t s0 = 0; s0 < steps; s0 += kSegment) {
        const int64_t s1 = std::min(steps, s0 + kSegment);
        // the weights right after this segment (the next segment, or the next block's first): blocks are contiguous
        const char* next = reinterpret_cast<const char*>(block) + s1 * kStepBytes;
        // each pass asks for its share of them, in proportion to its rows
        const int64_t lines = kSegment * kStepBytes / 64, shares = kVectors / kGroup * M;
        for (int64_t g = 0; g < kVectors; g += kGroup)
          for (int64_t m = 0; m < M; m += kTile) {
            const int64_t rows = std::min<int64_t>(kTile, M - m), done = g / kGroup * M + m;
            const int64_t first = lines * done / shares, last = lines * (done + rows) / shares;
            tiles[rows - 1](in + m * K, K, block, g, sums.data() + m * kColumns, s0, s1, next + first * 64,
                            last - first);
          }
      }
      store_block<D>(sums.data(), bias, out, M, N, b);
    }
  });
}

bool amx_on = false;  // set once by `enable_amx`, where the CPU has AMX and Linux grants its state

#ifdef FOT_AVX512
// ---- the bf16 matmul on AMX tiles, where this CPU has them (see `enable_amx`) ---------------------------------
//
// The packed layout is already what a B tile wants: a block's step s holds 16 columns' pairs in each 64 bytes, so
// 16 steps x 16 columns is one tile at a stride of 256 bytes. Each pass holds 16 input rows x one block's 64
// columns in four fp32 C tiles and walks k 16 pairs at a time, one A tile and four B tiles per step. The rows are
// read in place, 16 at a time, the last M % 16 by tiles of that many rows (a tile padded with zero rows would read
// and multiply them every step). A tile computes each row alone, so each output element comes from the same tile
// products over k in the same order whatever else shares the call (batch invariance, tested from 1 to 48 rows). The
// tiles round a pair's sum unlike `vdpbf16ps`, so the two paths differ in the last bits: AMX is used for every
// bf16 matmul whose K is a multiple of 32, in every call of the process, or for none.
constexpr int64_t kPairs = 16;  // k pairs per tile step: an A tile row is 32 bf16 (64 bytes)
constexpr int64_t kAhead = kPairs * 256;  // weights asked for one tile step (4 KB) ahead of the tile loads

struct TileConfig {  // palette 1 (the AMX register file layout of the ISA reference)
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

TileConfig tile_config(int64_t rows) {  // C tiles 0-3 and the A tile 4 of `rows` rows, B tiles 5-7 of 16
  TileConfig config;
  for (int t = 0; t < 8; ++t) config.rows[t] = t < 5 ? rows : 16, config.colsb[t] = 64;
  return config;
}

void amx_impl(const uint16_t* x, const uint16_t* packed, const uint16_t* bias, uint16_t* out, int64_t M, int64_t K,
              int64_t N) {
  const int64_t steps = K / 2, blocks = (N + kColumns - 1) / kColumns;
  // with one row group, a block's whole k range stays in the C tiles; more groups share each segment from cache
  const int64_t segment = M <= 16 ? steps : kSegment;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    int64_t configured = 0;  // the rows of the tile configuration loaded now
    std::vector<float> sums(static_cast<size_t>(M * kColumns));
    for (int64_t b = b0; b < b1; ++b) {
      const uint16_t* block = packed + b * steps * kColumns * 2;
      for (int64_t s0 = 0; s0 < steps; s0 += segment) {
        const int64_t s1 = std::min(steps, s0 + segment);
        for (int64_t g = 0; g < M; g += 16) {
          const int64_t rows = std::min<int64_t>(16, M - g);
          if (rows != configured) {  // the last group of M % 16 rows has its own (loading one zeroes every tile)
            const TileConfig config = tile_config(rows);
            _tile_loadconfig(&config);
            configured = rows;
          }
          float* c = sums.data() + g * kColumns;  // [rows][64 columns], 256 bytes a row
          if (s0 == 0) {
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
          } else {
            _tile_loadd(0, c, 256);
            _tile_loadd(1, c + 16, 256);
            _tile_loadd(2, c + 32, 256);
            _tile_loadd(3, c + 48, 256);
          }
          const uint16_t* a = x + g * K;
          for (int64_t s = s0; s < s1; s += kPairs) {
            const uint16_t* w = block + s * kColumns * 2;  // 16 steps of 256 bytes; each tile's columns 64 bytes on
            if (g == 0) {  // the first pass streams the weights from memory: ask for them well ahead (tile loads
                           // are not prefetched by the hardware as vector loads are)
              const char* ahead = reinterpret_cast<const char*>(w) + kAhead;
              for (int64_t line = 0; line < kPairs * 256; line += 64) _mm_prefetch(ahead + line, _MM_HINT_T0);
            }
            _tile_loadd(4, a + 2 * s, K * 2);
            _tile_loadd(5, w, 256);
            _tile_dpbf16ps(0, 4, 5);
            _tile_loadd(6, w + 32, 256);
            _tile_dpbf16ps(1, 4, 6);
            _tile_loadd(7, w + 64, 256);
            _tile_dpbf16ps(2, 4, 7);
            _tile_loadd(5, w + 96, 256);
            _tile_dpbf16ps(3, 4, 5);
          }
          _tile_stored(0, c, 256);
          _tile_stored(1, c + 16, 256);
          _tile_stored(2, c + 32, 256);
          _tile_stored(3, c + 48, 256);
        }
      }
      store_block<BF16>(sums.data(), bias, out, M, N, b);
    }
    _tile_release();
  });
}

#endif  // FOT_AVX512

}  // namespace

// Asks Linux for the AMX tile state (once per process) and, where it is granted, routes every bf16 matmul whose K
// is a multiple of 32 to the tiles from then on. Called by `kernels.load()` before any matmul, so that every call
// of a process takes the same path. Returns whether AMX is on (never in the AVX2 build).
bool enable_amx() {
#ifdef FOT_AVX512
  constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  amx_on = amx_on || syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
#endif
  return amx_on;
}

// x: [M, K] contiguous, any M >= 1; packed: a weight [N, K] of x's dtype (float32 or bfloat16) laid out by
// `kernels.pack` as [ceil(N / 64), ceil(K / step), 64, step] (step: 1 in fp32, 2 in bf16), zero-padded; bias:
// [N] or None -> x @ w.T + bias, [M, N], each sum rounded once to the dtype.
torch::Tensor matmul(torch::Tensor x, torch::Tensor packed, int64_t N, std::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) >= 1, "matmul: x [M, K] with M >= 1");
  TORCH_CHECK(x.scalar_type() == packed.scalar_type(), "matmul: x and the weight must have one dtype");
  TORCH_CHECK(x.is_contiguous() && packed.is_contiguous(), "matmul: contiguous inputs");
  if (bias)
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->scalar_type() == x.scalar_type() &&
                    bias->is_contiguous(), "matmul: bias [N] of x's dtype");
  const int64_t M = x.size(0), K = x.size(1);
  auto out = torch::empty({M, N}, x.options());
  dispatch(x, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using D = std::conditional_t<std::is_same_v<T, float>, F32, BF16>;
    const std::vector<int64_t> shape = {(N + kColumns - 1) / kColumns, (K + D::kStep - 1) / D::kStep, kColumns,
                                        D::kStep};
    TORCH_CHECK(packed.sizes() == shape, "matmul: the weight is not packed for [N, K] = [", N, ", ", K, "]");
#ifdef FOT_AVX512
    if constexpr (std::is_same_v<T, uint16_t>) {
      if (amx_on && K % (2 * kPairs) == 0) {
        amx_impl(ptr<T>(x), ptr<T>(packed), bias ? ptr<T>(*bias) : nullptr, ptr<T>(out), M, K, N);
        return;
      }
    }
#endif
    matmul_impl<D>(ptr<T>(x), ptr<T>(packed), bias ? ptr<T>(*bias) : nullptr, ptr<T>(out), M, K, N);
  });
  return out;
}

// ---- row-wise ops: kLanes of fp32 at a time, bf16 widened on load and rounded (to nearest even) on store ------

// Every row of x through fn(row in, row out), split over the ATen threads in chunks of ~16K input values (a few
// rows stay on one thread: waking the other costs more than it saves).
template <typename T, typename Fn>
void for_rows(const T* x, int64_t in_width, T* out, int64_t out_width, int64_t rows, Fn fn) {
  const int64_t grain = std::max<int64_t>(1, 16384 / in_width);
  at::parallel_for(0, rows, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) fn(x + t * in_width, out + t * out_width);
  });
}

// RMSNorm as transformers computes it: y = x * rsqrt(mean(x^2) + eps) in fp32, cast to x's dtype, times the weight
// (in x's dtype). In PyTorch that is ~6 separate ops on CPU (~17 us per call at one row, bf16, 576 wide).
template <typename T>
void rms_norm_row(const T* x, const T* w, T* y, int64_t D, float eps) {
  V ss = vzero();
  for (int64_t d = 0; d < D; d += kLanes) {
    const V v = loadn(x + d, D - d);
    ss = vfma(v, v, ss);
  }
  const V scale = vset(1.f / std::sqrt(vsum(ss) / static_cast<float>(D) + eps));
  for (int64_t d = 0; d < D; d += kLanes) {
    const V normed = round_as(x, vmul(loadn(x + d, D - d), scale));
    storen(y + d, vmul(loadn(w + d, D - d), normed), D - d);
  }
}

// x: [T, D] contiguous, w: [D], same dtype (float32 or bfloat16) -> [T, D].
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 1 && x.size(1) == w.size(0), "rms_norm: x [T, D] and w [D]");
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "rms_norm: x and w must have one dtype");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), "rms_norm: contiguous inputs");
  auto out = torch::empty_like(x);
  const int64_t D = x.size(1);
  dispatch(x, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* weight = ptr<T>(w);
    for_rows(ptr<T>(x), D, ptr<T>(out), D, x.size(0), [&](const T* row, T* y) {
      rms_norm_row(row, weight, y, D, static_cast<float>(eps));
    });
  });
  return out;
}

// e^x for each lane: x = n ln2 + r with |r| <= ln2 / 2, e^r by Cephes' degree-5 polynomial (~1 ulp), times 2^n
// (`exp2n`, which overflows to inf and underflows to 0 where e^x does; x is clamped first so that +-inf do too).
inline V vexp(V x) {
  x = vmin(vset(89.f), vmax(vset(-104.f), x));  // keeps NaN; -inf -> 0
  const V n = vround(vmul(x, vset(1.44269504088896341f)));
  V r = vfnma(n, vset(0.693359375f), x);
  r = vfnma(n, vset(-2.12194440e-4f), r);
  V p = vset(1.9875691500e-4f);
  for (float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    p = vfma(p, r, vset(c));
  p = vfma(p, vmul(r, r), vadd(r, vset(1.f)));
  return exp2n(p, n);
}

// SwiGLU's gate: silu(gate) * up, rounded to the dtype after each of the two ops as PyTorch's F.silu(g) * u is.
template <typename T>
void silu_mul_row(const T* x, T* y, int64_t H) {
  for (int64_t d = 0; d < H; d += kLanes) {
    const V g = loadn(x + d, H - d);
    const V silu = round_as(x, vdiv(g, vadd(vset(1.f), vexp(vsub(vzero(), g)))));
    storen(y + d, vmul(silu, loadn(x + H + d, H - d)), H - d);
  }
}

// x: [T, 2H] (each row: the gate's H values, then the up projection's) -> [T, H].
torch::Tensor silu_mul(torch::Tensor x) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) % 2 == 0 && x.is_contiguous(), "silu_mul: contiguous x [T, 2H]");
  const int64_t H = x.size(1) / 2;
  auto out = torch::empty({x.size(0), H}, x.options());
  dispatch(x, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    for_rows(ptr<T>(x), 2 * H, ptr<T>(out), H, x.size(0), [&](const T* row, T* y) { silu_mul_row(row, y, H); });
  });
  return out;
}

// ---- attention over a flat ragged batch (EMS-SD's unpadded step) ------------------------------------------------
// One call does what is ~15 PyTorch ops per layer at small batch (RoPE on queries and keys, the two cache writes,
// the query scatter, the masked SDPA and the gather back): token t of the flat batch rotates its query and key at
// position pos[t], writes its key and value to its sample's cache slot slot[t] at index[t], and attends to that
// slot's entries 0..index[t] (its cache and its own sample's earlier new tokens: causal), with no padding and no
// mask. The same arithmetic for every token whatever the batch, so a token's output does not depend on what else
// is in the step. fp32 inside; bf16 is rounded once on the way out.

inline void from_float(float* p, float v) { *p = v; }
inline void from_float(uint16_t* p, float v) { *p = c10::BFloat16(v).x; }

// RoPE in the rotate-half layout: y = x * cos + (-x2, x1) * sin, where cos/sin repeat their first half.
template <typename T, typename Out>
void rotate_half(const T* x, const float* cos, const float* sin, Out* y, int64_t D) {
  const int64_t h = D / 2;
  for (int64_t i = 0; i < h; ++i) {
    const float x1 = to_float(x[i]), x2 = to_float(x[h + i]);
    from_float(y + i, x1 * cos[i] - x2 * sin[i]);
    from_float(y + h + i, x2 * cos[h + i] + x1 * sin[h + i]);
  }
}

template <typename T>
void attend_impl(const T* qkv, const float* cos, const float* sin, const int64_t* pos, const int64_t* slot,
                 const int64_t* index, T* kc, T* vc, T* out, int64_t Tn, int64_t H, int64_t KV, int64_t D,
                 int64_t max_len) {
  const int64_t G = H / KV, width = (H + 2 * KV) * D, vectors = D / kLanes;
  auto entry = [&](int64_t t, int64_t h) { return ((slot[t] * KV + h) * max_len + index[t]) * D; };
  std::vector<float> q((size_t)(Tn * H * D));  // rotated queries, fp32
  at::parallel_for(0, Tn, 1, [&](int64_t t0, int64_t t1) {  // phase 1: RoPE and the cache writes of every token
    for (int64_t t = t0; t < t1; ++t) {
      const T* row = qkv + t * width;
      const float *c = cos + pos[t] * D, *s = sin + pos[t] * D;
      for (int64_t h = 0; h < H; ++h) rotate_half(row + h * D, c, s, q.data() + (t * H + h) * D, D);
      for (int64_t h = 0; h < KV; ++h) {
        rotate_half(row + (H + h) * D, c, s, kc + entry(t, h), D);
        std::memcpy(vc + entry(t, h), row + (H + KV + h) * D, D * sizeof(T));
      }
    }
  });
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  at::parallel_for(0, Tn * H, 1, [&](int64_t i0, int64_t i1) {  // phase 2: one (token, query head) per item
    std::vector<float> p;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t t = i / H, h = (i % H) / G, L = index[t] + 1;  // GQA: query head i % H reads KV head h
      const T* keys = kc + ((slot[t] * KV + h) * max_len) * D;
      const T* values = vc + ((slot[t] * KV + h) * max_len) * D;
      const float* qv = q.data() + i * D;
      const int64_t padded = (L + 15) / 16 * 16;
      p.resize((size_t)padded);
      auto dot = [&](int64_t j) {
        V d = vzero();
        if (j < L)
          for (int64_t v = 0; v < vectors; ++v) d = vfma(load(qv + v * kLanes), load(keys + j * D + v * kLanes), d);
        return d;
      };
      for (int64_t j = 0; j < L; j += 4)  // scores, four keys per reduction
        _mm_storeu_ps(p.data() + j, _mm_mul_ps(hsum4(dot(j), dot(j + 1), dot(j + 2), dot(j + 3)), _mm_set1_ps(scale)));
      std::fill(p.begin() + L, p.end(), -INFINITY);
      V top = vset(-INFINITY), sum = vzero();  // softmax, kLanes scores at a time
      for (int64_t j = 0; j < padded; j += kLanes) top = vmax(top, load(p.data() + j));
      top = vset(vtop(top));
      for (int64_t j = 0; j < padded; j += kLanes) {
        const V e = vexp(vsub(load(p.data() + j), top));
        store(p.data() + j, e);
        sum = vadd(sum, e);
      }
      const V inv = vset(1.f / vsum(sum));
      for (int64_t v0 = 0; v0 < vectors; v0 += 4) {  // the weighted sum of values, 4 vectors of the head at a time
        const int64_t n = std::min<int64_t>(4, vectors - v0);
        V acc[4] = {vzero(), vzero(), vzero(), vzero()};
        for (int64_t j = 0; j < L; ++j) {
          const V pj = vset(p[j]);
          const T* row = values + j * D + v0 * kLanes;
          for (int u = 0; u < 4; ++u)
            if (u < n) acc[u] = vfma(pj, load(row + u * kLanes), acc[u]);
        }
        for (int u = 0; u < n; ++u) store(out + i * D + (v0 + u) * kLanes, vmul(acc[u], inv));
      }
    }
  });
}

// qkv: [T, (H + 2 KV) * D] (queries, keys, values of each token); cos/sin: fp32 [positions, D]; pos/slot/index:
// int64 [T]; k_cache/v_cache: [slots, KV, max_len, D], written in place -> [T, H * D].
torch::Tensor attend(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, torch::Tensor pos, torch::Tensor slot,
                     torch::Tensor index, torch::Tensor k_cache, torch::Tensor v_cache, int64_t H, int64_t KV) {
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(), "attend: caches [slots, KV, max_len, D]");
  const int64_t Tn = qkv.size(0), D = k_cache.size(3), max_len = k_cache.size(2);
  TORCH_CHECK(KV >= 1 && H % KV == 0 && k_cache.size(1) == KV, "attend: H a multiple of KV, the caches' heads");
  TORCH_CHECK(D % 16 == 0, "attend: head_dim a multiple of 16");
  TORCH_CHECK(qkv.dim() == 2 && qkv.size(1) == (H + 2 * KV) * D, "attend: qkv [T, (H + 2 KV) * head_dim]");
  TORCH_CHECK(cos.scalar_type() == torch::kFloat && sin.scalar_type() == torch::kFloat && cos.size(1) == D &&
                  cos.sizes() == sin.sizes(), "attend: fp32 cos/sin [positions, head_dim]");
  for (auto* t : {&pos, &slot, &index})
    TORCH_CHECK(t->scalar_type() == torch::kLong && t->dim() == 1 && t->size(0) == Tn && t->is_contiguous(),
                "attend: int64 pos/slot/index [T]");
  TORCH_CHECK(qkv.scalar_type() == k_cache.scalar_type() && qkv.scalar_type() == v_cache.scalar_type(),
              "attend: qkv and the caches must have one dtype");
  for (auto* t : {&qkv, &cos, &sin, &k_cache, &v_cache}) TORCH_CHECK(t->is_contiguous(), "attend: contiguous inputs");
  if (Tn > 0) {
    const int64_t* s = slot.data_ptr<int64_t>();
    const int64_t *ix = index.data_ptr<int64_t>(), *ps = pos.data_ptr<int64_t>();
    for (int64_t t = 0; t < Tn; ++t)
      TORCH_CHECK(s[t] >= 0 && s[t] < k_cache.size(0) && ix[t] >= 0 && ix[t] < max_len && ps[t] >= 0 &&
                      ps[t] < cos.size(0), "attend: slot, index or position out of range");
  }
  auto out = torch::empty({Tn, H * D}, qkv.options());
  dispatch(qkv, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    attend_impl<T>(ptr<T>(qkv), ptr<float>(cos), ptr<float>(sin), ptr<int64_t>(pos), ptr<int64_t>(slot),
                   ptr<int64_t>(index), ptr<T>(k_cache), ptr<T>(v_cache), ptr<T>(out), Tn, H, KV, D, max_len);
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("matmul", &matmul, "x @ w.T (+ bias) for any rows, w packed by kernels.pack", py::arg("x"), py::arg("packed"),
        py::arg("N"), py::arg("bias") = py::none());
  m.def("enable_amx", &enable_amx, "route bf16 matmuls to AMX tiles where Linux grants them; whether it is on");
  m.def("amx", [] { return amx_on; }, "whether bf16 matmuls run on AMX tiles");
  m.def("isa", [] { return std::string(kIsa); }, "the instruction set this build is for: avx512 or avx2");
  m.def("rms_norm", &rms_norm, "RMSNorm of each row, computed in fp32");
  m.def("silu_mul", &silu_mul, "silu(gate) * up of each row [gate | up]");
  m.def("attend", &attend, "RoPE, cache writes and causal attention of a flat ragged batch");
}
