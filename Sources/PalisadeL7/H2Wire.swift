import NIOCore
import NIOHPACK
import NIOHTTP2

/// HTTP/2's wire format (RFC 9113 §4, §6) as both of the proxy's
/// connections read and write it: frame types and flags, a reader that
/// cuts a byte stream into frames, and the buffer one event-loop tick's
/// frames are written into.
enum H2Wire {
    enum FrameType: UInt8 {
        case data = 0, headers, priority, rstStream, settings, pushPromise, ping, goAway, windowUpdate, continuation
    }
    enum Flag {
        static let endStream: UInt8 = 0x1, ack: UInt8 = 0x1, endHeaders: UInt8 = 0x4, padded: UInt8 = 0x8, priority: UInt8 = 0x20
    }
    /// Largest flow-control window (RFC 9113 §6.9.1).
    static let maxWindow = Int(Int32.max)
    /// Largest header block (HEADERS and its CONTINUATIONs) collected.
    static let maxHeaderBlock = 1 << 17

    /// An error that ends the connection (GOAWAY with `code`).
    struct ConnectionError: Error { var code: HTTP2ErrorCode }

    /// A frame's payload without its padding (RFC 9113 §6.1): a pad length
    /// that is not inside the payload is a connection error.
    static func unpadded(_ flags: UInt8, _ payload: ByteBuffer) throws -> ByteBuffer {
        guard flags & Flag.padded != 0 else { return payload }
        var p = payload
        guard let pad = p.readInteger(as: UInt8.self), Int(pad) <= p.readableBytes else {
            throw ConnectionError(code: .protocolError)
        }
        p.moveWriterIndex(to: p.writerIndex - Int(pad))
        return p
    }
}

/// Cuts a byte stream into frames. Bytes of a frame that is not whole yet
/// wait here (merged with the next read: frames are at most 16 KiB).
struct H2FrameReader {
    struct Frame {
        var type: UInt8
        var flags: UInt8
        var stream: Int32
        var payload: ByteBuffer
    }
    private var held = ByteBuffer()
    private var input = ByteBuffer()
    let maxFrameSize: Int

    init(maxFrameSize: Int) { self.maxFrameSize = maxFrameSize }

    /// Starts reading `bytes` (after what was held).
    mutating func append(_ bytes: ByteBuffer, allocator: ByteBufferAllocator) {
        if held.readableBytes > 0 {
            var merged = allocator.buffer(capacity: held.readableBytes + bytes.readableBytes)
            merged.writeBuffer(&held)
            var b = bytes
            merged.writeBuffer(&b)
            input = merged
            held = ByteBuffer()
        } else {
            input = bytes
        }
    }

    /// The next whole frame, nil when the rest must wait for more bytes
    /// (then kept). A frame over `maxFrameSize` is FRAME_SIZE_ERROR.
    mutating func next() throws -> Frame? {
        guard input.readableBytes >= 9 else { keepRest(); return nil }
        let word = input.getInteger(at: input.readerIndex, as: UInt32.self)!
        let length = Int(word >> 8)
        guard length <= maxFrameSize else { throw H2Wire.ConnectionError(code: .frameSizeError) }
        guard input.readableBytes >= 9 + length else { keepRest(); return nil }
        let flags = input.getInteger(at: input.readerIndex + 4, as: UInt8.self)!
        let stream = Int32(bitPattern: input.getInteger(at: input.readerIndex + 5, as: UInt32.self)! & 0x7FFF_FFFF)
        input.moveReaderIndex(forwardBy: 9)
        return Frame(type: UInt8(truncatingIfNeeded: word), flags: flags, stream: stream, payload: input.readSlice(length: length)!)
    }

    /// Takes up to `count` bytes off the front (a connection preface), nil
    /// when none are there.
    mutating func take(upTo count: Int) -> ByteBuffer? {
        guard input.readableBytes > 0 else { keepRest(); return nil }
        return input.readSlice(length: min(count, input.readableBytes))
    }

    private mutating func keepRest() {
        if input.readableBytes > 0 { held = input }
        input = ByteBuffer()
    }

    mutating func reset() {
        held = ByteBuffer()
        input = ByteBuffer()
    }
}

