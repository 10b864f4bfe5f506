"""PNG plots of training runs, read from each RUN_DIR/log.jsonl (`hypermoe plot RUN_DIR [RUN_DIR ...] -o OUT_DIR`).

The log (written by `hypermoe train`) holds one JSON object per line. A line with "loss" is a training record
("step", "loss", and "lr", "tokens_per_s" which are not plotted); a line with "val_loss" is an evaluation
record ("step", "val_loss", "val_ppl", "expert_fraction": per MoE layer a list of each expert's fraction of the
tokens, "hyper_share": per MoE layer the HyperExpert's share of the FFN output norm; both either an object keyed
by the layer's block index, as `hypermoe train` writes them, or a list over the MoE layers). A record of a step
already seen replaces it (a resumed run redoes the steps after its checkpoint). A partial last line without its
line break (a killed run) is skipped with a note; any other line that is not a JSON object is an error.

Plots, one PNG each (written atomically; an existing one is refused unless force):
- loss.png: every run's training loss (faint: raw; solid: EMA-smoothed) and validation loss (dashed, dots),
  on one axis, labelled by run name (the directory's name).
- expert_load_layer{L}.png: for MoE layer L (its key in "expert_fraction"), one heatmap per run of
  each expert's token fraction (rows) over the evaluation steps (columns), on one colour scale.
- hyper_share.png: the HyperExpert's share per MoE layer over the evaluation steps, every run on one axis.
A plot whose data no run has is skipped with a note (a logging warning; the command shows it on stderr).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from ref.files import atomic_output, check_output

LOG_FILE = "log.jsonl"
EMA_DECAY = 0.9  # smoothing of the training loss: mean over the last ~10 logged steps, bias-corrected at the start
MAX_XTICKS = 8

log = logging.getLogger(__name__)


class Run(NamedTuple):
    """One run's log, by step (each list sorted by step)."""

    name: str
    train: list[dict]  # records with "loss"
    evals: list[dict]  # records with "val_loss"
    expert_fraction: dict[int, list[tuple[int, list[float]]]]  # MoE layer -> [(step, fraction per expert)]


def read_run(run_dir: str | os.PathLike, name: str | None = None) -> Run:
    """Parse RUN_DIR/log.jsonl; ValueError naming the file (and line) when it is missing or malformed."""
    path = Path(run_dir) / LOG_FILE
    if not Path(run_dir).is_dir():
        raise ValueError(f"run directory {run_dir} does not exist" if not os.path.lexists(run_dir)
                         else f"{run_dir} is not a run directory")
    if not path.is_file():
        raise ValueError(f"{path} not found: is {run_dir} a `hypermoe train` run directory?")
    train: dict[int, dict] = {}
    evals: dict[int, dict] = {}
    with open(path, encoding="utf-8") as f:
        try:
            lines = list(enumerate(f, 1))
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: not UTF-8 text ({err.reason})") from None
    for number, line in lines:
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines) and not line.endswith("\n"):  # cut off mid-write by a kill
                log.warning(f"note: {where}: partial last line skipped (a killed run)")
                continue
            raise ValueError(f"{where}: invalid JSON ({err.msg}, column {err.colno})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
        if "loss" not in record and "val_loss" not in record:
            continue  # another kind of line (a header, a note): nothing to plot
        step = record.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            raise ValueError(f"{where}: 'step' must be an integer, got {step!r}")
        for key in ("loss", "val_loss"):
            if key in record and not _is_number(record[key]):
                raise ValueError(f"{where}: {key!r} must be a number, got {record[key]!r}")
        if "loss" in record:
            train[step] = record
        if "val_loss" in record:
            record = {**record, "expert_fraction": _per_layer(record, "expert_fraction", where),
                      "hyper_share": _per_layer(record, "hyper_share", where)}
            evals[step] = record
    fractions: dict[int, list[tuple[int, list[float]]]] = {}
    for step, record in sorted(evals.items()):
        for layer, row in record["expert_fraction"].items():
            fractions.setdefault(layer, []).append((step, [float(v) for v in row]))
    for layer, rows in fractions.items():
        if len({len(row) for _, row in rows}) > 1:
            raise ValueError(f"{path}: MoE layer {layer}'s expert_fraction changes length between steps")
    return Run(name or _run_name(run_dir), [train[s] for s in sorted(train)], [evals[s] for s in sorted(evals)],
               fractions)


def plot_runs(run_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike, force: bool = False) -> list[Path]:
    """Write the PNGs described in the module docstring into `out_dir` (created if missing; its parent must exist).
    Every log is read and every destination checked before anything is written. Returns the paths written."""
    if not run_dirs:
        raise ValueError("no run directories given")
    names = _run_names(run_dirs)
    runs = [read_run(d, name) for d, name in zip(run_dirs, names)]
    try:
        from matplotlib.figure import Figure  # the object API: the Agg canvas, no pyplot state, no display
    except ImportError:
        raise ValueError("hypermoe plot needs matplotlib: pip install 'hypermoe[train]'") from None

    plots: dict[str, object] = {}  # file name -> function drawing the figure
    if any(run.train or run.evals for run in runs):
        plots["loss.png"] = lambda: _loss_figure(Figure, runs)
    else:
        log.warning("note: no run logged 'loss' or 'val_loss'; loss.png skipped")
    layers = sorted({layer for run in runs for layer in run.expert_fraction})
    for layer in layers:
        plots[f"expert_load_layer{layer}.png"] = lambda layer=layer: _load_figure(Figure, runs, layer)
    for run in runs:
        if not run.expert_fraction:
            log.warning(f"note: run {run.name} logged no 'expert_fraction'; no expert-load heatmap for it")
    if any(record["hyper_share"] for run in runs for record in run.evals):
        plots["hyper_share.png"] = lambda: _hyper_share_figure(Figure, runs)
    else:
        log.warning("note: no run logged 'hyper_share'; hyper_share.png skipped")
    if not plots:
        raise ValueError("nothing to plot: the logs hold no training or evaluation records")

    out = Path(out_dir)
    if out.exists() and not out.is_dir():  # --force replaces PNGs inside the directory, never a file by a directory
        raise ValueError(f"{out} is a file: -o takes the directory the PNGs are written into (a file is not "
                         "replaced by one, even with --force)")
    if not out.is_dir():
        check_output(out, directory=True)  # a one-line error when its parent is missing or it is a file
        out.mkdir()
    paths = [check_output(out / name, force=force) for name in plots]  # refuse before drawing anything
    for path, draw in zip(paths, plots.values()):
        fig = draw()
        with atomic_output(path, force=force) as tmp:
            fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})  # no version stamp: same bytes
    return paths


