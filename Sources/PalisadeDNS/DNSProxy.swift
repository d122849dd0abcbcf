import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import PalisadePolicy
import PalisadeRelay

/// Who asked, and which resolver they meant: the kernel's record of a
/// redirected DNS datagram or connection.
public struct DNSOrigin: Sendable {
    public var resolver: IPAddress
    public var resolverPort: UInt16
    public var identity: UInt32
    public var cgroupID: UInt64
    public init(resolver: IPAddress, resolverPort: UInt16, identity: UInt32, cgroupID: UInt64) {
        self.resolver = resolver; self.resolverPort = resolverPort; self.identity = identity; self.cgroupID = cgroupID
    }
}

/// One query through the proxy, for flows, metrics and logs.
public struct DNSExchange: Sendable {
    public enum Result: String, Sendable, CaseIterable {
        /// Forwarded, answered; the answer's addresses are in the kernel.
        case answered
        /// The workload may not resolve this name (DNS rules): REFUSED.
        case refused
        /// The resolver did not answer in time, or could not be reached: SERVFAIL.
        case failed
        /// Not a datagram the kernel redirected, or not a DNS query: dropped.
        case unknownSource = "unknown-source"
        case malformed
    }
    public var origin: DNSOrigin?
    public var client: IPAddress
    public var name: String
    public var type: UInt16
    public var result: Result
    public var rcode: Int
    public var addresses: [IPAddress]
    public var tcp: Bool
    public var seconds: Double
}

/// What the proxy asks of the agent.
public struct DNSProxyHooks: Sendable {
    /// The kernel's record for a datagram (UDP) or an accepted connection
    /// (TCP, consumed): client address and port, the proxy's address and port.
    public var origin: @Sendable (_ client: IPAddress, _ clientPort: UInt16, _ local: IPAddress, _ localPort: UInt16, _ tcp: Bool) -> DNSOrigin?
    /// DNS rules: may this identity resolve this name?
    public var mayResolve: @Sendable (_ identity: UInt32, _ name: String) -> Bool
    /// Records the answer (cheap, on the event loop); returns the addresses
    /// whose names changed, which `commit` must put in the kernel.
    public var record: @Sendable (_ origin: DNSOrigin, _ answer: DNSMessage) -> LearnedNames
    /// Puts changed addresses in the kernel; returns when they are there.
    /// Runs on a thread of its own (it may wait for a new generation).
    public var commit: @Sendable (_ changed: LearnedNames) -> Void
    public var exchanged: @Sendable (DNSExchange) -> Void

    public init(origin: @escaping @Sendable (IPAddress, UInt16, IPAddress, UInt16, Bool) -> DNSOrigin?,
                mayResolve: @escaping @Sendable (UInt32, String) -> Bool,
                record: @escaping @Sendable (DNSOrigin, DNSMessage) -> LearnedNames,
                commit: @escaping @Sendable (LearnedNames) -> Void,
                exchanged: @escaping @Sendable (DNSExchange) -> Void) {
        self.origin = origin; self.mayResolve = mayResolve; self.record = record; self.commit = commit; self.exchanged = exchanged
    }
}

/// The agent's DNS proxy: UDP and TCP on one port of every address
/// (workloads reach it where they reach the outbound listener). Each query
/// is forwarded to the resolver the workload addressed, from the agent; the
/// answer goes back only once its addresses are in the kernel's maps, so
/// the workload's first connect() after the lookup is judged with them.
public final class DNSProxy: @unchecked Sendable {
    public let port: Int
    /// The UDP socket: the agent files it in pal_dns_proxy, whose entry
    /// vanishes when the socket closes (the hooks then let DNS go direct).
    public let udpDescriptor: CInt
    let udp: Channel
    let tcp: Channel
    let pool: NIOThreadPool
    static let upstreamTimeout: TimeAmount = .seconds(5)

