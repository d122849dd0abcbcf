import Foundation
import NIOConcurrencyHelpers
import NIOCore
import PalisadeMetrics
import PalisadeTestSupport
import XCTest

/// The metrics endpoint against callers that hold it: slow heads, idle
/// connections, too many connections, oversized heads. Each refusal is
/// reported by reason, and a scrape is served afterwards.
final class MetricsServerTests: XCTestCase {
    var server: MetricsServer!
    let refusals = NIOLockedValueBox<[AdminRefusal]>([])

    func start(_ limits: AdminLimits) throws {
        let refusals = self.refusals
        server = try MetricsServer(host: "127.0.0.1", port: 0, limits: limits,
                                   refused: { r in refusals.withLockedValue { $0.append(r) } }) { Array("palisade_up 1\n".utf8) }
    }

    override func tearDown() { server?.stop() }

    func scrape() -> String? {
        guard let s = LoopbackSocket(port: server.localPort) else { return nil }
        s.send("GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return s.readToEnd().map { String(decoding: $0, as: UTF8.self) }
    }

    func testScrapeIsServed() throws {
        try start(AdminLimits())
        let answer = try XCTUnwrap(scrape())
        XCTAssertTrue(answer.hasPrefix("HTTP/1.1 200"), answer)
        XCTAssertTrue(answer.hasSuffix("palisade_up 1\n"), answer)
        XCTAssertEqual(refusals.withLockedValue { $0 }, [])
    }

    /// A head that trickles in is answered 408 and closed at the deadline
    /// counted from its first byte, however often bytes keep coming.
    func testSlowHeadGets408() throws {
        var limits = AdminLimits()
        limits.requestTimeout = .milliseconds(600)
        try start(limits)
        let slow = try XCTUnwrap(LoopbackSocket(port: server.localPort))
        let began = Date()
        for piece in ["GET /met", "rics HTT", "P/1.1\r\n", "Host: x\r\n"] {
            slow.send(piece)
            Thread.sleep(forTimeInterval: 0.2)
        }
        let answer = String(decoding: slow.readToEnd() ?? [], as: UTF8.self)
        XCTAssertTrue(answer.hasPrefix("HTTP/1.1 408"), answer)
        XCTAssertLessThan(Date().timeIntervalSince(began), 3)
        XCTAssertEqual(refusals.withLockedValue { $0 }, [.requestTimeout])
        XCTAssertNotNil(scrape()?.range(of: "palisade_up 1"))
    }

    /// A connection that sends nothing, or nothing more after a scrape, is
    /// closed at the idle deadline (and that is no refusal).
    func testIdleConnectionsAreClosed() throws {
        var limits = AdminLimits()
        limits.idleTimeout = .milliseconds(500)
        try start(limits)
        let silent = try XCTUnwrap(LoopbackSocket(port: server.localPort))
        let kept = try XCTUnwrap(LoopbackSocket(port: server.localPort))
        kept.send("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        XCTAssertFalse(kept.readSome().isEmpty)
        XCTAssertTrue(silent.closedByPeer(within: 3))
        XCTAssertTrue(kept.closedByPeer(within: 3))
        XCTAssertEqual(refusals.withLockedValue { $0 }, [])
        let deadline = Date().addingTimeInterval(2)
        while server.openConnections > 0, Date() < deadline { Thread.sleep(forTimeInterval: 0.02) }
        XCTAssertEqual(server.openConnections, 0)
    }

    /// Past the cap a new connection is closed at once and counted; when one
    /// leaves, a scrape gets its place.
    func testConnectionsAreCapped() throws {
        var limits = AdminLimits()
        limits.maxConnections = 4
        try start(limits)
        var held = (0..<4).compactMap { _ in LoopbackSocket(port: server.localPort) }
        XCTAssertEqual(held.count, 4)
        let deadline = Date().addingTimeInterval(3)
        while server.openConnections < 4, Date() < deadline { Thread.sleep(forTimeInterval: 0.02) }
        let extra = try XCTUnwrap(LoopbackSocket(port: server.localPort))
        XCTAssertTrue(extra.closedByPeer(within: 3))
        XCTAssertEqual(refusals.withLockedValue { $0 }, [.tooManyConnections])
        for s in held { XCTAssertFalse(s.closedByPeer(within: 0.05)) }
        held.removeLast()   // closes it
        while server.openConnections > 3, Date() < deadline.addingTimeInterval(3) { Thread.sleep(forTimeInterval: 0.02) }
        XCTAssertNotNil(scrape()?.range(of: "palisade_up 1"))
    }

    /// A head past the size limit gets 431 and the end of the connection.
    func testOversizedHeadGets431() throws {
        try start(AdminLimits())
        let s = try XCTUnwrap(LoopbackSocket(port: server.localPort))
        s.send("GET /metrics HTTP/1.1\r\nHost: x\r\nX-Pad: \(String(repeating: "a", count: 20_000))\r\n\r\n")
        let answer = String(decoding: s.readToEnd() ?? [], as: UTF8.self)
        XCTAssertTrue(answer.hasPrefix("HTTP/1.1 431"), answer)
        XCTAssertEqual(refusals.withLockedValue { $0 }, [.headerTooLarge])
        XCTAssertNotNil(scrape()?.range(of: "palisade_up 1"))
    }
}
