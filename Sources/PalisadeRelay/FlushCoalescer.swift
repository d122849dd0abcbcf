import NIOCore

/// On a tunnel connection, between TLS and HTTP/2: flushes asked for while
/// the event loop handles one batch of ready sockets become a single flush
/// once the batch is done, and the small writes before it one buffer.
///
/// Each stream's relay flushes as its workload's bytes arrive; several
/// workloads readable at once share one write system call. NIO's TLS
/// handler seals every write it is given as a TLS record of its own, and
/// NIO's HTTP/2 handler writes a DATA frame's 9-byte header and its payload
/// as two writes: without gathering, a small request costs two records or
/// more (plus one per WINDOW_UPDATE), each an AEAD seal here and an open on
/// the peer. Writes up to `smallWrite` bytes are copied into one buffer of
/// at most `recordSize` (one TLS record), and so is a larger one that still
/// fits in it; others go on as they are, after what was gathered, so the
/// order of the bytes never changes. A flush runs before any close, so
/// nothing written is lost.
package final class FlushCoalescer: ChannelOutboundHandler, RemovableChannelHandler {
    package typealias OutboundIn = IOData
    package typealias OutboundOut = IOData

    /// TLS's largest record (RFC 8446 §5.1).
    package static let recordSize = 16_384
    /// Copying up to this much costs less than a record of its own.
    package static let smallWrite = 4_096

    private var flushScheduled = false
    private var gathered: ByteBuffer?
    private var gatheredPromise: EventLoopPromise<Void>?
    /// The buffer gathered last, kept to gather into again: once TLS has
    /// sealed it (at the flush) nothing else holds it, and clearing it
    /// costs no allocation (a buffer and its storage per tick otherwise).
    private var spare: ByteBuffer?
    /// The end-of-tick flush, made once (a closure per tick otherwise);
    /// it holds this handler until handlerRemoved lets it go.
    private var endOfTick: (() -> Void)?

    package init() {}

    package func handlerAdded(context: ChannelHandlerContext) {
        endOfTick = { [self] in
            guard flushScheduled else { return }
            flushScheduled = false
            forwardGathered(context)
            context.flush()
        }
    }

    package func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        guard case .byteBuffer(var buffer) = unwrapOutboundIn(data),
              buffer.readableBytes <= Self.smallWrite || fitsGathered(buffer.readableBytes) else {
            forwardGathered(context)
            context.write(data, promise: promise)
            return
        }
        if !fitsGathered(buffer.readableBytes) { forwardGathered(context) }
        if gathered == nil {
            if var s = spare {
                spare = nil
                s.clear()   // (a new storage only if TLS still holds the old one)
                gathered = s
            } else {
                gathered = context.channel.allocator.buffer(capacity: 2048)
            }
        }
        gathered!.writeBuffer(&buffer)
        if let promise {
            if let all = gatheredPromise { all.futureResult.cascade(to: promise) } else { gatheredPromise = promise }
        }
    }

    package func flush(context: ChannelHandlerContext) {
        guard !flushScheduled else { return }
        guard let endOfTick else {   // (removed from its pipeline: at once)
            forwardGathered(context)
            return context.flush()
        }
        flushScheduled = true
        // Tasks run after the loop has handled every socket of this wake-up.
        context.eventLoop.assumeIsolated().execute(endOfTick)
    }

    package func close(context: ChannelHandlerContext, mode: CloseMode, promise: EventLoopPromise<Void>?) {
        flushNow(context)
        context.close(mode: mode, promise: promise)
    }

    package func handlerRemoved(context: ChannelHandlerContext) {
        flushNow(context)
        endOfTick = nil
        spare = nil
    }

    /// A larger write (a DATA payload after its frame header) joins what
    /// was gathered when both fit in one record.
    private func fitsGathered(_ count: Int) -> Bool {
        guard let g = gathered else { return false }
        return g.readableBytes + count <= Self.recordSize
    }

    private func forwardGathered(_ context: ChannelHandlerContext) {
        guard let g = gathered else { return }
        gathered = nil
        let promise = gatheredPromise
        gatheredPromise = nil
        if g.capacity <= Self.recordSize * 2 { spare = g }
        context.write(wrapOutboundOut(.byteBuffer(g)), promise: promise)
    }

    private func flushNow(_ context: ChannelHandlerContext) {
        forwardGathered(context)
        guard flushScheduled else { return }
        flushScheduled = false
        context.flush()
    }
}
