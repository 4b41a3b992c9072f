"""
RichSem detector (Meng et al., NeurIPS 2023): DINO (Zhang et al., 2023) whose classifier contrasts with frozen CLIP
text embeddings, plus a training-only semantic branch that the CLIP teacher distils into.

    images -> backbone C3..C5 -> input projections (+ an extra stride-64 level) -> deformable encoder
    -> two-stage "mixed" query selection (anchors from the top-K encoder tokens, learned content)
    -> deformable decoder with iterative box refinement, look-forward-twice and contrastive denoising (CDN)
    -> class logits = 100 * cos(W h, t_c) against the text embedding t_c of every class

Boxes are normalised cxcywh in [0, 1] of the unpadded image; masks are True at padding.
Box arithmetic (sigmoid, inverse sigmoid, refinement, proposals) runs in fp32 so that bf16 autocast is safe.

Checkpoints: the semantic branch (keys 'semantic_branch.*') is for training only; a model built without it loads a
checkpoint once those keys are dropped (evaluate.load_checkpoint drops them). The text embedding is a buffer, so
checkpoints carry it.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.utils.checkpoint import checkpoint

from losses import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh
from msda import load_op, ms_deform_attn


def fp32(x):
    """x in at least fp32 precision (fp64 stays fp64): box arithmetic is not safe in bf16."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def inverse_sigmoid(x, eps=1e-3):
    """x: any shape, in [0, 1] -> logit(x) in fp32, clamped at eps so that boxes touching the border stay finite."""
    x = fp32(x).clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


# ----------------------------------------------------------------------------------------------------------------
# Backbone

_BACKBONES = {  # name: (torchvision builder, channels of the stride 8/16/32 maps)
    'r18': ('resnet18', (128, 256, 512)), 'r34': ('resnet34', (128, 256, 512)),
    'r50': ('resnet50', (512, 1024, 2048)), 'swin_t': ('swin_t', (192, 384, 768)),
    'swin_s': ('swin_s', (192, 384, 768)), 'swin_b': ('swin_b', (256, 512, 1024)),
}


def load_backbone_weights(net, path):
    """Load an ImageNet classifier's state dict (bare, or under 'model' or 'state_dict') minus its head."""
    state = torch.load(path, map_location='cpu')
    for key in ('model', 'state_dict'):
        if key in state:
            state = state[key]
            break
    classifier = ('fc.', 'head.')  # its class count differs (e.g. ImageNet-21k) and the detector drops it anyway
    missing, unexpected = net.load_state_dict({k: v for k, v in state.items() if not k.startswith(classifier)},
                                              strict=False)
    missing = [k for k in missing if not k.startswith(classifier)]
    if missing:
        raise ValueError(f'{path} lacks {len(missing)} backbone weights, e.g. {missing[:3]}')
    if unexpected:
        print(f'backbone weights {path}: ignored {len(unexpected)} unexpected keys, e.g. {unexpected[:3]}')


class FrozenBatchNorm2d(torchvision.ops.FrozenBatchNorm2d):
    """
    torchvision's frozen BatchNorm with scale and shift computed once, not at every call: one kernel instead of seven
    (two under autocast, which casts a bf16 x to fp32), for each of a ResNet-50's 53 norms. The cache is keyed on the
    buffers' storage and version counters, so .to(), load_state_dict and in-place edits refresh it.
    x: (B, C, H, W) -> (B, C, H, W), in fp32 under autocast as torchvision's.
    """

    def affine(self):
        buffers = (self.weight, self.bias, self.running_mean, self.running_var)
        key = tuple((t.data_ptr(), t._version, t.dtype) for t in buffers)
        if getattr(self, '_affine_key', None) != key:
            # never as inference tensors (evaluate.predict's inference_mode), which a later training step could
            # not save for backward
            with torch.inference_mode(False), torch.no_grad():
                scale = self.weight * (self.running_var + self.eps).rsqrt()
                shift = self.bias - self.running_mean * scale
            self._affine_cache, self._affine_key = (scale.view(1, -1, 1, 1), shift.view(1, -1, 1, 1)), key
        return self._affine_cache

    def forward(self, x):
        if torch.compiler.is_compiling():  # traced (RichSem.compile_blocks): the formula fuses into its neighbours
            return super().forward(x)
        scale, shift = self.affine()
        return torch.addcmul(shift, x, scale)


