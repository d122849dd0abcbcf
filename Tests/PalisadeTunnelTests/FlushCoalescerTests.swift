import NIOCore
import NIOEmbedded
@testable import PalisadeRelay
import XCTest

/// The tunnel's write gathering in front of TLS: small writes of one
/// event-loop tick leave as one buffer (one TLS record), large ones as they
/// are, the bytes in the order written, every promise completed.
final class FlushCoalescerTests: XCTestCase {
    func bytes(_ n: Int, _ seed: UInt8) -> ByteBuffer { ByteBuffer(bytes: (0..<n).map { UInt8(truncatingIfNeeded: $0) &+ seed }) }

    func testSmallWritesOfOneTickLeaveAsOneBufferInOrder() throws {
        let channel = EmbeddedChannel(handler: FlushCoalescer())
        let loop = channel.embeddedEventLoop
        let written: [ByteBuffer] = [bytes(9, 1), bytes(100, 2), bytes(9, 3), bytes(20_000, 4), bytes(13, 5), bytes(4_096, 6)]
        var promises: [EventLoopFuture<Void>] = []
        for b in written {
            let p = loop.makePromise(of: Void.self)
            promises.append(p.futureResult)
            channel.write(b, promise: p)
        }
        channel.flush()
        XCTAssertNil(try channel.readOutbound(as: ByteBuffer.self), "nothing leaves before the tick ends")
        loop.run()
        var out: [ByteBuffer] = []
        while let b = try channel.readOutbound(as: ByteBuffer.self) { out.append(b) }
        // 9 + 100 + 9 gathered; the 20,000-byte write on its own; 13 + 4,096 gathered.
        XCTAssertEqual(out.map(\.readableBytes), [118, 20_000, 4_109])
        XCTAssertEqual(out.flatMap { Array($0.readableBytesView) }, written.flatMap { Array($0.readableBytesView) })
        for f in promises { XCTAssertNoThrow(try f.wait()) }
        _ = try channel.finish()
    }

    /// The buffer of one tick is gathered into again at the next: what left
    /// earlier and is still held (by TLS, here by the test) keeps its bytes.
    func testAReusedBufferNeverChangesWhatLeftBefore() throws {
        let channel = EmbeddedChannel(handler: FlushCoalescer())
        var held: [ByteBuffer] = []
        for tick in 0..<4 {
            channel.write(bytes(100, UInt8(tick * 10)), promise: nil)
            channel.write(bytes(50, UInt8(tick * 10 + 1)), promise: nil)
            channel.flush()
            channel.embeddedEventLoop.run()
            while let b = try channel.readOutbound(as: ByteBuffer.self) { held.append(b) }
            if tick == 2 { held.removeAll() }   // nothing holds them: the storage can be reused
        }
        XCTAssertEqual(held.count, 1)
        XCTAssertEqual(Array(held[0].readableBytesView), Array(bytes(100, 30).readableBytesView) + Array(bytes(50, 31).readableBytesView))
        var earlier: [ByteBuffer] = []
        for tick in 0..<3 {
            channel.write(bytes(200, UInt8(100 + tick)), promise: nil)
            channel.flush()
            channel.embeddedEventLoop.run()
            while let b = try channel.readOutbound(as: ByteBuffer.self) { earlier.append(b) }
        }
        XCTAssertEqual(earlier.map { Array($0.readableBytesView) }, (0..<3).map { Array(bytes(200, UInt8(100 + $0)).readableBytesView) })
        _ = try channel.finish()
    }

    func testAGatheredBufferStaysWithinOneTLSRecord() throws {
        let channel = EmbeddedChannel(handler: FlushCoalescer())
        for i in 0..<10 { channel.write(bytes(4_000, UInt8(i)), promise: nil) }
        channel.flush()
        channel.embeddedEventLoop.run()
        var sizes: [Int] = []
        while let b = try channel.readOutbound(as: ByteBuffer.self) { sizes.append(b.readableBytes) }
        XCTAssertEqual(sizes, [16_000, 16_000, 8_000])
        XCTAssertTrue(sizes.allSatisfy { $0 <= FlushCoalescer.recordSize })
        _ = try channel.finish()
    }

    /// A DATA frame's header and a payload over the small-write size leave
    /// as one record when they fit in it; one that does not fit goes alone.
    func testALargerWriteJoinsWhatWasGatheredWhenItFits() throws {
        let channel = EmbeddedChannel(handler: FlushCoalescer())
        let written = [bytes(9, 1), bytes(10_000, 2), bytes(9, 3), bytes(16_380, 4)]
        for b in written { channel.write(b, promise: nil) }
        channel.flush()
        channel.embeddedEventLoop.run()
        var out: [ByteBuffer] = []
        while let b = try channel.readOutbound(as: ByteBuffer.self) { out.append(b) }
        XCTAssertEqual(out.map(\.readableBytes), [10_018, 16_380])
        XCTAssertEqual(out.flatMap { Array($0.readableBytesView) }, written.flatMap { Array($0.readableBytesView) })
        _ = try channel.finish()
    }

    /// Written but not yet flushed when the connection closes: still goes
    /// out ahead of the close, as without the coalescer.
    func testCloseFlushesWhatWasGathered() throws {
        let channel = EmbeddedChannel(handler: FlushCoalescer())
        channel.write(bytes(50, 9), promise: nil)
        channel.flush()
        _ = channel.close()
        XCTAssertEqual(try channel.readOutbound(as: ByteBuffer.self)?.readableBytes, 50)
    }
}
