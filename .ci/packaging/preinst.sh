#!/bin/sh
# The service's own user and group, before the files that belong to them.
set -e
if ! getent group mailbridge >/dev/null; then
  addgroup --system mailbridge >/dev/null
fi
if ! getent passwd mailbridge >/dev/null; then
  adduser --system --ingroup mailbridge --home /var/lib/mailbridge --no-create-home \
    --gecos "mailbridge service" --shell /usr/sbin/nologin mailbridge >/dev/null
fi
