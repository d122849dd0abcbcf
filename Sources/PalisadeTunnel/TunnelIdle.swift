import NIOCore
import PalisadeRelay

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
    private let timeout: TimeAmount
    private var open = 0
    /// Lazy: a connection whose streams come and go one at a time (a new
    /// caller connection per request) only moves the deadline.
    private let deadline: LazyDeadline

    init(channel: Channel, timeout: TimeAmount) {
        self.timeout = timeout
        deadline = LazyDeadline(on: channel.eventLoop) { channel.close(promise: nil) }
        deadline.arm(in: timeout)
        channel.closeFuture.assumeIsolated().whenComplete { [deadline] _ in deadline.stop() }
    }

    func streamOpened(_ stream: Channel) {
        stream.eventLoop.assertInEventLoop()
        open += 1
        deadline.clear()
        stream.closeFuture.assumeIsolated().whenComplete { [self] _ in
            open -= 1
            if open == 0 { deadline.arm(in: timeout) }
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
