"""LARS: layer-wise adaptive rate scaling with the norm of the mean gradient."""

import keras

from keras_clars._arguments import ARGS_DOCSTRING
from keras_clars.layerwise import LayerwiseOptimizer


@keras.saving.register_keras_serializable(package="keras_clars")
class LARS(LayerwiseOptimizer):
    __doc__ = (
        """Layer-wise Adaptive Rate Scaling (You et al., 2017).

    For each layer l, with the mean gradient g_l of the global batch:

        lambda_l = eta * ||w_l|| / (||g_l|| + beta * ||w_l|| + eps)
        v_l <- m * v_l + lr * lambda_l * (g_l + beta * w_l);  w_l <- w_l - v_l
"""
        + ARGS_DOCSTRING
        + """
    References:
        - You, Gitman, Ginsburg, "Large Batch Training of Convolutional
          Networks", arXiv:1708.03888 (2017).
    """
    )

    uses_complete_norm = False
