#!/bin/sh
# fimwatch installer.
#
#   sudo ./install.sh [OPTIONS]                       from a checkout
#   curl -fsSL URL/install.sh | sudo FIMWATCH_BASE_URL=URL sh      piped
#   curl -fsSL URL/install.sh | sudo sh -s -- --uninstall           (no URL needed)
#
# Options:
#   --dry-run      print what would be done, change nothing
#   --no-start     install and enable, but do not (re)start the service
#   --uninstall    stop and remove the service, program, library and sysctl
#                  drop-in; keep config (/etc/fimwatch), state and logs
#   --purge        --uninstall, and remove config, state and logs too
#   --root DIR     stage every file under DIR and touch nothing else (no
#                  systemctl, no sysctl, no baseline scan): for packaging/tests
#   -h, --help     this text
#
# Environment:
#   FIMWATCH_BASE_URL   where a piped installer fetches the other files; every
#                       file is checked against BASE_URL/SHA256SUMS, made with
#                         sha256sum fimwatch.py fimwatch.conf.example *.service \
#                           *.socket fimwatch-sendmail-relay fimwatch-fanotify.conf \
#                           [WHEEL] > SHA256SUMS
#   PYTHON              the python3 (>= 3.9) to run fimwatch with
#                       (default: /usr/bin/python3, else python3 on PATH)
#   FIMWATCH_INSECURE_HTTP=1  allow a plain-http BASE_URL that is not loopback
#
# The fanotify drop-in (fimwatch-fanotify.conf, installed as
# /etc/systemd/system/fimwatch.service.d/fanotify.conf) gives the unit
# CAP_SYS_ADMIN and the fanotify system calls, so events name the process
# that made each change. It is installed unless the config says
# `[watch] backend = inotify`, and removed when it does: set that and re-run
# the installer for the unit's tighter sandbox alone.
#
# Re-running upgrades in place: files whose content did not change are not
# rewritten, an existing /etc/fimwatch/fimwatch.conf is never overwritten (the
# new example goes beside it as fimwatch.conf.new).
#
# Exit status: 0 ok, 1 failure, 2 usage error.
set -eu

# --- constants ---------------------------------------------------------------
INOTIFY_SIMPLE_VERSION=2.0.1
INOTIFY_SIMPLE_WHEEL=inotify_simple-2.0.1-py3-none-any.whl
INOTIFY_SIMPLE_SHA256=e5da495f2064889f8e68b67f9358b0d102e03b783c2d42e5b8e132ab859a5d8a
MIN_PYTHON=3.9

BIN=/usr/local/sbin/fimwatch
LIBDIR=/usr/local/lib/fimwatch
RELAY=$LIBDIR/sendmail-relay
CONFDIR=/etc/fimwatch
CONF=$CONFDIR/fimwatch.conf
STATEDIR=/var/lib/fimwatch
LOGDIR=/var/log/fimwatch
UNITDIR=/etc/systemd/system
SYSCTL_FILE=/etc/sysctl.d/60-fimwatch.conf
# python3-pip, when this installer had to install it: --uninstall marks it
# automatically installed again, so `apt autoremove` takes it away
PIP_MARK=$LIBDIR/python3-pip.installed-by-fimwatch
SERVICE=fimwatch.service
SOCKET=fimwatch-sendmail.socket
UNITS="fimwatch.service fimwatch-failure@.service fimwatch-sendmail.socket fimwatch-sendmail@.service"
DROPIN_DIR=$UNITDIR/fimwatch.service.d
FANOTIFY_DROPIN=$DROPIN_DIR/fanotify.conf
FANOTIFY_SRC=fimwatch-fanotify.conf
SOURCE_FILES="fimwatch.py fimwatch.conf.example fimwatch-sendmail-relay $FANOTIFY_SRC $UNITS"

# --- state (set by options and preflight) --------------------------------------
DRY_RUN=0
NO_START=0
ACTION=install
ROOT=
SRC=
TMP=
PY=
HAVE_SYSTEMD=0
CHANGED_PATHS=
STOPPED_FOR_UPGRADE=0
PIP_BROUGHT=0
STAGE=
UNITS_CHANGED=0
CONF_NOTE=
STEP=start
WATCH_DIRS=
WATCH_LIMIT=
CONFIG_JSON=          # fimwatch check-config --json, once the config is in place
STATE_DIR=$STATEDIR   # [fimwatch] state_dir of the config
FANOTIFY=             # 1: install the fanotify drop-in, 0: remove it (fanotify_wanted)
FANOTIFY_NOTE=

# --- output ------------------------------------------------------------------
setup_colours() {
    if [ -t 2 ] && [ "${TERM:-dumb}" != dumb ] && [ -z "${NO_COLOR:-}" ]; then
        C_BOLD=$(printf '\033[1m'); C_RED=$(printf '\033[31m')
        C_YEL=$(printf '\033[33m'); C_GRN=$(printf '\033[32m'); C_OFF=$(printf '\033[0m')
    else
        C_BOLD=; C_RED=; C_YEL=; C_GRN=; C_OFF=
    fi
}

info() { printf '%sfimwatch:%s %s\n' "$C_GRN" "$C_OFF" "$*" >&2; }
warn() { printf '%sfimwatch: warning:%s %s\n' "$C_YEL" "$C_OFF" "$*" >&2; }
fatal() {
    printf '%sfimwatch: error:%s %s\n' "$C_RED" "$C_OFF" "$*" >&2
    exit 1
}
usage_error() {
    printf 'fimwatch install: %s (see --help)\n' "$*" >&2
    exit 2
}

