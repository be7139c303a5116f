"""Figures of analyze_svd.py: one PNG per measurement, each returning the numbers it plots.

Every figure uses the same color per init method (METHOD_COLORS) and the usual spelling of the
method (DISPLAY_NAMES), so figures of different runs and scripts can be compared side by side.
Runs are analyze_svd.Run objects (label, method, seed, rank); layers are the per-layer dicts of
analyze_svd.analyze_weights.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

if TYPE_CHECKING:
    from analyze_svd import Run

# One fixed color per init method across every figure (matplotlib's tab10 colors, full FT in black).
METHOD_COLORS = {
    "rlpo": "#d62728",
    "rlmo": "#9467bd",
    "pissa": "#1f77b4",
    "milora": "#17becf",
    "olora": "#2ca02c",
    "lora": "#7f7f7f",
    "gaussian": "#bcbd22",
    "full": "#000000",
}
OTHER_COLOR = "#8c564b"
DISPLAY_NAMES = {
    "rlpo": "RLPO",
    "rlmo": "RLMO",
    "pissa": "PiSSA",
    "milora": "MiLoRA",
    "olora": "OLoRA",
    "lora": "LoRA",
    "gaussian": "Gaussian",
    "full": "Full FT",
}
DYNAMICS_METRICS = {
    "reward": "Reward (mean over completions)",
    "kl_to_init": "KL to the initial policy (train_grpo.py --kl_steps)",
    "kl": "KL to the reference model (TRL, beta > 0)",
    "entropy": "Token entropy",
    "completions/mean_length": "Completion length (tokens)",
    "grad_norm": "Gradient norm",
}


def to_python(value):
    """Convert tensors (and containers of them) to JSON-ready lists of floats with 6 significant digits."""
    if isinstance(value, torch.Tensor):
        return to_python(value.tolist())
    if isinstance(value, dict):
        return {key: to_python(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_python(item) for item in value]
    if isinstance(value, float):
        return float(f"{value:.6g}") if math.isfinite(value) else None
    return value


def display_name(method: str) -> str:
    return DISPLAY_NAMES.get(method, method)


def method_color(method: str) -> str:
    return METHOD_COLORS.get(method, OTHER_COLOR)


# ----------------------------------------------------------------------------------------------
# Figures (each returns the numbers it plots, stored in analysis.json under "figures")
# ----------------------------------------------------------------------------------------------


def layer_label(layer: dict) -> str:
    return f"layer {layer['layer']} {layer['module']}"


def ordered_methods(methods) -> list[str]:
    """Sort init method names in the fixed order of METHOD_COLORS, unknown ones last."""
    known = list(METHOD_COLORS)
    return sorted(set(methods), key=lambda method: (known.index(method) if method in known else len(known), method))


def summarize_values(values: list[float]) -> dict:
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values), "n": len(values)}


def grid_figure(rows: int, columns: int, width: float = 4.0, height: float = 3.2):
    figure = Figure(figsize=(max(width * columns, 8.0), height * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False)
    return figure, axes


def method_legend(figure, runs_by_label: dict[str, Run], labels):
    """Add one legend entry per init method, in the fixed method order."""
    from matplotlib.lines import Line2D

    methods = ordered_methods(runs_by_label[label].method for label in labels)
    handles = [Line2D([], [], color=method_color(method), label=display_name(method)) for method in methods]
    figure.legend(handles=handles, loc="outside lower center", ncols=max(len(handles), 1), title="init")


def plot_cumulative_energy(layers: list[dict], runs_by_label: dict[str, Run], side: str, path: Path) -> dict:
    """Plot the cumulative update energy along W's singular vectors: one panel per layer, one line per run."""
    modules = list(dict.fromkeys(layer["module"] for layer in layers))
    indices = list(dict.fromkeys(layer["layer"] for layer in layers))
    figure, axes = grid_figure(len(modules), len(indices))
    plotted = {}
    for layer in layers:
        axis = axes[modules.index(layer["module"])][indices.index(layer["layer"])]
        n = len(layer["singular_values"])
        x = range(1, n + 1)
        axis.plot(x, [i / n for i in x], color="#bbbbbb", linestyle="--", linewidth=1, label="isotropic")
        for label, metrics in layer["runs"].items():
            curve = metrics[f"cumulative_{side}"]
            if curve is None:
                continue
            axis.plot(x, curve, color=method_color(runs_by_label[label].method), linewidth=1.2, alpha=0.85)
            plotted.setdefault(layer["name"], {})[label] = curve
        axis.set_title(layer_label(layer), fontsize=10)
        axis.set_xlabel(f"{side} singular index i of W (descending)")
        axis.set_ylabel("cumulative share of " + (r"$\|dW v_i\|^2$" if side == "right" else r"$\|u_i^\top dW\|^2$"))
        axis.set_ylim(0, 1.02)
    figure.suptitle(f"Cumulative update energy along the {side} singular vectors of the pretrained W (dashed: isotropic)")
    labels = {label for curves in plotted.values() for label in curves}
    method_legend(figure, runs_by_label, labels)
    if not labels:
        figure.text(0.5, 0.5, "undefined: every run is at step 0 (dW = 0)", ha="center", fontsize=14)
    figure.savefig(path, dpi=150)
    return plotted


