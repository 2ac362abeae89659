# Sourced after scripts/_bootstrap.sh by scripts/check and scripts/test, the two that run
# promtool (check: contrib/prometheus/; the tests: the rules, the dashboard's queries and a
# real scrape). Kept out of _bootstrap.sh so that ./scripts/demo, ./scripts/shop and
# ./scripts/bench no longer download the ~95 MB Prometheus package they never use.
#
# promtool (and the prometheus server used by scripts/render_dashboard.py) come from the
# Debian package "prometheus", unpacked into .tools/ rather than installed: no service is
# started.
if ! command -v promtool >/dev/null 2>&1 && [ ! -x "$ROOT/.tools/prometheus/usr/bin/promtool" ] \
        && [ -z "${RCACHE_NO_APT:-}" ] && command -v apt-get >/dev/null 2>&1; then
    echo "rcache: fetching promtool (Debian package prometheus) into .tools/ ..." >&2
    _tmp="$(mktemp -d)"
    if (cd "$_tmp" && apt-get download prometheus >/dev/null 2>&1) \
        || { [ "$(id -u)" = 0 ] && apt-get update -qq && (cd "$_tmp" && apt-get download prometheus >/dev/null); }; then
        dpkg-deb -x "$_tmp"/prometheus_*.deb "$ROOT/.tools/prometheus"
    else
        echo "rcache: could not fetch promtool; apt-get install prometheus" >&2
    fi
    rm -rf "$_tmp"
fi
export PATH="$ROOT/.tools/prometheus/usr/bin:$PATH"
