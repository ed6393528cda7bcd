// Small-M weight-only product for ternary weights in the canonical 2-bit layout
// (docs/FORMAT.md), 16-bit activations, M <= 16:
//   y[m, n] = sum_k x[m, k] * (c[n, k] - 1) * s[n, group(k)] (* xs[m]) (+ bias[n]).
// With per-token scales xs (W1.58A8 at small M), x is first quantized per token to int8 codes,
// written as 16-bit floats into xi and read from there: exact, and so are their fp32 sums with
// ternary weights (|sum| <= 127 K).
//
// Why. At M = 1 the 18432 x 3072 modulation layer reads 14.2 MB of weights
// (3.3 us at ~4.3 TB/s); the earlier kernels were issue-bound at ~5.7
// instructions per weight (bench/NOTES.md). This one spends ~1.4: decoding
// without repacking (~1.06 per weight, below) and the multiply-add on tensor
// cores, which also accumulate exactly in fp32.
//
// Layout. Row n is K / 4 bytes; byte b holds k = 4b..4b+3 at bits 2 * (k % 4),
// code c = w + 1 in {0, 1, 2}. A little-endian 32-bit word therefore holds 16
// consecutive k: k = 16w + i at bits 2i and k = 16w + 8 + i at bits 16 + 2i
// (i = 0..7). The codes of the pair (k_i, k_{8+i}) sit at the same offset in
// the two 16-bit halves, which is the shape of a packed half2.
//
// Decode (the magic-number trick, no int-to-float conversion). For a 16-bit
// float with m mantissa bits (fp16 10, bf16 7), the power of two 2^(m - p) has
// an ulp of 2^-p, so its mantissa bits p, p+1 count in units of one: OR-ing a
// 2-bit code into bits p..p+1 gives exactly 2^(m-p) + c. Hence
//   v = ((w >> s) & (0x00030003 << p)) | MAGIC_p           (one LOP3)
// is the pair (MAGIC_p + c_i, MAGIC_p + c_{8+i}), and one packed subtraction of
// MAGIC_p + 1 (= MAGIC_p | 1 << p, exact by Sterbenz) gives c - 1 in {-1, 0, +1}
// for both. Any even p with p + 1 inside the mantissa works (fp16 p <= 8, bf16
// p <= 4), so a word needs very few shifts: fp16 takes pairs 0..4 from w itself
// (p = 0, 2, 4, 6, 8) and pairs 5..7 from w >> 10 (p = 0, 2, 4); bf16 takes
// pairs 0..2, 3..5 and 6..7 from w, w >> 6 and w >> 12. That is 9 (bf16 10)
// ALU instructions + 8 HSUB2 for 16 weights. The HSUB2 stays: feeding MAGIC + c
// to the multiply and subtracting (MAGIC + 1) * sum(x) afterwards (the identity
// y = sum c x - sum x) would cancel fp32 sums up to ~1000x larger than the
// result, and the magic constants live in registers (a LOP3 has one immediate).
//
// Multiply on tensor cores with permuted k. mma.m16n8k16 computes
// D[r][n] += sum over 16 k-slots of A[r][slot] * B[slot][n]; which k a slot
// stands for is ours to choose, as long as A and B agree. Lane (g = lane / 4,
// t = lane % 4) supplies the slots {2t, 2t+1} and {2t+8, 2t+9} of rows g and
// g + 8 (A) and of column g (B). We let lane t own the 16 contiguous bytes
// 16t..16t+15 of each row within a 256-k chunk (words 4t..4t+3) and feed, in
// four mma steps per word, the pairs (2u, 8+2u) and (2u+1, 8+2u+1) of the word
// as its two register pairs. So every lane loads its own 16 bytes (a quad reads
// 64 contiguous bytes of a row; the previous tensor-core kernel had four lanes
// share each word and spent ~12 shifts/masks per register to gather codes) and
// decodes with one LOP3 + one HSUB2 per A register. The mma makes the products
// (c - 1) * x, exact, and sums them in fp32: at M = 1 one mma per 8 weights per
// lane, the same mma serving 8 tokens (16 with two). A CUDA-core HFMA2 design
// (the alternative considered) needs the same decode plus one HFMA2 per pair
// and token (~26 instructions per 16 weights at M = 1, +8 per extra token) and
// packed 16-bit partial sums that must be flushed to fp32 often for accuracy.
//
// B operand (x). Lane (g, t) needs x[token][k] in the same pair order,
// (x_i, x_{8+i}) per word: two 16-byte loads of the natural x row (through L1:
// x is small and every warp reads it) and 8 PRMT per word build them. They are
// built once per chunk and reused for the TW tiles of the warp. Columns past M
// read token M - 1: mma columns are independent, so their finite sums harm no
// other column and are simply not stored (no predicates, no zero fills).
//
// Group scales. Lane t's 64 k lie in one scale group (groups are multiples of
// 64), but an mma sums over the four lanes' slots. With groups the B columns
// separate them: column 4m + t' carries token m's x only in the slots of the
// lanes t == t', so D[r][4m + t'] is lane t''s partial, scaled by its group's
// scale after each chunk and summed at the end. That takes 4 columns per
// token: up to 4 tokens per launch (two mma per step); more are split into
// launches. Without groups the row scale is applied once at the end.
//
// Work split. A block owns TW * 16 rows; its S warps take contiguous ranges of
// the K / 256 chunks (split-K) and meet in shared memory. The host picks S so
// that the whole grid is resident at once (one wave: no tail) with at least two
// chunks per warp where K allows. Each warp keeps the next chunk's 16-byte
// loads in flight while it decodes the current one (double-buffered registers);
// the loads skip L1 (the weights are read once) and ask L2 to prefetch the
// surrounding 256 bytes, which are the row's next chunks.
//
// Instruction budget, counted in the SASS of the steady-state loop (sm_90,
// fp16, M <= 8; one trip = 2 chunks x 2 tiles = 16384 weights, 512 per lane):
// 725 instructions = 256 LOP3 + 256 HSUB2 + 32 SHF (decode) + 64 HMMA + 64
// PRMT + 16 LDG (x) + 8 LDG (weights) + ~29 loop and addressing, i.e. 1.42
// thread-instructions per weight (bf16: 749, 1.46). bench/NOTES.md has the
// other cases.
//
// Shapes taken: K a multiple of 64, group 0 or a multiple of 64, 16-byte
// aligned q and x, sm_80+. When K % 256 != 0 the last chunk stops short of some
// lanes: they take weights of code 1 (= 0) and lane 0's x (finite), so they add
// zero. Other shapes return false and the caller falls back to the CUDA-core
// GEMV or the dense path.
#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdlib>
#include <type_traits>

