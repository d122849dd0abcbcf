import NIOCore
import NIOHTTP1
import PalisadeRelay

/// HTTP/1.1 protocol upgrades through the L7 proxy. Only WebSocket is let
/// through: its handshake is an HTTP request the rules judge, and what
/// follows is not HTTP. Any other upgrade (h2c above all, which would carry
/// unjudged requests) is taken out of the request, so the workload answers
/// in HTTP/1.1; since NIO's decoder reads nothing past an upgrade request,
/// such a connection ends after its response.
enum UpgradeState {
    case none
    case websocket            // forwarded; a 101 switches to bytes
    case closeAfterResponse   // the upgrade was removed or declined
    case switching            // 101 seen: bytes once the response ends
}

/// The HTTP handlers on both sides of one proxied HTTP/1.1 connection.
struct L7Codecs {
    var requestDecoder: RemovableChannelHandler
    var upstreamEncoder: RemovableChannelHandler
    /// Reads the responses (HTTP1ResponseFramer); holds what follows a 101.
    var upstreamHandler: RemovableChannelHandler
}

extension L7Gate {
    /// The request as forwarded, and what its upgrade (if any) becomes.
    /// (llhttp treats a request as an upgrade when Connection names
    /// "upgrade" and Upgrade is present, or for CONNECT.)
    static func upgradeIntent(_ head: HTTPRequestHead) -> (HTTPRequestHead, UpgradeState) {
        let connection = head.headers[canonicalForm: "connection"].map { $0.lowercased() }
        let protocols = head.headers[canonicalForm: "upgrade"].map { $0.lowercased() }
        guard head.method == .CONNECT || (connection.contains("upgrade") && !protocols.isEmpty) else { return (head, .none) }
        if head.method == .GET && protocols.count == 1 && protocols[0] == "websocket" { return (head, .websocket) }
        var h = head
        h.headers.remove(name: "upgrade")
        h.headers.remove(name: "http2-settings")
        let kept = connection.filter { $0 != "upgrade" && $0 != "http2-settings" }
        h.headers.remove(name: "connection")
        if !kept.isEmpty { h.headers.add(name: "connection", value: kept.joined(separator: ", ")) }
        return (h, .closeAfterResponse)
    }

    /// The workload accepted the WebSocket handshake: both connections
    /// become one byte relay (the L4 glue). Glue goes in after the request
    /// decoder and the response reader, the other HTTP handlers come out,
    /// then those two, whose held bytes (frames sent right after the
    /// handshake) go to the glue.
    func switchToBytes() {
        guard let context, let upstream, let codecs else {
            context?.close(promise: nil)
            upstream?.close(promise: nil)
            return
        }
        let (callerGlue, workloadGlue) = GlueHandler.pair()
        callerGlue.isStream = l7.callerIsStream
        let ops = context.pipeline.syncOperations
        let upOps = upstream.pipeline.syncOperations
        do {
            try ops.addHandler(callerGlue, position: .after(codecs.requestDecoder))
            try upOps.addHandler(workloadGlue, position: .after(codecs.upstreamHandler))
        } catch {
            context.close(promise: nil)
            upstream.close(promise: nil)
            return
        }
        upstreamHandler = nil
        self.upstream = nil
        upOps.removeHandler(codecs.upstreamHandler, promise: nil)
        upOps.removeHandler(codecs.upstreamEncoder, promise: nil)
        ops.removeHandler(codecs.requestDecoder, promise: nil)
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