    public init(port: Int, group: EventLoopGroup, hooks: DNSProxyHooks) throws {
        pool = NIOThreadPool(numberOfThreads: 1)
        pool.start()
        let fd = try DNSProxy.boundUDPSocket(port: port)
        udpDescriptor = fd
        let pool = self.pool
        udp = try DatagramBootstrap(group: group)
            .channelOption(ChannelOptions.receivePacketInfo, value: true)
            .channelInitializer { ch in
                ch.eventLoop.makeCompletedFuture { try ch.pipeline.syncOperations.addHandler(DNSUDPHandler(hooks: hooks, pool: pool)) }
            }
            .withBoundSocket(fd).wait()
        self.port = udp.localAddress?.port ?? port
        tcp = try ServerBootstrap(group: group)
            .serverChannelOption(ChannelOptions.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { ch in
                ch.eventLoop.makeCompletedFuture {
                    try ch.pipeline.syncOperations.addHandler(ByteToMessageHandler(DNSLengthFramer()))
                    try ch.pipeline.syncOperations.addHandler(DNSTCPHandler(hooks: hooks, pool: pool))
                }
            }
            .bind(host: "::", port: self.port).wait()
    }

    /// A dual-stack UDP socket on [::]:port that reports each datagram's
    /// destination address (IPv4 and IPv6): the key of the kernel's record
    /// includes the address the workload sent to.
    static func boundUDPSocket(port: Int) throws -> CInt {
        let fd = socket(AF_INET6, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw IOError(errnoCode: errno, reason: "socket") }
        var on: CInt = 1, off: CInt = 0
        let len = socklen_t(MemoryLayout<CInt>.size)
        setsockopt(fd, Int32(IPPROTO_IPV6), IPV6_V6ONLY, &off, len)
        setsockopt(fd, Int32(IPPROTO_IPV6), IPV6_RECVPKTINFO, &on, len)
        setsockopt(fd, Int32(IPPROTO_IP), IP_PKTINFO, &on, len)
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, len)
        var sa = sockaddr_in6()
        sa.sin6_family = sa_family_t(AF_INET6)
        sa.sin6_port = UInt16(port).bigEndian
        let r = withUnsafePointer(to: &sa) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in6>.size)) } }
        guard r == 0 else { let e = errno; close(fd); throw IOError(errnoCode: e, reason: "bind [::]:\(port)") }
        return fd
    }

    public func stop() {
        try? udp.close().wait()
        try? tcp.close().wait()
        try? pool.syncShutdownGracefully()
    }

    /// What one query becomes: REFUSED for a name the workload may not
    /// resolve; otherwise the resolver's answer, released once what it
    /// taught is in the kernel.
    static func answer(_ query: [UInt8], origin: DNSOrigin, client: IPAddress, tcp: Bool, hooks: DNSProxyHooks, pool: NIOThreadPool,
                       on loop: EventLoop, forward: @escaping @Sendable ([UInt8]) -> EventLoopFuture<[UInt8]>) -> EventLoopFuture<[UInt8]?> {
        let start = NIODeadline.now()
        @Sendable func done(_ q: DNSMessage?, _ result: DNSExchange.Result, _ rcode: Int, _ addresses: [IPAddress]) {
            hooks.exchanged(DNSExchange(origin: origin, client: client, name: q?.questionName ?? "", type: q?.questionType ?? 0, result: result,
                                        rcode: rcode, addresses: addresses, tcp: tcp,
                                        seconds: Double((NIODeadline.now() - start).nanoseconds) / 1e9))
        }
        guard let q = try? DNSMessage(query), !q.isResponse else {
            done(nil, .malformed, 1, [])
            return loop.makeSucceededFuture(nil)
        }
        guard hooks.mayResolve(origin.identity, q.questionName) else {
            done(q, .refused, DNSMessage.rcodeRefused, [])
            return loop.makeSucceededFuture(DNSMessage.reply(to: query, rcode: DNSMessage.rcodeRefused))
        }
        return forward(query).flatMap { answer -> EventLoopFuture<[UInt8]?> in
            guard let a = try? DNSMessage(answer), a.isResponse, a.id == q.id else {
                // Not something the parser reads: passed on as it came,
                // nothing learned (its addresses stay refused).
                done(q, .answered, -1, [])
                return loop.makeSucceededFuture(answer)
            }
            let addresses = a.resolvedAddresses().addresses.map(\.0)
            if addresses.isEmpty {
                done(q, .answered, a.rcode, [])
                return loop.makeSucceededFuture(answer)
            }
            // Most answers teach nothing new (the same addresses again):
            // released at once. New ones wait for the kernel.
            let changed = hooks.record(origin, a)
            if changed.isEmpty {
                done(q, .answered, a.rcode, addresses)
                return loop.makeSucceededFuture(answer)
            }
            return pool.runIfActive(eventLoop: loop) { hooks.commit(changed) }.map { _ in
                done(q, .answered, a.rcode, addresses)
                return answer
            }
        }.flatMapError { _ in
            done(q, .failed, DNSMessage.rcodeServFail, [])
            return loop.makeSucceededFuture(DNSMessage.reply(to: query, rcode: DNSMessage.rcodeServFail))
        }
    }
}

