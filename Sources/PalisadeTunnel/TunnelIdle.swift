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

/// On a tunnel stream: closes it (and with it the connection to the
/// workload) after `timeout` with no bytes either way. Reads and writes only
/// set a flag (NIO's IdleStateHandler reads the clock on every read and
/// attaches a promise and a callback to every write, on the busiest path of
/// the agent). A check every quarter of the timeout closes the stream after
/// four quiet checks in a row: between 1 and 1.25 timeouts of silence.
final class StreamIdleTimeout: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = NIOAny
    typealias OutboundIn = NIOAny
    private let period: TimeAmount
    private var active = false
    private var quietChecks = 0
    private var check: Scheduled<Void>?

    init(timeout: TimeAmount) { period = .nanoseconds(max(timeout.nanoseconds / 4, 1)) }

    func handlerAdded(context: ChannelHandlerContext) {
        if context.channel.isActive { arm(context) }
    }

    func channelActive(context: ChannelHandlerContext) {
        arm(context)
        context.fireChannelActive()
    }

    func channelInactive(context: ChannelHandlerContext) {
        disarm()
        context.fireChannelInactive()
    }

    func handlerRemoved(context: ChannelHandlerContext) { disarm() }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        active = true
        context.fireChannelRead(data)
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        active = true
        context.write(data, promise: promise)
    }

    private func arm(_ context: ChannelHandlerContext) {
        guard check == nil else { return }
        check = context.eventLoop.assumeIsolated().scheduleTask(in: period) { [self] in
            check = nil
            if active {
                active = false
                quietChecks = 0
            } else {
                quietChecks += 1
                if quietChecks >= 4 {
                    context.close(promise: nil)
                    return
                }
            }
            arm(context)
        }
    }

    private func disarm() {
        check?.cancel()
        check = nil
    }
}