def method_statistics(layers: list[dict], runs_by_label: dict[str, Run], value) -> dict:
    """Return {module: {method: {mean, min, max, n}}} of value(layer, metrics) over layers and seeds."""
    collected = {}
    for layer in layers:
        for label, metrics in layer["runs"].items():
            number = value(layer, metrics)
            if number is not None:
                collected.setdefault(layer["module"], {}).setdefault(runs_by_label[label].method, []).append(number)
    return {module: {method: summarize_values(values) for method, values in by_method.items()} for module, by_method in collected.items()}


def bars_by_method(axis, statistics: dict, groups: list[str]):
    """Draw grouped bars: one group per key of `statistics`, one bar per method with a min-max error bar."""
    methods = ordered_methods(method for group in groups for method in statistics.get(group, {}))
    width = 0.8 / max(len(methods), 1)
    for position, method in enumerate(methods):
        xs, means, errors = [], [], [[], []]
        for index, group in enumerate(groups):
            entry = statistics.get(group, {}).get(method)
            if entry:
                xs.append(index + (position - (len(methods) - 1) / 2) * width)
                means.append(entry["mean"])
                errors[0].append(entry["mean"] - entry["min"])
                errors[1].append(entry["max"] - entry["mean"])
        color = method_color(method)
        axis.bar(xs, means, width=width, color=color, label=display_name(method), yerr=errors, capsize=2, error_kw={"linewidth": 0.8})
    crowded = len(groups) > 6
    axis.set_xticks(range(len(groups)), groups, rotation=30 if crowded else 0, ha="right" if crowded else "center")
    axis.legend(title="init", fontsize=8)


def plot_shares(
    layers: list[dict],
    runs_by_label: dict[str, Run],
    keys: tuple[str, str],
    titles: tuple[str, str],
    ylabel: str,
    path: Path,
) -> dict:
    """Plot two grouped bar panels (e.g. top-r and bottom-r share) per module type, mean over layers and seeds."""
    modules = list(dict.fromkeys(layer["module"] for layer in layers))
    figure, axes = grid_figure(1, 2, width=6.0, height=4.0)
    plotted = {}
    for axis, key, title in zip(axes[0], keys, titles):
        statistics = method_statistics(layers, runs_by_label, lambda layer, metrics: metrics[key])
        bars_by_method(axis, statistics, modules)
        axis.set_title(title)
        axis.set_xlabel("module")
        axis.set_ylabel(ylabel)
        axis.set_ylim(0, 1.05)
        plotted[key] = statistics
    figure.suptitle("Mean over the analyzed layers and seeds; error bars span min to max", fontsize=10)
    figure.savefig(path, dpi=150)
    return plotted


def plot_similarity(layers: list[dict], run: Run, path: Path) -> dict:
    """Plot a run's similarity heat maps (W top-k and bottom-k vs. update top-i), mean over layers per module."""
    modules = list(dict.fromkeys(layer["module"] for layer in layers if run.label in layer["runs"]))
    figure, axes = grid_figure(len(modules), 2, width=4.2, height=3.4)
    plotted = {}
    for row, module in enumerate(modules):
        selected = [layer for layer in layers if layer["module"] == module and run.label in layer["runs"]]
        for column, side in enumerate(("top", "bottom")):
            maps = [torch.tensor(layer["runs"][run.label][f"similarity_{side}"]) for layer in selected]
            mean = torch.stack(maps).mean(0)
            axis = axes[row][column]
            extent = (0.5, mean.shape[1] + 0.5, 0.5, mean.shape[0] + 0.5)
            image = axis.imshow(
                mean.numpy(), origin="lower", aspect="auto", vmin=0, vmax=1, cmap="viridis", extent=extent, interpolation="nearest"
            )
            names = ", ".join(str(layer["layer"]) for layer in selected)
            axis.set_title(f"{module}, layer{'s' if len(selected) > 1 else ''} {names}: W {side}-k", fontsize=9)
            axis.set_xlabel("update singular vectors i")
            axis.set_ylabel(f"W {side}-k right singular vectors")
            plotted.setdefault(module, {})[side] = to_python(mean)
    figure.colorbar(image, ax=axes, label=r"$\|V_k^\top Q_i\|_F^2 / \min(k, i)$", shrink=0.6)
    sources = {layer["runs"][run.label]["source"] for layer in layers if run.label in layer["runs"]}
    subjects = {"update": "dW", "lora_A": "lora_A (step 0, dW = 0)"}
    subject = " / ".join(subjects[source] for source in sorted(sources, reverse=True))
    figure.suptitle(f"{run.label}: top-i right singular vectors of {subject}\nagainst W's top-k and bottom-k right singular vectors")
    figure.savefig(path, dpi=150)
    return plotted


