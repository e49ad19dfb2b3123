"""Token caches: a training set encoded once by a frozen tokenizer, stored as an HF `datasets` table.

`arzoo tokenize --config <generator recipe>` writes one (see `write_token_cache`); a data module
with `token_cache: <dir>` then trains from it (`TokenCacheDataset`), so the generator no longer
runs the tokenizer on every training step. Only the training split is cached: validation images
are few and the image metrics need them as images.

On disk: the `datasets` table (`Dataset.save_to_disk`) with columns `tokens` (the flat token
positions of `BaseGenerator.tokenize`: every scale, row-major, coarse to fine), `tokens_flip`
(the same for the horizontally flipped image, present when the data module flips) and `label`;
plus `token_cache.json` naming the tokenizer (spec and a fingerprint of its weights) and the data
it was made from, so a mismatched cache is refused instead of silently training on wrong tokens.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from arzoo.errors import CorruptFileError

META_FILE = "token_cache.json"
FORMAT_VERSION = 1


def tokenizer_fingerprint(tokenizer: torch.nn.Module) -> str:
    """SHA-1 of a tokenizer's state dict (names, shapes, dtypes and values), to tell caches apart."""
    digest = hashlib.sha1()
    for name, tensor in sorted(tokenizer.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def write_token_cache(
    batches: Iterable[dict[str, Any]],
    encode: Callable[[torch.Tensor], torch.Tensor],
    out_dir: str | Path,
    *,
    flips: bool,
    vocab_size: int,
    meta: dict[str, Any],
) -> Path:
    """Encode `batches` of images (`image`, `label`) with `encode` (images -> (B, N) tokens) and save the table.

    With `flips`, the horizontal flip of every image is encoded too (column `tokens_flip`).
    `meta` (tokenizer and data description) is written to `token_cache.json` next to the table.
    """
    import datasets

    # the smallest integer type that holds every token id: int16 covers LlamaGen's 16,384 codes
    dtype = "int16" if vocab_size <= 2**15 else "int32"

    def rows() -> Iterable[dict[str, Any]]:
        for batch in batches:
            images, labels = batch["image"], batch["label"]
            if len(images) == 0:  # every image of this batch was unreadable
                continue
            tokens = encode(images).cpu()
            flipped = encode(images.flip(-1)).cpu() if flips else None
            for i in range(len(tokens)):
                row = {"tokens": tokens[i].tolist(), "label": int(labels[i])}
                if flipped is not None:
                    row["tokens_flip"] = flipped[i].tolist()
                yield row

    columns = {"tokens": datasets.Sequence(datasets.Value(dtype)), "label": datasets.Value("int64")}
    if flips:
        columns["tokens_flip"] = datasets.Sequence(datasets.Value(dtype))
    out = Path(out_dir).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    # a fresh build cache next to the output: never a stale hit in the HF cache, no second copy left there
    with tempfile.TemporaryDirectory(prefix=".token-cache-build-", dir=out.parent) as build:
        table = datasets.Dataset.from_generator(rows, features=datasets.Features(columns), cache_dir=build)
        table.save_to_disk(str(out))
        num_rows = len(table)
        del table  # release the memory-mapped build files before the folder is removed
    meta = dict(meta, format_version=FORMAT_VERSION, num_rows=num_rows, flips=flips, vocab_size=vocab_size)
    (out / META_FILE).write_text(json.dumps(meta, indent=2))
    return out


def read_token_cache_meta(path: str | Path) -> dict[str, Any]:
    """The `token_cache.json` of a cache folder, with a clear error when `path` is not one."""
    folder = Path(path).expanduser()
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"token_cache {str(folder)!r} is not a token cache (no {META_FILE}); write one with "
            f"`arzoo tokenize --config <generator recipe> --out {folder}`"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptFileError(
            f"token cache file {str(meta_path)!r} could not be read (cut or corrupt JSON: {err}); re-run `arzoo tokenize`"
        ) from None
    if not isinstance(meta, dict):
        raise CorruptFileError(f"token cache file {str(meta_path)!r} is not a JSON object; re-run `arzoo tokenize`")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"token cache {str(folder)!r} has format version {meta.get('format_version')!r}, this arzoo reads "
            f"version {FORMAT_VERSION}; re-run `arzoo tokenize`"
        )
    for key, kind in (("num_rows", int), ("flips", bool), ("vocab_size", int)):
        if not isinstance(meta.get(key), kind):
            raise CorruptFileError(
                f"token cache file {str(meta_path)!r} has {key}={meta.get(key)!r}, expected a {kind.__name__}; "
                f"re-run `arzoo tokenize`"
            )
    return meta