def _loss_figure(Figure, runs: list[Run]):
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.add_subplot()
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for run, color in zip(runs, colors):
        if run.train:
            steps = [r["step"] for r in run.train]
            losses = [float(r["loss"]) for r in run.train]
            ax.plot(steps, losses, color=color, alpha=0.25, linewidth=0.8)
            ax.plot(steps, _ema(losses, EMA_DECAY), color=color, label=f"{run.name} train")
        if run.evals:
            ax.plot([r["step"] for r in run.evals], [float(r["val_loss"]) for r in run.evals], color=color,
                    linestyle="--", marker="o", markersize=3, label=f"{run.name} val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(f"training loss (faint raw, solid EMA {EMA_DECAY}) and validation loss (dashed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def _load_figure(Figure, runs: list[Run], layer: int):
    from matplotlib.ticker import MaxNLocator

    shown = [run for run in runs if layer in run.expert_fraction]
    vmax = max(max(row) for run in shown for _, row in run.expert_fraction[layer]) or 1.0
    fig = Figure(figsize=(8, 1.2 + 2.2 * len(shown)), layout="constrained")
    axes = fig.subplots(len(shown), 1, squeeze=False)[:, 0]
    for ax, run in zip(axes, shown):
        steps = [step for step, _ in run.expert_fraction[layer]]
        grid = [list(col) for col in zip(*(row for _, row in run.expert_fraction[layer]))]  # (N experts, S evals)
        image = ax.imshow(grid, aspect="auto", origin="lower", interpolation="nearest", cmap="viridis",
                          vmin=0.0, vmax=vmax)
        ticks = list(range(0, len(steps), max(1, math.ceil(len(steps) / MAX_XTICKS))))
        ax.set_xticks(ticks, [str(steps[i]) for i in ticks])
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("expert")
        ax.set_title(f"{run.name} (uniform = {1 / len(grid):.3g})", fontsize="medium")
    axes[-1].set_xlabel("step")
    fig.colorbar(image, ax=list(axes), label="fraction of tokens")
    fig.suptitle(f"layer {layer}: fraction of tokens routed to each expert")
    return fig


def _hyper_share_figure(Figure, runs: list[Run]):
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.add_subplot()
    styles = ["-", "--", ":", "-."]
    for i, run in enumerate(runs):
        per_layer: dict[int, list[tuple[int, float]]] = {}
        for record in run.evals:
            for layer, share in record["hyper_share"].items():
                per_layer.setdefault(layer, []).append((record["step"], float(share)))
        for layer, points in sorted(per_layer.items()):
            ax.plot(*zip(*points), color=f"C{i % 10}", linestyle=styles[layer % len(styles)], marker="o",
                    markersize=3, label=f"{run.name} layer {layer}")
    ax.set_xlabel("step")
    ax.set_ylabel("HyperExpert share of the FFN output norm")
    ax.set_title("HyperExpert share per MoE layer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def _ema(values: list[float], decay: float) -> list[float]:
    """Exponential moving average, bias-corrected (divided by 1 - decay^t) so the first points are not pulled to 0."""
    out, avg = [], 0.0
    for t, value in enumerate(values, 1):
        avg = decay * avg + (1 - decay) * value
        out.append(avg / (1 - decay**t))
    return out


def _per_layer(record: dict, key: str, where: str) -> dict[int, object]:
    """record[key] as {MoE layer: value}: an object keyed by block index ("1": ...) or a list over the MoE layers;
    {} when absent. Values: expert_fraction a non-empty list of numbers per layer, hyper_share a number."""
    value = record.get(key)
    if value is None:
        return {}
    if isinstance(value, list):
        items = dict(enumerate(value))
    elif isinstance(value, dict) and all(str(k).isdigit() for k in value):
        items = {int(k): v for k, v in value.items()}
    else:
        raise ValueError(f"{where}: {key!r} must be an object keyed by layer index, or a list per MoE layer")
    ok = (lambda v: isinstance(v, list) and v and all(map(_is_number, v))) if key == "expert_fraction" else _is_number
    for layer, v in items.items():
        if not ok(v):
            want = "a non-empty list of numbers" if key == "expert_fraction" else "a number"
            raise ValueError(f"{where}: {key!r} of layer {layer} must be {want}, got {v!r}")
    return dict(sorted(items.items()))


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _run_name(run_dir: str | os.PathLike) -> str:
    return Path(run_dir).resolve().name or str(run_dir)


def _run_names(run_dirs: Sequence[str | os.PathLike]) -> list[str]:
    """Each run's directory name; the path as given where two runs share a name."""
    names = [_run_name(d) for d in run_dirs]
    return [str(d) if names.count(name) > 1 else name for d, name in zip(run_dirs, names)]
