"""Inline SVG charts for report.html: error heatmaps, colour bar, added error per layer, token
timeline and the audio time axis. Each function returns a self-contained ``<svg>`` as Markup;
every label that comes from data is escaped here, numbers are formatted here.

Heatmap layout (the report legend repeats this):

- x is time for both components: the talker's decode step (step s chooses codebook 0 of frame s)
  and the code predictor's frame, so the two heatmaps line up column for column;
- talker rows: the points of one step in execution order, top to bottom (embed, layer0..,
  logits);
- predictor rows: 15 bands, one per sub-step (0 at the top), each band holding that sub-step's
  points in execution order;
- colour: relative L2 on a log scale, fixed per report (tolerance x 1e-3 .. tolerance x 1e2) so
  prompts compare; blues are within tolerance, yellow to dark red over it; white is bit-identical,
  black NaN/inf, grey not compared;
- more than ``MAX_COLS`` steps are binned; a bin shows the worst (max) error of its steps, so a
  point over tolerance never disappears, and the first divergence is drawn as a box on its bin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from markupsafe import Markup, escape

from parity.report.png import data_uri, encode_palette

MAX_COLS = 400  # heatmap columns at most (steps are max-pooled into bins beyond this)
WIDTH = 1040  # SVG user units; CSS scales the charts to the page width
LEFT = 78  # room for row labels
RIGHT = 92  # room for the predictor's key to the rows inside each sub-step band
PLOT_W = WIDTH - LEFT - RIGHT
DECADES_BELOW, DECADES_ABOVE = 3, 2  # colour scale around the tolerance

MISSING, ZERO, NONFINITE = 0, 1, 255
_LO_IDX, _HI_IDX = 2, 253
# Within tolerance: pale green -> dark blue; over tolerance: yellow -> dark red.
_UNDER = ["#f7fcf0", "#ccebc5", "#7bccc4", "#2b8cbe", "#084081"]
_OVER = ["#fee08b", "#fc8d59", "#d73027", "#67001f"]
COLORS = {"missing": "#d9d9d9", "zero": "#ffffff", "nonfinite": "#000000", "marker": "#e7298a",
          "ref": "#1f78b4", "cand": "#ff7f00", "flip": "#d7191c", "forced": "#6a3d9a"}


def _rgb(hex_color: str) -> np.ndarray:
    return np.array([int(hex_color[i:i + 2], 16) for i in (1, 3, 5)], dtype=float)


def _ramp(colors: list[str], n: int) -> np.ndarray:
    anchors = np.array([_rgb(c) for c in colors])
    x = np.linspace(0, len(colors) - 1, n)
    lo = np.floor(x).astype(int).clip(0, len(colors) - 2)
    frac = (x - lo)[:, None]
    return anchors[lo] * (1 - frac) + anchors[lo + 1] * frac


class Scale:
    """Log colour scale of relative L2 around the tolerance, shared by every heatmap of a report."""

    def __init__(self, tolerance: float):
        tol = tolerance if tolerance and tolerance > 0 and math.isfinite(tolerance) else 1e-2
        self.tolerance = tol
        self.lo = math.log10(tol) - DECADES_BELOW
        self.hi = math.log10(tol) + DECADES_ABOVE
        n = _HI_IDX - _LO_IDX + 1
        self.t_tol = DECADES_BELOW / (DECADES_BELOW + DECADES_ABOVE)
        n_under = round(n * self.t_tol)
        palette = np.zeros((256, 3))
        palette[MISSING] = _rgb(COLORS["missing"])
        palette[ZERO] = _rgb(COLORS["zero"])
        palette[NONFINITE] = _rgb(COLORS["nonfinite"])
        palette[_LO_IDX:_LO_IDX + n_under] = _ramp(_UNDER, n_under)
        palette[_LO_IDX + n_under:_HI_IDX + 1] = _ramp(_OVER, n - n_under)
        self.palette = palette.round().astype(np.uint8)
        self.n_under = n_under

    def index(self, values: np.ndarray) -> np.ndarray:
        """Palette indices of relative-L2 values (NaN = not compared, inf = non-finite)."""
        v = np.asarray(values, dtype=float)
        out = np.full(v.shape, MISSING, dtype=np.uint8)
        finite_pos = np.isfinite(v) & (v > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            t = (np.log10(np.where(finite_pos, v, 1.0)) - self.lo) / (self.hi - self.lo)
        t = np.clip(t, 0.0, 1.0)
        # Values over the tolerance always land in the "over" colours, whatever the rounding.
        idx = _LO_IDX + np.floor(t * (_HI_IDX - _LO_IDX + 1)).clip(0, _HI_IDX - _LO_IDX)
        over = v > self.tolerance
        idx = np.where(over, np.maximum(idx, _LO_IDX + self.n_under), np.minimum(idx, _LO_IDX + self.n_under - 1))
        out[finite_pos] = idx[finite_pos].astype(np.uint8)
        out[v == 0] = ZERO
        out[np.isinf(v)] = NONFINITE
        return out

    def color(self, t: float) -> str:
        """Hex colour at fraction ``t`` of the scale (for the colour bar)."""
        i = _LO_IDX + min(int(t * (_HI_IDX - _LO_IDX + 1)), _HI_IDX - _LO_IDX)
        return "#%02x%02x%02x" % tuple(self.palette[i])


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def _pool_columns(grid: np.ndarray, max_cols: int) -> tuple[np.ndarray, int]:
    """Max-pool columns into bins of ``factor`` steps so that at most ``max_cols`` remain.
    NaN (not compared) loses to any value; inf (non-finite) wins."""
    n_cols = grid.shape[1]
    factor = max(1, math.ceil(n_cols / max_cols))
    if factor == 1:
        return grid, 1
    pad = (-n_cols) % factor
    g = np.pad(grid, ((0, 0), (0, pad)), constant_values=np.nan)
    g = np.where(np.isnan(g), -1.0, g).reshape(grid.shape[0], -1, factor).max(axis=2)
    return np.where(g < 0, np.nan, g), factor


def _axis_ticks(n: int, target: int = 10) -> list[int]:
    if n <= 1:
        return [0]
    raw = n / target
    mag = 10 ** math.floor(math.log10(raw)) if raw >= 1 else 1
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    return list(range(0, n, int(step)))


@dataclass
class Grid:
    """One component's relative L2 as rows (points in execution order) x steps."""

    component: str
    values: np.ndarray  # [rows, steps]; NaN = not compared, inf = non-finite
    keys: list[tuple[int, int]]  # (substep, layer) of each row
    labels: list[str]  # point name of each row
    step0: int  # step of column 0


