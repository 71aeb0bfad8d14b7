#!/usr/bin/env bash
# Builds the zeroshard CPU container image with no registry, then checks it.
#
#   scripts/build-image.sh                # → localhost/zeroshard:cpu-local
#   scripts/build-image.sh --rebuild      # cargo build the binary even if present
#   scripts/build-image.sh --bin PATH     # use this zeroshard binary
#   scripts/build-image.sh --refresh-base # remake the cached base rootfs
#
# The published images come from deploy/container/Containerfile (targets gpu
# and cpu), which pulls rust, debian and nvidia/cuda bases from registries.
# No registry is reachable here, so this script builds the cpu target's layout
# from local parts:
#   1. the binary: target/release/zeroshard (cargo builds it only when it is
#      absent, or with --rebuild), a stripped copy;
#   2. the base: a Debian bookworm rootfs made with mmdebstrap (libc6,
#      libgcc-s1, ca-certificates and what they need), the zeroshard user
#      (uid/gid 10001) written straight into its /etc/passwd and /etc/group,
#      tarred and cached under ${XDG_CACHE_HOME:-~/.cache}/zeroshard/, then
#      `podman import`ed as localhost/zeroshard-base:bookworm;
#   3. the image: deploy/container/Containerfile.local, COPY-only (a RUN step
#      cannot run here), tagged localhost/zeroshard:cpu-local;
#   4. the checks: its config (podman image inspect), then its files
#      (podman create + podman export, extracted to a temp dir) and the
#      image's own binary run from that rootfs with chroot, as uid 10001,
#      against the image's glibc.
#
# Running containers is NOT possible on these machines: podman builds images
# but crun/runc fail at setrlimit (no CAP_SYS_RESOURCE in the sandbox). Step 4
# therefore runs the binary from the extracted rootfs instead of `podman run`.
#
# Needs root or passwordless sudo (mmdebstrap, podman, chroot), apt to install
# mmdebstrap/podman when missing, and a Debian mirror the first time (the base
# is cached afterwards). Exits non-zero with one `build-image: FAIL: …` line.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
start=$SECONDS

IMAGE=localhost/zeroshard:cpu-local
BASE_IMAGE=localhost/zeroshard-base:bookworm
SUITE=bookworm
MIRROR=${ZEROSHARD_DEBIAN_MIRROR:-http://deb.debian.org/debian}
PACKAGES=libc6,libgcc-s1,ca-certificates
# Bump when the base recipe below changes: it names the cached tarball.
RECIPE=2

fail() { echo "build-image: FAIL: $*" >&2; exit 1; }
step() { printf '== %s (%ss)\n' "$1" "$((SECONDS - start))"; }

rebuild=0 refresh_base=0 bin=
while [ $# -gt 0 ]; do
  case "$1" in
    --rebuild) rebuild=1 ;;
    --refresh-base) refresh_base=1 ;;
    --bin) [ $# -ge 2 ] || fail "--bin needs a path"; bin=$(realpath "$2"); shift ;;
    -h|--help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) fail "unknown argument '$1' (see --help)" ;;
  esac
  shift
done

# 1. The binary, as the calling user (cargo never runs as root via sudo here).
if [ -z "$bin" ]; then
  bin="${CARGO_TARGET_DIR:-$repo/target}/release/zeroshard"
  if [ "$rebuild" = 1 ] || [ ! -x "$bin" ]; then
    step "cargo build --release -p zeroshard"
    command -v cargo >/dev/null || fail "$bin is missing and cargo is not installed"
    cargo build --release -p zeroshard
  else
    newer=$(find Cargo.toml Cargo.lock src proto offload membership worker coordinator \
      -newer "$bin" -type f 2>/dev/null | wc -l)
    [ "$newer" = 0 ] || echo "note: $newer source files are newer than $bin (--rebuild rebuilds it)"
  fi
fi
[ -x "$bin" ] || fail "no executable binary at $bin"

