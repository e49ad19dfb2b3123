"""Evaluate trained generators and their tokenizers under one set of sampling settings.

Everything in a row is measured in this process on one device: quality (FID / IS / precision /
recall / classifier accuracy against held-out real images), speed (forward passes per image,
sampling throughput and batch latency), cost (parameters, peak sampling memory, FLOPs per image)
and the held-out loss against the unigram baseline.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from arzoo.class_paths import resolve_class
from arzoo.data.image_grid import save_image_grid
from arzoo.generators.base import BaseGenerator
from arzoo.metrics import GenerativeMetrics
from arzoo.metrics.meters import count_flops, counting_calls, peak_memory
from arzoo.tokenizers.checkpoint import load_tokenizer


def build_datamodule(data_config: dict[str, Any]) -> Any:
    """Instantiate the recipe's `data:` section (class_path + init_args)."""
    cls = resolve_class(data_config.get("class_path"), what="data class", trusted=True)  # the user's recipe names it
    return cls(**(data_config.get("init_args") or {}))


def held_out_images(datamodule: Any, split: str = "val", limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 3, H, W) in [-1, 1] of the validation (or training) split and their labels, at most `limit`."""
    datamodule.setup("fit")
    images, labels, count = [], [], 0
    for batch in (datamodule.val_dataloader() if split == "val" else datamodule.train_dataloader()):
        batch = datamodule.on_before_batch_transfer(batch, 0)
        images.append(batch["image"])
        labels.append(batch["label"])
        count += len(batch["image"])
        if limit is not None and count >= limit:
            break
    return torch.cat(images)[:limit], torch.cat(labels)[:limit]


def evaluate_real(images: torch.Tensor, labels: torch.Tensor, metrics: GenerativeMetrics) -> dict[str, Any]:
    """The scale of the metrics: real training images scored like samples (as many as a generator draws)."""
    metrics.reset_fake()
    metrics.update_fake(images, labels)
    return _quality(metrics.compute())


def _sampling_kwargs(settings: dict[str, Any]) -> dict[str, Any]:
    return {**{k: settings[k] for k in ("cfg", "temperature", "top_k", "top_p")}, **(settings.get("options") or {})}


def validation_loss(model: BaseGenerator, datamodule: Any) -> dict[str, float]:
    """Held-out loss and the unigram baseline, through Lightning's own validate loop."""
    import lightning as L

    trainer = L.Trainer(
        accelerator="cpu" if model.device.type == "cpu" else "auto", devices=1, logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )
    results = trainer.validate(model, datamodule=datamodule, verbose=False)[0]
    return {k.split("/")[-1]: float(v) for k, v in results.items()}


