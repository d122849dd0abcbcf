import NIOCore
import NIOEmbedded
import NIOHTTP1
@testable import PalisadeL7

/// Target "http1response": any bytes from a workload, read by the HTTP/1.1
/// proxy's response framer, which forwards them as received. The first
/// byte picks how the rest is cut into reads. Invariants:
/// - what the framer hands on is the input, every byte once, in order;
/// - where it accepts the whole input (answers to GET requests), NIO's
///   llhttp-based decoder, standing for the caller's parser, reads the
///   same responses: as many, the same statuses, the same content lengths.
///   A framing the two read differently would let a workload smuggle a
///   response to the caller.
func fuzzHTTP1Response(_ bytes: UnsafeBufferPointer<UInt8>) {
    guard let first = bytes.first else { return }
    let input = Array(bytes.dropFirst())
    let framer = HTTP1ResponseFramer(maxHeadBytes: 4096)
    var forwarded: [UInt8] = []
    var framed: [(status: Int, payload: Int)] = []
    var payload = 0, status = 0, upgraded = false
    func take(_ event: HTTP1ResponseFramer.Event) {
        switch event {
        case .head(let h):
            // (As the gate: left with its body, or taken out to be
            // rewritten, picked by the seed.)
            if framer.headGoesWithBody && first & 0x80 != 0 { framer.headGoesWithBody = false }
            if !framer.headGoesWithBody { forwarded += h.bytes.readableBytesView }
            status = h.status
            upgraded = upgraded || h.status == 101
        case .body(let b, let n):
            forwarded += b.readableBytesView
            payload += n
        case .end:
            framed.append((status, payload))
            payload = 0
        }
    }
    var accepted = feedInCuts(input, seed: first) { try framer.feed(&$0, take) }
    if upgraded { return }   // what follows a 101 is not HTTP
    if accepted {
        do { try framer.inputClosed(take) } catch { accepted = false }
    }
    guard accepted else { return }
    guard forwarded == input else { fatalError("the framer forwarded \(forwarded.count) bytes of \(input.count), or not as received") }

    // The caller's side: NIO's decoder after as many GET requests.
    let caller = EmbeddedChannel(handlers: [HTTPRequestEncoder(),
                                            ByteToMessageHandler(HTTPResponseDecoder(informationalResponseStrategy: .drop))])
    defer { _ = try? caller.finish() }
    for _ in 0...framed.count {
        _ = try? caller.writeOutbound(HTTPClientRequestPart.head(HTTPRequestHead(version: .http1_1, method: .GET, uri: "/")))
        _ = try? caller.writeOutbound(HTTPClientRequestPart.end(nil))
    }
    var decoded: [(status: Int, payload: Int)] = []
    var decodedPayload = 0, decodedStatus = 0
    func collect() {
        while let part = try? caller.readInbound(as: HTTPClientResponsePart.self) {
            switch part {
            case .head(let h): decodedStatus = Int(h.status.code)
            case .body(let b): decodedPayload += b.readableBytes
            case .end:
                decoded.append((decodedStatus, decodedPayload))
                decodedPayload = 0
            }
        }
    }
    do {
        try caller.writeInbound(ByteBuffer(bytes: input))
        collect()
        _ = try caller.finish()   // a body that runs to the close ends here
        collect()
    } catch {
        fatalError("the framer accepted responses llhttp refuses (\(error)): \(String(decoding: input.prefix(300), as: UTF8.self).debugDescription)")
    }
    let finals = framed.filter { $0.status >= 200 }
    guard decoded.count == finals.count, zip(decoded, finals).allSatisfy({ $0.status == $1.status && $0.payload == $1.payload }) else {
        fatalError("framed \(finals) but llhttp read \(decoded): \(String(decoding: input.prefix(300), as: UTF8.self).debugDescription)")
    }
}

/// Feeds `input` to `feed` in reads of sizes `seed` picks; false once
/// `feed` throws.
func feedInCuts(_ input: [UInt8], seed: UInt8, _ feed: (inout ByteBuffer) throws -> Void) -> Bool {
    let cuts = [1, 2, 3, 7, 16, 64, 512, 8192]
    var at = 0, step = Int(seed)
    while at < input.count {
        let n = cuts[step % cuts.count]
        step = step / cuts.count + Int(seed)
        var read = ByteBuffer(bytes: input[at..<min(input.count, at + n)])
        at += n
        do { try feed(&read) } catch { return false }
    }
    return true
}
