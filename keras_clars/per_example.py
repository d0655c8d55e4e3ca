"""Exact per-example complete norms for CLARS: `per_example_norms(model)`."""

import contextlib

import keras

from keras_clars.layerwise import inner_optimizer


def _takes_samples(optimizer):
    """CLARS (its complete norm), or any optimizer with `noise_scale=True`."""
    inner = inner_optimizer(optimizer)
    return bool(getattr(inner, "uses_complete_norm", False)
                or getattr(inner, "noise_scale", False))


def _backend_step():
    """The per-example train step of the current backend."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        from keras_clars._per_example_tf import train_step
    elif backend == "jax":
        from keras_clars._per_example_jax import train_step
    elif backend == "torch":
        from keras_clars._per_example_torch import train_step
    else:
        raise ValueError(
            "per_example_norms must run on the TensorFlow, JAX or PyTorch "
            f"backend; received backend={backend!r}. Use micro-batch samples "
            "instead (gradient_accumulation_steps or several replicas)."
        )
    return train_step


@keras.saving.register_keras_serializable(package="keras_clars")
class PerExampleNormModel(keras.Model):
    """A model whose training step gives CLARS per-example sample norms.

    Built by `per_example_norms(model)`; see its docstring. It holds the
    wrapped model as `base_model` and shares its layers and weights:
    `call` delegates to it, and `trainable_variables` are the wrapped
    model's, in the same order. Inside `recording(recorder)` (the
    per-example training steps), `call` runs the base model's graph through
    the recorder instead, which gives the same outputs.
    """

    def __init__(self, base_model, **kwargs):
        # The wrapped model's policy: under mixed_float16, `compile` then
        # wraps the optimizer in a LossScaleOptimizer as for `base_model`.
        kwargs.setdefault("dtype", base_model.dtype_policy)
        super().__init__(**kwargs)
        self.base_model = base_model
        self._recorder = None
        if getattr(base_model, "built", False):
            self.built = True

    @contextlib.contextmanager
    def recording(self, recorder):
        """While active, `call` runs `base_model` by `recorder.forward`,
        which records the target layers' inputs and outputs
        (`_per_example_norms.Recorder`). `call` reads the recorder once,
        when it starts."""
        self._recorder = recorder
        try:
            yield recorder
        finally:
            self._recorder = None

    def call(self, inputs, training=None, mask=None):
        if self._recorder is not None:
            return self._recorder.forward(self.base_model, inputs, mask=mask,
                                          training=training)
        if mask is None:
            return self.base_model(inputs, training=training)
        return self.base_model(inputs, training=training, mask=mask)

    def build(self, input_shape=None):
        if not self.base_model.built and input_shape is not None:
            self.base_model.build(input_shape)
        self.built = True

    def compute_output_spec(self, inputs, *args, **kwargs):
        return self.base_model.compute_output_spec(inputs, *args, **kwargs)

    def train_step(self, *args):
        # TensorFlow and PyTorch: (data); JAX: (state, data).
        if self.optimizer is None or not _takes_samples(self.optimizer):
            # LARS without the noise scale and Keras's optimizers take no
            # sample norms: Keras's step.
            return super().train_step(*args)
        from keras_clars import _per_example_norms

        targets = _per_example_norms.find_targets(
            self, inner_optimizer(self.optimizer))
        return _backend_step()(self, *args, targets)

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "base_model": keras.saving.serialize_keras_object(self.base_model),
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        base_model = keras.saving.deserialize_keras_object(
            config.pop("base_model"), custom_objects=custom_objects
        )
        return cls(base_model, **config)


def per_example_norms(model):
    """Wraps `model` so that CLARS's samples are single examples (S = B).

    CLARS's complete norm is N_l = (1/S) * sum_s ||g_{s,l}||. Without this
    wrapper the samples are micro-batches (one per replica and accumulation
    step). With it, each example of the batch is a sample, the paper's ideal:

        L       = (1/B) * sum_i loss_i                (the local mean loss)
        D       = dL/dZ    for a layer Z = A W (+ b)  (one backward pass)
        c_{i,l} = B * A_i^T D_i                        (example i's sample)
        g_l     = (1/B) * sum_i c_{i,l}                (the batch gradient)
        N_l     = (1/B) * sum_i ||c_{i,l}||

    For a convolution, A_i are the patches (receptive fields) of example i,
    one row per output position t, so A_i^T D_i = sum_t a_t d_t^T. Each
    example's norm is computed without materialising all the per-example
    gradients of the model: per layer, either

    - explicitly, ||A_i^T D_i||_F (cost T*K*C per example, B*K*C memory), or
    - in the Gram ("ghost norm") form
      ||A_i^T D_i||_F^2 = sum_{t,t'} (a_t . a_t') (d_t . d_t')
      (cost T^2 * (K + C) per example, B*T^2 memory),

    whichever is cheaper for that layer's T (output positions), K (kernel
    inputs) and C (outputs); a Dense layer on 2-D inputs needs neither:
    ||a_i d_i^T|| = ||a_i|| * ||d_i||. The batch is processed in chunks when
    an intermediate would exceed 256 MiB.

    Without BatchNorm, c_{i,l} is exactly the gradient of loss_i alone. With
    BatchNorm in training mode, D carries the batch statistics'
    cross-example terms and c_{i,l} is example i's *contribution* to the
    batch gradient (they still average to g_l): that is the definition.

    Supported: Dense, Conv2D (strides, dilation, 'same'/'valid' padding,
    groups, either data format) and DepthwiseConv2D. Their rank-1 biases
    get per-example norms (||B * sum_t D_i(t)||) only when un-excluded from
    layer adaptation; otherwise, like every variable excluded from layer
    adaptation (whose N_l does not enter the update), they get the norm of
    the replica's mean gradient. A layer-adapted variable elsewhere
    (Conv1D, Conv3D, Embedding, a custom layer, BatchNorm's gamma/beta
    un-excluded, a kernel with a `kernel_regularizer`, a layer called
    twice or inside another layer's `call`) raises a `ValueError` naming
    the layer and the alternative (micro-batch samples:
    `gradient_accumulation_steps` or replicas) when the training step is
    first traced (the first `fit` or `train_on_batch`); so does a
    subclassed model.

    How the layers' inputs and outputs are recorded: Keras 3 has no
    forward hooks, and the wrapper does not patch layers. During the
    training step it runs the model's own graph, as `Functional.call`
    does (every layer called by Keras as usual, nested Functional and
    Sequential models included), and records each layer's input A and
    output. A linear layer's output is Z; for a layer with an activation,
    Z is recomputed from A (one more matrix product or convolution) and
    the activation's derivative is applied to dL/d(output) in the same
    backward pass.

    The wrapper works with `compile`, `fit`, `evaluate`, callbacks,
    `model.save` / `keras.models.load_model`, gradient accumulation (N_l is
    the mean over the k * B examples of a window), mixed precision
    (`LossScaleOptimizer`: the norms are unscaled) and `tf.distribute`
    (each replica computes its own examples' norms; CLARS averages them
    over the global batch). The training step hands CLARS the norms with
    `keras_clars.apply_with_sample_norms`, which your own training step can
    call too. With LARS or a Keras optimizer the wrapper is a
    no-op: the training step is Keras's own; with `noise_scale=True` LARS
    gets the per-example squared norms for the noise scale
    (docs/noise_scale.md).

    Backends: TensorFlow, JAX and PyTorch. The norms need the gradients
    with respect to the layers' outputs from the same backward pass: from
    the `tf.GradientTape` on TensorFlow, from `torch.autograd.grad` on
    PyTorch, and on JAX from a zero tap added to each layer's output and
    differentiated with the weights. On JAX with a
    `keras.distribution.DataParallel` distribution, the norms are one per
    example of the global batch.

    Args:
        model: a Functional or Sequential Keras model to be trained with
            CLARS (a subclassed model's own `call` cannot be followed
            without hooks: it raises at the first step when CLARS needs
            the norms). Its layers and weights are shared, not copied.

    Returns:
        A `keras.Model` to compile and fit in place of `model`. Returns
        `model` itself if it is already wrapped.

    Raises:
        ValueError: on a backend other than TensorFlow, JAX and PyTorch,
            or if `model` is not a Keras model.

    Example:

        model = keras_clars.per_example_norms(model)
        model.compile(optimizer=keras_clars.CLARS(...), loss=...)
        model.fit(x, y, batch_size=256)

    References:
        - Goodfellow, "Efficient Per-Example Gradient Computations",
          arXiv:1510.01799 (2015).
        - Li, Tramer, Liang, Hashimoto, "Large Language Models Can Be
          Strong Differentially Private Learners", arXiv:2110.05679 (2021):
          ghost norms.
        - Rochette, Manoel, Tramel, "Efficient Per-Example Gradient
          Computations in Convolutional Neural Networks", arXiv:1912.06015
          (2019).
        - Opacus (Yousefpour et al., arXiv:2109.12298): GradSampleModule.
    """
    if keras.backend.backend() not in ("tensorflow", "jax", "torch"):
        _backend_step()  # raises, naming the backend
    if isinstance(model, PerExampleNormModel):
        return model
    if not isinstance(model, keras.Model):
        raise ValueError(
            "model must be a keras.Model; received "
            f"model={type(model).__name__}."
        )
    return PerExampleNormModel(model, name=f"{model.name}_per_example")


def norm_forms(model, batch_size):
    """How the per-example norms of each supported layer of `model` are
    computed at `batch_size`: {layer name: (form, T, K, C)}.

    `form` is "outer" (Dense on 2-D input), "explicit" or "gram" (see
    `per_example_norms`), T the layer's output positions, K its kernel
    inputs and C its outputs (per group). `model` must be built and
    functional (each layer's input and output shapes known).
    """
    from keras_clars import _per_example_norms

    forms = {}
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, _per_example_norms.SUPPORTED) and layer.trainable_weights:
            forms[layer.name] = _per_example_norms.layer_form(
                layer, (batch_size,) + tuple(layer.input.shape[1:]),
                (batch_size,) + tuple(layer.output.shape[1:]))
    return forms
