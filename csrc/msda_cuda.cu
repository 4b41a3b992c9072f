// Multi-scale deformable attention, forward and backward CUDA kernels.
//
// Semantics (those of Deformable-DETR and of F.grid_sample(align_corners=False, padding_mode='zeros')):
//   out[n, q, m, c] = sum_{l, p} A[n, q, m, l, p] * bilinear(value[n, level l, m, :, c], loc[n, q, m, l, p])
//   with pixel = loc * size - 0.5 and zero outside the map.
//
// Layout: one warp per (n, q, m). The head dim D is split into vectors of VEC channels (16 bytes: 4 fp32,
// 8 bf16/fp16, 2 fp64), and a "group" of LPP = D / VEC lanes covers one sampling point, so a warp has
// PPW = 32 / LPP points in flight (DINO, D = 32: 8 points per warp in bf16, 4 in fp32). Each lane issues its four
// 16-byte corner loads together. The forward sums over a warp's points with shuffles across groups; the backward needs
// three sums over channels per point (grad of attention, of x and of y), which follow from four dot products of
// grad_out with the corners and are shuffles inside a group: no shared memory, no block barriers, no serial loops
// (the original op uses 32-thread blocks and one thread summing serially).
// grad_value is accumulated with atomics into an fp32 (fp64 for double) buffer, 16-byte vector atomics on sm_90; in
// fp16/bf16 neighbouring groups team up so that one atomic instruction covers whole rows, as in fp32.
// Anything that does not fit (D not a multiple of VEC, D / VEC not a power of two, unaligned pointers) takes the
// generic instantiation VEC = 1, LPP = 32 (a lane per channel, looping over channels in steps of 32).
//
// What limits them (H200, DINO's encoder shape, Nsight Compute): the forward issues an instruction on 78% of cycles
// (bf16), which is why it counts instructions per point (level_of, 32-bit offsets, four dot products in the
// backward); the backward is bound by L2's reduction throughput: its fp32 atomics' sectors run at 100% of peak,
// while issue is at 42%. Without the atomics the bf16 backward takes 0.41 ms instead of 0.82.

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <algorithm>
#include <cstring>
#include <vector>

