"""Op counts of one traced CLARS / LARS update: a check that needs no timing.

    python -m benchmarks.update_graph

Traces `optimizer.apply` over the 214 variables of a ResNet-50 (no compile,
no run) for five settings, and prints the number of ops in the graph,
`tf.cond` branches included, and a digest of the histogram of op types. Two
versions of the package that print the same lines build the same update,
op for op, whatever the load on the machine; run it in a checkout of each
(e.g. `git archive <commit> | tar -x -C <dir>`, then run it there).
`--out PATH` writes the counts and digests as a JSON record.
"""

import argparse
import collections
import hashlib
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_clars  # noqa: E402
from benchmarks import records  # noqa: E402
from keras_clars import CLARS, LARS  # noqa: E402

SETTINGS = {
    "LARS": lambda: LARS(weight_decay=5e-5),
    "CLARS": lambda: CLARS(weight_decay=5e-5),
    "CLARS k=4": lambda: CLARS(weight_decay=5e-5,
                               gradient_accumulation_steps=4),
    "CLARS k=4 clipnorm": lambda: CLARS(weight_decay=5e-5, clipnorm=1.0,
                                        gradient_accumulation_steps=4),
    "LARS k=4 excluded_lr": lambda: LARS(weight_decay=5e-5,
                                         gradient_accumulation_steps=4,
                                         excluded_learning_rate=0.1),
}


def op_types(graph):
    """Op type -> count, in the graph and the functions it calls (branches)."""
    types = collections.Counter(op.type for op in graph.get_operations())
    for function in graph._functions.values():
        types.update(node.op for node in function.definition.node_def)
    return types


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None,
                        help="a JSON record of the counts (default: none)")
    args = parser.parse_args(argv)
    record = records.start("benchmarks.update_graph", argv)
    record["settings"] = {}
    model = keras.applications.ResNet50(weights=None, input_shape=(32, 32, 3),
                                        classes=10)
    variables = model.trainable_variables
    grads = [tf.zeros(v.shape) for v in variables]
    print(f"package {os.path.dirname(keras_clars.__file__)}; "
          f"{len(variables)} variables")
    for name, make in SETTINGS.items():
        optimizer = make()
        optimizer.build(variables)
        graph = tf.function(lambda o=optimizer: o.apply(grads)) \
            .get_concrete_function().graph
        types = op_types(graph)
        digest = hashlib.sha256(str(sorted(types.items())).encode())
        print(f"{name:>22}: {sum(types.values())} ops (with cond branches), "
              f"types digest {digest.hexdigest()[:12]}")
        record["settings"][name] = {"ops": sum(types.values()),
                                    "types_digest": digest.hexdigest()[:12]}
    if args.out:
        records.write(args.out, record)


if __name__ == "__main__":
    main()
