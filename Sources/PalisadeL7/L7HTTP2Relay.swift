import Foundation
import NIOCore
import NIOHPACK
import NIOHTTP2
import PalisadeRelay

/// HTTP/2 relayed frame by frame between the caller's connection and one
/// connection to the workload, without a channel per stream: both ends
/// framed by the agent itself (`H2CallerConnection` on the caller's side:
/// validation, HPACK, flow control, flood limits; `H2WorkloadConnection`
/// on the workload's), and one table mapping the caller's stream IDs to
/// the workload's. Each new stream's HEADERS are judged; a denied stream
/// is answered 403 here.
///
/// Flow control is end to end: bytes a side receives are acknowledged
/// (WINDOW_UPDATE) as they are written to the other side while its channel
/// is writable, and only once its socket took them while it is not, so
/// neither side can push more than its windows ahead of the slower one and
/// the agent's memory stays bounded by the windows and the channel's
/// high watermark.
final class H2Relay: @unchecked Sendable {
    let l7: L7Context
    var down: H2CallerConnection?
    var up: H2WorkloadConnection?
    /// Stream windows we grant each side, and the connection window.
    static let streamWindow = 1 << 20
    static let connectionWindow = 4 << 20
    /// Largest frame payload accepted from either side (HTTP/2's default)
    /// and largest header list (HTTPLimits' default, as HTTP/1.1's heads).
    static let maxFrameSize = 1 << 14
    static let maxHeaderListSize = 64 << 10
    static let allocator = ByteBufferAllocator()

    struct Exchange {
        var upID: HTTP2StreamID
        var method: String
        var path: String
        var verdict: HTTPVerdict
        var start: Date
        var requestBytes = 0
        var responseBytes = 0
        var status = 0
        var logged = false
        /// The caller has been sent a final (non-1xx) response HEADERS.
        var responseStarted = false
    }
    private var byDown: [HTTP2StreamID: Exchange] = [:]
    private var byUp: [HTTP2StreamID: HTTP2StreamID] = [:]

    init(l7: L7Context) { self.l7 = l7 }

    /// Installs the relay: `downstream` (the caller, a byte stream) and
    /// `upstream` (the workload's connection).
    static func install(downstream: Channel, upstream: Channel, l7: L7Context) throws {
        let relay = H2Relay(l7: l7)
        try upstream.pipeline.syncOperations.addHandler(H2WorkloadConnection(relay: relay))
        try downstream.pipeline.syncOperations.addHandler(CloseOnEndOfInput())
        try downstream.pipeline.syncOperations.addHandler(H2CallerConnection(relay: relay))
        upstream.closeFuture.whenComplete { _ in downstream.close(promise: nil) }
        downstream.closeFuture.whenComplete { _ in upstream.close(promise: nil) }
    }

    /// Window given back to each side but not yet announced: updates go
    /// out in quarter-window steps, not one per DATA frame.
    private var credit = BothSides(0)
    private var streamCredit = BothSides([HTTP2StreamID: Int]())

    /// Gives back `n` bytes of window to one side (connection, and the
    /// stream while it is open there and still sending).
    private func acknowledge(isDown: Bool, stream: HTTP2StreamID?, _ n: Int) {
        guard n > 0, isDown ? down != nil : up != nil else { return }
        var flush = false
        let c = credit[isDown] + n
        if c >= Self.connectionWindow / 4 {
            windowUpdate(isDown: isDown, .rootStream, c)
            credit[isDown] = 0
            flush = true
        } else {
            credit[isDown] = c
        }
        if let stream {
            let s = (streamCredit[isDown][stream] ?? 0) + n
            if s >= Self.streamWindow / 4 {
                windowUpdate(isDown: isDown, stream, s)
                streamCredit[isDown][stream] = nil
                flush = true
            } else {
                streamCredit[isDown][stream] = s
            }
        }
        if flush { if isDown { down?.flush() } else { up?.flush() } }
    }

    private func windowUpdate(isDown: Bool, _ stream: HTTP2StreamID, _ n: Int) {
        let named = stream == .rootStream ? nil : stream
        if isDown { down?.windowUpdate(stream: named, n) } else { up?.windowUpdate(stream: named, n) }
    }