extension IPAddress {
    init?(_ s: SocketAddress) {
        guard let b = s.addressBytes16 else { return nil }
        self.init(bytes16: b)
    }

    var socketAddress: SocketAddress? { try? SocketAddress(ipAddress: description, port: 0) }
}

/// UDP: each datagram is a query; the answer goes back to its sender.
final class DNSUDPHandler: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = AddressedEnvelope<ByteBuffer>
    typealias OutboundOut = AddressedEnvelope<ByteBuffer>
    let hooks: DNSProxyHooks
    let pool: NIOThreadPool

    init(hooks: DNSProxyHooks, pool: NIOThreadPool) { self.hooks = hooks; self.pool = pool }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let envelope = unwrapInboundIn(data)
        let query = Array(envelope.data.readableBytesView)
        guard let client = IPAddress(envelope.remoteAddress), let clientPort = envelope.remoteAddress.port,
              let local = envelope.metadata?.packetInfo.flatMap({ IPAddress($0.destinationAddress) }),
              let localPort = context.channel.localAddress?.port,
              let origin = hooks.origin(client, UInt16(clientPort), local, UInt16(localPort), false) else {
            // Not redirected by the kernel: the proxy is not an open resolver.
            hooks.exchanged(DNSExchange(origin: nil, client: IPAddress(envelope.remoteAddress) ?? .v4(0, 0, 0, 0), name: "", type: 0,
                                        result: .unknownSource, rcode: -1, addresses: [], tcp: false, seconds: 0))
            return
        }
        let loop = context.eventLoop
        let channel = context.channel
        let remote = envelope.remoteAddress
        DNSProxy.answer(query, origin: origin, client: client, tcp: false, hooks: hooks, pool: pool, on: loop) { q in
            DNSUDPHandler.forward(q, to: origin, on: loop)
        }.whenSuccess { answer in
            guard let answer else { return }
            channel.writeAndFlush(AddressedEnvelope(remoteAddress: remote, data: channel.allocator.buffer(bytes: answer)), promise: nil)
        }
    }

    /// One connected socket per query, from the agent to the resolver: a
    /// fresh source port and the workload's random ID make an answer an
    /// off-path attacker must guess 32 bits for. (Reusing one socket per
    /// resolver would save a socket and a connect per query, about a tenth
    /// of the proxy's added latency, for 16 bits; not worth it.)
    static func forward(_ query: [UInt8], to origin: DNSOrigin, on loop: EventLoop) -> EventLoopFuture<[UInt8]> {
        guard var target = origin.resolver.socketAddress else { return loop.makeFailedFuture(IOError(errnoCode: EINVAL, reason: "resolver address")) }
        target.port = Int(origin.resolverPort)
        let answer = loop.makePromise(of: [UInt8].self)
        let id = Array(query.prefix(2))
        DatagramBootstrap(group: loop)
            .channelInitializer { ch in
                ch.eventLoop.makeCompletedFuture { try ch.pipeline.syncOperations.addHandler(FirstDatagram(answer, id: id)) }
            }
            .connect(to: target)
            .whenComplete { result in
                switch result {
                case .failure(let e): answer.fail(e)
                case .success(let ch):
                    ch.writeAndFlush(ch.allocator.buffer(bytes: query)).whenFailure { answer.fail($0) }
                    let timeout = loop.scheduleTask(in: DNSProxy.upstreamTimeout) { answer.fail(ChannelError.connectTimeout(DNSProxy.upstreamTimeout)) }
                    answer.futureResult.whenComplete { _ in timeout.cancel(); ch.close(promise: nil) }
                }
            }
        return answer.futureResult
    }
}

/// The resolver's answer on a connected socket: the first datagram with the query's ID.
final class FirstDatagram: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = AddressedEnvelope<ByteBuffer>
    let promise: EventLoopPromise<[UInt8]>
    let id: [UInt8]
    init(_ p: EventLoopPromise<[UInt8]>, id: [UInt8]) { promise = p; self.id = id }
    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let bytes = Array(unwrapInboundIn(data).data.readableBytesView)
        if bytes.prefix(2).elementsEqual(id) { promise.succeed(bytes) }
    }
    func errorCaught(context: ChannelHandlerContext, error: Error) { promise.fail(error) }
}