namespace {

constexpr int kWarpsPerBlock = 8;
// A backward block works through kBackwardTile rounds of kWarpsPerBlock (n, q, m) tasks, and its registers are capped
// so that kBackwardMinBlocks blocks fit on a multiprocessor: more warps in flight hide the corner loads and atomics.
// H200, DINO's encoder shape, the backward call alone (kernel, zeroing and cast of grad_value), against one round per
// block and no cap: bf16 0.975 -> 0.869 ms (then 80 registers under a cap for 3 blocks; the present kernel fits 64
// without spilling), fp32 0.947 -> 0.887 (64 registers);
// with offsets spread 3x wider 0.920 -> 0.744 and 0.878 -> 0.778. Tiles of 8 measured the same as 4. The forward
// (36-40 registers) already fits 6 blocks, and tiling it measured slower (fp32 0.47 -> 0.53 ms with 4 rounds).
// Also measured and rejected (H200, same shape): blocks of 16 or 24 warps when heads still varied fastest (2 or 3
// queries a block, for L1 sharing between them: forward and backward within 2% either way); and a backward that keeps
// each head's coarsest 1,536 tokens of grad_value in shared memory (a block per (n, m), flushed once), where levels 2
// and 3 take half of the corner atomics: bf16 0.886 -> 1.066 ms, because sm_90 has no shared-memory float add
// (atomicAdd there is a compare-and-swap loop, ATOMS.CAST.SPIN). Without those adds that layout ran 0.737 ms: the most
// such a scheme could gain. Since L2's reduction rate is the limit, spreading the atomics does not help either:
// consecutive backward blocks on different (n, m), or the coarsest S / 16 tokens' gradients in 8 or 16 replicas
// summed afterwards, measured 1-8% slower (bf16 backward 0.826 -> 0.839-0.879 ms). With 69 registers (3 blocks a
// multiprocessor) instead of the cap of 64 for 4, the bf16 backward ran 1% slower.
constexpr int kBackwardTile = 4;
template <typename scalar_t>
constexpr int kBackwardMinBlocks = sizeof(scalar_t) <= 4 ? 4 : 1;

template <int BYTES> struct Raw;  // an unsigned type of BYTES bytes, to move VEC channels with one instruction
template <> struct Raw<2> { using T = unsigned short; };
template <> struct Raw<4> { using T = unsigned int; };
template <> struct Raw<8> { using T = uint2; };
template <> struct Raw<16> { using T = uint4; };

// Load VEC consecutive channels starting at p (aligned to VEC * sizeof(scalar_t)) as float (double for fp64).
template <typename scalar_t, int VEC, typename acc_t, typename R>
__device__ __forceinline__ void unpack_vec(const R& raw, acc_t (&v)[VEC]) {
  scalar_t s[VEC];
  memcpy(s, &raw, sizeof(raw));
#pragma unroll
  for (int i = 0; i < VEC; ++i) v[i] = static_cast<acc_t>(s[i]);
}

template <typename scalar_t, int VEC, typename acc_t>
__device__ __forceinline__ void load_vec(const scalar_t* p, acc_t (&v)[VEC]) {
  using R = typename Raw<VEC * sizeof(scalar_t)>::T;
  unpack_vec<scalar_t, VEC>(__ldg(reinterpret_cast<const R*>(p)), v);
}

template <typename scalar_t, int VEC, typename acc_t>
__device__ __forceinline__ void store_vec(scalar_t* p, const acc_t (&v)[VEC]) {
  using R = typename Raw<VEC * sizeof(scalar_t)>::T;
  scalar_t s[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) s[i] = static_cast<scalar_t>(v[i]);
  R raw;
  memcpy(&raw, s, sizeof(raw));
  *reinterpret_cast<R*>(p) = raw;
}

// grad_value[0:W] += w * g[0:W] for W = 16 bytes of accumulator (4 fp32, 2 fp64): one vector atomic on sm_90,
// which has float2/float4 atomics (4x fewer atomic instructions), scalar atomics elsewhere.
template <int W>
__device__ __forceinline__ void atomic_add_vec(float* p, const float* g, float w) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if constexpr (W == 4) {
    atomicAdd(reinterpret_cast<float4*>(p), make_float4(w * g[0], w * g[1], w * g[2], w * g[3]));
    return;
  } else if constexpr (W == 2) {
    atomicAdd(reinterpret_cast<float2*>(p), make_float2(w * g[0], w * g[1]));
    return;
  }
#endif
#pragma unroll
  for (int i = 0; i < W; ++i) atomicAdd(p + i, w * g[i]);
}

template <int W>
__device__ __forceinline__ void atomic_add_vec(double* p, const double* g, double w) {
#pragma unroll
  for (int i = 0; i < W; ++i) atomicAdd(p + i, w * g[i]);
}

// Where a sampling point falls: its top-left corner (as a token index within the level; the others are + 1, + W
// and + W + 1) and the four corners' bilinear weights (zero for a corner outside the map, which is how zero padding
// enters).
template <typename acc_t>
struct Bilinear {
  int tok;        // h0 * W + w0; may lie outside the map (only corners inside are read)
  acc_t w[4];     // bilinear weight of each corner (0 outside the map)
  bool valid[4];  // corner inside the map (its value enters the location gradient even at weight 0)
  acc_t lh, lw;   // fractional parts, needed for the location gradient
  bool inside;    // false: the point contributes nothing and gets no gradient
};

template <typename acc_t>
__device__ __forceinline__ Bilinear<acc_t> locate(acc_t x, acc_t y, int H, int W) {
  Bilinear<acc_t> b;
  const acc_t h = y * H - acc_t(0.5), w = x * W - acc_t(0.5);
  // exactly on -1, row / column 0 has weight 0 but still a location gradient, as in grid_sample (the original op's
  // "> -1" drops it: with DINO's initial offsets of whole pixels, edge tokens' first points land there)
  b.inside = h >= acc_t(-1) && w >= acc_t(-1) && h < acc_t(H) && w < acc_t(W);
  const int h0 = static_cast<int>(floor(h)), w0 = static_cast<int>(floor(w));
  b.lh = h - h0;
  b.lw = w - w0;
  const acc_t hh = 1 - b.lh, hw = 1 - b.lw;
  const bool top = h0 >= 0, bottom = h0 + 1 <= H - 1, left = w0 >= 0, right = w0 + 1 <= W - 1;
  b.valid[0] = b.inside && top && left;
  b.valid[1] = b.inside && top && right;
  b.valid[2] = b.inside && bottom && left;
  b.valid[3] = b.inside && bottom && right;
  b.w[0] = b.valid[0] ? hh * hw : acc_t(0);
  b.w[1] = b.valid[1] ? hh * b.lw : acc_t(0);
  b.w[2] = b.valid[2] ? b.lh * hw : acc_t(0);
  b.w[3] = b.valid[3] ? b.lh * b.lw : acc_t(0);
  b.tok = b.inside ? h0 * W + w0 : 0;
  return b;
}

