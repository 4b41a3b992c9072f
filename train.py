"""
Train RichSem: DINO with a CLIP text-contrast classifier and a semantic branch distilled from a frozen CLIP teacher,
on LVIS v1 with every other batch a 4-image mosaic of ImageNet-LVIS images (paper Sec. 3-4).

The embedded toy world (generated on first use: long-tailed shapes, an INet-LVIS-style extra split, a toy CLIP),
on one GPU, or on the CPU:
    python train.py --dataset toy
    python train.py --dataset toy --device cpu
LVIS v1 + ImageNet-LVIS, the paper's R50 1x schedule, 8 GPUs of one node (batch 2 per GPU = 16):
    torchrun --standalone --nproc_per_node 8 train.py --backbone r50 \
        --data_path data/lvis --extra_path data/imagenet-lvis --out_dir out/richsem_r50
    data/lvis:             lvis_v1_train.json, lvis_v1_val.json, train2017/, val2017/ (COCO images)
    data/imagenet-lvis:    imagenet_lvis_image_info.json, images/ (Detic's INet-LVIS)
On GPUs the detector's blocks, the loss arithmetic and the teacher's tower are torch.compile'd (--no-compile: eager):
on an H100 68-95 ms per bf16 step on the dynamic-shape graphs that training runs on (the host's speed sets it),
146-162 eager (bench.py step), for 5-6 minutes of compiling at the first step and 2-5 more at each of the first two
batches that bring new shapes (~13 minutes in all on a fresh 16-core H100 host; then the graphs serve every size): a
day-long run gains hours, a short experiment may be faster with --no-compile.
Resume where the run in --out_dir stopped (same epoch, iteration, optimizer and sampler state; add the same flags):
    torchrun --standalone --nproc_per_node 8 train.py ... --resume auto
(without --resume, a run refuses an --out_dir that already holds a checkpoint).
The paper's ablations (Table 3, R50 1x), each one flag on top of the command above:
    --no_extra --lambda_soft 0          DINO with the text classifier, LVIS only (the baseline)
    --no_extra                          soft semantics on LVIS only (Table 3h)
    --lambda_soft 0                     extra data with its hard labels, no soft loss (Table 3e)
    --unlabeled_extra                   INet-Unl: extra images without labels, teacher argmax if p > T (Eq. 7, 3c)
    --clip_model RN50x4 | RN50x16       a stronger teacher (Table 3d)
A smoke run: --max_iters 20 stops early, then checkpoints and evaluates as at the end of training.

Writes to --out_dir: config.json (the effective settings), log.jsonl (one record per progress line and evaluation),
checkpoint.pth (the latest: every --save_every iterations and after each epoch) and checkpoint_eXX.pth (after each
epoch).
"""

import argparse
import datetime
import json
import math
import os
import random
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.profiler import record_function

import data
from clip_teacher import ClipTeacher, boxes_from_targets, hard_labels_from_teacher
from losses import SetCriterion
from model import RichSem

# Sizes of the toy world: it is small and drawn at low resolution, and its backbone starts from scratch (no
# downloads), so it needs fewer queries and layers, smaller images and a backbone learning as fast as the rest (layers
# 2-4: the stem and layer1 stay frozen, as in DINO, here at their random init).
# Applied under --dataset toy to every setting the command line does not give. 4 epochs (lr x0.1 for the last) are
# 1,500 LVIS + 1,500 mosaic steps: about 6 minutes on an H100. On the CPU a step takes ~2 s, so there the toy stops
# after TOY_CPU_ITERS steps (~10 minutes on 2 cores, world included): the whole pipeline runs, but AP stays far
# below the GPU run's.
TOY_DEFAULTS = dict(data_path='data/toy', out_dir='out/toy', backbone='r18', backbone_weights='none', lr_backbone=1e-4,
                    d_model=128, dim_feedforward=512, enc_layers=3, dec_layers=3, num_queries=100, dn_number=50,
                    image_scale=0.25, batch_size=4, epochs=4, lr_drop=3, num_workers=2,
                    compile=False)  # eager, as measured: whether compiling pays off in a run of minutes is untested
