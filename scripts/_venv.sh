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

# A fresh .venv with pip in it. Debian's own python3 leaves ensurepip to the python3.X-venv
# package: without it `venv` fails half-way (a .venv with no pip); as root with apt-get
# that package is installed, otherwise the message says which one to install.
make_venv() {
    local py pkg
    py="$(find_python)"
    rm -rf .venv
    if "$py" -m venv .venv >/dev/null 2>&1; then
        return 0
    fi
    rm -rf .venv
    pkg="$("$py" -c 'import sys; print("python%d.%d-venv" % sys.version_info[:2])')"
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "== apt-get install $pkg (venv's ensurepip)" >&2
        apt_install "$pkg" || true
    fi
    "$py" -m venv .venv || {
        rm -rf .venv
        echo "cannot make .venv with $py: install $pkg (Debian) or set PYTHON" >&2
        return 1
    }
}

# apt-get install quietly, without recommends, after one `apt-get update` (a fresh
# machine has no package lists yet); its output goes to .apt.log.
apt_install() {
    if [ -z "${APT_UPDATED:-}" ]; then
        apt-get update -qq >>.apt.log 2>&1 || true
        APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" \
        >>.apt.log 2>&1
}

ensure_venv() {
    local extras="${1:-}"
    if [ ! -x .venv/bin/python ]; then
        make_venv
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
    # about to install: a .venv without pip (a venv made half-way) is made again
    if ! .venv/bin/python -c 'import pip' >/dev/null 2>&1; then
        make_venv
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
