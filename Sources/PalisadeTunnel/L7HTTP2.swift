import Foundation
import NIOCore
import NIOHPACK
import NIOHTTP2

/// HTTP/2 (cleartext, prior knowledge) through the in-agent proxy: the
/// caller's connection is terminated by NIO's HTTP/2 server, every stream
/// is judged on its own request headers, and allowed streams are opened on
/// one HTTP/2 connection to the workload (so gRPC, trailers and
/// multiplexing survive). A denied stream gets 403 and the other streams of
/// the connection carry on. Frames flow with backpressure both ways: a
/// stream reads only while its partner can write, so flow-control windows,
/// not the agent's memory, hold a slow side's data.
enum L7HTTP2 {
    /// Settings for both the caller-facing server and the workload-facing client.
    static var connection: NIOHTTP2Handler.ConnectionConfiguration {
        var c = NIOHTTP2Handler.ConnectionConfiguration()
        c.initialSettings = [
            HTTP2Setting(parameter: .maxConcurrentStreams, value: 256),
            HTTP2Setting(parameter: .initialWindowSize, value: 1 << 20),
            HTTP2Setting(parameter: .maxFrameSize, value: 1 << 14),
            HTTP2Setting(parameter: .maxHeaderListSize, value: 64 << 10),
        ]
        c.targetWindowSize = 4 << 20   // all streams of one caller together (NIO's default: 64 KiB)
        return c
    }
    static var stream: NIOHTTP2Handler.StreamConfiguration {
        var s = NIOHTTP2Handler.StreamConfiguration()
        s.targetWindowSize = 1 << 20
        s.outboundBufferSizeHighWatermark = 256 << 10
        s.outboundBufferSizeLowWatermark = 64 << 10
        return s
    }

    /// Puts the HTTP/2 server on `downstream` (already a byte stream) and
    /// the HTTP/2 client on `upstream` (the connection to the workload).
    static func configure(downstream: Channel, upstream: Channel, l7: L7Context) throws {
        let mux = try upstream.pipeline.syncOperations.configureHTTP2Pipeline(
            mode: .client, connectionConfiguration: connection, streamConfiguration: stream
        ) { $0.close() }   // a workload never opens streams towards the caller
        // HTTP/2 has no half-close of the connection: a caller that ended
        // its side is done (without this the socket would sit in
        // CLOSE-WAIT, holding the workload's connection open).
        try downstream.pipeline.syncOperations.addHandler(CloseOnEndOfInput())
        _ = try downstream.pipeline.syncOperations.configureHTTP2Pipeline(
            mode: .server, connectionConfiguration: connection, streamConfiguration: stream
        ) { s in
            s.eventLoop.makeCompletedFuture {
                try s.pipeline.syncOperations.addHandler(L7H2Stream(l7: l7, upstream: mux))
            }
        }
        // One side gone: the other follows (the caller's streams are reset
        // when the workload's connection dies, and vice versa).
        upstream.closeFuture.whenComplete { _ in downstream.close(promise: nil) }
        downstream.closeFuture.whenComplete { _ in upstream.close(promise: nil) }
    }

    /// Request facts of a HEADERS frame, for the gate and the log.
    static func facts(_ h: HPACKHeaders) -> (method: String, path: String?, host: String, headers: [String: String]) {
        var headers: [String: String] = [:]
        for (name, value, _) in h where !name.hasPrefix(":") && name != "authorization" {
            headers[name] = headers[name].map { "\($0), \(value)" } ?? value
        }
        let host = h.first(name: ":authority") ?? h.first(name: "host") ?? ""
        return (h.first(name: ":method") ?? "", h.first(name: ":path"), host, headers)
    }
}

/// Closes the channel when its input ends.
final class CloseOnEndOfInput: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = NIOAny
    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let e = event as? ChannelEvent, e == .inputClosed {
            context.close(promise: nil)
            return
        }
        context.fireUserInboundEventTriggered(event)
    }
}

