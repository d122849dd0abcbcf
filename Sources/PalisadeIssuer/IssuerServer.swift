import Crypto
import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL
import PalisadeCA
import PalisadeIdentity
import PalisadeTunnel
import X509

/// `palisade ca serve`'s listener: the issuer's API over HTTPS (TLS 1.3
/// only). Its certificate is an SVID for spiffe://TD/palisade/issuer that
/// it signs itself and renews every half-day; clients check that ID. A
/// client certificate is optional (a joining node has none yet) and, when
/// present, must be an SVID of the trust domain. Connections still
/// handshaking are capped and closed at a deadline, as on the tunnel port.
public final class IssuerServer: @unchecked Sendable {
    let issuer: Issuer
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    var channel: Channel!
    private let context: NIOLockedValueBox<NIOSSLContext>
    private let pending = PendingHandshakes()
    public var limits = HandshakeLimits()
    public var localPort: Int { channel.localAddress?.port ?? 0 }
    static let certificateLifetime: TimeInterval = 86400

    public init(issuer: Issuer, host: String, port: Int) throws {
        self.issuer = issuer
        context = NIOLockedValueBox(try Self.makeContext(issuer))
        let me = UnownedBox(self)
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(ChannelOptions.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                let server = me.value
                let source = channel.remoteAddress?.ipAddress ?? "unknown"
                let limits = server.limits
                if server.pending.admit(source, limits) != nil { return channel.close() }
                let peer = PeerBox()
                // A presented client certificate must be an SVID of this trust
                // domain (either root during a rotation).
                let verifier = SPIFFEVerifier(bundles: [server.issuer.ca.trustDomain: server.issuer.bundle])
                let verify: NIOSSLCustomVerificationCallbackWithMetadata = { certs, promise in
                    Task {
                        let parsed = certs.compactMap { try? Certificate(derEncoded: $0.toDERBytes()) }
                        guard parsed.count == certs.count, let leaf = parsed.first,
                              case .success(let id) = await verifier.verify(leaf: leaf, intermediates: Array(parsed.dropFirst())) else {
                            promise.succeed(.failed)
                            return
                        }
                        peer.id.withLockedValue { $0 = id }
                        promise.succeed(.certificateVerified(VerificationMetadata(nil)))
                    }
                }
                return channel.eventLoop.makeCompletedFuture {
                    let ops = channel.pipeline.syncOperations
                    try ops.addHandler(NIOSSLServerHandler(context: server.context.withLockedValue { $0 }, customVerificationCallbackWithMetadata: verify))
                    try ops.addHandler(HandshakeGuard(pending: server.pending, source: source, timeout: limits.timeout, onTimeout: {}))
                    try ops.configureHTTPServerPipeline(withErrorHandling: true)
                    try ops.addHandler(IssuerHandler(issuer: server.issuer, peer: peer))
                }
            }
        channel = try bootstrap.bind(host: host, port: port).wait()
        // The issuer's own certificate is renewed at half its lifetime.
        group.next().scheduleRepeatedTask(initialDelay: .seconds(Int64(Self.certificateLifetime / 2)),
                                          delay: .seconds(Int64(Self.certificateLifetime / 2))) { [weak self] _ in
            try? self?.reloadContext()
        }
    }

    /// A new certificate from the current signing CA and the current roots
    /// (after a rotation step); new connections use it at once.
    public func reloadContext() throws {
        let ctx = try Self.makeContext(issuer)
        context.withLockedValue { $0 = ctx }
    }

    static func makeContext(_ issuer: Issuer) throws -> NIOSSLContext {
        let key = P256.Signing.PrivateKey()
        let id = try SpiffeID("spiffe://\(issuer.ca.trustDomain)\(IssuerAPI.issuerPath())")
        let cert = try issuer.ca.issue(id, publicKey: .init(key.publicKey), lifetime: certificateLifetime)
        let chain = try ([cert] + issuer.ca.intermediates).map {
            NIOSSLCertificateSource.certificate(try NIOSSLCertificate(bytes: $0.serializeAsPEM().derBytes, format: .der))
        }
        var tls = TLSConfiguration.makeServerConfiguration(certificateChain: chain,
                                                           privateKey: .privateKey(try NIOSSLPrivateKey(bytes: Array(key.pemRepresentation.utf8), format: .pem)))
        tls.minimumTLSVersion = .tlsv13
        tls.maximumTLSVersion = .tlsv13
        tls.certificateVerification = .optionalVerification
        tls.trustRoots = .certificates(try issuer.bundle.map { try NIOSSLCertificate(bytes: $0.serializeAsPEM().derBytes, format: .der) })
        return try NIOSSLContext(configuration: tls)
    }

    private let stopped = NIOLockedValueBox(false)

    /// Closes the listener and its connections; a second call does nothing.
    public func stop() {
        guard !stopped.withLockedValue({ done in defer { done = true }; return done }) else { return }
        try? channel?.close().wait()
        try? group.syncShutdownGracefully()
    }
}

