"""
Benchmarks that print a table (not tests). On a GPU:

    python bench.py msda [--orig_src DIR]   deformable-attention op: forward, forward+backward and peak memory at
                                            DINO's encoder and decoder shapes (batch 2 at 800x1333). DIR: a copy of
                                            fundamentalvision/Deformable-DETR models/ops patched to compile on the
                                            current torch, built here for the side-by-side row (never part of richsem)
"""
import argparse
import glob
import os

import torch

import msda

# DINO-4scale at 800x1333: strides 8, 16, 32, 64
LEVELS = ((100, 167), (50, 84), (25, 42), (13, 21))


def cuda_time(fn, warmup=5, reps=30):
    """Median milliseconds of fn() over reps, with CUDA events; and the peak memory above the start, in MiB."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return sorted(times)[len(times) // 2], peak


def msda_problem(Lq, N=2, M=8, D=32, P=4, seed=0):
    """Realistic inputs: each query samples around its own position (as in the encoder), offsets of a few pixels."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    shapes = torch.tensor(LEVELS, device="cuda")
    starts = torch.cat([shapes.new_zeros(1), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]])
    S = int((shapes[:, 0] * shapes[:, 1]).sum())
    L = len(LEVELS)
    value = torch.randn(N, S, M, D, device="cuda", generator=g)
    ref = torch.rand(N, Lq, 1, 1, 1, 2, device="cuda", generator=g)
    wh = shapes.flip(-1).view(1, 1, 1, L, 1, 2).float()
    loc = ref + torch.randn(N, Lq, M, L, P, 2, device="cuda", generator=g) * 2 / wh
    attn = torch.randn(N, Lq, M, L * P, device="cuda", generator=g).softmax(-1).view(N, Lq, M, L, P)
    return value, shapes, starts, loc, attn


def build_original(src):
    """The original Deformable-DETR op (fp32 only), compiled from a patched copy outside this repository."""
    from torch.utils.cpp_extension import load
    srcs = [os.path.join(src, "src", "vision.cpp")] + glob.glob(os.path.join(src, "src", "*", "*.cpp")) \
        + glob.glob(os.path.join(src, "src", "cuda", "*.cu"))
    ext = load(name="ddetr_msda_original", sources=srcs, extra_include_paths=[os.path.join(src, "src")],
               extra_cflags=["-O3", "-DWITH_CUDA"], extra_cuda_cflags=["-O3"])

    class Original(torch.autograd.Function):
        @staticmethod
        def forward(ctx, value, shapes, starts, loc, attn):
            ctx.save_for_backward(value, shapes, starts, loc, attn)
            return ext.ms_deform_attn_forward(value, shapes, starts, loc, attn, 64)

        @staticmethod
        def backward(ctx, grad):
            value, shapes, starts, loc, attn = ctx.saved_tensors
            gv, gl, ga = ext.ms_deform_attn_backward(value, shapes, starts, loc, attn, grad.contiguous(), 64)
            return gv, None, None, gl, ga

    return Original.apply


def bench_msda(args):
    impls = [("PyTorch reference (grid_sample)", msda.ms_deform_attn_reference, torch.float32),
             ("richsem op fp32", msda.ms_deform_attn, torch.float32),
             ("richsem op bf16", msda.ms_deform_attn, torch.bfloat16)]
    if args.orig_src:
        impls.append(("original Deformable-DETR op fp32", build_original(args.orig_src), torch.float32))
    assert msda.load_op() is not None, msda._op_failed
    rows = []
    for shape_name, Lq in (("encoder", sum(h * w for h, w in LEVELS)), ("decoder", 1100)):
        value, shapes, starts, loc, attn = msda_problem(Lq)
        expect = msda.ms_deform_attn_reference(value.double(), shapes, starts, loc.double(), attn.double())
        for name, fn, dtype in impls:
            v = value.to(dtype).requires_grad_()
            lc, at = loc.clone().requires_grad_(), attn.clone().requires_grad_()
            out = fn(v, shapes, starts, lc, at)
            err = ((out.double() - expect).norm() / expect.norm()).item()
            grad = torch.randn_like(out)

            def fwd():
                with torch.no_grad():
                    fn(v, shapes, starts, lc, at)

            def fwd_bwd():
                v.grad = lc.grad = at.grad = None
                fn(v, shapes, starts, lc, at).backward(grad)

            t_f, _ = cuda_time(fwd)
            t_fb, peak = cuda_time(fwd_bwd)
            rows.append((shape_name, name, t_f, t_fb, peak, err))
            del out, v, lc, at, grad
            torch.cuda.empty_cache()
    print(f"\nMSDA at DINO shapes, N=2, S=22,223 (4 levels), M=8, D=32, L=4, P=4 on {torch.cuda.get_device_name()}")
    print(f"| shape | implementation | forward ms | fwd+bwd ms | peak MiB | rel. error vs fp64 |")
    print(f"|---|---|---|---|---|---|")
    for shape_name, name, t_f, t_fb, peak, err in rows:
        print(f"| {shape_name} | {name} | {t_f:.3f} | {t_fb:.3f} | {peak:.0f} | {err:.1e} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["msda"])
    parser.add_argument("--orig_src", default=None, help="patched copy of Deformable-DETR's models/ops to compare")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    {"msda": bench_msda}[args.what](args)
