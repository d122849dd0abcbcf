import Foundation
import PalisadeIdentity

/// Per-request formatting on the proxy's hot path. Foundation's
/// ISO8601DateFormatter and JSONEncoder cost tens of microseconds a call on
/// Linux (ICU, reflection) — measured as a third of the L7 proxy's CPU — so
/// the access log is written by hand, with the same fields and key order.
extension AccessLogEntry {
    /// One JSON object (keys sorted, `rule` left out when there is none)
    /// and a newline.
    public func jsonLine() -> String {
        var o: [UInt8] = []
        appendJSONLine(to: &o)
        return String(decoding: o, as: UTF8.self)
    }

    /// The same line, appended as UTF-8 bytes (what the log writer stores:
    /// building it as a String cost twice as much).
    public func appendJSONLine(to o: inout [UInt8]) {
        // (Only for an empty buffer: reserving count + 384 on a long one
        // would re-allocate it exactly, line after line.)
        if o.isEmpty { o.reserveCapacity(384) }
        o.append(UInt8(ascii: "{"))
        var first = true
        func key(_ k: StaticString) {
            if !first { o.append(UInt8(ascii: ",")) }
            first = false
            o.append(UInt8(ascii: "\""))
            o.append(contentsOf: UnsafeBufferPointer(start: k.utf8Start, count: k.utf8CodeUnitCount))
            o.append(UInt8(ascii: "\""))
            o.append(UInt8(ascii: ":"))
        }
        func str(_ k: StaticString, _ v: String) { key(k); Self.quote(v, into: &o) }
        func num(_ k: StaticString, _ v: Int) { key(k); Self.digits(v, into: &o) }
        str("decision", decision)
        str("destination", destination)
        str("destinationAddress", destinationAddress)
        let micros = Int((durationMs * 1000).rounded())
        key("durationMs")
        Self.digits(micros / 1000, into: &o)
        o.append(UInt8(ascii: "."))
        Self.digits(micros % 1000, into: &o, width: 3)
        str("method", method)
        str("path", path)
        num("requestBytes", requestBytes)
        num("responseBytes", responseBytes)
        if let rule { str("rule", rule) }
        str("source", source)
        num("status", status)
        str("time", time)
        o.append(UInt8(ascii: "}"))
        o.append(UInt8(ascii: "\n"))
    }

    /// Decimal digits of n, zero-padded to `width`.
    static func digits(_ n: Int, into o: inout [UInt8], width: Int = 1) {
        if n < 0 { o.append(UInt8(ascii: "-")); digits(-n, into: &o, width: width); return }
        var buf: (UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8,
                  UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8) = (0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
        var count = 0
        var v = n
        withUnsafeMutableBytes(of: &buf) { b in
            repeat {
                b[19 - count] = UInt8(ascii: "0") + UInt8(v % 10)
                v /= 10
                count += 1
            } while v > 0 || count < width
            o.append(contentsOf: b[(20 - count)...])
        }
    }

    /// A JSON string: quotes, backslashes and control characters escaped
    /// (request paths come from callers and may hold anything); other
    /// UTF-8 is copied as it is.
    static func quote(_ s: String, into o: inout [UInt8]) {
        // (withUTF8 reads a native string's bytes in place, where walking
        // `s.utf8` by index costs an index step per byte on every request.)
        var s = s
        s.withUTF8 { quote($0, into: &o) }
    }

    static func quote(_ bytes: UnsafeBufferPointer<UInt8>, into o: inout [UInt8]) {
        o.append(UInt8(ascii: "\""))
        // Most values need no escape: copied at once.
        var clean = true
        for c in bytes where c < 0x20 || c == 0x7F || c == UInt8(ascii: "\"") || c == UInt8(ascii: "\\") {
            clean = false
            break
        }
        if clean {
            o.append(contentsOf: bytes)
            o.append(UInt8(ascii: "\""))
            return
        }
        for c in bytes {
            switch c {
            case UInt8(ascii: "\""): o.append(UInt8(ascii: "\\")); o.append(c)
            case UInt8(ascii: "\\"): o.append(UInt8(ascii: "\\")); o.append(c)
            case UInt8(ascii: "\n"): o.append(UInt8(ascii: "\\")); o.append(UInt8(ascii: "n"))
            case UInt8(ascii: "\r"): o.append(UInt8(ascii: "\\")); o.append(UInt8(ascii: "r"))
            case UInt8(ascii: "\t"): o.append(UInt8(ascii: "\\")); o.append(UInt8(ascii: "t"))
            case 0..<0x20, 0x7F:
                let hex = Array("0123456789abcdef".utf8)
                o.append(contentsOf: [UInt8(ascii: "\\"), UInt8(ascii: "u"), UInt8(ascii: "0"), UInt8(ascii: "0"), hex[Int(c >> 4)], hex[Int(c & 0xF)]])
            default: o.append(c)
            }
        }
        o.append(UInt8(ascii: "\""))
    }
}
