import NIOCore

/// Reads a caller's HTTP/1.1 requests as bytes: finds each head, what the
/// rules need from it, and where each request ends, so the proxy forwards
/// the requests it allows as they came instead of decoding every head into
/// strings (NIO's llhttp decoder) and encoding it again.
///
/// This is the parse of what attackers send, and a workload's parser must
/// read the forwarded bytes exactly as this one did, so it is strict on
/// purpose: anything two parsers could frame or read differently is
/// refused (`HTTP1Malformed`, answered 400, or 431 past the head limits,
/// and the end of the connection): bare LF or CR, obs-fold, space before
/// the colon, control bytes in a field, a request line that is not
/// `token SP target SP HTTP/1.x` (a target of visible ASCII with no `#`:
/// a path, an `http(s)://` URI, `*` only for OPTIONS, CONNECT's an
/// authority), Content-Length that is
/// not digits or appears twice, Transfer-Encoding other than exactly one
/// `chunked` (or with Content-Length, or in HTTP/1.0), a CONNECT with a
/// body, chunk sizes that are not hex or overflow, whitespace or obs-text
/// in chunk extensions, framing fields in trailers, a head over
/// `maxHeadBytes` or with more than `maxFields` fields. Empty lines before
/// a request are skipped (RFC 9112 2.2), as llhttp does. Nothing after an
/// upgrade request (CONNECT, or `Connection: upgrade` with an Upgrade
/// field, as llhttp reads one) is read as HTTP: it is held for whoever
/// relays the switched protocol. Nor after a request that ends the
/// connection (`Connection: close`, HTTP/1.0 without keep-alive): RFC 9112
/// 9.6, a server must not process anything after it.
final class HTTP1RequestFramer {
    typealias Malformed = HTTP1Malformed

    enum BodyFraming: Equatable {
        case none
        case length(Int)
        case chunked
    }

    struct Head {
        /// The head as received, request line to the empty line.
        var bytes: ByteBuffer
        var method: String
        var target: String
        var minor: Int
        var framing: BodyFraming
        /// CONNECT, or `Connection: upgrade` with an Upgrade field.
        var upgrade: Bool
        /// `Connection: close`, or HTTP/1.0 without keep-alive.
        var closes: Bool
        /// Exactly one Upgrade field, and it says `websocket`.
        var upgradeToWebSocket: Bool
        var hostFields: Int
        var hostsValid: Bool
        /// The first Host field's value ("" without one).
        var host: String

        /// The first value of the field `name` (lower case), if any.
        func first(_ name: StaticString) -> String? {
            bytes.withUnsafeReadableBytes { p in
                var found: String?
                try? HTTP1Syntax.forEachField(p, from: HTTP1Syntax.fieldsStart(p), context: "header") { n, v in
                    if found == nil, HTTP1Syntax.equalsIgnoringCase(p, n, name) { found = String(decoding: UnsafeRawBufferPointer(rebasing: p[v]), as: UTF8.self) }
                }
                return found
            }
        }

        /// Every field's values by lower-case name, in order, the
        /// Authorization field left out (the rules never see a credential).
        func fieldValues() -> [String: [String]] {
            bytes.withUnsafeReadableBytes { p in
                var fields: [String: [String]] = [:]
                try? HTTP1Syntax.forEachField(p, from: HTTP1Syntax.fieldsStart(p), context: "header") { n, v in
                    guard !HTTP1Syntax.equalsIgnoringCase(p, n, "authorization") else { return }
                    let name = String(decoding: UnsafeRawBufferPointer(rebasing: p[n]), as: UTF8.self).lowercased()
                    fields[name, default: []].append(String(decoding: UnsafeRawBufferPointer(rebasing: p[v]), as: UTF8.self))
                }
                return fields
            }
        }
    }

    enum Event {
        case head(Head)
        /// Body bytes as received (chunk framing and trailers included);
        /// `payload` counts the content alone.
        case body(ByteBuffer, payload: Int)
        case end
    }

    private enum State {
        case head
        case body
        case held      // after an upgrade request or one that closes: not HTTP
    }
    private var state = State.head
    private var body = HTTP1BodyReader(state: .chunkSize)
    private var lines: HTTP1LineReader
    let maxFields: Int
    private var failed = false
    /// The request being read is the last one read as HTTP.
    private var lastRequest = false
    private var held = ByteBuffer()

    init(maxHeadBytes: Int = 64 * 1024, maxFields: Int = 256) {
        lines = HTTP1LineReader(maxBytes: maxHeadBytes)
        self.maxFields = maxFields
    }

    /// Nothing of a request is waiting (no part of a head, no body).
    var betweenRequests: Bool { if case .head = state { return lines.isEmpty } else { return false } }

