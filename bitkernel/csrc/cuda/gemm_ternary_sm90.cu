// Ternary weights times 16-bit activations at large M on Hopper (sm_90a), without expanding the
// weights in memory (to x's dtype, as the other route does):
//   y[m, n] = s[n] * sum_k x[m, k] * (c[n, k] - 1) (+ bias[n]) (+ y[m, n] with accumulate).
//
// Why. The other route for M > 16 writes the weights out in 16 bits (2 bytes per weight) and hands
// them to cuBLAS: on an H100 that expansion costs 6.7-7.7% of the bf16 GEMM's time at FLUX's
// M = 4608 shapes (bench/NOTES.md, session 15). Here the 2-bit codes go from global memory to
// shared memory to registers, where they become the A operand of wgmma; nothing is written back.
//
// Roles. The product is computed transposed, y^T = W x^T: wgmma's M is the weight rows (n), its N
// the tokens (m), its K the input features. A (weights) comes from registers, which is what lets a
// thread decode codes into bf16 pairs right before the multiply; B (x, K-contiguous rows) comes
// from shared memory through a descriptor.
//
// Work split. A block tile is BM = 128 weight rows x BN (128, 192 or 256) tokens. Three
// warpgroups: 0 and 1 are the consumers, each owning 64 of the tile's rows and issuing m64nBNk16
// wgmma over the whole BN; 2 is the producer, whose one working thread issues TMA copies of x and
// of the codes into a ring of STAGES shared buffers, each guarded by a "full" and an "empty"
// mbarrier (setmaxnreg gives its registers to the consumers). Blocks are persistent, one per SM:
// the producer fills the next tile's stages while the consumers write the last tile out.
//
// Schedule (the kernel's `work`). Whole waves of tiles first (CTA b takes tiles b, b + G, ...),
// then the tiles left over, each split into up to kMaxSplit k-ranges, one per CTA, so that the
// last wave fills the SMs as the others do (at M = 4608 and N = 3072 the 432 tiles of 128 x 256
// are 3.27 waves on 132 SMs: 82% of the time on whole tiles alone). A split tile's CTAs leave
// their fp32 sums in the workspace and count in; the CTA of its last k-range waits for the count,
// adds the sums in a fixed order (deterministic results) and writes the tile. The host picks BN
// and the split from a cost model (pick, schedule).
//
// Shared layout per stage. x: BN rows of BK = 64 elements (128 bytes), written by TMA with the
// 128-byte swizzle (16-byte chunk j of row r stored at chunk j ^ (r % 8)), the layout wgmma's
// descriptor mode 1 reads; 8-row groups 1024 bytes apart (the descriptor's stride), and the k16
// steps 32 bytes apart inside the swizzled row (the descriptor's start address moves, as CUTLASS
// does). Codes: BM rows of 16 bytes, the canonical bytes as they are in memory (k 16i..16i+15 of
// the stage in word i of the row, code of k at bits 2k).
//
// Decode. wgmma's A fragment (as mma.m16n8k16's): lane (g = lane / 4, t = lane % 4) of warp w
// holds rows 16w + g and 16w + g + 8, k = 2t, 2t+1 in one register and k = 2t+8, 2t+9 in
// another, the lower k in the lower half. Shifting a row's word right by 4t puts c(2t), c(2t+1)
// at bits 0-3 and c(2t+8), c(2t+9) at bits 16-19. A code OR-ed into the mantissa of a power of
// two whose ulp is one unit at that bit is MAGIC + c (decode.cuh): the lower half takes its code
// at bits 0-1 (MAGIC 2^m, m the mantissa width), the upper at bits 18-19 (MAGIC 2^(m-2)), so
//   (2t, 2t+1):   (v & 3) | ((v << 16) & 0xc0000) | MAGIC
//   (2t+8, 2t+9): ((v >> 16) & 3) | (v & 0xc0000) | MAGIC
// and one packed subtraction of MAGIC + 1 (+1 and +4 units) leaves c - 1 in both halves, exactly.
// ~9 instructions per 8 weights of a thread; the tensor cores take 128 cycles per m64n256k16, in
// which a warpgroup's decode of the next step is ~18 instructions per thread.
//
// Pipeline per consumer. A k-tile is issued as two halves of two wgmma each, one commit group
// per half, their A registers (8 per half) double-buffered: a half is decoded only once the group
// that last read its registers (two halves earlier) is done (wgmma.wait_group 1), and a stage
// goes back to the producer once its second half is done. (Whole k-tiles double-buffered needed
// 32 A registers, which next to BN = 256's 128 accumulators spilled.)
//
// Epilogue. Each consumer warpgroup scales its 64 x BN accumulators (s[n], + bias), rounds them
// into a shared box in the 128-byte swizzle (conflict-free for the fragment's stores) and one
// thread copies the box to y with TMA, or adds it onto y (accumulate: cp.reduce .add, which rounds
// the product to 16 bits before the sum, where cuBLAS's beta = 1 rounds once); the copy runs
// while the warpgroup starts its next tile.
//
// Shapes taken: sm_90 (the sm_90a image), 16-bit x, K a multiple of 64, group 0 (one scale per
// row), N a multiple of 8, 16-byte aligned x, codes, y and workspace, fewer than 2^31
// k-iterations, and enough work per CTA (min_ktiles). Others return false and the caller
// expands the weights for cuBLAS.
#include <cuda.h>
#include <cudaTypedefs.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>

