#!/usr/bin/env bash
# Makes sure the two base images deploy/Dockerfile starts from are present:
# rust:<RUST_VERSION>-<DEBIAN_RELEASE> and debian:<DEBIAN_RELEASE>-slim (the
# versions are the Dockerfile's ARG defaults).
#
# An image already present is kept. A missing one is pulled; when no registry
# can be reached, it is made on this machine instead:
#
#   debian:bookworm-slim   a debootstrap --variant=minbase root
#   rust:1.95-bookworm     a debootstrap root with build-essential, git,
#                          pkg-config and curl, and this machine's Rust
#                          toolchain (the one whose rustc is 1.95, with its
#                          installed targets, without its documentation) in
#                          /usr/local/rustup and /usr/local/cargo, as in the
#                          official image
#
# Both carry this machine's CA certificates (/etc/ssl/certs and
# /usr/local/share/ca-certificates), so TLS inside a build verifies as it does
# outside. Needs root, debootstrap and a Debian mirror (DEBIAN_MIRROR,
# http://deb.debian.org/debian by default).
#
#   deploy/base-images.sh            # with podman, or docker when podman is absent
#   ENGINE=docker deploy/base-images.sh
#   deploy/base-images.sh compose    # RabbitMQ and Redis for deploy/compose.yaml,
#                                    # from Debian's rabbitmq-server and redis-server
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
dockerfile="$here/Dockerfile"

arg_default() {
  sed -n "s/^ARG $1=\\(.*\\)$/\\1/p" "$dockerfile" | head -n1
}

RUST_VERSION="${RUST_VERSION:-$(arg_default RUST_VERSION)}"
DEBIAN_RELEASE="${DEBIAN_RELEASE:-$(arg_default DEBIAN_RELEASE)}"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
RUSTUP_HOME_HOST="${RUSTUP_HOME:-$HOME/.rustup}"
CARGO_HOME_HOST="${CARGO_HOME:-$HOME/.cargo}"

if [ -z "${ENGINE:-}" ]; then
  if command -v podman >/dev/null 2>&1; then ENGINE=podman; else ENGINE=docker; fi
fi

if ! "$ENGINE" info >/dev/null 2>&1; then
  echo "base-images: error: $ENGINE does not answer (\`$ENGINE info\` fails): install podman (apt-get install podman runc), or start Docker's engine" >&2
  exit 1
fi

rust_image="rust:${RUST_VERSION}-${DEBIAN_RELEASE}"
slim_image="debian:${DEBIAN_RELEASE}-slim"

say() { echo "base-images: $*" >&2; }
die() { say "error: $*"; exit 1; }

# Images made here carry this label; one made by an older version of this
# script is made again.
RECIPE_LABEL=org.switchboard.base-image.recipe
RECIPE=2

present() { "$ENGINE" image inspect "$1" >/dev/null 2>&1; }

# Made here, by another version of this script.
outdated() {
  local recipe
  recipe="$("$ENGINE" image inspect --format "{{index .Config.Labels \"$RECIPE_LABEL\"}}" "$1" 2>/dev/null)" || return 1
  case "$recipe" in "" | "<no value>" | "$RECIPE") return 1 ;; *) return 0 ;; esac
}

# Tagged both as the short name and as docker.io/library/<name>, which is what
# a FROM line with the short name resolves to.
import() {
  local name="$1" root="$2"
  shift 2
  local changes=(--change "LABEL $RECIPE_LABEL=$RECIPE")
  for c in "$@"; do changes+=(--change "$c"); done
  tar --numeric-owner -C "$root" -c . |
    "$ENGINE" import "${changes[@]}" --message "made by deploy/base-images.sh" - "$name" >/dev/null
  "$ENGINE" tag "$name" "docker.io/library/$name"
  say "$name: made ($("$ENGINE" image inspect --format '{{.Size}}' "$name" | awk '{printf "%d MB", $1/1000000}'))"
}

# debootstrap a root into $1 with the extra arguments; a failed run leaves
# nothing behind.
bootstrap() {
  local root="$1"
  shift
  command -v debootstrap >/dev/null 2>&1 ||
    die "debootstrap is not installed (apt-get install debootstrap)"
  [ "$(id -u)" = 0 ] || die "making base images needs root (debootstrap)"
  say "debootstrap $* $DEBIAN_RELEASE"
  debootstrap --merged-usr "$@" "$DEBIAN_RELEASE" "$root" "$DEBIAN_MIRROR" >"$root.log" 2>&1 || {
    tail -n 20 "$root.log" >&2
    die "debootstrap failed (full log: $root.log)"
  }
}

