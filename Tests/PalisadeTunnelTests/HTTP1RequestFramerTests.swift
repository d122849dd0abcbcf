import NIOCore
@testable import PalisadeL7
import XCTest

/// The HTTP/1.1 proxy forwards a caller's allowed requests as the bytes it
/// sent (HTTP1RequestFramer): however they are cut into reads, every byte
/// is forwarded once, in order, each head whole and read as sent, each
/// request's end where its framing says; anything two parsers could read
/// differently is refused with the status the caller gets.
final class HTTP1RequestFramerTests: XCTestCase {
    /// What came out of the framer for one request.
    struct Seen: Equatable {
        var head = ""
        var method = ""
        var target = ""
        var body: [UInt8] = []
        var payload = 0
        var ended = false
    }

    static func randomCase(_ name: String, _ rng: inout SystemRandomNumberGenerator) -> String {
        String(name.map { Bool.random(using: &rng) ? Character($0.uppercased()) : $0 })
    }

    /// One generated request and what the framer must report for it.
    static func randomRequest(_ rng: inout SystemRandomNumberGenerator) -> (bytes: [UInt8], seen: Seen) {
        let method = ["GET", "POST", "PUT", "HEAD", "DELETE", "PATCH", "X-CUSTOM"].randomElement(using: &rng)!
        let target = ["/", "/public/a.txt", "/a/b?c=d&e=%20f", "http://h.example/x?y", "/very/long/" + String(repeating: "p", count: 300)].randomElement(using: &rng)!
        let ows = ["", " ", "  ", "\t", " \t"]
        var head = "\(method) \(target) HTTP/1.\(Int.random(in: 0..<4, using: &rng) == 0 ? 0 : 1)\r\n"
        let http10 = head.hasSuffix("1.0\r\n")
        if http10 { head += "\(randomCase("connection", &rng)): \(randomCase("keep-alive", &rng))\r\n" }
        head += "\(randomCase("host", &rng)):\(ows.randomElement(using: &rng)!)h.example\(ows.randomElement(using: &rng)!)\r\n"
        for i in 0..<Int.random(in: 0...6, using: &rng) {
            head += "\(randomCase("x-field-\(i)", &rng)):\(ows.randomElement(using: &rng)!)value \(i) \u{00e9}\(ows.randomElement(using: &rng)!)\r\n"
        }
        var body: [UInt8] = []
        var payload = 0
        switch Int.random(in: 0..<3, using: &rng) {
        case 0 where !http10:
            head += "\(randomCase("transfer-encoding", &rng)): \(randomCase("chunked", &rng))\r\n"
            (body, payload) = randomChunkedBody(&rng)
        case 1:
            let n = [0, 1, 10, 1024, 70_000].randomElement(using: &rng)!
            head += "\(randomCase("content-length", &rng)): \(n)\r\n"
            body = (0..<n).map { UInt8(truncatingIfNeeded: $0 &* 13) }
            payload = n
        default:
            break
        }
        head += "\r\n"
        // Sometimes an empty line before it, which is skipped.
        let before = Int.random(in: 0..<6, using: &rng) == 0 ? "\r\n" : ""
        return (Array((before + head).utf8) + body, Seen(head: head, method: method, target: target, body: body, payload: payload, ended: true))
    }

    /// Feeds `bytes` cut at random points (or a byte at a time).
    static func frame(_ bytes: [UInt8], _ rng: inout SystemRandomNumberGenerator, byteByByte: Bool = false,
                      framer: HTTP1RequestFramer = HTTP1RequestFramer()) throws -> [Seen] {
        var seen: [Seen] = []
        var current = Seen()
        var at = 0
        while at < bytes.count {
            let n = byteByByte ? 1 : Bool.random(using: &rng) ? Int.random(in: 1...8, using: &rng) : Int.random(in: 1...30_000, using: &rng)
            var read = ByteBuffer(bytes: bytes[at..<min(bytes.count, at + n)])
            at += n
            try framer.feed(&read) { event in
                switch event {
                case .head(let h):
                    current.head = String(buffer: h.bytes)
                    current.method = h.method
                    current.target = h.target
                case .body(let b, let payload):
                    current.body += Array(b.readableBytesView)
                    current.payload += payload
                case .end:
                    current.ended = true
                    seen.append(current)
                    current = Seen()
                }
            }
            XCTAssertEqual(read.readableBytes, 0, "a read not consumed whole")
        }
        return seen
    }

