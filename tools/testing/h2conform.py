#!/usr/bin/env python3
"""HTTP/2 conformance checks for a cleartext listener (prior knowledge),
written from RFC 9113 and RFC 7541: each case sends frames by hand and expects
the answer the RFCs require. As conformance tools do, a connection error may
show as GOAWAY with the required code or as the connection closing; a stream
error as RST_STREAM with the code, or as a connection error with it.

  h2conform.py HOST PORT [--path PATH] [--authority A] [-k SUBSTRING] [-v]

PATH (default /) must answer GET with a body of at least one octet (any
status). Prints one line per case and "N passed, M failed"; exits 1 if any
case failed. No third-party modules: frames and HPACK are written here."""
import socket, struct, sys, time

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS, PADDED, PRIO = 0x1, 0x1, 0x4, 0x8, 0x20
CODES = {0: "NO_ERROR", 1: "PROTOCOL_ERROR", 2: "INTERNAL_ERROR", 3: "FLOW_CONTROL_ERROR", 4: "SETTINGS_TIMEOUT",
         5: "STREAM_CLOSED", 6: "FRAME_SIZE_ERROR", 7: "REFUSED_STREAM", 8: "CANCEL", 9: "COMPRESSION_ERROR"}
CODE = {v: k for k, v in CODES.items()}
TIMEOUT = 3.0


