"""Plots (matplotlib, Agg backend): the hardware's roofline with each layer placed on it, and the
model's parameters and operations across its depth."""

from __future__ import annotations

from pathlib import Path

from edgellm.errors import InvalidParameterError
from edgellm.roofline.experts import EXPERT_LINEARS

_KIND_COLORS = {"linear": "tab:blue", "attention": "tab:red", "elementwise": "tab:green", "embedding": "tab:gray"}
_PHASE_MARKERS = {"prefill": "o", "decode": "^"}
_OUTSIDE = ("embedding", "final_norm", "lm_head")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def check_path(path: Path | str) -> Path:
    """The plot's path, refused (before any work) if its format or folder is wrong."""
    path = Path(path)
    if path.suffix.lower() not in (".png", ".svg", ".pdf", ".jpg", ".jpeg"):
        raise InvalidParameterError(f"cannot tell the image format of '{path}'",
                                    "end the plot's file name in .png, .svg or .pdf")
    if path.parent and not path.parent.exists():
        raise InvalidParameterError(f"folder {path.parent} does not exist", "create it, or write the plot elsewhere")
    return path


def _save(fig, path: Path | str) -> Path:
    path = check_path(path)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    return path


def plot_roofline(analyses, path: Path | str) -> Path:
    """Log-log roofline of the analyses' hardware; each layer at (intensity, attainable ops/s).

    ``analyses``: Analysis objects of the same model and hardware (typically prefill and decode).
    """
    import numpy as np

    plt = _pyplot()
    if not analyses:
        raise InvalidParameterError("nothing to plot")
    hw, cfg = analyses[0].hardware, analyses[0].model
    points = [(a, layer) for a in analyses for layer in a.layers if layer.ops > 0]
    xs = [layer.arithmetic_intensity for _, layer in points]
    ridges = [p / hw.bandwidth for p in hw.peak_ops.values()]
    x_lo = min(xs + ridges) / 4
    x_hi = max(xs + ridges) * 4
    fig, ax = plt.subplots(figsize=(11, 7))
    grid = np.logspace(np.log10(x_lo), np.log10(x_hi), 400)
    used = {layer.precision for _, layer in points}
    styles = ["-", "--", "-.", ":"]
    roofs: dict[float, list[str]] = {}
    for prec, peak in hw.peak_ops.items():          # precisions with the same peak share one line
        roofs.setdefault(peak, []).append(prec)
    for i, (peak, precs) in enumerate(sorted(roofs.items(), key=lambda kv: -kv[0])):
        on = any(p in used for p in precs)
        roof = np.minimum(peak, grid * hw.bandwidth) / 1e12
        ax.plot(grid, roof, styles[i % len(styles)], color="black", lw=2.2 if on else 1.0, alpha=0.9 if on else 0.4,
                label=f"{'/'.join(precs)} roof: {peak / 1e12:,.3g} TOPS, ridge {peak / hw.bandwidth:,.3g} ops/B")
    for a, layer in points:
        ax.scatter(layer.arithmetic_intensity, layer.attainable_ops_per_s / 1e12,
                   marker=_PHASE_MARKERS[a.phase], s=46, color=_KIND_COLORS.get(layer.cost.kind, "tab:purple"),
                   edgecolors="black", linewidths=0.5, zorder=3)
    for a in analyses:                              # one label per cluster of nearby points of a phase
        clusters: list[list[tuple[float, float, str]]] = []
        for layer in a.layers:
            if layer.ops <= 0:
                continue
            lx, ly = np.log10(layer.arithmetic_intensity), np.log10(layer.attainable_ops_per_s)
            for members in clusters:
                if abs(members[0][0] - lx) < 0.3 and abs(members[0][1] - ly) < 0.3:
                    members.append((lx, ly, layer.name))
                    break
            else:
                clusters.append([(lx, ly, layer.name)])
        for members in clusters:
            cx = sum(m[0] for m in members) / len(members)
            cy = sum(m[1] for m in members) / len(members)
            names = [m[2] for m in members]
            text = f"{a.phase}: " + "\n".join(", ".join(names[i:i + 3]) for i in range(0, len(names), 3))
            ax.annotate(text, (10 ** cx, 10 ** cy / 1e12), fontsize=6.5, alpha=0.9,
                        xytext=(6, 4) if a.phase == "prefill" else (6, -6), textcoords="offset points",
                        va="bottom" if a.phase == "prefill" else "top")
    # legend entries for markers (phase) and colours (layer kind)
    for phase, marker in _PHASE_MARKERS.items():
        if any(a.phase == phase for a in analyses):
            a = next(a for a in analyses if a.phase == phase)
            what = f"prompt {a.seq_len}" if phase == "prefill" else f"{a.seq_len} cached tokens"
            ax.scatter([], [], marker=marker, color="white", edgecolors="black", label=f"{phase} ({what})")
    for kind, color in _KIND_COLORS.items():
        if any(layer.cost.kind == kind for _, layer in points):
            ax.scatter([], [], marker="s", color=color, label=f"{kind} layers")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(x_lo, x_hi)
    ax.set_xlabel("arithmetic intensity (operations per byte of memory traffic)")
    ax.set_ylabel("attainable performance (TOPS = 10¹² operations/s)")
    a0 = analyses[0]
    ax.set_title(f"Roofline of {hw.name} ({hw.bandwidth / 1e9:,.0f} GB/s): {cfg.name}, batch {a0.batch}, "
                 f"W{a0.bits.weight:g}A{a0.bits.act:g}KV{a0.bits.kv:g}, {a0.attention} attention", fontsize=10.5)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=7.5, loc="lower right")
    out = _save(fig, path)
    plt.close(fig)
    return out


