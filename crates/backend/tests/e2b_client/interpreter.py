"""E2B's published code interpreter SDK (`e2b-code-interpreter` on PyPI), unchanged.

Usage: interpreter.py BASE_URL KEY
"""

import base64
import os
import sys

base, key = sys.argv[1], sys.argv[2]
os.environ["E2B_API_URL"] = base
os.environ["E2B_SANDBOX_URL"] = base
os.environ["E2B_API_KEY"] = key

from e2b_code_interpreter import Sandbox  # noqa: E402


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print("ok:", what, flush=True)


sbx = Sandbox.create(timeout=120)
ex = sbx.run_code("x = 40\nprint('hello')\nx + 2")
check(ex.text == "42", f"the last expression is the main result ({ex.text!r})")
check(ex.logs.stdout == ["hello\n"], f"stdout ({ex.logs.stdout})")
check(ex.error is None, "no error")
ex = sbx.run_code("x * 10")
check(ex.text == "400", f"state kept between run_code calls ({ex.text!r})")
seen = []
ex = sbx.run_code("import sys\nprint('a')\nprint('b', file=sys.stderr)", on_stdout=lambda m: seen.append(m.line))
check(ex.logs.stderr == ["b\n"] and seen == ["a\n"], f"stderr and on_stdout ({ex.logs.stderr}, {seen})")
ex = sbx.run_code("def f():\n    return 1 / 0\nf()")
check(ex.error is not None and ex.error.name == "ZeroDivisionError", f"an exception is an error ({ex.error})")
check("division by zero" in ex.error.value and "line 2, in f" in ex.error.traceback,
      "with its value and traceback")
check(sbx.run_code("x").text == "40", "the context lives on after an error")
ctx = sbx.create_code_context()
check(sbx.run_code("x = 1", context=ctx).error is None, "a new context")
check(sbx.run_code("x", context=ctx).text == "1", "contexts are separate (x is 1 there)")
check(sbx.run_code("x").text == "40", "and 40 in the default one")
check(any(c.id == ctx.id for c in sbx.list_code_contexts()), "list_code_contexts")
sbx.restart_code_context(ctx)
ex = sbx.run_code("x", context=ctx)
check(ex.error is not None and ex.error.name == "NameError", "a restarted context forgot x")
sbx.remove_code_context(ctx)
check(all(c.id != ctx.id for c in sbx.list_code_contexts()), "remove_code_context")
ex = sbx.run_code("import os\nos.environ.get('V')", envs={"V": "per-run"})
check(ex.text == "'per-run'", f"envs per run ({ex.text})")
# The data packages E2B's template has: numpy computes, pandas reads a CSV, a figure comes back.
ex = sbx.run_code("import numpy as np\nint(np.arange(10).sum())")
check(ex.text == "45", f"numpy computes ({ex.text}, {ex.error})")
sbx.files.write("/tmp/data.csv", "a,b\n1,2\n3,4\n")
ex = sbx.run_code("import pandas as pd\nint(pd.read_csv('/tmp/data.csv')['b'].sum())")
check(ex.text == "6", f"pandas reads a CSV ({ex.text}, {ex.error})")
ex = sbx.run_code("import matplotlib.pyplot as plt\nplt.plot([1, 2, 3], [3, 1, 2])\nplt.title('t')")
pngs = [r.png for r in ex.results if r.png]
check(len(pngs) == 1 and base64.b64decode(pngs[0]).startswith(b"\x89PNG"),
      f"a figure left open is a png result ({[list(r.formats()) for r in ex.results]}, {ex.error})")
r = sbx.commands.run("echo shell too")
check(r.stdout == "shell too\n", "commands work in a code interpreter sandbox")
sbx.kill()
print("all ok", flush=True)