def frame(t, flags, stream, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([t, flags]) + struct.pack(">I", stream) + payload


def lit(name, value):
    """Literal header field without indexing, new name (RFC 7541 6.2.2)."""
    assert len(name) < 127 and len(value) < 127
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value


def setting(ident, value):
    return struct.pack(">HI", ident, value)


class Failed(Exception):
    pass


class Conn:
    def __init__(self, host, port, settings=b"", handshake=True):
        self.s = socket.create_connection((host, port), timeout=TIMEOUT)
        self.buf = b""
        self.server_settings = {}
        self.closed = False
        if handshake:
            self.send(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(SETTINGS, 0, 0, settings))
            got_settings = got_ack = False
            deadline = time.time() + TIMEOUT
            while not (got_settings and got_ack):
                f = self.read(deadline)
                if f is None:
                    raise Failed("no SETTINGS exchange")
                t, flags, _, payload = f
                if t == SETTINGS and not flags & ACK:
                    for i in range(0, len(payload), 6):
                        k, v = struct.unpack(">HI", payload[i:i + 6])
                        self.server_settings[k] = v
                    self.send(frame(SETTINGS, ACK, 0))
                    got_settings = True
                elif t == SETTINGS:
                    got_ack = True

    def send(self, b):
        try:
            self.s.sendall(b)
        except OSError:
            self.closed = True

    def read(self, deadline):
        """The next frame (type, flags, stream, payload), or None at EOF/reset/timeout."""
        while True:
            if len(self.buf) >= 9:
                n = struct.unpack(">I", b"\x00" + self.buf[:3])[0]
                if len(self.buf) >= 9 + n:
                    t, flags = self.buf[3], self.buf[4]
                    stream = struct.unpack(">I", self.buf[5:9])[0] & 0x7FFFFFFF
                    payload = self.buf[9:9 + n]
                    self.buf = self.buf[9 + n:]
                    return t, flags, stream, payload
            left = deadline - time.time()
            if left <= 0:
                return None
            self.s.settimeout(left)
            try:
                d = self.s.recv(65536)
            except socket.timeout:
                return None
            except OSError:
                self.closed = True
                return None
            if not d:
                self.closed = True
                return None
            self.buf += d

    def request(self, stream, path, authority, method=b"\x82", extra=b""):
        return method + b"\x86" + lit(b":path", path) + lit(b":authority", authority) + extra

    # Expectations --------------------------------------------------------
    def expect(self, accept, what):
        """Reads frames until accept(frame) says True (pass) or an answer
        that cannot pass arrives (fail)."""
        deadline = time.time() + TIMEOUT
        seen = []
        while True:
            f = self.read(deadline)
            if f is None:
                verdict = accept(None)
                if verdict:
                    return verdict
                raise Failed("%s; got %s" % (what, " ".join(seen) or ("connection closed" if self.closed else "nothing (timeout)")))
            t, flags, stream, payload = f
            if t == SETTINGS and not flags & ACK:
                self.send(frame(SETTINGS, ACK, 0))
            verdict = accept(f)
            if verdict:
                return verdict
            seen.append(describe(f))
            if t == GOAWAY:
                raise Failed("%s; got %s" % (what, " ".join(seen)))

    def connection_error(self, code):
        def accept(f):
            if f is None:
                return "closed" if self.closed else None
            t, _, _, p = f
            if t == GOAWAY and struct.unpack(">I", p[4:8])[0] == CODE[code]:
                return "GOAWAY " + code
            return None
        return self.expect(accept, "expected GOAWAY %s or a close" % code)

    def stream_error(self, *codes):
        def accept(f):
            if f is None:
                return "closed" if self.closed else None
            t, _, stream, p = f
            if t == RST_STREAM and CODES.get(struct.unpack(">I", p[:4])[0]) in codes:
                return "RST_STREAM %s" % CODES[struct.unpack(">I", p[:4])[0]]
            if t == GOAWAY and CODES.get(struct.unpack(">I", p[4:8])[0]) in codes:
                return "GOAWAY %s" % CODES[struct.unpack(">I", p[4:8])[0]]
            return None
        return self.expect(accept, "expected RST_STREAM or GOAWAY %s" % "/".join(codes))

    def response(self, stream):
        def accept(f):
            if f is not None and f[0] == HEADERS and f[2] == stream:
                return "HEADERS on stream %d" % stream
            return None
        return self.expect(accept, "expected a response (HEADERS) on stream %d" % stream)

    def alive(self):
        """The connection still works: a PING is answered with its payload."""
        data = b"h2confrm"
        self.send(frame(PING, 0, 0, data))
        def accept(f):
            if f is not None and f[0] == PING and f[1] & ACK and f[3] == data:
                return "PING answered"
            return None
        return self.expect(accept, "expected the PING to be answered (connection still usable)")


def describe(f):
    t, flags, stream, p = f
    names = {0: "DATA", 1: "HEADERS", 2: "PRIORITY", 3: "RST_STREAM", 4: "SETTINGS", 5: "PUSH_PROMISE", 6: "PING",
             7: "GOAWAY", 8: "WINDOW_UPDATE", 9: "CONTINUATION"}
    s = "%s(stream %d" % (names.get(t, "type %d" % t), stream)
    if t == RST_STREAM and len(p) >= 4:
        s += ", " + CODES.get(struct.unpack(">I", p[:4])[0], "?")
    if t == GOAWAY and len(p) >= 8:
        s += ", " + CODES.get(struct.unpack(">I", p[4:8])[0], "?")
    if t == DATA:
        s += ", %d octets" % len(p)
    return s + ")"


# Cases: (section, title, function(conn_factory, path, authority)).
CASES = []


def case(section, title):
    def add(fn):
        CASES.append((section, title, fn))
        return fn
    return add


def req(path, auth, method=b"\x82", extra=b""):
    return method + b"\x86" + lit(b":path", path) + lit(b":authority", auth) + extra


@case("3.5", "an invalid connection preface is a connection error")
def _(c, path, auth):
    k = c(handshake=False)
    k.send(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n" + frame(SETTINGS, 0, 0))
    return k.connection_error("PROTOCOL_ERROR")


@case("4.1", "a frame of unknown type is ignored")
def _(c, path, auth):
    k = c(); k.send(frame(0x16, 0, 0, b"\x00" * 8)); return k.alive()


@case("4.1", "unknown flags are ignored")
def _(c, path, auth):
    k = c(); k.send(frame(PING, 0x16, 0, b"flagsxx1"))
    return k.expect(lambda f: f is not None and f[0] == PING and f[1] & ACK and f[3] == b"flagsxx1" and "PING answered",
                    "expected the PING (with unknown flags) to be answered")


@case("4.1", "the reserved bit of the stream identifier is ignored")
def _(c, path, auth):
    k = c()
    k.send(struct.pack(">I", len(req(path, auth)))[1:] + bytes([HEADERS, END_STREAM | END_HEADERS]) + struct.pack(">I", 0x80000001) + req(path, auth))
    return k.response(1)


@case("4.2", "a DATA frame of SETTINGS_MAX_FRAME_SIZE octets is accepted")
def _(c, path, auth):
    k = c(); k.send(frame(HEADERS, END_HEADERS, 1, req(path, auth, b"\x83")) + frame(DATA, END_STREAM, 1, b"x" * 16384))
    return k.response(1)


@case("4.2", "a DATA frame above SETTINGS_MAX_FRAME_SIZE is a FRAME_SIZE_ERROR")
def _(c, path, auth):
    k = c(); k.send(frame(HEADERS, END_HEADERS, 1, req(path, auth, b"\x83")) + frame(DATA, END_STREAM, 1, b"x" * 16385))
    return k.stream_error("FRAME_SIZE_ERROR")


@case("4.2", "a HEADERS frame above SETTINGS_MAX_FRAME_SIZE is a FRAME_SIZE_ERROR")
def _(c, path, auth):
    big = b"".join(lit(b"x-big-%d" % i, b"v" * 100) for i in range(170))
    k = c(); k.send(frame(HEADERS, END_STREAM | END_HEADERS, 1, req(path, auth) + big))
    return k.connection_error("FRAME_SIZE_ERROR")


@case("4.3", "an undecodable header block is a COMPRESSION_ERROR")
def _(c, path, auth):
    k = c(); k.send(frame(HEADERS, END_STREAM | END_HEADERS, 1, b"\x80" + req(path, auth)))   # index 0
    return k.connection_error("COMPRESSION_ERROR")


@case("4.3", "a PRIORITY frame inside a header block is a PROTOCOL_ERROR")
def _(c, path, auth):
    k = c(); k.send(frame(HEADERS, END_STREAM, 1, req(path, auth)) + frame(PRIORITY, 0, 1, struct.pack(">IB", 0, 15)))
    return k.connection_error("PROTOCOL_ERROR")


@case("4.3", "HEADERS of another stream inside a header block is a PROTOCOL_ERROR")
def _(c, path, auth):
    k = c(); k.send(frame(HEADERS, END_STREAM, 1, req(path, auth)) + frame(HEADERS, END_STREAM | END_HEADERS, 3, req(path, auth)))
    return k.connection_error("PROTOCOL_ERROR")


for _t, _name in [(DATA, "DATA"), (RST_STREAM, "RST_STREAM"), (WINDOW_UPDATE, "WINDOW_UPDATE"), (CONTINUATION, "CONTINUATION")]:
    def _idle(c, path, auth, t=_t):
        payload = {DATA: b"abc", RST_STREAM: struct.pack(">I", 8), WINDOW_UPDATE: struct.pack(">I", 100),
                   CONTINUATION: req(path, auth)}[t]
        k = c(); k.send(frame(t, END_HEADERS if t == CONTINUATION else 0, 1, payload))
        return k.connection_error("PROTOCOL_ERROR")
    case("5.1", "idle stream: %s is a PROTOCOL_ERROR" % _name)(_idle)


@case("5.1", "half-closed (remote): DATA is a STREAM_CLOSED error")
def _(c, path, auth):
    k = c(); k.send(frame(HEADERS, END_STREAM | END_HEADERS, 1, req(path, auth)) + frame(DATA, END_STREAM, 1, b"late"))
    return k.stream_error("STREAM_CLOSED")


@case("5.1", "half-closed (remote): HEADERS is a STREAM_CLOSED error")
def _(c, path, auth):
    k = c(); k.send(frame(HEADERS, END_STREAM | END_HEADERS, 1, req(path, auth)) + frame(HEADERS, END_STREAM | END_HEADERS, 1, lit(b"x-late", b"1")))
    return k.stream_error("STREAM_CLOSED")


@case("5.1", "closed: DATA after RST_STREAM is a STREAM_CLOSED error")
def _(c, path, auth):
    k = c(); k.send(frame(HEADERS, END_HEADERS, 1, req(path, auth, b"\x83")) + frame(RST_STREAM, 0, 1, struct.pack(">I", 8))
                    + frame(DATA, 0, 1, b"late"))
    return k.stream_error("STREAM_CLOSED")


@case("5.1", "closed: HEADERS after RST_STREAM is a STREAM_CLOSED error")
def _(c, path, auth):
    k = c(); k.send(frame(HEADERS, END_HEADERS, 1, req(path, auth, b"\x83")) + frame(RST_STREAM, 0, 1, struct.pack(">I", 8))
                    + frame(HEADERS, END_STREAM | END_HEADERS, 1, lit(b"x-late", b"1")))
    return k.stream_error("STREAM_CLOSED")


@case("5.1.1", "an even-numbered stream identifier is a PROTOCOL_ERROR")
def _(c, path, auth):
    k = c(); k.send(frame(HEADERS, END_STREAM | END_HEADERS, 2, req(path, auth)))
    return k.connection_error("PROTOCOL_ERROR")


@case("5.1.1", "a stream identifier below a previous one is a PROTOCOL_ERROR")
def _(c, path, auth):
    k = c(); k.send(frame(HEADERS, END_STREAM | END_HEADERS, 5, req(path, auth)) + frame(HEADERS, END_STREAM | END_HEADERS, 3, req(path, auth)))
    return k.connection_error("PROTOCOL_ERROR")


@case("5.1.2", "streams beyond SETTINGS_MAX_CONCURRENT_STREAMS are refused")
def _(c, path, auth):
    k = c()
    limit = k.server_settings.get(3)
    if limit is None or limit > 1000:
        raise Failed("the server advertises no SETTINGS_MAX_CONCURRENT_STREAMS (or a huge one): %r" % limit)
    k.send(b"".join(frame(HEADERS, END_HEADERS, 1 + 2 * i, req(path, auth, b"\x83")) for i in range(limit + 1)))
    return k.stream_error("PROTOCOL_ERROR", "REFUSED_STREAM")


@case("5.3.1", "HEADERS depending on its own stream is a PROTOCOL_ERROR")
def _(c, path, auth):
    k = c(); k.send(frame(HEADERS, END_STREAM | END_HEADERS | PRIO, 1, struct.pack(">IB", 1, 15) + req(path, auth)))
    return k.stream_error("PROTOCOL_ERROR")


@case("5.3.1", "PRIORITY depending on its own stream is a PROTOCOL_ERROR")
def _(c, path, auth):
    k = c(); k.send(frame(PRIORITY, 0, 1, struct.pack(">IB", 1, 15)))
    return k.stream_error("PROTOCOL_ERROR")


@case("5.5", "an unknown extension frame inside a header block is a PROTOCOL_ERROR")
def _(c, path, auth):
    k = c(); k.send(frame(HEADERS, END_STREAM, 1, req(path, auth)) + frame(0x16, 0, 1, b"x" * 8))
    return k.connection_error("PROTOCOL_ERROR")


@case("6.1", "DATA on stream 0 is a PROTOCOL_ERROR")
def _(c, path, auth):
    k = c(); k.send(frame(DATA, END_STREAM, 0, b"abc")); return k.connection_error("PROTOCOL_ERROR")


@case("6.1", "DATA with a pad length beyond the payload is a PROTOCOL_ERROR")
def _(c, path, auth):
    k = c(); k.send(frame(HEADERS, END_HEADERS, 1, req(path, auth, b"\x83")) + frame(DATA, END_STREAM | PADDED, 1, b"\x06abc"))
    return k.connection_error("PROTOCOL_ERROR")


@case("6.1", "a padded DATA frame is delivered and answered")
def _(c, path, auth):
    k = c(); k.send(frame(HEADERS, END_HEADERS, 1, req(path, auth, b"\x83", lit(b"content-length", b"4")))
                    + frame(DATA, END_STREAM | PADDED, 1, b"\x05body" + b"\x00" * 5))
    return k.response(1)


@case("6.2", "HEADERS on stream 0 is a PROTOCOL_ERROR")
def _(c, path, auth):
    k = c(); k.send(frame(HEADERS, END_STREAM | END_HEADERS, 0, req(path, auth))); return k.connection_error("PROTOCOL_ERROR")


@case("6.2", "HEADERS with a pad length beyond the payload is a PROTOCOL_ERROR")
def _(c, path, auth):
    b = req(path, auth)
    k = c(); k.send(frame(HEADERS, END_STREAM | END_HEADERS | PADDED, 1, bytes([len(b) + 1]) + b))
    return k.connection_error("PROTOCOL_ERROR")


@case("6.2", "HEADERS with priority and padding are answered")
def _(c, path, auth):
    k = c(); k.send(frame(HEADERS, END_STREAM | END_HEADERS | PRIO | PADDED, 1, b"\x04" + struct.pack(">IB", 0, 15) + req(path, auth) + b"\x00" * 4))
    return k.response(1)


@case("6.3", "PRIORITY on stream 0 is a PROTOCOL_ERROR")
def _(c, path, auth):
    k = c(); k.send(frame(PRIORITY, 0, 0, struct.pack(">IB", 1, 15))); return k.connection_error("PROTOCOL_ERROR")


@case("6.3", "PRIORITY of a length other than 5 is a FRAME_SIZE_ERROR")
def _(c, path, auth):
    k = c(); k.send(frame(PRIORITY, 0, 1, struct.pack(">IBB", 0, 15, 0))); return k.stream_error("FRAME_SIZE_ERROR")


@case("6.3", "PRIORITY on an idle stream is accepted")
def _(c, path, auth):
    k = c(); k.send(frame(PRIORITY, 0, 9, struct.pack(">IB", 0, 15))); return k.alive()


@case("6.4", "RST_STREAM on stream 0 is a PROTOCOL_ERROR")
def _(c, path, auth):
    k = c(); k.send(frame(RST_STREAM, 0, 0, struct.pack(">I", 8))); return k.connection_error("PROTOCOL_ERROR")


@case("6.4", "RST_STREAM of a length other than 4 is a FRAME_SIZE_ERROR")
def _(c, path, auth):
    k = c(); k.send(frame(HEADERS, END_HEADERS, 1, req(path, auth, b"\x83")) + frame(RST_STREAM, 0, 1, struct.pack(">IB", 8, 0)))
    return k.connection_error("FRAME_SIZE_ERROR")


@case("6.5", "SETTINGS with ACK and a payload is a FRAME_SIZE_ERROR")
def _(c, path, auth):
    k = c(); k.send(frame(SETTINGS, ACK, 0, setting(3, 100))); return k.connection_error("FRAME_SIZE_ERROR")


@case("6.5", "SETTINGS on a stream is a PROTOCOL_ERROR")
def _(c, path, auth):
    k = c(); k.send(frame(SETTINGS, 0, 1, setting(3, 100))); return k.connection_error("PROTOCOL_ERROR")


@case("6.5", "SETTINGS of a length not a multiple of 6 is a FRAME_SIZE_ERROR")
def _(c, path, auth):
    k = c(); k.send(frame(SETTINGS, 0, 0, setting(3, 100) + b"\x00\x00")); return k.connection_error("FRAME_SIZE_ERROR")


@case("6.5.2", "SETTINGS_ENABLE_PUSH other than 0 or 1 is a PROTOCOL_ERROR")
def _(c, path, auth):
    k = c(); k.send(frame(SETTINGS, 0, 0, setting(2, 2))); return k.connection_error("PROTOCOL_ERROR")


@case("6.5.2", "SETTINGS_INITIAL_WINDOW_SIZE above 2^31-1 is a FLOW_CONTROL_ERROR")
def _(c, path, auth):
    k = c(); k.send(frame(SETTINGS, 0, 0, setting(4, 1 << 31))); return k.connection_error("FLOW_CONTROL_ERROR")


@case("6.5.2", "SETTINGS_MAX_FRAME_SIZE below 16384 is a PROTOCOL_ERROR")
def _(c, path, auth):
    k = c(); k.send(frame(SETTINGS, 0, 0, setting(5, 16383))); return k.connection_error("PROTOCOL_ERROR")


@case("6.5.2", "SETTINGS_MAX_FRAME_SIZE above 2^24-1 is a PROTOCOL_ERROR")
def _(c, path, auth):
    k = c(); k.send(frame(SETTINGS, 0, 0, setting(5, 1 << 24))); return k.connection_error("PROTOCOL_ERROR")


@case("6.5.2", "an unknown setting is ignored")
def _(c, path, auth):
    k = c(); k.send(frame(SETTINGS, 0, 0, setting(0xFF, 1)))
    return k.expect(lambda f: f is not None and f[0] == SETTINGS and f[1] & ACK and "SETTINGS acknowledged", "expected SETTINGS ACK")


@case("6.7", "PING is answered with the same payload")
def _(c, path, auth):
    return c().alive()


@case("6.7", "a PING with ACK is not answered")
def _(c, path, auth):
    k = c(); k.send(frame(PING, ACK, 0, b"unsolici"))
    k.send(frame(PING, 0, 0, b"h2confrm"))
    def accept(f):
        if f is not None and f[0] == PING and f[1] & ACK:
            if f[3] == b"unsolici":
                raise Failed("a PING with ACK was answered")
            if f[3] == b"h2confrm":
                return "only the PING without ACK answered"
        return None
    return k.expect(accept, "expected the PING without ACK to be answered")


@case("6.7", "PING on a stream is a PROTOCOL_ERROR")
def _(c, path, auth):
    k = c(); k.send(frame(PING, 0, 1, b"x" * 8)); return k.connection_error("PROTOCOL_ERROR")


@case("6.7", "PING of a length other than 8 is a FRAME_SIZE_ERROR")
def _(c, path, auth):
    k = c(); k.send(frame(PING, 0, 0, b"x" * 6)); return k.connection_error("FRAME_SIZE_ERROR")


@case("6.8", "GOAWAY on a stream is a PROTOCOL_ERROR")
def _(c, path, auth):
    k = c(); k.send(frame(GOAWAY, 0, 1, struct.pack(">II", 0, 0))); return k.connection_error("PROTOCOL_ERROR")


@case("6.9", "WINDOW_UPDATE of 0 on the connection is a PROTOCOL_ERROR")
def _(c, path, auth):
    k = c(); k.send(frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 0))); return k.connection_error("PROTOCOL_ERROR")


