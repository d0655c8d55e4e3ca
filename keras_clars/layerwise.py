"""The machinery shared by LARS and CLARS: one update over all layers.

A *micro-step* is one call to `apply()`: the gradient of one micro-batch on
each replica. An *update* moves the weights; it happens every micro-step, or
on every k-th one with `gradient_accumulation_steps=k`. Each micro-step:

1. In replica context, takes the per-layer norms it needs (CLARS: each
   replica's own gradient, the gradient samples; LARS: the reduced gradient)
   and sums gradients and norms across replicas in one batched all-reduce.
2. In cross-replica context (a single merge_call), updates each layer on each
   device: accumulate, or apply the layer-wise update of the spec.

The learning rate is evaluated at the update index `iterations`, which counts
updates, not micro-steps.
"""

import re

import keras
from keras import ops

from keras_clars import _distribute as distribution, transforms

# Per-layer scalars kept from the last update, in this order.
STATISTICS = (
    "trust_ratio",
    "complete_norm",
    "gradient_norm",
    "weight_norm",
    "coherence",
)


def _as_float(name, value):
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number; received {name}={value!r}.")


def _handle(variable):
    """The resource handle of a TensorFlow variable (on this device)."""
    if isinstance(variable, keras.Variable):
        variable = variable.value
    return variable.handle


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
        name=None,
        **kwargs,
    ):
        if isinstance(learning_rate, (int, float)) and not isinstance(
            learning_rate, bool
        ):
            learning_rate = _as_float("learning_rate", learning_rate)
            if not learning_rate >= 0:
                raise ValueError(
                    "learning_rate must be >= 0; received "
                    f"learning_rate={learning_rate}."
                )
        momentum = _as_float("momentum", momentum)
        if not 0 <= momentum < 1:
            raise ValueError(
                f"momentum must be in [0, 1); received momentum={momentum}."
            )
        trust_coefficient = _as_float("trust_coefficient", trust_coefficient)
        if not trust_coefficient > 0:
            raise ValueError(
                "trust_coefficient must be > 0; received "
                f"trust_coefficient={trust_coefficient}."
            )
        if weight_decay is not None:
            weight_decay = _as_float("weight_decay", weight_decay)
            if not weight_decay >= 0:
                raise ValueError(
                    "weight_decay must be >= 0 or None; received "
                    f"weight_decay={weight_decay}."
                )
        epsilon = _as_float("epsilon", epsilon)
        if not epsilon >= 0:
            raise ValueError(f"epsilon must be >= 0; received epsilon={epsilon}.")
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
        self._pending_sample_norms = None
        self.exclude_from_layer_adaptation()

    # ----------------------------------------------------------- exclusions

    def exclude_from_layer_adaptation(self, var_list=None, var_names=None):
        """Gives variables the trust ratio 1 (plain momentum SGD).

        Variables of rank <= 1 are always excluded. Must be called before the
        optimizer is built.

        Args:
            var_list: variables to exclude.
            var_names: strings; a variable whose path contains one of them is
                excluded (e.g. `["bias", "batch_normalization"]`).
        """
        if self.built:
            raise ValueError(
                "exclude_from_layer_adaptation() must be called before the "
                "optimizer is built."
            )
        self._no_adaptation_ids = {self._var_key(v) for v in var_list or ()}
        self._no_adaptation_pattern = (
            re.compile("|".join(map(re.escape, var_names))) if var_names else None
        )

    def _matches(self, variable, ids, pattern):
        if self._var_key(variable) in ids:
            return True
        path = getattr(variable, "path", variable.name)
        return pattern is not None and re.search(pattern, path) is not None

    def _takes_weight_decay(self, variable):
        return (
            bool(self.weight_decay)
            and len(variable.shape) > 1
            and not self._matches(
                variable,
                getattr(self, "_exclude_from_weight_decay", set()),
                getattr(self, "_exclude_from_weight_decay_pattern", None),
            )
        )

    def _is_layer_adapted(self, variable):
        return len(variable.shape) > 1 and not self._matches(
            variable, self._no_adaptation_ids, self._no_adaptation_pattern
        )

    def _apply_weight_decay(self, variables):
        # Weight decay is coupled into the update; never decay the Keras way.
        return

    # ---------------------------------------------------------------- state

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self._velocities = self.add_optimizer_variables(variables, "velocity")
        self._layer_statistics = [
            self.add_variable(
                shape=(len(STATISTICS),),
                dtype="float32",
                name=f"layer_statistics_{i}",
            )
            for i in range(len(variables))
        ]
        self._adapted = [self._is_layer_adapted(v) for v in variables]
        self._decayed = [self._takes_weight_decay(v) for v in variables]
        self._paths = [getattr(v, "path", v.name) for v in variables]
        self._norm_dtype = (
            "float64"
            if any(str(v.dtype) == "float64" for v in variables)
            else "float32"
        )
        if self.gradient_accumulation_steps:
            # Running sum of each layer's per-micro-step norm.
            self._norm_accumulator = self.add_variable(
                shape=(len(variables),),
                dtype=self._norm_dtype,
                name="norm_accumulator",
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

    def layer_statistics(self):
        """Per-layer scalars of the last update, as Python floats.

        Returns a dict mapping each variable's path to a dict with the keys
        `trust_ratio`, `complete_norm`, `gradient_norm`, `weight_norm` and
        `coherence` (||g_l|| / N_l: 1 for LARS, <= 1 for CLARS).
        """
        if not self.built:
            return {}
        return {
            path: dict(zip(STATISTICS, map(float, ops.convert_to_numpy(s.value))))
            for path, s in zip(self._paths, self._layer_statistics)
        }

    # ---------------------------------------------------------- the update

    def apply(self, grads, trainable_variables=None, sample_norms=None):
        """Applies one micro-step of gradients.

        Args:
            grads: gradients, one per variable (per replica under
                tf.distribute, scaled by 1/R as Keras scales the loss).
            trainable_variables: the variables; needed on the first call.
            sample_norms: CLARS only. Per-layer mean norms of this
                micro-step's gradient samples, computed elsewhere (for
                example exact per-example norms), one per variable and on
                the scale of an unscaled local mean gradient. When given,
                they replace the replica's own gradient norm as its sample.
        """
        if sample_norms is not None and not self.uses_complete_norm:
            raise ValueError(
                f"sample_norms is only used by CLARS; {type(self).__name__} "
                "takes the norm of the mean gradient."
            )
        self._pending_sample_norms = sample_norms
        try:
            return super().apply(grads, trainable_variables)
        finally:
            self._pending_sample_norms = None

    def _micro_step_norms(self, grads, variables):
        """This replica's per-layer sample norms (CLARS), undoing 1/R."""
        replicas = distribution.num_replicas()
        if self._pending_sample_norms is not None:
            given = list(self._pending_sample_norms)
            if len(given) != len(self._trainable_variables):
                raise ValueError(
                    "sample_norms needs one norm per trainable variable "
                    f"({len(self._trainable_variables)}); received {len(given)}."
                )
            by_index = [given[self._get_variable_index(v)] for v in variables]
            # 0 * ||g|| is NaN exactly when g is not finite, so the update is
            # still skipped for a bad gradient whatever norms were given.
            return [
                ops.cast(n, self._norm_dtype)
                + 0.0 * ops.cast(transforms.l2_norm(g), self._norm_dtype)
                for n, g in zip(by_index, grads)
            ]
        return [
            ops.cast(transforms.l2_norm(g), self._norm_dtype) * replicas
            for g in grads
        ]

    def _backend_apply_gradients(self, grads, trainable_variables):
        variables = list(trainable_variables)
        replicas = distribution.num_replicas()
        if self.uses_complete_norm:
            # Sample norms are taken before the all-reduce, and before clipping.
            local = self._micro_step_norms(grads, variables)
            reduced = distribution.all_reduce_sum(list(grads) + [ops.stack(local)])
            grads, norms = self._clip_gradients(reduced[:-1]), reduced[-1] / replicas
        else:
            grads = self._clip_gradients(distribution.all_reduce_sum(grads))
            norms = ops.stack(
                [ops.cast(transforms.l2_norm(g), self._norm_dtype) for g in grads]
            )

        steps = self.gradient_accumulation_steps
        indices = [self._get_variable_index(v) for v in variables]
        if steps:
            # The window's norms: what was accumulated plus this micro-step.
            full = ops.scatter(
                ops.expand_dims(ops.convert_to_tensor(indices), 1),
                norms,
                (len(self._trainable_variables),),
            )
            window = self._norm_accumulator.value + ops.cast(full, self._norm_dtype)
            layer_norms = [window[i] / steps for i in indices]
            is_update = ops.equal((self._iterations + 1) % steps, 0)
        else:
            window = norms
            layer_norms = ops.unstack(norms)
            is_update = ops.convert_to_tensor(True)
        # The norms cover every gradient, so they also tell if all are finite.
        finite = ops.all(ops.isfinite(window))
        learning_rate = ops.cast(self.learning_rate, self._norm_dtype)
        apply_now = ops.logical_and(is_update, finite)
        # Without accumulation, LARS's N_l is ||g_l|| already, and so is
        # CLARS's with one replica and no given norms (one sample).
        norm_is_gradient_norm = not steps and (
            not self.uses_complete_norm
            or (replicas == 1 and self._pending_sample_norms is None)
        )

        def step(dist, grads, layer_norms, window, rate, is_update, finite,
                 apply_now):
            if steps:
                for variable, grad in zip(variables, grads):
                    distribution.update_variable(
                        dist, self._accumulator(variable), self._accumulate, (grad,)
                    )
                distribution.update_variable(
                    dist, self._norm_accumulator, self._roll_window,
                    (window, is_update),
                )

            def update_all_layers(mask):
                for variable, grad, norm in zip(variables, grads, layer_norms):
                    distribution.update_variable(
                        dist, variable, self._update_layer,
                        (None if steps else grad, norm, rate,
                         norm_is_gradient_norm, mask),
                    )

            def reset_accumulators(mask):
                for variable in variables:
                    distribution.update_variable(
                        dist, self._accumulator(variable), self._assign_zeros,
                        (mask,),
                    )

            self._when(dist, apply_now, update_all_layers)
            if steps:
                self._when(dist, is_update, reset_accumulators)
            distribution.update_variable(
                dist, self._non_finite_updates, self._count_skip,
                (is_update, finite),
            )

        distribution.cross_replica_call(
            step, grads, layer_norms, window, learning_rate, is_update, finite,
            apply_now,
        )

    # Conditional assignment. TensorFlow takes one `cond` around all layers
    # (one per layer made tracing big models several times slower). JAX
    # cannot assign inside `lax.cond` in Keras's stateless scope, so there
    # each assignment selects with a mask instead, which XLA fuses into the
    # update.

    def _when(self, dist, condition, fn):
        """Runs `fn(mask)` only where `condition` holds."""
        if keras.backend.backend() == "tensorflow":
            if dist is not None:
                # Every replica holds the same value after the all-reduce.
                condition = dist.experimental_local_results(condition)[0]
            ops.cond(condition, lambda: fn(None), lambda: None)
        else:
            fn(condition)

    def _assign(self, variable, value, mask):
        if mask is not None:
            value = ops.where(mask, value, ops.convert_to_tensor(variable))
        self.assign(variable, value)

    def _accumulator(self, variable):
        return self._accumulated_gradients[self._get_variable_index(variable)]

    def _accumulate(self, accumulator, grad):
        self.assign_add(accumulator, ops.cast(grad, accumulator.dtype))

    def _assign_zeros(self, variable, mask):
        self._assign(variable, ops.zeros(variable.shape, variable.dtype), mask)

    def _roll_window(self, accumulator, window, is_update):
        self.assign(accumulator, ops.where(is_update, ops.zeros_like(window), window))

    def _count_skip(self, counter, is_update, finite):
        skipped = ops.logical_and(is_update, ops.logical_not(finite))
        self.assign_add(counter, ops.cast(skipped, "int32"))

    def _update_layer(self, variable, grad, norm, learning_rate,
                      norm_is_gradient_norm, mask):
        """The spec's update of one layer on one device.

        `grad` is the mean gradient, or None with accumulation (the
        accumulator holds the sum). `norm` is N_l: the mean sample norm
        (CLARS) or, without accumulation, ||g_l|| (LARS);
        `norm_is_gradient_norm` says it is ||g_l|| and saves a pass. `mask` is
        None when the caller already decided to update, else a boolean
        tensor (JAX).
        """
        index = self._get_variable_index(variable)
        velocity = self._velocities[index]
        steps = self.gradient_accumulation_steps
        if steps:
            grad = ops.convert_to_tensor(self._accumulated_gradients[index]) / steps
        grad = ops.cast(grad, variable.dtype)
        w = ops.convert_to_tensor(variable)
        decay = self.weight_decay if self._decayed[index] else 0.0
        weight_norm = transforms.l2_norm(w)
        if norm_is_gradient_norm:
            gradient_norm = norm
        else:
            gradient_norm = transforms.l2_norm(grad)
        sample_norm = norm if self.uses_complete_norm else gradient_norm
        ratio = (
            transforms.trust_ratio(
                weight_norm, sample_norm, self.trust_coefficient, decay,
                self.epsilon,
            )
            if self._adapted[index]
            else ops.ones_like(weight_norm)
        )
        direction = grad + decay * w if decay else grad
        scale = ops.cast(learning_rate * ratio, variable.dtype)
        update = scale * direction
        momentum = ops.cast(self.momentum, variable.dtype)
        coherence = ops.where(
            sample_norm > 0,
            gradient_norm / ops.where(sample_norm > 0, sample_norm, 1),
            1,
        )
        statistics = ops.cast(
            ops.stack([ratio, sample_norm, gradient_norm, weight_norm, coherence]),
            "float32",
        )
        self._assign(self._layer_statistics[index], statistics, mask)
        if mask is None and distribution.is_tensorflow():
            # TensorFlow's fused momentum kernel: v <- m * v + u, then
            # w <- w - v (nesterov: w - (m * v + u)), in one pass instead of
            # four; the same rule as transforms.heavy_ball.
            import tensorflow as tf

            tf.raw_ops.ResourceApplyMomentum(
                var=_handle(variable),
                accum=_handle(velocity),
                lr=ops.ones((), variable.dtype),
                grad=update,
                momentum=momentum,
                use_nesterov=self.nesterov,
            )
            return
        new_velocity, step = transforms.heavy_ball(
            ops.convert_to_tensor(velocity), update, momentum, self.nesterov
        )
        self._assign(velocity, new_velocity, mask)
        self._assign(variable, ops.convert_to_tensor(variable) - step, mask)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "momentum": self.momentum,
                "trust_coefficient": self.trust_coefficient,
                "epsilon": self.epsilon,
                "nesterov": self.nesterov,
            }
        )
        return config