#include "cuda/decode.cuh"
#include "cuda/device.cuh"
#include "cuda/wgmma.cuh"
#include "kernels.h"

namespace bitkernel {
namespace {

constexpr int BM = 128;     // weight rows per tile: 64 per consumer warpgroup
constexpr int BK = 64;      // k per stage: one 128-byte swizzled row of x, 16 bytes of codes
constexpr int THREADS = 384;  // two consumer warpgroups, then the producer's
// Workspace (kernels.h): per SM, a 4-byte count of a split tile's finished k-ranges (indexed by the split
// tile, in 16 bytes so that the partial sums after the counts stay 16-byte aligned), then per CTA its partial
// sums (256 consumer threads x 128 floats at BN = 256). The CTA that finishes a tile sets its count back to zero.
constexpr int64_t kPartialBytes = 256 * 128 * 4;
constexpr int kMaxSplit = 4;  // k-ranges per split tile: the last one's CTA reads the others' sums at once

template <int BN> struct Plan {
  static constexpr int X_BYTES = BN * BK * 2;  // a stage of x: BN swizzled rows of 128 bytes
  static constexpr int W_BYTES = BM * BK / 4;  // a stage of codes: BM rows of 16 bytes
  static constexpr int Y_BYTES = 64 * BN * 2;  // a consumer warpgroup's output box: BN rows of 64 elements
  static constexpr int STAGES = std::min(8, (220 * 1024 - 2 * Y_BYTES) / (X_BYTES + W_BYTES));
  static constexpr int W_OFF = STAGES * X_BYTES;  // x stages first, each 1024-byte aligned
  static constexpr int Y_OFF = (W_OFF + STAGES * W_BYTES + 1023) / 1024 * 1024;
  static constexpr int BAR_OFF = Y_OFF + 2 * Y_BYTES;
  static constexpr int SMEM = BAR_OFF + 2 * STAGES * 8 + 1024;  // + slack to align the base to 1024
};

template <typename T> struct Magic;
template <> struct Magic<__half> {  // 10 mantissa bits: 1024 below, 256 above
  static constexpr uint32_t MAGIC = 0x5c006400u, ONE = 0x5c046401u;
};
template <> struct Magic<__nv_bfloat16> {  // 7 mantissa bits: 128 below, 32 above
  static constexpr uint32_t MAGIC = 0x42004300u, ONE = 0x42044301u;
};

#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "gemm_ternary_sm90.cu is built for sm_90a alone (CMakeLists.txt)"
#endif

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ uint2 lds64(uint32_t addr) {
  uint2 v;
  asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "r"(addr));
  return v;
}

__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count));
}
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}
// Waits for the phase of parity `parity` to complete (a fresh barrier counts parity 1 as complete).
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred done;\nWAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT;\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}

