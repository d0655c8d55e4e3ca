"""The machinery shared by LARS and CLARS: one update over all layers.

A *micro-step* is one call to `apply()`: the gradient of one micro-batch on
each replica. An *update* moves the weights; it happens every micro-step, or
on every k-th one with `gradient_accumulation_steps=k`. Each micro-step has
two phases:

1. **Replica phase** (replica context): CLARS takes this replica's sample
   norms (its own gradient's per-layer norms times R, or the norms handed to
   `apply(..., sample_norms=...)`); then ONE batched all-reduce sums the
   gradients and the packed vector of sample norms over replicas.
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
from keras import ops

from keras_clars import transforms

# Per-layer scalars kept from the last update, in this order.
STATISTICS = (
    "trust_ratio",
    "complete_norm",
    "gradient_norm",
    "weight_norm",
    "coherence",
)

# The Args shared by the docstrings of LARS and CLARS (as Keras shares
# `base_optimizer_keyword_args`).
ARGS_DOCSTRING = """
    Args:
        learning_rate: a float >= 0, or a
            `keras.optimizers.schedules.LearningRateSchedule`, evaluated at
            the update index (updates, not accumulation micro-steps).
        momentum: heavy-ball momentum m, in [0, 1).
        trust_coefficient: eta > 0, the scale of the trust ratio.
        weight_decay: beta >= 0, coupled into the update (never also applied
            the decoupled Keras way); `None` or 0 turns it off. Variables of
            rank <= 1 and those named in `exclude_from_weight_decay` take
            none.
        epsilon: eps >= 0 in the trust ratio's denominator.
        nesterov: use Nesterov momentum (needs momentum > 0).
        gradient_accumulation_steps: k, an int >= 2, or None. The weights
            move on every k-th call to `apply()`, by the mean of the k
            micro-step gradients. Works under every tf.distribute strategy.
        excluded_learning_rate: the rate of the variables that take no
            trust ratio (biases, BatchNorm's gamma and beta, and those named
            in `exclude_from_layer_adaptation`): a float >= 0, a
            `LearningRateSchedule` (evaluated at the update index), or None
            (default) to tie it to `learning_rate`, as MLPerf's LARS does.
            Set it to tune the adapted layers' step (`learning_rate *
            trust_coefficient * ||w|| / N`) without moving theirs: the
            complete norm rescales the adapted layers' step (per example,
            by about 10x) and nothing else's.
        **kwargs: the other arguments of `keras.optimizers.Optimizer`
            (`clipnorm`, `clipvalue`, `global_clipnorm`, `loss_scale_factor`,
            `name`). Clipping acts on each micro-step's all-reduced mean
            gradient, as in Keras; CLARS scales that micro-step's sample
            norms of layer l by ||clip(g_l)|| / ||g_l||. `use_ema` is not
            supported.

    Exclusions: `exclude_from_layer_adaptation(var_list, var_names)` and
    `exclude_from_weight_decay(var_list, var_names)` must be called before
    the optimizer is built. Exclusions by name are configuration: they are
    kept by `get_config` and `model.save`; those by `var_list` (variable
    identity) are not.

    Non-finite gradients: an update whose gradient, as received and before
    clipping, holds inf or NaN in any layer is skipped whole (weights and
    momentum unchanged, accumulators reset) and counted in
    `optimizer.non_finite_updates`; a warning is not possible inside a
    compiled step, so check that counter, or use
    `keras_clars.callbacks.NonFiniteUpdateMonitor`.
"""

ONE_SAMPLE_WARNING = (
    "{name} has one gradient sample per update (one replica, no gradient "
    "accumulation, no per-example norms): with S = 1 its complete norm is "
    "the norm of the mean gradient, and CLARS is exactly LARS. For CLARS's "
    "complete norm use per-example norms (`keras_clars.per_example_norms("
    "model)`), gradient accumulation (`gradient_accumulation_steps=k`), or "
    "several replicas (a tf.distribute strategy)."
)


