#!/usr/bin/env bash
# Install, upgrade or remove Outpost as a systemd service on Debian / Raspberry Pi OS.
#
#   sudo deploy/install.sh [--wheelhouse DIR | --source DIR] [--prefix /opt/outpost]
#                          [--config FILE] [--no-start] [--dry-run]
#   sudo deploy/install.sh --uninstall [--prefix /opt/outpost]
#
# --wheelhouse DIR  install with NO network: every wheel comes from DIR (a release tarball's
#                   wheelhouse/, made by `make dist`), hash-checked against DIR/requirements.txt.
#                   The default when this script sits in a release tarball.
# --source DIR      install from a checkout (default: the one this script is in): the
#                   dependencies from deploy/requirements.lock (hash-checked) off PyPI.
# Creates the `outpost` system user and group (member of dialout for serial ports), a venv in
# PREFIX/venv, /etc/outpost (an existing configuration is never overwritten; secrets go in
# /etc/outpost/outpost.env, root-only 0600, read by systemd, not by the service user), the unit
# /etc/systemd/system/outpost.service, `outpost` on the PATH, its man page
# (/usr/local/share/man/man1/outpost.1) and bash completion
# (/usr/local/share/bash-completion/completions/outpost). Members of the `outpost`
# group may use `outpost status` and `outpost tail` without sudo and can read no secret.
#
# Run it again with a newer tarball to upgrade: configuration and buffer are kept, the venv is
# updated in place, and the service restarted only if the configuration validates.
# --uninstall removes the service, the venv and the command; /etc/outpost and the buffer in
# /var/lib/outpost stay (delete them by hand). --dry-run prints every command instead.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TOP="$(cd "$SCRIPT_DIR/.." && pwd)"
SOURCE=""
WHEELHOUSE=""
PREFIX=/opt/outpost
CONFIG_DIR=/etc/outpost
CONFIG_SRC=""
UNIT_DIR=/etc/systemd/system
UNIT_SRC="$SCRIPT_DIR/systemd/outpost.service"
START=1
DRY_RUN=0
UNINSTALL=0
SERVICE_USER=outpost
MAN_DIR=/usr/local/share/man/man1
COMPLETION_DIR=/usr/local/share/bash-completion/completions
PYTHON="${PYTHON:-python3}"

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --source) SOURCE="$2"; shift 2 ;;
        --wheelhouse) WHEELHOUSE="$2"; shift 2 ;;
        --prefix) PREFIX="$2"; shift 2 ;;
        --config) CONFIG_SRC="$2"; shift 2 ;;
        --no-start) START=0; shift ;;
        --uninstall) UNINSTALL=1; shift ;;
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
# systemd running as init (sd_booted)? Not in an image being built or a chroot: the unit is
# then only enabled, and starts at the next boot.
systemd_up() { [[ $DRY_RUN -eq 1 || -d /run/systemd/system ]]; }
die() { echo "install.sh: $*" >&2; exit 1; }

if [[ $DRY_RUN -eq 0 && $EUID -ne 0 ]]; then
    die "run as root (sudo $0 $*)"
fi

if [[ $UNINSTALL -eq 1 ]]; then
    if [[ -e "$UNIT_DIR/outpost.service" ]]; then
        if systemd_up; then run systemctl disable --now outpost.service || true; else run systemctl disable outpost.service || true; fi
        run rm -f "$UNIT_DIR/outpost.service"
        if systemd_up; then run systemctl daemon-reload || true; fi
    fi
    run rm -rf "$PREFIX/venv" "$PREFIX/README.md" "$PREFIX/LICENSE" "$PREFIX/templates"
    if [[ -L /usr/local/bin/outpost ]]; then run rm -f /usr/local/bin/outpost; fi
    run rm -f "$MAN_DIR/outpost.1" "$COMPLETION_DIR/outpost"
    say "removed the service, $PREFIX/venv and /usr/local/bin/outpost"
    say "kept: $CONFIG_DIR (configuration, secrets), /var/lib/outpost (buffer), the user $SERVICE_USER"
    exit 0
fi

