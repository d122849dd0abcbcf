import Crypto
import Foundation
import NIOCore
import NIOPosix
import NIOSSL
import X509
import PalisadeTestSupport
import XCTest
@testable import PalisadeCA
import PalisadeIdentity
@testable import PalisadeL7
import PalisadeTunnel

/// Certificates presented to the agent's mTLS listener over loopback: the
/// SPIFFE negative cases are refused in the handshake, a valid SVID is
/// accepted and told its identity, and TLS below 1.3 is refused.
final class InboundProxyTests: XCTestCase {
    var dir: String!
    var listener: InboundProxy!
    var root: CertificateAuthority!
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)

    override func setUpWithError() throws {
        dir = NSTemporaryDirectory() + "palisade-mtls-\(UUID().uuidString)"
        root = try CertificateAuthority.loadOrCreate(directory: "\(dir!)/ca", trustDomain: "example.org")
        let store = try SVIDStore(directory: "\(dir!)/svids", signer: root, lifetime: 3600)
        let node = try SpiffeID("spiffe://example.org/palisade/node/test")
        try store.ensure([node])
        let info = store.cached(node)!
        listener = try InboundProxy(host: "127.0.0.1", port: 0, certificateFile: info.certificateFile, keyFile: info.keyFile,
                                    verifier: SPIFFEVerifier(bundles: ["example.org": [root.certificate]]))
    }

    override func tearDownWithError() throws {
        listener?.stop()
        try? group.syncShutdownGracefully()
        try? FileManager.default.removeItem(atPath: dir)
    }

    final class LineReader: ChannelInboundHandler, @unchecked Sendable {
        typealias InboundIn = ByteBuffer
        let promise: EventLoopPromise<String?>
        var text = ""
        init(_ p: EventLoopPromise<String?>) { promise = p }
        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            var b = unwrapInboundIn(data)
            text += b.readString(length: b.readableBytes) ?? ""
        }
        func channelInactive(context: ChannelHandlerContext) { promise.succeed(text.isEmpty ? nil : text) }
        func errorCaught(context: ChannelHandlerContext, error: Error) { context.close(promise: nil) }
    }

    /// What the listener says to a client presenting `cert` (nil: refused).
    func present(_ cert: Certificate, key: P256.Signing.PrivateKey, tls: TLSVersion = .tlsv13) throws -> String? {
        var config = TLSConfiguration.makeClientConfiguration()
        config.minimumTLSVersion = tls
        config.maximumTLSVersion = tls
        config.certificateChain = [.certificate(try NIOSSLCertificate(bytes: cert.serializeAsPEM().derBytes, format: .der))]
        config.privateKey = .privateKey(try NIOSSLPrivateKey(bytes: Array(key.pemRepresentation.utf8), format: .pem))
        config.trustRoots = .certificates([try NIOSSLCertificate(bytes: root.certificate.serializeAsPEM().derBytes, format: .der)])
        config.certificateVerification = .noHostnameVerification
        let ctx = try NIOSSLContext(configuration: config)
        let promise = group.next().makePromise(of: String?.self)
        let channel = try ClientBootstrap(group: group)
            .channelInitializer { ch in
                ch.eventLoop.makeCompletedFuture {
                    try ch.pipeline.syncOperations.addHandler(NIOSSLClientHandler(context: ctx, serverHostname: nil))
                    try ch.pipeline.syncOperations.addHandler(LineReader(promise))
                }
            }
            .connect(host: "127.0.0.1", port: listener.localPort).wait()
        _ = channel
        return try promise.futureResult.wait()
    }

    func leaf(sans: [GeneralName], isCA: Bool = false, usage: KeyUsage = KeyUsage(digitalSignature: true),
              signer: CertificateAuthority? = nil, notAfter: Date = Date().addingTimeInterval(3600)) throws -> (Certificate, P256.Signing.PrivateKey) {
        let issuer = signer ?? root!
        let key = P256.Signing.PrivateKey()
        let cert = try Certificate(
            version: .v3, serialNumber: .init(), publicKey: .init(key.publicKey), notValidBefore: Date().addingTimeInterval(-3600), notValidAfter: notAfter,
            issuer: issuer.certificate.subject, subject: try DistinguishedName { OrganizationName("test") }, signatureAlgorithm: .ecdsaWithSHA256,
            extensions: try Certificate.Extensions {
                Critical(isCA ? BasicConstraints.isCertificateAuthority(maxPathLength: nil) : BasicConstraints.notCertificateAuthority)
                Critical(usage)
                SubjectAlternativeNames(sans)
            },
            issuerPrivateKey: .init(issuer.key))
        return (cert, key)
    }

    func testValidSVIDIsAcceptedAndNamed() throws {
        let key = P256.Signing.PrivateKey()
        let id = try SpiffeID("spiffe://example.org/ns/prod/sa/web")
        let svid = try root.issue(id, publicKey: .init(key.publicKey), lifetime: 600)
        XCTAssertEqual(try present(svid, key: key), "\(id)\n")
    }

    func testNegativeCasesAreRefusedInTheHandshake() throws {
        final class Log: @unchecked Sendable { let lock = NSLock(); var items: [String] = [] }
        let log = Log()
        listener.onReject = { r in log.lock.lock(); log.items.append(r); log.lock.unlock() }
        let failures = Log()
        listener.onHandshakeFailure = { failures.lock.lock(); failures.items.append("x"); failures.lock.unlock() }
        let good: [GeneralName] = [.uniformResourceIdentifier("spiffe://example.org/w")]
        let rogue = try CertificateAuthority.loadOrCreate(directory: "\(dir!)/rogue", trustDomain: "example.org")
        let cases: [(String, (Certificate, P256.Signing.PrivateKey))] = [
            ("expired", try leaf(sans: good, notAfter: Date().addingTimeInterval(-60))),
            ("no URI SAN", try leaf(sans: [.dnsName("w.example.org")])),
            ("two URI SANs", try leaf(sans: good + [.uniformResourceIdentifier("spiffe://example.org/x")])),
            ("https scheme", try leaf(sans: [.uniformResourceIdentifier("https://example.org/w")])),
            ("bad path", try leaf(sans: [.uniformResourceIdentifier("spiffe://example.org/a//b")])),
            ("CA:TRUE leaf", try leaf(sans: good, isCA: true)),
            ("keyCertSign leaf", try leaf(sans: good, usage: KeyUsage(digitalSignature: true, keyCertSign: true))),
            ("unknown root", try leaf(sans: good, signer: rogue)),
            ("other trust domain", try leaf(sans: [.uniformResourceIdentifier("spiffe://other.org/w")])),
        ]
        for (name, (cert, key)) in cases {
            XCTAssertNil(try present(cert, key: key), "\(name) was accepted")
        }
        usleep(100_000)
        log.lock.lock(); defer { log.lock.unlock() }
        XCTAssertEqual(log.items.count, cases.count, "\(log.items)")
        failures.lock.lock(); defer { failures.lock.unlock() }
        XCTAssertEqual(failures.items.count, cases.count, "every refusal is one failed handshake")
    }

    func testTLS12IsRefused() throws {
        let key = P256.Signing.PrivateKey()
        let svid = try root.issue(try SpiffeID("spiffe://example.org/w"), publicKey: .init(key.publicKey), lifetime: 600)
        XCTAssertNil(try present(svid, key: key, tls: .tlsv12))
    }

    /// Connections that never finish their handshake cannot pile up: past
    /// the per-address cap they are refused at once, the others are closed
    /// at the deadline, each refusal is counted by reason, and a real peer
    /// is served afterwards.
    func testSilentConnectionsAreCappedAndClosedAtTheDeadline() throws {
        final class Reasons: @unchecked Sendable { let lock = NSLock(); var items: [HandshakeRefusal] = [] }
        let reasons = Reasons()
        listener.limits = HandshakeLimits(timeout: .milliseconds(1500), maxPending: 1000, maxPendingPerSource: 20)
        listener.onRefuse = { r in reasons.lock.withLock { reasons.items.append(r) } }
        let sockets = (0..<30).compactMap { _ in LoopbackSocket(port: listener.localPort) }
        XCTAssertEqual(sockets.count, 30)
        usleep(300_000)
        let refusedAtOnce = sockets.filter { $0.closedByPeer(within: 0.05) }.map(\.fd)
        XCTAssertEqual(refusedAtOnce.count, 10, "past 20 handshaking connections from one address")
        XCTAssertEqual(listener.pendingHandshakes, 20)
        let waiting = sockets.filter { !refusedAtOnce.contains($0.fd) }
        XCTAssertTrue(waiting.allSatisfy { $0.closedByPeer(within: 3) }, "closed at the handshake deadline")
        usleep(100_000)
        XCTAssertEqual(listener.pendingHandshakes, 0)
        reasons.lock.withLock {
            XCTAssertEqual(reasons.items.filter { $0 == .tooManyFromSource }.count, 10)
            XCTAssertEqual(reasons.items.filter { $0 == .timeout }.count, 20)
        }
        // A real peer is served once the places are free again, and its
        // completed handshake is not closed at the deadline.
        let key = P256.Signing.PrivateKey()
        let id = try SpiffeID("spiffe://example.org/ns/prod/sa/web")
        let svid = try root.issue(id, publicKey: .init(key.publicKey), lifetime: 600)
        XCTAssertEqual(try present(svid, key: key), "\(id)\n")
        XCTAssertEqual(listener.pendingHandshakes, 0)
    }
}
