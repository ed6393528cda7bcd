// The read floor of the M = 1 ternary product: how fast can a kernel only read the 14.2 MB of packed
// weights of FLUX.1-dev's 18432 x 3072 modulation layer, in the small-M kernel's access pattern (lane
// (g, t) reads 16 B at 16t + 64c of rows g, g+8, 16+g, 24+g: 64 B of each of 32 rows per warp and chunk),
// in a tiled layout (each warp's chunk 2 KB contiguous), and as a plain grid-stride stream? The loads are
// XOR-reduced, so the time is the memory system's alone; bench/NOTES.md (session 8) has the H200 numbers. The TMA
// variants read the same bytes with cp.async.bulk copies into shared memory (bench/NOTES.md, session 11).
//
//   nvcc -std=c++17 -O3 -arch=sm_90 bench/read_floor.cu -o /tmp/read_floor && /tmp/read_floor
//
// Timing as bench/kernels.py: CUDA graphs of 20 calls, weights rotated over 24 copies (340 MB, beyond L2).
#include <cstdio>
#include <cstdint>
#include <vector>
#include <algorithm>
#include <cuda_runtime.h>
#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("%s: %s\n", #x, cudaGetErrorString(e)); return 1; } } while (0)

template <int HINT> __device__ __forceinline__ uint4 ldw(const uint8_t* p) {
  uint4 v;
  if (HINT) asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  else asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

// LAYOUT 0: canonical rows (row n at n * K/4); lane (g, t) reads 16 B at 16t + 64c of rows g, g+8, 16+g, 24+g.
// LAYOUT 1: tiled: a 32-row tile is contiguous, chunk c of it at c * 2048, load j of the lane at j * 512 + 16 lane.
// DEPTH: chunks in flight per warp (1 = load next while consuming current, CPW = all up front).
template <int LAYOUT, int HINT, int DEPTH>
__global__ void __launch_bounds__(512) rd(const uint8_t* __restrict__ q, int K, int cpw, uint32_t* sink) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int64_t rowb = K / 4, n0 = blockIdx.x * 32;
  const int c0 = warp * cpw;
  auto addr = [&](int c, int j) -> const uint8_t* {
    if (LAYOUT == 0) return q + (n0 + 8 * j + g) * rowb + 16 * t + 64 * c;
    return q + n0 * rowb + c * 2048 + j * 512 + 16 * lane;
  };
  uint32_t acc = 0;
  uint4 buf[DEPTH + 1][4];
#pragma unroll
  for (int d = 0; d < DEPTH; ++d)
#pragma unroll
    for (int j = 0; j < 4; ++j) buf[d][j] = d < cpw ? ldw<HINT>(addr(c0 + d, j)) : make_uint4(0, 0, 0, 0);
  for (int c = 0; c < cpw; c += DEPTH + 1) {
#pragma unroll
    for (int s = 0; s <= DEPTH; ++s) {
      const int cc = c + s;
      if (cc >= cpw) break;
      const int nx = cc + DEPTH, slot = (s + DEPTH) % (DEPTH + 1);
      if (nx < cpw)
#pragma unroll
        for (int j = 0; j < 4; ++j) buf[slot][j] = ldw<HINT>(addr(c0 + nx, j));
#pragma unroll
      for (int j = 0; j < 4; ++j) acc ^= buf[s][j].x ^ buf[s][j].y ^ buf[s][j].z ^ buf[s][j].w;
    }
  }
  if (acc == 0x12345678u) sink[0] = acc;
}

__global__ void stream(const uint4* __restrict__ q, int64_t n16, uint32_t* sink) {
  uint32_t acc = 0;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n16; i += (int64_t)gridDim.x * blockDim.x) {
    uint4 v = __ldg(q + i);
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x12345678u) sink[0] = acc;
}

// TMA: each block reads its contiguous share with cp.async.bulk copies of `piece` bytes into shared memory,
// all issued up front by one thread (the share must fit), completion on one mbarrier per copy.
__global__ void tma(const uint8_t* __restrict__ q, int64_t share, int piece, uint32_t* sink) {
  extern __shared__ __align__(128) uint8_t smem[];
  const int copies = static_cast<int>((share + piece - 1) / piece);
  uint64_t* bars = reinterpret_cast<uint64_t*>(smem);
  uint8_t* data = smem + ((copies * 8 + 127) & ~127);
  const uint8_t* src = q + blockIdx.x * share;
  if (threadIdx.x == 0) {
    for (int i = 0; i < copies; ++i)
      asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"((uint32_t)__cvta_generic_to_shared(bars + i)));
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    for (int i = 0; i < copies; ++i) {
      const int64_t left = share - (int64_t)i * piece;
      const uint32_t bytes = (uint32_t)(left < piece ? left : piece);
      const uint32_t bar = (uint32_t)__cvta_generic_to_shared(bars + i);
      asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
      asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                       (uint32_t)__cvta_generic_to_shared(data + (int64_t)i * piece)),
                   "l"(src + (int64_t)i * piece), "r"(bytes), "r"(bar) : "memory");
    }
  }
  __syncthreads();
  uint32_t acc = 0;
  for (int i = threadIdx.x / 32; i < copies; i += blockDim.x / 32) {  // warp w waits for copies w, w + warps, ...
    const uint32_t bar = (uint32_t)__cvta_generic_to_shared(bars + i);
    uint32_t done = 0;
    while (!done)
      asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], 0; selp.u32 %0, 1, 0, p; }"
                   : "=r"(done) : "r"(bar) : "memory");
    acc ^= *reinterpret_cast<const uint32_t*>(data + (int64_t)i * piece + 4 * (threadIdx.x & 31));
  }
  if (acc == 0x12345678u) sink[0] = acc;
}

