import NIOCore

/// Reads a workload's HTTP/1.1 responses as bytes and finds where each one
/// ends, so the proxy forwards them as they came instead of decoding every
/// head into strings and encoding it again.
///
/// It is strict on purpose: the caller's parser must read the forwarded
/// bytes exactly as this one did, so anything two parsers could frame
/// differently is refused (`Malformed`, the proxy answers nothing more on
/// that connection): bare LF or CR, obs-fold, space before the colon,
/// control bytes in a field, Content-Length that is not digits or appears
/// twice, Transfer-Encoding other than exactly `chunked` (or with
/// Content-Length, or in HTTP/1.0), chunk sizes that are not hex or
/// overflow, whitespace or obs-text in chunk extensions, framing fields in
/// trailers, 1xx in HTTP/1.0, bytes after a response that ends the
/// connection, a head or chunk line over `maxHeadBytes`.
final class HTTP1ResponseFramer {
    struct Malformed: Error, Equatable { let reason: String }

    /// How the current response's body ends.
    enum BodyFraming: Equatable {
        case none
        case length(Int)
        case chunked
        case untilClose
    }

    struct Head {
        var status: Int
        /// The head as received, status line to the empty line.
        var bytes: ByteBuffer
        var framing: BodyFraming
        /// The workload closes after this response (HTTP/1.0 without
        /// keep-alive, `Connection: close`, or a body ended by the close).
        var closes: Bool
    }

    enum Event {
        case head(Head)
        /// Body bytes as received (chunk framing and trailers included);
        /// `payload` counts the content alone.
        case body(ByteBuffer, payload: Int)
        case end
    }

    let maxHeadBytes: Int
    init(maxHeadBytes: Int = 64 * 1024) { self.maxHeadBytes = maxHeadBytes }

    private enum State {
        case head
        case fixed(remaining: Int)
        case chunkSize
        case chunkData(remaining: Int)
        case chunkDataEnd          // the CRLF after a chunk's data
        case trailers
        case untilClose
        case upgraded              // after 101: bytes, not HTTP
        case closed                // after a response that ends the connection
    }
    private var state = State.head
    /// The response being read ends the connection (HTTP/1.0 without
    /// keep-alive, `Connection: close`): nothing may follow it.
    private var closesAfter = false
    /// Where a response ends: the next one, or nothing more.
    private var afterResponse: State { closesAfter ? .closed : .head }
    /// A head or line that is not whole yet.
    private var partial = ByteBuffer()
    /// What the response being read answers.
    enum Request { case head, connect, other }
    private var request = Request.other
    private var failed = false
    /// Bytes that follow a 101's head (the switched protocol's).
    private var afterUpgrade = ByteBuffer()

    /// What followed a 101, for whoever relays the switched protocol.
    func takeAfterUpgrade() -> ByteBuffer {
        let bytes = afterUpgrade
        afterUpgrade = ByteBuffer()
        return bytes
    }

    /// Called as each request is forwarded: a response to HEAD has no body
    /// whatever its head says, a 2xx to CONNECT starts a tunnel (which the
    /// proxy does not carry: the gate ends such a connection).
    func requestForwarded(_ kind: Request) { request = kind }

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

    /// The workload closed its connection: a body that ends at the close
    /// ends here; anything else unfinished was cut short.
    func inputClosed(_ emit: (Event) -> Void) throws {
        switch state {
        case .untilClose:
            state = .closed
            emit(.end)
        case .head where partial.readableBytes == 0, .upgraded, .closed:
            break
        default:
            failed = true
            throw Malformed(reason: "the workload closed inside a response")
        }
    }

