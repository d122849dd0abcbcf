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

def h2raw(case, addr, port):
    """Sends one hand-made HTTP/2 protocol violation (or a valid request) with
    prior knowledge and prints what came back, leaving out SETTINGS, PING and
    WINDOW_UPDATE: e.g. "GOAWAY:PROTOCOL_ERROR closed" (a GOAWAY is followed by
    whether the peer then closed, or "still-open"), "RST_STREAM:1:PROTOCOL_ERROR",
    "HEADERS:1 DATA:1", or "closed" when the connection ended silently."""
    import struct
    names = {0: "DATA", 1: "HEADERS", 3: "RST_STREAM", 4: "SETTINGS", 6: "PING", 7: "GOAWAY", 8: "WINDOW_UPDATE"}
    codes = {0: "NO_ERROR", 1: "PROTOCOL_ERROR", 3: "FLOW_CONTROL_ERROR", 5: "STREAM_CLOSED", 6: "FRAME_SIZE_ERROR",
             7: "REFUSED_STREAM", 8: "CANCEL", 9: "COMPRESSION_ERROR"}
    def frame(t, flags, stream, payload=b""):
        return struct.pack(">I", len(payload))[1:] + bytes([t, flags]) + struct.pack(">I", stream) + payload
    def lit(name, value):   # literal header field without indexing, new name
        return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0)
    get = b"\x82\x86\x84" + lit(b":authority", b"h2raw")   # GET http /
    cases = {
        "valid": preface + frame(1, 0x5, 1, get),
        "bad-preface": b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n" + frame(4, 0, 0),
        "not-a-preface": b"INVALID CONNECTION PREFACE\r\n\r\n",
        "headers-on-stream-0": preface + frame(1, 0x5, 0, get),
        "uppercase-header": preface + frame(1, 0x5, 1, get + lit(b"X-Upper", b"v")),
        "connection-header": preface + frame(1, 0x5, 1, get + lit(b"connection", b"keep-alive")),
        "content-length-mismatch": preface + frame(1, 0x4, 1, b"\x83\x86\x84" + lit(b":authority", b"h2raw") + lit(b"content-length", b"10"))
                                   + frame(0, 0x1, 1, b"abc"),
        "data-on-idle-stream": preface + frame(0, 0x1, 3, b"abc"),
        "window-update-zero": preface + frame(8, 0, 0, struct.pack(">I", 0)),
        "oversized-frame": preface + frame(0, 0, 1, b"x" * 20000),
        "settings-window-too-big": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0, struct.pack(">HI", 4, 1 << 31)),
        "rst-on-idle-stream": preface + frame(3, 0, 5, struct.pack(">I", 8)),
        "missing-method": preface + frame(1, 0x5, 1, b"\x86\x84" + lit(b":authority", b"h2raw")),
        "data-after-end-stream": preface + frame(1, 0x5, 1, get) + frame(0, 0x1, 1, b"late"),
        "ping-wrong-length": preface + frame(6, 0, 0, b"1234567"),
        # RFC 9113 8.3.1: a Host naming another entity than :authority, or two Hosts.
        "host-not-authority": preface + frame(1, 0x5, 1, get + lit(b"host", b"elsewhere")),
        "two-hosts": preface + frame(1, 0x5, 1, get + lit(b"host", b"h2raw") + lit(b"host", b"h2raw")),
        "host-same-authority": preface + frame(1, 0x5, 1, get + lit(b"host", b"H2RAW")),
    }
    s = socket.create_connection((addr, port), timeout=3)
    s.sendall(cases[case])
    got, out = b"", []
    try:
        while True:
            d = s.recv(65536)
            if not d: break
            got += d
            while len(got) >= 9:
                n = struct.unpack(">I", b"\x00" + got[:3])[0]
                if len(got) < 9 + n: break
                t, stream, payload = got[3], struct.unpack(">I", got[5:9])[0] & 0x7fffffff, got[9:9 + n]
                got = got[9 + n:]
                if t == 7: out.append("GOAWAY:" + codes.get(struct.unpack(">I", payload[4:8])[0], "?"))
                elif t == 3: out.append("RST_STREAM:%d:%s" % (stream, codes.get(struct.unpack(">I", payload[:4])[0], "?")))
                elif t in (0, 1): out.append("%s:%d" % (names[t], stream))
                elif t not in (4, 6, 8): out.append(names.get(t, str(t)))
                if t in (3, 7): break   # the first error is the answer
            if any(o.startswith(("GOAWAY", "RST_STREAM")) for o in out) or "DATA:1" in out: break
    except OSError:
        pass
    # After a connection error (GOAWAY) the peer must also close (RFC 9113 5.4.1).
    if out and out[-1].startswith("GOAWAY"):
        s.settimeout(2)
        try:
            while s.recv(65536):
                pass
            out.append("closed")
        except socket.timeout:
            out.append("still-open")
        except OSError:
            out.append("closed")
    print(" ".join(out) or "closed")

