"""The models of the recipes: keras.applications plus a CIFAR-style ResNet-20."""

import keras
from keras import layers

APPLICATIONS = {
    "resnet50": keras.applications.ResNet50,
    "densenet121": keras.applications.DenseNet121,
    "mobilenet": keras.applications.MobileNet,
    "mobilenet_v2": keras.applications.MobileNetV2,
}
MODELS = tuple(APPLICATIONS) + ("resnet20",)


def resnet20(input_shape, num_classes, width=16, bn_momentum=0.9,
             synchronized=False, depth=20):
    """ResNet-20 of He et al. 2016 (section 4.2): three stages of 3x3 blocks.

    Args:
        width: channels of the first stage (16 in the paper); the stages
            have width, 2 * width and 4 * width.
        bn_momentum: BatchNorm's moving-average momentum. The default 0.9
            (Keras: 0.99) keeps the statistics current when large batches
            make an epoch only a few updates long.
        synchronized: use synchronized (cross-replica) BatchNorm.
        depth: 6n + 2 layers; 20 gives n = 3 blocks a stage.
    """
    if (depth - 2) % 6 or depth < 8:
        raise ValueError(f"depth must be 6n + 2 with n >= 1; received depth={depth}.")
    if width < 1:
        raise ValueError(f"width must be >= 1; received width={width}.")
    blocks = (depth - 2) // 6

    def batch_norm(x):
        return layers.BatchNormalization(
            momentum=bn_momentum, synchronized=synchronized
        )(x)

    def conv(x, filters, strides=1):
        return layers.Conv2D(
            filters, 3, strides=strides, padding="same", use_bias=False,
            kernel_initializer="he_normal",
        )(x)

    inputs = keras.Input(input_shape)
    x = layers.Activation("relu")(batch_norm(conv(inputs, width)))
    for stage in range(3):
        filters = width * 2**stage
        for block in range(blocks):
            strides = 2 if stage > 0 and block == 0 else 1
            shortcut = x
            y = layers.Activation("relu")(batch_norm(conv(x, filters, strides)))
            y = batch_norm(conv(y, filters))
            if strides != 1 or shortcut.shape[-1] != filters:
                shortcut = batch_norm(
                    layers.Conv2D(filters, 1, strides=strides, use_bias=False)(x)
                )
            x = layers.Activation("relu")(layers.add([y, shortcut]))
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(num_classes)(x)
    return keras.Model(inputs, outputs, name=f"resnet{depth}")


def build_model(name, input_shape, num_classes, width=16, bn_momentum=0.9,
                synchronized_bn=False):
    """Builds a model by name, with random weights; outputs are logits."""
    if name == "resnet20":
        return resnet20(input_shape, num_classes, width, bn_momentum, synchronized_bn)
    if name not in APPLICATIONS:
        raise ValueError(f"Unknown model {name!r}; expected one of {', '.join(MODELS)}.")
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