    private func run(_ input: inout ByteBuffer, _ emit: (Event) -> Void) throws {
        var bodyStart = input.readerIndex
        var payload = 0
        // Body bytes run from `bodyStart` to the reader index; handed on
        // as one slice before anything that is not body.
        func flushBody(_ input: inout ByteBuffer) {
            let n = input.readerIndex - bodyStart
            if n > 0 {
                // (get* reads only readable bytes: step back a copy instead.)
                var body = input
                body.moveReaderIndex(to: bodyStart)
                emit(.body(body.readSlice(length: n)!, payload: payload))
            }
            payload = 0
            bodyStart = input.readerIndex
        }
        while input.readableBytes > 0 {
            switch state {
            case .head:
                guard let headBytes = try takeLine(&input, untilEmptyLine: true) else { return }
                let head = try Self.parseHead(headBytes, request: request)
                if head.status >= 200 { closesAfter = head.closes }
                emit(.head(head))
                bodyStart = input.readerIndex
                switch head.framing {
                case .none:
                    if head.status == 101 {
                        state = .upgraded
                        afterUpgrade.writeBuffer(&input)
                        emit(.end)
                        return
                    }
                    // A 1xx is followed by the real response.
                    if head.status >= 200 { state = afterResponse; emit(.end) }
                case .length(let n):
                    if n == 0 { state = afterResponse; emit(.end) } else { state = .fixed(remaining: n) }
                case .chunked:
                    state = .chunkSize
                case .untilClose:
                    state = .untilClose
                }
            case .fixed(let remaining):
                let n = min(remaining, input.readableBytes)
                input.moveReaderIndex(forwardBy: n)
                payload += n
                if n == remaining {
                    state = afterResponse
                    flushBody(&input)
                    emit(.end)
                } else {
                    state = .fixed(remaining: remaining - n)
                }
            case .chunkSize:
                guard let line = try takeLine(&input, untilEmptyLine: false) else { break }
                let size = try Self.chunkSize(line)
                state = size == 0 ? .trailers : .chunkData(remaining: size)
            case .chunkData(let remaining):
                let n = min(remaining, input.readableBytes)
                input.moveReaderIndex(forwardBy: n)
                payload += n
                state = n == remaining ? .chunkDataEnd : .chunkData(remaining: remaining - n)
            case .chunkDataEnd:
                guard let line = try takeLine(&input, untilEmptyLine: false) else { break }
                guard line.readableBytes == 2 else { throw Malformed(reason: "chunk data longer than its size") }
                state = .chunkSize
            case .trailers:
                guard let block = try takeLine(&input, untilEmptyLine: true) else { break }
                try Self.checkTrailers(block)
                state = afterResponse
                flushBody(&input)
                emit(.end)
            case .untilClose:
                payload += input.readableBytes
                input.moveReaderIndex(forwardBy: input.readableBytes)
            case .upgraded:
                afterUpgrade.writeBuffer(&input)
                return
            case .closed:
                throw Malformed(reason: "bytes after a response that ends the connection")
            }
        }
        flushBody(&input)
    }

    /// A line (or, with `untilEmptyLine`, lines up to and including an
    /// empty one) from `partial` and `input`, CRLF included; nil when it is
    /// not whole yet (what there is waits in `partial`). Lines that span
    /// reads are gathered in `partial`, the rest is sliced in place.
    private func takeLine(_ input: inout ByteBuffer, untilEmptyLine: Bool) throws -> ByteBuffer? {
        // The search resumes after what `partial` holds: a CRLF may
        // straddle the two buffers.
        let already = partial.readableBytes
        let end = partial.writerIndex
        let previous: (UInt8, UInt8) = (already >= 2 ? partial.getInteger(at: end - 2)! : 0, already >= 1 ? partial.getInteger(at: end - 1)! : 0)
        let found = try input.withUnsafeReadableBytes { try Self.lineEnd($0, untilEmptyLine: untilEmptyLine, previous: previous, already: already) }
        guard already + (found ?? input.readableBytes) <= maxHeadBytes else { throw Malformed(reason: "head or chunk line over \(maxHeadBytes) bytes") }
        guard let found else {
            partial.writeBuffer(&input)
            return nil
        }
        var line = input.readSlice(length: found)!
        if already == 0 { return line }   // whole in this read: in place
        partial.writeBuffer(&line)
        let whole = partial
        partial.clear()
        return whole
    }