    /// Connection window given back to the workload (bytes of a stream
    /// that is gone).
    func acknowledgeUp(_ n: Int) { acknowledge(isDown: false, stream: nil, n) }

    /// Caller's bytes of a stream that is gone (connection window only).
    func callerDataDropped(_ n: Int) { acknowledge(isDown: true, stream: nil, n) }

    /// Response bytes the caller's connection wrote (or dropped, `sent`
    /// false) after holding them: the workload's windows get them back.
    func responseDataTaken(source: HTTP2StreamID, _ n: Int, sent: Bool, streamOpen: Bool) {
        let open = sent && streamOpen && byUp[source] != nil
        acknowledge(isDown: false, stream: open ? source : nil, n)
    }

    /// Request bytes the workload's connection wrote (or dropped, `sent`
    /// false) after holding them: the caller's windows get them back.
    func requestDataTaken(source: HTTP2StreamID, _ n: Int, sent: Bool, streamOpen: Bool) {
        let open = sent && streamOpen && byDown[source] != nil
        acknowledge(isDown: true, stream: open ? source : nil, n)
    }

    static func flowLength(_ d: HTTP2Frame.FramePayload.Data) -> Int {
        d.data.readableBytes + (d.paddingBytes.map { $0 + 1 } ?? 0)
    }

    // MARK: the caller's frames

    /// Streams whose bearer token is being verified: their frames wait here
    /// (bounded by the stream window granted: nothing is acknowledged).
    private var verifying: [HTTP2StreamID: [HTTP2Frame]] = [:]

    func fromDown(_ frame: HTTP2Frame) {
        let id = frame.streamID
        if verifying[id] != nil {
            verifying[id]!.append(frame)
            return
        }
        switch frame.payload {
        case .headers(let h):
            if let x = byDown[id] {
                up?.sendHeaders(x.upID, h.headers, endStream: h.endStream)   // trailers
            } else if !judge(id, h) {
                return
            }
        case .data(let d):
            let n = Self.flowLength(d)
            guard var x = byDown[id], let up, case .byteBuffer(let bytes) = d.data else {
                acknowledge(isDown: true, stream: nil, n)   // a refused stream's body: dropped
                return
            }
            x.requestBytes += bytes.readableBytes
            byDown[id] = x
            up.sendData(x.upID, bytes, endStream: d.endStream, source: id, credit: n)
        default:
            break   // the caller's connection keeps the rest to itself
        }
    }

    /// A stream left while its token was verified: its queued bytes go back
    /// to the connection's window.
    private func dropVerifying(_ id: HTTP2StreamID) {
        guard let queued = verifying.removeValue(forKey: id) else { return }
        for f in queued { if case .data(let d) = f.payload { acknowledge(isDown: true, stream: nil, Self.flowLength(d)) } }
    }

    /// A new stream: judged on its HEADERS (once its bearer token, if the
    /// rules look at JWT identities, is verified). Returns false when refused.
    private func judge(_ id: HTTP2StreamID, _ h: HTTP2Frame.FramePayload.Headers) -> Bool {
        // RFC 9113 §8.3.1: a Host that names another entity than :authority
        // (or two Hosts) makes the request malformed; rules read one, the
        // workload might read the other.
        let hosts = h.headers["host"]
        if hosts.count > 1 || (hosts.count == 1 && h.headers.first(name: ":authority").map({ $0.lowercased() != hosts[0].lowercased() }) ?? false) {
            down?.reset(id, .protocolError)
            return false
        }
        if let verify = l7.verifyBearer, let token = bearerToken(h.headers.first(name: "authorization")), let loop = down?.eventLoop {
            verifying[id] = []
            verify(token, loop).whenComplete { result in
                guard self.verifying[id] != nil else { return }   // reset meanwhile
                let jwt = bearerIdentity(result)
                if self.decide(id, h, jwtIdentity: jwt) {
                    for f in self.verifying.removeValue(forKey: id) ?? [] { self.fromDown(f) }
                } else {
                    self.dropVerifying(id)
                }
                self.answerDenials()
                self.up?.flush()
                self.down?.flush()
            }
            return true
        }
        return decide(id, h, jwtIdentity: nil)
    }