usage() {
    cat <<'EOT'
usage: install.sh [--dry-run] [--no-start] [--uninstall | --purge] [--root DIR]
       curl -fsSL URL/install.sh | sudo FIMWATCH_BASE_URL=URL sh [-s -- OPTIONS]

Installs fimwatch as /usr/local/sbin/fimwatch with its systemd service.

  --dry-run      print what would be done, change nothing
  --no-start     install and enable, but do not (re)start the service
  --uninstall    remove service, program, library and sysctl drop-in;
                 keep config (/etc/fimwatch), state and logs
  --purge        --uninstall, and remove config, state and logs too
  --root DIR     stage every file under DIR, touch nothing else
  -h, --help     this text

Environment: FIMWATCH_BASE_URL (piped mode: where to fetch the files and
SHA256SUMS), PYTHON (interpreter, >= 3.9), FIMWATCH_INSECURE_HTTP=1.
EOT
}

# Every command that changes the system goes through run(): --dry-run prints it.
run() {
    if [ "$DRY_RUN" = 1 ]; then
        printf '%s+ %s%s\n' "$C_BOLD" "$*" "$C_OFF" >&2
        return 0
    fi
    "$@"
}

on_exit() {
    status=$?
    if [ -n "$TMP" ] && [ -d "$TMP" ]; then
        rm -rf "$TMP"
    fi
    if [ "$status" != 0 ] && [ "$status" != 2 ]; then
        printf '%sfimwatch: %s failed during: %s (exit %s)%s\n' \
            "$C_RED" "$ACTION" "$STEP" "$status" "$C_OFF" >&2
    fi
    exit "$status"
}

# --- small helpers ----------------------------------------------------------------
have() { command -v "$1" >/dev/null 2>&1; }

sha256_of() {
    if have sha256sum; then
        sha256sum "$1" | cut -d' ' -f1
    else
        "$PY" -c 'import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],"rb").read()).hexdigest())' "$1"
    fi
}

# install_file SRC DEST MODE: atomic replace; skipped when the content and
# mode are already right (an upgrade rewrites only what changed).
install_file() {
    src=$1; dest=$2; mode=$3
    if [ -f "$dest" ] && cmp -s "$src" "$dest"; then
        if [ "$(stat -c %a "$dest")" != "${mode#0}" ]; then
            run chmod "$mode" "$dest"
        fi
        return 1
    fi
    if [ -e "$dest" ]; then
        info "updating $dest"
    else
        info "installing $dest"
    fi
    umask 077   # not readable by others before the chmod (the config)
    run cp "$src" "$dest.fimwatch-new"
    umask 022
    run chmod "$mode" "$dest.fimwatch-new"
    if [ "$(id -u)" = 0 ]; then
        run chown 0:0 "$dest.fimwatch-new"
    fi
    run mv -f "$dest.fimwatch-new" "$dest"
    return 0
}

# make_dir DIR MODE
make_dir() {
    if [ ! -d "$1" ]; then
        run mkdir -p "$1"
    fi
    if [ -d "$1" ] && [ "$(stat -c %a "$1")" != "${2#0}" ]; then
        run chmod "$2" "$1"
    elif [ "$DRY_RUN" = 1 ] && [ ! -d "$1" ]; then
        run chmod "$2" "$1"
    fi
    if [ "$(id -u)" = 0 ] && [ -d "$1" ] && [ "$(stat -c %u:%g "$1")" != 0:0 ]; then
        run chown 0:0 "$1"
    fi
}

