#!/usr/bin/env python3
"""Traffic for Palisade's kernel tests: an echo server and clients that report
whether a round trip succeeded. Run inside test namespaces via nsenter.

  netprobe.py serve tcp|udp ADDR PORT            echo until killed
  netprobe.py connect tcp|udp ADDR PORT [TIMEOUT [SOURCE]]
                                                 exit 0 if an echo came back
                                                 (the message: $PROBE_MESSAGE or "palisade-probe")
  netprobe.py whoami ADDR PORT NAME              answer every TCP connection with NAME
  netprobe.py ask ADDR PORT [TIMEOUT]            print what the server said (exit 1 on failure)
  netprobe.py http DIR PORT                      HTTP/1.1 (keep-alive) file server for DIR
  netprobe.py hold ADDR PORT SECONDS INTERVAL    one TCP connection, a round trip
                                                 every INTERVAL; prints ok/failed counts
"""
import os, socket, sys, threading, time

def family(addr):
    return socket.AF_INET6 if ":" in addr else socket.AF_INET

def serve(proto, addr, port):
    if proto == "tcp":
        s = socket.socket(family(addr), socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((addr, port)); s.listen(512)
        print("ready", flush=True)
        def handle(c):
            try:
                while True:
                    d = c.recv(65536)
                    if not d: break
                    c.sendall(d)
            except OSError:
                pass
            finally:
                c.close()
        while True:
            c, _ = s.accept()
            threading.Thread(target=handle, args=(c,), daemon=True).start()
    else:
        s = socket.socket(family(addr), socket.SOCK_DGRAM)
        s.bind((addr, port))
        print("ready", flush=True)
        while True:
            d, peer = s.recvfrom(65536)
            s.sendto(d, peer)

def connect(proto, addr, port, timeout, source=None):
    msg = os.environ.get("PROBE_MESSAGE", "palisade-probe").encode()
    try:
        if proto == "tcp":
            s = socket.create_connection((addr, port), timeout=timeout,
                                         source_address=(source, 0) if source else None)
            s.sendall(msg)
            got = s.recv(len(msg))
        else:
            s = socket.socket(family(addr), socket.SOCK_DGRAM)
            if source: s.bind((source, 0))
            s.settimeout(timeout)
            s.sendto(msg, (addr, port))
            got, _ = s.recvfrom(65536)
        s.close()
        if got == msg:
            print("ok"); return 0
        print("bad-echo"); return 1
    except (OSError, socket.timeout) as e:
        print("failed: %s" % e); return 1

def whoami(addr, port, name):
    s = socket.socket(family(addr), socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, port)); s.listen(512)
    print("ready", flush=True)
    while True:
        c, _ = s.accept()
        try: c.sendall(name.encode())
        except OSError: pass
        c.close()

def ask(addr, port, timeout):
    try:
        s = socket.create_connection((addr, port), timeout=timeout)
        got = b""
        while True:
            d = s.recv(1024)
            if not d: break
            got += d
        s.close()
        print(got.decode()); return 0 if got else 1
    except (OSError, socket.timeout) as e:
        print("failed: %s" % e); return 1

def http(directory, port):
    import functools, http.server
    class H(http.server.SimpleHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        def log_message(self, *a): pass
    srv = http.server.ThreadingHTTPServer(("0.0.0.0", port), functools.partial(H, directory=directory))
    print("ready", flush=True)
    srv.serve_forever()

def sink(port):
    """HTTP/1.1: PUT/POST bodies are read (Content-Length or chunked) in
    1 MiB pieces and dropped; the answer is how many bytes arrived."""
    import http.server
    class H(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        def log_message(self, *a): pass
        def do_PUT(self):
            n = 0
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                while True:
                    size = int(self.rfile.readline().split(b";")[0], 16)
                    if size == 0:
                        self.rfile.readline(); break
                    left = size
                    while left:
                        d = self.rfile.read(min(left, 1 << 20)); left -= len(d); n += len(d)
                    self.rfile.readline()
            else:
                left = int(self.headers.get("Content-Length", "0"))
                while left:
                    d = self.rfile.read(min(left, 1 << 20))
                    if not d: break
                    left -= len(d); n += len(d)
            body = ("received %d\n" % n).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        do_POST = do_PUT
    srv = http.server.ThreadingHTTPServer(("0.0.0.0", port), H)
    print("ready", flush=True)
    srv.serve_forever()

def hold(addr, port, seconds, interval):
    ok = failed = 0
    s = socket.create_connection((addr, port), timeout=2)
    s.settimeout(1.0)
    end = time.time() + seconds
    while time.time() < end:
        try:
            s.sendall(b"x"); 
            if s.recv(1) == b"x": ok += 1
            else: failed += 1; break
        except OSError:
            failed += 1; break
        time.sleep(interval)
    print("ok=%d failed=%d" % (ok, failed), flush=True)
    return 0 if failed == 0 else 1

if __name__ == "__main__":
    a = sys.argv[1:]
    if a[0] == "serve": serve(a[1], a[2], int(a[3]))
    elif a[0] == "connect": sys.exit(connect(a[1], a[2], int(a[3]), float(a[4]) if len(a) > 4 else 1.0, a[5] if len(a) > 5 else None))
    elif a[0] == "whoami": whoami(a[1], int(a[2]), a[3])
    elif a[0] == "ask": sys.exit(ask(a[1], int(a[2]), float(a[3]) if len(a) > 3 else 2.0))
    elif a[0] == "http": http(a[1], int(a[2]))
    elif a[0] == "sink": sink(int(a[1]))
    elif a[0] == "hold": sys.exit(hold(a[1], int(a[2]), float(a[3]), float(a[4])))
    else: sys.exit(2)
