"""TensorFlow side of `keras_clars.per_example_norms` (private).

Three parts:

1. `plan(model, optimizer)`: which trainable variable gets which norm, decided
   once per trace (clear errors for what cannot be computed).
2. `_Recorder`: while the training forward pass runs, each supported layer's
   `call` is replaced (on the instance, for that pass only) by one that runs
   the layer without its activation, records its input A and its
   pre-activation output Z, and applies the activation. The one
   `GradientTape` then gives dL/dW for the variables and D = dL/dZ for the
   recorded outputs in a single backward pass.
3. The per-layer maths: squared norms of the per-example terms A_i^T D_i
   (over the patches of example i for convolutions), explicit or in the Gram
   ("ghost norm") form, chosen per layer by a cost estimate.
"""

import keras
import tensorflow as tf
from keras import ops

from keras_clars.layerwise import apply_with_sample_norms, inner_optimizer

# Above this many float32 elements per chunk, the batch is processed in
# chunks (patches, per-example gradients or Gram matrices).
CHUNK_ELEMENTS = 1 << 26  # 256 MiB of float32

_DENSE = keras.layers.Dense
_CONV2D = keras.layers.Conv2D
_DEPTHWISE = keras.layers.DepthwiseConv2D
_BATCH_NORM = keras.layers.BatchNormalization
SUPPORTED = (_DENSE, _CONV2D, _DEPTHWISE)


def _base_of(layer):
    for base in SUPPORTED:
        if isinstance(layer, base):
            return base
    return None


def unsupported_reason(layer):
    """Why `layer` is outside the supported set, or None if it is supported."""
    base = _base_of(layer)
    if base is None:
        return f"{type(layer).__name__} is not one of Dense, Conv2D, DepthwiseConv2D"
    if type(layer).call is not base.call:
        return f"{type(layer).__name__} overrides {base.__name__}.call"
    if getattr(layer, "quantization_mode", None) is not None:
        return "quantized layers are not supported"
    if getattr(layer, "lora_enabled", False):
        return "LoRA layers are not supported"
    if getattr(layer, "kernel_regularizer", None) is not None:
        return (
            "a kernel_regularizer adds a gradient that belongs to no example "
            "(use the optimizer's coupled weight_decay instead)"
        )
    if base is _CONV2D and getattr(layer, "rank", 2) != 2:
        return f"{type(layer).__name__} of rank {layer.rank} is not supported"
    return None


def _own_variables(layer):
    return list(getattr(layer, "_trainable_variables", []))


def _is_adapted(optimizer, variable):
    check = getattr(optimizer, "_is_layer_adapted", None)
    if check is None:
        return len(variable.shape) > 1
    return bool(check(variable))


class Plan:
    """Per trainable variable: ("kernel"|"bias", layer) or None (plain norm)."""

    def __init__(self, kinds, layers):
        self.kinds = kinds
        self.layers = layers  # the supported layers to record, in order


def plan(model, optimizer):
    """Decides which norm each of `model.trainable_variables` gets.

    Raises:
        ValueError: a layer-adapted variable whose per-example norm cannot be
            computed (unsupported layer, BatchNorm gamma/beta, regularized
            kernel), naming the layer and the alternative.
    """
    inner = inner_optimizer(optimizer)
    owner = {}
    for layer in model._flatten_layers(include_self=False, recursive=True):
        for variable in _own_variables(layer):
            owner.setdefault(id(variable), layer)
    kinds, layers = [], []
    for variable in model.trainable_variables:
        if not _is_adapted(inner, variable):
            kinds.append(None)
            continue
        layer = owner.get(id(variable))
        path = getattr(variable, "path", variable.name)
        if layer is None:
            raise ValueError(
                "Every layer-adapted variable must belong to a layer of the "
                "model, whose input and output per_example_norms can reach; "
                f"received variable={path!r}, owned by no layer. "
                + _ALTERNATIVE
            )
        if isinstance(layer, _BATCH_NORM):
            raise ValueError(
                "BatchNormalization gamma and beta must be excluded from layer "
                "adaptation (the default for rank-1 variables) to use "
                "per_example_norms; received variable="
                f"{path!r} of layer {layer.name!r}, un-excluded. "
                + _ALTERNATIVE
            )
        reason = unsupported_reason(layer)
        if reason is not None:
            raise ValueError(
                "Layers with layer-adapted variables must be Dense, Conv2D or "
                "DepthwiseConv2D to use per_example_norms; received layer="
                f"{layer.name!r} ({type(layer).__name__}; {reason}), "
                f"variable={path!r}. Exclude it from layer adaptation, or "
                + _ALTERNATIVE[0].lower() + _ALTERNATIVE[1:]
            )
        is_kernel = len(variable.shape) > 1
        kinds.append(("kernel" if is_kernel else "bias", layer))
        if all(layer is not other for other in layers):
            layers.append(layer)
    return Plan(kinds, layers)


