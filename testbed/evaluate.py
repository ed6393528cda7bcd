"""Held-out evaluation: generate the evaluation prompts and score them by rules.

API (for bench/quality.py):
    evaluate(model, text_encoder, n, device, steps, guidance, seed) -> dict
    generate(model, text_encoder, items, device, steps, guidance) -> images [N, 3, 64, 64]
Prompt i uses noise seed `seed + i` (testbed.prompts.eval_items), so two models
evaluated with the same n / seed / steps get identical noise per prompt and their
images can be compared pixel by pixel (PSNR / SSIM): pass return_images=True.

CLI: python -m testbed.evaluate --weights testbed/weights --device cuda
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any, Callable

import torch

from .prompts import EVAL_SIZE, EvalItem, eval_items, uses_unseen_pair
from .sampling import DEFAULT_GUIDANCE, DEFAULT_STEPS, sample
from .scenes import CATEGORIES
from .score import score


def generate(
    model: Callable[..., torch.Tensor], text_encoder: torch.nn.Module, items: list[EvalItem],
    device: torch.device | str = "cpu", steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE,
    batch_size: int = 256, autocast: bool | None = None,
) -> torch.Tensor:
    """Images [N, 3, 64, 64] in [0, 1] on `device`, one per item, from its own seed."""
    out = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        out.append(sample(model, text_encoder, [it.caption for it in chunk], seeds=[it.seed for it in chunk],
                          steps=steps, guidance=guidance, device=device, autocast=autocast))
    return torch.cat(out)


def summarize(items: list[EvalItem], passed: list[bool]) -> dict[str, Any]:
    """Per-category accuracy; overall is their mean (as GenEval's overall score)."""
    cats = {}
    for cat in CATEGORIES:
        hits = [p for it, p in zip(items, passed) if it.spec.category == cat]
        if hits:
            cats[cat] = sum(hits) / len(hits)
    unseen = [p for it, p in zip(items, passed) if uses_unseen_pair(it.spec)]
    return {
        "overall": sum(cats.values()) / len(cats) if cats else 0.0,
        "categories": cats,
        "unseen_pair": sum(unseen) / len(unseen) if unseen else None,
        "n": len(items),
    }


def evaluate(
    model: Callable[..., torch.Tensor], text_encoder: torch.nn.Module, n: int = EVAL_SIZE,
    device: torch.device | str = "cpu", steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE,
    seed: int = 0, batch_size: int = 256, return_images: bool = False, autocast: bool | None = None,
) -> dict[str, Any]:
    """Generate and score the first n evaluation prompts.

    Returns summarize()'s keys plus steps / guidance / seed / seconds, and per
    prompt: captions, passed, reasons; with return_images, "images" [n, 3, 64, 64]
    float in [0, 1] on the CPU.
    """
    items = eval_items(n, seed)
    t0 = time.time()
    images = generate(model, text_encoder, items, device, steps, guidance, batch_size, autocast)
    results = score(images, [it.spec for it in items])
    passed = [r[0] for r in results]
    out = summarize(items, passed)
    out.update(steps=steps, guidance=guidance, seed=seed, seconds=round(time.time() - t0, 2),
               captions=[it.caption for it in items], passed=passed, reasons=[r[1] for r in results])
    if return_images:
        out["images"] = images.cpu()
    return out


def format_table(result: dict[str, Any]) -> str:
    """A one-screen summary of an evaluate() result."""
    lines = [f"{cat:<12} {acc * 100:6.1f}%" for cat, acc in result["categories"].items()]
    if result.get("unseen_pair") is not None:
        lines.append(f"{'(unseen pair)':<12} {result['unseen_pair'] * 100:6.1f}%")
    lines.append(f"{'overall':<12} {result['overall'] * 100:6.1f}%   (n={result['n']}, steps={result.get('steps')}, "
                 f"guidance={result.get('guidance')})")
    return "\n".join(lines)


def save_grid(images: torch.Tensor, path: str, nrow: int = 12, scale: int = 2) -> None:
    """Write images [N, 3, H, W] in [0, 1] as one PNG grid (for eyeballing)."""
    from PIL import Image  # only here: the training loop never touches PIL

    n, _, h, w = images.shape
    rows = -(-n // nrow)
    grid = torch.zeros(3, rows * h, nrow * w)
    for i in range(n):
        r, c = divmod(i, nrow)
        grid[:, r * h : (r + 1) * h, c * w : (c + 1) * w] = images[i].float().cpu()
    arr = (grid.permute(1, 2, 0) * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    Image.fromarray(arr).resize((nrow * w * scale, rows * h * scale), Image.NEAREST).save(path)


def main() -> None:
    from .checkpoint import load_testbed

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default="testbed/weights")
    ap.add_argument("--n", type=int, default=EVAL_SIZE)
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    ap.add_argument("--guidance", type=float, nargs="+", default=[DEFAULT_GUIDANCE])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", help="write the summaries (no per-prompt lists) here")
    ap.add_argument("--grid", help="write a PNG grid of the first 48 images here")
    args = ap.parse_args()

    model, encoder = load_testbed(args.weights, args.device)
    summaries = []
    for g in args.guidance:
        res = evaluate(model, encoder, args.n, args.device, args.steps, g, args.seed, return_images=bool(args.grid))
        print(format_table(res), f"[{res['seconds']} s]", flush=True)
        if args.grid:
            save_grid(res["images"][:48], args.grid)
        summaries.append({k: v for k, v in res.items() if k not in ("captions", "passed", "reasons", "images")})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summaries, f, indent=1)


if __name__ == "__main__":
    main()
