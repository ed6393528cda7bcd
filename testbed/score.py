"""Rule-based GenEval-style scorer (no learned weights).

Detection: every pixel is labelled with its nearest palette colour (or none, if
nearer the background or farther than COLOR_RADIUS from every colour); each
colour's pixels are split into 8-connected components; a component is an object
if its area is at least MIN_AREA and its best shape template (the renderer's own
shape drawn into the component's bounding box) reaches MIN_IOU.  The IoU plays
the part of GenEval's detector confidence.

Judgement: the same include / exclude rules as GenEval's `evaluate_images.py`
(object present, count exact, colour of the top detections, relative position
with POSITION_THRESHOLD), applied to a spec built from the prompt's Spec.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .scenes import BACKGROUND, COLORS, PALETTE, RELATIONS, SHAPES, Spec, all_shape_masks

COLOR_RADIUS = 0.25  # RGB distance; palette colours are >= 0.47 apart
MIN_AREA = 20  # pixels; the smallest rendered object covers about 50
MIN_IOU = 0.5  # best template IoU for a component to count as an object
POSITION_THRESHOLD = 0.1  # GenEval's value
TEMPLATE_GROW = (-0.5, -0.25, 0.0, 0.25, 0.5)  # pixels added to the box half-size
CHUNK = 256  # images per detection chunk (bounds memory for large evaluations)


@dataclass
class Detection:
    shape: int
    color: int
    iou: float
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixel edges (x1, y1 exclusive)


@dataclass
class Requirement:
    shape: int
    count: int = 1
    color: int | None = None
    position: tuple[int, int] | None = None  # (relation index, include-group index)


@dataclass
class GenEvalSpec:
    include: list[Requirement]
    exclude: list[Requirement] = field(default_factory=list)


def geneval_spec(spec: Spec) -> GenEvalSpec:
    """The GenEval metadata (include / exclude lists) for a prompt."""
    s, c, cat = spec.shapes, spec.colors, spec.category
    if cat == "single":
        return GenEvalSpec([Requirement(s[0])])
    if cat == "two":
        return GenEvalSpec([Requirement(s[0]), Requirement(s[1])])
    if cat == "counting":
        n = len(s)
        return GenEvalSpec([Requirement(s[0], n)], [Requirement(s[0], n + 1)])
    if cat == "colors":
        return GenEvalSpec([Requirement(s[0], color=c[0])])
    if cat == "position":  # "A rel B": B is group 0, A is judged relative to it
        return GenEvalSpec([Requirement(s[1]), Requirement(s[0], position=(spec.relation, 0))])
    if cat == "color_attr":
        return GenEvalSpec([Requirement(s[0], color=c[0]), Requirement(s[1], color=c[1])])
    raise ValueError(f"unknown category {cat!r}")


def classify_pixels(images: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] in [0, 1] -> [N, H, W] palette index, -1 for background/unknown."""
    ref = torch.tensor((BACKGROUND, *PALETTE), device=images.device, dtype=torch.float32)
    dist = (images.float().unsqueeze(1) - ref.view(1, -1, 3, 1, 1)).square().sum(2).sqrt()
    best, idx = dist.min(dim=1)
    return torch.where((idx > 0) & (best <= COLOR_RADIUS), idx - 1, -1)


def connected_components(mask: torch.Tensor, check_every: int = 8) -> torch.Tensor:
    """8-connected labels of [M, H, W] bool masks: each component gets the largest
    flat pixel index (+1) it contains, background 0.  Label propagation by max
    pooling, so the whole batch is processed at once on any device."""
    m, h, w = mask.shape
    if m == 0:
        return torch.zeros_like(mask, dtype=torch.long)
    fmask = mask.float().unsqueeze(1)
    ids = torch.arange(1, h * w + 1, device=mask.device, dtype=torch.float32).view(1, 1, h, w)
    lab = ids * fmask  # float labels are exact up to 2**24 pixels
    for _ in range(0, h * w, check_every):
        prev = lab
        for _ in range(check_every):
            lab = F.max_pool2d(lab, 3, 1, 1) * fmask
        if torch.equal(lab, prev):
            break
    return lab.squeeze(1).long()


