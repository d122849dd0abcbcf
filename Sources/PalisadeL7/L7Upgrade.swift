import NIOCore
import NIOHTTP1
import PalisadeRelay

/// HTTP/1.1 protocol upgrades through the L7 proxy. Only WebSocket is let
/// through: its handshake is an HTTP request the rules judge, and what
/// follows is not HTTP. Any other upgrade (h2c above all, which would carry
/// unjudged requests) is taken out of the request, so the workload answers
/// in HTTP/1.1; since nothing past an upgrade request is read as HTTP,
/// such a connection ends after its response.
enum UpgradeState {
    case none
    case websocket            // forwarded; a 101 switches to bytes
    case closeAfterResponse   // the upgrade was removed or declined
    case switching            // 101 seen: bytes once the response ends
}

extension L7Gate {
    /// What a request's upgrade (if any) becomes. (An upgrade as llhttp
    /// reads one: CONNECT, or Connection naming "upgrade" with an Upgrade
    /// field; the framer reads nothing after it.)
    /// A request that ends the connection ends it after its response too
    /// (the framer reads nothing after it).
    static func upgradeIntent(_ head: HTTP1RequestFramer.Head) -> UpgradeState {
        guard head.upgrade else { return head.closes ? .closeAfterResponse : .none }
        return head.method == "GET" && head.upgradeToWebSocket ? .websocket : .closeAfterResponse
    }

    /// A head (already checked by the framer) without its Upgrade and
    /// HTTP2-Settings fields, and without those tokens in Connection (a
    /// Connection field left empty goes); the other fields are written
    /// `name: value`, as the framer read them.
    static func withoutUpgrade(_ head: ByteBuffer, allocator: ByteBufferAllocator) -> ByteBuffer {
        var out = allocator.buffer(capacity: head.readableBytes)
        head.withUnsafeReadableBytes { p in
            let fields = HTTP1Syntax.fieldsStart(p)
            out.writeBytes(UnsafeRawBufferPointer(rebasing: p[..<fields]))   // the request line
            try? HTTP1Syntax.forEachField(p, from: fields, context: "header") { name, value in
                if HTTP1Syntax.equalsIgnoringCase(p, name, "upgrade") || HTTP1Syntax.equalsIgnoringCase(p, name, "http2-settings") { return }
                if HTTP1Syntax.equalsIgnoringCase(p, name, "connection") {
                    var kept: [Range<Int>] = []
                    HTTP1Syntax.forEachListElement(p, value) { token in
                        if !HTTP1Syntax.equalsIgnoringCase(p, token, "upgrade") && !HTTP1Syntax.equalsIgnoringCase(p, token, "http2-settings") { kept.append(token) }
                    }
                    guard !kept.isEmpty else { return }
                    out.writeBytes(UnsafeRawBufferPointer(rebasing: p[name]))
                    out.writeString(": ")
                    for (k, token) in kept.enumerated() {
                        if k > 0 { out.writeString(", ") }
                        out.writeBytes(UnsafeRawBufferPointer(rebasing: p[token]))
                    }
                    out.writeString("\r\n")
                    return
                }
                HTTP1Syntax.writeField(&out, p, name, value)
            }
        }
        out.writeString("\r\n")
        return out
    }

    /// The workload accepted the WebSocket handshake: both connections
    /// become one byte relay (the L4 glue). Glue goes in after the gate
    /// and the response reader, then those two come out, and hand the
    /// bytes they hold (sent right after the handshake, both ways) to the
    /// glue.
    func switchToBytes() {
        guard let context, let upstream, let upstreamHandler else {
            context?.close(promise: nil)
            upstream?.close(promise: nil)
            return
        }
        let (callerGlue, workloadGlue) = GlueHandler.pair()
        callerGlue.isStream = l7.callerIsStream
        let ops = context.pipeline.syncOperations
        let upOps = upstream.pipeline.syncOperations
        do {
            try ops.addHandler(callerGlue, position: .after(self))
            try upOps.addHandler(workloadGlue, position: .after(upstreamHandler))
        } catch {
            context.close(promise: nil)
            upstream.close(promise: nil)
            return
        }
        self.upstreamHandler = nil
        self.upstream = nil
        upOps.removeHandler(upstreamHandler, promise: nil)
        let channel = context.channel
        ops.removeHandler(self, promise: nil)
        // Those two hand their bytes on in tasks of their own; after
        // those, flush what the glue wrote (no read completion follows
        // them), and read again (a read the gate held back is gone).
        channel.eventLoop.execute {
            channel.flush()
            upstream.flush()
            channel.read()
            upstream.read()
        }
    }
}
