"""Heatmaps (layer against update) of a run's coherence and trust ratio.

Reads the JSON file of `keras_clars.callbacks.LayerStatisticsLogger` and
draws one panel per statistic: layers in model order from top to bottom,
updates from left to right. Coherence ||g_l|| / N_l is on a linear 0..1
scale (dark: the gradient samples disagree, CLARS shrinks the step); the
trust ratio is on a log scale.

    .venv/bin/python benchmarks/plot_layer_statistics.py \\
        runs/clars/layer_statistics.json -o docs/img/layers_clars.png

From a script (e.g. after `model.fit(..., callbacks=[logger])`):

    sys.path.insert(0, "benchmarks")
    from plot_layer_statistics import plot_layer_statistics
    plot_layer_statistics(logger.json_path, "layers.png")
"""

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `python benchmarks/...` puts benchmarks/ first.
    sys.path.insert(0, ROOT)

DEFAULT_STATISTICS = ("coherence", "trust_ratio")
# Most labels that fit; beyond this every n-th layer is labelled.
MAX_LABELS = 60


def _edges(centers):
    """Cell edges halfway between the updates (the records may be uneven)."""
    import numpy as np

    centers = np.asarray(centers, dtype=float)
    if len(centers) == 1:
        return np.array([centers[0] - 0.5, centers[0] + 0.5])
    middle = (centers[1:] + centers[:-1]) / 2
    return np.concatenate(
        [[2 * centers[0] - middle[0]], middle, [2 * centers[-1] - middle[-1]]]
    )


def plot_layer_statistics(
    json_path,
    png_path,
    statistics=DEFAULT_STATISTICS,
    all_variables=False,
    title=None,
):
    """Draws the heatmaps of one run into a PNG.

    Args:
        json_path: the logger's JSON file.
        png_path: the PNG to write (its directory is created).
        statistics: the statistics to draw, one panel each.
        all_variables: also draw the variables that are not layer-adapted
            (biases, BatchNorm: trust ratio 1); by default only the adapted
            ones (kernels) are shown.
        title: the figure's title; default: the optimizer and the file name.

    Returns:
        `png_path`.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
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
    fig, axes = plt.subplots(
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
    fig.tight_layout()
    directory = os.path.dirname(os.path.abspath(png_path))
    os.makedirs(directory, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json_path", help="the LayerStatisticsLogger JSON file")
    parser.add_argument(
        "-o", "--output", help="the PNG to write (default: the JSON's name, .png)"
    )
    parser.add_argument(
        "--statistics",
        nargs="+",
        default=list(DEFAULT_STATISTICS),
        help="statistics to draw, one panel each (default: %(default)s)",
    )
    parser.add_argument(
        "--all_variables",
        action="store_true",
        help="also draw variables that are not layer-adapted (biases, BatchNorm)",
    )
    parser.add_argument("--title", help="the figure's title")
    args = parser.parse_args(argv)
    output = args.output or os.path.splitext(args.json_path)[0] + ".png"
    try:
        path = plot_layer_statistics(
            args.json_path, output, args.statistics, args.all_variables, args.title
        )
    except (ValueError, OSError) as error:
        parser.error(str(error))
    print(path)
    return path


if __name__ == "__main__":
    # Reading JSON needs no TensorFlow: Keras's numpy backend imports faster.
    os.environ.setdefault("KERAS_BACKEND", "numpy")
    main()
