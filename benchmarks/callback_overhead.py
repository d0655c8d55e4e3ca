"""Step time with and without LayerStatisticsLogger, side by side.

Trains ResNet-20 (narrow) with CLARS on real Fashion-MNIST in chunks of
`--updates` updates, alternating a chunk without the callback and a chunk
with it (TensorBoard + JSON, at `--interval`), on the same compiled model
(`benchmarks.timing.interleaved`: in an order shuffled each pair).
Reports the median chunk times (wall and process CPU) and their ratios,
and, because a shared machine makes chunk times noisy, also the callback's
own cost measured directly: the time of one record (read + TensorBoard + JSON) divided by the
interval, as a fraction of the median step.

    .venv/bin/python -m benchmarks.callback_overhead               # TF
    .venv/bin/python -m benchmarks.callback_overhead --backend jax
"""

import argparse
import json
import os
import tempfile

from benchmarks import timing


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("tensorflow", "jax"), default=None,
                        help="Keras backend (default: KERAS_BACKEND or tensorflow)")
    parser.add_argument("--model", default="resnet20",
                        help="a recipes.models name; other than resnet20 only "
                        "with --pairs 0 (too slow to train here)")
    parser.add_argument("--width", type=int, default=8, help="ResNet-20 width")
    parser.add_argument("--batch", type=int, default=256, help="batch size")
    parser.add_argument("--interval", type=int, default=50,
                        help="the callback's interval in updates (its default)")
    parser.add_argument("--updates", type=int, default=50, help="updates per chunk")
    parser.add_argument("--pairs", type=int, default=5,
                        help="timed (without, with) chunk pairs; 0: time the "
                        "records only, on an untrained model")
    parser.add_argument("--records", type=int, default=20,
                        help="direct timings of one record")
    parser.add_argument("--out", help="also write the result to this JSON file")
    args = parser.parse_args(argv)
    for name in ("width", "batch", "interval", "updates", "records"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1; received {getattr(args, name)}.")
    if args.pairs < 0:
        parser.error(f"--pairs must be >= 0; received {args.pairs}.")
    if args.model != "resnet20" and args.pairs:
        parser.error(f"--model={args.model} needs --pairs 0.")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.backend:
        os.environ["KERAS_BACKEND"] = args.backend  # before Keras is imported
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    import keras

    from keras_clars import CLARS
    from keras_clars.callbacks import LayerStatisticsLogger
    from recipes.fashion_mnist import load_fashion_mnist
    from recipes.models import MODELS, build_model

    count = args.batch * args.updates
    x, y = load_fashion_mnist("train")
    if count > len(x):
        raise SystemExit(f"--batch x --updates = {count} exceeds the {len(x)} images.")
    x = (x[:count, ..., None] / 255.0).astype("float32")
    y = y[:count].astype("int32")

    if args.model not in MODELS:
        raise SystemExit(f"--model={args.model!r}: expected one of {', '.join(MODELS)}.")
    keras.utils.set_random_seed(0)
    shape = (28, 28, 1) if args.model == "resnet20" else (32, 32, 3)
    model = build_model(args.model, shape, 10, width=args.width)
    model.compile(
        optimizer=CLARS(learning_rate=1.0, trust_coefficient=0.02),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    work = tempfile.mkdtemp(prefix="callback_overhead_")
    logger = LayerStatisticsLogger(
        interval=args.interval,
        log_dir=os.path.join(work, "tb"),
        json_path=os.path.join(work, "layer_statistics.json"),
    )

    def chunk(callbacks):
        return lambda: model.fit(x, y, batch_size=args.batch, epochs=1, shuffle=False,
                                 verbose=0, callbacks=callbacks)

    times = None
    if args.pairs:
        # Untimed first round: compiles the train step, traces the summary
        # writer. Wall time, and this process's CPU time (all threads): the
        # second is far less disturbed by other jobs on a shared machine.
        times = timing.interleaved({"without": chunk([]), "with": chunk([logger])},
                                   args.pairs)
    else:  # records only: statistics of a built, untrained optimizer
        model.optimizer.build(model.trainable_variables)
        model.optimizer._iterations.assign(1)
    logger.set_model(model)
    logger.on_train_begin()

    # One record by itself: what the callback adds every `interval` updates.
    def one_record():
        logger._last_update = None  # force a record at the same update
        logger._act()
        logger._save()

    record = timing.interleaved({"record": one_record}, args.records, warmup=0)["record"]
    logger.records = logger.records[: -args.records]

    result = {
        "backend": keras.backend.backend(),
        "model": args.model + (f" width {args.width}" if args.model == "resnet20" else ""),
        "variables": len(model.trainable_variables),
        "interval": args.interval,
        "median_record_s": timing.median(record),
        "cpu_count": os.cpu_count(),
    }
    if args.pairs:
        result.update(chunk_results(args, times, result))
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


def chunk_results(args, times, result):
    """`times`: `timing.interleaved`'s, of the chunks without and with the
    logger."""
    ratio = timing.ratio
    step = timing.median(times["without"]) / args.updates
    return {
        "batch": args.batch,
        "updates_per_chunk": args.updates,
        "pairs": args.pairs,
        "median_chunk_without_s": timing.median(times["without"]),
        "median_chunk_with_s": timing.median(times["with"]),
        "chunk_ratio": ratio(times, "with", "without"),
        "pair_ratios": [w / o for w, o in zip(times["with"], times["without"])],
        "median_chunk_cpu_without_s": timing.median(times.cpu["without"]),
        "median_chunk_cpu_with_s": timing.median(times.cpu["with"]),
        "chunk_cpu_ratio": ratio(times.cpu, "with", "without"),
        "pair_cpu_ratios": [w / o for w, o in zip(times.cpu["with"], times.cpu["without"])],
        "median_step_s": step,
        "record_overhead_fraction": result["median_record_s"] / args.interval / step,
    }

if __name__ == "__main__":
    main()
