"""A small agent that talks HTTP with a real client library, for the request capture's tests.

    http_client.py CLIENT HTTPS_BASE HTTP_BASE CA_FILE STEP [STEP ...]

CLIENT is urllib, requests, httpx, curl or openai (a connection per request), or requests-session
or httpx-session (one kept-alive connection for every request to a server). A STEP is
``METHOD:PATH`` sent to the HTTPS base, ``plain-METHOD:PATH`` sent to the plaintext base, or
``chat:MODEL`` (a chat completion with the official openai package, or an OpenAI-shaped POST with
the other clients). Every request
carries credentials the capture must never keep. Exit status 0 when every request was answered.
"""

import json
import subprocess
import sys

SECRET = "sk-test-SECRET-do-not-keep-0123456789"
COOKIE = "session=COOKIE-do-not-keep"
SESSIONS = {}  # client -> its session, for the kept-alive clients


def send(client, method, url, ca, body=None):
    headers = {"Authorization": f"Bearer {SECRET}", "Cookie": COOKIE, "x-api-key": SECRET}
    if body is not None:
        headers["Content-Type"] = "application/json"
    data = json.dumps(body).encode() if body is not None else None
    if client == "urllib":
        import ssl
        import urllib.error
        import urllib.request
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        ctx = ssl.create_default_context(cafile=ca)
        try:
            with urllib.request.urlopen(req, context=ctx) as r:
                r.read()
                return r.status
        except urllib.error.HTTPError as e:  # a 4xx answer is an answer
            e.read()
            return e.code
    if client == "requests":
        import requests
        r = requests.request(method, url, data=data, headers=headers, verify=ca, timeout=10)
        return r.status_code
    if client in ("requests-session", "httpx-session"):
        if client not in SESSIONS:
            if client == "requests-session":
                import requests
                SESSIONS[client] = requests.Session()
            else:
                import httpx
                SESSIONS[client] = httpx.Client(verify=ca, timeout=10)
        extra = {"verify": ca} if client == "requests-session" else {}
        r = SESSIONS[client].request(method, url, data=data, headers=headers, timeout=10, **extra)
        r.content  # the whole body, read as the client reads it
        return r.status_code
    if client == "httpx":
        import httpx
        with httpx.Client(verify=ca, timeout=10) as c:
            return c.request(method, url, content=data, headers=headers).status_code
    if client == "curl":
        cmd = ["curl", "-sS", "--http1.1", "--cacert", ca, "-o", "/dev/null", "-w", "%{http_code}", "-X", method]
        for k, v in headers.items():
            cmd += ["-H", f"{k}: {v}"]
        if data is not None:
            cmd += ["--data-binary", data.decode()]
        return int(subprocess.run(cmd + [url], capture_output=True, text=True, check=True).stdout)
    raise SystemExit(f"unknown client {client}")


def main(argv):
    client, https, http, ca, *steps = argv
    for step in steps:
        if step.startswith("chat:"):
            model = step.split(":", 1)[1]
            if client == "openai":
                import httpx
                import openai
                c = openai.OpenAI(api_key=SECRET, base_url=f"{https}/v1", max_retries=0,
                                  http_client=openai.DefaultHttpxClient(verify=ca))
                out = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
                assert out.choices[0].message.content == "ok"
                del httpx
            else:
                status = send(client, "POST", f"{https}/v1/chat/completions", ca,
                              {"model": model, "messages": [{"role": "user", "content": "hi"}]})
                assert status == 200, status
            continue
        base = https
        if step.startswith("plain-"):
            base, step = http, step[len("plain-"):]
        method, path = step.split(":", 1)
        status = send(client, method, base + path, ca)
        assert status < 500, (step, status)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
