#!/usr/bin/env bash
# What the suite needs beside Python packages, installed and started when missing: a RabbitMQ
# on 127.0.0.1:5672 (guest/guest), and Debian's prometheus and promtool (the dashboard and alert
# tests start their own server on a free port). `make test` runs this; installing needs root
# (or a RabbitMQ and a prometheus already there).
set -euo pipefail

rabbitmq_answers() { timeout 2 bash -c '</dev/tcp/127.0.0.1/5672' 2>/dev/null; }

apt_install() {
  if [ "$(id -u)" != 0 ]; then
    echo "tests/services.sh: $* missing; install Debian's $* (as root), then run make test again" >&2
    exit 1
  fi
  echo "installing $*"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

if ! rabbitmq_answers; then
  command -v rabbitmq-server >/dev/null || apt_install rabbitmq-server
  echo "starting rabbitmq-server"
  rabbitmq-server -detached
  # -detached returns at once; await_startup fails until the node has registered, so poll
  for _ in $(seq 120); do
    rabbitmqctl -q await_startup --timeout 5 >/dev/null 2>&1 && rabbitmq_answers && break
    sleep 1
  done
  rabbitmq_answers || { echo "RabbitMQ does not answer on 127.0.0.1:5672" >&2; exit 1; }
fi

if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
  apt_install prometheus
  # the package starts its own server on port 9090, which the tests do not use: keep it off
  invoke-rc.d prometheus stop >/dev/null 2>&1 || true
fi