@case("6.9", "WINDOW_UPDATE of 0 on a stream is a PROTOCOL_ERROR")
def _(c, path, auth):
    k = c(); k.send(frame(HEADERS, END_HEADERS, 1, req(path, auth, b"\x83")) + frame(WINDOW_UPDATE, 0, 1, struct.pack(">I", 0)))
    return k.stream_error("PROTOCOL_ERROR")


@case("6.9", "WINDOW_UPDATE of a length other than 4 is a FRAME_SIZE_ERROR")
def _(c, path, auth):
    k = c(); k.send(frame(WINDOW_UPDATE, 0, 0, struct.pack(">IB", 1, 0))); return k.connection_error("FRAME_SIZE_ERROR")


@case("6.9.1", "with an initial window of 1 the first DATA frame carries 1 octet")
def _(c, path, auth):
    k = c(settings=setting(4, 1)); k.send(frame(HEADERS, END_STREAM | END_HEADERS, 1, req(path, auth)))
    def accept(f):
        if f is not None and f[0] == DATA and f[2] == 1:
            if len(f[3]) != 1:
                raise Failed("first DATA frame carries %d octets with a window of 1" % len(f[3]))
            return "DATA of 1 octet"
        return None
    return k.expect(accept, "expected a DATA frame of 1 octet")


