"""`keras_clars.per_example_norms`: exact per-example complete norms (S = B).

TensorFlow (tests/test_per_example_backends.py holds the tests that run on
every backend).

The norms are checked against a brute-force loop over the examples (one
GradientTape per example, the example's loss alone), and one CLARS update
through `fit` against the float64 reference of the spec fed with those
per-example gradients.
"""

import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

import keras
import tensorflow as tf

import keras_clars
from keras_clars import CLARS, LARS, _per_example_norms
from numpy_reference import reference_update
from per_example_models import (BATCH, HYPER, LR, NORM_TOLERANCE,
                                WEIGHT_TOLERANCE, bn_model, brute_norms,
                                conv_model, data, loss_fn, small_model)


def per_example_gradients(model, x, y):
    """One tape per example: the gradient of that example's loss alone."""
    grads = []
    for i in range(len(x)):
        with tf.GradientTape() as tape:
            loss = loss_fn()(y[i:i + 1], model(x[i:i + 1], training=True))
        grads.append([np.asarray(g, np.float64) for g in
                      tape.gradient(loss, model.trainable_variables)])
    return grads


def fit_one_update(model, x, y, optimizer=None, **fit):
    wrapped = keras_clars.per_example_norms(model)
    wrapped.compile(optimizer=optimizer or CLARS(learning_rate=LR, **HYPER),
                    loss=loss_fn())
    wrapped.fit(x, y, batch_size=len(x), epochs=1, shuffle=False, verbose=0,
                **fit)
    return wrapped


@pytest.fixture(params=["chosen", "explicit", "gram"])
def form(request, monkeypatch):
    """Each layer's form as chosen, or forced to one form everywhere."""
    if request.param != "chosen":
        monkeypatch.setattr(_per_example_norms, "choose",
                            lambda *args, form=request.param: form)
    return request.param


def test_norms_and_update_match_brute_force_and_reference(form):
    x, y = data(BATCH)
    model = conv_model()
    initial = model.get_weights()
    samples = per_example_gradients(model, x, y)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wrapped = fit_one_update(model, x, y)
    # S = B samples: CLARS's one-sample warning must not fire.
    assert not [w for w in caught if "one gradient sample" in str(w.message)]
    optimizer = wrapped.optimizer
    assert int(optimizer.iterations) == 1
    statistics = optimizer.layer_statistics()
    expected = brute_norms(samples)
    for variable, norm in zip(model.trainable_variables, expected):
        if len(variable.shape) > 1:  # rank-1 ones get ||g||, as documented
            np.testing.assert_allclose(
                statistics[variable.path]["complete_norm"], norm,
                err_msg=variable.path, **NORM_TOLERANCE)
            # Examples disagree: CLARS's norm is well above LARS's here.
            assert statistics[variable.path]["coherence"] < 0.95
    weights, _, _ = reference_update(
        initial, [np.zeros_like(w) for w in initial], samples,
        learning_rate=LR, complete=True, **HYPER)
    for variable, (a, b) in zip(model.weights, zip(model.get_weights(), weights)):
        np.testing.assert_allclose(a, b, err_msg=variable.path,
                                   **WEIGHT_TOLERANCE)


def test_chooser_takes_the_cheaper_form():
    # Late ResNet-50 stage: 7x7 outputs, 3x3x512 -> 512: the Gram form.
    assert _per_example_norms.choose(49, 4608, 512) == "gram"
    # Early stage: 56x56 outputs, 3x3x64 -> 64: explicit.
    assert _per_example_norms.choose(3136, 576, 64) == "explicit"
    assert _per_example_norms.choose(None, 10, 10) == "explicit"


def test_chunked_batch_gives_the_same_norms(monkeypatch):
    x, y = data(BATCH)
    reference = fit_one_update(small_model(), x, y).optimizer.layer_statistics()
    monkeypatch.setattr(_per_example_norms, "CHUNK_ELEMENTS", 64)
    chunked = fit_one_update(small_model(), x, y).optimizer.layer_statistics()
    assert len(chunked) == len(reference)
    for (path, values), got in zip(reference.items(), chunked.values()):
        np.testing.assert_allclose(got["complete_norm"],
                                   values["complete_norm"], rtol=1e-5,
                                   err_msg=path)


