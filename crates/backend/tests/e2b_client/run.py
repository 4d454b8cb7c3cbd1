"""E2B's published Python SDK (`e2b` on PyPI), unchanged, against a Cloude server.

Usage: run.py BASE_URL KEY_A KEY_B   (BASE_URL like http://127.0.0.1:PORT/e2b)

Every check asserts something the server could get wrong; the last line is "all ok".
"""

import os
import sys
import threading
import time

base, key_a, key_b = sys.argv[1], sys.argv[2], sys.argv[3]
os.environ["E2B_API_URL"] = base
os.environ["E2B_SANDBOX_URL"] = base
os.environ["E2B_API_KEY"] = key_a

from e2b import Sandbox  # noqa: E402
from e2b import (  # noqa: E402
    CommandExitException,
    NotFoundException,
    SandboxException,
    TimeoutException,
)


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print("ok:", what, flush=True)


t0 = time.monotonic()
sbx = Sandbox.create(timeout=120, metadata={"suite": "e2b", "who": "a"}, envs={"GREETING": "hello"})
print(f"created {sbx.sandbox_id} in {time.monotonic() - t0:.2f} s", flush=True)
check(sbx.is_running(), "a new sandbox is running (GET /health)")

# Output arrives while the command runs, not only at its end.
seen = []
r = sbx.commands.run(
    "echo first; sleep 2; echo second",
    on_stdout=lambda line: seen.append((time.monotonic(), line)),
)
check(r.exit_code == 0 and r.stdout == "first\nsecond\n", f"run's stdout ({r.stdout!r})")
check(len(seen) >= 2, f"on_stdout called per chunk ({len(seen)})")
gap = seen[-1][0] - seen[0][0]
check(gap > 1.5, f"the first line came {gap:.2f} s before the last: streamed while running")

# A non-zero exit raises, carrying stdout, stderr and the code.
try:
    sbx.commands.run("echo out; echo err >&2; exit 3")
    check(False, "a non-zero exit raises")
except CommandExitException as e:
    check(e.exit_code == 3, f"the exit code is 3 ({e.exit_code})")
    check(e.stdout == "out\n" and e.stderr == "err\n", f"stdout/stderr kept ({e.stdout!r}, {e.stderr!r})")

# Environment: the sandbox's (at creation) and the command's own.
r = sbx.commands.run("echo $GREETING $EXTRA", envs={"EXTRA": "world"})
check(r.stdout == "hello world\n", f"envs at creation and per command ({r.stdout!r})")
r = sbx.commands.run("whoami; pwd")
check(r.stdout == "user\n/home/user\n", f"commands run as user in /home/user ({r.stdout!r})")
r = sbx.commands.run("whoami", user="root")
check(r.stdout == "root\n", "user='root' runs as root")

# Files: written, read, listed; state kept between commands.
info = sbx.files.write("/home/user/notes/a.txt", "line one\n")
check(info.path == "/home/user/notes/a.txt", f"write answers the path ({info.path})")
check(sbx.files.read("/home/user/notes/a.txt") == "line one\n", "a written file reads back")
sbx.commands.run("echo two >> notes/a.txt")
check(sbx.files.read("notes/a.txt") == "line one\ntwo\n", "a command sees and changes the file; relative paths are in the home")
data = bytes(range(256)) * 40
sbx.files.write("/tmp/bin.dat", data)
check(bytes(sbx.files.read("/tmp/bin.dat", format="bytes")) == data, "binary bytes survive")
names = sorted(e.name for e in sbx.files.list("/home/user/notes"))
check(names == ["a.txt"], f"files.list ({names})")
check(sbx.files.exists("/home/user/notes/a.txt") and not sbx.files.exists("/nope"), "files.exists")
check(sbx.files.make_dir("/home/user/d1/d2") is True, "make_dir makes a directory")
check(sbx.files.make_dir("/home/user/d1/d2") is False, "make_dir of an existing one is False")
sbx.files.rename("/home/user/notes/a.txt", "/home/user/notes/b.txt")
check(sbx.files.exists("/home/user/notes/b.txt") and not sbx.files.exists("/home/user/notes/a.txt"), "rename")
sbx.files.remove("/home/user/notes")
check(not sbx.files.exists("/home/user/notes"), "remove")
try:
    sbx.files.read("/home/user/missing.txt")
    check(False, "reading a missing file raises")
except NotFoundException:
    check(True, "reading a missing file raises NotFound")
sbx.commands.run("export X=1; echo 42 > /tmp/state")
check(sbx.commands.run("cat /tmp/state").stdout == "42\n", "files persist between commands")

# A background process: alive on the next call, its output followed, killed by pid.
h = sbx.commands.run("for i in $(seq 1 100); do echo tick $i; sleep 0.2; done", background=True)
time.sleep(1.0)
ps = sbx.commands.run("ps -eo args").stdout
check("seq 1 100" in ps or "sleep 0.2" in ps, "the background process runs during the next command")
pids = [p.pid for p in sbx.commands.list()]
check(h.pid in pids, f"commands.list has it ({h.pid} in {pids})")
check(sbx.commands.kill(h.pid) is True, "commands.kill -> True")
try:
    h.wait()
    check(False, "a killed command does not end well")