def plot_spectrum(layers: list[dict], ranks: list[int], path: Path) -> dict:
    """Plot W's singular values per module type, averaged over the analyzed layers, with each adapter rank r marked."""
    figure, axes = grid_figure(1, 1, width=6.5, height=4.5)
    axis = axes[0][0]
    plotted = {}
    for module in dict.fromkeys(layer["module"] for layer in layers):
        selected = [layer for layer in layers if layer["module"] == module]
        mean = torch.tensor([layer["singular_values"] for layer in selected]).mean(0)
        out_features, in_features = selected[0]["shape"]
        axis.semilogy(range(1, len(mean) + 1), mean.numpy(), label=f"{module} ({out_features}x{in_features})")
        plotted[module] = {"layers": [layer["layer"] for layer in selected], "mean_singular_values": to_python(mean)}
    for rank in sorted(set(ranks)):
        axis.axvline(rank, color="#999999", linestyle=":", linewidth=1)
    axis.set_xlabel("singular index i (descending); dotted: r = " + ", ".join(map(str, sorted(set(ranks)))))
    axis.set_ylabel(r"singular value $\sigma_i$")
    axis.set_title("Singular values of the pretrained weights (mean over analyzed layers)")
    axis.legend(title="module")
    figure.savefig(path, dpi=150)
    return plotted


def summed_gaps(layers: list[dict]) -> dict[str, dict]:
    """Return {run label: {gap, cosine}} over all analyzed layers, from the summed squared norms and inner products.

    gap = sqrt(sum ||dW - dW_full||^2 / sum ||dW_full||^2) and
    cosine = sum <dW, dW_full> / sqrt(sum ||dW||^2 x sum ||dW_full||^2), summed over the layers.
    """
    totals = {}
    for layer in layers:
        for label, metrics in layer["runs"].items():
            if "gap" not in metrics:
                continue
            total = totals.setdefault(label, dict.fromkeys(("difference_sq", "norm_sq", "full_norm_sq", "inner_product"), 0.0))
            for key in total:
                total[key] += metrics[key]
    return {
        label: {
            "gap": math.sqrt(total["difference_sq"] / total["full_norm_sq"]),
            "cosine": total["inner_product"] / math.sqrt(total["norm_sq"] * total["full_norm_sq"]),
        }
        for label, total in totals.items()
    }


def plot_gap(layers: list[dict], runs_by_label: dict[str, Run], reference: Run, path: Path) -> dict:
    """Plot the relative gap to the full fine-tuning update and the cosine per layer, bars per init method."""
    groups = [layer_label(layer) for layer in layers] + ["all analyzed"]
    statistics = {"gap": {}, "cosine": {}}
    for layer, group in zip(layers, groups):
        for label, metrics in layer["runs"].items():
            if "gap" not in metrics:
                continue
            method = runs_by_label[label].method
            for key in ("gap", "cosine"):
                statistics[key].setdefault(group, {}).setdefault(method, []).append(metrics[key])
    for label, values in summed_gaps(layers).items():
        method = runs_by_label[label].method
        for key in ("gap", "cosine"):
            statistics[key].setdefault("all analyzed", {}).setdefault(method, []).append(values[key])
    for by_group in statistics.values():
        for by_method in by_group.values():
            for method, values in by_method.items():
                by_method[method] = summarize_values(values)

    figure, axes = grid_figure(2, 1, width=max(8.0, 1.0 * len(groups)), height=3.8)
    titles = {"gap": r"$\|dW - dW_{full}\|_F / \|dW_{full}\|_F$", "cosine": r"$\cos(dW, dW_{full})$"}
    for axis, key in zip(axes[:, 0], ("gap", "cosine")):
        bars_by_method(axis, statistics[key], groups)
        axis.set_ylabel(titles[key])
        axis.axhline(1.0 if key == "gap" else 0.0, color="#999999", linewidth=0.8)
    axes[1][0].set_xlabel("layer (bars: mean over seeds, error bars min-max)")
    figure.suptitle(f"Distance of each update to the full fine-tuning update ({reference.label})")
    figure.savefig(path, dpi=150)
    return statistics


