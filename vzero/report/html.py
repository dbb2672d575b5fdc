"""The report page: one HTML string with inline CSS and every image as a data URI (no script, no external file).

Everything that comes from the run (ids, questions, decoded tokens, config text) is escaped. Tokens are coloured by
Δ = lp_pos - lp_neg on a diverging scale (green: the teacher supports the token more with the evidence than without;
red: less), saturating at `delta_scale` (the 95th percentile of |Δ| over the gallery, printed in the legend); hovering
a token shows its numbers. Knows nothing about files or how the content was gathered.
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field
from typing import Any

from vzero.report.gallery import GalleryPrompt, Response, Token
from vzero.report.plots import Figure

GREEN, RED = (22, 163, 74), (220, 38, 38)

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1f2328;background:#f6f8fa}
main{max-width:1280px;margin:0 auto;padding:16px 24px 48px}
h1{font-size:22px;margin:8px 0 2px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #d0d7de}
h3{font-size:15px;margin:0 0 8px}.sub{color:#57606a;margin:0 0 12px}
nav a{margin-right:14px}
table.facts td{padding:1px 12px 1px 0;vertical-align:top}table.facts td:first-child{color:#57606a}
.notes{background:#fff8c5;border:1px solid #d4a72c;border-radius:6px;padding:8px 16px}
.grid{display:flex;flex-wrap:wrap;gap:12px}
.grid figure{margin:0;background:#fff;border:1px solid #d0d7de;border-radius:6px}
.grid img{display:block;max-width:100%}
.prompt{background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:14px;margin:14px 0}
.views{display:flex;flex-wrap:wrap;gap:14px;align-items:flex-start}.views figure{margin:0}
.views img{display:block;height:224px;image-rendering:pixelated;border:1px solid #d0d7de}.views img.full{height:300px}
figcaption{font-size:12px;color:#57606a;margin-top:4px;max-width:320px}
.question{font-size:15px;margin:10px 0}.responses{list-style:none;padding:0;margin:0}
.responses li{border-top:1px solid #eaeef2;padding:6px 0;display:flex;gap:10px;align-items:baseline}
.badge{font:600 12px ui-monospace,monospace;border-radius:10px;padding:1px 8px;white-space:nowrap;
border:1px solid #afb8c1}
.meta{font-size:12px;color:#57606a;white-space:nowrap}
.tokens{font:13px/1.9 ui-monospace,SFMono-Regular,Menlo,monospace;white-space:pre-wrap;word-break:break-word}
.tokens span{border-radius:3px;padding:1px 0}
.tokens .special{color:#57606a;font-style:italic;outline:1px dotted #afb8c1}
.legend span{display:inline-block;width:46px;text-align:center;font:12px ui-monospace,monospace;margin-right:2px}
pre{background:#fff;border:1px solid #d0d7de;border-radius:6px;padding:12px;overflow:auto;font-size:12px}
.pnote{color:#9a6700;font-size:12px}
"""


@dataclass
class Page:
    title: str
    subtitle: str
    facts: list[tuple[str, str]]
    notes: list[str]
    curves: list[Figure]
    histograms: list[Figure]
    gallery: list[GalleryPrompt]
    gallery_caption: str
    config_text: str
    versions: dict[str, dict[str, str]]  # heading -> versions
    footer: str
    gate: dict[str, Any] = field(default_factory=dict)  # enabled, level, w_min, w_max


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def delta_scale(items: list[GalleryPrompt]) -> float:
    """The |Δ| at which token colours saturate: the 95th percentile over the gallery (at least 0.05)."""
    values = sorted(abs(t.delta) for it in items for r in it.responses for t in r.tokens if math.isfinite(t.delta))
    return max(0.05, values[int(0.95 * (len(values) - 1))]) if values else 1.0


def _rgba(colour: tuple[int, int, int], strength: float) -> str:
    alpha = 0.08 + 0.72 * max(0.0, min(1.0, strength))
    return f"rgba({colour[0]},{colour[1]},{colour[2]},{alpha:.2f})"


def _token(t: Token, scale: float) -> str:
    esc = html.escape
    text = t.text.replace("\n", "⏎\n") if t.text else "\u200b"
    tip = f"token {t.id}: Δ {t.delta:+.3f} (lp_pos {t.lp_pos:.3f}, lp_neg {t.lp_neg:.3f})"
    if t.weight is not None:
        tip += f", token weight {t.weight:.3f}"
    colour = GREEN if t.delta >= 0 else RED
    style = _rgba(colour, abs(t.delta) / scale) if math.isfinite(t.delta) else "transparent"
    cls = ' class="special"' if t.special else ""
    return f'<span{cls} style="background:{style}" title="{esc(tip)}">{esc(text)}</span>'