// A 2-D TMA copy of the box at (c0 inner, c1 outer) into shared memory, completing on bar.
__device__ __forceinline__ void tma_load(uint32_t dst, const CUtensorMap* map, int c0, int c1, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(bar)
      : "memory");
}

// Descriptor of a K-major tile with 128-byte swizzle: start address, leading offset 16 bytes
// (unused by this mode), 1024 bytes between 8-row groups, mode 1 in bits 62-63.
__device__ __forceinline__ uint64_t swizzled_desc(uint32_t addr) {
  return static_cast<uint64_t>((addr & 0x3ffff) >> 4) | (static_cast<uint64_t>(16 >> 4) << 16) |
         (static_cast<uint64_t>(1024 >> 4) << 32) | (1ull << 62);
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N> __device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}
// Keeps the compiler from moving reads of the accumulators above a wgmma wait.
template <int R> __device__ __forceinline__ void fence_operands(float (&d)[R]) {
#pragma unroll
  for (int i = 0; i < R; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

template <int N> __device__ __forceinline__ void set_max_regs() {
  if constexpr (N < 128)
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(N));
  else
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(N));
}

template <typename T>
__device__ __forceinline__ uint32_t sub_one(uint32_t v) {
  return hsub2_bits<T>(v, Magic<T>::ONE);
}

// The four A registers of one k16 step for rows (g, g + 8) from their words w0, w1 (shifted by 4t).
template <typename T>
__device__ __forceinline__ void decode_step(uint32_t v0, uint32_t v1, uint32_t magic, uint32_t (&a)[4]) {
  a[0] = sub_one<T>((v0 & 3u) | ((v0 << 16) & 0xc0000u) | magic);
  a[1] = sub_one<T>((v1 & 3u) | ((v1 << 16) & 0xc0000u) | magic);
  a[2] = sub_one<T>(((v0 >> 16) & 3u) | (v0 & 0xc0000u) | magic);
  a[3] = sub_one<T>(((v1 >> 16) & 3u) | (v1 & 0xc0000u) | magic);
}

