import Foundation
import NIOCore
import NIOEmbedded
import NIOHTTP1
@testable import PalisadeL7

/// Target "http1": any bytes from a caller into the HTTP/1.1 proxy (the
/// request framer, the gate), with a workload that answers every request.
/// The gate allows GET /public/** only; the invariant: what the proxy
/// sends the workload is well-formed HTTP/1.1 (the workload's own llhttp
/// decoder reads it), and the requests it reads are the ones the gate
/// allowed, in order, with the same targets.
/// PALISADE_FUZZ_DEBUG=1: say what goes where (to replay an artifact).
let fuzzDebug = ProcessInfo.processInfo.environment["PALISADE_FUZZ_DEBUG"] == "1"

func fuzzHTTP1(_ bytes: UnsafeBufferPointer<UInt8>) {
    let loop = EmbeddedEventLoop()
    let caller = EmbeddedChannel(loop: loop)
    let upstream = EmbeddedChannel(loop: loop)
    let workload = EmbeddedChannel(handler: ByteToMessageHandler(HTTPRequestDecoder()), loop: loop)
    defer { finishFuzzConnection(loop, [caller, upstream, workload]) }
    let allowed = FuzzJudged()
    var l7 = fuzzPublicOnly
    l7.gate = { method, uri, host, headers, jwt in
        let verdict = fuzzPublicOnly.gate(method, uri, host, headers, jwt)
        if verdict.allowed { allowed.requests.append("\(method) \(uri)") }
        return verdict
    }
    do { try L7Gate.install(stream: caller, upstream: upstream, l7: l7) } catch { fatalError("install: \(error)") }
    _ = try? caller.writeInbound(ByteBuffer(bytes: Array(bytes)))
    var requests = 0
    for _ in 0..<64 {
        var progressed = false
        while let out = try? upstream.readOutbound(as: ByteBuffer.self) {
            progressed = true
            if fuzzDebug { FileHandle.standardError.write(Data("to the workload: \(String(decoding: out.readableBytesView, as: UTF8.self).debugDescription)\n".utf8)) }
            do { try workload.writeInbound(out) } catch { fatalError("the proxy sent the workload bytes it cannot parse: \(error)") }
        }
        while let part = try? workload.readInbound(as: HTTPServerRequestPart.self) {
            switch part {
            case .head(let h):
                guard h.method == .GET, h.uri.hasPrefix("/public/") else { fatalError("forwarded a request the gate denied: \(h.method) \(h.uri)") }
                let seen = "\(h.method.rawValue) \(h.uri)"
                guard requests < allowed.requests.count, allowed.requests[requests] == seen else {
                    fatalError("the workload read \(seen) as request \(requests + 1), the gate allowed \(allowed.requests)")
                }
            case .body:
                break
            case .end:
                requests += 1
                // The workload answers; the gate then takes the next request.
                _ = try? upstream.writeInbound(ByteBuffer(string: "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"))
            }
        }
        while (try? caller.readOutbound(as: ByteBuffer.self)) != nil { progressed = true }
        loop.run()
        if !progressed { break }
    }
}

/// What the gate allowed, in order.
final class FuzzJudged: @unchecked Sendable { var requests: [String] = [] }

/// The rules both proxy targets judge by: GET /public/** only.
let fuzzPublicOnly = L7Context(gate: { method, uri, _, _, _ in
    let ok = method == "GET" && uri.hasPrefix("/public/")
    return HTTPVerdict(allowed: ok, reason: ok ? "" : "denied", rule: ok ? "public" : nil)
}, source: "spiffe://fuzz/caller", destination: "spiffe://fuzz/workload", destinationAddress: "127.0.0.1:80")

/// Every timer fires (the proxy's deadlines hold the gate), then the
/// channels close: what one connection allocated must all be freed.
func finishFuzzConnection(_ loop: EmbeddedEventLoop, _ channels: [EmbeddedChannel]) {
    loop.advanceTime(by: .hours(2))
    for c in channels { _ = try? c.finish() }
    loop.run()
    try? loop.syncShutdownGracefully()
}
