"""`arzoo export`: a checkpoint to a self-contained folder of safetensors weights + JSON config."""

from __future__ import annotations

from pathlib import Path


def export(ckpt_path: str, out: str) -> Path:
    """Export a generator or tokenizer checkpoint as `<out>/model.safetensors` + `<out>/config.json`.

    A generator's folder also holds its tokenizer (spec in the config, weights in the safetensors
    file), so it loads without any other file: `arzoo.from_pretrained(out)`. Loading the folder
    never unpickles anything.

    Args:
        ckpt_path: a checkpoint written by `arzoo fit` (generator or tokenizer), e.g. runs/digits/raster/last.ckpt.
        out: folder to write (created if missing; existing files of the same name are replaced).
    """
    from arzoo.pretrained import CONFIG_NAME, WEIGHTS_NAME, export_checkpoint, read_pretrained_config

    folder = export_checkpoint(ckpt_path, out)
    config = read_pretrained_config(folder)
    size = (folder / WEIGHTS_NAME).stat().st_size / 2**20
    print(f"exported {config['kind']} {config['class_path']} to {folder}: {WEIGHTS_NAME} ({size:.1f} MiB), "
          f"{CONFIG_NAME}")
    return folder


def main(args: list[str]) -> None:
    """Parse `arzoo export ...` arguments from the signature of `export`."""
    from jsonargparse import CLI

    CLI(export, args=args, prog="arzoo export", as_positional=False)
