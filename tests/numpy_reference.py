"""A float64 NumPy reference of the update in spec/CLARS.md.

Slow and obvious on purpose: the tests compare `keras_clars.CLARS` and
`keras_clars.LARS` against it. Two functions:

- `reference_update(weights, velocities, samples, ...)`: ONE update from the
  S gradient samples that make it up (replicas x accumulation micro-steps,
  or single examples). Use it when gradients depend on the weights.
- `reference_run(weights, micro_steps, steps=k, ...)`: a sequence of
  micro-steps with fixed gradients, grouped into updates of k micro-steps,
  with the learning rate evaluated at the update index and the
  non-finite-gradient rule of the package (skip the whole update, count it)
  and Keras's clipping of each micro-step's mean gradient.
- `clip_micro_step(samples, ...)`: one micro-step's clipped mean gradient
  and its complete norms, the sample norms scaled by what clipping did to
  each layer (spec, "Clipping").

A *sample* is a list of per-layer gradient arrays: the mean gradient of one
equally sized slice of the batch, unscaled (a replica's gradient already
multiplied back by R). Each micro-step holds one or more samples of equal
size; its gradient is their mean.

Example:

    from numpy_reference import reference_run
    out = reference_run([w0, b0], [[g0, gb0], [g1, gb1]], steps=2,
                        learning_rate=0.1, complete=True)
    out["weights"][-1]   # weights after the 2nd micro-step (one update)
"""

import numpy as np

STATISTICS = ("trust_ratio", "complete_norm", "gradient_norm", "weight_norm",
              "coherence")


def _norm(x):
    return float(np.sqrt(np.sum(np.square(np.asarray(x, np.float64)))))


def default_masks(weights, weight_decay=None, no_adaptation=(), no_decay=()):
    """The spec's default exclusions: rank <= 1 is neither adapted nor decayed.

    Args:
        weights: the layers' arrays.
        weight_decay: beta; None or 0 means no layer is decayed.
        no_adaptation: indices of layers also excluded from adaptation.
        no_decay: indices of layers also excluded from weight decay.

    Returns:
        `(adapted, decayed)`: two lists of bools, one entry per layer.
    """
    adapted = [np.ndim(w) > 1 and i not in no_adaptation
               for i, w in enumerate(weights)]
    decayed = [bool(weight_decay) and np.ndim(w) > 1 and i not in no_decay
               for i, w in enumerate(weights)]
    return adapted, decayed


def _as_samples(micro_step):
    """A micro-step is one sample (list of arrays) or a list of samples."""
    if len(micro_step) and isinstance(micro_step[0], (list, tuple)):
        return [list(s) for s in micro_step]
    return [list(micro_step)]


def reference_update(weights, velocities, samples, *, learning_rate,
                     complete, momentum=0.9, trust_coefficient=0.001,
                     weight_decay=None, epsilon=0.0, nesterov=False,
                     adapted=None, decayed=None, sample_norms=None,
                     gradients=None, excluded_learning_rate=None):
    """One update of the spec, in float64.

    Args:
        weights: list of arrays w_l.
        velocities: list of arrays v_l (same shapes).
        samples: list of S samples, each a list of per-layer gradients.
        learning_rate: gamma_t, a float (already evaluated for this update).
        complete: True for CLARS (N_l = mean of the samples' norms), False
            for LARS (N_l = norm of the mean gradient).
        momentum, trust_coefficient, weight_decay, epsilon, nesterov: as in
            the optimizers.
        adapted, decayed: per-layer bools; default `default_masks(...)`.
        sample_norms: optional per-layer N_l replacing the samples' norms
            (CLARS with norms computed elsewhere).
        gradients: optional per-layer mean gradient g_l replacing the
            samples' mean (clipped micro-steps: see `clip_micro_step`).
        excluded_learning_rate: the rate of the layers that are not
            adapted (a float for this update); None: `learning_rate`.

    Returns:
        `(new_weights, new_velocities, statistics)`, statistics a list of
        dicts with the keys of `STATISTICS`, one per layer.
    """
    default_adapted, default_decayed = default_masks(weights, weight_decay)
    adapted = default_adapted if adapted is None else adapted
    decayed = default_decayed if decayed is None else decayed
    new_weights, new_velocities, statistics = [], [], []
    for l, (w, v) in enumerate(zip(weights, velocities)):
        w = np.asarray(w, np.float64)
        v = np.asarray(v, np.float64)
        layer_samples = [np.asarray(s[l], np.float64) for s in samples]
        g = (np.mean(layer_samples, axis=0) if gradients is None
             else np.asarray(gradients[l], np.float64))
        gradient_norm = _norm(g)
        if sample_norms is not None:
            n = float(sample_norms[l])
        elif complete:
            n = float(np.mean([_norm(s) for s in layer_samples]))
        else:
            n = gradient_norm
        beta = (weight_decay or 0.0) if decayed[l] else 0.0
        weight_norm = _norm(w)
        if adapted[l] and weight_norm > 0 and n > 0:
            ratio = trust_coefficient * weight_norm / (
                n + beta * weight_norm + epsilon)
        else:
            ratio = 1.0
        rate = learning_rate * ratio
        if not adapted[l] and excluded_learning_rate is not None:
            rate = excluded_learning_rate
        u = rate * (g + beta * w)
        v = momentum * v + u
        step = momentum * v + u if nesterov else v
        new_weights.append(w - step)
        new_velocities.append(v)
        coherence = gradient_norm / n if n > 0 else 1.0
        statistics.append(dict(zip(
            STATISTICS, (ratio, n, gradient_norm, weight_norm, coherence))))
    return new_weights, new_velocities, statistics


