import NIOCore
import NIOEmbedded
import NIOHPACK
import NIOHTTP2
@testable import PalisadeL7
import XCTest

/// The caller's side of the HTTP/2 relay (`H2CallerConnection`), fed raw
/// frames: what never reaches the workload, what is answered how, and
/// what is let be. (h2spec and tools/testing/h2conform.py check the RFC's
/// cases through the running proxy; these pin the proxy's own choices.)
final class H2CallerConnectionTests: XCTestCase {
    final class Lab {
        let loop = EmbeddedEventLoop()
        let caller: EmbeddedChannel, upstream: EmbeddedChannel
        private var encoder = HPACKEncoder(allocator: ByteBufferAllocator())
        /// What the caller received, and what the workload received after its preface.
        var toCaller = ByteBuffer()
        var toWorkload = ByteBuffer()
        /// Access log entries: "status request-bytes response-bytes".
        let logged = Box<[String]>([])

        init() throws {
            caller = EmbeddedChannel(loop: loop)
            upstream = EmbeddedChannel(loop: loop)
            let address = try SocketAddress(ipAddress: "127.0.0.1", port: 1)
            for c in [caller, upstream] { try c.connect(to: address).wait() }
            let l7 = L7Context(gate: { _, _, _, _, _ in HTTPVerdict(allowed: true, reason: "", rule: nil) },
                               source: "spiffe://t/a", destination: "spiffe://t/b", destinationAddress: "127.0.0.1:80",
                               log: { [logged] e in logged.value.append("\(e.status) \(e.requestBytes) \(e.responseBytes)") })
            try H2Relay.install(downstream: caller, upstream: upstream, l7: l7)
            try upstream.writeInbound(h2Frame(4, 0, 0, ByteBuffer()))   // the workload's SETTINGS
            var start = ByteBuffer(bytes: L7ProtocolSniffer.preface)
            var settings = h2Frame(4, 0, 0, ByteBuffer())
            start.writeBuffer(&settings)
            try caller.writeInbound(start)
            try collect()
            toWorkload.moveReaderIndex(forwardBy: L7ProtocolSniffer.preface.count)
            _ = frames(&toCaller)
            _ = frames(&toWorkload)
        }

        func finish() {
            for c in [caller, upstream] { _ = try? c.finish() }
            try? loop.syncShutdownGracefully()
        }

        func collect() throws {
            while var b = try caller.readOutbound(as: ByteBuffer.self) { toCaller.writeBuffer(&b) }
            while var b = try upstream.readOutbound(as: ByteBuffer.self) { toWorkload.writeBuffer(&b) }
        }

        /// A request's HEADERS as the caller sends them (literal fields, not
        /// indexed, so the proxy decodes each as written).
        func headers(_ stream: UInt32, _ fields: [(String, String)], endStream: Bool = true) throws {
            var h = HPACKHeaders()
            for (name, value) in fields { h.add(name: name, value: value, indexing: .nonIndexable) }
            var block = ByteBuffer()
            try encoder.encode(headers: h, to: &block)
            try caller.writeInbound(h2Frame(1, 0x4 | (endStream ? 0x1 : 0), stream, block))
            try collect()
        }

        func data(_ stream: UInt32, _ text: String, endStream: Bool) throws {
            try caller.writeInbound(h2Frame(0, endStream ? 0x1 : 0, stream, ByteBuffer(string: text)))
            try collect()
        }

        /// The frames received since the last call, as "TYPE:stream[:code]".
        func frames(_ b: inout ByteBuffer) -> [String] {
            var out: [String] = []
            takeH2Frames(&b) { type, _, stream, payload in
                switch type {
                case 0: out.append("DATA:\(stream)")
                case 1: out.append("HEADERS:\(stream)")
                case 3: out.append("RST_STREAM:\(stream):\(payload.getInteger(at: payload.readerIndex, as: UInt32.self)!)")
                case 7: out.append("GOAWAY:\(payload.getInteger(at: payload.readerIndex + 4, as: UInt32.self)!)")
                default: break   // SETTINGS acks, WINDOW_UPDATEs
                }
            }
            return out
        }
    }

    static let valid = [(":method", "GET"), (":scheme", "http"), (":authority", "b"), (":path", "/x")]

