"""
Data for RichSem: LVIS v1 detection images, ImageNet-LVIS images as 4-image mosaics of whole-image ("coarse") boxes,
the repeat-factor sampler, and the loader that alternates whole batches between the two sources.

    LVIS:      flip, DETR multi-scale resize / crop (TrainAugment), normalise; repeat-factor sampling (t = 0.001)
    INet-LVIS: each image is one box = the whole image with label pos_category_ids[0]; four images, each augmented
               on its own, are tiled around a random centre of a 1280 x 1280 canvas (pad 114); a tile's box is what
               is visible of it. The mosaic is not resized again.
    Training alternates LVIS and INet-LVIS batches 1:1 (paper Sec. 4: images of a batch come from one dataset);
    an epoch is one pass of the LVIS sampler.

Every sample is (image (3, H, W) float ImageNet-normalised, target dict), the format every module uses:
    'boxes' (n, 4) float32 cxcywh normalised to the augmented size, 'labels' (n,) int64 in [0, C),
    'size' (2,) int64 (h, w) augmented, 'orig_size' (2,) int64 (h, w) original, 'image_id' int,
    'replaced' int: unreadable files swapped for another sample while building this one (summed by train.py,
    since a counter inside a worker process would never reach the main process). Evaluation swaps nothing, as an
    image must keep its id: an unreadable val image comes as a blank one with 'unreadable' True, and gets no
    detections (evaluate.predict).
The training samplers yield (index, key) items and a sample's random draws (flip, scale, crop, mosaic partners) come
from random.Random(key) alone: a resumed run draws what the uninterrupted one would have, whatever the number of
worker processes. A bare index (evaluation, direct use) draws from the process's `random`.
collate() pads a batch to multiples of 32: images (B, 3, H, W), mask (B, H, W) True = padding.
"""

import contextlib
import itertools
import json
import logging
import math
import os
import random
from collections import Counter

import numpy as np
import torch
import torch.distributed as dist
from lvis import LVIS
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

log = logging.getLogger(__name__)

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
TRAIN_SCALES = tuple(range(480, 801, 32))  # short side choices of DETR's multi-scale training
CROP_SCALES = (400, 500, 600)              # short side before the random crop
CROP_SIZE = (384, 600)                     # crop width and height are drawn from this range
MAX_SIZE = 1333
MAX_TRIES = 50                             # consecutive unreadable files before we give up


# ----------------------------------------------------------------------------------------------- images and paths

def load_rgb(path):
    """Decode an image file fully into an RGB PIL image (grayscale, CMYK, palette, alpha all become RGB)."""
    with Image.open(path) as img:
        img.load()  # decode now, so a truncated file raises here (PIL's LOAD_TRUNCATED_IMAGES stays False)
        if img.mode == "P":
            img = img.convert("RGBA")  # palette transparency is only understood through RGBA
        return img.convert("RGB")


def sample_rng(item):
    """A sampler's item -> (index, the sample's RNG): (index, key) -> random.Random(key); index -> `random`."""
    if isinstance(item, tuple):
        return item[0], random.Random(item[1])
    return item, random


def keyed(indices, name, seed, epoch, start, rank, world_size):
    """This rank's shard of a pass, items (index, key) from position `start` on. The key names the sample's place
    in the whole pass (shard position k is place k * world_size + rank), so it does not depend on the world size."""
    return ((i, f"{name}/{seed}/{epoch}/{k * world_size + rank}")
            for k, i in itertools.islice(enumerate(indices), start, None))


def load_image(paths, idx, rng=random, replace=True):
    """
    paths[idx] decoded as RGB. A file that cannot be read is logged and, with replace, swapped for a random other
    index; without, returned as None.
    returns (PIL image or None, index actually used, number of replacements).
    """
    for tries in range(MAX_TRIES):
        try:
            return load_rgb(paths[idx]), idx, tries
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            if not replace:
                log.warning("unreadable image %s (%s): it gets no detections", paths[idx], err)
                return None, idx, 0
            log.warning("unreadable image %s (%s): using another sample", paths[idx], err)
            idx = rng.randrange(len(paths))
    raise RuntimeError(f"{MAX_TRIES} unreadable images in a row, the last {paths[idx]}: is the image folder right?")


