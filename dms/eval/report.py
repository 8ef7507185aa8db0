"""Table, JSON and accuracy-vs-compression plot of an evaluation (rows from dms.eval.runner),
each with 95% confidence intervals: Wilson per task, a normal interval for the mean over tasks
(dms.eval.stats)."""
from __future__ import annotations

import json
from pathlib import Path

from dms.eval.runner import Row
from dms.eval.stats import mean_interval

_MARKERS = {"vanilla": "*", "dms": "o", "streaming": "s", "h2o": "^", "tova": "D", "quest": "v"}


def summary(rows: list[Row]) -> list[dict]:
    """One entry per (method, ratio): accuracy (with its 95% interval), compression and KV bytes
    averaged over tasks, and each task's accuracy and interval."""
    groups: dict[str, list[Row]] = {}
    for r in rows:
        groups.setdefault(r.label, []).append(r)
    out = []
    for label, rs in groups.items():
        n = len(rs)
        low, high = mean_interval([(r.accuracy, r.samples) for r in rs])
        out.append(dict(label=label, method=rs[0].method, ratio=rs[0].ratio,
                        accuracy=sum(r.accuracy for r in rs) / n, ci_low=low, ci_high=high,
                        compression=sum(r.compression for r in rs) / n,
                        kv_bytes=sum(r.kv_bytes for r in rs) / n, tasks={r.task: r.accuracy for r in rs},
                        task_ci={r.task: [r.ci_low, r.ci_high] for r in rs}))
    return out


def table(rows: list[Row]) -> str:
    """Accuracy per task, mean accuracy, achieved compression ratio and retained KV KiB per
    sample; under each method's line, the 95% intervals of its accuracies."""
    tasks = list(dict.fromkeys(r.task for r in rows))
    head = ["method"] + tasks + ["mean acc", "CR", "KV KiB"]
    lines = []
    ci = lambda lo, hi: f"{lo:.2f}-{hi:.2f}"
    for s in summary(rows):
        lines.append([s["label"]] + [f"{s['tasks'][t]:.3f}" if t in s["tasks"] else "-" for t in tasks]
                     + [f"{s['accuracy']:.3f}", f"{s['compression']:.2f}x", f"{s['kv_bytes'] / 1024:.1f}"])
        lines.append(["  95% CI"] + [ci(*s["task_ci"][t]) if t in s["task_ci"] else "" for t in tasks]
                     + [ci(s["ci_low"], s["ci_high"]), "", ""])
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]
    fmt = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    rule = "-" * len(fmt(head))
    notes = ["95% CI: Wilson per task, normal (Agresti-Coull variances) for the mean; see dms.eval.stats"]
    if any(r.method == "quest" for r in rows):
        notes.append("quest keeps every token: its CR is tokens seen / keys read per decode step")
    return "\n".join([fmt(head), rule] + [fmt(line) for line in lines] + notes)


def save_json(rows: list[Row], path: str | Path, meta: dict | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = dict(meta=meta or {}, rows=[r.to_dict() for r in rows], summary=summary(rows))
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed); matplotlib is an optional
    dependency, the ``plot`` extra."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError('plotting needs matplotlib: pip install "dms-kv[plot]"') from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _with_ci(rows: list[Row]) -> tuple[float, float, float]:
    """(accuracy, low, high) of one row, or of the mean over several tasks' rows."""
    if len(rows) == 1:
        return rows[0].accuracy, rows[0].ci_low, rows[0].ci_high
    return (sum(r.accuracy for r in rows) / len(rows), *mean_interval([(r.accuracy, r.samples) for r in rows]))


def plot(rows: list[Row], path: str | Path, title: str = "accuracy vs KV compression") -> Path:
    """Mean accuracy over tasks vs achieved compression ratio, one line per method (panel 1),
    then one panel per task, with 95% intervals as error bars, as a PNG."""
    plt = pyplot()

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tasks = list(dict.fromkeys(r.task for r in rows))
    panels = [("mean over tasks", None)] + [(t, t) for t in tasks]
    cols = min(3, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.6 * nrows), squeeze=False)
    methods = list(dict.fromkeys(r.method for r in rows))
    # Baselines share DMS's compression by construction: shrinking markers keep overlaps visible.
    sizes = {m: 11 - 1.3 * i for i, m in enumerate(methods)}
    for ax, (name, task) in zip(axes.flat, panels):
        for method in methods:
            pts = {}
            for r in rows:
                if r.method == method and (task is None or r.task == task):
                    pts.setdefault(r.label, []).append(r)
            pts = sorted((sum(r.compression for r in v) / len(v), _with_ci(v)) for v in pts.values())
            if not pts:
                continue
            xs = [x for x, _ in pts]
            ys, lo, hi = zip(*(c for _, c in pts))
            if method == "vanilla":
                ax.axhline(ys[0], color="gray", ls="--", lw=1)
            ax.errorbar(xs, ys, yerr=[[y - a for y, a in zip(ys, lo)], [b - y for y, b in zip(ys, hi)]],
                        marker=_MARKERS.get(method, "o"), ms=max(4.0, sizes[method]), lw=1.5, alpha=0.85,
                        capsize=3, label=method)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("compression ratio (tokens seen / retained; quest: / read)" if "quest" in methods
                      else "compression ratio (tokens seen / retained)", fontsize=8)
        ax.set_ylabel("accuracy", fontsize=8)
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8, loc="best")
    fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
