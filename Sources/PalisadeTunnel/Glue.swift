import NIOCore
import NIOHTTP2
import NIOPosix
import Glibc

/// Joins two channels on the same event loop byte for byte: what one reads
/// the other writes, with backpressure (a side stops reading while its
/// partner cannot write) and half-close (end of input on one side closes
/// the partner's output; the pair closes when both directions are done).
final class GlueHandler: ChannelDuplexHandler, @unchecked Sendable {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private var partner: GlueHandler?
    /// An HTTP/2 stream closes by itself once END_STREAM went both ways;
    /// closing it explicitly could reset it with frames still queued
    /// behind flow control.
    var isStream = false
    private var context: ChannelHandlerContext?
    private var pendingRead = false
    private var inputClosed = false
    private var failed = false
    private var early: [NIOAny] = []
    private var earlyInputClosed = false

    /// Two handlers that forward to each other; add one to each channel.
    static func pair() -> (GlueHandler, GlueHandler) {
        let a = GlueHandler(), b = GlueHandler()
        a.partner = b
        b.partner = a
        return (a, b)
    }

    /// Both halves are in their pipelines and both channels are active.
    private var joined = false

    /// Gives this handler (already in its pipeline) a new partner: when one
    /// destination failed, the caller's bytes held so far go to the next.
    func attach(_ other: GlueHandler) {
        partner = other
        other.partner = self
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        tryJoin()
    }

    func channelActive(context: ChannelHandlerContext) {
        context.fireChannelActive()
        tryJoin()
        partner?.tryJoin()
    }

    /// The second half joining: bytes and reads held back until now flow.
    private func tryJoin() {
        guard !joined, let p = partner, let c = context, let pc = p.context, c.channel.isActive, pc.channel.isActive else { return }
        joined = true
        p.joined = true
        p.flushEarly()
        flushEarly()
        p.resumeRead()
        resumeRead()
    }

    private func flushEarly() {
        guard let context, !early.isEmpty || earlyInputClosed else { return }
        let held = early
        early = []
        for d in held { partnerWrite(d) }
        partnerFlush()
        if earlyInputClosed {
            earlyInputClosed = false
            userInboundEventTriggered(context: context, event: ChannelEvent.inputClosed)
        }
    }

    private func resumeRead() {
        if pendingRead {
            pendingRead = false
            context?.read()
        }
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
        partner = nil
    }

    private func partnerWrite(_ data: NIOAny) { partner?.context?.write(data, promise: nil) }
    private func partnerFlush() { partner?.context?.flush() }
    private func partnerWritable() -> Bool { partner?.context?.channel.isWritable ?? false }
    /// Ends the partner's output after what was written to it; once the
    /// partner's input has ended too, closes it (after the data, never
    /// before: closing an HTTP/2 stream with frames queued would reset it).
    private func partnerCloseOutput() {
        guard let p = partner, let ctx = p.context else { return }
        ctx.flush()
        let done = ctx.eventLoop.makePromise(of: Void.self)
        ctx.close(mode: .output, promise: done)
        done.futureResult.whenComplete { _ in
            if p.inputClosed && !p.isStream { ctx.close(promise: nil) }
        }
    }
    private func partnerClose() { partner?.context?.close(promise: nil) }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        // A channel's first read can happen before the other half joins
        // (NIO reads on activation): hold those bytes until it does.
        if !joined {
            early.append(data)
            return
        }
        partnerWrite(data)
    }

    func channelReadComplete(context: ChannelHandlerContext) { partnerFlush() }

    func channelInactive(context: ChannelHandlerContext) {
        guard joined else {
            // Not joined yet: a failed attempt (the proxy tries the next
            // destination) or a caller that left (the attempt fails).
            context.fireChannelInactive()
            return
        }
        // After a clean end the partner finishes on its own (its queued
        // bytes still go out); a side cut by an error cuts both.
        if failed {
            partnerClose()
        } else if !inputClosed {
            // NIO closes a socket without an input-closed event when EOF
            // arrives after our own output was shut: still a clean end.
            inputClosed = true
            partnerCloseOutput()
        }
        context.fireChannelInactive()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let e = event as? ChannelEvent, e == .inputClosed {
            if !joined {
                earlyInputClosed = true
                return
            }
            inputClosed = true
            partnerCloseOutput()
            // Our output was ended when the partner's input ended: both
            // directions are done on this channel.
            if partner?.inputClosed == true && !isStream { context.close(promise: nil) }
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        guard joined else {
            context.close(promise: nil)
            return
        }
        failed = true
        context.close(promise: nil)
        partnerClose()
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable { partner?.partnerBecameWritable() }
        context.fireChannelWritabilityChanged()
    }

    private func partnerBecameWritable() { resumeRead() }

    func read(context: ChannelHandlerContext) {
        if partnerWritable() {
            context.read()
        } else {
            pendingRead = true
        }
    }
}

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

/// A connection to a workload on this node, marked (SO_MARK) with the
/// caller's identity so the kernel judges it as coming from the caller.
/// Byte relays (glue) pass half-closes through; the HTTP proxy reads
/// nothing until it is in place (`proxied`: no auto-read, whole closes).
func markedConnection(on loop: EventLoop, mark: UInt32, connectTimeout: TimeAmount, proxied: Bool = false) -> ClientBootstrap {
    ClientBootstrap(group: loop)
        .connectTimeout(connectTimeout)
        .channelOption(ChannelOptions.socketOption(.tcp_nodelay), value: 1)
        .channelOption(ChannelOptions.allowRemoteHalfClosure, value: !proxied)
        .channelOption(ChannelOptions.autoRead, value: !proxied)
        .channelOption(ChannelOptions.Types.SocketOption(level: NIOBSDSocket.OptionLevel(rawValue: SOL_SOCKET),
                                                         name: NIOBSDSocket.Option(rawValue: SO_MARK)), value: Int(mark))
}
