import NIOCore
import NIOEmbedded
import PalisadeTestSupport
@testable import PalisadeRelay
import XCTest

/// The aligner in front of NIO's HTTP/2 decoder: whatever the reads, the
/// bytes come out unchanged and in order, and every read it passes on ends
/// where the decoder holds nothing (a frame's end, or inside a DATA
/// payload after at least one of its bytes).
final class H2FrameAlignerTests: XCTestCase {
    struct Frame { var type: UInt8; var flags: UInt8; var length: Int }

    static func bytes(of frames: [Frame], preface: Bool) -> [UInt8] {
        var out: [UInt8] = preface ? Array("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".utf8) : []
        for (n, f) in frames.enumerated() {
            out += [UInt8(f.length >> 16 & 0xFF), UInt8(f.length >> 8 & 0xFF), UInt8(f.length & 0xFF), f.type, f.flags, 0, 0, 0, 1]
            out += (0..<f.length).map { UInt8(truncatingIfNeeded: $0 &+ n) }
        }
        return out
    }

    /// A mix of what a tunnel connection carries, plus the odd cases:
    /// empty and padded DATA, a frame larger than the aligner holds back.
    static let frames: [Frame] = [
        Frame(type: 4, flags: 0, length: 18),            // SETTINGS
        Frame(type: 1, flags: 4, length: 120),           // HEADERS
        Frame(type: 0, flags: 0, length: 16_384),        // DATA
        Frame(type: 8, flags: 0, length: 4),             // WINDOW_UPDATE
        Frame(type: 0, flags: 0, length: 1),
        Frame(type: 0, flags: 1, length: 0),             // empty DATA, END_STREAM
        Frame(type: 0, flags: 8, length: 300),           // padded DATA: held whole
        Frame(type: 0, flags: 0, length: 65_536),
        Frame(type: 1, flags: 4, length: 70_000),        // over the hold limit: passed as it comes
        Frame(type: 6, flags: 0, length: 8),             // PING
        Frame(type: 0, flags: 0, length: 40_000),
        Frame(type: 3, flags: 0, length: 4),             // RST_STREAM
    ]

    /// Offsets at which the decoder holds nothing once a read ended there.
    static func safeEnds(of frames: [Frame], preface: Bool, total: Int) -> Set<Int> {
        var safe = Set<Int>()
        var at = preface ? 24 : 0
        if preface { safe.formUnion(1...24) }
        for f in frames {
            let payload = at + 9
            if f.type == 0 && f.flags & 8 == 0 && f.length > 0 { safe.formUnion((payload + 1)...(payload + f.length)) }
            if f.length > H2FrameAligner.holdLimit { safe.formUnion(payload...(payload + f.length)) }
            at = payload + f.length
            safe.insert(at)
        }
        XCTAssertEqual(at, total)
        return safe
    }

    func run(preface: Bool, seed: UInt64, chunkSizes: ClosedRange<Int>) throws {
        let input = Self.bytes(of: Self.frames, preface: preface)
        let safe = Self.safeEnds(of: Self.frames, preface: preface, total: input.count)
        let channel = EmbeddedChannel(handler: H2FrameAligner(expectsPreface: preface))
        var rng = SplitMix64(seed: seed)
        var offset = 0, sent = 0
        var out: [UInt8] = []
        while sent < input.count {
            let n = min(input.count - sent, Int(rng.next() % UInt64(chunkSizes.count)) + chunkSizes.lowerBound)
            try channel.writeInbound(ByteBuffer(bytes: input[sent..<(sent + n)]))
            sent += n
            while let read = try channel.readInbound(as: ByteBuffer.self) {
                XCTAssertGreaterThan(read.readableBytes, 0)
                out += read.readableBytesView
                offset += read.readableBytes
                XCTAssertTrue(safe.contains(offset), "seed \(seed): a read ended at \(offset), where the decoder would hold a partial unit")
            }
        }
        XCTAssertEqual(out, input, "seed \(seed): bytes changed, reordered or lost")
        _ = try channel.finish()
    }

    func testBytesUnchangedAndEveryReadEndsWhereTheDecoderHoldsNothing() throws {
        for seed in 1...10 as ClosedRange<UInt64> {
            try run(preface: seed % 2 == 0, seed: seed, chunkSizes: 1...40)          // splits inside every header
            try run(preface: seed % 2 == 1, seed: seed, chunkSizes: 1...20_000)
            try run(preface: true, seed: seed, chunkSizes: 60_000...70_000)          // TLS-sized reads
        }
    }

    /// What is held back is one unit: at most a frame header or a frame up
    /// to the hold limit, never a growing backlog.
    func testHoldsAtMostOneSmallUnit() throws {
        let channel = EmbeddedChannel(handler: H2FrameAligner(expectsPreface: false))
        // A HEADERS frame of 1,000 bytes arriving a byte at a time: nothing
        // goes on until it is whole, then exactly it.
        let frame = Self.bytes(of: [Frame(type: 1, flags: 4, length: 1000)], preface: false)
        for b in frame.dropLast() {
            try channel.writeInbound(ByteBuffer(bytes: [b]))
            XCTAssertNil(try channel.readInbound(as: ByteBuffer.self))
        }
        try channel.writeInbound(ByteBuffer(bytes: [frame.last!]))
        XCTAssertEqual(try channel.readInbound(as: ByteBuffer.self).map { Array($0.readableBytesView) }, frame)
        // A DATA frame goes on from its first payload byte.
        let data = Self.bytes(of: [Frame(type: 0, flags: 0, length: 50_000)], preface: false)
        try channel.writeInbound(ByteBuffer(bytes: data[0..<9]))
        XCTAssertNil(try channel.readInbound(as: ByteBuffer.self))
        try channel.writeInbound(ByteBuffer(bytes: data[9..<12]))
        XCTAssertEqual(try channel.readInbound(as: ByteBuffer.self)?.readableBytes, 10)   // header + first byte
        XCTAssertEqual(try channel.readInbound(as: ByteBuffer.self)?.readableBytes, 2)
        _ = try channel.finish()
    }
}