// The four corners' VEC channels from row = the top-left corner's channels (row + s * stride is s tokens on), zeros
// for a corner outside the map. All four loads are issued before any value is used, so they are in flight together.
// Offsets of the four corners from the top-left one, in elements, for a level of width W (stride = M * D).
struct CornerSteps {
  int s[4];
  __device__ __forceinline__ CornerSteps(int stride, int W) : s{0, stride, W * stride, (W + 1) * stride} {}
  __device__ __forceinline__ int operator[](int c) const { return s[c]; }
};

template <typename scalar_t, int VEC, typename acc_t>
__device__ __forceinline__ void load_corners(const scalar_t* row, int stride, int W, const bool (&valid)[4],
                                             acc_t (&v)[4][VEC]) {
  using R = typename Raw<VEC * sizeof(scalar_t)>::T;
  const CornerSteps step(stride, W);
  R raw[4];
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    raw[c] = R{};
    if (valid[c]) raw[c] = __ldg(reinterpret_cast<const R*>(row + step[c]));
  }
#pragma unroll
  for (int c = 0; c < 4; ++c) unpack_vec<scalar_t, VEC>(raw[c], v[c]);
}

// Which (n, q, m) a warp works on. The grid is (query blocks, n * m): queries vary fastest, so a block's warps are
// neighbouring queries of one head, which in the encoder sample neighbouring pixels in the same channels and share L1
// lines (a backward block's 32 tasks are 32 queries in a row). H200, DINO's encoder, fwd+bwd against heads fastest:
// fp32 1.348 -> 1.271 ms, bf16 1.192 -> 1.162. blockIdx.y steps through n * m in strides of gridDim.y (at most 65,535).
// Offsets within one image's value (S * M * D elements, at most 2^30: msda.cpp checks) are 32-bit, which saves a dozen
// instructions per sampling point; the image's base offset is 64-bit.
struct WarpTask {
  int64_t qm;  // (n * Lq + q) * M + m: indexes locations, weights and their gradients
  int64_t nm;  // offset of value[n, 0, m, 0] (and of grad_value's)
};

__device__ __forceinline__ WarpTask warp_task(int64_t q, int64_t nm, int64_t S, int64_t Lq, int M, int D) {
  const int64_t n = nm / M;  // a 64-bit division, but once per task
  const int m = static_cast<int>(nm - n * M);
  return {(n * Lq + q) * M + m, n * S * M * D + m * D};
}

template <typename acc_t>
__device__ __forceinline__ acc_t shfl_xor(acc_t v, int mask) { return __shfl_xor_sync(0xffffffffu, v, mask); }

// The level of point p (p / P) without an integer division, which costs some 20 instructions per point: p_div is
// ceil(2^32 / P) (0 for P = 1), exact for p * P < 2^32 (msda.cpp checks L * P * P < 2^31).
__device__ __forceinline__ int level_of(int p, unsigned p_div) {
  return p_div ? static_cast<int>(__umulhi(static_cast<unsigned>(p), p_div)) : p;
}

unsigned point_divisor(int64_t P) {
  return P == 1 ? 0u : static_cast<unsigned>(((uint64_t(1) << 32) + P - 1) / P);
}

