"""
Benchmarks that print a table (not tests). On a GPU:

python bench.py msda [--orig_src DIR]
    The deformable-attention op: forward, forward+backward (one call, and ten back to back) and peak memory at DINO's
    encoder and decoder shapes (batch 2 at 800x1333). DIR: fundamentalvision/Deformable-DETR's models/ops patched to
    compile, side by side.
python bench.py step [--official DIR] [--rows official bf16 teacher eager fp32]
    A full training step on a synthetic batch (2 images of 800x1333, 12 GT each, or 150 + 12): ours is train.train_step
    itself, compiled as train.py does, in bf16, bf16 with the CLIP RN50 teacher and the semantic branch, bf16 without
    compiling, and fp32. Each implementation warms up on both cases and on a batch of another image size before it is
    timed, so compiled graphs are the dynamic-shape ones that training runs on; then all rows are timed in interleaved
    rounds (--rounds), so that a drifting host speed does not favour one row. DIR: IDEA-Research/DINO, its op
    patched to compile, stepped as its engine.py does (fp32 and --amp) in this process. Neither DIR is part of richsem.
python bench.py step --profile [--teacher]
    torch.profiler over bf16 steps of ours: the top GPU ops, and the step split into its parts (GPU kernels launched
    in each part, GPU idle time while the CPU was in it).
python bench.py eval
    Inference images/s (evaluate.predict: batch 1 at 800x1333, bf16, top 300) and LVISEval seconds
    (evaluate.lvis_evaluate) on a generated LVIS-format val set of 5,000 images with 300 detections each.

CPU smoke runs, numbers meaningless: add --device cpu --image_size 256 320 --warmup 1 --steps 2 (step), or
--device cpu --image_size 256 320 --infer_images 2 --eval_images 200 (eval).
"""
import argparse
import gc
import glob
import json
import math
import os
import sys
import tempfile
import time
import types

import numpy as np
import torch

import msda
from model import encoder_reference_points

# DINO-4scale at 800x1333: strides 8, 16, 32, 64
LEVELS = ((100, 167), (50, 84), (25, 42), (13, 21))


def time_steps(step, warmup, steps, device):
    """step() warmup times, then steps times timed (CUDA events on the GPU) -> (median ms, peak allocated GiB over
    the timed steps, GiB allocated before them); the memory is None on the CPU."""
    step_times(step, warmup, 0, device)
    cuda, base = device.type == 'cuda', None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**30
    times = step_times(step, 0, steps, device)
    return float(np.median(times)), torch.cuda.max_memory_allocated() / 2**30 if cuda else None, base


