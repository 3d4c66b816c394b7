#!/usr/bin/env bash
# Sets up .venv for wanx.
#
#   bash scripts/setup.sh              core only: torch + wanx (what `make demo` runs)
#   bash scripts/setup.sh all          every extra of pyproject.toml (what `make test` runs)
#   bash scripts/setup.sh test,train   the named extras
#
# 1. Creates .venv once (needs the venv module: python3-venv on Debian/Ubuntu).
# 2. Installs torch unless it is already there: the CUDA build when an NVIDIA GPU answers
#    `nvidia-smi -L`, otherwise the CPU build from PyTorch's CPU wheel index (about 200 MB
#    instead of several GB), or from the default index when that one cannot be reached.
# 3. Installs wanx in editable mode with the extras.
# 4. With the test extra: fetches the official Wan source (the wan22 wheel, without its
#    dependencies) into .venv/reference/ for the parity tests.
#
# A stamp in .venv records the extras installed and a hash of pyproject.toml and this script.
# When a run asks for nothing that is not already there, it installs nothing and prints one
# line. WANX_SETUP_FORCE=1 ignores the stamp; deleting .venv starts over.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
REQUEST=${1:-}
VENV=.venv
VPY=$VENV/bin/python
STAMP=$VENV/.wanx-setup
TORCH_PIN=torch==2.13.0
TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
TORCH_CPU_TIMEOUT=5  # seconds per connection attempt; an unreachable index costs about this much
REFERENCE_PIN=wan22==2.2.11
REFERENCE_WHEEL=wan22-2.2.11-py3-none-any.whl
REFERENCE_SHA256=1e776684c18d5ca245f5e2e03e19a003deb55b629ea1a450e7bb8f95b78a77bc
REFERENCE_DIR=$VENV/reference

say() { echo "setup: $*"; }
die() { echo "setup: $*" >&2; exit 1; }

