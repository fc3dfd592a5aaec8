#!/usr/bin/env bash
# Run a local ClickHouse server for development and the integration tests.
#
# Usage: scripts/clickhouse.sh start|stop|status
#
#   start   Reuse a server that already answers on the HTTP port; otherwise
#           install Debian's clickhouse-server/clickhouse-client if missing
#           and start one in the background (no systemd), with its data,
#           tmp files, logs and pid file under .var/clickhouse/. Waits until
#           it answers "SELECT 1", then prints its address.
#   stop    Stop the server this script started (pid file); a server it did
#           not start is left alone.
#   status  Print whether a server answers; exit 0 if so, 3 if not.
#
# Environment:
#   CLICKHOUSE_PORT        native protocol port (default 9000)
#   CLICKHOUSE_HTTP_PORT   HTTP port, also used as the health probe (default 8123)
#   CLICKHOUSE_START_WAIT_S  seconds to wait for the server to answer (default 60)
#
# The server listens on 127.0.0.1 only, user "default" without a password,
# timezone UTC. Config: scripts/clickhouse/config.xml and users.xml; the
# paths that depend on the checkout are passed as command line overrides.
# 18.16 runs as root without complaint, so it runs as the invoking user.
set -euo pipefail

SCRIPT_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd -- "${SCRIPT_DIR}/.." && pwd)"
readonly SCRIPT_DIR REPO_ROOT
readonly CONFIG_FILE="${SCRIPT_DIR}/clickhouse/config.xml"
readonly VAR_DIR="${REPO_ROOT}/.var/clickhouse"
readonly LOG_DIR="${VAR_DIR}/log"
readonly PID_FILE="${VAR_DIR}/clickhouse-server.pid"
readonly STDOUT_LOG="${LOG_DIR}/stdout.log"

readonly HOST="127.0.0.1"
readonly TCP_PORT="${CLICKHOUSE_PORT:-9000}"
readonly HTTP_PORT="${CLICKHOUSE_HTTP_PORT:-8123}"
readonly START_WAIT_S="${CLICKHOUSE_START_WAIT_S:-60}"
readonly STOP_WAIT_S=30

log() {
    echo "clickhouse: $*" >&2
}

die() {
    log "$*"
    exit 1
}

# Print the result of a query over HTTP; fail if the server does not answer.
http_query() {
    curl --silent --show-error --fail --max-time 5 \
        --data-binary "$1" "http://${HOST}:${HTTP_PORT}/" 2>/dev/null
}

server_answers() {
    [[ "$(http_query 'SELECT 1')" == "1" ]]
}

# True if something accepts TCP connections on the port.
port_in_use() {
    (exec 3<>"/dev/tcp/${HOST}/$1") 2>/dev/null
}

# True if the process runs; a zombie (exited, not yet reaped) does not.
process_alive() {
    local stat
    stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
    # The state is the first field after the ")" that closes the command name.
    stat="${stat##*) }"
    [[ "${stat:0:1}" != "Z" ]]
}

# Print the pid from our pid file if that process is alive and is ClickHouse.
managed_pid() {
    local pid
    [[ -s "${PID_FILE}" ]] || return 1
    pid="$(tr -dc '0-9' <"${PID_FILE}")"
    [[ -n "${pid}" ]] && process_alive "${pid}" || return 1
    tr '\0' ' ' <"/proc/${pid}/cmdline" 2>/dev/null | grep -q clickhouse || return 1
    echo "${pid}"
}

print_address() {
    local version
    version="$(http_query 'SELECT version()' || echo unknown)"
    echo "ClickHouse ${version} on tcp://${HOST}:${TCP_PORT} http://${HOST}:${HTTP_PORT}"
}

print_log_tail() {
    local file
    for file in "${STDOUT_LOG}" "${LOG_DIR}/clickhouse-server.err.log" \
        "${LOG_DIR}/clickhouse-server.log"; do
        [[ -s "${file}" ]] || continue
        echo "----- tail ${file}" >&2
        tail -n 20 "${file}" >&2
    done
}

check_port() {
    local name="$1" value="$2"
    if ! [[ "${value}" =~ ^[0-9]+$ ]] || ((value < 1 || value > 65535)); then
        die "not a TCP port: ${name}=${value}"
    fi
}

# Print the command that runs the server: the split binary of the Debian
# package, or the multi-binary of the upstream packages.
server_command() {
    if command -v clickhouse-server >/dev/null; then
        command -v clickhouse-server
    elif [[ -x /usr/sbin/clickhouse-server ]]; then
        echo /usr/sbin/clickhouse-server
    elif command -v clickhouse >/dev/null; then
        echo "$(command -v clickhouse) server"
    else
        return 1
    fi
}

