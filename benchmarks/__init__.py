"""Speed and cost measurements; run each as a module from the repository root,
e.g. `python -m benchmarks.optimizer_step`."""
