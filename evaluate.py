"""
LVIS v1 box AP of a RichSem checkpoint, a picture of its detections on one image, and loading of the official
RichSem / DINO checkpoints.

    python evaluate.py --ckpt out/checkpoint.pth --data_path data/lvis               # one process (GPU or CPU)
    torchrun --nproc_per_node 8 evaluate.py --ckpt out/checkpoint.pth --data_path data/lvis
    python evaluate.py --ckpt out/checkpoint.pth --image cat.jpg --out cat.png      # top detections drawn
    python evaluate.py --official --ckpt richsem_r50_2x.pth --data_path data/lvis    # official weights

Protocol (official): sigmoid scores, the top 300 (query, class) pairs of an image, no NMS, LVISEval of the `lvis`
package with max_dets 300, images resized to short side 800 / long side <= 1333.

Distributed: rank r predicts images r, r + W, r + 2W, ... (no padded duplicates, which LVISEval would count twice)
and writes them to <out_dir>/results.rank{r}-of-{W}.json; after a barrier rank 0 merges the shards in image order,
writes results.json and metrics.json and runs LVISEval. Files rather than an all_gather: LVIS val gives ~6M
detections, and gathering them as pickled Python lists puts all of them in every rank's memory at once.
"""

import argparse
import inspect
import json
import math
import os
import re
import tempfile
import types
import warnings

import numpy as np
import torch
import torch.distributed as dist
import lvis.eval
from lvis import LVIS, LVISEval, LVISResults
from torchvision.transforms.functional import to_pil_image
from torchvision.utils import draw_bounding_boxes

import data
from clip_teacher import ClipTeacher
from model import RichSem, postprocess

METRICS = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'APr', 'APc', 'APf')
MAX_DETS = 300  # LVIS protocol: detections kept per image

# lvis 0.5.3 (its last release) calls np.float in LVISEval.accumulate, an alias of the builtin float that NumPy 1.24
# removed. We give lvis.eval its own view of numpy with the alias back, rather than patching numpy for every module.
lvis.eval.np = types.SimpleNamespace(**{**vars(np), 'float': float})


# ----------------------------------------------------------------------------------------------------------------
# LVIS metrics

def lvis_evaluate(gt, results):
    """
    Box AP by LVIS's federated rules: a detection counts only in images where its class is annotated as present or
    verified absent (neg_category_ids); an unmatched detection of a not-exhaustively annotated class is ignored.
    gt: path of an LVIS-format json, or an lvis.LVIS
    results: list of {'image_id', 'category_id', 'bbox' [x, y, w, h] in pixels of the original image, 'score'};
             per image only the MAX_DETS highest scores are kept
    returns {name: float in [0, 1]} for METRICS; NaN where the ground truth has no box of that kind (e.g. APr on a
    subset without rare classes: LVISEval reports -1 there, which would read as a value).
    """
    gt = gt if isinstance(gt, LVIS) else LVIS(gt)
    results = [dict(r) for r in results]  # LVISResults writes 'area', 'id' and 'segmentation' into what it gets
    if not results:
        # LVISResults reads results[0]. A detection of category -1 (no LVIS class) lets it build and is never
        # evaluated, so the classes with ground truth get AP 0 and the others stay undefined, as with real results.
        results = [{'image_id': next(iter(gt.imgs)), 'category_id': -1, 'bbox': [0.0, 0.0, 1.0, 1.0], 'score': 0.0}]
    evaluator = LVISEval(gt, LVISResults(gt, results, max_dets=MAX_DETS), iou_type='bbox')
    evaluator.run()
    return {k: float(v) if v >= 0 else math.nan for k, v in evaluator.get_results().items() if k in METRICS}


def format_metrics(metrics):
    """{name: float in [0, 1]} -> a two-line table of METRICS in percent, '-' where undefined (NaN)."""
    head = ' '.join(f'{k:>6}' for k in METRICS)
    row = ' '.join('     -' if math.isnan(metrics[k]) else f'{100 * metrics[k]:6.1f}' for k in METRICS)
    return f'{head}\n{row}'


# ----------------------------------------------------------------------------------------------------------------
# Inference, sharded over ranks