# ------------------------------------------------------------------------------- the virtualenv
if [ ! -x "$VPY" ]; then
  command -v "$PY" >/dev/null 2>&1 || die "$PY not found; wanx needs Python >= 3.11 (set PYTHON=/path/to/python3.11 to pick one)"
  "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "$PY is Python $("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])'); wanx needs >= 3.11 (set PYTHON=/path/to/python3.11 to pick another)"
  say "creating $VENV"
  if ! "$PY" -m venv "$VENV"; then
    rm -rf "$VENV"  # a failed venv leaves a python without pip behind
    pyver=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    die "'$PY -m venv' failed. On Debian/Ubuntu the venv module is a separate package: install python3-venv (for this Python: sudo apt install python$pyver-venv), then run this again."
  fi
  "$VPY" -m pip install -q --upgrade pip
fi
[ -x "$VENV/bin/pip" ] || die "$VENV has no pip (left over from a failed 'python3 -m venv'?): remove $VENV and run this again"

# ---------------------------------------------------------------- what is asked, what is there
# Prints three lines: the requested extras, the extras to install ("-" when nothing is to be
# installed) and the hash of this set-up's inputs. Extras are comma separated, sorted.
plan=$("$VPY" - "$REQUEST" "$STAMP" pyproject.toml scripts/setup.sh <<'PY'
import hashlib, sys, tomllib
request, stamp, pyproject, script = sys.argv[1:]
known = set(tomllib.load(open(pyproject, "rb"))["project"].get("optional-dependencies", {}))
want = known if request == "all" else {e.strip() for e in request.split(",") if e.strip()}
if want - known:
    sys.exit(f"setup: unknown extra(s) {', '.join(sorted(want - known))}; pyproject.toml has: {', '.join(sorted(known))}")
digest = hashlib.sha256()
for path in (pyproject, script):
    digest.update(open(path, "rb").read())
digest = digest.hexdigest()
try:
    old_digest, old_extras = open(stamp).read().split("\n")[:2]
    have = {e for e in old_extras.split(",") if e} if old_digest == digest else None
except (OSError, ValueError):
    have = None
todo = "-" if have is not None and want <= have else ",".join(sorted(want | (have or set())))
print(",".join(sorted(want)))
print(todo)
print(digest)
PY
) || exit 1
{ read -r want; read -r todo; read -r digest; } <<<"$plan"

torch_summary() {  # one line on the installed torch, without importing it (that takes seconds)
  "$VPY" - <<'PY'
import importlib.util, pathlib
spec = importlib.util.find_spec("torch")
if spec is None:
    print("torch: not installed")
else:
    info = {}
    exec(pathlib.Path(spec.submodule_search_locations[0], "version.py").read_text(), info)
    build = (f"CUDA {info['cuda']}" if info.get("cuda") else
             f"ROCm {info['hip']}" if info.get("hip") else "CPU")
    print(f"torch {info['__version__']} ({build} build)")
PY
}

# ------------------------------------------------------------------------------------- torch
has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

install_torch() {
  if has_gpu; then
    say "NVIDIA GPU found: installing $TORCH_PIN, the CUDA build (several GB)"
    "$VPY" -m pip install -q "$TORCH_PIN"
    return
  fi
  say "no NVIDIA GPU: installing $TORCH_PIN, the CPU build"
  local log=$VENV/torch-cpu-index.log
  if "$VPY" -m pip install -q --index-url "$TORCH_CPU_INDEX" --timeout "$TORCH_CPU_TIMEOUT" \
      --retries 0 "$TORCH_PIN" 2>"$log"; then
    rm -f "$log"
  else
    say "the CPU wheel index ($TORCH_CPU_INDEX) failed (see $log); installing $TORCH_PIN from the default index (on Linux that is the CUDA build, several GB)"
    "$VPY" -m pip install -q "$TORCH_PIN"
  fi
}

# ------------------------------------------------------------------ official Wan reference source
fetch_reference() {
  if [ -f "$REFERENCE_DIR/wan/modules/model.py" ] && [ -f "$REFERENCE_DIR/$REFERENCE_WHEEL.sha256" ]; then
    return
  fi
  say "fetching the official Wan source ($REFERENCE_PIN, no dependencies) into $REFERENCE_DIR"
  ref_tmp=$(mktemp -d "$VENV/reference-tmp.XXXXXX")
  trap 'rm -rf "$ref_tmp"' EXIT
  local tmp=$ref_tmp
  "$VPY" -m pip download -q --no-deps --only-binary :all: -d "$tmp" "$REFERENCE_PIN"
  "$VPY" - "$tmp/$REFERENCE_WHEEL" "$REFERENCE_SHA256" "$tmp/tree" <<'PY'
import hashlib, pathlib, sys, zipfile
wheel, expected, out = sys.argv[1:]
got = hashlib.sha256(pathlib.Path(wheel).read_bytes()).hexdigest()
if got != expected:
    sys.exit(f"setup: {wheel}: sha256 {got}, expected {expected}")
zipfile.ZipFile(wheel).extractall(out)
pathlib.Path(out, pathlib.Path(wheel).name + ".sha256").write_text(got + "\n")
PY
  rm -rf "$REFERENCE_DIR"
  mv "$tmp/tree" "$REFERENCE_DIR"
  rm -rf "$tmp"
  trap - EXIT
}

# ------------------------------------------------------------------------------------- install
if [ "$todo" = "-" ] && [ -z "${WANX_SETUP_FORCE:-}" ]; then
  [[ ",$want," == *,test,* ]] && fetch_reference
  say "$VENV up to date: $(torch_summary), extras: ${want:-none}"
  exit 0
fi
[ "$todo" = "-" ] && todo=$want

"$VPY" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("torch") is None)' || install_torch
say "installing wanx (editable) with extras: ${todo:-none}"
rm -f "$STAMP"
"$VPY" -m pip install -qq -e ".${todo:+[$todo]}"  # -qq: errors only (setuptools talks a lot)
[[ ",$todo," == *,test,* ]] && fetch_reference
printf '%s\n%s\n' "$digest" "$todo" >"$STAMP"
summary=$(torch_summary)
say "done: $summary"
if [[ $summary == *"(CPU build)"* ]] && has_gpu; then
  say "note: an NVIDIA GPU is present but this torch is a CPU build; for the CUDA build: $VPY -m pip install --force-reinstall $TORCH_PIN"
fi
