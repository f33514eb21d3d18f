#!/usr/bin/env bash
# Build the meshlet image (meshlet:latest) from wheels built on this host.
#
# 1. wheels: meshlet itself (`pip wheel --no-deps .`, reproducible through
#    SOURCE_DATE_EPOCH) into compose/.wheels/meshlet, every dependency into
#    compose/.wheels/deps (with requirements.txt); dependencies are taken from that
#    directory when they are all there (no network), else from PyPI;
# 2. the image: `docker build compose/` with BASE (default meshlet-base:bookworm, made
#    by compose/build-base.sh when missing; MESHLET_BASE=python:3.11-slim for the usual
#    registry base). The image carries a label with a hash of the wheels, the Dockerfile
#    and the base image id; when meshlet:latest already has that hash nothing is built.
#
#   compose/build-image.sh                  # prints the image name
#   MESHLET_IMAGE=meshlet:dev MESHLET_BASE=python:3.11-slim compose/build-image.sh
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
IMAGE=${MESHLET_IMAGE:-meshlet:latest}
BASE=${MESHLET_BASE:-meshlet-base:bookworm}
WHEELS=$HERE/.wheels
PY=${MESHLET_PYTHON:-$ROOT/.venv/bin/python}

say() { printf 'build-image: %s\n' "$*" >&2; }
die() { printf 'build-image: error: %s\n' "$*" >&2; exit 1; }

[[ -x $PY ]] || PY=python3
"$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
  || die "$PY is not Python 3.11: the wheels must match the image's python3 (set MESHLET_PYTHON)"
command -v docker >/dev/null || die "docker is not installed (apt-get install docker.io)"
mkdir -p "$WHEELS"

exec 9>"$WHEELS/.lock"
flock -w 900 9 || die "another build holds $WHEELS/.lock"

start=$SECONDS
pip_wheel() {
  "$PY" -m pip wheel --disable-pip-version-check --quiet "$@"
}
mkdir -p "$WHEELS/deps" "$WHEELS/meshlet"
# meshlet: a fixed timestamp makes the wheel the same bytes for the same source.
rm -f "$WHEELS"/meshlet/*.whl
export SOURCE_DATE_EPOCH=315532800
pip_wheel -w "$WHEELS/meshlet" --no-deps --no-build-isolation "$ROOT" >/dev/null 2>&1 \
  || pip_wheel -w "$WHEELS/meshlet" --no-deps "$ROOT" >/dev/null \
  || die "pip wheel $ROOT failed"
rm -rf "$ROOT/build"
meshlet_whl=$(ls "$WHEELS"/meshlet/meshlet-*.whl)
# its requirements (not the extras), then their wheels: from the directory if complete,
# else fetched once (and kept there).
"$PY" - "$meshlet_whl" >"$WHEELS/deps/requirements.txt" <<'PY'
import email, sys, zipfile

wheel = zipfile.ZipFile(sys.argv[1])
name = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
for req in email.message_from_bytes(wheel.read(name)).get_all("Requires-Dist") or []:
    if "extra ==" not in req:
        print(req)
PY
deps=(-w "$WHEELS/deps" --find-links "$WHEELS/deps" -r "$WHEELS/deps/requirements.txt")
if ! pip_wheel --no-index "${deps[@]}" >/dev/null 2>&1; then
  say "fetching dependency wheels into $WHEELS/deps"
  pip_wheel "${deps[@]}" || die "pip wheel of the dependencies failed"
fi
say "wheels ready in $((SECONDS - start)) s"

if [[ $BASE == meshlet-base:* ]]; then
  MESHLET_BASE_IMAGE=$BASE "$HERE/build-base.sh" >/dev/null
fi
base_id=$(docker image inspect -f '{{ .Id }}' "$BASE" 2>/dev/null || echo "$BASE")
hash=$(
  {
    (cd "$WHEELS" && sha256sum -- deps/*.whl deps/requirements.txt meshlet/*.whl)
    sha256sum <"$HERE/Dockerfile"
    sha256sum <"$HERE/.dockerignore"
    echo "$base_id"
  } | sha256sum | cut -c1-32
)
have=$(docker image inspect -f '{{ index .Config.Labels "org.meshlet.hash" }}' "$IMAGE" 2>/dev/null || true)
if [[ $have == "$hash" ]]; then
  say "$IMAGE is up to date ($hash)"
  echo "$IMAGE"
  exit 0
fi

say "building $IMAGE on $BASE"
start=$SECONDS
log=$(mktemp /tmp/meshlet-build-image.XXXXXX)
if ! DOCKER_BUILDKIT=0 docker build --build-arg "BASE=$BASE" --label "org.meshlet.hash=$hash" \
    -t "$IMAGE" "$HERE" >"$log" 2>&1; then
  tail -n 30 "$log" >&2
  die "docker build failed (log: $log)"
fi
rm -f "$log"
# the images this one replaced (untagged now); the build stage's layers stay as the cache
docker image prune -f --filter dangling=true --filter label=org.meshlet.hash >/dev/null || true
say "built $IMAGE in $((SECONDS - start)) s"
echo "$IMAGE"