@torch.inference_mode()
def predict(model, loader, device, amp=True):
    """
    The detections of model on every image of loader, as LVIS results.
    loader: yields (images (B, 3, H, W), mask (B, H, W), targets with 'orig_size' (2,) (h, w) and 'image_id');
            loader.dataset.cat_ids maps class c to its LVIS category id
    amp: bf16 autocast (CUDA only; box arithmetic inside the model stays fp32)
    returns: list of {'image_id', 'category_id', 'bbox' [x, y, w, h] in original pixels, 'score'}, MAX_DETS per image,
             images in loader order, each by decreasing score; none for an image marked unreadable
    """
    # DDP's forward broadcasts buffers, a collective: it would hang when ranks hold different numbers of batches
    model = getattr(model, 'module', model)
    was_training = model.training
    model.eval()
    device = torch.device(device)
    cat_ids = loader.dataset.cat_ids
    results, unreadable = [], []
    for images, mask, targets in loader:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == 'cuda'):
            outputs = model(images.to(device, non_blocking=True), mask.to(device, non_blocking=True))
        orig_sizes = torch.stack([t['orig_size'] for t in targets]).to(device)
        for target, det in zip(targets, postprocess(outputs, orig_sizes, MAX_DETS)):
            if target.get('unreadable'):  # a blank stand-in (data.LvisDetection): its objects count as missed
                unreadable.append(target['image_id'])
                continue
            x0, y0, x1, y1 = det['boxes'].unbind(-1)
            boxes = torch.stack([x0, y0, x1 - x0, y1 - y0], -1).tolist()
            # rounded to 0.01 px and 1e-6: LVIS val holds ~6M detections, and full float64 reprs triple the json
            results += [{'image_id': target['image_id'], 'category_id': cat_ids[label],
                         'bbox': [round(v, 2) for v in box], 'score': round(score, 6)}
                        for box, label, score in zip(boxes, det['labels'].tolist(), det['scores'].tolist())]
    model.train(was_training)
    if unreadable:
        warnings.warn(f'{len(unreadable)} unreadable images got no detections (ids {unreadable[:10]}); the data '
                      f'loader\'s log names the files')
    return results


def write_json(path, obj):
    """Write atomically (temp file in the same folder + rename): a reader never sees half a file."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix='.tmp')
    with os.fdopen(fd, 'w') as f:
        json.dump(obj, f, separators=(',', ':'))
    os.replace(tmp, path)


def shard_path(out_dir, rank, world_size):
    return os.path.join(out_dir, f'results.rank{rank}-of-{world_size}.json')


def merge_shards(out_dir, world_size):
    """All ranks' results, in image-id order (= the one-process order: the dataset is sorted by image id), each
    image's detections in their original order, so that score ties break the same way for any world size."""
    merged = []
    for rank in range(world_size):
        path = shard_path(out_dir, rank, world_size)
        if not os.path.isfile(path):
            raise FileNotFoundError(f'{path}: rank {rank} wrote no results (did it crash?)')
        with open(path) as f:
            merged += json.load(f)
    merged.sort(key=lambda r: r['image_id'])  # stable
    return merged


def evaluate(model, dataset, device, rank=None, world_size=None, out_dir=None, batch_size=1, num_workers=2,
             amp=True):
    """
    LVIS box AP of model on dataset (an LvisDetection built with train=False), sharded over ranks.
    rank, world_size: default torch.distributed's (else 0, 1); every rank must call this.
    out_dir: where each rank writes its shard and rank 0 results.json and metrics.json; may be None only for a
             single process (then nothing is written)
    batch_size: 1 by default because a padded batch changes the detections (the input projections' GroupNorm
             statistics include the padding), so with B > 1 the AP would depend on which images share a batch, i.e.
             on the world size. Larger batches are faster; the AP differs slightly (not measured here).
    returns the metrics {name: float} on rank 0, None on the other ranks.
    """
    on = dist.is_available() and dist.is_initialized()
    rank = rank if rank is not None else (dist.get_rank() if on else 0)
    world_size = world_size if world_size is not None else (dist.get_world_size() if on else 1)
    if out_dir is None and world_size > 1:
        raise ValueError('evaluate: out_dir is needed to merge the results of several ranks')
    loader = data.eval_loader(dataset, batch_size, num_workers, rank, world_size)
    results = predict(model, loader, device, amp)
    if out_dir is None:
        return lvis_evaluate(dataset.ann_file, results)

    os.makedirs(out_dir, exist_ok=True)
    write_json(shard_path(out_dir, rank, world_size), results)
    if on:
        dist.barrier()
    if rank != 0:
        return None
    merged = merge_shards(out_dir, world_size)
    write_json(os.path.join(out_dir, 'results.json'), merged)
    for r in range(world_size):  # results.json holds them all now
        os.remove(shard_path(out_dir, r, world_size))
    metrics = lvis_evaluate(dataset.ann_file, merged)
    write_json(os.path.join(out_dir, 'metrics.json'), metrics)
    return metrics


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: ours and the official ones