def test_unexcluded_biases_get_per_example_norms():
    x, y = data(BATCH)
    model = conv_model()
    samples = per_example_gradients(model, x, y)
    optimizer = CLARS(learning_rate=LR, **HYPER)
    optimizer._is_layer_adapted = lambda v: True  # every variable adapted
    wrapped = fit_one_update(model, x, y, optimizer=optimizer)
    statistics = wrapped.optimizer.layer_statistics()
    for variable, norm in zip(model.trainable_variables, brute_norms(samples)):
        np.testing.assert_allclose(statistics[variable.path]["complete_norm"],
                                   norm, err_msg=variable.path,
                                   **NORM_TOLERANCE)


def test_accumulation_averages_over_the_window():
    """k = 2 micro-batches: N_l is the mean over all 2 * B examples."""
    x, y = data(2 * BATCH)
    model = small_model()
    initial = model.get_weights()
    samples = per_example_gradients(model, x, y)
    wrapped = keras_clars.per_example_norms(model)
    wrapped.compile(optimizer=CLARS(learning_rate=LR,
                                    gradient_accumulation_steps=2, **HYPER),
                    loss=loss_fn())
    wrapped.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    weights, _, _ = reference_update(
        initial, [np.zeros_like(w) for w in initial], samples,
        learning_rate=LR, complete=True, **HYPER)
    for a, b in zip(model.get_weights(), weights):
        np.testing.assert_allclose(a, b, **WEIGHT_TOLERANCE)


class Unshaped(keras.layers.Layer):
    """The identity, without shape inference: a Sequential model holding it
    has no graph, and its `call` runs its layers in turn."""

    def call(self, inputs):
        return inputs

    def compute_output_spec(self, inputs):
        raise NotImplementedError


def test_sequential_without_a_graph_equals_with_one():
    x, y = data(BATCH, shape=(4,))
    weights = []
    for middle in ([], [Unshaped()]):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.layers.Dense(5, activation="relu"),
                                  *middle, keras.layers.Dense(3)])
        model(x)  # builds it (an unbuilt model has no variables to target)
        assert (model._functional is None) == bool(middle)
        fit_one_update(model, x, y)
        weights.append(model.get_weights())
    for a, b in zip(*weights):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------- BatchNorm


def test_batchnorm_contributions_sum_to_the_batch_gradient():
    """c_i = B * A_i^T D_i: sum_i c_i = B * g, norms as CLARS receives them."""
    x, y = data(BATCH, shape=(8, 8, 2))
    model = bn_model()
    wrapped = keras_clars.per_example_norms(model)
    targets = _per_example_norms.find_targets(wrapped, CLARS())
    recorder = _per_example_norms.Recorder(targets.layers)
    with tf.GradientTape() as tape:
        with wrapped.recording(recorder):
            logits = wrapped(x, training=True)
        loss = loss_fn()(y, logits)
    records = recorder.records()
    kernels = [layer.trainable_weights[0] for layer in targets.layers]
    outputs = tape.gradient(loss, kernels + [e for _, e in records])
    grads, ds = outputs[:len(kernels)], outputs[len(kernels):]
    for layer, (a, _), d, kernel, grad in zip(targets.layers, records, ds,
                                              kernels, grads):
        contributions = []
        kernel = kernel.value  # the tf.Variable
        for i in range(BATCH):
            # A_i^T D_i by TensorFlow's own kernel gradient of one example.
            with tf.GradientTape() as inner:
                inner.watch(kernel)
                if isinstance(layer, keras.layers.Dense):
                    z = tf.matmul(a[i:i + 1], kernel)
                elif isinstance(layer, keras.layers.DepthwiseConv2D):
                    z = tf.nn.depthwise_conv2d(a[i:i + 1], kernel, [1, 1, 1, 1],
                                               "SAME")
                else:
                    z = tf.nn.conv2d(a[i:i + 1], kernel, layer.strides,
                                     layer.padding.upper())
                term = tf.reduce_sum(z * d[i:i + 1])
            contributions.append(BATCH * np.asarray(inner.gradient(term, kernel),
                                                    np.float64))
        np.testing.assert_allclose(np.sum(contributions, 0) / BATCH, grad,
                                   rtol=1e-4, atol=1e-6, err_msg=layer.name)
        squared, _ = _per_example_norms.squared_norms(layer, a, d, True, False)
        if a.shape.rank != 4:
            continue
        # Unknown spatial shapes take the im2col (extract_patches) path.
        dynamic = tf.function(
            lambda a, d, layer=layer: _per_example_norms.squared_norms(
                layer, a, d, True, False)[0],
            input_signature=[tf.TensorSpec([None, None, None, a.shape[-1]]),
                             tf.TensorSpec([None, None, None, d.shape[-1]])])
        np.testing.assert_allclose(dynamic(a, d), squared, rtol=1e-5,
                                   err_msg=layer.name)
        np.testing.assert_allclose(
            BATCH * np.sqrt(squared.numpy()),
            [np.linalg.norm(c) for c in contributions], rtol=1e-4,
            err_msg=layer.name)