// Consumer-side barriers: 1 for both consumer warpgroups, 2 + cw for one.
__device__ __forceinline__ void named_barrier(int id, int threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

// Waits until the count at f reaches n (the other k-ranges of a split tile have added their sums).
__device__ __forceinline__ void flag_acquire(const int* f, int n) {
  int v = 0;
  do asm volatile("ld.acquire.gpu.global.s32 %0, [%1];" : "=r"(v) : "l"(f) : "memory");
  while (v < n);
}

template <typename T, int BN>
__global__ void __launch_bounds__(THREADS, 1)
    gemm_ternary_sm90(const __grid_constant__ CUtensorMap tx, const __grid_constant__ CUtensorMap tw,
                      const __grid_constant__ CUtensorMap ty, const float* __restrict__ scale,
                      const T* __restrict__ bias, int M, int N, int K, int accumulate,
                      uint32_t magic,  // Magic<T>::MAGIC: a parameter sits in a register (a LOP3 has one immediate)
                      int waves, int split, int* __restrict__ flags, float4* __restrict__ partials) {
  using P = Plan<BN>;
  constexpr int S = P::STAGES;
  extern __shared__ uint8_t raw[];
  const uint32_t base = (smem_addr(raw) + 1023) & ~1023u;  // the swizzle atoms are 1024-byte aligned
  const uint32_t full = base + P::BAR_OFF, empty = full + 8 * S;

  const int tiles_n = (N + BM - 1) / BM, kts = K / BK;
  // The schedule (header): `waves` whole waves (all CTAs at the same k of neighbouring tiles, so x comes
  // from L2), then the rest of the tiles, `split` k-ranges each.
  const int G = gridDim.x, b = blockIdx.x;
  const int items = waves + (b < (tiles_n * ((M + BN - 1) / BN) - waves * G) * split);
  auto work = [&](int i, int& tile, int& kt0, int& kt1) {
    if (i < waves) {
      tile = b + i * G, kt0 = 0, kt1 = kts;
    } else {
      const int c = b % split;
      tile = waves * G + b / split, kt0 = c * kts / split, kt1 = (c + 1) * kts / split;
    }
  };

  if (threadIdx.x == 0) {
    for (int s = 0; s < S; ++s) {
      mbar_init(full + 8 * s, 1);
      mbar_init(empty + 8 * s, 8);  // one arrival per consumer warp
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  if (threadIdx.x >= 256) {  // the producer warpgroup: one thread issues the copies, the others leave
    set_max_regs<40>();
    if (threadIdx.x == 256) {
      int s = 0;
      uint32_t phase = 0;
      for (int i = 0; i < items; ++i) {
        int tile, kt0, kt1;
        work(i, tile, kt0, kt1);
        const int n0 = (tile % tiles_n) * BM, m0 = (tile / tiles_n) * BN;
        for (int kt = kt0; kt < kt1; ++kt) {
          mbar_wait(empty + 8 * s, phase ^ 1);
          mbar_expect_tx(full + 8 * s, P::X_BYTES + P::W_BYTES);
          tma_load(base + s * P::X_BYTES, &tx, kt * BK, m0, full + 8 * s);
          tma_load(base + P::W_OFF + s * P::W_BYTES, &tw, kt * (BK / 4), n0, full + 8 * s);
          if (++s == S) s = 0, phase ^= 1;
        }
      }
    }
    return;
  }

  set_max_regs<232>();  // the producer's registers go to the consumers: 40 x 128 + 232 x 256 <= 65536
  const int ctid = threadIdx.x, cw = ctid / 128;  // consumer thread and warpgroup
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int row = (ctid / 32) * 16 + g;  // this thread's rows of the tile: row and row + 8
  const int shift = 4 * t;
  const bool leader = ctid % 128 == 0;  // issues the warpgroup's output copies
  const uint32_t ybuf = base + P::Y_OFF + cw * P::Y_BYTES;
  int s = 0;
  uint32_t phase = 0;
  float acc[BN / 2];
  uint32_t a[2][2][4];  // [half of the k-tile][k16 step][register]

  // Decodes half h (k16 steps 2h, 2h + 1) of stage s into a[h] and issues its two wgmma as one group.
  auto half = [&](auto h, bool zero) {
    const uint32_t w = base + P::W_OFF + s * P::W_BYTES + row * 16 + 8 * h;
    const uint2 w0 = lds64(w), w1 = lds64(w + 8 * 16);
    decode_step<T>(w0.x >> shift, w1.x >> shift, magic, a[h][0]);
    decode_step<T>(w0.y >> shift, w1.y >> shift, magic, a[h][1]);
    wgmma_fence();
    const uint64_t desc = swizzled_desc(base + s * P::X_BYTES) + 4 * h;
    Wgmma<BN>::template mma<T>(acc, a[h][0], desc, !zero);
    Wgmma<BN>::template mma<T>(acc, a[h][1], desc + 2, 1);
    wgmma_commit();
  };

  for (int i = 0; i < items; ++i) {
    int tile, kt0, kt1;
    work(i, tile, kt0, kt1);
    const int n0 = (tile % tiles_n) * BM, m0 = (tile / tiles_n) * BN;

    // Two groups in flight at most: a half's registers are rewritten only after the group that read them
    // (two halves earlier) is done, and a stage goes back to the producer once its second half is done.
    for (int kt = kt0; kt < kt1; ++kt) {
      mbar_wait(full + 8 * s, phase);
      half(std::integral_constant<int, 0>{}, kt == kt0);
      wgmma_wait<1>();
      if (kt > kt0 && lane == 0) mbar_arrive(empty + 8 * (s == 0 ? S - 1 : s - 1));
      half(std::integral_constant<int, 1>{}, false);
      wgmma_wait<1>();
      if (++s == S) s = 0, phase ^= 1;
    }
    wgmma_wait<0>();
    fence_operands(acc);
    if (lane == 0) mbar_arrive(empty + 8 * (s == 0 ? S - 1 : s - 1));

    if (kt0 > 0 || kt1 < kts) {  // a k-range of a split tile
      const int c = b % split, tile_slot = b / split;
      float4* part = partials + static_cast<int64_t>(b) * (BN / 8) * 256 + ctid;
      if (kt1 < kts) {  // not the last k-range: leave the sums in this CTA's slot, count in, done
#pragma unroll
        for (int q = 0; q < BN / 8; ++q)
          __stcg(part + q * 256, make_float4(acc[4 * q], acc[4 * q + 1], acc[4 * q + 2], acc[4 * q + 3]));
        named_barrier(1, 256);  // all the slot's stores before thread 0's release (cumulative through the barrier)
        if (ctid == 0) asm volatile("red.release.gpu.global.add.s32 [%0], 1;" ::"l"(flags + tile_slot) : "memory");
        continue;
      }
      // The last k-range adds the others' slots in a fixed order, so the result does not depend on which CTA
      // finished first: loads of up to three slots in flight. Its CTA has the tile's highest index and waits only
      // on lower ones, which wait on nothing: no deadlock as long as CTAs start in index order (the grid is at
      // most one CTA per SM, so all start at once unless other work holds SMs).
      if (ctid == 0) {
        flag_acquire(flags + tile_slot, c);
        flags[tile_slot] = 0;  // zero again for the next launch on this workspace
      }
      named_barrier(1, 256);  // thread 0's acquire covers the others' loads after the barrier
      constexpr int U = BN == 256 ? 1 : 4;  // float4 per slot in flight: 12 U registers (none to spare at 256)
      static_assert(BN / 8 % U == 0, "slots are read U float4 at a time");
#pragma unroll
      for (int q = 0; q < BN / 8; q += U) {
        float4 v[kMaxSplit - 1][U];
#pragma unroll
        for (int o = 0; o < kMaxSplit - 1; ++o)
#pragma unroll
          for (int u = 0; u < U; ++u)
            if (o < c) v[o][u] = __ldcg(part - static_cast<int64_t>(o + 1) * (BN / 8) * 256 + (q + u) * 256);
#pragma unroll
        for (int o = 0; o < kMaxSplit - 1; ++o)
#pragma unroll
          for (int u = 0; u < U; ++u)
            if (o < c) {
              float* a4 = acc + 4 * (q + u);
              a4[0] += v[o][u].x, a4[1] += v[o][u].y, a4[2] += v[o][u].z, a4[3] += v[o][u].w;
            }
      }
    }

    // Epilogue: this warpgroup's 64 rows x BN tokens, scaled, into its shared box (the 128-byte swizzle:
    // conflict-free for these stores), then one TMA copy (or add) into y.
    if (leader) asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");  // the last copy has left
    named_barrier(2 + cw, 128);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int nl = row - 64 * cw + 8 * h, n = n0 + 64 * cw + nl;
      const float sc = n < N ? scale[n] : 0.f;
      const float bn_ = bias != nullptr && n < N ? to_f32(bias[n]) : 0.f;
#pragma unroll
      for (int j = 0; j < BN / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int tok = 8 * j + 2 * t + e;
          const T v = from_f32<T>(acc[4 * j + 2 * h + e] * sc + bn_);
          const uint32_t at = ybuf + tok * 128 + ((((nl >> 3) ^ tok) & 7) << 4) + (nl & 7) * 2;
          asm volatile("st.shared.b16 [%0], %1;" ::"r"(at), "h"(*reinterpret_cast<const uint16_t*>(&v)));
        }
      }
    }
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    named_barrier(2 + cw, 128);
    if (leader && n0 + 64 * cw < N) {
      const uint64_t map = reinterpret_cast<uint64_t>(&ty);
      if (accumulate)
        asm volatile("cp.reduce.async.bulk.tensor.2d.global.shared::cta.add.tile.bulk_group [%0, {%1, %2}], [%3];"
                     ::"l"(map), "r"(n0 + 64 * cw), "r"(m0), "r"(ybuf) : "memory");
      else
        asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%1, %2}], [%3];"
                     ::"l"(map), "r"(n0 + 64 * cw), "r"(m0), "r"(ybuf) : "memory");
      asm volatile("cp.async.bulk.commit_group;" ::: "memory");
    }
  }
  if (leader) asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
}

