"""A small known agent workload for the Landlock tests (run with /usr/bin/python3 -S -B).

    landlock_agent.py ROOT SESSION [--inject]

Lists and reads every file in ROOT/data, runs the helper /usr/bin/sort on one of them, writes
ROOT/out/run-SESSION/result.json, and prints one JSON line. ``--inject`` also does what a
prompt-injected agent would: spawn /bin/sh and read ROOT/secrets/credentials; each attempt's
outcome (ok, or the errno name) is in the JSON line.
"""

import errno
import json
import os
import subprocess
import sys


def attempt(fn):
    try:
        fn()
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))


def main() -> int:
    root, session = sys.argv[1], sys.argv[2]
    data = os.path.join(root, "data")
    sizes = {}
    for name in sorted(os.listdir(data)):
        with open(os.path.join(data, name), encoding="utf-8") as f:
            sizes[name] = len(f.read())
    sort = subprocess.run(["/usr/bin/sort", os.path.join(data, "words.txt")], capture_output=True, text=True,
                          env={"LC_ALL": "C"})
    out_dir = os.path.join(root, "out", f"run-{session}")
    os.mkdir(out_dir)
    report = {"session": session, "sizes": sizes, "sorted": sort.stdout.split(), "sort_rc": sort.returncode}
    with open(os.path.join(out_dir, "result.json"), "w", encoding="utf-8") as f:
        json.dump(report, f)
    if "--inject" in sys.argv:
        report["sh"] = attempt(lambda: subprocess.run(["/bin/sh", "-c", "id"], capture_output=True))
        report["credentials"] = attempt(lambda: open(os.path.join(root, "secrets", "credentials")).read())
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