/// The SPIFFE ID a connection's client certificate proved, if any.
final class PeerBox: Sendable {
    let id = NIOLockedValueBox<SpiffeID?>(nil)
}

final class UnownedBox<T: AnyObject>: @unchecked Sendable {
    unowned let value: T
    init(_ value: T) { self.value = value }
}

/// One request at a time: read the body (bounded), answer, keep the connection.
final class IssuerHandler: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart
    let issuer: Issuer
    let peer: PeerBox
    private var head: HTTPRequestHead?
    private var body = ByteBuffer()
    private var tooLarge = false

    init(issuer: Issuer, peer: PeerBox) { self.issuer = issuer; self.peer = peer }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let h): head = h; body.clear(); tooLarge = false
        case .body(var b):
            if body.readableBytes + b.readableBytes > IssuerAPI.maxBody { tooLarge = true } else { body.writeBuffer(&b) }
        case .end:
            guard let h = head else { return }
            head = nil
            let (status, json) = tooLarge ? (.payloadTooLarge, Self.error("request body over \(IssuerAPI.maxBody) bytes")) : answer(h)
            var headers = HTTPHeaders()
            headers.add(name: "content-type", value: "application/json")
            headers.add(name: "content-length", value: "\(json.count)")
            context.write(wrapOutboundOut(.head(HTTPResponseHead(version: h.version, status: status, headers: headers))), promise: nil)
            context.write(wrapOutboundOut(.body(.byteBuffer(ByteBuffer(bytes: json)))), promise: nil)
            context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: nil)
        }
    }

    static func error(_ message: String) -> [UInt8] { Array((try? JSONEncoder().encode(IssuerAPI.ErrorResponse(error: message))) ?? Data()) }
    static func json<T: Encodable>(_ value: T) -> [UInt8] { Array((try? JSONEncoder().encode(value)) ?? Data()) }

    private var bundlePEM: String { issuer.bundle.compactMap { try? $0.serializeAsPEM().pemString }.joined(separator: "\n") }

    private func answer(_ h: HTTPRequestHead) -> (HTTPResponseStatus, [UInt8]) {
        let data = Data(body.readableBytesView)
        switch (h.method, h.uri) {
        case (.GET, "/v1/bundle"):
            if let node = peer.id.withLockedValue({ $0 }), let trusts = h.headers.first(name: IssuerAPI.trustsHeader) {
                issuer.report(node: node, trusts: trusts.split(separator: ",").map(String.init))
            }
            return (.ok, Self.json(IssuerAPI.BundleResponse(bundle: bundlePEM, generation: issuer.current.generation)))
        case (.POST, "/v1/join"):
            guard let r = try? JSONDecoder().decode(IssuerAPI.JoinRequest.self, from: data),
                  let csr = try? CertificateSigningRequest(pemEncoded: r.csr) else { return (.badRequest, Self.error("expected {token, csr (PEM)}")) }
            switch issuer.join(token: r.token, csr: csr) {
            case .success(let chain): return (.ok, Self.json(IssuerAPI.JoinResponse(chain: Self.pem(chain), bundle: bundlePEM)))
            case .failure(let e): return (.forbidden, Self.error(e.description))
            }
        case (.POST, "/v1/sign"):
            guard let node = peer.id.withLockedValue({ $0 }) else { return (.unauthorized, Self.error("a node SVID is required as client certificate")) }
            guard let r = try? JSONDecoder().decode(IssuerAPI.SignRequest.self, from: data), r.csrs.count <= 1000 else {
                return (.badRequest, Self.error("expected {csrs: [PEM], lifetimeSeconds} with at most 1000 CSRs"))
            }
            let csrs = r.csrs.map { try? CertificateSigningRequest(pemEncoded: $0) }
            let valid = csrs.compactMap { $0 }
            var answers = issuer.sign(node: node, csrs: valid, lifetime: max(60, r.lifetimeSeconds)).makeIterator()
            let results = csrs.map { csr -> IssuerAPI.SignResult in
                guard csr != nil, let (id, result) = answers.next() else { return IssuerAPI.SignResult(error: "not a PEM CSR") }
                switch result {
                case .success(let chain): return IssuerAPI.SignResult(spiffeID: id?.description, chain: Self.pem(chain))
                case .failure(let e): return IssuerAPI.SignResult(spiffeID: id?.description, error: e.description)
                }
            }
            return (.ok, Self.json(IssuerAPI.SignResponse(results: results, bundle: bundlePEM)))
        default:
            return (.notFound, Self.error("no such endpoint: \(h.method) \(h.uri)"))
        }
    }

    static func pem(_ chain: [Certificate]) -> String { chain.compactMap { try? $0.serializeAsPEM().pemString }.joined(separator: "\n") }
}
