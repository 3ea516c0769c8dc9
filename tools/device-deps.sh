#!/usr/bin/env bash
# Run HERE, before a GPU-machine call. The GPU machine's image has no fmt, doctest, nlohmann_json, sentencepiece
# or pkg-config, and no package registry. This downloads those Debian packages, unpacks them into .carry/deps
# (git-ignored), and writes .carry/deps/env.sh, which tools/gpu-check.sh sources on the GPU machine.
# Name ".carry" in the device call's carry list. Idempotent: does nothing when .carry/deps is complete.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.carry/deps
[ -f $dest/env.sh ] && [ -d $dest/root/usr/include/fmt ] && exit 0
pkgs=(libfmt-dev libfmt9 doctest-dev nlohmann-json3-dev libsentencepiece-dev libsentencepiece0 pkgconf pkgconf-bin
      libpkgconf3)
rm -rf $dest && mkdir -p $dest/debs
(cd $dest/debs && apt-get download "${pkgs[@]}" >/dev/null) || {
  echo "device-deps: apt-get download failed (run 'apt-get update' first?)" >&2; exit 1; }
for d in $dest/debs/*.deb; do dpkg-deb -x "$d" $dest/root; done
rm -rf $dest/debs $dest/root/usr/share/doc $dest/root/usr/share/man
# qkd links sentencepiece's encoder only; dropping the 1.5 MB trainer library keeps a device call's carry (the tree,
# these files and teacher-25m) under its 64 MiB limit.
rm -f $dest/root/usr/lib/x86_64-linux-gnu/libsentencepiece_train.*
sed -i 's/ -lsentencepiece_train//' $dest/root/usr/lib/x86_64-linux-gnu/pkgconfig/sentencepiece.pc
cat > $dest/env.sh <<'EOS'
# Sourced on the GPU machine: points CMake and pkg-config at the carried Debian packages, wherever they landed.
QKD_DEPS=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/root/usr
# Debian's files name /usr as their prefix; rewrite it to where the copy is.
for f in "$QKD_DEPS"/lib/x86_64-linux-gnu/pkgconfig/*.pc "$QKD_DEPS"/share/pkgconfig/*.pc \
         "$QKD_DEPS"/lib/cmake/doctest/doctestTargets.cmake; do
  [ -f "$f" ] && sed -i -e "s|^prefix=/usr\$|prefix=$QKD_DEPS|" -e "s|_IMPORT_PREFIX \"/usr\"|_IMPORT_PREFIX \"$QKD_DEPS\"|" "$f"
done
mkdir -p "$QKD_DEPS/../wrap"
printf '#!/bin/sh\nLD_LIBRARY_PATH=%s exec %s "$@"\n' "$QKD_DEPS/lib/x86_64-linux-gnu" "$QKD_DEPS/bin/pkgconf" \
  > "$QKD_DEPS/../wrap/pkg-config"
chmod +x "$QKD_DEPS/../wrap/pkg-config"
export PATH="$QKD_DEPS/../wrap:$PATH"
export PKG_CONFIG_PATH="$QKD_DEPS/lib/x86_64-linux-gnu/pkgconfig:$QKD_DEPS/share/pkgconfig"
export CMAKE_PREFIX_PATH="$QKD_DEPS${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}"
export LD_LIBRARY_PATH="$QKD_DEPS/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
EOS
echo "device-deps: $(du -sh $dest | cut -f1) in $dest"
