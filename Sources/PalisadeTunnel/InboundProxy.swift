import Foundation
import NIOConcurrencyHelpers
import NIOCore
import PalisadeL7
import PalisadeRelay
import NIOPosix
import NIOSSL
import NIOTLS
import PalisadeCA
import PalisadeIdentity
import X509

/// The inbound proxy, the agent's mTLS listener (the receiving side, as
/// OutboundProxy is the sending one): TLS 1.3 only, a client certificate required,
/// and that certificate judged during the handshake by the SPIFFE verifier
/// (trust bundle of the peer's own trust domain). A peer that negotiates
/// ALPN "h2" gets the HBONE-style tunnel (HTTP/2 CONNECT streams, judged by
/// `authorize`); any other verified peer is answered with the SPIFFE ID it
/// was authenticated as, then closed (a probe for operators and tests).
public final class InboundProxy: @unchecked Sendable {
    let group: EventLoopGroup
    /// A group made here (none given) is shut down with the listener.
    private let ownsGroup: Bool
    let channel: Channel
    let lock = NSLock()
    var context: NIOSSLContext
    private var _verifier: SPIFFEVerifier
    var verifier: SPIFFEVerifier { lock.withLock { _verifier } }
    private var certificateFile: String
    private var keyFile: String
    public var localPort: Int { channel.localAddress?.port ?? 0 }
    /// Called with each refusal (for logs and metrics); never with key material.
    public var onReject: (@Sendable (String) -> Void)?
    /// Called with each verified peer.
    public var onAccept: (@Sendable (SpiffeID) -> Void)?
    /// Called once per failed handshake, whether the SPIFFE verifier or the
    /// TLS library refused it (a bad key usage, TLS below 1.3, ...).
    public var onHandshakeFailure: (@Sendable () -> Void)?
    /// Judges each tunnel stream; nil serves no tunnel.
    public var authorize: InboundAuthorizer?
    /// Called once per tunnel stream with its decision (and an error if the
    /// destination could not be reached).
    public var onStream: (@Sendable (InboundRequest, InboundDecision, String?) -> Void)?
    /// One entry per request through the L7 proxy.
    public var accessLog: HTTPRecorderFactory?
    /// Deadline and caps for connections still handshaking (read at accept).
    public var limits: HandshakeLimits {
        get { lock.withLock { _limits } }
        set { lock.withLock { _limits = newValue } }
    }
    private var _limits = HandshakeLimits()
    /// Idle timeouts of peers' tunnel connections and streams (read at accept).
    public var tunnelTimeouts: TunnelTimeouts {
        get { lock.withLock { _tunnelTimeouts } }
        set { lock.withLock { _tunnelTimeouts = newValue } }
    }
    private var _tunnelTimeouts = TunnelTimeouts()
    let pending = PendingHandshakes()
    /// Called with each connection refused or closed before its handshake completed.
    public var onRefuse: (@Sendable (HandshakeRefusal) -> Void)?
    /// Connections accepted and still handshaking.
    public var pendingHandshakes: Int { pending.total }
    /// Every open connection, by its remote address (to cut a revoked node).
    private let connections = NIOLockedValueBox<[ObjectIdentifier: (address: String, channel: Channel)]>([:])

    /// Closes every connection from these addresses; returns how many.
    @discardableResult
    public func closeConnections(from addresses: Set<String>) -> Int {
        let normalized = Set(addresses.compactMap { IPAddressText.normalize($0) })
        let victims = connections.withLockedValue { $0.values.filter { normalized.contains($0.address) }.map(\.channel) }
        for c in victims { c.close(promise: nil) }
        return victims.count
    }

