"""MambaScaleGenerator (M-VAR): sizes, the intra-scale mask, sampling with carried
Mamba states, training on the digits, checkpoints, errors, and the recipes (parsed and built only)."""

from __future__ import annotations

import dataclasses

import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

import arzoo
from arzoo.cli import run as arzoo_run
from arzoo.data import ImageDataModule
from arzoo.generators import MambaScaleGenerator, NextScaleGenerator, generator_config
from arzoo.networks.mvar import MVARTransformer
from arzoo.nn.mvar import MVARBlock
from conftest import save_tiny_msvq

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
# one block of width 32; a small Mamba2 (2 x 32 / 16 = 4 SSM heads of width 16, 16 states)
TINY_NET = dict(depth=1, embed_dim=32, num_heads=2, warmup_steps=0, mamba_d_state=16,
                mamba_headdim=16)  # fmt: skip
OFFICIAL_PARAMS = {"d16": 464_157_184, "d20": 900_528_736, "d24": 1_550_067_136, "d30": 3_017_065_756}
VAR_VQVAE_SIZES = dict(vocab_size=4096, codebook_dim=32, patch_nums=[1, 2, 3, 4, 5, 6, 8, 10, 13, 16])


@pytest.fixture(scope="module")
def msvq_path(tmp_path_factory) -> Path:
    """An (untrained) 16x16 multi-scale VQ tokenizer checkpoint: 1x1, 2x2, 4x4 maps (21 tokens), 32 codes of width 8."""
    return save_tiny_msvq(tmp_path_factory.mktemp("tok"), [1, 2, 4])


