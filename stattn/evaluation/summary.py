"""summary.json / summary.md (and summary.png when matplotlib is installed) from the records:
per prompt set and method, each metric's mean with a 95 % bootstrap interval over prompts (each
prompt's mean over its seeds is one sample), the time per image, its overhead over `none`, and
the peak memory."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Optional

import numpy as np

METRICS = ("clip_score", "min_object_similarity", "detected", "relation")
BOOTSTRAP = 1000
BOOTSTRAP_SEED = 0
ALL = "all"


def bootstrap_ci(values, resamples: int = BOOTSTRAP, seed: int = BOOTSTRAP_SEED, level: float = 0.95) -> tuple:
    """(mean, low, high): the mean of `values` and the percentile interval of the means of
    `resamples` resamples with replacement (a fixed-seed generator: the same numbers every time)."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"values: expected a non-empty list of numbers, got {values!r}")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    a = (1 - level) / 2
    return float(x.mean()), float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def _per_prompt(records: list, metric: str) -> list:
    by_prompt = defaultdict(list)
    for r in records:
        v = r["scores"].get(metric)
        if v is not None:
            by_prompt[r["prompt"]].append(v)
    return [float(np.mean(v)) for v in by_prompt.values()]


def summarize(records: list, metric_models: Optional[dict] = None) -> dict:
    """The summary of records (all of one settings hash), as summary.json holds it."""
    sets = sorted({r["set"] for r in records})
    groups = {s: [r for r in records if r["set"] == s] for s in sets}
    if len(sets) > 1:
        groups[ALL] = list(records)
    methods = list(dict.fromkeys(r["method"] for r in records))
    table = {}
    for s, rs in groups.items():
        rows = {}
        base = [r["generate_ms"] for r in rs if r["method"] == "none"]
        for m in methods:
            mine = [r for r in rs if r["method"] == m]
            if not mine:
                continue
            row = {"images": len(mine), "prompts": len({r["prompt"] for r in mine})}
            for metric in METRICS:
                vals = _per_prompt(mine, metric)
                if vals:
                    mean, lo, hi = bootstrap_ci(vals)
                    row[metric] = {"mean": mean, "ci95": [lo, hi], "prompts": len(vals)}
            ms = float(np.mean([r["generate_ms"] for r in mine]))
            row["ms_per_image"] = ms
            row["overhead_vs_none"] = ms / float(np.mean(base)) - 1 if base else None
            peaks = [r["peak_bytes"] for r in mine if r.get("peak_bytes") is not None]
            row["peak_bytes"] = max(peaks) if peaks else None
            rows[m] = row
        table[s] = rows
    return {"metric_models": metric_models or {}, "bootstrap": {"resamples": BOOTSTRAP, "seed": BOOTSTRAP_SEED,
                                                              "level": 0.95, "over": "prompts"},
            "sets": table}


def _cell(v) -> str:
    return f"{v['mean']:.4f} [{v['ci95'][0]:.4f}, {v['ci95'][1]:.4f}]" if v else "–"


def markdown(summary: dict) -> str:
    lines = ["# stattn eval summary", ""]
    for what, name in summary["metric_models"].items():
        lines.append(f"- {what}: {name}")
    lines += ["- intervals: 95 % percentile bootstrap over prompts "
              f"({summary['bootstrap']['resamples']} resamples, seed {summary['bootstrap']['seed']}); "
              "CLIP scores are raw cosine similarities; detected / relation are rates in [0, 1]", ""]
    for s, rows in summary["sets"].items():
        metrics = [m for m in METRICS if any(m in r for r in rows.values())]
        lines += [f"## {s}", "", "| method | images | " + " | ".join(metrics) + " | ms / image | overhead vs none "
                  "| peak MiB |", "|" + "---|" * (len(metrics) + 5)]
        for m, r in rows.items():
            over = "–" if r["overhead_vs_none"] is None else f"{100 * r['overhead_vs_none']:+.1f} %"
            peak = "–" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2 ** 20:.0f}"
            lines.append(f"| {m} | {r['images']} | " + " | ".join(_cell(r.get(k)) for k in metrics)
                         + f" | {r['ms_per_image']:.1f} | {over} | {peak} |")
        lines.append("")
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> Optional[Path]:
    """A bar chart per metric (methods side by side per set, 95 % intervals as error bars);
    None when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from .. import cli

    sets = list(summary["sets"])
    metrics = [m for m in METRICS if any(m in r for rows in summary["sets"].values() for r in rows.values())]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.5), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        methods = list(dict.fromkeys(m for rows in summary["sets"].values() for m in rows))
        width = 0.8 / max(len(methods), 1)
        for j, m in enumerate(methods):
            cells = [summary["sets"][s].get(m, {}).get(metric) for s in sets]
            xs = [i + j * width for i, c in enumerate(cells) if c]
            ys = [c["mean"] for c in cells if c]
            err = [[c["mean"] - c["ci95"][0] for c in cells if c], [c["ci95"][1] - c["mean"] for c in cells if c]]
            ax.bar(xs, ys, width, yerr=err, capsize=3, label=m)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(sets))], sets, rotation=20)
        ax.set_title(metric)
    axes[0][0].legend()
    fig.tight_layout()
    cli._write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return path


def write(out: Path, records: list, metric_models: Optional[dict] = None) -> dict:
    """summary.json, summary.md and (with matplotlib) summary.png under out."""
    from .. import cli

    summary = summarize(records, metric_models)
    text = json.dumps(summary, indent=2).encode()
    cli._write_atomic(Path(out) / "summary.json", lambda f: f.write(text))
    summary["plot"] = str(plot(summary, Path(out) / "summary.png") or "") or None
    md = markdown(summary) + ("" if summary["plot"] else "\n(no plot: matplotlib is not installed)\n")
    cli._write_atomic(Path(out) / "summary.md", lambda f: f.write(md.encode()))
    return summary