# --- options ---------------------------------------------------------------------
parse_args() {
    while [ $# -gt 0 ]; do
        case $1 in
            --dry-run) DRY_RUN=1 ;;
            --no-start) NO_START=1 ;;
            --uninstall) ACTION=uninstall ;;
            --purge) ACTION=purge ;;
            --root)
                [ $# -ge 2 ] || usage_error "--root needs a directory"
                ROOT=$2; shift ;;
            --root=*) ROOT=${1#--root=} ;;
            -h|--help) usage; exit 0 ;;
            *) usage_error "unknown option: $1" ;;
        esac
        shift
    done
    if [ -n "$ROOT" ]; then
        case $ROOT in
            /*) ;;
            *) ROOT=$(pwd)/$ROOT ;;
        esac
        ROOT=${ROOT%/}
        [ "$ROOT" != "" ] || usage_error "--root / is the real system: leave --root out"
    fi
}

# --- preflight -------------------------------------------------------------------
check_root() {
    [ -n "$ROOT" ] && return 0
    [ "$(id -u)" = 0 ] || fatal "must run as root: sudo sh install.sh (or --root DIR to stage)"
}

check_os() {
    [ "$(uname -s)" = Linux ] || fatal "fimwatch needs Linux (inotify); this is $(uname -s)"
    [ -n "$ROOT" ] && return 0
    os="unknown OS"
    if [ -r /etc/os-release ]; then
        # shellcheck disable=SC1091  # /etc/os-release is not ours to check
        os=$(. /etc/os-release && printf '%s' "${PRETTY_NAME:-${ID:-unknown}}")
        # shellcheck disable=SC1091
        like=$(. /etc/os-release && printf '%s %s' "${ID:-}" "${ID_LIKE:-}")
        case " $like " in
            *" debian "*|*" ubuntu "*) ;;
            *) warn "$os is not Debian or Ubuntu: untested, carrying on" ;;
        esac
    fi
    [ -d /proc/sys/fs/inotify ] || fatal "this kernel has no inotify (/proc/sys/fs/inotify missing)"
    info "host: $os, kernel $(uname -r)"
}

check_init() {
    if [ -n "$ROOT" ]; then
        HAVE_SYSTEMD=0
    elif [ -d /run/systemd/system ] && have systemctl; then
        HAVE_SYSTEMD=1
    else
        HAVE_SYSTEMD=0
        warn "systemd is not running on this host (no /run/systemd/system): the files will be installed, but no service will be set up or started"
    fi
}

find_python() {
    if [ -n "${PYTHON:-}" ]; then
        cands=$PYTHON
    elif [ -n "$ROOT" ]; then
        cands="/usr/bin/python3 python3"
    else
        cands="/usr/bin/python3 python3"
    fi
    for c in $cands; do
        p=$(command -v "$c" 2>/dev/null) || continue
        if "$p" -c 'import sys; sys.exit(sys.version_info < (3, 9))' 2>/dev/null; then
            PY=$p
            info "python: $PY ($("$PY" -c 'import platform; print(platform.python_version())'))"
            return 0
        fi
        v=$("$p" -c 'import platform; print(platform.python_version())' 2>/dev/null) || v=unusable
        warn "$p is $v, fimwatch needs >= $MIN_PYTHON"
    done
    fatal "python3 >= $MIN_PYTHON is required: apt-get install python3 (or set PYTHON=/path/to/python3)"
}

# --- sources ---------------------------------------------------------------------
# From a checkout the files sit beside this script; piped into sh, $0 is "sh"
# and they are fetched from FIMWATCH_BASE_URL.
locate_sources() {
    STEP="locating the files to install"
    case $0 in
        */*) dir=${0%/*} ;;
        *) dir=. ;;
    esac
    if [ -f "$0" ] && [ -f "$dir/fimwatch.py" ] && [ -f "$dir/fimwatch.service" ]; then
        SRC=$(cd "$dir" && pwd)
        return 0
    fi
    [ -n "${FIMWATCH_BASE_URL:-}" ] || fatal "no fimwatch.py beside this script: run it from a checkout, or set FIMWATCH_BASE_URL to where install.sh, fimwatch.py and SHA256SUMS are published"
    fetch_sources "${FIMWATCH_BASE_URL%/}"
}

check_url() {
    case $1 in
        https://*) ;;
        http://127.*|http://localhost[:/]*|http://localhost|http://\[::1\]*) ;;
        http://*)
            [ "${FIMWATCH_INSECURE_HTTP:-}" = 1 ] || fatal "refusing plain http for $1 (use https, or FIMWATCH_INSECURE_HTTP=1)" ;;
        *) fatal "FIMWATCH_BASE_URL must be an https:// URL, got: $1" ;;
    esac
}

download() { # URL FILE
    case $1 in
        https://*) proto='=https' ;;
        *) proto='=http,https' ;;
    esac
    if have curl; then
        curl --proto "$proto" --tlsv1.2 --fail --silent --show-error --location \
            --retry 3 --connect-timeout 15 --max-time 300 -o "$2" "$1"
    elif have wget; then
        wget -q -T 60 -t 3 -O "$2" "$1"
    else
        fatal "need curl or wget to download $1"
    fi
}

fetch_sources() {
    base=$1
    check_url "$base"
    TMP=$(mktemp -d /tmp/fimwatch-install.XXXXXX)
    SRC=$TMP/src
    mkdir "$SRC"
    info "fetching from $base"
    download "$base/SHA256SUMS" "$SRC/SHA256SUMS" || fatal "cannot download $base/SHA256SUMS"
    names=$SOURCE_FILES
    if grep -q " \*\{0,1\}$INOTIFY_SIMPLE_WHEEL\$" "$SRC/SHA256SUMS"; then
        names="$names $INOTIFY_SIMPLE_WHEEL"
    fi
    for f in $names; do
        download "$base/$f" "$SRC/$f" || fatal "cannot download $base/$f"
        want=$(awk -v f="$f" '$2 == f || $2 == "*" f { print $1; exit }' "$SRC/SHA256SUMS")
        [ -n "$want" ] || fatal "$f is not listed in $base/SHA256SUMS"
        got=$(sha256_of "$SRC/$f")
        [ "$got" = "$want" ] || fatal "checksum mismatch for $f: expected $want, got $got"
    done
    info "downloaded $(echo "$names" | wc -w) files, all match SHA256SUMS"
}

# --- inotify_simple: pinned, hash-checked, private ------------------------------
# Never touches the system's site-packages (PEP 668): the wheel is a zip with
# one pure-Python module, extracted into $LIBDIR, which fimwatch puts first on
# sys.path.
get_wheel() {
    STEP="getting $INOTIFY_SIMPLE_WHEEL"
    if [ -f "$SRC/$INOTIFY_SIMPLE_WHEEL" ]; then
        WHEEL=$SRC/$INOTIFY_SIMPLE_WHEEL
    else
        [ -n "$TMP" ] || TMP=$(mktemp -d /tmp/fimwatch-install.XXXXXX)
        if ! "$PY" -m pip --version >/dev/null 2>&1; then
            [ -z "$ROOT" ] || fatal "$PY has no pip to fetch $INOTIFY_SIMPLE_WHEEL: put the wheel beside install.sh"
            have apt-get || fatal "$PY has no pip: install pip for it, or put $INOTIFY_SIMPLE_WHEEL beside install.sh"
            info "installing python3-pip (used only to download $INOTIFY_SIMPLE_WHEEL)"
            [ "$DRY_RUN" = 1 ] && { run apt-get install -y --no-install-recommends python3-pip; return 0; }
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3-pip </dev/null >&2 \
                || { DEBIAN_FRONTEND=noninteractive apt-get update -q </dev/null >&2 \
                     && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3-pip </dev/null >&2; } \
                || fatal "apt-get install python3-pip failed"
            PIP_BROUGHT=1
        fi
        printf 'inotify_simple==%s --hash=sha256:%s\n' "$INOTIFY_SIMPLE_VERSION" "$INOTIFY_SIMPLE_SHA256" >"$TMP/requirements.txt"
        info "downloading inotify_simple $INOTIFY_SIMPLE_VERSION with pip (--require-hashes)"
        "$PY" -m pip download --quiet --disable-pip-version-check --no-deps \
            --only-binary=:all: --require-hashes -r "$TMP/requirements.txt" -d "$TMP/wheel" >&2 \
            || fatal "pip could not download inotify_simple==$INOTIFY_SIMPLE_VERSION"
        WHEEL=$TMP/wheel/$INOTIFY_SIMPLE_WHEEL
    fi
    got=$(sha256_of "$WHEEL")
    [ "$got" = "$INOTIFY_SIMPLE_SHA256" ] || fatal "$INOTIFY_SIMPLE_WHEEL: sha256 $got is not the pinned $INOTIFY_SIMPLE_SHA256"
}

# --- the program, library and units: staged, compared, then installed --------------
# The installed copy runs with the interpreter checked above, not whatever
# "python3" a service's PATH finds.
with_shebang() { # SRC OUT
    { printf '#!%s\n' "$PY"; sed '1{/^#!/d;}' "$1"; } >"$2"
}

write_launcher() { # OUT
    cat >"$1" <<EOT
#!$PY
# fimwatch launcher, written by install.sh: the program is
# $LIBDIR/fimwatch.py, byte-compiled at install time.
import sys
sys.path.insert(0, "$LIBDIR")
import fimwatch  # noqa: E402
sys.exit(fimwatch.main())
EOT
}

# Byte-compile the installed module (the daemon's sandbox cannot write a
# __pycache__ itself, and PYTHONDONTWRITEBYTECODE may be set).
compile_module() {
    case " $CHANGED_PATHS " in
        *" $LIBDIR/fimwatch.py "*) ;;
        *) for pyc in "$ROOT$LIBDIR"/__pycache__/fimwatch.*.pyc; do
               [ -f "$pyc" ] && return 0     # unchanged module, compiled before
           done ;;
    esac
    STEP="byte-compiling $LIBDIR/fimwatch.py"
    run "$PY" -m py_compile "$ROOT$LIBDIR/fimwatch.py" \
        || warn "could not byte-compile $LIBDIR/fimwatch.py: fimwatch still runs, compiling it at each start"
    # fimwatch watches its own library: the new byte-code is taken into the
    # baseline with the rest (accept_own_files)
    CHANGED_PATHS="$CHANGED_PATHS $LIBDIR/__pycache__"
}

# Everything but the config and the sysctl drop-in is rendered into $STAGE
# first, so an upgrade knows before touching anything whether it changes.
prepare() {
    [ -n "$TMP" ] || TMP=$(mktemp -d /tmp/fimwatch-install.XXXXXX)
    STAGE=$TMP/stage
    rm -rf "$STAGE"; mkdir -p "$STAGE"
    get_wheel
    STEP="unpacking $INOTIFY_SIMPLE_WHEEL"
    if [ -n "${WHEEL:-}" ]; then
        "$PY" -m zipfile -e "$WHEEL" "$TMP/unzip" || fatal "cannot unpack $WHEEL"
        [ -f "$TMP/unzip/inotify_simple.py" ] || fatal "$INOTIFY_SIMPLE_WHEEL has no inotify_simple.py"
        cp "$TMP/unzip/inotify_simple.py" "$STAGE/inotify_simple.py"
        for lic in "$TMP"/unzip/inotify_simple-*.dist-info/LICENSE*; do
            [ -f "$lic" ] && cp "$lic" "$STAGE/inotify_simple.LICENSE"
        done
    fi
    # The program lives in $LIBDIR as a module, byte-compiled at install;
    # $BIN is a launcher. CPython never caches the compiled form of the script
    # it runs: compiling fimwatch.py at every start costs ~0.1 s and ~8 MB of
    # peak memory for the life of the daemon.
    cp "$SRC/fimwatch.py" "$STAGE/fimwatch.py"
    write_launcher "$STAGE/fimwatch"
    with_shebang "$SRC/fimwatch-sendmail-relay" "$STAGE/sendmail-relay"
    for u in $UNITS; do
        cp "$SRC/$u" "$STAGE/$u"
    done
}

# Lines of "STAGED DEST MODE" for every staged file.
staged_files() {
    echo "$STAGE/fimwatch $BIN 0755"
    echo "$STAGE/fimwatch.py $LIBDIR/fimwatch.py 0644"
    echo "$STAGE/sendmail-relay $RELAY 0755"
    [ -f "$STAGE/inotify_simple.py" ] && echo "$STAGE/inotify_simple.py $LIBDIR/inotify_simple.py 0644"
    [ -f "$STAGE/inotify_simple.LICENSE" ] && echo "$STAGE/inotify_simple.LICENSE $LIBDIR/inotify_simple.LICENSE 0644"
    for u in $UNITS; do
        echo "$STAGE/$u $UNITDIR/$u 0644"
    done
}

pending_changes() {
    if fanotify_wanted; then
        cmp -s "$SRC/$FANOTIFY_SRC" "$ROOT$FANOTIFY_DROPIN" || return 0
    elif [ -e "$ROOT$FANOTIFY_DROPIN" ]; then
        return 0
    fi
    # A new example beside an edited config counts as a change too.
    if [ -f "$ROOT$CONF" ] && ! cmp -s "$SRC/fimwatch.conf.example" "$ROOT$CONF" \
        && ! cmp -s "$SRC/fimwatch.conf.example" "$ROOT$CONF.new"; then
        return 0
    fi
    staged_files | {
        while read -r src dest mode; do
            cmp -s "$src" "$ROOT$dest" || exit 0
        done
        exit 1
    }
}

# An upgrade stops the daemon first: it would otherwise page about the
# installer's own files. It takes them into its baseline before it starts again
# (accept_own_files), and a clean stop/start leaves no unreported gap.
stop_for_upgrade() {
    [ -z "$ROOT" ] && [ "$HAVE_SYSTEMD" = 1 ] && [ "$NO_START" = 0 ] || return 0
    systemctl is-active --quiet "$SERVICE" 2>/dev/null || return 0
    pending_changes || return 0
    STEP="stopping $SERVICE for the upgrade"
    info "stopping $SERVICE to upgrade it"
    # The daemon reads this mark at its stop: an upgrade is a `notice`, any
    # other clean stop a `warning` (someone stopped the monitor). A custom
    # [fimwatch] state_dir does not get the mark: that stop is a warning.
    run touch "$STATEDIR/upgrading"
    run systemctl stop "$SERVICE"
    STOPPED_FOR_UPGRADE=1
}

install_staged() {
    STEP="installing the program, library and units"
    make_dir "$ROOT/usr/local/sbin" 0755
    make_dir "$ROOT$LIBDIR" 0755
    make_dir "$ROOT$UNITDIR" 0755
    list=$(staged_files)
    # A here-document, not a pipe: the loop must set variables in this shell.
    while read -r src dest mode; do
        if install_file "$src" "$ROOT$dest" "$mode"; then
            CHANGED_PATHS="$CHANGED_PATHS $dest"
            case $dest in *.service|*.socket) UNITS_CHANGED=1 ;; esac
        fi
    done <<EOT
$list
EOT
    [ "$PIP_BROUGHT" = 0 ] || run touch "$ROOT$PIP_MARK"
}

install_config() {
    STEP="installing the config"
    make_dir "$ROOT$CONFDIR" 0700
    if [ ! -f "$ROOT$CONF" ]; then
        install_file "$SRC/fimwatch.conf.example" "$ROOT$CONF" 0600 || true
        FIRST_CONFIG=1
    else
        FIRST_CONFIG=0
        if cmp -s "$SRC/fimwatch.conf.example" "$ROOT$CONF"; then
            CONF_NOTE="unchanged example"
        else
            CONF_NOTE="yours, kept; the new example is $CONF.new"
            if install_file "$SRC/fimwatch.conf.example" "$ROOT$CONF.new" 0600; then
                CHANGED_PATHS="$CHANGED_PATHS $CONF.new"
                info "kept your $CONF; the new example is $CONF.new (diff -u $CONF $CONF.new)"
            fi
        fi
        # The daemon refuses a config others may write (like sshd's StrictModes).
        perms=$(stat -c %a "$ROOT$CONF")
        case $perms in
            *[2367]?|*[2367]) warn "$CONF was writable by group/others ($perms): removing those bits"
                run chmod go-w "$ROOT$CONF" ;;
        esac
        if [ "$(id -u)" = 0 ] && [ "$(stat -c %u "$ROOT$CONF")" != 0 ]; then
            warn "$CONF was not owned by root: chown root"
            run chown 0 "$ROOT$CONF"
        fi
    fi
    make_dir "$ROOT$STATEDIR" 0700
    make_dir "$ROOT$LOGDIR" 0750
}

# --- the fanotify drop-in ------------------------------------------------------------
# Wanted unless the config says [watch] backend = inotify (auto and fanotify
# use it). No config yet: the example goes in, and it says auto. A config the
# program cannot read: leave the drop-in as it is (the install stops at
# check_config anyway). Decided once per run.
fanotify_wanted() {
    if [ -z "$FANOTIFY" ]; then
        if [ -z "$CONFIG_JSON" ] && [ -f "$ROOT$CONF" ]; then
            ask_program 2>/dev/null || true
        fi
        if [ -n "$CONFIG_JSON" ]; then
            backend=$(from_program backend) || fatal "cannot read what fimwatch check-config --json said"
            if [ "$backend" = inotify ]; then FANOTIFY=0; else FANOTIFY=1; fi
        elif [ ! -f "$ROOT$CONF" ] || [ -f "$ROOT$FANOTIFY_DROPIN" ]; then
            FANOTIFY=1
        else
            FANOTIFY=0
        fi
    fi
    [ "$FANOTIFY" = 1 ]
}

install_fanotify_dropin() {
    STEP="installing the fanotify drop-in"
    if fanotify_wanted; then
        if [ ! -d "$ROOT$DROPIN_DIR" ]; then
            CHANGED_PATHS="$CHANGED_PATHS $DROPIN_DIR"
        fi
        make_dir "$ROOT$DROPIN_DIR" 0755
        if install_file "$SRC/$FANOTIFY_SRC" "$ROOT$FANOTIFY_DROPIN" 0644; then
            CHANGED_PATHS="$CHANGED_PATHS $FANOTIFY_DROPIN"
            UNITS_CHANGED=1
        fi
        FANOTIFY_NOTE="fanotify: events name the process (CAP_SYS_ADMIN: $FANOTIFY_DROPIN)"
    else
        if [ -e "$ROOT$FANOTIFY_DROPIN" ]; then
            info "[watch] backend = inotify: removing $ROOT$FANOTIFY_DROPIN (the unit's tighter sandbox)"
            run rm -f "$ROOT$FANOTIFY_DROPIN"
            CHANGED_PATHS="$CHANGED_PATHS $FANOTIFY_DROPIN"
            UNITS_CHANGED=1
        fi
        FANOTIFY_NOTE="inotify ([watch] backend = inotify: no $FANOTIFY_DROPIN, no CAP_SYS_ADMIN)"
    fi
}

# --- asking the program ---------------------------------------------------------------
# The config is the program's to read: `fimwatch check-config --json` gives the
# watched paths, excludes and state_dir as the daemon will see them, and the
# watch estimate with the limits to set. The staged copy answers: it is the
# version being installed, it needs no inotify_simple, and it is there in
# --dry-run and --root too. With --root it looks the paths up in the staged
# tree and walks that. On a bad config it prints the error and nothing else.
ask_program() {
    [ -n "$TMP" ] || TMP=$(mktemp -d /tmp/fimwatch-install.XXXXXX)
    CONFIG_JSON=
    set -- "$PY" "$STAGE/fimwatch.py" --config "$ROOT$CONF" check-config --json
    [ -z "$ROOT" ] || set -- "$@" --root "$ROOT"
    if ! "$@" >"$TMP/check-config.json" 2>"$TMP/check-config.err"; then
        cat "$TMP/check-config.err" >&2
        return 1
    fi
    CONFIG_JSON=$TMP/check-config.json
}

# from_program QUERY [PATH...]: reads the answer with python (the shell has no
# JSON parser; python3 is needed anyway):
#   limits       "NEEDED WATCHES INSTANCES CUR_WATCHES CUR_INSTANCES STATE_DIR":
#                watches needed, the limits recommended, the kernel's now
#   under-roots  those PATHs that are a watched path or under one
from_program() {
    "$PY" - "$CONFIG_JSON" "$@" <<'EOT'
import json
import sys

with open(sys.argv[1]) as f:
    c = json.load(f)
query, args = sys.argv[2], sys.argv[3:]
if query == "limits":
    if "\n" in c["state_dir"]:
        sys.exit("state_dir has a line break: %r" % c["state_dir"])
    print(int(c["watches_needed"]), int(c["recommended_max_user_watches"]),
          int(c["recommended_max_user_instances"]), int(c["max_user_watches"] or 0),
          int(c["max_user_instances"] or 0), c["state_dir"])
elif query == "backend":
    print(c.get("backend", "auto"))
elif query == "under-roots":
    roots = [r[k] for r in c["roots"] for k in ("configured", "watched")] + c["scan_only"] \
        + c.get("also_watched", [])
    for p in args:
        if any(p == r or p.startswith(r + "/") for r in roots):
            print(p)
else:
    sys.exit("from_program: unknown query %r" % query)
EOT
}

# --- inotify limits ----------------------------------------------------------------
read_sysctl() { # NAME (fs.inotify.max_user_watches)
    f=/proc/sys/$(echo "$1" | tr . /)
    if [ -r "$f" ]; then cat "$f"; else echo 0; fi
}

setup_sysctl() {
    STEP="sizing the inotify limits"
    if [ ! -f "$ROOT$CONF" ]; then
        [ "$DRY_RUN" = 1 ] || warn "no $CONF: inotify limits left as they are"
        return 0
    fi
    if ! ask_program; then
        # A real install stops here (it would at check_config anyway); a dry
        # run or a staged tree only cannot size the limits.
        [ "$DRY_RUN" = 1 ] || [ -n "$ROOT" ] \
            || fatal "$CONF is not valid: fix it, then run the installer again (fimwatch check-config)"
        warn "$CONF is not valid: inotify limits left as they are (fimwatch check-config)"
        return 0
    fi
    answer=$(from_program limits) || fatal "cannot read what fimwatch check-config --json said"
    read -r WATCH_DIRS want want_inst cur cur_inst STATE_DIR <<EOT
$answer
EOT
    if [ -n "$ROOT" ]; then cur=0; cur_inst=0; fi
    # An earlier drop-in of ours may hold a higher value: never lower it.
    old=$(sed -n 's/^fs\.inotify\.max_user_watches *= *//p' "$ROOT$SYSCTL_FILE" 2>/dev/null | head -n 1)
    [ -n "$old" ] && [ "$old" -gt "$want" ] && want=$old
    if [ -n "$ROOT" ]; then
        info "watched paths under $ROOT need about $WATCH_DIRS watches; watches wanted: $want"
    else
        info "watched paths need about $WATCH_DIRS watches; watches wanted: $want, kernel limit now: $cur"
    fi
    [ -n "$TMP" ] || TMP=$(mktemp -d /tmp/fimwatch-install.XXXXXX)
    {
        echo "# Written by the fimwatch installer: inotify limits for the paths in"
        echo "# $CONF, as fimwatch check-config --json recommends"
        echo "# (one watch per directory, + 50%, + spare). Re-run the installer after"
        echo "# adding paths; it never lowers a limit."
        if [ "$want" -gt "$cur" ]; then
            echo "fs.inotify.max_user_watches = $want"
        else
            echo "# fs.inotify.max_user_watches: the kernel's $cur is already >= $want"
        fi
        if [ "$cur_inst" -lt "$want_inst" ]; then
            echo "fs.inotify.max_user_instances = $want_inst"
        else
            echo "# fs.inotify.max_user_instances: the kernel's $cur_inst is already >= $want_inst"
        fi
    } >"$TMP/sysctl.conf"
    make_dir "$ROOT/etc/sysctl.d" 0755
    if install_file "$TMP/sysctl.conf" "$ROOT$SYSCTL_FILE" 0644; then
        CHANGED_PATHS="$CHANGED_PATHS $SYSCTL_FILE"
    fi
    WATCH_LIMIT=$cur
    [ -n "$ROOT" ] && { WATCH_LIMIT=$want; return 0; }
    [ "$want" -gt "$cur" ] || [ "$cur_inst" -lt "$want_inst" ] || return 0
    apply_sysctl fs.inotify.max_user_watches "$want" "$cur"
    apply_sysctl fs.inotify.max_user_instances "$want_inst" "$cur_inst"
    WATCH_LIMIT=$(read_sysctl fs.inotify.max_user_watches)
}

