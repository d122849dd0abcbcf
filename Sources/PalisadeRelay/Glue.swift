import NIOCore
import NIOPosix
import Glibc

/// Joins two channels on the same event loop byte for byte: what one reads
/// the other writes, with backpressure (a side stops reading while its
/// partner cannot write) and half-close (end of input on one side closes
/// the partner's output; the pair closes when both directions are done).
package final class GlueHandler: ChannelDuplexHandler, @unchecked Sendable {
    package init() {}
    package typealias InboundIn = ByteBuffer
    package typealias OutboundIn = ByteBuffer
    package typealias OutboundOut = ByteBuffer

    private var partner: GlueHandler?
    /// An HTTP/2 stream closes by itself once END_STREAM went both ways;
    /// closing it explicitly could reset it with frames still queued
    /// behind flow control.
    package var isStream = false
    private var context: ChannelHandlerContext?
    private var pendingRead = false
    private var inputClosed = false
    private var failed = false
    private var early: [NIOAny] = []
    private var earlyInputClosed = false

    /// Two handlers that forward to each other; add one to each channel.
    package static func pair() -> (GlueHandler, GlueHandler) {
        let a = GlueHandler(), b = GlueHandler()
        a.partner = b
        b.partner = a
        return (a, b)
    }

    /// Both halves are in their pipelines and both channels are active.
    private var joined = false

    /// Gives this handler (already in its pipeline) a new partner: when one
    /// destination failed, the caller's bytes held so far go to the next.
    package func attach(_ other: GlueHandler) {
        partner = other
        other.partner = self
    }

    package func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        tryJoin()
    }

    package func channelActive(context: ChannelHandlerContext) {
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

    package func handlerRemoved(context: ChannelHandlerContext) {
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
        done.futureResult.assumeIsolated().whenComplete { _ in
            if p.inputClosed && !p.isStream { ctx.close(promise: nil) }
        }
    }
    private func partnerClose() { partner?.context?.close(promise: nil) }

    package func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        // A channel's first read can happen before the other half joins
        // (NIO reads on activation): hold those bytes until it does.
        if !joined {
            early.append(data)
            return
        }
        partnerWrite(data)
    }

    package func channelReadComplete(context: ChannelHandlerContext) { partnerFlush() }

    package func channelInactive(context: ChannelHandlerContext) {
        guard joined else {
            // Not joined yet: a failed attempt (the proxy tries the next
            // destination) or a caller that left (the attempt fails).
            context.fireChannelInactive()
            return
        }
        // After a clean end the partner finishes on its own (its queued
        // bytes still go out); a side cut by an error cuts both. So do a
        // stream reset before its END_STREAM (an abort, not an end: the
        // partner must not see a clean EOF of a truncated transfer), and a
        // side gone while the partner's input is still open: nothing would
        // read it, and the partner's peer (its FIN queued behind unsent
        // bytes) would wait forever, holding both ends and the stream's
        // buffered frames.
        if failed || (isStream && !inputClosed) || partner?.inputClosed == false {
            partnerClose()
        } else if !inputClosed {
            // NIO closes a socket without an input-closed event when EOF
            // arrives after our own output was shut: still a clean end.
            inputClosed = true
            partnerCloseOutput()
        }
        context.fireChannelInactive()
    }

    package func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
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

    package func errorCaught(context: ChannelHandlerContext, error: Error) {
        guard joined else {
            context.close(promise: nil)
            return
        }
        failed = true
        context.close(promise: nil)
        partnerClose()
    }

    package func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable { partner?.partnerBecameWritable() }
        context.fireChannelWritabilityChanged()
    }

    private func partnerBecameWritable() { resumeRead() }

    package func read(context: ChannelHandlerContext) {
        if partnerWritable() {
            context.read()
        } else {
            pendingRead = true
        }
    }
}

/// A connection to a workload on this node, marked (SO_MARK) with the
/// caller's identity so the kernel judges it as coming from the caller.
/// Byte relays (glue) pass half-closes through; the HTTP proxy reads
/// nothing until it is in place (`proxied`: no auto-read, whole closes).
package func markedConnection(on loop: EventLoop, mark: UInt32, connectTimeout: TimeAmount, proxied: Bool = false) -> ClientBootstrap {
    ClientBootstrap(group: loop)
        .connectTimeout(connectTimeout)
        .channelOption(ChannelOptions.socketOption(.tcp_nodelay), value: 1)
        .channelOption(ChannelOptions.allowRemoteHalfClosure, value: !proxied)
        .channelOption(ChannelOptions.autoRead, value: !proxied)
        .channelOption(ChannelOptions.Types.SocketOption(level: NIOBSDSocket.OptionLevel(rawValue: SOL_SOCKET),
                                                         name: NIOBSDSocket.Option(rawValue: SO_MARK)), value: Int(mark))
}
