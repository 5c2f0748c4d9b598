"""Per-site augmentation of TRAINING batches (SiteTask spec.data.augment); validation and test
data are never augmented, so a site's model is chosen and scored on its data as it is.

Each transform draws from the trainer's seeded generator, so a round trains the same batches
for the same seed. Applied to the raw inputs before the task builds its pairs (a rotation or
denoising task then rotates or noises the augmented image).
"""

from __future__ import annotations

import torch

from mfed.spec import AugmentSpec, SpecError


def check_augment(spec: AugmentSpec, example_shape: tuple[int, ...]) -> None:
    """Flip, shift and brightness need images (C, H, W); noise applies to any input."""
    if len(example_shape) != 3 and (spec.flip or spec.shift or spec.brightness):
        raise SpecError(
            "data.augment",
            f"flip, shift and brightness apply to images (C, H, W); these inputs are {example_shape}: use noise only",
        )


def augment(x: torch.Tensor, spec: AugmentSpec, generator: torch.Generator) -> torch.Tensor:
    """A new batch (the input is not modified); the draws come from `generator` in a fixed order."""
    if not spec.active:
        return x
    out = x.clone()
    n = out.shape[0]
    images = out.dim() == 4
    if spec.flip is not None and images:
        if spec.flip in ("horizontal", "both"):
            mask = torch.rand(n, generator=generator) < 0.5
            out[mask] = out[mask].flip(-1)
        if spec.flip in ("vertical", "both"):
            mask = torch.rand(n, generator=generator) < 0.5
            out[mask] = out[mask].flip(-2)
    if spec.shift > 0 and images:
        moves = torch.randint(-spec.shift, spec.shift + 1, (n, 2), generator=generator)
        out = torch.stack([_shifted(img, int(dy), int(dx)) for img, (dy, dx) in zip(out, moves, strict=True)])
    if spec.brightness > 0 and images:
        factors = 1 + (torch.rand(n, generator=generator) * 2 - 1) * spec.brightness
        out = (out * factors.view(n, 1, 1, 1)).clamp(0, 1)
    if spec.noise > 0:
        out = out + torch.randn(out.shape, generator=generator) * spec.noise
        if images:
            out = out.clamp(0, 1)
    return out


def _shifted(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """The image moved by (dy, dx) pixels, zeros where nothing moved in."""
    out = torch.zeros_like(image)
    h, w = image.shape[-2:]
    src_y, dst_y = slice(max(0, -dy), min(h, h - dy)), slice(max(0, dy), min(h, h + dy))
    src_x, dst_x = slice(max(0, -dx), min(w, w - dx)), slice(max(0, dx), min(w, w + dx))
    out[..., dst_y, dst_x] = image[..., src_y, src_x]
    return out
