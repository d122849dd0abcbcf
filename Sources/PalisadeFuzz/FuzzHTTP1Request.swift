import NIOCore
import NIOEmbedded
import NIOHTTP1
@testable import PalisadeL7

/// Target "http1request": any bytes from a caller, read by the HTTP/1.1
/// proxy's request framer, which forwards allowed requests as received.
/// The first byte picks how the rest is cut into reads. Invariants:
/// - what the framer hands on (heads, bodies, then the bytes it holds
///   after an upgrade request or one that closes) is the input, every byte once, in order, save the empty
///   lines it may skip before a request;
/// - where it accepts the whole input, NIO's llhttp decoder, standing for
///   the workload's parser, reads the same requests: as many, the same
///   methods, targets and body lengths, up to an upgrade request or one
///   that closes (after which neither reads HTTP). A framing the two read differently would
///   let a caller smuggle a request past the rules.
/// Decided difference: the framer takes any token as a method (RFC 9110
/// 9.1) where llhttp knows a fixed list; an input llhttp refuses only for
/// its method is not compared.
func fuzzHTTP1Request(_ bytes: UnsafeBufferPointer<UInt8>) {
    guard let first = bytes.first else { return }
    let input = Array(bytes.dropFirst())
    let framer = HTTP1RequestFramer(maxHeadBytes: 4096, maxFields: 64)
    var forwarded: [UInt8] = []
    var forwardedByEnds = 0   // what the requests ended so far took
    var framed: [(method: String, target: String, payload: Int)] = []
    var payload = 0, method = "", target = ""
    func take(_ event: HTTP1RequestFramer.Event) {
        switch event {
        case .head(let h):
            forwarded += h.bytes.readableBytesView
            method = h.method
            target = h.target
        case .body(let b, let n):
            forwarded += b.readableBytesView
            payload += n
        case .end:
            framed.append((method, target, payload))
            payload = 0
            forwardedByEnds = forwarded.count
        }
    }
    let accepted = feedInCuts(input, seed: first) { try framer.feed(&$0, take) }
    guard accepted else { return }
    // Skipped empty lines aside, every byte went on once, in order: all
    // of them, unless a request is still unfinished.
    let held = framer.takeHeld()
    guard let read = matchWithCRLFGaps(forwarded, of: input, skippingTrailing: !framer.isHolding),
          read + held.readableBytes == input.count || !(framer.betweenRequests || framer.isHolding),
          held.readableBytesView.elementsEqual(input[read..<(read + held.readableBytes)]) else {
        fatalError("the framer forwarded \(forwarded.count) and held \(held.readableBytes) of \(input.count) bytes, or not as received")
    }

    // The workload's side: NIO's llhttp decoder on the bytes of the
    // requests the framer ended (not an unfinished one, which llhttp may
    // refuse earlier: it reads byte by byte where the framer waits for
    // whole lines; nor what follows an upgrade request or one that
    // closes).
    guard let ended = matchWithCRLFGaps(Array(forwarded[..<forwardedByEnds]), of: input, skippingTrailing: false) else {
        fatalError("the requests ended were not forwarded as received")
    }
    let workload = EmbeddedChannel(handler: ByteToMessageHandler(HTTPRequestDecoder(leftOverBytesStrategy: .forwardBytes)))
    defer { _ = try? workload.finish() }
    var decoded: [(method: String, target: String, payload: Int)] = []
    var decodedPayload = 0, decodedMethod = "", decodedTarget = ""
    do {
        try workload.writeInbound(ByteBuffer(bytes: input[..<ended]))
    } catch HTTPParserError.invalidMethod {
        return
    } catch {
        fatalError("the framer accepted requests llhttp refuses (\(error)): \(String(decoding: input.prefix(300), as: UTF8.self).debugDescription)")
    }
    while let part = try? workload.readInbound(as: HTTPServerRequestPart.self) {
        switch part {
        case .head(let h):
            decodedMethod = h.method.rawValue
            decodedTarget = h.uri
        case .body(let b): decodedPayload += b.readableBytes
        case .end:
            decoded.append((decodedMethod, decodedTarget, decodedPayload))
            decodedPayload = 0
        }
    }
    // (Both end a request only once its body is whole: an unfinished
    // last one counts for neither.)
    guard decoded.count == framed.count,
          zip(decoded, framed).allSatisfy({ $0.method == $1.method && $0.target == $1.target && $0.payload == $1.payload }) else {
        fatalError("framed \(framed) but llhttp read \(decoded): \(String(decoding: input.prefix(300), as: UTF8.self).debugDescription)")
    }
}

/// How much of `whole` `part` stands for, when `part` is a prefix of
/// `whole` with only CR and LF bytes left out (the empty lines a framer may
/// skip before a request); nil when it is not.
func matchWithCRLFGaps(_ part: [UInt8], of whole: [UInt8], skippingTrailing: Bool) -> Int? {
    var i = 0, w = 0
    while i < part.count {
        guard w < whole.count else { return nil }
        if part[i] == whole[w] {
            i += 1
        } else if whole[w] != UInt8(ascii: "\r") && whole[w] != UInt8(ascii: "\n") {
            return nil
        }
        w += 1
    }
    // (Empty lines at the end are skipped too, between requests.)
    while skippingTrailing, w < whole.count, whole[w] == UInt8(ascii: "\r") || whole[w] == UInt8(ascii: "\n") { w += 1 }
    return w
}
