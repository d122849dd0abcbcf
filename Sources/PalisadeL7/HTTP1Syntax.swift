import NIOCore

/// A message the HTTP/1.1 framers refuse: two parsers could read it
/// differently, or it breaks a limit. `status` is what a caller is
/// answered when it was a request (400, or 431 past the head limits).
struct HTTP1Malformed: Error, Equatable {
    let reason: String
    var status = 400
}

/// The syntax both HTTP/1.1 framers (requests and responses) share, read
/// over raw bytes (ByteBufferView's per-byte access made a parse cost more
/// than NIO's decoder it replaced).
enum HTTP1Syntax {
    typealias Malformed = HTTP1Malformed

    /// tchar (RFC 9110 5.6.2).
    static func isTchar(_ b: UInt8) -> Bool {
        switch b {
        case 0x21, 0x23...0x27, 0x2A, 0x2B, 0x2D, 0x2E, 0x30...0x39, 0x41...0x5A, 0x5E...0x7A, 0x7C, 0x7E: return true
        default: return false
        }
    }

    /// Field-value bytes: HTAB, SP, VCHAR, obs-text (RFC 9110 5.5).
    static func isFieldValueByte(_ b: UInt8) -> Bool { b == 0x09 || (b >= 0x20 && b != 0x7F) }

    static func lower(_ b: UInt8) -> UInt8 { b >= 65 && b <= 90 ? b | 0x20 : b }

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

