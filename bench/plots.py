"""PNG plots for `cacheblend eval` and `cacheblend tune` (matplotlib, Agg backend: no display)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import ScalarFormatter  # noqa: E402

BASELINE_STYLE = {"full_prefill": ("tab:green", "--"), "prefix_cache": ("tab:olive", ":"), "full_reuse": ("tab:red", "-.")}
MODE_COLORS = {"full_prefill": "tab:green", "prefix_cache": "tab:olive", "full_reuse": "tab:red", "cacheblend": "tab:blue"}


def _cacheblend(rows: list[dict]) -> list[dict]:
    return sorted((r for r in rows if r["mode"] == "cacheblend" and r.get("ratio") is not None), key=lambda r: r["ratio"])


def _baselines(rows: list[dict]) -> dict[str, dict]:
    return {r["mode"]: r for r in rows if r["mode"] in BASELINE_STYLE}


def _hlines(ax, baselines: dict[str, dict], metric: str) -> None:
    for mode, row in baselines.items():
        value = row.get(metric)
        if value is None:
            continue
        color, style = BASELINE_STYLE[mode]
        ax.axhline(value, color=color, linestyle=style, label=mode)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)  # figures are not freed otherwise (pyplot keeps them for display)
    return path


def _time_axes(ax, xlabel: str, ylabel: str, title: str) -> None:
    """Labels, a y axis from 0, grid and legend: the TTFT plots' common frame."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)


def quality_vs_ratio(rows: list[dict], path: Path, title: str = "") -> Path:
    cb, base = _cacheblend(rows), _baselines(rows)
    base.pop("prefix_cache", None)  # exact reuse: same quality as full_prefill, only clutters
    metrics = [("f1", "F1 vs gold"), ("agreement_f1", "agreement F1 with full_prefill"), ("kl_first_token", "first-token KL(full || mode)")]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, (metric, label) in zip(axes, metrics):
        xs = [r["ratio"] for r in cb if r.get(metric) is not None]
        ys = [r[metric] for r in cb if r.get(metric) is not None]
        ax.plot(xs, ys, "o-", color=MODE_COLORS["cacheblend"], label="cacheblend")
        _hlines(ax, base, metric)
        ax.set_xlabel("recompute ratio")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="best", fontsize=8)
    fig.suptitle(title or "Quality vs recompute ratio")
    return _save(fig, path)


def ttft_vs_ratio(rows: list[dict], path: Path, title: str = "") -> Path:
    cb, base = _cacheblend(rows), _baselines(rows)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    xs = [r["ratio"] for r in cb]
    ax.plot(xs, [r["ttft_median_s"] for r in cb], "o-", color=MODE_COLORS["cacheblend"], label="cacheblend (median)")
    if any(r.get("ttft_p95_s") is not None for r in cb):
        ax.plot(xs, [r["ttft_p95_s"] for r in cb], "x:", color=MODE_COLORS["cacheblend"], alpha=0.6, label="cacheblend (p95)")
    _hlines(ax, base, "ttft_median_s")
    _time_axes(ax, "recompute ratio", "TTFT (s)", title or "TTFT vs recompute ratio")
    return _save(fig, path)


def ttft_vs_context(rows: list[dict], path: Path, title: str = "") -> Path:
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for label in dict.fromkeys(r["label"] for r in rows):
        pts = sorted((r for r in rows if r["label"] == label), key=lambda r: r["context_tokens"])
        ax.plot([r["context_tokens"] for r in pts], [r["ttft_median_s"] for r in pts], "o-",
                color=MODE_COLORS.get(pts[0]["mode"]), label=label)
    _time_axes(ax, "prompt tokens", "TTFT median (s)", title or "TTFT vs context length")
    return _save(fig, path)


