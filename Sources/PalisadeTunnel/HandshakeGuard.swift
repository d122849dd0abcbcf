import NIOConcurrencyHelpers
import NIOCore
import NIOTLS

/// Limits for accepted connections that have not finished their TLS
/// handshake: anyone who can reach the port can open them, and each holds a
/// file descriptor and handshake state.
public struct HandshakeLimits: Sendable {
    /// A connection still handshaking after this is closed.
    public var timeout: TimeAmount
    /// At most this many connections handshaking at once, and from one address.
    public var maxPending: Int
    public var maxPendingPerSource: Int
    public init(timeout: TimeAmount = .seconds(10), maxPending: Int = 1024, maxPendingPerSource: Int = 64) {
        self.timeout = timeout; self.maxPending = maxPending; self.maxPendingPerSource = maxPendingPerSource
    }
}

/// Why a connection was refused or closed before its handshake completed.
public enum HandshakeRefusal: String, Sendable, CaseIterable {
    case tooManyPending = "too-many-handshakes"
    case tooManyFromSource = "too-many-handshakes-from-source"
    case timeout = "handshake-timeout"
}

/// The connections of one listener still handshaking, overall and by
/// source address (shared by the listener's event loops).
public final class PendingHandshakes: Sendable {
    public init() {}
    private let counts = NIOLockedValueBox<(total: Int, bySource: [String: Int])>((0, [:]))

    /// Counts the connection in, or says why it is refused.
    public func admit(_ source: String, _ limits: HandshakeLimits) -> HandshakeRefusal? {
        counts.withLockedValue { c in
            if c.total >= limits.maxPending { return .tooManyPending }
            if c.bySource[source, default: 0] >= limits.maxPendingPerSource { return .tooManyFromSource }
            c.total += 1
            c.bySource[source, default: 0] += 1
            return nil
        }
    }

    public func release(_ source: String) {
        counts.withLockedValue { c in
            c.total -= 1
            let n = c.bySource[source, default: 1] - 1
            c.bySource[source] = n > 0 ? n : nil
        }
    }

    public var total: Int { counts.withLockedValue { $0.total } }
}

/// Sits after the TLS handler of an admitted connection: closes it when the
/// handshake has not completed by the deadline, and gives its place back
/// when the handshake completes or the connection ends.
public final class HandshakeGuard: ChannelInboundHandler, RemovableChannelHandler {
    public typealias InboundIn = NIOAny
    private let pending: PendingHandshakes
    private let source: String
    private let timeout: TimeAmount
    private let onTimeout: () -> Void
    private var deadline: Scheduled<Void>?
    private var counted = true

    public init(pending: PendingHandshakes, source: String, timeout: TimeAmount, onTimeout: @escaping () -> Void) {
        self.pending = pending; self.source = source; self.timeout = timeout; self.onTimeout = onTimeout
    }

    public func handlerAdded(context: ChannelHandlerContext) {
        let channel = context.channel
        deadline = context.eventLoop.assumeIsolated().scheduleTask(in: timeout) { [self] in
            onTimeout()
            release()
            channel.close(promise: nil)
        }
    }

    private func release() {
        deadline?.cancel()
        if counted { counted = false; pending.release(source) }
    }

    public func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case TLSUserEvent.handshakeCompleted = event {
            release()
            context.fireUserInboundEventTriggered(event)
            context.pipeline.syncOperations.removeHandler(self, promise: nil)
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    public func channelInactive(context: ChannelHandlerContext) {
        release()
        context.fireChannelInactive()
    }
}
