"""
The embedded default world of RichSem: a generated long-tailed detection world that runs end to end in minutes,
with no download (the role shakespeare_char plays for nanoGPT).

Objects are procedurally drawn shapes x colours x textures (48 classes, e.g. 'red striped star') on cluttered
backgrounds (a noisy colour field, lines, muted blobs that are not objects). Three splits:
    train  LVIS v1 format, long-tailed like LVIS: ~1/4 of the classes rare (1-10 train images),
           ~1/3 common (11-100), the rest frequent (> 100); 1-6 objects of 20-72 px per image, 144-192 px long side.
    val    LVIS v1 format, every class in many images (rare 16, common 20, frequent 28), so APr is stable.
           All images are exhaustively annotated, so neg_category_ids = every class absent from the image.
    extra  Detic's INet-LVIS format: object-centric images with an image-level label only, balanced over classes
           (rare classes get as many as frequent ones: that is what extra data buys), 30% of them with a second,
           smaller, unlabelled object of another class (the paper's "semantic ambiguity").
and a toy CLIP teacher: open_clip with a tiny ModifiedResNet image tower (the RN50 RoIAlign + attention-pool path)
trained contrastively on (extra image or train crop, prompt) pairs, loadable by clip_teacher.ClipTeacher.

Generation is split into layout (which class goes where: cheap, no pixels) and drawing, so statistics can be
checked without rendering. Everything is deterministic from the seed (the teacher up to float non-determinism).

    paths = make_toy_world('data/toy')         # or: python toy.py --root data/toy
    teacher = ClipTeacher('RN50', pretrained=paths['teacher_ckpt'], model_cfg=paths['teacher_cfg'])
Layout on disk: <root>/lvis_v1_{train,val}.json, <root>/images/{train,val}2017/*.jpg,
<root>/inet_lvis/imagenet_lvis_image_info.json + images/<class folder>/*.jpg, <root>/teacher/toy_clip.pt.
"""

import argparse
import copy
import fcntl
import json
import math
import os
import tempfile
import time

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torchvision.ops import roi_align

import data
from clip_teacher import CLIP_MEAN, CLIP_STD, LOGIT_SCALE, PROMPT_TEMPLATES, ClipTeacher, boxes_from_targets

SHAPES = ('circle', 'square', 'triangle', 'star')
COLOURS = {'red': (205, 35, 35), 'green': (35, 160, 55), 'blue': (40, 75, 205), 'yellow': (235, 205, 30)}
TEXTURES = ('plain', 'striped', 'dotted')
# sorted like LVIS (alphabetical names, id = position + 1); the name is the CLIP prompt's noun phrase
CLASS_NAMES = sorted(f'{c} {t} {s}' for s in SHAPES for c in COLOURS for t in TEXTURES)
MAX_CLASSES, MAX_OBJECTS = 5, 6  # distinct classes / objects per train or val image
GAP = 3                          # free pixels between two boxes and to the border: a box stays tight and inside
SIZES = {  # per-class image counts of each group: (low, high) for train, one number for val; teacher schedule
    'default': dict(train_images=1500, r=(1, 10), c=(12, 90), f=(110, 320), val=dict(r=16, c=20, f=28),
                    extra_per_class=16, teacher_steps=1000, teacher_per_class=2),
    'small': dict(train_images=90, r=(1, 2), c=(3, 5), f=(6, 12), val=dict(r=2, c=2, f=2),
                  extra_per_class=2, teacher_steps=2, teacher_per_class=1),
}
# the teacher: a ModifiedResNet (layers as a list) at 64 px, so its attention pool works on a 2 x 2 C5 grid; the
# text tower keeps open_clip's 49408-token vocabulary because ClipTeacher tokenises with the stock BPE tokenizer
TEACHER_CFG = dict(embed_dim=64, vision_cfg=dict(image_size=64, layers=[1, 1, 1, 1], width=16, patch_size=None),
                   text_cfg=dict(context_length=20, vocab_size=49408, width=64, heads=2, layers=2))
EVAL_MARGIN = 1.4       # zero-shot crops: side = 1.4 x the box's long side, the object with a little context
STORE_MARGIN = 3.0      # training crops keep this much context, so random views can zoom out to 2.8 x the box
OBJECT_VIEWS, EXTRA_VIEWS = (1.1 / 3.0, 2.8 / 3.0), (0.6, 1.0)  # window side / stored side of random views
TRAIN_CROPS_PER_CLASS = 60
PAD_RGB = (124, 116, 104)  # ImageNet mean: what zero padding of the normalised batch is in pixels


