"""MaskedHierarchicalGenerator (HMAR): sizes, the Markovian mask, sampling vs teacher forcing, the
mask schedule as a sampling argument, the two training stages, errors, and the recipes (parsed)."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import pytest
import torch

import arzoo
from arzoo.data import ImageDataModule
from arzoo.generators import MaskedHierarchicalGenerator
from arzoo.generators.masked_hierarchical import MASK_BRANCH, default_mask_schedule, lognorm_loss_weights
from arzoo.metrics.meters import counting_calls
from conftest import save_tiny_msvq

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
TINY_NET = dict(depth=2, n_layers_train=1, embed_dim=32, num_heads=2, warmup_steps=0)
# SPEC 7: inference HMAR total, stage-1 trainable (= VAR-dXX), stage-2 trainable (mask branch)
OFFICIAL = {
    16: (467_691_904, 310_283_520, 157_408_384),
    20: (845_517_872, 600_917_136, 244_600_736),
    24: (1_384_328_960, 1_033_399_360, 350_929_600),
    30: (2_556_324_212, 2_010_020_356, 546_303_856),
}


@pytest.fixture(scope="module")
def msvq_path(tmp_path_factory) -> Path:
    """An untrained 16x16 multi-scale VQ tokenizer: 1x1, 2x2, 3x3, 4x4 maps (30 tokens), 32 codes of width 8."""
    return save_tiny_msvq(tmp_path_factory.mktemp("tok"), [1, 2, 3, 4])


def _model(msvq_path: Path, **kwargs) -> MaskedHierarchicalGenerator:
    torch.manual_seed(0)
    return MaskedHierarchicalGenerator(tokenizer_path=str(msvq_path), **{**TINY_NET, **kwargs})


def _fit(model: MaskedHierarchicalGenerator, tmp_path: Path, steps: int) -> L.Trainer:
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        limit_val_batches=0)  # fmt: skip
    trainer.fit(model, ImageDataModule(image_size=16, batch_size=8))
    return trainer


def _net_weights(path: Path) -> dict:
    """The `net.*` weights of an arzoo checkpoint."""
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return {k[len("net."):]: v for k, v in state.items() if k.startswith("net.")}


def test_official_sizes_and_stage_trainable_counts_on_the_meta_device():
    assert {"hmar-d16", "hmar-d20", "hmar-d24", "hmar-d30", "hmar-tiny"} <= set(arzoo.list_generators())
    with torch.device("meta"):
        for depth, (total, stage1, stage2) in OFFICIAL.items():
            model = arzoo.create_generator(f"hmar-d{depth}")
            assert model.num_params() == total, depth
            assert model.stage == 1 and model.num_trainable_params() == stage1, depth
            assert len(model.net.base_blocks) == depth - 8 and len(model.net.mask_blocks) == 8
            assert arzoo.create_generator(f"hmar-d{depth}", stage=2).num_trainable_params() == stage2, depth
    assert model.num_steps == 10 and model.paradigm == "masked-hierarchical"
    assert model.mask_schedule == [[1], [1, 3], [1, 1, 2, 5], [16], [25], [36], [64], [100], [169], [256]]


def test_lognorm_weights_sum_to_one_and_favour_the_middle_scales():
    weights = lognorm_loss_weights([1, 2, 3, 4, 5, 6, 8, 10, 13, 16])
    assert weights.shape == (680,) and abs(weights.sum().item() - 1) < 1e-6
    per_scale = torch.stack([w.sum() for w in weights.split([p * p for p in (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)])])
    assert per_scale.argmax().item() not in (0, 9)
    assert default_mask_schedule([1, 2, 4]) == [[1], [1, 3], [16]]


def test_markovian_mask_each_scale_sees_only_its_own_input(msvq_path):
    model = _model(msvq_path).eval()
    scale = torch.tensor([0] + [1] * 4 + [2] * 9 + [3] * 16)
    assert torch.equal(model.mask, scale[:, None] == scale[None, :])
    assert torch.equal(model.net.attn_bias_for_masking[0, 0] == 0, model.mask)
    inputs, labels = torch.randn(2, 29, 8), torch.tensor([1, 2])
    logits = model(inputs, labels)
    torch.testing.assert_close(model(inputs, labels, model.mask), logits, atol=1e-6, rtol=0)  # dense mask = segments
    changed = inputs.clone()
    changed[:, 4:13] += 1.0  # the input of scale 2 (positions 5..13)
    again = model(changed, labels)
    torch.testing.assert_close(again[:, :5], logits[:, :5], atol=0, rtol=0)
    torch.testing.assert_close(again[:, 14:], logits[:, 14:], atol=0, rtol=0)  # finer scales too: Markovian
    assert not torch.allclose(again[:, 5:14], logits[:, 5:14])


def test_sampling_equals_teacher_forcing_and_keeps_no_cache(msvq_path):
    """Each scale's next-scale step (no guidance) equals the teacher-forced branch on the final tokens
    of the coarser scales; each mask step the mask branch on that step's tokens and mask."""
    model = _model(msvq_path).eval()
    labels = torch.tensor([3, 7])
    state = model.run_sampling(labels, top_k=4, generator=torch.Generator().manual_seed(0), trace=True, refine=True)
    tokens, trace = state.conditional_tokens(), state.carry["trace"]
    assert model.stage == 1  # stage 1 refines only when asked: its mask branch is untrained
    assert all(not block.attn.caching for block in (*model.net.base_blocks, *model.net.ns_blocks))
    teacher = model.teacher_forcing(tokens, labels)
    for scale in trace:
        begin, end = model.net.begin_ends[scale["si"]]
        assert torch.equal(scale["final_tokens"], tokens[:, begin:end])
        torch.testing.assert_close(scale["steps"][0]["logits_cfg"], teacher[:, begin:end], atol=1e-5, rtol=1e-5)
    kinds = [[s["kind"] for s in scale["steps"]] for scale in trace]
    assert kinds == [["ns"], ["ns", "mask"], ["ns", "mask", "mask", "mask"], ["ns"]]
    refined = trace[2]
    assert sorted(refined["finalized_at_step"][0].tolist()) == [0, 1, 2, 2, 3, 3, 3, 3, 3]  # [1, 1, 2, 5]


