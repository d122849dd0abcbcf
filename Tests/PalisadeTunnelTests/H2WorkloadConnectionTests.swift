import NIOCore
import NIOEmbedded
import NIOHPACK
import NIOHTTP2
@testable import PalisadeL7
import XCTest

/// One HTTP/2 frame's bytes.
func h2Frame(_ type: UInt8, _ flags: UInt8, _ stream: UInt32, _ payload: ByteBuffer) -> ByteBuffer {
    var b = ByteBuffer()
    b.writeInteger(UInt32(payload.readableBytes) << 8 | UInt32(type))
    b.writeInteger(flags)
    b.writeInteger(stream)
    var p = payload
    b.writeBuffer(&p)
    return b
}

/// Takes every whole frame off the front of `b`: type, flags, stream, payload.
func takeH2Frames(_ b: inout ByteBuffer, _ each: (UInt8, UInt8, UInt32, ByteBuffer) throws -> Void) rethrows {
    while b.readableBytes >= 9, let head = b.getInteger(at: b.readerIndex, as: UInt32.self), b.readableBytes >= 9 + Int(head >> 8) {
        let flags = b.getInteger(at: b.readerIndex + 4, as: UInt8.self)!
        let stream = b.getInteger(at: b.readerIndex + 5, as: UInt32.self)! & 0x7FFF_FFFF
        try each(UInt8(head & 0xFF), flags, stream, b.getSlice(at: b.readerIndex + 9, length: Int(head >> 8))!)
        b.moveReaderIndex(forwardBy: 9 + Int(head >> 8))
    }
}

/// The workload's side of the HTTP/2 relay (`H2WorkloadConnection`): a
/// caller (NIO's HTTP/2 client) through the relay to a workload written
/// frame by frame here, so the test decides its windows, its stream limit
/// and when it goes away.
final class H2WorkloadConnectionTests: XCTestCase {
    struct Frame {
        var type: UInt8, flags: UInt8, stream: UInt32
        var payload: ByteBuffer
        var headers: HPACKHeaders?
    }

    final class Lab {
        let loop = EmbeddedEventLoop()
        let client: EmbeddedChannel, caller: EmbeddedChannel, upstream: EmbeddedChannel
        /// Bytes the caller sent into the relay.
        var callerBytes = 0
        /// What the workload received, frame by frame (after the preface).
        var received: [Frame] = []
        var answers: [HTTP2Frame] = []
        private var pending = ByteBuffer()
        private var prefaceSeen = false
        private var decoder = HPACKDecoder(allocator: ByteBufferAllocator())
        private var encoder = HPACKEncoder(allocator: ByteBufferAllocator())

        /// What a raw caller (`rawCaller`) received, not yet parsed, and
        /// its DATA bytes per stream.
        var toCaller = ByteBuffer()
        var callerData: [UInt32: Int] = [:]
        let rawCaller: Bool
        /// Window the relay granted the workload: connection, and per stream
        /// beyond the 1 MiB its SETTINGS gave.
        var grantedConnection = 65_535
        var granted: [UInt32: Int] = [:]

        init(workloadSettings: [(UInt16, UInt32)], rawCaller: Bool = false) throws {
            self.rawCaller = rawCaller
            client = EmbeddedChannel(loop: loop)
            caller = EmbeddedChannel(loop: loop)
            upstream = EmbeddedChannel(loop: loop)
            let address = try SocketAddress(ipAddress: "127.0.0.1", port: 1)
            for c in [client, caller, upstream] { try c.connect(to: address).wait() }
            if !rawCaller { try client.pipeline.syncOperations.addHandler(NIOHTTP2Handler(mode: .client)) }
            let l7 = L7Context(gate: { _, _, _, _, _ in HTTPVerdict(allowed: true, reason: "", rule: nil) },
                               source: "spiffe://t/a", destination: "spiffe://t/b", destinationAddress: "127.0.0.1:80")
            try H2Relay.install(downstream: caller, upstream: upstream, l7: l7)
            var settings = ByteBuffer()
            for (id, value) in workloadSettings { settings.writeInteger(id); settings.writeInteger(value) }
            try workloadSends(4, 0, 0, settings)
            try shuttle()
        }

        func finish() {
            for c in [client, caller, upstream] { _ = try? c.finish() }
            try? loop.syncShutdownGracefully()
        }

        func workloadSends(_ type: UInt8, _ flags: UInt8, _ stream: UInt32, _ payload: ByteBuffer) throws {
            try upstream.writeInbound(h2Frame(type, flags, stream, payload))
        }