template <typename scalar_t, int VEC, int LPP>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
msda_forward_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes,
                    const int64_t* __restrict__ starts, const at::opmath_type<scalar_t>* __restrict__ loc,
                    const at::opmath_type<scalar_t>* __restrict__ attn, scalar_t* __restrict__ out,
                    int64_t N, int64_t S, int64_t Lq, int M, int D, int L, int P, unsigned p_div) {
  // Locations and weights come in acc_t (fp32, fp64 for double) whatever the value dtype.
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int PPW = 32 / LPP;
  const int64_t q = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (q >= Lq) return;
  const int lane = threadIdx.x % 32, group = lane / LPP, lig = lane % LPP;
  const int LP = L * P;
  const int chunks = (D + VEC - 1) / VEC;
  const int stride = M * D;  // from one token to the next
  for (int64_t nm = blockIdx.y; nm < N * M; nm += gridDim.y) {
    const WarpTask t = warp_task(q, nm, S, Lq, M, D);
    const acc_t* loc_w = loc + t.qm * LP * 2;
    const acc_t* attn_w = attn + t.qm * LP;
    const scalar_t* value_nm = value + t.nm;  // value[n, 0, m, 0]

    // LPP < 32 implies chunks == LPP: one iteration per lane, which the compiler is told. Else (D / VEC > 32, or the
    // generic path) a loop over the channels in steps of 32 vectors.
    const int k_end = LPP < 32 ? lig + 1 : chunks;
    for (int k = lig; k < k_end; k += LPP) {
      acc_t acc[VEC] = {};
      for (int p = group; p < LP; p += PPW) {  // no shuffles inside this loop, so lanes may leave it early
        const int l = level_of(p, p_div);
        const int H = static_cast<int>(shapes[2 * l]), W = static_cast<int>(shapes[2 * l + 1]);
        const Bilinear<acc_t> b = locate<acc_t>(loc_w[2 * p], loc_w[2 * p + 1], H, W);
        if (!b.inside) continue;
        acc_t v[4][VEC];
        load_corners<scalar_t, VEC>(value_nm + ((static_cast<int>(starts[l]) + b.tok) * stride + k * VEC), stride, W,
                                    b.valid, v);
        const acc_t a = attn_w[p];
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const acc_t aw = a * b.w[c];
#pragma unroll
          for (int i = 0; i < VEC; ++i) acc[i] += aw * v[c][i];
        }
      }
      // Sum the partial outputs of the PPW groups (lanes with the same channels). PPW > 1 implies chunks == LPP,
      // so every lane reaches this point exactly once and the full-warp shuffle is safe.
#pragma unroll
      for (int off = LPP; off < 32; off *= 2)
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[i] += shfl_xor(acc[i], off);
      if (group == 0) store_vec<scalar_t, VEC>(out + t.qm * D + k * VEC, acc);
    }
  }
}

