import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOPosix

/// What callers of an admin endpoint (the metrics listener) may hold. The
/// endpoint is on loopback by default, but an operator may open it to a
/// scraper on the network, where anyone can reach it.
public struct AdminLimits: Sendable {
    /// Connections open at once; past it a new one is closed at accept.
    public var maxConnections = 64
    /// From the first byte of a request to its end (slow headers): 408 and close.
    public var requestTimeout: TimeAmount = .seconds(10)
    /// A connection with no request in progress is closed after this
    /// (Prometheus keeps its scrape connection; Go's client idles out at 90 s).
    public var idleTimeout: TimeAmount = .seconds(90)
    /// Request head size: 431 and close past it (a scrape sends a few hundred bytes).
    public var maxHeaderListSize = 16 << 10
    public var maxHeaderFields = 64
    public init() {}
}

/// Why an admin endpoint refused or cut a connection (the `reason` label).
public enum AdminRefusal: String, Sendable, CaseIterable {
    case tooManyConnections = "too-many-connections"
    case requestTimeout = "request-timeout"
    case headerTooLarge = "header-too-large"
    case badRequest = "bad-request"
}

/// A minimal HTTP/1.1 endpoint for Prometheus: GET /metrics returns the
/// exposition, anything else 404. Meant for loopback (the default).
public final class MetricsServer: @unchecked Sendable {
    public typealias Render = @Sendable () -> [UInt8]
    public typealias Refused = @Sendable (AdminRefusal) -> Void
    let group: MultiThreadedEventLoopGroup
    let channel: Channel
    let connections = AdminConnectionCount()

    public var localPort: Int { channel.localAddress?.port ?? 0 }
    /// Connections open now (for tests and status).
    public var openConnections: Int { connections.count }

    public init(host: String, port: Int, limits: AdminLimits = AdminLimits(), refused: @escaping Refused = { _ in },
                render: @escaping Render) throws {
        group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let connections = self.connections
        let decoderLimits = {
            var l = NIOHTTPDecoderLimitConfiguration()
            l.maxHeaderListSize = limits.maxHeaderListSize
            l.maxHeaderFieldSize = limits.maxHeaderListSize
            l.maxHeaderFieldCount = limits.maxHeaderFields
            return l
        }()
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(ChannelOptions.backlog, value: 64)
            .serverChannelOption(ChannelOptions.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    let clock = AdminRequestClock(connections: connections, limits: limits, refused: refused)
                    let sync = channel.pipeline.syncOperations
                    try sync.addHandler(clock)
                    try sync.addHandler(ByteToMessageHandler(HTTPRequestDecoder(leftOverBytesStrategy: .dropBytes,
                                                                                limitConfiguration: decoderLimits)))
                    try sync.addHandler(HTTPResponseEncoder())
                    try sync.addHandler(MetricsHandler(render: render, clock: clock, refused: refused))
                }
            }
        do {
            channel = try bootstrap.bind(host: host, port: port).wait()
        } catch {
            try? group.syncShutdownGracefully()
            throw error
        }
    }

    public func stop() {
        try? channel.close().wait()
        try? group.syncShutdownGracefully()
    }
}

/// Connections open on one admin endpoint.
final class AdminConnectionCount: Sendable {
    private let value = NIOLockedValueBox(0)
    func admit(max: Int) -> Bool {
        value.withLockedValue { n in
            if n >= max { return false }
            n += 1
            return true
        }
    }
    func release() { value.withLockedValue { $0 -= 1 } }
    var count: Int { value.withLockedValue { $0 } }
}

