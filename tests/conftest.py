import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Subprocesses started by tests (workers, recipes run as modules) import
# `recipes` and `benchmarks` from the repository root, and the tests' own
# helpers (numpy_reference, test modules) from tests/, as pytest does here.
_TESTS = os.path.dirname(os.path.abspath(__file__))
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (os.path.dirname(_TESTS), _TESTS, os.environ.get("PYTHONPATH")) if p
)