def variants_bar(rows: list[dict], path: Path, reference: Optional[dict] = None) -> Path:
    several = len({r["variant"] for r in rows}) < len(rows)  # a variant at several ratios
    names = [f"{r['variant']}@{r['ratio']:g}" if several else r["variant"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].bar(names, [r["kl_first_token"] or 0 for r in rows], color="tab:blue")
    if reference and reference.get("kl_first_token") is not None:
        axes[0].axhline(reference["kl_first_token"], color="tab:red", linestyle="-.", label="full_reuse")
        axes[0].legend(fontsize=8)
    axes[0].set_ylabel("first-token KL")
    axes[1].bar(names, [r["ttft_median_s"] or 0 for r in rows], color="tab:gray")
    axes[1].set_ylabel("TTFT median (s)")
    for ax in axes:
        ax.tick_params(axis="x", rotation=30)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("CacheBlend variants")
    return _save(fig, path)


def tune_plot(rows: list[dict], path: Path, chosen: Optional[float] = None, metric: str = "top1_agreement") -> Path:
    cb, base = _cacheblend(rows), _baselines(rows)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    xs = [r["ratio"] for r in cb]
    ax.plot(xs, [r[metric] for r in cb], "o-", color="tab:blue", label=metric)
    if metric != "kl_first_token":
        ax2k = ax.twinx()
        ax2k.spines["right"].set_position(("axes", 1.15))
        ax2k.plot(xs, [r["kl_first_token"] for r in cb], "s--", color="tab:purple", label="KL")
        ax2k.set_ylabel("first-token KL", color="tab:purple")
    ax.set_xlabel("recompute ratio")
    ax.set_ylabel(metric, color="tab:blue")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(xs, [r["ttft_median_s"] for r in cb], "^-", color="tab:orange", label="TTFT")
    if "full_prefill" in base:
        ax2.axhline(base["full_prefill"]["ttft_median_s"], color="tab:green", linestyle="--", label="full_prefill TTFT")
    ax2.set_ylabel("TTFT median (s)", color="tab:orange")
    ax2.set_ylim(bottom=0)
    if chosen is not None:
        ax.axvline(chosen, color="black", linestyle=":", label=f"chosen r={chosen:g}")
    handles = [h for a in fig.axes for h in a.get_legend_handles_labels()[0]]
    labels = [lab for a in fig.axes for lab in a.get_legend_handles_labels()[1]]
    ax.legend(handles, labels, fontsize=8, loc="center right")
    ax.set_title("Quality and TTFT vs recompute ratio")
    return _save(fig, path)


def throughput_vs_ttft(rows: list[dict], path: Path, title: str = "") -> Path:
    """`bench load --peer`: requests/s against TTFT p50, one line per server, a point per
    concurrency (labelled)."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for server in dict.fromkeys(r["server"] for r in rows):
        points = sorted((r for r in rows if r["server"] == server), key=lambda r: r["concurrency"])
        xs, ys = [p["ttft_p50_s"] for p in points], [p["requests_per_s"] for p in points]
        ax.plot(xs, ys, marker="o", label=server)
        for p, x, y in zip(points, xs, ys):
            ax.annotate(f"c={p['concurrency']}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("TTFT p50 (s, log)")
    ax.set_ylabel("requests/s")
    ax.set_title(title or "throughput vs TTFT")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def frontier(rows: list[dict], variant_rows: list[dict], path: Path, signal: str, title: str = "") -> Path:
    """Quality vs TTFT, one curve per selection signal: the sweep (the configured `signal`) and
    every signal variant at its ratios; full_prefill and full_reuse as points."""
    curves = {f"{signal} (configured)": _cacheblend(rows)}
    for r in variant_rows:
        if r["variant"] != "default":
            curves.setdefault(r["variant"], []).append(r)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    for ax, metric, label in ((axes[0], "kl_vs_full_reuse", "first-token KL / full_reuse's (mean ratio)"),
                              (axes[1], "agreement_f1", "agreement F1 with full_prefill")):
        for name, pts in curves.items():
            pts = sorted((p for p in pts if p.get(metric) is not None and p.get("ttft_median_s")),
                         key=lambda p: p["ttft_median_s"])
            if not pts:
                continue
            line, = ax.plot([p["ttft_median_s"] for p in pts], [p[metric] for p in pts], "o-", label=name)
            for p in pts:
                ax.annotate(f"r={p['ratio']:g}", (p["ttft_median_s"], p[metric]), textcoords="offset points",
                            xytext=(4, 4), fontsize=7, color=line.get_color())
        for mode, row in _baselines(rows).items():
            if mode != "prefix_cache" and row.get(metric) is not None and row.get("ttft_median_s"):
                color, _ = BASELINE_STYLE[mode]
                ax.plot(row["ttft_median_s"], row[metric], "s", color=color, label=mode)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(ScalarFormatter())
        ax.set_xlabel("TTFT median (s, log scale)")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(title or "Quality vs TTFT: the frontier per selection signal")
    return _save(fig, path)


def eval_plots(rows: list[dict], context_rows: list[dict], variant_rows: list[dict], folder: Path, signal: str) -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = [quality_vs_ratio(rows, folder / "quality_vs_ratio.png"), ttft_vs_ratio(rows, folder / "ttft_vs_ratio.png"),
           frontier(rows, variant_rows, folder / "frontier.png", signal)]
    if context_rows:
        out.append(ttft_vs_context(context_rows, folder / "ttft_vs_context.png"))
    if variant_rows:
        out.append(variants_bar(variant_rows, folder / "variants.png", _baselines(rows).get("full_reuse")))
    return out