def test_mask_schedule_is_a_sampling_argument(msvq_path):
    model = _model(msvq_path, stage=2).eval()
    labels = torch.tensor([0, 1, 2])

    def run(**kwargs) -> tuple[torch.Tensor, list]:
        state = model.run_sampling(labels, cfg=2.0, top_k=8, generator=torch.Generator().manual_seed(1), trace=True,
                                   **kwargs)  # fmt: skip
        return state.conditional_tokens(), state.carry["trace"]

    plain, trace = run(refine=False)
    assert all(len(s["steps"]) == 1 for s in trace)
    assert torch.equal(run(mask_schedule=[[1], [4], [9], [16]])[0], plain)  # one step per scale: no refinement
    _, trace = run(mask_schedule=[[1], [2, 1, 1], [3, 6], [4, 4, 4, 4]])
    assert [len(s["steps"]) for s in trace] == [1, 3, 2, 4]
    with counting_calls(model, "forward_step") as calls:  # every network pass, sub-steps included
        run(mask_schedule=[[1], [2, 1, 1], [3, 6], [4, 4, 4, 4]])
    assert calls[0] == 1 + 3 + 2 + 4
    for step in trace[3]["steps"][1:]:
        assert step["idx_to_mask_in"].shape[1] in (12, 8, 4)
    with pytest.raises(ValueError, match=r"mask_schedule\[2\].*sum to the 3x3"):
        run(mask_schedule=[[1], [4], [4, 4], [16]])
    with pytest.raises(ValueError, match="one entry per scale"):
        run(mask_schedule=[[1], [4]])


def test_two_stages(msvq_path, tmp_path):
    stage1 = _model(msvq_path, stage=1, ema_decay=0.9)
    assert all(p.requires_grad != n.startswith(MASK_BRANCH) for n, p in stage1.net.named_parameters())
    trainer = _fit(stage1, tmp_path / "s1", steps=2)
    ckpt = tmp_path / "stage1.ckpt"
    trainer.save_checkpoint(ckpt)

    with pytest.raises(ValueError, match="give init_from"):
        _fit(_model(msvq_path, stage=2), tmp_path / "bad", steps=1)
    stage2 = _model(msvq_path, stage=2, init_from=str(ckpt))
    assert all(p.requires_grad == n.startswith(MASK_BRANCH) for n, p in stage2.net.named_parameters())
    stage2.setup("fit")
    start = {k: v.clone() for k, v in stage2.net.state_dict().items()}
    loaded = _net_weights(ckpt)
    for key, value in start.items():
        if not key.startswith(MASK_BRANCH):
            assert torch.equal(value, loaded[key]), key  # the stage-1 weights
    for key in stage2.net.mask_blocks.state_dict():
        assert torch.equal(start[f"mask_blocks.{key}"], loaded[f"ns_blocks.{key}"])  # mask branch from ns branch
    _fit(stage2, tmp_path / "s2", steps=2)
    after = stage2.net.state_dict()
    for key, value in start.items():
        moved = not torch.equal(after[key], value)
        if key.startswith(MASK_BRANCH) and key.endswith("weight"):
            assert moved, key
        elif not key.startswith(MASK_BRANCH):
            assert not moved, key

    again = MaskedHierarchicalGenerator.load_from_checkpoint(ckpt)  # a checkpoint samples without init_from
    assert again.stage == 1 and again.generate([1], top_k=2).shape == (1, 30)


