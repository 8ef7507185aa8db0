"""Table, JSON and accuracy-vs-compression plot of an evaluation (rows from dms.eval.runner)."""
from __future__ import annotations

import json
from pathlib import Path

from dms.eval.runner import Row

_MARKERS = {"vanilla": "*", "dms": "o", "streaming": "s", "h2o": "^", "tova": "D", "quest": "v"}


def summary(rows: list[Row]) -> list[dict]:
    """One entry per (method, ratio): accuracy, compression and KV bytes averaged over tasks."""
    groups: dict[str, list[Row]] = {}
    for r in rows:
        groups.setdefault(r.label, []).append(r)
    out = []
    for label, rs in groups.items():
        n = len(rs)
        out.append(dict(label=label, method=rs[0].method, ratio=rs[0].ratio,
                        accuracy=sum(r.accuracy for r in rs) / n, compression=sum(r.compression for r in rs) / n,
                        kv_bytes=sum(r.kv_bytes for r in rs) / n, tasks={r.task: r.accuracy for r in rs}))
    return out


def table(rows: list[Row]) -> str:
    """Accuracy per task, mean accuracy, achieved compression ratio and retained KV KiB per sample."""
    tasks = list(dict.fromkeys(r.task for r in rows))
    head = ["method"] + tasks + ["mean acc", "CR", "KV KiB"]
    lines = []
    for s in summary(rows):
        lines.append([s["label"]] + [f"{s['tasks'][t]:.3f}" if t in s["tasks"] else "-" for t in tasks]
                     + [f"{s['accuracy']:.3f}", f"{s['compression']:.2f}x", f"{s['kv_bytes'] / 1024:.1f}"])
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]
    fmt = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    rule = "-" * len(fmt(head))
    notes = ["quest keeps every token: its CR is tokens seen / keys read per decode step"] \
        if any(r.method == "quest" for r in rows) else []
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


def plot(rows: list[Row], path: str | Path, title: str = "accuracy vs KV compression") -> Path:
    """Mean accuracy over tasks vs achieved compression ratio, one line per method (panel 1),
    then one panel per task, as a PNG."""
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
                    pts.setdefault(r.label, []).append((r.compression, r.accuracy))
            xy = sorted((sum(x for x, _ in v) / len(v), sum(y for _, y in v) / len(v)) for v in pts.values())
            if not xy:
                continue
            xs, ys = zip(*xy)
            if method == "vanilla":
                ax.axhline(ys[0], color="gray", ls="--", lw=1)
            ax.plot(xs, ys, marker=_MARKERS.get(method, "o"), ms=max(4.0, sizes[method]), lw=1.5, alpha=0.85,
                    label=method)
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