def frequency_group(image_count):
    """LVIS's rule: rare <= 10 train images, common 11-100, frequent > 100."""
    return 'r' if image_count <= 10 else 'c' if image_count <= 100 else 'f'


# ----------------------------------------------------------------------------------------------- layout (no pixels)

def class_plan(seed, size):
    """The intended group of each class and its number of train images: (groups [C] of 'r'/'c'/'f', targets (C,))."""
    rng = np.random.default_rng([seed, 0])
    C = len(CLASS_NAMES)
    n_r, n_c = round(C / 4), round(C / 3)
    order = rng.permutation(C)
    groups = np.array(['f'] * C)
    groups[order[:n_r]], groups[order[n_r:n_r + n_c]] = 'r', 'c'
    targets = np.zeros(C, dtype=np.int64)
    for c in range(C):
        lo, hi = size[groups[c]]
        # rare: uniform over 1..10 as in LVIS; common and frequent: log-uniform, a Zipf-like tail within the group
        targets[c] = rng.integers(lo, hi + 1) if groups[c] == 'r' else round(math.exp(rng.uniform(*np.log([lo, hi]))))
    return groups, targets


def assign_classes(rng, targets, n_images):
    """
    Which classes each image shows: class c goes to targets[c] distinct images. targets (C,) -> [n_images] lists.
    Images get a capacity of 1-5 classes summing to the demand; big classes are placed first, each image drawn with
    probability proportional to its remaining capacity, so small classes still find room at the end.
    """
    cap = np.ones(n_images, dtype=np.int64)
    left = int(targets.sum()) - n_images
    if left < 0 or left > n_images * (MAX_CLASSES - 1):
        raise ValueError(f'{targets.sum()} class-image pairs do not fit in {n_images} images of 1-{MAX_CLASSES}')
    while left > 0:
        room = np.flatnonzero(cap < MAX_CLASSES)
        pick = rng.choice(room, min(left, len(room)), replace=False)
        cap[pick] += 1
        left -= len(pick)
    members = [[] for _ in range(n_images)]
    for c in np.argsort(-targets, kind='stable'):
        free = np.flatnonzero(cap > 0)
        if len(free) >= targets[c]:
            pick = rng.choice(free, targets[c], replace=False, p=cap[free] / cap[free].sum())
        else:  # capacity ran out in too few images: the emptiest full images take the rest
            full = sorted(np.flatnonzero(cap == 0), key=lambda i: len(members[i]))
            pick = np.concatenate([free, full[:targets[c] - len(free)]]).astype(np.int64)
        cap[pick] = np.maximum(cap[pick] - 1, 0)
        for i in pick:
            members[i].append(int(c))
    return members


