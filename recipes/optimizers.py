"""The recipes' optimizers: CLARS, LARS or `MomentumSGD`, from a `Config`."""

import keras

import keras_clars


@keras.saving.register_keras_serializable(package="keras_clars_recipes")
class MomentumSGD(keras_clars.LARS):
    """SGD with heavy-ball momentum and coupled weight decay (Goyal et al. 2017).

    LARS with every trust ratio 1:

        v <- m * v + lr * (g + beta * w);   w <- w - v

    which is Keras SGD's update (v <- m * v - lr * g; w <- w + v) with the
    weight decay inside the step, as Goyal et al. apply it. It is the
    recipes' SGD baseline because it shares LARS's machinery: it accumulates
    micro-steps under every tf.distribute strategy (Keras SGD's own
    accumulation fails there) and evaluates its schedule at the update index.
    `trust_coefficient` is unused.
    """

    def _is_layer_adapted(self, variable):
        return False


def make_optimizer(config, learning_rate, accumulation_steps=1,
                   excluded_learning_rate=None, sample_size=None):
    """The optimizer of `config`: CLARS, LARS or `MomentumSGD`.

    All three take weight decay coupled, in their update, and none decays
    variables of rank <= 1. `excluded_learning_rate` (LARS, CLARS) sets the
    rate of the variables without a trust ratio apart from `learning_rate`;
    `sample_size` is the noise scale's b for micro-batch samples.
    """
    k = accumulation_steps if accumulation_steps > 1 else None
    cls = {"clars": keras_clars.CLARS, "lars": keras_clars.LARS,
           "sgd": MomentumSGD}[config.optimizer]
    return cls(
        learning_rate, momentum=config.momentum,
        trust_coefficient=config.trust_coefficient, weight_decay=config.weight_decay or None,
        nesterov=config.nesterov, gradient_accumulation_steps=k,
        excluded_learning_rate=excluded_learning_rate,
        noise_scale=config.noise_scale, sample_size=sample_size)
