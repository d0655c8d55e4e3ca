"""The gradient noise scale's cost: training with it on and logged, against
the same training without it, side by side.

Two copies of one model (ResNet-20, narrow, on real Fashion-MNIST) train
with CLARS on the same micro-batch samples (b = `--micro_batch`, k
micro-steps an update): one without the noise scale and without a logger,
one with `noise_scale=True` and `LayerStatisticsLogger` writing JSON (and
TensorBoard) every `--interval` updates. Chunks of `--updates` updates
alternate in an order shuffled each pair (`benchmarks.timing.interleaved`);
the ratio of the median chunk times (wall and process CPU) is the
diagnostic's whole cost: the extra squared norms and all-reduce entries,
the averages, and the logging.

    .venv/bin/python -m benchmarks.noise_scale_cost --out benchmarks/results/noise_scale_cost.json
"""

import argparse
import json
import os
import tempfile

from benchmarks import records, timing


def arguments():
    """The command line's parser."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=8, help="ResNet-20 width")
    parser.add_argument("--batch", type=int, default=256, help="global batch B")
    parser.add_argument("--micro_batch", type=int, default=64,
                        help="b: examples per micro-step (k = B / b)")
    parser.add_argument("--interval", type=int, default=10,
                        help="the logger's interval in updates")
    parser.add_argument("--updates", type=int, default=20, help="updates per chunk")
    parser.add_argument("--pairs", type=int, default=5, help="timed chunk pairs")
    parser.add_argument("--out", help="also write the result to this JSON file")
    return parser


def parse_args(argv):
    parser = arguments()
    args = parser.parse_args(argv)
    for name in ("width", "batch", "micro_batch", "interval", "updates", "pairs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1; received {getattr(args, name)}.")
    if args.batch % args.micro_batch or args.batch == args.micro_batch:
        parser.error(f"--batch={args.batch} must be a multiple >= 2 of "
                     f"--micro_batch={args.micro_batch} (S >= 2 samples).")
    return args


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    record = records.start("benchmarks.noise_scale_cost", argv)

    import keras

    from keras_clars import CLARS
    from keras_clars.callbacks import LayerStatisticsLogger
    from recipes.fashion_mnist import load_fashion_mnist
    from recipes.models import build_model

    count = args.batch * args.updates
    x, y = load_fashion_mnist("train")
    x = (x[:count, ..., None] / 255.0).astype("float32")
    y = y[:count].astype("int32")
    k = args.batch // args.micro_batch

    def compiled(noise_scale):
        keras.utils.set_random_seed(0)
        model = build_model("resnet20", (28, 28, 1), 10, width=args.width)
        model.compile(
            optimizer=CLARS(learning_rate=1.0, trust_coefficient=0.02,
                            gradient_accumulation_steps=k, noise_scale=noise_scale,
                            sample_size=args.micro_batch if noise_scale else None),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return model

    off, on = compiled(False), compiled(True)
    work = tempfile.mkdtemp(prefix="noise_scale_cost_")
    logger = LayerStatisticsLogger(interval=args.interval, log_dir=os.path.join(work, "tb"),
                                   json_path=os.path.join(work, "statistics.json"))

    def chunk(model, callbacks):
        return lambda: model.fit(x, y, batch_size=args.micro_batch, epochs=1,
                                 shuffle=False, verbose=0, callbacks=callbacks)

    times = timing.interleaved({"off": chunk(off, []), "on": chunk(on, [logger])},
                               args.pairs)
    ratio = timing.ratio
    result = {
        **record,
        "model": f"resnet20 width {args.width}, 28x28",
        "variables": len(on.trainable_variables),
        "batch": args.batch, "micro_batch": args.micro_batch, "samples": k,
        "interval": args.interval, "updates_per_chunk": args.updates,
        "pairs": args.pairs,
        "median_chunk_off_s": timing.median(times["off"]),
        "median_chunk_on_s": timing.median(times["on"]),
        "ratio": ratio(times, "on", "off"),
        "pair_ratios": [a / b for a, b in zip(times["on"], times["off"])],
        "cpu_ratio": ratio(times.cpu, "on", "off"),
        "pair_cpu_ratios": [a / b for a, b in zip(times.cpu["on"], times.cpu["off"])],
        "b_simple": on.optimizer.gradient_noise_scale()["b_simple"],
    }
    print(json.dumps(result, indent=1))
    if args.out:
        records.write(args.out, result)
    return result


if __name__ == "__main__":
    main()