def heatmap_grid(points: pd.DataFrame, component: str) -> Grid | None:
    """The grid of one component's points, or None when it has none."""
    df = points[points["component"] == component]
    if df.empty:
        return None
    rows = df[["substep", "layer"]].drop_duplicates().sort_values(["substep", "layer"])
    keys = [(int(s), int(l)) for s, l in rows.itertuples(index=False)]
    names = df.drop_duplicates(["substep", "layer"]).set_index(["substep", "layer"])["point"]
    labels = [str(names.get(k, k[1])) for k in keys]
    pivot = df.pivot_table(index=["substep", "layer"], columns="step", values="rel_l2", aggfunc="max", dropna=False)
    steps = np.arange(int(df["step"].min()), int(df["step"].max()) + 1)
    pivot = pivot.reindex(index=pd.MultiIndex.from_tuples(keys), columns=steps)
    return Grid(component, pivot.to_numpy(dtype=float), keys, labels, int(steps[0]))


def heatmap(g: Grid, scale: Scale, first: dict | None, max_cols: int = MAX_COLS, title: str = "") -> Markup:
    """SVG heatmap of one component's relative error, first divergence boxed when it lies here."""
    component, grid, keys, labels, step0 = g.component, g.values, g.keys, g.labels, g.step0
    pooled, factor = _pool_columns(grid, max_cols)
    n_rows, n_cols = pooled.shape
    predictor = component == "predictor"
    plot_h = 300 if predictor else max(48, min(200, 10 * n_rows))
    row_h = plot_h / n_rows
    col_w = PLOT_W / n_cols
    top, bottom = 8, 28
    height = top + plot_h + bottom
    png = data_uri(encode_palette(scale.index(pooled), scale.palette))
    n_steps = grid.shape[1]
    unit = "frame" if predictor else "step"
    out = [
        f'<svg class="heatmap" data-component="{component}" data-bin="{factor}" viewBox="0 0 {WIDTH} {height:.0f}" '
        f'width="{WIDTH}" height="{height:.0f}" role="img">',
        f"<title>{escape(title)}</title>",
        f'<image x="{LEFT}" y="{top}" width="{PLOT_W}" height="{plot_h:.1f}" preserveAspectRatio="none" '
        f'style="image-rendering:pixelated" href="{png}"/>',
        f'<rect x="{LEFT}" y="{top}" width="{PLOT_W}" height="{plot_h:.1f}" fill="none" stroke="#888" stroke-width=".5"/>',
    ]
    # Row labels: every point for short lists; sub-step bands for the predictor, with a key on the
    # right naming the rows inside a band (the same points, in the same order, in every band).
    if predictor:
        subs = [k[0] for k in keys]
        bands = sorted(set(subs))
        seps = []
        for b in bands:
            first_row = subs.index(b)
            n_in = subs.count(b)
            y_mid = top + (first_row + n_in / 2) * row_h
            out.append(f'<text x="{LEFT - 4}" y="{y_mid + 3:.1f}" text-anchor="end" class="lbl">sub {b}</text>')
            if first_row:
                seps.append(f"M{LEFT} {top + first_row * row_h:.1f}h{PLOT_W}")
        if seps:
            out.append(f'<path d="{"".join(seps)}" stroke="#fff" stroke-width="1"/>')
        out.append(_band_key(labels[:subs.count(bands[0])], top, row_h, plot_h))
    else:
        every = max(1, math.ceil(n_rows / (plot_h / 12)))
        for i, lab in enumerate(labels):
            # First and last rows always (embed, logits); others every few, never crowding the last.
            if i == n_rows - 1 or (i % every == 0 and i + every / 2 < n_rows - 1):
                out.append(f'<text x="{LEFT - 4}" y="{top + (i + .5) * row_h + 3:.1f}" text-anchor="end" class="lbl">{escape(lab)}</text>')
    # x axis in steps / frames.
    for s in _axis_ticks(n_steps):
        x = LEFT + (s / factor) * col_w
        out.append(f'<path d="M{x:.1f} {top + plot_h:.1f}v4" stroke="#555"/>'
                   f'<text x="{x:.1f}" y="{top + plot_h + 15:.1f}" text-anchor="middle" class="lbl">{s + step0}</text>')
    binned = f", {factor} {unit}s per column (max)" if factor > 1 else ""
    out.append(f'<text x="{LEFT + PLOT_W}" y="{height - 2:.0f}" text-anchor="end" class="lbl">{unit}{binned}</text>')
    # The first divergence: a box on its cell (at least 9 units so it is always visible), and a
    # dashed line through the column; on the other component's heatmap just the line.
    if first is not None:
        col = (int(first["step"]) - step0) // factor
        x = LEFT + col * col_w
        cx = x + col_w / 2
        if first.get("component") == component:
            key = (int(first.get("substep", -1)), int(first.get("layer", -1)))
            row = keys.index(key) if key in keys else 0
            cy = top + (row + .5) * row_h
            w, h = max(col_w + 4, 12), max(row_h + 4, 12)
            right = cx + w / 2 + 110 < LEFT + PLOT_W
            label_x = cx + w / 2 + 3 if right else cx - w / 2 - 3
            out.append(
                f'<g class="first-divergence" data-step="{int(first["step"])}" data-row="{row}">'
                f'<path d="M{cx:.1f} {top}V{top + plot_h:.1f}" stroke="{COLORS["marker"]}" stroke-dasharray="3 3" stroke-width="1"/>'
                f'<rect x="{cx - w / 2:.1f}" y="{cy - h / 2:.1f}" width="{w:.1f}" height="{h:.1f}" fill="none" '
                f'stroke="#fff" stroke-width="3"/>'
                f'<rect x="{cx - w / 2:.1f}" y="{cy - h / 2:.1f}" width="{w:.1f}" height="{h:.1f}" fill="none" '
                f'stroke="{COLORS["marker"]}" stroke-width="1.5"><title>first divergence</title></rect>'
                f'<text x="{label_x:.1f}" y="{cy + 3:.1f}" text-anchor="{"start" if right else "end"}" class="lbl" '
                f'fill="{COLORS["marker"]}" stroke="#fff" stroke-width="3" paint-order="stroke">first divergence</text></g>'
            )
        elif 0 <= col < n_cols:
            out.append(f'<path class="divergence-time" d="M{cx:.1f} {top}V{top + plot_h:.1f}" '
                       f'stroke="{COLORS["marker"]}" stroke-dasharray="3 3" stroke-width="1"/>')
    out.append("</svg>")
    return Markup("".join(out))