#include "cuda/decode.cuh"
#include "cuda/device.cuh"
#include "kernels.h"

namespace bitkernel {
namespace {

constexpr int CHUNK_K = 256;   // k per chunk: 4 lanes x 16 bytes of a row
constexpr int MAX_SPLIT = 16;  // warps per block

// Tuning knobs, read once from the environment, for measurements (defaults in brackets):
// BITKERNEL_TERNARY_TILES = 1 or 2 tiles per warp at M <= 8 [2 at M = 1 or where N / 32 >= SMs, else 1];
// BITKERNEL_TERNARY_MIN_CHUNKS = chunks per warp the K split aims at [2].
struct Knobs {
  int tiles = 0, min_chunks = 2;
  Knobs() {
    if (const char* v = std::getenv("BITKERNEL_TERNARY_TILES")) tiles = std::atoi(v) == 1 ? 1 : std::atoi(v) == 2 ? 2 : 0;
    if (const char* v = std::getenv("BITKERNEL_TERNARY_MIN_CHUNKS")) min_chunks = std::max(1, std::atoi(v));
  }
};
const Knobs& knobs() {
  static const Knobs k;
  return k;
}

// Where pair i (codes k_i, k_{8+i} of a word) is taken from: the word shifted right by
// shift(i), with the codes at bits p = 2i - shift(i) of each half and the magic constant
// 2^(m - p) = MAGIC0 - (p / 2) * STEP in both halves (the exponent drops by 2 per step).
template <typename T> struct Ternary;
template <> struct Ternary<__half> {  // 10 mantissa bits: p = 0..8
  static constexpr int NP = 5;
  static constexpr uint32_t MAGIC0 = 0x64006400u, STEP = 0x08000800u;  // 1024, 256, 64, 16, 4
  static constexpr int shift(int i) { return i < 5 ? 0 : 10; }
};
template <> struct Ternary<__nv_bfloat16> {  // 7 mantissa bits: p = 0..4
  static constexpr int NP = 3;
  static constexpr uint32_t MAGIC0 = 0x43004300u, STEP = 0x01000100u;  // 128, 32, 8
  static constexpr int shift(int i) { return i < 3 ? 0 : i < 6 ? 6 : 12; }
};

// The 8 A registers of one word: out[i] = (c_i - 1, c_{8+i} - 1) as a T pair. `magic` holds
// the magic constants in registers: a LOP3 takes one immediate (the mask), so a magic
// folded into an immediate would cost a second LOP3 (ptxas did that with constants).
template <typename T>
__device__ __forceinline__ void decode_ternary_word(uint32_t w, const uint32_t (&magic)[Ternary<T>::NP],
                                                    uint32_t (&out)[8]) {
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int s = Ternary<T>::shift(i), p = 2 * i - s;
    const uint32_t one = (Ternary<T>::MAGIC0 - (p / 2) * Ternary<T>::STEP) | (0x00010001u << p);  // MAGIC + 1
    out[i] = hsub2_bits<T>(((w >> s) & (0x00030003u << p)) | magic[p / 2], one);
  }
}

using Full = std::false_type;  // a chunk of 256 k
using Tail = std::true_type;   // the last chunk when K % 256 != 0: lanes past K take weights 0

// NT: mma per step (8 columns each). Without groups a column is a token (M <= 8 NT);
// with groups a column is (token, lane t) and M <= 2 NT. TW: 16-row tiles per warp (the
// x fragments of a chunk serve all of them). gdiv = ceil(2^32 / group). magic0 =
// Ternary<T>::MAGIC0 (a parameter so that it lives in registers).
template <typename T, int NT, int TW, bool GROUPED>
__global__ void __launch_bounds__(32 * MAX_SPLIT)
    gemv_ternary_kernel(const T* __restrict__ x, int M, int K, const uint8_t* __restrict__ q,
                        const float* __restrict__ scale, int G, uint32_t gdiv, int N, const T* __restrict__ bias,
                        const float* __restrict__ xs, T* __restrict__ y, int cpw, uint32_t magic0) {
  // Compiled for every architecture, launched on sm_80+ only (the host checks): below, the
  // mma and packed-bf16 helpers trap.
  constexpr int COLS = 8 * NT, LD = COLS + 1, ROWS = 16 * TW;
  extern __shared__ float red[];  // [warps][ROWS][LD]: the warps' partial sums
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int n0 = blockIdx.x * ROWS;
  const int nch = (K + CHUNK_K - 1) / CHUNK_K, nfull = K / CHUNK_K;
  const int cbeg = warp * cpw, cend = min(cbeg + cpw, nch), fend = min(cend, nfull);

  uint32_t magic[Ternary<T>::NP];
#pragma unroll
  for (int p = 0; p < Ternary<T>::NP; ++p) magic[p] = magic0 - p * Ternary<T>::STEP;

  // The lane's 16 bytes of chunk cbeg in rows g and g + 8 of each tile (rows clamped: loads
  // stay in bounds, stores are skipped). The pointers advance with the loop (ptxas would
  // otherwise rebuild them from the parameters in every trip).
  const uint8_t* wp[TW][2];
  int rown[TW][2];
#pragma unroll
  for (int i = 0; i < TW; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      rown[i][h] = min(n0 + 16 * i + 8 * h + g, N - 1);
      wp[i][h] = q + static_cast<int64_t>(rown[i][h]) * (K / 4) + 16 * t + 64 * cbeg;
    }
  // The x row behind the lane's B column of each mma, at chunk cbeg (word j of chunk c at
  // + 512 (c - cbeg) + 32 j bytes). Without groups, columns past M read token M - 1: their
  // sums are finite, independent of the other columns, and never stored, which saves
  // predicates and zero fills. With groups the lanes outside a column's lane t pass zeros.
  const uint8_t* xp[NT];
  bool xon[NT];
#pragma unroll
  for (int jt = 0; jt < NT; ++jt) {
    const int col = 8 * jt + g, m = GROUPED ? col / 4 : col;
    xon[jt] = !GROUPED || (m < M && col % 4 == t);
    xp[jt] = reinterpret_cast<const uint8_t*>(x + static_cast<int64_t>(min(m, M - 1)) * K) + 128 * t + 512 * cbeg;
  }

  float acc[TW][NT][4] = {};

  uint4 wbuf[2][TW][2];     // double buffer: the chunk being decoded and the next one in flight

  auto load = [&](auto tail, int st, int c, int d) {  // chunk c, at d chunks past the pointers
    const bool kin = !decltype(tail)::value || c * CHUNK_K + 64 * t < K;
#pragma unroll
    for (int i = 0; i < TW; ++i)
#pragma unroll
      for (int h = 0; h < 2; ++h)
        wbuf[st][i][h] = kin ? load_weights(wp[i][h] + 64 * d) : make_uint4(0x55555555u, 0x55555555u, 0x55555555u, 0x55555555u);  // code 1: weight 0
  };

  auto compute = [&](auto tail, int st, int c, int d) {
    // Lanes past K in the tail read lane 0's x: finite, times their zero weights.
    const int xd = 512 * d - (decltype(tail)::value && c * CHUNK_K + 64 * t >= K ? 128 * t : 0);
    [[maybe_unused]] float part[TW][NT][4] = {};  // with groups: this chunk's sums, scaled below
    [[maybe_unused]] float sc[TW][2][2];  // with groups: scale of [tile][row g / g+8][column 2t / 2t+1]
    if constexpr (GROUPED) {  // loaded first, used after the chunk's 16 mma steps
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const uint32_t k = c * CHUNK_K + 64 * ((2 * t + e) & 3);  // first k of the lane whose slots column 2t+e holds
        const int gi = static_cast<int>(__umulhi(k, gdiv));      // k / group (exact: K * group < 2^32)
#pragma unroll
        for (int i = 0; i < TW; ++i)
#pragma unroll
          for (int h = 0; h < 2; ++h)
            sc[i][h][e] = k < static_cast<uint32_t>(K) ? __ldg(scale + static_cast<int64_t>(rown[i][h]) * G + gi) : 0.f;
      }
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      // B registers for word j: (x_i, x_{8+i}) for i = 0..7 of the word's 16 k.
      uint32_t xb[NT][8];
#pragma unroll
      for (int jt = 0; jt < NT; ++jt) {
        uint4 lo = make_uint4(0, 0, 0, 0), hi = lo;
        if (xon[jt]) {
          const uint4* p = reinterpret_cast<const uint4*>(xp[jt] + xd + 32 * j);
          lo = __ldg(p);
          hi = __ldg(p + 1);
        }
        const uint32_t X[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};  // X[r] = (x_2r, x_2r+1)
#pragma unroll
        for (int i = 0; i < 8; ++i) xb[jt][i] = __byte_perm(X[i >> 1], X[4 + (i >> 1)], (i & 1) ? 0x7632 : 0x5410);
      }
#pragma unroll
      for (int i = 0; i < TW; ++i) {
        uint32_t pa[8], pb[8];  // rows g and g + 8
        decode_ternary_word<T>(word_of(wbuf[st][i][0], j), magic, pa);
        decode_ternary_word<T>(word_of(wbuf[st][i][1], j), magic, pb);
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const uint32_t a[4] = {pa[2 * u], pb[2 * u], pa[2 * u + 1], pb[2 * u + 1]};
#pragma unroll
          for (int jt = 0; jt < NT; ++jt) {
            const uint32_t b[2] = {xb[jt][2 * u], xb[jt][2 * u + 1]};
            mma_16816<T>(GROUPED ? part[i][jt] : acc[i][jt], a, b);
          }
        }
      }
    }
    if constexpr (GROUPED) {
#pragma unroll
      for (int i = 0; i < TW; ++i)
#pragma unroll
        for (int jt = 0; jt < NT; ++jt)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[i][jt][e] = fmaf(part[i][jt][e], sc[i][e >> 1][e & 1], acc[i][jt][e]);
    }
  };

  // Full chunks, two per trip with alternating buffers (no register copies), then the tail.
  auto advance = [&](int chunks) {
#pragma unroll
    for (int i = 0; i < TW; ++i)
#pragma unroll
      for (int h = 0; h < 2; ++h) wp[i][h] += 64 * chunks;
#pragma unroll
    for (int jt = 0; jt < NT; ++jt) xp[jt] += 512 * chunks;
  };
  int c = cbeg;
  if (c < fend) load(Full{}, 0, c, 0);
  for (; c + 1 < fend; c += 2) {
    load(Full{}, 1, c + 1, 1);
    compute(Full{}, 0, c, 0);
    if (c + 2 < fend) load(Full{}, 0, c + 2, 2);
    compute(Full{}, 1, c + 1, 1);
    advance(2);
  }
  if (c < fend) {  // an odd count: the last full chunk, already in buffer 0
    compute(Full{}, 0, c, 0);
    advance(1);
    ++c;
  }
  if (c < cend) {  // the tail (only when K % 256 != 0), right after the full chunks
    load(Tail{}, 0, c, 0);
    compute(Tail{}, 0, c, 0);
  }

  // Partial sums of the warps -> shared memory -> one output per thread.
  float* mine = red + warp * (ROWS * LD);
