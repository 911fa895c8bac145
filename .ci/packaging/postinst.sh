#!/bin/sh
set -e
install -d -o mailbridge -g mailbridge -m 0750 /var/lib/mailbridge /var/lib/mailbridge/outbox /var/log/mailbridge
if [ -d /run/systemd/system ]; then
  systemctl daemon-reload >/dev/null 2>&1 || true
fi
echo "mailbridge: run sudo mailbridge init (it asks for the app registration's values and writes"
echo "            /etc/mailbridge/mailbridge.toml and its secret, readable by root and the service),"
echo "            then: sudo systemctl enable --now mailbridge"