    /// An upgrade request, or one that ends the connection, ended: what
    /// follows is held, not read.
    var isHolding: Bool { if case .held = state { return true } else { return false } }

    /// What followed an upgrade request, for whoever relays the switched
    /// protocol.
    func takeHeld() -> ByteBuffer {
        let bytes = held
        held = ByteBuffer()
        return bytes
    }

    /// Consumes `input`, telling `emit` what it found, in order.
    func feed(_ input: inout ByteBuffer, _ emit: (Event) -> Void) throws {
        guard !failed else { throw Malformed(reason: "after an earlier error") }
        do {
            try run(&input, emit)
        } catch {
            failed = true
            throw error
        }
    }

    private func run(_ input: inout ByteBuffer, _ emit: (Event) -> Void) throws {
        var run = HTTP1BodyRun(at: input)
        func flushBody(_ input: inout ByteBuffer) {
            if let (bytes, payload) = run.take(input) { emit(.body(bytes, payload: payload)) }
        }
        func end() {
            state = lastRequest ? .held : .head
            emit(.end)
        }
        while input.readableBytes > 0 {
            switch state {
            case .head:
                guard let headBytes = try lines.take(&input, untilEmptyLine: true) else { return }
                run.restart(input)
                if headBytes.readableBytes == 2 { continue }   // an empty line before a request
                let head = try headBytes.withUnsafeReadableBytes { try Self.parseHead($0, bytes: headBytes, maxFields: maxFields) }
                lastRequest = head.upgrade || head.closes
                emit(.head(head))
                switch head.framing {
                case .none:
                    end()
                case .length(let n):
                    state = .body
                    body = HTTP1BodyReader(state: .fixed(remaining: n))
                case .chunked:
                    state = .body
                    body = HTTP1BodyReader(state: .chunkSize)
                }
            case .body:
                if try body.read(&input, lines: &lines, run: &run) {
                    flushBody(&input)
                    end()
                }
            case .held:
                held.writeBuffer(&input)
                return
            }
        }
        flushBody(&input)
    }

    // MARK: The head

    private static func isDigit(_ b: UInt8) -> Bool { b >= UInt8(ascii: "0") && b <= UInt8(ascii: "9") }
    private static func isAlpha(_ b: UInt8) -> Bool { HTTP1Syntax.lower(b) >= UInt8(ascii: "a") && HTTP1Syntax.lower(b) <= UInt8(ascii: "z") }

