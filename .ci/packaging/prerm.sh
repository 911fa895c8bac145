#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
  systemctl stop mailbridge >/dev/null 2>&1 || true
  systemctl disable mailbridge >/dev/null 2>&1 || true
fi
