import Foundation
import NIOCore
import NIOHPACK
import NIOHTTP2

/// Helpers of the HTTP/2 proxy (H2Relay, in L7HTTP2Relay.swift).
enum L7HTTP2 {
    /// Request facts of a HEADERS frame, for the gate and the log.
    static func facts(_ h: HPACKHeaders, withHeaders: Bool = true) -> (method: String, path: String?, host: String, headers: [String: [String]]) {
        var headers: [String: [String]] = [:]
        for (name, value, _) in h where withHeaders && !name.hasPrefix(":") && name != "authorization" {
            headers[name, default: []].append(value)   // every field line, as HTTP/1.1 (HeaderValues)
        }
        let host = h.first(name: ":authority") ?? h.first(name: "host") ?? ""
        return (h.first(name: ":method") ?? "", h.first(name: ":path"), host, headers)
    }
}

/// Closes the channel when its input ends.
final class CloseOnEndOfInput: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = NIOAny
    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let e = event as? ChannelEvent, e == .inputClosed {
            context.close(promise: nil)
            return
        }
        context.fireUserInboundEventTriggered(event)
    }
}