def place(rng, classes, w, h, side_range):
    """
    Non-overlapping boxes for the objects of one image, in the given order (rarest first: if the image is too
    crowded, the dropped objects are those of common classes). classes: [n] -> [m <= n] objects
    [class, x0, y0, x1, y1, angle] with integer corners, GAP pixels from each other and from the border.
    """
    objects = []
    for c in classes:
        hi = min(side_range[1], min(w, h) // 2)
        for attempt in range(60):
            if attempt == 30:
                hi = max(side_range[0], hi // 2)  # crowded: try smaller
            side = math.exp(rng.uniform(math.log(side_range[0]), math.log(max(hi, side_range[0]))))
            aspect = math.exp(rng.uniform(-0.25, 0.25))
            bw, bh = max(8, round(side * min(1, aspect))), max(8, round(side * min(1, 1 / aspect)))
            x0, y0 = int(rng.integers(GAP, w - GAP - bw + 1)), int(rng.integers(GAP, h - GAP - bh + 1))
            box = (x0, y0, x0 + bw, y0 + bh)
            if all(box[0] >= o[3] + GAP or box[2] + GAP <= o[1] or box[1] >= o[4] + GAP or box[3] + GAP <= o[2]
                   for o in objects):
                objects.append([int(c), *box, float(rng.uniform(-20, 20))])
                break
    return objects


def image_size(rng, lo, hi):
    """(w, h): long side in [lo, hi], short side 2/3 to 1 of it, either orientation."""
    long = int(rng.integers(lo, hi + 1))
    short = int(round(long * rng.uniform(2 / 3, 1)))
    return (long, short) if rng.random() < 0.5 else (short, long)


def layout_detection(rng, targets, n_images, rarity, prefix):
    """
    One LVIS-format split: targets (C,) images per class; rarity (C,) placement priority (lower = placed first).
    Returns [N] image specs {file_name, width, height, seed, objects [[class, x0, y0, x1, y1, angle]]};
    images left with no object are dropped.
    """
    specs = []
    for i, classes in enumerate(assign_classes(rng, targets, n_images)):
        # a second instance of some classes: LVIS counts both images and instances
        classes = classes + [c for c in classes if rng.random() < 0.2][:MAX_OBJECTS - len(classes)]
        w, h = image_size(rng, 144, 192)
        objects = place(rng, sorted(classes, key=lambda c: rarity[c]), w, h, (20, 72))
        if objects:
            specs.append(dict(file_name=f'{prefix}/{i + 1:012d}.jpg', width=w, height=h,
                              seed=int(rng.integers(2 ** 31)), objects=objects))
    return specs


def layout_world(seed, size):
    """All three splits as specs, without drawing: {'train': [...], 'val': [...], 'extra': [...]}."""
    groups, targets = class_plan(seed, size)
    rng = np.random.default_rng([seed, 1])
    train = layout_detection(rng, targets, size['train_images'], targets, 'train2017')
    val_targets = np.array([size['val'][g] for g in groups])
    val = layout_detection(rng, val_targets, -(-int(val_targets.sum()) // 3), targets, 'val2017')
    extra, C = [], len(CLASS_NAMES)
    labels = rng.permutation(np.repeat(np.arange(C), size['extra_per_class']))
    for i, c in enumerate(labels):
        w, h = image_size(rng, 112, 160)
        side = rng.uniform(0.55, 0.85) * min(w, h)
        bw, bh = round(side), round(side * math.exp(rng.uniform(-0.2, 0.2)))
        bh = min(bh, h - 2 * GAP)
        x0 = int(np.clip((w - bw) / 2 + rng.uniform(-0.1, 0.1) * w, GAP, w - GAP - bw))
        y0 = int(np.clip((h - bh) / 2 + rng.uniform(-0.1, 0.1) * h, GAP, h - GAP - bh))
        objects = [[int(c), x0, y0, x0 + bw, y0 + bh, float(rng.uniform(-20, 20))]]
        if rng.random() < 0.3:  # an unlabelled smaller object in a corner, drawn first so the labelled one stays whole
            other = int((c + rng.integers(1, C)) % C)
            s = max(14, round(side * rng.uniform(0.3, 0.45)))
            ox = GAP if rng.random() < 0.5 else w - GAP - s
            oy = GAP if rng.random() < 0.5 else h - GAP - s
            objects.insert(0, [other, ox, oy, ox + s, oy + s, float(rng.uniform(-20, 20))])
        folder = f'{c + 1:04d}_{CLASS_NAMES[c].replace(" ", "_")}'
        extra.append(dict(file_name=f'{folder}/{folder}_{i + 1:06d}.jpg', width=w, height=h,
                          seed=int(rng.integers(2 ** 31)), objects=objects, label=int(c)))
    return dict(train=train, val=val, extra=extra)


def class_counts(specs):
    """Images and instances per class of a detection split's specs: two (C,) int64 arrays."""
    images, instances = np.zeros(len(CLASS_NAMES), np.int64), np.zeros(len(CLASS_NAMES), np.int64)
    for spec in specs:
        classes = [o[0] for o in spec['objects']]
        np.add.at(instances, classes, 1)
        np.add.at(images, sorted(set(classes)), 1)
    return images, instances


# ----------------------------------------------------------------------------------------------- drawing

def unit_polygon(shape):
    """(k, 2) vertices of the shape around the origin (any scale: the drawing fits them to the box)."""
    if shape == 'circle':
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    elif shape == 'square':
        t = np.pi / 4 + np.arange(4) * np.pi / 2
    elif shape == 'triangle':
        t = -np.pi / 2 + np.arange(3) * 2 * np.pi / 3
    else:  # a five-pointed star: outer and inner (0.45) radius alternate
        t = -np.pi / 2 + np.arange(10) * np.pi / 5
        return np.stack([np.cos(t), np.sin(t)], 1) * np.where(np.arange(10) % 2, 0.45, 1.0)[:, None]
    return np.stack([np.cos(t), np.sin(t)], 1)


def muted(rng):
    """A random colour pulled towards grey: clutter must not look like the saturated object colours."""
    grey = rng.uniform(70, 190)
    return tuple(int(v) for v in grey + (rng.uniform(0, 255, 3) - grey) * 0.35)


def draw_background(rng, w, h):
    """A noisy, smoothly varying colour field with lines and blobs: (h, w, 3) uint8."""
    g = int(rng.integers(3, 6))
    field = np.stack([np.array(muted(rng), np.uint8) for _ in range(g * g)]).reshape(g, g, 3)
    img = Image.fromarray(field).resize((w, h), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 7))):
        cx, cy, rx, ry = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(4, 22), rng.uniform(4, 22)
        draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=muted(rng))
    for _ in range(int(rng.integers(4, 11))):
        draw.line(tuple(rng.uniform(0, [w, h, w, h])), fill=muted(rng), width=int(rng.integers(1, 4)))
    noise = rng.normal(0, 8, (h, w, 3))
    return np.clip(np.asarray(img, np.float64) + noise, 0, 255).astype(np.uint8)


def paint_object(img, rng, cls, x0, y0, x1, y1, angle):
    """
    Draws class cls into img (h, w, 3) uint8, in place, filling the box (x0, y0, x1, y1) (the rotated shape is
    stretched to it). Returns the tight box of the drawn pixels, (x0, y0, x1, y1) ints, x1/y1 exclusive.
    """
    colour, texture, shape = CLASS_NAMES[cls].split()
    bw, bh = x1 - x0, y1 - y0
    a = math.radians(angle)
    pts = unit_polygon(shape) @ np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]])
    pts = (pts - pts.min(0)) / (pts.max(0) - pts.min(0)) * [bw - 1, bh - 1]
    mask_img = Image.new('L', (bw, bh))
    ImageDraw.Draw(mask_img).polygon([tuple(p) for p in pts], fill=255)
    mask = np.asarray(mask_img) > 0
    base = np.clip(np.array(COLOURS[colour]) + rng.normal(0, 12, 3), 0, 255) * rng.uniform(0.8, 1.1)
    pixels = np.broadcast_to(base, (bh, bw, 3)).copy()
    if texture != 'plain':  # dark stripes or dots in a random orientation, period 5-9 px: visible at 64 px
        ys, xs = np.mgrid[0:bh, 0:bw].astype(np.float64)
        t, period = rng.uniform(0, np.pi), rng.uniform(5, 9)
        u, v = xs * math.cos(t) + ys * math.sin(t), -xs * math.sin(t) + ys * math.cos(t)
        if texture == 'striped':
            marks = (u % period) < period / 2
        else:
            marks = ((u % period) - period / 2) ** 2 + ((v % period) - period / 2) ** 2 < (0.3 * period) ** 2
        pixels[marks] *= 0.35
    pixels += rng.normal(0, 4, pixels.shape)
    region = img[y0:y1, x0:x1]
    region[mask] = np.clip(pixels, 0, 255).astype(np.uint8)[mask]
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return x0 + int(cols[0]), y0 + int(rows[0]), x0 + int(cols[-1]) + 1, y0 + int(rows[-1]) + 1


