import Foundation
import NIOConcurrencyHelpers
import NIOCore
import PalisadeRelay
import NIOHTTP1
import PalisadeIdentity

/// The in-agent HTTP/1.1 proxy on one tunnel stream (the caller's side):
/// requests are framed from the caller's bytes (HTTP1RequestFramer, which
/// refuses anything two parsers could read differently), judged one by
/// one, allowed ones forwarded to the workload as received, in order,
/// denied ones answered with 403 — the connection stays usable. Bodies
/// stream through, never buffered whole; at most `maxQueuedParts`
/// pipelined parts wait.
final class L7Gate: ChannelDuplexHandler, RemovableChannelHandler, @unchecked Sendable {
    package typealias InboundIn = ByteBuffer
    /// What followed a WebSocket handshake, to the byte relay.
    package typealias InboundOut = ByteBuffer
    /// Responses go to the caller as bytes: the workload's as it sent them
    /// (HTTP1ResponseFramer), the proxy's own written out by `answer`.
    package typealias OutboundIn = ByteBuffer
    package typealias OutboundOut = ByteBuffer

    let l7: L7Context
    var gate: HTTPGate { l7.gate }
    var upstream: Channel?
    var context: ChannelHandlerContext?
    var upgrade = UpgradeState.none
    let framer: HTTP1RequestFramer
    private typealias Request = (head: HTTP1RequestFramer.Head, verdict: HTTPVerdict, start: Date, bytesIn: Int)
    private var queue: [HTTP1RequestFramer.Event] = []
    private var current: Request?
    private var awaitingResponse = false
    private var responseStatus = 0
    private var responseBytes = 0
    private var inputClosed = false
    private var pendingRead = false
    static let maxQueuedParts = 4096
    let limits: HTTPLimits
    /// Between requests: set when the first byte of the next head arrives,
    /// the head must be complete before it fires (408, then the end).
    /// (The three timers are lazy: moved per request, scheduled rarely.)
    private var headDeadline: LazyDeadline?
    /// A request body is arriving (head decoded, end not yet).
    private var inBody = false
    private var lastBytes = NIODeadline.now()
    private var bodyCheck: LazyDeadline?
    /// Between requests with no bytes coming: the end of the connection.
    private var idleDeadline: LazyDeadline?
    /// The workload's response to the current request has begun.
    private var responseStarted = false

    init(_ l7: L7Context) {
        self.l7 = l7
        let limits = HTTPLimits.current
        self.limits = limits
        framer = HTTP1RequestFramer(maxHeadBytes: limits.maxHeaderListSize, maxFields: limits.maxHeaderFields)
    }

    /// Bytes from the caller arrived: the slow-headers and stalled-body
    /// timers count from the bytes, not from whole heads.
    func bytesArrived() {
        lastBytes = .now()
        idleDeadline?.clear()
        guard !inBody, headDeadline?.isArmed == false, upgrade == .none, !refused else { return }
        headDeadline?.arm(in: limits.requestHeadTimeout)
    }

    private func headTimedOut() {
        // Not the caller's fault while the proxy itself is not reading.
        if pendingRead { bytesArrived(); return }
        timedOut()
    }

    private func checkBody() {
        guard inBody, context != nil else { return }
        let idle = NIODeadline.now() - lastBytes
        if pendingRead || idle < limits.bodyIdleTimeout {
            if pendingRead { lastBytes = .now() }
            bodyCheck?.arm(in: limits.bodyIdleTimeout - (pendingRead ? .zero : idle))
            return
        }
        timedOut()
    }

    /// 408 Request Timeout and the end of the connection (no request in
    /// progress is forwarded further).
    private func timedOut() {
        guard let context, !refused else { return }
        refused = true
        queue.removeAll()
        let upstream = self.upstream
        self.upstream = nil
        if responseStarted {
            context.close(promise: nil)   // a response had begun: no clean answer possible
            upstream?.close(promise: nil)
            return
        }
        context.writeAndFlush(wrapOutboundOut(Self.answer(.http1_1, .requestTimeout, close: true, allocator: context.channel.allocator)))
            .assumeIsolated().whenComplete { _ in
            context.close(promise: nil)
            upstream?.close(promise: nil)
        }
    }

