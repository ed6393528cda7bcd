"""Scene grammar, captions and a batched torch renderer.

A scene is up to four flat shapes on a plain dark background, 64x64 RGB.  Captions
come from a fixed grammar whose categories follow GenEval (single object, two
objects, counting, colours, position, colour attribution).  Rendering runs on
whatever device the generator lives on, so training renders on the GPU on the fly.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

IMAGE_SIZE = 64
MAX_OBJECTS = 4

SHAPES = ("circle", "square", "triangle", "cross", "ring")
PLURALS = ("circles", "squares", "triangles", "crosses", "rings")
# Palette chosen so every pair of colours (and the background) is >= 0.47 apart in
# RGB: the scorer classifies pixels by nearest palette colour with a 0.25 radius.
COLORS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "white")
PALETTE = (
    (0.90, 0.05, 0.10),
    (1.00, 0.50, 0.00),
    (0.95, 0.95, 0.15),
    (0.10, 0.70, 0.15),
    (0.10, 0.85, 0.95),
    (0.15, 0.25, 0.95),
    (0.65, 0.15, 0.85),
    (0.95, 0.95, 0.95),
)
BACKGROUND = (0.12, 0.12, 0.12)
NUMBERS = ("one", "two", "three", "four")
RELATIONS = ("left of", "right of", "above", "below")
CATEGORIES = ("single", "two", "counting", "colors", "position", "color_attr")

VOCAB = (
    ("<pad>", "a", "an", "and", "of", "left", "right", "above", "below")
    + NUMBERS
    + SHAPES
    + PLURALS
    + COLORS
)

# Object bounding-box side in pixels, per category.  Fewer objects -> larger, so
# four objects still fit with gaps; 11 px is the smallest size at which a ring
# keeps a visible hole and a triangle stays distinct from a cross.
SIZE_RANGE = {
    "single": (16.0, 26.0),
    "colors": (16.0, 26.0),
    "two": (12.0, 20.0),
    "position": (12.0, 20.0),
    "color_attr": (12.0, 20.0),
    "counting": (11.0, 16.0),
}
GAP = 3.0  # min pixels between object boxes, so same-coloured objects never merge
MARGIN = 2.0  # min pixels between an object and the image border
RING_INNER = 0.55  # inner radius of a ring, as a fraction of the outer radius
CROSS_ARM = 0.3  # half-width of a cross arm, as a fraction of the half-size
# A position layout is accepted only if the off-axis offset is at most this fraction
# of the on-axis offset: then GenEval's relation rule yields exactly one relation.
RELATION_SLOPE = 0.4


def _a(word: str) -> str:
    """Word with its indefinite article ("an orange")."""
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


@dataclass(frozen=True)
class Spec:
    """A structured prompt: what the caption asks for.

    shapes/colors are per object (colour None = any colour).  For "position" the
    relation holds between object 0 (A) and object 1 (B): "A <relation> B".
    For "counting" the shapes tuple repeats one shape `count` times.
    """

    category: str
    shapes: tuple[int, ...]
    colors: tuple[int | None, ...]
    relation: int | None = None

    @property
    def caption(self) -> str:
        s, c = self.shapes, self.colors
        if self.category == "single":
            return f"a {SHAPES[s[0]]}"
        if self.category == "two":
            return f"a {SHAPES[s[0]]} and a {SHAPES[s[1]]}"
        if self.category == "counting":
            n = len(s)
            noun = SHAPES[s[0]] if n == 1 else PLURALS[s[0]]
            return f"{NUMBERS[n - 1]} {noun}"
        if self.category == "colors":
            return f"{_a(COLORS[c[0]])} {SHAPES[s[0]]}"
        if self.category == "position":
            return f"a {SHAPES[s[0]]} {RELATIONS[self.relation]} a {SHAPES[s[1]]}"
        if self.category == "color_attr":
            return f"{_a(COLORS[c[0]])} {SHAPES[s[0]]} and {_a(COLORS[c[1]])} {SHAPES[s[1]]}"
        raise ValueError(f"unknown category {self.category!r}")


@dataclass
class Scene:
    """A batch of laid-out scenes, [B, MAX_OBJECTS] per field (slots past the
    object count have present=False)."""

    shape: torch.Tensor  # long
    color: torch.Tensor  # long
    center: torch.Tensor  # float [B, N, 2], (x, y) in pixels, pixel j spans [j, j+1)
    size: torch.Tensor  # float, bounding-box side in pixels
    present: torch.Tensor  # bool


class SpecTable:
    """Specs as tensors on a device, so a training batch is gathered without Python
    loops.  Colour -1 means "any colour" (sampled at render time)."""

    def __init__(self, specs: list[Spec], device: torch.device | str = "cpu") -> None:
        n = len(specs)
        self.specs = specs
        self.category = torch.tensor([CATEGORIES.index(s.category) for s in specs], device=device)
        self.shape = torch.full((n, MAX_OBJECTS), -1, dtype=torch.long)
        self.color = torch.full((n, MAX_OBJECTS), -1, dtype=torch.long)
        for i, s in enumerate(specs):
            self.shape[i, : len(s.shapes)] = torch.tensor(s.shapes)
            self.color[i, : len(s.colors)] = torch.tensor([-1 if c is None else c for c in s.colors])
        self.shape = self.shape.to(device)
        self.color = self.color.to(device)
        self.relation = torch.tensor([-1 if s.relation is None else s.relation for s in specs], device=device)
        lo_hi = torch.tensor([SIZE_RANGE[s.category] for s in specs])
        self.size_lo = lo_hi[:, 0].to(device)
        self.size_hi = lo_hi[:, 1].to(device)

    def __len__(self) -> int:
        return len(self.specs)


def all_shape_masks(
    cx: torch.Tensor, cy: torch.Tensor, hx: torch.Tensor, hy: torch.Tensor, size: int = IMAGE_SIZE
) -> torch.Tensor:
    """Boolean masks [N, n_shapes, size, size]: every shape with centre (cx, cy) and
    half extents (hx, hy), axis aligned, each filling its box.  The scorer uses
    these as templates, so ground truth and templates rasterise identically."""
    grid = torch.arange(size, device=cx.device, dtype=torch.float32) + 0.5
    u = (grid.view(1, 1, size) - cx.view(-1, 1, 1)) / hx.view(-1, 1, 1)
    v = (grid.view(1, size, 1) - cy.view(-1, 1, 1)) / hy.view(-1, 1, 1)
    inside_box = (u.abs() <= 1) & (v.abs() <= 1)
    r2 = u * u + v * v
    return torch.stack(
        [
            r2 <= 1,
            inside_box,
            inside_box & (u.abs() <= (v + 1) / 2),  # apex up: image y grows downwards
            inside_box & ((u.abs() <= CROSS_ARM) | (v.abs() <= CROSS_ARM)),
            (r2 <= 1) & (r2 >= RING_INNER**2),
        ],
        dim=1,
    )


def shape_masks(
    shape: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, hx: torch.Tensor, hy: torch.Tensor,
    size: int = IMAGE_SIZE,
) -> torch.Tensor:
    """Boolean masks [N, size, size] of shape[i] drawn at (cx, cy, hx, hy)[i]."""
    masks = all_shape_masks(cx, cy, hx, hy, size)
    return masks.gather(1, shape.clamp(min=0).view(-1, 1, 1, 1).expand(-1, 1, size, size)).squeeze(1)


def _relation_ok(relation: torch.Tensor, center: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """True where objects 0 and 1 satisfy `relation` clearly (or relation is -1)."""
    d = center[..., 0, :] - center[..., 1, :]
    sep = (size[..., 0] + size[..., 1]) / 2 + GAP
    dx, dy = d[..., 0], d[..., 1]
    horizontal = (dx.abs() >= sep) & (dy.abs() <= RELATION_SLOPE * dx.abs())
    vertical = (dy.abs() >= sep) & (dx.abs() <= RELATION_SLOPE * dy.abs())
    ok = torch.stack([horizontal & (dx < 0), horizontal & (dx > 0), vertical & (dy < 0), vertical & (dy > 0)], -1)
    picked = ok.gather(-1, relation.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked | (relation < 0)


_PALETTE = torch.tensor(PALETTE)
_BACKGROUND = torch.tensor(BACKGROUND)


@functools.lru_cache(maxsize=32)
def _on_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Constant tensors copied once per device: a host-to-GPU copy per batch
    would block until the GPU drained its queue."""
    return t.to(device)


