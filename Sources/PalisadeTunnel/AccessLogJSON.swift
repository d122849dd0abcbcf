import Foundation

/// Per-request formatting on the proxy's hot path. Foundation's
/// ISO8601DateFormatter and JSONEncoder cost tens of microseconds a call on
/// Linux (ICU, reflection) — measured as a third of the L7 proxy's CPU — so
/// the access log is written by hand, with the same fields and key order.
public enum Timestamp {
    /// RFC 3339 in UTC with milliseconds: 2026-11-23T01:28:26.123Z.
    public static func rfc3339(_ date: Date) -> String {
        let t = date.timeIntervalSince1970
        var seconds = time_t(t.rounded(.down))
        let millis = Int((t - Double(seconds)) * 1000)
        var tm = tm()
        gmtime_r(&seconds, &tm)
        var s = ""
        s.reserveCapacity(24)
        s += pad(Int(tm.tm_year) + 1900, 4); s += "-"; s += pad(Int(tm.tm_mon) + 1, 2); s += "-"; s += pad(Int(tm.tm_mday), 2)
        s += "T"; s += pad(Int(tm.tm_hour), 2); s += ":"; s += pad(Int(tm.tm_min), 2); s += ":"; s += pad(Int(tm.tm_sec), 2)
        s += "."; s += pad(millis, 3); s += "Z"
        return s
    }

    static func pad(_ n: Int, _ width: Int) -> String {
        let d = String(n)
        return d.count >= width ? d : String(repeating: "0", count: width - d.count) + d
    }
}

extension AccessLogEntry {
    /// One JSON object (keys sorted, `rule` left out when there is none)
    /// and a newline.
    public func jsonLine() -> String {
        var o = "{"
        o.reserveCapacity(384)
        var first = true   // (String.count is O(n): not used to find the first key)
        func key(_ k: String) {
            o += first ? "\"" : ",\""
            first = false
            o += k
            o += "\":"
        }
        func str(_ k: String, _ v: String) { key(k); Self.quote(v, into: &o) }
        func num(_ k: String, _ v: Int) { key(k); o += String(v) }
        str("decision", decision)
        str("destination", destination)
        str("destinationAddress", destinationAddress)
        let micros = Int((durationMs * 1000).rounded())
        key("durationMs"); o += String(micros / 1000); o += "."; o += Timestamp.pad(micros % 1000, 3)
        str("method", method)
        str("path", path)
        num("requestBytes", requestBytes)
        num("responseBytes", responseBytes)
        if let rule { str("rule", rule) }
        str("source", source)
        num("status", status)
        str("time", time)
        o += "}\n"
        return o
    }

    /// A JSON string: quotes, backslashes and control characters escaped
    /// (request paths come from callers and may hold anything).
    static func quote(_ s: String, into o: inout String) {
        o += "\""
        // Nearly every value needs no escaping: copied whole.
        if !s.utf8.contains(where: { $0 < 0x20 || $0 == 0x22 || $0 == 0x5c || $0 == 0x7f }) {
            o += s
            o += "\""
            return
        }
        for u in s.unicodeScalars {
            switch u {
            case "\"": o += "\\\""
            case "\\": o += "\\\\"
            case "\n": o += "\\n"
            case "\r": o += "\\r"
            case "\t": o += "\\t"
            case _ where u.value < 0x20 || u.value == 0x7f:
                let hex = String(u.value, radix: 16)
                o += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
            default: o.unicodeScalars.append(u)
            }
        }
        o += "\""
    }
}
