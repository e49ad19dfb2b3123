"""Write the leaderboard of a suite run as Markdown, JSON and one self-contained HTML page."""

from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path
from typing import Any, Callable

from arzoo.bench.plots import scatter_svg

# (header, row key, formatter); measured rows are ranked by FID (lower is better)
Column = tuple[str, str, Callable[[Any], str]]


def _num(fmt: str) -> Callable[[Any], str]:
    return lambda v: "–" if v is None else format(v, fmt)


def _params(v: Any) -> str:
    if v is None:
        return "–"
    return f"{v / 1e9:.2f}B" if v >= 1e9 else f"{v / 1e6:.2f}M"


def _flops(v: Any) -> str:
    return "–" if v is None else f"{v / 1e9:.3g}"


MEASURED_COLUMNS: list[Column] = [
    ("entry", "name", str),
    ("paradigm", "paradigm", str),
    ("FID ↓", "fid", _num(".2f")),
    ("IS ↑", "is_mean", _num(".2f")),
    ("precision ↑", "precision", _num(".3f")),
    ("recall ↑", "recall", _num(".3f")),
    ("class acc ↑", "class_accuracy", _num(".3f")),
    ("val loss (unigram)", "val_loss_text", str),
    ("val loss by step", "val_loss_steps_text", str),
    ("context gain ↑", "val_context_gain", _num(".3f")),
    ("forward passes / image", "forward_passes", _num(".0f")),
    ("sampling img/s", "sampling_images_per_s", _num(".1f")),
    ("latency (batch)", "latency_text", str),
    ("train img/s", "train_images_per_s", _num(".0f")),
    ("train s", "train_wall_s", _num(".0f")),
    ("train images", "train_images", _num(",")),
    ("params", "params", _params),
    ("peak sampling MB", "peak_sampling_memory_mb", _num(".0f")),
    ("GFLOPs / image", "flops_per_image", _flops),
    ("overrides", "overrides_text", str),
]
CONTEXT_NOTE = (
    "Val loss by step: the held-out loss of the first to the last quarter of the generation steps. "
    "Context gain: how many nats per token the held-out loss rises when each image's context is another "
    "image's (labels kept, step 0 excluded); near 0 means the model predicts from the class and the position "
    "alone and ignores what it has generated."
)
REFERENCE_COLUMNS: list[Column] = [
    ("tokenizer", "tokenizer", str),
    ("row", "kind", str),
    ("FID", "fid", _num(".2f")),
    ("IS", "is_mean", _num(".2f")),
    ("precision", "precision", _num(".3f")),
    ("recall", "recall", _num(".3f")),
    ("PSNR dB", "psnr_db", _num(".2f")),
    ("unigram loss", "unigram_loss", _num(".3f")),
]
REPORTED_COLUMNS: list[Column] = [
    ("model", "model", str),
    ("paradigm", "paradigm", str),
    ("FID", "fid", _num(".2f")),
    ("IS", "is", _num(".1f")),
    ("params", "params", _params),
    ("steps", "steps", _num("d")),
    ("source", "citation", str),
]


def _prepare(row: dict[str, Any]) -> dict[str, Any]:
    row = dict(row)
    if row.get("val_loss") is not None:
        unigram = row.get("val_unigram_loss")
        row["val_loss_text"] = f"{row['val_loss']:.3f}" + (f" ({unigram:.3f})" if unigram is not None else "")
    else:
        row["val_loss_text"] = "–"
    steps = [row[f"val_loss_q{q}"] for q in range(1, 5) if row.get(f"val_loss_q{q}") is not None]
    row["val_loss_steps_text"] = " → ".join(f"{v:.2f}" for v in steps) or "–"
    if row.get("latency_s") is not None:
        row["latency_text"] = f"{row['latency_s']:.2f} s ({row.get('latency_batch')})"
    else:
        row["latency_text"] = "–"
    parts = [f"{k}={v}" for k, v in (row.get("overrides") or {}).items()]
    parts += [f"eval.{k}={v}" for k, v in (row.get("evaluation_overrides") or {}).items()]
    row["overrides_text"] = ", ".join(parts) or "–"
    return row


