"""The recipes' generic plots; they know nothing of the study.

- `plot_epochs`: training loss and validation accuracy per epoch of a few
  runs (`recipes.compare`).
- `accuracy_against_lr` and `epoch_bands`: the panels of the study's figures
  (`recipes.report` builds their series from the records).
- `plot_layer_statistics`: per-layer statistics heatmaps, from the JSON of
  `keras_clars.callbacks.LayerStatisticsLogger`:

      .venv/bin/python -m recipes.plots layers runs/clars/layer_statistics.json \\
          --output docs/img/layers_clars.png  # --statistics=a,b --all_variables --title=T

- `plot_noise_scale`: B_simple over updates, the run's batch B as a line,
  and the mean coherence, from the same JSON (with `--noise_scale`):

      .venv/bin/python -m recipes.plots noise runs/clars/layer_statistics.json \\
          --batch_size=4096 --output docs/img/noise_clars.png

matplotlib is imported only to draw.
"""

import os
import sys

import numpy as np
from absl import app, flags

DEFAULT_STATISTICS = ("coherence", "trust_ratio")
# Most labels that fit; beyond this every n-th layer is labelled.
MAX_LABELS = 60


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # Leave a third of an inch for a suptitle, which tight_layout would
    # otherwise let the first row's titles overlap.
    top = 1 - 0.35 / figure.get_figheight() if figure.get_suptitle() else 1
    figure.tight_layout(rect=(0, 0, 1, top))
    figure.savefig(path, dpi=110)
    pyplot().close(figure)
    return path


def _grid(count, width, height):
    """A figure of `count` panels, two a row, and its axes (extra ones hidden)."""
    plt = pyplot()
    columns = min(2, count)
    rows = -(-count // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(width * columns, height * rows),
                                squeeze=False)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return figure, axes.flat


def accuracy_against_lr(panels, path, title="", floor=60.0):
    """Accuracy against peak learning rate (log scale), one panel per group.

    Args:
        panels: [(title, [series])], each series a dict with `label`, `lrs`,
            `values` (accuracy, %, per lr), `chosen` (an lr to star, or
            None) and `dashed` (bool).
        path: the PNG to write.
        title: the figure's title.
        floor: values below it (diverged or far off) are drawn on it as
            crosses, so that a 2-point difference stays visible.
    """
    from matplotlib import ticker

    figure, axes = _grid(len(panels), 6.2, 4.4)
    for ax, (panel_title, series) in zip(axes, panels):
        top, ladder = 95.0, set()
        for s in series:
            lrs, values = list(s["lrs"]), list(s["values"])
            if not lrs:
                continue
            ladder.update(lrs)
            top = max(top, max(values) + 1)
            line, = ax.plot(lrs, [max(v, floor) for v in values],
                            "--" if s["dashed"] else "-", marker="o", label=s["label"])
            low = [lr for lr, v in zip(lrs, values) if v < floor]
            ax.plot(low, [floor] * len(low), "x", markersize=11, markeredgewidth=2.5,
                    color=line.get_color())
            if s["chosen"] is not None:
                ax.plot([s["chosen"]], [values[lrs.index(s["chosen"])]], "*",
                        markersize=14, color=line.get_color())
        ax.set(xscale="log", xlabel="peak learning rate", title=panel_title,
               ylabel="final validation accuracy, %", ylim=(floor - 1, top))
        if ladder:  # ticks at the rates run, as plain numbers
            ax.xaxis.set_major_locator(ticker.FixedLocator(sorted(ladder)))
            ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_locator(ticker.NullLocator())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    figure.suptitle(f"{title} — star: chosen rate; x: below {floor:g}% "
                    "(diverged or far off), drawn at the floor", fontsize=9)
    return _save(figure, path)


