import NIOCore

/// On the caller's byte stream, in front of NIO's HTTP/2 handler, following
/// frame headers (never payloads, so HPACK stays NIO's alone). Three jobs:
///
/// RFC 9113 §5.1: a HEADERS frame on a stream the caller already ended
/// (END_STREAM sent: half-closed (remote)) or reset is a STREAM_CLOSED
/// error. swift-nio-http2 answers it with PROTOCOL_ERROR (a stream error
/// when half-closed, a connection error when closed), which conformance
/// tools count as a failure. This handler sits on the caller's byte stream,
/// in front of NIO's HTTP/2 handler: it follows frame headers (never
/// payloads, so HPACK stays NIO's alone), notes such a HEADERS frame, and
/// gives the RST_STREAM or GOAWAY that NIO sends about it the code the RFC
/// names. And after a connection error, once NIO's GOAWAY (with an error
/// code) is written, it closes the connection, as RFC 9113 §5.4.1 asks (NIO
/// sends the GOAWAY but leaves the connection open).
///
/// WINDOW_UPDATE floods, which NIO's frame-rate limits do not count: a
/// caller only has reason to open a window for data it was sent (a stream's
/// and the connection's) or for a stream it opens, so more WINDOW_UPDATE
/// frames than two per DATA frame sent and one per stream opened (beyond a
/// slack) end the connection with GOAWAY ENHANCE_YOUR_CALM.
///
/// Everything else passes untouched.
package final class H2CallerGuard: ChannelDuplexHandler, @unchecked Sendable {
    package init() {}
    package typealias InboundIn = ByteBuffer
    package typealias InboundOut = ByteBuffer
    package typealias OutboundIn = IOData
    package typealias OutboundOut = IOData

    static let headers: UInt8 = 1, data: UInt8 = 0, rstStream: UInt8 = 3, goaway: UInt8 = 7, windowUpdate: UInt8 = 8
    static let endStream: UInt8 = 0x1
    static let protocolError: UInt32 = 1, streamClosed: UInt32 = 5, enhanceYourCalm: UInt32 = 11
    /// WINDOW_UPDATE frames allowed beyond the DATA frames sent.
    static let windowUpdateSlack = 1000
    /// WINDOW_UPDATE frames received minus DATA frames sent.
    private var unearnedWindowUpdates = 0
    private var calmedDown = false

    private var inbound = FrameScanner(skip: 24)    // the client's preface first
    private var outbound = FrameScanner(skip: 0)
    /// Streams the caller can no longer send HEADERS on (bounded: the
    /// oldest are forgotten, and NIO's own answer stands for them).
    private var ended = RecentSet<UInt32>()
    static let remembered = 4096
    /// Streams whose next error answer is to say STREAM_CLOSED.
    private var pending = Set<UInt32>()

    private func end(_ stream: UInt32) {
        if stream != 0 { ended.insert(stream) }
    }

    package func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let buffer = unwrapInboundIn(data)
        inbound.scan(buffer) { type, flags, stream, _ in
            switch type {
            case Self.headers:
                unearnedWindowUpdates -= 1
                if ended.contains(stream) {
                    // (NIO ignores HEADERS on a stream it reset itself: no
                    // answer comes, so the set is bounded too.)
                    if pending.count < Self.remembered { pending.insert(stream) }
                } else if flags & Self.endStream != 0 {
                    end(stream)
                }
            case Self.data:
                if flags & Self.endStream != 0 { end(stream) }
            case Self.rstStream:
                end(stream)
            case Self.windowUpdate:
                unearnedWindowUpdates += 1
            default:
                break
            }
        }
        if unearnedWindowUpdates > Self.windowUpdateSlack {
            enhanceYourCalm(context)
            return
        }
        context.fireChannelRead(data)
    }

    /// GOAWAY ENHANCE_YOUR_CALM (written whole, between NIO's frames) and the end.
    private func enhanceYourCalm(_ context: ChannelHandlerContext) {
        guard !calmedDown else { return }
        calmedDown = true
        var b = context.channel.allocator.buffer(capacity: 17)
        b.writeBytes([0, 0, 8, Self.goaway, 0, 0, 0, 0, 0])
        b.writeInteger(UInt32(0))                     // last stream id: none processed after this
        b.writeInteger(Self.enhanceYourCalm)
        context.writeAndFlush(wrapOutboundOut(.byteBuffer(b))).assumeIsolated().whenComplete { _ in context.close(promise: nil) }
    }

    package func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        guard case .byteBuffer(var buffer) = unwrapOutboundIn(data) else {
            context.write(data, promise: promise)   // (NIO's HTTP/2 handler writes no file regions here)
            return
        }
        var changed = false, connectionError = false
        outbound.scan(buffer) { type, _, stream, payload in
            switch type {
            case Self.data:
                unearnedWindowUpdates -= 2   // a stream's and the connection's window
            case Self.rstStream:
                end(stream)
                if pending.remove(stream) != nil, let at = payload, at + 4 <= buffer.writerIndex,
                   buffer.getInteger(at: at, as: UInt32.self) == Self.protocolError {
                    buffer.setInteger(Self.streamClosed, at: at)
                    changed = true
                }
            case Self.goaway:
                if !pending.isEmpty, let at = payload, at + 8 <= buffer.writerIndex,
                   buffer.getInteger(at: at + 4, as: UInt32.self) == Self.protocolError {
                    buffer.setInteger(Self.streamClosed, at: at + 4)
                    changed = true
                }
                pending.removeAll()
                if let at = payload, at + 8 <= buffer.writerIndex, buffer.getInteger(at: at + 4, as: UInt32.self) != 0 {
                    connectionError = true
                }
            default:
                break
            }
        }
        let out = changed ? wrapOutboundOut(.byteBuffer(buffer)) : data
        guard connectionError else {
            context.write(out, promise: promise)
            return
        }
        let written = promise ?? context.eventLoop.makePromise()
        written.futureResult.assumeIsolated().whenComplete { _ in context.close(promise: nil) }
        context.write(out, promise: written)
    }
}

/// Follows HTTP/2 frame boundaries across buffers: calls back with each
/// frame's type, flags, stream and where its payload starts in the buffer
/// that finished its header (nil if the header ended in an earlier one).
struct FrameScanner {
    var skip: Int
    private var header: [UInt8] = []

    init(skip: Int) { self.skip = skip; header.reserveCapacity(9) }

    mutating func scan(_ buffer: ByteBuffer, _ onFrame: (UInt8, UInt8, UInt32, Int?) -> Void) {
        var i = buffer.readerIndex
        let end = buffer.writerIndex
        while i < end {
            if skip > 0 {
                let n = min(skip, end - i)
                skip -= n; i += n
                continue
            }
            let n = min(9 - header.count, end - i)
            for k in 0..<n { header.append(buffer.getInteger(at: i + k, as: UInt8.self)!) }
            i += n
            guard header.count == 9 else { continue }
            let length = Int(header[0]) << 16 | Int(header[1]) << 8 | Int(header[2])
            let stream = (UInt32(header[5]) << 24 | UInt32(header[6]) << 16 | UInt32(header[7]) << 8 | UInt32(header[8])) & 0x7FFF_FFFF
            onFrame(header[3], header[4], stream, i)
            header.removeAll(keepingCapacity: true)
            skip = length
        }
    }
}
