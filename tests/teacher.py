"""A local stand-in for an OpenAI-compatible chat endpoint (the recipes' teacher), for tests."""

import contextlib
import http.server
import json
import threading


@contextlib.contextmanager
def serve(reply):
    """Yield the base URL of a local endpoint; `reply(prompt)` gives the answer text, or None for an HTTP 500."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            assert self.path == "/v1/chat/completions"
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            text = reply(body["messages"][0]["content"])
            if text is None:
                self.send_response(500)
                self.end_headers()
                return
            message = {"role": "assistant", "content": text}
            payload = json.dumps({"choices": [{"message": message, "finish_reason": "stop"}]})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(payload.encode())

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        thread.join(timeout=10)
