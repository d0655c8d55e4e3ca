"""What XLA makes of one update: kernels and reductions in the compiled HLO.

    python -m benchmarks.update_hlo [--out PATH]                      # TensorFlow
    KERAS_BACKEND=jax python -m benchmarks.update_hlo [--out PATH]    # JAX

Compiles one `apply` of Keras SGD(momentum=0.9), LARS and CLARS over the
214 variables of keras.applications.ResNet50(weights=None) with XLA
(TensorFlow: `tf.function(jit_compile=True)`, the optimized HLO of
`experimental_get_compiler_ir`; JAX: `jax.jit(stateless_apply)`, the
compiled module's text), and counts, in the module's entry computation,
the kernels XLA runs one after the other (fusions and unfused ops, not
parameters, constants, tuples or bitcasts), by kind, a `conditional`
counting as itself plus its largest branch (an update inside a `cond`, as
in older versions, is counted whole); and, over all computations, the
`reduce` and `reduce-window` instructions. On TensorFlow the fusions are
also counted by the TensorFlow op they came from (the HLO metadata).
`sequence_digest` is a hash of the kernels in the order they run (opcode,
shape and source op of each, no instruction names): two versions of the
update with the same digest compile to the same kernels in the same order.
`before_first_momentum` (TensorFlow) counts the kernels that run before
the first one of a `ResourceApplyMomentum`: the norms that every layer's
update waits for.

    python -m benchmarks.update_hlo --optimizers CLARS   # one optimizer
A count needs no timing: it does not move with the load.
"""

import argparse
import collections
import hashlib
import os
import re
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from benchmarks import records  # noqa: E402

# Entry instructions that are no kernel of their own.
FREE = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast"}
# `%name = SHAPE opcode(`; a tuple SHAPE is parenthesized and may hold `=`.
ASSIGNMENT = re.compile(r"^\s*(?:ROOT )?%\S+ = ")
HEADER = re.compile(r"^(ENTRY )?%(\S+) .*\{$")


def _shape_and_opcode(line):
    """(shape, opcode) of one HLO instruction line, or None."""
    match = ASSIGNMENT.match(line)
    if not match:
        return None
    rest, depth = line[match.end():], 0
    for end, char in enumerate(rest):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0 and char in ") ":
            break
    shape, rest = rest[:end + 1].rstrip(), rest[end + 1:]
    opcode = re.match(r"\s*([a-z][\w-]*)\(", rest)
    return (shape, opcode.group(1)) if opcode else None


def _computations(hlo):
    """{name: its instruction lines}; the entry computation is "ENTRY"."""
    computations, name = {}, None
    for line in hlo.splitlines():
        header = HEADER.match(line)
        if header:
            name = "ENTRY" if header.group(1) else header.group(2)
            computations[name] = []
        elif line.startswith("}"):
            name = None
        elif name:
            computations[name].append(line)
    return computations


def _kernels(computations, name):
    """[(opcode, shape, TensorFlow op or None, the line)] that run one after
    the other in computation `name`; a conditional is itself plus the
    kernels of its largest branch."""
    kernels = []
    for line in computations[name]:
        parsed = _shape_and_opcode(line)
        if parsed is None or parsed[1] in FREE:
            continue
        shape, opcode = parsed
        source = re.search(r'op_type="(\w+)"', line)
        kernels.append((opcode, shape, source and source.group(1), line))
        if opcode == "conditional":
            branches = re.search(r"branch_computations=\{([^}]*)\}", line)
            names = (branches.group(1).split(",") if branches else
                     re.findall(r"(?:true|false)_computation=(%?[\w.-]+)", line))
            kernels += max((_kernels(computations, n.strip().lstrip("%"))
                            for n in names), key=len)
    return kernels


def count(hlo):
    """Counts of one HLO module's text (see the module docstring)."""
    kernels, fusion_kinds, fusion_sources = (collections.Counter() for _ in range(3))
    sequence = _kernels(_computations(hlo), "ENTRY")
    for opcode, _, source, line in sequence:
        kernels[opcode] += 1
        if opcode == "fusion":
            kind = re.search(r"kind=(k\w+)", line)
            fusion_kinds[kind.group(1) if kind else "?"] += 1
            fusion_sources[source or "(none)"] += 1
    momentum = [k for k, (_, _, source, _) in enumerate(sequence)
                if source == "ResourceApplyMomentum"]
    digest = hashlib.sha256("\n".join(
        f"{opcode} {shape} {source}" for opcode, shape, source, _ in sequence
    ).encode()).hexdigest()[:16]
    return {
        "kernels": sum(kernels.values()),
        "kernels_by_opcode": dict(kernels.most_common()),
        "fusions_by_kind": dict(fusion_kinds.most_common()),
        "fusions_by_source_op": dict(fusion_sources.most_common()),
        "reduce": len(re.findall(r" reduce\(", hlo)),
        "reduce_window": len(re.findall(r" reduce-window\(", hlo)),
        "sequence_digest": digest,
        "before_first_momentum": momentum[0] if momentum else None,
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
    parser.add_argument("--optimizers", default="SGD,LARS,CLARS",
                        help="comma-separated, of SGD, LARS, CLARS")
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
    makers = _optimizers()
    for name in args.optimizers.split(","):
        make = makers[name]
        start = time.perf_counter()
        counts = count(compiled_hlo(make(), variables, grads))
        counts["compile_s"] = time.perf_counter() - start
        record["optimizers"][name] = counts
        print(f"{name:>6}: {counts['kernels']} kernels "
              f"{counts['fusions_by_kind']}, {counts['reduce']} reduce, "
              f"{counts['reduce_window']} reduce-window; fusions from "
              f"{counts['fusions_by_source_op']}; sequence "
              f"{counts['sequence_digest']}", flush=True)
    if args.out:
        records.write(args.out, record)


if __name__ == "__main__":
    main()
