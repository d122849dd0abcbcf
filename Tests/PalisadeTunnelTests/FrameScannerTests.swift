import NIOCore
@testable import PalisadeL7
import XCTest

/// The frame-header scanner of H2CallerGuard: however a byte stream of
/// frames is cut into reads, it reports each frame once, with the type,
/// flags and stream (reserved bit cleared) of its header, and where its
/// payload starts when the header ended in that read.
final class FrameScannerTests: XCTestCase {
    struct Seen: Equatable { var type, flags: UInt8; var stream: UInt32; var payloadOffset: Int? }

    func testEveryCutReportsTheSameFrames() {
        var rng = SystemRandomNumberGenerator()
        for _ in 0..<300 {
            // A preface, then frames of random type, flags, stream (reserved bit sometimes set) and length.
            var bytes = Array("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".utf8)
            var want: [(Seen, Int)] = []   // (frame, absolute offset of its payload)
            for _ in 0..<Int.random(in: 1...20, using: &rng) {
                let length = [0, 1, 8, 9, 10, 17, 300, 70_000].randomElement(using: &rng)!
                let type = UInt8.random(in: 0...10, using: &rng), flags = UInt8.random(in: 0...255, using: &rng)
                let raw = UInt32.random(in: 0...UInt32.max, using: &rng)
                bytes += [UInt8(length >> 16 & 0xFF), UInt8(length >> 8 & 0xFF), UInt8(length & 0xFF), type, flags,
                          UInt8(raw >> 24), UInt8(raw >> 16 & 0xFF), UInt8(raw >> 8 & 0xFF), UInt8(raw & 0xFF)]
                want.append((Seen(type: type, flags: flags, stream: raw & 0x7FFF_FFFF, payloadOffset: nil), bytes.count))
                bytes += (0..<length).map { UInt8(truncatingIfNeeded: $0) }
            }
            // Cut at random points, some reads a few bytes long (headers split across them).
            var scanner = FrameScanner(skip: 24)
            var seen: [Seen] = []
            var at = 0
            while at < bytes.count {
                let n = min(bytes.count - at, Bool.random(using: &rng) ? Int.random(in: 1...12, using: &rng) : Int.random(in: 1...90_000, using: &rng))
                // A buffer whose reader index is not 0, as in a pipeline.
                var buffer = ByteBuffer(bytes: [0xEE, 0xEE, 0xEE] + bytes[at..<at + n])
                buffer.moveReaderIndex(forwardBy: 3)
                let base = at - 3
                scanner.scan(buffer) { type, flags, stream, payload in
                    seen.append(Seen(type: type, flags: flags, stream: stream, payloadOffset: payload.map { $0 + base }))
                }
                at += n
            }
            XCTAssertEqual(seen.map(\.type), want.map(\.0.type))
            XCTAssertEqual(seen.map(\.flags), want.map(\.0.flags))
            XCTAssertEqual(seen.map(\.stream), want.map(\.0.stream))
            // The payload offset is given when the header ended in the read that reported it.
            for (s, w) in zip(seen, want) {
                XCTAssertEqual(s.payloadOffset, w.1, "\(s)")
            }
            if seen.count != want.count { return }
        }
    }
}
