"""
The frozen CLIP teacher of RichSem (paper Sec. 3.1, Eq. 1-2; MengLcool/RichSem models/richsem/richsem.py:CLIPAlign).

For every box b of an image I it gives "rich semantics" s = 100 * cos(Pool(V(I), b), t_c) over the C classes,
the target of the semantic branch's KL loss:
  - V is CLIP's ModifiedResNet image tower run up to layer4 (C5, stride 32) on the detector's own padded batch,
    re-normalised to CLIP's mean/std and NOT resized (CLIP sees ~800x1333 LVIS images and 1280x1280 mosaics);
  - Pool is RoIAlign to the grid CLIP's attention pool was trained on (7x7 for RN50) followed by that attention
    pool, so a box is embedded exactly the way CLIP embeds a whole 224x224 image;
  - t_c is the text embedding of class c, the un-normalised mean over 81 prompts (official recipe).
Also here: the taxonomy mappings of Eq. 6 (file or nearest text embedding) and the hard labels of Eq. 7.

    teacher = ClipTeacher('RN50', pretrained='openai').cuda()
    text_embed = teacher.text_embeddings(class_names)                                  # (C, E)
    logits = teacher.box_logits(images, boxes_from_targets(targets), text_embed)      # list of (n_i, C)
"""

import hashlib
import json
import os
import tempfile

import open_clip
import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
from torch import nn
from torchvision.ops import roi_align

from losses import box_cxcywh_to_xyxy

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
# the official prompt list: the bare name, then OpenAI's 80 ImageNet templates (as '{}' format strings)
PROMPT_TEMPLATES = ('{}.',) + tuple(t('{}') for t in OPENAI_IMAGENET_TEMPLATES)
LOGIT_SCALE = 100.0  # exp(logit_scale) of the OpenAI checkpoints; fixed so a random-init tower behaves the same
TEXT_CHUNK = 512     # class names per encode_text call (the templates go one at a time)


