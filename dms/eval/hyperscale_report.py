"""Table, JSON and two-panel plot (accuracy vs peak KV memory, accuracy vs KV reads, each
method's Pareto frontier drawn) of a ``dms hyperscale`` run (points from dms.eval.hyperscale)."""
from __future__ import annotations

import json
from pathlib import Path

from dms.eval.hyperscale import FAIRNESS, Point, budget_gaps, frontier
from dms.eval.report import pyplot

_AXES = (("peak_bytes", "peak KV memory per prompt (KiB)"), ("read_bytes", "KV reads per prompt (MiB)"))
_SCALE = {"peak_bytes": 1024, "read_bytes": 1024 ** 2}


def table(points: list[Point], knob: str) -> str:
    head = ["method", knob, "W", "accuracy", "95% CI", "chain acc", "peak KiB", "reads MiB", "seconds"]
    lines = [[p.method, str(p.level), str(p.chains), f"{p.accuracy:.3f}", f"{p.ci_low:.2f}-{p.ci_high:.2f}",
              f"{p.chain_accuracy:.3f}", f"{p.peak_bytes / 1024:.1f}", f"{p.read_bytes / 1024 ** 2:.2f}",
              f"{p.seconds:.1f}"] for p in points]
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]
    fmt = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    out = [fmt(head), "-" * len(fmt(head))] + [fmt(line) for line in lines]
    out += ["", "best accuracy within each budget (the budgets: vanilla's configurations):"]
    for x, name in _AXES:
        for g in budget_gaps(points, x):
            best = ", ".join(f"{m} {'-' if a is None else f'{a:.3f}'}" for m, a in g["best"].items())
            what, unit = name.split(" per prompt ")
            out.append(f"  {knob}={g['level']} {what} <= {g['budget'] / _SCALE[x]:.2f} {unit[1:-1]}: {best}")
    out += ["", "accuracy: majority vote of W chains (95% Wilson interval); chain acc: mean of single chains",
            "fairness: " + FAIRNESS]
    return "\n".join(out)


def save_json(points: list[Point], path: str | Path, meta: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = dict(meta=dict(meta, fairness=FAIRNESS), points=[p.to_dict() for p in points],
               budgets={x: budget_gaps(points, x) for x, _ in _AXES},
               frontiers={x: {f"{m}:{lv}": [[p.chains, getattr(p, x), p.accuracy] for p in frontier(
                   [p for p in points if p.method == m and p.level == lv], x)]
                   for m in dict.fromkeys(p.method for p in points) for lv in dict.fromkeys(p.level for p in points)}
                   for x, _ in _AXES})
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def plot(points: list[Point], path: str | Path, knob: str, title: str = "dms hyperscale") -> Path:
    """One row per difficulty level, two panels per row; each point is annotated with its W and
    carries its 95% interval; the dashed step line is the method's Pareto frontier."""
    plt = pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    levels = list(dict.fromkeys(p.level for p in points))
    methods = list(dict.fromkeys(p.method for p in points))
    fig, axes = plt.subplots(len(levels), 2, figsize=(10, 3.8 * len(levels)), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row, level in zip(axes, levels):
        for ax, (x, name) in zip(row, _AXES):
            for i, method in enumerate(methods):
                pts = sorted((p for p in points if p.method == method and p.level == level),
                             key=lambda p: getattr(p, x))
                if not pts:
                    continue
                c = colors[i % len(colors)]
                xs = [getattr(p, x) / _SCALE[x] for p in pts]
                ax.errorbar(xs, [p.accuracy for p in pts], fmt="o", color=c, capsize=2, alpha=0.8, label=method,
                            yerr=[[max(0.0, p.accuracy - p.ci_low) for p in pts],  # rounding may cross
                                  [max(0.0, p.ci_high - p.accuracy) for p in pts]])
                for p, xv in zip(pts, xs):
                    ax.annotate(f"{p.chains}", (xv, p.accuracy), fontsize=7, xytext=(3, 3), textcoords="offset points")
                front = frontier(pts, x)  # drawn out to the method's largest configuration
                ax.step([getattr(p, x) / _SCALE[x] for p in front] + [max(xs)],
                        [p.accuracy for p in front] + [front[-1].accuracy], where="post", color=c, ls="--", lw=1.2)
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(plt.NullFormatter())
            ax.set_xlabel(name, fontsize=8)
            ax.set_ylabel("accuracy (vote of W chains)", fontsize=8)
            ax.set_ylim(-0.05, 1.05)
            ax.set_title(f"{knob} = {level}", fontsize=10)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="best")
    fig.suptitle(f"{title} (labels: W chains; dashed: Pareto frontier)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
