import Foundation
import NIOCore
import PalisadeL7
import PalisadeRelay
import NIOHPACK
import NIOHTTP1
import NIOHTTP2
import NIOPosix
import PalisadeIdentity

/// What the receiving agent decides for one CONNECT stream.
public enum InboundDecision: Sendable {
    /// Connect to the destination with this socket mark (the authenticated
    /// source identity for the kernel's policy check).
    case deliver(mark: UInt32)
    /// Deliver through the in-agent HTTP proxy: each request is judged by
    /// the destination's L7 rules.
    case deliverHTTP(mark: UInt32, destination: String, usesHeaders: Bool = true, verifyBearer: BearerVerifier? = nil,
                     appProtocol: L7AppProtocol = .detect, gate: HTTPGate)
    /// Refuse with an HTTP status and a short reason (no internals).
    case refuse(status: Int, reason: String)
}

/// One inbound HBONE stream's facts, for the decision and for logs.
public struct InboundRequest: Sendable {
    public var peer: SpiffeID
    public var host: String
    public var port: Int
    /// The calling workload's address as the sending agent reports it
    /// (`forwarded: for=`); the receiver checks it belongs to `peer`.
    public var caller: String? = nil
    /// Where the tunnel connection comes from (the sending node's address).
    public var sourceAddress: String? = nil
}

/// The address in a `forwarded: for=...` header (RFC 7239), if any.
func forwardedFor(_ value: String?) -> String? {
    guard let value, let r = value.range(of: "for=") else { return nil }
    var v = value[r.upperBound...].prefix { $0 != ";" && $0 != "," }.trimmingCharacters(in: .whitespaces)
    v = v.trimmingCharacters(in: CharacterSet(charactersIn: "\""))
    if v.hasPrefix("[") { v = String(v.dropFirst().prefix { $0 != "]" }) }
    return v.isEmpty ? nil : v
}

public typealias InboundAuthorizer = @Sendable (InboundRequest) -> InboundDecision

/// Parses ":authority" of a CONNECT request: "a.b.c.d:port" or "[v6]:port".
func parseAuthority(_ a: String) -> (host: String, port: Int)? {
    HostPort(a).map { ($0.host, $0.port) }
}

/// Serves one HTTP/2 stream of the tunnel: a CONNECT to HOST:PORT is judged,
/// then the agent connects to the destination (marked with the source
/// identity) and the stream and that connection are glued together.
final class TunnelInboundStream: ChannelInboundHandler, RemovableChannelHandler, @unchecked Sendable {
    typealias InboundIn = HTTP2Frame.FramePayload
    typealias OutboundOut = HTTP2Frame.FramePayload

    let peer: SpiffeID
    let authorize: InboundAuthorizer
    let connectTimeout: TimeAmount
    let onStream: (@Sendable (InboundRequest, InboundDecision, String?) -> Void)?
    var accessLog: HTTPRecorderFactory?
    private var started = false
    fileprivate(set) var forwarding = false
    fileprivate(set) var buffered: [NIOAny] = []

    init(peer: SpiffeID, authorize: @escaping InboundAuthorizer, connectTimeout: TimeAmount,
         onStream: (@Sendable (InboundRequest, InboundDecision, String?) -> Void)?) {
        self.peer = peer; self.authorize = authorize; self.connectTimeout = connectTimeout; self.onStream = onStream
    }

