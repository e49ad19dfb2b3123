"""arzoo.metrics: FID / IS / precision-recall / classifier accuracy, the digits classifier, meters."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from arzoo.metrics import FeatureNet, GenerativeMetrics, PeakMemory, Throughput, count_flops, machine_load, peak_memory
from arzoo.metrics import digits_classifier as dc
from arzoo.metrics.features import INCEPTION_WEIGHTS


class _Pixels(nn.Module):
    """Features = the flattened pixels: distributions of features are then known in closed form."""

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, None]:
        return images.flatten(1), None


def pixel_metrics(d_side: int = 2, **kwargs) -> GenerativeMetrics:
    net = FeatureNet("pixels", _Pixels(), num_features=3 * d_side * d_side, num_classes=0, class_logits=False)
    return GenerativeMetrics(feature=net, num_classes=0, **kwargs)


def gaussian_images(n: int, mean: float, std: float, seed: int, side: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (mean + std * torch.randn(n, 3, side, side, generator=g)).clamp(-1, 1)


@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("arzoo-cache")


@pytest.fixture(scope="session")
def digits_metrics(digits_cache: Path) -> GenerativeMetrics:
    """The default digits classifier, trained once per session into a temporary cache."""
    return GenerativeMetrics(feature="digits", image_size=32, num_classes=10, cache_dir=digits_cache)


@pytest.fixture(scope="session")
def digits_data() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return dc.digits_splits(dc.DigitsClassifierConfig(image_size=32))


# ---- FID and precision/recall on known distributions ----------------------------------------------


def test_fid_of_gaussians_matches_closed_form() -> None:
    m = pixel_metrics()
    m.update_real(gaussian_images(5000, 0.0, 0.2, seed=1))
    m.update_fake(gaussian_images(5000, 0.3, 0.1, seed=2))
    # Per dimension: (0.3)^2 + 0.2^2 + 0.1^2 - 2 * 0.2 * 0.1 = 0.1; 12 independent dimensions.
    assert m.compute()["fid"] == pytest.approx(12 * 0.1, rel=0.03)


def test_fid_self_zero_and_shifted_positive() -> None:
    m = pixel_metrics()
    real = gaussian_images(2000, 0.0, 0.2, seed=1)
    m.update_real(real)
    m.update_fake(real)
    r = m.compute()
    assert abs(r["fid"]) < 1e-4
    assert r["precision"] == 1.0 and r["recall"] == 1.0
    m.reset_fake()  # real statistics survive
    m.update_fake(real + 0.3)
    r = m.compute()
    assert r["num_real"] == 2000 and r["num_fake"] == 2000
    assert r["fid"] > 0.5


def test_precision_recall_drop_for_disjoint_and_one_sided_sets() -> None:
    m = pixel_metrics()
    m.update_real(gaussian_images(500, -0.5, 0.05, seed=1))
    m.update_fake(gaussian_images(500, 0.5, 0.05, seed=2))
    r = m.compute()
    assert r["precision"] == 0.0 and r["recall"] == 0.0
    # Fakes collapsed onto a part of the real set: high precision, low recall.
    m.reset()
    real = gaussian_images(600, 0.0, 0.2, seed=3)
    m.update_real(real)
    m.update_fake(real[real.flatten(1).mean(1) > 0.1])
    r = m.compute()
    assert r["precision"] == 1.0 and r["recall"] < 0.5


def test_input_contract_errors() -> None:
    m = pixel_metrics()
    with pytest.raises(TypeError, match="float images"):
        m.update_real(torch.zeros(4, 3, 2, 2, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        m.update_real(torch.full((4, 3, 2, 2), 200.0))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        m.update_real(torch.zeros(4, 1, 2, 2))
    m.update_real(torch.zeros(2, 3, 2, 2))
    m.update_real(torch.tensor([-3.0, 3.0]).repeat(2, 6).reshape(2, 3, 2, 2))  # decoder overshoot: clamped
    assert m.num_real == 4 and float(m.pr.real_features[-1].abs().max()) == 1.0
    with pytest.raises(RuntimeError, match="num_fake=0"):
        m.compute()


# ---- the digits classifier --------------------------------------------------------------------------


def test_digits_classifier_accuracy_and_scores(digits_metrics: GenerativeMetrics, digits_data: dict) -> None:
    info = digits_metrics.feature_info
    assert info["name"] == "digits" and info["num_features"] == 128 and info["test_accuracy"] > 0.95
    train_x, _ = digits_data["train"]
    test_x, test_y = digits_data["test"]
    m = digits_metrics
    m.reset()
    m.update_real(train_x)
    m.update_fake(test_x, test_y)
    r = m.compute()
    # The held-out split with its true labels reproduces the stored test accuracy exactly.
    assert r["class_accuracy"] == pytest.approx(info["test_accuracy"], abs=1e-12)
    assert r["is_mean"] > 5.0  # ten confidently recognised, balanced classes: IS close to 10
    shuffled = test_y[torch.randperm(len(test_y), generator=torch.Generator().manual_seed(0))]
    m.reset_fake()
    m.update_fake(test_x, shuffled)
    assert m.compute()["class_accuracy"] < 0.3
    # Same images against themselves: FID ~ 0, precision = recall = 1; noised images score worse.
    m.reset()
    m.update_real(train_x[:600])
    m.update_fake(train_x[:600])
    r = m.compute()
    assert abs(r["fid"]) < 1e-3 and r["precision"] == 1.0 and r["recall"] == 1.0 and r["class_accuracy"] is None
    m.reset_fake()
    g = torch.Generator().manual_seed(0)
    m.update_fake((train_x[:600] + 0.5 * torch.randn(train_x[:600].shape, generator=g)).clamp(-1, 1))
    noisy = m.compute()
    assert noisy["fid"] > 10.0 and noisy["recall"] < 0.9
    m.reset()


def test_digits_classifier_is_deterministic(tmp_path: Path) -> None:
    a, info_a = dc.load_digits_classifier(32, cache_dir=tmp_path / "a", epochs=1)
    b, info_b = dc.load_digits_classifier(32, cache_dir=tmp_path / "b", epochs=1)
    assert info_a["trained_now"] and info_b["trained_now"]
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name


def test_digits_classifier_cache_is_reused(digits_metrics: GenerativeMetrics, digits_cache: Path, monkeypatch) -> None:
    path = Path(digits_metrics.feature_info["path"])
    assert path.parent == digits_cache and path.name.startswith("digits_classifier_32_") and path.is_file()

    def fail(*args, **kwargs):
        raise AssertionError("the cached classifier was retrained")

    monkeypatch.setattr(dc, "train_digits_classifier", fail)
    again = GenerativeMetrics(feature="digits", image_size=32, cache_dir=digits_cache)
    assert again.feature_info["trained_now"] is False
    assert again.feature_info["test_accuracy"] == digits_metrics.feature_info["test_accuracy"]
    for pa, pb in zip(again.net.state_dict().values(), digits_metrics.net.state_dict().values()):
        assert torch.equal(pa, pb)
    # ARZOO_CACHE is the default location.
    monkeypatch.setenv("ARZOO_CACHE", str(digits_cache))
    assert dc.cache_path(dc.DigitsClassifierConfig(image_size=32)) == path


def test_num_classes_mismatch_is_a_clear_error(digits_metrics: GenerativeMetrics, digits_cache: Path) -> None:
    with pytest.raises(ValueError, match="num_classes=7"):
        GenerativeMetrics(feature="digits", image_size=32, num_classes=7, cache_dir=digits_cache)
    with pytest.raises(ValueError, match="unknown feature network 'vgg'"):
        GenerativeMetrics(feature="vgg")


# ---- inception ----------------------------------------------------------------------------------------


def test_missing_inception_weights_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    with pytest.raises(FileNotFoundError) as err:
        GenerativeMetrics(feature="inception", num_classes=0)
    message = str(err.value)
    assert INCEPTION_WEIGHTS in message and str(tmp_path / "torch-home" / "hub" / "checkpoints") in message
    assert "never downloads" in message
    with pytest.raises(FileNotFoundError, match="feature_path="):
        GenerativeMetrics(feature="inception", num_classes=0, feature_path=tmp_path / "nowhere.pth")


# ---- meters ---------------------------------------------------------------------------------------------


def test_meters_return_sane_numbers() -> None:
    with Throughput(num_items=8) as t:
        torch.randn(256, 256) @ torch.randn(256, 256)
    assert t.seconds > 0 and t.items_per_second > 0 and math.isfinite(t.items_per_second)
    with PeakMemory("cpu") as mem:
        block = torch.ones(16 * 2**20)  # 64 MiB, touched, alive when the block ends
    assert mem.kind in ("rss_sampled", "rss_lifetime")
    if mem.kind == "rss_sampled":
        assert mem.peak_bytes > 32 * 2**20
    del block
    with peak_memory("cpu") as info:
        block = torch.ones(16 * 2**20)
    assert info["kind"] == mem.kind and info["peak_mb"] >= 0 and info["peak_mb"] == info["peak_bytes"] / 2**20
    del block
    load = machine_load()
    assert load["cpu_count"] >= 1 and (load["load1"] is None or load["load1"] >= 0)
    linear = nn.Linear(64, 32, bias=False)
    assert count_flops(linear, torch.randn(5, 64)) == 2 * 5 * 64 * 32


# ---- the validation callback ------------------------------------------------------------------------------


def test_sample_quality_callback_scores_a_validate_run(digits_metrics: GenerativeMetrics, digits_data: dict) -> None:
    import lightning as L

    from arzoo.metrics import SampleQuality

    test_x, test_y = digits_data["test"]

    class Oracle(L.LightningModule):
        """A 'generator' that returns held-out digits of the requested class."""

        num_classes = 10

        def __init__(self) -> None:
            super().__init__()
            self.dummy = nn.Parameter(torch.zeros(()))

        def validation_step(self, batch: dict, batch_idx: int) -> None:
            pass

        def sample_images(self, labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
            picks = [int(torch.nonzero(test_y == c)[0]) for c in labels.tolist()]
            return test_x[picks]

    batches = [{"image": test_x[i : i + 30], "label": test_y[i : i + 30]} for i in range(0, len(test_x), 30)]
    data = torch.utils.data.DataLoader(batches, batch_size=None)  # each item is already a batch
    digits_metrics.reset()
    callback = SampleQuality(num_samples=40, batch_size=16, metrics=digits_metrics)
    trainer = L.Trainer(
        accelerator="cpu", callbacks=[callback], logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    logged = trainer.validate(Oracle(), dataloaders=data, verbose=False)[0]
    assert callback.last["num_real"] == len(test_x) and callback.last["num_fake"] == 40
    assert callback.last["class_accuracy"] == 1.0  # the first test image of each class is classified right
    assert set(logged) >= {"val/fid", "val/is_mean", "val/precision", "val/recall", "val/class_accuracy"}
    digits_metrics.reset()


def test_unreadable_cache_file_is_retrained_and_given_file_is_an_error(tmp_path: Path) -> None:
    config = dc.DigitsClassifierConfig(image_size=32, epochs=1)
    bad = dc.cache_path(config, tmp_path)
    bad.parent.mkdir(parents=True, exist_ok=True)
    bad.write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match="retraining"):
        _, info = dc.load_digits_classifier(32, cache_dir=tmp_path, epochs=1)
    assert info["trained_now"]
    assert dc.load_digits_classifier(32, cache_dir=tmp_path, epochs=1)[1]["trained_now"] is False
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read the digits classifier file"):
        dc.load_digits_classifier(32, path=bad, epochs=1)