TOY_CPU_ITERS = 250
# what save_checkpoint writes and a resume reads
CHECKPOINT_KEYS = ('model', 'optimizer', 'scheduler', 'sampler', 'epoch', 'iteration', 'args', 'class_names', 'rng')
# the settings that shape the model's state dict (lambda_soft: whether it has the semantic branch)
ARCH_ARGS = ('backbone', 'd_model', 'dim_feedforward', 'enc_layers', 'dec_layers', 'num_queries', 'lambda_soft')


def get_args(argv=None):
    p = argparse.ArgumentParser(description='Train RichSem (defaults: the paper\'s R50 1x run with INet-LVIS)')
    # data
    p.add_argument('--dataset', choices=['lvis', 'toy'], default='lvis')
    p.add_argument('--data_path', default='data/lvis', help='LVIS root (toy: where the world is generated)')
    p.add_argument('--extra_path', default='data/imagenet-lvis', help='INet-LVIS root (Detic format)')
    p.add_argument('--no_extra', action='store_true', help='LVIS only (no extra mosaic batches)')
    p.add_argument('--unlabeled_extra', action='store_true', help='ignore the extra labels; Eq. 7 pseudo labels')
    p.add_argument('--pseudo_threshold', type=float, default=0.05,
                   help="Eq. 7: the teacher's argmax is the label if its softmax prob > this, else the box "
                        "keeps no hard label (the official code's unused path, also 0.05, made a box of every "
                        "class above it)")
    p.add_argument('--image_scale', type=float, default=1.0,
                   help='multiplies every image size of the recipe: short side 480-800, long <= 1333, crops, '
                        'mosaic canvas 1280, eval 800')
    p.add_argument('--num_workers', type=int, default=4, help='data loader processes per GPU and per source')
    # model
    p.add_argument('--backbone', choices=['r18', 'r34', 'r50', 'swin_t', 'swin_s', 'swin_b'], default='r50')
    p.add_argument('--backbone_weights', default='default', help="'default' (torchvision ImageNet), PATH or 'none'")
    p.add_argument('--d_model', type=int, default=256)
    p.add_argument('--dim_feedforward', type=int, default=2048)
    p.add_argument('--enc_layers', type=int, default=6)
    p.add_argument('--dec_layers', type=int, default=6)
    p.add_argument('--num_queries', type=int, default=900)
    p.add_argument('--dn_number', type=int, default=100, help='denoising queries (x2: positive and negative)')
    # teacher and soft loss
    p.add_argument('--clip_model', choices=['RN50', 'RN50x4', 'RN50x16'], default='RN50', help='CLIP teacher')
    p.add_argument('--clip_weights', default='openai',
                   help="'openai' or a local open_clip checkpoint PATH (the toy world brings its own teacher)")
    p.add_argument('--lambda_soft', type=float, default=0.5, help='weight of the soft (KL) loss; 0: none')
    # optimisation
    p.add_argument('--lr', type=float, default=1e-4)
    p.add_argument('--lr_backbone', type=float, default=1e-5, help="for parameters named 'backbone.*'")
    p.add_argument('--weight_decay', type=float, default=1e-4)
    p.add_argument('--clip_max_norm', type=float, default=0.1, help='gradient clipping (total L2 norm)')
    p.add_argument('--batch_size', type=int, default=2, help='images per GPU and step')
    p.add_argument('--epochs', type=int, default=12, help='an epoch is one repeat-factor pass over LVIS')
    p.add_argument('--lr_drop', type=int, default=11, help='lr x0.1 from this epoch on')
    p.add_argument('--fp32', action='store_true', help='no bf16 autocast on the GPU (detector and teacher)')
    p.add_argument('--compile', action=argparse.BooleanOptionalAction, default=True,
                   help='torch.compile the model, loss and teacher blocks on the GPU (faster steps after a few '
                        'minutes of compiling)')
    p.add_argument('--seed', type=int, default=42)
    # run
    p.add_argument('--out_dir', default='out/lvis')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', choices=['cuda', 'cpu'])
    p.add_argument('--max_iters', type=int, default=None, help='stop after this many steps in all (smoke runs)')
    p.add_argument('--resume', default=None, help="a checkpoint PATH, or 'auto': <out_dir>/checkpoint.pth if any")
    p.add_argument('--eval_every', type=int, default=1, help='evaluate every N epochs and at the end; 0: never')
    p.add_argument('--log_every', type=int, default=25,
                   help='iterations between progress lines (odd: with LVIS and extra batches alternating, the lines '
                        'alternate too)')
    p.add_argument('--save_every', type=int, default=2000,
                   help='also checkpoint every N iterations, mid-epoch (a killed run loses at most N); 0: epoch ends')
    # parse twice: the toy's defaults replace the paper's, and whatever the command line says still wins
    known = p.parse_known_args(argv)[0]
    if known.dataset == 'toy':
        p.set_defaults(**TOY_DEFAULTS, **({'max_iters': TOY_CPU_ITERS} if known.device == 'cpu' else {}))
    args = p.parse_args(argv)
    if args.unlabeled_extra and args.no_extra:
        p.error('--unlabeled_extra needs the extra data (drop --no_extra)')
    for name, least in (('lr_drop', 1), ('log_every', 1), ('epochs', 1), ('batch_size', 1), ('save_every', 0),
                        ('eval_every', 0)):  # else a modulo by zero, or a silent lr drop every epoch, later in the run
        if getattr(args, name) < least:
            p.error(f'--{name} must be >= {least} (got {getattr(args, name)})'
                    + (': for no drop, give one > --epochs' if name == 'lr_drop' else ''))
    return args