def step_times(step, warmup, steps, device):
    """step() warmup times, then steps times timed -> list of ms (CUDA events on the GPU, wall clock on the CPU)"""
    for _ in range(warmup):
        step()
    times, cuda = [], device.type == 'cuda'
    for _ in range(steps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


# ----------------------------------------------------------------------------------------------------------------
# msda: the op alone

def msda_problem(Lq, N=2, M=8, D=32, P=4, seed=0):
    """Realistic inputs: each query samples a few pixels around its reference point. With Lq = S (the encoder) query
    s's reference is token s's own pixel centre, as in DINO, so neighbouring queries sample neighbouring pixels (which
    sets how often the backward's atomics collide); otherwise (decoder queries: boxes) references are random."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    shapes = torch.tensor(LEVELS, device="cuda")
    starts = torch.cat([shapes.new_zeros(1), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]])
    S = int((shapes[:, 0] * shapes[:, 1]).sum())
    L = len(LEVELS)
    value = torch.randn(N, S, M, D, device="cuda", generator=g)
    if Lq == S:
        ref = encoder_reference_points(LEVELS, torch.ones(N, L, 2, device="cuda"))[:, :, None, :, None]
    else:
        ref = torch.rand(N, Lq, 1, 1, 1, 2, device="cuda", generator=g)
    wh = shapes.flip(-1).view(1, 1, 1, L, 1, 2).float()
    loc = ref + torch.randn(N, Lq, M, L, P, 2, device="cuda", generator=g) * 2 / wh
    attn = torch.randn(N, Lq, M, L * P, device="cuda", generator=g).softmax(-1).view(N, Lq, M, L, P)
    return value, shapes, starts, loc, attn


def load_original_ext(src):
    """The original Deformable-DETR op (fp32 only; DINO carries the same sources in models/dino/ops), compiled from
    a copy patched to compile (README.md's op section gives the patch) outside this repository. returns the extension
    module."""
    import torch.utils.cpp_extension as cpp_extension
    if msda._find_cuda_home():  # as msda.load_op: torch's own guess fails where nvcc is a wrapper script
        os.environ["CUDA_HOME"] = cpp_extension.CUDA_HOME = msda._find_cuda_home()
    srcs = [os.path.join(src, "src", "vision.cpp")] + glob.glob(os.path.join(src, "src", "*", "*.cpp")) \
        + glob.glob(os.path.join(src, "src", "cuda", "*.cu"))
    return cpp_extension.load(name="ddetr_msda_original", sources=srcs, extra_include_paths=[os.path.join(src, "src")],
                                  extra_cflags=["-O3", "-DWITH_CUDA"], extra_cuda_cflags=["-O3"])


def build_original(src):
    """The original op as a function with msda.ms_deform_attn's arguments."""
    ext = load_original_ext(src)

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
    torch.backends.cuda.matmul.allow_tf32 = False
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

            cuda = torch.device("cuda")
            t_f = time_steps(fwd, 5, 30, cuda)[0]
            t_fb, peak, base = time_steps(fwd_bwd, 5, 30, cuda)
            t_fb10 = time_steps(lambda: [fwd_bwd() for _ in range(10)], 1, 10, cuda)[0] / 10
            rows.append((shape_name, name, t_f, t_fb, t_fb10, (peak - base) * 1024, err))
            del out  # the closures' tensors are freed when the next implementation rebinds them
            torch.cuda.empty_cache()
    print(f"\nMSDA at DINO shapes, N=2, S=22,223 (4 levels), M=8, D=32, L=4, P=4 on {torch.cuda.get_device_name()}")
    print("fwd+bwd: one call from an idle GPU (host time to the first launch included); back to back: 10 in a row")
    print("| shape | implementation | forward ms | fwd+bwd ms | fwd+bwd back to back | peak MiB | rel. error vs fp64 |")
    print("|---|---|---|---|---|---|---|")
    for shape_name, name, t_f, t_fb, t_fb10, peak, err in rows:
        print(f"| {shape_name} | {name} | {t_f:.3f} | {t_fb:.3f} | {t_fb10:.3f} | {peak:.0f} | {err:.1e} |")


# ----------------------------------------------------------------------------------------------------------------
# step: a full training step, ours (train.train_step) and the official DINO's (the body of its train_one_epoch)

def synthetic_batch(image_size, gt_counts, num_classes, seed=0):
    """len(gt_counts) normalised images (3, h, w) with boxes (n, 4) cxcywh of 2-40% of the image side and labels (n,)
    in [0, num_classes - 1) (the official code's ids are these + 1), on the CPU, seeded."""
    g, batch = torch.Generator().manual_seed(seed), []
    for n in gt_counts:
        wh = 0.02 + 0.38 * torch.rand(n, 2, generator=g)
        boxes = torch.cat([wh / 2 + (1 - wh) * torch.rand(n, 2, generator=g), wh], 1)
        batch.append((torch.randn(3, *image_size, generator=g), boxes,
                      torch.randint(0, num_classes - 1, (n,), generator=g)))
    return batch


def resized_batch(args):
    """A 12+12 GT batch of (H-64)x(W-64): warming up on it too recompiles compiled blocks with shapes dynamic in image
    size, the graphs that training (a new size nearly every batch) runs on."""
    return synthetic_batch([s - 64 for s in args.image_size], (12, 12), args.num_classes, seed=1)


def ours_setup(args, device, teacher, compile=True):
    """
    Model, criterion and optimizer as train.py builds them from its defaults (R50, 900 queries, 100 DN queries,
    AdamW, clip 0.1, compiled blocks on the GPU unless compile=False), with random weights and num_classes random text
    embeddings; teacher: with the CLIP RN50 teacher (random weights), the semantic branch and its soft loss.
    returns (model, criterion, make_step), where make_step(batch, amp) gives a closure running one train.train_step
    on that batch. A compiled model compiles at its first step (5-6 min on a fresh H100 host) and first new shapes.
    """
    import data
    import train
    from clip_teacher import ClipTeacher
    from losses import SetCriterion
    targs = train.get_args(['--backbone_weights', 'none', '--lambda_soft', '0.5' if teacher else '0',
                            '--device', device.type, '--compile' if compile else '--no-compile'])
    torch.manual_seed(targs.seed)
    clip = ClipTeacher(targs.clip_model, pretrained=None).to(device) if teacher else None
    text_embed = torch.randn(args.num_classes, 1024)  # CLIP RN50's embedding width
    model = train.build_model(targs, text_embed).to(device).train()
    counts = torch.randint(1, 1000, (args.num_classes,), generator=torch.Generator().manual_seed(0))
    criterion = SetCriterion(args.num_classes, counts.float() ** 0.5, lambda_soft=targs.lambda_soft).to(device)
    optimizer, params = train.build_optimizer(targs, model, device)
    if targs.compile and device.type == 'cuda':  # as train.py
        train.compile_blocks(device, model, criterion, clip)
    text_embed = text_embed.to(device)

    def make_step(batch, amp):
        images, mask, targets = data.collate([(img, {'boxes': b, 'labels': l, 'size': torch.tensor(img.shape[1:])})
                                              for img, b, l in batch])  # 'size': the teacher scales boxes by it
        images, mask = images.to(device), mask.to(device)  # padded to multiples of 32, as train.py's loader does
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        return lambda: train.train_step(model, criterion, optimizer, params, images, mask,
                                        [dict(t) for t in targets],  # fresh dicts: the teacher adds its logits
                                        amp, targs.clip_max_norm, clip, text_embed)

    return model, criterion, make_step


def official_setup(dino_dir, device, num_classes):
    """
    The official DINO-4scale R50 (IDEA-Research/DINO) as its main.py builds it, without its SLConfig (which needs
    addict and yapf): config/DINO/coco_transformer.py, then DINO_4scale.py, run as Python; main.py's argument defaults
    that the builders read; RichSem's LVIS settings (num_classes = dn_labelbook_size = 1204, dn_box_noise_scale 1.0,
    as in its configs and DINO's launch script); random backbone weights, no download. Its op is compiled from
    models/dino/ops, patched to compile (a CPU smoke run puts a stand-in into sys.modules first).
    returns (model, criterion, make_step), make_step(batch, amp) a closure running one iteration of its engine.py
    train_one_epoch (one GPU: reduce_dict is the identity; amp: fp16 autocast and GradScaler as its --amp).
    """
    import torchvision
    dino_dir = os.path.abspath(dino_dir)
    sys.path.insert(0, dino_dir)
    ops = os.path.join(dino_dir, 'models', 'dino', 'ops')
    if 'MultiScaleDeformableAttention' not in sys.modules:
        with open(os.path.join(ops, 'src', 'ms_deform_attn.h')) as f:
            if '.type().is_cuda()' in f.read():
                raise RuntimeError(f'{ops} is not patched to compile on this torch: README.md (op section) '
                                   'gives the patch')
        sys.modules['MultiScaleDeformableAttention'] = load_original_ext(ops)
    cfg = {}
    for name in ('coco_transformer.py', 'DINO_4scale.py'):  # the _base_ first, then the file that overrides it
        path = os.path.join(dino_dir, 'config', 'DINO', name)
        with open(path) as f:
            exec(compile(f.read(), path, 'exec'), cfg)
    cargs = argparse.Namespace(**{k: v for k, v in cfg.items() if not k.startswith('_')})
    cargs.dataset_file, cargs.device, cargs.seed = 'coco', device.type, 42  # main.py's defaults
    cargs.num_classes = cargs.dn_labelbook_size = num_classes
    cargs.dn_box_noise_scale = 1.0

    from models.dino import build_dino
    from util.get_param_dicts import get_param_dict
    from util.misc import nested_tensor_from_tensor_list
    torch.manual_seed(cargs.seed)
    resnet50 = torchvision.models.resnet50  # its backbone asks for ImageNet weights: pretrained=is_main_process()
    torchvision.models.resnet50 = lambda pretrained=False, **kw: resnet50(weights=None, **kw)
    try:
        model, criterion, _ = build_dino(cargs)
    finally:
        torchvision.models.resnet50 = resnet50
    model.to(device).train()
    criterion.train()
    optimizer = torch.optim.AdamW(get_param_dict(cargs, model), lr=cargs.lr, weight_decay=cargs.weight_decay)
    weight_dict = criterion.weight_dict

    def make_step(batch, amp):
        samples = nested_tensor_from_tensor_list([img.to(device) for img, _, _ in batch])
        targets = [{'labels': (l + 1).to(device), 'boxes': b.to(device)} for _, b, l in batch]
        scaler = torch.amp.GradScaler('cuda', enabled=amp)

        def step():
            with torch.autocast('cuda', enabled=amp):  # = its torch.cuda.amp.autocast(enabled=args.amp)
                outputs = model(samples, targets)
                loss_dict = criterion(outputs, targets)
                losses = sum(loss_dict[k] * weight_dict[k] for k in loss_dict.keys() if k in weight_dict)
            loss_value = sum(v * weight_dict[k] for k, v in loss_dict.items() if k in weight_dict).item()
            if not math.isfinite(loss_value):
                raise SystemExit(f'official DINO: loss is {loss_value}')
            optimizer.zero_grad()
            scaler.scale(losses).backward()  # the identity when not amp
            if amp:
                scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cargs.clip_max_norm)
            scaler.step(optimizer)  # optimizer.step() when not amp
            scaler.update()
        step.scaler = scaler
        return step

    return model, criterion, make_step


def free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


OFFICIAL, OFFICIAL_AMP, BF16, TEACHER = ('official DINO fp32', 'official DINO --amp (fp16)', 'ours bf16',
                                         'ours bf16 + CLIP RN50 teacher + semantic branch')
EAGER = 'ours bf16, --no-compile'
# the official DINO's fp32 step on the H100 as issue 7 measured it: a third of it is the target without official rows
ISSUE_OFFICIAL_FP32_MS = {'12+12 GT': 258, '150+12 GT': 314}
ROWS = ['official', 'bf16', 'teacher', 'eager', 'fp32']


def bench_step(args):
    device = torch.device(args.device)
    cases = {'12+12 GT': (12, 12), '150+12 GT': (150, 12)}
    batches = {case: synthetic_batch(args.image_size, counts, args.num_classes) for case, counts in cases.items()}
    resized = resized_batch(args)
    # (--rows key, name, kind, amp, teacher, compile); official fp32 and --amp share one model, as do ours bf16 and fp32
    impls = [('official', OFFICIAL, 'official', False, None, False),
             ('official', OFFICIAL_AMP, 'official', True, None, False),
             ('bf16', BF16, 'ours', True, False, True), ('teacher', TEACHER, 'ours', True, True, True),
             ('eager', EAGER, 'ours', True, False, False), ('fp32', 'ours fp32', 'ours', False, False, True)]
    if 'official' in args.rows and not args.official:
        print("note: --rows official needs --official DIR (the official DINO checkout); its rows are left out")
    impls = [i[1:] for i in impls if i[0] in args.rows and (i[2] == 'ours' or args.official)]
    cuda = device.type == 'cuda'
    steps, peaks, notes, models = {}, {}, [], {}
    # 1. Build every model (it stays on the GPU), warm each row up and take its peak memory. Warming up on both cases
    #    and on a batch of another image size makes a compiled model run the graphs that training runs on, dynamic in
    #    image size and GT count, not the static ones of its first batch, which are faster (H100: 86-95 vs 75-87 ms).
    #    A row's peak is counted from what was allocated before its model was built: its model, optimizer state,
    #    batches and activations (a second row of one model also counts the first row's batches, ~0.05 GiB).
    for name, kind, amp, teacher, compile in impls:
        amp = amp and cuda  # as train.py: autocast on the GPU only
        t0, warms = time.perf_counter(), []  # seconds of each shape's warm-up: where a compiled model compiles
        try:
            if (kind, teacher, compile) not in models:
                free_memory()
                before = torch.cuda.memory_allocated() / 2**30 if cuda else None
                models[kind, teacher, compile] = before, ours_setup(args, device, teacher, compile)[2] \
                    if kind == 'ours' else official_setup(args.official, device, args.num_classes)[2]
            before, make_step = models[kind, teacher, compile]
            row = {case: make_step(batch, amp) for case, batch in batches.items()}
            for step in (*row.values(), make_step(resized, amp)):
                t1 = time.perf_counter()
                step_times(step, args.warmup, 0, device)
                warms.append(time.perf_counter() - t1)
            for case, step in row.items():
                peak = time_steps(step, 0, 1, device)[1]
                peaks[case, name] = None if peak is None else peak - before
                steps[case, name] = step
            print(f'{name}: built and warmed up in {time.perf_counter() - t0:.0f} s (warm-up per shape: '
                  f'{", ".join(f"{t:.0f}" for t in warms)} s)', flush=True)
        except Exception as e:  # one implementation failing must not cost the others' rows
            import traceback
            traceback.print_exc()
            notes.append(f'{name} failed: {type(e).__name__}: {str(e)[:300]}')
        except KeyboardInterrupt:  # Ctrl-C, or `timeout -s INT`: time the rows built so far
            done = ", ".join(f"{t:.0f}" for t in warms) or "-"
            notes.append(f'interrupted while building {name} after {time.perf_counter() - t0:.0f} s (warm-up per '
                         f'shape: {done} s): it and the rows after it are missing')
            break
    # 2. Time the rows in rounds, a few steps each per round after one untimed step. The step is bound by the host
    #    CPU launching kernels, and the host's speed drifts over minutes (on the H100 one commit's bf16 step took 68 and
    #    84 ms in two calls): rows timed one after another would compare different hosts, rows interleaved do not.
    times = {key: [] for key in steps}
    scales = {key: step.scaler.get_scale() for key, step in steps.items() if hasattr(step, 'scaler')}
    try:
        for r in range(args.rounds):
            for key, step in steps.items():
                n = args.steps // args.rounds + (r < args.steps % args.rounds)
                times[key] += step_times(step, 1, n, device)
    except KeyboardInterrupt:  # print what was timed
        notes.append('interrupted while timing: fewer timed steps than --steps')
    rows = {key: (float(np.median(t)), peaks[key]) for key, t in times.items() if t}
    for (case, name), scale in scales.items():
        if steps[case, name].scaler.get_scale() != scale:
            notes.append(f'{name}, {case}: loss scale {scale:g} -> {steps[case, name].scaler.get_scale():g} in the '
                         f'timed steps (each halving is a step skipped by GradScaler)')

    where = (torch.cuda.get_device_name() if device.type == 'cuda'
             else 'CPU (smoke run: no autocast, numbers meaningless)')
    print(f'\nTraining step, batch 2 at {args.image_size[0]}x{args.image_size[1]} (ours padded to multiples of 32), '
          f'R50 4-scale, 900 queries, 100 DN queries, {args.num_classes}-class head, random weights; median of '
          f'{args.steps} steps after {args.warmup} warm-up steps on each case and on a batch of '
          f'{args.image_size[0] - 64}x{args.image_size[1] - 64}, the rows interleaved in {args.rounds} rounds; '
          f'{where}, torch {torch.__version__}')
    print('| case | implementation | ms/step | images/s | peak GiB | speed-up vs official fp32 |\n'
          '|---|---|---|---|---|---|')
    for case in cases:
        base = rows.get((case, OFFICIAL))
        for name, *_ in impls:
            if (case, name) in rows:
                ms, peak = rows[case, name]
                print(f'| {case} | {name} | {ms:.1f} | {2000 / ms:.2f} | {"-" if peak is None else f"{peak:.2f}"} | '
                      f'{f"{base[0] / ms:.2f}x" if base else "-"} |')
    for note in notes:
        print(f'note: {note}')
    for case in cases:  # the issue's targets
        r = {name: (ms, math.nan if peak is None else peak) for (c, name), (ms, peak) in rows.items() if c == case}
        ours, official, amp, teacher = (r.get(k, (math.nan, math.nan)) for k in (BF16, OFFICIAL, OFFICIAL_AMP, TEACHER))
        goal = ISSUE_OFFICIAL_FP32_MS[case] / 3
        for text, value, ok in ((f'ours bf16 ms/step <= {goal:.0f}', ours[0], ours[0] <= goal),
                                ('ours bf16 >= 3x official fp32', official[0] / ours[0], official[0] >= 3 * ours[0]),
                                ('ours bf16 >= 2.5x official --amp', amp[0] / ours[0], amp[0] >= 2.5 * ours[0]),
                                ('peak of ours bf16 <= 0.7x official fp32', ours[1] / official[1],
                                 ours[1] <= 0.7 * official[1]),
                                ('teacher + semantic branch add <= 25% (%)', 100 * (teacher[0] / ours[0] - 1),
                                 teacher[0] <= 1.25 * ours[0])):
            if not math.isnan(value):
                print(f'target, {case}: {text}: {value:.2f} {"met" if ok else "MISSED"}')


# ---- profile

REGIONS = {  # record_function name -> label; train.train_step names its parts, bench adds the model's and matcher's
    'teacher': 'teacher (CLIP RN50 box logits)', 'forward': 'forward: DN queries, heads, rest',
    'backbone': 'forward: backbone + input projections', 'encoder': 'forward: encoder',
    'query_selection': 'forward: two-stage query selection', 'decoder': 'forward: decoder',
    'losses': 'losses (without matching)', 'matching': 'matching (cost matrices, CPU Hungarian)',
    'backward': 'backward', 'clip_and_check': 'grad clipping + finiteness check (host sync)',
    'optimizer': 'optimizer (fused AdamW)',
}


def labelled(name, fn):
    """fn inside a record_function region called name."""
    def wrapped(*a, **kw):
        with torch.profiler.record_function(name):
            return fn(*a, **kw)
    return wrapped


def step_breakdown(events, step_name='bench_step'):
    """
    Where a step's wall time goes, from a torch.profiler chrome trace: every GPU kernel (memcpy, memset) counts in the
    innermost REGIONS region whose CPU interval holds its launch; every stretch of the step with no GPU work counts as
    idle in the innermost region the CPU was in then. Together they add up to the step's wall time.
    events: the trace's 'traceEvents' -> (steps, wall us, {label: [kernel us, idle us]}), totals over the steps.
    """
    spans = lambda names: sorted((e['ts'], e['ts'] + e['dur'], e['name']) for e in events
                                 if e.get('ph') == 'X' and e.get('cat') == 'user_annotation' and e['name'] in names)
    steps, regions = spans({step_name}), spans(set(REGIONS))
    launch = {e['args']['correlation']: e['ts'] for e in events if e.get('cat') in ('cuda_runtime', 'cuda_driver')
              and 'correlation' in e.get('args', {})}
    gpu = sorted((e['ts'], e['ts'] + e['dur'], launch.get(e.get('args', {}).get('correlation'))) for e in events
                 if e.get('ph') == 'X' and e.get('cat') in ('kernel', 'gpu_memcpy', 'gpu_memset'))

    def innermost(t, within):
        inside = [r for r in regions if r[0] <= t < r[1] and within[0] <= r[0] < within[1]]
        return REGIONS[min(inside, key=lambda r: r[1] - r[0])[2]] if inside else 'outside the regions'

    table, wall = {}, 0.0
    for s0, s1, _ in steps:
        wall += s1 - s0
        busy = []  # merged GPU intervals inside the step
        for g0, g1, t in gpu:
            if t is None or not s0 <= t < s1:
                continue
            table.setdefault(innermost(t, (s0, s1)), [0.0, 0.0])[0] += g1 - g0
            g0, g1 = max(g0, s0), min(g1, s1)
            if busy and g0 <= busy[-1][1]:
                busy[-1][1] = max(busy[-1][1], g1)
            elif g1 > g0:
                busy.append([g0, g1])
        # idle stretches, split at region boundaries so that each piece lies in one innermost region
        cuts = sorted({s0, s1, *(x for r in regions if s0 <= r[0] < s1 for x in r[:2] if s0 <= x <= s1)})
        gaps, t = [], s0
        for b0, b1 in busy:
            if b0 > t:
                gaps.append((t, b0))
            t = max(t, b1)
        if t < s1:
            gaps.append((t, s1))
        for g0, g1 in gaps:
            points = [g0] + [c for c in cuts if g0 < c < g1] + [g1]
            for a, b in zip(points[:-1], points[1:]):
                table.setdefault(innermost((a + b) / 2, (s0, s1)), [0.0, 0.0])[1] += b - a
    return len(steps), wall, table


def bench_profile(args):
    from torch.profiler import ProfilerActivity, profile, record_function, schedule
    device = torch.device(args.device)
    model, criterion, make_step = ours_setup(args, device, args.teacher)
    for method, region in (('multiscale_features', 'backbone'), ('encode', 'encoder'),
                           ('select_queries', 'query_selection'), ('decode', 'decoder')):
        setattr(model, method, labelled(region, getattr(model, method)))
    criterion.matcher.forward = labelled('matching', criterion.matcher.forward)
    amp = device.type == 'cuda'
    step = make_step(synthetic_batch(args.image_size, (12, 12), args.num_classes), amp)
    resized = make_step(resized_batch(args), amp)
    for warm in (step, resized):  # as bench step: profile the dynamic-shape graphs that training runs on
        for _ in range(args.warmup):
            warm()
    ms = time_steps(step, 0, args.steps, device)[0]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    active = 3
    with profile(activities=activities, schedule=schedule(wait=1, warmup=1, active=active)) as prof:
        for _ in range(2 + active):
            with record_function('bench_step'):
                step()
                if device.type == 'cuda':
                    torch.cuda.synchronize()
            prof.step()
    what = 'ours bf16' + (' + CLIP RN50 teacher + semantic branch' if args.teacher else '')
    key = 'self_cuda_time_total' if device.type == 'cuda' else 'self_cpu_time_total'  # 'cuda' reads 'device' now
    print(f'\nProfile of {active} steps of {what}, 12+12 GT (unprofiled median {ms:.1f} ms/step)\n')
    print(prof.key_averages().table(sort_by=key, row_limit=30))
    trace = args.trace or os.path.join(tempfile.mkdtemp(), 'trace.json')
    prof.export_chrome_trace(trace)
    with open(trace) as f:
        events = json.load(f)['traceEvents']
    n, wall, table = step_breakdown(events)
    print(f'Step time by part, per step (profiled: {wall / n / 1e3:.1f} ms/step): GPU kernels launched in the part, '
          f'and time without GPU work while the CPU was in it')
    print('| part | GPU kernels ms | GPU idle ms | total ms | % of step |')
    print('|---|---|---|---|---|')
    for label, (k, idle) in sorted(table.items(), key=lambda kv: -sum(kv[1])):
        print(f'| {label} | {k / n / 1e3:.2f} | {idle / n / 1e3:.2f} | {(k + idle) / n / 1e3:.2f} | '
              f'{100 * (k + idle) / wall:.1f} |')
    kernels, idle = (sum(v[i] for v in table.values()) for i in (0, 1))
    named = sum(sum(v) for label, v in table.items() if label != 'outside the regions')
    print(f'| all | {kernels / n / 1e3:.2f} | {idle / n / 1e3:.2f} | {(kernels + idle) / n / 1e3:.2f} | '
          f'{100 * (kernels + idle) / wall:.1f} |')
    print(f'named parts account for {100 * named / wall:.1f}% of the step; the GPU is idle {100 * idle / wall:.1f}% '
          f'of it (kernel times can overlap, so the total may exceed 100% slightly)')
    if device.type == 'cuda' and kernels == 0:
        print('WARNING: no GPU kernel was matched to its launch (trace format?): the idle column is wrong')


# ----------------------------------------------------------------------------------------------------------------
# eval: inference speed and LVISEval time

class SyntheticEvalLoader:
    """What evaluate.predict reads from data.eval_loader: n batches of one image (3, h, w) padded to multiples of 32,
    its mask and target ('orig_size', 'image_id'); .dataset.cat_ids maps classes to category ids."""

    def __init__(self, n, image_size, num_classes):
        import data
        h, w = image_size
        self.n, self.dataset = n, types.SimpleNamespace(cat_ids=list(range(1, num_classes + 1)))
        image = torch.randn(3, h, w, generator=torch.Generator().manual_seed(0))
        self.images, self.mask, _ = data.collate([(image, {})])
        if torch.cuda.is_available():  # as eval_loader's pin_memory
            self.images, self.mask = self.images.pin_memory(), self.mask.pin_memory()
        self.orig_size = torch.tensor([480, 640])

    def __iter__(self):
        for i in range(self.n):
            yield self.images, self.mask, [{'orig_size': self.orig_size, 'image_id': i}]


def synthetic_lvis(num_images, dets_per_image, seed=0):
    """
    A generated LVIS v1-format val set and a result set for it: 1203 categories (405 f, 461 c, 337 r, rarer classes
    in fewer images), ~10 boxes per image of ~3 classes, 8 verified-absent classes per image (neg_category_ids), a
    tenth of the present ones not exhaustively annotated. Results: dets_per_image per image, two jittered copies of
    each GT box, the rest random boxes, half of them of classes evaluated in that image (present or verified absent).
    returns (gt dict, results list as evaluate.predict writes them).
    """
    rng = np.random.default_rng(seed)
    C = 1203
    freq = np.array(['f'] * 405 + ['c'] * 461 + ['r'] * 337)
    rng.shuffle(freq)
    weight = np.select([freq == 'f', freq == 'c'], [1.0, 0.08], 0.01) * rng.lognormal(0, 1, C)
    weight /= weight.sum()
    sizes = np.array([(640, 480), (480, 640), (640, 427), (500, 375)])

    def random_boxes(n, W, H):
        wh = np.exp(rng.uniform(np.log(0.03), np.log(0.6), (n, 2))) * (W, H)
        xy = rng.uniform(0, 1, (n, 2)) * ((W, H) - wh)
        return np.concatenate([xy, wh], 1)

    images, anns, results = [], [], []
    for img_id in range(1, num_images + 1):
        W, H = sizes[rng.integers(len(sizes))]
        n = max(1, rng.poisson(10))
        cats = rng.choice(rng.choice(C, 1 + rng.poisson(2), replace=False, p=weight) + 1, n)
        present = np.unique(cats)
        boxes = random_boxes(n, W, H)
        absent = np.setdiff1d(rng.choice(C, 8 + len(present), replace=False) + 1, present)[:8]
        images.append({'id': img_id, 'width': int(W), 'height': int(H), 'neg_category_ids': absent.tolist(),
                       'not_exhaustive_category_ids': [int(c) for c in present if rng.random() < 0.1]})
        for c, b in zip(cats.tolist(), boxes.round(2).tolist()):
            anns.append({'id': len(anns) + 1, 'image_id': img_id, 'category_id': c, 'bbox': b,
                         'area': b[2] * b[3], 'iscrowd': 0})
        hits = np.repeat(boxes, 2, 0)
        hits[:, :2] += rng.normal(0, 0.05, (len(hits), 2)) * hits[:, 2:]
        k = max(0, dets_per_image - len(hits))  # random detections after the hits, if any room is left
        det_boxes = np.concatenate([hits, random_boxes(k, W, H)])[:dets_per_image]
        evaluated = np.concatenate([present, absent])
        det_cats = np.concatenate([np.repeat(cats, 2), np.where(rng.random(k) < 0.5, rng.choice(evaluated, k),
                                                                rng.integers(1, C + 1, k))])[:dets_per_image]
        scores = np.concatenate([rng.uniform(0.2, 1.0, len(hits)), rng.uniform(0.0, 0.6, k)])[:dets_per_image]
        results += [{'image_id': img_id, 'category_id': c, 'bbox': b, 'score': s} for c, b, s in
                    zip(det_cats.tolist(), det_boxes.round(2).tolist(), scores.round(6).tolist())]
    counts = np.bincount([a['category_id'] for a in anns], minlength=C + 1)
    categories = [{'id': c, 'name': f'class_{c}', 'frequency': str(freq[c - 1]), 'image_count': int(counts[c]),
                   'instance_count': int(counts[c])} for c in range(1, C + 1)]
    return {'images': images, 'annotations': anns, 'categories': categories}, results


def bench_eval(args):
    import evaluate
    import train
    device = torch.device(args.device)
    h, w = args.image_size
    if args.infer_images > 0:
        targs = train.get_args(['--backbone_weights', 'none', '--lambda_soft', '0', '--device', device.type])
        torch.manual_seed(0)
        model = train.build_model(targs, torch.randn(args.num_classes, 1024)).to(device).eval()
        amp = device.type == 'cuda'
        evaluate.predict(model, SyntheticEvalLoader(args.warmup, args.image_size, args.num_classes), device, amp)
        if device.type == 'cuda':
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        results = evaluate.predict(model, SyntheticEvalLoader(args.infer_images, args.image_size, args.num_classes),
                                   device, amp)
        predict_s = time.perf_counter() - t0
        assert len(results) == args.infer_images * evaluate.MAX_DETS

        loader = SyntheticEvalLoader(1, args.image_size, args.num_classes)
        images, mask = loader.images.to(device), loader.mask.to(device)
        sizes = loader.orig_size[None].to(device)

        @torch.inference_mode()
        def forward():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                out = model(images, mask)
            return evaluate.postprocess(out, sizes, evaluate.MAX_DETS)
        forward_ms = time_steps(forward, args.warmup, args.infer_images, device)[0]
        where = torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU (fp32)'
        print(f'\nInference, batch 1 at {h}x{w} (padded to multiples of 32), R50 4-scale, 900 queries, '
              f'{args.num_classes} classes, {"bf16 autocast" if amp else "fp32"}, top {evaluate.MAX_DETS} '
              f'detections; {where}')
        print('| what | ms/image | images/s |')
        print('|---|---|---|')
        print(f'| model + postprocess (input on the {"GPU" if amp else "CPU"}), median of {args.infer_images} | '
              f'{forward_ms:.1f} | {1e3 / forward_ms:.1f} |')
        print(f'| evaluate.predict (host->device copy, model, postprocess, result dicts), {args.infer_images} '
              f'images | {1e3 * predict_s / args.infer_images:.1f} | {args.infer_images / predict_s:.1f} |')
        del model
        free_memory()

    if args.eval_images > 0:
        t0 = time.perf_counter()
        gt, results = synthetic_lvis(args.eval_images, args.dets)
        make_s = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, 'lvis_synthetic_val.json')
            with open(path, 'w') as f:
                json.dump(gt, f)
            t0 = time.perf_counter()
            metrics = evaluate.lvis_evaluate(path, results)
            eval_s = time.perf_counter() - t0
        print(f'\nLVISEval (evaluate.lvis_evaluate: LVIS(json), LVISResults, evaluate, accumulate, summarize) on a '
              f'generated val set; generated in {make_s:.1f} s')
        print('| images | GT boxes | detections | seconds | AP | APr | APc | APf |')
        print('|---|---|---|---|---|---|---|---|')
        print(f'| {args.eval_images} | {len(gt["annotations"])} | {len(results)} | {eval_s:.1f} | ' +
              ' | '.join(f'{100 * metrics[k]:.1f}' for k in ('AP', 'APr', 'APc', 'APf')) + ' |')


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["msda", "step", "eval"])
    parser.add_argument("--orig_src", default=None, help="msda: patched copy of Deformable-DETR's models/ops")
    parser.add_argument("--official", default=None, help="step: IDEA-Research/DINO checkout, its op patched to compile")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=ROWS,
                        help="step: these rows only (each compile takes minutes; 'official' needs --official)")
    parser.add_argument("--profile", action="store_true", help="step: profile ours (bf16) instead of the table")
    parser.add_argument("--teacher", action="store_true", help="step --profile: with the teacher and semantic branch")
    parser.add_argument("--trace", default=None, help="step --profile: keep the chrome trace at this path")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--image_size", type=int, nargs=2, default=[800, 1333], metavar=("H", "W"))
    parser.add_argument("--num_classes", type=int, default=1204, help="width of the class head (official: 1204)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps (or images) first")
    parser.add_argument("--steps", type=int, default=20, help="step: timed steps")
    parser.add_argument("--rounds", type=int, default=4, help="step: the timed steps of every row in this many rounds")
    parser.add_argument("--infer_images", type=int, default=50, help="eval: timed inference images; 0: skip")
    parser.add_argument("--eval_images", type=int, default=5000, help="eval: images of the LVISEval set; 0: skip")
    parser.add_argument("--dets", type=int, default=300, help="eval: detections per image")
    args = parser.parse_args()
    if args.what == "step":
        (bench_profile if args.profile else bench_step)(args)
    else:
        {"msda": bench_msda, "eval": bench_eval}[args.what](args)