H1_CASES = {
    # HTTP/1.0 with chunked: de-chunked, the body reads as "end of chunks, then GET /private/b.txt".
    "te-http10-smuggle": b"POST /public/a.txt HTTP/1.0\r\nHost: b\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"2d\r\n0\r\n\r\nGET /private/b.txt HTTP/1.1\r\nHost: b\r\n\r\n\r\n0\r\n\r\n",
    # A HEAD's response has a Content-Length and no body: the GET's answer follows at once.
    "head-then-get": b"HEAD /public/a.txt HTTP/1.1\r\nHost: b\r\n\r\nGET /public/a.txt HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n",
    "header-too-large": b"GET /public/a.txt HTTP/1.1\r\nHost: b\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n",
    "too-many-headers": b"GET /public/a.txt HTTP/1.1\r\nHost: b\r\n" + b"".join(b"X-H%d: 1\r\n" % i for i in range(300)) + b"\r\n",
    # name: (bytes sent; the second request, if any, must never reach the workload)
    "valid": b"GET /public/a.txt HTTP/1.1\r\nHost: b\r\n\r\n",
    "cl-and-te": b"POST /public/a.txt HTTP/1.1\r\nHost: b\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /private/b.txt HTTP/1.1\r\nHost: b\r\n\r\n",
    "te-chunked-not-last": b"POST /public/a.txt HTTP/1.1\r\nHost: b\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\nGET /private/b.txt HTTP/1.1\r\nHost: b\r\n\r\n",
    "te-unknown": b"POST /public/a.txt HTTP/1.1\r\nHost: b\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\nGET /private/b.txt HTTP/1.1\r\nHost: b\r\n\r\n",
    "te-space-before-colon": b"POST /public/a.txt HTTP/1.1\r\nHost: b\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\nGET /private/b.txt HTTP/1.1\r\nHost: b\r\n\r\n",
    "te-obs-fold": b"POST /public/a.txt HTTP/1.1\r\nHost: b\r\nTransfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\nGET /private/b.txt HTTP/1.1\r\nHost: b\r\n\r\n",
    "cl-twice-differing": b"POST /public/a.txt HTTP/1.1\r\nHost: b\r\nContent-Length: 0\r\nContent-Length: 44\r\n\r\nGET /private/b.txt HTTP/1.1\r\nHost: b\r\n\r\n",
    "cl-list": b"POST /public/a.txt HTTP/1.1\r\nHost: b\r\nContent-Length: 0, 44\r\n\r\nGET /private/b.txt HTTP/1.1\r\nHost: b\r\n\r\n",
    "cl-plus-sign": b"POST /public/a.txt HTTP/1.1\r\nHost: b\r\nContent-Length: +44\r\n\r\nGET /private/b.txt HTTP/1.1\r\nHost: b\r\n\r\n",
    "chunk-size-hex-prefix": b"POST /public/a.txt HTTP/1.1\r\nHost: b\r\nTransfer-Encoding: chunked\r\n\r\n0x2c\r\nGET /private/b.txt HTTP/1.1\r\nHost: b\r\n\r\n\r\n0\r\n\r\n",
    "host-twice": b"GET /public/a.txt HTTP/1.1\r\nHost: b\r\nHost: other\r\n\r\n",
    "host-missing": b"GET /public/a.txt HTTP/1.1\r\n\r\n",
    "nul-in-header": b"GET /public/a.txt HTTP/1.1\r\nHost: b\r\nX-A: a\x00b\r\n\r\n",
    "absolute-form-other-host": b"GET http://other/private/b.txt HTTP/1.1\r\nHost: b\r\n\r\n",
}


def h1raw(case, addr, port):
    """Sends one hand-made HTTP/1.1 request (see H1_CASES) and prints the
    status codes that came back, in order ("400", "200 403", ...), or
    "closed" when the connection ended with no answer."""
    s = socket.create_connection((addr, port), timeout=3)
    s.sendall(H1_CASES[case])
    print(" ".join(status_codes(read_until_closed(s, then_wait=0.5))) or "closed")

