import Foundation
import NIOCore
import NIOPosix
import PalisadeTestSupport
import XCTest
@testable import PalisadeCA
import PalisadeIdentity
@testable import PalisadeL7
@testable import PalisadeTunnel

/// The tunnel without the kernel: a plain TCP client -> outbound proxy ->
/// pooled mTLS HTTP/2 CONNECT stream -> inbound listener -> echo server,
/// all on loopback. Bytes, half-close, refusals, pooling and rotation.
// (@unchecked: the route and authorize closures read the test's fields from the
// tunnel's event loops while the test body sets them between requests.)
final class TunnelTests: XCTestCase, @unchecked Sendable {
    var dir: String!
    var ca: CertificateAuthority!
    var store: SVIDStore!
    var listener: InboundProxy!
    var proxy: OutboundProxy!
    var echo: Process!
    var echoPort = 0
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
    let source = try! SpiffeID("spiffe://example.org/ns/default/sa/client")
    let node = try! SpiffeID("spiffe://example.org/palisade/node/server")
    /// What the route resolver returns for the next accepted connection.
    var authority = ""
    /// When set, accepted connections go to `authority` on this "node"
    /// through the local HTTP proxy (a same-node caller), not the tunnel.
    var localHTTP: OutboundRoute.HTTP?
    let seen = NSLock()
    var decisions: [String] = []

    override func setUpWithError() throws {
        dir = NSTemporaryDirectory() + "palisade-tunnel-\(UUID().uuidString)"
        ca = try CertificateAuthority.loadOrCreate(directory: "\(dir!)/ca", trustDomain: "example.org")
        store = try SVIDStore(directory: "\(dir!)/svids", signer: ca, lifetime: 3600)
        try store.ensure([source, node])
        let verifier = SPIFFEVerifier(bundles: ["example.org": [ca.certificate]])
        let n = store.cached(node)!
        listener = try InboundProxy(host: "127.0.0.1", port: 0, certificateFile: n.certificateFile, keyFile: n.keyFile, verifier: verifier)
        listener.authorize = { [unowned self] r in
            seen.lock(); decisions.append("\(r.peer) \(r.host):\(r.port)"); seen.unlock()
            return r.port == 1 ? .refuse(status: 403, reason: "denied by policy") : .deliver(mark: 0)
        }
        proxy = try OutboundProxy(port: 0, group: group, makePool: { TunnelPool(eventLoop: $0, verifier: { verifier }) }) { [unowned self] _ in
            let s = store.cached(source)!
            if let http = localHTTP {
                let colon = authority.lastIndex(of: ":")!
                return OutboundRoute(credentials: ClientCredentials(spiffeID: source, serial: s.serial, certificateFile: s.certificateFile, keyFile: s.keyFile)!,
                                     candidates: [.init(peer: nil, host: String(authority[..<colon]), port: Int(authority[authority.index(after: colon)...])!)],
                                     mark: 0, http: http)
            }
            return OutboundRoute(peer: TunnelPeer(host: "127.0.0.1", port: listener.localPort, trustDomain: "example.org"),
                                 credentials: ClientCredentials(spiffeID: source, serial: s.serial, certificateFile: s.certificateFile, keyFile: s.keyFile)!,
                                 authority: authority)
        }
        // An echo server (the repository's test probe).
        echoPort = freeLoopbackPort()
        echo = Process()
        echo.executableURL = URL(fileURLWithPath: "/usr/bin/python3")
        echo.arguments = [Self.netprobe, "serve", "tcp", "127.0.0.1", "\(echoPort)"]
        let out = Pipe()
        echo.standardOutput = out
        try echo.run()
        _ = out.fileHandleForReading.availableData   // "ready"
        authority = "127.0.0.1:\(echoPort)"
    }

    static var netprobe: String { tool("netprobe.py") }
    static var h2conform: String { tool("h2conform.py") }
    static func tool(_ name: String) -> String {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("tools/testing/\(name)").path
    }