class ClipTeacher(nn.Module):
    """Frozen CLIP (ModifiedResNet) that scores boxes against class-name text embeddings."""

    def __init__(self, model_name='RN50', pretrained='openai', cache_dir=None, model_cfg=None):
        """
        model_name: an open_clip ResNet config name: 'RN50', 'RN101', 'RN50x4', 'RN50x16', 'RN50x64'.
        pretrained: 'openai' (open_clip downloads the OpenAI weights), a local checkpoint path, or None (random).
        cache_dir: where text embeddings are cached (default ~/.cache/richsem).
        model_cfg: optional dict of open_clip config entries ('embed_dim', 'vision_cfg', 'text_cfg') that replace
            those of model_name's config; this is how tests and toy runs build a tiny tower.
        """
        super().__init__()
        # every released CLIP ResNet (OpenAI, yfcc15m, cc12m) was trained with QuickGELU in its text tower;
        # open_clip's plain 'RN50' config uses nn.GELU and would silently give wrong text embeddings
        self.model = open_clip.create_model(model_name, pretrained=pretrained, force_quick_gelu=True,
                                            **(model_cfg or {}))
        visual = self.model.visual
        if not isinstance(visual, ModifiedResNet):
            raise ValueError(f'{model_name}: the teacher needs a CLIP ResNet (ModifiedResNet) image tower, got '
                             f'{type(visual).__name__}; RichSem RoIAligns boxes on its stride-32 C5 map and reuses '
                             f'its attention pool, which a ViT tower does not have')
        self.model_name = model_name
        self.cache_dir = os.path.expanduser(cache_dir or '~/.cache/richsem')
        self.tokenizer = open_clip.get_tokenizer(model_name, context_length=self.model.context_length)
        # the attention pool's positional embedding fixes the grid it was trained on: image_size // 32 per side
        self.grid = round((visual.attnpool.positional_embedding.shape[0] - 1) ** 0.5)
        # ImageNet-normalised -> CLIP-normalised is one affine map per channel: x * scale + shift
        in_mean, in_std, clip_mean, clip_std = (torch.tensor(v).view(3, 1, 1)
                                                for v in (IMAGENET_MEAN, IMAGENET_STD, CLIP_MEAN, CLIP_STD))
        self.register_buffer('renorm_scale', in_std / clip_std, persistent=False)
        self.register_buffer('renorm_shift', (in_mean - clip_mean) / clip_std, persistent=False)
        self.requires_grad_(False)
        visual.to(memory_format=torch.channels_last)  # faster convs (cuDNN NHWC); .to(device) keeps the layout
        self.eval()

    def train(self, mode=True):
        """Stay in eval mode whatever the parent asks: BatchNorm statistics of the teacher must not move."""
        return super().train(False)

    # ---- text side ----

    def weights_fingerprint(self):
        """Short hash of a few text-tower tensors: identifies the weights (openai, a file, a random seed)."""
        h = hashlib.sha1(self.model_name.encode())
        m = self.model
        for t in (m.text_projection, m.positional_embedding, m.token_embedding.weight[:256]):
            h.update(t.detach().float().cpu().numpy().tobytes())
        return h.hexdigest()

    @torch.no_grad()
    def encode_names(self, class_names):
        """class_names: list of C strings -> (C, E) float32, mean over PROMPT_TEMPLATES of un-normalised encode_text."""
        device = self.renorm_scale.device
        total = torch.zeros(len(class_names), self.model.text_projection.shape[1], device=device)
        for template in PROMPT_TEMPLATES:
            prompts = [template.format(name) for name in class_names]
            for i in range(0, len(prompts), TEXT_CHUNK):
                tokens = self.tokenizer(prompts[i:i + TEXT_CHUNK]).to(device)
                total[i:i + TEXT_CHUNK] += self.model.encode_text(tokens).float()
        return total / len(PROMPT_TEMPLATES)

    def text_embeddings(self, class_names):
        """
        class_names: list of C raw names (e.g. LVIS 'name' fields, underscores and all) ->
        (C, E) float32 on CPU, un-normalised (normalise at use). Cached on disk: the file name hashes the model,
        its weights, the templates and the exact name list, so any change recomputes.
        """
        key = json.dumps([self.model_name, self.weights_fingerprint(), PROMPT_TEMPLATES, list(class_names)])
        path = os.path.join(self.cache_dir, f'text_{self.model_name}_{hashlib.sha1(key.encode()).hexdigest()}.pt')
        if os.path.exists(path):
            return torch.load(path, map_location='cpu', weights_only=True)
        embed = self.encode_names(class_names).cpu()
        os.makedirs(self.cache_dir, exist_ok=True)
        # temp file + rename: concurrent ranks or a crash never leave a half-written cache behind
        fd, tmp = tempfile.mkstemp(dir=self.cache_dir, suffix='.tmp')
        with os.fdopen(fd, 'wb') as f:
            torch.save(embed, f)
        os.replace(tmp, path)
        return embed

    # ---- image side ----

    def compile_blocks(self):
        """torch.compile the image tower in place (train.py --compile on GPUs): its batch-norms and ReLUs fuse, which
        matters once the detector's own step is compiled and no longer hides the teacher's kernels in launch gaps."""
        self.c5_features = torch.compile(self.c5_features)

    def c5_features(self, x):
        """x: (B, 3, H, W) CLIP-normalised -> (B, width*32, H/32, W/32), the tower up to layer4 (no pooling)."""
        v = self.model.visual
        return v.layer4(v.layer3(v.layer2(v.layer1(v.stem(x)))))

    @torch.no_grad()  # not inference_mode: the logits become loss targets, and inference tensors can't be saved
    def box_logits(self, images, boxes, text_embed, amp=True):
        """
        images: (B, 3, H, W) the detector's ImageNet-normalised, zero-padded batch (H, W multiples of 32).
        boxes: list of B tensors (n_i, 4) xyxy in absolute pixels of the padded frame (= unpadded pixels, since
            images are top-left aligned); n_i may be 0.
        text_embed: (C, E) class text embeddings (normalised here).
        amp: the tower in bf16 on the GPU (train.py --fp32 turns it off).
        Returns a list of B float32 tensors (n_i, C): 100 * cos(box embedding, class text embedding).
        """
        counts = [len(b) for b in boxes]
        if sum(counts) == 0:
            return [torch.zeros(0, len(text_embed), device=images.device) for _ in counts]
        # images without boxes need no C5 map
        keep = [i for i, n in enumerate(counts) if n > 0]
        x = images[keep] * self.renorm_scale + self.renorm_shift
        # the teacher is frozen and runs every step on full-size batches: bf16 on GPU halves its cost
        with torch.autocast('cuda', dtype=torch.bfloat16, enabled=amp and images.is_cuda):
            c5 = self.c5_features(x.contiguous(memory_format=torch.channels_last))
            # RoIAlign in float32 (bf16 box coordinates would be off by pixels); aligned=True and adaptive
            # sampling as detectron2's ROIAlign in the official code
            rois = roi_align(c5.float(), [boxes[i].float().to(images.device) for i in keep],
                             output_size=self.grid, spatial_scale=1 / 32, sampling_ratio=0, aligned=True)
            feats = self.model.visual.attnpool(rois)
        feats = F.normalize(feats.float(), dim=-1)
        logits = LOGIT_SCALE * feats @ F.normalize(text_embed.float().to(feats.device), dim=-1).T
        return list(logits.split(counts))


