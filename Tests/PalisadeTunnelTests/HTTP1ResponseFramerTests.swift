import NIOCore
@testable import PalisadeL7
import XCTest

/// The HTTP/1.1 proxy forwards a workload's responses as the bytes it sent
/// (HTTP1ResponseFramer): however they are cut into reads, every byte is
/// forwarded once, in order, each response's head whole and its end where
/// its framing says; anything two parsers could frame differently is
/// refused.
final class HTTP1ResponseFramerTests: XCTestCase {
    /// One generated response: its bytes, and what the framer must report.
    struct Response {
        var head: String
        var body: [UInt8]           // as sent: chunk framing and trailers included
        var status: Int
        var payload: Int
        var request: HTTP1ResponseFramer.Request = .other
        var interim: [String] = []  // 1xx heads before it
    }

    /// What came out of the framer for one response.
    struct Seen: Equatable {
        var interim: [String] = []
        var head = ""
        var status = 0
        var body: [UInt8] = []
        var payload = 0
        var ended = false
    }

    static func randomCase(_ name: String, _ rng: inout SystemRandomNumberGenerator) -> String {
        String(name.map { Bool.random(using: &rng) ? Character($0.uppercased()) : $0 })
    }

    static func randomResponse(_ rng: inout SystemRandomNumberGenerator) -> Response {
        let statuses = [200, 201, 204, 206, 301, 304, 404, 500, 503]
        let status = statuses.randomElement(using: &rng)!
        let ows = ["", " ", "  ", "\t", " \t"]
        var head = "HTTP/1.1 \(status)" + (Bool.random(using: &rng) ? " Some Reason" : (Bool.random(using: &rng) ? " " : "")) + "\r\n"
        for i in 0..<Int.random(in: 0...6, using: &rng) {
            head += "\(randomCase("x-field-\(i)", &rng)):\(ows.randomElement(using: &rng)!)value \(i) \u{00e9}\(ows.randomElement(using: &rng)!)\r\n"
        }
        var request = HTTP1ResponseFramer.Request.other
        if Int.random(in: 0..<6, using: &rng) == 0 { request = .head }
        let bodiless = status == 204 || status == 304 || request == .head
        var body: [UInt8] = []
        var payload = 0
        if Bool.random(using: &rng) {
            // Chunked, with extensions and trailers sometimes.
            head += "\(randomCase("transfer-encoding", &rng)): \(randomCase("chunked", &rng))\r\n"
            if !bodiless {
                (body, payload) = randomChunkedBody(&rng)
            }
        } else {
            let n = [0, 1, 10, 1024, 70_000].randomElement(using: &rng)!
            head += "\(randomCase("content-length", &rng)): \(n)\r\n"
            if !bodiless {
                body = (0..<n).map { UInt8(truncatingIfNeeded: $0 &* 13) }
                payload = n
            }
        }
        head += "\r\n"
        var interim: [String] = []
        if Int.random(in: 0..<5, using: &rng) == 0 { interim.append("HTTP/1.1 100 Continue\r\n\r\n") }
        if Int.random(in: 0..<8, using: &rng) == 0 { interim.append("HTTP/1.1 103 Early Hints\r\nlink: </a.css>; rel=preload\r\n\r\n") }
        return Response(head: head, body: body, status: status, payload: payload, request: request, interim: interim)
    }

