import Foundation
import NIOCore
import NIOPosix
import PalisadeIdentity

/// Where an accepted, kernel-redirected connection goes.
public struct OutboundRoute: Sendable {
    public var peer: TunnelPeer
    public var credentials: ClientCredentials
    /// The original destination, "ip:port" or "[ip6]:port".
    public var authority: String
    public init(peer: TunnelPeer, credentials: ClientCredentials, authority: String) {
        self.peer = peer; self.credentials = credentials; self.authority = authority
    }
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

    /// Serves on every loop of `group`, with a pool per loop from `makePool`.
    public init(port: Int, group: EventLoopGroup, makePool: (EventLoop) -> TunnelPool,
                resolve: @escaping @Sendable (AcceptedConnection) -> OutboundRoute?) throws {
        let pools = group.makeIterator().map(makePool)
        self.pools = pools
        weak var weakSelf: OutboundProxy?
        let byLoop = Dictionary(uniqueKeysWithValues: pools.map { (ObjectIdentifier($0.eventLoop), $0) })
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(ChannelOptions.socketOption(.so_reuseaddr), value: 1)
            .serverChannelOption(ChannelOptions.backlog, value: 4096)
            .childChannelOption(ChannelOptions.socketOption(.tcp_nodelay), value: 1)
            .childChannelOption(ChannelOptions.allowRemoteHalfClosure, value: true)
            .childChannelInitializer { ch in
                let start = Date()
                guard let accepted = OutboundProxy.addresses(of: ch), let route = resolve(accepted) else {
                    weakSelf?.onOutcome?(OutboundOutcome(route: nil, error: "not a redirected connection", seconds: 0))
                    return OutboundProxy.reset(ch)
                }
                guard let pool = byLoop[ObjectIdentifier(ch.eventLoop)] else { return OutboundProxy.reset(ch) }
                let (tcpGlue, streamGlue) = GlueHandler.pair()
                streamGlue.isStream = true
                do { try ch.pipeline.syncOperations.addHandler(tcpGlue) } catch { return ch.eventLoop.makeFailedFuture(error) }
                pool.openStream(peer: route.peer, credentials: route.credentials, authority: route.authority, glue: streamGlue)
                    .whenComplete { result in
                        switch result {
                        case .success:
                            weakSelf?.onOutcome?(OutboundOutcome(route: route, error: nil, seconds: Date().timeIntervalSince(start)))
                        case .failure(let e):
                            weakSelf?.onOutcome?(OutboundOutcome(route: route, error: "\(e)", seconds: Date().timeIntervalSince(start)))
                            _ = OutboundProxy.reset(ch)
                        }
                    }
                return ch.eventLoop.makeSucceededVoidFuture()
            }
        // One dual-stack socket serves IPv4 (as mapped addresses) and IPv6.
        do {
            channel = try bootstrap.bind(host: "::", port: port).wait()
        } catch {
            channel = try bootstrap.bind(host: "0.0.0.0", port: port).wait()
        }
        weakSelf = self
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
              let rb = bytes16(r), let lb = bytes16(l) else { return nil }
        return AcceptedConnection(client: rb, clientPort: UInt16(rp), local: lb, localPort: UInt16(lp))
    }

    static func bytes16(_ a: SocketAddress) -> [UInt8]? {
        switch a {
        case .v4(let v4):
            var addr = v4.address.sin_addr
            return [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff] + withUnsafeBytes(of: &addr) { Array($0) }
        case .v6(let v6):
            var addr = v6.address.sin6_addr
            return withUnsafeBytes(of: &addr) { Array($0) }
        default:
            return nil
        }
    }

    public func stop() {
        try? channel.close().wait()
    }
}

