# Cloude's code-interpreter context: one Python process per context, in the sandbox, as the
# sandbox user. The host (api/e2b/interpreter.rs) writes one JSON request per line on stdin:
#   {"x": <execution id>, "code": "...", "env": {...}}
# and reads JSON events, one per line, on stdout, each carrying the execution id:
#   number_of_executions, stdout/stderr {text, timestamp}, result {text, png, html, ...,
#   is_main_result}, error {name, value, traceback}, end_of_execution.
# Variables live on between requests (one namespace); the last expression's value is the main
# result; matplotlib figures left open at the end of a cell come back as png results.
import ast
import base64
import io
import json
import os
import sys
import time
import traceback

_real_out = sys.stdout
_current = [None]


def _emit(event):
    event["x"] = _current[0]
    _real_out.write(json.dumps(event) + "\n")
    _real_out.flush()


class _Stream(io.TextIOBase):
    """Whole lines become events (print's text and its newline arrive as two writes)."""

    def __init__(self, kind):
        self.kind = kind
        self.pending = ""

    def writable(self):
        return True

    def write(self, s):
        self.pending += str(s)
        cut = self.pending.rfind("\n") + 1
        if cut or len(self.pending) > 65536:
            cut = cut or len(self.pending)
            text, self.pending = self.pending[:cut], self.pending[cut:]
            _emit({"type": self.kind, "text": text, "timestamp": time.time_ns()})
        return len(s)

    def flush(self):
        if self.pending:
            text, self.pending = self.pending, ""
            _emit({"type": self.kind, "text": text, "timestamp": time.time_ns()})

    def isatty(self):
        return False


try:
    import matplotlib

    matplotlib.use("Agg")
except Exception:
    matplotlib = None


def _figures():
    if matplotlib is None or "matplotlib.pyplot" not in sys.modules:
        return
    plt = sys.modules["matplotlib.pyplot"]
    for num in plt.get_fignums():
        fig = plt.figure(num)
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        _emit({"type": "result", "png": base64.b64encode(buf.getvalue()).decode(),
               "text": repr(fig), "is_main_result": False})
    plt.close("all")


def _value(v):
    r = {"type": "result", "text": repr(v), "is_main_result": True}
    for attr, key in (("_repr_html_", "html"), ("_repr_markdown_", "markdown"),
                      ("_repr_latex_", "latex"), ("_repr_json_", "json"),
                      ("_repr_svg_", "svg")):
        f = getattr(v, attr, None)
        if callable(f):
            try:
                out = f()
                if out is not None:
                    r[key] = out
            except Exception:
                pass
    return r


_ns = {"__name__": "__main__", "__builtins__": __builtins__}
_count = 0
for _line in sys.stdin:
    try:
        _req = json.loads(_line)
    except ValueError:
        continue
    _current[0] = _req.get("x")
    _count += 1
    _emit({"type": "number_of_executions", "execution_count": _count})
    _saved_env = dict(os.environ)
    os.environ.update({str(k): str(v) for k, v in (_req.get("env") or {}).items()})
    sys.stdout, sys.stderr = _Stream("stdout"), _Stream("stderr")
    try:
        _tree = ast.parse(_req.get("code", ""), "<cell>", "exec")
        _last = None
        if _tree.body and isinstance(_tree.body[-1], ast.Expr):
            _last = ast.Expression(_tree.body.pop().value)
        exec(compile(_tree, "<cell>", "exec"), _ns)
        _v = eval(compile(_last, "<cell>", "eval"), _ns) if _last is not None else None
        sys.stdout.flush()
        sys.stderr.flush()
        _figures()
        if _v is not None:
            _emit(_value(_v))
    except BaseException as _e:  # noqa: B036 - a cell's SystemExit or KeyboardInterrupt too
        _tb = traceback.format_exception(type(_e), _e, _e.__traceback__)
        # Leave out this file's own frame: the traceback starts at the cell.
        _emit({"type": "error", "name": type(_e).__name__, "value": str(_e),
               "traceback": "".join(_tb[:1] + _tb[2:])})
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
        os.environ.clear()
        os.environ.update(_saved_env)
        _emit({"type": "end_of_execution"})