# ---------------------------------------------------------- no-ops, errors


def _compile(model, **optimizer):
    wrapped = keras_clars.per_example_norms(model)
    wrapped.compile(optimizer=CLARS(**optimizer), loss=loss_fn())
    return wrapped


def _fit(wrapped):
    """One step on zeros of the model's input shape (errors come from here)."""
    shape = (4,) + tuple(wrapped.base_model.inputs[0].shape[1:])
    wrapped.fit(np.zeros(shape, "float32"), np.zeros(4, "int32"), verbose=0)


@pytest.mark.parametrize("layer, name", [
    (lambda: keras.layers.Conv1D(3, 2, name="c1"), "c1"),
    (lambda: keras.layers.Dense(3, kernel_regularizer="l2", name="reg"), "reg"),
])
def test_unsupported_layers_raise_naming_the_layer(layer, name):
    model = keras.Sequential([keras.Input((5, 2)), layer(), keras.layers.Flatten(),
                              keras.layers.Dense(3)])
    wrapped = _compile(model)
    with pytest.raises(ValueError, match=rf"layer='{name}'.*gradient_accumulation"):
        _fit(wrapped)


def test_unsupported_layer_excluded_from_adaptation_is_fine():
    model = keras.Sequential([keras.Input((5,)),
                              keras.layers.Embedding(10, 4, name="emb"),
                              keras.layers.Flatten(), keras.layers.Dense(3)])
    with pytest.raises(ValueError, match="layer='emb'"):
        _fit(_compile(model))
    optimizer = CLARS(learning_rate=0.1)
    optimizer.exclude_from_layer_adaptation(var_names=["emb"])
    wrapped = keras_clars.per_example_norms(model)
    wrapped.compile(optimizer=optimizer, loss=loss_fn())
    x = np.random.default_rng(0).integers(0, 10, (4, 5))
    wrapped.fit(x, np.zeros(4, "int32"), verbose=0)
    assert int(optimizer.iterations) == 1


def test_unexcluded_batchnorm_raises():
    model = bn_model()
    optimizer = CLARS()
    optimizer._is_layer_adapted = lambda v: True
    wrapped = keras_clars.per_example_norms(model)
    wrapped.compile(optimizer=optimizer, loss=loss_fn())
    with pytest.raises(ValueError, match="BatchNormalization gamma and beta"):
        _fit(wrapped)


def test_shared_layer_raises_at_the_first_step():
    shared = keras.layers.Dense(4, name="shared")
    inputs = keras.Input((4,))
    outputs = keras.layers.Dense(3)(shared(shared(inputs)))
    wrapped = _compile(keras.Model(inputs, outputs))
    with pytest.raises(ValueError, match="layer='shared', called more than once"):
        wrapped.fit(np.ones((4, 4), "float32"), np.zeros(4, "int32"), verbose=0)


