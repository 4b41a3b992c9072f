"""
RichSem losses: DINO's set criterion with a federated focal loss, plus the semantic (soft) KL loss.

Per decoder layer (and the two-stage encoder output) the predictions are matched one-to-one to the GT boxes by the
Hungarian algorithm; matched queries learn their GT class (sigmoid focal loss over a federated subset of ~50 classes)
and their GT box (L1 + GIoU), all other queries learn "background". Denoising (DN) queries have a fixed assignment
to the GT they were made from. The semantic branch of the last layer learns the CLIP teacher's distribution over
classes for the boxes it matched and for the positive DN queries: KL(teacher || student) of the softmaxes of the two
100*cos logits.

Boxes are normalised cxcywh; everything here runs in fp32 whatever the model's precision. The hot path makes one
GPU->CPU transfer per step (all cost matrices together, for scipy's Hungarian solver) and no other host sync.
"""

import functools
import os
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

# ----------------------------------------------------------------------------------------------------------------------
# box geometry (the whole project imports these from here)

_EPS = 1e-7  # keeps zero-area boxes (degenerate predictions, padding) from dividing by zero


def box_cxcywh_to_xyxy(boxes):
    """boxes: (..., 4) cxcywh -> (..., 4) x1y1x2y2"""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(boxes):
    """boxes: (..., 4) x1y1x2y2 -> (..., 4) cxcywh"""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], dim=-1)


def _area(boxes):
    # an inverted box (x2 < x1) has no area; a negative one would make unions smaller than intersections
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def _iou_and_giou(a, b):
    """a, b: (..., 4) xyxy, broadcastable -> (iou, giou), each of the broadcast shape without the last dim"""
    inter_wh = (torch.min(a[..., 2:], b[..., 2:]) - torch.max(a[..., :2], b[..., :2])).clamp(min=0)
    inter = inter_wh[..., 0] * inter_wh[..., 1]
    union = _area(a) + _area(b) - inter
    iou = inter / union.clamp(min=_EPS)
    hull_wh = (torch.max(a[..., 2:], b[..., 2:]) - torch.min(a[..., :2], b[..., :2])).clamp(min=0)
    hull = hull_wh[..., 0] * hull_wh[..., 1]
    return iou, iou - (hull - union) / hull.clamp(min=_EPS)


def box_iou(boxes1, boxes2):
    """boxes1: (N, 4), boxes2: (M, 4) xyxy -> (N, M) IoU"""
    return _iou_and_giou(boxes1[:, None], boxes2[None])[0]


def generalized_box_iou(boxes1, boxes2):
    """boxes1: (N, 4), boxes2: (M, 4) xyxy -> (N, M) generalized IoU in [-1, 1] (Rezatofighi et al. 2019).
    Degenerate boxes give finite values and NaN boxes give NaN, without asserting (an assert would crash training)."""
    return _iou_and_giou(boxes1[:, None], boxes2[None])[1]


# ----------------------------------------------------------------------------------------------------------------------
# elementwise losses


def sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0):
    """Focal loss (Lin et al. 2017) of independent sigmoids, elementwise, in fp32.
    logits, targets: (...) with targets in {0, 1} -> (...) loss, unreduced"""
    logits, targets = logits.float(), targets.float()
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_true = p * targets + (1 - p) * (1 - targets)
    alpha_true = alpha * targets + (1 - alpha) * (1 - targets)
    return alpha_true * (1 - p_true) ** gamma * ce


def soft_kl(student_logits, teacher_logits):
    """Summed KL(teacher || student) of the class softmaxes, in fp32.
    student_logits, teacher_logits: (M, C) -> () = sum_m sum_c p_t (log p_t - log p_s)"""
    log_s = F.log_softmax(student_logits.float(), dim=-1)
    log_t = F.log_softmax(teacher_logits.float(), dim=-1)
    return F.kl_div(log_s, log_t, reduction="sum", log_target=True)


# ----------------------------------------------------------------------------------------------------------------------
# matching