    /// Feeds `bytes` cut at random points; the framer is told each
    /// response's request as the previous one ends (as the gate does).
    /// A head that may go on with its body is left there or taken out
    /// (as the gate does when it rewrites one) at random: either way the
    /// body seen here is the body alone, and a head left with it must
    /// start its first slice.
    static func frame(_ bytes: [UInt8], requests: [HTTP1ResponseFramer.Request], _ rng: inout SystemRandomNumberGenerator,
                      framer: HTTP1ResponseFramer = HTTP1ResponseFramer()) throws -> [Seen] {
        var seen: [Seen] = []
        var current = Seen()
        framer.requestForwarded(requests.first ?? .other)
        var at = 0
        var headInBody: [UInt8] = []
        while at < bytes.count {
            let n = Bool.random(using: &rng) ? Int.random(in: 1...8, using: &rng) : Int.random(in: 1...30_000, using: &rng)
            var read = ByteBuffer(bytes: bytes[at..<min(bytes.count, at + n)])
            at += n
            try framer.feed(&read) { event in
                switch event {
                case .head(let h) where h.status < 200:
                    current.interim.append(String(buffer: h.bytes))
                case .head(let h):
                    current.head = String(buffer: h.bytes)
                    current.status = h.status
                    if framer.headGoesWithBody && Bool.random(using: &rng) { framer.headGoesWithBody = false }
                    if framer.headGoesWithBody { headInBody = Array(h.bytes.readableBytesView) }
                case .body(let b, let payload):
                    var body = Array(b.readableBytesView)
                    if !headInBody.isEmpty {
                        XCTAssertEqual(body.prefix(headInBody.count), headInBody[...], "the head goes on first")
                        body.removeFirst(min(headInBody.count, body.count))
                        headInBody = []
                    }
                    current.body += body
                    current.payload += payload
                case .end:
                    XCTAssertEqual(headInBody, [], "a head left with its body went on")
                    current.ended = true
                    seen.append(current)
                    current = Seen()
                    if seen.count < requests.count { framer.requestForwarded(requests[seen.count]) }
                }
            }
            XCTAssertEqual(read.readableBytes, 0, "a read not consumed whole")
        }
        return seen
    }