    /// The answer to the CONNECT: 200 opens the byte stream; a refusal ends
    /// the stream with a short plain-text reason.
    func respond(_ context: ChannelHandlerContext, status: Int, body: String? = nil) {
        let headers = status == 200 ? HPACKHeaders([(":status", "200")])
            : HPACKHeaders([(":status", "\(status)"), ("content-type", "text/plain")])
        context.write(wrapOutboundOut(.headers(.init(headers: headers, endStream: status != 200 && body == nil))), promise: nil)
        if let body {
            var b = context.channel.allocator.buffer(capacity: body.utf8.count + 1)
            b.writeString(body + "\n")
            context.write(wrapOutboundOut(.data(.init(data: .byteBuffer(b), endStream: true))), promise: nil)
        }
        context.flush()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        if forwarding {
            context.fireChannelRead(data)
            return
        }
        if started {
            buffered.append(data)   // data sent before the destination answered
            return
        }
        let frame = unwrapInboundIn(data)
        guard case .headers(let h) = frame else {
            respond(context, status: 400, body: "expected a CONNECT request")
            return
        }
        started = true
        let method = h.headers.first(name: ":method")
        guard method == "CONNECT", let authority = h.headers.first(name: ":authority"), let (host, port) = parseAuthority(authority) else {
            respond(context, status: 400, body: "expected CONNECT with :authority HOST:PORT")
            return
        }
        let request = InboundRequest(peer: peer, host: host, port: port, caller: forwardedFor(h.headers.first(name: "forwarded")),
                                     sourceAddress: context.channel.parent?.remoteAddress?.ipAddress)
        let decision = authorize(request)
        let mark: UInt32
        var httpGate: HTTPGate?, usesHeaders = true, verifyBearer: BearerVerifier?, appProtocol = L7AppProtocol.detect
        var destinationID = "\(host):\(port)"
        switch decision {
        case .deliver(let m): mark = m
        case .deliverHTTP(let m, let d, let u, let v, let a, let g):
            mark = m; httpGate = g; destinationID = d; usesHeaders = u; verifyBearer = v; appProtocol = a
        case .refuse(let status, let reason):
            onStream?(request, decision, nil)
            respond(context, status: status, body: reason)
            return
        }
        let stream = context.channel
        if let httpGate {
            deliverHTTP(context, request: request, decision: decision, mark: mark, destination: destinationID, usesHeaders: usesHeaders,
                        verifyBearer: verifyBearer, appProtocol: appProtocol, gate: httpGate)
            return
        }
        let (streamGlue, tcpGlue) = GlueHandler.pair()
        streamGlue.isStream = true
        markedConnection(on: context.eventLoop, mark: mark, connectTimeout: connectTimeout)
            .channelInitializer { ch in
                ch.eventLoop.makeCompletedFuture { try ch.pipeline.syncOperations.addHandler(tcpGlue) }
            }
            .connect(host: host, port: port)
            .hop(to: context.eventLoop)
            .assumeIsolated()
            .whenComplete { result in
                switch result {
                case .success:
                    self.onStream?(request, decision, nil)
                    self.respond(context, status: 200)
                    do { try self.handOver(context, to: streamGlue) } catch { stream.close(promise: nil) }
                case .failure(let error):
                    self.onStream?(request, .refuse(status: 503, reason: "destination unreachable"), "\(error)")
                    self.respond(context, status: 503, body: "destination unreachable")
                }
            }
    }
}

extension TunnelInboundStream {
    /// The CONNECT was answered: the stream's bytes go to `next` from now
    /// on (through the byte codec), with what arrived meanwhile first, and
    /// this handler leaves the pipeline.
    func handOver(_ context: ChannelHandlerContext, to next: ChannelHandler) throws {
        let ops = context.channel.pipeline.syncOperations
        let codec = ConnectStreamCodec()
        try ops.addHandler(codec, position: .after(self))
        try ops.addHandler(next, position: .after(codec))
        forwarding = true
        let pending = buffered
        buffered = []
        for d in pending { context.fireChannelRead(d) }
        context.fireChannelReadComplete()
        ops.removeHandler(self, promise: nil)
    }

    /// Connects to the workload and puts the HTTP proxy between the stream
    /// and that connection.
    func deliverHTTP(_ context: ChannelHandlerContext, request: InboundRequest, decision: InboundDecision, mark: UInt32,
                     destination: String, usesHeaders: Bool, verifyBearer: BearerVerifier?, appProtocol: L7AppProtocol, gate: @escaping HTTPGate) {
        let stream = context.channel
        let l7 = L7Context(gate: gate, usesHeaders: usesHeaders, verifyBearer: verifyBearer, appProtocol: appProtocol, source: request.peer.description,
                           destination: destination, destinationAddress: "\(request.host):\(request.port)", log: accessLog?(request.peer.description, destination), callerIsStream: true)
        // Nothing is read from the workload until the proxy for the
        // caller's protocol is in place (an HTTP/2 server speaks first).
        markedConnection(on: context.eventLoop, mark: mark, connectTimeout: connectTimeout, proxied: true)
            .connect(host: request.host, port: request.port)
            .hop(to: context.eventLoop)
            .assumeIsolated()
            .whenComplete { result in
                switch result {
                case .success(let upstream):
                    self.onStream?(request, decision, nil)
                    self.respond(context, status: 200)
                    do {
                        // HTTP/1.1 or HTTP/2 is known from the first bytes.
                        try self.handOver(context, to: L7ProtocolSniffer(upstream: upstream, l7: l7))
                    } catch {
                        stream.close(promise: nil)
                        upstream.close(promise: nil)
                    }
                case .failure(let error):
                    self.onStream?(request, .refuse(status: 503, reason: "destination unreachable"), "\(error)")
                    self.respond(context, status: 503, body: "destination unreachable")
                }
            }
    }
}