def _require(path, kind, what):
    """Fail at construction, naming the path, rather than in a worker process hours later."""
    exists = os.path.isfile(path) if kind == "file" else os.path.isdir(path)
    if not exists:
        raise FileNotFoundError(f"{what}: expected a {kind} at {path}")


def _require_images(paths, what, sample=64):
    """Fail at construction when none of `sample` evenly spaced image files exists (a wrong image root), warn when
    some are missing."""
    picked = [paths[i] for i in np.linspace(0, len(paths) - 1, min(sample, len(paths))).astype(int)]
    missing = [p for p in picked if not os.path.isfile(p)]
    if picked and len(missing) == len(picked):
        raise FileNotFoundError(f"{what}: none of {len(picked)} images checked exists, e.g. {missing[0]}: "
                                "is the image folder right?")
    if missing:
        log.warning("%s: %d of %d images checked are missing, e.g. %s (they will be replaced or get no detections)",
                    what, len(missing), len(picked), missing[0])


def lvis_image_path(img, image_root):
    """LVIS v1 images carry only coco_url (.../train2017/x.jpg) -> root/train2017/x.jpg; a json with file_name
    (e.g. a flat folder of a subset) -> root/file_name."""
    if "file_name" in img:
        return os.path.join(image_root, img["file_name"])
    split, name = img["coco_url"].split("/")[-2:]
    return os.path.join(image_root, split, name)


def to_normalised(img, boxes):
    """
    img: PIL RGB (h, w) or uint8 (h, w, 3) array; boxes: (n, 4) xyxy absolute pixels
    returns image (3, h, w) float32 ImageNet-normalised, boxes (n, 4) float32 cxcywh in [0, 1]
    """
    x = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1).float().div_(255)
    h, w = x.shape[1:]
    x0, y0, x1, y1 = boxes.float().unbind(-1)
    cxcywh = torch.stack([(x0 + x1) / 2 / w, (y0 + y1) / 2 / h, (x1 - x0) / w, (y1 - y0) / h], -1)
    return (x - MEAN) / STD, cxcywh


# ----------------------------------------------------------------------------------------------- augmentation

def hflip(img, boxes):
    """img: PIL (h, w); boxes (n, 4) xyxy abs -> mirrored image and boxes."""
    w = img.width
    flipped = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], -1)
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT), flipped


def resize(img, boxes, short, max_size=None):
    """Scale so the short side is `short`, unless the long side would then pass max_size (then long = max_size).
    boxes (n, 4) xyxy abs are scaled by the exact per-axis ratio of the rounded output size. Both sides are rounded
    from the exact scale (DETR truncates the long side instead: up to 2 px apart, and never above max_size here)."""
    w, h = img.size
    scale = short / min(w, h)
    if max_size is not None and max(w, h) * scale > max_size:
        scale = max_size / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    boxes = boxes * torch.tensor([nw / w, nh / h, nw / w, nh / h])
    # float32 rounding can push a border box a hair outside the image
    boxes = torch.minimum(boxes, torch.tensor([nw, nh, nw, nh], dtype=boxes.dtype))
    return img.resize((nw, nh), Image.BILINEAR), boxes


def random_crop(img, boxes, labels, size_range, rng=random):
    """Crop a random window with width and height drawn from size_range (capped at the image); boxes are
    shifted and clipped to the window and those left with zero area are dropped with their labels."""
    w, h = img.size
    cw = rng.randint(min(size_range[0], w), min(size_range[1], w))
    ch = rng.randint(min(size_range[0], h), min(size_range[1], h))
    x0, y0 = rng.randint(0, w - cw), rng.randint(0, h - ch)
    boxes = boxes - torch.tensor([x0, y0, x0, y0], dtype=boxes.dtype)
    boxes = torch.stack([boxes[:, 0].clamp(0, cw), boxes[:, 1].clamp(0, ch),
                         boxes[:, 2].clamp(0, cw), boxes[:, 3].clamp(0, ch)], -1)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return img.crop((x0, y0, x0 + cw, y0 + ch)), boxes[keep], labels[keep]