def clip_micro_step(samples, *, clipnorm=None, clipvalue=None,
                    global_clipnorm=None, sample_norms=None):
    """Keras's clipping of one micro-step's mean gradient (float64).

    Args:
        samples: the micro-step's samples, each a list of per-layer arrays.
        clipnorm, clipvalue, global_clipnorm: as in Keras (one at a time).
        sample_norms: optional per-layer mean sample norms replacing the
            samples' own.

    Returns:
        `(gradient, complete_norms)`: the clipped per-layer mean gradient,
        and per layer the mean sample norm times ||clip(g_l)|| / ||g_l||.
    """
    layers = len(samples[0])
    g = [np.mean([np.asarray(s[l], np.float64) for s in samples], axis=0)
         for l in range(layers)]
    if sample_norms is None:
        sample_norms = [np.mean([_norm(s[l]) for s in samples])
                        for l in range(layers)]
    if clipnorm:
        clipped = [x * clipnorm / max(_norm(x), clipnorm) for x in g]
    elif global_clipnorm:
        total = np.sqrt(sum(_norm(x) ** 2 for x in g))
        clipped = [x * min(1.0, global_clipnorm / total) for x in g]
    elif clipvalue:
        clipped = [np.clip(x, -clipvalue, clipvalue) for x in g]
    else:
        clipped = g
    factors = [_norm(c) / _norm(x) if _norm(x) > 0 else 1.0
               for c, x in zip(clipped, g)]
    return clipped, [float(n) * f for n, f in zip(sample_norms, factors)]


def reference_run(weights, micro_steps, *, steps=None, learning_rate,
                  complete, clipnorm=None, clipvalue=None,
                  global_clipnorm=None, excluded_learning_rate=None,
                  **kwargs):
    """Runs micro-steps with fixed gradients, as `optimizer.apply` would.

    Args:
        weights: the initial arrays (velocities start at zero).
        micro_steps: one entry per `apply()` call: a sample (list of
            per-layer gradients) or a list of equally sized samples (e.g.
            one per replica).
        steps: k, the gradient accumulation steps (None = 1).
        learning_rate: a float, or a callable of the update index t
            (0, 1, ...), such as a Keras schedule wrapped in `float(...)`.
        complete: True for CLARS, False for LARS.
        clipnorm, clipvalue, global_clipnorm: Keras's clipping, applied to
            each micro-step's mean gradient (`clip_micro_step`).
        excluded_learning_rate: None (tied), a float, or a callable of the
            update index, like `learning_rate`.
        **kwargs: the other arguments of `reference_update`.

    Returns:
        A dict: `weights` and `velocities` (lists, one entry per micro-step,
        each a list of per-layer arrays, after that micro-step),
        `statistics` (of the last applied update, or None),
        `non_finite_updates` (updates skipped for inf/NaN gradients) and
        `learning_rates` (the rate of each update).
    """
    k = steps or 1
    schedule = learning_rate if callable(learning_rate) else (
        lambda t: learning_rate)
    excluded = excluded_learning_rate
    if excluded is not None and not callable(excluded):
        excluded = (lambda t: excluded_learning_rate)
    w = [np.asarray(x, np.float64) for x in weights]
    v = [np.zeros_like(x) for x in w]
    out = {"weights": [], "velocities": [], "statistics": None,
           "non_finite_updates": 0, "learning_rates": []}
    clip = dict(clipnorm=clipnorm, clipvalue=clipvalue,
                global_clipnorm=global_clipnorm)
    clipping = any(clip.values())
    window, clipped = [], []
    for i, micro_step in enumerate(micro_steps):
        samples = _as_samples(micro_step)
        window.extend(samples)
        if clipping:
            clipped.append(clip_micro_step(samples, **clip))
        if (i + 1) % k == 0:
            rate = float(schedule(i // k))
            out["learning_rates"].append(rate)
            # Checked on the gradients as received, before clipping.
            finite = all(np.all(np.isfinite(g)) for s in window for g in s)
            if finite:
                extra = {}
                if clipping:
                    # The mean of the clipped micro-step gradients, and the
                    # mean of their scaled sample norms (equal sizes).
                    extra["gradients"] = [np.mean(layer, axis=0) for layer in
                                          zip(*[c[0] for c in clipped])]
                    if complete:
                        extra["sample_norms"] = np.mean(
                            [c[1] for c in clipped], axis=0)
                if excluded is not None:
                    extra["excluded_learning_rate"] = float(excluded(i // k))
                w, v, out["statistics"] = reference_update(
                    w, v, window, learning_rate=rate, complete=complete,
                    **extra, **kwargs)
            else:
                out["non_finite_updates"] += 1
            window, clipped = [], []
        out["weights"].append([x.copy() for x in w])
        out["velocities"].append([x.copy() for x in v])
    return out


# ------------------------------------------------ the gradient noise scale


def slices(per_example, b):
    """The samples of b consecutive examples: the mean of their gradients."""
    return [[np.mean(layer, axis=0) for layer in zip(*per_example[j:j + b])]
            for j in range(0, len(per_example), b)]


def noise_reference(samples, b):
    """Per layer (m2, G2, S, b, |G|^2 estimate, tr(Sigma) estimate) of the
    update made of `samples` (each [layers] gradients) of b examples."""
    s = len(samples)
    rows = []
    for layer in range(len(samples[0])):
        grads = [sample[layer] for sample in samples]
        m2 = np.mean([np.sum(g**2) for g in grads])
        g2 = np.sum(np.mean(grads, axis=0) ** 2)
        big_b = s * b
        rows.append((m2, g2, s, b, (big_b * g2 - b * m2) / (big_b - b),
                     (m2 - g2) / (1 / b - 1 / big_b)))
    return np.array(rows)
