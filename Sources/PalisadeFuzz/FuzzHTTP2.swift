import Foundation
import NIOCore
import NIOEmbedded
import NIOHPACK
import NIOHTTP2
@testable import PalisadeL7

/// Target "http2": any frames from a caller (the input follows the
/// connection preface) into the HTTP/2 relay, with a workload (NIO's
/// HTTP/2 server, validating) that answers every request it gets. The gate
/// allows GET /public/** only. The invariants: the workload's side never
/// sees a connection error caused by what the relay sends, no request the
/// gate did not allow reaches it, and nothing of a connection stays in
/// memory after it ends (LeakSanitizer).
func fuzzHTTP2(_ bytes: UnsafeBufferPointer<UInt8>) {
    let loop = EmbeddedEventLoop()
    let caller = EmbeddedChannel(loop: loop)
    let upstream = EmbeddedChannel(loop: loop)
    let workload = EmbeddedChannel(loop: loop)
    let address = try! SocketAddress(ipAddress: "127.0.0.1", port: 1)
    defer { finishFuzzConnection(loop, [caller, upstream, workload]) }
    do {
        try caller.connect(to: address).wait()
        try upstream.connect(to: address).wait()
        try workload.connect(to: address).wait()
        try workload.pipeline.syncOperations.addHandler(NIOHTTP2Handler(mode: .server))
        try H2Relay.install(downstream: caller, upstream: upstream, l7: fuzzPublicOnly)
    } catch { fatalError("install: \(error)") }

    var input = ByteBuffer(bytes: L7ProtocolSniffer.preface)
    input.writeBytes(bytes)
    _ = try? caller.writeInbound(input)
    var answered = Set<HTTP2StreamID>()
    for _ in 0..<64 {
        var progressed = false
        while let out = try? upstream.readOutbound(as: ByteBuffer.self) {
            progressed = true
            if fuzzDebug { FileHandle.standardError.write(Data("to the workload: \(H2FrameList(out))\n".utf8)) }
            // Stream errors are the workload's to answer (RST_STREAM); a
            // connection error shows as a GOAWAY with an error code below.
            _ = try? workload.writeInbound(out)
        }
        while let frame = try? workload.readInbound(as: HTTP2Frame.self) {
            guard case .headers(let h) = frame.payload, !answered.contains(frame.streamID) else { continue }
            answered.insert(frame.streamID)
            let method = h.headers.first(name: ":method") ?? "", path = h.headers.first(name: ":path") ?? ""
            guard method == "GET", path.hasPrefix("/public/") else { fatalError("forwarded a request the gate denied: \(method) \(path)") }
            let response = HTTP2Frame.FramePayload.Headers(headers: [":status": "200", "content-length": "0"], endStream: true)
            // The relay may have reset the stream meanwhile: then this fails.
            _ = try? workload.writeOutbound(HTTP2Frame(streamID: frame.streamID, payload: .headers(response)))
            try? workload.throwIfErrorCaught()
        }
        while let out = try? workload.readOutbound(as: ByteBuffer.self) {
            progressed = true
            if fuzzDebug { FileHandle.standardError.write(Data("from the workload: \(H2FrameList(out))\n".utf8)) }
            if let code = H2GoawayError(out), code != 0 {
                fatalError("the workload's HTTP/2 server ended the connection with error \(code): the relay sent invalid HTTP/2")
            }
            _ = try? upstream.writeInbound(out)
        }
        while (try? caller.readOutbound(as: ByteBuffer.self)) != nil { progressed = true }
        loop.run()
        if !progressed { break }
    }
}

/// The error code of the first GOAWAY among these frames (the workload's
/// own bytes: no preface).
func H2GoawayError(_ buffer: ByteBuffer) -> UInt32? {
    var b = buffer
    while b.readableBytes >= 9, let length = b.getInteger(at: b.readerIndex, as: UInt32.self).map({ Int($0 >> 8) }),
          let type = b.getInteger(at: b.readerIndex + 3, as: UInt8.self) {
        if type == 7, length >= 8, b.readableBytes >= 17 { return b.getInteger(at: b.readerIndex + 13, as: UInt32.self) }
        b.moveReaderIndex(forwardBy: min(b.readableBytes, 9 + length))
    }
    return nil
}

/// Frame types, flags and streams in a buffer of HTTP/2 bytes (for
/// PALISADE_FUZZ_DEBUG; a connection's first bytes may be the preface).
func H2FrameList(_ buffer: ByteBuffer) -> String {
    var b = buffer
    if b.readableBytesView.starts(with: L7ProtocolSniffer.preface) { b.moveReaderIndex(forwardBy: 24) }
    var out: [String] = []
    while b.readableBytes >= 9, let length = b.getInteger(at: b.readerIndex, as: UInt32.self).map({ Int($0 >> 8) }),
          let type = b.getInteger(at: b.readerIndex + 3, as: UInt8.self), let flags = b.getInteger(at: b.readerIndex + 4, as: UInt8.self),
          let stream = b.getInteger(at: b.readerIndex + 5, as: UInt32.self) {
        out.append("type=\(type) flags=\(flags) stream=\(stream & 0x7fff_ffff) len=\(length)")
        b.moveReaderIndex(forwardBy: min(b.readableBytes, 9 + length))
    }
    return out.joined(separator: "; ")
}