def load_checkpoint(path):
    """
    A train.py checkpoint {'model', 'args' (dict), 'class_names', ...} -> (RichSem for inference, without the
    training-only semantic branch, on the CPU; class names or None). The architecture comes from the args whose
    names are RichSem's constructor arguments; the text embedding is a buffer of the state dict.
    """
    ckpt = torch.load(path, map_location='cpu', weights_only=False)  # train.py also pickles RNG states
    state = {k: v for k, v in ckpt['model'].items() if not k.startswith('semantic_branch.')}
    args = ckpt['args'] if isinstance(ckpt['args'], dict) else vars(ckpt['args'])
    fixed = ('text_embed', 'backbone_weights', 'semantic_branch')
    arch = {k: args[k] for k in inspect.signature(RichSem).parameters if k in args and k not in fixed}
    model = RichSem(state['text_embed'], backbone_weights=None, semantic_branch=False, **arch)
    model.load_state_dict(state)
    return model, ckpt.get('class_names')


# Official RichSem / DINO state-dict key -> ours (the released R50 checkpoint's checkpoint['model']). First matching
# rule wins; None means dropped on purpose. Official RichSem's dummy class 'none' (column 0) lives only in its text
# embedding, which is not stored: no tensor here has a class axis, and our class c is its column c + 1.
OFFICIAL_KEY_RULES = [
    (r'(class_embed|transformer\.enc_out_class_embed)\.clip\..*', None),       # the two frozen CLIP RN50 copies
    (r'(class_embed|transformer\.enc_out_class_embed)\.logit_scale', None),    # ln 100, a constant in our contrast()
    (r'bbox_embed\.[1-9]\d*\..*', None),          # the one shared box MLP, saved again under each layer's name
    (r'transformer\.decoder\.bbox_embed\..*', None),
    # DINO's linear classifiers over its own label set, and its DN label table: nothing in our text-contrast
    # classifier can hold them (see load_official)
    (r'(transformer\.decoder\.)?class_embed\.\d+\.(weight|bias)', None),
    (r'transformer\.enc_out_class_embed\.(weight|bias)', None),
    (r'(transformer\.)?label_enc\.weight', None),
    (r'backbone\.0\.body\.(.*)', r'backbone.body.\1'),
    (r'input_proj\.(.*)', r'input_proj.\1'),
    (r'transformer\.level_embed', 'level_embed'),
    (r'transformer\.encoder\.layers\.(\d+)\.(.*)', r'encoder.\1.\2'),
    # DINO's decoder layer names the norm after cross-attention norm1 and the one after self-attention norm2; ours
    # are numbered in the order they run (self-attention first)
    (r'transformer\.decoder\.layers\.(\d+)\.norm1\.(.*)', r'decoder.\1.norm2.\2'),
    (r'transformer\.decoder\.layers\.(\d+)\.norm2\.(.*)', r'decoder.\1.norm1.\2'),
    (r'transformer\.decoder\.layers\.(\d+)\.(.*)', r'decoder.\1.\2'),
    (r'transformer\.decoder\.norm\.(.*)', r'decoder_norm.\1'),
    (r'transformer\.decoder\.ref_point_head\.(.*)', r'ref_point_head.\1'),
    (r'transformer\.tgt_embed\.weight', 'tgt_embed.weight'),
    (r'transformer\.enc_output\.(.*)', r'enc_output.\1'),
    (r'transformer\.enc_output_norm\.(.*)', r'enc_output_norm.\1'),
    (r'transformer\.enc_out_bbox_embed\.(.*)', r'enc_bbox_head.\1'),
    (r'transformer\.enc_out_class_embed\.dino_visual_proj\.weight', 'enc_class_head.proj.weight'),
    (r'class_embed\.dino_visual_proj\.weight', 'class_head.proj.weight'),
    (r'class_embed\.clip_visual_proj\.weight', 'semantic_branch.proj.weight'),  # H_soft, training only
    (r'class_embed\.label_proj\.weight', 'label_proj.weight'),                  # DN content, training only
    (r'bbox_embed\.0\.(.*)', r'bbox_head.\1'),
]
# what an official DINO checkpoint cannot provide: our classifier scores by cosine with text embeddings
TEXT_CLASSIFIER_KEYS = ('class_head.proj.weight', 'enc_class_head.proj.weight', 'label_proj.weight')