except CommandExitException as e:
    check("tick 1" in e.stdout, f"its output was followed ({e.stdout[:30]!r})")
check(sbx.commands.kill(h.pid) is False, "killing it again -> False")

# A command with input.
h = sbx.commands.run("read a; echo got $a", background=True, stdin=True)
sbx.commands.send_stdin(h.pid, "xyz\n")
r = h.wait()
check(r.stdout == "got xyz\n", f"send_stdin ({r.stdout!r})")

# The client-side timeout of a command.
try:
    sbx.commands.run("sleep 30", timeout=2)
    check(False, "a command past its timeout raises")
except TimeoutException:
    check(True, "a command past its timeout raises TimeoutException")

# Connect keeps files and a background process.
h = sbx.commands.run("sleep 600", background=True)
h.disconnect()
same = Sandbox.connect(sbx.sandbox_id)
check(same.files.read("/tmp/state") == "42\n", "Sandbox.connect: the files are there")
check(h.pid in [p.pid for p in same.commands.list()], "Sandbox.connect: the background process runs")

# Info and the list, with metadata filters.
inf = sbx.get_info()
check(inf.sandbox_id == sbx.sandbox_id and inf.metadata.get("suite") == "e2b", "get_info")
other = Sandbox.create(timeout=60, metadata={"suite": "e2b", "who": "b"})
ids = {s.sandbox_id for s in Sandbox.list().next_items()}
check({sbx.sandbox_id, other.sandbox_id} <= ids, "list has both")
from e2b import SandboxQuery  # noqa: E402

only_b = [s.sandbox_id for s in Sandbox.list(query=SandboxQuery(metadata={"who": "b"})).next_items()]
check(only_b == [other.sandbox_id], f"list by metadata ({only_b})")
pages = Sandbox.list(limit=1)
first = pages.next_items()
check(len(first) == 1 and pages.has_next, "list pages by limit with a next token")
check(len(pages.next_items()) == 1, "the next page")

# Two sandboxes are isolated.
other.files.write("/tmp/state", "mine")
check(sbx.files.read("/tmp/state") == "42\n", "another sandbox's file is its own")
check("sleep 600" not in other.commands.run("ps -eo args").stdout, "another sandbox's processes are invisible")

# Another key sees none of these.
os.environ["E2B_API_KEY"] = key_b
ids_b = {s.sandbox_id for s in Sandbox.list().next_items()}
check(sbx.sandbox_id not in ids_b, "another API key does not list them")
check(Sandbox.kill(sbx.sandbox_id) is False, "another API key cannot kill them")
try:
    Sandbox.get_info(sbx.sandbox_id)
    check(False, "another API key cannot see them")
except Exception:
    check(True, "another API key cannot see them")
os.environ["E2B_API_KEY"] = key_a

# Pause freezes the VM (no guest code runs); connect resumes it with its files and processes.
from e2b import SandboxState  # noqa: E402

counter = sbx.commands.run(
    "i=0; while true; do i=$((i+1)); echo $i > /tmp/count; sleep 0.2; done", background=True
)
time.sleep(1.5)
before = int(sbx.files.read("/tmp/count"))
check(sbx.pause() is True, "pause -> True")
check(sbx.pause() is False, "pause again -> False (409: already paused)")
check(not sbx.is_running(), "a paused sandbox is not running")
paused = [s.sandbox_id for s in Sandbox.list(query=SandboxQuery(state=[SandboxState.PAUSED])).next_items()]
check(sbx.sandbox_id in paused, f"list by state: paused ({paused})")
running = [s.sandbox_id for s in Sandbox.list(query=SandboxQuery(state=[SandboxState.RUNNING])).next_items()]
check(sbx.sandbox_id not in running, "and not running")
time.sleep(3)
resumed = Sandbox.connect(sbx.sandbox_id)
after = int(resumed.files.read("/tmp/count"))
# 3 s paused would have been 15 more turns of the loop had the VM run.
check(after - before < 8, f"nothing ran while paused ({before} -> {after})")
check(resumed.is_running(), "connect resumes it")
check(resumed.files.read("/tmp/state") == "42\n", "its files are kept across the pause")
pids = [p.pid for p in resumed.commands.list()]
check(counter.pid in pids and h.pid in pids, "its background processes are kept across the pause")
time.sleep(1.5)
check(int(resumed.files.read("/tmp/count")) > after, "and run again")
resumed.commands.kill(counter.pid)

# Kill: True, then False.
check(other.kill() is True, "kill -> True")
check(Sandbox.kill(other.sandbox_id) is False, "kill again -> False")

# set_timeout: a short one ends the sandbox.
sbx.set_timeout(3)
time.sleep(6)
check(not sbx.is_running(), "a sandbox past its timeout is gone")
check(Sandbox.kill(sbx.sandbox_id) is False, "and cannot be killed again")
print("all ok", flush=True)