def render(spec):
    """spec -> (image (h, w, 3) uint8, [n] tight boxes xyxy of its objects, in spec order)."""
    rng = np.random.default_rng(spec['seed'])
    img = draw_background(rng, spec['width'], spec['height'])
    return img, [paint_object(img, rng, *obj) for obj in spec['objects']]


# ----------------------------------------------------------------------------------------------- writing

def atomic_write(path, save, mode='w'):
    """save(file) into a temp file renamed to path: a reader never sees half a file, a crash never leaves one."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix='.tmp')
    with os.fdopen(fd, mode) as f:
        save(f)
    os.chmod(tmp, 0o644)  # mkstemp makes files private
    os.replace(tmp, path)


def write_json(path, obj):
    atomic_write(path, lambda f: json.dump(obj, f))


def write_image(path, img):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(img).save(path, quality=90)


def categories(image_counts, instance_counts):
    """LVIS category dicts; frequency follows the train image counts, as LVIS defines it."""
    return [dict(id=c + 1, name=name, synset=f'toy.{name.replace(" ", "_")}.n.01', synonyms=[name],
                 frequency=frequency_group(int(image_counts[c])), image_count=int(image_counts[c]),
                 instance_count=int(instance_counts[c]), **{'def': f'a drawn {name}'})
            for c, name in enumerate(CLASS_NAMES)]


def write_lvis_split(path, image_root, specs, cats, first_id):
    """Draws the images and writes the LVIS v1 json; image ids first_id, first_id + 1, ..."""
    images, annotations, all_ids = [], [], {c['id'] for c in cats}
    for k, spec in enumerate(specs):
        img, boxes = render(spec)
        write_image(os.path.join(image_root, spec['file_name']), img)
        image_id, present = first_id + k, {o[0] + 1 for o in spec['objects']}
        images.append(dict(id=image_id, file_name=spec['file_name'], width=spec['width'], height=spec['height'],
                           coco_url=f'http://toy.invalid/{spec["file_name"]}',
                           # every image is exhaustively annotated: each absent class is a verified negative
                           neg_category_ids=sorted(all_ids - present), not_exhaustive_category_ids=[]))
        for obj, (x0, y0, x1, y1) in zip(spec['objects'], boxes):
            # no masks in this world: area is the box's, the quantity LVISEval also uses for detections
            annotations.append(dict(id=len(annotations) + 1, image_id=image_id, category_id=obj[0] + 1,
                                    bbox=[x0, y0, x1 - x0, y1 - y0], area=(x1 - x0) * (y1 - y0), iscrowd=0))
    write_json(path, dict(info=dict(description='richsem toy world'), licenses=[], images=images,
                          annotations=annotations, categories=cats))


def write_extra(extra_root, specs, train_cats):
    """Draws the extra images and writes Detic's imagenet_lvis_image_info.json (image-level labels only)."""
    images = []
    for k, spec in enumerate(specs):
        write_image(os.path.join(extra_root, 'images', spec['file_name']), render(spec)[0])
        images.append(dict(id=k + 1, file_name=spec['file_name'], pos_category_ids=[spec['label'] + 1],
                           width=spec['width'], height=spec['height']))
    counts = np.bincount([s['label'] for s in specs], minlength=len(CLASS_NAMES))
    cats = [dict(c, image_count=int(counts[c['id'] - 1]), instance_count=int(counts[c['id'] - 1]))
            for c in train_cats]
    write_json(os.path.join(extra_root, 'imagenet_lvis_image_info.json'),
               dict(categories=cats, images=images, annotations=[]))


