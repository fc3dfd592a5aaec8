#!/usr/bin/env bash
# Run a real single-node Apache Kafka broker (KRaft, broker+controller in one
# JVM) for development and the integration tests, without Docker.
#
#   scripts/kafka.sh start    reuse a broker that answers, else start ours
#   scripts/kafka.sh stop     stop the broker this script started
#   scripts/kafka.sh status   say whether a broker answers (exit 1 if not)
#
# Where the broker comes from, first match wins:
#   1. something already answers on $KAFKA_BOOTSTRAP: reused, left alone;
#   2. $KAFKA_HOME/bin/kafka-server-start.sh exists: that distribution's libs/;
#   3. jars fetched from Maven Central with scripts/kafka/pom.xml into
#      .var/kafka/libs (once; later starts reuse them).
#
# Everything the broker writes lives under .var/kafka (git-ignored): config,
# data (formatted once, kept across restarts), server.log and kafka.pid.
# The fetched jars stay in .var/kafka/libs even when KAFKA_STATE_DIR moves
# the rest, so a second, isolated broker costs no second download.
#
# Environment:
#   KAFKA_BOOTSTRAP          host:port clients use (default localhost:9092);
#                            our broker listens on 127.0.0.1 at its port
#   KAFKA_CONTROLLER_PORT    KRaft controller port (default 9093)
#   KAFKA_HOME               a Kafka distribution to run instead of fetching
#   KAFKA_HEAP_OPTS          JVM heap flags (default -Xmx1g)
#   KAFKA_START_TIMEOUT_S    how long start waits for the broker (default 60)
#   KAFKA_STATE_DIR          config, data, log and pid (default .var/kafka);
#                            with other ports, runs a second broker apart
set -euo pipefail

ROOT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
POM_FILE="$ROOT_DIR/scripts/kafka/pom.xml"
SHARED_DIR="$ROOT_DIR/.var/kafka"
MAVEN_LIBS_DIR="$SHARED_DIR/libs"
MAVEN_LOG="$SHARED_DIR/maven.log"
STATE_DIR="$(realpath -m "${KAFKA_STATE_DIR:-$SHARED_DIR}")"
DATA_DIR="$STATE_DIR/data"
SERVER_CONFIG="$STATE_DIR/server.properties"
SERVER_LOG4J_CONFIG="$STATE_DIR/log4j2-server.properties"
TOOLS_LOG4J_CONFIG="$STATE_DIR/log4j2-tools.properties"
TOOLS_CLIENT_CONFIG="$STATE_DIR/tools-client.properties"
SERVER_LOG="$STATE_DIR/server.log"
PID_FILE="$STATE_DIR/kafka.pid"
LOCK_FILE="$STATE_DIR/lifecycle.lock"

# Tried in order; 4.0.1 only if 4.1.1 cannot be resolved.
KAFKA_VERSIONS=(4.1.1 4.0.1)

BOOTSTRAP="${KAFKA_BOOTSTRAP:-localhost:9092}"
BOOTSTRAP="${BOOTSTRAP%%,*}" # a list is fine for clients; probe the first
BOOTSTRAP_HOST="${BOOTSTRAP%:*}"
BROKER_PORT="${BOOTSTRAP##*:}"
CONTROLLER_PORT="${KAFKA_CONTROLLER_PORT:-9093}"
LISTEN_HOST="127.0.0.1"
BROKER_ADDRESS="$LISTEN_HOST:$BROKER_PORT"
HEAP_OPTS="${KAFKA_HEAP_OPTS:--Xmx1g}"
# The tools (format, the readiness probe) live for a second or two: without
# the optimising JIT and with the serial GC they start about 40% faster.
TOOL_JVM_FLAGS=(-XX:TieredStopAtLevel=1 -XX:+UseSerialGC)
START_TIMEOUT_S="${KAFKA_START_TIMEOUT_S:-60}"

log() { echo "kafka.sh: $*" >&2; }
die() {
	log "$*"
	exit 1
}

