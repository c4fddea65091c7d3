#!/usr/bin/env bash
# Installs Gantry's binaries, systemd units and default configuration on this machine (or
# into a staging tree with DESTDIR), and enables the units without starting them.
#
#   systemd/install.sh [agent|coordinator|all] [--bin-dir DIR]
#
#   agent        gantry-agent, gantry-agent.service, /etc/gantry/agent.toml
#   coordinator  gantry-coordinator and the `gantry` CLI, gantry-coordinator.service,
#                /etc/gantry/coordinator.toml
#   all          both (the default)
#
#   --bin-dir DIR  where the built binaries are (default: target/release in this checkout;
#                  build them with `cargo build --release --workspace`)
#   DESTDIR=DIR    install under DIR instead of / (packaging, tests); systemctl is not run
#
# What it writes: $DESTDIR/usr/local/bin/{gantry-agent,gantry-coordinator,gantry} (0755),
# $DESTDIR/etc/systemd/system/gantry-*.service (0644), $DESTDIR/etc/gantry/*.toml (0644,
# copied from systemd/*.toml only when absent: an operator's configuration is never
# overwritten), and $DESTDIR/var/lib/gantry (0700; the daemons create their state
# directories inside it). Running it again gives the same tree.
set -euo pipefail

# Directories this script creates are 0755 unless it says otherwise.
umask 022

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
prog="$(basename "$0")"

usage() {
  sed -n '5,15s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
}

die() {
  echo "$prog: $*" >&2
  exit 1
}

role=""
bin_dir="$repo/target/release"
while [ $# -gt 0 ]; do
  case "$1" in
    agent | coordinator | all)
      [ -z "$role" ] || die "more than one role given ('$role' and '$1'); pass one of agent, coordinator, all"
      role="$1"
      ;;
    --bin-dir)
      [ $# -ge 2 ] || die "--bin-dir needs a directory"
      bin_dir="$2"
      shift
      ;;
    --bin-dir=*)
      bin_dir="${1#--bin-dir=}"
      ;;
    -h | --help)
      usage
      exit 0
      ;;
    *)
      usage >&2
      die "unknown argument '$1'"
      ;;
  esac
  shift
done
role="${role:-all}"
destdir="${DESTDIR:-}"
# A trailing slash would only double the separators in the paths printed below.
destdir="${destdir%/}"

agent=false
coordinator=false
case "$role" in
  agent) agent=true ;;
  coordinator) coordinator=true ;;
  all) agent=true coordinator=true ;;
esac

binaries=()
units=()
configs=()
if $agent; then
  binaries+=(gantry-agent)
  units+=(gantry-agent.service)
  configs+=(agent.toml)
fi
if $coordinator; then
  binaries+=(gantry-coordinator gantry)
  units+=(gantry-coordinator.service)
  configs+=(coordinator.toml)
fi

if [ -z "$destdir" ] && [ "$(id -u)" != 0 ]; then
  die "installing into / writes /usr/local/bin, /etc and /var/lib: run it as root (or set DESTDIR=DIR to stage the files in DIR)"
fi

# Check everything before writing anything, so a failure leaves no half-installed tree.
[ -d "$bin_dir" ] || die "binary directory $bin_dir does not exist: run \`cargo build --release --workspace\` first, or pass --bin-dir DIR"
for b in "${binaries[@]}"; do
  if ! [ -f "$bin_dir/$b" ] || ! [ -x "$bin_dir/$b" ]; then
    die "$b is missing or not executable in $bin_dir: run \`cargo build --release --workspace\` first, or pass --bin-dir DIR"
  fi
done
for f in "${units[@]}" "${configs[@]}"; do
  [ -f "$here/$f" ] || die "$here/$f is missing: run this script from a complete Gantry checkout"
done

# Copies $1 to $2 with mode $3 through a temporary file and a rename, so a binary that is
# running (the agent is also every container's shim) is replaced, not written over: running
# processes keep the old file, new ones get the new one.
put() {
  local src="$1" dst="$2" mode="$3"
  local tmp
  tmp="$(mktemp "$dst.XXXXXX")"
  if ! { cp "$src" "$tmp" && chmod "$mode" "$tmp" && mv -f "$tmp" "$dst"; }; then
    rm -f "$tmp"
    die "cannot install $dst"
  fi
}

bindir="$destdir/usr/local/bin"
unitdir="$destdir/etc/systemd/system"
confdir="$destdir/etc/gantry"
statedir="$destdir/var/lib/gantry"

mkdir -p "$bindir" "$unitdir" "$confdir" "$destdir/var/lib"
for b in "${binaries[@]}"; do
  put "$bin_dir/$b" "$bindir/$b" 0755
  echo "installed $bindir/$b"
done
for u in "${units[@]}"; do
  put "$here/$u" "$unitdir/$u" 0644
  echo "installed $unitdir/$u"
done
for c in "${configs[@]}"; do
  if [ -e "$confdir/$c" ]; then
    echo "kept $confdir/$c (already present; the default is $here/$c)"
  else
    put "$here/$c" "$confdir/$c" 0644
    echo "installed $confdir/$c"
  fi
done
# The state directories inside it hold keys and certificates: root only.
mkdir -p "$statedir"
chmod 0700 "$statedir"
echo "created $statedir (0700)"

if [ -n "$destdir" ]; then
  echo "DESTDIR is set ($destdir): not running systemctl; enable the units on the target machine with: systemctl daemon-reload && systemctl enable ${units[*]}"
elif command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  systemctl enable "${units[@]}"
  echo "enabled ${units[*]} (not started)"
else
  echo "systemd is not running on this machine: units installed but not enabled; under systemd run: systemctl daemon-reload && systemctl enable ${units[*]}"
fi

echo
echo "Next steps:"
if $coordinator; then
  echo "  coordinator: review /etc/gantry/coordinator.toml, then"
  echo "    systemctl start gantry-coordinator"
  echo "    journalctl -u gantry-coordinator | grep 'admin token'   # printed once, at the first start"
  echo "    gantry-coordinator token create --token ADMIN_TOKEN       # a one-time join token per agent"
fi
if $agent; then
  echo "  agent: join the cluster once, then start it:"
  echo "    gantry-agent join --coordinator HOST:7443 --token TOKEN"
  echo "    systemctl start gantry-agent"
fi
