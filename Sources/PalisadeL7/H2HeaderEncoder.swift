import NIOCore
import NIOHPACK

/// HPACK (RFC 7541) as the proxy writes header blocks: a field that is a
/// whole entry of the static table goes as its index; any other as a
/// literal without indexing (never indexed when its sender marked it so),
/// its name by static index when there is one, its strings without Huffman
/// coding. No dynamic table, so nothing to search or evict.
///
/// Why: NIO's encoder searched its dynamic table for every field and
/// Huffman-coded what it did not find, ~14% of the proxy's samples under
/// h2load once both ends of the proxy were the agent's own (HAProxy writes
/// its blocks the same way as here). The blocks are larger (no
/// compression), which the two hops of the proxy (the local workload, the
/// tunnel's stream) carry for less than the encoding cost.
struct H2HeaderEncoder {
    /// The table size last announced (HTTP/2's default to begin with).
    private var announced = 4096
    /// A smaller size the peer's SETTINGS_HEADER_TABLE_SIZE asked for, to
    /// announce at the start of the next block (RFC 7541 §4.2).
    private var pendingSize: Int?

    /// The peer's SETTINGS_HEADER_TABLE_SIZE.
    mutating func peerTableSize(_ size: Int) {
        guard size < announced else { return }
        pendingSize = min(pendingSize ?? size, size)
    }

    mutating func encode(_ headers: HPACKHeaders, into out: inout ByteBuffer) {
        if let size = pendingSize {
            Self.writeInteger(size, prefix: 5, flags: 0x20, into: &out)   // dynamic table size update
            announced = size
            pendingSize = nil
        }
        for (name, value, indexing) in headers {
            if let index = Self.staticEntry(name, value) {
                Self.writeInteger(index, prefix: 7, flags: 0x80, into: &out)   // indexed field
                continue
            }
            let flags: UInt8 = indexing == .neverIndexed ? 0x10 : 0x00
            if let index = Self.staticNames[name] {
                Self.writeInteger(index, prefix: 4, flags: flags, into: &out)
            } else {
                out.writeInteger(flags)
                Self.writeString(name, into: &out)
            }
            Self.writeString(value, into: &out)
        }
    }

    /// RFC 7541 §5.1: an integer with an N-bit prefix.
    static func writeInteger(_ value: Int, prefix: Int, flags: UInt8, into out: inout ByteBuffer) {
        let limit = (1 << prefix) - 1
        guard value >= limit else {
            out.writeInteger(flags | UInt8(value))
            return
        }
        out.writeInteger(flags | UInt8(limit))
        var rest = value - limit
        while rest >= 128 {
            out.writeInteger(UInt8(rest & 0x7F | 0x80))
            rest >>= 7
        }
        out.writeInteger(UInt8(rest))
    }

    /// RFC 7541 §5.2: a string literal, not Huffman-coded.
    static func writeString(_ s: String, into out: inout ByteBuffer) {
        writeInteger(s.utf8.count, prefix: 7, flags: 0, into: &out)
        out.writeString(s)
    }

    /// Static table entries (RFC 7541 Appendix A) with a value.
    static func staticEntry(_ name: String, _ value: String) -> Int? {
        switch name {
        case ":method": return value == "GET" ? 2 : value == "POST" ? 3 : nil
        case ":path": return value == "/" ? 4 : value == "/index.html" ? 5 : nil
        case ":scheme": return value == "http" ? 6 : value == "https" ? 7 : nil
        case ":status":
            switch value {
            case "200": return 8
            case "204": return 9
            case "206": return 10
            case "304": return 11
            case "400": return 12
            case "404": return 13
            case "500": return 14
            default: return nil
            }
        case "accept-encoding": return value == "gzip, deflate" ? 16 : nil
        default: return nil
        }
    }

    /// The static table's names, each at its first index (RFC 7541 Appendix A).
    static let staticNames: [String: Int] = {
        let names = [":authority", ":method", ":method", ":path", ":path", ":scheme", ":scheme", ":status", ":status",
                     ":status", ":status", ":status", ":status", ":status", "accept-charset", "accept-encoding",
                     "accept-language", "accept-ranges", "accept", "access-control-allow-origin", "age", "allow",
                     "authorization", "cache-control", "content-disposition", "content-encoding", "content-language",
                     "content-length", "content-location", "content-range", "content-type", "cookie", "date", "etag",
                     "expect", "expires", "from", "host", "if-match", "if-modified-since", "if-none-match", "if-range",
                     "if-unmodified-since", "last-modified", "link", "location", "max-forwards", "proxy-authenticate",
                     "proxy-authorization", "range", "referer", "refresh", "retry-after", "server", "set-cookie",
                     "strict-transport-security", "transfer-encoding", "user-agent", "vary", "via", "www-authenticate"]
        var table: [String: Int] = [:]
        for (i, name) in names.enumerated() where table[name] == nil { table[name] = i + 1 }
        return table
    }()
}
