"""The backend-free part of `keras_clars.per_example_norms` (private).

Every backend computes the per-example norms from the same two tensors per
layer: its input A and D = dL/dZ, the gradient of the (local mean) loss with
respect to its pre-activation output Z. Only the way D is obtained in the
one backward pass differs (`_per_example_tf`, `_per_example_jax`,
`_per_example_torch`); everything here is `keras.ops`.

Words, each with one meaning:

- **target**: a trainable variable and the norm it gets: `("kernel",
  layer)`, `("bias", layer)`, or None (the norm of the replica's mean
  gradient, for variables excluded from layer adaptation). `find_targets`
  decides them once per trace, with clear errors for what cannot be
  computed; `Targets.layers` are the layers to record.
- **record**: one layer's input A and E, the tensor whose gradient is D
  (E = Z for a linear layer), kept while `Recorder` runs the model's own
  graph in the training forward pass (no layer is patched); then its
  (A, D).
- **kind**: the layer's class among Dense, Conv2D and DepthwiseConv2D; one
  function per kind computes its squared norms (`squared_norms`).
- **form**: how one example's squared norm ||A_i^T D_i||^2 is computed:
  `"outer"` (Dense on 2-D input: ||a_i||^2 ||d_i||^2), `"explicit"` (build
  A_i^T D_i) or `"gram"` (the "ghost norm", sum_{t,t'} (a_t . a_t')
  (d_t . d_t')). `choose` picks explicit or gram per layer by cost.
- **T, K, C**: a layer's output positions ("tokens"), kernel inputs and
  outputs per group.
"""

import keras
from keras import ops
from keras.src import backend, tree
from keras.src.models.functional import Functional, operation_fn, unpack_singleton

# Above this many float32 elements per chunk, the batch is processed in
# chunks (patches, per-example gradients or Gram matrices).
CHUNK_ELEMENTS = 1 << 26  # 256 MiB of float32

_DENSE = keras.layers.Dense
_CONV2D = keras.layers.Conv2D
_DEPTHWISE = keras.layers.DepthwiseConv2D
_BATCH_NORM = keras.layers.BatchNormalization
SUPPORTED = (_DENSE, _CONV2D, _DEPTHWISE)

ALTERNATIVE = (
    "Use micro-batch samples instead: CLARS without per_example_norms, with "
    "gradient_accumulation_steps=k and/or several replicas (S = R * k samples)."
)
# The same, to follow "..., or " inside a sentence.
OR_ALTERNATIVE = ALTERNATIVE[0].lower() + ALTERNATIVE[1:]


def _kind(layer):
    for kind in SUPPORTED:
        if isinstance(layer, kind):
            return kind
    return None


def unsupported_reason(layer):
    """Why `layer` is outside the supported set, or None if it is supported."""
    kind = _kind(layer)
    if kind is None:
        return f"{type(layer).__name__} is not one of Dense, Conv2D, DepthwiseConv2D"
    if type(layer).call is not kind.call:
        return f"{type(layer).__name__} overrides {kind.__name__}.call"
    if getattr(layer, "quantization_mode", None) is not None:
        return "quantized layers are not supported"
    if getattr(layer, "lora_enabled", False):
        return "LoRA layers are not supported"
    if getattr(layer, "kernel_regularizer", None) is not None:
        return (
            "a kernel_regularizer adds a gradient that belongs to no example "
            "(use the optimizer's coupled weight_decay instead)"
        )
    if kind is _CONV2D and getattr(layer, "rank", 2) != 2:
        return f"{type(layer).__name__} of rank {layer.rank} is not supported"
    return None


# ---------------------------------------------------------------- targets


class Targets:
    """Per trainable variable, its target; and the layers to record.

    `complete`: CLARS wants the sample norms (N_l) of its adapted
    variables; `noise`: the noise scale wants the per-example squared norms
    of every variable that has them (`adapted[j]` False: the noise scale's
    only).
    """

    def __init__(self, targets, layers, adapted, complete, noise):
        self.targets = targets  # ("kernel"|"bias", layer) or None, per variable
        self.layers = layers  # the supported layers to record, in order
        self.adapted = adapted
        self.complete = complete
        self.noise = noise


def _is_adapted(optimizer, variable):
    check = getattr(optimizer, "_is_layer_adapted", None)
    if check is None:
        return len(variable.shape) > 1
    return bool(check(variable))


