"""keras-clars: CLARS and LARS for Keras 3, with large-batch recipes."""

import keras

from keras_clars.clars import CLARS
from keras_clars.lars import LARS
from keras_clars.layerwise import apply_with_sample_norms
from keras_clars.per_example import per_example_norms

__version__ = "0.1.0"
__all__ = ["CLARS", "LARS", "apply_with_sample_norms", "per_example_norms"]

# Lets `model.compile(optimizer="clars")` resolve after `import keras_clars`.
keras.saving.get_custom_objects().update({"clars": CLARS, "lars": LARS})
