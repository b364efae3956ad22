# shellcheck shell=bash
# The constants below are used by the scripts that source this file.
# shellcheck disable=SC2034
# Shared constants and helpers for tests/services/{install,up,down,status}.
# Sourced, never run. The scripts run the real services the end-to-end tests
# use (Mosquitto, MariaDB, Apache Kafka in KRaft mode, OpenSearch) as plain
# background processes on 127.0.0.1: no Docker, no systemd, no root-owned
# system instances (apt's own mosquitto/mariadb services are never started).

# Files we create are readable by the unprivileged OpenSearch user even when
# the caller's umask is strict.
umask 022

SERVICES_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# ---------------------------------------------------------------------------
# Where state lives: OUTSIDE the git clone, so a fresh clone (CI clones main
# into a new folder every run) reuses the cached downloads, and `git clean`
# never wipes a running broker's data.
#   downloads/  Kafka jars and OpenSearch, cached; `down --purge` keeps them
#   data/       service data and generated config files
#   logs/       every service log: the one place to look when something fails
#   run/        pid files, the MariaDB socket, the lock
# ---------------------------------------------------------------------------
EDGE_SERVICES_HOME=${EDGE_SERVICES_HOME:-$HOME/.cache/edge-gateway/services}
DOWNLOADS_DIR=$EDGE_SERVICES_HOME/downloads
DATA_DIR=$EDGE_SERVICES_HOME/data
LOG_DIR=$EDGE_SERVICES_HOME/logs
RUN_DIR=$EDGE_SERVICES_HOME/run
# Export lines for the tests (EDGE_TEST_*), written by `up`.
ENV_FILE=$EDGE_SERVICES_HOME/env

# Fixed loopback ports, chosen away from the defaults (1883, 3306, 9092,
# 9200) so the test services never collide with a developer's own brokers.
# The Rust tests default to exactly these values; override both sides
# together if you must move them. After changing the Kafka ports, run
# `down --purge kafka`: KRaft records the controller endpoint in its log.
EDGE_HOST=127.0.0.1
EDGE_MQTT_PORT=${EDGE_MQTT_PORT:-21883}
EDGE_MYSQL_PORT=${EDGE_MYSQL_PORT:-23306}
EDGE_KAFKA_PORT=${EDGE_KAFKA_PORT:-29092}
EDGE_KAFKA_CONTROLLER_PORT=${EDGE_KAFKA_CONTROLLER_PORT:-29093}
# A TLS listener beside the plaintext one (certificate from data/tls/ca.pem).
EDGE_KAFKA_SSL_PORT=${EDGE_KAFKA_SSL_PORT:-29094}
# A listener for clients that reach the broker through a delaying proxy
# (`edge-bench run --kafka-rtt-ms`, Kafka as far away as a cloud region):
# the broker listens on the first port and advertises the second, where the
# proxy listens. Without the proxy nothing uses it.
EDGE_KAFKA_WAN_PORT=${EDGE_KAFKA_WAN_PORT:-29095}
EDGE_KAFKA_WAN_PROXY_PORT=${EDGE_KAFKA_WAN_PROXY_PORT:-29096}
EDGE_OPENSEARCH_PORT=${EDGE_OPENSEARCH_PORT:-29200}
EDGE_OPENSEARCH_TRANSPORT_PORT=${EDGE_OPENSEARCH_TRANSPORT_PORT:-29300}

# The MySQL account the tests use. It may create and drop databases: each
# test makes its own uniquely named one.
EDGE_MYSQL_USER=edge
EDGE_MYSQL_PASSWORD=edge
EDGE_MYSQL_DATABASE=edge