@case("6.9.1", "a connection window above 2^31-1 is a FLOW_CONTROL_ERROR")
def _(c, path, auth):
    k = c(); k.send(frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 0x7FFFFFFF)) * 2); return k.connection_error("FLOW_CONTROL_ERROR")


@case("6.9.1", "a stream window above 2^31-1 is a FLOW_CONTROL_ERROR")
def _(c, path, auth):
    k = c(); k.send(frame(HEADERS, END_HEADERS, 1, req(path, auth, b"\x83")) + frame(WINDOW_UPDATE, 0, 1, struct.pack(">I", 0x7FFFFFFF)) * 2)
    return k.stream_error("FLOW_CONTROL_ERROR")


@case("6.9.2", "a change of SETTINGS_INITIAL_WINDOW_SIZE applies to open streams")
def _(c, path, auth):
    k = c(settings=setting(4, 0)); k.send(frame(HEADERS, END_STREAM | END_HEADERS, 1, req(path, auth)))
    k.response(1)
    k.send(frame(SETTINGS, 0, 0, setting(4, 1)))
    def accept(f):
        if f is not None and f[0] == DATA and f[2] == 1:
            if len(f[3]) != 1:
                raise Failed("DATA of %d octets after the window became 1" % len(f[3]))
            return "DATA of 1 octet once the window opened"
        return None
    return k.expect(accept, "expected a DATA frame of 1 octet")


