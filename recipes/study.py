"""The warmup-necessity study (issue 12): does CLARS without warmup reach the
accuracy, and the stable range of learning rates, of LARS with warmup?

    .venv/bin/python -m recipes.study status            # the plan and what is done
    .venv/bin/python -m recipes.study tune --max_runs 10
    .venv/bin/python -m recipes.study ablation
    .venv/bin/python -m recipes.study break             # each curve's high end
    .venv/bin/python -m recipes.study decoupled         # issue 19's protocol: tune
    .venv/bin/python -m recipes.study rates             # ... its excluded rate, ±2x
    .venv/bin/python -m recipes.study final             # every tuned curve's seeds
    .venv/bin/python -m recipes.study noise             # B_simple of the claim curves
    .venv/bin/python -m recipes.study report            # tables and figures, no training
    .venv/bin/python -m recipes.study                   # all of it, in that order

Every run is one `recipes.train.run(Config)`; its record (config, commit,
package versions, wall time, per-epoch metrics, final validation and test
accuracy) goes to `docs/results/runs/<key>.json`, written atomically. A rerun
skips the runs whose record is there, so the study can be stopped at any
point and resumed, in slices (`--max_runs`) across sessions. A run checkpoints
at each epoch end to `<out>/partial/runs/<key>/` (deleted once its record is
written): a run killed midway resumes from its last checkpoint, to the record
of an uninterrupted run (and `summary.resumes` says where). The protocol
(below, and in docs/results.md) is fixed in this file.

Protocol:
- Fashion-MNIST, 2x2 average-pooled to 14x14, no augmentation; 49,152
  training examples, 10,848 held out for validation (a fixed permutation),
  the 10k test split evaluated once at the end of each run, never used to
  choose. ResNet-8 (width 8, 20k weights), BatchNorm momentum 0.9.
- B = 4096 (12 updates an epoch) and B = 8192 (6), 12 epochs, micro-batches
  of b = 256 accumulated for every method on one device (so BatchNorm
  normalizes over 256 examples in every run), momentum 0.9, no weight decay,
  poly decay (power 2) to 0, counted in updates.
- Warmup: 2 of the 12 epochs, linear, when a curve has it.
- LARS and CLARS at one trust coefficient, eta = 0.01; biases and BatchNorm
  parameters are not layer-adapted and take the plain learning rate (as in
  MLPerf's LARS), so the tuned peak lr sets both.
- Tuning: seed 0; each curve's peak lr on a ladder of factors of 2, 5
  points in a window; the choice is the best last-epoch validation
  accuracy in the window. If the best is at an edge of the window, the
  window slides one step that way (a new point is run; the point at the
  other edge stays on record but leaves the window), at most 3 times, so
  every curve chooses among exactly 5 points. (The study began with 7;
  it was cut to 5 for the CPU budget, at the flat ends: the two SGD
  curves ran 7, and their choices are interior in the 5-point window
  too.) Per-example CLARS starts its window 8x higher (2-32): per-example
  coherence is about a tenth of the 256-example one at initialisation,
  and CLARS's relative step is lr * eta * coherence. The b = 64 and
  b = 1024 ablation curves start there too, centred on the lr b = 256
  chose (8); they were added after it was tuned.
- Finals: the chosen lr, seeds 1, 2 and 3 (none used for tuning).
- Ablation: CLARS without warmup at B = 4096 with slices of b = 1 (exact
  per-example norms), 64, 256 and 1024, each with its own tuned lr.
- Until it breaks (issue 19): after tuning, each curve runs up its ladder
  (seed 0, phase "break") until a point diverges or is 5 points below the
  curve's best, at most 4 points; if none breaks, its stable range is a
  lower bound.
- Decoupled protocol (issue 19): the biases' and BatchNorm's peak rate is
  fixed at EXCLUDED_RATE (`--excluded_lr`, same warmup and decay) and the
  ladder moves only the adapted layers' step (base_lr * eta * ||w|| / N);
  LARS with and without warmup and CLARS at b = 1, 64, 256 and 1024, at
  B = 4096, tuned as above, each window centred on its tied choice. Then,
  at each chosen step, the excluded rate at half and twice EXCLUDED_RATE
  (seed 0, phase "rates"), and the finals (seeds 1, 2 and 3).
"""

import dataclasses
import json
import math
import os
import shutil
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

from recipes import report  # noqa: E402

