"""Drives the playground at BASE in Debian's Chromium through Selenium, as a person would: picks
languages, types code, runs it with the button and with Ctrl+Enter, reads what the page shows.

Usage: drive.py BASE SHOT_DIR. Prints "KILL-SERVER" when a long program is running and waits for
a line on stdin (the test kills the server), then checks the page says so. Ends with "all ok".
"""

import json
import sys
import time
import urllib.error
import urllib.request

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

BASE, SHOTS = sys.argv[1], sys.argv[2]
RUN_WAIT = 180  # seconds: a first run under emulation may restore or boot a VM


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print("ok:", what, flush=True)


# ---- the page's HTTP answers, before any browser -------------------------------------------
nonces = set()
for _ in range(2):
    with urllib.request.urlopen(BASE + "/") as r:
        html = r.read().decode()
        csp = r.headers["Content-Security-Policy"]
        frames = r.headers["X-Frame-Options"]
    nonce = html.split('name="csp-nonce" content="')[1].split('"')[0]
    nonces.add(nonce)
check("<title>Cloude playground</title>" in html, "GET / is the page")
check(csp and "default-src 'none'" in csp and "script-src 'self';" in csp
      and f"style-src 'self' 'nonce-{nonce}';" in csp and "unsafe" not in csp, f"a strict CSP: {csp}")
check(len(nonces) == 2 and len(nonce) >= 22, "a fresh nonce in every answer")
check(frames == "DENY", "no framing by default")
with urllib.request.urlopen(BASE + "/assets/app.js") as r:
    etag = r.headers["ETag"]
req = urllib.request.Request(BASE + "/assets/app.js", headers={"If-None-Match": etag})
try:
    urllib.request.urlopen(req)
    check(False, "304 for a known ETag")
except urllib.error.HTTPError as e:
    check(e.code == 304, f"304 for a known ETag (got {e.code})")
for path, ty in [("/assets/app.js", "text/javascript"), ("/assets/style.css", "text/css"),
                 ("/assets/examples.json", "application/json")]:
    with urllib.request.urlopen(BASE + path) as r:
        check(r.headers["Content-Type"].startswith(ty), f"{path} is {ty}")
try:
    urllib.request.urlopen(BASE + "/assets/../Cargo.toml")
    check(False, "unknown assets are 404")
except urllib.error.HTTPError as e:
    check(e.code == 404, f"unknown assets are 404 (got {e.code})")

# ---- the browser ---------------------------------------------------------------------------
opts = Options()
opts.binary_location = "/usr/bin/chromium"
for a in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
          "--window-size=1280,860", "--no-first-run", "--disable-extensions",
          "--disable-background-networking", "--disable-component-update",
          "--disable-default-apps", "--disable-sync"]:
    opts.add_argument(a)
opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
driver.set_page_load_timeout(60)


def by_label(label):
    return driver.find_element(By.CSS_SELECTOR, f'[aria-label="{label}"]')


def wait(cond, what, timeout=RUN_WAIT):
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: cond())
    except Exception:
        raise AssertionError(f"timed out waiting for {what}; status {status()!r}, "
                             f"notice {notice()!r}, output {output()!r}")


def status():
    return driver.find_element(By.ID, "status").text


def notice():
    n = driver.find_element(By.ID, "notice")
    return n.text if n.is_displayed() else ""


def output():
    return by_label("Output").text


def code():
    return driver.execute_script(
        "return [...document.querySelectorAll('.cm-content .cm-line')].map(l => l.textContent).join('\\n')")


def type_code(text):
    ed = by_label("Code")
    ed.click()
    ed.send_keys(Keys.CONTROL, "a")
    ed.send_keys(Keys.DELETE)
    ed.send_keys(text)
    check(code() == text, f"the editor holds what was typed: {code()!r}")


def set_field(label, text):
    f = by_label(label)
    f.clear()
    if text:
        f.send_keys(text)


def pick(language):
    Select(by_label("Language")).select_by_value(language)


def finished():
    s = status()
    return s.startswith("Exited") or s.startswith("Killed") or s.startswith("Compilation") \
        or s.startswith("Timed") or s in ("Not run", "Disconnected")


def severe_logs():
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