def ranked(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Measured rows best FID first (rows without a FID last)."""
    return sorted(rows, key=lambda r: (r.get("fid") is None, r.get("fid") or 0.0))


def _table(columns: list[Column], rows: list[dict[str, Any]], rank: bool) -> list[str]:
    header = (["#"] if rank else []) + [c[0] for c in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, row in enumerate(rows, 1):
        cells = ([str(i)] if rank else []) + [fmt(row.get(key)) for _, key, fmt in columns]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return lines


def markdown(board: dict[str, Any]) -> str:
    """The leaderboard as Markdown."""
    rows = [_prepare(r) for r in ranked(board["rows"])]
    out = [f"# arzoo leaderboard — suite `{board['suite']}`", ""]
    out += [f"Produced by `arzoo bench --suite {board['suite']}` on {board['created']} (arzoo {board['arzoo_version']}, torch {board['torch_version']}).", ""]
    out += ["## Measured (ranked by FID)", ""] + _table(MEASURED_COLUMNS, rows, rank=True) + ["", CONTEXT_NOTE, ""]
    out += ["## Tokenizer reference rows (not ranked)", "", "Reconstruction = the ceiling a generator on that tokenizer can reach; random tokens = the floor.", ""]
    out += _table(REFERENCE_COLUMNS, board["reference_rows"], rank=False) + [""]
    out += ["## Fairness and settings", ""] + [f"- {rule}" for rule in board["fairness"]] + [""]
    out += ["## Machine and provenance", ""] + [f"- {k}: {v}" for k, v in board["machine"].items()]
    out += [f"- feature network: {json.dumps(board['feature_net'])}", ""]
    out += ["| entry | recipe | config hash | seed | tokenizer |", "|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['name']} | `{r['recipe']}` | `{r['config_hash']}` | {r['seed']} | {r.get('tokenizer') or '–'} |")
    if board.get("reported"):
        out += ["", "## Reported by the papers (ImageNet 256×256; not measured here, not ranked with the rows above)", ""]
        out += _table(REPORTED_COLUMNS, board["reported"], rank=False)
    return "\n".join(out) + "\n"


def _html_table(columns: list[Column], rows: list[dict[str, Any]], rank: bool) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in (["#"] if rank else []) + [c[0] for c in columns])
    body = []
    for i, row in enumerate(rows, 1):
        cells = ([str(i)] if rank else []) + [fmt(row.get(key)) for _, key, fmt in columns]
        body.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def html_page(board: dict[str, Any], folder: Path) -> str:
    """One self-contained page: the table, one sample grid per entry (inline PNG) and two plots."""
    rows = [_prepare(r) for r in ranked(board["rows"])]
    grids = []
    for r in rows:
        path = folder / r["entry_folder"] / r["grid"] if r.get("grid") else None
        if path and path.is_file():
            data = base64.b64encode(path.read_bytes()).decode()
            grids.append(
                f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(r['name'])} samples'>"
                f"<figcaption>{html.escape(r['name'])} ({html.escape(r['paradigm'])}) — FID {_num('.2f')(r.get('fid'))}</figcaption></figure>"
            )
    speed = scatter_svg([(r["name"], r.get("sampling_images_per_s"), r.get("fid")) for r in rows],
                        "sampling throughput (images/s, log)", "FID (lower is better)", "quality vs sampling throughput", log_x=True)
    steps = scatter_svg([(r["name"], r.get("forward_passes"), r.get("fid")) for r in rows],
                        "forward passes per image (log)", "FID (lower is better)", "quality vs forward steps", log_x=True)
    reported = ""
    if board.get("reported"):
        reported = ("<h2>Reported by the papers (ImageNet 256×256, not measured here)</h2>"
                    + _html_table(REPORTED_COLUMNS, board["reported"], rank=False))
    machine = "".join(f"<li>{html.escape(str(k))}: {html.escape(str(v))}</li>" for k, v in board["machine"].items())
    fairness = "".join(f"<li>{html.escape(rule)}</li>" for rule in board["fairness"])
    style = (
        "body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;font-size:13px}"
        "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}td:nth-child(2),td:nth-child(3){text-align:left}"
        "th{background:#f3f3f3}figure{display:inline-block;margin:6px}img{image-rendering:pixelated;width:256px}"
        ".plots svg{margin-right:24px;border:1px solid #eee}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>arzoo leaderboard: {html.escape(board['suite'])}</title>"
        f"<style>{style}</style></head><body>"
        f"<h1>arzoo leaderboard — suite <code>{html.escape(board['suite'])}</code></h1>"
        f"<p>{html.escape(board['created'])} · arzoo {html.escape(board['arzoo_version'])} · torch {html.escape(board['torch_version'])}</p>"
        f"<h2>Measured (ranked by FID)</h2>{_html_table(MEASURED_COLUMNS, rows, rank=True)}<p>{html.escape(CONTEXT_NOTE)}</p>"
        f"<h2>Tokenizer reference rows</h2>{_html_table(REFERENCE_COLUMNS, board['reference_rows'], rank=False)}"
        f"<h2>Plots</h2><div class='plots'>{speed}{steps}</div>"
        f"<h2>Samples (8 per class, one row per class)</h2>{''.join(grids)}"
        f"<h2>Fairness and settings</h2><ul>{fairness}</ul><h2>Machine</h2><ul>{machine}</ul>"
        f"{reported}</body></html>"
    )


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_leaderboard(board: dict[str, Any], folder: Path) -> list[Path]:
    """Write leaderboard.{md,json,html} into `folder`; return their paths."""
    paths = [folder / "leaderboard.md", folder / "leaderboard.json", folder / "leaderboard.html"]
    _atomic_write(paths[0], markdown(board))
    _atomic_write(paths[1], json.dumps(board, indent=1, default=str) + "\n")
    _atomic_write(paths[2], html_page(board, folder))
    return paths