class Backbone(nn.Module):
    """A torchvision ResNet (frozen BatchNorm, stem and layer1 frozen, as DINO) or Swin; returns C3, C4, C5."""

    def __init__(self, name, weights):
        super().__init__()
        builder, self.num_channels = _BACKBONES[name]
        self.is_resnet = name.startswith('r')
        default = torchvision.models.get_model_weights(builder).IMAGENET1K_V1 if weights == 'default' else None
        net = torchvision.models.get_model(builder, weights=default,
                                           **({'norm_layer': FrozenBatchNorm2d} if self.is_resnet else {}))
        if weights is None:
            print(f'backbone {name} is randomly initialised (backbone_weights=None)')
        elif weights != 'default':
            load_backbone_weights(net, weights)
        if self.is_resnet:
            del net.fc, net.avgpool
            for n, p in net.named_parameters():
                p.requires_grad_(n.startswith(('layer2', 'layer3', 'layer4')))
            self.body = net
        else:
            self.body = net.features  # the final norm and head are for classification
            # a LayerNorm on each output, as the Swin of DINO (norm1-3 of its out_indices 1-3), new parameters
            self.out_norms = nn.ModuleList(nn.LayerNorm(c) for c in self.num_channels)

    def forward(self, images):
        """images: (B, 3, H, W) -> [C3 (B, c3, H/8, W/8), C4 (B, c4, H/16, W/16), C5 (B, c5, H/32, W/32)]."""
        if self.is_resnet:
            b = self.body
            x = b.layer1(b.maxpool(b.relu(b.bn1(b.conv1(images)))))
            c3 = b.layer2(x)
            c4 = b.layer3(c3)
            return [c3, c4, b.layer4(c4)]
        feats, x = [], images
        for i, stage in enumerate(self.body):
            x = stage(x)
            if i in (3, 5, 7):  # the stages after patch merging to strides 8, 16, 32 (torchvision Swin is NHWC)
                feats.append(self.out_norms[len(feats)](x).permute(0, 3, 1, 2))
        return feats


# ----------------------------------------------------------------------------------------------------------------
# Position encodings

