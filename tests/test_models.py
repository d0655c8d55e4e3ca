"""The recipes' models: each builds and trains with each optimizer."""

import json

import keras
import numpy as np
import pytest

from recipes import models, train

SIZE = 32
CLASSES = 5


def _loss():
    return keras.losses.CategoricalCrossentropy(from_logits=True)


@pytest.mark.parametrize("name", models.MODELS)
def test_every_model_takes_a_step_with_every_optimizer(name):
    # One build per model, a fresh optimizer (and compile) per optimizer.
    model = models.build_model(name, (SIZE, SIZE, 3), CLASSES, width=4)
    assert model.output_shape == (None, CLASSES)
    rng = np.random.default_rng(0)
    x = rng.random((2, SIZE, SIZE, 3), dtype=np.float32)
    y = keras.utils.to_categorical([1, 3], CLASSES)
    initial = model.get_weights()
    kernel = next(v for v in model.trainable_variables if len(v.shape) == 4)
    for optimizer in train.OPTIMIZERS:
        model.set_weights(initial)
        config = train.Config(optimizer=optimizer, weight_decay=1e-4)
        model.compile(
            optimizer=train.make_optimizer(config, 0.1), loss=_loss(),
            run_eagerly=True,  # one eager step is faster than tracing a step
        )
        before = kernel.numpy()
        loss = model.train_on_batch(x, y)
        assert np.isfinite(loss), (name, optimizer)
        assert int(model.optimizer.iterations) == 1, (name, optimizer)
        assert not np.array_equal(kernel.numpy(), before), (name, optimizer)


def test_batch_norm_momentum_and_sync_are_applied():
    model = models.build_model("mobilenet_v2", (SIZE, SIZE, 3), CLASSES,
                               bn_momentum=0.9, synchronized_bn=True)
    norms = [l for l in model.layers if isinstance(l, keras.layers.BatchNormalization)]
    assert norms and all(l.momentum == 0.9 and l.synchronized for l in norms)
    small = models.resnet20((28, 28, 1), CLASSES, width=2, bn_momentum=0.8)
    norms = [l for l in small.layers if isinstance(l, keras.layers.BatchNormalization)]
    assert norms and all(l.momentum == 0.8 for l in norms)


def test_resnet20_has_20_weighted_layers():
    model = models.resnet20((32, 32, 3), 10, width=16)
    convs = [l for l in model.layers if isinstance(l, keras.layers.Conv2D)]
    shortcut = [l for l in convs if l.kernel_size == (1, 1)]
    # 19 3x3 convolutions and the logits layer; 2 projection shortcuts.
    assert len(convs) - len(shortcut) == 19 and len(shortcut) == 2
    assert model.output_shape == (None, 10)


def test_resnet20_without_batch_norm_has_biases_instead():
    model = models.resnet20((28, 28, 1), CLASSES, width=2, depth=8, batch_norm=False)
    assert not [l for l in model.layers if isinstance(l, keras.layers.BatchNormalization)]
    convs = [l for l in model.layers if isinstance(l, keras.layers.Conv2D)]
    assert len(convs) == 9 and all(l.use_bias for l in convs)
    with_norm = models.resnet20((28, 28, 1), CLASSES, width=2, depth=8)
    assert not any(l.use_bias for l in with_norm.layers
                   if isinstance(l, keras.layers.Conv2D))


def test_bad_model_arguments_raise():
    with pytest.raises(ValueError, match="Unknown model 'vgg16'"):
        models.build_model("vgg16", (SIZE, SIZE, 3), CLASSES)
    with pytest.raises(ValueError, match="at least 32"):
        models.build_model("resnet50", (28, 28, 1), CLASSES)
    with pytest.raises(ValueError, match="width=0"):
        models.build_model("resnet20", (28, 28, 1), CLASSES, width=0)
    with pytest.raises(ValueError, match="batch_norm=False needs name='resnet20'"):
        models.build_model("mobilenet", (SIZE, SIZE, 3), CLASSES, batch_norm=False)


def test_kerascv_backbone_from_config():
    # An optional source: runs where `pip install keras-cv` was done.
    pytest.importorskip("keras_cv")
    config = {"stackwise_filters": [8, 16], "stackwise_blocks": [1, 1],
              "stackwise_strides": [1, 2], "include_rescaling": False}
    model = models.build_model("kerascv:ResNetBackbone", (SIZE, SIZE, 3), CLASSES,
                               kerascv_config=json.dumps(config))
    assert model.output_shape == (None, CLASSES)
    model.compile(optimizer=train.make_optimizer(train.Config(), 0.1), loss=_loss())
    loss = model.train_on_batch(np.zeros((2, SIZE, SIZE, 3), "float32"),
                                keras.utils.to_categorical([0, 1], CLASSES))
    assert np.isfinite(loss)
    with pytest.raises(ValueError, match="no backbone class 'NoSuchBackbone'"):
        models.build_model("kerascv:NoSuchBackbone", (SIZE, SIZE, 3), CLASSES)
