#!/bin/sh
# A sentinel beside each data server: it watches the primary (named MASTER_NAME), and with two of three agreeing
# promotes a replica when the primary is gone. It starts from the primary the other sentinels know (or redis-0 on the
# set's first start) and learns the rest from them. Sentinels take no password (fleetstate/client.py: the password
# is the data servers'); the NetworkPolicy `redis` admits only fleet pods, KEDA and the set itself.
# Environment as redis.sh.
set -eu
REDIS_PASSWORD="${REDIS_PASSWORD:-$(cat "${REDIS_PASSWORD_FILE:?set REDIS_PASSWORD_FILE or REDIS_PASSWORD}")}"
suffix="${REDIS_HOST_SUFFIX:-.redis-headless.${POD_NAMESPACE}.svc}"
port="${REDIS_PORT:-6379}"
sport="${SENTINEL_PORT:-26379}"
name="${MASTER_NAME:-warmfleet}"
conf="${CONF_DIR:-/conf}/sentinel.conf"
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
port ${sport}
# no password on sentinels (clients ask them without one): reachable from other pods, guarded by the NetworkPolicy
protected-mode no
sentinel resolve-hostnames yes
sentinel announce-hostnames yes
sentinel announce-ip ${me}
sentinel monitor ${name} ${primary} ${port} 2
sentinel auth-pass ${name} ${REDIS_PASSWORD}
sentinel down-after-milliseconds ${name} ${SENTINEL_DOWN_AFTER_MS:-5000}
sentinel failover-timeout ${name} 60000
sentinel parallel-syncs ${name} 1
CONF
if [ -n "${REDIS_BIND:-}" ]; then
  echo "bind ${REDIS_BIND}" >> "$conf"
fi
echo "sentinel: ${me} watches ${primary}"
exec redis-server "$conf" --sentinel
