"""The main of every pytest_test: runs pytest on the files in argv.

py_test needs a main module; the project's tests are pytest modules.
"""

import os
import sys

import pytest

if __name__ == "__main__":
    # Runfiles are read-only: no .pytest_cache.
    args = ["-q", "-p", "no:cacheprovider"]
    # Bazel reads per-test-case results from this file when it exists.
    if "XML_OUTPUT_FILE" in os.environ:
        args.append("--junitxml=" + os.environ["XML_OUTPUT_FILE"])
    sys.exit(pytest.main(args + sys.argv[1:]))