# --- probes -----------------------------------------------------------------

# True if a TCP connect to host:port succeeds within a second. Bash's
# /dev/tcp needs no python or netcat on the machine.
port_answers() {
	local host="$1" port="$2"
	timeout 1 bash -c ": <>/dev/tcp/$host/$port" 2>/dev/null
}

bootstrap_answers() {
	port_answers "$BOOTSTRAP_HOST" "$BROKER_PORT"
}

# The pid in the pid file, only if that process is still our broker: a stale
# file may name a pid the system has since given to something else.
running_pid() {
	[[ -f "$PID_FILE" ]] || return 1
	local pid
	pid="$(<"$PID_FILE")"
	[[ "$pid" =~ ^[0-9]+$ && -r "/proc/$pid/cmdline" ]] || return 1
	tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF "kafka.Kafka $SERVER_CONFIG" || return 1
	echo "$pid"
}

# --- jars -------------------------------------------------------------------

# Prints the directory whose jars make the classpath.
libs_dir() {
	if [[ -n "${KAFKA_HOME:-}" && -x "$KAFKA_HOME/bin/kafka-server-start.sh" ]]; then
		echo "$KAFKA_HOME/libs"
	else
		echo "$MAVEN_LIBS_DIR"
	fi
}

# Kafka version of the jars in a libs dir, read off the kafka-clients jar name.
kafka_version() {
	local jars=("$1"/kafka-clients-*.jar)
	[[ -f "${jars[0]}" ]] || die "no kafka-clients jar in $1"
	local name
	name="$(basename "${jars[0]}" .jar)"
	echo "${name#kafka-clients-}"
}

# Fetches the broker jars into .var/kafka/libs unless they are already there.
# Maven writes into a temporary dir that is renamed at the end, so a download
# cut short never passes for a complete one.
fetch_libs() {
	[[ "$(libs_dir)" == "$MAVEN_LIBS_DIR" ]] || return 0
	compgen -G "$MAVEN_LIBS_DIR/kafka_2.13-*.jar" >/dev/null && return 0
	command -v mvn >/dev/null || die "no Kafka jars and no mvn to fetch them"

	local version partial="$MAVEN_LIBS_DIR.partial"
	for version in "${KAFKA_VERSIONS[@]}"; do
		log "fetching Kafka $version jars with Maven (once)..."
		rm -rf "$partial"
		if maven_copy_jars "$version" "$partial"; then
			mv "$partial" "$MAVEN_LIBS_DIR"
			log "fetched Kafka $version: $(find "$MAVEN_LIBS_DIR" -name '*.jar' | wc -l) jars"
			return 0
		fi
		log "Kafka $version could not be fetched; see $MAVEN_LOG"
	done
	tail -n 30 "$MAVEN_LOG" >&2
	die "no Kafka version could be fetched"
}

maven_copy_jars() {
	local version="$1" output_dir="$2"
	mvn -B -q -f "$POM_FILE" \
		-Dkafka.version="$version" -Dstyle.color=never \
		dependency:copy-dependencies \
		-DincludeScope=runtime -DoutputDirectory="$output_dir" \
		>"$MAVEN_LOG" 2>&1
}

# --- config -----------------------------------------------------------------

# Kafka 4 only knows the dynamic quorum (bootstrap servers, formatted with
# --standalone); a 3.x distribution from KAFKA_HOME gets the static voters.
uses_dynamic_quorum() {
	local major="${1%%.*}"
	((major >= 4))
}