    /// Heads that two parsers could read differently are refused on their
    /// stream (PROTOCOL_ERROR, RFC 9113 §8.1.1) and never reach the
    /// workload; the connection goes on, and a valid request passes.
    func testMalformedRequestsNeverReachTheWorkload() throws {
        let lab = try Lab()
        defer { lab.finish() }
        let malformed: [(String, [(String, String)])] = [
            ("a value that ends in a space", Self.valid + [("x-user", "admin ")]),
            ("a value that starts with a tab", Self.valid + [("x-user", "\tadmin")]),
            ("an uppercase name", Self.valid + [("X-User", "admin")]),
            ("a space in a name", Self.valid + [("x user", "admin")]),
            ("a colon inside a name", Self.valid + [("x:user", "admin")]),
            ("a brace in a name", Self.valid + [("x{user}", "admin")]),
            ("a connection-specific field", Self.valid + [("connection", "close")]),
            ("transfer-encoding", Self.valid + [("transfer-encoding", "chunked")]),
            ("te other than trailers", Self.valid + [("te", "gzip")]),
            ("a pseudo-header after a regular field", [(":method", "GET"), (":scheme", "http"), ("x-a", "1"), (":path", "/x")]),
            ("two :path", Self.valid + [(":path", "/y")]),
            ("an unknown pseudo-header", [(":protocol", "websocket")] + Self.valid),
            ("no :scheme", [(":method", "GET"), (":authority", "b"), (":path", "/x")]),
            ("an empty :path", [(":method", "GET"), (":scheme", "http"), (":authority", "b"), (":path", "")]),
            ("a content-length that is no number", Self.valid + [("content-length", "1a")]),
            ("two content-lengths that disagree", Self.valid + [("content-length", "1"), ("content-length", "2")]),
        ]
        var stream: UInt32 = 1
        for (name, fields) in malformed {
            try lab.headers(stream, fields)
            XCTAssertEqual(lab.frames(&lab.toCaller), ["RST_STREAM:\(stream):1"], name)
            XCTAssertEqual(lab.frames(&lab.toWorkload), [], name)
            stream += 2
        }
        try lab.headers(stream, Self.valid + [("te", "trailers"), ("x-user", "ad min")])
        XCTAssertEqual(lab.frames(&lab.toWorkload), ["HEADERS:1"])
        XCTAssertEqual(lab.frames(&lab.toCaller), [])
    }

    /// Frames that were in flight when the proxy reset a stream are let be
    /// (RFC 9113 §5.1, "closed"); a DATA frame on a stream the caller
    /// itself reset is STREAM_CLOSED; and a body longer than its
    /// content-length resets its stream before the extra bytes reach the
    /// workload.
    func testLateFramesAndBodiesPastTheirLength() throws {
        let lab = try Lab()
        defer { lab.finish() }
        try lab.headers(1, Self.valid + [("X-Bad", "1")], endStream: false)
        XCTAssertEqual(lab.frames(&lab.toCaller), ["RST_STREAM:1:1"])
        try lab.data(1, "late", endStream: true)
        XCTAssertEqual(lab.frames(&lab.toCaller), [])

        try lab.headers(3, [(":method", "POST"), (":scheme", "http"), (":authority", "b"), (":path", "/x")], endStream: false)
        try lab.caller.writeInbound(h2Frame(3, 0, 3, ByteBuffer(integer: UInt32(8))))   // the caller's RST_STREAM(CANCEL)
        try lab.collect()
        try lab.data(3, "after", endStream: true)
        XCTAssertEqual(lab.frames(&lab.toCaller), ["RST_STREAM:3:5"])
        XCTAssertEqual(lab.frames(&lab.toWorkload), ["HEADERS:1", "RST_STREAM:1:8"])

        try lab.headers(5, [(":method", "POST"), (":scheme", "http"), (":authority", "b"), (":path", "/x"), ("content-length", "3")],
                        endStream: false)
        try lab.data(5, "four", endStream: true)
        XCTAssertEqual(lab.frames(&lab.toCaller), ["RST_STREAM:5:1"])
        XCTAssertEqual(lab.frames(&lab.toWorkload), ["HEADERS:3", "RST_STREAM:3:8"])
    }