/// One caller stream: judged on its HEADERS, then either answered 403 or
/// joined frame for frame to a stream on the workload's connection.
final class L7H2Stream: ChannelDuplexHandler, @unchecked Sendable {
    typealias InboundIn = HTTP2Frame.FramePayload
    typealias OutboundIn = HTTP2Frame.FramePayload
    typealias OutboundOut = HTTP2Frame.FramePayload

    let l7: L7Context
    let mux: NIOHTTP2Handler.StreamMultiplexer
    private var context: ChannelHandlerContext?
    private var partner: L7H2Upstream?
    /// Frames that arrived while the workload's stream was being opened.
    private var early: [HTTP2Frame.FramePayload] = []
    private var judged = false
    private var denied = false
    private var pendingRead = false
    private var record: (method: String, path: String, verdict: HTTPVerdict, start: Date)?
    private var requestBytes = 0
    private var responseBytes = 0
    private var status = 0
    private var logged = false
    private var failed = false
    private var responseEnded = false

    init(l7: L7Context, upstream: NIOHTTP2Handler.StreamMultiplexer) { self.l7 = l7; self.mux = upstream }

    func handlerAdded(context: ChannelHandlerContext) { self.context = context }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let frame = unwrapInboundIn(data)
        if case .data(let d) = frame { requestBytes += d.data.readableBytes }
        guard judged else {
            guard case .headers(let h) = frame else { return }
            judged = true
            judge(context, h)
            return
        }
        if denied { return }   // the rest of a refused request is dropped
        if let partner, partner.joined {
            partner.write(frame)
        } else {
            early.append(frame)
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) { partner?.flush() }

    private func judge(_ context: ChannelHandlerContext, _ h: HTTP2Frame.FramePayload.Headers) {
        let f = L7HTTP2.facts(h.headers)
        guard let path = f.path else {
            // Plain CONNECT (no :path) would make the proxy a tunnel to anywhere.
            let verdict = HTTPVerdict(allowed: false, reason: "denied: CONNECT is not proxied", rule: nil)
            record = (f.method, "", verdict, Date())
            deny(context, verdict)
            return
        }
        let verdict = l7.gate(f.method, path, f.host, f.headers)
        record = (f.method, path.split(separator: "?", maxSplits: 1).first.map(String.init) ?? path, verdict, Date())
        guard verdict.allowed else {
            deny(context, verdict)
            return
        }
        early.append(.headers(h))
        let upstream = L7H2Upstream(downstream: self)
        partner = upstream
        let opened = context.eventLoop.makePromise(of: Channel.self)
        mux.createStreamChannel(promise: opened) { s in
            s.eventLoop.makeCompletedFuture { try s.pipeline.syncOperations.addHandler(upstream) }
        }
        opened.futureResult.whenComplete { result in
            switch result {
            case .success:
                upstream.joined = true
                let held = self.early
                self.early = []
                for f in held { upstream.write(f) }
                upstream.flush()
            case .failure:
                self.answer(context, status: 502, body: "workload unreachable")
            }
        }
    }

    private func deny(_ context: ChannelHandlerContext, _ verdict: HTTPVerdict) {
        denied = true
        answer(context, status: 403, body: verdict.reason)
    }

    private func answer(_ context: ChannelHandlerContext, status: Int, body: String) {
        let text = body + "\n"
        let headers = HPACKHeaders([(":status", "\(status)"), ("content-type", "text/plain"), ("content-length", "\(text.utf8.count)")])
        self.status = status
        context.write(wrapOutboundOut(.headers(.init(headers: headers))), promise: nil)
        var b = context.channel.allocator.buffer(capacity: text.utf8.count)
        b.writeString(text)
        responseBytes += text.utf8.count
        context.writeAndFlush(wrapOutboundOut(.data(.init(data: .byteBuffer(b), endStream: true))), promise: nil)
        finishLog()
    }