def _owners(model):
    owner = {}
    for layer in model._flatten_layers(include_self=False, recursive=True):
        for variable in getattr(layer, "_trainable_variables", []):
            owner.setdefault(id(variable), layer)
    return owner


def find_targets(model, optimizer):
    """The target of each of `model.trainable_variables`, for `optimizer`
    (the CLARS, or LARS with `noise_scale=True`, itself, not a
    LossScaleOptimizer around it). With the noise scale, a variable that is
    not layer-adapted still gets a target if its layer is supported (else
    its sample is the replica's gradient).

    Raises:
        ValueError: a layer-adapted variable whose per-example norm cannot be
            computed (unsupported layer, BatchNorm gamma/beta, regularized
            kernel), naming the layer and the alternative.
    """
    owner = _owners(model)
    noise = bool(getattr(optimizer, "noise_scale", False))
    targets, layers, adapted = [], [], []
    for variable in model.trainable_variables:
        layer = owner.get(id(variable))
        adapted.append(_is_adapted(optimizer, variable))
        if adapted[-1]:
            _check_supported(variable, layer)
        elif not (noise and layer is not None and unsupported_reason(layer) is None):
            targets.append(None)
            continue
        targets.append(("kernel" if len(variable.shape) > 1 else "bias", layer))
        if all(layer is not other for other in layers):
            layers.append(layer)
    return Targets(targets, layers, adapted,
                   bool(getattr(optimizer, "uses_complete_norm", False)), noise)


def _check_supported(variable, layer):
    path = getattr(variable, "path", variable.name)
    if layer is None:
        raise ValueError(
            "Every layer-adapted variable must belong to a layer of the "
            "model, whose input and output per_example_norms can reach; "
            f"received variable={path!r}, owned by no layer. " + ALTERNATIVE
        )
    if isinstance(layer, _BATCH_NORM):
        raise ValueError(
            "BatchNormalization gamma and beta must be excluded from layer "
            "adaptation (the default for rank-1 variables) to use "
            "per_example_norms; received variable="
            f"{path!r} of layer {layer.name!r}, un-excluded. " + ALTERNATIVE
        )
    reason = unsupported_reason(layer)
    if reason is not None:
        raise ValueError(
            "Layers with layer-adapted variables must be Dense, Conv2D or "
            "DepthwiseConv2D to use per_example_norms; received layer="
            f"{layer.name!r} ({type(layer).__name__}; {reason}), "
            f"variable={path!r}. Exclude it from layer adaptation, or "
            + OR_ALTERNATIVE
        )


# ---------------------------------------------------------------- records


def _is_linear(layer):
    return layer.activation is None or layer.activation is keras.activations.linear


def _preactivation(layer, a, dtype):
    """Z = A W (+ b), recomputed from the layer's input A as its `call`
    computes it before the activation."""
    kernel = ops.cast(layer.kernel, dtype)
    if isinstance(layer, _DENSE):
        z = ops.matmul(a, kernel)
    elif isinstance(layer, _DEPTHWISE):
        z = ops.depthwise_conv(
            a, kernel, strides=layer.strides, padding=layer.padding,
            dilation_rate=layer.dilation_rate, data_format=layer.data_format)
    else:
        z = layer.convolution_op(a, kernel)
    if layer.bias is None:
        return z
    shape = [1] * len(z.shape)
    shape[1 if _channels_first(layer) else -1] = -1
    return ops.add(z, ops.reshape(ops.cast(layer.bias, dtype), shape))


def _graph(model):
    """The Functional graph that `model.call` runs: `model` itself, or a
    Sequential model's (None if it has none: its layers run in turn).

    Raises:
        ValueError: `model` has its own `call` (a subclassed model).
    """
    if isinstance(model, keras.Sequential) and type(model).call is keras.Sequential.call:
        return model._functional
    if isinstance(model, Functional) and type(model).call is Functional.call:
        return model
    raise ValueError(
        "model must be a Functional or Sequential model to use "
        "per_example_norms (Keras 3 has no forward hooks: the wrapper "
        "records a layer's input and output by running the model's graph, "
        "and does not patch layers); received model="
        f"{model.name!r} ({type(model).__name__}, with its own call). Build "
        "it as a Functional or Sequential model, or "
        + OR_ALTERNATIVE
    )