@case("6.10", "CONTINUATION frames after HEADERS are answered")
def _(c, path, auth):
    b = req(path, auth)
    k = c(); k.send(frame(HEADERS, END_STREAM, 1, b[:3]) + frame(CONTINUATION, 0, 1, b[3:6]) + frame(CONTINUATION, END_HEADERS, 1, b[6:]))
    return k.response(1)


@case("6.10", "a CONTINUATION followed by another frame is a PROTOCOL_ERROR")
def _(c, path, auth):
    b = req(path, auth)
    k = c(); k.send(frame(HEADERS, END_STREAM, 1, b[:3]) + frame(CONTINUATION, 0, 1, b[3:]) + frame(DATA, 0, 1, b"x"))
    return k.connection_error("PROTOCOL_ERROR")


@case("6.10", "CONTINUATION on stream 0 is a PROTOCOL_ERROR")
def _(c, path, auth):
    b = req(path, auth)
    k = c(); k.send(frame(HEADERS, END_STREAM, 1, b[:3]) + frame(CONTINUATION, END_HEADERS, 0, b[3:]))
    return k.connection_error("PROTOCOL_ERROR")


@case("6.10", "CONTINUATION after HEADERS with END_HEADERS is a PROTOCOL_ERROR")
def _(c, path, auth):
    k = c(); k.send(frame(HEADERS, END_STREAM | END_HEADERS, 1, req(path, auth)) + frame(CONTINUATION, END_HEADERS, 1, lit(b"x-a", b"1")))
    return k.connection_error("PROTOCOL_ERROR")


