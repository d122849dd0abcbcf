import NIOHPACK

/// HTTP/2's field rules (RFC 9113 §8.2, §8.3): what makes a request or a
/// response malformed. A malformed request is a stream error
/// (PROTOCOL_ERROR) and never reaches the rules or the workload; a
/// malformed response never reaches the caller (it gets 502). Strict on
/// purpose: two parsers that read one header block differently (a field
/// name with a space, a value with a line break, a Transfer-Encoding) is
/// how a proxy's rules get bypassed.
enum H2Fields {
    /// A field name is a token (RFC 9110 §5.1) in lowercase (RFC 9113
    /// §8.2.1); a colon only to begin a pseudo-header. (Read through
    /// withUTF8: walking `utf8` by index cost ~4% of the proxy under h2load.)
    static func validName(_ name: String, pseudo: Bool) -> Bool {
        var name = name
        return name.withUTF8 { b in
            guard !b.isEmpty else { return false }
            for (i, c) in b.enumerated() where !isTokenByte(c) {
                guard c == UInt8(ascii: ":") && pseudo && i == 0 else { return false }
            }
            return true
        }
    }

    /// tchar of RFC 9110 §5.6.2, uppercase letters left out.
    private static func isTokenByte(_ c: UInt8) -> Bool {
        switch c {
        case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "0")...UInt8(ascii: "9"),
             UInt8(ascii: "!"), UInt8(ascii: "#"), UInt8(ascii: "$"), UInt8(ascii: "%"), UInt8(ascii: "&"), UInt8(ascii: "'"),
             UInt8(ascii: "*"), UInt8(ascii: "+"), UInt8(ascii: "-"), UInt8(ascii: "."), UInt8(ascii: "^"), UInt8(ascii: "_"),
             UInt8(ascii: "`"), UInt8(ascii: "|"), UInt8(ascii: "~"):
            return true
        default:
            return false
        }
    }

    /// RFC 9113 §8.2.1: no NUL, CR or LF, and no whitespace at either end.
    static func validValue(_ value: String) -> Bool {
        var value = value
        return value.withUTF8 { b in
            guard let first = b.first, let last = b.last else { return true }
            if first == 0x20 || first == 0x09 || last == 0x20 || last == 0x09 { return false }
            for c in b where c == 0 || c == 0x0A || c == 0x0D { return false }
            return true
        }
    }

    /// RFC 9113 §8.2.2: connection-specific fields have no meaning in
    /// HTTP/2; TE may only say "trailers".
    static func connectionSpecific(_ name: String, _ value: String) -> Bool {
        switch name {
        case "connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade": return true
        case "te": return value.lowercased() != "trailers"
        default: return false
        }
    }

    /// A regular field line: a valid name and value, not connection-specific.
    private static func validRegular(_ name: String, _ value: String) -> Bool {
        validName(name, pseudo: false) && validValue(value) && !connectionSpecific(name, value)
    }

    /// A request head (RFC 9113 §8.3.1): pseudo-headers first, each of
    /// :method, :scheme, :path, :authority at most once and no other;
    /// :method always; :scheme and a non-empty :path unless CONNECT, which
    /// has :authority and neither of them; content-length well formed.
    static func validRequest(_ headers: HPACKHeaders) -> Bool {
        var method: String?, scheme = false, path: String?, authority = false
        var regular = false
        for (name, value, _) in headers {
            if name.utf8.first == UInt8(ascii: ":") {
                guard !regular else { return false }
                switch name {
                case ":method": guard method == nil, validValue(value), !value.isEmpty else { return false }; method = value
                case ":scheme": guard !scheme, validValue(value), !value.isEmpty else { return false }; scheme = true
                case ":path": guard path == nil, validValue(value) else { return false }; path = value
                case ":authority": guard !authority, validValue(value) else { return false }; authority = true
                default: return false
                }
            } else {
                regular = true
                guard validRegular(name, value) else { return false }
                if name == "content-length", contentLength(value) == nil { return false }
            }
        }
        guard let method else { return false }
        if method == "CONNECT" { return authority && !scheme && path == nil }
        guard scheme, let path, !path.isEmpty else { return false }
        return true
    }

    /// A response head: :status first, once, three digits; no other
    /// pseudo-header.
    static func validResponse(_ headers: HPACKHeaders) -> Bool {
        var status = false, regular = false
        for (name, value, _) in headers {
            if name.utf8.first == UInt8(ascii: ":") {
                guard !regular, !status, name == ":status", value.utf8.count == 3,
                      value.utf8.allSatisfy({ $0 >= UInt8(ascii: "0") && $0 <= UInt8(ascii: "9") }) else { return false }
                status = true
            } else {
                regular = true
                guard validRegular(name, value) else { return false }
            }
        }
        return status
    }

    /// Trailers, of either side: regular fields only (RFC 9113 §8.1).
    static func validTrailers(_ headers: HPACKHeaders) -> Bool {
        for (name, value, _) in headers {
            guard name.utf8.first != UInt8(ascii: ":"), validRegular(name, value) else { return false }
        }
        return true
    }

    /// The body length a head promises: .some(nil) when it names none, nil
    /// when its content-length lines are malformed or disagree.
    static func contentLength(of headers: HPACKHeaders) -> Int?? {
        var found: Int?
        for (name, value, _) in headers where name == "content-length" {
            guard let n = contentLength(value), found == nil || found == n else { return nil }
            found = n
        }
        return .some(found)
    }

    /// One content-length field line: a number, or a list of equal ones
    /// ("5, 5"); nil when malformed or they differ. Read in place: NIO's
    /// list split cost ~1% of the proxy on every response.
    static func contentLength(_ value: String) -> Int? {
        var result: Int?
        var n = 0, digits = 0, afterDigits = false
        func endOfElement() -> Bool {
            guard digits > 0, result == nil || result == n else { return false }
            result = n
            (n, digits, afterDigits) = (0, 0, false)
            return true
        }
        for c in value.utf8 {
            switch c {
            case UInt8(ascii: "0")...UInt8(ascii: "9"):
                guard !afterDigits, digits < 18 else { return nil }
                n = n * 10 + Int(c - UInt8(ascii: "0"))
                digits += 1
            case UInt8(ascii: " "), UInt8(ascii: "\t"):
                if digits > 0 { afterDigits = true }
            case UInt8(ascii: ","):
                guard endOfElement() else { return nil }
            default:
                return nil
            }
        }
        return endOfElement() ? result : nil
    }
}