extension InboundProxy {
    /// HTTP/2 server for the tunnel on a verified connection.
    static func configureTunnel(_ channel: Channel, peer: SpiffeID, authorize: @escaping InboundAuthorizer,
                                onStream: (@Sendable (InboundRequest, InboundDecision, String?) -> Void)?,
                                accessLog: HTTPRecorderFactory?, timeouts: TunnelTimeouts = TunnelTimeouts()) throws {
        // Streams' flushes in one event-loop tick leave as one TLS write.
        try channel.pipeline.syncOperations.addHandler(FlushCoalescer())
        // The same guard as the proxy's caller side: a GOAWAY of a connection
        // error ends the connection, WINDOW_UPDATE floods are cut off.
        try channel.pipeline.syncOperations.addHandler(H2CallerGuard())
        try channel.pipeline.syncOperations.addHandler(H2FrameAligner(expectsPreface: true))
        // (Streams run on their connection's event loop.)
        let idle = NIOLoopBound(TunnelConnectionIdle(channel: channel, timeout: timeouts.connectionIdle), eventLoop: channel.eventLoop)
        _ = try channel.pipeline.syncOperations.configureHTTP2Pipeline(
            mode: .server, connectionConfiguration: TunnelSettings.connection, streamConfiguration: TunnelSettings.stream
        ) { stream in
            stream.eventLoop.makeCompletedFuture {
                idle.value.streamOpened(stream)
                let handler = TunnelInboundStream(peer: peer, authorize: authorize, connectTimeout: .seconds(3), onStream: onStream)
                handler.accessLog = accessLog
                try stream.pipeline.syncOperations.addHandler(StreamIdleTimeout(timeout: timeouts.streamIdle))
                try stream.pipeline.syncOperations.addHandler(handler)
            }
        }
    }
}

/// HTTP/2 settings of both ends of the tunnel: many concurrent streams per
/// connection (one per proxied TCP connection) and windows large enough
/// for bulk transfers between nodes.
enum TunnelSettings {
    static let streamWindow: Int32 = 1 << 20
    static var connection: NIOHTTP2Handler.ConnectionConfiguration {
        var c = NIOHTTP2Handler.ConnectionConfiguration()
        c.initialSettings = [
            HTTP2Setting(parameter: .maxConcurrentStreams, value: 4096),
            // 1 MiB per stream: what one stream may have buffered here when
            // its workload reads slowly. Bulk through the lab tunnel is the
            // same at 4 MiB (4.6-5.2 Gb/s, CPU-bound) and ~25% lower at 256
            // KiB. With H2FrameAligner a receiving agent's anonymous memory
            // stays at 6-7 MB at full speed.
            HTTP2Setting(parameter: .initialWindowSize, value: Int(TunnelSettings.streamWindow)),
            HTTP2Setting(parameter: .maxFrameSize, value: 1 << 16),
            // A CONNECT request is a few hundred bytes.
            HTTP2Setting(parameter: .maxHeaderListSize, value: 16 << 10),
        ]
        // The connection-level window (NIO's default is HTTP/2's 64 KiB)
        // caps what all streams together have in flight: with one tunnel
        // per peer and identity, that was the bulk throughput limit.
        c.targetWindowSize = 16 << 20
        return c
    }
    static var stream: NIOHTTP2Handler.StreamConfiguration {
        var s = NIOHTTP2Handler.StreamConfiguration()
        s.targetWindowSize = Int(TunnelSettings.streamWindow)
        s.outboundBufferSizeHighWatermark = 1 << 20
        s.outboundBufferSizeLowWatermark = 256 << 10
        return s
    }
}
