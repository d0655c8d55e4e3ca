#!/bin/sh
# Stub of Bazel's coverage tools: see docs/bazel.md.
echo "keras-clars: 'bazel coverage' does not work offline: @remote_coverage_tools is a stub (tools/bazel/remote_coverage_tools, docs/bazel.md)." >&2
exit 1