def _perturbed(model: NextScaleGenerator, seed: int = 0) -> NextScaleGenerator:
    """Noise on every weight, so that every branch (the near-zero-gated ones included) moves the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.net.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


# ---- sizes, masks, the network --------------------------------------------------------------------


def test_official_sizes_on_the_meta_device():
    assert {"mvar-d16", "mvar-d20", "mvar-d24", "mvar-d30", "mvar-tiny"} <= set(arzoo.list_generators())
    with torch.device("meta"):
        for size, count in OFFICIAL_PARAMS.items():
            model = arzoo.create_generator(f"mvar-{size}")
            assert model.num_params() == count, size
            assert isinstance(model.net, MVARTransformer) and type(model) is MambaScaleGenerator
            assert model.num_steps == 10 and model.num_tokens == 680 and model.paradigm == "next-scale"
            depth = model.net.depth
            assert model.net.C == 64 * depth and model.net.num_heads == depth
            assert model.net.config.drop_path_rate == 0.1 * depth / 24
            assert model.net.attn_l2_norm == (depth >= 24)  # released d16/d20 without, d24/d30 with
            mamba = model.net.blocks[0].mamba
            assert (mamba.d_state, mamba.d_conv, mamba.expand, mamba.headdim) == (64, 4, 2, 64)
        tiny = arzoo.create_generator("mvar-tiny", **VAR_VQVAE_SIZES, num_classes=10)
    assert isinstance(tiny.net, MVARTransformer) and tiny.net.depth == 4 and tiny.net.C == 128


def test_official_key_layout():
    model = MambaScaleGenerator(vocab_size=16, codebook_dim=4, patch_nums=[1, 2, 3], **TINY_NET)
    keys = list(model.net.state_dict())
    outside = [k for k in keys if not k.startswith("blocks.")]
    assert outside == ["pos_start", "pos_1LC", "lvl_1L", "attn_bias_for_masking", "word_embed.weight",
                       "word_embed.bias", "class_emb.weight", "lvl_embed.weight", "head_nm.ada_lin.1.weight",
                       "head_nm.ada_lin.1.bias", "head.weight", "head.bias"]  # fmt: skip
    block = [k[len("blocks.0."):] for k in keys if k.startswith("blocks.0.")]
    assert block[:7] == ["attn.scale_mul_1H11", "attn.q_bias", "attn.v_bias", "attn.zero_k_bias",
                         "attn.patch_nums", "attn.mat_qkv.weight", "attn.proj.weight"]  # fmt: skip
    assert {k.split(".")[0] for k in block} == {"attn", "mamba", "ffn", "ada_lin"}
    assert model.net.state_dict()["blocks.0.ada_lin.1.weight"].shape == (9 * 32, 32)
    assert model.net.blocks[0].attn.patch_nums.tolist() == [1, 4, 9]
    assert isinstance(model.net.blocks[0], MVARBlock)


def test_intra_scale_mask_and_information_flow():
    model = _perturbed(MambaScaleGenerator(vocab_size=16, codebook_dim=4, patch_nums=[1, 2, 3], **TINY_NET)).eval()
    scale = torch.tensor([0] + [1] * 4 + [2] * 9)
    assert torch.equal(model.mask, scale[:, None] == scale[None, :])  # attention stays inside a scale
    assert torch.equal(model.net.attn_bias_for_masking[0, 0] == 0, model.mask)
    inputs, labels = torch.randn(2, 13, 4), torch.tensor([1, 2])
    logits = model(inputs, labels)
    torch.testing.assert_close(model(inputs, labels, model.mask), logits, atol=1e-6, rtol=1e-6)
    # scale k sees scales < k (through Mamba) but never scales > k
    changed = inputs.clone()
    changed[:, 4:] += 1.0  # the input of scale 2
    again = model(changed, labels)
    torch.testing.assert_close(again[:, :5], logits[:, :5], atol=0, rtol=0)
    assert not torch.allclose(again[:, 5:], logits[:, 5:])
    changed = inputs.clone()
    changed[:, :4] += 1.0  # the input of scale 1 reaches scale 2
    assert not torch.allclose(model(changed, labels)[:, 5:], logits[:, 5:])


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_cached_sampling_steps_equal_teacher_forcing(msvq_path, cfg, monkeypatch):
    """Scale-by-scale sampling with each block's carried Mamba2 state gives the teacher-forced logits
    of the sampled tokens (what upstream gets by re-running Mamba over the prefix), CFG rows included;
    each scale feeds Mamba its own tokens only."""
    torch.manual_seed(0)
    model = _perturbed(MambaScaleGenerator(tokenizer_path=str(msvq_path), **TINY_NET)).eval()
    lengths: list[int] = []
    mamba = model.net.blocks[0].mamba
    original_mamba = mamba.forward
    monkeypatch.setattr(mamba, "forward", lambda u, *a, **k: lengths.append(u.shape[1]) or original_mamba(u, *a, **k))
    recorded: list[torch.Tensor] = []  # the network's logits of every row, before guidance
    original = model.forward_step

    def recording(inputs, state):
        recorded.append(original(inputs, state).clone())
        return recorded[-1]

    monkeypatch.setattr(model, "forward_step", recording)
    tokens = model.generate([3, 5], cfg=cfg, generator=torch.Generator().manual_seed(0))
    assert lengths == [1, 4, 16] and model.net._mamba_states is None  # freed after sampling
    guided = cfg != 1.0
    labels = torch.tensor([3, 5] + ([model.num_classes] * 2 if guided else []))  # CFG rows: the null class
    logits = model.teacher_forcing(tokens.repeat(2 if guided else 1, 1), labels)
    torch.testing.assert_close(torch.cat(recorded, dim=1), logits, atol=1e-5, rtol=1e-5)


def test_forward_scale_order_is_checked():
    model = MambaScaleGenerator(vocab_size=16, codebook_dim=4, patch_nums=[1, 2], **TINY_NET).eval()
    labels = torch.tensor([1])
    assert model.net.forward_scale(labels, 0).shape == (1, 1, 16)  # scale 0 alone: no state needed
    with pytest.raises(RuntimeError, match="carried Mamba states"):
        model.net.forward_scale(labels, 1, torch.randn(1, 4, 4))
    model.net.sampling_cache(True)
    with pytest.raises(RuntimeError, match="scale 1 was fed, but the carried Mamba states are at scale 0"):
        model.net.forward_scale(labels, 1, torch.randn(1, 4, 4))
    model.net.forward_scale(labels, 0)
    assert model.net.forward_scale(labels, 1, torch.randn(1, 4, 4)).shape == (1, 4, 16)
    model.net.sampling_cache(False)


def test_init_follows_upstream():
    """VAR's init on the 9-chunk AdaLN: gammas 1-2 scaled by init_adaln_gamma, gamma 3 (FFN) and the
    rest by init_adaln; Mamba's conv1d trunc-normal(0.02) with zero bias, its A_log / dt_bias / D kept."""
    torch.manual_seed(0)
    model = MambaScaleGenerator(vocab_size=16, codebook_dim=4, patch_nums=[1, 2], init_adaln_gamma=1e-5,
                               **{**TINY_NET, "embed_dim": 64, "depth": 2})  # fmt: skip
    C = 64
    for block in model.net.blocks:
        w = block.ada_lin[-1].weight
        assert w[: 2 * C].abs().max() < 1e-3 < w[2 * C : 3 * C].abs().max()  # gamma 3 is not near zero
        assert block.ada_lin[-1].bias.abs().max() == 0
        assert block.mamba.conv1d.bias.abs().max() == 0 and 0.015 < block.mamba.conv1d.weight.std() < 0.025
        assert torch.all(block.mamba.D == 1) and torch.all(block.mamba.norm.weight == 1)
        assert (-torch.exp(block.mamba.A_log)).max() <= -1  # A in [-16, -1]


