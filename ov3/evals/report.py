"""Evaluation results as a console table, JSON and markdown, beside the paper's numbers.

The paper (OpenVision 3, arXiv 2601.15369) reports reconstruction on ImageNet val at
256 px, for OV3 and for the FLUX VAE alone (the upper bound of any encoder on that VAE);
nothing else it reports is an evaluator here (its understanding numbers are LLaVA
benchmarks), so only `reconstruction` rows get reference columns. Our numbers are at
`config.image_size` on whatever split was configured: compare like with like.
"""

from __future__ import annotations

import json
import math
from typing import Any

from ov3 import paths

# metric -> value, ImageNet val 256 px.
PAPER = {
    "OV3": {"psnr": 30.92, "ssim": 0.902, "lpips": 0.053, "rfid": 0.187},
    "FLUX VAE": {"psnr": 32.86, "ssim": 0.917, "lpips": 0.044, "rfid": 0.176},
}
PAPER_NOTE = ("Paper columns: OpenVision 3 (arXiv 2601.15369), reconstruction on ImageNet val at "
              "256 px; 'FLUX VAE' is the VAE alone (compare with vae_only=True).")

Row = tuple[str, str, str, float, dict[str, float | None]]


def paper_values(spec: dict[str, Any], metric: str) -> dict[str, float | None]:
    """{"OV3": value or None, "FLUX VAE": ...} for this evaluator and metric."""
    if spec.get("type") != "reconstruction":
        return dict.fromkeys(PAPER)
    return {who: numbers.get(metric) for who, numbers in PAPER.items()}


def rows(results: dict[str, dict[str, float]], specs: dict[str, dict[str, Any]]) -> list[Row]:
    out = []
    for name, values in results.items():
        kind = specs[name]["type"] + (" (vae_only)" if specs[name].get("vae_only") else "")
        out += [(name, kind, metric, value, paper_values(specs[name], metric)) for metric, value in values.items()]
    return out


def _fmt(v: float | None) -> str:
    if v is None:
        return ""
    if math.isinf(v) or math.isnan(v):
        return str(v)
    return f"{v:.4f}" if abs(v) < 1000 else f"{v:.1f}"


def _cells(r: Row) -> tuple[str, ...]:
    name, kind, metric, value, paper = r
    return (name, kind, metric, _fmt(value), *(_fmt(paper[who]) for who in PAPER))


HEADER = ("evaluator", "type", "metric", "value", *(f"paper {who}" for who in PAPER))


def table(results: dict[str, dict[str, float]], specs: dict[str, dict[str, Any]]) -> str:
    """Plain-text table for the console."""
    body = [_cells(r) for r in rows(results, specs)]
    widths = [max(len(r[i]) for r in [HEADER, *body]) for i in range(len(HEADER))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(HEADER), line(tuple("-" * w for w in widths)), *map(line, body)])


def markdown(results: dict[str, dict[str, float]], specs: dict[str, dict[str, Any]], title: str) -> str:
    out = [f"# {title}", "", "| " + " | ".join(HEADER) + " |", "|---|---|---|" + "---:|" * (len(HEADER) - 3)]
    table_rows = rows(results, specs)
    out += ["| " + " | ".join(_cells(r)) + " |" for r in table_rows]
    if any(v is not None for r in table_rows for v in r[4].values()):
        out += ["", PAPER_NOTE]
    return "\n".join(out) + "\n"


def write(workdir: paths.Path, step: int, results: dict[str, dict[str, float]],
          specs: dict[str, dict[str, Any]], extra: dict[str, Any]) -> tuple[paths.Path, paths.Path]:
    """DIR/eval_<step>.json and DIR/eval_<step>.md; evaluators of an earlier run on the same
    step that this one did not redo (`--only`) are kept."""
    js, md = workdir / f"eval_{step}.json", workdir / f"eval_{step}.md"
    if js.is_file():
        try:
            old = json.loads(js.read_text())
            results = {**{n: v for n, v in old["results"].items() if n not in results}, **results}
            specs = {**{n: v for n, v in old["specs"].items() if n not in specs}, **specs}
        except (ValueError, KeyError):
            pass  # not ours or damaged: overwritten
    paper = {}
    for name, values in results.items():
        for who in PAPER:
            found = {m: paper_values(specs[name], m)[who] for m in values}
            found = {m: v for m, v in found.items() if v is not None}
            if found:
                paper.setdefault(name, {})[who] = found
    doc = {"step": step, **extra, "results": results, "specs": specs, "paper": paper, "paper_note": PAPER_NOTE}
    js.write_text(json.dumps(doc, indent=2, default=str, allow_nan=True) + "\n")
    size = f", {extra['image_size']} px" if "image_size" in extra else ""
    md.write_text(markdown(results, specs, f"ov3 evaluation of {workdir} at step {step}{size}"))
    return js, md