_ALTERNATIVE = (
    "Use micro-batch samples instead: CLARS without per_example_norms, with "
    "gradient_accumulation_steps=k and/or several replicas (S = R * k samples)."
)


# ------------------------------------------------------------------ hooks


class _Recorder:
    """Records (A, Z) of each supported layer during one forward pass."""

    def __init__(self, layers):
        self.layers = layers
        self.records = {}  # id(layer) -> (layer, A, Z)

    def _hook(self, layer):
        original = layer.call

        def call(*args, **kwargs):
            if args:
                inputs = args[0]
            else:
                inputs = kwargs["inputs"]
            activation = layer.__dict__.get("activation")
            object.__setattr__(layer, "activation", None)
            try:
                z = original(*args, **kwargs)
            finally:
                object.__setattr__(layer, "activation", activation)
            if id(layer) in self.records:
                raise ValueError(
                    "Layers must be called once per forward pass to use "
                    f"per_example_norms; received layer={layer.name!r}, "
                    "called more than once (shared weights). " + _ALTERNATIVE
                )
            self.records[id(layer)] = (layer, inputs, z)
            return activation(z) if activation is not None else z

        return call

    def __enter__(self):
        for layer in self.layers:
            object.__setattr__(layer, "call", self._hook(layer))
        return self

    def __exit__(self, *exc):
        for layer in self.layers:
            if "call" in layer.__dict__:
                object.__delattr__(layer, "call")
        return False


# ------------------------------------------------------------------ maths


def _f32(x):
    return tf.cast(x, tf.float32)


def _static(dim):
    return None if dim is None else int(dim)


def choose(tokens, k, c):
    """'ghost' or 'explicit': the cheaper per-example form for one layer.

    Per example, the explicit form A_i^T D_i costs about T * K * C
    multiply-adds (and B * K * C memory); the Gram form
    sum_{t,t'} (a_t . a_t') (d_t . d_t') costs T^2 * (K + C) (and B * T^2).
    Unknown T (dynamic spatial shape) takes the explicit form.
    """
    if tokens is None:
        return "explicit"
    explicit = tokens * k * c
    ghost = tokens * tokens * (k + c)
    return "ghost" if ghost < explicit else "explicit"


