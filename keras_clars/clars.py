"""CLARS: LARS with the complete norm, the mean of the gradient samples' norms."""

import keras

from keras_clars._arguments import ARGS_DOCSTRING
from keras_clars.layerwise import LayerwiseOptimizer


@keras.saving.register_keras_serializable(package="keras_clars")
class CLARS(LayerwiseOptimizer):
    __doc__ = (
        """Complete Layer-wise Adaptive Rate Scaling (Huo, Gu and Huang, 2021).

    LARS with N_l, the norm in the trust ratio, replaced by the mean of the
    norms of S gradient samples: each sample is the mean gradient of one
    micro-batch on one replica, so S = replicas * accumulation steps.

        N_l      = (1/S) * sum_s ||g_{s,l}||      (>= ||g_l||)
        lambda_l = eta * ||w_l|| / (N_l + beta * ||w_l|| + eps)

    Where samples disagree, N_l exceeds ||g_l|| and the step shrinks by
    itself: the built-in warmup the paper claims. With S = 1 (one replica,
    no accumulation, no per-example norms) CLARS is exactly LARS, and warns
    once when its update is first traced; for many samples use
    `keras_clars.per_example_norms(model)` (S = B), gradient accumulation,
    or replicas. Report the slice size b = B / S with any result: N_l
    depends on it.

    This rule is this project's reconstruction from the paper's public
    record (its abstract and title); the paper's full text was not available.
"""
        + ARGS_DOCSTRING
        + """
    References:
        - Huo, Gu, Huang, "Large Batch Optimization for Deep Learning Using
          New Complete Layer-Wise Adaptive Rate Scaling", AAAI 2021
          (arXiv:2002.01576).
    """
    )

    uses_complete_norm = True