        func respond(_ stream: UInt32, status: String = "200", endStream: Bool = true) throws {
            var block = ByteBuffer()
            try encoder.encode(headers: HPACKHeaders([(":status", status)]), to: &block)
            try workloadSends(1, 0x4 | (endStream ? 0x1 : 0), stream, block)
            try shuttle()
        }

        func windowUpdate(_ stream: UInt32, _ n: UInt32) throws {
            var b = ByteBuffer()
            b.writeInteger(n)
            try workloadSends(8, 0, stream, b)
            try shuttle()
        }

        func send(_ stream: Int, _ payload: HTTP2Frame.FramePayload) throws {
            client.write(HTTP2Frame(streamID: HTTP2StreamID(stream), payload: payload), promise: nil)
        }

        func request(_ stream: Int, _ method: String = "GET", endStream: Bool = true) throws {
            let h = HPACKHeaders([(":method", method), (":scheme", "http"), (":authority", "b"), (":path", "/x")])
            try send(stream, .headers(.init(headers: h, endStream: endStream)))
        }

        /// Moves bytes between the three until none moves.
        func shuttle() throws {
            client.flush()
            var moved = true
            while moved {
                moved = false
                while let b = try client.readOutbound(as: ByteBuffer.self) {
                    moved = true
                    callerBytes += b.readableBytes
                    try caller.writeInbound(b)
                }
                while var b = try caller.readOutbound(as: ByteBuffer.self) {
                    moved = true
                    if rawCaller {
                        toCaller.writeBuffer(&b)
                        parseCallerReceived()
                    } else {
                        try client.writeInbound(b)
                    }
                }
                while var b = try upstream.readOutbound(as: ByteBuffer.self) {
                    moved = true
                    pending.writeBuffer(&b)
                }
                try parseReceived()
                while !rawCaller, let f = try client.readInbound(as: HTTP2Frame.self) {
                    switch f.payload {
                    case .headers, .data, .rstStream: answers.append(f)
                    default: break
                    }
                }
                client.flush()
                loop.run()
            }
        }

        private func parseReceived() throws {
            if !prefaceSeen {
                guard pending.readableBytes >= 24 else { return }
                XCTAssertEqual(pending.readString(length: 24), "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
                prefaceSeen = true
            }
            try takeH2Frames(&pending) { type, flags, stream, payload in
                var f = Frame(type: type, flags: flags, stream: stream, payload: payload)
                var block = payload
                if type == 1 { f.headers = try decoder.decodeHeaders(from: &block) }
                if type == 8, let n = payload.getInteger(at: payload.readerIndex, as: UInt32.self) {
                    if stream == 0 { grantedConnection += Int(n) } else { granted[stream, default: 0] += Int(n) }
                }
                received.append(f)
            }
        }

        private func parseCallerReceived() {
            takeH2Frames(&toCaller) { type, _, stream, payload in
                if type == 0 { callerData[stream, default: 0] += payload.readableBytes }
            }
        }

        /// Bytes in HTTP/2 frames of a raw caller.
        func callerSends(_ type: UInt8, _ flags: UInt8, _ stream: UInt32, _ payload: ByteBuffer) throws {
            try caller.writeInbound(h2Frame(type, flags, stream, payload))
        }

        /// DATA bytes the workload received, all streams.
        var dataReceived: Int { received.filter { $0.type == 0 }.reduce(0) { $0 + $1.payload.readableBytes } }
        var headersReceived: [UInt32] { received.filter { $0.type == 1 }.map(\.stream) }
    }

