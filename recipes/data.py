"""Input pipelines of the recipes: tf.data, batched at the global micro-batch.

Two augmentation recipes, chosen by the dataset's native image size:

- ImageNet (larger than 32 px): random resized crop (8%-100% of the area,
  aspect ratio 3/4-4/3) and horizontal flip for training; resize to
  size / 0.875 and center crop for evaluation.
- 28-32 px datasets (Fashion-MNIST, CIFAR): pad 4 pixels with zeros, random
  crop back and horizontal flip (He et al. 2016, section 4.2); no
  augmentation for evaluation. A random resized crop would throw away most
  of a 28 px image. It runs on whole batches, so it costs little CPU.

`augment=False` turns augmentation off (the evidence study trains without
it); training batches then get the evaluation preprocessing.

Pixels are scaled to [0, 1] and standardized with the dataset's channel mean
and standard deviation (the recipes' one normalisation); labels are one-hot.
A small image asked for at a side that divides its native side is average-
pooled (Fashion-MNIST at 14: 2x2 pooling of the 28x28 images), otherwise
resized bilinearly. The training dataset repeats forever (`model.fit` is
given `steps_per_epoch`) and is batched at the global micro-batch;
`model.fit` splits each batch over the replicas of the strategy.

A validation split (`load(..., validation_examples=N)`, Fashion-MNIST only)
holds out N training examples chosen by a permutation with its own seed
(`VALIDATION_SEED`, independent of a run's seed): split `"train"` is the
rest, split `"validation"` the N held out; `"eval"` stays the test split.
"""

import functools

import numpy as np
import tensorflow as tf

from recipes import fashion_mnist as fashion

