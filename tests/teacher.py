"""Local stand-ins for the servers the recipes talk to, for tests: an OpenAI-compatible chat endpoint
(the math teacher, the evaluated model) and a static file (a pinned download)."""

import contextlib
import http.server
import json
import threading


@contextlib.contextmanager
def serve(reply):
    """Yield the base URL of a local endpoint; `reply(prompt)` gives the answer text, the whole assistant
    message (a dict, e.g. with `reasoning_content`), or None for an HTTP 500."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            assert self.path == "/v1/chat/completions"
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            text = reply(body["messages"][0]["content"])
            if text is None:
                self.send_response(500)
                self.end_headers()
                return
            message = text if isinstance(text, dict) else {"role": "assistant", "content": text}
            payload = json.dumps({"choices": [{"message": message, "finish_reason": "stop"}]})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(payload.encode())

        def log_message(self, *a):
            pass

    with _running(Handler) as port:
        yield f"http://127.0.0.1:{port}/v1"


@contextlib.contextmanager
def static(data: bytes):
    """Yield a URL that serves `data`."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *a):
            pass

    with _running(Handler) as port:
        yield f"http://127.0.0.1:{port}/file.json"


@contextlib.contextmanager
def _running(handler):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        thread.join(timeout=10)
