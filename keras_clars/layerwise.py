"""The machinery shared by LARS and CLARS: one update over all layers.

A *micro-step* is one call to `apply()`: the gradient of one micro-batch on
each replica. An *update* moves the weights; it happens every micro-step, or
on every k-th one with `gradient_accumulation_steps=k`. Each micro-step has
two phases:

1. **Replica phase** (replica context): CLARS takes this replica's sample
   norms (its own gradient's per-layer norms, or the norms handed to
   `apply(..., sample_norms=...)` or `apply_with_sample_norms`, times R);
   then ONE batched all-reduce sums the gradients and the packed vector of
   sample norms over replicas.
2. **Update phase** (one merge into cross-replica context, then once per
   device): clip the mean gradient (scaling the sample norms by what
   clipping did to each layer), accumulate, and on an update micro-step with
   finite gradients apply the rule of the spec to all layers at once.

One name per quantity, end to end: `sample_norms` (one micro-step's, before
the mean over replicas), `complete_norms` (N_l: their mean over the S
samples of the update), `gradient_norms` (||g_l||, of the update's mean
gradient), `weight_norms` (||w_l||). LARS has no sample norms: its N_l is
`gradient_norms`, and so is CLARS's with one sample.

Per-layer scalars are computed as a few vectors (one per norm dtype), not as
ops per layer: tracing a big model then costs about what SGD's does.

The learning rate is evaluated at the update index `iterations`, which counts
updates, not micro-steps.
"""

import warnings

import keras
import numpy as np
from keras import ops

from keras_clars import _arguments, _layers, _noise_scale, _samples, transforms
from keras_clars._samples import apply_with_sample_norms, inner_optimizer  # noqa: F401

# TensorFlow's fast paths, or the same functions in `keras.ops`, chosen once.
_backend = _layers.backend

# Per-layer scalars kept from the last update, in this order.
STATISTICS = ("trust_ratio", "complete_norm", "gradient_norm", "weight_norm",
              "coherence")

ONE_SAMPLE_WARNING = (
    "{name} has one gradient sample per update (one replica, no gradient "
    "accumulation, no per-example norms): with S = 1 its complete norm is "
    "the norm of the mean gradient, and CLARS is exactly LARS. For CLARS's "
    "complete norm use per-example norms (`keras_clars.per_example_norms("
    "model)`), gradient accumulation (`gradient_accumulation_steps=k`), or "
    "several replicas (a tf.distribute strategy)."
)