int main() {
  const int N = 18432, K = 3072;
  const size_t bytes = (size_t)N * K / 4;
  const int R = 24;  // copies in rotation: 340 MB, beyond L2
  uint8_t* buf; uint32_t* sink;
  CK(cudaMalloc(&buf, bytes * R)); CK(cudaMalloc(&sink, 4));
  CK(cudaMemset(buf, 0x55, bytes * R));
  cudaStream_t st; CK(cudaStreamCreate(&st));
  cudaEvent_t e0, e1; cudaEventCreate(&e0); cudaEventCreate(&e1);
  int sms; cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  auto timeit = [&](const char* name, auto launch) {
    cudaGraph_t gr; cudaGraphExec_t ge;
    cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal);
    for (int i = 0; i < 20; ++i) launch(buf + (size_t)(i % R) * bytes);
    cudaStreamEndCapture(st, &gr);
    cudaGraphInstantiate(&ge, gr, 0);
    cudaGraphLaunch(ge, st); cudaStreamSynchronize(st);
    std::vector<float> v;
    for (int r = 0; r < 15; ++r) {
      cudaEventRecord(e0, st); cudaGraphLaunch(ge, st); cudaEventRecord(e1, st); cudaEventSynchronize(e1);
      float ms; cudaEventElapsedTime(&ms, e0, e1); v.push_back(ms * 1000 / 20);
    }
    std::sort(v.begin(), v.end());
    const float us = v[v.size() / 2];
    printf("%-44s %7.2f us  %5.2f TB/s\n", name, us, bytes / us / 1e6);
    cudaGraphExecDestroy(ge); cudaGraphDestroy(gr);
  };
  const int blocks = N / 32;
  timeit("stream (grid-stride, 4*SMs x 512)", [&](const uint8_t* p) { stream<<<4 * sms, 512, 0, st>>>((const uint4*)p, bytes / 16, sink); });
  timeit("stream (grid-stride, 8*SMs x 256)", [&](const uint8_t* p) { stream<<<8 * sms, 256, 0, st>>>((const uint4*)p, bytes / 16, sink); });
#define V(L, H, D, S_, C_) timeit("layout " #L " hint " #H " depth " #D " warps/blk " #S_ " cpw " #C_, [&](const uint8_t* p) { rd<L, H, D><<<blocks, 32 * S_, 0, st>>>(p, K, C_, sink); });
  V(0, 1, 1, 4, 3) V(0, 0, 1, 4, 3) V(0, 1, 2, 4, 3) V(0, 0, 2, 4, 3)
  V(1, 1, 1, 4, 3) V(1, 0, 1, 4, 3) V(1, 0, 2, 4, 3)
  V(0, 1, 1, 12, 1) V(1, 0, 1, 12, 1) V(0, 1, 1, 6, 2) V(1, 0, 1, 6, 2) V(1, 0, 1, 2, 6) V(0, 1, 1, 2, 6)
  V(0, 1, 1, 1, 12) V(1, 0, 1, 1, 12) V(1, 0, 3, 1, 12)
  CK(cudaFuncSetAttribute(tma, cudaFuncAttributeMaxDynamicSharedMemorySize, 227 * 1024));
  for (int per_sm : {1, 2, 4})
    for (int piece : {1024, 4096, 12288, 32768, 1 << 20}) {
      const int grid = per_sm * sms;
      const int64_t share = ((bytes + grid - 1) / grid + 15) / 16 * 16;
      const int64_t smem = share + 128 + ((share + piece - 1) / piece) * 8;
      if (smem > 227 * 1024 / per_sm) continue;
      char name[96];
      snprintf(name, sizeof name, "TMA %d blk/SM, copies of %d B", per_sm, (int)std::min<int64_t>(piece, share));
      timeit(name, [&](const uint8_t* p) { tma<<<(int)((bytes + share - 1) / share), 416, smem, st>>>(p, share, piece, sink); });
      if (piece >= share) break;
    }
  CK(cudaGetLastError());
  return 0;
}
