#!/bin/bash
# Builds the initramfs of a kernel-matrix guest: busybox, the enforcer binary and its libraries,
# iproute2 and bpftool, the modules the smoke test needs, and `init` with its policies.
# usage: build-initramfs.sh KERNEL_DIR OUT.cpio.gz ENFORCER_BINARY
set -euo pipefail
KDIR=$1 OUT=$2 ENFORCER=$(readlink -f "$3")
HERE=$(cd "$(dirname "$0")" && pwd)
KVER=$(ls "$KDIR/lib/modules" | head -1)
ROOT=$(mktemp -d)
trap 'rm -rf "$ROOT"' EXIT

mkdir -p "$ROOT"/{bin,sbin,usr/bin,usr/sbin,lib,lib64,proc,sys,dev,run,tmp,etc,var,mods,www}
ln -s ../run "$ROOT/var/run"
cp /bin/busybox "$ROOT/bin/busybox"
for applet in $(/bin/busybox --list); do
  [ -e "$ROOT/bin/$applet" ] || ln -s busybox "$ROOT/bin/$applet"
done
copy_binary() { # SOURCE DEST: the binary and the shared libraries it links
  rm -f "$ROOT/$2"; cp -L "$1" "$ROOT/$2"
  for lib in $(ldd "$1" | awk '/=>/ {print $3} /ld-linux/ {print $1}' | grep ^/); do
    mkdir -p "$ROOT$(dirname "$lib")"; cp -Ln "$lib" "$ROOT$lib" 2>/dev/null || true
  done
}
copy_binary "$ENFORCER" usr/bin/enforcer
copy_binary /usr/sbin/ip bin/ip
copy_binary /usr/sbin/tc bin/tc
copy_binary /usr/sbin/bpftool usr/sbin/bpftool
cp -L /lib64/ld-linux-x86-64.so.2 "$ROOT/lib64/"
# Debian builds these as modules (none depends on another); 6.12 compresses them.
for module in veth sch_ingress cls_bpf; do
  file=$(find "$KDIR/lib/modules/$KVER" -name "$module.ko*" | head -1)
  case "$file" in
    "") ;; # built in
    *.xz) xz -dc "$file" > "$ROOT/mods/$module.ko" ;;
    *.zst) zstd -qdc "$file" > "$ROOT/mods/$module.ko" ;;
    *) cp "$file" "$ROOT/mods/$module.ko" ;;
  esac
done
echo "<html>hello</html>" > "$ROOT/www/index.html"
cp "$HERE/init" "$ROOT/init"; chmod +x "$ROOT/init"
cp "$HERE/policy-80.toml" "$ROOT/etc/policy.toml"
cp "$HERE/policy-80.toml" "$HERE/policy-81.toml" "$ROOT/etc/"
(cd "$ROOT" && find . | /bin/busybox cpio -o -H newc 2>/dev/null | gzip -1) > "$OUT"
