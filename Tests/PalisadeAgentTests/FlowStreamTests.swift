import Foundation
import NIOConcurrencyHelpers
import PalisadeTestSupport
import XCTest
@testable import PalisadeAgent

/// The root-only flow socket: listeners are capped (each holds a socket and
/// queued lines), one past the cap is closed at accept and counted, the
/// others keep receiving every line.
final class FlowStreamTests: XCTestCase {
    func testListenersAreCappedAndTheRestServed() throws {
        let dir = NSTemporaryDirectory() + "palisade-fs-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        addTeardownBlock { try? FileManager.default.removeItem(atPath: dir) }
        let refused = NIOLockedValueBox(0)
        let stream = try FlowStream(path: "\(dir)/flows.sock") { refused.withLockedValue { $0 += 1 } }
        defer { stream.stop() }
        var mode = stat()
        XCTAssertEqual(stat("\(dir)/flows.sock", &mode), 0)
        XCTAssertEqual(mode.st_mode & 0o777, 0o600)

        let extra = 5
        let clients = (0..<FlowStream.maxClients + extra).compactMap { _ in LoopbackSocket(unixPath: "\(dir)/flows.sock") }
        XCTAssertEqual(clients.count, FlowStream.maxClients + extra, "every connect is accepted by the kernel")
        usleep(300_000)
        let closed = clients.filter { $0.closedByPeer(within: 0.01) }
        XCTAssertEqual(closed.count, extra)
        XCTAssertEqual(refused.withLockedValue { $0 }, extra)

        stream.publish(Array("{\"verdict\":\"denied\"}\n".utf8))
        for c in clients where !closed.contains(where: { $0 === c }) {
            XCTAssertEqual(String(decoding: c.readSome(), as: UTF8.self), "{\"verdict\":\"denied\"}\n")
        }
    }
}