    /// Follows request boundaries as the framer finds them (before the
    /// queue), for the timers.
    private func track(_ part: HTTP1RequestFramer.Event) {
        switch part {
        case .head:
            headDeadline?.clear()
            inBody = true
            if bodyCheck?.isArmed == false { bodyCheck?.arm(in: limits.bodyIdleTimeout) }
        case .body:
            break
        case .end:
            inBody = false
            bodyCheck?.clear()
            armIdle()
        }
    }

    /// After a request (and after its response): no bytes for the
    /// keep-alive timeout end the connection. (Also bounds a pipelined head
    /// that arrived in part and stalled.)
    private func armIdle() { idleDeadline?.arm(in: limits.keepAliveTimeout) }

    private func idleTimedOut() {
        guard !awaitingResponse, current == nil, !pendingRead, !inBody else { return }
        finish()
    }

    /// Backpressure: the caller is read only while the workload's
    /// connection can take more (and no response is awaited with parts
    /// queued), so a body of any size streams through bounded buffers.
    package func read(context: ChannelHandlerContext) {
        // (After an upgrade request nothing more is read until the
        // workload's answer says what the bytes are.)
        if framer.isHolding {
            pendingRead = true
        } else if let upstream, !upstream.isWritable || queue.count > 64 {
            pendingRead = true
        } else {
            context.read()
        }
    }

    func resumeRead() {
        guard pendingRead, let context, !framer.isHolding else { return }
        if let upstream, !upstream.isWritable || queue.count > 64 { return }
        pendingRead = false
        context.read()
    }

    var writable: Bool { context?.channel.isWritable ?? false }
    /// Held strongly both ways (no side tables on the per-request path);
    /// the pair is unlinked when either handler leaves its pipeline.
    var upstreamHandler: L7Upstream?

