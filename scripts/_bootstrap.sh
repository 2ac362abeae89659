# Sourced by every scripts/* entry point: installs whatever is missing (uv, redis-server,
# .venv). promtool is fetched by scripts/_promtool.sh, for scripts/check and scripts/test only.
# Needs only Python >= 3.10 and PyPI; installs redis-server with apt when it is missing and
# we are root (or have passwordless sudo). Never starts a system service.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
UV_VERSION="0.13.9"

PY="${PYTHON:-python3}"
if ! command -v "$PY" >/dev/null 2>&1; then
    echo "rcache: python3 (>= 3.10) is required; install it first (e.g. apt-get install python3 python3-venv)" >&2
    exit 1
fi
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
    echo "rcache: Python >= 3.10 is required, found $("$PY" --version)" >&2
    exit 1
fi

# uv, pinned, in a private folder: the project's lock (uv.lock) decides every other version.
UV="$ROOT/.tools/bin/uv"
if [ ! -x "$UV" ]; then
    echo "rcache: installing uv $UV_VERSION into .tools/ ..." >&2
    "$PY" -m venv "$ROOT/.tools" >/dev/null
    "$ROOT/.tools/bin/python" -m pip install --quiet --disable-pip-version-check "uv==$UV_VERSION"
fi
export UV_PYTHON_DOWNLOADS=never
export UV_PYTHON="$PY"

# redis-server: tests and the demo start their own throwaway servers.
if ! command -v redis-server >/dev/null 2>&1 && [ -z "${RCACHE_NO_APT:-}" ]; then
    if [ "$(id -u)" = 0 ]; then
        echo "rcache: installing redis-server with apt-get ..." >&2
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null) \
            || echo "rcache: could not install redis-server with apt-get" >&2
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        (sudo -n apt-get update -qq && sudo -n env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null) \
            || echo "rcache: could not install redis-server with apt-get" >&2
    fi
fi

"$UV" sync --all-packages --frozen --inexact --quiet
