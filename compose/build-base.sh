#!/usr/bin/env bash
# Build the local base image meshlet-base:bookworm for when no image registry is
# reachable: debootstrap a minimal Debian bookworm (python3, python3-venv, iproute2,
# nftables, ca-certificates) from the machine's configured apt mirror, then
# `docker import` it.
#
# The root file system is cached as a tarball (default
# /var/cache/meshlet/base-bookworm.tar.zst, MESHLET_CACHE_DIR to move it) and reused
# while the package list is unchanged; the image is imported only when the engine lacks
# it (or holds one built from another package list). Needs root, debootstrap and zstd.
#
#   compose/build-base.sh              # build or reuse; prints the image name
#   DOCKER_HOST=unix:///run/x.sock compose/build-base.sh
#   MESHLET_DEBIAN_MIRROR=http://deb.debian.org/debian compose/build-base.sh
set -euo pipefail

IMAGE=${MESHLET_BASE_IMAGE:-meshlet-base:bookworm}
SUITE=bookworm
PACKAGES=python3,python3-venv,iproute2,nftables,ca-certificates
CACHE_DIR=${MESHLET_CACHE_DIR:-/var/cache/meshlet}
TARBALL=$CACHE_DIR/base-$SUITE.tar.zst
STAMP=$CACHE_DIR/base-$SUITE.packages
# The image is labelled with what it was built from, so a changed list rebuilds it.
RECIPE="$SUITE minbase $PACKAGES v1"
KEY=$(printf '%s' "$RECIPE" | sha256sum | cut -c1-16)

say() { printf 'build-base: %s\n' "$*" >&2; }
die() { printf 'build-base: error: %s\n' "$*" >&2; exit 1; }

# The Debian mirror the machine's apt uses: the first deb822 stanza or one-line entry
# whose suites include $SUITE itself (not -security or -updates).
find_mirror() {
  local f
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [[ -r $f ]] || continue
    awk -v suite="$SUITE" '
      /^[[:space:]]*#/ { next }
      /^deb[[:space:]]/ {
        n = split($0, w, /[[:space:]]+/); i = 2
        if (w[i] ~ /^\[/) { while (i <= n && w[i] !~ /\]$/) i++; i++ }
        if (w[i+1] == suite) { print w[i]; exit }
        next
      }
      /^URIs:/ { uri = $2 }
      /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == suite) hit = 1 }
      /^[[:space:]]*$/ { if (hit && uri != "") { print uri; exit } uri = ""; hit = 0 }
      END { if (hit && uri != "") print uri }
    ' "$f" | head -n1
  done | head -n1
}

[[ $(id -u) -eq 0 ]] || die "run as root (debootstrap and docker import need it)"
command -v docker >/dev/null || die "docker is not installed (apt-get install docker.io)"
command -v zstd >/dev/null || die "zstd is not installed (apt-get install zstd)"
mkdir -p "$CACHE_DIR"

# One build at a time per cache directory; a second caller waits and then reuses it.
exec 9>"$CACHE_DIR/base-$SUITE.lock"
flock -w 900 9 || die "another build of the base holds $CACHE_DIR/base-$SUITE.lock"

label=$(docker image inspect -f '{{ index .Config.Labels "org.meshlet.base" }}' "$IMAGE" 2>/dev/null || true)
if [[ $label == "$KEY" ]]; then
  say "$IMAGE is up to date"
  echo "$IMAGE"
  exit 0
fi

if [[ ! -s $TARBALL || $(cat "$STAMP" 2>/dev/null) != "$KEY" ]]; then
  command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install debootstrap)"
  MIRROR=${MESHLET_DEBIAN_MIRROR:-$(find_mirror)}
  [[ -n $MIRROR ]] || die "no apt mirror for $SUITE in /etc/apt/sources.list*; set MESHLET_DEBIAN_MIRROR"
  root=$(mktemp -d /var/tmp/meshlet-base.XXXXXX)
  trap 'rm -rf --one-file-system "$root"' EXIT
  say "debootstrap $SUITE ($PACKAGES) from $MIRROR"
  start=$SECONDS
  if ! debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$root" "$MIRROR" \
      >"$root.log" 2>&1; then
    tail -n 20 "$root.log" >&2
    die "debootstrap failed (full log: $root.log)"
  fi
  rm -f "$root.log"
  # What an image does not need: package lists, caches, docs (the copyright files stay).
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
    "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/var/log/*.log "$root"/tmp/*
  find "$root"/usr/share/doc -type f ! -name copyright -delete 2>/dev/null || true
  printf 'deb %s %s main\n' "$MIRROR" "$SUITE" >"$root/etc/apt/sources.list"
  say "debootstrap took $((SECONDS - start)) s; packing $TARBALL"
  tar --numeric-owner --one-file-system -C "$root" -cf - . | zstd -q -T0 -6 -o "$TARBALL.tmp"
  mv -f "$TARBALL.tmp" "$TARBALL"
  echo "$KEY" >"$STAMP"
  rm -rf --one-file-system "$root"
  trap - EXIT
fi

say "importing $TARBALL as $IMAGE"
zstd -q -dc "$TARBALL" | docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change "LABEL org.meshlet.base=$KEY" \
  --change 'CMD ["/bin/bash"]' \
  - "$IMAGE" >/dev/null
echo "$IMAGE"