#pragma unroll
  for (int i = 0; i < TW; ++i)
#pragma unroll
    for (int jt = 0; jt < NT; ++jt) {
      const int r = 16 * i + g, col = 8 * jt + 2 * t;
      mine[r * LD + col] = acc[i][jt][0];
      mine[r * LD + col + 1] = acc[i][jt][1];
      mine[(r + 8) * LD + col] = acc[i][jt][2];
      mine[(r + 8) * LD + col + 1] = acc[i][jt][3];
    }
  __syncthreads();
  const int warps = blockDim.x >> 5;
  for (int idx = threadIdx.x; idx < ROWS * M; idx += blockDim.x) {
    const int r = idx % ROWS, m = idx / ROWS, n = n0 + r;
    if (n >= N) continue;
    float v = 0.f;
    for (int w = 0; w < warps; ++w) {
      const float* p = red + (w * ROWS + r) * LD;
      v += GROUPED ? (p[4 * m] + p[4 * m + 1]) + (p[4 * m + 2] + p[4 * m + 3]) : p[m];
    }
    if (!GROUPED) v *= scale[n];
    if (xs) v *= xs[m];
    if (bias) v += to_f32(bias[n]);
    y[static_cast<int64_t>(m) * N + n] = from_f32<T>(v);
  }
}

