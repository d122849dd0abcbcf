import Foundation
import NIOConcurrencyHelpers
import NIOCore
import PalisadeRelay
import NIOHTTP1
import PalisadeIdentity

/// Tells HTTP/2 with prior knowledge (the connection preface) from
/// HTTP/1.x on a proxied byte stream, then puts the matching proxy on both
/// sides and hands it the bytes seen so far. The connection to the
/// workload may still be on its way: bytes are held until both are known.
package final class L7ProtocolSniffer: ChannelInboundHandler, RemovableChannelHandler, @unchecked Sendable {
    package typealias InboundIn = ByteBuffer
    package typealias InboundOut = ByteBuffer
    static let preface = Array("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".utf8)

    let l7: L7Context
    private var upstream: Channel?
    private var context: ChannelHandlerContext?
    private var seen = ByteBuffer()
    private var protocolHTTP2: Bool?
    private var inputClosed = false
    private var done = false

    /// A caller that sends nothing for this long is closed (it would
    /// otherwise hold a connection to the workload).
    let firstBytesTimeout: TimeAmount
    private var timeout: Scheduled<Void>?

    package init(upstream: Channel?, l7: L7Context, firstBytesTimeout: TimeAmount = .seconds(15)) {
        self.upstream = upstream; self.l7 = l7; self.firstBytesTimeout = firstBytesTimeout
    }

    package func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        timeout = context.eventLoop.assumeIsolated().scheduleTask(in: firstBytesTimeout) { [weak self] in
            guard let self, !self.done else { return }
            self.done = true
            context.close(promise: nil)
            self.upstream?.close(promise: nil)
        }
    }

    package func handlerRemoved(context: ChannelHandlerContext) {
        timeout?.cancel()
        self.context = nil
    }

    private var callerGone = false

    package func channelInactive(context: ChannelHandlerContext) {
        // The caller left before the proxy was in place.
        callerGone = true
        if !done { upstream?.close(promise: nil) }
        context.fireChannelInactive()
    }

    /// The workload's connection (connected without reading) is ready.
    package func upstreamReady(_ channel: Channel) {
        upstream = channel
        // (The caller's channel may not be active yet: a loopback connect
        // can finish before the accepted socket's registration.)
        if callerGone { channel.close(promise: nil); return }
        configureIfReady()
    }

    package func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var b = unwrapInboundIn(data)
        seen.writeBuffer(&b)
        guard protocolHTTP2 == nil else { return }
        if l7.appProtocol != .detect {
            // Declared: a damaged HTTP/2 preface is then HTTP/2's to refuse.
            protocolHTTP2 = l7.appProtocol == .http2
            configureIfReady()
            return
        }
        // "PRI " is HTTP/2's preface (no HTTP/1.1 method is called PRI):
        // from there NIO's HTTP/2 handler checks the rest, so a damaged
        // preface gets HTTP/2's answer (GOAWAY), not an HTTP/1.1 one.
        let bytes = seen.readableBytesView
        let n = min(bytes.count, 4)
        if !bytes.prefix(n).elementsEqual(Self.preface.prefix(n)) {
            protocolHTTP2 = false
        } else if n == 4 {
            protocolHTTP2 = true
        }
        configureIfReady()
    }

    package func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let e = event as? ChannelEvent, e == .inputClosed, !done {
            inputClosed = true
            if protocolHTTP2 == nil { protocolHTTP2 = l7.appProtocol == .http2 }
            configureIfReady()
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    private func configureIfReady() {
        guard !done, let context, let upstream, let http2 = protocolHTTP2 else { return }
        done = true
        let stream = context.channel
        do {
            if http2 {
                try H2Relay.install(downstream: stream, upstream: upstream, l7: l7)
            } else {
                try L7Gate.install(stream: stream, upstream: upstream, l7: l7, after: self)
            }
        } catch {
            stream.close(promise: nil)
            upstream.close(promise: nil)
            return
        }
        upstream.setOption(ChannelOptions.autoRead, value: true).whenSuccess { upstream.read() }
        let held = seen
        seen = ByteBuffer()
        if held.readableBytes > 0 { context.fireChannelRead(wrapInboundOut(held)) }
        context.fireChannelReadComplete()
        if inputClosed { context.fireUserInboundEventTriggered(ChannelEvent.inputClosed) }
        context.pipeline.syncOperations.removeHandler(self, promise: nil)
    }
}