@case("6.10", "CONTINUATION after DATA is a PROTOCOL_ERROR")
def _(c, path, auth):
    k = c(); k.send(frame(HEADERS, END_HEADERS, 1, req(path, auth, b"\x83")) + frame(DATA, 0, 1, b"x") + frame(CONTINUATION, END_HEADERS, 1, lit(b"x-a", b"1")))
    return k.connection_error("PROTOCOL_ERROR")


@case("7", "GOAWAY with an unknown error code is not an error")
def _(c, path, auth):
    # After a client's GOAWAY the server may answer or end the connection
    # gracefully; it must not treat the unknown code as an error.
    k = c(); k.send(frame(GOAWAY, 0, 0, struct.pack(">II", 0, 0xFF)))
    k.send(frame(PING, 0, 0, b"h2confrm"))
    def accept(f):
        if f is None:
            return "closed gracefully" if k.closed else None
        t, flags, _, p = f
        if t == PING and flags & ACK and p == b"h2confrm":
            return "PING answered"
        if t == GOAWAY and struct.unpack(">I", p[4:8])[0] == 0:
            return "GOAWAY NO_ERROR"
        return None
    return k.expect(accept, "expected the PING answered or a graceful end")


@case("7", "RST_STREAM with an unknown error code is accepted")
def _(c, path, auth):
    k = c(); k.send(frame(HEADERS, END_HEADERS, 1, req(path, auth, b"\x83")) + frame(RST_STREAM, 0, 1, struct.pack(">I", 0xFF)))
    return k.alive()


