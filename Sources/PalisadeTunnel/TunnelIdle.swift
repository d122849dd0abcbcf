import NIOCore

/// How long the tunnel's receiving side keeps what nobody uses: a peer's
/// connection with no stream open, and a stream (one proxied connection)
/// with no bytes either way (as Envoy's tcp_proxy idle_timeout, 1 h).
public struct TunnelTimeouts: Sendable {
    public var connectionIdle: TimeAmount
    public var streamIdle: TimeAmount
    public init(connectionIdle: TimeAmount = .minutes(10), streamIdle: TimeAmount = .hours(1)) {
        self.connectionIdle = connectionIdle; self.streamIdle = streamIdle
    }
}

/// A peer's tunnel connection: counts its open streams (as they are
/// initialized and as they close, on the connection's event loop) and
/// closes the connection once none has been open for the idle timeout (the
/// peer's pool opens a new one when it needs it).
final class TunnelConnectionIdle {
    private let channel: Channel
    private let timeout: TimeAmount
    private var open = 0
    private var deadline: Scheduled<Void>?

    init(channel: Channel, timeout: TimeAmount) {
        self.channel = channel; self.timeout = timeout
        arm()
        channel.closeFuture.assumeIsolated().whenComplete { [self] _ in deadline?.cancel() }
    }

    private func arm() {
        let channel = self.channel
        deadline = channel.eventLoop.assumeIsolated().scheduleTask(in: timeout) { channel.close(promise: nil) }
    }

    func streamOpened(_ stream: Channel) {
        channel.eventLoop.assertInEventLoop()
        open += 1
        deadline?.cancel()
        deadline = nil
        stream.closeFuture.assumeIsolated().whenComplete { [self] _ in
            open -= 1
            if open == 0 { arm() }
        }
    }
}

/// On a tunnel stream, after NIO's IdleStateHandler: a stream with no bytes
/// either way for the idle timeout is closed (and with it the connection
/// to the workload).
final class CloseWhenIdle: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = NIOAny
    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if event is IdleStateHandler.IdleStateEvent {
            context.close(promise: nil)
            return
        }
        context.fireUserInboundEventTriggered(event)
    }
}