    override func tearDownWithError() throws {
        echo?.terminate()
        proxy?.stop()
        listener?.stop()
        try? group.syncShutdownGracefully()
        try? FileManager.default.removeItem(atPath: dir)
    }

    /// Connects to the proxy, sends `payload`, half-closes, reads to EOF
    /// (nil on a reset or timeout).
    func roundTrip(_ payload: [UInt8]) throws -> [UInt8]? {
        let s = try XCTUnwrap(LoopbackSocket(port: proxy.localPort))
        guard s.send(payload) else { return nil }
        s.shutdownWrite()
        return s.readToEnd()
    }

    func testBytesAndHalfCloseCrossTheTunnel() throws {
        XCTAssertEqual(try roundTrip(Array("hello through the tunnel".utf8)), Array("hello through the tunnel".utf8))
        let big = (0..<3_000_000).map { UInt8(truncatingIfNeeded: $0 &* 31) }
        let back = try roundTrip(big)
        XCTAssertEqual(back?.count, big.count)
        XCTAssertTrue(back == big, "3 MB came back altered")
        seen.lock(); defer { seen.unlock() }
        XCTAssertEqual(decisions.first, "\(source) 127.0.0.1:\(echoPort)")
    }

    func testOneConnectionCarriesManyStreams() throws {
        for i in 0..<20 { XCTAssertEqual(try roundTrip(Array("n\(i)".utf8)), Array("n\(i)".utf8)) }
        XCTAssertEqual(proxy.pool.connectionsOpened, 1)
    }

    func testRefusalResetsTheCallerAtOnce() throws {
        authority = "127.0.0.1:1"
        let start = Date()
        XCTAssertNil(try roundTrip(Array("x".utf8)))
        XCTAssertLessThan(Date().timeIntervalSince(start), 2)
    }

    func testPeerAgentDownIsAPromptRefusal() throws {
        listener.stop()
        let start = Date()
        XCTAssertNil(try roundTrip(Array("x".utf8)))
        XCTAssertLessThan(Date().timeIntervalSince(start), 2)
    }

    /// HTTP/2 floods from a peer that passed the mTLS handshake (a stolen
    /// SVID, a compromised node): each ends in a GOAWAY and a closed
    /// connection within a fraction of a second, and other callers keep
    /// being served.
    func testHTTP2FloodsFromAPeerCloseItsConnection() throws {
        let svid = store.cached(source)!
        for attack in ["rapid-reset", "continuation", "settings", "ping", "window-update", "empty-data", "hpack-bomb"] {
            let start = Date()
            let got = try sh(["/usr/bin/python3", Self.netprobe, "h2flood", attack, "127.0.0.1", "\(listener.localPort)", "100000",
                              svid.certificateFile, svid.keyFile]).output.trimmingCharacters(in: .whitespacesAndNewlines)
            print("tunnel, \(attack): \(got) in \(String(format: "%.2f", Date().timeIntervalSince(start))) s")
            XCTAssertTrue(got.hasPrefix("GOAWAY:") && got.hasSuffix(" closed") && !got.contains("NO_ERROR"), "\(attack): \(got)")
            XCTAssertLessThan(Date().timeIntervalSince(start), 5, attack)
            XCTAssertEqual(try roundTrip(Array("after \(attack)".utf8)), Array("after \(attack)".utf8))
        }
    }

