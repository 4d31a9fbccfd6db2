#!/usr/bin/env bash
# Builds llama.cpp's llama-server and llama-cvector-generator into .llama.cpp/bin (about 5 minutes on 2 cores), for
# the tests that run an exported vector in llama-server and import one that llama-cvector-generator wrote.
#
# The source is the sdist of the installed llama-cpp-python (it vendors llama.cpp), so the executables and the
# Python binding are the same llama.cpp commit. pip's own download, and so its cache and index settings, fetch it.
# A build of the same version already there is kept; LLAMA_CPP_BIN points the tests at another llama.cpp instead.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dest="$root/.llama.cpp"
# The public version: a local suffix (0.3.36+cpu) names no release on PyPI.
version=$(python -c 'import importlib.metadata as m; print(m.version("llama-cpp-python").split("+")[0])' 2> /dev/null) \
  || { echo 'llama-cpp-python is not installed: pip install -e ".[llama-cpp]" first' >&2; exit 2; }
tools=(llama-server llama-cvector-generator)

if [ "$(cat "$dest/version" 2>/dev/null)" = "$version" ] && [ -x "$dest/bin/${tools[0]}" ] && [ -x "$dest/bin/${tools[1]}" ]; then
  echo "llama.cpp tools of llama-cpp-python $version are in $dest/bin"
  exit 0
fi

if ! command -v cmake > /dev/null; then
  echo "cmake is not installed: taking it from PyPI (pip install cmake)"
  python -m pip install --quiet cmake
  PATH="$(python -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"
fi

if ! command -v ninja > /dev/null && ! command -v make > /dev/null; then
  echo "neither ninja nor make is installed: apt install ninja-build (or make), or pip install ninja" >&2
  exit 2
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python -m pip download --quiet --no-deps --no-binary llama-cpp-python "llama-cpp-python==$version" -d "$work"
tar xzf "$work"/llama_cpp_python-"$version".tar.gz -C "$work"
generator=()
if command -v ninja > /dev/null; then generator=(-G Ninja); fi
# Static executables; no web UI (it is fetched from the network) and no HTTPS (not needed on localhost).
cmake -S "$work/llama_cpp_python-$version/vendor/llama.cpp" -B "$work/build" "${generator[@]}" \
  -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF > "$work/configure.log" 2>&1 \
  || { cat "$work/configure.log" >&2; exit 1; }
cmake --build "$work/build" --target "${tools[@]}" -j "$(nproc)" > "$work/build.log" 2>&1 \
  || { tail -50 "$work/build.log" >&2; exit 1; }

# Replaced as a whole, the version file last: an interrupted build leaves no half-updated folder that looks done.
rm -rf "$dest.new" && mkdir -p "$dest.new/bin"
for tool in "${tools[@]}"; do cp "$work/build/bin/$tool" "$dest.new/bin/"; done
echo "$version" > "$dest.new/version"
rm -rf "$dest" && mv "$dest.new" "$dest"
echo "built ${tools[*]} (llama-cpp-python $version) in $dest/bin"