    /// The length of the prefix of `bytes` that ends a line (or a block
    /// ending in an empty line), given the `already` bytes of the line or
    /// block that came before (the last two of them in `previous`).
    /// A bare LF is refused here, as soon as it arrives (a bare CR by the
    /// parse of the line, which sees it).
    static func lineEnd(_ bytes: UnsafeRawBufferPointer, untilEmptyLine: Bool, previous: (UInt8, UInt8), already: Int) throws -> Int? {
        var (p2, p1) = previous
        var i = 0
        while i < bytes.count {
            let b = bytes[i]
            i += 1
            if b == UInt8(ascii: "\n") {
                guard p1 == UInt8(ascii: "\r") else { throw Malformed(reason: "a bare LF") }
                if !untilEmptyLine { return i }
                // An empty line: CRLF after an LF, or as the block's first
                // line (a trailer section with no fields).
                if p2 == UInt8(ascii: "\n") || already + i == 2 { return i }
            }
            p2 = p1
            p1 = b
        }
        return nil
    }

    // MARK: Parsing what the lines hold (over raw bytes: ByteBufferView's
    // per-byte access made the parse cost more than NIO's decoder saved)

    /// tchar (RFC 9110 5.6.2).
    static func isTchar(_ b: UInt8) -> Bool {
        switch b {
        case 0x21, 0x23...0x27, 0x2A, 0x2B, 0x2D, 0x2E, 0x30...0x39, 0x41...0x5A, 0x5E...0x7A, 0x7C, 0x7E: return true
        default: return false
        }
    }

    /// Field-value bytes: HTAB, SP, VCHAR, obs-text (RFC 9110 5.5).
    static func isFieldValueByte(_ b: UInt8) -> Bool { b == 0x09 || (b >= 0x20 && b != 0x7F) }

    private static func lower(_ b: UInt8) -> UInt8 { b >= 65 && b <= 90 ? b | 0x20 : b }

    /// `p[range]` is `name` (given in lower case), ignoring case.
    static func equalsIgnoringCase(_ p: UnsafeRawBufferPointer, _ range: Range<Int>, _ name: StaticString) -> Bool {
        guard range.count == name.utf8CodeUnitCount else { return false }
        let n = name.utf8Start
        var k = 0
        for i in range {
            if lower(p[i]) != n[k] { return false }
            k += 1
        }
        return true
    }

    /// The field lines of `p` from `start` to its empty line, which ends
    /// `p`: each one `name: value` CRLF, strictly (no obs-fold, no space
    /// before the colon, no bare CR or LF). Calls `field` with the ranges
    /// of each name and value (without the value's surrounding whitespace).
    static func forEachField(_ p: UnsafeRawBufferPointer, from start: Int, context: String,
                             _ field: (Range<Int>, Range<Int>) throws -> Void) throws {
        let end = p.count
        var i = start
        while true {
            guard i + 1 < end else { throw Malformed(reason: "\(context) section not ended by an empty line") }
            if p[i] == UInt8(ascii: "\r") {
                guard p[i + 1] == UInt8(ascii: "\n"), i + 2 == end else { throw Malformed(reason: "bare CR in the \(context) section") }
                return
            }
            let nameStart = i
            while i < end, isTchar(p[i]) { i += 1 }
            guard i > nameStart else {
                if p[i] == UInt8(ascii: " ") || p[i] == UInt8(ascii: "\t") { throw Malformed(reason: "obs-fold (a line starting with whitespace) in the \(context) section") }
                throw Malformed(reason: "a \(context) field name with a byte not allowed in a token")
            }
            guard i < end, p[i] == UInt8(ascii: ":") else { throw Malformed(reason: "a \(context) field name not followed by a colon") }
            let name = nameStart..<i
            i += 1
            while i < end, p[i] == UInt8(ascii: " ") || p[i] == UInt8(ascii: "\t") { i += 1 }
            let valueStart = i
            while i < end, isFieldValueByte(p[i]) { i += 1 }
            guard i + 1 < end, p[i] == UInt8(ascii: "\r"), p[i + 1] == UInt8(ascii: "\n") else {
                throw Malformed(reason: "a \(context) field value with a control byte, bare CR or bare LF")
            }
            var valueEnd = i
            while valueEnd > valueStart, p[valueEnd - 1] == UInt8(ascii: " ") || p[valueEnd - 1] == UInt8(ascii: "\t") { valueEnd -= 1 }
            try field(name, valueStart..<valueEnd)
            i += 2
        }
    }

