# Sourced by bin/emaki and bin/test: makes sure .venv holds emaki with the wanted extras.
# The first call creates the environment (about a minute, from the package registries); later
# calls only compare a stamp and start at once. Every install goes through constraints.txt.
emaki_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
emaki_venv="${EMAKI_VENV:-$emaki_root/.venv}"

ensure_venv() {
    local extras="$1"
    local python="${PYTHON:-python3}"
    local stamp="$emaki_venv/.emaki-$extras"
    local want
    want="$(cat "$emaki_root/pyproject.toml" "$emaki_root/constraints.txt" | sha256sum | cut -c1-16)"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return 0
    fi
    # The dev extra includes everything core and train need.
    if [ "$extras" != dev ] && [ -f "$emaki_venv/.emaki-dev" ] \
        && [ "$(cat "$emaki_venv/.emaki-dev")" = "$want" ]; then
        return 0
    fi
    if ! "$python" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)' 2>/dev/null; then
        echo "emaki: needs Python 3.11 (the torch 2.13.0 CPU wheel is built for it); set PYTHON=/path/to/python3.11" >&2
        exit 2
    fi
    echo "emaki: setting up $emaki_venv ($extras) ..." >&2
    [ -x "$emaki_venv/bin/python" ] || "$python" -m venv "$emaki_venv"
    "$emaki_venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        -c "$emaki_root/constraints.txt" -e "$emaki_root[$extras]" >&2
    echo "$want" > "$stamp"
}

ensure_browser() {
    # The web page's tests drive Debian's chromium with Selenium; install it when missing.
    if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
        return 0
    fi
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo="$(command -v sudo || true)"
    if command -v apt-get >/dev/null && { [ "$(id -u)" = 0 ] || [ -n "$sudo" ]; }; then
        echo "emaki: installing chromium and chromium-driver for the web page's tests ..." >&2
        if $sudo apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 \
            || { $sudo apt-get update -q >/dev/null 2>&1 \
                 && $sudo apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; }; then
            return 0
        fi
    fi
    echo "emaki: WARNING: no chromium/chromedriver and cannot install them: browser tests skipped" >&2
    export EMAKI_SKIP_BROWSER=1
}
