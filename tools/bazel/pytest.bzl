"""pytest_test: a py_test that runs pytest modules."""

def pytest_test(name, srcs, deps = [], data = [], args = [], **kwargs):
    """A py_test running pytest on `srcs` with the project's pytest config.

    Args:
      name: the test's name.
      srcs: the pytest modules to run.
      deps: py_library targets they import.
      data: more runtime files.
      args: more pytest arguments (e.g. ["-m", "not slow"]).
      **kwargs: passed to py_test (size, timeout, tags, ...).
    """
    main = "//tools/bazel:pytest_main.py"
    native.py_test(
        name = name,
        srcs = [main] + srcs,
        main = main,
        # Paths of the modules relative to the runfiles root, the test's cwd.
        args = ["$(rootpath %s)" % src for src in srcs] + args,
        # pyproject.toml holds the pytest config (markers, warnings filters)
        # and makes the runfiles root pytest's rootdir.
        data = data + ["//:pyproject.toml"],
        deps = deps,
        # No __init__.py added in runfiles: pytest must see tests/ as a
        # plain directory (as in the source tree) so that test modules import
        # their helpers (e.g. numpy_reference) by bare name.
        legacy_create_init = False,
        python_version = "PY3",
        srcs_version = "PY3",
        **kwargs
    )