    /// A caller that shrinks its INITIAL_WINDOW_SIZE below what a stream
    /// already took leaves that window negative (RFC 9113 §6.9.2): body
    /// bytes then wait for WINDOW_UPDATEs, but an empty DATA frame that
    /// ends the stream goes at once.
    func testAWindowMadeNegativeStillLetsTheStreamEnd() throws {
        let lab = try Lab()
        defer { lab.finish() }
        var workloadEncoder = HPACKEncoder(allocator: ByteBufferAllocator())
        try lab.headers(1, Self.valid)
        try lab.headers(3, Self.valid)
        XCTAssertEqual(lab.frames(&lab.toWorkload), ["HEADERS:1", "HEADERS:3"])
        var head = ByteBuffer()
        try workloadEncoder.encode(headers: HPACKHeaders([(":status", "200")]), to: &head)
        for stream: UInt32 in [1, 3] {
            try lab.upstream.writeInbound(h2Frame(1, 0x4, stream, head))
            try lab.upstream.writeInbound(h2Frame(0, 0, stream, ByteBuffer(string: "0123456789")))
        }
        try lab.collect()
        XCTAssertEqual(lab.frames(&lab.toCaller), ["HEADERS:1", "DATA:1", "HEADERS:3", "DATA:3"])
        var settings = ByteBuffer()
        settings.writeInteger(UInt16(4))
        settings.writeInteger(UInt32(5))   // INITIAL_WINDOW_SIZE 5: both streams' windows are now -5
        try lab.caller.writeInbound(h2Frame(4, 0, 0, settings))
        try lab.upstream.writeInbound(h2Frame(0, 0x1, 1, ByteBuffer()))
        try lab.upstream.writeInbound(h2Frame(0, 0x1, 3, ByteBuffer(string: "abc")))
        try lab.collect()
        XCTAssertEqual(lab.frames(&lab.toCaller), ["DATA:1"])
        try lab.caller.writeInbound(h2Frame(8, 0, 3, ByteBuffer(integer: UInt32(8))))   // window 3: "abc" fits
        try lab.collect()
        XCTAssertEqual(lab.frames(&lab.toCaller), ["DATA:3"])
    }

    /// Every exchange reaches the access log once: one answered by a head
    /// alone (its END_STREAM closes the caller's stream as it is written),
    /// one with a body, one that ends with trailers (gRPC's way).
    func testEveryExchangeIsLoggedOnce() throws {
        let lab = try Lab()
        defer { lab.finish() }
        var workloadEncoder = HPACKEncoder(allocator: ByteBufferAllocator())
        func block(_ fields: [(String, String)]) throws -> ByteBuffer {
            var b = ByteBuffer()
            try workloadEncoder.encode(headers: HPACKHeaders(fields), to: &b)
            return b
        }
        for stream: UInt32 in [1, 3, 5] { try lab.headers(stream, Self.valid) }
        XCTAssertEqual(lab.frames(&lab.toWorkload), ["HEADERS:1", "HEADERS:3", "HEADERS:5"])
        try lab.upstream.writeInbound(h2Frame(1, 0x5, 1, try block([(":status", "204")])))
        try lab.upstream.writeInbound(h2Frame(1, 0x4, 3, try block([(":status", "200")])))
        try lab.upstream.writeInbound(h2Frame(0, 0x1, 3, ByteBuffer(string: "hello")))
        try lab.upstream.writeInbound(h2Frame(1, 0x4, 5, try block([(":status", "200"), ("content-type", "application/grpc")])))
        try lab.upstream.writeInbound(h2Frame(0, 0, 5, ByteBuffer(string: "msg")))
        try lab.upstream.writeInbound(h2Frame(1, 0x5, 5, try block([("grpc-status", "0")])))
        try lab.collect()
        XCTAssertEqual(lab.frames(&lab.toCaller), ["HEADERS:1", "HEADERS:3", "DATA:3", "HEADERS:5", "DATA:5", "HEADERS:5"])
        XCTAssertEqual(lab.logged.value, ["204 0 0", "200 0 5", "200 0 3"])
    }

