"""The arguments of LARS and CLARS: documented, checked, kept (private).

- `ARGS_DOCSTRING`, the Args section of both docstrings;
- `check(...)`, the constructor's checks, each failing with the uniform
  `X must be ...; received X=...`;
- `Configuration`, a base of `LayerwiseOptimizer`: the exclusions
  (`exclude_from_layer_adaptation`, `exclude_from_weight_decay`) and what
  they decide for each variable, the rates at this update, whether it
  clips, and `get_config` / `from_config`.

The update itself is in `keras_clars.layerwise`.
"""

import keras

# The Args section of the docstrings of LARS and CLARS (as Keras shares
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
        noise_scale: also estimate the gradient noise scale B_simple
            (McCandlish et al. 2018) from the update's gradient samples
            (docs/noise_scale.md): `gradient_noise_scale()`, and per layer in
            `layer_statistics()`. Off (False) computes nothing extra.
        noise_scale_decay: the decay, in [0, 1), of the moving averages of
            the estimates of |G|^2 and tr(Sigma) (each averaged apart); the
            default 0.95 averages over about the last 20 updates.
        sample_size: b, the examples in each gradient sample when the
            samples are replicas' micro-batches or accumulation micro-steps
            (the per-replica micro-batch size); needed by `noise_scale`
            there, and not with per-example norms (b = 1).
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


def _is_schedule(value):
    return isinstance(value, keras.optimizers.schedules.LearningRateSchedule)


def _rate_or_schedule(name, value):
    """None, a `LearningRateSchedule`, or a float >= 0; else the ValueError."""
    if value is None or _is_schedule(value):
        return value
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number >= 0, a LearningRateSchedule "
                         f"or None; received {name}={value!r}.")
    return _checked(name, value, ">= 0, a LearningRateSchedule or None",
                    lambda x: x >= 0)


def check(owner, learning_rate, momentum, trust_coefficient, weight_decay,
          epsilon, nesterov, gradient_accumulation_steps, use_ema,
          excluded_learning_rate, noise_scale=False, noise_scale_decay=0.95,
          sample_size=None):
    """The constructor's arguments, checked, as a dict of the numbers (as
    floats) and rates it takes; `owner` is the class name, for messages."""
    if isinstance(learning_rate, (int, float)) and not isinstance(
            learning_rate, bool):
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
    steps = gradient_accumulation_steps
    if steps is not None and (isinstance(steps, bool)
                              or not isinstance(steps, int) or steps < 2):
        raise ValueError(
            "gradient_accumulation_steps must be an int >= 2 or None; "
            f"received gradient_accumulation_steps={steps!r}."
        )
    if use_ema:
        raise ValueError(f"use_ema=True is not supported by {owner}; "
                         f"received use_ema={use_ema}.")
    if not isinstance(noise_scale, bool):
        raise ValueError(f"noise_scale must be True or False; received "
                         f"noise_scale={noise_scale!r}.")
    noise_scale_decay = _checked("noise_scale_decay", noise_scale_decay,
                                 "in [0, 1)", lambda x: 0 <= x < 1)
    if sample_size is not None and (isinstance(sample_size, bool) or not
                                    isinstance(sample_size, int) or sample_size < 1):
        raise ValueError("sample_size must be an int >= 1 or None; received "
                         f"sample_size={sample_size!r}.")
    return dict(learning_rate=learning_rate, momentum=momentum,
                trust_coefficient=trust_coefficient, weight_decay=weight_decay,
                epsilon=epsilon, excluded_learning_rate=excluded_learning_rate,
                noise_scale_decay=noise_scale_decay)


class Configuration:
    """The exclusions and the configuration of `LayerwiseOptimizer`."""

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

    def _use_weight_decay(self, variable):
        """Whether `variable` takes weight decay (Keras's name for the
        question; here the decay is coupled into the update)."""
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

    def _apply_weight_decay(self, variables):
        # Weight decay is coupled into the update; never decay the Keras way.
        return

    def _get_current_learning_rate(self):
        # Schedules see the update index, not the micro-step count.
        schedule = self._learning_rate
        if _is_schedule(schedule):
            return schedule(self.iterations)
        return super()._get_current_learning_rate()

    def _excluded_rate(self):
        """The excluded variables' rate at this update, or None (tied)."""
        rate = self.excluded_learning_rate
        if _is_schedule(rate):
            return rate(self.iterations)
        return rate

    def _clips(self):
        return bool(
            (self.clipnorm and self.clipnorm > 0)
            or (self.global_clipnorm and self.global_clipnorm > 0)
            or (self.clipvalue and self.clipvalue > 0)
        )

    def get_config(self):
        config = super().get_config()
        rate = self.excluded_learning_rate
        config.update(
            {
                "momentum": self.momentum,
                "trust_coefficient": self.trust_coefficient,
                "epsilon": self.epsilon,
                "nesterov": self.nesterov,
                "excluded_learning_rate": (
                    keras.saving.serialize_keras_object(rate)
                    if _is_schedule(rate) else rate),
                "noise_scale": self.noise_scale,
                "noise_scale_decay": self.noise_scale_decay,
                "sample_size": self.sample_size,
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
