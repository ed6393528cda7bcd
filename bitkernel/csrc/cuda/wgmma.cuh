// wgmma.mma_async m64nNk16 with A in registers and B in shared memory (sm_90a), fp32 accumulators,
// for the N the sm_90 GEMM uses. d += A (64 x 16, four registers per thread) * B (16 x N, descriptor);
// scale_d == 0 makes it d = A * B. One asm statement per shape: the N / 2 accumulators are one
// instruction's operands (%0..%(N/2 - 1)), then the four A registers, the descriptor and scale_d. The
// operand lists are spelled out 32 at a time below and put together per N.
#pragma once
#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace bitkernel {

// Accumulators 32q..32q+31 as asm operand names and as constraints.
#define BITKERNEL_WGMMA_D0 "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31"
#define BITKERNEL_WGMMA_D1 "%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63"
#define BITKERNEL_WGMMA_D2 "%64,%65,%66,%67,%68,%69,%70,%71,%72,%73,%74,%75,%76,%77,%78,%79,%80,%81,%82,%83,%84,%85,%86,%87,%88,%89,%90,%91,%92,%93,%94,%95"
#define BITKERNEL_WGMMA_D3 "%96,%97,%98,%99,%100,%101,%102,%103,%104,%105,%106,%107,%108,%109,%110,%111,%112,%113,%114,%115,%116,%117,%118,%119,%120,%121,%122,%123,%124,%125,%126,%127"
#define BITKERNEL_WGMMA_C0 \
    "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
    "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
    "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
    "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define BITKERNEL_WGMMA_C1 \
    "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
    "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
    "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
    "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
#define BITKERNEL_WGMMA_C2 \
    "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), \
    "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), \
    "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), \
    "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95])
#define BITKERNEL_WGMMA_C3 \
    "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), \
    "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), \
    "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), \
    "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])

// N, the element type (f16 / bf16), the accumulator names, the operand numbers of A, the descriptor and
// scale_d, then the accumulator constraints.
#define BITKERNEL_WGMMA(N, TY, DREGS, A, DESC, SCALE, ...)                                           \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " SCALE ", 0;\n"                                  \
               "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TY "." TY " {" DREGS "}, " A ", " DESC \
               ", p, 1, 1, 0;\n}\n"                                                                   \
               : __VA_ARGS__                                                                         \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(scale_d))

template <int N> struct Wgmma;

template <> struct Wgmma<256> {
  template <typename T>
  __device__ static void mma(float (&d)[128], const uint32_t (&a)[4], uint64_t desc, int scale_d) {
#define BITKERNEL_WGMMA_256(TY)                                                                          \
  BITKERNEL_WGMMA(256, TY, BITKERNEL_WGMMA_D0 "," BITKERNEL_WGMMA_D1 "," BITKERNEL_WGMMA_D2 "," BITKERNEL_WGMMA_D3, \
                  "{%128,%129,%130,%131}", "%132", "%133", BITKERNEL_WGMMA_C0, BITKERNEL_WGMMA_C1,          \
                  BITKERNEL_WGMMA_C2, BITKERNEL_WGMMA_C3)
    if constexpr (std::is_same_v<T, __half>) BITKERNEL_WGMMA_256("f16"); else BITKERNEL_WGMMA_256("bf16");
#undef BITKERNEL_WGMMA_256
  }
};

template <> struct Wgmma<192> {
  template <typename T>
  __device__ static void mma(float (&d)[96], const uint32_t (&a)[4], uint64_t desc, int scale_d) {
#define BITKERNEL_WGMMA_192(TY)                                                                            \
  BITKERNEL_WGMMA(192, TY, BITKERNEL_WGMMA_D0 "," BITKERNEL_WGMMA_D1 "," BITKERNEL_WGMMA_D2, "{%96,%97,%98,%99}", \
                  "%100", "%101", BITKERNEL_WGMMA_C0, BITKERNEL_WGMMA_C1, BITKERNEL_WGMMA_C2)
    if constexpr (std::is_same_v<T, __half>) BITKERNEL_WGMMA_192("f16"); else BITKERNEL_WGMMA_192("bf16");
#undef BITKERNEL_WGMMA_192
  }
};

template <> struct Wgmma<128> {
  template <typename T>
  __device__ static void mma(float (&d)[64], const uint32_t (&a)[4], uint64_t desc, int scale_d) {
#define BITKERNEL_WGMMA_128(TY)                                                                              \
  BITKERNEL_WGMMA(128, TY, BITKERNEL_WGMMA_D0 "," BITKERNEL_WGMMA_D1, "{%64,%65,%66,%67}", "%68", "%69",          \
                  BITKERNEL_WGMMA_C0, BITKERNEL_WGMMA_C1)
    if constexpr (std::is_same_v<T, __half>) BITKERNEL_WGMMA_128("f16"); else BITKERNEL_WGMMA_128("bf16");
#undef BITKERNEL_WGMMA_128
  }
};

#undef BITKERNEL_WGMMA
#undef BITKERNEL_WGMMA_D0
#undef BITKERNEL_WGMMA_D1
#undef BITKERNEL_WGMMA_D2
#undef BITKERNEL_WGMMA_D3
#undef BITKERNEL_WGMMA_C0
#undef BITKERNEL_WGMMA_C1
#undef BITKERNEL_WGMMA_C2
#undef BITKERNEL_WGMMA_C3

}  // namespace bitkernel
