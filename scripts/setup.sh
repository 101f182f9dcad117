#!/usr/bin/env bash
# Installs what lite needs on Debian to serve: Apache and Debian's mod_wsgi
# (built for /usr/bin/python3) from apt; with --dev, also what the tests
# need: siege, wrk, Debian's Chromium and ChromeDriver, systemd (whose
# systemd-analyze checks lite's unit), PostgreSQL 15, .venv (made from
# /usr/bin/python3) with the test tools of requirements-dev.txt, and
# Django's source distribution (its own tests) in build/.
# With LITE_POSTGRES=private (serve.sh's private PostgreSQL), PostgreSQL 15
# too. Idempotent: installs only what is missing. Needs root for apt-get.
# `--list` (after --dev, or alone) prints the Debian packages and installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

# Serving needs Apache, mod_wsgi (with rotatelogs, from apache2-utils) and Python.
PACKAGES=(apache2 apache2-utils libapache2-mod-wsgi-py3 python3 python3-venv ca-certificates)
if [ "${LITE_POSTGRES:-}" = private ]; then
    PACKAGES+=(postgresql-15) # serve.sh's private PostgreSQL, when asked for
fi
if [ "${1:-}" = "--dev" ]; then
    # The load tools and the browser are the tests' (and the benchmark's);
    # systemd gives systemd-analyze, which checks the unit serve.sh writes;
    # PostgreSQL runs as scripts/postgres.sh's private cluster; the power-cut
    # tests build tests/powerfs.c (FUSE) and the benchmark bench/slow_flush.c.
    PACKAGES+=(siege wrk chromium chromium-driver fonts-liberation systemd postgresql-15)
    PACKAGES+=(fuse3 libfuse3-dev gcc libc6-dev pkg-config)
fi

if [ "${2:-${1:-}}" = "--list" ]; then
    echo "${PACKAGES[*]}" # what it would install: --list, or --dev --list
    exit 0
fi

missing=()
for package in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" ||
        missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup: missing Debian packages: ${missing[*]}; run as root to install them" >&2
        exit 1
    fi
    echo "setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # policy-rc.d 101: the packages must not start the system's own Apache.
    policy=/usr/sbin/policy-rc.d
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy"
        chmod 755 "$policy"
        trap 'rm -f "$policy"' EXIT
    fi
    # No system cluster: lite's tests run their own (scripts/postgres.sh).
    install -d /etc/postgresql-common/createcluster.d
    echo "create_main_cluster = false" >/etc/postgresql-common/createcluster.d/lite.conf
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ "${1:-}" = "--dev" ]; then
    if [ ! -x .venv/bin/python ] || [ requirements-dev.txt -nt .venv/.installed ] ||
        [ requirements.txt -nt .venv/.installed ]; then
        echo "setup: preparing .venv for the tests"
        /usr/bin/python3 -m venv .venv
        .venv/bin/pip install -q --disable-pip-version-check -r requirements-dev.txt
        touch .venv/.installed
    fi
    # Django's own tests, from its source distribution (tests/test_django_suite.py).
    django=$(sed -n 's/^django==//p' requirements-dev.txt)
    if [ ! -d "build/django-$django/tests" ]; then
        echo "setup: Django $django's source distribution, for its own tests, into build/"
        mkdir -p build
        .venv/bin/pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
            -d build "django==$django"
        tar -xzf "build/django-$django.tar.gz" -C build
    fi
fi
