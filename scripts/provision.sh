#!/usr/bin/env bash
# Find or install the two servers the tests and the demo run: consul and redis-server.
#
# Uses `consul` / `redis-server` from PATH when present. Otherwise installs them into
# .servers/ (git-ignored) without touching the system's apt configuration:
#   - Consul 1.8.7 from Debian 11's archive (private sources list + `dpkg -x`);
#   - Redis 7.0 from Debian 12's archive, with the few libraries it links to.
# Prints two lines, `CONSUL_BIN=...` and `REDIS_BIN=...`, and writes them to .servers/env.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
D="$root/.servers"
mkdir -p "$D"

apt_opts=()
private_apt() {  # $1: suite name; sets apt_opts to a private apt state for that suite
  local suite="$1" dir="$D/apt-$1"
  mkdir -p "$dir/lists/partial" "$dir/cache/archives/partial"
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $suite main" \
    > "$dir/sources.list"
  apt_opts=(-oDir::Etc::SourceList="$dir/sources.list" -oDir::Etc::SourceParts=/dev/null
            -oDir::State::Lists="$dir/lists" -oDir::Cache="$dir/cache" -oDebug::NoLocking=1
            -oAPT::Sandbox::User=root)
  if [ ! -e "$dir/lists/.updated" ]; then
    apt-get -qq "${apt_opts[@]}" update >&2
    touch "$dir/lists/.updated"
  fi
}

fetch_debs() {  # $1: suite, rest: packages; unpacks them into $D/root
  local suite="$1"; shift
  private_apt "$suite"
  local dl="$D/apt-$suite/debs"
  mkdir -p "$dl" "$D/root"
  (cd "$dl" && apt-get -qq "${apt_opts[@]}" download "$@" >&2)
  for p in "$@"; do dpkg -x "$(ls "$dl"/"${p}"_*.deb | head -n1)" "$D/root"; done
}

if command -v consul >/dev/null 2>&1; then
  consul_bin="$(command -v consul)"
elif [ -x "$D/root/usr/bin/consul" ]; then
  consul_bin="$D/root/usr/bin/consul"
else
  echo "provision: installing Consul 1.8.7 from Debian 11 into $D" >&2
  fetch_debs bullseye consul
  consul_bin="$D/root/usr/bin/consul"
fi

if command -v redis-server >/dev/null 2>&1; then
  redis_bin="$(command -v redis-server)"
elif [ -x "$D/bin/redis-server" ]; then
  redis_bin="$D/bin/redis-server"
else
  echo "provision: installing Redis from Debian 12 into $D" >&2
  fetch_debs bookworm redis-tools libjemalloc2 liblzf1 liblua5.1-0 lua-bitop lua-cjson
  mkdir -p "$D/bin"
  # Debian ships one binary that acts by the name it is called with.
  ln -sf redis-check-rdb "$D/root/usr/bin/redis-server"
  # A wrapper, so the unpacked libraries are found without installing them system-wide.
  cat > "$D/bin/redis-server" <<WRAP
#!/bin/sh
LD_LIBRARY_PATH="$D/root/usr/lib/x86_64-linux-gnu:$D/root/usr/lib/$(uname -m)-linux-gnu\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" exec "$D/root/usr/bin/redis-server" "\$@"
WRAP
  chmod +x "$D/bin/redis-server"
  redis_bin="$D/bin/redis-server"
fi

"$consul_bin" version | head -n1 >&2
"$redis_bin" --version >&2
printf 'CONSUL_BIN=%s\nREDIS_BIN=%s\n' "$consul_bin" "$redis_bin" | tee "$D/env"
