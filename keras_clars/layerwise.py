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

import contextlib
import warnings

import keras
from keras import ops

from keras_clars import _arguments, transforms

# The one backend check, at import as in Keras: TensorFlow's fast paths, or
# the same functions in `keras.ops`.
if keras.backend.backend() == "tensorflow":
    from keras_clars import _tensorflow as _backend
else:
    from keras_clars import _generic as _backend

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


def inner_optimizer(optimizer):
    """`optimizer` without its `LossScaleOptimizer` wrappers, if any."""
    while hasattr(optimizer, "inner_optimizer"):
        optimizer = optimizer.inner_optimizer
    return optimizer


def apply_with_sample_norms(optimizer, grads, trainable_variables,
                            sample_norms):
    """`optimizer.apply(grads, trainable_variables)`, handing CLARS this
    replica's sample norms, also through a `LossScaleOptimizer`.

    The way to give CLARS sample norms computed elsewhere (exact per-example
    norms, as `per_example_norms` does; docs/per_example.md): call it where
    the training step calls `optimizer.apply`, in replica context, with the
    optimizer as compiled (under mixed_float16, Keras wraps CLARS in a
    `LossScaleOptimizer`, whose `apply` takes no norms). `sample_norms` are
    as for `CLARS.apply`: one per trainable variable, this replica's mean
    over its samples s of ||g_{s,l}||, taken from the same (scaled) loss as
    `grads`. They are unscaled exactly as `grads` are: divided by the loss
    scale (`optimizer.scale_loss(1.0)`) and multiplied by the number of
    replicas R (Keras scales each replica's loss by 1/R).
    """
    inner = inner_optimizer(optimizer)
    if not getattr(inner, "uses_complete_norm", False):
        raise ValueError(
            "optimizer must be CLARS, or a LossScaleOptimizer around CLARS, "
            "to take sample_norms (they are only used by CLARS); received "
            f"optimizer={type(optimizer).__name__}"
            + ("" if inner is optimizer else f"({type(inner).__name__})") + "."
        )
    if inner is optimizer:
        return optimizer.apply(grads, trainable_variables,
                               sample_norms=sample_norms)
    scale = optimizer.scale_loss(1.0)
    with inner._holding([n / scale for n in sample_norms]):
        return optimizer.apply(grads, trainable_variables)


def _packed_dtype(variables):
    """The dtype of a vector over all `variables`: float64 if one needs it."""
    dtypes = {transforms.norm_dtype(v.dtype) for v in variables}
    return "float64" if "float64" in dtypes else "float32"


class _Layers:
    """The context of one update: its variables, where they sit in the
    optimizer, and their per-layer scalars as a few vectors.

    An `apply` may pass all the optimizer's variables or some, in any order:
    `indices[j]` is the optimizer's index of `variables[j]`. Norms and ratios
    are float32, or float64 for float64 variables (`transforms.norm_dtype`),
    so per-layer scalars live in one vector per dtype present (usually one):
    `groups` holds each dtype and the positions of its layers; `split` cuts
    a vector over all layers into the groups' vectors, `join` puts them back.
    """

    def __init__(self, optimizer, variables):
        self.variables = list(variables)
        self.indices = [optimizer._get_variable_index(v) for v in self.variables]
        self.size = len(optimizer._trainable_variables)
        self.in_order = self.indices == list(range(self.size))
        dtypes = [transforms.norm_dtype(v.dtype) for v in self.variables]
        self.groups = [(dtype, [j for j, d in enumerate(dtypes) if d == dtype])
                       for dtype in ("float32", "float64") if dtype in dtypes]
        order = [j for _, positions in self.groups for j in positions]
        self._inverse = (None if order == sorted(order)
                         else sorted(range(len(order)), key=order.__getitem__))
        self.dtype = _packed_dtype(self.variables)

    def select(self, per_variable):
        """The entries of this update's variables, from a list over all."""
        return [per_variable[i] for i in self.indices]

    def norms(self, tensors):
        """||x|| for each tensor, one vector per group."""
        return [ops.sqrt(_backend.squared_norms([tensors[j] for j in positions],
                                                dtype))
                for dtype, positions in self.groups]

    def constant(self, per_variable, dtype=None):
        """A list over all variables as one constant vector per group."""
        values = self.select(per_variable)
        return [ops.convert_to_tensor([values[j] for j in positions],
                                      dtype or group_dtype)
                for group_dtype, positions in self.groups]

    def split(self, vector):
        if len(self.groups) == 1:
            return [ops.cast(vector, self.groups[0][0])]
        return [ops.cast(ops.take(vector, positions), dtype)
                for dtype, positions in self.groups]

    def join(self, vectors, dtype=None):
        joined = ops.concatenate([ops.cast(v, dtype or self.dtype)
                                  for v in vectors])
        if self._inverse is None:
            return joined
        return ops.take(joined, self._inverse, axis=0)

    def unstack(self, vectors):
        """The groups' vectors as one scalar per layer, in layer order."""
        scalars = [None] * len(self.variables)
        for vector, (_, positions) in zip(vectors, self.groups):
            for j, scalar in zip(positions, ops.unstack(vector)):
                scalars[j] = scalar
        return scalars