    /// A workload that grants no window beyond HTTP/2's initial 64 KiB:
    /// the relay holds what it cannot send and gives the caller no window
    /// back for it, so the caller stops at the windows it was granted
    /// (about 1 MiB) instead of pushing all 2 MiB into the agent's memory.
    /// Once the workload opens its windows, all of it arrives, in order.
    func testACallerCannotPushMoreThanTheWorkloadsWindowsAllow() throws {
        let lab = try Lab(workloadSettings: [])
        defer { lab.finish() }
        try lab.request(1, "POST", endStream: false)
        let chunk = ByteBuffer(repeating: 7, count: 16 << 10)
        for i in 0..<128 {
            try lab.send(1, .data(.init(data: .byteBuffer(chunk), endStream: i == 127)))
        }
        try lab.shuttle()
        XCTAssertEqual(lab.headersReceived, [1])
        XCTAssertEqual(lab.dataReceived, 65_535, "exactly the workload's windows")
        XCTAssertLessThan(lab.callerBytes, (1 << 20) + (64 << 10), "the caller held to the stream window it was granted")
        XCTAssertGreaterThan(lab.callerBytes, 1 << 19)

        try lab.windowUpdate(0, 16 << 20)
        try lab.windowUpdate(1, 16 << 20)
        XCTAssertEqual(lab.dataReceived, 2 << 20)
        XCTAssertEqual(lab.received.last.map { $0.type == 0 && $0.flags & 1 == 1 }, true, "the last DATA ends the stream")
        XCTAssertTrue(lab.received.filter { $0.type == 0 }.allSatisfy { $0.payload.readableBytesView.allSatisfy { $0 == 7 } })
        try lab.respond(1)
        XCTAssertEqual(lab.answers.map(\.streamID), [1])
    }

    /// The other direction: a caller that opens no window (SETTINGS
    /// INITIAL_WINDOW_SIZE 0) while the workload answers with 4 MiB. NIO's
    /// handler holds what the caller's windows do not take, and the relay
    /// gives the workload no window back for it: the workload stops at the
    /// 1 MiB stream window it was granted instead of pouring all of it into
    /// the agent. Once the caller opens its windows, all 4 MiB arrive.
    func testACallerThatReadsNothingHoldsTheWorkloadAtItsWindows() throws {
        let lab = try Lab(workloadSettings: [], rawCaller: true)
        defer { lab.finish() }
        try lab.caller.writeInbound(ByteBuffer(bytes: L7ProtocolSniffer.preface))
        var settings = ByteBuffer()
        settings.writeInteger(UInt16(4))
        settings.writeInteger(UInt32(0))
        try lab.callerSends(4, 0, 0, settings)
        var block = ByteBuffer()
        var encoder = HPACKEncoder(allocator: ByteBufferAllocator())
        try encoder.encode(headers: HPACKHeaders([(":method", "GET"), (":scheme", "http"), (":authority", "b"), (":path", "/big")]),
                           to: &block)
        try lab.callerSends(1, 0x5, 1, block)
        try lab.shuttle()
        XCTAssertEqual(lab.headersReceived, [1])
        try lab.respond(1, endStream: false)

        let total = 4 << 20, chunk = 16 << 10
        var sent = 0
        /// Sends what the relay's windows allow.
        func pour() throws {
            while sent < total {
                let room = min(lab.grantedConnection - sent, (1 << 20) + lab.granted[1, default: 0] - sent)
                guard room >= chunk else { return }
                sent += chunk
                try lab.workloadSends(0, sent == total ? 1 : 0, 1, ByteBuffer(repeating: 9, count: chunk))
                try lab.shuttle()
            }
        }
        try pour()
        XCTAssertLessThanOrEqual(sent, 1 << 20, "held at the stream window granted")
        XCTAssertGreaterThanOrEqual(sent, (1 << 20) - chunk)
        XCTAssertEqual(lab.callerData[1, default: 0], 0, "the caller opened no window")

        var update = ByteBuffer()
        update.writeInteger(UInt32(64 << 20))
        try lab.callerSends(8, 0, 0, update)
        try lab.callerSends(8, 0, 1, update)
        try lab.shuttle()
        try pour()
        XCTAssertEqual(sent, total)
        XCTAssertEqual(lab.callerData[1, default: 0], total)
    }

    /// Requests past the workload's MAX_CONCURRENT_STREAMS wait their turn;
    /// after its GOAWAY the streams it did not take, and any new one, are
    /// refused to the caller (REFUSED_STREAM: safe to retry).
    func testStreamLimitAndGoAway() throws {
        let lab = try Lab(workloadSettings: [(3, 1)])
        defer { lab.finish() }
        for id in [1, 3, 5] { try lab.request(id) }
        try lab.shuttle()
        XCTAssertEqual(lab.headersReceived, [1], "one stream at a time")
        try lab.respond(1)
        XCTAssertEqual(lab.headersReceived, [1, 3])
        var goAway = ByteBuffer()
        goAway.writeInteger(UInt32(3))
        goAway.writeInteger(UInt32(0))
        try lab.workloadSends(7, 0, 0, goAway)
        try lab.respond(3)
        try lab.request(7)
        try lab.shuttle()
        XCTAssertEqual(lab.headersReceived, [1, 3], "nothing opened after the GOAWAY")
        var outcome: [Int: String] = [:]
        for f in lab.answers {
            switch f.payload {
            case .headers(let h): outcome[Int(f.streamID)] = h.headers.first(name: ":status")
            case .rstStream(let code): outcome[Int(f.streamID)] = code == .refusedStream ? "refused" : "\(code)"
            default: break
            }
        }
        XCTAssertEqual(outcome, [1: "200", 3: "200", 5: "refused", 7: "refused"])
    }

