"""`arzoo sample`: images from a trained generator checkpoint, as one image grid."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def sample(
    ckpt_path: str,
    num: int = 64,
    cfg: float = 2.0,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    seed: int = 0,
    out: str = "samples.png",
    labels: list[int] | None = None,
    use_ema: bool = True,
    device: str = "cpu",
    batch_size: int = 64,
    options: dict[str, Any] | None = None,
) -> Path:
    """Sample `num` images from a generator checkpoint and save them as a grid (one row per class).

    With `num` not a multiple of the class count the first classes get one image more and the other
    rows are padded with blanks; with fewer images than classes the grid is one row.

    Args:
        ckpt_path: a generator checkpoint written by `arzoo fit` (e.g. runs/digits/raster/last.ckpt).
        num: number of images; for class-conditional models they are spread evenly over the classes.
        cfg: classifier-free guidance scale (1 = none).
        temperature: softmax temperature.
        top_k: keep only the k most likely tokens (None: all).
        top_p: nucleus sampling threshold in (0, 1] (1: off).
        seed: seed of the sampling generator; the same seed gives the same grid.
        out: image file to write; its extension picks the format (.png, .jpg, .webp, ...).
        labels: explicit class ids, one per image (overrides the even spread; `num` is then ignored).
        use_ema: sample with the EMA weights when the model has them.
        device: torch device to sample on.
        batch_size: images generated per forward batch.
        options: further keyword arguments of the generator's `generate()`, e.g. HMAR's
            `{"refine": false}` or `{"mask_schedule": [[1], [1, 3], ...]}`.
    """
    import inspect

    from arzoo.data.image_grid import check_image_path, save_image_grid
    from arzoo.generators.base import BaseGenerator
    from arzoo.metrics.meters import counting_calls

    if labels is None and num <= 0:
        raise ValueError(f"num must be a positive number of images, got {num}")
    if labels is not None and len(labels) == 0:
        raise ValueError("labels must list at least one class id (e.g. --labels '[3, 7]'), got []")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    check_image_path(out, what="--out")  # before any sampling work
    model = BaseGenerator.load_from_checkpoint(ckpt_path).to(device).eval()
    rows: list[int] | None = None  # images per grid row, one row per class
    if labels is None:
        if num >= model.num_classes:
            rows = [num // model.num_classes + (c < num % model.num_classes) for c in range(model.num_classes)]
            labels = [c for c, count in enumerate(rows) for _ in range(count)]
            nrow = max(rows)
        else:
            labels, nrow = list(range(num)), num
    else:
        nrow = min(len(labels), 8)
    options = dict(options or {})
    accepted = set(inspect.signature(model.generate).parameters) - {"labels_B", "generator", "options"}
    accepted |= set(model.sampling_options)
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(
            f"options {unknown} are not arguments of {type(model).__name__}.generate(); it takes {sorted(accepted)}"
        )
    generator = torch.Generator(device=device).manual_seed(seed)
    label_t = model.check_labels(torch.tensor(labels))
    kwargs = dict(cfg=cfg, temperature=temperature, top_k=top_k, top_p=top_p, use_ema=use_ema, **options)
    batches = range(0, len(label_t), batch_size)
    with counting_calls(model, "forward_step") as calls:  # forward passes actually run (HMAR adds sub-steps)
        images = torch.cat(
            [model.sample_images(label_t[i : i + batch_size], generator=generator, **kwargs).cpu() for i in batches]
        )
    grid = images if rows is None else pad_rows(images, rows, nrow)
    path = save_image_grid(grid, out, nrow=nrow, upscale=max(1, 64 // images.shape[-1]))
    steps = calls[0] / len(batches)
    print(f"wrote {len(images)} samples ({model.paradigm}, {steps:g} forward passes each) to {path}")
    return path


def pad_rows(images_NCHW: torch.Tensor, rows: list[int], width: int) -> torch.Tensor:
    """Images laid out `rows[i]` to a row, each row padded to `width` with blank (white) images."""
    blank = torch.ones_like(images_NCHW[:1])
    out, start = [], 0
    for count in rows:
        out.append(images_NCHW[start : start + count])
        out.extend([blank] * (width - count))
        start += count
    return torch.cat(out)


def main(args: list[str]) -> None:
    """Parse `arzoo sample ...` arguments from the signature of `sample`."""
    from jsonargparse import CLI

    CLI(sample, args=args, prog="arzoo sample", as_positional=False)