    /// A trailer section (after the last chunk), whole. Framing fields
    /// have no place there (RFC 9110 6.5.1), and parsers differ on them.
    static func checkTrailers(_ block: ByteBuffer) throws {
        try block.withUnsafeReadableBytes { p in
            try forEachField(p, from: 0, context: "trailer") { name, _ in
                if equalsIgnoringCase(p, name, "content-length") || equalsIgnoringCase(p, name, "transfer-encoding") {
                    throw Malformed(reason: "a framing field in the trailers")
                }
            }
        }
    }

    /// What a head says about the message's framing.
    struct HeadFacts {
        var status = 0
        var minor = 1
        var contentLength: Int?
        var transferEncodings = 0
        var chunked = false
        var close = false
    }

    static func readHead(_ p: UnsafeRawBufferPointer) throws -> HeadFacts {
        var facts = HeadFacts()
        // "HTTP/1.x SSS" then SP reason or nothing, CRLF.
        guard p.count >= 14, p[0] == UInt8(ascii: "H"), p[1] == UInt8(ascii: "T"), p[2] == UInt8(ascii: "T"), p[3] == UInt8(ascii: "P"),
              p[4] == UInt8(ascii: "/"), p[5] == UInt8(ascii: "1"), p[6] == UInt8(ascii: "."),
              p[7] == UInt8(ascii: "0") || p[7] == UInt8(ascii: "1"), p[8] == UInt8(ascii: " ") else {
            throw Malformed(reason: "a status line not starting with HTTP/1.0 or HTTP/1.1")
        }
        facts.minor = Int(p[7] - UInt8(ascii: "0"))
        facts.close = facts.minor == 0
        for i in 9..<12 {
            guard p[i] >= UInt8(ascii: "0"), p[i] <= UInt8(ascii: "9") else { throw Malformed(reason: "a status code that is not three digits") }
            facts.status = facts.status * 10 + Int(p[i] - UInt8(ascii: "0"))
        }
        guard (100...599).contains(facts.status) else { throw Malformed(reason: "status code \(facts.status) out of 100-599") }
        // HTTP/1.0 has no interim responses (RFC 9110 15.2).
        guard facts.status >= 200 || facts.minor == 1 else { throw Malformed(reason: "a 1xx response in HTTP/1.0") }
        var i = 12
        if p[i] == UInt8(ascii: " ") {
            i += 1
            while i < p.count, isFieldValueByte(p[i]) { i += 1 }
        }
        guard i + 1 < p.count, p[i] == UInt8(ascii: "\r"), p[i + 1] == UInt8(ascii: "\n") else {
            throw Malformed(reason: "a status line with a control byte, bare CR or bare LF")
        }
        try forEachField(p, from: i + 2, context: "header") { name, value in
            switch name.count {
            case 14 where equalsIgnoringCase(p, name, "content-length"):
                guard !value.isEmpty, value.count <= 18, value.allSatisfy({ p[$0] >= UInt8(ascii: "0") && p[$0] <= UInt8(ascii: "9") }) else {
                    throw Malformed(reason: "a Content-Length that is not a number")
                }
                let n = value.reduce(0) { $0 * 10 + Int(p[$1] - UInt8(ascii: "0")) }
                // Even two equal ones (RFC 9110 8.6 lets a recipient take
                // them; llhttp does not, and the caller's parser may be it).
                guard facts.contentLength == nil else { throw Malformed(reason: "two Content-Length fields") }
                facts.contentLength = n
            case 17 where equalsIgnoringCase(p, name, "transfer-encoding"):
                facts.transferEncodings += 1
                facts.chunked = equalsIgnoringCase(p, value, "chunked")
            case 10 where equalsIgnoringCase(p, name, "connection"):
                // Comma-separated tokens, each with optional whitespace.
                var t = value.lowerBound
                while t < value.upperBound {
                    var e = t
                    while e < value.upperBound, p[e] != UInt8(ascii: ",") { e += 1 }
                    var a = t, b = e
                    while a < b, p[a] == 32 || p[a] == 9 { a += 1 }
                    while b > a, p[b - 1] == 32 || p[b - 1] == 9 { b -= 1 }
                    if equalsIgnoringCase(p, a..<b, "close") { facts.close = true }
                    if equalsIgnoringCase(p, a..<b, "keep-alive") && facts.minor == 0 { facts.close = false }
                    t = e + 1
                }
            default:
                break
            }
        }
        return facts
    }

