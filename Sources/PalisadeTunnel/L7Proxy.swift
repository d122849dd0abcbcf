import Foundation
import NIOCore
import NIOHTTP1

/// The verdict on one HTTP request, from the destination's L7 rules.
public struct HTTPVerdict: Sendable {
    public var allowed: Bool
    /// Short and safe to show the caller (the 403 body).
    public var reason: String
    public var rule: String?
    public init(allowed: Bool, reason: String, rule: String?) { self.allowed = allowed; self.reason = reason; self.rule = rule }
}

/// Judges a request: method, path (with query), Host, headers (lower-case names).
public typealias HTTPGate = @Sendable (_ method: String, _ uri: String, _ host: String, _ headers: [String: String]) -> HTTPVerdict

/// One access-log line: never the Authorization header, never a body.
public struct AccessLogEntry: Codable, Sendable {
    public var time: String
    public var source: String
    public var destination: String
    public var destinationAddress: String
    public var method: String
    public var path: String
    public var status: Int
    public var requestBytes: Int
    public var responseBytes: Int
    public var durationMs: Double
    public var decision: String
    public var rule: String?
}

/// The in-agent HTTP/1.1 proxy on one tunnel stream (the caller's side):
/// requests are decoded (NIO's llhttp decoder refuses conflicting
/// Content-Length/Transfer-Encoding and invalid header names), judged one by
/// one, allowed ones streamed to the workload in order, denied ones answered
/// with 403 — the connection stays usable. Bodies stream through, never
/// buffered whole; at most `maxQueuedParts` pipelined parts wait.
final class L7Gate: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    let gate: HTTPGate
    let source: String
    let destination: String
    let destinationAddress: String
    let log: (@Sendable (AccessLogEntry) -> Void)?
    var upstream: Channel?
    private var context: ChannelHandlerContext?
    private var queue: [HTTPServerRequestPart] = []
    private var current: (head: HTTPRequestHead, verdict: HTTPVerdict, start: Date, bytesIn: Int)?
    private var awaitingResponse = false
    private var responseStatus = 0
    private var responseBytes = 0
    private var inputClosed = false
    static let maxQueuedParts = 4096

    init(gate: @escaping HTTPGate, source: String, destination: String, destinationAddress: String, log: (@Sendable (AccessLogEntry) -> Void)?) {
        self.gate = gate; self.source = source; self.destination = destination; self.destinationAddress = destinationAddress; self.log = log
    }

    func handlerAdded(context: ChannelHandlerContext) { self.context = context }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        queue.append(unwrapInboundIn(data))
        if queue.count > Self.maxQueuedParts {
            context.close(promise: nil)   // pipelining beyond the limit
            return
        }
        pump()
    }

    private func pump() {
        while !awaitingResponse, !queue.isEmpty {
            handle(queue.removeFirst())
        }
        if inputClosed && queue.isEmpty && !awaitingResponse { finish() }
    }

    private func handle(_ part: HTTPServerRequestPart) {
        switch part {
        case .head(let h):
            var headers: [String: String] = [:]
            for (k, v) in h.headers where k.lowercased() != "authorization" { headers[k.lowercased()] = v }
            let verdict = gate(h.method.rawValue, h.uri, h.headers.first(name: "host") ?? "", headers)
            current = (h, verdict, Date(), 0)
            if verdict.allowed { upstream?.write(HTTPClientRequestPart.head(h), promise: nil) }
        case .body(let b):
            current?.bytesIn += b.readableBytes
            if current?.verdict.allowed == true { upstream?.write(HTTPClientRequestPart.body(.byteBuffer(b)), promise: nil) }
        case .end(let t):
            guard let cur = current else { return }
            if cur.verdict.allowed {
                awaitingResponse = true
                responseStatus = 0
                responseBytes = 0
                upstream?.writeAndFlush(HTTPClientRequestPart.end(t), promise: nil)
            } else {
                deny(cur)
            }
        }
    }

    private func deny(_ cur: (head: HTTPRequestHead, verdict: HTTPVerdict, start: Date, bytesIn: Int)) {
        guard let context else { return }
        let body = "\(cur.verdict.reason)\n"
        var head = HTTPResponseHead(version: cur.head.version, status: .forbidden)
        head.headers.add(name: "content-type", value: "text/plain")
        head.headers.add(name: "content-length", value: "\(body.utf8.count)")
        context.write(wrapOutboundOut(.head(head)), promise: nil)
        context.write(wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(string: body)))), promise: nil)
        context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: nil)
        record(cur, status: 403, bytesOut: body.utf8.count)
        current = nil
    }

    private func record(_ cur: (head: HTTPRequestHead, verdict: HTTPVerdict, start: Date, bytesIn: Int), status: Int, bytesOut: Int) {
        let path = cur.head.uri.split(separator: "?", maxSplits: 1).first.map(String.init) ?? cur.head.uri
        log?(AccessLogEntry(time: ISO8601DateFormatter().string(from: cur.start), source: source, destination: destination,
                            destinationAddress: destinationAddress,
                            method: cur.head.method.rawValue, path: path, status: status, requestBytes: cur.bytesIn,
                            responseBytes: bytesOut, durationMs: Date().timeIntervalSince(cur.start) * 1000,
                            decision: cur.verdict.allowed ? "allowed" : "denied", rule: cur.verdict.rule))
    }

    /// A response part from the workload.
    func fromUpstream(_ part: HTTPClientResponsePart) {
        guard let context else { return }
        switch part {
        case .head(let h):
            responseStatus = Int(h.status.code)
            context.write(wrapOutboundOut(.head(h)), promise: nil)
        case .body(let b):
            responseBytes += b.readableBytes
            context.write(wrapOutboundOut(.body(.byteBuffer(b))), promise: nil)
        case .end(let t):
            context.writeAndFlush(wrapOutboundOut(.end(t)), promise: nil)
            if let cur = current { record(cur, status: responseStatus, bytesOut: responseBytes) }
            current = nil
            awaitingResponse = false
            pump()
        }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let e = event as? ChannelEvent, e == .inputClosed {
            inputClosed = true
            pump()
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    private func finish() {
        upstream?.close(promise: nil)
        context?.close(mode: .output, promise: nil)
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        // A request the decoder refused (smuggling attempt, bad header name):
        // answer 400 and close, never forward it.
        if error is HTTPParserError {
            var head = HTTPResponseHead(version: .http1_1, status: .badRequest)
            head.headers.add(name: "content-length", value: "0")
            head.headers.add(name: "connection", value: "close")
            context.write(wrapOutboundOut(.head(head)), promise: nil)
            // End the stream cleanly (END_STREAM after the answer): a reset
            // could overtake the 400 on its way to the caller.
            let upstream = self.upstream
            self.upstream = nil
            context.writeAndFlush(wrapOutboundOut(.end(nil))).whenComplete { _ in
                context.close(mode: .output, promise: nil)
                upstream?.close(promise: nil)
            }
        } else {
            context.close(promise: nil)
            upstream?.close(promise: nil)
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        upstream?.close(promise: nil)
        context.fireChannelInactive()
    }
}

/// The workload's side: responses go back through the gate.
final class L7Upstream: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = HTTPClientResponsePart
    weak var gate: L7Gate?
    let stream: Channel
    init(gate: L7Gate, stream: Channel) { self.gate = gate; self.stream = stream }
    func channelRead(context: ChannelHandlerContext, data: NIOAny) { gate?.fromUpstream(unwrapInboundIn(data)) }
    func channelInactive(context: ChannelHandlerContext) {
        // The workload closed: end the stream after what was already sent.
        stream.close(mode: .output, promise: nil)
        context.fireChannelInactive()
    }
    func errorCaught(context: ChannelHandlerContext, error: Error) { context.close(promise: nil) }
}