    func testEveryCutForwardsEveryByteAndEndsEachRequestWhereItsFramingSays() throws {
        var rng = SystemRandomNumberGenerator()
        for _ in 0..<300 {
            let requests = (0..<Int.random(in: 1...6, using: &rng)).map { _ in Self.randomRequest(&rng) }
            let seen = try Self.frame(requests.flatMap(\.bytes), &rng)
            let want = requests.map(\.seen)
            let firstWrong = zip(seen, want).enumerated().first { $0.element.0 != $0.element.1 }?.offset
            XCTAssertTrue(seen == want, "\(seen.count) requests for \(want.count); first that differs: \(firstWrong.map { "#\($0): head \(seen[$0].head == want[$0].head) \(seen[$0].method) \(seen[$0].target), body \(seen[$0].body.count)/\(want[$0].body.count) bytes, payload \(seen[$0].payload)/\(want[$0].payload)" } ?? "-")")
            if seen != want { return }
        }
    }

    /// Requests two parsers could read differently, each with the status
    /// the caller gets; refused whole and a byte at a time, and nothing of
    /// them is handed on as a request.
    func testAmbiguousRequestsAreRefused() throws {
        let ok = "GET /a HTTP/1.1\r\nHost: h\r\n"
        let cases: [(String, String, Int)] = [
            ("CL and TE", "POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
            ("TE then CL", "POST /a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n", 400),
            ("TE chunked not last", "POST /a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", 400),
            ("TE list", "POST /a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 400),
            ("TE twice", "POST /a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
            ("TE unknown", "POST /a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: xchunked\r\n\r\n", 400),
            ("TE in HTTP/1.0", "POST /a HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
            ("space before colon", "POST /a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding : chunked\r\n\r\n", 400),
            ("obs-fold", ok + "X-A: a\r\n b\r\n\r\n", 400),
            ("CL twice equal", "POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\na", 400),
            ("CL list", "POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: 1, 1\r\n\r\na", 400),
            ("CL plus sign", "POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: +1\r\n\r\na", 400),
            ("CL too long", "POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: 1234567890123456789\r\n\r\n", 400),
            ("chunk size 0x", "POST /a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0x1\r\na\r\n0\r\n\r\n", 400),
            ("chunk size overflow", "POST /a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000001\r\n", 400),
            ("chunk data longer", "POST /a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nab\r\n0\r\n\r\n", 400),
            ("chunk ext space", "POST /a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n1 ;a=b\r\na\r\n0\r\n\r\n", 400),
            ("CL in trailers", "POST /a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nContent-Length: 5\r\n\r\n", 400),
            ("bare LF", "GET /a HTTP/1.1\nHost: h\r\n\r\n", 400),
            ("bare LF in a field", ok + "X-A: a\nb\r\n\r\n", 400),
            ("bare CR", ok + "X-A: a\rb\r\n\r\n", 400),
            ("NUL in a value", ok + "X-A: a\u{0}b\r\n\r\n", 400),
            ("DEL in a value", ok + "X-A: a\u{7f}b\r\n\r\n", 400),
            ("empty field name", ok + ": a\r\n\r\n", 400),
            ("two spaces after the method", "GET  /a HTTP/1.1\r\nHost: h\r\n\r\n", 400),
            ("space in the target", "GET /a b HTTP/1.1\r\nHost: h\r\n\r\n", 400),
            ("tab in the target", "GET /a\tb HTTP/1.1\r\nHost: h\r\n\r\n", 400),
            ("obs-text in the target", "GET /\u{e9} HTTP/1.1\r\nHost: h\r\n\r\n", 400),
            ("fragment", "GET /public/a#/../private HTTP/1.1\r\nHost: h\r\n\r\n", 400),
            ("asterisk for GET", "GET * HTTP/1.1\r\nHost: h\r\n\r\n", 400),
            ("relative target", "GET a/b HTTP/1.1\r\nHost: h\r\n\r\n", 400),
            ("CONNECT with a path", "CONNECT /a HTTP/1.1\r\nHost: h\r\n\r\n", 400),
            ("CONNECT with a body", "CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\nContent-Length: 3\r\n\r\nabc", 400),
            ("no version", "GET /a\r\nHost: h\r\n\r\n", 400),
            ("lower-case version", "GET /a http/1.1\r\nHost: h\r\n\r\n", 400),
            ("space before CRLF", "GET /a HTTP/1.1 \r\nHost: h\r\n\r\n", 400),
            ("HTTP/2.0", "GET /a HTTP/2.0\r\nHost: h\r\n\r\n", 505),
            ("HTTP/1.2", "GET /a HTTP/1.2\r\nHost: h\r\n\r\n", 505),
            ("HTTP/0.9", "GET /a HTTP/0.9\r\n\r\n", 505),
            ("method with a slash", "GE/T /a HTTP/1.1\r\nHost: h\r\n\r\n", 400),
            ("leading space", " GET /a HTTP/1.1\r\nHost: h\r\n\r\n", 400),
            ("bare LF before a request", "\nGET /a HTTP/1.1\r\nHost: h\r\n\r\n", 400),
        ]
        var rng = SystemRandomNumberGenerator()
        for (name, text, status) in cases {
            for byteByByte in [false, true] {
                var requests: [Seen] = []
                XCTAssertThrowsError(requests = try Self.frame(Array(text.utf8), &rng, byteByByte: byteByByte), name) { error in
                    XCTAssertEqual((error as? HTTP1Malformed)?.status, status, "\(name): \(error)")
                }
                XCTAssertEqual(requests, [], name)
            }
        }
    }

    func testTheHeadLimitsGive431() {
        var rng = SystemRandomNumberGenerator()
        let long = "GET /a HTTP/1.1\r\nHost: h\r\nX-A: \(String(repeating: "a", count: 5000))\r\n\r\n"
        XCTAssertThrowsError(try Self.frame(Array(long.utf8), &rng, framer: HTTP1RequestFramer(maxHeadBytes: 4096))) {
            XCTAssertEqual(($0 as? HTTP1Malformed)?.status, 431)
        }
        let many = "GET /a HTTP/1.1\r\nHost: h\r\n" + (0..<10).map { "X-\($0): v\r\n" }.joined() + "\r\n"
        XCTAssertThrowsError(try Self.frame(Array(many.utf8), &rng, framer: HTTP1RequestFramer(maxFields: 10))) {
            XCTAssertEqual(($0 as? HTTP1Malformed)?.status, 431)
        }
        XCTAssertEqual(try Self.frame(Array(many.utf8), &rng, framer: HTTP1RequestFramer(maxFields: 11)).count, 1)
    }

    /// What the rules see of a head: method, target, Host, the fields by
    /// lower-case name (never Authorization), values without their
    /// surrounding whitespace, repeated fields in order.
    func testTheHeadIsReadAsTheRulesNeedIt() throws {
        var read = ByteBuffer(string: "PATCH /p?q=1 HTTP/1.1\r\nHost:  h.example:8080 \r\nX-Env: prod\r\nAuthorization: Bearer t\r\nx-env:\tdev\r\nX-Empty:\r\n\r\n")
        var head: HTTP1RequestFramer.Head?
        try HTTP1RequestFramer().feed(&read) { if case .head(let h) = $0 { head = h } }
        let h = try XCTUnwrap(head)
        XCTAssertEqual([h.method, h.target, h.host], ["PATCH", "/p?q=1", "h.example:8080"])
        XCTAssertEqual(h.fieldValues(), ["host": ["h.example:8080"], "x-env": ["prod", "dev"], "x-empty": [""]])
        XCTAssertEqual(h.first("authorization"), "Bearer t")
        XCTAssertEqual(h.first("x-env"), "prod")
        XCTAssertNil(h.first("x-none"))
        XCTAssertEqual([h.hostFields], [1])
        XCTAssertTrue(h.hostsValid)
        var bad = ByteBuffer(string: "GET / HTTP/1.1\r\nHost: a@b\r\n\r\n")
        try HTTP1RequestFramer().feed(&bad) { if case .head(let h) = $0 { XCTAssertFalse(h.hostsValid) } }
    }

    /// After an upgrade request (as llhttp reads one), nothing is read as
    /// HTTP: the bytes are held for the switched protocol. Nor after a
    /// request that ends the connection (RFC 9112 9.6). An Upgrade field
    /// without `Connection: upgrade` is no upgrade.
    func testNothingAfterAnUpgradeOrAClosingRequestIsRead() throws {
        for (text, upgrade, webSocket, closes) in [
            ("GET /chat HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\n", true, true, false),
            ("GET /chat HTTP/1.1\r\nHost: h\r\nConnection: upgrade\r\nUpgrade: h2c\r\nHTTP2-Settings: AAA\r\n\r\n", true, false, false),
            ("CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n", true, false, false),
            ("GET /chat HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n\r\n", false, true, false),
            ("GET /a HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n", false, false, true),
            ("POST /a HTTP/1.0\r\nContent-Length: 2\r\n\r\nab", false, false, true),
            ("GET /a HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n", false, false, false),
        ] {
            let framer = HTTP1RequestFramer()
            var read = ByteBuffer(string: text + "GET /hidden HTTP/1.1\r\nHost: h\r\n\r\n")
            var heads: [HTTP1RequestFramer.Head] = [], ends = 0
            try framer.feed(&read) { event in
                if case .head(let h) = event { heads.append(h) }
                if case .end = event { ends += 1 }
            }
            XCTAssertEqual(heads.first?.upgrade, upgrade, text)
            XCTAssertEqual(heads.first?.upgradeToWebSocket, webSocket, text)
            XCTAssertEqual(heads.first?.closes, closes, text)
            XCTAssertEqual(heads.count, upgrade || closes ? 1 : 2, text)
            XCTAssertEqual(ends, heads.count, text)
            XCTAssertEqual(framer.isHolding, upgrade || closes, text)
            XCTAssertEqual(String(buffer: framer.takeHeld()), upgrade || closes ? "GET /hidden HTTP/1.1\r\nHost: h\r\n\r\n" : "", text)
        }
    }

    /// A declined upgrade goes on without its Upgrade fields and tokens.
    func testWithoutUpgradeKeepsTheOtherFields() throws {
        var read = ByteBuffer(string: "GET /a HTTP/1.1\r\nHost: h\r\nConnection: Upgrade, HTTP2-Settings, x-keep\r\nUpgrade: h2c\r\nHTTP2-Settings: AAA\r\nX-A:  b \r\n\r\n")
        var head: HTTP1RequestFramer.Head?
        try HTTP1RequestFramer().feed(&read) { if case .head(let h) = $0 { head = h } }
        let out = L7Gate.withoutUpgrade(try XCTUnwrap(head).bytes, allocator: ByteBufferAllocator())
        XCTAssertEqual(String(buffer: out), "GET /a HTTP/1.1\r\nHost: h\r\nConnection: x-keep\r\nX-A: b\r\n\r\n")
        var again = out
        var reread: HTTP1RequestFramer.Head?
        try HTTP1RequestFramer().feed(&again) { if case .head(let h) = $0 { reread = h } }
        XCTAssertEqual(reread?.upgrade, false)
    }
}
