#!/bin/sh
# The curl-around-Consul pattern, as such cron wrappers are commonly written: run a job once
# across the nodes that fire it. bench/peers.py runs it on three "nodes" against
# ConsulLockedTask. usage: curl_lock.sh CONSUL_ADDR NAME JOB [ARGS...]
set -eu
addr=$1 name=$2
shift 2
sid=$(curl -sSf -X PUT -d "{\"Name\": \"$name\", \"TTL\": \"15s\"}" "http://$addr/v1/session/create" |
  sed -E 's/.*"ID": *"([^"]+)".*/\1/')
if [ "$(curl -sSf -X PUT "http://$addr/v1/kv/locks/$name/.lock?acquire=$sid")" = "true" ]; then
  "$@" || true
  curl -sSf -X PUT "http://$addr/v1/kv/locks/$name/.lock?release=$sid" >/dev/null
fi
curl -sSf -X PUT "http://$addr/v1/session/destroy/$sid" >/dev/null
