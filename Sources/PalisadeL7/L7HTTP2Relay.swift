import Foundation
import NIOCore
import NIOHPACK
import NIOHTTP2
import PalisadeRelay

/// HTTP/2 relayed frame by frame between the caller's connection and one
/// connection to the workload, without a channel per stream: NIO's HTTP/2
/// handler (validation, HPACK, flow control, flood limits) on the caller's
/// side, `H2WorkloadConnection` on the workload's, and one table mapping
/// the caller's stream IDs to the workload's. Each new stream's HEADERS
/// are judged; a denied stream is answered 403 here.
///
/// Flow control is end to end: bytes a side receives are acknowledged
/// (WINDOW_UPDATE) as they are written to the other side while its channel
/// is writable, and only once its socket took them while it is not, so
/// neither side can push more than its windows ahead of the slower one and
/// the agent's memory stays bounded by the windows and the channel's
/// high watermark.
final class H2Relay: @unchecked Sendable {
    let l7: L7Context
    var down: ChannelHandlerContext?
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
        /// The caller's window for this stream less every response byte
        /// written to it (see `callerWindow`).
        var callerWindow = 0
    }
    private var byDown: [HTTP2StreamID: Exchange] = [:]
    private var byUp: [HTTP2StreamID: HTTP2StreamID] = [:]

    /// The caller's flow-control windows as NIO's handler keeps them, less
    /// every response byte written to it, sent or not: while a DATA frame
    /// fits, NIO sends it at once, and the workload's window is given back
    /// as it is written. One that does not fit waits in NIO's handler; the
    /// workload gets those bytes back only once NIO sent them, so a caller
    /// that opens no window holds the workload at the windows it was
    /// granted instead of filling the agent's memory.
    private var callerInitialWindow = 65_535
    private var callerConnectionWindow = 65_535

    init(l7: L7Context) { self.l7 = l7 }

    static var settings: HTTP2Settings {
        [HTTP2Setting(parameter: .maxConcurrentStreams, value: 256),
         HTTP2Setting(parameter: .initialWindowSize, value: streamWindow),
         HTTP2Setting(parameter: .maxFrameSize, value: maxFrameSize),
         HTTP2Setting(parameter: .maxHeaderListSize, value: maxHeaderListSize),
         HTTP2Setting(parameter: .enablePush, value: 0)]
    }

    /// Installs the relay: `downstream` (the caller, a byte stream) and
    /// `upstream` (the workload's connection).
    static func install(downstream: Channel, upstream: Channel, l7: L7Context) throws {
        let relay = H2Relay(l7: l7)
        var config = NIOHTTP2Handler.ConnectionConfiguration()
        config.initialSettings = settings
        // Header blocks are validated once, on the caller's side: requests
        // as they arrive, responses as they are sent on (a refused one is
        // answered 502, see fromUp).
        try upstream.pipeline.syncOperations.addHandler(H2WorkloadConnection(relay: relay))
        try downstream.pipeline.syncOperations.addHandler(CloseOnEndOfInput())
        try downstream.pipeline.syncOperations.addHandler(H2CallerGuard())
        try downstream.pipeline.syncOperations.addHandler(H2FrameAligner(expectsPreface: true))
        try downstream.pipeline.syncOperations.addHandler(NIOHTTP2Handler(mode: .server, connectionConfiguration: config))
        try downstream.pipeline.syncOperations.addHandler(H2RelaySide(relay))
        upstream.closeFuture.whenComplete { _ in downstream.close(promise: nil) }
        downstream.closeFuture.whenComplete { _ in upstream.close(promise: nil) }
    }

    private func write(_ ctx: ChannelHandlerContext?, _ id: HTTP2StreamID, _ payload: HTTP2Frame.FramePayload,
                       promise: EventLoopPromise<Void>? = nil) {
        guard let ctx else {
            promise?.fail(ChannelError.ioOnClosedChannel)
            return
        }
        ctx.write(NIOAny(HTTP2Frame(streamID: id, payload: payload)), promise: promise)
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
        if isDown {
            write(down, stream, .windowUpdate(windowSizeIncrement: n))
        } else {
            up?.windowUpdate(stream: stream == .rootStream ? nil : stream, n)
        }
    }

    /// Connection window given back to the workload (bytes of a stream
    /// that is gone).
    func acknowledgeUp(_ n: Int) { acknowledge(isDown: false, stream: nil, n) }

    /// Request bytes the workload's connection wrote (or dropped, `sent`
    /// false) after holding them: the caller's windows get them back.
    func requestDataTaken(source: HTTP2StreamID, _ n: Int, sent: Bool, streamOpen: Bool) {
        let open = sent && streamOpen && byDown[source] != nil
        acknowledge(isDown: true, stream: open ? source : nil, n)
    }

    /// A frame as relayed to the other side: padding is one hop's (and NIO
    /// cannot send it: a padded frame's write would fail and its bytes be
    /// lost), and a priority names a stream of the sender's connection.
    static func hop(_ h: HTTP2Frame.FramePayload.Headers) -> HTTP2Frame.FramePayload.Headers {
        guard h.paddingBytes != nil || h.priorityData != nil else { return h }
        var out = h
        out.paddingBytes = nil
        out.priorityData = nil
        return out
    }

    static func hop(_ d: HTTP2Frame.FramePayload.Data) -> HTTP2Frame.FramePayload.Data {
        guard d.paddingBytes != nil else { return d }
        var out = d
        out.paddingBytes = nil
        return out
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
            if case .rstStream = frame.payload { dropVerifying(id) } else { verifying[id]!.append(frame) }
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
        case .rstStream:
            if let x = byDown.removeValue(forKey: id) {
                byUp[x.upID] = nil
                up?.reset(x.upID, .cancel)
                up?.flush()
            }
        case .windowUpdate(let n):
            if id == .rootStream {
                callerConnectionWindow += n
            } else if byDown[id] != nil {
                byDown[id]!.callerWindow += n
            }
        case .settings(.settings(let settings)):
            for s in settings where s.parameter == .initialWindowSize {
                let delta = s.value - callerInitialWindow
                callerInitialWindow = s.value
                for key in Array(byDown.keys) { byDown[key]!.callerWindow += delta }
            }
        default:
            break   // PING, PRIORITY, GOAWAY, SETTINGS acks: each side's own
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
            write(down, id, .rstStream(.protocolError))
            down?.flush()
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
            write(down, id, .rstStream(.refusedStream))
            down?.flush()
            return false
        }
        x.upID = upID
        x.callerWindow = callerInitialWindow
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
                write(down, d.stream, .headers(.init(headers: HPACKHeaders([(":status", "200"), ("content-type", "application/grpc"),
                                                                            ("grpc-status", "7"), ("grpc-message", Self.grpcMessage(d.reason))]),
                                                     endStream: true)))
                continue
            }
            let text = d.reason + "\n"
            var b = Self.allocator.buffer(capacity: text.utf8.count)
            b.writeString(text)
            write(down, d.stream, .headers(.init(headers: HPACKHeaders([(":status", "403"), ("content-type", "text/plain"),
                                                                         ("content-length", "\(text.utf8.count)")]))))
            write(down, d.stream, .data(.init(data: .byteBuffer(b), endStream: true)))
            callerConnectionWindow -= b.readableBytes   // (so many denials cannot inflate it)
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
            // A header block HTTP/2 forbids fails its write at once (NIO
            // validates it as it is sent): then the caller gets 502 instead.
            // (The flag object is the relay's, reset before each response.)
            guard let loop = down?.eventLoop else { return }   // the caller is gone
            let sent = loop.makePromise(of: Void.self)
            let refused = headersRefused
            refused.value = false
            sent.futureResult.whenFailure { _ in refused.value = true }
            write(down, id, .headers(Self.hop(h)), promise: sent)
            if refused.value { return refuseResponse(down: id, up: upID) }
            if var x = byDown[id] {
                if let s = h.headers.first(name: ":status"), let code = Int(s), x.status < 200 {
                    x.status = code
                    x.responseStarted = code >= 200
                }
                if h.endStream { log(&x) }
                byDown[id] = x
            }
        case .data(let d):
            var fits = true
            if var x = byDown[id] {
                let n = d.data.readableBytes
                x.responseBytes += n
                if d.endStream { log(&x) }
                fits = n <= x.callerWindow && n <= callerConnectionWindow
                x.callerWindow -= n
                callerConnectionWindow -= n
                byDown[id] = x
            }
            relayResponseData(d, as: id, stream: upID, credit: credit, fits: fits)
        case .rstStream(let code):
            byUp[upID] = nil
            byDown[id] = nil
            write(down, id, .rstStream(code))
            down?.flush()
        default:
            break
        }
    }

    /// Relays a workload's DATA frame to the caller (its stream `targetID`)
    /// and gives its bytes back to the workload's windows (its stream
    /// `sourceID`): at once when it `fits` the caller's windows and the
    /// caller's channel takes more, otherwise once NIO sent it (the
    /// stream's window then only if the stream is still open).
    private func relayResponseData(_ d: HTTP2Frame.FramePayload.Data, as targetID: HTTP2StreamID,
                                   stream sourceID: HTTP2StreamID, credit n: Int, fits: Bool) {
        guard let target = down else { return }   // the caller is gone
        if fits && target.channel.isWritable {
            write(target, targetID, .data(Self.hop(d)))
            // (A stream that ended sends nothing more: connection window only.)
            acknowledge(isDown: false, stream: d.endStream ? nil : sourceID, n)
            return
        }
        let sent = target.eventLoop.makePromise(of: Void.self)
        write(target, targetID, .data(Self.hop(d)), promise: sent)
        sent.futureResult.whenComplete { result in
            let open = (try? result.get()) != nil && self.byUp[sourceID] != nil
            self.acknowledge(isDown: false, stream: open ? sourceID : nil, n)
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
                write(down, id2, .rstStream(reason == .refusedStream ? .refusedStream : .cancel))
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
            write(down, id, .rstStream(.internalError))
        } else {
            let text = "bad gateway: the workload's response is not valid HTTP/2\n"
            var b = Self.allocator.buffer(capacity: text.utf8.count)
            b.writeString(text)
            write(down, id, .headers(.init(headers: HPACKHeaders([(":status", "502"), ("content-type", "text/plain"),
                                                                   ("content-length", "\(text.utf8.count)")]))))
            write(down, id, .data(.init(data: .byteBuffer(b), endStream: true)))
            callerConnectionWindow -= b.readableBytes
            x.responseBytes = text.utf8.count
        }
        down?.flush()
        x.status = 502
        log(&x)
    }

    /// Set when the response HEADERS just written was refused (reset
    /// before each; a later failure of an earlier one lands in between).
    private final class Refused: @unchecked Sendable { var value = false }
    private let headersRefused = Refused()

    private func log(_ x: inout Exchange) {
        guard !x.logged else { return }
        x.logged = true
        l7.record(method: x.method, path: x.path, status: x.status, requestBytes: x.requestBytes, responseBytes: x.responseBytes,
                  start: x.start, verdict: x.verdict)
    }
}