# Layouts used when no random candidate satisfied the constraints (very rare):
# quadrant centres fit four objects of up to 16 px with gaps.
_FALLBACK = torch.tensor(
    [
        [[16, 16], [48, 16], [16, 48], [48, 48]],  # no relation
        [[16, 32], [48, 32], [16, 8], [48, 56]],  # A left of B
        [[48, 32], [16, 32], [16, 8], [48, 56]],  # A right of B
        [[32, 16], [32, 48], [8, 16], [56, 48]],  # A above B
        [[32, 48], [32, 16], [8, 16], [56, 48]],  # A below B
    ],
    dtype=torch.float32,
)


def sample_layout(
    table: SpecTable, idx: torch.Tensor, generator: torch.Generator, candidates: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Centres [B, N, 2] and sizes [B, N] for specs `idx`: rejection sampling over
    `candidates` random layouts per scene, all scenes at once."""
    dev = idx.device
    b, k, n = idx.shape[0], candidates, MAX_OBJECTS
    present = (table.shape[idx] >= 0).view(b, 1, n)
    lo, hi = table.size_lo[idx].view(b, 1, 1), table.size_hi[idx].view(b, 1, 1)
    size = lo + (hi - lo) * torch.rand(b, k, n, generator=generator, device=dev)
    room = IMAGE_SIZE - 2 * MARGIN - size
    pos = torch.rand(b, k, n, 2, generator=generator, device=dev)
    center = MARGIN + size.unsqueeze(-1) / 2 + room.unsqueeze(-1) * pos

    d = (center.unsqueeze(3) - center.unsqueeze(2)).abs()  # [b, k, n, n, 2]
    sep = (size.unsqueeze(3) + size.unsqueeze(2)) / 2 + GAP
    apart = (d[..., 0] >= sep) | (d[..., 1] >= sep)
    pair = present.unsqueeze(3) & present.unsqueeze(2) & ~torch.eye(n, dtype=torch.bool, device=dev)
    valid = (apart | ~pair).flatten(2).all(-1)
    valid &= _relation_ok(table.relation[idx].view(b, 1).expand(b, k), center, size)

    first = valid.float().argmax(dim=1)  # first valid candidate (0 if none)
    pick = first.view(b, 1, 1).expand(b, 1, n)
    size = size.gather(1, pick).squeeze(1)
    center = center.gather(1, pick.unsqueeze(-1).expand(b, 1, n, 2)).squeeze(1)

    # applied unconditionally: testing "any fallback needed?" would sync the GPU every batch
    none_valid = ~valid.any(dim=1)
    fallback = _on_device(_FALLBACK, dev)[table.relation[idx] + 1]
    center = torch.where(none_valid.view(b, 1, 1), fallback, center)
    size = torch.where(none_valid.view(b, 1), size.clamp(max=14.0), size)
    return center, size


def sample_colors(
    table: SpecTable, idx: torch.Tensor, generator: torch.Generator, allowed: torch.Tensor | None = None
) -> torch.Tensor:
    """Colours [B, N]: the spec's colour where given, else a random colour among
    `allowed[shape]` ([n_shapes, n_colors] bool; None = all)."""
    shape = table.shape[idx]
    if allowed is None:
        allowed = torch.ones(len(SHAPES), len(COLORS), dtype=torch.bool)
    probs = allowed.to(idx.device).float()[shape.clamp(min=0)].view(-1, len(COLORS))
    random = torch.multinomial(probs, 1, generator=generator).view(shape.shape)
    given = table.color[idx]
    return torch.where(given >= 0, given, random)


def sample_scenes(
    table: SpecTable, idx: torch.Tensor, generator: torch.Generator,
    allowed: torch.Tensor | None = None, candidates: int = 64,
) -> Scene:
    """Lay out and colour the specs `idx` (a long tensor on the table's device)."""
    center, size = sample_layout(table, idx, generator, candidates)
    color = sample_colors(table, idx, generator, allowed)
    shape = table.shape[idx]
    return Scene(shape=shape, color=color, center=center, size=size, present=shape >= 0)


def render(scene: Scene, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Images [B, 3, size, size] in [0, 1], hard edges (no antialiasing, so the
    ground truth has exactly palette colours)."""
    b, n = scene.shape.shape
    half = scene.size.reshape(-1) / 2
    masks = shape_masks(
        scene.shape.reshape(-1), scene.center[..., 0].reshape(-1), scene.center[..., 1].reshape(-1), half, half, size
    ).view(b, n, size, size)
    masks &= scene.present.view(b, n, 1, 1)
    dev = scene.center.device
    palette = _on_device(_PALETTE, dev)
    img = _on_device(_BACKGROUND, dev).view(1, 3, 1, 1).expand(b, 3, size, size)
    for i in range(n):  # objects never overlap, so painting order does not matter
        rgb = palette[scene.color[:, i].clamp(min=0)].view(b, 3, 1, 1)
        img = torch.where(masks[:, i : i + 1], rgb, img)
    return img.contiguous()


def render_specs(
    specs: list[Spec], generator: torch.Generator, allowed: torch.Tensor | None = None
) -> tuple[torch.Tensor, Scene]:
    """Convenience: lay out and render a list of specs on the generator's device."""
    dev = generator.device
    table = SpecTable(specs, dev)
    scene = sample_scenes(table, torch.arange(len(specs), device=dev), generator, allowed)
    return render(scene), scene
