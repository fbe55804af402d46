# shellcheck shell=bash
# Installing what the test suite needs on Debian 12, sourced by tools/test-all.sh.
#
# Design:
# - APT sources are read the way apt reads them: `sources.list` and `sources.list.d/*.list` in the
#   one-line format, `sources.list.d/*.sources` in deb822 (several stanzas, `Enabled: no`,
#   folded lines); files with any other name are ignored, as apt ignores them.
# - The Debian mirror is the entry that serves Debian's `bookworm` suite with `main`, judged by
#   the strongest evidence at hand: the release file apt fetched for it says `Origin: Debian`;
#   else its path ends in `/debian` and it is signed by Debian's keyring (or names none); else it
#   is signed by Debian's keyring. Entries of other repositories never qualify, wherever they
#   are listed.
# - qemu-system-x86 must come from the suite of the installed qemu-utils. When the exact version
#   is already available from a configured source, nothing is added. Otherwise, for a
#   bookworm-backports build of qemu-utils, a source for bookworm-backports on the Debian mirror
#   is written to one file of ours (`bookworm-backports.sources`, with a marker line) and only that
#   source is updated. Running again changes nothing; a file of ours with a wrong URI (as an
#   earlier version of this script could write) is rewritten.
# - Every installation is simulated first (`apt-get install -s`). When a dependency cannot be
#   installed the script names it, says why and what to run by hand, undoes a source file it
#   wrote in that run, and exits non-zero: apt is never left with a half-done change.
#
# For tests of this logic: STANDBY_APT_ETC (default /etc/apt) and STANDBY_APT_LISTS (default
# /var/lib/apt/lists) point it at a fixture tree; commands are looked up on PATH.

APT_ETC=${STANDBY_APT_ETC:-/etc/apt}
APT_LISTS=${STANDBY_APT_LISTS:-/var/lib/apt/lists}
BACKPORTS_FILE_NAME=bookworm-backports.sources
BACKPORTS_MARKER="# Added by Standby's tools/test-all.sh for qemu-system-x86 (the suite of the installed qemu-utils)."
DEBIAN_KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg

as_root() {
    if [ "$(id -u)" = 0 ]; then
        "$@"
    elif command -v sudo >/dev/null; then
        sudo "$@"
    else
        echo "need root (or sudo) to run: $*" >&2
        return 1
    fi
}

# Prints the error for a dependency that cannot be installed and exits non-zero.
#   fail_dep NAME WHY HOW
fail_dep() {
    {
        echo
        echo "error: cannot install $1: $2"
        echo "To install it by hand, run:"
        echo "    $3"
        echo "then run tools/test-all.sh again."
    } >&2
    exit 1
}

# The source files apt reads, in apt's order (sources.list first, then sources.list.d by name).
apt_source_files() {
    [ -f "$APT_ETC/sources.list" ] && echo "$APT_ETC/sources.list"
    local f base
    for f in "$APT_ETC"/sources.list.d/*; do
        [ -f "$f" ] || continue
        base=${f##*/}
        [[ "$base" =~ ^[A-Za-z0-9_.-]+\.(list|sources)$ ]] && echo "$f"
    done
    return 0
}

