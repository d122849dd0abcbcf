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
    typealias Malformed = HTTP1Malformed

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

    init(maxHeadBytes: Int = 64 * 1024) { lines = HTTP1LineReader(maxBytes: maxHeadBytes) }

    /// Set while a final response's head is handed on, when that head came
    /// whole in one read: its bytes then go on at the start of the
    /// response's first `.body` slice (head and body in one write, where
    /// two cost a second pass through the caller's pipeline and a copy to
    /// join them), unless whoever takes the head clears it, to send a head
    /// of its own instead.
    var headGoesWithBody = false

    private enum State {
        case head
        case body
        case untilClose
        case upgraded              // after 101: bytes, not HTTP
        case closed                // after a response that ends the connection
    }
    private var state = State.head
    private var body = HTTP1BodyReader(state: .chunkSize)
    /// The response being read ends the connection (HTTP/1.0 without
    /// keep-alive, `Connection: close`): nothing may follow it.
    private var closesAfter = false
    /// Where a response ends: the next one, or nothing more.
    private var afterResponse: State { closesAfter ? .closed : .head }
    private var lines: HTTP1LineReader
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
        case .head where lines.isEmpty, .upgraded, .closed:
            break
        default:
            failed = true
            throw Malformed(reason: "the workload closed inside a response")
        }
    }

    private func run(_ input: inout ByteBuffer, _ emit: (Event) -> Void) throws {
        var run = HTTP1BodyRun(at: input)
        func flushBody(_ input: inout ByteBuffer) {
            if let (bytes, payload) = run.take(input) { emit(.body(bytes, payload: payload)) }
        }
        while input.readableBytes > 0 {
            switch state {
            case .head:
                let headStart = input.readerIndex
                let inPlace = lines.isEmpty   // (else it spanned reads)
                guard let headBytes = try lines.take(&input, untilEmptyLine: true) else { return }
                let head = try Self.parseHead(headBytes, request: request)
                if head.status >= 200 { closesAfter = head.closes }
                headGoesWithBody = inPlace && head.status >= 200 && head.status != 101
                emit(.head(head))
                if headGoesWithBody { run.restart(at: headStart) } else { run.restart(input) }
                headGoesWithBody = false
                switch head.framing {
                case .none:
                    if head.status == 101 {
                        state = .upgraded
                        afterUpgrade.writeBuffer(&input)
                        emit(.end)
                        return
                    }
                    // A 1xx is followed by the real response.
                    if head.status >= 200 {
                        state = afterResponse
                        flushBody(&input)
                        emit(.end)
                    }
                case .length(let n):
                    if n == 0 {
                        state = afterResponse
                        flushBody(&input)
                        emit(.end)
                    } else {
                        state = .body
                        body = HTTP1BodyReader(state: .fixed(remaining: n))
                    }
                case .chunked:
                    state = .body
                    body = HTTP1BodyReader(state: .chunkSize)
                case .untilClose:
                    state = .untilClose
                }
            case .body:
                if try body.read(&input, lines: &lines, run: &run) {
                    state = afterResponse
                    flushBody(&input)
                    emit(.end)
                }
            case .untilClose:
                run.payload += input.readableBytes
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

    // MARK: Parsing a head (HTTP1Syntax has what requests share)

    /// What a head says about the message's framing.
    struct HeadFacts {
        var status = 0
        var minor = 1
        var framing = HTTP1Syntax.FramingFields()
        /// The workload closes after this response.
        var close: Bool { framing.connectionClose || (minor == 0 && !framing.connectionKeepAlive) }
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
            while i < p.count, HTTP1Syntax.isFieldValueByte(p[i]) { i += 1 }
        }
        guard i + 1 < p.count, p[i] == UInt8(ascii: "\r"), p[i + 1] == UInt8(ascii: "\n") else {
            throw Malformed(reason: "a status line with a control byte, bare CR or bare LF")
        }
        try HTTP1Syntax.forEachField(p, from: i + 2, context: "header") { name, value in
            _ = try facts.framing.read(p, name, value)
        }
        return facts
    }

    /// The status line and fields of a whole head, and how its body ends.
    static func parseHead(_ bytes: ByteBuffer, request: Request) throws -> Head {
        let facts = try bytes.withUnsafeReadableBytes { try readHead($0) }
        try facts.framing.check(minor: facts.minor, message: "response")
        let status = facts.status
        var close = facts.close
        let framing: BodyFraming
        if status < 200 || status == 204 || status == 304 || request == .head || (request == .connect && status < 300) {
            // RFC 9112 6.3: no content whatever the fields say.
            framing = .none
        } else if facts.framing.chunked {
            framing = .chunked
        } else if let n = facts.framing.contentLength {
            framing = .length(n)
        } else {
            framing = .untilClose
            close = true
        }
        return Head(status: status, bytes: bytes, framing: framing, closes: close)
    }
}