PFN_cuTensorMapEncodeTiled_v12000 encode_fn() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult q;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess) {
      cudaGetLastError();
      p = nullptr;
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(p);
  }();
  return fn;
}

// A row-major [rows, cols] matrix of `elem`-byte elements, copied in boxes of box_rows x box_cols.
bool make_map(CUtensorMap* map, CUtensorMapDataType type, const void* p, int64_t rows, int64_t cols, int elem,
              int box_rows, int box_cols, CUtensorMapSwizzle swizzle) {
  const auto fn = encode_fn();
  if (fn == nullptr) return false;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(cols * elem)};
  const cuuint32_t box[2] = {static_cast<cuuint32_t>(box_cols), static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t unit[2] = {1, 1};
  return fn(map, type, 2, const_cast<void*>(p), dims, strides, box, unit, CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle,
            CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// How a launch covers its tiles (the kernel's schedule): whole waves of tiles, then the rest split by k so
// that their CTAs fill the SMs, into at most kMaxSplit k-ranges of at least 4 k-tiles each.
struct Schedule {
  int grid = 0, waves = 0, split = 1;
  double rounds = 0;  // time in tile-times
};
Schedule schedule(int64_t tiles, int kts, int sms) {
  Schedule sc;
  sc.waves = static_cast<int>(tiles / sms);
  const int rest = static_cast<int>(tiles % sms);
  sc.split = rest ? std::max(1, std::min({sms / rest, kts / 4, kMaxSplit})) : 1;
  sc.grid = sc.waves > 0 ? sms : rest * sc.split;
  // A split tile also pays for its sums' round trip through L2, about 2 k-tiles (bench/NOTES.md, session 16).
  sc.rounds = sc.waves + (rest ? 1.0 / sc.split + (sc.split > 1 ? 2.0 / kts : 0.0) : 0.0);
  return sc;
}

// Tokens per tile (and its schedule): the fewest tile-times, weighted by each tile's speed per token
// measured on an H100 at FLUX.1-dev's shapes (bench/NOTES.md, session 16: 192 the fastest, 256 has room
// for 4 stages only, 128 pays its per-tile costs over fewer tokens). BITKERNEL_SM90_BN forces one.
struct Choice {
  int bn = 192;
  Schedule sc;
};
Choice pick(int64_t M, int64_t N, int kts, int sms) {
  static const int forced = [] {
    const char* v = std::getenv("BITKERNEL_SM90_BN");
    const int b = v ? std::atoi(v) : 0;
    return b == 128 || b == 192 || b == 256 ? b : 0;
  }();
  Choice best;
  double best_cost = 0;
  for (int bn : {192, 256, 128}) {
    if (forced && bn != forced) continue;
    const double speed = bn == 192 ? 1.0 : bn == 256 ? 0.98 : 0.82;
    const Schedule sc = schedule(((M + bn - 1) / bn) * ((N + BM - 1) / BM), kts, sms);
    const double cost = sc.rounds * bn / speed;
    if (best_cost == 0 || cost < best_cost) best = {bn, sc}, best_cost = cost;
  }
  return best;
}

template <typename T, int BN>
bool launch(const CUtensorMap& tx, const CUtensorMap& tw, const CUtensorMap& ty, const float* scale, const void* bias,
            int64_t M, int64_t N, int64_t K, bool accumulate, const Schedule& sc, int* flags, float4* partials,
            int dev, cudaStream_t stream) {
  using P = Plan<BN>;
  static std::atomic<bool> ready[kMaxDevices];
  auto kernel = gemm_ternary_sm90<T, BN>;
  if (dev < 0 || dev >= kMaxDevices || !ready[dev].load(std::memory_order_acquire)) {
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, P::SMEM) != cudaSuccess) {
      cudaGetLastError();
      return false;
    }
    if (dev >= 0 && dev < kMaxDevices) ready[dev].store(true, std::memory_order_release);
  }
  kernel<<<sc.grid, THREADS, P::SMEM, stream>>>(tx, tw, ty, scale, static_cast<const T*>(bias), static_cast<int>(M),
                                                 static_cast<int>(N), static_cast<int>(K), accumulate ? 1 : 0,
                                                 Magic<T>::MAGIC, sc.waves, sc.split, flags, partials);
  check_launch("gemm_ternary_sm90");
  return true;
}

}  // namespace