try:
    driver.get(BASE + "/")
    wait(lambda: len(Select(by_label("Language")).options) > 1, "the language list")
    langs = [o.get_attribute("value") for o in Select(by_label("Language")).options]
    check("python" in langs and "c" in langs, f"languages from /v1/languages: {len(langs)}")
    for label in ["Language", "Code", "Input", "Run", "Output"]:
        check(by_label(label) is not None, f"a control labelled {label!r}")
    check(Select(by_label("Language")).first_selected_option.get_attribute("value") == "python",
          "python first")
    check("sys.stdin" in code(), "the python example program is in the editor")

    # 1. The example as it comes: its input (21) and arguments, stdout, stderr, exit code 3.
    by_label("Run").click()
    wait(finished, "the example's result")
    check(status() == "Exited with code 3", f"the example exits 3: {status()}")
    # (Python buffers stdout into a pipe until exit, stderr not: stderr may come first.)
    out = "".join(e.text + "\n" for e in driver.find_elements(By.CSS_SELECTOR, "#output .stdout"))
    check(out.startswith("42\nalpha\nbeta gamma"), f"its stdout: {out!r}")
    err = driver.find_elements(By.CSS_SELECTOR, "#output .stderr")
    check(err and "conformance-stderr" in err[0].text, "its stderr, told apart")
    timings = driver.find_element(By.ID, "timings").text
    check("Queue" in timings and "VM" in timings and "CPU time" in timings and "Memory" in timings,
          f"timings shown: {timings!r}")
    driver.save_screenshot(f"{SHOTS}/playground-example.png")

    # 2. Typed code, run with Ctrl+Enter.
    set_field("Input", "")
    set_field("Arguments", "")
    type_code('print("hello from the playground")')
    by_label("Code").send_keys(Keys.CONTROL, Keys.ENTER)
    wait(finished, "hello's result")
    check(status() == "Exited with code 0", f"hello exits 0: {status()}")
    check(output() == "hello from the playground", f"hello's output: {output()!r}")

    # 3. Output arrives while the program runs.
    type_code("import time; [(print(i, flush=True), time.sleep(1)) for i in range(4)]")
    by_label("Run").click()
    wait(lambda: output().startswith("0"), "the first line")
    seen_at = status()
    check(seen_at == "Running…", f"the first line shows while it runs (status {seen_at!r})")
    wait(finished, "the counting program's end")
    check(output().split() == ["0", "1", "2", "3"], f"then all of it: {output()!r}")

    # 4. stderr and a non-zero exit.
    type_code('import sys; print("to stdout"); print("oops", file=sys.stderr); sys.exit(7)')
    by_label("Run").click()
    wait(finished, "the failing program")
    check(status() == "Exited with code 7", f"exit 7 shown: {status()}")
    err = driver.find_elements(By.CSS_SELECTOR, "#output .stderr")
    check(err and err[0].text.strip() == "oops", "stderr in its own colour")
    check(driver.find_element(By.ID, "status").get_attribute("data-status") == "bad",
          "a non-zero exit is marked")

    # 5. Stop a program that would run for a minute.
    type_code("import time; print('started', flush=True); time.sleep(60)")
    by_label("Run").click()
    wait(lambda: "started" in output(), "the long program to start")
    t = time.time()
    by_label("Stop").click()
    wait(finished, "the stopped program", timeout=30)
    check(status().startswith("Killed by SIGKILL"), f"Stop kills it: {status()} "
          f"in {time.time() - t:.1f} s")

    # Highlighting: the python example's keywords are marked up (a variant entry too).
    check(len(driver.find_elements(By.CSS_SELECTOR, ".cm-content span[class]")) > 3,
          "python is highlighted")
    if "python-data" in langs:
        pick("python-data")
        check(len(driver.find_elements(By.CSS_SELECTOR, ".cm-content span[class]")) > 3,
              "python-data is highlighted as python")

    # 6. A C compile error.
    pick("c")
    check("scanf" in code(), "the C example replaces the untouched python example")
    type_code("int main() { return undeclared_thing; }")
    by_label("Run").click()
    wait(finished, "the C compile")
    check(status() == "Compilation failed", f"compile error shown: {status()}")
    comp = driver.find_elements(By.CSS_SELECTOR, "#output .compile")
    check(comp and "undeclared_thing" in "".join(c.text for c in comp),
          f"the compiler's message: {output()!r}")
    driver.save_screenshot(f"{SHOTS}/playground-compile-error.png")

    # 7. Share by link: a fresh page load of the link has the same language, code and input.
    pick("python")
    shared_code = 'name = input(); print(f"hi {name}")'
    type_code(shared_code)
    set_field("Input", "Ada")
    by_label("Share").click()
    link = by_label("Share link").get_attribute("value")
    check("#language=python&code=" in link, f"a link with the program in its fragment: {link}")
    driver.get("about:blank")
    driver.get(link)
    wait(lambda: len(Select(by_label("Language")).options) > 1, "the shared page")
    wait(lambda: code() == shared_code, "the shared code", timeout=10)
    check(Select(by_label("Language")).first_selected_option.get_attribute("value") == "python",
          "the shared language")
    check(by_label("Input").get_attribute("value") == "Ada", "the shared input")
    by_label("Run").click()
    wait(finished, "the shared program")
    check(output() == "hi Ada", f"the shared program runs: {output()!r}")

    # 8. No script or style was refused by the CSP, nothing failed to load.
    logs = severe_logs()
    check(not logs, f"no errors in the browser console: {logs}")

    # 9. 375 px wide, then the dark scheme.
    driver.set_window_size(375, 812)
    time.sleep(0.3)
    width = driver.execute_script("return document.documentElement.scrollWidth")
    inner = driver.execute_script("return window.innerWidth")
    check(width <= inner, f"no sideways scrolling at {inner} px ({width} px of content)")
    check(by_label("Run").is_displayed() and by_label("Output").is_displayed(),
          "Run and Output are on screen at 375 px")
    driver.save_screenshot(f"{SHOTS}/playground-375px.png")
    driver.set_window_size(1280, 860)
    driver.execute_cdp_cmd("Emulation.setEmulatedMedia", {
        "features": [{"name": "prefers-color-scheme", "value": "dark"}]})
    time.sleep(0.3)
    bg = driver.execute_script(
        "return getComputedStyle(document.querySelector('.cm-editor')).backgroundColor")
    check(bg not in ("rgb(255, 255, 255)", "rgba(0, 0, 0, 0)"), f"a dark editor: {bg}")
    driver.save_screenshot(f"{SHOTS}/playground-dark.png")

    # 10. Every VM busy and no room in the queue (the test's server has 2 VMs and max_queue 0):
    # a sentence with the time to wait, not a failure.
    def healthz():
        with urllib.request.urlopen(BASE + "/healthz") as r:
            return json.load(r)

    wait(lambda: healthz()["vms_running"] == 0, "the VMs of earlier runs to go", timeout=30)
    import threading
    hold = json.dumps({"language": "python", "code": "import time; time.sleep(20)",
                       "timeout_ms": 60000}).encode()
    holders = [threading.Thread(target=lambda: urllib.request.urlopen(urllib.request.Request(
        BASE + "/v1/executions", data=hold, headers={"Content-Type": "application/json"}),
        timeout=120).read()) for _ in range(2)]
    for h in holders:
        h.start()
    wait(lambda: healthz()["vms_running"] == 2, "two VMs held by other clients", timeout=60)
    by_label("Run").click()
    wait(lambda: "busy" in notice(), "the busy sentence", timeout=30)
    check("Try again in 1 s" in notice(), f"the sentence names the wait: {notice()!r}")
    check(status() == "Not run", f"status when busy: {status()}")
    for h in holders:
        h.join()

    # 11. The server goes away mid-run: the page says so.
    type_code("import time; print('long', flush=True); time.sleep(120)")
    by_label("Run").click()
    wait(lambda: "long" in output(), "the program before the kill")
    print("KILL-SERVER", flush=True)
    sys.stdin.readline()
    wait(finished, "the page to notice", timeout=30)
    check(status() == "Disconnected", f"status after the kill: {status()}")
    check("connection to the server was lost" in notice(), f"a sentence: {notice()!r}")
    driver.save_screenshot(f"{SHOTS}/playground-server-gone.png")
    # Run again with the server gone: a sentence, not a silent button.
    by_label("Run").click()
    wait(lambda: "could not be reached" in notice(), "the unreachable server's sentence", timeout=30)
    check(status() == "Disconnected", f"status when nothing answers: {status()}")
    print("all ok", flush=True)
finally:
    driver.quit()