class TrainAugment:
    """DETR training augmentation: horizontal flip (p 0.5), then with p 0.5 a multi-scale resize, else a resize to
    one of crop_scales, a random crop of crop_size, and the same multi-scale resize."""

    def __init__(self, scales=TRAIN_SCALES, max_size=MAX_SIZE, crop_scales=CROP_SCALES, crop_size=CROP_SIZE):
        self.scales, self.max_size, self.crop_scales, self.crop_size = scales, max_size, crop_scales, crop_size

    def __call__(self, img, boxes, labels, rng=random):
        """img: PIL RGB; boxes (n, 4) float xyxy abs; labels (n,); rng: the sample's -> the same three, augmented."""
        if rng.random() < 0.5:
            img, boxes = hflip(img, boxes)
        if rng.random() < 0.5:
            img, boxes = resize(img, boxes, rng.choice(self.scales), self.max_size)
        else:
            img, boxes = resize(img, boxes, rng.choice(self.crop_scales))
            img, boxes, labels = random_crop(img, boxes, labels, self.crop_size, rng)
            img, boxes = resize(img, boxes, rng.choice(self.scales), self.max_size)
        return img, boxes, labels


class EvalResize:
    """Evaluation: short side `size`, long side at most max_size."""

    def __init__(self, size=800, max_size=MAX_SIZE):
        self.size, self.max_size = size, max_size

    def __call__(self, img, boxes, labels, rng=None):
        img, boxes = resize(img, boxes, self.size, self.max_size)
        return img, boxes, labels


# ----------------------------------------------------------------------------------------------- LVIS