int64_t gemm_ternary_sm90_workspace_bytes(int sms) { return int64_t{sms} * (kSm90CountBytesPerSm + kPartialBytes); }

bool gemm_ternary_sm90_cuda(const void* x, int dtype, int64_t M, int64_t K, const uint8_t* q, const float* scale,
                            int64_t N, const void* bias, bool accumulate, void* y, void* workspace,
                            int64_t workspace_bytes, double min_ktiles, uintptr_t stream) {
  if (dtype != F16 && dtype != BF16) return false;
  if (M < 1 || K < BK || K % BK != 0 || N < 8 || N % 8 != 0) return false;
  const int64_t iterations = ((M + 127) / 128) * ((N + BM - 1) / BM) * (K / BK);  // at the smallest BN
  if (iterations >= (int64_t{1} << 31)) return false;
  const auto aligned = [](const void* p, uintptr_t a) { return reinterpret_cast<uintptr_t>(p) % a == 0; };
  if (!aligned(x, 16) || !aligned(q, 16) || !aligned(y, 16) || !aligned(bias, 2) || !aligned(workspace, 16))
    return false;
  const DeviceInfo info = current_device();
  if (info.major != 9 || info.minor != 0) return false;
  if (workspace_bytes < gemm_ternary_sm90_workspace_bytes(info.sms)) return false;

  const int kts = static_cast<int>(K / BK);
  const Choice choice = pick(M, N, kts, info.sms);
  const int bn = choice.bn;
  const Schedule& sc = choice.sc;
  if (sc.rounds * kts < min_ktiles) return false;
  CUtensorMap tx, tw, ty;
  const auto type = dtype == BF16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  if (!make_map(&tx, type, x, M, K, 2, bn, BK, CU_TENSOR_MAP_SWIZZLE_128B) ||
      !make_map(&tw, CU_TENSOR_MAP_DATA_TYPE_UINT8, q, N, K / 4, 1, BM, BK / 4, CU_TENSOR_MAP_SWIZZLE_NONE) ||
      !make_map(&ty, type, y, M, N, 2, bn, 64, CU_TENSOR_MAP_SWIZZLE_128B))
    return false;
  int* flags = static_cast<int*>(workspace);
  float4* partials = reinterpret_cast<float4*>(static_cast<uint8_t*>(workspace) + int64_t{info.sms} * kSm90CountBytesPerSm);
  const cudaStream_t st = as_stream(stream);
  bool done = false;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (!std::is_same_v<T, float>) {
      const auto go = [&](auto bn_c) {
        return launch<T, decltype(bn_c)::value>(tx, tw, ty, scale, bias, M, N, K, accumulate, sc, flags, partials,
                                                info.index, st);
      };
      done = bn == 256 ? go(std::integral_constant<int, 256>{})
             : bn == 192 ? go(std::integral_constant<int, 192>{})
                         : go(std::integral_constant<int, 128>{});
    }
  });
  return done;
}

}  // namespace bitkernel
