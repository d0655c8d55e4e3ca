"""The models of the recipes: keras.applications plus a CIFAR-style ResNet-20.

KerasCV backbones are an optional source: `build_model("kerascv:ResNetBackbone",
..., kerascv_config={...})` builds `keras_cv.models.ResNetBackbone` from a
config (never from a preset, which needs the network) and adds a pooling and
logits head. It needs `pip install keras-cv`.
"""

import json

import keras
from keras import layers

APPLICATIONS = {
    "resnet50": keras.applications.ResNet50,
    "densenet121": keras.applications.DenseNet121,
    "mobilenet": keras.applications.MobileNet,
    "mobilenet_v2": keras.applications.MobileNetV2,
}
MODELS = tuple(APPLICATIONS) + ("resnet20",)
KERASCV_PREFIX = "kerascv:"
# keras.applications refuses inputs smaller than this.
MIN_APPLICATION_SIZE = 32


def resnet20(input_shape, num_classes, width=16, bn_momentum=0.9,
             synchronized=False, depth=20, batch_norm=True):
    """ResNet-20 of He et al. 2016 (section 4.2): three stages of 3x3 blocks.

    Args:
        width: channels of the first stage (16 in the paper); the stages
            have width, 2 * width and 4 * width.
        bn_momentum: BatchNorm's moving-average momentum. The default 0.9
            (Keras: 0.99) keeps the statistics current when large batches
            make an epoch only a few updates long.
        synchronized: use synchronized (cross-replica) BatchNorm.
        depth: 6n + 2 layers; 20 gives n = 3 blocks a stage.
        batch_norm: False leaves out every BatchNorm layer, and the
            convolutions get biases instead (the same network otherwise: a
            plain residual network, for the study's search for warmup).
    """
    if (depth - 2) % 6 or depth < 8:
        raise ValueError(f"depth must be 6n + 2 with n >= 1; received depth={depth}.")
    if width < 1:
        raise ValueError(f"width must be >= 1; received width={width}.")
    blocks = (depth - 2) // 6

    def norm(x):
        if not batch_norm:
            return x
        return layers.BatchNormalization(
            momentum=bn_momentum, synchronized=synchronized
        )(x)

    def conv(x, filters, strides=1):
        return layers.Conv2D(
            filters, 3, strides=strides, padding="same", use_bias=not batch_norm,
            kernel_initializer="he_normal",
        )(x)

    inputs = keras.Input(input_shape)
    x = layers.Activation("relu")(norm(conv(inputs, width)))
    for stage in range(3):
        filters = width * 2**stage
        for block in range(blocks):
            strides = 2 if stage > 0 and block == 0 else 1
            shortcut = x
            y = layers.Activation("relu")(norm(conv(x, filters, strides)))
            y = norm(conv(y, filters))
            if strides != 1 or shortcut.shape[-1] != filters:
                shortcut = norm(
                    layers.Conv2D(filters, 1, strides=strides,
                                  use_bias=not batch_norm)(x)
                )
            x = layers.Activation("relu")(layers.add([y, shortcut]))
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(num_classes)(x)
    return keras.Model(inputs, outputs, name=f"resnet{depth}")


def check_name(name):
    """Raises ValueError unless `name` is a model `build_model` knows."""
    if name in MODELS or (
        name.startswith(KERASCV_PREFIX) and len(name) > len(KERASCV_PREFIX)
    ):
        return
    raise ValueError(
        f"Unknown model {name!r}; expected one of {', '.join(MODELS)} or "
        f"{KERASCV_PREFIX}<BackboneClass>."
    )


def kerascv_backbone(class_name, input_shape, config=None):
    """A `keras_cv.models` backbone built from its config, with random weights.

    Args:
        class_name: e.g. `ResNetBackbone`, `DenseNetBackbone`.
        config: the backbone's constructor arguments (a dict or JSON string);
            `input_shape` is taken from the dataset.
    """
    try:
        import keras_cv
    except ImportError as error:
        raise ImportError(
            f"Model {KERASCV_PREFIX}{class_name} needs KerasCV: pip install keras-cv"
        ) from error
    cls = getattr(keras_cv.models, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, keras.Model)):
        raise ValueError(
            f"keras_cv.models has no backbone class {class_name!r}."
        )
    config = json.loads(config) if isinstance(config, str) else dict(config or {})
    config["input_shape"] = tuple(input_shape)
    return cls.from_config(config)


def build_model(name, input_shape, num_classes, width=16, bn_momentum=0.9,
                synchronized_bn=False, kerascv_config=None, depth=20,
                batch_norm=True):
    """Builds a model by name, with random weights; outputs are logits.

    Args:
        name: one of `MODELS`, or `kerascv:<BackboneClass>`.
        input_shape: (height, width, channels).
        num_classes: number of logits.
        width: ResNet-20's first-stage channels.
        bn_momentum: BatchNorm momentum of every model but KerasCV's.
        synchronized_bn: cross-replica BatchNorm (not for KerasCV models).
        kerascv_config: the KerasCV backbone's config (dict or JSON).
        depth: `resnet20`'s depth, 6n + 2 (8: ResNet-8).
        batch_norm: `resnet20` only: False builds it without BatchNorm.
    """
    check_name(name)
    if not batch_norm and name != "resnet20":
        raise ValueError("batch_norm=False needs name='resnet20'; received "
                         f"name={name!r}.")
    if name.startswith(KERASCV_PREFIX):
        backbone = kerascv_backbone(name[len(KERASCV_PREFIX):], input_shape, kerascv_config)
        x = layers.GlobalAveragePooling2D()(backbone.output)
        outputs = layers.Dense(num_classes)(x)
        return keras.Model(backbone.input, outputs, name=backbone.name)
    if name == "resnet20":
        return resnet20(input_shape, num_classes, width, bn_momentum, synchronized_bn,
                        depth=depth, batch_norm=batch_norm)
    if min(input_shape[:2]) < MIN_APPLICATION_SIZE:
        raise ValueError(
            f"{name} needs inputs of at least {MIN_APPLICATION_SIZE}x"
            f"{MIN_APPLICATION_SIZE}; received input_shape={tuple(input_shape)}."
        )
    model = APPLICATIONS[name](
        weights=None, input_shape=input_shape, classes=num_classes,
        classifier_activation=None,
    )
    if synchronized_bn or bn_momentum != 0.99:
        model = _rebuild_batch_norm(model, bn_momentum, synchronized_bn)
    return model


def _rebuild_batch_norm(model, momentum, synchronized):
    def clone(layer):
        if isinstance(layer, layers.BatchNormalization):
            config = layer.get_config()
            config.update(momentum=momentum, synchronized=synchronized)
            return layers.BatchNormalization.from_config(config)
        return layer.__class__.from_config(layer.get_config())

    return keras.models.clone_model(model, clone_function=clone)