    package func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable { upstreamHandler?.resumeRead() }
        context.fireChannelWritabilityChanged()
    }

    package func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        let loop = context.eventLoop
        // Strong captures, dropped by stopTimers (handlerRemoved): a weak
        // reference to the gate would send every retain of it, several per
        // request, through its side table.
        headDeadline = LazyDeadline(on: loop) { self.headTimedOut() }
        bodyCheck = LazyDeadline(on: loop) { self.checkBody() }
        idleDeadline = LazyDeadline(on: loop) { self.idleTimedOut() }
    }

    private func stopTimers() {
        headDeadline?.stop()
        bodyCheck?.stop()
        idleDeadline?.stop()
    }

    /// A context holds its handler: keeping it past removal would keep the
    /// gate, both pipelines and the workload's channel alive after the
    /// connection ended.
    package func handlerRemoved(context: ChannelHandlerContext) {
        // After a 101: what the caller sent after its handshake goes on
        // to the byte relay that replaced the proxy (L7Upgrade.swift).
        if upgrade == .switching {
            let held = framer.takeHeld()
            if held.readableBytes > 0 { context.fireChannelRead(wrapInboundOut(held)) }
        }
        self.context = nil
        stopTimers()
        upstreamHandler?.gate = nil
        upstreamHandler = nil
    }

    /// Taken out in a task of its own, so never in the middle of a read.
    package func removeHandler(context: ChannelHandlerContext, removalToken: ChannelHandlerContext.RemovalToken) {
        context.eventLoop.assumeIsolated().execute { context.leavePipeline(removalToken: removalToken) }
    }

    /// Parts written without a flush, to the workload and to the caller:
    /// the end of a read flushes only then (an HTTP/2 stream's flush costs
    /// a pass through the connection's HTTP/2 handler even with nothing
    /// to send, and each request's end is already flushed).
    var upstreamUnflushed = false
    var callerUnflushed = false

    package func channelReadComplete(context: ChannelHandlerContext) {
        if upstreamUnflushed {
            upstreamUnflushed = false
            upstream?.flush()
        }
        context.fireChannelReadComplete()
    }

    package func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var bytes = unwrapInboundIn(data)
        bytesArrived()
        guard !refused else { return }
        do {
            try framer.feed(&bytes) { part in
                track(part)
                queue.append(part)
            }
        } catch {
            // A request the framer refused (smuggling attempt, bad field):
            // what came before it is handled, it is answered 400 (431
            // past the head limits), never forwarded, nor anything after.
            pump()
            badRequest(context, status: HTTPResponseStatus(statusCode: (error as? HTTP1Malformed)?.status ?? 400))
            return
        }
        if queue.count > Self.maxQueuedParts {
            context.close(promise: nil)   // pipelining beyond the limit
            return
        }
        pump()
    }

    /// A refused request ended the connection: nothing after it is handled.
    var refused = false

    /// A bearer token is being verified: the request's parts wait.
    private var verifying = false

    private func pump() {
        if refused { queue.removeAll(); return }
        while !awaitingResponse, !verifying, !queue.isEmpty, !refused {
            handle(queue.removeFirst())
        }
        if inputClosed && queue.isEmpty && !awaitingResponse && !verifying { finish() }
        resumeRead()
    }

    private func handle(_ part: HTTP1RequestFramer.Event) {
        switch part {
        case .head(let h):
            // RFC 9112 §3.2: exactly one valid Host (an HTTP/1.0 request
            // may have none). Two would let the rules read one and the
            // workload the other.
            if h.hostFields > 1 || (h.hostFields == 0 && h.minor != 0) || !h.hostsValid {
                if let context { badRequest(context) }
                return
            }
            if let verify = l7.verifyBearer, let token = bearerToken(h.first("authorization")), let context {
                verifying = true
                verify(token, context.eventLoop).whenComplete { result in
                    self.verifying = false
                    self.judge(h, jwtIdentity: bearerIdentity(result))
                    self.pump()
                    // (No read completion follows: what pump wrote goes now.)
                    if self.upstreamUnflushed {
                        self.upstreamUnflushed = false
                        self.upstream?.flush()
                    }
                }
                return
            }
            judge(h, jwtIdentity: nil)
        case .body(let b, let payload):
            current?.bytesIn += payload
            if current?.verdict.allowed == true {
                upstream?.write(b, promise: nil)
                upstreamUnflushed = true
            }
        case .end:
            guard let cur = current else { return }
            if cur.verdict.allowed {
                awaitingResponse = true
                responseStatus = 0
                responseBytes = 0
                upstreamUnflushed = false
                upstream?.flush()
            } else {
                deny(cur)
            }
        }
    }

    private func judge(_ h: HTTP1RequestFramer.Head, jwtIdentity: String?) {
        let headers = l7.usesHeaders ? h.fieldValues() : [:]
        let verdict = gate(h.method, h.target, h.host, headers, jwtIdentity)
        upgrade = Self.upgradeIntent(h)
        current = (h, verdict, Date(), 0)
        if verdict.allowed {
            upstreamHandler?.framer.requestForwarded(h.method == "HEAD" ? .head : h.method == "CONNECT" ? .connect : .other)
            let bytes = h.upgrade && upgrade == .closeAfterResponse ? Self.withoutUpgrade(h.bytes, allocator: context?.channel.allocator ?? ByteBufferAllocator()) : h.bytes
            upstream?.write(bytes, promise: nil)
            upstreamUnflushed = true
        }
    }

    private func deny(_ cur: Request) {
        guard let context else { return }
        let body = "\(cur.verdict.reason)\n"
        // After an upgrade request the framer reads no further request.
        context.writeAndFlush(wrapOutboundOut(Self.answer(HTTPVersion(major: 1, minor: cur.head.minor), .forbidden, close: upgrade != .none, body: body,
                                                          allocator: context.channel.allocator)), promise: nil)
        record(cur, status: 403, bytesOut: body.utf8.count)
        current = nil
        if upgrade != .none { refused = true; finish() }
    }

    private func record(_ cur: Request, status: Int, bytesOut: Int) {
        let path = withoutQuery(cur.head.target)
        l7.record(method: cur.head.method, path: path, status: status, requestBytes: cur.bytesIn, responseBytes: bytesOut,
                  start: cur.start, verdict: cur.verdict)
    }

    /// What the workload's response brought (HTTP1ResponseFramer).
    func fromUpstream(_ event: HTTP1ResponseFramer.Event) {
        guard let context else { return }
        switch event {
        case .head(let h):
            // 100 Continue, 103 Early Hints: passed on as they come (a
            // client waiting for 100 before sending its body would stall).
            if h.status < 200 && h.status != 101 {
                context.writeAndFlush(wrapOutboundOut(h.bytes), promise: nil)
                return
            }
            responseStatus = h.status
            var bytes = h.bytes
            switch (upgrade, h.status) {
            case (.websocket, 101):
                upgrade = .switching
            case (_, 101):
                // A protocol switch the proxy did not forward: the bytes
                // after it could not be judged.
                context.close(promise: nil)
                upstream?.close(promise: nil)
                return
            case (.none, _):
                // As received: with the body when the framer can.
                if upstreamHandler?.framer.headGoesWithBody == true { return }
            default:
                upstreamHandler?.framer.headGoesWithBody = false
                bytes = Self.withConnectionClose(h.bytes, allocator: context.channel.allocator)
                upgrade = .closeAfterResponse
            }
            responseStarted = true
            context.write(wrapOutboundOut(bytes), promise: nil)
            callerUnflushed = true
        case .body(let b, let payload):
            responseBytes += payload
            responseStarted = true
            context.write(wrapOutboundOut(b), promise: nil)
            callerUnflushed = true
        case .end:
            responseStarted = false
            armIdle()
            callerUnflushed = false
            context.flush()
            if let cur = current { record(cur, status: responseStatus, bytesOut: responseBytes) }
            current = nil
            awaitingResponse = false
            switch upgrade {
            case .switching: return switchToBytes()
            case .closeAfterResponse, .websocket: refused = true; return finish()
            case .none: pump()
            }
        }
    }

    /// The workload's response could not be framed strictly (see
    /// HTTP1ResponseFramer): 502 if none of it reached the caller yet,
    /// then the end of both connections.
    func upstreamMalformed() {
        guard let context else { return }
        let upstream = self.upstream
        self.upstream = nil
        upstream?.close(promise: nil)
        if responseStarted || refused {
            context.close(promise: nil)
            return
        }
        refused = true
        queue.removeAll()
        if let cur = current {
            record(cur, status: 502, bytesOut: 0)
            current = nil
        }
        context.writeAndFlush(wrapOutboundOut(Self.answer(.http1_1, .badGateway, close: true, allocator: context.channel.allocator)))
            .assumeIsolated().whenComplete { _ in context.close(mode: .output, promise: nil) }
    }

    /// A response of the proxy's own, written out.
    static func answer(_ version: HTTPVersion, _ status: HTTPResponseStatus, close: Bool, body: String = "",
                       allocator: ByteBufferAllocator) -> ByteBuffer {
        var b = allocator.buffer(capacity: 128 + body.utf8.count)
        b.writeString("HTTP/\(version.major).\(version.minor) \(status.code) \(status.reasonPhrase)\r\n")
        if !body.isEmpty { b.writeString("content-type: text/plain\r\n") }
        b.writeString("content-length: \(body.utf8.count)\r\n")
        if close { b.writeString("connection: close\r\n") }
        b.writeString("\r\n")
        b.writeString(body)
        return b
    }

    /// A head (already checked by the framer) with its Connection fields
    /// replaced by `connection: close`; the other fields are written
    /// `name: value`, as the framer read them.
    static func withConnectionClose(_ head: ByteBuffer, allocator: ByteBufferAllocator) -> ByteBuffer {
        var out = allocator.buffer(capacity: head.readableBytes + 19)
        head.withUnsafeReadableBytes { p in
            let fields = HTTP1Syntax.fieldsStart(p)
            out.writeBytes(UnsafeRawBufferPointer(rebasing: p[..<fields]))   // the status line
            try? HTTP1Syntax.forEachField(p, from: fields, context: "header") { name, value in
                guard !HTTP1Syntax.equalsIgnoringCase(p, name, "connection") else { return }
                HTTP1Syntax.writeField(&out, p, name, value)
            }
        }
        out.writeString("connection: close\r\n\r\n")
        return out
    }

    package func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let e = event as? ChannelEvent, e == .inputClosed {
            inputClosed = true
            pump()
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    func finish() {
        upstream?.close(promise: nil)
        context?.close(mode: .output, promise: nil)
    }

    package func errorCaught(context: ChannelHandlerContext, error: Error) {
        context.close(promise: nil)
        upstream?.close(promise: nil)
    }

    /// 400 and the end of the connection: the request is never forwarded,
    /// nor anything after it.
    private func badRequest(_ context: ChannelHandlerContext, status: HTTPResponseStatus = .badRequest) {
        guard !refused else { return }
        refused = true
        current = nil
        queue.removeAll()
        headDeadline?.clear()
        bodyCheck?.clear()
        // End the stream cleanly (END_STREAM after the answer): a reset
        // could overtake the 400 on its way to the caller.
        let upstream = self.upstream
        self.upstream = nil
        context.writeAndFlush(wrapOutboundOut(Self.answer(.http1_1, status, close: true, allocator: context.channel.allocator)))
            .assumeIsolated().whenComplete { _ in
            context.close(mode: .output, promise: nil)
            upstream?.close(promise: nil)
        }
    }

    package func channelInactive(context: ChannelHandlerContext) {
        stopTimers()
        upstream?.close(promise: nil)
        context.fireChannelInactive()
    }
}