def sine_features(coord, num_feats, temperature):
    """coord: (...) -> (..., num_feats) interleaved (sin, cos) at frequencies temperature^(-2i/num_feats)."""
    coord = fp32(coord)
    i = torch.arange(num_feats, device=coord.device, dtype=coord.dtype)
    angles = coord[..., None] / temperature ** (2 * (i // 2) / num_feats)
    return torch.stack([angles[..., 0::2].sin(), angles[..., 1::2].cos()], -1).flatten(-2)


def sine_position_encoding(mask, num_feats, temperature=20.0):
    """
    DINO's image position encoding: the running count of valid pixels along each axis, divided by the valid length
    (no -0.5 offset) and scaled to 2*pi.
    mask: (B, H, W) bool, True = padding -> (B, 2 * num_feats, H, W) with channels (pos_y, pos_x).
    """
    valid = (~mask).float()
    y, x = valid.cumsum(1), valid.cumsum(2)
    y = y / (y[:, -1:, :] + 1e-6) * 2 * math.pi
    x = x / (x[:, :, -1:] + 1e-6) * 2 * math.pi
    pos = torch.cat([sine_features(y, num_feats, temperature), sine_features(x, num_feats, temperature)], -1)
    return pos.permute(0, 3, 1, 2)


def sine_embed_boxes(boxes, num_feats):
    """boxes: (..., 4) cxcywh in [0, 1] -> (..., 4 * num_feats), the coordinates in DINO's order (y, x, w, h)."""
    x, y, w, h = (boxes * 2 * math.pi).unbind(-1)
    # the four coordinates in one call: the decoder does this every layer, and each call is a dozen small kernels
    return sine_features(torch.stack([y, x, w, h], -1), num_feats, 10000.0).flatten(-2)


# ----------------------------------------------------------------------------------------------------------------
# Multi-scale deformable attention (Deformable DETR)

class MSDeformAttn(nn.Module):
    """Each query samples num_points points per head and level around its reference and mixes them by softmax."""

    def __init__(self, d_model, nheads, num_levels, num_points):
        super().__init__()
        self.nheads, self.num_levels, self.num_points = nheads, num_levels, num_points
        self.sampling_offsets = nn.Linear(d_model, nheads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(d_model, nheads * num_levels * num_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self):
        """Start every head looking in its own direction, point k at distance k+1, with uniform weights."""
        M, L, P = self.nheads, self.num_levels, self.num_points
        nn.init.zeros_(self.sampling_offsets.weight)
        theta = torch.arange(M, dtype=torch.float32) * (2 * math.pi / M)
        directions = torch.stack([theta.cos(), theta.sin()], -1)
        directions = directions / directions.abs().max(-1, keepdim=True).values
        bias = directions[:, None, None] * torch.arange(1, P + 1, dtype=torch.float32)[:, None]  # (M, 1, P, 2)
        self.sampling_offsets.bias.data.copy_(bias.expand(M, L, P, 2).flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(self, query, reference, value, spatial_shapes, level_start_index, value_mask):
        """
        query: (B, Q, d); value: (B, S, d) with S = sum_l H_l W_l; value_mask: (B, S) bool, True = padding
        reference: (B, Q, L, 2) normalised (x, y) points, offsets in pixels of each level, or
                   (B, Q, L, 4) cxcywh boxes, offsets in units of half the box size / num_points
        spatial_shapes: (L, 2) int64 (H_l, W_l); level_start_index: (L,) int64
        returns: (B, Q, d)
        """
        B, Q, _ = query.shape
        M, L, P = self.nheads, self.num_levels, self.num_points
        value = self.value_proj(value).masked_fill(value_mask[..., None], 0.0)
        value = value.view(B, value.shape[1], M, -1)
        offsets = fp32(self.sampling_offsets(query)).view(B, Q, M, L, P, 2)
        weights = fp32(self.attention_weights(query)).view(B, Q, M, L * P).softmax(-1).view(B, Q, M, L, P)
        ref = fp32(reference)[:, :, None, :, None]  # (B, Q, 1, L, 1, 2 or 4)
        if reference.shape[-1] == 2:
            loc = ref + offsets / spatial_shapes.flip(-1).to(ref.dtype)[:, None]  # (W_l, H_l): offsets in pixels
        else:
            loc = ref[..., :2] + offsets / P * ref[..., 2:] * 0.5
        return self.output_proj(ms_deform_attn(value, spatial_shapes, level_start_index, loc, weights))


# ----------------------------------------------------------------------------------------------------------------
# Encoder, decoder, heads

class EncoderLayer(nn.Module):
    """Post-norm deformable self-attention over all levels, then a ReLU FFN."""

    def __init__(self, d_model, nheads, dim_feedforward, num_levels, num_points):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, nheads, num_levels, num_points)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, reference, spatial_shapes, level_start_index, mask):
        """src, pos: (B, S, d); reference: (B, S, L, 2); mask: (B, S) -> (B, S, d)."""
        src = self.norm1(src + self.self_attn(src + pos, reference, src, spatial_shapes, level_start_index, mask))
        # The FFN's (B, S, 2048) hidden is the step's largest activation (0.18 GB per layer at 800x1333 in bf16):
        # backward recomputes it from src instead of keeping it, for one extra matmul.
        ffn = checkpoint(self.ffn, src, use_reentrant=False) if torch.is_grad_enabled() else self.ffn(src)
        return self.norm2(src + ffn)

    def ffn(self, x):
        """x: (B, S, d) -> (B, S, d)"""
        return self.linear2(F.relu(self.linear1(x)))


class DecoderLayer(nn.Module):
    """Post-norm: self-attention among queries, deformable cross-attention into the memory, ReLU FFN."""

    def __init__(self, d_model, nheads, dim_feedforward, num_levels, num_points):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nheads, batch_first=True)
        self.norm1 = nn.LayerNorm(d_model)
        self.cross_attn = MSDeformAttn(d_model, nheads, num_levels, num_points)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt, query_pos, reference, memory, spatial_shapes, level_start_index, memory_mask, attn_mask):
        """
        tgt, query_pos: (B, Nq, d); reference: (B, Nq, L, 4) boxes; memory: (B, S, d); memory_mask: (B, S)
        attn_mask: (Nq, Nq) bool, True = may not attend, or None. Returns (B, Nq, d).
        """
        q = tgt + query_pos
        tgt = self.norm1(tgt + self.self_attn(q, q, tgt, attn_mask=attn_mask, need_weights=False)[0])
        tgt = self.norm2(tgt + self.cross_attn(tgt + query_pos, reference, memory, spatial_shapes,
                                               level_start_index, memory_mask))
        return self.norm3(tgt + self.linear2(F.relu(self.linear1(tgt))))


