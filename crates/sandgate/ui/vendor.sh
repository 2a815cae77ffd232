#!/usr/bin/env bash
# Refreshes ui/vendor/ from the npm registry: xterm.js and its fit addon, pinned, with their
# licenses. The files are committed and embedded in the binary (`include_bytes!`), so building
# sandgate needs no npm and the terminal page loads nothing from a CDN.
set -euo pipefail
cd "$(dirname "$0")"
XTERM=@xterm/xterm@6.0.0
FIT=@xterm/addon-fit@0.11.0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "$XTERM" "$FIT" >/dev/null)
mkdir -p "$tmp/x" "$tmp/f"
tar xzf "$tmp"/xterm-xterm-*.tgz -C "$tmp/x"
tar xzf "$tmp"/xterm-addon-fit-*.tgz -C "$tmp/f"
cp "$tmp/x/package/lib/xterm.js" vendor/xterm.js
cp "$tmp/x/package/css/xterm.css" vendor/xterm.css
cp "$tmp/x/package/LICENSE" vendor/LICENSE.xterm
cp "$tmp/f/package/lib/addon-fit.js" vendor/addon-fit.js
cp "$tmp/f/package/LICENSE" vendor/LICENSE.addon-fit
echo "vendored $XTERM and $FIT into $(pwd)/vendor"
