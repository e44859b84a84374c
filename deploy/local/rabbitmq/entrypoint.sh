#!/bin/sh
# Turn the official image's RABBITMQ_DEFAULT_* variables into configuration (RabbitMQ 3.10 itself
# does not read them), then run the command.
set -eu
conf=/var/lib/rabbitmq/default-user.conf
: > "$conf"
if [ -n "${RABBITMQ_DEFAULT_USER:-}" ]; then
    printf 'default_user = %s\n' "$RABBITMQ_DEFAULT_USER" >> "$conf"
fi
if [ -n "${RABBITMQ_DEFAULT_PASS:-}" ]; then
    printf 'default_pass = %s\n' "$RABBITMQ_DEFAULT_PASS" >> "$conf"
fi
if [ -n "${RABBITMQ_DEFAULT_VHOST:-}" ]; then
    printf 'default_vhost = %s\n' "$RABBITMQ_DEFAULT_VHOST" >> "$conf"
fi
# conf.d may be a read-only mount: the generated file is the main configuration file instead, read
# before conf.d.
export RABBITMQ_CONFIG_FILE="$conf"
exec "$@"