# ----------------------------------------------------------------------------------------------------------------
# distributed helpers

def setup_distributed(device):
    """torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; without them this is one process.
    returns (ddp, rank, world_size, device): NCCL on GPUs, gloo for CPU processes."""
    if 'RANK' not in os.environ:
        if device == 'cuda':  # with an explicit index, RNG-state and memory queries name the device
            return False, 0, 1, torch.device('cuda', torch.cuda.current_device())
        return False, 0, 1, torch.device('cpu')
    rank, local_rank, world_size = (int(os.environ[k]) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE'))
    # the others wait at a barrier while rank 0 alone downloads CLIP or generates the toy world and its teacher
    timeout = datetime.timedelta(minutes=60)
    if device == 'cuda':
        device = torch.device('cuda', local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group('nccl', timeout=timeout, device_id=device)
    else:
        device = torch.device('cpu')
        dist.init_process_group('gloo', timeout=timeout)
    return True, rank, world_size, device


def mean_over_ranks(terms, ddp, world_size):
    """terms: {name: float} of this rank -> the mean of each name over the ranks that have it (a rank whose batch has
    no box has no DN terms), as DINO logs its losses. Every rank must call this at the same step."""
    if not ddp:
        return terms
    every = [None] * world_size
    dist.all_gather_object(every, terms)
    names = list(dict.fromkeys(k for d in every for k in d))  # rank 0's order first
    return {k: sum(d[k] for d in every if k in d) / sum(k in d for d in every) for k in names}


def rng_state(device):
    return {'torch': torch.get_rng_state(), 'python': random.getstate(), 'numpy': np.random.get_state(),
            'cuda': torch.cuda.get_rng_state(device) if device.type == 'cuda' else None}


def set_rng_state(state, device):
    torch.set_rng_state(state['torch'])
    random.setstate(state['python'])
    np.random.set_state(state['numpy'])
    if device.type == 'cuda' and state['cuda'] is not None:
        torch.cuda.set_rng_state(state['cuda'], device)


def save_atomic(obj, path):
    """A crash while writing leaves the previous file intact: write a temp file beside it, flush it to the disk
    (else a node that dies right after the rename can leave an empty file on some filesystems), then rename."""
    with open(path + '.tmp', 'wb') as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + '.tmp', path)


# ----------------------------------------------------------------------------------------------------------------
# data, teacher, evaluation

def build_data(args, ddp, rank, world_size):
    """returns (train loader yielding (images, mask, targets, source), LVIS train set, LVIS val set,
    the toy world's paths (dict) or None)."""
    def size(*sizes):
        return tuple(max(1, round(s * args.image_scale)) for s in sizes)

    scales, max_size = size(*data.TRAIN_SCALES), size(data.MAX_SIZE)[0]
    crop = dict(crop_scales=size(*data.CROP_SCALES), crop_size=size(*data.CROP_SIZE))
    if args.dataset == 'toy':
        import toy  # only the toy run needs the generator
        with data.rank_zero_first(ddp, rank):  # generates what is missing: on rank 0 only, once
            paths = toy.make_toy_world(args.data_path, device=args.device)
        train_json, val_json, image_root, extra_root = (
            paths['train_json'], paths['val_json'], paths['image_root'], paths['extra_root'])
    else:
        paths = None
        train_json, val_json = (os.path.join(args.data_path, f'lvis_v1_{s}.json') for s in ('train', 'val'))
        image_root, extra_root = args.data_path, args.extra_path
    train_set = data.build_lvis(train_json, image_root, True, scales, max_size, **crop)
    val_set = data.build_lvis(val_json, image_root, False, max_size=max_size, eval_size=size(800)[0])
    if val_set.cat_ids != train_set.cat_ids:  # the detector's classes are the training json's
        raise ValueError(f'{val_json} has other category ids than {train_json} ({len(val_set.cat_ids)} against '
                         f'{len(train_set.cat_ids)}): it cannot evaluate a model trained on them')
    # the same seed on every rank: all ranks build the same repeat-factor list and take disjoint shards of it
    sampler = data.RepeatFactorSampler(train_set.image_classes(), seed=args.seed, rank=rank, world_size=world_size)
    lvis = data.train_loader(train_set, sampler, args.batch_size, args.num_workers, seed=args.seed + rank)
    extra = None
    if not args.no_extra:
        augment = data.TrainAugment(scales, max_size, **crop)
        extra_set = data.InetLvisMosaic(extra_root, train_set.cat_ids, augment, canvas=size(1280)[0])
        extra_sampler = data.ExtraSampler(extra_set, seed=args.seed, rank=rank, world_size=world_size)
        extra = data.train_loader(extra_set, extra_sampler, args.batch_size, args.num_workers,
                                   seed=args.seed + world_size + rank)
    return data.MixedLoader(lvis, extra), train_set, val_set, paths


def build_teacher(args, class_names, paths, device, ddp, rank):
    """The frozen CLIP teacher and the class text embeddings (C, E) it gives the classifier.
    The teacher itself is kept only when training needs its box logits (soft loss or Eq. 7 pseudo labels)."""
    weights, cfg = args.clip_weights, None
    if paths is not None:  # the toy world comes with its own small CLIP
        weights, cfg = paths['teacher_ckpt'], paths['teacher_cfg']
    with data.rank_zero_first(ddp, rank):  # rank 0 downloads the weights and fills the embedding cache
        # on the GPU: LVIS's 1203 names x 81 prompts through the text tower would take many minutes on the CPU
        teacher = ClipTeacher(args.clip_model, pretrained=weights, model_cfg=cfg).to(device)
        text_embed = teacher.text_embeddings(class_names)
    needed = args.lambda_soft > 0 or args.unlabeled_extra
    return (teacher if needed else None), text_embed


def add_teacher_targets(teacher, images, targets, text_embed, pseudo_threshold, amp=True):
    """Adds 'teacher_logits' (n, C) to every target; pseudo_threshold given (unlabeled extra data): also replaces
    the labels by the teacher's confident argmax, -1 where it is unsure (Eq. 7). amp: the teacher in bf16."""
    logits = teacher.box_logits(images, boxes_from_targets(targets), text_embed, amp)
    for t, l in zip(targets, logits):
        t['teacher_logits'] = l
        if pseudo_threshold is not None:
            t['labels'] = hard_labels_from_teacher(l, pseudo_threshold)


def build_model(args, text_embed):
    """The detector of the settings, on the CPU: RichSem over the class text embeddings text_embed (C, E), with the
    semantic branch only when there is a soft loss to train it."""
    return RichSem(text_embed, backbone=args.backbone,
                   backbone_weights=None if args.backbone_weights == 'none' else args.backbone_weights,
                   d_model=args.d_model, enc_layers=args.enc_layers, dec_layers=args.dec_layers,
                   dim_feedforward=args.dim_feedforward, num_queries=args.num_queries, dn_number=args.dn_number,
                   semantic_branch=args.lambda_soft > 0)


def build_optimizer(args, model, device):
    """AdamW over the trainable parameters, those named 'backbone.*' at their own lr (fused kernels on the GPU).
    returns (optimizer, the list of trainable parameters, which gradient clipping needs)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{'params': [p for n, p in named if not n.startswith('backbone.')], 'lr': args.lr},
              {'params': [p for n, p in named if n.startswith('backbone.')], 'lr': args.lr_backbone}]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay, fused=device.type == 'cuda')
    return optimizer, [p for _, p in named]


def apply_lr_settings(args, optimizer, scheduler):
    """After a resume: the command line's --lr, --lr_backbone, --weight_decay and --lr_drop, which loading the
    optimizer and scheduler state replaced by the old run's (a resume "with a lower --lr" must get it). The lr is
    the schedule's at the restored epoch, base * 0.1 ** (epoch // lr_drop), multiplied out drop by drop as StepLR
    does, so that unchanged settings give the very same float and the resumed run stays bit-identical."""
    scheduler.step_size, scheduler.base_lrs = args.lr_drop, [args.lr, args.lr_backbone]  # build_optimizer's groups
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
        group['initial_lr'], group['weight_decay'], group['lr'] = base, args.weight_decay, base
        for _ in range(scheduler.last_epoch // scheduler.step_size):
            group['lr'] *= scheduler.gamma


class NonFiniteLoss(Exception):
    """The loss or the gradient norm was not finite on some rank; train_step took no optimizer step."""

    def __init__(self, loss, losses, grad_norm):
        super().__init__('non-finite loss or gradient norm')
        self.loss, self.losses, self.grad_norm = loss, losses, grad_norm


def compile_blocks(device, *parts):
    """torch.compile in place the blocks of each part (model, criterion, teacher; None is skipped), as --compile does.
    On the GPU the compiled step is bound by launching kernels, not by running them (on an H100 it takes as long at
    320x320 as at 800x1333), so inductor writes its kernel-launching wrappers in C++: 106-120 -> 86 ms per step.
    Set for the whole process: given as torch.compile(options=...) instead, the backward graphs fail to build (torch
    2.11: "CudaKernelParamCache not populated")."""
    if device.type == 'cuda':
        torch._inductor.config.cpp_wrapper = True
    for part in parts:
        if part is not None:
            part.compile_blocks()


def train_step(model, criterion, optimizer, params, images, mask, targets, amp, clip_max_norm, teacher=None,
               text_embed=None, pseudo_threshold=None, replaced=0, ddp=False):
    """
    One training step on a batch already on the device: teacher targets, forward (bf16 autocast if amp), losses,
    backward, gradient clipping, a finiteness check agreed by all ranks, optimizer step. bench.py times this.
    images (B, 3, H, W), mask (B, H, W) True = padding, targets: B dicts ('boxes', 'labels', 'size'), changed in place
    teacher: given, every target gets its 'teacher_logits' (n, C) first, and with pseudo_threshold (unlabeled extra
             data) the teacher's confident labels (Eq. 7)
    replaced: this rank's count of replaced images so far, totalled over ranks by the same all-reduce
    returns loss (), losses {name: ()}, grad_norm (), status (3,) = [loss not finite, grad norm not finite, replaced]
    raises NonFiniteLoss, without stepping, when the loss or the gradient norm is not finite on any rank
    The record_function regions name the parts of the step in a torch.profiler trace (bench.py step --profile).
    """
    if teacher is not None:
        with record_function('teacher'):
            add_teacher_targets(teacher, images, targets, text_embed, pseudo_threshold, amp)
    with record_function('forward'), torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=amp):
        outputs = model(images, mask, targets)
    with record_function('losses'):
        losses = criterion(outputs, targets)
        loss = torch.stack(list(losses.values())).sum()  # one kernel, not one addition per each of ~40 terms
    optimizer.zero_grad(set_to_none=True)
    with record_function('backward'):
        loss.backward()
    with record_function('clip_and_check'):
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_max_norm)
        # One small all-reduce per step: every rank must see a non-finite loss on any rank and stop with it
        # (a rank that stopped alone would leave the others hanging); it also totals the replaced images.
        status = torch.stack([(~torch.isfinite(loss.detach())).float(), (~torch.isfinite(grad_norm)).float(),
                              torch.tensor(float(replaced), device=images.device)])
        if ddp:
            dist.all_reduce(status)
        if status[:2].sum().item() > 0:
            raise NonFiniteLoss(loss, losses, grad_norm)
    with record_function('optimizer'):
        optimizer.step()
    return loss, losses, grad_norm, status


def run_evaluation(model, val_set, args, device, rank, world_size, amp, log, iteration):
    """LVIS box AP on the val split, every rank predicting its share (batch 1: see evaluate.evaluate);
    rank 0 prints the table and logs the metrics. Detections and metrics go to <out_dir>/eval."""
    from evaluate import evaluate, format_metrics  # imported on first use: runs with --eval_every 0 do not need it
    # evaluation must not move the training RNG: with it, a run is the same whatever --eval_every says
    with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []):
        metrics = evaluate(model, val_set, device, rank=rank, world_size=world_size,
                           out_dir=os.path.join(args.out_dir, 'eval'), num_workers=args.num_workers, amp=amp)
    if rank == 0:
        print(f'LVIS box AP after {iteration} iterations:\n{format_metrics(metrics)}')
        log({'iter': iteration, 'eval': metrics})


# ----------------------------------------------------------------------------------------------------------------
# training

def main(argv=None):
    """Trains as the command line says; returns the trained (unwrapped) model."""
    args = get_args(argv)
    ddp, rank, world_size, device = setup_distributed(args.device)
    try:
        return train(args, ddp, rank, world_size, device)
    finally:
        if ddp:
            dist.destroy_process_group()


def train(args, ddp, rank, world_size, device):
    master = rank == 0
    # a different seed per rank for DN noise and the federated class draws (augmentation draws from the samplers'
    # per-sample keys); the model starts equal anyway (DDP broadcasts it)
    torch.manual_seed(args.seed + rank)
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    amp = device.type == 'cuda' and not args.fp32
    log_path = os.path.join(args.out_dir, 'log.jsonl')
    ckpt_path = os.path.join(args.out_dir, 'checkpoint.pth')
    # before anything is built or written: a fresh run must not overwrite another's checkpoint and log
    if args.resume is None and os.path.exists(ckpt_path):
        raise SystemExit(f'{ckpt_path} exists: --resume auto continues that run; to start afresh, give another '
                         '--out_dir or remove it')
    if args.resume not in (None, 'auto') and not os.path.isfile(args.resume):
        raise SystemExit(f'--resume {args.resume}: no such file')
    if args.resume == 'auto':  # the checkpoint this run continues; None: a fresh run
        resume = ckpt_path if os.path.exists(ckpt_path) else None
    else:
        resume = args.resume

    def log(record):
        if master:
            with open(log_path, 'a') as f:
                f.write(json.dumps(record) + '\n')

    if master:
        os.makedirs(args.out_dir, exist_ok=True)
        if resume is None and os.path.exists(log_path):  # left by a run that died before its first checkpoint
            os.replace(log_path, log_path + '.old')
            print(f'{log_path}: a log without a checkpoint, moved to log.jsonl.old; this run starts a new one')
        config = {**vars(args), 'world_size': world_size, 'global_batch': args.batch_size * world_size}
        print('config:\n' + '\n'.join(f'  {k}: {v}' for k, v in config.items()))
        with open(os.path.join(args.out_dir, 'config.json'), 'w') as f:
            json.dump(config, f, indent=1)

    loader, train_set, val_set, paths = build_data(args, ddp, rank, world_size)
    if len(loader) == 0:  # drop_last would silently make every epoch empty
        raise ValueError(f'{len(train_set)} training images make no full batch of {args.batch_size} on each of '
                         f'{world_size} processes')
    teacher, text_embed = build_teacher(args, train_set.class_names, paths, device, ddp, rank)
    text_embed = text_embed.to(device)
    model = build_model(args, text_embed).to(device)
    # federated loss: negatives drawn in proportion to sqrt(image count), as the official code
    criterion = SetCriterion(len(train_set.class_names), train_set.class_image_counts.float() ** 0.5,
                             lambda_soft=args.lambda_soft).to(device)
    optimizer, params = build_optimizer(args, model, device)
    if args.compile and device.type == 'cuda':
        compile_blocks(device, model, criterion, teacher)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=args.lr_drop, gamma=0.1)
    if master:
        print(f'model: {sum(p.numel() for p in params) / 1e6:.1f}M trainable parameters, '
              f'{len(train_set.class_names)} classes, teacher {"on" if teacher is not None else "off"}')

    # ---- resume: the state after `iteration` steps; the loader's state says where in its epoch ----
    start_epoch, iteration, rng = 0, 0, None
    if resume:
        try:  # our own file, and it holds Python and NumPy RNG states, which weights_only would refuse
            ckpt = torch.load(resume, map_location='cpu', weights_only=False)
        except Exception as err:  # truncated or not a checkpoint: say which file
            raise SystemExit(f'{resume}: not a readable checkpoint ({type(err).__name__}: {err}); the copies of '
                             f'finished epochs are {args.out_dir}/checkpoint_eXX.pth') from err
        missing = [k for k in CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
        if missing:  # e.g. released weights, which hold a model alone: not a run to continue
            raise SystemExit(f'{resume}: not a checkpoint of train.py (no {", ".join(missing)}); --resume continues '
                             'a run that train.py saved')
        if ckpt['class_names'] != train_set.class_names:
            raise ValueError(f'{resume} was trained on other classes than {args.data_path}')
        try:
            model.load_state_dict(ckpt['model'])
        except RuntimeError as err:  # another architecture: name the settings that made it
            old = ckpt['args']
            arch = {k: (old.get(k), getattr(args, k)) for k in ARCH_ARGS if old.get(k) != getattr(args, k)}
            detail = ' '.join(str(err).split())[:400]  # torch's first line only says "Error(s) in loading"
            raise SystemExit(f'{resume} holds another model than these settings build (changed: {arch or "none"}; '
                             f'the semantic branch exists when --lambda_soft > 0): {detail}') from err
        optimizer.load_state_dict(ckpt['optimizer'])
        scheduler.load_state_dict(ckpt['scheduler'])
        apply_lr_settings(args, optimizer, scheduler)
        loader.load_state_dict(ckpt['sampler'])
        start_epoch, iteration = ckpt['epoch'], ckpt['iteration']
        # exact continuation: the per-rank RNG states for DN noise and federated classes; the augmentation draws
        # from the samplers' per-sample keys, whatever --num_workers
        rng = ckpt['rng'][rank] if len(ckpt['rng']) == world_size else None
        changed = {k: (v, getattr(args, k)) for k, v in ckpt['args'].items()
                   if getattr(args, k, v) != v and k not in ('resume', 'max_iters', 'compile')}
        if len(ckpt['rng']) != world_size:  # the data goes on after the old run's images; the RNG streams start anew
            changed['world_size'] = (len(ckpt['rng']), world_size)
        if master:
            print(f'resumed {resume}: epoch {start_epoch}, step {loader.position} of it, iteration {iteration}'
                  + (f'; settings changed (was, now): {changed}' if changed else ''))
            if start_epoch >= args.epochs:
                print(f'{resume} has done {start_epoch} epochs, --epochs is {args.epochs}: nothing left to train')

    raw_model = model
    if ddp:
        # buffers (frozen BatchNorm, text embeddings) never change: broadcasting them every step would only cost
        model = DDP(model, device_ids=[device.index] if device.type == 'cuda' else None, broadcast_buffers=False)

    def save_checkpoint(epoch, copy_name=None):
        rngs = [None] * world_size
        if ddp:  # every rank's generators, so that each continues its own stream
            dist.all_gather_object(rngs, rng_state(device))
        else:
            rngs = [rng_state(device)]
        if master:
            ckpt = {'model': raw_model.state_dict(), 'optimizer': optimizer.state_dict(),
                    'scheduler': scheduler.state_dict(), 'sampler': loader.state_dict(), 'epoch': epoch,
                    'iteration': iteration, 'args': vars(args), 'class_names': train_set.class_names, 'rng': rngs}
            save_atomic(ckpt, ckpt_path)
            if copy_name:
                save_atomic(ckpt, os.path.join(args.out_dir, copy_name))

    total_iters = args.epochs * len(loader)
    if args.max_iters is not None:
        total_iters = min(total_iters, args.max_iters)
        if iteration >= args.max_iters:  # a resumed run that is already there
            start_epoch = args.epochs
    replaced, t0, t_start, it_start, stopped_early = 0, time.time(), time.time(), iteration, False
    model.train()
    for epoch in range(start_epoch, args.epochs):
        loader.set_epoch(epoch)  # a resumed epoch keeps its position: the loader skips what was trained on
        if rng is not None:  # so that the next step draws its noise as in the interrupted run
            set_rng_state(rng, device)
            rng = None
        for step, (images, mask, targets, source) in enumerate(loader, start=loader.position):
            images, mask = images.to(device, non_blocking=True), mask.to(device, non_blocking=True)
            targets = [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()}
                       for t in targets]
            replaced += sum(t['replaced'] for t in targets)
            unlabeled = args.unlabeled_extra and source == 'extra'
            use_teacher = teacher is not None and (args.lambda_soft > 0 or unlabeled)
            try:
                loss, losses, grad_norm, status = train_step(
                    model, criterion, optimizer, params, images, mask, targets, amp, args.clip_max_norm,
                    teacher if use_teacher else None, text_embed, args.pseudo_threshold if unlabeled else None,
                    replaced, ddp)
            except NonFiniteLoss as bad_step:
                loss, grad_norm = bad_step.loss, bad_step.grad_norm
                terms = {k: v.item() for k, v in bad_step.losses.items()}
                bad = [f'{k}={v}' for k, v in terms.items() if not math.isfinite(v)]
                raise SystemExit(
                    f'stopping: non-finite loss at iteration {iteration + 1} (epoch {epoch}, step {step}, {source} '
                    f'batch) on rank {rank}: ' + (', '.join(bad) or f'another rank (here loss={loss.item():.4g})')
                    + f'; grad norm {grad_norm.item():.4g}. No step was taken and no checkpoint written: '
                    f'{ckpt_path} still holds the last good state (try --resume auto, a lower --lr or --fp32).\n'
                    f'all loss terms: {terms}') from None
            iteration += 1

            if iteration % args.log_every == 0 or iteration == total_iters:
                dt, t0 = time.time() - t0, time.time()
                values = torch.stack([loss.detach(), *losses.values()]).tolist()  # one host sync
                terms = mean_over_ranks(dict(zip(['loss', *losses], values)), ddp, world_size)
                mean_loss = terms.pop('loss')
                speed = (iteration - it_start) * args.batch_size * world_size / (time.time() - t_start)
                eta = (total_iters - iteration) * (time.time() - t_start) / (iteration - it_start)
                mem = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == 'cuda' else 0.0
                lr = optimizer.param_groups[0]['lr']
                if master:
                    main_terms = ' '.join(f'{k[5:]} {terms[k]:.3f}' for k in
                                          ('loss_ce', 'loss_bbox', 'loss_giou', 'loss_soft') if k in terms)
                    print(f'iter {iteration}/{total_iters} | epoch {epoch} | {source:5s} | loss {mean_loss:.3f} '
                          f'({main_terms}) | lr {lr:.1e} | {speed:.1f} img/s | eta {eta / 60:.1f} min | '
                          f'mem {mem:.1f} GB | replaced {int(status[2].item())}')
                log({'iter': iteration, 'epoch': epoch, 'source': source, 'loss': mean_loss, **terms, 'lr': lr,
                     'grad_norm': grad_norm.item(), 'img_per_s': speed, 'eta_s': eta, 'mem_gb': mem,
                     'replaced': int(status[2].item()), 'time_s': dt})
            if args.max_iters is not None and iteration >= args.max_iters:
                stopped_early = True
                break
            if args.save_every > 0 and iteration % args.save_every == 0:
                save_checkpoint(epoch)  # mid-epoch: the loader's position comes with it
        if stopped_early:
            save_checkpoint(epoch)
            break
        scheduler.step()
        save_checkpoint(epoch + 1, f'checkpoint_e{epoch:02d}.pth')
        if master:
            print(f'epoch {epoch} done: iteration {iteration}, {(time.time() - t_start) / 60:.1f} min so far')
        if args.eval_every > 0 and ((epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs):
            run_evaluation(raw_model, val_set, args, device, rank, world_size, amp, log, iteration)
    if stopped_early and args.eval_every > 0:
        run_evaluation(raw_model, val_set, args, device, rank, world_size, amp, log, iteration)
    if master:
        print(f'done: iteration {iteration}, checkpoint {ckpt_path}')
    return raw_model


if __name__ == '__main__':
    main()
