#!/bin/sh
# On purge: the secrets `mailbridge init` wrote beside the configuration
# go (dpkg removes the configuration itself), and the state directory
# too unless messages still wait in the outbox.
set -e
if [ "$1" = purge ]; then
  rm -f /etc/mailbridge/*-secret.txt /etc/mailbridge/*-secret-*.txt /etc/mailbridge/.mailbridge*.toml.* /etc/mailbridge/.*-secret*.txt.*
  rmdir /etc/mailbridge 2>/dev/null || true
  if [ -d /var/lib/mailbridge/outbox/queue ] && [ -n "$(ls -A /var/lib/mailbridge/outbox/queue 2>/dev/null)" ]; then
    echo "mailbridge: /var/lib/mailbridge/outbox/queue still holds messages that were not sent: kept"
  else
    rm -rf /var/lib/mailbridge
  fi
  rm -rf /var/log/mailbridge
fi