def _band_key(names: list[str], top: float, row_h: float, plot_h: float) -> str:
    """Right of the predictor heatmap: the names of the rows inside one sub-step band, each with a
    leader line to its row in the first band."""
    x0 = LEFT + PLOT_W
    spacing = 13.0
    room = int((plot_h - 14) // spacing)
    every = max(1, math.ceil(len(names) / max(room, 1)))
    out = [f'<g class="band-key"><text x="{x0 + 6}" y="{top + 8}" class="lbl" font-weight="600">rows per band</text>']
    shown = [i for i in range(len(names)) if i % every == 0 or i == len(names) - 1]
    for j, i in enumerate(shown):
        y_row = top + (i + .5) * row_h
        y_text = top + 22 + j * spacing
        out.append(f'<path d="M{x0 + 1} {y_row:.1f}L{x0 + 16} {y_text - 3:.1f}" stroke="#999" stroke-width=".6" fill="none"/>'
                   f'<text x="{x0 + 19}" y="{y_text:.1f}" class="lbl">{escape(names[i])}</text>')
    out.append("</g>")
    return "".join(out)


def colorbar(scale: Scale) -> Markup:
    """The shared colour scale: decades of relative L2, the tolerance and the special colours."""
    w, x0, y0, h = 420, 10, 6, 14
    t = scale.t_tol
    # A hard edge at the tolerance: the last "under" colour just below it, the first "over" just above.
    offsets = sorted(set(np.linspace(0, 1, 25).round(3)) | {t - 1e-3, t + 1e-3})
    stops = "".join(f'<stop offset="{u:.4f}" stop-color="{scale.color(u)}"/>' for u in offsets)
    out = [
        f'<svg class="colorbar" viewBox="0 0 {w + 440} 44" width="{w + 440}" height="44">',
        f'<defs><linearGradient id="cbar">{stops}</linearGradient></defs>',
        f'<rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="url(#cbar)" stroke="#888" stroke-width=".5"/>',
    ]
    for d in range(math.ceil(scale.lo), math.floor(scale.hi) + 1):
        x = x0 + (d - scale.lo) / (scale.hi - scale.lo) * w
        out.append(f'<path d="M{x:.1f} {y0 + h}v4" stroke="#555"/><text x="{x:.1f}" y="{y0 + h + 15}" '
                   f'text-anchor="middle" class="lbl">1e{d}</text>')
    xt = x0 + t * w
    out.append(f'<path d="M{xt:.1f} {y0 - 4}v{h + 8}" stroke="#000" stroke-width="1.5"/>')
    sx = x0 + w + 20
    for label, color in (("tolerance", None), ("0 (bit-identical)", COLORS["zero"]),
                         ("NaN/inf", COLORS["nonfinite"]), ("not compared", COLORS["missing"])):
        if color is None:
            out.append(f'<path d="M{sx + 5} {y0 - 2}v{h + 4}" stroke="#000" stroke-width="1.5"/>'
                       f'<text x="{sx + 10}" y="{y0 + 11}" class="lbl">tolerance {_fmt(scale.tolerance)}</text>')
            sx += 110
            continue
        out.append(f'<rect x="{sx}" y="{y0}" width="12" height="{h}" fill="{color}" stroke="#888" stroke-width=".5"/>'
                   f'<text x="{sx + 16}" y="{y0 + 11}" class="lbl">{label}</text>')
        sx += 24 + 6.2 * len(label)
    out.append("</svg>")
    return Markup("".join(out))


def added_bars(points: pd.DataFrame, component: str, first: dict | None) -> Markup | None:
    """Bar chart: mean relative L2 each point adds on top of its input, over all steps (and at
    the first divergence's step when it lies in this component)."""
    df = points[points["component"] == component]
    if df.empty:
        return None
    keys = df[["substep", "layer", "point"]].drop_duplicates("layer").sort_values("layer")
    means = df.replace([np.inf, -np.inf], np.nan).groupby("layer")["added"].mean()
    layers = [int(l) for l in keys["layer"]]
    names = [str(p) for p in keys["point"]]
    series = [("mean over steps", [float(means.get(l, np.nan)) for l in layers], "#7f8c9a")]
    if first is not None and first.get("component") == component:
        at = df[(df["step"] == first["step"]) & (df["substep"] == first.get("substep", -1))].set_index("layer")["added"]
        series.append(("at the first divergence", [float(at.get(l, np.nan)) for l in layers], COLORS["marker"]))
    vals = [v for _, s, _ in series for v in s if math.isfinite(v)]
    vmax = max([abs(v) for v in vals] + [1e-30])
    lo = min(0.0, min(vals, default=0.0))
    hi = max(0.0, max(vals, default=0.0))
    top, plot_h, bottom = 18, 90, 40
    height = top + plot_h + bottom
    span = (hi - lo) or vmax
    y_of = lambda v: top + (hi - v) / span * plot_h  # noqa: E731
    n = len(layers)
    group_w = min(PLOT_W / max(n, 1), 56.0)
    bar_w = group_w * 0.8 / len(series)
    out = [f'<svg class="bars" viewBox="0 0 {WIDTH} {height}" width="{WIDTH}" height="{height}">',
           f'<path d="M{LEFT} {y_of(0):.1f}h{max(n * group_w, 300):.1f}" stroke="#555"/>']
    for v in (lo, hi):
        if v and abs(y_of(v) - y_of(0)) > 12:  # no label on top of the zero label
            out.append(f'<text x="{LEFT - 4}" y="{y_of(v) + 3:.1f}" text-anchor="end" class="lbl">{_fmt(v)}</text>')
    out.append(f'<text x="{LEFT - 4}" y="{y_of(0) + 3:.1f}" text-anchor="end" class="lbl">0</text>')
    every = max(1, math.ceil(n / 32))
    for i, name in enumerate(names):
        gx = LEFT + i * group_w + group_w * 0.1
        for j, (label, vs, color) in enumerate(series):
            v = vs[i]
            if not math.isfinite(v):
                continue
            y0, y1 = sorted((y_of(0), y_of(v)))
            out.append(f'<rect x="{gx + j * bar_w:.1f}" y="{y0:.1f}" width="{bar_w:.1f}" height="{max(y1 - y0, .5):.1f}" '
                       f'fill="{color}"><title>{escape(name)}: {escape(label)} {_fmt(v)}</title></rect>')
        if i % every == 0:
            out.append(f'<text x="{LEFT + (i + .5) * group_w:.1f}" y="{top + plot_h + 14}" text-anchor="end" class="lbl" '
                       f'transform="rotate(-35 {LEFT + (i + .5) * group_w:.1f} {top + plot_h + 14})">{escape(name)}</text>')
    lx = LEFT + max(n * group_w, 300) - 260
    for j, (label, _, color) in enumerate(series):
        out.append(f'<rect x="{lx + j * 140}" y="2" width="10" height="10" fill="{color}"/>'
                   f'<text x="{lx + j * 140 + 14}" y="11" class="lbl">{escape(label)}</text>')
    out.append("</svg>")
    return Markup("".join(out))


def token_timeline(ref: np.ndarray, cand: np.ndarray | None, forced_cb0: np.ndarray | None,
                   forced_pred: np.ndarray | None, first_flip: dict | None, substeps: int = 15) -> Markup:
    """Free-running codebook-0 tokens of both sides over frames, with the frames where they
    differ, and the teacher-forced flips (codebook 0 and the predictor's codebooks 1-15)."""
    n = max(len(ref), len(cand) if cand is not None else 0, 1)
    vocab = max(int(ref.max(initial=0)), int(cand.max(initial=0)) if cand is not None and len(cand) else 0, 1)
    top, line_h, strip_h, gap = 8, 110, 12, 4
    strips = ["free differs", "forced cb0", f"forced cb1-{substeps}"]
    height = top + line_h + 6 + len(strips) * (strip_h + gap) + 26
    x_of = lambda f: LEFT + (f + .5) / n * PLOT_W  # noqa: E731
    y_of = lambda tok: top + line_h - tok / vocab * line_h  # noqa: E731
    out = [f'<svg class="tokens" viewBox="0 0 {WIDTH} {height}" width="{WIDTH}" height="{height}">',
           f'<rect x="{LEFT}" y="{top}" width="{PLOT_W}" height="{line_h}" fill="#fafafa" stroke="#ccc" stroke-width=".5"/>',
           f'<text x="{LEFT - 4}" y="{top + 10}" text-anchor="end" class="lbl">{vocab}</text>',
           f'<text x="{LEFT - 4}" y="{top + line_h}" text-anchor="end" class="lbl">0</text>',
           f'<text x="{LEFT - 4}" y="{top + line_h / 2 + 3}" text-anchor="end" class="lbl">cb0 token</text>']

    def polyline(seq: np.ndarray, color: str, cls: str, dash: str = "") -> str:
        pts = " ".join(f"{x_of(i):.1f},{y_of(int(t)):.1f}" for i, t in enumerate(seq))
        return (f'<polyline class="{cls}" points="{pts}" fill="none" stroke="{color}" stroke-width="1.2" '
                f'{dash}stroke-linejoin="round"/>')

    out.append(polyline(ref, COLORS["ref"], "ref"))
    if cand is not None:
        out.append(polyline(cand, COLORS["cand"], "cand", 'stroke-dasharray="4 2" '))
    cw = max(PLOT_W / n, 1.0)
    y = top + line_h + 6
    common = min(len(ref), len(cand)) if cand is not None else 0
    marks: list[tuple[np.ndarray, str, np.ndarray | None]] = []
    if cand is not None:
        differ = np.zeros(n, dtype=bool)
        differ[:common] = ref[:common] != cand[:common]
        differ[common:] = True  # one side produced frames the other did not
        marks.append((differ, COLORS["flip"], None))
    else:
        marks.append((np.zeros(n, dtype=bool), COLORS["flip"], None))
    marks.append((forced_cb0 if forced_cb0 is not None else np.zeros(0, dtype=bool), COLORS["forced"], None))
    if forced_pred is not None:
        marks.append((forced_pred > 0, COLORS["forced"], forced_pred / float(substeps)))
    else:
        marks.append((np.zeros(0, dtype=bool), COLORS["forced"], None))
    for (mask, color, alpha), label in zip(marks, strips):
        out.append(f'<rect x="{LEFT}" y="{y}" width="{PLOT_W}" height="{strip_h}" fill="#f3f3f3"/>'
                   f'<text x="{LEFT - 4}" y="{y + 10}" text-anchor="end" class="lbl">{label}</text>')
        if alpha is None:
            d = "".join(f"M{LEFT + i / n * PLOT_W:.1f} {y}h{cw:.1f}v{strip_h}h{-cw:.1f}z" for i in np.flatnonzero(mask))
            if d:
                out.append(f'<path class="flips" data-count="{int(mask.sum())}" d="{d}" fill="{color}"/>')
        else:
            for i in np.flatnonzero(mask):
                out.append(f'<rect x="{LEFT + i / n * PLOT_W:.1f}" y="{y}" width="{cw:.1f}" height="{strip_h}" fill="{color}" '
                           f'fill-opacity="{max(.15, min(1.0, float(alpha[i]))):.2f}"/>')
        y += strip_h + gap
    if first_flip is not None:
        x = x_of(int(first_flip["step"]))
        out.append(f'<path class="first-flip" d="M{x:.1f} {top}V{y - gap}" stroke="{COLORS["forced"]}" stroke-width="1" '
                   f'stroke-dasharray="2 2"><title>first teacher-forced flip</title></path>')
    for f in _axis_ticks(n):
        out.append(f'<text x="{x_of(f):.1f}" y="{y + 12}" text-anchor="middle" class="lbl">{f}</text>')
    out.append(f'<text x="{LEFT + PLOT_W}" y="{height - 2}" text-anchor="end" class="lbl">frame</text>')
    out.append("</svg>")
    return Markup("".join(out))


def time_axis(duration_s: float, markers: list[tuple[str, float, str]]) -> Markup:
    """Seconds axis under the audio players with markers (label, time in s, colour); clicking
    it seeks both players when scripts run."""
    duration_s = max(duration_s, 1e-3)
    height = 62
    x_of = lambda t: LEFT + min(max(t / duration_s, 0), 1) * PLOT_W  # noqa: E731
    out = [f'<svg class="timeaxis" data-duration="{duration_s:.3f}" viewBox="0 0 {WIDTH} {height}" width="{WIDTH}" '
           f'height="{height}">',
           f'<rect class="track" x="{LEFT}" y="16" width="{PLOT_W}" height="10" fill="#e8e8e8"/>',
           f'<text x="{LEFT - 4}" y="25" text-anchor="end" class="lbl">seconds</text>']
    step = next(s for s in (0.5, 1, 2, 5, 10, 20, 30, 60) if duration_s / s <= 16)
    for i in np.arange(0, duration_s + 1e-9, step):
        out.append(f'<path d="M{x_of(i):.1f} 26v4" stroke="#555"/><text x="{x_of(i):.1f}" y="40" text-anchor="middle" '
                   f'class="lbl">{i:g}</text>')
    # Marker labels go into lanes (above the track, then below the ticks) so that none overlaps
    # another: each takes the first lane where it clears the labels already there.
    lanes_y = [11, 54, 66, 78, 90]
    lanes: list[list[tuple[float, float]]] = [[] for _ in lanes_y]
    placed = []
    for label, t, color in sorted(markers, key=lambda m: m[1]):
        x = x_of(t)
        text = f"{label} {t:.2f} s"
        w = 5.6 * len(text) + 4  # 10 px system-ui, a little generous
        right_side = x + 3 + w <= WIDTH
        x0, x1 = (x + 3, x + 3 + w) if right_side else (x - 3 - w, x - 3)
        lane = next((i for i, spans in enumerate(lanes) if all(x1 + 4 < a or x0 > b + 4 for a, b in spans)), len(lanes) - 1)
        lanes[lane].append((x0, x1))
        placed.append((text, t, x, color, lane, right_side))
    height = max(height, 6 + max((lanes_y[lane] for *_, lane, _ in placed), default=0))
    for text, t, x, color, lane, right_side in placed:
        y_text = lanes_y[lane]
        y0, y1 = (y_text + 3, 28) if lane == 0 else (16, y_text - 8)
        out.append(f'<g class="marker" data-t="{t:.3f}"><path d="M{x:.1f} {y0}V{y1}" stroke="{color}" stroke-width="2"/>'
                   f'<text x="{x + (3 if right_side else -3):.1f}" y="{y_text}" text-anchor="{"start" if right_side else "end"}" '
                   f'class="lbl" fill="{color}">{escape(text)}</text></g>')
    out.append("</svg>")
    out[0] = (f'<svg class="timeaxis" data-duration="{duration_s:.3f}" viewBox="0 0 {WIDTH} {height}" width="{WIDTH}" '
              f'height="{height}">')
    return Markup("".join(out))
