"""The gradient noise scale from the update's gradient samples (private).

`LayerwiseOptimizer(noise_scale=True)` owns one `NoiseScale`. It rides on
the samples the update already has (replicas' micro-batches, accumulation
micro-steps, or single examples from `per_example_norms`):

1. **Replica phase**, per replica: for each layer, this replica's samples'
   count c, their mean squared norm m2 and their size b give the vector
   [c * m2, c, c * b] (`replica_terms`). It rides in the update's one
   all-reduce, beside the gradients, and sums over replicas; clipping scales
   its m2 part by the square of clipping's factor (`clip`); accumulation
   sums it over the window (`accumulate`).
2. **Update**: from the sums, S = sum c, m2 = sum c m2 / S and B = sum c b
   (so b = B / S), and G2 = ||g||^2 of the update's mean gradient, the
   unbiased estimates of McCandlish et al. (2018, appendix A.1,
   `transforms.noise_estimates`) per layer; their exponential moving
   averages, each taken apart, over updates (`update`).

B_simple = EMA(tr Sigma) / EMA(|G|^2), per layer, per block or for the
model (sums over layers: each layer's estimates are unbiased, whatever its
b), is read on the host (`summary`). With S = 1 there is no estimate: the
optimizer warns once (`ONE_SAMPLE_WARNING`) and `summary` says so.

References:
    - McCandlish, Kaplan, Amodei and the OpenAI Dota Team, "An Empirical
      Model of Large-Batch Training", arXiv:1812.06162 (2018), appendix A.
"""

import warnings

import numpy as np
from keras import ops

from keras_clars import transforms
from keras_clars._layers import packed_dtype

# Per-layer columns of the `noise_scale` optimizer variable, in this order.
NOISE_STATISTICS = (
    "mean_squared_sample_norm",   # m2: mean over the S samples of ||g_s||^2
    "samples",                    # S
    "sample_size",                # b (examples per sample); B = S * b
    "squared_gradient_estimate",  # |G|^2 from this update alone
    "trace_covariance_estimate",  # tr(Sigma) from this update alone
    "squared_gradient_average",   # their moving averages (not debiased)
    "trace_covariance_average",
)
M2, SAMPLES, SIZE, G2_STEP, TRACE_STEP, G2_AVERAGE, TRACE_AVERAGE = range(
    len(NOISE_STATISTICS))

ONE_SAMPLE_WARNING = (
    "{name}(noise_scale=True) has one gradient sample per update (one "
    "replica, no gradient accumulation, no per-example norms): the gradient "
    "noise scale needs S >= 2 samples and is not estimated. Use per-example "
    "norms (`keras_clars.per_example_norms(model)`), gradient accumulation "
    "(`gradient_accumulation_steps=k`), or several replicas."
)
NEEDS_SAMPLE_SIZE = (
    "sample_size must be the examples in each gradient sample (the "
    "per-replica micro-batch) for {name}(noise_scale=True) when its samples "
    "are replicas' micro-batches or accumulation micro-steps; received "
    "sample_size=None. (With per-example norms the samples are single "
    "examples and it is not needed.)"
)