PHASES = ("status", "tune", "final", "ablation", "break", "decoupled",
          "rates", "noise", "report", "all")
ETA = 0.01
# The decoupled protocol's peak rate of the variables without a trust ratio
# (biases, BatchNorm), shared by its curves: the geometric middle of the
# tied protocol's choices (LARS with warmup 2, without 4, CLARS 8 at B=4096).
EXCLUDED_RATE = 4.0
# At each decoupled curve's chosen step, the excluded rate is checked at these
# multiples (seed 0, phase "rates"), so that no curve is capped by it.
RATE_CHECK = (0.5, 2.0)
# The noise scale's logging interval (updates) in runs that do not log every
# update; phase "noise" re-runs each claim curve's first final seed with it
# logged every update (records in <out>/noise_scale/).
NOISE_INTERVAL = 10
# A curve is run until it breaks: up its ladder, past the tuning window, until
# a point diverges or falls this far below the curve's best, at most
# BREAK_POINTS points (then its stable range is only a lower bound).
BREAK_DROP = 0.05
BREAK_POINTS = 4
WARMUP_EPOCHS = 2
FIVE_SEEDS = (1, 2, 3, 4, 5)
# Fixed by the protocol; a run's method, B, b, warmup, lr and seed vary.
PROTOCOL = dict(
    dataset="fashion_mnist", image_size=14, augment=False,
    validation_examples=10848, model="resnet20", depth=8, width=8,
    epochs=12, momentum=0.9, bn_momentum=0.9, weight_decay=0.0,
    schedule="poly", poly_power=2.0, lr_scaling="none", label_smoothing=0.0,
    trust_coefficient=ETA, verbose=0,
)
# Tiny and fast: the test's end-to-end run, on a few hundred examples.
QUICK = dict(PROTOCOL, width=2, epochs=2, validation_examples=256,
             train_examples=512, eval_steps=4)
# Config fields a record may differ in and still be the same run.
IGNORED = ("verbose", "record_path", "layer_stats_path", "data_dir")


@dataclasses.dataclass(frozen=True)
class Curve:
    """One curve of the figure: a method at B, b, with or without warmup.

    `slice_size` 1 means exact per-example norms (micro-batches stay
    `micro_batch`). The learning-rate ladder is `base * 2**i`; the first
    window is i = start .. start + points - 1.
    """

    method: str
    batch_size: int
    warmup: bool
    slice_size: int
    micro_batch: int
    base: float
    start: int = 0
    ablation: bool = False
    # The decoupled protocol: the peak rate of the variables without a trust
    # ratio, fixed while the ladder moves only the adapted layers' step.
    excluded: float = None
    # Issue 19's search for warmup: a longer warmup than the plan's (epochs),
    # and the network without BatchNorm.
    warmup_epochs: float = None
    batch_norm: bool = True
    # More final seeds than the plan's, for a deciding comparison whose
    # 3-seed interval is not decided (issue 19: "more seeds (5)").
    final_seeds: tuple = None

    @property
    def name(self):
        warm = "warmup" if self.warmup else "nowarmup"
        if self.warmup_epochs is not None:
            warm += f"{self.warmup_epochs:g}"
        return (f"B{self.batch_size}_{self.method}_{warm}_b{self.slice_size}"
                + ("" if self.excluded is None else f"_x{self.excluded:g}")
                + ("" if self.batch_norm else "_nobn"))

    @property
    def variant(self):
        """What sets the curve apart from the plan's protocol ("" if nothing)."""
        parts = ([] if self.warmup_epochs is None else
                 [f"{self.warmup_epochs:g}-epoch warmup"])
        return ", ".join(parts + ([] if self.batch_norm else ["no BatchNorm"]))

    @property
    def samples(self):
        return self.batch_size // self.slice_size

    @property
    def slice_label(self):
        return "1 (per-example)" if self.slice_size == 1 else str(self.slice_size)

    @property
    def layout(self):
        return f"{self.slice_label}, S={self.samples}"

    @property
    def legend(self):
        warm = "warmup" if self.warmup else "no warmup"
        rate = "" if self.excluded is None else f", excluded {self.excluded:g}"
        variant = f", {self.variant}" if self.variant else ""
        return f"{self.method.upper()}, {warm}, b={self.slice_size}{rate}{variant}"


