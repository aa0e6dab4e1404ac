"""vmbridged under cProfile: ``profiled_daemon.py OUT.pstats [vmbridged args...]``.

Used by ``bench/run.py --profile DIR``. The stats are written when the daemon
exits (SIGTERM, as the bench stops it). Read them with
``python -m pstats OUT.pstats`` (``sort tottime``, ``stats 30``): under gevent,
cumulative times include time spent switched away in other greenlets, so
``tottime`` (time in the function's own code) is the column to trust.
py-spy (``bench/run.py --py-spy``) samples instead and has no such blur.
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from vmbridge import daemon  # noqa: E402  (patches with gevent first thing)

import cProfile  # noqa: E402


def main() -> int:
    out, args = sys.argv[1], sys.argv[2:]
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        return daemon.main(args)
    finally:
        profiler.disable()
        profiler.dump_stats(out)


if __name__ == "__main__":
    sys.exit(main())
