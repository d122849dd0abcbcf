import Foundation
import NIOCore
import PalisadeL7
import PalisadeRelay
import NIOHPACK
import NIOHTTP2
import NIOPosix
import NIOSSL
import PalisadeCA
import PalisadeIdentity
import X509

/// The agent of another node, as a tunnel destination.
public struct TunnelPeer: Hashable, Sendable, CustomStringConvertible {
    public var host: String
    public var port: Int
    /// The peer node's trust domain: its certificate must chain to that bundle.
    public var trustDomain: String
    /// The peer node's SPIFFE ID, when known; otherwise any node identity
    /// (spiffe://TD/palisade/node/...) of that trust domain is accepted.
    public var expectedIdentity: SpiffeID?
    public init(host: String, port: Int, trustDomain: String, expectedIdentity: SpiffeID? = nil) {
        self.host = host; self.port = port; self.trustDomain = trustDomain; self.expectedIdentity = expectedIdentity
    }
    public var description: String { HostPort(host: host, port: port).description }
}

/// The source workload's X.509-SVID, presented as the client certificate.
/// Held in memory (read once when issued), so a rotation rewriting the
/// files can never hand the event loop a certificate without its key.
public struct ClientCredentials: Hashable, Sendable {
    public var spiffeID: SpiffeID
    /// Changes on rotation: a new serial opens a new pooled connection and
    /// retires the old one once its streams are done.
    public var serial: String
    let chainPEM: [UInt8]
    let keyPEM: [UInt8]
    public init(spiffeID: SpiffeID, serial: String, chainPEM: [UInt8], keyPEM: [UInt8]) {
        self.spiffeID = spiffeID; self.serial = serial; self.chainPEM = chainPEM; self.keyPEM = keyPEM
    }
    /// Reads a certificate chain and key; nil if either is missing.
    public init?(spiffeID: SpiffeID, serial: String, certificateFile: String, keyFile: String) {
        guard let c = FileManager.default.contents(atPath: certificateFile), let k = FileManager.default.contents(atPath: keyFile) else { return nil }
        self.init(spiffeID: spiffeID, serial: serial, chainPEM: Array(c), keyPEM: Array(k))
    }
    public static func == (a: Self, b: Self) -> Bool { a.spiffeID == b.spiffeID && a.serial == b.serial }
    public func hash(into h: inout Hasher) { h.combine(spiffeID); h.combine(serial) }
}

public struct TunnelError: Error, CustomStringConvertible {
    public var description: String
    /// The peer agent's HTTP status when it answered the CONNECT.
    public var status: Int?
    init(_ d: String, status: Int? = nil) { description = d; self.status = status }
}

/// Pooled mTLS + HTTP/2 connections to peer agents, per (peer, source
/// identity, certificate serial); each carries many CONNECT streams, up to
/// `streamsPerConnection` (under the 4,096 a peer accepts), and another
/// connection is opened when they are all full (as ztunnel's pool does). All
/// state lives on one event loop, shared with the outbound listener, so
/// streams and accepted sockets can be glued directly.
public final class TunnelPool: @unchecked Sendable {
    public let eventLoop: EventLoop
    let verifier: @Sendable () -> SPIFFEVerifier
    let connectTimeout: TimeAmount

    struct Key: Hashable {
        var peer: TunnelPeer
        var identity: SpiffeID
        var serial: String
    }
    final class Entry {
        let multiplexer: EventLoopFuture<NIOHTTP2Handler.StreamMultiplexer>
        var channel: Channel?
        /// Streams opening or open on this connection.
        var streams = 0
        var retired = false
        init(_ m: EventLoopFuture<NIOHTTP2Handler.StreamMultiplexer>) { multiplexer = m }
        func closeIfDone() {
            if retired && streams == 0 { channel?.close(promise: nil) }
        }
    }
    /// Below the peer's SETTINGS_MAX_CONCURRENT_STREAMS (TunnelSettings: 4,096).
    public let streamsPerConnection: Int
    private var entries: [Key: [Entry]] = [:]
    private var contexts: [ClientCredentials: NIOSSLContext] = [:]
    /// Connections opened so far (for tests and metrics).
    public private(set) var connectionsOpened = 0

    public init(eventLoop: EventLoop, connectTimeout: TimeAmount = .seconds(2), streamsPerConnection: Int = 4000,
                verifier: @escaping @Sendable () -> SPIFFEVerifier) {
        self.eventLoop = eventLoop
        self.streamsPerConnection = streamsPerConnection
        self.connectTimeout = connectTimeout
        self.verifier = verifier
    }

    private var trustFingerprint = ""

