import Foundation
import NIOConcurrencyHelpers
import NIOCore
import PalisadeL7
import PalisadeRelay
import NIOPosix
import PalisadeIdentity

/// Where an accepted, kernel-redirected connection goes: one destination,
/// or for a global service several, in order of preference (locality, then
/// health); the proxy tries them in turn, so a failed endpoint costs the
/// caller nothing but a retry.
public struct OutboundRoute: Sendable {
    public struct Candidate: Sendable {
        /// The agent of the endpoint's node; nil for an endpoint on this node
        /// (connected directly, marked with the caller's identity).
        public var peer: TunnelPeer?
        public var host: String
        public var port: Int
        public init(peer: TunnelPeer?, host: String, port: Int) { self.peer = peer; self.host = host; self.port = port }
        /// "ip:port" or "[ip6]:port" (the CONNECT authority).
        public var authority: String { HostPort(host: host, port: port).description }
        /// Identifies the endpoint for outlier detection.
        public var key: String { "\(peer?.description ?? "local")/\(authority)" }
    }
    /// HTTP rules for a destination on this node: the agent's proxy judges
    /// each request (remote destinations are judged by their own agent).
    public struct HTTP: Sendable {
        public var destination: String
        public var gate: HTTPGate
        /// Do the rules look at headers? If not, the proxy does not collect them.
        public var usesHeaders: Bool
        /// Set when the rules name JWT identities.
        public var verifyBearer: BearerVerifier?
        public var appProtocol: L7AppProtocol
        public init(destination: String, usesHeaders: Bool = true, verifyBearer: BearerVerifier? = nil, appProtocol: L7AppProtocol = .detect,
                    gate: @escaping HTTPGate) {
            self.destination = destination; self.usesHeaders = usesHeaders; self.verifyBearer = verifyBearer; self.appProtocol = appProtocol
            self.gate = gate
        }
    }
    public var credentials: ClientCredentials
    public var candidates: [Candidate]
    public var http: HTTP?
    /// The calling workload's address (told to the receiving agent).
    public var caller: String?
    /// SO_MARK for direct connections (the caller's identity).
    public var mark: UInt32
    public init(credentials: ClientCredentials, candidates: [Candidate], mark: UInt32, http: HTTP? = nil) {
        self.credentials = credentials; self.candidates = candidates; self.mark = mark; self.http = http
    }
    /// One tunnelled candidate for `authority` (HOST:PORT; an unreadable
    /// one gets port 0, which no connection reaches).
    public init(peer: TunnelPeer, credentials: ClientCredentials, authority: String) {
        let target = HostPort(authority) ?? HostPort(host: authority, port: 0)
        self.init(credentials: credentials, candidates: [Candidate(peer: peer, host: target.host, port: target.port)], mark: 0)
    }
    public var peer: TunnelPeer? { candidates.first?.peer }
    public var authority: String { candidates.first?.authority ?? "?" }
}

/// Passive health: an endpoint that fails to connect is ejected for a
/// while (doubling on repeated failures, up to 30 s); after that it is tried
/// again, and one success restores it.
public final class OutlierDetector: Sendable {
    private struct Ejection: Sendable { var failures: Int; var until: Date }
    private let state = NIOLockedValueBox<[String: Ejection]>([:])
    public let baseEjection: TimeInterval
    public static let longestEjection: TimeInterval = 30
    public init(baseEjection: TimeInterval = 2) { self.baseEjection = baseEjection }

    public func failed(_ key: String, now: Date = Date()) {
        let base = baseEjection
        state.withLockedValue { state in
            let n = (state[key]?.failures ?? 0) + 1
            state[key] = Ejection(failures: n, until: now.addingTimeInterval(min(base * pow(2, Double(n - 1)), Self.longestEjection)))
        }
    }
    public func succeeded(_ key: String) { _ = state.withLockedValue { $0.removeValue(forKey: key) } }
    public func isEjected(_ key: String, now: Date = Date()) -> Bool { state.withLockedValue { ($0[key]?.until ?? .distantPast) > now } }
}

/// An accepted connection on the outbound listener: the caller's address
/// and the address it reached (both as 16-byte IPv4-mapped/IPv6 forms).
public struct AcceptedConnection: Sendable {
    public var client: [UInt8]
    public var clientPort: UInt16
    public var local: [UInt8]
    public var localPort: UInt16
}

