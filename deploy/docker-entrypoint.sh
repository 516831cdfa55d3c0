#!/bin/sh
# featurewatch image entrypoint: link the model cache warmed at build time into the data dir, then run
# `featurewatch ARGS` (default: serve). The data dir is usually a volume, which hides whatever the image had
# at that path, so the cache lives outside it (/opt/featurewatch/models, read-only) and is linked in. A real
# `models` folder already in the data dir (e.g. other models cached there) is left alone.
set -eu
data="${FEATUREWATCH_DATA_DIR:-/data}"
models="${FEATUREWATCH_IMAGE_MODELS:-/opt/featurewatch/models}"
mkdir -p "$data"
if [ -d "$models" ] && [ ! -e "$data/models" ]; then
    # a dangling link (from an image without the cache) is replaced
    rm -f "$data/models"
    ln -s "$models" "$data/models"
fi
exec featurewatch "$@"