# Versions. KAFKA_VERSION is passed to tests/services/kafka/pom.xml.
# Kafka 4.x brokers need Java 17+; OpenSearch 2.19.x is the newest line that
# runs on Java 17 (3.x needs Java 21).
KAFKA_VERSION=4.1.1
KAFKA_HOME=$DOWNLOADS_DIR/kafka-$KAFKA_VERSION
# The first one Maven Central serves wins; install records which in
# $OPENSEARCH_HOME/.complete and says so when it is not the first.
OPENSEARCH_VERSIONS=(2.19.6 2.19.5 2.19.4 2.19.3 2.19.2 2.19.1 2.19.0)
OPENSEARCH_HOME=$DOWNLOADS_DIR/opensearch
# Pinned: `mvn dependency:...` without a version takes whatever the local
# Maven defaults to (2.8 on Debian 12), which differs between machines.
MVN_DEPENDENCY_PLUGIN=org.apache.maven.plugins:maven-dependency-plugin:3.8.1

# OpenSearch refuses to run as root, so when these scripts run as root it
# runs as this system user instead (created by install).
EDGE_SERVICE_USER=${EDGE_SERVICE_USER:-edgesvc}

# How long `up` waits for each service to answer, and `down` for each to
# exit after SIGTERM, in seconds.
EDGE_SERVICE_DEADLINE=${EDGE_SERVICE_DEADLINE:-120}
EDGE_STOP_DEADLINE=${EDGE_STOP_DEADLINE:-60}

ALL_SERVICES=(mosquitto mariadb kafka opensearch)

# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------
say() { printf '[services] %s\n' "$*"; }
warn() { printf '[services] WARNING: %s\n' "$*" >&2; }
die() {
  printf '[services] ERROR: %s\n' "$*" >&2
  exit 1
}

# fail_with_log SERVICE LOGFILE MSG...
# Says why SERVICE failed, shows the end of its log (so a CI transcript alone
# is enough to diagnose it) and where all the logs are, then exits non-zero.
fail_with_log() {
  local service=$1 logfile=$2
  shift 2
  {
    printf '\n[services] %s FAILED: %s\n' "$service" "$*"
    if [[ -s $logfile ]]; then
      printf -- '----- last 60 lines of %s -----\n' "$logfile"
      tail -n 60 -- "$logfile"
      printf -- '----- end of %s -----\n' "$logfile"
    else
      printf '[services] (log %s is empty or missing)\n' "$logfile"
    fi
    printf '[services] all service logs are in %s\n' "$LOG_DIR"
  } >&2
  exit 1
}

# ---------------------------------------------------------------------------
# Waiting
# ---------------------------------------------------------------------------
# wait_until DEADLINE_SECONDS DESCRIPTION CMD...
# Runs CMD until it succeeds (0) or DEADLINE_SECONDS have passed (1). Polls
# with a short, growing delay instead of one long blind sleep, so a fast
# service is used as soon as it answers. Each CMD must bound its own run time
# (curl --max-time, mosquitto_sub -W, timeout ...).
# If WAIT_UNTIL_PID is set and that process exits, gives up at once (2)
# instead of waiting out the deadline for a service that already died.
wait_until() {
  local deadline=$1 description=$2
  shift 2
  local start=$SECONDS delay=0.2
  while true; do
    if "$@" >/dev/null 2>&1; then
      say "$description: yes after $((SECONDS - start))s"
      return 0
    fi
    if [[ -n ${WAIT_UNTIL_PID:-} ]] && ! kill -0 "$WAIT_UNTIL_PID" 2>/dev/null; then
      say "$description: the process (pid $WAIT_UNTIL_PID) exited"
      return 2
    fi
    if ((SECONDS - start >= deadline)); then
      say "$description: no answer within ${deadline}s"
      return 1
    fi
    sleep "$delay"
    case $delay in
      0.2) delay=0.5 ;;
      0.5) delay=1 ;;
    esac
  done
}

# ---------------------------------------------------------------------------
# Java: pinned to 17, whatever JAVA_HOME the caller has (OpenSearch 2.19 does
# not start on Java 24+, where the security manager is gone). EDGE_JAVA_HOME
# overrides.
# ---------------------------------------------------------------------------
edge_java_home() {
  if [[ -n ${EDGE_JAVA_HOME:-} ]]; then
    printf '%s\n' "$EDGE_JAVA_HOME"
    return
  fi
  local arch candidate java
  arch=$(dpkg --print-architecture 2>/dev/null || echo amd64)
  candidate=/usr/lib/jvm/java-17-openjdk-$arch
  if [[ -x $candidate/bin/java ]]; then
    printf '%s\n' "$candidate"
    return
  fi
  java=$(command -v java) || return 1
  dirname "$(dirname "$(readlink -f "$java")")"
}