/// What happened to one outbound connection (logs, metrics, tests).
public struct OutboundOutcome: Sendable {
    public var route: OutboundRoute?
    public var error: String?
    public var seconds: Double
}

/// The agent's outbound listener. The kernel's connect hooks send enrolled
/// workloads' connections to remote workloads here; each one is looked up
/// (resolve: the kernel's record of its origin and caller, by address
/// tuple) and carried through a pooled tunnel stream. A connection the
/// kernel did not redirect, or that cannot be carried, is reset at once so
/// the caller sees a prompt failure, not a hang.
public final class OutboundProxy: @unchecked Sendable {
    let channel: Channel
    /// One pool per event loop: an accepted connection and the tunnel stream
    /// carrying it live on the same loop (no locks, no hops), and each loop
    /// keeps its own connections to peer agents.
    public let pools: [TunnelPool]
    public var pool: TunnelPool { pools[0] }
    public var localPort: Int { channel.localAddress?.port ?? 0 }
    public var onOutcome: (@Sendable (OutboundOutcome) -> Void)?
    /// Requests judged by the proxy for this node's destinations.
    public var accessLog: HTTPRecorderFactory?
    /// How long a caller to an HTTP-ruled port may stay silent at first.
    public var firstBytesTimeout = TimeAmount.seconds(15)

    /// Serves on every loop of `group`, with a pool per loop from `makePool`.
    public let outliers: OutlierDetector

    public init(port: Int, group: EventLoopGroup, makePool: (EventLoop) -> TunnelPool, outliers: OutlierDetector = OutlierDetector(),
                resolve: @escaping @Sendable (AcceptedConnection) -> OutboundRoute?) throws {
        self.outliers = outliers
        let pools = group.makeIterator().map(makePool)
        self.pools = pools
        let weakSelf = WeakReference<OutboundProxy>()
        let byLoop = Dictionary(uniqueKeysWithValues: pools.map { (ObjectIdentifier($0.eventLoop), $0) })
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(ChannelOptions.socketOption(.so_reuseaddr), value: 1)
            .serverChannelOption(ChannelOptions.backlog, value: 4096)
            .childChannelOption(ChannelOptions.socketOption(.tcp_nodelay), value: 1)
            .childChannelOption(ChannelOptions.allowRemoteHalfClosure, value: true)
            .childChannelInitializer { ch in
                let start = Date()
                guard let accepted = OutboundProxy.addresses(of: ch), let route = resolve(accepted) else {
                    weakSelf.object?.onOutcome?(OutboundOutcome(route: nil, error: "not a redirected connection", seconds: 0))
                    return OutboundProxy.reset(ch)
                }
                if let http = route.http, let c = route.candidates.first, c.peer == nil {
                    let l7 = L7Context(gate: http.gate, usesHeaders: http.usesHeaders, verifyBearer: http.verifyBearer, appProtocol: http.appProtocol, source: route.credentials.spiffeID.description, destination: http.destination,
                                       destinationAddress: c.authority, log: weakSelf.object?.accessLog?(route.credentials.spiffeID.description, http.destination))
                    OutboundProxy.deliverHTTP(ch, to: c, mark: route.mark, l7: l7, firstBytesTimeout: weakSelf.object?.firstBytesTimeout ?? .seconds(15)) { error in
                        weakSelf.object?.onOutcome?(OutboundOutcome(route: route, error: error, seconds: Date().timeIntervalSince(start)))
                    }
                    return ch.eventLoop.makeSucceededVoidFuture()
                }
                guard let pool = byLoop[ObjectIdentifier(ch.eventLoop)] else { return OutboundProxy.reset(ch) }
                // The caller's half of the glue holds what it sends until a
                // destination answered, whichever endpoint that is.
                let tcpGlue = GlueHandler()
                do { try ch.pipeline.syncOperations.addHandler(tcpGlue) } catch { return ch.eventLoop.makeFailedFuture(error) }
                OutboundProxy.attempt(route, 0, ch, tcpGlue, pool, outliers, lastError: "no endpoint") { error in
                    weakSelf.object?.onOutcome?(OutboundOutcome(route: route, error: error, seconds: Date().timeIntervalSince(start)))
                }
                return ch.eventLoop.makeSucceededVoidFuture()
            }
        // One dual-stack socket serves IPv4 (as mapped addresses) and IPv6.
        do {
            channel = try bootstrap.bind(host: "::", port: port).wait()
        } catch {
            channel = try bootstrap.bind(host: "0.0.0.0", port: port).wait()
        }
        weakSelf.set(self)
    }

