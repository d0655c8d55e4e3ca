"""Learning-rate schedules of the large-batch literature, counted in updates."""

import math

import keras
from keras import ops

DECAYS = ("poly", "cosine", "step", "constant")


@keras.saving.register_keras_serializable(package="keras_clars")
class WarmupDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup to `peak_learning_rate`, then a decay to the last update.

    During warmup (update t < warmup_steps) the rate is
    peak * (t + 1) / warmup_steps (Goyal et al. 2017). After it, with
    p = (t - warmup_steps) / (total_steps - warmup_steps) clipped to [0, 1]:

    - `poly`:     end + (peak - end) * (1 - p) ** power  (LARS/MLPerf: power 2)
    - `cosine`:   end + (peak - end) * (1 + cos(pi * p)) / 2
    - `step`:     peak * 0.1 ** (number of `step_fractions` <= p)
    - `constant`: peak

    Args:
        peak_learning_rate: the rate after warmup, >= 0.
        total_steps: updates in the whole run, >= 1.
        warmup_steps: updates of linear warmup, in [0, total_steps).
        decay: one of `poly`, `cosine`, `step`, `constant`.
        power: the exponent of `poly`.
        end_learning_rate: where `poly` and `cosine` end.
        step_fractions: where `step` divides by 10, as fractions of the
            decay phase (Goyal et al.: epochs 30, 60 and 80 of 90).
    """

    def __init__(
        self,
        peak_learning_rate,
        total_steps,
        warmup_steps=0,
        decay="poly",
        power=2.0,
        end_learning_rate=0.0,
        step_fractions=(1 / 3, 2 / 3, 8 / 9),
        name=None,
    ):
        if not peak_learning_rate >= 0:
            raise ValueError(
                "peak_learning_rate must be >= 0; received "
                f"peak_learning_rate={peak_learning_rate}."
            )
        if not (isinstance(total_steps, int) and total_steps >= 1):
            raise ValueError(
                f"total_steps must be an int >= 1; received total_steps={total_steps!r}."
            )
        if not (isinstance(warmup_steps, int) and 0 <= warmup_steps < total_steps):
            raise ValueError(
                "warmup_steps must be an int in [0, total_steps); received "
                f"warmup_steps={warmup_steps!r}, total_steps={total_steps}."
            )
        if decay not in DECAYS:
            raise ValueError(
                f"decay must be one of {', '.join(DECAYS)}; received decay={decay!r}."
            )
        if not end_learning_rate >= 0:
            raise ValueError(
                "end_learning_rate must be >= 0; received "
                f"end_learning_rate={end_learning_rate}."
            )
        self.peak_learning_rate = float(peak_learning_rate)
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.decay = decay
        self.power = float(power)
        self.end_learning_rate = float(end_learning_rate)
        self.step_fractions = tuple(float(f) for f in step_fractions)
        self.name = name

    def __call__(self, step):
        step = ops.cast(step, "float32")
        peak, end = self.peak_learning_rate, self.end_learning_rate
        decay_steps = float(self.total_steps - self.warmup_steps)
        progress = ops.clip((step - self.warmup_steps) / decay_steps, 0.0, 1.0)
        if self.decay == "poly":
            decayed = end + (peak - end) * ops.power(1.0 - progress, self.power)
        elif self.decay == "cosine":
            decayed = end + (peak - end) * 0.5 * (1.0 + ops.cos(math.pi * progress))
        elif self.decay == "step":
            drops = sum(
                ops.cast(ops.greater_equal(progress, f), "float32")
                for f in self.step_fractions
            )
            decayed = peak * ops.power(0.1, drops)
        else:
            decayed = peak + 0.0 * progress
        if self.warmup_steps == 0:
            return decayed
        warm = peak * (step + 1.0) / self.warmup_steps
        return ops.where(step < self.warmup_steps, warm, decayed)

    def get_config(self):
        return {
            "peak_learning_rate": self.peak_learning_rate,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "decay": self.decay,
            "power": self.power,
            "end_learning_rate": self.end_learning_rate,
            "step_fractions": list(self.step_fractions),
            "name": self.name,
        }


def scaled_learning_rate(base_learning_rate, batch_size, scaling="linear"):
    """The linear scaling rule of Goyal et al.: base * B / 256, or `none`."""
    if scaling == "linear":
        return base_learning_rate * batch_size / 256.0
    if scaling == "none":
        return base_learning_rate
    raise ValueError(f"scaling must be 'linear' or 'none'; received scaling={scaling!r}.")


@keras.saving.register_keras_serializable(package="keras_clars")
class PerUpdate(keras.optimizers.schedules.LearningRateSchedule):
    """Evaluates `schedule` at the update index, given the micro-step count.

    Keras's own optimizers (SGD, Adam, ...) evaluate a schedule at the
    micro-step count when they accumulate gradients. Wrap the schedule to
    count it in updates, as CLARS and LARS do:

        SGD(PerUpdate(schedule, k), gradient_accumulation_steps=k)

    Args:
        schedule: a `LearningRateSchedule` counted in updates.
        accumulation_steps: k, the micro-steps per update.
    """

    def __init__(self, schedule, accumulation_steps):
        self.schedule = schedule
        self.accumulation_steps = accumulation_steps

    def __call__(self, step):
        return self.schedule(step // self.accumulation_steps)

    def get_config(self):
        return {
            "schedule": keras.saving.serialize_keras_object(self.schedule),
            "accumulation_steps": self.accumulation_steps,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["schedule"] = keras.saving.deserialize_keras_object(config["schedule"])
        return cls(**config)
