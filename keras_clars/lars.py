"""LARS: layer-wise adaptive rate scaling with the norm of the mean gradient."""

import keras

from keras_clars.layerwise import LayerwiseOptimizer

_ARGS = """
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
        **kwargs: the other arguments of `keras.optimizers.Optimizer`
            (`clipnorm`, `clipvalue`, `global_clipnorm`, `loss_scale_factor`,
            `name`). Clipping acts on each micro-step's all-reduced mean
            gradient. `use_ema` is not supported.

    Non-finite gradients: an update whose gradient holds inf or NaN in any
    layer is skipped whole (weights and momentum unchanged, accumulators
    reset) and counted in `optimizer.non_finite_updates`; a warning is not
    possible inside a compiled step, so check that counter, or use
    `keras_clars.callbacks.NonFiniteUpdateMonitor`.
"""


@keras.saving.register_keras_serializable(package="keras_clars")
class LARS(LayerwiseOptimizer):
    __doc__ = (
        """Layer-wise Adaptive Rate Scaling (You et al., 2017).

    For each layer l, with the mean gradient g_l of the global batch:

        lambda_l = eta * ||w_l|| / (||g_l|| + beta * ||w_l|| + eps)
        v_l <- m * v_l + lr * lambda_l * (g_l + beta * w_l);  w_l <- w_l - v_l
"""
        + _ARGS
        + """
    References:
        - You, Gitman, Ginsburg, "Large Batch Training of Convolutional
          Networks", arXiv:1708.03888 (2017).
    """
    )

    uses_complete_norm = False
