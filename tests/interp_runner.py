"""Run a cases script under Triton's CPU interpreter in a subprocess and check its results.

Triton reads ``TRITON_INTERPRET`` when a kernel is decorated (module import), and another test
may already have imported the kernels in this process, so interpreter cases run in a fresh
process that prints one JSON line ``{case name: error or message}``.
"""

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import torch

import groupmoe

TESTS_DIR = Path(__file__).parent


def run_interpreted(script: str) -> dict:
    src = Path(groupmoe.__file__).parent.parent  # test the package this process imports
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join([str(src), str(TESTS_DIR),
                                           os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(TESTS_DIR / script)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def assert_case(results: dict, cases: dict, name: str) -> None:
    """Case ``name`` ran (a number, not an error message) within ``cases[name][2]``."""
    err = results[name]
    assert not isinstance(err, str), err
    assert err <= cases[name][2], err


def print_case_results(cases: dict, names=None) -> None:
    """The subprocess side: run ``cases`` (``name: (fn, kwargs, tol)``), print one JSON line."""
    results = {}
    for name in names or cases:
        fn, kwargs, _ = cases[name]
        torch.manual_seed(0)
        try:
            results[name] = fn(**kwargs)
        except Exception:  # reported per case by the parent test
            results[name] = "error: " + traceback.format_exc()
    print(json.dumps(results))