# Rewritten on every start so the file always matches this script.
write_server_config() {
	local version="$1" quorum_line
	if uses_dynamic_quorum "$version"; then
		quorum_line="controller.quorum.bootstrap.servers=$LISTEN_HOST:$CONTROLLER_PORT"
	else
		quorum_line="controller.quorum.voters=1@$LISTEN_HOST:$CONTROLLER_PORT"
	fi

	cat >"$SERVER_CONFIG" <<EOF
# Written by scripts/kafka.sh on each start; edit the script, not this file.
node.id=1
process.roles=broker,controller
$quorum_line
listeners=PLAINTEXT://$LISTEN_HOST:$BROKER_PORT,CONTROLLER://$LISTEN_HOST:$CONTROLLER_PORT
advertised.listeners=PLAINTEXT://$BROKER_ADDRESS
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$DATA_DIR
num.partitions=4
auto.create.topics.enable=true
# One broker: every internal topic must settle for a single replica.
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
# Tests join and leave groups all the time; don't make each join wait 3 s.
group.initial.rebalance.delay.ms=0
EOF
}

# Log4j2 configs in the properties format, which log4j-core reads without the
# YAML/JSON libraries Kafka's own shipped config would need.
write_log4j_configs() {
	write_log4j_config "$SERVER_LOG4J_CONFIG" INFO SYSTEM_OUT
	write_log4j_config "$TOOLS_LOG4J_CONFIG" WARN SYSTEM_ERR
	cat >"$TOOLS_CLIENT_CONFIG" <<EOF
# Make the readiness probe fail fast instead of retrying for a minute.
request.timeout.ms=5000
default.api.timeout.ms=5000
EOF
}

write_log4j_config() {
	local path="$1" level="$2" target="$3"
	cat >"$path" <<EOF
status = warn
appender.console.type = Console
appender.console.name = console
appender.console.target = $target
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = $level
rootLogger.appenderRef.console.ref = console
# Per-request and state-change chatter drowns the lines worth reading.
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.state.name = state.change.logger
logger.state.level = WARN
EOF
}

# --- storage ----------------------------------------------------------------

# Formats the data dir once; meta.properties marks a formatted dir, and
# formatting again would throw away the topics and the cluster id.
format_storage_once() {
	local libs="$1" version="$2"
	[[ -f "$DATA_DIR/meta.properties" ]] && return 0

	local cluster_id
	cluster_id="$(run_tool "$libs" kafka.tools.StorageTool random-uuid)"
	local format_args=(format -t "$cluster_id" -c "$SERVER_CONFIG")
	uses_dynamic_quorum "$version" && format_args+=(--standalone)

	log "formatting $DATA_DIR: cluster_id=$cluster_id"
	run_tool "$libs" kafka.tools.StorageTool "${format_args[@]}" >&2
}

run_tool() {
	local libs="$1"
	shift
	java "${TOOL_JVM_FLAGS[@]}" -cp "$libs/*" \
		-Dlog4j2.configurationFile="$TOOLS_LOG4J_CONFIG" "$@"
}

# --- lifecycle --------------------------------------------------------------

# Starts kafka.Kafka detached from this shell (setsid, nohup) so it outlives
# the caller. Fd 9 (the lifecycle lock) is closed for it: a broker holding the
# lock for its whole life would block every later start.
# The previous log is kept as server.log.1 for post-mortems.
launch_broker() {
	local libs="$1"
	[[ -f "$SERVER_LOG" ]] && mv -f "$SERVER_LOG" "$SERVER_LOG.1"
	# HEAP_OPTS is a list of JVM flags: split on purpose.
	# shellcheck disable=SC2086
	setsid nohup java $HEAP_OPTS -Djava.awt.headless=true \
		-Dlog4j2.configurationFile="$SERVER_LOG4J_CONFIG" \
		-cp "$libs/*" kafka.Kafka "$SERVER_CONFIG" \
		>"$SERVER_LOG" 2>&1 </dev/null 9>&- &
	echo "$!" >"$PID_FILE"
	log "launched broker: pid=$! log=$SERVER_LOG"
}