    private func decide(_ id: HTTP2StreamID, _ h: HTTP2Frame.FramePayload.Headers, jwtIdentity: String?) -> Bool {
        let f = L7HTTP2.facts(h.headers, withHeaders: l7.usesHeaders)
        let verdict: HTTPVerdict
        let path = f.path ?? ""
        if f.path == nil {
            // Plain CONNECT (no :path) would make the proxy a tunnel to anywhere.
            verdict = HTTPVerdict(allowed: false, reason: "denied: CONNECT is not proxied", rule: nil)
        } else {
            verdict = l7.gate(f.method, path, f.host, f.headers, jwtIdentity)
        }
        var x = Exchange(upID: .rootStream, method: f.method, path: withoutQuery(path), verdict: verdict, start: Date())
        guard verdict.allowed else {
            // Answered once this read is processed (answerDenials): frames
            // that came with the HEADERS still meet an open stream, so
            // NIO judges them as the RFC asks (once our END_STREAM is out
            // it ignores e.g. a WINDOW_UPDATE of 0).
            let grpc = h.headers.first(name: "content-type")?.lowercased().hasPrefix("application/grpc") ?? false
            denials.append(Denial(stream: id, reason: verdict.reason, grpc: grpc))
            x.status = grpc ? 200 : 403
            x.responseBytes = grpc ? 0 : verdict.reason.utf8.count + 1
            log(&x)
            return false
        }
        guard let upID = up?.startRequest(h.headers, endStream: h.endStream, isHead: f.method == "HEAD") else {
            // The workload's connection takes no more streams (IDs used up, GOAWAY).
            down?.reset(id, .refusedStream)
            return false
        }
        x.upID = upID
        byDown[id] = x
        byUp[upID] = id
        return true
    }

    /// 403s of the streams denied in the read just processed. The rest of
    /// a request body, if any, is read and dropped (a RST_STREAM(NO_ERROR)
    /// here makes some clients, curl among them, discard the answer).
    struct Denial {
        var stream: HTTP2StreamID
        var reason: String
        /// A gRPC call is denied the gRPC way: a trailers-only response
        /// with grpc-status 7 (PERMISSION_DENIED), which gRPC clients
        /// report as such (a bare 403 reads as UNAVAILABLE or UNKNOWN).
        var grpc: Bool
    }
    private var denials: [Denial] = []

    func answerDenials() {
        guard !denials.isEmpty else { return }
        for d in denials {
            if d.grpc {
                down?.sendHeaders(d.stream, HPACKHeaders([(":status", "200"), ("content-type", "application/grpc"),
                                                          ("grpc-status", "7"), ("grpc-message", Self.grpcMessage(d.reason))]),
                                  endStream: true)
                continue
            }
            answer(d.stream, status: 403, d.reason + "\n")
        }
        denials.removeAll(keepingCapacity: true)
        down?.flush()
    }

    /// grpc-message is percent-encoded (gRPC over HTTP/2): printable ASCII
    /// but '%' as it is, anything else as %XX of its UTF-8 bytes.
    static func grpcMessage(_ s: String) -> String {
        var out = ""
        for b in s.utf8 {
            if b >= 0x20 && b <= 0x7E && b != UInt8(ascii: "%") {
                out.unicodeScalars.append(Unicode.Scalar(b))
            } else {
                let hex = Array("0123456789ABCDEF")
                out += "%\(hex[Int(b >> 4)])\(hex[Int(b & 0xF)])"
            }
        }
        return out
    }

    // MARK: the workload's frames