def read_until_closed(s, then_wait=None):
    """What the peer sends until it closes (or an error, or, with then_wait,
    that long without more once something came)."""
    got = b""
    try:
        while True:
            d = s.recv(65536)
            if not d: break
            got += d
            if then_wait: s.settimeout(then_wait)
    except OSError:
        pass
    return got

def status_codes(got):
    return [line.split(b" ")[1].decode() for line in got.split(b"\r\n") if line.startswith(b"HTTP/1.1 ") and len(line.split(b" ")) > 1]


def h1slow(mode, addr, port, seconds):
    """A slow HTTP/1.1 caller: "head" sends a request head one header line
    every 0.3 s, "body" sends a head announcing 1,000 body bytes, 10 of them,
    then nothing. Prints the status that came back (or "closed") and after
    how many seconds the connection ended ("408 1.3"), or "still-open"."""
    s = socket.create_connection((addr, port), timeout=seconds)
    start = time.time()
    if mode == "head":
        s.sendall(b"GET /public/a.txt HTTP/1.1\r\nHost: slow\r\n")
        s.setblocking(False)
        got = b""
        while time.time() - start < seconds:
            try:
                s.sendall(b"X-Slow: 1\r\n")
            except OSError:
                break
            time.sleep(0.3)
            try:
                d = s.recv(65536)
                if not d: break
                got += d
            except BlockingIOError:
                pass
            except OSError:
                break
    else:
        s.sendall(b"POST /public/a.txt HTTP/1.1\r\nHost: slow\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
        got = read_until_closed(s)
    took = time.time() - start
    if took >= seconds:
        print("still-open"); return
    print("%s %.1f" % (" ".join(status_codes(got)) or "closed", took))

def serve_each(port, serve_one):
    """Listens on 127.0.0.1:port, prints "ready", and hands every
    connection to serve_one on a thread of its own."""
    srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port)); srv.listen(16)
    print("ready", flush=True)
    while True:
        c, _ = srv.accept()
        threading.Thread(target=serve_one, args=(c,), daemon=True).start()