def evaluate_generator(
    ckpt_path: Path,
    data_config: dict[str, Any],
    settings: dict[str, Any],
    metrics: GenerativeMetrics,
    device: str,
    grid_path: Path,
    model_class_path: str | None = None,
) -> dict[str, Any]:
    """One leaderboard row's measurements for a trained generator checkpoint."""
    if model_class_path:  # the suite's recipe names the class, so its module may be imported (a plugin paradigm)
        resolve_class(model_class_path, what="generator class", base=BaseGenerator, trusted=True)
    model = BaseGenerator.load_from_checkpoint(ckpt_path, map_location="cpu").eval()
    row: dict[str, Any] = {"paradigm": model.paradigm, "params": model.num_params()}
    row.update({f"val_{k}": v for k, v in validation_loss(model, build_datamodule(data_config)).items()})
    model = model.to(device).eval()
    num, batch = int(settings["num_samples"]), int(settings["batch_size"])
    labels = torch.arange(num) % model.num_classes
    kwargs = _sampling_kwargs(settings)
    generator = torch.Generator(device=device).manual_seed(int(settings["seed"]))

    model.sample_images(labels[:2].to(device), generator=generator, **kwargs)  # warm-up: lazy buffers, caches
    generator.manual_seed(int(settings["seed"]))
    images = []
    with counting_calls(model, "forward_step") as calls, peak_memory(device) as memory:
        start = time.perf_counter()
        for i in range(0, num, batch):
            images.append(model.sample_images(labels[i : i + batch].to(device), generator=generator, **kwargs).cpu())
        _sync(device)
        elapsed = time.perf_counter() - start
    images_t = torch.cat(images)
    row["forward_passes"] = calls[0] / -(-num // batch)  # per generate() call = per image (batched)
    row["sampling_images_per_s"] = num / elapsed
    row["peak_sampling_memory_mb"] = memory["peak_mb"]
    row["peak_memory_kind"] = memory["kind"]

    latency_labels = labels[: int(settings["latency_batch"])].to(device)
    start = time.perf_counter()
    model.sample_images(latency_labels, generator=generator, **kwargs)
    _sync(device)
    row["latency_s"] = time.perf_counter() - start
    row["latency_batch"] = len(latency_labels)
    try:
        row["flops_per_image"] = count_flops(lambda: model.sample_images(labels[:2].to(device), generator=generator, **kwargs)) / 2
    except Exception as err:  # a kernel the counter cannot see: report nothing rather than a wrong count
        row["flops_per_image"] = None
        row["flops_error"] = str(err)[:200]

    metrics.reset_fake()
    metrics.update_fake(images_t, labels)
    row.update(_quality(metrics.compute()))
    per_class = 8
    grid = torch.cat([images_t[labels == c][:per_class] for c in range(model.num_classes)])
    save_image_grid(grid, grid_path, nrow=per_class, upscale=max(1, 64 // images_t.shape[-1]))
    row["grid"] = grid_path.name
    return row


def unigram_loss(tokenizer: Any, train_images: torch.Tensor, val_images: torch.Tensor, device: str, batch: int) -> float:
    """Held-out cross-entropy of the add-one smoothed training-token frequencies (the baseline any generator must beat)."""

    def tokens(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([
                torch.cat([m.reshape(len(m), -1) for m in tokenizer.encode(images[i : i + batch].to(device))], 1).cpu()
                for i in range(0, len(images), batch)
            ])

    counts = torch.bincount(tokens(train_images).reshape(-1), minlength=tokenizer.vocab_size).double()
    log_probs = ((counts + 1) / (counts.sum() + tokenizer.vocab_size)).log()
    return -log_probs[tokens(val_images).reshape(-1)].mean().item()


def evaluate_tokenizer(
    ckpt_path: Path, real_images: torch.Tensor, train_images: torch.Tensor, metrics: GenerativeMetrics,
    device: str, seed: int, batch: int,
) -> dict[str, dict[str, Any]]:
    """Reference rows of one tokenizer: its reconstructions (ceiling) and decoded random tokens (floor)."""
    tokenizer = load_tokenizer(ckpt_path).to(device).eval()
    recon, random = [], []
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i in range(0, len(real_images), batch):
            chunk = real_images[i : i + batch].to(device)
            recon.append(tokenizer.decode(tokenizer.encode(chunk)).cpu())
            maps = [torch.randint(tokenizer.vocab_size, (len(chunk), h, w), generator=generator) for h, w in tokenizer.scales]
            random.append(tokenizer.decode([m.to(device) for m in maps]).cpu())
    rows = {}
    for kind, images in (("reconstruction", recon), ("random tokens", random)):
        metrics.reset_fake()
        metrics.update_fake(torch.cat(images), None)
        rows[kind] = _quality(metrics.compute())
    mse = torch.cat(recon).sub(real_images).pow(2).mean().item()
    rows["reconstruction"]["psnr_db"] = 10 * torch.log10(torch.tensor(4.0 / max(mse, 1e-12))).item()
    rows["reconstruction"]["params"] = sum(p.numel() for p in tokenizer.parameters())
    rows["reconstruction"]["unigram_loss"] = unigram_loss(tokenizer, train_images, real_images, device, batch)
    return rows


def _quality(result: dict[str, Any]) -> dict[str, Any]:
    keys = ("fid", "is_mean", "is_std", "precision", "recall", "class_accuracy", "num_fake")
    return {k: (float(result[k]) if isinstance(result.get(k), (float, int, torch.Tensor)) else result.get(k)) for k in keys}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