class Block(keras.layers.Layer):
    """A custom layer calling a Dense: per_example_norms cannot reach it."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(4, name="inner")

    def call(self, inputs):
        return self.dense(inputs)


class Subclassed(Block, keras.Model):
    """A subclassed model (its own `call`)."""


def test_layer_called_inside_another_layer_raises():
    inputs = keras.Input((4,))
    wrapped = _compile(keras.Model(inputs, keras.layers.Dense(3)(Block()(inputs))))
    with pytest.raises(ValueError, match="layer='inner', not reached"):
        _fit(wrapped)


def test_subclassed_model_raises_naming_the_alternatives():
    model = Subclassed(name="sub")
    model(np.ones((1, 4), "float32"))  # builds it
    wrapped = _compile(model)
    with pytest.raises(ValueError, match=(
            "model must be a Functional or Sequential model .*; received "
            r"model='sub' \(Subclassed, with its own call\)\. Build it as a "
            "Functional or Sequential model, or use micro-batch samples")):
        wrapped.fit(np.ones((4, 4), "float32"), np.zeros(4, "int32"), verbose=0)


def test_other_backend_raises(monkeypatch):
    monkeypatch.setattr(keras.backend, "backend", lambda: "openvino")
    with pytest.raises(ValueError, match="TensorFlow, JAX or PyTorch backend; "
                       "received backend='openvino'"):
        keras_clars.per_example_norms(conv_model())


def test_not_a_model_raises():
    with pytest.raises(ValueError, match="model must be a keras.Model"):
        keras_clars.per_example_norms(keras.layers.Dense(3))


# ------------------------------------------------- saving, mixed precision


def test_save_load_and_continue_equals_uninterrupted(tmp_path):
    x, y = data(4 * BATCH)

    def make():
        wrapped = keras_clars.per_example_norms(small_model())
        wrapped.compile(optimizer=CLARS(learning_rate=LR,
                                        gradient_accumulation_steps=2, **HYPER),
                        loss=loss_fn(), metrics=["accuracy"])
        return wrapped

    uninterrupted = make()
    uninterrupted.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    first = make()
    first.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    path = tmp_path / "model.keras"
    first.save(path)
    restored = keras.models.load_model(path)
    assert isinstance(restored, type(first))
    assert isinstance(restored.optimizer, CLARS)
    restored.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(uninterrupted.get_weights(), restored.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    result = restored.evaluate(x, y, verbose=0, return_dict=True)
    assert set(result) == {"loss", "accuracy"}


def test_mixed_float16_norms_match_float32():
    x, y = data(BATCH)
    reference = fit_one_update(small_model(), x, y).optimizer.layer_statistics()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = small_model()
    finally:
        keras.mixed_precision.set_global_policy("float32")
    wrapped = fit_one_update(model, x, y)
    assert isinstance(wrapped.optimizer, keras.optimizers.LossScaleOptimizer)
    statistics = wrapped.optimizer.inner_optimizer.layer_statistics()
    assert int(wrapped.optimizer.inner_optimizer.non_finite_updates) == 0
    assert len(statistics) == len(reference)
    for variable, got, want in zip(model.trainable_variables,
                                   statistics.values(), reference.values()):
        if len(variable.shape) > 1:
            np.testing.assert_allclose(got["complete_norm"], want["complete_norm"],
                                       rtol=2e-2, err_msg=variable.path)
            assert got["complete_norm"] > 1.05 * got["gradient_norm"]


# ------------------------------------------------------ MirroredStrategy

WORKER = textwrap.dedent("""
    import os, sys
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    import keras_clars
    from keras_clars import CLARS
    import per_example_models as t
    import test_per_example
    from numpy_reference import reference_update

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert strategy.num_replicas_in_sync == 2
    x, y = t.data(2 * t.BATCH)
    failures = []
    for steps, policy in ((None, "float32"), (2, "float32"), (None, "mixed_float16")):
        keras.mixed_precision.set_global_policy(policy)
        with strategy.scope():
            wrapped = keras_clars.per_example_norms(t.small_model())
            wrapped.compile(optimizer=CLARS(learning_rate=t.LR,
                            gradient_accumulation_steps=steps, **t.HYPER),
                            loss=t.loss_fn())
        keras.mixed_precision.set_global_policy("float32")
        wrapped.fit(x, y, batch_size=t.BATCH, epochs=1, shuffle=False, verbose=0)
        # The reference: per-example gradients at the reference's weights.
        model = t.small_model()
        weights = [np.asarray(w, np.float64) for w in model.get_weights()]
        velocities = [np.zeros_like(w) for w in weights]
        k = steps or 1
        for update in range(len(x) // (k * t.BATCH)):
            window = slice(update * k * t.BATCH, (update + 1) * k * t.BATCH)
            model.set_weights([w.astype("float32") for w in weights])
            samples = test_per_example.per_example_gradients(model, x[window], y[window])
            weights, velocities, _ = reference_update(
                weights, velocities, samples, learning_rate=t.LR,
                complete=True, **t.HYPER)
        tolerance = (dict(rtol=2e-2, atol=2e-3) if policy != "float32"
                     else t.WEIGHT_TOLERANCE)
        for a, b in zip(wrapped.get_weights(), weights):
            try:
                np.testing.assert_allclose(a, b, **tolerance)
            except AssertionError as error:
                failures.append(f"k={steps} {policy}: {error}")
    print("FAILURES" if failures else "OK")
    print("\\n".join(failures))
    sys.exit(1 if failures else 0)
""")


def test_mirrored_strategy_with_and_without_accumulation(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=os.pathsep.join(
                   [os.path.dirname(tests), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, str(script), tests], env=env,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "OK" in result.stdout