class MLP(nn.Module):
    """num_layers Linear layers with ReLU in between."""

    def __init__(self, in_dim, hidden_dim, out_dim, num_layers):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x):
        """x: (..., in_dim) -> (..., out_dim)."""
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


def contrast(x, text_unit):
    """
    x: (..., E); text_unit: (C, E) rows of unit norm -> (..., C) fp32 logits 100 * cos (CLIP's frozen scale).
    Under autocast the product itself runs in bf16: fine for the focal loss, where logits near 0 matter most
    (ContrastHead's exact=True leaves autocast where absolute logits matter).
    """
    return fp32(100.0 * F.normalize(fp32(x), dim=-1) @ text_unit.T)


class ContrastHead(nn.Module):
    """Classifier without weights per class: project to the text space, score by cosine with each class text."""

    def __init__(self, d_model, embed_dim):
        super().__init__()
        self.proj = nn.Linear(d_model, embed_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=embed_dim ** -0.5)

    def forward(self, h, text_unit, exact=False):
        """h: (..., d); text_unit: (C, E) unit rows -> (..., C) logits; exact: in fp32 even under autocast, where bf16
        rounds 100*cos logits in steps of 1/32-1/4 (4-64)."""
        if not exact:
            return contrast(self.proj(h), text_unit)
        with torch.autocast(h.device.type, enabled=False):
            return contrast(self.proj(fp32(h)), text_unit)


# ----------------------------------------------------------------------------------------------------------------
# Geometry of the encoder

def gather_rows(x, index):
    """x: (B, S, k), index: (B, K) -> (B, K, k) = x[b, index[b]]."""
    return torch.gather(x, 1, index[..., None].expand(-1, -1, x.shape[-1]))


def valid_ratios(mask):
    """mask: (B, H, W) True = padding -> (B, 2) fraction (w, h) of the map covered by the image."""
    H, W = mask.shape[1:]
    return torch.stack([(~mask[:, 0, :]).sum(1) / W, (~mask[:, :, 0]).sum(1) / H], -1).float()


def encoder_reference_points(shapes, ratios):
    """
    Pixel centres of every level as fractions of the valid image, then mapped into every level's padded map.
    shapes: L pairs of ints (H_l, W_l); ratios: (B, L, 2) (w, h) -> (B, S, L, 2) normalised (x, y).
    """
    refs = []
    for lvl, (H, W) in enumerate(shapes):
        ys, xs = torch.meshgrid(torch.arange(H, device=ratios.device) + 0.5,
                                torch.arange(W, device=ratios.device) + 0.5, indexing='ij')
        ref_x = xs.reshape(1, -1) / (ratios[:, lvl, 0:1] * W)
        ref_y = ys.reshape(1, -1) / (ratios[:, lvl, 1:2] * H)
        refs.append(torch.stack([ref_x, ref_y], -1))
    return torch.cat(refs, 1)[:, :, None] * ratios[:, None]


def encoder_proposals(mask_flat, shapes):
    """
    One proposal box per encoder token: its pixel centre in the valid image, side 0.05 * 2^level.
    mask_flat: (B, S) True = padding; shapes: L pairs of ints (H_l, W_l)
    -> proposals (B, S, 4) in logit space (+inf where invalid), valid (B, S, 1).
    """
    B, proposals, start = mask_flat.shape[0], [], 0
    for lvl, (H, W) in enumerate(shapes):
        mask = mask_flat[:, start:start + H * W].view(B, H, W)
        start += H * W
        valid_h, valid_w = (~mask[:, :, 0]).sum(1).float(), (~mask[:, 0, :]).sum(1).float()
        ys, xs = torch.meshgrid(torch.arange(H, device=mask.device), torch.arange(W, device=mask.device),
                                indexing='ij')
        cx = (xs[None] + 0.5) / valid_w[:, None, None]
        cy = (ys[None] + 0.5) / valid_h[:, None, None]
        wh = torch.full_like(cx, 0.05 * 2.0 ** lvl)
        proposals.append(torch.stack([cx, cy, wh, wh], -1).view(B, -1, 4))
    proposals = torch.cat(proposals, 1)
    valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True) & ~mask_flat[..., None]
    return torch.log(proposals / (1 - proposals)).masked_fill(~valid, float('inf')), valid


# ----------------------------------------------------------------------------------------------------------------
# Contrastive denoising

