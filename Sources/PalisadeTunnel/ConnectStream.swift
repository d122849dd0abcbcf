import NIOCore
import PalisadeL7
import PalisadeRelay
import NIOHTTP2

/// Turns an HTTP/2 CONNECT stream, once established, into a byte stream:
/// DATA frames in and out, END_STREAM as end of input / close of output,
/// so GlueHandler can join it to a TCP connection.
final class ConnectStreamCodec: ChannelDuplexHandler, @unchecked Sendable {
    typealias InboundIn = HTTP2Frame.FramePayload
    typealias InboundOut = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = HTTP2Frame.FramePayload

    private var outputClosed = false

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .data(let d):
            if case .byteBuffer(let b) = d.data, b.readableBytes > 0 { context.fireChannelRead(wrapInboundOut(b)) }
            if d.endStream {
                context.fireChannelReadComplete()
                context.fireUserInboundEventTriggered(ChannelEvent.inputClosed)
            }
        case .rstStream:
            context.close(promise: nil)
        case .headers(let h) where h.endStream:
            context.fireUserInboundEventTriggered(ChannelEvent.inputClosed)
        default:
            break   // trailers, window updates, priority: nothing for the byte stream
        }
    }

    /// Small writes wait for the flush and leave as one DATA frame: the
    /// L7 proxy writes each frame of the inner HTTP/2 connection (a 9-octet
    /// header, then its payload) separately, and a tunnel frame (and a TLS
    /// record) for each cost more than the bytes. Large writes go as they are.
    static let coalesceBelow = 4096
    static let frameLimit = 16384
    private var pending: ByteBuffer?
    private var pendingPromise: EventLoopPromise<Void>?

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        var b = unwrapOutboundIn(data)
        if b.readableBytes >= Self.coalesceBelow || (pending?.readableBytes ?? 0) + b.readableBytes > Self.frameLimit {
            emitPending(context)
            if b.readableBytes >= Self.coalesceBelow {
                context.write(wrapOutboundOut(.data(.init(data: .byteBuffer(b)))), promise: promise)
                return
            }
        }
        if pending == nil { pending = b } else { pending!.writeBuffer(&b) }
        if let promise {
            if let p = pendingPromise { p.futureResult.cascade(to: promise) } else { pendingPromise = promise }
        }
    }

    private func emitPending(_ context: ChannelHandlerContext) {
        guard let b = pending else { return }
        let promise = pendingPromise
        pending = nil
        pendingPromise = nil
        context.write(wrapOutboundOut(.data(.init(data: .byteBuffer(b)))), promise: promise)
    }

    private func dropPending() {
        let promise = pendingPromise
        pending = nil
        pendingPromise = nil
        promise?.fail(ChannelError.ioOnClosedChannel)
    }

    func handlerRemoved(context: ChannelHandlerContext) { dropPending() }

    func flush(context: ChannelHandlerContext) {
        emitPending(context)
        context.flush()
    }

    func close(context: ChannelHandlerContext, mode: CloseMode, promise: EventLoopPromise<Void>?) {
        guard mode == .output else {
            dropPending()   // (unflushed writes die with the channel)
            context.close(mode: mode, promise: promise)
            return
        }
        guard !outputClosed else {
            promise?.succeed(())
            return
        }
        outputClosed = true
        emitPending(context)
        let end = HTTP2Frame.FramePayload.data(.init(data: .byteBuffer(ByteBuffer()), endStream: true))
        context.writeAndFlush(wrapOutboundOut(end), promise: promise)
    }
}