def _template_iou(comp_masks: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """IoU [K, n_shapes] of component masks [K, H, W] with each shape template
    drawn into the component's bounding box.  A box from pixel extents is up to
    half a pixel off the drawn size, which at 11 px makes a disk look like a
    square, so each template is also tried slightly smaller and larger."""
    k, h, _ = comp_masks.shape
    cx, cy = (box[:, 0] + box[:, 2]) / 2, (box[:, 1] + box[:, 3]) / 2
    hx, hy = (box[:, 2] - box[:, 0]) / 2, (box[:, 3] - box[:, 1]) / 2
    comp = comp_masks.flatten(1).float().unsqueeze(2)  # float: bmm beats boolean sums
    area = comp.sum(1)
    ious = torch.zeros(k, len(SHAPES), device=box.device)
    for grow in TEMPLATE_GROW:
        tpl = all_shape_masks(cx, cy, hx + grow, hy + grow, h).flatten(2).float()  # [K, n_shapes, H*W]
        inter = torch.bmm(tpl, comp).squeeze(2)
        union = area + tpl.sum(2) - inter
        ious = torch.maximum(ious, inter / union.clamp(min=1))
    return ious


def _detect_chunk(images: torch.Tensor) -> list[list[Detection]]:
    n, _, h, w = images.shape
    n_col = len(COLORS)
    pix = classify_pixels(images)
    masks = pix.unsqueeze(1) == torch.arange(n_col, device=images.device).view(1, -1, 1, 1)
    masks = masks.view(n * n_col, h, w)
    nonempty = masks.flatten(1).any(1).nonzero().squeeze(1)
    labels = connected_components(masks[nonempty])

    fg = labels > 0
    which, ys, xs = fg.nonzero(as_tuple=True)
    keys = which * (h * w + 1) + labels[which, ys, xs]
    comp_keys, comp = torch.unique(keys, return_inverse=True)
    n_comp = comp_keys.numel()
    area = torch.bincount(comp, minlength=n_comp)

    def reduce(values: torch.Tensor, how: str) -> torch.Tensor:
        init = torch.full((n_comp,), float("inf") if how == "amin" else float("-inf"), device=images.device)
        return init.scatter_reduce(0, comp, values.float(), how)

    box = torch.stack([reduce(xs, "amin"), reduce(ys, "amin"), reduce(xs, "amax") + 1, reduce(ys, "amax") + 1], 1)
    owner = comp_keys // (h * w + 1)  # index into `nonempty`
    keep = (area >= MIN_AREA).nonzero().squeeze(1)

    out: list[list[Detection]] = [[] for _ in range(n)]
    comp_map = torch.full((labels.shape[0], h * w), -1, dtype=torch.long, device=images.device)
    comp_map[which, ys * w + xs] = comp
    for start in range(0, keep.numel(), 512):
        sel = keep[start : start + 512]
        cmask = (comp_map[owner[sel]] == sel.view(-1, 1)).view(-1, h, w)
        best_iou, best_shape = _template_iou(cmask, box[sel]).max(1)
        rows = zip(best_iou.tolist(), best_shape.tolist(), nonempty[owner[sel]].tolist(), box[sel].tolist())
        for iou, shape, flat, bx in rows:  # one transfer per chunk, not per object
            if iou >= MIN_IOU:
                img, col = divmod(flat, n_col)
                out[img].append(Detection(shape, col, iou, tuple(bx)))
    return out


def detect(images: torch.Tensor) -> list[list[Detection]]:
    """Objects found in each image of [N, 3, H, W] (values in [0, 1])."""
    out: list[list[Detection]] = []
    for start in range(0, images.shape[0], CHUNK):
        out.extend(_detect_chunk(images[start : start + CHUNK]))
    return out


def relative_position(a: Detection, b: Detection) -> set[str]:
    """GenEval's relation rule: offsets shrunk by POSITION_THRESHOLD x box sizes,
    then a direction counts where its normalised component exceeds 0.5."""
    ca = ((a.box[0] + a.box[2]) / 2, (a.box[1] + a.box[3]) / 2)
    cb = ((b.box[0] + b.box[2]) / 2, (b.box[1] + b.box[3]) / 2)
    dims = [(a.box[2] - a.box[0]) + (b.box[2] - b.box[0]), (a.box[3] - a.box[1]) + (b.box[3] - b.box[1])]
    offset = [ca[0] - cb[0], ca[1] - cb[1]]
    norm = (offset[0] ** 2 + offset[1] ** 2) ** 0.5
    revised = [max(abs(o) - POSITION_THRESHOLD * d, 0.0) * (1 if o > 0 else -1) for o, d in zip(offset, dims)]
    if norm == 0 or all(abs(r) < 1e-3 for r in revised):
        return set()
    dx, dy = revised[0] / norm, revised[1] / norm
    rels = set()
    if dx < -0.5:
        rels.add("left of")
    if dx > 0.5:
        rels.add("right of")
    if dy < -0.5:
        rels.add("above")
    if dy > 0.5:
        rels.add("below")
    return rels


def judge(spec: Spec, detections: list[Detection]) -> tuple[bool, str]:
    """GenEval's include/exclude logic for one image; returns (correct, reason)."""
    meta = geneval_spec(spec)
    by_shape: dict[int, list[Detection]] = {}
    for d in sorted(detections, key=lambda d: -d.iou):
        by_shape.setdefault(d.shape, []).append(d)
    correct, reasons = True, []
    groups: list[list[Detection] | None] = []
    for req in meta.include:
        found = by_shape.get(req.shape, [])[: req.count]
        matched = len(found) >= req.count
        if not matched:
            reasons.append(f"expected {SHAPES[req.shape]}>={req.count}, found {len(found)}")
        else:
            if req.color is not None and sum(d.color == req.color for d in found) < req.count:
                matched = False
                got = ",".join(COLORS[d.color] for d in found)
                reasons.append(f"expected {COLORS[req.color]} {SHAPES[req.shape]}, found {got}")
            if req.position is not None and matched:
                rel, target = req.position
                if groups[target] is None:
                    matched = False
                    reasons.append(f"no target for {SHAPES[req.shape]} {RELATIONS[rel]}")
                elif not all(RELATIONS[rel] in relative_position(d, t) for d in found for t in groups[target]):
                    matched = False
                    reasons.append(f"expected {SHAPES[req.shape]} {RELATIONS[rel]} target")
        correct &= matched
        groups.append(found if matched else None)
    for req in meta.exclude:
        if len(by_shape.get(req.shape, [])) >= req.count:
            correct = False
            reasons.append(f"expected {SHAPES[req.shape]}<{req.count}, found {len(by_shape[req.shape])}")
    return correct, "; ".join(reasons)


def score(images: torch.Tensor, specs: list[Spec]) -> list[tuple[bool, str]]:
    """(correct, reason) per image for images [N, 3, H, W] in [0, 1]."""
    if images.shape[0] != len(specs):
        raise ValueError(f"{images.shape[0]} images for {len(specs)} specs")
    return [judge(s, d) for s, d in zip(specs, detect(images))]