    /// A frame of the workload's; `credit`: a DATA frame's flow-control
    /// length (padding included).
    func fromUp(_ frame: HTTP2Frame, credit: Int = 0) {
        let upID = frame.streamID
        guard let id = byUp[upID] else {
            acknowledge(isDown: false, stream: nil, credit)
            return
        }
        switch frame.payload {
        case .headers(let h):
            // A header block HTTP/2 forbids never reaches the caller: 502 instead.
            guard let down else { return }   // the caller is gone
            let trailers = byDown[id]?.responseStarted ?? false
            guard trailers ? H2Fields.validTrailers(h.headers) : H2Fields.validResponse(h.headers) else {
                return refuseResponse(down: id, up: upID)
            }
            // (Noted and logged before it is sent: a head that ends the
            // stream can close it, and its entry, as it is written.)
            if let i = byDown.index(forKey: id) {
                if let s = h.headers.first(name: ":status"), let code = Int(s), byDown.values[i].status < 200 {
                    byDown.values[i].status = code
                    byDown.values[i].responseStarted = code >= 200
                }
                if h.endStream { log(&byDown.values[i]) }
            }
            down.sendHeaders(id, h.headers, endStream: h.endStream)
        case .data(let d):
            guard case .byteBuffer(let bytes) = d.data else { return }
            if let i = byDown.index(forKey: id) {
                byDown.values[i].responseBytes += bytes.readableBytes
                if d.endStream { log(&byDown.values[i]) }
            }
            guard let down else { return }   // the caller is gone
            down.sendData(id, bytes, endStream: d.endStream, source: upID, credit: credit)
        case .rstStream(let code):
            byUp[upID] = nil
            byDown[id] = nil
            down?.reset(id, code)
            down?.flush()
        default:
            break
        }
    }

    // MARK: bookkeeping

    func streamClosed(_ id: HTTP2StreamID, onDown: Bool, reason: HTTP2ErrorCode?) {
        streamCredit[onDown][id] = nil
        if onDown && !denials.isEmpty { denials.removeAll { $0.stream == id } }   // reset before its 403 went out
        if onDown { dropVerifying(id) }
        if onDown {
            guard let x = byDown.removeValue(forKey: id) else { return }
            // Closed by an error on the caller's side: the workload's stream goes too.
            if reason != nil, byUp.removeValue(forKey: x.upID) != nil {
                up?.reset(x.upID, .cancel)
                up?.flush()
            }
        } else {
            guard let id2 = byUp.removeValue(forKey: id) else { return }
            if let reason, byDown.removeValue(forKey: id2) != nil {
                // REFUSED_STREAM (the workload did not process it) lets the caller retry.
                down?.reset(id2, reason == .refusedStream ? .refusedStream : .cancel)
                down?.flush()
            }
        }
    }

    /// The workload's response broke HTTP/2's header rules (the caller's
    /// side refused to send it): the workload's stream is cancelled and the
    /// caller gets 502, or a reset if its response had already begun.
    private func refuseResponse(down id: HTTP2StreamID, up upID: HTTP2StreamID) {
        guard byUp.removeValue(forKey: upID) != nil else { return }
        up?.reset(upID, .cancel)
        up?.flush()
        guard var x = byDown.removeValue(forKey: id) else { return }
        if x.responseStarted {
            down?.reset(id, .internalError)
        } else {
            let text = "bad gateway: the workload's response is not valid HTTP/2\n"
            answer(id, status: 502, text)
            x.responseBytes = text.utf8.count
        }
        down?.flush()
        x.status = 502
        log(&x)
    }

    /// A plain-text answer of the proxy's own.
    private func answer(_ id: HTTP2StreamID, status: Int, _ text: String) {
        var b = Self.allocator.buffer(capacity: text.utf8.count)
        b.writeString(text)
        down?.sendHeaders(id, HPACKHeaders([(":status", "\(status)"), ("content-type", "text/plain"),
                                            ("content-length", "\(text.utf8.count)")]), endStream: false)
        down?.sendData(id, b, endStream: true, source: nil, credit: 0)
    }

    private func log(_ x: inout Exchange) {
        guard !x.logged else { return }
        x.logged = true
        l7.record(method: x.method, path: x.path, status: x.status, requestBytes: x.requestBytes, responseBytes: x.responseBytes,
                  start: x.start, verdict: x.verdict)
    }
}

/// One value per side of the relay (the workload's, `down`, and the caller's).
struct BothSides<Value> {
    private var up: Value, down: Value
    init(_ value: Value) { up = value; down = value }
    subscript(isDown: Bool) -> Value {
        get { isDown ? down : up }
        // In place: with get and set alone, `streamCredit[isDown][id] = n`
        // copied the whole table (the getter's copy shared its storage).
        _modify {
            if isDown { yield &down } else { yield &up }
        }
    }
}
