import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix

/// The agent's local flow socket (STATE/flows.sock, mode 0600: root only):
/// every flow event is written as one JSON line to each connected client.
/// A client too slow to keep up loses events, and is told how many in a
/// line {"lost": N} before the next event it gets: never silently.
/// At most `maxClients` listen at once (each holds a socket and up to 256 KiB
/// of queued lines); past it a new client is closed at accept, and counted.
final class FlowStream: @unchecked Sendable {
    static let maxClients = 32
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    let channel: Channel
    let registry = ClientRegistry()

    final class ClientRegistry: Sendable {
        struct Client: Sendable { var channel: Channel; var lost: Int }
        let clients = NIOLockedValueBox<[ObjectIdentifier: Client]>([:])
        /// False (and nothing added) when the registry is full.
        func add(_ c: Channel) -> Bool {
            clients.withLockedValue { clients in
                guard clients.count < FlowStream.maxClients else { return false }
                clients[ObjectIdentifier(c)] = Client(channel: c, lost: 0)
                return true
            }
        }
        func remove(_ c: Channel) { clients.withLockedValue { $0[ObjectIdentifier(c)] = nil } }
    }

    final class Tracker: ChannelInboundHandler, @unchecked Sendable {
        typealias InboundIn = ByteBuffer
        let registry: ClientRegistry
        let refused: @Sendable () -> Void
        init(_ r: ClientRegistry, refused: @escaping @Sendable () -> Void) { registry = r; self.refused = refused }
        func channelActive(context: ChannelHandlerContext) {
            if !registry.add(context.channel) {
                refused()
                context.close(promise: nil)
            }
        }
        func channelInactive(context: ChannelHandlerContext) { registry.remove(context.channel) }
        func channelRead(context: ChannelHandlerContext, data: NIOAny) {}   // clients only listen
    }

    init(path: String, refused: @escaping @Sendable () -> Void = {}) throws {
        unlink(path)
        let registry = self.registry
        channel = try ServerBootstrap(group: group)
            .childChannelOption(ChannelOptions.writeBufferWaterMark, value: .init(low: 32 << 10, high: 256 << 10))
            .childChannelInitializer { $0.pipeline.addHandler(Tracker(registry, refused: refused)) }
            .bind(unixDomainSocketPath: path).wait()
        chmod(path, 0o600)
    }

    func publish(_ line: [UInt8]) {
        let targets = registry.clients.withLockedValue { clients -> [(Channel, Int)] in
            var targets: [(Channel, Int)] = []
            for (id, c) in clients {
                if c.channel.isWritable {
                    targets.append((c.channel, c.lost))
                    clients[id]?.lost = 0
                } else {
                    clients[id]?.lost += 1
                }
            }
            return targets
        }
        for (ch, lost) in targets {
            var buffer = ch.allocator.buffer(capacity: line.count + 24)
            if lost > 0 { buffer.writeString("{\"lost\":\(lost)}\n") }
            buffer.writeBytes(line)
            ch.writeAndFlush(buffer, promise: nil)
        }
    }

    func stop() {
        try? channel.close().wait()
        try? group.syncShutdownGracefully()
    }
}