    /// A response that breaks HTTP/2's framing resets that stream on both
    /// sides and leaves the connection to the others: DATA before a head,
    /// a body longer than its content-length.
    func testAResponseThatBreaksItsFramingResetsOnlyItsStream() throws {
        let lab = try Lab(workloadSettings: [])
        defer { lab.finish() }
        for id in [1, 3, 5] { try lab.request(id) }
        try lab.shuttle()
        try lab.workloadSends(0, 1, 1, ByteBuffer(string: "early"))
        var block = ByteBuffer()
        var encoder = HPACKEncoder(allocator: ByteBufferAllocator())
        try encoder.encode(headers: HPACKHeaders([(":status", "200"), ("content-length", "2")]), to: &block)
        try lab.workloadSends(1, 0x4, 3, block)
        try lab.workloadSends(0, 1, 3, ByteBuffer(string: "toolong"))
        try lab.shuttle()
        let resets = lab.received.filter { $0.type == 3 }.map(\.stream)
        XCTAssertEqual(resets, [1, 3], "the workload's streams reset")
        try lab.respond(5)
        var outcome: [Int: String] = [:]
        for f in lab.answers {
            switch f.payload {
            case .headers(let h): outcome[Int(f.streamID)] = h.headers.first(name: ":status")
            case .rstStream(let code): outcome[Int(f.streamID)] = "\(code)"
            default: break
            }
        }
        XCTAssertEqual(outcome[5], "200")
        XCTAssertNotNil(outcome[1].flatMap { $0 == "200" ? nil : $0 }, "stream 1 reset, not answered")
        XCTAssertNotNil(outcome[3].flatMap { $0 == "200" ? nil : $0 }, "stream 3 reset, not answered")
    }
}

extension H2WorkloadConnectionTests {
    /// A response's content-length as the workload's side reads it.
    func testContentLengthValues() {
        let cases: [(String, Int?)] = [("0", 0), ("1024", 1024), (" 7 ", 7), ("5, 5", 5), ("5,5", 5), ("5, 6", nil), ("", nil),
                                       ("+5", nil), ("-1", nil), ("5 5", nil), (",5", nil), ("5,", nil), ("0x10", nil),
                                       ("99999999999999999999", nil), ("1\u{0}", nil)]
        for (value, want) in cases {
            XCTAssertEqual(H2Fields.contentLength(value), want, value)
        }
    }
}

extension H2WorkloadConnectionTests {
    /// Against NIO's HTTP/2 server as the workload (it validates every
    /// frame and header block): a header block larger than a frame goes as
    /// HEADERS and CONTINUATION; a workload that allows no HPACK dynamic
    /// table (SETTINGS_HEADER_TABLE_SIZE 0) gets a table size update of 0
    /// at the start of the first block after its SETTINGS; requests, each
    /// with a 40 KB field (sent by the caller as HEADERS and CONTINUATION,
    /// which NIO's client cannot send), reach it whole and every answer
    /// reaches the caller.
    func testNIOServerAsTheWorkloadTakesLargeBlocksAndNoDynamicTable() throws {
        let loop = EmbeddedEventLoop()
        let caller = EmbeddedChannel(loop: loop), upstream = EmbeddedChannel(loop: loop), workload = EmbeddedChannel(loop: loop)
        defer {
            for c in [caller, upstream, workload] { _ = try? c.finish() }
            try? loop.syncShutdownGracefully()
        }
        let address = try SocketAddress(ipAddress: "127.0.0.1", port: 1)
        for c in [caller, upstream, workload] { try c.connect(to: address).wait() }
        var settings = nioDefaultSettings
        settings.append(HTTP2Setting(parameter: .headerTableSize, value: 0))
        settings.append(HTTP2Setting(parameter: .maxHeaderListSize, value: 64 << 10))
        try workload.pipeline.syncOperations.addHandler(NIOHTTP2Handler(mode: .server, initialSettings: settings))
        let l7 = L7Context(gate: { _, _, _, _, _ in HTTPVerdict(allowed: true, reason: "", rule: nil) },
                           source: "spiffe://t/a", destination: "spiffe://t/b", destinationAddress: "127.0.0.1:80")
        try H2Relay.install(downstream: caller, upstream: upstream, l7: l7)

        let big = String(repeating: "a", count: 40_000)   // ~25 KB Huffman-coded
        var seen: [String] = []
        var toCaller = ByteBuffer(), wire = ByteBuffer(), prefaceSkipped = false
        var answered: [UInt32] = [], blockStarts: [UInt8] = [], continuations = 0
        var callerDecoder = HPACKDecoder(allocator: ByteBufferAllocator())
        func shuttle() throws {
            for _ in 0..<100 {
                var moved = false
                while var b = try caller.readOutbound(as: ByteBuffer.self) {
                    moved = true
                    toCaller.writeBuffer(&b)
                    try takeH2Frames(&toCaller) { type, _, stream, payload in
                        guard type == 1 else { return }
                        var p = payload
                        let h = try callerDecoder.decodeHeaders(from: &p)
                        if h.first(name: "x-answer") == "for \(stream)" { answered.append(stream) }
                    }
                }
                while var b = try upstream.readOutbound(as: ByteBuffer.self) {
                    moved = true
                    try workload.writeInbound(b)
                    wire.writeBuffer(&b)
                    if !prefaceSkipped, wire.readableBytes >= 24 { wire.moveReaderIndex(forwardBy: 24); prefaceSkipped = true }
                    if prefaceSkipped {
                        takeH2Frames(&wire) { type, _, _, payload in
                            if type == 1 { blockStarts.append(payload.getInteger(at: payload.readerIndex, as: UInt8.self)!) }
                            if type == 9 { continuations += 1 }
                        }
                    }
                }
                while let f = try workload.readInbound(as: HTTP2Frame.self) {
                    guard case .headers(let h) = f.payload else { continue }
                    XCTAssertEqual(h.headers.first(name: "x-big"), big)
                    seen.append(h.headers.first(name: ":path") ?? "")
                    let answer = HPACKHeaders([(":status", "200"), ("x-answer", "for \(Int(f.streamID))")])
                    try workload.writeOutbound(HTTP2Frame(streamID: f.streamID, payload: .headers(.init(headers: answer, endStream: true))))
                }
                while let b = try workload.readOutbound(as: ByteBuffer.self) {
                    moved = true
                    XCTAssertNil(H2GoawayErrorCode(b), "the workload's server refused what the relay sent")
                    try upstream.writeInbound(b)
                }
                loop.run()
                if !moved { return }
            }
        }
        try caller.writeInbound(ByteBuffer(bytes: L7ProtocolSniffer.preface))
        try caller.writeInbound(h2Frame(4, 0, 0, ByteBuffer()))
        try shuttle()
        // The caller acknowledges the proxy's SETTINGS (64 KiB header lists).
        try caller.writeInbound(h2Frame(4, 1, 0, ByteBuffer()))
        var encoder = HPACKEncoder(allocator: ByteBufferAllocator())
        for (i, id) in [UInt32(1), 3, 5].enumerated() {
            var block = ByteBuffer()
            try encoder.encode(headers: HPACKHeaders([(":method", "GET"), (":scheme", "http"), (":authority", "b"),
                                                      (":path", "/r\(i)"), ("x-big", big)]), to: &block)
            XCTAssertGreaterThan(block.readableBytes, 16_384)
            let first = block.readSlice(length: 16_384)!
            try caller.writeInbound(h2Frame(1, 0x1, id, first))           // END_STREAM, more headers to come
            try caller.writeInbound(h2Frame(9, 0x4, id, block))           // END_HEADERS
            try shuttle()
        }
        XCTAssertEqual(seen, ["/r0", "/r1", "/r2"])
        XCTAssertEqual(blockStarts.first, 0x20, "the first block starts with a table size update to 0")
        XCTAssertEqual(blockStarts.count, 3)
        XCTAssertGreaterThanOrEqual(continuations, 3, "25 KB blocks need a CONTINUATION each")
        XCTAssertEqual(answered, [1, 3, 5])
    }

    /// The error code of a GOAWAY among these frames (no preface).
    func H2GoawayErrorCode(_ buffer: ByteBuffer) -> UInt32? {
        var b = buffer, code: UInt32?
        takeH2Frames(&b) { type, _, _, payload in
            if type == 7, code == nil { code = payload.getInteger(at: payload.readerIndex + 4, as: UInt32.self) }
        }
        return code
    }
}