    /// uri-host [":" port] (RFC 3986): no userinfo, path or spaces.
    static func isHostByte(_ c: UInt8) -> Bool {
        switch c {
        case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "0")...UInt8(ascii: "9"),
             UInt8(ascii: "-"), UInt8(ascii: "."), UInt8(ascii: "_"), UInt8(ascii: "~"), UInt8(ascii: "!"), UInt8(ascii: "$"),
             UInt8(ascii: "&"), UInt8(ascii: "'"), UInt8(ascii: "("), UInt8(ascii: ")"), UInt8(ascii: "*"), UInt8(ascii: "+"),
             UInt8(ascii: ","), UInt8(ascii: ";"), UInt8(ascii: "="), UInt8(ascii: "%"), UInt8(ascii: ":"), UInt8(ascii: "["),
             UInt8(ascii: "]"):
            return true
        default:
            return false
        }
    }

    /// A whole head (`p` is `bytes`' readable bytes): the request line,
    /// the fields, and how the body is framed.
    static func parseHead(_ p: UnsafeRawBufferPointer, bytes: ByteBuffer, maxFields: Int) throws -> Head {
        // method SP request-target SP HTTP-version CRLF (RFC 9112 3)
        var i = 0
        while i < p.count, HTTP1Syntax.isTchar(p[i]) { i += 1 }
        guard i > 0, i < p.count, p[i] == UInt8(ascii: " ") else { throw Malformed(reason: "a request line not starting with a method and one space") }
        let method = String(decoding: UnsafeRawBufferPointer(rebasing: p[..<i]), as: UTF8.self)
        let targetStart = i + 1
        i = targetStart
        while i < p.count, p[i] > 0x20, p[i] < 0x7F, p[i] != UInt8(ascii: "#") { i += 1 }
        guard i > targetStart, i < p.count, p[i] == UInt8(ascii: " ") else {
            throw Malformed(reason: "a request target with a byte other than visible ASCII (or a fragment), or not followed by one space")
        }
        let target = targetStart..<i
        i += 1
        guard i + 10 <= p.count, p[i] == UInt8(ascii: "H"), p[i + 1] == UInt8(ascii: "T"), p[i + 2] == UInt8(ascii: "T"),
              p[i + 3] == UInt8(ascii: "P"), p[i + 4] == UInt8(ascii: "/"), isDigit(p[i + 5]), p[i + 6] == UInt8(ascii: "."), isDigit(p[i + 7]),
              p[i + 8] == UInt8(ascii: "\r"), p[i + 9] == UInt8(ascii: "\n") else {
            throw Malformed(reason: "a request line not ending in HTTP/d.d and CRLF")
        }
        guard p[i + 5] == UInt8(ascii: "1"), p[i + 7] <= UInt8(ascii: "1") else { throw Malformed(reason: "an HTTP version other than 1.0 and 1.1", status: 505) }
        let minor = Int(p[i + 7] - UInt8(ascii: "0"))
        let fieldsStart = i + 10

        // The target's form (RFC 9112 3.2) follows from the method.
        let isConnect = method == "CONNECT"
        let first = p[target.lowerBound]
        if isConnect {
            guard p[target].allSatisfy(isHostByte), p[target].contains(UInt8(ascii: ":")) else {
                throw Malformed(reason: "a CONNECT target that is not host:port")
            }
        } else if first == UInt8(ascii: "*") {
            guard target.count == 1, method == "OPTIONS" else { throw Malformed(reason: "an asterisk target other than for OPTIONS") }
        } else if first != UInt8(ascii: "/") {
            // absolute-form, of an HTTP URI: "http://" or "https://" ...
            var s = target.lowerBound
            while s < target.upperBound, isAlpha(p[s]) { s += 1 }
            guard HTTP1Syntax.equalsIgnoringCase(p, target.lowerBound..<s, "http") || HTTP1Syntax.equalsIgnoringCase(p, target.lowerBound..<s, "https"),
                  s + 2 < target.upperBound, p[s] == UInt8(ascii: ":"), p[s + 1] == UInt8(ascii: "/"), p[s + 2] == UInt8(ascii: "/") else {
                throw Malformed(reason: "a request target that is not origin-form, an http(s) absolute-form, authority-form for CONNECT or * for OPTIONS")
            }
            // Its authority: a host and port, no userinfo (as Host).
            let authority = s + 3
            s = authority
            while s < target.upperBound, p[s] != UInt8(ascii: "/"), p[s] != UInt8(ascii: "?") { s += 1 }
            guard s > authority, p[authority..<s].allSatisfy(isHostByte) else { throw Malformed(reason: "an absolute-form target whose authority is not host[:port]") }
        }

        var framing = HTTP1Syntax.FramingFields()
        var fields = 0, hostFields = 0, hostsValid = true, upgradeFields = 0, webSocket = false
        var host: Range<Int>?
        try HTTP1Syntax.forEachField(p, from: fieldsStart, context: "header") { name, value in
            fields += 1
            guard fields <= maxFields else { throw Malformed(reason: "more than \(maxFields) header fields", status: 431) }
            if try framing.read(p, name, value) { return }
            if name.count == 4, HTTP1Syntax.equalsIgnoringCase(p, name, "host") {
                // RFC 9112 3.2: exactly one valid Host (the gate checks the
                // count): two would let the rules read one and the
                // workload the other.
                hostFields += 1
                hostsValid = hostsValid && value.allSatisfy { isHostByte(p[$0]) }
                if host == nil { host = value }
            } else if name.count == 7, HTTP1Syntax.equalsIgnoringCase(p, name, "upgrade") {
                upgradeFields += 1
                webSocket = HTTP1Syntax.equalsIgnoringCase(p, value, "websocket")
            }
        }
        try framing.check(minor: minor, message: "request")
        let bodyFraming: BodyFraming
        if framing.chunked {
            bodyFraming = .chunked
        } else if let n = framing.contentLength, n > 0 {
            bodyFraming = .length(n)
        } else {
            bodyFraming = .none
        }
        // What follows a CONNECT's head is the tunnel's, for any parser.
        guard !isConnect || bodyFraming == .none else { throw Malformed(reason: "a CONNECT request with a body") }
        return Head(bytes: bytes, method: method, target: String(decoding: UnsafeRawBufferPointer(rebasing: p[target]), as: UTF8.self),
                    minor: minor, framing: bodyFraming, upgrade: isConnect || (framing.connectionUpgrade && upgradeFields > 0),
                    closes: framing.connectionClose || (minor == 0 && !framing.connectionKeepAlive),
                    upgradeToWebSocket: upgradeFields == 1 && webSocket, hostFields: hostFields, hostsValid: hostsValid,
                    host: host.map { String(decoding: UnsafeRawBufferPointer(rebasing: p[$0]), as: UTF8.self) } ?? "")
    }
}