# What a Debian image has and a fresh debootstrap root does not (or should not).
finish_root() {
  local root="$1"
  cat >"$root/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $DEBIAN_MIRROR
Suites: $DEBIAN_RELEASE $DEBIAN_RELEASE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${DEBIAN_MIRROR%/debian}/debian-security
Suites: $DEBIAN_RELEASE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  rm -f "$root/etc/apt/sources.list"
  # The machine's CA certificates: update-ca-certificates in a build rebuilds
  # /etc/ssl/certs from /usr/local/share/ca-certificates too, so both go in.
  mkdir -p "$root/etc/ssl/certs" "$root/usr/local/share/ca-certificates"
  cp -a --remove-destination /etc/ssl/certs/. "$root/etc/ssl/certs/"
  if [ -d /usr/local/share/ca-certificates ]; then
    cp -a /usr/local/share/ca-certificates/. "$root/usr/local/share/ca-certificates/"
  fi
  # As the official images: no documentation from later installs, no apt caches.
  mkdir -p "$root/etc/dpkg/dpkg.cfg.d"
  cat >"$root/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
  echo 'APT::Install-Recommends "false";' >"$root/etc/apt/apt.conf.d/docker-no-recommends"
  # apt keeps no package caches in the layers a build makes (the official
  # images' docker-clean), and fetches no translations.
  cat >"$root/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
  echo 'Acquire::Languages "none";' >"$root/etc/apt/apt.conf.d/docker-no-languages"
  echo 'Acquire::GzipIndexes "true";' >"$root/etc/apt/apt.conf.d/docker-gzip-indexes"
  echo 'Apt::AutoRemove::SuggestsImportant "false";' >"$root/etc/apt/apt.conf.d/docker-autoremove-suggests"
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* \
    "$root"/var/cache/apt/*.bin "$root"/var/log/* "$root"/tmp/* "$root"/usr/share/doc/* "$root"/usr/share/man/* \
    "$root"/usr/share/info/* "$root"/var/cache/debconf/*-old "$root"/var/lib/dpkg/*-old
  find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} + 2>/dev/null || true
  : >"$root/etc/hostname"
  rm -f "$root/etc/resolv.conf"
}

make_slim() {
  local root="$work/slim"
  bootstrap "$root" --variant=minbase
  finish_root "$root"
  import "$slim_image" "$root" 'CMD ["bash"]'
}

# The toolchain of this machine whose rustc is RUST_VERSION (x.y or x.y.z).
host_toolchain() {
  local dir version
  for dir in "$RUSTUP_HOME_HOST/toolchains/stable-"* "$RUSTUP_HOME_HOST/toolchains/$RUST_VERSION"*; do
    [ -x "$dir/bin/rustc" ] || continue
    version="$("$dir/bin/rustc" --version | awk '{print $2}')"
    case "$version" in
      "$RUST_VERSION" | "$RUST_VERSION".*)
        echo "$(readlink -f "$dir") $version"
        return 0
        ;;
    esac
  done
  return 1
}

make_rust() {
  local found toolchain version triple root="$work/rust"
  found="$(host_toolchain)" ||
    die "no Rust $RUST_VERSION toolchain in $RUSTUP_HOME_HOST (rustup toolchain install $RUST_VERSION)"
  read -r toolchain version <<<"$found"
  [ -x "$CARGO_HOME_HOST/bin/rustup" ] || die "no rustup in $CARGO_HOME_HOST/bin"
  triple="$(basename "$toolchain" | sed 's/^[^-]*-//')"
  case "$triple" in *-*-*) ;; *) triple="$("$toolchain/bin/rustc" -vV | sed -n 's/^host: //p')" ;; esac

  bootstrap "$root" --variant=minbase \
    --include=ca-certificates,curl,git,build-essential,pkg-config,libssl-dev,xz-utils,procps

  # /usr/local/rustup and /usr/local/cargo, as rustup-init makes them for the
  # official image: the toolchain (named by its version), and rustup with its
  # proxies. Documentation is left out, and dropped from rustup's records.
  local name="$version-$triple"
  local dest="$root/usr/local/rustup/toolchains/$name"
  say "Rust $version from $toolchain"
  mkdir -p "$dest" "$root/usr/local/cargo/bin"
  tar -C "$toolchain" --exclude=./share/doc --exclude=./lib/rustlib/src -c . | tar -C "$dest" -x
  sed -i '/^rust-docs-/d; /^rust-src$/d' "$dest/lib/rustlib/components"
  rm -f "$dest"/lib/rustlib/manifest-rust-docs-* "$dest"/lib/rustlib/manifest-rust-src
  cat >"$root/usr/local/rustup/settings.toml" <<EOF
version = "12"
default_toolchain = "$name"
profile = "minimal"
auto_self_update = "disable"

[overrides]
EOF
  install -m 0755 "$CARGO_HOME_HOST/bin/rustup" "$root/usr/local/cargo/bin/rustup"
  local proxy
  for proxy in cargo cargo-clippy cargo-fmt clippy-driver rustc rustdoc rustfmt rust-gdb rust-gdbgui rust-lldb; do
    ln -f "$root/usr/local/cargo/bin/rustup" "$root/usr/local/cargo/bin/$proxy"
  done
  chmod -R a+w "$root/usr/local/rustup" "$root/usr/local/cargo"
  finish_root "$root"
  import "$rust_image" "$root" \
    'ENV RUSTUP_HOME=/usr/local/rustup' \
    'ENV CARGO_HOME=/usr/local/cargo' \
    'ENV PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    "ENV RUST_VERSION=$version" \
    'CMD ["bash"]'
}

# The images deploy/compose.yaml runs beside the router, made from Debian's
# packages: RabbitMQ (Debian's rabbitmq-server, with the management plugin) and
# Redis (Debian's redis-server). They stand in for the official images under
# the same names, taking the environment compose.yaml gives them.
compose_image() {
  sed -n "s/^ *image: *\($1[^ ]*\) *$/\1/p" "$here/compose.yaml" | head -n1
}

make_rabbitmq() {
  local root="$work/rabbitmq"
  bootstrap "$root" --variant=minbase --include=rabbitmq-server
  # The official image's environment: RABBITMQ_DEFAULT_USER and
  # RABBITMQ_DEFAULT_PASS, clients from other containers allowed, the
  # management UI on 15672.
  echo '[rabbitmq_management].' >"$root/etc/rabbitmq/enabled_plugins"
  cat >"$root/usr/local/bin/docker-entrypoint.sh" <<'EOF'
#!/bin/sh
set -e
{
  echo "loopback_users = none"
  echo "listeners.tcp.default = 5672"
  echo "management.tcp.port = 15672"
  echo "default_user = ${RABBITMQ_DEFAULT_USER:-guest}"
  echo "default_pass = ${RABBITMQ_DEFAULT_PASS:-guest}"
} >/etc/rabbitmq/rabbitmq.conf
chown -R rabbitmq:rabbitmq /var/lib/rabbitmq /var/log/rabbitmq
exec "$@"
EOF
  chmod 0755 "$root/usr/local/bin/docker-entrypoint.sh"
  finish_root "$root"
  mkdir -p "$root/var/log/rabbitmq"
  chroot "$root" chown rabbitmq:rabbitmq /var/log/rabbitmq
  import "$1" "$root" \
    'ENV HOME=/var/lib/rabbitmq' \
    'ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]' \
    'CMD ["rabbitmq-server"]' \
    'EXPOSE 5672' \
    'EXPOSE 15672' \
    'VOLUME /var/lib/rabbitmq'
}

make_redis() {
  local root="$work/redis"
  bootstrap "$root" --variant=minbase --include=redis-server,redis-tools
  # As the official image: no protected mode (the container's network is the
  # boundary), data in /data, run as the redis user.
  cat >"$root/usr/local/bin/docker-entrypoint.sh" <<'EOF'
#!/bin/sh
set -e
if [ "$1" = redis-server ]; then
  shift
  set -- redis-server --protected-mode no --dir /data "$@"
fi
exec "$@"
EOF
  chmod 0755 "$root/usr/local/bin/docker-entrypoint.sh"
  mkdir -p "$root/data"
  chroot "$root" chown redis:redis /data
  finish_root "$root"
  import "$1" "$root" \
    'WORKDIR /data' \
    'USER redis' \
    'ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]' \
    'CMD ["redis-server"]' \
    'EXPOSE 6379' \
    'VOLUME /data'
}

images=("$slim_image" "$rust_image")
if [ "${1:-}" = compose ]; then
  rabbitmq_image="$(compose_image rabbitmq)"
  redis_image="$(compose_image redis)"
  images=("$rabbitmq_image" "$redis_image")
fi

work=""
cleanup() { [ -z "$work" ] || rm -rf "$work"; }
trap cleanup EXIT

for image in "${images[@]}"; do
  if present "$image" && ! outdated "$image"; then
    say "$image: present"
    continue
  fi
  if "$ENGINE" pull "docker.io/library/$image" >/dev/null 2>&1; then
    say "$image: pulled"
    continue
  fi
  say "$image: cannot be pulled, making it here"
  [ -n "$work" ] || work="$(mktemp -d "${TMPDIR:-/var/tmp}/base-images.XXXXXX")"
  case "$image" in
    "$slim_image") make_slim ;;
    "$rust_image") make_rust ;;
    "${rabbitmq_image:-}") make_rabbitmq "$image" ;;
    "${redis_image:-}") make_redis "$image" ;;
  esac
done