# One line per enabled binary ("deb") entry: URI|SUITE|COMPONENTS|SIGNED-BY|FILE
# (one line for each URI and suite of a deb822 stanza).
apt_entries() {
    local f
    while IFS= read -r f; do
        case "$f" in
        *.sources) awk -v file="$f" '
            function flush(   n, m, i, j, U, S) {
                if (types ~ /(^|[ \t])deb([ \t]|$)/ && tolower(enabled) != "no") {
                    n = split(uris, U, /[ \t]+/); m = split(suites, S, /[ \t]+/)
                    for (i = 1; i <= n; i++) for (j = 1; j <= m; j++)
                        if (U[i] != "" && S[j] != "") print U[i] "|" S[j] "|" comps "|" signed "|" file
                }
                types = uris = suites = comps = signed = last = ""; enabled = "yes"
            }
            function add(key, v) {
                if (key == "types") types = types " " v
                else if (key == "uris") uris = uris " " v
                else if (key == "suites") suites = suites " " v
                else if (key == "components") comps = comps " " v
                else if (key == "enabled") enabled = v
                else if (key == "signed-by") signed = signed " " v
            }
            BEGIN { enabled = "yes" }
            /^#/ { next }
            /^[ \t]*$/ { flush(); next }
            /^[ \t]/ { if (last != "") { v = $0; sub(/^[ \t]+/, "", v); add(last, v) } next }
            {
                i = index($0, ":"); if (i == 0) { last = ""; next }
                key = tolower(substr($0, 1, i - 1)); v = substr($0, i + 1)
                sub(/^[ \t]+/, "", v); sub(/[ \t]+$/, "", v)
                last = key; add(key, v)
            }
            END { flush() }' "$f" ;;
        *) awk -v file="$f" '
            {
                sub(/#.*/, "")
                if ($1 != "deb") next
                i = 2; signed = ""
                if ($2 ~ /^\[/) {
                    while (i <= NF) {
                        if ($i ~ /signed-by=/) { s = $i; sub(/.*signed-by=/, "", s); sub(/\]$/, "", s); signed = s }
                        if ($i ~ /\]$/) { i++; break }
                        i++
                    }
                }
                if (i + 1 > NF) next
                uri = $i; suite = $(i + 1); comps = ""
                for (j = i + 2; j <= NF; j++) comps = comps " " $j
                print uri "|" suite "|" comps "|" signed "|" file
            }' "$f" ;;
        esac
    done < <(apt_source_files)
}