if [[ -n "$SOURCE" && -n "$WHEELHOUSE" ]]; then
    die "give --source or --wheelhouse, not both"
fi
if [[ -z "$SOURCE" && -z "$WHEELHOUSE" ]]; then
    # In a release tarball the wheelhouse sits beside deploy/; in a checkout, the source does.
    if [[ -f "$TOP/wheelhouse/requirements.txt" ]]; then WHEELHOUSE="$TOP/wheelhouse"; else SOURCE="$TOP"; fi
fi
if [[ -n "$WHEELHOUSE" ]]; then
    WHEELHOUSE="$(cd "$WHEELHOUSE" 2>/dev/null && pwd)" || die "wheelhouse $WHEELHOUSE does not exist"
    [[ -f "$WHEELHOUSE/requirements.txt" && -f "$WHEELHOUSE/outpost.sha256" ]] \
        || die "$WHEELHOUSE is not an Outpost wheelhouse (no requirements.txt / outpost.sha256); build one with \`make dist\`"
    OUTPOST_WHEEL="$WHEELHOUSE/$(awk '{print $2; exit}' "$WHEELHOUSE/outpost.sha256")"
    [[ -f "$OUTPOST_WHEEL" ]] || die "$OUTPOST_WHEEL is missing from the wheelhouse"
else
    [[ -f "$SOURCE/pyproject.toml" ]] \
        || die "$SOURCE does not look like an Outpost source tree (no pyproject.toml); use --source or --wheelhouse"
    [[ -f "$SOURCE/deploy/requirements.lock" ]] || die "$SOURCE/deploy/requirements.lock is missing"
fi
[[ -f "$UNIT_SRC" ]] || die "the unit $UNIT_SRC is missing"
if [[ -n "$CONFIG_SRC" && ! -f "$CONFIG_SRC" ]]; then
    die "configuration file $CONFIG_SRC does not exist"
fi
if ! "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
    die "Outpost needs Python 3.11 or newer ($PYTHON); on Raspberry Pi OS: apt-get install python3 python3-venv"
fi

# 1. The service user and group. The group may use the status socket; it reads no secret.
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
# pip is used as the venv brings it (no self-upgrade: that would need the network), with
# --no-deps and --require-hashes so that exactly the locked files are installed.
PIP=("$PREFIX/venv/bin/python" -m pip --disable-pip-version-check --no-input)
run install -d -m 0755 "$PREFIX"
if [[ -x "$PREFIX/venv/bin/python" ]] && ! "$PREFIX/venv/bin/python" -c pass 2>/dev/null; then
    say "the venv's Python no longer runs (OS upgrade?): recreating $PREFIX/venv"
    run rm -rf "$PREFIX/venv"
fi
if [[ ! -x "$PREFIX/venv/bin/python" ]]; then
    run "$PYTHON" -m venv "$PREFIX/venv"
fi
if [[ -n "$WHEELHOUSE" ]]; then
    if [[ $DRY_RUN -eq 0 ]]; then
        (cd "$WHEELHOUSE" && sha256sum --quiet -c outpost.sha256) || die "$OUTPOST_WHEEL does not match outpost.sha256"
    fi
    run env PIP_FIND_LINKS= PIP_INDEX_URL= "${PIP[@]}" install --quiet --no-index --find-links "$WHEELHOUSE" \
        --no-deps --require-hashes --no-build-isolation -r "$WHEELHOUSE/requirements.txt"
    # --force-reinstall: an upgrade to a rebuilt wheel of the same version still replaces the code.
    run env PIP_FIND_LINKS= PIP_INDEX_URL= "${PIP[@]}" install --quiet --no-index --no-deps --force-reinstall \
        "$OUTPOST_WHEEL"
else
    run "${PIP[@]}" install --quiet --no-deps --require-hashes -r "$SOURCE/deploy/requirements.lock"
    run "${PIP[@]}" install --quiet --no-deps --force-reinstall "$SOURCE"
fi
if [[ $DRY_RUN -eq 0 ]]; then
    "${PIP[@]}" check >/dev/null || die "the installed packages are inconsistent: $("${PIP[@]}" check)"