def test_stage_two_loss_counts_only_masked_positions(msvq_path):
    model = _model(msvq_path, stage=2).eval()
    tokens = torch.randint(0, 32, (2, 30))
    torch.manual_seed(3)
    masked = torch.nn.functional.pad(model.draw_training_mask("cpu"), (1, 0))
    logits = model.teacher_forcing(tokens, torch.tensor([0, 1]), masked[1:])
    assert masked.shape == (30,) and not masked[0] and masked[1:5].sum() == 2  # validation: p = 0.5 -> ceil(2)
    assert masked[5:14].sum() == 5 and masked[14:].sum() == 8
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens, reduction="none")
    torch.testing.assert_close(model.token_loss(logits, tokens, loss_mask=masked), ce[:, masked].mean())
    torch.manual_seed(3)  # the training loss draws the same mask
    torch.testing.assert_close(model.sequence_loss(tokens, torch.tensor([0, 1])), ce[:, masked].mean())


def test_errors(msvq_path):
    with pytest.raises(ValueError, match="stage must be 1"):
        _model(msvq_path, stage=3)
    with pytest.raises(ValueError, match="n_layers_train must be an int in"):
        _model(msvq_path, n_layers_train=3)
    with pytest.raises(ValueError, match="does not support more_smooth"):
        _model(msvq_path, more_smooth=True)
    with pytest.raises(ValueError, match="loss_weighting"):
        _model(msvq_path, loss_weighting="cubic")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's block-diagonal path needs CUDA")
def test_flex_attention_equals_sdpa_on_cuda(msvq_path):
    model = _model(msvq_path).eval().cuda()
    inputs, labels = torch.randn(2, 29, 8, device="cuda"), torch.tensor([1, 2], device="cuda")
    flex = model(inputs, labels)  # segments: FlexAttention on CUDA
    dense = model(inputs, labels, model.mask)  # boolean mask: SDPA
    torch.testing.assert_close(flex, dense, atol=1e-4, rtol=1e-4)


def test_digits_recipes_fit_both_stages_and_sample(tmp_path, monkeypatch, capsys):
    """The two digits recipes through the CLI (tiny and short): stage 2 starts from stage 1's checkpoint."""
    from arzoo.cli import run as arzoo_run

    monkeypatch.setattr(sys, "argv", ["arzoo"])
    monkeypatch.chdir(tmp_path)
    quick = ["--trainer.max_steps", "2", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
             "--trainer.check_val_every_n_epoch", "1", "--data.init_args.batch_size", "8"]  # fmt: skip
    tiny = ["--model.init_args.depth", "2", "--model.init_args.n_layers_train", "1", "--model.init_args.embed_dim",
            "32", "--model.init_args.num_heads", "2"]  # fmt: skip
    arzoo_run(["fit", "--config", str(ROOT / "recipes/digits/tokenizer_msvq.yaml"), *quick])
    for stage in (1, 2):
        arzoo_run(["fit", "--config", str(ROOT / f"recipes/digits/masked_hierarchical_stage{stage}.yaml"), *quick, *tiny])
        run_dir = tmp_path / f"runs/digits/masked_hierarchical_stage{stage}"
        assert (run_dir / "last.ckpt").is_file() and (run_dir / "version_0/samples.png").is_file()
        metrics = (run_dir / "version_0/metrics.csv").read_text()
        assert "val/loss" in metrics and "val/unigram_loss" in metrics and ("val/mean_ce" in metrics) == (stage == 1)
        assert "val/context_gain" in metrics and "val/loss_q4" in metrics
    stage1, stage2 = (_net_weights(tmp_path / f"runs/digits/masked_hierarchical_stage{s}/last.ckpt") for s in (1, 2))
    for key, value in stage1.items():
        if not key.startswith(MASK_BRANCH):
            assert torch.equal(value, stage2[key]), key  # frozen in stage 2
    arzoo_run(["sample", "--ckpt_path", str(tmp_path / "runs/digits/masked_hierarchical_stage2/last.ckpt"), "--num", "10",
          "--cfg", "2.0", "--top_k", "10", "--seed", "0", "--out", "grid.png"])  # fmt: skip
    assert "wrote 10 samples (masked-hierarchical" in capsys.readouterr().out and (tmp_path / "grid.png").is_file()