/// DNS over TCP: each message after a two-byte length.
struct DNSLengthFramer: ByteToMessageDecoder {
    typealias InboundOut = ByteBuffer
    mutating func decode(context: ChannelHandlerContext, buffer: inout ByteBuffer) throws -> DecodingState {
        guard let length = buffer.getInteger(at: buffer.readerIndex, as: UInt16.self),
              buffer.readableBytes >= 2 + Int(length) else { return .needMoreData }
        buffer.moveReaderIndex(forwardBy: 2)
        context.fireChannelRead(NIOAny(buffer.readSlice(length: Int(length))!))
        return .continue
    }
}

/// TCP: the connection's origin comes from the kernel at accept; each
/// message is answered in turn, over a TCP connection to the resolver.
final class DNSTCPHandler: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer
    let hooks: DNSProxyHooks
    let pool: NIOThreadPool
    var origin: DNSOrigin?
    var client: IPAddress?

    init(hooks: DNSProxyHooks, pool: NIOThreadPool) { self.hooks = hooks; self.pool = pool }

    func channelActive(context: ChannelHandlerContext) {
        guard let remote = context.channel.remoteAddress, let local = context.channel.localAddress,
              let c = IPAddress(remote), let l = IPAddress(local), let cp = remote.port, let lp = local.port,
              let o = hooks.origin(c, UInt16(cp), l, UInt16(lp), true) else {
            hooks.exchanged(DNSExchange(origin: nil, client: context.channel.remoteAddress.flatMap { IPAddress($0) } ?? .v4(0, 0, 0, 0), name: "", type: 0,
                                        result: .unknownSource, rcode: -1, addresses: [], tcp: true, seconds: 0))
            context.close(promise: nil)
            return
        }
        origin = o
        client = c
        context.fireChannelActive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard let origin, let client else { return }
        let query = Array(unwrapInboundIn(data).readableBytesView)
        let loop = context.eventLoop, channel = context.channel
        DNSProxy.answer(query, origin: origin, client: client, tcp: true, hooks: hooks, pool: pool, on: loop) { q in
            DNSTCPHandler.forward(q, to: origin, on: loop)
        }.whenSuccess { answer in
            guard let answer else { channel.close(promise: nil); return }
            var out = channel.allocator.buffer(capacity: answer.count + 2)
            out.writeInteger(UInt16(answer.count))
            out.writeBytes(answer)
            channel.writeAndFlush(out, promise: nil)
        }
    }

    static func forward(_ query: [UInt8], to origin: DNSOrigin, on loop: EventLoop) -> EventLoopFuture<[UInt8]> {
        guard var target = origin.resolver.socketAddress else { return loop.makeFailedFuture(IOError(errnoCode: EINVAL, reason: "resolver address")) }
        target.port = Int(origin.resolverPort)
        let answer = loop.makePromise(of: [UInt8].self)
        ClientBootstrap(group: loop)
            .connectTimeout(DNSProxy.upstreamTimeout)
            .channelInitializer { ch in
                ch.eventLoop.makeCompletedFuture {
                    try ch.pipeline.syncOperations.addHandler(ByteToMessageHandler(DNSLengthFramer()))
                    try ch.pipeline.syncOperations.addHandler(FirstMessage(answer))
                }
            }
            .connect(to: target)
            .whenComplete { result in
                switch result {
                case .failure(let e): answer.fail(e)
                case .success(let ch):
                    var out = ch.allocator.buffer(capacity: query.count + 2)
                    out.writeInteger(UInt16(query.count))
                    out.writeBytes(query)
                    ch.writeAndFlush(out).whenFailure { answer.fail($0) }
                    let timeout = loop.scheduleTask(in: DNSProxy.upstreamTimeout) { answer.fail(ChannelError.connectTimeout(DNSProxy.upstreamTimeout)) }
                    answer.futureResult.whenComplete { _ in timeout.cancel(); ch.close(promise: nil) }
                }
            }
        return answer.futureResult
    }
}

final class FirstMessage: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = ByteBuffer
    let promise: EventLoopPromise<[UInt8]>
    init(_ p: EventLoopPromise<[UInt8]>) { promise = p }
    func channelRead(context: ChannelHandlerContext, data: NIOAny) { promise.succeed(Array(unwrapInboundIn(data).readableBytesView)) }
    func channelInactive(context: ChannelHandlerContext) { promise.fail(ChannelError.eof) }
    func errorCaught(context: ChannelHandlerContext, error: Error) { promise.fail(error) }
}