def world_paths(root):
    return dict(train_json=os.path.join(root, 'lvis_v1_train.json'), val_json=os.path.join(root, 'lvis_v1_val.json'),
                image_root=os.path.join(root, 'images'), extra_root=os.path.join(root, 'inet_lvis'),
                teacher_ckpt=os.path.join(root, 'teacher', 'toy_clip.pt'), teacher_cfg=copy.deepcopy(TEACHER_CFG))


def write_world_data(root, seed, size):
    """Layout + drawing of the three splits under root (no teacher)."""
    paths, specs = world_paths(root), layout_world(seed, size)
    os.makedirs(paths['extra_root'], exist_ok=True)
    cats = categories(*class_counts(specs['train']))
    write_lvis_split(paths['train_json'], paths['image_root'], specs['train'], cats, 1)
    write_lvis_split(paths['val_json'], paths['image_root'], specs['val'], cats, 1_000_001)
    write_extra(paths['extra_root'], specs['extra'], cats)
    return paths


# ----------------------------------------------------------------------------------------------- the toy teacher

def square_crop(img, cx, cy, side, px):
    """The side x side square of PIL img centred on (cx, cy), resized to px: uint8 (px, px, 3). What lies outside
    the image is the ImageNet mean colour, which is what the detector's zero padding looks like to the teacher."""
    side = max(1, round(side))
    canvas = Image.new('RGB', (side, side), PAD_RGB)
    canvas.paste(img, (round(side / 2 - cx), round(side / 2 - cy)))
    return np.asarray(canvas.resize((px, px), Image.BICUBIC))