# The file apt keeps a suite's release file in, as apt names it (URI without scheme, / → _).
apt_release_file() {
    local uri=${1%/} suite=$2 base f
    uri=${uri#*://}
    uri=${uri#*@}
    uri=${uri//_/%5f}
    base="$APT_LISTS/${uri//\//_}_dists_${suite//\//_}"
    for f in "${base}_InRelease" "${base}_Release"; do
        [ -f "$f" ] && { echo "$f"; return 0; }
    done
    return 1
}

# How sure we are that URI serves Debian's archive for SUITE: 3 (apt's release file says so),
# 2 (a /debian path, Debian's keyring or none), 1 (Debian's keyring), 0 (no evidence), -1 (apt's
# release file names another origin).
debian_score() {
    local uri=$1 suite=$2 signed=$3 rel
    if rel=$(apt_release_file "$uri" "$suite"); then
        if grep -q '^Origin: Debian$' "$rel"; then echo 3; else echo -1; fi
        return 0
    fi
    local keyring_ok=0
    if [ -z "${signed// /}" ] || [[ "$signed" == *debian-archive-keyring* ]]; then keyring_ok=1; fi
    if [[ "${uri%/}" =~ ://[^/]+(/.*)?/debian$ ]] && [ $keyring_ok = 1 ]; then
        echo 2
    elif [[ "$signed" == *debian-archive-keyring* ]]; then
        echo 1
    else
        echo 0
    fi
}

# Prints the URI of the Debian mirror that serves SUITE (default bookworm) with `main`; fails
# (printing nothing) when no entry qualifies.
debian_mirror() {
    local want=${1:-bookworm} best="" best_score=0 uri suite comps signed file s
    while IFS='|' read -r uri suite comps signed file; do
        [ "$suite" = "$want" ] || continue
        [[ " $comps " == *" main "* ]] || continue
        s=$(debian_score "$uri" "$suite" "$signed")
        if [ "$s" -gt "$best_score" ]; then
            best=$uri
            best_score=$s
        fi
    done < <(apt_entries)
    [ -n "$best" ] || return 1
    echo "${best%/}"
}

# Whether bookworm-backports is configured on the Debian mirror MIRROR: prints "configured",
# "ours-wrong" (our file lists another URI: to be rewritten) or "absent".
backports_status() {
    local mirror=${1%/} uri suite comps signed file found=absent
    while IFS='|' read -r uri suite comps signed file; do
        [ "$suite" = bookworm-backports ] || continue
        [[ " $comps " == *" main "* ]] || continue
        if [ "${uri%/}" = "$mirror" ] || [ "$(debian_score "$uri" "$suite" "$signed")" = 3 ]; then
            echo configured
            return 0
        fi
        if is_our_backports_file "$file"; then found=ours-wrong; fi
    done < <(apt_entries)
    echo "$found"
}

# Whether FILE is a backports source this script wrote (now or in an earlier version, which
# wrote exactly five fields and no marker).
is_our_backports_file() {
    local f=$1
    [ "${f##*/}" = "$BACKPORTS_FILE_NAME" ] || return 1
    grep -qxF "$BACKPORTS_MARKER" "$f" && return 0
    [ "$(grep -cv '^[[:space:]]*$' "$f")" = 5 ] &&
        grep -qx 'Types: deb' "$f" && grep -qx 'Suites: bookworm-backports' "$f" &&
        grep -qx 'Components: main' "$f" && grep -q '^URIs: ' "$f" && grep -q '^Signed-By: ' "$f"
}

backports_source_text() {
    printf '%s\nTypes: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: %s\n' \
        "$BACKPORTS_MARKER" "$1" "$DEBIAN_KEYRING"
}

# Writes (or repairs) our backports source for MIRROR. Sets BACKPORTS_WRITTEN to the file's path
# and BACKPORTS_PREVIOUS to its former text ("" when it did not exist) so the change can be undone.
write_backports_source() {
    local mirror=$1 f="$APT_ETC/sources.list.d/$BACKPORTS_FILE_NAME"
    BACKPORTS_WRITTEN=""
    BACKPORTS_PREVIOUS=""
    if [ -e "$f" ]; then
        if ! is_our_backports_file "$f"; then
            echo "$f exists and was not written by this script; not touching it" >&2
            return 1
        fi
        [ "$(cat "$f")" = "$(backports_source_text "$mirror")" ] && return 0
        BACKPORTS_PREVIOUS=$(cat "$f")
        echo "== repairing $f (it listed $(awk '/^URIs:/{print $2}' "$f"), not the Debian mirror $mirror)"
    else
        echo "== adding bookworm-backports on the Debian mirror $mirror ($f)"
    fi
    backports_source_text "$mirror" | as_root tee "$f" >/dev/null
    BACKPORTS_WRITTEN=$f
}

# Undoes write_backports_source.
undo_backports_source() {
    [ -n "${BACKPORTS_WRITTEN:-}" ] || return 0
    if [ -n "$BACKPORTS_PREVIOUS" ]; then
        printf '%s\n' "$BACKPORTS_PREVIOUS" | as_root tee "$BACKPORTS_WRITTEN" >/dev/null
    else
        as_root rm -f "$BACKPORTS_WRITTEN"
    fi
    echo "== undid the change to $BACKPORTS_WRITTEN" >&2
    BACKPORTS_WRITTEN=""
}

# The suite (archive) that offers PACKAGE at exactly VERSION, from `apt-cache policy`; fails
# when no configured source has it.
suite_offering() {
    local pkg=$1 ver=$2 policy
    # Read whole before parsing: a reader that stops early (awk's exit, grep -q) kills the
    # writer with SIGPIPE, which `set -o pipefail` turns into a failure.
    policy=$(apt-cache policy "$pkg" 2>/dev/null) || true
    awk -v ver="$ver" '
        /^     [^ ]/ || /^ \*\*\* / { v = ($1 == "***") ? $2 : $1; inv = (v == ver); next }
        inv && $2 ~ /:\/\// { split($3, a, "/"); print a[1]; found = 1; exit }
        END { exit !found }' <<<"$policy"
}

# apt-get install, simulated first; on failure names the dependency (NAME), says why and what to
# run by hand. Extra arguments go to apt-get install as they are.
#   apt_install NAME ARGS...
apt_install() {
    local name=$1 out
    shift
    if ! out=$(apt-get install -s --no-install-recommends "$@" 2>&1); then
        undo_backports_source
        fail_dep "$name" "apt cannot resolve it: $(grep -E '^(E:|W:| )' <<<"$out" | head -8 | tr '\n' ' ')" \
            "apt-get install --no-install-recommends $*"
    fi
    echo "== installing $*"
    if ! as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"; then
        undo_backports_source
        fail_dep "$name" "apt-get install failed (its messages are above)" \
            "apt-get install --no-install-recommends $*"
    fi
}

# apt-get update; an unreachable repository (apt exits non-zero) is reported but does not stop
# the installation: the packages are then checked one by one.
apt_update() {
    if ! as_root apt-get update -qq; then
        echo "warning: apt-get update could not fetch every source (messages above); continuing with what it fetched" >&2
    fi
}

# The Debian packages in the list that are not installed.
missing_packages() {
    local p
    for p in "$@"; do
        [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null) == *"install ok installed"* ]] || echo "$p"
    done
}

install_apt_packages() {
    local missing p policy none=()
    mapfile -t missing < <(missing_packages "$@")
    [ ${#missing[@]} -gt 0 ] || return 0
    echo "== installing Debian packages: ${missing[*]}"
    apt_update
    for p in "${missing[@]}"; do
        # Captured first: `apt-cache | grep -q` fails under pipefail when grep stops reading.
        policy=$(apt-cache policy "$p" 2>/dev/null) || true
        [[ $policy =~ Candidate:\ [^\(] ]] || none+=("$p")
    done
    if [ ${#none[@]} -gt 0 ]; then
        fail_dep "${none[*]}" "no configured APT source offers it (is Debian's bookworm main listed in /etc/apt/sources.list or /etc/apt/sources.list.d/?)" \
            "apt-get update && apt-get install --no-install-recommends ${none[*]}"
    fi
    apt_install "${missing[*]}" "${missing[@]}"
}

# qemu-system-x86 for the boot test, from the same suite as the installed qemu-utils.
install_qemu_system() {
    command -v qemu-system-x86_64 >/dev/null && return 0
    local ver suite mirror status
    ver=$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)
    if [ -n "$ver" ] && suite=$(suite_offering qemu-system-x86 "$ver"); then
        # A configured source has the matching build: no suite to add.
        apt_install qemu-system-x86 -t "$suite" "qemu-system-x86=$ver"
        return 0
    fi
    if [[ "$ver" != *bpo12* ]]; then
        apt_install qemu-system-x86 qemu-system-x86
        return 0
    fi
    # qemu-utils is a bookworm-backports build: the emulator must be one too.
    if ! mirror=$(debian_mirror bookworm); then
        fail_dep "qemu-system-x86 $ver" \
            "qemu-utils $ver is a bookworm-backports build, and no APT source lists Debian's bookworm suite to take the mirror from" \
            "echo 'deb http://deb.debian.org/debian bookworm-backports main' > /etc/apt/sources.list.d/backports.list && apt-get update && apt-get install -t bookworm-backports qemu-system-x86=$ver"
    fi
    status=$(backports_status "$mirror")
    if [ "$status" != configured ]; then
        write_backports_source "$mirror" ||
            fail_dep "qemu-system-x86 $ver" "$APT_ETC/sources.list.d/$BACKPORTS_FILE_NAME is not ours to change" \
                "apt-get install -t bookworm-backports qemu-system-x86=$ver"
    fi
    echo "== updating the package lists of bookworm-backports"
    local list=${BACKPORTS_WRITTEN:-}
    if [ -n "$list" ]; then
        # Only the source we wrote: an unreachable third-party repository cannot fail this.
        if ! as_root apt-get update -qq -o "Dir::Etc::sourcelist=$list" -o Dir::Etc::sourceparts=- \
            -o APT::Get::List-Cleanup=0; then
            undo_backports_source
            fail_dep "qemu-system-x86 $ver" "apt-get update of bookworm-backports on $mirror failed (messages above)" \
                "apt-get update && apt-get install -t bookworm-backports qemu-system-x86=$ver"
        fi
    else
        apt_update
    fi
    if ! suite=$(suite_offering qemu-system-x86 "$ver"); then
        undo_backports_source
        fail_dep "qemu-system-x86 $ver" "bookworm-backports on $mirror does not offer version $ver (the installed qemu-utils)" \
            "apt-get install -t bookworm-backports qemu-system-x86 qemu-utils"
    fi
    apt_install "qemu-system-x86 $ver" -t "$suite" "qemu-system-x86=$ver"
}

install_cargo_tool() {
    local name=$1 check=$2 note=$3
    shift 3
    if ! eval "$check" >/dev/null 2>&1; then
        echo "== installing $name$note"
        cargo install "$@" --quiet || fail_dep "$name" "cargo install failed (messages above)" "cargo install $*"
    fi
}
