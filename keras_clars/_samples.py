"""The channel that hands given sample norms to the update (private).

Per-example norms (`keras_clars.per_example_norms`), or any norms computed
outside the optimizer, reach the replica phase of `LayerwiseOptimizer`
this way: `apply(..., sample_norms=..., squared_sample_norms=...,
examples=...)`, or `apply_with_sample_norms` through a
`LossScaleOptimizer`, holds them for this replica (`holding`) while the
`apply` inside runs, and the replica phase reads them (`held`).
"""

import contextlib

from keras_clars._layers import backend as _backend


def inner_optimizer(optimizer):
    """`optimizer` without its `LossScaleOptimizer` wrappers, if any."""
    while hasattr(optimizer, "inner_optimizer"):
        optimizer = optimizer.inner_optimizer
    return optimizer


def apply_with_sample_norms(optimizer, grads, trainable_variables,
                            sample_norms, squared_sample_norms=None,
                            examples=None):
    """`optimizer.apply(grads, trainable_variables)`, handing CLARS this
    replica's sample norms, also through a `LossScaleOptimizer`.

    The way to give CLARS sample norms computed elsewhere (exact per-example
    norms, as `per_example_norms` does; docs/per_example.md): call it where
    the training step calls `optimizer.apply`, in replica context, with the
    optimizer as compiled (under mixed_float16, Keras wraps CLARS in a
    `LossScaleOptimizer`, whose `apply` takes no norms). `sample_norms` are
    as for `CLARS.apply`: one per trainable variable, this replica's mean
    over its samples s of ||g_{s,l}||, taken from the same (scaled) loss as
    `grads`. They are unscaled exactly as `grads` are: divided by the loss
    scale (`optimizer.scale_loss(1.0)`) and multiplied by the number of
    replicas R (Keras scales each replica's loss by 1/R).
    `squared_sample_norms` and `examples` are those of `apply`, for the
    noise scale (any layer-wise optimizer with `noise_scale=True`; then
    `sample_norms` may be None).
    """
    inner = inner_optimizer(optimizer)
    name = type(optimizer).__name__ + (
        "" if inner is optimizer else f"({type(inner).__name__})")
    if sample_norms is not None and not getattr(inner, "uses_complete_norm", False):
        raise ValueError(
            "optimizer must be CLARS, or a LossScaleOptimizer around CLARS, "
            "to take sample_norms (they are only used by CLARS); received "
            f"optimizer={name}.")
    if squared_sample_norms is not None and not getattr(inner, "noise_scale", False):
        raise ValueError(
            "optimizer must be LARS or CLARS with noise_scale=True (possibly "
            "inside a LossScaleOptimizer) to take squared_sample_norms (only "
            f"the noise scale uses them); received optimizer={name}.")
    if inner is optimizer:
        return optimizer.apply(grads, trainable_variables,
                               sample_norms=sample_norms,
                               squared_sample_norms=squared_sample_norms,
                               examples=examples)
    scale = optimizer.scale_loss(1.0)
    with holding(inner, sample_norms, squared_sample_norms, examples, scale):
        return optimizer.apply(grads, trainable_variables)


@contextlib.contextmanager
def holding(optimizer, sample_norms, squared_sample_norms=None, examples=None,
            scale=None):
    """Keeps this replica's given norms (divided by the loss `scale`,
    if any) for the `apply` inside.

    Keyed by replica: under tf.distribute a LossScaleOptimizer calls
    `apply` once per replica, in other threads (`call_for_each_replica`).
    """
    def unscaled(values, squared):
        if values is None or scale is None:
            return None if values is None else list(values)
        divisor = scale * scale if squared else scale
        return [None if v is None else v / divisor for v in values]

    if squared_sample_norms is not None and examples is None:
        raise ValueError("examples must be the examples of the replica's "
                         "micro-batch with squared_sample_norms; received "
                         "examples=None.")
    replica = _backend.replica_id()
    optimizer._held_sample_norms[replica] = {
        "norms": unscaled(sample_norms, False),
        "squared": unscaled(squared_sample_norms, True),
        "examples": examples}
    try:
        yield
    finally:
        del optimizer._held_sample_norms[replica]


def held(optimizer, layers):
    """What `apply` was handed for this replica, over `layers`, or None."""
    held = optimizer._held_sample_norms.get(_backend.replica_id())
    if held is None:
        return None
    out = dict(held)
    for key in ("norms", "squared"):
        if held[key] is None:
            continue
        if len(held[key]) != layers.size:
            raise ValueError(
                f"{'sample_norms' if key == 'norms' else 'squared_sample_norms'}"
                f" must hold one norm per trainable variable ({layers.size}); "
                f"received {len(held[key])} norms.")
        out[key] = layers.select(held[key])
    return out
