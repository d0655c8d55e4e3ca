"""`keras_clars.schedules.PerUpdate`: a schedule counted in updates for
Keras's own optimizers, whose accumulation counts micro-steps."""

import keras
import numpy as np
import pytest

from keras_clars.schedules import PerUpdate, WarmupDecay


def test_per_update_evaluates_the_schedule_at_the_update_index():
    schedule = WarmupDecay(1.0, total_steps=8, warmup_steps=2)
    per_update = PerUpdate(schedule, accumulation_steps=3)
    for step in range(30):
        assert float(per_update(step)) == float(schedule(step // 3)), step
    restored = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(per_update))
    assert isinstance(restored, PerUpdate)
    assert restored.accumulation_steps == 3
    assert restored.schedule.get_config() == schedule.get_config()
    assert float(restored(10)) == float(schedule(3))


def test_sgd_with_accumulation_sees_the_update_index():
    """After 6 micro-steps with k = 2 (3 updates), SGD's rate is the
    schedule's at update 3 with PerUpdate, and at 6 without it."""
    schedule = WarmupDecay(1.0, total_steps=8, warmup_steps=4)
    rates = {}
    for name, rate in (("per_update", PerUpdate(schedule, 2)),
                       ("plain", schedule)):
        optimizer = keras.optimizers.SGD(rate, gradient_accumulation_steps=2)
        variable = keras.Variable(np.ones(3, "float32"))
        for _ in range(6):
            optimizer.apply([np.ones(3, "float32")], [variable])
        rates[name] = float(optimizer.learning_rate)
    assert rates["per_update"] == pytest.approx(float(schedule(3)))
    assert rates["plain"] == pytest.approx(float(schedule(6)))
    assert rates["per_update"] != pytest.approx(rates["plain"])