@case("8.1", "a second HEADERS without END_STREAM is a PROTOCOL_ERROR")
def _(c, path, auth):
    k = c(); k.send(frame(HEADERS, END_HEADERS, 1, req(path, auth, b"\x83")) + frame(HEADERS, END_HEADERS, 1, lit(b"x-trailer", b"1")))
    return k.stream_error("PROTOCOL_ERROR")


@case("8.1", "a request with trailers is answered")
def _(c, path, auth):
    k = c(); k.send(frame(HEADERS, END_HEADERS, 1, req(path, auth, b"\x83")) + frame(DATA, 0, 1, b"body")
                    + frame(HEADERS, END_STREAM | END_HEADERS, 1, lit(b"x-trailer", b"1")))
    return k.response(1)


for _title, _block in [
    ("an upper-case header name", lambda p, a: req(p, a) + lit(b"X-Upper", b"1")),
    ("an unknown pseudo-header", lambda p, a: req(p, a) + lit(b":custom", b"1")),
    ("a response pseudo-header in a request", lambda p, a: req(p, a) + lit(b":status", b"200")),
    ("a pseudo-header after a regular header", lambda p, a: b"\x82\x86" + lit(b":authority", a) + lit(b"x-a", b"1") + lit(b":path", p)),
    ("a connection-specific header", lambda p, a: req(p, a) + lit(b"connection", b"keep-alive")),
    ("TE other than trailers", lambda p, a: req(p, a) + lit(b"te", b"gzip")),
    ("a Host naming another authority", lambda p, a: req(p, a) + lit(b"host", b"other.example")),
    ("two Host fields", lambda p, a: req(p, a) + lit(b"host", a) + lit(b"host", a)),
    ("an empty :path", lambda p, a: b"\x82\x86" + lit(b":path", b"") + lit(b":authority", a)),
    ("no :method", lambda p, a: b"\x86" + lit(b":path", p) + lit(b":authority", a)),
    ("no :scheme", lambda p, a: b"\x82" + lit(b":path", p) + lit(b":authority", a)),
    ("no :path", lambda p, a: b"\x82\x86" + lit(b":authority", a)),
    ("a duplicated :method", lambda p, a: b"\x82" + req(p, a)),
    ("a duplicated :scheme", lambda p, a: b"\x86" + req(p, a)),
    ("a duplicated :path", lambda p, a: req(p, a) + lit(b":path", p)),
]:
    def _bad(c, path, auth, block=_block):
        k = c(); k.send(frame(HEADERS, END_STREAM | END_HEADERS, 1, block(path, auth))); return k.stream_error("PROTOCOL_ERROR")
    case("8.1.2", "a request with %s is a PROTOCOL_ERROR" % _title)(_bad)


@case("8.1.2", "a pseudo-header in trailers is a PROTOCOL_ERROR")
def _(c, path, auth):
    k = c(); k.send(frame(HEADERS, END_HEADERS, 1, req(path, auth, b"\x83")) + frame(DATA, 0, 1, b"body")
                    + frame(HEADERS, END_STREAM | END_HEADERS, 1, lit(b":method", b"GET")))
    return k.stream_error("PROTOCOL_ERROR")