class LayerwiseOptimizer(_arguments.Configuration, keras.optimizers.Optimizer):
    """Base class of `LARS` and `CLARS`; see their docstrings."""

    # CLARS sets this: N_l is the mean of the gradient samples' norms.
    uses_complete_norm = False

    def __init__(self, learning_rate=1.0, momentum=0.9, trust_coefficient=0.001,
                 weight_decay=None, epsilon=0.0, nesterov=False,
                 gradient_accumulation_steps=None, excluded_learning_rate=None,
                 noise_scale=False, noise_scale_decay=0.95, sample_size=None,
                 use_ema=False, **kwargs):
        # kwargs: Keras's clipnorm, clipvalue, global_clipnorm,
        # loss_scale_factor, name, ...
        checked = _arguments.check(
            type(self).__name__, learning_rate, momentum, trust_coefficient,
            weight_decay, epsilon, nesterov, gradient_accumulation_steps,
            use_ema, excluded_learning_rate, noise_scale, noise_scale_decay,
            sample_size)
        super().__init__(learning_rate=checked["learning_rate"],
                         weight_decay=checked["weight_decay"], use_ema=use_ema,
                         gradient_accumulation_steps=gradient_accumulation_steps,
                         **kwargs)
        self.momentum = checked["momentum"]
        self.trust_coefficient = checked["trust_coefficient"]
        self.epsilon = checked["epsilon"]
        self.nesterov = bool(nesterov)
        self.excluded_learning_rate = checked["excluded_learning_rate"]
        self.noise_scale = bool(noise_scale)
        self.noise_scale_decay = checked["noise_scale_decay"]
        self.sample_size = sample_size
        self._noise = None  # a `_noise_scale.NoiseScale` once built
        self._held_sample_norms = {}  # replica id -> its given norms
        self._warned_one_sample = False
        self._no_adaptation_names = []
        self._no_decay_names = []
        self.exclude_from_layer_adaptation()
        self.exclude_from_weight_decay()

    # ---------------------------------------------------------------- state

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self._velocities = self.add_optimizer_variables(variables, "velocity")
        self._statistics = self.add_variable(
            shape=(len(variables), len(STATISTICS)), dtype="float32",
            name="layer_statistics")
        self._adapted = [self._is_layer_adapted(v) for v in variables]
        self._decayed = [self._use_weight_decay(v) for v in variables]
        self._paths = [getattr(v, "path", v.name) for v in variables]
        if self.uses_complete_norm and self.gradient_accumulation_steps:
            # The window's running sum of each micro-step's complete norms.
            self._complete_norm_sums = self.add_variable(
                shape=(len(variables),), dtype=_layers.packed_dtype(variables),
                name="complete_norm_sums")
        self._non_finite_updates = self.add_variable(
            shape=(), dtype="int32", name="non_finite_updates")
        if self.noise_scale:
            self._noise = _noise_scale.NoiseScale(self, variables)

    @property
    def non_finite_updates(self):
        """Updates skipped because a gradient held inf or NaN."""
        return self._non_finite_updates

    def layer_statistics(self):
        """Per-layer scalars of the last update, as Python floats.

        Returns a dict mapping each variable's path to a dict with the keys
        `trust_ratio`, `complete_norm`, `gradient_norm`, `weight_norm` and
        `coherence` (||g_l|| / N_l: 1 for LARS, <= 1 for CLARS). With
        `noise_scale=True`, also those of `_noise_scale.NOISE_STATISTICS`:
        `mean_squared_sample_norm` (m2, the mean over the update's S
        samples of ||g_s||^2, on the scale of `complete_norm`), `samples`
        (S), `sample_size` (b), this update's estimates of |G_l|^2 and
        tr(Sigma_l) (None with S = 1), their moving averages, and `b_simple`
        (the layer's ratio of the averages, or None).
        """
        if not self.built:
            return {}
        names, values = self.statistics_table()
        out = {}
        for path, row in zip(self._paths, values.tolist()):
            out[path] = {k: (v if np.isfinite(v) else None)
                         for k, v in zip(names, row)}
            if self._noise is not None:
                out[path]["b_simple"] = _noise_scale.b_simple(
                    row[names.index("trace_covariance_average")],
                    row[names.index("squared_gradient_average")])
        return out

    def statistics_table(self):
        """(names, float32 array (layers, names)): the last update's
        per-layer statistics, in one read per variable."""
        values = np.asarray(ops.convert_to_numpy(self._statistics.value),
                            np.float32)
        if self._noise is None:
            return list(STATISTICS), values
        noise = np.asarray(ops.convert_to_numpy(self._noise.statistics.value),
                           np.float32)
        return (list(STATISTICS) + list(_noise_scale.NOISE_STATISTICS),
                np.concatenate([values, noise], axis=1))

    def gradient_noise_scale(self, groups=None):
        """The gradient noise scale B_simple of the model (McCandlish et al.
        2018), from the averages over updates; see docs/noise_scale.md.

        Args:
            groups: optional {name: [variable paths]}, for B_simple per
                group (for example per block).

        Returns:
            A dict: `b_simple` (EMA(tr Sigma) / EMA(|G|^2), summed over
            layers; None while there is no estimate: S = 1, no update yet,
            or an average |G|^2 that is not positive), `squared_gradient`
            and `trace_covariance` (the debiased averages), `updates` (how
            many updates were estimated), and with `groups`, `blocks`.
        """
        if not self.noise_scale:
            raise ValueError(
                "gradient_noise_scale() needs the optimizer built with "
                f"noise_scale=True; received noise_scale={self.noise_scale}.")
        if not self.built:
            return _noise_scale.summary(np.zeros((0, len(
                _noise_scale.NOISE_STATISTICS))), 0, self.noise_scale_decay)
        rows = None if groups is None else {
            name: [self._paths.index(p) for p in paths]
            for name, paths in groups.items()}
        return _noise_scale.summary(
            ops.convert_to_numpy(self._noise.statistics.value),
            int(ops.convert_to_numpy(self._noise.updates.value)),
            self.noise_scale_decay, rows)

    # ---------------------------------------------------------- the update

    def apply(self, grads, trainable_variables=None, sample_norms=None,
              squared_sample_norms=None, examples=None):
        """Applies one micro-step of gradients.

        Args:
            grads: gradients, one per variable (per replica under
                tf.distribute, of the loss Keras scaled by 1/R).
            trainable_variables: the variables; needed on the first call.
            sample_norms: CLARS only, or None. This replica's sample norms
                for this micro-step, one per trainable variable in the
                optimizer's order: for each, the mean of the norms of the
                replica's gradient samples (for example its examples'
                gradients), taken from the same loss as `grads`, on their
                scale. They are unscaled exactly as `grads` are (times R,
                and divided by `loss_scale_factor` if set), and replace the
                replica's own gradient norm as its sample. Through a
                `LossScaleOptimizer`, use `keras_clars.apply_with_sample_norms`.
            squared_sample_norms: with `noise_scale=True` (LARS or CLARS),
                or None: this replica's per-example mean squared norms
                (1/n) * sum_i ||g_{i,l}||^2 over its `examples` n examples,
                one per variable (None for a variable without them: its
                sample is then the replica's gradient), on the scale of
                `grads` and unscaled as `sample_norms` are (times R^2).
            examples: n, the examples of this replica's micro-batch (an int
                or a scalar tensor), with `squared_sample_norms`.
        """
        if sample_norms is None and squared_sample_norms is None:
            return super().apply(grads, trainable_variables)
        if sample_norms is not None and not self.uses_complete_norm:
            raise ValueError(
                f"sample_norms must be None for {type(self).__name__}, which "
                "takes the norm of the mean gradient (it is only used by "
                f"CLARS); received {len(list(sample_norms))} sample_norms."
            )
        if squared_sample_norms is not None and not self.noise_scale:
            raise ValueError(
                "squared_sample_norms must be None unless noise_scale=True "
                "(they are only used by the noise scale); received "
                f"{len(list(squared_sample_norms))} squared_sample_norms.")
        with _samples.holding(self, sample_norms, squared_sample_norms,
                              examples, self.loss_scale_factor):
            return super().apply(grads, trainable_variables)

    def _warn_one_sample(self):
        if not self._warned_one_sample:
            self._warned_one_sample = True
            warnings.warn(ONE_SAMPLE_WARNING.format(name=type(self).__name__),
                          UserWarning, stacklevel=2)

    def _backend_apply_gradients(self, grads, trainable_variables):
        layers = _layers.Layers(self, trainable_variables)
        grads, samples = self._replica_phase(layers, list(grads))
        _backend.on_each_device(
            lambda *args: self._update_phase(layers, *args),
            self._non_finite_updates,
            grads,
            samples,
            ops.convert_to_tensor(self.learning_rate),
            self._excluded_rate(),
        )

    def _replica_phase(self, layers, grads):
        """This replica's samples, then ONE all-reduce of everything.

        Returns the gradients summed over replicas, and `samples`: a dict
        with this micro-step's `complete_norms` (N_l as a vector over the
        layers, the mean of the replicas' sample norms; None when N_l is
        ||g_l||: LARS, and CLARS with one sample, which then runs LARS's
        computation exactly) and, with `noise_scale=True`, `noise` (the
        noise scale's summed terms, `_noise_scale.NoiseScale.replica_terms`;
        None with one sample).
        """
        replicas = _backend.num_replicas()
        held = _samples.held(self, layers)
        own = []  # this replica's gradient norms, per group, computed once

        def own_norms():
            if not own:
                own.extend(layers.norms(grads))
            return own

        sample_norms = self._sample_norms(layers, own_norms, held, replicas)
        noise = None if self._noise is None else self._noise.replica_terms(
            layers, own_norms, held, replicas)
        extra = [t for t in (sample_norms, noise) if t is not None]
        reduced = _backend.all_reduce_sum(grads + extra)
        grads, extra = reduced[:len(grads)], reduced[len(grads):]
        if sample_norms is not None:
            sample_norms = extra.pop(0) / replicas
        return grads, {"complete_norms": sample_norms,
                       "noise": extra.pop(0) if noise is not None else None}

    def _sample_norms(self, layers, own_norms, held, replicas):
        """CLARS: this replica's sample norms over the layers, times R
        (Keras scales each replica's loss by 1/R: undo it on the samples);
        None when N_l is ||g_l||. `own_norms()`: the replica's gradient
        norms."""
        given = None if held is None else held["norms"]
        if not self.uses_complete_norm:
            return None
        if replicas == 1 and not self.gradient_accumulation_steps and (
                given is None):
            self._warn_one_sample()
            return None
        if given is None:
            return layers.join([replicas * n for n in own_norms()])
        return replicas * ops.stack([ops.cast(n, layers.dtype) for n in given])

    def _update_phase(self, layers, grads, samples, learning_rate,
                      excluded_rate):
        """Once per device: clip, accumulate and, on an update micro-step,
        update all layers. `samples` as `_replica_phase` returns it."""
        grads = [ops.cast(g, v.dtype) for g, v in zip(grads, layers.variables)]
        if self._clips():
            grads, samples = self._clip(layers, grads, samples)
        rates = (learning_rate, excluded_rate)
        if self.gradient_accumulation_steps:
            self._accumulate(layers, grads, samples, rates)
        else:
            self._update(layers, grads, 1.0, samples, rates, None)

    def _clip(self, layers, grads, samples):
        """Keras's clipping of the mean gradient; the sample norms of layer
        l are scaled by ||clip(g_l)|| / ||g_l|| (the noise scale's squared
        norms by its square), so S = 1 stays LARS."""
        raw_norms = layers.norms(grads)
        grads = self._clip_gradients(grads)
        # Non-finite stays non-finite (clipvalue would turn inf into a
        # number): `_update` then sees the gradient as received.
        poison = sum(ops.cast(ops.sum(n - n), "float32") for n in raw_norms)
        grads = [g + ops.cast(poison, g.dtype) for g in grads]
        complete_norms, noise = samples["complete_norms"], samples["noise"]
        if complete_norms is None and noise is None:
            return grads, samples
        factors = [transforms.clip_factor(raw, clipped) for raw, clipped
                   in zip(raw_norms, layers.norms(grads))]
        if complete_norms is not None:
            complete_norms = layers.join(
                [n * f for n, f in zip(layers.split(complete_norms), factors)])
        if noise is not None:
            noise = self._noise.clip(layers, noise, factors)
        return grads, {"complete_norms": complete_norms, "noise": noise}

    def _accumulate(self, layers, grads, samples, rates):
        """Adds this micro-step to the window's sums; on every k-th, updates
        with the window's means and restarts the sums (TensorFlow: inside
        one `cond`, so the other k - 1 micro-steps cost one pass over the
        gradients)."""
        steps = self.gradient_accumulation_steps
        complete_norms, noise = samples["complete_norms"], samples["noise"]
        sums = layers.select(self._accumulated_gradients)
        for accumulator, grad in zip(sums, grads):
            self.assign_add(accumulator, grad)
        if noise is not None:
            self._noise.accumulate(layers, noise)
            sums = sums + [self._noise.sums]
        if complete_norms is not None:
            if not layers.in_order:
                complete_norms = ops.scatter([[i] for i in layers.indices],
                                             complete_norms, (layers.size,))
            self.assign_add(self._complete_norm_sums, complete_norms)
            sums = sums + [self._complete_norm_sums]

        def update_window(mask):
            totals = [ops.convert_to_tensor(a) for a in sums[:len(grads)]]
            window_norms = None
            if complete_norms is not None:
                window_norms = ops.convert_to_tensor(self._complete_norm_sums)
                if not layers.in_order:
                    window_norms = ops.take(window_norms, layers.indices)
                window_norms = window_norms / steps
            window = {"complete_norms": window_norms, "noise": (
                None if noise is None else self._noise.window(layers))}
            self._update(layers, totals, 1.0 / steps, window, rates, mask)
            for accumulator in sums:
                self._assign(accumulator,
                             ops.zeros(accumulator.shape, accumulator.dtype),
                             mask)

        _backend.when(ops.equal((self._iterations + 1) % steps, 0),
                      update_window)

    def _update(self, layers, grads, gradient_scale, samples, rates, mask):
        """The update of the spec, with g_l = gradient_scale * grads[l], and
        `samples` as `_replica_phase` returns them (over the window).

        `rates` is (gamma_t, the excluded variables' rate or None: gamma_t).
        Skipped whole, and counted, if any gradient (or given norm) is not
        finite: every assignment selects with the mask `applied` (no branch,
        so tracing adds no op per layer for it). `mask` is None when the
        caller already decided that this is an update micro-step, else a
        boolean tensor (the generic path).
        """
        gradient_norms = layers.norms(grads)
        if gradient_scale != 1.0:
            gradient_norms = [gradient_scale * n for n in gradient_norms]
        complete_norms = samples["complete_norms"]
        if complete_norms is None:
            complete_norms = gradient_norms
        else:
            complete_norms = layers.split(complete_norms)
        finite = ops.all(ops.stack(
            [ops.all(ops.isfinite(n)) for n in gradient_norms + complete_norms]
        ))
        skipped, applied = ops.logical_not(finite), finite
        if mask is not None:
            skipped = ops.logical_and(mask, skipped)
            applied = ops.logical_and(mask, finite)
        self.assign_add(self._non_finite_updates, ops.cast(skipped, "int32"))
        if samples["noise"] is not None:
            self._noise.update(layers, gradient_norms, samples["noise"], applied)

        weights = [ops.convert_to_tensor(v) for v in layers.variables]
        gradient_scales, decay_scales = self._scales(
            layers, layers.norms(weights), gradient_norms, complete_norms,
            rates, applied, gradient_scale)
        updates = []
        for grad, weight, g_scale, d_scale, decayed in zip(
            grads, weights, layers.unstack(gradient_scales),
            layers.unstack(decay_scales), layers.select(self._decayed),
        ):
            update = _backend.scale_tensor(grad, g_scale)
            if decayed:
                update = update + ops.cast(d_scale, grad.dtype) * weight
            updates.append(update)
        _backend.apply_momentum(self, layers.variables,
                                layers.select(self._velocities), updates,
                                applied)

    def _scales(self, layers, weight_norms, gradient_norms, complete_norms,
                rates, applied, gradient_scale):
        """Per group, the scales of each layer's gradient and weight in u_l
        (0 where the update is not applied), and the statistics, recorded."""
        learning_rate, excluded_rate = rates
        adapted = layers.constant(self._adapted, "bool")
        decay = layers.constant(
            [self.weight_decay if d else 0.0 for d in self._decayed])
        rows, gradient_scales, decay_scales = [], [], []
        for (dtype, _), w_norm, g_norm, n_norm, is_adapted, beta in zip(
            layers.groups, weight_norms, gradient_norms, complete_norms,
            adapted, decay,
        ):
            ratio = ops.where(
                is_adapted,
                transforms.trust_ratio(w_norm, n_norm, self.trust_coefficient,
                                       beta, self.epsilon),
                ops.ones_like(w_norm),
            )
            rate = ops.cast(learning_rate, dtype) * ratio
            if excluded_rate is not None:
                rate = ops.where(is_adapted, rate,
                                 ops.cast(excluded_rate, dtype))
            # Zero where the update is skipped: with `scale_tensor` (TF's
            # multiply_no_nan) even a non-finite gradient gives u = 0.
            scale = ops.where(applied, rate, ops.zeros_like(ratio))
            gradient_scales.append(
                scale if gradient_scale == 1.0 else scale * gradient_scale)
            decay_scales.append(scale * beta)
            rows.append(ops.stack(
                [ratio, n_norm, g_norm, w_norm,
                 transforms.coherence(g_norm, n_norm)], axis=1,
            ))
        statistics = layers.join(rows, "float32")
        if not layers.in_order:
            statistics = ops.scatter_update(
                ops.convert_to_tensor(self._statistics),
                [[i] for i in layers.indices], statistics,
            )
        self._assign(self._statistics, statistics, applied)
        return gradient_scales, decay_scales

    def _assign(self, variable, value, mask):
        if mask is not None:
            value = ops.where(mask, value, ops.convert_to_tensor(variable))
        self.assign(variable, value)