    /// The status line and fields of a whole head, and how its body ends.
    static func parseHead(_ bytes: ByteBuffer, request: Request) throws -> Head {
        let facts = try bytes.withUnsafeReadableBytes { try readHead($0) }
        if facts.transferEncodings > 0 {
            guard facts.transferEncodings == 1, facts.chunked else { throw Malformed(reason: "a Transfer-Encoding other than one \"chunked\"") }
            guard facts.contentLength == nil else { throw Malformed(reason: "both Transfer-Encoding and Content-Length") }
            guard facts.minor == 1 else { throw Malformed(reason: "Transfer-Encoding in an HTTP/1.0 response") }
        }
        let status = facts.status
        var close = facts.close
        let framing: BodyFraming
        if status < 200 || status == 204 || status == 304 || request == .head || (request == .connect && status < 300) {
            // RFC 9112 6.3: no content whatever the fields say.
            framing = .none
        } else if facts.chunked {
            framing = .chunked
        } else if let n = facts.contentLength {
            framing = .length(n)
        } else {
            framing = .untilClose
            close = true
        }
        return Head(status: status, bytes: bytes, framing: framing, closes: close)
    }

    /// A chunk-size line: hex digits, optional extensions, CRLF.
    static func chunkSize(_ line: ByteBuffer) throws -> Int {
        try line.withUnsafeReadableBytes { p in
            var size = 0
            var i = 0
            while i < p.count, let d = hexValue(p[i]) {
                guard i < 15 else { throw Malformed(reason: "a chunk size over 15 hex digits") }
                size = size * 16 + d
                i += 1
            }
            guard i > 0 else { throw Malformed(reason: "a chunk size that is not hex") }
            // chunk-ext (RFC 9112 7.1.1): ";" name ["=" token or quoted
            // string], with no whitespace and no obs-text (llhttp refuses
            // those; refusing more than a caller's parser is safe).
            while i < p.count, p[i] == UInt8(ascii: ";") {
                i += 1
                let name = i
                while i < p.count, isTchar(p[i]) { i += 1 }
                guard i > name else { throw Malformed(reason: "a chunk extension without a name") }
                guard i < p.count, p[i] == UInt8(ascii: "=") else { continue }
                i += 1
                if i < p.count, p[i] == UInt8(ascii: "\"") {
                    i += 1
                    while i < p.count, p[i] != UInt8(ascii: "\"") {
                        if p[i] == UInt8(ascii: "\\") { i += 1 }
                        guard i < p.count, p[i] == 0x09 || (p[i] >= 0x20 && p[i] < 0x7F) else { throw Malformed(reason: "a chunk extension value with a control byte or obs-text") }
                        i += 1
                    }
                    guard i < p.count else { throw Malformed(reason: "an unterminated quoted chunk extension value") }
                    i += 1
                } else {
                    let value = i
                    while i < p.count, isTchar(p[i]) { i += 1 }
                    guard i > value else { throw Malformed(reason: "a chunk extension with an empty value") }
                }
            }
            guard i + 2 == p.count, p[i] == UInt8(ascii: "\r") else { throw Malformed(reason: "a chunk-size line with a byte not allowed there, bare CR or bare LF") }
            return size
        }
    }

    private static func hexValue(_ b: UInt8) -> Int? {
        switch b {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): return Int(b - UInt8(ascii: "0"))
        case UInt8(ascii: "a")...UInt8(ascii: "f"): return Int(b - UInt8(ascii: "a")) + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): return Int(b - UInt8(ascii: "A")) + 10
        default: return nil
        }
    }
}