def object_crops(json_path, image_root, margin, px, per_class=None):
    """
    Square crops of the annotated objects, centred on the box, side = margin x the box's long side, resized to px:
    (uint8 (N, 3, px, px), labels (N,) int64), in annotation order. per_class caps the crops of each class.
    """
    with open(json_path) as f:
        js = json.load(f)
    files = {img['id']: img['file_name'] for img in js['images']}
    crops, labels, taken, cache = [], [], np.zeros(len(CLASS_NAMES), np.int64), {}
    for ann in js['annotations']:
        c = ann['category_id'] - 1
        if per_class is not None and taken[c] >= per_class:
            continue
        taken[c] += 1
        if ann['image_id'] not in cache:  # annotations come grouped by image: keep only the current one
            cache = {ann['image_id']: data.load_rgb(os.path.join(image_root, files[ann['image_id']]))}
        x, y, w, h = ann['bbox']
        crops.append(square_crop(cache[ann['image_id']], x + w / 2, y + h / 2, max(w, h) * margin, px))
        labels.append(c)
    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels)


def extra_images(extra_root, px):
    """The whole extra images, letterboxed to squares of px: (uint8 (N, 3, px, px), labels (N,) int64)."""
    with open(os.path.join(extra_root, 'imagenet_lvis_image_info.json')) as f:
        images = json.load(f)['images']
    pix = [square_crop(data.load_rgb(os.path.join(extra_root, 'images', im['file_name'])),
                       im['width'] / 2, im['height'] / 2, max(im['width'], im['height']), px) for im in images]
    labels = [im['pos_category_ids'][0] - 1 for im in images]
    return torch.from_numpy(np.stack(pix)).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels)


def random_views(pixels, view_range, px):
    """
    Random square windows, resized to px and randomly flipped: the teacher's scale augmentation (the detector
    shows it objects at every size, and CLIP saw objects at every size).
    pixels: uint8 (B, 3, S, S); view_range: (B, 2) smallest and largest window side as a fraction of S.
    Returns float (B, 3, px, px) in [0, 255].
    """
    B, S = len(pixels), pixels.shape[-1]
    lo, hi = view_range.log().unbind(1)
    side = (lo + (hi - lo) * torch.rand(B)).exp() * S  # CPU random numbers only: see make_toy_world
    centre = S / 2 + (torch.rand(B, 2) - 0.5) * 0.2 * side[:, None]
    rois = torch.cat([torch.arange(B)[:, None].float(), centre - side[:, None] / 2, centre + side[:, None] / 2], 1)
    # RoIAlign as a batched crop-and-resize; 2 x 2 samples per output pixel smooth the downscaling
    views = roi_align(pixels.float(), rois.to(pixels.device), px, sampling_ratio=2, aligned=True)
    return torch.where(torch.rand(B, 1, 1, 1).to(pixels.device) < 0.5, views.flip(-1), views)


def clip_normalise(x):
    """(B, 3, H, W) in [0, 255] -> float CLIP-normalised, the input ClipTeacher's renormalisation produces."""
    mean, std = torch.tensor(CLIP_MEAN, device=x.device), torch.tensor(CLIP_STD, device=x.device)
    return (x.float() / 255 - mean.view(3, 1, 1)) / std.view(3, 1, 1)


def soft_cross_entropy(logits, target):
    return -(target * logits.log_softmax(-1)).sum(-1).mean()