    /// The elements of a comma-separated field value (RFC 9110 5.6.1),
    /// each without its surrounding whitespace; empty ones skipped.
    static func forEachListElement(_ p: UnsafeRawBufferPointer, _ value: Range<Int>, _ element: (Range<Int>) -> Void) {
        var t = value.lowerBound
        while t < value.upperBound {
            var e = t
            while e < value.upperBound, p[e] != UInt8(ascii: ",") { e += 1 }
            var a = t, b = e
            while a < b, p[a] == 32 || p[a] == 9 { a += 1 }
            while b > a, p[b - 1] == 32 || p[b - 1] == 9 { b -= 1 }
            if a < b { element(a..<b) }
            t = e + 1
        }
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

    /// A Content-Length value: digits only (no sign, no list), at most 18.
    static func parseContentLength(_ p: UnsafeRawBufferPointer, _ value: Range<Int>) throws -> Int {
        guard !value.isEmpty, value.count <= 18, value.allSatisfy({ p[$0] >= UInt8(ascii: "0") && p[$0] <= UInt8(ascii: "9") }) else {
            throw Malformed(reason: "a Content-Length that is not a number")
        }
        return value.reduce(0) { $0 * 10 + Int(p[$1] - UInt8(ascii: "0")) }
    }

    /// What a head's fields say about framing and the connection, read
    /// the same way for requests and responses.
    struct FramingFields {
        var contentLength: Int?
        var transferEncodings = 0
        var chunked = false
        var connectionClose = false
        var connectionKeepAlive = false
        var connectionUpgrade = false

        /// Takes in one field; false when it is none of these.
        mutating func read(_ p: UnsafeRawBufferPointer, _ name: Range<Int>, _ value: Range<Int>) throws -> Bool {
            switch name.count {
            case 14 where equalsIgnoringCase(p, name, "content-length"):
                let n = try HTTP1Syntax.parseContentLength(p, value)
                // Even two equal ones (RFC 9110 8.6 lets a recipient take
                // them; llhttp does not, and the peer's parser may be it).
                guard contentLength == nil else { throw Malformed(reason: "two Content-Length fields") }
                contentLength = n
            case 17 where equalsIgnoringCase(p, name, "transfer-encoding"):
                transferEncodings += 1
                chunked = equalsIgnoringCase(p, value, "chunked")
            case 10 where equalsIgnoringCase(p, name, "connection"):
                forEachListElement(p, value) { token in
                    if equalsIgnoringCase(p, token, "close") { connectionClose = true }
                    if equalsIgnoringCase(p, token, "keep-alive") { connectionKeepAlive = true }
                    if equalsIgnoringCase(p, token, "upgrade") { connectionUpgrade = true }
                }
            default:
                return false
            }
            return true
        }

        /// Transfer-Encoding is exactly one `chunked`, never with
        /// Content-Length, never in HTTP/1.0 (RFC 9112 6.1: what else a
        /// peer does with these differs from parser to parser).
        func check(minor: Int, message: String) throws {
            guard transferEncodings > 0 else { return }
            guard transferEncodings == 1, chunked else { throw Malformed(reason: "a Transfer-Encoding other than one \"chunked\"") }
            guard contentLength == nil else { throw Malformed(reason: "both Transfer-Encoding and Content-Length") }
            guard minor == 1 else { throw Malformed(reason: "Transfer-Encoding in an HTTP/1.0 \(message)") }
        }
    }

    /// Where a whole head's field lines start: after its first line.
    static func fieldsStart(_ p: UnsafeRawBufferPointer) -> Int { (p.firstIndex(of: UInt8(ascii: "\n")) ?? p.count - 1) + 1 }

    /// Writes the field line `name: value` CRLF.
    static func writeField(_ out: inout ByteBuffer, _ p: UnsafeRawBufferPointer, _ name: Range<Int>, _ value: Range<Int>) {
        out.writeBytes(UnsafeRawBufferPointer(rebasing: p[name]))
        out.writeString(": ")
        out.writeBytes(UnsafeRawBufferPointer(rebasing: p[value]))
        out.writeString("\r\n")
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
            // those; refusing more than a peer's parser is safe).
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
}

/// Takes whole lines (or blocks ending in an empty line) from reads:
/// sliced in place when whole in one read, gathered when they span reads.
struct HTTP1LineReader {
    let maxBytes: Int
    /// A head or line that is not whole yet.
    private var partial = ByteBuffer()
    init(maxBytes: Int) { self.maxBytes = maxBytes }

    /// Nothing of a line is waiting.
    var isEmpty: Bool { partial.readableBytes == 0 }

    /// A line (or, with `untilEmptyLine`, lines up to and including an
    /// empty one) from what waits and `input`, CRLF included; nil when it
    /// is not whole yet (what there is waits). Over `maxBytes`: refused
    /// with status 431.
    mutating func take(_ input: inout ByteBuffer, untilEmptyLine: Bool) throws -> ByteBuffer? {
        // The search resumes after what waits: a CRLF may straddle reads.
        let already = partial.readableBytes
        let end = partial.writerIndex
        let previous: (UInt8, UInt8) = (already >= 2 ? partial.getInteger(at: end - 2)! : 0, already >= 1 ? partial.getInteger(at: end - 1)! : 0)
        let found = try input.withUnsafeReadableBytes {
            try HTTP1Syntax.lineEnd($0, untilEmptyLine: untilEmptyLine, previous: previous, already: already)
        }
        guard already + (found ?? input.readableBytes) <= maxBytes else {
            throw HTTP1Malformed(reason: "head or chunk line over \(maxBytes) bytes", status: 431)
        }
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
}

/// The body bytes of one read run from `start` to the input's reader
/// index: handed on as one slice before anything that is not body. A
/// chunk line is handed on only once it is whole (and checked): its bytes
/// in a read that ends inside it are held back, and go on with the rest of
/// the line.
struct HTTP1BodyRun {
    private var start: Int
    /// Bytes from here were taken into a line that is not whole yet.
    private var end: Int?
    /// The part of a line, whole only now, that earlier reads brought.
    private var earlier: ByteBuffer?
    /// Content bytes in the run (without chunk framing).
    var payload = 0
    init(at input: ByteBuffer) { start = input.readerIndex }

    mutating func holdBack(from index: Int) { end = index }

    /// `line` spanned reads and is whole now: its last `newBytes` are in
    /// this read's run, the rest goes on before them.
    mutating func lineCompleted(_ line: ByteBuffer, newBytes: Int) {
        earlier = line.getSlice(at: line.readerIndex, length: line.readableBytes - newBytes)
    }

    /// The run so far, if any, and a new one from the reader index.
    mutating func take(_ input: ByteBuffer) -> (bytes: ByteBuffer, payload: Int)? {
        defer {
            start = input.readerIndex
            end = nil
            earlier = nil
            payload = 0
        }
        let n = (end ?? input.readerIndex) - start
        // (get* reads only readable bytes: step back a copy instead.)
        var body = input
        body.moveReaderIndex(to: start)
        guard var bytes = earlier else { return n > 0 ? (body.readSlice(length: n)!, payload) : nil }
        if n > 0 { bytes.writeImmutableBuffer(body.readSlice(length: n)!) }
        return (bytes, payload)
    }

    /// A new run from the reader index (what came before was no body).
    mutating func restart(_ input: ByteBuffer) { start = input.readerIndex }

    /// A new run from `index`, before the reader index (a head that goes
    /// on with its body).
    mutating func restart(at index: Int) { start = index }
}

/// Reads one message body framed by Content-Length or chunks, moving the
/// input's reader index over its bytes (chunk framing and trailers
/// included).
struct HTTP1BodyReader {
    enum State {
        case fixed(remaining: Int)
        case chunkSize
        case chunkData(remaining: Int)
        case chunkDataEnd          // the CRLF after a chunk's data
        case trailers
    }
    var state: State

    /// Reads what `input` holds of the body into `run`; true once the body
    /// ended.
    mutating func read(_ input: inout ByteBuffer, lines: inout HTTP1LineReader, run: inout HTTP1BodyRun) throws -> Bool {
        while input.readableBytes > 0 {
            switch state {
            case .fixed(let remaining):
                let n = min(remaining, input.readableBytes)
                input.moveReaderIndex(forwardBy: n)
                run.payload += n
                if n == remaining { return true }
                state = .fixed(remaining: remaining - n)
            case .chunkSize:
                guard let line = try takeLine(&input, lines: &lines, run: &run, untilEmptyLine: false) else { return false }
                let size = try HTTP1Syntax.chunkSize(line)
                state = size == 0 ? .trailers : .chunkData(remaining: size)
            case .chunkData(let remaining):
                let n = min(remaining, input.readableBytes)
                input.moveReaderIndex(forwardBy: n)
                run.payload += n
                state = n == remaining ? .chunkDataEnd : .chunkData(remaining: remaining - n)
            case .chunkDataEnd:
                guard let line = try takeLine(&input, lines: &lines, run: &run, untilEmptyLine: false) else { return false }
                guard line.readableBytes == 2 else { throw HTTP1Malformed(reason: "chunk data longer than its size") }
                state = .chunkSize
            case .trailers:
                guard let block = try takeLine(&input, lines: &lines, run: &run, untilEmptyLine: true) else { return false }
                try HTTP1Syntax.checkTrailers(block)
                return true
            }
        }
        return false
    }

    /// A chunk line, or the trailers, once whole; its bytes are held back
    /// from the run until then.
    private func takeLine(_ input: inout ByteBuffer, lines: inout HTTP1LineReader, run: inout HTTP1BodyRun,
                          untilEmptyLine: Bool) throws -> ByteBuffer? {
        let spans = !lines.isEmpty
        let start = input.readerIndex
        guard let line = try lines.take(&input, untilEmptyLine: untilEmptyLine) else {
            run.holdBack(from: start)
            return nil
        }
        if spans { run.lineCompleted(line, newBytes: input.readerIndex - start) }
        return line
    }
}