    public static func context(certificateFile: String, keyFile: String, roots: [Certificate]) throws -> NIOSSLContext {
        let chain = try NIOSSLCertificate.fromPEMFile(certificateFile).map { NIOSSLCertificateSource.certificate($0) }
        let key = try NIOSSLPrivateKey(file: keyFile, format: .pem)
        var tls = TLSConfiguration.makeServerConfiguration(certificateChain: chain, privateKey: .privateKey(key))
        tls.minimumTLSVersion = .tlsv13
        tls.maximumTLSVersion = .tlsv13
        tls.certificateVerification = .noHostnameVerification   // a client certificate is required
        tls.trustRoots = .certificates(try roots.map { try NIOSSLCertificate(bytes: $0.serializeAsPEM().derBytes, format: .der) })
        tls.applicationProtocols = ["h2"]
        return try NIOSSLContext(configuration: tls)
    }

    /// `group`: the event loops to serve on (the agent shares its data
    /// path's); nil makes one of a thread per core, owned by the listener.
    public init(host: String, port: Int, certificateFile: String, keyFile: String, verifier: SPIFFEVerifier, group: EventLoopGroup? = nil) throws {
        self.group = group ?? MultiThreadedEventLoopGroup(numberOfThreads: System.coreCount)
        ownsGroup = group == nil
        _verifier = verifier
        self.certificateFile = certificateFile
        self.keyFile = keyFile
        context = try InboundProxy.context(certificateFile: certificateFile, keyFile: keyFile, roots: verifier.bundles.values.flatMap { $0 })
        let weakSelf = WeakReference<InboundProxy>()
        let verify: @Sendable ([NIOSSLCertificate], EventLoopPromise<NIOSSLVerificationResultWithMetadata>) -> Void = { certs, promise in
            guard let verifier = weakSelf.object?.verifier else { return promise.succeed(.failed) }
            Task {
                let parsed = certs.compactMap { try? Certificate(derEncoded: $0.toDERBytes()) }
                guard parsed.count == certs.count, let leaf = parsed.first else {
                    weakSelf.object?.onReject?("unparsable client certificate")
                    promise.succeed(.failed)
                    return
                }
                switch await verifier.verify(leaf: leaf, intermediates: Array(parsed.dropFirst())) {
                case .success(let id):
                    weakSelf.object?.onAccept?(id)
                    promise.succeed(.certificateVerified(VerificationMetadata(nil)))
                case .failure(let r):
                    weakSelf.object?.onReject?(r.reason)
                    promise.succeed(.failed)
                }
            }
        }
        let bootstrap = ServerBootstrap(group: self.group)
            .serverChannelOption(ChannelOptions.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                guard let me = weakSelf.object else { return channel.close() }
                let (ctx, limits) = me.lock.withLock { (me.context, me._limits) }
                // Anyone who reaches the port can open connections and never
                // start TLS: each is counted until its handshake completes.
                let source = channel.remoteAddress?.ipAddress ?? "unknown"
                if let refusal = me.pending.admit(source, limits) {
                    me.onRefuse?(refusal)
                    return channel.close()
                }
                let key = ObjectIdentifier(channel), tracked = me.connections
                tracked.withLockedValue { $0[key] = (IPAddressText.normalize(source) ?? source, channel) }
                channel.closeFuture.whenComplete { _ in _ = tracked.withLockedValue { $0.removeValue(forKey: key) } }
                return channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(NIOSSLServerHandler(context: ctx, customVerificationCallbackWithMetadata: verify))
                    try channel.pipeline.syncOperations.addHandler(HandshakeGuard(pending: me.pending, source: source, timeout: limits.timeout,
                                                                                  onTimeout: { weakSelf.object?.onRefuse?(.timeout) }))
                    try channel.pipeline.syncOperations.addHandler(IdentityEcho(
                        onFailure: { weakSelf.object?.onHandshakeFailure?() },
                        tunnel: { ch, peer in
                            guard let me = weakSelf.object, let authorize = me.authorize else { return false }
                            try InboundProxy.configureTunnel(ch, peer: peer, authorize: authorize, onStream: me.onStream, accessLog: me.accessLog,
                                                             timeouts: me.tunnelTimeouts)
                            return true
                        }))
                }
            }
        do { channel = try bootstrap.bind(host: host, port: port).wait() } catch {
            if ownsGroup { try? self.group.syncShutdownGracefully() }
            throw error
        }
        weakSelf.set(self)
    }

    /// New certificate and key (rotation): new connections use them at once.
    public func reload(certificateFile: String, keyFile: String) throws {
        let ctx = try InboundProxy.context(certificateFile: certificateFile, keyFile: keyFile, roots: verifier.bundles.values.flatMap { $0 })
        lock.withLock {
            context = ctx
            self.certificateFile = certificateFile
            self.keyFile = keyFile
        }
    }

    /// New trust bundles (a federated domain joined or a root rotated):
    /// new handshakes are judged against them.
    public func updateVerifier(_ v: SPIFFEVerifier) throws {
        let (c, k) = lock.withLock { (certificateFile, keyFile) }
        let ctx = try InboundProxy.context(certificateFile: c, keyFile: k, roots: v.bundles.values.flatMap { $0 })
        lock.withLock {
            _verifier = v
            context = ctx
        }
    }

    private var stopped = false

    /// Closes the listener (idempotent).
    public func stop() {
        lock.lock()
        let first = !stopped
        stopped = true
        lock.unlock()
        guard first else { return }
        try? channel.close().wait()
        if ownsGroup { try? group.syncShutdownGracefully() }
    }
}