/// First in an admin connection's pipeline, on raw bytes: admits the
/// connection under the cap, starts the request deadline at a request's
/// first byte, and closes connections idle between requests. The handler
/// answering requests tells it when one is complete.
final class AdminRequestClock: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer
    private let connections: AdminConnectionCount
    private let limits: AdminLimits
    private let refused: MetricsServer.Refused
    private var admitted = false
    private var requestDeadline: Scheduled<Void>?
    private var idleDeadline: Scheduled<Void>?
    private var context: ChannelHandlerContext?
    /// The connection is being ended by this handler (a 408): what the
    /// decoder makes of the cut request is no new refusal.
    private(set) var ending = false

    init(connections: AdminConnectionCount, limits: AdminLimits, refused: @escaping MetricsServer.Refused) {
        self.connections = connections; self.limits = limits; self.refused = refused
    }

    func channelActive(context: ChannelHandlerContext) {
        self.context = context
        guard connections.admit(max: limits.maxConnections) else {
            refused(.tooManyConnections)
            context.close(promise: nil)
            return
        }
        admitted = true
        startIdle()
        context.fireChannelActive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard admitted else { return }
        if requestDeadline == nil {
            idleDeadline?.cancel()
            idleDeadline = nil
            requestDeadline = context.eventLoop.scheduleTask(in: limits.requestTimeout) { [weak self] in self?.requestTimedOut() }
        }
        context.fireChannelRead(data)
    }

    /// The request whose bytes started the deadline is decoded whole.
    func requestComplete() {
        requestDeadline?.cancel()
        requestDeadline = nil
        startIdle()
    }

    private func startIdle() {
        idleDeadline?.cancel()
        guard let context else { return }
        idleDeadline = context.eventLoop.assumeIsolated().scheduleTask(in: limits.idleTimeout) { context.close(promise: nil) }
    }

    /// 408 written straight to the socket (this handler sits before the
    /// encoder), then the end of the connection.
    private func requestTimedOut() {
        requestDeadline = nil
        guard let context else { return }
        ending = true
        refused(.requestTimeout)
        var buffer = context.channel.allocator.buffer(capacity: 80)
        buffer.writeString("HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        context.writeAndFlush(wrapOutboundOut(buffer)).assumeIsolated().whenComplete { _ in context.close(promise: nil) }
    }

    func channelInactive(context: ChannelHandlerContext) {
        requestDeadline?.cancel()
        idleDeadline?.cancel()
        if admitted { admitted = false; connections.release() }
        self.context = nil
        context.fireChannelInactive()
    }
}

final class MetricsHandler: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart
    let render: MetricsServer.Render
    let clock: AdminRequestClock
    let refused: MetricsServer.Refused
    var head: HTTPRequestHead?
    private var failed = false

    init(render: @escaping MetricsServer.Render, clock: AdminRequestClock, refused: @escaping MetricsServer.Refused) {
        self.render = render; self.clock = clock; self.refused = refused
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !failed else { return }
        switch unwrapInboundIn(data) {
        case .head(let h): head = h
        case .body: break
        case .end:
            clock.requestComplete()
            guard let h = head else { return }
            head = nil
            let ok = h.method == .GET && (h.uri == "/metrics" || h.uri.hasPrefix("/metrics?"))
            let body = ok ? render() : Array("not found: try /metrics\n".utf8)
            respond(context, version: h.version, status: ok ? .ok : .notFound, body: body,
                    contentType: ok ? "text/plain; version=0.0.4; charset=utf-8" : "text/plain", close: !h.isKeepAlive)
        }
    }

    private func respond(_ context: ChannelHandlerContext, version: HTTPVersion, status: HTTPResponseStatus, body: [UInt8],
                         contentType: String, close: Bool) {
        var headers = HTTPHeaders()
        headers.add(name: "Content-Type", value: contentType)
        headers.add(name: "Content-Length", value: "\(body.count)")
        if close { headers.add(name: "Connection", value: "close") }
        context.write(wrapOutboundOut(.head(HTTPResponseHead(version: version, status: status, headers: headers))), promise: nil)
        var buffer = context.channel.allocator.buffer(capacity: body.count)
        buffer.writeBytes(body)
        context.write(wrapOutboundOut(.body(.byteBuffer(buffer))), promise: nil)
        context.writeAndFlush(wrapOutboundOut(.end(nil))).assumeIsolated().whenComplete { _ in
            if close { context.close(promise: nil) }
        }
    }

    /// A request the decoder refused: 431 for a head past the limits, 400
    /// otherwise, and the end of the connection.
    func errorCaught(context: ChannelHandlerContext, error: Error) {
        guard !failed, !clock.ending else { return }
        failed = true
        guard let e = error as? HTTPParserError else { context.close(promise: nil); return }
        let tooLarge = e == .headerOverflow
        refused(tooLarge ? .headerTooLarge : .badRequest)
        clock.requestComplete()
        respond(context, version: .http1_1, status: tooLarge ? .requestHeaderFieldsTooLarge : .badRequest,
                body: Array("\(tooLarge ? "request head too large" : "bad request")\n".utf8), contentType: "text/plain", close: true)
    }
}