@functools.cache
def _solver_threads():
    """Threads for scipy's Hungarian solver, which releases the GIL: a step's K*B problems (7 layers x batch) run
    side by side. With 150 GT an image's seven 900x150 problems take ~4 ms each: ~30 ms of GPU idling if serial."""
    return ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1), thread_name_prefix="hungarian")


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to GT boxes minimising
        cost_class * focal_cost(p at the GT class) + cost_bbox * L1(cxcywh) - cost_giou * GIoU.
    A GT of label -1 (no hard label) is matched on its box alone."""

    def __init__(self, cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, alpha=0.25, gamma=2.0):
        super().__init__()
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.alpha, self.gamma = alpha, gamma

    def cost_matrix(self, logits, boxes, tgt_labels, tgt_boxes):
        """logits: (..., C), boxes: (..., 4) cxcywh predictions; tgt_labels (N,), tgt_boxes (N, 4) of the batch
        -> (..., N) cost of every prediction against every GT, fp32, NaN-free"""
        p = logits.float()[..., tgt_labels.clamp(min=0)].sigmoid()  # only the GT classes' columns
        # -log(p + 1e-8) as DINO's matcher has it: each term is capped at 18.4 (a logit beyond about +-18), so with
        # 100*cos logits a query's box, not how far its logit has saturated, decides between confident queries
        pos = self.alpha * (1 - p) ** self.gamma * -(p + 1e-8).log()
        neg = (1 - self.alpha) * p ** self.gamma * -(1 - p + 1e-8).log()
        cost_class = (pos - neg) * (tgt_labels >= 0)
        boxes, tgt_boxes = boxes.float(), tgt_boxes.float()
        cost_bbox = torch.cdist(boxes.reshape(-1, 4), tgt_boxes, p=1).view(*boxes.shape[:-1], -1)
        giou = _iou_and_giou(box_cxcywh_to_xyxy(boxes)[..., None, :], box_cxcywh_to_xyxy(tgt_boxes))[1]
        cost = self.cost_class * cost_class + self.cost_bbox * cost_bbox - self.cost_giou * giou
        # scipy refuses NaN/inf; a diverged prediction should lose the match, not kill the run
        return torch.nan_to_num(cost, nan=1e8, posinf=1e8, neginf=-1e8)

    @torch.no_grad()
    def forward(self, outputs_list, targets):
        """outputs_list: K output dicts {'pred_logits' (B, Q, C), 'pred_boxes' (B, Q, 4)}, same B and Q
        (the decoder layers and the encoder output); targets: B dicts {'labels' (n_b,), 'boxes' (n_b, 4)}
        -> K lists of B pairs (query_idx, gt_idx), each (min(Q, n_b),) int64 on the CPU.
        All K*B cost blocks go to the CPU in one transfer: one host sync per step instead of K*B; scipy solves them
        on a thread pool."""
        K, (B, Q, _) = len(outputs_list), outputs_list[0]["pred_logits"].shape
        sizes = [len(t["labels"]) for t in targets]
        if sum(sizes) == 0:
            empty = torch.zeros(0, dtype=torch.int64)
            return [[(empty, empty) for _ in targets] for _ in outputs_list]
        logits = torch.stack([out["pred_logits"] for out in outputs_list])  # (K, B, Q, C)
        boxes = torch.stack([out["pred_boxes"] for out in outputs_list])
        tgt_labels = torch.cat([t["labels"] for t in targets]).to(logits.device)
        tgt_boxes = torch.cat([t["boxes"] for t in targets]).to(logits.device)
        cost = self.cost_matrix(logits, boxes, tgt_labels, tgt_boxes)  # (K, B, Q, N): every image's GT, then cut
        starts = [sum(sizes[:b]) for b in range(B)]
        blocks = torch.cat([cost[:, b, :, s:s + n].reshape(-1) for b, (s, n) in enumerate(zip(starts, sizes))])
        blocks = blocks.cpu().numpy()
        problems, offset = [], 0  # (k, b, cost (Q, n_b)) views into the one transfer
        for b, n in enumerate(sizes):
            block = blocks[offset:offset + K * Q * n].reshape(K, Q, n)
            offset += K * Q * n
            problems += [(k, b, block[k]) for k in range(K)]
        solved = _solver_threads().map(linear_sum_assignment, [cost for _, _, cost in problems])
        matches = [[None] * B for _ in range(K)]
        for (k, b, _), (rows, cols) in zip(problems, solved):
            matches[k][b] = (torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64))
        return matches


# ----------------------------------------------------------------------------------------------------------------------
# federated loss (Zhou et al. 2021): supervise the GT classes plus a few sampled negatives, not all ~1200 classes


def sample_federated_classes(labels, weights, num_chosen, num_samples=1):
    """labels: (N,) GT labels of the batch (-1 ignored); weights: (C,) >= 0 sampling weights, 0 = never sampled
    -> classes (S, k) int64, keep (S, k) bool for S = num_samples independent samples; sample s is classes[s][keep[s]]:
    every GT class plus classes drawn without replacement with probability proportional to `weights` until
    `num_chosen` are chosen (only the GT classes if there are that many). k = min(C, max(num_chosen, N)), known on
    the host, so nothing here waits for the GPU.

    The draw is the exponential race: ranking weights / Exp(1) noise gives the order of successive draws without
    replacement. torch.multinomial computes exactly this too, but first checks its input with two .item() host syncs."""
    C = weights.numel()
    k = min(C, max(num_chosen, labels.numel()))
    # label -1 goes to a spare slot C that is cut off; scatter of a value, unlike `in_gt[idx] = True`, needs no sync
    in_gt = torch.zeros(C + 1, dtype=torch.bool, device=weights.device)
    in_gt = in_gt.scatter_(0, torch.where(labels >= 0, labels, C), True)[:C]
    noise = torch.empty(num_samples, C, device=weights.device).exponential_().clamp_(min=1e-20)  # no inf from a 0
    score = torch.where(weights > 0, weights.float() / noise, -1.0)  # weight 0: never drawn
    score = torch.where(in_gt, float("inf"), score)                  # GT classes rank first, the draws follow them
    top, classes = score.topk(k, dim=-1)
    # rank < num_chosen keeps the GT classes and then the first (num_chosen - #GT classes) draws
    keep = in_gt[classes] | ((top > 0) & (torch.arange(k, device=top.device) < num_chosen))
    return classes, keep


# ----------------------------------------------------------------------------------------------------------------------
# the criterion


class SetCriterion(nn.Module):
    """All RichSem training losses, already weighted: the total loss is the sum of the returned values.
    Layers with the same queries are stacked and their losses computed together: ~15 small kernels per loss instead of
    ~15 per loss and layer, which matters because this part of the step is bound by kernel launches."""

    def __init__(self, num_classes, fed_weights, fed_num_classes=50, lambda_soft=0.5, weight_ce=1.0, weight_bbox=5.0,
                 weight_giou=2.0, alpha=0.25, gamma=2.0, matcher=None):
        """fed_weights: (num_classes,) = image_count ** 0.5 of the training set (0 = never sampled as a negative)"""
        super().__init__()
        assert fed_weights.shape == (num_classes,), "one federated weight per class"
        self.register_buffer("fed_weights", fed_weights.float(), persistent=False)
        self.fed_num_classes, self.lambda_soft = fed_num_classes, lambda_soft
        self.weight_ce, self.weight_bbox, self.weight_giou = weight_ce, weight_bbox, weight_giou
        self.alpha, self.gamma = alpha, gamma
        self.matcher = matcher if matcher is not None else HungarianMatcher(alpha=alpha, gamma=gamma)

    def compile_blocks(self):
        """torch.compile the loss arithmetic, in place: the cost matrices and the losses of stacked layers, with
        dynamic shapes (the GT count changes every batch). The Hungarian solver stays on the CPU between them."""
        self.matcher.cost_matrix = torch.compile(self.matcher.cost_matrix, dynamic=True)
        self.layer_losses = torch.compile(self.layer_losses, dynamic=True)

    def loss_ce(self, logits, pairs, labels, batch_labels):
        """Federated sigmoid focal loss, a fresh class sample per layer. logits: (K, B, Q, C) of K layers;
        pairs: (layer, batch, query) (M,) each, the queries assigned to a GT; labels: (M,) their GT labels;
        batch_labels: (N,) all GT labels of the batch -> (K,) sum over queries x chosen classes per layer.
        A query assigned to a label -1 GT is neither positive nor negative: we do not know what it is."""
        K, B, Q, C = logits.shape
        classes, keep = sample_federated_classes(batch_labels, self.fed_weights, self.fed_num_classes, K)  # (K, k)
        k = classes.shape[1]
        column = torch.full((K, C), -1, dtype=torch.int64, device=logits.device)  # class -> its column in the subset
        column.scatter_(1, classes, torch.arange(k, device=logits.device).expand(K, k))
        layer, b, q = pairs
        has_label = labels >= 0
        target = torch.zeros(K, B, Q, k, device=logits.device)
        # every GT class is among `classes`, so column[label] is a real column for labelled queries
        target.index_put_((layer, b, q, column[layer, labels.clamp(min=0)].clamp(min=0)), has_label.float())
        query_weight = torch.ones(K, B, Q, device=logits.device)
        query_weight.index_put_((layer, b, q), has_label.float())
        chosen_logits = logits.gather(3, classes[:, None, None].expand(K, B, Q, k))
        loss = sigmoid_focal_loss(chosen_logits, target, self.alpha, self.gamma)
        return (loss * keep[:, None, None] * query_weight[..., None]).sum((1, 2, 3))

    @staticmethod
    def loss_boxes(boxes, pairs, gt_boxes):
        """boxes: (K, B, Q, 4) of K layers; pairs: (layer, batch, query) (M,) each, M = K * (pairs per layer),
        grouped by layer; gt_boxes: (M, 4) -> L1 and (1 - GIoU), (K,) sums per layer"""
        pred = boxes[pairs].float()
        l1 = (pred - gt_boxes.float()).abs().sum(-1)
        giou = _iou_and_giou(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(gt_boxes.float()))[1]
        shape = (boxes.shape[0], len(l1) // boxes.shape[0])  # explicit: a -1 is ambiguous when there is no GT
        return l1.view(shape).sum(1), (1 - giou).view(shape).sum(1)

    def layer_losses(self, layers, suffixes, pairs, tgt, normaliser):
        """layers: K output dicts with the same (B, Q); pairs: (layer, batch, query, gt) (M,) each, grouped by layer,
        gt indexing the batch's concatenated GT tgt -> {'loss_ce'+suffix, 'loss_bbox'+suffix, 'loss_giou'+suffix}"""
        logits = torch.stack([out["pred_logits"] for out in layers])
        boxes = torch.stack([out["pred_boxes"] for out in layers])
        labels = tgt["labels"][pairs[3]]
        ce = self.weight_ce * self.loss_ce(logits, pairs[:3], labels, tgt["labels"]) / normaliser
        l1, giou = self.loss_boxes(boxes, pairs[:3], tgt["boxes"][pairs[3]])
        l1, giou = self.weight_bbox * l1 / normaliser, self.weight_giou * giou / normaliser
        losses = {}
        for i, s in enumerate(suffixes):
            losses.update({"loss_ce" + s: ce[i], "loss_bbox" + s: l1[i], "loss_giou" + s: giou[i]})
        return losses

    @staticmethod
    def matched_pairs(matches, sizes, device):
        """matches: K lists of B pairs (query_idx, gt_idx) on the CPU; sizes: B GT counts
        -> (layer, batch, query, gt) (M,) each on device, grouped by layer, gt indexing the concatenated GT"""
        starts = [sum(sizes[:b]) for b in range(len(sizes))]
        rows = [torch.stack([torch.full_like(q, k), torch.full_like(q, b), q, g + starts[b]])
                for k, layer in enumerate(matches) for b, (q, g) in enumerate(layer)]
        return tuple(torch.cat(rows, 1).to(device, non_blocking=True))  # one host-to-device copy

    @staticmethod
    def dn_pairs(sizes, num_groups, max_gt, num_layers, device):
        """The fixed DN assignment (prepare_cdn's layout): positive copy g*2*m + j of image b <-> GT j of image b,
        in every layer -> (layer, batch, query, gt) (M,) each, grouped by layer, gt indexing the concatenated GT"""
        batch, query, gt, start = [], [], [], 0
        groups = torch.arange(num_groups, device=device)
        for b, n in enumerate(sizes):
            j = torch.arange(n, device=device)
            query.append((groups[:, None] * 2 * max_gt + j).flatten())
            gt.append((start + j).repeat(num_groups))
            batch.append(torch.full((num_groups * n,), b, device=device))
            start += n
        per_layer = torch.stack([torch.cat(batch), torch.cat(query), torch.cat(gt)])
        layer = torch.arange(num_layers, device=device)[:, None].expand(-1, per_layer.shape[1]).flatten()
        return (layer, *per_layer.repeat(1, num_layers))

    @staticmethod
    def num_boxes(sizes, device):
        """Average GT count per rank, >= 1, as a tensor: an .item() would be a host sync every step."""
        n = torch.full((), float(sum(sizes)), device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(n)
            n = n / dist.get_world_size()
        return n.clamp(min=1)

    def forward(self, outputs, targets):
        """outputs: the model's training dict: 'pred_logits' (B, Q, C), 'pred_boxes' (B, Q, 4),
        'aux_outputs' (L-1 dicts), 'enc_outputs' (same B, Q), optional 'pred_soft' (B, Q, C), 'dn_outputs' (L dicts
        of (B, Ndn, .), the last with 'pred_soft') and 'dn_meta' {'num_groups', 'max_gt'}
        targets: B dicts {'labels' (n_b,), 'boxes' (n_b, 4), optional 'teacher_logits' (n_b, C)}
        -> dict of weighted scalar losses: loss_{ce,bbox,giou}{suffix} with suffix '' (last layer), '_0'..'_{L-2}'
        (aux layers), '_enc', '_dn' (last DN layer), '_dn_0'..'_dn_{L-2}'; loss_soft, loss_soft_dn"""
        device = outputs["pred_logits"].device
        # the losses are fp32 even when the model runs under autocast
        with torch.autocast(device.type, enabled=False):
            sizes = [len(t["labels"]) for t in targets]
            tgt = {"labels": torch.cat([t["labels"] for t in targets]).to(device),
                   "boxes": torch.cat([t["boxes"] for t in targets]).to(device).float()}
            num_boxes = self.num_boxes(sizes, device)

            aux = outputs.get("aux_outputs", [])
            layers = [outputs] + aux + ([outputs["enc_outputs"]] if "enc_outputs" in outputs else [])
            suffixes = [""] + [f"_{i}" for i in range(len(aux))] + (["_enc"] if "enc_outputs" in outputs else [])
            pairs = self.matched_pairs(self.matcher(layers, targets), sizes, device)
            losses = self.layer_losses(layers, suffixes, pairs, tgt, num_boxes)

            dn_outputs = outputs.get("dn_outputs")
            if dn_outputs:
                G, L = outputs["dn_meta"]["num_groups"], len(dn_outputs)
                dn = self.dn_pairs(sizes, G, outputs["dn_meta"]["max_gt"], L, device)
                dn_suffixes = [f"_dn_{i}" for i in range(L - 1)] + ["_dn"]
                losses.update(self.layer_losses(dn_outputs, dn_suffixes, dn, tgt, num_boxes * G))

            if "pred_soft" in outputs and all("teacher_logits" in t for t in targets) and self.lambda_soft != 0:
                teacher = torch.cat([t["teacher_logits"] for t in targets]).to(device)
                n = len(pairs[0]) // len(layers)  # the first n pairs are the last decoder layer's
                _, b, q, g = (p[:n] for p in pairs)
                losses["loss_soft"] = self.lambda_soft * soft_kl(outputs["pred_soft"][b, q], teacher[g]) / num_boxes
                if dn_outputs:
                    n = len(dn[0]) // L
                    _, b, q, g = (p[-n:] for p in dn)  # the last n DN pairs are the last DN layer's
                    kl = soft_kl(dn_outputs[-1]["pred_soft"][b, q], teacher[g])
                    losses["loss_soft_dn"] = self.lambda_soft * kl / (num_boxes * G)
        return losses