/// The frames of one event-loop tick, written into one buffer and handed
/// to the channel at the next flush (a large DATA payload goes as its own
/// buffer, after what was gathered, so it is not copied).
struct H2FrameWriter {
    var out: ByteBuffer
    var encoder = H2HeaderEncoder()

    init(allocator: ByteBufferAllocator) { out = allocator.buffer(capacity: 256) }

    mutating func frame(_ type: H2Wire.FrameType, _ flags: UInt8, _ stream: Int32, _ body: (inout ByteBuffer) -> Void) {
        let start = out.writerIndex
        out.writeRepeatingByte(0, count: 9)
        body(&out)
        setHeader(at: start, length: out.writerIndex - start - 9, type, flags, stream)
    }

    mutating func setHeader(at index: Int, length: Int, _ type: H2Wire.FrameType, _ flags: UInt8, _ stream: Int32) {
        out.setInteger(UInt32(length) << 8 | UInt32(type.rawValue), at: index)
        out.setInteger(flags, at: index + 4)
        out.setInteger(UInt32(bitPattern: stream), at: index + 5)
    }

    /// A header block, HPACK-encoded: one HEADERS frame, or HEADERS and
    /// CONTINUATIONs past the peer's frame size.
    mutating func headers(_ stream: Int32, _ headers: HPACKHeaders, endStream: Bool, maxFrameSize: Int) {
        let start = out.writerIndex
        out.writeRepeatingByte(0, count: 9)
        encoder.encode(headers, into: &out)
        let length = out.writerIndex - start - 9
        let end = endStream ? H2Wire.Flag.endStream : 0
        if length <= maxFrameSize {
            setHeader(at: start, length: length, .headers, end | H2Wire.Flag.endHeaders, stream)
            return
        }
        var block = out.getSlice(at: start + 9, length: length)!
        out.moveWriterIndex(to: start)
        var type = H2Wire.FrameType.headers, flags = end
        while block.readableBytes > 0 {
            var piece = block.readSlice(length: min(maxFrameSize, block.readableBytes))!
            if block.readableBytes == 0 { flags |= H2Wire.Flag.endHeaders }
            frame(type, flags, stream) { $0.writeBuffer(&piece) }
            type = .continuation
            flags = 0
        }
    }

    /// A DATA frame: its header here, and its payload too when small;
    /// otherwise the payload to write after this buffer is handed on.
    mutating func data(_ stream: Int32, _ payload: ByteBuffer, endStream: Bool) -> ByteBuffer? {
        let n = payload.readableBytes
        let header = out.writerIndex
        out.writeRepeatingByte(0, count: 9)
        setHeader(at: header, length: n, .data, endStream ? H2Wire.Flag.endStream : 0, stream)
        guard n > 1024 else {
            var d = payload
            out.writeBuffer(&d)
            return nil
        }
        return payload
    }

    mutating func rstStream(_ stream: Int32, _ code: HTTP2ErrorCode) {
        frame(.rstStream, 0, stream) { $0.writeInteger(UInt32(code.networkCode)) }
    }

    mutating func windowUpdate(_ stream: Int32, _ n: Int) {
        frame(.windowUpdate, 0, stream) { $0.writeInteger(UInt32(n)) }
    }

    mutating func goAway(last: Int32, _ code: HTTP2ErrorCode) {
        frame(.goAway, 0, 0) { b in
            b.writeInteger(UInt32(bitPattern: last))
            b.writeInteger(UInt32(code.networkCode))
        }
    }

    /// What was gathered, handing the writer a new buffer (nil if nothing).
    mutating func take(allocator: ByteBufferAllocator) -> ByteBuffer? {
        guard out.readableBytes > 0 else { return nil }
        let gathered = out
        out = allocator.buffer(capacity: 256)
        return gathered
    }
}

/// Values remembered up to a bound, the oldest forgotten first (stream
/// IDs whose late frames must be told apart).
struct RecentSet<Element: Hashable> {
    static var capacity: Int { 4096 }
    private var members = Set<Element>()
    private var order: [Element] = []
    private var head = 0

    func contains(_ value: Element) -> Bool { members.contains(value) }

    mutating func insert(_ value: Element) {
        guard members.insert(value).inserted else { return }
        if order.count < Self.capacity {
            order.append(value)
        } else {
            members.remove(order[head])
            order[head] = value
            head = (head + 1) % Self.capacity
        }
    }
}