# A metadata round trip, not just an open port: the socket accepts a little
# before the broker has a controller and can serve requests.
broker_serves() {
	local libs="$1"
	# run_tool by hand: timeout cannot run a shell function.
	timeout 20 java "${TOOL_JVM_FLAGS[@]}" -cp "$libs/*" \
		-Dlog4j2.configurationFile="$TOOLS_LOG4J_CONFIG" \
		org.apache.kafka.tools.TopicCommand --bootstrap-server "$BROKER_ADDRESS" \
		--command-config "$TOOLS_CLIENT_CONFIG" --list >/dev/null 2>&1
}

wait_until_ready() {
	local libs="$1" pid="$2"
	local deadline=$((SECONDS + START_TIMEOUT_S))
	while ((SECONDS < deadline)); do
		kill -0 "$pid" 2>/dev/null || fail_start "broker exited during start"
		if port_answers "$LISTEN_HOST" "$BROKER_PORT" && broker_serves "$libs"; then
			return 0
		fi
		sleep 1
	done
	fail_start "broker not ready after ${START_TIMEOUT_S}s"
}

# The cause of a failed start sits deep in a stack trace, so the error lines
# come first, then the plain tail.
fail_start() {
	log "$1; errors in $SERVER_LOG:"
	grep -E '^\[.*\] (ERROR|FATAL)|^Caused by' "$SERVER_LOG" | tail -n 10 >&2 || true
	log "last lines of $SERVER_LOG:"
	tail -n 20 "$SERVER_LOG" >&2 || true
	exit 1
}

# Start and stop are serialised: two starts (a test fixture and CI, say) must
# not both launch a broker on one data dir, and a stop must not read the pid
# file of a broker that is still being launched. The wait is bounded by a
# first download plus a full start.
take_lifecycle_lock() {
	mkdir -p "$STATE_DIR" "$SHARED_DIR"
	exec 9>"$LOCK_FILE"
	flock -w $((START_TIMEOUT_S + 120)) 9 || die "$LOCK_FILE still held; gave up"
}

cmd_start() {
	take_lifecycle_lock

	local pid
	if bootstrap_answers; then
		log "a broker already answers on $BOOTSTRAP; reusing it"
		echo "$BOOTSTRAP"
		return 0
	fi

	local libs version
	fetch_libs
	libs="$(libs_dir)"
	version="$(kafka_version "$libs")"
	write_server_config "$version"
	write_log4j_configs

	# Ours may be alive but still starting up: wait for it, don't launch twice.
	if ! pid="$(running_pid)"; then
		format_storage_once "$libs" "$version"
		launch_broker "$libs"
		pid="$(<"$PID_FILE")"
	fi

	wait_until_ready "$libs" "$pid"
	log "Kafka $version ready: pid=$pid"
	echo "$BROKER_ADDRESS"
}

# Kafka shuts down cleanly on SIGTERM; a clean stop spares the next start a
# log recovery. SIGKILL only if it hangs.
cmd_stop() {
	take_lifecycle_lock

	local pid
	if ! pid="$(running_pid)"; then
		rm -f "$PID_FILE"
		log "no broker started by this script is running"
		return 0
	fi

	log "stopping broker: pid=$pid"
	kill -TERM "$pid"
	local waited_s=0
	while kill -0 "$pid" 2>/dev/null && ((waited_s < 30)); do
		sleep 1
		waited_s=$((waited_s + 1))
	done
	if kill -0 "$pid" 2>/dev/null; then
		log "broker ignored SIGTERM for 30s; killing it: pid=$pid"
		kill -KILL "$pid"
	fi
	rm -f "$PID_FILE"
	log "stopped"
}

cmd_status() {
	local pid owner="not started by this script"
	pid="$(running_pid)" && owner="pid $pid, started by this script"
	if bootstrap_answers; then
		echo "up: $BOOTSTRAP answers ($owner)"
		return 0
	fi
	echo "down: nothing answers on $BOOTSTRAP"
	return 1
}

main() {
	case "${1:-}" in
	start) cmd_start ;;
	stop) cmd_stop ;;
	status) cmd_status ;;
	*) die "usage: $0 start|stop|status" ;;
	esac
}

main "$@"
