import NIOCore

/// On a tunnel connection, between TLS and HTTP/2: flushes asked for while
/// the event loop handles one batch of ready sockets become a single flush
/// once the batch is done. Each stream's relay flushes as its workload's
/// bytes arrive; several workloads readable at once would each cost a TLS
/// record and a write system call, and now share them. A flush runs before
/// any close, so nothing written is lost.
package final class FlushCoalescer: ChannelOutboundHandler, RemovableChannelHandler {
    package typealias OutboundIn = Any
    private var flushScheduled = false

    package init() {}

    package func flush(context: ChannelHandlerContext) {
        guard !flushScheduled else { return }
        flushScheduled = true
        // Tasks run after the loop has handled every socket of this wake-up.
        context.eventLoop.assumeIsolated().execute { [self] in
            guard flushScheduled else { return }
            flushScheduled = false
            context.flush()
        }
    }

    package func close(context: ChannelHandlerContext, mode: CloseMode, promise: EventLoopPromise<Void>?) {
        flushNow(context)
        context.close(mode: mode, promise: promise)
    }

    package func handlerRemoved(context: ChannelHandlerContext) { flushNow(context) }

    private func flushNow(_ context: ChannelHandlerContext) {
        guard flushScheduled else { return }
        flushScheduled = false
        context.flush()
    }
}