# ---- training, sampling, checkpoints ----------------------------------------------------------------


def test_trains_samples_and_reloads(msvq_path, tmp_path):
    torch.manual_seed(0)
    model = MambaScaleGenerator(tokenizer_path=str(msvq_path), lr=3e-3, ema_decay=0.5, init_adaln_gamma=1e-3,
                               **TINY_NET)  # fmt: skip
    assert (model.vocab_size, model.patch_nums, model.codebook_dim) == (32, (1, 2, 4), 8)
    images = torch.rand(8, 3, 16, 16) * 2 - 1
    tokens, labels = model.tokenize(images), torch.arange(8)
    model.eval()
    before = model.token_loss(model.teacher_forcing(tokens, labels), tokens).item()
    trainer = L.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        limit_val_batches=0)  # fmt: skip
    trainer.fit(model, ImageDataModule(image_size=16, batch_size=16))
    model.eval()
    after = model.token_loss(model.teacher_forcing(tokens, labels), tokens).item()
    assert after < before
    live, ema = dict(model.net.named_parameters()), dict(model.ema.module.named_parameters())
    assert any(not torch.equal(live[k], ema[k]) for k in live)
    assert any("mamba" in k and not torch.equal(live[k], ema[k]) for k in live)  # Mamba is trained too

    draw = lambda seed, **kw: model.generate([1, 2, 3], generator=torch.Generator().manual_seed(seed), **kw)
    assert draw(0, cfg=2.0).shape == (3, 21)
    assert torch.equal(draw(0, top_k=8, top_p=0.9), draw(0, top_k=8, top_p=0.9))
    assert model.generate([4], greedy=True).shape == (1, 21)
    state = model.run_sampling([0, 9], cfg=3.0, top_k=16, generator=torch.Generator().manual_seed(1))
    images = model.decode_state(state)
    assert images.shape == (2, 3, 16, 16) and images.min() >= -1 and images.max() <= 1
    assert state.carry["f_hat"].shape == (2, 8, 4, 4)

    path = tmp_path / "mvar.ckpt"
    trainer.save_checkpoint(path)
    loaded = arzoo.Generator.load_from_checkpoint(path)
    assert type(loaded) is MambaScaleGenerator
    assert isinstance(loaded.net, MVARTransformer) and loaded.net.blocks[0].mamba.d_state == 16
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    assert torch.equal(draw(5), loaded.generate([1, 2, 3], generator=torch.Generator().manual_seed(5)))


def test_errors_a_user_can_cause():
    sizes = dict(vocab_size=16, codebook_dim=4, patch_nums=[1, 2])
    with pytest.raises(ValueError, match="does not support shared_aln=True"):
        MambaScaleGenerator(**sizes, **TINY_NET, shared_aln=True)
    with pytest.raises(TypeError, match="mamba_d_state"):  # VAR has no Mamba to size
        NextScaleGenerator(**sizes, depth=1, embed_dim=32, num_heads=2, mamba_d_state=16)
    with pytest.raises(ValueError, match="not divisible by mamba_headdim 48"):
        MambaScaleGenerator(**sizes, **{**TINY_NET, "mamba_headdim": 48})


# ---- recipes: parsed and built (nothing trains) ------------------------------------------------------


@pytest.fixture
def _plain_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["arzoo"])


def _print_config(path: Path, capsys) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        arzoo_run(["fit", "--config", str(path), "--print_config"])
    assert exit_info.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_digits_recipe_parses_and_builds(tmp_path, monkeypatch, capsys, _plain_argv):
    monkeypatch.chdir(tmp_path)
    config = _print_config(ROOT / "recipes/digits/next_scale_mamba.yaml", capsys)
    model, trainer = config["model"], config["trainer"]
    assert model["class_path"] == "arzoo.generators.MambaScaleGenerator"
    args = model["init_args"]
    assert args["mamba_d_state"] == 64 and args["tokenizer_path"] == "runs/digits/tokenizer_msvq/last.ckpt"
    callbacks = {c["class_path"].rsplit(".", 1)[-1]: c["init_args"] for c in trainer["callbacks"]}
    assert callbacks["ModelCheckpoint"]["dirpath"] == "runs/digits/next_scale_mamba"
    assert trainer["logger"]["init_args"]["name"] == "next_scale_mamba"
    # the sizes of recipes/digits/tokenizer_msvq.yaml; the network is the registered mvar-tiny
    tok = yaml.safe_load((ROOT / "recipes/digits/tokenizer_msvq.yaml").read_text())["model"]["init_args"]
    tok = tok["tokenizer"]["init_args"]
    digits = dict(vocab_size=tok["vocab_size"], codebook_dim=tok["z_channels"], patch_nums=tok["patch_nums"])
    with torch.device("meta"):
        built = MambaScaleGenerator(**dict(args, tokenizer_path=None, **digits))
        tiny = arzoo.create_generator("mvar-tiny", **digits)
    assert isinstance(built.net, MVARTransformer) and built.num_params() == tiny.num_params()
    # the same network (the recipe only changes an init scale: --alng 1e-3)
    assert built.net.config == dataclasses.replace(tiny.net.config, init_adaln_gamma=1e-3)