def plot_layers(analyses, path: Path | str) -> Path:
    """Parameters and operations per layer across the model's depth, and per layer type in a block."""
    import numpy as np

    plt = _pyplot()
    if not analyses:
        raise InvalidParameterError("nothing to plot")
    cfg = analyses[0].model
    first = analyses[0]
    by_name = {layer.name: layer for layer in first.layers}
    n = cfg.n_layers
    attn_params = sum(by_name[x].cost.params for x in ("q_proj", "k_proj", "v_proj", "o_proj"))
    # the MLP's weights per block, averaged over the blocks (a mixture of experts may keep some dense)
    mlp_params = sum(layer.cost.params * layer.count for layer in first.layers
                     if layer.name in ("gate_proj", "up_proj", "down_proj") + EXPERT_LINEARS) / n
    norm_params = sum(by_name[x].cost.params for x in ("attn_norm", "ffn_norm"))
    emb_params = by_name["embedding"].cost.params
    head_params = by_name["lm_head"].cost.params + by_name["final_norm"].cost.params
    x = np.arange(n + 2)
    labels = ["embed"] + [str(i) for i in range(n)] + ["head"]

    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(11, 11))
    attn = np.array([0] + [attn_params] * n + [0]) / 1e6
    mlp = np.array([0] + [mlp_params] * n + [0]) / 1e6
    other = np.array([emb_params] + [norm_params] * n + [head_params]) / 1e6
    ax1.bar(x, attn, color="tab:blue", label="attention projections (q, k, v, o)")
    ax1.bar(x, mlp, bottom=attn, color="tab:orange", label="MLP (gate, up, down)")
    ax1.bar(x, other, bottom=attn + mlp, color="tab:gray",
            label="embeddings / norms / lm_head" + (" (tied: shares the embedding)" if cfg.tie_embeddings else ""))
    ax1.set_ylabel("parameters (millions)")
    ax1.set_title(f"{cfg.name}: parameters per layer across depth "
                  f"({cfg.n_parameters() / 1e9:.2f} B in all)", fontsize=10.5)
    ax1.set_ylim(0, max(attn + mlp + other) * 1.3)
    ax1.legend(fontsize=8, loc="upper center", ncol=3)

    for a in analyses:
        block_ops = sum(layer.cost.ops for layer in a.layers if layer.name not in _OUTSIDE)
        head_ops = sum(layer.cost.ops for layer in a.layers if layer.name in ("final_norm", "lm_head"))
        y = np.array([np.nan] + [block_ops] * n + [head_ops]) / 1e9
        what = f"prompt {a.seq_len}" if a.phase == "prefill" else f"{a.seq_len} cached tokens"
        ax2.plot(x, y, _PHASE_MARKERS[a.phase] + "-", label=f"{a.phase} ({what}, batch {a.batch})")
    ax2.set_yscale("log")
    ax2.set_ylabel("operations (GOP, log scale)")
    ax2.set_title("operations per layer across depth (the embedding lookup does no arithmetic)", fontsize=10.5)
    ax2.legend(fontsize=8, loc="center left")
    for ax in (ax1, ax2):
        ax.set_xlabel("layer (embedding, transformer blocks 0..n-1, output head)")
        step = max(1, (n + 2) // 24)
        ax.set_xticks(x[::step])
        ax.set_xticklabels(labels[::step], fontsize=7)
        ax.grid(True, axis="y", alpha=0.3)

    names = [layer.name for layer in first.layers if layer.name not in _OUTSIDE]
    width = 0.8 / max(len(analyses), 1)
    xi = np.arange(len(names))
    for i, a in enumerate(analyses):
        ops = {layer.name: layer.cost.ops for layer in a.layers}
        ax3.bar(xi + (i - (len(analyses) - 1) / 2) * width, [max(ops.get(nm, 0), 1) / 1e9 for nm in names], width,
                label=a.phase)
    ax3.set_yscale("log")
    ax3.set_xticks(xi)
    ax3.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
    ax3.set_ylabel("operations per block (GOP, log scale)")
    ax3.set_title("operations of each layer type within one block", fontsize=10.5)
    ax3.legend(fontsize=8)
    ax3.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out


def plot_measured(report: dict, hw, path: Path | str) -> Path:
    """The roofline of ``hw`` with each engine op of an ``analyze --measure`` report twice: where the
    roofline puts it (hollow, at its attainable performance) and where it ran (filled, at its achieved
    ops/s), joined by a line: the line's length on the log scale is how far under the roof it ran."""
    import numpy as np

    plt = _pyplot()
    rows = [(ph["phase"], r) for ph in report["phases"] for r in ph["layers"] if r["ops"] > 0]
    if not rows:
        raise InvalidParameterError("nothing to plot")
    xs = [r["arithmetic_intensity"] for _, r in rows]
    ridges = [p / hw.bandwidth for p in hw.peak_ops.values()]
    x_lo, x_hi = min(xs + ridges) / 4, max(xs + ridges) * 4
    fig, ax = plt.subplots(figsize=(11, 7))
    grid = np.logspace(np.log10(x_lo), np.log10(x_hi), 400)
    for i, (prec, peak) in enumerate(sorted(hw.peak_ops.items(), key=lambda kv: -kv[1])):
        ax.plot(grid, np.minimum(peak, grid * hw.bandwidth) / 1e12, ["-", "--", "-.", ":"][i % 4], color="black",
                lw=2.0 if prec == "fp32" else 1.0, alpha=0.9 if prec == "fp32" else 0.4,
                label=f"{prec} roof: {peak / 1e12:,.3g} TOPS, ridge {peak / hw.bandwidth:,.3g} ops/B")
    colors = plt.get_cmap("tab20").colors
    names = list(dict.fromkeys(r["name"] for _, r in rows))
    for phase, r in rows:
        color = colors[names.index(r["name"]) % len(colors)]
        x, pred, got = r["arithmetic_intensity"], r["attainable_ops_per_s"] / 1e12, r["achieved_ops_per_s"] / 1e12
        marker = _PHASE_MARKERS[phase]
        ax.plot([x, x], [pred, got], color=color, lw=1.0, alpha=0.7, zorder=2)
        ax.scatter(x, pred, marker=marker, s=46, facecolors="none", edgecolors=[color], linewidths=1.2, zorder=3)
        ax.scatter(x, got, marker=marker, s=46, color=color, edgecolors="black", linewidths=0.5, zorder=3)
        left = phase == "prefill"          # prefill labels to the left of their point, decode to the right
        ax.annotate(f"{r['name']} {r['roofline_fraction']:.0%}", (x, got), fontsize=6.5,
                    xytext=(-6 if left else 6, -2), textcoords="offset points", va="top",
                    ha="right" if left else "left")
    for phase, marker in _PHASE_MARKERS.items():
        if any(p == phase for p, _ in rows):
            ax.scatter([], [], marker=marker, color="gray", edgecolors="black", label=f"{phase}: measured (filled)")
            ax.scatter([], [], marker=marker, facecolors="none", edgecolors="gray", label=f"{phase}: roofline (hollow)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(x_lo, x_hi)
    ax.set_xlabel("arithmetic intensity (operations per byte of memory traffic, engine formats)")
    ax.set_ylabel("performance (TOPS = 10¹² operations/s)")
    ax.set_title(f"Measured vs roofline on {hw.name}\n{report['model']}: prefill of {report['seq_len']} tokens, "
                 f"decode at {report['seq_len']} cached tokens, batch 1 (labels: fraction of the roofline reached)",
                 fontsize=10)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=7.5, loc="lower right")
    out = _save(fig, path)
    plt.close(fig)
    return out
