"""Heavy runtimes within their limits: a hello world three times at once per language, as a
user would (v1 API, timeout_ms 20000, the language's default compile limit), after one untimed
run (image and snapshot). Usage: three_at_once.py SERVER_URL LANG[,LANG...] [CONCURRENCY].
Prints each run: (ok, wall s, status, -, run_ms incl. compile, message)."""
import json, sys, threading, time, urllib.request, pathlib
SERVER = sys.argv[1]
LANGS = sys.argv[2].split(",")
CONC = int(sys.argv[3]) if len(sys.argv) > 3 else 3
HELLO = {
 "typescript": ("main.ts", 'const who: string = "world";\nconsole.log(`hello ${who}`);\n'),
 "kotlin": ("main.kt", 'fun main() {\n    println("hello world")\n}\n'),
 "scala": ("Main.scala", 'object Main {\n  def main(args: Array[String]): Unit = println("hello world")\n}\n'),
 "groovy": ("main.groovy", 'println "hello world"\n'),
 "clojure": ("main.clj", '(println "hello world")\n'),
 "elixir": ("main.exs", 'IO.puts "hello world"\n'),
 "racket": ("main.rkt", '#lang racket\n(displayln "hello world")\n'),
 "d": ("main.d", 'import std.stdio;\nvoid main() { writeln("hello world"); }\n'),
 "nim": ("main.nim", 'echo "hello world"\n'),
 "crystal": ("main.cr", 'puts "hello world"\n'),
 "java": ("Main.java", 'public class Main { public static void main(String[] a) { System.out.println("hello world"); } }\n'),
}
def run(lang, out, i):
    name, code = HELLO[lang]
    body = json.dumps({"language": lang, "timeout_ms": 20000, "files": [{"name": name, "content": code}]}).encode()
    t = time.time()
    try:
        r = urllib.request.urlopen(urllib.request.Request(SERVER + "/v1/executions", body, {"content-type": "application/json"}), timeout=600)
        v = json.loads(r.read())
    except urllib.error.HTTPError as e:
        v = {"status": f"http {e.code}", "message": e.read()[:200].decode()}
    except Exception as e:
        v = {"status": f"error {e}"}
    dt = time.time() - t
    ok = v.get("status") == "ok" and "hello world" in (v.get("stdout") or "")
    out[i] = (ok, round(dt, 1), v.get("status"), (v.get("compile") or {}).get("run_ms") if isinstance(v.get("compile"), dict) else None, v.get("timings", {}).get("run_ms"), (v.get("message") or v.get("stderr") or "")[:160])
res = {}
for lang in LANGS:
    warm = [None]
    run(lang, warm, 0)  # image + template, untimed
    out = [None] * CONC
    th = [threading.Thread(target=run, args=(lang, out, i)) for i in range(CONC)]
    [x.start() for x in th]; [x.join() for x in th]
    res[lang] = {"warmup": warm[0], "runs": out}
    print(lang, "warm-up:", warm[0], flush=True)
    for o in out: print("   ", o, flush=True)
print(json.dumps(res))
