"""One OpenMP team per process (server/threads.py): the main thread's team is freed once the model
is loaded, helper threads run OpenMP single-threaded, and neither changes the engine thread's count.
Each case runs in a fresh interpreter: OpenMP teams live as long as their threads."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PRELUDE = """
import os, threading, torch
from server import threads
torch.set_num_threads(2)
big = torch.randn(2048, 2048)
def tasks(): return len(os.listdir("/proc/self/task"))
def in_thread(fn):
    out = []
    t = threading.Thread(target=lambda: out.append(fn())); t.start(); t.join(); return out[0]
"""


def run(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'proto'}"}
    p = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(code)], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip()


def test_release_frees_the_calling_threads_team():
    out = run("""
        before = tasks()
        (big * 2).sum()                       # a parallel op: the main thread's team starts
        with_team = tasks()
        assert threads.release_team()
        print(before, with_team, tasks())
    """)
    before, with_team, after = map(int, out.split())
    assert with_team == before + 1 and after == before, out      # 2 threads: one worker, gone again


def test_serial_starts_no_team_and_leaves_other_threads_counts_alone():
    out = run("""
        def helper():
            threads.serial()
            n0 = tasks()
            (big * 2).sum()
            return torch.get_num_threads(), tasks() - n0
        def engine():
            threads.engine_team(2)
            return torch.get_num_threads()
        print(*in_thread(helper), in_thread(engine), torch.get_num_threads(), in_thread(torch.get_num_threads))
    """)
    helper_threads, new_tasks, engine_threads, main_threads, later_thread = map(int, out.split())
    assert (helper_threads, new_tasks) == (1, 0), out       # one thread, no worker started
    assert engine_threads == main_threads == 2, out         # torch's own setting untouched elsewhere,
    assert later_thread == 2, out                           # and its default for new threads too


def test_the_server_frees_the_main_team_after_starting_the_engine():
    src = (ROOT / "server" / "main.py").read_text()
    serve = next(n for n in ast.walk(ast.parse(src)) if isinstance(n, ast.AsyncFunctionDef) and n.name == "serve")
    line = {ast.unparse(n.func): n.lineno for n in ast.walk(serve) if isinstance(n, ast.Call)}
    assert line["threads.release_team"] > line["start"] and line["threads.serial"] > line["start"]
    assert "initializer=threads.serial" in src                 # the event loop's worker threads