class Recorder:
    """Runs a model's own graph, recording each target layer's input A and
    E, the tensor whose gradient is D = dL/dZ (Z: its pre-activation output).

    Keras 3 has no forward hooks, so `forward` runs the graph as
    `Functional.call` does: every operation is called through
    `Layer.__call__`, unchanged; after a target layer's call,

    - linear activation: E = end(Y), the layer's output Y = Z, which the
      graph then uses;
    - otherwise: E = end(stop_gradient(A W + b)), Z recomputed from A, and
      the graph uses Y + (act(E) - stop_gradient(act(E))): the same value,
      whose gradient also reaches E through the activation, so dL/dE = D,
      with no extra gradient to W or A.

    `end(i, e)`: the backend's tensor to differentiate for layer i (the
    tape's watched `e` on TensorFlow, `e` requiring grad on PyTorch, e + p_i
    with a zero tap p_i on JAX). Nested Functional and Sequential models
    that hold target layers are run the same way.
    """

    def __init__(self, layers, end=None):
        self.layers = layers
        self._end = end or (lambda index, e: e)
        self._index = {id(layer): i for i, layer in enumerate(layers)}
        self._records = {}  # id(layer) -> (A, E)

    def forward(self, model, inputs, mask=None, **context):
        """`model(inputs, mask=mask, **context)`, recording; `context`: the
        call-context arguments (`training`) that Keras passes to each layer.
        """
        with model._open_name_scope():
            graph = _graph(model)
            if graph is None:
                return self._sequential(model, inputs, mask, context)
            inputs = graph._standardize_inputs(inputs)
            masks = [None] * len(inputs) if mask is None else tree.flatten(mask)
            for x, m in zip(inputs, masks):
                if m is not None:
                    backend.set_keras_mask(x, m)
            outputs = graph._run_through_graph(
                inputs, operation_fn=lambda op: self._operation(op, context))
        return unpack_singleton(outputs)

    def _sequential(self, model, inputs, mask, context):
        """`Sequential.call` without a graph: its layers in turn."""
        training = context.get("training")
        for layer in model.layers:
            kwargs = {"mask": mask} if layer._call_has_mask_arg else {}
            if layer._call_has_training_arg and training is not None:
                kwargs["training"] = training
            inputs = self._operation(layer, {})(inputs, **kwargs)
            mask = tree.map_structure(backend.get_keras_mask, inputs)
        return inputs

    def _operation(self, operation, context):
        """How the graph calls `operation`: as Keras does (`operation_fn`),
        then recording it if a target; a model holding targets: by its graph.
        """
        call = operation_fn(operation, **context)
        if id(operation) in self._index:
            return lambda *args, **kwargs: self._record(
                operation, args, kwargs, call(*args, **kwargs))
        if isinstance(operation, keras.Model) and any(
                id(layer) in self._index
                for layer in operation._flatten_layers(include_self=False)):
            return lambda *args, **kwargs: self._nested(
                operation, context, args, kwargs)
        return call

    def _nested(self, model, context, args, kwargs):
        """A nested model's call, with the arguments `Layer.__call__` would
        give it (its context arguments; the input's mask)."""
        kwargs = dict(kwargs)
        for name, value in context.items():
            if value is not None and name in model._call_context_args:
                kwargs[name] = value
        inputs = args[0] if args else kwargs.pop("inputs")
        if kwargs.get("mask") is None:
            kwargs["mask"] = tree.map_structure(backend.get_keras_mask, inputs)
        return self.forward(model, inputs, **kwargs)

    def _record(self, layer, args, kwargs, y):
        """Records layer's (A, E); returns the output the graph goes on with."""
        if id(layer) in self._records:
            raise ValueError(
                "Layers must be called once per forward pass to use "
                f"per_example_norms; received layer={layer.name!r}, "
                "called more than once (shared weights). " + ALTERNATIVE
            )
        a = args[0] if args else kwargs["inputs"]
        a = layer.dtype_policy.convert_input(a, layer.autocast, layer.input_dtype)
        index = self._index[id(layer)]
        if _is_linear(layer):
            e = out = self._end(index, y)
        else:
            e = self._end(index, ops.stop_gradient(
                _preactivation(layer, a, y.dtype)))
            h = layer.activation(e)
            out = ops.add(y, ops.subtract(h, ops.stop_gradient(h)))
        mask = backend.get_keras_mask(y)
        if out is not y and mask is not None:
            backend.set_keras_mask(out, mask)
        self._records[id(layer)] = (a, e)
        return out

    def records(self):
        """[(A, E)], one per layer, in `layers`' order."""
        for layer in self.layers:
            if id(layer) not in self._records:
                raise ValueError(
                    "Every layer with layer-adapted variables must be called "
                    "by the model's graph (or a nested Functional or "
                    "Sequential model's), where per_example_norms records its "
                    f"input and output; received layer={layer.name!r}, not "
                    "reached (called inside another layer's call, or its "
                    "variables are used some other way). " + ALTERNATIVE
                )
        return [self._records[id(layer)] for layer in self.layers]