fi
for doc in README.md LICENSE; do
    if [[ -f "$TOP/$doc" ]]; then run install -m 0644 "$TOP/$doc" "$PREFIX/$doc"; fi
done
# Device templates for `outpost probe modbus --emit-toml --template NAME` (found beside the venv).
if compgen -G "$SCRIPT_DIR/templates/*.toml" >/dev/null; then
    run install -d -m 0755 "$PREFIX/templates"
    run install -m 0644 "$SCRIPT_DIR"/templates/*.toml "$PREFIX/templates/"
fi
run ln -sf "$PREFIX/venv/bin/outpost" /usr/local/bin/outpost
# The man page and the bash completion: generated from the CLI's parser at build time (a
# release tarball carries them in share/); from a checkout, generated now by the code just
# installed. bash-completion loads the file at the first <Tab> after `outpost`.
run install -d -m 0755 "$MAN_DIR" "$COMPLETION_DIR"
for page in man completion; do
    if [[ $page == man ]]; then built="$TOP/share/man/man1/outpost.1" dest="$MAN_DIR/outpost.1"
    else built="$TOP/share/bash-completion/completions/outpost" dest="$COMPLETION_DIR/outpost"; fi
    if [[ -f "$built" ]]; then
        run install -m 0644 "$built" "$dest"
    else
        run "$PREFIX/venv/bin/python" -m gateway.cli.docgen "$page" -o "$dest"
        run chmod 0644 "$dest"
    fi
done

# 3. Configuration: readable by the service (group outpost), writable by root only, never
# overwritten. Secrets: outpost.env is read by systemd itself (EnvironmentFile=) as root, so it
# is root:root 0600 and neither the service user nor the outpost group can read the file.
run install -d -m 0750 -o root -g "$SERVICE_USER" "$CONFIG_DIR"
if [[ -e "$CONFIG_DIR/outpost.toml" ]]; then
    say "keeping the existing $CONFIG_DIR/outpost.toml"
elif [[ -n "$CONFIG_SRC" ]]; then
    run install -m 0640 -o root -g "$SERVICE_USER" "$CONFIG_SRC" "$CONFIG_DIR/outpost.toml"
elif [[ -f "$SCRIPT_DIR/examples/outpost.toml" ]]; then
    run install -m 0640 -o root -g "$SERVICE_USER" "$SCRIPT_DIR/examples/outpost.toml" \
        "$CONFIG_DIR/outpost.toml.example"
    say "no configuration yet: edit $CONFIG_DIR/outpost.toml.example and save it as $CONFIG_DIR/outpost.toml"
fi
if [[ ! -e "$CONFIG_DIR/outpost.env" ]]; then
    run install -m 0600 -o root -g root /dev/null "$CONFIG_DIR/outpost.env"
else
    # Earlier releases made it 0640 group outpost: tighten it on upgrade.
    run chown root:root "$CONFIG_DIR/outpost.env"
    run chmod 0600 "$CONFIG_DIR/outpost.env"
fi

# 4. The unit.
run install -m 0644 "$UNIT_SRC" "$UNIT_DIR/outpost.service"
if systemd_up; then run systemctl daemon-reload; fi
run systemctl enable outpost.service

# 5. Start (or restart after an upgrade) only with a configuration that validates.
if [[ $START -eq 1 ]]; then
    if [[ $DRY_RUN -eq 1 || -e "$CONFIG_DIR/outpost.toml" ]]; then
        run "$PREFIX/venv/bin/outpost" check "$CONFIG_DIR/outpost.toml"
        if systemd_up; then
            run systemctl restart outpost.service
            say "started; see \`outpost status\` and \`journalctl -u outpost -f\`"
        else
            say "systemd is not running here (an image or a chroot): outpost.service starts at the next boot"
        fi
    else
        say "not started: no $CONFIG_DIR/outpost.toml yet; then run \`systemctl start outpost\`"
    fi
fi
say "done: $("$PREFIX/venv/bin/outpost" --version 2>/dev/null | head -n 1 || echo "outpost (dry run)")"