def read_head(c):
    """Bytes from c up to and past the end of an HTTP/1.1 head, or None if
    the peer closed first."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        d = c.recv(65536)
        if not d: return None
        buf += d
    return buf


WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def ws_frame(opcode, payload, mask):
    import struct
    head = bytes([0x80 | opcode])
    n = len(payload)
    m = 0x80 if mask else 0
    head += bytes([m | n]) if n < 126 else (bytes([m | 126]) + struct.pack(">H", n) if n < 65536 else bytes([m | 127]) + struct.pack(">Q", n))
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def ws_read(sock, buf):
    """One frame from sock: (opcode, payload, rest of buf) or None at EOF."""
    import struct
    def need(n):
        nonlocal buf
        while len(buf) < n:
            d = sock.recv(65536)
            if not d: return False
            buf += d
        return True
    if not need(2): return None
    opcode, n, masked = buf[0] & 0x0F, buf[1] & 0x7F, buf[1] & 0x80
    off = 2
    if n == 126:
        if not need(4): return None
        n = struct.unpack(">H", buf[2:4])[0]; off = 4
    elif n == 127:
        if not need(10): return None
        n = struct.unpack(">Q", buf[2:10])[0]; off = 10
    key = b""
    if masked:
        if not need(off + 4): return None
        key = buf[off:off + 4]; off += 4
    if not need(off + n): return None
    payload = buf[off:off + n]
    if masked: payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return opcode, payload, buf[off + n:]


def wsecho(port):
    """A WebSocket server (RFC 6455) on 127.0.0.1: answers the handshake,
    sends a text frame "hello" in the same write as the 101, then echoes
    every frame it gets."""
    import base64, hashlib
    def serve_one(c):
        try:
            buf = read_head(c)
            if buf is None: return
            head, buf = buf.split(b"\r\n\r\n", 1)
            key = [l.split(b":", 1)[1].strip() for l in head.split(b"\r\n") if l.lower().startswith(b"sec-websocket-key:")]
            if not key:
                c.sendall(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n"); return
            accept = base64.b64encode(hashlib.sha1(key[0] + WS_GUID).digest())
            c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: " + accept
                      + b"\r\n\r\n" + ws_frame(1, b"hello", False))
            while True:
                f = ws_read(c, buf)
                if f is None: return
                opcode, payload, buf = f
                c.sendall(ws_frame(opcode, payload, False))
                if opcode == 8: return
        except OSError:
            pass
        finally:
            c.close()
    serve_each(port, serve_one)


def wsclient(addr, port, path, count):
    """Opens a WebSocket, reads the server's greeting, sends `count` frames
    (1 B to 200 KB) and checks each echo; prints "ok N" or what went wrong
    (the handshake's status line, "closed", "mismatch")."""
    import base64
    s = socket.create_connection((addr, port), timeout=5)
    key = base64.b64encode(os.urandom(16))
    s.sendall(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: ws\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
              b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n")
    buf = b""
    try:
        while b"\r\n\r\n" not in buf:
            d = s.recv(65536)
            if not d: print("closed"); return 1
            buf += d
    except OSError:
        print("closed"); return 1
    head, buf = buf.split(b"\r\n\r\n", 1)
    status = head.split(b"\r\n")[0].decode()
    if " 101 " not in status + " ":
        print(status); return 1
    f = ws_read(s, buf)
    if f is None or f[1] != b"hello": print("no greeting"); return 1
    buf = f[2]
    for i in range(count):
        payload = os.urandom([1, 125, 126, 65535, 65536, 200000][i % 6])
        s.sendall(ws_frame(2, payload, True))
        f = ws_read(s, buf)
        if f is None: print("closed after %d" % i); return 1
        if f[1] != payload: print("mismatch at %d" % i); return 1
        buf = f[2]
    s.sendall(ws_frame(8, b"\x03\xe8", True))
    print("ok %d" % count)
    return 0


def h2badserver(port, case):
    """An HTTP/2 server (prior knowledge, 127.0.0.1) that answers every
    request with a response HTTP/2 forbids: `uppercase` (an upper-case header
    name) or `connection` (a connection-specific header); with `short`, a
    body shorter than its content-length; with `refused`, a reset
    (REFUSED_STREAM) of every stream."""
    import struct
    def frame(t, flags, stream, payload=b""):
        return struct.pack(">I", len(payload))[1:] + bytes([t, flags]) + struct.pack(">I", stream) + payload
    bad = {"uppercase": b"X-Upper", "connection": b"connection", "refused": b"", "short": b""}[case]
    # ":status: 200" (static table 8), then a literal header with a new name.
    response = b"\x88\x00" + bytes([len(bad)]) + bad + b"\x01" + b"1"
    def serve_one(c):
        buf = b""
        try:
            while len(buf) < 24:
                d = c.recv(65536)
                if not d: return
                buf += d
            buf = buf[24:]
            c.sendall(frame(4, 0, 0))
            while True:
                while len(buf) >= 9:
                    n = struct.unpack(">I", b"\x00" + buf[:3])[0]
                    if len(buf) < 9 + n: break
                    t, flags, stream = buf[3], buf[4], struct.unpack(">I", buf[5:9])[0] & 0x7fffffff
                    buf = buf[9 + n:]
                    if t == 4 and not flags & 1: c.sendall(frame(4, 1, 0))
                    if t == 1 and case == "refused": c.sendall(frame(3, 0, stream, struct.pack(">I", 7)))
                    elif t == 1 and case == "short":
                        # ":status: 200", content-length (static name 28) "10", then 3 bytes and END_STREAM.
                        c.sendall(frame(1, 0x4, stream, b"\x88\x0f\x0d\x0210") + frame(0, 0x1, stream, b"abc"))
                    elif t == 1: c.sendall(frame(1, 0x5, stream, response))
                d = c.recv(65536)
                if not d: return
                buf += d
        except OSError:
            pass
        finally:
            c.close()
    serve_each(port, serve_one)

H1_RESPONSES = {
    # Framed two ways by two parsers: the proxy must answer 502 instead.
    "cl-and-te": b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    "two-lengths": b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\nabcd",
    "obs-fold": b"HTTP/1.1 200 OK\r\nx-a: 1\r\n folded\r\ncontent-length: 3\r\n\r\nabc",
    "bare-lf": b"HTTP/1.1 200 OK\ncontent-length: 3\n\nabc",
    # Well framed: passed on as sent.
    "chunked-trailers": b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nx-trailer: t\r\n\r\n",
    "until-close": b"HTTP/1.1 200 OK\r\n\r\nabcdef",
}

def h1badserver(port, case):
    """An HTTP/1.1 server (127.0.0.1) that answers every request with one
    hand-made response (H1_RESPONSES), then closes the connection."""
    def serve_one(c):
        try:
            if read_head(c) is not None: c.sendall(H1_RESPONSES[case])
        except OSError:
            pass
        finally:
            c.close()
    serve_each(port, serve_one)

H2_CODES = {0: "NO_ERROR", 1: "PROTOCOL_ERROR", 2: "INTERNAL_ERROR", 3: "FLOW_CONTROL_ERROR", 5: "STREAM_CLOSED",
            6: "FRAME_SIZE_ERROR", 7: "REFUSED_STREAM", 8: "CANCEL", 9: "COMPRESSION_ERROR", 11: "ENHANCE_YOUR_CALM"}

def tunnel_tls(sock, cert, key):
    """The agents' tunnel seen from a client: mTLS 1.3 with an SVID (CERT,
    KEY), ALPN h2; the server's certificate is not checked here."""
    import ssl
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["h2"])
    return ctx.wrap_socket(sock)

def h2flood(attack, addr, port, count, cert=None, key=None):
    """One HTTP/2 flood of COUNT frames, sent as fast as the socket takes it
    while the answers are read: prints the first GOAWAY's code and whether
    the peer then closed ("GOAWAY:ENHANCE_YOUR_CALM closed"), "no-goaway
    closed", or "still-open" when the connection survived the whole flood
    (5 s after its last byte). With CERT and KEY: over mTLS 1.3, ALPN h2."""
    import struct
    def frame(t, flags, stream, payload=b""):
        return struct.pack(">I", len(payload))[1:] + bytes([t, flags]) + struct.pack(">I", stream) + payload
    def lit(name, value):   # literal header field with incremental indexing, new name (RFC 7541 6.2.1)
        return b"\x40" + bytes([len(name)]) + name + hpack_len(len(value)) + value
    def hpack_len(n):       # 7-bit prefix integer, no Huffman
        if n < 127: return bytes([n])
        out, n = [127], n - 127
        while n >= 128: out.append(n % 128 + 128); n //= 128
        return bytes(out + [n])
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0)
    get = b"\x82\x86\x84" + b"\x00\x0a:authority\x05flood"
    def frames():
        if attack == "rapid-reset":
            for i in range(count):
                sid = 1 + 2 * i
                yield frame(1, 0x5, sid, get) + frame(3, 0, sid, struct.pack(">I", 8))
        elif attack == "continuation":
            yield frame(1, 0x0, 1, get)
            for _ in range(count): yield frame(9, 0x0, 1, b"\x00\x01a\x01b")
        elif attack == "settings":
            for _ in range(count): yield frame(4, 0, 0)
        elif attack == "ping":
            for i in range(count): yield frame(6, 0, 0, struct.pack(">Q", i))
        elif attack == "window-update":
            for _ in range(count): yield frame(8, 0, 0, struct.pack(">I", 1))
        elif attack == "empty-data":
            yield frame(1, 0x4, 1, b"\x83\x86\x84" + b"\x00\x0a:authority\x05flood")
            for _ in range(count): yield frame(0, 0, 1)
        elif attack == "hpack-bomb":
            # One 4 KiB header into the dynamic table, then header blocks that
            # name it again and again (a few bytes that decode to megabytes).
            yield frame(1, 0x5, 1, get + lit(b"x-bomb", b"a" * 4000))
            for i in range(count):
                yield frame(1, 0x5, 3 + 2 * i, get + b"\xbe" * 64)   # index 62: the newest dynamic entry
        else:
            raise SystemExit("unknown attack " + attack)
    s = socket.create_connection((addr, port), timeout=5)
    if cert:   # the agents' tunnel: mTLS 1.3 with an SVID, ALPN h2
        s = tunnel_tls(s, cert, key)
    # One thread: Python's TLS sockets cannot be written and read at once
    # from two. Frames go out in 64 KiB pieces whenever the socket takes
    # them, and answers are read as they come.
    import select, ssl
    retry = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)
    data = preface + b"".join(frames())
    sent, got, result, start = 0, b"", [], time.time()
    s.setblocking(False)
    closed = False
    deadline = None   # 5 s after the last byte went out
    while not closed:
        if deadline and time.time() > deadline:
            result.append("still-open"); break
        want_write = [s] if sent < len(data) else []
        r, w, _ = select.select([s], want_write, [], 0.5)
        if w:
            try:
                sent += s.send(data[sent:sent + 65536])
            except retry:
                pass
            except OSError:
                sent = len(data)
            if sent >= len(data) and deadline is None: deadline = time.time() + 5
        if r or (hasattr(s, "pending") and s.pending()):
            try:
                d = s.recv(65536)
            except retry:
                continue
            except OSError:
                closed = True; break
            if not d:
                closed = True; break
            got += d
            while len(got) >= 9:
                n = struct.unpack(">I", b"\x00" + got[:3])[0]
                if len(got) < 9 + n: break
                t, payload = got[3], got[9:9 + n]
                got = got[9 + n:]
                if t == 7 and not result:
                    result.append("GOAWAY:" + H2_CODES.get(struct.unpack(">I", payload[4:8])[0], "?"))
        if sent >= len(data) and deadline is None: deadline = time.time() + 5
    if closed: result.append("closed")
    if not any(r.startswith("GOAWAY") for r in result): result.insert(0, "no-goaway")
    print(" ".join(result), flush=True)
    print("seconds %.2f, sent %d of %d bytes" % (time.time() - start, sent, len(data)), file=sys.stderr)

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

