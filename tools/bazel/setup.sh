#!/usr/bin/env bash
# Set-up for `bazel test` offline (docs/bazel.md): installs Debian's Bazel
# 4.2.3 and the local copies of the repositories it would download, if any
# is missing. The venv's path needs no set-up: tools/bazel/venv.bzl finds it.
set -euo pipefail
cd "$(dirname "$0")/../.."

# Package -> a file it installs that the build uses (see .bazelrc).
declare -A PACKAGES=(
    [bazel-bootstrap]=/usr/bin/bazel-4
    [bazel-bootstrap-source]=/usr/src/bazel-bootstrap/mock_repos/rules_cc/cc/defs.bzl
    [bazel-rules-java]=/usr/share/bazel/rules/java/java/defs.bzl
)
missing=()
for package in "${!PACKAGES[@]}"; do
    [[ -e "${PACKAGES[$package]}" ]] || missing+=("$package")
done
if (( ${#missing[@]} )); then
    echo "tools/bazel/setup.sh: installing ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi

if [[ ! -x .venv/bin/python && -z "${KERAS_CLARS_PYTHON:-}" ]]; then
    echo "tools/bazel/setup.sh: no .venv/bin/python: run \`make setup\` first" >&2
    exit 1
fi