def _badge(r: Response, gate: dict[str, Any]) -> str:
    if not gate.get("enabled", True):
        return f'<span class="badge" title="gate disabled: every weight is 1">w {r.weight:.2f} (gate off)</span>'
    w, lo, hi = r.weight, float(gate.get("w_min", 0.0)), float(gate.get("w_max", 2.0))
    if not math.isfinite(w):
        return '<span class="badge">w ?</span>'
    strength = (w - 1) / (hi - 1) if w >= 1 and hi > 1 else (1 - w) / (1 - lo) if w < 1 and lo < 1 else 0.0
    style = _rgba(GREEN if w >= 1 else RED, strength)
    title = "mean of the token weights" if gate.get("level") == "token" else "sequence gate weight"
    return f'<span class="badge" style="background:{style}" title="{title}">w {w:.2f}</span>'


def _response(r: Response, scale: float, gate: dict[str, Any]) -> str:
    meta = f"#{r.sample_index} · {len(r.tokens)} tok · {r.finish_reason} · mean Δ {r.mean_delta:+.3f}"
    tokens = "".join(_token(t, scale) for t in r.tokens)
    return (
        f'<li>{_badge(r, gate)}<span class="meta">{html.escape(meta)}</span>'
        f'<div class="tokens" title="{html.escape(r.text)}">{tokens}</div></li>'
    )


def _prompt(item: GalleryPrompt, scale: float, gate: dict[str, Any]) -> str:
    esc = html.escape
    head = f"step {item.step} · {item.uid}" + (f" · {item.source}" if item.source else "")
    captions = {
        "full": f"full image: what the student sees ({item.boxes})",
        "positive": "positive view: the evidence crop the teacher sees",
        "negative": f"negative view ({item.negative_mode})",
    }
    figs = "".join(
        f'<figure><img class="{k}" src="{data_uri(item.images[k])}" alt="{esc(k)} view of {esc(item.uid)}">'
        f"<figcaption>{esc(c)}</figcaption></figure>"
        for k, c in captions.items()
        if k in item.images
    )
    notes = "".join(f'<p class="pnote">{esc(n)}</p>' for n in item.notes)
    question = f'<p class="question"><b>Q:</b> {esc(item.question)}</p>' if item.question is not None else ""
    responses = "".join(_response(r, scale, gate) for r in item.responses)
    return (
        f'<article class="prompt" data-uid="{esc(item.uid)}"><h3>{esc(head)}</h3><div class="views">{figs}</div>'
        f'{notes}{question}<ol class="responses">{responses}</ol></article>'
    )


def _figures(figs: list[Figure], folder: str) -> str:
    return "".join(
        f'<figure><img src="{data_uri(f.png)}" alt="{html.escape(f.title)}" title="{folder}/{f.name}.png"></figure>'
        for f in figs
    )


def _legend(scale: float) -> str:
    cells = []
    for k in (-1.0, -0.5, -0.1, 0.1, 0.5, 1.0):
        cells.append(f'<span style="background:{_rgba(GREEN if k > 0 else RED, abs(k))}">{k * scale:+.2f}</span>')
    return f'<p class="legend">Token colour = Δ (saturates at ±{scale:.2f}): {"".join(cells)}</p>'


def render_page(page: Page) -> str:
    esc = html.escape
    scale = delta_scale(page.gallery)
    facts = "".join(f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in page.facts)
    notes = (
        '<section id="notes"><div class="notes"><b>Notes</b><ul>'
        + "".join(f"<li>{esc(n)}</li>" for n in page.notes)
        + "</ul></div></section>"
        if page.notes
        else ""
    )
    gallery = "".join(_prompt(it, scale, page.gate) for it in page.gallery) or "<p>No prompts to show.</p>"
    versions = "".join(
        f"<h3>{esc(head)}</h3><table class='facts'>"
        + "".join(f"<tr><td>{esc(k)}</td><td>{esc(str(v))}</td></tr>" for k, v in vs.items())
        + "</table>"
        for head, vs in page.versions.items()
    )
    curves = _figures(page.curves, "curves") or "<p>No metrics yet.</p>"
    histograms = _figures(page.histograms, "histograms") or "<p>No trajectories to histogram.</p>"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(page.title)}</title><style>{CSS}</style></head>
<body><main>
<h1>{esc(page.title)}</h1><p class="sub">{esc(page.subtitle)}</p>
<nav><a href="#curves">Curves</a><a href="#histograms">Histograms</a><a href="#gallery">Gallery</a>
<a href="#config">Config and versions</a></nav>
<table class="facts">{facts}</table>
{notes}
<section id="curves"><h2>Curves per step</h2><div class="grid">{curves}</div></section>
<section id="histograms"><h2>Gate weights and Δ</h2><div class="grid">{histograms}</div></section>
<section id="gallery"><h2>Gallery</h2><p>{esc(page.gallery_caption)}</p>{_legend(scale)}{gallery}</section>
<section id="config"><h2>Config and versions</h2><pre>{esc(page.config_text or "(no config.yaml)")}</pre>
{versions}</section>
<p class="sub">{esc(page.footer)}</p>
</main></body></html>
"""