def _chunked(fn, tensors, per_example_elements):
    """fn(*tensors) -> [b], run over chunks of the batch when memory is high."""
    if not per_example_elements:
        return fn(*tensors)
    size = max(CHUNK_ELEMENTS // max(per_example_elements, 1), 1)
    batch = tf.shape(tensors[0])[0]
    static_batch = tensors[0].shape[0]
    if static_batch is not None and static_batch <= size:
        return fn(*tensors)

    def run_all():
        chunks = (batch + size - 1) // size
        pad = chunks * size - batch
        padded = [
            tf.reshape(
                tf.pad(t, [[0, pad]] + [[0, 0]] * (t.shape.rank - 1)),
                tf.concat([[chunks, size], tf.shape(t)[1:]], 0),
            )
            for t in tensors
        ]
        out = tf.map_fn(
            lambda xs: fn(*xs),
            tuple(padded),
            fn_output_signature=tf.TensorSpec([size], tf.float32),
        )
        return tf.reshape(out, [-1])[:batch]

    return tf.cond(batch <= size, lambda: fn(*tensors), run_all)


def _token_norms(a, d, mode):
    """||A_i^T D_i||^2 for a [b, T, K], d [b, T, C] (both float32)."""
    if mode == "ghost":
        ga = tf.matmul(a, a, transpose_b=True)
        gd = tf.matmul(d, d, transpose_b=True)
        return tf.reduce_sum(ga * gd, axis=[1, 2])
    g = tf.matmul(a, d, transpose_a=True)
    return tf.reduce_sum(tf.square(g), axis=[1, 2])


def _grouped_token_norms(a, d, mode):
    """The same for a [b, T, G, K], d [b, T, G, C]: summed over groups."""
    if mode == "ghost":
        ga = tf.einsum("btgk,bsgk->bgts", a, a)
        gd = tf.einsum("btgc,bsgc->bgts", d, d)
        return tf.reduce_sum(ga * gd, axis=[1, 2, 3])
    g = tf.einsum("btgk,btgc->bgkc", a, d)
    return tf.reduce_sum(tf.square(g), axis=[1, 2, 3])


def _bias_norms(d):
    """||sum_t D_i(t)||^2 for d [b, ..., C]."""
    rank = d.shape.rank
    if rank > 2:
        d = tf.reduce_sum(d, axis=list(range(1, rank - 1)))
    return tf.reduce_sum(tf.square(d), axis=-1)


def _channels_last(layer, x):
    if getattr(layer, "data_format", "channels_last") == "channels_first":
        return tf.transpose(x, [0, 2, 3, 1])
    return x


def _patches(layer, a):
    """The receptive fields of each output position: [b, Ho, Wo, kh*kw*Cin]."""
    kh, kw = layer.kernel_size
    sh, sw = layer.strides
    dh, dw = layer.dilation_rate
    if kh == kw == 1:
        return a[:, ::sh, ::sw, :]
    return tf.image.extract_patches(
        a,
        sizes=[1, kh, kw, 1],
        strides=[1, sh, sw, 1],
        rates=[1, dh, dw, 1],
        padding=layer.padding.upper(),
    )


def _shifts(layer, a, out_h, out_w):
    """The kh*kw shifted (strided, dilated) views of `a`, each [b, Ho, Wo, Cin].

    Row t of view p is the input under kernel tap p at output position t:
    the patches of `a` without building them (im2col would copy the input
    kh*kw times at once; here one view at a time, with TensorFlow's 'same'
    padding). Needs static spatial shapes.
    """
    kh, kw = layer.kernel_size
    sh, sw = layer.strides
    dh, dw = layer.dilation_rate
    if layer.padding == "same":
        pads = []
        for size, out, k, s, d in ((a.shape[1], out_h, kh, sh, dh),
                                   (a.shape[2], out_w, kw, sw, dw)):
            total = max((out - 1) * s + (k - 1) * d + 1 - int(size), 0)
            pads.append([total // 2, total - total // 2])
        if any(p for pair in pads for p in pair):
            a = tf.pad(a, [[0, 0]] + pads + [[0, 0]])
    for i in range(kh):
        for j in range(kw):
            yield a[:, i * dh:i * dh + (out_h - 1) * sh + 1:sh,
                    j * dw:j * dw + (out_w - 1) * sw + 1:sw, :]


def _static_spatial(a, d):
    dims = (a.shape[1], a.shape[2], d.shape[1], d.shape[2])
    return all(x is not None for x in dims)


def layer_plan(layer, a_shape, d_shape):
    """(form, tokens, K, C) of one layer, from static shapes (trace time)."""
    cout = _static(d_shape[-1])
    if isinstance(layer, _DENSE):
        k = _static(a_shape[-1])
        if len(a_shape) == 2:
            return "outer", 1, k, cout
        tokens = 1
        for dim in a_shape[1:-1]:
            tokens = None if dim is None or tokens is None else tokens * int(dim)
        return choose(tokens, k, cout), tokens, k, cout
    channels_first = getattr(layer, "data_format", "") == "channels_first"
    spatial = d_shape[2:] if channels_first else d_shape[1:-1]
    cout = _static(d_shape[1] if channels_first else d_shape[-1])
    cin = _static(a_shape[1] if channels_first else a_shape[-1])
    tokens = None
    if all(s is not None for s in spatial):
        tokens = int(spatial[0]) * int(spatial[1])
    kh, kw = layer.kernel_size
    if isinstance(layer, _DEPTHWISE):
        return "depthwise", tokens, kh * kw, cout
    groups = getattr(layer, "groups", 1)
    k = kh * kw * cin // groups
    return choose(tokens, k, cout // groups), tokens, k, cout // groups


def squared_norms(layer, a, d, want_kernel, want_bias):
    """Per-example squared norms of A_i^T D_i (kernel) and sum_t D_i (bias).

    Returns `(kernel, bias)`, each a float32 [b] tensor or None.
    """
    a, d = _f32(a), _f32(d)
    form, tokens, k, c = layer_plan(layer, a.shape, d.shape)
    kernel = bias = None
    if isinstance(layer, _DENSE):
        if want_bias:
            bias = _bias_norms(d)
        if not want_kernel:
            return kernel, bias
        if form == "outer":
            kernel = tf.reduce_sum(tf.square(a), -1) * tf.reduce_sum(tf.square(d), -1)
            return kernel, bias
        batch = tf.shape(a)[0]
        a = tf.reshape(a, [batch, -1, a.shape[-1]])
        d = tf.reshape(d, [batch, -1, d.shape[-1]])
        kernel = _chunked(
            lambda a, d: _token_norms(a, d, form), [a, d], _memory(form, tokens, k, c)
        )
        return kernel, bias
    a, d = _channels_last(layer, a), _channels_last(layer, d)
    if want_bias:
        bias = _bias_norms(d)
    if not want_kernel:
        return kernel, bias
    per_example = (tokens or 1) * (k + c) + _memory(form, tokens, k, c)
    if isinstance(layer, _DEPTHWISE):
        kk = layer.kernel_size[0] * layer.kernel_size[1]
        cin = a.shape[-1]
        mult = layer.depth_multiplier

        def depthwise(a, d):
            b = tf.shape(a)[0]
            dd = tf.reshape(d, [b, -1, cin, mult])
            if _static_spatial(a, d):
                total = 0.0
                for view in _shifts(layer, a, d.shape[1], d.shape[2]):
                    view = tf.reshape(view, [b, -1, cin, 1])
                    g = tf.reduce_sum(view * dd, axis=1)  # [b, cin, mult]
                    total += tf.reduce_sum(tf.square(g), axis=[1, 2])
                return total
            p = tf.reshape(_patches(layer, a), [b, -1, kk, cin])
            g = tf.einsum("btpc,btcm->bpcm", p, dd)
            return tf.reduce_sum(tf.square(g), axis=[1, 2, 3])

        per_example = (tokens or 1) * (kk * cin + cin * mult) + kk * cin * mult
        return _chunked(depthwise, [a, d], per_example), bias
    groups = layer.groups
    kk = layer.kernel_size[0] * layer.kernel_size[1]
    cin = a.shape[-1]

    def conv(a, d):
        b = tf.shape(a)[0]
        if _static_spatial(a, d):
            views = [tf.reshape(v, [b, -1, cin])
                     for v in _shifts(layer, a, d.shape[1], d.shape[2])]
            dd = tf.reshape(d, [b, -1, d.shape[-1]])
            if groups > 1:
                views = [tf.reshape(v, [b, -1, groups, cin // groups])
                         for v in views]
                dd = tf.reshape(dd, [b, -1, groups, c])
            if form == "ghost":
                # A_i A_i^T = sum over taps of view_p view_p^T.
                if groups == 1:
                    ga = tf.add_n([tf.matmul(v, v, transpose_b=True)
                                   for v in views])
                    gd = tf.matmul(dd, dd, transpose_b=True)
                    return tf.reduce_sum(ga * gd, axis=[1, 2])
                ga = tf.add_n([tf.einsum("btgk,bsgk->bgts", v, v) for v in views])
                gd = tf.einsum("btgc,bsgc->bgts", dd, dd)
                return tf.reduce_sum(ga * gd, axis=[1, 2, 3])
            # Each tap's block of the kernel gradient is separate.
            if groups == 1:
                return tf.add_n([_token_norms(v, dd, "explicit") for v in views])
            return tf.add_n([_grouped_token_norms(v, dd, "explicit")
                             for v in views])
        p = _patches(layer, a)
        if groups == 1:
            p = tf.reshape(p, [b, -1, p.shape[-1]])
            return _token_norms(p, tf.reshape(d, [b, -1, d.shape[-1]]), form)
        p = tf.reshape(p, [b, -1, kk, groups, cin // groups])
        p = tf.reshape(tf.transpose(p, [0, 1, 3, 2, 4]), [b, -1, groups, k])
        dd = tf.reshape(d, [b, -1, groups, c])
        return _grouped_token_norms(p, dd, form)

    return _chunked(conv, [a, d], per_example), bias


def _memory(form, tokens, k, c):
    """float32 elements per example of the form's intermediate."""
    if form == "ghost":
        return (tokens or 1) ** 2
    if form == "explicit":
        return k * c + (tokens or 1) * k
    return 0


# ------------------------------------------------------------- train step


def sample_norms(model, plan_, records, grads, ds):
    """The `sample_norms` for `apply_with_sample_norms`, one per variable,
    on the scale of `grads` (it undoes 1/R and the loss scale on both)."""
    by_layer = {}
    for (layer, a, z), d in zip(records, ds):
        wanted = {k[0] for k in plan_.kinds if k is not None and k[1] is layer}
        if d is None:
            zero = tf.zeros(tf.shape(a)[:1], tf.float32)
            by_layer[id(layer)] = (zero, zero)
            continue
        by_layer[id(layer)] = squared_norms(
            layer, a, d, "kernel" in wanted, "bias" in wanted
        )
    norms = []
    for kind, grad in zip(plan_.kinds, grads):
        if kind is None:
            if grad is None:
                norms.append(tf.zeros((), tf.float32))
                continue
            if isinstance(grad, tf.IndexedSlices):
                grad = tf.convert_to_tensor(grad)
            norm = tf.norm(tf.reshape(_f32(grad), [-1]))
            norms.append(norm)
            continue
        which, layer = kind
        kernel, bias = by_layer[id(layer)]
        squared = kernel if which == "kernel" else bias
        # ||A_i^T D_i||; D already holds the 1/B of the mean loss.
        per_example = tf.sqrt(tf.maximum(squared, 0.0))
        # c_i = B * A_i^T D_i, so (1/B) * sum_i ||c_i|| = sum_i ||A_i^T D_i||.
        mean = tf.reduce_sum(per_example)
        norms.append(mean)
    return norms


def train_step(model, data, plan_):
    """Keras's TensorFlow train step, plus the per-example norms."""
    from keras.src import tree
    from keras.src.losses import loss as loss_module

    optimizer = model.optimizer
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    recorder = _Recorder(plan_.layers)
    with tf.GradientTape() as tape:
        with recorder:
            if model._call_has_training_arg:
                y_pred = model(x, training=True)
            else:
                y_pred = model(x)
        loss = model._compute_loss(
            x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
        )
        model._loss_tracker.update_state(
            loss_module.unscale_loss_for_distribution(loss),
            sample_weight=tf.shape(
                next(i for i in tree.flatten(x) if i is not None)
            )[0],
        )
        loss = optimizer.scale_loss(loss)
    records = []
    for layer in plan_.layers:
        if id(layer) not in recorder.records:
            raise ValueError(
                "Every layer with layer-adapted variables must be called in "
                "the model's forward pass, where per_example_norms records "
                f"its input and output; received layer={layer.name!r}, not "
                "reached (its variables are used some other way). "
                + _ALTERNATIVE
            )
        records.append(recorder.records[id(layer)])
    variables = model.trainable_weights
    outputs = tape.gradient(loss, list(variables) + [z for _, _, z in records])
    grads, ds = outputs[: len(variables)], outputs[len(variables):]
    norms = sample_norms(model, plan_, records, grads, ds)
    apply_with_sample_norms(optimizer, grads, variables, norms)
    return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
