"""Drives a Cloude server through the published Judge0 Python SDK (`judge0` on PyPI), unchanged.

Usage: python run.py BASE_URL. Prints one line per check ("ok NAME" or "FAIL NAME: detail") and
exits 1 if any check failed. The SDK talks base64 and polls (`wait=false`) for every run.
"""

import sys
import time

import judge0
from judge0 import Status, Submission

failures = []


def check(name, ok, detail=""):
    if ok:
        print(f"judge0-client: ok   {name}", flush=True)
    else:
        print(f"judge0-client: FAIL {name}: {detail}", flush=True)
        failures.append(name)


def main(url):
    client = judge0.Client(url)

    # /about, /config_info, /languages, /languages/{id}, /statuses.
    check("version", client.version == "1.13.1", client.version)
    ids = {lang.id for lang in client.languages}
    check("languages", {71, 63, 46, 50, 54, 52}.issubset(ids), sorted(ids))
    py = client.get_language(71)
    check("language 71", py.name.startswith("Python (3"), py)
    statuses = client.get_statuses()
    check("statuses", len(statuses) == 14 and statuses[2]["description"] == "Accepted", statuses)
    check("config", client.config.max_submission_batch_size >= 2, client.config)

    # A synchronous run (the SDK creates, then polls) with stdin and non-ASCII output (base64).
    t = time.time()
    s = judge0.run(
        client=client,
        source_code="name = input()\nprint(f'héllo, {name}')\n",
        stdin="judge0",
        language=judge0.PYTHON,
    )
    check(
        "sync run",
        s.status == Status.ACCEPTED and s.stdout == "héllo, judge0\n",
        f"{s.status} {s.stdout!r} {s.stderr!r} {s.message!r}",
    )
    check("time and memory", s.time is not None and s.memory is not None, s)
    print(f"judge0-client: sync run took {time.time() - t:.1f} s (time {s.time}, memory {s.memory})")

    # Asynchronous: create, then wait.
    a = judge0.async_run(client=client, source_code="print(6 * 7)", language=judge0.PYTHON)
    check("async token", a.token is not None, a)
    judge0.wait(client=client, submissions=a)
    check("async result", a.status == Status.ACCEPTED and a.stdout == "42\n", f"{a.status} {a.stdout!r}")

    # expected_output through test cases: a batch (several submissions at once).
    results = judge0.run(
        client=client,
        source_code="print(int(input()) * 2)",
        language=judge0.PYTHON,
        test_cases=[("1", "2"), ("5", "10  \n\n"), ("3", "7")],
    )
    got = [r.status for r in results]
    check(
        "expected_output: Accepted, Accepted (trailing whitespace), Wrong Answer",
        got == [Status.ACCEPTED, Status.ACCEPTED, Status.WRONG_ANSWER],
        got,
    )

    # Batch of different programs, including a Bash one.
    batch = judge0.run(
        client=client,
        submissions=[
            Submission(source_code="echo from bash", language=judge0.BASH),
            Submission(source_code="print('from python')", language=judge0.PYTHON),
        ],
    )
    check(
        "batch",
        [b.stdout for b in batch] == ["from bash\n", "from python\n"],
        [(b.status, b.stdout) for b in batch],
    )

    # Time Limit Exceeded.
    tle = judge0.run(
        client=client,
        source_code="while True:\n    pass\n",
        language=judge0.PYTHON,
        cpu_time_limit=1,
        cpu_extra_time=0.5,
    )
    check("time limit exceeded", tle.status == Status.TIME_LIMIT_EXCEEDED, f"{tle.status} {tle.message!r}")

    # Runtime errors by signal and by exit code.
    seg = judge0.run(
        client=client,
        source_code="import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n",
        language=judge0.PYTHON,
    )
    check(
        "runtime error (SIGSEGV)",
        seg.status == Status.RUNTIME_ERROR_SIGSEGV and seg.exit_signal == 11,
        f"{seg.status} {seg.exit_signal} {seg.message!r}",
    )
    nzec = judge0.run(client=client, source_code="import sys\nsys.exit(3)", language=judge0.PYTHON)
    check(
        "runtime error (NZEC)",
        nzec.status == Status.RUNTIME_ERROR_NZEC and nzec.exit_code == 3,
        f"{nzec.status} {nzec.exit_code}",
    )

    # Compilation Error (C), then a C++ program that compiles and runs.
    ce = judge0.run(client=client, source_code="int main( { return 0; }", language=judge0.C)
    check(
        "compilation error",
        ce.status == Status.COMPILATION_ERROR and ce.compile_output and "error" in ce.compile_output,
        f"{ce.status} {ce.compile_output!r}",
    )
    cpp = judge0.run(
        client=client,
        source_code="#include <iostream>\nint main() { std::cout << \"cpp ok\\n\"; }\n",
        language=judge0.CPP,
    )
    check("c++ run", cpp.status == Status.ACCEPTED and cpp.stdout == "cpp ok\n", f"{cpp.status} {cpp.stdout!r}")

    print(f"judge0-client: {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