class LvisDetection(Dataset):
    """
    LVIS v1 (or any json in its format) loaded through the lvis package. Class c = position of the category in the
    sorted id list (id - 1 for LVIS v1). Crowd boxes and boxes with no area after clipping to the image are
    dropped; images without boxes are kept (as in the official code: they still teach "background").
    Attributes: cat_ids (C,) LVIS ids in class order, class_names [C] raw LVIS names, class_image_counts (C,) int64,
    frequency [C] of 'r' / 'c' / 'f', image_ids (N,) int64 sorted.
    replace_unreadable: swap an unreadable image for another (training), else keep its id, blank (evaluation).
    """

    def __init__(self, ann_file, image_root, transform, replace_unreadable=True):
        _require(ann_file, "file", "LVIS annotation json")
        _require(image_root, "dir", "LVIS image folder")
        self.ann_file, self.transform, self.replace_unreadable = ann_file, transform, replace_unreadable
        try:  # a missing field or a bad value would otherwise surface as a bare KeyError deep in here
            self._index(LVIS(ann_file), image_root)
        except (KeyError, IndexError, TypeError, ValueError, AssertionError) as err:  # JSONDecodeError: ValueError
            raise ValueError(f"{ann_file}: malformed LVIS annotations ({type(err).__name__}: {err})") from err

    def _index(self, api, image_root):
        """The attributes of the docstring and the flat box arrays, from the lvis API object."""
        self.cat_ids = sorted(api.cats)
        cats = [api.cats[c] for c in self.cat_ids]
        self.class_names = [c["name"] for c in cats]
        self.class_image_counts = torch.tensor([c["image_count"] for c in cats], dtype=torch.int64)
        self.frequency = [c["frequency"] for c in cats]
        index = {c: i for i, c in enumerate(self.cat_ids)}

        images = [api.imgs[i] for i in sorted(api.imgs)]
        self.image_ids = np.array([img["id"] for img in images], dtype=np.int64)
        paths = [lvis_image_path(img, image_root) for img in images]
        for folder in sorted({os.path.dirname(p) for p in paths}):
            _require(folder, "dir", f"folder of the images of {self.ann_file}")
        # One flat array per field instead of per-image python objects: worker processes read them without
        # touching reference counts, so copy-on-write pages stay shared (a 100k-image list of dicts would not).
        self.paths = np.array(paths)
        self.sizes = np.array([[img["width"], img["height"]] for img in images], dtype=np.float32)  # (N, 2) w, h
        boxes, labels, counts = [], [], []
        for img in images:
            b, l = self._clean_boxes(api.img_ann_map[img["id"]], img["width"], img["height"], index)
            boxes.append(b)
            labels.append(l)
            counts.append(len(l))
        self.boxes = np.concatenate(boxes).reshape(-1, 4).astype(np.float32)
        self.labels = np.concatenate(labels).astype(np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        _require_images(paths, f"images of {self.ann_file}")  # after the json's own errors

    @staticmethod
    def _clean_boxes(anns, w, h, index):
        """anns: LVIS dicts with bbox xywh -> boxes (n, 4) xyxy clipped to (w, h), labels (n,); crowd and empty gone."""
        anns = [a for a in anns if not a.get("iscrowd", 0)]
        for a in anns:
            if len(a["bbox"]) != 4:
                raise ValueError(f"annotation {a.get('id')}: bbox {a['bbox']} is not [x, y, w, h]")
            if a["category_id"] not in index:
                raise ValueError(f"annotation {a.get('id')}: category_id {a['category_id']} is not a category")
        xywh = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
        xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
        xyxy[:, 0::2] = xyxy[:, 0::2].clip(0, w)
        xyxy[:, 1::2] = xyxy[:, 1::2].clip(0, h)
        keep = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
        labels = np.array([index[a["category_id"]] for a in anns], dtype=np.int64)
        return xyxy[keep], labels[keep]

    def __len__(self):
        return len(self.image_ids)

    def image_classes(self):
        """The set of classes in each image, [N] int64 arrays: what repeat-factor sampling needs."""
        return [np.unique(self.labels[a:b]) for a, b in zip(self.offsets[:-1], self.offsets[1:])]

    def __getitem__(self, item):
        """item: index or (index, key) -> image (3, h, w) normalised, target dict (boxes cxcywh normalised to
        (h, w))."""
        idx, rng = sample_rng(item)
        img, idx, replaced = load_image(self.paths, idx, rng, self.replace_unreadable)
        a, b = self.offsets[idx], self.offsets[idx + 1]
        boxes, labels = torch.from_numpy(self.boxes[a:b]), torch.from_numpy(self.labels[a:b])
        jw, jh = self.sizes[idx]
        unreadable = img is None
        if unreadable:
            img = Image.new("RGB", (int(jw), int(jh)))
        if (img.width, img.height) != (jw, jh):  # a re-encoded copy: boxes live in the json's (width, height) frame
            boxes = boxes * torch.tensor([img.width / jw, img.height / jh] * 2)
        orig_size = torch.tensor([int(jh), int(jw)])  # predictions are scored against the json's frame
        img, boxes, labels = self.transform(img, boxes, labels, rng)
        image, boxes = to_normalised(img, boxes)
        return image, {"boxes": boxes, "labels": labels, "size": torch.tensor(image.shape[1:]),
                       "orig_size": orig_size, "image_id": int(self.image_ids[idx]), "replaced": replaced,
                       "unreadable": unreadable}


def build_lvis(ann_file, image_root, train, scales=TRAIN_SCALES, max_size=MAX_SIZE, crop_scales=CROP_SCALES,
               crop_size=CROP_SIZE, eval_size=800):
    """LVIS dataset with the training augmentation (train=True) or the evaluation resize (eval_size, max_size)."""
    transform = TrainAugment(scales, max_size, crop_scales, crop_size) if train else EvalResize(eval_size, max_size)
    return LvisDetection(ann_file, image_root, transform, replace_unreadable=train)


# ----------------------------------------------------------------------------------------------- INet-LVIS mosaic

class InetLvisMosaic(Dataset):
    """
    ImageNet-LVIS in Detic's format: <root>/imagenet_lvis_image_info.json, images under <root>/images/<file_name>.
    Sample idx = a mosaic of image idx (top left) and three uniformly drawn others (top right, bottom left,
    bottom right). Each tile is augmented on its own (flip + multi-scale / crop), scaled by min(S/2 / h, S/2 / w),
    and placed with its inner corner at a centre (cx, cy) = (int(U(0.5, 1.5) * S/2), int(U(0.5, 1.5) * S/2)) of an
    S x S canvas filled with pad_value; whatever leaves the canvas is cut. Box of a tile = its visible rectangle,
    label = class of the image's pos_category_ids[0] in cat_ids (the LVIS class order).
    """

    def __init__(self, root, cat_ids, augment, canvas=1280, pad_value=114):
        ann_file = os.path.join(root, "imagenet_lvis_image_info.json")
        _require(ann_file, "file", "INet-LVIS image-info json (Detic's imagenet_lvis_image_info.json)")
        _require(os.path.join(root, "images"), "dir", "INet-LVIS image folder")
        try:
            with open(ann_file) as f:
                images = sorted(json.load(f)["images"], key=lambda img: img["id"])
            ids = [img["id"] for img in images]
            first = [img["pos_category_ids"][0] for img in images]  # the image's label (Detic's format)
            names = [img["file_name"] for img in images]
        except (KeyError, IndexError, TypeError, ValueError) as err:  # JSONDecodeError is a ValueError
            raise ValueError(f"{ann_file}: malformed INet-LVIS image info ({type(err).__name__}: {err})") from err
        index = {c: i for i, c in enumerate(cat_ids)}
        unknown = set(first) - set(index)
        if unknown:
            raise ValueError(f"{ann_file}: category ids {sorted(unknown)[:10]} are not in the LVIS class list")
        self.augment, self.canvas, self.pad_value = augment, canvas, pad_value
        self.image_ids = np.array(ids, dtype=np.int64)
        self.labels = np.array([index[c] for c in first], dtype=np.int64)
        self.paths = np.array([os.path.join(root, "images", n) for n in names])
        for folder in sorted({os.path.dirname(p) for p in self.paths}):
            _require(folder, "dir", f"folder of the images of {ann_file}")
        _require_images(self.paths, f"images of {ann_file}")

    def __len__(self):
        return len(self.image_ids)

    def _tile(self, idx, rng):
        """One augmented image with its whole-image box: (PIL image, box (1, 4) xyxy abs, label (1,), replaced)."""
        img, idx, replaced = load_image(self.paths, idx, rng)
        box = torch.tensor([[0.0, 0.0, img.width, img.height]])
        # the augmentation never drops this box: a crop lies inside the image, so the box becomes the whole crop
        img, box, label = self.augment(img, box, torch.from_numpy(self.labels[idx:idx + 1]), rng)
        return img, box, label, replaced

    def __getitem__(self, item):
        """item: index or (index, key) -> image (3, S, S) normalised, target with 4 boxes (cxcywh normalised to S)
        and their labels."""
        idx, rng = sample_rng(item)
        S, half = self.canvas, self.canvas / 2
        canvas = np.full((S, S, 3), self.pad_value, dtype=np.uint8)
        cx, cy = int(rng.uniform(0.5, 1.5) * half), int(rng.uniform(0.5, 1.5) * half)
        others = [rng.randrange(len(self)) for _ in range(3)]  # uniform over the set, duplicates allowed
        boxes, labels, replaced = [], [], 0
        for corner, i in enumerate([idx] + others):  # 0 top left, 1 top right, 2 bottom left, 3 bottom right
            img, box, label, n = self._tile(i, rng)
            r = min(half / img.height, half / img.width)
            tw, th = max(1, int(img.width * r)), max(1, int(img.height * r))
            box = box * torch.tensor([tw / img.width, th / img.height] * 2)  # exact ratios: the box is the tile
            img = img.resize((tw, th), Image.BILINEAR)
            x0 = cx - tw if corner in (0, 2) else cx  # the tile's corner nearest the centre sits on the centre
            y0 = cy - th if corner in (0, 1) else cy
            vx0, vy0, vx1, vy1 = max(x0, 0), max(y0, 0), min(x0 + tw, S), min(y0 + th, S)
            canvas[vy0:vy1, vx0:vx1] = np.asarray(img)[vy0 - y0:vy1 - y0, vx0 - x0:vx1 - x0]
            boxes.append((box + torch.tensor([x0, y0, x0, y0])).clamp(0, S))
            labels.append(label)
            replaced += n
        # the centre lies in [S/4, 3S/4), so each tile keeps a visible area: no box can vanish here
        image, boxes = to_normalised(canvas, torch.cat(boxes))
        return image, {"boxes": boxes, "labels": torch.cat(labels), "size": torch.tensor([S, S]),
                       "orig_size": torch.tensor([S, S]), "image_id": int(self.image_ids[idx]), "replaced": replaced}


# ------------------------------------------------------------------------------------- ranks and sampling

def _rank_world(rank, world_size):
    """Explicit values win; else torch.distributed's, else a single process."""
    on = dist.is_available() and dist.is_initialized()
    rank = rank if rank is not None else (dist.get_rank() if on else 0)
    world_size = world_size if world_size is not None else (dist.get_world_size() if on else 1)
    return rank, world_size


@contextlib.contextmanager
def rank_zero_first(ddp, rank):
    """Rank 0 runs the block first (downloads, data generation, the text-embedding cache); the others then run it
    and find its results on disk instead of all doing the work at once."""
    if ddp and rank != 0:
        dist.barrier()
    yield
    if ddp and rank == 0:
        dist.barrier()


def repeat_factors(image_classes, thresh=0.001):
    """
    LVIS repeat-factor sampling (Gupta et al. 2019): f(c) = fraction of images containing class c,
    r(c) = max(1, sqrt(thresh / f(c))), r(image) = max over its classes (1 for an image without boxes).
    image_classes: [N] sequences of class indices -> (N,) float64.
    """
    n = len(image_classes)
    images_with = Counter(c for classes in image_classes for c in set(int(c) for c in classes))
    r_class = {c: max(1.0, math.sqrt(thresh / (k / n))) for c, k in images_with.items()}
    return torch.tensor([max((r_class[int(c)] for c in classes), default=1.0) for classes in image_classes],
                        dtype=torch.float64)


class RepeatFactorSampler(Sampler):
    """
    Each epoch: image i appears floor(r_i) times plus once more with probability frac(r_i) (stochastic rounding),
    the list is shuffled and padded by its own head (cycled) to a multiple of world_size; rank takes [rank::world_size].
    The generator is seeded with seed + epoch, so every rank (same seed!) builds the same list and the shards are
    disjoint. len() is this epoch's shard length (computed on demand, so it is right before iteration starts).
    Yields (index, key) items (see keyed). skip: items to leave out at the start of the next pass only (resuming
    mid-epoch without reading images).
    """

    def __init__(self, image_classes, thresh=0.001, seed=0, rank=None, world_size=None):
        self.factors = repeat_factors(image_classes, thresh)
        self.seed, self.epoch, self.skip = seed, 0, 0
        self.rank, self.world_size = _rank_world(rank, world_size)
        self._cache = None

    def set_epoch(self, epoch):
        self.epoch = epoch

    def _shard(self):
        """This rank's indices for the current epoch, [len] ints."""
        if self._cache is None or self._cache[0] != self.epoch:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            whole = self.factors.floor()
            reps = whole + (torch.rand(len(self.factors), generator=g, dtype=torch.float64) < self.factors - whole)
            indices = torch.repeat_interleave(torch.arange(len(self.factors)), reps.long())
            indices = indices[torch.randperm(len(indices), generator=g)]
            pad = -len(indices) % self.world_size  # cycled: with fewer items than ranks, each still gets one
            indices = torch.cat([indices, indices.repeat(math.ceil(pad / max(len(indices), 1)))[:pad]])
            self._cache = (self.epoch, indices[self.rank::self.world_size].tolist())
        return self._cache[1]

    def __iter__(self):
        start, self.skip = self.skip, 0
        return keyed(self._shard(), "lvis", self.seed, self.epoch, start, self.rank, self.world_size)

    def __len__(self):
        return len(self._shard())

    def state_dict(self):
        return {"seed": self.seed, "epoch": self.epoch}

    def load_state_dict(self, state):
        self.seed, self.epoch = state["seed"], state["epoch"]


class ExtraSampler(DistributedSampler):
    """Shuffling distributed sampler for the mosaics, reshuffled at every pass (MixedLoader advances its epoch; the
    official code never did, so each pass repeated the same order). Items and skip as RepeatFactorSampler's."""

    def __init__(self, dataset, seed=0, rank=None, world_size=None):
        rank, world_size = _rank_world(rank, world_size)
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
        self.skip = 0

    def __iter__(self):
        start, self.skip = self.skip, 0
        return keyed(super().__iter__(), "extra", self.seed, self.epoch, start, self.rank, self.num_replicas)


# ----------------------------------------------------------------------------------------------- batching

def collate(batch):
    """
    batch: [B] (image (3, h_i, w_i), target) -> images (B, 3, H, W) zero-padded bottom/right with H, W the
    largest h_i, w_i rounded up to a multiple of 32; mask (B, H, W) bool, True = padding; targets [B].
    """
    images, targets = zip(*batch)
    H = -(-max(img.shape[1] for img in images) // 32) * 32
    W = -(-max(img.shape[2] for img in images) // 32) * 32
    out = images[0].new_zeros(len(images), 3, H, W)
    mask = torch.ones(len(images), H, W, dtype=torch.bool)
    for k, img in enumerate(images):
        out[k, :, :img.shape[1], :img.shape[2]] = img
        mask[k, :img.shape[1], :img.shape[2]] = False
    return out, mask, list(targets)


def train_loader(dataset, sampler, batch_size, num_workers, seed=0):
    """Training loader: drop_last keeps every rank at the same number of steps (the samplers give equal shards).
    The augmentation draws from the samplers' keys; the loader's own generator (seed) only keeps the workers' seeds
    off torch's global RNG, which DN noise and the federated classes draw from."""
    return DataLoader(dataset, batch_size, sampler=sampler, drop_last=True, collate_fn=collate,
                      num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                      persistent_workers=num_workers > 0, generator=torch.Generator().manual_seed(seed))


def eval_loader(dataset, batch_size, num_workers, rank=None, world_size=None):
    """Evaluation loader over images [rank::world_size], in order, without the duplicates a padded sampler adds
    (they would be counted twice by the evaluator)."""
    rank, world_size = _rank_world(rank, world_size)
    return DataLoader(dataset, batch_size, sampler=list(range(rank, len(dataset), world_size)), collate_fn=collate,
                      num_workers=num_workers, pin_memory=torch.cuda.is_available())


def lvis_batches(position, ratio):
    """LVIS batches among the first `position` of an epoch of MixedLoader's pattern ratio = (a, b)."""
    a, b = ratio
    return position // (a + b) * a + min(position % (a + b), a)


class MixedLoader:
    """
    One epoch = one pass of the LVIS loader, interleaved with extra batches: ratio = (a, b) means a LVIS batches,
    then b extra batches, and again. The pattern is fixed, so every rank is on the same source at the same step.
    The extra loader runs on across LVIS epochs and is restarted, with its sampler's next epoch, when exhausted.
    extra_loader=None gives LVIS-only training (the baseline). Yields (images, mask, targets, source), source in
    {'lvis', 'extra'}; images (B, 3, H, W), mask (B, H, W).

    The state (epoch, batches of it yielded, extra pass, batches of it yielded) is exact at any step: a resumed run
    goes on with the next batch of both sources, skipping sampler indices rather than reading the images again.
    Resumed on another number of GPUs (or batch size), it goes on after the images the old run took, counted over all
    ranks (a pass's order and each sample's draws do not depend on the world size); the images of the last
    incomplete new batch are seen twice rather than skipped.
    """

    def __init__(self, lvis_loader, extra_loader=None, ratio=(1, 1)):
        self.lvis, self.extra = lvis_loader, extra_loader
        self.ratio = ratio if extra_loader is not None else (1, 0)
        self.epoch, self.position = 0, 0           # LVIS epoch, batches of it yielded
        self.extra_epoch, self.extra_done = 0, 0   # extra pass, batches of it yielded
        self._extra_iter = None

    def set_epoch(self, epoch):
        if epoch != self.epoch:  # the same epoch again is a resumed one: keep its position
            self.epoch, self.position = epoch, 0
        self.lvis.sampler.set_epoch(epoch)

    def __len__(self):
        n = len(self.lvis)
        return n + n // self.ratio[0] * self.ratio[1]

    def images_per_step(self):
        """(LVIS, extra) images that one batch of each source takes over all ranks: batch size x world size."""
        extra = 0 if self.extra is None else self.extra.batch_size * self.extra.sampler.num_replicas
        return self.lvis.batch_size * self.lvis.sampler.world_size, extra

    def __iter__(self):
        a, b = self.ratio
        lvis_done = lvis_batches(self.position, self.ratio)
        self.lvis.sampler.skip = lvis_done * self.lvis.batch_size
        lvis_iter = iter(self.lvis)
        while True:
            if self.position % (a + b) < a:
                batch = next(lvis_iter, None)
                if batch is None:  # the LVIS pass is the epoch
                    return
                source = "lvis"
            else:
                batch, source = self._next_extra(), "extra"
            self.position += 1
            yield (*batch, source)

    def _next_extra(self):
        """The next extra batch, starting a new pass (next sampler epoch) when the current one is done."""
        for _ in range(2):  # at most one new pass: a pass resumed at its very end has nothing left
            if self._extra_iter is None:
                self.extra.sampler.set_epoch(self.extra_epoch)
                self.extra.sampler.skip = self.extra_done * self.extra.batch_size  # > 0 only right after a resume
                self._extra_iter = iter(self.extra)
            batch = next(self._extra_iter, None)
            if batch is not None:
                self.extra_done += 1
                return batch
            self._extra_iter, self.extra_epoch, self.extra_done = None, self.extra_epoch + 1, 0
        raise RuntimeError("the extra loader yields no batch (fewer images than batch_size x world_size?)")

    def state_dict(self):
        return {"epoch": self.epoch, "position": self.position, "extra_epoch": self.extra_epoch,
                "extra_done": self.extra_done, "images_per_step": self.images_per_step(), "ratio": self.ratio}

    def load_state_dict(self, state):
        self.epoch, self.position = state["epoch"], state["position"]
        self.extra_epoch, self.extra_done, self._extra_iter = state["extra_epoch"], state["extra_done"], None
        new = self.images_per_step()
        old = state.get("images_per_step", new)
        old_ratio = tuple(state.get("ratio", self.ratio))  # another pattern: --no_extra toggled
        if old[0] != new[0] or old_ratio != self.ratio:
            # the LVIS batches the old run took, in its own pattern, as whole new batches after its images
            a, b = self.ratio
            lvis_done = lvis_batches(self.position, old_ratio) * old[0] // new[0]
            self.position = lvis_done // a * (a + b) + lvis_done % a
        if self.extra is not None and old[1] != new[1]:
            self.extra_done = self.extra_done * old[1] // new[1]
        self.lvis.sampler.set_epoch(self.epoch)