    func testEveryCutForwardsEveryByteAndEndsEachResponseWhereItsFramingSays() throws {
        var rng = SystemRandomNumberGenerator()
        for _ in 0..<300 {
            let responses = (0..<Int.random(in: 1...6, using: &rng)).map { _ in Self.randomResponse(&rng) }
            let bytes = responses.flatMap { r in r.interim.flatMap { Array($0.utf8) } + Array(r.head.utf8) + r.body }
            let seen = try Self.frame(bytes, requests: responses.map(\.request), &rng)
            let want = responses.map { Seen(interim: $0.interim, head: $0.head, status: $0.status, body: $0.body, payload: $0.payload, ended: true) }
            // (Bodies are long: on a mismatch, say where, not what.)
            let firstWrong = zip(seen, want).enumerated().first { $0.element.0 != $0.element.1 }?.offset
            XCTAssertTrue(seen == want, "\(seen.count) responses for \(want.count); first that differs: \(firstWrong.map { "#\($0): head \(seen[$0].head == want[$0].head), status \(seen[$0].status)/\(want[$0].status), body \(seen[$0].body.count)/\(want[$0].body.count) bytes, payload \(seen[$0].payload)/\(want[$0].payload)" } ?? "-")")
            if seen != want { return }
        }
    }

    func testABodyWithNoLengthEndsAtTheClose() throws {
        let framer = HTTP1ResponseFramer()
        var seen: [String] = []
        var read = ByteBuffer(string: "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nall of it")
        try framer.feed(&read) { event in
            if case .head(let h) = event { seen.append("head \(h.closes)") }
            if case .body(let b, let n) = event { seen.append("body \(String(buffer: b)) \(n)") }
            if case .end = event { seen.append("end") }
        }
        var more = ByteBuffer(string: " and more")
        try framer.feed(&more) { if case .body(let b, _) = $0 { seen.append("body \(String(buffer: b))") } }
        try framer.inputClosed { if case .end = $0 { seen.append("end") } }
        // (The head goes on with the first slice of its body.)
        XCTAssertEqual(seen, ["head true", "body HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nall of it 9", "body  and more", "end"])
    }

    func testACloseInsideAResponseIsAnError() throws {
        for cut in ["HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort", "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nab",
                    "HTTP/1.1 200 OK\r\ncontent-le"] {
            let framer = HTTP1ResponseFramer()
            var read = ByteBuffer(string: cut)
            try framer.feed(&read) { _ in }
            XCTAssertThrowsError(try framer.inputClosed { _ in }, cut)
        }
    }

    func testTheResponseToHeadOrConnectHasNoBody() throws {
        var rng = SystemRandomNumberGenerator()
        let head = "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"
        let next = "HTTP/1.1 404 Not Found\r\ncontent-length: 2\r\n\r\nno"
        let seen = try Self.frame(Array((head + next).utf8), requests: [.head, .other], &rng)
        XCTAssertEqual(seen.map(\.status), [200, 404])
        XCTAssertEqual(seen.map(\.payload), [0, 2])
        let tunnel = try Self.frame(Array("HTTP/1.1 200 Connection established\r\n\r\n".utf8), requests: [.connect], &rng)
        XCTAssertEqual(tunnel.map(\.ended), [true])
    }

    func testWhatFollowsA101IsHeldForTheSwitchedProtocol() throws {
        let framer = HTTP1ResponseFramer()
        var events: [String] = []
        var read = ByteBuffer(string: "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n\u{81}\u{05}hello")
        try framer.feed(&read) { event in
            if case .head(let h) = event { events.append("head \(h.status)") }
            if case .body = event { events.append("body") }
            if case .end = event { events.append("end") }
        }
        var more = ByteBuffer(string: "HTTP/1.1 200 OK\r\n\r\n")   // not HTTP any more: held too
        try framer.feed(&more) { _ in events.append("event") }
        XCTAssertEqual(events, ["head 101", "end"])
        XCTAssertEqual(String(buffer: framer.takeAfterUpgrade()), "\u{81}\u{05}helloHTTP/1.1 200 OK\r\n\r\n")
        XCTAssertEqual(framer.takeAfterUpgrade().readableBytes, 0)
    }

    /// Responses two parsers could frame differently, or that are not
    /// HTTP/1.x: refused whole and fed a byte at a time alike.
    func testAmbiguousResponsesAreRefused() throws {
        let refused = [
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello",
            "HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\n\r\nhello",
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\nContent-Length: 5\r\n\r\nhello",
            "HTTP/1.1 200 OK\r\ncontent-length: +5\r\n\r\nhello",
            "HTTP/1.1 200 OK\r\ncontent-length: 0x5\r\n\r\nhello",
            "HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999\r\n\r\n",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, identity\r\n\r\n0\r\n\r\n",
            "HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length : 5\r\n\r\nhello",
            "HTTP/1.1 200 OK\r\nx-a: 1\r\n folded\r\ncontent-length: 0\r\n\r\n",
            "HTTP/1.1 200 OK\ncontent-length: 0\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 0\n\r\n",
            "HTTP/1.1 200 OK\r\nx-a: 1\rx\r\ncontent-length: 0\r\n\r\n",
            "HTTP/1.1 200 OK\r\nx-a: \u{01}\r\ncontent-length: 0\r\n\r\n",
            "HTTP/1.1 200 OK\r\nx a: 1\r\ncontent-length: 0\r\n\r\n",
            "HTTP/1.1 200 OK\r\n: 1\r\ncontent-length: 0\r\n\r\n",
            "HTTP/1.1 20 OK\r\ncontent-length: 0\r\n\r\n",
            "HTTP/1.1 600 OK\r\ncontent-length: 0\r\n\r\n",
            "HTTP/2.0 200 OK\r\ncontent-length: 0\r\n\r\n",
            "HTTP/1.1200 OK\r\ncontent-length: 0\r\n\r\n",
            "ICY 200 OK\r\n\r\n",
            "\r\nHTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nz\r\n",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n-1\r\n",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n10000000000000000\r\n",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhelloXX\r\n0\r\n\r\n",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\nbad trailer\r\n\r\n",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\n",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;a\u{e9}b\r\nhello\r\n0\r\n\r\n",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5 ;a\r\nhello\r\n0\r\n\r\n",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;a=\"x\r\nhello\r\n0\r\n\r\n",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\ncontent-length: 1\r\n\r\n",
            "HTTP/1.0 100 Continue\r\n\r\nHTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n",
            // Bytes after a response that ends the connection (llhttp refuses them too).
            "HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\nxHTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
            "HTTP/1.1 200 OK\r\nConnection: keep-alive, Close\r\ncontent-length: 0\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
        ]
        for text in refused {
            for bytewise in [false, true] {
                let framer = HTTP1ResponseFramer()
                var threw = false
                let bytes = Array(text.utf8)
                let reads = bytewise ? bytes.map { [$0] } : [bytes]
                for r in reads where !threw {
                    var read = ByteBuffer(bytes: r)
                    do { try framer.feed(&read) { _ in } } catch { threw = true }
                }
                XCTAssertTrue(threw, "accepted \(text.debugDescription) (\(bytewise ? "a byte at a time" : "whole"))")
            }
        }
    }

    func testAnHTTP10ResponseWithKeepAliveMayBeFollowed() throws {
        var rng = SystemRandomNumberGenerator()
        let one = "HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\ncontent-length: 1\r\n\r\nx"
        let seen = try Self.frame(Array((one + one).utf8), requests: [.other, .other], &rng)
        XCTAssertEqual(seen.map(\.payload), [1, 1])
    }

    func testAHeadOverTheLimitIsRefused() throws {
        let framer = HTTP1ResponseFramer(maxHeadBytes: 1024)
        var read = ByteBuffer(string: "HTTP/1.1 200 OK\r\nx-big: \(String(repeating: "a", count: 2000))\r\n\r\n")
        XCTAssertThrowsError(try framer.feed(&read) { _ in })
        let small = HTTP1ResponseFramer(maxHeadBytes: 1024)
        var pieces = ByteBuffer(string: "HTTP/1.1 200 OK\r\n")
        try small.feed(&pieces) { _ in }
        var rest = ByteBuffer(string: "x-big: \(String(repeating: "a", count: 2000))")
        XCTAssertThrowsError(try small.feed(&rest) { _ in })
    }

    /// The gate's answer when it must end a connection after the workload's
    /// response: every Connection field replaced, nothing else touched.
    func testConnectionCloseReplacesOnlyTheConnectionFields() {
        let head = ByteBuffer(string: "HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nx-connection: stays\r\ncontent-length: 2\r\nCONNECTION: upgrade\r\n\r\n")
        let out = L7Gate.withConnectionClose(head, allocator: ByteBufferAllocator())
        XCTAssertEqual(String(buffer: out), "HTTP/1.1 200 OK\r\nx-connection: stays\r\ncontent-length: 2\r\nconnection: close\r\n\r\n")
    }
}

/// A chunked body as sent (sizes in either case, extensions and trailers
/// sometimes) and its content length.
func randomChunkedBody(_ rng: inout SystemRandomNumberGenerator) -> (bytes: [UInt8], payload: Int) {
    var body: [UInt8] = []
    var payload = 0
    for _ in 0..<Int.random(in: 0...4, using: &rng) {
        let n = [1, 2, 15, 16, 255, 4096, 20_000].randomElement(using: &rng)!
        let size = Bool.random(using: &rng) ? String(n, radix: 16) : String(n, radix: 16).uppercased()
        let ext = Bool.random(using: &rng) ? "" : ";name=\"v a\";x"
        body += Array("\(size)\(ext)\r\n".utf8) + (0..<n).map { UInt8(truncatingIfNeeded: $0 &* 7) } + Array("\r\n".utf8)
        payload += n
    }
    body += Array("0\r\n".utf8)
    if Bool.random(using: &rng) { body += Array("x-trailer: t\r\nChecksum: 1\r\n".utf8) }
    body += Array("\r\n".utf8)
    return (body, payload)
}