def official_key(key):
    """An official state-dict key -> our key, or None when it is dropped on purpose; KeyError when no rule knows it."""
    for pattern, target in OFFICIAL_KEY_RULES:
        match = re.fullmatch(pattern, key)
        if match:
            return None if target is None else match.expand(target)
    raise KeyError(f'official checkpoint key {key!r} matches no rule of OFFICIAL_KEY_RULES')


def map_official_state_dict(state):
    """Official state dict -> (our state dict: same tensors under our names, the sorted list of dropped keys)."""
    mapped, dropped = {}, []
    for key, value in state.items():
        ours = official_key(key)
        if ours is None:
            dropped.append(key)
        else:
            mapped[ours] = value
    return mapped, sorted(dropped)


def class_names_from_json(ann_file):
    """The raw 'name' of every category of an LVIS-format json, in our class order (sorted ids)."""
    with open(ann_file) as f:
        categories = json.load(f)['categories']
    return [c['name'] for c in sorted(categories, key=lambda c: c['id'])]


def load_official(path, class_names):
    """
    An official RichSem R50 (or DINO R50 4-scale) checkpoint as our RichSem for inference, on the CPU. The text
    embeddings are rebuilt by the official recipe, which they were never saved with: CLIP RN50 with OpenAI weights,
    the raw LVIS names, 81 templates, un-normalised mean. class_names: C raw names in our class order.
    A DINO checkpoint loads all but the classifier, which stays random (a warning says so): its boxes are real, its
    class scores are not; it is an initialisation, not a model to evaluate.
    """
    ckpt = torch.load(path, map_location='cpu', weights_only=False)  # official files pickle an argparse.Namespace
    mapped, _ = map_official_state_dict(ckpt.get('model', ckpt))
    mapped = {k: v for k, v in mapped.items() if not k.startswith('semantic_branch.')}
    text_embed = ClipTeacher('RN50', pretrained='openai').text_embeddings(class_names)
    model = RichSem(text_embed, backbone='r50', backbone_weights=None,
                    num_queries=mapped['tgt_embed.weight'].shape[0], semantic_branch=False)
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    missing = [k for k in missing if k != 'text_embed']
    if unexpected or set(missing) - set(TEXT_CLASSIFIER_KEYS):
        raise ValueError(f'{path}: unexpected keys {unexpected[:5]}, missing keys {missing[:5]}')
    if missing:
        print(f'WARNING {path} has no text-contrast classifier (a DINO checkpoint?): {missing} stay random')
    return model


# ----------------------------------------------------------------------------------------------------------------
# A picture of the detections

