#!/usr/bin/env bash
# Fill .device-ray/ (ignored by git; nothing there is committed) with a stripped copy of Ray 2.60 for a machine
# with one GPU, Python 3.12 and no network, and the few packages Ray needs that such a machine may lack; run
# benchmarks/device/ray_gpu_smoke.py there with `.device` and `.device-ray` beside the checkout (docs/gpu.md).
#
#     bash benchmarks/device/prepare_device_ray.sh [PYTHON_TAG]
#
# PYTHON_TAG: default cp312; cp311 builds the copy this machine can test.
#
# Ray's wheel is 79 MB; what the project never imports goes: the Java workers' jar (31 MB), the dashboard's web
# client, RLlib, Serve and the LLM library, Tune's and RLlib's examples. The stripped wheel keeps the rest as it is
# (its RECORD rewritten to match), so `pip install --no-index --target` installs it like any wheel.
set -euo pipefail
cd "$(dirname "$0")/../.."
tag=${1:-cp312}
version=${tag#cp}; version="${version:0:1}.${version:1}"
out=.device-ray/$tag
rm -rf "$out" && mkdir -p "$out/whl" .device-ray/download
pip_download() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$version" --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 "$@"
}
pip_download -d .device-ray/download ray==2.60.0
# Ray's own requirements and theirs (pure Python, or binary for this Python); a machine that has them keeps its own
# (the versions this project's environment runs Ray 2.60 with)
pip_download -d "$out/whl" click==8.5.1 filelock==4.3.2 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 \
  referencing==0.37.0 rpds-py==2026.9.1 attrs==26.1.0 msgpack==1.2.4 packaging==26.4 protobuf==7.36.2 \
  requests==2.34.2 charset-normalizer==3.5.3 idna==3.21 urllib3==2.8.0 certifi==2026.10.19.post1
python3 - "$tag" "$out" <<'EOF'
import base64, hashlib, sys, zipfile
tag, out = sys.argv[1], sys.argv[2]
name = f"ray-2.60.0-{tag}-{tag}-manylinux2014_x86_64.whl"
DROP = ("ray/jars/", "ray/dashboard/client/", "ray/rllib/", "ray/serve/", "ray/llm/", "ray/tune/examples/",
        "ray/rllib_contrib/")
src, dst = zipfile.ZipFile(f".device-ray/download/{name}"), zipfile.ZipFile(f"{out}/whl/{name}", "w", zipfile.ZIP_DEFLATED)
record, kept = None, []
for info in src.infolist():
    if info.filename.endswith(".dist-info/RECORD"):
        record = info
        continue
    if info.filename.startswith(DROP):
        continue
    data = src.read(info)
    dst.writestr(info, data)
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    kept.append(f"{info.filename},sha256={digest},{len(data)}")
kept.append(f"{record.filename},,")
dst.writestr(record, "\n".join(kept) + "\n")
dst.close()
EOF
du -sh "$out" "$out"/whl/ray-*.whl