run_as_root() {
    if [[ "$(id -u)" -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null; then
        sudo "$@"
    else
        die "need root to install packages: command=$*"
    fi
}

# Install only what is missing: naming an installed package to apt-get
# install would upgrade it. apt's output goes to stderr, stdout stays the
# address.
ensure_installed() {
    local -a missing=()
    server_command >/dev/null || missing+=(clickhouse-server)
    command -v clickhouse-client >/dev/null || missing+=(clickhouse-client)
    command -v curl >/dev/null || missing+=(curl)
    ((${#missing[@]} == 0)) && return 0

    log "installing packages: ${missing[*]}"
    run_as_root apt-get update >&2
    run_as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y "${missing[@]}" >&2
}

# Start the server in its own session, detached from this shell.
launch_server() {
    local -a server
    read -r -a server <<<"$(server_command)"
    mkdir -p "${VAR_DIR}/data" "${VAR_DIR}/tmp" "${VAR_DIR}/user_files" \
        "${VAR_DIR}/format_schemas" "${LOG_DIR}"
    rm -f "${PID_FILE}"

    # Each "--key=value" after "--" overrides that key of the config file.
    # The server writes no pid file unless it daemonises itself, so the
    # script writes it; setsid and nohup exec, so $! is the server's pid.
    cd "${VAR_DIR}"
    setsid nohup "${server[@]}" \
        --config-file="${CONFIG_FILE}" \
        -- \
        --path="${VAR_DIR}/data/" \
        --tmp_path="${VAR_DIR}/tmp/" \
        --user_files_path="${VAR_DIR}/user_files/" \
        --format_schema_path="${VAR_DIR}/format_schemas/" \
        --logger.log="${LOG_DIR}/clickhouse-server.log" \
        --logger.errorlog="${LOG_DIR}/clickhouse-server.err.log" \
        --listen_host="${HOST}" \
        --tcp_port="${TCP_PORT}" \
        --http_port="${HTTP_PORT}" \
        </dev/null >"${STDOUT_LOG}" 2>&1 9>&- &
    echo $! >"${PID_FILE}"
}

# Wait until the server answers. Fail early, with a message, if the process
# exits; fail after START_WAIT_S if it runs but does not answer.
wait_until_ready() {
    local pid="$1" waited_s=0
    while ((waited_s < START_WAIT_S)); do
        server_answers && return 0
        if ! process_alive "${pid}"; then
            log "server exited during startup: pid=${pid}"
            return 1
        fi
        sleep 1
        waited_s=$((waited_s + 1))
    done
    log "server did not answer within ${START_WAIT_S}s: pid=${pid} port=${HTTP_PORT}"
    return 1
}

# Wait for a server of this checkout that is still starting (another start
# launched it); never kill it, it may serve other ports.
wait_for_managed() {
    local pid="$1"
    log "server process exists but does not answer yet, waiting: pid=${pid}"
    if ! wait_until_ready "${pid}"; then
        print_log_tail
        die "server does not answer on this port, stop it first: pid=${pid} port=${HTTP_PORT}"
    fi
    print_address
}

cmd_start() {
    local pid
    if server_answers; then
        log "reusing the server that answers: port=${HTTP_PORT}"
        print_address
        return 0
    fi

    ensure_installed
    mkdir -p "${VAR_DIR}"
    # Serialise concurrent starts: the second one then finds the first server.
    exec 9>"${VAR_DIR}/start.lock"
    flock --wait "$((START_WAIT_S + 10))" 9 || die "another start holds the lock"
    if server_answers; then
        print_address
        return 0
    fi
    if pid="$(managed_pid)"; then
        wait_for_managed "${pid}"
        return 0
    fi

    if port_in_use "${TCP_PORT}" || port_in_use "${HTTP_PORT}"; then
        die "port taken by something that does not answer as ClickHouse: tcp=${TCP_PORT} http=${HTTP_PORT}"
    fi
    launch_server
    pid="$(<"${PID_FILE}")"
    log "server launched: pid=${pid} dir=${VAR_DIR}"

    if ! wait_until_ready "${pid}"; then
        print_log_tail
        stop_pid "${pid}"
        exit 1
    fi
    print_address
}

# Stop the server process and wait until it is gone, so its ports are free.
stop_pid() {
    local pid="$1" waited_s=0
    if ! kill -TERM "${pid}" 2>/dev/null; then
        rm -f "${PID_FILE}"
        return 0
    fi
    while process_alive "${pid}" && ((waited_s < STOP_WAIT_S)); do
        sleep 1
        waited_s=$((waited_s + 1))
    done
    if process_alive "${pid}"; then
        log "server ignored SIGTERM for ${STOP_WAIT_S}s, killing: pid=${pid}"
        kill -KILL "${pid}" 2>/dev/null || true
    fi
    rm -f "${PID_FILE}"
}

cmd_stop() {
    local pid
    if ! pid="$(managed_pid)"; then
        rm -f "${PID_FILE}"
        if server_answers; then
            log "a server answers but was not started by this script, leaving it: port=${HTTP_PORT}"
        else
            log "not running"
        fi
        return 0
    fi

    stop_pid "${pid}"
    log "stopped: pid=${pid}"
}

cmd_status() {
    local pid
    if ! server_answers; then
        if pid="$(managed_pid)"; then
            echo "not answering: pid=${pid} port=${HTTP_PORT} (starting, or serving other ports)"
        else
            echo "not running"
        fi
        return 3
    fi

    if pid="$(managed_pid)"; then
        echo "running: pid=${pid} dir=${VAR_DIR}"
    else
        echo "running, not started by this script"
    fi
    print_address
}

main() {
    check_port CLICKHOUSE_PORT "${TCP_PORT}"
    check_port CLICKHOUSE_HTTP_PORT "${HTTP_PORT}"
    case "${1:-}" in
        start) cmd_start ;;
        stop) cmd_stop ;;
        status) cmd_status ;;
        *)
            echo "usage: $0 start|stop|status" >&2
            exit 2
            ;;
    esac
}

main "$@"