def _as_float(name, value):
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number; received {name}={value!r}.")


def _checked(name, value, requirement, ok):
    """`value` as a float if `ok(value)`, else the uniform ValueError."""
    value = _as_float(name, value)
    if not ok(value):
        raise ValueError(
            f"{name} must be {requirement}; received {name}={value}."
        )
    return value


def inner_optimizer(optimizer):
    """`optimizer` without its `LossScaleOptimizer` wrappers, if any."""
    while hasattr(optimizer, "inner_optimizer"):
        optimizer = optimizer.inner_optimizer
    return optimizer


def _rate_or_schedule(name, value):
    """None, a `LearningRateSchedule`, or a float >= 0; else the ValueError."""
    if value is None or isinstance(
            value, keras.optimizers.schedules.LearningRateSchedule):
        return value
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number >= 0, a LearningRateSchedule "
                         f"or None; received {name}={value!r}.")
    return _checked(name, value, ">= 0, a LearningRateSchedule or None",
                    lambda x: x >= 0)


def backend_paths():
    """The one backend check: TensorFlow's fast paths, or `_KerasOps`."""
    if keras.backend.backend() == "tensorflow":
        from keras_clars import _tensorflow

        return _tensorflow
    return _KerasOps


class _KerasOps:
    """The generic path (JAX, PyTorch): `keras.ops` and `transforms`.

    Same functions as `keras_clars._tensorflow`. One replica; assignments
    that may not happen select with a boolean `mask` (JAX cannot assign
    inside `lax.cond` in Keras's stateless scope; XLA fuses the select).
    """

    @staticmethod
    def num_replicas():
        return 1

    @staticmethod
    def all_reduce_sum(tensors):
        return list(tensors)

    @staticmethod
    def on_each_device(fn, anchor, *args):
        return fn(*args)

    @staticmethod
    def squared_norms(tensors, dtype):
        return ops.stack(
            [transforms.squared_norm(ops.cast(x, dtype)) for x in tensors]
        )

    @staticmethod
    def when(condition, fn):
        fn(condition)

    @staticmethod
    def scale_tensor(x, factor):
        return ops.cast(factor, x.dtype) * x

    @staticmethod
    def apply_momentum(optimizer, variables, velocities, updates, mask):
        """Heavy-ball momentum on each layer, where `mask` holds."""
        for variable, velocity, update in zip(variables, velocities, updates):
            new_velocity, step = transforms.heavy_ball(
                ops.convert_to_tensor(velocity), update,
                ops.convert_to_tensor(optimizer.momentum, variable.dtype),
                optimizer.nesterov,
            )
            optimizer._assign(velocity, new_velocity, mask)
            optimizer._assign(variable,
                              ops.convert_to_tensor(variable) - step, mask)


class _Layers:
    """The layers of one update, grouped by norm dtype.

    Norms and ratios are float32, or float64 for float64 variables
    (`transforms.norm_dtype`), so per-layer scalars live in one vector per
    dtype present: usually one. `join` puts them back in layer order.
    """

    def __init__(self, variables):
        dtypes = [transforms.norm_dtype(v.dtype) for v in variables]
        self.groups = [
            (dtype, [i for i, d in enumerate(dtypes) if d == dtype])
            for dtype in ("float32", "float64")
            if dtype in dtypes
        ]
        order = [i for _, positions in self.groups for i in positions]
        self._inverse = (
            None
            if order == list(range(len(order)))
            else sorted(range(len(order)), key=order.__getitem__)
        )
        # The dtype of a vector over all layers (the packed sample norms).
        self.dtype = self.groups[-1][0]

    def norms(self, paths, tensors):
        return [
            ops.sqrt(paths.squared_norms([tensors[i] for i in positions], dtype))
            for dtype, positions in self.groups
        ]

    def split(self, vector):
        if len(self.groups) == 1:
            return [ops.cast(vector, self.groups[0][0])]
        return [
            ops.cast(ops.take(vector, positions), dtype)
            for dtype, positions in self.groups
        ]

    def join(self, vectors, dtype):
        joined = ops.concatenate([ops.cast(v, dtype) for v in vectors])
        if self._inverse is None:
            return joined
        return ops.take(joined, self._inverse, axis=0)

    def constant(self, values, dtype=None):
        return [
            ops.convert_to_tensor([values[i] for i in positions],
                                  dtype or group_dtype)
            for group_dtype, positions in self.groups
        ]

    def unstack(self, vectors):
        scalars = [None] * sum(len(p) for _, p in self.groups)
        for vector, (_, positions) in zip(vectors, self.groups):
            for i, scalar in zip(positions, ops.unstack(vector)):
                scalars[i] = scalar
        return scalars