/// The workload's side: responses go back through the gate, read only
/// while the caller's side can take them.
final class L7Upstream: ChannelDuplexHandler, RemovableChannelHandler, @unchecked Sendable {
    package typealias InboundIn = ByteBuffer
    package typealias InboundOut = ByteBuffer
    package typealias OutboundIn = ByteBuffer
    let framer = HTTP1ResponseFramer()
    private var reading = false
    /// Strong (see L7Gate.upstreamHandler), unlinked at removal.
    var gate: L7Gate?
    let stream: Channel
    private var context: ChannelHandlerContext?
    private var pendingRead = false
    init(gate: L7Gate, stream: Channel) { self.gate = gate; self.stream = stream }
    package func handlerAdded(context: ChannelHandlerContext) { self.context = context }
    package func handlerRemoved(context: ChannelHandlerContext) {
        // After a 101: the switched protocol's first bytes go on to the
        // byte relay that replaced the HTTP handlers (L7Upgrade.swift).
        let after = framer.takeAfterUpgrade()
        if after.readableBytes > 0 { context.fireChannelRead(wrapInboundOut(after)) }
        self.context = nil
        gate?.upstreamHandler = nil
        gate = nil
    }
    /// Taken out in a task of its own, so never in the middle of a read
    /// (the gate switches to bytes from inside one).
    package func removeHandler(context: ChannelHandlerContext, removalToken: ChannelHandlerContext.RemovalToken) {
        context.eventLoop.assumeIsolated().execute { context.leavePipeline(removalToken: removalToken) }
    }
    package func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var bytes = unwrapInboundIn(data)
        reading = true
        defer { reading = false }
        do {
            try framer.feed(&bytes) { gate?.fromUpstream($0) }
        } catch {
            gate?.upstreamMalformed()
            context.close(promise: nil)
        }
    }
    package func channelReadComplete(context: ChannelHandlerContext) {
        if let gate, gate.callerUnflushed {
            gate.callerUnflushed = false
            stream.flush()
        }
        context.fireChannelReadComplete()
    }
    package func read(context: ChannelHandlerContext) {
        if let gate, !gate.writable {
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
    package func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable { gate?.resumeRead() }
        context.fireChannelWritabilityChanged()
    }
    package func channelInactive(context: ChannelHandlerContext) {
        // The workload closed: a body that ran to the close ends here, and
        // the stream after what was already sent. (Closed from inside a
        // read, the gate closed it, and ends the caller's side itself: with
        // a 502 first if the response was malformed.)
        if !reading {
            try? framer.inputClosed { gate?.fromUpstream($0) }
            stream.close(mode: .output, promise: nil)
        }
        context.fireChannelInactive()
    }
    package func errorCaught(context: ChannelHandlerContext, error: Error) { context.close(promise: nil) }
}

extension L7Gate {
    /// Puts the HTTP/1.1 proxy between a caller's byte stream (after
    /// `after`, or at the end) and the workload's connection.
    static func install(stream: Channel, upstream: Channel, l7: L7Context, after: ChannelHandler? = nil) throws {
        let gate = L7Gate(l7)
        gate.upstream = upstream
        let up = L7Upstream(gate: gate, stream: stream)
        gate.upstreamHandler = up
        try upstream.pipeline.syncOperations.addHandler(up)
        let ops = stream.pipeline.syncOperations
        if let after { try ops.addHandler(gate, position: .after(after)) } else { try ops.addHandler(gate) }
    }
}