    /// A frame of the workload's response.
    func fromUpstream(_ frame: HTTP2Frame.FramePayload) {
        guard let context else { return }
        var end = false
        switch frame {
        case .headers(let h):
            if let s = h.headers.first(name: ":status"), let code = Int(s), status == 0 || (100..<200).contains(status) { status = code }
            end = h.endStream
        case .data(let d):
            responseBytes += d.data.readableBytes
            end = d.endStream
        default:
            break
        }
        context.write(wrapOutboundOut(frame), promise: nil)
        if end {
            responseEnded = true
            finishLog()
        }
    }

    func flush() { context?.flush() }

    private func finishLog() {
        guard !logged, let r = record else { return }
        logged = true
        l7.log?(AccessLogEntry(time: Timestamp.rfc3339(r.start), source: l7.source, destination: l7.destination,
                               destinationAddress: l7.destinationAddress, method: r.method, path: r.path, status: status,
                               requestBytes: requestBytes, responseBytes: responseBytes,
                               durationMs: Date().timeIntervalSince(r.start) * 1000,
                               decision: r.verdict.allowed ? "allowed" : "denied", rule: r.verdict.rule))
    }

    /// Reads only while the workload's stream can take them.
    func read(context: ChannelHandlerContext) {
        if let partner, !partner.writable {
            pendingRead = true
        } else {
            context.read()
        }
    }

    func resumeRead() {
        if pendingRead {
            pendingRead = false
            context?.read()
        }
    }

    var writable: Bool { context?.channel.isWritable ?? false }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable { partner?.resumeRead() }
        context.fireChannelWritabilityChanged()
    }

    func channelInactive(context: ChannelHandlerContext) {
        // Reset by the caller (or the connection died) before the answer
        // was complete: the workload's stream goes too. After a clean end
        // it closes by itself (closing it would reset it).
        if failed || !responseEnded { partner?.close() }
        partner = nil
        context.fireChannelInactive()
    }

    func close() { context?.close(promise: nil) }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        failed = true
        context.close(promise: nil)
    }
}

/// The workload's side of one proxied stream.
final class L7H2Upstream: ChannelDuplexHandler, @unchecked Sendable {
    typealias InboundIn = HTTP2Frame.FramePayload
    typealias OutboundIn = HTTP2Frame.FramePayload
    typealias OutboundOut = HTTP2Frame.FramePayload

    private weak var downstream: L7H2Stream?
    private var context: ChannelHandlerContext?
    private var pendingRead = false
    var joined = false
    private var ended = false

    init(downstream: L7H2Stream) { self.downstream = downstream }

    func handlerAdded(context: ChannelHandlerContext) { self.context = context }

    func write(_ frame: HTTP2Frame.FramePayload) { context?.write(wrapOutboundOut(frame), promise: nil) }
    func flush() { context?.flush() }
    var writable: Bool { context?.channel.isWritable ?? true }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let frame = unwrapInboundIn(data)
        switch frame {
        case .headers(let h): if h.endStream { ended = true }
        case .data(let d): if d.endStream { ended = true }
        default: break
        }
        downstream?.fromUpstream(frame)
    }

    func channelReadComplete(context: ChannelHandlerContext) { downstream?.flush() }

    func read(context: ChannelHandlerContext) {
        if let d = downstream, !d.writable {
            pendingRead = true
        } else {
            context.read()
        }
    }

    func resumeRead() {
        if pendingRead {
            pendingRead = false
            context?.read()
        }
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable { downstream?.resumeRead() }
        context.fireChannelWritabilityChanged()
    }

    func channelInactive(context: ChannelHandlerContext) {
        // Reset by the workload before its response ended: reset the
        // caller's stream too (a truncated response must not look whole).
        if !ended { downstream?.close() }
        context.fireChannelInactive()
    }

    func close() { context?.close(promise: nil) }

    func errorCaught(context: ChannelHandlerContext, error: Error) { context.close(promise: nil) }
}