template <typename scalar_t, int VEC, int LPP>
__global__ void __launch_bounds__(kWarpsPerBlock * 32, kBackwardMinBlocks<scalar_t>)
msda_backward_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes,
                     const int64_t* __restrict__ starts, const at::opmath_type<scalar_t>* __restrict__ loc,
                     const at::opmath_type<scalar_t>* __restrict__ attn, const scalar_t* __restrict__ grad_out,
                     at::opmath_type<scalar_t>* __restrict__ grad_value,
                     at::opmath_type<scalar_t>* __restrict__ grad_loc,
                     at::opmath_type<scalar_t>* __restrict__ grad_attn,
                     int64_t N, int64_t S, int64_t Lq, int M, int D, int L, int P, unsigned p_div) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int PPW = 32 / LPP;
  constexpr int AW = VEC * sizeof(acc_t) > 16 ? 16 / sizeof(acc_t) : VEC;  // channels per atomic instruction
  constexpr int R = VEC / AW;  // atomic instructions per lane and corner (2 for fp16/bf16)
  // LPP < 32 implies chunks == LPP: each lane holds one vector of channels, for all of a task's points.
  constexpr bool kOneChunk = LPP < 32;
  // Teams of R groups for the atomics (below).
  constexpr bool kPaired = R > 1 && kOneChunk && PPW % R == 0;
  const int lane = threadIdx.x % 32, group = lane / LPP, lig = lane % LPP;
  const int LP = L * P;
  const int chunks = (D + VEC - 1) / VEC;
  const int stride = M * D;
  for (int64_t nm = blockIdx.y; nm < N * M; nm += gridDim.y) {
    for (int task = 0; task < kBackwardTile; ++task) {  // the block's tasks, kWarpsPerBlock at a time
      const int64_t q = (static_cast<int64_t>(blockIdx.x) * kBackwardTile + task) * kWarpsPerBlock + threadIdx.x / 32;
      if (q >= Lq) break;
      const WarpTask t = warp_task(q, nm, S, Lq, M, D);
      const acc_t* loc_w = loc + t.qm * LP * 2;
      const acc_t* attn_w = attn + t.qm * LP;
      const scalar_t* value_nm = value + t.nm;
      acc_t* grad_nm = grad_value + t.nm;
      const scalar_t* g_w = grad_out + t.qm * D;
      acc_t g1[VEC];  // kOneChunk: this lane's channels of grad_out, the same for every point
      if constexpr (kOneChunk) load_vec<scalar_t, VEC>(g_w + lig * VEC, g1);
      // kPaired: the channels of grad_out that this lane adds into grad_value (the atomics' layout, below)
      const int team_ch = ((group % R) * LPP + lig) * AW;
      acc_t g_team[AW];
      if constexpr (kPaired) load_vec<scalar_t, AW>(g_w + team_ch, g_team);

      // Every lane runs the same number of iterations (p may be past the end: it then contributes zeros), because
      // the group reductions below shuffle across the whole warp.
      for (int p0 = 0; p0 < LP; p0 += PPW) {
        const int p = p0 + group;
        const bool active = p < LP;
        const int l = active ? level_of(p, p_div) : 0;
        const int H = static_cast<int>(shapes[2 * l]), W = static_cast<int>(shapes[2 * l + 1]);
        const Bilinear<acc_t> b =
            locate<acc_t>(active ? loc_w[2 * p] : acc_t(-2), active ? loc_w[2 * p + 1] : acc_t(-2), H, W);
        const acc_t a = active ? attn_w[p] : acc_t(0);
        const int row = (static_cast<int>(starts[l]) + b.tok) * stride;  // the top-left corner's channel 0
        // dot[c]: this lane's share of sum over channels of grad_out * value at corner c (0 outside the map). The
        // point's three gradients are linear in these four sums, so the channel loop costs one FMA per corner.
        acc_t dot[4] = {0, 0, 0, 0};
        if (b.inside) {
          for (int k = lig; k < (kOneChunk ? lig + 1 : chunks); k += LPP) {
            acc_t g[VEC], v[4][VEC];
            if constexpr (kOneChunk) {
#pragma unroll
              for (int i = 0; i < VEC; ++i) g[i] = g1[i];
            } else {
              load_vec<scalar_t, VEC>(g_w + k * VEC, g);
            }
            load_corners<scalar_t, VEC>(value_nm + (row + k * VEC), stride, W, b.valid, v);
#pragma unroll
            for (int c = 0; c < 4; ++c)
#pragma unroll
              for (int i = 0; i < VEC; ++i) dot[c] += g[i] * v[c][i];
            if constexpr (!kPaired) {
              // The atomics use their own channel layout: with VEC > AW (8 bf16 channels a lane, 4 fp32 an atomic),
              // atomic i of lane lig covers channels (i * LPP + lig) * AW of this round, so that one atomic instruction
              // of a group hits contiguous memory. In the load layout it would be strided, which measured 3x slower.
              const int round = (k - lig) * VEC;  // first channel covered by this round of the LPP lanes
              const CornerSteps step(stride, W);
#pragma unroll
              for (int i = 0; i < VEC / AW; ++i) {
                const int ch = round + (i * LPP + lig) * AW;
                acc_t ga[AW];
                if constexpr (AW == VEC) {  // the two layouts coincide (fp32, fp64): no second load
#pragma unroll
                  for (int j = 0; j < AW; ++j) ga[j] = g[j];
                } else {
                  load_vec<scalar_t, AW>(g_w + ch, ga);
                }
#pragma unroll
                for (int c = 0; c < 4; ++c)
                  if (b.valid[c]) atomic_add_vec<AW>(grad_nm + (row + step[c] + ch), ga, a * b.w[c]);
              }
            }
          }
        }
        if constexpr (kPaired) {
          // fp16/bf16 with D = R * LPP * AW channels: a group's LPP lanes cover only 1/R of a point's fp32 gradient row
          // per atomic instruction (D = 32: 64 of 128 bytes). R neighbouring groups team up instead: in turn i they all
          // add into the point of group (first of the team + i), lane (j, lig) covering channels team_ch = (j * LPP +
          // lig) * AW, so that each instruction writes whole rows. That point's corner weights and row come by
          // shuffle (all lanes take part: this is outside the `if (b.inside)`). H100, encoder shape: bf16 backward
          // 1.22 -> 1.06 ms.
          acc_t wc[4];  // weight of each corner, 0 for a corner outside the map (or a point outside, or past the end)
#pragma unroll
          for (int c = 0; c < 4; ++c) wc[c] = b.valid[c] ? a * b.w[c] : acc_t(0);  // a NaN weight stays off the map
#pragma unroll
          for (int i = 0; i < R; ++i) {
            const int src = (group - group % R + i) * LPP;  // first lane of the point's group
            const int r = __shfl_sync(0xffffffffu, row, src) + team_ch;
            const int Ws = __shfl_sync(0xffffffffu, W, src);
            const CornerSteps step(stride, Ws);
#pragma unroll
            for (int c = 0; c < 4; ++c) {
              const acc_t w = __shfl_sync(0xffffffffu, wc[c], src);
              if (w != acc_t(0)) atomic_add_vec<AW>(grad_nm + (r + step[c]), g_team, w);  // adding 0 is a no-op
            }
          }
        }
        // The point's gradients from the four sums, then summed over the group's lanes. A point outside the map gets
        // zeros (its fractional parts are inf or NaN for an inf or NaN location). The corner differences of sums lose
        // a little against sums of per-channel differences on smooth maps (fp32: ~1e-7 relative of the sums).
        acc_t d_attn = 0, d_w = 0, d_h = 0;
        if (b.inside) {
          const acc_t hh = 1 - b.lh, hw = 1 - b.lw;
          d_attn = b.w[0] * dot[0] + b.w[1] * dot[1] + b.w[2] * dot[2] + b.w[3] * dot[3];
          d_w = hh * (dot[1] - dot[0]) + b.lh * (dot[3] - dot[2]);
          d_h = hw * (dot[2] - dot[0]) + b.lw * (dot[3] - dot[1]);
        }
#pragma unroll
        for (int off = 1; off < LPP; off *= 2) {
          d_attn += shfl_xor(d_attn, off);
          d_w += shfl_xor(d_w, off);
          d_h += shfl_xor(d_h, off);
        }
        if (active && lig == 0) {  // this warp owns the point: plain stores, and every point is written
          grad_attn[t.qm * LP + p] = d_attn;
          grad_loc[(t.qm * LP + p) * 2] = W * a * d_w;
          grad_loc[(t.qm * LP + p) * 2 + 1] = H * a * d_h;
        }
      }
    }
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// The (VEC, LPP) a problem runs with: 16-byte vectors when D allows, else the generic (1, 32).
template <typename scalar_t>
std::pair<int, int> choose_layout(int D, std::initializer_list<const void*> ptrs) {
  constexpr int vec = 16 / sizeof(scalar_t);
  bool ok = D % vec == 0;
  for (const void* p : ptrs) ok = ok && aligned16(p);
  if (!ok) return {1, 32};
  const int lanes = D / vec;
  if (lanes >= 32) return lanes % 32 == 0 ? std::pair<int, int>{vec, 32} : std::pair<int, int>{1, 32};
  if (lanes >= 2 && (lanes & (lanes - 1)) == 0) return {vec, lanes};
  return {1, 32};
}

// Runs Launch<scalar_t, VEC, LPP>::run(args...) for the runtime layout; this lists every instantiation we compile.
template <typename scalar_t, template <typename, int, int> class Launch, typename... Args>
void with_layout(std::pair<int, int> layout, Args&&... args) {
  constexpr int V = 16 / sizeof(scalar_t);
  switch (layout.first == 1 ? 0 : layout.second) {
    case 2: Launch<scalar_t, V, 2>::run(args...); break;
    case 4: Launch<scalar_t, V, 4>::run(args...); break;
    case 8: Launch<scalar_t, V, 8>::run(args...); break;
    case 16: Launch<scalar_t, V, 16>::run(args...); break;
    case 32: Launch<scalar_t, V, 32>::run(args...); break;
    default: Launch<scalar_t, 1, 32>::run(args...); break;
  }
}

// The grid for N * Lq * M (n, q, m) tasks when each block takes `rounds` rounds of kWarpsPerBlock queries.
dim3 grid(int64_t N, int64_t Lq, int64_t M, int rounds) {
  const int64_t per_block = kWarpsPerBlock * rounds;
  return dim3(static_cast<unsigned>((Lq + per_block - 1) / per_block),
              static_cast<unsigned>(std::min<int64_t>(N * M, 65535)));
}

template <typename scalar_t, int VEC, int LPP>
struct Forward {
  static void run(const at::Tensor& value, const at::Tensor& shapes, const at::Tensor& starts, const at::Tensor& loc,
                  const at::Tensor& attn, at::Tensor& out) {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t N = value.size(0), S = value.size(1), M = value.size(2), D = value.size(3);
    const int64_t Lq = loc.size(1), L = loc.size(3), P = loc.size(4);
    msda_forward_kernel<scalar_t, VEC, LPP>
        <<<grid(N, Lq, M, 1), kWarpsPerBlock * 32, 0, c10::cuda::getCurrentCUDAStream()>>>(
            value.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
            loc.data_ptr<acc_t>(), attn.data_ptr<acc_t>(), out.data_ptr<scalar_t>(), N, S, Lq, M, D, L, P,
            point_divisor(P));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

template <typename scalar_t, int VEC, int LPP>
struct Backward {
  static void run(const at::Tensor& value, const at::Tensor& shapes, const at::Tensor& starts, const at::Tensor& loc,
                  const at::Tensor& attn, const at::Tensor& grad_out, at::Tensor& grad_value, at::Tensor& grad_loc,
                  at::Tensor& grad_attn) {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t N = value.size(0), S = value.size(1), M = value.size(2), D = value.size(3);
    const int64_t Lq = loc.size(1), L = loc.size(3), P = loc.size(4);
    msda_backward_kernel<scalar_t, VEC, LPP>
        <<<grid(N, Lq, M, kBackwardTile), kWarpsPerBlock * 32, 0, c10::cuda::getCurrentCUDAStream()>>>(
            value.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
            loc.data_ptr<acc_t>(), attn.data_ptr<acc_t>(), grad_out.data_ptr<scalar_t>(),
            grad_value.data_ptr<acc_t>(), grad_loc.data_ptr<acc_t>(), grad_attn.data_ptr<acc_t>(),
            N, S, Lq, M, D, L, P, point_divisor(P));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace

// The shape and dtype checks live in msda.cpp; these assume contiguous CUDA tensors on one device, locations and
// weights in fp32 (fp64 when value is double).
at::Tensor msda_forward_cuda(const at::Tensor& value, const at::Tensor& shapes, const at::Tensor& starts,
                             const at::Tensor& loc, const at::Tensor& attn) {
  const c10::cuda::CUDAGuard guard(value.device());
  const int64_t N = value.size(0), M = value.size(2), D = value.size(3), Lq = loc.size(1);
  auto out = at::empty({N, Lq, M * D}, value.options());  // every element is written
  if (N * Lq * M == 0) return out;
  if (loc.size(3) * loc.size(4) == 0) return out.zero_();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, value.scalar_type(),
                                  "msda_forward_cuda", [&] {
    with_layout<scalar_t, Forward>(choose_layout<scalar_t>(D, {value.data_ptr(), out.data_ptr()}),
                                   value, shapes, starts, loc, attn, out);
  });
  return out;
}

std::vector<at::Tensor> msda_backward_cuda(const at::Tensor& value, const at::Tensor& shapes,
                                           const at::Tensor& starts, const at::Tensor& loc,
                                           const at::Tensor& attn, const at::Tensor& grad_out) {
  const c10::cuda::CUDAGuard guard(value.device());
  const int64_t N = value.size(0), M = value.size(2), D = value.size(3), Lq = loc.size(1);
  // grad_value gathers many atomic contributions per element: accumulate in fp32 (fp64 for double), cast at the end.
  const auto acc_dtype = value.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto grad_value = at::zeros(value.sizes(), value.options().dtype(acc_dtype));
  auto grad_loc = at::empty(loc.sizes(), loc.options());  // every point is written by the warp that owns it
  auto grad_attn = at::empty(attn.sizes(), attn.options());
  if (N * Lq * M > 0 && loc.size(3) * loc.size(4) > 0) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, value.scalar_type(),
                                    "msda_backward_cuda", [&] {
      with_layout<scalar_t, Backward>(choose_layout<scalar_t>(D, {value.data_ptr(), grad_out.data_ptr()}),
                                      value, shapes, starts, loc, attn, grad_out, grad_value, grad_loc, grad_attn);
    });
  }
  return {grad_value.to(value.scalar_type()), grad_loc, grad_attn};
}