# Everything else needs root; re-run as root with the binary fixed.
if [ "$(id -u)" != 0 ]; then
  if ! { command -v sudo >/dev/null && sudo -n true 2>/dev/null; }; then
    fail "needs root or passwordless sudo (mmdebstrap, podman, chroot)"
  fi
  args=(--bin "$bin")
  [ "$refresh_base" = 1 ] && args+=(--refresh-base)
  exec sudo -n "$0" "${args[@]}"
fi

missing=()
command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
command -v podman >/dev/null || missing+=(podman)
command -v strip >/dev/null || missing+=(binutils)
command -v jq >/dev/null || missing+=(jq)
if [ ${#missing[@]} -gt 0 ]; then
  step "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  { apt-get -o DPkg::Lock::Timeout=300 install -y "${missing[@]}" >/dev/null 2>&1 \
    || { apt-get update >/dev/null && apt-get -o DPkg::Lock::Timeout=300 install -y "${missing[@]}" >/dev/null; }; } \
    || fail "installing ${missing[*]} with apt-get failed"
fi

work=$(mktemp -d /tmp/zeroshard-image.XXXXXX)
cid=
cleanup() {
  [ -n "$cid" ] && podman rm -f "$cid" >/dev/null 2>&1
  rm -rf "$work"
}
trap cleanup EXIT

step "stripped copy of $bin"
mkdir -p "$work/ctx/data/hf"
strip -o "$work/ctx/zeroshard" "$bin"
chmod 0755 "$work/ctx/zeroshard"
version=$("$work/ctx/zeroshard" --version) || fail "$bin --version failed on this machine"
revision=$(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown)

# 2. The base rootfs (cached) and its image.
cache="${XDG_CACHE_HOME:-$HOME/.cache}/zeroshard"
key=$(printf '%s\n' "$RECIPE" "$SUITE" "$MIRROR" "$PACKAGES" | sha256sum | cut -c1-12)
tarball="$cache/base-$SUITE-$key.tar"
mkdir -p "$cache"
if [ "$refresh_base" = 1 ] || [ ! -s "$tarball" ]; then
  step "mmdebstrap $SUITE ($PACKAGES)"
  root="$work/rootfs"
  # extract: unpack the packages (and their dependencies) without running
  # maintainer scripts; no shell, apt or dpkg in the image.
  mmdebstrap --variant=extract --include="$PACKAGES" --skip=output/dev \
    "$SUITE" "$root" "$MIRROR" >"$work/mmdebstrap.log" 2>&1 \
    || { tail -n 20 "$work/mmdebstrap.log" >&2; fail "mmdebstrap failed (log above)"; }
  # What maintainer scripts would have made, written directly.
  cat >"$root/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/usr/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
zeroshard:x:10001:10001:zeroshard:/data:/usr/sbin/nologin
EOF
  cat >"$root/etc/group" <<'EOF'
root:x:0:
nogroup:x:65534:
zeroshard:x:10001:
EOF
  printf 'passwd: files\ngroup: files\nhosts: files dns\n' >"$root/etc/nsswitch.conf"
  # update-ca-certificates' bundle: every Mozilla root, concatenated.
  mkdir -p "$root/etc/ssl/certs"
  awk 1 "$root"/usr/share/ca-certificates/mozilla/*.crt >"$root/etc/ssl/certs/ca-certificates.crt"
  mkdir -p "$root/tmp" "$root/root" && chmod 1777 "$root/tmp" && chmod 0700 "$root/root"
  rm -rf "$root"/usr/share/{doc,man,info,locale,lintian,bash-completion} \
    "$root"/etc/apt "$root"/var/lib/apt "$root"/var/cache/apt "$root"/var/log/apt \
    "$root"/var/cache/debconf/*-old \
    "$root"/etc/hostname "$root"/etc/resolv.conf  # mmdebstrap copies the host's; runtimes mount their own
  ldconfig -r "$root"
  tar --numeric-owner -C "$root" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
  rm -rf "$root"
else
  step "base rootfs from cache: $tarball"
fi
if [ "$(podman image inspect --format '{{index .Config.Labels "org.zeroshard.base-key"}}' \
      "$BASE_IMAGE" 2>/dev/null)" != "$key" ]; then
  step "podman import $BASE_IMAGE"
  old_base=$(podman image inspect --format '{{.Id}}' "$BASE_IMAGE" 2>/dev/null || true)
  podman import --change "LABEL org.zeroshard.base-key=$key" \
    --message "zeroshard base: Debian $SUITE ($PACKAGES) from mmdebstrap" \
    "$tarball" "$BASE_IMAGE" >/dev/null 2>"$work/import.log" \
    || { cat "$work/import.log" >&2; fail "podman import of $tarball failed"; }
  [ -z "$old_base" ] || podman rmi "$old_base" >/dev/null 2>&1 || true  # untagged now; kept if in use
fi

# 3. The image.
step "podman build $IMAGE"
old_image=$(podman image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)
podman build --pull=never -f "$repo/deploy/container/Containerfile.local" \
  --build-arg BASE="$BASE_IMAGE" --build-arg VERSION="${version#zeroshard }" \
  --build-arg REVISION="$revision" -t "$IMAGE" "$work/ctx" >"$work/build.log" 2>&1 \
  || { tail -n 20 "$work/build.log" >&2; fail "podman build failed (log above)"; }
if [ -n "$old_image" ] && [ "$old_image" != "$(podman image inspect --format '{{.Id}}' "$IMAGE")" ]; then
  podman rmi "$old_image" >/dev/null 2>&1 || true  # the previous build, untagged now
fi

# 4. The checks.
step "checks"
rows=() first_failure=
check() { # name, expected, got
  local ok=ok
  if [ "$2" != "$3" ]; then
    ok=FAIL
    [ -n "$first_failure" ] || first_failure="$1: expected '$2', got '$3'"
  fi
  rows+=("$(printf '%-4s  %-40s %s' "$ok" "$1" "$3")")
}
inspect() { podman image inspect --format "$1" "$IMAGE"; }

check "Entrypoint" '["zeroshard"]' "$(inspect '{{json .Config.Entrypoint}}')"
check "Cmd" '["--help"]' "$(inspect '{{json .Config.Cmd}}')"
user=$(inspect '{{.Config.User}}')
case "$user" in zeroshard|10001|10001:10001) want=$user ;; *) want="10001:10001" ;; esac
check "User" "$want" "$user"
check "Env HF_HOME" "HF_HOME=/data/hf" \
  "$(inspect '{{range .Config.Env}}{{println .}}{{end}}' | grep '^HF_HOME=' || echo none)"
check "Volumes" '{"/data/hf":{}}' "$(inspect '{{json .Config.Volumes}}')"
check "ExposedPorts" '{"50051/tcp":{},"50061/tcp":{},"8000/tcp":{},"8081/tcp":{},"9090/tcp":{}}' \
  "$(inspect '{{json .Config.ExposedPorts}}')"
check "Label image.title" zeroshard "$(inspect '{{index .Config.Labels "org.opencontainers.image.title"}}')"
check "Label image.version" "${version#zeroshard }" \
  "$(inspect '{{index .Config.Labels "org.opencontainers.image.version"}}')"

# The files: `podman create` only writes container storage (no OCI runtime),
# and `podman export` streams its rootfs.
rootfs="$work/export"
mkdir -p "$rootfs"
cid=$(podman create "$IMAGE" 2>"$work/create.log") \
  || { cat "$work/create.log" >&2; fail "podman create failed (needed to export the image's files)"; }
podman export "$cid" | tar -C "$rootfs" --numeric-owner -xf - || fail "podman export $cid failed"
podman rm -f "$cid" >/dev/null && cid=

zs="$rootfs/usr/local/bin/zeroshard"
check "/usr/local/bin/zeroshard" "0:0 755" \
  "$([ -f "$zs" ] && stat -c '%u:%g %a' "$zs" || echo missing)"
check "/etc/passwd zeroshard" "zeroshard:x:10001:10001" \
  "$(grep -o '^zeroshard:x:10001:10001' "$rootfs/etc/passwd" || echo missing)"
check "/etc/group zeroshard" "zeroshard:x:10001:" \
  "$(grep -o '^zeroshard:x:10001:' "$rootfs/etc/group" || echo missing)"
check "/data/hf owner" "10001:10001" "$(stat -c '%u:%g' "$rootfs/data/hf" 2>/dev/null || echo missing)"
certs=$(grep -c 'BEGIN CERTIFICATE' "$rootfs/etc/ssl/certs/ca-certificates.crt" 2>/dev/null || true)
[ "${certs:-0}" -gt 100 ] && want=$certs || want="more than 100"
check "CA bundle certificates" "$want" "${certs:-0}"

# The image's binary against the image's own libraries, as uid 10001: chroot
# where allowed, else the image's dynamic loader with its library folders.
if chroot --userspec=10001:10001 "$rootfs" /usr/local/bin/zeroshard --version >/dev/null 2>&1; then
  how="chroot, uid 10001"
else
  how="image ld.so"
fi
# Variables the binary sees in the image, besides HOME, HF_HOME and PATH.
image_env=()
run_in_image() {
  if [ "$how" = "image ld.so" ]; then
    env "${image_env[@]}" "$rootfs/lib64/ld-linux-x86-64.so.2" \
      --library-path "$rootfs/lib/x86_64-linux-gnu:$rootfs/usr/lib/x86_64-linux-gnu" "$zs" "$@"
  else
    env -i HOME=/data HF_HOME=/data/hf PATH=/usr/local/bin:/usr/bin:/bin "${image_env[@]}" \
      "$(command -v chroot)" --userspec=10001:10001 "$rootfs" /usr/local/bin/zeroshard "$@"
  fi
}
check "zeroshard --version ($how)" "$version" "$(run_in_image --version 2>&1 | head -n 1)"
check "zeroshard --help lists worker" yes \
  "$(run_in_image --help 2>&1 | grep -qE '^ +worker ' && echo yes || echo no)"
# The probes' port (EXPOSE 8081) is served by --health-listen.
check "worker --help has --health-listen" yes \
  "$(run_in_image worker --help 2>&1 | grep -q -- '--health-listen' && echo yes || echo no)"
# /metrics (EXPOSE 8000, 9090): the coordinator's HTTP front, a worker's own listener.
check "coordinator --help has --http-listen" yes \
  "$(run_in_image coordinator --help 2>&1 | grep -q -- '--http-listen' && echo yes || echo no)"
check "worker --help has --metrics-listen" yes \
  "$(run_in_image worker --help 2>&1 | grep -q -- '--metrics-listen' && echo yes || echo no)"
# The Slurm entry point reads its role from the launcher (dry run, no network).
image_env=(SLURM_PROCID=1 SLURM_NTASKS=2 'SLURM_JOB_NODELIST=n[1-2]' SLURMD_NODENAME=n2 ZEROSHARD_INSECURE=1)
check "launch --from slurm (rank 1, dry run)" worker \
  "$(run_in_image launch --from slurm --dry-run 2>&1 | grep -oE ': worker ' | tr -d ': ')"
image_env=()

size=$(inspect '{{.Size}}')
printf '\n%-4s  %-40s %s\n' "" "check ($IMAGE)" "value"
printf '%s\n' "${rows[@]}"
printf '\nimage %s: %s MiB (%s bytes; base %s MiB), %s, built in %ss\n' "$IMAGE" \
  "$((size >> 20))" "$size" "$(( $(podman image inspect --format '{{.Size}}' "$BASE_IMAGE") >> 20 ))" \
  "$version" "$((SECONDS - start))"
[ -z "$first_failure" ] || fail "$first_failure"
echo "build-image: ok"
