"""An HTML view of what L3 does: each token shaded by its vanilla surprisal and its L3
masking probability (calibrated and the authors' paper mapping), one text per block."""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from l3m.masking.l3 import calibrated_probs, paper_probs, surprisal

_CSS = """
body{font-family:system-ui,sans-serif;max-width:70em;margin:2em auto;color:#222}
.row{margin:.4em 0;line-height:2.1em}.lab{display:inline-block;width:9em;color:#666;font-size:.85em}
.t{padding:.15em .2em;margin:0 1px;border-radius:3px}.sp{color:#aaa}
.legend span{padding:.2em .6em;margin-right:.3em;border-radius:3px}
"""


def _cell(token: str, value: float, vmax: float, rgb: tuple[int, int, int], tip: str) -> str:
    alpha = 0.0 if not np.isfinite(value) else min(1.0, max(0.0, value / vmax)) if vmax > 0 else 0.0
    r, g, b = rgb
    return (f'<span class="t" style="background:rgba({r},{g},{b},{alpha:.2f})" '
            f'title="{html.escape(tip)}">{html.escape(token)}</span>')


def render_token_view(tokens: Sequence[Sequence[str]], token_logp: Sequence[np.ndarray], *, rate: float,
                      titles: Sequence[str] | None = None, heading: str = "L3Masking token view") -> str:
    """Three shaded rows per text: surprisal -log p, L3 calibrated p_i, L3 paper p_i."""
    blocks = []
    for i, (toks, logp) in enumerate(zip(tokens, token_logp, strict=True)):
        lp = torch.from_numpy(np.array(logp, dtype=np.float32))[None, :]  # a copy: store arrays are read-only
        content = torch.isfinite(lp)
        s = surprisal(lp, content)
        cal, pap = calibrated_probs(s, content, rate)[0].numpy(), paper_probs(s, content, rate)[0].numpy()
        s_np = np.where(content[0].numpy(), s[0].numpy(), np.nan)
        smax = float(np.nanmax(s_np)) if np.isfinite(s_np).any() else 1.0
        rows = []
        for label, vals, vmax, rgb in (("surprisal", s_np, smax, (230, 80, 40)),
                                       ("p (calibrated)", cal, 1.0, (40, 110, 220)),
                                       ("p (paper)", pap, 1.0, (60, 160, 80))):
            cells = []
            for j, tok in enumerate(toks):
                if not content[0, j]:
                    cells.append(f'<span class="t sp">{html.escape(tok)}</span>')
                    continue
                tip = f"-log p = {s_np[j]:.2f}, p_cal = {cal[j]:.3f}, p_paper = {pap[j]:.3f}"
                cells.append(_cell(tok, float(vals[j]), vmax, rgb, tip))
            rows.append(f'<div class="row"><span class="lab">{label}</span>{"".join(cells)}</div>')
        n = int(content.sum())
        summary = (f"{n} content tokens; expected masked: calibrated {cal.sum():.2f} ({cal.sum() / max(n, 1):.3f}), "
                   f"paper {pap.sum():.2f} ({pap.sum() / max(n, 1):.3f}); target rate {rate}")
        title = html.escape(titles[i]) if titles else f"text {i}"
        blocks.append(f"<h3>{title}</h3><p>{summary}</p>{''.join(rows)}")
    legend = ("<p class='legend'>Darker = higher. <span style='background:rgba(230,80,40,.7)'>surprisal</span>"
              "<span style='background:rgba(40,110,220,.7)'>masking probability, calibrated</span>"
              "<span style='background:rgba(60,160,80,.7)'>masking probability, paper</span> "
              "Hover a token for its numbers. Grey tokens are special tokens (never masked).</p>")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(heading)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{html.escape(heading)}</h1>{legend}{''.join(blocks)}</body></html>")


def write_token_view(path: str | Path, tokens: Sequence[Sequence[str]], token_logp: Sequence[np.ndarray], *,
                     rate: float, titles: Sequence[str] | None = None, heading: str = "L3Masking token view") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_token_view(tokens, token_logp, rate=rate, titles=titles, heading=heading), encoding="utf-8")
    return path