class Plan:
    """The study's curves, grid and seeds (the full protocol, or --quick)."""

    def __init__(self, quick=False):
        self.quick = quick
        self.protocol = QUICK if quick else PROTOCOL
        self.epochs = self.protocol["epochs"]
        self.tune_seed = 0
        self.final_seeds = (1,) if quick else (1, 2, 3)
        self.grid_points = 2 if quick else 5
        self.max_slides = 0 if quick else 3
        self.warmup_epochs = 1 if quick else WARMUP_EPOCHS
        self.micro_batch = 64 if quick else 256
        self.break_drop = BREAK_DROP
        sgd, layerwise = 0.1, 0.25  # ladder bases: SGD 0.1-6.4, LARS/CLARS 0.25-16
        mb = self.micro_batch
        if quick:
            big = 256
            self.curves = [
                Curve("sgd", big, True, mb, mb, sgd),
                Curve("clars", big, False, mb, mb, layerwise),
                Curve("clars", big, False, 2 * mb, 2 * mb, layerwise, ablation=True),
            ]
            self.figure_panels = [("quick", [c.name for c in self.curves])]
            self.layer_statistics = [self.curves[1].name]
        else:
            big, bigger = 4096, 8192
            self.curves = [
                Curve("sgd", big, True, mb, mb, sgd),
                Curve("sgd", big, False, mb, mb, sgd),
                Curve("lars", big, True, mb, mb, layerwise),
                Curve("lars", big, False, mb, mb, layerwise),
                Curve("clars", big, False, mb, mb, layerwise),
                Curve("clars", big, False, 1, mb, layerwise, start=3),
                Curve("lars", bigger, True, mb, mb, layerwise),
                Curve("lars", bigger, False, mb, mb, layerwise),
                Curve("clars", bigger, False, mb, mb, layerwise),
                Curve("clars", big, False, 64, 64, layerwise, start=3, ablation=True),
                Curve("clars", big, False, 1024, 1024, layerwise, start=3,
                      ablation=True),
            ]
            self.figure_panels = [
                (f"B={big}: SGD", [c.name for c in self.curves
                                   if c.method == "sgd"]),
                (f"B={big}: LARS and CLARS (eta {ETA:g})",
                 [c.name for c in self.curves if c.method != "sgd"
                  and c.batch_size == big and not c.ablation
                  and c.excluded is None]),
                (f"B={bigger}: LARS and CLARS (eta {ETA:g})",
                 [c.name for c in self.curves if c.batch_size == bigger]),
                (f"B={big}: CLARS slice size b (no warmup)",
                 [c.name for c in self.curves if c.method == "clars"
                  and c.batch_size == big and c.excluded is None]),
            ]
            # Issue 19: the decoupled protocol at B=4096, each window centred
            # (before it ran) on the tied protocol's choice, 8x higher for
            # per-example CLARS (coherence about a tenth of b=256's).
            self.curves += [
                Curve("clars", big, False, 1, mb, layerwise, start=4,
                      excluded=EXCLUDED_RATE),
                Curve("lars", big, False, mb, mb, layerwise, start=1,
                      excluded=EXCLUDED_RATE),
                Curve("lars", big, True, mb, mb, layerwise, start=1,
                      excluded=EXCLUDED_RATE),
                Curve("clars", big, False, mb, mb, layerwise, start=2,
                      excluded=EXCLUDED_RATE),
                Curve("clars", big, False, 64, 64, layerwise, start=3,
                      excluded=EXCLUDED_RATE),
                Curve("clars", big, False, 1024, 1024, layerwise, start=2,
                      excluded=EXCLUDED_RATE),
            ]
            # Issue 19's search for a regime where warmup matters (warmup never
            # mattered above), in its order: B = 16384 (3 updates an epoch),
            # then a longer warmup there (4 epochs, 12 updates, against 2),
            # then ResNet-8 without BatchNorm at B = 4096. LARS, tied, each
            # window where LARS chose at B = 8192 (2 and 4). The pair without
            # BatchNorm, where the tuning seed showed warmup mattering most
            # (-1.2 points) and whose 3-seed interval did not decide a 2-point
            # loss (-4.2 to +1.7), gets seeds 4 and 5 too.
            huge = 16384
            search = [
                Curve("lars", huge, True, mb, mb, layerwise, start=1),
                Curve("lars", huge, False, mb, mb, layerwise, start=1),
                Curve("lars", huge, True, mb, mb, layerwise, start=1,
                      warmup_epochs=2 * WARMUP_EPOCHS),
                Curve("lars", big, True, mb, mb, layerwise, start=1, batch_norm=False,
                      final_seeds=FIVE_SEEDS),
                Curve("lars", big, False, mb, mb, layerwise, start=1, batch_norm=False,
                      final_seeds=FIVE_SEEDS),
            ]
            self.curves += search
            self.figure_panels += [
                (f"B={big}: decoupled, biases and BatchNorm at {EXCLUDED_RATE:g}",
                 [c.name for c in self.curves if c.excluded is not None]),
                (f"B={huge}: LARS (eta {ETA:g})", [c.name for c in search[:3]]),
                (f"B={big}: LARS without BatchNorm", [c.name for c in search[3:]])]
            self.layer_statistics = [c.name for c in self.curves if c.name in (
                f"B{big}_lars_warmup_b{mb}", f"B{big}_clars_nowarmup_b{mb}",
                f"B{big}_clars_nowarmup_b1")]
        self.ablation_batch = big
        self.claim_curves = {
            "clars": f"B{big}_clars_nowarmup_b{mb}",
            "clars_per_example": f"B{big}_clars_nowarmup_b1",
            "lars_warmup": f"B{big}_lars_warmup_b{mb}",
            "sgd_warmup": f"B{big}_sgd_warmup_b{mb}",
        }
        if not quick:  # claim 1 again, at the larger batch
            self.claim_curves.update(clars_bigger=f"B{bigger}_clars_nowarmup_b{mb}",
                                     lars_warmup_bigger=f"B{bigger}_lars_warmup_b{mb}")
        # Phase "noise": the gradient noise scale of the claim curves but SGD.
        names = {c.name for c in self.curves}
        self.noise_curves = [name for label, name in self.claim_curves.items()
                             if not label.startswith("sgd") and name in names]
        p = self.protocol
        self.description = (
            f"Fashion-MNIST {p['image_size']}x{p['image_size']}, ResNet-{p['depth']} "
            f"width {p['width']}, {p['epochs']} epochs, warmup {self.warmup_epochs} "
            f"epochs, eta {ETA:g}, seed {self.tune_seed}"
        )

    def seeds(self, curve):
        """The final seeds of a curve: its own if it has more, else the plan's."""
        return curve.final_seeds or self.final_seeds

    def curve(self, name):
        for curve in self.curves:
            if curve.name == name:
                return curve
        raise ValueError(f"Unknown curve {name!r}; expected one of "
                         f"{', '.join(c.name for c in self.curves)}.")

    def broken(self, accuracy, best):
        """Whether a point ends a curve's stable range: diverged, or
        `break_drop` or more below the curve's best."""
        return (accuracy < report.DIVERGED_BELOW
                or accuracy <= best - self.break_drop)

    def rate_variants(self, curve):
        """A decoupled curve with its excluded rate at each RATE_CHECK
        multiple (the ±2x check); none for a tied curve."""
        if curve.excluded is None:
            return []
        return [dataclasses.replace(curve, excluded=curve.excluded * f)
                for f in RATE_CHECK]

    def lr(self, curve, index):
        return curve.base * 2.0**index

    def tuning_state(self, curve, accuracies):
        """(window lrs, state, chosen lr or None) from {lr: accuracy} so far.

        The window slides toward an edge that holds the best point, one
        step at a time, at most `max_slides` times (see the module doc).
        """
        lo, slides = curve.start, 0
        while True:
            window = [self.lr(curve, i) for i in range(lo, lo + self.grid_points)]
            if not all(lr in accuracies for lr in window):
                state = "incomplete" if any(lr in accuracies for lr in window) else \
                    report.NOT_RUN
                return window, state, None
            values = [accuracies[lr] for lr in window]
            best = int(max(range(len(values)), key=lambda i: (values[i], -i)))
            if slides < self.max_slides and self.grid_points > 2:
                if best == 0:
                    lo, slides = lo - 1, slides + 1
                    continue
                if best == len(window) - 1:
                    lo, slides = lo + 1, slides + 1
                    continue
            return window, "tuned", window[best]

    def config(self, curve, lr, seed, out=None, layer_statistics=False,
               noise_scale=False):
        """The run's `train.Config`. `layer_statistics`: log them every
        update to <out>/layer_statistics/; `noise_scale`: log the gradient
        noise scale with them (every update with `layer_statistics`, else
        every NOISE_INTERVAL, to <out>/noise_scale/), which adds optimizer
        variables and leaves the update bit-identical."""
        from recipes import train

        fields = dict(self.protocol)
        fields.update(
            optimizer=curve.method, batch_size=curve.batch_size,
            micro_batch_size=curve.micro_batch,
            per_example_norms=curve.slice_size == 1,
            warmup_epochs=(0.0 if not curve.warmup else self.warmup_epochs
                           if curve.warmup_epochs is None else curve.warmup_epochs),
            base_lr=lr, seed=seed, excluded_lr=curve.excluded,
            batch_norm=curve.batch_norm,
        )
        if layer_statistics or noise_scale:
            folder = "layer_statistics" if layer_statistics else "noise_scale"
            fields.update(
                layer_stats_interval=1 if layer_statistics else NOISE_INTERVAL,
                layer_stats_path=os.path.join(out, folder, f"{key(curve, lr, seed)}.json"))
        if noise_scale:
            fields.update(noise_scale=True)
        return train.Config(**fields)