apply_sysctl() { # NAME WANT CURRENT
    [ "$2" -gt "$3" ] || return 0
    f=/proc/sys/$(echo "$1" | tr . /)
    if [ "$DRY_RUN" = 1 ]; then
        run sysctl -w "$1=$2"
    elif { have sysctl && sysctl -q -w "$1=$2" >/dev/null 2>&1; } \
        || { [ -w "$f" ] && echo "$2" 2>/dev/null >"$f"; }; then
        info "raised $1 from $3 to $2"
    else
        warn "cannot raise $1 to $2 (/proc/sys is read-only here, e.g. a container): the host must raise it; staying at $3"
    fi
}

# --- baseline, service ---------------------------------------------------------------
check_config() {
    STEP="checking the config"
    [ "$DRY_RUN" = 1 ] && { run "$BIN" check-config; return 0; }
    if ! out=$("$BIN" check-config 2>&1 >/dev/null); then
        printf '%s\n' "$out" >&2
        fatal "$CONF is not valid: fix it, then run the installer again (fimwatch check-config)"
    fi
}

build_baseline() {
    STEP="building the baseline"
    if [ -n "$(ls -A "$STATE_DIR" 2>/dev/null)" ]; then
        return 0   # an upgrade: the daemon compares against the existing baseline
    fi
    info "building the baseline of every watched file (first install; this reads them all)"
    [ "$DRY_RUN" = 1 ] && { run "$BIN" scan --no-alert; return 0; }
    start=$(date +%s)
    [ -n "$TMP" ] || TMP=$(mktemp -d /tmp/fimwatch-install.XXXXXX)
    umask 077
    if [ -t 2 ]; then
        set +e; "$BIN" scan --no-alert >/dev/null; rc=$?; set -e
    else
        set +e; "$BIN" scan --no-alert >/dev/null 2>"$TMP/scan.err"; rc=$?; set -e
    fi
    umask 022
    case $rc in
        0|1) info "baseline built in $(( $(date +%s) - start ))s" ;;
        *) [ -f "$TMP/scan.err" ] && cat "$TMP/scan.err" >&2
           fatal "fimwatch scan --no-alert failed (exit $rc)" ;;
    esac
}

