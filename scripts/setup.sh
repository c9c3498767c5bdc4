#!/usr/bin/env bash
# One-time set-up shared by the README commands: a virtualenv in .venv with branchify and its
# dev/recipe extras installed (editable), plus the offline Fashion-MNIST data set.
# Re-running is cheap: the install is skipped while pyproject.toml is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=".venv/.branchify-installed-$(sha1sum pyproject.toml | cut -c1-12)"
if [ ! -f "$stamp" ]; then
    echo "[setup] installing branchify[dev] into .venv (first run pulls torch: a few minutes)"
    .venv/bin/python -m pip install --quiet -e ".[dev]"
    rm -f .venv/.branchify-installed-*
    touch "$stamp"
fi

# Fashion-MNIST, the offline default data set. Debian/Ubuntu ship it as a package; elsewhere the
# recipes fall back to torchvision's download (set BRANCHIFY_FASHION_MNIST to use your own copy).
if [ -z "${BRANCHIFY_FASHION_MNIST:-}" ] && [ ! -d /usr/share/datasets/fashion-mnist ]; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        echo "[setup] installing Fashion-MNIST (apt package dataset-fashion-mnist)"
        (apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null) \
            || echo "[setup] apt could not install dataset-fashion-mnist; recipes will try torchvision's download"
    else
        echo "[setup] no /usr/share/datasets/fashion-mnist; recipes will try torchvision's download"
    fi
fi
