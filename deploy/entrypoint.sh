#!/bin/sh
# Container entrypoint: `lbproxy "$@"`, with an admin token.
#
# The compose file binds the admin listener to 0.0.0.0 (Prometheus scrapes it from another container),
# and lbproxy refuses to expose it without a token (SECURITY.md). Give one with LBPROXY_ADMIN_TOKEN or
# LBPROXY_ADMIN_TOKEN_FILE (a Docker/Kubernetes secret); with neither, a random one is generated once
# into ADMIN_TOKEN_PATH (default /data/runs/admin_token, on the `runs` volume, so it survives restarts):
#   docker compose exec lbproxy cat /data/runs/admin_token
# Reads (/metrics, /healthz, /readyz, GET /admin/backends) need no token.
set -eu

if [ -z "${LBPROXY_ADMIN_TOKEN:-}" ] && [ -z "${LBPROXY_ADMIN_TOKEN_FILE:-}" ]; then
    unset LBPROXY_ADMIN_TOKEN
    token_file="${ADMIN_TOKEN_PATH:-/data/runs/admin_token}"
    if [ ! -s "$token_file" ]; then
        mkdir -p "$(dirname "$token_file")"
        (
            umask 077
            python -c 'import secrets; print(secrets.token_urlsafe(32))' >"$token_file.tmp"
            mv "$token_file.tmp" "$token_file"
        )
        echo "lbproxy: generated an admin token in $token_file (POST/DELETE /admin/... need it)" >&2
    fi
    export LBPROXY_ADMIN_TOKEN_FILE="$token_file"
fi

exec lbproxy "$@"
