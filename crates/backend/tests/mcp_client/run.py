"""Drives Cloude's MCP face with the official MCP Python SDK (`mcp` on PyPI), unchanged.

usage: run.py http URL            (Streamable HTTP at URL, e.g. http://127.0.0.1:PORT/mcp)
       run.py stdio CLOUDE SERVER (spawns `CLOUDE --server SERVER mcp` and talks over stdio)

Prints one line per check; exits non-zero on the first failure.
"""

import asyncio
import json
import sys
import time

from mcp import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client


def text_of(result):
    return "".join(getattr(c, "text", "") for c in result.content)


def check(cond, what, result=None):
    if not cond:
        extra = f": {result}" if result is not None else ""
        raise SystemExit(f"FAILED {what}{extra}")
    print(f"ok {what}", flush=True)


async def drive(session, concurrent):
    init = await session.initialize()
    check(init.server_info.name == "cloude", "initialize names the server", init)

    tools = await session.list_tools()
    names = {t.name for t in tools.tools}
    want = {"run_code", "list_languages", "create_sandbox", "run_command", "write_file",
            "read_file", "list_files", "close_sandbox"}
    check(want <= names, f"list_tools has {sorted(want)}", sorted(names))
    run_code = next(t for t in tools.tools if t.name == "run_code")
    check("language" in run_code.input_schema.get("properties", {}), "run_code has a schema",
          run_code.input_schema)

    langs = await session.call_tool("list_languages", {})
    check(not langs.is_error and "python" in text_of(langs), "list_languages", text_of(langs))

    r = await session.call_tool("run_code", {"language": "python", "code": "print(6 * 7)"})
    check(not r.is_error and "42" in text_of(r), "run_code python", text_of(r))
    check(r.structured_content and r.structured_content.get("stdout") == "42\n",
          "run_code structured content is the v1 answer", r.structured_content)

    c = "#include <stdio.h>\nint main(void) { printf(\"hi from c\\n\"); return 0; }\n"
    r = await session.call_tool("run_code", {"language": "c", "code": c})
    check(not r.is_error and "hi from c" in text_of(r), "run_code c (compiled)", text_of(r))

    r = await session.call_tool("run_code", {"language": "bash", "code": "echo oops >&2; exit 3"})
    check(not r.is_error and "exit code 3" in text_of(r) and "oops" in text_of(r),
          "a non-zero exit is a normal result", text_of(r))

    r = await session.call_tool("run_code", {"language": "cobol-9000", "code": "x"})
    check(r.is_error and "cobol-9000" in text_of(r), "an unknown language is a tool error",
          text_of(r))

    r = await session.call_tool("run_code", {"language": "python"})
    check(r.is_error or "code" in str(r), "a missing argument is an error, not a crash", r)

    sb = await session.call_tool("create_sandbox", {"template": "python", "timeout_s": 120})
    check(not sb.is_error, "create_sandbox", text_of(sb))
    sid = sb.structured_content["sandbox_id"]
    w = await session.call_tool("write_file", {"sandbox_id": sid, "path": "notes/a.txt",
                                                "content": "kept\n"})
    check(not w.is_error, "write_file", text_of(w))
    r = await session.call_tool("run_command", {"sandbox_id": sid,
                                                "command": "cat notes/a.txt; x=40; echo $((x+2)) > b.txt"})
    check(not r.is_error and "kept" in text_of(r), "run_command sees the file", text_of(r))
    r = await session.call_tool("read_file", {"sandbox_id": sid, "path": "/home/user/b.txt"})
    check(not r.is_error and text_of(r).strip() == "42", "read_file sees the command's file",
          text_of(r))
    r = await session.call_tool("list_files", {"sandbox_id": sid, "path": "/home/user"})
    check(not r.is_error and "b.txt" in text_of(r) and "notes" in text_of(r), "list_files",
          text_of(r))
    r = await session.call_tool("close_sandbox", {"sandbox_id": sid})
    check(not r.is_error, "close_sandbox", text_of(r))
    r = await session.call_tool("run_command", {"sandbox_id": sid, "command": "true"})
    check(r.is_error, "a closed sandbox is a tool error", text_of(r))

    if concurrent:
        t = time.monotonic()
        codes = [f"print({i} * {i})" for i in range(6)]
        results = await asyncio.gather(*[
            session.call_tool("run_code", {"language": "python", "code": code}) for code in codes
        ])
        for i, r in enumerate(results):
            check(not r.is_error and f"{i * i}" in text_of(r), f"concurrent call {i}", text_of(r))
        print(f"6 concurrent run_code calls in {time.monotonic() - t:.1f} s", flush=True)


async def main():
    mode = sys.argv[1]
    if mode == "http":
        async with streamable_http_client(sys.argv[2]) as streams:
            read, write = streams[0], streams[1]
            async with ClientSession(read, write) as session:
                await drive(session, concurrent=True)
    else:
        params = StdioServerParameters(command=sys.argv[2], args=["--server", sys.argv[3], "mcp"])
        async with stdio_client(params) as streams:
            read, write = streams[0], streams[1]
            async with ClientSession(read, write) as session:
                await drive(session, concurrent=True)
    print("all ok", flush=True)


asyncio.run(main())