def check_table(table: Any, meta: dict[str, Any], path: Path) -> None:
    """Refuse a table that does not match its `token_cache.json`: row count, ragged rows, ids outside the vocabulary."""
    import pyarrow.compute as pc

    if len(table) != meta["num_rows"]:
        raise CorruptFileError(
            f"token cache {str(path)!r} holds {len(table)} rows, but its {META_FILE} says {meta['num_rows']}; "
            f"re-run `arzoo tokenize`"
        )
    if len(table) == 0:
        raise CorruptFileError(f"token cache {str(path)!r} holds no rows; re-run `arzoo tokenize` on readable images")
    for column in ("tokens", "tokens_flip") if meta["flips"] else ("tokens",):
        lists = table.data.column(column)
        lengths = pc.list_value_length(lists)
        shortest, longest = pc.min(lengths).as_py(), pc.max(lengths).as_py()
        if shortest != longest:
            raise CorruptFileError(
                f"token cache {str(path)!r}: rows of column {column!r} hold {shortest} to {longest} tokens; "
                f"every image must have the same number"
            )
        values = pc.list_flatten(lists)
        low, high = pc.min(values).as_py(), pc.max(values).as_py()
        if low < 0 or high >= meta["vocab_size"]:
            bad = high if high >= meta["vocab_size"] else low
            raise CorruptFileError(
                f"token cache {str(path)!r} holds token id {bad} in column {column!r}, outside the tokenizer's "
                f"vocabulary [0, {meta['vocab_size']}); the cache is corrupt or from another tokenizer: re-run `arzoo tokenize`"
            )


def check_cache_matches(meta: dict[str, Any], path: str | Path, **expected: Any) -> None:
    """Raise a clear error for every `expected` key whose value differs from the cache's."""
    for key, value in expected.items():
        if meta.get(key) != value:
            raise ValueError(
                f"token cache {str(path)!r} was made with {key}={meta.get(key)!r}, but this run has "
                f"{key}={value!r}; re-run `arzoo tokenize` with this recipe (or point token_cache elsewhere)"
            )


def check_tokenizer(meta: dict[str, Any], path: str | Path, tokenizer: torch.nn.Module | None) -> None:
    """Refuse a cache written by another tokenizer than the one the generator holds (when it holds one)."""
    if tokenizer is None:
        return
    if tokenizer_fingerprint(tokenizer) != meta.get("tokenizer_fingerprint"):
        raise ValueError(
            f"token cache {str(path)!r} was encoded by another tokenizer ({meta.get('tokenizer_path')!r}, "
            f"weights {str(meta.get('tokenizer_fingerprint'))[:12]}) than this generator's "
            f"(weights {tokenizer_fingerprint(tokenizer)[:12]}); re-run `arzoo tokenize` with this recipe"
        )


class TokenCacheDataset(torch.utils.data.Dataset):
    """Rows of a token cache as `{"tokens": LongTensor (N,), "label": int}`; a random flip variant when `hflip`."""

    def __init__(self, path: str | Path, hflip: bool = False) -> None:
        import datasets

        self.path = Path(path).expanduser()
        self.meta = read_token_cache_meta(self.path)
        if hflip and not self.meta["flips"]:
            raise ValueError(
                f"the data module flips images (hflip: true) but token cache {str(self.path)!r} holds no flipped "
                f"tokens; re-run `arzoo tokenize` with hflip: true in the recipe, or set hflip: false"
            )
        self.hflip = hflip
        columns = ["tokens", "label"] + (["tokens_flip"] if hflip else [])
        try:
            table = datasets.load_from_disk(str(self.path))
        except Exception as err:  # noqa: BLE001 - arrow/JSON errors of a damaged folder: one line naming it
            raise CorruptFileError(
                f"token cache {str(self.path)!r} could not be read ({type(err).__name__}: {str(err).splitlines()[0]}); "
                f"re-run `arzoo tokenize`"
            ) from None
        check_table(table, self.meta, self.path)
        self.table = table.with_format("torch", columns=columns)

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.table[index]
        # the same coin as `maybe_flip` on images: worker RNGs are seeded by Lightning
        key = "tokens_flip" if self.hflip and torch.rand(()) < 0.5 else "tokens"
        return {"tokens": row[key].long(), "label": int(row["label"])}


def collate_tokens(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack cached token rows into a batch `{"tokens": (B, N), "label": (B,)}`."""
    return {
        "tokens": torch.stack([item["tokens"] for item in items]),
        "label": torch.tensor([item["label"] for item in items], dtype=torch.long),
    }
