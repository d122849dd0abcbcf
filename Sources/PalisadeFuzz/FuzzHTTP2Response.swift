import Foundation
import NIOCore
import NIOEmbedded
import NIOHPACK
import NIOHTTP2
@testable import PalisadeL7

/// Target "http2response": any bytes from the workload (the server's side
/// of the relay's own HTTP/2 client, `H2WorkloadConnection`) while a caller
/// (NIO's HTTP/2 client, validating what it receives) has four requests
/// open, one of them with a body. The input is cut into reads where its
/// first byte says. The invariants: whatever the workload sends, the
/// caller never receives anything its HTTP/2 client rejects (a bad
/// response becomes 502 or a reset; a broken connection closes it), and
/// nothing of a connection stays in memory after it ends (LeakSanitizer).
func fuzzHTTP2Response(_ bytes: UnsafeBufferPointer<UInt8>) {
    let loop = EmbeddedEventLoop()
    let client = EmbeddedChannel(loop: loop)
    let caller = EmbeddedChannel(loop: loop)
    let upstream = EmbeddedChannel(loop: loop)
    let address = try! SocketAddress(ipAddress: "127.0.0.1", port: 1)
    let errors = FuzzErrors()
    defer { finishFuzzConnection(loop, [client, caller, upstream]) }
    do {
        for c in [client, caller, upstream] { try c.connect(to: address).wait() }
        try client.pipeline.syncOperations.addHandler(NIOHTTP2Handler(mode: .client))
        try client.pipeline.syncOperations.addHandler(errors)
        try H2Relay.install(downstream: caller, upstream: upstream, l7: fuzzPublicOnly)
    } catch { fatalError("install: \(error)") }

    func shuttle() {
        for _ in 0..<32 {
            var moved = false
            client.flush()
            while let b = try? client.readOutbound(as: ByteBuffer.self) { moved = true; _ = try? caller.writeInbound(b) }
            while let b = try? caller.readOutbound(as: ByteBuffer.self) { moved = true; _ = try? client.writeInbound(b) }
            while let b = try? upstream.readOutbound(as: ByteBuffer.self) {
                moved = true
                if fuzzDebug { FileHandle.standardError.write(Data("to the workload: \(H2FrameList(b))\n".utf8)) }
            }
            while (try? client.readInbound(as: HTTP2Frame.self)) != nil {}
            loop.run()
            if let e = errors.first { fatalError("the caller's HTTP/2 client rejected what the relay sent: \(e)") }
            if !moved { return }
        }
    }
    for (id, path) in [(1, "/public/a"), (3, "/public/b"), (5, "/private/c"), (7, "/public/d")] {
        let h = HPACKHeaders([(":method", "GET"), (":scheme", "http"), (":authority", "b"), (":path", path)])
        client.write(HTTP2Frame(streamID: HTTP2StreamID(id), payload: .headers(.init(headers: h, endStream: id != 7))), promise: nil)
    }
    client.write(HTTP2Frame(streamID: 7, payload: .data(.init(data: .byteBuffer(ByteBuffer(repeating: 1, count: 70_000)), endStream: true))),
                 promise: nil)
    shuttle()

    guard let cutByte = bytes.first else { return }
    let input = UnsafeBufferPointer(rebasing: bytes.dropFirst())
    let step = max(1, Int(cutByte))
    var at = 0
    while at < input.count, upstream.isActive {
        let n = min(step, input.count - at)
        let read = ByteBuffer(bytes: UnsafeBufferPointer(rebasing: input[at..<(at + n)]))
        if fuzzDebug { FileHandle.standardError.write(Data("from the workload: \(H2FrameList(read))\n".utf8)) }
        _ = try? upstream.writeInbound(read)
        at += n
        shuttle()
    }
}

/// Errors a pipeline reported.
final class FuzzErrors: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = HTTP2Frame
    var first: Error?
    func channelRead(context: ChannelHandlerContext, data: NIOAny) { context.fireChannelRead(data) }
    func errorCaught(context: ChannelHandlerContext, error: Error) {
        if first == nil { first = error }
    }
}