def epoch_bands(panels, path):
    """Accuracy per epoch over seeds (mean, min-max band), one panel each.

    Args:
        panels: [(title, [(label, values, dashed)])], `values` an array of
            accuracies, %, of shape (seeds, epochs).
    """
    figure, axes = _grid(max(1, len(panels)), 6.2, 4.4)
    for ax, (title, curves) in zip(axes, panels):
        for label, values, dashed in curves:
            values = np.asarray(values, dtype="float64")
            epochs = np.arange(1, values.shape[1] + 1)
            line, = ax.plot(epochs, values.mean(axis=0), "--" if dashed else "-",
                            marker="o", markersize=3, label=label)
            ax.fill_between(epochs, values.min(axis=0), values.max(axis=0),
                            color=line.get_color(), alpha=0.15)
        ax.set(xlabel="epoch", ylabel="validation accuracy, %", title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(figure, path)


def plot_epochs(runs, path, title=""):
    """Training loss and validation accuracy per epoch of a few runs.

    Args:
        runs: a list of (label, epochs), `epochs` as `recipes.train.run`
            returns them (dicts with `loss` and `val_accuracy`).
    """
    figure, (loss_axes, accuracy_axes) = pyplot().subplots(1, 2, figsize=(11, 4.2))
    for label, epochs in runs:
        x = [e["epoch"] + 1 for e in epochs]
        loss_axes.plot(x, [e["loss"] for e in epochs], "o-", label=label)
        accuracy_axes.plot(x, [100 * (e.get("val_accuracy") or 0.0) for e in epochs],
                           "o-", label=label)
    loss_axes.set(xlabel="epoch", ylabel="training loss", yscale="log", title="Training loss")
    accuracy_axes.set(xlabel="epoch", ylabel="validation accuracy, %",
                      title="Validation accuracy")
    for axes in (loss_axes, accuracy_axes):
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    if title:
        figure.suptitle(title, fontsize=9)
    return _save(figure, path)


# ------------------------------------------------ per-layer statistics


def _edges(centers):
    """Cell edges halfway between the updates (the records may be uneven)."""
    centers = np.asarray(centers, dtype=float)
    if len(centers) == 1:
        return np.array([centers[0] - 0.5, centers[0] + 0.5])
    middle = (centers[1:] + centers[:-1]) / 2
    return np.concatenate(
        [[2 * centers[0] - middle[0]], middle, [2 * centers[-1] - middle[-1]]]
    )


def plot_layer_statistics(json_path, png_path, statistics=DEFAULT_STATISTICS,
                          all_variables=False, title=None):
    """Heatmaps (layer against update) of a run's per-layer statistics.

    One panel per statistic: layers in model order from top to bottom,
    updates from left to right. Coherence ||g_l|| / N_l is on a linear 0..1
    scale (dark: the gradient samples disagree, CLARS shrinks the step);
    the trust ratio is on a log scale.

    Args:
        json_path: the `LayerStatisticsLogger` JSON file.
        png_path: the PNG to write (its directory is created).
        statistics: the statistics to draw, one panel each.
        all_variables: also draw the variables that are not layer-adapted
            (biases, BatchNorm: trust ratio 1); by default only the adapted
            ones (kernels) are shown.
        title: the figure's title; default: the optimizer and the file name.

    Returns:
        `png_path`.
    """
    from matplotlib.colors import LogNorm, Normalize

    from keras_clars.callbacks import load_layer_statistics

    data = load_layer_statistics(json_path)
    unknown = [s for s in statistics if s not in data["statistics"]]
    if unknown:
        raise ValueError(
            f"Unknown statistics {unknown}; expected some of {data['statistics']}."
        )
    if not len(data["updates"]):
        raise ValueError(f"{json_path} holds no records to plot.")
    adapted = data.get("adapted") or [True] * len(data["layers"])
    keep = [i for i, a in enumerate(adapted) if a or all_variables]
    if not keep:
        raise ValueError(
            f"{json_path} has no layer-adapted variables; pass all_variables=True."
        )
    labels = [data["layers"][i] for i in keep]
    if not all_variables:
        labels = [p[: -len("/kernel")] if p.endswith("/kernel") else p for p in labels]

    rows = len(keep)
    x_edges = _edges(data["updates"])
    y_edges = np.arange(rows + 1) - 0.5
    font = 8 if rows <= 30 else 6
    height = min(2.0 + 0.16 * rows, 30)
    fig, axes = pyplot().subplots(
        1, len(statistics), figsize=(6.5 * len(statistics), height), squeeze=False,
        sharey=True,
    )
    for ax, stat in zip(axes[0], statistics):
        values = np.ma.masked_invalid(data["values"][stat][:, keep].T)
        if stat == "coherence":
            norm, cmap = Normalize(0, 1), "viridis"
        else:
            positive = values[values > 0]
            norm = (
                LogNorm(positive.min(), positive.max())
                if positive.count() and positive.min() < positive.max()
                else Normalize()
            )
            cmap = "magma"
        mesh = ax.pcolormesh(x_edges, y_edges, values, norm=norm, cmap=cmap)
        ax.set_title(stat.replace("_", " "))
        ax.set_xlabel("update")
        fig.colorbar(mesh, ax=ax, fraction=0.04, pad=0.02)
    step = max(1, -(-rows // MAX_LABELS))
    ticks = np.arange(0, rows, step)
    axes[0][0].set_yticks(ticks, [labels[i] for i in ticks], fontsize=font)
    axes[0][0].invert_yaxis()  # model order, input at the top
    axes[0][0].set_ylabel("layer (model order)")
    name = os.path.basename(json_path)
    k = data.get("gradient_accumulation_steps", 1)
    fig.suptitle(title or f"{data['optimizer']} (k={k}): {name}")
    return _save(fig, png_path)


def mean_coherence(data):
    """The geometric mean over the adapted layers of ||g_l|| / N_l, per
    record of a loaded `LayerStatisticsLogger` file."""
    adapted = np.asarray(data.get("adapted") or [True] * len(data["layers"]), bool)
    return np.exp(np.mean(np.log(data["values"]["coherence"][:, adapted]), axis=1))


def plot_noise_scale(runs, png_path, title=None):
    """B_simple over updates, each run's batch B as a dashed line of its
    colour (B far above B_simple: a larger batch buys little), and the
    mean coherence over the adapted layers.

    Args:
        runs: `(label, json_path, batch_size)` per run; each JSON written by
            `LayerStatisticsLogger` with the optimizer's `noise_scale=True`.
        png_path: the PNG to write.
        title: the figure's title.

    Returns:
        `png_path`.
    """
    from keras_clars.callbacks import load_layer_statistics

    fig, (left, right) = pyplot().subplots(1, 2, figsize=(12, 4.2))
    for i, (label, path, batch_size) in enumerate(runs):
        data = load_layer_statistics(path)
        if "b_simple" not in data:
            raise ValueError(f"{path} has no noise scale: log it with noise_scale=True.")
        color = f"C{i}"
        left.plot(data["updates"], data["b_simple"], color=color, label=label)
        left.axhline(batch_size, color=color, linestyle="--", linewidth=1)
        if any(data.get("adapted") or [True]):  # SGD has no adapted layer
            right.plot(data["updates"], mean_coherence(data), color=color, label=label)
    left.set_yscale("log")
    left.set_xlabel("update")
    left.set_ylabel("B_simple (examples); dashed: the batch B")
    left.set_title("gradient noise scale")
    right.set_xlabel("update")
    right.set_ylabel("mean coherence ||g_l|| / N_l (adapted layers)")
    right.set_yscale("log")
    right.set_title("coherence")
    left.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, png_path)


# ------------------------------------------------------------ the command


def define_flags(flag_values=flags.FLAGS):
    flags.DEFINE_string("output", None, "the PNG to write (default: the JSON's name, .png)",
                        short_name="o", flag_values=flag_values)
    flags.DEFINE_list("statistics", list(DEFAULT_STATISTICS),
                      "statistics to draw, one panel each, comma-separated",
                      flag_values=flag_values)
    flags.DEFINE_bool("all_variables", False,
                      "also draw variables that are not layer-adapted",
                      flag_values=flag_values)
    flags.DEFINE_string("title", None, "the figure's title", flag_values=flag_values)
    flags.DEFINE_integer("batch_size", None, "noise: the run's global batch B, drawn as "
                         "a line", flag_values=flag_values)


def main(argv, flag_values=flags.FLAGS):
    """`layers JSON_PATH` or `noise JSON_PATH`, the flags parsed into
    `flag_values`."""
    if len(argv) != 3 or argv[1] not in ("layers", "noise"):
        raise app.UsageError(f"expected `layers JSON_PATH` or `noise JSON_PATH`; "
                             f"received {' '.join(argv[1:]) or 'nothing'}.")
    json_path = argv[2]
    output = flag_values.output or os.path.splitext(json_path)[0] + ".png"
    try:
        if argv[1] == "noise":
            if not flag_values.batch_size:
                raise ValueError("noise needs --batch_size, the run's global batch B; "
                                 f"received --batch_size={flag_values.batch_size}.")
            path = plot_noise_scale([(os.path.basename(json_path), json_path,
                                      flag_values.batch_size)], output, flag_values.title)
        else:
            path = plot_layer_statistics(json_path, output, flag_values.statistics,
                                         flag_values.all_variables, flag_values.title)
    except (ValueError, OSError) as error:
        sys.exit(f"recipes.plots: error: {error}")
    print(path)
    return path


def run_args(args):
    """`main` from command-line arguments (no program name)."""
    flag_values = flags.FlagValues()
    define_flags(flag_values)
    return main(flag_values(["recipes.plots", *args]), flag_values)


if __name__ == "__main__":
    # Reading JSON needs no TensorFlow: Keras's numpy backend imports faster.
    os.environ.setdefault("KERAS_BACKEND", "numpy")
    define_flags()
    app.run(main)