    func tlsContext(_ creds: ClientCredentials) throws -> NIOSSLContext {
        // Trust bundles changed (federation, root rotation): rebuild contexts.
        let fp = verifier().fingerprint
        if fp != trustFingerprint {
            contexts.removeAll()
            trustFingerprint = fp
        }
        if let c = contexts[creds] { return c }
        let chain = try NIOSSLCertificate.fromPEMBytes(creds.chainPEM).map { NIOSSLCertificateSource.certificate($0) }
        let key = try NIOSSLPrivateKey(bytes: creds.keyPEM, format: .pem)
        var tls = TLSConfiguration.makeClientConfiguration()
        tls.certificateChain = chain
        tls.privateKey = .privateKey(key)
        tls.minimumTLSVersion = .tlsv13
        tls.maximumTLSVersion = .tlsv13
        tls.certificateVerification = .noHostnameVerification
        tls.trustRoots = .certificates(try verifier().bundles.values.flatMap { $0 }.map {
            try NIOSSLCertificate(bytes: $0.serializeAsPEM().derBytes, format: .der)
        })
        tls.applicationProtocols = ["h2"]
        let ctx = try NIOSSLContext(configuration: tls)
        // Contexts of rotated-away certificates are dropped with their serial.
        contexts = contexts.filter { $0.key.spiffeID != creds.spiffeID }
        contexts[creds] = ctx
        return ctx
    }

    /// Opens a CONNECT stream for `authority` to `peer` as `credentials`.
    /// On a 200 answer the stream becomes a byte stream joined to `glue`
    /// (the other half sits on the caller's channel, on this event loop).
    /// `caller`: the calling workload's address, sent as HBONE does
    /// (`forwarded: for=...`) so the receiving side's rules can match it.
    func openStream(peer: TunnelPeer, credentials: ClientCredentials, authority: String, caller: String? = nil, glue: GlueHandler) -> EventLoopFuture<Void> {
        eventLoop.assertInEventLoop()
        let entry: Entry
        do { entry = try connection(peer: peer, credentials: credentials) } catch {
            return eventLoop.makeFailedFuture(error)
        }
        entry.streams += 1   // counted from now, so a burst spreads over connections
        let opened = entry.multiplexer.assumeIsolated().flatMap { mux in
            let ready = self.eventLoop.makePromise(of: Void.self)
            let streamPromise = self.eventLoop.makePromise(of: Channel.self)
            mux.createStreamChannel(promise: streamPromise) { stream in
                stream.eventLoop.makeCompletedFuture {
                    try stream.pipeline.syncOperations.addHandler(ConnectRequestHandler(authority: authority, caller: caller, glue: glue, ready: ready))
                }
            }
            streamPromise.futureResult.assumeIsolated().whenComplete { result in
                switch result {
                case .success(let stream):
                    stream.closeFuture.assumeIsolated().whenComplete { _ in
                        entry.streams -= 1
                        entry.closeIfDone()
                    }
                case .failure(let e):
                    entry.streams -= 1
                    entry.closeIfDone()
                    ready.fail(e)
                }
            }
            return ready.futureResult
        }
        // No multiplexer (the connection failed): the reservation goes too.
        entry.multiplexer.assumeIsolated().whenFailure { _ in entry.streams -= 1 }
        return opened.nonisolated()
    }