@torch.no_grad()
def prepare_cdn(targets, num_classes, num_queries, dn_number, label_noise, box_noise):
    """
    Noised copies of the ground truth for the decoder to reconstruct (DINO's CDN). Per group: a positive copy of
    every GT box (corners moved by < half the box size, to be reconstructed) and a negative copy (moved by one to two
    halves, to be called background). Layout: positive j of group g at g*2m + j, negative at g*2m + m + j.
    targets: list of B dicts with 'boxes' (n_b, 4) cxcywh and 'labels' (n_b,) (-1 = no hard label)
    returns None when no image has a box, else
      labels (B, Ndn) int64 in [0, C), boxes (B, Ndn, 4) cxcywh in [0, 1], valid (B, Ndn) bool (False = padding),
      attn_mask (Ndn + num_queries,)*2 bool (True = may not attend), meta {'num_groups': G, 'max_gt': m}
    """
    counts = [len(t['labels']) for t in targets]
    m, B, device = max(counts), len(targets), targets[0]['boxes'].device
    if m == 0:
        return None
    G = max(1, (2 * dn_number) // (2 * m))
    labels = torch.zeros(B, m, dtype=torch.long, device=device)
    boxes = torch.zeros(B, m, 4, device=device)
    valid = torch.zeros(B, m, dtype=torch.bool, device=device)
    for b, (t, n) in enumerate(zip(targets, counts)):
        labels[b, :n], boxes[b, :n], valid[b, :n] = t['labels'], t['boxes'].float(), True

    shape = (B, G, 2, m)  # (image, group, positive/negative, GT slot)
    labels = labels[:, None, None].expand(shape)
    boxes = boxes[:, None, None].expand(*shape, 4)
    # An unlabelled box gets a random class as content: it is still a box to reconstruct.
    relabel = (torch.rand(shape, device=device) < label_noise * 0.5) | (labels < 0)
    labels = torch.where(relabel, torch.randint(0, num_classes, shape, device=device), labels)
    r = torch.rand(*shape, 4, device=device)
    r[:, :, 1] += 1.0
    sign = torch.randint(0, 2, (*shape, 4), device=device).float() * 2 - 1
    half = torch.cat([boxes[..., 2:], boxes[..., 2:]], -1) / 2
    corners = box_cxcywh_to_xyxy(boxes) + sign * r * half * box_noise
    boxes = box_xyxy_to_cxcywh(corners.clamp(0, 1))

    n_dn = 2 * G * m
    group = torch.arange(n_dn, device=device) // (2 * m)
    attn_mask = torch.zeros(n_dn + num_queries, n_dn + num_queries, dtype=torch.bool, device=device)
    attn_mask[n_dn:, :n_dn] = True  # matching queries must not see the answers
    attn_mask[:n_dn, :n_dn] = group[:, None] != group[None, :]  # nor one group the others
    return (labels.reshape(B, n_dn), boxes.reshape(B, n_dn, 4), valid[:, None, None].expand(shape).reshape(B, n_dn),
            attn_mask, {'num_groups': G, 'max_gt': m})


# ----------------------------------------------------------------------------------------------------------------
# The detector

class RichSem(nn.Module):
    """DINO-4scale with a text-contrast classifier (one head shared by all decoder layers, one for the encoder)."""

    def __init__(self, text_embed, backbone='r50', backbone_weights='default', d_model=256, nheads=8, enc_layers=6,
                 dec_layers=6, dim_feedforward=2048, num_queries=900, num_points=4, num_levels=4, dn_number=100,
                 dn_label_noise=0.5, dn_box_noise=1.0, semantic_branch=True):
        """text_embed: (C, E) CLIP text embeddings of the class names, one row per class (kept, un-normalised, as a
        buffer); semantic_branch: build the training-only head that learns the teacher's distribution."""
        super().__init__()
        embed_dim = text_embed.shape[1]
        self.register_buffer('text_embed', text_embed.detach().float().clone())  # (C, E), un-normalised
        self.d_model, self.num_queries = d_model, num_queries
        self.dn_number, self.dn_label_noise, self.dn_box_noise = dn_number, dn_label_noise, dn_box_noise

        self.backbone = Backbone(backbone, backbone_weights)
        channels = self.backbone.num_channels[-num_levels:] if num_levels <= 3 else self.backbone.num_channels
        self.input_proj = nn.ModuleList(nn.Sequential(nn.Conv2d(c, d_model, 1), nn.GroupNorm(32, d_model))
                                        for c in channels)
        for i in range(num_levels - len(channels)):  # extra coarser levels: stride-2 3x3 convs, the first on C5
            self.input_proj.append(nn.Sequential(nn.Conv2d(channels[-1] if i == 0 else d_model, d_model, 3, 2, 1),
                                                 nn.GroupNorm(32, d_model)))
        self.num_backbone_levels = len(channels)
        self.level_embed = nn.Parameter(torch.empty(num_levels, d_model))

        layer_args = (d_model, nheads, dim_feedforward, num_levels, num_points)
        self.encoder = nn.ModuleList(EncoderLayer(*layer_args) for _ in range(enc_layers))
        self.enc_output = nn.Linear(d_model, d_model)
        self.enc_output_norm = nn.LayerNorm(d_model)
        self.tgt_embed = nn.Embedding(num_queries, d_model)
        self.decoder = nn.ModuleList(DecoderLayer(*layer_args) for _ in range(dec_layers))
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)
        self.decoder_norm = nn.LayerNorm(d_model)

        self.class_head = ContrastHead(d_model, embed_dim)
        self.bbox_head = MLP(d_model, d_model, 4, 3)
        self.enc_class_head = ContrastHead(d_model, embed_dim)
        self.enc_bbox_head = MLP(d_model, d_model, 4, 3)
        self.semantic_branch = ContrastHead(d_model, embed_dim) if semantic_branch else None
        self.label_proj = nn.Linear(embed_dim, d_model, bias=False)  # DN content from the class's text embedding
        self._reset_parameters()

    def _reset_parameters(self):
        embed_dim = self.text_embed.shape[1]
        for module in (self.encoder, self.decoder, self.enc_output, self.tgt_embed, self.ref_point_head):
            for p in module.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
        for module in self.modules():  # after the xavier pass, which would otherwise undo it (DINO issue 17)
            if isinstance(module, MSDeformAttn):
                module.reset_parameters()
        nn.init.normal_(self.level_embed)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight)
            nn.init.zeros_(proj[0].bias)
        # A zero last box layer makes every layer start from its reference box.
        nn.init.zeros_(self.bbox_head.layers[-1].weight)
        nn.init.zeros_(self.bbox_head.layers[-1].bias)
        self.enc_bbox_head.load_state_dict(self.bbox_head.state_dict())
        if self.semantic_branch is not None:  # starts as the classifier and is pulled towards the teacher
            self.semantic_branch.proj.weight = nn.Parameter(self.class_head.proj.weight.detach().clone())
        nn.init.normal_(self.label_proj.weight, std=embed_dim ** -0.5)

    def compile_blocks(self):
        """torch.compile in place (state dict keys unchanged) the parts with fixed control flow: backbone, input
        projections, encoder layers, query selection, the decoder loop. The launch-bound step's thousands of small
        kernels become a few fused ones; denoising and the heads stay eager. Compiles at the first step and again, with
        dynamic shapes, when new shapes first come (minutes each with train.compile_blocks), per mode (train, eval)."""
        if self.level_embed.is_cuda:
            load_op()  # built now, so that tracing sees the op and not its build
        for block in (self.backbone, *self.input_proj, *self.encoder):
            block.compile()
        self.select_queries = torch.compile(self.select_queries)
        self.decode = torch.compile(self.decode)

    def multiscale_features(self, images, mask):
        """images: (B, 3, H, W), mask: (B, H, W) -> L maps (B, d, H_l, W_l) and their masks (B, H_l, W_l)."""
        feats = self.backbone(images)[-self.num_backbone_levels:]
        srcs = [proj(f) for proj, f in zip(self.input_proj, feats)]
        x = feats[-1]
        for proj in self.input_proj[len(feats):]:
            x = proj(x)
            srcs.append(x)
        masks = [F.interpolate(mask[None].float(), size=s.shape[-2:]).bool()[0] for s in srcs]
        return srcs, masks

    def encode(self, srcs, masks):
        """
        srcs: L maps (B, d, H_l, W_l); masks: L masks (B, H_l, W_l) ->
        memory (B, S, d), mask_flat (B, S), spatial_shapes (L, 2), level_start_index (L,), ratios (B, L, 2)
        """
        pos = torch.cat([sine_position_encoding(m, self.d_model // 2).flatten(2).transpose(1, 2) + self.level_embed[lvl]
                         for lvl, m in enumerate(masks)], 1)
        src = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        mask_flat = torch.cat([m.flatten(1) for m in masks], 1)
        # Level sizes as host ints for the geometry; the op's device copy is made without waiting for the GPU.
        shapes = [tuple(s.shape[-2:]) for s in srcs]
        levels = torch.tensor([[h, w, sum(a * b for a, b in shapes[:lvl])] for lvl, (h, w) in enumerate(shapes)])
        if src.is_cuda:
            levels = levels.pin_memory().to(src.device, non_blocking=True)
        spatial_shapes, level_start_index = levels[:, :2].contiguous(), levels[:, 2].contiguous()
        ratios = torch.stack([valid_ratios(m) for m in masks], 1)
        reference = encoder_reference_points(shapes, ratios)
        for layer in self.encoder:
            src = layer(src, pos, reference, spatial_shapes, level_start_index, mask_flat)
        return src, mask_flat, spatial_shapes, level_start_index, ratios

    def select_queries(self, memory, mask_flat, shapes, text_unit):
        """
        Mixed query selection: anchors from the K encoder tokens with the highest class score, learned content.
        memory: (B, S, d); shapes: the L levels' (H_l, W_l) as ints -> content (B, K, d), anchors (B, K, 4) logit
        space detached, encoder outputs {'pred_logits' (B, K, C), 'pred_boxes' (B, K, 4)} for the two-stage loss.
        """
        if memory.shape[1] < self.num_queries:  # else topk's "selected index k out of range"
            raise ValueError(f'{memory.shape[1]} encoder tokens (feature maps {[list(s) for s in shapes]}) for '
                             f'{self.num_queries} queries: the batch is too small; use larger images or fewer queries')
        proposals, valid = encoder_proposals(mask_flat, shapes)
        memory = self.enc_output_norm(self.enc_output(memory.masked_fill(~valid, 0.0)))
        # The choice has no gradient: score all S tokens without autograd (in bf16 under autocast), then run the heads
        # on the K chosen: as heads on all S then gathered, without (B, S, C) logits and gradient (0.2 GB each).
        with torch.no_grad():
            top = self.enc_class_head(memory, text_unit).max(-1).values.topk(self.num_queries, dim=1).indices
        memory = gather_rows(memory, top)
        anchors = fp32(self.enc_bbox_head(memory)) + gather_rows(proposals, top)
        enc_outputs = {'pred_logits': self.enc_class_head(memory, text_unit), 'pred_boxes': anchors.sigmoid()}
        content = self.tgt_embed.weight[None].expand(memory.shape[0], -1, -1)
        return content, anchors.detach(), enc_outputs

    def decode(self, tgt, anchors, memory, mask_flat, spatial_shapes, level_start_index, ratios, attn_mask):
        """
        Iterative refinement: each layer moves its reference box by bbox_head(h) and passes it on detached.
        tgt: (B, Nq, d); anchors: (B, Nq, 4) logit space -> hs: per layer the normed output (B, Nq, d);
        refs: dec_layers + 1 boxes (B, Nq, 4), refs[0] = sigmoid(anchors), refs[i + 1] layer i's refinement (not
        detached).
        """
        ref = fp32(anchors).sigmoid()
        ratios4 = torch.cat([ratios, ratios], -1)[:, None]  # (B, 1, L, 4)
        hs, refs = [], [ref]
        for layer in self.decoder:
            reference = ref[:, :, None] * ratios4
            query_pos = self.ref_point_head(sine_embed_boxes(reference[:, :, 0], self.d_model // 2))
            tgt = layer(tgt, query_pos, reference, memory, spatial_shapes, level_start_index, mask_flat, attn_mask)
            new_ref = (fp32(self.bbox_head(tgt)) + inverse_sigmoid(ref)).sigmoid()
            ref = new_ref.detach()
            refs.append(new_ref)
            hs.append(self.decoder_norm(tgt))
        return hs, refs

    def forward(self, images, mask, targets=None):
        """
        images: (B, 3, H, W) normalised, zero-padded; mask: (B, H, W) True = padding; targets: list of dicts with
        'boxes' (n, 4) cxcywh and 'labels' (n,), used for denoising in training mode only.
        returns, in eval mode, 'pred_logits' (B, Q, C) and 'pred_boxes' (B, Q, 4) cxcywh; in training mode also
        'aux_outputs' (dec_layers - 1 dicts), 'enc_outputs', 'pred_soft' (B, Q, C) when there is a semantic branch,
        and, when some image has a box, 'dn_outputs' (dec_layers dicts over the Ndn DN queries) and 'dn_meta'.
        """
        text_unit = F.normalize(self.text_embed, dim=-1)
        srcs, masks = self.multiscale_features(images, mask)
        memory, mask_flat, spatial_shapes, level_start_index, ratios = self.encode(srcs, masks)
        tgt, anchors, enc_outputs = self.select_queries(memory, mask_flat, [s.shape[-2:] for s in srcs], text_unit)

        dn = None
        if self.training and targets is not None:
            dn = prepare_cdn(targets, self.text_embed.shape[0], self.num_queries, self.dn_number,
                             self.dn_label_noise, self.dn_box_noise)
        attn_mask, n_dn = None, 0
        if dn is not None:
            labels, boxes, valid, attn_mask, dn_meta = dn
            n_dn = labels.shape[1]
            content = self.label_proj(self.text_embed)[labels].masked_fill(~valid[..., None], 0.0)
            dn_anchors = inverse_sigmoid(boxes).masked_fill(~valid[..., None], 0.0)
            tgt, anchors = torch.cat([content, tgt], 1), torch.cat([dn_anchors, anchors], 1)
        if self.training:  # keeps label_proj in the graph when no image has a box (DDP needs every gradient)
            tgt = tgt + self.label_proj.weight[0, 0] * 0.0

        hs, refs = self.decode(tgt, anchors, memory, mask_flat, spatial_shapes, level_start_index, ratios, attn_mask)
        # Look forward twice: layer i's box refines layer i-1's (undetached) box, so its loss trains both layers.
        # All layers' heads in one call each (the heads are shared): a few large kernels instead of many small ones.
        layers = slice(None) if self.training else slice(-1, None)
        h, ref = torch.stack(hs[layers]), torch.stack(refs[:-1][layers])  # (layers, B, Nq, d), (layers, B, Nq, 4)
        # evaluation ranks these scores: exact, else bf16 ties many of them (broken by index)
        logits = self.class_head(h, text_unit, exact=not self.training).unbind(0)
        boxes = (fp32(self.bbox_head(h)) + inverse_sigmoid(ref)).sigmoid().unbind(0)
        out = {'pred_logits': logits[-1][:, n_dn:], 'pred_boxes': boxes[-1][:, n_dn:]}
        if not self.training:
            return out
        out['aux_outputs'] = [{'pred_logits': l[:, n_dn:], 'pred_boxes': b[:, n_dn:]}
                              for l, b in zip(logits[:-1], boxes[:-1])]
        out['enc_outputs'] = enc_outputs
        if self.semantic_branch is not None:
            # exact: the KL's softmax at temperature 1 sees absolute logit errors
            soft = self.semantic_branch(hs[-1], text_unit, exact=True)
            out['pred_soft'] = soft[:, n_dn:]
        if dn is not None:
            out['dn_outputs'] = [{'pred_logits': l[:, :n_dn], 'pred_boxes': b[:, :n_dn]} for l, b in zip(logits, boxes)]
            if self.semantic_branch is not None:
                out['dn_outputs'][-1]['pred_soft'] = soft[:, :n_dn]
            out['dn_meta'] = dn_meta
        return out


def postprocess(outputs, orig_sizes, num_select=300):
    """
    Top num_select (query, class) pairs by sigmoid score; a query may appear with several classes. No NMS.
    outputs: 'pred_logits' (B, Q, C), 'pred_boxes' (B, Q, 4) cxcywh; orig_sizes: (B, 2) (h, w)
    returns: B dicts {'scores' (K,), 'labels' (K,) int64, 'boxes' (K, 4) xyxy in pixels of the original image}
    """
    logits = outputs['pred_logits'].float()
    B, Q, C = logits.shape
    scores, index = logits.sigmoid().flatten(1).topk(min(num_select, Q * C), dim=1)
    labels, query = index % C, index // C
    boxes = torch.gather(box_cxcywh_to_xyxy(outputs['pred_boxes'].float()), 1, query[..., None].expand(-1, -1, 4))
    h, w = orig_sizes.float().unbind(1)
    boxes = boxes * torch.stack([w, h, w, h], 1)[:, None]
    return [{'scores': s, 'labels': l, 'boxes': b} for s, l, b in zip(scores, labels, boxes)]