class LayerwiseOptimizer(keras.optimizers.Optimizer):
    """Base class of `LARS` and `CLARS`; see their docstrings."""

    # CLARS sets this: N_l is the mean of the gradient samples' norms.
    uses_complete_norm = False

    def __init__(
        self,
        learning_rate=1.0,
        momentum=0.9,
        trust_coefficient=0.001,
        weight_decay=None,
        epsilon=0.0,
        nesterov=False,
        clipnorm=None,
        clipvalue=None,
        global_clipnorm=None,
        use_ema=False,
        ema_momentum=0.99,
        ema_overwrite_frequency=None,
        loss_scale_factor=None,
        gradient_accumulation_steps=None,
        excluded_learning_rate=None,
        name=None,
        **kwargs,
    ):
        if isinstance(learning_rate, (int, float)) and not isinstance(
            learning_rate, bool
        ):
            learning_rate = _checked("learning_rate", learning_rate, ">= 0",
                                     lambda x: x >= 0)
        excluded_learning_rate = _rate_or_schedule(
            "excluded_learning_rate", excluded_learning_rate)
        momentum = _checked("momentum", momentum, "in [0, 1)",
                            lambda x: 0 <= x < 1)
        trust_coefficient = _checked("trust_coefficient", trust_coefficient,
                                     "> 0", lambda x: x > 0)
        if weight_decay is not None:
            weight_decay = _checked("weight_decay", weight_decay,
                                    ">= 0 or None", lambda x: x >= 0)
        epsilon = _checked("epsilon", epsilon, ">= 0", lambda x: x >= 0)
        if nesterov and momentum == 0:
            raise ValueError(
                "nesterov=True needs momentum > 0; received "
                f"nesterov={nesterov}, momentum={momentum}."
            )
        if gradient_accumulation_steps is not None and (
            isinstance(gradient_accumulation_steps, bool)
            or not isinstance(gradient_accumulation_steps, int)
            or gradient_accumulation_steps < 2
        ):
            raise ValueError(
                "gradient_accumulation_steps must be an int >= 2 or None; "
                f"received gradient_accumulation_steps="
                f"{gradient_accumulation_steps!r}."
            )
        if use_ema:
            raise ValueError(
                f"use_ema=True is not supported by {type(self).__name__}; "
                f"received use_ema={use_ema}."
            )
        super().__init__(
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            clipnorm=clipnorm,
            clipvalue=clipvalue,
            global_clipnorm=global_clipnorm,
            use_ema=use_ema,
            ema_momentum=ema_momentum,
            ema_overwrite_frequency=ema_overwrite_frequency,
            loss_scale_factor=loss_scale_factor,
            gradient_accumulation_steps=gradient_accumulation_steps,
            name=name,
            **kwargs,
        )
        self.momentum = momentum
        self.trust_coefficient = trust_coefficient
        self.epsilon = epsilon
        self.nesterov = bool(nesterov)
        self.excluded_learning_rate = excluded_learning_rate
        self._pending_sample_norms = None
        self._warned_one_sample = False
        self._no_adaptation_names = []
        self._no_decay_names = []
        self.exclude_from_layer_adaptation()
        self.exclude_from_weight_decay()

    # ----------------------------------------------------------- exclusions

    def _exclusion(self, method, var_list, var_names):
        """(ids, names) of an `exclude_from_*` call; raises once built."""
        if self.built:
            raise ValueError(
                f"{method}() must be called before the optimizer is built; "
                f"received a call after build on {type(self).__name__}."
            )
        return ({self._var_key(v) for v in var_list or ()},
                list(var_names or ()))

    def exclude_from_layer_adaptation(self, var_list=None, var_names=None):
        """Gives variables the trust ratio 1 (plain momentum SGD).

        Same arguments and rules as `exclude_from_weight_decay`.
        """
        self._no_adaptation_ids, self._no_adaptation_names = self._exclusion(
            "exclude_from_layer_adaptation", var_list, var_names)

    def exclude_from_weight_decay(self, var_list=None, var_names=None):
        """Takes variables out of weight decay (Keras's method and arguments).

        Variables of rank <= 1 are always excluded from both. Must be called
        before the optimizer is built; a new call replaces the earlier
        exclusions. Names are kept by `get_config` (and `model.save`),
        variables are not.

        Args:
            var_list: variables to exclude.
            var_names: strings; a variable whose path contains one of them is
                excluded (e.g. `["bias", "batch_normalization"]`).
        """
        self._no_decay_ids, self._no_decay_names = self._exclusion(
            "exclude_from_weight_decay", var_list, var_names)

    def _excluded(self, variable, ids, names):
        if self._var_key(variable) in ids:
            return True
        path = getattr(variable, "path", variable.name)
        return any(name in path for name in names)

    def _takes_weight_decay(self, variable):
        return (
            bool(self.weight_decay)
            and len(variable.shape) > 1
            and not self._excluded(variable, self._no_decay_ids,
                                   self._no_decay_names)
        )

    def _is_layer_adapted(self, variable):
        """Whether `variable` gets a trust ratio (else 1): rank > 1, and not
        excluded. Callable before the optimizer is built."""
        return len(variable.shape) > 1 and not self._excluded(
            variable, self._no_adaptation_ids, self._no_adaptation_names
        )

    def _use_weight_decay(self, variable):
        # Keras's name for the question; weight decay is coupled, below.
        return self._takes_weight_decay(variable)

    def _apply_weight_decay(self, variables):
        # Weight decay is coupled into the update; never decay the Keras way.
        return

    # ---------------------------------------------------------------- state

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self._velocities = self.add_optimizer_variables(variables, "velocity")
        self._statistics = self.add_variable(
            shape=(len(variables), len(STATISTICS)),
            dtype="float32",
            name="layer_statistics",
        )
        self._adapted = [self._is_layer_adapted(v) for v in variables]
        self._decayed = [self._takes_weight_decay(v) for v in variables]
        self._paths = [getattr(v, "path", v.name) for v in variables]
        if self.uses_complete_norm and self.gradient_accumulation_steps:
            # The window's running sum of each micro-step's complete norms.
            self._complete_norm_sums = self.add_variable(
                shape=(len(variables),),
                dtype=_Layers(variables).dtype,
                name="complete_norm_sums",
            )
        self._non_finite_updates = self.add_variable(
            shape=(), dtype="int32", name="non_finite_updates"
        )

    @property
    def non_finite_updates(self):
        """Updates skipped because a gradient held inf or NaN."""
        return self._non_finite_updates

    def _get_current_learning_rate(self):
        # Schedules see the update index, not the micro-step count.
        schedule = self._learning_rate
        if isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule):
            return schedule(self.iterations)
        return super()._get_current_learning_rate()

    def _excluded_rate(self):
        """The excluded variables' rate at this update, or None (tied)."""
        rate = self.excluded_learning_rate
        if isinstance(rate, keras.optimizers.schedules.LearningRateSchedule):
            return rate(self.iterations)
        return rate

    def layer_statistics(self):
        """Per-layer scalars of the last update, as Python floats.

        Returns a dict mapping each variable's path to a dict with the keys
        `trust_ratio`, `complete_norm`, `gradient_norm`, `weight_norm` and
        `coherence` (||g_l|| / N_l: 1 for LARS, <= 1 for CLARS).
        """
        if not self.built:
            return {}
        values = ops.convert_to_numpy(self._statistics.value).tolist()
        return {
            path: dict(zip(STATISTICS, row))
            for path, row in zip(self._paths, values)
        }

    # ---------------------------------------------------------- the update

    def apply(self, grads, trainable_variables=None, sample_norms=None):
        """Applies one micro-step of gradients.

        Args:
            grads: gradients, one per variable (per replica under
                tf.distribute, scaled by 1/R as Keras scales the loss).
            trainable_variables: the variables; needed on the first call.
            sample_norms: CLARS only. Per-layer mean norms of this
                replica's gradient samples in this micro-step, computed
                elsewhere (for example exact per-example norms), one per
                trainable variable in the optimizer's order, on the scale of
                an unscaled local mean gradient. When given, they replace
                the replica's own gradient norm as its sample. When None,
                `self._pending_sample_norms` is used if a wrapper set it
                (a LossScaleOptimizer's `apply` takes no `sample_norms`).
        """
        if sample_norms is None:
            sample_norms = self._pending_sample_norms
        if sample_norms is not None and not self.uses_complete_norm:
            raise ValueError(
                f"sample_norms must be None for {type(self).__name__}, which "
                "takes the norm of the mean gradient (it is only used by "
                f"CLARS); received {len(list(sample_norms))} sample_norms."
            )
        stashed = self._pending_sample_norms
        self._pending_sample_norms = sample_norms
        try:
            return super().apply(grads, trainable_variables)
        finally:
            self._pending_sample_norms = stashed

    def _given_sample_norms(self, indices):
        """The sample norms handed to `apply`, in `indices`' order, or None."""
        given = self._pending_sample_norms
        if given is None:
            return None
        given = list(given)
        if len(given) != len(self._trainable_variables):
            raise ValueError(
                "sample_norms must hold one norm per trainable variable "
                f"({len(self._trainable_variables)}); received "
                f"{len(given)} norms."
            )
        return [given[i] for i in indices]

    def _warn_one_sample(self):
        if not self._warned_one_sample:
            self._warned_one_sample = True
            warnings.warn(
                ONE_SAMPLE_WARNING.format(name=type(self).__name__),
                UserWarning,
                stacklevel=2,
            )

    def _clips(self):
        return bool(
            (self.clipnorm and self.clipnorm > 0)
            or (self.global_clipnorm and self.global_clipnorm > 0)
            or (self.clipvalue and self.clipvalue > 0)
        )

    def _backend_apply_gradients(self, grads, trainable_variables):
        paths = backend_paths()
        variables = list(trainable_variables)
        indices = [self._get_variable_index(v) for v in variables]
        layers = _Layers(variables)
        replicas = paths.num_replicas()
        given = self._given_sample_norms(indices)
        # S = 1 (one replica, no accumulation, no given norms): CLARS's
        # complete norm is ||g_l||, and it runs LARS's computation exactly.
        has_samples = self.uses_complete_norm and (
            replicas > 1 or bool(self.gradient_accumulation_steps)
            or given is not None
        )
        if self.uses_complete_norm and not has_samples:
            self._warn_one_sample()

        # Replica phase: this replica's sample norms (undoing Keras's 1/R),
        # then one all-reduce of gradients and the packed sample norms.
        grads = list(grads)
        if has_samples:
            if given is None:
                sample_norms = layers.join(
                    [replicas * n for n in layers.norms(paths, grads)],
                    layers.dtype,
                )
            else:
                sample_norms = ops.stack(
                    [ops.cast(n, layers.dtype) for n in given]
                )
            grads.append(sample_norms)
        reduced = paths.all_reduce_sum(grads)
        if has_samples:
            grads, complete_norms = reduced[:-1], reduced[-1] / replicas
        else:
            grads, complete_norms = reduced, None

        # Update phase, once per device.
        paths.on_each_device(
            lambda *args: self._update_phase(variables, indices, layers, *args),
            self._non_finite_updates,
            grads,
            complete_norms,
            ops.convert_to_tensor(self.learning_rate),
            self._excluded_rate(),
        )

    def _update_phase(self, variables, indices, layers, grads, complete_norms,
                      learning_rate, excluded_rate):
        """Clip, accumulate and, on an update micro-step, update all layers.

        `complete_norms` is this micro-step's N_l (a vector over the layers),
        or None when N_l is ||g_l|| (LARS, CLARS with one sample).
        """
        paths = backend_paths()
        grads = [ops.cast(g, v.dtype) for g, v in zip(grads, variables)]
        if self._clips():
            raw_norms = layers.norms(paths, grads)
            grads = self._clip_gradients(grads)
            # Non-finite stays non-finite (clipvalue would turn inf into a
            # number): the check below then sees the gradient as received.
            poison = sum(ops.cast(ops.sum(n - n), "float32") for n in raw_norms)
            grads = [g + ops.cast(poison, g.dtype) for g in grads]
            if complete_norms is not None:
                factors = [
                    transforms.clip_factor(raw, clipped)
                    for raw, clipped in zip(raw_norms,
                                            layers.norms(paths, grads))
                ]
                complete_norms = layers.join(
                    [n * f for n, f in zip(layers.split(complete_norms),
                                           factors)],
                    layers.dtype,
                )

        steps = self.gradient_accumulation_steps
        if not steps:
            self._update(variables, indices, layers, grads, 1.0,
                         complete_norms, (learning_rate, excluded_rate), None)
            return
        # Accumulate in place; the update micro-step reads the window's sums
        # and restarts them (TF: inside one `cond`, so the other k - 1
        # micro-steps cost one pass over the gradients).
        accumulators = [self._accumulated_gradients[i] for i in indices]
        for accumulator, grad in zip(accumulators, grads):
            self.assign_add(accumulator, grad)
        if complete_norms is not None:
            if not self._in_order(indices):
                complete_norms = ops.scatter(
                    [[i] for i in indices], complete_norms,
                    (len(self._trainable_variables),),
                )
            self.assign_add(self._complete_norm_sums, complete_norms)

        def update_window(mask):
            totals = [ops.convert_to_tensor(a) for a in accumulators]
            window_norms = None
            if complete_norms is not None:
                window_norms = ops.convert_to_tensor(self._complete_norm_sums)
                if not self._in_order(indices):
                    window_norms = ops.take(window_norms, indices)
                window_norms = window_norms / steps
            self._update(variables, indices, layers, totals, 1.0 / steps,
                         window_norms, (learning_rate, excluded_rate), mask)
            for accumulator in accumulators + (
                    [self._complete_norm_sums] if complete_norms is not None
                    else []):
                self._assign(accumulator,
                             ops.zeros(accumulator.shape, accumulator.dtype),
                             mask)

        paths.when(
            ops.equal((self._iterations + 1) % steps, 0), update_window
        )

    def _update(self, variables, indices, layers, grads, gradient_scale,
                complete_norms, rates, mask):
        """The update of the spec, with g_l = gradient_scale * grads[l].

        `rates` is (gamma_t, the excluded variables' rate or None: gamma_t).

        Skipped whole, and counted, if any gradient (or given norm) is not
        finite: every assignment selects with the mask `apply` (no branch,
        so tracing adds no op per layer for it). `mask` is None when the
        caller already decided that this is an update micro-step, else a
        boolean tensor (the generic path).
        """
        paths = backend_paths()
        learning_rate, excluded_rate = rates
        gradient_norms = layers.norms(paths, grads)
        if gradient_scale != 1.0:
            gradient_norms = [gradient_scale * n for n in gradient_norms]
        if complete_norms is None:
            complete_norms = gradient_norms
        else:
            complete_norms = layers.split(complete_norms)
        finite = ops.all(ops.stack(
            [ops.all(ops.isfinite(n)) for n in gradient_norms + complete_norms]
        ))
        skipped = ops.logical_not(finite)
        apply = finite
        if mask is not None:
            skipped = ops.logical_and(mask, skipped)
            apply = ops.logical_and(mask, finite)
        self.assign_add(self._non_finite_updates, ops.cast(skipped, "int32"))

        weights = [ops.convert_to_tensor(v) for v in variables]
        weight_norms = layers.norms(paths, weights)
        adapted = layers.constant([self._adapted[i] for i in indices], "bool")
        decay = layers.constant(
            [self.weight_decay if self._decayed[i] else 0.0 for i in indices]
        )
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
            scale = ops.where(apply, rate, ops.zeros_like(ratio))
            gradient_scales.append(
                scale if gradient_scale == 1.0 else scale * gradient_scale)
            decay_scales.append(scale * beta)
            rows.append(ops.stack(
                [ratio, n_norm, g_norm, w_norm,
                 transforms.coherence(g_norm, n_norm)], axis=1,
            ))
        statistics = layers.join(rows, "float32")
        if not self._in_order(indices):
            statistics = ops.scatter_update(
                ops.convert_to_tensor(self._statistics),
                [[i] for i in indices], statistics,
            )
        self._assign(self._statistics, statistics, apply)

        updates = []
        for grad, weight, g_scale, d_scale, i in zip(
            grads, weights, layers.unstack(gradient_scales),
            layers.unstack(decay_scales), indices,
        ):
            update = paths.scale_tensor(grad, g_scale)
            if self._decayed[i]:
                update = update + ops.cast(d_scale, grad.dtype) * weight
            updates.append(update)
        paths.apply_momentum(
            self, variables, [self._velocities[i] for i in indices], updates,
            apply,
        )

    def _in_order(self, indices):
        """Whether the update's variables are all of them, in build order."""
        return indices == list(range(len(self._trainable_variables)))

    def _assign(self, variable, value, mask):
        if mask is not None:
            value = ops.where(mask, value, ops.convert_to_tensor(variable))
        self.assign(variable, value)

    # -------------------------------------------------------- configuration

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "momentum": self.momentum,
                "trust_coefficient": self.trust_coefficient,
                "epsilon": self.epsilon,
                "nesterov": self.nesterov,
                "excluded_learning_rate": (
                    keras.saving.serialize_keras_object(
                        self.excluded_learning_rate)
                    if isinstance(self.excluded_learning_rate,
                                  keras.optimizers.schedules.LearningRateSchedule)
                    else self.excluded_learning_rate),
                # Exclusions by name are configuration (spec); by variable
                # identity they cannot be.
                "exclude_from_layer_adaptation": list(self._no_adaptation_names),
                "exclude_from_weight_decay": list(self._no_decay_names),
            }
        )
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        no_adaptation = config.pop("exclude_from_layer_adaptation", None)
        no_decay = config.pop("exclude_from_weight_decay", None)
        if isinstance(config.get("excluded_learning_rate"), dict):
            config["excluded_learning_rate"] = (
                keras.saving.deserialize_keras_object(
                    config["excluded_learning_rate"],
                    custom_objects=custom_objects))
        optimizer = super().from_config(config, custom_objects=custom_objects)
        if no_adaptation:
            optimizer.exclude_from_layer_adaptation(var_names=no_adaptation)
        if no_decay:
            optimizer.exclude_from_weight_decay(var_names=no_decay)
        return optimizer