@pytest.mark.parametrize("size", list(OFFICIAL_PARAMS))
def test_imagenet_recipe_parses_and_builds_the_official_size(size, tmp_path, monkeypatch, capsys, _plain_argv):
    monkeypatch.chdir(tmp_path)
    config = _print_config(ROOT / f"recipes/imagenet256/mvar_{size}.yaml", capsys)
    var = yaml.safe_load((ROOT / f"recipes/imagenet256/var_{size}.yaml").read_text())
    model, trainer = config["model"], config["trainer"]
    assert model["class_path"] == "arzoo.generators.MambaScaleGenerator"
    args = model["init_args"]
    assert args["vocab_size"] is None and args["patch_nums"] is None and args["codebook_dim"] is None
    registered = generator_config(f"mvar-{size}")[1]
    for key in ("depth", "embed_dim", "num_heads", "drop_path_rate", "attn_l2_norm", "shared_aln"):
        assert args[key] == registered[key], key
    # "The hyperparameters of training are same as that in VAR" (M-VAR's README)
    same = ("lr", "betas", "weight_decay", "warmup_steps", "min_lr_ratio", "init_adaln", "init_adaln_gamma",
            "init_head", "init_std", "label_smoothing", "class_dropout_prob", "ema_decay", "tokenizer_path")
    for key in same:
        assert args[key] == pytest.approx(var["model"]["init_args"][key]) if key != "tokenizer_path" else (
            args[key] == var["model"]["init_args"][key]), key  # fmt: skip
    for key in ("max_epochs", "precision", "strategy", "gradient_clip_val"):
        assert trainer[key] == var["trainer"][key], key
    assert config["data"]["init_args"]["batch_size"] == var["data"]["init_args"]["batch_size"]
    callbacks = {c["class_path"].rsplit(".", 1)[-1]: c["init_args"] for c in trainer["callbacks"]}
    assert callbacks["ModelCheckpoint"]["dirpath"] == f"runs/imagenet256/mvar_{size}"
    assert trainer["logger"]["init_args"]["name"] == f"mvar_{size}"
    with torch.device("meta"):
        built = MambaScaleGenerator(**dict(args, tokenizer_path=None, **VAR_VQVAE_SIZES))
    assert built.num_params() == OFFICIAL_PARAMS[size] and isinstance(built.net, MVARTransformer)


def test_a_checkpoint_from_before_m_var_had_its_own_class_loads(tmp_path):
    """Older checkpoints name NextScaleGenerator with `inter_scale` (and VAR ones carry the Mamba defaults)."""
    from arzoo.checkpoint_io import atomic_torch_save

    sizes = dict(vocab_size=16, codebook_dim=4, patch_nums=[1, 2])
    mvar, var = MambaScaleGenerator(**sizes, **TINY_NET), NextScaleGenerator(**sizes, depth=1, embed_dim=32, num_heads=2)
    for model, old_args, expected in (
        (mvar, dict(inter_scale="mamba"), MambaScaleGenerator),
        (var, dict(inter_scale="attention", mamba_d_state=64, mamba_d_conv=4, mamba_expand=2, mamba_headdim=64),
         NextScaleGenerator),
    ):  # fmt: skip
        hparams = {**dict(model.hparams), **old_args}
        path = tmp_path / f"{expected.__name__}.ckpt"
        atomic_torch_save({"hyper_parameters": hparams, "state_dict": model.state_dict(),
                                "arzoo_generator_class": "arzoo.generators.NextScaleGenerator"}, path)  # fmt: skip
        loaded = arzoo.Generator.load_from_checkpoint(path)
        assert type(loaded) is expected and "inter_scale" not in loaded.hparams
        for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
            assert torch.equal(a, b), name