/// The caller's side of the relay: its frames go to the relay; the end of
/// a read flushes the workload's side.
final class H2RelaySide: ChannelDuplexHandler, @unchecked Sendable {
    typealias InboundIn = HTTP2Frame
    typealias OutboundIn = HTTP2Frame
    typealias OutboundOut = HTTP2Frame
    let relay: H2Relay
    init(_ relay: H2Relay) { self.relay = relay }

    func handlerAdded(context: ChannelHandlerContext) {
        relay.down = context
        // A connection window larger than HTTP/2's initial 64 KiB.
        context.writeAndFlush(wrapOutboundOut(HTTP2Frame(streamID: .rootStream,
                                                         payload: .windowUpdate(windowSizeIncrement: H2Relay.connectionWindow - 65535))),
                              promise: nil)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        relay.fromDown(unwrapInboundIn(data))
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        relay.answerDenials()
        relay.up?.flush()
        context.fireChannelReadComplete()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        // (NIO sends several events per stream, window updates among them:
        // comparing the type first spares each a dynamic cast that fails.)
        if type(of: event) == StreamClosedEvent.self, let e = event as? StreamClosedEvent {
            relay.streamClosed(e.streamID, onDown: true, reason: e.reason)
        }
        context.fireUserInboundEventTriggered(event)
    }

    func channelInactive(context: ChannelHandlerContext) {
        relay.down = nil
        context.fireChannelInactive()
    }

    /// Stream errors were answered by NIO (RST_STREAM); connection errors
    /// close the connection (GOAWAY) and the workload's side follows.
    func errorCaught(context: ChannelHandlerContext, error: Error) {}
}


/// One value per side of the relay (the workload's, `down`, and the caller's).
struct BothSides<Value> {
    private var up: Value, down: Value
    init(_ value: Value) { up = value; down = value }
    subscript(isDown: Bool) -> Value {
        get { isDown ? down : up }
        set { if isDown { down = newValue } else { up = newValue } }
    }
}