# ---------------------------------------------------------------------------
# Processes started by `up`: run/<service>.pid plus a command-line check, so
# `down` never signals a process it did not start (a recycled pid, or a
# developer's own broker on the same machine).
# ---------------------------------------------------------------------------
pid_file() { printf '%s/%s.pid\n' "$RUN_DIR" "$1"; }
service_log() { printf '%s/%s.log\n' "$LOG_DIR" "$1"; }

# Words that must all appear in the command line of a process we started.
# They include paths under EDGE_SERVICES_HOME, so instances belonging to
# another EDGE_SERVICES_HOME are not ours either.
service_markers() {
  case $1 in
    mosquitto) printf '%s\n' mosquitto "$DATA_DIR/mosquitto/mosquitto.conf" ;;
    mariadb) printf '%s\n' mariadbd "--defaults-file=$DATA_DIR/mariadb/my.cnf" ;;
    kafka) printf '%s\n' kafka.Kafka "$DATA_DIR/kafka/server.properties" ;;
    # Present both while bin/opensearch (bash) runs and after it execs java.
    opensearch) printf '%s\n' opensearch "-Epath.data=$DATA_DIR/opensearch/data" ;;
    *) return 1 ;;
  esac
}

# pid_is_ours SERVICE PID: PID is alive and its command line is SERVICE's.
pid_is_ours() {
  local service=$1 pid=$2 cmdline marker
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  [[ -r /proc/$pid/cmdline ]] || return 1
  cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
  [[ -n $cmdline ]] || return 1
  while IFS= read -r marker; do
    [[ $cmdline == *"$marker"* ]] || return 1
  done < <(service_markers "$service")
  return 0
}

# running_pid SERVICE: prints the pid if SERVICE runs from our pid file.
running_pid() {
  local file pid
  file=$(pid_file "$1")
  [[ -f $file ]] || return 1
  pid=$(<"$file")
  pid_is_ours "$1" "$pid" || return 1
  printf '%s\n' "$pid"
}

service_port() {
  case $1 in
    mosquitto) echo "$EDGE_MQTT_PORT" ;;
    mariadb) echo "$EDGE_MYSQL_PORT" ;;
    kafka) echo "$EDGE_KAFKA_PORT" ;;
    opensearch) echo "$EDGE_OPENSEARCH_PORT" ;;
  esac
}

# port_open PORT: something accepts TCP connections on 127.0.0.1:PORT.
port_open() {
  # shellcheck disable=SC2016 # expanded by the inner bash, on purpose
  timeout 2 bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$EDGE_HOST" "$1" 2>/dev/null
}

# ---------------------------------------------------------------------------
# Health checks: each is a real round trip through the service, bounded in
# time, silent, and returns 0 only when the service does its job.
# ---------------------------------------------------------------------------

# MQTT: publish a retained message, read it back with a fresh subscriber,
# then clear it. Retained, so there is no race between subscribe and publish.
mosquitto_answers() {
  local topic="__edge_healthcheck/$$-$RANDOM$RANDOM" token="ok-$RANDOM$RANDOM" got
  mosquitto_pub -h "$EDGE_HOST" -p "$EDGE_MQTT_PORT" -q 1 -r -t "$topic" -m "$token" || return 1
  got=$(mosquitto_sub -h "$EDGE_HOST" -p "$EDGE_MQTT_PORT" -q 1 -t "$topic" -C 1 -W 5) || got=
  mosquitto_pub -h "$EDGE_HOST" -p "$EDGE_MQTT_PORT" -q 1 -r -n -t "$topic" || true
  [[ $got == "$token" ]]
}

# MySQL protocol over TCP as the test user, as the tests connect.
mariadb_answers() {
  local out
  out=$(MYSQL_PWD=$EDGE_MYSQL_PASSWORD mariadb --no-defaults --protocol=TCP \
    -h "$EDGE_HOST" -P "$EDGE_MYSQL_PORT" -u "$EDGE_MYSQL_USER" \
    --connect-timeout=5 -N -B -e 'SELECT 1' "$EDGE_MYSQL_DATABASE" 2>/dev/null) || return 1
  [[ $out == 1 ]]
}

