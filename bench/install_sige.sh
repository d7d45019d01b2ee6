#!/usr/bin/env bash
# Install the SIGE engine (sige 0.3.0, PyPI) for `make bench-sige`. Bench-only, never in CI.
#
# What it does, nothing more:
#   1. downloads the sige 0.3.0 sdist from PyPI into a scratch directory OUTSIDE the repository
#      (pinned sha256; `pip download` cannot be used for this sdist because pip builds its metadata,
#      which runs the broken setup.py);
#   2. the one-line setup.py fix: it imports `build_ext` from torch.utils.cpp_extension, which
#      recent torch no longer exports; `build_ext` comes from setuptools (BuildExtension stays torch's);
#   3. builds its CPU kernels (~3 min on 2 cores) and installs into the current python against the
#      torch already installed (--no-build-isolation --no-deps: pip never pulls another torch).
# No SIGE code is kept in the repository.
set -euo pipefail

PYTHON=${PYTHON:-python}
DIR=${SIGE_BUILD_DIR:-$HOME/.cache/ssic/sige}
URL=https://files.pythonhosted.org/packages/4c/39/d3da6fdae7f09fa48077740c2ffa72938d11518cb8f4e40f530305bd2da3/sige-0.3.0.tar.gz
SHA256=a7aeb1599ba2a97fe17d3b5c2665c58cca5ff7d890af60a73feffd9e6eb5f626

if "$PYTHON" -c "import sige, sige.cpu, sys; sys.exit(0 if sige.__version__ == '0.3.0' else 1)" 2>/dev/null; then
    echo "sige 0.3.0 already installed"
    exit 0
fi
"$PYTHON" -c "import torch" || { echo "install torch (CPU) first: sige builds against it" >&2; exit 1; }

mkdir -p "$DIR"
cd "$DIR"
if ! echo "$SHA256  sige-0.3.0.tar.gz" | sha256sum -c --status 2>/dev/null; then
    curl -fsSL -o sige-0.3.0.tar.gz "$URL"
    echo "$SHA256  sige-0.3.0.tar.gz" | sha256sum -c
fi
rm -rf sige-0.3.0
tar xzf sige-0.3.0.tar.gz
sed -i 's/^from torch.utils.cpp_extension import build_ext, BuildExtension,/from setuptools.command.build_ext import build_ext; from torch.utils.cpp_extension import BuildExtension,/' \
    sige-0.3.0/setup.py
grep -q '^from setuptools.command.build_ext import build_ext;' sige-0.3.0/setup.py
MAX_JOBS=${MAX_JOBS:-2} "$PYTHON" -m pip install --no-build-isolation --no-deps ./sige-0.3.0
"$PYTHON" -c "import sige, sige.cpu; print('sige', sige.__version__, 'installed')"