def plot_dynamics(dynamics: dict, band: str, path: Path) -> dict:
    """Plot training curves against step: one panel per logged metric, one line (and band) per init method."""
    metrics = [metric for metric in DYNAMICS_METRICS if any(metric in series for series in dynamics.values())]
    columns = min(len(metrics), 3)
    figure, axes = grid_figure(math.ceil(len(metrics) / columns), columns)
    for axis in axes.flat[len(metrics) :]:
        axis.set_visible(False)
    for axis, metric in zip(axes.flat, metrics):
        for method, series_by_metric in dynamics.items():
            series = series_by_metric.get(metric)
            if not series:
                continue
            count = len(series["runs"])
            label = f"{display_name(method)} (1 run)"
            if count > 1:
                label = f"{display_name(method)} ({count} runs, mean and {'min-max' if band == 'minmax' else '+-1 std'})"
            axis.plot(series["steps"], series["mean"], color=method_color(method), label=label)
            if count > 1:
                axis.fill_between(series["steps"], series["low"], series["high"], color=method_color(method), alpha=0.2, linewidth=0)
        axis.set_xlabel("training step")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_ylabel(metric)
        axis.set_title(DYNAMICS_METRICS[metric])
        axis.legend(fontsize=7)
    figure.suptitle("Training dynamics per init method")
    figure.savefig(path, dpi=150)
    return dynamics


def plot_kl(kl: dict, runs_by_label: dict[str, Run], path: Path) -> dict:
    """Plot the mean per-token KL to the initial policy: a bar per init method (mean over seeds), a dot per run."""
    by_method = {method: [] for method in ordered_methods(runs_by_label[label].method for label in kl)}
    for label, result in kl.items():
        by_method[runs_by_label[label].method].append(result["mean_token_kl"])
    figure, axes = grid_figure(1, 1, width=6.0, height=4.0)
    axis = axes[0][0]
    for index, (method, values) in enumerate(by_method.items()):
        axis.bar(index, sum(values) / len(values), color=method_color(method), label=display_name(method))
        axis.scatter([index] * len(values), values, color="black", s=12, zorder=3)
    axis.set_xticks(range(len(by_method)), [display_name(method) for method in by_method])
    axis.set_ylabel(r"mean per-token $KL(\pi \,\|\, \pi_{init})$ [nats]")
    axis.set_title("Drift from the initial policy on held-out prompts (dots: single runs)")
    figure.savefig(path, dpi=150)
    return {display_name(method): values for method, values in by_method.items()}


def write_figures(layers: list[dict], runs: list[Run], reference: Run | None, dynamics: dict, kl: dict | None, band: str, folder: Path) -> dict:
    """Write every PNG into `folder`; returns {file name: the numbers it plots}."""
    runs_by_label = {run.label: run for run in runs}
    energy_titles = ("Update energy in W's top-r right singular directions", "Update energy in W's bottom-r right singular directions")
    similarity_titles = ("Similarity with W's top-r subspace (k = i = r)", "Similarity with W's bottom-r subspace (k = i = r)")
    figures = {
        "energy_right.png": plot_cumulative_energy(layers, runs_by_label, "right", folder / "energy_right.png"),
        "energy_left.png": plot_cumulative_energy(layers, runs_by_label, "left", folder / "energy_left.png"),
        "energy_share.png": plot_shares(
            layers, runs_by_label, ("top_r_share_right", "bottom_r_share_right"), energy_titles, r"share of $\|dW V\|_F^2$", folder / "energy_share.png"
        ),
        "similarity_summary.png": plot_shares(
            layers, runs_by_label, ("similarity_top_at_r", "similarity_bottom_at_r"), similarity_titles, r"$\|V_r^\top Q_r\|_F^2 / r$", folder / "similarity_summary.png"
        ),
        "spectrum.png": plot_spectrum(layers, [run.rank for run in runs if run.rank], folder / "spectrum.png"),
    }
    for run in runs:
        name = "similarity_" + re.sub(r"[^A-Za-z0-9_.-]+", "-", run.label).strip("-").lower() + ".png"
        figures[name] = plot_similarity(layers, run, folder / name)
    if reference is not None:
        figures["full_ft_gap.png"] = plot_gap(layers, runs_by_label, reference, folder / "full_ft_gap.png")
    if dynamics:
        figures["dynamics.png"] = plot_dynamics(dynamics, band, folder / "dynamics.png")
    if kl:
        figures["kl.png"] = plot_kl(kl, runs_by_label, folder / "kl.png")
    return figures