def _read(path):
    with open(path) as f:
        return json.load(f)


def key(curve, lr, seed):
    return f"{curve.name}_lr{lr:g}_s{seed}"


class Study:
    """Runs what is missing, in order, up to `max_runs` new runs."""

    def __init__(self, plan, out, max_runs=None, curves=None):
        self.plan = plan
        self.out = out
        self.runs_dir = os.path.join(out, "runs")
        self.left = math.inf if max_runs is None else max_runs
        self.only = set(curves or ())
        self.done_now = 0

    def selected(self, ablation=None, decoupled=False):
        """The curves of a phase (None: either way), among `--curves`."""
        return [c for c in self.plan.curves
                if (ablation is None or c.ablation == ablation)
                and (decoupled is None or (c.excluded is not None) == decoupled)
                and (not self.only or c.name in self.only)]

    def config(self, curve, lr, seed):
        # The first final seed of some curves logs per-layer statistics; the
        # decoupled curves' finals log the noise scale.
        return self.plan.config(curve, lr, seed, self.out, layer_statistics=(
            seed == self.plan.final_seeds[0] and curve.name in self.plan.layer_statistics),
            noise_scale=curve.excluded is not None and seed in self.plan.final_seeds)

    def record(self, curve, lr, seed):
        """The run's record, or None; raises if it was made differently."""
        path = os.path.join(self.runs_dir, key(curve, lr, seed) + ".json")
        if not os.path.exists(path):
            return None
        with open(path) as f:
            done = json.load(f)
        expected = {k: v for k, v in dataclasses.asdict(self.config(curve, lr, seed)).items()
                    if k not in IGNORED}
        stored = {k: v for k, v in done["config"].items() if k not in IGNORED}
        # A field added since the record was made (excluded_lr, noise_scale)
        # is absent from it: the same run if the field is at its default.
        from recipes import train

        defaults = {f.name: f.default for f in dataclasses.fields(train.Config)}
        changed = sorted(k for k in set(stored) | set(expected)
                         if stored.get(k, defaults.get(k)) != expected.get(k))
        if changed:
            raise ValueError(
                f"{path} was made with a different configuration "
                f"({', '.join(changed)}); delete it to rerun it.")
        return done

    def accuracies(self, curve):
        out = {}
        # Every point a window can reach.
        for i in range(curve.start - self.plan.max_slides,
                       curve.start + self.plan.grid_points + self.plan.max_slides
                       + BREAK_POINTS):
            lr = self.plan.lr(curve, i)
            record = self.record(curve, lr, self.plan.tune_seed)
            if record is not None:
                out[lr] = report.final_accuracy(record)
        return out

    def execute(self, curve, lr, seed, phase, config=None, runs_dir=None):
        """Runs one configuration unless its record exists; returns the record.

        `config` and `runs_dir` default to the study's (`config`, `runs`);
        the noise phase's re-runs go elsewhere with their own."""
        from recipes import train

        runs_dir = runs_dir or self.runs_dir
        if config is None:
            config = self.config(curve, lr, seed)
            done = self.record(curve, lr, seed)
        else:
            path = os.path.join(runs_dir, key(curve, lr, seed) + ".json")
            done = _read(path) if os.path.exists(path) else None
        if done is not None:
            return done
        if self.left <= 0:
            return None
        import keras

        keras.backend.clear_session()
        began = time.time()
        # Checkpoints at each epoch end; a run killed midway resumes there
        # (<out>/partial/runs/<key>; the noise phase's: partial/noise_scale/runs).
        partial = os.path.join(self.out, "partial", os.path.relpath(runs_dir, self.out),
                               key(curve, lr, seed))
        result = train.run(config, checkpoint_dir=partial)
        record = dict(result["record"], study={
            "curve": curve.name, "phase": phase, "lr": lr, "seed": seed,
            "key": key(curve, lr, seed),
        })
        from recipes.records import write_json

        write_json(os.path.join(runs_dir, key(curve, lr, seed) + ".json"), record)
        shutil.rmtree(partial)
        self.left -= 1
        self.done_now += 1
        test = record.get("test_accuracy")
        print(f"[{time.strftime('%H:%M:%S')}] {key(curve, lr, seed)}: validation "
              f"{report.final_accuracy(record):.4f}, test "
              f"{'-' if test is None else f'{test:.4f}'} ({time.time() - began:.0f} s)",
              flush=True)
        return record

    def tune(self, curve):
        """Runs the window's missing points, sliding as needed; the chosen lr."""
        while True:
            window, state, chosen = self.plan.tuning_state(curve, self.accuracies(curve))
            if state == "tuned":
                return chosen
            missing = [lr for lr in window if lr not in self.accuracies(curve)]
            for lr in missing:
                if self.execute(curve, lr, self.plan.tune_seed, "tune") is None:
                    return None  # out of runs

    def finals(self, curve, phase):
        chosen = self.tune(curve) if phase == "ablation" else \
            self.plan.tuning_state(curve, self.accuracies(curve))[2]
        if chosen is None:
            print(f"{curve.name}: not tuned yet; its finals wait.", flush=True)
            return
        for seed in self.plan.seeds(curve):
            if self.execute(curve, chosen, seed, phase) is None:
                return

    def check_rates(self, curve):
        """Runs the chosen step at each of `Plan.rate_variants` (seed 0)."""
        chosen = self.plan.tuning_state(curve, self.accuracies(curve))[2]
        if chosen is None:
            print(f"{curve.name}: not tuned yet; its rate check waits.", flush=True)
            return
        for variant in self.plan.rate_variants(curve):
            if self.execute(variant, chosen, self.plan.tune_seed, "rates") is None:
                return

    def noise(self, curve):
        """Re-runs the curve's first final seed with the gradient noise scale
        logged every update (records and statistics in <out>/noise_scale/)."""
        chosen = self.plan.tuning_state(curve, self.accuracies(curve))[2]
        if chosen is None:
            print(f"{curve.name}: not tuned yet; its noise-scale run waits.", flush=True)
            return
        seed = self.plan.final_seeds[0]
        config = dataclasses.replace(
            self.plan.config(curve, chosen, seed, self.out, noise_scale=True),
            layer_stats_interval=1)
        self.execute(curve, chosen, seed, "noise", config,
                     os.path.join(self.out, "noise_scale", "runs"))

    def until_broken(self, curve):
        """Runs up the ladder from the highest lr run, after tuning, until a
        point breaks (see BREAK_DROP); the lr that broke, or None."""
        if self.plan.tuning_state(curve, self.accuracies(curve))[2] is None:
            print(f"{curve.name}: not tuned yet; its high end waits.", flush=True)
            return None
        while True:
            accuracies = self.accuracies(curve)
            top = max(accuracies)
            if self.plan.broken(accuracies[top], max(accuracies.values())):
                return top
            index = round(math.log2(top / curve.base)) + 1
            limit = (curve.start + self.plan.grid_points + self.plan.max_slides
                     + BREAK_POINTS)
            if index >= limit or self.execute(
                    curve, self.plan.lr(curve, index), self.plan.tune_seed,
                    "break") is None:
                return None

    def run(self, phases):
        for phase in phases:
            if phase == "tune":
                for curve in self.selected(ablation=False):
                    self.tune(curve)
            elif phase == "final":  # the tied curves', then the decoupled ones'
                for curve in self.selected(ablation=False, decoupled=None):
                    self.finals(curve, "final")
            elif phase == "ablation":
                for curve in self.selected(ablation=True):
                    self.finals(curve, "ablation")
            elif phase == "break":
                for curve in self.selected():
                    self.until_broken(curve)
            elif phase == "decoupled":  # tuned, and run until it breaks
                for curve in self.selected(decoupled=True):
                    self.tune(curve)
                    self.until_broken(curve)
            elif phase == "rates":
                for curve in self.selected(decoupled=True):
                    self.check_rates(curve)
            elif phase == "noise":
                for name in self.plan.noise_curves:
                    if not self.only or name in self.only:
                        self.noise(self.plan.curve(name))

    def status(self):
        lines = []
        total = 0.0
        for curve in self.plan.curves:
            accuracies = self.accuracies(curve)
            window, state, chosen = self.plan.tuning_state(curve, accuracies)
            finals = [s for s in self.plan.seeds(curve)
                      if chosen is not None and self.record(curve, chosen, s)]
            lines.append(
                f"{curve.name:<28} {state:<12} window {window[0]:g}..{window[-1]:g} "
                f"({sum(lr in accuracies for lr in window)}/{len(window)} run), chosen "
                f"{'-' if chosen is None else f'{chosen:g}'}, finals "
                f"{len(finals)}/{len(self.plan.seeds(curve))}")
        records = report.load_records(self.runs_dir)
        total = sum(r.get("wall_seconds") or 0 for r in records)
        lines.append(f"{len(records)} runs on record, {total / 3600:.2f} h of run time.")
        return "\n".join(lines)