    /// The receiving side lets go of what nobody uses: a stream with no bytes
    /// either way (and its workload connection) after the stream timeout, a
    /// peer's connection with no stream after the connection timeout (the
    /// pool then opens a new one).
    func testIdleTunnelStreamsAndConnectionsAreClosed() throws {
        listener.tunnelTimeouts = TunnelTimeouts(connectionIdle: .seconds(1), streamIdle: .seconds(1))
        final class Count: @unchecked Sendable { let lock = NSLock(); var n = 0 }
        let handshakes = Count()
        listener.onAccept = { _ in handshakes.lock.withLock { handshakes.n += 1 } }
        // A stream: one byte echoed, then nothing either way.
        let held = try XCTUnwrap(LoopbackSocket(port: proxy.localPort))
        held.send("x")
        XCTAssertEqual(held.readSome(), Array("x".utf8), "the echo came back")
        let start = Date()
        XCTAssertTrue(held.closedByPeer(within: 4), "an idle stream is closed")
        XCTAssertGreaterThan(Date().timeIntervalSince(start), 0.8)
        // A connection: used, then left with no stream past its timeout.
        XCTAssertEqual(try roundTrip(Array("one".utf8)), Array("one".utf8))
        let before = handshakes.lock.withLock { handshakes.n }
        XCTAssertEqual(try roundTrip(Array("two".utf8)), Array("two".utf8))
        XCTAssertEqual(handshakes.lock.withLock { handshakes.n }, before, "reused while in use")
        usleep(2_000_000)
        XCTAssertEqual(try roundTrip(Array("three".utf8)), Array("three".utf8))
        XCTAssertEqual(handshakes.lock.withLock { handshakes.n }, before + 1, "the idle connection was closed, a new one opened")
    }

    /// A workload that leaves while the caller is still sending: the caller's
    /// connection is ended, not left half-open with nobody reading it (its
    /// FIN queued behind unsent bytes, the stream and its frames held on
    /// both agents until the stream idle timeout, an hour).
    func testCallerIsNotLeftHalfOpenWhenTheWorkloadLeaves() throws {
        let port = freeLoopbackPort()
        let server = Process()
        server.executableURL = URL(fileURLWithPath: "/usr/bin/python3")
        server.arguments = [Self.netprobe, "whoami", "127.0.0.1", "\(port)", "gone"]   // answers, closes, reads nothing
        let out = Pipe()
        server.standardOutput = out
        try server.run()
        defer { server.terminate() }
        _ = out.fileHandleForReading.availableData   // "ready"
        authority = "127.0.0.1:\(port)"
        let s = try XCTUnwrap(LoopbackSocket(port: proxy.localPort))
        var tv = timeval(tv_sec: 5, tv_usec: 0)
        setsockopt(s.fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        let chunk = [UInt8](repeating: 7, count: 64 << 10)
        let start = Date()
        var sentMB = 0.0, error: Int32 = 0
        while Date().timeIntervalSince(start) < 30 {
            let n = chunk.withUnsafeBytes { Glibc.send(s.fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if n <= 0 { error = errno; break }
            sentMB += Double(n) / 1e6
        }
        XCTAssertTrue(error == EPIPE || error == ECONNRESET,
                      "the caller's connection was ended (errno \(error), \(String(cString: strerror(error))), after \(Int(sentMB)) MB; EAGAIN = stalled, nobody reading)")
    }

    /// When a peer connection carries as many streams as it may, the pool
    /// opens another (the peer refuses streams past its limit).
    func testPoolOpensAnotherConnectionWhenStreamsAreFull() throws {
        let verifier = SPIFFEVerifier(bundles: ["example.org": [ca.certificate]])
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? group.syncShutdownGracefully() }
        let small = try OutboundProxy(port: 0, group: group, makePool: { TunnelPool(eventLoop: $0, streamsPerConnection: 3, verifier: { verifier }) }) { [unowned self] _ in
            let s = store.cached(source)!
            return OutboundRoute(peer: TunnelPeer(host: "127.0.0.1", port: listener.localPort, trustDomain: "example.org"),
                                 credentials: ClientCredentials(spiffeID: source, serial: s.serial, certificateFile: s.certificateFile, keyFile: s.keyFile)!,
                                 authority: authority)
        }
        defer { small.stop() }
        let sockets = (0..<7).compactMap { _ in LoopbackSocket(port: small.localPort) }
        XCTAssertEqual(sockets.count, 7)
        for s in sockets {
            s.send("x")
            XCTAssertEqual(s.readSome(), Array("x".utf8), "every held connection is served")
        }
        XCTAssertEqual(small.pool.connectionsOpened, 3, "7 streams at 3 per connection")
        XCTAssertEqual(try small.pool.connectionCount.wait(), 3)
    }
}