DATASETS = ("fashion_mnist", "cifar10", "cifar100", "imagenet2012")
# (eval split, channel mean, channel std); the train split is "train".
_STATS = {
    "fashion_mnist": ("test", (0.2860,), (0.3530,)),
    "cifar10": ("test", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ("test", (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet2012": ("validation", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
SMALL_PAD = 4
EVAL_CROP = 0.875
SPLITS = ("train", "validation", "eval")
# The permutation that holds out the validation examples: fixed, and not a
# run's --seed, so every run of a study sees the same split.
VALIDATION_SEED = 1234


class Source:
    """One split of a dataset: unbatched (uint8 image, int label) examples.

    Attributes:
        dataset: the `tf.data.Dataset` of examples.
        num_examples: the split's size, or None when unknown (mocked tfds).
        num_classes: number of labels.
        native_size: the images' side, or None when it varies (ImageNet).
        channels: image channels.
        replayable: the examples come in the same order in every process
            (in-memory arrays), so a resumed run can replay its data order;
            tfds reads its files in an unseeded order.
    """

    def __init__(self, dataset, num_examples, num_classes, native_size, channels,
                 replayable=False):
        self.dataset = dataset
        self.replayable = replayable
        self.num_examples = num_examples
        self.num_classes = num_classes
        self.native_size = native_size
        self.channels = channels


def _check_name(name):
    if name not in DATASETS:
        raise ValueError(
            f"Unknown dataset {name!r}; expected one of {', '.join(DATASETS)}."
        )


@functools.lru_cache(maxsize=4)
def _fashion_arrays(split, data_dir):
    images, labels = fashion.load_fashion_mnist(split, data_dir)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def validation_indices(total, validation_examples, seed=VALIDATION_SEED):
    """(train, validation) index arrays: a fixed permutation of `total`."""
    if not 0 <= validation_examples < total:
        raise ValueError(
            f"--validation_examples must be in [0, {total}); received "
            f"{validation_examples}."
        )
    order = np.random.default_rng(seed).permutation(total)
    return order[validation_examples:], order[:validation_examples]


def load(name, split, data_dir=None, download=False, validation_examples=0,
         train_examples=0):
    """Loads split `"train"`, `"validation"` or `"eval"` of a dataset.

    Args:
        name: one of `DATASETS`.
        split: `"train"`, `"validation"` (held out of the training split;
            needs `validation_examples`) or `"eval"` (the test split;
            ImageNet's validation split).
        data_dir: tfds's data folder, or the folder of the Fashion-MNIST
            files; None for the default.
        download: let tensorflow-datasets download and prepare the data.
        validation_examples: training examples held out for validation
            (Fashion-MNIST only); 0: none.
        train_examples: keep only the first N training examples (after the
            hold-out; for tiny test runs); 0: all.

    Returns:
        A `Source`.

    Raises:
        FileNotFoundError: the data is not there (and `download` is off), with
            instructions. It is raised before anything is read or built.
    """
    _check_name(name)
    if split not in SPLITS:
        raise ValueError(
            f"split must be one of {', '.join(SPLITS)}; received split={split!r}."
        )
    if (validation_examples or train_examples) and name != "fashion_mnist":
        raise ValueError(
            "--validation_examples and --train_examples need --dataset="
            f"fashion_mnist; received --dataset={name}."
        )
    if split == "validation" and not validation_examples:
        raise ValueError("split='validation' needs validation_examples > 0.")
    eval_split = _STATS[name][0]
    if name == "fashion_mnist":
        images, labels = _fashion_arrays(
            "test" if split == "eval" else "train",
            data_dir or fashion.FASHION_MNIST_DIR,
        )
        if split != "eval":
            kept, held = validation_indices(len(images), validation_examples)
            if split == "validation":
                kept = held
            elif train_examples:
                kept = kept[:train_examples]
            images, labels = images[kept], labels[kept]
        dataset = tf.data.Dataset.from_tensor_slices(
            (images[..., np.newaxis], labels.astype(np.int32))
        )
        return Source(dataset, len(images), 10, 28, 1, replayable=True)

    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir)
    if download:
        builder.download_and_prepare()
    tfds_split = "train" if split == "train" else eval_split
    try:
        # The same check as tfds.load (is the prepared data_dir/name/version
        # there?), made through the builder so tfds.testing.mock_data applies.
        dataset = builder.as_dataset(
            split=tfds_split, as_supervised=True, shuffle_files=split == "train"
        )
    except AssertionError as error:
        manual = (
            " (ImageNet: first place its archives by hand in "
            "<data_dir>/downloads/manual)" if name == "imagenet2012" else ""
        )
        raise FileNotFoundError(
            f"Dataset {name} version {builder.version} is not prepared in "
            f"{builder.data_dir}. Pass --data_dir=<folder holding "
            f"{name}/{builder.version}>, or --download to let "
            f"tensorflow-datasets download and prepare it{manual}; see "
            f"https://www.tensorflow.org/datasets/catalog/{name}."
        ) from error
    image = builder.info.features["image"]
    try:
        num_examples = int(builder.info.splits[tfds_split].num_examples)
    except KeyError:  # tfds.testing.mock_data: split sizes are not known.
        num_examples = None
    native = image.shape[0] if image.shape[0] == image.shape[1] else None
    return Source(
        dataset, num_examples, builder.info.features["label"].num_classes,
        native, image.shape[-1],
    )


def _normalize(name, images):
    _, mean, std = _STATS[name]
    images = tf.cast(images, tf.float32) / 255.0
    return (images - tf.constant(mean)) / tf.constant(std)


def pad_crop_flip(images, pad=SMALL_PAD):
    """Random pad-and-crop plus horizontal flip of a whole batch (NHWC)."""
    shape = tf.shape(images)
    n, h, w = shape[0], shape[1], shape[2]
    padded = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
    dy = tf.random.uniform([n], 0, 2 * pad + 1, dtype=tf.int32)
    dx = tf.random.uniform([n], 0, 2 * pad + 1, dtype=tf.int32)
    rows = dy[:, None] + tf.range(h)[None, :]
    cols = dx[:, None] + tf.range(w)[None, :]
    out = tf.gather(padded, rows, axis=1, batch_dims=1)
    out = tf.gather(out, cols, axis=2, batch_dims=1)
    flip = tf.random.uniform([n]) < 0.5
    return tf.where(flip[:, None, None, None], tf.reverse(out, [2]), out)


def random_resized_crop(image, size, area=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """Inception-style crop of one image, resized to `size` and maybe flipped."""
    begin, crop, _ = tf.image.sample_distorted_bounding_box(
        tf.shape(image),
        bounding_boxes=tf.zeros([1, 0, 4]),
        area_range=area,
        aspect_ratio_range=ratio,
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    image = tf.slice(image, begin, crop)
    image = tf.image.resize(image, [size, size])
    return tf.image.random_flip_left_right(image)


def center_crop(image, size, fraction=EVAL_CROP):
    """Resizes the shorter side to size / fraction and crops the center."""
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = (size / fraction) / tf.reduce_min(shape)
    resized = tf.cast(tf.round(shape * scale), tf.int32)
    image = tf.image.resize(image, resized)
    top = (resized[0] - size) // 2
    left = (resized[1] - size) // 2
    return tf.image.crop_to_bounding_box(image, top, left, size, size)


def resize_or_pool(images, image_size, native_size):
    """Average-pools by an integer factor when it divides; otherwise resizes."""
    if image_size == native_size:
        return images
    if native_size and image_size < native_size and native_size % image_size == 0:
        factor = native_size // image_size
        return tf.nn.avg_pool2d(images, factor, factor, "VALID")
    return tf.image.resize(images, [image_size, image_size])


def pipeline(name, source, batch_size, image_size, training, shuffle_buffer=None,
             seed=None, augment=True, skip=0):
    """Batches a `Source` for `model.fit` / `model.evaluate`.

    Args:
        name: the dataset's name (selects the normalization).
        source: a `Source` from `load`.
        batch_size: the global (micro-)batch: per-replica batch * replicas.
        image_size: the side of the model's input.
        training: augment, shuffle, repeat forever and drop the remainder.
        shuffle_buffer: examples in the shuffle buffer; None: the whole
            split for 28-32 px datasets, 16384 for ImageNet.
        seed: the shuffle's seed (None: the global seed).
        augment: augment training batches (see the module docstring).
        skip: leave out the first `skip` batches, after the shuffle and the
            augmentation have drawn their random numbers for them: a run
            resumed at micro-step `skip` sees the batches, in the same order
            and with the same augmentation, that the uninterrupted run sees
            from there (with deterministic ops, which make the random draws
            sequential). It replays the input pipeline to that point.
    """
    dataset = source.dataset
    classes = source.num_classes
    small = source.native_size is not None and source.native_size <= 32
    if training:
        if shuffle_buffer is None:
            shuffle_buffer = source.num_examples if small and source.num_examples else 16384
        buffer = min(shuffle_buffer, source.num_examples or shuffle_buffer)
        dataset = dataset.shuffle(buffer, seed=seed).repeat()

    def finish(images, labels):
        images = _normalize(name, images)
        if small:
            images = resize_or_pool(images, image_size, source.native_size)
        return images, tf.one_hot(labels, classes)

    if small:
        dataset = dataset.batch(batch_size, drop_remainder=training)
        if training and augment:
            dataset = dataset.map(
                lambda x, y: (pad_crop_flip(x), y), num_parallel_calls=tf.data.AUTOTUNE
            )
    else:
        crop = (
            (lambda x, y: (random_resized_crop(x, image_size), y))
            if training and augment
            else (lambda x, y: (center_crop(x, image_size), y))
        )
        dataset = dataset.map(crop, num_parallel_calls=tf.data.AUTOTUNE)
        dataset = dataset.batch(batch_size, drop_remainder=training)
    if skip:
        dataset = dataset.skip(skip)
    dataset = dataset.map(finish, num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.prefetch(tf.data.AUTOTUNE)
