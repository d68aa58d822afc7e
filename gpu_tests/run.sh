#!/usr/bin/env bash
# The whole GPU regression suite, one command, on a CUDA machine. Prints a summary per patch.
#   bash gpu_tests/run.sh [extra pytest args]
# Uses $PYTHON (default: .venvs/affected/bin/python if present, else python3). See gpu_tests/README.md.
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-}
if [ -z "$py" ]; then
  if [ -x .venvs/affected/bin/python ]; then py=.venvs/affected/bin/python; else py=python3; fi
fi
export HF_HUB_OFFLINE=1 HFPATCHES_CACHE=${HFPATCHES_CACHE:-$PWD/.cache}
"$py" -m hfpatches doctor || true
"$py" -m pytest gpu_tests -v -rs -p no:cacheprovider --junitxml=gpu_tests/last-run.xml "$@"
rc=$?
"$py" - <<'PY'
import collections, xml.etree.ElementTree as ET
try:
    root = ET.parse("gpu_tests/last-run.xml").getroot()
except Exception as e:
    raise SystemExit(f"no junit report: {e}")
per = collections.defaultdict(collections.Counter)
for tc in root.iter("testcase"):
    mod = tc.get("classname", "").split(".")[-1].replace("test_", "")
    state = "failed" if tc.find("failure") is not None or tc.find("error") is not None else \
            "skipped" if tc.find("skipped") is not None else "passed"
    per[mod][state] += 1
print("\nGPU suite summary per patch:")
for mod, c in sorted(per.items()):
    print(f"  {mod:<26} passed {c['passed']:>3}  failed {c['failed']:>3}  skipped {c['skipped']:>3}")
PY
exit $rc
