#!/usr/bin/env python3
"""web-proxy.py PORT UPSTREAM CA CERT KEY: a plain-HTTP reverse proxy on
127.0.0.1:PORT to the HTTPS web listener UPSTREAM (https://HOST:PORT),
presenting CERT/KEY as its client certificate, as an administrator's
reverse proxy would.  Headless Chromium cannot pick a client certificate
without a system NSS database and policy, so web-dashboard.sh loads the
dashboard through this.  GET only, like the listener."""
import http.server
import ssl
import sys
import urllib.error
import urllib.request

port, upstream, ca, cert, key = sys.argv[1:6]
ctx = ssl.create_default_context(cafile=ca)
ctx.check_hostname = False  # the test reaches the daemon by 127.0.0.1
ctx.load_cert_chain(cert, key)


class Proxy(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        try:
            with urllib.request.urlopen(upstream + self.path, context=ctx,
                                        timeout=10) as r:
                status, headers, body = r.status, r.headers, r.read()
        except urllib.error.HTTPError as e:
            status, headers, body = e.code, e.headers, e.read()
        self.send_response(status)
        for k in ('Content-Type', 'Content-Security-Policy', 'Cache-Control'):
            if headers.get(k):
                self.send_header(k, headers[k])
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


http.server.ThreadingHTTPServer(('127.0.0.1', int(port)),
                                Proxy).serve_forever()