@case("8.1.2.6", "content-length unlike the DATA length is a PROTOCOL_ERROR")
def _(c, path, auth):
    k = c(); k.send(frame(HEADERS, END_HEADERS, 1, req(path, auth, b"\x83", lit(b"content-length", b"10"))) + frame(DATA, END_STREAM, 1, b"abc"))
    return k.stream_error("PROTOCOL_ERROR")


@case("8.1.2.6", "content-length unlike the sum of several DATA frames is a PROTOCOL_ERROR")
def _(c, path, auth):
    k = c(); k.send(frame(HEADERS, END_HEADERS, 1, req(path, auth, b"\x83", lit(b"content-length", b"4")))
                    + frame(DATA, 0, 1, b"abc") + frame(DATA, END_STREAM, 1, b"def"))
    return k.stream_error("PROTOCOL_ERROR")


@case("8.2", "PUSH_PROMISE from a client is a PROTOCOL_ERROR")
def _(c, path, auth):
    k = c(); k.send(frame(HEADERS, END_HEADERS, 1, req(path, auth, b"\x83")) + frame(PUSH_PROMISE, END_HEADERS, 1, struct.pack(">I", 2) + req(path, auth)))
    return k.connection_error("PROTOCOL_ERROR")


for _title, _block in [
    ("an indexed field with an index beyond both tables", lambda p, a: req(p, a) + b"\xbe"),
    ("a literal whose name index is beyond both tables", lambda p, a: req(p, a) + b"\x0f\x37\x01x"),
    ("a dynamic table size update after a field", lambda p, a: req(p, a) + b"\x20"),
    ("a dynamic table size update above SETTINGS_HEADER_TABLE_SIZE", lambda p, a: b"\x3f\xe2\x1f" + req(p, a)),
    ("Huffman padding longer than 7 bits", lambda p, a: req(p, a) + b"\x00\x06x-test\x82\x1f\xff"),
    ("Huffman padding that is not the EOS prefix", lambda p, a: req(p, a) + b"\x00\x06x-test\x81\x18"),
    ("a Huffman string holding EOS", lambda p, a: req(p, a) + b"\x00\x06x-test\x84\xff\xff\xff\xff"),
]:
    def _hpack(c, path, auth, block=_block):
        k = c(); k.send(frame(HEADERS, END_STREAM | END_HEADERS, 1, block(path, auth))); return k.connection_error("COMPRESSION_ERROR")
    case("RFC 7541", "%s is a COMPRESSION_ERROR" % _title)(_hpack)


@case("generic", "GET, HEAD and POST with a body are answered on one connection")
def _(c, path, auth):
    k = c()
    k.send(frame(HEADERS, END_STREAM | END_HEADERS, 1, req(path, auth)))
    k.response(1)
    k.send(frame(HEADERS, END_STREAM | END_HEADERS, 3, req(path, auth, b"\x00\x07:method\x04HEAD")))
    k.response(3)
    k.send(frame(HEADERS, END_HEADERS, 5, req(path, auth, b"\x83", lit(b"content-length", b"5"))) + frame(DATA, END_STREAM, 5, b"hello"))
    return k.response(5)


def main(argv):
    args = list(argv)
    host, port = args[0], int(args[1])
    path, auth, only, verbose = b"/", None, None, False
    i = 2
    while i < len(args):
        if args[i] == "--path": path = args[i + 1].encode(); i += 2
        elif args[i] == "--authority": auth = args[i + 1].encode(); i += 2
        elif args[i] == "-k": only = args[i + 1]; i += 2
        elif args[i] == "-v": verbose = True; i += 1
        else: raise SystemExit("unknown argument " + args[i])
    auth = auth or ("%s:%d" % (host, port)).encode()
    passed = failed = 0
    for section, title, fn in CASES:
        name = "%s %s" % (section, title)
        if only and only not in name:
            continue
        conns = []
        def factory(settings=b"", handshake=True):
            k = Conn(host, port, settings, handshake)
            conns.append(k)
            return k
        try:
            how = fn(factory, path, auth)
            passed += 1
            print("  ok    %s%s" % (name, "  [%s]" % how if verbose else ""), flush=True)
        except Failed as e:
            failed += 1
            print("  FAIL  %s: %s" % (name, e), flush=True)
        except OSError as e:
            failed += 1
            print("  FAIL  %s: %s" % (name, e), flush=True)
        finally:
            for k in conns:
                k.s.close()
    print("%d passed, %d failed" % (passed, failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
