#!/bin/bash
# Downloads one of Debian's kernel packages and unpacks it into OUTDIR (nothing is installed on
# this host). usage: fetch-kernel.sh RELEASE PATTERN OUTDIR
#   RELEASE  a Debian release; one other than this host's is read into a private apt state
#            under OUTDIR, from the mirror this host's apt already uses.
#   PATTERN  a regular expression for the package name; the newest match is taken.
set -euo pipefail
RELEASE=$1 PATTERN=$2 OUT=$3
mkdir -p "$OUT"; OUT=$(readlink -f "$OUT")
APT=()
if [ "$RELEASE" != "$(. /etc/os-release; echo "$VERSION_CODENAME")" ]; then
  mirror=$({ cat /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list 2>/dev/null || true; } \
           | grep -oE '(URIs:|deb) +https?://[^ ]+/debian/?( |$)' | grep -v security | head -1 | awk '{print $2}')
  mirror=${mirror%/}
  state="$OUT/apt-$RELEASE"; mkdir -p "$state/lists/partial"
  echo "deb $mirror $RELEASE main" > "$state/sources.list"
  echo "deb ${mirror%/debian*}/debian-security $RELEASE-security main" >> "$state/sources.list"
  APT=(-o Dir::Etc::SourceList="$state/sources.list" -o Dir::Etc::SourceParts=/dev/null
       -o Dir::State::Lists="$state/lists" -o APT::Get::List-Cleanup=0)
  apt-get "${APT[@]}" update >/dev/null
fi
find_package() { apt-cache "${APT[@]}" search --names-only "$PATTERN" | awk '{print $1}' | sort -V | tail -1; }
package=$(find_package)
if [ -z "$package" ]; then apt-get "${APT[@]}" update >/dev/null; package=$(find_package); fi
[ -n "$package" ] || { echo "no package matches $PATTERN in $RELEASE" >&2; exit 1; }
(cd "$OUT" && rm -f "$package"_*.deb && apt-get "${APT[@]}" download "$package" >/dev/null 2>&1)
rm -rf "$OUT/unpacked"; dpkg -x "$OUT"/"$package"_*.deb "$OUT/unpacked"
rm -f "$OUT"/"$package"_*.deb
echo "$package" > "$OUT/unpacked/package"