class LayerwiseOptimizer(_arguments.Configuration, keras.optimizers.Optimizer):
    """Base class of `LARS` and `CLARS`; see their docstrings."""

    # CLARS sets this: N_l is the mean of the gradient samples' norms.
    uses_complete_norm = False

    def __init__(self, learning_rate=1.0, momentum=0.9, trust_coefficient=0.001,
                 weight_decay=None, epsilon=0.0, nesterov=False,
                 gradient_accumulation_steps=None, excluded_learning_rate=None,
                 use_ema=False, **kwargs):
        # kwargs: Keras's clipnorm, clipvalue, global_clipnorm,
        # loss_scale_factor, name, ...
        checked = _arguments.check(
            type(self).__name__, learning_rate, momentum, trust_coefficient,
            weight_decay, epsilon, nesterov, gradient_accumulation_steps,
            use_ema, excluded_learning_rate)
        super().__init__(learning_rate=checked["learning_rate"],
                         weight_decay=checked["weight_decay"], use_ema=use_ema,
                         gradient_accumulation_steps=gradient_accumulation_steps,
                         **kwargs)
        self.momentum = checked["momentum"]
        self.trust_coefficient = checked["trust_coefficient"]
        self.epsilon = checked["epsilon"]
        self.nesterov = bool(nesterov)
        self.excluded_learning_rate = checked["excluded_learning_rate"]
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
                shape=(len(variables),), dtype=_packed_dtype(variables),
                name="complete_norm_sums")
        self._non_finite_updates = self.add_variable(
            shape=(), dtype="int32", name="non_finite_updates")

    @property
    def non_finite_updates(self):
        """Updates skipped because a gradient held inf or NaN."""
        return self._non_finite_updates

    def layer_statistics(self):
        """Per-layer scalars of the last update, as Python floats.

        Returns a dict mapping each variable's path to a dict with the keys
        `trust_ratio`, `complete_norm`, `gradient_norm`, `weight_norm` and
        `coherence` (||g_l|| / N_l: 1 for LARS, <= 1 for CLARS).
        """
        if not self.built:
            return {}
        values = ops.convert_to_numpy(self._statistics.value).tolist()
        return {path: dict(zip(STATISTICS, row))
                for path, row in zip(self._paths, values)}

    # ---------------------------------------------------------- the update

    def apply(self, grads, trainable_variables=None, sample_norms=None):
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
        """
        if sample_norms is None:
            return super().apply(grads, trainable_variables)
        sample_norms = list(sample_norms)
        if not self.uses_complete_norm:
            raise ValueError(
                f"sample_norms must be None for {type(self).__name__}, which "
                "takes the norm of the mean gradient (it is only used by "
                f"CLARS); received {len(sample_norms)} sample_norms."
            )
        if self.loss_scale_factor is not None:
            sample_norms = [n / self.loss_scale_factor for n in sample_norms]
        with self._holding(sample_norms):
            return super().apply(grads, trainable_variables)

    @contextlib.contextmanager
    def _holding(self, sample_norms):
        """Keeps this replica's `sample_norms` for the `apply` inside.

        Keyed by replica: under tf.distribute a LossScaleOptimizer calls
        `apply` once per replica, in other threads (`call_for_each_replica`).
        """
        replica = _backend.replica_id()
        self._held_sample_norms[replica] = sample_norms
        try:
            yield
        finally:
            del self._held_sample_norms[replica]

    def _given_sample_norms(self, layers):
        """The norms handed to `apply` for this replica, or None."""
        given = self._held_sample_norms.get(_backend.replica_id())
        if given is None:
            return None
        if len(given) != layers.size:
            raise ValueError(
                "sample_norms must hold one norm per trainable variable "
                f"({layers.size}); received {len(given)} norms."
            )
        return layers.select(given)

    def _warn_one_sample(self):
        if not self._warned_one_sample:
            self._warned_one_sample = True
            warnings.warn(ONE_SAMPLE_WARNING.format(name=type(self).__name__),
                          UserWarning, stacklevel=2)

    def _backend_apply_gradients(self, grads, trainable_variables):
        layers = _Layers(self, trainable_variables)
        grads, complete_norms = self._replica_phase(layers, list(grads))
        _backend.on_each_device(
            lambda *args: self._update_phase(layers, *args),
            self._non_finite_updates,
            grads,
            complete_norms,
            ops.convert_to_tensor(self.learning_rate),
            self._excluded_rate(),
        )

    def _replica_phase(self, layers, grads):
        """This replica's sample norms, then ONE all-reduce of everything.

        Returns the gradients summed over replicas, and this micro-step's
        N_l as a vector over the layers (the mean of the replicas' sample
        norms), or None when N_l is ||g_l||: LARS, and CLARS with one sample
        (one replica, no accumulation, no given norms), which then runs
        LARS's computation exactly.
        """
        replicas = _backend.num_replicas()
        given = self._given_sample_norms(layers)
        if not self.uses_complete_norm:
            return _backend.all_reduce_sum(grads), None
        if replicas == 1 and not self.gradient_accumulation_steps and (
                given is None):
            self._warn_one_sample()
            return _backend.all_reduce_sum(grads), None
        # Keras scales each replica's loss by 1/R: undo it on the samples.
        if given is None:
            sample_norms = layers.join(
                [replicas * n for n in layers.norms(grads)])
        else:
            sample_norms = replicas * ops.stack(
                [ops.cast(n, layers.dtype) for n in given])
        reduced = _backend.all_reduce_sum(grads + [sample_norms])
        return reduced[:-1], reduced[-1] / replicas

    def _update_phase(self, layers, grads, complete_norms, learning_rate,
                      excluded_rate):
        """Once per device: clip, accumulate and, on an update micro-step,
        update all layers. `complete_norms` as `_replica_phase` returns it."""
        grads = [ops.cast(g, v.dtype) for g, v in zip(grads, layers.variables)]
        if self._clips():
            grads, complete_norms = self._clip(layers, grads, complete_norms)
        rates = (learning_rate, excluded_rate)
        if self.gradient_accumulation_steps:
            self._accumulate(layers, grads, complete_norms, rates)
        else:
            self._update(layers, grads, 1.0, complete_norms, rates, None)

    def _clip(self, layers, grads, complete_norms):
        """Keras's clipping of the mean gradient; the sample norms of layer
        l are scaled by ||clip(g_l)|| / ||g_l||, so S = 1 stays LARS."""
        raw_norms = layers.norms(grads)
        grads = self._clip_gradients(grads)
        # Non-finite stays non-finite (clipvalue would turn inf into a
        # number): `_update` then sees the gradient as received.
        poison = sum(ops.cast(ops.sum(n - n), "float32") for n in raw_norms)
        grads = [g + ops.cast(poison, g.dtype) for g in grads]
        if complete_norms is not None:
            factors = [transforms.clip_factor(raw, clipped) for raw, clipped
                       in zip(raw_norms, layers.norms(grads))]
            complete_norms = layers.join(
                [n * f for n, f in zip(layers.split(complete_norms), factors)])
        return grads, complete_norms

    def _accumulate(self, layers, grads, complete_norms, rates):
        """Adds this micro-step to the window's sums; on every k-th, updates
        with the window's means and restarts the sums (TensorFlow: inside
        one `cond`, so the other k - 1 micro-steps cost one pass over the
        gradients)."""
        steps = self.gradient_accumulation_steps
        sums = layers.select(self._accumulated_gradients)
        for accumulator, grad in zip(sums, grads):
            self.assign_add(accumulator, grad)
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
            self._update(layers, totals, 1.0 / steps, window_norms, rates, mask)
            for accumulator in sums:
                self._assign(accumulator,
                             ops.zeros(accumulator.shape, accumulator.dtype),
                             mask)

        _backend.when(ops.equal((self._iterations + 1) % steps, 0),
                      update_window)

    def _update(self, layers, grads, gradient_scale, complete_norms, rates,
                mask):
        """The update of the spec, with g_l = gradient_scale * grads[l].

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
