"""A training run at a glance: one PNG with its loss and metric curves, and a short text summary,
from the run log (``RUN/log.jsonl``, see :mod:`council_fast.runlog`). Plotting needs matplotlib
(optional extra ``report``)."""
from __future__ import annotations

import math
import os
import statistics

from .fileio import atomic_path

__all__ = ["group_series", "summarize", "plot_report", "REPORT_NAME"]

REPORT_NAME = "report.png"
_LABELLED = ("source",)


def _split(key: str) -> tuple[str, str]:
    """'b2a/dis/3' -> ('b2a/dis', '3'); 'eval/fid/source' -> ('eval/fid', 'source'); 'lr/gen' -> ('lr', 'gen')."""
    parts = key.split("/")
    if len(parts) > 1 and (parts[-1].isdigit() or parts[-1] in _LABELLED):
        return "/".join(parts[:-1]), parts[-1]
    if parts[0] == "lr" and len(parts) > 1:
        return "lr", "/".join(parts[1:])
    return key, ""


def group_series(series: dict) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """Curves by panel: panel name -> line label -> (steps, values); losses first, then eval, lr, perf."""
    groups: dict[str, dict] = {}
    for key in sorted(series):
        panel, label = _split(key)
        groups.setdefault(panel, {})[label] = series[key]
    order = lambda name: (name.startswith("eval/"), name == "lr", name.startswith("perf/"), name)  # noqa: E731
    return {name: groups[name] for name in sorted(groups, key=order)}


def _last(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return finite[-1] if finite else math.nan


def _eval_lines(groups: dict) -> list[str]:
    fid = groups.get("eval/fid")
    if not fid:
        return ["no evaluations logged (train with --eval-every N --inception-weights F)"]
    lines = []
    members = {k: v for k, v in fid.items() if k.isdigit()}
    last_step = max(steps[-1] for steps, _ in fid.values())
    latest = {k: v[-1] for k, (s, v) in members.items() if s[-1] == last_step}
    if latest:
        text = ", ".join(f"member {k} {v:.2f}" for k, v in sorted(latest.items(), key=lambda kv: int(kv[0])))
        lines.append(f"FID at iteration {last_step}: {text}")
        best_now = min(latest, key=lambda k: latest[k])
        lines.append(f"best member now: {best_now} (FID {latest[best_now]:.2f})")
    for k, (steps, values) in sorted(members.items(), key=lambda kv: int(kv[0])):
        i = min(range(len(values)), key=lambda j: values[j] if math.isfinite(values[j]) else math.inf)
        lines.append(f"member {k}: best FID {values[i]:.2f} at iteration {steps[i]}")
    if "source" in fid:
        lines.append(f"untranslated source images: FID {_last(fid['source'][1]):.2f}")
    return lines


def summarize(series: dict, images: list[dict] | None = None) -> str:
    """A few lines: iterations, speed, the latest losses (mean over members), evaluations."""
    if not series:
        return "the run log holds no scalars yet"
    groups = group_series(series)
    steps = sorted({s for st, _ in series.values() for s in st})
    lines = [f"iterations logged: {steps[0]}..{steps[-1]} ({len(steps)} steps)"]
    speed = series.get("perf/img_per_s")
    if speed and speed[1]:
        lines.append(f"speed: median {statistics.median(speed[1]):.2f} img/s, last {speed[1][-1]:.2f} img/s")
    losses = {name: lines_ for name, lines_ in groups.items()
              if not name.startswith(("eval/", "perf/")) and name != "lr"}
    if losses:
        latest = [f"{name} {statistics.fmean(_last(v) for _, v in lines_.values()):.4g}"
                  for name, lines_ in losses.items()]
        lines.append("latest losses (mean over members): " + ", ".join(latest))
    lines += _eval_lines(groups)
    if images:
        lines.append(f"sample sheets: {len(images)} (last: {images[-1].get('path', images[-1]['image'])})")
    return "\n".join(lines)


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise RuntimeError(f"the report plot needs matplotlib: pip install 'council-fast[report]' ({e})") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_report(series: dict, path: str | os.PathLike, title: str = "") -> str:
    """One PNG: a panel per loss kind (a line per member), per metric, learning rates, speed."""
    plt = _pyplot()
    groups = group_series(series)
    if not groups:
        raise ValueError("nothing to plot: the run log holds no scalars")
    cols = min(3, len(groups))
    rows = math.ceil(len(groups) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.2 * rows), squeeze=False)
    for ax, (name, lines) in zip(axes.flat, groups.items()):
        for label, (steps, values) in lines.items():
            ax.plot(steps, values, label=label or None, marker="o" if len(steps) < 20 else None, markersize=3)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("iteration", fontsize=8)
        ax.tick_params(labelsize=8)
        if len(lines) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
    return os.fspath(path)