@torch.inference_mode()
def draw_detections(model, image_path, class_names, out_path, device, score=0.3, topk=20, eval_size=800,
                    max_size=data.MAX_SIZE):
    """
    Run model on one image (resized as for evaluation: short side eval_size, long side at most max_size) and save it
    as a PNG with the topk detections whose score is at least `score`, boxed and labelled '<class name> <score>'.
    Returns how many.
    """
    model.eval()
    img = data.load_rgb(image_path)
    resized, _, _ = data.EvalResize(eval_size, max_size)(img, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    image, _ = data.to_normalised(resized, torch.zeros(0, 4))
    images, mask, _ = data.collate([(image, {})])
    outputs = model(images.to(device), mask.to(device))
    det = postprocess(outputs, torch.tensor([[img.height, img.width]], device=device), MAX_DETS)[0]
    keep = (det['scores'] >= score).nonzero().flatten()[:topk]  # postprocess sorts by decreasing score
    labels = [f'{class_names[c]} {s:.2f}' for c, s in zip(det['labels'][keep].tolist(), det['scores'][keep].tolist())]
    pixels = torch.from_numpy(np.array(img)).permute(2, 0, 1)
    drawn = draw_bounding_boxes(pixels, det['boxes'][keep].cpu(), labels=labels, width=2)
    to_pil_image(drawn).save(out_path)
    return len(labels)


# ----------------------------------------------------------------------------------------------------------------
# Command line

def main(argv=None):
    p = argparse.ArgumentParser(description='LVIS evaluation of a RichSem checkpoint, or its detections on an image.')
    p.add_argument('--ckpt', required=True, help='train.py checkpoint (or an official one with --official)')
    p.add_argument('--official', action='store_true',
                   help='--ckpt is an official RichSem / DINO checkpoint (needs the OpenAI CLIP RN50 weights)')
    p.add_argument('--data_path', help='LVIS root: lvis_v1_val.json and the COCO image folders train2017/, val2017/')
    p.add_argument('--ann_file', help='annotation json (default <data_path>/lvis_v1_val.json)')
    p.add_argument('--image_root', help='image root (default <data_path>)')
    p.add_argument('--out_dir', help='result shards, results.json, metrics.json (default <ckpt folder>/eval_<ckpt '
                                     'name>: not the eval/ a training run in that folder writes)')
    p.add_argument('--eval_size', type=int, default=800, help='short side of the resized image (official: 800)')
    p.add_argument('--max_size', type=int, default=data.MAX_SIZE,
                   help='longest side of the resized image (official: 1333; train.py --image_scale s evaluates at '
                        'round(800 s) / round(1333 s))')
    p.add_argument('--batch_size', type=int, default=1, help='per rank; 1 keeps AP independent of the world size')
    p.add_argument('--num_workers', type=int, default=4)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--fp32', action='store_true', help='no bf16 autocast on the GPU')
    p.add_argument('--image', help='draw the detections on this image instead of evaluating')
    p.add_argument('--out', help='PNG to write with --image')
    p.add_argument('--score', type=float, default=0.3, help='with --image: lowest score drawn')
    p.add_argument('--topk', type=int, default=20, help='with --image: most boxes drawn')
    args = p.parse_args(argv)
    ann_file = args.ann_file or (args.data_path and os.path.join(args.data_path, 'lvis_v1_val.json'))

    if args.image:
        if not args.out:
            p.error('--image needs --out')
        model, names = (None, None) if args.official else load_checkpoint(args.ckpt)
        if names is None:  # official checkpoints (and ours without 'class_names') take the json's names
            if not ann_file:
                p.error('class names: this checkpoint has none, give --ann_file or --data_path')
            names = class_names_from_json(ann_file)
        if args.official:
            model = load_official(args.ckpt, names)
        n = draw_detections(model.to(args.device), args.image, names, args.out, args.device, args.score, args.topk,
                            args.eval_size, args.max_size)
        print(f'{args.out}: {n} detections with score >= {args.score}')
        return None

    if not ann_file:
        p.error('evaluation needs --data_path or --ann_file')
    distributed = 'RANK' in os.environ and 'WORLD_SIZE' in os.environ  # launched by torchrun
    device = args.device
    if distributed:
        if device.startswith('cuda'):
            device = f'cuda:{int(os.environ["LOCAL_RANK"])}'
            torch.cuda.set_device(device)
        dist.init_process_group('nccl' if device.startswith('cuda') else 'gloo')
    dataset = data.build_lvis(ann_file, args.image_root or args.data_path or os.path.dirname(ann_file), train=False,
                              max_size=args.max_size, eval_size=args.eval_size)
    if args.official:
        # rank 0 first: it downloads CLIP and caches the text embeddings (minutes on the CPU), the others read them
        with data.rank_zero_first(distributed, dist.get_rank() if distributed else 0):
            model = load_official(args.ckpt, dataset.class_names)
    else:
        model, names = load_checkpoint(args.ckpt)
        if names is not None and list(names) != dataset.class_names:
            raise ValueError(f'{args.ckpt} was trained on other classes than those of {ann_file}')
    if model.text_embed.shape[0] != len(dataset.cat_ids):
        raise ValueError(f'the model has {model.text_embed.shape[0]} classes, {ann_file} {len(dataset.cat_ids)}')
    stem = os.path.splitext(os.path.basename(args.ckpt))[0]
    out_dir = args.out_dir or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), f'eval_{stem}')
    metrics = evaluate(model.to(device), dataset, device, out_dir=out_dir, batch_size=args.batch_size,
                       num_workers=args.num_workers, amp=not args.fp32)
    if metrics is not None:
        print(format_metrics(metrics))
        print(f'results and metrics in {out_dir}')
    if distributed:
        dist.destroy_process_group()
    return metrics


if __name__ == '__main__':
    main()