class NoiseScale:
    """The noise scale's state and its phases, for one optimizer."""

    def __init__(self, optimizer, variables):
        """Creates the optimizer variables (in `optimizer.build`)."""
        self.optimizer = optimizer
        self.decay = optimizer.noise_scale_decay
        self.warned = False  # the one-sample warning, given once
        dtype = packed_dtype(variables)
        self.statistics = optimizer.add_variable(
            shape=(len(variables), len(NOISE_STATISTICS)), dtype="float32",
            name="noise_scale", initializer=_no_values)
        self.updates = optimizer.add_variable(
            shape=(), dtype="int32", name="noise_scale_updates")
        self.sums = None
        if optimizer.gradient_accumulation_steps:
            # The window's running sums of [c * m2, c, c * b] per layer.
            self.sums = optimizer.add_variable(
                shape=(3 * len(variables),), dtype=dtype,
                name="noise_scale_sums")

    # ------------------------------------------------------ replica phase

    def replica_terms(self, layers, own_norms, held, replicas):
        """This replica's [c * m2, c, c * b] over `layers` (3 blocks of one
        vector, layer order), or None when the update has one sample.

        `own_norms()` gives the replica's gradient norms per group; `held`
        is what `apply` was handed for this replica (or None): the
        per-example mean squared norms (None for a variable without them,
        whose sample is then the replica's gradient) and the examples n.
        Each sample's gradient is R times the replica's (Keras scales each
        replica's loss by 1/R), so squared norms take R^2.
        """
        name = type(self.optimizer).__name__
        steps = self.optimizer.gradient_accumulation_steps
        squared = None if held is None else held["squared"]
        if squared is None and replicas == 1 and not steps:
            if not self.warned:
                self.warned = True
                warnings.warn(ONE_SAMPLE_WARNING.format(name=name), UserWarning,
                              stacklevel=4)
            return None
        dtype = layers.dtype
        own = ops.square(layers.join(own_norms()))  # ||g_r||^2
        if squared is None:
            if self.optimizer.sample_size is None:
                raise ValueError(NEEDS_SAMPLE_SIZE.format(name=name))
            counts = ops.ones_like(own)
            sizes = ops.full_like(own, float(self.optimizer.sample_size))
            m2 = own
        else:
            examples = ops.cast(held["examples"], dtype)
            given = [s is not None for s in squared]
            mask = ops.convert_to_tensor(given, "bool")
            m2 = ops.where(mask, ops.stack(
                [ops.cast(own[j] if s is None else s, dtype)
                 for j, s in enumerate(squared)]), own)
            counts = ops.where(mask, examples, ops.ones_like(own))
            sizes = ops.where(mask, ops.ones_like(own), examples)
        m2 = (replicas * replicas) * m2
        return ops.concatenate([counts * m2, counts, counts * sizes])

    # ------------------------------------------------------- update phase

    def clip(self, layers, terms, factors):
        """Scales the m2 part by the square of clipping's factor per layer."""
        n = len(layers.variables)
        factor = ops.square(layers.join(factors))
        return ops.concatenate([terms[:n] * factor, terms[n:]])

    def accumulate(self, layers, terms):
        """Adds this micro-step's terms to the window's sums."""
        if not layers.in_order:
            size = layers.size
            terms = ops.scatter(
                [[block * size + i] for block in range(3) for i in layers.indices],
                terms, (3 * size,))
        self.optimizer.assign_add(self.sums, terms)

    def window(self, layers):
        """The window's sums over `layers`, as `replica_terms` lays them out."""
        sums = ops.convert_to_tensor(self.sums)
        if not layers.in_order:
            size = layers.size
            sums = ops.take(sums, [block * size + i for block in range(3)
                                   for i in layers.indices])
        return sums

    def update(self, layers, gradient_norms, terms, applied):
        """The estimates and their averages, recorded where `applied`."""
        n = len(layers.variables)
        dtype = layers.dtype
        terms = ops.cast(terms, dtype)
        weighted, samples, examples = terms[:n], terms[n:2 * n], terms[2 * n:]
        positive = ops.greater(samples, 0)
        safe = ops.where(positive, samples, 1.0)
        m2 = weighted / safe
        size = examples / safe
        g2 = ops.square(ops.cast(layers.join(gradient_norms), dtype))
        g2_step, trace_step = transforms.noise_estimates(g2, m2, samples, size)
        previous = ops.convert_to_tensor(self.statistics)
        if not layers.in_order:
            previous = ops.take(previous, layers.indices, axis=0)
        valid = ops.logical_and(
            ops.logical_and(applied, ops.greater(samples, 1)),
            ops.logical_and(ops.isfinite(g2_step), ops.isfinite(trace_step)))
        decay = ops.cast(self.decay, dtype)
        averages = [
            ops.where(valid, decay * ops.cast(previous[:, column], dtype)
                      + (1 - decay) * step, ops.cast(previous[:, column], dtype))
            for column, step in ((G2_AVERAGE, g2_step),
                                 (TRACE_AVERAGE, trace_step))]
        rows = ops.cast(ops.stack(
            [m2, samples, size, g2_step, trace_step, *averages], axis=1),
            "float32")
        if not layers.in_order:
            rows = ops.scatter_update(ops.convert_to_tensor(self.statistics),
                                      [[i] for i in layers.indices], rows)
        self.optimizer._assign(self.statistics, rows, applied)
        self.optimizer.assign_add(
            self.updates, ops.cast(ops.any(valid), "int32"))


def _no_values(shape, dtype=None):
    """NaN (no value) for the last update's columns, 0 for the averages."""
    columns = np.full(shape, np.nan, "float32")
    columns[:, [G2_AVERAGE, TRACE_AVERAGE]] = 0.0
    return ops.convert_to_tensor(columns, dtype or "float32")


# ------------------------------------------------------------------ host


def b_simple(trace_average, squared_gradient_average):
    """The ratio of the two averages, or None where it is no value: no
    update estimated yet, or the average of |G|^2 not positive."""
    if not (np.isfinite(trace_average) and np.isfinite(squared_gradient_average)):
        return None
    if squared_gradient_average <= 0:
        return None
    return float(trace_average / squared_gradient_average)


def summary(statistics, updates, decay, groups=None):
    """B_simple and the debiased averages, for the model and per group.

    Args:
        statistics: the `noise_scale` variable's value, (layers, columns).
        updates: how many updates were estimated.
        decay: the averages' decay.
        groups: optional {name: [layer positions]}.

    Returns:
        A dict: `updates`, and for the model (`b_simple`,
        `squared_gradient`, `trace_covariance`, each None while there is no
        estimate) and, with `groups`, `blocks`: {name: b_simple or None}.
    """
    statistics = np.asarray(statistics, np.float64)
    out = {"updates": int(updates), "b_simple": None,
           "squared_gradient": None, "trace_covariance": None}
    if updates > 0:
        debias = 1.0 - decay ** updates
        g2 = float(np.sum(statistics[:, G2_AVERAGE])) / debias
        trace = float(np.sum(statistics[:, TRACE_AVERAGE])) / debias
        out.update(b_simple=b_simple(trace, g2), squared_gradient=g2,
                   trace_covariance=trace)
    if groups is not None:
        out["blocks"] = {
            name: (b_simple(float(np.sum(statistics[rows, TRACE_AVERAGE])),
                            float(np.sum(statistics[rows, G2_AVERAGE])))
                   if updates > 0 else None)
            for name, rows in groups.items()}
    return out
