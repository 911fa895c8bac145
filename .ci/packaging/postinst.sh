#!/bin/sh
set -e
install -d -o mailbridge -g mailbridge -m 0750 /var/lib/mailbridge /var/lib/mailbridge/outbox /var/log/mailbridge
if [ -d /run/systemd/system ]; then
  systemctl daemon-reload >/dev/null 2>&1 || true
fi
echo "mailbridge: edit /etc/mailbridge/mailbridge.toml (or run: sudo -u mailbridge mailbridge init -config /etc/mailbridge/mailbridge.toml -force),"
echo "            then: systemctl enable --now mailbridge"