// Resident warps per SM of a kernel instantiation on a device (4-warp blocks).
template <typename T, int NT, int TW, bool GROUPED>
int warps_per_sm(int dev, int smem_per_warp) {
  static std::atomic<int> cache[kMaxDevices] = {};
  return 4 * blocks_per_sm(cache, dev, gemv_ternary_kernel<T, NT, TW, GROUPED>, 128, 4 * smem_per_warp, 4);
}

template <typename T, int NT, int TW, bool GROUPED>
void launch(const void* x, int M, int K, const uint8_t* q, const float* scale, int64_t group, int N,
            const void* bias, const float* xs, void* y, cudaStream_t s, int dev, int sms) {
  constexpr int ROWS = 16 * TW, SMEM_PER_WARP = ROWS * (8 * NT + 1) * 4;
  auto kernel = gemv_ternary_kernel<T, NT, TW, GROUPED>;
  const int tiles = (N + ROWS - 1) / ROWS;
  const int nch = (K + CHUNK_K - 1) / CHUNK_K;
  // Split K over as many warps as keep the grid resident in one wave, but leave each warp
  // knobs().min_chunks chunks where K has them; then even out the ranges.
  const int64_t cap =
      static_cast<int64_t>(std::max(sms, 1)) * warps_per_sm<T, NT, TW, GROUPED>(dev, SMEM_PER_WARP);
  int S = static_cast<int>(std::min<int64_t>(std::max<int64_t>(cap / tiles, 1), MAX_SPLIT));
  S = std::min(S, std::max(1, nch / knobs().min_chunks));
  const int cpw = (nch + S - 1) / S;
  S = (nch + cpw - 1) / cpw;
  const int G = static_cast<int>(groups_per_row(K, group));
  const uint32_t gdiv = group ? static_cast<uint32_t>(((1ull << 32) + group - 1) / group) : 0u;
  kernel<<<tiles, 32 * S, S * SMEM_PER_WARP, s>>>(static_cast<const T*>(x), M, K, q, scale, G, gdiv, N,
                                                  static_cast<const T*>(bias), xs, static_cast<T*>(y), cpw,
                                                  Ternary<T>::MAGIC0);
}

}  // namespace

