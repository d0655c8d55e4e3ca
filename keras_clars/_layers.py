"""The context of one layer-wise update, and the backend's paths (private).

`keras_clars.layerwise` builds one `Layers` per `apply`: the variables of
the update, where they sit in the optimizer, and their per-layer scalars
as a few vectors (one per norm dtype present). `backend` is
`keras_clars._tensorflow` on TensorFlow, else `keras_clars._generic`.
"""

import keras
from keras import ops

from keras_clars import transforms

# The one backend check, at import as in Keras: TensorFlow's fast paths, or
# the same functions in `keras.ops` (`keras_clars.layerwise` uses it too).
if keras.backend.backend() == "tensorflow":
    from keras_clars import _tensorflow as backend
else:
    from keras_clars import _generic as backend


def packed_dtype(variables):
    """The dtype of a vector over all `variables`: float64 if one needs it."""
    dtypes = {transforms.norm_dtype(v.dtype) for v in variables}
    return "float64" if "float64" in dtypes else "float32"


class Layers:
    """The context of one update: its variables, where they sit in the
    optimizer, and their per-layer scalars as a few vectors.

    An `apply` may pass all the optimizer's variables or some, in any order:
    `indices[j]` is the optimizer's index of `variables[j]`. Norms and ratios
    are float32, or float64 for float64 variables (`transforms.norm_dtype`),
    so per-layer scalars live in one vector per dtype present (usually one):
    `groups` holds each dtype and the positions of its layers; `split` cuts
    a vector over all layers into the groups' vectors, `join` puts them back.
    """

    def __init__(self, optimizer, variables):
        self.variables = list(variables)
        self.indices = [optimizer._get_variable_index(v) for v in self.variables]
        self.size = len(optimizer._trainable_variables)
        self.in_order = self.indices == list(range(self.size))
        dtypes = [transforms.norm_dtype(v.dtype) for v in self.variables]
        self.groups = [(dtype, [j for j, d in enumerate(dtypes) if d == dtype])
                       for dtype in ("float32", "float64") if dtype in dtypes]
        order = [j for _, positions in self.groups for j in positions]
        self._inverse = (None if order == sorted(order)
                         else sorted(range(len(order)), key=order.__getitem__))
        self.dtype = packed_dtype(self.variables)

    def select(self, per_variable):
        """The entries of this update's variables, from a list over all."""
        return [per_variable[i] for i in self.indices]

    def norms(self, tensors):
        """||x|| for each tensor, one vector per group."""
        return [ops.sqrt(backend.squared_norms([tensors[j] for j in positions],
                                                dtype))
                for dtype, positions in self.groups]

    def constant(self, per_variable, dtype=None):
        """A list over all variables as one constant vector per group."""
        values = self.select(per_variable)
        return [ops.convert_to_tensor([values[j] for j in positions],
                                      dtype or group_dtype)
                for group_dtype, positions in self.groups]

    def split(self, vector):
        if len(self.groups) == 1:
            return [ops.cast(vector, self.groups[0][0])]
        return [ops.cast(ops.take(vector, positions), dtype)
                for dtype, positions in self.groups]

    def join(self, vectors, dtype=None):
        joined = ops.concatenate([ops.cast(v, dtype or self.dtype)
                                  for v in vectors])
        if self._inverse is None:
            return joined
        return ops.take(joined, self._inverse, axis=0)

    def unstack(self, vectors):
        """The groups' vectors as one scalar per layer, in layer order."""
        scalars = [None] * len(self.variables)
        for vector, (_, positions) in zip(vectors, self.groups):
            for j, scalar in zip(positions, ops.unstack(vector)):
                scalars[j] = scalar
        return scalars
