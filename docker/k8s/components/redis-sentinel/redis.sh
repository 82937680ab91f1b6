#!/bin/sh
# A data server of the fleet's Redis: the primary or one of its replicas. The first start makes redis-0 the primary;
# after that the sentinels decide, so a pod that restarts asks them who the primary is and comes back as its replica
# (never as a second primary). Settings as docs/reliability.md measured them: append-only, never evict a queue, and
# min-replicas-to-write 1, so a primary demoted while alive refuses writes instead of losing them.
# Environment: POD_NAME, POD_NAMESPACE, REDIS_PASSWORD_FILE (or REDIS_PASSWORD); optional: REDIS_USERS_FILE (the
# roles' `user` lines, included), REDIS_HOST_SUFFIX (default
# .redis-headless.$POD_NAMESPACE.svc), REDIS_PORT (6379), SENTINEL_PORT (26379), MASTER_NAME (warmfleet),
# REDIS_REPLICAS (3), REDIS_HOSTS (the pods' addresses, instead of their DNS names), REDIS_BIND (the interface to
# listen on; default all), SENTINEL_DOWN_AFTER_MS (5000), CONF_DIR (/conf), DATA_DIR (/data).
set -eu
REDIS_PASSWORD="${REDIS_PASSWORD:-$(cat "${REDIS_PASSWORD_FILE:?set REDIS_PASSWORD_FILE or REDIS_PASSWORD}")}"
suffix="${REDIS_HOST_SUFFIX:-.redis-headless.${POD_NAMESPACE}.svc}"
port="${REDIS_PORT:-6379}"
sport="${SENTINEL_PORT:-26379}"
name="${MASTER_NAME:-warmfleet}"
conf="${CONF_DIR:-/conf}/redis.conf"
set_name="${POD_NAME%-*}"
# the address of the set's pod N: its stable DNS name (or the N+1th of REDIS_HOSTS, a space-separated list)
host_of() {
  if [ -n "${REDIS_HOSTS:-}" ]; then echo "$REDIS_HOSTS" | cut -d' ' -f"$(($1 + 1))"; else echo "${set_name}-$1${suffix}"; fi
}
me="$(host_of "${POD_NAME##*-}")"

# who is the primary now? ask the other pods' sentinels
primary=""
i=0
while [ "$i" -lt "${REDIS_REPLICAS:-3}" ]; do
  peer="$(host_of "$i")"
  i=$((i + 1))
  [ "$peer" = "$me" ] && continue
  answer="$(redis-cli -h "$peer" -p "$sport" --raw sentinel get-master-addr-by-name "$name" 2>/dev/null | head -n 1 || true)"
  case "$answer" in ""|*ERR*|*rror*) continue ;; esac
  primary="$answer"
  break
done
# nobody knows yet: the first start of the set, where pod 0 is the primary
[ -n "$primary" ] || primary="$(host_of 0)"

mkdir -p "$(dirname "$conf")"
umask 077
cat > "$conf" <<CONF
port ${port}
dir ${DATA_DIR:-/data}
appendonly yes
appendfsync everysec
maxmemory-policy noeviction
requirepass ${REDIS_PASSWORD}
masterauth ${REDIS_PASSWORD}
replica-announce-ip ${me}
min-replicas-to-write 1
min-replicas-max-lag 10
CONF
if [ -n "${REDIS_BIND:-}" ]; then
  echo "bind ${REDIS_BIND}" >> "$conf"
fi
# the fleet's roles (fleetstate/acl.py) as `user` lines, from `warmfleet roles config`: the default user stays the
# admin (requirepass above), each fleet pod logs in as its role's user
if [ -n "${REDIS_USERS_FILE:-}" ]; then
  echo "include ${REDIS_USERS_FILE}" >> "$conf"
fi
if [ "$primary" != "$me" ]; then
  echo "replicaof ${primary} ${port}" >> "$conf"
fi
echo "redis: ${me} starts as $([ "$primary" = "$me" ] && echo primary || echo "replica of ${primary}")"
exec redis-server "$conf"