def boxes_from_targets(targets):
    """
    targets: list of data.py target dicts ('boxes' (n, 4) cxcywh normalised to 'size' (h, w)) ->
    list of (n, 4) float32 xyxy boxes in absolute pixels, the input of ClipTeacher.box_logits.
    """
    out = []
    for t in targets:
        xyxy = box_cxcywh_to_xyxy(t['boxes'].float())
        whwh = t['size'].to(xyxy.device, torch.float32)[[1, 0, 1, 0]]  # on the device: .tolist() would be a host sync
        out.append(xyxy * whwh)
    return out


# ---- taxonomy mapping, paper Eq. 6: extra-data classes -> detector classes ----

def load_wnid_to_class(path):
    """
    Reads an ImageNet -> LVIS mapping file and returns {wnid: class index (LVIS id - 1)}. Accepted formats:
      - Detic's INet-LVIS json ('images': [{'file_name': 'nXXXXXXXX/....JPEG', 'pos_category_ids': [lvis_id]}]),
        the wnid being the image's folder;
      - a two-column TSV 'wnid<TAB>lvis_id'.
    """
    if path.endswith('.json'):
        with open(path) as f:
            images = json.load(f)['images']
        return {im['file_name'].split('/')[0]: im['pos_category_ids'][0] - 1 for im in images}
    with open(path) as f:
        rows = [line.split('\t') for line in f.read().splitlines() if line.strip()]
    return {wnid: int(lvis_id) - 1 for wnid, lvis_id in rows}


def map_to_nearest_class(extra_text_embed, text_embed, min_cos):
    """
    Automatic taxonomy mapping: each extra class goes to the detector class whose text embedding is closest.
    extra_text_embed: (K, E) text embeddings of the extra vocabulary; text_embed: (C, E) the detector's.
    Returns (K,) int64 class indices; -1 where the best cosine similarity is <= min_cos (no counterpart).
    """
    cos = F.normalize(extra_text_embed.float(), dim=-1) @ F.normalize(text_embed.float(), dim=-1).T
    best_cos, best = cos.max(dim=1)
    return torch.where(best_cos > min_cos, best, torch.full_like(best, -1))


def hard_labels_from_teacher(teacher_logits, threshold):
    """
    Paper Eq. 7, for boxes without any label: the teacher's top class becomes the hard label if it is confident.
    teacher_logits: (n, C) 100*cos logits. Returns (n,) int64: argmax class where its softmax probability
    > threshold, else -1 (data.py's "no hard label": the box keeps its box and soft losses only).
    """
    prob, label = teacher_logits.float().softmax(dim=-1).max(dim=-1)
    return torch.where(prob > threshold, label, torch.full_like(label, -1))
