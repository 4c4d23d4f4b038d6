#!/usr/bin/env bash
# Install Outpost as a systemd service on Debian / Raspberry Pi OS.
#
#   sudo deploy/install.sh [--source DIR] [--prefix /opt/outpost] [--config FILE] [--no-start] [--dry-run]
#
# Creates the `outpost` system user and group (member of dialout for serial ports), a venv in
# PREFIX/venv with Outpost installed from DIR (default: the checkout this script is in), the
# configuration directory /etc/outpost (an existing config is never overwritten), the unit
# /etc/systemd/system/outpost.service, and `outpost` on the PATH for technicians. Members of
# the `outpost` group may use `outpost status` and `outpost tail` without sudo.
#
# Safe to run again to upgrade: the venv is updated in place and the service restarted.
# --dry-run prints every command instead of running it.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SOURCE="$(cd "$SCRIPT_DIR/.." && pwd)"
PREFIX=/opt/outpost
CONFIG_DIR=/etc/outpost
CONFIG_SRC=""
UNIT_DIR=/etc/systemd/system
START=1
DRY_RUN=0
SERVICE_USER=outpost
PYTHON="${PYTHON:-python3}"

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --source) SOURCE="$2"; shift 2 ;;
        --prefix) PREFIX="$2"; shift 2 ;;
        --config) CONFIG_SRC="$2"; shift 2 ;;
        --no-start) START=0; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "install.sh: unknown option $1 (try --help)" >&2; exit 2 ;;
    esac
done

run() {
    if [[ $DRY_RUN -eq 1 ]]; then
        echo "+ $*"
    else
        "$@"
    fi
}

say() { echo "install.sh: $*"; }

if [[ $DRY_RUN -eq 0 && $EUID -ne 0 ]]; then
    echo "install.sh: run as root (sudo $0 $*)" >&2
    exit 1
fi
if [[ ! -f "$SOURCE/pyproject.toml" ]]; then
    echo "install.sh: $SOURCE does not look like an Outpost source tree (no pyproject.toml); use --source" >&2
    exit 1
fi
if [[ -n "$CONFIG_SRC" && ! -f "$CONFIG_SRC" ]]; then
    echo "install.sh: configuration file $CONFIG_SRC does not exist" >&2
    exit 1
fi
if ! "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
    echo "install.sh: Outpost needs Python 3.11 or newer ($PYTHON); on Raspberry Pi OS: apt-get install python3 python3-venv" >&2
    exit 1
fi

# 1. The service user and group. The group also grants access to the status socket.
if ! getent group "$SERVICE_USER" >/dev/null; then
    run groupadd --system "$SERVICE_USER"
fi
if ! getent passwd "$SERVICE_USER" >/dev/null; then
    run useradd --system --gid "$SERVICE_USER" --groups dialout --home-dir /var/lib/outpost \
        --no-create-home --shell /usr/sbin/nologin --comment "Outpost edge gateway" "$SERVICE_USER"
else
    run usermod --append --groups dialout "$SERVICE_USER"
fi

# 2. The virtual environment, owned by root: the service may run the code, never change it.
run install -d -m 0755 "$PREFIX"
if [[ ! -x "$PREFIX/venv/bin/python" ]]; then
    run "$PYTHON" -m venv "$PREFIX/venv"
fi
run "$PREFIX/venv/bin/pip" install --quiet --upgrade pip
run "$PREFIX/venv/bin/pip" install --quiet --upgrade "$SOURCE"
run install -m 0644 "$SOURCE/README.md" "$PREFIX/README.md"
run ln -sf "$PREFIX/venv/bin/outpost" /usr/local/bin/outpost

# 3. Configuration: readable by the service, writable by root only. Never overwritten.
run install -d -m 0750 -o root -g "$SERVICE_USER" "$CONFIG_DIR"
if [[ -e "$CONFIG_DIR/outpost.toml" ]]; then
    say "keeping the existing $CONFIG_DIR/outpost.toml"
elif [[ -n "$CONFIG_SRC" ]]; then
    run install -m 0640 -o root -g "$SERVICE_USER" "$CONFIG_SRC" "$CONFIG_DIR/outpost.toml"
elif [[ -f "$SOURCE/deploy/examples/outpost.toml" ]]; then
    run install -m 0640 -o root -g "$SERVICE_USER" "$SOURCE/deploy/examples/outpost.toml" \
        "$CONFIG_DIR/outpost.toml.example"
    say "no configuration yet: edit $CONFIG_DIR/outpost.toml.example and save it as $CONFIG_DIR/outpost.toml"
fi
if [[ ! -e "$CONFIG_DIR/outpost.env" ]]; then
    run install -m 0640 -o root -g "$SERVICE_USER" /dev/null "$CONFIG_DIR/outpost.env"
fi

# 4. The unit.
run install -m 0644 "$SOURCE/deploy/systemd/outpost.service" "$UNIT_DIR/outpost.service"
run systemctl daemon-reload
run systemctl enable outpost.service

# 5. Start (or restart after an upgrade) only with a configuration that validates.
if [[ $START -eq 1 ]]; then
    if [[ $DRY_RUN -eq 1 || -e "$CONFIG_DIR/outpost.toml" ]]; then
        run "$PREFIX/venv/bin/outpost" check "$CONFIG_DIR/outpost.toml"
        run systemctl restart outpost.service
        say "started; see \`outpost status\` and \`journalctl -u outpost -f\`"
    else
        say "not started: no $CONFIG_DIR/outpost.toml yet; then run \`systemctl start outpost\`"
    fi
fi
say "done"