    private func connection(peer: TunnelPeer, credentials: ClientCredentials) throws -> Entry {
        let key = Key(peer: peer, identity: credentials.spiffeID, serial: credentials.serial)
        if let e = entries[key]?.first(where: { $0.streams < streamsPerConnection }) { return e }
        // A rotated certificate: new connections use the new one; the old
        // connections finish the streams they carry, then close.
        for (k, es) in entries where k.peer == peer && k.identity == credentials.spiffeID && k.serial != credentials.serial {
            entries[k] = nil
            for e in es {
                e.retired = true
                e.closeIfDone()
            }
        }
        let ctx = try tlsContext(credentials)
        let verifier = self.verifier
        let verify: @Sendable ([NIOSSLCertificate], EventLoopPromise<NIOSSLVerificationResultWithMetadata>) -> Void = { certs, promise in
            let v = verifier()
            Task {
                let parsed = certs.compactMap { try? Certificate(derEncoded: $0.toDERBytes()) }
                guard parsed.count == certs.count, let leaf = parsed.first else { return promise.succeed(.failed) }
                switch await v.verify(leaf: leaf, intermediates: Array(parsed.dropFirst())) {
                case .success(let id)
                    where id.trustDomain == peer.trustDomain && id.path.hasPrefix("/palisade/node/")
                    && (peer.expectedIdentity == nil || peer.expectedIdentity == id):
                    promise.succeed(.certificateVerified(VerificationMetadata(nil)))
                default:
                    promise.succeed(.failed)
                }
            }
        }
        connectionsOpened += 1
        let entryBox = EntryBox()
        let mux = ClientBootstrap(group: eventLoop)
            .connectTimeout(connectTimeout)
            .channelOption(ChannelOptions.socketOption(.tcp_nodelay), value: 1)
            .channelInitializer { ch in
                ch.eventLoop.makeCompletedFuture {
                    try ch.pipeline.syncOperations.addHandler(NIOSSLClientHandler(context: ctx, serverHostname: nil, customVerificationCallbackWithMetadata: verify))
                    try ch.pipeline.syncOperations.addHandler(FlushCoalescer())
                    try ch.pipeline.syncOperations.addHandler(H2FrameAligner(expectsPreface: false))
                    let mux = try ch.pipeline.syncOperations.configureHTTP2Pipeline(
                        mode: .client, connectionConfiguration: TunnelSettings.connection, streamConfiguration: TunnelSettings.stream
                    ) { $0.close() }   // the peer never opens streams to us
                    entryBox.mux = mux
                }
            }
            .connect(host: peer.host, port: peer.port)
            .flatMapThrowing { ch -> NIOHTTP2Handler.StreamMultiplexer in
                guard let m = entryBox.mux else { throw TunnelError("no HTTP/2 multiplexer") }
                entryBox.channel = ch
                return m
            }
        let entry = Entry(mux)
        entries[key, default: []].append(entry)
        let forget = { [weak entry] in
            // Gone (peer restarted, network cut, idle): the next stream reconnects.
            self.entries[key]?.removeAll { $0 === entry }
            if self.entries[key]?.isEmpty == true { self.entries[key] = nil }
        }
        mux.assumeIsolated().whenComplete { result in
            switch result {
            case .success:
                entry.channel = entryBox.channel
                entryBox.channel?.closeFuture.assumeIsolated().whenComplete { _ in forget() }
            case .failure:
                forget()
            }
        }
        return entry
    }

    /// Live pooled connections (for status and tests).
    public var connectionCount: EventLoopFuture<Int> {
        eventLoop.submit { self.entries.values.reduce(0) { $0 + $1.count } }
    }
}

private final class EntryBox: @unchecked Sendable {
    var mux: NIOHTTP2Handler.StreamMultiplexer?
    var channel: Channel?
}

/// Client side of one CONNECT stream: sends the request, waits for the
/// answer; on 200 installs the byte-stream codec and the glue.
final class ConnectRequestHandler: ChannelInboundHandler, RemovableChannelHandler, @unchecked Sendable {
    typealias InboundIn = HTTP2Frame.FramePayload
    typealias OutboundOut = HTTP2Frame.FramePayload
    let authority: String
    let glue: GlueHandler
    let ready: EventLoopPromise<Void>
    var answered = false

    let caller: String?
    init(authority: String, caller: String?, glue: GlueHandler, ready: EventLoopPromise<Void>) {
        self.authority = authority; self.caller = caller; self.glue = glue; self.ready = ready
    }

    func channelActive(context: ChannelHandlerContext) {
        var headers = HPACKHeaders([(":method", "CONNECT"), (":authority", authority)])
        if let caller { headers.add(name: "forwarded", value: caller.contains(":") ? "for=\"[\(caller)]\"" : "for=\(caller)") }
        context.writeAndFlush(wrapOutboundOut(.headers(.init(headers: headers))), promise: nil)
        context.fireChannelActive()
    }

    func handlerAdded(context: ChannelHandlerContext) {
        if context.channel.isActive { channelActive(context: context) }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        if answered {
            context.fireChannelRead(data)
            return
        }
        guard case .headers(let h) = unwrapInboundIn(data), let status = h.headers.first(name: ":status") else { return }
        answered = true
        guard status == "200" else {
            ready.fail(TunnelError("the peer agent refused the connection (HTTP \(status))", status: Int(status)))
            context.close(promise: nil)
            return
        }
        do {
            let codec = ConnectStreamCodec()
            try context.pipeline.syncOperations.addHandler(codec, position: .after(self))
            try context.pipeline.syncOperations.addHandler(glue, position: .after(codec))
            ready.succeed(())
            context.pipeline.syncOperations.removeHandler(self, promise: nil)
        } catch {
            ready.fail(error)
            context.close(promise: nil)
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        if !answered { ready.fail(TunnelError("the tunnel stream closed before an answer")) }
        answered = true
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        if !answered { ready.fail(error) }
        answered = true
        context.close(promise: nil)
    }
}