def tunnelconnect(addr, port, cert, key, authority):
    """Opens one tunnel stream as an agent would: mTLS 1.3 with CERT/KEY (an
    SVID), ALPN h2, CONNECT to AUTHORITY. Prints "200", or the refusal's
    plain-text reason (the DATA after a non-200 HEADERS)."""
    import struct
    def frame(t, flags, stream, payload=b""):
        return struct.pack(">I", len(payload))[1:] + bytes([t, flags]) + struct.pack(">I", stream) + payload
    s = tunnel_tls(socket.create_connection((addr, port), timeout=5), cert, key)
    auth = authority.encode()
    block = b"\x02\x07CONNECT" + b"\x01" + bytes([len(auth)]) + auth   # literals with static names :method, :authority
    s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0) + frame(1, 0x4, 1, block))
    buf, end = b"", time.time() + 5
    while time.time() < end:
        while len(buf) >= 9:
            length = int.from_bytes(buf[:3], "big"); ftype = buf[3]; sid = struct.unpack(">I", buf[5:9])[0] & 0x7fffffff
            if len(buf) < 9 + length: break
            payload, buf = buf[9:9 + length], buf[9 + length:]
            if ftype == 1 and sid == 1 and payload[:1] == b"\x88":   # :status 200 (static index 8)
                print("200"); return 0
            if ftype == 0 and sid == 1:
                print(payload.decode(errors="replace").strip()); return 1
            if ftype == 3 and sid == 1:
                print("reset"); return 1
        try:
            d = s.recv(65536)
        except OSError:
            break
        if not d: break
        buf += d
    print("no answer"); return 1