# ------------------------------------------------------------------ forms


def choose(tokens, k, c):
    """'gram' or 'explicit': the cheaper form for one layer.

    Per example, the explicit form A_i^T D_i costs about T * K * C
    multiply-adds (and B * K * C memory); the Gram form
    sum_{t,t'} (a_t . a_t') (d_t . d_t') costs T^2 * (K + C) (and B * T^2).
    Unknown T (dynamic spatial shape) takes the explicit form.
    """
    if tokens is None:
        return "explicit"
    explicit = tokens * k * c
    gram = tokens * tokens * (k + c)
    return "gram" if gram < explicit else "explicit"


def _static(dim):
    return None if dim is None else int(dim)


def _channels_first(layer):
    return getattr(layer, "data_format", "channels_last") == "channels_first"


def layer_form(layer, a_shape, d_shape):
    """(form, T, K, C) of one layer, from static shapes (trace time)."""
    if isinstance(layer, _DENSE):
        k, c = _static(a_shape[-1]), _static(d_shape[-1])
        if len(a_shape) == 2:
            return "outer", 1, k, c
        tokens = 1
        for dim in a_shape[1:-1]:
            tokens = None if dim is None or tokens is None else tokens * int(dim)
        return choose(tokens, k, c), tokens, k, c
    first = _channels_first(layer)
    spatial = d_shape[2:] if first else d_shape[1:-1]
    c = _static(d_shape[1] if first else d_shape[-1])
    cin = _static(a_shape[1] if first else a_shape[-1])
    tokens = None
    if all(s is not None for s in spatial):
        tokens = int(spatial[0]) * int(spatial[1])
    kh, kw = layer.kernel_size
    if isinstance(layer, _DEPTHWISE):
        return "explicit", tokens, kh * kw, c
    groups = layer.groups
    c //= groups
    return choose(tokens, kh * kw * cin // groups, c), tokens, kh * kw * cin // groups, c


def _intermediate(form, tokens, k, c):
    """float32 elements per example of the form's intermediate."""
    if form == "gram":
        return (tokens or 1) ** 2
    if form == "explicit":
        return k * c + (tokens or 1) * k
    return 0


# ------------------------------------------------------------------ maths


def _f32(x):
    return ops.cast(x, "float32")


def _sum_all(tensors):
    """The sum of same-shaped tensors.

    TensorFlow: `tf.add_n`, one kernel, and the summation order of the
    training runs recorded before this module was backend-free (a stacked
    `ops.sum` rounds differently in TensorFlow's optimized graph, which
    changed those runs' weights in the last bits).
    """
    if len(tensors) == 1:
        return tensors[0]
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.add_n(tensors)
    return ops.sum(ops.stack(tensors), axis=0)


# Einsum patterns by rank: [b, T, K] blocks, or [b, T, G, K] with groups.
_GRAM = {3: "btk,bsk->bts", 4: "btgk,bsgk->bgts"}
_EXPLICIT = {3: "btk,btc->bkc", 4: "btgk,btgc->bgkc"}


def _sum_per_example(x):
    return ops.sum(x, axis=tuple(range(1, len(x.shape))))


def token_norms(blocks, d, form):
    """||A_i^T D_i||^2 per example, in `form`, for D [b, T, C] and A given
    as column `blocks` [b, T, K_p] (A is their concatenation along K); or
    per group, D [b, T, G, C] and blocks [b, T, G, K_p], summed over groups.

    The blocks' kernel gradients are disjoint blocks of A_i^T D_i, so their
    squared norms add (explicit), and A_i A_i^T is the sum of the blocks'
    Gram matrices (gram).
    """
    rank = len(d.shape)
    if form == "gram":
        grams = _sum_all([ops.einsum(_GRAM[rank], x, x) for x in blocks])
        return _sum_per_example(grams * ops.einsum(_GRAM[rank], d, d))
    return _sum_all([
        _sum_per_example(ops.square(ops.einsum(_EXPLICIT[rank], x, d)))
        for x in blocks
    ])


def _bias_norms(d):
    """||sum_t D_i(t)||^2 for d [b, ..., C]."""
    rank = len(d.shape)
    if rank > 2:
        d = ops.sum(d, axis=tuple(range(1, rank - 1)))
    return ops.sum(ops.square(d), axis=-1)


def _chunked(fn, a, d, per_example_elements):
    """fn(a, d) -> [b], run over chunks of the batch when memory is high."""
    size = max(CHUNK_ELEMENTS // max(per_example_elements, 1), 1)
    if a.shape[0] is not None and a.shape[0] <= size:
        return fn(a, d)
    batch = ops.shape(a)[0]

    def run_all():
        chunks = (batch + size - 1) // size
        pad = chunks * size - batch
        padded = [
            ops.reshape(ops.pad(t, [[0, pad]] + [[0, 0]] * (len(t.shape) - 1)),
                        (-1, size) + tuple(ops.shape(t)[1:]))
            for t in (a, d)
        ]
        out = ops.map(lambda xs: fn(*xs), tuple(padded))
        return ops.reshape(out, (-1,))[:batch]

    if a.shape[0] is not None:
        return run_all()
    return ops.cond(batch <= size, lambda: fn(a, d), run_all)


def _shifts(layer, a, out_h, out_w):
    """The kh*kw shifted (strided, dilated) views of `a`, each [b, Ho, Wo, Cin].

    Row t of view p is the input under kernel tap p at output position t:
    the patches of `a` without building them (im2col would copy the input
    kh*kw times at once; here one view at a time, with 'same' padding as
    Keras computes it). Needs static spatial shapes.
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
            a = ops.pad(a, [[0, 0]] + pads + [[0, 0]])
    return [a[:, i * dh:i * dh + (out_h - 1) * sh + 1:sh,
              j * dw:j * dw + (out_w - 1) * sw + 1:sw, :]
            for i in range(kh) for j in range(kw)]


def _patches(layer, a):
    """The receptive fields [b, Ho, Wo, kh*kw*Cin] (dynamic spatial shapes)."""
    return ops.image.extract_patches(
        a, tuple(layer.kernel_size), strides=tuple(layer.strides),
        dilation_rate=tuple(layer.dilation_rate), padding=layer.padding,
        data_format="channels_last")


def _taps(layer, a, d):
    """The input under each kernel tap, [b, T, 1, Cin] per tap; or, when
    spatial shapes are dynamic, the patches as one block [b, T, kh*kw, Cin]."""
    b = ops.shape(a)[0]
    cin = a.shape[-1]
    if all(x is not None for x in (*a.shape[1:3], *d.shape[1:3])):
        return [ops.reshape(v, (b, -1, 1, cin))
                for v in _shifts(layer, a, d.shape[1], d.shape[2])]
    kk = layer.kernel_size[0] * layer.kernel_size[1]
    return [ops.reshape(_patches(layer, a), (b, -1, kk, cin))]


def _dense(layer, a, d):
    form, tokens, k, c = layer_form(layer, a.shape, d.shape)
    if form == "outer":
        return ops.sum(ops.square(a), -1) * ops.sum(ops.square(d), -1)

    def norms(a, d):
        b = ops.shape(a)[0]
        return token_norms([ops.reshape(a, (b, -1, k))],
                           ops.reshape(d, (b, -1, c)), form)

    return _chunked(norms, a, d, _intermediate(form, tokens, k, c))


def _conv2d(layer, a, d):
    """Groups are handled per group: their kernel blocks are disjoint."""
    form, tokens, k, c = layer_form(layer, a.shape, d.shape)
    groups, cin = layer.groups, a.shape[-1]

    def norms(a, d):
        b = ops.shape(a)[0]
        blocks = _taps(layer, a, d)  # [b, T, taps, Cin]
        if groups == 1:
            return token_norms(
                [ops.reshape(x, (b, -1, x.shape[2] * cin)) for x in blocks],
                ops.reshape(d, (b, -1, c)), form)
        # [b, T, G, taps * Cin / G], tap-major within each group.
        blocks = [ops.reshape(ops.transpose(
            ops.reshape(x, (b, -1, x.shape[2], groups, cin // groups)),
            (0, 1, 3, 2, 4)), (b, -1, groups, x.shape[2] * cin // groups))
            for x in blocks]
        return token_norms(blocks, ops.reshape(d, (b, -1, groups, c)), form)

    per_example = (tokens or 1) * (k + c) + _intermediate(form, tokens, k, c)
    return _chunked(norms, a, d, per_example)


def _depthwise(layer, a, d):
    """Per input channel: K = kh*kw taps, C = depth_multiplier outputs."""
    _, tokens, kk, _ = layer_form(layer, a.shape, d.shape)
    cin, multiplier = a.shape[-1], layer.depth_multiplier

    def norms(a, d):
        b = ops.shape(a)[0]
        dd = ops.reshape(d, (b, -1, cin, multiplier))
        # Each tap's block [b, T, Cin, 1] against D [b, T, Cin, mult].
        blocks = [ops.transpose(block, (0, 1, 3, 2)) for block in _taps(layer, a, d)]
        return token_norms(blocks, dd, "explicit")

    per_example = (tokens or 1) * (kk * cin + cin * multiplier) + kk * cin * multiplier
    return _chunked(norms, a, d, per_example)


_KERNEL_NORMS = {_DENSE: _dense, _CONV2D: _conv2d, _DEPTHWISE: _depthwise}


def squared_norms(layer, a, d, kernel=True, bias=False):
    """Per-example squared norms of A_i^T D_i (kernel) and sum_t D_i (bias).

    Returns `(kernel, bias)`, each a float32 [b] tensor or None.
    """
    a, d = _f32(a), _f32(d)
    if _channels_first(layer) and not isinstance(layer, _DENSE):
        a, d = ops.transpose(a, (0, 2, 3, 1)), ops.transpose(d, (0, 2, 3, 1))
    kernel_norms = _KERNEL_NORMS[_kind(layer)](layer, a, d) if kernel else None
    bias_norms = _bias_norms(d) if bias else None
    return kernel_norms, bias_norms


# ---------------------------------------------------------- sample norms


def samples(targets, records, grads, examples):
    """The keyword arguments of `layerwise.apply_with_sample_norms` for this
    replica's `examples` examples: `sample_norms` (CLARS), and with the
    noise scale `squared_sample_norms` and `examples`, one per variable, on
    the scale of `grads` (which undoes 1/R and the loss scale on all).

    `records` are (A, D) per target layer (D None if the loss does not
    reach the layer).
    """
    by_layer = {}
    for layer, (a, d) in zip(targets.layers, records):
        wanted = {t[0] for t in targets.targets if t is not None and t[1] is layer}
        if d is None:
            zero = ops.zeros(ops.shape(a)[:1], "float32")
            by_layer[id(layer)] = (zero, zero)
            continue
        by_layer[id(layer)] = squared_norms(
            layer, a, d, "kernel" in wanted, "bias" in wanted)
    norms, squares = [], []
    for target, grad, adapted in zip(targets.targets, grads, targets.adapted):
        squared = None
        if target is not None:
            which, layer = target
            kernel, bias = by_layer[id(layer)]
            squared = ops.maximum(kernel if which == "kernel" else bias, 0.0)
        if squared is None or not adapted:
            if grad is None:
                norms.append(ops.zeros((), "float32"))
            else:
                norms.append(ops.sqrt(ops.sum(ops.square(ops.reshape(
                    _f32(ops.convert_to_tensor(grad)), (-1,))))))
        else:
            # c_i = B * A_i^T D_i, and D already holds the 1/B of the mean
            # loss, so N_l = (1/B) * sum_i ||c_i|| = sum_i ||A_i^T D_i||.
            norms.append(ops.sum(ops.sqrt(squared)))
        # and (1/B) * sum_i ||c_i||^2 = B * sum_i ||A_i^T D_i||^2.
        squares.append(None if squared is None else
                       ops.cast(examples, "float32") * ops.sum(squared))
    out = {"sample_norms": norms if targets.complete else None}
    if targets.noise:
        out.update(squared_sample_norms=squares, examples=examples)
    return out