def define_flags(flag_values=flags.FLAGS):
    flags.DEFINE_integer("max_runs", None, "stop after this many new runs (resume later)",
                         flag_values=flag_values)
    flags.DEFINE_list("curves", [], "only these curves (comma-separated names; see status)",
                      flag_values=flag_values)
    flags.DEFINE_string("out", None, "results folder (default docs/results; --quick: "
                        "runs/study_quick)", flag_values=flag_values)
    flags.DEFINE_string("img", None, "figures folder (default docs/img; --quick: <out>/img)",
                        flag_values=flag_values)
    flags.DEFINE_string("results_md", None, "the markdown file whose report blocks are "
                        "regenerated (default docs/results.md; --quick: none)",
                        flag_values=flag_values)
    flags.DEFINE_bool("quick", False, "a tiny end-to-end run (the test): 3 curves, 2 "
                      "points, 2 epochs on 512 examples, B=256", flag_values=flag_values)


def main(argv, flag_values=flags.FLAGS):
    """Runs the phases `argv[1:]` (one of PHASES each; none: all = tune,
    ablation, break, decoupled, rates, final, noise, report), the flags
    parsed into `flag_values`."""
    for phase in argv[1:]:
        if phase not in PHASES:
            raise app.UsageError(
                f"unknown phase {phase!r}; expected some of {', '.join(PHASES)}.")
    max_runs = flag_values.max_runs
    if max_runs is not None and max_runs < 0:
        raise app.UsageError(f"--max_runs must be >= 0; received --max_runs={max_runs}.")
    quick = flag_values.quick
    plan = Plan(quick=quick)
    out = flag_values.out or ("runs/study_quick" if quick else "docs/results")
    img = flag_values.img or (os.path.join(out, "img") if quick else "docs/img")
    results_md = flag_values.results_md if flag_values.results_md is not None else (
        "" if quick else "docs/results.md")
    for name in flag_values.curves:
        plan.curve(name)  # raises for an unknown name
    phases = argv[1:] or ["all"]
    if "all" in phases:
        phases = ["tune", "ablation", "break", "decoupled", "rates", "final", "noise",
                  "report"]
    study = Study(plan, out, max_runs, flag_values.curves)
    began = time.time()
    study.run([p for p in phases if p not in ("status", "report")])
    if "report" in phases:
        for path in report.write_report(plan, out, img, results_md or None):
            print(f"wrote {path}")
    if "status" in phases or study.done_now:
        print(study.status())
    print(f"{study.done_now} new runs in {time.time() - began:.0f} s.", flush=True)
    return study


def run_args(args):
    """`main` from command-line arguments (phases and flags, no program name)."""
    flag_values = flags.FlagValues()
    define_flags(flag_values)
    return main(flag_values(["recipes.study", *args]), flag_values)


def _main(argv):
    try:
        main(argv)
    except ValueError as error:
        sys.exit(f"recipes.study: error: {error}")


if __name__ == "__main__":
    define_flags()
    app.run(_main)
