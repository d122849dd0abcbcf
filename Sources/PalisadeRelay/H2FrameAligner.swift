import NIOCore

/// In front of NIO's HTTP/2 handler: hands it bytes that end where its
/// frame decoder is left holding nothing, at a frame's end or inside a DATA
/// frame's payload. A partial frame header, a DATA header without payload
/// bytes yet, or a partial frame of another type is held back (a few bytes
/// or one small frame) and completed from the next read.
///
/// Why: swift-nio-http2's decoder appends each read to the bytes it still
/// holds and only starts its buffer over once it has consumed all of them.
/// When reads keep ending inside frame headers or small frames, the buffer
/// keeps growing, and it never shrinks: a copy-on-write (DATA frames are
/// slices of it, still queued for the workload) copies it at its full
/// capacity. Under a bulk transfer such buffers reach 16 MB, several are
/// alive at once, and the last one stays with the tunnel connection until
/// it closes.
///
/// Bytes are never changed, reordered or dropped; only where one read ends
/// and the next begins moves. A frame longer than `holdLimit` is passed on
/// as it comes (NIO refuses frames above its SETTINGS_MAX_FRAME_SIZE).
package final class H2FrameAligner: ChannelInboundHandler, RemovableChannelHandler {
    package typealias InboundIn = ByteBuffer
    package typealias InboundOut = ByteBuffer

    static let data: UInt8 = 0, padded: UInt8 = 0x8
    /// Largest frame held back whole (the tunnel's SETTINGS_MAX_FRAME_SIZE).
    package static let holdLimit = 1 << 16

    /// Bytes passed on as they come: the client preface, the rest of a DATA
    /// frame whose first payload bytes went on, or an oversized frame.
    private var passThrough: Int
    /// A unit not yet complete (header, DATA header, small frame).
    private var held: ByteBuffer?

    /// `expectsPreface`: the server side, which first reads the client's
    /// 24-byte connection preface.
    package init(expectsPreface: Bool) { passThrough = expectsPreface ? 24 : 0 }

    package func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var input = unwrapInboundIn(data)
        if held != nil {
            guard let unit = completeHeld(from: &input) else { return }
            context.fireChannelRead(wrapInboundOut(unit))
        }
        guard input.readableBytes > 0 else { return }
        let cut = alignedEnd(input)
        if cut < input.writerIndex {
            held = input.getSlice(at: cut, length: input.writerIndex - cut)
            input.moveWriterIndex(to: cut)
        }
        if input.readableBytes > 0 { context.fireChannelRead(wrapInboundOut(input)) }
    }

    /// Where the bytes of `input` may end for the decoder to hold nothing;
    /// updates `passThrough` for a DATA frame (or oversized frame) left open.
    private func alignedEnd(_ input: ByteBuffer) -> Int {
        let end = input.writerIndex
        var i = input.readerIndex
        if passThrough > 0 {
            let n = min(passThrough, end - i)
            passThrough -= n
            i += n
            if passThrough > 0 { return end }
        }
        while end - i >= 9 {
            let (length, type, flags) = Self.header(input, at: i)
            let available = end - i - 9
            if available >= length {
                i += 9 + length
                continue
            }
            let openData = type == Self.data && flags & Self.padded == 0
            if (openData && available >= 1) || length > Self.holdLimit {
                passThrough = length - available
                return end
            }
            return i
        }
        return i
    }

    /// Adds to the held unit from `input` until it may go on; returns it then.
    private func completeHeld(from input: inout ByteBuffer) -> ByteBuffer? {
        guard var unit = held else { return nil }
        if unit.readableBytes < 9 {
            let take = min(9 - unit.readableBytes, input.readableBytes)
            var part = input.readSlice(length: take)!
            unit.writeBuffer(&part)
            guard unit.readableBytes == 9 else { held = unit; return nil }
        }
        let (length, type, flags) = Self.header(unit, at: unit.readerIndex)
        let have = unit.readableBytes - 9
        let openData = type == Self.data && flags & Self.padded == 0
        // A DATA frame goes on with its first payload byte; any other frame
        // (up to the limit) whole.
        let want = length > Self.holdLimit ? have : (openData ? min(length, max(have, 1)) : length)
        if want > have {
            let take = min(want - have, input.readableBytes)
            var part = input.readSlice(length: take)!
            unit.writeBuffer(&part)
            guard unit.readableBytes - 9 == want else { held = unit; return nil }
        }
        passThrough = length - want
        held = nil
        return unit
    }

    static func header(_ b: ByteBuffer, at i: Int) -> (length: Int, type: UInt8, flags: UInt8) {
        let l0 = Int(b.getInteger(at: i, as: UInt8.self)!), l1 = Int(b.getInteger(at: i + 1, as: UInt8.self)!)
        let l2 = Int(b.getInteger(at: i + 2, as: UInt8.self)!)
        return (l0 << 16 | l1 << 8 | l2, b.getInteger(at: i + 3, as: UInt8.self)!, b.getInteger(at: i + 4, as: UInt8.self)!)
    }
}
