import Foundation
import XCTest
@testable import PalisadeAgent
@testable import PalisadeL7

/// The access-log writer: lines from many threads all arrive whole, the
/// file is private, rotation keeps one previous file, a backlog past its
/// bound is dropped and counted rather than held.
final class AccessLogWriterTests: XCTestCase {
    static func entry(_ i: Int) -> AccessLogEntry {
        AccessLogEntry(time: "2026-11-23T08:00:00.000Z", source: "spiffe://t/ns/a/sa/a", destination: "spiffe://t/ns/b/sa/b",
                       destinationAddress: "10.0.0.2:8080", method: "GET", path: "/item/\(i)", status: 200, requestBytes: 0,
                       responseBytes: 10, durationMs: 1.5, decision: "allowed", rule: "p/0")
    }

    func testLinesFromManyThreadsArriveWholeAndRotate() throws {
        let dir = NSTemporaryDirectory() + "palisade-alw-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        addTeardownBlock { try? FileManager.default.removeItem(atPath: dir) }
        let path = "\(dir)/access.jsonl"
        let writer = try XCTUnwrap(AccessLogWriter(path: path, rotateAt: 64 << 10))
        // Five rounds, each drained (the writer batches what 20 ms queued:
        // one round would be one write, then one rotation).
        for round in 0..<5 {
            DispatchQueue.concurrentPerform(iterations: 4) { t in
                for i in 0..<100 { writer.write(Self.entry(t * 1000 + round * 100 + i)) }
            }
            writer.flush()
        }
        let current = try String(contentsOfFile: path, encoding: .utf8)
        let previous = try String(contentsOfFile: path + ".1", encoding: .utf8)
        let lines = (previous + current).split(separator: "\n")
        // Each line is whole JSON; rotation dropped only older files.
        for l in lines { XCTAssertNoThrow(try JSONDecoder().decode(AccessLogEntry.self, from: Data(l.utf8)), String(l)) }
        XCTAssertGreaterThan(lines.count, 100)
        XCTAssertLessThan(lines.count, 2000, "older rotations are gone")
        let attrs = try FileManager.default.attributesOfItem(atPath: path)
        XCTAssertEqual((attrs[.posixPermissions] as? NSNumber)?.intValue, 0o600)
        XCTAssertLessThanOrEqual(try FileManager.default.attributesOfItem(atPath: path + ".1")[.size] as? Int ?? .max, (64 << 10) + (16 << 20))
    }

    func testABacklogPastItsBoundIsDroppedAndCounted() throws {
        let dir = NSTemporaryDirectory() + "palisade-alw-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        addTeardownBlock { try? FileManager.default.removeItem(atPath: dir) }
        // A pending bound smaller than one line: every line is refused.
        let writer = try XCTUnwrap(AccessLogWriter(path: "\(dir)/access.jsonl", maxPending: 10))
        let dropped = ManagedCount()
        writer.onDrop = { n in dropped.add(n) }
        for i in 0..<5 { writer.write(Self.entry(i)) }
        writer.flush()
        XCTAssertEqual(dropped.value, 5)
        XCTAssertEqual(try String(contentsOfFile: "\(dir)/access.jsonl", encoding: .utf8), "")
    }
}

final class ManagedCount: @unchecked Sendable {
    private let lock = NSLock()
    private var n = 0
    func add(_ k: Int) { lock.withLock { n += k } }
    var value: Int { lock.withLock { n } }
}
