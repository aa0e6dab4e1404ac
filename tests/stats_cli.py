"""Run vmctl's status and top verb modules without vmctl's entry point.

vmbridge/cli/__init__.py and context.py (the verb table and ``Context``) are
written in another branch; until they are merged, tests drive the verb
modules through :class:`MiniContext`, which has just the part of
``Context`` they use: ``manager_call``, ``json``, ``print_json``, ``stdout``.
After the merge these tests can run ``bin/vmctl status|top`` instead.

Also runnable as a script (the pty test runs top this way)::

    python tests/stats_cli.py MANAGER_SOCKET top [ARGS...]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from vmbridge.varlink.client import Connection  # noqa: E402


class MiniContext:
    def __init__(self, manager_address: str, *, json_mode=None, stdout=None):
        self.manager_address = manager_address
        self.json = json_mode
        self.stdout = stdout or sys.stdout
        self.calls = []

    def manager_call(self, method, parameters=None, *, timeout=None):
        self.calls.append(method)
        with Connection(self.manager_address, timeout=timeout or 30) as conn:
            return conn.call("io.vmbridge.Manager.%s" % method, parameters)

    def print_json(self, obj):
        self.stdout.write(json.dumps(obj, separators=(",", ":"), ensure_ascii=False) + "\n")
        self.stdout.flush()


def run_verb(verb: str, argv, ctx) -> int:
    module = importlib.import_module("vmbridge.cli.%s" % verb)
    parser = argparse.ArgumentParser(prog="vmctl " + verb)
    module.add_arguments(parser)
    return module.run(parser.parse_args(argv), ctx)


if __name__ == "__main__":
    address, verb, *rest = sys.argv[1:]
    sys.exit(run_verb(verb, rest, MiniContext(address)))
