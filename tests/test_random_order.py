"""The random-order paradigm (docs/new_paradigm.md's worked example): orders per row, cached
sampling equal to teacher forcing in the row's order, the order as a sampling option, the recipe."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from arzoo.cli import run as arzoo_run
from arzoo.generators import BaseGenerator, RandomOrderGenerator
from arzoo.metrics.meters import counting_calls

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(vocab_size=32, grid_size=4, dim=32, n_layer=2, n_head=2, multiple_of=32, warmup_steps=0)


def _perturbed(model: RandomOrderGenerator) -> RandomOrderGenerator:
    """Non-zero output weights (the init zeroes them, which would make every logit equal)."""
    torch.nn.init.normal_(model.net.output.weight, std=0.5)
    return model


@pytest.mark.parametrize("cfg", [1.0, 2.5])
def test_cached_steps_equal_teacher_forcing_in_the_rows_order(cfg):
    torch.manual_seed(0)
    model = _perturbed(RandomOrderGenerator(**TINY)).eval()
    recorded: list[torch.Tensor] = []  # every row's logits, before guidance
    original = model.forward_step
    model.forward_step = lambda inputs, state: recorded.append(original(inputs, state)) or recorded[-1]
    state = model.run_sampling([1, 2, 3], cfg=cfg, top_k=8, generator=torch.Generator().manual_seed(0))
    del model.forward_step
    order, tokens = state.carry["order"], state.tokens
    assert len(recorded) == model.num_steps == 16
    assert all(sorted(row.tolist()) == list(range(16)) for row in order)  # each row: a permutation
    assert not torch.equal(order[0], order[1])  # one order per row
    teacher = model((tokens.gather(1, order), order), state.labels)
    torch.testing.assert_close(torch.cat(recorded, dim=1), teacher, atol=1e-5, rtol=1e-5)
    if cfg != 1.0:  # the null-class rows follow their conditional row's order and tokens
        assert torch.equal(order[:3], order[3:]) and torch.equal(tokens[:3], tokens[3:])


def test_the_order_is_a_sampling_option_and_seeded():
    torch.manual_seed(0)
    model = _perturbed(RandomOrderGenerator(**TINY)).eval()
    draw = lambda seed, **kw: model.generate([4, 5], generator=torch.Generator().manual_seed(seed), **kw)  # noqa: E731
    assert torch.equal(draw(0), draw(0)) and not torch.equal(draw(0), draw(1))
    raster = model.run_sampling([4, 5], order="raster", generator=torch.Generator().manual_seed(0))
    assert torch.equal(raster.carry["order"], torch.arange(16).expand(2, -1))
    with pytest.raises(ValueError, match="order must be 'random' or 'raster', got 'spiral'"):
        model.generate([1], order="spiral")
    with pytest.raises(ValueError, match=r"\['orders'\] are not sampling options of RandomOrderGenerator"):
        model.generate([1], orders="raster")


def test_training_draws_a_new_order_per_row_and_batch():
    torch.manual_seed(0)
    model = RandomOrderGenerator(**TINY).train()
    tokens = torch.randint(0, 32, (4, 16))
    (_, first), (_, second) = model.teacher_inputs(tokens), model.teacher_inputs(tokens)
    assert not torch.equal(first, second) and not torch.equal(first[0], first[1])
    loss = model.sequence_loss(tokens, torch.tensor([0, 1, 2, 3]))
    torch.testing.assert_close(loss, torch.tensor(32.0).log())  # zero-initialised head: uniform logits
    _perturbed(model)  # with a non-zero head the loss reaches the position instructions
    model.sequence_loss(tokens, torch.tensor([0, 1, 2, 3])).backward()
    assert model.net.target_embeddings.weight.grad.abs().sum() > 0


def test_digits_recipe_trains_samples_in_both_orders_and_reloads(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["arzoo"])
    quick = ["--trainer.max_steps", "3", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1",
             "--trainer.check_val_every_n_epoch", "1"]
    arzoo_run(["fit", "--config", str(ROOT / "recipes/digits/tokenizer_vq.yaml"), *quick])
    arzoo_run(["fit", "--config", str(ROOT / "recipes/digits/random_order.yaml"), *quick,
               "--model.init_args.dim", "32", "--model.init_args.n_layer", "1", "--model.init_args.n_head", "2"])
    ckpt = tmp_path / "runs/digits/random_order/last.ckpt"
    model = BaseGenerator.load_from_checkpoint(ckpt)
    assert isinstance(model, RandomOrderGenerator) and model.paradigm == "random-order"
    with counting_calls(model, "forward_step") as calls:
        images = model.sample_images([0, 1], cfg=2.0, top_k=8, generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 3, 32, 32) and calls[0] == 64  # one pass per token of the 8x8 grid
    capsys.readouterr()
    arzoo_run(["sample", "--ckpt_path", str(ckpt), "--num", "10", "--options", '{"order": "raster"}',
               "--out", "raster_order.png"])
    assert "wrote 10 samples (random-order, 64 forward passes each)" in capsys.readouterr().out