bool gemv_ternary_cuda(int fmt, const void* x, int dtype, int64_t M, int64_t K, const uint8_t* q, const float* scale,
                       const uint8_t* zero, int64_t group, int64_t N, const void* bias, void* xi, float* xs, void* y,
                       uintptr_t stream) {
  (void)zero;
  const void* xk = xs ? xi : x;  // what the kernel reads
  if (fmt != TERNARY || (dtype != F16 && dtype != BF16) || M < 1 || M > 16 || N < 1 || N > INT_MAX - 64 ||
      K < 64 || K % 64 != 0 || K > (1 << 29) || (group != 0 && (group % 64 != 0 || K * group >= (1LL << 32))) ||
      reinterpret_cast<uintptr_t>(q) % 16 != 0 || reinterpret_cast<uintptr_t>(xk) % 16 != 0)
    return false;
  const DeviceInfo info = current_device();
  if (!info.has_mma16816()) return false;
  // Only once the product is sure to run: the caller quantizes for the int8 GEMM otherwise.
  if (xs) quantize_act_cuda(x, dtype, M, K, nullptr, xi, xs, stream);
  x = xk;
  const int dev = info.index, sms = info.sms;
  if (gemv_ternary_digits_cuda(x, dtype, M, K, q, scale, group, N, bias, xs, y, stream, dev, sms)) return true;
  const cudaStream_t s = as_stream(stream);
  const int n = static_cast<int>(N), k = static_cast<int>(K), m = static_cast<int>(M);
  // Two tiles per warp halve the cost of the x fragments, but only where that still leaves
  // a block for every SM (the N = 3072 layers have 96 blocks of 32 rows for 132 SMs). At
  // M = 1 two tiles won on all eight FLUX shapes on an H100 even so (the long-K N = 3072
  // layers most: 12.1 -> 8.9 us for 3072x12288; bench/NOTES.md).
  const bool two_tiles = knobs().tiles ? knobs().tiles == 2 : m == 1 || (n + 31) / 32 >= sms;
  auto run = [&](auto tag) {
    using T = decltype(tag);
    if (group == 0) {
      if (m > 8) launch<T, 2, 1, false>(x, m, k, q, scale, group, n, bias, xs, y, s, dev, sms);
      else if (two_tiles) launch<T, 1, 2, false>(x, m, k, q, scale, group, n, bias, xs, y, s, dev, sms);
      else launch<T, 1, 1, false>(x, m, k, q, scale, group, n, bias, xs, y, s, dev, sms);
      return;
    }
    // Four columns per token: up to 4 tokens per launch, each launch streaming the weights.
    for (int m0 = 0; m0 < m; m0 += 4) {
      const int mk = std::min(4, m - m0);
      const T* xt = static_cast<const T*>(x) + static_cast<int64_t>(m0) * k;
      const float* xst = xs ? xs + m0 : nullptr;
      T* ys = static_cast<T*>(y) + static_cast<int64_t>(m0) * n;
      if (mk > 2) launch<T, 2, 1, true>(xt, mk, k, q, scale, group, n, bias, xst, ys, s, dev, sms);
      else if (two_tiles) launch<T, 1, 2, true>(xt, mk, k, q, scale, group, n, bias, xst, ys, s, dev, sms);
      else launch<T, 1, 1, true>(xt, mk, k, q, scale, group, n, bias, xst, ys, s, dev, sms);
    }
  };
  if (dtype == F16) run(__half{});
  else run(__nv_bfloat16{});
  check_launch("gemv_ternary");
  return true;
}

}  // namespace bitkernel
