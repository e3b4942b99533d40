"""Peak memory of a command and every process it starts (Python, TensorFlow, the Spark JVM, PySpark workers,
joblib workers), sampled from /proc while it runs.

    .venv/bin/python benchmarks/peak_memory.py -- .venv/bin/python -m medspark.train train.epochs=2
    .venv/bin/python benchmarks/peak_memory.py -- .venv/bin/python -m medspark.train -m hydra/launcher=parallel ...

Reports the peak of the summed PSS (proportional set size: shared pages split between the processes that share
them, so forked PySpark workers are not counted twice) and of the summed RSS (an upper bound), the peak of
each process kind, and the wall time. The command's output is passed through.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time

import psutil

GIB = 1024 ** 3


def kind(p: psutil.Process) -> str:
    try:
        cmd = " ".join(p.cmdline())
    except psutil.Error:
        return "?"
    if "java" in p.name():
        return "spark jvm"
    if "pyspark.daemon" in cmd or "pyspark/daemon" in cmd or "pyspark.worker" in cmd:
        return "pyspark workers"
    if "loky" in cmd or "joblib" in cmd:
        return "joblib workers"
    if "python" in p.name() or "python" in cmd:
        return "python"
    return p.name()


def sample(root: psutil.Process, out: dict, stop: threading.Event, every: float) -> None:
    while not stop.is_set():
        pss = rss = 0
        by_kind: dict[str, int] = {}
        try:
            procs = [root] + root.children(recursive=True)
        except psutil.Error:
            break
        for p in procs:
            try:
                mem = p.memory_full_info()
            except psutil.Error:
                continue
            pss += mem.pss
            rss += mem.rss
            k = kind(p)
            by_kind[k] = by_kind.get(k, 0) + mem.pss
        out["pss"] = max(out.get("pss", 0), pss)
        out["rss"] = max(out.get("rss", 0), rss)
        out["procs"] = max(out.get("procs", 0), len(procs))
        for k, v in by_kind.items():
            out.setdefault("kinds", {})[k] = max(out.get("kinds", {}).get(k, 0), v)
        stop.wait(every)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        sys.exit("usage: peak_memory.py [--every SECONDS] -- COMMAND ...")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--every", type=float, default=0.5, help="sampling interval in seconds")
    args = ap.parse_args(argv[:argv.index("--")])
    cmd = argv[argv.index("--") + 1:]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    out: dict = {}
    stop = threading.Event()
    thread = threading.Thread(target=sample, args=(psutil.Process(proc.pid), out, stop, args.every), daemon=True)
    thread.start()
    rc = proc.wait()
    stop.set()
    thread.join()
    wall = time.perf_counter() - t0
    print(f"\n### peak memory of `{' '.join(cmd)}`", flush=True)
    print(f"peak PSS (sum over processes): {out.get('pss', 0) / GIB:.2f} GiB; peak RSS sum: {out.get('rss', 0) / GIB:.2f} GiB; "
          f"up to {out.get('procs', 0)} processes; wall {wall:.0f} s; exit {rc}")
    for k, v in sorted(out.get("kinds", {}).items(), key=lambda kv: -kv[1]):
        print(f"  {k:16s} peak PSS {v / GIB:.2f} GiB")
    return rc


if __name__ == "__main__":
    sys.exit(main())