if __name__ == "__main__":
    a = sys.argv[1:]
    if a[0] == "serve": serve(a[1], a[2], int(a[3]))
    elif a[0] == "connect": sys.exit(connect(a[1], a[2], int(a[3]), float(a[4]) if len(a) > 4 else 1.0, a[5] if len(a) > 5 else None))
    elif a[0] == "whoami": whoami(a[1], int(a[2]), a[3])
    elif a[0] == "ask": sys.exit(ask(a[1], int(a[2]), float(a[3]) if len(a) > 3 else 2.0))
    elif a[0] == "http": http(a[1], int(a[2]))
    elif a[0] == "sink": sink(int(a[1]))
    elif a[0] == "h2raw": h2raw(a[1], a[2], int(a[3]))
    elif a[0] == "h1raw": h1raw(a[1], a[2], int(a[3]))
    elif a[0] == "h1slow": h1slow(a[1], a[2], int(a[3]), float(a[4]) if len(a) > 4 else 10.0)
    elif a[0] == "wsecho": wsecho(int(a[1]))
    elif a[0] == "wsclient": sys.exit(wsclient(a[1], int(a[2]), a[3], int(a[4])))
    elif a[0] == "h2badserver": h2badserver(int(a[1]), a[2])
    elif a[0] == "h1badserver": h1badserver(int(a[1]), a[2])
    elif a[0] == "hold": sys.exit(hold(a[1], int(a[2]), float(a[3]), float(a[4])))
    elif a[0] == "tunnelconnect": sys.exit(tunnelconnect(a[1], int(a[2]), a[3], a[4], a[5]))
    elif a[0] == "h2flood":
        try:
            h2flood(a[1], a[2], int(a[3]), int(a[4]) if len(a) > 4 else 10000, *(a[5:7] if len(a) > 6 else []))
        except Exception as e:   # said on stdout, where the test reads
            print("error %s: %s" % (type(e).__name__, e)); sys.exit(1)
    else: sys.exit(2)