def train_teacher(paths, steps, per_class, device, seed):
    """
    Trains the toy CLIP from scratch and saves its state dict to paths['teacher_ckpt'].
    Pairs: (extra image | train object crop, one of ClipTeacher's 81 prompts of its class), so the prompt-averaged
    text embeddings ClipTeacher computes sit where training put the captions. Every batch holds each class
    per_class times (class-balanced: the teacher must know rare classes, which the extra images provide), and
    the InfoNCE loss, both ways, counts every same-class pair as a positive instead of a false negative.
    The logit scale is fixed at LOGIT_SCALE (100), the value ClipTeacher uses, so its soft targets have the
    calibration training gave them (a learnt scale ended near 18 and cost a third of the box-mode accuracy).
    Seeds torch's global CPU generator, and draws only from it.
    """
    torch.manual_seed(seed)
    px = TEACHER_CFG['vision_cfg']['image_size']
    extra, extra_y = extra_images(paths['extra_root'], 2 * px)  # stored at 2 x px: views zoom in without blur
    crops, crops_y = object_crops(paths['train_json'], paths['image_root'], STORE_MARGIN, 2 * px,
                                  TRAIN_CROPS_PER_CLASS)
    pixels, labels = torch.cat([extra, crops]).to(device), torch.cat([extra_y, crops_y])
    view_range = torch.tensor([EXTRA_VIEWS] * len(extra) + [OBJECT_VIEWS] * len(crops))
    by_class = [torch.nonzero(labels == c).flatten() for c in range(len(CLASS_NAMES))]
    model = open_clip.create_model('RN50', pretrained=None, force_quick_gelu=True, **TEACHER_CFG).to(device)
    model.visual.to(memory_format=torch.channels_last)  # about 2x faster convolutions on CPU
    model.logit_scale.data.fill_(math.log(LOGIT_SCALE))
    model.logit_scale.requires_grad_(False)
    tokenizer = open_clip.get_tokenizer('RN50', context_length=model.context_length)
    tokens = tokenizer([t.format(n) for n in CLASS_NAMES for t in PROMPT_TEMPLATES])
    tokens = tokens.view(len(CLASS_NAMES), len(PROMPT_TEMPLATES), -1).to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3, weight_decay=0.05)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    for step in range(steps):
        y = torch.arange(len(CLASS_NAMES)).repeat(per_class)
        idx = torch.stack([by_class[c][torch.randint(len(by_class[c]), ())] for c in y.tolist()])
        x = clip_normalise(random_views(pixels[idx.to(device)], view_range[idx], px))
        x = x.contiguous(memory_format=torch.channels_last)
        text = tokens[y.to(device), torch.randint(len(PROMPT_TEMPLATES), (len(y),)).to(device)]
        img_f = F.normalize(model.encode_image(x), dim=-1)
        txt_f = F.normalize(model.encode_text(text), dim=-1)
        logits = model.logit_scale.exp() * img_f @ txt_f.T
        same = (y[:, None] == y[None]).float().to(device)
        target = same / same.sum(1, keepdim=True)
        loss = (soft_cross_entropy(logits, target) + soft_cross_entropy(logits.T, target)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            print(f'  teacher step {step:4d}/{steps}  loss {loss.item():.3f}', flush=True)
    state = {k: v.cpu() for k, v in model.state_dict().items()}
    atomic_write(paths['teacher_ckpt'], lambda f: torch.save(state, f), 'wb')


@torch.no_grad()
def teacher_accuracy(paths, device='cpu'):
    """
    Zero-shot top-1 accuracy of the toy teacher on the val objects, per train frequency group, two ways:
      'crop': CLIP's own use, each object cropped (EVAL_MARGIN) and resized to the tower's input size;
      'box':  RichSem's use, ClipTeacher.box_logits (RoIAlign on C5 + attention pool) on whole val images at
              their native size.
    Returns {'crop': {'r', 'c', 'f', 'all'}, 'box': {...}} of floats in [0, 1].
    """
    # loaded the way train.py loads any CLIP: ClipTeacher(pretrained=PATH, model_cfg=...)
    teacher = ClipTeacher('RN50', pretrained=paths['teacher_ckpt'], model_cfg=paths['teacher_cfg'],
                          cache_dir=os.path.dirname(paths['teacher_ckpt'])).to(device)
    text = F.normalize(teacher.text_embeddings(CLASS_NAMES).to(device), dim=-1)

    def native(img, boxes, labels, rng):  # the images at their own size
        return img, boxes, labels

    val = data.LvisDetection(paths['val_json'], paths['image_root'], transform=native)
    px = TEACHER_CFG['vision_cfg']['image_size']
    crops, crop_labels = object_crops(paths['val_json'], paths['image_root'], EVAL_MARGIN, px)
    feats = torch.cat([teacher.model.encode_image(clip_normalise(crops[i:i + 256].to(device)))
                       for i in range(0, len(crops), 256)])
    crop_pred = (F.normalize(feats, dim=-1) @ text.T).argmax(1).cpu()
    box_pred, box_labels = [], []
    for i in range(0, len(val), 16):  # the detector's own path: padded batches, box_logits on the C5 map
        images, _, targets = data.collate([val[k] for k in range(i, min(i + 16, len(val)))])
        box_pred += [l.argmax(1).cpu() for l in teacher.box_logits(images.to(device), boxes_from_targets(targets),
                                                                     text)]
        box_labels += [t['labels'] for t in targets]
    group, result = np.array(val.frequency), {}
    for mode, pred, y in (('crop', crop_pred, crop_labels), ('box', torch.cat(box_pred), torch.cat(box_labels))):
        hit, g = (pred == y).numpy(), group[y.numpy()]
        result[mode] = {k: float(hit[g == k].mean()) if (g == k).any() else float('nan') for k in 'rcf'}
        result[mode]['all'] = float(hit.mean())
    return result


# ----------------------------------------------------------------------------------------------- the world

def make_toy_world(root, seed=0, device='cpu', small=None):
    """
    Builds (whatever is missing of) the toy world under root and returns its paths:
    {'train_json', 'val_json', 'image_root', 'extra_root', 'teacher_ckpt', 'teacher_cfg' (dict)}.
    Idempotent: '<root>/world.json' marks finished data and the teacher checkpoint is written atomically, so a
    second call only returns the paths, and one made while another builds waits for it (a lock on <root>/build.lock);
    a root built with another seed or size is an error, not a silent reuse.
    small=True: a tiny world (about 220 images, a 2-step teacher) for tests; None: the size already under root
    (so `train.py --dataset toy --data_path R` uses a small world built by `toy.py --small --root R`), else the
    default. device: where the teacher trains.
    """
    os.makedirs(root, exist_ok=True)
    # runs started side by side on one root: the first builds, the others wait here and then find it built
    with open(os.path.join(root, 'build.lock'), 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        marker = os.path.join(root, 'world.json')
        found = None
        if os.path.exists(marker):
            with open(marker) as f:
                found = json.load(f)
        if small is None:
            small = found is not None and found.get('size') == 'small'
        size_name = 'small' if small else 'default'
        size, paths = SIZES[size_name], world_paths(root)
        stamp = dict(seed=seed, size=size_name)
        if found is not None:
            if found != stamp:
                raise ValueError(f'{root} holds a toy world {found}, not {stamp}: use another root')
        else:
            t = time.time()
            print(f'toy world: drawing {size_name} world (seed {seed}) under {root}', flush=True)
            write_world_data(root, seed, size)
            write_json(marker, stamp)
            print(f'toy world: data done in {time.time() - t:.1f}s', flush=True)
        report = os.path.join(root, 'teacher', 'zero_shot.json')
        if not os.path.exists(paths['teacher_ckpt']) or not os.path.exists(report):
            t = time.time()
            print(f'toy world: training its CLIP teacher ({size["teacher_steps"]} steps on {device})', flush=True)
            # training and loading draw only from torch's CPU generator: forking it leaves the caller's random
            # streams where they were, so a run that builds the teacher first behaves like one that finds it cached
            with torch.random.fork_rng(devices=[]):
                train_teacher(paths, size['teacher_steps'], size['teacher_per_class'], device, seed)
                write_json(report, teacher_accuracy(paths, device))
            print(f'toy world: teacher done in {time.time() - t:.1f}s', flush=True)
    with open(report) as f:
        acc = json.load(f)
    for mode in ('crop', 'box'):
        print(f'toy teacher zero-shot accuracy ({mode}): ' +
              '  '.join(f'{k} {acc[mode][k]:.3f}' for k in ('r', 'c', 'f', 'all')))
    return paths


def summary(paths):
    """Printable lines: images, instances and classes per frequency group of each split."""
    lines = []
    for split, path in (('train', paths['train_json']), ('val', paths['val_json']),
                        ('extra', os.path.join(paths['extra_root'], 'imagenet_lvis_image_info.json'))):
        with open(path) as f:
            js = json.load(f)
        groups = ''.join(c['frequency'] for c in js['categories'])
        lines.append(f'{split:5s}: {len(js["images"])} images, {len(js["annotations"])} boxes; classes r/c/f '
                     f'{groups.count("r")}/{groups.count("c")}/{groups.count("f")}')
    return lines


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description='Build the toy long-tailed detection world and its CLIP teacher.')
    parser.add_argument('--root', default='data/toy')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--small', action='store_true', help='a tiny world for smoke tests')
    args = parser.parse_args()
    start = time.time()
    world = make_toy_world(args.root, args.seed, args.device, args.small or None)
    print('\n'.join(summary(world)))
    print(f'total {time.time() - start:.1f}s')