    /// Tries candidate `i`, then the next ones; `done` gets nil or the last error.
    static func attempt(_ route: OutboundRoute, _ i: Int, _ ch: Channel, _ tcpGlue: GlueHandler, _ pool: TunnelPool, _ outliers: OutlierDetector,
                        lastError: String, done: @escaping @Sendable (String?) -> Void) {
        guard i < route.candidates.count else {
            done(lastError)
            _ = reset(ch)
            return
        }
        let c = route.candidates[i]
        let otherGlue = GlueHandler()
        tcpGlue.attach(otherGlue)
        let connected: EventLoopFuture<Void>
        if let peer = c.peer {
            otherGlue.isStream = true
            connected = pool.openStream(peer: peer, credentials: route.credentials, authority: c.authority, caller: route.caller, glue: otherGlue)
        } else {
            connected = markedConnection(on: ch.eventLoop, mark: route.mark, connectTimeout: .seconds(2))
                .channelInitializer { out in out.eventLoop.makeCompletedFuture { try out.pipeline.syncOperations.addHandler(otherGlue) } }
                .connect(host: c.host, port: c.port)
                .map { _ in }
        }
        connected.hop(to: ch.eventLoop).whenComplete { result in
            switch result {
            case .success:
                outliers.succeeded(c.key)
                done(nil)
            case .failure(let e):
                // A refusal by policy says nothing about the endpoint's health.
                if (e as? TunnelError)?.status != 403 { outliers.failed(c.key) }
                attempt(route, i + 1, ch, tcpGlue, pool, outliers, lastError: "\(c.authority): \(e)", done: done)
            }
        }
    }

    /// A caller on this node reaching a workload of this node whose port has
    /// HTTP rules: the agent connects to it (marked with the caller's
    /// identity, so the kernel judges the delivery by identity) and puts the
    /// HTTP proxy between the two. Nothing is read from either side before.
    static func deliverHTTP(_ ch: Channel, to c: OutboundRoute.Candidate, mark: UInt32, l7: L7Context, firstBytesTimeout: TimeAmount,
                            done: @escaping @Sendable (String?) -> Void) {
        let sniffer = L7ProtocolSniffer(upstream: nil, l7: l7, firstBytesTimeout: firstBytesTimeout)
        do { try ch.pipeline.syncOperations.addHandler(sniffer) } catch {
            _ = reset(ch)
            return done("\(error)")
        }
        markedConnection(on: ch.eventLoop, mark: mark, connectTimeout: .seconds(2), proxied: true)
            .connect(host: c.host, port: c.port)
            .hop(to: ch.eventLoop)
            .whenComplete { result in
                switch result {
                case .success(let upstream):
                    ch.closeFuture.whenComplete { _ in upstream.close(promise: nil) }
                    sniffer.upstreamReady(upstream)
                    done(nil)
                case .failure(let e):
                    _ = reset(ch)
                    done("\(c.authority): \(e)")
                }
            }
    }

    /// Closes with a reset (SO_LINGER 0): the caller's read or write fails
    /// at once with ECONNRESET.
    static func reset(_ ch: Channel) -> EventLoopFuture<Void> {
        guard let provider = ch as? SocketOptionProvider else { return ch.close().recover { _ in } }
        return provider.setSoLinger(linger(l_onoff: 1, l_linger: 0))
            .flatMap { ch.close() }
            .recover { _ in }
    }

    static func addresses(of ch: Channel) -> AcceptedConnection? {
        guard let r = ch.remoteAddress, let l = ch.localAddress, let rp = r.port, let lp = l.port,
              let rb = r.addressBytes16, let lb = l.addressBytes16 else { return nil }
        return AcceptedConnection(client: rb, clientPort: UInt16(rp), local: lb, localPort: UInt16(lp))
    }

    public func stop() {
        try? channel.close().wait()
    }
}