enable_service() {
    STEP="enabling the service"
    if [ "$UNITS_CHANGED" = 1 ] || [ "$DRY_RUN" = 1 ]; then
        run systemctl daemon-reload
    fi
    # Before the baseline is built, so the enable symlinks are in it.
    if ! systemctl is-enabled --quiet "$SERVICE" 2>/dev/null \
        || ! systemctl is-enabled --quiet "$SOCKET" 2>/dev/null; then
        run systemctl enable --quiet "$SOCKET" "$SERVICE"
    fi
}

# Files this run changed inside the watched paths go into the baseline, so
# the restarted daemon does not report the installer's own work.
accept_own_files() {
    [ -n "$CHANGED_PATHS" ] || return 0
    [ -f "$STATE_DIR/baseline.db" ] || return 0
    [ -n "$CONFIG_JSON" ] || return 0     # a dry run with a bad config: warned above
    STEP="taking the upgraded files into the baseline"
    # shellcheck disable=SC2086  # our own paths: no blanks, no wildcards
    own=$(from_program under-roots $CHANGED_PATHS) \
        || fatal "cannot read what fimwatch check-config --json said"
    set --
    while read -r p; do
        if [ -n "$p" ]; then set -- "$@" "$p"; fi
    done <<EOT
$own
EOT
    [ $# -gt 0 ] || return 0
    if [ "$DRY_RUN" = 1 ]; then
        run "$BIN" accept "$@"
    elif ! "$BIN" accept "$@" >/dev/null; then
        warn "fimwatch accept $* failed: the daemon will report these files as changed"
    fi
}

start_service() {
    if [ "$NO_START" = 1 ]; then
        info "--no-start: enabled, not started (systemctl start $SERVICE)"
        return 0
    fi
    STEP="starting the service"
    run systemctl start "$SOCKET"
    if [ "$STOPPED_FOR_UPGRADE" = 0 ] && systemctl is-active --quiet "$SERVICE"; then
        info "$SERVICE is running and nothing changed"
        return 0
    fi
    run systemctl reset-failed "$SERVICE" 2>/dev/null || true
    info "starting $SERVICE"
    run systemctl start "$SERVICE" || service_failed
}

service_failed() {
    systemctl status --no-pager --lines=20 "$SERVICE" >&2 || true
    fatal "$SERVICE did not start: see journalctl -u $SERVICE"
}

# --- uninstall ------------------------------------------------------------------------
uninstall() {
    STEP="removing fimwatch"
    if [ -z "$ROOT" ] && [ -d /run/systemd/system ] && have systemctl; then
        for u in "$SERVICE" "$SOCKET"; do
            if systemctl cat "$u" >/dev/null 2>&1; then
                run systemctl disable --now --quiet "$u" || warn "could not stop $u"
            fi
        done
        # what ran under the units: the relay and failure-alert instances,
        # the slices systemd made for them, and failed states it would list
        run systemctl stop 'fimwatch-sendmail@*.service' 'fimwatch-failure@*.service' \
            'system-fimwatch\x2dsendmail.slice' 'system-fimwatch\x2dfailure.slice' \
            2>/dev/null || true
        run systemctl reset-failed "$SERVICE" 2>/dev/null || true
        run systemctl reset-failed 'fimwatch-*' 2>/dev/null || true
    fi
    if [ -z "$ROOT" ] && [ -e "$PIP_MARK" ] && have apt-mark; then
        if run apt-mark auto python3-pip >/dev/null; then
            info "python3-pip (installed for fimwatch) is marked automatically installed again: apt autoremove removes it"
        else
            warn "could not mark python3-pip automatically installed (apt-mark auto python3-pip)"
        fi
    fi
    for f in $UNITS; do
        [ -e "$ROOT$UNITDIR/$f" ] && run rm -f "$ROOT$UNITDIR/$f"
    done
    [ -e "$ROOT$FANOTIFY_DROPIN" ] && run rm -f "$ROOT$FANOTIFY_DROPIN"
    # Only if empty: a `systemctl edit` override of the admin's stays.
    if [ -d "$ROOT$DROPIN_DIR" ]; then
        run rmdir "$ROOT$DROPIN_DIR" 2>/dev/null || true
    fi
    [ -e "$ROOT$BIN" ] && run rm -f "$ROOT$BIN"
    [ -e "$ROOT$LIBDIR" ] && run rm -rf "$ROOT$LIBDIR"
    [ -e "$ROOT$SYSCTL_FILE" ] && run rm -f "$ROOT$SYSCTL_FILE"
    if [ -z "$ROOT" ] && [ -d /run/systemd/system ] && have systemctl; then
        run systemctl daemon-reload
    fi
    if [ "$ACTION" = purge ]; then
        for d in "$CONFDIR" "$STATEDIR" "$LOGDIR"; do
            [ -e "$ROOT$d" ] && run rm -rf "$ROOT$d"
        done
        info "purged: program, units, library, sysctl drop-in, config, state and logs removed"
    else
        info "removed the service (and its fanotify drop-in), $BIN, $LIBDIR and $SYSCTL_FILE"
        info "kept $CONFDIR, $STATEDIR and $LOGDIR (--purge removes them)"
    fi
    info "inotify limits raised earlier stay until reboot"
}

# --- summary -------------------------------------------------------------------------
summary() {
    [ "$DRY_RUN" = 1 ] && { info "dry run: nothing was changed"; return 0; }
    echo >&2
    printf '%sfimwatch is installed%s%s\n' "$C_BOLD" "${ROOT:+ under $ROOT}" "$C_OFF" >&2
    echo "  program    $BIN (python: $PY)" >&2
    echo "  library    $LIBDIR (inotify_simple $INOTIFY_SIMPLE_VERSION, sha256 checked)" >&2
    if [ "${FIRST_CONFIG:-1}" = 1 ]; then
        echo "  config     $CONF (new: edit [watch] paths to taste)" >&2
    else
        echo "  config     $CONF ($CONF_NOTE)" >&2
    fi
    echo "  state      $STATE_DIR   events log: $LOGDIR/events.jsonl" >&2
    [ -z "$FANOTIFY_NOTE" ] || echo "  backend    $FANOTIFY_NOTE" >&2
    echo "  watches    about ${WATCH_DIRS:-?} needed (one per watched directory), kernel limit ${WATCH_LIMIT:-?} ($SYSCTL_FILE)" >&2
    if [ -n "$ROOT" ]; then
        echo "  units      $UNITDIR/ (staged; nothing was started)" >&2
        return 0
    fi
    if [ "$HAVE_SYSTEMD" = 1 ]; then
        if [ "$NO_START" = 1 ]; then
            echo "  service    $SERVICE enabled, not started: systemctl start $SERVICE" >&2
        else
            echo "  service    $SERVICE $(systemctl is-active "$SERVICE" 2>/dev/null || true), enabled at boot" >&2
        fi
        echo >&2
        echo "Alerts appear in:  journalctl -t fimwatch   (syslog, facility authpriv)" >&2
        echo "                   $LOGDIR/events.jsonl, and mail/webhooks as set in $CONF" >&2
    else
        echo >&2
        echo "${C_YEL}No service was installed: this host does not run systemd.${C_OFF}" >&2
        echo "Run fimwatch in the foreground (or under your own supervisor):" >&2
        echo "    $BIN run" >&2
        echo "Alerts go to syslog (tag fimwatch) and $LOGDIR/events.jsonl." >&2
    fi
    echo "Check it:          fimwatch status;  fimwatch test-alert" >&2
    echo "Change paths:      edit $CONF, then: fimwatch check-config && systemctl reload $SERVICE" >&2
    if [ -n "$TMP" ] && [ "${SRC#"$TMP"}" != "$SRC" ]; then
        how="curl -fsSL ${FIMWATCH_BASE_URL%/}/install.sh | sudo sh -s -- --uninstall"
    else
        how="sudo sh $SRC/install.sh --uninstall"
    fi
    echo "Uninstall:         $how" >&2
    echo "                   (--purge instead also removes config, state and logs)" >&2
}

# --- main ----------------------------------------------------------------------------
main() {
    umask 022
    setup_colours
    parse_args "$@"
    trap on_exit EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    STEP="preflight checks"
    check_root
    if [ "$ACTION" != install ]; then
        uninstall
        return 0
    fi
    check_os
    check_init
    find_python
    locate_sources
    [ -f "$SRC/fimwatch.conf.example" ] || fatal "$SRC/fimwatch.conf.example is missing"
    prepare
    stop_for_upgrade
    install_staged
    compile_module
    install_config
    setup_sysctl
    install_fanotify_dropin
    if [ -z "$ROOT" ]; then
        check_config
        if [ "$HAVE_SYSTEMD" = 1 ]; then
            enable_service
        fi
        build_baseline
        accept_own_files
        if [ "$HAVE_SYSTEMD" = 1 ]; then
            start_service
        fi
    fi
    STEP="done"
    summary
}

main "$@"
