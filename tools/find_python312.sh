#!/bin/sh
# Prints the command that runs Python 3.12 (megatron-core >= 0.17 needs >= 3.12; the project is tested on 3.12),
# for the Makefile's venv: `python3.12` or `python3` when either is 3.12, else pyenv's newest installed 3.12.x as
# `env PYENV_VERSION=3.12.N python3.12`. Without one it says how to get it on stderr and exits 1.
# Only shell built-ins besides the candidates themselves (tests/test_setup_commands.py runs it with a bare PATH).

is_312() {  # "$@": a command prefix; true when it runs Python 3.12
    "$@" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' >/dev/null 2>&1
}

for candidate in python3.12 python3; do
    if is_312 "$candidate"; then
        echo "$candidate"
        exit 0
    fi
done

if command -v pyenv >/dev/null 2>&1; then
    newest=""
    for version in $(pyenv versions --bare 2>/dev/null); do
        case "$version" in
            3.12.*[!0-9]*) ;;  # 3.12.1/envs/x, 3.12.0rc1, ...: not a plain release
            3.12.*) newest="$version" ;;  # `pyenv versions` lists in ascending order
        esac
    done
    if [ -n "$newest" ] && is_312 env PYENV_VERSION="$newest" python3.12; then
        echo "env PYENV_VERSION=$newest python3.12"
        exit 0
    fi
fi

{
    echo "error: Python 3.12 not found (tried python3.12, python3, pyenv's 3.12.x). Get it with one of:"
    echo "  Debian/Ubuntu:  apt-get install -y python3.12 python3.12-venv   (Ubuntu 24.04; older: the deadsnakes PPA)"
    echo "  pyenv:          pyenv install 3.12"
    echo "  uv:             uv python install 3.12   (then: make PYTHON312=\"\$(uv python find 3.12)\" ...)"
    echo "or name an interpreter: make PYTHON312=/path/to/python3.12 ..."
} >&2
exit 1