# kafka_tool_cmd: sets KAFKA_TOOL_CMD to the java command line for the
# short-lived Kafka console tools (append a main class and its arguments):
# small heap, quick start, WARN-level logs to stderr.
kafka_tool_cmd() {
  local java_home
  java_home=$(edge_java_home) || return 1
  KAFKA_TOOL_CMD=("$java_home/bin/java" -Xms32m -Xmx256m -XX:+UseSerialGC
    -XX:TieredStopAtLevel=1 -Djava.awt.headless=true
    "-Dlog4j2.configurationFile=$DATA_DIR/kafka/tools-log4j2.properties"
    -cp "$KAFKA_HOME/libs/*")
}

# Kafka: produce a unique token to __edge_healthcheck (acks=all) and read it
# back with a read_committed consumer. The consumer reads partition 0 from
# the start without a consumer group and stops after 3 s without new
# records; the topic grows by one small record per check, so that is one
# fetch.
kafka_answers() {
  local token out
  # Fail fast with no listener (the producer would wait max.block.ms).
  port_open "$EDGE_KAFKA_PORT" || return 1
  kafka_tool_cmd || return 1
  token="edge-healthcheck-$(date +%s%N)-$RANDOM"
  printf '%s\n' "$token" | timeout 60 "${KAFKA_TOOL_CMD[@]}" \
    org.apache.kafka.tools.ConsoleProducer \
    --bootstrap-server "$EDGE_HOST:$EDGE_KAFKA_PORT" --topic __edge_healthcheck \
    --producer-property acks=all --producer-property max.block.ms=20000 \
    --producer-property delivery.timeout.ms=30000 \
    --producer-property request.timeout.ms=10000 || return 1
  out=$(timeout 60 "${KAFKA_TOOL_CMD[@]}" \
    org.apache.kafka.tools.consumer.ConsoleConsumer \
    --bootstrap-server "$EDGE_HOST:$EDGE_KAFKA_PORT" --topic __edge_healthcheck \
    --partition 0 --offset earliest --timeout-ms 3000 \
    --consumer-property isolation.level=read_committed) || true
  grep -qxF -- "$token" <<<"$out"
}

# OpenSearch: the cluster is at least yellow (all primaries allocated).
opensearch_answers() {
  local code
  code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 10 \
    "http://$EDGE_HOST:$EDGE_OPENSEARCH_PORT/_cluster/health?wait_for_status=yellow&timeout=5s") || return 1
  [[ $code == 200 ]]
}

service_answers() {
  case $1 in
    mosquitto) mosquitto_answers ;;
    mariadb) mariadb_answers ;;
    kafka) kafka_answers ;;
    opensearch) opensearch_answers ;;
    *) return 1 ;;
  esac
}

# ---------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------
# parse_services ARG...: sets SELECTED_SERVICES to the named services (all
# when none), rejecting unknown names.
parse_services() {
  SELECTED_SERVICES=()
  local arg known s
  for arg in "$@"; do
    known=no
    for s in "${ALL_SERVICES[@]}"; do
      [[ $arg == "$s" ]] && known=yes
    done
    [[ $known == yes ]] || die "unknown service '$arg' (known: ${ALL_SERVICES[*]})"
    SELECTED_SERVICES+=("$arg")
  done
  if ((${#SELECTED_SERVICES[@]} == 0)); then
    SELECTED_SERVICES=("${ALL_SERVICES[@]}")
  fi
}

ensure_state_dirs() {
  mkdir -p "$DOWNLOADS_DIR" "$DATA_DIR" "$LOG_DIR" "$RUN_DIR"
}

# Serialises up and down (two `up`s at once would start two brokers).
take_lock() {
  ensure_state_dirs
  exec 9>"$RUN_DIR/.lock"
  if ! flock -w 600 9; then
    die "another tests/services/up or down still holds $RUN_DIR/.lock after 600s"
  fi
}