    /// Response heads a workload may not send on HTTP/2 (RFC 9113 §8.3.2)
    /// are judged by the same rules as requests.
    func testResponseAndTrailerRules() {
        XCTAssertTrue(H2Fields.validResponse(HPACKHeaders([(":status", "200"), ("content-type", "text/plain")])))
        XCTAssertFalse(H2Fields.validResponse(HPACKHeaders([("content-type", "text/plain")])), "no :status")
        XCTAssertFalse(H2Fields.validResponse(HPACKHeaders([(":status", "20")])), "two digits")
        XCTAssertFalse(H2Fields.validResponse(HPACKHeaders([(":status", "200"), (":status", "200")])), "two :status")
        XCTAssertFalse(H2Fields.validResponse(HPACKHeaders([(":status", "200"), (":path", "/")])), "a request's pseudo-header")
        XCTAssertFalse(H2Fields.validResponse(HPACKHeaders([(":status", "200"), ("keep-alive", "5")])), "connection-specific")
        XCTAssertFalse(H2Fields.validResponse(HPACKHeaders([(":status", "200"), ("set-cookie", "a=1\r\nx: y")])), "CR LF in a value")
        XCTAssertTrue(H2Fields.validTrailers(HPACKHeaders([("grpc-status", "0")])))
        // (Found by the http2response fuzz target: not a token, which NIO's client refuses.)
        XCTAssertFalse(H2Fields.validTrailers(HPACKHeaders([("grpc-statu{", "0")])), "a name that is no token")
        XCTAssertFalse(H2Fields.validTrailers(HPACKHeaders([("x-a\"b", "0")])), "a quote in a name")
        XCTAssertFalse(H2Fields.validTrailers(HPACKHeaders([(":status", "200")])), "a pseudo-header in trailers")
        XCTAssertTrue(H2Fields.validRequest(HPACKHeaders([(":method", "CONNECT"), (":authority", "b:443")])), "CONNECT")
        XCTAssertFalse(H2Fields.validRequest(HPACKHeaders([(":method", "CONNECT"), (":authority", "b:443"), (":path", "/")])),
                       "CONNECT with :path")
    }
}

/// The proxy's HPACK encoder, read back by NIO's decoder.
final class H2HeaderEncoderTests: XCTestCase {
    func testBlocksDecodeToWhatWasEncoded() throws {
        var encoder = H2HeaderEncoder()
        var decoder = HPACKDecoder(allocator: ByteBufferAllocator())
        var headers = HPACKHeaders([(":status", "200"), (":status", "418"), ("content-type", "text/plain"),
                                    ("x-long", String(repeating: "v", count: 300)), (String(repeating: "n", count: 130), "é")])
        headers.add(name: "authorization", value: "Bearer t", indexing: .neverIndexed)
        var block = ByteBuffer()
        encoder.encode(headers, into: &block)
        XCTAssertEqual(block.getInteger(at: 0, as: UInt8.self), 0x88, "a whole static entry goes as its index")
        XCTAssertEqual(block.getInteger(at: 1, as: UInt8.self), 0x08, "a static name by index, without indexing")
        let decoded = try decoder.decodeHeaders(from: &block)
        XCTAssertEqual(decoded.map { "\($0.name): \($0.value)" }, headers.map { "\($0.name): \($0.value)" })
        XCTAssertEqual(decoded.map(\.indexable).last, .neverIndexed)
        XCTAssertEqual(block.readableBytes, 0)
    }

    /// A peer that lowers SETTINGS_HEADER_TABLE_SIZE gets the smallest
    /// size first in the next block (RFC 7541 §4.2), once.
    func testALoweredTableSizeIsAnnouncedOnce() throws {
        var encoder = H2HeaderEncoder()
        encoder.peerTableSize(100)
        encoder.peerTableSize(0)
        encoder.peerTableSize(50)
        var block = ByteBuffer()
        encoder.encode(HPACKHeaders([(":status", "200")]), into: &block)
        XCTAssertEqual(Array(block.readableBytesView), [0x20, 0x88])
        block.clear()
        encoder.encode(HPACKHeaders([(":status", "200")]), into: &block)
        XCTAssertEqual(Array(block.readableBytesView), [0x88])
    }
}
