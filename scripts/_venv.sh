# Sourced by scripts/*: make .venv with Python 3.11+ and install the project into it.
# Usage: ensure_venv [extras]   e.g. ensure_venv test
set -euo pipefail

find_python() {
    for py in "${PYTHON:-}" python3.13 python3.12 python3.11 python3; do
        [ -n "$py" ] || continue
        if command -v "$py" >/dev/null 2>&1 &&
            "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "$py"
            return 0
        fi
    done
    echo "batchingest needs Python 3.11 or newer (set PYTHON=/path/to/python3.11)" >&2
    return 1
}

# One stamp for the whole .venv: "<sha256 of pyproject.toml> <extras installed, comma-separated>".
# An install with extras also satisfies a plain one, so scripts/serve after scripts/test
# (or scripts/bench) does not install again; a changed pyproject.toml installs again.
VENV_STAMP=.venv/.installed

ensure_venv() {
    local extras="${1:-}"
    if [ ! -x .venv/bin/python ]; then
        "$(find_python)" -m venv .venv
    fi
    local want have_hash="" have_extras=""
    want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
    if [ -f "$VENV_STAMP" ]; then
        read -r have_hash have_extras <"$VENV_STAMP" || true
    fi
    if [ "$have_hash" = "$want" ]; then
        if [ -z "$extras" ]; then
            return 0
        fi
        case ",$have_extras," in
        *",$extras,"*) return 0 ;;
        esac
        # keep what is installed already: the same pyproject.toml, one more extra
        [ -n "$have_extras" ] && extras="$have_extras${extras:+,$extras}"
    fi
    local spec="."
    [ -n "$extras" ] && spec=".[$extras]"
    echo "installing batchingest${extras:+ with $extras extras} into .venv ..." >&2
    # quiet unless it fails: then the whole pip output says why
    if ! { .venv/bin/python -m pip install --disable-pip-version-check --upgrade pip &&
        .venv/bin/python -m pip install --disable-pip-version-check -e "$spec"; } \
        >.venv/install.log 2>&1; then
        cat .venv/install.log >&2
        echo "installing into .venv failed (log: .venv/install.log)" >&2
        return 1
    fi
    echo "$want $extras" >"$VENV_STAMP"
}
