"""The models, data and constants of the per-example norm tests, shared by
tests/test_per_example.py (TensorFlow) and tests/test_per_example_backends.py
(JAX, PyTorch)."""

import numpy as np

import keras

HYPER = dict(momentum=0.9, trust_coefficient=0.02, weight_decay=1e-3)
LR = 0.5
BATCH = 6
NORM_TOLERANCE = dict(rtol=2e-5, atol=1e-6)
WEIGHT_TOLERANCE = dict(rtol=1e-5, atol=2e-6)


def loss_fn():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def conv_model(seed=0):
    """Dense, Conv2D (strided; dilated 'valid'; groups=2), DepthwiseConv2D,
    and a Dense on 3-D input, without BatchNorm; with relu, tanh, softmax
    and linear activations (D = dL/dZ through each), and two layers in a
    nested Sequential model (whose graph the wrapper runs too)."""
    inputs = keras.Input((9, 9, 2))
    x = keras.layers.Conv2D(4, 3, strides=2, padding="same",
                            activation="relu")(inputs)
    x = keras.Sequential([
        keras.layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2,
                                     activation="tanh"),
        keras.layers.Conv2D(4, 3, dilation_rate=2, padding="valid",
                            groups=2, activation="tanh"),
    ], name="nested")(x)
    x = keras.layers.Conv2D(6, 1, strides=1, activation="relu")(x)
    x = keras.layers.Reshape((1, -1))(x)
    x = keras.layers.Dense(5, activation="softmax")(x)  # rank-3 input
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(3)(x)
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(seed)
    model.set_weights([rng.normal(0, 0.5, w.shape).astype("float32")
                       for w in model.get_weights()])
    return model


def small_model(seed=0):
    """Conv2D (strided), DepthwiseConv2D and Dense: the subprocess's model."""
    model = keras.Sequential([
        keras.Input((9, 9, 2)),
        keras.layers.Conv2D(4, 3, strides=2, padding="same", activation="tanh"),
        keras.layers.DepthwiseConv2D(3, activation="tanh"),
        keras.layers.Flatten(),
        keras.layers.Dense(3),
    ])
    rng = np.random.default_rng(seed)
    model.set_weights([rng.normal(0, 0.5, w.shape).astype("float32")
                       for w in model.get_weights()])
    return model


def data(count, seed=1, shape=(9, 9, 2)):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(count,) + shape).astype("float32")
    y = rng.integers(0, 3, size=count).astype("int32")
    return x, y


def brute_norms(samples):
    return [np.mean([np.linalg.norm(s[l]) for s in samples])
            for l in range(len(samples[0]))]


def bn_model(seed=0):
    inputs = keras.Input((8, 8, 2))
    x = keras.layers.Conv2D(4, 3, strides=2, padding="same", use_bias=False)(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Activation("relu")(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False)(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(3)(x)
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(seed)
    model.set_weights([
        (1 + 0.1 * rng.normal(size=w.shape) if "gamma" in v.path or
         "variance" in v.path else rng.normal(0, 0.5, w.shape)).astype("float32")
        for v, w in zip(model.weights, model.get_weights())])
    return model
