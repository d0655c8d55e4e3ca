"""What XLA makes of one update: kernels and reductions in the compiled HLO.

    python -m benchmarks.update_hlo [--out PATH]                      # TensorFlow
    KERAS_BACKEND=jax python -m benchmarks.update_hlo [--out PATH]    # JAX

Compiles one `apply` of Keras SGD(momentum=0.9), LARS and CLARS over the
214 variables of keras.applications.ResNet50(weights=None) with XLA
(TensorFlow: `tf.function(jit_compile=True)`, the optimized HLO of
`experimental_get_compiler_ir`; JAX: `jax.jit(stateless_apply)`, the
compiled module's text), and counts, in the module's entry computation,
the kernels XLA runs one after the other (fusions and unfused ops, not
parameters, constants, tuples or bitcasts), by kind; and, over all
computations, the `reduce` and `reduce-window` instructions. On TensorFlow
the fusions are also counted by the TensorFlow op they came from (the HLO
metadata). A count needs no timing: it does not move with the load.
"""

import argparse
import collections
import os
import re
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from benchmarks import records  # noqa: E402

# Entry instructions that are no kernel of their own.
FREE = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast"}
INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%\S+ = (?:\([^=]*\)|\S+) ([a-z][\w-]*)\(")


def count(hlo):
    """Counts of one HLO module's text (see the module docstring)."""
    entry = hlo[hlo.index("\nENTRY"):]
    entry = entry[:entry.index("\n}")]
    kernels, fusion_kinds, fusion_sources = (collections.Counter() for _ in range(3))
    for line in entry.splitlines()[1:]:
        match = INSTRUCTION.match(line)
        if not match or match.group(1) in FREE:
            continue
        kernels[match.group(1)] += 1
        if match.group(1) == "fusion":
            kind = re.search(r"kind=(k\w+)", line)
            fusion_kinds[kind.group(1) if kind else "?"] += 1
            source = re.search(r'op_type="(\w+)"', line)
            fusion_sources[source.group(1) if source else "(none)"] += 1
    return {
        "kernels": sum(kernels.values()),
        "kernels_by_opcode": dict(kernels.most_common()),
        "fusions_by_kind": dict(fusion_kinds.most_common()),
        "fusions_by_source_op": dict(fusion_sources.most_common()),
        "reduce": len(re.findall(r" reduce\(", hlo)),
        "reduce_window": len(re.findall(r" reduce-window\(", hlo)),
    }


def _optimizers():
    import keras

    from keras_clars import CLARS, LARS

    return {"SGD": lambda: keras.optimizers.SGD(0.1, momentum=0.9),
            "LARS": lambda: LARS(1.0, momentum=0.9, weight_decay=5e-5),
            "CLARS": lambda: CLARS(1.0, momentum=0.9, weight_decay=5e-5)}


def compiled_hlo(optimizer, variables, grads):
    """The optimized HLO text of one `optimizer` update, on this backend."""
    import keras

    optimizer.build(variables)
    if keras.backend.backend() == "jax":
        import jax

        return jax.jit(optimizer.stateless_apply).lower(
            [v.value for v in optimizer.variables], grads,
            [v.value for v in variables]).compile().as_text()
    import tensorflow as tf

    def apply():
        optimizer.apply(grads, variables)

    return tf.function(apply, jit_compile=True).experimental_get_compiler_ir()(
        stage="optimized_hlo")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None,
                        help="a JSON record of the counts (default: none)")
    args = parser.parse_args(argv)
    import keras
    import numpy as np

    record = records.start("benchmarks.update_hlo", argv)
    model = keras.applications.ResNet50(weights=None)
    variables = model.trainable_variables
    rng = np.random.default_rng(0)
    grads = [keras.ops.convert_to_tensor(
        rng.normal(0, 1e-3, v.shape).astype("float32")) for v in variables]
    print(f"{keras.backend.backend()}: {len(variables)} variables")
    record["variables"] = len(variables)
    record["optimizers"] = {}
    for name, make in _optimizers().items():
        start = time.perf_counter()
        counts = count(compiled_hlo(make(), variables, grads))
        counts["compile_s"] = time.perf_counter() - start
        record["optimizers"][name] = counts
        print(f"{name:>6}: {counts['kernels']} kernels "
              f"{counts['fusions_by_kind']}, {counts['reduce']} reduce, "
              f"{counts['reduce_window']} reduce-window; fusions from "
              f"{counts['fusions_by_source_op']}", flush=True)
    if args.out:
        records.write(args.out, record)


if __name__ == "__main__":
    main()