/// After a verified handshake: tell the peer who it was authenticated as.
final class IdentityEcho: ChannelInboundHandler, RemovableChannelHandler, @unchecked Sendable {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer
    let onFailure: () -> Void
    /// Installs the tunnel on an "h2" connection; false when none is served.
    let tunnel: (Channel, SpiffeID) throws -> Bool
    var handshakeDone = false
    init(onFailure: @escaping () -> Void, tunnel: @escaping (Channel, SpiffeID) throws -> Bool) {
        self.onFailure = onFailure
        self.tunnel = tunnel
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        if !handshakeDone {
            handshakeDone = true   // count one failure per connection
            onFailure()
        }
        context.close(promise: nil)
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case TLSUserEvent.handshakeCompleted = event { handshakeDone = true }
        if case TLSUserEvent.handshakeCompleted = event,
           let tls = try? context.pipeline.syncOperations.handler(type: NIOSSLServerHandler.self),
           let peer = tls.peerCertificate, let cert = try? Certificate(derEncoded: peer.toDERBytes()),
           case .success(let id) = SPIFFEVerifier.checkLeaf(cert, trustDomain: nil) {
            if case TLSUserEvent.handshakeCompleted(let proto) = event, proto == "h2" {
                do {
                    if try tunnel(context.channel, id) {
                        context.fireUserInboundEventTriggered(event)
                        context.pipeline.syncOperations.removeHandler(self, promise: nil)
                        return
                    }
                } catch {
                    context.close(promise: nil)
                    return
                }
            }
            var buffer = context.channel.allocator.buffer(capacity: 128)
            buffer.writeString("\(id)\n")
            context.writeAndFlush(wrapOutboundOut(buffer)).assumeIsolated().whenComplete { _ in context.close(promise: nil) }
        }
        context.fireUserInboundEventTriggered(event)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {}
}

/// Addresses as text in one spelling (IPv4-mapped IPv6 as IPv4), so a
/// configured address and a socket's remote address compare equal.
public enum IPAddressText {
    public static func normalize(_ text: String) -> String? {
        var v6 = in6_addr()
        if inet_pton(AF_INET6, text, &v6) == 1 {
            let b = withUnsafeBytes(of: v6) { Array($0) }
            if b[0..<10].allSatisfy({ $0 == 0 }) && b[10] == 0xff && b[11] == 0xff { return "\(b[12]).\(b[13]).\(b[14]).\(b[15])" }
            var buf = [CChar](repeating: 0, count: Int(INET6_ADDRSTRLEN))
            return inet_ntop(AF_INET6, &v6, &buf, socklen_t(buf.count)).map { _ in String(decoding: buf.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self) }
        }
        var v4 = in_addr()
        return inet_pton(AF_INET, text, &v4) == 1 ? text : nil
    }
}
